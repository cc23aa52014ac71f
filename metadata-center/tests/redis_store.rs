//! The Redis store's data model against a real `redis-server` (started on a free 127.0.0.1
//! port per test, stopped at the end): load semantics as in the in-memory store, load of a
//! vanished gateway expiring at its TTL, cache answers equal to the in-memory tree's, bounded
//! size and TTL on every key, and the failure behaviour (Redis down or slow: answered from
//! nothing within the deadline, counted, reconnected).

mod redis_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use llmproxy_metadata_center::cache::{CacheConfig, CachePool, MaxAges};
use llmproxy_metadata_center::endpoint::Endpoint;
use llmproxy_metadata_center::load::{AddRequest, Stamp};
use llmproxy_metadata_center::retry::RetryKind;
use llmproxy_metadata_center::store::redis::{Op, RECENT_SAVES};
use llmproxy_metadata_center::store::{RedisConfig, RedisStore, StoreSpec};
use redis_support::{redis_available, RedisServer};

fn cfg(url: String) -> RedisConfig {
    RedisConfig {
        spec: StoreSpec::Redis(url),
        op_timeout: Duration::from_millis(200),
        connect_timeout: Duration::from_millis(500),
        key_prefix: "t".into(),
        load_ttl: Duration::from_secs(60),
        cache_ttl: Duration::from_secs(60),
        max_prefixes_per_cluster: 100_000,
        max_locations_per_prefix: 256,
        top_k: 5,
    }
}

fn ep(s: &str) -> Endpoint {
    s.parse().unwrap()
}

fn add<'a>(cluster: &'a str, id: &'a str, prompt: i32, engine: &str) -> AddRequest<'a> {
    AddRequest {
        cluster,
        request_id: id,
        prompt_length: prompt,
        engine: ep(engine),
    }
}

/// Makes the Redis at `url` hang for `secs` (`DEBUG SLEEP`, from another thread); join the
/// handle once it is over.
fn redis_sleeps(url: String, secs: &'static str) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut con = redis::Client::open(url).unwrap().get_connection().unwrap();
        let _: () = redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg(secs)
            .query(&mut con)
            .unwrap();
    })
}

/// (ip, queued, prompt) per engine.
async fn load(s: &RedisStore, cluster: &str) -> Option<Vec<(String, i32, i32)>> {
    s.query_load(cluster).await.map(|v| {
        v.into_iter()
            .map(|e| (e.ip, e.queued_req_num, e.prompt_length))
            .collect()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_load_lifecycle_matches_the_in_memory_semantics() {
    if !redis_available("redis_load_lifecycle_matches_the_in_memory_semantics") {
        return;
    }
    let r = RedisServer::start();
    let s = RedisStore::open(cfg(r.url())).unwrap();
    assert_eq!(load(&s, "m").await, None, "unknown cluster: null");
    s.add(&add("m", "r1", 100, "10.0.0.1")).await;
    s.add(&add("m", "r2", 50, "[fd00::1]:8000")).await;
    s.add(&add("m", "r1", 999, "10.0.0.9")).await; // duplicate id: ignored
    let v4 = ("10.0.0.1".to_string(), 1, 100);
    let v6 = ("[fd00::1]:8000".to_string(), 1, 50);
    assert_eq!(load(&s, "m").await, Some(vec![v4.clone(), v6.clone()]));
    // The prompt is released once, whichever delete comes first and however often.
    assert!(s.delete("r1", RetryKind::DeletePrompt).await);
    assert!(s.delete("r1", RetryKind::DeletePrompt).await);
    assert_eq!(
        load(&s, "m").await,
        Some(vec![("10.0.0.1".into(), 1, 0), v6.clone()])
    );
    assert!(s.delete("r1", RetryKind::Delete).await);
    assert!(
        !s.delete("r1", RetryKind::Delete).await,
        "second delete: miss"
    );
    assert!(!s.delete("r1", RetryKind::DeletePrompt).await);
    assert!(
        s.delete("r2", RetryKind::Delete).await,
        "full delete releases the prompt"
    );
    assert_eq!(
        load(&s, "m").await,
        Some(vec![
            ("10.0.0.1".into(), 0, 0),
            ("[fd00::1]:8000".into(), 0, 0)
        ])
    );
    assert!(!s.delete("never-added", RetryKind::Delete).await);
    // Updated time is Unix ns of the last change.
    let now = Stamp::now().wall_ns;
    let t = s.query_load("m").await.unwrap()[0].updated_time;
    assert!((now - t).abs() < 5_000_000_000, "{now} vs {t}");
    let (ok, err, late) = s.counters.get(Op::Add);
    assert_eq!((ok, err, late), (3, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_load_queries_in_flight_together_share_one_call() {
    if !redis_available("redis_load_queries_in_flight_together_share_one_call") {
        return;
    }
    let r = RedisServer::start();
    let s = RedisStore::open(cfg(r.url())).unwrap();
    s.add(&add("m", "r1", 100, "10.0.0.1")).await;
    s.add(&add("n", "r2", 7, "10.0.0.2")).await;
    let calls = |s: &RedisStore| s.counters.get(Op::QueryLoad).0;
    let before = calls(&s);
    // four queries of "m" polled together (one task: each is in flight when the next comes),
    // and one of "n": two Redis calls, the three later "m" queries share the first's answer
    let (a, b, c, d, n) = tokio::join!(
        load(&s, "m"),
        load(&s, "m"),
        load(&s, "m"),
        load(&s, "m"),
        load(&s, "n")
    );
    let m = Some(vec![("10.0.0.1".to_string(), 1, 100)]);
    assert_eq!([&a, &b, &c, &d], [&m, &m, &m, &m]);
    assert_eq!(n, Some(vec![("10.0.0.2".to_string(), 1, 7)]));
    assert_eq!(calls(&s) - before, 2);
    assert_eq!(s.counters.shared_load_queries(), 3);
    // answered: the next query makes its own call and sees the change
    assert!(s.delete("r1", RetryKind::DeletePrompt).await);
    assert_eq!(
        load(&s, "m").await,
        Some(vec![("10.0.0.1".to_string(), 1, 0)])
    );
    assert_eq!(calls(&s) - before, 3);
    assert_eq!(s.counters.shared_load_queries(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cache_save_sends_only_the_prefixes_not_saved_recently() {
    if !redis_available("redis_cache_save_sends_only_the_prefixes_not_saved_recently") {
        return;
    }
    let r = RedisServer::start();
    // time for the one save of ~130,000 prefixes at the end
    let s = RedisStore::open(RedisConfig {
        op_timeout: Duration::from_secs(20),
        ..cfg(r.url())
    })
    .unwrap();
    let (a, b) = (ep("10.0.0.1"), ep("10.0.0.2"));
    let saves = |s: &RedisStore| s.counters.get(Op::CacheSave).0;
    let turn1: Vec<u64> = (1..=8).collect();
    let turn2: Vec<u64> = (1..=12).collect();
    s.cache_save("m", &turn1, a).await;
    assert_eq!((saves(&s), s.recent_saves()), (1, 8));
    // the same prefixes for the same location again: no Redis call
    s.cache_save("m", &turn1, a).await;
    s.cache_save("m", &turn1[..5], a).await;
    assert_eq!((saves(&s), s.counters.skipped_saves()), (1, 2));
    // the next turn: one call, with its 4 new chunks only (8 + 4 remembered)
    s.cache_save("m", &turn2, a).await;
    assert_eq!((saves(&s), s.recent_saves()), (2, 12));
    // another location, another cluster: their own calls
    s.cache_save("m", &turn1, b).await;
    s.cache_save("other", &turn1, a).await;
    assert_eq!((saves(&s), s.recent_saves()), (4, 28));
    // what Redis holds is what every save said
    assert_eq!(s.cache_query("m", &turn2, 5).await, vec![(a, 12), (b, 8)]);
    assert_eq!(s.cache_query("other", &turn2, 5).await, vec![(a, 8)]);
    // bounded: a save of more prefixes than the memo holds leaves it within its cap, and
    // the newest (the last half of the cap at least) are still remembered
    let long: Vec<u64> = (100..100 + RECENT_SAVES as u64 + 1_000).collect();
    s.cache_save("big", &long, a).await;
    assert_eq!(saves(&s), 5);
    let held = s.recent_saves();
    assert!((RECENT_SAVES / 2..=RECENT_SAVES).contains(&held), "{held}");
    s.cache_save("big", &long, a).await;
    assert_eq!(
        saves(&s),
        6,
        "the oldest prefixes were forgotten: sent again"
    );
    let skipped = s.counters.skipped_saves();
    s.cache_save("big", &long[long.len() - RECENT_SAVES / 2..], b)
        .await;
    s.cache_save("big", &long[long.len() - RECENT_SAVES / 2..], b)
        .await;
    assert_eq!((saves(&s), s.counters.skipped_saves()), (7, skipped + 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cache_query_without_a_script_keeps_the_redis_clock() {
    if !redis_available("redis_cache_query_without_a_script_keeps_the_redis_clock") {
        return;
    }
    let r = RedisServer::start();
    let config = RedisConfig {
        cache_ttl: Duration::from_millis(1_000),
        ..cfg(r.url())
    };
    let s = RedisStore::open(config.clone()).unwrap();
    let (a, b) = (ep("10.0.0.1"), ep("10.0.0.2"));
    let start = Instant::now();
    s.cache_save("m", &[1, 2], a).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    // b's save keeps the prefixes alive and tells this replica Redis's clock
    s.cache_save("m", &[1, 2], b).await;
    tokio::time::sleep(Duration::from_millis(1_150).saturating_sub(start.elapsed())).await;
    // a's tags are past the TTL (by Redis's clock), b's are not: a plain HMGET with the time
    // from the last save's answer tells them apart, as the script does with Redis's own
    let plain = s.counters.plain_cache_queries();
    assert_eq!(s.cache_query("m", &[1, 2], 5).await, vec![(b, 2)]);
    assert_eq!(s.counters.plain_cache_queries(), plain + 1);
    // a replica that has not seen Redis's clock runs the script, and agrees
    let fresh = RedisStore::open(config).unwrap();
    assert_eq!(fresh.cache_query("m", &[1, 2], 5).await, vec![(b, 2)]);
    assert_eq!(fresh.counters.plain_cache_queries(), 0);
    // the script's answer told it the clock: its next query is plain
    assert_eq!(fresh.cache_query("m", &[1, 2], 5).await, vec![(b, 2)]);
    assert_eq!(fresh.counters.plain_cache_queries(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cache_query_with_max_ages_counts_only_younger_tags() {
    if !redis_available("redis_cache_query_with_max_ages_counts_only_younger_tags") {
        return;
    }
    let r = RedisServer::start();
    let s = RedisStore::open(cfg(r.url())).unwrap();
    let (a, b) = (ep("10.0.0.1"), ep("10.0.0.2"));
    s.cache_save("m", &[1, 2, 3], a).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    s.cache_save("m", &[1, 2], b).await;
    // a's claims younger than 200 ms only, b's younger than 1 s: a replica that has not seen
    // Redis's clock (the script) and one that has (a plain HMGET) both leave out a's 400 ms
    // old tags, and count them without the limits
    let young = &MaxAges::new([(a, 200), (b, 1_000)]);
    let fresh = RedisStore::open(cfg(r.url())).unwrap();
    assert_eq!(
        fresh.cache_query_within("m", &[1, 2, 3], 5, young).await,
        vec![(b, 2)]
    );
    assert_eq!(fresh.counters.plain_cache_queries(), 0);
    let plain = s.counters.plain_cache_queries();
    assert_eq!(
        s.cache_query_within("m", &[1, 2, 3], 5, young).await,
        vec![(b, 2)]
    );
    assert_eq!(s.counters.plain_cache_queries(), plain + 1);
    assert_eq!(
        s.cache_query("m", &[1, 2, 3], 5).await,
        vec![(a, 3), (b, 2)]
    );
    // a max age beyond the TTL is the TTL
    assert_eq!(
        s.cache_query_within("m", &[1, 2, 3], 5, &MaxAges::new([(a, 86_400_000)]))
            .await,
        vec![(a, 3), (b, 2)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cache_queries_ready_together_share_one_read_and_survive_a_dropped_sender() {
    if !redis_available(
        "redis_cache_queries_ready_together_share_one_read_and_survive_a_dropped_sender",
    ) {
        return;
    }
    let r = RedisServer::start_with(&["--enable-debug-command", "local"]);
    let s = RedisStore::open(RedisConfig {
        op_timeout: Duration::from_secs(3),
        ..cfg(r.url())
    })
    .unwrap();
    let (a, b) = (ep("10.0.0.1"), ep("10.0.0.2"));
    s.cache_save("m", &[1, 2, 3], a).await;
    s.cache_save("m", &[1, 7], b).await;
    s.cache_save("other", &[1], b).await;
    // alone, each query is its own batch
    assert_eq!(
        s.cache_query("m", &[1, 2, 3, 4], 5).await,
        vec![(a, 3), (b, 1)]
    );
    let (queries, pipelines) = (
        s.counters.plain_cache_queries(),
        s.counters.cache_query_pipelines(),
    );
    assert_eq!((queries, pipelines), (1, 1));

    // Four queries of "m" ready at once (and one of another cluster): one `HMGET` for "m"
    // (prefix 1, asked by three of them, read once), each query its own answer.
    let (q1, q2, q3, q4, q5) = tokio::join!(
        s.cache_query("m", &[1, 2, 3], 5),
        s.cache_query("m", &[1, 7, 9], 5),
        s.cache_query("m", &[5], 5),
        s.cache_query("other", &[1, 2], 5),
        s.cache_query("m", &[1], 1),
    );
    assert_eq!(q1, vec![(a, 3), (b, 1)]);
    assert_eq!(q2, vec![(b, 2), (a, 1)]);
    assert_eq!(q3, vec![]);
    assert_eq!(q4, vec![(b, 1)]);
    assert_eq!(q5.len(), 1);
    assert_eq!(s.counters.plain_cache_queries(), queries + 5);
    assert_eq!(
        s.counters.cache_query_pipelines(),
        pipelines + 2,
        "one per cluster"
    );
    assert_eq!(
        s.counters.get(Op::CacheQuery),
        (6, 0, 0),
        "each query counted"
    );
    assert_eq!(s.open_query_batches(), 0);

    // The query that sends a batch is dropped (its client went away) while Redis is busy
    // (DEBUG SLEEP): the other query of the batch sends it again and gets its answer.
    let sleeper = redis_sleeps(r.url(), "0.4");
    std::thread::sleep(Duration::from_millis(100));
    let pipelines = s.counters.cache_query_pipelines();
    let (cancel, cancelled) = tokio::sync::oneshot::channel::<()>();
    let t0 = Instant::now();
    // polled in this order each time (`biased`): the first query resumes first and sends
    let (dropped, kept, ()) = tokio::join!(
        biased;
        async {
            tokio::select! {
                answer = s.cache_query("m", &[1, 2, 3], 5) => Some(answer),
                _ = cancelled => None,
            }
        },
        s.cache_query("m", &[1, 7], 5),
        async {
            // the first query joins and yields, then sends; drop it once it is sending
            for _ in 0..3 {
                tokio::task::yield_now().await;
            }
            cancel.send(()).unwrap();
        },
    );
    sleeper.join().unwrap();
    assert_eq!(
        dropped, None,
        "the sender was dropped before Redis answered"
    );
    assert_eq!(kept, vec![(b, 2), (a, 1)]);
    assert_eq!(
        s.counters.cache_query_pipelines(),
        pipelines + 2,
        "sent by the first query, then again by the second"
    );
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert_eq!(s.open_query_batches(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_load_of_a_vanished_gateway_expires_at_its_ttl() {
    if !redis_available("redis_load_of_a_vanished_gateway_expires_at_its_ttl") {
        return;
    }
    let r = RedisServer::start();
    let s = RedisStore::open(RedisConfig {
        load_ttl: Duration::from_millis(1000),
        ..cfg(r.url())
    })
    .unwrap();
    // A gateway adds requests and dies: nobody ever deletes them.
    for i in 0..50 {
        s.add(&add("m", &format!("dead-{i}"), 10, "10.0.0.1")).await;
    }
    s.add(&add("m", "live", 7, "10.0.0.2")).await;
    assert_eq!(
        load(&s, "m").await,
        Some(vec![
            ("10.0.0.1".into(), 50, 500),
            ("10.0.0.2".into(), 1, 7)
        ])
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    // The live gateway's request is still being added to (refreshing the cluster's keys).
    s.add(&add("m", "live-2", 3, "10.0.0.2")).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut after = load(&s, "m").await.unwrap();
    // The dead gateway's engine shows 0, or is gone already (idle for the TTL: dropped).
    after.retain(|e| e != &("10.0.0.1".to_string(), 0, 0));
    assert_eq!(
        after,
        vec![("10.0.0.2".into(), 1, 3)],
        "the dead gateway's 50 requests expired, the live one's first too, its second not"
    );
    // Left alone past the TTL, the whole cluster disappears from Redis.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(load(&s, "m").await, None);
    let mut con = r.client();
    let keys: Vec<String> = redis::cmd("KEYS").arg("t:{m}:*").query(&mut con).unwrap();
    assert!(keys.is_empty(), "{keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cache_answers_like_the_in_memory_tree() {
    if !redis_available("redis_cache_answers_like_the_in_memory_tree") {
        return;
    }
    let r = RedisServer::start();
    let s = RedisStore::open(cfg(r.url())).unwrap();
    let pool = CachePool::new(CacheConfig {
        top_k: 100,
        ..Default::default()
    });
    let loc = |i: u32| Endpoint {
        ip: std::net::IpAddr::V4(std::net::Ipv4Addr::from(i)),
        port: None,
    };
    // The origin's vectors (src/cache/tests.rs), then random saves and queries.
    let mut saves: Vec<(Vec<u64>, u32)> = vec![
        (vec![1, 2, 3, 4, 5, 6], 1),
        (vec![1, 2, 3, 4], 1),
        (vec![1, 2, 3, 4], 2),
        (vec![1, 2, 3], 3),
        (vec![1, 2, 3, 5, 6], 4),
        (vec![1, 2, 3, 5, 6], 3),
        (vec![1, 2, 3, 7, 8], 5),
        (vec![2, 3, 4, 5], 6),
        (vec![2, 3, 4, 6], 7),
    ];
    let mut seed = 0x1234_5678_u64;
    let mut rnd = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for _ in 0..200 {
        let len = 1 + rnd(8) as usize;
        let path: Vec<u64> = (0..len).map(|_| 1 + rnd(3)).collect();
        saves.push((path, 10 + rnd(20) as u32));
    }
    let now = Stamp::now().mono;
    for (p, l) in &saves {
        pool.save("m", p, loc(*l), now);
        s.cache_save("m", p, loc(*l)).await;
    }
    let as_map = |v: Vec<(Endpoint, usize)>| -> BTreeMap<String, usize> {
        v.into_iter().map(|(e, d)| (e.to_string(), d)).collect()
    };
    let origin = as_map(s.cache_query("m", &[1, 2, 3, 4, 5, 6], 100).await);
    assert_eq!(origin.get("0.0.0.1"), Some(&6));
    let mut queries: Vec<Vec<u64>> = vec![vec![1, 2, 3, 5], vec![1, 2, 3, 9], vec![9], vec![]];
    for _ in 0..200 {
        let len = 1 + rnd(9) as usize;
        queries.push((0..len).map(|_| 1 + rnd(3)).collect());
    }
    for q in &queries {
        let want = as_map(pool.query("m", q, 100, now));
        let got = as_map(s.cache_query("m", q, 100).await);
        assert_eq!(got, want, "query {q:?}");
        // a few locations (the script stops early): the deepest ones, as many; the order among
        // equally deep ones is by save time, which the two stores keep at different precision
        for k in [1, 2, 3] {
            let depths = |v: &[(Endpoint, usize)]| v.iter().map(|e| e.1).collect::<Vec<_>>();
            let top = s.cache_query("m", q, k).await;
            assert_eq!(
                depths(&top),
                depths(&pool.query("m", q, k, now)),
                "query {q:?}, top {k}"
            );
            for (e, d) in &top {
                assert_eq!(want.get(&e.to_string()), Some(d), "query {q:?}, top {k}");
            }
        }
    }
    // Top-K: the deepest first.
    let top = s.cache_query("m", &[1, 2, 3, 4, 5, 6], 1).await;
    assert_eq!(top, vec![(loc(1), 6)]);
    // Another cluster sees nothing of this one.
    assert!(s.cache_query("other", &[1, 2, 3], 5).await.is_empty());
    // most queries went without the script (the clock known from the saves' answers)
    assert!(s.counters.plain_cache_queries() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cache_is_bounded_per_cluster_and_every_key_has_a_ttl() {
    if !redis_available("redis_cache_is_bounded_per_cluster_and_every_key_has_a_ttl") {
        return;
    }
    let r = RedisServer::start();
    let s = RedisStore::open(RedisConfig {
        max_prefixes_per_cluster: 50,
        max_locations_per_prefix: 3,
        ..cfg(r.url())
    })
    .unwrap();
    for i in 0..40u64 {
        s.cache_save("m", &[i, i + 1000, i + 2000, i + 3000], ep("10.0.0.1"))
            .await;
        // recency is Redis's clock in ms: saves within one ms are equally recent, and which
        // of them the cap evicts first is Redis's choice (a fast machine made that flaky)
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for i in 0..10u32 {
        s.cache_save("m", &[7, 7], ep(&format!("10.0.1.{i}"))).await;
    }
    s.add(&add("m", "r1", 5, "10.0.0.1")).await;
    let mut con = r.client();
    let lru: usize = redis::cmd("ZCARD")
        .arg("t:{m}:lru")
        .query(&mut con)
        .unwrap();
    assert_eq!(lru, 50, "prefixes per cluster capped");
    let nodes: usize = redis::cmd("HLEN")
        .arg("t:{m}:nodes")
        .query(&mut con)
        .unwrap();
    assert_eq!(nodes, 50, "evicted prefixes' nodes deleted");
    // The newest saves survived, least recently saved went first.
    let q = s.cache_query("m", &[39, 1039, 2039, 3039], 5).await;
    assert_eq!(q, vec![(ep("10.0.0.1"), 4)]);
    assert!(s.cache_query("m", &[0, 1000], 5).await.is_empty());
    // At most 3 locations per prefix.
    let q = s.cache_query("m", &[7, 7], 10).await;
    assert_eq!(q.len(), 3, "{q:?}");
    // Every key expires.
    let keys: Vec<String> = redis::cmd("KEYS").arg("t:*").query(&mut con).unwrap();
    assert!(keys.len() >= 5, "{keys:?}");
    for k in keys {
        let ttl: i64 = redis::cmd("PTTL").arg(&k).query(&mut con).unwrap();
        assert!(ttl > 0, "{k} has no TTL ({ttl})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_or_slow_is_answered_from_nothing_within_the_deadline() {
    if !redis_available("redis_down_or_slow_is_answered_from_nothing_within_the_deadline") {
        return;
    }
    let deadline = Duration::from_millis(50);
    // Nothing listens there: connection refused.
    let closed = redis_support::free_port();
    let s = RedisStore::open(RedisConfig {
        op_timeout: deadline,
        ..cfg(format!("redis://127.0.0.1:{closed}"))
    })
    .unwrap();
    let t0 = Instant::now();
    s.add(&add("m", "r1", 5, "10.0.0.1")).await;
    assert_eq!(s.query_load("m").await, None);
    assert!(s.cache_query("m", &[1, 2], 5).await.is_empty());
    s.cache_save("m", &[1, 2], ep("10.0.0.1")).await;
    assert!(
        s.delete("r1", RetryKind::Delete).await,
        "failed delete: no retry"
    );
    // Five calls, each at most one deadline (slack for a loaded machine).
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    let (ok, err, late) = s.counters.get(Op::QueryLoad);
    assert_eq!(ok, 0);
    assert_eq!(err + late, 1);

    // A hung Redis (DEBUG SLEEP): every call returns at the deadline, then Redis is used again.
    let r = RedisServer::start_with(&["--enable-debug-command", "local"]);
    let s = RedisStore::open(RedisConfig {
        op_timeout: deadline,
        ..cfg(r.url())
    })
    .unwrap();
    s.cache_save("m", &[1, 2], ep("10.0.0.1")).await;
    assert_eq!(s.cache_query("m", &[1, 2], 5).await.len(), 1);
    let sleeper = redis_sleeps(r.url(), "0.6");
    std::thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    assert!(s.cache_query("m", &[1, 2], 5).await.is_empty());
    let took = t0.elapsed();
    assert!(
        took >= deadline && took < deadline + Duration::from_millis(250),
        "{took:?}"
    );
    assert_eq!(s.counters.get(Op::CacheQuery).2, 1, "counted as a timeout");
    sleeper.join().unwrap();
    // Back: answers again (reconnecting if the late reply broke the connection).
    let t0 = Instant::now();
    loop {
        if s.cache_query("m", &[1, 2], 5).await.len() == 1 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "no recovery");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Redis killed and restarted on the same port: the store reconnects by itself.
    let port = r.port;
    drop(r);
    assert!(s.cache_query("m", &[1, 2], 5).await.is_empty());
    let r2 = RedisServer::start_on(port);
    s.cache_save("m", &[1, 2], ep("10.0.0.2")).await;
    let t0 = Instant::now();
    loop {
        s.cache_save("m", &[1, 2], ep("10.0.0.2")).await;
        if s.cache_query("m", &[1, 2], 5).await == vec![(ep("10.0.0.2"), 2)] {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "no reconnect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(r2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_out_of_memory_refuses_whole_scripts_and_leaves_the_counters_consistent() {
    if !redis_available(
        "redis_out_of_memory_refuses_whole_scripts_and_leaves_the_counters_consistent",
    ) {
        return;
    }
    let r = RedisServer::start();
    let s = RedisStore::open(cfg(r.url())).unwrap();
    for i in 0..10 {
        s.add(&add("m", &format!("r{i}"), 10, "10.0.0.1")).await;
    }
    let mut con = r.client();
    let set_max = |con: &mut redis::Connection, v: &str| {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory")
            .arg(v)
            .query(con)
            .unwrap();
    };
    // Full Redis (noeviction): every script that may write is refused before it starts.
    set_max(&mut con, "1");
    s.add(&add("m", "late", 10, "10.0.0.1")).await;
    assert!(s.delete("r0", RetryKind::Delete).await);
    assert_eq!(
        s.query_load("m").await,
        None,
        "refused: answered from nothing"
    );
    assert!(s.counters.get(Op::Add).1 >= 1, "counted as errors");
    assert!(s.counters.get(Op::Delete).1 >= 1);
    let requests: usize = redis::cmd("HLEN").arg("t:{m}:req").query(&mut con).unwrap();
    let queued: i64 = redis::cmd("HGET")
        .arg("t:{m}:eng")
        .arg("q|10.0.0.1")
        .query(&mut con)
        .unwrap();
    assert_eq!((requests, queued), (10, 10), "nothing half-applied");
    // Room again: the state is the one before, and it moves on from there.
    set_max(&mut con, "0");
    assert_eq!(
        load(&s, "m").await,
        Some(vec![("10.0.0.1".into(), 10, 100)])
    );
    assert!(s.delete("r0", RetryKind::Delete).await);
    assert_eq!(load(&s, "m").await, Some(vec![("10.0.0.1".into(), 9, 90)]));
}
