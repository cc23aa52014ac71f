//! Configuration: the origin's plugin config (aigw `llmproxy`) plus llmproxy's additions.
//!
//! Input is JSON, either the bare object or Istio's TypedStruct shape
//! `{"@type": "...", "value": {...}}`. Field names are the origin's proto snake_case names;
//! the lowerCamelCase spellings that protojson accepts are aliases. Every error names the
//! JSON path of the offending field and the reason ([`ConfigError`]).
//!
//! A config goes through these stages, one file each; each uses only the ones above it:
//! - `raw`: the serde shapes, as users write them (aliases, lenient numbers);
//! - `types`: the validated public types ([`Config`], [`Rule`], …), defaults, [`ConfigError`];
//! - `env`: the Metadata-Center settings: environment variables, then config overrides;
//! - `rules`: validation of `model_mapping_rule` (rules, headers, subsets);
//! - `validate`: validation of the whole config, one function per section;
//! - this file: the entry points [`Config::from_json`], TypedStruct unwrapping, and the
//!   JSON path prefix of every error.

mod env;
mod raw;
mod rules;
mod types;
mod validate;

pub use types::*;
pub use validate::{istio_dns_target, parse_endpoint};

use raw::RawConfig;
use types::err;

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
        validate::validate(raw, env).map_err(|e| ConfigError {
            path: join_path(prefix, &e.path),
            reason: e.reason,
        })
    }
}

/// `prefix.path`, either part possibly empty (serde's root path is ".").
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

/// "an array", "a string", …: what a JSON value is, for error messages.
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Parses `s` with the process environment; errors as their message.
    pub(crate) fn parse(s: &str) -> Result<Config, String> {
        Config::from_json(s.as_bytes()).map_err(|e| e.to_string())
    }

    /// Each input is rejected with a message that starts with its expected prefix.
    pub(crate) fn assert_errors(cases: &[(&str, &str)]) {
        for (input, want) in cases {
            let got = parse(input).unwrap_err();
            assert!(
                got.starts_with(want),
                "input {input}\n got: {got}\nwant: {want}"
            );
        }
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
    fn errors_outside_a_section_name_the_typed_struct_or_the_whole_config() {
        assert_errors(&[
            (r#"[1, 2]"#, "config: must be a JSON object, got an array"),
            (
                r#"{"@type": "x", "value": {"unknown_top": 1}}"#,
                "config.value.unknown_top: unknown field `unknown_top`",
            ),
            ("{not json", "config: invalid JSON"),
        ]);
    }
}
