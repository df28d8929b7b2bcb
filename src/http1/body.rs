//! Reading a request body off what was read from its connection, by the framing its
//! head gave (`head::BodyFraming`): the client session's reader (`edge::h1`) and the
//! fuzz targets' are this one.

use super::chunked::{self, Chunk, Step};
use super::framing::Error;
use super::head::BodyFraming;
use bytes::{Bytes, BytesMut};

/// Reads a request body off what was read from its connection, by its framing:
/// the session's reader (`edge::h1`) and the fuzz target's are this one.
#[derive(Debug, Clone, Copy)]
pub enum BodyReader {
    Length(u64),
    Chunk(Chunk, usize),
}

impl BodyReader {
    /// A reader for a body of `framing` (None: there is no body).
    pub fn new(framing: BodyFraming) -> Option<BodyReader> {
        match framing {
            BodyFraming::None => None,
            BodyFraming::Length(n) => Some(BodyReader::Length(n)),
            BodyFraming::Chunked => Some(BodyReader::Chunk(Chunk::START, 0)),
        }
    }

    /// The next piece of the body in `buf` and whether the body ends with it; None
    /// when `buf` holds none of it yet.
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Option<(Bytes, bool)>, Error> {
        match self {
            BodyReader::Length(0) => Ok(Some((Bytes::new(), true))),
            BodyReader::Length(_) if buf.is_empty() => Ok(None),
            BodyReader::Length(rem) => {
                let n = (*rem).min(buf.len() as u64);
                *rem -= n;
                Ok(Some((buf.split_to(n as usize).freeze(), *rem == 0)))
            }
            BodyReader::Chunk(state, meta) => loop {
                return match chunked::step(state, buf, meta)? {
                    Step::Data(d) if d.is_empty() => continue,
                    Step::Data(d) => Ok(Some((d, false))),
                    Step::More => Ok(None),
                    Step::End => Ok(Some((Bytes::new(), true))),
                };
            },
        }
    }
}
