//! Endpoint selection: pure functions over a snapshot of candidate loads.
//!
//! `inference_lb` is the origin's scoring, kept exactly (see `docs/design.md`):
//!
//! ```text
//! delta          = max(2, Qmax − Qmin)
//! NormReqLoad    = (Q − Qmin) / delta
//! NormPrefill    = L / max(1024, Lmax)
//! W2eff          = W2 · ⌈delta / 5⌉          (the origin's code; its docs say W2·delta/5)
//! score          = W1·CacheRatio − W2eff·NormReqLoad − W3·NormPrefill
//! ```
//!
//! then one of the best `candidate_percent` % (at least one) is taken uniformly at random.
//! Ties are broken at random, never by list order (the origin herded new prefixes onto its
//! first host). Selection is O(n): a partial select, not a sort.

use crate::config::{Algorithm, LbParams};

/// What the balancer knows about one candidate endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CandidateLoad {
    /// Requests queued or running on the endpoint (Q).
    pub in_flight: u64,
    /// Prompt characters still in prefill on the endpoint (L).
    pub prefill_chars: u64,
    /// Share of the prompt's chunks the endpoint is known to hold, 0–1.
    pub cache_ratio: f64,
    /// Prompt characters in prefill on the endpoint that it must compute (not cached).
    pub uncached_prefill_chars: u64,
    /// Share of what the endpoint's answers write into its KV cache that recomputes a prefix
    /// its engine had evicted, 0–1 (0 when not measured or `eviction_pressure` is off).
    pub eviction_share: f64,
}

/// The eviction share at which a miss's price stops growing (×4).
pub const EVICTION_SHARE_CAP: f64 = 0.75;

/// Floor of the prefill normaliser (the origin's 1024).
pub const PREFILL_FLOOR: u64 = 1024;

/// Scores every candidate with the `inference_lb` formula (higher is better).
pub fn scores(c: &[CandidateLoad], p: &LbParams) -> Vec<f64> {
    if c.is_empty() {
        return Vec::new();
    }
    let q_min = c.iter().map(|x| x.in_flight).min().unwrap_or(0);
    let q_max = c.iter().map(|x| x.in_flight).max().unwrap_or(0);
    let l_max = c
        .iter()
        .map(|x| x.prefill_chars)
        .max()
        .unwrap_or(0)
        .max(PREFILL_FLOOR);
    let delta = (q_max - q_min).max(2);
    let w_request = p.request_load_weight * delta.div_ceil(5) as f64;
    c.iter()
        .map(|x| {
            let cache = if p.cache_aware { x.cache_ratio } else { 0.0 };
            let (req_load, prefill_load) = if p.load_aware {
                (
                    (x.in_flight - q_min) as f64 / delta as f64,
                    x.prefill_chars as f64 / l_max as f64,
                )
            } else {
                (0.0, 0.0)
            };
            p.cache_ratio_weight * cache
                - w_request * req_load
                - p.prefill_load_weight * prefill_load
        })
        .collect()
}

/// Number of candidates kept: ⌊n·percent/100⌋, at least one, at most n.
pub fn candidate_count(n: usize, percent: f64) -> usize {
    (((n as f64) * percent / 100.0).floor() as usize).clamp(1, n.max(1))
}

/// `prefix_cost` scores: minus the prefill work, in prompt characters, that stands between
/// this request and its first token on each candidate, plus (with `miss_slowdown_weight`) what
/// its own prefill costs the requests already running there:
///
/// ```text
/// cost = uncached prefill queued on the endpoint          (load_aware)
///      + decode_cost_chars · requests in flight there     (load_aware)
///      + this prompt's characters not in its cache        (cache_aware: · (1 − CacheRatio))
///        · (1 + miss_slowdown_weight · requests in flight there)
///        / (1 − eviction share there)
/// ```
///
/// The last factor prices what the miss evicts: each token it writes into a full cache pushes
/// out one that is requested again with probability `p` (the endpoint's eviction share), whose
/// recomputation evicts again: `1 + p + p² + … = 1 / (1 − p)` (p capped at
/// [`EVICTION_SHARE_CAP`]).
///
/// Unlike `inference_lb`, a cached prefix lowers the request's own cost by exactly the work it
/// saves, and queued work counts only what the endpoint must really compute.
pub fn prefix_cost_scores(c: &[CandidateLoad], prompt_chars: u64, p: &LbParams) -> Vec<f64> {
    c.iter()
        .map(|x| {
            let cached = if p.cache_aware { x.cache_ratio } else { 0.0 };
            let evicted = x.eviction_share.clamp(0.0, EVICTION_SHARE_CAP);
            let mut own = prompt_chars as f64 * (1.0 - cached) / (1.0 - evicted);
            let queued = if p.load_aware {
                own *= 1.0 + p.miss_slowdown_weight * x.in_flight as f64;
                x.uncached_prefill_chars as f64 + p.decode_cost_chars * x.in_flight as f64
            } else {
                0.0
            };
            -(own + queued)
        })
        .collect()
}

/// Picks an index with `prefix_cost`: the lowest cost, or one at random among the best
/// `candidate_percent` % *whose cost is within `decode_cost_chars` (one more request in flight)
/// of the lowest*. Costs are in the same unit for every candidate, so the second best of a
/// large fleet may cost a whole prompt more (a holder of its prefix against an idle server
/// that holds nothing): drawing uniformly among the best k, as `inference_lb` does, would
/// throw that prefix away k − 1 times in k. `candidates` must not be empty.
pub fn prefix_cost(
    candidates: &[CandidateLoad],
    prompt_chars: u64,
    p: &LbParams,
    rng: &mut fastrand::Rng,
) -> usize {
    let mut s = prefix_cost_scores(candidates, prompt_chars, p);
    let k = candidate_count(s.len(), p.candidate_percent);
    if k <= 1 {
        return pick_among_best(&s, 1, rng);
    }
    let best = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let near = best - p.decode_cost_chars.max(0.0);
    let mut close = 0;
    for x in &mut s {
        if *x >= near {
            close += 1;
        } else {
            *x = f64::NEG_INFINITY;
        }
    }
    pick_among_best(&s, k.min(close), rng)
}

/// Picks an index with `inference_lb`. `candidates` must not be empty.
pub fn inference_lb(candidates: &[CandidateLoad], p: &LbParams, rng: &mut fastrand::Rng) -> usize {
    let s = scores(candidates, p);
    let k = candidate_count(s.len(), p.candidate_percent);
    pick_among_best(&s, k, rng)
}

/// Uniformly random among the `k` highest scores; ties broken at random.
pub fn pick_among_best(scores: &[f64], k: usize, rng: &mut fastrand::Rng) -> usize {
    assert!(!scores.is_empty(), "no candidates");
    if k <= 1 {
        // Argmax with reservoir sampling over ties.
        let mut best = 0;
        let mut ties = 1;
        for i in 1..scores.len() {
            if scores[i] > scores[best] {
                best = i;
                ties = 1;
            } else if scores[i] == scores[best] {
                ties += 1;
                if rng.usize(..ties) == 0 {
                    best = i;
                }
            }
        }
        return best;
    }
    let mut keyed: Vec<(f64, u32, usize)> = scores
        .iter()
        .enumerate()
        .map(|(i, &s)| (s, rng.u32(..), i))
        .collect();
    let k = k.min(keyed.len());
    keyed.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    keyed[rng.usize(..k)].2
}

/// Uniformly random index below `n` (n > 0).
pub fn random(n: usize, rng: &mut fastrand::Rng) -> usize {
    rng.usize(..n)
}

/// Next round-robin index below `n` (n > 0) from a shared cursor.
pub fn round_robin(cursor: &std::sync::atomic::AtomicUsize, n: usize) -> usize {
    cursor.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % n
}

/// Fewest in-flight requests; ties broken at random.
pub fn least_request(candidates: &[CandidateLoad], rng: &mut fastrand::Rng) -> usize {
    let s: Vec<f64> = candidates.iter().map(|c| -(c.in_flight as f64)).collect();
    pick_among_best(&s, 1, rng)
}

/// What one selection sees: the candidates' loads (empty when the algorithm reads none), the
/// prompt, the model's parameters and the cluster's round-robin cursor.
pub struct Selection<'a> {
    /// One entry per candidate, when [`Algorithm::uses_loads`].
    pub loads: &'a [CandidateLoad],
    /// Number of candidates.
    pub candidates: usize,
    /// Prompt length in characters.
    pub prompt_chars: u64,
    /// The model's balancing parameters.
    pub params: &'a LbParams,
    /// The cluster's round-robin cursor.
    pub rr_cursor: &'a std::sync::atomic::AtomicUsize,
}

/// The one interface the router uses to run an algorithm.
impl Algorithm {
    /// True when the algorithm weighs cache affinity, so that the router reads and feeds
    /// the prefix index (and asks the Metadata-Center) for it.
    pub fn uses_prefix_index(self, params: &LbParams) -> bool {
        matches!(self, Algorithm::InferenceLb | Algorithm::PrefixCost) && params.cache_aware
    }

    /// True when the algorithm reads the candidates' loads.
    pub fn uses_loads(self) -> bool {
        matches!(
            self,
            Algorithm::InferenceLb | Algorithm::PrefixCost | Algorithm::LeastRequest
        )
    }

    /// Each candidate's score as this algorithm ranks them (higher is better; `prefix_cost`'s
    /// is minus its cost in prompt characters), or `None` for an algorithm that scores nothing.
    /// For the request log's view of a pick, not the pick itself.
    pub fn scores(self, s: &Selection) -> Option<Vec<f64>> {
        match self {
            Algorithm::InferenceLb => Some(scores(s.loads, s.params)),
            Algorithm::PrefixCost => Some(prefix_cost_scores(s.loads, s.prompt_chars, s.params)),
            Algorithm::Random | Algorithm::RoundRobin | Algorithm::LeastRequest => None,
        }
    }

    /// Picks one candidate: an index below `s.candidates`.
    pub fn select(self, s: &Selection, rng: &mut fastrand::Rng) -> usize {
        match self {
            Algorithm::InferenceLb => inference_lb(s.loads, s.params, rng),
            Algorithm::PrefixCost => prefix_cost(s.loads, s.prompt_chars, s.params, rng),
            Algorithm::Random => random(s.candidates, rng),
            Algorithm::RoundRobin => round_robin(s.rr_cursor, s.candidates),
            Algorithm::LeastRequest => least_request(s.loads, rng),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn load(q: u64, l: u64, c: f64) -> CandidateLoad {
        CandidateLoad {
            in_flight: q,
            prefill_chars: l,
            cache_ratio: c,
            uncached_prefill_chars: l,
            eviction_share: 0.0,
        }
    }

    #[test]
    fn origin_worked_example_picks_b() {
        // The origin design doc: A(q=8,L=4096,c=0) B(q=2,L=1024,c=.667) C(q=5,L=2048,c=.333).
        let c = [
            load(8, 4096, 0.0),
            load(2, 1024, 0.667),
            load(5, 2048, 0.333),
        ];
        let p = LbParams::default();
        let s = scores(&c, &p);
        // delta = 6, W2eff = 1·⌈6/5⌉ = 2, Lmax = 4096.
        assert!((s[0] - (-5.0)).abs() < 1e-9, "{s:?}");
        assert!((s[1] - (2.0 * 0.667 - 0.75)).abs() < 1e-9, "{s:?}");
        assert!((s[2] - (2.0 * 0.333 - 1.0 - 1.5)).abs() < 1e-9, "{s:?}");
        let mut rng = fastrand::Rng::with_seed(1);
        for _ in 0..100 {
            assert_eq!(inference_lb(&c, &p, &mut rng), 1);
        }
    }

    #[test]
    fn dynamic_request_weight_grows_with_spread() {
        let p = LbParams {
            cache_aware: false,
            prefill_load_weight: 0.0,
            ..LbParams::default()
        };
        // delta = 11 → W2eff = 3; the most loaded scores −3.
        let s = scores(&[load(0, 0, 0.0), load(11, 0, 0.0)], &p);
        assert_eq!(s, vec![0.0, -3.0]);
        // delta below 2 is floored at 2.
        let s = scores(&[load(0, 0, 0.0), load(1, 0, 0.0)], &p);
        assert_eq!(s, vec![0.0, -0.5]);
    }

    #[test]
    fn prefill_floor_is_1024() {
        let p = LbParams {
            cache_aware: false,
            request_load_weight: 0.0,
            ..LbParams::default()
        };
        let s = scores(&[load(0, 512, 0.0), load(0, 0, 0.0)], &p);
        assert_eq!(s, vec![-1.5, 0.0]);
    }

    #[test]
    fn disabled_terms_drop_out() {
        let c = [load(9, 9000, 0.0), load(0, 0, 1.0)];
        let none = LbParams {
            load_aware: false,
            cache_aware: false,
            ..LbParams::default()
        };
        assert_eq!(scores(&c, &none), vec![0.0, 0.0]);
        let cache_only = LbParams {
            load_aware: false,
            ..LbParams::default()
        };
        assert_eq!(scores(&c, &cache_only), vec![0.0, 2.0]);
    }

    #[test]
    fn candidate_count_is_at_least_one() {
        assert_eq!(candidate_count(3, 10.0), 1);
        assert_eq!(candidate_count(20, 10.0), 2);
        assert_eq!(candidate_count(1000, 10.0), 100);
        assert_eq!(candidate_count(5, 0.0), 1);
        assert_eq!(candidate_count(5, 100.0), 5);
    }

    #[test]
    fn ties_are_broken_at_random_not_by_order() {
        let c = vec![CandidateLoad::default(); 4];
        let p = LbParams::default();
        let mut rng = fastrand::Rng::with_seed(7);
        let mut hits = [0u32; 4];
        for _ in 0..4000 {
            hits[inference_lb(&c, &p, &mut rng)] += 1;
        }
        for h in hits {
            assert!((800..1200).contains(&h), "{hits:?}");
        }
    }

    #[test]
    fn top_k_draws_only_from_the_best() {
        // 20 candidates, 10 % → 2; the two best are 3 and 17.
        let mut c = vec![load(10, 0, 0.0); 20];
        c[3] = load(0, 0, 0.0);
        c[17] = load(0, 0, 0.0);
        let p = LbParams::default();
        let mut rng = fastrand::Rng::with_seed(3);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            seen.insert(inference_lb(&c, &p, &mut rng));
        }
        assert_eq!(seen, [3, 17].into_iter().collect());
    }

    #[test]
    fn prefix_cost_weighs_saved_work_against_queued_work() {
        let p = LbParams {
            decode_cost_chars: 100.0,
            miss_slowdown_weight: 0.0, // (its own test below)
            ..LbParams::default()
        };
        // 10,000-char prompt: A holds 90 % of it but has 3,000 uncached chars queued and 2
        // requests; B is idle and holds nothing.
        let a = load(2, 3000, 0.9);
        let b = load(0, 0, 0.0);
        let s = prefix_cost_scores(&[a, b], 10_000, &p);
        assert_eq!(s, vec![-(1000.0 + 3000.0 + 200.0), -10_000.0]);
        let mut rng = fastrand::Rng::with_seed(1);
        assert_eq!(prefix_cost(&[a, b], 10_000, &p, &mut rng), 0);
        // With 9,000 uncached chars queued on A, B is faster.
        assert_eq!(
            prefix_cost(&[load(2, 9000, 0.9), b], 10_000, &p, &mut rng),
            1
        );
        // Cache awareness off: only queued work counts.
        let no_cache = LbParams {
            cache_aware: false,
            ..p
        };
        assert_eq!(prefix_cost(&[a, b], 10_000, &no_cache, &mut rng), 1);
    }

    #[test]
    fn prefix_cost_draws_only_among_candidates_close_to_the_cheapest() {
        // 30 endpoints, candidate_percent 10: the best 3. One holds 90 % of a 10,000-char
        // prompt; the others are idle and hold nothing (cost 10,000 against 1,000): the holder
        // every time, where a draw among the best 3 would take it one time in 3.
        let p = LbParams {
            candidate_percent: 10.0,
            ..LbParams::default()
        };
        let mut fleet = vec![load(0, 0, 0.0); 30];
        fleet[7] = load(0, 0, 0.9);
        let mut rng = fastrand::Rng::with_seed(5);
        for _ in 0..300 {
            assert_eq!(prefix_cost(&fleet, 10_000, &p, &mut rng), 7);
        }
        // costs within decode_cost_chars (128) of the cheapest share the draw, the best 3 of
        // them: 5 endpoints at 1,000–1,100, the rest far behind
        let mut fleet = vec![load(0, 0, 0.0); 30];
        for (i, extra) in [(3, 0), (9, 50), (12, 100), (20, 110), (25, 120)] {
            fleet[i] = load(0, extra, 0.9);
        }
        let mut seen = std::collections::HashSet::new();
        for _ in 0..300 {
            seen.insert(prefix_cost(&fleet, 10_000, &p, &mut rng));
        }
        assert_eq!(seen, [3, 9, 12].into_iter().collect());
        // nothing within reach of the best but itself: the best
        let p_tight = LbParams {
            decode_cost_chars: 0.0,
            ..p
        };
        for _ in 0..100 {
            assert_eq!(prefix_cost(&fleet, 10_000, &p_tight, &mut rng), 3);
        }
    }

    #[test]
    fn miss_slowdown_charges_a_miss_per_request_it_slows() {
        // 10,000-char prompt. A: busy (8 in flight), holds 60 %; B: 1 in flight, holds nothing.
        let a = load(8, 0, 0.6);
        let b = load(1, 0, 0.0);
        let own_only = LbParams {
            decode_cost_chars: 0.0,
            miss_slowdown_weight: 0.0,
            ..LbParams::default()
        };
        // the request's own prefill: 4,000 on A, 10,000 on B
        assert_eq!(
            prefix_cost_scores(&[a, b], 10_000, &own_only),
            vec![-4000.0, -10_000.0]
        );
        // the fleet's: 4,000 · (1 + 0.5 · 8) on A, 10,000 · (1 + 0.5) on B: B is cheaper
        let fleet = LbParams {
            miss_slowdown_weight: 0.5,
            ..own_only
        };
        assert_eq!(
            prefix_cost_scores(&[a, b], 10_000, &fleet),
            vec![-20_000.0, -15_000.0]
        );
        // a full hit costs nothing more however busy its endpoint is
        let hit = load(8, 0, 1.0);
        assert_eq!(prefix_cost_scores(&[hit], 10_000, &fleet), vec![0.0]);
        // load awareness off: no load, so no slowdown either
        let blind = LbParams {
            load_aware: false,
            ..fleet
        };
        assert_eq!(prefix_cost_scores(&[a], 10_000, &blind), vec![-4000.0]);
    }

    #[test]
    fn a_miss_costs_more_where_the_cache_evicts_what_is_reused() {
        // 10,000-char prompt, no load. A: holds 60 % but half of what its cache writes evicts
        // a prefix requested again; B: holds 40 %, its cache keeps what is reused.
        let params = LbParams {
            decode_cost_chars: 0.0,
            miss_slowdown_weight: 0.0,
            ..LbParams::default()
        };
        let a = CandidateLoad {
            eviction_share: 0.5,
            ..load(0, 0, 0.6)
        };
        let b = load(0, 0, 0.4);
        // A: 4,000 uncached · 1 / (1 − 0.5); B: 6,000
        assert_eq!(
            prefix_cost_scores(&[a, b], 10_000, &params),
            vec![-8000.0, -6000.0]
        );
        assert_eq!(
            prefix_cost(&[a, b], 10_000, &params, &mut fastrand::Rng::with_seed(1)),
            1
        );
        // capped at ×4, and a full hit costs nothing whatever the pressure
        let full = CandidateLoad {
            eviction_share: 1.0,
            ..load(0, 0, 0.0)
        };
        let hit = CandidateLoad {
            eviction_share: 1.0,
            ..load(0, 0, 1.0)
        };
        assert_eq!(
            prefix_cost_scores(&[full, hit], 10_000, &params),
            vec![-40_000.0, 0.0]
        );
    }

    #[test]
    fn least_request_and_round_robin() {
        let mut rng = fastrand::Rng::with_seed(1);
        assert_eq!(
            least_request(
                &[load(3, 0, 0.0), load(1, 0, 0.0), load(2, 0, 0.0)],
                &mut rng
            ),
            1
        );
        let cur = std::sync::atomic::AtomicUsize::new(0);
        let got: Vec<_> = (0..5).map(|_| round_robin(&cur, 3)).collect();
        assert_eq!(got, vec![0, 1, 2, 0, 1]);
    }

    proptest! {
        // Scores are invariant to adding the same load to every candidate's queue.
        #[test]
        fn request_load_is_relative(qs in proptest::collection::vec(0u64..100, 1..20), shift in 0u64..1000) {
            let p = LbParams { prefill_load_weight: 0.0, cache_aware: false, ..LbParams::default() };
            let a: Vec<_> = qs.iter().map(|&q| load(q, 0, 0.0)).collect();
            let b: Vec<_> = qs.iter().map(|&q| load(q + shift, 0, 0.0)).collect();
            prop_assert_eq!(scores(&a, &p), scores(&b, &p));
        }

        // More cache, less load, less prefill never lowers a score (monotonicity).
        #[test]
        fn monotone_in_each_term(q in 0u64..50, l in 0u64..10000, c in 0.0f64..1.0,
                                 others in proptest::collection::vec((0u64..50, 0u64..10000, 0.0f64..1.0), 1..10)) {
            let p = LbParams::default();
            let mut set: Vec<_> = others.iter().map(|&(q, l, c)| load(q, l, c)).collect();
            set.push(load(q, l, c));
            let base = *scores(&set, &p).last().unwrap();
            let n = set.len() - 1;
            set[n] = load(q, l, (c + 0.1).min(1.0));
            prop_assert!(*scores(&set, &p).last().unwrap() >= base);
        }

        // The pick is always one of the k best scores.
        #[test]
        fn pick_is_among_top_k(s in proptest::collection::vec(-10.0f64..10.0, 1..50), pct in 0.0f64..100.0, seed in any::<u64>()) {
            let mut rng = fastrand::Rng::with_seed(seed);
            let k = candidate_count(s.len(), pct);
            let i = pick_among_best(&s, k, &mut rng);
            let better = s.iter().filter(|&&x| x > s[i]).count();
            prop_assert!(better < k);
        }
    }
}
