//! Body adapters for the streaming data path: a request body that stops at the size
//! limit, a response body that replays a few inspected bytes before the rest, and a
//! wrapper that holds a guard (load counters, the worker connection) until the body
//! is done, telling it whether the body was read to the end.
//!
//! None of them buffers a body: they pass frames through as they come.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

/// The one error type of bodies and exchanges (`http1`'s).
pub use crate::http1::Error as BoxError;
/// The one body type the proxy hands on, to clients and to workers.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|e| match e {})
        .boxed_unsync()
}

pub fn empty() -> ProxyBody {
    full(Bytes::new())
}

/// A client's request body: an HTTP/2 stream's (hyper's), an HTTP/1.1 body the
/// client connection's session reads into a [`Piped`], or none.
pub enum RequestBody {
    Hyper(hyper::body::Incoming),
    Piped(Piped),
    Empty,
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Hyper(inner) => Pin::new(inner).poll_frame(cx).map_err(Into::into),
            RequestBody::Piped(inner) => inner.poll(cx),
            RequestBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Hyper(inner) => inner.is_end_stream(),
            RequestBody::Piped(_) => false,
            RequestBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Hyper(inner) => inner.size_hint(),
            RequestBody::Piped(p) => p.length.map_or_else(SizeHint::new, SizeHint::with_exact),
            RequestBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// A body passed from the task that reads it off a connection to whoever polls it,
/// one piece at a time: the reader reads only when the body asks for more (so an
/// unread body is not read at all, and `Expect: 100-continue` is answered when the
/// body is first asked for), and both sides are the same task's, so the hand-off
/// costs no wake-up of another thread.
pub fn pipe(length: Option<u64>) -> (Feed, Piped) {
    let shared = Arc::new(std::sync::Mutex::new(PipeState::default()));
    (
        Feed {
            shared: shared.clone(),
        },
        Piped { shared, length },
    )
}

#[derive(Default)]
struct PipeState {
    data: Option<Bytes>,
    /// The end: clean (None) or failed.
    end: Option<Option<BoxError>>,
    /// The body asked for more and has not been given it.
    wanted: bool,
    /// The reader went away without an end.
    dropped: bool,
    /// The body's reader (once it asked) and the feed's (once it waits).
    body_waker: Option<std::task::Waker>,
    feed_waker: Option<std::task::Waker>,
}

impl PipeState {
    /// The body asked for more and has nothing waiting.
    fn asks(&self) -> bool {
        self.wanted && self.data.is_none()
    }
}

/// The body's side of a [`pipe`].
pub struct Piped {
    shared: Arc<std::sync::Mutex<PipeState>>,
    /// The declared length.
    length: Option<u64>,
}

impl Piped {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut s = lock(&self.shared);
        if let Some(data) = s.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let Some(end) = s.end.take() {
            s.end = Some(None);
            return Poll::Ready(end.map(Err));
        }
        if s.dropped {
            return Poll::Ready(Some(Err("client connection closed mid-body".into())));
        }
        s.wanted = true;
        s.body_waker = Some(cx.waker().clone());
        if let Some(w) = s.feed_waker.take() {
            w.wake();
        }
        Poll::Pending
    }
}

/// The reader's side of a [`pipe`].
pub struct Feed {
    shared: Arc<std::sync::Mutex<PipeState>>,
}

impl Feed {
    /// Whether the body asked for more and has nothing waiting.
    pub fn wanted(&self) -> bool {
        lock(&self.shared).asks()
    }

    /// Whether nobody will read the body any more (its holder dropped it).
    pub fn unread(&self) -> bool {
        Arc::strong_count(&self.shared) == 1
    }

    /// Resolves once the body asks for more (or is dropped).
    pub async fn asked(&self) {
        std::future::poll_fn(|cx| {
            if self.unread() {
                return Poll::Ready(());
            }
            let mut s = lock(&self.shared);
            if s.asks() {
                return Poll::Ready(());
            }
            s.feed_waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Gives the body its next piece.
    pub fn send(&self, data: Bytes) {
        let mut s = lock(&self.shared);
        s.data = Some(data);
        s.wanted = false;
        if let Some(w) = s.body_waker.take() {
            w.wake();
        }
    }

    /// Ends the body: cleanly, or with `error`.
    pub fn end(&self, error: Option<BoxError>) {
        let mut s = lock(&self.shared);
        s.end = Some(error);
        if let Some(w) = s.body_waker.take() {
            w.wake();
        }
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        let mut s = lock(&self.shared);
        s.dropped = true;
        if let Some(w) = s.body_waker.take() {
            w.wake();
        }
    }
}

fn lock(m: &std::sync::Mutex<PipeState>) -> std::sync::MutexGuard<'_, PipeState> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The error a [`Limited`] body ends with when the client sent too much.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than {0} bytes")]
pub struct TooLarge(pub u64);

/// The error a request body fails with when the client sends nothing of it for
/// `timeouts.body_read` (nginx's `client_body_timeout`).
#[derive(Debug, thiserror::Error)]
#[error("request body not received in time")]
pub struct BodyTimedOut;

/// What went wrong with a client's request body: the client's fault, so the answer
/// is 413, 408 or 400 rather than the 502 of a failing worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// More than the size limit.
    TooLarge,
    /// Broken framing (a bad chunk, a body cut short by the client).
    Malformed,
    /// Nothing came for `timeouts.body_read`.
    TimedOut,
}

/// Where a [`Limited`] body records its [`Fault`] (the first one stays) and, when it
/// gives up, leaves the client's body: dropping that before the answer has gone out
/// would reset an HTTP/2 stream (RST_STREAM CANCEL) and the client would never see
/// the 413. Held by the answer instead, it goes once the answer is sent, and h2
/// then closes the stream with NO_ERROR, as RFC 9113 8.1 asks.
#[derive(Default)]
pub struct Faults {
    code: AtomicU8,
    kept: std::sync::Mutex<Option<ProxyBody>>,
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Faults")
            .field("fault", &self.get())
            .finish()
    }
}

impl Faults {
    pub fn get(&self) -> Option<Fault> {
        match self.code.load(Ordering::Acquire) {
            1 => Some(Fault::TooLarge),
            2 => Some(Fault::Malformed),
            3 => Some(Fault::TimedOut),
            _ => None,
        }
    }

    fn set(&self, fault: Fault) {
        let code = match fault {
            Fault::TooLarge => 1,
            Fault::Malformed => 2,
            Fault::TimedOut => 3,
        };
        let _ = self
            .code
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire);
    }

    fn keep(&self, body: ProxyBody) {
        *self.kept.lock().unwrap_or_else(|e| e.into_inner()) = Some(body);
    }

    /// The client's body a tripped [`Limited`] left behind, for the answer to hold.
    pub fn take_kept(&self) -> Option<ProxyBody> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// Passes a client's request body through, counting bytes; past `limit` it fails.
/// Either way a failure is recorded in `faults` as the client's, and a body cut
/// off at the limit is handed to `faults` rather than dropped.
pub struct Limited<B> {
    inner: Option<B>,
    seen: u64,
    limit: u64,
    faults: Arc<Faults>,
}

impl<B> Limited<B> {
    pub fn new(inner: B, limit: u64) -> (Self, Arc<Faults>) {
        let faults = Arc::new(Faults::default());
        (
            Limited {
                inner: Some(inner),
                seen: 0,
                limit,
                faults: faults.clone(),
            },
            faults,
        )
    }
}

impl<B> Body for Limited<B>
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError> + 'static,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if this.seen > this.limit {
                        this.faults.set(Fault::TooLarge);
                        if let Some(body) = this.inner.take() {
                            this.faults.keep(body.map_err(Into::into).boxed_unsync());
                        }
                        return Poll::Ready(Some(Err(TooLarge(this.limit).into())));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                let e: BoxError = e.into();
                this.faults.set(match e.is::<BodyTimedOut>() {
                    true => Fault::TimedOut,
                    false => Fault::Malformed,
                });
                Poll::Ready(Some(Err(e)))
            }
            other => other.map(|_| None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

/// Most of an unread request body read and thrown away after corral answered early.
const LINGER_BYTES: u64 = 1 << 20;
/// Longest it is read for.
const LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(1);

/// A client's request body that corral answered without reading (a 413). It is
/// kept until the answer has gone out and then read and thrown away for a moment,
/// bounded in bytes and time, as nginx's lingering close does: an HTTP/2 stream
/// reset (even NO_ERROR) that arrives with the answer makes some clients (curl
/// 7.88) drop the answer, and an HTTP/1 close with unread bytes can turn into a
/// TCP reset that does the same.
pub struct Unread(Option<(ProxyBody, crate::runtime::life::Life)>);

impl Unread {
    /// `owner` owns the short task that reads the body away.
    pub fn new(body: Option<ProxyBody>, owner: &crate::runtime::life::Life) -> Unread {
        Unread(body.map(|b| (b, owner.clone())))
    }
}

impl Drop for Unread {
    fn drop(&mut self) {
        let Some((mut body, owner)) = self.0.take() else {
            return;
        };
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        // Bounded in time and bytes: the task ends by itself within LINGER_TIME.
        owner.spawn(async move {
            let mut read = 0u64;
            let _ = tokio::time::timeout(LINGER_TIME, async {
                while let Some(Ok(frame)) = body.frame().await {
                    read += frame.data_ref().map_or(0, |d| d.len() as u64);
                    if read > LINGER_BYTES {
                        break;
                    }
                }
            })
            .await;
        });
    }
}

pin_project_lite::pin_project! {
    /// A body that holds an [`Unread`] request body until the body itself is
    /// dropped, which is after it was sent.
    pub struct Holding<B> {
        #[pin]
        inner: B,
        unread: Unread,
    }
}

impl<B> Holding<B> {
    pub fn new(inner: B, unread: Unread) -> Self {
        Holding { inner, unread }
    }
}

impl<B: Body> Body for Holding<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// Yields `prefix` first (bytes already read for inspection), then the rest.
    pub struct Prefixed<B> {
        prefix: Option<Bytes>,
        #[pin]
        rest: B,
    }
}

impl<B> Prefixed<B> {
    pub fn new(prefix: Bytes, rest: B) -> Self {
        Prefixed {
            prefix: (!prefix.is_empty()).then_some(prefix),
            rest,
        }
    }
}

impl<B> Body for Prefixed<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        if let Some(p) = this.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(p))));
        }
        this.rest.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let rest = self.rest.size_hint();
        let extra = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        // Upper first: set_lower asserts lower <= upper.
        let mut hint = SizeHint::new();
        if let Some(u) = rest.upper() {
            hint.set_upper(u.saturating_add(extra));
        }
        hint.set_lower(rest.lower().saturating_add(extra));
        hint
    }
}

pin_project_lite::pin_project! {
    /// Adds the size of every data frame to a counter as it passes.
    pub struct Counted<B> {
        #[pin]
        inner: B,
        counter: Arc<crate::counters::Counters>,
        outbound: bool,
    }
}

impl<B> Counted<B> {
    /// Counts into the metrics' bytes out (`outbound`) or bytes in.
    pub fn new(inner: B, counter: Arc<crate::counters::Counters>, outbound: bool) -> Self {
        Counted {
            inner,
            counter,
            outbound,
        }
    }
}

impl<B: Body<Data = Bytes>> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(d) = frame.data_ref() {
                let c = if *this.outbound {
                    &this.counter.bytes_out
                } else {
                    &this.counter.bytes_in
                };
                c.fetch_add(d.len() as u64, Ordering::Relaxed);
            }
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

/// What a [`Guarded`] body holds until it ends: `ended` runs when the body was read
/// to the end; a body dropped before that drops its guard without it.
pub trait Guard {
    fn ended(self);
}

impl<G: Guard> Guard for Option<G> {
    fn ended(self) {
        if let Some(g) = self {
            g.ended();
        }
    }
}

impl<A: Guard, B: Guard> Guard for (A, B) {
    fn ended(self) {
        self.0.ended();
        self.1.ended();
    }
}

pin_project_lite::pin_project! {
    /// A body that holds `guard` until the body ends or is dropped.
    pub struct Guarded<B, G: Guard> {
        #[pin]
        inner: B,
        guard: Option<G>,
    }
}

impl<B: Body, G: Guard> Guarded<B, G> {
    pub fn new(inner: B, guard: G) -> Self {
        if inner.is_end_stream() {
            // Nothing to read (204, 304, HEAD, Content-Length: 0).
            guard.ended();
            return Guarded { inner, guard: None };
        }
        Guarded {
            inner,
            guard: Some(guard),
        }
    }
}

impl<B: Body, G: Guard> Body for Guarded<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        // hyper stops polling once a body says it has ended, so the end is noticed
        // after the last frame as well as at `None`.
        let ended = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => this.inner.is_end_stream(),
            _ => false,
        };
        if ended {
            if let Some(guard) = this.guard.take() {
                guard.ended();
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn chunks(n: usize, size: usize) -> impl Body<Data = Bytes, Error = BoxError> {
        let frames =
            (0..n).map(move |_| Ok::<_, BoxError>(Frame::data(Bytes::from(vec![7u8; size]))));
        StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn limited_passes_small_and_trips_large() {
        let (small, faults) = Limited::new(chunks(4, 10), 40);
        assert_eq!(small.collect().await.expect("fits").to_bytes().len(), 40);
        assert_eq!(faults.get(), None);
        let (big, faults) = Limited::new(chunks(5, 10), 40);
        assert!(big.collect().await.is_err());
        assert_eq!(faults.get(), Some(Fault::TooLarge));
        let broken = StreamBody::new(futures_util::stream::iter(vec![
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"ab"))),
            Err("bad chunk".into()),
        ]));
        let (broken, faults) = Limited::new(broken, 40);
        assert!(broken.collect().await.is_err());
        assert_eq!(faults.get(), Some(Fault::Malformed));
    }

    #[test]
    fn prefixed_size_hint_adds_prefix() {
        let body = Prefixed::new(Bytes::from_static(b"ab"), full("cd"));
        assert_eq!(body.size_hint().exact(), Some(4));
    }

    #[tokio::test]
    async fn prefixed_replays_prefix() {
        let body = Prefixed::new(Bytes::from_static(b"ab"), full("cd"));
        assert_eq!(
            body.collect().await.expect("ok").to_bytes(),
            Bytes::from_static(b"abcd")
        );
    }

    /// Records whether it ended or was only dropped.
    struct Probe(Arc<std::sync::Mutex<&'static str>>);
    impl Guard for Probe {
        fn ended(self) {
            *self.0.lock().expect("probe") = "ended";
        }
    }

    #[tokio::test]
    async fn guard_ends_only_when_the_body_is_read_to_the_end() {
        let state = Arc::new(std::sync::Mutex::new("held"));
        // A sized body ends with its last frame (hyper polls no further).
        let mut body = Guarded::new(full("abc"), Probe(state.clone()));
        assert!(body.frame().await.is_some());
        assert_eq!(*state.lock().expect("probe"), "ended");
        // An empty body has ended before it is read.
        let state = Arc::new(std::sync::Mutex::new("held"));
        drop(Guarded::new(empty(), Probe(state.clone())));
        assert_eq!(*state.lock().expect("probe"), "ended");
        // Given up half-way: dropped, not ended.
        let state = Arc::new(std::sync::Mutex::new("held"));
        let mut body = Guarded::new(chunks(3, 4), Probe(state.clone()));
        assert!(body.frame().await.is_some());
        drop(body);
        assert_eq!(*state.lock().expect("probe"), "held");
    }
}
