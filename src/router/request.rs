//! The request handle, from pick to finish: what the host reads of the decision (endpoint,
//! rewrites, errors), response transcoding, retries, first token, and finish with its
//! [`Outcome`]. Finishing releases the request's load and feeds passive health; dropping an
//! unfinished request finishes it with "no response", so accounting never leaks.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::log_line::LogContext;
use super::pick::Routed;
use super::RouterInner;
use crate::background::Event;
use crate::error::PickError;
use crate::hashing;
use crate::state::Endpoint;
use crate::transcode::Output;

/// A request from pick to finish. Must be finished (or dropped) exactly once.
pub struct PickedRequest {
    router: Arc<RouterInner>,
    result: Result<Routed, PickError>,
    picked_at: Instant,
    first_token_seen: bool,
    finished: bool,
    /// When the first response byte came (the request log's TTFT).
    first_token_at: Option<Instant>,
    /// Re-picks after connect failures.
    retries: u32,
    /// Response bytes the host handed over (observe_response, transcode_response).
    bytes_out: u64,
    /// What the request log needs from the pick (only when the log is on).
    log: Option<Box<LogContext>>,
}

impl PickedRequest {
    /// A handle for `result`, picked at `picked_at`.
    pub(super) fn new(
        router: &Arc<RouterInner>,
        result: Result<Routed, PickError>,
        picked_at: Instant,
        log: Option<Box<LogContext>>,
    ) -> Self {
        Self {
            router: Arc::clone(router),
            result,
            picked_at,
            first_token_seen: false,
            finished: false,
            first_token_at: None,
            retries: 0,
            bytes_out: 0,
            log,
        }
    }

    /// The error, when the request could not be routed.
    pub fn error(&self) -> Option<&PickError> {
        self.result.as_ref().err()
    }

    /// HTTP status for the client: 200 when routed.
    pub fn http_status(&self) -> u32 {
        match &self.result {
            Ok(r) if r.endpoint.is_some() => 200,
            Ok(r) => PickError::NoEndpoint {
                cluster: r.cluster.name.clone(),
            }
            .http_status(),
            Err(e) => e.http_status(),
        }
    }

    pub(super) fn routed(&self) -> Option<&Routed> {
        self.result.as_ref().ok()
    }

    /// Chosen endpoint `ip:port`.
    pub fn endpoint(&self) -> Option<&str> {
        self.routed()?.endpoint.as_ref().map(|e| e.address.as_str())
    }

    /// Cluster of the matched rule.
    pub fn cluster(&self) -> Option<&str> {
        self.routed().map(|r| r.cluster.name.as_str())
    }

    /// Backend of the matched rule.
    pub fn backend(&self) -> Option<&'static str> {
        self.routed().map(|r| r.rule.backend.as_str())
    }

    /// Requested model.
    pub fn model(&self) -> Option<&str> {
        self.routed().map(|r| r.model.as_str())
    }

    /// Scene name of the matched rule.
    pub fn scene(&self) -> Option<&str> {
        self.routed().map(|r| r.rule.scene_name.as_str())
    }

    /// The request's `stream` flag.
    pub fn is_stream(&self) -> bool {
        self.routed().is_some_and(|r| r.stream)
    }

    /// Prefix-cache match ratio of the chosen endpoint at decision time.
    pub fn cache_ratio(&self) -> f64 {
        self.routed().map_or(0.0, |r| r.cache_ratio)
    }

    /// Prompt length in characters.
    pub fn prompt_chars(&self) -> u64 {
        self.routed().map_or(0, |r| r.prompt_chars)
    }

    /// OpenAI error JSON when not routed.
    pub fn error_body(&self) -> Option<String> {
        match &self.result {
            Err(e) => Some(e.to_json()),
            Ok(r) if r.endpoint.is_none() => Some(
                PickError::NoEndpoint {
                    cluster: r.cluster.name.clone(),
                }
                .to_json(),
            ),
            Ok(_) => None,
        }
    }

    /// The model name the backend receives (differs from `model` after a rewrite).
    pub fn upstream_model(&self) -> Option<&str> {
        self.routed().map(|r| r.upstream_model.as_str())
    }

    /// The upstream path when it differs from the client's (Triton generate).
    pub fn upstream_path(&self) -> Option<&str> {
        self.routed()?.upstream.path.as_deref()
    }

    /// The upstream body when it differs from the client's.
    pub fn upstream_body(&self) -> Option<&[u8]> {
        self.routed()?.upstream.body.as_deref()
    }

    /// True when the response body is transcoded (hosts drop `content-length`).
    pub fn needs_transcoding(&self) -> bool {
        self.routed()
            .is_some_and(|r| r.transcoder.needs_transcoding())
    }

    /// Call once at the upstream response headers: returns the status for the client.
    pub fn response_status(&mut self, upstream_status: u32) -> u32 {
        match &mut self.result {
            Ok(r) => r.transcoder.response_status(upstream_status),
            Err(_) => upstream_status,
        }
    }

    /// The response content type for the client, when transcoding changes it.
    pub fn response_content_type(&self) -> Option<&'static str> {
        self.routed().and_then(|r| r.transcoder.content_type())
    }

    /// Feeds one upstream response chunk: returns the bytes for the client (`None`: the
    /// chunk unchanged). The first chunk with content marks the first token.
    pub fn transcode_response(&mut self, chunk: &[u8], end_of_stream: bool) -> Option<&[u8]> {
        self.bytes_out += chunk.len() as u64;
        let seen_before = self.routed().is_some_and(|r| r.transcoder.seen_content());
        let seen_now = match &mut self.result {
            Ok(r) => {
                let _ = r.transcoder.feed(chunk, end_of_stream);
                r.transcoder.seen_content()
            }
            Err(_) => return None,
        };
        if seen_now && !seen_before {
            self.first_token();
        }
        match &mut self.result {
            Ok(r) => {
                let out = match r.transcoder.last_output() {
                    Output::Same => None,
                    Output::Bytes(b) => Some(b),
                };
                // A rewritten answer (Triton's) is read as the client gets it, an OpenAI one;
                // otherwise as the server sent it (with the usage a client may not see).
                if r.transcoder.answer_is_upstream() {
                    r.answer.feed(chunk, end_of_stream);
                } else {
                    r.answer.feed(out.unwrap_or(chunk), end_of_stream);
                }
                self.router.bind_response(
                    &r.answer,
                    &r.cluster,
                    r.endpoint.as_ref(),
                    &mut r.response_bound,
                );
                out
            }
            Err(_) => None,
        }
    }

    /// Reads one chunk of the upstream's answer (any size, any boundary; `end_of_stream`
    /// with the last, possibly empty): its usage, and its text to learn the next turn's
    /// prefix when the request finishes (`learn_response_bytes` > 0 and a next turn that
    /// extends the prompt). A no-op for transcoded answers: those are read in
    /// [`PickedRequest::transcode_response`].
    pub fn observe_response(&mut self, chunk: &[u8], end_of_stream: bool) {
        self.bytes_out += chunk.len() as u64;
        if let Ok(r) = &mut self.result {
            if !r.transcoder.needs_transcoding() {
                r.answer.feed(chunk, end_of_stream);
                self.router.bind_response(
                    &r.answer,
                    &r.cluster,
                    r.endpoint.as_ref(),
                    &mut r.response_bound,
                );
            }
        }
    }

    /// Re-picks another endpoint after a connect failure; the failed one is not tried again
    /// and counts one failure. Accounting moves to the new endpoint.
    pub fn retry(&mut self) -> Result<(), PickError> {
        let router = Arc::clone(&self.router);
        let first_token_seen = self.first_token_seen;
        let Ok(r) = &mut self.result else {
            return Err(self.error().cloned().unwrap_or(PickError::Internal {
                message: "retry of an unrouted request".into(),
            }));
        };
        if let Some(old) = r.endpoint.take() {
            if let Some(req) = r.sync.take() {
                req.mark_finished();
                router.send(Event::Done {
                    req,
                    cluster: Arc::clone(&r.cluster),
                    endpoint: Arc::clone(&old),
                });
            }
            if !first_token_seen {
                old.drop_prefill(r.prefill);
            }
            old.release_request();
            router.in_flight.fetch_sub(1, Ordering::Relaxed);
            let ej = router.config.ejection;
            old.record_failure(router.clock.now_ms(), ej.consecutive_failures, ej.eject_ms);
        }
        router.metrics.retries.fetch_add(1, Ordering::Relaxed);
        self.retries += 1;
        self.first_token_seen = false;
        self.picked_at = Instant::now();
        router.choose(r, None)
    }

    /// The first response byte arrived: prefill is over. Idempotent.
    pub fn first_token(&mut self) {
        if self.first_token_seen || self.finished {
            return;
        }
        self.first_token_seen = true;
        self.first_token_at = Some(Instant::now());
        if let Ok(r) = &self.result {
            if let Some(e) = &r.endpoint {
                e.first_token(r.prefill);
                let timed = r.stored_answer.is_none(); // (a stored answer's bytes are no token)
                if timed {
                    let waited = self.picked_at.elapsed().as_secs_f64();
                    e.residency.note_first_token(waited * 1e3);
                    if let Some(h) = e.ttft(r.model_slot) {
                        h.observe(waited);
                    }
                }
                if let Some(req) = &r.sync {
                    self.router.send(Event::PromptDone {
                        req: Arc::clone(req),
                        cluster: Arc::clone(&r.cluster),
                        endpoint: Arc::clone(e),
                    });
                }
            }
        }
    }

    /// The request is over; `upstream_status` is the upstream's HTTP status, 0 for none
    /// (the same as [`PickedRequest::finish_with`] and [`Outcome::Upstream`]).
    pub fn finish(self, upstream_status: u32) {
        self.finish_with(upstream_status, Outcome::Upstream);
    }

    /// The request is over: `status` is what the client got (for metrics), `outcome` says
    /// whom it tells about the endpoint's health (passive ejection).
    pub fn finish_with(mut self, status: u32, outcome: Outcome) {
        self.finish_inner(status, outcome);
    }

    fn finish_inner(&mut self, upstream_status: u32, outcome: Outcome) {
        if self.finished {
            return;
        }
        self.finished = true;
        // the answer is over: what the host fed is all there is (one end for every reader below)
        if let Ok(r) = &mut self.result {
            r.answer.end();
            // what the answer said of itself, beside what the pick expected (counted before
            // the log line is queued: a reader of the log finds the metrics already there)
            let usage = r.answer.capture().usage;
            if let Some(e) = &r.endpoint {
                if let Some(usage) = &usage {
                    e.answers.record(
                        r.model_slot,
                        usage,
                        r.prompt_chars,
                        (r.prompt_chars as f64 * r.expected_cache_ratio) as u64,
                        self.first_token_at.map(|t| t.elapsed().as_secs_f64()),
                    );
                    if let Some(engine) = usage.cache_hit_ratio() {
                        let error = (r.expected_cache_ratio - engine).abs();
                        self.router.metrics.cache_prediction_error.observe(error);
                    }
                }
                // what the engine says of its cache, once it has shown that it says it
                let word = usage.map(|u| e.answers.cache_word(u));
                let written = written_tokens(word.as_ref(), r, self.first_token_seen);
                e.cache_written(written);
                let engine_word = word.and_then(|u| Some((u.cache_hit_ratio()?, u.prompt_tokens)));
                if let Some((engine, prompt)) = engine_word {
                    if self.router.config.cache_feedback {
                        e.answers.correct_cache_trust(r.cache_ratio, engine);
                    }
                    if let Some((claimed, age_ms)) = r.claim {
                        if self.router.config.eviction_pressure {
                            e.residency
                                .note_writes(written, prompt, claimed, age_ms, engine);
                        }
                        if self.router.learns_capacity(e) {
                            e.residency.learn(age_ms, claimed, engine);
                        }
                    }
                }
            }
        }
        self.log_line(upstream_status, outcome);
        let router = &self.router;
        let first_token_seen = self.first_token_seen;
        if let Ok(r) = &mut self.result {
            if let Some(e) = &r.endpoint {
                let learned = r.learn_tail.take().and_then(|tail| {
                    let prompt_full_chunks = tail.full_chunks();
                    let hashes = router.learn(r, e, tail, upstream_status, outcome)?;
                    Some((prompt_full_chunks, hashes))
                });
                if let Some(req) = r.sync.take() {
                    req.mark_finished();
                    router.send(Event::Done {
                        req,
                        cluster: Arc::clone(&r.cluster),
                        endpoint: Arc::clone(e),
                    });
                    // The prompt's prefix was saved at the pick; a learned answer is news:
                    // the chain the server keeps, the prompt's full chunks then the next
                    // turn's, from an answer of the endpoint itself.
                    let cache_aware = router.config.lb_params(&r.model).cache_aware;
                    if let Some((full, learned)) = learned {
                        if outcome == Outcome::Upstream
                            && (100..400).contains(&upstream_status)
                            && cache_aware
                        {
                            let mut hashes = std::mem::take(&mut r.prefix_hashes);
                            hashes.truncate(full);
                            hashes.extend(learned);
                            router.send(Event::SaveCache {
                                cluster: Arc::clone(&r.cluster),
                                endpoint: Arc::clone(e),
                                hashes,
                            });
                        }
                    }
                }
                if !first_token_seen {
                    e.drop_prefill(r.prefill);
                }
                e.release_request();
                router.in_flight.fetch_sub(1, Ordering::Relaxed);
                match outcome.health(upstream_status) {
                    Some(false) => {
                        let ej = router.config.ejection;
                        e.record_failure(
                            router.clock.now_ms(),
                            ej.consecutive_failures,
                            ej.eject_ms,
                        );
                    }
                    Some(true) => e.record_success(),
                    None => {}
                }
                router.metrics.count_finish(upstream_status);
            }
        }
    }
}

impl PickedRequest {
    /// Queues the request log's line for this request (when the log is on).
    fn log_line(&mut self, status: u32, outcome: Outcome) {
        // (finish_inner has ended the answer's reader)
        let (Some(ctx), Some(log)) = (self.log.take(), self.router.request_log.get()) else {
            return;
        };
        // the answer's usage and (with include_prompt) text, as the reader has them now
        let cfg = &self.router.config.log;
        let mut usage = None;
        let mut completion = None;
        if let Ok(r) = &self.result {
            let capture = r.answer.capture();
            usage = capture.usage;
            if cfg.include_prompt {
                let mut text = String::from_utf8_lossy(&capture.text).into_owned();
                super::log_line::truncate(&mut text, cfg.prompt_max_bytes);
                completion = Some(text);
            }
        }
        let mut l = ctx.line(self.first_token_at);
        {
            l.algorithm = self.router.config.algorithm.name();
            l.status = status;
            l.outcome = outcome.name();
            l.retries = self.retries;
            l.bytes_out = self.bytes_out;
            l.prompt_tokens = usage.map(|u| u.prompt_tokens);
            l.completion_tokens = usage.map(|u| u.completion_tokens);
            l.cached_tokens = usage.and_then(|u| u.cached_tokens);
            l.completion = completion.as_deref();
            match &self.result {
                Ok(r) => {
                    l.model = Some(&r.model);
                    l.upstream_model = Some(&r.upstream_model);
                    l.scene = Some(&r.rule.scene_name);
                    l.cluster = Some(&r.cluster.name);
                    l.endpoint = r.endpoint.as_ref().map(|e| e.address.as_str());
                    l.cache_ratio = r.cache_ratio;
                    l.stream = r.stream;
                    l.prompt_chars = r.prompt_chars;
                    l.pick = r.pick_view.as_deref();
                    if r.endpoint.is_none() {
                        l.error = Some("no_endpoint");
                    }
                }
                Err(e) => l.error = Some(e.outcome()),
            }
        }
        log.send(l.render());
    }
}

impl RouterInner {
    /// The request is over: learn its answer, when the endpoint gave one in full (or up to
    /// the cap), as the prefix of the next turn held by that endpoint; returns the hashes
    /// recorded (salted for the served model).
    fn learn(
        &self,
        r: &Routed,
        endpoint: &Arc<Endpoint>,
        mut tail: hashing::PrefixHasher,
        status: u32,
        outcome: Outcome,
    ) -> Option<Vec<u64>> {
        // finish_inner has ended the reader
        let capture = r.answer.capture();
        let params = self.config.lb_params(&r.model);
        if outcome != Outcome::Upstream
            || !(200..300).contains(&status)
            || !capture.learnable()
            || !self.config.algorithm.uses_prefix_index(&params)
        {
            return None;
        }
        capture.render_next_turn(&mut tail);
        let mut hashes = tail.full_chunk_hashes().to_vec();
        if hashes.is_empty() {
            return None;
        }
        hashing::salt_for_served_model(&mut hashes, &r.model, &r.upstream_model);
        self.index.record(&hashes, endpoint.id, self.clock.now_ms());
        self.metrics
            .learned_response_chunks
            .fetch_add(hashes.len() as u64, Ordering::Relaxed);
        Some(hashes)
    }
}

impl Drop for PickedRequest {
    fn drop(&mut self) {
        self.finish_inner(0, Outcome::Local);
    }
}

/// How a request ended, as far as the endpoint's health is concerned: only what the endpoint
/// itself did counts toward passive ejection, never what a client or the proxy caused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The status is the endpoint's own response: 502–504 count as failures, 100–498 as
    /// successes, anything else (0, 499, 500, 501, 505+) says nothing.
    Upstream,
    /// The endpoint failed before sending a response byte: connect failure, or the
    /// connection was reset or closed before any response.
    EndpointFailed,
    /// The proxy or the client ended the request (a route timeout, a local reply, the client
    /// went away): says nothing about the endpoint.
    Local,
}

impl Outcome {
    /// The outcome's name in the request log.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Upstream => "upstream",
            Outcome::EndpointFailed => "endpoint_failed",
            Outcome::Local => "local",
        }
    }

    /// `Some(true)` a success, `Some(false)` a failure, `None` neutral.
    pub fn health(self, status: u32) -> Option<bool> {
        match (self, status) {
            (Outcome::EndpointFailed, _) => Some(false),
            (Outcome::Local, _) => None,
            (Outcome::Upstream, 502..=504) => Some(false),
            (Outcome::Upstream, 100..=498) => Some(true),
            (Outcome::Upstream, _) => None,
        }
    }
}

/// Tokens a finished attempt wrote into its endpoint's KV cache: the prompt tokens the engine
/// computed (not cached) and those it generated, from the answer's `usage`; without usage,
/// the prompt characters the pick expected it to compute, when the answer started at all.
fn written_tokens(usage: Option<&crate::response::Usage>, r: &Routed, answered: bool) -> u64 {
    match usage {
        Some(u) => {
            let cached = u.cached_tokens.unwrap_or_else(|| {
                (u.prompt_tokens as f64 * r.expected_cache_ratio).round() as u64
            });
            u.prompt_tokens.saturating_sub(cached) + u.completion_tokens
        }
        None if answered => r.prefill.uncached_chars / hashing::CHARS_PER_TOKEN,
        None => 0,
    }
}
