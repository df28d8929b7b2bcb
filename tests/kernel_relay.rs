//! The kernel relay (`experimental.kernel_relay`, Linux, root): cleartext websocket
//! tunnels whose bytes the kernel moves, over real sockets. corral runs as its own
//! process in front of an in-process raw worker (`support::RawWorker`).
//!
//! Each test asks the log that the kernel did relay (and, where it matters, that
//! corral took the tunnel back), so a relay that silently stayed in user space
//! fails them.

mod support;

use futures_util::SinkExt;
use std::time::Duration;
use support::relay::{self, next, runtime, times_in_log, wait_in_log};
use support::{Corral, Mode, RawWorker};
use tokio_tungstenite::tungstenite::Message;

fn corral_for(worker: &RawWorker, extra: &str) -> Corral {
    Corral::start(&format!(
        "upstreams = [\"{}\"]\n{extra}\n[experimental]\nkernel_relay = true\n",
        worker.addr
    ))
}

const IN_KERNEL: &str = "tunnel relayed by the kernel";

/// Waits until `n` tunnels are with the kernel. A tunnel whose bytes keep coming
/// while it is handed over stays in user space (correct, but not what these tests
/// are about), so each test lets its tunnels go quiet first.
fn wait_in_kernel(corral: &Corral, n: usize) {
    wait_in_log(corral, IN_KERNEL, n);
}

/// Frames of every size both ways, on one serving thread and on several (where the
/// tunnel moves to its worker's thread first): whole and in order, the kernel
/// relaying each tunnel; at shutdown each client gets 1001.
#[test]
fn kernel_relayed_tunnels_carry_frames_whole_and_close_cleanly() {
    for threads in [1, 3] {
        let worker = RawWorker::start(Mode::WebSocketHello);
        let mut corral = corral_for(&worker, &format!("threads = {threads}"));
        let rt = runtime();
        let mut clients = relay::open_hello_clients(&rt, &corral, 6);
        wait_in_kernel(&corral, clients.len());
        relay::echo_rounds(&rt, &mut clients, &corral, 60_000, 8);
        assert_eq!(
            times_in_log(&corral, IN_KERNEL),
            6,
            "threads = {threads}: {}",
            corral.log_text()
        );
        assert_eq!(
            times_in_log(&corral, "tunnel taken back from the kernel"),
            0,
            "the kernel relayed every frame: {}",
            corral.log_text()
        );
        corral.terminate();
        relay::expect_going_away(&rt, &mut clients, &corral);
        let status = corral.wait_exit(Duration::from_secs(10));
        assert!(status.is_some_and(|s| s.success()), "{status:?}");
        assert!(times_in_log(&corral, "tunnel taken back from the kernel") >= 6);
    }
}

/// The worker floods frames of every header form (up to 130 kB, many segments
/// each) when SIGTERM comes: corral takes the tunnel back from the kernel where it
/// stopped, lets the frame in progress end, and only then sends 1001 — every frame
/// the client gets is whole (a close frame put inside one would garble the rest).
#[test]
fn a_close_code_comes_after_the_frame_in_progress() {
    let (_worker, mut corral, rt, mut ws) = relay::one_tunnel(corral_for, "", IN_KERNEL);
    relay::flood_until_going_away(&rt, &mut ws, &mut corral, Duration::ZERO, |corral| {
        assert_eq!(times_in_log(corral, IN_KERNEL), 1, "{}", corral.log_text());
    });
    assert!(
        corral
            .log_text()
            .contains("why=\"to send its close frame\""),
        "{}",
        corral.log_text()
    );
}

/// A hundred frames in one segment are more than the kernel's program follows: it
/// passes them up, corral takes the tunnel back and relays them (and what follows)
/// whole and in order.
#[test]
fn frames_the_kernel_cannot_follow_are_relayed_by_corral() {
    let (_worker, corral, rt, mut ws) = relay::one_tunnel(corral_for, "", IN_KERNEL);
    rt.block_on(ws.send(Message::text("one"))).expect("send");
    assert_eq!(next(&rt, &mut ws, &corral), Message::text("one"));
    rt.block_on(ws.send(Message::text("burst"))).expect("send");
    for i in 0..100u8 {
        assert_eq!(next(&rt, &mut ws, &corral), Message::binary(vec![i]));
    }
    rt.block_on(ws.send(Message::text("after"))).expect("send");
    assert_eq!(next(&rt, &mut ws, &corral), Message::text("after"));
    let log = corral.log_text();
    assert!(log.contains(IN_KERNEL), "{log}");
    assert!(log.contains("frames the kernel could not follow"), "{log}");
}

/// A kernel-relayed tunnel with no bytes for `websocket_idle` is closed (between
/// one and one and an eighth idle periods, as in user space); bytes the kernel
/// moves keep it open past that.
#[test]
fn kernel_relayed_tunnels_close_when_idle_and_stay_open_while_used() {
    relay::closes_when_idle_and_stays_open_while_used(corral_for, IN_KERNEL);
}

/// The client closes: its close frame reaches the worker through the kernel, the
/// worker's answer comes back, and both connections end (the worker's too).
#[test]
fn a_client_close_ends_both_connections() {
    relay::a_client_close_ends_both_connections(corral_for, IN_KERNEL);
}

/// The worker's connection is reset while the kernel relays: the watch wakes the
/// tunnel and the client's connection ends at once.
#[test]
fn a_reset_worker_connection_ends_the_tunnel_at_once() {
    relay::a_reset_worker_connection_ends_the_tunnel_at_once(corral_for, IN_KERNEL);
}
