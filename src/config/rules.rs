//! Validation of `model_mapping_rule`: models, their rules, header conditions, subsets and
//! chat templates; plus the header-safety checks that cluster names share with rules.

use std::collections::BTreeMap;

use super::raw::{RawHeader, RawRule, RawRules, RawSubset};
use super::types::{err, within, Backend, ConfigError, HeaderMatch, Rule, Subset};
use crate::transcode::templates::ChatTemplate;

/// `model_mapping_rule`: model → its rules, most specific first.
pub(super) fn models(
    raw: BTreeMap<String, RawRules>,
) -> Result<BTreeMap<String, Vec<Rule>>, ConfigError> {
    let mut models = BTreeMap::new();
    for (model, rules) in raw {
        let base = format!("model_mapping_rule.{model}");
        if model.is_empty() {
            return Err(err(base, "model name must not be empty"));
        }
        if rules.rules.is_empty() {
            return Err(err(format!("{base}.rules"), "must list at least one rule"));
        }
        let mut out = Vec::with_capacity(rules.rules.len());
        for (i, r) in rules.rules.into_iter().enumerate() {
            out.push(rule(r, &format!("{base}.rules[{i}]"))?);
        }
        // Most specific first; stable so that equal header counts keep config order.
        out.sort_by_key(|r| std::cmp::Reverse(r.headers.len()));
        models.insert(model, out);
    }
    Ok(models)
}

/// One rule at `base` (`model_mapping_rule.<model>.rules[i]`).
fn rule(r: RawRule, base: &str) -> Result<Rule, ConfigError> {
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
    let headers = header_matches(r.headers, base)?;
    let chat_template = chat_template(r.chat_template.as_deref(), base)?;
    let subset = subsets(r.subset, base)?;
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

/// `rules[i].headers`: names valid and lower-cased, names and values at most 16 KiB.
fn header_matches(raw: Vec<RawHeader>, base: &str) -> Result<Vec<HeaderMatch>, ConfigError> {
    let mut headers = Vec::with_capacity(raw.len());
    for (i, h) in raw.into_iter().enumerate() {
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
    Ok(headers)
}

/// `rules[i].chat_template`: a known template, ChatML when missing or empty.
fn chat_template(name: Option<&str>, base: &str) -> Result<ChatTemplate, ConfigError> {
    match name {
        None | Some("") => Ok(ChatTemplate::ChatMl),
        Some(name) => ChatTemplate::parse(name).ok_or_else(|| {
            err(
                format!("{base}.chat_template"),
                format!(
                    "unknown chat template {name:?} (expected one of {})",
                    ChatTemplate::NAMES
                ),
            )
        }),
    }
}

/// `rules[i].subset`: weights within 0–1000000 (1 when missing), not all of them 0.
fn subsets(raw: Vec<RawSubset>, base: &str) -> Result<Vec<Subset>, ConfigError> {
    let mut subset = Vec::with_capacity(raw.len());
    for (i, s) in raw.into_iter().enumerate() {
        let weight = match s.weight {
            None => 1,
            Some(w) => within(format!("{base}.subset[{i}].weight"), w, 0..=1_000_000)? as u32,
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
    Ok(subset)
}

/// True when `name` is a valid HTTP header field name (RFC 9110 token).
pub(super) fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Why `value` cannot be placed in a request header as it is (the cluster and scene names
/// hosts send upstream): `None` when it is visible ASCII without spaces (0x21–0x7E).
pub(super) fn header_unsafe(value: &str) -> Option<String> {
    let bad = value.bytes().find(|b| !(0x21..=0x7e).contains(b))?;
    Some(format!(
        "{value:?} cannot go into a request header: only visible ASCII without spaces \
         is allowed (found byte 0x{bad:02x})"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{assert_errors, parse};

    #[test]
    fn rules_carry_target_model_chat_template_and_weighted_subsets() {
        let c = parse(r#"{"model_mapping_rule": {"m": {"rules": [{"cluster": "c", "backend": "triton",
                "target_model": "ensemble", "chat_template": "llama3",
                "subset": [{"name": "a", "labels": {"gpu": "h100"}, "lora": "sql-lora", "weight": 3}, {"name": "b"}]}]}}}"#).unwrap();
        let r = &c.models["m"][0];
        assert_eq!(r.target_model, "ensemble");
        assert_eq!(r.chat_template, ChatTemplate::Llama3);
        assert_eq!((r.subset[0].weight, r.subset[1].weight), (3, 1));
        let e = parse(r#"{"model_mapping_rule": {"m": {"rules": [{"cluster": "c", "backend": "triton", "chat_template": "vicuna"}]}}}"#).unwrap_err();
        assert!(
            e.starts_with(
                "config.model_mapping_rule.m.rules[0].chat_template: unknown chat template"
            ),
            "{e}"
        );
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

    #[test]
    fn rule_errors_name_path_and_reason() {
        assert_errors(&[
            (
                r#"{"model_mapping_rule": {"m": {"rules": [{"cluster": "c", "backend": "vllm", "subset": [{"weight": -1}]}]}}}"#,
                "config.model_mapping_rule.m.rules[0].subset[0].weight: must be within 0–1000000, got -1",
            ),
            (
                r#"{"model_mapping_rule": {"m1": {"rules": [{"cluster": "c", "backend": "tgi"}]}}}"#,
                "config.model_mapping_rule.m1.rules[0].backend: unknown backend \"tgi\"",
            ),
            (
                r#"{"model_mapping_rule": {"m": {"rules": []}}}"#,
                "config.model_mapping_rule.m.rules: must list at least one rule",
            ),
            (
                r#"{"model_mapping_rule": {"m": {"rules": [{"cluster": "c", "backend": "vllm", "headers": [{"key": "bad header", "value": "v"}]}]}}}"#,
                "config.model_mapping_rule.m.rules[0].headers[0].key: not a valid header name",
            ),
            (
                r#"{"model_mapping_rule": {"m": {"rules": [{"backend": "vllm"}]}}}"#,
                "config.model_mapping_rule.m.rules[0].cluster: required",
            ),
            (
                r#"{"model_mapping_rule": {"m": {"rules": [{"cluster": "c", "backend": "vllm", "scene_name": "a\r\nx-evil: 1"}]}}}"#,
                "config.model_mapping_rule.m.rules[0].scene_name: \"a\\r\\nx-evil: 1\" cannot go into a request header",
            ),
            (
                r#"{"model_mapping_rule": {"m": {"rules": [{"cluster": "c\u0000d", "backend": "vllm"}]}}}"#,
                "config.model_mapping_rule.m.rules[0].cluster: \"c\\0d\" cannot go into a request header",
            ),
        ]);
    }
}
