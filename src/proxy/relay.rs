//! One websocket tunnel's bytes, both ways, between two streams that are already
//! open (plain TCP or TLS, the same code for both): copied as they come, counted into
//! corral's byte counters as they move, ended by either side, by an idle period, or
//! by a close code (1001 at shutdown, 1012 for a leaving worker) sent to the client
//! between two of the worker's frames. It owns no socket beyond the call and knows
//! nothing of workers, sessions or threads (`tunnel` does).

use crate::proxy::frames::Frames;
use crate::runtime::handover;
use bytes::Bytes;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes read from either side before the relay began, to be sent on first.
#[derive(Default)]
pub struct Early {
    pub to_worker: Bytes,
    pub to_client: Bytes,
}

/// Where a tunnel's bytes are added as they move: client to worker, worker to client.
#[derive(Clone, Copy)]
pub struct Meter<'m> {
    pub up: &'m AtomicU64,
    pub down: &'m AtomicU64,
}

/// What ends a tunnel from outside: a close code to send the client, or an
/// upgrade that carries the tunnel into the next image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// Send this close code between two of the worker's frames, and end.
    Code(u16),
    /// Stop where it stands and give both streams and the relay's state back.
    Carry,
}

/// How a relay ended.
pub enum Spliced<A, B> {
    /// Over; the bytes copied from `a` to `b` and from `b` to `a`.
    Ended(u64, u64),
    /// Stopped for an upgrade: both streams, and where the relay stood.
    Paused(A, B, handover::Relay),
}

#[cfg(test)]
/// Copies both ways until both directions end, an error, or `idle` without a byte.
/// Returns the bytes copied from `a` to `b` and from `b` to `a`.
pub async fn splice<A, B>(a: A, b: B, idle: Duration) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let meter = Meter {
        up: &up,
        down: &down,
    };
    let closing = std::future::pending::<Close>();
    match splice_from(a, b, Early::default(), idle, closing, meter).await {
        Spliced::Ended(up, down) => (up, down),
        Spliced::Paused(..) => unreachable!("never carried"),
    }
}
/// How many times per idle period a tunnel looks whether bytes came: it closes
/// between one and one and an eighth idle periods after the last byte.
const IDLE_CHECKS: u32 = 8;

/// How often a tunnel with `idle` as its idle period looks whether bytes came.
fn idle_check_every(idle: Duration) -> Duration {
    (idle / IDLE_CHECKS).max(Duration::from_millis(1))
}

/// Longest a closing tunnel waits for the worker's frame in flight to end.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Close status 1001 "going away": corral is shutting down.
pub const GOING_AWAY: u16 = 1001;
/// Close status 1012 "service restart": the worker is being replaced or removed.
pub const SERVICE_RESTART: u16 = 1012;

/// A websocket close frame (server to client: unmasked) with status `code`.
fn close_frame(code: u16) -> [u8; 4] {
    let [hi, lo] = code.to_be_bytes();
    [0x88, 0x02, hi, lo]
}

/// As [`splice`], where `a` is the websocket client and `b` the worker, with the
/// bytes added to `meter` as they move. When `closing` resolves with a close code,
/// the tunnel waits for the worker's frame in flight to end (up to a second), sends
/// the client a close frame with that code so that its socket closes cleanly and it
/// reconnects, and ends; with [`Close::Carry`] it stops at once and gives both
/// streams back with where it stood. `early`'s bytes are sent on first (and
/// counted as copied).
pub async fn splice_from<A, B>(
    a: A,
    b: B,
    early: Early,
    idle: Duration,
    closing: impl std::future::Future<Output = Close>,
    meter: Meter<'_>,
) -> Spliced<A, B>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    meter
        .up
        .fetch_add(early.to_worker.len() as u64, Ordering::Relaxed);
    meter
        .down
        .fetch_add(early.to_client.len() as u64, Ordering::Relaxed);
    // Copied out and let go of at once: each `Bytes` may be a slice of a whole read
    // buffer (the client connection's, the worker connection's), which it would
    // keep alive for as long as the tunnel lasts.
    let state = handover::Relay {
        to_worker: early.to_worker.to_vec(),
        to_client: early.to_client.to_vec(),
        bytes_up: early.to_worker.len() as u64,
        bytes_down: early.to_client.len() as u64,
        ..handover::Relay::default()
    };
    drop(early);
    resume(a, b, state, idle, closing, meter).await
}

/// As [`splice_from`], from where a relay carried by an upgrade stood.
pub async fn resume<A, B>(
    a: A,
    b: B,
    state: handover::Relay,
    idle: Duration,
    closing: impl std::future::Future<Output = Close>,
    meter: Meter<'_>,
) -> Spliced<A, B>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    // Set by every read that brings bytes; the idle check looks at it a few times
    // per idle period (a clock read on every read cost more than the flag).
    let active = std::sync::atomic::AtomicBool::new(false);
    let mut a = Activity::new(a, &active, meter.up);
    let mut b = Activity::new(b, &active, meter.down);
    a.bytes = state.bytes_up;
    b.bytes = state.bytes_down;
    let mut copy = Bidirectional {
        a: &mut a,
        b: &mut b,
        a_to_b: Pump::resumed(state.to_worker, state.up_eof, state.up_done, None),
        b_to_a: Pump::resumed(
            state.to_client,
            state.down_eof,
            state.down_done,
            Some(Frames::resumed(&state.frame)),
        ),
    };
    let done = copy_until_done(&mut copy, &active, idle, state.quiet, closing).await;
    let say_goodbye = match done {
        Done::Over => None,
        Done::Goodbye(code) => Some(code),
        Done::Carry(quiet) => {
            let (up, down) = (copy.a_to_b.left(), copy.b_to_a.left());
            let paused = handover::Relay {
                to_worker: up.0,
                up_eof: up.1,
                up_done: up.2,
                to_client: down.0,
                down_eof: down.1,
                down_done: down.2,
                frame: copy.b_to_a.frames.unwrap_or_default().carried(),
                bytes_up: a.bytes,
                bytes_down: b.bytes,
                quiet,
            };
            return Spliced::Paused(a.inner, b.inner, paused);
        }
    };
    if let Some(code) = say_goodbye {
        use tokio::io::AsyncWriteExt;
        let bye = async {
            a.write_all(&close_frame(code)).await?;
            a.flush().await?;
            a.shutdown().await
        };
        if let Err(e) = tokio::time::timeout(CLOSE_WAIT, bye)
            .await
            .unwrap_or(Err(io::ErrorKind::TimedOut.into()))
        {
            tracing::debug!(error = %e, "close frame not delivered");
        }
    }
    Spliced::Ended(a.bytes, b.bytes)
}

/// How `copy_until_done` ended.
enum Done {
    /// Both ways ended, an error, or the idle period.
    Over,
    /// A close code to send, the worker's frame in flight being over.
    Goodbye(u16),
    /// Carried by an upgrade, with the idle checks passed without a byte so far.
    Carry(u32),
}

/// Runs `copy` until both ways end, an error, the idle period, or `closing`; after
/// `closing`, until the worker's frame in flight has ended (then the close code to
/// send is returned) or a second has passed.
async fn copy_until_done<A, B>(
    copy: &mut Bidirectional<'_, A, B>,
    active: &std::sync::atomic::AtomicBool,
    idle: Duration,
    mut quiet: u32,
    closing: impl std::future::Future<Output = Close>,
) -> Done
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    // Polled only when it wakes: beside the copy, it would be polled (a lock
    // taken) at every burst of bytes.
    let closing = Lazy::new(closing);
    tokio::pin!(closing);
    let step = idle_check_every(idle);
    let mut next_check = tokio::time::Instant::now() + step;
    let mut close_by: Option<(tokio::time::Instant, u16)> = None;
    loop {
        if let Some((deadline, code)) = close_by {
            if copy.b_to_a.between_frames() {
                return Done::Goodbye(code);
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::debug!("tunnel closing mid-frame");
                return Done::Over;
            }
        }
        let wake = close_by.map_or(next_check, |(d, _)| d.min(next_check));
        tokio::select! {
            result = &mut *copy => {
                match (result, close_by) {
                    (Ok(()), Some((_, code))) if copy.b_to_a.between_frames() => {
                        return Done::Goodbye(code);
                    }
                    (Err(e), _) => tracing::debug!(error = %e, "tunnel ended with an error"),
                    _ => {}
                }
                return Done::Over;
            }
            c = &mut closing, if close_by.is_none() => match c {
                Close::Carry => return Done::Carry(quiet),
                Close::Code(c) => {
                    close_by = Some((tokio::time::Instant::now() + CLOSE_WAIT, c));
                    copy.b_to_a.closing = true;
                }
            },
            _ = Lazy::new(tokio::time::sleep_until(wake)) => {
                let now = tokio::time::Instant::now();
                if now >= next_check {
                    quiet = match active.swap(false, Ordering::Relaxed) {
                        true => 0,
                        false => quiet + 1,
                    };
                    if close_by.is_none() && quiet >= IDLE_CHECKS {
                        tracing::debug!(?idle, "tunnel idle, closing");
                        return Done::Over;
                    }
                    next_check = now + step;
                }
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A future polled only after it woke (and once at first): `select!` polls every
    /// branch whenever any wakes the task, and a tunnel's task wakes for every
    /// burst of bytes, while its close signal and timer wake almost never.
    struct Lazy<F> {
        #[pin]
        inner: F,
        woke: Arc<Woke>,
    }
}

/// The wake-up a [`Lazy`] future's inner future gives: marked, then passed on.
#[derive(Default)]
struct Woke {
    marked: std::sync::atomic::AtomicBool,
    task: futures_util::task::AtomicWaker,
}

impl std::task::Wake for Woke {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.marked.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F> Lazy<F> {
    fn new(inner: F) -> Lazy<F> {
        let woke = Arc::new(Woke::default());
        woke.marked.store(true, Ordering::Relaxed);
        Lazy { inner, woke }
    }
}

impl<F: std::future::Future> std::future::Future for Lazy<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        this.woke.task.register(cx.waker());
        if !this.woke.marked.swap(false, Ordering::Acquire) {
            return Poll::Pending;
        }
        let waker = std::task::Waker::from(this.woke.clone());
        this.inner.poll(&mut Context::from_waker(&waker))
    }
}

/// One direction of a tunnel. Bytes are read into a buffer on the stack and written
/// on at once; only what the writer cannot take right away is kept on the heap, so an
/// idle tunnel holds no buffer at all (tokio's copy keeps 8 KiB per direction).
#[derive(Default)]
struct Pump {
    pending: Vec<u8>,
    pos: usize,
    unflushed: bool,
    eof: bool,
    done: bool,
    /// Websocket framing of what was written on (worker to client only).
    frames: Option<Frames>,
    /// The tunnel is closing: write up to the end of the frame in flight, no further.
    closing: bool,
    /// Stopped at a frame's end, what came after it held back.
    held: bool,
}

/// Stack buffer for one read.
const CHUNK: usize = 16 * 1024;

impl Pump {
    /// A direction from where a carried relay stood.
    fn resumed(pending: Vec<u8>, eof: bool, done: bool, frames: Option<Frames>) -> Pump {
        Pump {
            pending,
            eof,
            done,
            frames,
            ..Pump::default()
        }
    }

    /// Once closing: where in `data` the frame in flight ends (0: between two
    /// frames already). None: write it all.
    fn boundary(&self, data: &[u8]) -> Option<usize> {
        match (self.closing, &self.frames) {
            (true, Some(f)) => f.until_between(data),
            _ => None,
        }
    }

    /// Stops at a frame's end: what was written goes out first.
    fn hold<W: AsyncWrite + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        mut w: Pin<&mut W>,
    ) -> Poll<io::Result<()>> {
        self.held = true;
        if self.unflushed {
            ready!(w.as_mut().poll_flush(cx))?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }

    /// What it has read and not written, whether its reader ended, and whether its
    /// writer is shut down.
    fn left(&mut self) -> (Vec<u8>, bool, bool) {
        let mut pending = std::mem::take(&mut self.pending);
        pending.drain(..self.pos);
        (pending, self.eof, self.done)
    }

    /// Nothing left to write before the close (all written, or stopped at a
    /// frame's end), and the bytes written so far end with a whole frame.
    fn between_frames(&self) -> bool {
        (self.held || self.pending.len() == self.pos)
            && self.frames.as_ref().is_none_or(Frames::between)
    }

    fn wrote(&mut self, data: &[u8]) {
        if let Some(f) = self.frames.as_mut() {
            f.feed(data);
        }
    }

    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            while self.pos < self.pending.len() {
                let rest = &self.pending[self.pos..];
                let end = self.boundary(rest).unwrap_or(rest.len());
                if end == 0 {
                    return self.hold(cx, w);
                }
                let n = ready!(w.as_mut().poll_write(cx, &rest[..end]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                if let Some(f) = self.frames.as_mut() {
                    f.feed(&self.pending[self.pos..self.pos + n]);
                }
                self.pos += n;
                // Taken is not sent: a TLS writer may hold the records until flushed.
                self.unflushed = true;
            }
            if !self.pending.is_empty() {
                // Give the memory back: the next burst may be long in coming.
                self.pending = Vec::new();
                self.pos = 0;
            }
            if self.eof {
                ready!(w.as_mut().poll_flush(cx))?;
                ready!(w.as_mut().poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            if self.boundary(&[]) == Some(0) {
                return self.hold(cx, w);
            }
            // Uninitialised: zeroing 16 KiB on every read would cost more than the read.
            let mut stack = [std::mem::MaybeUninit::<u8>::uninit(); CHUNK];
            let mut buf = ReadBuf::uninit(&mut stack);
            match r.as_mut().poll_read(cx, &mut buf) {
                Poll::Pending => {
                    if self.unflushed {
                        ready!(w.as_mut().poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let data = buf.filled();
            if data.is_empty() {
                self.eof = true;
                continue;
            }
            self.write_on(cx, w.as_mut(), data)?;
        }
    }

    /// Writes what was just read on, as far as the writer takes it (and, once
    /// closing, up to the end of the frame in flight); keeps the rest.
    fn write_on<W: AsyncWrite + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        mut w: Pin<&mut W>,
        data: &[u8],
    ) -> io::Result<()> {
        let end = self.boundary(data).unwrap_or(data.len());
        let mut off = 0;
        while off < end {
            match w.as_mut().poll_write(cx, &data[off..end]) {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => {
                    self.wrote(&data[off..off + n]);
                    off += n;
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => break,
            }
        }
        if off < data.len() {
            self.pending = data[off..].to_vec();
            self.pos = 0;
        }
        self.unflushed = true;
        Ok(())
    }
}

/// Both directions; done when both have ended (each shuts down its writer at EOF).
struct Bidirectional<'a, A: ?Sized, B: ?Sized> {
    a: &'a mut A,
    b: &'a mut B,
    a_to_b: Pump,
    b_to_a: Pump,
}

impl<A, B> std::future::Future for Bidirectional<'_, A, B>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    type Output = io::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.a_to_b.done {
            if let Poll::Ready(Err(e)) =
                this.a_to_b
                    .poll(cx, Pin::new(&mut *this.a), Pin::new(&mut *this.b))
            {
                return Poll::Ready(Err(e));
            }
        }
        if !this.b_to_a.done {
            if let Poll::Ready(Err(e)) =
                this.b_to_a
                    .poll(cx, Pin::new(&mut *this.b), Pin::new(&mut *this.a))
            {
                return Poll::Ready(Err(e));
            }
            if this.b_to_a.held {
                // Stopped at a frame's end for the close frame.
                return Poll::Ready(Ok(()));
            }
        }
        if this.a_to_b.done && this.b_to_a.done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
}

pin_project_lite::pin_project! {
    /// Counts the bytes read from the inner stream, into its own count and into
    /// corral's counter, and marks that some came.
    struct Activity<'f, T> {
        #[pin]
        inner: T,
        active: &'f std::sync::atomic::AtomicBool,
        total: &'f AtomicU64,
        bytes: u64,
    }
}

impl<'f, T> Activity<'f, T> {
    fn new(inner: T, active: &'f std::sync::atomic::AtomicBool, total: &'f AtomicU64) -> Self {
        Activity {
            inner,
            active,
            total,
            bytes: 0,
        }
    }
}

impl<T: AsyncRead> AsyncRead for Activity<'_, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.inner.poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            *this.bytes += n;
            this.total.fetch_add(n, Ordering::Relaxed);
            this.active.store(true, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite> AsyncWrite for Activity<'_, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Where time is the subject the clock is tokio's, paused: it moves only when
    // every task waits, straight to the next timer.
    use tokio::time::Instant;

    /// Closed between one and one and an eighth idle periods after the last byte.
    #[tokio::test(start_paused = true)]
    async fn splice_copies_and_closes_on_idle() {
        let (mut client, a) = tokio::io::duplex(1024);
        let (b, mut server) = tokio::io::duplex(1024);
        let t = tokio::spawn(splice(a, b, Duration::from_millis(200)));
        client.write_all(b"ping").await.expect("write");
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"ping");
        server.write_all(b"pong").await.expect("write");
        client.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"pong");
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(2), t)
            .await
            .expect("idle tunnel closes")
            .expect("task");
        let after = started.elapsed();
        assert!(
            after >= Duration::from_millis(200) && after <= Duration::from_millis(225),
            "{after:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_keep_a_tunnel_open_past_its_idle_period() {
        let (mut client, a) = tokio::io::duplex(1024);
        let (b, mut server) = tokio::io::duplex(1024);
        let idle = Duration::from_millis(300);
        let t = tokio::spawn(splice(a, b, idle));
        let mut buf = [0u8; 1];
        // A byte every 100 ms for four idle periods, one way and then the other.
        for i in 0..12 {
            if i < 6 {
                client.write_all(b"x").await.expect("write");
                server.read_exact(&mut buf).await.expect("read");
            } else {
                server.write_all(b"y").await.expect("write");
                client.read_exact(&mut buf).await.expect("read");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(!t.is_finished(), "closed while bytes came, at {i}");
        }
        let quiet = Instant::now();
        tokio::time::timeout(Duration::from_secs(2), t)
            .await
            .expect("closes once quiet")
            .expect("task");
        let after = quiet.elapsed();
        assert!(
            after >= Duration::from_millis(200) && after <= Duration::from_millis(240),
            "{after:?}"
        );
    }

    #[tokio::test]
    async fn splice_carries_bulk_through_slow_writers() {
        // Tiny pipes force partial writes and the pending-buffer path.
        let (mut client, a) = tokio::io::duplex(64);
        let (b, mut server) = tokio::io::duplex(64);
        let t = tokio::spawn(splice(a, b, Duration::from_secs(10)));
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.expect("write");
            client.shutdown().await.expect("shutdown");
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.expect("read back");
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, data);
        server.write_all(b"bye").await.expect("reply");
        drop(server);
        assert_eq!(writer.await.expect("task"), b"bye");
        let (up, down) = tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .expect("ends")
            .expect("task");
        assert_eq!((up, down), (200_000, 3));
    }

    #[tokio::test]
    async fn splice_ends_when_one_side_closes() {
        let (client, a) = tokio::io::duplex(1024);
        let (b, mut server) = tokio::io::duplex(1024);
        let t = tokio::spawn(splice(a, b, Duration::from_secs(60)));
        drop(client);
        let mut rest = Vec::new();
        server
            .read_to_end(&mut rest)
            .await
            .expect("eof reaches the worker");
        drop(server);
        tokio::time::timeout(Duration::from_secs(2), t)
            .await
            .expect("tunnel ends")
            .expect("task");
    }

    /// An open tunnel keeps no read buffer its early bytes came from: they are
    /// copied out at once (an idle tunnel held two 8 KiB buffers through them).
    #[tokio::test]
    async fn early_bytes_do_not_keep_their_buffers() {
        let (mut client, a) = tokio::io::duplex(1024);
        let (b, mut server) = tokio::io::duplex(1024);
        let read_buffer = Bytes::from(vec![7u8; 16 * 1024]);
        let early = Early {
            to_worker: read_buffer.slice(0..3),
            to_client: Bytes::new(),
        };
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        let tunnel = async move {
            let meter = Meter {
                up: &up,
                down: &down,
            };
            splice_from(
                a,
                b,
                early,
                Duration::from_secs(60),
                std::future::pending::<Close>(),
                meter,
            )
            .await
        };
        let task = tokio::spawn(tunnel);
        let mut got = [0u8; 3];
        server.read_exact(&mut got).await.expect("early bytes");
        assert_eq!(got, [7, 7, 7]);
        assert!(
            read_buffer.is_unique(),
            "the tunnel still holds the read buffer"
        );
        drop(client.shutdown().await);
        drop(server);
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }
}
