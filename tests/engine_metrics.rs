//! `engine_metrics` against real HTTP servers on 127.0.0.1: the reader thread reads each
//! endpoint's Prometheus page, picks stay off an endpoint whose engine says it is busy with
//! traffic this router never sent, and endpoints whose page hangs, is garbage or is missing
//! cost the request path nothing (their reads fail, counted, and they are scored on local
//! accounting).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use llmproxy::Router;

/// Serves `page` as the answer to every request (one request per connection); `None`:
/// accepts connections and never answers.
fn metrics_server(page: Option<&'static str>) -> u16 {
    match page {
        Some(page) => page_server(move || page.to_string()),
        None => {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            std::thread::spawn(move || {
                // a hanging engine: connections held, never a byte back
                let _held: Vec<TcpStream> = listener.incoming().flatten().collect();
            });
            port
        }
    }
}

/// Serves the page `page()` makes at each request (one request per connection).
fn page_server(page: impl Fn() -> String + Send + 'static) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut buf = [0u8; 4096];
            let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = conn.read(&mut buf);
            let page = page();
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{page}",
                page.len()
            );
        }
    });
    port
}

/// Serves vLLM's page of an engine with a 65,536-token KV cache whose token counters grow with
/// time since it started: 30 prompt tokens per ms, 21 of them found cached, 1 generated (10
/// tokens written per ms, by clients this router never sees).
fn busy_cache_server() -> u16 {
    let started = Instant::now();
    page_server(move || {
        let ms = started.elapsed().as_millis() as u64;
        format!(
            "vllm:cache_config_info{{block_size=\"16\",num_gpu_blocks=\"4096\"}} 1.0\n\
             vllm:prompt_tokens_total{{model_name=\"m\"}} {}\n\
             vllm:prefix_cache_hits_total{{model_name=\"m\"}} {}\n\
             vllm:generation_tokens_total{{model_name=\"m\"}} {ms}\n",
            30 * ms,
            21 * ms
        )
    })
}

fn metric(r: &Router, line_prefix: &str) -> u64 {
    r.metrics_text()
        .lines()
        .find_map(|l| l.strip_prefix(line_prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn chat(text: &str) -> Vec<u8> {
    serde_json::json!({"model": "m", "messages": [{"role": "user", "content": text}]})
        .to_string()
        .into_bytes()
}

#[test]
fn picks_avoid_an_engine_busy_with_traffic_nobody_reported_and_bad_pages_cost_nothing() {
    let busy = metrics_server(Some(
        "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name=\"m\"} 8\n\
         vllm:num_requests_waiting{model_name=\"m\"} 50\n",
    ));
    let idle = metrics_server(Some(
        "vllm:num_requests_running{model_name=\"m\"} 0\nvllm:num_requests_waiting{model_name=\"m\"} 0\n",
    ));
    let hanging = metrics_server(None);
    let garbage = metrics_server(Some("<html>no metrics here</html>"));
    let config = format!(
        r#"{{"model_mapping_rule": {{"m": {{"rules": [{{"cluster": "pool", "backend": "vllm"}}]}}}},
            "clusters": {{"pool": {{"endpoints": ["127.0.0.1:{busy}", "127.0.0.1:{idle}",
                                                  "127.0.0.1:{hanging}", "127.0.0.1:{garbage}"]}}}},
            "engine_metrics": {{"enabled": true, "period_ms": 100, "timeout_ms": 100, "stale_ms": 5000}}}}"#
    );
    let r = Router::from_json(config.as_bytes()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&r, "llmproxy_engine_metrics_reads_total{result=\"ok\"} ") < 2
        || metric(
            &r,
            "llmproxy_engine_metrics_reads_total{result=\"failed\"} ",
        ) < 2
    {
        assert!(Instant::now() < deadline, "reads: {}", r.metrics_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    // 40 new prompts, each finished at once: without the busy engine's word, a quarter of them
    // would go there
    let busy_addr = format!("127.0.0.1:{busy}");
    let mut served = std::collections::BTreeMap::new();
    for i in 0..40 {
        let p = r.pick(
            &[],
            &chat(&format!("question number {i} about something new")),
        );
        let e = p.endpoint().expect("routed").to_string();
        *served.entry(e).or_insert(0) += 1;
        p.finish(200);
    }
    assert!(!served.contains_key(&busy_addr), "{served:?}");
    assert_eq!(served.values().sum::<i32>(), 40);
    // the hanging and the garbage pages are failed reads, retried after a backoff
    assert!(
        metric(
            &r,
            "llmproxy_engine_metrics_reads_total{result=\"failed\"} "
        ) >= 2
    );
    // freeing the router does not wait for a read stuck on the hanging engine
    let freed = Instant::now();
    drop(r);
    assert!(freed.elapsed() < Duration::from_secs(1));
}

#[test]
fn the_engines_cache_capacity_sets_how_long_a_prefix_counts_as_cached() {
    // vLLM's page: a cache of 64 blocks of 16 tokens
    let engine = metrics_server(Some(
        "# TYPE vllm:cache_config_info gauge\n\
         vllm:cache_config_info{block_size=\"16\",enable_prefix_caching=\"True\",num_gpu_blocks=\"64\"} 1.0\n",
    ));
    let config = format!(
        r#"{{"model_mapping_rule": {{"m": {{"rules": [{{"cluster": "pool", "backend": "vllm"}}]}}}},
            "clusters": {{"pool": {{"endpoints": ["127.0.0.1:{engine}"]}}}},
            "engine_metrics": {{"enabled": true, "period_ms": 100, "timeout_ms": 100}}}}"#
    );
    let r = Router::from_json(config.as_bytes()).unwrap();
    let residency = |r: &Router| -> Option<f64> {
        let name = format!(
            "llmproxy_endpoint_cache_residency_seconds{{cluster=\"pool\",endpoint=\"127.0.0.1:{engine}\"}} "
        );
        r.metrics_text()
            .lines()
            .find_map(|l| l.strip_prefix(name.as_str()).map(|v| v.parse().unwrap()))
    };
    // an answer that wrote 20,480 tokens into it (no prefix cached, 480 generated)
    let answer = br#"{"choices":[{"index":0,"message":{"content":"ok"}}],"usage":{"prompt_tokens":20000,"completion_tokens":480,"prompt_tokens_details":{"cached_tokens":0}}}"#;
    let mut p = r.pick(&[], &chat("a long document"));
    p.observe_response(answer, true);
    p.finish(200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&r, "llmproxy_engine_metrics_reads_total{result=\"ok\"} ") < 1 {
        assert!(Instant::now() < deadline, "reads: {}", r.metrics_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(residency(&r), None, "no write rate yet");
    // the next pick after the first 2 s window measures the rate: 20,480 tokens in ~2 s
    // against 1,024 tokens of capacity: a prefix stays ~0.1 s
    std::thread::sleep(Duration::from_millis(2_050));
    r.pick(&[], &chat("another document")).finish(200);
    let secs = residency(&r).expect("capacity from the page, rate from the answer");
    assert!((0.05..0.5).contains(&secs), "residency {secs} s");
}

#[test]
fn the_engines_token_counters_give_the_write_rate_of_traffic_this_router_never_sent() {
    let engine = busy_cache_server();
    let config = format!(
        r#"{{"model_mapping_rule": {{"m": {{"rules": [{{"cluster": "pool", "backend": "vllm"}}]}}}},
            "clusters": {{"pool": {{"endpoints": ["127.0.0.1:{engine}"]}}}},
            "engine_metrics": {{"enabled": true, "period_ms": 100, "timeout_ms": 100}}}}"#
    );
    let r = Router::from_json(config.as_bytes()).unwrap();
    let labels = format!("cluster=\"pool\",endpoint=\"127.0.0.1:{engine}\"");
    let gauge = |r: &Router, name: &str| -> Option<f64> {
        let prefix = format!("{name}{{{labels}}} ");
        r.metrics_text()
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()).map(|v| v.parse().unwrap()))
    };
    // no request went through this router: the residency is the engine's capacity over what
    // its own counters say it writes, 65,536 tokens at 10 per ms: 6.6 s (after a first 2 s
    // window of reads)
    let deadline = Instant::now() + Duration::from_secs(10);
    let secs = loop {
        if let Some(secs) = gauge(&r, "llmproxy_endpoint_cache_residency_seconds") {
            break secs;
        }
        assert!(
            Instant::now() < deadline,
            "no residency: {}",
            r.metrics_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!((5.5..7.5).contains(&secs), "residency {secs} s");
    let rate =
        format!("llmproxy_endpoint_cache_write_tokens_per_second{{{labels},source=\"engine\"}} ");
    let rate: f64 = r
        .metrics_text()
        .lines()
        .find_map(|l| l.strip_prefix(rate.as_str()).map(|v| v.parse().unwrap()))
        .expect("the engine's rate");
    assert!((8_500.0..11_500.0).contains(&rate), "{rate} tokens/s");
}
