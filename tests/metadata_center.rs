//! The sync thread against the real Metadata-Center server binary (built by
//! `cargo build --release --workspace`), on 127.0.0.1: two routers share load and cache
//! state through it; a dead server never blocks or breaks picking; DNS clusters resolve.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use llmproxy::{PickError, PickStart, PickedRequest, Router};

struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn server_binary() -> PathBuf {
    // tests run from target/<profile>/deps/; the server binary sits in target/<profile>/.
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir.join("llmproxy-metadata-center");
    assert!(
        bin.exists(),
        "{} is missing: build the workspace first (`cargo build --release --workspace`)",
        bin.display()
    );
    bin
}

fn start_server() -> Server {
    let mut child = Command::new(server_binary())
        .args(["run", "--host", "127.0.0.1", "--port", "0"])
        .env("POD_IP", "127.0.0.1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start metadata-center");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("listening on ") {
                let _ = tx.send(addr.rsplit(':').next().unwrap().parse::<u16>().unwrap());
            }
        }
    });
    let port = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("metadata-center did not report its port");
    Server { child, port }
}

fn config(mc_port: u16, extra: &str) -> String {
    format!(
        r#"{{
        "model_mapping_rule": {{"m": {{"rules": [{{"cluster": "pool", "backend": "vllm"}}]}}}},
        "clusters": {{"pool": {{"endpoints": ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"]}}}},
        "metadata_center": {{"enabled": true, "host": "127.0.0.1", "port": {mc_port}, "load_poll_ms": 20 {extra}}}
    }}"#
    )
}

fn chat(text: &str) -> Vec<u8> {
    serde_json::json!({"model": "m", "messages": [{"role": "user", "content": text}]})
        .to_string()
        .into_bytes()
}

/// A client for the test server's API, every call bounded by 2 s.
fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(2)))
        .build()
        .into()
}

fn http_get_text(port: u16, path: &str) -> String {
    agent()
        .get(format!("http://127.0.0.1:{port}{path}"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap()
}

fn http_get(port: u16, path: &str) -> serde_json::Value {
    serde_json::from_str(&http_get_text(port, path)).unwrap()
}

/// True when the server's cache holds `key` (a prefix hash or a response id's key) in
/// `cluster` at some location: what another gateway's lookup of it would find.
fn server_holds(port: u16, cluster: &str, key: u64) -> bool {
    let answer = agent()
        .post(format!("http://127.0.0.1:{port}/v1/cache/query"))
        .header("content-type", "application/json")
        .send(serde_json::json!({"cluster": cluster, "prompt_hash": [key], "top_k": 3}).to_string())
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    answer.contains(r#""length":1"#)
}

/// `/v1/cache/save` calls the server has handled (its /metrics).
fn server_saves(port: u16) -> u64 {
    http_get_text(port, "/metrics")
        .lines()
        .find_map(|l| l.strip_prefix("metadata_center_cache_ops_total{op=\"save\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn server_queued(port: u16) -> Vec<(String, i64)> {
    let v = http_get(port, "/v1/load/stats?cluster=pool");
    let mut out: Vec<(String, i64)> = v["data"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    (
                        e["ip"].as_str().unwrap().to_string(),
                        e["queued_req_num"].as_i64().unwrap(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn metric(r: &Router, line_prefix: &str) -> u64 {
    r.metrics_text()
        .lines()
        .find_map(|l| l.strip_prefix(line_prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn two_routers_share_load_through_the_server() {
    let server = start_server();
    // A generous staleness bound: on a loaded machine a poll may lag, and this test is about
    // sharing, not about expiry (covered in state.rs).
    let a =
        Router::from_json(config(server.port, r#", "load_stale_ms": 30000"#).as_bytes()).unwrap();
    let b =
        Router::from_json(config(server.port, r#", "load_stale_ms": 30000"#).as_bytes()).unwrap();

    // Router A holds 12 requests, pinned to 127.0.0.1:7001 by shrinking its view.
    a.set_endpoints("pool", &["127.0.0.1:7001".parse().unwrap()]);
    let held: Vec<PickedRequest> = (0..12)
        .map(|i| a.pick(&[], &chat(&format!("a{i}"))))
        .collect();
    wait_until("the server to count A's requests", || {
        server_queued(server.port).contains(&("127.0.0.1:7001".to_string(), 12))
    });

    // Router B has no local load at all, yet steers away from 7001 once it has polled.
    // B must see the cluster as active before it polls it: one pick, then wait for a poll.
    b.pick(&[], &chat("warm-up")).finish(200);
    let polls = metric(&b, "llmproxy_metadata_center_calls_total{result=\"ok\"} ");
    wait_until("B to poll again", || {
        metric(&b, "llmproxy_metadata_center_calls_total{result=\"ok\"} ") > polls + 2
    });
    for i in 0..30 {
        let p = b.pick(&[], &chat(&format!("b{i}")));
        assert_ne!(
            p.endpoint(),
            Some("127.0.0.1:7001"),
            "B must avoid the endpoint A loaded"
        );
        p.finish(200);
    }

    // Finishing A's requests releases the shared load.
    for p in held {
        p.finish(200);
    }
    wait_until("the server to release A's load", || {
        server_queued(server.port).iter().all(|(_, q)| *q == 0)
    });
    assert_eq!(
        metric(&a, "llmproxy_metadata_center_events_dropped_total "),
        0
    );
}

/// Router A (no lookups) serves `prompt` and saves where its prefix went; returns router B,
/// with remote cache lookups, and A's endpoint. B's local index knows nothing of the prompt.
fn warmed_by_another_router(server: &Server, prompt: &str) -> (Router, String) {
    let a = Router::from_json(config(server.port, "").as_bytes()).unwrap();
    let b = Router::from_json(
        config(server.port, r#", "cache_enabled": true, "timeout_ms": 500"#).as_bytes(),
    )
    .unwrap();
    let saves = server_saves(server.port);
    let p = a.pick(&[], &chat(prompt));
    let warmed = p.endpoint().unwrap().to_string();
    p.finish(200);
    wait_until("the cache save to land", || {
        server_saves(server.port) > saves
    });
    (b, warmed)
}

/// `r.pick_async(body)`, which must go pending (a remote cache lookup), and the decision its
/// lookup thread hands to the callback.
fn decided_after_lookup(r: &Router, body: &[u8]) -> PickedRequest {
    let (tx, rx) = mpsc::channel();
    let immediate = r.pick_async(&[], body, Box::new(move |req| tx.send(req).unwrap()));
    assert!(immediate.is_none(), "cache-enabled pick_async goes pending");
    rx.recv_timeout(Duration::from_secs(3))
        .expect("callback called")
}

#[test]
fn remote_cache_lookup_finds_the_endpoint_another_router_warmed() {
    let server = start_server();
    let prompt = format!(
        "{} final question",
        "long shared document text. ".repeat(200)
    );
    let (b, warmed) = warmed_by_another_router(&server, &prompt);
    for i in 0..5 {
        let req = decided_after_lookup(&b, &chat(&prompt));
        assert_eq!(req.endpoint(), Some(warmed.as_str()), "pick {i}");
        assert!(req.cache_ratio() > 0.99, "ratio {}", req.cache_ratio());
        req.finish(200);
    }
    assert!(
        metric(
            &b,
            "llmproxy_remote_cache_lookups_total{result=\"remote\"} "
        ) >= 5
    );
}

#[test]
fn remote_claims_older_than_the_endpoints_cache_residency_do_not_count() {
    // One endpoint with a 1,000-token KV cache. Router a claims two documents' prefixes on
    // it. Router b's own answers then write 50,000 tokens there within b's 2 s rate window, so
    // b expects whatever is older than ~40 ms to be evicted: its cache query asks only for
    // younger claims (`max_age_ms`) and a's, 2 s old, no longer counts. Router c, the same
    // without cache_residency, takes a's claim at its word. (One document each: a pick claims
    // its prompt's prefix at once, so b's and c's own picks must not meet.)
    let server = start_server();
    let router = |residency: bool| {
        let config = format!(
            r#"{{"cache_capacity_tokens": 1000, "cache_feedback": false, "cache_residency": {residency},
            "model_mapping_rule": {{"m": {{"rules": [{{"cluster": "pool", "backend": "vllm"}}]}}}},
            "clusters": {{"pool": {{"endpoints": ["127.0.0.1:7001"]}}}},
            "metadata_center": {{"enabled": true, "host": "127.0.0.1", "port": {},
                                 "cache_enabled": true, "timeout_ms": 500}}}}"#,
            server.port
        );
        Router::from_json(config.as_bytes()).unwrap()
    };
    let (a, b, c) = (router(true), router(true), router(false));
    let document = |n: u32| {
        format!(
            "document {n}: {}",
            "long shared document text. ".repeat(200)
        )
    };
    let saves = server_saves(server.port);
    a.pick(&[], &chat(&document(1))).finish(200);
    a.pick(&[], &chat(&document(2))).finish(200);
    wait_until("a's claims to land", || {
        server_saves(server.port) >= saves + 2
    });
    let evicting = br#"{"choices":[{"index":0,"message":{"content":"ok"}}],"usage":{"prompt_tokens":50000,"completion_tokens":0,"prompt_tokens_details":{"cached_tokens":0}}}"#;
    // a prompt of several chunks: its pick opens b's first rate window, before the write
    let mut p = b.pick(&[], &chat(&"an unrelated question. ".repeat(100)));
    p.observe_response(evicting, true);
    p.finish(200);
    std::thread::sleep(Duration::from_millis(2_100));
    let req = decided_after_lookup(&c, &chat(&document(2)));
    assert!(req.cache_ratio() > 0.99, "c: ratio {}", req.cache_ratio());
    req.finish(200);
    let req = decided_after_lookup(&b, &chat(&document(1)));
    let page = b.metrics_text();
    let said: Vec<&str> = (page.lines())
        .filter(|l| l.contains("residency_seconds{") || l.contains("remote_cache_lookups_total{"))
        .collect();
    assert_eq!(
        req.cache_ratio(),
        0.0,
        "b: a's claim is past the residency: {said:?}"
    );
    req.finish(200);
}

#[test]
fn a_pick_claims_its_prefix_before_the_server_answers() {
    // Router A picks and has not heard a byte from the server yet (prefill): router B, asking
    // the Metadata-Center, already routes the same document to A's endpoint.
    let server = start_server();
    let prompt = format!(
        "{} what changed?",
        "a new document nobody cached. ".repeat(200)
    );
    let a = Router::from_json(config(server.port, "").as_bytes()).unwrap();
    let b = Router::from_json(
        config(server.port, r#", "cache_enabled": true, "timeout_ms": 500"#).as_bytes(),
    )
    .unwrap();
    let saves = server_saves(server.port);
    let held = a.pick(&[], &chat(&prompt));
    let warmed = held.endpoint().unwrap().to_string();
    wait_until("the claim to land", || server_saves(server.port) > saves);
    let req = decided_after_lookup(&b, &chat(&prompt));
    assert_eq!(req.endpoint(), Some(warmed.as_str()));
    assert!(req.cache_ratio() > 0.99, "ratio {}", req.cache_ratio());
    req.finish(200);
    held.finish(200);
}

#[test]
fn another_router_finds_the_answer_this_one_learned() {
    // Router a answers a first turn and learns the answer: the chain it saves on the server
    // goes on with the next turn's chunks, so router b sends the second turn to a's endpoint.
    let server = start_server();
    let a = Router::from_json(config(server.port, "").as_bytes()).unwrap();
    let b = Router::from_json(
        config(server.port, r#", "cache_enabled": true, "timeout_ms": 500"#).as_bytes(),
    )
    .unwrap();
    let question = "Summarise the report.";
    let answer = "The report says many things at length. ".repeat(100);
    let saves = server_saves(server.port);
    let mut p = a.pick(&[], &chat(question));
    let warmed = p.endpoint().unwrap().to_string();
    let event = serde_json::json!({"choices": [{"index": 0, "delta": {"content": answer}}]});
    p.observe_response(
        format!("data: {event}\n\ndata: [DONE]\n\n").as_bytes(),
        true,
    );
    p.finish(200);
    // the prompt's claim at the pick, then the learned chain at the finish
    wait_until("the learned chain to land", || {
        server_saves(server.port) >= saves + 2
    });
    let second = serde_json::json!({"model": "m", "messages": [
        {"role": "user", "content": question},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "Shorter, please."},
    ]})
    .to_string();
    let req = decided_after_lookup(&b, second.as_bytes());
    assert_eq!(req.endpoint(), Some(warmed.as_str()));
    // 7 of its 8 chunks of 512 bytes; the question alone is not even one full chunk.
    assert!(req.cache_ratio() > 0.8, "ratio {}", req.cache_ratio());
    req.finish(200);
}

#[test]
fn polled_pick_finds_the_endpoint_another_router_warmed() {
    // The polling form of the remote lookup (what nginx uses): pick_start, then try_take
    // until the lookup thread has decided.
    let server = start_server();
    let prompt = format!(
        "{} polled question",
        "another long shared text. ".repeat(200)
    );
    let (b, warmed) = warmed_by_another_router(&server, &prompt);
    for _ in 0..5 {
        let PickStart::Pending(mut pending) = b.pick_start(&[], &chat(&prompt)) else {
            panic!("a cache-enabled pick_start goes pending");
        };
        let deadline = Instant::now() + Duration::from_secs(3);
        let req = loop {
            if let Some(req) = pending.try_take() {
                break req;
            }
            assert!(Instant::now() < deadline, "no decision within 3 s");
            std::thread::sleep(Duration::from_millis(1));
        };
        assert!(
            pending.is_taken() && pending.try_take().is_none(),
            "taken once"
        );
        assert_eq!(req.endpoint(), Some(warmed.as_str()));
        req.finish(200);
    }
    assert!(
        metric(
            &b,
            "llmproxy_remote_cache_lookups_total{result=\"remote\"} "
        ) >= 5
    );
    assert_eq!(b.in_flight(), 0);
}

#[test]
fn pick_tickets_freed_undecided_or_unpolled_leave_nothing_in_flight() {
    // Through the C ABI, against a server that never answers: every lookup waits for the
    // timeout, so the picks stay pending. Half the tickets are freed at once (their decisions
    // arrive later, to nobody), a quarter are polled to the end, a quarter are freed after
    // their decision was made but never polled.
    use llmproxy::ffi::llmproxy_status::*;
    use llmproxy::ffi::*;
    let port = hanging_server();
    let cfg = config(port, r#", "cache_enabled": true, "timeout_ms": 30"#);
    unsafe {
        let mut r = std::ptr::null_mut();
        let st = llmproxy_router_new(
            cfg.as_ptr().cast(),
            cfg.len(),
            &mut r,
            std::ptr::null_mut(),
            0,
        );
        assert_eq!(st, LLMPROXY_OK);
        let mut tickets = Vec::new();
        for i in 0..16 {
            let body = chat(&format!(
                "{} {i}",
                "a shared prefix long enough to hash. ".repeat(40)
            ));
            let (mut ticket, mut req) = (std::ptr::null_mut(), std::ptr::null_mut());
            let st = llmproxy_pick_start(
                r,
                std::ptr::null(),
                0,
                body.as_ptr(),
                body.len(),
                &mut ticket,
                &mut req,
            );
            assert_eq!(st, LLMPROXY_PENDING, "pick {i}");
            assert!(req.is_null() && !ticket.is_null());
            tickets.push(ticket);
        }
        let polled = tickets.split_off(8);
        for t in tickets {
            llmproxy_pick_ticket_free(t);
        }
        let (polled, unpolled) = polled.split_at(4);
        for &t in polled {
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut req = std::ptr::null_mut();
            let st = loop {
                let st = llmproxy_pick_poll(t, &mut req);
                if st != LLMPROXY_PENDING {
                    break st;
                }
                assert!(req.is_null());
                assert!(Instant::now() < deadline, "no decision within 5 s");
                std::thread::sleep(Duration::from_millis(1));
            };
            assert_eq!(
                st, LLMPROXY_OK,
                "the lookup failed: decided from local data"
            );
            assert!(!req.is_null());
            let mut again = std::ptr::null_mut();
            assert_eq!(llmproxy_pick_poll(t, &mut again), LLMPROXY_INVALID_ARGUMENT);
            assert!(again.is_null());
            llmproxy_request_finish(req, 200);
            llmproxy_pick_ticket_free(t);
        }
        // The polled ones were queued after the freed ones: by now every lookup before them
        // was decided. Give the last few time to be decided, then free them unpolled.
        std::thread::sleep(Duration::from_millis(300));
        for &t in unpolled {
            llmproxy_pick_ticket_free(t);
        }
        wait_until("every decision to be finished", || {
            llmproxy_router_in_flight(r) == 0
        });
        let text = {
            let (mut out, mut len) = (std::ptr::null_mut(), 0);
            assert_eq!(llmproxy_router_metrics(r, &mut out, &mut len), LLMPROXY_OK);
            let s = std::ffi::CStr::from_ptr(out).to_str().unwrap().to_owned();
            llmproxy_string_free(out);
            s
        };
        assert!(text.contains("llmproxy_in_flight_requests 0"), "{text}");
        llmproxy_router_free(r);
    }
}

#[test]
fn dead_server_never_blocks_picks_and_free_is_bounded() {
    // Port 9 on loopback refuses connections; lookups fall back to local data.
    let r = Router::from_json(config(9, r#", "cache_enabled": true, "timeout_ms": 50"#).as_bytes())
        .unwrap();
    let start = Instant::now();
    for i in 0..2000 {
        let p = r.pick(&[], &chat(&format!("q{i}")));
        assert_eq!(p.http_status(), 200);
        p.finish(200);
    }
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "picks must not wait on the network"
    );
    let (tx, rx) = mpsc::channel();
    match r.pick_async(&[], &chat("x"), Box::new(move |req| tx.send(req).unwrap())) {
        Some(p) => p.finish(200),
        None => rx
            .recv_timeout(Duration::from_secs(3))
            .expect("fallback decision")
            .finish(200),
    }
    wait_until("failures to be counted", || {
        metric(
            &r,
            "llmproxy_metadata_center_calls_total{result=\"failed\"} ",
        ) > 0
    });
    assert!(r.metrics_text().contains("llmproxy_in_flight_requests 0"));
    let start = Instant::now();
    drop(r);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "router free is bounded"
    );
}

#[test]
fn dns_clusters_resolve_on_the_resolver_thread() {
    let r = Router::from_json(
        br#"{"model_mapping_rule": {"m": {"rules": [{"cluster": "byname", "backend": "vllm"}]}},
             "clusters": {"byname": {"dns": "localhost:7777"}}}"#,
    )
    .unwrap();
    wait_until("localhost to resolve", || !r.endpoints("byname").is_empty());
    let eps = r.endpoints("byname");
    assert!(
        eps.iter()
            .all(|e| e == "127.0.0.1:7777" || e == "[::1]:7777"),
        "{eps:?}"
    );
    let p = r.pick(&[], &chat("x"));
    assert!(eps.contains(&p.endpoint().unwrap().to_string()));
}

#[test]
fn hanging_server_costs_at_most_the_timeout_and_free_stays_bounded() {
    let port = hanging_server();
    let r = Router::from_json(config(port, r#", "async_timeout_ms": 300"#).as_bytes()).unwrap();
    let start = Instant::now();
    for i in 0..500 {
        let p = r.pick(&[], &chat(&format!("q{i}")));
        assert_eq!(p.http_status(), 200);
        p.finish(200);
    }
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "the request path never waits on the server"
    );
    wait_until("timeouts to be counted", || {
        metric(
            &r,
            "llmproxy_metadata_center_calls_total{result=\"failed\"} ",
        ) > 0
    });
    // Events beyond the queue are dropped (counted), never waited for.
    let start = Instant::now();
    drop(r);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "free is bounded while a call hangs"
    );
}

/// A server that accepts connections and never answers; returns its port.
fn hanging_server() -> u16 {
    hanging_server_counting().0
}

/// `hanging_server`, also counting the connections it accepted.
fn hanging_server_counting() -> (u16, Arc<AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    hang_on(listener, &accepted);
    (port, accepted)
}

/// Accepts every connection of `listener` and never answers, counting them in `accepted`.
fn hang_on(listener: std::net::TcpListener, accepted: &Arc<AtomicUsize>) {
    let counter = Arc::clone(accepted);
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().flatten() {
            held.push(conn);
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
}

/// Starts a `pick_async` for a prompt long enough to be looked up; the decision goes to `tx`.
/// Returns true when it went pending.
fn pick_pending(r: &Router, i: usize, tx: &mpsc::Sender<PickedRequest>) -> bool {
    let tx = tx.clone();
    let prompt = format!("{} {i}", "a shared prefix long enough to hash. ".repeat(40));
    match r.pick_async(
        &[],
        &chat(&prompt),
        Box::new(move |req| tx.send(req).unwrap()),
    ) {
        None => true,
        Some(p) => {
            p.finish(200);
            false
        }
    }
}

#[test]
fn lookup_threads_query_in_parallel() {
    // Three lookup threads against a server that never answers: three picks are three
    // simultaneous connections, not one after the other.
    let (port, accepted) = hanging_server_counting();
    let r = Router::from_json(
        config(
            port,
            r#", "cache_enabled": true, "timeout_ms": 2000, "lookup_threads": 3"#,
        )
        .as_bytes(),
    )
    .unwrap();
    let (tx, rx) = mpsc::channel();
    for i in 0..3 {
        assert!(pick_pending(&r, i, &tx), "pick {i} goes pending");
    }
    wait_until("three lookups at once", || {
        accepted.load(Ordering::SeqCst) == 3
    });
    for _ in 0..3 {
        let req = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("decided after the timeout");
        req.finish(200);
    }
}

#[test]
fn lookups_that_waited_a_timeout_in_the_queue_decide_at_once() {
    // One lookup thread, a server that never answers, 30 pending picks: one after the other
    // they would take 30 timeouts (6 s); those that already waited a timeout in the queue
    // decide from local data without asking.
    let port = hanging_server();
    let r = Router::from_json(
        config(
            port,
            r#", "cache_enabled": true, "timeout_ms": 200, "lookup_threads": 1"#,
        )
        .as_bytes(),
    )
    .unwrap();
    let (tx, rx) = mpsc::channel();
    let pending = (0..30).filter(|&i| pick_pending(&r, i, &tx)).count();
    assert_eq!(pending, 30);
    let start = Instant::now();
    for _ in 0..pending {
        let req = rx.recv_timeout(Duration::from_secs(5)).expect("decided");
        assert_eq!(req.http_status(), 200);
        req.finish(200);
    }
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "30 picks behind one hanging lookup took {:?}",
        start.elapsed()
    );
    let expired = metric(
        &r,
        "llmproxy_remote_cache_lookups_total{result=\"expired_in_queue\"} ",
    );
    let fallback = metric(
        &r,
        "llmproxy_remote_cache_lookups_total{result=\"local_fallback\"} ",
    );
    assert!(expired >= 20, "expired {expired}, fallback {fallback}");
    assert_eq!(expired + fallback, 30);
}

#[test]
fn router_freed_with_lookups_queued_still_answers_every_pending_pick() {
    // Every lookup hangs for the timeout, so pending picks queue up behind the first one;
    // the router is freed meanwhile. Each pending pick must still get its one callback (a
    // local decision), or its proxy stream would wait forever.
    let port = hanging_server();
    let r =
        Router::from_json(config(port, r#", "cache_enabled": true, "timeout_ms": 200"#).as_bytes())
            .unwrap();
    let (tx, rx) = mpsc::channel();
    let pending = (0..40).filter(|&i| pick_pending(&r, i, &tx)).count();
    drop(tx);
    assert!(pending >= 10, "only {pending} picks went pending");
    drop(r);
    let mut answered = Vec::new();
    while let Ok(req) = rx.recv_timeout(Duration::from_secs(5)) {
        answered.push(req);
    }
    assert_eq!(
        answered.len(),
        pending,
        "every pending pick is answered once"
    );
    for req in answered {
        assert_eq!(req.http_status(), 200);
        req.finish(200);
    }
}

#[test]
fn overload_sheds_reports_but_never_leaves_phantom_load() {
    let server = start_server();
    // A tiny queue: adds beyond it are shed, but no delete of a delivered add may be lost.
    let r = Router::from_json(config(server.port, r#", "queue_size": 50"#).as_bytes()).unwrap();
    // Hold 400 requests, added in batches the queue can carry, until the server has them all.
    let mut held = Vec::new();
    for batch in 0..10 {
        for i in 0..40 {
            held.push(r.pick(&[], &chat(&format!("b{batch} q{i}"))));
        }
        let want = held.len() as i64;
        wait_until("the server to count the batch", || {
            server_queued(server.port)
                .iter()
                .map(|(_, q)| *q)
                .sum::<i64>()
                == want
        });
    }
    // Then a burst far above the queue: 400 prompt releases and 400 deletes at once.
    for (i, mut p) in held.into_iter().enumerate() {
        if i % 2 == 0 {
            p.first_token();
        }
        p.finish(200);
    }
    assert_eq!(r.in_flight(), 0);
    // Plus a flood of short requests that overflows the queue (these are shed).
    for i in 0..5_000 {
        r.pick(&[], &chat(&format!("flood {i}"))).finish(200);
    }
    assert!(
        metric(&r, "llmproxy_metadata_center_events_dropped_total ") > 0,
        "the flood must overflow the queue for this test to mean anything"
    );
    // Every add the server received gets its delete: nothing is left in flight there.
    wait_until("the server to drain to zero", || {
        server_queued(server.port).iter().all(|(_, q)| *q == 0)
    });
    let v = http_get(server.port, "/v1/load/stats?cluster=pool");
    for e in v["data"].as_array().cloned().unwrap_or_default() {
        assert_eq!(e["prompt_length"], 0, "{e}");
    }
}

/// Runs `test` (this test binary, `--exact`) inside new mount and network namespaces whose
/// DNS resolver never answers: `/etc/resolv.conf` points at 127.0.0.1:53, where a UDP
/// socket takes queries and drops them. Needs root and util-linux `unshare` + iproute2 `ip`;
/// returns false (the caller skips, loudly) without them.
fn run_with_black_holed_resolver(test: &str) -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    let have = |cmd: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {cmd}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !root || !have("unshare") || !have("ip") {
        eprintln!("SKIPPED {test}: needs root, unshare and ip (namespaces for a black-holed DNS)");
        return false;
    }
    let dir = std::env::temp_dir().join(format!("llmproxy-blackhole-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let resolv = dir.join("resolv.conf");
    std::fs::write(
        &resolv,
        "nameserver 127.0.0.1\noptions timeout:3 attempts:1\n",
    )
    .unwrap();
    let exe = std::env::current_exe().unwrap();
    let script = format!(
        "set -e; ip link set lo up; mount --bind '{}' /etc/resolv.conf; exec '{}' --exact {test} --nocapture",
        resolv.display(),
        exe.display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--net", "sh", "-c", &script])
        .env("LLMPROXY_BLACK_HOLED_DNS", "1")
        .output()
        .expect("run unshare");
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "inside the namespaces:\n{text}");
    assert!(
        text.contains("1 passed"),
        "the inner test did not run:\n{text}"
    );
    true
}

/// Outside the namespaces: runs `test` inside them (see [`run_with_black_holed_resolver`]) and
/// returns None. Inside: returns the resolver's socket on 127.0.0.1:53, which takes every
/// query and never answers, for the test body to hold.
fn black_holed_resolver(test: &str) -> Option<std::net::UdpSocket> {
    if std::env::var_os("LLMPROXY_BLACK_HOLED_DNS").is_none() {
        run_with_black_holed_resolver(test);
        return None;
    }
    Some(std::net::UdpSocket::bind("127.0.0.1:53").expect("bind the black-hole resolver"))
}

#[test]
fn black_holed_resolver_delays_no_pending_pick() {
    // The Metadata-Center is given by a host name, and the resolver never answers (3 s per
    // query). Resolution happens on its own thread: every pending pick is still decided within
    // timeout_ms (+ the library's slack), here at once from local data, as no address is known.
    let Some(dns) = black_holed_resolver("black_holed_resolver_delays_no_pending_pick") else {
        return;
    };
    // Proof that the resolver is black-holed while the picks run: this lookup is still
    // waiting when they are done.
    let probe = std::thread::spawn(|| {
        use std::net::ToSocketAddrs;
        let _ = ("probe.blackhole.test", 80).to_socket_addrs();
    });
    let timeout_ms = 100;
    let r = Router::from_json(
        format!(
            r#"{{"model_mapping_rule": {{"m": {{"rules": [{{"cluster": "pool", "backend": "vllm"}}]}}}},
                "clusters": {{"pool": {{"endpoints": ["127.0.0.1:8001", "127.0.0.1:8002"]}}}},
                "metadata_center": {{"enabled": true, "host": "mc.blackhole.test", "port": 8080,
                                     "cache_enabled": true, "timeout_ms": {timeout_ms}}}}}"#
        )
        .as_bytes(),
    )
    .unwrap();
    let bound = Duration::from_millis(timeout_ms) + llmproxy::router::PENDING_SLACK;
    let worst = decide_200_pending_picks(&r, bound);
    assert!(
        !probe.is_finished(),
        "the resolver answered: the test proves nothing"
    );
    assert!(
        worst <= bound,
        "slowest decision {worst:?}, bound {bound:?}"
    );
    let start = Instant::now();
    drop(r);
    assert!(
        start.elapsed() < Duration::from_millis(50),
        "free waited for the resolver"
    );
    drop(dns);
}

#[test]
fn black_holed_resolver_delays_no_metadata_center_report() {
    // A DNS cluster whose name the resolver never answers (3 s per query) must not hold up
    // the reports of another cluster's requests: DNS runs on the resolver thread, not on
    // the sync thread that talks to the Metadata-Center.
    let Some(dns) = black_holed_resolver("black_holed_resolver_delays_no_metadata_center_report")
    else {
        return;
    };
    let server = start_server();
    let r = Router::from_json(
        format!(
            r#"{{"model_mapping_rule": {{"m": {{"rules": [{{"cluster": "pool", "backend": "vllm"}}]}},
                                       "n": {{"rules": [{{"cluster": "byname", "backend": "vllm"}}]}}}},
                "clusters": {{"pool": {{"endpoints": ["127.0.0.1:7001"]}},
                              "byname": {{"dns": "pool.blackhole.test:7777"}}}},
                "metadata_center": {{"enabled": true, "host": "127.0.0.1", "port": {}}}}}"#,
            server.port
        )
        .as_bytes(),
    )
    .unwrap();
    let start = Instant::now();
    let held = r.pick(&[], &chat("reported at once"));
    assert_eq!(held.http_status(), 200);
    while server_queued(server.port).is_empty() {
        assert!(
            start.elapsed() < Duration::from_millis(1500),
            "the add waited for DNS"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    held.finish(200);
    drop(dns);
}

/// Makes 200 `pick_async` picks one after the other (each waits for its decision) and returns
/// the longest time from pick to decision; stops at the first one over `bound` (by a second).
fn decide_200_pending_picks(r: &Router, bound: Duration) -> Duration {
    let mut worst = Duration::ZERO;
    for i in 0..200 {
        let (tx, rx) = mpsc::channel();
        let start = Instant::now();
        let prompt = format!("{} {i}", "a shared prefix long enough to hash. ".repeat(40));
        let decided =
            match r.pick_async(&[], &chat(&prompt), Box::new(move |req| drop(tx.send(req)))) {
                Some(req) => Some(req),
                None => rx.recv_timeout(bound + Duration::from_secs(1)).ok(),
            };
        worst = worst.max(start.elapsed());
        let Some(req) = decided else {
            return worst;
        };
        assert_eq!(req.http_status(), 200);
        req.finish(200);
        if worst > bound {
            return worst;
        }
    }
    worst
}

#[test]
fn black_holed_replicas_cost_one_timeout_not_one_per_replica() {
    // "localhost" names two replicas here when ::1 is configured (127.0.0.1 and ::1); both
    // accept and never answer. A lookup tries the pinned replica and the next one within ONE
    // deadline, so every pending pick is decided within timeout_ms + slack.
    let listener4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener4.local_addr().unwrap().port();
    let listener6 = std::net::TcpListener::bind(("::1", port)).ok();
    let accepted = Arc::new(AtomicUsize::new(0));
    for l in std::iter::once(listener4).chain(listener6) {
        hang_on(l, &accepted);
    }
    let timeout_ms = 100;
    let r = Router::from_json(
        format!(
            r#"{{"model_mapping_rule": {{"m": {{"rules": [{{"cluster": "pool", "backend": "vllm"}}]}}}},
                "clusters": {{"pool": {{"endpoints": ["127.0.0.1:8001", "127.0.0.1:8002"]}}}},
                "metadata_center": {{"enabled": true, "host": "localhost", "port": {port},
                                     "cache_enabled": true, "timeout_ms": {timeout_ms},
                                     "lookup_threads": 4}}}}"#
        )
        .as_bytes(),
    )
    .unwrap();
    wait_until("lookups to reach the replicas", || {
        let (tx, rx) = mpsc::channel();
        let prompt = "a shared prefix long enough to hash. ".repeat(40);
        match r.pick_async(
            &[],
            &chat(&prompt),
            Box::new(move |req| tx.send(req).unwrap()),
        ) {
            Some(req) => req.finish(200),
            None => rx.recv().unwrap().finish(200),
        }
        accepted.load(Ordering::SeqCst) > 0
    });
    let bound = Duration::from_millis(timeout_ms) + llmproxy::router::PENDING_SLACK;
    let worst = decide_200_pending_picks(&r, bound);
    assert!(
        worst <= bound,
        "slowest decision {worst:?}, bound {bound:?}"
    );
}

#[test]
fn router_free_never_waits_for_stuck_threads() {
    // The sync thread hangs in a call to a server that never answers (5 s timeout), the
    // lookup threads hang in lookups (2 s): freeing the router returns at once every time;
    // the threads finish on their own and every pending pick is still answered.
    let port = hanging_server();
    let mut worst = Duration::ZERO;
    let (tx, rx) = mpsc::channel();
    let mut pending = 0;
    for _ in 0..20 {
        let r = Router::from_json(
            config(
                port,
                r#", "cache_enabled": true, "timeout_ms": 2000, "async_timeout_ms": 5000"#,
            )
            .as_bytes(),
        )
        .unwrap();
        r.pick(&[], &chat("reported to the hanging server"))
            .finish(200);
        for i in 0..3 {
            pending += pick_pending(&r, i, &tx) as usize;
        }
        std::thread::sleep(Duration::from_millis(20)); // the threads are now in their calls
        let start = Instant::now();
        drop(r);
        worst = worst.max(start.elapsed());
    }
    assert!(worst < Duration::from_millis(50), "slowest free {worst:?}");
    for _ in 0..pending {
        rx.recv_timeout(Duration::from_secs(10))
            .expect("every pending pick answered")
            .finish(200);
    }
}

#[test]
fn another_router_sends_a_responses_chain_to_the_endpoint_that_stored_its_answer() {
    // Router a answers Responses requests; each answer's id is saved on the server as its
    // endpoint's. Router b, which never saw them, sends a request naming one
    // (`previous_response_id`) to that endpoint: the only engine that has the conversation.
    let server = start_server();
    let a = Router::from_json(config(server.port, "").as_bytes()).unwrap();
    let b = Router::from_json(
        config(server.port, r#", "cache_enabled": true, "timeout_ms": 500"#).as_bytes(),
    )
    .unwrap();
    let path: [(&[u8], &[u8]); 1] = [(b":path", b"/v1/responses")];
    let body = |input: &str, previous: Option<&str>| {
        let mut v = serde_json::json!({"model": "m", "input": input});
        if let Some(id) = previous {
            v["previous_response_id"] = id.into();
        }
        v.to_string().into_bytes()
    };
    for chain in 0..5 {
        let id = format!("resp_chain_{chain}");
        let key = llmproxy::hashing::response_key(&id);
        assert!(
            !server_holds(server.port, "pool", key),
            "chain {chain} saved too soon"
        );
        let mut p = a.pick(&path, &body(&format!("first turn {chain}"), None));
        let home = p.endpoint().unwrap().to_string();
        p.observe_response(format!(r#"{{"id":"{id}","output":[]}}"#).as_bytes(), true);
        p.finish(200);
        // saved when the answer's first bytes pass (waiting on the count of saves instead
        // raced with b's own claim of the previous chain, still on its way)
        wait_until("the answer's id to land", || {
            server_holds(server.port, "pool", key)
        });
        let (tx, rx) = mpsc::channel();
        let next = body("and then?", Some(&id));
        let immediate = b.pick_async(&path, &next, Box::new(move |r| tx.send(r).unwrap()));
        assert!(immediate.is_none(), "a chain b does not know is looked up");
        let req = rx.recv_timeout(Duration::from_secs(3)).expect("decided");
        assert_eq!(req.endpoint(), Some(home.as_str()), "chain {chain}");
        req.finish(200);
    }
    assert_eq!(
        metric(&b, "llmproxy_response_chains_total{result=\"pinned\"} "),
        5
    );
}

#[test]
fn another_router_sends_requests_on_a_stored_answer_to_the_endpoint_that_stored_it() {
    // A client polls (GET /v1/responses/{id}) through router b an answer router a made: b asks
    // the Metadata-Center, pins the request to a's endpoint and binds the id (the next poll
    // needs no lookup). An id nobody stored passes through untouched.
    let server = start_server();
    let a = Router::from_json(config(server.port, "").as_bytes()).unwrap();
    // b also has clusters no rule routes to, listed before the routed one: the answer is found
    let spare: String = (0..4)
        .map(|i| {
            format!(
                r#", "a-spare{i}": {{"endpoints": ["127.0.0.1:{}"]}}"#,
                7100 + i
            )
        })
        .collect();
    let b_config = config(server.port, r#", "cache_enabled": true, "timeout_ms": 500"#).replace(
        r#""127.0.0.1:7003"]}"#,
        &format!(r#""127.0.0.1:7003"]}}{spare}"#),
    );
    assert!(b_config.contains("a-spare3"), "{b_config}");
    let b = Router::from_json(b_config.as_bytes()).unwrap();
    let saves = server_saves(server.port);
    let path: [(&[u8], &[u8]); 1] = [(b":path", b"/v1/responses")];
    let mut p = a.pick(
        &path,
        br#"{"model": "m", "input": "run in the background"}"#,
    );
    let home = p.endpoint().unwrap().to_string();
    p.observe_response(br#"{"id":"resp_bg","status":"queued","output":[]}"#, true);
    p.finish(200);
    wait_until("the answer's id to land", || {
        server_saves(server.port) >= saves + 2
    });
    let poll: [(&[u8], &[u8]); 2] = [(b":method", b"GET"), (b":path", b"/v1/responses/resp_bg")];
    assert!(b.should_intercept(b"GET", b"/v1/responses/resp_bg"));
    let decide = |headers: &[(&[u8], &[u8])]| {
        let (tx, rx) = mpsc::channel();
        match b.pick_async(headers, b"", Box::new(move |r| tx.send(r).unwrap())) {
            Some(decided) => (decided, false),
            None => (
                rx.recv_timeout(Duration::from_secs(3)).expect("decided"),
                true,
            ),
        }
    };
    let (first, looked_up) = decide(&poll);
    assert!(looked_up, "an answer b does not know is looked up");
    assert_eq!(first.endpoint(), Some(home.as_str()));
    first.finish(200);
    let (second, looked_up) = decide(&poll);
    assert!(!looked_up, "found once, the answer is bound here");
    assert_eq!(second.endpoint(), Some(home.as_str()));
    second.finish(200);
    let nowhere: [(&[u8], &[u8]); 2] = [
        (b":method", b"DELETE"),
        (b":path", b"/v1/responses/resp_no"),
    ];
    let (unknown, _) = decide(&nowhere);
    assert_eq!(
        unknown.http_status(),
        0,
        "passed through: {:?}",
        unknown.error()
    );
    assert!(matches!(
        unknown.error(),
        Some(PickError::PassThrough { .. })
    ));
    unknown.finish(0);
    let stored = |result: &str| {
        metric(
            &b,
            &format!("llmproxy_stored_response_requests_total{{result=\"{result}\"}} "),
        )
    };
    assert_eq!((stored("pinned"), stored("unknown")), (2, 1));
    assert_eq!(b.in_flight(), 0);
}
