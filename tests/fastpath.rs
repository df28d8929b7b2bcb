//! The fast paths (`edge::fast` serving clients, `transport::http1` to workers)
//! against hyper's server and client, on the same requests: two corrals, one with
//! both fast paths on (the default) and one with `[experimental] http1_fast_server =
//! false` and `http1_fast_path = false`, each in front of a raw worker of its own.
//! What each worker receives and what each client receives must be the same, byte
//! for byte but for the order of a request's header lines (the fast path writes
//! Content-Length last) and the Date header; where the two may differ by design
//! (the wording of a 502), only the status is compared. The fast path's rule for
//! reusing a worker connection is checked case by case.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;
use support::{exchange, Corral, Mode, RawWorker};

fn corral_for(worker: &RawWorker, fast: bool) -> Corral {
    Corral::start(&format!(
        "threads = 1\nupstreams = [\"{}\"]\n[engineio]\nsticky = false\n[experimental]\nhttp1_fast_path = {fast}\nhttp1_fast_server = {fast}\n",
        worker.addr
    ))
}

/// A head with its header lines sorted, so only their order may differ.
fn sorted_head(head: &str) -> String {
    let mut lines = head.trim_end().split("\r\n");
    let first = lines.next().unwrap_or("").to_owned();
    let mut rest: Vec<String> = lines.map(|l| l.to_ascii_lowercase()).collect();
    rest.sort();
    format!("{first}\n{}", rest.join("\n"))
}

/// Everything a client reads on a connection until the proxy closes it, the Date
/// line taken out.
fn read_all(addr: SocketAddr, request: &[u8]) -> String {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return "no connection".into();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(request).is_err() {
        return "write failed".into();
    }
    let mut bytes = Vec::new();
    let mut buf = [0u8; 65536];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 || bytes.len() > 4 << 20 {
            break;
        }
        bytes.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&bytes)
        .split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("date:"))
        .collect::<Vec<_>>()
        .join("\r\n")
}

/// Requests as clients send them; each has a target of its own. (One serving
/// thread: idle worker connections are kept per thread.)
const REQUESTS: &[&[u8]] = &[
    b"GET /r0?a=1&b=%20 HTTP/1.1\r\nHost: localhost\r\nUser-Agent: t\r\nAccept: */*\r\n\r\n",
    b"HEAD /r1 HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"OPTIONS /r2 HTTP/1.1\r\nHost: localhost\r\nOrigin: http://x\r\n\r\n",
    b"DELETE /r3 HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET /r4 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n",
    b"POST /r5 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n",
    b"POST /r6 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /r7 HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"POST /socket.io/?EIO=4&transport=polling&t=r8 HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain;charset=UTF-8\r\nContent-Length: 5\r\n\r\n40abc",
    b"POST /socket.io/?EIO=4&transport=polling&t=r9 HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n42[\r\n4\r\n\"a\"]\r\n0\r\n\r\n",
    b"GET /socket.io/?EIO=4&transport=polling&t=r10 HTTP/1.1\r\nHost: localhost\r\nCookie: io=1\r\nAccept-Encoding: gzip\r\n\r\n",
    b"GET /r11 HTTP/1.1\r\nHost: localhost:8080\r\nConnection: keep-alive, x-drop\r\nX-Drop: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n",
    b"GET /r12 HTTP/1.1\r\nHost: localhost\r\nX-Obs: caf\xc3\xa9\r\nX-Empty:\r\nX-Dup: 1\r\nX-Dup: 2\r\n\r\n",
    b"GET /r13 HTTP/1.0\r\nHost: localhost\r\n\r\n",
    b"GET http://localhost/r14?q HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET /r15 HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\n\r\n",
    b"GET /r16 HTTP/1.1\r\nHost: localhost\r\nHost: evil\r\n\r\n",
    b"POST /r17 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    // A plain request, then one with a body on the same connection: the fast
    // server answers the first and hands the connection to hyper for the second.
    b"GET /r18 HTTP/1.1\r\nHost: localhost\r\n\r\nPOST /r18 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello",
    b"GET /r19 HTTP/1.1\r\nHost: localhost\r\nX-A: 1\r\n folded\r\n\r\n",
    b"get /r20 HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET /r21?a=<x>|{y} HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET /r22 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    b"GET /r23 HTTP/1.1\r\nHost: localhost\r\nConnection: upgrade\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: localhost\r\n\r\n",
    // Every forwarding and hop-by-hop header a client may forge, with a plain
    // Connection header (the fast path's direct forwarding rules).
    b"GET /r25 HTTP/1.1\r\nHost: localhost\r\nX-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nForwarded: for=6.6.6.6\r\nX-Forwarded-Host: evil\r\nX-Forwarded-Port: 1\r\nX-Forwarded-Prefix: /x\r\nX-Corral-Hop: forged\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic eA==\r\nTrailer: x\r\n\r\n",
    b"POST /socket.io/?EIO=4&transport=polling&t=r26 HTTP/1.1\r\nHost: localhost:81\r\nX-Forwarded-For: 6.6.6.6\r\nConnection: close\r\nContent-Length: 2\r\n\r\n2a",
];

/// A second request sent right behind each of the corpus (pipelined), which closes
/// the connection after its answer, so a client reads both answers to the end.
const CLOSING: &[u8] = b"GET /end HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";

/// Each request reaches the worker, and its answer the client, alike on both paths.
#[test]
fn requests_reach_the_worker_alike_on_both_paths() {
    let (wf, wh) = (RawWorker::start(Mode::Echo), RawWorker::start(Mode::Echo));
    let (fast, hyper) = (corral_for(&wf, true), corral_for(&wh, false));
    for (i, req) in REQUESTS.iter().enumerate() {
        let text = String::from_utf8_lossy(req);
        let both = [*req, CLOSING].concat();
        let (of, oh) = (read_all(fast.addr, &both), read_all(hyper.addr, &both));
        assert_eq!(of, oh, "client side of {text:?}");
        let target = format!("r{i}");
        let seen = |w: &RawWorker| -> Vec<(String, Vec<u8>, bool)> {
            w.seen()
                .into_iter()
                .filter(|s| {
                    s.target().ends_with(&format!("/{target}"))
                        || s.target().contains(&format!("{target}?"))
                        || s.target().ends_with(&format!("={target}"))
                })
                .map(|s| (sorted_head(&s.head), s.body, s.aborted))
                .collect()
        };
        assert_eq!(seen(&wf), seen(&wh), "worker side of {text:?}");
    }
    // Heads past the limits, which the fast server leaves to hyper: 431. (hyper
    // alone enforces `max_header` on what its reads hold, so a head a little past
    // the limit may pass it when one read takes it all; the fast server counts
    // every byte, so only its answer is checked for the long header.)
    let many: String = (0..120).map(|i| format!("X-H{i}: v\r\n")).collect();
    let req = format!("GET /big HTTP/1.1\r\nHost: localhost\r\n{many}\r\n");
    let (of, oh) = (
        read_all(fast.addr, req.as_bytes()),
        read_all(hyper.addr, req.as_bytes()),
    );
    assert_eq!(of, oh);
    assert!(of.starts_with("HTTP/1.1 431"), "{of}");
    let long = format!(
        "GET /big HTTP/1.1\r\nHost: localhost\r\nX-Long: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let of = read_all(fast.addr, long.as_bytes());
    assert!(of.starts_with("HTTP/1.1 431"), "{of}");
    // Far past the limit, hyper's own buffer refuses it too: the fast server's
    // refusal is written as hyper's is.
    let huge = format!(
        "GET /big HTTP/1.1\r\nHost: localhost\r\n{}\r\n",
        format!("X-Long: {}\r\n", "a".repeat(4000)).repeat(60)
    );
    let (of, oh) = (
        read_all(fast.addr, huge.as_bytes()),
        read_all(hyper.addr, huge.as_bytes()),
    );
    assert!(of.starts_with("HTTP/1.1 431"), "{of}");
    assert_eq!(of, oh, "the refusal, byte for byte");
    // The corpus reached the workers (a test that compares nothing cannot fail).
    assert!(wf.seen().len() >= 14, "{:?}", wf.seen());
    // Every request went out on one warm worker connection but for the first.
    let conns: std::collections::HashSet<usize> = wf.seen().iter().map(|s| s.conn).collect();
    assert!(conns.len() <= 3, "fast path connections: {conns:?}");
}

/// A canned response, whether the fast path may reuse the connection after it, and
/// whether hyper's wording may differ (a 502, compared by status only).
struct Case {
    name: &'static str,
    bytes: &'static [u8],
    close: bool,
    head_request: bool,
    reused: bool,
    failure: bool,
    /// hyper's path answers otherwise, and the fast path's answer is the one wanted.
    hyper_differs: bool,
}

const fn case(name: &'static str, bytes: &'static [u8], close: bool, reused: bool) -> Case {
    Case {
        name,
        bytes,
        close,
        head_request: false,
        reused,
        failure: false,
        hyper_differs: false,
    }
}

const CASES: &[Case] = &[
    case("chunked, extensions and trailers", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6 ; a=\"b\"\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n", false, true),
    case("chunked beside a Content-Length", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", false, false),
    case("two equal Content-Lengths", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello", false, true),
    case("1xx before the answer", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false, true),
    case("204 followed by stray bytes", b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello", false, false),
    case("304 naming a chunked body it has not", b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\nETag: \"x\"\r\n\r\n", false, true),
    case("close-delimited", b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello until close", true, false),
    case("HTTP/1.0 close-delimited", b"HTTP/1.0 200 OK\r\n\r\nold", true, false),
    case("HTTP/1.1 Connection: close", b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", true, false),
    case("an unusual reason phrase", b"HTTP/1.1 200 Fine Thanks\r\nContent-Length: 2\r\n\r\nok", false, true),
    case("header order and repeats", b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nX-A: 1\r\nSet-Cookie: b=2\r\nContent-Length: 2\r\n\r\nok", false, true),
    case("a body cut short", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello", true, false),
    case("a chunked body cut short", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", true, false),
    case("a body longer than one read", BIG, false, true),
    Case { failure: true, ..case("two different Content-Lengths", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", false, false) },
    // hyper's client passes the 101 on to a client that asked for no upgrade; the
    // fast path answers 502, as a response the request did not allow.
    Case { failure: true, hyper_differs: true, ..case("101 to a plain request", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n", false, false) },
    Case { failure: true, ..case("a folded header line", b"HTTP/1.1 200 OK\r\nX-A: 1\r\n  2\r\nContent-Length: 2\r\n\r\nok", false, false) },
    Case { failure: true, ..case("no answer at all", b"", true, false) },
    Case { head_request: true, ..case("HEAD with a length", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", false, true) },
];

/// 200,000 bytes in a Content-Length body, so it spans many reads.
const BIG: &[u8] = {
    const HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n";
    const LEN: usize = HEAD.len() + 200_000;
    static BYTES: [u8; LEN] = {
        let mut b = [b'x'; LEN];
        let mut i = 0;
        while i < HEAD.len() {
            b[i] = HEAD[i];
            i += 1;
        }
        b
    };
    &BYTES
};

/// Each canned response reaches the client alike on both paths, and the fast path
/// reuses the worker connection after it only when the response was framed and
/// read exactly.
#[test]
fn responses_reach_the_client_alike_on_both_paths() {
    for case in CASES {
        let mode = Mode::Canned(case.bytes, case.close);
        let (wf, wh) = (RawWorker::start(mode), RawWorker::start(mode));
        let (fast, hyper) = (corral_for(&wf, true), corral_for(&wh, false));
        let method = if case.head_request { "HEAD" } else { "GET" };
        let req =
            format!("{method} /canned HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        let (of, oh) = (
            read_all(fast.addr, req.as_bytes()),
            read_all(hyper.addr, req.as_bytes()),
        );
        if case.failure {
            let status = |o: &str| o.split(' ').nth(1).unwrap_or("").to_owned();
            assert_eq!(status(&of), "502", "{}: {of}", case.name);
            if !case.hyper_differs {
                assert_eq!(status(&of), status(&oh), "{}: {of}\n---\n{oh}", case.name);
            }
        } else {
            assert_eq!(of, oh, "{}", case.name);
            assert!(of.starts_with("HTTP/1."), "{}: {of}", case.name);
        }
        // The next request: served, and on the same worker connection only when the
        // fast path may reuse it.
        let after = exchange(fast.addr, b"GET /after HTTP/1.1\r\nHost: localhost\r\n\r\n");
        assert_eq!(after.map(|r| r.status), Some(200), "{}: after", case.name);
        let conn_of = |target: &str| wf.seen_for(target).last().map(|s| s.conn);
        let reused = conn_of("/canned").is_some() && conn_of("/canned") == conn_of("/after");
        assert_eq!(reused, case.reused, "{}: reuse", case.name);
    }
}

/// A worker's response with both Transfer-Encoding and Content-Length reaches the
/// client framed by its chunks, without the Content-Length (RFC 9112 6.3: a proxy
/// removes it), on both paths.
#[test]
fn a_content_length_beside_chunked_is_not_passed_on() {
    let bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    for fast in [true, false] {
        let worker = RawWorker::start(Mode::Canned(bytes, false));
        let corral = corral_for(&worker, fast);
        let r = exchange(
            corral.addr,
            b"GET /canned HTTP/1.1\r\nHost: localhost\r\n\r\n",
        );
        let r = r.expect("a reply");
        assert_eq!(r.header("content-length"), None, "fast path {fast}: {r:?}");
        assert_eq!(r.body, b"hello", "fast path {fast}: {r:?}");
    }
}

/// A parked worker connection that the worker closed meanwhile is seen closed
/// before use: a request that cannot be sent again (an Engine.IO POST) goes out on
/// a new connection and is served, not failed with 502.
#[test]
fn a_parked_connection_closed_by_the_worker_is_not_used() {
    let bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    let worker = RawWorker::start(Mode::Canned(bytes, true));
    let corral = corral_for(&worker, true);
    let r = exchange(
        corral.addr,
        b"GET /canned HTTP/1.1\r\nHost: localhost\r\n\r\n",
    );
    assert_eq!(r.map(|r| r.status), Some(200));
    // The worker's close reaches corral while the connection is parked.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while worker.open_connections() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the worker never closed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let post = b"POST /socket.io/?EIO=4&transport=polling&t=p HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\n40abc";
    let r = exchange(corral.addr, post).expect("a reply");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"40abc"[..]), "{r:?}");
    let canned = worker.seen_for("/canned");
    let posted: Vec<_> = worker
        .seen()
        .into_iter()
        .filter(|s| s.target().ends_with("t=p"))
        .collect();
    assert_ne!(canned.last().map(|s| s.conn), posted.last().map(|s| s.conn));
}

/// An answer to `Connection: close` ends the connection: the client reads that one
/// answer and then end of stream at once, and a request pipelined behind it is
/// never served (the fast loop closes a plain socket without a shutdown first; its
/// close sends the FIN).
#[test]
fn a_closing_answer_ends_the_connection() {
    let worker = RawWorker::start(Mode::Echo);
    let corral = corral_for(&worker, true);
    let mut s = TcpStream::connect(corral.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    s.write_all(b"GET /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\nGET /y HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("write");
    let mut got = Vec::new();
    let ended = s.read_to_end(&mut got);
    assert!(ended.is_ok(), "no end of stream: {ended:?}");
    let text = String::from_utf8_lossy(&got);
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");
    assert!(text.contains("connection: close"), "{text}");
    assert!(worker.seen_for("/y").is_empty());
}
