//! RESP: reading client commands (multibulk and inline, as Redis reads them, with the
//! same protocol errors) and writing replies in RESP2 or RESP3.
//!
//! Pure byte handling; no I/O and no state beyond the buffer it is given.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Longest inline command, and longest count line, as Redis's PROTO_INLINE_MAX_SIZE.
pub const INLINE_MAX: usize = 64 * 1024;
/// Limits before AUTH when a password is required (Redis's own numbers).
const UNAUTH_MULTIBULK: i64 = 10;
const UNAUTH_BULK: i64 = 16384;

/// Bounds on what one command may make the broker hold.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    /// Largest bulk string.
    pub max_bulk: i64,
    /// Most arguments.
    pub max_args: i64,
    /// Most bytes of one command, all its arguments together.
    pub max_command: u64,
    /// Before authentication, Redis allows only tiny commands.
    pub unauthenticated: bool,
}

/// A protocol error: the reply is `-ERR Protocol error: <text>` and the connection
/// is closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub String);

/// Reads commands off one connection's buffer. A multibulk command that arrives in
/// pieces is parsed once: what was parsed is remembered between reads, so a command
/// trickled a few arguments per packet costs what it costs in one piece.
#[derive(Debug, Default)]
pub struct Parser {
    partial: Option<Partial>,
    /// Bytes looked at, for the tests that check the work stays linear.
    scanned: u64,
}

/// A multibulk command read in part; its bytes stay at the front of the buffer.
#[derive(Debug)]
struct Partial {
    /// Arguments still to come.
    left: i64,
    /// Where the next argument starts.
    pos: usize,
    /// Where each argument read so far lies.
    spans: Vec<(usize, usize)>,
    /// Bytes the command has declared so far.
    size: u64,
}

impl Parser {
    /// Takes one command off the front of `buf`. `Ok(None)`: more bytes needed. An
    /// empty argument list (an empty inline line, `*0`, `*-1`) is returned as an
    /// empty Vec and should be skipped.
    pub fn next(
        &mut self,
        buf: &mut BytesMut,
        caps: Caps,
    ) -> Result<Option<Vec<Bytes>>, ProtocolError> {
        if self.partial.is_none() {
            match buf.first() {
                None => return Ok(None),
                Some(b'*') => {}
                Some(_) => return parse_inline(buf),
            }
            let Some(end) = find_crlf(buf, 1) else {
                if buf.len() > INLINE_MAX {
                    return Err(err("too big mbulk count string"));
                }
                return Ok(None);
            };
            self.scanned += end as u64 + 2;
            let count = parse_int(&buf[1..end])
                .filter(|n| *n <= i32::MAX as i64)
                .ok_or_else(|| err("invalid multibulk length"))?;
            if caps.unauthenticated && count > UNAUTH_MULTIBULK {
                return Err(err("unauthenticated multibulk length"));
            }
            if count > caps.max_args {
                return Err(err("invalid multibulk length"));
            }
            if count <= 0 {
                buf.advance(end + 2);
                return Ok(Some(Vec::new()));
            }
            self.partial = Some(Partial {
                left: count,
                pos: end + 2,
                spans: Vec::with_capacity(count.min(1024) as usize),
                size: 0,
            });
        }
        let done = self.resume(buf, caps);
        if !matches!(done, Ok(None)) {
            self.partial = None;
        }
        done
    }

    fn resume(
        &mut self,
        buf: &mut BytesMut,
        caps: Caps,
    ) -> Result<Option<Vec<Bytes>>, ProtocolError> {
        let Some(p) = self.partial.as_mut() else {
            return Ok(None);
        };
        while p.left > 0 {
            let pos = p.pos;
            let Some(&first) = buf.get(pos) else {
                return Ok(None);
            };
            if first != b'$' {
                return Err(ProtocolError(format!(
                    "expected '$', got '{}'",
                    first as char
                )));
            }
            // A count line is short: a longer one is refused before it is scanned
            // again and again.
            let window = &buf[pos..buf.len().min(pos + BULK_COUNT_MAX)];
            let Some(line_end) = find_crlf(window, 0).map(|e| e + pos) else {
                if buf.len() - pos >= BULK_COUNT_MAX {
                    return Err(err("too big bulk count string"));
                }
                return Ok(None);
            };
            let len = parse_int(&buf[pos + 1..line_end])
                .filter(|n| *n >= 0 && *n <= caps.max_bulk)
                .ok_or_else(|| err("invalid bulk length"))?;
            if caps.unauthenticated && len > UNAUTH_BULK {
                return Err(err("unauthenticated bulk length"));
            }
            if p.size + len as u64 > caps.max_command {
                return Err(ProtocolError(format!(
                    "command larger than {} bytes",
                    caps.max_command
                )));
            }
            let start = line_end + 2;
            let stop = start + len as usize;
            // Redis skips the two bytes after the data without checking them.
            if buf.len() < stop + 2 {
                return Ok(None);
            }
            self.scanned += (stop + 2 - pos) as u64;
            p.size += len as u64;
            p.spans.push((start, stop));
            p.pos = stop + 2;
            p.left -= 1;
        }
        let frozen = buf.split_to(p.pos).freeze();
        let spans = std::mem::take(&mut p.spans);
        Ok(Some(
            spans.into_iter().map(|(a, b)| frozen.slice(a..b)).collect(),
        ))
    }

    #[cfg(test)]
    /// Bytes looked at so far.
    pub fn scanned(&self) -> u64 {
        self.scanned
    }
}

/// Longest `$<len>\r\n` line read: 512 MB needs 9 digits.
const BULK_COUNT_MAX: usize = 32;

/// One command off a buffer with a parser of its own (for a whole buffer).
pub fn parse(buf: &mut BytesMut, caps: Caps) -> Result<Option<Vec<Bytes>>, ProtocolError> {
    Parser::default().next(buf, caps)
}

fn err(s: &str) -> ProtocolError {
    ProtocolError(s.to_string())
}

fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    buf[from..]
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|p| p + from)
}

fn parse_int(s: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(s).ok()?;
    if text.is_empty() || text.starts_with('+') || (text.len() > 1 && text.starts_with("0")) {
        return if text == "0" { Some(0) } else { None };
    }
    text.parse().ok()
}

fn parse_inline(buf: &mut BytesMut) -> Result<Option<Vec<Bytes>>, ProtocolError> {
    let Some(nl) = buf.iter().position(|b| *b == b'\n') else {
        if buf.len() > INLINE_MAX {
            return Err(err("too big inline request"));
        }
        return Ok(None);
    };
    let line = buf.split_to(nl + 1);
    let mut text = &line[..nl];
    if text.last() == Some(&b'\r') {
        text = &text[..text.len() - 1];
    }
    split_args(text)
        .map(|args| Some(args.into_iter().map(Bytes::from).collect()))
        .ok_or_else(|| err("unbalanced quotes in request"))
}

/// Splits an inline command as Redis's sdssplitargs does: spaces separate, double
/// quotes take `\n \r \t \b \a \\ \" \xHH`, single quotes take only `\'`; a closing
/// quote must be followed by a space or the end.
pub fn split_args(line: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut args = Vec::new();
    let mut i = 0;
    let n = line.len();
    loop {
        while i < n && line[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= n {
            return Some(args);
        }
        let mut cur = Vec::new();
        let (mut in_dq, mut in_sq) = (false, false);
        loop {
            if in_dq {
                if i >= n {
                    return None;
                }
                if line[i] == b'\\' && i + 3 < n && line[i + 1] == b'x' {
                    if let (Some(h), Some(l)) = (hex(line[i + 2]), hex(line[i + 3])) {
                        cur.push(h * 16 + l);
                        i += 4;
                        continue;
                    }
                }
                if line[i] == b'\\' && i + 1 < n {
                    cur.push(match line[i + 1] {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 8,
                        b'a' => 7,
                        c => c,
                    });
                    i += 2;
                    continue;
                }
                if line[i] == b'"' {
                    if i + 1 < n && !line[i + 1].is_ascii_whitespace() {
                        return None;
                    }
                    i += 1;
                    break;
                }
                cur.push(line[i]);
                i += 1;
            } else if in_sq {
                if i >= n {
                    return None;
                }
                if line[i] == b'\\' && i + 1 < n && line[i + 1] == b'\'' {
                    cur.push(b'\'');
                    i += 2;
                    continue;
                }
                if line[i] == b'\'' {
                    if i + 1 < n && !line[i + 1].is_ascii_whitespace() {
                        return None;
                    }
                    i += 1;
                    break;
                }
                cur.push(line[i]);
                i += 1;
            } else {
                if i >= n || line[i].is_ascii_whitespace() {
                    break;
                }
                match line[i] {
                    b'"' => in_dq = true,
                    b'\'' => in_sq = true,
                    c => cur.push(c),
                }
                i += 1;
            }
        }
        args.push(cur);
    }
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Builds replies for one protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Out {
    pub resp3: bool,
}

impl Out {
    pub fn simple(self, b: &mut BytesMut, s: &str) {
        b.put_u8(b'+');
        b.put_slice(s.as_bytes());
        b.put_slice(b"\r\n");
    }
    pub fn error(self, b: &mut BytesMut, s: &str) {
        b.put_u8(b'-');
        b.put_slice(s.as_bytes());
        b.put_slice(b"\r\n");
    }
    pub fn int(self, b: &mut BytesMut, n: i64) {
        b.put_u8(b':');
        b.put_slice(n.to_string().as_bytes());
        b.put_slice(b"\r\n");
    }
    pub fn bulk(self, b: &mut BytesMut, s: &[u8]) {
        b.put_u8(b'$');
        b.put_slice(s.len().to_string().as_bytes());
        b.put_slice(b"\r\n");
        b.put_slice(s);
        b.put_slice(b"\r\n");
    }
    pub fn null(self, b: &mut BytesMut) {
        b.put_slice(if self.resp3 { b"_\r\n" } else { b"$-1\r\n" });
    }
    pub fn array(self, b: &mut BytesMut, n: usize) {
        b.put_u8(b'*');
        b.put_slice(n.to_string().as_bytes());
        b.put_slice(b"\r\n");
    }
    /// A map of `n` pairs: `%n` in RESP3, a flat array of 2n in RESP2.
    pub fn map(self, b: &mut BytesMut, n: usize) {
        if self.resp3 {
            b.put_u8(b'%');
            b.put_slice(n.to_string().as_bytes());
            b.put_slice(b"\r\n");
        } else {
            self.array(b, n * 2);
        }
    }
    /// An out-of-band message: `>n` in RESP3, an array in RESP2.
    pub fn push(self, b: &mut BytesMut, n: usize) {
        if self.resp3 {
            b.put_u8(b'>');
            b.put_slice(n.to_string().as_bytes());
            b.put_slice(b"\r\n");
        } else {
            self.array(b, n);
        }
    }
    pub fn verbatim(self, b: &mut BytesMut, s: &[u8]) {
        if self.resp3 {
            b.put_u8(b'=');
            b.put_slice((s.len() + 4).to_string().as_bytes());
            b.put_slice(b"\r\ntxt:");
            b.put_slice(s);
            b.put_slice(b"\r\n");
        } else {
            self.bulk(b, s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN: Caps = Caps {
        max_bulk: 1 << 20,
        max_args: 1024,
        max_command: 4 << 20,
        unauthenticated: false,
    };

    fn one(input: &[u8]) -> Result<Option<Vec<Bytes>>, ProtocolError> {
        parse(&mut BytesMut::from(input), OPEN)
    }

    #[test]
    fn multibulk_whole_and_split() {
        let cmd = b"*2\r\n$4\r\nECHO\r\n$5\r\nhello\r\n";
        assert_eq!(
            one(cmd),
            Ok(Some(vec![Bytes::from("ECHO"), Bytes::from("hello")]))
        );
        for cut in 0..cmd.len() {
            assert_eq!(one(&cmd[..cut]), Ok(None), "cut {cut}");
        }
        // Pipelined: two commands in one buffer.
        let mut buf = BytesMut::from(&b"*1\r\n$4\r\nPING\r\nPING\r\n"[..]);
        assert!(parse(&mut buf, OPEN).expect("ok").is_some());
        assert_eq!(parse(&mut buf, OPEN), Ok(Some(vec![Bytes::from("PING")])));
        assert!(buf.is_empty());
    }

    #[test]
    fn protocol_errors_match_redis() {
        assert_eq!(one(b"*x\r\n"), Err(err("invalid multibulk length")));
        assert_eq!(one(b"*2\r\nfoo\r\n"), Err(err("expected '$', got 'f'")));
        assert_eq!(one(b"*1\r\n$x\r\n"), Err(err("invalid bulk length")));
        assert_eq!(one(b"*1\r\n$-5\r\n"), Err(err("invalid bulk length")));
        assert_eq!(one(b"*1\r\n$2000000\r\n"), Err(err("invalid bulk length")));
        assert_eq!(one(b"*5000\r\n"), Err(err("invalid multibulk length")));
        assert_eq!(
            one(&[b'A'; INLINE_MAX + 1]),
            Err(err("too big inline request"))
        );
        assert_eq!(
            one(b"PING \"a\r\n"),
            Err(err("unbalanced quotes in request"))
        );
        let unauth = Caps {
            unauthenticated: true,
            ..OPEN
        };
        assert_eq!(
            parse(&mut BytesMut::from(&b"*11\r\n"[..]), unauth),
            Err(err("unauthenticated multibulk length"))
        );
        assert_eq!(
            parse(&mut BytesMut::from(&b"*1\r\n$16385\r\n"[..]), unauth),
            Err(err("unauthenticated bulk length"))
        );
    }

    #[test]
    fn a_trickled_command_is_parsed_once() {
        let n = 16_000;
        let mut cmd = format!("*{n}\r\n").into_bytes();
        for i in 0..n {
            let arg = format!("a{i}");
            cmd.extend_from_slice(format!("${}\r\n{arg}\r\n", arg.len()).as_bytes());
        }
        let caps = Caps {
            max_args: 1 << 20,
            ..OPEN
        };
        let mut parser = Parser::default();
        let mut buf = BytesMut::new();
        let mut got = None;
        // About ten arguments per read, as the reported slow case sent them.
        for piece in cmd.chunks(100) {
            buf.extend_from_slice(piece);
            if let Some(args) = parser.next(&mut buf, caps).expect("valid") {
                got = Some(args);
            }
        }
        let args = got.expect("whole command");
        assert_eq!(args.len(), n);
        assert_eq!(&args[n - 1][..], format!("a{}", n - 1).as_bytes());
        assert!(buf.is_empty());
        // Parsing from the start on every read looked at ~1000x the command.
        assert!(
            parser.scanned() <= 2 * cmd.len() as u64,
            "{} bytes looked at for a {}-byte command",
            parser.scanned(),
            cmd.len()
        );
    }

    #[test]
    fn a_command_is_bounded_in_total_size() {
        let caps = Caps {
            max_bulk: 100,
            max_command: 250,
            ..OPEN
        };
        let mut buf = BytesMut::from(&b"*3\r\n$100\r\n"[..]);
        buf.extend_from_slice(&[b'x'; 100]);
        buf.extend_from_slice(b"\r\n$100\r\n");
        buf.extend_from_slice(&[b'x'; 100]);
        buf.extend_from_slice(b"\r\n$100\r\n");
        assert_eq!(
            parse(&mut buf, caps),
            Err(err("command larger than 250 bytes"))
        );
        assert_eq!(
            parse(
                &mut BytesMut::from(&b"*1\r\n$123456789012345678901234567890123\r\n"[..]),
                OPEN
            ),
            Err(err("too big bulk count string"))
        );
    }

    #[test]
    fn inline_quoting() {
        assert_eq!(
            split_args(br#"ECHO "a\x41\n b" 'c\'d' e"#),
            Some(vec![
                b"ECHO".to_vec(),
                b"aA\n b".to_vec(),
                b"c'd".to_vec(),
                b"e".to_vec()
            ])
        );
        assert_eq!(split_args(b"ECHO 'it''s'"), None);
        assert_eq!(split_args(b"   "), Some(vec![]));
        assert_eq!(one(b"\r\n"), Ok(Some(vec![])));
    }
}
