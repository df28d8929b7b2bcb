//! Running corral: builds the parts from the configuration (pool, router, proxy,
//! broker, supervisor, admin and status listeners, background tasks), starts them in
//! order, and owns the root of the lifetime tree ([`Lives`]) that every task and
//! thread is started in: stop is its drain signal, then a wait for its tasks. It is
//! the only part that knows every other; none of them knows it.

mod parts;
pub mod preflight;
mod queue_watch;
pub mod reload;
pub mod upgrade;

use crate::admin;
use crate::broker;
use crate::config::Config;
use crate::counters::Counters;
use crate::edge::status;
use crate::edge::{listen, tls};
use crate::engineio::router::{self, Router};
use crate::observe::metrics::{self, Queue, Sources};
use crate::proxy::route::{Proxy, Shared};
use crate::runtime::lanes::Lanes;
use crate::runtime::life::Life;
use crate::workers::health;
use crate::workers::pool::Pool;
use crate::workers::supervisor::Supervisor;
use anyhow::Context;
use std::sync::Arc;
use std::time::Duration;

/// Runs corral until SIGTERM or SIGINT; `reread` reads the config again for a
/// reload (None: started without a file).
/// `handover`: what an upgrade carried into this image.
pub async fn run(
    cfg: Config,
    reread: Option<reload::Reread>,
    handover: Option<crate::runtime::handover::Handover>,
) -> anyhow::Result<()> {
    let app = App::start_from(cfg, reread, handover).await?;
    let signal = wait_for_stop(&app).await;
    app.stop(signal).await;
    Ok(())
}

/// The lifetime tree, made once: the order of the stop is written here and nowhere
/// else. At the root's drain signal the listeners stop accepting, connections
/// finish their requests, tunnels send 1001, and the background tasks (health
/// checks, sweeper, sampler, admin socket, status listener, queue watch, signals)
/// end; once the client connections have ended (or the drain period is over) the
/// serving threads stop (cutting what is left), access logs are flushed and the
/// workers are stopped; once the workers are gone, the broker closes.
pub(crate) struct Lives {
    /// The App's: every other is below it, and the tasks that are no one else's.
    pub root: Life,
    /// Accept loops, client connections, tunnels, refused bodies read away.
    pub serving: Life,
    /// The serving threads and the access log writers: until `serving` has ended.
    pub late: Life,
    /// The supervised workers: stopped once `serving` has ended.
    pub workers: Life,
    /// The embedded broker: closed once the workers are gone.
    pub broker: Life,
}

impl Lives {
    fn new(cfg: &Config) -> Lives {
        let root = Life::new();
        let serving = root.part();
        // The drain period, and a second for the tunnels' close frames.
        let drained = cfg.timeouts.shutdown_drain + Duration::from_secs(1);
        let late = root.child_after(&serving, drained);
        let workers = root.child_after(&serving, drained);
        let broker = root.child_after(&workers, stop_grace(cfg) + Duration::from_secs(5));
        Lives {
            root,
            serving,
            late,
            workers,
            broker,
        }
    }

    /// Longest the whole stop may take: each stage's own limit, and a margin.
    fn stop_limit(cfg: &Config) -> Duration {
        cfg.timeouts.shutdown_drain + stop_grace(cfg) * 2 + Duration::from_secs(10)
    }
}

/// How long the workers may take to stop after SIGTERM (none without `[workers]`).
fn stop_grace(cfg: &Config) -> Duration {
    cfg.workers
        .as_ref()
        .map_or(Duration::ZERO, |w| w.stop_grace)
}

/// A running corral: every part built and started, the addresses it is bound to,
/// and the lifetime tree every task it started belongs to. [`App::stop`] drains
/// the tree and waits for it.
pub struct App {
    /// The running parts, once: where it is bound (port 0 in the config: the port
    /// chosen), the gate in force, the listeners, the supervisor, and what a reload
    /// changes (when started from a file).
    live: Arc<reload::Live>,
    admin_path: std::path::PathBuf,
    /// The admin socket's link by config file (`admin::file_link`), when made.
    file_link: Option<std::path::PathBuf>,
    lives: Lives,
}

impl App {
    /// The client listeners' bound addresses, in the config's order.
    pub fn listeners(&self) -> Vec<std::net::SocketAddr> {
        self.live.addresses.listeners.load().to_vec()
    }

    /// The status listener's bound address (`[admin] listen`).
    pub fn status(&self) -> Option<std::net::SocketAddr> {
        **self.live.addresses.status.load()
    }

    /// The embedded message queue's bound address.
    pub fn broker(&self) -> Option<std::net::SocketAddr> {
        self.live.addresses.broker
    }

    /// Builds every part from `cfg`, binds every socket and starts serving: once it
    /// returns, each listener accepts.
    pub async fn start(cfg: Config) -> anyhow::Result<App> {
        App::start_from(cfg, None, None).await
    }

    /// As `start`, with a way to read the config again for `corral reload`, and
    /// what an upgrade carried into this image (its listeners and workers taken
    /// over instead of bound and started).
    pub async fn start_from(
        cfg: Config,
        reread: Option<reload::Reread>,
        handover: Option<crate::runtime::handover::Handover>,
    ) -> anyhow::Result<App> {
        let origin = upgrade::Origin::here();
        let exe = origin.exe().to_path_buf();
        let mut taken = handover.map(upgrade::take).unwrap_or_default();
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
        let lives = Lives::new(&cfg);
        let background = &lives.root;
        let checks: health::Checks = Arc::new(arc_swap::ArcSwap::from_pointee(cfg.health.clone()));
        health::spawn_health_checks(pool.clone(), checks.clone(), background);
        router::spawn_sweeper(router.clone(), Duration::from_secs(2), background);
        let metrics = Arc::new(Counters::default());
        let shared = Shared::new(
            (pool.clone(), router.clone(), metrics.clone()),
            &lives.serving,
        );
        let mut proxy = Proxy::new(cfg.clone(), shared);
        let mut tag_key = None;
        if cfg.engineio.tag_sids {
            let cluster = &cfg.cluster;
            let random = cluster.key.is_none() && cluster.key_file.is_none();
            if random && taken.tag_key.is_none() {
                tracing::warn!(
                    "engineio.tag_sids without cluster.key: a random key, so tagged sessions \
                 will not survive a restart"
                );
            }
            let key = match (random, taken.tag_key.take()) {
                (true, Some(carried)) => carried,
                _ => cluster.signing_key()?,
            };
            tag_key = random.then(|| key.clone());
            let tagger = parts::tagger_for(cluster, key);
            proxy.enable_tags(crate::proxy::route::Tags::new(tagger, cluster));
            tracing::info!(node = %cluster.node, others = cluster.nodes.len(), "sids carry their worker (tagged)");
        }
        let proxy = Arc::new(proxy);
        let front: listen::Front = Arc::new(arc_swap::ArcSwap::from_pointee(parts::gate_for(
            &cfg,
            proxy.clone(),
            background,
            &lives.late,
        )?));
        let current = front.clone();
        background.spawn_until_drained(crate::proxy::route::expire_idle(move || {
            current.load().proxy().clone()
        }));
        if cfg.engineio.tag_sids {
            // Tags stay on or off for corral's life (not a live key); nodes change.
            let current = front.clone();
            background.spawn_until_drained(crate::proxy::route::resolve_nodes(move || {
                current.load().proxy().clone()
            }));
        }
        let slots = listen::Slots::new(cfg.limits.max_connections);

        listen::raise_fd_limit();
        let lanes =
            Lanes::start(cfg.threads.resolve(), &lives.late).context("cannot start threads")?;
        proxy.relay_tunnels_on(lanes.handles());
        let carried_listeners = taken.listeners.len();
        let bound = listen::bind(&cfg, lanes.len(), std::mem::take(&mut taken.listeners))?;
        let listeners = bound.addrs();
        let (queue_url, queue, broker_addr) =
            message_queue(&cfg, &lives.broker, taken.broker.take()).await?;
        let embedded = match &queue {
            Queue::Embedded(b, _) => Some(b.clone()),
            _ => None,
        };
        let clients = std::mem::take(&mut taken.broker_clients);
        let carried_clients = clients.len();
        if let (Some(broker), false) = (&embedded, clients.is_empty()) {
            broker.resume(clients, &lives.broker);
        }
        let reloads = Arc::new(metrics::Reloads::default());
        let sources = Arc::new(Sources {
            counters: metrics.clone(),
            history: Default::default(),
            pool: pool.clone(),
            router: router.clone(),
            queue,
            started: std::time::Instant::now(),
            node: cfg.cluster.node.clone(),
            reloads: reloads.clone(),
            upgrades: Default::default(),
        });
        metrics::spawn_sampler(sources.clone(), background);
        let status_listener = match &cfg.admin {
            Some(admin_cfg) => {
                let auth = parts::admin_auth(admin_cfg)?;
                let carried = taken
                    .status
                    .take()
                    .filter(|s| upgrade::fits(s, admin_cfg.listen));
                let l = match carried {
                    Some(socket) => {
                        let socket = status::inherited(socket, admin_cfg.listen)?;
                        status::start(socket, sources.clone(), auth, background)
                    }
                    None => {
                        status::serve(admin_cfg.listen, sources.clone(), auth, background).await?
                    }
                };
                parts::say_status(l.addr);
                Some(l)
            }
            None => None,
        };
        let status_addr = status_listener.as_ref().map(|l| l.addr);
        let supervisor = cfg.workers.clone().map(|spec| {
            let env = queue_env(queue_url.as_deref(), &spec.env);
            Arc::new(Supervisor::new(
                spec,
                pool.clone(),
                env,
                lives.workers.clone(),
            ))
        });
        if let Some(sup) = &supervisor {
            stop_workers_in_turn(sup.clone(), &lives);
        }
        if let (Some(broker), Some(_)) = (embedded, &supervisor) {
            let grace = cfg.message_queue.unsubscribed_grace;
            background.spawn_until_drained(queue_watch::watch(broker, pool.clone(), grace));
        }
        let admin_path = parts::admin_path(&cfg);
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let addresses = admin::Addresses {
            listeners: Arc::new(arc_swap::ArcSwap::from_pointee(listeners.clone())),
            status: Arc::new(arc_swap::ArcSwap::from_pointee(status_addr)),
            broker: broker_addr,
            ready: ready.clone(),
            upgrading: Default::default(),
            image: image(&origin),
        };
        let serving = bound.serve(&lanes, &lives.serving, front.clone(), slots.clone());
        let from_file = reread.is_some();
        let live = Arc::new(reload::Live {
            reread,
            current: tokio::sync::Mutex::new(cfg.clone()),
            front: front.clone(),
            slots: slots.clone(),
            pool: pool.clone(),
            router: router.clone(),
            checks: checks.clone(),
            supervisor: supervisor.clone(),
            serving: serving.clone(),
            status: std::sync::Mutex::new(status_listener),
            sources: sources.clone(),
            addresses: addresses.clone(),
            root: background.clone(),
            late: lives.late.clone(),
            reloads,
        });
        let upgrader = upgrade::Upgrader {
            origin,
            live: live.clone(),
            serving: lives.serving.clone(),
            root: lives.root.clone(),
            tag_key,
            begun: Default::default(),
            admin: Default::default(),
        };
        let admin_socket = upgrader.admin.clone();
        let targets = admin::Targets {
            supervisor: supervisor.clone(),
            reload: from_file.then(|| live.clone() as Arc<dyn admin::Reload>),
            upgrade: Some(Arc::new(upgrader)),
        };
        let carried = taken.admin.take();
        let admin = admin::serve(&admin_path, targets, addresses.clone(), background, carried);
        if let Some(fd) = admin.await? {
            let _ = admin_socket.set(fd);
        }
        let file_link = cfg
            .file
            .as_deref()
            .and_then(|f| parts::link_admin(f, &admin_path));
        if std::process::id() == 1 {
            tracing::info!("running as PID 1: reaping orphaned processes");
            background.spawn_until_drained(crate::workers::supervisor::reap_orphans(pool.clone()));
        }
        let carried_workers = taken.workers.len();
        let adopted = std::mem::take(&mut taken.workers);
        match &supervisor {
            Some(sup) => {
                sup.start_with(adopted, taken.next_index).await;
                // More carried than the config now asks for: the newest go, served
                // out, after the start.
                let wanted = sup.spec().count.resolve();
                if carried_workers > wanted {
                    let sup = sup.clone();
                    background.spawn(async move { sup.scale(wanted).await });
                }
            }
            None => crate::workers::supervisor::stop_unwanted(adopted),
        }
        // Before the first request: the sessions' workers are up by now.
        let sessions = router.adopt(std::mem::take(&mut taken.sessions));
        let hold = || -> Box<dyn Send + Sync> {
            match slots.try_take() {
                Ok(slot) => Box::new(slot),
                Err(_) => Box::new(()),
            }
        };
        let tunnels = proxy.resume_tunnels(std::mem::take(&mut taken.tunnels), hold);
        let connections = serving.resume(std::mem::take(&mut taken.connections));
        let carried = [
            ("listeners", carried_listeners),
            ("workers", carried_workers),
            ("sessions", sessions),
            ("tunnels", tunnels),
            ("connections", connections),
            ("message queue clients", carried_clients),
        ];
        if let Some(records) = taken.record(&carried, &exe) {
            say_upgraded(records.last());
            *sources.upgrades.lock().unwrap_or_else(|e| e.into_inner()) = records;
        }
        serving.describe();
        describe_workers(&pool);
        if supervisor.is_some() {
            background.spawn_until_drained(say_ready(pool.clone(), cfg.clone(), ready));
        } else {
            announce_ready(&cfg, &pool, &ready);
        }

        serving.start_accepting();
        Ok(App {
            admin_path,
            file_link,
            live,
            lives,
        })
    }

    /// Shuts down (`signal` names why, for the log): the lifetime tree's drain
    /// signal, then a wait for every task in it (see [`Lives`] for the order).
    /// Returns how many tasks and threads were still running when it gave up on
    /// them (0: every one ended).
    pub async fn stop(self, signal: &str) -> usize {
        let cfg = self.live.front.load().cfg().clone();
        crate::runtime::notify::notify("STOPPING=1\nSTATUS=stopping");
        tracing::info!(
            signal,
            "stopping: no new connections, finishing requests in flight"
        );
        let serving = self.lives.serving.clone();
        let drain = cfg.timeouts.shutdown_drain;
        // Said once the client connections' stage is over, in time or not.
        self.lives.root.spawn(async move {
            serving.draining().await;
            if tokio::time::timeout(drain, serving.ended()).await.is_err() {
                tracing::warn!(
                    ?drain,
                    open = serving.running(),
                    "requests or tunnels still open after the drain period; closing"
                );
            }
        });
        let left = self.lives.root.stop(Lives::stop_limit(&cfg)).await;
        if left > 0 {
            tracing::warn!(left, "tasks still running when the stop gave up on them");
        }
        let _ = std::fs::remove_file(&self.admin_path);
        if let Some(link) = &self.file_link {
            // Only ours: another corral from the same file may have taken it since.
            if std::fs::read_link(link).is_ok_and(|to| to == self.admin_path) {
                let _ = std::fs::remove_file(link);
            }
        }
        left
    }
}

/// The log's line for an upgrade this image took over from.
fn say_upgraded(record: Option<&crate::runtime::handover::Record>) {
    let Some(r) = record else { return };
    let list = |m: &std::collections::BTreeMap<String, u64>| {
        let parts: Vec<String> = m.iter().map(|(k, n)| format!("{n} {k}")).collect();
        match parts.is_empty() {
            true => "nothing".to_string(),
            false => parts.join(", "),
        }
    };
    tracing::info!(
        from = %r.from,
        to = %r.to,
        binary = %r.binary,
        carried = %list(&r.carried),
        closed = %list(&r.closed),
        "upgraded in place"
    );
}

/// This image as `addresses` tells it.
fn image(origin: &upgrade::Origin) -> admin::Image {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    admin::Image {
        version: upgrade::VERSION.into(),
        started_ms: since.map_or(0, |d| d.as_millis() as u64),
        pid: std::process::id(),
        exe: origin.exe().to_path_buf(),
    }
}

/// The supervisor's part of the stop: at the signal no restart, rolling restart or
/// scale starts (one in progress finishes); once the client connections have ended
/// the workers are stopped (SIGTERM, SIGKILL after the grace).
fn stop_workers_in_turn(sup: Arc<Supervisor>, lives: &Lives) {
    let (signal, own) = (lives.root.draining(), lives.workers.draining());
    lives.workers.spawn(async move {
        signal.await;
        sup.begin_stop();
        own.await;
        sup.stop_all().await;
        tracing::info!("every worker stopped");
    });
}

/// Starts the embedded broker if configured; returns the queue URL for the workers.
/// `carried`: the broker's socket an upgrade carried over, taken where the config
/// still asks for it (the same address, or any for port 0).
async fn message_queue(
    cfg: &Config,
    owner: &Life,
    carried: Option<std::net::TcpListener>,
) -> anyhow::Result<(Option<String>, Queue, Option<std::net::SocketAddr>)> {
    let mq = &cfg.message_queue;
    if !cfg.embedded_broker() {
        return Ok(match &mq.url {
            Some(url) => {
                tracing::info!(url = %redact(url), "message queue: external");
                (Some(url.clone()), Queue::External(redact(url)), None)
            }
            None => (None, Queue::None, None),
        });
    }
    let settings = broker::Settings::from_config(mq);
    let (broker, addr) = match carried.filter(|s| upgrade::fits(s, mq.listen)) {
        Some(socket) => broker::start_on(socket, settings, owner)?,
        None => broker::start(mq.listen, settings, owner).await?,
    };
    let url = broker::url_for(addr, mq.password.as_deref());
    tracing::info!(%addr, "message queue: embedded broker listening");
    Ok((
        Some(url.clone()),
        Queue::Embedded(broker, redact(&url)),
        Some(addr),
    ))
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

fn describe_workers(pool: &Pool) {
    for w in pool.workers() {
        tracing::info!(
            worker = w.id,
            pid = w.process.pid(),
            addr = %w.addr,
            state = w.state().name(),
            managed = w.managed,
            "worker"
        );
    }
}

/// "corral ready", with how many workers are not.
fn announce_ready(cfg: &Config, pool: &Pool, ready: &std::sync::atomic::AtomicBool) {
    ready.store(true, std::sync::atomic::Ordering::Relaxed);
    let (up, total) = pool.up_count();
    tracing::info!(
        policy = %cfg.balance.policy,
        engineio_path = %cfg.engineio.path,
        sticky = cfg.engineio.sticky,
        workers_ready = up,
        workers_not_ready = total - up,
        "corral ready"
    );
    crate::runtime::notify::notify(&format!("READY=1\nSTATUS={up} of {total} workers ready"));
}

/// Says "corral ready" once at least one supervised worker is ready: before that,
/// every request would fail, and orchestrators and scripts read the line as ready.
async fn say_ready(pool: Arc<Pool>, cfg: Arc<Config>, ready: Arc<std::sync::atomic::AtomicBool>) {
    let mut warned = false;
    loop {
        let (up, total) = pool.up_count();
        if up > 0 {
            announce_ready(&cfg, &pool, &ready);
            return;
        }
        if !warned {
            tracing::warn!(
                workers_not_ready = total,
                "no worker is ready yet: not ready to serve; retrying"
            );
            warned = true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Handles signals until SIGTERM or SIGINT: SIGHUP reloads the config and rolls
/// the workers (gunicorn's HUP), SIGUSR2 reloads the config and keeps them, SIGTTIN
/// and SIGTTOU add and remove a worker (as gunicorn does).
async fn wait_for_stop(app: &App) -> &'static str {
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
    let mut usr2 = watch(SignalKind::user_defined2());
    let mut ttin = watch(SignalKind::from_raw(libc::SIGTTIN));
    let mut ttou = watch(SignalKind::from_raw(libc::SIGTTOU));
    // Handled from here on: what came during an upgrade's exec was held (blocked).
    crate::runtime::forker::unblock_signals();
    loop {
        let change = tokio::select! {
            _ = recv(&mut term) => return "SIGTERM",
            _ = recv(&mut int) => return "SIGINT",
            _ = recv(&mut hup) => Change::Reload { keep_workers: false },
            _ = recv(&mut usr2) => Change::Reload { keep_workers: true },
            _ = recv(&mut ttin) => Change::Scale(1),
            _ = recv(&mut ttou) => Change::Scale(-1),
        };
        // Owned by `background`; stopping waits for a change in progress (the
        // supervisor's change lock) and refuses new ones.
        let (live, sup, certs) = (
            app.live.reread.is_some().then(|| app.live.clone()),
            app.live.supervisor.clone(),
            app.live.serving.certs(),
        );
        app.lives.root.spawn(async move {
            if let Err(e) = change.apply(live, sup, certs).await {
                tracing::error!("{e}");
            }
        });
    }
}

/// What a signal asks for.
#[derive(Clone, Copy)]
enum Change {
    Reload { keep_workers: bool },
    Scale(i64),
}

impl Change {
    async fn apply(
        self,
        live: Option<Arc<reload::Live>>,
        supervisor: Option<Arc<Supervisor>>,
        certs: Vec<Arc<tls::Certs>>,
    ) -> Result<(), String> {
        match (self, live, supervisor) {
            // The outcome is logged by the reload itself, once.
            (Change::Reload { keep_workers }, Some(live), _) => {
                let _ = live.reload(keep_workers).await;
                Ok(())
            }
            (Change::Reload { keep_workers }, None, sup) => {
                // Started without a file: new certificates, and the workers rolled.
                for c in &certs {
                    if let Err(e) = c.reload() {
                        tracing::error!("TLS certificate not reloaded, keeping the old one: {e}");
                    }
                }
                match (keep_workers, sup) {
                    (false, Some(sup)) => sup.rolling_restart().await.map_err(|e| e.to_string()),
                    _ => Ok(()),
                }
            }
            (Change::Scale(_), _, None) => Err("no [workers] to scale; signal ignored".to_string()),
            (Change::Scale(by), _, Some(sup)) => {
                let n = sup.count().await as i64 + by;
                sup.scale(n.max(1) as usize)
                    .await
                    .map_err(|e| e.to_string())
            }
        }
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
