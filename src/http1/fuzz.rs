//! Entry points for the fuzz targets (`fuzz/`): the readers never panic, never give
//! more than the bytes that came, and never lose a byte they do not take.

use super::chunked::{self, Chunk, Step, MAX_CHUNK_META};
use super::framing::response_body;
use super::head::{parse_plain_request, parse_response, Parsed};
use bytes::BytesMut;
use http::{header, Version};

/// A worker's response head and chunked body read from `data`: no panic, no more
/// body than the bytes that came, and an accepted head leaves exactly the bytes
/// after it.
pub fn response(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    if let Ok(Some(head)) = parse_response(&mut buf) {
        assert!(buf.len() < data.len());
        assert_eq!(&buf[..], &data[data.len() - buf.len()..]);
        let _ = response_body(head.status, head.version, &head.headers, false);
        let _ = response_body(head.status, head.version, &head.headers, true);
    }
    let mut buf = BytesMut::from(data);
    let mut state = Chunk::START;
    let mut meta = 0;
    let mut body = 0;
    while let Ok(Step::Data(d)) = chunked::step(&mut state, &mut buf, &mut meta) {
        body += d.len();
    }
    assert!(body <= data.len());
    assert!(meta <= MAX_CHUNK_META + 1);
}

/// A client's bytes never panic the head reader; a request it takes carries
/// nothing that frames a body or asks for an upgrade, and no byte is lost: what it
/// does not take stays in the buffer as it came.
pub fn request(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    match parse_plain_request(&mut buf, 64 << 10, || ()) {
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
        Parsed::Partial | Parsed::Other | Parsed::TooLarge => assert_eq!(&buf[..], data),
    }
}

/// The first request of `data` as corral frames it (`http1`'s rules): its
/// method, target and body, and whether the fast server would take it. None
/// where corral refuses it or it is not all there.
#[derive(Debug, PartialEq, Eq)]
pub struct Framed {
    pub method: String,
    pub target: String,
    pub body: Vec<u8>,
    /// The fast server takes it (no body framing at all).
    pub plain: bool,
}

/// What `http1` makes of the first request in `data` (see [`Framed`]), for the
/// differential target that compares it with hyper's server.
pub fn first_request(data: &[u8]) -> Option<Framed> {
    let mut slots = [httparse::EMPTY_HEADER; super::head::MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let len = match req.parse(data) {
        Ok(httparse::Status::Complete(len)) => len,
        _ => return None,
    };
    let mut headers = http::HeaderMap::new();
    for h in req.headers.iter() {
        let name = http::HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        headers.append(name, http::HeaderValue::from_bytes(h.value).ok()?);
    }
    let plain = {
        let mut buf = BytesMut::from(data);
        matches!(
            parse_plain_request(&mut buf, usize::MAX, || ()),
            Parsed::Plain(..)
        )
    };
    let rest = &data[len..];
    let body = if headers.contains_key(header::TRANSFER_ENCODING) {
        if req.version != Some(1) || !super::framing::only_chunked(&headers) {
            return None;
        }
        let mut buf = BytesMut::from(rest);
        let (mut state, mut meta, mut body) = (Chunk::START, 0, Vec::new());
        loop {
            match chunked::step(&mut state, &mut buf, &mut meta).ok()? {
                Step::Data(d) => body.extend_from_slice(&d),
                Step::More => return None,
                Step::End => break body,
            }
        }
    } else if headers.contains_key(header::CONTENT_LENGTH) {
        let n = usize::try_from(super::content_length(&headers)?).ok()?;
        rest.get(..n)?.to_vec()
    } else {
        Vec::new()
    };
    Some(Framed {
        method: req.method?.to_owned(),
        target: req.path?.to_owned(),
        body,
        plain,
    })
}
