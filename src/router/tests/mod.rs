//! The router's unit tests: rules, picks, retries, metrics (mod.rs's public API).

use super::*;

const CONFIG: &str = r#"{
    "model_mapping_rule": {
        "m1": {"rules": [
            {"cluster": "prod", "backend": "vllm", "scene_name": "chat"},
            {"cluster": "gray", "backend": "sglang", "headers": [{"key": "x-env", "value": "gray"}]}
        ]},
        "m2": {"rules": [{"cluster": "prod", "backend": "vllm", "headers": [{"key": "x-tenant", "value": "a"}]}]}
    },
    "clusters": {
        "prod": {"endpoints": ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003", "127.0.0.1:9004"]},
        "gray": {"endpoints": ["127.0.0.1:9101"]}
    }
}"#;

fn router() -> Router {
    Router::from_json(CONFIG.as_bytes()).unwrap()
}

fn chat(model: &str, text: &str) -> Vec<u8> {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": text}]})
        .to_string()
        .into_bytes()
}

#[test]
fn routes_by_rule_and_header() {
    let r = router();
    let p = r.pick(&[], &chat("m1", "hi"));
    assert_eq!(p.http_status(), 200);
    assert_eq!(p.cluster(), Some("prod"));
    assert_eq!(p.scene(), Some("chat"));
    assert_eq!(p.backend(), Some("vllm"));
    let g = r.pick(&[(b"X-Env", b"gray")], &chat("m1", "hi"));
    assert_eq!(g.cluster(), Some("gray"));
    assert_eq!(g.endpoint(), Some("127.0.0.1:9101"));
    assert_eq!(g.backend(), Some("sglang"));
    // Header values match exactly.
    let d = r.pick(&[(b"x-env", b"Gray")], &chat("m1", "hi"));
    assert_eq!(d.cluster(), Some("prod"));
}

#[test]
fn engine_native_apis_need_no_model_when_one_is_routed() {
    let one = Router::from_json(
        br#"{"model_mapping_rule": {"m": {"rules": [{"cluster": "c", "backend": "sglang"}]}},
            "clusters": {"c": {"endpoints": ["127.0.0.1:1", "127.0.0.1:2"]}}}"#,
    )
    .unwrap();
    let generate: [(&[u8], &[u8]); 1] = [(b":path", b"/generate")];
    let body = br#"{"text": "The capital of France is", "sampling_params": {"max_new_tokens": 8}}"#;
    let p = one.pick(&generate, body);
    assert_eq!((p.http_status(), p.model()), (200, Some("m")));
    // the body goes as it came (SGLang reads no model from it)
    assert_eq!(p.upstream_body(), None);
    p.finish(200);
    // several models routed: the request must name one
    let p = router().pick(&generate, body);
    assert_eq!(p.http_status(), 400);
    assert!(p.error_body().unwrap().contains("model"));
    let named = br#"{"model": "m1", "text": "The capital of France is"}"#;
    assert_eq!(router().pick(&generate, named).cluster(), Some("prod"));
    // llama.cpp's /completion, the same
    let completion: [(&[u8], &[u8]); 1] = [(b":path", b"/completion")];
    let p = one.pick(
        &completion,
        br#"{"prompt": "Once upon a time", "n_predict": 8}"#,
    );
    assert_eq!(
        (p.http_status(), p.model(), p.upstream_body()),
        (200, Some("m"), None)
    );
}

#[test]
fn unknown_model_and_unmatched_rule_are_404() {
    let r = router();
    let p = r.pick(&[], &chat("nope", "hi"));
    assert_eq!(p.http_status(), 404);
    assert!(p.error_body().unwrap().contains("model_not_found"));
    let p = r.pick(&[(b"x-tenant", b"b")], &chat("m2", "hi"));
    assert_eq!(p.http_status(), 404);
    assert!(p.error_body().unwrap().contains("no routing rule"));
    assert_eq!(
        r.pick(&[(b"x-tenant", b"a")], &chat("m2", "hi"))
            .http_status(),
        200
    );
}

#[test]
fn oversized_body_is_413_and_empty_cluster_is_503() {
    let r = Router::from_json(br#"{"max_body_bytes": 1024, "model_mapping_rule": {"m": {"rules": [{"cluster": "empty", "backend": "vllm"}]}}}"#).unwrap();
    assert_eq!(r.pick(&[], &vec![b' '; 2000]).http_status(), 413);
    let p = r.pick(&[], &chat("m", "x"));
    assert_eq!(p.http_status(), 503);
    assert!(p.error_body().unwrap().contains("no_endpoint"));
    r.set_endpoints("empty", &["127.0.0.1:1".parse().unwrap()]);
    assert_eq!(r.pick(&[], &chat("m", "x")).http_status(), 200);
}

#[test]
fn same_prefix_sticks_different_prefixes_spread() {
    let r = router();
    let system = "You are a helpful assistant. ".repeat(100);
    let mut first = None;
    for i in 0..20 {
        let p = r.pick(&[], &chat("m1", &format!("{system} question {i}")));
        let ep = p.endpoint().unwrap().to_string();
        assert_eq!(*first.get_or_insert(ep.clone()), ep, "request {i}");
        p.finish(200);
    }
    let mut seen = std::collections::HashSet::new();
    for i in 0..40 {
        let p = r.pick(
            &[],
            &chat("m1", &format!("unique prompt {i} {}", "x".repeat(600))),
        );
        seen.insert(p.endpoint().unwrap().to_string());
        p.finish(200);
    }
    assert_eq!(seen.len(), 4, "new prefixes spread over every endpoint");
}

#[test]
fn a_prefix_sticks_in_a_fleet_large_enough_for_candidate_percent_to_draw() {
    // 24 endpoints with the default candidate_percent (10 %: the best 2 share the draw): a
    // prompt's holder against an idle server that must compute it all is no draw.
    let endpoints: Vec<String> = (0..24)
        .map(|i| format!("\"127.0.0.1:{}\"", 9200 + i))
        .collect();
    let r = Router::from_json(
        format!(
            r#"{{"algorithm": "prefix_cost",
            "model_mapping_rule": {{"m": {{"rules": [{{"cluster": "c", "backend": "vllm"}}]}}}},
            "clusters": {{"c": {{"endpoints": [{}]}}}}}}"#,
            endpoints.join(",")
        )
        .as_bytes(),
    )
    .unwrap();
    let system = "You are a helpful assistant. ".repeat(100);
    let served: std::collections::HashSet<String> = (0..40)
        .map(|i| {
            let p = r.pick(&[], &chat("m", &format!("{system} question {i}")));
            let ep = p.endpoint().unwrap().to_string();
            p.finish(200);
            ep
        })
        .collect();
    assert_eq!(served.len(), 1, "{served:?}");
}

/// A streamed answer carrying `text`, in events of 7 characters.
fn sse_answer(text: &str) -> Vec<u8> {
    let mut out = String::new();
    let chars: Vec<char> = text.chars().collect();
    for piece in chars.chunks(7) {
        let piece: String = piece.iter().collect();
        let event = serde_json::json!({"choices": [{"index": 0, "delta": {"content": piece}}]});
        out.push_str(&format!("data: {event}\n\n"));
    }
    out.push_str("data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":40,\"completion_tokens\":150,\"prompt_tokens_details\":{\"cached_tokens\":16}}}\n\ndata: [DONE]\n\n");
    out.into_bytes()
}

/// First turn answered by the chosen endpoint, then the second turn (which sends the
/// answer back): (first endpoint, second endpoint, second cache ratio, metrics page).
fn two_turns(learn_bytes: usize) -> (String, String, f64, String) {
    let r = Router::from_json(
        format!(
            r#"{{"hash_chunk_bytes": 64, "learn_response_bytes": {learn_bytes},
            "model_mapping_rule": {{"m": {{"rules": [{{"cluster": "c", "backend": "vllm"}}]}}}},
            "clusters": {{"c": {{"endpoints": ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4"]}}}}}}"#
        )
        .as_bytes(),
    )
    .unwrap();
    let question = "Tell me a long story about a lighthouse keeper.";
    let reply = "Once upon a time, on a rocky island, there lived a keeper named Ada. ".repeat(10);
    let mut first = r.pick(&[(b":path", b"/v1/chat/completions")], &chat("m", question));
    let first_ep = first.endpoint().unwrap().to_string();
    for piece in sse_answer(&reply).chunks(13) {
        first.observe_response(piece, false);
    }
    first.observe_response(b"", true);
    first.finish(200);
    let body = serde_json::json!({"model": "m", "messages": [
        {"role": "user", "content": question},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "And then?"},
    ]})
    .to_string();
    let second = r.pick(&[], body.as_bytes());
    let out = (
        first_ep,
        second.endpoint().unwrap().to_string(),
        second.cache_ratio(),
        r.metrics_text(),
    );
    second.finish(200);
    out
}

#[test]
fn the_next_turn_follows_the_learned_answer() {
    // Second prompt: "<|user|>\n" question "\n<|assistant|>\n" reply "\n<|user|>\nAnd then?\n"
    // ≈ 800 bytes = 13 chunks of 64; the first prompt alone covers none of them in full
    // beyond its first; the learned answer covers all but the last two.
    for _ in 0..5 {
        let (a, b, ratio, page) = two_turns(64 * 1024);
        assert_eq!(a, b);
        assert!(ratio > 0.8, "cache ratio {ratio}");
        assert!(
            !page.contains("llmproxy_learned_response_chunks_total 0\n"),
            "{page}"
        );
        let labels = format!("model=\"m\",cluster=\"c\",endpoint=\"{a}\"");
        assert!(page.contains(&format!(
            "llmproxy_tokens_total{{{labels},kind=\"prompt\"}} 40\n"
        )));
        assert!(page.contains(&format!(
            "llmproxy_tokens_total{{{labels},kind=\"cached\"}} 16\n"
        )));
    }
    let (a, _, ratio, page) = two_turns(0);
    assert!(ratio < 0.2, "without learning: cache ratio {ratio}");
    assert!(page.contains("llmproxy_learned_response_chunks_total 0\n"));
    // the usage is read all the same
    let labels = format!("model=\"m\",cluster=\"c\",endpoint=\"{a}\"");
    assert!(
        page.contains(&format!(
            "llmproxy_tokens_total{{{labels},kind=\"prompt\"}} 40\n"
        )),
        "{page}"
    );
    // Capped: still the leading chunks of the answer.
    let (a, b, ratio, _) = two_turns(200);
    assert_eq!(a, b);
    assert!(ratio > 0.3 && ratio < 0.8, "capped: cache ratio {ratio}");
}

#[test]
fn failed_or_cut_answers_are_not_learned() {
    let r = Router::from_json(
        br#"{"hash_chunk_bytes": 16,
        "model_mapping_rule": {"m": {"rules": [{"cluster": "c", "backend": "vllm"}]}},
        "clusters": {"c": {"endpoints": ["127.0.0.1:1", "127.0.0.1:2"]}}}"#,
    )
    .unwrap();
    let answer = sse_answer(&"word ".repeat(40));
    for (status, cut) in [(500, answer.len()), (200, answer.len() / 2)] {
        let mut p = r.pick(&[], &chat("m", "hello"));
        p.observe_response(&answer[..cut], true);
        p.finish(status);
    }
    let mut p = r.pick(&[], &chat("m", "hello"));
    p.observe_response(&answer, true);
    p.finish_with(200, Outcome::Local);
    assert!(r
        .metrics_text()
        .contains("llmproxy_learned_response_chunks_total 0\n"));
}

#[test]
fn load_steers_away_from_busy_endpoints() {
    let r = router();
    // Hold 20 requests with the same prefix in flight: load must spread them.
    let system = "shared system prompt ".repeat(200);
    let held: Vec<_> = (0..20)
        .map(|i| r.pick(&[], &chat("m1", &format!("{system}{i}"))))
        .collect();
    let mut per = std::collections::HashMap::new();
    for p in &held {
        *per.entry(p.endpoint().unwrap().to_string()).or_insert(0) += 1;
    }
    assert!(per.len() >= 3, "{per:?}");
    assert!(per.values().all(|&n| n <= 10), "{per:?}");
    assert_eq!(r.in_flight(), 20);
    drop(held);
    assert_eq!(r.in_flight(), 0);
}

#[test]
fn first_token_and_finish_release_accounting() {
    let r = router();
    let mut p = r.pick(&[], &chat("m1", &"y".repeat(5000)));
    let ep = p.endpoint().unwrap().to_string();
    let metrics = r.metrics_text();
    assert!(
        metrics.contains(&format!(
            "llmproxy_endpoint_in_flight_requests{{cluster=\"prod\",endpoint=\"{ep}\"}} 1"
        )),
        "{metrics}"
    );
    assert!(metrics.contains(&format!(
        "llmproxy_endpoint_prefill_chars{{cluster=\"prod\",endpoint=\"{ep}\"}} {}",
        p.prompt_chars()
    )));
    p.first_token();
    p.first_token();
    assert!(r.metrics_text().contains(&format!(
        "llmproxy_endpoint_prefill_chars{{cluster=\"prod\",endpoint=\"{ep}\"}} 0"
    )));
    p.finish(200);
    let metrics = r.metrics_text();
    assert!(metrics.contains("llmproxy_in_flight_requests 0"));
    assert!(metrics.contains("llmproxy_finished_requests_total{status=\"2xx\"} 1"));
    assert!(
        metrics
            .contains("llmproxy_time_to_first_token_seconds_count{model=\"m1\",cluster=\"prod\""),
        "{metrics}"
    );
}

#[test]
fn an_answer_not_streamed_leaves_prefill_when_a_later_streamed_one_starts() {
    let r = router();
    let gray = [(b"x-env".as_slice(), b"gray".as_slice())];
    let body = |stream: bool, text: &str| {
        serde_json::json!({"model": "m1", "stream": stream, "messages": [{"role": "user", "content": text}]})
            .to_string()
            .into_bytes()
    };
    let prefill = |r: &Router| {
        let m = r.metrics_text();
        let line = "llmproxy_endpoint_prefill_chars{cluster=\"gray\",endpoint=\"127.0.0.1:9101\"} ";
        let at = m.find(line).unwrap_or_else(|| panic!("{m}")) + line.len();
        m[at..].split('\n').next().unwrap().parse::<u64>().unwrap()
    };
    let mut whole = r.pick(&gray, &body(false, &"w".repeat(4000)));
    let mut streamed = r.pick(&gray, &body(true, &"s".repeat(100)));
    assert!(!whole.is_stream() && streamed.is_stream());
    assert_eq!(prefill(&r), whole.prompt_chars() + streamed.prompt_chars());
    streamed.first_token();
    assert_eq!(
        prefill(&r),
        0,
        "the one picked before is past its prefill too"
    );
    let mut later = r.pick(&gray, &body(false, &"l".repeat(1000)));
    assert_eq!(
        prefill(&r),
        later.prompt_chars(),
        "a pick after the first token stays"
    );
    whole.first_token(); // its whole answer arrives: it was picked before `later`
    assert_eq!(prefill(&r), later.prompt_chars());
    later.first_token();
    assert_eq!(prefill(&r), 0);
    for p in [whole, streamed, later] {
        p.finish(200);
    }
    assert_eq!(r.in_flight(), 0);
    assert_eq!(prefill(&r), 0);
}

#[test]
fn only_the_endpoints_own_failures_eject_it() {
    let r = Router::from_json(br#"{"algorithm": "round_robin", "ejection": {"consecutive_failures": 2, "eject_ms": 60000},
        "model_mapping_rule": {"m": {"rules": [{"cluster": "c", "backend": "vllm"}]}},
        "clusters": {"c": {"endpoints": ["127.0.0.1:1"]}}}"#).unwrap();
    let ejected = |r: &Router| {
        r.metrics_text()
            .contains("llmproxy_endpoint_ejected{cluster=\"c\",endpoint=\"127.0.0.1:1\"} 1")
    };
    // What a client or the proxy causes: route timeouts, local replies, a client gone.
    for (status, outcome) in [
        (504, Outcome::Local),
        (503, Outcome::Local),
        (499, Outcome::Local),
        (0, Outcome::Local),
        (500, Outcome::Upstream),
        (499, Outcome::Upstream),
    ] {
        r.pick(&[], &chat("m", "x")).finish_with(status, outcome);
        assert!(!ejected(&r), "{status} {outcome:?} ejected the endpoint");
    }
    // What the endpoint does: a connect failure / reset before any byte, its own 503.
    r.pick(&[], &chat("m", "x"))
        .finish_with(503, Outcome::EndpointFailed);
    assert!(!ejected(&r));
    r.pick(&[], &chat("m", "x"))
        .finish_with(502, Outcome::Upstream);
    assert!(ejected(&r), "two endpoint failures in a row eject it");
}

#[test]
#[cfg_attr(
    miri,
    ignore = "wall-clock timing: under Miri 10 picks outlast eject_ms"
)]
fn failing_endpoint_is_ejected_then_readmitted() {
    let r = Router::from_json(
        br#"{"algorithm": "round_robin", "ejection": {"consecutive_failures": 2, "eject_ms": 200},
        "model_mapping_rule": {"m": {"rules": [{"cluster": "c", "backend": "vllm"}]}},
        "clusters": {"c": {"endpoints": ["127.0.0.1:1", "127.0.0.1:2"]}}}"#,
    )
    .unwrap();
    for _ in 0..4 {
        let p = r.pick(&[], &chat("m", "x"));
        let bad = p.endpoint() == Some("127.0.0.1:1");
        p.finish(if bad { 503 } else { 200 });
    }
    for _ in 0..10 {
        let p = r.pick(&[], &chat("m", "x"));
        assert_eq!(p.endpoint(), Some("127.0.0.1:2"));
        p.finish(200);
    }
    std::thread::sleep(std::time::Duration::from_millis(250));
    let seen: std::collections::HashSet<_> = (0..10)
        .map(|_| {
            let p = r.pick(&[], &chat("m", "x"));
            let e = p.endpoint().unwrap().to_string();
            p.finish(200);
            e
        })
        .collect();
    assert!(seen.contains("127.0.0.1:1"), "re-admitted after eject_ms");
}

#[test]
fn retry_moves_to_an_untried_endpoint_until_none_left() {
    let r = router();
    let mut p = r.pick(&[(b"x-env", b"gray")], &chat("m1", "x"));
    assert_eq!(p.endpoint(), Some("127.0.0.1:9101"));
    let e = p.retry().unwrap_err();
    assert_eq!(e.http_status(), 503);
    assert_eq!(p.http_status(), 503);
    assert_eq!(r.in_flight(), 0);
    p.finish(0);

    let mut p = r.pick(&[], &chat("m1", "x"));
    let mut tried = vec![p.endpoint().unwrap().to_string()];
    while p.retry().is_ok() {
        let ep = p.endpoint().unwrap().to_string();
        assert!(!tried.contains(&ep));
        tried.push(ep);
        assert_eq!(r.in_flight(), 1);
    }
    assert_eq!(tried.len(), 4);
    p.finish(0);
    assert_eq!(r.in_flight(), 0);
}

#[test]
fn set_endpoints_keeps_state_of_staying_endpoints() {
    let r = router();
    let held = r.pick(&[(b"x-env", b"gray")], &chat("m1", "x"));
    r.set_endpoints(
        "gray",
        &[
            "127.0.0.1:9101".parse().unwrap(),
            "127.0.0.1:9102".parse().unwrap(),
        ],
    );
    assert!(r.metrics_text().contains(
        "llmproxy_endpoint_in_flight_requests{cluster=\"gray\",endpoint=\"127.0.0.1:9101\"} 1"
    ));
    r.set_endpoints("gray", &["127.0.0.1:9102".parse().unwrap()]);
    held.finish(200);
    assert_eq!(r.in_flight(), 0);
    assert_eq!(r.endpoints("gray"), vec!["127.0.0.1:9102"]);
}

#[test]
fn intercepts_only_post_to_configured_paths() {
    let r = router();
    assert!(r.should_intercept(b"POST", b"/v1/chat/completions"));
    assert!(r.should_intercept(b"post", b"/v1/completions?x=1"));
    assert!(!r.should_intercept(b"GET", b"/v1/chat/completions"));
    assert!(!r.should_intercept(b"POST", b"/v1/embeddings"));
}

/// Two routers attached to one region, as two nginx workers are.
fn shared_pair() -> (Router, Router, Arc<SharedState>) {
    let region = SharedState::create(crate::state::shared::MIN_SIZE).unwrap();
    let config = || Config::from_json(CONFIG.as_bytes()).unwrap();
    let a = Router::new_shared(config(), &region).unwrap();
    let b = Router::new_shared(config(), &region).unwrap();
    (a, b, region)
}

#[test]
#[cfg_attr(
    miri,
    ignore = "starts the reaper thread and scans the region: slow under Miri"
)]
fn routers_on_one_shared_region_share_prefixes_and_load() {
    let (a, b, region) = shared_pair();
    // A prefix learned by one router is followed by the other.
    let system = "You are a helpful assistant. ".repeat(100);
    let first = a.pick(&[], &chat("m1", &format!("{system} question 0")));
    let home = first.endpoint().unwrap().to_string();
    first.finish(200);
    for i in 1..10 {
        let p = b.pick(&[], &chat("m1", &format!("{system} question {i}")));
        assert_eq!(p.endpoint().unwrap(), home, "request {i}");
        p.finish(200);
    }
    assert!(b.prefix_index_len() > 0 && a.prefix_index_len() == b.prefix_index_len());
    // Load held by one router is seen by the other (and counted once).
    let held: Vec<_> = (0..6)
        .map(|i| a.pick(&[], &chat("m1", &format!("load {i} {}", "y".repeat(500)))))
        .collect();
    assert_eq!(region.total_in_flight(), 6);
    let seen_by_b = b.metrics_part(Part::State);
    let in_flight: u64 = seen_by_b
        .lines()
        .filter(|l| l.starts_with("llmproxy_endpoint_in_flight_requests{cluster=\"prod\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(in_flight, 6, "{seen_by_b}");
    assert!(!b
        .metrics_part(Part::Router)
        .contains("llmproxy_endpoint_in_flight"));
    assert!(seen_by_b.contains("llmproxy_shared_state_workers 2"));
    drop(held);
    assert_eq!(region.total_in_flight(), 0);
    // Detached routers free their worker slots.
    drop((a, b));
    assert_eq!(region.stats().workers, 0);
}

#[test]
#[cfg_attr(miri, ignore = "starts the reaper thread: slow under Miri")]
fn a_region_without_free_worker_slots_refuses_a_router() {
    let region = SharedState::create(crate::state::shared::MIN_SIZE).unwrap();
    let config = || Config::from_json(CONFIG.as_bytes()).unwrap();
    let held: Vec<Router> = (0..crate::state::shared::MAX_WORKERS)
        .map(|_| Router::new_shared(config(), &region).unwrap())
        .collect();
    let err = Router::new_shared(config(), &region).err().unwrap();
    assert!(err.contains("worker slots"), "{err}");
    drop(held);
    assert!(Router::new_shared(config(), &region).is_ok());
}

#[test]
fn force_stream_usage_counts_streams_whose_clients_did_not_ask_for_usage() {
    let config = |force: bool| {
        format!(
            r#"{{"force_stream_usage": {force}, "learn_response_bytes": 0,
            "model_mapping_rule": {{"m": {{"rules": [{{"cluster": "c", "backend": "vllm"}}]}}}},
            "clusters": {{"c": {{"endpoints": ["127.0.0.1:1"]}}}}}}"#
        )
    };
    let body = br#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let answer = sse_answer("Hello there, how are you?");
    for force in [false, true] {
        let r = Router::from_json(config(force).as_bytes()).unwrap();
        let mut p = r.pick(&[(b":path", b"/v1/chat/completions")], body);
        let upstream = p
            .upstream_body()
            .map(|b| serde_json::from_slice::<serde_json::Value>(b).unwrap());
        assert_eq!(
            upstream
                .as_ref()
                .map(|v| v["stream_options"]["include_usage"].clone()),
            force.then_some(serde_json::Value::Bool(true)),
        );
        assert_eq!(p.needs_transcoding(), force);
        // the server answers as asked: usage in its last chunk only when include_usage was set
        let sent = if force {
            let text = String::from_utf8(answer.clone()).unwrap();
            text.replace("data: [DONE]", "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7}}\n\ndata: [DONE]")
        } else {
            String::from_utf8(answer.clone()).unwrap()
        };
        let mut client = Vec::new();
        for piece in sent.as_bytes().chunks(11) {
            let out = p.transcode_response(piece, false).map(<[u8]>::to_vec);
            client.extend(out.unwrap_or_else(|| piece.to_vec()));
        }
        client.extend(
            p.transcode_response(b"", true)
                .map(<[u8]>::to_vec)
                .unwrap_or_default(),
        );
        p.finish(200);
        // the client gets the stream it asked for; the usage is counted either way it came
        assert_eq!(
            String::from_utf8(client).unwrap(),
            String::from_utf8(answer.clone()).unwrap()
        );
        let page = r.metrics_text();
        let prompt = if force { 5 } else { 40 };
        let line = format!("llmproxy_tokens_total{{model=\"m\",cluster=\"c\",endpoint=\"127.0.0.1:1\",kind=\"prompt\"}} {prompt}\n");
        assert!(page.contains(&line), "{line} not in {page}");
    }
}

/// The value of the sample `name` (with its labels, if any) on a metrics page.
fn sample(page: &str, name: &str) -> f64 {
    let line = page
        .lines()
        .find(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' '))
        })
        .unwrap_or_else(|| panic!("no sample {name} in\n{page}"));
    line[name.len() + 1..].parse().unwrap()
}

mod cache_feedback;
mod responses;
mod sessions;
