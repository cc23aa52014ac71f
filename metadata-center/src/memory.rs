//! The memory policy over both stores: when an add or a save brings the estimate of the load and
//! cache stores (`crate::budget`) over the limit, the least recently used data is evicted until
//! the sum is back under a low watermark (limit − limit/128).
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
//!
//! Why a coordinator: the order above needs both stores, while each store only needs the
//! accounting. So the budget is a plain accounting type (`crate::budget`) that the stores
//! report to and that knows neither of them; each store offers `shrink_for_budget` (evict its own
//! oldest data until the budget is back under its watermark); and this module, above both,
//! decides who shrinks when. Dependencies run one way: `memory` → `load`, `cache` → `budget`.

use std::sync::Arc;

use parking_lot::Mutex;

use crate::budget::MemoryBudget;
use crate::cache::CachePool;
use crate::load::LoadStore;

/// Runs the eviction order over the two stores that share one budget.
pub struct Evictor {
    budget: Arc<MemoryBudget>,
    load: Arc<LoadStore>,
    cache: Arc<CachePool>,
    /// One evictor at a time; others re-check after it is done.
    one: Mutex<()>,
}

impl Evictor {
    /// `load` and `cache` must report to `budget` (`with_budget`).
    pub fn new(budget: Arc<MemoryBudget>, load: Arc<LoadStore>, cache: Arc<CachePool>) -> Self {
        Evictor {
            budget,
            load,
            cache,
            one: Mutex::new(()),
        }
    }

    pub fn budget(&self) -> &MemoryBudget {
        &self.budget
    }

    /// Bring usage back under the budget after an add or a save: the cache evicts first, then
    /// the load store (see the module docs). Cheap when under the limit (two atomic loads).
    pub fn enforce(&self) {
        if !self.budget.over() {
            return;
        }
        let _one = self.one.lock();
        if !self.budget.over() {
            return; // another thread made room while we waited
        }
        // The cache gives way first: the load store is shrunk only once the cache has nothing
        // left to evict. Saves landing while the cache shrinks may push usage back above the
        // target: shrink the cache again rather than evict requests while it still holds data.
        loop {
            let evicted = self.cache.shrink_for_budget();
            if !self.budget.above_target() {
                return;
            }
            if evicted == 0 || self.budget.cache_bytes() == 0 {
                break;
            }
        }
        self.load.shrink_for_budget();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CacheConfig;
    use crate::load::{AddRequest, LoadConfig, Stamp};
    use std::sync::atomic::Ordering;
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
        let load = Arc::new(LoadStore::with_budget(
            LoadConfig::default(),
            budget.clone(),
        ));
        let cache = Arc::new(CachePool::with_budget(
            CacheConfig::default(),
            budget.clone(),
        ));
        let evictor = Evictor::new(budget.clone(), load.clone(), cache.clone());
        let ep = "10.0.0.1:80".parse().unwrap();
        // Fill the cache well past the budget over many clusters: usage stays bounded and the
        // newest paths are the ones kept.
        for i in 0..2_000u64 {
            let path: Vec<u64> = (0..16).map(|k| i * 100 + k).collect();
            cache.save(&format!("c{i}"), &path, ep, Duration::from_secs(i));
            evictor.enforce();
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
            evictor.enforce();
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
            evictor.enforce();
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
