//! The prefix index: chunk hash → endpoints that recently served a prompt with that prefix,
//! bounded and evicted least-recently-used.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use lru::LruCache;

use super::EndpointSet;

/// Who recently served a prefix: at most this many endpoints per chunk hash.
const HOLDERS_PER_ENTRY: usize = 4;
const INDEX_SHARDS: usize = 32;

#[derive(Clone, Copy)]
struct Holder {
    endpoint: u32,
    last_use_ms: u64,
}

/// Bounded map from chunk hash to the endpoints that recently served that prefix.
///
/// Sharded by hash; each shard is an LRU under a read-write lock (lookups only read).
pub struct PrefixIndex {
    shards: Vec<RwLock<LruCache<u64, Vec<Holder>>>>,
    /// Entries per shard; shards grow on demand up to it (nothing is allocated up front).
    per_shard: usize,
    evictions: AtomicU64,
}

impl PrefixIndex {
    /// An index holding at most about `capacity` chunk hashes.
    pub fn new(capacity: usize) -> Self {
        Self {
            shards: (0..INDEX_SHARDS)
                .map(|_| RwLock::new(LruCache::unbounded()))
                .collect(),
            per_shard: capacity.div_ceil(INDEX_SHARDS).max(1),
            evictions: AtomicU64::new(0),
        }
    }

    fn shard(&self, hash: u64) -> &RwLock<LruCache<u64, Vec<Holder>>> {
        &self.shards[(hash >> 59) as usize % INDEX_SHARDS]
    }

    /// For each endpoint of `set`, how many leading chunks of `hashes` it is known to hold.
    ///
    /// Walks the prefix from the start and stops at the first chunk no endpoint of the set
    /// holds (hashes are cumulative: a longer prefix implies the shorter ones).
    pub fn matched_chunks(&self, hashes: &[u64], set: &EndpointSet) -> Vec<usize> {
        let mut depth = vec![0usize; set.endpoints.len()];
        for (i, h) in hashes.iter().enumerate() {
            let shard = self.shard(*h).read().unwrap_or_else(|p| p.into_inner());
            let Some(holders) = shard.peek(h) else { break };
            let mut any = false;
            for holder in holders {
                if let Some(&pos) = set.position.get(&holder.endpoint) {
                    depth[pos] = i + 1;
                    any = true;
                }
            }
            if !any {
                break;
            }
        }
        depth
    }

    /// Records that `endpoint` now holds every prefix in `hashes`.
    pub fn record(&self, hashes: &[u64], endpoint: u32, now_ms: u64) {
        for h in hashes {
            let mut shard = self.shard(*h).write().unwrap_or_else(|p| p.into_inner());
            if let Some(holders) = shard.get_mut(h) {
                if let Some(x) = holders.iter_mut().find(|x| x.endpoint == endpoint) {
                    x.last_use_ms = now_ms;
                } else if holders.len() < HOLDERS_PER_ENTRY {
                    holders.push(Holder {
                        endpoint,
                        last_use_ms: now_ms,
                    });
                } else if let Some(oldest) = holders.iter_mut().min_by_key(|x| x.last_use_ms) {
                    *oldest = Holder {
                        endpoint,
                        last_use_ms: now_ms,
                    };
                }
            } else {
                if shard.len() >= self.per_shard {
                    shard.pop_lru();
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                }
                shard.put(
                    *h,
                    vec![Holder {
                        endpoint,
                        last_use_ms: now_ms,
                    }],
                );
            }
        }
    }

    /// Number of chunk hashes held.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    /// True when the index holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entries evicted so far to stay within capacity.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }
}
