//! How a message's body is delimited (RFC 9112 section 6): what a Content-Length
//! says, whether the transfer codings end in `chunked`, and a response's framing.

/// A failure to read or frame a message, as text for the log and the 502.
pub type Error = Box<dyn std::error::Error + Send + Sync>;
use http::header::{self, HeaderMap};
use http::{StatusCode, Version};

/// The one length every Content-Length value states; None when there is none, a
/// value is not all digits (no sign, no spaces inside: pingora's `from_digits`),
/// or the values differ.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    let mut found = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for part in value.as_bytes().split(|&b| b == b',') {
            let n = digits(part.trim_ascii())?;
            if found.is_some_and(|f| f != n) {
                return None;
            }
            found = Some(n);
        }
    }
    found
}

/// What one Content-Length value says, if it is one number of digits only.
pub fn content_length_value(value: &http::HeaderValue) -> Option<u64> {
    digits(value.as_bytes().trim_ascii())
}

/// A decimal number of digits only, that fits in a u64.
pub(super) fn digits(text: &[u8]) -> Option<u64> {
    if text.is_empty() {
        return None;
    }
    text.iter().try_fold(0u64, |n, &b| {
        let d = b.checked_sub(b'0').filter(|d| *d <= 9)?;
        n.checked_mul(10)?.checked_add(d as u64)
    })
}

/// Whether the last transfer coding named is `chunked`.
pub fn ends_chunked(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()
        .and_then(|v| v.as_bytes().rsplit(|&b| b == b',').next())
        .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// How a body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// Exactly this many bytes.
    Length(u64),
    Chunked,
    /// Until the connection closes.
    Close,
}

/// How a response body is delimited (RFC 9112 section 6.3), and whether the
/// connection can carry another request after it as far as the framing goes.
pub fn response_body(
    status: StatusCode,
    version: Version,
    headers: &HeaderMap,
    head_request: bool,
) -> Result<(Body, bool), Error> {
    let code = status.as_u16();
    if head_request || code == 204 || code == 304 {
        return Ok((Body::Length(0), true));
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        if version == Version::HTTP_10 {
            return Err("Transfer-Encoding in an HTTP/1.0 response".into());
        }
        if !ends_chunked(headers) {
            return Ok((Body::Close, false));
        }
        // Chunked wins over a Content-Length beside it; a worker that sent both
        // is not trusted with another request.
        let alone = !headers.contains_key(header::CONTENT_LENGTH);
        return Ok((Body::Chunked, alone));
    }
    if headers.contains_key(header::CONTENT_LENGTH) {
        return content_length(headers)
            .map(|n| (Body::Length(n), true))
            .ok_or_else(|| "invalid or conflicting Content-Length".into());
    }
    Ok((Body::Close, false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn lengths(values: &[&'static str]) -> Option<u64> {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::CONTENT_LENGTH, HeaderValue::from_static(v));
        }
        content_length(&h)
    }

    #[test]
    fn a_content_length_is_digits_only() {
        assert_eq!(lengths(&["5"]), Some(5));
        assert_eq!(lengths(&[" 5 "]), Some(5));
        assert_eq!(lengths(&["5", "5"]), Some(5));
        assert_eq!(lengths(&["5, 5"]), Some(5));
        assert_eq!(lengths(&["007"]), Some(7));
        assert_eq!(lengths(&["18446744073709551615"]), Some(u64::MAX));
        for bad in ["+5", "-5", "5 5", "0x5", "", "5,", "18446744073709551616"] {
            assert_eq!(lengths(&[bad]), None, "{bad:?}");
        }
        assert_eq!(lengths(&["5", "6"]), None);
        assert_eq!(lengths(&[]), None);
    }
}
