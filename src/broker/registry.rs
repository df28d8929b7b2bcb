//! The pub/sub core: who is subscribed to which channel, pattern and shard channel,
//! and delivery of a published message to each of them.
//!
//! A message is queued to every subscriber as shared `Bytes` (one copy of the payload
//! however many subscribers); locks are held only to look subscribers up and queue,
//! never across a network write. Each subscriber's queue is bounded by its output
//! limits: one that falls too far behind is closed, not allowed to grow.

use super::glob;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};

/// Redis's `client-output-buffer-limit pubsub` in spirit.
#[derive(Debug, Clone, Copy)]
pub struct OutputLimit {
    pub hard: usize,
    pub soft: usize,
    pub soft_for: Duration,
}

/// What a client's writer sends, in order.
#[derive(Debug)]
pub enum Outbound {
    /// An encoded reply.
    Reply(Bytes),
    /// A published message, framed by the writer in the client's protocol.
    Message {
        kind: Kind,
        pattern: Option<Bytes>,
        channel: Bytes,
        payload: Bytes,
    },
    /// From here on, frame messages in RESP3 (true) or RESP2.
    Protocol(bool),
    /// Close the connection after what is queued.
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Message,
    PMessage,
    SMessage,
}

/// The part of a client that publishers see: its queue and its backlog.
#[derive(Debug)]
pub struct ClientHandle {
    pub id: u64,
    tx: mpsc::UnboundedSender<Outbound>,
    queued: AtomicUsize,
    /// Milliseconds since `epoch` when the backlog went over the soft limit, or 0.
    soft_since: AtomicU64,
    epoch: Instant,
    killed: AtomicBool,
    pub kill: Notify,
    limit: OutputLimit,
}

impl ClientHandle {
    pub fn new(
        id: u64,
        limit: OutputLimit,
    ) -> (Arc<ClientHandle>, mpsc::UnboundedReceiver<Outbound>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Arc::new(ClientHandle {
                id,
                tx,
                queued: AtomicUsize::new(0),
                soft_since: AtomicU64::new(0),
                epoch: Instant::now(),
                killed: AtomicBool::new(false),
                kill: Notify::new(),
                limit,
            }),
            rx,
        )
    }

    /// Queues a reply (always: replies are answers to the client's own commands).
    pub fn reply(&self, bytes: Bytes) {
        self.queued.fetch_add(bytes.len(), Ordering::Relaxed);
        let _ = self.tx.send(Outbound::Reply(bytes));
    }

    pub fn send(&self, item: Outbound) {
        let _ = self.tx.send(item);
    }

    /// Queues a message within the output limits; past them the client is killed.
    fn deliver(&self, item: Outbound, size: usize) -> bool {
        if self.killed.load(Ordering::Relaxed) {
            return false;
        }
        let backlog = self.queued.fetch_add(size, Ordering::Relaxed) + size;
        if backlog > self.limit.hard {
            self.kill("hard");
            return false;
        }
        if backlog > self.limit.soft {
            let now = self.epoch.elapsed().as_millis() as u64 + 1;
            match self
                .soft_since
                .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {}
                Err(since)
                    if now.saturating_sub(since) >= self.limit.soft_for.as_millis() as u64 =>
                {
                    self.kill("soft");
                    return false;
                }
                Err(_) => {}
            }
        }
        let _ = self.tx.send(item);
        true
    }

    /// The writer wrote `n` bytes of the backlog.
    pub fn written(&self, n: usize) {
        let left = self
            .queued
            .fetch_sub(n, Ordering::Relaxed)
            .saturating_sub(n);
        if left <= self.limit.soft {
            self.soft_since.store(0, Ordering::Relaxed);
        }
    }

    pub fn backlog(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    pub fn is_killed(&self) -> bool {
        self.killed.load(Ordering::Relaxed)
    }

    fn kill(&self, which: &str) {
        if !self.killed.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                client = self.id,
                backlog = self.backlog(),
                limit = which,
                "message queue client over its output limit: disconnected"
            );
            self.kill.notify_one();
        }
    }
}

type Subscribers = HashMap<Bytes, HashMap<u64, Arc<ClientHandle>>>;

/// Every subscription of every client.
#[derive(Debug, Default)]
pub struct Registry {
    channels: RwLock<Subscribers>,
    patterns: RwLock<Subscribers>,
    shard: RwLock<Subscribers>,
    pub stats: Stats,
}

#[derive(Debug, Default)]
pub struct Stats {
    pub published: AtomicU64,
    pub delivered: AtomicU64,
    pub connections: AtomicU64,
    pub connected: AtomicU64,
    /// Messages not queued because the subscriber was over its limit.
    pub dropped: AtomicU64,
    /// Subscribers disconnected at their output limit.
    pub over_limit: AtomicU64,
}

/// Which of the three subscription spaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Space {
    Channel,
    Pattern,
    Shard,
}

fn write(l: &RwLock<Subscribers>) -> std::sync::RwLockWriteGuard<'_, Subscribers> {
    // Every update is one insert or remove: a poisoned map is still consistent.
    l.write().unwrap_or_else(|e| e.into_inner())
}

fn read(l: &RwLock<Subscribers>) -> std::sync::RwLockReadGuard<'_, Subscribers> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

impl Registry {
    fn space(&self, space: Space) -> &RwLock<Subscribers> {
        match space {
            Space::Channel => &self.channels,
            Space::Pattern => &self.patterns,
            Space::Shard => &self.shard,
        }
    }

    pub fn subscribe(&self, space: Space, name: Bytes, client: &Arc<ClientHandle>) {
        write(self.space(space))
            .entry(name)
            .or_default()
            .insert(client.id, client.clone());
    }

    pub fn unsubscribe(&self, space: Space, name: &Bytes, client: u64) {
        let mut map = write(self.space(space));
        if let Some(subs) = map.get_mut(name) {
            subs.remove(&client);
            if subs.is_empty() {
                map.remove(name);
            }
        }
    }

    /// Delivers to channel subscribers, then pattern subscribers; returns how many
    /// received it (as PUBLISH answers).
    pub fn publish(&self, channel: &Bytes, payload: &Bytes) -> i64 {
        let mut n = 0;
        if let Some(subs) = read(&self.channels).get(channel) {
            n += self.fan_out(subs, Kind::Message, None, channel, payload);
        }
        for (pattern, subs) in read(&self.patterns).iter() {
            if glob::matches(pattern, channel) {
                n += self.fan_out(subs, Kind::PMessage, Some(pattern), channel, payload);
            }
        }
        self.stats.published.fetch_add(1, Ordering::Relaxed);
        n
    }

    pub fn spublish(&self, channel: &Bytes, payload: &Bytes) -> i64 {
        let mut n = 0;
        if let Some(subs) = read(&self.shard).get(channel) {
            n += self.fan_out(subs, Kind::SMessage, None, channel, payload);
        }
        self.stats.published.fetch_add(1, Ordering::Relaxed);
        n
    }

    /// Queues one message to every subscriber in `subs`; returns how many there were.
    fn fan_out(
        &self,
        subs: &HashMap<u64, Arc<ClientHandle>>,
        kind: Kind,
        pattern: Option<&Bytes>,
        channel: &Bytes,
        payload: &Bytes,
    ) -> i64 {
        let size = message_size(channel, payload, pattern);
        for c in subs.values() {
            let item = Outbound::Message {
                kind,
                pattern: pattern.cloned(),
                channel: channel.clone(),
                payload: payload.clone(),
            };
            self.deliver_to(c, item, size);
        }
        subs.len() as i64
    }

    /// Queues to one subscriber and keeps the delivered/dropped counts.
    fn deliver_to(&self, c: &ClientHandle, item: Outbound, size: usize) {
        let was_killed = c.is_killed();
        if c.deliver(item, size) {
            self.stats.delivered.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            if !was_killed && c.is_killed() {
                self.stats.over_limit.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Subscriptions of every kind, for metrics.
    pub fn subscriptions(&self) -> u64 {
        [&self.channels, &self.patterns, &self.shard]
            .iter()
            .map(|l| read(l).values().map(|s| s.len() as u64).sum::<u64>())
            .sum()
    }

    /// Active channels (with at least one subscriber) matching `pattern`.
    pub fn names(&self, space: Space, pattern: Option<&[u8]>) -> Vec<Bytes> {
        read(self.space(space))
            .keys()
            .filter(|k| pattern.is_none_or(|p| glob::matches(p, k)))
            .cloned()
            .collect()
    }

    pub fn numsub(&self, space: Space, name: &[u8]) -> usize {
        read(self.space(space)).get(name).map_or(0, |s| s.len())
    }

    pub fn numpat(&self) -> usize {
        read(&self.patterns).len()
    }
}

/// Bytes a message costs in a subscriber's backlog (its framed size, roughly).
pub(super) fn message_size(channel: &Bytes, payload: &Bytes, pattern: Option<&Bytes>) -> usize {
    channel.len() + payload.len() + pattern.map_or(0, |p| p.len()) + 48
}
