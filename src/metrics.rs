//! Router metrics: the counters updated on the request path and the Prometheus page that
//! renders them with the per-endpoint gauges read from the state at render time.
//!
//! Counters are plain atomics (no locks, no allocation on the request path).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::prometheus::{escape_label, family, header, Histogram, RATIO_BUCKETS};
use std::sync::Arc;

use crate::state::{Cluster, Endpoint, EndpointSet, PrefixIndex, TOKEN_KINDS};

/// Outcomes of a pick, in the order of `PICK_OUTCOMES`.
pub const PICK_OUTCOMES: [&str; 7] = [
    "routed",
    "bad_request",
    "model_not_found",
    "payload_too_large",
    "no_endpoint",
    "internal",
    "passed_through",
];

/// `result` labels of `llmproxy_session_affinity_total`, in the order of
/// [`RouterMetrics::session_affinity`].
pub const SESSION_RESULTS: [&str; 3] = ["kept", "moved", "new"];

/// `result` labels of `llmproxy_response_chains_total`, in the order of
/// [`RouterMetrics::response_chains`].
pub const CHAIN_RESULTS: [&str; 2] = ["pinned", "unknown"];

/// Router-wide counters and histograms.
pub struct RouterMetrics {
    /// Picks by outcome, indexed like `PICK_OUTCOMES`.
    pub picks: [AtomicU64; 7],
    /// Time spent in pick (parse + hash + score + account), seconds.
    pub pick_duration: Histogram,
    /// Cache match ratio of the chosen endpoint, per routed request (inference_lb).
    pub decision_cache_ratio: Histogram,
    /// Per answer that reported cached tokens: |expected − engine-reported| cache hit ratio.
    pub cache_prediction_error: Histogram,
    /// Prompt characters of routed requests.
    pub prompt_chars: AtomicU64,
    /// Prompt characters the chosen endpoint was expected to hold in its cache.
    pub cached_prompt_chars: AtomicU64,
    /// Finished requests by upstream status class: 0 (none), 2xx, 3xx, 4xx, 5xx.
    pub finished: [AtomicU64; 5],
    /// Re-picks after a connect failure.
    pub retries: AtomicU64,
    /// Metadata-Center calls that succeeded / failed (including breaker refusals).
    pub sync_ok: AtomicU64,
    /// See `sync_ok`.
    pub sync_failed: AtomicU64,
    /// Events dropped because the sync queue was full.
    pub sync_dropped: AtomicU64,
    /// `pick_async` decisions that used a remote cache answer / fell back to local data.
    pub lookups_remote: AtomicU64,
    /// See `lookups_remote`.
    pub lookups_local: AtomicU64,
    /// Lookups skipped because the job waited a whole lookup timeout in the queue.
    pub lookups_expired: AtomicU64,
    /// Prefix chunks learned from answers (the next turn's prefix, recorded at finish).
    pub learned_response_chunks: AtomicU64,
    /// Reads of the endpoints' metrics pages (`engine_metrics`) that gave a reading / failed
    /// (unreachable, late, not a Prometheus page with the configured gauges).
    pub engine_reads_ok: AtomicU64,
    /// See `engine_reads_ok`.
    pub engine_reads_failed: AtomicU64,
    /// Choices for requests of a session (`session_affinity`), indexed like
    /// [`SESSION_RESULTS`]: kept on its endpoint, moved off it, or new.
    pub session_affinity: [AtomicU64; 3],
    /// Responses API requests naming a `previous_response_id`, indexed like
    /// [`CHAIN_RESULTS`]: sent to the endpoint that stored it, or that endpoint unknown here
    /// (never answered through this gateway, forgotten, or not a candidate).
    pub response_chains: [AtomicU64; 2],
    /// Requests on a stored Responses answer (retrieve, delete, input items, cancel), indexed
    /// like [`CHAIN_RESULTS`]: sent to the endpoint that stored it, or passed through
    /// untouched (an id this gateway does not know).
    pub stored_answer_requests: [AtomicU64; 2],
}

impl Default for RouterMetrics {
    fn default() -> Self {
        Self {
            picks: Default::default(),
            pick_duration: Histogram::latency(),
            decision_cache_ratio: Histogram::new(RATIO_BUCKETS),
            cache_prediction_error: Histogram::new(RATIO_BUCKETS),
            prompt_chars: AtomicU64::new(0),
            cached_prompt_chars: AtomicU64::new(0),
            finished: Default::default(),
            retries: AtomicU64::new(0),
            sync_ok: AtomicU64::new(0),
            sync_failed: AtomicU64::new(0),
            sync_dropped: AtomicU64::new(0),
            lookups_remote: AtomicU64::new(0),
            lookups_local: AtomicU64::new(0),
            lookups_expired: AtomicU64::new(0),
            learned_response_chunks: AtomicU64::new(0),
            engine_reads_ok: AtomicU64::new(0),
            engine_reads_failed: AtomicU64::new(0),
            session_affinity: Default::default(),
            response_chains: Default::default(),
            stored_answer_requests: Default::default(),
        }
    }
}

impl RouterMetrics {
    /// Counts a pick outcome.
    pub fn count_pick(&self, outcome: &str) {
        let i = PICK_OUTCOMES
            .iter()
            .position(|o| *o == outcome)
            .unwrap_or(5);
        self.picks[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a session's choice: an index into [`SESSION_RESULTS`].
    pub fn count_session(&self, result: usize) {
        self.session_affinity[result].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a Metadata-Center call.
    pub fn count_sync(&self, ok: bool) {
        let c = if ok { &self.sync_ok } else { &self.sync_failed };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a finished request by upstream status.
    pub fn count_finish(&self, status: u32) {
        let i = match status {
            200..=299 => 1,
            300..=399 => 2,
            400..=499 => 3,
            500..=599 => 4,
            _ => 0,
        };
        self.finished[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// What the metrics page shows besides the router's own counters.
pub struct Page<'a> {
    /// Requests picked and not yet finished.
    pub in_flight: u64,
    /// The router's prefix index.
    pub index: &'a PrefixIndex,
    /// Every cluster, sorted by name.
    pub clusters: &'a [Arc<Cluster>],
    /// Endpoint-set replacements so far.
    pub endpoint_updates: u64,
    /// Model names, indexed by model slot (per-model histograms).
    pub model_names: &'a [String],
    /// Router time now, ms (ejection deadlines).
    pub now_ms: u64,
    /// The shared-state region's statistics, when the router is attached to one.
    pub shared: Option<crate::state::SharedStats>,
    /// The request log's counters, when it is on.
    pub request_log: Option<&'a crate::background::log_writer::LogCounters>,
    /// `cache_capacity_tokens` (for endpoints whose engine reports none).
    pub cache_capacity_tokens: u64,
}

impl RouterMetrics {
    /// The metrics page (or a part of it) in Prometheus text format.
    pub fn render(&self, page: &Page, part: Part) -> String {
        let mut out = String::with_capacity(4096);
        if part != Part::State {
            self.render_router(page, &mut out);
        }
        if part != Part::Router {
            render_state(page, &mut out);
        }
        out
    }

    /// What this router counted itself: picks, finished requests, calls, latency histograms.
    fn render_router(&self, page: &Page, out: &mut String) {
        let m = self;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let picks: Vec<(String, u64)> = PICK_OUTCOMES
            .iter()
            .zip(&m.picks)
            .map(|(o, c)| (format!("outcome=\"{o}\""), load(c)))
            .collect();
        family(
            out,
            "llmproxy_picks_total",
            "counter",
            "Pick decisions by outcome.",
            &picks,
        );
        let finished: Vec<(String, u64)> = ["none", "2xx", "3xx", "4xx", "5xx"]
            .iter()
            .zip(&m.finished)
            .map(|(class, c)| (format!("status=\"{class}\""), load(c)))
            .collect();
        family(
            out,
            "llmproxy_finished_requests_total",
            "counter",
            "Finished requests by upstream status class (none = no upstream response).",
            &finished,
        );
        let single = |v: u64| [(String::new(), v)];
        for (name, kind, help, value) in [
            (
                "llmproxy_in_flight_requests",
                "gauge",
                "Requests picked and not yet finished.",
                page.in_flight,
            ),
            (
                "llmproxy_retries_total",
                "counter",
                "Re-picks after a failed upstream connection.",
                load(&m.retries),
            ),
            (
                "llmproxy_endpoint_updates_total",
                "counter",
                "Endpoint sets replaced through the API or DNS.",
                page.endpoint_updates,
            ),
            (
                "llmproxy_metadata_center_events_dropped_total",
                "counter",
                "Sync events dropped because the queue was full.",
                load(&m.sync_dropped),
            ),
            (
                "llmproxy_prompt_chars_total",
                "counter",
                "Prompt characters of routed requests.",
                load(&m.prompt_chars),
            ),
            (
                "llmproxy_cached_prompt_chars_total",
                "counter",
                "Prompt characters the chosen endpoint was expected to hold in its KV cache.",
                load(&m.cached_prompt_chars),
            ),
            (
                "llmproxy_learned_response_chunks_total",
                "counter",
                "Prefix chunks learned from answers: the next turn's prefix, for the endpoint that answered.",
                load(&m.learned_response_chunks),
            ),
        ] {
            family(out, name, kind, help, &single(value));
        }
        if let Some(log) = page.request_log {
            family(
                out,
                "llmproxy_request_log_lines_total",
                "counter",
                "Request log lines by what became of them (dropped: queue full; failed: open or write error).",
                &[
                    ("result=\"written\"".into(), load(&log.written)),
                    ("result=\"dropped\"".into(), load(&log.dropped)),
                    ("result=\"failed\"".into(), load(&log.failed)),
                ],
            );
            family(
                out,
                "llmproxy_request_log_reopened_total",
                "counter",
                "Times the request log file was reopened after a rotation.",
                &[(String::new(), load(&log.reopened))],
            );
        }
        family(
            out,
            "llmproxy_metadata_center_calls_total",
            "counter",
            "Metadata-Center calls by result (failed includes circuit-breaker refusals).",
            &[
                ("result=\"ok\"".into(), load(&m.sync_ok)),
                ("result=\"failed\"".into(), load(&m.sync_failed)),
            ],
        );
        family(
            out,
            "llmproxy_engine_metrics_reads_total",
            "counter",
            "Reads of the endpoints' own metrics pages (engine_metrics) by result.",
            &[
                ("result=\"ok\"".into(), load(&m.engine_reads_ok)),
                ("result=\"failed\"".into(), load(&m.engine_reads_failed)),
            ],
        );
        let sessions: Vec<(String, u64)> = SESSION_RESULTS
            .iter()
            .zip(&m.session_affinity)
            .map(|(r, c)| (format!("result=\"{r}\""), load(c)))
            .collect();
        family(
            out,
            "llmproxy_session_affinity_total",
            "counter",
            "Choices for requests of a session (session_affinity): kept on the session's endpoint, moved off it (overloaded, ejected, unavailable), new (no endpoint yet).",
            &sessions,
        );
        let chains: Vec<(String, u64)> = CHAIN_RESULTS
            .iter()
            .zip(&m.response_chains)
            .map(|(r, c)| (format!("result=\"{r}\""), load(c)))
            .collect();
        family(
            out,
            "llmproxy_response_chains_total",
            "counter",
            "Responses API requests naming a previous_response_id: pinned to the endpoint that stored it, or unknown (not answered through this gateway, forgotten, or that endpoint unavailable).",
            &chains,
        );
        let stored: Vec<(String, u64)> = CHAIN_RESULTS
            .iter()
            .zip(&m.stored_answer_requests)
            .map(|(r, c)| (format!("result=\"{r}\""), load(c)))
            .collect();
        family(
            out,
            "llmproxy_stored_response_requests_total",
            "counter",
            "Requests on a stored Responses answer (GET/DELETE /v1/responses/{id}, its input_items, POST .../cancel): pinned to the endpoint that stored it, or unknown here and passed through untouched.",
            &stored,
        );
        family(
            out,
            "llmproxy_remote_cache_lookups_total",
            "counter",
            "pick_async / pick_start decisions by the cache data they used.",
            &[
                ("result=\"remote\"".into(), load(&m.lookups_remote)),
                ("result=\"local_fallback\"".into(), load(&m.lookups_local)),
                (
                    "result=\"expired_in_queue\"".into(),
                    load(&m.lookups_expired),
                ),
            ],
        );
        header(
            out,
            "llmproxy_pick_duration_seconds",
            "histogram",
            "Time spent in pick: parse, hash, score, account.",
        );
        m.pick_duration
            .render(out, "llmproxy_pick_duration_seconds", "");
        header(
            out,
            "llmproxy_decision_cache_ratio",
            "histogram",
            "Prefix-cache match ratio of the chosen endpoint.",
        );
        m.decision_cache_ratio
            .render(out, "llmproxy_decision_cache_ratio", "");
        header(
            out,
            "llmproxy_cache_prediction_error",
            "histogram",
            "Per answer that reported usage.prompt_tokens_details.cached_tokens: the absolute difference between the share of its prompt the pick expected cached and the share the engine reported (cached / prompt tokens).",
        );
        m.cache_prediction_error
            .render(out, "llmproxy_cache_prediction_error", "");

        let sets = endpoint_sets(page);
        header(
            out,
            "llmproxy_time_to_first_token_seconds",
            "histogram",
            "Time from pick to first response byte, per model and endpoint.",
        );
        for (c, set) in &sets {
            for e in &set.endpoints {
                for (slot, h) in e.ttft_histograms() {
                    let labels = format!(
                        "model=\"{}\",cluster=\"{}\",endpoint=\"{}\"",
                        escape_label(&page.model_names[slot]),
                        escape_label(c),
                        e.address
                    );
                    h.render(out, "llmproxy_time_to_first_token_seconds", &labels);
                }
            }
        }
        render_answers(out, &sets, page);
    }
}

/// Which part of the page to render: hosts whose processes share one state (nginx workers)
/// publish the router part per worker and the state part once.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Part {
    /// Everything.
    All,
    /// What the router counted itself (per process).
    Router,
    /// The endpoints' counters and the prefix index (the shared state, when there is one).
    State,
}

/// Every cluster's current endpoint set, by cluster name.
fn endpoint_sets<'a>(page: &Page<'a>) -> Vec<(&'a str, Arc<EndpointSet>)> {
    page.clusters
        .iter()
        .map(|c| (c.name.as_str(), c.snapshot()))
        .collect()
}

/// The state part: the prefix index, the shared region and every endpoint's counters.
/// Per endpoint, what its answers reported (`usage`) beside the router's prediction, and time
/// per output token: only endpoints whose answers reported usage in this process.
fn render_answers(out: &mut String, sets: &[(&str, Arc<EndpointSet>)], page: &Page) {
    let model_names = page.model_names;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    // every endpoint (`all`), or those whose answers reported usage in this process
    let listed = |all: bool| {
        sets.iter().flat_map(move |(c, set)| {
            set.endpoints
                .iter()
                .filter(|e| all || load(&e.answers.answers) > 0)
                .map(move |e| {
                    let labels =
                        format!("cluster=\"{}\",endpoint=\"{}\"", escape_label(c), e.address);
                    (labels, e)
                })
                .collect::<Vec<_>>()
        })
    };
    let answered = || listed(false);
    let mut tokens = Vec::new();
    let mut chars = Vec::new();
    for (labels, e) in answered() {
        let a = &e.answers;
        for (model, counts) in model_names.iter().zip(a.tokens.iter()) {
            if counts.iter().all(|c| load(c) == 0) {
                continue; // no answer of this model from this endpoint
            }
            let model = escape_label(model);
            for (kind, v) in TOKEN_KINDS.iter().zip(counts) {
                tokens.push((
                    format!("model=\"{model}\",{labels},kind=\"{kind}\""),
                    load(v),
                ));
            }
        }
        for (kind, v) in [
            ("prompt", &a.prompt_chars),
            ("predicted_cached", &a.predicted_cached_chars),
        ] {
            chars.push((format!("{labels},kind=\"{kind}\""), load(v)));
        }
    }
    family(
        out,
        "llmproxy_tokens_total",
        "counter",
        "Tokens the model servers reported in usage, per model and endpoint (cached: prompt tokens served from the engine's prefix cache; cached / prompt is its own hit rate).",
        &tokens,
    );
    family(
        out,
        "llmproxy_endpoint_answer_prompt_chars_total",
        "counter",
        "Prompt characters of the answers that reported cached_tokens, and of those the characters the router expected cached at pick (predicted_cached / prompt: the router's estimate for the same requests).",
        &chars,
    );
    header(
        out,
        "llmproxy_endpoint_time_per_output_token_seconds",
        "histogram",
        "Per answer: time from its first to its last byte over its completion tokens minus one.",
    );
    for (labels, e) in answered() {
        if let Some(h) = e.answers.time_per_output_token.get() {
            h.render(
                out,
                "llmproxy_endpoint_time_per_output_token_seconds",
                &labels,
            );
        }
    }
    header(
        out,
        "llmproxy_endpoint_cache_trust",
        "gauge",
        "Share of what the prefix index claims for the endpoint that its engine really had cached, averaged over recent answers (the factor on its cache ratio with cache_feedback).",
    );
    for (labels, e) in answered() {
        let _ = writeln!(
            out,
            "llmproxy_endpoint_cache_trust{{{labels}}} {}",
            e.answers.cache_trust()
        );
    }
    header(
        out,
        "llmproxy_endpoint_cache_eviction_share",
        "gauge",
        "Share of the tokens the endpoint's answers write into its KV cache that recompute a prefix listed there at least 1 s before and reported evicted by its engine, averaged over recent answers (measured with eviction_pressure, 0 without); a miss there costs 1 / (1 - share) times more.",
    );
    for (labels, e) in answered() {
        let _ = writeln!(
            out,
            "llmproxy_endpoint_cache_eviction_share{{{labels}}} {}",
            e.residency.eviction_share()
        );
    }
    header(
        out,
        "llmproxy_endpoint_cache_residency_seconds",
        "gauge",
        "How long after its last use a prefix likely stays in the endpoint's KV cache: its capacity (engine metrics, cache_capacity_tokens, else learned from the answers) over the tokens written there per second (the engine's counters with engine metrics, else this router's answers). Listed once both are known.",
    );
    for (labels, e) in listed(true) {
        if let Some(secs) = e.residency.horizon_secs(page.cache_capacity_tokens) {
            let _ = writeln!(
                out,
                "llmproxy_endpoint_cache_residency_seconds{{{labels}}} {secs}"
            );
        }
    }
    header(
        out,
        "llmproxy_endpoint_cache_write_tokens_per_second",
        "gauge",
        "Tokens written into the endpoint's KV cache per second, as the residency uses it: from the engine's own counters (source=engine, engine metrics) or from this router's answers (source=answers). Listed once measured.",
    );
    for (labels, e) in listed(true) {
        if let Some(per_ms) = e.residency.write_rate() {
            let source = if e.residency.rate_from_engine() {
                "engine"
            } else {
                "answers"
            };
            let _ = writeln!(
                out,
                "llmproxy_endpoint_cache_write_tokens_per_second{{{labels},source=\"{source}\"}} {}",
                per_ms * 1000.0
            );
        }
    }
    header(
        out,
        "llmproxy_endpoint_learned_cache_capacity_tokens",
        "gauge",
        "KV cache capacity learned from the answers (claims the engine kept or had evicted), used for the residency while neither the engine's metrics nor cache_capacity_tokens give one. Listed once learned.",
    );
    for (labels, e) in answered() {
        if let Some(tokens) = e.residency.learned_capacity() {
            let _ = writeln!(
                out,
                "llmproxy_endpoint_learned_cache_capacity_tokens{{{labels}}} {}",
                tokens.round()
            );
        }
    }
}

fn render_state(page: &Page, out: &mut String) {
    let single = |v: u64| [(String::new(), v)];
    for (name, kind, help, value) in [
        (
            "llmproxy_prefix_index_entries",
            "gauge",
            "Chunk hashes in the prefix index (in shared mode: of all workers).",
            page.index.len() as u64,
        ),
        (
            "llmproxy_prefix_index_capacity",
            "gauge",
            "Chunk hashes the prefix index holds at most.",
            page.index.capacity() as u64,
        ),
        (
            "llmproxy_prefix_index_evictions_total",
            "counter",
            "Prefix index entries evicted to stay within capacity.",
            page.index.evictions(),
        ),
    ] {
        family(out, name, kind, help, &single(value));
    }
    if let Some(st) = &page.shared {
        for (name, kind, help, value) in [
            (
                "llmproxy_shared_state_bytes",
                "gauge",
                "Size of the shared-state region.",
                st.size,
            ),
            (
                "llmproxy_shared_state_workers",
                "gauge",
                "Routers attached to the shared state (dead ones until reaped).",
                st.workers,
            ),
            (
                "llmproxy_shared_state_endpoints",
                "gauge",
                "Endpoint slots in use in the shared state.",
                st.endpoints,
            ),
            (
                "llmproxy_shared_state_endpoint_overflow_total",
                "counter",
                "Endpoints that found the shared endpoint table full (own counters instead).",
                st.endpoint_overflow,
            ),
            (
                "llmproxy_shared_state_reaped_workers_total",
                "counter",
                "Dead workers whose load was taken back from the shared state.",
                st.reaped_workers,
            ),
        ] {
            family(out, name, kind, help, &single(value));
        }
    }
    type Getter = fn(&Endpoint, u64) -> u64;
    let families: [(&str, &str, &str, Getter); 7] = [
            (
                "llmproxy_endpoint_in_flight_requests",
                "gauge",
                "In-flight requests per endpoint.",
                |e, _| e.in_flight(),
            ),
            (
                "llmproxy_endpoint_prefill_chars",
                "gauge",
                "Prompt characters still in prefill per endpoint.",
                |e, _| e.prefill_chars(),
            ),
            (
                "llmproxy_endpoint_picks_total",
                "counter",
                "Picks per endpoint.",
                |e, _| e.picks(),
            ),
            (
                "llmproxy_endpoint_failures_total",
                "counter",
                "Failures of the endpoint (connect failure, reset before any response, its own 502/503/504).",
                |e, _| e.failures(),
            ),
            (
                "llmproxy_endpoint_ejections_total",
                "counter",
                "Passive-health ejections per endpoint.",
                |e, _| e.ejections(),
            ),
            (
                "llmproxy_endpoint_ejected",
                "gauge",
                "1 while the endpoint is ejected.",
                |e, now| e.is_ejected(now) as u64,
            ),
            (
                "llmproxy_endpoint_remote_in_flight_requests",
                "gauge",
                "In-flight requests other gateways reported for the endpoint (last Metadata-Center poll).",
                |e, _| e.remote_in_flight(),
            ),
        ];
    let now = page.now_ms;
    let sets = endpoint_sets(page);
    for (name, kind, help, get) in families {
        let samples: Vec<(String, u64)> = sets
            .iter()
            .flat_map(|(c, set)| {
                set.endpoints.iter().map(move |e| {
                    let labels =
                        format!("cluster=\"{}\",endpoint=\"{}\"", escape_label(c), e.address);
                    (labels, get(e, now))
                })
            })
            .collect();
        family(out, name, kind, help, &samples);
    }
}
