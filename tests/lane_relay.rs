//! A lane's relay set (`proxy::lane_relay`, the default for cleartext tunnels): one
//! task per serving thread relays all of its tunnels' bytes, and gives a tunnel back
//! to its own task for its close code, an end, or a side that cannot take a read at
//! once. Over real sockets: corral runs as its own process in front of an in-process
//! raw worker (`support::RawWorker`).
//!
//! Each test asks the log that the set did relay (and, where it matters, that the
//! tunnel was taken back, and why), so a tunnel that silently stayed on its own
//! task fails them.

mod support;

use futures_util::{SinkExt, StreamExt};
use std::time::{Duration, Instant};
use support::{Corral, Mode, RawWorker, FLOOD_SIZES};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn corral_for(worker: &RawWorker, extra: &str) -> Corral {
    Corral::start(&format!("upstreams = [\"{}\"]\n{extra}\n", worker.addr))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn open(rt: &tokio::runtime::Runtime, corral: &Corral) -> Ws {
    let url = format!("ws://{}/socket.io/?EIO=4&transport=websocket", corral.addr);
    rt.block_on(tokio_tungstenite::connect_async(url.as_str()))
        .unwrap_or_else(|e| panic!("websocket through corral: {e}: {}", corral.log_text()))
        .0
}

fn next(rt: &tokio::runtime::Runtime, ws: &mut Ws, corral: &Corral) -> Message {
    match rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), ws.next()).await }) {
        Ok(Some(Ok(m))) => m,
        other => panic!("expected a frame, got {other:?}: {}", corral.log_text()),
    }
}

fn times_in_log(corral: &Corral, text: &str) -> usize {
    corral.log_text().matches(text).count()
}

const IN_SET: &str = "tunnel relayed in its lane's set";
const TAKEN_BACK: &str = "tunnel taken back from its lane's set";

/// Waits until `n` tunnels are in their lane's set.
fn wait_in_set(corral: &Corral, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while times_in_log(corral, IN_SET) < n {
        assert!(Instant::now() < deadline, "{}", corral.log_text());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Frames of many sizes both ways, on one serving thread and on several (where the
/// tunnel moves to its worker's thread first): whole and in order, every tunnel in
/// its lane's set throughout (the worker's first frame comes in the same write as
/// its 101, so it goes on before the tunnel enters); at shutdown each client gets
/// 1001, sent once its tunnel is taken back for it.
#[test]
fn tunnels_in_a_lanes_set_carry_frames_whole_and_close_cleanly() {
    for threads in [1, 3] {
        let worker = RawWorker::start(Mode::WebSocketHello);
        let mut corral = corral_for(&worker, &format!("threads = {threads}"));
        let rt = runtime();
        let size = |i: usize, round: usize| (i * 7919 + round * 104_729) % 8_000 + 1;
        let payload = |i: usize, round: usize| -> Vec<u8> {
            (0..size(i, round))
                .map(|k| (k * 31 + i + round) as u8)
                .collect()
        };
        let mut clients = Vec::new();
        for _ in 0..6 {
            let mut ws = open(&rt, &corral);
            assert_eq!(next(&rt, &mut ws, &corral), Message::text("hello"));
            clients.push(ws);
        }
        wait_in_set(&corral, clients.len());
        for round in 0..8 {
            for (i, ws) in clients.iter_mut().enumerate() {
                rt.block_on(ws.send(Message::binary(payload(i, round))))
                    .expect("send");
                rt.block_on(ws.send(Message::text(format!("{i}/{round}"))))
                    .expect("send");
            }
            for (i, ws) in clients.iter_mut().enumerate() {
                let echo = next(&rt, ws, &corral);
                assert!(
                    echo == Message::binary(payload(i, round)),
                    "client {i} round {round}"
                );
                assert_eq!(
                    next(&rt, ws, &corral),
                    Message::text(format!("{i}/{round}"))
                );
            }
        }
        assert_eq!(
            times_in_log(&corral, IN_SET),
            6,
            "threads = {threads}: {}",
            corral.log_text()
        );
        assert_eq!(
            times_in_log(&corral, TAKEN_BACK),
            0,
            "the set relayed every frame: {}",
            corral.log_text()
        );
        corral.terminate();
        for ws in clients.iter_mut() {
            match next(&rt, ws, &corral) {
                Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::Away),
                other => panic!("expected 1001, got {other:?}"),
            }
        }
        let status = corral.wait_exit(Duration::from_secs(10));
        assert!(status.is_some_and(|s| s.success()), "{status:?}");
        assert_eq!(
            times_in_log(&corral, "why=\"to send its close frame\""),
            6,
            "{}",
            corral.log_text()
        );
    }
}

/// The worker floods frames of every header form (up to 130 kB, many segments
/// each): the set gives the tunnel back to its task (a bulk transfer, or a client
/// socket that could not take a whole read), which goes on from there, and at
/// SIGTERM lets the frame in progress end and only then sends 1001 — every frame
/// the client gets is whole and in order.
#[test]
fn a_bulk_transfer_loses_nothing_and_closes_between_frames() {
    let worker = RawWorker::start(Mode::WebSocket);
    let mut corral = corral_for(&worker, "");
    let rt = runtime();
    let mut ws = open(&rt, &corral);
    wait_in_set(&corral, 1);
    rt.block_on(ws.send(Message::text("flood"))).expect("send");
    let mut n = 0usize;
    let check = |m: Message, n: usize| match m {
        Message::Binary(b) => {
            let want = FLOOD_SIZES[n % FLOOD_SIZES.len()];
            assert_eq!(b.len(), want, "frame {n}");
            assert!(b.iter().all(|x| *x == n as u8), "frame {n} garbled");
        }
        other => panic!("frame {n}: {other:?}"),
    };
    std::thread::sleep(Duration::from_millis(300));
    while n < 200 {
        check(next(&rt, &mut ws, &corral), n);
        n += 1;
    }
    // Which comes first depends on the machine's timing; the set's unit tests
    // show each alone.
    let log = corral.log_text();
    assert!(
        log.contains("why=\"a bulk transfer\"")
            || log.contains("why=\"a side that could not take a whole read\""),
        "{log}"
    );
    corral.terminate();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        assert!(Instant::now() < deadline, "no close frame");
        match next(&rt, &mut ws, &corral) {
            Message::Close(Some(f)) => {
                assert_eq!(f.code, CloseCode::Away);
                break;
            }
            m => check(m, n),
        }
        n += 1;
    }
    let status = corral.wait_exit(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

/// A hundred frames in one segment, then more: whole and in order, and the tunnel
/// stays in its set.
#[test]
fn many_frames_in_one_read_are_relayed_whole() {
    let worker = RawWorker::start(Mode::WebSocket);
    let corral = corral_for(&worker, "");
    let rt = runtime();
    let mut ws = open(&rt, &corral);
    wait_in_set(&corral, 1);
    rt.block_on(ws.send(Message::text("burst"))).expect("send");
    for i in 0..100u8 {
        assert_eq!(next(&rt, &mut ws, &corral), Message::binary(vec![i]));
    }
    rt.block_on(ws.send(Message::text("after"))).expect("send");
    assert_eq!(next(&rt, &mut ws, &corral), Message::text("after"));
    assert_eq!(
        times_in_log(&corral, TAKEN_BACK),
        0,
        "{}",
        corral.log_text()
    );
}

/// A tunnel in its set with no bytes for `websocket_idle` is closed (between one
/// and one and an eighth idle periods, as on its own task); bytes the set moves
/// keep it open past that.
#[test]
fn tunnels_in_a_set_close_when_idle_and_stay_open_while_used() {
    let worker = RawWorker::start(Mode::WebSocket);
    let corral = corral_for(&worker, "[timeouts]\nwebsocket_idle = \"1s\"\n");
    let rt = runtime();
    let mut ws = open(&rt, &corral);
    wait_in_set(&corral, 1);
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
    assert_eq!(
        times_in_log(&corral, TAKEN_BACK),
        0,
        "{}",
        corral.log_text()
    );
    assert!(corral.log_text().contains("tunnel idle, closing"));
}

/// The client closes: its close frame reaches the worker through the set, the
/// worker's answer comes back, and both connections end (the worker's too).
#[test]
fn a_client_close_ends_both_connections() {
    let worker = RawWorker::start(Mode::WebSocket);
    let corral = corral_for(&worker, "");
    let rt = runtime();
    let mut ws = open(&rt, &corral);
    wait_in_set(&corral, 1);
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
    assert_eq!(times_in_log(&corral, IN_SET), 1, "{}", corral.log_text());
}

/// The worker's connection is reset while the tunnel is in its set: the client's
/// connection ends at once.
#[test]
fn a_reset_worker_connection_ends_the_tunnel_at_once() {
    let worker = RawWorker::start(Mode::WebSocket);
    let corral = corral_for(&worker, "");
    let rt = runtime();
    let mut ws = open(&rt, &corral);
    wait_in_set(&corral, 1);
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
