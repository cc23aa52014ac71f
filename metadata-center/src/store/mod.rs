//! The store the API handlers call: the embedded in-memory stores (the default) or Redis
//! (`--store redis://…` / `redis+cluster://…`), behind one enum so the handlers do not care
//! which.
//!
//! This file owns the choice (`StoreSpec`, parsed from the `--store` setting, with errors that
//! name the setting and the reason) and the dispatch (`Store`). The in-memory stores are
//! `crate::load` and `crate::cache`; the Redis store, its key layout and its scripts are in
//! `redis/`.

pub mod redis;

use std::sync::Arc;

use crate::cache::{CachePool, MaxAges};
use crate::endpoint::Endpoint;
use crate::load::{AddRequest, EngineView, LoadStore, Stamp};
use crate::memory::Evictor;
use crate::retry::RetryKind;

pub use self::redis::{RedisConfig, RedisStore};

/// Which store a server uses, from `--store` / `METADATA_CENTER_STORE` / `[Store] URL`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum StoreSpec {
    /// The embedded in-memory stores (`memory`, or the setting left empty).
    #[default]
    Memory,
    /// One Redis server: `redis://[user:password@]host:port[/db]`.
    Redis(String),
    /// A Redis Cluster, from one or more of its nodes:
    /// `redis+cluster://[user:password@]h1:p1,h2:p2,…` (one node is enough; the others are
    /// discovered).
    RedisCluster(Vec<String>),
}

impl StoreSpec {
    /// Parse the setting named `field` (for the error message).
    pub fn parse(field: &str, v: &str) -> Result<StoreSpec, String> {
        let v = v.trim();
        let bad = |why: &str| format!("{field} {v:?}: {why}");
        if v.is_empty() || v == "memory" {
            return Ok(StoreSpec::Memory);
        }
        if let Some(rest) = v.strip_prefix("redis+cluster://") {
            let (auth, hosts) = match rest.rsplit_once('@') {
                Some((a, h)) => (format!("{a}@"), h),
                None => (String::new(), rest),
            };
            let hosts = hosts.trim_end_matches('/');
            if hosts.is_empty() {
                return Err(bad("expected redis+cluster://HOST:PORT[,HOST:PORT…]"));
            }
            let mut nodes = Vec::new();
            for h in hosts.split(',').map(str::trim) {
                if h.is_empty() || h.contains('/') {
                    return Err(bad(&format!("bad node {h:?}: expected HOST:PORT")));
                }
                let url = format!("redis://{auth}{h}");
                check_url(&url).map_err(|e| bad(&format!("node {h:?}: {e}")))?;
                nodes.push(url);
            }
            return Ok(StoreSpec::RedisCluster(nodes));
        }
        if v.starts_with("redis://") {
            check_url(v).map_err(|e| bad(&e))?;
            return Ok(StoreSpec::Redis(v.to_string()));
        }
        if v.starts_with("rediss://") || v.starts_with("redis+unix://") || v.starts_with("unix://")
        {
            return Err(bad(
                "TLS and unix sockets are not supported; use redis://HOST:PORT",
            ));
        }
        Err(bad(
            "expected memory, redis://HOST:PORT or redis+cluster://HOST:PORT,HOST:PORT",
        ))
    }

    pub fn is_redis(&self) -> bool {
        !matches!(self, StoreSpec::Memory)
    }
}

/// A URL the redis client accepts, with a port (a missing port is accepted by the client, as
/// 6379, but is usually a typo here).
fn check_url(url: &str) -> Result<(), String> {
    let host_port = url
        .split("://")
        .nth(1)
        .unwrap_or("")
        .rsplit('@')
        .next()
        .unwrap_or("")
        .split('/')
        .next()
        .unwrap_or("");
    let port = host_port.rsplit_once(':').map(|(_, p)| p).unwrap_or("");
    if host_port.ends_with(']') || port.is_empty() {
        return Err("missing port (HOST:PORT)".into());
    }
    port.parse::<u16>()
        .map_err(|_| format!("bad port {port:?}"))?;
    ::redis::IntoConnectionInfo::into_connection_info(url)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The store the handlers call.
pub enum Store {
    /// The embedded stores; `memory` enforces their shared memory budget after each write.
    Memory {
        load: Arc<LoadStore>,
        cache: Arc<CachePool>,
        memory: Arc<Evictor>,
    },
    /// Shared state in Redis: the server itself holds none.
    Redis(Arc<RedisStore>),
}

impl Store {
    /// `POST /v1/load/stats`.
    pub async fn add(&self, r: &AddRequest<'_>) {
        match self {
            Store::Memory { load, memory, .. } => {
                load.add(r, Stamp::now());
                memory.enforce();
            }
            Store::Redis(s) => s.add(r).await,
        }
    }

    /// `DELETE /v1/load/stats` or `/v1/load/prompt`: whether the request was found (the caller
    /// schedules the delayed retry when it was not).
    pub async fn delete(&self, request_id: &str, kind: RetryKind) -> bool {
        match self {
            Store::Memory { load, .. } => match kind {
                RetryKind::Delete => load.delete(request_id, Stamp::now()),
                RetryKind::DeletePrompt => load.delete_prompt(request_id, Stamp::now()),
            },
            Store::Redis(s) => s.delete(request_id, kind).await,
        }
    }

    /// `GET /v1/load/stats`: `None` for an unknown cluster.
    pub async fn query_load(&self, cluster: &str) -> Option<Vec<EngineView>> {
        match self {
            Store::Memory { load, .. } => load.query(cluster),
            Store::Redis(s) => s.query_load(cluster).await,
        }
    }

    /// `POST /v1/cache/save`.
    pub async fn cache_save(&self, cluster: &str, keys: &[u64], loc: Endpoint) {
        match self {
            Store::Memory { cache, memory, .. } => {
                cache.save(cluster, keys, loc, Stamp::now().mono);
                memory.enforce();
            }
            Store::Redis(s) => s.cache_save(cluster, keys, loc).await,
        }
    }

    /// `POST /v1/cache/query`: locations and matched lengths, best first, at most `top_k`
    /// (0: the configured default), each location's claims counted up to its limit in `ages`
    /// (the TTL when not listed).
    pub async fn cache_query(
        &self,
        cluster: &str,
        keys: &[u64],
        top_k: usize,
        ages: &MaxAges,
    ) -> Vec<(Endpoint, usize)> {
        match self {
            Store::Memory { cache, .. } => {
                cache.query_within(cluster, keys, top_k, Stamp::now().mono, ages)
            }
            Store::Redis(s) => s.cache_query_within(cluster, keys, top_k, ages).await,
        }
    }

    /// The Redis store, if that is the one in use (for its metrics).
    pub fn redis(&self) -> Option<&RedisStore> {
        match self {
            Store::Redis(s) => Some(s),
            Store::Memory { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_are_checked_and_errors_name_the_setting() {
        let p = |v| StoreSpec::parse("--store", v);
        assert_eq!(p("").unwrap(), StoreSpec::Memory);
        assert_eq!(p("memory").unwrap(), StoreSpec::Memory);
        assert_eq!(
            p("redis://127.0.0.1:6379").unwrap(),
            StoreSpec::Redis("redis://127.0.0.1:6379".into())
        );
        assert_eq!(
            p("redis+cluster://a:7000, b:7001").unwrap(),
            StoreSpec::RedisCluster(vec!["redis://a:7000".into(), "redis://b:7001".into()])
        );
        assert_eq!(
            p("redis+cluster://:pw@a:7000").unwrap(),
            StoreSpec::RedisCluster(vec!["redis://:pw@a:7000".into()])
        );
        for (bad, why) in [
            ("redis://host", "missing port"),
            ("redis://host:99999", "bad port"),
            ("redis+cluster://", "expected redis+cluster://"),
            ("redis+cluster://a:1,,b:2", "bad node"),
            ("rediss://h:1", "TLS"),
            ("mysql://h:1", "expected memory"),
        ] {
            let e = p(bad).unwrap_err();
            assert!(e.starts_with("--store"), "{e}");
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
