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
