//! The listeners: binds the configured addresses (one `SO_REUSEPORT` socket per
//! serving thread, see `lanes`), accepts client connections (bounded in number),
//! terminates TLS, serves HTTP on each with header-read and keep-alive limits, and at
//! shutdown stops accepting and lets requests in flight finish (bounded).
//!
//! It owns the sockets and the client connections' tasks; every request goes to
//! `Gate::handle`. It must not decide anything about a request itself.

use crate::config::{Config, TlsSetting};
use crate::edge::fast;
use crate::edge::gate::Gate;
use crate::edge::tls;
use crate::edge::uproot;
use crate::http1::is_websocket_upgrade;
use crate::proxy::forward::Peer;
use crate::proxy::tunnel::ConnectionSlot;
use crate::runtime::lanes::Lanes;
use crate::transport::body::RequestBody;
use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore, TryAcquireError};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;
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

/// The bound, not yet accepting, listeners: bound first, so a port in use fails at
/// once; accepting starts once workers are ready.
pub struct Bound {
    listeners: Vec<(Vec<std::net::TcpListener>, Kind)>,
    /// The certificates of the TLS listeners, reloaded on SIGHUP.
    pub certs: Vec<Arc<tls::Certs>>,
}

/// Binds every configured listener, `lanes` sockets each. What depends on a
/// listener's port (the https redirect's target, the self-signed certificate's
/// file) takes the bound one: a configured port 0 is a real port by then.
pub fn bind(cfg: &Config, lanes: usize) -> Result<Bound, Error> {
    let all = cfg.listeners();
    let mut bound = Vec::with_capacity(all.len());
    for l in &all {
        let addr = l.address;
        let sockets = listen_per_lane(addr, lanes).map_err(|cause| Error::Bind { addr, cause })?;
        let port = match sockets.first().map(|s| s.local_addr()) {
            Some(Ok(local)) => local.port(),
            _ => addr.port(),
        };
        bound.push((l, sockets, port));
    }
    let https_port = bound
        .iter()
        .find(|(l, _, _)| l.tls.is_some())
        .map(|(_, _, port)| *port);
    let mut listeners = Vec::new();
    let mut certs = Vec::new();
    for (l, sockets, port) in bound {
        let addr = l.address;
        let kind = match &l.tls {
            Some(setting) => {
                let source = match setting {
                    TlsSetting::Files { cert, key } => tls::Source::Files {
                        cert: cert.clone(),
                        key: key.clone(),
                    },
                    TlsSetting::Mode(_) => tls::Source::SelfSigned,
                };
                let tls_error = |cause| Error::Tls { addr, cause };
                let c = tls::Certs::new(source, &port.to_string()).map_err(tls_error)?;
                let acceptor = TlsAcceptor::from(c.server_config().map_err(tls_error)?);
                certs.push(c);
                Kind::Tls(acceptor)
            }
            None if l.redirect_https => Kind::Redirect(https_port.unwrap_or(443)),
            None => Kind::Plain,
        };
        listeners.push((sockets, kind));
    }
    Ok(Bound { listeners, certs })
}

impl Bound {
    /// Each listener's bound address (a configured port 0 made a real one), in the
    /// config's order.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|(sockets, _)| sockets.first()?.local_addr().ok())
            .collect()
    }

    /// Logs each listener's address and kind.
    pub fn describe(&self) {
        for (sockets, kind) in &self.listeners {
            if let Some(Ok(addr)) = sockets.first().map(|l| l.local_addr()) {
                match kind {
                    Kind::Plain => tracing::info!("listening on http://{addr}"),
                    Kind::Tls(_) => tracing::info!("listening on https://{addr}"),
                    Kind::Redirect(port) => {
                        tracing::info!(
                            "listening on http://{addr} (redirects to https port {port})"
                        )
                    }
                }
            }
        }
    }

    /// Starts accepting on every socket, each on its lane, each new connection's
    /// requests going through the gate `front` holds at its accept, within `slots`.
    pub fn serve(self, lanes: &Lanes, front: Front, slots: Slots) -> Serving {
        let draining = CancellationToken::new();
        let connections = tokio_util::task::TaskTracker::new();
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut accepting = Vec::new();
        for (sockets, kind) in self.listeners {
            for (i, socket) in sockets.into_iter().enumerate() {
                let (kind, front) = (kind.clone(), front.clone());
                let (stop_rx, conns) = (
                    stop_rx.clone(),
                    Conns {
                        draining: draining.clone(),
                        tasks: connections.clone(),
                        slots: slots.sem.clone(),
                    },
                );
                accepting.push(lanes.spawn_on(i, async move {
                    match TcpListener::from_std(socket) {
                        Ok(l) => accept_loop(l, kind, front, conns, stop_rx).await,
                        Err(e) => tracing::error!(error = %e, "cannot accept on this thread"),
                    }
                }));
            }
        }
        Serving {
            draining,
            connections,
            stop: stop_tx,
            accepting,
        }
    }
}

/// The gate new connections go through. A config reload puts another in its place;
/// a connection keeps the gate it was accepted with (as an nginx worker of the old
/// generation keeps serving its connections).
pub type Front = Arc<arc_swap::ArcSwap<Gate>>;

/// The client connection slots (`limits.max_connections`), resized by a reload.
#[derive(Clone)]
pub struct Slots {
    sem: Arc<Semaphore>,
    size: Arc<std::sync::Mutex<usize>>,
}

impl Slots {
    /// `size` slots.
    pub fn new(size: usize) -> Slots {
        Slots {
            sem: Arc::new(Semaphore::new(size)),
            size: Arc::new(std::sync::Mutex::new(size)),
        }
    }

    /// Makes `size` slots. Fewer: free slots go at once, and those in use as their
    /// connections end (`owner` holds the task that takes them; connections over
    /// the new limit are not cut).
    pub fn resize(&self, size: usize, owner: &crate::runtime::tasks::Background) {
        let mut current = self.size.lock().unwrap_or_else(|e| e.into_inner());
        if size > *current {
            self.sem.add_permits(size - *current);
        } else if size < *current {
            let fewer = *current - size;
            let left = fewer - self.sem.forget_permits(fewer);
            if left > 0 {
                let sem = self.sem.clone();
                owner.spawn(async move {
                    let n = u32::try_from(left).unwrap_or(u32::MAX);
                    if let Ok(p) = sem.acquire_many_owned(n).await {
                        p.forget();
                    }
                });
            }
        }
        *current = size;
    }
}

/// The accept loops and the client connections they took.
pub struct Serving {
    draining: CancellationToken,
    /// Every client connection's task (TLS handshake, HTTP, until hyper hands a
    /// websocket over to its tunnel).
    connections: tokio_util::task::TaskTracker,
    stop: watch::Sender<bool>,
    accepting: Vec<JoinHandle<()>>,
}

impl Serving {
    /// Stops accepting, then lets requests in flight finish and idle keep-alive
    /// connections close, for up to `drain`. Returns whether all finished in time.
    pub async fn drain(self, drain: Duration) -> Drained {
        let _ = self.stop.send(true);
        for task in self.accepting {
            let _ = task.await;
        }
        // No connection is added now: every accept loop has ended.
        self.draining.cancel();
        self.connections.close();
        let in_time = tokio::time::timeout(drain, self.connections.wait())
            .await
            .is_ok();
        Drained {
            in_time,
            connections: self.connections,
        }
    }
}

/// The client connections after the drain period.
pub struct Drained {
    /// Whether every request finished within the drain period.
    pub in_time: bool,
    connections: tokio_util::task::TaskTracker,
}

impl Drained {
    /// Waits up to `limit` more for the connection tasks still running after the
    /// drain period; returns how many were left, which are cut when their threads
    /// stop.
    pub async fn cut(self, limit: Duration) -> usize {
        // Closed by `drain` already: this only waits longer.
        let _ = tokio::time::timeout(limit, self.connections.wait()).await;
        self.connections.len()
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
    /// Cancelled at shutdown: each connection finishes the requests in flight and
    /// closes (a TLS handshake not yet done is dropped).
    draining: CancellationToken,
    /// Their tasks, awaited at shutdown.
    tasks: tokio_util::task::TaskTracker,
    /// `limits.max_connections`.
    slots: Arc<Semaphore>,
}

/// How one listener serves its connections, decided once for all of them.
struct Serve {
    kind: Kind,
    cfg: Arc<Config>,
    trusted: Vec<crate::config::Cidr>,
    protocols: Protocols,
    /// Nagle's algorithm is turned off lazily by the fast loop on a plain listener
    /// it serves, else at the accept (over TLS the handshake writes first).
    lazy_nodelay: bool,
    /// The fast loop's limits, when it serves this listener's connections (not the
    /// redirect-only listener's: its few requests are hyper's).
    fast: Option<fast::Limits>,
}

impl Serve {
    fn new(kind: Kind, cfg: Arc<Config>) -> Serve {
        let protocols = Protocols::new(&cfg);
        let fast_server = cfg.experimental.http1_fast_server;
        let lazy_nodelay = matches!(kind, Kind::Plain) && fast_server && protocols.h2c.is_none();
        let fast = (fast_server && !matches!(kind, Kind::Redirect(_))).then(|| fast::Limits {
            max_head: cfg.limits.max_header as usize,
            header_read: cfg.timeouts.header_read,
            shutdown: matches!(kind, Kind::Tls(_)),
            nagle: lazy_nodelay,
        });
        Serve {
            trusted: cfg.trusted(),
            kind,
            cfg,
            protocols,
            lazy_nodelay,
            fast,
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
    kind: Kind,
    front: Front,
    conns: Conns,
    mut stop: watch::Receiver<bool>,
) {
    let mut gate = front.load_full();
    let mut serve = Serve::new(kind.clone(), gate.cfg().clone());
    // Made once: a `changed()` future made for every connection cost a few hundred
    // instructions each.
    let mut stopped = std::pin::pin!(stop.changed());
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
            // A reload: this listener's settings are made again from its config.
            gate = arc_swap::Guard::into_inner(current);
            serve = Serve::new(kind.clone(), gate.cfg().clone());
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
async fn take_slot<S: std::future::Future + Unpin>(
    slots: &Arc<Semaphore>,
    stopped: &mut S,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    match slots.clone().try_acquire_owned() {
        Ok(p) => Some(p),
        Err(TryAcquireError::Closed) => None,
        Err(TryAcquireError::NoPermits) => tokio::select! {
            p = slots.clone().acquire_owned() => p.ok(),
            _ = stopped => None,
        },
    }
}

/// Serves one accepted connection on a task of `conns`: TLS first where the
/// listener has it (ALPN choosing h2 or HTTP/1.1), h2c detection where it is on,
/// else HTTP/1.1 (`serve_http1`).
fn spawn_connection(
    serve: &Serve,
    gate: &Arc<Gate>,
    conns: &Conns,
    stream: tokio::net::TcpStream,
    peer: Peer,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let (g, p) = (gate.clone(), peer.clone());
    let mut slot = ConnectionSlot::new(permit);
    match serve.kind {
        Kind::Plain => slot = slot.with_socket(uproot::take_socket::<tokio::net::TcpStream>),
        Kind::Tls(_) => slot = slot.with_socket(uproot::take_socket::<uproot::Tls>),
        Kind::Redirect(_) => {}
    }
    let service = service_fn(move |mut req: Request<Incoming>| {
        if is_websocket_upgrade(req.headers()) {
            req.extensions_mut().insert(slot.clone());
        }
        g.clone().handle(req.map(RequestBody::Hyper), p.clone())
    });
    let fast = serve.fast;
    let gate = gate.clone();
    let (protocols, draining) = (serve.protocols.clone(), conns.draining.clone());
    match &serve.kind {
        Kind::Tls(acceptor) => {
            let acceptor = acceptor.clone();
            let handshake = serve.cfg.timeouts.header_read;
            let addr = peer.addr;
            // Boxed: the task's future holds TLS, the fast loop and hyper's
            // connection, and tokio moves a task's future a few times as it
            // spawns it (thousands of bytes for each new connection otherwise).
            conns.tasks.spawn(boxed(|| async move {
                let accepting =
                    tokio::time::timeout(handshake, acceptor.accept(uproot::Movable::new(stream)));
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
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                if h2 {
                    let io = TokioIo::new(tls);
                    until_drained(protocols.h2.serve_connection(io, service), draining).await;
                    return;
                }
                let fast = fast.map(|limits| (limits, &gate, &peer));
                serve_http1(tls, fast, &protocols.h1, service, draining).await
            }));
        }
        _ => {
            conns.tasks.spawn(boxed(|| async move {
                match &protocols.h2c {
                    Some(auto) => {
                        let conn = auto
                            .serve_connection_with_upgrades(TokioIo::new(stream), service)
                            .into_owned();
                        until_drained(conn, draining).await
                    }
                    None => {
                        let fast = fast.map(|limits| (limits, &gate, &peer));
                        serve_http1(stream, fast, &protocols.h1, service, draining).await
                    }
                }
            }));
        }
    }
}

/// HTTP/1.1 on a connection: its plain requests on the fast loop (`fast`, when on)
/// and, from the first other request (or from the start), hyper's server with the
/// bytes the loop read; either way until the connection closes or is drained.
async fn serve_http1<I, S>(
    io: I,
    fast: Option<(fast::Limits, &Arc<Gate>, &Peer)>,
    h1: &hyper::server::conn::http1::Builder,
    service: S,
    draining: CancellationToken,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static + fast::NoDelay,
    S: hyper::service::HttpService<Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: http_body::Body + Send + 'static,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let io = match fast {
        Some((limits, gate, peer)) => match fast::serve(io, gate, peer, limits, &draining).await {
            fast::Outcome::Closed => return,
            fast::Outcome::Handover(io) => Either::Right(io),
        },
        None => Either::Left(io),
    };
    let conn = h1
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    until_drained(conn, draining).await
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

/// How client connections are served: HTTP/1.1, HTTP/2 (chosen by ALPN over TLS),
/// and, with `h2c`, either on a plain listener, told apart by the first bytes.
#[derive(Clone)]
struct Protocols {
    h1: hyper::server::conn::http1::Builder,
    h2: hyper::server::conn::http2::Builder<TokioExecutor>,
    h2c: Option<auto::Builder<TokioExecutor>>,
}

impl Protocols {
    fn new(cfg: &Config) -> Protocols {
        let max_buf = cfg.limits.max_header.max(8192) as usize;
        let max_list = cfg.limits.max_header.min(u32::MAX as u64) as u32;
        let mut h1 = hyper::server::conn::http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(cfg.timeouts.header_read)
            .max_buf_size(max_buf)
            .keep_alive(true);
        let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new()).max_header_list_size(max_list);
        let h2c = cfg.h2c.then(|| {
            let mut auto = auto::Builder::new(TokioExecutor::new());
            auto.http1()
                .timer(TokioTimer::new())
                .header_read_timeout(cfg.timeouts.header_read)
                .max_buf_size(max_buf)
                .keep_alive(true);
            auto.http2()
                .timer(TokioTimer::new())
                .max_header_list_size(max_list);
            auto
        });
        Protocols { h1, h2, h2c }
    }
}

/// A served connection that can be asked to finish what is in flight and close.
trait Drain {
    fn drain(self: Pin<&mut Self>);
}

impl<I, S> Drain for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S::ResBody: http_body::Body + 'static,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn drain(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, E> Drain for hyper::server::conn::http2::Connection<I, S, E>
where
    S: hyper::service::HttpService<Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S::ResBody: http_body::Body + 'static,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, S::ResBody>,
{
    fn drain(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, E, B> Drain for auto::UpgradeableConnection<'_, I, S, E>
where
    S: hyper::service::Service<Request<Incoming>, Response = http::Response<B>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: 'static,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn drain(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Serves `conn` until it ends; once `draining` is cancelled (at once, if it
/// already was), it finishes the requests in flight and closes.
async fn until_drained<C, E>(conn: C, draining: CancellationToken)
where
    C: std::future::Future<Output = Result<(), E>> + Drain,
    E: std::fmt::Display,
{
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = draining.cancelled() => {
            conn.as_mut().drain();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "client connection ended with an error");
    }
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
