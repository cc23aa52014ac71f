//! The aigw API's request and response bodies (the wire types) and their validation rules:
//! field names, Go struct and type names for the origin's error messages, and the limits a body
//! is checked against. Decoding itself (gin's `ShouldBindJSON` behaviour) and the envelope are in
//! `crate::envelope`; the handlers that use these types are in `crate::server`.

use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::cache::MaxAges;
use crate::endpoint::Endpoint;
use crate::envelope::{validation_error, ApiError, WireRequest};

/// Longest `cluster`, `request_id` and `ip` accepted (400 above).
const MAX_ID_LEN: usize = 1024;

/// Most locations a cache query's `max_age_ms` may list (400 above).
pub const MAX_AGE_LOCATIONS: usize = 10_000;

/// Default of `[Cache] MaxPromptHashes`.
pub const DEFAULT_MAX_PROMPT_HASHES: usize = 65_536;

/// The limits the cache bodies are validated against, from the settings (see
/// `server::AppState::cache_limits`); the default is the settings' default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheLimits {
    /// Longest `prompt_hash` accepted (400 above).
    pub max_prompt_hashes: usize,
}

impl Default for CacheLimits {
    fn default() -> Self {
        CacheLimits {
            max_prompt_hashes: DEFAULT_MAX_PROMPT_HASHES,
        }
    }
}

fn required(v: &Option<String>, s: &str, f: &str) -> Result<(), ApiError> {
    match v {
        Some(x) if !x.is_empty() => {
            if x.len() > MAX_ID_LEN {
                Err(validation_error(s, f, "max"))
            } else {
                Ok(())
            }
        }
        _ => Err(validation_error(s, f, "required")),
    }
}

fn endpoint_of(v: &Option<String>, s: &str) -> Result<Endpoint, ApiError> {
    required(v, s, "IP")?;
    v.as_deref()
        .unwrap_or_default()
        .parse()
        .map_err(|_| validation_error(s, "IP", "ip"))
}

fn check_hashes(v: &Option<Vec<u64>>, s: &str, limits: &CacheLimits) -> Result<(), ApiError> {
    match v {
        None => Err(validation_error(s, "PromptHash", "required")),
        Some(h) if h.len() > limits.max_prompt_hashes => {
            Err(validation_error(s, "PromptHash", "max"))
        }
        Some(_) => Ok(()),
    }
}

/// `POST /v1/load/stats` and the `load.stats.set` replication event.
#[derive(Deserialize, Serialize, Default, Debug, Clone)]
pub struct InferenceRequest {
    #[serde(default)]
    pub cluster: Option<String>,
    #[serde(default)]
    pub request_id: Option<String>,
    #[serde(default)]
    pub prompt_length: Option<i32>,
    #[serde(default)]
    pub ip: Option<String>,
    #[serde(default)]
    pub timestamp: Option<i64>,
}

impl InferenceRequest {
    /// The engine (`ip`), parsed.
    pub fn engine(&self) -> Result<Endpoint, ApiError> {
        endpoint_of(&self.ip, Self::GO_STRUCT)
    }
}

impl WireRequest for InferenceRequest {
    const GO_STRUCT: &'static str = "InferenceRequest";
    type Limits = ();
    fn go_type(field: &str) -> &'static str {
        match field {
            "prompt_length" => "int32",
            "timestamp" => "int64",
            _ => "string",
        }
    }
    fn validate(&self, _: &()) -> Result<(), ApiError> {
        required(&self.cluster, Self::GO_STRUCT, "Cluster")?;
        required(&self.request_id, Self::GO_STRUCT, "RequestID")?;
        if self.prompt_length.unwrap_or(0) < 0 {
            return Err(validation_error(Self::GO_STRUCT, "PromptLength", "gte"));
        }
        self.engine().map(|_| ())
    }
}

/// `DELETE /v1/load/stats`, `DELETE /v1/load/prompt` and their replication events.
#[derive(Deserialize, Serialize, Default, Debug, Clone)]
pub struct DeleteRequest {
    #[serde(default)]
    pub request_id: Option<String>,
    #[serde(default)]
    pub timestamp: Option<i64>,
}

impl WireRequest for DeleteRequest {
    const GO_STRUCT: &'static str = "DeleteRequest";
    type Limits = ();
    fn go_type(field: &str) -> &'static str {
        if field == "timestamp" {
            "int64"
        } else {
            "string"
        }
    }
    fn validate(&self, _: &()) -> Result<(), ApiError> {
        required(&self.request_id, Self::GO_STRUCT, "RequestID")
    }
}

/// `POST /v1/cache/query`.
#[derive(Deserialize, Default, Debug)]
pub struct CacheQuery {
    #[serde(default)]
    pub cluster: Option<String>,
    #[serde(default)]
    pub prompt_hash: Option<Vec<u64>>,
    #[serde(default)]
    pub top_k: Option<i64>,
    /// The aigw client sends `topk` (origin defect 2); accepted as well.
    #[serde(default)]
    pub topk: Option<i64>,
    /// Our extension: per location (in the canonical text the answers use), claims saved longer
    /// ago than this many ms count as absent for this query (the asking gateway's estimate of how long each endpoint
    /// keeps a prefix in its KV cache); locations not listed: the cache TTL.
    #[serde(default, deserialize_with = "pairs_of_object")]
    pub max_age_ms: Option<Vec<(String, u64)>>,
}

impl CacheQuery {
    /// The K asked for: `top_k`, else `topk`, else 0 (the configured default); at most 10,000.
    pub fn k(&self) -> usize {
        self.top_k
            .filter(|k| *k > 0)
            .or(self.topk.filter(|k| *k > 0))
            .unwrap_or(0)
            .min(10_000) as usize
    }

    /// Takes the per-location limits of `max_age_ms`; a key that is not a location is the
    /// validation error of `MaxAgeMs` (checked here rather than in `validate`, so each key is
    /// parsed once per query).
    pub fn take_max_ages(&mut self) -> Result<MaxAges, ApiError> {
        let limits = self.max_age_ms.take().unwrap_or_default();
        let mut parsed = Vec::with_capacity(limits.len());
        for (ip, ms) in limits {
            let ep = (ip.len() <= MAX_ID_LEN)
                .then(|| ip.parse::<Endpoint>().ok())
                .flatten()
                .ok_or_else(|| validation_error(Self::GO_STRUCT, "MaxAgeMs", "ip"))?;
            parsed.push((ep, ip, ms));
        }
        Ok(MaxAges::from_named(parsed))
    }
}

impl WireRequest for CacheQuery {
    const GO_STRUCT: &'static str = "QueryParam";
    type Limits = CacheLimits;
    fn go_type(field: &str) -> &'static str {
        match field {
            "prompt_hash" => "uint64",
            "top_k" | "topk" => "int",
            "max_age_ms" => "map[string]uint64",
            f if f.starts_with("max_age_ms.") => "uint64",
            _ => "string",
        }
    }
    fn validate(&self, limits: &CacheLimits) -> Result<(), ApiError> {
        required(&self.cluster, Self::GO_STRUCT, "Cluster")?;
        check_hashes(&self.prompt_hash, Self::GO_STRUCT, limits)?;
        // the keys are checked where they are parsed (`take_max_ages`)
        if self
            .max_age_ms
            .as_ref()
            .is_some_and(|a| a.len() > MAX_AGE_LOCATIONS)
        {
            return Err(validation_error(Self::GO_STRUCT, "MaxAgeMs", "max"));
        }
        Ok(())
    }
}

/// A JSON object's entries in order, without building a map (`max_age_ms`: read once, looked
/// up by [`MaxAges`]).
fn pairs_of_object<'de, D>(de: D) -> Result<Option<Vec<(String, u64)>>, D::Error>
where
    D: Deserializer<'de>,
{
    struct Pairs;
    impl<'de> Visitor<'de> for Pairs {
        type Value = Option<Vec<(String, u64)>>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object of numbers")
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
            while let Some(pair) = map.next_entry()? {
                pairs.push(pair);
            }
            Ok(Some(pairs))
        }
    }
    de.deserialize_any(Pairs)
}

/// `POST /v1/cache/save`.
#[derive(Deserialize, Default, Debug)]
pub struct CacheSave {
    #[serde(default)]
    pub cluster: Option<String>,
    #[serde(default)]
    pub prompt_hash: Option<Vec<u64>>,
    #[serde(default)]
    pub ip: Option<String>,
}

impl CacheSave {
    /// The location (`ip`), parsed.
    pub fn location(&self) -> Result<Endpoint, ApiError> {
        endpoint_of(&self.ip, Self::GO_STRUCT)
    }
}

impl WireRequest for CacheSave {
    const GO_STRUCT: &'static str = "SaveParam";
    type Limits = CacheLimits;
    fn go_type(field: &str) -> &'static str {
        if field == "prompt_hash" {
            "uint64"
        } else {
            "string"
        }
    }
    fn validate(&self, limits: &CacheLimits) -> Result<(), ApiError> {
        required(&self.cluster, Self::GO_STRUCT, "Cluster")?;
        check_hashes(&self.prompt_hash, Self::GO_STRUCT, limits)?;
        self.location().map(|_| ())
    }
}

/// `POST /log/level`.
#[derive(Deserialize, Default, Debug)]
pub struct LogLevelParam {
    #[serde(rename = "LevelParam", default)]
    pub level: Option<String>,
}

impl WireRequest for LogLevelParam {
    const GO_STRUCT: &'static str = "LogLevel";
    type Limits = ();
    fn go_type(_: &str) -> &'static str {
        "string"
    }
    fn validate(&self, _: &()) -> Result<(), ApiError> {
        Ok(())
    }
}

/// The query string of `GET /v1/load/stats` and `GET /cache/admin/debug/model_tree`.
#[derive(Deserialize, Default)]
pub struct ClusterQuery {
    pub cluster: Option<String>,
}

/// One answer of `POST /v1/cache/query`: a location and the number of leading hashes matched.
#[derive(Serialize)]
pub struct Location {
    pub ip: String,
    pub length: usize,
}

/// The data of a `POST /v1/cache/query` answer.
#[derive(Serialize)]
pub struct Locations {
    pub locations: Vec<Location>,
}
