//! Tests of the load store: the origin's semantics (duplicates, exactly-once prompt release, GC
//! order), the caps with their generation checks, the metrics snapshot, the byte estimate, and a
//! property test of the counters against a plain model.

use super::*;

fn at(secs: u64) -> Stamp {
    Stamp {
        mono: Duration::from_secs(secs),
        wall_ns: secs as i64 * 1_000_000_000,
    }
}

fn ep(s: &str) -> Endpoint {
    s.parse().unwrap()
}

fn add(s: &LoadStore, cluster: &str, id: &str, ip: &str, prompt: i32, t: u64) -> AddOutcome {
    s.add(
        &AddRequest {
            cluster,
            request_id: id,
            prompt_length: prompt,
            engine: ep(ip),
        },
        at(t),
    )
}

fn engine(s: &LoadStore, cluster: &str, ip: &str) -> Option<(i32, i32)> {
    s.query(cluster)?
        .into_iter()
        .find(|e| e.ip == ip)
        .map(|e| (e.queued_req_num, e.prompt_length))
}

#[test]
fn add_query_delete_round_trip() {
    let s = LoadStore::new(LoadConfig::default());
    assert_eq!(s.query("m"), None, "unknown cluster is null");
    assert_eq!(add(&s, "m", "r1", "10.0.0.1", 100, 1), AddOutcome::Added);
    assert_eq!(add(&s, "m", "r2", "10.0.0.1", 50, 1), AddOutcome::Added);
    assert_eq!(add(&s, "m", "r3", "10.0.0.2:8000", 7, 1), AddOutcome::Added);
    assert_eq!(engine(&s, "m", "10.0.0.1"), Some((2, 150)));
    assert_eq!(engine(&s, "m", "10.0.0.2:8000"), Some((1, 7)));
    let v = s.query("m").unwrap();
    assert_eq!(v[0].updated_time, 1_000_000_000);
    assert!(s.delete("r1", at(2)));
    assert_eq!(engine(&s, "m", "10.0.0.1"), Some((1, 50)));
    assert!(s.delete("r2", at(2)));
    assert_eq!(engine(&s, "m", "10.0.0.1"), Some((0, 0)));
    assert!(!s.delete("r2", at(2)), "second delete misses");
    assert_eq!(s.counters.misses.load(Ordering::Relaxed), 1);
}

#[test]
fn duplicate_add_is_ignored() {
    let s = LoadStore::new(LoadConfig::default());
    add(&s, "m", "r1", "10.0.0.1", 100, 1);
    assert_eq!(
        add(&s, "m", "r1", "10.0.0.1", 100, 1),
        AddOutcome::Duplicate
    );
    assert_eq!(add(&s, "m", "r1", "10.0.0.9", 5, 1), AddOutcome::Duplicate);
    assert_eq!(engine(&s, "m", "10.0.0.1"), Some((1, 100)));
    assert_eq!(engine(&s, "m", "10.0.0.9"), None);
}

#[test]
fn prompt_is_released_exactly_once() {
    let s = LoadStore::new(LoadConfig::default());
    add(&s, "m", "r1", "10.0.0.1", 100, 1);
    add(&s, "m", "r2", "10.0.0.1", 30, 1);
    assert!(s.delete_prompt("r1", at(2)));
    assert_eq!(
        engine(&s, "m", "10.0.0.1"),
        Some((2, 30)),
        "queue unchanged, prompt released"
    );
    assert!(s.delete_prompt("r1", at(2)), "found again, but a no-op");
    assert_eq!(engine(&s, "m", "10.0.0.1"), Some((2, 30)));
    assert!(s.delete("r1", at(3)));
    assert_eq!(
        engine(&s, "m", "10.0.0.1"),
        Some((1, 30)),
        "full delete does not release the prompt twice"
    );
    // Full delete before prompt delete: the later prompt delete misses.
    assert!(s.delete("r2", at(3)));
    assert_eq!(engine(&s, "m", "10.0.0.1"), Some((0, 0)));
    assert!(!s.delete_prompt("r2", at(3)));
}

#[test]
fn gc_expires_requests_then_engines_then_clusters() {
    let cfg = LoadConfig {
        req_expire: Duration::from_secs(660),
        ..Default::default()
    };
    let s = LoadStore::new(cfg);
    add(&s, "a", "old", "10.0.0.1", 10, 0);
    add(&s, "b", "b1", "10.0.0.3", 30, 0);
    add(&s, "a", "new", "10.0.0.2", 20, 600);
    // At 660 nothing is strictly older than the TTL yet; clusters/engines use <=.
    let r = s.gc(at(661), 1);
    assert_eq!(r.requests, 2, "old and b1 expired (created + 660 < 661)");
    // The releases at 661 refreshed engine 10.0.0.1 and cluster b, so they stay.
    assert_eq!(engine(&s, "a", "10.0.0.1"), Some((0, 0)));
    assert_eq!(engine(&s, "a", "10.0.0.2"), Some((1, 20)));
    let r = s.gc(at(661 + 660), 100);
    assert_eq!(r.requests, 1);
    assert_eq!(r.clusters, 1, "b not touched since 661");
    assert_eq!(s.query("b"), None);
    // a was touched at 1321 by releasing "new", its engine 10.0.0.1 was last updated at 661.
    assert_eq!(r.engines, 1);
    assert_eq!(engine(&s, "a", "10.0.0.1"), None);
    assert_eq!(engine(&s, "a", "10.0.0.2"), Some((0, 0)));
    assert_eq!(s.request_count(), 0);
}

#[test]
fn request_cap_evicts_oldest_and_releases_its_load() {
    let s = LoadStore::new(LoadConfig {
        max_requests: 3,
        ..Default::default()
    });
    for i in 0..5 {
        add(&s, "m", &format!("r{i}"), "10.0.0.1", 10, i);
    }
    assert_eq!(s.request_count(), 3);
    assert_eq!(engine(&s, "m", "10.0.0.1"), Some((3, 30)));
    assert_eq!(s.counters.evicted_requests.load(Ordering::Relaxed), 2);
    assert!(!s.delete("r0", at(9)));
    assert!(s.delete("r4", at(9)));
}

#[test]
fn cluster_and_engine_caps_evict_stalest() {
    let s = LoadStore::new(LoadConfig {
        max_clusters: 2,
        max_engines_per_cluster: 2,
        ..Default::default()
    });
    add(&s, "a", "1", "10.0.0.1", 1, 1);
    add(&s, "b", "2", "10.0.0.1", 1, 2);
    add(&s, "a", "3", "10.0.0.2", 1, 3); // a is now fresher than b
    add(&s, "c", "4", "10.0.0.1", 1, 4); // evicts b
    assert_eq!(s.query("b"), None);
    assert!(s.query("a").is_some() && s.query("c").is_some());
    add(&s, "a", "5", "10.0.0.3", 1, 5); // evicts engine 10.0.0.1 of a (stalest)
    assert_eq!(engine(&s, "a", "10.0.0.1"), None);
    // The request on the evicted engine no longer touches a re-created engine of that name.
    add(&s, "a", "6", "10.0.0.1", 5, 6); // evicts 10.0.0.2
    assert!(s.delete("1", at(7)));
    assert_eq!(engine(&s, "a", "10.0.0.1"), Some((1, 5)));
    assert_eq!(s.counters.evicted_clusters.load(Ordering::Relaxed), 1);
    assert_eq!(s.counters.evicted_engines.load(Ordering::Relaxed), 2);
}

#[test]
fn metrics_snapshot_takes_the_most_recent_clusters_up_to_the_cap() {
    let s = LoadStore::new(LoadConfig::default());
    add(&s, "a", "1", "10.0.0.1", 1, 1);
    add(&s, "a", "2", "10.0.0.2", 1, 2);
    add(&s, "b", "3", "10.0.0.1", 1, 3);
    add(&s, "c", "4", "10.0.0.1", 1, 4);
    s.delete("1", at(5)); // touches a
    let names = |v: Vec<(String, Vec<EngineView>)>| -> Vec<String> {
        v.into_iter().map(|(k, _)| k).collect()
    };
    let (all, omitted) = s.snapshot(100);
    assert_eq!(
        (names(all), omitted),
        (vec!["a".into(), "c".into(), "b".into()], 0)
    );
    let (some, omitted) = s.snapshot(3);
    assert_eq!((names(some), omitted), (vec!["a".into(), "c".into()], 1));
    // Whole clusters only: a (2 engines) does not fit in 1.
    let (none, omitted) = s.snapshot(1);
    assert_eq!((names(none), omitted), (vec![], 4));
}

#[test]
fn the_estimate_follows_every_change() {
    let budget = Arc::new(MemoryBudget::unlimited());
    let s = LoadStore::with_budget(
        LoadConfig {
            max_requests: 3,
            max_clusters: 2,
            max_engines_per_cluster: 2,
            req_expire: Duration::from_secs(10),
            ..Default::default()
        },
        budget.clone(),
    );
    let recount = |s: &LoadStore| {
        let g = s.inner.lock();
        let reqs: usize = g.requests.iter().map(|(id, _)| req_bytes(id)).sum();
        let cls: usize = g.clusters.iter().map(|(k, c)| cluster_bytes(k, c)).sum();
        reqs + cls
    };
    for i in 0..20u64 {
        let cluster = format!("c{}", i % 3);
        let ip = format!("10.0.0.{}", i % 4);
        add(&s, &cluster, &format!("r{i}"), &ip, 5, i);
        assert_eq!(s.bytes(), recount(&s));
        assert_eq!(budget.load_bytes() as usize, s.bytes());
        if i % 3 == 0 {
            s.delete(&format!("r{}", i - 1), at(i));
            assert_eq!(s.bytes(), recount(&s));
        }
    }
    s.gc(at(25), 2);
    assert_eq!(s.bytes(), recount(&s));
    s.gc(at(100), 2); // expires the requests (which refreshes their clusters)
    assert_eq!(s.bytes(), recount(&s));
    s.gc(at(200), 2); // then the clusters
    assert_eq!((s.bytes(), budget.load_bytes()), (0, 0));
}

mod model {
    //! Property: after any sequence of adds, prompt deletes and deletes (duplicates, out of
    //! order, unknown ids), every engine's counters equal the sums over the requests still
    //! held, as a plain map computes them.
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap as Map;

    #[derive(Debug, Clone)]
    enum Op {
        Add(u8, u8, i32),
        Prompt(u8),
        Delete(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..12, 0u8..3, 0i32..1000).prop_map(|(i, e, p)| Op::Add(i, e, p)),
            (0u8..12).prop_map(Op::Prompt),
            (0u8..12).prop_map(Op::Delete),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn counters_match_a_plain_model(ops in prop::collection::vec(op(), 1..80)) {
            let s = LoadStore::new(LoadConfig::default());
            // request id -> (engine, prompt still held)
            let mut held: Map<u8, (u8, i64)> = Map::new();
            for (step, o) in ops.iter().enumerate() {
                let now = at(step as u64);
                match *o {
                    Op::Add(i, e, p) => {
                        let out = s.add(&AddRequest {
                            cluster: "m",
                            request_id: &format!("r{i}"),
                            prompt_length: p,
                            engine: ep(&format!("10.0.0.{e}:80")),
                        }, now);
                        let dup = held.contains_key(&i);
                        prop_assert_eq!(out == AddOutcome::Duplicate, dup);
                        held.entry(i).or_insert((e, i64::from(p)));
                    }
                    Op::Prompt(i) => {
                        prop_assert_eq!(s.delete_prompt(&format!("r{i}"), now), held.contains_key(&i));
                        if let Some(h) = held.get_mut(&i) {
                            h.1 = 0;
                        }
                    }
                    Op::Delete(i) => {
                        prop_assert_eq!(s.delete(&format!("r{i}"), now), held.remove(&i).is_some());
                    }
                }
                for e in 0u8..3 {
                    let (q, p) = held.values().filter(|(he, _)| *he == e)
                        .fold((0i64, 0i64), |(q, p), (_, hp)| (q + 1, p + hp));
                    let got = engine(&s, "m", &format!("10.0.0.{e}:80"))
                        .map(|(q, p)| (i64::from(q), i64::from(p)));
                    // An engine appears with its first add and stays (until GC).
                    prop_assert_eq!(got.unwrap_or((0, 0)), (q, p), "engine {} after {:?}", e, o);
                }
            }
            prop_assert_eq!(s.request_count(), held.len());
        }
    }
}
