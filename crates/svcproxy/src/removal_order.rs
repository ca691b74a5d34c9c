//! Two things may remove a proxy's rules on the way through a node: after our first sync, the other mode's
//! rules go (the proxy we took over from left them, see `cleanup::retire_other_mode`); on SIGTERM in nftables
//! mode, our table goes if another proxy's rules are in place (see [`crate::hand_back`]). Each is right alone,
//! but stopped while the first runs (a rollout that moves on quickly, a node drained right after the
//! takeover), the second saw the rules being retired as another proxy's, deleted our table, and then the
//! retirement finished: the node was left with no Service rules at all. So they take turns: the hand-back
//! waits for a retirement under way and then sees what is really left, and once stopping has begun no
//! retirement starts, so rules the hand-back leaves in place stay.

use std::sync::Arc;

use tokio::sync::Mutex;
use tokio::task::JoinError;

/// Shared by the retirement and the stop; clones share the order.
#[derive(Debug, Clone, Default)]
pub struct RemovalOrder {
    /// True once stopping has begun. Held by a retirement for as long as it runs.
    stopping: Arc<Mutex<bool>>,
}

impl RemovalOrder {
    /// Runs `retire` on a blocking thread unless stopping has begun (then `None`); a stop waits for it.
    pub async fn retire<T: Send + 'static>(
        &self,
        retire: impl FnOnce() -> T + Send + 'static,
    ) -> Option<Result<T, JoinError>> {
        let stopping = self.stopping.lock().await;
        if *stopping {
            return None;
        }
        let done = tokio::task::spawn_blocking(retire).await;
        drop(stopping);
        Some(done)
    }

    /// Marks the start of stopping, once any retirement under way has finished.
    pub async fn stop(&self) {
        *self.stopping.lock().await = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread")]
    async fn a_stop_waits_for_the_retirement_under_way() {
        let order = RemovalOrder::default();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let retired = Arc::new(AtomicBool::new(false));
        let retirement = tokio::spawn({
            let order = order.clone();
            let retired = retired.clone();
            async move {
                order
                    .retire(move || {
                        started_tx.send(()).unwrap();
                        release_rx.recv().unwrap();
                        retired.store(true, Ordering::SeqCst);
                    })
                    .await
            }
        });
        started_rx.await.unwrap();
        let stop = tokio::spawn({
            let order = order.clone();
            let retired = retired.clone();
            async move {
                order.stop().await;
                retired.load(Ordering::SeqCst)
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!stop.is_finished(), "the stop waits while the retirement runs");
        release_tx.send(()).unwrap();
        assert!(
            stop.await.unwrap(),
            "the stop went on only once the retirement was done"
        );
        assert!(matches!(retirement.await.unwrap(), Some(Ok(()))));
    }

    #[tokio::test]
    async fn no_retirement_starts_once_stopping_has_begun() {
        let order = RemovalOrder::default();
        order.stop().await;
        let ran = Arc::new(AtomicBool::new(false));
        let outcome = order
            .retire({
                let ran = ran.clone();
                move || ran.store(true, Ordering::SeqCst)
            })
            .await;
        assert!(outcome.is_none());
        assert!(!ran.load(Ordering::SeqCst));
    }
}
