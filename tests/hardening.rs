//! The edges of the front door, byte for byte: request smuggling, HTTP strictness,
//! forwarded headers from untrusted peers, and the rule that a worker connection is
//! reused only when the request was sent whole and the response read whole.
//!
//! Each case sends raw bytes to corral in front of a raw worker that records exactly
//! what it received (`support::RawWorker`).

mod support;

use std::io::{BufReader, Write};
use std::thread;
use std::time::Duration;
use support::{exchange, read_reply, Corral, Mode, RawWorker, TempDir};

fn corral_for(worker: &RawWorker, extra: &str) -> Corral {
    Corral::start(&format!("upstreams = [\"{}\"]\n{extra}", worker.addr))
}

/// corral with basic auth, `/health` exempt.
fn with_auth(worker: &RawWorker) -> (Corral, TempDir) {
    let dir = TempDir::new("auth");
    let file = support::htpasswd(&dir, "admin", "secret");
    let c = corral_for(
        worker,
        &format!(
            "[auth]\nhtpasswd = \"{}\"\nexempt = [\"/health\"]\n",
            support::path_str(&file)
        ),
    );
    (c, dir)
}

const UPGRADE_WITH_BODY: &str = "GET /health HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nContent-Length: 144\r\n\r\n";
const SMUGGLED: &str = "POST /health HTTP/1.1\r\nHost: localhost\r\nContent-Length: 40\r\n\r\nGET /admin HTTP/1.1\r\nHost: localhost\r\n\r\n";

/// The reported hole: an upgrade request whose body corral did not send left the
/// worker waiting for it, and the next request on that worker connection was cut
/// so that an unchecked `GET /admin` ran behind basic auth.
#[test]
fn upgrade_with_a_body_smuggles_nothing() {
    // Like gunicorn + Flask: the answer goes out before the body is read.
    let worker = RawWorker::start(Mode::AnswerEarly);
    let (corral, _dir) = with_auth(&worker);
    let denied = exchange(
        corral.addr,
        b"GET /admin HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .expect("reply");
    assert_eq!(denied.status, 401);
    for _ in 0..3 {
        let mut a = UPGRADE_WITH_BODY.as_bytes().to_vec();
        a.extend(std::iter::repeat_n(b'A', 144));
        let first = exchange(corral.addr, &a);
        let second = exchange(corral.addr, SMUGGLED.as_bytes()).expect("reply to B");
        assert!(
            first.is_none_or(|r| r.status != 101),
            "the upgrade did not happen"
        );
        assert!(
            !second.text().contains("GET /admin") || second.status == 200,
            "{second:?}"
        );
    }
    // Give any smuggled request time to arrive.
    thread::sleep(Duration::from_millis(300));
    assert!(
        worker.seen_for("/admin").is_empty(),
        "a request corral never checked reached the worker: {:?}",
        worker.seen()
    );
    for s in worker.seen() {
        assert!(!s.aborted || s.target() == "/health", "{s:?}");
    }
}

/// The invariant behind it: a worker that answers before it has read the body
/// leaves its connection mid-request, and the next request must not be sent on it.
#[test]
fn connection_mid_request_is_not_reused() {
    let worker = RawWorker::start(Mode::AnswerEarly);
    let corral = corral_for(&worker, "");
    // Head and half the body; the rest only after the answer has been read.
    let mut first = corral.connect();
    first
        .write_all(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n12345")
        .expect("write");
    let mut r1 = BufReader::new(first.try_clone().expect("clone"));
    let early = read_reply(&mut r1).expect("early answer");
    assert_eq!(early.status, 200);
    assert_eq!(early.body, b"early");
    // Another client now: its request must start a request of its own at the
    // worker, not be read as the rest of the first one's body.
    let next = exchange(
        corral.addr,
        b"POST /next HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nxyz",
    )
    .expect("reply");
    assert_eq!(next.status, 200, "{next:?}");
    assert!(
        worker.wait_for(|s| s.iter().any(|s| s.target() == "/next")),
        "{:?}",
        worker.seen()
    );
    first.write_all(b"67890").expect("rest of the body");
    assert!(
        worker.wait_for(|s| s
            .iter()
            .any(|s| s.target() == "/upload" && s.body == b"1234567890")),
        "{:?}",
        worker.seen()
    );
    drop(first);
}
