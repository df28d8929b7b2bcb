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

/// One raw request that must be answered `status` without a complete request
/// reaching the worker.
struct Case {
    name: &'static str,
    bytes: &'static [u8],
    status: u16,
    /// Close the sending side after the bytes (a body cut short).
    half_close: bool,
}

const REFUSED: &[Case] = &[
    Case {
        name: "two Host headers",
        bytes: b"GET /ui HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\n\r\n",
        status: 400,
        half_close: false,
    },
    Case {
        name: "no Host on HTTP/1.1",
        bytes: b"GET /ui HTTP/1.1\r\nUser-Agent: t\r\n\r\n",
        status: 400,
        half_close: false,
    },
    Case {
        name: "absolute-form target with userinfo",
        bytes: b"GET http://localhost@evil.example/ui HTTP/1.1\r\nHost: localhost\r\n\r\n",
        status: 400,
        half_close: false,
    },
    Case {
        name: "chunk size overflowing 64 bits",
        bytes: b"POST /ui HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n1ffffffffffffffff\r\nhello\r\n0\r\n\r\n",
        status: 400,
        half_close: false,
    },
    Case {
        name: "negative chunk size",
        bytes: b"POST /ui HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n-5\r\nhello\r\n0\r\n\r\n",
        status: 400,
        half_close: false,
    },
    Case {
        name: "chunk data without its CRLF",
        bytes: b"POST /ui HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n5\r\nhelloXX0\r\n\r\n",
        status: 400,
        half_close: false,
    },
    Case {
        name: "missing final CRLF",
        bytes: b"POST /ui HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n",
        status: 400,
        half_close: true,
    },
    Case {
        name: "bare LF chunk lines",
        bytes: b"POST /ui HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n5\nhello\n0\n\n",
        status: 400,
        half_close: false,
    },
];

/// Sends `case` on a connection of its own; the reply, or None if the connection
/// closed without one.
fn send_case(corral: &Corral, case: &Case) -> Option<support::Reply> {
    let mut s = corral.connect();
    s.write_all(case.bytes).ok()?;
    if case.half_close {
        s.shutdown(std::net::Shutdown::Write).ok()?;
    }
    read_reply(&mut BufReader::new(s))
}

#[test]
fn malformed_requests_get_400_and_reach_no_worker_whole() {
    let worker = RawWorker::start(Mode::Echo);
    let corral = corral_for(&worker, "");
    let mut wrong = Vec::new();
    for case in REFUSED {
        match send_case(&corral, case) {
            Some(r) if r.status == case.status => {}
            other => wrong.push(format!(
                "{}: expected {}, got {:?}",
                case.name,
                case.status,
                other.map(|r| (r.status, r.text()))
            )),
        }
    }
    thread::sleep(Duration::from_millis(200));
    for s in worker.seen() {
        if !s.aborted {
            wrong.push(format!("a complete request reached the worker: {s:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // A well-formed request on the same corral still works (the cases above did
    // not just break it).
    let ok = exchange(
        corral.addr,
        b"POST /ui HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .expect("reply");
    assert_eq!((ok.status, ok.text().as_str()), (200, "hello"));
}

#[test]
fn absolute_form_target_sets_host_and_http10_needs_none() {
    let worker = RawWorker::start(Mode::Echo);
    let corral = corral_for(&worker, "");
    let r = exchange(
        corral.addr,
        b"GET http://example.org/abs HTTP/1.1\r\nHost: other.example\r\n\r\n",
    )
    .expect("reply");
    assert_eq!(r.status, 200);
    let r10 = exchange(corral.addr, b"GET /old HTTP/1.0\r\n\r\n").expect("reply");
    assert_eq!(r10.status, 200);
    let seen = worker.seen_for("/abs");
    assert_eq!(seen.len(), 1, "{:?}", worker.seen());
    // RFC 9112 3.2.2: the target's authority wins over the Host header.
    assert_eq!(seen[0].header("host"), Some("example.org"));
}

/// Headers that say where a request came from are corral's to set: from a peer
/// that is not a trusted proxy they are removed (or, X-Real-IP, set).
#[test]
fn forwarded_headers_from_untrusted_peers_are_not_passed_on() {
    let worker = RawWorker::start(Mode::Echo);
    let corral = corral_for(&worker, "");
    let r = exchange(
        corral.addr,
        b"GET /fwd HTTP/1.1\r\nHost: localhost\r\nForwarded: for=6.6.6.6;proto=https\r\nX-Real-IP: 6.6.6.6\r\nX-Forwarded-Port: 443\r\nX-Forwarded-Prefix: /admin\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Host: evil.example\r\nX-Forwarded-Proto: https\r\n\r\n",
    )
    .expect("reply");
    assert_eq!(r.status, 200);
    let seen = &worker.seen_for("/fwd")[0];
    assert_eq!(seen.header("forwarded"), None, "{}", seen.head);
    assert_eq!(seen.header("x-forwarded-port"), None, "{}", seen.head);
    assert_eq!(seen.header("x-forwarded-prefix"), None, "{}", seen.head);
    assert_eq!(seen.header("x-real-ip"), Some("127.0.0.1"), "{}", seen.head);
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-host"), Some("localhost"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
}

/// From a trusted proxy they pass, and X-Real-IP is kept.
#[test]
fn forwarded_headers_from_trusted_peers_pass() {
    let worker = RawWorker::start(Mode::Echo);
    let corral = corral_for(&worker, "trusted_proxies = [\"127.0.0.0/8\"]\n");
    let r = exchange(
        corral.addr,
        b"GET /fwd HTTP/1.1\r\nHost: localhost\r\nForwarded: for=1.2.3.4\r\nX-Real-IP: 1.2.3.4\r\nX-Forwarded-Port: 443\r\nX-Forwarded-Prefix: /app\r\n\r\n",
    )
    .expect("reply");
    assert_eq!(r.status, 200);
    let seen = &worker.seen_for("/fwd")[0];
    assert_eq!(seen.header("forwarded"), Some("for=1.2.3.4"));
    assert_eq!(seen.header("x-real-ip"), Some("1.2.3.4"));
    assert_eq!(seen.header("x-forwarded-port"), Some("443"));
    assert_eq!(seen.header("x-forwarded-prefix"), Some("/app"));
}

/// HTTP/2 (cleartext, prior knowledge, `h2c = true`): a `host` header that differs
/// from `:authority` is refused; one that agrees passes.
#[test]
fn h2_host_must_match_authority() {
    let worker = RawWorker::start(Mode::Echo);
    let corral = corral_for(&worker, "h2c = true");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let statuses = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(corral.addr)
            .await
            .expect("connect");
        let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
        tokio::spawn(conn);
        let mut out = Vec::new();
        for (target, host) in [("/h2bad", "evil.example"), ("/h2good", "localhost")] {
            let mut client = client.clone().ready().await.expect("ready");
            let req = http::Request::builder()
                .uri(format!("http://localhost{target}"))
                .header("host", host)
                .body(())
                .expect("request");
            let (resp, _) = client.send_request(req, true).expect("send");
            out.push(resp.await.expect("response").status().as_u16());
        }
        out
    });
    assert_eq!(statuses, vec![400, 200]);
    assert!(worker.seen_for("/h2bad").is_empty(), "{:?}", worker.seen());
    assert_eq!(worker.seen_for("/h2good").len(), 1);
}

/// curl (as browsers do) speaks HTTP/2 over TLS: a body over the limit must still
/// bring it the 413, with or without a declared length, and over HTTP/1.1 too.
#[test]
fn curl_sees_413_over_h2_and_http1() {
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("curl is needed (.ci/run installs it)");
    }
    let worker = RawWorker::start(Mode::Echo);
    let corral = corral_for(
        &worker,
        "[[listener]]\naddress = \"127.0.0.1:0\"\ntls = \"self-signed\"\n[limits]\nmax_body = \"1M\"\n",
    );
    let tls_port = corral.listeners[1].port();
    let dir = TempDir::new("big");
    let big = dir.file("big", &"x".repeat(2_000_000));
    let mut wrong = Vec::new();
    for version in ["--http2", "--http1.1"] {
        for framing in [None, Some("Transfer-Encoding: chunked")] {
            let mut cmd = std::process::Command::new("curl");
            cmd.args(["-sk", version, "-o", "/dev/null", "-w", "%{http_code}"])
                .arg("--data-binary")
                .arg(format!("@{}", big.display()))
                .arg(format!("https://127.0.0.1:{tls_port}/upload"))
                .env_remove("CURL_CA_BUNDLE");
            if let Some(h) = framing {
                cmd.args(["-H", h]);
            }
            let out = cmd.output().expect("run curl");
            let code = String::from_utf8_lossy(&out.stdout).into_owned();
            if code != "413" || !out.status.success() {
                wrong.push(format!(
                    "{version} {framing:?}: status {code}, curl {}",
                    out.status
                ));
            }
        }
    }
    drop(corral);
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert!(
        worker.seen().iter().all(|s| s.aborted),
        "{:?}",
        worker.seen()
    );
}

/// An Engine.IO polling POST reaches the worker whole, with its length in the head
/// (some workers read it with one read of Content-Length bytes); other bodies
/// still stream.
#[test]
fn engineio_post_bodies_are_sent_whole() {
    let worker = RawWorker::start(Mode::Echo);
    let corral = corral_for(&worker, "[engineio]\nsticky = false\n");
    let chunked = b"POST /socket.io/?EIO=4&transport=polling&sid=abc HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n4hell\r\n2\r\no!\r\n0\r\n\r\n";
    let r = exchange(corral.addr, chunked).expect("reply");
    assert_eq!((r.status, r.text().as_str()), (200, "4hello!"));
    let other = b"POST /upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    assert_eq!(exchange(corral.addr, other).expect("reply").status, 200);
    let seen = worker.seen();
    let eio = seen
        .iter()
        .find(|s| s.target().starts_with("/socket.io/"))
        .expect("the Engine.IO POST reached the worker");
    assert_eq!(eio.header("content-length"), Some("7"), "{}", eio.head);
    assert_eq!(eio.header("transfer-encoding"), None, "{}", eio.head);
    let up = &worker.seen_for("/upload")[0];
    assert_eq!(
        up.header("transfer-encoding"),
        Some("chunked"),
        "{}",
        up.head
    );
}

/// The server picks the cipher (its order, strongest first), not the client:
/// testssl.sh grades "no server order" HIGH.
#[test]
fn tls_prefers_the_server_cipher_order() {
    let worker = RawWorker::start(Mode::Echo);
    let corral = corral_for(
        &worker,
        "[[listener]]\naddress = \"127.0.0.1:0\"\ntls = \"self-signed\"\n",
    );
    let tls_port = corral.listeners[1].port();
    let chosen = |args: &[&str]| {
        let mut child = std::process::Command::new("openssl")
            .arg("s_client")
            .args(args)
            .args(["-connect", &format!("127.0.0.1:{tls_port}")])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("openssl (.ci/run installs it)");
        drop(child.stdin.take());
        let out = child.wait_with_output().expect("openssl output");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // "New, TLSv1.3, Cipher is TLS_AES_256_GCM_SHA384"
        text.lines()
            .find_map(|l| l.split_once("Cipher is ").map(|(_, c)| c.trim().to_owned()))
            .unwrap_or(text)
    };
    // The client lists the weaker suite first.
    let v13 = chosen(&[
        "-tls1_3",
        "-ciphersuites",
        "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384",
    ]);
    assert_eq!(v13, "TLS_AES_256_GCM_SHA384");
    let v12 = chosen(&[
        "-tls1_2",
        "-cipher",
        "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384",
    ]);
    assert!(v12.contains("AES256-GCM-SHA384"), "{v12}");
}

/// Content-Length beside Transfer-Encoding: chunked is read by the chunks, the
/// Content-Length never reaches the worker, and the client connection closes after
/// the answer (RFC 9112 6.1, as HAProxy does), so nothing can be smuggled behind it.
#[test]
fn length_beside_chunked_is_dropped_and_the_connection_closed() {
    let worker = RawWorker::start(Mode::Echo);
    let corral = corral_for(&worker, "");
    let mut s = corral.connect();
    s.write_all(b"POST /both HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /behind HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("write");
    let mut r = BufReader::new(s);
    let reply = read_reply(&mut r).expect("reply");
    assert_eq!((reply.status, reply.text().as_str()), (200, "hello"));
    assert!(
        read_reply(&mut r).is_none(),
        "a second answer came on the same connection"
    );
    let seen = &worker.seen_for("/both")[0];
    assert_eq!(seen.header("content-length"), None, "{}", seen.head);
    assert!(worker.seen_for("/behind").is_empty());
}

/// A plain listener speaks HTTP/1.1 only unless `h2c = true`: an HTTP/2
/// prior-knowledge client is answered as HTTP/1.1 would answer its preface.
#[test]
fn h2c_is_opt_in() {
    let worker = RawWorker::start(Mode::Echo);
    let corral = corral_for(&worker, "");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let refused = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(corral.addr)
            .await
            .expect("connect");
        let Ok((client, conn)) = h2::client::handshake(tcp).await else {
            return true;
        };
        tokio::spawn(conn);
        let Ok(mut client) = client.ready().await else {
            return true;
        };
        let req = http::Request::builder()
            .uri("http://localhost/h2c")
            .body(())
            .expect("request");
        match client.send_request(req, true) {
            Ok((resp, _)) => resp.await.is_err(),
            Err(_) => true,
        }
    });
    assert!(refused, "an h2c request was served without h2c = true");
    assert!(worker.seen_for("/h2c").is_empty());
}

/// With every listener on port 0, what depends on a listener's port takes the
/// bound one: the https redirect points at the TLS listener's real port, and the
/// self-signed certificate's PEM is written under it (two corrals on port 0 do
/// not share one file).
#[test]
fn port_zero_listeners_redirect_to_the_bound_https_port() {
    let worker = RawWorker::start(Mode::Echo);
    let corral = corral_for(
        &worker,
        "[[listener]]\naddress = \"127.0.0.1:0\"\ntls = \"self-signed\"\n[[listener]]\naddress = \"127.0.0.1:0\"\nredirect_https = true\n",
    );
    let (tls, redirect) = (corral.listeners[1], corral.listeners[2]);
    let r = exchange(redirect, b"GET /a?b HTTP/1.1\r\nHost: localhost:80\r\n\r\n").expect("reply");
    assert_eq!(r.status, 301, "{r:?}");
    assert_eq!(
        r.header("location"),
        Some(format!("https://localhost:{}/a?b", tls.port()).as_str())
    );
    let pem = std::env::temp_dir().join(format!("corral-{}-self-signed.pem", tls.port()));
    assert!(pem.exists(), "{}", pem.display());
}

/// A client that asks for a large answer and never reads it is cut after
/// `timeouts.send` (nginx's `send_timeout`): corral closes its connection and the
/// worker's, and the worker, blocked writing the answer, is let go (without the
/// deadline both would wait for good).
#[test]
fn a_client_that_never_reads_is_cut_after_the_send_timeout() {
    const BODY: usize = 64 << 20;
    let mut answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {BODY}\r\n\r\n").into_bytes();
    answer.resize(answer.len() + BODY, b'x');
    let answer: &'static [u8] = Box::leak(answer.into_boxed_slice());
    let worker = RawWorker::start(Mode::Canned(answer, false));
    let corral = corral_for(&worker, "[timeouts]\nsend = \"1s\"\n");
    let mut s = corral.connect();
    s.write_all(b"GET /canned HTTP/1.1\r\nHost: a\r\n\r\n")
        .expect("write");
    assert!(worker.wait_for(|seen| seen.iter().any(|r| r.target() == "/canned")));
    assert!(
        worker.wait_all_closed(Duration::from_secs(10)),
        "the worker is still held writing to a client that reads nothing: {}",
        corral.log_text()
    );
    // The client's connection was closed by corral: what it finally reads ends.
    let mut sink = Vec::new();
    let read = std::io::Read::read_to_end(&mut s, &mut sink);
    assert!(
        read.is_err() || sink.len() < BODY,
        "the whole answer came: {}",
        sink.len()
    );
}
