//! The listener: binds the configured addresses (one `SO_REUSEPORT` socket per
//! serving thread, see `lanes`), accepts client connections (bounded in number),
//! serves HTTP on each with header-read and keep-alive limits, and on
//! SIGTERM/SIGINT stops accepting and lets requests in flight finish (bounded).
//!
//! It wires the parts together at start (pool, router, proxy, background tasks) and
//! owns nothing after that but the sockets; every request goes to `Proxy::handle`.

use crate::access::AccessLog;
use crate::admin;
use crate::auth::BasicAuth;
use crate::broker;
use crate::config::{Config, TlsSetting};
use crate::forward::{is_websocket_upgrade, Peer};
use crate::lanes::Lanes;
use crate::metrics::{self, Metrics, Queue, Sources};
use crate::pool::{self, Pool};
use crate::proxy::Proxy;
use crate::router::{self, Router};
use crate::status;
use crate::supervisor::Supervisor;
use crate::tasks::Background;
use crate::tls;
use crate::tunnel::ConnectionSlot;
use anyhow::Context;
use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

/// Runs corral until SIGTERM or SIGINT.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    let pool = Arc::new(Pool::with_thresholds(
        &cfg.upstreams,
        cfg.balance.policy,
        cfg.health.rise,
        cfg.health.fall,
    ));
    let router = Arc::new(Router::new(
        pool.clone(),
        cfg.engineio.max_sessions,
        cfg.engineio.session_idle,
    ));
    // Tasks that live as long as corral: ended and awaited at shutdown.
    let background = Background::new();
    pool::spawn_health_checks(pool.clone(), cfg.health.clone(), &background);
    router::spawn_sweeper(router.clone(), Duration::from_secs(2), &background);
    let auth = match &cfg.auth {
        Some(a) => {
            let auth = BasicAuth::new(&a.htpasswd, &a.realm, a.exempt.clone())
                .map_err(anyhow::Error::msg)?;
            let auth = Arc::new(auth);
            auth.spawn_reloader(&background);
            Some(auth)
        }
        None => None,
    };
    let metrics = Arc::new(Metrics::default());
    let access = match cfg.access_log.enabled {
        true => Some(AccessLog::start(
            &cfg.access_log.path,
            cfg.access_log.format,
            cfg.access_log.engineio,
            metrics.clone(),
        )?),
        false => None,
    };
    let mut proxy = Proxy::new(
        cfg.clone(),
        pool.clone(),
        router.clone(),
        auth,
        metrics.clone(),
        access,
    );
    if cfg.engineio.tag_sids {
        let cluster = &cfg.cluster;
        if cluster.key.is_none() && cluster.key_file.is_none() {
            tracing::warn!(
                "engineio.tag_sids without cluster.key: a random key, so tagged sessions \
                 will not survive a restart"
            );
        }
        let key = cluster.signing_key().map_err(anyhow::Error::msg)?;
        let peers = cluster
            .nodes
            .iter()
            .map(|(name, host)| crate::proxy::NodePeer {
                name: name.clone(),
                node: crate::sidtag::node_ref(name),
                host: host.clone(),
                target: std::sync::Mutex::new(None),
            })
            .collect();
        proxy.enable_tags(crate::proxy::Tags {
            tagger: crate::sidtag::Tagger::new(&key),
            name: cluster.node.clone(),
            node: crate::sidtag::node_ref(&cluster.node),
            peers,
        });
        tracing::info!(node = %cluster.node, others = cluster.nodes.len(), "sids carry their worker (tagged)");
    }
    let proxy = Arc::new(proxy);
    background.spawn(crate::proxy::resolve_nodes(proxy.clone()));

    raise_fd_limit();
    let lanes = Arc::new(Lanes::start(cfg.threads.resolve()).context("cannot start threads")?);
    // Bind first, so a port in use fails at once; accept once workers are ready.
    let all = cfg.listeners();
    let https_port = all
        .iter()
        .find(|l| l.tls.is_some())
        .map(|l| l.address.port());
    let mut listeners = Vec::new();
    let mut certs = Vec::new();
    for l in &all {
        let sockets = listen_per_lane(l.address, lanes.len())
            .with_context(|| format!("cannot listen on {}", l.address))?;
        let kind = match &l.tls {
            Some(setting) => {
                let source = match setting {
                    TlsSetting::Files { cert, key } => tls::Source::Files {
                        cert: cert.clone(),
                        key: key.clone(),
                    },
                    TlsSetting::Mode(_) => tls::Source::SelfSigned,
                };
                let c = tls::Certs::new(source, &l.address.port().to_string())
                    .map_err(|e| anyhow::anyhow!("listener {}: {e}", l.address))?;
                let acceptor = TlsAcceptor::from(c.server_config().map_err(anyhow::Error::msg)?);
                certs.push(c);
                Kind::Tls(acceptor)
            }
            None if l.redirect_https => Kind::Redirect(https_port.unwrap_or(443)),
            None => Kind::Plain,
        };
        listeners.push((sockets, kind));
    }
    let (queue_url, queue) = message_queue(&cfg).await?;
    let sources = Arc::new(Sources {
        metrics: metrics.clone(),
        pool: pool.clone(),
        router: router.clone(),
        queue,
        started: std::time::Instant::now(),
        policy: cfg.balance.policy.to_string(),
        node: cfg.cluster.node.clone(),
    });
    metrics::spawn_sampler(sources.clone(), &background);
    if let Some(admin_cfg) = &cfg.admin {
        let auth = match &admin_cfg.htpasswd {
            Some(file) => Some(Arc::new(
                BasicAuth::new(file, "corral admin", Vec::new()).map_err(anyhow::Error::msg)?,
            )),
            None => None,
        };
        let at = status::serve(admin_cfg.listen, sources.clone(), auth).await?;
        tracing::info!("status page on http://{at}/status, metrics on http://{at}/metrics");
    }
    let supervisor = cfg.workers.clone().map(|spec| {
        let env = queue_env(queue_url.as_deref(), &spec.env);
        Arc::new(Supervisor::new(spec, pool.clone(), env))
    });
    let admin_path = cfg
        .admin_socket
        .clone()
        .unwrap_or_else(|| admin::default_path(cfg.first_port()));
    admin::serve(&admin_path, supervisor.clone()).await?;
    if std::process::id() == 1 {
        tracing::info!("running as PID 1: reaping orphaned processes");
        background.spawn(crate::supervisor::reap_orphans(
            pool.clone(),
            background.stopping(),
        ));
    }
    if let Some(sup) = &supervisor {
        sup.start().await;
    }
    print_summary(&listeners, &pool);
    if supervisor.is_some() {
        background.spawn(say_ready(pool.clone(), cfg.clone(), background.stopping()));
    } else {
        announce_ready(&cfg, &pool);
    }

    let graceful = Arc::new(GracefulShutdown::new());
    // Every client connection's task (TLS handshake, HTTP, until hyper hands a
    // websocket over to its tunnel).
    let connections = tokio_util::task::TaskTracker::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    let slots = Arc::new(Semaphore::new(cfg.limits.max_connections));
    let mut accepting = Vec::new();
    for (sockets, kind) in listeners {
        for (i, socket) in sockets.into_iter().enumerate() {
            let (kind, proxy, graceful) = (kind.clone(), proxy.clone(), graceful.clone());
            let (stop_rx, slots) = (stop_rx.clone(), slots.clone());
            let connections = connections.clone();
            accepting.push(lanes.spawn_on(i, async move {
                match TcpListener::from_std(socket) {
                    Ok(l) => {
                        let conns = Conns {
                            graceful,
                            tasks: connections,
                            slots,
                        };
                        accept_loop(l, kind, proxy, conns, stop_rx).await
                    }
                    Err(e) => tracing::error!(error = %e, "cannot accept on this thread"),
                }
            }));
        }
    }

    let signal = wait_for_stop(supervisor.clone(), certs, &background).await;
    crate::notify::notify("STOPPING=1\nSTATUS=stopping");
    if let Some(sup) = &supervisor {
        sup.begin_stop();
    }
    tracing::info!(
        signal,
        "stopping: no new connections, finishing requests in flight"
    );
    let _ = stop_tx.send(true);
    for task in accepting {
        let _ = task.await;
    }
    let drain = cfg.timeouts.shutdown_drain;
    // Every accept loop has ended and each connection holds a watcher of its own,
    // not this Arc, so this is the last reference.
    let draining = async {
        match Arc::try_unwrap(graceful) {
            Ok(graceful) => graceful.shutdown().await,
            Err(_) => tracing::error!("connections not drained: shutdown handle still shared"),
        }
    };
    // Requests in flight finish and idle keep-alive connections close, while open
    // websocket tunnels send their clients a close frame.
    let (drained, open_tunnels) = tokio::join!(
        tokio::time::timeout(drain, draining),
        proxy.close_tunnels(drain)
    );
    if drained.is_err() {
        tracing::warn!(
            ?drain,
            "requests still in flight after the drain period; closing"
        );
    }
    if open_tunnels > 0 {
        tracing::warn!(
            open_tunnels,
            "websocket tunnels still open after the drain period"
        );
    }
    // Connections not drained in time are cut when their threads stop below; those
    // in a TLS handshake end within the header timeout.
    connections.close();
    if tokio::time::timeout(Duration::from_secs(1), connections.wait())
        .await
        .is_err()
    {
        tracing::debug!(
            left = connections.len(),
            "client connections cut at shutdown"
        );
    }
    let drivers_left = proxy.close_upstreams(Duration::from_secs(1)).await;
    if drivers_left > 0 {
        tracing::debug!(drivers_left, "worker connections cut at shutdown");
    }
    if let Ok(lanes) = Arc::try_unwrap(lanes) {
        let _ = tokio::task::spawn_blocking(move || lanes.stop()).await;
    }
    if let Some(sup) = &supervisor {
        sup.stop_all().await;
        tracing::info!("every worker stopped");
    }
    background.stop().await;
    let _ = std::fs::remove_file(&admin_path);
    Ok(())
}

/// Starts the embedded broker if configured; returns the queue URL for the workers.
async fn message_queue(cfg: &Config) -> anyhow::Result<(Option<String>, Queue)> {
    let mq = &cfg.message_queue;
    if !cfg.embedded_broker() {
        return Ok(match &mq.url {
            Some(url) => {
                tracing::info!(url = %redact(url), "message queue: external");
                (Some(url.clone()), Queue::External(redact(url)))
            }
            None => (None, Queue::None),
        });
    }
    let (broker, addr) = broker::start(mq.listen, broker::Settings::from_config(mq)).await?;
    let url = broker::url_for(addr, mq.password.as_deref());
    tracing::info!(%addr, "message queue: embedded broker listening");
    Ok((Some(url.clone()), Queue::Embedded(broker, redact(&url))))
}

/// CORRAL_MESSAGE_QUEUE always; REDIS_URL unless the environment already sets it.
fn queue_env(
    url: Option<&str>,
    worker_env: &std::collections::BTreeMap<String, String>,
) -> Vec<(String, String)> {
    let Some(url) = url else {
        return Vec::new();
    };
    let mut env = vec![("CORRAL_MESSAGE_QUEUE".to_string(), url.to_string())];
    if std::env::var_os("REDIS_URL").is_none() && !worker_env.contains_key("REDIS_URL") {
        env.push(("REDIS_URL".to_string(), url.to_string()));
    }
    env
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
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
fn raise_fd_limit() {
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

fn print_summary(listeners: &[(Vec<std::net::TcpListener>, Kind)], pool: &Pool) {
    for (sockets, kind) in listeners {
        if let Some(Ok(addr)) = sockets.first().map(|l| l.local_addr()) {
            match kind {
                Kind::Plain => tracing::info!("listening on http://{addr}"),
                Kind::Tls(_) => tracing::info!("listening on https://{addr}"),
                Kind::Redirect(port) => {
                    tracing::info!("listening on http://{addr} (redirects to https port {port})")
                }
            }
        }
    }
    for w in pool.workers() {
        tracing::info!(
            worker = w.id,
            pid = w.pid(),
            addr = %w.addr,
            state = w.state().name(),
            managed = w.managed,
            "worker"
        );
    }
}

/// "corral ready", with how many workers are not.
fn announce_ready(cfg: &Config, pool: &Pool) {
    let (up, total) = pool.up_count();
    tracing::info!(
        policy = %cfg.balance.policy,
        engineio_path = %cfg.engineio.path,
        sticky = cfg.engineio.sticky,
        workers_ready = up,
        workers_not_ready = total - up,
        "corral ready"
    );
    crate::notify::notify(&format!("READY=1\nSTATUS={up} of {total} workers ready"));
}

/// Says "corral ready" once at least one supervised worker is ready: before that,
/// every request would fail, and orchestrators and scripts read the line as ready.
async fn say_ready(pool: Arc<Pool>, cfg: Arc<Config>, stop: tokio_util::sync::CancellationToken) {
    let mut warned = false;
    loop {
        let (up, total) = pool.up_count();
        if up > 0 {
            announce_ready(&cfg, &pool);
            return;
        }
        if !warned {
            tracing::warn!(
                workers_not_ready = total,
                "no worker is ready yet: not ready to serve; retrying"
            );
            warned = true;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// What owns the client connections of the accept loops.
struct Conns {
    /// Drains them at shutdown.
    graceful: Arc<GracefulShutdown>,
    /// Their tasks, awaited at shutdown.
    tasks: tokio_util::task::TaskTracker,
    /// `limits.max_connections`.
    slots: Arc<Semaphore>,
}

async fn accept_loop(
    listener: TcpListener,
    kind: Kind,
    proxy: Arc<Proxy>,
    conns: Conns,
    mut stop: watch::Receiver<bool>,
) {
    let Conns {
        graceful,
        tasks,
        slots,
    } = conns;
    let cfg = proxy.cfg.clone();
    let trusted = cfg.trusted();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.timeouts.header_read)
        .max_buf_size(cfg.limits.max_header.max(8192) as usize)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(cfg.limits.max_header.min(u32::MAX as u64) as u32);
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
            _ = stop.changed() => return,
        };
        // The slot is taken after the accept: a loop that waited for a slot first
        // would hold it while its socket (SO_REUSEPORT, one per thread) got nothing,
        // and the connections the kernel gave another thread would wait on it. While
        // this connection waits for a slot, this thread accepts no other.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = stop.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        let addr = normalise(addr);
        let peer = Peer {
            addr,
            scheme: if matches!(kind, Kind::Tls(_)) {
                "https"
            } else {
                "http"
            },
            trusted: trusted.iter().any(|c| c.contains(addr.ip())),
            redirect_https: match kind {
                Kind::Redirect(port) => Some(port),
                _ => None,
            },
        };
        let p = proxy.clone();
        let slot = ConnectionSlot(Arc::new(permit));
        let service = service_fn(move |mut req: Request<Incoming>| {
            if is_websocket_upgrade(&req) {
                req.extensions_mut().insert(slot.clone());
            }
            p.clone().handle(req, peer)
        });
        // Made here, before the task: a watcher made after shutdown began would
        // never hear of it (hyper-util's note on `watcher`).
        let watcher = graceful.watcher();
        match &kind {
            Kind::Tls(acceptor) => {
                let acceptor = acceptor.clone();
                let builder = builder.clone();
                let handshake = cfg.timeouts.header_read;
                tasks.spawn(async move {
                    let tls = match tokio::time::timeout(handshake, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %addr, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
                    if let Err(e) = watcher.watch(conn.into_owned()).await {
                        tracing::debug!(error = %e, "client connection ended with an error");
                    }
                });
            }
            _ => {
                let builder = builder.clone();
                tasks.spawn(async move {
                    let conn = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .into_owned();
                    if let Err(e) = watcher.watch(conn).await {
                        tracing::debug!(error = %e, "client connection ended with an error");
                    }
                });
            }
        }
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

/// Handles signals until SIGTERM or SIGINT: SIGHUP rolls the workers, SIGTTIN and
/// SIGTTOU add and remove one (as gunicorn does).
async fn wait_for_stop(
    supervisor: Option<Arc<Supervisor>>,
    certs: Vec<Arc<tls::Certs>>,
    background: &Background,
) -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let watch = |kind: SignalKind| match signal(kind) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, "cannot watch a signal");
            None
        }
    };
    let mut term = watch(SignalKind::terminate());
    let mut int = watch(SignalKind::interrupt());
    let mut hup = watch(SignalKind::hangup());
    let mut ttin = watch(SignalKind::from_raw(libc::SIGTTIN));
    let mut ttou = watch(SignalKind::from_raw(libc::SIGTTOU));
    loop {
        let change: i64 = tokio::select! {
            _ = recv(&mut term) => return "SIGTERM",
            _ = recv(&mut int) => return "SIGINT",
            _ = recv(&mut hup) => 0,
            _ = recv(&mut ttin) => 1,
            _ = recv(&mut ttou) => -1,
        };
        if change == 0 {
            // SIGHUP: new certificates first (open connections keep theirs).
            for c in &certs {
                if let Err(e) = c.reload() {
                    tracing::error!("TLS certificate not reloaded, keeping the old one: {e}");
                }
            }
        }
        let Some(sup) = supervisor.clone() else {
            tracing::warn!("no [workers] to restart or scale; signal ignored");
            continue;
        };
        // Owned by `background`; stopping waits for a change in progress (the
        // supervisor's change lock) and refuses new ones.
        background.spawn(async move {
            let result = if change == 0 {
                sup.rolling_restart().await
            } else {
                let n = sup.count().await as i64 + change;
                sup.scale(n.max(1) as usize).await
            };
            if let Err(e) = result {
                tracing::error!("{e}");
            }
        });
    }
}

async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}
