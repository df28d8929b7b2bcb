//! Serving threads ("lanes"): one single-threaded runtime per core, each accepting
//! and serving whole client connections. A connection's work — its requests, its keep-alive
//! connections to workers — stays on the lane it was given, so a request never
//! wakes another thread (the way nginx's worker processes share out connections),
//! and the lanes share no run queue to contend on. A websocket tunnel is the one
//! thing that moves: to its worker's lane (`proxy::tunnel`), so that a broadcast
//! wakes one lane.
//!
//! It owns the threads and their runtimes and nothing else; what runs on them is
//! the server's accept loops and what those spawn. The supervisor, the broker, the
//! health checks and the admin listener stay on the main runtime. The threads are
//! tasks of the lifetime they are started in: each runs until that lifetime drains,
//! then drops its runtime, which ends whatever still runs there.

use crate::runtime::life::Life;
use std::cell::Cell;
use tokio::runtime::Handle;

thread_local! {
    static LANE: Cell<usize> = const { Cell::new(0) };
}

/// The lane the current thread serves, counted from 1; 0 off the lanes.
pub fn current() -> usize {
    LANE.with(Cell::get)
}

pub struct Lanes {
    handles: Vec<Handle>,
}

/// Keeps a timer due within the next half second on the lane, for nothing but
/// this: tokio wakes its own driver through an eventfd write (a system call) for
/// every timer registered earlier than the driver's next wake-up, and with no timer
/// due at all, for every timer. Each request registers two (the header-read
/// deadline and the worker's answer timeout, seconds away), so on an idle-between-
/// requests lane each cost a system call; behind a timer due sooner, none does.
async fn keep_a_timer_due() {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

impl Lanes {
    /// Starts `n` lanes (at least one), threads of `life` until it drains.
    pub fn start(n: usize, life: &Life) -> std::io::Result<Lanes> {
        let mut handles = Vec::new();
        for i in 1..=n.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let drained = life.draining();
            life.thread(format!("corral-lane-{i}"), move || {
                LANE.with(|l| l.set(i));
                runtime.block_on(async {
                    tokio::select! {
                        _ = drained => {}
                        _ = keep_a_timer_due() => {}
                    }
                });
                // Dropping the runtime ends what is still running there.
            })?;
        }
        Ok(Lanes { handles })
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// The lanes' runtimes, lane 1 first.
    pub fn handles(&self) -> Vec<Handle> {
        self.handles.clone()
    }
}
