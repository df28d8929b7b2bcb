//! HTTP/1.1 to a worker on `httparse`, for a request whose body is already in hand
//! (none, or read whole): the task serving the client writes the request and reads
//! the response itself, with no connection task and no channel between them. The
//! hyper client costs a task and a hand-off each way per request, more than the
//! rest of the request path (docs/http1-fast-path.md).
//!
//! It owns the exchange and the rule for when a connection may carry another
//! request: only when its request was written whole and its response read exactly
//! to its end, with nothing after it. How messages are written, read and framed is
//! `http1`'s (RFC 9112 sections 6 and 9.3), shared with hyper's path. It must not choose workers or decide on sending again (the proxy does; it is
//! told when a connection closed before any byte of an answer), and it carries no
//! streamed request body and no upgrade: those stay on hyper (`upstream`).

use crate::http1::chunked::{self, Chunk, Step};
use crate::http1::framing::{response_body, Body};
use crate::http1::head::{parse_response, ResponseHead, MAX_RESPONSE_HEAD};
use crate::http1::{make_room, wants_close, READ_SIZE};
use crate::transport::body::BoxError;
use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, Uri, Version};
use http_body::{Frame, SizeHint};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An open connection to a worker, with what was read past the last message
/// (always nothing while it is parked).
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

    /// The socket, for hyper's client to carry on with. Only a parked connection
    /// is handed over, and a parked connection has nothing read ahead.
    pub fn into_stream(self) -> TcpStream {
        debug_assert!(self.buf.is_empty());
        self.io
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
/// connection, or to another worker).
pub struct Request {
    bytes: Vec<u8>,
    head: bool,
}

/// The request as a worker gets it (`http1::encode::request`).
pub fn encode(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    skip: impl Fn(&HeaderName) -> bool,
    added: &[(HeaderName, HeaderValue)],
    body: Bytes,
) -> Request {
    Request {
        bytes: crate::http1::encode::request(method, uri, headers, skip, added, &body),
        head: method == Method::HEAD,
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
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Unanswered(e) => write!(f, "connection closed without an answer: {e}"),
            Failure::Broken(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for Failure {}

/// Where a connection goes once its response was read to the end and it may carry
/// another request (the worker's idle cache, in `upstream`).
pub trait Keep {
    fn keep(self, conn: Conn);
}

/// Sends `req` on `conn` and reads the response head; the body is read as the
/// response is passed on, and at its end the connection goes to `keep` if it may
/// be used again.
pub async fn exchange<K: Keep>(
    mut conn: Conn,
    req: &Request,
    keep: K,
) -> Result<Response<Reading<K>>, Failure> {
    conn.io
        .write_all(&req.bytes)
        .await
        .map_err(Failure::Unanswered)?;
    let head = read_head(&mut conn).await?;
    let (body, mut reusable) = response_body(head.status, head.version, &head.headers, req.head)
        .map_err(Failure::Broken)?;
    let state = match body {
        Body::Length(n) => State::Length(n),
        Body::Chunked => State::Chunk(Chunk::START),
        Body::Close => State::Close,
    };
    reusable &= head.version == Version::HTTP_11 && !wants_close(&head.headers);
    let mut body = Reading {
        conn: Some(conn),
        state,
        reusable,
        keep: Some(keep),
        meta: 0,
        failed: None,
    };
    if matches!(body.state, State::Length(0)) {
        body.finish();
    }
    let mut resp = Response::new(body);
    *resp.status_mut() = head.status;
    *resp.version_mut() = head.version;
    *resp.headers_mut() = head.headers;
    if let Some(reason) = head.reason {
        resp.extensions_mut().insert(reason);
    }
    Ok(resp)
}

/// Reads until a final (not 1xx) response head is whole; informational responses
/// before it are skipped.
async fn read_head(conn: &mut Conn) -> Result<ResponseHead, Failure> {
    let mut answered = false;
    loop {
        if !conn.buf.is_empty() {
            answered = true;
            if let Some(head) = parse_response(&mut conn.buf).map_err(Failure::Broken)? {
                match head.status.as_u16() {
                    101 => {
                        return Err(Failure::Broken(
                            "101 Switching Protocols to a request that asked for no upgrade".into(),
                        ))
                    }
                    100..=199 => continue,
                    _ => return Ok(head),
                }
            }
            if conn.buf.len() >= MAX_RESPONSE_HEAD {
                return Err(Failure::Broken(
                    format!("response head longer than {MAX_RESPONSE_HEAD} bytes").into(),
                ));
            }
        }
        make_room(&mut conn.buf);
        match conn.io.read_buf(&mut conn.buf).await {
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
    /// A failure met, given on the next poll: hyper's server drops a connection on
    /// a body error without writing what it holds, so the bytes read before the
    /// failure get one turn to go out first (as they do through hyper's client,
    /// whose failure comes a task hand-off later).
    failed: Option<BoxError>,
}

impl<K: Keep> Reading<K> {
    /// The body has ended: the connection is kept only if nothing followed it.
    fn finish(&mut self) {
        self.state = State::Done;
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
            State::Done => return Ok(Next::End),
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
        if let Some(e) = this.failed.take() {
            return Poll::Ready(Some(Err(e)));
        }
        loop {
            let failure = match this.next_buffered() {
                Ok(Next::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
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
            this.failed = Some(failure);
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state == State::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}
