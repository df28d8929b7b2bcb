//! Config reloads at the socket: `reload --keep-workers` applies a changed file to
//! new connections while an open websocket goes on; a broken file, or a change to a
//! key that cannot change live, is refused by name and changes nothing; static
//! upstreams join and leave.
//!
//! corral runs as its own process in front of in-process raw workers
//! (`support::RawWorker`); the test rewrites its config file and asks it to reload
//! on its admin socket.

mod support;

use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use support::{exchange, Corral, Mode, RawWorker};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn upstream(worker: &RawWorker) -> String {
    format!("upstreams = [\"{}\"]\n", worker.addr)
}

/// The status of a POST with a body of `size` bytes.
fn post(corral: &Corral, size: usize) -> Option<u16> {
    let head = format!("POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: {size}\r\n\r\n");
    let mut bytes = head.into_bytes();
    bytes.resize(bytes.len() + size, b'x');
    exchange(corral.addr, &bytes).map(|r| r.status)
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn open_websocket(rt: &tokio::runtime::Runtime, corral: &Corral) -> Ws {
    let url = format!("ws://{}/ws", corral.addr);
    let (ws, _) = rt
        .block_on(tokio_tungstenite::connect_async(url.as_str()))
        .expect("websocket through corral");
    ws
}

fn echoes(rt: &tokio::runtime::Runtime, ws: &mut Ws, text: &str) -> bool {
    rt.block_on(async {
        ws.send(Message::text(text)).await.ok()?;
        let reply = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .ok()??;
        Some(reply.ok()? == Message::text(text))
    })
    .unwrap_or(false)
}

#[test]
fn a_reload_applies_the_new_file_to_new_connections_and_keeps_open_ones() {
    let worker = RawWorker::start(Mode::WebSocket);
    let before = format!("{}[limits]\nmax_body = \"1K\"\n", upstream(&worker));
    let corral = Corral::start(&before);
    assert_eq!(post(&corral, 2048), Some(413));
    let rt = runtime();
    let mut ws = open_websocket(&rt, &corral);
    assert!(echoes(&rt, &mut ws, "before"));
    let access = corral.dir.0.join("access.log");
    corral.rewrite(&format!(
        "{}[limits]\nmax_body = \"4K\"\n[access_log]\nenabled = true\npath = \"{}\"\n",
        upstream(&worker),
        access.display()
    ));
    let answer = corral.admin("reload --keep-workers");
    assert!(answer.starts_with("ok: config reloaded"), "{answer}");
    for key in ["limits.max_body", "access_log.enabled", "access_log.path"] {
        assert!(answer.contains(key), "{key} not in: {answer}");
    }
    assert_eq!(post(&corral, 2048), Some(200), "{}", corral.log_text());
    assert!(echoes(&rt, &mut ws, "after"), "{}", corral.log_text());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut logged = String::new();
    while !logged.contains("POST /up") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        logged = std::fs::read_to_string(&access).unwrap_or_default();
    }
    assert!(logged.contains("\"POST /up HTTP/1.1\" 200"), "{logged}");
}

#[test]
fn a_broken_file_is_refused_by_name_and_nothing_changes() {
    let worker = RawWorker::start(Mode::WebSocket);
    let good = format!("{}[limits]\nmax_body = \"1K\"\n", upstream(&worker));
    let corral = Corral::start(&good);
    let rt = runtime();
    let mut ws = open_websocket(&rt, &corral);
    for (broken, key) in [
        (
            format!("{}[limits]\nmax_body = \"4MB\"\n", upstream(&worker)),
            "limits.max_body",
        ),
        (
            format!("{}[limits]\nmax_bdoy = \"4K\"\n", upstream(&worker)),
            "max_bdoy",
        ),
        (
            format!(
                "{}[auth]\nhtpasswd = \"/nonexistent/htpasswd\"\n",
                upstream(&worker)
            ),
            "auth.htpasswd",
        ),
        (format!("{}[limits\n", upstream(&worker)), "corral.toml"),
    ] {
        corral.rewrite(&broken);
        let answer = corral.admin("reload --keep-workers");
        assert!(answer.starts_with("error:"), "{answer}");
        assert!(answer.contains(key), "{key} not in: {answer}");
        assert!(answer.contains("corral.toml"), "{answer}");
        assert!(answer.contains("unchanged"), "{answer}");
        // Still the old limit, no auth, and the websocket untouched.
        assert_eq!(post(&corral, 2048), Some(413), "{broken}");
        assert_eq!(post(&corral, 10), Some(200), "{broken}");
        assert!(echoes(&rt, &mut ws, key), "{}", corral.log_text());
    }
}

/// A change the running corral cannot apply (a listener, the serving threads)
/// refuses the whole reload, naming it, even beside keys that could change.
#[test]
fn a_key_that_cannot_change_live_refuses_the_whole_reload() {
    let worker = RawWorker::start(Mode::Echo);
    let corral = Corral::start(&format!(
        "{}[limits]\nmax_body = \"1K\"\n",
        upstream(&worker)
    ));
    corral.rewrite(&format!(
        "{}threads = 3\n[limits]\nmax_body = \"4K\"\n",
        upstream(&worker)
    ));
    let answer = corral.admin("reload --keep-workers");
    assert!(answer.starts_with("error:"), "{answer}");
    assert!(answer.contains("threads"), "{answer}");
    assert!(!answer.contains("max_body"), "{answer}");
    assert_eq!(post(&corral, 2048), Some(413));
}

/// Upstreams added by a reload get traffic at once; a removed one is served out:
/// its websocket is closed with 1012 (service restart), and it gets no new request.
#[test]
fn static_upstreams_join_and_leave_with_a_reload() {
    let old = RawWorker::start(Mode::WebSocket);
    let new = RawWorker::start(Mode::WebSocket);
    let corral = Corral::start(&upstream(&old));
    let rt = runtime();
    let mut ws = open_websocket(&rt, &corral);
    assert!(echoes(&rt, &mut ws, "on the old one"));
    corral.rewrite(&upstream(&new));
    let answer = corral.admin("reload --keep-workers");
    assert!(answer.contains("upstreams"), "{answer}");
    let close = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), ws.next()).await })
        .unwrap_or_else(|_| panic!("no close: {}", corral.log_text()));
    match close {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Restart),
        other => panic!(
            "expected a close frame, got {other:?}: {}",
            corral.log_text()
        ),
    }
    let before = old.seen_for("/after").len();
    for _ in 0..5 {
        let r = exchange(corral.addr, b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(r.map(|r| r.status), Some(200));
    }
    assert_eq!(new.seen_for("/after").len(), 5);
    assert_eq!(old.seen_for("/after").len(), before);
}

/// Waits up to two seconds for `addr` to refuse connections (a closed listener's
/// sockets are dropped by its accept loops, on their threads).
fn refuses(addr: std::net::SocketAddr) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        if std::net::TcpStream::connect(addr).is_err() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn get_status(addr: std::net::SocketAddr, path: &str) -> Option<u16> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n");
    exchange(addr, req.as_bytes()).map(|r| r.status)
}

/// A listener added by a reload accepts at once; a removed one stops accepting
/// while the websocket accepted on it goes on; the admin socket tells the
/// listeners as they are.
#[test]
fn listeners_are_bound_and_closed_live_and_their_connections_go_on() {
    let worker = RawWorker::start(Mode::WebSocket);
    let corral = Corral::start(&upstream(&worker));
    let first = corral.addr;
    let rt = runtime();
    let mut ws = open_websocket(&rt, &corral);
    corral.rewrite_listen(
        "listen = [\"127.0.0.1:0\", \"127.0.0.2:0\"]",
        &upstream(&worker),
    );
    let answer = corral.admin("reload --keep-workers");
    assert!(answer.starts_with("ok: config reloaded"), "{answer}");
    assert!(answer.contains("listen"), "{answer}");
    let (now, _) = corral.bound_now();
    assert_eq!(now.len(), 2, "{now:?}");
    assert_eq!(now[0], first, "the kept listener keeps its port");
    let second = now[1];
    assert_eq!(second.ip().to_string(), "127.0.0.2");
    assert_eq!(get_status(second, "/new"), Some(200));
    assert_eq!(get_status(first, "/old"), Some(200));

    corral.rewrite_listen("listen = [\"127.0.0.2:0\"]", &upstream(&worker));
    let answer = corral.admin("reload --keep-workers");
    assert!(answer.starts_with("ok: config reloaded"), "{answer}");
    assert_eq!(corral.bound_now().0, vec![second]);
    assert!(refuses(first), "the removed listener still accepts");
    assert_eq!(get_status(second, "/still"), Some(200));
    assert!(
        echoes(&rt, &mut ws, "on a closed listener"),
        "{}",
        corral.log_text()
    );
}

/// A port another process holds refuses the reload, naming the address; the
/// running listeners stay as they were.
#[test]
fn a_listener_that_cannot_bind_refuses_the_reload() {
    let worker = RawWorker::start(Mode::Echo);
    let corral = Corral::start(&format!(
        "{}[limits]\nmax_body = \"1K\"\n",
        upstream(&worker)
    ));
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    corral.rewrite_listen(
        &format!("listen = [\"127.0.0.1:0\", \"127.0.0.1:{port}\"]"),
        &format!("{}[limits]\nmax_body = \"4K\"\n", upstream(&worker)),
    );
    let answer = corral.admin("reload --keep-workers");
    assert!(answer.starts_with("error:"), "{answer}");
    assert!(answer.contains(&format!("127.0.0.1:{port}")), "{answer}");
    assert!(answer.contains("unchanged"), "{answer}");
    assert_eq!(corral.bound_now().0, vec![corral.addr]);
    assert_eq!(post(&corral, 2048), Some(413), "max_body unchanged too");
}

fn certificate(
    dir: &support::TempDir,
    name: &str,
) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).expect("cert");
    let pem = made.cert.pem();
    let cert = dir.file(&format!("{name}.pem"), &pem);
    let key = dir.file(&format!("{name}.key"), &made.signing_key.serialize_pem());
    (cert, key, pem)
}

/// Whether a TLS handshake with `addr` succeeds for a client trusting only `pem`.
fn trusted_by(rt: &tokio::runtime::Runtime, addr: std::net::SocketAddr, pem: &str) -> bool {
    let connector = support::tls_trusting(pem);
    rt.block_on(async {
        let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
            return false;
        };
        let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
        let handshake = connector.connect(name, tcp);
        matches!(
            tokio::time::timeout(Duration::from_secs(5), handshake).await,
            Ok(Ok(_))
        )
    })
}

/// A TLS listener added by a reload serves its certificate; a certificate file
/// that no longer loads refuses the reload by its path (the old one stays in
/// use); new files named by the config are in use after the next reload.
#[test]
fn tls_listeners_and_their_certificates_change_live() {
    let worker = RawWorker::start(Mode::Echo);
    let corral = Corral::start(&upstream(&worker));
    let dir = support::TempDir::new("certs");
    let (cert1, key1, pem1) = certificate(&dir, "one");
    let (cert2, key2, pem2) = certificate(&dir, "two");
    let tls = |cert: &std::path::Path, key: &std::path::Path| {
        format!(
            "{}[[listener]]\naddress = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
            upstream(&worker),
            cert.display(),
            key.display()
        )
    };
    corral.rewrite(&tls(&cert1, &key1));
    let answer = corral.admin("reload --keep-workers");
    assert!(answer.starts_with("ok: config reloaded"), "{answer}");
    let (now, _) = corral.bound_now();
    assert_eq!(now.len(), 2, "{now:?}");
    let secure = now[1];
    let rt = runtime();
    assert!(trusted_by(&rt, secure, &pem1), "{}", corral.log_text());
    assert!(!trusted_by(&rt, secure, &pem2));

    std::fs::write(&cert1, "not a certificate").expect("spoil");
    let answer = corral.admin("reload --keep-workers");
    assert!(answer.starts_with("error:"), "{answer}");
    assert!(answer.contains(&cert1.display().to_string()), "{answer}");
    assert!(trusted_by(&rt, secure, &pem1), "the old certificate stays");

    corral.rewrite(&tls(&cert2, &key2));
    let answer = corral.admin("reload --keep-workers");
    assert!(answer.starts_with("ok: config reloaded"), "{answer}");
    assert_eq!(corral.bound_now().0[1], secure, "the same socket");
    assert!(trusted_by(&rt, secure, &pem2), "{}", corral.log_text());
    assert!(!trusted_by(&rt, secure, &pem1));
}

/// `[admin]` added by a reload serves the status pages; new credentials apply to
/// its next connections; moved, it answers on the new address only; removed, on
/// none.
#[test]
fn the_status_listener_starts_moves_and_closes_live() {
    let worker = RawWorker::start(Mode::Echo);
    let corral = Corral::start(&upstream(&worker));
    assert_eq!(corral.bound_now().1, None);
    corral.rewrite(&format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\n",
        upstream(&worker)
    ));
    let answer = corral.admin("reload --keep-workers");
    assert!(answer.contains("admin"), "{answer}");
    let status = corral.bound_now().1.expect("a status listener");
    assert_eq!(get_status(status, "/metrics"), Some(200));

    let htpasswd = support::htpasswd(&corral.dir, "admin", "secret");
    corral.rewrite(&format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\nhtpasswd = \"{}\"\n",
        upstream(&worker),
        htpasswd.display()
    ));
    let answer = corral.admin("reload --keep-workers");
    assert!(answer.contains("admin.htpasswd"), "{answer}");
    assert_eq!(corral.bound_now().1, Some(status), "the same listener");
    assert_eq!(get_status(status, "/metrics"), Some(401));
    assert_eq!(get_status(status, "/healthz"), Some(200));

    corral.rewrite(&format!(
        "{}[admin]\nlisten = \"127.0.0.3:0\"\n",
        upstream(&worker)
    ));
    corral.admin("reload --keep-workers");
    let moved = corral.bound_now().1.expect("a status listener");
    assert_eq!(moved.ip().to_string(), "127.0.0.3");
    assert_eq!(get_status(moved, "/metrics"), Some(200));
    assert!(refuses(status), "the old status listener still accepts");

    corral.rewrite(&upstream(&worker));
    corral.admin("reload --keep-workers");
    assert_eq!(corral.bound_now().1, None);
    assert!(refuses(moved));
}

const HANDSHAKE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=UTF-8\r\nContent-Length: 106\r\n\r\n0{\"sid\":\"abcdefgh\",\"upgrades\":[\"websocket\"],\"pingInterval\":25000,\"pingTimeout\":20000,\"maxPayload\":1000000}";

/// Tagged sids with a canned Engine.IO worker (every request on its path is
/// answered with a handshake).
fn tagged(worker: &RawWorker, cluster: &str) -> String {
    format!(
        "{}[engineio]\npath = \"/canned/\"\ntag_sids = true\n[cluster]\n{cluster}\n",
        upstream(worker)
    )
}

/// A new session's tagged sid, through `addr`.
fn handshake(addr: std::net::SocketAddr) -> String {
    let r = exchange(
        addr,
        b"GET /canned/?EIO=4&transport=polling HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .expect("handshake");
    let body = String::from_utf8_lossy(&r.body).to_string();
    let start = body.find("\"sid\":\"").expect("sid") + 7;
    let end = start + body[start..].find('"').expect("end of sid");
    body[start..end].to_string()
}

/// The status of a polling request of the session `sid` through `addr`: 200 when
/// its tag checks out, 400 (Session ID unknown) when not.
fn poll(addr: std::net::SocketAddr, sid: &str) -> Option<u16> {
    let req = format!("GET /canned/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: a\r\n\r\n");
    exchange(addr, req.as_bytes()).map(|r| r.status)
}

/// The tag key rotates with reloads: the key a reload replaces is accepted for
/// `previous_key_for`, `accept_keys` are accepted and never signed with, and a key
/// no longer listed is refused.
#[test]
fn the_tag_key_rotates_with_reloads() {
    let worker = RawWorker::start(Mode::Canned(HANDSHAKE, false));
    let (k1, k2, k3) = (
        "key-one-0123456789",
        "key-two-0123456789",
        "key-three-0123456789",
    );
    let corral = Corral::start(&tagged(&worker, &format!("key = \"{k1}\"")));
    let one = handshake(corral.addr);
    assert!(one.starts_with("abcdefgh."), "{one}");
    assert_eq!(poll(corral.addr, &one), Some(200));
    assert_eq!(poll(corral.addr, &format!("{one}x")), Some(400));

    corral.rewrite(&tagged(&worker, &format!("key = \"{k2}\"")));
    let answer = corral.admin("reload --keep-workers");
    assert!(answer.contains("cluster.key"), "{answer}");
    let two = handshake(corral.addr);
    assert_ne!(two, one, "new sessions are signed with the new key");
    assert_eq!(poll(corral.addr, &two), Some(200));
    assert_eq!(
        poll(corral.addr, &one),
        Some(200),
        "the replaced key still accepted"
    );

    corral.rewrite(&tagged(
        &worker,
        &format!("key = \"{k3}\"\naccept_keys = [\"{k2}\"]\nprevious_key_for = \"0s\""),
    ));
    let answer = corral.admin("reload --keep-workers");
    assert!(answer.starts_with("ok:"), "{answer}");
    assert_eq!(poll(corral.addr, &two), Some(200), "an accepted key");
    assert_eq!(
        poll(corral.addr, &one),
        Some(400),
        "a key no longer accepted"
    );
    let three = handshake(corral.addr);
    assert_ne!(three, two);
    assert_eq!(poll(corral.addr, &three), Some(200));

    corral.rewrite(&tagged(
        &worker,
        &format!("key = \"{k3}\"\nprevious_key_for = \"0s\""),
    ));
    corral.admin("reload --keep-workers");
    assert_eq!(poll(corral.addr, &two), Some(400));
    assert_eq!(poll(corral.addr, &three), Some(200));
}

/// A node added by a reload is routed to: a session tagged by it, sent to this
/// node, is answered by its worker (one hop) instead of "Session ID unknown".
#[test]
fn cluster_nodes_join_with_a_reload() {
    let key = "key = \"shared-key-0123456789\"";
    let (wa, wb) = (
        RawWorker::start(Mode::Canned(HANDSHAKE, false)),
        RawWorker::start(Mode::Canned(HANDSHAKE, false)),
    );
    let a = Corral::start(&tagged(&wa, &format!("node = \"a\"\n{key}")));
    let b = Corral::start(&tagged(
        &wb,
        &format!("node = \"b\"\n{key}\n[cluster.nodes]\na = \"{}\"", a.addr),
    ));
    let on_b = handshake(b.addr);
    assert_eq!(poll(a.addr, &on_b), Some(400), "a does not know b yet");
    a.rewrite(&tagged(
        &wa,
        &format!("node = \"a\"\n{key}\n[cluster.nodes]\nb = \"{}\"", b.addr),
    ));
    let answer = a.admin("reload --keep-workers");
    assert!(answer.contains("cluster.nodes"), "{answer}");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut status = poll(a.addr, &on_b);
    while status != Some(200) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        status = poll(a.addr, &on_b);
    }
    assert_eq!(status, Some(200), "{}", a.log_text());
    let session = |w: &RawWorker| {
        let seen = w.seen().into_iter();
        seen.filter(|s| s.target().contains("sid=abcdefgh")).count()
    };
    assert_eq!(session(&wb), 1, "b's worker answered the session's request");
    assert_eq!(session(&wa), 0);
}

/// SIGHUP with a certificate that no longer exists: the reload is refused, and the
/// log says so once (the reload's own line), not twice. The refusal is also in
/// `/status.json`'s reloads.
#[test]
fn a_sighup_refused_for_a_missing_certificate_is_said_once() {
    let worker = RawWorker::start(Mode::Echo);
    let dir = support::TempDir::new("sighup");
    let (cert, key, _) = certificate(&dir, "gone");
    let corral = Corral::start(&format!(
        "{}[[listener]]\naddress = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        upstream(&worker),
        cert.display(),
        key.display()
    ));
    std::fs::remove_file(&cert).expect("remove");
    // SAFETY: a plain signal to the corral this test started.
    unsafe {
        libc::kill(corral.child.id() as i32, libc::SIGHUP);
    }
    let status = corral.status.expect("status listener");
    let refused = || {
        let ask = b"GET /status.json HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
        let json: serde_json::Value = support::exchange(status, ask)
            .and_then(|r| serde_json::from_slice(&r.body).ok())
            .unwrap_or_default();
        json["reloads"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r["applied"] == false))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !refused() {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            corral.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = corral.log_text();
    let name = cert.display().to_string();
    let said = log.lines().filter(|l| l.contains(&name)).count();
    assert_eq!(said, 1, "{log}");
}

/// A websocket through corral within `wait`, or None (not served: no slot).
fn websocket_within(rt: &tokio::runtime::Runtime, corral: &Corral, wait: Duration) -> Option<Ws> {
    let url = format!("ws://{}/ws", corral.addr);
    rt.block_on(async {
        let opening = tokio_tungstenite::connect_async(url.as_str());
        tokio::time::timeout(wait, opening).await.ok()?.ok()
    })
    .map(|(ws, _)| ws)
}

/// `limits.max_connections` shrunk by a reload while every slot is held by a
/// tunnel, then grown again once some have closed: the capacity is the configured
/// one each time (the slots owed by the shrink are waived by the growth, none lost).
#[test]
fn max_connections_shrunk_while_busy_and_grown_again_gives_the_configured_capacity() {
    let worker = RawWorker::start(Mode::WebSocket);
    let limits = |n: usize| {
        format!(
            "{}[limits]\nmax_connections = {n}\n[admin]\nlisten = \"127.0.0.1:0\"\n",
            upstream(&worker)
        )
    };
    let corral = Corral::start(&limits(3));
    let rt = runtime();
    let mut open: Vec<Ws> = (0..3).map(|_| open_websocket(&rt, &corral)).collect();
    support::relay::wait_tunnels(&corral, 3);
    corral.rewrite(&limits(1));
    assert!(corral.admin("reload --keep-workers").starts_with("ok"));
    open.truncate(1);
    support::relay::wait_tunnels(&corral, 1);
    // One tunnel open, a size of one: no room.
    assert!(websocket_within(&rt, &corral, Duration::from_millis(800)).is_none());
    corral.rewrite(&limits(3));
    assert!(corral.admin("reload --keep-workers").starts_with("ok"));
    for _ in 0..2 {
        let ws = websocket_within(&rt, &corral, Duration::from_secs(5));
        open.push(ws.expect("room for three"));
    }
    support::relay::wait_tunnels(&corral, 3);
    assert!(
        websocket_within(&rt, &corral, Duration::from_millis(800)).is_none(),
        "a fourth beyond three"
    );
    assert!(open.iter_mut().all(|ws| echoes(&rt, ws, "still open")));
}
