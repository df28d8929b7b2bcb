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
