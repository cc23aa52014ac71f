//! KV-cache index: one radix tree per cluster (`tree`), in a pool that bounds the clusters and
//! reports the trees' estimated size to the server-wide memory budget (`crate::budget`).
//!
//! This file owns the pool: the cluster map, one read-write lock per tree (queries run in
//! parallel and never mutate; GC takes the write lock for small batches and releases it between
//! them, so inserts and queries only wait briefly and no traffic is dropped), the cluster cap
//! (the least recently saved tree goes), the GC pass over all trees, and `shrink_for_budget`:
//! evict the least recently used nodes over all trees when `crate::memory` says the budget is
//! exceeded. The tree itself, its semantics and `CacheConfig` are in `tree.rs`.

mod max_age;
#[cfg(test)]
mod tests;
mod tree;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hashbrown::HashMap;
use parking_lot::RwLock;

use crate::budget::MemoryBudget;
use crate::endpoint::Endpoint;
pub use max_age::MaxAges;
pub use tree::{CacheConfig, LevelStats, Tree, HASH_BYTES, NODE_BYTES, TAG_BYTES};

/// Estimated bytes of one cluster tree besides its nodes: the handle, its map entry, the root and
/// the slab's first allocation (room for 4 nodes) (plus the cluster name, counted separately).
pub const TREE_BYTES: usize = std::mem::size_of::<TreeHandle>() + 16 + tree::EMPTY_TREE_BYTES + 64;

pub struct TreeHandle {
    tree: RwLock<Tree>,
    /// Monotonic ns of the last save (LRU order of trees at the cluster cap).
    last_used: AtomicU64,
    budget: Arc<MemoryBudget>,
    /// Bytes charged for the tree itself (handle, map entry, root, cluster name).
    fixed_bytes: usize,
}

impl TreeHandle {
    fn new(cluster: &str, budget: Arc<MemoryBudget>) -> Self {
        let fixed_bytes = TREE_BYTES + cluster.len();
        budget.add_cache(fixed_bytes as i64);
        TreeHandle {
            tree: RwLock::new(Tree::new()),
            last_used: AtomicU64::new(0),
            budget,
            fixed_bytes,
        }
    }

    /// Run `f` on the tree under the write lock and report the change of its size to the budget.
    fn mutate<R>(&self, f: impl FnOnce(&mut Tree) -> R) -> R {
        let mut t = self.tree.write();
        let before = t.bytes();
        let r = f(&mut t);
        self.budget.add_cache(t.bytes() as i64 - before as i64);
        r
    }
}

impl Drop for TreeHandle {
    /// A tree leaves the budget when its last handle goes, whatever removed it from the pool
    /// (cluster cap, GC, budget) and even if a save still held it at that moment.
    fn drop(&mut self) {
        let held = self.fixed_bytes + self.tree.get_mut().bytes();
        self.budget.add_cache(-(held as i64));
    }
}

#[derive(Default)]
pub struct CacheCounters {
    pub saves: AtomicU64,
    pub queries: AtomicU64,
    pub query_hits: AtomicU64,
    pub expired_nodes: AtomicU64,
    pub evicted_nodes: AtomicU64,
    pub evicted_clusters: AtomicU64,
}

/// All cluster trees.
pub struct CachePool {
    cfg: CacheConfig,
    trees: RwLock<HashMap<String, Arc<TreeHandle>>>,
    budget: Arc<MemoryBudget>,
    pub counters: CacheCounters,
}

/// Nodes evicted from one tree before the pool looks again for the globally oldest one.
const BUDGET_BATCH: usize = 256;

impl CachePool {
    /// A pool with no memory budget (tests, benchmarks).
    pub fn new(cfg: CacheConfig) -> Self {
        Self::with_budget(cfg, Arc::new(MemoryBudget::unlimited()))
    }

    /// A pool that reports its estimated size to `budget`.
    pub fn with_budget(cfg: CacheConfig, budget: Arc<MemoryBudget>) -> Self {
        CachePool {
            cfg,
            trees: RwLock::new(HashMap::new()),
            budget,
            counters: CacheCounters::default(),
        }
    }

    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }

    fn get(&self, cluster: &str) -> Option<Arc<TreeHandle>> {
        self.trees.read().get(cluster).cloned()
    }

    /// Every tree with its cluster name, taken under a short read lock.
    fn handles(&self) -> Vec<(String, Arc<TreeHandle>)> {
        self.trees
            .read()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// `POST /v1/cache/save`.
    pub fn save(&self, cluster: &str, keys: &[u64], loc: Endpoint, now: Duration) {
        self.counters.saves.fetch_add(1, Ordering::Relaxed);
        if keys.is_empty() {
            return;
        }
        let handle = match self.get(cluster) {
            Some(h) => h,
            None => {
                let mut trees = self.trees.write();
                if !trees.contains_key(cluster) && trees.len() >= self.cfg.max_clusters.max(1) {
                    let lru = trees
                        .iter()
                        .min_by_key(|(_, h)| h.last_used.load(Ordering::Relaxed))
                        .map(|(k, _)| k.clone());
                    if let Some(k) = lru {
                        trees.remove(&k);
                        self.counters
                            .evicted_clusters
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
                let budget = &self.budget;
                trees
                    .entry(cluster.to_string())
                    .or_insert_with(|| Arc::new(TreeHandle::new(cluster, budget.clone())))
                    .clone()
            }
        };
        handle
            .last_used
            .fetch_max(now.as_nanos() as u64, Ordering::Relaxed);
        let evicted = handle.mutate(|t| t.insert(keys, loc, now, &self.cfg));
        if evicted > 0 {
            self.counters
                .evicted_nodes
                .fetch_add(evicted as u64, Ordering::Relaxed);
        }
    }

    /// `POST /v1/cache/query`. `top_k == 0` means the configured default.
    pub fn query(
        &self,
        cluster: &str,
        keys: &[u64],
        top_k: usize,
        now: Duration,
    ) -> Vec<(Endpoint, usize)> {
        self.query_within(cluster, keys, top_k, now, &MaxAges::default())
    }

    /// [`CachePool::query`] counting each location's tags older than its limit in `ages`
    /// (when shorter than the TTL) as absent: the asking gateway's `max_age_ms`.
    pub fn query_within(
        &self,
        cluster: &str,
        keys: &[u64],
        top_k: usize,
        now: Duration,
        ages: &MaxAges,
    ) -> Vec<(Endpoint, usize)> {
        self.counters.queries.fetch_add(1, Ordering::Relaxed);
        let Some(h) = self.get(cluster) else {
            return Vec::new();
        };
        let k = if top_k == 0 { self.cfg.top_k } else { top_k };
        let out = h.tree.read().match_within(keys, k, now, &self.cfg, ages);
        if !out.is_empty() {
            self.counters.query_hits.fetch_add(1, Ordering::Relaxed);
        }
        out
    }

    /// One GC pass: expired nodes are removed in batches (the write lock is released between
    /// batches), then trees left empty and unused for a TTL are dropped.
    pub fn gc(&self, now: Duration, batch: usize) -> usize {
        let handles = self.handles();
        let mut removed = 0;
        for (_, h) in &handles {
            loop {
                let (n, more) = h.mutate(|t| t.expire(now, &self.cfg, batch.max(1)));
                removed += n;
                if !more {
                    break;
                }
                std::thread::yield_now();
            }
        }
        self.counters
            .expired_nodes
            .fetch_add(removed as u64, Ordering::Relaxed);
        let expire_ns = self.cfg.expire.as_nanos() as u64;
        let now_ns = now.as_nanos() as u64;
        self.trees.write().retain(|_, h| {
            !(h.tree.read().is_empty() && h.last_used.load(Ordering::Relaxed) + expire_ns <= now_ns)
        });
        removed
    }

    pub fn cluster_count(&self) -> usize {
        self.trees.read().len()
    }

    /// Evict the least recently used nodes over all trees (oldest node first) until the memory
    /// budget is back under its low watermark or the cache is empty. Trees left empty are
    /// dropped. Returns the number of nodes evicted. (When to call it: `crate::memory`.)
    pub fn shrink_for_budget(&self) -> usize {
        let budget = &*self.budget;
        let mut evicted = 0;
        while budget.above_target() {
            // The tree holding the oldest node, and the age of the runner-up, so one pass can
            // evict from the victim until it is no longer the oldest.
            let handles = self.handles();
            if handles.is_empty() {
                break;
            }
            // Empty trees sort first (`None` < `Some`): dropping them frees their fixed part.
            let ages: Vec<Option<Duration>> = handles
                .iter()
                .map(|(_, h)| h.tree.read().oldest())
                .collect();
            let Some(i) = (0..ages.len()).min_by_key(|&i| ages[i]) else {
                break;
            };
            let runner_up = ages
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .filter_map(|(_, a)| *a)
                .min();
            let (name, h) = &handles[i];
            // The budget learns of the change when `mutate` returns, so count here.
            let need = budget.used().saturating_sub(budget.low_watermark()) as usize;
            let (n, empty) = h.mutate(|t| {
                let start = t.bytes();
                let mut n = 0;
                while n < BUDGET_BATCH
                    && start - t.bytes() < need
                    && t.oldest().is_some_and(|o| runner_up.is_none_or(|r| o <= r))
                {
                    t.evict_oldest();
                    n += 1;
                }
                (n, t.is_empty())
            });
            evicted += n;
            if empty {
                let mut trees = self.trees.write();
                if trees.get(name).is_some_and(|cur| Arc::ptr_eq(cur, h)) {
                    trees.remove(name);
                    budget
                        .counters
                        .cache_clusters
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        budget
            .counters
            .cache_nodes
            .fetch_add(evicted as u64, Ordering::Relaxed);
        self.counters
            .evicted_nodes
            .fetch_add(evicted as u64, Ordering::Relaxed);
        evicted
    }

    /// (nodes, entries) over all trees.
    pub fn totals(&self) -> (usize, usize) {
        let handles: Vec<Arc<TreeHandle>> = self.trees.read().values().cloned().collect();
        handles.iter().fold((0, 0), |(n, c), h| {
            let t = h.tree.read();
            (n + t.node_count(), c + t.cost())
        })
    }

    pub fn level_stats(
        &self,
        cluster: &str,
    ) -> Option<std::collections::BTreeMap<usize, LevelStats>> {
        self.get(cluster).map(|h| h.tree.read().level_stats())
    }
}
