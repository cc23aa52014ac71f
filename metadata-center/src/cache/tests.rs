//! Tests of the radix tree (the origin's vectors, TTL and GC, the caps, a randomized consistency
//! check and a property test against a brute-force model) and of the pool (cluster cap, GC,
//! the estimate reported to the memory budget).

use super::*;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

fn loc(id: u32) -> Endpoint {
    Endpoint {
        ip: IpAddr::V4(Ipv4Addr::from(id)),
        port: None,
    }
}

fn ids(v: Vec<(Endpoint, usize)>) -> BTreeMap<u32, usize> {
    v.into_iter()
        .map(|(e, d)| match e.ip {
            IpAddr::V4(a) => (u32::from(a), d),
            IpAddr::V6(_) => unreachable!(),
        })
        .collect()
}

const T0: Duration = Duration::from_secs(10);

fn origin_tree(cfg: &CacheConfig) -> Tree {
    let mut t = Tree::new();
    let inserts: &[(&[u64], u32)] = &[
        (&[1, 2, 3, 4, 5, 6], 1),
        (&[1, 2, 3, 4], 1),
        (&[1, 2, 3, 4], 2),
        (&[1, 2, 3], 3),
        (&[1, 2, 3, 5, 6], 4),
        (&[1, 2, 3, 5, 6], 3),
        (&[1, 2, 3, 7, 8], 5),
        (&[2, 3, 4, 5], 6),
        (&[2, 3, 4, 6], 7),
    ];
    for (k, l) in inserts {
        t.insert(k, loc(*l), T0, cfg);
        t.check();
    }
    t
}

#[test]
fn origin_behaviour_vectors() {
    let cfg = CacheConfig {
        top_k: 100,
        ..Default::default()
    };
    let t = origin_tree(&cfg);
    let q = |k: &[u64]| ids(t.match_all(k, 100, T0, &cfg));
    assert_eq!(
        q(&[1, 2, 3, 4, 5, 6]),
        BTreeMap::from([(1, 6), (2, 4), (3, 3), (4, 3), (5, 3)])
    );
    assert_eq!(
        q(&[1, 2, 3, 5]),
        BTreeMap::from([(1, 3), (2, 3), (3, 4), (4, 4), (5, 3)])
    );
    assert_eq!(
        q(&[1, 2, 3, 9]),
        BTreeMap::from([(1, 3), (2, 3), (3, 3), (4, 3), (5, 3)])
    );
    assert_eq!(q(&[2, 3, 4, 5]), BTreeMap::from([(6, 4), (7, 3)]));
    assert_eq!(q(&[9]), BTreeMap::new());
    assert_eq!(q(&[]), BTreeMap::new());
    // Structure: [1,2,3] -> {[4] -> [5,6], [5,6], [7,8]} and [2,3,4] -> {[5], [6]}.
    assert_eq!(t.node_count(), 8);
}

#[test]
fn origin_top_k_vector() {
    let cfg = CacheConfig::default();
    let mut t = Tree::new();
    t.insert(&[1], loc(100), T0, &cfg);
    for l in [101, 102] {
        t.insert(&[1, 2, 3], loc(l), T0, &cfg);
    }
    for l in [103, 104] {
        t.insert(&[1, 2, 3, 4], loc(l), T0, &cfg);
    }
    t.check();
    let got = ids(t.match_all(&[1, 2, 3, 4], 3, T0, &cfg));
    assert_eq!(got.len(), 3);
    assert_eq!(got.get(&103), Some(&4));
    assert_eq!(got.get(&104), Some(&4));
    assert!(
        got.get(&101) == Some(&3) || got.get(&102) == Some(&3),
        "{got:?}"
    );
    assert!(!got.contains_key(&100));
}

#[test]
fn stops_at_partial_match_inside_a_node() {
    // The origin keeps walking children after a partial match; with non-cumulative keys
    // that yields wrong depths. [1,2,3] then child [4]; query [1,9,4] must stop at depth 1.
    let cfg = CacheConfig::default();
    let mut t = Tree::new();
    t.insert(&[1, 2, 3, 4], loc(1), T0, &cfg);
    t.insert(&[1, 2, 3], loc(2), T0, &cfg);
    assert_eq!(
        ids(t.match_all(&[1, 9, 4], 5, T0, &cfg)),
        BTreeMap::from([(1, 1), (2, 1)])
    );
}

#[test]
fn ttl_hides_then_gc_removes_expired_nodes_and_tags() {
    let cfg = CacheConfig {
        expire: Duration::from_secs(100),
        ..Default::default()
    };
    let mut t = Tree::new();
    t.insert(&[1, 2, 3], loc(1), Duration::from_secs(0), &cfg);
    t.insert(&[1, 2, 3, 4], loc(2), Duration::from_secs(50), &cfg);
    let at = |s| Duration::from_secs(s);
    assert_eq!(
        ids(t.match_all(&[1, 2, 3, 4], 5, at(99), &cfg)),
        BTreeMap::from([(1, 3), (2, 4)])
    );
    // a query's own limit per location (`max_age_ms`): loc 1's tag, 99 s old, is past
    // 60 s; loc 2's, 49 s old, within 50 s; a limit beyond the expiry is the expiry
    let ages =
        |limits: &[(u32, u64)]| MaxAges::new(limits.iter().map(|&(l, s)| (loc(l), s * 1000)));
    assert_eq!(
        ids(t.match_within(&[1, 2, 3, 4], 5, at(99), &cfg, &ages(&[(1, 60), (2, 50)]))),
        BTreeMap::from([(2, 4)])
    );
    assert_eq!(
        ids(t.match_within(&[1, 2, 3, 4], 5, at(99), &cfg, &ages(&[(2, 40)]))),
        BTreeMap::from([(1, 3)])
    );
    assert_eq!(
        ids(t.match_within(&[1, 2, 3, 4], 5, at(99), &cfg, &ages(&[(1, 500)]))),
        BTreeMap::from([(1, 3), (2, 4)])
    );
    // loc 1's tag on [1,2,3] expired at 100 although the node was refreshed at 50.
    assert_eq!(
        ids(t.match_all(&[1, 2, 3, 4], 5, at(120), &cfg)),
        BTreeMap::from([(2, 4)])
    );
    // Query is read-only: nothing was removed.
    assert_eq!(t.node_count(), 2);
    assert_eq!(t.expire(at(120), &cfg, 100), (0, false));
    assert_eq!(
        ids(t.match_all(&[1, 2, 3, 4], 5, at(150), &cfg)),
        BTreeMap::new()
    );
    assert_eq!(t.expire(at(150), &cfg, 100), (2, false));
    assert!(t.is_empty());
    assert_eq!(t.cost(), 0);
    t.check();
}

#[test]
fn gc_is_incremental() {
    let cfg = CacheConfig {
        expire: Duration::from_secs(10),
        ..Default::default()
    };
    let mut t = Tree::new();
    for i in 0..50u64 {
        t.insert(&[i, i + 1000], loc(1), Duration::from_secs(0), &cfg);
    }
    let (n, more) = t.expire(Duration::from_secs(10), &cfg, 20);
    assert_eq!((n, more), (20, true));
    let (n, more) = t.expire(Duration::from_secs(10), &cfg, 1000);
    assert_eq!((n, more), (30, false));
    t.check();
}

#[test]
fn budget_evicts_least_recently_used_paths() {
    // Each 4-hash path costs 1 node + 4 hashes + 1 tag = 6 entries.
    let cfg = CacheConfig {
        max_entries_per_cluster: 60,
        ..Default::default()
    };
    let mut t = Tree::new();
    let mut evicted = 0;
    for i in 0..20u64 {
        evicted += t.insert(
            &[i, 100 + i, 200 + i, 300 + i],
            loc(1),
            Duration::from_secs(i),
            &cfg,
        );
        t.check();
        assert!(t.cost() <= 60);
    }
    assert_eq!(evicted, 10);
    // Paths 0..9 are gone, 10..19 remain.
    assert!(t
        .match_all(&[9, 109], 5, Duration::from_secs(20), &cfg)
        .is_empty());
    assert_eq!(
        ids(t.match_all(&[10, 110], 5, Duration::from_secs(20), &cfg)),
        BTreeMap::from([(1, 2)])
    );
    // Re-using an old path refreshes it, so the next eviction takes the now-oldest one.
    t.insert(&[10, 110, 210, 310], loc(2), Duration::from_secs(30), &cfg);
    t.insert(&[50, 150, 250, 350], loc(1), Duration::from_secs(31), &cfg);
    t.check();
    assert!(!t
        .match_all(&[10], 5, Duration::from_secs(32), &cfg)
        .is_empty());
    assert!(t
        .match_all(&[11], 5, Duration::from_secs(32), &cfg)
        .is_empty());
}

#[test]
fn location_tags_per_node_are_capped() {
    let cfg = CacheConfig {
        max_locations_per_node: 3,
        ..Default::default()
    };
    let mut t = Tree::new();
    for l in 1..=5u32 {
        t.insert(&[7, 8], loc(l), Duration::from_secs(u64::from(l)), &cfg);
    }
    t.check();
    assert_eq!(
        ids(t.match_all(&[7, 8], 10, Duration::from_secs(6), &cfg)),
        BTreeMap::from([(3, 2), (4, 2), (5, 2)])
    );
}

#[test]
fn random_operations_keep_the_structure_consistent() {
    let cfg = CacheConfig {
        max_entries_per_cluster: 400,
        expire: Duration::from_secs(50),
        max_locations_per_node: 4,
        ..Default::default()
    };
    let mut t = Tree::new();
    let mut seed = 0x9e3779b97f4a7c15u64;
    let mut rnd = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for step in 0..3000u64 {
        let len = (rnd() % 12) as usize;
        let base = rnd() % 4;
        // Cumulative-looking paths sharing prefixes.
        let keys: Vec<u64> = (0..len)
            .map(|i| base * 100 + (i as u64) * ((rnd() % 3 == 0) as u64 + 1))
            .collect();
        let now = Duration::from_secs(step / 10);
        match rnd() % 5 {
            0 => {
                t.expire(now, &cfg, 7);
            }
            1 => {
                let got = t.match_all(&keys, 3, now, &cfg);
                assert!(got.len() <= 3);
                assert!(got.iter().all(|(_, d)| *d <= keys.len() && *d > 0));
            }
            _ => {
                t.insert(&keys, loc((rnd() % 6) as u32), now, &cfg);
                if !keys.is_empty() {
                    // A path just saved is found in full by its location.
                    let got = t.match_all(&keys, 100, now, &cfg);
                    assert_eq!(got[0].1, keys.len(), "{keys:?} {got:?}");
                }
            }
        }
        assert!(t.cost() <= 400);
    }
    t.check();
}

#[test]
fn pool_creates_queries_and_drops_empty_trees() {
    let cfg = CacheConfig {
        expire: Duration::from_secs(10),
        max_clusters: 2,
        ..Default::default()
    };
    let p = CachePool::new(cfg);
    assert!(p.query("m", &[1], 0, Duration::ZERO).is_empty());
    p.save("m", &[1, 2], loc(1), Duration::from_secs(1));
    p.save("n", &[1, 2], loc(2), Duration::from_secs(2));
    assert_eq!(
        ids(p.query("m", &[1, 2, 3], 0, Duration::from_secs(3))),
        BTreeMap::from([(1, 2)])
    );
    p.save("o", &[5], loc(3), Duration::from_secs(4)); // evicts "m", least recently used
    assert_eq!(p.cluster_count(), 2);
    assert!(p.query("m", &[1, 2], 0, Duration::from_secs(4)).is_empty());
    assert_eq!(p.gc(Duration::from_secs(13), 10), 1, "n's node expired");
    assert_eq!(
        p.cluster_count(),
        1,
        "n dropped: empty and unused for a TTL"
    );
    assert_eq!(p.level_stats("o").unwrap()[&1].nodes_count, 1);
}

#[test]
fn the_estimate_follows_every_change_and_leaves_with_the_trees() {
    let budget = Arc::new(MemoryBudget::unlimited());
    let cfg = CacheConfig {
        expire: Duration::from_secs(10),
        max_clusters: 3,
        max_entries_per_cluster: 50,
        ..Default::default()
    };
    let p = CachePool::with_budget(cfg, budget.clone());
    let recount = |p: &CachePool| -> u64 {
        p.trees
            .read()
            .iter()
            .map(|(k, h)| (TREE_BYTES + k.len() + h.tree.read().bytes()) as u64)
            .sum()
    };
    for i in 0..200u64 {
        let path: Vec<u64> = (0..(i % 7)).map(|k| (i % 5) * 10 + k).collect();
        p.save(
            &format!("c{}", i % 4),
            &path,
            loc((i % 3) as u32),
            Duration::from_secs(i / 10),
        );
        assert_eq!(budget.cache_bytes(), recount(&p));
    }
    p.gc(Duration::from_secs(25), 3);
    assert_eq!(budget.cache_bytes(), recount(&p));
    p.gc(Duration::from_secs(100), 3);
    assert_eq!(budget.cache_bytes(), recount(&p));
    drop(p);
    assert_eq!(budget.cache_bytes(), 0);
}

mod model {
    //! Property: with no capacity pressure, a location's answer is the longest common
    //! prefix of the query with any of its paths saved within the TTL. The tree must agree
    //! with that brute-force model for any keys (cumulative or not).
    use super::*;
    use proptest::prelude::*;

    fn lcp_len(a: &[u64], b: &[u64]) -> usize {
        a.iter().zip(b).take_while(|(x, y)| x == y).count()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn tree_matches_brute_force(
            saves in prop::collection::vec(
                (prop::collection::vec(0u64..4, 0..7), 0u32..5, 0u64..3),
                1..40,
            ),
            queries in prop::collection::vec(prop::collection::vec(0u64..4, 0..8), 1..10),
            extra in 0u64..12,
        ) {
            let cfg = CacheConfig { expire: Duration::from_secs(10), ..Default::default() };
            let mut t = Tree::new();
            let mut now = 0u64;
            let mut saved: Vec<(Vec<u64>, u32, u64)> = Vec::new();
            for (path, l, dt) in &saves {
                now += dt;
                t.insert(path, loc(*l), Duration::from_secs(now), &cfg);
                saved.push((path.clone(), *l, now));
            }
            t.check();
            let at = now + extra;
            for q in &queries {
                let got = ids(t.match_all(q, usize::MAX, Duration::from_secs(at), &cfg));
                let mut want: BTreeMap<u32, usize> = BTreeMap::new();
                for (p, l, when) in &saved {
                    let d = lcp_len(q, p);
                    if d > 0 && when + 10 > at {
                        let e = want.entry(*l).or_insert(0);
                        *e = (*e).max(d);
                    }
                }
                prop_assert_eq!(&got, &want, "query {:?} at {}", q, at);
            }
            // GC removes exactly what queries already ignored.
            t.expire(Duration::from_secs(at), &cfg, usize::MAX);
            t.check();
            for q in &queries {
                let after = ids(t.match_all(q, usize::MAX, Duration::from_secs(at), &cfg));
                let mut want: BTreeMap<u32, usize> = BTreeMap::new();
                for (p, l, when) in &saved {
                    let d = lcp_len(q, p);
                    if d > 0 && when + 10 > at {
                        let e = want.entry(*l).or_insert(0);
                        *e = (*e).max(d);
                    }
                }
                prop_assert_eq!(after, want);
            }
        }
    }
}
