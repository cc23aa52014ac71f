//! The request log's line: one JSON object per finished request (docs/usage.md, *Request
//! log*), rendered at finish on the request path and handed to the writer thread
//! ([`crate::background::log_writer`]), which never makes the request path wait.
//!
//! What the host must give is taken at pick (the `x-request-id` header, the body's size and,
//! with `log.include_prompt`, the prompt's text); the rest is the request's own record.

use std::time::{Instant, SystemTime};

use serde::Serialize;

use super::{HeaderRef, RouterInner};
use crate::config::RequestLog;

/// What a request's line needs from its pick, kept from pick to finish (only when the request
/// log is on).
pub(crate) struct LogContext {
    time: SystemTime,
    started: Instant,
    request_id: Option<String>,
    bytes_in: usize,
    prompt: Option<String>,
}

impl LogContext {
    /// The context of a request being picked, or `None` when the request log is off.
    pub(crate) fn capture(
        router: &RouterInner,
        headers: &[HeaderRef],
        body: &[u8],
    ) -> Option<Box<Self>> {
        let cfg = &router.config.log;
        if !cfg.enabled {
            return None;
        }
        let request_id = super::find_header(headers, "x-request-id")
            .map(|v| String::from_utf8_lossy(&v[..v.len().min(256)]).into_owned());
        Some(Box::new(Self {
            time: SystemTime::now(),
            started: Instant::now(),
            request_id,
            bytes_in: body.len(),
            prompt: cfg.include_prompt.then(|| prompt_text(body, cfg)),
        }))
    }
}

/// How a pick decided (`log.include_candidates`): what chose the endpoint and every candidate
/// as the scoring saw it. The last attempt's, when connect failures re-picked.
#[derive(Serialize)]
pub(crate) struct PickView {
    /// `algorithm`, `session` (`session_affinity` kept it) or `chain` (a Responses API
    /// conversation's endpoint).
    pub decided_by: &'static str,
    /// One entry per candidate, in the cluster's order.
    pub candidates: Vec<CandidateView>,
}

/// One candidate of a pick, as the algorithm weighed it (the load fields are absent for an
/// algorithm that reads no load).
#[derive(Serialize)]
pub(crate) struct CandidateView {
    /// `ip:port`.
    pub endpoint: String,
    /// Share of the prompt the pick expected it to hold (prefix index × cache trust).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_ratio: Option<f64>,
    /// Requests in flight there, this gateway's and the others' it knows of.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<u64>,
    /// Prompt characters in prefill there that it must compute.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uncached_prefill_chars: Option<u64>,
    /// Share of its cache writes that recompute evicted prefixes (`eviction_pressure`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eviction_share: Option<f64>,
    /// The algorithm's score (higher is better; `prefix_cost`: minus the cost in prompt
    /// characters); absent for algorithms that score nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
}

/// A finished request as the log shows it (absent fields are left out).
#[derive(Serialize)]
pub(crate) struct Line<'a> {
    pub time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_model: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scene: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<&'a str>,
    pub algorithm: &'a str,
    pub cache_ratio: f64,
    pub stream: bool,
    /// The status the host reported at finish (the endpoint's, or the client's for a local
    /// reply); 0 when there was none.
    pub status: u32,
    /// `upstream`, `endpoint_failed` or `local` (who ended the request).
    pub outcome: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<f64>,
    pub total_ms: f64,
    pub prompt_chars: u64,
    pub bytes_in: usize,
    /// Response bytes from the endpoint that the host handed to the library.
    pub bytes_out: u64,
    /// From the answer's `usage` (when the server sent it and `learn_response_bytes` > 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cached_tokens: Option<u64>,
    pub retries: u32,
    /// The pick's error (`error.type` of its OpenAI error) when it was not routed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<&'a str>,
    /// The answer's text (choice 0), only with `include_prompt`, cut like the prompt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion: Option<&'a str>,
    /// Only with `include_candidates`, when a pick chose among candidates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pick: Option<&'a PickView>,
}

impl LogContext {
    /// The line of a request that ends now, with what the context knows; the caller sets the
    /// rest and renders it with [`Line::render`].
    pub(crate) fn line(&self, first_token: Option<Instant>) -> Line<'_> {
        Line {
            time: humantime::format_rfc3339_millis(self.time).to_string(),
            request_id: self.request_id.as_deref(),
            model: None,
            upstream_model: None,
            scene: None,
            cluster: None,
            endpoint: None,
            algorithm: "",
            cache_ratio: 0.0,
            stream: false,
            status: 0,
            outcome: "local",
            ttft_ms: first_token.map(|t| ms(t.duration_since(self.started))),
            total_ms: ms(self.started.elapsed()),
            prompt_chars: 0,
            bytes_in: self.bytes_in,
            bytes_out: 0,
            prompt_tokens: None,
            completion_tokens: None,
            cached_tokens: None,
            retries: 0,
            error: None,
            prompt: self.prompt.as_deref(),
            completion: None,
            pick: None,
        }
    }
}

impl Line<'_> {
    /// The JSON line (without its newline).
    pub(crate) fn render(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// The prompt's text for the log (`log.include_prompt`): each chat message as `role: text`
/// on its own line, or the completion prompt; cut to `log.prompt_max_bytes` on a character
/// boundary. Parsed again from the body: this is an opt-in debugging aid, not the pick path.
fn prompt_text(body: &[u8], cfg: &RequestLog) -> String {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return String::new();
    };
    let mut text = String::new();
    if let Some(messages) = v.get("messages").and_then(|m| m.as_array()) {
        for m in messages {
            let role = m.get("role").and_then(|r| r.as_str()).unwrap_or("");
            text.push_str(role);
            text.push_str(": ");
            match m.get("content") {
                Some(serde_json::Value::String(s)) => text.push_str(s),
                Some(serde_json::Value::Array(parts)) => {
                    for p in parts.iter().filter_map(|p| p.get("text")?.as_str()) {
                        text.push_str(p);
                    }
                }
                _ => {}
            }
            text.push('\n');
            if text.len() > cfg.prompt_max_bytes {
                break;
            }
        }
    } else if let Some(p) = v.get("prompt") {
        match p {
            serde_json::Value::String(s) => text.push_str(s),
            other => text.push_str(&other.to_string()),
        }
    }
    truncate(&mut text, cfg.prompt_max_bytes);
    text
}

/// Cuts `s` to at most `max` bytes, on a character boundary.
pub(crate) fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::Value;

    use crate::router::{Outcome, Router};

    fn read_lines(path: &std::path::Path, n: usize) -> Vec<Value> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            if lines.len() >= n {
                return lines;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} of {n} lines: {text}",
                lines.len()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn every_finished_request_writes_one_line_with_its_record() {
        let dir = std::env::temp_dir().join(format!("llmproxy-reqlog-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("llm.log");
        let config = format!(
            r#"{{"model_mapping_rule": {{"m": {{"rules": [{{"cluster": "c", "backend": "vllm", "scene_name": "chat"}}]}}}},
                "clusters": {{"c": {{"endpoints": ["127.0.0.1:1", "127.0.0.1:2"]}}}},
                "log": {{"enabled": true, "path": {:?}, "include_prompt": true, "prompt_max_bytes": 12}}}}"#,
            path.to_str().unwrap()
        );
        let router = Router::from_json(config.as_bytes()).unwrap();
        // a client that asks for the usage chunk (one that did not would not get it)
        let body = br#"{"model": "m", "stream": true, "stream_options": {"include_usage": true}, "messages": [{"role": "user", "content": "hello there, router"}]}"#;
        let headers: &[crate::router::HeaderRef] = &[(b"X-Request-Id", b"req-1")];

        let mut ok = router.pick(headers, body);
        let first = ok.endpoint().unwrap().to_string();
        ok.retry().unwrap(); // connect failure: the other endpoint
        std::thread::sleep(Duration::from_millis(5));
        ok.first_token();
        let answer = concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi there\"}}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,",
            "\"prompt_tokens_details\":{\"cached_tokens\":4}}}\n\ndata: [DONE]\n\n"
        );
        ok.observe_response(answer.as_bytes(), true);
        ok.finish(200);
        router
            .pick(
                &[],
                br#"{"model": "nope", "messages": [{"role": "user", "content": "x"}]}"#,
            )
            .finish_with(404, Outcome::Local);

        let lines = read_lines(&path, 2);
        let l = &lines[0];
        assert_eq!(l["request_id"], "req-1");
        assert_eq!(l["model"], "m");
        assert_eq!(l["cluster"], "c");
        assert_eq!(l["scene"], "chat");
        assert_ne!(
            l["endpoint"].as_str().unwrap(),
            first,
            "the endpoint that answered"
        );
        assert_eq!(l["retries"], 1);
        assert_eq!(l["status"], 200);
        assert_eq!(l["outcome"], "upstream");
        assert_eq!(l["stream"], true);
        assert_eq!(l["algorithm"], "prefix_cost", "the default");
        assert_eq!(l["bytes_in"], body.len());
        assert!(l["ttft_ms"].as_f64().unwrap() >= 5.0);
        assert!(l["total_ms"].as_f64().unwrap() >= l["ttft_ms"].as_f64().unwrap());
        assert_eq!(l["prompt"], "user: hello ", "cut to prompt_max_bytes");
        assert_eq!(l["completion"], "hi there");
        assert_eq!(l["bytes_out"], answer.len());
        assert_eq!(l["prompt_tokens"], 7);
        assert_eq!(l["completion_tokens"], 2);
        assert_eq!(l["cached_tokens"], 4);
        assert!(l["time"].as_str().unwrap().ends_with('Z'));
        assert!(l.get("pick").is_none(), "only with include_candidates");
        let e = &lines[1];
        assert_eq!(e["error"], "model_not_found");
        assert_eq!(e["status"], 404);
        assert_eq!(e["outcome"], "local");
        assert!(e.get("request_id").is_none() && e.get("endpoint").is_none());
        let text = router.metrics_text();
        assert!(text.contains("llmproxy_request_log_lines_total{result=\"written\"} 2"));
        // the answer's usage per endpoint, beside the router's prediction, and its TPOT
        let ep = l["endpoint"].as_str().unwrap();
        let labels = format!("cluster=\"c\",endpoint=\"{ep}\"");
        for (kind, v) in [("prompt", 7), ("completion", 2), ("cached", 4)] {
            let model = l["model"].as_str().unwrap();
            let line =
                format!("llmproxy_tokens_total{{model=\"{model}\",{labels},kind=\"{kind}\"}} {v}");
            assert!(text.contains(&line), "{line} not in\n{text}");
        }
        let chars = l["prompt_chars"].as_u64().unwrap();
        let line = format!(
            "llmproxy_endpoint_answer_prompt_chars_total{{{labels},kind=\"prompt\"}} {chars}"
        );
        assert!(text.contains(&line), "{line}");
        let line = format!("llmproxy_endpoint_time_per_output_token_seconds_count{{{labels}}} 1");
        assert!(text.contains(&line), "{line} not in\n{text}");
        drop(router);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn include_candidates_logs_every_candidate_as_the_algorithm_weighed_it() {
        let dir = std::env::temp_dir().join(format!("llmproxy-reqlog-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("llm.log");
        let config = format!(
            r#"{{"model_mapping_rule": {{"m": {{"rules": [{{"cluster": "c", "backend": "vllm"}}]}}}},
                "clusters": {{"c": {{"endpoints": ["127.0.0.1:1", "127.0.0.1:2"]}}}},
                "log": {{"enabled": true, "path": {:?}, "include_candidates": true}}}}"#,
            path.to_str().unwrap()
        );
        let router = Router::from_json(config.as_bytes()).unwrap();
        let text = "a long shared document ".repeat(40);
        let body =
            format!(r#"{{"model": "m", "messages": [{{"role": "user", "content": "{text}"}}]}}"#);
        // the first is decoding (its prefill over) while the second is picked
        let mut first = router.pick(&[], body.as_bytes());
        let holder = first.endpoint().unwrap().to_string();
        first.first_token();
        let second = router.pick(&[], body.as_bytes());
        assert_eq!(
            second.endpoint().unwrap(),
            holder,
            "the prefix outweighs one request"
        );
        second.finish(200);
        first.finish(200);

        let lines = read_lines(&path, 2);
        let pick = &lines[0]["pick"];
        assert_eq!(pick["decided_by"], "algorithm");
        let candidates = pick["candidates"].as_array().unwrap();
        assert_eq!(candidates.len(), 2, "{pick}");
        let prompt = lines[0]["prompt_chars"].as_f64().unwrap();
        let get = |c: &Value, k: &str| c[k].as_f64().unwrap();
        for c in candidates {
            // the logged score is prefix_cost's, from the logged load (default weights)
            let held = get(c, "cache_ratio");
            let q = get(c, "in_flight");
            let own = prompt * (1.0 - held) / (1.0 - get(c, "eviction_share")) * (1.0 + 0.5 * q);
            let cost = own + get(c, "uncached_prefill_chars") + 128.0 * q;
            assert!((get(c, "score") + cost).abs() < 0.01, "{c} against {cost}");
            if c["endpoint"] == holder {
                assert_eq!((held, q), (1.0, 1.0), "{c}");
            } else {
                assert_eq!((held, q), (0.0, 0.0), "{c}");
            }
        }
        let scores: Vec<f64> = candidates.iter().map(|c| get(c, "score")).collect();
        let best = candidates[if scores[0] > scores[1] { 0 } else { 1 }]["endpoint"].clone();
        assert_eq!(best, holder, "the chosen one scored best");
        drop(router);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_directory_or_a_bad_queue_is_a_config_error_and_the_log_is_off_by_default() {
        let base = r#"{"model_mapping_rule": {"m": {"rules": [{"cluster": "c", "backend": "vllm"}]}},
                       "clusters": {"c": {"endpoints": ["127.0.0.1:1"]}}, "log": "#;
        let err = Router::from_json(
            format!(r#"{base}{{"enabled": true, "path": "/nonexistent-dir-llmproxy/llm.log"}}}}"#)
                .as_bytes(),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            err.contains("log.path") && err.contains("does not exist"),
            "{err}"
        );
        let err = Router::from_json(
            format!(r#"{base}{{"enabled": true, "queue_lines": 0}}}}"#).as_bytes(),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("log.queue_lines"), "{err}");
        // off by default: no thread, no series
        let router =
            Router::from_json(format!(r#"{base}{{"enabled": false}}}}"#).as_bytes()).unwrap();
        assert!(!router.metrics_text().contains("llmproxy_request_log"));
    }
}
