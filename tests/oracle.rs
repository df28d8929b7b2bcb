//! corral's HTTP/1.1 (`edge::h1` serving clients, `transport::http1` to workers)
//! held to hyper's, the oracle: the same bytes a client sends go to corral (in
//! front of a raw worker that records what reaches it) and to hyper's HTTP/1.1
//! server in this process, and every request both take must be framed alike:
//! method, target and body (so where the next request begins). The same bytes a
//! worker answers go through corral to a client and to hyper's HTTP/1.1 client,
//! and the status and body must be alike. Where corral is stricter by design
//! (nginx's rules, docs/conformance.md) the case says so. corral's rule for
//! reusing a worker connection is checked case by case.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;
use support::{exchange, Corral, Mode, RawWorker};

fn corral_for(worker: &RawWorker) -> Corral {
    Corral::start(&format!(
        "threads = 1\nupstreams = [\"{}\"]\n[engineio]\nsticky = false\n",
        worker.addr
    ))
}

/// A runtime for one oracle run (hyper's server or client in this process).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A request as framed: method, target (origin form) and body.
type Framed = (String, String, Vec<u8>);

/// The origin form of a target as hyper shows it (an absolute-form one whole).
fn origin(target: &str) -> String {
    match target.find("://") {
        Some(i) => {
            let rest = &target[i + 3..];
            let path = rest.find(['/', '?']).map_or("/", |j| &rest[j..]);
            match path.starts_with('?') {
                true => format!("/{path}"),
                false => path.to_owned(),
            }
        }
        None => target.to_owned(),
    }
}

/// hyper's HTTP/1.1 server reading `bytes` as a client sent them: each request it
/// takes, with its body (a body that fails is left out, as a request that never
/// reached a worker).
fn hyper_takes(bytes: &[u8]) -> Vec<Framed> {
    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;
    let taken = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = taken.clone();
    let rt = runtime();
    rt.block_on(async move {
        let (mut client, server) = tokio::io::duplex(bytes.len() + (1 << 20));
        let _ = client.write_all(bytes).await;
        let service =
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let record = record.clone();
                async move {
                    let method = req.method().as_str().to_owned();
                    let target = origin(&req.uri().to_string());
                    if let Ok(body) = req.into_body().collect().await {
                        let body = body.to_bytes().to_vec();
                        record.lock().expect("lock").push((method, target, body));
                    }
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Empty::<bytes::Bytes>::new(),
                    ))
                }
            });
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(server), service);
        // The bytes are all there at once: what hyper takes, it takes at once.
        let _ = tokio::time::timeout(Duration::from_millis(500), conn).await;
    });
    let taken = taken.lock().expect("lock").clone();
    taken
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
    // A plain request, then one with a body on the same connection.
    b"GET /r18 HTTP/1.1\r\nHost: localhost\r\n\r\nPOST /r18 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello",
    b"GET /r19 HTTP/1.1\r\nHost: localhost\r\nX-A: 1\r\n folded\r\n\r\n",
    b"get /r20 HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET /r21?a=<x>|{y} HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET /r22 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    b"GET /r23 HTTP/1.1\r\nHost: localhost\r\nConnection: upgrade\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: localhost\r\n\r\n",
    // Every forwarding and hop-by-hop header a client may forge, with a plain
    // Connection header (the direct forwarding rules).
    b"GET /r25 HTTP/1.1\r\nHost: localhost\r\nX-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nForwarded: for=6.6.6.6\r\nX-Forwarded-Host: evil\r\nX-Forwarded-Port: 1\r\nX-Forwarded-Prefix: /x\r\nX-Corral-Hop: forged\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic eA==\r\nTrailer: x\r\n\r\n",
    b"POST /socket.io/?EIO=4&transport=polling&t=r26 HTTP/1.1\r\nHost: localhost:81\r\nX-Forwarded-For: 6.6.6.6\r\nConnection: close\r\nContent-Length: 2\r\n\r\n2a",
    // Bodies, pipelined and framed every way a client may frame them.
    b"POST /r27 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\n\r\nabcPOST /r27 HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nde\r\n0\r\n\r\n",
    b"POST /r28 HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n3;name=value\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n",
    b"PUT /r29 HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\nbody",
    b"POST /r30 HTTP/1.0\r\nHost: localhost\r\nContent-Length: 4\r\n\r\nten!",
    b"POST /r31 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5, 5\r\n\r\nfives",
    b"POST /r32 HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n00000003\r\nxyz\r\n0\r\n\r\n",
    b"POST /r33 HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n",
    b"POST /r34 HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\nA\r\n0123456789\r\n0\r\n\r\nGET /r34 HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"POST /r35 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
];

/// A second request sent right behind each of the corpus (pipelined), which closes
/// the connection after its answer, so a client reads both answers to the end.
const CLOSING: &[u8] = b"GET /end HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";

/// Requests of the corpus corral refuses on purpose where hyper takes them: the
/// gate's head rules (nginx's), not framing. By index.
const STRICTER: &[(usize, &str)] = &[
    (16, "two Host headers"),
    (
        35,
        "two Content-Length fields (nginx: a duplicate header line)",
    ),
];

/// Each request is framed by corral as hyper frames it: the requests that reach the
/// worker are those hyper's server takes from the same bytes, with the same method,
/// target and body.
#[test]
fn requests_are_framed_as_hyper_frames_them() {
    let worker = RawWorker::start(Mode::Echo);
    let corral = corral_for(&worker);
    for (i, req) in REQUESTS.iter().enumerate() {
        let text = String::from_utf8_lossy(req);
        let both = [*req, CLOSING].concat();
        let answer = read_all(corral.addr, &both);
        let target = format!("r{i}");
        let ours: Vec<Framed> = worker
            .seen()
            .into_iter()
            .filter(|s| {
                s.target().ends_with(&format!("/{target}"))
                    || s.target().contains(&format!("{target}?"))
                    || s.target().ends_with(&format!("={target}"))
                    || (req.starts_with(b"OPTIONS * ") && s.target() == "*")
            })
            // A request whose body failed on the way reached the worker cut short
            // (its head went ahead of its body): not taken, as hyper does not take it.
            .filter(|s| !s.aborted)
            .map(|s| {
                let method = s.head.split(' ').next().unwrap_or("").to_owned();
                (method, s.target().to_owned(), s.body)
            })
            .collect();
        let theirs: Vec<Framed> = hyper_takes(req);
        if let Some((_, why)) = STRICTER.iter().find(|(n, _)| *n == i) {
            assert!(ours.is_empty(), "{why}: {ours:?}");
            assert!(answer.starts_with("HTTP/1.1 400"), "{why}: {answer}");
            continue;
        }
        assert_eq!(ours, theirs, "{text:?}: corral's answer {answer:?}");
    }
    // Heads past the limits: 431, every byte counted.
    let many: String = (0..120).map(|i| format!("X-H{i}: v\r\n")).collect();
    let req = format!("GET /big HTTP/1.1\r\nHost: localhost\r\n{many}\r\n");
    let of = read_all(corral.addr, req.as_bytes());
    assert!(of.starts_with("HTTP/1.1 431"), "{of}");
    let long = format!(
        "GET /big HTTP/1.1\r\nHost: localhost\r\nX-Long: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let of = read_all(corral.addr, long.as_bytes());
    assert!(of.starts_with("HTTP/1.1 431"), "{of}");
    // The corpus reached the worker (a test that compares nothing cannot fail).
    assert!(worker.seen().len() >= 14, "{:?}", worker.seen());
    // Every request went out on one warm worker connection but for the first.
    let conns: std::collections::HashSet<usize> = worker.seen().iter().map(|s| s.conn).collect();
    assert!(conns.len() <= 3, "worker connections: {conns:?}");
}

/// A canned response, whether corral may reuse the connection after it, and
/// whether hyper's client reads it otherwise by design.
struct Case {
    name: &'static str,
    bytes: &'static [u8],
    close: bool,
    head_request: bool,
    reused: bool,
    failure: bool,
    /// hyper's client reads it otherwise, and corral's answer is the one wanted.
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
    // hyper's client passes the 101 on to a client that asked for no upgrade;
    // corral answers 502, as a response the request did not allow.
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

/// hyper's HTTP/1.1 client reading `bytes` as a worker's answer to a GET (HEAD
/// for `head_request`): its status and the body bytes it gave before its end or a
/// failure; None when it took no head.
fn hyper_reads(bytes: &'static [u8], head_request: bool) -> Option<(u16, Vec<u8>)> {
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = runtime();
    rt.block_on(async move {
        let (client, mut worker) = tokio::io::duplex(1 << 20);
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(client))
                .await
                .ok()?;
        tokio::spawn(async move {
            let mut head = [0u8; 1024];
            let _ = worker.read(&mut head).await;
            let _ = worker.write_all(bytes).await;
            let _ = worker.shutdown().await;
            let mut rest = Vec::new();
            let _ = worker.read_to_end(&mut rest).await;
        });
        tokio::spawn(conn);
        let method = if head_request { "HEAD" } else { "GET" };
        let req = hyper::Request::builder()
            .method(method)
            .uri("/canned")
            .header("host", "localhost")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .ok()?;
        let reading = async {
            let resp = sender.send_request(req).await.ok()?;
            let status = resp.status().as_u16();
            let mut body = resp.into_body();
            let mut got = Vec::new();
            while let Some(Ok(frame)) = body.frame().await {
                if let Ok(data) = frame.into_data() {
                    got.extend_from_slice(&data);
                }
            }
            Some((status, got))
        };
        tokio::time::timeout(Duration::from_secs(3), reading)
            .await
            .ok()
            .flatten()
    })
}

/// The status and body a client read (`read_all`'s text).
fn status_and_body(text: &str) -> (u16, Vec<u8>) {
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let chunked = text.split_once("\r\n\r\n").is_some_and(|(h, _)| {
        h.to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
    });
    let body = match chunked {
        true => dechunk(body),
        false => body.as_bytes().to_vec(),
    };
    (status, body)
}

/// A chunked body's data, as far as it goes.
fn dechunk(mut text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some((size, rest)) = text.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            out.extend_from_slice(rest.get(..n.min(rest.len())).unwrap_or("").as_bytes());
            break;
        }
        out.extend_from_slice(&rest.as_bytes()[..n]);
        text = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Each canned response reaches the client as hyper's client reads it (status and
/// body), a response hyper cannot read is a 502, and corral reuses the worker
/// connection after it only when the response was framed and read exactly.
#[test]
fn responses_are_read_as_hyper_reads_them() {
    for case in CASES {
        let mode = Mode::Canned(case.bytes, case.close);
        let worker = RawWorker::start(mode);
        let corral = corral_for(&worker);
        let method = if case.head_request { "HEAD" } else { "GET" };
        let req =
            format!("{method} /canned HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        let ours = read_all(corral.addr, req.as_bytes());
        let theirs = hyper_reads(case.bytes, case.head_request);
        let (status, body) = status_and_body(&ours);
        if case.failure {
            assert_eq!(status, 502, "{}: {ours}", case.name);
            if !case.hyper_differs {
                assert_eq!(theirs, None, "{}: hyper took it", case.name);
            }
        } else {
            assert_eq!(Some((status, body)), theirs, "{}: {ours}", case.name);
        }
        // The next request: served, and on the same worker connection only when it
        // may be reused.
        let after = exchange(
            corral.addr,
            b"GET /after HTTP/1.1\r\nHost: localhost\r\n\r\n",
        );
        assert_eq!(after.map(|r| r.status), Some(200), "{}: after", case.name);
        let conn_of = |target: &str| worker.seen_for(target).last().map(|s| s.conn);
        let reused = conn_of("/canned").is_some() && conn_of("/canned") == conn_of("/after");
        assert_eq!(reused, case.reused, "{}: reuse", case.name);
    }
}

/// A worker's response with both Transfer-Encoding and Content-Length reaches the
/// client framed by its chunks, without the Content-Length (RFC 9112 6.3: a proxy
/// removes it).
#[test]
fn a_content_length_beside_chunked_is_not_passed_on() {
    let bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    {
        let worker = RawWorker::start(Mode::Canned(bytes, false));
        let corral = corral_for(&worker);
        let r = exchange(
            corral.addr,
            b"GET /canned HTTP/1.1\r\nHost: localhost\r\n\r\n",
        );
        let r = r.expect("a reply");
        assert_eq!(r.header("content-length"), None, "{r:?}");
        assert_eq!(r.body, b"hello", "{r:?}");
    }
}

/// A parked worker connection that the worker closed meanwhile is seen closed
/// before use: a request that cannot be sent again (an Engine.IO POST) goes out on
/// a new connection and is served, not failed with 502.
#[test]
fn a_parked_connection_closed_by_the_worker_is_not_used() {
    let bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    let worker = RawWorker::start(Mode::Canned(bytes, true));
    let corral = corral_for(&worker);
    let r = exchange(
        corral.addr,
        b"GET /canned HTTP/1.1\r\nHost: localhost\r\n\r\n",
    );
    assert_eq!(r.map(|r| r.status), Some(200));
    // The worker's close reaches corral while the connection is parked.
    assert!(
        worker.wait_all_closed(Duration::from_secs(5)),
        "the worker never closed"
    );
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
/// never served (the session closes a plain socket without a shutdown first; its
/// close sends the FIN).
#[test]
fn a_closing_answer_ends_the_connection() {
    let worker = RawWorker::start(Mode::Echo);
    let corral = corral_for(&worker);
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
