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
        // A Host with userinfo, a path or spaces cannot name a server.
        let valid = h
            .to_str()
            .ok()
            .and_then(|h| h.parse::<http::uri::Authority>().ok())
            .is_some_and(|a| !a.as_str().contains('@'));
        if !valid {
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
        assert_eq!(check(&req(HTTP_2, "http://a/", &["A"])), Ok(()));
        assert_eq!(check(&req(HTTP_2, "http://a/", &[])), Ok(()));
        assert_eq!(
            check(&req(HTTP_2, "http://a/", &["b"])),
            Err(Refused::HostNotAuthority)
        );
    }
}
