//! The memory budget as plain accounting: its limit, the estimate of the bytes each store holds,
//! and the eviction counters. The load store (requests, clusters, engines) sets its estimate, the
//! cache trees add their changes to theirs; neither store knows of the other.
//!
//! Who evicts, and in which order, is not decided here but in `crate::memory`, the small
//! coordinator above both stores (so the dependencies run one way: `memory` → `load`, `cache` →
//! `budget`). The estimate counts the stores' own data structures, calibrated against the RSS of
//! the real binary (see `docs/metadata-center.md`); the process itself (code, runtime, connection
//! buffers) is not part of it.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

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
    pub counters: BudgetCounters,
}

impl MemoryBudget {
    pub fn new(limit_bytes: u64) -> Self {
        MemoryBudget {
            limit: limit_bytes,
            load: AtomicU64::new(0),
            cache: AtomicI64::new(0),
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
    #[cfg(feature = "server")]
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
