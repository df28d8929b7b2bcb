//! The owner of corral's background tasks (health checks, the session sweeper, the
//! metrics sampler, the htpasswd reloader, the orphan reaper): each runs until
//! shutdown cancels it, and shutdown waits until each has ended. It owns nothing
//! else; client connections, tunnels and worker connections have owners of their own
//! (`edge::listen`, `proxy::tunnel`, `transport::upstream`).

use std::future::Future;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Background tasks and the signal that ends them.
#[derive(Clone, Default)]
pub struct Background {
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl Background {
    /// No tasks yet.
    pub fn new() -> Background {
        Background::default()
    }

    /// Runs `task` until it ends or shutdown begins.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = task => {}
            }
        });
    }

    /// Runs `task`, which ends by itself once `stopping()` is cancelled (to finish
    /// cleanly rather than be dropped mid-way); shutdown waits for it.
    pub fn spawn_ending(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(task);
    }

    /// The signal, for a task that ends by itself at shutdown.
    pub fn stopping(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Ends every task and waits until each has.
    pub async fn stop(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn stop_ends_and_awaits_every_task() {
        let bg = Background::new();
        let dropped = Arc::new(AtomicBool::new(false));
        struct Flag(Arc<AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let flag = Flag(dropped.clone());
        bg.spawn(async move {
            let _flag = flag;
            std::future::pending::<()>().await;
        });
        tokio::time::timeout(std::time::Duration::from_secs(2), bg.stop())
            .await
            .expect("stop returns");
        assert!(dropped.load(Ordering::SeqCst));
    }
}
