//! The global counters the data path bumps: the request latency histogram,
//! Engine.IO handshakes, "Session ID unknown" answers, hops between nodes, bytes,
//! dropped access log lines.
//!
//! A leaf: lock-free atomics that every part may write to and that use no other
//! part of corral. The views that read them (`observe::metrics`, served by the
//! status listener in `edge::status`) sit above.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the request latency buckets.
pub const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The counters, shared by every connection.
#[derive(Debug, Default)]
pub struct Counters {
    latency_buckets: [AtomicU64; BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
    pub handshakes: AtomicU64,
    pub unknown_sid: AtomicU64,
    /// Requests sent to another corral node by their tag, and received from one.
    pub hops_out: AtomicU64,
    pub hops_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub access_log_dropped: AtomicU64,
}

/// The latency histogram as read at one moment.
pub struct Latency {
    /// Count per bucket of `BUCKETS` (not cumulative).
    pub buckets: [u64; BUCKETS.len()],
    pub count: u64,
    pub sum: Duration,
}

impl Counters {
    /// Time from the request to the worker's response head.
    pub fn observe_latency(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// The histogram now.
    pub fn latency(&self) -> Latency {
        Latency {
            buckets: std::array::from_fn(|i| read(&self.latency_buckets[i])),
            count: read(&self.latency_count),
            sum: Duration::from_micros(read(&self.latency_sum_us)),
        }
    }
}

/// A counter's value.
pub fn read(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_latency_lands_in_its_bucket() {
        let c = Counters::default();
        c.observe_latency(Duration::from_micros(500));
        c.observe_latency(Duration::from_millis(30));
        c.observe_latency(Duration::from_secs(100));
        let l = c.latency();
        assert_eq!(l.count, 3);
        assert_eq!(l.buckets[0], 1);
        assert_eq!(l.buckets[5], 1);
        assert_eq!(l.buckets.iter().sum::<u64>(), 2, "100 s is only in +Inf");
    }
}
