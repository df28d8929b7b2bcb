//! The Prometheus text and status JSON views, and the history of sessions and
//! requests/s behind the status page's charts.
//!
//! It reads counters, the pool, the router and the broker, and changes nothing it
//! reads; nothing below it imports it.

use crate::broker::Broker;
use crate::engineio::router::Router;
use crate::observe::counters::{read, Counters, BUCKETS};
use crate::workers::pool::{Pool, State, Worker};
use serde::Serialize;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One history sample every this long; HISTORY of them (5 minutes).
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);
const HISTORY: usize = 150;

#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since corral started.
    t: u64,
    sessions: usize,
    rps: f64,
}

/// How the message queue is set up, for the status page.
#[derive(Clone)]
pub enum Queue {
    None,
    External(String),
    Embedded(Arc<Broker>, String),
}

/// Everything the admin listener reports from.
pub struct Sources {
    pub counters: Arc<Counters>,
    /// Sessions and requests/s, one sample every SAMPLE_EVERY.
    pub history: Mutex<VecDeque<Sample>>,
    pub pool: Arc<Pool>,
    pub router: Arc<Router>,
    pub queue: Queue,
    pub started: Instant,
    pub policy: String,
    /// This node's name (`cluster.node`).
    pub node: String,
}

/// Records sessions and requests/s every SAMPLE_EVERY for the status charts.
pub fn spawn_sampler(src: Arc<Sources>, bg: &crate::runtime::tasks::Background) {
    bg.spawn(async move {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        let mut last_requests = total_requests(&src.pool);
        let mut last = Instant::now();
        loop {
            tick.tick().await;
            let now = total_requests(&src.pool);
            let secs = last.elapsed().as_secs_f64().max(0.001);
            let sample = Sample {
                t: src.started.elapsed().as_secs(),
                sessions: src.pool.workers().iter().map(|w| w.sessions()).sum(),
                rps: now.saturating_sub(last_requests) as f64 / secs,
            };
            for w in src.pool.workers() {
                w.traffic.sample_rate(secs);
            }
            last_requests = now;
            last = Instant::now();
            let mut h = src.history.lock().unwrap_or_else(|e| e.into_inner());
            if h.len() == HISTORY {
                h.pop_front();
            }
            h.push_back(sample);
        }
    });
}

fn total_requests(pool: &Pool) -> u64 {
    pool.workers()
        .iter()
        .map(|w| w.traffic.requests_total())
        .sum()
}

/// A label value as the exposition format wants it.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The Prometheus text exposition (format 0.0.4).
pub fn prometheus(src: &Sources) -> String {
    let m = &src.counters;
    let mut e = Exposition::default();
    let workers = src.pool.workers();

    let n = e.family(
        "corral_node_info",
        "gauge",
        "This corral node (cluster.node), always 1.",
    );
    e.line(format!("{n}{{node=\"{}\"}} 1", escape_label(&src.node)));

    let n = e.family(
        "corral_requests_total",
        "counter",
        "Responses passed from workers, by worker and status class.",
    );
    for w in &workers {
        for (class, count) in w.traffic.requests_by_class().iter().enumerate() {
            e.line(format!(
                "{n}{{worker=\"{}\",addr=\"{}\",class=\"{}xx\"}} {count}",
                w.id,
                w.addr,
                class + 1
            ));
        }
    }

    let n = e.family(
        "corral_request_duration_seconds",
        "histogram",
        "Time from request to the worker's response head.",
    );
    let latency = m.latency();
    let mut cumulative = 0;
    for (b, in_bucket) in BUCKETS.iter().zip(latency.buckets) {
        cumulative += in_bucket;
        e.line(format!("{n}_bucket{{le=\"{b}\"}} {cumulative}"));
    }
    let count = latency.count;
    e.line(format!("{n}_bucket{{le=\"+Inf\"}} {count}"));
    e.line(format!("{n}_sum {}", latency.sum.as_secs_f64()));
    e.line(format!("{n}_count {count}"));

    for (name, help, get) in [
        (
            "corral_engineio_sessions",
            "Live Engine.IO sessions per worker.",
            (|w: &Worker| w.sessions() as u64) as fn(&Worker) -> u64,
        ),
        (
            "corral_websocket_tunnels",
            "Open websocket tunnels per worker.",
            |w| w.traffic.tunnels() as u64,
        ),
        (
            "corral_requests_in_flight",
            "Requests in flight per worker.",
            |w| w.inflight() as u64,
        ),
        (
            "corral_upstream_idle_connections",
            "Kept-alive connections to the worker waiting for a request.",
            |w| w.conns.len() as u64,
        ),
        (
            "corral_worker_up",
            "1 when the worker takes new traffic.",
            |w| u64::from(w.state() == State::Up),
        ),
    ] {
        let n = e.family(name, "gauge", help);
        for w in &workers {
            e.line(format!(
                "{n}{{worker=\"{}\",addr=\"{}\"}} {}",
                w.id,
                w.addr,
                get(w)
            ));
        }
    }
    let n = e.family(
        "corral_worker_restarts_total",
        "counter",
        "Times a supervised worker was restarted after exiting.",
    );
    for w in &workers {
        e.line(format!(
            "{n}{{worker=\"{}\",addr=\"{}\"}} {}",
            w.id,
            w.addr,
            w.process.restarts()
        ));
    }

    for (name, help, value) in [
        ("corral_engineio_handshakes_total", "Engine.IO handshakes routed to a worker.", read(&m.handshakes)),
        ("corral_engineio_unknown_sid_total", "Requests answered \"Session ID unknown\" (the thrash counter: near 0 when sessions stick).", read(&m.unknown_sid)),
        ("corral_cluster_forwarded_total", "Requests sent to another corral node because their sid's tag names it.", read(&m.hops_out)),
        ("corral_cluster_received_total", "Requests another corral node sent here.", read(&m.hops_in)),
        ("corral_bytes_in_total", "Bytes received from clients (bodies and tunnels).", read(&m.bytes_in)),
        ("corral_bytes_out_total", "Bytes sent to clients (bodies and tunnels).", read(&m.bytes_out)),
        ("corral_access_log_dropped_total", "Access log lines dropped because the writer fell behind.", read(&m.access_log_dropped)),
    ] {
        let n = e.family(name, "counter", help);
        e.line(format!("{n} {value}"));
    }
    let n = e.family(
        "corral_sessions_remembered",
        "gauge",
        "Entries in the session table.",
    );
    e.line(format!("{n} {}", src.router.len()));

    if let Queue::Embedded(broker, _) = &src.queue {
        let s = broker.stats();
        for (name, kind, help, value) in [
            (
                "corral_mq_connections",
                "gauge",
                "Clients connected to the embedded message queue.",
                s.connected,
            ),
            (
                "corral_mq_subscriptions",
                "gauge",
                "Channel, pattern and shard subscriptions.",
                s.subscriptions,
            ),
            (
                "corral_mq_messages_published_total",
                "counter",
                "PUBLISH and SPUBLISH commands.",
                s.published,
            ),
            (
                "corral_mq_messages_delivered_total",
                "counter",
                "Messages queued to subscribers.",
                s.delivered,
            ),
            (
                "corral_mq_messages_dropped_total",
                "counter",
                "Messages not delivered: the subscriber was over its output limit.",
                s.dropped,
            ),
            (
                "corral_mq_clients_over_limit_total",
                "counter",
                "Subscribers disconnected at their output limit.",
                s.over_limit,
            ),
        ] {
            let n = e.family(name, kind, help);
            e.line(format!("{n} {value}"));
        }
    }
    e.out
}

/// Builds the text exposition: a HELP/TYPE header per family, then its samples.
#[derive(Default)]
struct Exposition {
    out: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) -> String {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        name.to_string()
    }
    fn line(&mut self, sample: String) {
        self.out.push_str(&sample);
        self.out.push('\n');
    }
}

#[derive(Serialize)]
struct WorkerJson {
    id: usize,
    pid: Option<u32>,
    addr: String,
    port: u16,
    state: &'static str,
    managed: bool,
    sessions: usize,
    tunnels: usize,
    inflight: usize,
    requests: u64,
    rps: f64,
    restarts: u64,
    uptime_s: Option<u64>,
}

#[derive(Serialize)]
struct QueueJson {
    kind: &'static str,
    url: Option<String>,
    connections: Option<u64>,
    subscriptions: Option<u64>,
    published: Option<u64>,
    delivered: Option<u64>,
    dropped: Option<u64>,
}

/// The data behind /status, as JSON.
pub fn status_json(src: &Sources) -> serde_json::Value {
    let m = &src.counters;
    let workers: Vec<WorkerJson> = src
        .pool
        .workers()
        .iter()
        .map(|w| WorkerJson {
            id: w.id,
            pid: w.process.pid(),
            addr: w.addr.to_string(),
            port: w.addr.port(),
            state: w.state().name(),
            managed: w.managed,
            sessions: w.sessions(),
            tunnels: w.traffic.tunnels(),
            inflight: w.inflight(),
            requests: w.traffic.requests_total(),
            rps: w.traffic.rate(),
            restarts: w.process.restarts(),
            uptime_s: w.process.uptime().map(|d| d.as_secs()),
        })
        .collect();
    let queue = match &src.queue {
        Queue::None => QueueJson {
            kind: "none",
            url: None,
            connections: None,
            subscriptions: None,
            published: None,
            delivered: None,
            dropped: None,
        },
        Queue::External(url) => QueueJson {
            kind: "external",
            url: Some(url.clone()),
            connections: None,
            subscriptions: None,
            published: None,
            delivered: None,
            dropped: None,
        },
        Queue::Embedded(b, url) => {
            let s = b.stats();
            QueueJson {
                kind: "embedded",
                url: Some(url.clone()),
                connections: Some(s.connected),
                subscriptions: Some(s.subscriptions),
                published: Some(s.published),
                delivered: Some(s.delivered),
                dropped: Some(s.dropped),
            }
        }
    };
    let history: Vec<Sample> = src
        .history
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .cloned()
        .collect();
    serde_json::json!({
        "uptime_s": src.started.elapsed().as_secs(),
        "policy": src.policy,
        "totals": {
            "workers": workers.len(),
            "up": workers.iter().filter(|w| w.state == "up").count(),
            "sessions": workers.iter().map(|w| w.sessions).sum::<usize>(),
            "tunnels": workers.iter().map(|w| w.tunnels).sum::<usize>(),
            "requests": workers.iter().map(|w| w.requests).sum::<u64>(),
            "rps": workers.iter().map(|w| w.rps).sum::<f64>(),
            "handshakes": read(&m.handshakes),
            "unknown_sid": read(&m.unknown_sid),
            "forwarded_to_nodes": read(&m.hops_out),
            "received_from_nodes": read(&m.hops_in),
        },
        "node": src.node,
        "workers": workers,
        "message_queue": queue,
        "history": history,
    })
}
