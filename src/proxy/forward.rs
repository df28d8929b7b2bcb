//! Sending one request to a worker, for the request path (`route`) and the websocket
//! tunnel (`tunnel`) alike: who sent it ([`Peer`]) and what it holds while it uses a
//! worker ([`Target`], [`Ticket`]); the request as a worker gets it (origin form,
//! HTTP/1.1, hop-by-hop headers out, forwarded headers in); one exchange on a
//! kept-alive or new connection ([`Forwarder`]); and the rule for sending it again,
//! judged by what its body carried ([`Replay`]: only a request none of whose body can
//! be lost).
//!
//! It chooses no worker (the router and the pool do) and keeps no state; connections
//! are `upstream`'s.

use crate::engineio::router::{NewSession, SessionTicket};
use crate::transport::body::{self, ProxyBody};
use crate::transport::upstream::{self, Answer, SendError};
use crate::workers::pool::Worker;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Uri, Version};
use std::net::SocketAddr;
use std::sync::Arc;

/// Who sent a request, as the listener saw it.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub addr: SocketAddr,
    pub scheme: &'static str,
    /// A trusted proxy: its X-Forwarded-* headers are kept and appended to.
    pub trusted: bool,
    /// This listener only redirects to https on this port.
    pub redirect_https: Option<u16>,
}

/// What a request holds on to while it uses a worker.
#[derive(Debug)]
pub(crate) enum Ticket {
    /// A request of a known Engine.IO session.
    Session(SessionTicket),
    /// A handshake creating a session.
    New(NewSession),
    /// Anything else.
    Plain,
    /// A request for a session on another corral node, sent there once.
    Hop,
}

/// A session's ticket is let go when its response ends or is given up alike.
impl body::Guard for Ticket {
    fn ended(self) {}
}

/// The worker a request goes to and what it holds there.
#[derive(Debug)]
pub(crate) struct Target {
    pub worker: Arc<Worker>,
    pub ticket: Ticket,
}

/// Sends requests to workers over `upstream`'s connections.
pub(crate) struct Forwarder {
    pub(crate) upstream: upstream::Settings,
    /// This node's hop header value, when there are other nodes.
    pub(crate) hop: Option<HeaderValue>,
}

impl Forwarder {
    /// A request going to another node carries this node's hop mark; one going to a
    /// worker never carries one (`prepare_request_headers` removed the client's).
    pub(crate) fn mark_hop(&self, headers: &mut HeaderMap, ticket: &Ticket) {
        if let (Ticket::Hop, Some(v)) = (ticket, &self.hop) {
            headers.insert(crate::engineio::sidtag::HOP_HEADER, v.clone());
        }
    }

    /// One request to a worker. A replayable request that meets a kept-alive
    /// connection closing under it (the worker's keep-alive timeout, or a restart)
    /// goes out once more on a new connection, as nginx does.
    pub(crate) async fn exchange(
        &self,
        worker: &Arc<Worker>,
        req: Request<ProxyBody>,
        replay: Option<&Replay>,
    ) -> Result<Answer, SendError> {
        match upstream::send(worker.clone(), worker.addr, &self.upstream, req, false).await {
            Err(SendError::Stale(e)) => match replay {
                Some(r) => {
                    tracing::debug!(worker = worker.id, error = %e, "kept-alive connection closed; sending again");
                    upstream::send(
                        worker.clone(),
                        worker.addr,
                        &self.upstream,
                        r.request(),
                        true,
                    )
                    .await
                }
                None => Err(SendError::Http(e)),
            },
            other => other,
        }
    }
}

/// What is needed to send a bodiless request again.
pub(crate) struct Replay {
    pub method: Method,
    /// Already in origin form (`origin_form`).
    pub uri: Uri,
    pub headers: HeaderMap,
}

impl Replay {
    /// For a request as it came from the client.
    pub(crate) fn new(method: Method, uri: &Uri, headers: HeaderMap) -> Replay {
        Replay {
            method,
            uri: origin_form(uri),
            headers,
        }
    }

    pub(crate) fn request(&self) -> Request<ProxyBody> {
        upstream_request(
            self.method.clone(),
            self.uri.clone(),
            self.headers.clone(),
            body::empty(),
        )
    }
}

/// The request as a worker gets it: `uri` in origin form, HTTP/1.1, the client's Host.
pub(crate) fn upstream_request(
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: ProxyBody,
) -> Request<ProxyBody> {
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    req
}

/// `/path?query` of a request (an HTTP/2 request's URI also has scheme and
/// authority, which HTTP/1.1 to the worker must not carry).
pub(crate) fn origin_form(uri: &Uri) -> Uri {
    if uri.scheme().is_none() && uri.authority().is_none() {
        return uri.clone();
    }
    match uri.path_and_query() {
        Some(pq) => Uri::from(pq.clone()),
        None => Uri::from_static("/"),
    }
}

pub(crate) fn is_websocket_upgrade<B>(req: &Request<B>) -> bool {
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    upgrade && connection_has(req.headers(), "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

pub(crate) fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

pub(crate) fn declared_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including those the Connection header names.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most requests carry none but Connection: one pass over the few names present
    // is cheaper than looking each hop-by-hop name up.
    let present = headers.keys().any(|k| HOP_BY_HOP.contains(k));
    if !present {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Forwarding headers that only a trusted proxy may pass on.
const UNTRUSTED_DROPPED: [HeaderName; 3] = [
    header::FORWARDED,
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-prefix"),
];

/// Header rules for a request going to a worker: hop-by-hop headers out (but the
/// upgrade pair kept for a websocket), forwarded headers in, Host kept.
pub(crate) fn prepare_request_headers(
    headers: &mut HeaderMap,
    uri: &Uri,
    peer: Peer,
    websocket: bool,
) {
    let upgrade = websocket
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten();
    strip_hop_by_hop(headers);
    if let Some(up) = upgrade {
        headers.insert(header::UPGRADE, up);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    // HTTP/2 clients send :authority instead of Host, and an absolute-form target's
    // authority wins over Host (RFC 9112 3.2.2); `strict` has checked they agree
    // on HTTP/2 and that neither carries userinfo.
    if let Some(host) = uri
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        headers.insert(header::HOST, host);
    }
    let ip = peer.addr.ip().to_string();
    // Made once: X-Real-IP is the same address.
    let real_ip = HeaderValue::from_str(&ip).ok();
    // From a trusted proxy the chain goes on; from anyone else it starts here, so a
    // client cannot pass a forged address, scheme or host to the workers.
    let prior = match peer.trusted {
        true => headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .collect::<Vec<_>>()
            .join(", "),
        false => String::new(),
    };
    let xff = if prior.is_empty() {
        ip
    } else {
        format!("{prior}, {ip}")
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert("x-forwarded-for", v);
    }
    let keep = |h: &HeaderMap, name: &str| peer.trusted && h.contains_key(name);
    if !peer.trusted {
        // Only corral may say where a request came from: what an untrusted client
        // claims in these is dropped (the X-Forwarded-* above and below are set).
        for name in UNTRUSTED_DROPPED {
            headers.remove(name);
        }
    }
    // A hop mark is this node's to set (`Forwarder::mark_hop`), never passed on.
    headers.remove(crate::engineio::sidtag::HOP_HEADER);
    if !keep(headers, "x-real-ip") {
        if let Some(v) = real_ip {
            headers.insert("x-real-ip", v);
        }
    }
    if !keep(headers, "x-forwarded-proto") {
        headers.insert("x-forwarded-proto", HeaderValue::from_static(peer.scheme));
    }
    if !keep(headers, "x-forwarded-host") {
        match headers.get(header::HOST).cloned() {
            Some(host) => {
                headers.insert("x-forwarded-host", host);
            }
            None => {
                headers.remove("x-forwarded-host");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> Peer {
        Peer {
            addr: SocketAddr::from(([10, 1, 2, 3], 4444)),
            scheme: "http",
            trusted: true,
            redirect_https: None,
        }
    }

    #[test]
    fn untrusted_forwarded_headers_are_replaced() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("real.example"));
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        h.insert(
            "x-forwarded-host",
            HeaderValue::from_static("forged.example"),
        );
        let untrusted = Peer {
            trusted: false,
            ..peer()
        };
        prepare_request_headers(&mut h, &Uri::from_static("/"), untrusted, false);
        assert_eq!(h["x-forwarded-for"], "10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "real.example");
    }

    #[test]
    fn forwarded_headers_append_and_keep_host() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("example.org:8000"));
        h.insert("x-forwarded-for", HeaderValue::from_static("1.1.1.1"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        prepare_request_headers(&mut h, &Uri::from_static("/"), peer(), false);
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "example.org:8000");
        assert_eq!(h[header::HOST], "example.org:8000");
        assert!(!h.contains_key("x-secret"));
        assert!(!h.contains_key(header::TE));
        assert!(!h.contains_key(header::CONNECTION));
    }

    #[test]
    fn websocket_keeps_upgrade_pair() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        prepare_request_headers(&mut h, &Uri::from_static("/"), peer(), true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }

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
    }
}
