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
