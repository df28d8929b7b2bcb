//! Writing messages: a request as a worker gets it, and a response head as hyper's
//! server wrote it (the same status line, header order, one `connection` line,
//! `content-length` or chunking, `date`), so clients saw no change when corral's own
//! HTTP/1.1 took hyper's place.

use super::fields::wants_close;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri, Version};

/// The request as a worker gets it: `uri` (already in origin form) and HTTP/1.1,
/// `headers` but those `skip` names, then `added`, and `body` framed by a
/// Content-Length or chunks written here (any the headers carry is replaced, so the framing
/// always matches the bytes sent).
pub fn request(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    skip: impl Fn(&HeaderName) -> bool,
    added: &[(HeaderName, HeaderValue)],
    body: Outgoing<'_>,
) -> Vec<u8> {
    let in_hand = match body {
        Outgoing::InHand(bytes) => bytes,
        _ => &[],
    };
    let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let lines = headers.len() + added.len();
    let mut out = Vec::with_capacity(64 + target.len() + lines * 40 + in_hand.len());
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut declared = false;
    let kept = headers.iter().filter(|(name, _)| {
        let length = *name == header::CONTENT_LENGTH;
        declared |= length;
        !length && !skip(name)
    });
    for (name, value) in kept.chain(added.iter().map(|(n, v)| (n, v))) {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let length = match body {
        Outgoing::InHand(bytes) if declared || !bytes.is_empty() => Some(bytes.len() as u64),
        Outgoing::InHand(_) => None,
        Outgoing::Length(n) => Some(n),
        Outgoing::Chunked => {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            None
        }
    };
    if let Some(n) = length {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(n.to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(in_hand);
    out
}

/// Appends `data` to `out` as one chunk of a chunked body (RFC 9112 7.1): its size
/// line, the data, its CRLF.
pub fn chunk(out: &mut Vec<u8>, data: &[u8]) {
    use std::io::Write as _;
    let _ = write!(out, "{:x}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The last chunk of a chunked body, with no trailers.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// A request's body as it goes to a worker: in hand (written with the head, its
/// length declared when it has one or the client declared one), or streamed after
/// the head, of a declared length or chunked.
#[derive(Debug, Clone, Copy)]
pub enum Outgoing<'a> {
    InHand(&'a [u8]),
    Length(u64),
    Chunked,
}

/// How a response body is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Exactly this many bytes (what the head's Content-Length says).
    Length(u64),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 response of unknown length).
    Close,
    /// None at all (HEAD, 204, 304).
    Nothing,
}

/// What is known of a response body when its head is written.
#[derive(Debug, Clone, Copy)]
pub struct BodyKnown {
    /// It has ended already (nothing to send).
    pub ended: bool,
    /// Its exact length, if known.
    pub exact: Option<u64>,
}

/// The status line and headers, as hyper's server wrote them, and how the body
/// goes and whether the connection stays open after it (`keep`: the client did
/// not ask to close and no drain began).
pub fn response_head(
    out: &mut Vec<u8>,
    parts: &http::response::Parts,
    body: BodyKnown,
    head_request: bool,
    keep: bool,
) -> (Framing, bool) {
    let status = parts.status;
    let http10 = parts.version == Version::HTTP_10;
    let reason = parts.extensions.get::<super::head::Reason>();
    status_line(out, status, http10, reason);
    // What hyper's dispatcher tells its encoder of the body.
    let known = match body.ended {
        true => Some(0),
        false => body.exact,
    };
    // A 1xx (a 101 above all) and a 204 carry no body and no framing header.
    let no_body = head_request || status.is_informational() || matches!(status.as_u16(), 204 | 304);
    let may_have_length = !status.is_informational() && !matches!(status.as_u16(), 204 | 304);
    // hyper writes every Connection value on one line where the first was, adding
    // `close` when it will close (the client asked, or a drain began).
    let mut keep = keep;
    let own_close = wants_close(&parts.headers);
    let add_close = !keep && !own_close;
    keep &= !own_close;
    let mut length: Option<u64> = None;
    let mut wrote_date = false;
    let mut wrote_connection = false;
    let mut last_name: Option<&HeaderName> = None;
    for (name, value) in &parts.headers {
        let repeat = last_name == Some(name);
        last_name = Some(name);
        match *name {
            header::CONTENT_LENGTH => {
                if repeat {
                    continue;
                }
                let Some(n) = super::framing::content_length_value(value) else {
                    continue;
                };
                if body.ended && !head_request {
                    // No body to send: the header goes, an implicit 0 is written below.
                    continue;
                }
                length = Some(known.unwrap_or(n));
            }
            header::CONNECTION => {
                if !wrote_connection {
                    wrote_connection = true;
                    connection_line(out, &parts.headers, add_close);
                }
                continue;
            }
            header::TRANSFER_ENCODING | header::TRAILER => continue,
            header::DATE => wrote_date = true,
            _ => {}
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !wrote_connection && add_close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    let framing = match (length, known) {
        (Some(n), _) => Framing::Length(n),
        (None, Some(n)) => {
            if may_have_length && (n != 0 || !head_request) {
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(n.to_string().as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            Framing::Length(n)
        }
        (None, None) if http10 || no_body => Framing::Close,
        (None, None) => {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            Framing::Chunked
        }
    };
    if !wrote_date {
        date_line(out);
    }
    out.extend_from_slice(b"\r\n");
    if no_body {
        return (Framing::Nothing, keep);
    }
    if framing == Framing::Close {
        keep = false;
    }
    (framing, keep)
}

/// `HTTP/1.1 200 OK\r\n`, with a custom reason where one was given.
fn status_line(
    out: &mut Vec<u8>,
    status: StatusCode,
    http10: bool,
    reason: Option<&super::head::Reason>,
) {
    if !http10 && status == StatusCode::OK && reason.is_none() {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        return;
    }
    out.extend_from_slice(if http10 { b"HTTP/1.0 " } else { b"HTTP/1.1 " });
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    match reason {
        Some(r) => out.extend_from_slice(r.as_bytes()),
        None => out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes()),
    }
    out.extend_from_slice(b"\r\n");
}

/// The answer to a head refused before it was taken (400, 431, 501, 505): `text`
/// says why, and the connection closes after it.
pub fn refusal_head(out: &mut Vec<u8>, status: StatusCode, text: &str) {
    status_line(out, status, false, None);
    out.extend_from_slice(b"content-type: text/plain; charset=utf-8\r\nconnection: close\r\n");
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(text.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    date_line(out);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(text.as_bytes());
}

/// The one `connection` line: every value, then `close` if it is to be added.
fn connection_line(out: &mut Vec<u8>, headers: &HeaderMap, add_close: bool) {
    out.extend_from_slice(b"connection: ");
    for (i, v) in headers.get_all(header::CONNECTION).iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(v.as_bytes());
    }
    if add_close {
        out.extend_from_slice(b", close");
    }
    out.extend_from_slice(b"\r\n");
}

fn date_line(out: &mut Vec<u8>) {
    out.extend_from_slice(b"date: ");
    date::extend(out);
    out.extend_from_slice(b"\r\n");
}

/// The `date` header's value, made once a second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }

    pub(super) fn extend(out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHED.with(|c| {
            let mut c = c.borrow_mut();
            if c.0 != secs || c.1.is_empty() {
                *c = (secs, httpdate::fmt_http_date(now));
            }
            out.extend_from_slice(c.1.as_bytes());
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_framed_by_what_it_carries() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("a"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("99"));
        let uri: Uri = "/x?y=1".parse().expect("uri");
        let req = request(
            &Method::POST,
            &uri,
            &headers,
            |_| false,
            &[],
            Outgoing::InHand(b"abc"),
        );
        assert_eq!(
            &req[..],
            b"POST /x?y=1 HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nabc"
        );
        headers.remove(header::CONTENT_LENGTH);
        let req = request(
            &Method::GET,
            &uri,
            &headers,
            |_| false,
            &[],
            Outgoing::InHand(b""),
        );
        assert_eq!(&req[..], b"GET /x?y=1 HTTP/1.1\r\nhost: a\r\n\r\n");
        // Skipped names out, added ones last.
        headers.insert("x-drop", HeaderValue::from_static("1"));
        let added = [(
            HeaderName::from_static("x-add"),
            HeaderValue::from_static("2"),
        )];
        let req = request(
            &Method::GET,
            &uri,
            &headers,
            |n| n == "x-drop",
            &added,
            Outgoing::InHand(b""),
        );
        assert_eq!(
            &req[..],
            b"GET /x?y=1 HTTP/1.1\r\nhost: a\r\nx-add: 2\r\n\r\n"
        );
    }
}
