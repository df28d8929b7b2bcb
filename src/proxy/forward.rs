//! Sending one request to a worker, for the request path (`route`) and the websocket
//! tunnel (`tunnel`) alike: who sent it ([`Peer`]) and what it holds while it uses a
//! worker ([`Target`], [`Ticket`]); the request as a worker gets it (origin form,
//! HTTP/1.1, hop-by-hop headers out, forwarded headers in); one exchange on a
//! kept-alive or new connection ([`Forwarder`]), sent again only when none of its
//! body can be lost (the caller says so).
//!
//! It chooses no worker (the router and the pool do) and keeps no state; connections
//! are `upstream`'s.

use crate::engineio::router::{NewSession, SessionTicket};
use crate::http1::fields::{connection_is_plain, present, remove_present, remove_underscored};
use crate::http1::strip_hop_by_hop;
use crate::transport::body::{self, ProxyBody};
use crate::transport::http1;
use crate::transport::upstream::{self, Answer, SendError};
use crate::workers::pool::Worker;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Uri};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// Who sent a request, as the listener saw it.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// `addr`'s IP as a header value (X-Forwarded-For, X-Real-IP), made once per
    /// connection rather than per request.
    pub ip: HeaderValue,
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
    /// `underscores_in_headers`: names with an underscore are passed on.
    pub(crate) underscores: bool,
}

impl Forwarder {
    /// A request going to another node carries this node's hop mark; one going to a
    /// worker never carries one (`prepare_request_headers` removed the client's).
    pub(crate) fn mark_hop(&self, headers: &mut HeaderMap, ticket: &Ticket) {
        if let (Ticket::Hop, Some(v)) = (ticket, &self.hop) {
            headers.insert(crate::engineio::sidtag::HOP_HEADER, v.clone());
        }
    }

    /// One request to a worker (`body`: its streamed body, if any). A
    /// `replayable` request that meets a kept-alive connection closing under it
    /// (the worker's keep-alive timeout, or a restart) goes out once more on a new
    /// connection, as nginx does.
    pub(crate) async fn exchange(
        &self,
        worker: &Arc<Worker>,
        req: &http1::Request,
        body: Option<ProxyBody>,
        replayable: bool,
    ) -> Result<Answer, SendError> {
        let home = worker.clone();
        match upstream::send(home, worker.addr, &self.upstream, req, body, false).await {
            Err(SendError::Stale(e)) if replayable => {
                tracing::debug!(worker = worker.id, error = %e, "kept-alive connection closed; sending again");
                let home = worker.clone();
                upstream::send(home, worker.addr, &self.upstream, req, None, true).await
            }
            Err(SendError::Stale(e)) => Err(SendError::Http(e)),
            other => other,
        }
    }
}

pub(crate) fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

impl Peer {
    /// A peer at `addr`.
    pub fn new(
        addr: SocketAddr,
        scheme: &'static str,
        trusted: bool,
        redirect_https: Option<u16>,
    ) -> Peer {
        let ip = ip_text(addr.ip());
        Peer {
            addr,
            ip,
            scheme,
            trusted,
            redirect_https,
        }
    }
}

/// The address as a header value. IPv4 is written digit by digit: through `fmt` it
/// cost 1,500 instructions and three allocations for every new client connection.
fn ip_text(ip: IpAddr) -> HeaderValue {
    let v6;
    let mut v4 = [0u8; 15];
    let text = match ip {
        IpAddr::V4(ip) => {
            let mut n = 0;
            for (i, octet) in ip.octets().into_iter().enumerate() {
                if i > 0 {
                    v4[n] = b'.';
                    n += 1;
                }
                if octet >= 100 {
                    v4[n] = b'0' + octet / 100;
                    n += 1;
                }
                if octet >= 10 {
                    v4[n] = b'0' + octet / 10 % 10;
                    n += 1;
                }
                v4[n] = b'0' + octet % 10;
                n += 1;
            }
            &v4[..n]
        }
        IpAddr::V6(ip) => {
            v6 = ip.to_string();
            v6.as_bytes()
        }
    };
    HeaderValue::from_maybe_shared(bytes::Bytes::copy_from_slice(text))
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
const X_FORWARDED_PREFIX: HeaderName = HeaderName::from_static("x-forwarded-prefix");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// What the forwarding rules look at, in one pass (bits of [`present`]).
static FORWARDING: [HeaderName; 8] = [
    X_FORWARDED_FOR,
    X_REAL_IP,
    X_FORWARDED_PROTO,
    X_FORWARDED_HOST,
    // Only a trusted proxy may pass these on.
    header::FORWARDED,
    X_FORWARDED_PORT,
    X_FORWARDED_PREFIX,
    // A hop mark is this node's to set (`Forwarder::mark_hop`), never passed on.
    crate::engineio::sidtag::HOP_HEADER,
];
const HAS_XFF: u32 = 1;
const HAS_REAL_IP: u32 = 1 << 1;
const HAS_PROTO: u32 = 1 << 2;
const HAS_HOST: u32 = 1 << 3;
const UNTRUSTED_DROPPED: u32 = 0b111 << 4;
const HAS_HOP: u32 = 1 << 7;

/// The forwarding headers of the common request, decided without rewriting its
/// header map: from an untrusted peer (so every forwarding header the client sent
/// goes and corral's own replace them), with an origin-form target (its Host is
/// the client's), and a Connection header that names no other header. None for
/// anything else, whose map `prepare_request_headers` rewrites. What it gives must
/// equal what `prepare_request_headers` makes (`tests/fastpath.rs` compares them
/// through the worker).
pub(crate) fn direct_forwarding(
    headers: &HeaderMap,
    uri: &Uri,
    peer: &Peer,
) -> Option<[(HeaderName, HeaderValue); 4]> {
    if peer.trusted || uri.authority().is_some() {
        return None;
    }
    if !connection_is_plain(headers) {
        return None;
    }
    let host = headers.get(header::HOST)?.clone();
    Some([
        (X_FORWARDED_FOR, peer.ip.clone()),
        (X_REAL_IP, peer.ip.clone()),
        (X_FORWARDED_PROTO, HeaderValue::from_static(peer.scheme)),
        (X_FORWARDED_HOST, host),
    ])
}

/// Whether a client's header stays behind when `direct_forwarding` applies: the
/// hop-by-hop ones and every forwarding header (corral's own take their place).
pub(crate) fn dropped_direct(name: &HeaderName) -> bool {
    // One match on the name instead of sixteen comparisons; the tables are the
    // truth (a unit test holds this list to them).
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "x-forwarded-for"
            | "x-real-ip"
            | "x-forwarded-proto"
            | "x-forwarded-host"
            | "forwarded"
            | "x-forwarded-port"
            | "x-forwarded-prefix"
            | "x-corral-hop"
    )
}

/// Header rules for a request going to a worker: hop-by-hop headers out (but the
/// upgrade pair kept for a websocket), names with underscores out unless
/// `underscores` allows them, forwarded headers in, Host kept.
pub(crate) fn prepare_request_headers(
    headers: &mut HeaderMap,
    uri: &Uri,
    peer: &Peer,
    websocket: bool,
    underscores: bool,
) {
    let upgrade = websocket
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten();
    strip_hop_by_hop(headers);
    if !underscores {
        remove_underscored(headers);
    }
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
    let found = present(headers, &FORWARDING);
    // From a trusted proxy the chain goes on and what it set is kept; from anyone
    // else it starts here, so a client cannot pass a forged address, scheme or host
    // to the workers.
    let kept = match peer.trusted {
        true => found,
        false => 0,
    };
    let dropped = match peer.trusted {
        true => HAS_HOP,
        false => HAS_HOP | UNTRUSTED_DROPPED,
    };
    remove_present(headers, &FORWARDING, found & dropped);
    let xff = match kept & HAS_XFF {
        0 => peer.ip.clone(),
        _ => {
            let prior = headers
                .get_all(X_FORWARDED_FOR)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .collect::<Vec<_>>()
                .join(", ");
            let ip = peer.ip.to_str().unwrap_or_default();
            match prior.is_empty() {
                true => peer.ip.clone(),
                false => HeaderValue::from_str(&format!("{prior}, {ip}"))
                    .unwrap_or_else(|_| peer.ip.clone()),
            }
        }
    };
    headers.insert(X_FORWARDED_FOR, xff);
    if kept & HAS_REAL_IP == 0 {
        headers.insert(X_REAL_IP, peer.ip.clone());
    }
    if kept & HAS_PROTO == 0 {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(peer.scheme));
    }
    if kept & HAS_HOST == 0 {
        match headers.get(header::HOST).cloned() {
            Some(host) => {
                headers.insert(X_FORWARDED_HOST, host);
            }
            None => {
                headers.remove(X_FORWARDED_HOST);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http1::fields::HOP_BY_HOP;

    #[test]
    fn ip_text_writes_what_display_writes() {
        let mut addrs: Vec<IpAddr> = [
            "0.0.0.0",
            "255.255.255.255",
            "127.0.0.1",
            "10.0.100.9",
            "1.20.3.199",
            "::1",
            "2001:db8::8:800:200c:417a",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        addrs.extend((0..=255u8).map(|b| IpAddr::from([b, 255 - b, b / 3, b % 7])));
        for ip in addrs {
            assert_eq!(ip_text(ip).to_str().unwrap(), ip.to_string());
        }
    }

    #[test]
    fn direct_forwarding_drops_exactly_the_tables_names() {
        for name in HOP_BY_HOP.iter().chain(FORWARDING.iter()) {
            assert!(dropped_direct(name), "{name}");
        }
        for name in [
            header::HOST,
            header::ACCEPT,
            header::COOKIE,
            HeaderName::from_static("x-forwarded"),
        ] {
            assert!(!dropped_direct(&name), "{name}");
        }
        let count = HOP_BY_HOP.len() + FORWARDING.len();
        assert_eq!(
            count, 16,
            "a name was added to a table: add it to dropped_direct"
        );
    }

    fn peer() -> Peer {
        Peer::new(SocketAddr::from(([10, 1, 2, 3], 4444)), "http", true, None)
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
        prepare_request_headers(&mut h, &Uri::from_static("/"), &untrusted, false, false);
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
        prepare_request_headers(&mut h, &Uri::from_static("/"), &peer(), false, false);
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
        prepare_request_headers(&mut h, &Uri::from_static("/"), &peer(), true, false);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("Keep-Alive, X-Secret"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        prepare_request_headers(&mut h, &Uri::from_static("/"), &peer(), false, false);
        for gone in ["connection", "keep-alive", "x-secret", "te"] {
            assert!(!h.contains_key(gone), "{gone} passed on");
        }
        assert_eq!(h["x-kept"], "1");
    }

    #[test]
    fn a_clients_hop_mark_never_reaches_a_worker() {
        for trusted in [false, true] {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, HeaderValue::from_static("a"));
            h.insert("x-corral-hop", HeaderValue::from_static("forged"));
            let p = Peer { trusted, ..peer() };
            prepare_request_headers(&mut h, &Uri::from_static("/"), &p, false, false);
            assert!(!h.contains_key("x-corral-hop"), "trusted: {trusted}");
        }
    }
}
