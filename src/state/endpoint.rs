//! One model-server replica and its lock-free counters: in-flight requests, prompt characters
//! still in prefill, passive health (consecutive failures, ejection deadline), the load other
//! gateways reported for it, and its time-to-first-token histograms.
//!
//! The counters ([`EndpointCounters`]) are one struct with one set of update rules whether they
//! live in the endpoint (in-process router) or in a shared-memory slot (nginx workers). In the
//! shared case the load counters ([`Load`]) are kept per router in its ledger and summed when
//! read, so that a worker's death removes exactly its share.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::OnceLock;

// Built with `--cfg loom` (make test-loom, tests/loom_state.rs) the load and health counters are
// loom's, so the model checker explores every interleaving of concurrent updates.
#[cfg(loom)]
use loom::sync::atomic::{AtomicU32, AtomicU64};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicU32, AtomicU64};

use crate::prometheus::Histogram;

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
    _pad: AtomicU32,
    /// Shared mode: what dead workers had reported to the Metadata-Center and never removed
    /// (the server keeps it until its request TTL), so it is not mistaken for other
    /// gateways' load; and when the last of it was left behind (router time, ms).
    pub(super) orphan_in_flight: AtomicU64,
    pub(super) orphan_prefill: AtomicU64,
    pub(super) orphaned_at_ms: AtomicU64,
}

impl EndpointCounters {
    fn new() -> Self {
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
            _pad: AtomicU32::new(0),
            orphan_in_flight: AtomicU64::new(0),
            orphan_prefill: AtomicU64::new(0),
            orphaned_at_ms: AtomicU64::new(0),
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

/// Where an endpoint's counters live.
enum Storage {
    /// In the endpoint itself (in-process router).
    Own(Box<EndpointCounters>),
    /// In a slot of a shared region, with this router's ledger of what it added there.
    Shared(super::shared::SlotLease),
}

/// One model-server replica of a cluster.
pub struct Endpoint {
    /// Router-unique id, used by the prefix index (in shared mode, unique in the region).
    pub id: u32,
    /// Socket address.
    pub addr: SocketAddr,
    /// `ip:port` as hosts need it (IPv6 in brackets).
    pub address: String,
    /// Labels matched by rule subsets (from the config).
    pub labels: std::collections::BTreeMap<String, String>,
    /// LoRA adapters this endpoint serves (from the config).
    pub lora_adapters: Vec<String>,
    storage: Storage,
    /// Time from pick to first token, per model (indexed like `Router` models), made lazily.
    ttft: Box<[OnceLock<Histogram>]>,
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
    fn load_cell(&self, which: Load) -> &AtomicU64 {
        match which {
            Load::InFlight => &self.in_flight,
            Load::Prefill => &self.prefill_chars,
            Load::Uncached => &self.uncached_prefill_chars,
            Load::ReportedInFlight => &self.reported_in_flight,
            Load::ReportedPrefill => &self.reported_prefill,
        }
    }
}

impl Endpoint {
    /// A fresh endpoint with zeroed counters of its own; `models` is the number of TTFT
    /// histogram slots.
    pub fn new(id: u32, addr: SocketAddr, models: usize) -> Self {
        Self::with_storage(
            id,
            addr,
            models,
            Storage::Own(Box::new(EndpointCounters::new())),
        )
    }

    /// An endpoint whose counters live in a shared region slot.
    pub(super) fn shared(addr: SocketAddr, models: usize, lease: super::shared::SlotLease) -> Self {
        Self::with_storage(lease.endpoint_id(), addr, models, Storage::Shared(lease))
    }

    fn with_storage(id: u32, addr: SocketAddr, models: usize, storage: Storage) -> Self {
        Self {
            id,
            addr,
            address: addr.to_string(),
            labels: Default::default(),
            lora_adapters: Vec::new(),
            storage,
            ttft: (0..models).map(|_| OnceLock::new()).collect(),
        }
    }

    fn c(&self) -> &EndpointCounters {
        match &self.storage {
            Storage::Own(c) => c,
            Storage::Shared(lease) => lease.counters(),
        }
    }

    /// The endpoint's `which` load: its own counter, or the sum of every router's share.
    fn load(&self, which: Load) -> u64 {
        match &self.storage {
            Storage::Own(c) => c.load_cell(which).load(Ordering::Relaxed),
            Storage::Shared(lease) => lease.load(which),
        }
    }

    /// Adds `v` to this router's part of the `which` load.
    fn add(&self, which: Load, v: u64) {
        match &self.storage {
            Storage::Own(c) => {
                c.load_cell(which).fetch_add(v, Ordering::Relaxed);
            }
            Storage::Shared(lease) => lease.add(which, v),
        }
    }

    /// Takes `v` back from this router's part of the `which` load (never below zero).
    fn sub(&self, which: Load, v: u64) {
        match &self.storage {
            Storage::Own(c) => saturating_sub(c.load_cell(which), v),
            Storage::Shared(lease) => lease.sub(which, v),
        }
    }

    /// True when the counters live in a shared region.
    pub fn is_shared(&self) -> bool {
        !matches!(self.storage, Storage::Own(_))
    }

    /// Requests picked for this endpoint and not yet finished.
    pub fn in_flight(&self) -> u64 {
        self.load(Load::InFlight)
    }

    /// Prompt characters of requests that have not produced their first token yet.
    pub fn prefill_chars(&self) -> u64 {
        self.load(Load::Prefill)
    }

    /// Prompt characters still in prefill that the endpoint must compute (not cached).
    pub fn uncached_prefill_chars(&self) -> u64 {
        self.load(Load::Uncached)
    }

    /// Total picks of this endpoint.
    pub fn picks(&self) -> u64 {
        self.c().picks.load(Ordering::Relaxed)
    }

    /// Total failed requests (502/503/504 from upstream).
    pub fn failures(&self) -> u64 {
        self.c().failures.load(Ordering::Relaxed)
    }

    /// Total times this endpoint was ejected.
    pub fn ejections(&self) -> u64 {
        self.c().ejections.load(Ordering::Relaxed)
    }

    /// Accounts a new request with `prompt_chars` of prompt, `uncached_chars` of which the
    /// endpoint must compute.
    pub fn acquire(&self, prompt_chars: u64, uncached_chars: u64) {
        self.c().picks.fetch_add(1, Ordering::Relaxed);
        self.add(Load::InFlight, 1);
        self.add(Load::Prefill, prompt_chars);
        self.add(Load::Uncached, uncached_chars);
    }

    /// Releases the prefill part of a request (first token seen).
    pub fn release_prefill(&self, prompt_chars: u64, uncached_chars: u64) {
        self.sub(Load::Prefill, prompt_chars);
        self.sub(Load::Uncached, uncached_chars);
    }

    /// Releases the request itself (finished).
    pub fn release_request(&self) {
        self.sub(Load::InFlight, 1);
    }

    /// True when the endpoint is ejected at `now_ms`.
    pub fn is_ejected(&self, now_ms: u64) -> bool {
        self.c().ejected_until_ms.load(Ordering::Relaxed) > now_ms
    }

    /// Records a failed request; ejects the endpoint for `eject_ms` after `threshold`
    /// consecutive failures. Returns true when this failure ejected it.
    pub fn record_failure(&self, now_ms: u64, threshold: u32, eject_ms: u64) -> bool {
        let c = self.c();
        c.failures.fetch_add(1, Ordering::Relaxed);
        let n = c.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if threshold == 0 || n < threshold {
            return false;
        }
        let until = c.ejected_until_ms.load(Ordering::Relaxed);
        // Of the failures racing past the threshold on different workers, one ejects
        // (found by tests/loom_state.rs: a plain store ejected, and counted, once per worker).
        if until > now_ms
            || c.ejected_until_ms
                .compare_exchange(
                    until,
                    now_ms + eject_ms,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            return false;
        }
        // After the ejection ends, one more failure ejects again (half-open).
        c.consecutive_failures
            .store(threshold.saturating_sub(1), Ordering::Relaxed);
        c.ejections.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Records a successful request: the failure streak ends.
    pub fn record_success(&self) {
        self.c().consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// The endpoint's name on the Metadata-Center wire.
    pub fn wire_id(&self, identity: crate::config::EndpointIdentity) -> String {
        match identity {
            crate::config::EndpointIdentity::IpPort => self.address.clone(),
            crate::config::EndpointIdentity::Ip => self.addr.ip().to_string(),
        }
    }

    /// The sync thread delivered an add of `prompt_chars`.
    pub fn reported_add(&self, prompt_chars: u64) {
        self.add(Load::ReportedInFlight, 1);
        self.add(Load::ReportedPrefill, prompt_chars);
    }

    /// The sync thread delivered a release of `requests` and `prompt_chars`.
    pub fn reported_release(&self, requests: u64, prompt_chars: u64) {
        self.sub(Load::ReportedInFlight, requests);
        self.sub(Load::ReportedPrefill, prompt_chars);
    }

    /// Stores a polled total, minus what this gateway itself reported (so its own requests,
    /// counted live in the local atomics, are not counted twice).
    pub fn set_remote_load(&self, total_in_flight: u64, total_prefill: u64, at_ms: u64) {
        let c = self.c();
        let (orphan_q, orphan_l) = c.orphans(at_ms);
        let own_q = self.load(Load::ReportedInFlight) + orphan_q;
        let own_l = self.load(Load::ReportedPrefill) + orphan_l;
        c.remote_in_flight
            .store(total_in_flight.saturating_sub(own_q), Ordering::Relaxed);
        c.remote_prefill
            .store(total_prefill.saturating_sub(own_l), Ordering::Relaxed);
        c.remote_at_ms.store(at_ms.max(1), Ordering::Relaxed);
    }

    /// Requests other gateways had in flight here at the last poll (0 when never polled).
    pub fn remote_in_flight(&self) -> u64 {
        self.c().remote_in_flight.load(Ordering::Relaxed)
    }

    /// Load other gateways put here, if polled within `stale_ms` of `now_ms`.
    pub fn remote_load(&self, now_ms: u64, stale_ms: u64) -> Option<(u64, u64)> {
        let c = self.c();
        let at = c.remote_at_ms.load(Ordering::Relaxed);
        (at != 0 && now_ms.saturating_sub(at) <= stale_ms).then(|| {
            (
                c.remote_in_flight.load(Ordering::Relaxed),
                c.remote_prefill.load(Ordering::Relaxed),
            )
        })
    }

    /// Histogram of time to first token for model slot `model`.
    pub fn ttft(&self, model: usize) -> Option<&Histogram> {
        self.ttft
            .get(model)
            .map(|slot| slot.get_or_init(Histogram::latency))
    }

    /// TTFT histograms that have been used, by model slot.
    pub fn ttft_histograms(&self) -> impl Iterator<Item = (usize, &Histogram)> {
        self.ttft
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.get().map(|h| (i, h)))
    }
}

pub(super) fn saturating_sub(a: &AtomicU64, v: u64) {
    let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |x| {
        Some(x.saturating_sub(v))
    });
}
