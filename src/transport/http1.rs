//! HTTP/1.1 to a worker on `httparse`, for a request whose body is already in hand
//! (none, or read whole): the task serving the client writes the request and reads
//! the response itself, with no connection task and no channel between them. The
//! hyper client costs a task and a hand-off each way per request, more than the
//! rest of the request path (docs/http1-fast-path.md).
//!
//! It owns the framing of what it writes and reads (RFC 9112 sections 6 and 9.3) and
//! the rule for when a connection may carry another request: only when its request
//! was written whole and its response read exactly to its end, with nothing after
//! it. It must not choose workers or decide on sending again (the proxy does; it is
//! told when a connection closed before any byte of an answer), and it carries no
//! streamed request body and no upgrade: those stay on hyper (`upstream`).

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Uri, Version};
use http_body::{Frame, SizeHint};
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::transport::body::BoxError;

/// Most header lines in a head (hyper's limit, both ways; `edge::fast` uses it for
/// requests).
pub(crate) const MAX_HEADERS: usize = 100;
/// Most bytes of a response head (hyper's client limit).
const MAX_HEAD: usize = 8192 + 4096 * 100;
/// Most bytes of chunk extensions and trailers together in one body (hyper's limit
/// on extensions); trailers are read and dropped.
const MAX_CHUNK_META: usize = 16 * 1024;
/// Bytes asked for per read (here and in `edge::fast`).
pub(crate) const READ_SIZE: usize = 8192;

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

/// The request as a worker gets it: `uri` in origin form, HTTP/1.1, `headers` but
/// those `skip` names, then `added`, and `body` framed by a Content-Length written
/// here (any the headers carry is replaced, so the framing always matches the bytes
/// sent).
pub fn encode(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    skip: impl Fn(&HeaderName) -> bool,
    added: &[(HeaderName, HeaderValue)],
    body: Bytes,
) -> Request {
    let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let lines = headers.len() + added.len();
    let mut out = Vec::with_capacity(64 + target.len() + lines * 40 + body.len());
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut declared = false;
    let kept = headers.iter().filter(|(name, _)| {
        let length = *name == header::CONTENT_LENGTH;
        declared |= length;
        !length && !skip(name)
    });
    for (name, value) in kept.chain(added.iter().map(|(n, v)| (n, v))) {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if declared || !body.is_empty() {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(body.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&body);
    Request {
        bytes: out,
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
    let (state, mut reusable) = framing(&head, req.head).map_err(Failure::Broken)?;
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

/// A response head as read.
struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    /// A reason phrase other than the status code's usual one, passed on as hyper's
    /// client passes it.
    reason: Option<hyper::ext::ReasonPhrase>,
}

/// Reads until a final (not 1xx) response head is whole; informational responses
/// before it are skipped.
async fn read_head(conn: &mut Conn) -> Result<Head, Failure> {
    let mut answered = false;
    loop {
        if !conn.buf.is_empty() {
            answered = true;
            if let Some(head) = parse_head(&mut conn.buf).map_err(Failure::Broken)? {
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
            if conn.buf.len() >= MAX_HEAD {
                return Err(Failure::Broken(
                    format!("response head longer than {MAX_HEAD} bytes").into(),
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

/// Takes one whole response head off the front of `buf`; None when it is not all
/// there yet. The head is split off the buffer it was read into (`take_head`), so
/// header values are slices of it rather than copies, and what follows the head
/// stays where it was read.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, BoxError> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut res, buf, &mut slots);
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let code = res.code.unwrap_or(0);
    let status = StatusCode::from_u16(code).map_err(|_| format!("bad status code {code}"))?;
    let version = match res.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut lines = [Line::default(); MAX_HEADERS];
    let n = lines_of(buf, res.headers, &mut lines);
    let reason = res
        .reason
        .filter(|r| status.canonical_reason() != Some(*r))
        .map(|r| span(buf, r.as_bytes()));
    let head = take_head(buf, len);
    let headers = header_map(&head, &lines[..n], 0)?;
    let reason =
        reason.and_then(|(from, to)| hyper::ext::ReasonPhrase::try_from(head.slice(from..to)).ok());
    Ok(Some(Head {
        status,
        version,
        headers,
        reason,
    }))
}

/// Where a header line's name and value lie in the head it was read from.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Line {
    name: (u32, u32),
    value: (u32, u32),
}

impl Line {
    /// The name's bytes in `head`.
    pub(crate) fn name<'a>(&self, head: &'a Bytes) -> &'a [u8] {
        &head[self.name.0 as usize..self.name.1 as usize]
    }

    /// The value, a slice of `head`.
    pub(crate) fn value(&self, head: &Bytes) -> Bytes {
        head.slice(self.value.0 as usize..self.value.1 as usize)
    }
}

/// The header map of `lines`, names and values slices of `head`, with room for
/// `more` headers besides.
pub(crate) fn header_map(head: &Bytes, lines: &[Line], more: usize) -> Result<HeaderMap, BoxError> {
    let mut headers = HeaderMap::with_capacity(lines.len() + more);
    for line in lines {
        let name = HeaderName::from_bytes(line.name(head))?;
        let value = HeaderValue::from_maybe_shared(line.value(head))?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// Where `part`, parsed out of `whole`, lies in it. An empty part may point
/// anywhere (a parser can hand out a static empty slice): it is the empty span.
pub(crate) fn span(whole: &[u8], part: &[u8]) -> (usize, usize) {
    let from = (part.as_ptr() as usize).wrapping_sub(whole.as_ptr() as usize);
    match from.checked_add(part.len()) {
        Some(to) if !part.is_empty() && to <= whole.len() => (from, to),
        _ => (0, 0),
    }
}

/// Where each of `headers` (parsed out of `whole`) lies in it; how many there are.
pub(crate) fn lines_of(
    whole: &[u8],
    headers: &[httparse::Header<'_>],
    lines: &mut [Line; MAX_HEADERS],
) -> usize {
    for (line, h) in lines.iter_mut().zip(headers) {
        let (name, value) = (span(whole, h.name.as_bytes()), span(whole, h.value));
        *line = Line {
            name: (name.0 as u32, name.1 as u32),
            value: (value.0 as u32, value.1 as u32),
        };
    }
    headers.len()
}

/// Splits the first `len` bytes (a message head) off `buf`. They share its memory:
/// nothing is copied, what was read past the head stays in `buf` with the room
/// behind it for the next read, and once nothing refers to the head any more the
/// buffer is read into again rather than another allocated (`make_room`).
pub(crate) fn take_head(buf: &mut BytesMut, len: usize) -> Bytes {
    buf.split_to(len).freeze()
}

/// Room for the next read into `buf`: its own when a fair amount is left (heads
/// taken off its front share it), else `READ_SIZE` more, which reuses the memory in
/// place when nothing else refers to it.
pub(crate) fn make_room(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(READ_SIZE);
    }
}

/// How the response body is delimited (RFC 9112 section 6.3), and whether the
/// connection can carry another request after it as far as the framing goes.
fn framing(head: &Head, head_request: bool) -> Result<(State, bool), BoxError> {
    let status = head.status.as_u16();
    if head_request || status == 204 || status == 304 {
        return Ok((State::Length(0), true));
    }
    let headers = &head.headers;
    if headers.contains_key(header::TRANSFER_ENCODING) {
        if head.version == Version::HTTP_10 {
            return Err("Transfer-Encoding in an HTTP/1.0 response".into());
        }
        if !ends_chunked(headers) {
            return Ok((State::Close, false));
        }
        // Chunked wins over a Content-Length beside it; a worker that sent both
        // is not trusted with another request.
        let alone = !headers.contains_key(header::CONTENT_LENGTH);
        return Ok((State::Chunk(Chunk::Size { n: 0, digits: 0 }), alone));
    }
    if headers.contains_key(header::CONTENT_LENGTH) {
        return content_length(headers)
            .map(|n| (State::Length(n), true))
            .ok_or_else(|| "invalid or conflicting Content-Length".into());
    }
    Ok((State::Close, false))
}

/// The one length every Content-Length value states, or None if any is not a
/// number or they differ.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    let mut found = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for part in value.as_bytes().split(|&b| b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || !part.iter().all(u8::is_ascii_digit) || part.len() > 19 {
                return None;
            }
            let n: u64 = std::str::from_utf8(part).ok()?.parse().ok()?;
            if found.is_some_and(|f| f != n) {
                return None;
            }
            found = Some(n);
        }
    }
    found
}

/// Whether the last transfer coding named is `chunked`.
fn ends_chunked(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()
        .and_then(|v| v.as_bytes().rsplit(|&b| b == b',').next())
        .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// Whether a Connection header's values say `close`.
pub(crate) fn wants_close(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| has_token(v, b"close"))
}

/// Whether a comma-separated header value lists `token` (any case).
pub(crate) fn has_token(value: &HeaderValue, token: &[u8]) -> bool {
    lists_token(value.as_bytes(), token)
}

/// Whether the comma-separated `value` lists `token` (any case).
pub(crate) fn lists_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
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

/// Where a chunked body's decoding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading the size's hex digits.
    Size {
        n: u64,
        digits: u8,
    },
    /// Skipping an extension (or spaces) up to the size line's CR.
    Ext {
        n: u64,
    },
    /// After the size line's CR.
    SizeLf {
        n: u64,
    },
    Data(u64),
    DataCr,
    DataLf,
    /// A trailer line, this many bytes in; the last chunk is followed by trailer
    /// lines and an empty one.
    Trailer {
        line: usize,
    },
    TrailerLf {
        line: usize,
    },
}

/// What one step of chunked decoding gave.
#[derive(Debug, PartialEq)]
enum Step {
    Data(Bytes),
    /// Needs more bytes.
    More,
    /// The last chunk and the trailers are read.
    End,
}

/// Decodes from the front of `buf` until it has data to give, needs more bytes,
/// or the body has ended; `meta` counts extension and trailer bytes.
fn chunk_step(state: &mut Chunk, buf: &mut BytesMut, meta: &mut usize) -> Result<Step, BoxError> {
    loop {
        if let Chunk::Data(rem) = *state {
            if buf.is_empty() {
                return Ok(Step::More);
            }
            let n = rem.min(buf.len() as u64);
            let data = buf.split_to(n as usize).freeze();
            *state = match rem - n {
                0 => Chunk::DataCr,
                left => Chunk::Data(left),
            };
            return Ok(Step::Data(data));
        }
        let Some(&b) = buf.first() else {
            return Ok(Step::More);
        };
        buf.advance(1);
        *state = match (*state, b) {
            (Chunk::Size { n, digits }, b) if b.is_ascii_hexdigit() => {
                if digits == 16 {
                    return Err("chunk size too large".into());
                }
                let v = (b as char).to_digit(16).unwrap_or(0) as u64;
                Chunk::Size {
                    n: n << 4 | v,
                    digits: digits + 1,
                }
            }
            (Chunk::Size { digits: 0, .. }, _) => return Err("chunk size missing".into()),
            (Chunk::Size { n, .. }, b';' | b' ' | b'\t') => Chunk::Ext { n },
            (Chunk::Size { n, .. } | Chunk::Ext { n }, b'\r') => Chunk::SizeLf { n },
            (Chunk::Ext { n }, b) if b != b'\n' => {
                *meta += 1;
                if *meta > MAX_CHUNK_META {
                    return Err("chunk extensions too long".into());
                }
                Chunk::Ext { n }
            }
            (Chunk::SizeLf { n: 0 }, b'\n') => Chunk::Trailer { line: 0 },
            (Chunk::SizeLf { n }, b'\n') => Chunk::Data(n),
            (Chunk::DataCr, b'\r') => Chunk::DataLf,
            (Chunk::DataLf, b'\n') => Chunk::Size { n: 0, digits: 0 },
            (Chunk::Trailer { line }, b'\r') => Chunk::TrailerLf { line },
            (Chunk::Trailer { line }, b) if b != b'\n' => {
                *meta += 1;
                if *meta > MAX_CHUNK_META {
                    return Err("trailers too long".into());
                }
                Chunk::Trailer { line: line + 1 }
            }
            (Chunk::TrailerLf { line: 0 }, b'\n') => return Ok(Step::End),
            (Chunk::TrailerLf { .. }, b'\n') => Chunk::Trailer { line: 0 },
            _ => return Err("malformed chunked body".into()),
        };
    }
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
            State::Chunk(chunk) => match chunk_step(chunk, buf, &mut self.meta)? {
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

/// For the fuzz target: a worker's response head and chunked body read from `data`
/// never panic, never give more body than the bytes that came, and an accepted
/// head leaves exactly the bytes after it.
#[doc(hidden)]
pub fn fuzz_response(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    if let Ok(Some(head)) = parse_head(&mut buf) {
        assert!(buf.len() < data.len());
        assert_eq!(&buf[..], &data[data.len() - buf.len()..]);
        let _ = framing(&head, false);
        let _ = framing(&head, true);
    }
    let mut buf = BytesMut::from(data);
    let mut state = Chunk::Size { n: 0, digits: 0 };
    let mut meta = 0;
    let mut body = 0;
    while let Ok(Step::Data(d)) = chunk_step(&mut state, &mut buf, &mut meta) {
        body += d.len();
    }
    assert!(body <= data.len());
    assert!(meta <= MAX_CHUNK_META + 1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(input: &[u8]) -> Result<(Vec<u8>, bool), BoxError> {
        let mut state = Chunk::Size { n: 0, digits: 0 };
        let mut buf = BytesMut::from(input);
        let mut meta = 0;
        let mut out = Vec::new();
        loop {
            match chunk_step(&mut state, &mut buf, &mut meta)? {
                Step::Data(d) => out.extend_from_slice(&d),
                Step::More => return Ok((out, false)),
                Step::End => return Ok((out, buf.is_empty())),
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_and_trailers() {
        assert_eq!(
            decode(b"5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n").ok(),
            Some((b"hello world".to_vec(), true))
        );
        assert_eq!(
            decode(b"A \r\n0123456789\r\n0\r\nX-T: 1\r\n\r\n").ok(),
            Some((b"0123456789".to_vec(), true))
        );
        // Cut short: what came so far, and not ended.
        assert_eq!(decode(b"5\r\nhel").ok(), Some((b"hel".to_vec(), false)));
    }

    #[test]
    fn broken_chunked_bodies_are_refused() {
        for bad in [
            &b"5\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"\r\nhello",
            b"zz\r\n",
            b"11111111111111111\r\n",
            b"0\r\nX-T: 1\n\r\n",
        ] {
            assert!(decode(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    fn head(text: &str) -> Head {
        let mut buf = BytesMut::from(text.as_bytes());
        parse_head(&mut buf).expect("parses").expect("whole head")
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let f = |text: &str, head_req: bool| framing(&head(text), head_req).ok();
        let chunked = State::Chunk(Chunk::Size { n: 0, digits: 0 });
        assert_eq!(
            f("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", false),
            Some((State::Length(5), true))
        );
        assert_eq!(
            f("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true),
            Some((State::Length(0), true))
        );
        assert_eq!(
            f(
                "HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
                false
            ),
            Some((State::Length(0), true))
        );
        assert_eq!(
            f(
                "HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
                false
            ),
            Some((State::Length(0), true))
        );
        assert_eq!(
            f(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                false
            ),
            Some((chunked, true))
        );
        assert_eq!(
            f(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
                false
            ),
            Some((chunked, false))
        );
        assert_eq!(
            f("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false),
            Some((State::Close, false))
        );
        assert_eq!(
            f(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                false
            ),
            Some((chunked, true))
        );
        assert_eq!(
            f("HTTP/1.1 200 OK\r\n\r\n", false),
            Some((State::Close, false))
        );
        assert_eq!(
            f(
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
                false
            ),
            Some((State::Length(5), true))
        );
        assert_eq!(
            f("HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n", false),
            Some((State::Length(5), true))
        );
        assert_eq!(
            f(
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                false
            ),
            None
        );
        assert_eq!(
            f("HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n", false),
            None
        );
        assert_eq!(
            f(
                "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                false
            ),
            None
        );
    }

    #[test]
    fn a_head_keeps_its_header_order_and_an_unusual_reason() {
        let h = head("HTTP/1.1 200 Fine\r\nSet-Cookie: a=1\r\nX-A: b\r\nSet-Cookie: c=2\r\n\r\n");
        let cookies: Vec<_> = h.headers.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "c=2"]);
        assert_eq!(h.reason.as_ref().map(|r| r.as_bytes()), Some(&b"Fine"[..]));
        assert!(head("HTTP/1.1 200 OK\r\n\r\n").reason.is_none());
        let mut partial = BytesMut::from(&b"HTTP/1.1 200 OK\r\nX-A: b\r\n"[..]);
        assert!(matches!(parse_head(&mut partial), Ok(None)));
        let mut bad = BytesMut::from(&b"HTTP/1.1 200 OK\r\nX-A: b\x01\r\n\r\n"[..]);
        assert!(parse_head(&mut bad).is_err());
    }

    #[test]
    fn a_request_is_framed_by_what_it_carries() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("a"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("99"));
        let uri: Uri = "/x?y=1".parse().expect("uri");
        let req = encode(
            &Method::POST,
            &uri,
            &headers,
            |_| false,
            &[],
            Bytes::from_static(b"abc"),
        );
        assert_eq!(
            &req.bytes[..],
            b"POST /x?y=1 HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nabc"
        );
        headers.remove(header::CONTENT_LENGTH);
        let req = encode(&Method::GET, &uri, &headers, |_| false, &[], Bytes::new());
        assert_eq!(&req.bytes[..], b"GET /x?y=1 HTTP/1.1\r\nhost: a\r\n\r\n");
        // Skipped names out, added ones last.
        headers.insert("x-drop", HeaderValue::from_static("1"));
        let added = [(
            HeaderName::from_static("x-add"),
            HeaderValue::from_static("2"),
        )];
        let req = encode(
            &Method::GET,
            &uri,
            &headers,
            |n| n == "x-drop",
            &added,
            Bytes::new(),
        );
        assert_eq!(
            &req.bytes[..],
            b"GET /x?y=1 HTTP/1.1\r\nhost: a\r\nx-add: 2\r\n\r\n"
        );
    }
}
