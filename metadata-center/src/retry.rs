//! Deletes that found no request are retried once, one second later (a delete can overtake its
//! add, e.g. when they arrive on different connections or replicas). The origin starts an unbounded timer per miss; here a bounded FIFO feeds one task, and
//! misses beyond the capacity are dropped and counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::load::{LoadStore, Stamp};

/// Which delete to retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryKind {
    Delete,
    DeletePrompt,
}

/// A retried delete in flight: resolves to whether the request was found.
pub type RetryFuture = std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>;

/// The bounded retry queue and its task, with its counters (shown in the metrics).
pub struct Retrier {
    tx: tokio::sync::mpsc::Sender<(tokio::time::Instant, RetryKind, String)>,
    pub dropped: AtomicU64,
    pub retried_hit: Arc<AtomicU64>,
    pub retried_miss: Arc<AtomicU64>,
}

impl Retrier {
    /// Spawns the retry task on the current tokio runtime, retrying against the in-memory load
    /// store.
    pub fn start(store: Arc<LoadStore>, capacity: usize, delay: Duration) -> Self {
        Self::start_with(capacity, delay, move |kind, id| {
            let now = Stamp::now();
            let found = match kind {
                RetryKind::Delete => store.delete(&id, now),
                RetryKind::DeletePrompt => store.delete_prompt(&id, now),
            };
            Box::pin(std::future::ready(found))
        })
    }

    /// Spawns the retry task with `retry` as the delete to try again (it answers whether the
    /// request was found); used by the Redis store, whose deletes are asynchronous.
    pub fn start_with<F>(capacity: usize, delay: Duration, retry: F) -> Self
    where
        F: Fn(RetryKind, String) -> RetryFuture + Send + Sync + 'static,
    {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(tokio::time::Instant, RetryKind, String)>(
            capacity.max(1),
        );
        let hit = Arc::new(AtomicU64::new(0));
        let miss = Arc::new(AtomicU64::new(0));
        let (h, m) = (hit.clone(), miss.clone());
        tokio::spawn(async move {
            while let Some((due, kind, id)) = rx.recv().await {
                tokio::time::sleep_until(due + delay).await;
                if retry(kind, id.clone()).await {
                    h.fetch_add(1, Ordering::Relaxed);
                } else {
                    m.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(request_id = %id, ?kind, "delete retry found no request");
                }
            }
        });
        Retrier {
            tx,
            dropped: AtomicU64::new(0),
            retried_hit: hit,
            retried_miss: miss,
        }
    }

    pub fn schedule(&self, kind: RetryKind, request_id: &str) {
        if self
            .tx
            .try_send((tokio::time::Instant::now(), kind, request_id.to_string()))
            .is_err()
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn pending(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::Endpoint;
    use crate::load::{AddRequest, LoadConfig};

    fn ep(s: &str) -> Endpoint {
        s.parse().unwrap()
    }

    /// (queued, prompt) of the one engine of cluster "m".
    fn only_engine(s: &LoadStore) -> Option<(i32, i32)> {
        let e = s.query("m")?.into_iter().next()?;
        Some((e.queued_req_num, e.prompt_length))
    }

    /// Real time (tokio's paused clock would need its `test-util` feature, which changes the
    /// tokio every crate of the workspace is built with): a half-second delay, retried once.
    /// Two worker threads, so the retry task runs beside the test and could act early.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn delete_before_add_is_retried_once_after_its_delay() {
        let delay = Duration::from_millis(500);
        let s = Arc::new(LoadStore::new(LoadConfig::default()));
        let r = Retrier::start(s.clone(), 2, delay);
        let scheduled = std::time::Instant::now();
        assert!(!s.delete("late", Stamp::now()));
        r.schedule(RetryKind::Delete, "late");
        assert!(!s.delete_prompt("late2", Stamp::now()));
        r.schedule(RetryKind::DeletePrompt, "late2");
        r.schedule(RetryKind::Delete, "overflow-1");
        r.schedule(RetryKind::Delete, "overflow-2");
        assert!(
            r.dropped.load(Ordering::Relaxed) >= 1,
            "bounded queue drops beyond capacity"
        );
        let now = Stamp::now();
        s.add(
            &AddRequest {
                cluster: "m",
                request_id: "late",
                prompt_length: 10,
                engine: ep("10.0.0.1"),
            },
            now,
        );
        s.add(
            &AddRequest {
                cluster: "m",
                request_id: "late2",
                prompt_length: 20,
                engine: ep("10.0.0.1"),
            },
            now,
        );
        assert_eq!(
            only_engine(&s),
            Some((2, 30)),
            "nothing retried before the delay"
        );
        assert_eq!(r.retried_hit.load(Ordering::Relaxed), 0);
        let deadline = scheduled + Duration::from_secs(10);
        while r.retried_hit.load(Ordering::Relaxed) < 2 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(scheduled.elapsed() >= delay, "retried before its delay");
        assert_eq!(
            only_engine(&s),
            Some((1, 20 - 20)),
            "late removed, late2 prompt released"
        );
        assert_eq!(r.retried_hit.load(Ordering::Relaxed), 2);
    }
}
