//! Reading message heads with `httparse`: a worker's response head, and a client's
//! request head when it is plain (no body framing, no upgrade, no expectation). A
//! head is split off the buffer it was read into, so its target and header values
//! are slices of it rather than copies, and what follows it stays where it was read.

use super::fields::lists_token;
use super::framing::Error;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri, Version};
use std::mem::MaybeUninit;

/// Most header lines in a head (hyper's limit, both ways).
pub const MAX_HEADERS: usize = 100;
/// Most bytes of a response head (hyper's client limit).
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

/// A response head as read.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    /// A reason phrase other than the status code's usual one, passed on as hyper's
    /// client passes it.
    pub reason: Option<hyper::ext::ReasonPhrase>,
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
    let reason =
        reason.and_then(|(from, to)| hyper::ext::ReasonPhrase::try_from(head.slice(from..to)).ok());
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
    /// A plain request, taken off the buffer; whether the client asked to close.
    Plain(Request<B>, bool),
    /// Not all of a head yet.
    Partial,
    /// A head longer than the limit (whole or not): 431.
    TooLarge,
    /// A head that is not plain, or that cannot be read: not taken.
    Other,
}

/// Takes a plain request head off the front of `buf`, its body `empty()`: an
/// HTTP/1.1 request with no body framing (no Content-Length, Transfer-Encoding),
/// no upgrade, no expectation, not CONNECT. A head past `max_head` bytes is
/// `TooLarge` whatever it holds; any other head is left in `buf` as it came.
pub fn parse_plain_request<B>(
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
        Ok(httparse::Status::Complete(len)) if len > max_head => return Parsed::TooLarge,
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > max_head => return Parsed::TooLarge,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    let mut lines = [Line::default(); MAX_HEADERS];
    let Some(plan) = plan_request(buf, &req, &mut lines) else {
        return Parsed::Other;
    };
    let head = take_head(buf, len);
    match build_request(&head, &plan, &lines[..plan.count], empty()) {
        Some(req) => Parsed::Plain(req, plan.close),
        None => {
            // A name, value or target `http` refuses: not taken, with every byte.
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

/// The plan of `req` (parsed out of `read`) if it is plain; where its header
/// lines lie goes to `lines`.
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
fn build_request<B>(head: &Bytes, plan: &Plan, lines: &[Line], body: B) -> Option<Request<B>> {
    let uri = Uri::from_maybe_shared(head.slice(plan.target.0..plan.target.1)).ok()?;
    // Room for the forwarding headers the proxy adds (four, and Host), so the map
    // does not grow on the way.
    let headers = header_map(head, lines, 5).ok()?;
    let mut request = Request::new(body);
    *request.method_mut() = plan.method.clone();
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    Some(request)
}

/// How many bytes a request head took on the wire, as near as its parsed parts
/// tell (the white space around values and folds are not kept): what hyper's
/// server, which checks its limit only on what its reads hold, is held to.
pub fn request_head_len<B>(req: &Request<B>) -> usize {
    let uri = req.uri();
    let target = uri.path_and_query().map_or(0, |pq| pq.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.scheme_str().map_or(0, |s| s.len() + 3);
    // "METHOD target HTTP/1.1\r\n", each "name: value\r\n", and the last "\r\n".
    let line = req.method().as_str().len() + 1 + target + 1 + 8 + 2;
    let fields: usize = req
        .headers()
        .iter()
        .map(|(n, v)| n.as_str().len() + 2 + v.len() + 2)
        .sum();
    line + fields + 2
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &[u8]) -> (Parsed<()>, BytesMut) {
        let mut buf = BytesMut::from(text);
        let p = parse_plain_request(&mut buf, 64 << 10, || ());
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
            // Every byte stays, for hyper.
            assert_eq!(&rest[..], other);
        }
        let (p, rest) = parse(b"GET / HTTP/1.1\r\nHost: x\r\n");
        assert!(matches!(p, Parsed::Partial));
        assert_eq!(&rest[..], b"GET / HTTP/1.1\r\nHost: x\r\n");
    }

    #[test]
    fn a_head_past_the_limit_is_too_large_whole_or_not() {
        let head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: aaaaaaaaaaaaaaaaaaaa\r\n\r\n";
        let at = |limit: usize, bytes: &[u8]| {
            let mut buf = BytesMut::from(bytes);
            parse_plain_request(&mut buf, limit, || ())
        };
        assert!(matches!(at(head.len(), head), Parsed::Plain(..)));
        assert!(matches!(at(head.len() - 1, head), Parsed::TooLarge));
        assert!(matches!(at(20, &head[..30]), Parsed::TooLarge));
        assert!(matches!(at(30, &head[..30]), Parsed::Partial));
        // Not plain, and too large: too large.
        let post = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n";
        assert!(matches!(at(20, post), Parsed::TooLarge));
    }

    #[test]
    fn a_heads_length_is_counted_from_its_parts() {
        let text = b"GET /a?b HTTP/1.1\r\nHost: x\r\nX-A: 12345\r\n\r\n";
        let (Parsed::Plain(req, _), _) = parse(text) else {
            panic!("not plain");
        };
        assert_eq!(request_head_len(&req), text.len());
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
