//! The client side's HTTP/1.1: one server session per client connection, on
//! `httparse` and `http1` (pingora's model, `protocols/http/v1/server.rs`). It reads
//! each request head (`http1::head::parse_request`, which refuses what nginx
//! refuses: 400, 431, 501, 505), reads the body by its framing (a Content-Length
//! or chunks) into a [`pipe`] as the request path asks for it (with `100 Continue`
//! when the client expects it), hands the request to its service, watches the
//! client meanwhile (one that goes away cancels the request), writes the answer
//! (`http1::encode`), and then either keeps the connection for the next request
//! (pipelined ones included) or closes it; a 101 gives the socket, with the bytes
//! read past the head, to the tunnel that asked for it (`OnUpgrade`). At an
//! upgrade's drain a connection between requests, or one whose long-poll the request
//! path stopped waiting for, gives its socket to the [`Carrier`] instead of closing.
//!
//! It owns the connection's timeouts: `header_read` for a head once begun,
//! `keepalive` between requests, `body_read` between pieces of a body, and (on the
//! socket, `uproot::Movable`) `send`. It must not judge requests beyond their
//! framing: the gate does, for HTTP/1.1 and h2 alike.

use crate::edge::uproot::{NoDelay, Uproot};
use crate::http1::body::BodyReader;
use crate::http1::encode::{chunk, refusal_head, response_head, BodyKnown, Framing, LAST_CHUNK};
use crate::http1::head::{parse_request, BodyFraming, Parsed};
use crate::http1::{is_websocket_upgrade, make_room, READ_SIZE};
use crate::transport::body::{pipe, BodyTimedOut, BoxError, Feed, ProxyBody, RequestBody};
use crate::transport::moving::{
    upgrade_pair, Handover, Pending, PendingAnswer, Taken, TakenSocket, Upgrading,
};
use bytes::{Bytes, BytesMut};
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body as _, Frame};
use http_body_util::BodyExt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// What a session needs to know of the listener's limits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Longest request head (`limits.max_header`): a longer one, whole or not, is
    /// answered 431 and the connection closed.
    pub max_head: usize,
    /// Time for a whole request head, from its first byte (from the accept for a
    /// connection's first request).
    pub header_read: Duration,
    /// Time between two requests of a kept-alive connection.
    pub keepalive: Duration,
    /// Time between two reads of a request body the request path is waiting for.
    pub body_read: Duration,
    /// Shut the connection down before closing it after an answer: over TLS that
    /// sends close_notify. A plain socket's close sends the same FIN as a shutdown
    /// right before it would, so it is one system call saved per such answer.
    pub shutdown: bool,
    /// The socket still has Nagle's algorithm on: the session turns it off before the
    /// connection's second write, as nginx turns it off only for a connection it
    /// keeps alive. A first write goes out at once either way, so a connection that
    /// carries one answer in one write saves the system call.
    pub nagle: bool,
}

/// What answers a session's requests: the gate, or the status listener's pages.
/// Its future is made where it is awaited (`answer_unless_gone`): made elsewhere and
/// passed in, a future of the request path's size was copied several times over for
/// every request.
pub(crate) trait Service {
    fn call(&self, req: Request<RequestBody>) -> impl Future<Output = Answer> + Send;
}

/// A service's answer (it never fails: every error is an answer).
pub(crate) type Answer = Result<Response<ProxyBody>, std::convert::Infallible>;

impl<F, Fut> Service for F
where
    F: Fn(Request<RequestBody>) -> Fut,
    Fut: Future<Output = Answer> + Send,
{
    fn call(&self, req: Request<RequestBody>) -> impl Future<Output = Answer> + Send {
        self(req)
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
}

/// A connection as its session holds it: the socket, what was read and not yet
/// used, the answer being written, and its limits.
struct Conn<I> {
    io: I,
    buf: BytesMut,
    out: Vec<u8>,
    nagle: Nagle,
    limits: Limits,
}

/// The connection's one timer, reset for each wait (a head, a piece of a body):
/// moved later, a registered timer costs an atomic store, where a new one for
/// each request went into the timer wheel and out again.
type Deadline<'a> = Pin<&'a mut tokio::time::Sleep>;

/// Moves `deadline` to `after` from now.
fn reset(deadline: &mut Deadline<'_>, after: Duration) {
    deadline.as_mut().reset(tokio::time::Instant::now() + after);
}

/// Where an upgrade takes the cleartext connections it carries: at the drain, a
/// connection waiting for its next request (or in the middle of its head) gives
/// its socket and the bytes read and not yet used, instead of closing; one with a
/// request in flight answers it first and gives itself after.
#[derive(Default)]
pub(crate) struct Carrier {
    on: std::sync::atomic::AtomicBool,
    given: std::sync::Mutex<Vec<Given>>,
}

/// A connection an upgrade carries: its socket, the bytes read from it and not
/// used, and the answer it still waits for (a long-poll's).
pub(crate) struct Given {
    pub(crate) socket: std::net::TcpStream,
    pub(crate) early: Bytes,
    pub(crate) waiting: Option<Waiting>,
}

/// A request whose answer an upgrade carried: where the answer comes from, and
/// how it is to be written.
pub(crate) struct Waiting {
    pub(crate) answer: PendingAnswer,
    pub(crate) how: Writing,
}

/// How an answer is to be written on its connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Writing {
    pub(crate) http10: bool,
    /// The request asked for the connection to close after it.
    pub(crate) close: bool,
}

impl Carrier {
    /// From now on, the drain carries connections instead of closing them.
    pub(crate) fn start(&self) {
        self.on.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether the drain carries connections now.
    pub(crate) fn carrying(&self) -> bool {
        self.on.load(std::sync::atomic::Ordering::Acquire)
    }

    /// A connection that has sent nothing yet (a look for the HTTP/2 preface was
    /// waiting on it), given as it is.
    pub(crate) fn give_untouched(&self, socket: std::net::TcpStream) {
        let mut given = self.given.lock().unwrap_or_else(|e| e.into_inner());
        given.push(Given {
            socket,
            early: Bytes::new(),
            waiting: None,
        });
    }

    /// The connections given so far.
    pub(crate) fn take(&self) -> Vec<Given> {
        std::mem::take(&mut *self.given.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// How a connection is begun: `early`, bytes already read from it (a carried
/// connection's); `carrier`, where it goes at an upgrade's drain (None: it closes,
/// as a TLS connection must).
#[derive(Default)]
pub(crate) struct Begun<'a> {
    pub(crate) early: Bytes,
    pub(crate) carrier: Option<&'a Carrier>,
    /// An answer to write first (a carried long-poll's), with how.
    pub(crate) answer: Option<(AnswerComing<'a>, Writing)>,
}

/// A carried long-poll's answer, as the new image reads it from its worker.
pub(crate) type AnswerComing<'a> = Pin<Box<dyn Future<Output = Response<ProxyBody>> + Send + 'a>>;

/// Serves a connection's requests until it closes or its last answer said so. Once
/// `draining` is cancelled, an idle connection closes at once (or is carried, see
/// [`Carrier`]) and a request in flight is answered first. `hold` (the
/// connection's slot) is let go when the connection ends, or goes with its socket
/// to a tunnel.
pub(crate) async fn serve<I, S>(
    io: I,
    service: &S,
    limits: Limits,
    draining: &CancellationToken,
    hold: Option<Box<dyn Send + Sync>>,
    begun: Begun<'_>,
) where
    I: Uproot + NoDelay,
    S: Service,
{
    let carrier = begun.carrier;
    let carrying = || carrier.is_some_and(Carrier::carrying);
    let mut conn = Conn::new(io, limits, &begun.early);
    let deadline = tokio::time::sleep(limits.header_read);
    tokio::pin!(deadline);
    let mut first = true;
    if let Some((answer, how)) = begun.answer {
        let keep = !how.close && (!draining.is_cancelled() || carrying());
        if !write_carried(&mut conn, answer, how, keep).await {
            return;
        }
        first = false;
    }
    loop {
        let head = read_head(&mut conn, deadline.as_mut(), draining, first, carrier).await;
        let (mut req, framing) = match head {
            Head::Request(req, framing) => (req, framing),
            Head::Refused(status) => return Box::pin(refuse(&mut conn, status)).await,
            Head::End => return,
            Head::Carry => return give(conn, carrier, None),
        };
        first = false;
        let head_request = req.method() == Method::HEAD;
        let http10 = req.version() == Version::HTTP_10;
        let mut inbound = Inbound::new(framing.body, &mut req);
        let upgrading = (inbound.is_none() && is_websocket_upgrade(req.headers())).then(|| {
            let (upgrading, on) = upgrade_pair();
            req.extensions_mut().insert(on);
            upgrading
        });
        let expects = framing.continue_100;
        let timer = deadline.as_mut();
        let answer = answer_unless_gone(&mut conn, timer, service, req, &mut inbound, expects);
        let Some(mut resp) = answer.await else {
            return;
        };
        if let Some(pending) = resp.extensions_mut().remove::<Pending>() {
            let how = Writing {
                http10,
                close: framing.close,
            };
            return give(
                conn,
                carrier,
                pending.take().map(|answer| Waiting { answer, how }),
            );
        }
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(upgrading) = upgrading {
                return switch(conn, resp, upgrading, hold).await;
            }
        }
        let whole = |inbound: &Option<Inbound>| inbound.as_ref().is_none_or(|i| i.clean);
        let keep = !framing.close && (!draining.is_cancelled() || carrying()) && whole(&inbound);
        let written =
            write_response(&mut conn, resp, head_request, http10, keep, &mut inbound).await;
        match written {
            Ok(true) => {}
            Ok(false) | Err(_) => {
                if !whole(&inbound) {
                    linger(&mut conn.io).await;
                }
                if conn.limits.shutdown {
                    let _ = conn.io.shutdown().await;
                }
                return;
            }
        }
    }
}

impl<I> Conn<I> {
    /// A connection begun with `early` (bytes a carried connection had read).
    fn new(io: I, limits: Limits, early: &[u8]) -> Conn<I> {
        let mut buf = BytesMut::with_capacity(READ_SIZE.max(early.len()));
        buf.extend_from_slice(early);
        Conn {
            io,
            buf,
            out: Vec::with_capacity(1024),
            nagle: Nagle {
                on: limits.nagle,
                wrote: false,
            },
            limits,
        }
    }
}

/// Writes the answer a carried long-poll was waiting for, once it comes; whether
/// the connection goes on.
async fn write_carried<I>(
    conn: &mut Conn<I>,
    answer: AnswerComing<'_>,
    how: Writing,
    keep: bool,
) -> bool
where
    I: AsyncRead + AsyncWrite + Unpin + NoDelay,
{
    let resp = answer.await;
    let written = write_response(conn, resp, false, how.http10, keep, &mut None).await;
    matches!(written, Ok(true))
}

/// What comes next on a connection.
// Returned once a request and taken apart at once, as the `Option<Result<..>>` it
// replaced was: boxing the request would cost an allocation each.
#[allow(clippy::large_enum_variant)]
enum Head {
    Request(Request<RequestBody>, crate::http1::head::Framing),
    /// A head that cannot be taken, and why.
    Refused(crate::http1::check::Refused),
    /// The connection ends: closed, the head or keep-alive timed out, or the drain
    /// while idle.
    End,
    /// An upgrade carries it (the drain, and `carrying`).
    Carry,
}

/// A carried connection's socket and unused bytes, to the carrier; dropped (closed)
/// where there is none or its socket cannot be taken (TLS).
fn give<I: Uproot>(mut conn: Conn<I>, carrier: Option<&Carrier>, waiting: Option<Waiting>) {
    let early = conn.buf.split().freeze();
    if let (Some(carrier), Ok(Taken::Tcp(socket))) = (carrier, conn.io.uproot()) {
        let mut given = carrier.given.lock().unwrap_or_else(|e| e.into_inner());
        given.push(Given {
            socket,
            early,
            waiting,
        });
    }
}

/// Reads the next request head.
async fn read_head<I: AsyncRead + Unpin>(
    conn: &mut Conn<I>,
    mut deadline: Deadline<'_>,
    draining: &CancellationToken,
    first: bool,
    carrier: Option<&Carrier>,
) -> Head {
    let limits = conn.limits;
    let begun = first || !conn.buf.is_empty();
    if !first {
        let wait = match begun {
            true => limits.header_read,
            false => limits.keepalive,
        };
        reset(&mut deadline, wait);
    }
    let mut idle = !begun;
    // A head begun goes on at a plain stop's drain; a connection that can be
    // carried watches the drain throughout, for an upgrade's.
    let mut drain_seen = false;
    loop {
        match parse_request(&mut conn.buf, limits.max_head, || RequestBody::Empty) {
            Parsed::Request(req, framing) => return Head::Request(req, framing),
            Parsed::Refused(refused) => return Head::Refused(refused),
            Parsed::Partial => {}
        }
        if idle && !conn.buf.is_empty() {
            // The next request has begun: its head has `header_read` from now.
            idle = false;
            reset(&mut deadline, limits.header_read);
        }
        make_room(&mut conn.buf);
        let nothing_yet = conn.buf.is_empty();
        let watch_drain = !drain_seen && (nothing_yet || carrier.is_some());
        let read = tokio::select! {
            r = conn.io.read_buf(&mut conn.buf) => r,
            _ = &mut deadline => return Head::End,
            _ = draining.cancelled(), if watch_drain => {
                if carrier.is_some_and(Carrier::carrying) {
                    return Head::Carry;
                }
                if nothing_yet {
                    return Head::End;
                }
                drain_seen = true;
                continue;
            }
        };
        match read {
            Ok(0) | Err(_) => return Head::End,
            Ok(_) => {}
        }
    }
}

/// Most bytes read ahead of a body that has not asked for them (to see the client
/// go away meanwhile).
const AHEAD: usize = 64 * 1024;

/// What the session does next for a request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    /// Nothing: no body, it has ended, or nobody reads it any more.
    Nothing,
    /// Wait until the body asks for more.
    Demand,
    /// Read from the client: the body asked and the buffer has none of it.
    Read,
}

/// A request body being read off the connection into its pipe.
struct Inbound {
    feed: Feed,
    reader: BodyReader,
    /// It has ended (cleanly or not).
    done: bool,
    /// It ended cleanly: every byte its framing announced was read.
    clean: bool,
}

impl Inbound {
    /// Gives `req` the body this reads (None: it has none).
    fn new(framing: BodyFraming, req: &mut Request<RequestBody>) -> Option<Inbound> {
        let reader = BodyReader::new(framing)?;
        let length = match framing {
            BodyFraming::Length(n) => Some(n),
            _ => None,
        };
        let (feed, piped) = pipe(length);
        *req.body_mut() = RequestBody::Piped(piped);
        Some(Inbound {
            feed,
            reader,
            done: false,
            clean: false,
        })
    }

    /// Hands the body what `buf` holds of it, while it asks; says what is next.
    fn pump(&mut self, buf: &mut BytesMut) -> Need {
        loop {
            if self.done || self.feed.unread() {
                return Need::Nothing;
            }
            if !self.feed.wanted() {
                return Need::Demand;
            }
            match self.reader.next(buf) {
                Ok(Some((data, ended))) => {
                    if !data.is_empty() {
                        self.feed.send(data);
                    }
                    if ended {
                        self.end(None);
                    }
                }
                Ok(None) => return Need::Read,
                Err(e) => self.end(Some(e)),
            }
        }
    }

    /// The client closed its connection before the body's end: the request path
    /// answers the body's failure (400).
    fn cut_short(&mut self) {
        self.end(Some("client closed the connection mid-body".into()));
    }

    /// Nothing came for `timeouts.body_read` (408).
    fn timed_out(&mut self) {
        self.end(Some(Box::new(BodyTimedOut)));
    }

    /// Ends the body: cleanly (None) or with `error`.
    fn end(&mut self, error: Option<BoxError>) {
        self.clean = error.is_none();
        self.done = true;
        self.feed.end(error);
    }
}

/// The service's answer, with the request body read into its pipe as it asks
/// (`100 Continue` first, when the client expects it), or None if the client went
/// away first (its end read, or a reset, with no body left to read): the request
/// is dropped then, and with it the worker's connection, which is closed, not put
/// back (nginx's 499). What the client sends meanwhile (a pipelined request) is
/// kept in the buffer, up to a head's size.
async fn answer_unless_gone<I, S>(
    conn: &mut Conn<I>,
    mut deadline: Deadline<'_>,
    service: &S,
    req: Request<RequestBody>,
    inbound: &mut Option<Inbound>,
    mut continue_100: bool,
) -> Option<Response<ProxyBody>>
where
    I: AsyncRead + AsyncWrite + Unpin + NoDelay,
    S: Service,
{
    // Made in its pinned place: a `let` then `tokio::pin!` copied the request
    // path's future once more for every request.
    let mut answer = std::pin::pin!(service.call(req));
    let limits = conn.limits;
    let (mut ended, mut reading) = (false, false);
    loop {
        let need = inbound
            .as_mut()
            .map_or(Need::Nothing, |i| i.pump(&mut conn.buf));
        if need == Need::Read && !reading {
            reset(&mut deadline, limits.body_read);
            if std::mem::take(&mut continue_100) && conn.buf.is_empty() {
                let line = b"HTTP/1.1 100 Continue\r\n\r\n";
                conn.nagle.before_write(&conn.io, line);
                if conn.io.write_all(line).await.is_err() {
                    return None;
                }
            }
        }
        reading = need == Need::Read;
        let room = match need {
            Need::Read => true,
            Need::Demand => conn.buf.len() < AHEAD,
            Need::Nothing => conn.buf.len() < limits.max_head,
        };
        make_room(&mut conn.buf);
        let feed = inbound.as_ref().map(|i| &i.feed);
        tokio::select! {
            biased;
            Ok(resp) = &mut answer => return Some(resp),
            _ = asked(feed), if need == Need::Demand => {}
            read = conn.io.read_buf(&mut conn.buf), if room && !ended => match read {
                Ok(n) if n > 0 => reset(&mut deadline, limits.body_read),
                _ => match inbound.as_mut().filter(|i| !i.done) {
                    Some(i) => {
                        i.cut_short();
                        ended = true;
                    }
                    None => {
                        tracing::debug!("client went away before its answer");
                        return None;
                    }
                },
            },
            _ = &mut deadline, if reading => {
                if let Some(i) = inbound.as_mut() {
                    i.timed_out();
                }
            }
        }
    }
}

/// Reads the request body for whoever still reads it, as it asks, until it has
/// ended (then it waits for ever: it is raced against the answer's body).
async fn serve_body<I: AsyncRead + Unpin>(
    io: &mut I,
    buf: &mut BytesMut,
    inbound: &mut Option<Inbound>,
    limits: Limits,
) -> std::convert::Infallible {
    loop {
        let Some(i) = inbound.as_mut() else {
            return std::future::pending().await;
        };
        match i.pump(buf) {
            Need::Nothing => return std::future::pending().await,
            Need::Demand => i.feed.asked().await,
            Need::Read => {
                make_room(buf);
                match tokio::time::timeout(limits.body_read, io.read_buf(buf)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    Ok(_) => i.cut_short(),
                    Err(_) => i.timed_out(),
                }
            }
        }
    }
}

/// Resolves once the body asks for more.
async fn asked(feed: Option<&Feed>) {
    match feed {
        Some(feed) => feed.asked().await,
        None => std::future::pending().await,
    }
}

/// Writes a 101 and gives the socket, with what was read past the head, to the
/// tunnel waiting on `upgrading`.
async fn switch<I: Uproot + NoDelay>(
    mut conn: Conn<I>,
    resp: Response<ProxyBody>,
    upgrading: Upgrading,
    hold: Option<Box<dyn Send + Sync>>,
) {
    if write_response(&mut conn, resp, false, false, true, &mut None)
        .await
        .is_err()
    {
        return;
    }
    let early = conn.buf.split().freeze();
    match conn.io.uproot() {
        Ok(io) => {
            let socket = TakenSocket { io, early };
            let hold = hold.unwrap_or_else(|| Box::new(()));
            let _ = upgrading.0.send(Handover { socket, hold });
        }
        Err(e) => tracing::debug!(error = %e, "upgraded socket lost"),
    }
}

/// Answers a head the session will not read on (`refused`), then closes. What the
/// client is still sending is read away for a moment first (nginx's lingering
/// close): closed with unread bytes, the socket would send a reset that can
/// overtake the answer.
async fn refuse<I>(conn: &mut Conn<I>, refused: crate::http1::check::Refused)
where
    I: AsyncRead + AsyncWrite + Unpin + NoDelay,
{
    let mut out = Vec::with_capacity(160);
    refusal_head(&mut out, refused.status(), &format!("corral: {refused}\n"));
    conn.nagle.before_write(&conn.io, &out);
    if conn.io.write_all(&out).await.is_err() || conn.io.flush().await.is_err() {
        return;
    }
    let _ = conn.io.shutdown().await;
    linger(&mut conn.io).await;
}

/// Reads what the client still sends and drops it, bounded in bytes and time.
async fn linger<I: AsyncRead + Unpin>(io: &mut I) {
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

/// Writes `resp` (to an HTTP/1.0 request as HTTP/1.0, as hyper did); returns
/// whether the connection can carry another request (`keep`: the client did not
/// ask to close, its body was read whole and no drain began). While the answer
/// waits on its body, the request body goes on being read for whoever still
/// reads it (a worker that answered before it had all of it).
async fn write_response<I>(
    conn: &mut Conn<I>,
    resp: Response<ProxyBody>,
    head_request: bool,
    http10: bool,
    keep: bool,
    inbound: &mut Option<Inbound>,
) -> io::Result<bool>
where
    I: AsyncRead + AsyncWrite + Unpin + NoDelay,
{
    let (mut parts, body) = resp.into_parts();
    if http10 {
        parts.version = Version::HTTP_10;
        if keep && !parts.headers.contains_key(header::CONNECTION) {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        }
    }
    let Conn {
        io,
        out,
        nagle,
        buf,
        limits,
    } = conn;
    out.clear();
    let known = BodyKnown {
        ended: body.is_end_stream(),
        exact: body.size_hint().exact(),
    };
    let (framing, keep) = response_head(out, &parts, known, head_request, keep);
    if framing == Framing::Nothing {
        drop(body);
        nagle.before_write(io, out);
        io.write_all(out).await?;
        io.flush().await?;
        return Ok(keep);
    }
    let request = (buf, inbound, *limits);
    let whole = write_body(io, out, nagle, body, framing, request).await?;
    Ok(keep && whole)
}

/// Writes an answer's body after its head (in `out`), framed as `framing` says;
/// returns whether it went out whole as framed (a connection that can carry
/// another request). What the body has already goes out with the head (the usual
/// small answer, a chunked one's last chunk and end included: one write); a body
/// still to come does not hold back what is there, and while it is awaited the
/// request body is read on (`serve_body`).
async fn write_body<I>(
    io: &mut I,
    out: &mut Vec<u8>,
    nagle: &mut Nagle,
    mut body: ProxyBody,
    framing: Framing,
    (buf, inbound, limits): (&mut BytesMut, &mut Option<Inbound>, Limits),
) -> io::Result<bool>
where
    I: AsyncRead + AsyncWrite + Unpin + NoDelay,
{
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
                tokio::select! {
                    biased;
                    frame = body.frame() => frame,
                    never = serve_body(io, buf, inbound, limits) => match never {},
                }
            }
        };
        let data = match frame {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if !data.is_empty() => data,
                _ => continue, // trailers are not passed on
            },
            Some(Err(_)) => {
                nagle.before_write(io, out);
                io.write_all(out).await?;
                io.flush().await?;
                return Ok(false);
            }
            None => break,
        };
        sent += data.len() as u64;
        match framing {
            Framing::Length(n) if sent > n => {
                return Err(io::Error::other("body longer than its length"))
            }
            Framing::Chunked => chunk(out, &data),
            _ => out.extend_from_slice(&data),
        }
        if out.len() >= 64 * 1024 {
            nagle.before_write(io, out);
            io.write_all(out).await?;
            out.clear();
        }
    }
    let whole = match framing {
        Framing::Chunked => {
            out.extend_from_slice(LAST_CHUNK);
            true
        }
        Framing::Length(n) => sent == n,
        _ => false,
    };
    nagle.before_write(io, out);
    io.write_all(out).await?;
    io.flush().await?;
    out.clear();
    Ok(whole)
}

/// The body's next frame if it is there without waiting (`None`: not yet).
async fn frame_now(body: &mut ProxyBody) -> Option<Option<Result<Frame<Bytes>, BoxError>>> {
    std::future::poll_fn(|cx| match Pin::new(&mut *body).poll_frame(cx) {
        Poll::Ready(frame) => Poll::Ready(Some(frame)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::task::Context;

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
        assert_eq!(io.0.get(), 1);

        let io = Counting(Cell::new(0));
        let mut nagle = Nagle {
            on: false,
            wrote: false,
        };
        nagle.before_write(&io, b"x");
        nagle.before_write(&io, b"y");
        assert_eq!(io.0.get(), 0, "already off (TLS): never set again");
    }

    /// Nagle's algorithm on, nothing written yet: a new connection.
    fn nagle_on() -> Nagle {
        Nagle {
            on: true,
            wrote: false,
        }
    }

    /// A connection on `io`, nothing written yet.
    fn conn_on(io: Recording) -> Conn<Recording> {
        Conn {
            io,
            buf: BytesMut::new(),
            out: Vec::new(),
            nagle: nagle_on(),
            limits: Limits {
                max_head: 8192,
                header_read: Duration::from_secs(1),
                keepalive: Duration::from_secs(1),
                body_read: Duration::from_secs(1),
                shutdown: false,
                nagle: true,
            },
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

    impl AsyncRead for Recording {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
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
        let mut conn = conn_on(record.clone());
        let resp = Response::new(ready_body(&["ok", "42"]));
        let keep = write_response(&mut conn, resp, false, false, true, &mut None)
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
        let mut conn = conn_on(record.clone());
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let body = http_body_util::StreamBody::new(stream_of(rx)).boxed_unsync();
        let mut none = None;
        let write = write_response(
            &mut conn,
            Response::new(body),
            false,
            false,
            true,
            &mut none,
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
