//! The queue watch: which supervised worker holds a subscription on the embedded
//! message queue. Only corral sees both sides: each queue connection's address,
//! traced through /proc to the process group holding it, is a worker's. A worker
//! that serves Engine.IO sessions but never subscribed (the app has no
//! `message_queue`, its `redis` package is missing, or its listener died) delivers
//! no broadcast from another worker to its clients; with several workers corral
//! says so in the log, once per change.
//!
//! It reads the broker's clients and the pool and sets each worker's flag; it
//! changes nothing else.

use crate::broker::Broker;
use crate::workers::pool::{Mq, Pool, Worker};
use crate::workers::procs;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the workers' queue connections are looked at.
const EVERY: Duration = Duration::from_secs(2);
/// Looks every `EVERY`, until the task is ended. A worker may have sessions
/// without a subscription for `grace` (`message_queue.unsubscribed_grace`) before
/// it is said: python-socketio subscribes at its first session, and its first
/// clients may come before the subscription does.
pub async fn watch(broker: Arc<Broker>, pool: Arc<Pool>, grace: Duration) {
    let mut deaf_since: HashMap<usize, Instant> = HashMap::new();
    let mut warned: HashSet<usize> = HashSet::new();
    loop {
        tokio::time::sleep(EVERY).await;
        let workers: Vec<Arc<Worker>> = pool
            .workers()
            .into_iter()
            .filter(|w| w.managed && w.process.pid().is_some())
            .collect();
        let subscribed = subscribed_groups(&broker, &workers).await;
        for w in &workers {
            let Some(pid) = w.process.pid() else {
                continue;
            };
            let yes = subscribed.contains(&pid);
            if yes || w.sessions() == 0 {
                w.process
                    .set_mq(if yes { Mq::Subscribed } else { Mq::Waiting });
                deaf_since.remove(&w.id);
                if yes && warned.remove(&w.id) {
                    tracing::info!(
                        worker = w.id,
                        pid,
                        "worker now subscribed to the message queue"
                    );
                }
                continue;
            }
            let since = *deaf_since.entry(w.id).or_insert_with(Instant::now);
            if since.elapsed() < grace {
                w.process.set_mq(Mq::Waiting);
                continue;
            }
            w.process.set_mq(Mq::Deaf);
            if workers.len() > 1 && warned.insert(w.id) {
                tracing::warn!(
                    worker = w.id,
                    pid,
                    sessions = w.sessions(),
                    "worker has Engine.IO sessions but no subscription on the message queue: \
                     broadcasts from other workers will not reach its clients. Give the app \
                     message_queue=os.environ[\"CORRAL_MESSAGE_QUEUE\"] (Flask-SocketIO; with \
                     the `redis` package installed), or client_manager=socketio.RedisManager(...)"
                );
            }
        }
        let live: HashSet<usize> = workers.iter().map(|w| w.id).collect();
        deaf_since.retain(|id, _| live.contains(id));
        warned.retain(|id| live.contains(id));
    }
}

/// The process groups (worker pids) holding a subscribed queue connection (/proc
/// read on the blocking pool).
async fn subscribed_groups(broker: &Broker, workers: &[Arc<Worker>]) -> HashSet<u32> {
    let clients = broker.clients();
    let port = broker.port();
    let pairs: Vec<(u16, u16)> = clients.iter().map(|(a, _)| (a.port(), port)).collect();
    let groups: Vec<u32> = workers.iter().filter_map(|w| w.process.pid()).collect();
    let owners = procs::socket_groups_off_runtime(pairs, groups).await;
    clients
        .iter()
        .filter(|(_, subscribed)| *subscribed)
        .filter_map(|(a, _)| owners.get(&(a.port(), port)).copied())
        .collect()
}
