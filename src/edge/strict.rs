//! The rules a request head must meet before corral acts on it, as strict as nginx:
//! one Host, a Host on HTTP/1.1, no userinfo in the target, and on HTTP/2 a `host`
//! header that agrees with `:authority`. A request that breaks one gets 400 and
//! reaches no worker.
//!
//! It only judges heads; bodies are judged as they stream (`body::Limited` tells a
//! client's malformed body from a worker's failure).

use http::{header, Request, Version};

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
}

/// Checks a request head; `Ok` means corral may act on it.
pub fn check<B>(req: &Request<B>) -> Result<(), Refused> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(Refused::TwoHosts);
    }
    let authority = req.uri().authority();
    if authority.is_some_and(|a| a.as_str().contains('@')) {
        return Err(Refused::Userinfo);
    }
    if let Some(h) = host.filter(|h| !h.is_empty()) {
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
/// bracketed IPv6 one) and an optional port; no userinfo, path, query or spaces.
/// Checked byte by byte, without copying (it runs on every request).
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
        let mut b = Request::builder().version(version).uri(uri);
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
        assert_eq!(check(&req(HTTP_11, "/", &["a"])), Ok(()));
        assert_eq!(check(&req(HTTP_10, "/", &[])), Ok(()));
        assert_eq!(check(&req(HTTP_11, "/", &[""])), Ok(()));
        assert_eq!(check(&req(HTTP_11, "http://a/", &[])), Ok(()));
        assert_eq!(check(&req(HTTP_11, "/", &[])), Err(Refused::NoHost));
        assert_eq!(
            check(&req(HTTP_11, "/", &["a", "b"])),
            Err(Refused::TwoHosts)
        );
        assert_eq!(
            check(&req(HTTP_11, "/", &["a", "a"])),
            Err(Refused::TwoHosts)
        );
        assert_eq!(
            check(&req(HTTP_11, "http://a@b/", &["a"])),
            Err(Refused::Userinfo)
        );
        assert_eq!(check(&req(HTTP_11, "/", &["u@a"])), Err(Refused::BadHost));
        assert_eq!(check(&req(HTTP_11, "/", &["a b"])), Err(Refused::BadHost));
        for good in [
            "localhost",
            "127.0.0.1:8000",
            "[::1]:8443",
            "chat.example.com",
            "a_b-c.d:1",
        ] {
            assert_eq!(check(&req(HTTP_11, "/", &[good])), Ok(()), "{good}");
        }
        for bad in ["a/b", "a?b", "a#b", "a:", "a:x", ":80", "[::1", "a:1234567"] {
            assert_eq!(
                check(&req(HTTP_11, "/", &[bad])),
                Err(Refused::BadHost),
                "{bad}"
            );
        }
        assert_eq!(check(&req(HTTP_2, "http://a/", &["A"])), Ok(()));
        assert_eq!(check(&req(HTTP_2, "http://a/", &[])), Ok(()));
        assert_eq!(
            check(&req(HTTP_2, "http://a/", &["b"])),
            Err(Refused::HostNotAuthority)
        );
    }
}
