//! Header fields with a meaning for the connection rather than the message: the
//! Connection header's tokens, the hop-by-hop fields (RFC 9110 7.6.1), a websocket
//! upgrade, names nginx does not pass on, and the request target as a worker
//! gets it (origin form).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Uri;

/// Whether a Connection header's values say `close`.
pub fn wants_close(headers: &HeaderMap) -> bool {
    connection_lists(headers, b"close")
}

/// Whether any Connection header lists `token` (any case).
pub fn connection_lists(headers: &HeaderMap, token: &[u8]) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| has_token(v, token))
}

/// Whether a comma-separated header value lists `token` (any case).
pub fn has_token(value: &HeaderValue, token: &[u8]) -> bool {
    lists_token(value.as_bytes(), token)
}

/// Whether the comma-separated `value` lists `token` (any case).
pub fn lists_token(value: &[u8], token: &[u8]) -> bool {
    tokens(value).any(|t| t.eq_ignore_ascii_case(token))
}

/// The tokens of a comma-separated value, trimmed (empty ones included).
pub fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(<[u8]>::trim_ascii)
}

/// Whether every Connection token is one of the usual ones (`keep-alive`,
/// `close`): such a header names no other field to remove.
pub fn connection_is_plain(headers: &HeaderMap) -> bool {
    headers.get_all(header::CONNECTION).iter().all(|v| {
        tokens(v.as_bytes()).all(|t| {
            t.eq_ignore_ascii_case(b"keep-alive")
                || t.eq_ignore_ascii_case(b"close")
                || t.is_empty()
        })
    })
}

/// A websocket upgrade: `Upgrade: websocket` and `Connection: upgrade`.
pub fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    let upgrade = headers
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    upgrade && connection_lists(headers, b"upgrade")
}

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// Headers for one hop only (RFC 9110 7.6.1), removed before a request or response
/// goes on.
pub static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    KEEP_ALIVE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Fields a Connection header cannot name away. RFC 9110 7.6.1 has a proxy remove
/// what Connection lists, but a message without these is another message: a
/// request that passed the gate with its Host would reach the worker without one,
/// and its credentials and session cookie would vanish on the way. nginx, which
/// rebuilds the request, keeps them all.
static NEVER_NAMED_AWAY: [HeaderName; 5] = [
    header::HOST,
    header::CONTENT_LENGTH,
    header::AUTHORIZATION,
    header::COOKIE,
    header::SET_COOKIE,
];

/// Which of `names` a header map holds, as a bit per name: one pass over the few
/// headers a message has, instead of a lookup per name.
pub fn present(headers: &HeaderMap, names: &[HeaderName]) -> u32 {
    let mut mask = 0;
    for key in headers.keys() {
        if let Some(i) = names.iter().position(|n| n == key) {
            mask |= 1 << i;
        }
    }
    mask
}

/// Removes the names of `names` whose bit is set in `mask`.
pub fn remove_present(headers: &mut HeaderMap, names: &[HeaderName], mask: u32) {
    for (i, name) in names.iter().enumerate() {
        if mask & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// Removes hop-by-hop headers, and those the Connection header names but for the
/// ones it cannot (`NEVER_NAMED_AWAY`).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mask = present(headers, &HOP_BY_HOP);
    if mask == 0 {
        return;
    }
    if !connection_is_plain(headers) {
        // Names the Connection header lists besides the usual tokens (rare).
        let listed: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| tokens(v.as_bytes()))
            .filter_map(|t| HeaderName::from_bytes(t).ok())
            .filter(|n| !NEVER_NAMED_AWAY.contains(n))
            .collect();
        for name in listed {
            headers.remove(name);
        }
    }
    remove_present(headers, &HOP_BY_HOP, mask);
}

/// Whether a field name has an underscore: nginx drops such fields by default
/// (`underscores_in_headers off`), since servers that map `-` and `_` to one key
/// (CGI, WSGI) would read `X_Forwarded_For` as `X-Forwarded-For`.
pub fn has_underscore(name: &HeaderName) -> bool {
    // A plain loop: names are short, and `contains` calls memchr for each one (it
    // runs for every header of every request).
    name.as_str().bytes().any(|b| b == b'_')
}

/// Removes every field whose name has an underscore.
pub fn remove_underscored(headers: &mut HeaderMap) {
    if !headers.keys().any(has_underscore) {
        return;
    }
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|n| has_underscore(n))
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}

/// `/path?query` of a request: what an HTTP/1.1 worker gets as the target. An
/// HTTP/2 request's URI, and an absolute-form one, also have scheme and authority,
/// which must not go on; a target with no path (`http://a?x=1`) gets `/`.
pub fn origin_form(uri: &Uri) -> Uri {
    if uri.scheme().is_none() && uri.authority().is_none() {
        return uri.clone();
    }
    match uri.path_and_query() {
        Some(pq) if pq.as_str().starts_with('/') => Uri::from(pq.clone()),
        // `Display` writes the `/` that `as_str` lacks.
        Some(pq) => pq
            .to_string()
            .parse()
            .unwrap_or_else(|_| Uri::from_static("/")),
        None => Uri::from_static("/"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_form_keeps_path_and_query() {
        let u = origin_form(&Uri::from_static(
            "https://example.org/socket.io/?EIO=4&transport=polling",
        ));
        assert_eq!(u.to_string(), "/socket.io/?EIO=4&transport=polling");
        assert_eq!(origin_form(&Uri::from_static("/a?b")).to_string(), "/a?b");
        assert_eq!(
            origin_form(&Uri::from_static("http://example.org")).to_string(),
            "/"
        );
        assert_eq!(
            origin_form(&Uri::from_static("http://localhost?x=1")).to_string(),
            "/?x=1"
        );
    }

    #[test]
    fn connection_names_away_what_it_may() {
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("host", "a"),
            ("cookie", "io=1"),
            ("authorization", "Basic x"),
            ("content-length", "0"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            (
                "connection",
                "Host, Cookie, authorization, content-length, x-secret, keep-alive",
            ),
        ] {
            h.insert(n, HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        for kept in ["host", "cookie", "authorization", "content-length"] {
            assert!(h.contains_key(kept), "{kept}");
        }
        for gone in ["x-secret", "keep-alive", "connection"] {
            assert!(!h.contains_key(gone), "{gone}");
        }
    }

    #[test]
    fn underscored_names_go() {
        let mut h = HeaderMap::new();
        h.insert("x_forwarded_for", HeaderValue::from_static("6.6.6.6"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        remove_underscored(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }
}
