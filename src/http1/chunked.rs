//! The chunked body reader (RFC 9112 section 7.1), step by step over what has been
//! read: data as it comes, extensions skipped and trailers read and dropped, both
//! bounded; only CRLF ends a line.
//!
//! `httparse::parse_chunk_size` is not used: it refuses a size of more than 15
//! digits, leading zeros counted, which is a valid size (hyper and nginx read
//! `0000000000000000005` as 5), and it reads only whole size lines.

use super::framing::Error;
use bytes::{Buf, Bytes, BytesMut};

/// Most bytes of chunk extensions and trailers together in one body (hyper's limit
/// on extensions).
pub const MAX_CHUNK_META: usize = 16 * 1024;

/// Where a chunked body's decoding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// Reading the size's hex digits (`digits` read so far, zeros included).
    Size {
        n: u64,
        digits: u32,
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

impl Chunk {
    /// Before the first size line.
    pub const START: Chunk = Chunk::Size { n: 0, digits: 0 };
}

/// What one step of chunked decoding gave.
#[derive(Debug, PartialEq)]
pub enum Step {
    Data(Bytes),
    /// Needs more bytes.
    More,
    /// The last chunk and the trailers are read.
    End,
}

/// Decodes from the front of `buf` until it has data to give, needs more bytes,
/// or the body has ended; `meta` counts extension and trailer bytes.
pub fn step(state: &mut Chunk, buf: &mut BytesMut, meta: &mut usize) -> Result<Step, Error> {
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
                // Too large only when a significant digit would be shifted out.
                if n >> 60 != 0 {
                    return Err("chunk size too large".into());
                }
                let v = (b as char).to_digit(16).unwrap_or(0) as u64;
                Chunk::Size {
                    n: n << 4 | v,
                    digits: digits.saturating_add(1),
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
            (Chunk::DataLf, b'\n') => Chunk::START,
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

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn decode(input: &[u8]) -> Result<(Vec<u8>, bool), Error> {
        let mut state = Chunk::START;
        let mut buf = BytesMut::from(input);
        let mut meta = 0;
        let mut out = Vec::new();
        loop {
            match step(&mut state, &mut buf, &mut meta)? {
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
    fn leading_zeros_are_a_size_like_any_other() {
        assert_eq!(
            decode(b"0000000000000000005\r\nhello\r\n00000000000000000000\r\n\r\n").ok(),
            Some((b"hello".to_vec(), true))
        );
        assert_eq!(
            decode(b"000FFFFFFFFFFFFFFFF\r\n").ok(),
            Some((Vec::new(), false)),
            "sixteen significant digits fit"
        );
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
}
