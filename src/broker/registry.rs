//! The pub/sub core: who is subscribed to which channel, pattern and shard channel,
//! and delivery of a published message to each of them.
//!
//! A message is framed once and appended to every subscriber's output buffer;
//! locks are held only to look subscribers up and append, never across a network
//! write. Each subscriber's queue is bounded by its output
//! limits: one that falls too far behind is closed, not allowed to grow.

use super::glob;
use super::resp::Out;
use bytes::BufMut;
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Redis's `client-output-buffer-limit pubsub` in spirit.
#[derive(Debug, Clone, Copy)]
pub struct OutputLimit {
    /// Bytes queued to a subscriber that disconnect it at once (0: no limit).
    pub hard: usize,
    /// Bytes queued that disconnect it when held for `soft_for` (0: no limit).
    pub soft: usize,
    /// How long the soft limit may be exceeded.
    pub soft_for: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Message,
    PMessage,
    SMessage,
}

/// The part of a client that publishers see: its output buffer and its backlog.
///
/// Messages are framed once per publish (per protocol) and appended to each
/// subscriber's buffer, as redis-server appends to its client buffers; the
/// client's writer takes the whole buffer at a time and writes it with one call.
#[derive(Debug)]
pub struct ClientHandle {
    pub id: u64,
    outbox: Mutex<Outbox>,
    /// Signalled when the outbox goes from empty to not (or to closing).
    ready: Notify,
    resp3: AtomicBool,
    queued: AtomicUsize,
    /// Milliseconds since `epoch` when the backlog went over the soft limit, or 0.
    soft_since: AtomicU64,
    epoch: Instant,
    killed: AtomicBool,
    pub kill: Notify,
    limit: OutputLimit,
    /// An upgrade carries the connection: the writer stops between two writes and
    /// gives back what is still queued.
    carried: AtomicBool,
}

#[derive(Debug, Default)]
struct Outbox {
    buf: BytesMut,
    closing: bool,
}

impl ClientHandle {
    pub fn new(id: u64, limit: OutputLimit) -> Arc<ClientHandle> {
        Arc::new(ClientHandle {
            id,
            outbox: Mutex::new(Outbox::default()),
            ready: Notify::new(),
            resp3: AtomicBool::new(false),
            queued: AtomicUsize::new(0),
            soft_since: AtomicU64::new(0),
            epoch: Instant::now(),
            killed: AtomicBool::new(false),
            kill: Notify::new(),
            limit,
            carried: AtomicBool::new(false),
        })
    }

    /// For an upgrade: the writer is to stop at its next wait for output.
    pub fn carry(&self) {
        self.carried.store(true, Ordering::Release);
        self.ready.notify_one();
    }

    /// Whether an upgrade carries the connection.
    pub fn is_carried(&self) -> bool {
        self.carried.load(Ordering::Acquire)
    }

    fn outbox(&self) -> std::sync::MutexGuard<'_, Outbox> {
        // Appending bytes cannot leave the buffer half-changed.
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, bytes: &[u8]) {
        let was_empty = {
            let mut out = self.outbox();
            let was_empty = out.buf.is_empty();
            out.buf.extend_from_slice(bytes);
            was_empty
        };
        if was_empty {
            self.ready.notify_one();
        }
    }

    /// Queues a reply (always: replies are answers to the client's own commands).
    pub fn reply(&self, bytes: &[u8]) {
        self.queued.fetch_add(bytes.len(), Ordering::Relaxed);
        self.push(bytes);
    }

    /// Messages published from now on are framed in RESP3 (true) or RESP2.
    pub fn set_resp3(&self, on: bool) {
        self.resp3.store(on, Ordering::Relaxed);
    }

    /// Close the connection after what is queued.
    pub fn close(&self) {
        self.outbox().closing = true;
        self.ready.notify_one();
    }

    /// For the writer: waits until there is output, then swaps it into `batch`
    /// (which must be empty). Returns whether the connection is to close after it.
    pub async fn take(&self, batch: &mut BytesMut) -> bool {
        self.ready.notified().await;
        let mut out = self.outbox();
        std::mem::swap(&mut out.buf, batch);
        out.closing
    }

    /// Queues a framed message within the output limits; past them the client is
    /// killed.
    fn deliver(&self, frame: &[u8]) -> bool {
        if self.killed.load(Ordering::Relaxed) {
            return false;
        }
        let size = frame.len();
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
        self.push(frame);
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
        // Framed at most twice (RESP2, RESP3), however many subscribers.
        let mut frames: [Option<BytesMut>; 2] = [None, None];
        let (mut delivered, mut dropped, mut over_limit) = (0, 0, 0);
        for c in subs.values() {
            let resp3 = c.resp3.load(Ordering::Relaxed);
            let frame = frames[resp3 as usize].get_or_insert_with(|| {
                let mut b = BytesMut::with_capacity(
                    channel.len() + payload.len() + pattern.map_or(0, |p| p.len()) + 48,
                );
                frame_message(
                    &mut b,
                    resp3,
                    kind,
                    pattern.map(|p| &p[..]),
                    channel,
                    payload.len(),
                );
                b.extend_from_slice(payload);
                b.extend_from_slice(b"\r\n");
                b
            });
            let was_killed = c.is_killed();
            if c.deliver(frame) {
                delivered += 1;
            } else {
                dropped += 1;
                if !was_killed && c.is_killed() {
                    over_limit += 1;
                }
            }
        }
        // One update of the shared counters per message, not per subscriber.
        let stats = &self.stats;
        stats.delivered.fetch_add(delivered, Ordering::Relaxed);
        if dropped > 0 {
            stats.dropped.fetch_add(dropped, Ordering::Relaxed);
            stats.over_limit.fetch_add(over_limit, Ordering::Relaxed);
        }
        subs.len() as i64
    }

    /// The ids of the clients holding at least one subscription of any kind.
    pub fn subscribed_clients(&self) -> std::collections::HashSet<u64> {
        [&self.channels, &self.patterns, &self.shard]
            .iter()
            .flat_map(|l| {
                read(l)
                    .values()
                    .flat_map(|s| s.keys().copied())
                    .collect::<Vec<u64>>()
            })
            .collect()
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
/// Everything of a message's framing up to (not including) the payload bytes.
pub fn frame_message(
    b: &mut BytesMut,
    resp3: bool,
    kind: Kind,
    pattern: Option<&[u8]>,
    channel: &[u8],
    payload_len: usize,
) {
    let o = Out { resp3 };
    let (name, n): (&[u8], usize) = match kind {
        Kind::Message => (b"message", 3),
        Kind::PMessage => (b"pmessage", 4),
        Kind::SMessage => (b"smessage", 3),
    };
    o.push(b, n);
    o.bulk(b, name);
    if let Some(p) = pattern {
        o.bulk(b, p);
    }
    o.bulk(b, channel);
    b.put_u8(b'$');
    b.put_slice(payload_len.to_string().as_bytes());
    b.put_slice(b"\r\n");
}
