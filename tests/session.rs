//! The client session's own timeouts and exchanges (`edge::h1`), at the socket: a
//! body that stops coming (`timeouts.body_read`: 408), a kept-alive connection left
//! idle (`timeouts.keepalive`) beside a head begun (`timeouts.header_read`), and
//! `Expect: 100-continue` answered when the request path asks for the body.

mod support;

use std::io::{BufReader, Read, Write};
use std::time::{Duration, Instant};
use support::{read_reply, Corral, Mode, RawWorker};

fn corral_for(worker: &RawWorker, timeouts: &str) -> Corral {
    Corral::start(&format!(
        "threads = 1\nupstreams = [\"{}\"]\n[engineio]\nsticky = false\n[timeouts]\n{timeouts}\n",
        worker.addr
    ))
}

/// A body that sends a part and then nothing is answered 408 once `body_read`
/// passes, and no complete request reaches the worker.
#[test]
fn a_body_that_stops_coming_gets_408() {
    let worker = RawWorker::start(Mode::Echo);
    let corral = corral_for(&worker, "body_read = \"300ms\"");
    let mut s = corral.connect();
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(b"POST /slow HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n123")
        .expect("write");
    let started = Instant::now();
    let mut r = BufReader::new(s);
    let reply = read_reply(&mut r).expect("an answer");
    assert_eq!(reply.status, 408, "{reply:?}");
    assert_eq!(reply.header("connection"), Some("close"), "{reply:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    for seen in worker.seen_for("/slow") {
        assert!(seen.aborted, "{seen:?}");
    }
}

/// A kept-alive connection with no request begun is closed after `keepalive`; a
/// head begun has `header_read` from its first byte, so a slow one still gets in.
#[test]
fn an_idle_connection_closes_after_keepalive_and_a_begun_head_gets_header_read() {
    let worker = RawWorker::start(Mode::Echo);
    let corral = corral_for(&worker, "keepalive = \"300ms\"\nheader_read = \"5s\"");
    let mut s = corral.connect();
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n")
        .expect("write");
    let mut r = BufReader::new(s.try_clone().expect("clone"));
    assert_eq!(read_reply(&mut r).map(|r| r.status), Some(200));
    // The next head begins within the keep-alive time, then crawls past it.
    s.write_all(b"GET /two HTTP/1.1\r\n").expect("write");
    std::thread::sleep(Duration::from_millis(600));
    s.write_all(b"Host: a\r\n\r\n").expect("write");
    assert_eq!(read_reply(&mut r).map(|r| r.status), Some(200));
    // Then nothing: closed after the keep-alive time.
    let started = Instant::now();
    let mut rest = Vec::new();
    let ended = r.read_to_end(&mut rest);
    assert!(ended.is_ok() && rest.is_empty(), "{ended:?} {rest:?}");
    assert!(started.elapsed() < Duration::from_secs(4));
}

/// `Expect: 100-continue`: the client is told to go on before it sends the body,
/// and the body reaches the worker whole.
#[test]
fn expect_100_continue_is_answered_before_the_body_comes() {
    let worker = RawWorker::start(Mode::Echo);
    let corral = corral_for(&worker, "");
    let mut s = corral.connect();
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(
        b"PUT /up HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
    )
    .expect("write");
    let mut got = [0u8; 25];
    s.read_exact(&mut got)
        .expect("100 Continue before the body");
    assert_eq!(&got, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(b"hello").expect("body");
    let mut r = BufReader::new(s);
    assert_eq!(read_reply(&mut r).map(|r| r.status), Some(200));
    let seen = worker.seen_for("/up");
    assert_eq!(seen.last().map(|s| s.body.as_slice()), Some(&b"hello"[..]));
}
