//! The client side's HTTP/1.1 fast path: a connection's plain requests — complete
//! HTTP/1.1 heads with no body (no Content-Length, no Transfer-Encoding), no
//! upgrade, no expectation — are read with `httparse` and answered by this loop,
//! one after another on the connection's own task. At the first request that is
//! anything else, or a head it cannot read whole and clean, the connection goes to
//! hyper's server for the rest of its life with every byte read so far
//! ([`Rewind`]), so every rule hyper enforces — 400 and 431 answers, body framing,
//! `100-continue`, HTTP/1.0, upgrades — stays hyper's alone.
//!
//! It owns reading request heads and writing responses (as hyper's server writes
//! them: the same status line, header lines, `content-length` or chunking, `date`,
//! and `connection: close` when it closes). It must not judge requests (the gate
//! does, for both paths) and never reads a request body: a request with one is not
//! its to serve.

use crate::edge::gate::Gate;
use crate::proxy::forward::Peer;
use crate::transport::body::{ProxyBody, RequestBody};
// A request head with more lines than hyper allows goes to hyper (431).
use crate::transport::http1::{
    header_map, lines_of, lists_token, make_room, span, take_head, wants_close, Line, MAX_HEADERS,
    READ_SIZE,
};
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use std::io::{self, Write as _};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;

/// What the loop needs to know of the listener's limits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Longest request head read here; a longer one goes to hyper, which answers 431.
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

impl NoDelay for tokio_rustls::server::TlsStream<tokio::net::TcpStream> {
    fn no_delay(&self) {
        self.get_ref().0.no_delay()
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
            match parse_request(&mut buf) {
                Parsed::Plain(req, close) => break (req, close),
                Parsed::Other => {
                    nagle.hand_over(&io);
                    return Outcome::Handover(Rewind::new(io, buf.freeze()));
                }
                Parsed::Partial if buf.len() >= limits.max_head => {
                    nagle.hand_over(&io);
                    return Outcome::Handover(Rewind::new(io, buf.freeze()));
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
        let Ok(resp) = gate.clone().handle(req, peer.clone()).await;
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

/// What the front of the read buffer holds.
// Made and taken apart once per request: boxing the request would cost an
// allocation for nothing.
#[allow(clippy::large_enum_variant)]
enum Parsed {
    /// A plain request, taken off the buffer; whether the client asked to close.
    Plain(Request<RequestBody>, bool),
    /// Not all of a head yet.
    Partial,
    /// A head this loop does not serve (or cannot read): hyper's.
    Other,
}

/// Takes a plain request head off the front of `buf`. The head is split off the
/// buffer it was read into (`take_head`), so the target and header values are
/// slices of it, not copies; a pipelined request behind it stays in `buf`.
fn parse_request(buf: &mut BytesMut) -> Parsed {
    if buf.is_empty() {
        return Parsed::Partial;
    }
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let parsed = httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, &mut slots);
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    let mut lines = [Line::default(); MAX_HEADERS];
    let Some(plan) = plan_request(buf, &req, &mut lines) else {
        return Parsed::Other;
    };
    let head = take_head(buf, len);
    match build_request(&head, &plan, &lines[..plan.count]) {
        Some(req) => Parsed::Plain(req, plan.close),
        None => {
            // A name, value or target `http` refuses: hyper's, with every byte.
            let mut all = BytesMut::with_capacity(head.len() + buf.len());
            all.extend_from_slice(&head);
            all.extend_from_slice(buf);
            *buf = all;
            Parsed::Other
        }
    }
}

/// A plain request as parsed, by where its parts lie in its head (its header
/// lines are kept beside it: moving them with it cost a 1.6 KB copy or two).
struct Plan {
    method: Method,
    target: (usize, usize),
    /// How many header lines there are.
    count: usize,
    /// The client asked to close after it.
    close: bool,
}

/// The plan of `req` (parsed out of `read`) if it is plain: HTTP/1.1, no body, no
/// upgrade, no expectation, not CONNECT; where its header lines lie goes to `lines`.
fn plan_request(
    read: &[u8],
    req: &httparse::Request<'_, '_>,
    lines: &mut [Line; MAX_HEADERS],
) -> Option<Plan> {
    if req.version != Some(1) {
        return None;
    }
    let method = Method::from_bytes(req.method?.as_bytes()).ok()?;
    if method == Method::CONNECT {
        return None;
    }
    let mut close = false;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let is = |n: &HeaderName| name.eq_ignore_ascii_case(n.as_str().as_bytes());
        if is(&header::CONTENT_LENGTH)
            || is(&header::TRANSFER_ENCODING)
            || is(&header::EXPECT)
            || is(&header::UPGRADE)
        {
            return None;
        }
        if is(&header::CONNECTION) {
            close |= lists_token(h.value, b"close");
        }
    }
    Some(Plan {
        method,
        target: span(read, req.path?.as_bytes()),
        count: lines_of(read, req.headers, lines),
        close,
    })
}

/// The request `plan` and its header `lines` describe, its parts slices of
/// `head`; None if `http` refuses its target or a header.
fn build_request(head: &Bytes, plan: &Plan, lines: &[Line]) -> Option<Request<RequestBody>> {
    let uri = Uri::from_maybe_shared(head.slice(plan.target.0..plan.target.1)).ok()?;
    // Room for the forwarding headers the proxy adds (four, and Host), so the map
    // does not grow on the way.
    let headers = header_map(head, lines, 5).ok()?;
    let mut request = Request::new(RequestBody::Empty);
    *request.method_mut() = plan.method.clone();
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    Some(request)
}

/// How a response body is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// Exactly this many bytes (what the head's Content-Length says).
    Length(u64),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 response of unknown length).
    Close,
    /// None at all (HEAD, 204, 304).
    Nothing,
}

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
    let (framing, mut keep) = encode_head(out, &parts, &body, head_request, keep);
    if framing == Framing::Nothing {
        drop(body);
        nagle.before_write(io, out);
        io.write_all(out).await?;
        io.flush().await?;
        return Ok(keep);
    }
    // The first frame goes out with the head when it is there already (the usual
    // small answer: one write); a body still to come does not hold the head back.
    let first = std::future::poll_fn(|cx| match Pin::new(&mut body).poll_frame(cx) {
        Poll::Ready(frame) => Poll::Ready(Some(frame)),
        Poll::Pending => Poll::Ready(None),
    })
    .await;
    let mut sent = 0u64;
    let mut pending = first;
    loop {
        let frame = match pending.take() {
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

/// The status line and headers, as hyper's server writes them, and how the body
/// goes and whether the connection stays open after it.
fn encode_head(
    out: &mut Vec<u8>,
    parts: &http::response::Parts,
    body: &ProxyBody,
    head_request: bool,
    keep: bool,
) -> (Framing, bool) {
    let status = parts.status;
    let http10 = parts.version == Version::HTTP_10;
    let reason = parts.extensions.get::<hyper::ext::ReasonPhrase>();
    if !http10 && status == StatusCode::OK && reason.is_none() {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(if http10 { b"HTTP/1.0 " } else { b"HTTP/1.1 " });
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        match reason {
            Some(r) => out.extend_from_slice(r.as_bytes()),
            None => out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes()),
        }
        out.extend_from_slice(b"\r\n");
    }
    // What hyper's dispatcher tells its encoder of the body.
    let known = match body.is_end_stream() {
        true => Some(0),
        false => body.size_hint().exact(),
    };
    let no_body = head_request || matches!(status.as_u16(), 204 | 304);
    let may_have_length = !matches!(status.as_u16(), 204 | 304);
    // hyper writes every Connection value on one line where the first was, adding
    // `close` when it will close (the client asked, or a drain began).
    let mut keep = keep;
    let own_close = wants_close(&parts.headers);
    let add_close = !keep && !own_close;
    keep &= !own_close;
    let mut length: Option<u64> = None;
    let mut wrote_date = false;
    let mut wrote_connection = false;
    let mut last_name: Option<&HeaderName> = None;
    for (name, value) in &parts.headers {
        let repeat = last_name == Some(name);
        last_name = Some(name);
        match *name {
            header::CONTENT_LENGTH => {
                if repeat {
                    continue;
                }
                let Some(n) = value
                    .to_str()
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                else {
                    continue;
                };
                if body.is_end_stream() && !head_request {
                    // No body to send: the header goes, an implicit 0 is written below.
                    continue;
                }
                length = Some(known.unwrap_or(n));
            }
            header::CONNECTION => {
                if !wrote_connection {
                    wrote_connection = true;
                    write_connection(out, &parts.headers, add_close);
                }
                continue;
            }
            header::TRANSFER_ENCODING | header::TRAILER => continue,
            header::DATE => wrote_date = true,
            _ => {}
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !wrote_connection && add_close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    let framing = match (length, known) {
        (Some(n), _) => Framing::Length(n),
        (None, Some(n)) => {
            if may_have_length && (n != 0 || !head_request) {
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(n.to_string().as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            Framing::Length(n)
        }
        (None, None) if http10 || no_body => Framing::Close,
        (None, None) => {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            Framing::Chunked
        }
    };
    if !wrote_date {
        out.extend_from_slice(b"date: ");
        date::extend(out);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if no_body {
        return (Framing::Nothing, keep);
    }
    if framing == Framing::Close {
        keep = false;
    }
    (framing, keep)
}

/// The one `connection` line: every value, then `close` if it is to be added.
fn write_connection(out: &mut Vec<u8>, headers: &HeaderMap, add_close: bool) {
    out.extend_from_slice(b"connection: ");
    for (i, v) in headers.get_all(header::CONNECTION).iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(v.as_bytes());
    }
    if add_close {
        out.extend_from_slice(b", close");
    }
    out.extend_from_slice(b"\r\n");
}

/// The `date` header's value, made once a second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }

    pub(super) fn extend(out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHED.with(|c| {
            let mut c = c.borrow_mut();
            if c.0 != secs || c.1.is_empty() {
                *c = (secs, httpdate::fmt_http_date(now));
            }
            out.extend_from_slice(c.1.as_bytes());
        });
    }
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

/// For the fuzz target: a client's bytes never panic the head reader; a request
/// it takes carries nothing that frames a body or asks for an upgrade, and no byte
/// is lost: what it does not take stays in the buffer as it came.
#[doc(hidden)]
pub fn fuzz_request(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    match parse_request(&mut buf) {
        Parsed::Plain(req, _) => {
            for name in [
                header::CONTENT_LENGTH,
                header::TRANSFER_ENCODING,
                header::UPGRADE,
                header::EXPECT,
            ] {
                assert!(!req.headers().contains_key(name));
            }
            assert_eq!(req.version(), Version::HTTP_11);
            assert_eq!(&buf[..], &data[data.len() - buf.len()..]);
            assert!(buf.len() < data.len());
        }
        Parsed::Partial | Parsed::Other => assert_eq!(&buf[..], data),
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
        let mut nagle = Nagle {
            on: true,
            wrote: false,
        };
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
        let mut nagle = Nagle {
            on: true,
            wrote: false,
        };
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

    fn parse(text: &[u8]) -> (Parsed, BytesMut) {
        let mut buf = BytesMut::from(text);
        let p = parse_request(&mut buf);
        (p, buf)
    }

    #[test]
    fn only_plain_heads_are_taken() {
        let (p, rest) = parse(
            b"GET /a?b HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, close\r\n\r\nGET /next",
        );
        let Parsed::Plain(req, close) = p else {
            panic!("not plain");
        };
        assert!(close);
        assert_eq!(req.uri(), "/a?b");
        assert_eq!(req.headers()["host"], "x");
        assert_eq!(&rest[..], b"GET /next");
        for other in [
            &b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n",
            b"GET / HTTP/1.0\r\n\r\n",
            b"CONNECT x:443 HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost x\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
            // Heads httparse reads whole but `http` refuses, found only once the
            // head is split off its buffer: put back with the pipelined request.
            b"GET http://[::1 HTTP/1.1\r\nHost: x\r\n\r\nGET /next HTTP/1.1\r\n\r\n",
            b"GET /<> HTTP/1.1\r\nHost: x\r\n\r\nGET /next",
            b"GET http://a:b:c/ HTTP/1.1\r\nHost: x\r\n\r\nGET /next",
        ] {
            let (p, rest) = parse(other);
            assert!(
                matches!(p, Parsed::Other),
                "{}",
                String::from_utf8_lossy(other)
            );
            // Every byte stays for hyper.
            assert_eq!(&rest[..], other);
        }
        let (p, rest) = parse(b"GET / HTTP/1.1\r\nHost: x\r\n");
        assert!(matches!(p, Parsed::Partial));
        assert_eq!(&rest[..], b"GET / HTTP/1.1\r\nHost: x\r\n");
    }
}
