//! The listeners: binds the configured addresses (one `SO_REUSEPORT` socket per
//! serving thread, see `lanes`), accepts client connections (bounded in number),
//! terminates TLS, serves HTTP on each with header-read and keep-alive limits, and at
//! shutdown stops accepting and lets requests in flight finish (bounded). At an
//! upgrade it gives its listening sockets and, through the drain, its cleartext
//! connections (`h1::Carrier`) to the new image, which serves them on.
//!
//! It owns the sockets and the client connections' tasks; every request goes to
//! `Gate::handle`. It must not decide anything about a request itself.

use crate::config::{Config, Listener, TlsSetting};
use crate::edge::gate::Gate;
use crate::edge::h1;
use crate::edge::tls;
use crate::edge::uproot;
use crate::proxy::forward::Peer;
use crate::runtime::handover;
use crate::runtime::lanes::Lanes;
use crate::runtime::life::Life;
use crate::transport::body::RequestBody;
use crate::transport::moving::Taken;
use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// Why the listeners could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The address is taken, or not ours to bind.
    #[error("cannot listen on {addr}: {cause}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// What the system said.
        cause: std::io::Error,
    },
    /// The certificate or key would not load.
    #[error("listener {addr}: {cause}")]
    Tls {
        /// The configured address.
        addr: SocketAddr,
        /// What was wrong.
        cause: tls::Error,
    },
}

/// Listeners bound and made, not yet accepting: bound first, so a port in use
/// fails at once; accepting starts once workers are ready (`serve`).
pub struct Bound {
    plan: Plan,
}

/// Binds every configured listener, `lanes` sockets each. What depends on a
/// listener's port (the https redirect's target, the self-signed certificate's
/// file) takes the bound one: a configured port 0 is a real port by then. A
/// listener an upgrade carried (`inherited`) is found by its configured address
/// and taken instead of bound: its backlog goes on.
pub fn bind(cfg: &Config, lanes: usize, inherited: Vec<Inherited>) -> Result<Bound, Error> {
    Ok(Bound {
        plan: plan(&cfg.listeners(), lanes, &[], inherited)?,
    })
}

/// A listener carried over by an upgrade: its sockets, still listening.
pub struct Inherited {
    /// As configured in the image that carried it.
    pub address: SocketAddr,
    /// As bound.
    pub bound: SocketAddr,
    /// One a serving thread of the image that carried it.
    pub sockets: Vec<std::net::TcpListener>,
}

impl Bound {
    /// Each listener's bound address (a configured port 0 made a real one), in the
    /// config's order.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.plan.addrs()
    }

    /// Serves every socket, each on its lane, each new connection's requests
    /// going through the gate `front` holds at its accept, within `slots`. The
    /// accept loops wait for `start_accepting` (the sockets queue connections).
    /// The accept loops and every connection are tasks of `life`: they stop
    /// accepting at its drain signal, and each connection finishes the requests in
    /// flight and closes.
    pub fn serve(self, lanes: &Lanes, life: &Life, front: Front, slots: Slots) -> Arc<Serving> {
        let serving = Arc::new(Serving {
            go: CancellationToken::new(),
            life: life.clone(),
            open: std::sync::Mutex::new(Vec::new()),
            lanes: lanes.handles(),
            front,
            slots,
            carrier: Default::default(),
        });
        serving.commit(self.plan);
        serving
    }
}

/// A listener as it runs: its accept loops (one a lane), what it serves, and the
/// signal that stops them.
struct Open {
    /// As configured (a reload finds it again by its address).
    config: Listener,
    /// As bound.
    addr: SocketAddr,
    /// What its connections get; a reload may change it (TLS on, a new
    /// certificate, the https port a redirect names) without rebinding.
    kind: Arc<arc_swap::ArcSwap<Kind>>,
    certs: Option<Arc<tls::Certs>>,
    /// Stops its accept loops: a child of the drain signal, cancelled alone when a
    /// reload removes the listener or an upgrade carries it.
    stop: CancellationToken,
    /// Its sockets, as an upgrade carries them (the accept loops own others of the
    /// same sockets); let go of when it stops, so that its port is free at once.
    sockets: Arc<std::sync::Mutex<Vec<std::net::TcpListener>>>,
}

/// What a config's listeners need, made before anything is changed: which running
/// listener each one is (by configured address), or its new sockets; each one's
/// kind; and the running listeners no longer configured.
pub struct Plan {
    wanted: Vec<Wanted>,
    /// Indexes into the running listeners.
    removed: Vec<usize>,
}

struct Wanted {
    config: Listener,
    addr: SocketAddr,
    place: Place,
    kind: Kind,
    certs: Option<Arc<tls::Certs>>,
    /// A kept listener's certificate read again (an unreadable one refuses the
    /// reload before anything changes).
    fresh: Option<tls::CertifiedKey>,
}

enum Place {
    /// The running listener at this index.
    Kept(usize),
    /// Bound now, one socket a lane.
    New(Vec<std::net::TcpListener>),
}

impl Plan {
    fn addrs(&self) -> Vec<SocketAddr> {
        self.wanted.iter().map(|w| w.addr).collect()
    }
}

/// A running listener as a plan sees it.
struct Running {
    config: Listener,
    addr: SocketAddr,
    certs: Option<Arc<tls::Certs>>,
    kind: Kind,
}

/// The running listener a configured one is: the first not yet taken with the
/// same configured address.
fn find_open(open: &[Running], l: &Listener, taken: &[bool]) -> Option<usize> {
    (0..open.len()).find(|&i| !taken[i] && open[i].config.address == l.address)
}

/// Plans `listeners` against the running ones (`open`: each one's config, bound
/// address, certificates and kind): kept ones keep their sockets (and, with the
/// same TLS setting, their certificates, read again), others are bound now.
fn plan(
    listeners: &[Listener],
    lanes: usize,
    open: &[Running],
    mut inherited: Vec<Inherited>,
) -> Result<Plan, Error> {
    let mut taken = vec![false; open.len()];
    let mut placed = Vec::with_capacity(listeners.len());
    for l in listeners {
        let addr = l.address;
        let carried = inherited.iter().position(|i| i.address == addr);
        match (find_open(open, l, &taken), carried) {
            (Some(i), _) => {
                taken[i] = true;
                placed.push((l, open[i].addr, Place::Kept(i)));
            }
            (None, Some(i)) => {
                let carried = inherited.swap_remove(i);
                placed.push((l, carried.bound, Place::New(carried.sockets)));
            }
            (None, None) => {
                let sockets =
                    listen_per_lane(addr, lanes).map_err(|cause| Error::Bind { addr, cause })?;
                let bound = match sockets.first().map(|s| s.local_addr()) {
                    Some(Ok(local)) => local,
                    _ => addr,
                };
                placed.push((l, bound, Place::New(sockets)));
            }
        }
    }
    let https_port = placed
        .iter()
        .find(|(l, _, _)| l.tls.is_some())
        .map(|(_, addr, _)| addr.port());
    let mut wanted = Vec::with_capacity(placed.len());
    for (l, addr, place) in placed {
        let kept = match place {
            Place::Kept(i) => Some(&open[i]),
            Place::New(_) => None,
        };
        let tls_error = |cause| Error::Tls {
            addr: l.address,
            cause,
        };
        let (kind, certs, fresh) = match (&l.tls, kept) {
            (
                Some(setting),
                Some(Running {
                    config,
                    certs: Some(certs),
                    kind,
                    ..
                }),
            ) if config.tls.as_ref() == Some(setting) => {
                let fresh = certs.read_again().map_err(tls_error)?;
                (kind.clone(), Some(certs.clone()), fresh)
            }
            (Some(setting), _) => {
                let source = match setting {
                    TlsSetting::Files { cert, key } => tls::Source::Files {
                        cert: cert.clone(),
                        key: key.clone(),
                    },
                    TlsSetting::Mode(_) => tls::Source::SelfSigned,
                };
                let c = tls::Certs::new(source, &addr.port().to_string()).map_err(tls_error)?;
                let acceptor = TlsAcceptor::from(c.server_config().map_err(tls_error)?);
                (Kind::Tls(acceptor), Some(c), None)
            }
            (None, _) if l.redirect_https => {
                (Kind::Redirect(https_port.unwrap_or(443)), None, None)
            }
            (None, _) => (Kind::Plain, None, None),
        };
        wanted.push(Wanted {
            config: l.clone(),
            addr,
            place,
            kind,
            certs,
            fresh,
        });
    }
    let removed = (0..open.len()).filter(|i| !taken[*i]).collect();
    Ok(Plan { wanted, removed })
}

/// The gate new connections go through. A config reload puts another in its place;
/// a connection keeps the gate it was accepted with (as an nginx worker of the old
/// generation keeps serving its connections).
pub type Front = Arc<arc_swap::ArcSwap<Gate>>;

/// The client connection slots (`limits.max_connections`), resized by a reload.
#[derive(Clone)]
pub struct Slots {
    sem: Arc<Semaphore>,
    /// Slots in use beyond the size, given up as their connections end (a resize
    /// to fewer while busy): no task waits for them.
    owed: Arc<AtomicUsize>,
    size: Arc<std::sync::Mutex<usize>>,
}

/// A client connection's place under `limits.max_connections`: given back when
/// dropped, unless a resize to fewer is still owed a place.
pub struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    owed: Arc<AtomicUsize>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let owed = self
            .owed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        if let (Some(permit), Ok(_)) = (self.permit.take(), owed) {
            permit.forget();
        }
    }
}

impl Slots {
    /// `size` slots.
    pub fn new(size: usize) -> Slots {
        Slots {
            sem: Arc::new(Semaphore::new(size)),
            owed: Arc::new(AtomicUsize::new(0)),
            size: Arc::new(std::sync::Mutex::new(size)),
        }
    }

    /// Makes `size` slots. Fewer: free slots go at once, and those in use as their
    /// connections end (connections over the new limit are not cut). More: what is
    /// still owed is waived first.
    pub fn resize(&self, size: usize) {
        let mut current = self.size.lock().unwrap_or_else(|e| e.into_inner());
        if size > *current {
            let more = size - *current;
            let waived = self
                .owed
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    Some(n.saturating_sub(more))
                })
                .map_or(0, |was| was.min(more));
            self.sem.add_permits(more - waived);
        } else if size < *current {
            let fewer = *current - size;
            let left = fewer - self.sem.forget_permits(fewer);
            self.owed.fetch_add(left, Ordering::AcqRel);
        }
        *current = size;
    }

    /// Slots free now.
    #[cfg(test)]
    pub fn available(&self) -> usize {
        self.sem.available_permits()
    }

    /// A slot now, if one is free.
    pub fn try_take(&self) -> Result<Slot, TryAcquireError> {
        let permit = self.sem.clone().try_acquire_owned()?;
        Ok(self.slot(permit))
    }

    /// A slot once one is free (None: the slots were closed).
    pub async fn take(&self) -> Option<Slot> {
        let permit = self.sem.clone().acquire_owned().await.ok()?;
        Some(self.slot(permit))
    }

    fn slot(&self, permit: OwnedSemaphorePermit) -> Slot {
        Slot {
            permit: Some(permit),
            owed: self.owed.clone(),
        }
    }
}

/// The listeners, their accept loops and the client connections they took.
pub struct Serving {
    /// Cancelled when accepting starts.
    go: CancellationToken,
    /// Owns the accept loops and every client connection's task (TLS handshake,
    /// HTTP, until hyper hands a websocket over to its tunnel); its drain signal
    /// stops accepting and drains the connections.
    life: Life,
    /// The running listeners, in the config's order.
    open: std::sync::Mutex<Vec<Open>>,
    lanes: Vec<tokio::runtime::Handle>,
    front: Front,
    slots: Slots,
    carrier: Arc<h1::Carrier>,
}

impl Serving {
    /// For an upgrade, before the drain: the cleartext HTTP/1.1 connections are
    /// carried (given, with the bytes read and not used) instead of closed between
    /// requests; [`Serving::carried`] takes them once the drain is over.
    pub fn begin_carry(&self) {
        self.carrier.start();
    }

    /// The connections the drain gave.
    pub(crate) fn carried(&self) -> Vec<h1::Given> {
        self.carrier.take()
    }

    /// Serves the connections an upgrade carried, each as its listener (found by
    /// the socket's own address) serves HTTP/1.1, its unused bytes read first. One
    /// whose listener is no longer configured is closed.
    pub(crate) fn resume(&self, carried: Vec<h1::Given>) -> usize {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let gate = self.front.load_full();
        let mut resumed = 0;
        for h1::Given {
            socket,
            early,
            waiting,
        } in carried
        {
            let local = socket.local_addr().ok().map(normalise);
            let Some(o) = open.iter().find(|o| Some(normalise(o.addr)) == local) else {
                continue;
            };
            let kind = Kind::clone(&o.kind.load());
            if matches!(kind, Kind::Tls(_)) {
                continue;
            }
            let serve = Serve::new(kind, gate.cfg().clone());
            let (Ok(peer), Ok(())) = (socket.peer_addr(), socket.set_nonblocking(true)) else {
                continue;
            };
            // Carried over a full house too: it was served before the upgrade.
            let hold = self.slots.try_take().ok();
            let Ok(tcp) = tokio::net::TcpStream::from_std(socket) else {
                continue;
            };
            let (peer, limits) = (serve.peer(peer), serve.limits);
            let (draining, carrier) = (self.life.signal(), self.carrier.clone());
            let stream = uproot::Movable::new(tcp, serve.cfg.timeouts.send);
            let gate = gate.clone();
            self.life.spawn(boxed(|| async move {
                let proxy = gate.proxy().clone();
                let answer = waiting.map(|w| {
                    let coming: h1::AnswerComing<'_> =
                        Box::pin(async move { proxy.resume_answer(w.answer).await });
                    (coming, w.how)
                });
                let service = gate_service(gate, peer);
                let hold: Box<dyn Send + Sync> = Box::new(hold);
                let begun = h1::Begun {
                    early,
                    carrier: Some(&carrier),
                    answer,
                };
                h1::serve(stream, &service, limits, &draining, Some(hold), begun).await
            }));
            resumed += 1;
        }
        resumed
    }

    /// Plans `cfg`'s listeners against the running ones: new addresses bound,
    /// certificates loaded or read again. Nothing changes until `commit`; a plan
    /// dropped instead closes what it bound. Plans and commits take turns (the
    /// reload's lock).
    pub fn plan(&self, cfg: &Config) -> Result<Plan, Error> {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let running: Vec<_> = open
            .iter()
            .map(|o| Running {
                config: o.config.clone(),
                addr: o.addr,
                certs: o.certs.clone(),
                kind: Kind::clone(&o.kind.load()),
            })
            .collect();
        plan(&cfg.listeners(), self.lanes.len(), &running, Vec::new())
    }

    /// Puts `plan` in force: kept listeners take their new kind (new connections
    /// see it once the gate changes), new ones start accepting, removed ones stop
    /// accepting; their open connections go on.
    pub fn commit(&self, plan: Plan) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let mut old: Vec<Option<Open>> = open.drain(..).map(Some).collect();
        for i in plan.removed {
            if let Some(o) = old.get_mut(i).and_then(Option::take) {
                o.stop.cancel();
                tracing::info!(addr = %o.addr, "listener closed");
            }
        }
        for w in plan.wanted {
            if let (Some(certs), Some(fresh)) = (&w.certs, w.fresh) {
                certs.install(fresh);
            }
            let kept = match w.place {
                Place::Kept(i) => old.get_mut(i).and_then(Option::take),
                Place::New(_) => None,
            };
            let running = match (kept, w.place) {
                (Some(mut o), _) => {
                    o.kind.store(Arc::new(w.kind));
                    o.config = w.config;
                    o.certs = w.certs;
                    o
                }
                (None, Place::New(sockets)) => {
                    // At start `describe` says it, once the workers are up.
                    if self.go.is_cancelled() {
                        say_listening(w.addr, &w.kind);
                    }
                    self.start(w.config, w.addr, w.kind, w.certs, sockets)
                }
                (None, Place::Kept(_)) => continue,
            };
            open.push(running);
        }
    }

    /// Starts accepting on `sockets`, one a lane.
    fn start(
        &self,
        config: Listener,
        addr: SocketAddr,
        kind: Kind,
        certs: Option<Arc<tls::Certs>>,
        sockets: Vec<std::net::TcpListener>,
    ) -> Open {
        let kind = Arc::new(arc_swap::ArcSwap::from_pointee(kind));
        let stop = self.life.signal().child_token();
        let kept: Vec<_> = sockets.iter().filter_map(|s| s.try_clone().ok()).collect();
        let kept = Arc::new(std::sync::Mutex::new(kept));
        let (copies, stopped) = (kept.clone(), stop.clone());
        self.life.spawn(async move {
            stopped.cancelled().await;
            copies.lock().unwrap_or_else(|e| e.into_inner()).clear();
        });
        for (i, socket) in sockets.into_iter().enumerate() {
            let (kind, front, stop) = (kind.clone(), self.front.clone(), stop.clone());
            let go = self.go.clone();
            let conns = Conns {
                life: self.life.clone(),
                slots: self.slots.clone(),
                carrier: self.carrier.clone(),
            };
            let task = async move {
                tokio::select! {
                    _ = go.cancelled() => {}
                    _ = stop.cancelled() => return,
                }
                match TcpListener::from_std(socket) {
                    Ok(l) => accept_loop(l, kind, front, conns, stop).await,
                    Err(e) => tracing::error!(error = %e, "cannot accept on this thread"),
                }
            };
            self.life.spawn_on(&self.lanes[i % self.lanes.len()], task);
        }
        Open {
            config,
            addr,
            kind,
            certs,
            stop,
            sockets: kept,
        }
    }

    /// Stops accepting on every listener for an upgrade and gives each one's
    /// sockets to `carried`: connections wait in the backlogs for the new image.
    pub fn carry(
        &self,
        carried: &mut handover::Carried,
    ) -> std::io::Result<Vec<handover::Listener>> {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let mut listeners = Vec::with_capacity(open.len());
        for o in open.iter() {
            let kept = o.sockets.lock().unwrap_or_else(|e| e.into_inner());
            let sockets = carried.dup_all(&kept)?;
            listeners.push(handover::Listener {
                address: o.config.address,
                bound: o.addr,
                sockets,
            });
        }
        // Only once every socket is carried: a failure above changes nothing.
        for o in open.iter() {
            o.stop.cancel();
        }
        Ok(listeners)
    }

    /// Starts accepting (the workers are ready, or being waited for).
    pub fn start_accepting(&self) {
        self.go.cancel();
    }

    /// Each running listener's bound address, in the config's order.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.iter().map(|o| o.addr).collect()
    }

    /// The certificates of the running TLS listeners.
    pub fn certs(&self) -> Vec<Arc<tls::Certs>> {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.iter().filter_map(|o| o.certs.clone()).collect()
    }

    /// Logs each listener's address and kind.
    pub fn describe(&self) {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        for o in open.iter() {
            say_listening(o.addr, &o.kind.load());
        }
    }
}

fn say_listening(addr: SocketAddr, kind: &Kind) {
    match kind {
        Kind::Plain => tracing::info!("listening on http://{addr}"),
        Kind::Tls(_) => tracing::info!("listening on https://{addr}"),
        Kind::Redirect(port) => {
            tracing::info!("listening on http://{addr} (redirects to https port {port})")
        }
    }
}

/// What a listener does with its connections.
#[derive(Clone)]
enum Kind {
    Plain,
    Tls(TlsAcceptor),
    /// Answers everything with a redirect to https on this port.
    Redirect(u16),
}

/// Lets corral hold as many connections as the hard limit allows (as nginx's
/// worker_rlimit_nofile): 10,000 idle websockets need 20,000 descriptors.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// What owns the client connections of the accept loops.
struct Conns {
    /// Their tasks; at its drain signal each connection finishes the requests in
    /// flight and closes (a TLS handshake not yet done is dropped).
    life: Life,
    /// `limits.max_connections`.
    slots: Slots,
    /// Where an upgrade's drain takes the cleartext HTTP/1.1 connections.
    carrier: Arc<h1::Carrier>,
}

/// How one listener serves its connections, decided once for all of them.
struct Serve {
    kind: Kind,
    cfg: Arc<Config>,
    trusted: Vec<crate::config::Cidr>,
    /// hyper's HTTP/2 server, for TLS connections whose ALPN chose h2, and (with
    /// `h2c`) plain ones that open with the HTTP/2 preface.
    h2: hyper::server::conn::http2::Builder<TokioExecutor>,
    h2c: bool,
    /// Nagle's algorithm is turned off lazily by the HTTP/1.1 session on a plain
    /// listener, else at the accept (over TLS the handshake writes first).
    lazy_nodelay: bool,
    /// The HTTP/1.1 session's limits.
    limits: h1::Limits,
}

impl Serve {
    fn new(kind: Kind, cfg: Arc<Config>) -> Serve {
        let lazy_nodelay = !matches!(kind, Kind::Tls(_));
        let limits = h1::Limits {
            max_head: cfg.limits.max_header as usize,
            header_read: cfg.timeouts.header_read,
            keepalive: cfg.timeouts.keepalive,
            body_read: cfg.timeouts.body_read,
            shutdown: matches!(kind, Kind::Tls(_)),
            nagle: lazy_nodelay,
        };
        let max_list = cfg.limits.max_header.min(u32::MAX as u64) as u32;
        let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new()).max_header_list_size(max_list);
        Serve {
            trusted: cfg.trusted(),
            kind,
            h2,
            h2c: cfg.h2c,
            cfg,
            lazy_nodelay,
            limits,
        }
    }

    /// Who is at `addr`, as this listener sees them.
    fn peer(&self, addr: SocketAddr) -> Peer {
        let addr = normalise(addr);
        Peer::new(
            addr,
            match self.kind {
                Kind::Tls(_) => "https",
                _ => "http",
            },
            self.trusted.iter().any(|c| c.contains(addr.ip())),
            match self.kind {
                Kind::Redirect(port) => Some(port),
                _ => None,
            },
        )
    }
}

async fn accept_loop(
    listener: TcpListener,
    kind: Arc<arc_swap::ArcSwap<Kind>>,
    front: Front,
    conns: Conns,
    stop: CancellationToken,
) {
    let mut gate = front.load_full();
    let mut serve = Serve::new(Kind::clone(&kind.load()), gate.cfg().clone());
    // Made once: a future made for every connection cost a few hundred
    // instructions each.
    let mut stopped = std::pin::pin!(stop.cancelled());
    loop {
        let (stream, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stopped => return,
        };
        let Some(permit) = take_slot(&conns.slots, &mut stopped).await else {
            return;
        };
        let current = front.load();
        if !Arc::ptr_eq(&current, &gate) {
            // A reload: this listener's settings are made again from its config
            // (its kind was stored before the gate).
            gate = arc_swap::Guard::into_inner(current);
            serve = Serve::new(Kind::clone(&kind.load()), gate.cfg().clone());
        }
        if !serve.lazy_nodelay {
            let _ = stream.set_nodelay(true);
        }
        let peer = serve.peer(addr);
        spawn_connection(&serve, &gate, &conns, stream, peer, permit);
    }
}

/// A connection slot (`limits.max_connections`); None once the listeners stop.
/// The slot is taken after the accept: a loop that waited for a slot first would
/// hold it while its socket (SO_REUSEPORT, one per thread) got nothing, and the
/// connections the kernel gave another thread would wait on it. While this
/// connection waits for a slot, this thread accepts no other.
async fn take_slot<S: std::future::Future + Unpin>(slots: &Slots, stopped: &mut S) -> Option<Slot> {
    match slots.try_take() {
        Ok(p) => Some(p),
        Err(TryAcquireError::Closed) => None,
        Err(TryAcquireError::NoPermits) => tokio::select! {
            p = slots.take() => p,
            _ = stopped => None,
        },
    }
}

/// Serves one accepted connection on a task of `conns`: TLS first where the
/// listener has it (ALPN choosing h2 or HTTP/1.1), the HTTP/2 preface looked for
/// where `h2c` is on, else HTTP/1.1 (`h1`). A connection is served by one stack
/// for its whole life.
fn spawn_connection(
    serve: &Serve,
    gate: &Arc<Gate>,
    conns: &Conns,
    stream: tokio::net::TcpStream,
    peer: Peer,
    slot: Slot,
) {
    let (limits, h2, h2c) = (serve.limits, serve.h2.clone(), serve.h2c);
    let draining = conns.life.signal();
    let carrier = conns.carrier.clone();
    let gate = gate.clone();
    let hold: Box<dyn Send + Sync> = Box::new(slot);
    let stream = uproot::Movable::new(stream, serve.cfg.timeouts.send);
    match &serve.kind {
        Kind::Tls(acceptor) => {
            let acceptor = acceptor.clone();
            let handshake = serve.cfg.timeouts.header_read;
            let addr = peer.addr;
            // Boxed: the task's future holds TLS and the session, and tokio moves a
            // task's future a few times as it spawns it (thousands of bytes for
            // each new connection otherwise).
            conns.life.spawn(boxed(|| async move {
                let accepting = tokio::time::timeout(handshake, acceptor.accept(stream));
                let tls = tokio::select! {
                    r = accepting => match r {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %addr, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    },
                    _ = draining.cancelled() => return,
                };
                // ALPN has chosen the protocol: no detection needed.
                if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                    let _hold = hold;
                    return serve_h2(tls, &h2, gate, peer, draining).await;
                }
                let service = gate_service(gate, peer);
                h1::serve(
                    tls,
                    &service,
                    limits,
                    &draining,
                    Some(hold),
                    Default::default(),
                )
                .await
            }));
        }
        _ if h2c => {
            conns.life.spawn(boxed(|| async move {
                let looked = opens_h2(&stream, limits.header_read);
                let prior_knowledge = tokio::select! {
                    yes = looked => yes,
                    _ = draining.cancelled() => {
                        // Nothing read yet: an upgrade carries it as it is.
                        if carrier.carrying() {
                            if let Ok(Taken::Tcp(tcp)) = uproot::Uproot::uproot(stream) {
                                carrier.give_untouched(tcp);
                            }
                        }
                        return;
                    }
                };
                if prior_knowledge {
                    use uproot::NoDelay;
                    stream.no_delay();
                    let _hold = hold;
                    return serve_h2(stream, &h2, gate, peer, draining).await;
                }
                let service = gate_service(gate, peer);
                let begun = h1::Begun {
                    carrier: Some(&carrier),
                    ..Default::default()
                };
                h1::serve(stream, &service, limits, &draining, Some(hold), begun).await
            }));
        }
        _ => {
            conns.life.spawn(boxed(|| async move {
                let service = gate_service(gate, peer);
                let begun = h1::Begun {
                    carrier: Some(&carrier),
                    ..Default::default()
                };
                h1::serve(stream, &service, limits, &draining, Some(hold), begun).await
            }));
        }
    }
}

/// The gate as an HTTP/1.1 session's service, for requests from `peer`.
fn gate_service(gate: Arc<Gate>, peer: Peer) -> impl h1::Service {
    move |req| gate.clone().handle(req, peer.clone())
}

/// An HTTP/2 connection, its requests through the gate, until it ends or drains.
async fn serve_h2<I>(
    io: I,
    h2: &hyper::server::conn::http2::Builder<TokioExecutor>,
    gate: Arc<Gate>,
    peer: Peer,
    draining: CancellationToken,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request<Incoming>| {
        gate.clone()
            .handle(req.map(RequestBody::Hyper), peer.clone())
    });
    let mut conn = std::pin::pin!(h2.serve_connection(TokioIo::new(io), service));
    // At the drain (at once, if it already began) the requests in flight finish and
    // the connection closes.
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = draining.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "client connection ended with an error");
    }
}

/// The HTTP/2 connection preface (RFC 9113 3.4), which a plain connection opens
/// with when its client speaks h2c with prior knowledge.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether a plain connection opens with the HTTP/2 preface, looked at without
/// reading it (the stack that serves the connection reads it from the start).
/// A client that sends part of it and waits is given `wait`.
async fn opens_h2(stream: &uproot::Movable, wait: Duration) -> bool {
    let Some(tcp) = stream.get_ref() else {
        return false;
    };
    let look = async {
        let mut seen = [0u8; 24];
        loop {
            let n = match tcp.peek(&mut seen).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            };
            if seen[..n] != H2_PREFACE[..n] {
                return false;
            }
            if n == H2_PREFACE.len() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(wait, look).await.unwrap_or(false)
}

/// `make()`'s future in a box, made in its heap slot: built on the stack first, a
/// connection's future (several KB) would be copied into the box for every new
/// connection.
fn boxed<F: std::future::Future>(make: impl FnOnce() -> F) -> Pin<Box<F>> {
    let mut slot = Box::<F>::new_uninit();
    slot.write(make());
    // SAFETY: written just above.
    Box::into_pin(unsafe { slot.assume_init() })
}

/// One listening socket per lane on `addr`, with SO_REUSEPORT so that the kernel
/// shares new connections out among the lanes (as nginx's `reuseport`).
fn listen_per_lane(addr: SocketAddr, lanes: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    // A plain bind first: with SO_REUSEPORT alone, a port another process of this
    // user holds the same way would be shared with it instead of refused.
    let probe = std::net::TcpListener::bind(addr)?;
    let addr = probe.local_addr()?;
    drop(probe);
    (0..lanes)
        .map(|_| {
            let socket = match addr {
                SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            socket.set_reuseaddr(true)?;
            socket.set_reuseport(true)?;
            socket.bind(addr)?;
            // Listening now queues early clients until the accept loops start.
            socket.listen(1024)?.into_std()
        })
        .collect()
}

/// IPv4 clients of a dual-stack socket appear as `::ffff:a.b.c.d`; show them as IPv4.
fn normalise(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => addr,
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::Slots;

    /// Shrunk while every slot is in use, then grown again before and after the
    /// connections end: the capacity is the size asked for each time.
    #[test]
    fn slots_resized_while_busy_keep_the_configured_capacity() {
        let slots = Slots::new(4);
        let held: Vec<_> = (0..4).map(|_| slots.try_take().expect("free")).collect();
        slots.resize(1);
        assert_eq!(slots.available(), 0);
        let mut held = held.into_iter();
        drop(held.next());
        drop(held.next());
        // Two ended; two still open against a size of one: still none free.
        assert_eq!(slots.available(), 0);
        slots.resize(3);
        // Owed one place; growing by two waives it and frees one.
        assert_eq!(slots.available(), 1);
        drop(held);
        assert_eq!(slots.available(), 3);
        slots.resize(2);
        assert_eq!(slots.available(), 2);
        slots.resize(5);
        let all: Vec<_> = (0..5).map(|_| slots.try_take().expect("five")).collect();
        assert!(slots.try_take().is_err(), "a sixth");
        drop(all);
        assert_eq!(slots.available(), 5);
    }
}
