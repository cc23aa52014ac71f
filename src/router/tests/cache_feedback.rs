//! What the answers' `usage` teaches about each endpoint's cache (`cache_feedback`,
//! `cache_residency`, `eviction_pressure`): the cache trust, the learned capacity, the
//! eviction share.

use super::*;

#[test]
fn answers_correct_what_the_index_claims_and_measure_its_error() {
    // One endpoint whose engine keeps nothing: every answer after the first reports 0 cached
    // tokens while the index claims most of each prompt (a shared system prompt). The first
    // reports one cached token (the engine says what it holds) — or, for an engine that fills
    // the field with 0 whatever it holds, it too reports 0: its zeros are not its word.
    let answer = br#"{"choices":[{"index":0,"message":{"content":"ok"}}],"usage":{"prompt_tokens":200,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":0}}}"#;
    let a_hit = br#"{"choices":[{"index":0,"message":{"content":"ok"}}],"usage":{"prompt_tokens":200,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":1}}}"#;
    let system = "shared system prompt, ".repeat(40);
    for (feedback, reports_hits) in [(true, true), (false, true), (true, false)] {
        let r = Router::from_json(
            format!(
                r#"{{"hash_chunk_bytes": 64, "cache_feedback": {feedback},
                "model_mapping_rule": {{"m": {{"rules": [{{"cluster": "c", "backend": "vllm"}}]}}}},
                "clusters": {{"c": {{"endpoints": ["127.0.0.1:1"]}}}}}}"#
            )
            .as_bytes(),
        )
        .unwrap();
        let mut last_expected = 0.0;
        for i in 0..64 {
            let mut p = r.pick(&[], &chat("m", &format!("{system} question {i}")));
            last_expected = p.routed().unwrap().expected_cache_ratio;
            let first_hit = i == 0 && reports_hits;
            p.observe_response(if first_hit { a_hit } else { answer }, true);
            p.finish(200);
        }
        let page = r.metrics_text();
        let trust = sample(
            &page,
            r#"llmproxy_endpoint_cache_trust{cluster="c",endpoint="127.0.0.1:1"}"#,
        );
        let errors = sample(&page, "llmproxy_cache_prediction_error_count");
        let small = sample(
            &page,
            r#"llmproxy_cache_prediction_error_bucket{le="0.25"}"#,
        );
        assert_eq!(errors, 64.0, "every answer measured");
        if feedback && reports_hits {
            // 63 answers at 0 kept: (1 − 1/32)^63 ≈ 0.14
            assert!((0.1..0.2).contains(&trust), "trust {trust}");
            assert!(last_expected < 0.2, "expected {last_expected}");
            assert!(
                small >= 20.0,
                "the corrected prediction's errors shrink: {small}"
            );
        } else {
            assert_eq!(
                trust, 1.0,
                "feedback {feedback}, reports hits {reports_hits}"
            );
            assert!(
                last_expected > 0.9,
                "the index's claim as is: {last_expected}"
            );
            assert_eq!(small, 1.0, "only the first (claimed nothing, had nothing)");
        }
    }
}

/// An answer whose engine wrote 50,000 prompt tokens and had none of them cached.
const EVICTED_ANSWER: &[u8] = br#"{"choices":[{"index":0,"message":{"content":"ok"}}],"usage":{"prompt_tokens":50000,"completion_tokens":0,"prompt_tokens_details":{"cached_tokens":0}}}"#;

/// An answer whose engine wrote 49,984 prompt tokens and had 16 cached: an engine that
/// reports its hits, so that its later zeros count (`AnswerStats::reports_cache_hits`).
const FIRST_ANSWER: &[u8] = br#"{"choices":[{"index":0,"message":{"content":"ok"}}],"usage":{"prompt_tokens":50000,"completion_tokens":0,"prompt_tokens_details":{"cached_tokens":16}}}"#;

/// A router over one endpoint of cluster `c` for model `m`, 64-byte chunks, with `settings`
/// (top-level keys, each followed by a comma).
fn solo_router(settings: &str) -> Router {
    let config = format!(
        r#"{{"hash_chunk_bytes": 64, {settings}
        "model_mapping_rule": {{"m": {{"rules": [{{"cluster": "c", "backend": "vllm"}}]}}}},
        "clusters": {{"c": {{"endpoints": ["127.0.0.1:1"]}}}}}}"#
    );
    Router::from_json(config.as_bytes()).unwrap()
}

#[test]
fn a_prefix_past_its_endpoints_cache_residency_no_longer_counts() {
    // One endpoint whose answers write 50,000 tokens into a 1,000-token cache in the first
    // ~2 s: what it served then has been evicted since (horizon ≈ 40 ms), and the index says
    // so only with cache_residency.
    let system = "shared system prompt, ".repeat(40);
    let routers: Vec<(bool, Router)> = [true, false]
        .into_iter()
        .map(|residency| {
            let settings = format!(
                r#""cache_feedback": false, "cache_residency": {residency}, "cache_capacity_tokens": 1000,"#
            );
            (residency, solo_router(&settings))
        })
        .collect();
    let next = chat("m", &format!("{system} question 1"));
    for (_, r) in &routers {
        // no write rate yet: other gateways' claims are asked for up to the server's TTL
        let routed = r.inner.prepare(&[], &next).unwrap();
        assert!(r
            .inner
            .remote_claim_max_ages(&routed.cluster.snapshot())
            .is_empty());
        let mut p = r.pick(&[], &chat("m", &format!("{system} question 0")));
        p.observe_response(EVICTED_ANSWER, true);
        p.finish(200);
    }
    std::thread::sleep(std::time::Duration::from_millis(2_100));
    for (residency, r) in &routers {
        // the Metadata-Center's claims are aged like the index's (the cache query's max_age_ms)
        let routed = r.inner.prepare(&[], &next).unwrap();
        let max_ages = r.inner.remote_claim_max_ages(&routed.cluster.snapshot());
        let p = r.pick(&[], &next);
        let ratio = p.routed().unwrap().cache_ratio;
        if *residency {
            let ms = max_ages.get("127.0.0.1:1");
            assert!(ms.is_some_and(|&ms| ms < 100), "{max_ages:?}");
            assert_eq!(ratio, 0.0, "evicted since");
            let page = r.metrics_text();
            let horizon = sample(
                &page,
                r#"llmproxy_endpoint_cache_residency_seconds{cluster="c",endpoint="127.0.0.1:1"}"#,
            );
            assert!(horizon < 0.1, "horizon {horizon} s");
        } else {
            assert!(max_ages.is_empty());
            assert!(ratio > 0.8, "the index at its word: {ratio}");
        }
    }
}

#[test]
fn an_endpoints_cache_capacity_is_learned_from_its_answers() {
    // No capacity from the engine or the config. Each answer writes 50,000 tokens; the
    // second pick finds the first prompt's system prompt listed 2.1 s after its use and the
    // engine reports it evicted (cached_tokens 0): the capacity is about what was written
    // since, and from then on a prefix used longer ago than capacity / write rate no longer
    // counts. Without cache_feedback nothing is learned and the index is taken at its word;
    // nor from an engine that has never reported a hit (its zeros are not its word).
    let system = "shared system prompt, ".repeat(40);
    let routers: Vec<(bool, bool, Router)> = [(true, true), (false, true), (true, false)]
        .into_iter()
        .map(|(feedback, reports_hits)| {
            let r = solo_router(&format!(r#""cache_feedback": {feedback},"#));
            (feedback, reports_hits, r)
        })
        .collect();
    let learned = |r: &Router| {
        let page = r.metrics_text();
        let name = r#"llmproxy_endpoint_learned_cache_capacity_tokens{cluster="c",endpoint="127.0.0.1:1"}"#;
        page.contains(name).then(|| sample(&page, name))
    };
    for (_, reports_hits, r) in &routers {
        let mut p = r.pick(&[], &chat("m", &format!("{system} question 0")));
        p.observe_response(
            if *reports_hits {
                FIRST_ANSWER
            } else {
                EVICTED_ANSWER
            },
            true,
        );
        p.finish(200);
    }
    std::thread::sleep(std::time::Duration::from_millis(2_100));
    for (feedback, reports_hits, r) in &routers {
        let mut p = r.pick(&[], &chat("m", &format!("{system} question 1")));
        assert!(p.routed().unwrap().cache_ratio > 0.8, "nothing learned yet");
        p.observe_response(EVICTED_ANSWER, true);
        p.finish(200);
        if *feedback && *reports_hits {
            // 2.1 s at about 50,000 tokens per 2.1 s
            let tokens = learned(r).expect("learned from the eviction");
            assert!((40_000.0..60_000.0).contains(&tokens), "{tokens}");
        } else {
            assert_eq!(learned(r), None);
        }
    }
    // 3 s later the second prompt's use is older than the learned horizon (~2.3 s)
    std::thread::sleep(std::time::Duration::from_millis(3_000));
    for (feedback, reports_hits, r) in &routers {
        let p = r.pick(&[], &chat("m", &format!("{system} question 2")));
        let ratio = p.routed().unwrap().cache_ratio;
        if *feedback && *reports_hits {
            assert_eq!(ratio, 0.0, "evicted by what was written since");
        } else {
            assert!(ratio > 0.8, "the index at its word: {ratio}");
        }
    }
}

#[test]
fn an_endpoints_eviction_share_is_measured_from_its_answers_with_eviction_pressure() {
    // The capacity is given (nothing to learn), so only eviction_pressure walks the claim
    // (once the endpoint's answers report cached_tokens). The second prompt repeats the
    // first's system prompt 1.1 s later and the engine had evicted it: of the 50,000 tokens
    // it writes, the claimed share (~93 %) recomputes what the engine had.
    let system = "shared system prompt, ".repeat(40);
    let share = |r: &Router| {
        let page = r.metrics_text();
        sample(
            &page,
            r#"llmproxy_endpoint_cache_eviction_share{cluster="c",endpoint="127.0.0.1:1"}"#,
        )
    };
    let routers: Vec<(bool, Router)> = [true, false]
        .into_iter()
        .map(|on| {
            let settings =
                format!(r#""eviction_pressure": {on}, "cache_capacity_tokens": 1000000,"#);
            (on, solo_router(&settings))
        })
        .collect();
    for (_, r) in &routers {
        let mut p = r.pick(&[], &chat("m", &format!("{system} question 0")));
        p.observe_response(FIRST_ANSWER, true);
        p.finish(200);
        assert_eq!(
            share(r),
            0.0,
            "new content evicts nothing known to be reused"
        );
    }
    std::thread::sleep(std::time::Duration::from_millis(1_100));
    for (on, r) in &routers {
        let mut p = r.pick(&[], &chat("m", &format!("{system} question 1")));
        p.observe_response(EVICTED_ANSWER, true);
        p.finish(200);
        if *on {
            let share = share(r);
            assert!((0.85..0.98).contains(&share), "{share}");
        } else {
            assert_eq!(share(r), 0.0, "not measured without eviction_pressure");
        }
    }
}
