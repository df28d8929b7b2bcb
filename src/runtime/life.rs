//! The one owner of every task and thread corral starts: a tree of lifetimes, each
//! a drain signal and a task tracker. The App holds the root; a part gets a child
//! (the client connections, the workers, the broker) and starts its tasks through
//! it, so that every task is counted at every level above it.
//!
//! Stop is: the root's drain signal, then a wait for the root's tasks. A child made
//! with [`Life::child`] drains at the same signal; one made with [`Life::child_after`]
//! drains only once another has ended (or a time limit has passed), which is how
//! the workers outlive the requests they answer and the broker outlives the workers.
//! That order is written once, where the App makes the children. A task that reacts
//! to the drain signal (a connection finishing its request, a tunnel sending its
//! close frame) watches [`Life::draining`]; one that only needs to end is started
//! with [`Life::spawn_until_drained`].
//!
//! A leaf: it uses no other part of corral.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;

/// A lifetime: its drain signal, its tasks, and the trackers of every lifetime
/// above it (which count its tasks too).
#[derive(Clone, Default)]
pub struct Life {
    drain: CancellationToken,
    /// This lifetime's tracker first, then its parent's, up to the root's.
    trackers: Arc<Vec<TaskTracker>>,
}

impl std::fmt::Debug for Life {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Life")
            .field("draining", &self.is_draining())
            .field("running", &self.running())
            .finish()
    }
}

impl Life {
    /// A root lifetime.
    pub fn new() -> Life {
        Life {
            drain: CancellationToken::new(),
            trackers: Arc::new(vec![TaskTracker::new()]),
        }
    }

    fn below(&self, drain: CancellationToken) -> Life {
        let mut trackers = vec![TaskTracker::new()];
        trackers.extend(self.trackers.iter().cloned());
        Life {
            drain,
            trackers: Arc::new(trackers),
        }
    }

    /// A part of this lifetime that drains with it.
    pub fn child(&self) -> Life {
        self.below(self.drain.clone())
    }

    /// A part of this lifetime that drains with it, or alone (its own `drain`):
    /// the client connections, which an upgrade drains without the rest.
    pub fn part(&self) -> Life {
        self.below(self.drain.child_token())
    }

    /// A part of this lifetime that drains once `before` has ended after this
    /// one's signal, or `limit` after the signal if `before` is still running.
    pub fn child_after(&self, before: &Life, limit: Duration) -> Life {
        let child = self.below(CancellationToken::new());
        let (drain, signal, before) = (child.drain.clone(), self.drain.clone(), before.clone());
        self.spawn(async move {
            signal.cancelled().await;
            let _ = tokio::time::timeout(limit, before.ended()).await;
            drain.cancel();
        });
        child
    }

    /// `task` counted by this lifetime and every one above it.
    pub fn track<F: Future>(&self, task: F) -> impl Future<Output = F::Output> {
        let tokens: Vec<_> = self.trackers.iter().map(TaskTracker::token).collect();
        async move {
            let out = task.await;
            drop(tokens);
            out
        }
    }

    /// Runs `task` on this thread's runtime; it ends by itself (watching
    /// [`Life::draining`] where it must react to the signal).
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        tokio::spawn(self.track(task))
    }

    /// As `spawn`, on the runtime of `handle` (a serving thread).
    pub fn spawn_on<F>(&self, handle: &tokio::runtime::Handle, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        handle.spawn(self.track(task))
    }

    /// Runs `task` until it ends or this lifetime drains, whichever comes first.
    pub fn spawn_until_drained(&self, task: impl Future<Output = ()> + Send + 'static) {
        let drain = self.drain.clone();
        self.spawn(async move {
            tokio::select! {
                _ = drain.cancelled() => {}
                _ = task => {}
            }
        });
    }

    /// Runs `work` on a thread of its own, counted until it returns.
    pub fn thread(
        &self,
        name: String,
        work: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let tokens: Vec<_> = self.trackers.iter().map(TaskTracker::token).collect();
        std::thread::Builder::new().name(name).spawn(move || {
            work();
            drop(tokens);
        })
    }

    /// Resolves when this lifetime drains.
    pub fn draining(&self) -> WaitForCancellationFutureOwned {
        self.drain.clone().cancelled_owned()
    }

    /// The drain signal itself, for a part that keeps it (a per-listener signal is
    /// a child of it).
    pub fn signal(&self) -> CancellationToken {
        self.drain.clone()
    }

    /// Whether it has drained.
    pub fn is_draining(&self) -> bool {
        self.drain.is_cancelled()
    }

    /// Gives the drain signal (to this lifetime and the children that drain with it).
    pub fn drain(&self) {
        self.drain.cancel();
    }

    /// Resolves once every task of this lifetime (and below) has ended; tasks may
    /// still be started meanwhile and are waited for too.
    pub async fn ended(&self) {
        let own = &self.trackers[0];
        own.close();
        own.wait().await;
    }

    /// Tasks of this lifetime (and below) still running.
    pub fn running(&self) -> usize {
        self.trackers[0].len()
    }

    /// Drains, then waits for every task up to `limit`; returns how many were still
    /// running then.
    pub async fn stop(&self, limit: Duration) -> usize {
        self.drain();
        let _ = tokio::time::timeout(limit, self.ended()).await;
        self.running()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn stop_waits_for_every_task_in_the_tree_and_drains_children_in_order() {
        let root = Life::new();
        let serving = root.child();
        let workers = root.child_after(&serving, Duration::from_secs(5));
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        for (life, name, takes) in [
            (&serving, "serving", Duration::from_secs(1)),
            (&workers, "workers", Duration::from_millis(10)),
        ] {
            let (l, order) = (life.clone(), order.clone());
            life.spawn(async move {
                l.draining().await;
                tokio::time::sleep(takes).await;
                order.lock().expect("order").push(name);
            });
        }
        let ended = Arc::new(AtomicUsize::new(0));
        let e = ended.clone();
        root.spawn_until_drained(async move {
            std::future::pending::<()>().await;
            e.fetch_add(1, Ordering::SeqCst);
        });
        let thread = root.thread("t".into(), || {}).expect("thread");
        // Joined first: the paused clock would run ahead of a thread.
        thread.join().expect("join");
        assert_eq!(root.stop(Duration::from_secs(10)).await, 0);
        assert_eq!(*order.lock().expect("order"), ["serving", "workers"]);
        assert_eq!(ended.load(Ordering::SeqCst), 0, "dropped at the signal");
        assert_eq!(serving.running() + workers.running(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_child_drains_at_its_limit_when_the_one_before_hangs() {
        let root = Life::new();
        let serving = root.child();
        serving.spawn(std::future::pending::<()>());
        let workers = root.child_after(&serving, Duration::from_secs(2));
        let w = workers.clone();
        let drained_at = root.spawn(async move {
            let start = tokio::time::Instant::now();
            w.draining().await;
            start.elapsed()
        });
        root.drain();
        let took = drained_at.await.expect("task");
        assert_eq!(took, Duration::from_secs(2));
        assert_eq!(root.stop(Duration::from_secs(1)).await, 1, "the hung task");
    }
}
