//! The Responses API: a request naming `previous_response_id` goes to the endpoint that
//! stored that answer, whatever its load.

use super::*;

fn router() -> Router {
    Router::from_json(
        br#"{"model_mapping_rule": {"m": {"rules": [{"cluster": "c", "backend": "vllm"}]}},
            "clusters": {"c": {"endpoints": ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4"]}}}"#,
    )
    .unwrap()
}

const PATH: [(&[u8], &[u8]); 1] = [(b":path", b"/v1/responses")];

/// A request of `input` (no prefix shared with any other), continuing `previous`.
fn turn(input: &str, previous: Option<&str>) -> Vec<u8> {
    let mut body =
        serde_json::json!({"model": "m", "input": format!("{input} {}", "q".repeat(600))});
    if let Some(id) = previous {
        body["previous_response_id"] = id.into();
    }
    body.to_string().into_bytes()
}

/// Answers `p` with the stored answer `id` (a whole answer, or a stream) and finishes it.
fn answer(mut p: PickedRequest, id: &str, stream: bool) {
    let body = if stream {
        format!(
            "event: response.created\ndata: {{\"type\":\"response.created\",\"response\":{{\"id\":\"{id}\"}}}}\n\n\
             data: {{\"type\":\"response.output_text.delta\",\"delta\":\"ok\"}}\n\n\
             data: {{\"type\":\"response.completed\",\"response\":{{\"id\":\"{id}\",\"usage\":{{\"input_tokens\":9,\"output_tokens\":1}}}}}}\n\n"
        )
    } else {
        format!(
            r#"{{"id":"{id}","output":[{{"type":"message","content":[{{"type":"output_text","text":"ok"}}]}}],"usage":{{"input_tokens":9,"output_tokens":1}}}}"#
        )
    };
    for piece in body.as_bytes().chunks(5) {
        p.observe_response(piece, false);
    }
    p.observe_response(b"", true);
    p.finish(200);
}

/// `llmproxy_response_chains_total` by result: (pinned, unknown).
fn chain_counts(r: &Router) -> (f64, f64) {
    let page = r.metrics_text();
    let n = |result: &str| {
        sample(
            &page,
            &format!("llmproxy_response_chains_total{{result=\"{result}\"}}"),
        )
    };
    (n("pinned"), n("unknown"))
}

#[test]
fn a_chain_stays_on_the_endpoint_that_stored_it_however_busy() {
    let r = router();
    let first = r.pick(&PATH, &turn("turn 0", None));
    let home = first.endpoint().unwrap().to_string();
    answer(first, "resp_0", false);
    // the home endpoint is by far the busiest: an algorithm would send anything else away
    // (held on every endpoint, then finished everywhere else)
    let held: Vec<PickedRequest> = (0..48)
        .map(|i| r.pick(&[], &chat("m", &format!("load {i} {}", "z".repeat(2000)))))
        .collect();
    let (busy, others): (Vec<_>, Vec<_>) = held
        .into_iter()
        .partition(|p| p.endpoint() == Some(home.as_str()));
    others.into_iter().for_each(|p| p.finish(200));
    assert!(busy.len() >= 8, "{} held on the home endpoint", busy.len());
    let mut previous = "resp_0".to_string();
    for i in 1..=20 {
        let p = r.pick(&PATH, &turn(&format!("turn {i}"), Some(&previous)));
        assert_eq!(p.endpoint(), Some(home.as_str()), "turn {i}");
        previous = format!("resp_{i}");
        answer(p, &previous, i % 2 == 0);
    }
    assert_eq!(chain_counts(&r), (20.0, 0.0));
    // the same requests without the chain go where the load says
    let elsewhere = (0..8)
        .filter(|i| {
            let p = r.pick(&PATH, &turn(&format!("new {i}"), None));
            let moved = p.endpoint() != Some(home.as_str());
            p.finish(200);
            moved
        })
        .count();
    assert!(
        elsewhere >= 6,
        "{elsewhere} of 8 away from the busy endpoint"
    );
    drop(busy);
}

#[test]
fn an_unknown_or_unavailable_answer_is_routed_by_the_algorithm() {
    let r = router();
    let p = r.pick(&PATH, &turn("never stored here", Some("resp_elsewhere")));
    assert!(p.endpoint().is_some());
    p.finish(200);
    assert_eq!(chain_counts(&r), (0.0, 1.0));
    // the endpoint that stored it is tried and failed: the retry goes elsewhere
    let first = r.pick(&PATH, &turn("a", None));
    let home = first.endpoint().unwrap().to_string();
    answer(first, "resp_a", true);
    let mut p = r.pick(&PATH, &turn("b", Some("resp_a")));
    assert_eq!(p.endpoint(), Some(home.as_str()));
    p.retry().unwrap();
    assert_ne!(p.endpoint(), Some(home.as_str()));
    p.finish(200);
    assert_eq!(chain_counts(&r), (1.0, 2.0));
}

#[test]
fn an_answer_is_bound_from_its_first_bytes_before_it_is_finished() {
    // The client may name the id as soon as it has read it: the next turn can be picked
    // (by another worker) before this request's finish has run.
    let r = router();
    let mut first = r.pick(&PATH, &turn("early", None));
    let home = first.endpoint().unwrap().to_string();
    first.observe_response(br#"{"id":"resp_early","object":"resp"#, false);
    let next = r.pick(&PATH, &turn("next", Some("resp_early")));
    assert_eq!(next.endpoint(), Some(home.as_str()));
    assert_eq!(chain_counts(&r), (1.0, 0.0));
    next.finish(200);
    first.finish(200);
}

/// `llmproxy_stored_response_requests_total` by result: (pinned, unknown).
fn stored_counts(r: &Router) -> (f64, f64) {
    let page = r.metrics_text();
    let n = |result: &str| {
        let name = format!("llmproxy_stored_response_requests_total{{result=\"{result}\"}}");
        sample(&page, &name)
    };
    (n("pinned"), n("unknown"))
}

/// The `:method` and `:path` headers of a request.
fn on<'a>(method: &'a str, path: &'a str) -> [(&'a [u8], &'a [u8]); 2] {
    [(b":method", method.as_bytes()), (b":path", path.as_bytes())]
}

#[test]
fn requests_on_a_stored_answer_go_to_the_endpoint_that_stored_it() {
    let r = router();
    let first = r.pick(&PATH, &turn("stored", None));
    let home = first.endpoint().unwrap().to_string();
    answer(first, "resp_s", true);
    // the home endpoint is the busiest: an algorithm would go elsewhere
    let busy: Vec<PickedRequest> = (0..6)
        .map(|i| r.pick(&[], &chat("m", &format!("load {i} {}", "z".repeat(2000)))))
        .filter(|p| p.endpoint() == Some(home.as_str()))
        .collect();
    let requests = [
        ("GET", "/v1/responses/resp_s"),
        ("GET", "/v1/responses/resp_s?stream=true&starting_after=3"),
        ("GET", "/v1/responses/resp_s/input_items"),
        ("POST", "/v1/responses/resp_s/cancel"),
        ("DELETE", "/v1/responses/resp_s"),
    ];
    for (method, path) in requests {
        assert!(
            r.should_intercept(method.as_bytes(), path.as_bytes()),
            "{method} {path}"
        );
        let mut p = r.pick(&on(method, path), b"");
        assert_eq!(p.error(), None, "{method} {path}");
        assert_eq!(p.endpoint(), Some(home.as_str()), "{method} {path}");
        assert_eq!(p.model(), Some("m"));
        assert_eq!((p.upstream_path(), p.upstream_body()), (None, None));
        assert!(!p.needs_transcoding());
        // the stored answer comes back as it was made: not counted, not learned, not timed
        p.first_token();
        p.observe_response(br#"{"id":"resp_s","usage":{"input_tokens":9}}"#, true);
        p.finish(200);
    }
    assert_eq!(stored_counts(&r), (5.0, 0.0));
    let page = r.metrics_text();
    let timed = page
        .lines()
        .filter(|l| l.starts_with("llmproxy_time_to_first_token_seconds_count"));
    assert_eq!(timed.count(), 0, "{page}");
    let prompt_tokens: f64 = page
        .lines()
        .filter(|l| l.starts_with("llmproxy_tokens_total{") && l.contains("kind=\"prompt\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(prompt_tokens, 9.0, "only the answer's own usage: {page}");
    drop(busy);
    assert_eq!(r.in_flight(), 0);
    // other methods and paths are not requests on a stored answer
    for (method, path) in [
        ("PUT", "/v1/responses/resp_s"),
        ("POST", "/v1/responses/resp_s"),
        ("GET", "/v1/responses/resp_s/other"),
        ("GET", "/v1/responses/"),
        ("GET", "/v1/responses"),
        ("GET", "/v1/chat/completions/resp_s"),
    ] {
        assert!(
            !r.should_intercept(method.as_bytes(), path.as_bytes()),
            "{method} {path}"
        );
    }
}

#[test]
fn a_stored_answer_this_gateway_does_not_know_passes_through() {
    let r = router();
    assert!(!r.should_intercept(b"GET", b"/v1/responses/resp_nowhere"));
    assert_eq!(stored_counts(&r), (0.0, 1.0));
    // (forgotten between should_intercept and the pick) nothing to answer: the host proxies
    // it untouched
    let p = r.pick(&on("GET", "/v1/responses/resp_nowhere"), b"");
    assert!(
        matches!(p.error(), Some(PickError::PassThrough { .. })),
        "{:?}",
        p.error()
    );
    assert_eq!((p.http_status(), p.endpoint()), (0, None));
    p.finish(200);
    assert_eq!(stored_counts(&r), (0.0, 2.0));
    assert_eq!(r.in_flight(), 0);
    let page = r.metrics_text();
    assert_eq!(
        sample(&page, "llmproxy_picks_total{outcome=\"passed_through\"}"),
        1.0
    );
}

#[test]
fn a_stored_answer_is_not_retried_on_another_endpoint() {
    // only its endpoint has it: a connect failure there is the client's 503, not another
    // engine's 404
    let r = router();
    let first = r.pick(&PATH, &turn("once", None));
    answer(first, "resp_once", false);
    let mut p = r.pick(&on("GET", "/v1/responses/resp_once"), b"");
    assert!(p.endpoint().is_some());
    assert_eq!(p.retry().unwrap_err().http_status(), 503);
    assert_eq!(p.endpoint(), None);
    p.finish(0);
    assert_eq!(r.in_flight(), 0);
}

#[test]
fn a_request_on_a_stored_answer_counts_under_the_first_model_of_its_cluster() {
    // several models served by one cluster: always the config's first (not a hash map's draw)
    let models: Vec<String> = (0..8)
        .map(|i| format!(r#""m{i}": {{"rules": [{{"cluster": "c", "backend": "vllm"}}]}}"#))
        .collect();
    let config = format!(
        r#"{{"model_mapping_rule": {{{}}}, "clusters": {{"c": {{"endpoints": ["127.0.0.1:1", "127.0.0.1:2"]}}}}}}"#,
        models.join(",")
    );
    let r = Router::from_json(config.as_bytes()).unwrap();
    let first = r.pick(&PATH, br#"{"model": "m5", "input": "hello"}"#);
    answer(first, "resp_m5", false);
    for _ in 0..3 {
        let p = r.pick(&on("GET", "/v1/responses/resp_m5"), b"");
        assert_eq!(p.model(), Some("m0"));
        p.finish(200);
    }
}
