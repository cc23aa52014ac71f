//! Validation: the raw serde shapes become the public [`Config`], one function per config
//! section, every error naming the JSON path of the field and the reason.
//!
//! [`validate`] checks the sections in a fixed order (the first error found is the one
//! reported): protocol, algorithm, models and rules (`rules`), balancing
//! parameters, clusters, host-facing options, ejection, DNS, Metadata-Center
//! (`env`).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use super::env;
use super::raw::{
    RawCluster, RawConfig, RawEjection, RawEndpoint, RawEngineMetrics, RawLbConfig, RawLog,
    RawSessionAffinity,
};
use super::rules::{self, header_unsafe, is_header_name};
use super::types::{
    err, within, Algorithm, Config, ConfigError, Ejection, EndpointSpec, EngineMetrics, LbParams,
    RequestLog, Rule, SessionAffinity, DEFAULT_CLUSTER_HEADER, DEFAULT_HASH_CHUNK_BYTES,
    DEFAULT_INTERCEPT_PATHS, DEFAULT_LEARN_RESPONSE_BYTES, DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MEDIA_PART_TOKENS, DEFAULT_METRICS_PATH, DEFAULT_PREFIX_INDEX_CAPACITY,
};

/// Static endpoints and DNS names of the clusters.
type Clusters = (
    BTreeMap<String, Vec<EndpointSpec>>,
    BTreeMap<String, String>,
);

/// Checks every section of `raw` and builds the config; `env` reads environment variables.
pub(super) fn validate(
    raw: RawConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    protocol(raw.protocol.as_deref())?;
    let algorithm = algorithm(raw.algorithm.as_deref())?;
    let models = rules::models(raw.model_mapping_rule)?;
    let lb = lb_mapping(raw.lb_mapping_rule)?;
    let (clusters, mut dns_clusters) = clusters(raw.clusters)?;
    let default_chunk = DEFAULT_HASH_CHUNK_BYTES as u64;
    let hash_chunk_bytes = raw.hash_chunk_bytes.unwrap_or(default_chunk);
    let hash_chunk_bytes = within("hash_chunk_bytes", hash_chunk_bytes, 16..=1 << 20)?;
    let max_body_bytes = raw.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
    let max_body_bytes = within("max_body_bytes", max_body_bytes, 1024..=1 << 30)?;
    let intercept_paths = intercept_paths(raw.intercept_paths)?;
    let cluster_header = cluster_header(raw.cluster_header)?;
    let metrics_path = metrics_path(raw.metrics_path)?;
    let default_capacity = DEFAULT_PREFIX_INDEX_CAPACITY as u64;
    let capacity = raw.prefix_index_capacity.unwrap_or(default_capacity);
    let prefix_index_capacity = within("prefix_index_capacity", capacity, 1..=100_000_000)?;
    let learn = raw
        .learn_response_bytes
        .unwrap_or(DEFAULT_LEARN_RESPONSE_BYTES as u64);
    let learn_response_bytes = within("learn_response_bytes", learn, 0..=64 << 20)?;
    let media = raw.media_part_tokens.unwrap_or(DEFAULT_MEDIA_PART_TOKENS);
    let media_part_tokens = within("media_part_tokens", media, 0..=1 << 20)?;
    let cache_capacity = raw.cache_capacity_tokens.unwrap_or(0);
    let cache_capacity_tokens = within("cache_capacity_tokens", cache_capacity, 0..=1 << 40)?;
    let ejection = ejection(raw.ejection)?;
    add_istio_dns_clusters(&models, &clusters, &mut dns_clusters);
    let metadata_center = env::metadata_center(raw.metadata_center, env)?;
    // Behind several gateways sharing a Metadata-Center, only the engines see every
    // gateway's writes: `prefix_cost` then reads their pages unless told not to.
    let shared_prefix_cost = metadata_center.enabled && algorithm == Algorithm::PrefixCost;
    let engine_metrics = engine_metrics(raw.engine_metrics, shared_prefix_cost)?;
    let session_affinity = session_affinity(raw.session_affinity, &cluster_header)?;

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
        learn_response_bytes: learn_response_bytes as usize,
        media_part_tokens,
        force_stream_usage: raw.force_stream_usage.unwrap_or(true),
        cache_feedback: raw.cache_feedback.unwrap_or(true),
        cache_capacity_tokens,
        cache_residency: raw.cache_residency.unwrap_or(true),
        eviction_pressure: raw.eviction_pressure.unwrap_or(true),
        ejection,
        log: request_log(raw.log)?,
        dns_clusters,
        dns_refresh_ms: raw.dns_refresh_ms.unwrap_or(5000).max(100),
        metadata_center,
        engine_metrics,
        session_affinity,
    })
}

/// `session_affinity`: a header the hosts pass to the pick (not one of the routing headers
/// they strip from every request), or the `user` field; thresholds that can be exceeded.
fn session_affinity(
    raw: Option<RawSessionAffinity>,
    cluster_header: &str,
) -> Result<Option<SessionAffinity>, ConfigError> {
    let Some(r) = raw else { return Ok(None) };
    let mut s = SessionAffinity::default();
    if let Some(header) = r.header {
        let header = header.to_ascii_lowercase();
        if !header.is_empty() && !is_header_name(&header) {
            return Err(err(
                "session_affinity.header",
                format!("not a valid header name: {header:?}"),
            ));
        }
        // The hosts remove these from every request before the pick sees it.
        if header.starts_with("x-llmproxy-")
            || header == cluster_header
            || header == "x-gateway-destination-endpoint"
        {
            return Err(err(
                "session_affinity.header",
                format!("{header:?} is a routing header the hosts remove from every request"),
            ));
        }
        s.header = header;
    }
    s.user_field = r.user_field.unwrap_or(s.user_field);
    s.cache_key_field = r.cache_key_field.unwrap_or(s.cache_key_field);
    if s.header.is_empty() && !s.user_field && !s.cache_key_field {
        return Err(err(
            "session_affinity",
            "names no session: give a \"header\" or set \"cache_key_field\" or \"user_field\": true",
        ));
    }
    if let Some(ratio) = r.max_load_ratio {
        if !(ratio >= 1.0 && ratio.is_finite()) {
            return Err(err(
                "session_affinity.max_load_ratio",
                format!("must be ≥ 1, got {ratio}"),
            ));
        }
        s.max_load_ratio = ratio;
    }
    s.max_extra_requests = within(
        "session_affinity.max_extra_requests",
        r.max_extra_requests.unwrap_or(s.max_extra_requests),
        0..=1_000_000,
    )?;
    Ok(Some(s))
}

/// `engine_metrics`: deadlines within bounds (the read's below its period), a path, names;
/// `enabled` when not given: `on_by_default`.
fn engine_metrics(
    raw: Option<RawEngineMetrics>,
    on_by_default: bool,
) -> Result<EngineMetrics, ConfigError> {
    let mut m = EngineMetrics {
        enabled: on_by_default,
        ..EngineMetrics::default()
    };
    let Some(r) = raw else { return Ok(m) };
    m.enabled = r.enabled.unwrap_or(on_by_default);
    if let Some(path) = r.path {
        if !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(err(
                "engine_metrics.path",
                format!("must be an absolute path without spaces, got {path:?}"),
            ));
        }
        m.path = path;
    }
    m.period_ms = within(
        "engine_metrics.period_ms",
        r.period_ms.unwrap_or(m.period_ms),
        50..=60_000,
    )?;
    m.timeout_ms = within(
        "engine_metrics.timeout_ms",
        r.timeout_ms.unwrap_or(m.timeout_ms),
        10..=m.period_ms,
    )?;
    m.stale_ms = within(
        "engine_metrics.stale_ms",
        r.stale_ms.unwrap_or(m.stale_ms),
        m.period_ms..=600_000,
    )?;
    for (field, names, target) in [
        ("running", r.running, &mut m.running),
        ("waiting", r.waiting, &mut m.waiting),
        ("prompt_tokens", r.prompt_tokens, &mut m.prompt_tokens),
        ("cached_tokens", r.cached_tokens, &mut m.cached_tokens),
        (
            "generation_tokens",
            r.generation_tokens,
            &mut m.generation_tokens,
        ),
    ] {
        let Some(names) = names else { continue };
        if let Some(bad) = names
            .iter()
            .find(|n| n.is_empty() || n.bytes().any(|b| b <= b' ' || b == b'{'))
        {
            return Err(err(
                format!("engine_metrics.{field}"),
                format!("metric names without spaces or labels, got {bad:?}"),
            ));
        }
        *target = names;
    }
    Ok(m)
}

/// `protocol`: only `openai` (or nothing).
fn protocol(protocol: Option<&str>) -> Result<(), ConfigError> {
    match protocol {
        None | Some("openai") => Ok(()),
        Some(p) => Err(err(
            "protocol",
            format!("unsupported protocol {p:?} (expected \"openai\")"),
        )),
    }
}

/// `algorithm`: a known name; `prefix_cost`, the measured best, when missing or empty (the
/// origin requires the field, so an origin config names `inference_lb` and keeps it).
fn algorithm(name: Option<&str>) -> Result<Algorithm, ConfigError> {
    match name {
        None | Some("") => Ok(Algorithm::PrefixCost),
        Some(name) => Algorithm::parse(name).ok_or_else(|| {
            err(
                "algorithm",
                format!(
                    "unknown algorithm {name:?} (expected one of {})",
                    Algorithm::NAMES
                ),
            )
        }),
    }
}

/// `lb_mapping_rule`: model → parameters, missing fields taking the defaults.
fn lb_mapping(
    raw: BTreeMap<String, RawLbConfig>,
) -> Result<hashbrown::HashMap<String, LbParams>, ConfigError> {
    let mut lb = hashbrown::HashMap::new();
    for (model, l) in raw {
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
            miss_slowdown_weight: l.miss_slowdown_weight.unwrap_or(d.miss_slowdown_weight),
        };
        within(
            format!("{base}.candidate_percent"),
            p.candidate_percent,
            0.0..=100.0,
        )?;
        for (name, w) in [
            ("request_load_weight", p.request_load_weight),
            ("prefill_load_weight", p.prefill_load_weight),
            ("cache_radio_weight", p.cache_ratio_weight),
            ("decode_cost_chars", p.decode_cost_chars),
            ("miss_slowdown_weight", p.miss_slowdown_weight),
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
    Ok(lb)
}

/// `clusters`: header-safe names, each with static endpoints or a DNS `host:port`.
fn clusters(raw: BTreeMap<String, RawCluster>) -> Result<Clusters, ConfigError> {
    let mut clusters = BTreeMap::new();
    let mut dns_clusters = BTreeMap::new();
    for (name, c) in raw {
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
            eps.push(endpoint(e, &format!("{base}.endpoints[{i}]"))?);
        }
        clusters.insert(name, eps);
    }
    Ok((clusters, dns_clusters))
}

/// One endpoint at `at`: `"ip:port"` or `{"address", "labels", "lora_adapters"}`.
fn endpoint(e: RawEndpoint, at: &str) -> Result<EndpointSpec, ConfigError> {
    Ok(match e {
        RawEndpoint::Address(a) => EndpointSpec {
            addr: parse_endpoint(&a).map_err(|r| err(at, r))?,
            labels: BTreeMap::new(),
            lora_adapters: Vec::new(),
        },
        RawEndpoint::Object(o) => EndpointSpec {
            addr: parse_endpoint(&o.address).map_err(|r| err(format!("{at}.address"), r))?,
            labels: o.labels,
            lora_adapters: o.lora_adapters,
        },
    })
}

/// `intercept_paths`: absolute paths, the chat and completions paths when missing.
fn intercept_paths(raw: Option<Vec<String>>) -> Result<Vec<String>, ConfigError> {
    let Some(paths) = raw else {
        return Ok(Vec::from(DEFAULT_INTERCEPT_PATHS.map(String::from)));
    };
    for (i, p) in paths.iter().enumerate() {
        if !p.starts_with('/') {
            return Err(err(
                format!("intercept_paths[{i}]"),
                format!("must start with '/', got {p:?}"),
            ));
        }
    }
    Ok(paths)
}

/// `cluster_header`: a valid header name, lower-cased.
fn cluster_header(raw: Option<String>) -> Result<String, ConfigError> {
    let name = raw
        .unwrap_or_else(|| DEFAULT_CLUSTER_HEADER.to_string())
        .to_ascii_lowercase();
    if !is_header_name(&name) {
        return Err(err(
            "cluster_header",
            format!("not a valid header name: {name:?}"),
        ));
    }
    Ok(name)
}

/// `metrics_path`: an absolute path, or "" to turn the metrics endpoint off.
fn metrics_path(raw: Option<String>) -> Result<String, ConfigError> {
    let path = raw.unwrap_or_else(|| DEFAULT_METRICS_PATH.to_string());
    if !path.is_empty() && !path.starts_with('/') {
        return Err(err(
            "metrics_path",
            format!("must start with '/' (or be \"\" to disable), got {path:?}"),
        ));
    }
    Ok(path)
}

/// `ejection`: the defaults, overridden field by field.
/// `log`: the request log. The file itself is opened by the writer thread (in the process
/// that routes, e.g. an nginx worker, with its user), but a directory that does not exist is a
/// config error now rather than lost lines later.
fn request_log(raw: Option<RawLog>) -> Result<RequestLog, ConfigError> {
    let Some(raw) = raw else {
        return Ok(RequestLog {
            prompt_max_bytes: 1024,
            queue_lines: 4096,
            ..RequestLog::default()
        });
    };
    let prompt_max_bytes = raw.prompt_max_bytes.unwrap_or(1024);
    if prompt_max_bytes > 1 << 20 {
        return Err(err("log.prompt_max_bytes", "at most 1048576 (1 MiB)"));
    }
    let queue_lines = raw.queue_lines.unwrap_or(4096);
    if !(1..=1_000_000).contains(&queue_lines) {
        return Err(err("log.queue_lines", "must be between 1 and 1000000"));
    }
    if raw.enabled && !raw.path.is_empty() {
        let path = std::path::Path::new(&raw.path);
        if path.is_dir() {
            return Err(err("log.path", format!("{:?} is a directory", raw.path)));
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => std::path::Path::new("."),
        };
        if !dir.is_dir() {
            return Err(err(
                "log.path",
                format!("directory {:?} does not exist", dir.display().to_string()),
            ));
        }
    }
    Ok(RequestLog {
        enabled: raw.enabled,
        path: raw.path,
        include_prompt: raw.include_prompt,
        prompt_max_bytes: prompt_max_bytes as usize,
        include_candidates: raw.include_candidates,
        queue_lines: queue_lines as usize,
    })
}

fn ejection(raw: Option<RawEjection>) -> Result<Ejection, ConfigError> {
    let mut ejection = Ejection::default();
    if let Some(e) = raw {
        if let Some(n) = e.consecutive_failures {
            ejection.consecutive_failures =
                u32::try_from(n).map_err(|_| err("ejection.consecutive_failures", "too large"))?;
        }
        if let Some(ms) = e.eject_ms {
            ejection.eject_ms = ms;
        }
    }
    Ok(ejection)
}

/// Istio cluster names `outbound|PORT||HOST` resolve by DNS when nothing else lists them.
fn add_istio_dns_clusters(
    models: &BTreeMap<String, Vec<Rule>>,
    clusters: &BTreeMap<String, Vec<EndpointSpec>>,
    dns_clusters: &mut BTreeMap<String, String>,
) {
    for rule in models.values().flatten() {
        if clusters.contains_key(&rule.cluster) || dns_clusters.contains_key(&rule.cluster) {
            continue;
        }
        if let Some(target) = istio_dns_target(&rule.cluster) {
            dns_clusters.insert(rule.cluster.clone(), target);
        }
    }
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
    use crate::config::tests::{assert_errors, parse};

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
        assert_eq!(c.algorithm, Algorithm::PrefixCost);
        // an origin config names its algorithm and keeps the origin's formula
        let origin = BASIC.replacen('{', r#"{"algorithm": "inference_lb","#, 1);
        assert_eq!(parse(&origin).unwrap().algorithm, Algorithm::InferenceLb);
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
    fn endpoints_may_be_objects_with_labels_and_lora_adapters() {
        let c = parse(r#"{"clusters": {"c": {"endpoints": ["127.0.0.1:1", {"address": "127.0.0.1:2", "labels": {"gpu": "h100"}, "lora_adapters": ["sql-lora"]}]}}}"#).unwrap();
        assert_eq!(c.clusters["c"][1].labels["gpu"], "h100");
        assert_eq!(c.clusters["c"][1].lora_adapters, vec!["sql-lora"]);
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
    fn engine_metrics_are_read_by_default_only_by_prefix_cost_sharing_a_metadata_center() {
        let enabled = |json: &str, mc_env: bool| {
            let env =
                |name: &str| (mc_env && name == "METADATA_CENTER_ENABLED").then(|| "1".into());
            let c = Config::from_json_with_env(json.as_bytes(), &env).unwrap();
            c.engine_metrics.enabled
        };
        let shared = r#"{"metadata_center": {"enabled": true}}"#;
        assert!(
            enabled(shared, false),
            "prefix_cost (the default) with a Metadata-Center"
        );
        assert!(
            enabled("{}", true),
            "the Metadata-Center enabled from the environment"
        );
        assert!(enabled(r#"{"engine_metrics": {"period_ms": 500}}"#, true));
        assert!(!enabled("{}", false), "one gateway alone");
        let off = r#"{"metadata_center": {"enabled": true}, "engine_metrics": {"enabled": false}}"#;
        assert!(!enabled(off, false), "turned off explicitly");
        for algorithm in ["inference_lb", "least_request", "round_robin"] {
            let json = format!(r#"{{"algorithm": "{algorithm}"}}"#);
            assert!(!enabled(&json, true), "{algorithm} keeps its inputs");
        }
        let origin = r#"{"algorithm": "inference_lb", "engine_metrics": {"enabled": true}}"#;
        assert!(enabled(origin, true), "asked for explicitly");
    }

    #[test]
    fn engine_metrics_defaults_overrides_and_errors() {
        let c = Config::from_json(br#"{"engine_metrics": {"enabled": true}}"#).unwrap();
        assert!(c.engine_metrics.enabled);
        assert_eq!(c.engine_metrics.path, "/metrics");
        assert_eq!(c.engine_metrics.waiting[0], "vllm:num_requests_waiting");
        assert_eq!(
            c.engine_metrics.cached_tokens[1],
            "sglang:cached_tokens_total"
        );
        let c = Config::from_json(
            br#"{"engine_metrics": {"enabled": true, "path": "/m", "period_ms": 500, "timeout_ms": 300,
                 "stale_ms": 2000, "running": ["trtllm:running"], "waiting": [],
                 "prompt_tokens": ["p"], "cached_tokens": [], "generation_tokens": ["g"]}}"#,
        )
        .unwrap();
        let m = &c.engine_metrics;
        assert_eq!(
            (m.path.as_str(), m.period_ms, m.timeout_ms, m.stale_ms),
            ("/m", 500, 300, 2000)
        );
        assert_eq!(
            (m.running.clone(), m.waiting.len()),
            (vec!["trtllm:running".to_string()], 0)
        );
        assert_eq!(
            (
                &m.prompt_tokens[..],
                m.cached_tokens.len(),
                &m.generation_tokens[..]
            ),
            (&["p".to_string()][..], 0, &["g".to_string()][..])
        );
        let no_env = |_: &str| None;
        assert!(
            !Config::from_json_with_env(b"{}", &no_env)
                .unwrap()
                .engine_metrics
                .enabled
        );
        assert_errors(&[
            (
                r#"{"engine_metrics": {"path": "metrics"}}"#,
                "config.engine_metrics.path: must be an absolute path without spaces, got \"metrics\"",
            ),
            (
                r#"{"engine_metrics": {"timeout_ms": 300}}"#,
                "config.engine_metrics.timeout_ms: must be within 10–250, got 300",
            ),
            (
                r#"{"engine_metrics": {"period_ms": 10}}"#,
                "config.engine_metrics.period_ms: must be within 50–60000, got 10",
            ),
            (
                r#"{"engine_metrics": {"stale_ms": 100}}"#,
                "config.engine_metrics.stale_ms: must be within 250–600000, got 100",
            ),
            (
                r#"{"engine_metrics": {"waiting": ["vllm:x{a=\"b\"}"]}}"#,
                "config.engine_metrics.waiting: metric names without spaces or labels, got \"vllm:x{a=\\\"b\\\"}\"",
            ),
            (
                r#"{"engine_metrics": {"generation_tokens": ["vllm:generation tokens"]}}"#,
                "config.engine_metrics.generation_tokens: metric names without spaces or labels, got \"vllm:generation tokens\"",
            ),
        ]);
    }

    #[test]
    fn session_affinity_defaults_overrides_and_errors() {
        assert_eq!(
            parse("{}").unwrap().session_affinity,
            None,
            "off by default"
        );
        let s = parse(r#"{"session_affinity": {}}"#)
            .unwrap()
            .session_affinity
            .unwrap();
        assert_eq!(s, SessionAffinity::default());
        assert_eq!(
            (s.header.as_str(), s.user_field, s.max_load_ratio),
            ("x-session-id", false, 1.5)
        );
        assert_eq!((s.max_extra_requests, s.cache_key_field), (8, true));
        let s = parse(
            r#"{"session_affinity": {"header": "X-Conversation", "user_field": true,
                "max_load_ratio": "2.5", "max_extra_requests": 0.0}}"#,
        )
        .unwrap()
        .session_affinity
        .unwrap();
        assert_eq!(
            (s.header.as_str(), s.user_field, s.max_load_ratio),
            ("x-conversation", true, 2.5)
        );
        assert_eq!(s.max_extra_requests, 0);
        let s = parse(r#"{"session_affinity": {"header": "", "user_field": true}}"#)
            .unwrap()
            .session_affinity
            .unwrap();
        assert_eq!((s.header.as_str(), s.user_field), ("", true));
        let s = parse(r#"{"session_affinity": {"cache_key_field": false}}"#)
            .unwrap()
            .session_affinity
            .unwrap();
        assert_eq!(
            (s.header.as_str(), s.cache_key_field),
            ("x-session-id", false)
        );
        assert_errors(&[
            (
                r#"{"session_affinity": {"max_load_ratio": 0.5}}"#,
                "config.session_affinity.max_load_ratio: must be ≥ 1, got 0.5",
            ),
            (
                r#"{"session_affinity": {"max_extra_requests": 1000001}}"#,
                "config.session_affinity.max_extra_requests: must be within 0–1000000, got 1000001",
            ),
            (
                r#"{"session_affinity": {"max_extra_requests": -1}}"#,
                "config.session_affinity.max_extra_requests: expected a non-negative integer",
            ),
            (
                r#"{"session_affinity": {"header": "x session"}}"#,
                "config.session_affinity.header: not a valid header name: \"x session\"",
            ),
            (
                r#"{"session_affinity": {"header": "X-LLMProxy-Session"}}"#,
                "config.session_affinity.header: \"x-llmproxy-session\" is a routing header the hosts remove",
            ),
            (
                r#"{"cluster_header": "x-pool", "session_affinity": {"header": "x-pool"}}"#,
                "config.session_affinity.header: \"x-pool\" is a routing header",
            ),
            (
                r#"{"session_affinity": {"header": "", "cache_key_field": false}}"#,
                "config.session_affinity: names no session: give a \"header\" or set \"cache_key_field\" or \"user_field\": true",
            ),
            (
                r#"{"session_affinity": {"cache_key_field": "yes"}}"#,
                "config.session_affinity.cache_key_field: invalid type: string",
            ),
            (
                r#"{"session_affinity": {"header_name": "x"}}"#,
                "config.session_affinity.header_name: unknown field `header_name`",
            ),
        ]);
    }

    #[test]
    fn section_errors_name_path_and_reason() {
        assert_errors(&[
            (
                r#"{"hash_chunk_bytes": 8}"#,
                "config.hash_chunk_bytes: must be within 16–1048576, got 8",
            ),
            (
                r#"{"max_body_bytes": 1023}"#,
                "config.max_body_bytes: must be within 1024–1073741824, got 1023",
            ),
            (
                r#"{"learn_response_bytes": 67108865}"#,
                "config.learn_response_bytes: must be within 0–67108864, got 67108865",
            ),
            (
                r#"{"media_part_tokens": 1048577}"#,
                "config.media_part_tokens: must be within 0–1048576, got 1048577",
            ),
            (
                r#"{"cache_capacity_tokens": 1099511627777}"#,
                "config.cache_capacity_tokens: must be within 0–1099511627776, got 1099511627777",
            ),
            (
                r#"{"prefix_index_capacity": 0}"#,
                "config.prefix_index_capacity: must be within 1–100000000, got 0",
            ),
            (
                r#"{"lb_mapping_rule": {"m": {"candidate_percent": 100.5}}}"#,
                "config.lb_mapping_rule.m.candidate_percent: must be within 0–100, got 100.5",
            ),
            (
                r#"{"lb_mapping_rule": {"m1": {"candidate_percent": 150}}}"#,
                "config.lb_mapping_rule.m1.candidate_percent: must be within 0–100",
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
            (
                r#"{"clusters": {"a\nb": {"endpoints": ["127.0.0.1:1"]}}}"#,
                "config.clusters.a\nb: cluster name \"a\\nb\" cannot go into a request header",
            ),
        ]);
    }
}
