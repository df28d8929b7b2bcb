//! Websocket tunnels through corral's one relay (`proxy::relay`, on the serving
//! thread of the tunnel's worker), over real sockets: corral runs as its own process
//! in front of an in-process raw worker (`support::RawWorker`), and the tests read
//! its state from `/metrics`, never its log.

mod support;

use futures_util::SinkExt;
use std::time::{Duration, Instant};
use support::relay::{self, next, runtime, wait_tunnels, STATUS};
use support::{Corral, Mode, RawWorker};
use tokio_tungstenite::tungstenite::Message;

fn corral_for(worker: &RawWorker, extra: &str) -> Corral {
    Corral::start(&format!("upstreams = [\"{}\"]\n{extra}\n", worker.addr))
}

/// Frames of many sizes both ways, on one serving thread and on several (where the
/// tunnel moves to its worker's thread first): whole and in order (the worker's
/// first frame comes in the same write as its 101); at shutdown each client gets
/// 1001 and corral exits cleanly.
#[test]
fn tunnels_carry_frames_whole_and_close_cleanly() {
    for threads in [1, 3] {
        let worker = RawWorker::start(Mode::WebSocketHello);
        let mut corral = corral_for(&worker, &format!("threads = {threads}\n{STATUS}"));
        let rt = runtime();
        let mut clients = relay::open_hello_clients(&rt, &corral, 6);
        wait_tunnels(&corral, 6);
        relay::echo_rounds(&rt, &mut clients, &corral, 60_000, 8);
        corral.terminate();
        relay::expect_going_away(&rt, &mut clients, &corral);
        let status = corral.wait_exit(Duration::from_secs(10));
        assert!(status.is_some_and(|s| s.success()), "{status:?}");
    }
}

/// The worker floods frames of every header form (up to 130 kB, many segments
/// each); at SIGTERM the tunnel lets the frame in progress end and only then sends
/// 1001: every frame the client gets is whole and in order.
#[test]
fn a_flood_loses_nothing_and_closes_between_frames() {
    let (_worker, mut corral, rt, mut ws) = relay::one_tunnel(corral_for, "");
    relay::flood_until_going_away(&rt, &mut ws, &mut corral, Duration::ZERO, |_| {});
}

/// A hundred frames in one segment, then more: whole and in order.
#[test]
fn many_frames_in_one_read_are_relayed_whole() {
    let (_worker, corral, rt, mut ws) = relay::one_tunnel(corral_for, "");
    rt.block_on(ws.send(Message::text("burst"))).expect("send");
    for i in 0..100u8 {
        assert_eq!(next(&rt, &mut ws, &corral), Message::binary(vec![i]));
    }
    rt.block_on(ws.send(Message::text("after"))).expect("send");
    assert_eq!(next(&rt, &mut ws, &corral), Message::text("after"));
}

/// A tunnel with no bytes for `websocket_idle` is closed; bytes keep it open.
#[test]
fn tunnels_close_when_idle_and_stay_open_while_used() {
    relay::closes_when_idle_and_stays_open_while_used(corral_for);
}

/// The client closes: its close frame reaches the worker, the worker's answer comes
/// back, and both connections end (the worker's too).
#[test]
fn a_client_close_ends_both_connections() {
    relay::a_client_close_ends_both_connections(corral_for);
}

/// The worker's connection is reset mid-tunnel: the client's connection ends at once.
#[test]
fn a_reset_worker_connection_ends_the_tunnel_at_once() {
    relay::a_reset_worker_connection_ends_the_tunnel_at_once(corral_for);
}

/// A tunnel's bytes are in `/metrics` while it is open, not only once it ends:
/// what the client sent and what came back, each counted as it moved.
#[test]
fn a_tunnels_bytes_are_counted_while_it_is_open() {
    let (_worker, corral, rt, mut ws) = relay::one_tunnel(corral_for, "");
    let before = (
        corral.metric("corral_bytes_in_total").unwrap_or(0.0),
        corral.metric("corral_bytes_out_total").unwrap_or(0.0),
    );
    let payload = vec![7u8; 50_000];
    rt.block_on(ws.send(Message::binary(payload.clone())))
        .expect("send");
    assert_eq!(next(&rt, &mut ws, &corral), Message::binary(payload));
    // The frame's header and mask add a few bytes to the payload.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = (
            corral.metric("corral_bytes_in_total").unwrap_or(0.0),
            corral.metric("corral_bytes_out_total").unwrap_or(0.0),
        );
        if now.0 - before.0 >= 50_000.0 && now.1 - before.1 >= 50_000.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "bytes not counted: {before:?} -> {now:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        corral.metric("corral_websocket_tunnels"),
        Some(1.0),
        "still open"
    );
}
