//! Settings: built-in defaults, then the config file (`.toml`, `.json`, `.yaml`), then the
//! environment variables the origin reads, then command-line flags.
//!
//! The file keeps the origin's section and key names (`[HTTP] Host/Port`, `[Log] Level`) and adds
//! sections for the settings the origin only takes from the environment. Durations are Go
//! duration strings ("60s", "1h30m", "500ms").

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::cache::CacheConfig;
use crate::load::LoadConfig;

/// Parse a Go `time.ParseDuration` string: a sequence of decimal numbers with units
/// `ns us µs ms s m h`, e.g. "1h30m", "1.5s", "300ms"; "0" alone is allowed.
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let orig = s;
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(format!("invalid duration {orig:?}"));
    }
    if s.starts_with('-') {
        return Err(format!("invalid duration {orig:?}: negative"));
    }
    let s = s.strip_prefix('+').unwrap_or(s);
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return Err(format!("invalid duration {orig:?}"));
        }
        let value: f64 = rest[..num_len]
            .parse()
            .map_err(|_| format!("invalid duration {orig:?}"))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let nanos_per = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            "" => return Err(format!("missing unit in duration {orig:?}")),
            u => return Err(format!("unknown unit {u:?} in duration {orig:?}")),
        };
        rest = &rest[unit_len..];
        total += value * nanos_per;
    }
    if !total.is_finite() || total > u64::MAX as f64 {
        return Err(format!("invalid duration {orig:?}: overflow"));
    }
    Ok(Duration::from_nanos(total as u64))
}

#[derive(Deserialize, Default, Debug)]
#[serde(default)]
pub struct FileConfig {
    #[serde(rename = "HTTP")]
    pub http: HttpSection,
    #[serde(rename = "Log")]
    pub log: LogSection,
    #[serde(rename = "Load")]
    pub load: LoadSection,
    #[serde(rename = "Cache")]
    pub cache: CacheSection,
    #[serde(rename = "Replica")]
    pub replica: ReplicaSection,
    #[serde(rename = "Auth")]
    pub auth: AuthSection,
    #[serde(rename = "Memory")]
    pub memory: MemorySection,
    #[serde(rename = "Store")]
    pub store: StoreSection,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default, rename_all = "PascalCase")]
pub struct HttpSection {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    pub max_connections: Option<usize>,
    pub idle_timeout: Option<String>,
    pub header_timeout: Option<String>,
    pub body_timeout: Option<String>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default, rename_all = "PascalCase")]
pub struct LogSection {
    /// logrus level: 0 panic, 1 fatal, 2 error, 3 warn, 4 info, 5 debug, 6 trace.
    pub level: Option<u8>,
    /// "text" or "json".
    pub format: Option<String>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default, rename_all = "PascalCase")]
pub struct LoadSection {
    #[serde(rename = "GCInterval")]
    pub gc_interval: Option<String>,
    pub req_expire: Option<String>,
    pub max_requests: Option<usize>,
    pub max_clusters: Option<usize>,
    pub max_engines_per_cluster: Option<usize>,
    pub max_engine_series: Option<usize>,
    pub retry_queue_size: Option<usize>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default, rename_all = "PascalCase")]
pub struct CacheSection {
    #[serde(rename = "GCInterval")]
    pub gc_interval: Option<String>,
    pub expire: Option<String>,
    #[serde(rename = "TopK")]
    pub top_k: Option<usize>,
    pub max_entries_per_cluster: Option<usize>,
    pub max_clusters: Option<usize>,
    pub max_locations_per_node: Option<usize>,
    pub max_prompt_hashes: Option<usize>,
    pub debug_mode: Option<bool>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default, rename_all = "PascalCase")]
pub struct ReplicaSection {
    pub svc_disc_host: Option<String>,
    pub peers: Option<Vec<String>>,
    #[serde(rename = "DNSLookupInterval")]
    pub dns_lookup_interval: Option<String>,
    pub target_port: Option<u16>,
    pub dial_timeout: Option<String>,
    pub request_timeout: Option<String>,
    pub queue_size: Option<usize>,
    pub workers: Option<usize>,
    #[serde(rename = "PodIP")]
    pub pod_ip: Option<String>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default, rename_all = "PascalCase")]
pub struct AuthSection {
    pub token: Option<String>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default)]
pub struct MemorySection {
    /// Budget for the estimated size of the load and cache stores together, in MiB.
    #[serde(rename = "MaxMemoryMB")]
    pub max_memory_mb: Option<u64>,
}

/// Where the state lives: the embedded in-memory stores (default) or Redis.
#[derive(Deserialize, Default, Debug)]
#[serde(default, rename_all = "PascalCase")]
pub struct StoreSection {
    /// `memory`, `redis://HOST:PORT[/DB]` or `redis+cluster://HOST:PORT,HOST:PORT`.
    #[serde(rename = "URL")]
    pub url: Option<String>,
    /// Deadline of one store operation (Redis only).
    pub timeout: Option<String>,
    /// Deadline of one connection attempt to Redis, DNS included.
    pub connect_timeout: Option<String>,
    /// Prefix of every Redis key.
    pub key_prefix: Option<String>,
}

pub fn load_file(path: &Path) -> Result<FileConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let r = match ext.as_str() {
        "toml" => toml::from_str(&text).map_err(|e| e.to_string()),
        "json" => serde_json::from_str(&text).map_err(|e| e.to_string()),
        "yaml" | "yml" => serde_yaml_ng::from_str(&text).map_err(|e| e.to_string()),
        other => {
            return Err(format!(
                "config {}: unsupported extension {other:?} (use .toml, .json or .yaml)",
                path.display()
            ))
        }
    };
    r.map_err(|e| format!("config {}: {e}", path.display()))
}

/// Fully resolved settings.
#[derive(Clone, Debug)]
pub struct Settings {
    pub host: String,
    pub port: u16,
    pub max_connections: usize,
    pub idle_timeout: Duration,
    /// A request's headers must be complete this long after its first byte.
    pub header_timeout: Duration,
    /// A request's body must be complete this long after its headers.
    pub body_timeout: Duration,
    /// Budget for the estimated size of the load and cache stores together, in MiB.
    pub max_memory_mb: u64,
    pub log_level: tracing::level_filters::LevelFilter,
    pub log_json: bool,
    pub load: LoadConfig,
    pub load_gc_interval: Duration,
    pub retry_queue_size: usize,
    pub cache: CacheConfig,
    pub cache_gc_interval: Duration,
    pub max_prompt_hashes: usize,
    pub debug_mode: bool,
    pub svc_disc_host: Option<String>,
    pub peers: Vec<String>,
    pub dns_lookup_interval: Duration,
    pub replica_target_port: u16,
    pub replica_dial_timeout: Duration,
    pub replica_request_timeout: Duration,
    pub replica_queue_size: usize,
    pub replica_workers: usize,
    pub pod_ip: Option<std::net::IpAddr>,
    pub auth_token: Option<String>,
    /// Where the load and cache state lives (`--store`).
    pub store: crate::store::StoreSpec,
    /// Deadline of one Redis store operation (`--store-timeout`).
    pub store_timeout: Duration,
    /// Deadline of one connection attempt to Redis.
    pub store_connect_timeout: Duration,
    /// Prefix of every Redis key.
    pub store_key_prefix: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            host: "127.0.0.1".into(),
            port: 8080,
            max_connections: 10_000,
            idle_timeout: Duration::from_secs(300),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_memory_mb: crate::budget::DEFAULT_MAX_MEMORY_MB,
            log_level: tracing::level_filters::LevelFilter::INFO,
            log_json: false,
            load: LoadConfig::default(),
            load_gc_interval: Duration::from_secs(60),
            retry_queue_size: 65_536,
            cache: CacheConfig::default(),
            cache_gc_interval: Duration::from_secs(60),
            max_prompt_hashes: crate::wire::DEFAULT_MAX_PROMPT_HASHES,
            debug_mode: false,
            svc_disc_host: None,
            peers: Vec::new(),
            dns_lookup_interval: Duration::from_secs(5),
            replica_target_port: 80,
            replica_dial_timeout: Duration::from_millis(500),
            replica_request_timeout: Duration::from_secs(1),
            replica_queue_size: 16_384,
            replica_workers: 8,
            pod_ip: None,
            auth_token: None,
            store: crate::store::StoreSpec::Memory,
            store_timeout: crate::store::redis::DEFAULT_OP_TIMEOUT,
            store_connect_timeout: crate::store::redis::DEFAULT_CONNECT_TIMEOUT,
            store_key_prefix: crate::store::redis::DEFAULT_KEY_PREFIX.into(),
        }
    }
}

pub fn logrus_level(level: u8) -> tracing::level_filters::LevelFilter {
    use tracing::level_filters::LevelFilter;
    match level {
        0..=2 => LevelFilter::ERROR,
        3 => LevelFilter::WARN,
        4 => LevelFilter::INFO,
        5 => LevelFilter::DEBUG,
        _ => LevelFilter::TRACE,
    }
}

fn dur(field: &str, v: &Option<String>, into: &mut Duration) -> Result<(), String> {
    if let Some(s) = v {
        *into = parse_go_duration(s).map_err(|e| format!("{field}: {e}"))?;
    }
    Ok(())
}

fn set<T: Copy>(v: Option<T>, into: &mut T) {
    if let Some(v) = v {
        *into = v;
    }
}

impl Settings {
    pub fn apply_file(&mut self, f: &FileConfig) -> Result<(), String> {
        if let Some(h) = &f.http.host {
            self.host = h.clone();
        }
        set(f.http.port, &mut self.port);
        set(f.http.max_connections, &mut self.max_connections);
        dur(
            "HTTP.IdleTimeout",
            &f.http.idle_timeout,
            &mut self.idle_timeout,
        )?;
        dur(
            "HTTP.HeaderTimeout",
            &f.http.header_timeout,
            &mut self.header_timeout,
        )?;
        dur(
            "HTTP.BodyTimeout",
            &f.http.body_timeout,
            &mut self.body_timeout,
        )?;
        set(f.memory.max_memory_mb, &mut self.max_memory_mb);
        if f.http.cert_file.as_deref().is_some_and(|s| !s.is_empty())
            || f.http.key_file.as_deref().is_some_and(|s| !s.is_empty())
        {
            return Err("HTTP.CertFile/KeyFile: TLS is not supported by this server; terminate TLS in front of it".into());
        }
        if let Some(l) = f.log.level {
            self.log_level = logrus_level(l);
        }
        if let Some(fmt) = &f.log.format {
            self.log_json = fmt.eq_ignore_ascii_case("json");
        }
        dur(
            "Load.GCInterval",
            &f.load.gc_interval,
            &mut self.load_gc_interval,
        )?;
        dur(
            "Load.ReqExpire",
            &f.load.req_expire,
            &mut self.load.req_expire,
        )?;
        set(f.load.max_requests, &mut self.load.max_requests);
        set(f.load.max_clusters, &mut self.load.max_clusters);
        set(
            f.load.max_engines_per_cluster,
            &mut self.load.max_engines_per_cluster,
        );
        set(f.load.max_engine_series, &mut self.load.max_engine_series);
        set(f.load.retry_queue_size, &mut self.retry_queue_size);
        dur(
            "Cache.GCInterval",
            &f.cache.gc_interval,
            &mut self.cache_gc_interval,
        )?;
        dur("Cache.Expire", &f.cache.expire, &mut self.cache.expire)?;
        set(f.cache.top_k, &mut self.cache.top_k);
        set(
            f.cache.max_entries_per_cluster,
            &mut self.cache.max_entries_per_cluster,
        );
        set(f.cache.max_clusters, &mut self.cache.max_clusters);
        set(
            f.cache.max_locations_per_node,
            &mut self.cache.max_locations_per_node,
        );
        set(f.cache.max_prompt_hashes, &mut self.max_prompt_hashes);
        set(f.cache.debug_mode, &mut self.debug_mode);
        if let Some(h) = &f.replica.svc_disc_host {
            self.svc_disc_host = Some(h.clone()).filter(|s| !s.is_empty());
        }
        if let Some(p) = &f.replica.peers {
            self.peers = p.clone();
        }
        dur(
            "Replica.DNSLookupInterval",
            &f.replica.dns_lookup_interval,
            &mut self.dns_lookup_interval,
        )?;
        set(f.replica.target_port, &mut self.replica_target_port);
        dur(
            "Replica.DialTimeout",
            &f.replica.dial_timeout,
            &mut self.replica_dial_timeout,
        )?;
        dur(
            "Replica.RequestTimeout",
            &f.replica.request_timeout,
            &mut self.replica_request_timeout,
        )?;
        set(f.replica.queue_size, &mut self.replica_queue_size);
        set(f.replica.workers, &mut self.replica_workers);
        if let Some(ip) = &f.replica.pod_ip {
            self.pod_ip = parse_pod_ip(ip)?;
        }
        if let Some(t) = &f.auth.token {
            self.auth_token = Some(t.clone()).filter(|s| !s.is_empty());
        }
        if let Some(u) = &f.store.url {
            self.store = crate::store::StoreSpec::parse("Store.URL", u)?;
        }
        dur("Store.Timeout", &f.store.timeout, &mut self.store_timeout)?;
        dur(
            "Store.ConnectTimeout",
            &f.store.connect_timeout,
            &mut self.store_connect_timeout,
        )?;
        if let Some(p) = &f.store.key_prefix {
            self.store_key_prefix = p.clone();
        }
        Ok(())
    }

    /// Environment variables (names from the origin where it has them).
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), String> {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let d = |k: &str, into: &mut Duration| dur(k, &get(k), into);
        d(
            "METADATA_CENTER_LOAD_GC_INTERVAL",
            &mut self.load_gc_interval,
        )?;
        d("METADATA_CENTER_LOAD_REQ_EXPIRE", &mut self.load.req_expire)?;
        d(
            "METADATA_CENTER_CACHE_GC_INTERVAL",
            &mut self.cache_gc_interval,
        )?;
        d("METADATA_CENTER_CACHE_EXPIRE", &mut self.cache.expire)?;
        d("REPLICA_DNS_LOOKUP_INTERVAL", &mut self.dns_lookup_interval)?;
        d(
            "REPLICA_CLIENT_DIAL_TIMEOUT",
            &mut self.replica_dial_timeout,
        )?;
        d(
            "REPLICA_CLIENT_REQUEST_TIMEOUT",
            &mut self.replica_request_timeout,
        )?;
        d("METADATA_CENTER_HEADER_TIMEOUT", &mut self.header_timeout)?;
        d("METADATA_CENTER_BODY_TIMEOUT", &mut self.body_timeout)?;
        fn num<T: std::str::FromStr>(
            k: &str,
            v: Option<String>,
            into: &mut T,
        ) -> Result<(), String> {
            if let Some(v) = v {
                *into = v
                    .trim()
                    .parse()
                    .map_err(|_| format!("{k}: not a valid number: {v:?}"))?;
            }
            Ok(())
        }
        num(
            "METADATA_CENTER_CACHE_TOPK",
            get("METADATA_CENTER_CACHE_TOPK"),
            &mut self.cache.top_k,
        )?;
        num(
            "METADATA_CENTER_MAX_MEMORY_MB",
            get("METADATA_CENTER_MAX_MEMORY_MB"),
            &mut self.max_memory_mb,
        )?;
        num(
            "REPLICA_CLIENT_TARGET_PORT",
            get("REPLICA_CLIENT_TARGET_PORT"),
            &mut self.replica_target_port,
        )?;
        if let Some(v) = get("METADATA_CENTER_DEBUG_MODE") {
            self.debug_mode = matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "t" | "yes"
            );
        }
        if let Some(v) = get("META_DATA_CENTER_SVC_DISC_HOST") {
            self.svc_disc_host = Some(v.trim().to_string());
        }
        if let Some(v) = get("POD_IP") {
            self.pod_ip = parse_pod_ip(&v)?;
        }
        if let Some(v) = get("METADATA_CENTER_AUTH_TOKEN") {
            self.auth_token = Some(v);
        }
        if let Some(v) = get("METADATA_CENTER_STORE") {
            self.store = crate::store::StoreSpec::parse("METADATA_CENTER_STORE", &v)?;
        }
        d("METADATA_CENTER_STORE_TIMEOUT", &mut self.store_timeout)?;
        Ok(())
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.load_gc_interval.is_zero() || self.cache_gc_interval.is_zero() {
            return Err("GC intervals must be > 0".into());
        }
        if self.load.req_expire.is_zero() || self.cache.expire.is_zero() {
            return Err("expiry durations must be > 0".into());
        }
        if self.idle_timeout.is_zero() || self.max_connections == 0 {
            return Err("HTTP.IdleTimeout and HTTP.MaxConnections must be > 0".into());
        }
        if self.header_timeout.is_zero() || self.body_timeout.is_zero() {
            return Err("HTTP.HeaderTimeout and HTTP.BodyTimeout must be > 0".into());
        }
        if self.max_memory_mb == 0 {
            return Err("Memory.MaxMemoryMB (--max-memory-mb) must be > 0".into());
        }
        if self.cache.top_k == 0 {
            return Err("cache top-K must be > 0".into());
        }
        if self.store_timeout.is_zero() || self.store_connect_timeout.is_zero() {
            return Err(
                "Store.Timeout (--store-timeout) and Store.ConnectTimeout must be > 0".into(),
            );
        }
        if self.store.is_redis() && (!self.peers.is_empty() || self.svc_disc_host.is_some()) {
            return Err("Replica.Peers / --peers / META_DATA_CENTER_SVC_DISC_HOST: replication is not used with a Redis store (the replicas share Redis); remove the peers".into());
        }
        if self.store.is_redis() && self.store_key_prefix.is_empty() {
            return Err("Store.KeyPrefix: must not be empty".into());
        }
        Ok(())
    }
}

fn parse_pod_ip(v: &str) -> Result<Option<std::net::IpAddr>, String> {
    let v = v.trim();
    if v.is_empty() {
        return Ok(None);
    }
    v.parse()
        .map(Some)
        .map_err(|_| format!("POD_IP: not an IP address: {v:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        let ok = |s: &str| parse_go_duration(s).unwrap();
        assert_eq!(ok("60s"), Duration::from_secs(60));
        assert_eq!(ok("660s"), Duration::from_secs(660));
        assert_eq!(ok("1h"), Duration::from_secs(3600));
        assert_eq!(ok("1h30m"), Duration::from_secs(5400));
        assert_eq!(ok("1.5s"), Duration::from_millis(1500));
        assert_eq!(ok("500ms"), Duration::from_millis(500));
        assert_eq!(ok("10us"), Duration::from_micros(10));
        assert_eq!(ok("0"), Duration::ZERO);
        for bad in ["", "60", "s", "1x", "-1s", "1h m"] {
            assert!(parse_go_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn file_then_env() {
        let toml = r#"
            [HTTP]
            Host = "0.0.0.0"
            Port = 9000
            [Log]
            Level = 5
            EnableHook = false
            [Load]
            GCInterval = "10s"
            MaxRequests = 1000
            [Cache]
            Expire = "30m"
            TopK = 7
            [Replica]
            Peers = ["127.0.0.1:9001"]
            [Memory]
            MaxMemoryMB = 64
        "#;
        let f: FileConfig = toml::from_str(toml).unwrap();
        let mut s = Settings::default();
        s.apply_file(&f).unwrap();
        assert_eq!((s.host.as_str(), s.port), ("0.0.0.0", 9000));
        assert_eq!(s.load_gc_interval, Duration::from_secs(10));
        assert_eq!(s.load.max_requests, 1000);
        assert_eq!(s.cache.expire, Duration::from_secs(1800));
        assert_eq!(s.cache.top_k, 7);
        assert_eq!(s.peers, vec!["127.0.0.1:9001".to_string()]);
        assert_eq!(s.max_memory_mb, 64);
        assert_eq!(s.header_timeout, Duration::from_secs(10), "default");
        let env = |k: &str| match k {
            "METADATA_CENTER_MAX_MEMORY_MB" => Some("32".to_string()),
            "METADATA_CENTER_HEADER_TIMEOUT" => Some("1500ms".to_string()),
            "METADATA_CENTER_BODY_TIMEOUT" => Some("2s".to_string()),
            "METADATA_CENTER_CACHE_TOPK" => Some("3".to_string()),
            "METADATA_CENTER_LOAD_REQ_EXPIRE" => Some("2m".to_string()),
            "POD_IP" => Some("".to_string()),
            _ => None,
        };
        s.apply_env(env).unwrap();
        assert_eq!(s.cache.top_k, 3);
        assert_eq!(s.load.req_expire, Duration::from_secs(120));
        assert_eq!(s.pod_ip, None, "POD_IP is optional");
        assert_eq!(s.max_memory_mb, 32);
        assert_eq!(s.header_timeout, Duration::from_millis(1500));
        assert_eq!(s.body_timeout, Duration::from_secs(2));
        s.validate().unwrap();
        s.max_memory_mb = 0;
        assert!(s.validate().unwrap_err().contains("MaxMemoryMB"));
        let bad = |k: &str| (k == "METADATA_CENTER_LOAD_GC_INTERVAL").then(|| "soon".to_string());
        assert!(Settings::default()
            .apply_env(bad)
            .unwrap_err()
            .contains("METADATA_CENTER_LOAD_GC_INTERVAL"));
    }

    #[test]
    fn store_settings_from_file_env_and_their_errors() {
        use crate::store::StoreSpec;
        let f: FileConfig = toml::from_str(
            "[Store]\nURL = \"redis+cluster://a:7000,b:7001\"\nTimeout = \"20ms\"\nKeyPrefix = \"x\"\n",
        )
        .unwrap();
        let mut s = Settings::default();
        assert_eq!(s.store, StoreSpec::Memory);
        s.apply_file(&f).unwrap();
        assert_eq!(
            s.store,
            StoreSpec::RedisCluster(vec!["redis://a:7000".into(), "redis://b:7001".into()])
        );
        assert_eq!(s.store_timeout, Duration::from_millis(20));
        assert_eq!(s.store_key_prefix, "x");
        s.validate().unwrap();
        let env = |k: &str| match k {
            "METADATA_CENTER_STORE" => Some("redis://127.0.0.1:6379".to_string()),
            "METADATA_CENTER_STORE_TIMEOUT" => Some("5ms".to_string()),
            _ => None,
        };
        s.apply_env(env).unwrap();
        assert_eq!(s.store, StoreSpec::Redis("redis://127.0.0.1:6379".into()));
        assert_eq!(s.store_timeout, Duration::from_millis(5));
        s.peers = vec!["10.0.0.5:8080".into()];
        assert!(s.validate().unwrap_err().contains("Replica.Peers"));
        let bad = |k: &str| (k == "METADATA_CENTER_STORE").then(|| "redis://h".to_string());
        let e = Settings::default().apply_env(bad).unwrap_err();
        assert!(
            e.contains("METADATA_CENTER_STORE") && e.contains("missing port"),
            "{e}"
        );
        let f: FileConfig = toml::from_str("[Store]\nURL = \"memcached://h:1\"\n").unwrap();
        let e = Settings::default().apply_file(&f).unwrap_err();
        assert!(e.starts_with("Store.URL"), "{e}");
    }

    #[test]
    fn json_and_yaml_files() {
        let dir = std::env::temp_dir().join(format!("mc-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let j = dir.join("c.json");
        std::fs::write(
            &j,
            r#"{"HTTP":{"Port":1234,"HeaderTimeout":"1s","BodyTimeout":"3s"},"Cache":{"DebugMode":true}}"#,
        )
        .unwrap();
        let f = load_file(&j).unwrap();
        assert_eq!(f.http.port, Some(1234));
        let mut s = Settings::default();
        s.apply_file(&f).unwrap();
        assert_eq!(s.header_timeout, Duration::from_secs(1));
        assert_eq!(s.body_timeout, Duration::from_secs(3));
        assert_eq!(f.cache.debug_mode, Some(true));
        let y = dir.join("c.yaml");
        std::fs::write(&y, "HTTP:\n  Port: 4321\nAuth:\n  Token: s3cret\n").unwrap();
        let f = load_file(&y).unwrap();
        assert_eq!(f.http.port, Some(4321));
        assert_eq!(f.auth.token.as_deref(), Some("s3cret"));
        let x = dir.join("c.ini");
        std::fs::write(&x, "").unwrap();
        assert!(load_file(&x).unwrap_err().contains("unsupported extension"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
