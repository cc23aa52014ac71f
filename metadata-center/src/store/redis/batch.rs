//! Cache queries sent together: the plain cache queries of one cluster that are ready in the
//! same turn of the runtime go to Redis as one `HMGET` of the distinct prefixes they ask for, so
//! the connection carries one request (one write, one read, one in-flight entry) for all of them
//! instead of one each, and a prefix several of them share (a system prompt) is read, sent and
//! parsed once per batch instead of once per query.
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

use super::walk::bulk_string;

/// At most this many queries in one batch (a full batch is left to be sent, and the next
/// query opens a new one): bounds an `HMGET`'s size and the wait of its first query.
pub const MAX_QUERIES_PER_BATCH: usize = 64;

/// One batch: the queries that joined it and, once sent, Redis's answer to all of them.
#[derive(Default)]
pub struct QueryBatch {
    /// Each query's fields (its prefixes' digests), in the order they joined; no query joins
    /// once the batch is closed (taken out of `OpenBatches`).
    queries: Mutex<Vec<Vec<[u8; 16]>>>,
    /// Redis's answer to the batch; `None` when Redis did not answer.
    pub answer: tokio::sync::OnceCell<Option<BatchAnswer>>,
}

impl QueryBatch {
    /// The queries' fields, in joining order (read them once the batch is closed).
    pub fn queries(&self) -> parking_lot::MutexGuard<'_, Vec<Vec<[u8; 16]>>> {
        self.queries.lock()
    }
}

/// The distinct fields of a batch's queries, in first-asked order, and for each query where
/// its fields are in that list: what one `HMGET` for the whole batch asks, and how to read
/// each query's nodes out of its reply.
pub struct DistinctFields {
    /// Every field asked by some query, once.
    pub fields: Vec<[u8; 16]>,
    /// Per query (joining order), the position in `fields` of each of its fields.
    pub slots: Vec<Vec<u32>>,
}

impl DistinctFields {
    /// The distinct fields of `queries`.
    pub fn of(queries: &[Vec<[u8; 16]>]) -> Self {
        let asked = queries.iter().map(Vec::len).sum();
        let mut position: hashbrown::HashMap<[u8; 16], u32> =
            hashbrown::HashMap::with_capacity(asked);
        let mut fields = Vec::with_capacity(asked);
        let slots = queries
            .iter()
            .map(|query| {
                query
                    .iter()
                    .map(|f| {
                        *position.entry(*f).or_insert_with(|| {
                            fields.push(*f);
                            (fields.len() - 1) as u32
                        })
                    })
                    .collect()
            })
            .collect();
        DistinctFields { fields, slots }
    }
}

/// Redis's answer to a batch: its time when the batch was sent (ms), the `HMGET`'s values (one
/// per distinct field) and where each query's fields are among them.
pub struct BatchAnswer {
    /// Redis's time when the batch was sent, ms.
    pub now_ms: u64,
    /// The `HMGET`'s reply, one value per distinct field (nil when absent).
    pub values: Vec<Value>,
    /// Per query, the positions of its fields in `values` ([`DistinctFields::slots`]).
    pub slots: Vec<Vec<u32>>,
}

impl BatchAnswer {
    /// Query `index`'s nodes, in its own field order (`None` for an absent one, as
    /// [`bulk_string`] reads them); `None` when the reply is short of them (a reply Redis
    /// would not send).
    pub fn nodes_of(&self, index: usize) -> Option<Vec<Option<&[u8]>>> {
        let slots = self.slots.get(index)?;
        slots
            .iter()
            .map(|&i| self.values.get(i as usize).map(bulk_string))
            .collect()
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
    fn a_field_several_queries_ask_for_is_asked_once_and_read_by_each() {
        let queries = vec![
            vec![[1; 16], [2; 16], [3; 16]],
            vec![[1; 16], [2; 16], [4; 16]],
            vec![[5; 16]],
            vec![],
        ];
        let distinct = DistinctFields::of(&queries);
        assert_eq!(
            distinct.fields,
            vec![[1; 16], [2; 16], [3; 16], [4; 16], [5; 16]]
        );
        assert_eq!(
            distinct.slots,
            vec![vec![0, 1, 2], vec![0, 1, 3], vec![4], vec![]]
        );
        let values: Vec<Value> = (1..=5u8).map(|i| Value::BulkString(vec![i])).collect();
        let answer = BatchAnswer {
            now_ms: 7,
            values,
            slots: distinct.slots,
        };
        let bytes = |i| {
            answer.nodes_of(i).map(|nodes| {
                nodes
                    .iter()
                    .map(|n| n.map_or(0, |b| b[0]))
                    .collect::<Vec<u8>>()
            })
        };
        assert_eq!(bytes(0), Some(vec![1, 2, 3]));
        assert_eq!(bytes(1), Some(vec![1, 2, 4]));
        assert_eq!(bytes(2), Some(vec![5]));
        assert_eq!(bytes(3), Some(vec![]));
        assert_eq!(bytes(4), None);
        // a reply short of a query's values reads as no answer for it
        let short = BatchAnswer {
            now_ms: 7,
            values: vec![Value::Nil],
            slots: vec![vec![0], vec![0, 1]],
        };
        assert_eq!(short.nodes_of(0), Some(vec![None]));
        assert!(short.nodes_of(1).is_none());
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
