//! Lifetimes at their edges, over real sockets: a request in flight when SIGTERM
//! arrives, websocket tunnels at shutdown, and the connection cap with tunnels.
//!
//! corral runs as its own process in front of an in-process raw worker
//! (`support::RawWorker`) that can delay its answers or speak websocket.

mod support;

use futures_util::{SinkExt, StreamExt};
use std::io::{BufReader, Write};
use std::thread;
use std::time::{Duration, Instant};
use support::{read_reply, Corral, Mode, RawWorker};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

fn corral_for(worker: &RawWorker, extra: &str) -> Corral {
    Corral::start(&format!("upstreams = [\"{}\"]\n{extra}", worker.addr))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// SIGTERM half a second into a request the worker takes 2 s to answer: the answer
/// still arrives (it used to be an empty reply at once), and corral then exits.
#[test]
fn sigterm_lets_a_request_in_flight_finish() {
    let worker = RawWorker::start(Mode::Delay(Duration::from_secs(2)));
    let mut corral = corral_for(&worker, "[timeouts]\nshutdown_drain = \"10s\"\n");
    let mut s = corral.connect();
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
        .expect("write");
    thread::sleep(Duration::from_millis(500));
    corral.terminate();
    let reply = read_reply(&mut BufReader::new(s));
    let reply = reply.unwrap_or_else(|| panic!("no answer: {}", corral.log_text()));
    assert_eq!(reply.status, 200);
    let status = corral.wait_exit(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

/// At shutdown an open websocket gets a close frame, 1001 "going away", so the
/// client sees a clean close and reconnects; the worker connection is closed too.
#[test]
fn sigterm_closes_websockets_cleanly() {
    let worker = RawWorker::start(Mode::WebSocket);
    let mut corral = corral_for(&worker, "");
    let url = format!("ws://{}/socket.io/?EIO=4&transport=websocket", corral.addr);
    let rt = runtime();
    let (mut ws, _) = rt
        .block_on(tokio_tungstenite::connect_async(url.as_str()))
        .expect("websocket through corral");
    rt.block_on(ws.send(Message::text("ping"))).expect("send");
    let echo = rt.block_on(ws.next()).expect("echo").expect("frame");
    assert_eq!(echo, Message::text("ping"));
    corral.terminate();
    let started = Instant::now();
    let close = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(5), ws.next()).await })
        .expect("a frame before the timeout");
    match close {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Away),
        other => panic!(
            "expected a close frame, got {other:?}: {}",
            corral.log_text()
        ),
    }
    assert!(started.elapsed() < Duration::from_secs(3));
    let status = corral.wait_exit(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

/// With `max_connections = 1`, an open tunnel holds the one slot: a second client
/// is not served until the first tunnel closes.
#[test]
fn a_tunnel_holds_its_connection_slot() {
    let worker = RawWorker::start(Mode::WebSocket);
    let corral = corral_for(&worker, "[limits]\nmax_connections = 1\n");
    let url = format!("ws://{}/ws", corral.addr);
    let rt = runtime();
    let (mut first, _) = rt
        .block_on(tokio_tungstenite::connect_async(url.as_str()))
        .expect("first tunnel");
    rt.block_on(first.send(Message::text("a"))).expect("send");
    assert!(rt.block_on(first.next()).is_some());
    // Give the first connection's HTTP side time to hand over to the tunnel.
    thread::sleep(Duration::from_millis(200));
    let second = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_millis(1500),
            tokio_tungstenite::connect_async(url.as_str()),
        )
        .await
    });
    assert!(
        second.is_err(),
        "a second tunnel opened while the first held the only slot"
    );
    rt.block_on(first.close(None)).expect("close");
    drop(first);
    let (mut again, _) = rt
        .block_on(async {
            tokio::time::timeout(
                Duration::from_secs(5),
                tokio_tungstenite::connect_async(url.as_str()),
            )
            .await
        })
        .expect("served once the first tunnel closed")
        .expect("tunnel");
    rt.block_on(again.send(Message::text("b"))).expect("send");
    assert_eq!(
        rt.block_on(again.next()).expect("echo").expect("frame"),
        Message::text("b")
    );
}

/// One health check that times out costs a live worker nothing (fall 3); checks
/// that keep failing do mark it down (so the first half can fail).
#[test]
fn one_slow_health_check_marks_nothing_down() {
    let health = "[health]\npath = \"/health\"\ninterval = \"200ms\"\ntimeout = \"300ms\"\n";
    let once = RawWorker::start(Mode::SlowHealth(1));
    let always = RawWorker::start(Mode::SlowHealth(usize::MAX));
    let c_once = corral_for(&once, health);
    let c_always = corral_for(&always, health);
    thread::sleep(Duration::from_secs(3));
    assert!(
        !c_once.log_text().contains("worker marked down"),
        "{}",
        c_once.log_text()
    );
    assert!(
        c_always.log_text().contains("worker marked down"),
        "{}",
        c_always.log_text()
    );
}
