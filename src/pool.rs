//! The worker pool: the set of upstream workers, whether each is up, and the load
//! counters the balancer reads (requests in flight, live Engine.IO sessions).
//!
//! It owns worker health (passive marks from failed connects, active checks that bring
//! workers back) and the choice of a worker for a new session or a plain request. It
//! knows nothing of session ids: the router owns those. Each worker carries a
//! `generation` that moves every time it goes down, so the router can tell that the
//! sessions it remembers for that worker died with it.

use crate::config::{Health, Policy};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One upstream worker.
#[derive(Debug)]
pub struct Worker {
    pub id: usize,
    pub addr: SocketAddr,
    up: AtomicBool,
    generation: AtomicU64,
    inflight: AtomicUsize,
    sessions: AtomicUsize,
}

impl Worker {
    fn new(id: usize, addr: SocketAddr) -> Worker {
        Worker {
            id,
            addr,
            up: AtomicBool::new(true),
            generation: AtomicU64::new(0),
            inflight: AtomicUsize::new(0),
            sessions: AtomicUsize::new(0),
        }
    }
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }
    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }
}

/// The workers and the balancing policy for new sessions.
#[derive(Debug)]
pub struct Pool {
    workers: Vec<Worker>,
    policy: Policy,
    next: AtomicUsize,
}

impl Pool {
    pub fn new(addrs: &[SocketAddr], policy: Policy) -> Pool {
        Pool {
            workers: addrs
                .iter()
                .enumerate()
                .map(|(i, a)| Worker::new(i, *a))
                .collect(),
            policy,
            next: AtomicUsize::new(0),
        }
    }

    pub fn workers(&self) -> &[Worker] {
        &self.workers
    }

    pub fn worker(&self, id: usize) -> &Worker {
        &self.workers[id]
    }

    /// Marks a worker down (its sessions are void from now on). Returns whether it was up.
    pub fn mark_down(&self, id: usize) -> bool {
        let w = &self.workers[id];
        let was_up = w.up.swap(false, Ordering::AcqRel);
        if was_up {
            w.generation.fetch_add(1, Ordering::AcqRel);
            w.sessions.store(0, Ordering::Relaxed);
            tracing::warn!(worker = id, addr = %w.addr, "worker marked down");
        }
        was_up
    }

    pub fn mark_up(&self, id: usize) {
        let w = &self.workers[id];
        if !w.up.swap(true, Ordering::AcqRel) {
            tracing::info!(worker = id, addr = %w.addr, "worker is up");
        }
    }

    /// Chooses the worker for a new Engine.IO session and counts the session on it.
    pub fn pick_for_session(&self, client: IpAddr) -> Option<usize> {
        let id = match self.policy {
            Policy::LeastConnections => self.least_by(|w| w.sessions(), None),
            Policy::RoundRobin => self.round_robin(),
            Policy::IpHash => self.by_ip(client),
        }?;
        self.workers[id].sessions.fetch_add(1, Ordering::Relaxed);
        Some(id)
    }

    /// Chooses the worker for a plain request: fewest requests in flight, skipping
    /// `exclude` (a worker that just failed).
    pub fn pick_for_request(&self, exclude: Option<usize>) -> Option<usize> {
        self.least_by(|w| w.inflight(), exclude)
    }

    /// Forgets one session counted on a worker, unless the worker went down since
    /// (`generation` differs), which already forgot them all.
    pub fn session_ended(&self, id: usize, generation: u64) {
        let w = &self.workers[id];
        if w.generation() == generation {
            // Never below zero, even if a down/up race reset the count.
            let _ = w
                .sessions
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        }
    }

    /// Counts a request in flight on a worker until the guard is dropped.
    pub fn start_request(self: &Arc<Self>, id: usize) -> InflightGuard {
        self.workers[id].inflight.fetch_add(1, Ordering::Relaxed);
        InflightGuard {
            pool: self.clone(),
            id,
        }
    }

    /// Lowest `load` among up workers; ties go round-robin so equal workers share.
    /// With every worker down, any worker is tried (as nginx does), so the client
    /// gets a 502 naming the worker that failed rather than a vague 503.
    fn least_by(&self, load: impl Fn(&Worker) -> usize, exclude: Option<usize>) -> Option<usize> {
        self.least_up_by(&load, exclude)
            .or_else(|| self.any_but(exclude))
    }

    fn any_but(&self, exclude: Option<usize>) -> Option<usize> {
        let n = self.workers.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| Some(i) != exclude)
    }

    fn least_up_by(
        &self,
        load: &impl Fn(&Worker) -> usize,
        exclude: Option<usize>,
    ) -> Option<usize> {
        let n = self.workers.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<(usize, usize)> = None;
        for k in 0..n {
            let i = (start + k) % n;
            let w = &self.workers[i];
            if !w.is_up() || Some(i) == exclude {
                continue;
            }
            let l = load(w);
            if best.is_none_or(|(_, b)| l < b) {
                best = Some((i, l));
            }
        }
        best.map(|(i, _)| i)
    }

    fn round_robin(&self) -> Option<usize> {
        let n = self.workers.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| self.workers[i].is_up())
            .or_else(|| self.any_but(None))
    }

    /// nginx-style ip_hash: the same address always lands on the same worker while
    /// that worker is up; otherwise the next up worker.
    fn by_ip(&self, ip: IpAddr) -> Option<usize> {
        let n = self.workers.len();
        let h = match ip {
            // nginx hashes the first three octets of an IPv4 address.
            IpAddr::V4(v4) => {
                let o = v4.octets();
                fnv(&o[..3])
            }
            IpAddr::V6(v6) => fnv(&v6.octets()),
        };
        let start = (h % n as u64) as usize;
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| self.workers[i].is_up())
            .or_else(|| self.any_but(None))
    }
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    })
}

/// Decrements a worker's in-flight count when dropped.
#[derive(Debug)]
pub struct InflightGuard {
    pool: Arc<Pool>,
    id: usize,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.pool.workers[self.id]
            .inflight
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Checks every worker at `health.interval`: marks up those that answer, down those
/// that do not. Runs until the runtime stops.
pub fn spawn_health_checks(pool: Arc<Pool>, health: Health) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(health.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let checks = pool.workers().iter().map(|w| {
                let (id, addr, path) = (w.id, w.addr, health.path.clone());
                let timeout = health.timeout;
                async move { (id, check(addr, &path, timeout).await) }
            });
            for (id, healthy) in futures_join_all(checks).await {
                if healthy {
                    pool.mark_up(id);
                } else {
                    pool.mark_down(id);
                }
            }
        }
    });
}

async fn futures_join_all<F>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

/// One health check: a TCP connect, or, with a path, a GET answered 2xx or 3xx.
pub async fn check(addr: SocketAddr, path: &str, timeout: Duration) -> bool {
    tokio::time::timeout(timeout, async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        if path.is_empty() {
            return Some(true);
        }
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: corral-health\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await.ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.ok()?;
        // "HTTP/1.1 200"
        Some(head.starts_with(b"HTTP/1.") && matches!(head[9], b'2' | b'3'))
    })
    .await
    .ok()
    .flatten()
    .unwrap_or(false)
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

    #[test]
    fn least_connections_spreads_evenly() {
        let p = pool(4, Policy::LeastConnections);
        let ip = IpAddr::from([127, 0, 0, 1]);
        let mut counts = [0; 4];
        for _ in 0..100 {
            counts[p.pick_for_session(ip).expect("up")] += 1;
        }
        assert_eq!(counts, [25; 4]);
    }

    #[test]
    fn down_workers_are_skipped_and_forget_sessions() {
        let p = pool(2, Policy::LeastConnections);
        let ip = IpAddr::from([127, 0, 0, 1]);
        let a = p.pick_for_session(ip).expect("up");
        let g = p.worker(a).generation();
        assert!(p.mark_down(a));
        assert_eq!(p.worker(a).sessions(), 0);
        for _ in 0..5 {
            assert_ne!(p.pick_for_session(ip), Some(a));
            assert_ne!(p.pick_for_request(None), Some(a));
        }
        p.session_ended(a, g); // stale: must not underflow or count
        assert_eq!(p.worker(a).sessions(), 0);
        // All down: any worker is tried, never the one just excluded.
        p.mark_down(1 - a);
        assert!(p.pick_for_session(ip).is_some());
        assert_eq!(p.pick_for_request(Some(a)), Some(1 - a));
    }

    #[test]
    fn ip_hash_puts_one_address_on_one_worker() {
        let p = pool(2, Policy::IpHash);
        let ip = IpAddr::from([127, 0, 0, 1]);
        let first = p.pick_for_session(ip);
        for _ in 0..20 {
            assert_eq!(p.pick_for_session(ip), first);
        }
    }

    #[test]
    fn requests_go_to_least_busy() {
        let p = Arc::new(pool(3, Policy::RoundRobin));
        let _a = p.start_request(0);
        let _b = p.start_request(1);
        assert_eq!(p.pick_for_request(None), Some(2));
        assert_ne!(p.pick_for_request(Some(2)), Some(2));
    }
}
