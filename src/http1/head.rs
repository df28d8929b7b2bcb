//! Reading message heads with `httparse`: a worker's response head, and a client's
//! request head when it is plain (no body framing, no upgrade, no expectation). A
//! head is split off the buffer it was read into, so its target and header values
//! are slices of it rather than copies, and what follows it stays where it was read.

use super::check::Refused;
use super::fields::lists_token;
use super::framing::Error;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri, Version};
use std::mem::MaybeUninit;

/// Most header lines in a head (hyper's limit, both ways).
pub const MAX_HEADERS: usize = 100;
/// Most bytes of a response head (the limit hyper's client had).
pub const MAX_RESPONSE_HEAD: usize = 8192 + 4096 * 100;
/// Bytes asked for per read.
pub const READ_SIZE: usize = 8192;

/// Where a header line's name and value lie in the head it was read from.
#[derive(Debug, Clone, Copy, Default)]
pub struct Line {
    name: (u32, u32),
    value: (u32, u32),
}

impl Line {
    /// The name's bytes in `head`.
    pub fn name<'a>(&self, head: &'a Bytes) -> &'a [u8] {
        &head[self.name.0 as usize..self.name.1 as usize]
    }

    /// The value, a slice of `head`.
    pub fn value(&self, head: &Bytes) -> Bytes {
        head.slice(self.value.0 as usize..self.value.1 as usize)
    }
}

/// The header map of `lines`, names and values slices of `head`, with room for
/// `more` headers besides.
pub fn header_map(head: &Bytes, lines: &[Line], more: usize) -> Result<HeaderMap, Error> {
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
pub fn span(whole: &[u8], part: &[u8]) -> (usize, usize) {
    let from = (part.as_ptr() as usize).wrapping_sub(whole.as_ptr() as usize);
    match from.checked_add(part.len()) {
        Some(to) if !part.is_empty() && to <= whole.len() => (from, to),
        _ => (0, 0),
    }
}

/// Where each of `headers` (parsed out of `whole`) lies in it; how many there are.
pub fn lines_of(
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
pub fn take_head(buf: &mut BytesMut, len: usize) -> Bytes {
    buf.split_to(len).freeze()
}

/// Room for the next read into `buf`: its own when a fair amount is left (heads
/// taken off its front share it), else `READ_SIZE` more, which reuses the memory in
/// place when nothing else refers to it.
pub fn make_room(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(READ_SIZE);
    }
}

/// A response's reason phrase where it is not the status's usual one, passed on as
/// the worker wrote it (httparse has checked its bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason(pub Bytes);

impl Reason {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// A response head as read.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    /// A reason phrase other than the status code's usual one, passed on as hyper's
    /// client passes it.
    pub reason: Option<Reason>,
}

/// Takes one whole response head off the front of `buf`; None when it is not all
/// there yet.
pub fn parse_response(buf: &mut BytesMut) -> Result<Option<ResponseHead>, Error> {
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
    let reason = reason.map(|(from, to)| Reason(head.slice(from..to)));
    Ok(Some(ResponseHead {
        status,
        version,
        headers,
        reason,
    }))
}

/// What the front of a client's read buffer holds.
// Made and taken apart once per request: boxing the request would cost an
// allocation for nothing.
#[allow(clippy::large_enum_variant)]
pub enum Parsed<B> {
    /// A request head, taken off the buffer, and how its message is framed.
    Request(Request<B>, Framing),
    /// Not all there yet.
    Partial,
    /// Refused before anything is done with it: answered with the status, and the
    /// connection closed (nothing after this head can be framed).
    Refused(Refused),
}

/// How a request's message is framed, as its head says (RFC 9112 section 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    pub body: BodyFraming,
    /// The client asked to close after this request (`Connection: close`, or an
    /// HTTP/1.0 request without `keep-alive`; or a body framed by chunks beside a
    /// Content-Length, after which nothing is trusted).
    pub close: bool,
    /// `Expect: 100-continue` on HTTP/1.1: answered when the body is first asked for.
    pub continue_100: bool,
}

/// A request body's framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    None,
    Length(u64),
    Chunked,
}

/// Takes a request head off the front of `buf`, its body `empty()` (the caller
/// reads the body by the [`Framing`]). What nginx refuses here is refused: a head
/// past `max_head` bytes (whole or not: 431), one httparse cannot read or `http`
/// will not hold (400), another HTTP version (505), a transfer coding other than
/// `chunked` alone (501) or one on HTTP/1.0 (400), an unreadable or conflicting
/// Content-Length (400). The rules that need the head whole (Host, the target) are
/// `check::request`'s, for HTTP/2 alike.
pub fn parse_request<B>(
    buf: &mut BytesMut,
    max_head: usize,
    empty: impl FnOnce() -> B,
) -> Parsed<B> {
    if buf.is_empty() {
        return Parsed::Partial;
    }
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let parsed = httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, &mut slots);
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) if len > max_head => {
            return Parsed::Refused(Refused::HeadTooLarge)
        }
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > max_head => {
            return Parsed::Refused(Refused::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::Version) => return Parsed::Refused(Refused::Version),
        Err(httparse::Error::TooManyHeaders) => return Parsed::Refused(Refused::HeadTooLarge),
        Err(_) => return Parsed::Refused(Refused::Malformed),
    };
    let mut lines = [Line::default(); MAX_HEADERS];
    let plan = match plan_request(buf, &req, &mut lines) {
        Ok(plan) => plan,
        Err(refused) => return Parsed::Refused(refused),
    };
    let head = take_head(buf, len);
    match build_request(&head, &plan, &lines[..plan.count], empty()) {
        Some(req) => Parsed::Request(req, plan.framing),
        None => {
            // A name, value or target `http` refuses, found only once the head is
            // split off: put back, so a refused head leaves every byte as it came.
            let mut all = BytesMut::with_capacity(head.len() + buf.len());
            all.extend_from_slice(&head);
            all.extend_from_slice(buf);
            *buf = all;
            Parsed::Refused(Refused::Malformed)
        }
    }
}

/// A request as parsed, by where its parts lie in its head (its header lines are
/// kept beside it: moving them with it cost a 1.6 KB copy or two).
struct Plan {
    method: Method,
    version: Version,
    target: (usize, usize),
    count: usize,
    framing: Framing,
    /// Drop the Content-Length: the body is framed by its chunks.
    drop_length: bool,
}

/// The plan of `req` (parsed out of `read`), or why it is refused; where its header
/// lines lie goes to `lines`.
fn plan_request(
    read: &[u8],
    req: &httparse::Request<'_, '_>,
    lines: &mut [Line; MAX_HEADERS],
) -> Result<Plan, Refused> {
    let version = match req.version {
        Some(1) => Version::HTTP_11,
        Some(0) => Version::HTTP_10,
        _ => return Err(Refused::Version),
    };
    let method = req.method.ok_or(Refused::Malformed)?;
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| Refused::Malformed)?;
    let mut close = version == Version::HTTP_10;
    let (mut length, mut coded, mut chunked_alone, mut codings) = (None, false, false, 0);
    let mut continue_100 = false;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let is = |n: &HeaderName| name.eq_ignore_ascii_case(n.as_str().as_bytes());
        if is(&header::CONTENT_LENGTH) {
            // One field of digits, as nginx takes it: a list, or a second field
            // (equal or not), is refused.
            let n = super::framing::digits(h.value.trim_ascii()).ok_or(Refused::Length)?;
            if length.is_some() {
                return Err(Refused::Length);
            }
            length = Some(n);
        } else if is(&header::TRANSFER_ENCODING) {
            coded = true;
            codings += 1;
            chunked_alone = h.value.trim_ascii().eq_ignore_ascii_case(b"chunked");
        } else if is(&header::CONNECTION) {
            if lists_token(h.value, b"close") {
                close = true;
            } else if version == Version::HTTP_10 && lists_token(h.value, b"keep-alive") {
                close = false;
            }
        } else if is(&header::EXPECT) {
            continue_100 = version == Version::HTTP_11
                && h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        }
    }
    let body = match (coded, length) {
        (true, _) if version == Version::HTTP_10 => return Err(Refused::CodingOnHttp10),
        (true, _) if !(chunked_alone && codings == 1) => return Err(Refused::Coding),
        (true, _) => BodyFraming::Chunked,
        (false, Some(0) | None) => BodyFraming::None,
        (false, Some(n)) => BodyFraming::Length(n),
    };
    let drop_length = coded && length.is_some();
    Ok(Plan {
        method,
        version,
        target: span(read, req.path.ok_or(Refused::Malformed)?.as_bytes()),
        count: lines_of(read, req.headers, lines),
        framing: Framing {
            body,
            close: close || drop_length,
            continue_100: continue_100 && body != BodyFraming::None,
        },
        drop_length,
    })
}

/// The request `plan` and its header `lines` describe, its parts slices of
/// `head`; None if `http` refuses its target or a header.
fn build_request<B>(head: &Bytes, plan: &Plan, lines: &[Line], body: B) -> Option<Request<B>> {
    let uri = Uri::from_maybe_shared(head.slice(plan.target.0..plan.target.1)).ok()?;
    // Room for the forwarding headers the proxy adds (four, and Host), so the map
    // does not grow on the way.
    let mut headers = header_map(head, lines, 5).ok()?;
    if plan.drop_length {
        headers.remove(header::CONTENT_LENGTH);
    }
    let mut request = Request::new(body);
    *request.method_mut() = plan.method.clone();
    *request.uri_mut() = uri;
    *request.version_mut() = plan.version;
    *request.headers_mut() = headers;
    Some(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &[u8]) -> (Parsed<()>, BytesMut) {
        let mut buf = BytesMut::from(text);
        let p = parse_request(&mut buf, 64 << 10, || ());
        (p, buf)
    }

    fn framing(text: &[u8]) -> Result<Framing, Refused> {
        match parse(text).0 {
            Parsed::Request(_, f) => Ok(f),
            Parsed::Refused(r) => Err(r),
            Parsed::Partial => panic!("partial: {}", String::from_utf8_lossy(text)),
        }
    }

    #[test]
    fn a_head_is_taken_with_what_follows_left() {
        let (p, rest) = parse(
            b"GET /a?b HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, close\r\n\r\nGET /next",
        );
        let Parsed::Request(req, f) = p else {
            panic!("not taken");
        };
        assert!(f.close);
        assert_eq!(f.body, BodyFraming::None);
        assert_eq!(req.uri(), "/a?b");
        assert_eq!(req.headers()["host"], "x");
        assert_eq!(&rest[..], b"GET /next");
        let (p, rest) = parse(b"GET / HTTP/1.1\r\nHost: x\r\n");
        assert!(matches!(p, Parsed::Partial));
        assert_eq!(&rest[..], b"GET / HTTP/1.1\r\nHost: x\r\n");
    }

    #[test]
    fn a_heads_framing_is_read_as_nginx_reads_it() {
        let f = framing(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n").unwrap();
        assert_eq!((f.body, f.close), (BodyFraming::Length(5), false));
        let f = framing(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n").unwrap();
        assert_eq!(f.body, BodyFraming::None);
        let f = framing(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
        assert_eq!((f.body, f.close), (BodyFraming::Chunked, false));
        // Both: the chunks frame it, and the connection closes after it.
        let (p, _) =
            parse(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n");
        let Parsed::Request(req, f) = p else {
            panic!("not taken");
        };
        assert_eq!((f.body, f.close), (BodyFraming::Chunked, true));
        assert!(!req.headers().contains_key(header::CONTENT_LENGTH));
        let f = framing(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        assert!(f.close);
        let f = framing(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").unwrap();
        assert!(!f.close);
        let f = framing(b"PUT / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n");
        assert!(f.unwrap().continue_100);
        let f = framing(b"GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n").unwrap();
        assert!(!f.continue_100, "no body, nothing to continue");
        let refused: [(&[u8], Refused); 10] = [
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                Refused::Coding,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                Refused::Coding,
            ),
            (
                b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                Refused::CodingOnHttp10,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                Refused::Length,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
                Refused::Length,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n",
                Refused::Length,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
                Refused::Length,
            ),
            (b"GET / HTTP/2.0\r\n\r\n", Refused::Version),
            (b"GET / HTTP/1.1\r\nHost x\r\n\r\n", Refused::Malformed),
            (b"GET /<> HTTP/1.1\r\nHost: x\r\n\r\n", Refused::Malformed),
        ];
        for (text, why) in refused {
            assert_eq!(framing(text), Err(why), "{}", String::from_utf8_lossy(text));
            // Refused, every byte stays (one `http` refuses is put back).
            assert_eq!(&parse(text).1[..], text);
        }
        assert_eq!(Refused::Coding.status(), StatusCode::NOT_IMPLEMENTED);
        assert_eq!(
            Refused::Version.status(),
            StatusCode::HTTP_VERSION_NOT_SUPPORTED
        );
    }

    #[test]
    fn a_head_past_the_limit_is_too_large_whole_or_not() {
        let head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: aaaaaaaaaaaaaaaaaaaa\r\n\r\n";
        let at = |limit: usize, bytes: &[u8]| {
            let mut buf = BytesMut::from(bytes);
            parse_request(&mut buf, limit, || ())
        };
        let too_large = |p: Parsed<()>| matches!(p, Parsed::Refused(Refused::HeadTooLarge));
        assert!(matches!(at(head.len(), head), Parsed::Request(..)));
        assert!(too_large(at(head.len() - 1, head)));
        assert!(too_large(at(20, &head[..30])));
        assert!(matches!(at(30, &head[..30]), Parsed::Partial));
    }

    fn head(text: &str) -> ResponseHead {
        let mut buf = BytesMut::from(text.as_bytes());
        parse_response(&mut buf)
            .expect("parses")
            .expect("whole head")
    }

    #[test]
    fn a_head_keeps_its_header_order_and_an_unusual_reason() {
        let h = head("HTTP/1.1 200 Fine\r\nSet-Cookie: a=1\r\nX-A: b\r\nSet-Cookie: c=2\r\n\r\n");
        let cookies: Vec<_> = h.headers.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "c=2"]);
        assert_eq!(h.reason.as_ref().map(|r| r.as_bytes()), Some(&b"Fine"[..]));
        assert!(head("HTTP/1.1 200 OK\r\n\r\n").reason.is_none());
        let mut partial = BytesMut::from(&b"HTTP/1.1 200 OK\r\nX-A: b\r\n"[..]);
        assert!(matches!(parse_response(&mut partial), Ok(None)));
        let mut bad = BytesMut::from(&b"HTTP/1.1 200 OK\r\nX-A: b\x01\r\n\r\n"[..]);
        assert!(parse_response(&mut bad).is_err());
    }
}
