//! The request path: for each client request, decide the worker (through the router
//! on the Engine.IO path, the pool elsewhere), rewrite headers, stream the request to
//! the worker and the response back, and turn failures into short, clear answers
//! (400 unknown session, 413, 502, 503, 504).
//!
//! It owns the header rules and the retry rules; connections to workers are
//! `upstream`'s. It must not keep session state
//! (the router does) or mark workers up (the health checks do); it only reports a
//! worker it could not reach. Websocket upgrades are handed to `tunnel`.

use crate::access::{self, AccessLog};
use crate::auth::BasicAuth;
use crate::body::{self, Fault, Guarded, Limited, Prefixed, ProxyBody};
use crate::config::Config;
use crate::engineio::{self, Parse};
use crate::metrics::Metrics;
use crate::pool::{InflightGuard, Pool, Worker};
use crate::router::{NewSession, Route, Router, SessionTicket};
use crate::upstream::{self, Answer, SendError};
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// Most bytes of a handshake response read to find the sid; the rest streams untouched.
const HANDSHAKE_PEEK: usize = 4096;

pub struct Proxy {
    pub(crate) cfg: Arc<Config>,
    auth: Option<Arc<BasicAuth>>,
    pub(crate) metrics: Arc<Metrics>,
    access: Option<AccessLog>,
    pub(crate) pool: Arc<Pool>,
    pub(crate) router: Arc<Router>,
    upstream: upstream::Settings,
    /// Cancelled at shutdown: open websocket tunnels close cleanly.
    pub(crate) closing: tokio_util::sync::CancellationToken,
    /// Every task that outlives its request (websocket tunnels, an unread body read
    /// away after a 413), so that shutdown can wait for them.
    pub(crate) tunnels: tokio_util::task::TaskTracker,
}

/// A client connection's place under `limits.max_connections`, shared by the
/// connection and the websocket tunnel it may become: the place is given back when
/// both have ended.
#[derive(Clone)]
pub struct ConnectionSlot(pub Arc<tokio::sync::OwnedSemaphorePermit>);

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
}

/// A session's ticket is let go when its response ends or is given up alike.
impl body::Guard for Ticket {
    fn ended(self) {}
}

/// Why no worker was chosen.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Refusal {
    UnknownSid,
    NoWorker,
    Full,
}

impl Refusal {
    fn response(self, proxy: &Proxy) -> Response<ProxyBody> {
        match self {
            Refusal::UnknownSid => proxy.unknown_sid(),
            Refusal::NoWorker => short(
                StatusCode::SERVICE_UNAVAILABLE,
                "corral: no worker configured\n",
            ),
            Refusal::Full => short(
                StatusCode::SERVICE_UNAVAILABLE,
                "corral: session table full\n",
            ),
        }
    }
}

#[derive(Debug)]
pub(crate) struct Target {
    pub worker: Arc<Worker>,
    pub ticket: Ticket,
}

impl Proxy {
    pub fn new(
        cfg: Arc<Config>,
        pool: Arc<Pool>,
        router: Arc<Router>,
        auth: Option<Arc<BasicAuth>>,
        metrics: Arc<Metrics>,
        access: Option<AccessLog>,
    ) -> Proxy {
        let upstream = upstream::Settings {
            connect_timeout: cfg.timeouts.connect,
            idle_timeout: cfg.timeouts.upstream_idle,
            drivers: tokio_util::task::TaskTracker::new(),
        };
        Proxy {
            cfg,
            auth,
            metrics,
            access,
            pool,
            router,
            upstream,
            closing: tokio_util::sync::CancellationToken::new(),
            tunnels: tokio_util::task::TaskTracker::new(),
        }
    }

    /// 413, the client's unread body read away by a task of `tunnels` (which owns
    /// what outlives a request).
    fn too_large(&self, unread: Option<ProxyBody>) -> Response<ProxyBody> {
        too_large(self.cfg.limits.max_body, unread, &self.tunnels)
    }

    /// Shutdown, for the worker connections: idle ones are closed and the drivers of
    /// all of them awaited (up to `limit`); returns how many were still running.
    pub async fn close_upstreams(&self, limit: std::time::Duration) -> usize {
        for w in self.pool.workers() {
            w.conns.clear();
        }
        let drivers = &self.upstream.drivers;
        drivers.close();
        let _ = tokio::time::timeout(limit, drivers.wait()).await;
        drivers.len()
    }

    /// Shutdown, for the tunnels: each sends its client a close frame and ends.
    /// Resolves once every tunnel has ended, or after `limit`; returns how many
    /// were still open then.
    pub async fn close_tunnels(&self, limit: std::time::Duration) -> usize {
        self.closing.cancel();
        self.tunnels.close();
        let _ = tokio::time::timeout(limit, self.tunnels.wait()).await;
        self.tunnels.len()
    }

    /// Serves one client request. Never fails: every error becomes a response.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: Peer,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let Some(log) = &self.access else {
            return Ok(self.route(req, peer).await);
        };
        let started = Instant::now();
        let eio = self.is_engineio(req.uri().path());
        if eio && !log.engineio {
            return Ok(self.clone().route(req, peer).await);
        }
        let header = |name: header::HeaderName| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let (referer, agent) = (header(header::REFERER), header(header::USER_AGENT));
        let method = req.method().clone();
        let target = req
            .uri()
            .path_and_query()
            .map_or("/".into(), |p| p.to_string());
        let version = format!("{:?}", req.version());
        let resp = self.clone().route(req, peer).await;
        log.log(&access::Entry {
            peer: peer.addr,
            user: None,
            method: method.as_str(),
            target: &target,
            version: &version,
            status: resp.status().as_u16(),
            bytes: resp.body().size_hint().exact(),
            referer: referer.as_deref(),
            user_agent: agent.as_deref(),
            duration: started.elapsed(),
            worker: None,
        });
        Ok(resp)
    }

    async fn route(self: Arc<Self>, req: Request<Incoming>, peer: Peer) -> Response<ProxyBody> {
        if let Err(e) = crate::strict::check(&req) {
            return short(StatusCode::BAD_REQUEST, &format!("corral: {e}\n"));
        }
        if let Some(port) = peer.redirect_https {
            return redirect_https(&req, port);
        }
        // Every decision below is made on the normalised path.
        let Some(path) = crate::path::normalise(req.uri().path()) else {
            return short(StatusCode::BAD_REQUEST, "corral: bad request path\n");
        };
        if declared_length(req.headers()).is_some_and(|n| n > self.cfg.limits.max_body) {
            // The unread body stays with the answer (see `body::Faults`).
            let unread = req.into_body().map_err(Into::into).boxed_unsync();
            return self.too_large(Some(unread));
        }
        if let Some(auth) = &self.auth {
            if !auth.is_exempt(&path)
                && !auth
                    .allows(
                        req.headers()
                            .get(header::AUTHORIZATION)
                            .map(|v| v.as_bytes()),
                    )
                    .await
            {
                return unauthorized(&auth.realm);
            }
        }
        let is_eio = self.is_engineio(&path);
        let target = match self.choose(&req, peer, is_eio) {
            Ok(t) => t,
            Err(refusal) => return refusal.response(&self),
        };
        if is_websocket_upgrade(&req) {
            if !has_no_body(req.headers()) {
                // Its body would have to be sent before the tunnel, and a worker that
                // answers without upgrading would be left waiting for it on a
                // connection corral reuses: refused, as nothing legitimate sends one.
                return short(
                    StatusCode::BAD_REQUEST,
                    "corral: an upgrade request must not carry a body\n",
                );
            }
            return crate::tunnel::upgrade(self, req, peer, target).await;
        }
        self.forward(req, peer, target, is_eio).await
    }

    fn is_engineio(&self, path: &str) -> bool {
        let prefix = &self.cfg.engineio.path;
        path.starts_with(prefix.as_str()) || path == &prefix[..prefix.len() - 1]
    }

    /// Picks the worker: by session on the Engine.IO path, least busy elsewhere.
    pub(crate) fn choose(
        &self,
        req: &Request<Incoming>,
        peer: Peer,
        is_eio: bool,
    ) -> Result<Target, Refusal> {
        if is_eio && self.cfg.engineio.sticky {
            let eio = engineio::classify(req.uri().query());
            let route = match eio.sid {
                Some(sid) => self.router.existing(&sid),
                None => self.router.handshake(peer.addr.ip()),
            };
            return match route {
                Route::Session(t) => Ok(Target {
                    worker: t.worker.clone(),
                    ticket: Ticket::Session(t),
                }),
                Route::New(n) => Ok(Target {
                    worker: n.worker.clone(),
                    ticket: Ticket::New(n),
                }),
                Route::UnknownSid => Err(Refusal::UnknownSid),
                Route::NoWorker => Err(Refusal::NoWorker),
                Route::Full => Err(Refusal::Full),
            };
        }
        match self.pool.pick_for_request(None) {
            Some(worker) => Ok(Target {
                worker,
                ticket: Ticket::Plain,
            }),
            None => Err(Refusal::NoWorker),
        }
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        peer: Peer,
        target: Target,
        is_eio: bool,
    ) -> Response<ProxyBody> {
        let (parts, incoming) = req.into_parts();
        // Judged by the body's own framing (hyper's view), before the hop-by-hop
        // headers that carry it (Transfer-Encoding) are stripped.
        let bodiless = incoming.is_end_stream();
        let mut headers = parts.headers;
        prepare_request_headers(&mut headers, &parts.uri, peer, false);
        if matches!(target.ticket, Ticket::New(_)) {
            self.metrics.handshakes.fetch_add(1, Ordering::Relaxed);
            // The sid must be readable in the handshake response.
            headers.remove(header::ACCEPT_ENCODING);
        }
        let counted = body::Counted::new(incoming, self.metrics.clone(), false);
        let (limited, faults) = Limited::new(counted, self.cfg.limits.max_body);
        let wait = if is_eio {
            self.cfg.timeouts.engineio_read
        } else {
            self.cfg.timeouts.read
        };
        // Only a request that can be sent again unchanged is sent again: on a fresh
        // connection when a kept-alive one was closed under it, and (for requests
        // outside any session) on another worker when its own refuses connections.
        let uri = origin_form(&parts.uri);
        let replay = (is_idempotent(&parts.method) && bodiless).then(|| Replay {
            method: parts.method.clone(),
            uri: uri.clone(),
            headers: headers.clone(),
        });
        let Target { mut worker, ticket } = target;
        let elsewhere = matches!(ticket, Ticket::Plain) && self.pool.len() > 1;
        let body = if is_eio && parts.method == Method::POST && !bodiless {
            // Engine.IO POST bodies are small (the server's maxPayload, 1 MB by
            // default) and some workers read them with one read of Content-Length
            // bytes (python-engineio on aiohttp): sent whole, head and body together,
            // as nginx does.
            match self.read_whole(limited, &faults).await {
                Ok(bytes) => {
                    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
                    body::full(bytes)
                }
                Err(resp) => return resp,
            }
        } else {
            limited.boxed_unsync()
        };
        let mut upstream_req = upstream_request(parts.method, uri, headers, body);
        let mut retried = false;
        loop {
            let addr = worker.addr;
            let id = worker.id;
            let inflight = worker.start_request();
            let sent = Instant::now();
            let result =
                tokio::time::timeout(wait, self.exchange(&worker, upstream_req, replay.as_ref()))
                    .await;
            match faults.get() {
                Some(Fault::TooLarge) => return self.too_large(faults.take_kept()),
                Some(Fault::Malformed) => return malformed_body(),
                None => {}
            }
            let err = match result {
                Ok(Ok(answer)) => {
                    self.metrics.observe_latency(sent.elapsed());
                    worker.count_response(answer.response.status().as_u16());
                    worker.answered();
                    return self.respond(answer, ticket, inflight).await;
                }
                Ok(Err(e)) => e,
                Err(_) => {
                    tracing::warn!(worker = id, %addr, "worker timed out");
                    return short(
                        StatusCode::GATEWAY_TIMEOUT,
                        &format!("corral: worker {addr} did not answer in {wait:?}\n"),
                    );
                }
            };
            drop(inflight);
            if !matches!(err, SendError::Connect(_)) {
                tracing::warn!(worker = id, %addr, error = %err, "worker failed");
                return short(
                    StatusCode::BAD_GATEWAY,
                    &format!("corral: worker {addr} failed: {err}\n"),
                );
            }
            tracing::warn!(worker = id, %addr, error = %err, "cannot connect to worker");
            self.pool.check_failed(&worker);
            // Only requests outside any session go elsewhere (`elsewhere`).
            let next = match (elsewhere && !retried, &replay) {
                (true, Some(r)) => self.pool.pick_for_request(Some(id)).map(|w| (w, r)),
                _ => None,
            };
            let Some((w, r)) = next else {
                return self.unreachable(&ticket, addr);
            };
            retried = true;
            upstream_req = r.request();
            worker = w;
        }
    }

    /// Reads a client's request body whole (it is already bounded by `limits.max_body`),
    /// within `timeouts.read`.
    async fn read_whole<B>(
        &self,
        body: B,
        faults: &body::Faults,
    ) -> Result<Bytes, Response<ProxyBody>>
    where
        B: http_body::Body<Data = Bytes>,
    {
        match tokio::time::timeout(self.cfg.timeouts.read, body.collect()).await {
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
            Ok(Err(_)) => Err(match faults.get() {
                Some(Fault::TooLarge) => self.too_large(faults.take_kept()),
                _ => malformed_body(),
            }),
            Err(_) => Err(short(
                StatusCode::REQUEST_TIMEOUT,
                "corral: request body not received in time\n",
            )),
        }
    }

    /// "Session ID unknown", counted: the thrash counter of the metrics.
    pub(crate) fn unknown_sid(&self) -> Response<ProxyBody> {
        self.metrics.unknown_sid.fetch_add(1, Ordering::Relaxed);
        unknown_sid()
    }

    /// The answer when a worker refuses connections: a session died with it, so its
    /// client is told the session is unknown and starts anew; anything else gets 502.
    pub(crate) fn unreachable(&self, ticket: &Ticket, addr: SocketAddr) -> Response<ProxyBody> {
        match ticket {
            Ticket::Session(_) => self.unknown_sid(),
            _ => short(
                StatusCode::BAD_GATEWAY,
                &format!("corral: cannot connect to worker {addr}\n"),
            ),
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

    /// Passes a worker's response on; for a handshake, reads the sid first.
    async fn respond(
        &self,
        answer: Answer,
        ticket: Ticket,
        inflight: InflightGuard,
    ) -> Response<ProxyBody> {
        let (mut parts, mut body) = answer.response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let mut ticket = ticket;
        if let (Ticket::Session(t), true) = (&mut ticket, parts.status.is_success()) {
            t.answered();
        }
        let (prefix, ticket) = match ticket {
            Ticket::New(new) if parts.status == StatusCode::OK => {
                match self.learn_sid(new, &mut body).await {
                    Ok(prefix) => (prefix, Ticket::Plain),
                    Err(resp) => return resp,
                }
            }
            other => (Bytes::new(), other),
        };
        // One body, boxed once: what was read for the sid, then the rest, counted,
        // holding the worker connection and the session and in-flight counts until
        // it ends (read to the end, the connection goes back for the next request).
        let body = body::Counted::new(Prefixed::new(prefix, body), self.metrics.clone(), true);
        let body = Guarded::new(body, (answer.lease, (ticket, inflight)));
        Response::from_parts(parts, body.map_err(Into::into).boxed_unsync())
    }

    /// Reads just enough of a handshake response to learn the sid; returns what it read.
    async fn learn_sid<B>(
        &self,
        new: NewSession,
        incoming: &mut B,
    ) -> Result<Bytes, Response<ProxyBody>>
    where
        B: http_body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let mut seen = BytesMut::new();
        let wait = self.cfg.timeouts.engineio_read;
        loop {
            match engineio::parse_handshake(&seen) {
                Parse::Found(hs) => {
                    tracing::debug!(sid = %hs.sid, worker = new.worker.id, "session learned");
                    new.learn(&hs);
                    break;
                }
                Parse::NotHandshake => break,
                Parse::NeedMore if seen.len() >= HANDSHAKE_PEEK => break,
                Parse::NeedMore => {}
            }
            let frame = match tokio::time::timeout(wait, incoming.frame()).await {
                Ok(Some(Ok(frame))) => frame,
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    return Err(short(
                        StatusCode::BAD_GATEWAY,
                        &format!("corral: worker failed during handshake: {e}\n"),
                    ))
                }
                Err(_) => {
                    return Err(short(
                        StatusCode::GATEWAY_TIMEOUT,
                        "corral: worker stalled during handshake\n",
                    ))
                }
            };
            if let Ok(data) = frame.into_data() {
                seen.extend_from_slice(&data);
            }
        }
        Ok(seen.freeze())
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
fn upstream_request(
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
fn origin_form(uri: &Uri) -> Uri {
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

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

fn has_no_body(h: &HeaderMap) -> bool {
    !h.contains_key(header::TRANSFER_ENCODING) && declared_length(h).is_none_or(|n| n == 0)
}

fn declared_length(h: &HeaderMap) -> Option<u64> {
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
    if !keep(headers, "x-real-ip") {
        if let Ok(v) = HeaderValue::from_str(&peer.addr.ip().to_string()) {
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

fn unauthorized(realm: &str) -> Response<ProxyBody> {
    let mut resp = short(StatusCode::UNAUTHORIZED, "401 Unauthorized\n");
    if let Ok(v) = HeaderValue::from_str(&format!("Basic realm=\"{realm}\", charset=\"UTF-8\"")) {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    resp
}

/// 301 to the same host and path on https.
fn redirect_https<B>(req: &Request<B>, port: u16) -> Response<ProxyBody> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host())
        .unwrap_or("localhost");
    // Drop any port from Host (a bracketed IPv6 literal keeps its brackets).
    let name = match host.rfind(':') {
        Some(i) if !host[i..].contains(']') => &host[..i],
        _ => host,
    };
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = if port == 443 {
        format!("https://{name}{pq}")
    } else {
        format!("https://{name}:{port}{pq}")
    };
    let mut resp = short(StatusCode::MOVED_PERMANENTLY, "corral: use https\n");
    match HeaderValue::from_str(&location) {
        Ok(v) => {
            resp.headers_mut().insert(header::LOCATION, v);
            resp
        }
        Err(_) => short(StatusCode::BAD_REQUEST, "corral: bad Host header\n"),
    }
}

/// A short plain-text answer of corral's own.
pub(crate) fn short(status: StatusCode, text: &str) -> Response<ProxyBody> {
    let mut resp = Response::new(body::full(text.to_owned()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// What an Engine.IO server answers for a session it does not know, so that the
/// client reconnects at once instead of retrying a dead sid.
pub(crate) fn unknown_sid() -> Response<ProxyBody> {
    let mut resp = Response::new(body::full(engineio::UNKNOWN_SID_BODY));
    *resp.status_mut() = StatusCode::BAD_REQUEST;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// The client's body broke its own framing; what reached the worker was aborted.
fn malformed_body() -> Response<ProxyBody> {
    let mut resp = short(StatusCode::BAD_REQUEST, "corral: malformed request body\n");
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// 413; `unread` is the client's body, held until the answer has gone out (an
/// HTTP/2 stream reset before that would lose the answer).
fn too_large(
    limit: u64,
    unread: Option<ProxyBody>,
    owner: &tokio_util::task::TaskTracker,
) -> Response<ProxyBody> {
    let text = format!("corral: request body larger than {limit} bytes\n");
    let unread = body::Unread::new(unread, owner);
    let body = body::Holding::new(body::full(text), unread).boxed_unsync();
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    // The rest of the body is not read, so the connection cannot be reused.
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
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
    fn redirect_keeps_host_and_path() {
        let req = Request::builder()
            .uri("/a?b=1")
            .header(header::HOST, "example.org:8080")
            .body(())
            .expect("request");
        let resp = redirect_https(&req, 8443);
        assert_eq!(resp.status(), StatusCode::MOVED_PERMANENTLY);
        assert_eq!(
            resp.headers()[header::LOCATION],
            "https://example.org:8443/a?b=1"
        );
        let req = Request::builder()
            .uri("/")
            .header(header::HOST, "[::1]:80")
            .body(())
            .expect("request");
        assert_eq!(
            redirect_https(&req, 443).headers()[header::LOCATION],
            "https://[::1]/"
        );
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
