//! The supervisor: starts the worker processes from the command template, waits until
//! each answers HTTP, restarts crashed ones with exponential backoff, replaces them
//! one at a time on a rolling restart (draining the old one), scales up and down, and
//! stops them all, process group and all, when corral stops. At an upgrade it holds
//! them (no change, no new process) and writes them down; the new image adopts
//! them by pid, with their output pipes.
//!
//! It owns processes and ports. It tells the pool about worker state through the
//! pool's small interface (`add`, `set_ready`, `process_exited`, `drain`, `retire`)
//! and never touches sessions: the router voids a dead worker's sessions by itself.

use crate::config::{WorkerCommand, Workers};
use crate::runtime::handover;
use crate::workers::health;
use crate::workers::pool::{Pool, Worker};
use crate::workers::procs;
use std::collections::VecDeque;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, OwnedFd};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// Why a worker did not start or a change to the workers did not happen.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The command could not be run.
    #[error("cannot start `{command}`{}: {cause}{hint}", in_dir(.cwd))]
    Spawn {
        /// The command, as it was run (its port filled in).
        command: String,
        /// The directory it was to start in.
        cwd: Option<std::path::PathBuf>,
        /// What the system said.
        cause: std::io::Error,
        /// What that likely means here.
        hint: String,
    },
    /// It did not answer HTTP in time.
    #[error("not ready within {within:?}: {probe}; last output:\n{output}")]
    NotReady {
        /// `workers.start_timeout`.
        within: Duration,
        /// What was asked of it, and what answered last.
        probe: String,
        /// The last lines it printed.
        output: String,
    },
    /// It exited.
    #[error("exited ({status}) after {ran:?}; last output:\n{output}")]
    Exited {
        /// Its exit status.
        status: String,
        /// How long it ran.
        ran: Duration,
        /// The last lines it printed.
        output: String,
    },
    /// The task that keeps the worker running ended before telling.
    #[error("keeper ended")]
    KeeperEnded,
    /// corral is stopping, so nothing new starts.
    #[error("corral is stopping: {0}")]
    Stopping(&'static str),
    /// A stop signal came in the middle of a rolling restart.
    #[error("rolling restart cut short: corral is stopping")]
    CutShort,
    /// A replacement worker of a rolling restart did not get ready.
    #[error("replacement for worker {index} not ready: {cause}")]
    Replacement {
        /// The worker being replaced.
        index: usize,
        /// Why its replacement failed.
        cause: Box<Error>,
    },
    /// `corral scale` asked for an impossible count.
    #[error("worker count must be between 1 and 1024 (asked: {0})")]
    BadCount(usize),
}

/// Output lines kept per worker to explain a failed start.
const TAIL_LINES: usize = 20;
/// Longest output line forwarded; longer ones are cut.
const MAX_LINE: usize = 16 * 1024;
/// A worker that ran this long before exiting restarts without backoff.
const STABLE_RUN: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// One supervised process slot: the worker it serves as, and its keeper task.
struct Slot {
    index: usize,
    worker: Arc<Worker>,
    stop: watch::Sender<bool>,
    keeper: JoinHandle<()>,
    /// Its process's output pipes, as an upgrade carries them.
    pipes: Pipes,
}

/// The read ends of a worker's stdout and stderr (other descriptors of the pipes
/// its output is forwarded from), set by its keeper at each start.
type Pipes = Arc<Mutex<Vec<OwnedFd>>>;

/// An upgrade's hold on the workers: no change to them and no process started.
pub struct Hold {
    frozen: Arc<std::sync::atomic::AtomicBool>,
    _changes: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.frozen.store(false, Ordering::Release);
    }
}

/// A worker an upgrade carried over, for its slot in the new image.
pub struct Adopted {
    /// Its id in the pool (the tag its sessions' sids carry).
    pub id: usize,
    /// Its slot's index.
    pub index: usize,
    /// Its port.
    pub port: u16,
    /// Its process, still running (None: it was between a crash and its restart).
    pub pid: Option<u32>,
    /// How often it was restarted.
    pub restarts: u64,
    /// Its stdout and stderr pipes' read ends.
    pub output: Vec<OwnedFd>,
}

/// The `[workers]` table in force; a config reload replaces it, and every start of
/// a process reads it then.
type Spec = Arc<arc_swap::ArcSwap<Workers>>;

pub struct Supervisor {
    spec: Spec,
    pool: Arc<Pool>,
    extra_env: Vec<(String, String)>,
    slots: tokio::sync::Mutex<Vec<Slot>>,
    next_index: AtomicUsize,
    /// Serialises starting, rolling restarts, scaling and stopping.
    changes: Arc<tokio::sync::Mutex<()>>,
    /// Set by `stop_all` under `changes`: nothing starts after it.
    stopped: std::sync::atomic::AtomicBool,
    /// An upgrade holds the workers ([`Hold`]): keepers start no process.
    frozen: Arc<std::sync::atomic::AtomicBool>,
    /// Owns the keepers (each worker's task): the workers' lifetime.
    life: crate::runtime::life::Life,
    /// The last exit whose output the log showed, of any worker.
    shown: Shown,
}

/// What `status` reports per worker.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkerStatus {
    pub id: usize,
    pub index: usize,
    pub pid: Option<u32>,
    pub port: u16,
    pub state: &'static str,
    pub sessions: usize,
    pub inflight: usize,
    pub restarts: u64,
    /// Holds a subscription on the embedded message queue (None: not known).
    pub mq_subscribed: Option<bool>,
}

impl Supervisor {
    /// A supervisor whose keepers are tasks of `life`.
    pub fn new(
        spec: Workers,
        pool: Arc<Pool>,
        extra_env: Vec<(String, String)>,
        life: crate::runtime::life::Life,
    ) -> Supervisor {
        Supervisor {
            spec: Arc::new(arc_swap::ArcSwap::from_pointee(spec)),
            pool,
            extra_env,
            slots: tokio::sync::Mutex::new(Vec::new()),
            next_index: AtomicUsize::new(0),
            changes: Arc::new(tokio::sync::Mutex::new(())),
            stopped: std::sync::atomic::AtomicBool::new(false),
            frozen: Default::default(),
            life,
            shown: Shown::default(),
        }
    }

    /// The `[workers]` table in force.
    pub fn spec(&self) -> Arc<Workers> {
        self.spec.load_full()
    }

    /// Puts a reloaded `[workers]` table in force: processes started from now on
    /// (replacements, restarts after a crash, new ones) run by it.
    pub fn set_spec(&self, spec: Workers) {
        self.spec.store(Arc::new(spec));
    }

    fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Starts the configured number of workers and waits (up to the start timeout)
    /// for each to be ready. Workers that fail keep being retried in the background.
    pub async fn start(&self) {
        self.start_with(Vec::new(), 0).await
    }

    /// As `start`, the workers an upgrade carried over taken first: their
    /// processes go on, watched as before; the count is made up with new ones.
    pub async fn start_with(&self, adopted: Vec<Adopted>, next_index: usize) {
        self.next_index.fetch_max(next_index, Ordering::Relaxed);
        let _change = self.changes.lock().await;
        if self.is_stopped() {
            return;
        }
        let mut waiting = Vec::new();
        let carried = adopted.len();
        for a in adopted {
            self.next_index.fetch_max(a.index + 1, Ordering::Relaxed);
            waiting.push(self.start_slot(Some(a)).await);
        }
        for _ in carried..self.spec().count.resolve() {
            waiting.push(self.start_slot(None).await);
        }
        wait_started(waiting).await;
    }

    /// For an upgrade: no change to the workers starts while the hold lasts (one in
    /// progress finishes first), and no keeper starts a process (a crashed worker
    /// waits for the new image to start it again). The caller holds it until the
    /// exec; dropped before, all goes on as before.
    pub async fn hold(&self) -> Hold {
        let guard = self.changes.clone().lock_owned().await;
        self.frozen.store(true, Ordering::Release);
        Hold {
            frozen: self.frozen.clone(),
            _changes: guard,
        }
    }

    /// For an upgrade, under its [`Hold`], just before the exec: each slot's worker
    /// written down, its output pipes given to `carried`; and the next slot's index.
    pub async fn carry(
        &self,
        carried: &mut handover::Carried,
    ) -> std::io::Result<(Vec<handover::Worker>, usize)> {
        let slots = self.slots.lock().await;
        let mut workers = Vec::with_capacity(slots.len());
        for s in slots.iter() {
            let pipes = s.pipes.lock().unwrap_or_else(|e| e.into_inner());
            let output = carried.dup_all(&pipes)?;
            workers.push(handover::Worker {
                id: s.worker.id,
                index: s.index,
                port: s.worker.addr.port(),
                pid: s.worker.process.pid(),
                restarts: s.worker.process.restarts(),
                output,
            });
        }
        Ok((workers, self.next_index.load(Ordering::Relaxed)))
    }

    /// Starts `n` workers at once and waits until each is ready or has failed its
    /// start; those that failed keep being retried by their keepers.
    async fn add_workers(&self, n: usize) {
        let mut waiting = Vec::new();
        for _ in 0..n {
            waiting.push(self.start_slot(None).await);
        }
        wait_started(waiting).await;
    }

    /// Starts one more worker; the receiver tells when it is first ready (or why not).
    async fn start_slot(
        &self,
        adopted: Option<Adopted>,
    ) -> (usize, oneshot::Receiver<Result<(), Error>>) {
        let mut slots = self.slots.lock().await;
        let (index, port, id) = match &adopted {
            Some(a) => (a.index, a.port, Some(a.id)),
            None => {
                let index = self.next_index.fetch_add(1, Ordering::Relaxed);
                (index, self.pick_port(&slots), None)
            }
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let worker = self.pool.add_as(addr, true, id);
        let (stop, stop_rx) = watch::channel(false);
        let (ready_tx, ready_rx) = oneshot::channel();
        let pipes = Pipes::default();
        let charge = Charge {
            worker: worker.clone(),
            index,
            adopted,
            pipes: pipes.clone(),
            frozen: self.frozen.clone(),
        };
        let keeper = self.life.spawn(keep(
            self.spec.clone(),
            (self.pool.clone(), self.shown.clone()),
            charge,
            self.extra_env.clone(),
            stop_rx,
            ready_tx,
        ));
        slots.push(Slot {
            index,
            worker,
            stop,
            keeper,
            pipes,
        });
        (index, ready_rx)
    }

    fn pick_port(&self, slots: &[Slot]) -> u16 {
        let used: Vec<u16> = slots.iter().map(|s| s.worker.addr.port()).collect();
        if let Some(base) = self.spec().base_port {
            let mut p = base;
            while used.contains(&p) || !port_free(p) {
                p = p.wrapping_add(1).max(1);
            }
            return p;
        }
        // The kernel's choice of a free port; the worker binds it right after. A port
        // just handed to another slot is still free until that worker binds it, and
        // the kernel may offer it again: two workers on one port would both look
        // ready through the one that got it.
        for _ in 0..100 {
            let port = TcpListener::bind(("127.0.0.1", 0))
                .and_then(|l| l.local_addr())
                .map_or(0, |a| a.port());
            if port != 0 && !used.contains(&port) {
                return port;
            }
        }
        0
    }

    /// Replaces every worker, one at a time: start the new one, wait until ready, move
    /// traffic to it, drain the old one (bounded), stop it.
    pub async fn rolling_restart(&self) -> Result<(), Error> {
        let _change = self.changes.lock().await;
        if self.is_stopped() {
            return Err(Error::Stopping("no rolling restart"));
        }
        crate::runtime::notify::reloading("rolling restart");
        let result = self.replace_all().await;
        if !self.is_stopped() {
            let n = self.slots.lock().await.len();
            crate::runtime::notify::notify(&format!(
                "READY=1\nSTATUS={n} workers after a rolling restart"
            ));
        }
        result
    }

    /// The steps of a rolling restart (the change lock held by the caller).
    async fn replace_all(&self) -> Result<(), Error> {
        let old: Vec<usize> = self.slots.lock().await.iter().map(|s| s.index).collect();
        tracing::info!(workers = old.len(), "rolling restart");
        for index in old {
            if self.is_stopped() {
                return Err(Error::CutShort);
            }
            let (new_index, ready) = self.start_slot(None).await;
            if let Err(e) = ready.await.unwrap_or(Err(Error::KeeperEnded)) {
                self.stop_slot(new_index, false).await;
                return Err(Error::Replacement {
                    index,
                    cause: Box::new(e),
                });
            }
            self.stop_slot(index, true).await;
            tracing::info!(old = index, new = new_index, "worker replaced");
        }
        Ok(())
    }

    /// Brings the number of workers to `n`: new ones started, the newest stopped.
    pub async fn scale(&self, n: usize) -> Result<(), Error> {
        if n == 0 || n > 1024 {
            return Err(Error::BadCount(n));
        }
        let _change = self.changes.lock().await;
        if self.is_stopped() {
            return Err(Error::Stopping("not scaling"));
        }
        let current = self.slots.lock().await.len();
        if n > current {
            self.add_workers(n - current).await;
        } else {
            let extra: Vec<usize> = self.slots.lock().await[n..]
                .iter()
                .map(|s| s.index)
                .collect();
            for index in extra.into_iter().rev() {
                self.stop_slot(index, true).await;
            }
        }
        tracing::info!(workers = n, "scaled");
        Ok(())
    }

    pub async fn count(&self) -> usize {
        self.slots.lock().await.len()
    }

    /// Stops one worker; with `drain`, it first serves out its sessions and requests
    /// (up to the drain timeout) while getting nothing new.
    async fn stop_slot(&self, index: usize, drain: bool) {
        let slot = {
            let mut slots = self.slots.lock().await;
            match slots.iter().position(|s| s.index == index) {
                Some(i) => slots.remove(i),
                None => return,
            }
        };
        if drain {
            self.drain_slot(&slot.worker).await;
        }
        // Nothing of corral's may keep the process waiting: a gevent gunicorn waits
        // its whole graceful timeout for an idle keep-alive connection.
        self.pool.leave(&slot.worker);
        let _ = slot.stop.send(true);
        let _ = slot.keeper.await;
        self.pool.retire(&slot.worker);
    }

    /// Serves out a worker about to be stopped (`Pool::serve_out`).
    async fn drain_slot(&self, w: &Worker) {
        let spec = self.spec();
        self.pool
            .serve_out(w, spec.drain_timeout, spec.close_spread)
            .await;
    }

    /// Stops every worker: SIGTERM to each process group, SIGKILL after the grace.
    /// A rolling restart or scale in progress finishes first, and none starts after.
    /// Shutdown has begun (the signal came): a rolling restart in progress replaces
    /// no further worker, and no restart or scale starts from now on. The workers
    /// keep serving until `stop_all`.
    pub fn begin_stop(&self) {
        self.stopped.store(true, Ordering::Release);
    }

    pub async fn stop_all(&self) {
        self.begin_stop();
        let _change = self.changes.lock().await;
        let slots: Vec<Slot> = std::mem::take(&mut *self.slots.lock().await);
        for s in &slots {
            self.pool.leave(&s.worker);
            let _ = s.stop.send(true);
        }
        for s in slots {
            let _ = s.keeper.await;
            self.pool.retire(&s.worker);
        }
    }

    pub async fn status(&self) -> Vec<WorkerStatus> {
        self.slots
            .lock()
            .await
            .iter()
            .map(|s| WorkerStatus {
                id: s.worker.id,
                index: s.index,
                pid: s.worker.process.pid(),
                port: s.worker.addr.port(),
                state: s.worker.state().name(),
                sessions: s.worker.sessions(),
                inflight: s.worker.inflight(),
                restarts: s.worker.process.restarts(),
                mq_subscribed: s.worker.process.mq_subscribed(),
            })
            .collect()
    }
}

/// Workers an upgrade carried into an image whose config has no `[workers]`: each
/// process group is asked to stop (SIGTERM), and reaped when it has.
pub fn stop_unwanted(adopted: Vec<Adopted>) {
    for a in adopted {
        let Some(pid) = a.pid else { continue };
        tracing::info!(
            worker = a.index,
            pid,
            "worker carried over but no longer configured: stopping it"
        );
        kill_group(Some(pid), libc::SIGTERM);
        tokio::spawn(async move {
            let _ = Proc::Adopted(pid).wait().await;
        });
    }
}

/// Waits until each started worker is ready or has failed its start; those that
/// failed keep being retried by their keepers.
async fn wait_started(waiting: Vec<(usize, oneshot::Receiver<Result<(), Error>>)>) {
    for (index, ready) in waiting {
        if ready.await.unwrap_or(Err(Error::KeeperEnded)).is_err() {
            // Why was logged as it happened, with the worker's output.
            tracing::error!(
                worker = index,
                "worker not ready; retrying in the background"
            );
        }
    }
}

fn port_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// How the start of a watched process ended.
enum Start {
    Ready,
    NotReady(String),
    Exited(std::io::Result<std::process::ExitStatus>),
    Stop,
}

/// How a watched process's life ended.
enum End {
    NotReady(String),
    Exited(std::io::Result<std::process::ExitStatus>),
    Stop,
}

/// What one keeper keeps: its worker and slot, and a process an upgrade carried.
struct Charge {
    worker: Arc<Worker>,
    index: usize,
    adopted: Option<Adopted>,
    pipes: Pipes,
    frozen: Arc<std::sync::atomic::AtomicBool>,
}

/// Keeps one worker process running until told to stop.
async fn keep(
    specs: Spec,
    (pool, shown): (Arc<Pool>, Shown),
    charge: Charge,
    extra_env: Vec<(String, String)>,
    mut stop: watch::Receiver<bool>,
    ready_tx: oneshot::Sender<Result<(), Error>>,
) {
    let Charge {
        worker,
        index,
        mut adopted,
        pipes,
        frozen,
    } = charge;
    let mut ready_tx = Some(ready_tx);
    let mut backoff = FIRST_BACKOFF;
    let port = worker.addr.port();
    let mut failures = Failures::default();
    if let Some(a) = &adopted {
        worker.process.set_restarts(a.restarts);
    }
    loop {
        if *stop.borrow() {
            return;
        }
        let spec = specs.load_full();
        pool.set_starting(&worker);
        let output = Output::new(failures.in_a_row > 0);
        let carried = adopted.take().and_then(|a| adopt(a, index, &output));
        // An upgrade under way: the new image starts it.
        while carried.is_none() && frozen.load(Ordering::Acquire) {
            if sleep_or_stop(&mut stop, FIRST_BACKOFF).await {
                return;
            }
        }
        let started = match carried {
            Some(carried) => Ok(carried),
            None => spawn(&spec, port, index, &extra_env, &output).await,
        };
        let Spawned {
            mut child,
            output: mut forwarding,
            pipes: read_ends,
        } = match started {
            Ok(c) => c,
            Err(e) => {
                let msg = spawn_error(&spec, port, index, e);
                failures.in_a_row += 1;
                tracing::error!(worker = index, failures = failures.in_a_row, "{msg}");
                if let Some(tx) = ready_tx.take() {
                    let _ = tx.send(Err(msg));
                }
                if sleep_or_stop(&mut stop, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(spec.backoff_max);
                continue;
            }
        };
        *pipes.lock().unwrap_or_else(|e| e.into_inner()) = read_ends;
        let pid = child.id();
        worker.process.set_pid(pid);
        tracing::info!(worker = index, pid, port, "worker started");
        let started = Instant::now();

        let start = tokio::select! {
            ready = wait_ready(worker.addr, &spec.ready_path, spec.start_timeout, pid) => {
                match ready {
                    Ok(()) => Start::Ready,
                    Err(probe) => Start::NotReady(probe),
                }
            }
            status = exited_then_wait(&mut child, pid) => Start::Exited(status),
            _ = stop.changed() => Start::Stop,
        };
        let end = match start {
            Start::Ready => {
                pool.set_ready(&worker);
                tracing::info!(worker = index, pid, port, "worker ready");
                if let Some(tx) = ready_tx.take() {
                    let _ = tx.send(Ok(()));
                }
                tokio::select! {
                    status = exited_then_wait(&mut child, pid) => End::Exited(status),
                    _ = stop.changed() => End::Stop,
                }
            }
            Start::NotReady(probe) => End::NotReady(probe),
            Start::Exited(status) => End::Exited(status),
            Start::Stop => End::Stop,
        };
        let msg = match end {
            End::Stop => {
                terminate(&mut child, spec.stop_grace).await;
                finish_output(&mut forwarding).await;
                pool.process_exited(&worker);
                return;
            }
            End::NotReady(probe) => {
                terminate(&mut child, spec.stop_grace).await;
                finish_output(&mut forwarding).await;
                Error::NotReady {
                    within: spec.start_timeout,
                    probe,
                    output: output.tail_text(),
                }
            }
            End::Exited(status) => {
                // What the process left in its group went with it (exited_then_wait).
                finish_output(&mut forwarding).await;
                Error::Exited {
                    status: status.map_or_else(|e| e.to_string(), |s| s.to_string()),
                    ran: started.elapsed(),
                    output: output.tail_text(),
                }
            }
        };
        if started.elapsed() >= STABLE_RUN {
            backoff = FIRST_BACKOFF;
            failures = Failures::default();
        }
        report(index, pid, &msg, &output, &mut failures, &shown);
        if let Some(tx) = ready_tx.take() {
            let _ = tx.send(Err(msg));
        }
        pool.process_exited(&worker);
        worker.process.count_restart();
        tracing::warn!(worker = index, ?backoff, "restarting worker");
        if sleep_or_stop(&mut stop, backoff).await {
            return;
        }
        backoff = (backoff * 2).min(spec.backoff_max);
    }
}

/// Sleeps, or returns true at once when told to stop.
async fn sleep_or_stop(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

/// Polls until the worker answers HTTP (any status, or 2xx/3xx on `ready_path`) on
/// a socket that a process of its own group listens on: another process that took
/// the port meanwhile does not make it ready. Not ready in time: what was probed,
/// and what answered last.
async fn wait_ready(
    addr: SocketAddr,
    ready_path: &str,
    timeout: Duration,
    pid: Option<u32>,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let path = if ready_path.is_empty() {
        "/"
    } else {
        ready_path
    };
    let mut warned = false;
    let mut last = None;
    while Instant::now() < deadline {
        let answer = health::http_status(addr, path, Duration::from_secs(2)).await;
        match answer {
            Some(status) if ready_path.is_empty() || (200..400).contains(&status) => {
                let ours = match pid {
                    Some(p) => procs::port_held_by_group_off_runtime(addr.port(), p).await,
                    None => true,
                };
                if ours {
                    return Ok(());
                }
                if !warned {
                    tracing::warn!(
                        port = addr.port(),
                        pid,
                        "port answers, but another process holds it; waiting for the worker"
                    );
                    warned = true;
                }
                last = Some(Probe::Stranger);
            }
            Some(status) => last = Some(Probe::Status(status)),
            None => last = last.or(Some(Probe::Nothing)),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let said = match last {
        Some(Probe::Status(s)) => format!("its last answer was {s} (ready_path must answer 2xx or 3xx)"),
        Some(Probe::Stranger) => "the port answered, but a process outside the worker's group holds it".into(),
        _ => "nothing answered HTTP there (does the worker listen on the port corral gives it, {port} in its command or $PORT?)".into(),
    };
    Err(format!(
        "probed GET {path} on http://{addr} every 100ms; {said}"
    ))
}

/// What a readiness probe last saw.
enum Probe {
    Nothing,
    Status(u16),
    Stranger,
}

fn describe(cmd: &WorkerCommand) -> String {
    match cmd {
        WorkerCommand::Shell(s) => s.clone(),
        WorkerCommand::Args(a) => a.join(" "),
    }
}

fn fill(template: &str, port: u16, index: usize) -> String {
    template
        .replace("{port}", &port.to_string())
        .replace("{id}", &index.to_string())
}

/// Starts the worker process in a process group of its own, killed if corral dies.
async fn spawn(
    spec: &Workers,
    port: u16,
    index: usize,
    extra_env: &[(String, String)],
    output: &Output,
) -> std::io::Result<Spawned> {
    let mut cmd = match &spec.command {
        WorkerCommand::Shell(s) => {
            let mut c = Command::new("/bin/sh");
            // exec: the worker itself is the process we watch and signal.
            c.arg("-c").arg(format!("exec {}", fill(s, port, index)));
            c
        }
        WorkerCommand::Args(args) => {
            let mut c = Command::new(fill(&args[0], port, index));
            c.args(args[1..].iter().map(|a| fill(a, port, index)));
            c
        }
    };
    if let Some(dir) = &spec.cwd {
        cmd.current_dir(dir);
    }
    cmd.env("PORT", port.to_string())
        .env("CORRAL_WORKER_ID", index.to_string())
        .env("PYTHONUNBUFFERED", "1");
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    cmd.envs(&spec.env);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    with_death_signal(&mut cmd);
    let mut child = crate::runtime::forker::fork(cmd).await?;
    let mut forwarding = tokio::task::JoinSet::new();
    let mut pipes = Vec::new();
    if let Some(out) = child.stdout.take() {
        pipes.extend(out.as_fd().try_clone_to_owned());
        forwarding.spawn(forward_lines(out, index, output.clone()));
    }
    if let Some(err) = child.stderr.take() {
        pipes.extend(err.as_fd().try_clone_to_owned());
        forwarding.spawn(forward_lines(err, index, output.clone()));
    }
    Ok(Spawned {
        child: Proc::Spawned(child),
        output: forwarding,
        pipes,
    })
}

/// A worker process an upgrade carried over, watched from here on as if spawned
/// here: its output forwarded from the carried pipes. None without a process.
fn adopt(adopted: Adopted, index: usize, output: &Output) -> Option<Spawned> {
    let pid = adopted.pid?;
    let mut forwarding = tokio::task::JoinSet::new();
    let mut pipes = Vec::new();
    for fd in adopted.output {
        pipes.extend(fd.try_clone());
        match tokio::net::unix::pipe::Receiver::from_owned_fd(fd) {
            Ok(pipe) => {
                forwarding.spawn(forward_lines(pipe, index, output.clone()));
            }
            Err(e) => tracing::warn!(worker = index, error = %e, "a carried output pipe is lost"),
        }
    }
    tracing::info!(worker = index, pid, "worker carried over by the upgrade");
    Some(Spawned {
        child: Proc::Adopted(pid),
        output: forwarding,
        pipes,
    })
}

/// A worker process: forked by this image, or carried over from the one before.
enum Proc {
    Spawned(Child),
    Adopted(u32),
}

impl Proc {
    fn id(&self) -> Option<u32> {
        match self {
            Proc::Spawned(c) => c.id(),
            Proc::Adopted(pid) => Some(*pid),
        }
    }

    /// Waits for it to exit and reaps it.
    async fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        match self {
            Proc::Spawned(c) => c.wait().await,
            Proc::Adopted(pid) => {
                let pid = *pid;
                if let Some(exit) = exit_watch(pid) {
                    let _ = exit.readable().await;
                }
                tokio::task::spawn_blocking(move || reap(pid))
                    .await
                    .map_err(std::io::Error::other)?
            }
        }
    }
}

/// `waitpid` for a child this image did not fork (tokio's `Child` reaps its own).
fn reap(pid: u32) -> std::io::Result<std::process::ExitStatus> {
    use std::os::unix::process::ExitStatusExt;
    let pid = pid as libc::pid_t;
    loop {
        let mut status = 0;
        // SAFETY: waits for one child of this process; `status` is a valid pointer.
        let got = unsafe { libc::waitpid(pid, &mut status, 0) };
        if got == pid {
            return Ok(std::process::ExitStatus::from_raw(status));
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Has the child killed when corral dies, even by SIGKILL (its parent-death signal).
fn with_death_signal(cmd: &mut Command) {
    // Taken before the fork: as a container's PID 1, corral's own pid is 1, so
    // "parent is 1" does not mean "parent died".
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: prctl and getppid are async-signal-safe; this only sets the child's
    // parent-death signal.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // corral may have died between fork and prctl.
            if libc::getppid() != parent {
                return Err(std::io::Error::other("corral exited"));
            }
            Ok(())
        });
    }
}

/// A started worker process and the tasks that forward its output.
struct Spawned {
    child: Proc,
    output: tokio::task::JoinSet<()>,
    /// Other descriptors of its output pipes' read ends (for an upgrade).
    pipes: Vec<OwnedFd>,
}

/// Waits (briefly) for a process's output to be read to its end: the last lines
/// before an exit belong in the log and the tail. A descendant still holding the
/// pipes open does not hold the keeper up; its forwarding ends with the JoinSet.
async fn finish_output(output: &mut tokio::task::JoinSet<()>) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while output.join_next().await.is_some() {}
    })
    .await;
    output.abort_all();
}

/// Forwards a worker's output to corral's log, one line at a time, keeping a tail.
async fn forward_lines<R: AsyncRead + Unpin>(reader: R, index: usize, output: Output) {
    let mut reader = BufReader::new(reader);
    let mut line = Vec::new();
    loop {
        let (done, used) = match reader.fill_buf().await {
            Ok([]) | Err(_) => (true, 0),
            Ok(buf) => match buf.iter().position(|b| *b == b'\n') {
                Some(i) => {
                    push_capped(&mut line, &buf[..i]);
                    (false, i + 1)
                }
                None => {
                    push_capped(&mut line, buf);
                    let n = buf.len();
                    reader.consume(n);
                    continue;
                }
            },
        };
        if done && line.is_empty() {
            return;
        }
        reader.consume(used);
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        line.clear();
        if !output.quiet {
            tracing::info!(target: "corral::worker", "[worker {index}] {text}");
        }
        let mut t = output.tail.lock().unwrap_or_else(|e| e.into_inner());
        if t.len() == TAIL_LINES {
            t.pop_front();
        }
        t.push_back(text);
        if done {
            return;
        }
    }
}

fn push_capped(line: &mut Vec<u8>, bytes: &[u8]) {
    let room = MAX_LINE.saturating_sub(line.len());
    line.extend_from_slice(&bytes[..bytes.len().min(room)]);
}

/// One run's output: its last lines, and whether they also go to the log as they
/// come (not for a worker failing again: its first failure's output was shown).
#[derive(Clone)]
struct Output {
    tail: Arc<Mutex<VecDeque<String>>>,
    quiet: bool,
}

impl Output {
    fn new(quiet: bool) -> Output {
        Output {
            tail: Arc::default(),
            quiet,
        }
    }

    fn lines(&self) -> Vec<String> {
        let t = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        t.iter().cloned().collect()
    }

    fn tail_text(&self) -> String {
        let lines = self.lines();
        if lines.is_empty() {
            return "  (no output)".into();
        }
        lines.iter().map(|l| format!("  | {l}\n")).collect()
    }
}

/// A worker failing again and again: how many times in a row.
#[derive(Default)]
struct Failures {
    in_a_row: u32,
}

/// The last exit whose output the log showed (of any worker): its lines, which
/// worker, and when. An exit with the same output names it instead of repeating it.
type Shown = Arc<Mutex<Option<ShownExit>>>;

struct ShownExit {
    lines: Vec<String>,
    worker: usize,
    at: std::time::SystemTime,
}

/// Logs a failed run, every time, with its status: its output when it differs from
/// the last output shown (a worker's first failure had its output forwarded line
/// by line as it came), else where that same output was shown.
fn report(
    index: usize,
    pid: Option<u32>,
    msg: &Error,
    output: &Output,
    f: &mut Failures,
    shown: &Shown,
) {
    f.in_a_row += 1;
    let failures = f.in_a_row;
    let lines = output.lines();
    let summary = summary(msg);
    let mut last = shown.lock().unwrap_or_else(|e| e.into_inner());
    if lines.is_empty() {
        tracing::error!(
            worker = index,
            pid,
            failures,
            "worker {summary}; it printed nothing"
        );
        return;
    }
    let same = last.as_ref().filter(|s| s.lines == lines);
    match (same, f.in_a_row) {
        (Some(s), _) => {
            let at = humantime::format_rfc3339_seconds(s.at);
            tracing::error!(
                worker = index,
                pid,
                failures,
                "worker {summary}, with the same output as worker {}'s exit at {at}",
                s.worker
            );
            return;
        }
        (None, 1) => {
            tracing::error!(
                worker = index,
                pid,
                failures,
                "worker {summary}; its output is above"
            )
        }
        (None, _) => tracing::error!(
            worker = index,
            pid,
            failures,
            "worker {summary}, with this output:\n{}",
            output.tail_text()
        ),
    }
    *last = Some(ShownExit {
        lines,
        worker: index,
        at: std::time::SystemTime::now(),
    });
}

/// The first line of a failure, without the output.
fn summary(msg: &Error) -> String {
    match msg {
        Error::NotReady { within, probe, .. } => format!("not ready within {within:?}: {probe}"),
        Error::Exited { status, ran, .. } => format!("exited ({status}) after {ran:.1?}"),
        other => other.to_string(),
    }
}

/// Why a worker could not be started, with the command as it was run and what the
/// system's answer likely means here.
fn spawn_error(spec: &Workers, port: u16, index: usize, cause: std::io::Error) -> Error {
    let command = fill(&describe(&spec.command), port, index);
    let hint = match (&spec.cwd, cause.kind()) {
        (Some(dir), std::io::ErrorKind::NotFound) if !dir.is_dir() => {
            format!(" (the directory {} does not exist)", dir.display())
        }
        (_, std::io::ErrorKind::NotFound) => match &spec.command {
            WorkerCommand::Args(a) => format!(" (`{}` is not found on PATH)", a[0]),
            WorkerCommand::Shell(_) => " (/bin/sh is not found)".into(),
        },
        (_, std::io::ErrorKind::PermissionDenied) => " (not executable)".into(),
        _ => String::new(),
    };
    Error::Spawn {
        command,
        cwd: spec.cwd.clone(),
        cause,
        hint,
    }
}

fn in_dir(cwd: &Option<std::path::PathBuf>) -> String {
    match cwd {
        Some(d) => format!(" in {}", d.display()),
        None => String::new(),
    }
}

fn kill_group(pid: Option<u32>, signal: i32) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: plain syscall; the group id is the worker's pid (process_group(0)).
        unsafe {
            libc::killpg(pid, signal);
        }
    }
}

/// SIGTERM to the worker's process group, SIGKILL after `grace`.
async fn terminate(child: &mut Proc, grace: Duration) {
    let pid = child.id();
    kill_group(pid, libc::SIGTERM);
    let sent = Instant::now();
    let stopped = match pid.and_then(exit_watch) {
        Some(exit) => tokio::time::timeout(grace, exit.readable()).await.is_ok(),
        // Without a pidfd: wait (and reap) as before.
        None => tokio::time::timeout(grace, child.wait()).await.is_ok(),
    };
    match stopped {
        true => tracing::info!(pid, after = ?sent.elapsed(), "worker exited on SIGTERM"),
        false => tracing::warn!(pid, ?grace, "worker did not stop in time: SIGKILL"),
    }
    // The group too (a gunicorn worker may outlive its master), while the leader is
    // not yet reaped where a pidfd let us wait without reaping: its pid, the group's
    // id, cannot have been reused.
    kill_group(pid, libc::SIGKILL);
    let _ = child.wait().await;
}

/// A pidfd of the process (Linux 5.3): readable once the process has exited, and
/// waiting on it does not reap, so while the process is a zombie its pid (the id
/// of its process group) cannot be given to another process and a signal to the
/// group reaches only what it left behind. None where pidfds are not to be had.
fn exit_watch(pid: u32) -> Option<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the descriptor was just made and is owned by nothing else.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    // SAFETY: the OwnedFd keeps the descriptor open, unchanged, as long as the AsyncFd.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE).ok()
    }
}

/// The process's exit: its group gets SIGKILL before it is reaped (see
/// `exit_watch`), then its status is collected. Without a pidfd, the status first
/// and the group after, as before.
async fn exited_then_wait(
    child: &mut Proc,
    pid: Option<u32>,
) -> std::io::Result<std::process::ExitStatus> {
    if let Some(exit) = pid.and_then(exit_watch) {
        let _ = exit.readable().await;
        kill_group(pid, libc::SIGKILL);
        return child.wait().await;
    }
    let status = child.wait().await;
    kill_group(pid, libc::SIGKILL);
    status
}

/// As PID 1 (a container's entrypoint), corral inherits every orphaned process of
/// the container and must reap them, as tini does, or they stay zombies. Our own
/// workers are reaped by their keepers; a zombie child that is no worker of the pool
/// and was already a zombie one scan earlier (a second ago) is an orphan, and is
/// reaped. Runs until its task is ended.
pub async fn reap_orphans(pool: Arc<Pool>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut chld = signal(SignalKind::child()).ok();
    let mut seen_before: Vec<i32> = Vec::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = async {
                match chld.as_mut() {
                    Some(s) => { s.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => tokio::time::sleep(Duration::from_millis(100)).await,
        }
        let ours: Vec<i32> = pool
            .workers()
            .iter()
            .filter_map(|w| w.process.pid())
            .filter_map(|p| i32::try_from(p).ok())
            .collect();
        let zombies = procs::zombie_children_off_runtime().await;
        for pid in &zombies {
            if !ours.contains(pid) && seen_before.contains(pid) {
                // SAFETY: reaps one exited child that no one else waits for.
                let reaped = unsafe { libc::waitpid(*pid, std::ptr::null_mut(), libc::WNOHANG) };
                if reaped == *pid {
                    tracing::debug!(pid, "orphan reaped");
                }
            }
        }
        seen_before = zombies;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker's parent-death signal is tied to the thread that forked it: asked for
    /// by a runtime on a thread that then ends, the worker lives on (it is forked by
    /// the forking thread). Forked in place, it is killed as the thread ends.
    #[test]
    fn a_worker_outlives_the_thread_that_asked_for_it() {
        let asker = std::thread::spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let mut cmd = Command::new("sleep");
                cmd.arg("30").kill_on_drop(true);
                with_death_signal(&mut cmd);
                crate::runtime::forker::fork(cmd).await.expect("forked")
            })
        });
        let child = asker.join().expect("the asking thread");
        let pid = child.id().expect("a pid");
        // A negative check: the death signal comes as the thread ends, so a worker it
        // killed is a zombie by now; this one must still be running.
        std::thread::sleep(Duration::from_millis(300));
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        let state = stat.rsplit(") ").next().and_then(|r| r.chars().next());
        assert_ne!(state, Some('Z'), "the worker died with the thread: {stat}");
        drop(child);
    }

    #[test]
    fn template_is_filled() {
        assert_eq!(
            fill("gunicorn -b 127.0.0.1:{port} --name w{id}", 5001, 3),
            "gunicorn -b 127.0.0.1:5001 --name w3"
        );
    }

    #[tokio::test]
    async fn long_lines_are_cut_and_tail_kept() {
        let mut data = vec![b'x'; MAX_LINE * 2];
        data.push(b'\n');
        for i in 0..30 {
            data.extend_from_slice(format!("line {i}\n").as_bytes());
        }
        data.extend_from_slice(b"no newline at end");
        let output = Output::new(true);
        forward_lines(&data[..], 0, output.clone()).await;
        let t = output.lines();
        assert_eq!(t.len(), TAIL_LINES);
        assert_eq!(t.last().map(String::as_str), Some("no newline at end"));
        assert_eq!(t.first().map(String::as_str), Some("line 11"));
    }

    #[test]
    fn a_spawn_error_names_the_missing_directory_and_fills_the_port() {
        let mut spec = Workers::from_args(
            vec!["gunicorn".into(), "-b".into(), "127.0.0.1:{port}".into()],
            crate::config::Count::Fixed(1),
        );
        spec.cwd = Some("/no/such/dir".into());
        let cause = std::io::Error::from(std::io::ErrorKind::NotFound);
        let text = spawn_error(&spec, 5123, 0, cause).to_string();
        assert!(
            text.contains("127.0.0.1:5123") && !text.contains("{port}"),
            "{text}"
        );
        assert!(
            text.contains("the directory /no/such/dir does not exist"),
            "{text}"
        );
        spec.cwd = None;
        let cause = std::io::Error::from(std::io::ErrorKind::NotFound);
        let text = spawn_error(&spec, 5123, 0, cause).to_string();
        assert!(text.contains("`gunicorn` is not found on PATH"), "{text}");
    }
}
