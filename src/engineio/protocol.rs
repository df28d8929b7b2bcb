//! Engine.IO protocol knowledge: what a request on the Engine.IO path is (handshake,
//! polling or websocket, which session), and how to read the session id out of a
//! worker's handshake response in EIO=4 and EIO=3 framings.
//!
//! Pure functions over bytes and strings; no I/O and no state. It must not decide
//! routing: that is the router's job.

use std::time::Duration;

/// What a request on the Engine.IO path asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EioRequest {
    /// The session id, if the client already has one.
    pub sid: Option<String>,
    /// `transport=websocket` (as opposed to polling).
    pub websocket: bool,
}

/// Reads `sid` and `transport` from a query string, keys and values percent-decoded,
/// the first non-empty value of each taken, as python-engineio (`parse_qs(...)[0]`)
/// does: corral and the worker must agree on which session a request names.
pub fn classify(query: Option<&str>) -> EioRequest {
    let mut sid = None;
    let mut transport = None;
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        if value.is_empty() {
            continue;
        }
        match &*key {
            "sid" if sid.is_none() => sid = Some(value.into_owned()),
            "transport" if transport.is_none() => transport = Some(value == "websocket"),
            _ => {}
        }
    }
    EioRequest {
        sid,
        websocket: transport.unwrap_or(false),
    }
}

/// What a worker's handshake told us.
#[derive(Debug, Clone, PartialEq)]
pub struct Handshake {
    pub sid: String,
    /// pingInterval + pingTimeout, when the worker said them.
    pub liveness: Option<Duration>,
}

/// Outcome of looking at the first bytes of a handshake response.
#[derive(Debug, PartialEq)]
pub enum Parse {
    Found(Handshake),
    /// Not enough bytes yet to decide.
    NeedMore,
    /// This is not a handshake we can read (an error page, say).
    NotHandshake,
}

/// Finds the open packet (`0{...}`) at the start of a polling payload, in any of the
/// framings a worker uses: EIO=4 (`0{...}` then `\x1e`-separated packets), EIO=3 text
/// (`97:0{...}2:40`) and EIO=3 binary (`\x00 9 7 \xff 0{...}`).
pub fn parse_handshake(buf: &[u8]) -> Parse {
    let start = match open_packet_start(buf) {
        Ok(i) => i,
        Err(p) => return p,
    };
    let mut stream = serde_json::Deserializer::from_slice(&buf[start..]).into_iter::<OpenPacket>();
    match stream.next() {
        Some(Ok(open)) if !open.sid.is_empty() => {
            let liveness = match (open.ping_interval, open.ping_timeout) {
                (Some(i), Some(t)) => Some(Duration::from_millis(i.saturating_add(t))),
                _ => None,
            };
            Parse::Found(Handshake {
                sid: open.sid,
                liveness,
            })
        }
        Some(Err(e)) if e.is_eof() => Parse::NeedMore,
        None => Parse::NeedMore,
        _ => Parse::NotHandshake,
    }
}

/// Index of the `{` that starts the open packet's JSON, skipping the framing prefix.
fn open_packet_start(buf: &[u8]) -> Result<usize, Parse> {
    let mut i = 0;
    match buf.first() {
        None => return Err(Parse::NeedMore),
        // EIO=4: the payload starts with the packet type.
        Some(b'0') if buf.get(1).is_none() => return Err(Parse::NeedMore),
        Some(b'0') if buf.get(1) == Some(&b'{') => return Ok(1),
        // EIO=3 binary framing: 0x00 (string), length digits as bytes 0..9, 0xff.
        Some(0) => {
            i = 1;
            while i < buf.len() && buf[i] <= 9 {
                i += 1;
            }
            if i == buf.len() {
                return Err(Parse::NeedMore);
            }
            if buf[i] != 0xff || i == 1 {
                return Err(Parse::NotHandshake);
            }
            i += 1;
        }
        // EIO=3 text framing: decimal length, ':'.
        Some(b'1'..=b'9') => {
            while i < buf.len() && buf[i].is_ascii_digit() {
                i += 1;
            }
            if i == buf.len() {
                return Err(Parse::NeedMore);
            }
            if buf[i] != b':' {
                return Err(Parse::NotHandshake);
            }
            i += 1;
        }
        _ => return Err(Parse::NotHandshake),
    }
    match (buf.get(i), buf.get(i + 1)) {
        (Some(b'0'), Some(b'{')) => Ok(i + 1),
        (None, _) | (Some(b'0'), None) => Err(Parse::NeedMore),
        _ => Err(Parse::NotHandshake),
    }
}

/// The open packet at the start of `buf` with its sid `sid` replaced by `tagged`,
/// framing lengths fixed (EIO=3 text `97:0{…}` and binary `\x00 9 7 \xff 0{…}` count
/// the packet's length; EIO=4 counts nothing), and the rest of `buf` as it was.
/// None when `buf` does not start with that open packet.
pub fn retag_handshake(buf: &[u8], sid: &str, tagged: &str) -> Option<Vec<u8>> {
    let start = open_packet_start(buf).ok()?;
    let quoted = format!("\"{sid}\"");
    let at = start + find(&buf[start..], quoted.as_bytes())?;
    let delta = tagged.len() - sid.len();
    let mut out = Vec::with_capacity(buf.len() + delta + 2);
    // The length prefix of the EIO=3 framings, rewritten.
    match buf[0] {
        0 => {
            let digits = &buf[1..start - 2];
            let len: usize = digits.iter().fold(0, |n, d| n * 10 + *d as usize);
            out.push(0);
            out.extend((len + delta).to_string().bytes().map(|c| c - b'0'));
            out.push(0xff);
        }
        b'1'..=b'9' => {
            let digits = std::str::from_utf8(&buf[..start - 2]).ok()?;
            let len: usize = digits.parse().ok()?;
            out.extend_from_slice(format!("{}:", len + delta).as_bytes());
        }
        _ => {}
    }
    out.extend_from_slice(&buf[start - 1..at]);
    out.push(b'"');
    out.extend_from_slice(tagged.as_bytes());
    out.push(b'"');
    out.extend_from_slice(&buf[at + quoted.len()..]);
    Some(out)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[derive(serde::Deserialize)]
struct OpenPacket {
    sid: String,
    #[serde(rename = "pingInterval")]
    ping_interval: Option<u64>,
    #[serde(rename = "pingTimeout")]
    ping_timeout: Option<u64>,
}

/// The body an Engine.IO server sends for a session it does not know.
pub const UNKNOWN_SID_BODY: &str = r#"{"code":1,"message":"Session ID unknown"}"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshakes_are_retagged_in_every_framing() {
        let open =
            r#"0{"sid":"abc","upgrades":["websocket"],"pingInterval":25000,"pingTimeout":20000}"#;
        let tagged = "abc.TAGTAGTAG";
        let want = open.replace("\"abc\"", &format!("\"{tagged}\""));
        // EIO=4, with a packet after it.
        let eio4 = format!("{open}\x1e40");
        let got = retag_handshake(eio4.as_bytes(), "abc", tagged).expect("eio4");
        assert_eq!(got, format!("{want}\x1e40").into_bytes());
        // EIO=3 text: the length counts the longer packet.
        let eio3 = format!("{}:{open}2:40", open.len());
        let got = retag_handshake(eio3.as_bytes(), "abc", tagged).expect("eio3");
        assert_eq!(got, format!("{}:{want}2:40", want.len()).into_bytes());
        let Parse::Found(hs) = parse_handshake(&got) else {
            panic!("the result parses")
        };
        assert_eq!(hs.sid, tagged);
        // EIO=3 binary: the length is in digit bytes.
        let mut bin = vec![0u8];
        bin.extend(open.len().to_string().bytes().map(|c| c - b'0'));
        bin.push(0xff);
        bin.extend_from_slice(open.as_bytes());
        let got = retag_handshake(&bin, "abc", tagged).expect("binary");
        let mut want_bin = vec![0u8];
        want_bin.extend(want.len().to_string().bytes().map(|c| c - b'0'));
        want_bin.push(0xff);
        want_bin.extend_from_slice(want.as_bytes());
        assert_eq!(got, want_bin);
        // Split across reads: nothing is found until the open packet is whole.
        for cut in 1..eio3.len() {
            if let Parse::Found(_) = parse_handshake(&eio3.as_bytes()[..cut]) {
                assert!(cut > eio3.find('}').expect("brace"));
            }
        }
        assert_eq!(retag_handshake(b"<html>", "abc", tagged), None);
    }

    #[test]
    fn classifies_queries() {
        assert_eq!(
            classify(Some("EIO=4&transport=polling&t=Nx1")),
            EioRequest {
                sid: None,
                websocket: false
            }
        );
        assert_eq!(
            classify(Some("EIO=4&transport=websocket&sid=ab%2Dc_d")),
            EioRequest {
                sid: Some("ab-c_d".into()),
                websocket: true
            }
        );
        assert_eq!(classify(Some("sid=")).sid, None);
        assert_eq!(classify(None).sid, None);
        assert_eq!(classify(Some("sid=%zz%")).sid.as_deref(), Some("%zz%"));
        // Twice: the first counts, as in python-engineio; an empty one is skipped.
        assert_eq!(classify(Some("sid=a&sid=b")).sid.as_deref(), Some("a"));
        assert_eq!(classify(Some("sid=&sid=b")).sid.as_deref(), Some("b"));
        // A percent-encoded key is the same key.
        assert_eq!(classify(Some("%73id=x")).sid.as_deref(), Some("x"));
        assert!(classify(Some("transport=websocket&transport=polling")).websocket);
    }

    #[test]
    fn eio4_handshake() {
        let body = br#"0{"sid":"lv_VI97HAXpY6yYWAAAC","upgrades":["websocket"],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}"#;
        assert_eq!(
            parse_handshake(body),
            Parse::Found(Handshake {
                sid: "lv_VI97HAXpY6yYWAAAC".into(),
                liveness: Some(Duration::from_secs(45))
            })
        );
        // Split anywhere, a prefix asks for more.
        for cut in 0..body.len() - 1 {
            assert_eq!(parse_handshake(&body[..cut]), Parse::NeedMore, "cut {cut}");
        }
    }

    #[test]
    fn eio4_handshake_followed_by_packets() {
        let body = b"0{\"sid\":\"abc\",\"pingInterval\":1,\"pingTimeout\":2}\x1e40{\"sid\":\"x\"}";
        assert!(matches!(parse_handshake(body), Parse::Found(h) if h.sid == "abc"));
    }

    #[test]
    fn eio3_text_handshake() {
        let body = br#"96:0{"sid":"ZgTjd1lH_dh6F8T2AAAA","upgrades":["websocket"],"pingInterval":25000,"pingTimeout":5000}2:40"#;
        assert!(matches!(parse_handshake(body),
            Parse::Found(h) if h.sid == "ZgTjd1lH_dh6F8T2AAAA" && h.liveness == Some(Duration::from_secs(30))));
        assert_eq!(parse_handshake(b"96"), Parse::NeedMore);
        assert_eq!(parse_handshake(b"96:"), Parse::NeedMore);
    }

    #[test]
    fn eio3_binary_handshake() {
        let mut body = vec![0u8, 4, 5, 0xff];
        body.extend_from_slice(
            br#"0{"sid":"bin","upgrades":[],"pingInterval":25000,"pingTimeout":5000}"#,
        );
        body.extend_from_slice(&[0, 2, 0xff]);
        body.extend_from_slice(b"40");
        assert!(matches!(parse_handshake(&body), Parse::Found(h) if h.sid == "bin"));
    }

    #[test]
    fn not_handshakes() {
        assert_eq!(parse_handshake(b"<html>"), Parse::NotHandshake);
        assert_eq!(
            parse_handshake(b"\"The client is using"),
            Parse::NotHandshake
        );
        assert_eq!(parse_handshake(br#"0{"nosid":1}"#), Parse::NotHandshake);
        assert_eq!(parse_handshake(br#"0{"sid":""}"#), Parse::NotHandshake);
        assert_eq!(parse_handshake(b"12x"), Parse::NotHandshake);
        assert_eq!(parse_handshake(b"3:40"), Parse::NotHandshake);
    }
}
