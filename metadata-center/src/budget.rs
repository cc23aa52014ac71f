//! One memory budget for the whole server: the load store (requests, clusters, engines) and the
//! cache store (cluster trees, radix nodes, stored hashes, location tags) report an estimate of
//! the bytes they hold, and when the sum goes over the limit the least recently used data is
//! evicted until the sum is back under a low watermark (limit − limit/128).
//!
//! Eviction order: the cache yields first. It is a hint that saves rebuild, while the load store
//! is the live count of requests in flight. So the cache evicts its least recently used nodes
//! (over all trees, oldest node first; a tree left empty is dropped with its cluster entry), and
//! only when the cache is empty and the load store alone is over the budget does the load store
//! evict: its oldest request or its least recently used cluster (with its engines), whichever
//! was touched longer ago. Nothing is refused: every save and add is applied, then older data
//! makes room, so the server keeps answering and the newest data is what stays.
//!
//! The per-store caps (`MaxRequests`, `MaxClusters`, ...) still apply on top of the budget.
//! The estimate counts the stores' own data structures, calibrated against the RSS of the real
//! binary (see `docs/metadata-center.md`); the process itself (code, runtime, connection buffers)
//! is not part of it.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use parking_lot::Mutex;

/// Default budget: 1 GiB of estimated store memory.
pub const DEFAULT_MAX_MEMORY_MB: u64 = 1024;

#[derive(Default)]
pub struct BudgetCounters {
    /// Radix nodes evicted to stay within the budget.
    pub cache_nodes: AtomicU64,
    /// Cache trees (clusters) dropped because the budget emptied them.
    pub cache_clusters: AtomicU64,
    /// Load requests evicted.
    pub requests: AtomicU64,
    /// Load clusters evicted (with their engines).
    pub clusters: AtomicU64,
}

pub struct MemoryBudget {
    limit: u64,
    load: AtomicU64,
    cache: AtomicI64,
    /// One evictor at a time; others re-check after it is done.
    enforce: Mutex<()>,
    pub counters: BudgetCounters,
}

impl MemoryBudget {
    pub fn new(limit_bytes: u64) -> Self {
        MemoryBudget {
            limit: limit_bytes,
            load: AtomicU64::new(0),
            cache: AtomicI64::new(0),
            enforce: Mutex::new(()),
            counters: BudgetCounters::default(),
        }
    }

    pub fn from_mb(mb: u64) -> Self {
        Self::new(mb.saturating_mul(1024 * 1024))
    }

    /// No limit (unit tests and benchmarks that build a store on its own).
    pub fn unlimited() -> Self {
        Self::new(u64::MAX)
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Eviction stops once usage is at or below this.
    pub fn low_watermark(&self) -> u64 {
        self.limit - self.limit / 128
    }

    pub fn load_bytes(&self) -> u64 {
        self.load.load(Ordering::Relaxed)
    }

    pub fn cache_bytes(&self) -> u64 {
        self.cache.load(Ordering::Relaxed).max(0) as u64
    }

    pub fn used(&self) -> u64 {
        self.load_bytes().saturating_add(self.cache_bytes())
    }

    pub fn over(&self) -> bool {
        self.used() > self.limit
    }

    /// Above the low watermark: an evictor that started keeps going.
    pub fn above_target(&self) -> bool {
        self.used() > self.low_watermark()
    }

    /// The load store reports its whole estimate (it has one lock, so it knows the total).
    pub(crate) fn set_load(&self, bytes: usize) {
        self.load.store(bytes as u64, Ordering::Relaxed);
    }

    /// Cache trees report changes (each tree under its own lock).
    pub(crate) fn add_cache(&self, delta: i64) {
        if delta != 0 {
            self.cache.fetch_add(delta, Ordering::Relaxed);
        }
    }
}

/// Bring usage back under the budget after an add or a save: the cache evicts first, then the
/// load store (see the module docs). Cheap when under the limit (two atomic loads).
pub fn enforce(
    budget: &MemoryBudget,
    load: &crate::load::LoadStore,
    cache: &crate::cache::CachePool,
) {
    if !budget.over() {
        return;
    }
    let _one = budget.enforce.lock();
    if !budget.over() {
        return; // another thread made room while we waited
    }
    cache.shrink_for_budget(budget);
    if budget.above_target() {
        load.shrink_for_budget(budget);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{CacheConfig, CachePool};
    use crate::load::{AddRequest, LoadConfig, LoadStore, Stamp};
    use std::sync::Arc;
    use std::time::Duration;

    fn at(secs: u64) -> Stamp {
        Stamp {
            mono: Duration::from_secs(secs),
            wall_ns: secs as i64 * 1_000_000_000,
        }
    }

    #[test]
    fn the_cache_yields_first_then_the_oldest_load_entries() {
        let budget = Arc::new(MemoryBudget::new(200_000));
        let load = LoadStore::with_budget(LoadConfig::default(), budget.clone());
        let cache = CachePool::with_budget(CacheConfig::default(), budget.clone());
        let ep = "10.0.0.1:80".parse().unwrap();
        // Fill the cache well past the budget over many clusters: usage stays bounded and the
        // newest paths are the ones kept.
        for i in 0..2_000u64 {
            let path: Vec<u64> = (0..16).map(|k| i * 100 + k).collect();
            cache.save(&format!("c{i}"), &path, ep, Duration::from_secs(i));
            enforce(&budget, &load, &cache);
            assert!(budget.used() <= budget.limit(), "{}", budget.used());
        }
        assert!(budget.counters.cache_nodes.load(Ordering::Relaxed) > 1_000);
        assert!(budget.counters.cache_clusters.load(Ordering::Relaxed) > 1_000);
        let last: Vec<u64> = (0..16).map(|k| 1_999 * 100 + k).collect();
        assert_eq!(
            cache.query("c1999", &last, 1, Duration::from_secs(2_000)),
            vec![(ep, 16)]
        );
        assert!(cache
            .query("c0", &[0, 1], 1, Duration::from_secs(2_000))
            .is_empty());
        // Load adds now push the cache out entirely before any request is evicted.
        let cache_before = budget.cache_bytes();
        assert!(cache_before > 0);
        let mut n = 0u64;
        while budget.cache_bytes() > 0 {
            load.add(
                &AddRequest {
                    cluster: &format!("m{n}"),
                    request_id: &format!("r{n}"),
                    prompt_length: 1,
                    engine: ep,
                },
                at(3_000 + n),
            );
            enforce(&budget, &load, &cache);
            n += 1;
            assert!(n < 100_000, "the cache never yielded");
            assert!(
                budget.counters.requests.load(Ordering::Relaxed) == 0 || budget.cache_bytes() == 0,
                "a request was evicted while the cache still held data"
            );
        }
        assert_eq!(cache.cluster_count(), 0, "empty trees are dropped");
        // With the cache empty, the load store evicts its own oldest entries.
        for k in 0..5_000u64 {
            let i = n + k;
            load.add(
                &AddRequest {
                    cluster: &format!("m{i}"),
                    request_id: &format!("r{i}"),
                    prompt_length: 1,
                    engine: ep,
                },
                at(3_000 + i),
            );
            enforce(&budget, &load, &cache);
            assert!(budget.used() <= budget.limit());
        }
        let evicted = budget.counters.requests.load(Ordering::Relaxed);
        assert!(evicted > 0);
        assert!(budget.counters.clusters.load(Ordering::Relaxed) > 0);
        let last = n + 4_999;
        assert!(load.query(&format!("m{last}")).is_some(), "newest kept");
        assert!(load.query("m0").is_none(), "oldest evicted");
        // The estimate follows the store exactly: removing everything brings it to zero.
        for i in 0..n + 5_000 {
            load.delete(&format!("r{i}"), at(20_000));
        }
        let far = Stamp {
            mono: Duration::from_secs(1_000_000),
            wall_ns: 0,
        };
        load.gc(far, 1024);
        assert_eq!(budget.load_bytes(), 0);
    }
}
