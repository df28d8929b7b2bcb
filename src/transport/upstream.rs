//! Upstream connections: keep-alive HTTP/1.1 connections to one worker, kept in a
//! small last-in-first-out cache on the worker, so a request goes out on a warm
//! connection without a connect, a lookup by address or a task per return.
//!
//! It owns the connections and their idle expiry. It must not choose workers or
//! decide about retries across workers (the proxy does); it only tells the caller
//! whether a request failed before it was sent, so the caller can send it again.
//! A connection goes back to the cache only when its request was sent whole (every
//! byte its head announced) and its response body was read to the end: anything
//! else leaves the worker mid-message, and the next request on that connection
//! would be read as part of this one (request smuggling). That rule is the client
//! session's (`http1::Reading`), which hands a connection back only then.

use crate::transport::body::{BoxError, ProxyBody};
use crate::transport::http1;
use http::Response;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Most idle connections kept per worker (nginx's `keepalive` is per upstream too);
/// a connection coming back to a full cache is closed.
const MAX_IDLE: usize = 128;

/// How connections are made and kept.
#[derive(Debug, Clone)]
pub struct Settings {
    pub connect_timeout: Duration,
    /// An idle connection older than this is closed rather than used: it must be
    /// shorter than the worker's own keep-alive timeout, or a request may go out on
    /// a connection the worker is closing at that moment.
    pub idle_timeout: Duration,
}

/// Idle connections are kept per serving thread (`lanes`), this many sets at most:
/// a connection's driver runs on the thread that opened it, and a request from
/// another thread would wake that thread for every read and write.
const SHARDS: usize = 16;

/// The idle connections to one worker.
#[derive(Default)]
pub struct Idle {
    raw: Shelf<http1::Conn>,
}

impl std::fmt::Debug for Idle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idle").field("len", &self.len()).finish()
    }
}

/// Parked connections, a last-in-first-out set per serving thread.
struct Shelf<C> {
    shards: [Mutex<VecDeque<Parked<C>>>; SHARDS],
}

impl<C> Default for Shelf<C> {
    fn default() -> Self {
        Shelf {
            shards: std::array::from_fn(|_| Mutex::new(VecDeque::new())),
        }
    }
}

struct Parked<C> {
    conn: C,
    since: Instant,
}

impl Shelf<http1::Conn> {
    /// This thread's set.
    fn mine(&self) -> std::sync::MutexGuard<'_, VecDeque<Parked<http1::Conn>>> {
        lock(&self.shards[crate::runtime::lanes::current() % SHARDS])
    }

    /// Those still open.
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                lock(s)
                    .iter_mut()
                    .map(|p| p.conn.is_fresh())
                    .filter(|o| *o)
                    .count()
            })
            .sum()
    }

    fn clear(&self) {
        for shard in &self.shards {
            let drained: Vec<Parked<http1::Conn>> = lock(shard).drain(..).collect();
            drop(drained);
        }
    }

    /// Closes the connections parked for `idle_timeout` or longer, and those the
    /// worker closed.
    fn expire(&self, idle_timeout: Duration) {
        let now = Instant::now();
        for shard in &self.shards {
            let expired: VecDeque<Parked<http1::Conn>> = {
                let mut conns = lock(shard);
                let (keep, expired) = conns.drain(..).partition(|p: &Parked<http1::Conn>| {
                    now.duration_since(p.since) < idle_timeout
                });
                *conns = keep;
                expired
            };
            drop(expired);
        }
    }

    /// The most recently parked connection still young enough to use and open.
    fn take(&self, idle_timeout: Duration) -> Option<http1::Conn> {
        let mut conns = self.mine();
        while let Some(mut p) = conns.pop_back() {
            if p.since.elapsed() < idle_timeout && p.conn.is_fresh() {
                return Some(p.conn);
            }
        }
        None
    }

    fn park(&self, conn: http1::Conn, idle_timeout: Duration) {
        let now = Instant::now();
        let mut conns = self.mine();
        // The oldest are at the front; drop those past their time so a quiet worker
        // does not hold connections it has long stopped wanting.
        while conns
            .front()
            .is_some_and(|p| now.duration_since(p.since) >= idle_timeout)
        {
            conns.pop_front();
        }
        if conns.len() < MAX_IDLE {
            conns.push_back(Parked { conn, since: now });
        }
    }
}

/// Why a request got no response.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made: the worker is not listening.
    Connect(std::io::Error),
    /// The connection failed after the request was (maybe) written.
    Http(BoxError),
    /// A kept-alive connection closed before any answer: most likely the worker
    /// closed it as the request went out, so it is safe to send a request that
    /// can be replayed once more on a new connection.
    Stale(BoxError),
    /// An upgrade carries the exchange (see `http1::Failure::Carried`).
    Carried(Box<http1::Conn>),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(e) => write!(f, "connect: {e}"),
            SendError::Carried(_) => write!(f, "carried by an upgrade"),
            SendError::Http(e) | SendError::Stale(e) => {
                write!(f, "{e}")?;
                let mut src = e.source();
                while let Some(inner) = src {
                    write!(f, ": {inner}")?;
                    src = inner.source();
                }
                Ok(())
            }
        }
    }
}

/// Where a connection goes back to: the worker's idle cache.
pub trait Home: Send + Sync {
    fn idle(&self) -> &Idle;
    /// Whether a connection coming back is kept; no for a worker that is down or
    /// about to be stopped.
    fn keeps_idle(&self) -> bool;
}

impl Idle {
    /// Idle connections still open (those the worker closed are counted out).
    pub fn len(&self) -> usize {
        self.raw.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes every idle connection (the worker went down or away).
    pub fn clear(&self) {
        self.raw.clear();
    }

    /// Closes the connections idle for `idle_timeout` or longer: a worker that
    /// waits for its keep-alive connections before it exits (gunicorn's gevent
    /// worker does, for its graceful timeout) must not find corral holding any.
    pub fn expire(&self, idle_timeout: Duration) {
        self.raw.expire(idle_timeout);
    }
}

fn lock<T>(shard: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    shard.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where a connection goes back to once its response has been read.
pub struct Parking {
    home: Arc<dyn Home>,
    idle_timeout: Duration,
}

impl http1::Keep for Parking {
    fn keep(self, conn: http1::Conn) {
        if self.home.keeps_idle() {
            self.home.idle().raw.park(conn, self.idle_timeout);
        }
    }
}

/// A worker's response; its body returns the connection at its end.
pub type Answer = Response<http1::Reading<Parking>>;

/// Sends an encoded request (`http1`; `body`: its streamed body, if any) on an idle
/// connection if one is ready, else on a new one (`fresh`: a new one only). A
/// kept-alive connection that closes before any answer is `Stale`: the caller
/// decides whether the request may go out again.
pub async fn send(
    home: Arc<dyn Home>,
    addr: SocketAddr,
    settings: &Settings,
    req: &http1::Request,
    body: Option<ProxyBody>,
    fresh: bool,
) -> Result<Answer, SendError> {
    let idle = (!fresh)
        .then(|| home.idle().raw.take(settings.idle_timeout))
        .flatten();
    let reused = idle.is_some();
    let conn = match idle {
        Some(conn) => conn,
        None => http1::Conn::new(open(addr, settings).await?),
    };
    let parking = Parking {
        home,
        idle_timeout: settings.idle_timeout,
    };
    http1::exchange(conn, req, body, parking)
        .await
        .map_err(|failure| match failure {
            http1::Failure::Unanswered(_) if reused => SendError::Stale(failure.into()),
            http1::Failure::Carried(conn) => SendError::Carried(conn),
            other => SendError::Http(other.into()),
        })
}

/// The answer to an exchange an upgrade carried over (`conn`: its connection, as
/// the image before left it); the connection is kept for the worker after it.
pub async fn resume(
    home: Arc<dyn Home>,
    settings: &Settings,
    conn: http1::Conn,
    head_request: bool,
) -> Result<Answer, SendError> {
    let parking = Parking {
        home,
        idle_timeout: settings.idle_timeout,
    };
    http1::resume(conn, head_request, parking)
        .await
        .map_err(|failure| SendError::Http(failure.into()))
}

/// Opens a TCP connection to a worker, within the connect timeout.
async fn open(addr: SocketAddr, settings: &Settings) -> Result<TcpStream, SendError> {
    let stream =
        match tokio::time::timeout(settings.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(SendError::Connect(e)),
            Err(_) => {
                return Err(SendError::Connect(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection within {:?}", settings.connect_timeout),
                )))
            }
        };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}
