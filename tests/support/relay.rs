//! Websocket tunnels through corral, for the tunnel tests (`tests/tunnel.rs`,
//! `tests/lifecycle.rs`): a client over real sockets, and the scenarios the relay
//! must pass, each reading corral's state from `/metrics` (how many tunnels are
//! open), never its log.

use super::{Corral, Mode, RawWorker};
use futures_util::{SinkExt, StreamExt};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

pub fn open(rt: &tokio::runtime::Runtime, corral: &Corral) -> Ws {
    let url = format!("ws://{}/socket.io/?EIO=4&transport=websocket", corral.addr);
    rt.block_on(tokio_tungstenite::connect_async(url.as_str()))
        .unwrap_or_else(|e| panic!("websocket through corral: {e}: {}", corral.log_text()))
        .0
}

pub fn next<S>(
    rt: &tokio::runtime::Runtime,
    ws: &mut tokio_tungstenite::WebSocketStream<S>,
    corral: &Corral,
) -> Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), ws.next()).await }) {
        Ok(Some(Ok(m))) => m,
        other => panic!("expected a frame, got {other:?}: {}", corral.log_text()),
    }
}

/// Waits (up to 5 s) until corral's `/metrics` says `n` websocket tunnels are open.
pub fn wait_tunnels(corral: &Corral, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let open = corral.metric("corral_websocket_tunnels");
        if open == Some(n as f64) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{open:?} tunnels open, not {n}: {}",
            corral.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The status listener's line for a `Corral::start` config.
pub const STATUS: &str = "[admin]\nlisten = \"127.0.0.1:0\"\n";

/// A `Mode::WebSocket` worker behind corral (`corral_for` with `extra` and a status
/// listener) and one websocket through it, once corral counts it open.
pub fn one_tunnel(
    corral_for: fn(&RawWorker, &str) -> Corral,
    extra: &str,
) -> (RawWorker, Corral, tokio::runtime::Runtime, Ws) {
    let worker = RawWorker::start(Mode::WebSocket);
    let corral = corral_for(&worker, &format!("{STATUS}{extra}"));
    let rt = runtime();
    let ws = open(&rt, &corral);
    wait_tunnels(&corral, 1);
    (worker, corral, rt, ws)
}

/// Checks the `n`th frame of the worker's flood (`support::FLOOD_SIZES`).
pub fn check_flood_frame(m: Message, n: usize) {
    match m {
        Message::Binary(b) => {
            let want = super::FLOOD_SIZES[n % super::FLOOD_SIZES.len()];
            assert_eq!(b.len(), want, "frame {n}");
            assert!(b.iter().all(|x| *x == n as u8), "frame {n} garbled");
        }
        other => panic!("frame {n}: {other:?}"),
    }
}

/// A tunnel with no bytes for `websocket_idle` (1 s) is closed between one and one
/// and an eighth idle periods after the last byte (a little more for the test's own
/// timing); bytes moved keep it open past that. Returns corral.
pub fn closes_when_idle_and_stays_open_while_used(
    corral_for: fn(&RawWorker, &str) -> Corral,
) -> Corral {
    let idle = "[timeouts]\nwebsocket_idle = \"1s\"\n";
    let (_worker, corral, rt, mut ws) = one_tunnel(corral_for, idle);
    let started = Instant::now();
    let mut quiet = Instant::now();
    while started.elapsed() < Duration::from_millis(2500) {
        std::thread::sleep(Duration::from_millis(250));
        rt.block_on(ws.send(Message::text("tick"))).expect("send");
        assert_eq!(next(&rt, &mut ws, &corral), Message::text("tick"));
        quiet = Instant::now();
    }
    let end = rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), ws.next()).await });
    let after = quiet.elapsed();
    assert!(
        matches!(end, Ok(None) | Ok(Some(Err(_)))),
        "the tunnel was not closed: {end:?}"
    );
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_millis(2000),
        "closed {after:?} after the last byte"
    );
    wait_tunnels(&corral, 0);
    corral
}

/// The client closes: its close frame reaches the worker, the worker's answer comes
/// back, and both connections end (the worker's too).
pub fn a_client_close_ends_both_connections(corral_for: fn(&RawWorker, &str) -> Corral) {
    let (worker, corral, rt, mut ws) = one_tunnel(corral_for, "");
    rt.block_on(ws.send(Message::text("x"))).expect("send");
    assert_eq!(next(&rt, &mut ws, &corral), Message::text("x"));
    rt.block_on(ws.close(None)).expect("close");
    match next(&rt, &mut ws, &corral) {
        Message::Close(_) => {}
        other => panic!("expected the worker's close, got {other:?}"),
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while worker.open_connections() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(worker.open_connections(), 0, "{}", corral.log_text());
    // The client's socket closes with its stream; then the tunnel has ended both ways.
    drop(ws);
    wait_tunnels(&corral, 0);
}

/// The worker's connection is reset mid-tunnel: the client's connection ends at once.
pub fn a_reset_worker_connection_ends_the_tunnel_at_once(
    corral_for: fn(&RawWorker, &str) -> Corral,
) {
    let (_worker, _corral, rt, mut ws) = one_tunnel(corral_for, "");
    rt.block_on(ws.send(Message::text("reset"))).expect("send");
    let asked = Instant::now();
    let end = rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), ws.next()).await });
    assert!(
        matches!(end, Ok(None) | Ok(Some(Err(_)))),
        "the tunnel did not end: {end:?}"
    );
    assert!(
        asked.elapsed() < Duration::from_millis(500),
        "ended {:?} after the reset",
        asked.elapsed()
    );
}

/// `n` websockets through corral to a `Mode::WebSocketHello` worker, each past its
/// "hello" (which came in the same write as the 101).
pub fn open_hello_clients(rt: &tokio::runtime::Runtime, corral: &Corral, n: usize) -> Vec<Ws> {
    (0..n)
        .map(|_| {
            let mut ws = open(rt, corral);
            assert_eq!(next(rt, &mut ws, corral), Message::text("hello"));
            ws
        })
        .collect()
}

/// `rounds` rounds of a binary message (up to `max_size` bytes) and a text one from
/// every client, each echoed whole and in order.
pub fn echo_rounds<S>(
    rt: &tokio::runtime::Runtime,
    clients: &mut [tokio_tungstenite::WebSocketStream<S>],
    corral: &Corral,
    max_size: usize,
    rounds: usize,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let size = |i: usize, round: usize| (i * 7919 + round * 104_729) % max_size + 1;
    let payload = |i: usize, round: usize| -> Vec<u8> {
        (0..size(i, round))
            .map(|k| (k * 31 + i + round) as u8)
            .collect()
    };
    for round in 0..rounds {
        for (i, ws) in clients.iter_mut().enumerate() {
            rt.block_on(ws.send(Message::binary(payload(i, round))))
                .expect("send");
            rt.block_on(ws.send(Message::text(format!("{i}/{round}"))))
                .expect("send");
        }
        for (i, ws) in clients.iter_mut().enumerate() {
            let echo = next(rt, ws, corral);
            assert!(
                echo == Message::binary(payload(i, round)),
                "client {i} round {round}"
            );
            assert_eq!(next(rt, ws, corral), Message::text(format!("{i}/{round}")));
        }
    }
}

/// The next frame on `ws`, within 5 s, is a close frame with `code`.
pub fn expect_close<S>(
    rt: &tokio::runtime::Runtime,
    ws: &mut tokio_tungstenite::WebSocketStream<S>,
    code: CloseCode,
    corral: &Corral,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match next(rt, ws, corral) {
        Message::Close(Some(frame)) => assert_eq!(frame.code, code),
        other => panic!(
            "expected a close frame, got {other:?}: {}",
            corral.log_text()
        ),
    }
}

/// Every client's next message is a close frame with 1001.
pub fn expect_going_away(rt: &tokio::runtime::Runtime, clients: &mut [Ws], corral: &Corral) {
    for ws in clients.iter_mut() {
        expect_close(rt, ws, CloseCode::Away, corral);
    }
}

/// Asks the worker for its flood, reads its first 200 frames (whole and in order),
/// then runs `before_stop`, stops corral, and reads on, each frame whole, until
/// the 1001 close frame; then corral must have exited cleanly.
pub fn flood_until_going_away(
    rt: &tokio::runtime::Runtime,
    ws: &mut Ws,
    corral: &mut Corral,
    pause_first: Duration,
    before_stop: impl FnOnce(&mut Corral),
) {
    rt.block_on(ws.send(Message::text("flood"))).expect("send");
    std::thread::sleep(pause_first);
    let mut n = 0usize;
    while n < 200 {
        check_flood_frame(next(rt, ws, corral), n);
        n += 1;
    }
    before_stop(corral);
    corral.terminate();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        assert!(Instant::now() < deadline, "no close frame");
        match next(rt, ws, corral) {
            Message::Close(Some(f)) => {
                assert_eq!(f.code, CloseCode::Away);
                break;
            }
            m => check_flood_frame(m, n),
        }
        n += 1;
    }
    let status = corral.wait_exit(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}
