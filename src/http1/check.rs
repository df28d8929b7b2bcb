//! The rules a request head must meet before corral acts on it, as strict as nginx:
//! one Host, and a valid one (not empty), a Host on HTTP/1.1, no userinfo in the
//! target, no CONNECT, `*` only for OPTIONS, and on HTTP/2 a `host` header that
//! agrees with `:authority` (`request`). What the HTTP/1.1 head reader refuses
//! (`head::parse_request`: size, version, transfer coding, Content-Length) is a
//! [`Refused`] too. A request that breaks one gets the status of its [`Refused`]
//! and reaches no worker.
//!
//! It only judges heads; bodies are judged as they stream.

use http::{header, Method, Request, StatusCode, Version};

/// Why a request head was refused; the text goes to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("more than one Host header")]
    TwoHosts,
    #[error("HTTP/1.1 request without a Host header")]
    NoHost,
    #[error("userinfo in the request target")]
    Userinfo,
    #[error("host header differs from :authority")]
    HostNotAuthority,
    #[error("Host header is not a valid authority")]
    BadHost,
    #[error("CONNECT is not served")]
    Connect,
    #[error("`*` is a target for OPTIONS only")]
    Asterisk,
    #[error("request head larger than the limit")]
    HeadTooLarge,
    #[error("Transfer-Encoding other than chunked")]
    Coding,
    #[error("Transfer-Encoding on an HTTP/1.0 request")]
    CodingOnHttp10,
    #[error("an HTTP version other than 1.0 and 1.1")]
    Version,
    #[error("a head that cannot be read")]
    Malformed,
    #[error("an unreadable or conflicting Content-Length")]
    Length,
}

impl Refused {
    /// The answer's status, as nginx's for the same request (but 431, which says
    /// what nginx's 400 does not).
    pub fn status(self) -> StatusCode {
        match self {
            Refused::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Refused::Coding => StatusCode::NOT_IMPLEMENTED,
            Refused::Version => StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// Checks a request head on every path; `Ok` means corral may act on it.
pub fn request<B>(req: &Request<B>) -> Result<(), Refused> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(Refused::TwoHosts);
    }
    if req.method() == Method::CONNECT {
        return Err(Refused::Connect);
    }
    let authority = req.uri().authority();
    if authority.is_some_and(|a| a.as_str().contains('@')) {
        return Err(Refused::Userinfo);
    }
    if authority.is_none() && req.uri().path() == "*" && req.method() != Method::OPTIONS {
        return Err(Refused::Asterisk);
    }
    if let Some(h) = host {
        if !is_authority(h.as_bytes()) {
            return Err(Refused::BadHost);
        }
    }
    match req.version() {
        Version::HTTP_2 => {
            if let (Some(h), Some(a)) = (host, authority) {
                if !h.as_bytes().eq_ignore_ascii_case(a.as_str().as_bytes()) {
                    return Err(Refused::HostNotAuthority);
                }
            }
            Ok(())
        }
        // An absolute-form target names the host itself (RFC 9112 3.2.2).
        Version::HTTP_11 if host.is_none() && authority.is_none() => Err(Refused::NoHost),
        _ => Ok(()),
    }
}

/// A Host value that can name a server: host (a name, an IPv4 address or a
/// bracketed IPv6 one) and an optional port; no userinfo, path, query or spaces,
/// and not empty. Checked byte by byte, without copying (it runs on every request).
fn is_authority(h: &[u8]) -> bool {
    let (host, port) = match h.first() {
        Some(b'[') => match h.iter().position(|&c| c == b']') {
            Some(end) => (&h[..=end], &h[end + 1..]),
            None => return false,
        },
        _ => match h.iter().rposition(|&c| c == b':') {
            Some(i) => (&h[..i], &h[i..]),
            None => (h, &h[h.len()..]),
        },
    };
    let port_ok = port.is_empty()
        || (port.len() > 1
            && port.len() <= 6
            && port[0] == b':'
            && port[1..].iter().all(u8::is_ascii_digit));
    let host_ok = !host.is_empty()
        && host.iter().all(|&c| {
            c.is_ascii_alphanumeric()
                || matches!(c, b'-' | b'.' | b'_' | b'~' | b'[' | b']' | b':' | b'%')
        });
    host_ok && port_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: Version, uri: &str, hosts: &[&str]) -> Request<()> {
        with(Method::GET, version, uri, hosts)
    }

    fn with(method: Method, version: Version, uri: &str, hosts: &[&str]) -> Request<()> {
        let mut b = Request::builder().method(method).version(version).uri(uri);
        for h in hosts {
            b = b.header(header::HOST, *h);
        }
        b.body(()).expect("request")
    }

    #[test]
    fn heads_are_judged_as_nginx_does() {
        const HTTP_10: Version = Version::HTTP_10;
        const HTTP_11: Version = Version::HTTP_11;
        const HTTP_2: Version = Version::HTTP_2;
        assert_eq!(request(&req(HTTP_11, "/", &["a"])), Ok(()));
        assert_eq!(request(&req(HTTP_10, "/", &[])), Ok(()));
        assert_eq!(request(&req(HTTP_11, "/", &[""])), Err(Refused::BadHost));
        assert_eq!(request(&req(HTTP_10, "/", &[""])), Err(Refused::BadHost));
        assert_eq!(request(&req(HTTP_11, "http://a/", &[])), Ok(()));
        assert_eq!(request(&req(HTTP_11, "/", &[])), Err(Refused::NoHost));
        assert_eq!(
            request(&req(HTTP_11, "/", &["a", "b"])),
            Err(Refused::TwoHosts)
        );
        assert_eq!(
            request(&req(HTTP_11, "/", &["a", "a"])),
            Err(Refused::TwoHosts)
        );
        assert_eq!(
            request(&req(HTTP_11, "http://a@b/", &["a"])),
            Err(Refused::Userinfo)
        );
        assert_eq!(request(&req(HTTP_11, "/", &["u@a"])), Err(Refused::BadHost));
        assert_eq!(request(&req(HTTP_11, "/", &["a b"])), Err(Refused::BadHost));
        for good in [
            "localhost",
            "127.0.0.1:8000",
            "[::1]:8443",
            "chat.example.com",
            "a_b-c.d:1",
        ] {
            assert_eq!(request(&req(HTTP_11, "/", &[good])), Ok(()), "{good}");
        }
        for bad in ["a/b", "a?b", "a#b", "a:", "a:x", ":80", "[::1", "a:1234567"] {
            assert_eq!(
                request(&req(HTTP_11, "/", &[bad])),
                Err(Refused::BadHost),
                "{bad}"
            );
        }
        assert_eq!(request(&req(HTTP_2, "http://a/", &["A"])), Ok(()));
        assert_eq!(request(&req(HTTP_2, "http://a/", &[])), Ok(()));
        assert_eq!(
            request(&req(HTTP_2, "http://a/", &["b"])),
            Err(Refused::HostNotAuthority)
        );
        let connect = with(Method::CONNECT, HTTP_11, "a:443", &["a:443"]);
        assert_eq!(request(&connect), Err(Refused::Connect));
        assert_eq!(Refused::Connect.status(), StatusCode::BAD_REQUEST);
        assert_eq!(request(&req(HTTP_11, "*", &["a"])), Err(Refused::Asterisk));
        assert_eq!(
            request(&with(Method::OPTIONS, HTTP_11, "*", &["a"])),
            Ok(())
        );
    }
}
