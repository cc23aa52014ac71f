//! Local routing state: endpoints with their load counters, clusters, and the prefix index.
//!
//! This module owns what a router knows without asking anyone:
//! - `cells.rs`: the `repr(C)` structures of atomics (endpoint counters, prefix-index entries)
//!   that live in a router's memory or in a shared region;
//! - [`Endpoint`] (`endpoint.rs`): per endpoint, atomics for in-flight requests and prompt
//!   characters still in prefill, plus passive-health bookkeeping (consecutive failures,
//!   ejection deadline);
//! - [`Cluster`] and [`Clusters`] (`cluster.rs`): per cluster, the current endpoint set,
//!   swapped atomically (readers never lock); the registry that replaces sets;
//! - [`PrefixIndex`] (`prefix_index.rs`): chunk hash → endpoints that recently served a
//!   prompt with that prefix, bounded and evicted least-recently-used;
//! - [`Clock`] (`clock.rs`): the router's millisecond clock, shared with its background threads;
//! - [`SharedState`] (`shared/`): a shared-memory region holding the endpoint counters and
//!   the prefix index for every process of a host (nginx workers), with per-worker ledgers so
//!   that a dead worker's load is taken back.
//!
//! Endpoints are shared by `Arc`: a request keeps its endpoint alive until it finishes, so an
//! endpoint removed from its cluster mid-request still gets its counters released.
//!
//! One code path serves both modes: the counters ([`EndpointCounters`]) and the prefix index
//! are the same structures, on the router's own memory or in a shared region.

mod cells;
mod clock;
mod cluster;
mod endpoint;
mod prefill;
mod prefix_index;
pub mod shared;

pub use cells::EndpointCounters;
pub use clock::{monotonic_ms, Clock};
pub use cluster::{Cluster, Clusters, EndpointSet};
pub use endpoint::{AnswerStats, Endpoint, TOKEN_KINDS};
pub use prefill::PrefillHold;
pub use prefix_index::PrefixIndex;
pub use shared::{Attachment, SharedState, SharedStats};

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;

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
    fn resident_chunks_leave_out_holders_past_their_endpoints_horizon() {
        let idx = PrefixIndex::new(1000);
        let set = set_of(&[1, 2]);
        // endpoint 1 served the prefix at 1 s, endpoint 2 its first half at 9 s
        idx.record(&[10, 11, 12, 13], 1, 1_000);
        idx.record(&[10, 11], 2, 9_000);
        let q = [10, 11, 12, 13];
        // at 10 s, with horizons of 5 s each: endpoint 1's use is 9 s old, evicted
        assert_eq!(
            idx.resident_chunks(&q, &set, 10_000, &[5_000, 5_000]),
            [0, 2]
        );
        // a longer horizon on endpoint 1 keeps it; no horizon at all is the plain match
        assert_eq!(
            idx.resident_chunks(&q, &set, 10_000, &[10_000, 5_000]),
            [4, 2]
        );
        assert_eq!(idx.resident_chunks(&q, &set, 10_000, &[]), [4, 2]);
        assert_eq!(idx.matched_chunks(&q, &set), vec![4, 2]);
        // nobody holds the first chunk any more: the walk stops there
        assert_eq!(
            idx.resident_chunks(&q, &set, 20_000, &[5_000, 5_000]),
            [0, 0]
        );
    }

    #[test]
    fn claim_of_lists_one_endpoints_prefix_and_the_age_of_its_deepest_chunk() {
        let idx = PrefixIndex::new(1000);
        // endpoint 1 served three chunks at 1 s and the first again at 4 s; endpoint 2 two
        idx.record(&[10, 11, 12], 1, 1_000);
        idx.record(&[10], 1, 4_000);
        idx.record(&[10, 11], 2, 2_000);
        assert_eq!(idx.claim_of(&[10, 11, 12, 13], 1, 5_000), (3, 4_000));
        assert_eq!(idx.claim_of(&[10], 1, 5_000), (1, 1_000));
        assert_eq!(idx.claim_of(&[10, 11, 12], 2, 5_000), (2, 3_000));
        // another endpoint, or a prompt that differs from the first chunk: nothing
        assert_eq!(idx.claim_of(&[10, 11], 3, 5_000), (0, 0));
        assert_eq!(idx.claim_of(&[99, 11], 1, 5_000), (0, 0));
        // whatever the age: the residency filter is the caller's
        assert_eq!(idx.claim_of(&[10, 11], 1, 900_000), (2, 899_000));
    }

    /// Gives `e` a measured write rate of 10 tokens per ms (20,000 over the 2 s to router
    /// time 3,000).
    fn writes_10_tokens_per_ms(e: &Endpoint) {
        e.cache_horizon_ms(1_000, 0);
        e.cache_written(20_000);
        e.cache_horizon_ms(3_000, 0);
    }

    #[test]
    fn residency_capacity_is_learned_from_the_claims_the_engine_kept_or_evicted() {
        let e = Endpoint::new(1, "127.0.0.1:1".parse().unwrap(), 0);
        let r = &e.residency;
        r.learn(5_000, 1.0, 0.0);
        assert_eq!(r.learned_capacity(), None, "no write rate yet");
        writes_10_tokens_per_ms(&e);
        // a kept claim proves nothing before an eviction was seen; a young claim, a small one
        // or one partly kept teaches nothing
        r.learn(5_000, 1.0, 1.0);
        r.learn(500, 1.0, 0.0);
        r.learn(5_000, 0.1, 0.0);
        r.learn(5_000, 1.0, 0.5);
        assert_eq!(r.learned_capacity(), None);
        assert_eq!(e.cache_horizon_ms(3_500, 0), u64::MAX, "no limit yet");
        // the first eviction: a claim last used 3 s (30,000 written tokens) ago was gone
        r.learn(3_000, 0.8, 0.0);
        assert_eq!(r.learned_capacity(), Some(30_000.0));
        assert_eq!(e.cache_horizon_ms(3_500, 0), 3_000);
        // an eviction after fewer writes lowers it a quarter of the way, one after more
        // writes does not move it
        r.learn(1_000, 0.8, 0.1);
        assert_eq!(r.learned_capacity(), Some(25_000.0));
        r.learn(5_000, 0.8, 0.0);
        assert_eq!(r.learned_capacity(), Some(25_000.0));
        // a claim kept after more writes raises it; kept after fewer, or half kept: no change
        r.learn(4_000, 0.8, 0.8);
        assert_eq!(r.learned_capacity(), Some(28_750.0));
        r.learn(2_000, 0.8, 0.8);
        r.learn(6_000, 0.8, 0.4);
        assert_eq!(r.learned_capacity(), Some(28_750.0));
        // a capacity from the config (or the engine) wins over the learned one
        assert_eq!(e.cache_horizon_ms(3_500, 60_000), 6_000);
        assert!(r.capacity_given(60_000) && !r.capacity_given(0));
        r.set_capacity(120_000);
        assert!(r.capacity_given(0));
        assert_eq!(e.cache_horizon_ms(3_500, 0), 12_000);
    }

    #[test]
    fn a_claim_younger_than_the_recent_first_tokens_may_still_be_computing() {
        let e = Endpoint::new(1, "127.0.0.1:1".parse().unwrap(), 0);
        let r = &e.residency;
        writes_10_tokens_per_ms(&e);
        assert_eq!(r.settle_ms(), 1_000, "at least a second");
        // a loaded endpoint: a request's first token came 4 s after its pick
        r.note_first_token(4_000.0);
        r.note_first_token(300.0);
        assert_eq!(
            r.settle_ms(),
            3_938,
            "a decaying maximum: {}",
            r.settle_ms()
        );
        // a 3 s old claim the engine did not have may be a prefix still being computed: it
        // neither sets the capacity to 30,000 tokens nor counts as recomputed
        r.learn(3_000, 0.8, 0.0);
        assert_eq!(r.learned_capacity(), None);
        r.note_writes(1_000, 1_000, 0.8, 3_000, 0.0);
        assert_eq!(r.eviction_share(), 0.0);
        // older than the first tokens take: an eviction
        r.learn(5_000, 0.8, 0.0);
        assert_eq!(r.learned_capacity(), Some(50_000.0));
        r.note_writes(1_000, 1_000, 0.8, 5_000, 0.0);
        assert!(r.eviction_share() > 0.0);
        // the maximum decays as faster first tokens come (about the last 64 count)
        for _ in 0..400 {
            r.note_first_token(200.0);
        }
        assert_eq!(r.settle_ms(), 1_000);
    }

    #[test]
    fn eviction_share_is_the_share_of_writes_that_recompute_an_evicted_claim() {
        let e = Endpoint::new(1, "127.0.0.1:1".parse().unwrap(), 0);
        let r = &e.residency;
        assert_eq!(r.eviction_share(), 0.0, "nothing seen");
        // new content: 1,000 tokens written, nothing claimed
        r.note_writes(1_000, 1_000, 0.0, 0, 0.0);
        assert_eq!(r.eviction_share(), 0.0);
        // a claim of 80 % made 500 ms ago and not cached: maybe still computing, not lost
        r.note_writes(1_000, 1_000, 0.8, 500, 0.0);
        assert_eq!(r.eviction_share(), 0.0);
        // from now on every answer recomputes 800 tokens of a 2 s old claim, of 1,000 written
        for _ in 0..2_000 {
            r.note_writes(1_000, 1_000, 0.8, 2_000, 0.0);
        }
        assert!(
            (r.eviction_share() - 0.8).abs() < 1e-6,
            "{}",
            r.eviction_share()
        );
        // then the engine keeps what is claimed (and more): the share falls toward 0
        for _ in 0..2_000 {
            r.note_writes(200, 1_000, 0.8, 2_000, 0.9);
        }
        assert!(r.eviction_share() < 1e-6, "{}", r.eviction_share());
    }

    #[test]
    fn residency_horizon_is_capacity_over_the_write_rate() {
        let e = Endpoint::new(1, "127.0.0.1:1".parse().unwrap(), 0);
        // nothing known: no limit
        assert_eq!(e.cache_horizon_ms(1_000, 0), u64::MAX);
        assert_eq!(e.cache_horizon_ms(1_000, 60_000), u64::MAX, "no rate yet");
        // 10 tokens per ms over the first window: 60,000 tokens of capacity last 6 s
        e.cache_written(20_000);
        assert_eq!(e.cache_horizon_ms(3_000, 60_000), 6_000);
        // the engine's own capacity wins over the configured one; unknown capacity: no limit
        e.residency.set_capacity(120_000);
        assert_eq!(e.cache_horizon_ms(3_000, 60_000), 12_000);
        e.residency.set_capacity(0);
        assert_eq!(e.cache_horizon_ms(3_000, 0), u64::MAX);
        // within a window nothing moves; the next window's rate is averaged in
        e.cache_written(1_000_000);
        assert_eq!(e.cache_horizon_ms(4_000, 60_000), 6_000);
        let h = e.cache_horizon_ms(5_000, 60_000); // 500 tokens/ms over 2 s, weighted 0.3
        let rate = 10.0 + 0.3 * (500.0 - 10.0);
        assert_eq!(h, (60_000.0 / rate) as u64);
        // idle: the rate falls, the horizon grows
        let idle = e.cache_horizon_ms(65_000, 60_000);
        assert!(idle > h, "{idle} vs {h}");
    }

    #[test]
    fn the_engines_write_counter_sets_the_rate_while_the_metrics_reader_has_it() {
        let e = Endpoint::new(1, "127.0.0.1:1".parse().unwrap(), 0);
        let r = &e.residency;
        // this router's answers: 5 tokens per ms; 60,000 tokens of capacity last 12 s
        e.cache_horizon_ms(1_000, 60_000);
        e.cache_written(10_000);
        assert_eq!(e.cache_horizon_ms(3_000, 60_000), 12_000);
        assert!(!r.rate_from_engine());
        // the engine's counter grows 20 tokens per ms (other gateways write there too): its
        // rate replaces the answers' once a first window closed
        r.engine_written(Some(1_000_000), 3_000);
        assert_eq!(
            e.cache_horizon_ms(4_000, 60_000),
            12_000,
            "no engine window yet"
        );
        r.engine_written(Some(1_040_000), 5_000);
        assert!(r.rate_from_engine());
        assert_eq!(e.cache_horizon_ms(5_500, 60_000), 3_000);
        // the counter went back (the engine restarted): a new window, the last rate kept
        r.engine_written(Some(50), 7_000);
        assert_eq!(e.cache_horizon_ms(7_500, 60_000), 3_000);
        // the page lost its counters (or could not be read): back to the answers' rate
        // (whose average fell meanwhile: two windows without answers, at 5.5 s and 7.5 s)
        r.engine_written(None, 8_000);
        assert!(!r.rate_from_engine());
        let answers = r.horizon_secs(60_000).unwrap();
        assert!(
            (answers - 60.0 / (5.0 * 0.7 * 0.7)).abs() < 1e-9,
            "{answers}"
        );
        // and a new first window before the engine counts again
        r.engine_written(Some(2_000_000), 9_000);
        assert_eq!(r.horizon_secs(60_000), Some(answers));
        r.engine_written(Some(2_020_000), 11_000);
        assert_eq!(r.horizon_secs(60_000), Some(6.0));
    }

    #[test]
    fn index_is_bounded_and_evicts_least_recently_used() {
        let idx = PrefixIndex::new(64);
        let n: u64 = if cfg!(miri) { 1_000 } else { 10_000 };
        for h in 0..n {
            idx.record(&[h.wrapping_mul(0x9E37_79B9_7F4A_7C15)], 1, h);
        }
        assert!(idx.len() <= 64, "len {}", idx.len());
        assert!(idx.evictions() >= n - 64);
        // The most recent entries are still there.
        let last = (n - 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        assert_eq!(idx.matched_chunks(&[last], &set_of(&[1])), vec![1]);
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
    fn a_session_is_bound_to_its_last_endpoint_in_the_set() {
        let idx = PrefixIndex::new(1000);
        let set = set_of(&[1, 2, 3]);
        assert_eq!(idx.bound(77, &set), None, "never bound");
        idx.bind(77, 2, 1000);
        assert_eq!(idx.bound(77, &set), Some(1));
        // moved, and moved back within the same millisecond: the last bind wins
        idx.bind(77, 3, 1050);
        assert_eq!(idx.bound(77, &set), Some(2));
        idx.bind(77, 2, 1050);
        assert_eq!(idx.bound(77, &set), Some(1));
        idx.bind(77, 3, 1050);
        assert_eq!(idx.bound(77, &set), Some(2));
        // its endpoint left the set: where it was before
        assert_eq!(idx.bound(77, &set_of(&[1, 2])), Some(1));
        assert_eq!(idx.bound(77, &set_of(&[1])), None);
        // other keys are apart; recording prefixes does not change a binding
        assert_eq!(idx.bound(78, &set), None);
        idx.record(&[77], 1, 1100);
        idx.bind(77, 3, 1200);
        assert_eq!(idx.bound(77, &set), Some(2));
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
        c.snapshot().endpoints[0].acquire(100, 60, true);
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
