//! Metadata-Center HTTP client: the aigw wire API, server replicas chosen by cluster, and a
//! circuit breaker per replica. Runs only on library threads (blocking calls, each bounded by
//! one deadline across every replica it tries).
//!
//! The server's host name is never resolved on a call: [`ServerAddrs`] holds the last good
//! addresses, refreshed by a background resolver thread (a literal IP needs none), so a
//! slow or black-holed DNS resolver delays no lookup.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

use crate::config::MetadataCenter;

/// Consecutive failures that open a replica's breaker.
const BREAKER_FAILURES: u32 = 5;
/// How long an open breaker refuses calls before letting one probe through.
const BREAKER_COOLDOWN: Duration = Duration::from_secs(2);
/// How often the server host name is re-resolved (by the resolver thread).
pub const RESOLVE_EVERY: Duration = Duration::from_secs(5);

/// The Metadata-Center's replica addresses: the last good resolution of its host name,
/// shared by every client of one router and read without waiting.
pub struct ServerAddrs {
    host: String,
    port: u16,
    current: ArcSwap<Vec<SocketAddr>>,
}

impl ServerAddrs {
    /// Addresses of `settings.host`: set at once when it is a literal IP; otherwise empty
    /// until the resolver thread has an answer ([`ServerAddrs::set`]).
    pub fn new(settings: &MetadataCenter) -> Arc<Self> {
        let literal = literal_ip(&settings.host)
            .map(|ip| vec![SocketAddr::new(ip, settings.port)])
            .unwrap_or_default();
        Arc::new(Self {
            host: settings.host.clone(),
            port: settings.port,
            current: ArcSwap::from_pointee(literal),
        })
    }

    /// The host name to resolve (`host:port`), or None when the host is a literal IP.
    pub fn name(&self) -> Option<(&str, u16)> {
        literal_ip(&self.host)
            .is_none()
            .then_some((self.host.as_str(), self.port))
    }

    /// Replaces the addresses (sorted, deduplicated); an empty list is ignored.
    pub fn set(&self, mut addrs: Vec<SocketAddr>) {
        addrs.sort();
        addrs.dedup();
        if !addrs.is_empty() {
            self.current.store(Arc::new(addrs));
        }
    }

    /// The last good addresses.
    pub fn get(&self) -> Arc<Vec<SocketAddr>> {
        self.current.load_full()
    }
}

/// `host` as an IP address (IPv6 with or without brackets), None for a name.
fn literal_ip(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// One entry of `GET /v1/load/stats`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct EngineLoad {
    /// Endpoint identity as reported (`ip:port` or `ip`).
    pub ip: String,
    /// Requests in flight on that engine, all gateways together.
    #[serde(default)]
    pub queued_req_num: i64,
    /// Prompt length still in prefill, all gateways together.
    #[serde(default)]
    pub prompt_length: i64,
}

/// One entry of `POST /v1/cache/query`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct CacheLocation {
    /// Endpoint identity.
    pub ip: String,
    /// Leading prefix chunks matched.
    pub length: usize,
}

#[derive(Deserialize)]
struct Envelope<T> {
    status: Option<String>,
    #[serde(default)]
    error: Option<serde_json::Value>,
    data: Option<T>,
}

#[derive(Deserialize)]
struct CacheQueryData {
    #[serde(default)]
    locations: Vec<CacheLocation>,
}

/// Body of `POST /v1/load/stats`.
#[derive(Serialize)]
pub struct AddRequest<'a> {
    /// Unique request id.
    pub request_id: &'a str,
    /// Cluster key.
    pub cluster: &'a str,
    /// Prompt length (characters of the canonical prompt).
    pub prompt_length: u64,
    /// Endpoint identity.
    pub ip: &'a str,
    /// Unix nanoseconds at the sender.
    pub timestamp: u64,
}

/// Body of the two deletes.
#[derive(Serialize)]
pub struct DeleteRequest<'a> {
    /// Request id given at add.
    pub request_id: &'a str,
    /// Cluster key (ignored by the server, used here to pick the replica).
    pub cluster: &'a str,
    /// Unix nanoseconds at the sender.
    pub timestamp: u64,
}

/// Body of `POST /v1/cache/save`.
#[derive(Serialize)]
pub struct SaveCache<'a> {
    /// Cluster key.
    pub cluster: &'a str,
    /// Cumulative prefix hashes.
    pub prompt_hash: &'a [u64],
    /// Endpoint identity.
    pub ip: &'a str,
}

/// Body of `POST /v1/cache/query` (sends `top_k`, the field the server reads).
#[derive(Serialize)]
pub struct CacheQuery<'a> {
    /// Cluster key.
    pub cluster: &'a str,
    /// Cumulative prefix hashes of the prompt.
    pub prompt_hash: &'a [u64],
    /// Locations wanted at most.
    pub top_k: usize,
    /// Our extension: per location, claims saved longer ago than this many ms count as absent
    /// (the endpoint's cache residency, as this router estimates it); locations not listed:
    /// the server's TTL. Omitted when empty; the origin's server ignores it.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub max_age_ms: BTreeMap<String, u64>,
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// Every replica's breaker is open; nothing was sent.
    Unavailable,
    /// Transport failure or timeout.
    Transport(String),
    /// Non-200 status or an `ERROR` envelope.
    Rejected(String),
}

struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
}

impl Breaker {
    fn allows(&self, now: Instant) -> bool {
        self.open_until.is_none_or(|t| now >= t)
    }
    fn success(&mut self) {
        self.failures = 0;
        self.open_until = None;
    }
    fn failure(&mut self, now: Instant) {
        self.failures += 1;
        // Half-open after the cooldown: a single failed probe reopens.
        if self.failures >= BREAKER_FAILURES || self.open_until.is_some() {
            self.open_until = Some(now + BREAKER_COOLDOWN);
        }
    }
}

/// Client of one Metadata-Center service (one host name, possibly several replicas).
pub struct Client {
    agent: ureq::Agent,
    settings: MetadataCenter,
    timeout: Duration,
    addrs: Arc<ServerAddrs>,
    /// The address list the replicas were built from (to notice a new resolution).
    seen: Arc<Vec<SocketAddr>>,
    replicas: Vec<(SocketAddr, Breaker)>,
}

impl Client {
    /// A client of the replicas in `addrs`; `timeout` bounds every call, across all the
    /// replicas it tries.
    pub fn new(settings: MetadataCenter, timeout: Duration, addrs: Arc<ServerAddrs>) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .max_idle_connections_per_host(4)
            .build()
            .into();
        Self {
            agent,
            settings,
            timeout,
            addrs,
            seen: Arc::new(Vec::new()),
            replicas: Vec::new(),
        }
    }

    /// Number of replicas whose breaker is open now.
    pub fn open_breakers(&self) -> usize {
        let now = Instant::now();
        self.replicas.iter().filter(|(_, b)| !b.allows(now)).count()
    }

    /// Takes the resolver's latest addresses (never resolves here), keeping the breakers of
    /// replicas that stay.
    fn refresh_replicas(&mut self) {
        let addrs = self.addrs.get();
        if Arc::ptr_eq(&addrs, &self.seen) {
            return;
        }
        self.seen = Arc::clone(&addrs);
        let mut old = std::mem::take(&mut self.replicas);
        self.replicas = addrs
            .iter()
            .copied()
            .map(|a| match old.iter().position(|(x, _)| *x == a) {
                Some(i) => old.swap_remove(i),
                None => (
                    a,
                    Breaker {
                        failures: 0,
                        open_until: None,
                    },
                ),
            })
            .collect();
    }

    /// Replicas to try for `key`, in order: the one FNV-1a(key) pins, then the next one.
    fn route(&mut self, key: &str) -> Vec<usize> {
        self.refresh_replicas();
        let n = self.replicas.len();
        if n == 0 {
            return Vec::new();
        }
        let start = fnv1a32(key.as_bytes()) as usize % n;
        let now = Instant::now();
        (0..n.min(2))
            .map(|i| (start + i) % n)
            .filter(|&i| self.replicas[i].1.allows(now))
            .collect()
    }

    fn call<T: serde::de::DeserializeOwned>(
        &mut self,
        key: &str,
        method: &str,
        path_and_query: &str,
        body: Option<&[u8]>,
    ) -> Result<Option<T>, CallError> {
        let deadline = Instant::now() + self.timeout;
        self.call_until(deadline, key, method, path_and_query, body)
    }

    /// One call, tried on the replica pinned for `key` and then the next one, all of it
    /// before `deadline`: each attempt gets only the time that is left.
    fn call_until<T: serde::de::DeserializeOwned>(
        &mut self,
        deadline: Instant,
        key: &str,
        method: &str,
        path_and_query: &str,
        body: Option<&[u8]>,
    ) -> Result<Option<T>, CallError> {
        let order = self.route(key);
        if order.is_empty() {
            return Err(CallError::Unavailable);
        }
        let mut last = CallError::Unavailable;
        for i in order {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(CallError::Transport("deadline passed".into()));
            }
            let addr = self.replicas[i].0;
            match self.call_one::<T>(addr, left, method, path_and_query, body) {
                Ok(v) => {
                    self.replicas[i].1.success();
                    return Ok(v);
                }
                Err(e) => {
                    self.replicas[i].1.failure(Instant::now());
                    last = e;
                }
            }
        }
        Err(last)
    }

    fn call_one<T: serde::de::DeserializeOwned>(
        &self,
        addr: SocketAddr,
        timeout: Duration,
        method: &str,
        path_and_query: &str,
        body: Option<&[u8]>,
    ) -> Result<Option<T>, CallError> {
        let url = format!("http://{addr}{path_and_query}");
        let auth = self
            .settings
            .auth_token
            .as_ref()
            .map(|t| format!("Bearer {t}"));
        macro_rules! with_headers {
            ($b:expr) => {{
                let b = $b
                    .config()
                    .timeout_global(Some(timeout))
                    .build()
                    .header("Content-Type", "application/json");
                match &auth {
                    Some(a) => b.header("Authorization", a.as_str()),
                    None => b,
                }
            }};
        }
        let sent = match (method, body) {
            ("GET", _) => with_headers!(self.agent.get(&url)).call(),
            ("POST", Some(b)) => with_headers!(self.agent.post(&url)).send(b),
            ("DELETE", Some(b)) => with_headers!(self.agent.delete(&url))
                .force_send_body()
                .send(b),
            _ => return Err(CallError::Rejected(format!("unsupported call {method}"))),
        };
        let mut resp = sent.map_err(|e| CallError::Transport(e.to_string()))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(16 << 20)
            .read_to_string()
            .map_err(|e| CallError::Transport(e.to_string()))?;
        if status != 200 {
            return Err(CallError::Rejected(format!(
                "HTTP {status}: {}",
                truncate(&text)
            )));
        }
        let env: Envelope<T> = serde_json::from_str(&text)
            .map_err(|e| CallError::Rejected(format!("bad envelope: {e}")))?;
        if env.status.as_deref().is_some_and(|s| s != "OK") {
            return Err(CallError::Rejected(format!(
                "status {:?}, error {}",
                env.status,
                env.error.unwrap_or_default()
            )));
        }
        Ok(env.data)
    }

    /// `POST /v1/load/stats`.
    pub fn add_request(&mut self, r: &AddRequest) -> Result<(), CallError> {
        let body = serde_json::to_vec(r).unwrap_or_default();
        self.call::<serde_json::Value>(r.cluster, "POST", "/v1/load/stats", Some(&body))
            .map(drop)
    }

    /// `DELETE /v1/load/prompt`.
    pub fn delete_prompt(&mut self, r: &DeleteRequest) -> Result<(), CallError> {
        let body = serde_json::to_vec(r).unwrap_or_default();
        self.call::<serde_json::Value>(r.cluster, "DELETE", "/v1/load/prompt", Some(&body))
            .map(drop)
    }

    /// `DELETE /v1/load/stats`.
    pub fn delete_request(&mut self, r: &DeleteRequest) -> Result<(), CallError> {
        let body = serde_json::to_vec(r).unwrap_or_default();
        self.call::<serde_json::Value>(r.cluster, "DELETE", "/v1/load/stats", Some(&body))
            .map(drop)
    }

    /// `POST /v1/cache/save`.
    pub fn save_cache(&mut self, r: &SaveCache) -> Result<(), CallError> {
        let body = serde_json::to_vec(r).unwrap_or_default();
        self.call::<serde_json::Value>(r.cluster, "POST", "/v1/cache/save", Some(&body))
            .map(drop)
    }

    /// `GET /v1/load/stats?cluster=` (`data: null` means no load anywhere).
    pub fn query_load(&mut self, cluster: &str) -> Result<Vec<EngineLoad>, CallError> {
        let q = format!("/v1/load/stats?cluster={}", url_encode(cluster));
        Ok(self
            .call::<Vec<EngineLoad>>(cluster, "GET", &q, None)?
            .unwrap_or_default())
    }

    /// `POST /v1/cache/query`, answered or failed before `deadline`.
    pub fn query_cache(
        &mut self,
        query: &CacheQuery,
        deadline: Instant,
    ) -> Result<Vec<CacheLocation>, CallError> {
        let body = serde_json::to_vec(query).unwrap_or_default();
        Ok(self
            .call_until::<CacheQueryData>(
                deadline,
                query.cluster,
                "POST",
                "/v1/cache/query",
                Some(&body),
            )?
            .map(|d| d.locations)
            .unwrap_or_default())
    }
}

fn truncate(s: &str) -> &str {
    let mut n = s.len().min(200);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    &s[..n]
}

/// FNV-1a 32-bit, as the origin pins a cluster to a metadata-center replica.
pub fn fnv1a32(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ b as u32).wrapping_mul(0x0100_0193)
    })
}

/// Characters kept as they are in a URL path segment or query value (RFC 3986 unreserved).
pub const URL_COMPONENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Percent-encodes a query value or path segment.
pub fn url_encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, URL_COMPONENT).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_reference_values() {
        assert_eq!(fnv1a32(b""), 0x811c9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c292c);
        assert_eq!(fnv1a32(b"foobar"), 0xbf9cf968);
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(url_encode("outbound|8000||a.b"), "outbound%7C8000%7C%7Ca.b");
    }

    #[test]
    fn breaker_opens_after_failures_and_half_opens() {
        let now = Instant::now();
        let mut b = Breaker {
            failures: 0,
            open_until: None,
        };
        for _ in 0..BREAKER_FAILURES - 1 {
            b.failure(now);
            assert!(b.allows(now));
        }
        b.failure(now);
        assert!(!b.allows(now));
        let later = now + BREAKER_COOLDOWN;
        assert!(b.allows(later), "half-open probe");
        b.failure(later);
        assert!(!b.allows(later), "failed probe reopens");
        b.success();
        assert!(b.allows(later));
    }

    #[test]
    fn one_deadline_covers_every_replica_tried() {
        // Two replicas that accept and never answer: the lookup tries both within its one
        // deadline instead of giving each the whole timeout.
        let mut ports = Vec::new();
        for _ in 0..2 {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            ports.push(l.local_addr().unwrap().port());
            std::thread::spawn(move || {
                let held: Vec<_> = l.incoming().flatten().collect();
                drop(held);
            });
        }
        let settings = MetadataCenter {
            host: "127.0.0.1".into(),
            ..MetadataCenter::from_env(&|_| None).unwrap()
        };
        let addrs = ServerAddrs::new(&settings);
        addrs.set(
            ports
                .iter()
                .map(|&p| SocketAddr::from(([127, 0, 0, 1], p)))
                .collect(),
        );
        let timeout = Duration::from_millis(150);
        let mut c = Client::new(settings, timeout, addrs);
        for _ in 0..3 {
            let start = Instant::now();
            let query = CacheQuery {
                cluster: "c",
                prompt_hash: &[1, 2, 3],
                top_k: 2,
                max_age_ms: BTreeMap::new(),
            };
            let got = c.query_cache(&query, start + timeout);
            let took = start.elapsed();
            assert!(matches!(got, Err(CallError::Transport(_))), "{got:?}");
            assert!(took < timeout + Duration::from_millis(40), "took {took:?}");
        }
    }

    #[test]
    fn unreachable_server_fails_fast_then_breaker_refuses() {
        // Port 9 on loopback: connection refused.
        let settings = MetadataCenter {
            host: "127.0.0.1".into(),
            port: 9,
            ..MetadataCenter::from_env(&|_| None).unwrap()
        };
        let addrs = ServerAddrs::new(&settings);
        let mut c = Client::new(settings, Duration::from_millis(200), addrs);
        for _ in 0..BREAKER_FAILURES {
            assert!(matches!(c.query_load("c"), Err(CallError::Transport(_))));
        }
        assert_eq!(c.query_load("c"), Err(CallError::Unavailable));
        assert_eq!(c.open_breakers(), 1);
    }
}
