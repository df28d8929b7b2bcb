//! The Prometheus text and status JSON views, and the history of sessions and
//! requests/s behind the status page's charts.
//!
//! It reads counters, the pool, the router and the broker, and changes nothing it
//! reads; nothing below it imports it.

use crate::broker::Broker;
use crate::counters::{read, Counters, BUCKETS};
use crate::engineio::router::Router;
use crate::workers::pool::{Pool, State, Worker};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{text, DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use serde::Serialize;
use std::collections::VecDeque;
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
    /// This node's name (`cluster.node`).
    pub node: String,
    /// What the config reloads did.
    pub reloads: Arc<Reloads>,
    /// What the in-place upgrades did, oldest first (carried from image to image).
    pub upgrades: Arc<Mutex<Vec<crate::runtime::handover::Record>>>,
}

/// The last config reloads, newest last.
#[derive(Debug, Default)]
pub struct Reloads(Mutex<VecDeque<Reload>>);

/// What one config reload did.
#[derive(Debug, Clone, Serialize)]
pub struct Reload {
    /// When, in seconds since the Unix epoch.
    pub at: u64,
    /// Applied (true) or refused, with nothing changed (false).
    pub applied: bool,
    /// The keys whose values changed.
    pub changed: Vec<String>,
    /// Why it was refused.
    pub error: Option<String>,
    /// What happened to the workers: "kept", "scaled to N", "rolled N", or why not.
    pub workers: String,
}

/// Reloads kept for the status page.
const RELOADS_KEPT: usize = 20;

impl Reloads {
    /// Records a reload.
    pub fn record(&self, r: Reload) {
        let mut list = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if list.len() == RELOADS_KEPT {
            list.pop_front();
        }
        list.push_back(r);
    }

    /// The reloads kept, oldest first.
    pub fn list(&self) -> Vec<Reload> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

/// Records sessions and requests/s every SAMPLE_EVERY for the status charts.
pub fn spawn_sampler(src: Arc<Sources>, bg: &crate::runtime::life::Life) {
    bg.spawn_until_drained(async move {
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

/// The OpenMetrics text exposition, written by the Prometheus project's own client
/// (`prometheus-client`) from the counters read at scrape time: the data path
/// keeps its plain atomics, the crate does the format (names, escaping, `# EOF`).
pub fn prometheus(src: &Arc<Sources>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape(src.clone())));
    let mut out = String::new();
    if let Err(e) = text::encode(&mut out, &registry) {
        tracing::error!("metrics not encoded: {e}");
    }
    out
}

/// The content type of [`prometheus`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One scrape: reads the sources as the registry asks for them.
#[derive(Debug)]
struct Scrape(Arc<Sources>);

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sources")
    }
}

type Labels<'a> = Vec<(&'static str, std::borrow::Cow<'a, str>)>;

fn worker_labels(w: &Worker) -> Labels<'static> {
    vec![
        ("worker", w.id.to_string().into()),
        ("addr", w.addr.to_string().into()),
    ]
}

/// One family with one sample per label set.
fn family<'a, M: EncodeMetric>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels<'a>, M)>,
) -> std::fmt::Result {
    let mut samples = samples.into_iter().peekable();
    let Some((_, first)) = samples.peek() else {
        return Ok(());
    };
    let mut m = e.encode_descriptor(name, help, None, first.metric_type())?;
    for (labels, metric) in samples {
        metric.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One family with a single unlabelled sample.
fn single<M: EncodeMetric>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: M,
) -> std::fmt::Result {
    metric.encode(e.encode_descriptor(name, help, None, metric.metric_type())?)
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let src = &self.0;
        let m = &src.counters;
        let workers = src.pool.workers();
        let node: Labels = vec![("node", src.node.as_str().into())];
        family(
            &mut e,
            "corral_node_info",
            "This corral node (cluster.node), always 1",
            [(node, ConstGauge::new(1i64))],
        )?;
        family(
            &mut e,
            "corral_requests",
            "Responses passed from workers, by worker and status class",
            workers.iter().flat_map(|w| {
                let by_class = w.traffic.requests_by_class();
                (0..5).map(move |class| {
                    let mut labels = worker_labels(w);
                    labels.push(("class", format!("{}xx", class + 1).into()));
                    (labels, ConstCounter::new(by_class[class]))
                })
            }),
        )?;
        let latency = m.latency();
        let mut buckets: Vec<(f64, u64)> = BUCKETS.iter().copied().zip(latency.buckets).collect();
        let in_buckets: u64 = latency.buckets.iter().sum();
        buckets.push((f64::INFINITY, latency.count.saturating_sub(in_buckets)));
        let mut h = e.encode_descriptor(
            "corral_request_duration_seconds",
            "Time from request to the worker's response head",
            None,
            MetricType::Histogram,
        )?;
        h.encode_histogram::<NoLabelSet>(latency.sum.as_secs_f64(), latency.count, &buckets, None)?;

        type Get = fn(&Worker) -> i64;
        let gauges: [(&str, &str, Get); 5] = [
            (
                "corral_engineio_sessions",
                "Live Engine.IO sessions per worker",
                |w| w.sessions() as i64,
            ),
            (
                "corral_websocket_tunnels",
                "Open websocket tunnels per worker",
                |w| w.traffic.tunnels() as i64,
            ),
            (
                "corral_requests_in_flight",
                "Requests in flight per worker",
                |w| w.inflight() as i64,
            ),
            (
                "corral_upstream_idle_connections",
                "Kept-alive connections to the worker waiting for a request",
                |w| w.conns.len() as i64,
            ),
            (
                "corral_worker_up",
                "1 when the worker takes new traffic",
                |w| i64::from(w.state() == State::Up),
            ),
        ];
        for (name, help, get) in gauges {
            family(
                &mut e,
                name,
                help,
                workers
                    .iter()
                    .map(|w| (worker_labels(w), ConstGauge::new(get(w)))),
            )?;
        }
        family(
            &mut e,
            "corral_worker_mq_subscribed",
            "1 when the supervised worker holds a subscription on the embedded message queue \
             (0: broadcasts from other workers do not reach its clients)",
            workers.iter().filter_map(|w| {
                let s = w.process.mq_subscribed()?;
                Some((worker_labels(w), ConstGauge::new(i64::from(s))))
            }),
        )?;
        family(
            &mut e,
            "corral_worker_restarts",
            "Times a supervised worker was restarted after exiting",
            workers
                .iter()
                .map(|w| (worker_labels(w), ConstCounter::new(w.process.restarts()))),
        )?;
        for (name, help, value) in [
            ("corral_engineio_handshakes", "Engine.IO handshakes routed to a worker", &m.handshakes),
            ("corral_engineio_unknown_sid", "Requests answered \"Session ID unknown\" (the thrash counter: near 0 when sessions stick)", &m.unknown_sid),
            ("corral_cluster_forwarded", "Requests sent to another corral node because their sid's tag names it", &m.hops_out),
            ("corral_cluster_received", "Requests another corral node sent here", &m.hops_in),
            ("corral_bytes_in", "Bytes received from clients (bodies and tunnels)", &m.bytes_in),
            ("corral_bytes_out", "Bytes sent to clients (bodies and tunnels)", &m.bytes_out),
            ("corral_access_log_dropped", "Access log lines dropped because the writer fell behind", &m.access_log_dropped),
        ] {
            single(&mut e, name, help, ConstCounter::new(read(value)))?;
        }
        single(
            &mut e,
            "corral_sessions_remembered",
            "Entries in the session table",
            ConstGauge::new(src.router.len() as i64),
        )?;
        if let Queue::Embedded(broker, _) = &src.queue {
            let s = broker.stats();
            single(
                &mut e,
                "corral_mq_connections",
                "Clients connected to the embedded message queue",
                ConstGauge::new(s.connected as i64),
            )?;
            single(
                &mut e,
                "corral_mq_subscriptions",
                "Channel, pattern and shard subscriptions",
                ConstGauge::new(s.subscriptions as i64),
            )?;
            for (name, help, value) in [
                (
                    "corral_mq_messages_published",
                    "PUBLISH and SPUBLISH commands",
                    s.published,
                ),
                (
                    "corral_mq_messages_delivered",
                    "Messages queued to subscribers",
                    s.delivered,
                ),
                (
                    "corral_mq_messages_dropped",
                    "Messages not delivered: the subscriber was over its output limit",
                    s.dropped,
                ),
                (
                    "corral_mq_clients_over_limit",
                    "Subscribers disconnected at their output limit",
                    s.over_limit,
                ),
            ] {
                single(&mut e, name, help, ConstCounter::new(value))?;
            }
        }
        Ok(())
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
    /// Holds a subscription on the embedded message queue (null: not known).
    mq_subscribed: Option<bool>,
    /// "subscribed", "waiting" (none yet, and no sessions past the grace period)
    /// or "deaf" (sessions past the grace period, no subscription); null: not known.
    mq: Option<&'static str>,
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
            mq_subscribed: w.process.mq_subscribed(),
            mq: w.process.mq().name(),
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
        "policy": src.pool.policy().to_string(),
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
        "reloads": src.reloads.list(),
        "upgrades": *src.upgrades.lock().unwrap_or_else(|e| e.into_inner()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Policy;
    use std::net::SocketAddr;

    #[test]
    fn the_exposition_reads_the_counters() {
        let pool = Arc::new(Pool::new(
            &[SocketAddr::from(([127, 0, 0, 1], 5000))],
            Policy::LeastConnections,
        ));
        let router = Arc::new(Router::new(pool.clone(), 100, None));
        let src = Arc::new(Sources {
            counters: Arc::new(Counters::default()),
            history: Default::default(),
            pool: pool.clone(),
            router,
            queue: Queue::None,
            started: Instant::now(),
            reloads: Default::default(),
            upgrades: Default::default(),
            node: "a\"b".into(),
        });
        pool.workers()[0].traffic.count_response(204);
        src.counters.observe_latency(Duration::from_millis(3));
        src.counters.observe_latency(Duration::from_secs(100));
        let text = prometheus(&src);
        for line in [
            "# TYPE corral_requests counter",
            "corral_requests_total{worker=\"0\",addr=\"127.0.0.1:5000\",class=\"2xx\"} 1",
            "corral_node_info{node=\"a\\\"b\"} 1",
            "corral_request_duration_seconds_bucket{le=\"0.005\"} 1",
            "corral_request_duration_seconds_bucket{le=\"+Inf\"} 2",
            "corral_request_duration_seconds_count 2",
            "corral_worker_up{worker=\"0\",addr=\"127.0.0.1:5000\"} 1",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
    }
}
