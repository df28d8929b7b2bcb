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

use futures_util::SinkExt;
use std::time::Duration;
use support::relay::{self, next, runtime, times_in_log, wait_in_log};
use support::{Corral, Mode, RawWorker};
use tokio_tungstenite::tungstenite::Message;

fn corral_for(worker: &RawWorker, extra: &str) -> Corral {
    Corral::start(&format!("upstreams = [\"{}\"]\n{extra}\n", worker.addr))
}

const IN_SET: &str = "tunnel relayed in its lane's set";
const TAKEN_BACK: &str = "tunnel taken back from its lane's set";

/// Waits until `n` tunnels are in their lane's set.
fn wait_in_set(corral: &Corral, n: usize) {
    wait_in_log(corral, IN_SET, n);
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
        let mut clients = relay::open_hello_clients(&rt, &corral, 6);
        wait_in_set(&corral, clients.len());
        // Small enough for the client sockets to take every read whole.
        relay::echo_rounds(&rt, &mut clients, &corral, 8_000, 8);
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
        relay::expect_going_away(&rt, &mut clients, &corral);
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
    let (_worker, mut corral, rt, mut ws) = relay::one_tunnel(corral_for, "", IN_SET);
    let pause = Duration::from_millis(300);
    relay::flood_until_going_away(&rt, &mut ws, &mut corral, pause, |corral| {
        // Which comes first depends on the machine's timing; the set's unit tests
        // show each alone.
        let log = corral.log_text();
        assert!(
            log.contains("why=\"a bulk transfer\"")
                || log.contains("why=\"a side that could not take a whole read\""),
            "{log}"
        );
    });
}

/// A hundred frames in one segment, then more: whole and in order, and the tunnel
/// stays in its set.
#[test]
fn many_frames_in_one_read_are_relayed_whole() {
    let (_worker, corral, rt, mut ws) = relay::one_tunnel(corral_for, "", IN_SET);
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
    let corral = relay::closes_when_idle_and_stays_open_while_used(corral_for, IN_SET);
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
    relay::a_client_close_ends_both_connections(corral_for, IN_SET);
}

/// The worker's connection is reset while the tunnel is in its set: the client's
/// connection ends at once.
#[test]
fn a_reset_worker_connection_ends_the_tunnel_at_once() {
    relay::a_reset_worker_connection_ends_the_tunnel_at_once(corral_for, IN_SET);
}
