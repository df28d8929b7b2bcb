//! The last conformance round's edge cases, on corral's one HTTP/1.1 stack
//! (`edge::h1` serving clients, `transport::http1` to workers), on fresh and on
//! kept-alive connections. Every case found a seam between two copies of one rule
//! when corral had two stacks; `src/http1/` holds each rule once. The answers are
//! nginx's (docs/conformance.md).

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;
use support::{exchange, Corral, Mode, RawWorker};

fn corral_for(worker: &RawWorker, extra: &str) -> Corral {
    Corral::start(&format!(
        "threads = 1\nupstreams = [\"{}\"]\n{extra}\n[engineio]\nsticky = false\n",
        worker.addr
    ))
}

/// corral in front of an echoing worker (a list, as the cases were written for two
/// stacks: now one).
fn served(extra: &str) -> Vec<(&'static str, RawWorker, Corral)> {
    let w = RawWorker::start(Mode::Echo);
    let c = corral_for(&w, extra);
    vec![("corral", w, c)]
}

/// The status of every answer a client reads on one connection for `bytes`, until
/// the proxy closes it, `n` answers have come, or 5 s pass.
fn statuses(addr: SocketAddr, bytes: &[u8], n: usize) -> Vec<u16> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    // A refused head may be answered before all of it is written.
    let _ = s.write_all(bytes);
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    let codes = |got: &[u8]| -> Vec<u16> {
        String::from_utf8_lossy(got)
            .match_indices("HTTP/1.1 ")
            .filter_map(|(i, _)| got.get(i + 9..i + 12))
            .filter_map(|code| std::str::from_utf8(code).ok()?.parse().ok())
            .collect()
    };
    while let Ok(read) = s.read(&mut buf) {
        if read == 0 {
            break;
        }
        got.extend_from_slice(&buf[..read]);
        if codes(&got).len() >= n {
            break;
        }
    }
    codes(&got)
}

/// An absolute-form target without a path reaches the worker with `/` before its
/// query (`encode` wrote `GET ?x=1`).
#[test]
fn a_target_without_a_path_gets_a_slash() {
    for (stack, worker, corral) in served("") {
        let r = exchange(
            corral.addr,
            b"GET http://localhost?x=1 HTTP/1.1\r\nHost: localhost\r\n\r\n",
        );
        assert_eq!(r.map(|r| r.status), Some(200), "{stack}");
        let targets: Vec<String> = worker
            .seen()
            .iter()
            .map(|s| s.target().to_owned())
            .collect();
        assert!(targets.iter().any(|t| t == "/?x=1"), "{stack}: {targets:?}");
    }
}

/// A Connection header naming Host, Cookie or Authorization does not take them
/// off the request; it still takes off an ordinary header it names.
#[test]
fn connection_never_names_away_host_cookie_or_authorization() {
    for (stack, worker, corral) in served("") {
        for (i, named) in ["host", "cookie", "authorization", "Host, x-drop"]
            .iter()
            .enumerate()
        {
            let req = format!(
                "GET /c{i} HTTP/1.1\r\nHost: localhost\r\nCookie: io=1\r\nAuthorization: Bearer t\r\nX-Drop: 1\r\nConnection: {named}\r\n\r\n"
            );
            let r = exchange(corral.addr, req.as_bytes());
            assert_eq!(r.map(|r| r.status), Some(200), "{stack}: {named}");
            let seen = worker.seen_for(&format!("/c{i}"));
            let seen = seen.last().expect("reached the worker");
            assert_eq!(seen.header("host"), Some("localhost"), "{stack}: {named}");
            assert_eq!(seen.header("cookie"), Some("io=1"), "{stack}: {named}");
            assert_eq!(
                seen.header("authorization"),
                Some("Bearer t"),
                "{stack}: {named}"
            );
            assert_eq!(
                seen.header("x-drop").is_some(),
                !named.contains("x-drop"),
                "{stack}: {named}"
            );
        }
    }
}

/// `X-Pad-N` lines adding up to about `bytes`, each a few hundred bytes, so the
/// head stays under hyper's hundred-line limit.
fn padded_head(target: &str, bytes: usize) -> String {
    let line = format!("X-Pad: {}\r\n", "p".repeat(600));
    let n = bytes / line.len() + 1;
    format!(
        "GET {target} HTTP/1.1\r\nHost: localhost\r\n{}\r\n",
        line.repeat(n)
    )
}

/// `limits.max_header` is hard: a head past it gets 431 on a fresh connection and
/// behind a served request on a kept-alive one, one within it is served.
#[test]
fn max_header_is_a_hard_limit_on_every_connection() {
    for (stack, _worker, corral) in served("[limits]\nmax_header = \"16K\"") {
        let within = padded_head("/within", 12 * 1024);
        assert_eq!(
            statuses(corral.addr, within.as_bytes(), 1),
            vec![200],
            "{stack}: within"
        );
        for size in [17 * 1024, 20 * 1024, 30 * 1024, 70 * 1024] {
            let past = padded_head("/past", size);
            assert_eq!(
                statuses(corral.addr, past.as_bytes(), 2),
                vec![431],
                "{stack}: fresh, {size} bytes"
            );
            let kept = format!("GET /first HTTP/1.1\r\nHost: localhost\r\n\r\n{past}");
            assert_eq!(
                statuses(corral.addr, kept.as_bytes(), 3),
                vec![200, 431],
                "{stack}: kept-alive, {size} bytes"
            );
            // Behind a request with a body.
            let after_body = format!(
                "POST /first HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\nok{past}"
            );
            assert_eq!(
                statuses(corral.addr, after_body.as_bytes(), 3),
                vec![200, 431],
                "{stack}: behind a body, {size} bytes"
            );
        }
    }
    // The default limit (64K) likewise.
    for (stack, _worker, corral) in served("") {
        let past = padded_head("/past", 70 * 1024);
        let kept = format!("GET /first HTTP/1.1\r\nHost: localhost\r\n\r\n{past}");
        assert_eq!(
            statuses(corral.addr, kept.as_bytes(), 3),
            vec![200, 431],
            "{stack}: default limit"
        );
    }
}

/// A header name with an underscore never reaches the worker (nginx's
/// `underscores_in_headers off`): `X_Forwarded_For` beside corral's own
/// `X-Forwarded-For` is one key to a WSGI server. `underscores_in_headers = true`
/// lets such names through, but never as a forwarding header.
#[test]
fn header_names_with_underscores_are_dropped() {
    let req = b"GET /u HTTP/1.1\r\nHost: localhost\r\nX_Forwarded_For: 6.6.6.6\r\nX_Custom: 1\r\nX-Kept: 1\r\n\r\n";
    for (stack, worker, corral) in served("") {
        let r = exchange(corral.addr, req);
        assert_eq!(r.map(|r| r.status), Some(200), "{stack}");
        let seen = worker.seen_for("/u");
        let seen = seen.last().expect("reached the worker");
        assert_eq!(seen.header("x_forwarded_for"), None, "{stack}");
        assert_eq!(seen.header("x_custom"), None, "{stack}");
        assert_eq!(seen.header("x-kept"), Some("1"), "{stack}");
        assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"), "{stack}");
    }
    for (stack, worker, corral) in served("underscores_in_headers = true") {
        let r = exchange(corral.addr, req);
        assert_eq!(r.map(|r| r.status), Some(200), "{stack}");
        let seen = worker.seen_for("/u");
        let seen = seen.last().expect("reached the worker");
        assert_eq!(seen.header("x_custom"), Some("1"), "{stack}: allowed");
        assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"), "{stack}");
    }
}

/// A worker's chunk size with leading zeros is a valid size (RFC 9112 7.1): the
/// body reaches the client whole.
#[test]
fn chunk_sizes_with_leading_zeros_are_read_whole() {
    let bytes = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0000000000000000005\r\nhello\r\n00000000000000000000\r\n\r\n";
    for stack in ["corral"] {
        let worker = RawWorker::start(Mode::Canned(bytes, false));
        let corral = corral_for(&worker, "");
        for _ in 0..2 {
            let r = exchange(
                corral.addr,
                b"GET /canned HTTP/1.1\r\nHost: localhost\r\n\r\n",
            )
            .expect("a reply");
            assert_eq!(
                (r.status, r.body.as_slice()),
                (200, &b"hello"[..]),
                "{stack}: {r:?}"
            );
        }
    }
}

/// Requests nginx refuses, refused alike and never passed on: CONNECT (400), an
/// empty Host (400), a Transfer-Encoding other than `chunked` (501), and `*` as
/// the target of anything but OPTIONS (400); on fresh and kept-alive connections.
#[test]
fn what_nginx_refuses_is_refused() {
    let cases: &[(&str, &[u8], u16)] = &[
        ("connect", b"CONNECT localhost:443 HTTP/1.1\r\nHost: localhost:443\r\n\r\n", 400),
        ("empty host", b"GET /e HTTP/1.1\r\nHost:\r\n\r\n", 400),
        ("blank host", b"GET /e HTTP/1.1\r\nHost:  \r\n\r\n", 400),
        (
            "gzip, chunked",
            b"POST /t HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            501,
        ),
        (
            "chunked twice",
            b"POST /t HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            501,
        ),
        ("get *", b"GET * HTTP/1.1\r\nHost: localhost\r\n\r\n", 400),
        ("head *", b"HEAD * HTTP/1.1\r\nHost: localhost\r\n\r\n", 400),
    ];
    for (stack, worker, corral) in served("") {
        for (name, bytes, status) in cases {
            assert_eq!(
                statuses(corral.addr, bytes, 1).first(),
                Some(status),
                "{stack}: {name}, fresh"
            );
            let kept = [
                &b"GET /first HTTP/1.1\r\nHost: localhost\r\n\r\n"[..],
                bytes,
            ]
            .concat();
            assert_eq!(
                statuses(corral.addr, &kept, 2).get(..2),
                Some(&[200, *status][..]),
                "{stack}: {name}, kept-alive"
            );
        }
        let passed: Vec<String> = worker
            .seen()
            .iter()
            .map(|s| s.target().to_owned())
            .filter(|t| t != "/first")
            .collect();
        assert!(passed.is_empty(), "{stack}: reached the worker: {passed:?}");
        // OPTIONS * is what `*` is for: passed on.
        let r = exchange(
            corral.addr,
            b"OPTIONS * HTTP/1.1\r\nHost: localhost\r\n\r\n",
        );
        assert_eq!(r.map(|r| r.status), Some(200), "{stack}: OPTIONS *");
    }
}
