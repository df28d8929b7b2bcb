//! The request path, for each request the edge's gate let in: decide the worker
//! (through the router on the Engine.IO path, the pool elsewhere; by its tag for a
//! tagged sid, or another node), rewrite headers, stream the request to the worker
//! and the response back, and turn failures into short, clear answers (400 unknown
//! session, 413, 502, 503, 504).
//!
//! It owns the header rules and the retry rules; connections to workers are
//! `transport::upstream`'s. It must not keep session state (the router does), mark
//! workers up (the health checks do) or judge request heads (the gate did); it only
//! reports a worker it could not reach. Websocket upgrades are handed to `tunnel`.

use crate::config::Config;
use crate::config::DEFAULT_CLOSE_SPREAD;
use crate::counters::Counters;
use crate::engineio::protocol::{self as engineio, Parse};
use crate::engineio::router::{NewSession, Route, Router};
use crate::engineio::sidtag::{self, Sid};
use crate::http1::fields::has_underscore;
use crate::http1::{content_length, origin_form, strip_hop_by_hop};
use crate::proxy::answer::{self, short};
use crate::proxy::forward::{
    direct_forwarding, dropped_direct, is_idempotent, prepare_request_headers, Forwarder, Peer,
    Target, Ticket,
};
use crate::proxy::tunnel::{self, Tunnels};
use crate::runtime::life::Life;
use crate::transport::body::{self, Fault, Guarded, Limited, Prefixed, ProxyBody, RequestBody};
use crate::transport::http1::{self, Sending};
use crate::transport::moving::{Pending, PendingAnswer};
use crate::transport::upstream::{self, SendError};
use crate::workers::pool::{InflightGuard, Pool, Worker};
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::BodyExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most bytes of a handshake response read to find the sid; the rest streams untouched.
const HANDSHAKE_PEEK: usize = 4096;

/// The request path under one config: its settings (the config, how workers are
/// reached, how tunnels are timed, the tags), around the parts that live as long
/// as corral ([`Shared`]). A reload makes a new one around the same `Shared`;
/// connections keep the one they were accepted with.
pub struct Proxy {
    pub(crate) cfg: Arc<Config>,
    shared: Arc<Shared>,
    forward: Forwarder,
    /// How new tunnels are timed.
    timing: tunnel::Timing,
    /// Tagged sids (`engineio.tag_sids`): the signer and this node's reference.
    pub(crate) tags: Option<Arc<Tags>>,
}

/// What the request path keeps for corral's whole life, built once: the workers,
/// the sessions, the counters, the tunnels, and the lifetimes its tasks belong to.
pub struct Shared {
    pub(crate) metrics: Arc<Counters>,
    pub(crate) pool: Arc<Pool>,
    pub(crate) router: Arc<Router>,
    /// The websocket tunnels: they own their tasks and close cleanly at shutdown.
    tunnels: Tunnels,
    /// Owns the unread request bodies read away after a 413 (each for a second at
    /// most): the client connections' lifetime.
    lingering: Life,
    /// An upgrade's signal to carry the long-polls in flight on cleartext HTTP/1.1
    /// connections (their worker connections, with the client's).
    carry_polls: tokio_util::sync::CancellationToken,
    /// Long-polls the upgrade answered at once instead (TLS, HTTP/2).
    polls_answered: std::sync::atomic::AtomicU64,
}

impl Shared {
    /// The parts; tunnels and 413 lingerers are tasks of `serving` (the client
    /// connections' lifetime).
    pub fn new(
        (pool, router, metrics): (Arc<Pool>, Arc<Router>, Arc<Counters>),
        serving: &Life,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            metrics,
            pool,
            router,
            tunnels: Tunnels::new(serving.clone()),
            lingering: serving.clone(),
            carry_polls: Default::default(),
            polls_answered: Default::default(),
        })
    }
}

impl std::ops::Deref for Proxy {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.shared
    }
}

/// What tagging sids needs.
pub struct Tags {
    pub tagger: sidtag::Tagger,
    /// This node's name and reference.
    pub name: String,
    pub node: sidtag::Ref,
    /// The other nodes.
    pub peers: Vec<NodePeer>,
}

/// Another corral node.
pub struct NodePeer {
    pub name: String,
    pub node: sidtag::Ref,
    /// `host:port` as configured; the host may be a DNS name.
    pub host: String,
    /// Where requests for it go, as to a worker (its connections, timeouts and
    /// rules); None until the host is resolved. Replaced when the name resolves to
    /// another address (a restarted pod).
    pub target: std::sync::Mutex<Option<Arc<crate::workers::pool::Worker>>>,
}

impl Tags {
    /// Tags signed by `tagger` for the node and the other nodes `cluster` names.
    pub fn new(tagger: sidtag::Tagger, cluster: &crate::config::Cluster) -> Tags {
        let peers = cluster
            .nodes
            .iter()
            .map(|(name, host)| NodePeer {
                name: name.clone(),
                node: sidtag::node_ref(name),
                host: host.clone(),
                target: std::sync::Mutex::new(None),
            })
            .collect();
        Tags {
            tagger,
            name: cluster.node.clone(),
            node: sidtag::node_ref(&cluster.node),
            peers,
        }
    }

    /// Keeps where `old`'s nodes were found for the nodes still named the same
    /// way (their connections too), so a reload does not wait for a lookup.
    pub fn found_as(self, old: &Tags) -> Tags {
        for p in &self.peers {
            let same = old
                .peers
                .iter()
                .find(|o| o.name == p.name && o.host == p.host);
            if let Some(target) = same.and_then(NodePeer::target) {
                *p.target.lock().unwrap_or_else(|e| e.into_inner()) = Some(target);
            }
        }
        self
    }
}

impl NodePeer {
    fn target(&self) -> Option<Arc<crate::workers::pool::Worker>> {
        self.target
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Closes worker and node connections that stayed idle past `timeouts.upstream_idle`,
/// on time rather than when the next request comes (which may never come).
/// `current` gives the proxy in force (a reload may change the timeout).
pub async fn expire_idle(current: impl Fn() -> Arc<Proxy>) {
    loop {
        let proxy = current();
        let idle = proxy.cfg.timeouts.upstream_idle;
        let every = (idle / 2).clamp(Duration::from_millis(100), Duration::from_secs(1));
        tokio::time::sleep(every).await;
        for w in proxy.pool.workers() {
            w.conns.expire(idle);
        }
        let peers = proxy.tags.iter().flat_map(|t| t.peers.iter());
        for target in peers.filter_map(NodePeer::target) {
            target.conns.expire(idle);
        }
    }
}

/// `exchange`'s result, or None once `worker` starts leaving (a long-poll that
/// would wait for a worker about to be stopped).
async fn until_leaving<F: std::future::Future>(exchange: F, worker: &Worker) -> Option<F::Output> {
    tokio::select! {
        r = exchange => Some(r),
        _ = worker.leaving.cancelled() => None,
    }
}

/// Looks the other nodes' names up, at start and every few seconds after (their
/// addresses may change), and points each at what its name resolves to now; a node
/// not found yet (or added by a reload) is looked up every second. `current` gives
/// the proxy in force (a reload may change the nodes).
pub async fn resolve_nodes(current: impl Fn() -> Arc<Proxy>) {
    const EVERY: u32 = 5;
    let mut round = 0u32;
    loop {
        round = round.wrapping_add(1);
        let proxy = current();
        let peers = proxy.tags.iter().flat_map(|t| t.peers.iter());
        let due = peers.filter(|p| round % EVERY == 1 || p.target().is_none());
        for p in due {
            let found = tokio::net::lookup_host(p.host.as_str())
                .await
                .ok()
                .and_then(|mut addrs| addrs.next());
            let mut target = p.target.lock().unwrap_or_else(|e| e.into_inner());
            match (found, target.as_ref()) {
                (Some(addr), Some(t)) if t.addr == addr => {}
                (Some(addr), _) => {
                    tracing::info!(node = %p.name, %addr, "cluster node resolved");
                    *target = Some(proxy.pool.detached(addr));
                }
                (None, _) => {
                    tracing::warn!(node = %p.name, host = %p.host, "cluster node does not resolve")
                }
            }
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// Where a request's tag sends it.
enum Tagged {
    /// A worker of this node; its own sid.
    Here(String, Arc<crate::workers::pool::Worker>),
    /// Another node, which routes it (sent once, marked as a hop).
    There(Arc<crate::workers::pool::Worker>),
}

/// Where the router sends an Engine.IO request, as a target or a refusal.
fn to_target(route: Route) -> Result<Target, Refusal> {
    match route {
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
    }
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
                &format!("corral: {}\n", proxy.pool.why_none_ready()),
            ),
            Refusal::Full => short(
                StatusCode::SERVICE_UNAVAILABLE,
                "corral: session table full\n",
            ),
        }
    }
}

impl Proxy {
    /// The request path under `cfg`, around `shared`.
    pub fn new(cfg: Arc<Config>, shared: Arc<Shared>) -> Proxy {
        let upstream = upstream::Settings {
            connect_timeout: cfg.timeouts.connect,
            idle_timeout: cfg.timeouts.upstream_idle,
        };
        let spread = cfg
            .workers
            .as_ref()
            .map_or(DEFAULT_CLOSE_SPREAD, |w| w.close_spread);
        let timing = tunnel::Timing {
            read_timeout: cfg.timeouts.read,
            idle: cfg.timeouts.websocket_idle,
            spread,
        };
        let underscores = cfg.underscores_in_headers;
        Proxy {
            cfg,
            shared,
            forward: Forwarder {
                upstream,
                hop: None,
                underscores,
            },
            timing,
            tags: None,
        }
    }

    fn via(&self) -> tunnel::Via<'_> {
        tunnel::Via {
            forward: &self.forward,
            pool: &self.pool,
            metrics: &self.metrics,
            timing: self.timing,
        }
    }

    /// The proxy for a reloaded config: the new config's settings around the same
    /// shared parts, and the same tags, peers and hop mark until `enable_tags`
    /// says otherwise.
    pub fn renewed(&self, cfg: Arc<Config>) -> Proxy {
        let mut next = Proxy::new(cfg, self.shared.clone());
        next.forward.hop = self.forward.hop.clone();
        next.tags = self.tags.clone();
        next
    }

    /// Turns tagged sids on (and, with other nodes, hops to them); on a renewed
    /// proxy, replaces its tags (a reload's new key or nodes).
    pub fn enable_tags(&mut self, tags: Tags) {
        self.forward.hop = match tags.peers.is_empty() {
            true => None,
            false => HeaderValue::from_str(&tags.tagger.hop_proof(&tags.name)).ok(),
        };
        self.tags = Some(Arc::new(tags));
    }

    /// The tags in force.
    pub fn tags(&self) -> Option<&Arc<Tags>> {
        self.tags.as_ref()
    }

    /// A request another node sent here (a hop mark naming a configured node, made
    /// with the shared key): it is never sent on to a third node, and its forwarded
    /// headers are kept, as from a trusted proxy. The key is the proof, not the
    /// source address: a node's connections may leave from any of its addresses.
    fn is_hop(&self, req: &Request<RequestBody>) -> bool {
        let Some(tags) = &self.tags else {
            return false;
        };
        let Some(value) = req.headers().get(sidtag::HOP_HEADER) else {
            return false;
        };
        let Some(from) = value.to_str().ok().and_then(|v| tags.tagger.check_hop(v)) else {
            return false;
        };
        tags.peers.iter().any(|p| p.name == from)
    }

    /// 413, the client's unread body read away by a task of `lingering` (the
    /// gate's refusals by declared size too: one owner for all of them).
    pub(crate) fn too_large(&self, unread: Option<ProxyBody>) -> Response<ProxyBody> {
        answer::too_large(self.cfg.limits.max_body, unread, &self.lingering)
    }

    /// Relays websocket tunnels on the serving threads (see [`Tunnels::relay_on`]).
    pub fn relay_tunnels_on(&self, lanes: Vec<tokio::runtime::Handle>) {
        self.tunnels.relay_on(lanes);
    }

    /// For an upgrade: the cleartext tunnels stopped and taken out, the TLS ones
    /// closed with 1012 (see [`Tunnels::carry`]).
    pub async fn carry_tunnels(&self) -> (Vec<tunnel::Carried>, u64) {
        self.tunnels.carry().await
    }

    /// For an upgrade: the long-polls in flight on cleartext HTTP/1.1 connections
    /// stop waiting and go, with their worker connections, to their client
    /// connections' sessions to be carried.
    pub fn carry_polls(&self) {
        self.carry_polls.cancel();
    }

    /// Long-polls an upgrade could not carry (their clients' connections are TLS or
    /// HTTP/2), answered 503 at once so that their clients poll the new image.
    pub fn polls_answered(&self) -> u64 {
        self.polls_answered.load(Ordering::Relaxed)
    }

    /// The answer to a long-poll an upgrade carried over: read from its worker
    /// connection and passed on as `pass_on` would have (502 when its worker is
    /// gone or the answer broken).
    pub async fn resume_answer(&self, pending: PendingAnswer) -> Response<ProxyBody> {
        let workers = self.pool.workers();
        let Some(worker) = workers.iter().find(|w| w.id == pending.worker).cloned() else {
            return short(StatusCode::BAD_GATEWAY, "corral: worker gone\n");
        };
        let ticket = match pending.sid.as_deref().map(|sid| self.router.existing(sid)) {
            Some(Route::Session(t)) => Ticket::Session(t),
            _ => Ticket::Plain,
        };
        let inflight = worker.start_poll();
        let home = worker.clone();
        let answer = upstream::resume(home, &self.forward.upstream, pending.conn, false);
        match tokio::time::timeout(self.cfg.timeouts.engineio_read, answer).await {
            Ok(Ok(reply)) => {
                worker.traffic.count_response(reply.status().as_u16());
                self.respond(reply, ticket, inflight).await
            }
            Ok(Err(e)) => short(
                StatusCode::BAD_GATEWAY,
                &format!("corral: worker {} failed: {e}\n", worker.addr),
            ),
            Err(_) => short(
                StatusCode::GATEWAY_TIMEOUT,
                &format!("corral: worker {} did not answer\n", worker.addr),
            ),
        }
    }

    /// Takes on the tunnels an upgrade carried, timed by this config; `hold` gives
    /// each its client connection slot. Returns how many go on.
    pub fn resume_tunnels(
        &self,
        carried: Vec<tunnel::Carried>,
        hold: impl Fn() -> Box<dyn Send + Sync>,
    ) -> usize {
        let via = tunnel::Via {
            forward: &self.forward,
            pool: &self.pool,
            metrics: &self.metrics,
            timing: self.timing,
        };
        self.tunnels.resume(carried, via, &self.router, hold)
    }

    /// Routes one request the edge has let in (`is_eio`: its normalised path is on
    /// the Engine.IO path): chooses the worker and forwards it, or tunnels it when it
    /// is a websocket upgrade (`upgrade`). Never fails: every error becomes a response.
    pub async fn route(
        self: Arc<Self>,
        mut req: Request<RequestBody>,
        peer: Peer,
        is_eio: bool,
        upgrade: bool,
    ) -> Response<ProxyBody> {
        let hopped = self.is_hop(&req);
        let peer = match hopped {
            true => {
                self.metrics.hops_in.fetch_add(1, Ordering::Relaxed);
                Peer {
                    trusted: true,
                    ..peer
                }
            }
            false => peer,
        };
        // The sid, read once: for its tag, then for the session table.
        let sticky = is_eio && self.cfg.engineio.sticky;
        let sid = sticky
            .then(|| engineio::classify(req.uri().query()).sid)
            .flatten();
        let tagged = match self.read_tag(&mut req, sid.as_deref(), hopped) {
            Ok(t) => t,
            Err(refusal) => return refusal.response(&self),
        };
        let chosen = match tagged {
            Some(Tagged::Here(raw, worker)) => to_target(self.router.tagged(&raw, worker)),
            Some(Tagged::There(node)) => {
                self.metrics.hops_out.fetch_add(1, Ordering::Relaxed);
                Ok(Target {
                    worker: node,
                    ticket: Ticket::Hop,
                })
            }
            None if sticky => to_target(match sid {
                Some(sid) => self.router.existing(&sid),
                None => self.router.handshake(peer.addr.ip()),
            }),
            None => self.pick_plain(),
        };
        let target = match chosen {
            Ok(t) => t,
            Err(refusal) => return refusal.response(&self),
        };
        if upgrade {
            return self.tunnels.upgrade(self.via(), req, peer, target).await;
        }
        self.pass_on(req, peer, target, is_eio).await
    }

    /// Whether `path` is on the Engine.IO path.
    pub fn is_engineio(&self, path: &str) -> bool {
        let prefix = &self.cfg.engineio.path;
        path.starts_with(prefix.as_str()) || path == &prefix[..prefix.len() - 1]
    }

    /// A tagged sid (`sidtag`): checks its tag, finds the worker it names and gives
    /// the request the worker's own sid. None for a request without a tag (or with
    /// tags off); a tag that does not check out, or names a worker this node does
    /// not have, gets "Session ID unknown", as the worker would answer.
    fn read_tag(
        &self,
        req: &mut Request<RequestBody>,
        sid: Option<&str>,
        hopped: bool,
    ) -> Result<Option<Tagged>, Refusal> {
        let (Some(tags), Some(sid)) = (self.tags.as_ref(), sid) else {
            return Ok(None);
        };
        let (raw, route) = match tags.tagger.read(sid) {
            Sid::Plain(_) => return Ok(None),
            Sid::Bad => return Err(Refusal::UnknownSid),
            Sid::Tagged { raw, route } => (raw.to_owned(), route),
        };
        if route.node != tags.node {
            // Another node's session: sent there once, never on from a hop.
            return match tags.peers.iter().find(|p| p.node == route.node) {
                Some(p) if !hopped => p
                    .target()
                    .map(|t| Some(Tagged::There(t)))
                    .ok_or(Refusal::UnknownSid),
                _ => Err(Refusal::UnknownSid),
            };
        }
        let worker = self.pool.by_tag(route.worker).ok_or(Refusal::UnknownSid)?;
        let query = req.uri().query().unwrap_or("");
        let stripped = sidtag::strip_query(query, &raw).ok_or(Refusal::UnknownSid)?;
        let pq = format!("{}?{stripped}", req.uri().path());
        let mut parts = req.uri().clone().into_parts();
        parts.path_and_query = pq.parse().ok();
        *req.uri_mut() = http::Uri::from_parts(parts).map_err(|_| Refusal::UnknownSid)?;
        Ok(Some(Tagged::Here(raw, worker)))
    }

    /// A request outside any session: the least busy worker.
    fn pick_plain(&self) -> Result<Target, Refusal> {
        match self.pool.pick_for_request(None) {
            Some(worker) => Ok(Target {
                worker,
                ticket: Ticket::Plain,
            }),
            None => Err(Refusal::NoWorker),
        }
    }

    /// Sends a (non-upgrade) request to its worker and the answer back: its
    /// headers as the worker gets them, its body in hand where it must be, the
    /// request encoded for one of the two clients, then sent (`attempt`), again
    /// where that is safe (`elsewhere`), and the answer passed on (`respond`).
    async fn pass_on(
        &self,
        req: Request<RequestBody>,
        peer: Peer,
        target: Target,
        is_eio: bool,
    ) -> Response<ProxyBody> {
        let (parts, incoming) = req.into_parts();
        // Judged by the body's own framing, before the hop-by-hop headers that
        // carry it (Transfer-Encoding) are stripped.
        let bodiless = incoming.is_end_stream();
        let declared = incoming.size_hint().exact();
        let eio_post = is_eio && parts.method == Method::POST;
        let mut headers = parts.headers;
        let direct = self.forwarding_headers(&mut headers, &parts.uri, &peer, &target);
        let counted = body::Counted::new(incoming, self.metrics.clone(), false);
        let (limited, faults) = Limited::new(counted, self.cfg.limits.max_body);
        let (sending, mut streamed) = if eio_post && !bodiless {
            // Engine.IO POST bodies are small (the server's maxPayload, 1 MB by
            // default) and some workers read them with one read of Content-Length
            // bytes (python-engineio on aiohttp): sent whole, head and body together,
            // as nginx does.
            match self.read_whole(limited, &faults).await {
                Ok(bytes) => (Sending::InHand(bytes), None),
                Err(resp) => return resp,
            }
        } else if bodiless {
            (Sending::InHand(Bytes::new()), None)
        } else {
            (Sending::Streamed(declared), Some(limited.boxed_unsync()))
        };
        // Only a request that can be sent again unchanged is sent again: on a fresh
        // connection when a kept-alive one was closed under it, and (for requests
        // outside any session) on another worker when its own refuses connections.
        let replayable = is_idempotent(&parts.method) && bodiless;
        // A session's GET is a long-poll: it waits for the worker to have something
        // to say, so when the worker is about to be stopped corral answers it.
        let poll = matches!(target.ticket, Ticket::Session(_)) && parts.method == Method::GET;
        let uri = origin_form(&parts.uri);
        let mut outgoing = self.encode(&parts.method, &uri, &headers, &sending, direct.as_ref());
        if poll {
            outgoing = outgoing.carried_by(self.carry_polls.clone());
        }
        let wait = if is_eio {
            self.cfg.timeouts.engineio_read
        } else {
            self.cfg.timeouts.read
        };
        // The retry loop stays in this future: as a function of its own, its
        // future (a kilobyte and more) was copied into this one for every request.
        let Target { mut worker, ticket } = target;
        let mut elsewhere = matches!(ticket, Ticket::Plain) && self.pool.len() > 1 && replayable;
        loop {
            let inflight = match poll {
                true => worker.start_poll(),
                false => worker.start_request(),
            };
            let sent = Instant::now();
            let exchange = tokio::time::timeout(
                wait,
                self.forward
                    .exchange(&worker, &outgoing, streamed.take(), replayable),
            );
            let result = match poll {
                // Boxed: raced inline, the two futures made every request's future
                // (copied as it is polled and moved) larger, long-poll or not.
                true => match Box::pin(until_leaving(exchange, &worker)).await {
                    Some(r) => r,
                    None => return self.unknown_sid(),
                },
                false => exchange.await,
            };
            match faults.get() {
                Some(Fault::TooLarge) => return self.too_large(faults.take_kept()),
                Some(Fault::Malformed) => return malformed_body(),
                Some(Fault::TimedOut) => return body_timed_out(),
                None => {}
            }
            let err = match result {
                Ok(Ok(reply)) => {
                    self.metrics.observe_latency(sent.elapsed());
                    worker.traffic.count_response(reply.status().as_u16());
                    worker.answered();
                    return self.respond(reply, ticket, inflight).await;
                }
                Ok(Err(SendError::Carried(conn))) => {
                    return self.carried(*conn, (&peer, parts.version), &worker, &ticket);
                }
                Ok(Err(e)) => Some(e),
                Err(_) => None,
            };
            drop(inflight);
            worker = match self.elsewhere(err, &worker, &ticket, elsewhere, wait) {
                Ok(next) => next,
                Err(resp) => return resp,
            };
            // Once only.
            elsewhere = false;
        }
    }

    /// The forwarding headers of a request going to its worker: for the common
    /// request, the four it adds, written straight into the bytes sent later
    /// (`direct_forwarding`); for any other (and a hop to another node), None, its
    /// header map rewritten here. A handshake's Accept-Encoding goes either way:
    /// its sid must be readable in the response.
    fn forwarding_headers(
        &self,
        headers: &mut http::HeaderMap,
        uri: &http::Uri,
        peer: &Peer,
        target: &Target,
    ) -> Option<[(header::HeaderName, HeaderValue); 4]> {
        let direct = (!matches!(target.ticket, Ticket::Hop))
            .then(|| direct_forwarding(headers, uri, peer))
            .flatten();
        if direct.is_none() {
            let underscores = self.forward.underscores;
            prepare_request_headers(headers, uri, peer, false, underscores);
            self.forward.mark_hop(headers, &target.ticket);
        }
        if matches!(target.ticket, Ticket::New(_)) {
            self.metrics.handshakes.fetch_add(1, Ordering::Relaxed);
            headers.remove(header::ACCEPT_ENCODING);
        }
        direct
    }

    /// The request as its worker gets it, encoded once: any try sends the same
    /// bytes.
    fn encode(
        &self,
        method: &Method,
        uri: &http::Uri,
        headers: &http::HeaderMap,
        sending: &Sending,
        direct: Option<&[(header::HeaderName, HeaderValue); 4]>,
    ) -> http1::Request {
        match direct {
            Some(added) => {
                let underscores = self.forward.underscores;
                let dropped = |n: &_| dropped_direct(n) || (!underscores && has_underscore(n));
                http1::encode(method, uri, headers, dropped, added, sending)
            }
            None => http1::encode(method, uri, headers, |_| false, &[], sending),
        }
    }

    /// After a try that failed (`err`; None: no answer within `wait`), the worker
    /// to try next: only a request outside any session that may go `elsewhere`,
    /// whose worker refused the connection, goes to another; any other failure is
    /// the answer (502, 503 or 504).
    // The answer is the large variant, on the failure path only: boxing it would
    // cost an allocation there for nothing.
    #[allow(clippy::result_large_err)]
    fn elsewhere(
        &self,
        err: Option<SendError>,
        worker: &Arc<Worker>,
        ticket: &Ticket,
        elsewhere: bool,
        wait: std::time::Duration,
    ) -> Result<Arc<Worker>, Response<ProxyBody>> {
        let (id, addr) = (worker.id, worker.addr);
        let Some(err) = err else {
            tracing::warn!(worker = id, %addr, "worker timed out");
            return Err(short(
                StatusCode::GATEWAY_TIMEOUT,
                &format!("corral: worker {addr} did not answer in {wait:?}\n"),
            ));
        };
        if !matches!(err, SendError::Connect(_)) {
            tracing::warn!(worker = id, %addr, error = %err, "worker failed");
            return Err(short(
                StatusCode::BAD_GATEWAY,
                &format!("corral: worker {addr} failed: {err}\n"),
            ));
        }
        tracing::warn!(worker = id, %addr, error = %err, "cannot connect to worker");
        self.pool.check_failed(worker);
        elsewhere
            .then(|| self.pool.pick_for_request(Some(id)))
            .flatten()
            .ok_or_else(|| answer::unreachable(&self.metrics, ticket, addr))
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
                Some(Fault::TimedOut) => body_timed_out(),
                _ => malformed_body(),
            }),
            Err(_) => Err(body_timed_out()),
        }
    }

    /// "Session ID unknown", counted.
    pub(crate) fn unknown_sid(&self) -> Response<ProxyBody> {
        answer::unknown_sid_counted(&self.metrics)
    }

    /// Passes a worker's response on; for a handshake, reads the sid first. The body
    /// holds the worker's connection until it ends.
    async fn respond<B>(
        &self,
        response: Response<B>,
        ticket: Ticket,
        inflight: InflightGuard,
    ) -> Response<ProxyBody>
    where
        B: http_body::Body<Data = Bytes> + Unpin + Send + 'static,
        B::Error: Into<body::BoxError> + std::fmt::Display,
    {
        let (mut parts, mut body) = response.into_parts();
        // A Content-Length beside Transfer-Encoding is not passed on (RFC 9112 6.3):
        // the body was read by its chunks, and the client must frame it the same way.
        if parts.headers.contains_key(header::TRANSFER_ENCODING) {
            parts.headers.remove(header::CONTENT_LENGTH);
        }
        strip_hop_by_hop(&mut parts.headers);
        let mut ticket = ticket;
        if let (Ticket::Session(t), true) = (&mut ticket, parts.status.is_success()) {
            t.answered();
        }
        let (prefix, ticket) = match ticket {
            Ticket::New(new) if parts.status == StatusCode::OK => {
                let tag_ref = new.worker.tag_ref;
                match self.learn_sid(new, &mut body).await {
                    Ok((prefix, Some(hs))) if self.tags.is_some() => (
                        self.tag_handshake(prefix, &hs.sid, tag_ref, &mut parts.headers),
                        Ticket::Plain,
                    ),
                    Ok((prefix, _)) => (prefix, Ticket::Plain),
                    Err(resp) => return resp,
                }
            }
            other => (Bytes::new(), other),
        };
        // One body, boxed once: what was read for the sid, then the rest, counted,
        // holding the worker connection and the session and in-flight counts until
        // it ends (read to the end, the connection goes back for the next request).
        let body = body::Counted::new(Prefixed::new(prefix, body), self.metrics.clone(), true);
        let body = Guarded::new(body, (ticket, inflight));
        Response::from_parts(parts, body.map_err(Into::into).boxed_unsync())
    }

    /// The handshake's first bytes with the sid tagged (`sid.TAG`), the framing and
    /// Content-Length fixed to the longer sid.
    fn tag_handshake(
        &self,
        prefix: Bytes,
        sid: &str,
        worker: sidtag::Ref,
        headers: &mut http::HeaderMap,
    ) -> Bytes {
        let Some(tags) = &self.tags else {
            return prefix;
        };
        let tagged = tags.tagger.tag(
            sid,
            sidtag::Route {
                node: tags.node,
                worker,
            },
        );
        let Some(rewritten) = engineio::retag_handshake(&prefix, sid, &tagged) else {
            return prefix;
        };
        let grew = (rewritten.len() - prefix.len()) as u64;
        if let Some(n) = content_length(headers) {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n + grew));
        }
        Bytes::from(rewritten)
    }

    /// Reads just enough of a handshake response to learn the sid; returns what it
    /// read, and the handshake if it was one.
    async fn learn_sid<B>(
        &self,
        new: NewSession,
        incoming: &mut B,
    ) -> Result<(Bytes, Option<engineio::Handshake>), Response<ProxyBody>>
    where
        B: http_body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let mut seen = BytesMut::new();
        let wait = self.cfg.timeouts.engineio_read;
        let mut learned = None;
        loop {
            match engineio::parse_handshake(&seen) {
                Parse::Found(hs) => {
                    tracing::debug!(sid = %hs.sid, worker = new.worker.id, "session learned");
                    new.learn(&hs);
                    learned = Some(hs);
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
        Ok((seen.freeze(), learned))
    }
}

impl Proxy {
    /// A long-poll an upgrade stopped waiting: carried where its client's
    /// connection can be too (cleartext HTTP/1.1), in a response that takes its
    /// worker connection to the client connection's session; elsewhere (TLS,
    /// HTTP/2) answered 503 at once, for its client to poll the new image rather
    /// than hold the upgrade for the drain period.
    fn carried(
        &self,
        conn: http1::Conn,
        (peer, version): (&Peer, http::Version),
        worker: &Worker,
        ticket: &Ticket,
    ) -> Response<ProxyBody> {
        if peer.scheme != "http" || version == http::Version::HTTP_2 {
            self.polls_answered.fetch_add(1, Ordering::Relaxed);
            return closing(StatusCode::SERVICE_UNAVAILABLE, "corral: upgrading\n");
        }
        let sid = match ticket {
            Ticket::Session(t) => Some(t.sid().to_string()),
            _ => None,
        };
        let mut resp = Response::new(crate::transport::body::empty());
        resp.extensions_mut().insert(Pending::new(PendingAnswer {
            conn,
            worker: worker.id,
            sid,
        }));
        resp
    }
}

/// The client's body stopped coming (`timeouts.body_read`, or `timeouts.read` for a
/// body read whole); the connection closes.
fn body_timed_out() -> Response<ProxyBody> {
    closing(
        StatusCode::REQUEST_TIMEOUT,
        "corral: request body not received in time\n",
    )
}

/// The client's body broke its own framing; what reached the worker was aborted.
fn malformed_body() -> Response<ProxyBody> {
    closing(StatusCode::BAD_REQUEST, "corral: malformed request body\n")
}

/// A short answer after which the client's connection closes: what is left of its
/// body cannot be told from its next request.
fn closing(status: StatusCode, text: &str) -> Response<ProxyBody> {
    let mut resp = short(status, text);
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}
