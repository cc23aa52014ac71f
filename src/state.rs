//! Local routing state: endpoints with their load counters, clusters, and the prefix index.
//!
//! This module owns what a router knows without asking anyone:
//! - per endpoint, atomics for in-flight requests and prompt characters still in prefill,
//!   plus passive-health bookkeeping (consecutive failures, ejection deadline);
//! - per cluster, the current endpoint set, swapped atomically (readers never lock);
//! - the prefix index: chunk hash → endpoints that recently served a prompt with that
//!   prefix, bounded and evicted least-recently-used.
//!
//! Endpoints are shared by `Arc`: a request keeps its endpoint alive until it finishes, so an
//! endpoint removed from its cluster mid-request still gets its counters released.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

// Built with `--cfg loom` (make test-loom, tests/loom_state.rs) the load and health counters are
// loom's, so the model checker explores every interleaving of concurrent updates.
#[cfg(loom)]
use loom::sync::atomic::{AtomicU32, AtomicU64};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicU32, AtomicU64};

use arc_swap::ArcSwap;
use lru::LruCache;

use crate::metrics::Histogram;

/// One model-server replica of a cluster.
pub struct Endpoint {
    /// Router-unique id, used by the prefix index.
    pub id: u32,
    /// Socket address.
    pub addr: SocketAddr,
    /// `ip:port` as hosts need it (IPv6 in brackets).
    pub address: String,
    /// Labels matched by rule subsets (from the config).
    pub labels: std::collections::BTreeMap<String, String>,
    /// LoRA adapters this endpoint serves (from the config).
    pub lora_adapters: Vec<String>,
    in_flight: AtomicU64,
    prefill_chars: AtomicU64,
    /// The part of `prefill_chars` the endpoint was not expected to hold in its KV cache.
    uncached_prefill_chars: AtomicU64,
    picks: AtomicU64,
    failures: AtomicU64,
    ejections: AtomicU64,
    consecutive_failures: AtomicU32,
    ejected_until_ms: AtomicU64,
    /// Load other gateways put on this endpoint, from the last Metadata-Center poll.
    remote_in_flight: AtomicU64,
    remote_prefill: AtomicU64,
    /// Router time of that poll, ms; 0 = never.
    remote_at_ms: AtomicU64,
    /// What this router has successfully reported to the Metadata-Center and not yet removed.
    reported_in_flight: AtomicU64,
    reported_prefill: AtomicU64,
    /// Time from pick to first token, per model (indexed like `Router` models), made lazily.
    ttft: Box<[OnceLock<Histogram>]>,
}

impl Endpoint {
    /// A fresh endpoint with zeroed counters; `models` is the number of TTFT histogram slots.
    pub fn new(id: u32, addr: SocketAddr, models: usize) -> Self {
        Self {
            id,
            addr,
            address: addr.to_string(),
            labels: Default::default(),
            lora_adapters: Vec::new(),
            in_flight: AtomicU64::new(0),
            prefill_chars: AtomicU64::new(0),
            uncached_prefill_chars: AtomicU64::new(0),
            picks: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            remote_in_flight: AtomicU64::new(0),
            remote_prefill: AtomicU64::new(0),
            remote_at_ms: AtomicU64::new(0),
            reported_in_flight: AtomicU64::new(0),
            reported_prefill: AtomicU64::new(0),
            ttft: (0..models).map(|_| OnceLock::new()).collect(),
        }
    }

    /// Requests picked for this endpoint and not yet finished.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Prompt characters of requests that have not produced their first token yet.
    pub fn prefill_chars(&self) -> u64 {
        self.prefill_chars.load(Ordering::Relaxed)
    }

    /// Prompt characters still in prefill that the endpoint must compute (not cached).
    pub fn uncached_prefill_chars(&self) -> u64 {
        self.uncached_prefill_chars.load(Ordering::Relaxed)
    }

    /// Total picks of this endpoint.
    pub fn picks(&self) -> u64 {
        self.picks.load(Ordering::Relaxed)
    }

    /// Total failed requests (502/503/504 from upstream).
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Total times this endpoint was ejected.
    pub fn ejections(&self) -> u64 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// Accounts a new request with `prompt_chars` of prompt, `uncached_chars` of which the
    /// endpoint must compute.
    pub fn acquire(&self, prompt_chars: u64, uncached_chars: u64) {
        self.picks.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.prefill_chars
            .fetch_add(prompt_chars, Ordering::Relaxed);
        self.uncached_prefill_chars
            .fetch_add(uncached_chars, Ordering::Relaxed);
    }

    /// Releases the prefill part of a request (first token seen).
    pub fn release_prefill(&self, prompt_chars: u64, uncached_chars: u64) {
        saturating_sub(&self.prefill_chars, prompt_chars);
        saturating_sub(&self.uncached_prefill_chars, uncached_chars);
    }

    /// Releases the request itself (finished).
    pub fn release_request(&self) {
        saturating_sub(&self.in_flight, 1);
    }

    /// True when the endpoint is ejected at `now_ms`.
    pub fn is_ejected(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now_ms
    }

    /// Records a failed request; ejects the endpoint for `eject_ms` after `threshold`
    /// consecutive failures. Returns true when this failure ejected it.
    pub fn record_failure(&self, now_ms: u64, threshold: u32, eject_ms: u64) -> bool {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if threshold == 0 || n < threshold {
            return false;
        }
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        // Of the failures racing past the threshold on different workers, one ejects
        // (found by tests/loom_state.rs: a plain store ejected, and counted, once per worker).
        if until > now_ms
            || self
                .ejected_until_ms
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
        self.consecutive_failures
            .store(threshold.saturating_sub(1), Ordering::Relaxed);
        self.ejections.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Records a successful request: the failure streak ends.
    pub fn record_success(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
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
        self.reported_in_flight.fetch_add(1, Ordering::Relaxed);
        self.reported_prefill
            .fetch_add(prompt_chars, Ordering::Relaxed);
    }

    /// The sync thread delivered a release of `requests` and `prompt_chars`.
    pub fn reported_release(&self, requests: u64, prompt_chars: u64) {
        saturating_sub(&self.reported_in_flight, requests);
        saturating_sub(&self.reported_prefill, prompt_chars);
    }

    /// Stores a polled total, minus what this router itself reported (so its own requests,
    /// counted live in the local atomics, are not counted twice).
    pub fn set_remote_load(&self, total_in_flight: u64, total_prefill: u64, at_ms: u64) {
        let own_q = self.reported_in_flight.load(Ordering::Relaxed);
        let own_l = self.reported_prefill.load(Ordering::Relaxed);
        self.remote_in_flight
            .store(total_in_flight.saturating_sub(own_q), Ordering::Relaxed);
        self.remote_prefill
            .store(total_prefill.saturating_sub(own_l), Ordering::Relaxed);
        self.remote_at_ms.store(at_ms.max(1), Ordering::Relaxed);
    }

    /// Requests other gateways had in flight here at the last poll (0 when never polled).
    pub fn remote_in_flight(&self) -> u64 {
        self.remote_in_flight.load(Ordering::Relaxed)
    }

    /// Load other gateways put here, if polled within `stale_ms` of `now_ms`.
    pub fn remote_load(&self, now_ms: u64, stale_ms: u64) -> Option<(u64, u64)> {
        let at = self.remote_at_ms.load(Ordering::Relaxed);
        (at != 0 && now_ms.saturating_sub(at) <= stale_ms).then(|| {
            (
                self.remote_in_flight.load(Ordering::Relaxed),
                self.remote_prefill.load(Ordering::Relaxed),
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

fn saturating_sub(a: &AtomicU64, v: u64) {
    let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |x| {
        Some(x.saturating_sub(v))
    });
}

/// An immutable view of a cluster's endpoints, swapped as a whole.
pub struct EndpointSet {
    /// The endpoints, in configured order.
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Endpoint id → position in `endpoints`.
    pub position: HashMap<u32, usize>,
}

impl EndpointSet {
    fn new(endpoints: Vec<Arc<Endpoint>>) -> Self {
        let position = endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| (e.id, i))
            .collect();
        Self {
            endpoints,
            position,
        }
    }
}

/// A named group of endpoints that serve the same model(s).
pub struct Cluster {
    /// Cluster name (Envoy cluster, metadata-center key).
    pub name: String,
    endpoints: ArcSwap<EndpointSet>,
    /// Round-robin cursor.
    pub rr_cursor: AtomicUsize,
    /// Router time of the last pick, ms (0 = never): active clusters are polled.
    last_pick_ms: AtomicU64,
}

impl Cluster {
    /// An empty cluster.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            endpoints: ArcSwap::from_pointee(EndpointSet::new(Vec::new())),
            rr_cursor: AtomicUsize::new(0),
            last_pick_ms: AtomicU64::new(0),
        }
    }

    /// Marks the cluster as used at `now_ms`.
    pub fn touch(&self, now_ms: u64) {
        self.last_pick_ms.store(now_ms.max(1), Ordering::Relaxed);
    }

    /// True when the cluster saw a pick within `window_ms` of `now_ms`.
    pub fn is_active(&self, now_ms: u64, window_ms: u64) -> bool {
        let t = self.last_pick_ms.load(Ordering::Relaxed);
        t != 0 && now_ms.saturating_sub(t) <= window_ms
    }

    /// The current endpoint set (lock-free).
    pub fn snapshot(&self) -> Arc<EndpointSet> {
        self.endpoints.load_full()
    }

    /// Replaces the endpoint set. Endpoints whose address stays keep their state;
    /// `make` creates the new ones. Callers serialise replacements.
    pub fn replace(&self, addrs: &[SocketAddr], mut make: impl FnMut(SocketAddr) -> Endpoint) {
        let old = self.endpoints.load();
        let by_addr: HashMap<SocketAddr, &Arc<Endpoint>> =
            old.endpoints.iter().map(|e| (e.addr, e)).collect();
        let mut seen = std::collections::HashSet::new();
        let next: Vec<Arc<Endpoint>> = addrs
            .iter()
            .filter(|a| seen.insert(**a))
            .map(|a| match by_addr.get(a) {
                Some(e) => Arc::clone(e),
                None => Arc::new(make(*a)),
            })
            .collect();
        self.endpoints.store(Arc::new(EndpointSet::new(next)));
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn set_of(ids: &[u32]) -> EndpointSet {
        EndpointSet::new(
            ids.iter()
                .map(|&i| {
                    Arc::new(Endpoint::new(
                        i,
                        format!("127.0.0.1:{}", 9000 + i).parse().unwrap(),
                        1,
                    ))
                })
                .collect(),
        )
    }

    #[test]
    fn matched_chunks_follow_the_recorded_prefix() {
        let idx = PrefixIndex::new(1000);
        let set = set_of(&[1, 2, 3]);
        idx.record(&[10, 11, 12, 13], 1, 1);
        idx.record(&[10, 11], 2, 2);
        assert_eq!(
            idx.matched_chunks(&[10, 11, 12, 13, 14], &set),
            vec![4, 2, 0]
        );
        assert_eq!(idx.matched_chunks(&[99, 11], &set), vec![0, 0, 0]);
        // Endpoints outside the set are ignored.
        assert_eq!(idx.matched_chunks(&[10, 11, 12], &set_of(&[3])), vec![0]);
    }

    #[test]
    fn index_is_bounded_and_evicts_least_recently_used() {
        let idx = PrefixIndex::new(64);
        for h in 0..10_000u64 {
            idx.record(&[h.wrapping_mul(0x9E37_79B9_7F4A_7C15)], 1, h);
        }
        assert!(idx.len() <= 64, "len {}", idx.len());
        assert!(idx.evictions() >= 10_000 - 64);
    }

    #[test]
    fn holders_per_entry_are_bounded_keeping_the_most_recent() {
        let idx = PrefixIndex::new(100);
        for e in 1..=6u32 {
            idx.record(&[7], e, e as u64);
        }
        let depth = idx.matched_chunks(&[7], &set_of(&[1, 2, 3, 4, 5, 6]));
        assert_eq!(depth, vec![0, 0, 1, 1, 1, 1]);
    }

    #[test]
    fn replace_keeps_state_of_endpoints_that_stay() {
        let c = Cluster::new("c");
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let mut next = 0;
        let mut make = |addr| {
            next += 1;
            Endpoint::new(next, addr, 0)
        };
        c.replace(&[a, b, a], &mut make);
        assert_eq!(c.snapshot().endpoints.len(), 2, "duplicates dropped");
        c.snapshot().endpoints[0].acquire(100, 60);
        c.replace(&[b, a], &mut make);
        let s = c.snapshot();
        assert_eq!(s.endpoints[1].addr, a);
        assert_eq!(s.endpoints[1].in_flight(), 1);
        assert_eq!(s.endpoints[1].prefill_chars(), 100);
        assert_eq!(s.position[&s.endpoints[1].id], 1);
    }

    #[test]
    fn ejection_after_consecutive_failures_and_half_open() {
        let e = Endpoint::new(1, "127.0.0.1:1".parse().unwrap(), 0);
        assert!(!e.record_failure(0, 2, 1000));
        e.record_success();
        assert!(!e.record_failure(0, 2, 1000));
        assert!(e.record_failure(10, 2, 1000));
        assert!(e.is_ejected(500));
        assert!(!e.is_ejected(1010));
        // Half-open: one more failure ejects again.
        assert!(e.record_failure(1100, 2, 1000));
        assert_eq!(e.ejections(), 2);
    }

    #[test]
    fn remote_load_excludes_own_reports_and_goes_stale() {
        let e = Endpoint::new(1, "127.0.0.1:1".parse().unwrap(), 0);
        assert_eq!(e.remote_load(10, 100), None, "never polled");
        e.reported_add(300);
        e.reported_add(200);
        e.reported_release(0, 200);
        // The server counts 5 requests / 1000 chars; 2 / 300 of them are ours.
        e.set_remote_load(5, 1000, 50);
        assert_eq!(e.remote_load(100, 100), Some((3, 700)));
        assert_eq!(e.remote_load(151, 100), None, "stale");
        e.set_remote_load(1, 0, 200);
        assert_eq!(e.remote_load(200, 100), Some((0, 0)), "never negative");
    }

    #[test]
    fn counters_never_underflow() {
        let e = Endpoint::new(1, "127.0.0.1:1".parse().unwrap(), 0);
        e.release_request();
        e.release_prefill(5, 5);
        assert_eq!((e.in_flight(), e.prefill_chars()), (0, 0));
    }
}
