//! End to end: two metadata-center replicas (the real binary) over one Redis, two gateways
//! speaking the gateway wire calls over HTTP, each to a different replica. Gateway B finds what
//! gateway A warmed; A's load disappears at its TTL once A stops (killed with requests in
//! flight); with one replica killed the other answers with the full state.

mod redis_support;

use std::time::{Duration, Instant};

use redis_support::{redis_available, Mc, RedisServer};
use serde_json::Value;

/// (queued, prompt) of `ip` in `data` of `GET /v1/load/stats`.
fn engine(data: &Value, ip: &str) -> Option<(i64, i64)> {
    data.as_array()?.iter().find(|e| e["ip"] == ip).map(|e| {
        (
            e["queued_req_num"].as_i64().unwrap(),
            e["prompt_length"].as_i64().unwrap(),
        )
    })
}

#[test]
fn two_replicas_over_one_redis_share_state_and_a_dead_gateways_load_expires() {
    if !redis_available("two_replicas_over_one_redis_share_state_and_a_dead_gateways_load_expires")
    {
        return;
    }
    let redis = RedisServer::start();
    let url = redis.url();
    let args = ["--store", url.as_str()];
    let env = [("METADATA_CENTER_LOAD_REQ_EXPIRE", "2s")];
    let mut mc1 = Mc::start(&args, &env);
    let mc2 = Mc::start(&args, &env);
    // Gateway A talks to replica 1, gateway B to replica 2.
    let a = &mc1;
    let b = &mc2;

    // A warms the prefix cache on engine 10.0.0.1; B's remote lookup finds it.
    a.call(
        "POST",
        "/v1/cache/save",
        Some(r#"{"cluster":"m","prompt_hash":[11,12,13,14],"ip":"10.0.0.1"}"#),
    );
    let found = b.call(
        "POST",
        "/v1/cache/query",
        Some(r#"{"cluster":"m","prompt_hash":[11,12,13,99],"top_k":5}"#),
    );
    assert_eq!(
        found["locations"],
        serde_json::json!([{"ip": "10.0.0.1", "length": 3}])
    );

    // A has 5 requests in flight on 10.0.0.1; B sees them.
    let t_added = Instant::now();
    for i in 0..5 {
        a.call(
            "POST",
            "/v1/load/stats",
            Some(&format!(
                r#"{{"cluster":"m","request_id":"a-{i}","prompt_length":100,"ip":"10.0.0.1"}}"#
            )),
        );
    }
    let seen = b.call("GET", "/v1/load/stats?cluster=m", None);
    assert_eq!(engine(&seen, "10.0.0.1"), Some((5, 500)));

    // A request added on one replica is deleted through the other.
    b.call(
        "POST",
        "/v1/load/stats",
        Some(r#"{"cluster":"m","request_id":"b-x","prompt_length":7,"ip":"10.0.0.2"}"#),
    );
    assert_eq!(
        engine(&a.call("GET", "/v1/load/stats?cluster=m", None), "10.0.0.2"),
        Some((1, 7))
    );
    a.call("DELETE", "/v1/load/stats", Some(r#"{"request_id":"b-x"}"#));
    assert_eq!(
        engine(&b.call("GET", "/v1/load/stats?cluster=m", None), "10.0.0.2"),
        Some((0, 0))
    );

    // Gateway A dies with its 5 requests in flight: nobody deletes them. B keeps working
    // (adding its own requests) and sees A's load vanish at the TTL (2 s).
    let mut i = 0;
    let gone_after = loop {
        i += 1;
        b.call(
            "POST",
            "/v1/load/stats",
            Some(&format!(
                r#"{{"cluster":"m","request_id":"b-{i}","prompt_length":1,"ip":"10.0.0.2"}}"#
            )),
        );
        let seen = b.call("GET", "/v1/load/stats?cluster=m", None);
        // Gone: at zero, or dropped (an engine idle for the TTL leaves the answer).
        if matches!(engine(&seen, "10.0.0.1"), None | Some((0, 0))) {
            break t_added.elapsed();
        }
        assert!(
            t_added.elapsed() < Duration::from_secs(5),
            "A's load still there: {seen}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("dead gateway's load gone {gone_after:?} after its adds (TTL 2 s)");
    assert!(gone_after >= Duration::from_millis(1900), "{gone_after:?}");
    let still = b.call("GET", "/v1/load/stats?cluster=m", None);
    assert!(
        engine(&still, "10.0.0.2").unwrap().0 >= 1,
        "B's own load stays: {still}"
    );

    // Replica 1 crashes: replica 2 answers with the full state.
    mc1.kill();
    let found = b.call(
        "POST",
        "/v1/cache/query",
        Some(r#"{"cluster":"m","prompt_hash":[11,12,13,14]}"#),
    );
    assert_eq!(
        found["locations"],
        serde_json::json!([{"ip": "10.0.0.1", "length": 4}])
    );
    let seen = b.call("GET", "/v1/load/stats?cluster=m", None);
    assert!(engine(&seen, "10.0.0.2").is_some(), "{seen}");
    let metrics = b.metrics();
    assert!(
        metrics.contains("metadata_center_store_ops_total{op=\"cache_query\",result=\"ok\"}"),
        "{metrics}"
    );
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("metadata_center_store_ops_total"))
    {
        if line.contains("result=\"error\"") || line.contains("result=\"timeout\"") {
            assert!(line.ends_with(" 0"), "{line}");
        }
    }
}

#[test]
fn a_redis_store_with_replication_peers_is_refused_with_the_reason() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llmproxy-metadata-center"))
        .args([
            "run",
            "--port",
            "0",
            "--store",
            "redis://127.0.0.1:1",
            "--peers",
            "127.0.0.1:9",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--peers") && err.contains("Redis"), "{err}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llmproxy-metadata-center"))
        .args(["run", "--port", "0", "--store", "redis://nohost"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--store") && err.contains("missing port"),
        "{err}"
    );
}

#[test]
fn a_replica_starts_and_answers_while_redis_is_down() {
    // No redis-server needed: nothing listens on the port.
    let port = redis_support::free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let mc = Mc::start(&["--store", &url, "--store-timeout", "30ms"], &[]);
    let t0 = Instant::now();
    assert_eq!(
        mc.call("GET", "/v1/load/stats?cluster=m", None),
        Value::Null
    );
    let q = mc.call(
        "POST",
        "/v1/cache/query",
        Some(r#"{"cluster":"m","prompt_hash":[1,2]}"#),
    );
    assert_eq!(q["locations"], serde_json::json!([]));
    mc.call(
        "POST",
        "/v1/load/stats",
        Some(r#"{"cluster":"m","request_id":"r","prompt_length":1,"ip":"10.0.0.1"}"#),
    );
    assert!(
        t0.elapsed() < Duration::from_millis(1000),
        "{:?}",
        t0.elapsed()
    );
    let m = mc.metrics();
    let failed: u64 = m
        .lines()
        .filter(|l| l.starts_with("metadata_center_store_ops_total"))
        .filter(|l| !l.contains("result=\"ok\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(failed, 3, "{m}");
}
