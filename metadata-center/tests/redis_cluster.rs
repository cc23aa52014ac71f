//! The Redis store on a Redis Cluster: three masters with one replica each, made with
//! `redis-cli --cluster create` on free 127.0.0.1 ports. One cluster's keys share one slot;
//! load and cache calls work across slots and nodes; with the master of a cluster's slot killed,
//! lookups resume once its replica is promoted; a store opened while the cluster is down answers
//! from nothing and connects once it is up.

mod redis_support;

use std::time::{Duration, Instant};

use llmproxy_metadata_center::endpoint::Endpoint;
use llmproxy_metadata_center::load::AddRequest;
use llmproxy_metadata_center::retry::RetryKind;
use llmproxy_metadata_center::store::redis::keys::{request_index, ClusterKeys};
use llmproxy_metadata_center::store::{RedisConfig, RedisStore, StoreSpec};
use redis_support::{redis_available, RedisCluster};

/// The cluster tests run one at a time: two clusters forming at once on two cores slow
/// replication and failover down.
static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn ep(s: &str) -> Endpoint {
    s.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_three_masters_one_slot_per_cluster_and_failover() {
    if !redis_available("redis_cluster_three_masters_one_slot_per_cluster_and_failover") {
        return;
    }
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let cluster = RedisCluster::start(3, 1);
    let spec = StoreSpec::parse("--store", &cluster.url()).unwrap();
    let s = RedisStore::open(RedisConfig {
        spec,
        op_timeout: Duration::from_millis(200),
        connect_timeout: Duration::from_millis(500),
        key_prefix: "t".into(),
        load_ttl: Duration::from_secs(60),
        cache_ttl: Duration::from_secs(60),
        max_prefixes_per_cluster: 1000,
        max_locations_per_prefix: 16,
        top_k: 5,
    })
    .unwrap();

    // Many model clusters, spread over the three masters.
    let names: Vec<String> = (0..12).map(|i| format!("model-{i}")).collect();
    let t0 = Instant::now();
    loop {
        s.cache_save(&names[0], &[1, 2, 3], ep("10.0.0.1")).await;
        if !s.cache_query(&names[0], &[1, 2, 3], 5).await.is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "cluster client never connected"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (i, n) in names.iter().enumerate() {
        s.cache_save(n, &[1, 2, 3, i as u64], ep("10.0.0.1")).await;
        s.add(&AddRequest {
            cluster: n,
            request_id: &format!("req-{i}"),
            prompt_length: 10,
            engine: ep("10.0.0.2"),
        })
        .await;
    }
    let mut con = cluster.nodes[0].client();
    let slot = |con: &mut redis::Connection, k: &str| -> u16 {
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(k)
            .query(con)
            .unwrap()
    };
    let mut masters = std::collections::BTreeSet::new();
    for (i, n) in names.iter().enumerate() {
        assert_eq!(
            s.cache_query(n, &[1, 2, 3, i as u64], 5).await,
            vec![(ep("10.0.0.1"), 4)]
        );
        let load = s.query_load(n).await.unwrap();
        assert_eq!(load[0].queued_req_num, 1, "{n}");
        // One model cluster, one slot.
        let k = ClusterKeys::new("t", n);
        let slots: Vec<u16> = [k.requests(), k.expiry(), k.engines(), k.lru(), k.nodes()]
            .iter()
            .map(|key| slot(&mut con, key))
            .collect();
        assert!(slots.iter().all(|x| *x == slots[0]), "{n}: {slots:?}");
        masters.insert(cluster.master_of(slots[0]));
    }
    assert!(
        masters.len() >= 2,
        "clusters spread over masters: {masters:?}"
    );
    // Deletes find their request through the index (in another slot).
    let idx = request_index("t", "req-0");
    assert_ne!(
        slot(&mut con, &idx),
        slot(&mut con, &ClusterKeys::new("t", &names[0]).requests())
    );
    assert!(s.delete("req-0", RetryKind::Delete).await);
    assert_eq!(s.query_load(&names[0]).await.unwrap()[0].queued_req_num, 0);

    // Kill the master holding model-1's slot; lookups come back when its replica is promoted.
    let victim_slot = slot(&mut con, &ClusterKeys::new("t", &names[1]).lru());
    let victim = cluster.master_of(victim_slot);
    drop(con);
    // Wait until the victim's replica has model-1's cache (replication is asynchronous, and a
    // replica promoted before it caught up would miss it), then crash the master.
    let nodes_key = ClusterKeys::new("t", &names[1]).nodes();
    let mut master = cluster.nodes[victim].client();
    let want: usize = redis::cmd("HLEN")
        .arg(&nodes_key)
        .query(&mut master)
        .unwrap();
    let replica = cluster.replica_of(victim);
    let mut rc = cluster.nodes[replica].client();
    let _: () = redis::cmd("READONLY").query(&mut rc).unwrap();
    let t0 = Instant::now();
    while redis::cmd("HLEN")
        .arg(&nodes_key)
        .query::<usize>(&mut rc)
        .unwrap()
        < want
    {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "replica never caught up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut cluster = cluster;
    cluster.nodes[victim].kill();
    let t_kill = Instant::now();
    let resumed = loop {
        let last = s.cache_query(&names[1], &[1, 2, 3, 1], 5).await;
        if last == vec![(ep("10.0.0.1"), 4)] {
            break t_kill.elapsed();
        }
        if t_kill.elapsed() > Duration::from_secs(15) {
            let live = (0..cluster.nodes.len()).find(|i| *i != victim).unwrap();
            let mut c = cluster.nodes[live].client();
            let nodes: String = redis::cmd("CLUSTER").arg("NODES").query(&mut c).unwrap();
            panic!(
                "lookups did not resume after the failover; last answer {last:?}; counters {:?}; nodes:\n{nodes}",
                s.counters
                    .get(llmproxy_metadata_center::store::redis::Op::CacheQuery)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("lookups resumed {resumed:?} after the master was killed (node timeout 1 s)");
    // Writes go to the promoted master too. A save is not retried by the store (the next
    // request's save is the retry, as a gateway sends one per request), and one sent while the
    // client's slot map still names the dead master is lost: save until it lands.
    let t_write = Instant::now();
    loop {
        s.cache_save(&names[1], &[5, 6], ep("10.0.0.3")).await;
        let answer = s.cache_query(&names[1], &[5, 6], 5).await;
        if answer == vec![(ep("10.0.0.3"), 2)] {
            break;
        }
        assert!(
            t_write.elapsed() < Duration::from_secs(10),
            "saves did not reach the promoted master; last answer {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_store_opened_while_the_cluster_is_down_connects_when_it_comes_up() {
    if !redis_available(
        "redis_cluster_store_opened_while_the_cluster_is_down_connects_when_it_comes_up",
    ) {
        return;
    }
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let ports: Vec<u16> = (0..3).map(|_| redis_support::free_port()).collect();
    let url = format!(
        "redis+cluster://{}",
        ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let s = RedisStore::open(RedisConfig {
        spec: StoreSpec::parse("--store", &url).unwrap(),
        op_timeout: Duration::from_millis(50),
        connect_timeout: Duration::from_millis(200),
        key_prefix: "t".into(),
        load_ttl: Duration::from_secs(60),
        cache_ttl: Duration::from_secs(60),
        max_prefixes_per_cluster: 1000,
        max_locations_per_prefix: 16,
        top_k: 5,
    })
    .unwrap();
    let t0 = Instant::now();
    assert!(s.cache_query("m", &[1, 2], 5).await.is_empty());
    assert_eq!(s.query_load("m").await, None);
    assert!(
        t0.elapsed() < Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );
    let _cluster = RedisCluster::start_on(&ports, 0);
    let t_up = Instant::now();
    loop {
        s.cache_save("m", &[1, 2], ep("10.0.0.1")).await;
        if s.cache_query("m", &[1, 2], 5).await == vec![(ep("10.0.0.1"), 2)] {
            break;
        }
        assert!(
            t_up.elapsed() < Duration::from_secs(20),
            "the store never connected to the cluster"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "cluster store connected {:?} after the cluster came up",
        t_up.elapsed()
    );
}
