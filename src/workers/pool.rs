//! The worker pool: the set of upstream workers, the state of each (starting, up,
//! down, draining, retired), and the load counters the balancer reads (requests in
//! flight, live Engine.IO sessions).
//!
//! It owns worker state and the choice of a worker for a new session or a plain
//! request; passive marks (a failed connect) and active health checks move workers
//! up and down. It knows nothing of session ids (the router owns those) nor of
//! processes (the supervisor owns those and tells the pool through `add`,
//! `set_ready`, `mark_down`, `drain` and `retire`). Each worker carries a
//! `generation` that moves every time it goes down, so the router can tell that the
//! sessions it remembers for that worker died with it.

use crate::config::Policy;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::Duration;

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Process started, not ready yet: no traffic.
    Starting = 0,
    /// Takes new sessions and requests.
    Up = 1,
    /// Failed (connect refused, health check, process exited): no traffic, and the
    /// sessions it had are void.
    Down = 2,
    /// Being replaced: serves its existing sessions, gets nothing new.
    Draining = 3,
    /// Gone for good.
    Retired = 4,
}

impl State {
    fn from_u8(v: u8) -> State {
        match v {
            0 => State::Starting,
            1 => State::Up,
            2 => State::Down,
            3 => State::Draining,
            _ => State::Retired,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Up => "up",
            State::Down => "down",
            State::Draining => "draining",
            State::Retired => "retired",
        }
    }
}

/// A short, stable reference: the first 4 bytes of a hash of a kind and a name.
/// Tagged sids name workers (and nodes) by it, so it depends only on configured
/// names, never on start order or a free port.
pub type Ref = [u8; 4];

/// The reference of `name` among things of `kind`.
pub fn stable_ref(kind: &str, name: &str) -> Ref {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(kind.as_bytes())
        .chain_update([0u8])
        .chain_update(name.as_bytes())
        .finalize();
    let mut r = [0u8; 4];
    r.copy_from_slice(&digest[..4]);
    r
}

/// A supervised worker's standing with the embedded message queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mq {
    /// Not looked at (no embedded queue, or not yet).
    Unknown = 0,
    /// No subscription yet, and no sessions held for longer than the grace period
    /// (python-socketio subscribes at its first session).
    Waiting = 1,
    Subscribed = 2,
    /// Sessions for longer than the grace period and no subscription: broadcasts
    /// from other workers do not reach its clients.
    Deaf = 3,
}

impl Mq {
    /// Its name in /status.json.
    pub fn name(self) -> Option<&'static str> {
        match self {
            Mq::Unknown => None,
            Mq::Waiting => Some("waiting"),
            Mq::Subscribed => Some("subscribed"),
            Mq::Deaf => Some("deaf"),
        }
    }
}

/// One upstream worker: who it is, and three parts kept apart — what routing reads
/// and health checks change, what the supervisor knows of its process, and what it
/// served (for the views) — beside the cache of connections to it.
#[derive(Debug)]
pub struct Worker {
    /// Its number in this corral, never reused.
    pub id: usize,
    /// Where it listens.
    pub addr: SocketAddr,
    /// `addr` as a URI authority, made once (not per request).
    pub authority: http::uri::Authority,
    /// Started and watched by corral's supervisor (as opposed to a static upstream).
    pub managed: bool,
    /// Its reference in tagged sids, from its configured identity: the address of a
    /// static upstream, the id of a supervised worker.
    pub tag_ref: Ref,
    routing: Routing,
    /// Its process, as the supervisor tells it.
    pub process: Process,
    /// What it served.
    pub traffic: Traffic,
    /// Keep-alive connections to it, ready for the next request.
    pub conns: crate::transport::upstream::Idle,
    /// Fires when corral is about to stop its process (a rolling restart, a scale
    /// down): its websockets close with 1012 and its long-polls are answered, so
    /// that their clients reconnect to another worker.
    pub leaving: tokio_util::sync::CancellationToken,
}

/// What the balancer and the router read and health changes.
#[derive(Debug)]
struct Routing {
    state: AtomicU8,
    /// For managed workers: the process is running and was ready once, so a health
    /// check may bring it back up. Static workers are always "alive".
    alive: AtomicBool,
    /// Moves every time the worker leaves service: sessions remembered under an
    /// older generation died with it.
    generation: AtomicU64,
    inflight: AtomicUsize,
    /// Of those, session long-polls: they wait for the worker to have something to
    /// say, so a drain does not wait for them.
    polls: AtomicUsize,
    sessions: AtomicUsize,
    /// Failed checks (health checks or refused connects) in a row, and passed ones.
    fails: AtomicU32,
    passes: AtomicU32,
}

/// What the supervisor knows of a worker's process.
#[derive(Debug)]
pub struct Process {
    pid: AtomicU32,
    restarts: AtomicU64,
    /// When it last became ready, as milliseconds since `epoch` (0: not up yet).
    ready_at_ms: AtomicU64,
    epoch: std::time::Instant,
    /// Whether it holds a subscription on the embedded message queue: 0 not known
    /// (not looked at, or no embedded queue), 1 no, 2 yes.
    mq: AtomicU8,
}

impl Process {
    fn new() -> Process {
        Process {
            pid: AtomicU32::new(0),
            restarts: AtomicU64::new(0),
            ready_at_ms: AtomicU64::new(0),
            epoch: std::time::Instant::now(),
            mq: AtomicU8::new(0),
        }
    }
    /// Its process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        Some(self.pid.load(Ordering::Relaxed)).filter(|p| *p != 0)
    }
    /// Records the running process (None: exited).
    pub fn set_pid(&self, pid: Option<u32>) {
        self.pid.store(pid.unwrap_or(0), Ordering::Relaxed);
    }
    /// Times it was restarted after exiting.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }
    /// Whether it is subscribed to the embedded message queue, when known.
    pub fn mq_subscribed(&self) -> Option<bool> {
        match self.mq() {
            Mq::Unknown => None,
            Mq::Subscribed => Some(true),
            Mq::Waiting | Mq::Deaf => Some(false),
        }
    }
    /// Where it stands with the embedded message queue.
    pub fn mq(&self) -> Mq {
        match self.mq.load(Ordering::Relaxed) {
            1 => Mq::Waiting,
            2 => Mq::Subscribed,
            3 => Mq::Deaf,
            _ => Mq::Unknown,
        }
    }
    /// Records where it stands with the embedded message queue.
    pub fn set_mq(&self, mq: Mq) {
        self.mq.store(mq as u8, Ordering::Relaxed);
    }
    /// Counts a restart.
    /// Takes the count an upgrade carried.
    pub fn set_restarts(&self, n: u64) {
        self.restarts.store(n, Ordering::Relaxed);
    }
    pub fn count_restart(&self) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
    }
    /// How long since it last became ready.
    pub fn uptime(&self) -> Option<Duration> {
        match self.ready_at_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(
                self.epoch
                    .elapsed()
                    .saturating_sub(Duration::from_millis(ms - 1)),
            ),
        }
    }
    fn mark_ready(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64 + 1;
        self.ready_at_ms.store(ms, Ordering::Relaxed);
    }
}

/// What a worker served: responses by status class, open tunnels, the recent rate.
#[derive(Debug, Default)]
pub struct Traffic {
    /// Responses by status class (1xx..5xx).
    requests: [AtomicU64; 5],
    tunnels: AtomicUsize,
    /// Requests/s over the last sample period, as f64 bits; and the count then.
    rate_bits: AtomicU64,
    rate_mark: AtomicU64,
}

impl Traffic {
    /// Counts a response the worker gave.
    pub fn count_response(&self, status: u16) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.requests[class].fetch_add(1, Ordering::Relaxed);
    }
    /// Responses by status class, 1xx first.
    pub fn requests_by_class(&self) -> [u64; 5] {
        std::array::from_fn(|i| self.requests[i].load(Ordering::Relaxed))
    }
    /// All responses.
    pub fn requests_total(&self) -> u64 {
        self.requests_by_class().iter().sum()
    }
    /// Open websocket tunnels.
    pub fn tunnels(&self) -> usize {
        self.tunnels.load(Ordering::Relaxed)
    }
    /// Requests/s over the last sample period.
    pub fn rate(&self) -> f64 {
        f64::from_bits(self.rate_bits.load(Ordering::Relaxed))
    }
    /// Called by the sampler every period of `secs` seconds.
    pub fn sample_rate(&self, secs: f64) {
        let now = self.requests_total();
        let before = self.rate_mark.swap(now, Ordering::Relaxed);
        let rate = now.saturating_sub(before) as f64 / secs;
        self.rate_bits.store(rate.to_bits(), Ordering::Relaxed);
    }
}

impl crate::transport::upstream::Home for Worker {
    fn idle(&self) -> &crate::transport::upstream::Idle {
        &self.conns
    }
    fn keeps_idle(&self) -> bool {
        matches!(self.state(), State::Up | State::Draining)
    }
}

impl Worker {
    /// Counts an open websocket tunnel until the guard is dropped.
    pub fn open_tunnel(self: &Arc<Self>) -> TunnelGuard {
        self.traffic.tunnels.fetch_add(1, Ordering::Relaxed);
        TunnelGuard {
            worker: self.clone(),
        }
    }

    /// Where it is in its life.
    pub fn state(&self) -> State {
        State::from_u8(self.routing.state.load(Ordering::Acquire))
    }
    /// Whether it takes new sessions and requests.
    pub fn is_up(&self) -> bool {
        self.state() == State::Up
    }
    /// Whether its process runs and was ready once (always, for static workers).
    pub fn is_alive(&self) -> bool {
        self.routing.alive.load(Ordering::Acquire)
    }
    /// Moves every time it leaves service.
    pub fn generation(&self) -> u64 {
        self.routing.generation.load(Ordering::Acquire)
    }
    /// Requests in flight on it.
    pub fn inflight(&self) -> usize {
        self.routing.inflight.load(Ordering::Relaxed)
    }
    /// Requests in flight on it that are not session long-polls.
    pub fn plain_inflight(&self) -> usize {
        let polls = self.routing.polls.load(Ordering::Relaxed);
        self.inflight().saturating_sub(polls)
    }
    /// Live Engine.IO sessions counted on it.
    pub fn sessions(&self) -> usize {
        self.routing.sessions.load(Ordering::Relaxed)
    }

    /// Moves to `to`; leaving service (down, retired) voids the sessions.
    fn set_state(&self, to: State) -> State {
        self.transition(to, |_| true).unwrap_or(to)
    }

    /// Moves to `to` in one atomic step if the current state passes `allowed`;
    /// returns the state it left, or None when it was not allowed (so a concurrent
    /// change is never overwritten).
    fn transition(&self, to: State, allowed: impl Fn(State) -> bool) -> Option<State> {
        let r = &self.routing;
        let from = r
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                allowed(State::from_u8(s)).then_some(to as u8)
            })
            .ok()
            .map(State::from_u8)?;
        if matches!(to, State::Down | State::Retired)
            && !matches!(from, State::Down | State::Retired)
        {
            r.generation.fetch_add(1, Ordering::AcqRel);
            r.sessions.store(0, Ordering::Relaxed);
        }
        Some(from)
    }

    /// A request of this worker was answered: its failed checks start over.
    pub fn answered(&self) {
        if self.routing.fails.load(Ordering::Relaxed) != 0 {
            self.routing.fails.store(0, Ordering::Relaxed);
        }
    }

    /// Counts a request in flight on this worker until the guard is dropped.
    pub fn start_request(self: &Arc<Self>) -> InflightGuard {
        self.routing.inflight.fetch_add(1, Ordering::Relaxed);
        InflightGuard {
            worker: self.clone(),
            poll: false,
        }
    }

    /// As `start_request`, for a session's long-poll (a GET with a sid).
    pub fn start_poll(self: &Arc<Self>) -> InflightGuard {
        self.routing.polls.fetch_add(1, Ordering::Relaxed);
        let mut guard = self.start_request();
        guard.poll = true;
        guard
    }

    /// A session of this worker is counted (one corral had not seen start).
    pub fn session_adopted(&self) {
        self.routing.sessions.fetch_add(1, Ordering::Relaxed);
    }

    /// Forgets one session counted here, unless the worker went down since
    /// (`generation` differs), which already forgot them all.
    pub fn session_ended(&self, generation: u64) {
        if self.generation() == generation {
            // Never below zero, even if a down/up race reset the count.
            let _ = self
                .routing
                .sessions
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        }
    }
}

/// Beyond the close spread, how long a leaving worker's tunnels get to close.
const CLOSE_SLACK: Duration = Duration::from_secs(3);

/// Waits until `done` says so, or until `deadline`.
async fn until(deadline: std::time::Instant, done: impl Fn() -> bool) {
    while !done() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The workers and the balancing policy for new sessions.
#[derive(Debug)]
pub struct Pool {
    workers: RwLock<Vec<Arc<Worker>>>,
    /// A config reload may change it.
    policy: RwLock<Policy>,
    next: AtomicUsize,
    next_id: AtomicUsize,
    /// Passed checks in a row that bring a worker down by checks back up.
    rise: AtomicU32,
    /// Failed checks in a row that mark a worker down.
    fall: AtomicU32,
}

impl Pool {
    /// A pool of static workers, all considered up.
    pub fn new(addrs: &[SocketAddr], policy: Policy) -> Pool {
        Pool::with_thresholds(addrs, policy, 2, 3)
    }

    /// A pool whose workers go down after `fall` failed checks in a row and come
    /// back after `rise` passed ones (HAProxy's `rise 2 fall 3`).
    pub fn with_thresholds(addrs: &[SocketAddr], policy: Policy, rise: u32, fall: u32) -> Pool {
        let pool = Pool {
            workers: RwLock::new(Vec::new()),
            policy: RwLock::new(policy),
            next: AtomicUsize::new(0),
            next_id: AtomicUsize::new(0),
            rise: AtomicU32::new(rise.max(1)),
            fall: AtomicU32::new(fall.max(1)),
        };
        for addr in addrs {
            pool.add(*addr, false);
        }
        pool
    }

    fn list(&self) -> RwLockReadGuard<'_, Vec<Arc<Worker>>> {
        // Updates are single pushes and removals: a poisoned lock is still consistent.
        self.workers.read().unwrap_or_else(|e| e.into_inner())
    }

    /// How many workers there are, in any state.
    pub fn len(&self) -> usize {
        self.list().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A snapshot of the workers, in the order they were added.
    pub fn workers(&self) -> Vec<Arc<Worker>> {
        self.list().clone()
    }

    /// Adds a worker: static ones start up, managed ones start `Starting`.
    pub fn add(&self, addr: SocketAddr, managed: bool) -> Arc<Worker> {
        self.add_as(addr, managed, None)
    }

    /// As `add`, keeping the id `id` where no worker has it (an upgrade's worker
    /// keeps its id, and with it the tag its sessions' sids carry).
    pub fn add_as(&self, addr: SocketAddr, managed: bool, id: Option<usize>) -> Arc<Worker> {
        let free = id.filter(|id| self.list().iter().all(|w| w.id != *id));
        if let Some(id) = free {
            self.next_id.fetch_max(id + 1, Ordering::Relaxed);
        }
        let worker = self.make(addr, managed, free);
        self.workers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(worker.clone());
        worker
    }

    /// A worker outside the balancing: another corral node, which requests are sent
    /// to with the same connections and rules as to a worker.
    pub fn detached(&self, addr: SocketAddr) -> Arc<Worker> {
        self.make(addr, false, None)
    }

    fn make(&self, addr: SocketAddr, managed: bool, id: Option<usize>) -> Arc<Worker> {
        let id = id.unwrap_or_else(|| self.next_id.fetch_add(1, Ordering::Relaxed));
        let identity = match managed {
            true => format!("worker:{id}"),
            false => format!("addr:{addr}"),
        };
        let worker = Arc::new(Worker {
            id,
            tag_ref: stable_ref("corral-worker", &identity),
            addr,
            authority: http::uri::Authority::try_from(addr.to_string().as_str())
                .unwrap_or_else(|_| http::uri::Authority::from_static("127.0.0.1")),
            managed,
            routing: Routing {
                state: AtomicU8::new(if managed { State::Starting } else { State::Up } as u8),
                alive: AtomicBool::new(!managed),
                generation: AtomicU64::new(0),
                inflight: AtomicUsize::new(0),
                polls: AtomicUsize::new(0),
                sessions: AtomicUsize::new(0),
                fails: AtomicU32::new(0),
                passes: AtomicU32::new(0),
            },
            process: Process::new(),
            traffic: Traffic::default(),
            conns: Default::default(),
            leaving: Default::default(),
        });
        if !managed {
            worker.process.mark_ready();
        }
        worker
    }

    /// A worker is ready: it takes traffic (from Starting, or Down after its checks
    /// rose again; never from Draining or Retired).
    pub fn set_ready(&self, w: &Worker) {
        w.routing.alive.store(true, Ordering::Release);
        w.routing.fails.store(0, Ordering::Relaxed);
        if let Some(from) = w.transition(State::Up, |s| matches!(s, State::Starting | State::Down))
        {
            if from == State::Starting && w.managed {
                w.process.mark_ready();
            }
            tracing::info!(worker = w.id, addr = %w.addr, "worker is up");
        }
    }

    /// A check failed (health check, or a refused connect): after `fall` in a row
    /// the worker is marked down. Returns whether this check marked it down.
    pub fn check_failed(&self, w: &Worker) -> bool {
        w.routing.passes.store(0, Ordering::Relaxed);
        let fails = w.routing.fails.fetch_add(1, Ordering::AcqRel) + 1;
        if fails < self.fall.load(Ordering::Relaxed) {
            tracing::debug!(
                worker = w.id,
                fails,
                fall = self.fall.load(Ordering::Relaxed),
                "worker check failed"
            );
            return false;
        }
        self.mark_down(w)
    }

    /// A check passed: a worker down by checks (its process alive) comes back after
    /// `rise` in a row.
    pub fn check_passed(&self, w: &Worker) {
        w.routing.fails.store(0, Ordering::Relaxed);
        let passes = w.routing.passes.fetch_add(1, Ordering::AcqRel) + 1;
        if w.state() == State::Down
            && w.routing.alive.load(Ordering::Acquire)
            && passes >= self.rise.load(Ordering::Relaxed)
        {
            self.set_ready(w);
        }
    }

    /// A managed worker's process is starting (again): no traffic until ready.
    pub fn set_starting(&self, w: &Worker) {
        w.routing.alive.store(false, Ordering::Release);
        w.set_state(State::Starting);
    }

    /// Marks a worker down (its sessions are void from now on). Returns whether it
    /// was taking traffic.
    pub fn mark_down(&self, w: &Worker) -> bool {
        // Starting and Retired are the supervisor's to change; one atomic step, so a
        // concurrent `set_ready` is never undone.
        let Some(from) = w.transition(State::Down, |s| matches!(s, State::Up | State::Draining))
        else {
            return false;
        };
        w.routing.passes.store(0, Ordering::Relaxed);
        w.conns.clear();
        tracing::warn!(worker = w.id, addr = %w.addr, from = from.name(), "worker marked down");
        true
    }

    /// A managed worker's process exited: down, and not to be brought back by health
    /// checks until the supervisor has it ready again.
    pub fn process_exited(&self, w: &Worker) {
        w.routing.alive.store(false, Ordering::Release);
        w.process.set_pid(None);
        w.set_state(State::Down);
        w.conns.clear();
    }

    /// Stops giving a worker new sessions and requests; existing sessions go on.
    pub fn drain(&self, w: &Worker) {
        w.set_state(State::Draining);
    }

    /// The worker's process is about to be stopped: out of service (its sessions
    /// void, so their next requests are answered "Session ID unknown"), its idle
    /// connections closed, and `leaving` fired for its tunnels and long-polls.
    pub fn leave(&self, w: &Worker) {
        w.routing.alive.store(false, Ordering::Release);
        w.set_state(State::Down);
        w.conns.clear();
        w.leaving.cancel();
    }

    /// Serves out a worker about to be stopped or removed: it gets nothing new;
    /// once its plain requests are answered (they end on their own, within
    /// `drain_timeout`), it leaves (`leave`): its websockets close with 1012 over
    /// `spread` and its long-polls are answered "Session ID unknown", so their
    /// clients reconnect to other workers. Returns once they have (bounded).
    pub async fn serve_out(&self, w: &Worker, drain_timeout: Duration, spread: Duration) {
        self.drain(w);
        let deadline = std::time::Instant::now() + drain_timeout;
        until(deadline, || w.plain_inflight() == 0).await;
        tracing::info!(
            worker = w.id,
            websockets = w.traffic.tunnels(),
            sessions = w.sessions(),
            ?spread,
            "worker leaving: its websockets close (1012) and its sessions reconnect elsewhere"
        );
        self.leave(w);
        // A tunnel waits for the frame in flight and then for its close frame to go
        // out: a second each at most.
        let closed_by = deadline.min(std::time::Instant::now() + spread + CLOSE_SLACK);
        until(closed_by, || w.traffic.tunnels() == 0 && w.inflight() == 0).await;
    }

    /// Removes a worker for good.
    pub fn retire(&self, w: &Worker) {
        w.routing.alive.store(false, Ordering::Release);
        w.set_state(State::Retired);
        w.conns.clear();
        self.workers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|x| x.id != w.id);
    }

    /// Why no worker can take a request, for the client's 503: how many there are,
    /// in which states, and how often they were restarted.
    pub fn why_none_ready(&self) -> String {
        let list = self.list();
        if list.is_empty() {
            return "no worker is configured".into();
        }
        let mut states: Vec<(&'static str, usize)> = Vec::new();
        for w in list.iter() {
            let name = w.state().name();
            match states.iter_mut().find(|(n, _)| *n == name) {
                Some((_, k)) => *k += 1,
                None => states.push((name, 1)),
            }
        }
        let states: Vec<String> = states.iter().map(|(n, k)| format!("{k} {n}")).collect();
        let restarts: u64 = list.iter().map(|w| w.process.restarts()).sum();
        let mut text = format!(
            "no worker is ready: 0 of {} up ({})",
            list.len(),
            states.join(", ")
        );
        if restarts > 0 {
            text.push_str(&format!(
                "; {restarts} restarts after exits so far: corral's log says why, exit by exit"
            ));
        }
        text
    }

    /// How many workers are up, and how many there are (readiness).
    pub fn up_count(&self) -> (usize, usize) {
        let list = self.list();
        (list.iter().filter(|w| w.is_up()).count(), list.len())
    }

    /// The worker a tag names, if it is one of this pool's and can take requests of
    /// its sessions (up or draining).
    pub fn by_tag(&self, r: Ref) -> Option<Arc<Worker>> {
        self.list()
            .iter()
            .find(|w| w.tag_ref == r && matches!(w.state(), State::Up | State::Draining))
            .cloned()
    }

    /// Checks in a row that bring a worker back (`rise`) and mark it down (`fall`),
    /// from now on (a config reload).
    pub fn set_thresholds(&self, rise: u32, fall: u32) {
        self.rise.store(rise.max(1), Ordering::Relaxed);
        self.fall.store(fall.max(1), Ordering::Relaxed);
    }

    /// How new sessions are placed.
    pub fn policy(&self) -> Policy {
        *self.policy.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Places new sessions by `policy` from now on (a config reload).
    pub fn set_policy(&self, policy: Policy) {
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = policy;
    }

    /// The static (not supervised) worker at `addr`, if the pool has one.
    pub fn static_at(&self, addr: SocketAddr) -> Option<Arc<Worker>> {
        self.list()
            .iter()
            .find(|w| !w.managed && w.addr == addr)
            .cloned()
    }

    /// Chooses the worker for a new Engine.IO session and counts the session on it.
    pub fn pick_for_session(&self, client: IpAddr) -> Option<Arc<Worker>> {
        let list = self.list();
        let w = match self.policy() {
            Policy::LeastConnections => self.least_by(&list, |w| w.sessions(), None),
            Policy::RoundRobin => self.round_robin(&list),
            Policy::IpHash => by_ip(&list, client),
        }?;
        w.routing.sessions.fetch_add(1, Ordering::Relaxed);
        Some(w)
    }

    /// Chooses the worker for a plain request: fewest requests in flight, skipping
    /// `exclude` (a worker that just failed).
    pub fn pick_for_request(&self, exclude: Option<usize>) -> Option<Arc<Worker>> {
        self.least_by(&self.list(), |w| w.inflight(), exclude)
    }

    /// Lowest `load` among up workers; ties go round-robin so equal workers share.
    /// With no worker up, a down one is tried (as nginx does), so the client gets a
    /// 502 naming the worker that failed rather than a vague 503.
    fn least_by(
        &self,
        list: &[Arc<Worker>],
        load: impl Fn(&Worker) -> usize,
        exclude: Option<usize>,
    ) -> Option<Arc<Worker>> {
        let n = list.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<(&Arc<Worker>, usize)> = None;
        for k in 0..n {
            let w = &list[(start + k) % n];
            if !w.is_up() || Some(w.id) == exclude {
                continue;
            }
            let l = load(w);
            if best.is_none_or(|(_, b)| l < b) {
                best = Some((w, l));
            }
        }
        best.map(|(w, _)| w.clone())
            .or_else(|| last_resort(list, start, exclude))
    }

    fn round_robin(&self, list: &[Arc<Worker>]) -> Option<Arc<Worker>> {
        let n = list.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|k| &list[(start + k) % n])
            .find(|w| w.is_up())
            .cloned()
            .or_else(|| last_resort(list, start, None))
    }
}

/// With nothing up: a worker that is down (not starting, draining or retired).
fn last_resort(list: &[Arc<Worker>], start: usize, exclude: Option<usize>) -> Option<Arc<Worker>> {
    let n = list.len();
    (0..n)
        .map(|k| &list[(start + k) % n])
        // A supervised worker whose process is not running cannot answer: the client
        // is better told that no worker is ready, and why.
        .find(|w| {
            w.state() == State::Down
                && w.routing.alive.load(Ordering::Acquire)
                && Some(w.id) != exclude
        })
        .cloned()
}

/// nginx-style ip_hash: the same address always lands on the same worker while that
/// worker is up; otherwise the next up worker.
fn by_ip(list: &[Arc<Worker>], ip: IpAddr) -> Option<Arc<Worker>> {
    let n = list.len();
    if n == 0 {
        return None;
    }
    let h = match ip {
        // nginx hashes the first three octets of an IPv4 address.
        IpAddr::V4(v4) => fnv(&v4.octets()[..3]),
        IpAddr::V6(v6) => fnv(&v6.octets()),
    };
    let start = (h % n as u64) as usize;
    (0..n)
        .map(|k| &list[(start + k) % n])
        .find(|w| w.is_up())
        .cloned()
        .or_else(|| last_resort(list, start, None))
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    })
}

/// Decrements a worker's tunnel count when dropped.
#[derive(Debug)]
pub struct TunnelGuard {
    worker: Arc<Worker>,
}

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        self.worker.traffic.tunnels.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Decrements a worker's in-flight count when dropped.
#[derive(Debug)]
pub struct InflightGuard {
    worker: Arc<Worker>,
    poll: bool,
}

/// Dropped when the response body ends or is given up alike.
impl crate::transport::body::Guard for InflightGuard {
    fn ended(self) {}
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.worker.routing.inflight.fetch_sub(1, Ordering::Relaxed);
        if self.poll {
            self.worker.routing.polls.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize, policy: Policy) -> Pool {
        let addrs: Vec<SocketAddr> = (0..n)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], 5000 + i as u16)))
            .collect();
        Pool::new(&addrs, policy)
    }

    fn ip() -> IpAddr {
        IpAddr::from([127, 0, 0, 1])
    }

    #[test]
    fn a_worker_falls_and_rises_by_thresholds() {
        let p = pool(1, Policy::LeastConnections);
        let w = p.workers()[0].clone();
        let s = p
            .pick_for_session(IpAddr::from([1, 1, 1, 1]))
            .expect("worker");
        assert_eq!(s.sessions(), 1);
        // One or two failed checks cost a live worker nothing.
        assert!(!p.check_failed(&w));
        assert!(!p.check_failed(&w));
        assert_eq!((w.state(), w.sessions()), (State::Up, 1));
        // An answer in between starts the count over.
        w.answered();
        assert!(!p.check_failed(&w));
        assert!(!p.check_failed(&w));
        assert!(p.check_failed(&w));
        assert_eq!((w.state(), w.sessions()), (State::Down, 0));
        p.check_passed(&w);
        assert_eq!(w.state(), State::Down);
        p.check_passed(&w);
        assert_eq!(w.state(), State::Up);
    }

    #[test]
    fn checks_never_revive_a_starting_or_retired_worker() {
        let p = Pool::with_thresholds(&[], Policy::LeastConnections, 1, 1);
        let w = p.add(SocketAddr::from(([127, 0, 0, 1], 6000)), true);
        assert!(!p.check_failed(&w));
        assert_eq!(w.state(), State::Starting);
        p.check_passed(&w);
        assert_eq!(w.state(), State::Starting);
        p.retire(&w);
        p.set_ready(&w);
        assert_eq!(w.state(), State::Retired);
    }

    #[test]
    fn least_connections_spreads_evenly() {
        let p = pool(4, Policy::LeastConnections);
        let mut counts = [0; 4];
        for _ in 0..100 {
            counts[p.pick_for_session(ip()).expect("up").id] += 1;
        }
        assert_eq!(counts, [25; 4]);
    }

    #[test]
    fn down_workers_are_skipped_and_forget_sessions() {
        let p = pool(2, Policy::LeastConnections);
        let a = p.pick_for_session(ip()).expect("up");
        let g = a.generation();
        assert!(p.mark_down(&a));
        assert_eq!(a.sessions(), 0);
        for _ in 0..5 {
            assert_ne!(p.pick_for_session(ip()).map(|w| w.id), Some(a.id));
            assert_ne!(p.pick_for_request(None).map(|w| w.id), Some(a.id));
        }
        a.session_ended(g); // stale: must not underflow or count
        assert_eq!(a.sessions(), 0);
        // All down: a down worker is tried, never the one just excluded.
        let b = p.workers().into_iter().find(|w| w.id != a.id).expect("two");
        p.mark_down(&b);
        assert!(p.pick_for_session(ip()).is_some());
        assert_eq!(p.pick_for_request(Some(a.id)).map(|w| w.id), Some(b.id));
    }

    #[test]
    fn starting_and_draining_workers_get_nothing_new() {
        let p = pool(1, Policy::LeastConnections);
        let old = p.workers()[0].clone();
        let new = p.add(SocketAddr::from(([127, 0, 0, 1], 6000)), true);
        for _ in 0..4 {
            assert_eq!(p.pick_for_request(None).map(|w| w.id), Some(old.id));
        }
        p.set_ready(&new);
        p.drain(&old);
        let g = old.generation();
        for _ in 0..4 {
            assert_eq!(p.pick_for_session(ip()).map(|w| w.id), Some(new.id));
        }
        assert_eq!(old.generation(), g, "draining keeps sessions valid");
        p.retire(&old);
        assert_ne!(old.generation(), g);
        assert_eq!(p.workers().len(), 1);
        // A passive mark cannot move a starting worker.
        p.set_starting(&new);
        assert!(!p.mark_down(&new));
        assert_eq!(new.state(), State::Starting);
    }

    #[test]
    fn ip_hash_puts_one_address_on_one_worker() {
        let p = pool(2, Policy::IpHash);
        let first = p.pick_for_session(ip()).map(|w| w.id);
        for _ in 0..20 {
            assert_eq!(p.pick_for_session(ip()).map(|w| w.id), first);
        }
    }

    #[test]
    fn requests_go_to_least_busy() {
        let p = pool(3, Policy::RoundRobin);
        let ws = p.workers();
        let _a = ws[0].start_request();
        let _b = ws[1].start_request();
        assert_eq!(p.pick_for_request(None).map(|w| w.id), Some(2));
        assert_ne!(p.pick_for_request(Some(2)).map(|w| w.id), Some(2));
    }
}
