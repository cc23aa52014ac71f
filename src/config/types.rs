//! The validated configuration: the public types a router is built from, their defaults,
//! and [`ConfigError`] with the two constructors every check uses (`err`, `within`).
//!
//! No JSON is read here: values of these types come out of `validate` (or are built by hand
//! in tests).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::RangeInclusive;

/// The backend protocol spoken by a rule's model servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// vLLM OpenAI-compatible server.
    Vllm,
    /// SGLang OpenAI-compatible server.
    Sglang,
    /// TensorRT-LLM `trtllm-serve` (OpenAI-compatible).
    TensorRtLlm,
    /// Triton Inference Server with the TensorRT-LLM backend.
    Triton,
}

impl Backend {
    /// All accepted backend names, for error messages.
    pub const NAMES: &'static str = "vllm, sglang, tensorrt-llm, triton";

    /// The value of a config spelling, if it is one.
    pub(super) fn parse(name: &str) -> Option<Self> {
        match name {
            "vllm" => Some(Self::Vllm),
            "sglang" => Some(Self::Sglang),
            "tensorrt-llm" => Some(Self::TensorRtLlm),
            "triton" => Some(Self::Triton),
            _ => None,
        }
    }

    /// The config spelling of this backend.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vllm => "vllm",
            Self::Sglang => "sglang",
            Self::TensorRtLlm => "tensorrt-llm",
            Self::Triton => "triton",
        }
    }
}

/// The endpoint selection algorithm (`algorithm` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// Cache- and load-aware scoring (the origin's `inference_lb`).
    InferenceLb,
    /// Uniformly random.
    Random,
    /// Round robin per cluster.
    RoundRobin,
    /// Least estimated prefill work before the first token (cache savings vs queued work).
    PrefixCost,
    /// Fewest in-flight requests, ties broken at random.
    LeastRequest,
}

impl Algorithm {
    /// The config spelling of this algorithm.
    pub fn name(self) -> &'static str {
        match self {
            Self::InferenceLb => "inference_lb",
            Self::Random => "random",
            Self::RoundRobin => "round_robin",
            Self::PrefixCost => "prefix_cost",
            Self::LeastRequest => "least_request",
        }
    }

    /// All accepted algorithm names, for error messages.
    pub const NAMES: &'static str = "inference_lb, prefix_cost, random, round_robin, least_request";

    /// The value of a config spelling, if it is one.
    pub(super) fn parse(name: &str) -> Option<Self> {
        match name {
            "inference_lb" => Some(Self::InferenceLb),
            "prefix_cost" => Some(Self::PrefixCost),
            "random" => Some(Self::Random),
            "round_robin" => Some(Self::RoundRobin),
            "least_request" => Some(Self::LeastRequest),
            _ => None,
        }
    }
}

/// One header condition of a rule: the request header `key` must equal `value` exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderMatch {
    /// Header name, stored lower-case (matching is case-insensitive).
    pub key: String,
    /// Exact value.
    pub value: String,
}

/// A subset selector of a rule (kept for LoRA and label routing).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subset {
    /// Subset name.
    pub name: String,
    /// Endpoint labels that select the subset.
    pub labels: BTreeMap<String, String>,
    /// LoRA adapter name.
    pub lora: String,
    /// Share of the rule's traffic (relative to the other subsets; default 1).
    pub weight: u32,
}

/// One routing rule of a model.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Scene name (free text, reported in logs and to the upstream).
    pub scene_name: String,
    /// Cluster the rule routes to; also the metadata-center cluster key.
    pub cluster: String,
    /// Backend protocol of the cluster's servers.
    pub backend: Backend,
    /// Header conditions; empty means this is the model's default rule.
    pub headers: Vec<HeaderMatch>,
    /// Route name (logged only).
    pub route_name: String,
    /// Subsets (label or LoRA selection).
    pub subset: Vec<Subset>,
    /// The backend's served model name, replacing `model` upstream (empty: unchanged).
    pub target_model: String,
    /// Chat template for backends that take raw text (`triton`).
    pub chat_template: crate::transcode::templates::ChatTemplate,
}

/// One configured endpoint: its address and what it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    /// `ip:port`.
    pub addr: SocketAddr,
    /// Labels matched by rule subsets.
    pub labels: BTreeMap<String, String>,
    /// LoRA adapters the endpoint serves.
    pub lora_adapters: Vec<String>,
}

/// Per-model balancing parameters (`lb_mapping_rule[model]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LbParams {
    /// Use load (in-flight requests, prefill) in the score.
    pub load_aware: bool,
    /// Use the prefix-cache match ratio in the score.
    pub cache_aware: bool,
    /// Share of candidates, best first, among which one is picked at random (0–100).
    pub candidate_percent: f64,
    /// W2: weight of the normalised request load.
    pub request_load_weight: f64,
    /// W3: weight of the normalised prefill load.
    pub prefill_load_weight: f64,
    /// W1: weight of the cache match ratio (`cache_radio_weight`, the origin's spelling).
    pub cache_ratio_weight: f64,
    /// `prefix_cost`: prefill-equivalent characters charged per request in flight.
    pub decode_cost_chars: f64,
    /// `prefix_cost`: the fleet's share of a cache miss. The prompt's uncached characters are
    /// charged `1 + miss_slowdown_weight · Q_e` times: recomputing them also stretches the
    /// decode steps of the `Q_e` requests already running on that endpoint.
    pub miss_slowdown_weight: f64,
}

impl Default for LbParams {
    fn default() -> Self {
        Self {
            load_aware: true,
            cache_aware: true,
            candidate_percent: 10.0,
            request_load_weight: 1.0,
            prefill_load_weight: 3.0,
            cache_ratio_weight: 2.0,
            decode_cost_chars: 128.0,
            miss_slowdown_weight: 0.5,
        }
    }
}

/// Passive health checking: endpoints that keep failing are left out for a while.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ejection {
    /// Consecutive failed requests (upstream 502/503/504, or no response) that eject an endpoint.
    pub consecutive_failures: u32,
    /// How long an ejected endpoint is left out, in milliseconds.
    pub eject_ms: u64,
}

impl Default for Ejection {
    fn default() -> Self {
        Self {
            consecutive_failures: 3,
            eject_ms: 10_000,
        }
    }
}

/// The validated configuration of a router.
#[derive(Debug, Clone)]
pub struct Config {
    /// Selection algorithm.
    pub algorithm: Algorithm,
    /// model → rules, sorted most specific first (stable by header count, descending).
    pub models: BTreeMap<String, Vec<Rule>>,
    /// model → balancing parameters; models without an entry use the defaults.
    pub lb: hashbrown::HashMap<String, LbParams>,
    /// cluster → static endpoints.
    pub clusters: BTreeMap<String, Vec<EndpointSpec>>,
    /// Prefix hash chunk size in bytes of the canonical prompt.
    pub hash_chunk_bytes: usize,
    /// Largest request body accepted (413 above).
    pub max_body_bytes: u64,
    /// Paths whose POST requests go through pick.
    pub intercept_paths: Vec<String>,
    /// Hosts force the endpoint strictly (no fallback to the cluster's own balancing).
    pub strict_endpoint_override: bool,
    /// Request header a host sets to the chosen cluster for header-based routes.
    pub cluster_header: String,
    /// Path on which hosts answer `GET` with the router's Prometheus metrics ("" = off).
    pub metrics_path: String,
    /// Capacity of the local prefix index, in chunk-hash entries.
    pub prefix_index_capacity: usize,
    /// Bytes of each answer's assistant text captured to learn the next turn's prefix
    /// (0 = off): the prefix index then also records the conversation as the next turn
    /// will render it, for the endpoint that answered.
    pub learn_response_bytes: usize,
    /// Tokens a media part of a prompt (an image, audio clip or video: `image_url`,
    /// `input_image`, an Anthropic `image` block, …) costs its engine's prefill, counted in the
    /// prompt's length (the router's prefill load). Each media part is also part of the
    /// prefix hashes, by a hash of its URL, data or file id.
    pub media_part_tokens: u64,
    /// Sets `stream_options.include_usage` on streamed requests (so every answer reports its
    /// tokens) and drops that usage chunk again for clients that did not ask for it.
    pub force_stream_usage: bool,
    /// Corrects what the prefix index claims for each endpoint with what its answers'
    /// `usage.prompt_tokens_details.cached_tokens` say its engine really had cached
    /// ([`crate::state::AnswerStats::cache_trust`]).
    pub cache_feedback: bool,
    /// KV cache capacity of every endpoint in tokens, for those whose engine does not report
    /// its own (`engine_metrics`); 0: unknown.
    pub cache_capacity_tokens: u64,
    /// Counts a prefix as cached on an endpoint only while it is likely still resident there
    /// (its last use within capacity / write rate; [`crate::state::Residency`]).
    pub cache_residency: bool,
    /// Prices a cache miss on an endpoint by its cache pressure: the share of what its answers
    /// write that recomputes a prefix its engine had evicted
    /// ([`crate::state::Residency::eviction_share`]). A prefix computed there evicts others,
    /// which are needed again with about that probability.
    pub eviction_pressure: bool,
    /// Passive ejection of failing endpoints.
    pub ejection: Ejection,
    /// The request log (the origin's `log` block): one JSON line per finished request.
    pub log: RequestLog,
    /// cluster → `host:port` resolved by DNS on the sync thread (`{"dns": ...}` clusters and
    /// Istio `outbound|PORT||HOST` names without static endpoints).
    pub dns_clusters: BTreeMap<String, String>,
    /// How often DNS clusters are re-resolved, in milliseconds.
    pub dns_refresh_ms: u64,
    /// Metadata-Center client settings.
    pub metadata_center: MetadataCenter,
    /// Reading each endpoint's own Prometheus metrics (requests running and waiting).
    pub engine_metrics: EngineMetrics,
    /// Keeping a conversation on its endpoint (`session_affinity`); None = off.
    pub session_affinity: Option<SessionAffinity>,
}

/// `session_affinity`: a request naming a session (a header, the OpenAI `prompt_cache_key` or
/// `user` field) goes
/// to the endpoint that session last went to, while that endpoint is a candidate (not ejected,
/// not tried, serving the request's subset) and not overloaded: a session moves only when its
/// endpoint has more than `max_extra_requests` more requests in flight than the least loaded
/// candidate and more than `max_load_ratio` times as many.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionAffinity {
    /// The request header naming the session, lower-case (`x-session-id`; "" = none).
    pub header: String,
    /// Also the body's `user` field when neither the header nor `prompt_cache_key` names one
    /// (false).
    pub user_field: bool,
    /// Also the body's `prompt_cache_key` field (OpenAI's routing hint for a shared prefix)
    /// when the header is absent (true).
    pub cache_key_field: bool,
    /// The load ratio to the least loaded candidate above which a session moves (1.5).
    pub max_load_ratio: f64,
    /// The extra requests over the least loaded candidate above which a session moves (8).
    pub max_extra_requests: u64,
}

impl Default for SessionAffinity {
    fn default() -> Self {
        Self {
            header: "x-session-id".into(),
            user_field: false,
            cache_key_field: true,
            max_load_ratio: 1.5,
            max_extra_requests: 8,
        }
    }
}

/// `engine_metrics`: a background thread reads every endpoint's Prometheus page each
/// `period_ms` and scoring counts the requests its engine says it runs and queues when that
/// is more than this router knows of (other gateways', other clients' traffic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineMetrics {
    /// `engine_metrics.enabled`; when not given, on for `prefix_cost` with the Metadata-Center
    /// enabled (several gateways: only the engines see all their writes), off otherwise.
    pub enabled: bool,
    /// Path of the metrics page on every endpoint (`/metrics`).
    pub path: String,
    /// Time between two reads of every endpoint, ms (250).
    pub period_ms: u64,
    /// Deadline of one read (connect, request, answer), ms (200).
    pub timeout_ms: u64,
    /// A reading older than this is ignored, ms (1000).
    pub stale_ms: u64,
    /// Gauges of requests running, summed over their label sets (vLLM's, SGLang's, llama.cpp
    /// server's and Text Generation Inference's names).
    pub running: Vec<String>,
    /// Gauges of requests waiting, summed likewise.
    pub waiting: Vec<String>,
    /// Counters of prompt tokens processed (computed or found cached), summed likewise: with
    /// `cached_tokens` and `generation_tokens`, what the engine wrote into its KV cache.
    pub prompt_tokens: Vec<String>,
    /// Counters of prompt tokens found in the prefix cache (absent: none were).
    pub cached_tokens: Vec<String>,
    /// Counters of tokens generated.
    pub generation_tokens: Vec<String>,
}

impl Default for EngineMetrics {
    fn default() -> Self {
        Self {
            enabled: false,
            path: "/metrics".into(),
            period_ms: 250,
            timeout_ms: 200,
            stale_ms: 1000,
            // vLLM, SGLang, llama.cpp server (`--metrics`), Text Generation Inference
            running: vec![
                "vllm:num_requests_running".into(),
                "sglang:num_running_reqs".into(),
                "llamacpp:requests_processing".into(),
                "tgi_batch_current_size".into(),
            ],
            waiting: vec![
                "vllm:num_requests_waiting".into(),
                "sglang:num_queue_reqs".into(),
                "llamacpp:requests_deferred".into(),
                "tgi_queue_size".into(),
            ],
            // (llama.cpp counts only the prompt tokens it computed, and no cache hits: the
            // same sum)
            prompt_tokens: vec![
                "vllm:prompt_tokens_total".into(),
                "sglang:prompt_tokens_total".into(),
                "llamacpp:prompt_tokens_total".into(),
            ],
            cached_tokens: vec![
                "vllm:prefix_cache_hits_total".into(),
                "sglang:cached_tokens_total".into(),
            ],
            generation_tokens: vec![
                "vllm:generation_tokens_total".into(),
                "sglang:generation_tokens_total".into(),
                "llamacpp:tokens_predicted_total".into(),
            ],
        }
    }
}

/// The request log: one JSON line per finished request, written by a background thread.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequestLog {
    /// Off unless `log.enabled`.
    pub enabled: bool,
    /// The file lines are appended to ("": stderr, which the host sends to its own log).
    pub path: String,
    /// Add the prompt's and the completion's text (each cut to `prompt_max_bytes`).
    pub include_prompt: bool,
    /// Cut of the prompt and completion text when `include_prompt`.
    pub prompt_max_bytes: usize,
    /// Add every candidate of the pick as the scoring saw it (load, cache, score) and what
    /// decided it: why a request went where it went.
    pub include_candidates: bool,
    /// Lines the queue to the writer holds; more are dropped and counted.
    pub queue_lines: usize,
}

impl Config {
    /// Balancing parameters of a model (defaults when it has no `lb_mapping_rule` entry).
    pub fn lb_params(&self, model: &str) -> LbParams {
        self.lb.get(model).copied().unwrap_or_default()
    }
}

/// How an endpoint is named on the Metadata-Center wire (`ip` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointIdentity {
    /// `ip:port` (default; several servers per IP stay apart).
    IpPort,
    /// The bare IP, as the origin's IPv4-only server requires (one server per IP).
    Ip,
}

/// Metadata-Center client settings: the origin's environment variables, overridden by the
/// config's `metadata_center` object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataCenter {
    /// Report load and poll shared state (`METADATA_CENTER_ENABLED`, default false).
    pub enabled: bool,
    /// Server host name or IP (`METADATA_CENTER_HOST`, default localhost).
    pub host: String,
    /// Server port (`METADATA_CENTER_PORT`, default 8080).
    pub port: u16,
    /// Ask the server for remote cache matches before deciding (`METADATA_CENTER_CACHE_ENABLED`,
    /// default false); only for `pick_async` / `pick_start` callers.
    pub cache_enabled: bool,
    /// Timeout of a remote cache lookup, ms (`METADATA_CENTER_TIMEOUT_MS`, default 100). A
    /// lookup that waited this long in the queue decides from local data without asking.
    pub timeout_ms: u64,
    /// Threads making remote cache lookups in parallel (default 2).
    pub lookup_threads: usize,
    /// Timeout of a background report or poll, ms (`METADATA_CENTER_ASYNC_TIMEOUT_MS`, 500).
    pub async_timeout_ms: u64,
    /// Capacity of the event queue; events beyond it are dropped and counted
    /// (`METADATA_CENTER_ASYNC_QUEUE_SIZE`, default 1000).
    pub queue_size: usize,
    /// Load polling period per active cluster, ms (default 50).
    pub load_poll_ms: u64,
    /// Remote load older than this is ignored and local counts are used, ms (default 1000).
    pub load_stale_ms: u64,
    /// Endpoint naming on the wire.
    pub identity: EndpointIdentity,
    /// Optional shared token sent as `Authorization: Bearer <token>`
    /// (`METADATA_CENTER_AUTH_TOKEN`).
    pub auth_token: Option<String>,
}

/// Default `metadata_center.lookup_threads`.
pub const DEFAULT_LOOKUP_THREADS: usize = 2;
/// Default `hash_chunk_bytes`.
pub const DEFAULT_HASH_CHUNK_BYTES: usize = 512;
/// Default `media_part_tokens`: a 336-pixel image of LLaVA-1.5 (576 tokens); vision models
/// range from ~256 (a small tile) to thousands (a high-resolution image, a video).
pub const DEFAULT_MEDIA_PART_TOKENS: u64 = 576;
/// Default `learn_response_bytes` (64 KiB).
pub const DEFAULT_LEARN_RESPONSE_BYTES: usize = 64 * 1024;
/// Default `max_body_bytes` (8 MiB).
pub const DEFAULT_MAX_BODY_BYTES: u64 = 8 * 1024 * 1024;
/// Default `prefix_index_capacity`.
pub const DEFAULT_PREFIX_INDEX_CAPACITY: usize = 200_000;
/// Default `cluster_header`.
pub const DEFAULT_CLUSTER_HEADER: &str = "x-llmproxy-cluster";
/// Default `metrics_path`.
pub const DEFAULT_METRICS_PATH: &str = "/llmproxy/metrics";
/// Default `intercept_paths`.
pub const DEFAULT_INTERCEPT_PATHS: [&str; 6] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/messages",
    "/generate",
    "/completion",
];

/// A configuration error: where (JSON path) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// JSON path of the offending field, e.g. `model_mapping_rule.m1.rules[0].backend`.
    pub path: String,
    /// Human-readable reason.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() || self.path == "." {
            write!(f, "config: {}", self.reason)
        } else {
            write!(f, "config.{}: {}", self.path, self.reason)
        }
    }
}

impl std::error::Error for ConfigError {}

/// A [`ConfigError`] at `path`.
pub(super) fn err(path: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        path: path.into(),
        reason: reason.into(),
    }
}

/// `value` when it lies within `range`, else the error "must be within LO–HI, got VALUE".
pub(super) fn within<T>(
    path: impl Into<String>,
    value: T,
    range: RangeInclusive<T>,
) -> Result<T, ConfigError>
where
    T: PartialOrd + fmt::Display,
{
    if range.contains(&value) {
        return Ok(value);
    }
    let (lo, hi) = range.into_inner();
    Err(err(path, format!("must be within {lo}–{hi}, got {value}")))
}
