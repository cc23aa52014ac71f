//! Environment merging: the Metadata-Center settings start from the origin's
//! `METADATA_CENTER_*` environment variables and the config's `metadata_center` object
//! overrides them, field by field.
//!
//! Environment errors name the variable as the path (`config.$METADATA_CENTER_PORT: …`).

use super::raw::RawMetadataCenter;
use super::types::{
    err, within, ConfigError, EndpointIdentity, MetadataCenter, DEFAULT_LOOKUP_THREADS,
};

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

/// `metadata_center`: the settings from the environment, then the config's overrides.
pub(super) fn metadata_center(
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
            *slot = within(format!("{base}.{name}"), v, 1..=600_000)?;
        }
    }
    if let Some(t) = r.lookup_threads {
        m.lookup_threads = within(format!("{base}.lookup_threads"), t, 1..=64)? as usize;
    }
    if let Some(q) = r.queue_size {
        m.queue_size = within(format!("{base}.queue_size"), q, 1..=1_000_000)? as usize;
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

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::*;

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
        for (json, want) in [
            (
                &br#"{"metadata_center": {"load_poll_ms": 0}}"#[..],
                "config.metadata_center.load_poll_ms: must be within 1–600000, got 0",
            ),
            (
                br#"{"metadata_center": {"queue_size": 1000001}}"#,
                "config.metadata_center.queue_size: must be within 1–1000000, got 1000001",
            ),
        ] {
            let got = Config::from_json_with_env(json, &|_| None).unwrap_err();
            assert_eq!(got.to_string(), want);
        }
    }
}
