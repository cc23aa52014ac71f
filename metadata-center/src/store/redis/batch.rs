//! Cache queries sent together: the plain cache queries of one cluster that are ready in the
//! same turn of the runtime go to Redis as one pipeline of `HMGET`s, so the connection carries
//! one request (one write, one read, one in-flight entry) for all of them instead of one each,
//! and Redis reads and answers them in one go.
//!
//! How a batch forms: a query joins its cluster's open batch (or opens one) and yields once to
//! the runtime, so the other queries that are ready run and join too; the first of them to
//! resume closes the batch and sends it. No timer and no wait beyond that yield: a query alone
//! is sent at once. Every query of the batch waits on the same answer (a `OnceCell`): if the
//! one sending it is dropped (its client went away), another takes the send over, so no
//! query's answer depends on another client staying.

use std::sync::Arc;

use parking_lot::Mutex;
use redis::Value;

/// At most this many queries in one pipeline (a full batch is left to be sent, and the next
/// query opens a new one): bounds a pipeline's size and the wait of its first query.
pub const MAX_QUERIES_PER_BATCH: usize = 64;

/// One batch: the queries that joined it and, once sent, Redis's answer to all of them.
#[derive(Default)]
pub struct QueryBatch {
    /// Each query's fields (its prefixes' digests), in the order they joined; no query joins
    /// once the batch is closed (taken out of `OpenBatches`).
    queries: Mutex<Vec<Vec<[u8; 16]>>>,
    /// Redis's time when the batch was sent (ms) and one reply per query; `None` when Redis
    /// did not answer.
    pub answer: tokio::sync::OnceCell<Option<(u64, Vec<Value>)>>,
}

impl QueryBatch {
    /// The queries' fields, in joining order (read them once the batch is closed).
    pub fn queries(&self) -> parking_lot::MutexGuard<'_, Vec<Vec<[u8; 16]>>> {
        self.queries.lock()
    }
}

/// The open batch of each cluster (at most one per cluster with a query about to be sent).
#[derive(Default)]
pub struct OpenBatches {
    open: Mutex<hashbrown::HashMap<String, Arc<QueryBatch>>>,
}

impl OpenBatches {
    /// Adds a query to its cluster's open batch, opening one if there is none: the batch and
    /// the query's place in it.
    pub fn join(&self, cluster: &str, fields: Vec<[u8; 16]>) -> (Arc<QueryBatch>, usize) {
        // pushed under the map's lock, so a batch closed (removed) takes no more queries
        let mut open = self.open.lock();
        let batch = match open.get(cluster) {
            Some(b) if b.queries.lock().len() < MAX_QUERIES_PER_BATCH => Arc::clone(b),
            _ => {
                let b = Arc::new(QueryBatch::default());
                open.insert(cluster.to_owned(), Arc::clone(&b));
                b
            }
        };
        let mut queries = batch.queries.lock();
        queries.push(fields);
        let index = queries.len() - 1;
        drop(queries);
        (batch, index)
    }

    /// Closes `batch` (if still open): later queries of the cluster open a new one.
    pub fn close(&self, cluster: &str, batch: &Arc<QueryBatch>) {
        let mut open = self.open.lock();
        if open.get(cluster).is_some_and(|b| Arc::ptr_eq(b, batch)) {
            open.remove(cluster);
        }
    }

    /// Clusters with an open batch (none once every query joined was sent).
    pub fn open_count(&self) -> usize {
        self.open.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_join_the_open_batch_of_their_cluster_until_it_is_closed() {
        let batches = OpenBatches::default();
        let (a, ia) = batches.join("m", vec![[1; 16]]);
        let (b, ib) = batches.join("m", vec![[2; 16], [3; 16]]);
        let (other, io) = batches.join("n", vec![[4; 16]]);
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &other));
        assert_eq!((ia, ib, io), (0, 1, 0));
        batches.close("m", &a);
        assert_eq!(*a.queries(), vec![vec![[1; 16]], vec![[2; 16], [3; 16]]]);
        // closed: the next query opens a new batch, and closing the old one again is harmless
        let (c, ic) = batches.join("m", vec![[5; 16]]);
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(ic, 0);
        batches.close("m", &a);
        assert_eq!(batches.open_count(), 2);
        batches.close("m", &c);
        batches.close("n", &other);
        assert_eq!(batches.open_count(), 0);
        assert_eq!(a.queries().len(), 2);
    }

    #[test]
    fn a_full_batch_takes_no_more_queries() {
        let batches = OpenBatches::default();
        let (first, _) = batches.join("m", vec![]);
        for i in 1..MAX_QUERIES_PER_BATCH {
            let (b, index) = batches.join("m", vec![]);
            assert!(Arc::ptr_eq(&first, &b));
            assert_eq!(index, i);
        }
        let (next, index) = batches.join("m", vec![]);
        assert!(!Arc::ptr_eq(&first, &next));
        assert_eq!(index, 0);
        assert_eq!(first.queries().len(), MAX_QUERIES_PER_BATCH);
        // the full batch is still sent by its own queries; closing it leaves the new one open
        batches.close("m", &first);
        assert_eq!(batches.open_count(), 1);
    }
}
