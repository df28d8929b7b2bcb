//! HTTP/1.1 to a worker on `httparse`: corral's one client session, a request and
//! its answer on a connection of `upstream`'s, read and written by the task serving
//! the client itself, with no connection task and no channel between them (a hyper
//! client cost a task and a hand-off each way per request, more than the rest of
//! the request path: docs/http1-fast-path.md).
//!
//! It owns the exchange: the request's head and a body in hand written at once, a
//! streamed body written as it comes (by its length, or chunked) while the answer
//! is watched for, the answer's head read (1xx skipped, a 101 only for an upgrade),
//! its body read as it is passed on, and the rule for when a connection may carry
//! another request: only when its request was written whole and its answer read
//! exactly to its end, with nothing after it. How messages are written, read and
//! framed is `http1`'s (RFC 9112 sections 6 and 9.3). It must not choose workers or
//! decide on sending again (the proxy does; it is told when a connection closed
//! before any byte of an answer).

use crate::http1::chunked::{self, Chunk, Step};
use crate::http1::encode::{chunk, Outgoing, LAST_CHUNK};
use crate::http1::framing::{response_body, Body};
use crate::http1::head::{parse_response, ResponseHead, MAX_RESPONSE_HEAD};
use crate::http1::{make_room, wants_close, READ_SIZE};
use crate::transport::body::BoxError;
use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, Uri, Version};
use http_body::{Body as _, Frame, SizeHint};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An open connection to a worker, with what was read past the last message
/// (always nothing while it is parked).
#[derive(Debug)]
pub struct Conn {
    io: TcpStream,
    buf: BytesMut,
    /// Found closed or sent stray bytes while parked: the probe that saw stray bytes
    /// took one, so this flag is what remembers them.
    spoiled: bool,
}

impl Conn {
    pub fn new(io: TcpStream) -> Conn {
        Conn {
            io,
            buf: BytesMut::new(),
            spoiled: false,
        }
    }

    /// A connection an upgrade carried: its socket and the bytes of an answer
    /// already read from it.
    pub fn resumed(io: TcpStream, early: &[u8]) -> Conn {
        Conn {
            io,
            buf: BytesMut::from(early),
            spoiled: false,
        }
    }

    /// Its socket and the bytes read from it and not yet used (for an upgrade).
    pub fn into_parts(self) -> (TcpStream, Bytes) {
        (self.io, self.buf.freeze())
    }

    /// Whether a parked connection can take a request: nothing has arrived on it
    /// since its last response, neither its end nor stray bytes. Costs a system
    /// call only when the socket was reported readable.
    pub fn is_fresh(&mut self) -> bool {
        if self.spoiled {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let fresh = match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        };
        self.spoiled = !fresh;
        fresh
    }
}

/// A request, encoded once, so it can go out again unchanged (on a fresh
/// connection, or to another worker): its head, and its body when in hand.
pub struct Request {
    bytes: Vec<u8>,
    head: bool,
    /// A websocket upgrade: a 101 answers it.
    upgrade: bool,
    /// Its body comes after the head, as a stream: chunked (else by its length).
    chunked: bool,
    /// An upgrade may carry the exchange while it waits for its answer (a
    /// long-poll): the request went out whole, and the connection is given back.
    carry: Option<tokio_util::sync::CancellationToken>,
}

/// How a request's body goes to the worker.
pub enum Sending {
    /// Already in hand (empty for none): written with the head.
    InHand(Bytes),
    /// Streamed after the head: of this declared length, or chunked.
    Streamed(Option<u64>),
}

/// The request as a worker gets it (`http1::encode::request`).
pub fn encode(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    skip: impl Fn(&HeaderName) -> bool,
    added: &[(HeaderName, HeaderValue)],
    body: &Sending,
) -> Request {
    let outgoing = match body {
        Sending::InHand(bytes) => Outgoing::InHand(bytes),
        Sending::Streamed(Some(n)) => Outgoing::Length(*n),
        Sending::Streamed(None) => Outgoing::Chunked,
    };
    Request {
        bytes: crate::http1::encode::request(method, uri, headers, skip, added, outgoing),
        head: method == Method::HEAD,
        upgrade: false,
        chunked: matches!(body, Sending::Streamed(None)),
        carry: None,
    }
}

impl Request {
    /// The request asks for a websocket upgrade: a 101 is its answer.
    pub fn upgrade(mut self) -> Request {
        self.upgrade = true;
        self
    }

    /// While its answer is awaited, `carry` (an upgrade's signal) ends the
    /// exchange with its connection given back ([`Failure::Carried`]). For a
    /// request sent whole with the head (no streamed body).
    pub fn carried_by(mut self, carry: tokio_util::sync::CancellationToken) -> Request {
        self.carry = Some(carry);
        self
    }
}

/// Why an exchange gave no response.
#[derive(Debug)]
pub enum Failure {
    /// The connection failed before any byte of an answer: whether the worker read
    /// the request cannot be known. On a kept-alive connection this is most often
    /// the worker closing it as the request went out.
    Unanswered(io::Error),
    /// Anything else: a broken or refused response, or a failure mid-answer.
    Broken(BoxError),
    /// An upgrade carries the exchange: the request went out whole and its answer
    /// (none of it, or the part in the connection's buffer) is still to be read.
    Carried(Box<Conn>),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Unanswered(e) => write!(f, "connection closed without an answer: {e}"),
            Failure::Broken(e) => write!(f, "{e}"),
            Failure::Carried(_) => write!(f, "carried by an upgrade"),
        }
    }
}

impl std::error::Error for Failure {}

/// Where a connection goes once its response was read to the end and it may carry
/// another request (the worker's idle cache, in `upstream`).
pub trait Keep {
    fn keep(self, conn: Conn);
}

/// Sends `req` on `conn` (`body`: its streamed body, when it has one) and reads the
/// response head; the body is read as the response is passed on, and at its end the
/// connection goes to `keep` if it may be used again. A 101 to an upgrade leaves
/// the connection in the body, for [`Reading::into_upgraded`].
pub async fn exchange<K: Keep>(
    mut conn: Conn,
    req: &Request,
    body: Option<crate::transport::body::ProxyBody>,
    keep: K,
) -> Result<Response<Reading<K>>, Failure> {
    conn.io
        .write_all(&req.bytes)
        .await
        .map_err(Failure::Unanswered)?;
    let (head, outflow, whole) = match (body, &req.carry) {
        (None, Some(carry)) => {
            let head = tokio::select! {
                head = read_head(&mut conn.io, &mut conn.buf, req.upgrade) => Some(head),
                _ = carry.cancelled() => None,
            };
            let Some(head) = head else {
                return Err(Failure::Carried(Box::new(conn)));
            };
            (head?, None, true)
        }
        (None, None) => {
            let head = read_head(&mut conn.io, &mut conn.buf, req.upgrade).await?;
            (head, None, true)
        }
        (Some(body), _) => stream_body(&mut conn, body, req.chunked).await?,
    };
    answered(conn, head, (outflow, whole), req.head, keep)
}

/// The answer to a request an upgrade carried over mid-exchange (sent whole by
/// the image before; `head_request`: it was a HEAD): read as `exchange` reads it.
pub async fn resume<K: Keep>(
    mut conn: Conn,
    head_request: bool,
    keep: K,
) -> Result<Response<Reading<K>>, Failure> {
    let head = read_head(&mut conn.io, &mut conn.buf, false).await?;
    answered(conn, head, (None, true), head_request, keep)
}

/// The response whose head was read on `conn`: its body read as it is passed on.
/// `sent`: the rest of the request body still to go out, and whether the request
/// went out whole.
fn answered<K: Keep>(
    conn: Conn,
    head: ResponseHead,
    (outflow, whole): (Option<Box<Outflow>>, bool),
    head_request: bool,
    keep: K,
) -> Result<Response<Reading<K>>, Failure> {
    if head.status == http::StatusCode::SWITCHING_PROTOCOLS {
        return Ok(response(head, Reading::switched(conn, keep)));
    }
    let (body, mut reusable) =
        response_body(head.status, head.version, &head.headers, head_request)
            .map_err(Failure::Broken)?;
    let state = match body {
        Body::Length(n) => State::Length(n),
        Body::Chunked => State::Chunk(Chunk::START),
        Body::Close => State::Close,
    };
    reusable &= whole && head.version == Version::HTTP_11 && !wants_close(&head.headers);
    let mut body = Reading {
        conn: Some(conn),
        state,
        reusable,
        keep: Some(keep),
        meta: 0,
        failed: None,
        outflow,
    };
    if matches!(body.state, State::Length(0)) {
        body.finish();
    }
    Ok(response(head, body))
}

/// The response `head` heads, with `body`.
fn response<B>(head: ResponseHead, body: B) -> Response<B> {
    let mut resp = Response::new(body);
    *resp.status_mut() = head.status;
    *resp.version_mut() = head.version;
    *resp.headers_mut() = head.headers;
    if let Some(reason) = head.reason {
        resp.extensions_mut().insert(reason);
    }
    resp
}

/// Writes a streamed request body while watching for the answer: a worker may
/// answer before it has read the body, and then the rest goes on being sent while
/// the answer is read (the [`Outflow`] goes with the answer's body). Gives the
/// answer's head, the body still to send, and whether the request went out whole
/// (every byte its head announced). A body that fails (the client's) fails the
/// exchange.
async fn stream_body(
    conn: &mut Conn,
    body: crate::transport::body::ProxyBody,
    chunked: bool,
) -> Result<(ResponseHead, Option<Box<Outflow>>, bool), Failure> {
    let mut outflow = Outflow {
        body,
        pending: Bytes::new(),
        chunked,
        ended: false,
    };
    let (mut rd, mut wr) = conn.io.split();
    let reading = read_head(&mut rd, &mut conn.buf, false);
    tokio::pin!(reading);
    let mut whole = false;
    let early = std::future::poll_fn(|cx| {
        if let Poll::Ready(head) = std::future::Future::poll(reading.as_mut(), cx) {
            return Poll::Ready(Some(head));
        }
        match outflow.poll(&mut wr, cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => {
                whole = true;
                Poll::Ready(None)
            }
            Poll::Ready(Err(Written::Client(e))) => Poll::Ready(Some(Err(Failure::Broken(e)))),
            // The worker stopped reading: its answer may say why.
            Poll::Ready(Err(Written::Worker(e))) => {
                tracing::debug!(error = %e, "worker stopped reading the request body");
                Poll::Ready(None)
            }
        }
    })
    .await;
    match early {
        Some(head) => Ok((head?, Some(Box::new(outflow)), false)),
        None => Ok((reading.await?, None, whole)),
    }
}

/// How writing a body failed.
enum Written {
    /// The client's body broke (too large, malformed, cut short).
    Client(BoxError),
    /// The worker's connection would take no more.
    Worker(io::Error),
}

/// A streamed request body on its way to a worker, written as it comes, each piece
/// whole (chunked: with its size line) before the next is asked for.
struct Outflow {
    body: crate::transport::body::ProxyBody,
    /// What is still to be written of the current piece.
    pending: Bytes,
    chunked: bool,
    /// The body has ended (its last chunk is in `pending`).
    ended: bool,
}

impl Outflow {
    /// Writes on until the body has ended and gone out.
    fn poll<W: tokio::io::AsyncWrite + Unpin>(
        &mut self,
        io: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), Written>> {
        use bytes::Buf;
        loop {
            while !self.pending.is_empty() {
                let n = ready!(Pin::new(&mut *io).poll_write(cx, &self.pending))
                    .map_err(Written::Worker)?;
                if n == 0 {
                    return Poll::Ready(Err(Written::Worker(io::ErrorKind::WriteZero.into())));
                }
                self.pending.advance(n);
            }
            if self.ended {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    // Trailers are not passed on.
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if data.is_empty() {
                        continue;
                    }
                    self.pending = match self.chunked {
                        true => {
                            let mut piece = Vec::with_capacity(data.len() + 20);
                            chunk(&mut piece, &data);
                            Bytes::from(piece)
                        }
                        false => data,
                    };
                }
                Some(Err(e)) => return Poll::Ready(Err(Written::Client(e))),
                None => {
                    self.ended = true;
                    if self.chunked {
                        self.pending = Bytes::from_static(LAST_CHUNK);
                    }
                }
            }
        }
    }
}

/// Reads until a final (not 1xx) response head is whole; informational responses
/// before it are skipped. A 101 is final for an upgrade (`upgrade`), and refused
/// otherwise.
async fn read_head<R: tokio::io::AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    upgrade: bool,
) -> Result<ResponseHead, Failure> {
    let mut answered = false;
    loop {
        if !buf.is_empty() {
            answered = true;
            if let Some(head) = parse_response(buf).map_err(Failure::Broken)? {
                match head.status.as_u16() {
                    101 if upgrade => return Ok(head),
                    101 => {
                        return Err(Failure::Broken(
                            "101 Switching Protocols to a request that asked for no upgrade".into(),
                        ))
                    }
                    100..=199 => continue,
                    _ => return Ok(head),
                }
            }
            if buf.len() >= MAX_RESPONSE_HEAD {
                return Err(Failure::Broken(
                    format!("response head longer than {MAX_RESPONSE_HEAD} bytes").into(),
                ));
            }
        }
        make_room(buf);
        match io.read_buf(buf).await {
            Ok(0) if !answered => {
                return Err(Failure::Unanswered(io::ErrorKind::UnexpectedEof.into()))
            }
            Ok(0) => return Err(Failure::Broken("connection closed mid-head".into())),
            Ok(_) => {}
            Err(e) if !answered => return Err(Failure::Unanswered(e)),
            Err(e) => return Err(Failure::Broken(e.into())),
        }
    }
}

/// Where a body's reading is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// This many bytes still to come.
    Length(u64),
    Chunk(Chunk),
    /// Until the worker closes the connection.
    Close,
    /// A 101: the connection is the tunnel's, no body.
    Switched,
    Done,
}

/// A worker's response body, read from its connection as it is polled. Read to its
/// end, the connection goes to `keep` when it may carry another request; dropped
/// before that, the connection is closed.
pub struct Reading<K: Keep> {
    conn: Option<Conn>,
    state: State,
    reusable: bool,
    keep: Option<K>,
    meta: usize,
    /// A failure met, given on the next poll: the bytes read before the failure get
    /// one turn to go out to the client first (an HTTP/2 stream is reset on a body
    /// error without writing what it holds).
    failed: Option<BoxError>,
    /// The request body still being sent (the worker answered before it had it
    /// all): driven as this body is polled, and this body ends only after it.
    // Boxed: rare, and the answer's body is moved a few times per request.
    outflow: Option<Box<Outflow>>,
}

impl<K: Keep> Reading<K> {
    /// The empty body of a 101, holding the connection for the tunnel.
    fn switched(conn: Conn, keep: K) -> Reading<K> {
        Reading {
            conn: Some(conn),
            state: State::Switched,
            reusable: false,
            keep: Some(keep),
            meta: 0,
            failed: None,
            outflow: None,
        }
    }

    /// The socket under a 101 and the bytes the worker sent after its head (None
    /// for any other answer).
    pub fn into_upgraded(mut self) -> Option<(TcpStream, Bytes)> {
        if self.state != State::Switched {
            return None;
        }
        let conn = self.conn.take()?;
        Some((conn.io, conn.buf.freeze()))
    }

    /// The body has ended: the connection is kept only if nothing followed it.
    fn finish(&mut self) {
        self.state = State::Done;
        if self.outflow.is_some() {
            // The request is still going out: the connection stays for it, and is
            // closed after (it was not sent whole when the answer came).
            return;
        }
        let conn = self.conn.take();
        let keep = self.keep.take();
        if let (Some(conn), Some(keep)) = (conn, keep) {
            if self.reusable && conn.buf.is_empty() {
                keep.keep(conn);
            }
        }
    }

    /// What the buffered bytes give: a frame, the end, or a read to do first.
    fn next_buffered(&mut self) -> Result<Next, BoxError> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(Next::End);
        };
        let buf = &mut conn.buf;
        let (next, ended) = match &mut self.state {
            State::Done | State::Switched => return Ok(Next::End),
            State::Length(0) => (Next::End, true),
            State::Length(_) if buf.is_empty() => (Next::Read, false),
            State::Length(rem) => {
                let n = (*rem).min(buf.len() as u64);
                *rem -= n;
                (Next::Data(buf.split_to(n as usize).freeze()), *rem == 0)
            }
            State::Close if buf.is_empty() => (Next::Read, false),
            State::Close => (Next::Data(buf.split().freeze()), false),
            State::Chunk(chunk) => match chunked::step(chunk, buf, &mut self.meta)? {
                Step::Data(data) => (Next::Data(data), false),
                Step::More => (Next::Read, false),
                Step::End => (Next::End, true),
            },
        };
        if ended {
            self.finish();
        }
        Ok(next)
    }
}

impl<K: Keep> Reading<K> {
    /// Sends on the request body the worker answered before it had all of it. Once
    /// it has gone (or failed) after the answer ended, the connection is closed.
    fn drive(&mut self, cx: &mut Context<'_>) {
        let (Some(out), Some(conn)) = (self.outflow.as_mut(), self.conn.as_mut()) else {
            self.outflow = None;
            return;
        };
        if let Poll::Ready(sent) = out.poll(&mut conn.io, cx) {
            match sent {
                Ok(()) => {}
                Err(Written::Client(e)) => tracing::debug!(error = %e, "request body cut short"),
                Err(Written::Worker(e)) => tracing::debug!(error = %e, "worker stopped reading"),
            }
            self.outflow = None;
            if self.state == State::Done {
                self.conn = None;
            }
        }
    }

    /// Reads more of the body: true when bytes came, false at a close that ends a
    /// close-delimited body.
    fn read(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, BoxError>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(Ok(false));
        };
        let want = match self.state {
            State::Length(rem) => (rem as usize).min(64 * 1024),
            _ => READ_SIZE,
        };
        conn.buf.reserve(want.max(READ_SIZE));
        let read = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut conn.io),
            cx,
            &mut conn.buf
        ));
        Poll::Ready(match read {
            Ok(0) if self.state == State::Close => {
                self.state = State::Done;
                self.conn = None;
                Ok(false)
            }
            Ok(0) => Err("worker closed the connection before the body ended".into()),
            Ok(_) => Ok(true),
            Err(e) => Err(e.into()),
        })
    }
}

/// What a body does next.
enum Next {
    Data(Bytes),
    End,
    Read,
}

impl<K: Keep + Unpin> http_body::Body for Reading<K> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        this.drive(cx);
        if let Some(e) = this.failed.take() {
            return Poll::Ready(Some(Err(e)));
        }
        loop {
            let failure = match this.next_buffered() {
                Ok(Next::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                // The answer has ended; it is over once the request has gone out.
                Ok(Next::End) if this.outflow.is_some() => return Poll::Pending,
                Ok(Next::End) => return Poll::Ready(None),
                Ok(Next::Read) => match this.read(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(true)) => continue,
                    Poll::Ready(Ok(false)) => return Poll::Ready(None),
                    Poll::Ready(Err(e)) => e,
                },
                Err(e) => e,
            };
            this.state = State::Done;
            this.conn = None;
            this.outflow = None;
            this.failed = Some(failure);
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done | State::Switched) && self.outflow.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done | State::Switched => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}
