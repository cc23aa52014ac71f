//! The `repr(C)` structures of atomics that live either in a router's own memory or in a
//! shared-memory region ([`super::shared`]), and nothing else: an endpoint's counters
//! ([`EndpointCounters`]) with the rules that the region itself applies to them (reset,
//! orphans), and the prefix index's entries ([`Way`]). All-zero bytes are a valid initial
//! state of each. The logic that uses them lives in `endpoint.rs` and `prefix_index.rs`.

use std::sync::atomic::AtomicU64 as StdAtomicU64;
use std::sync::atomic::Ordering;

// Built with `--cfg loom` (make test-loom, tests/loom/tests/state.rs) the load and health
// counters are loom's, so the model checker explores every interleaving of concurrent updates.
// The prefix index's entries are always std's (a loom build never makes a shared region).
#[cfg(loom)]
use loom::sync::atomic::{AtomicU32, AtomicU64};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicU32, AtomicU64};

/// The load and health counters of one endpoint, all atomics (all-zero is the initial state),
/// `repr(C)` so that the same struct lives either in the endpoint (in-process router) or in a
/// slot of a shared-memory region (nginx workers, [`super::shared`]).
#[repr(C)]
pub struct EndpointCounters {
    pub(super) in_flight: AtomicU64,
    pub(super) prefill_chars: AtomicU64,
    /// The part of `prefill_chars` the endpoint was not expected to hold in its KV cache.
    pub(super) uncached_prefill_chars: AtomicU64,
    pub(super) picks: AtomicU64,
    pub(super) failures: AtomicU64,
    pub(super) ejections: AtomicU64,
    pub(super) ejected_until_ms: AtomicU64,
    /// Load other gateways put on this endpoint, from the last Metadata-Center poll.
    pub(super) remote_in_flight: AtomicU64,
    pub(super) remote_prefill: AtomicU64,
    /// Router time of that poll, ms; 0 = never.
    pub(super) remote_at_ms: AtomicU64,
    /// What this gateway has successfully reported to the Metadata-Center and not yet removed.
    pub(super) reported_in_flight: AtomicU64,
    pub(super) reported_prefill: AtomicU64,
    pub(super) consecutive_failures: AtomicU32,
    _reserved: AtomicU32,
    /// Shared mode: what dead workers had reported to the Metadata-Center and never removed
    /// (the server keeps it until its request TTL), so it is not mistaken for other
    /// gateways' load; and when the last of it was left behind (router time, ms).
    pub(super) orphan_in_flight: AtomicU64,
    pub(super) orphan_prefill: AtomicU64,
    pub(super) orphaned_at_ms: AtomicU64,
    /// Tokens the endpoint's answers wrote into its KV cache (prompt tokens it computed plus
    /// generated tokens), ever: the cache's turnover (`Residency`), over every router.
    pub(super) cache_written_tokens: AtomicU64,
    /// The highest pick number ([`EndpointCounters::picks`] after its pick) of a request whose
    /// first token came: every request picked before it is past its prefill (`prefill.rs`).
    pub(super) first_token_pick: AtomicU64,
}

impl EndpointCounters {
    pub(super) fn new() -> Self {
        Self {
            in_flight: AtomicU64::new(0),
            prefill_chars: AtomicU64::new(0),
            uncached_prefill_chars: AtomicU64::new(0),
            picks: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
            ejected_until_ms: AtomicU64::new(0),
            remote_in_flight: AtomicU64::new(0),
            remote_prefill: AtomicU64::new(0),
            remote_at_ms: AtomicU64::new(0),
            reported_in_flight: AtomicU64::new(0),
            reported_prefill: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            _reserved: AtomicU32::new(0),
            orphan_in_flight: AtomicU64::new(0),
            orphan_prefill: AtomicU64::new(0),
            orphaned_at_ms: AtomicU64::new(0),
            cache_written_tokens: AtomicU64::new(0),
            first_token_pick: AtomicU64::new(0),
        }
    }
}

/// How long the Metadata-Center keeps a request nobody removes (its default `req_expire`):
/// the load a dead worker reported is discounted from the server's totals this long.
pub const ORPHAN_TTL_MS: u64 = 660_000;

impl EndpointCounters {
    /// Dead workers' reported load still held by the server at `now_ms`, if any.
    pub(super) fn orphans(&self, now_ms: u64) -> (u64, u64) {
        let at = self.orphaned_at_ms.load(Ordering::Relaxed);
        if at == 0 || now_ms.saturating_sub(at) > ORPHAN_TTL_MS {
            return (0, 0);
        }
        (
            self.orphan_in_flight.load(Ordering::Relaxed),
            self.orphan_prefill.load(Ordering::Relaxed),
        )
    }

    /// Keeps `requests` / `prefill` a dead worker reported as orphans from `now_ms` on.
    pub(super) fn orphan(&self, requests: u64, prefill: u64, now_ms: u64) {
        if requests == 0 && prefill == 0 {
            return;
        }
        let at = self.orphaned_at_ms.load(Ordering::Relaxed);
        if at != 0 && now_ms.saturating_sub(at) > ORPHAN_TTL_MS {
            // The server has expired the earlier ones.
            self.orphan_in_flight.store(0, Ordering::Relaxed);
            self.orphan_prefill.store(0, Ordering::Relaxed);
        }
        self.orphan_in_flight.fetch_add(requests, Ordering::Relaxed);
        self.orphan_prefill.fetch_add(prefill, Ordering::Relaxed);
        self.orphaned_at_ms.store(now_ms.max(1), Ordering::Relaxed);
    }
}

/// One of the load counters a router adds and takes back. In shared mode each router keeps
/// its own share in its ledger entry and the endpoint's load is the sum over the routers
/// holding it: a worker killed at any instruction leaves no half-done update behind, and
/// dropping a dead worker's entry removes exactly its share ([`super::shared`]).
#[derive(Clone, Copy, Debug)]
pub(super) enum Load {
    InFlight,
    Prefill,
    Uncached,
    ReportedInFlight,
    ReportedPrefill,
}

impl EndpointCounters {
    pub(super) fn load_cell(&self, which: Load) -> &AtomicU64 {
        match which {
            Load::InFlight => &self.in_flight,
            Load::Prefill => &self.prefill_chars,
            Load::Uncached => &self.uncached_prefill_chars,
            Load::ReportedInFlight => &self.reported_in_flight,
            Load::ReportedPrefill => &self.reported_prefill,
        }
    }
}

impl EndpointCounters {
    /// Zeroes every counter (a slot taken over for another endpoint).
    pub(super) fn reset(&self) {
        for a in [
            &self.in_flight,
            &self.prefill_chars,
            &self.uncached_prefill_chars,
            &self.picks,
            &self.failures,
            &self.ejections,
            &self.ejected_until_ms,
            &self.remote_in_flight,
            &self.remote_prefill,
            &self.remote_at_ms,
            &self.reported_in_flight,
            &self.reported_prefill,
            &self.orphan_in_flight,
            &self.orphan_prefill,
            &self.orphaned_at_ms,
            &self.cache_written_tokens,
            &self.first_token_pick,
        ] {
            a.store(0, Ordering::Relaxed);
        }
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }
}

/// Subtracts `v`, stopping at zero.
pub(super) fn saturating_sub(a: &AtomicU64, v: u64) {
    let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |x| {
        Some(x.saturating_sub(v))
    });
}

/// Who recently served a prefix: at most this many endpoints per chunk hash.
pub const HOLDERS_PER_ENTRY: usize = 4;
/// Entries per set.
pub const WAYS: usize = 8;

/// One entry (one cache line): a chunk hash, its last use, its holders.
#[repr(C, align(64))]
pub struct Way {
    /// The chunk hash; 0 = empty.
    pub(super) key: StdAtomicU64,
    /// Index time of the last record or match (for eviction).
    pub(super) last_use: StdAtomicU64,
    /// Holder: endpoint id in the high 32 bits, index time of its last use in the low 32
    /// bits (0 = empty).
    pub(super) holders: [StdAtomicU64; HOLDERS_PER_ENTRY],
}

/// Counters of an index (in the shared region's header in shared mode).
#[repr(C)]
#[derive(Default)]
pub struct IndexStats {
    pub(super) occupied: StdAtomicU64,
    pub(super) evictions: StdAtomicU64,
}
