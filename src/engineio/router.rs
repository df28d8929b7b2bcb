//! The router: the Engine.IO session table, mapping each `sid` to the worker that
//! issued it, and the decision of where a request on the Engine.IO path goes.
//!
//! It owns the table and its bounds (idle expiry, a cap on entries). It asks the pool
//! for a worker when a session starts and tells it when one ends; it must not touch
//! worker health or connections. Sessions of a worker that went down are recognised by
//! the worker's generation and answered as unknown, so their clients reconnect at once.

use crate::engineio::protocol::Handshake;
use crate::runtime::handover;
use crate::workers::pool::{Pool, Worker};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a session whose websocket closed is kept if no polling request is in
/// flight: a failed upgrade probe falls back to polling, a finished session does not.
const AFTER_TUNNEL: Duration = Duration::from_secs(5);
/// Added to pingInterval + pingTimeout before an idle session is forgotten.
const IDLE_SLACK: Duration = Duration::from_secs(15);
/// Used until a handshake tells the real ping settings (python-engineio's defaults).
const DEFAULT_LIVENESS: Duration = Duration::from_secs(45);

#[derive(Debug)]
struct Session {
    worker: Arc<Worker>,
    generation: u64,
    last_seen: Instant,
    idle: Duration,
    inflight: u32,
    tunnels: u32,
    tunnel_closed: bool,
}

impl Session {
    fn expired(&self, now: Instant) -> bool {
        if self.inflight > 0 || self.tunnels > 0 {
            return false;
        }
        let bound = if self.tunnel_closed {
            AFTER_TUNNEL
        } else {
            self.idle
        };
        now.duration_since(self.last_seen) > bound
    }
}

/// Puts a new session in the table. An entry it replaces (a worker reused a sid)
/// gives its count back.
fn remember(
    table: &mut HashMap<String, Session>,
    sid: String,
    worker: Arc<Worker>,
    generation: u64,
    idle: Duration,
) {
    let session = Session {
        worker,
        generation,
        last_seen: Instant::now(),
        idle,
        inflight: 0,
        tunnels: 0,
        tunnel_closed: false,
    };
    if let Some(old) = table.insert(sid, session) {
        old.worker.session_ended(old.generation);
    }
}

/// Where a request on the Engine.IO path goes.
#[derive(Debug)]
pub enum Route {
    /// A known session's worker; the ticket keeps the session alive while in use.
    Session(SessionTicket),
    /// A new session (handshake) on this worker; learn its sid from the response.
    New(NewSession),
    /// The sid is not (or no longer) known: answer as an Engine.IO server would.
    UnknownSid,
    /// No worker is up.
    NoWorker,
    /// The session table is at its cap.
    Full,
}

pub struct Router {
    pool: Arc<Pool>,
    table: Mutex<HashMap<String, Session>>,
    /// `engineio.max_sessions` and `session_idle` (in ms, 0: none), which a config
    /// reload may change.
    max_sessions: AtomicUsize,
    idle_override_ms: AtomicU64,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("sessions", &self.len())
            .finish()
    }
}

impl Router {
    pub fn new(pool: Arc<Pool>, max_sessions: usize, idle_override: Option<Duration>) -> Router {
        Router {
            pool,
            table: Mutex::new(HashMap::new()),
            max_sessions: AtomicUsize::new(max_sessions),
            idle_override_ms: AtomicU64::new(idle_ms(idle_override)),
        }
    }

    /// The session table's bounds from now on (a config reload); remembered
    /// sessions keep theirs.
    pub fn set_bounds(&self, max_sessions: usize, idle_override: Option<Duration>) {
        self.max_sessions.store(max_sessions, Ordering::Relaxed);
        self.idle_override_ms
            .store(idle_ms(idle_override), Ordering::Relaxed);
    }

    fn max_sessions(&self) -> usize {
        self.max_sessions.load(Ordering::Relaxed)
    }

    fn idle_override(&self) -> Option<Duration> {
        match self.idle_override_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    fn table(&self) -> MutexGuard<'_, HashMap<String, Session>> {
        // A panic while holding the lock cannot leave the map inconsistent (every
        // update is a single insert/remove/field write), so a poisoned lock is usable.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of remembered sessions.
    pub fn len(&self) -> usize {
        self.table().len()
    }

    /// Routes a request that carries `sid`.
    pub fn existing(self: &Arc<Self>, sid: &str) -> Route {
        let mut table = self.table();
        let Some(s) = table.get_mut(sid) else {
            return Route::UnknownSid;
        };
        if s.worker.generation() != s.generation {
            // Its worker went down (or was retired) since: the session died with it.
            table.remove(sid);
            return Route::UnknownSid;
        }
        s.inflight += 1;
        Route::Session(SessionTicket {
            router: self.clone(),
            sid: sid.to_owned(),
            worker: s.worker.clone(),
            tunnel: false,
            answered: false,
        })
    }

    /// Routes a request whose tag names `worker` (`sidtag`): its session as known,
    /// or, when this corral has not seen the session (it was restarted), the
    /// session taken on as the worker's, counted and expired like the others.
    pub fn tagged(self: &Arc<Self>, sid: &str, worker: Arc<Worker>) -> Route {
        let mut table = self.table();
        let known = table.get(sid).is_some_and(|s| {
            Arc::ptr_eq(&s.worker, &worker) && s.worker.generation() == s.generation
        });
        if !known {
            if table.len() >= self.max_sessions() {
                return Route::Full;
            }
            worker.session_adopted();
            let idle = self
                .idle_override()
                .unwrap_or(DEFAULT_LIVENESS + IDLE_SLACK);
            let generation = worker.generation();
            remember(&mut table, sid.to_owned(), worker.clone(), generation, idle);
            tracing::debug!(sid, worker = worker.id, "session taken on from its tag");
        }
        let Some(s) = table.get_mut(sid) else {
            return Route::UnknownSid;
        };
        s.inflight += 1;
        Route::Session(SessionTicket {
            router: self.clone(),
            sid: sid.to_owned(),
            worker,
            tunnel: false,
            answered: false,
        })
    }

    /// Routes a handshake (no sid): picks a worker by the balancing policy.
    pub fn handshake(self: &Arc<Self>, client: IpAddr) -> Route {
        if self.len() >= self.max_sessions() {
            self.sweep();
            if self.len() >= self.max_sessions() {
                return Route::Full;
            }
        }
        match self.pool.pick_for_session(client) {
            Some(worker) => Route::New(NewSession {
                router: self.clone(),
                generation: worker.generation(),
                worker,
                learned: false,
            }),
            None => Route::NoWorker,
        }
    }

    /// A session counted on `worker` and not remembered (a websocket-only session
    /// an upgrade carried): dropping it ends the count.
    pub fn count_on(self: &Arc<Self>, worker: Arc<Worker>) -> NewSession {
        worker.session_adopted();
        NewSession {
            router: self.clone(),
            generation: worker.generation(),
            worker,
            learned: false,
        }
    }

    /// Removes expired sessions and sessions of workers that went down.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let mut ended = 0;
        self.table().retain(|_, s| {
            let stale = s.worker.generation() != s.generation;
            if stale || s.expired(now) {
                s.worker.session_ended(s.generation);
                ended += 1;
                false
            } else {
                true
            }
        });
        ended
    }

    fn learn(&self, worker: Arc<Worker>, generation: u64, hs: &Handshake) {
        let idle = self
            .idle_override()
            .unwrap_or_else(|| hs.liveness.unwrap_or(DEFAULT_LIVENESS) + IDLE_SLACK);
        remember(&mut self.table(), hs.sid.clone(), worker, generation, idle);
    }

    fn release(&self, sid: &str, tunnel: bool, answered: bool) {
        let mut table = self.table();
        if let Some(s) = table.get_mut(sid) {
            // Only a request the worker answered with success shows the session is
            // alive: a client retrying a dead sid must not keep it remembered.
            if answered || tunnel {
                s.last_seen = Instant::now();
            }
            if tunnel {
                s.tunnels = s.tunnels.saturating_sub(1);
                s.tunnel_closed = true;
            } else {
                s.inflight = s.inflight.saturating_sub(1);
            }
        }
    }

    fn open_tunnel(&self, sid: &str) {
        if let Some(s) = self.table().get_mut(sid) {
            s.tunnels += 1;
            s.inflight = s.inflight.saturating_sub(1);
        }
    }
}

impl Router {
    /// The live sessions as an upgrade carries them (those of a worker gone down
    /// since are left behind, as `existing` would forget them).
    pub fn carry(&self) -> Vec<handover::Session> {
        let now = Instant::now();
        self.table()
            .iter()
            .filter(|(_, s)| s.worker.generation() == s.generation)
            .map(|(sid, s)| handover::Session {
                sid: sid.clone(),
                worker: s.worker.id,
                idle_ms: s.idle.as_millis() as u64,
                seen_ms_ago: now.duration_since(s.last_seen).as_millis() as u64,
                tunnel_closed: s.tunnel_closed || s.tunnels > 0,
            })
            .collect()
    }

    /// Takes on the sessions an upgrade carried, each on its worker (found by id,
    /// up), counted there and expiring as it would have; before any request.
    /// Returns how many were taken.
    pub fn adopt(&self, sessions: Vec<handover::Session>) -> usize {
        let workers = self.pool.workers();
        let now = Instant::now();
        let mut table = self.table();
        let mut taken = 0;
        for s in sessions {
            let Some(worker) = workers.iter().find(|w| w.id == s.worker && w.is_up()) else {
                continue;
            };
            worker.session_adopted();
            let seen = now.checked_sub(Duration::from_millis(s.seen_ms_ago));
            let session = Session {
                worker: worker.clone(),
                generation: worker.generation(),
                last_seen: seen.unwrap_or(now),
                idle: Duration::from_millis(s.idle_ms),
                inflight: 0,
                tunnels: 0,
                tunnel_closed: s.tunnel_closed,
            };
            if let Some(old) = table.insert(s.sid, session) {
                old.worker.session_ended(old.generation);
            }
            taken += 1;
        }
        taken
    }
}

fn idle_ms(d: Option<Duration>) -> u64 {
    d.map_or(0, |d| (d.as_millis() as u64).max(1))
}

/// Runs `sweep` periodically so idle sessions are forgotten and memory stays bounded.
pub fn spawn_sweeper(router: Arc<Router>, every: Duration, bg: &crate::runtime::life::Life) {
    bg.spawn_until_drained(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let n = router.sweep();
            if n > 0 {
                tracing::debug!(forgotten = n, left = router.len(), "session sweep");
            }
        }
    });
}

/// A request of a known session in flight. Dropping it marks the request finished.
#[derive(Debug)]
pub struct SessionTicket {
    router: Arc<Router>,
    sid: String,
    pub worker: Arc<Worker>,
    tunnel: bool,
    answered: bool,
}

impl SessionTicket {
    /// Its session's sid.
    pub fn sid(&self) -> &str {
        &self.sid
    }

    /// The worker answered this request with success.
    pub fn answered(&mut self) {
        self.answered = true;
    }

    /// This request became a websocket tunnel: the session lives while it is open.
    pub fn into_tunnel(mut self) -> SessionTicket {
        self.router.open_tunnel(&self.sid);
        self.tunnel = true;
        self
    }
}

impl Drop for SessionTicket {
    fn drop(&mut self) {
        self.router.release(&self.sid, self.tunnel, self.answered);
    }
}

/// A session being created on `worker`. Until `learn` records its sid, dropping it
/// gives back the session counted on the worker.
#[derive(Debug)]
pub struct NewSession {
    router: Arc<Router>,
    pub worker: Arc<Worker>,
    generation: u64,
    learned: bool,
}

impl NewSession {
    /// Records the sid from the worker's handshake response.
    pub fn learn(mut self, hs: &Handshake) {
        self.router.learn(self.worker.clone(), self.generation, hs);
        self.learned = true;
    }
}

impl Drop for NewSession {
    fn drop(&mut self) {
        // A websocket-only session is never learned: it ends when this is dropped
        // with its tunnel; a failed handshake ends here too.
        if !self.learned {
            self.worker.session_ended(self.generation);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Policy;
    use std::net::SocketAddr;

    fn router(n: usize) -> Arc<Router> {
        let addrs: Vec<SocketAddr> = (0..n)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], 6000 + i as u16)))
            .collect();
        let pool = Arc::new(Pool::new(&addrs, Policy::LeastConnections));
        Arc::new(Router::new(pool, 10, Some(Duration::from_millis(50))))
    }

    fn hs(sid: &str) -> Handshake {
        Handshake {
            sid: sid.into(),
            liveness: None,
        }
    }

    fn new_on(r: &Arc<Router>) -> NewSession {
        match r.handshake(IpAddr::from([127, 0, 0, 1])) {
            Route::New(n) => n,
            other => panic!("expected a new session, got {other:?}"),
        }
    }

    #[test]
    fn learned_sid_routes_to_its_worker() {
        let r = router(3);
        let n = new_on(&r);
        let w = n.worker.id;
        n.learn(&hs("abc"));
        for _ in 0..10 {
            match r.existing("abc") {
                Route::Session(t) => assert_eq!(t.worker.id, w),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(r.existing("nope"), Route::UnknownSid));
    }

    #[test]
    fn failed_handshake_gives_back_the_count() {
        let r = router(1);
        let n = new_on(&r);
        let w = n.worker.clone();
        assert_eq!(w.sessions(), 1);
        drop(n);
        assert_eq!(w.sessions(), 0);
    }

    #[test]
    fn idle_sessions_expire_but_busy_ones_stay() {
        let r = router(2);
        new_on(&r).learn(&hs("idle"));
        new_on(&r).learn(&hs("busy"));
        let ticket = match r.existing("busy") {
            Route::Session(t) => t,
            other => panic!("{other:?}"),
        };
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(r.sweep(), 1);
        assert!(matches!(r.existing("idle"), Route::UnknownSid));
        drop(ticket);
        // The busy request was never answered: it does not prove the session alive.
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(r.sweep(), 1);
        assert_eq!(r.len(), 0);
        new_on(&r).learn(&hs("ok"));
        let total: usize = r.pool.workers().iter().map(|w| w.sessions()).sum();
        assert_eq!(total, 1);
    }

    #[test]
    fn closed_tunnel_ends_session_soon() {
        let r = router(1);
        new_on(&r).learn(&hs("ws"));
        let t = match r.existing("ws") {
            Route::Session(t) => t.into_tunnel(),
            other => panic!("{other:?}"),
        };
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(r.sweep(), 0, "an open tunnel keeps the session");
        drop(t);
        assert_eq!(r.len(), 1, "kept for a moment in case polling goes on");
    }

    #[test]
    fn worker_down_voids_its_sessions() {
        let r = router(2);
        let n = new_on(&r);
        let w = n.worker.clone();
        n.learn(&hs("s1"));
        r.pool.mark_down(&w);
        assert!(matches!(r.existing("s1"), Route::UnknownSid));
        assert_eq!(r.len(), 0);
    }

    #[test]
    fn table_is_capped() {
        let r = router(2);
        for i in 0..10 {
            new_on(&r).learn(&hs(&format!("s{i}")));
        }
        // Nothing has expired yet: the next handshake is refused.
        let _busy: Vec<_> = (0..10)
            .map(|i| match r.existing(&format!("s{i}")) {
                Route::Session(t) => t,
                other => panic!("{other:?}"),
            })
            .collect();
        assert!(matches!(
            r.handshake(IpAddr::from([127, 0, 0, 1])),
            Route::Full
        ));
    }
}
