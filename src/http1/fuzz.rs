//! Entry points for the fuzz targets (`fuzz/`): the readers never panic, never give
//! more than the bytes that came, and never lose a byte they do not take.

use super::body::BodyReader;
use super::chunked::{self, Chunk, Step, MAX_CHUNK_META};
use super::framing::response_body;
use super::head::{parse_request, parse_response, BodyFraming, Parsed};
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

/// A client's bytes never panic the head reader, and no byte is lost: a head it
/// takes leaves exactly the bytes after it; one it waits on or refuses leaves the
/// buffer as it came. The body reader takes no more than the bytes that came.
pub fn request(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    match parse_request(&mut buf, 64 << 10, || ()) {
        Parsed::Request(req, framing) => {
            assert!(matches!(req.version(), Version::HTTP_11 | Version::HTTP_10));
            assert_eq!(&buf[..], &data[data.len() - buf.len()..]);
            assert!(buf.len() < data.len());
            if framing.body == BodyFraming::Chunked {
                assert!(!req.headers().contains_key(header::CONTENT_LENGTH));
            }
            let left = buf.len();
            let mut taken = 0;
            if let Some(mut reader) = BodyReader::new(framing.body) {
                while let Ok(Some((d, ended))) = reader.next(&mut buf) {
                    taken += d.len();
                    if ended {
                        break;
                    }
                }
            }
            assert!(taken <= left);
        }
        Parsed::Partial | Parsed::Refused(_) => assert_eq!(&buf[..], data),
    }
}

/// The first request of `data` as corral frames it (`http1`'s rules, the ones the
/// client session uses): its method, target and body. None where corral refuses
/// it or it is not all there.
#[derive(Debug, PartialEq, Eq)]
pub struct Framed {
    pub method: String,
    pub target: String,
    pub body: Vec<u8>,
}

/// What `http1` makes of the first request in `data` (see [`Framed`]), for the
/// differential target that compares it with hyper's server.
pub fn first_request(data: &[u8]) -> Option<Framed> {
    let mut buf = BytesMut::from(data);
    let Parsed::Request(req, framing) = parse_request(&mut buf, usize::MAX, || ()) else {
        return None;
    };
    let mut body = Vec::new();
    if let Some(mut reader) = BodyReader::new(framing.body) {
        loop {
            let (d, ended) = reader.next(&mut buf).ok()??;
            body.extend_from_slice(&d);
            if ended {
                break;
            }
        }
    }
    Some(Framed {
        method: req.method().as_str().to_owned(),
        target: req.uri().to_string(),
        body,
    })
}
