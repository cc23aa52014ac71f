//! Configuration: the origin's plugin config (aigw `llmproxy`) plus llmproxy's additions.
//!
//! This module owns parsing and validation. Input is JSON, either the bare object or Istio's
//! TypedStruct shape `{"@type": "...", "value": {...}}`. Field names are the origin's proto
//! snake_case names; the lowerCamelCase spellings that protojson accepts are aliases. Every
//! validation error names the JSON path of the offending field and the reason.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;

use serde::de::{self, Deserializer};
use serde::Deserialize;

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

    fn parse(name: &str) -> Option<Self> {
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
    /// All accepted algorithm names, for error messages.
    pub const NAMES: &'static str = "inference_lb, prefix_cost, random, round_robin, least_request";

    fn parse(name: &str) -> Option<Self> {
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
    pub lb: HashMap<String, LbParams>,
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
    /// Passive ejection of failing endpoints.
    pub ejection: Ejection,
    /// The origin's `log` block (accepted; llmproxy logs through its host).
    pub log_enabled: bool,
    /// cluster → `host:port` resolved by DNS on the sync thread (`{"dns": ...}` clusters and
    /// Istio `outbound|PORT||HOST` names without static endpoints).
    pub dns_clusters: BTreeMap<String, String>,
    /// How often DNS clusters are re-resolved, in milliseconds.
    pub dns_refresh_ms: u64,
    /// Metadata-Center client settings.
    pub metadata_center: MetadataCenter,
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

impl MetadataCenter {
    /// Settings from environment variables (through `env`), before config overrides.
    pub fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        fn num<T: std::str::FromStr>(
            env: &dyn Fn(&str) -> Option<String>,
            name: &str,
            default: T,
        ) -> Result<T, ConfigError> {
            match env(name) {
                None => Ok(default),
                Some(v) => v
                    .trim()
                    .parse()
                    .map_err(|_| err(format!("${name}"), format!("not a valid number: {v:?}"))),
            }
        }
        fn flag(env: &dyn Fn(&str) -> Option<String>, name: &str) -> Result<bool, ConfigError> {
            match env(name).as_deref().map(str::trim) {
                None | Some("") => Ok(false),
                Some("1") | Some("true") | Some("TRUE") | Some("True") => Ok(true),
                Some("0") | Some("false") | Some("FALSE") | Some("False") => Ok(false),
                Some(v) => Err(err(format!("${name}"), format!("not a boolean: {v:?}"))),
            }
        }
        Ok(Self {
            enabled: flag(env, "METADATA_CENTER_ENABLED")?,
            host: env("METADATA_CENTER_HOST")
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "localhost".into()),
            port: num(env, "METADATA_CENTER_PORT", 8080)?,
            cache_enabled: flag(env, "METADATA_CENTER_CACHE_ENABLED")?,
            timeout_ms: num(env, "METADATA_CENTER_TIMEOUT_MS", 100)?,
            lookup_threads: DEFAULT_LOOKUP_THREADS,
            async_timeout_ms: num(env, "METADATA_CENTER_ASYNC_TIMEOUT_MS", 500)?,
            queue_size: num(env, "METADATA_CENTER_ASYNC_QUEUE_SIZE", 1000)?,
            load_poll_ms: 50,
            load_stale_ms: 1000,
            identity: EndpointIdentity::IpPort,
            auth_token: env("METADATA_CENTER_AUTH_TOKEN").filter(|t| !t.is_empty()),
        })
    }
}

/// Default `metadata_center.lookup_threads`.
pub const DEFAULT_LOOKUP_THREADS: usize = 2;
/// Default `hash_chunk_bytes`.
pub const DEFAULT_HASH_CHUNK_BYTES: usize = 512;
/// Default `max_body_bytes` (8 MiB).
pub const DEFAULT_MAX_BODY_BYTES: u64 = 8 * 1024 * 1024;
/// Default `prefix_index_capacity`.
pub const DEFAULT_PREFIX_INDEX_CAPACITY: usize = 200_000;
/// Default `cluster_header`.
pub const DEFAULT_CLUSTER_HEADER: &str = "x-llmproxy-cluster";
/// Default `metrics_path`.
pub const DEFAULT_METRICS_PATH: &str = "/llmproxy/metrics";
/// Default `intercept_paths`.
pub const DEFAULT_INTERCEPT_PATHS: [&str; 2] = ["/v1/chat/completions", "/v1/completions"];

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

fn err(path: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        path: path.into(),
        reason: reason.into(),
    }
}

// ---- raw serde shapes (field names as users write them) ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    algorithm: Option<String>,
    #[serde(default, alias = "modelMappingRule")]
    model_mapping_rule: BTreeMap<String, RawRules>,
    #[serde(default, alias = "lbMappingRule")]
    lb_mapping_rule: BTreeMap<String, RawLbConfig>,
    #[serde(default)]
    log: Option<RawLog>,
    #[serde(default)]
    clusters: BTreeMap<String, RawCluster>,
    #[serde(default, deserialize_with = "lenient_u64")]
    hash_chunk_bytes: Option<u64>,
    #[serde(default, deserialize_with = "lenient_u64")]
    max_body_bytes: Option<u64>,
    #[serde(default)]
    intercept_paths: Option<Vec<String>>,
    #[serde(default)]
    strict_endpoint_override: Option<bool>,
    #[serde(default)]
    cluster_header: Option<String>,
    #[serde(default)]
    metrics_path: Option<String>,
    #[serde(default, deserialize_with = "lenient_u64")]
    prefix_index_capacity: Option<u64>,
    #[serde(default)]
    ejection: Option<RawEjection>,
    #[serde(default, deserialize_with = "lenient_u64")]
    dns_refresh_ms: Option<u64>,
    #[serde(default)]
    metadata_center: Option<RawMetadataCenter>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetadataCenter {
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    host: Option<String>,
    #[serde(default, deserialize_with = "lenient_u64")]
    port: Option<u64>,
    #[serde(default)]
    cache_enabled: Option<bool>,
    #[serde(default, deserialize_with = "lenient_u64")]
    timeout_ms: Option<u64>,
    #[serde(default, deserialize_with = "lenient_u64")]
    lookup_threads: Option<u64>,
    #[serde(default, deserialize_with = "lenient_u64")]
    async_timeout_ms: Option<u64>,
    #[serde(default, deserialize_with = "lenient_u64")]
    queue_size: Option<u64>,
    #[serde(default, deserialize_with = "lenient_u64")]
    load_poll_ms: Option<u64>,
    #[serde(default, deserialize_with = "lenient_u64")]
    load_stale_ms: Option<u64>,
    #[serde(default)]
    endpoint_identity: Option<String>,
    #[serde(default)]
    auth_token: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRules {
    rules: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(default, alias = "sceneName")]
    scene_name: String,
    #[serde(default)]
    cluster: String,
    #[serde(default)]
    backend: String,
    #[serde(default)]
    headers: Vec<RawHeader>,
    #[serde(default, alias = "routeName")]
    route_name: String,
    #[serde(default)]
    subset: Vec<RawSubset>,
    #[serde(default, alias = "targetModel")]
    target_model: String,
    #[serde(default, alias = "chatTemplate")]
    chat_template: Option<String>,
    /// Deprecated in the origin, accepted and ignored.
    #[serde(default, deserialize_with = "lenient_i64")]
    #[allow(dead_code)]
    weight: Option<i64>,
    /// Stored as "model version" by the origin, otherwise unused; accepted and ignored.
    #[serde(default, alias = "chainName")]
    #[allow(dead_code)]
    chain_name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeader {
    key: String,
    #[serde(default)]
    value: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSubset {
    #[serde(default)]
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    lora: String,
    #[serde(default, deserialize_with = "lenient_i64")]
    weight: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLbConfig {
    #[serde(default, alias = "loadAwareEnable")]
    load_aware_enable: Option<bool>,
    #[serde(default, alias = "cacheAwareEnable")]
    cache_aware_enable: Option<bool>,
    #[serde(default, alias = "candidatePercent", deserialize_with = "lenient_f64")]
    candidate_percent: Option<f64>,
    #[serde(default, alias = "requestLoadWeight", deserialize_with = "lenient_f64")]
    request_load_weight: Option<f64>,
    #[serde(default, alias = "prefillLoadWeight", deserialize_with = "lenient_f64")]
    prefill_load_weight: Option<f64>,
    #[serde(default, alias = "cacheRadioWeight", deserialize_with = "lenient_f64")]
    cache_radio_weight: Option<f64>,
    #[serde(default, deserialize_with = "lenient_f64")]
    decode_cost_chars: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    #[serde(default)]
    enabled: bool,
    #[serde(default)]
    #[allow(dead_code)]
    path: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    #[serde(default)]
    endpoints: Vec<RawEndpoint>,
    #[serde(default)]
    dns: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawEndpoint {
    Address(String),
    Object(RawEndpointObject),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpointObject {
    address: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    lora_adapters: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEjection {
    #[serde(default, deserialize_with = "lenient_u64")]
    consecutive_failures: Option<u64>,
    #[serde(default, deserialize_with = "lenient_u64")]
    eject_ms: Option<u64>,
}

/// Reads a number, or a string holding one: Envoy hands `google.protobuf.Struct` doubles to
/// modules as `10.0`, and non-integral ones as strings.
fn number_like<'de, D: Deserializer<'de>>(d: D) -> Result<Option<serde_json::Number>, D::Error> {
    struct V;
    impl<'de> de::Visitor<'de> for V {
        type Value = Option<serde_json::Number>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a number")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v.into()))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v.into()))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            serde_json::Number::from_f64(v)
                .map(Some)
                .ok_or_else(|| E::custom("expected a finite number"))
        }
        fn visit_str<E: de::Error>(self, t: &str) -> Result<Self::Value, E> {
            serde_json::from_str::<serde_json::Number>(t.trim())
                .map(Some)
                .map_err(|_| E::custom(format!("expected a number, got the string {t:?}")))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(V)
}

/// Numbers may arrive as `10.0` or `"10"` (protobuf `Struct` through Envoy): accept
/// integral floats and numeric strings.
fn lenient_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match number_like(d)? {
        None => Ok(None),
        Some(n) => {
            if let Some(v) = n.as_u64() {
                return Ok(Some(v));
            }
            match n.as_f64() {
                Some(f) if f >= 0.0 && f.fract() == 0.0 && f <= u64::MAX as f64 => {
                    Ok(Some(f as u64))
                }
                _ => Err(de::Error::custom(format!(
                    "expected a non-negative integer, got {n}"
                ))),
            }
        }
    }
}

fn lenient_i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    match number_like(d)? {
        None => Ok(None),
        Some(n) => match n.as_i64() {
            Some(v) => Ok(Some(v)),
            None => match n.as_f64() {
                Some(f) if f.fract() == 0.0 => Ok(Some(f as i64)),
                _ => Err(de::Error::custom(format!("expected an integer, got {n}"))),
            },
        },
    }
}

fn lenient_f64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    Ok(number_like(d)?.and_then(|n| n.as_f64()))
}

impl Config {
    /// Parses and validates a JSON config (bare object or Istio TypedStruct).
    pub fn from_json(bytes: &[u8]) -> Result<Config, ConfigError> {
        Self::from_json_with_env(bytes, &|name| std::env::var(name).ok())
    }

    /// Like [`Config::from_json`], with environment variables read through `env`.
    pub fn from_json_with_env(
        bytes: &[u8],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| err("", format!("invalid JSON: {e}")))?;
        let (value, prefix) = unwrap_typed_struct(value)?;
        let raw: RawConfig = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let reason = e.into_inner().to_string();
            err(join_path(prefix, &path), reason)
        })?;
        validate(raw, env).map_err(|e| ConfigError {
            path: join_path(prefix, &e.path),
            reason: e.reason,
        })
    }

    /// Balancing parameters of a model (defaults when it has no `lb_mapping_rule` entry).
    pub fn lb_params(&self, model: &str) -> LbParams {
        self.lb.get(model).copied().unwrap_or_default()
    }
}

fn join_path(prefix: &str, path: &str) -> String {
    match (prefix.is_empty(), path.is_empty() || path == ".") {
        (true, _) => path.to_string(),
        (false, true) => prefix.to_string(),
        (false, false) => format!("{prefix}.{path}"),
    }
}

/// Accepts `{"@type": ..., "value": {...}}` (Istio TypedStruct) as well as the bare object.
fn unwrap_typed_struct(
    value: serde_json::Value,
) -> Result<(serde_json::Value, &'static str), ConfigError> {
    match value {
        serde_json::Value::Object(mut map) if map.contains_key("@type") => {
            let value = map
                .remove("value")
                .ok_or_else(|| err("value", "TypedStruct without a \"value\" object"))?;
            if let Some(extra) = map.keys().find(|k| *k != "@type" && *k != "type_url") {
                return Err(err(extra.clone(), "unknown field next to \"@type\""));
            }
            if !value.is_object() {
                return Err(err("value", "must be an object"));
            }
            Ok((value, "value"))
        }
        serde_json::Value::Object(_) => Ok((value, "")),
        other => Err(err(
            "",
            format!("must be a JSON object, got {}", json_kind(&other)),
        )),
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// True when `name` is a valid HTTP header field name (RFC 9110 token).
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Why `value` cannot be placed in a request header as it is (the cluster and scene names
/// hosts send upstream): `None` when it is visible ASCII without spaces (0x21–0x7E).
fn header_unsafe(value: &str) -> Option<String> {
    let bad = value.bytes().find(|b| !(0x21..=0x7e).contains(b))?;
    Some(format!(
        "{value:?} cannot go into a request header: only visible ASCII without spaces \
         is allowed (found byte 0x{bad:02x})"
    ))
}

fn validate(raw: RawConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    if let Some(p) = &raw.protocol {
        if p != "openai" {
            return Err(err(
                "protocol",
                format!("unsupported protocol {p:?} (expected \"openai\")"),
            ));
        }
    }
    let algorithm = match raw.algorithm.as_deref() {
        None | Some("") => Algorithm::InferenceLb,
        Some(name) => Algorithm::parse(name).ok_or_else(|| {
            err(
                "algorithm",
                format!(
                    "unknown algorithm {name:?} (expected one of {})",
                    Algorithm::NAMES
                ),
            )
        })?,
    };

    let mut models = BTreeMap::new();
    for (model, rules) in raw.model_mapping_rule {
        let base = format!("model_mapping_rule.{model}");
        if model.is_empty() {
            return Err(err(base, "model name must not be empty"));
        }
        if rules.rules.is_empty() {
            return Err(err(format!("{base}.rules"), "must list at least one rule"));
        }
        let mut out = Vec::with_capacity(rules.rules.len());
        for (i, r) in rules.rules.into_iter().enumerate() {
            out.push(validate_rule(r, &format!("{base}.rules[{i}]"))?);
        }
        // Most specific first; stable so that equal header counts keep config order.
        out.sort_by_key(|r| std::cmp::Reverse(r.headers.len()));
        models.insert(model, out);
    }

    let mut lb = HashMap::new();
    for (model, l) in raw.lb_mapping_rule {
        let base = format!("lb_mapping_rule.{model}");
        let d = LbParams::default();
        let p = LbParams {
            load_aware: l.load_aware_enable.unwrap_or(d.load_aware),
            cache_aware: l.cache_aware_enable.unwrap_or(d.cache_aware),
            candidate_percent: l.candidate_percent.unwrap_or(d.candidate_percent),
            request_load_weight: l.request_load_weight.unwrap_or(d.request_load_weight),
            prefill_load_weight: l.prefill_load_weight.unwrap_or(d.prefill_load_weight),
            cache_ratio_weight: l.cache_radio_weight.unwrap_or(d.cache_ratio_weight),
            decode_cost_chars: l.decode_cost_chars.unwrap_or(d.decode_cost_chars),
        };
        if !(0.0..=100.0).contains(&p.candidate_percent) {
            return Err(err(
                format!("{base}.candidate_percent"),
                format!("must be within 0–100, got {}", p.candidate_percent),
            ));
        }
        for (name, w) in [
            ("request_load_weight", p.request_load_weight),
            ("prefill_load_weight", p.prefill_load_weight),
            ("cache_radio_weight", p.cache_ratio_weight),
            ("decode_cost_chars", p.decode_cost_chars),
        ] {
            if !(w >= 0.0 && w.is_finite()) {
                return Err(err(
                    format!("{base}.{name}"),
                    format!("must be a non-negative number, got {w}"),
                ));
            }
        }
        lb.insert(model, p);
    }

    let mut clusters = BTreeMap::new();
    let mut dns_clusters = BTreeMap::new();
    for (name, c) in raw.clusters {
        let base = format!("clusters.{name}");
        if name.is_empty() {
            return Err(err(base, "cluster name must not be empty"));
        }
        if let Some(why) = header_unsafe(&name) {
            return Err(err(base, format!("cluster name {why}")));
        }
        if let Some(dns) = c.dns {
            if !c.endpoints.is_empty() {
                return Err(err(base, "give either \"endpoints\" or \"dns\", not both"));
            }
            check_dns_target(&dns).map_err(|r| err(format!("{base}.dns"), r))?;
            dns_clusters.insert(name, dns);
            continue;
        }
        let mut eps = Vec::with_capacity(c.endpoints.len());
        for (i, e) in c.endpoints.into_iter().enumerate() {
            let at = format!("{base}.endpoints[{i}]");
            eps.push(match e {
                RawEndpoint::Address(a) => EndpointSpec {
                    addr: parse_endpoint(&a).map_err(|r| err(at, r))?,
                    labels: BTreeMap::new(),
                    lora_adapters: Vec::new(),
                },
                RawEndpoint::Object(o) => EndpointSpec {
                    addr: parse_endpoint(&o.address)
                        .map_err(|r| err(format!("{at}.address"), r))?,
                    labels: o.labels,
                    lora_adapters: o.lora_adapters,
                },
            });
        }
        clusters.insert(name, eps);
    }

    let hash_chunk_bytes = raw
        .hash_chunk_bytes
        .unwrap_or(DEFAULT_HASH_CHUNK_BYTES as u64);
    if !(16..=1 << 20).contains(&hash_chunk_bytes) {
        return Err(err(
            "hash_chunk_bytes",
            format!("must be within 16–1048576, got {hash_chunk_bytes}"),
        ));
    }
    let max_body_bytes = raw.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
    if !(1024..=1 << 30).contains(&max_body_bytes) {
        return Err(err(
            "max_body_bytes",
            format!("must be within 1024–1073741824, got {max_body_bytes}"),
        ));
    }
    let intercept_paths = match raw.intercept_paths {
        None => DEFAULT_INTERCEPT_PATHS
            .iter()
            .map(|s| s.to_string())
            .collect(),
        Some(paths) => {
            for (i, p) in paths.iter().enumerate() {
                if !p.starts_with('/') {
                    return Err(err(
                        format!("intercept_paths[{i}]"),
                        format!("must start with '/', got {p:?}"),
                    ));
                }
            }
            paths
        }
    };
    let cluster_header = raw
        .cluster_header
        .unwrap_or_else(|| DEFAULT_CLUSTER_HEADER.to_string())
        .to_ascii_lowercase();
    if !is_header_name(&cluster_header) {
        return Err(err(
            "cluster_header",
            format!("not a valid header name: {cluster_header:?}"),
        ));
    }
    let metrics_path = raw
        .metrics_path
        .unwrap_or_else(|| DEFAULT_METRICS_PATH.to_string());
    if !metrics_path.is_empty() && !metrics_path.starts_with('/') {
        return Err(err(
            "metrics_path",
            format!("must start with '/' (or be \"\" to disable), got {metrics_path:?}"),
        ));
    }
    let prefix_index_capacity = raw
        .prefix_index_capacity
        .unwrap_or(DEFAULT_PREFIX_INDEX_CAPACITY as u64);
    if !(1..=100_000_000).contains(&prefix_index_capacity) {
        return Err(err(
            "prefix_index_capacity",
            format!("must be within 1–100000000, got {prefix_index_capacity}"),
        ));
    }
    let mut ejection = Ejection::default();
    if let Some(e) = raw.ejection {
        if let Some(n) = e.consecutive_failures {
            ejection.consecutive_failures =
                u32::try_from(n).map_err(|_| err("ejection.consecutive_failures", "too large"))?;
        }
        if let Some(ms) = e.eject_ms {
            ejection.eject_ms = ms;
        }
    }

    // Istio cluster names `outbound|PORT||HOST` resolve by DNS when nothing else lists them.
    for rule in models.values().flatten() {
        if clusters.contains_key(&rule.cluster) || dns_clusters.contains_key(&rule.cluster) {
            continue;
        }
        if let Some(target) = istio_dns_target(&rule.cluster) {
            dns_clusters.insert(rule.cluster.clone(), target);
        }
    }
    let dns_refresh_ms = raw.dns_refresh_ms.unwrap_or(5000).max(100);
    let metadata_center = merge_metadata_center(raw.metadata_center, env)?;

    Ok(Config {
        algorithm,
        models,
        lb,
        clusters,
        hash_chunk_bytes: hash_chunk_bytes as usize,
        max_body_bytes,
        intercept_paths,
        strict_endpoint_override: raw.strict_endpoint_override.unwrap_or(true),
        cluster_header,
        metrics_path,
        prefix_index_capacity: prefix_index_capacity as usize,
        ejection,
        log_enabled: raw.log.map(|l| l.enabled).unwrap_or(false),
        dns_clusters,
        dns_refresh_ms,
        metadata_center,
    })
}

fn merge_metadata_center(
    raw: Option<RawMetadataCenter>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<MetadataCenter, ConfigError> {
    let mut m = MetadataCenter::from_env(env)?;
    let Some(r) = raw else { return Ok(m) };
    let base = "metadata_center";
    if let Some(v) = r.enabled {
        m.enabled = v;
    }
    if let Some(h) = r.host {
        if h.is_empty() {
            return Err(err(format!("{base}.host"), "must not be empty"));
        }
        m.host = h;
    }
    if let Some(p) = r.port {
        m.port = u16::try_from(p)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| err(format!("{base}.port"), format!("not a valid port: {p}")))?;
    }
    if let Some(v) = r.cache_enabled {
        m.cache_enabled = v;
    }
    for (name, value, slot) in [
        ("timeout_ms", r.timeout_ms, &mut m.timeout_ms),
        (
            "async_timeout_ms",
            r.async_timeout_ms,
            &mut m.async_timeout_ms,
        ),
        ("load_poll_ms", r.load_poll_ms, &mut m.load_poll_ms),
        ("load_stale_ms", r.load_stale_ms, &mut m.load_stale_ms),
    ] {
        if let Some(v) = value {
            if !(1..=600_000).contains(&v) {
                return Err(err(
                    format!("{base}.{name}"),
                    format!("must be within 1–600000, got {v}"),
                ));
            }
            *slot = v;
        }
    }
    if let Some(t) = r.lookup_threads {
        if !(1..=64).contains(&t) {
            return Err(err(
                format!("{base}.lookup_threads"),
                format!("must be within 1–64, got {t}"),
            ));
        }
        m.lookup_threads = t as usize;
    }
    if let Some(q) = r.queue_size {
        if !(1..=1_000_000).contains(&q) {
            return Err(err(
                format!("{base}.queue_size"),
                format!("must be within 1–1000000, got {q}"),
            ));
        }
        m.queue_size = q as usize;
    }
    if let Some(id) = r.endpoint_identity {
        m.identity = match id.as_str() {
            "ip_port" => EndpointIdentity::IpPort,
            "ip" => EndpointIdentity::Ip,
            other => {
                return Err(err(
                    format!("{base}.endpoint_identity"),
                    format!("unknown identity {other:?} (expected \"ip_port\" or \"ip\")"),
                ))
            }
        };
    }
    if let Some(t) = r.auth_token {
        m.auth_token = Some(t).filter(|t| !t.is_empty());
    }
    Ok(m)
}

/// Checks a DNS cluster target `host:port`.
fn check_dns_target(target: &str) -> Result<(), String> {
    let (host, port) = target
        .rsplit_once(':')
        .ok_or_else(|| format!("must be \"host:port\", got {target:?}"))?;
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(format!("must be \"host:port\", got {target:?}"));
    }
    Ok(())
}

/// `outbound|8000||vllm.ns.svc.cluster.local` → `vllm.ns.svc.cluster.local:8000`.
pub fn istio_dns_target(cluster: &str) -> Option<String> {
    let mut parts = cluster.split('|');
    let (dir, port, _subset, host) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || dir != "outbound" || host.is_empty() {
        return None;
    }
    let port: u16 = port.parse().ok().filter(|p| *p > 0)?;
    Some(format!("{host}:{port}"))
}

fn validate_rule(r: RawRule, base: &str) -> Result<Rule, ConfigError> {
    if r.cluster.is_empty() || r.cluster.len() > 256 {
        return Err(err(format!("{base}.cluster"), "required, 1–256 characters"));
    }
    let backend = Backend::parse(&r.backend).ok_or_else(|| {
        err(
            format!("{base}.backend"),
            format!(
                "unknown backend {:?} (expected one of {})",
                r.backend,
                Backend::NAMES
            ),
        )
    })?;
    if let Some(why) = header_unsafe(&r.cluster) {
        return Err(err(format!("{base}.cluster"), why));
    }
    if r.scene_name.len() > 128 {
        return Err(err(
            format!("{base}.scene_name"),
            "longer than 128 characters",
        ));
    }
    if let Some(why) = header_unsafe(&r.scene_name) {
        return Err(err(format!("{base}.scene_name"), why));
    }
    let mut headers = Vec::with_capacity(r.headers.len());
    for (i, h) in r.headers.into_iter().enumerate() {
        if !is_header_name(&h.key) || h.key.len() > 16 * 1024 {
            return Err(err(
                format!("{base}.headers[{i}].key"),
                format!("not a valid header name: {:?}", h.key),
            ));
        }
        if h.value.len() > 16 * 1024 {
            return Err(err(
                format!("{base}.headers[{i}].value"),
                "longer than 16 KiB",
            ));
        }
        headers.push(HeaderMatch {
            key: h.key.to_ascii_lowercase(),
            value: h.value,
        });
    }
    let chat_template = match r.chat_template.as_deref() {
        None | Some("") => crate::transcode::templates::ChatTemplate::ChatMl,
        Some(name) => crate::transcode::templates::ChatTemplate::parse(name).ok_or_else(|| {
            err(
                format!("{base}.chat_template"),
                format!(
                    "unknown chat template {name:?} (expected one of {})",
                    crate::transcode::templates::ChatTemplate::NAMES
                ),
            )
        })?,
    };
    let mut subset = Vec::with_capacity(r.subset.len());
    for (i, s) in r.subset.into_iter().enumerate() {
        let weight = match s.weight {
            None => 1,
            Some(w) if (0..=1_000_000).contains(&w) => w as u32,
            Some(w) => {
                return Err(err(
                    format!("{base}.subset[{i}].weight"),
                    format!("must be within 0–1000000, got {w}"),
                ))
            }
        };
        subset.push(Subset {
            name: s.name,
            labels: s.labels,
            lora: s.lora,
            weight,
        });
    }
    if !subset.is_empty() && subset.iter().all(|s| s.weight == 0) {
        return Err(err(
            format!("{base}.subset"),
            "at least one subset needs a weight above 0",
        ));
    }
    Ok(Rule {
        scene_name: r.scene_name,
        cluster: r.cluster,
        backend,
        headers,
        route_name: r.route_name,
        subset,
        target_model: r.target_model,
        chat_template,
    })
}

/// Parses an endpoint `ip:port` (IPv6 as `[addr]:port`); hostnames are rejected.
pub fn parse_endpoint(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s
        .parse()
        .map_err(|_| format!("endpoint must be \"ip:port\" with a literal IP, got {s:?}"))?;
    if addr.port() == 0 {
        return Err(format!("endpoint port must not be 0, got {s:?}"));
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, String> {
        Config::from_json(s.as_bytes()).map_err(|e| e.to_string())
    }

    const BASIC: &str = r#"{
        "protocol": "openai",
        "model_mapping_rule": {
            "m1": {"rules": [
                {"cluster": "c-default", "backend": "vllm"},
                {"cluster": "c-gray", "backend": "vllm", "headers": [{"key": "X-Env", "value": "gray"}]}
            ]}
        },
        "lb_mapping_rule": {"m1": {"candidate_percent": 20}},
        "clusters": {"c-default": {"endpoints": ["127.0.0.1:8001", "[::1]:8002"]}}
    }"#;

    #[test]
    fn parses_basic_config_with_defaults() {
        let c = parse(BASIC).unwrap();
        assert_eq!(c.algorithm, Algorithm::InferenceLb);
        let rules = &c.models["m1"];
        // The rule with a header condition sorts first.
        assert_eq!(rules[0].cluster, "c-gray");
        assert_eq!(rules[0].headers[0].key, "x-env");
        assert_eq!(rules[1].cluster, "c-default");
        // Missing lb fields take the documented defaults, not zero.
        let p = c.lb_params("m1");
        assert_eq!(p.candidate_percent, 20.0);
        assert_eq!(p.cache_ratio_weight, 2.0);
        assert_eq!(p.request_load_weight, 1.0);
        assert_eq!(p.prefill_load_weight, 3.0);
        assert!(p.load_aware && p.cache_aware);
        assert_eq!(c.lb_params("other"), LbParams::default());
        assert_eq!(c.clusters["c-default"].len(), 2);
        assert_eq!(c.hash_chunk_bytes, 512);
        assert_eq!(c.max_body_bytes, 8 << 20);
        assert!(c.strict_endpoint_override);
        assert_eq!(c.metrics_path, "/llmproxy/metrics");
        assert_eq!(parse(r#"{"metrics_path": ""}"#).unwrap().metrics_path, "");
        assert!(parse(r#"{"metrics_path": "metrics"}"#)
            .unwrap_err()
            .starts_with("config.metrics_path: must start with '/'"));
    }

    #[test]
    fn accepts_typed_struct_and_camel_case() {
        let s = r#"{"@type": "type.googleapis.com/udpa.type.v1.TypedStruct", "value": {
            "protocol": "openai", "algorithm": "round_robin",
            "modelMappingRule": {"m": {"rules": [{"cluster": "c", "backend": "sglang", "sceneName": "s"}]}},
            "lbMappingRule": {"m": {"cacheRadioWeight": 4.0, "candidatePercent": 5}}
        }}"#;
        let c = parse(s).unwrap();
        assert_eq!(c.algorithm, Algorithm::RoundRobin);
        assert_eq!(c.models["m"][0].scene_name, "s");
        assert_eq!(c.lb_params("m").cache_ratio_weight, 4.0);
    }

    #[test]
    fn integral_floats_are_accepted_for_integers() {
        let c = parse(r#"{"hash_chunk_bytes": 256.0, "max_body_bytes": 2048}"#).unwrap();
        assert_eq!(c.hash_chunk_bytes, 256);
        let e = parse(r#"{"hash_chunk_bytes": 256.5}"#).unwrap_err();
        assert!(e.contains("hash_chunk_bytes"), "{e}");
        // Envoy hands Struct doubles over as strings.
        let c = parse(
            r#"{"max_body_bytes": "4096", "lb_mapping_rule": {"m": {"candidate_percent": "7.5"}}}"#,
        )
        .unwrap();
        assert_eq!(
            (c.max_body_bytes, c.lb_params("m").candidate_percent),
            (4096, 7.5)
        );
        let e =
            parse(r#"{"lb_mapping_rule": {"m": {"prefill_load_weight": "heavy"}}}"#).unwrap_err();
        assert!(
            e.starts_with(
                "config.lb_mapping_rule.m.prefill_load_weight: expected a number, got the string"
            ),
            "{e}"
        );
    }

    #[test]
    fn errors_name_path_and_reason() {
        let cases = [
            (
                r#"{"model_mapping_rule": {"m1": {"rules": [{"cluster": "c", "backend": "tgi"}]}}}"#,
                "config.model_mapping_rule.m1.rules[0].backend: unknown backend \"tgi\"",
            ),
            (
                r#"{"model_mapping_rule": {"m1": {"rules": [{"cluster": "c", "backend": "vllm", "bogus": 1}]}}}"#,
                "config.model_mapping_rule.m1.rules[0].bogus: unknown field `bogus`",
            ),
            (
                r#"{"lb_mapping_rule": {"m1": {"candidate_percent": 150}}}"#,
                "config.lb_mapping_rule.m1.candidate_percent: must be within 0–100",
            ),
            (
                r#"{"lb_mapping_rule": {"m1": {"request_load_weight": true}}}"#,
                "config.lb_mapping_rule.m1.request_load_weight: invalid type: boolean `true`, expected a number",
            ),
            (
                r#"{"clusters": {"c": {"endpoints": ["model-server:8000"]}}}"#,
                "config.clusters.c.endpoints[0]: endpoint must be \"ip:port\"",
            ),
            (
                r#"{"algorithm": "fastest"}"#,
                "config.algorithm: unknown algorithm",
            ),
            (
                r#"{"protocol": "grpc"}"#,
                "config.protocol: unsupported protocol",
            ),
            (r#"[1, 2]"#, "config: must be a JSON object, got an array"),
            (
                r#"{"model_mapping_rule": {"m": {"rules": []}}}"#,
                "config.model_mapping_rule.m.rules: must list at least one rule",
            ),
            (
                r#"{"@type": "x", "value": {"unknown_top": 1}}"#,
                "config.value.unknown_top: unknown field `unknown_top`",
            ),
            (
                r#"{"model_mapping_rule": {"m": {"rules": [{"cluster": "c", "backend": "vllm", "headers": [{"key": "bad header", "value": "v"}]}]}}}"#,
                "config.model_mapping_rule.m.rules[0].headers[0].key: not a valid header name",
            ),
            (
                r#"{"model_mapping_rule": {"m": {"rules": [{"backend": "vllm"}]}}}"#,
                "config.model_mapping_rule.m.rules[0].cluster: required",
            ),
            ("{not json", "config: invalid JSON"),
            (
                r#"{"model_mapping_rule": {"m": {"rules": [{"cluster": "c", "backend": "vllm", "scene_name": "a\r\nx-evil: 1"}]}}}"#,
                "config.model_mapping_rule.m.rules[0].scene_name: \"a\\r\\nx-evil: 1\" cannot go into a request header",
            ),
            (
                r#"{"model_mapping_rule": {"m": {"rules": [{"cluster": "c\u0000d", "backend": "vllm"}]}}}"#,
                "config.model_mapping_rule.m.rules[0].cluster: \"c\\0d\" cannot go into a request header",
            ),
            (
                r#"{"clusters": {"a\nb": {"endpoints": ["127.0.0.1:1"]}}}"#,
                "config.clusters.a\nb: cluster name \"a\\nb\" cannot go into a request header",
            ),
        ];
        for (input, want) in cases {
            let got = parse(input).unwrap_err();
            assert!(
                got.starts_with(want),
                "input {input}\n got: {got}\nwant: {want}"
            );
        }
    }

    #[test]
    fn metadata_center_from_env_then_config() {
        let env = |name: &str| match name {
            "METADATA_CENTER_ENABLED" => Some("true".to_string()),
            "METADATA_CENTER_HOST" => Some("mc.internal".to_string()),
            "METADATA_CENTER_TIMEOUT_MS" => Some("80".to_string()),
            _ => None,
        };
        let c = Config::from_json_with_env(
            br#"{"metadata_center": {"port": 9090, "cache_enabled": true}}"#,
            &env,
        )
        .unwrap();
        let m = &c.metadata_center;
        assert!(m.enabled && m.cache_enabled);
        assert_eq!(
            (
                m.host.as_str(),
                m.port,
                m.timeout_ms,
                m.async_timeout_ms,
                m.queue_size
            ),
            ("mc.internal", 9090, 80, 500, 1000)
        );
        let off = Config::from_json_with_env(b"{}", &|_| None)
            .unwrap()
            .metadata_center;
        assert!(!off.enabled && off.host == "localhost" && off.port == 8080);
        let bad = Config::from_json_with_env(b"{}", &|n| {
            (n == "METADATA_CENTER_PORT").then(|| "eighty".to_string())
        });
        assert_eq!(
            bad.unwrap_err().to_string(),
            "config.$METADATA_CENTER_PORT: not a valid number: \"eighty\""
        );
        let bad = Config::from_json_with_env(
            br#"{"metadata_center": {"endpoint_identity": "mac"}}"#,
            &|_| None,
        );
        assert!(bad
            .unwrap_err()
            .to_string()
            .starts_with("config.metadata_center.endpoint_identity: unknown identity"));
        assert_eq!(m.lookup_threads, DEFAULT_LOOKUP_THREADS);
        let four = br#"{"metadata_center": {"lookup_threads": "4"}}"#;
        let four = Config::from_json_with_env(four, &|_| None).unwrap();
        assert_eq!(four.metadata_center.lookup_threads, 4);
        let bad =
            Config::from_json_with_env(br#"{"metadata_center": {"lookup_threads": 0}}"#, &|_| None);
        assert_eq!(
            bad.unwrap_err().to_string(),
            "config.metadata_center.lookup_threads: must be within 1–64, got 0"
        );
    }

    #[test]
    fn endpoint_objects_subsets_and_rewrites() {
        let c = parse(r#"{"model_mapping_rule": {"m": {"rules": [{"cluster": "c", "backend": "triton",
                "target_model": "ensemble", "chat_template": "llama3",
                "subset": [{"name": "a", "labels": {"gpu": "h100"}, "lora": "sql-lora", "weight": 3}, {"name": "b"}]}]}},
            "clusters": {"c": {"endpoints": ["127.0.0.1:1", {"address": "127.0.0.1:2", "labels": {"gpu": "h100"}, "lora_adapters": ["sql-lora"]}]}}}"#).unwrap();
        let r = &c.models["m"][0];
        assert_eq!(r.target_model, "ensemble");
        assert_eq!(
            r.chat_template,
            crate::transcode::templates::ChatTemplate::Llama3
        );
        assert_eq!((r.subset[0].weight, r.subset[1].weight), (3, 1));
        assert_eq!(c.clusters["c"][1].labels["gpu"], "h100");
        assert_eq!(c.clusters["c"][1].lora_adapters, vec!["sql-lora"]);
        let e = parse(r#"{"model_mapping_rule": {"m": {"rules": [{"cluster": "c", "backend": "triton", "chat_template": "vicuna"}]}}}"#).unwrap_err();
        assert!(
            e.starts_with(
                "config.model_mapping_rule.m.rules[0].chat_template: unknown chat template"
            ),
            "{e}"
        );
        let e =
            parse(r#"{"clusters": {"c": {"endpoints": [{"address": "host:1"}]}}}"#).unwrap_err();
        assert!(
            e.starts_with("config.clusters.c.endpoints[0].address: endpoint must be"),
            "{e}"
        );
    }

    #[test]
    fn dns_clusters_and_istio_names() {
        let c = parse(
            r#"{"model_mapping_rule": {"m": {"rules": [
                {"cluster": "outbound|8000||vllm.llm.svc.cluster.local", "backend": "vllm"},
                {"cluster": "named", "backend": "vllm", "headers": [{"key": "x", "value": "1"}]}]}},
            "clusters": {"named": {"dns": "localhost:9000"}}}"#,
        )
        .unwrap();
        assert_eq!(c.dns_clusters["named"], "localhost:9000");
        assert_eq!(
            c.dns_clusters["outbound|8000||vllm.llm.svc.cluster.local"],
            "vllm.llm.svc.cluster.local:8000"
        );
        assert_eq!(istio_dns_target("inbound|8000||x"), None);
        assert_eq!(istio_dns_target("plain"), None);
        let e = parse(r#"{"clusters": {"c": {"dns": "nohost"}}}"#).unwrap_err();
        assert!(
            e.starts_with("config.clusters.c.dns: must be \"host:port\""),
            "{e}"
        );
        let e = parse(r#"{"clusters": {"c": {"dns": "h:1", "endpoints": ["127.0.0.1:1"]}}}"#)
            .unwrap_err();
        assert!(e.starts_with("config.clusters.c: give either"), "{e}");
    }

    #[test]
    fn rules_of_one_model_may_use_different_clusters_and_keep_order() {
        let c = parse(
            r#"{"model_mapping_rule": {"m": {"rules": [
                {"cluster": "a", "backend": "vllm", "headers": [{"key": "x", "value": "1"}]},
                {"cluster": "b", "backend": "sglang", "headers": [{"key": "y", "value": "1"}]},
                {"cluster": "c", "backend": "vllm", "headers": [{"key": "x", "value": "1"}, {"key": "y", "value": "1"}]}
            ]}}}"#,
        )
        .unwrap();
        let order: Vec<_> = c.models["m"].iter().map(|r| r.cluster.as_str()).collect();
        assert_eq!(order, ["c", "a", "b"]);
    }
}
