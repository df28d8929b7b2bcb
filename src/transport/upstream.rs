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
//! would be read as part of this one (request smuggling). That rule lives here and
//! only here, in [`Lease`].

use crate::transport::body::{BoxError, ProxyBody};
use crate::transport::http1;
use bytes::Bytes;
use http::{header, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self as hyper_http1, SendRequest};
use hyper_util::rt::TokioIo;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
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
    /// Owns every connection's driver task, so shutdown can wait for them.
    pub drivers: crate::runtime::life::Life,
}

/// Idle connections are kept per serving thread (`lanes`), this many sets at most:
/// a connection's driver runs on the thread that opened it, and a request from
/// another thread would wake that thread for every read and write.
const SHARDS: usize = 16;

/// The idle connections to one worker: hyper's (for streamed bodies and upgrades)
/// and the fast path's (`http1`), kept apart.
#[derive(Default)]
pub struct Idle {
    hyper: Shelf<SendRequest<ProxyBody>>,
    raw: Shelf<http1::Conn>,
}

impl std::fmt::Debug for Idle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idle").field("len", &self.len()).finish()
    }
}

/// A connection that can tell whether it can still take a request.
trait Open {
    fn is_open(&mut self) -> bool;
}

impl Open for SendRequest<ProxyBody> {
    fn is_open(&mut self) -> bool {
        !self.is_closed()
    }
}

impl Open for http1::Conn {
    fn is_open(&mut self) -> bool {
        self.is_fresh()
    }
}

/// Parked connections of one kind, a last-in-first-out set per serving thread.
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

impl<C: Open> Shelf<C> {
    /// This thread's set.
    fn mine(&self) -> std::sync::MutexGuard<'_, VecDeque<Parked<C>>> {
        lock(&self.shards[crate::runtime::lanes::current() % SHARDS])
    }

    /// Those still open.
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                lock(s)
                    .iter_mut()
                    .map(|p| p.conn.is_open())
                    .filter(|o| *o)
                    .count()
            })
            .sum()
    }

    fn clear(&self) {
        for shard in &self.shards {
            let drained: Vec<Parked<C>> = lock(shard).drain(..).collect();
            drop(drained);
        }
    }

    /// Closes the connections parked for `idle_timeout` or longer, and those the
    /// worker closed.
    fn expire(&self, idle_timeout: Duration) {
        let now = Instant::now();
        for shard in &self.shards {
            let expired: VecDeque<Parked<C>> = {
                let mut conns = lock(shard);
                let (keep, expired) = conns
                    .drain(..)
                    .partition(|p: &Parked<C>| now.duration_since(p.since) < idle_timeout);
                *conns = keep;
                expired
            };
            drop(expired);
        }
    }

    /// The most recently parked connection still young enough to use and open.
    fn take(&self, idle_timeout: Duration) -> Option<C> {
        let mut conns = self.mine();
        while let Some(mut p) = conns.pop_back() {
            if p.since.elapsed() < idle_timeout && p.conn.is_open() {
                return Some(p.conn);
            }
        }
        None
    }

    fn park(&self, conn: C, idle_timeout: Duration) {
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
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(e) => write!(f, "connect: {e}"),
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

/// A response from a worker and, if the worker keeps the connection open, the
/// connection to give back once the body is read.
pub struct Answer<B = Incoming> {
    pub response: Response<B>,
    pub lease: Lease,
}

/// A connection lent out for one exchange.
pub struct Lease {
    sender: Option<SendRequest<ProxyBody>>,
    home: Arc<dyn Home>,
    idle_timeout: Duration,
    /// Whether the request body went out whole (see [`Sending`]).
    sent_whole: Whole,
}

/// Where a lease goes back to: the worker's idle cache.
pub trait Home: Send + Sync {
    fn idle(&self) -> &Idle;
    /// Whether a connection coming back is kept; no for a worker that is down or
    /// about to be stopped.
    fn keeps_idle(&self) -> bool;
}

/// Held by the response body (`body::Guarded`): read to the end, the connection is
/// parked for the next request if its request was also sent whole; otherwise (or
/// dropped before the end) it is closed.
impl crate::transport::body::Guard for Lease {
    fn ended(mut self) {
        let Some(sender) = self.sender.take() else {
            return;
        };
        if !self.sent_whole.get() {
            tracing::debug!("request not sent whole; worker connection closed, not reused");
        } else if !sender.is_closed() && self.home.keeps_idle() {
            self.home.idle().hyper.park(sender, self.idle_timeout);
        }
    }
}

impl Idle {
    /// Idle connections still open (those the worker closed are counted out).
    pub fn len(&self) -> usize {
        self.hyper.len() + self.raw.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes every idle connection (the worker went down or away).
    pub fn clear(&self) {
        self.hyper.clear();
        self.raw.clear();
    }

    /// Closes the connections idle for `idle_timeout` or longer: a worker that
    /// waits for its keep-alive connections before it exits (gunicorn's gevent
    /// worker does, for its graceful timeout) must not find corral holding any.
    pub fn expire(&self, idle_timeout: Duration) {
        self.hyper.expire(idle_timeout);
        self.raw.expire(idle_timeout);
    }
}

fn lock<T>(shard: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    shard.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sends `req` to the worker at `addr`, on an idle connection if one is ready, else on
/// a new one. A request that an idle connection could not take (it was closing) goes
/// out on the next one, so only a request that was written can fail on a stale
/// connection.
pub async fn send(
    home: Arc<dyn Home>,
    addr: SocketAddr,
    settings: &Settings,
    req: Request<ProxyBody>,
    fresh: bool,
) -> Result<Answer, SendError> {
    let (mut req, sent_whole) = track_sending(req);
    while let Some(mut sender) = match fresh {
        true => None,
        false => idle_sender(&home, settings).await,
    } {
        match sender.try_send_request(req).await {
            Ok(response) => return Ok(answer(response, sender, home, settings, sent_whole)),
            Err(mut e) => match e.take_message() {
                Some(back) => req = back,
                None => {
                    let e = e.into_error();
                    return Err(match e.is_incomplete_message() {
                        true => SendError::Stale(e.into()),
                        false => SendError::Http(e.into()),
                    });
                }
            },
        }
    }
    let mut sender = connect(addr, settings).await?;
    match sender.send_request(req).await {
        Ok(response) => Ok(answer(response, sender, home, settings, sent_whole)),
        Err(e) => Err(SendError::Http(e.into())),
    }
}

/// Where a fast-path connection goes back to once its response has been read.
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

/// A response read on the fast path; its body returns the connection at its end.
pub type FastAnswer = Response<http1::Reading<Parking>>;

/// Sends an encoded request (`http1`, a body in hand) on an idle fast-path
/// connection if one is ready, else on a new one (`fresh`: a new one only). A
/// kept-alive connection that closes before any answer is `Stale`: the caller
/// decides whether the request may go out again.
pub async fn send_fast(
    home: Arc<dyn Home>,
    addr: SocketAddr,
    settings: &Settings,
    req: &http1::Request,
    fresh: bool,
) -> Result<FastAnswer, SendError> {
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
    http1::exchange(conn, req, parking)
        .await
        .map_err(|failure| match failure {
            http1::Failure::Unanswered(_) if reused => SendError::Stale(failure.into()),
            other => SendError::Http(other.into()),
        })
}

/// An idle connection for hyper's client: one of its own, else a fast-path one
/// handed over, so a streamed request goes out on a warm connection too.
async fn idle_sender(home: &Arc<dyn Home>, settings: &Settings) -> Option<SendRequest<ProxyBody>> {
    if let Some(sender) = home.idle().hyper.take(settings.idle_timeout) {
        return Some(sender);
    }
    let conn = home.idle().raw.take(settings.idle_timeout)?;
    handshake(conn.into_stream(), settings).await.ok()
}

fn answer(
    response: Response<Incoming>,
    sender: SendRequest<ProxyBody>,
    home: Arc<dyn Home>,
    settings: &Settings,
    sent_whole: Whole,
) -> Answer {
    Answer {
        response,
        lease: Lease {
            sender: Some(sender),
            home,
            idle_timeout: settings.idle_timeout,
            sent_whole,
        },
    }
}

/// Whether a request went out whole: known from its head for a bodiless request
/// (the usual GET, which then costs no allocation), or raised by [`Sending`] when
/// its body ends.
enum Whole {
    Known(bool),
    Tracked(Arc<AtomicBool>),
}

impl Whole {
    fn get(&self) -> bool {
        match self {
            Whole::Known(w) => *w,
            Whole::Tracked(flag) => flag.load(Ordering::Acquire),
        }
    }
}

/// Tells when the request's body has gone out whole: ended, and exactly as long
/// as its Content-Length said. A bodiless request keeps its body as it is.
fn track_sending(req: Request<ProxyBody>) -> (Request<ProxyBody>, Whole) {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .map(crate::http1::framing::content_length_value);
    // An unreadable Content-Length is never whole.
    let declared = match declared {
        Some(None) => return (req, Whole::Known(false)),
        Some(Some(n)) => Some(n),
        None => None,
    };
    if req.body().is_end_stream() {
        return (req, Whole::Known(declared.is_none_or(|n| n == 0)));
    }
    let flag = Arc::new(AtomicBool::new(false));
    let tracked = req.map(|inner| {
        Sending {
            inner,
            declared,
            sent: 0,
            whole: flag.clone(),
        }
        .boxed_unsync()
    });
    (tracked, Whole::Tracked(flag))
}

pin_project_lite::pin_project! {
    /// A request body on its way to a worker, counted; raises `whole` when it ends
    /// having sent what its head declared.
    struct Sending {
        #[pin]
        inner: ProxyBody,
        declared: Option<u64>,
        sent: u64,
        whole: Arc<AtomicBool>,
    }
}

impl Body for Sending {
    type Data = Bytes;
    type Error = crate::transport::body::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    *this.sent += d.len() as u64;
                }
                // hyper polls no further once the body says it has ended.
                this.inner.is_end_stream()
            }
            Poll::Ready(None) => true,
            _ => false,
        };
        if ended && this.declared.is_none_or(|n| n == *this.sent) {
            this.whole.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
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

/// The socket under an upgraded connection to a worker (`Err`: not one of these
/// connections, given back as it was): off this thread's reactor, with the bytes
/// already read from it.
pub fn take_worker_socket(
    up: hyper::upgrade::Upgraded,
) -> Result<std::io::Result<(std::net::TcpStream, Bytes)>, hyper::upgrade::Upgraded> {
    let parts = up.downcast::<TokioIo<TcpStream>>()?;
    let early = parts.read_buf;
    Ok(parts.io.into_inner().into_std().map(|tcp| (tcp, early)))
}

/// Opens a connection and starts its driver task.
pub async fn connect(
    addr: SocketAddr,
    settings: &Settings,
) -> Result<SendRequest<ProxyBody>, SendError> {
    handshake(open(addr, settings).await?, settings).await
}

/// Starts hyper's client on an open connection, its driver task owned by
/// `settings.drivers`.
async fn handshake(
    stream: TcpStream,
    settings: &Settings,
) -> Result<SendRequest<ProxyBody>, SendError> {
    let (sender, conn) = hyper_http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| SendError::Http(e.into()))?;
    // The driver ends when the connection does (closed by either side, or dropped
    // from the cache); the tracker lets shutdown see that it has.
    settings.drivers.spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "worker connection ended");
        }
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn request(content_length: Option<&str>, body: ProxyBody) -> Request<ProxyBody> {
        let mut req = Request::new(body);
        if let Some(n) = content_length {
            req.headers_mut()
                .insert(header::CONTENT_LENGTH, n.parse().expect("header value"));
        }
        req
    }

    async fn sent_whole(content_length: Option<&str>, body: ProxyBody) -> bool {
        let (req, whole) = track_sending(request(content_length, body));
        let _ = req.into_body().collect().await;
        whole.get()
    }

    #[tokio::test]
    async fn a_request_is_whole_only_when_it_sent_what_it_declared() {
        assert!(sent_whole(None, crate::transport::body::empty()).await);
        assert!(sent_whole(Some("0"), crate::transport::body::empty()).await);
        assert!(sent_whole(Some("3"), crate::transport::body::full("abc")).await);
        assert!(sent_whole(None, crate::transport::body::full("abc")).await);
        // The head announced more than the body carried (the smuggling case: an
        // upgrade request's head with its body left behind).
        assert!(!sent_whole(Some("144"), crate::transport::body::empty()).await);
        assert!(!sent_whole(Some("5"), crate::transport::body::full("abc")).await);
        assert!(!sent_whole(Some("x"), crate::transport::body::full("abc")).await);
    }

    #[tokio::test]
    async fn a_body_given_up_half_way_is_not_whole() {
        let frames = futures_util::stream::iter(vec![
            Ok::<_, crate::transport::body::BoxError>(Frame::data(Bytes::from_static(b"ab"))),
            Err("client went away".into()),
        ]);
        let body = http_body_util::StreamBody::new(frames).boxed_unsync();
        assert!(!sent_whole(None, body).await);
    }
}
