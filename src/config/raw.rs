//! The config as users write it: serde shapes with the origin's proto field names, their
//! lowerCamelCase aliases, and lenient numbers (Envoy hands `google.protobuf.Struct` numbers
//! over as doubles or strings).
//!
//! Every field is optional or defaulted here; defaults and checks belong to
//! `validate`. Unknown fields are rejected with their JSON path.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer};
use serde::Deserialize;

/// The top-level object.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) protocol: Option<String>,
    #[serde(default)]
    pub(super) algorithm: Option<String>,
    #[serde(default, alias = "modelMappingRule")]
    pub(super) model_mapping_rule: BTreeMap<String, RawRules>,
    #[serde(default, alias = "lbMappingRule")]
    pub(super) lb_mapping_rule: BTreeMap<String, RawLbConfig>,
    #[serde(default)]
    pub(super) log: Option<RawLog>,
    #[serde(default)]
    pub(super) clusters: BTreeMap<String, RawCluster>,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub(super) hash_chunk_bytes: Option<u64>,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub(super) max_body_bytes: Option<u64>,
    #[serde(default)]
    pub(super) intercept_paths: Option<Vec<String>>,
    #[serde(default)]
    pub(super) strict_endpoint_override: Option<bool>,
    #[serde(default)]
    pub(super) cluster_header: Option<String>,
    #[serde(default)]
    pub(super) metrics_path: Option<String>,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub(super) prefix_index_capacity: Option<u64>,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub(super) learn_response_bytes: Option<u64>,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub(super) media_part_tokens: Option<u64>,
    #[serde(default)]
    pub(super) force_stream_usage: Option<bool>,
    #[serde(default)]
    pub(super) cache_feedback: Option<bool>,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub(super) cache_capacity_tokens: Option<u64>,
    #[serde(default)]
    pub(super) cache_residency: Option<bool>,
    #[serde(default)]
    pub(super) eviction_pressure: Option<bool>,
    #[serde(default)]
    pub(super) ejection: Option<RawEjection>,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub(super) dns_refresh_ms: Option<u64>,
    #[serde(default)]
    pub(super) metadata_center: Option<RawMetadataCenter>,
    #[serde(default)]
    pub(super) engine_metrics: Option<RawEngineMetrics>,
    #[serde(default)]
    pub(super) session_affinity: Option<RawSessionAffinity>,
}

/// `session_affinity`: keeping a conversation on its endpoint.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSessionAffinity {
    #[serde(default)]
    pub(super) header: Option<String>,
    #[serde(default)]
    pub(super) user_field: Option<bool>,
    #[serde(default)]
    pub(super) cache_key_field: Option<bool>,
    #[serde(default, deserialize_with = "lenient_f64")]
    pub(super) max_load_ratio: Option<f64>,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub(super) max_extra_requests: Option<u64>,
}

/// `engine_metrics`: reading each endpoint's own Prometheus metrics.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEngineMetrics {
    #[serde(default)]
    pub(super) enabled: Option<bool>,
    #[serde(default)]
    pub(super) path: Option<String>,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub(super) period_ms: Option<u64>,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub(super) timeout_ms: Option<u64>,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub(super) stale_ms: Option<u64>,
    #[serde(default)]
    pub(super) running: Option<Vec<String>>,
    #[serde(default)]
    pub(super) waiting: Option<Vec<String>>,
    #[serde(default)]
    pub(super) prompt_tokens: Option<Vec<String>>,
    #[serde(default)]
    pub(super) cached_tokens: Option<Vec<String>>,
    #[serde(default)]
    pub(super) generation_tokens: Option<Vec<String>>,
}

/// `metadata_center`: overrides of the settings from the environment.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetadataCenter {
    #[serde(default)]
    pub(super) enabled: Option<bool>,
    #[serde(default)]
    pub(super) host: Option<String>,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub(super) port: Option<u64>,
    #[serde(default)]
    pub(super) cache_enabled: Option<bool>,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub(super) timeout_ms: Option<u64>,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub(super) lookup_threads: Option<u64>,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub(super) async_timeout_ms: Option<u64>,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub(super) queue_size: Option<u64>,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub(super) load_poll_ms: Option<u64>,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub(super) load_stale_ms: Option<u64>,
    #[serde(default)]
    pub(super) endpoint_identity: Option<String>,
    #[serde(default)]
    pub(super) auth_token: Option<String>,
}

/// `model_mapping_rule.<model>`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRules {
    pub(super) rules: Vec<RawRule>,
}

/// `model_mapping_rule.<model>.rules[i]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    #[serde(default, alias = "sceneName")]
    pub(super) scene_name: String,
    #[serde(default)]
    pub(super) cluster: String,
    #[serde(default)]
    pub(super) backend: String,
    #[serde(default)]
    pub(super) headers: Vec<RawHeader>,
    #[serde(default, alias = "routeName")]
    pub(super) route_name: String,
    #[serde(default)]
    pub(super) subset: Vec<RawSubset>,
    #[serde(default, alias = "targetModel")]
    pub(super) target_model: String,
    #[serde(default, alias = "chatTemplate")]
    pub(super) chat_template: Option<String>,
    /// Deprecated in the origin, accepted and ignored.
    #[serde(default, deserialize_with = "lenient_i64")]
    #[allow(dead_code)]
    pub(super) weight: Option<i64>,
    /// Stored as "model version" by the origin, otherwise unused; accepted and ignored.
    #[serde(default, alias = "chainName")]
    #[allow(dead_code)]
    pub(super) chain_name: String,
}

/// `rules[i].headers[j]`: a header condition.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHeader {
    pub(super) key: String,
    #[serde(default)]
    pub(super) value: String,
}

/// `rules[i].subset[j]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSubset {
    #[serde(default)]
    pub(super) name: String,
    #[serde(default)]
    pub(super) labels: BTreeMap<String, String>,
    #[serde(default)]
    pub(super) lora: String,
    #[serde(default, deserialize_with = "lenient_i64")]
    pub(super) weight: Option<i64>,
}

/// `lb_mapping_rule.<model>`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLbConfig {
    #[serde(default, alias = "loadAwareEnable")]
    pub(super) load_aware_enable: Option<bool>,
    #[serde(default, alias = "cacheAwareEnable")]
    pub(super) cache_aware_enable: Option<bool>,
    #[serde(default, alias = "candidatePercent", deserialize_with = "lenient_f64")]
    pub(super) candidate_percent: Option<f64>,
    #[serde(default, alias = "requestLoadWeight", deserialize_with = "lenient_f64")]
    pub(super) request_load_weight: Option<f64>,
    #[serde(default, alias = "prefillLoadWeight", deserialize_with = "lenient_f64")]
    pub(super) prefill_load_weight: Option<f64>,
    #[serde(default, alias = "cacheRadioWeight", deserialize_with = "lenient_f64")]
    pub(super) cache_radio_weight: Option<f64>,
    #[serde(default, deserialize_with = "lenient_f64")]
    pub(super) decode_cost_chars: Option<f64>,
    #[serde(default, deserialize_with = "lenient_f64")]
    pub(super) miss_slowdown_weight: Option<f64>,
}

/// The origin's `log` block, with llmproxy's additions.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    #[serde(default)]
    pub(super) enabled: bool,
    #[serde(default)]
    pub(super) path: String,
    #[serde(default)]
    pub(super) include_prompt: bool,
    #[serde(default)]
    pub(super) prompt_max_bytes: Option<u64>,
    #[serde(default)]
    pub(super) include_candidates: bool,
    #[serde(default)]
    pub(super) queue_lines: Option<u64>,
}

/// `clusters.<name>`: static endpoints or a DNS name.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    #[serde(default)]
    pub(super) endpoints: Vec<RawEndpoint>,
    #[serde(default)]
    pub(super) dns: Option<String>,
}

/// `clusters.<name>.endpoints[i]`: `"ip:port"` or an object.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawEndpoint {
    Address(String),
    Object(RawEndpointObject),
}

/// The object form of an endpoint: address, labels, LoRA adapters.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEndpointObject {
    pub(super) address: String,
    #[serde(default)]
    pub(super) labels: BTreeMap<String, String>,
    #[serde(default)]
    pub(super) lora_adapters: Vec<String>,
}

/// `ejection`: passive health settings.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEjection {
    #[serde(default, deserialize_with = "lenient_u64")]
    pub(super) consecutive_failures: Option<u64>,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub(super) eject_ms: Option<u64>,
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

/// Like [`lenient_u64`], for signed integers.
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

/// A number or a numeric string, as `f64`.
fn lenient_f64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    Ok(number_like(d)?.and_then(|n| n.as_f64()))
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{assert_errors, parse};

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
    fn unknown_fields_and_wrong_types_name_path_and_reason() {
        assert_errors(&[
            (
                r#"{"model_mapping_rule": {"m1": {"rules": [{"cluster": "c", "backend": "vllm", "bogus": 1}]}}}"#,
                "config.model_mapping_rule.m1.rules[0].bogus: unknown field `bogus`",
            ),
            (
                r#"{"lb_mapping_rule": {"m1": {"request_load_weight": true}}}"#,
                "config.lb_mapping_rule.m1.request_load_weight: invalid type: boolean `true`, expected a number",
            ),
        ]);
    }
}
