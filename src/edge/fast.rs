//! The client side's HTTP/1.1 fast path: a connection's plain requests — complete
//! HTTP/1.1 heads with no body (no Content-Length, no Transfer-Encoding), no
//! upgrade, no expectation — are read with `httparse` and answered by this loop,
//! one after another on the connection's own task. At the first request that is
//! anything else, or a head it cannot read whole and clean, the connection goes to
//! hyper's server for the rest of its life with every byte read so far
//! ([`Rewind`]), so every rule hyper enforces — 400 and 431 answers, body framing,
//! `100-continue`, HTTP/1.0, upgrades — stays hyper's alone.
//!
//! It owns the connection's loop: reading heads (`http1::head`, which also says
//! when one passes `limits.max_header`: 431, every byte counted, whole or not) and
//! writing answers as hyper's server writes them (`http1::encode`). It must not
//! judge requests (the gate does, for both paths) and never reads a request body:
//! a request with one is not its to serve.

use crate::edge::gate::Gate;
use crate::http1::encode::{refusal_head, response_head, BodyKnown, Framing};
use crate::http1::head::{parse_plain_request, Parsed};
use crate::http1::{make_room, READ_SIZE};
use crate::proxy::forward::Peer;
use crate::transport::body::{BoxError, ProxyBody, RequestBody};
use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body as _, Frame};
use http_body_util::BodyExt;
use std::io::{self, Write as _};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;

/// What the loop needs to know of the listener's limits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Longest request head (`limits.max_header`): a longer one, whole or not, is
    /// answered 431 here, and the connection closed.
    pub max_head: usize,
    /// Time for a whole request head, from the end of the previous answer (hyper's
    /// `header_read_timeout`, which also closes idle keep-alive connections).
    pub header_read: Duration,
    /// Shut the connection down before closing it after an answer: over TLS that
    /// sends close_notify. A plain socket's close sends the same FIN as a shutdown
    /// right before it would, so it is one system call saved per such answer.
    pub shutdown: bool,
    /// The socket still has Nagle's algorithm on: the loop turns it off before the
    /// connection's second write (and at a hand-over), as nginx turns it off only for
    /// a connection it keeps alive. A first write goes out at once either way, so a
    /// connection that carries one answer in one write saves the system call.
    pub nagle: bool,
}

/// A client connection's socket, whose Nagle's algorithm can be turned off.
pub(crate) trait NoDelay {
    /// Sets TCP_NODELAY.
    fn no_delay(&self);
}

impl NoDelay for tokio::net::TcpStream {
    fn no_delay(&self) {
        let _ = self.set_nodelay(true);
    }
}

/// Whether Nagle's algorithm is still on, and whether anything was written yet.
struct Nagle {
    on: bool,
    wrote: bool,
}

impl Nagle {
    /// Called before each write of `bytes`: turns the algorithm off before the
    /// second that sends anything.
    fn before_write<I: NoDelay>(&mut self, io: &I, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if self.on && self.wrote {
            io.no_delay();
            self.on = false;
        }
        self.wrote = true;
    }

    /// Hyper's server writes as it likes: off before the hand-over.
    fn hand_over<I: NoDelay>(&mut self, io: &I) {
        if self.on {
            io.no_delay();
            self.on = false;
        }
    }
}

/// How the loop left a connection.
pub(crate) enum Outcome<I> {
    /// Closed (by either side, a timeout, a failure, or the drain).
    Closed,
    /// Not the loop's to serve further: hyper's, with the bytes read so far.
    Handover(Rewind<I>),
}

/// Serves the plain requests of a connection until it closes or a request is not
/// plain. Once `draining` is cancelled, an idle connection closes at once and a
/// request in flight is answered first.
pub(crate) async fn serve<I>(
    mut io: I,
    gate: &Arc<Gate>,
    peer: &Peer,
    limits: Limits,
    draining: &CancellationToken,
) -> Outcome<I>
where
    I: AsyncRead + AsyncWrite + Unpin + NoDelay,
{
    let mut nagle = Nagle {
        on: limits.nagle,
        wrote: false,
    };
    let mut buf = BytesMut::with_capacity(READ_SIZE);
    let mut out = Vec::with_capacity(1024);
    let deadline = tokio::time::sleep(limits.header_read);
    tokio::pin!(deadline);
    loop {
        deadline
            .as_mut()
            .reset(tokio::time::Instant::now() + limits.header_read);
        let (req, client_close) = loop {
            match parse_plain_request(&mut buf, limits.max_head, || RequestBody::Empty) {
                Parsed::Plain(req, close) => break (req, close),
                Parsed::Other => {
                    nagle.hand_over(&io);
                    return Outcome::Handover(Rewind::new(io, buf.freeze()));
                }
                Parsed::TooLarge => {
                    let status = StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
                    // Boxed: a rare path, kept out of the loop's future.
                    Box::pin(refuse(&mut io, &mut nagle, status)).await;
                    return Outcome::Closed;
                }
                Parsed::Partial => {}
            }
            make_room(&mut buf);
            let idle = buf.is_empty();
            let read = tokio::select! {
                r = io.read_buf(&mut buf) => r,
                _ = &mut deadline => return Outcome::Closed,
                _ = draining.cancelled(), if idle => return Outcome::Closed,
            };
            match read {
                Ok(0) | Err(_) => return Outcome::Closed,
                Ok(_) => {}
            }
        };
        let head_request = req.method() == Method::HEAD;
        let Some(resp) =
            answer_unless_gone(&mut io, &mut buf, limits.max_head, gate, req, peer).await
        else {
            return Outcome::Closed;
        };
        let keep = !client_close && !draining.is_cancelled();
        match write_response(&mut io, &mut nagle, &mut out, resp, head_request, keep).await {
            Ok(true) => {}
            Ok(false) | Err(_) => {
                if limits.shutdown {
                    let _ = io.shutdown().await;
                }
                return Outcome::Closed;
            }
        }
    }
}

/// The gate's answer to `req`, or None if the client went away first (its end
/// read, or a reset): the request is dropped then, and with it the worker's
/// connection, which is closed, not put back (nginx's 499). What the client sends
/// meanwhile (a pipelined request) is kept in `buf`, up to a head's size.
async fn answer_unless_gone<I>(
    io: &mut I,
    buf: &mut BytesMut,
    max_head: usize,
    gate: &Arc<Gate>,
    req: Request<RequestBody>,
    peer: &Peer,
) -> Option<Response<ProxyBody>>
where
    I: AsyncRead + Unpin,
{
    let answer = gate.clone().handle(req, peer.clone());
    tokio::pin!(answer);
    loop {
        make_room(buf);
        tokio::select! {
            biased;
            Ok(resp) = &mut answer => return Some(resp),
            read = io.read_buf(buf), if buf.len() < max_head => match read {
                Ok(0) | Err(_) => {
                    tracing::debug!(peer = %peer.addr, "client went away before its answer");
                    return None;
                }
                Ok(_) => {}
            },
        }
    }
}

/// Answers a head the loop will not read on with hyper's refusal (`refusal_head`),
/// then closes. What the client is still sending is read away for a moment first
/// (nginx's lingering close): closed with unread bytes, the socket would send a
/// reset that can overtake the answer.
async fn refuse<I>(io: &mut I, nagle: &mut Nagle, status: StatusCode)
where
    I: AsyncRead + AsyncWrite + Unpin + NoDelay,
{
    let mut out = Vec::with_capacity(128);
    refusal_head(&mut out, status);
    nagle.before_write(io, &out);
    if io.write_all(&out).await.is_err() || io.flush().await.is_err() {
        return;
    }
    let _ = io.shutdown().await;
    let linger = async {
        let mut sink = vec![0u8; 4096];
        let mut left = LINGER_BYTES;
        while left > 0 {
            match io.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, linger).await;
}

/// How long, and how much at most, a refused client's bytes are read away.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

/// Writes `resp` as hyper's server would; returns whether the connection can carry
/// another request (`keep`: the client did not ask to close and no drain began).
async fn write_response<I>(
    io: &mut I,
    nagle: &mut Nagle,
    out: &mut Vec<u8>,
    resp: Response<ProxyBody>,
    head_request: bool,
    keep: bool,
) -> io::Result<bool>
where
    I: AsyncWrite + Unpin + NoDelay,
{
    let (parts, mut body) = resp.into_parts();
    out.clear();
    let known = BodyKnown {
        ended: body.is_end_stream(),
        exact: body.size_hint().exact(),
    };
    let (framing, mut keep) = response_head(out, &parts, known, head_request, keep);
    if framing == Framing::Nothing {
        drop(body);
        nagle.before_write(io, out);
        io.write_all(out).await?;
        io.flush().await?;
        return Ok(keep);
    }
    // What the body has already goes out with the head (the usual small answer,
    // a chunked one's last chunk and end included: one write); a body still to
    // come does not hold back what is there.
    let mut sent = 0u64;
    loop {
        let frame = match frame_now(&mut body).await {
            Some(frame) => frame,
            None => {
                if !out.is_empty() {
                    nagle.before_write(io, out);
                    io.write_all(out).await?;
                    io.flush().await?;
                    out.clear();
                }
                body.frame().await
            }
        };
        match frame {
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue; // trailers are not passed on, as hyper does not here
                };
                if data.is_empty() {
                    continue;
                }
                sent += data.len() as u64;
                match framing {
                    Framing::Length(n) if sent > n => {
                        return Err(io::Error::other("body longer than its length"))
                    }
                    Framing::Chunked => {
                        let _ = write!(out, "{:x}\r\n", data.len());
                        out.extend_from_slice(&data);
                        out.extend_from_slice(b"\r\n");
                    }
                    _ => out.extend_from_slice(&data),
                }
                if out.len() >= 64 * 1024 {
                    nagle.before_write(io, out);
                    io.write_all(out).await?;
                    out.clear();
                }
            }
            Some(Err(_)) => {
                nagle.before_write(io, out);
                io.write_all(out).await?;
                io.flush().await?;
                return Ok(false);
            }
            None => break,
        }
    }
    match framing {
        Framing::Chunked => out.extend_from_slice(b"0\r\n\r\n"),
        Framing::Length(n) if sent != n => keep = false,
        Framing::Close => keep = false,
        _ => {}
    }
    nagle.before_write(io, out);
    io.write_all(out).await?;
    io.flush().await?;
    out.clear();
    Ok(keep)
}

/// The body's next frame if it is there without waiting (`None`: not yet).
async fn frame_now(body: &mut ProxyBody) -> Option<Option<Result<Frame<Bytes>, BoxError>>> {
    std::future::poll_fn(|cx| match Pin::new(&mut *body).poll_frame(cx) {
        Poll::Ready(frame) => Poll::Ready(Some(frame)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

/// A connection given to hyper after this loop read from it: reads yield the bytes
/// already read first, then the connection's own.
pub(crate) struct Rewind<I> {
    prefix: Bytes,
    inner: I,
}

impl<I> Rewind<I> {
    fn new(inner: I, prefix: Bytes) -> Rewind<I> {
        Rewind { prefix, inner }
    }

    /// The connection and the bytes read from it that were not read from here yet.
    pub(crate) fn into_parts(self) -> (I, Bytes) {
        (self.inner, self.prefix)
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// Counts the times TCP_NODELAY would have been set.
    struct Counting(Cell<u32>);

    impl NoDelay for Counting {
        fn no_delay(&self) {
            self.0.set(self.0.get() + 1)
        }
    }

    #[test]
    fn nagle_goes_off_before_the_second_write_that_sends_anything() {
        let io = Counting(Cell::new(0));
        let mut nagle = nagle_on();
        nagle.before_write(&io, b"");
        nagle.before_write(&io, b"HTTP/1.1 200 OK\r\n\r\n");
        nagle.before_write(&io, b"");
        assert_eq!(
            io.0.get(),
            0,
            "one answer in one write keeps the system call"
        );
        nagle.before_write(&io, b"more");
        nagle.before_write(&io, b"and more");
        nagle.hand_over(&io);
        assert_eq!(io.0.get(), 1);

        let io = Counting(Cell::new(0));
        let mut nagle = nagle_on();
        nagle.hand_over(&io);
        nagle.before_write(&io, b"x");
        nagle.before_write(&io, b"y");
        assert_eq!(io.0.get(), 1, "hyper's server gets the socket with it off");

        let io = Counting(Cell::new(0));
        let mut nagle = Nagle {
            on: false,
            wrote: false,
        };
        nagle.before_write(&io, b"x");
        nagle.before_write(&io, b"y");
        nagle.hand_over(&io);
        assert_eq!(io.0.get(), 0, "already off (TLS): never set again");
    }

    /// Nagle's algorithm on, nothing written yet: a new connection.
    fn nagle_on() -> Nagle {
        Nagle {
            on: true,
            wrote: false,
        }
    }

    /// A client socket that keeps what is written and counts the writes.
    #[derive(Default, Clone)]
    struct Recording {
        bytes: std::rc::Rc<std::cell::RefCell<Vec<u8>>>,
        writes: std::rc::Rc<Cell<usize>>,
    }

    impl NoDelay for Recording {
        fn no_delay(&self) {}
    }

    impl AsyncWrite for Recording {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes.set(self.writes.get() + 1);
            self.bytes.borrow_mut().extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A body of these frames, all there at once, of no known length.
    fn ready_body(frames: &[&'static str]) -> ProxyBody {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = frames
            .iter()
            .map(|f| Ok(Frame::data(Bytes::from_static(f.as_bytes()))))
            .collect();
        http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
    }

    #[tokio::test]
    async fn a_chunked_answer_that_is_all_there_goes_in_one_write() {
        // gunicorn's gthread answers a polling request chunked, head, chunk and end
        // in one segment; the client gets them in one write too, not the end later.
        let record = Recording::default();
        let mut io = record.clone();
        let mut nagle = nagle_on();
        let mut out = Vec::new();
        let resp = Response::new(ready_body(&["ok", "42"]));
        let keep = write_response(&mut io, &mut nagle, &mut out, resp, false, true)
            .await
            .unwrap_or(false);
        let text = String::from_utf8_lossy(&record.bytes.borrow()).to_string();
        assert!(keep, "{text}");
        assert_eq!(record.writes.get(), 1, "{text}");
        assert!(
            text.ends_with("\r\n\r\n2\r\nok\r\n2\r\n42\r\n0\r\n\r\n"),
            "{text}"
        );
        assert!(text.contains("transfer-encoding: chunked"), "{text}");
    }

    #[tokio::test]
    async fn a_body_still_to_come_does_not_hold_back_the_head() {
        let record = Recording::default();
        let mut io = record.clone();
        let mut nagle = nagle_on();
        let mut out = Vec::new();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let body = http_body_util::StreamBody::new(stream_of(rx)).boxed_unsync();
        let write = write_response(
            &mut io,
            &mut nagle,
            &mut out,
            Response::new(body),
            false,
            true,
        );
        tokio::pin!(write);
        assert!(futures_util::poll!(&mut write).is_pending());
        assert_eq!(record.writes.get(), 1, "the head goes out at once");
        drop(tx);
        let _ = write.await;
        assert_eq!(record.writes.get(), 2, "and the end when it came");
        assert!(record.bytes.borrow().ends_with(b"0\r\n\r\n"));
    }

    fn stream_of<T>(mut rx: tokio::sync::mpsc::Receiver<T>) -> impl futures_util::Stream<Item = T> {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}
