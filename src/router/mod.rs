//! The router: one per proxy filter config, shared by every worker thread.
//!
//! It owns the lifecycle of a request from the routing point of view:
//! `pick` (parse → match rule → score → account, in `pick.rs`) gives a [`PickedRequest`]
//! (`request.rs`); [`PickedRequest::first_token`] releases the prefill load;
//! [`PickedRequest::finish_with`] releases the request and feeds passive health. Dropping an
//! unfinished request finishes it with "no response", so accounting can never leak from Rust
//! code. Picks that wait for a remote cache lookup (`pick_async`, `pick_start`) live in
//! `lookup.rs`.
//!
//! Nothing here does I/O or waits on a lock held across work: endpoint sets are swapped with
//! `arc-swap`, counters are atomics, the prefix index takes short shard locks. The router
//! starts the background threads ([`crate::background`]) and hands them only what they
//! update (clusters, metrics, clock): they never see the router.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::background::client::ServerAddrs;
use crate::background::log_writer::{self, LogSender};
use crate::background::{self, Event, EventSender, Resolver, SyncTarget, ThreadGroup};
use crate::config::{Config, ConfigError, Rule};
use crate::error::PickError;
use crate::metrics::{Page, Part, RouterMetrics};
use crate::state::{Attachment, Clock, Clusters, PrefixIndex, SharedState};

mod log_line;
mod lookup;
mod pick;
mod request;

use log_line::LogContext;
pub(crate) use lookup::LookupJob;
pub use lookup::{PendingPick, PickStart};
use pick::Routed;
pub use request::{Outcome, PickedRequest};

/// A request header as the host hands it over (name matched case-insensitively).
pub type HeaderRef<'a> = (&'a [u8], &'a [u8]);

struct ModelRoute {
    slot: usize,
    rules: Vec<Arc<Rule>>,
}

/// Scheduling slack on top of the lookup timeout within which a pending pick is decided.
pub const PENDING_SLACK: Duration = Duration::from_millis(50);

/// Everything a router shares between its handles, requests and deferred picks.
pub(crate) struct RouterInner {
    config: Config,
    /// Looked up on every pick: hashbrown's fast default hash (keys come from our config).
    models: hashbrown::HashMap<String, ModelRoute>,
    model_names: Vec<String>,
    /// Shared with the sync thread (held weakly there).
    clusters: Arc<Clusters>,
    index: PrefixIndex,
    /// The shared region this router is attached to, if any.
    shared: Option<Arc<SharedState>>,
    /// Shared with the background threads, which count their calls.
    metrics: Arc<RouterMetrics>,
    clock: Clock,
    in_flight: AtomicU64,
    /// Queue to the sync thread, when the Metadata-Center is enabled.
    events: OnceLock<EventSender>,
    /// Queue to the lookup thread, when remote cache lookups are enabled.
    lookups: OnceLock<crossbeam_channel::Sender<LookupJob>>,
    /// Queue to the request log's writer, when `log.enabled`.
    request_log: OnceLock<LogSender>,
    /// Request ids: a per-router prefix (process id + seed) and a counter.
    id_prefix: String,
    id_counter: AtomicU64,
    /// Randomness for tie-breaking and candidate draws, distinct in every process (a thread-
    /// local generator would repeat the same sequence in every worker forked from one parent).
    rng_seed: u64,
    rng_counter: AtomicU64,
}

/// A seed that differs between processes forked from one parent and between routers.
fn process_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&std::process::id().to_le_bytes());
    h.update(&nanos.to_le_bytes());
    h.update(&fastrand::u64(..).to_le_bytes());
    h.digest()
}

/// A thread-safe router. Cheap to clone (shared state); the background threads stop when
/// the last clone is dropped.
#[derive(Clone)]
pub struct Router {
    inner: Arc<RouterInner>,
    _threads: Arc<ThreadGroup>,
}

impl Router {
    /// Builds a router from a JSON config.
    pub fn from_json(config: &[u8]) -> Result<Router, ConfigError> {
        Ok(Router::new(Config::from_json(config)?))
    }

    /// Builds a router from a validated config.
    pub fn new(config: Config) -> Router {
        Self::build(config, None)
    }

    /// Builds a router whose endpoint counters and prefix index live in a shared region
    /// (created before fork; call this in the process that routes, after fork). Fails when
    /// the region has no free worker slot.
    pub fn new_shared(config: Config, shared: &Arc<SharedState>) -> Result<Router, String> {
        Ok(Self::build(config, Some(shared.attach()?)))
    }

    fn build(config: Config, shared: Option<Arc<Attachment>>) -> Router {
        let mut models = hashbrown::HashMap::new();
        let mut model_names = Vec::new();
        for (slot, (name, rules)) in config.models.iter().enumerate() {
            models.insert(
                name.clone(),
                ModelRoute {
                    slot,
                    rules: rules.iter().cloned().map(Arc::new).collect(),
                },
            );
            model_names.push(name.clone());
        }
        let specs = config.clusters.clone();
        let (index, clock) = match &shared {
            Some(a) => (
                PrefixIndex::shared(Arc::clone(a.state())),
                a.state().clock(),
            ),
            None => (
                PrefixIndex::new(config.prefix_index_capacity),
                Clock::start(),
            ),
        };
        let inner = Arc::new(RouterInner {
            index,
            shared: shared.as_ref().map(|a| Arc::clone(a.state())),
            clusters: Arc::new(Clusters::new(specs, model_names.len(), shared)),
            models,
            model_names,
            metrics: Arc::new(RouterMetrics::with_models(config.models.len())),
            clock,
            in_flight: AtomicU64::new(0),
            events: OnceLock::new(),
            lookups: OnceLock::new(),
            request_log: OnceLock::new(),
            id_prefix: format!("{:08x}{:016x}", std::process::id(), process_seed()),
            rng_seed: process_seed(),
            rng_counter: AtomicU64::new(0),
            id_counter: AtomicU64::new(0),
            config,
        });
        let mut router = Router {
            inner,
            _threads: Arc::new(ThreadGroup::default()),
        };
        let mut names: Vec<&str> = router
            .inner
            .config
            .models
            .values()
            .flatten()
            .map(|r| r.cluster.as_str())
            .collect();
        names.extend(router.inner.config.clusters.keys().map(String::as_str));
        for name in names {
            let addrs = router
                .inner
                .config
                .clusters
                .get(name)
                .map(|specs| specs.iter().map(|s| s.addr).collect::<Vec<_>>())
                .unwrap_or_default();
            router.inner.clusters.replace(name, &addrs, false);
        }
        // Threads start once the static state is in place (a DNS answer must not be
        // overwritten by the initial empty set).
        router._threads = Arc::new(Self::start_threads(&router.inner));
        router
    }

    /// Starts the sync thread (Metadata-Center or DNS clusters) and the lookup threads
    /// (remote cache lookups). A thread that cannot be spawned leaves the router local-only.
    fn start_threads(inner: &Arc<RouterInner>) -> ThreadGroup {
        let mc = &inner.config.metadata_center;
        let mut guards = ThreadGroup::default();
        let dns: Vec<(String, String)> = inner
            .config
            .dns_clusters
            .iter()
            .map(|(c, t)| (c.clone(), t.clone()))
            .collect();
        let addrs = ServerAddrs::new(mc);
        let resolver = Resolver {
            server: (mc.enabled && addrs.name().is_some()).then(|| Arc::clone(&addrs)),
            dns_clusters: dns,
            clusters: Arc::downgrade(&inner.clusters),
            dns_refresh: Duration::from_millis(inner.config.dns_refresh_ms),
        };
        if let Ok(Some(guard)) = background::start_resolver(resolver) {
            guards.push(guard);
        }
        if let Some(shared) = &inner.shared {
            if let Ok(guard) = background::start_reaper(Arc::clone(shared)) {
                guards.push(guard);
            }
        }
        if mc.enabled {
            let target = SyncTarget {
                clusters: Arc::downgrade(&inner.clusters),
                metrics: Arc::clone(&inner.metrics),
                clock: inner.clock,
            };
            if let Ok((sender, guard)) = background::start_sync(target, mc, &addrs) {
                let _ = inner.events.set(sender);
                guards.push(guard);
            }
        }
        let log = &inner.config.log;
        if log.enabled {
            match log_writer::start_log_writer(&log.path, log.queue_lines) {
                Ok((sender, guard)) => {
                    let _ = inner.request_log.set(sender);
                    guards.push(guard);
                }
                Err(e) => eprintln!("llmproxy: request log: cannot start its writer thread: {e}"),
            }
        }
        if mc.enabled && mc.cache_enabled {
            if let Ok((tx, lookup_threads)) =
                background::start_lookups::<LookupJob>(mc, &addrs, 256)
            {
                let _ = inner.lookups.set(tx);
                guards.append(lookup_threads);
            }
        }
        guards
    }

    /// The validated configuration.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Replaces the endpoints of `cluster` (created if unknown). Endpoints that stay keep
    /// their load counters and cache knowledge.
    pub fn set_endpoints(&self, cluster: &str, endpoints: &[SocketAddr]) {
        self.inner.clusters.replace(cluster, endpoints, true);
    }

    /// The current endpoints of a cluster, as `ip:port`.
    pub fn endpoints(&self, cluster: &str) -> Vec<String> {
        self.inner
            .clusters
            .get(cluster)
            .map(|c| {
                c.snapshot()
                    .endpoints
                    .iter()
                    .map(|e| e.address.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Requests picked and not yet finished, across all endpoints.
    pub fn in_flight(&self) -> u64 {
        self.inner.in_flight.load(Ordering::Relaxed)
    }

    /// The longest a pending pick waits for its decision: the lookup timeout plus
    /// [`PENDING_SLACK`]. Zero when remote cache lookups are off (every pick is decided at
    /// once).
    pub fn pending_pick_deadline(&self) -> Duration {
        if self.inner.lookups.get().is_none() {
            return Duration::ZERO;
        }
        Duration::from_millis(self.inner.config.metadata_center.timeout_ms) + PENDING_SLACK
    }

    /// True when a request with this method and path must go through `pick`.
    pub fn should_intercept(&self, method: &[u8], path: &[u8]) -> bool {
        if !method.eq_ignore_ascii_case(b"POST") {
            return false;
        }
        let path = path.split(|&b| b == b'?').next().unwrap_or(path);
        self.inner
            .config
            .intercept_paths
            .iter()
            .any(|p| p.as_bytes() == path)
    }

    /// Routes one request. Always returns a request handle; on error it carries the error.
    pub fn pick(&self, headers: &[HeaderRef], body: &[u8]) -> PickedRequest {
        let started = Instant::now();
        let log = LogContext::capture(&self.inner, headers, body);
        let result = self.inner.prepare(headers, body).and_then(|mut r| {
            self.inner.choose(&mut r, None)?;
            Ok(r)
        });
        self.inner.finish_pick(result, started, log)
    }

    /// A handle for a request that failed before routing (used at the C ABI on panics).
    pub fn failed_request(&self, error: PickError) -> PickedRequest {
        failed_request(&self.inner, error)
    }

    /// Number of chunk hashes in the local prefix index.
    pub fn prefix_index_len(&self) -> usize {
        self.inner.index.len()
    }

    /// Renders every metric in Prometheus text format.
    pub fn metrics_text(&self) -> String {
        self.metrics_part(Part::All)
    }

    /// Renders one part of the metrics ([`Part`]).
    pub fn metrics_part(&self, part: Part) -> String {
        let inner = &self.inner;
        inner.metrics.render(
            &Page {
                in_flight: self.in_flight(),
                index: &inner.index,
                clusters: &inner.clusters.all(),
                endpoint_updates: inner.clusters.updates(),
                model_names: &inner.model_names,
                now_ms: inner.clock.now_ms(),
                shared: inner.shared.as_ref().map(|s| s.stats()),
                request_log: inner.request_log.get().map(|l| &**l.counters()),
            },
            part,
        )
    }
}

impl RouterInner {
    /// Counts a pick and wraps its result in a request handle.
    fn finish_pick(
        self: &Arc<Self>,
        result: Result<Routed, PickError>,
        started: Instant,
        log: Option<Box<LogContext>>,
    ) -> PickedRequest {
        let m = &self.metrics;
        match &result {
            Ok(_) => m.count_pick("routed"),
            Err(e) => m.count_pick(e.outcome()),
        }
        m.pick_duration.observe(started.elapsed().as_secs_f64());
        PickedRequest::new(self, result, started, log)
    }

    /// A request id unique to this router.
    fn next_request_id(&self) -> String {
        let n = self.id_counter.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n:x}", self.id_prefix)
    }

    /// Queues a sync event; false when it was dropped (queue full) or there is no sync.
    fn send(&self, e: Event) -> bool {
        let Some(tx) = self.events.get() else {
            return false;
        };
        let sent = tx.send(e);
        if !sent {
            self.metrics.sync_dropped.fetch_add(1, Ordering::Relaxed);
        }
        sent
    }
}

/// A counted request handle carrying `error`, for failures outside the normal pick path.
fn failed_request(router: &Arc<RouterInner>, error: PickError) -> PickedRequest {
    router.metrics.count_pick(error.outcome());
    PickedRequest::new(router, Err(error), Instant::now(), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"{
        "model_mapping_rule": {
            "m1": {"rules": [
                {"cluster": "prod", "backend": "vllm", "scene_name": "chat"},
                {"cluster": "gray", "backend": "sglang", "headers": [{"key": "x-env", "value": "gray"}]}
            ]},
            "m2": {"rules": [{"cluster": "prod", "backend": "vllm", "headers": [{"key": "x-tenant", "value": "a"}]}]}
        },
        "clusters": {
            "prod": {"endpoints": ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003", "127.0.0.1:9004"]},
            "gray": {"endpoints": ["127.0.0.1:9101"]}
        }
    }"#;

    fn router() -> Router {
        Router::from_json(CONFIG.as_bytes()).unwrap()
    }

    fn chat(model: &str, text: &str) -> Vec<u8> {
        serde_json::json!({"model": model, "messages": [{"role": "user", "content": text}]})
            .to_string()
            .into_bytes()
    }

    #[test]
    fn routes_by_rule_and_header() {
        let r = router();
        let p = r.pick(&[], &chat("m1", "hi"));
        assert_eq!(p.http_status(), 200);
        assert_eq!(p.cluster(), Some("prod"));
        assert_eq!(p.scene(), Some("chat"));
        assert_eq!(p.backend(), Some("vllm"));
        let g = r.pick(&[(b"X-Env", b"gray")], &chat("m1", "hi"));
        assert_eq!(g.cluster(), Some("gray"));
        assert_eq!(g.endpoint(), Some("127.0.0.1:9101"));
        assert_eq!(g.backend(), Some("sglang"));
        // Header values match exactly.
        let d = r.pick(&[(b"x-env", b"Gray")], &chat("m1", "hi"));
        assert_eq!(d.cluster(), Some("prod"));
    }

    #[test]
    fn unknown_model_and_unmatched_rule_are_404() {
        let r = router();
        let p = r.pick(&[], &chat("nope", "hi"));
        assert_eq!(p.http_status(), 404);
        assert!(p.error_body().unwrap().contains("model_not_found"));
        let p = r.pick(&[(b"x-tenant", b"b")], &chat("m2", "hi"));
        assert_eq!(p.http_status(), 404);
        assert!(p.error_body().unwrap().contains("no routing rule"));
        assert_eq!(
            r.pick(&[(b"x-tenant", b"a")], &chat("m2", "hi"))
                .http_status(),
            200
        );
    }

    #[test]
    fn oversized_body_is_413_and_empty_cluster_is_503() {
        let r = Router::from_json(br#"{"max_body_bytes": 1024, "model_mapping_rule": {"m": {"rules": [{"cluster": "empty", "backend": "vllm"}]}}}"#).unwrap();
        assert_eq!(r.pick(&[], &vec![b' '; 2000]).http_status(), 413);
        let p = r.pick(&[], &chat("m", "x"));
        assert_eq!(p.http_status(), 503);
        assert!(p.error_body().unwrap().contains("no_endpoint"));
        r.set_endpoints("empty", &["127.0.0.1:1".parse().unwrap()]);
        assert_eq!(r.pick(&[], &chat("m", "x")).http_status(), 200);
    }

    #[test]
    fn same_prefix_sticks_different_prefixes_spread() {
        let r = router();
        let system = "You are a helpful assistant. ".repeat(100);
        let mut first = None;
        for i in 0..20 {
            let p = r.pick(&[], &chat("m1", &format!("{system} question {i}")));
            let ep = p.endpoint().unwrap().to_string();
            assert_eq!(*first.get_or_insert(ep.clone()), ep, "request {i}");
            p.finish(200);
        }
        let mut seen = std::collections::HashSet::new();
        for i in 0..40 {
            let p = r.pick(
                &[],
                &chat("m1", &format!("unique prompt {i} {}", "x".repeat(600))),
            );
            seen.insert(p.endpoint().unwrap().to_string());
            p.finish(200);
        }
        assert_eq!(seen.len(), 4, "new prefixes spread over every endpoint");
    }

    /// A streamed answer carrying `text`, in events of 7 characters.
    fn sse_answer(text: &str) -> Vec<u8> {
        let mut out = String::new();
        let chars: Vec<char> = text.chars().collect();
        for piece in chars.chunks(7) {
            let piece: String = piece.iter().collect();
            let event = serde_json::json!({"choices": [{"index": 0, "delta": {"content": piece}}]});
            out.push_str(&format!("data: {event}\n\n"));
        }
        out.push_str("data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":40,\"completion_tokens\":150,\"prompt_tokens_details\":{\"cached_tokens\":16}}}\n\ndata: [DONE]\n\n");
        out.into_bytes()
    }

    /// First turn answered by the chosen endpoint, then the second turn (which sends the
    /// answer back): (first endpoint, second endpoint, second cache ratio, metrics page).
    fn two_turns(learn_bytes: usize) -> (String, String, f64, String) {
        let r = Router::from_json(
            format!(
                r#"{{"hash_chunk_bytes": 64, "learn_response_bytes": {learn_bytes},
                "model_mapping_rule": {{"m": {{"rules": [{{"cluster": "c", "backend": "vllm"}}]}}}},
                "clusters": {{"c": {{"endpoints": ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4"]}}}}}}"#
            )
            .as_bytes(),
        )
        .unwrap();
        let question = "Tell me a long story about a lighthouse keeper.";
        let reply =
            "Once upon a time, on a rocky island, there lived a keeper named Ada. ".repeat(10);
        let mut first = r.pick(&[(b":path", b"/v1/chat/completions")], &chat("m", question));
        let first_ep = first.endpoint().unwrap().to_string();
        for piece in sse_answer(&reply).chunks(13) {
            first.observe_response(piece, false);
        }
        first.observe_response(b"", true);
        first.finish(200);
        let body = serde_json::json!({"model": "m", "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": reply},
            {"role": "user", "content": "And then?"},
        ]})
        .to_string();
        let second = r.pick(&[], body.as_bytes());
        let out = (
            first_ep,
            second.endpoint().unwrap().to_string(),
            second.cache_ratio(),
            r.metrics_text(),
        );
        second.finish(200);
        out
    }

    #[test]
    fn the_next_turn_follows_the_learned_answer() {
        // Second prompt: "<|user|>\n" question "\n<|assistant|>\n" reply "\n<|user|>\nAnd then?\n"
        // ≈ 800 bytes = 13 chunks of 64; the first prompt alone covers none of them in full
        // beyond its first; the learned answer covers all but the last two.
        for _ in 0..5 {
            let (a, b, ratio, page) = two_turns(64 * 1024);
            assert_eq!(a, b);
            assert!(ratio > 0.8, "cache ratio {ratio}");
            assert!(
                !page.contains("llmproxy_learned_response_chunks_total 0\n"),
                "{page}"
            );
            assert!(page.contains("llmproxy_tokens_total{model=\"m\",kind=\"prompt\"} 40\n"));
            assert!(page.contains("llmproxy_tokens_total{model=\"m\",kind=\"cached\"} 16\n"));
        }
        let (_, _, ratio, page) = two_turns(0);
        assert!(ratio < 0.2, "without learning: cache ratio {ratio}");
        assert!(page.contains("llmproxy_learned_response_chunks_total 0\n"));
        // Capped: still the leading chunks of the answer.
        let (a, b, ratio, _) = two_turns(200);
        assert_eq!(a, b);
        assert!(ratio > 0.3 && ratio < 0.8, "capped: cache ratio {ratio}");
    }

    #[test]
    fn failed_or_cut_answers_are_not_learned() {
        let r = Router::from_json(
            br#"{"hash_chunk_bytes": 16,
            "model_mapping_rule": {"m": {"rules": [{"cluster": "c", "backend": "vllm"}]}},
            "clusters": {"c": {"endpoints": ["127.0.0.1:1", "127.0.0.1:2"]}}}"#,
        )
        .unwrap();
        let answer = sse_answer(&"word ".repeat(40));
        for (status, cut) in [(500, answer.len()), (200, answer.len() / 2)] {
            let mut p = r.pick(&[], &chat("m", "hello"));
            p.observe_response(&answer[..cut], true);
            p.finish(status);
        }
        let mut p = r.pick(&[], &chat("m", "hello"));
        p.observe_response(&answer, true);
        p.finish_with(200, Outcome::Local);
        assert!(r
            .metrics_text()
            .contains("llmproxy_learned_response_chunks_total 0\n"));
    }

    #[test]
    fn load_steers_away_from_busy_endpoints() {
        let r = router();
        // Hold 20 requests with the same prefix in flight: load must spread them.
        let system = "shared system prompt ".repeat(200);
        let held: Vec<_> = (0..20)
            .map(|i| r.pick(&[], &chat("m1", &format!("{system}{i}"))))
            .collect();
        let mut per = std::collections::HashMap::new();
        for p in &held {
            *per.entry(p.endpoint().unwrap().to_string()).or_insert(0) += 1;
        }
        assert!(per.len() >= 3, "{per:?}");
        assert!(per.values().all(|&n| n <= 10), "{per:?}");
        assert_eq!(r.in_flight(), 20);
        drop(held);
        assert_eq!(r.in_flight(), 0);
    }

    #[test]
    fn first_token_and_finish_release_accounting() {
        let r = router();
        let mut p = r.pick(&[], &chat("m1", &"y".repeat(5000)));
        let ep = p.endpoint().unwrap().to_string();
        let metrics = r.metrics_text();
        assert!(
            metrics.contains(&format!(
                "llmproxy_endpoint_in_flight_requests{{cluster=\"prod\",endpoint=\"{ep}\"}} 1"
            )),
            "{metrics}"
        );
        assert!(metrics.contains(&format!(
            "llmproxy_endpoint_prefill_chars{{cluster=\"prod\",endpoint=\"{ep}\"}} {}",
            p.prompt_chars()
        )));
        p.first_token();
        p.first_token();
        assert!(r.metrics_text().contains(&format!(
            "llmproxy_endpoint_prefill_chars{{cluster=\"prod\",endpoint=\"{ep}\"}} 0"
        )));
        p.finish(200);
        let metrics = r.metrics_text();
        assert!(metrics.contains("llmproxy_in_flight_requests 0"));
        assert!(metrics.contains("llmproxy_finished_requests_total{status=\"2xx\"} 1"));
        assert!(
            metrics.contains(
                "llmproxy_time_to_first_token_seconds_count{model=\"m1\",cluster=\"prod\""
            ),
            "{metrics}"
        );
    }

    #[test]
    fn only_the_endpoints_own_failures_eject_it() {
        let r = Router::from_json(br#"{"algorithm": "round_robin", "ejection": {"consecutive_failures": 2, "eject_ms": 60000},
            "model_mapping_rule": {"m": {"rules": [{"cluster": "c", "backend": "vllm"}]}},
            "clusters": {"c": {"endpoints": ["127.0.0.1:1"]}}}"#).unwrap();
        let ejected = |r: &Router| {
            r.metrics_text()
                .contains("llmproxy_endpoint_ejected{cluster=\"c\",endpoint=\"127.0.0.1:1\"} 1")
        };
        // What a client or the proxy causes: route timeouts, local replies, a client gone.
        for (status, outcome) in [
            (504, Outcome::Local),
            (503, Outcome::Local),
            (499, Outcome::Local),
            (0, Outcome::Local),
            (500, Outcome::Upstream),
            (499, Outcome::Upstream),
        ] {
            r.pick(&[], &chat("m", "x")).finish_with(status, outcome);
            assert!(!ejected(&r), "{status} {outcome:?} ejected the endpoint");
        }
        // What the endpoint does: a connect failure / reset before any byte, its own 503.
        r.pick(&[], &chat("m", "x"))
            .finish_with(503, Outcome::EndpointFailed);
        assert!(!ejected(&r));
        r.pick(&[], &chat("m", "x"))
            .finish_with(502, Outcome::Upstream);
        assert!(ejected(&r), "two endpoint failures in a row eject it");
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "wall-clock timing: under Miri 10 picks outlast eject_ms"
    )]
    fn failing_endpoint_is_ejected_then_readmitted() {
        let r = Router::from_json(br#"{"algorithm": "round_robin", "ejection": {"consecutive_failures": 2, "eject_ms": 200},
            "model_mapping_rule": {"m": {"rules": [{"cluster": "c", "backend": "vllm"}]}},
            "clusters": {"c": {"endpoints": ["127.0.0.1:1", "127.0.0.1:2"]}}}"#).unwrap();
        for _ in 0..4 {
            let p = r.pick(&[], &chat("m", "x"));
            let bad = p.endpoint() == Some("127.0.0.1:1");
            p.finish(if bad { 503 } else { 200 });
        }
        for _ in 0..10 {
            let p = r.pick(&[], &chat("m", "x"));
            assert_eq!(p.endpoint(), Some("127.0.0.1:2"));
            p.finish(200);
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
        let seen: std::collections::HashSet<_> = (0..10)
            .map(|_| {
                let p = r.pick(&[], &chat("m", "x"));
                let e = p.endpoint().unwrap().to_string();
                p.finish(200);
                e
            })
            .collect();
        assert!(seen.contains("127.0.0.1:1"), "re-admitted after eject_ms");
    }

    #[test]
    fn retry_moves_to_an_untried_endpoint_until_none_left() {
        let r = router();
        let mut p = r.pick(&[(b"x-env", b"gray")], &chat("m1", "x"));
        assert_eq!(p.endpoint(), Some("127.0.0.1:9101"));
        let e = p.retry().unwrap_err();
        assert_eq!(e.http_status(), 503);
        assert_eq!(p.http_status(), 503);
        assert_eq!(r.in_flight(), 0);
        p.finish(0);

        let mut p = r.pick(&[], &chat("m1", "x"));
        let mut tried = vec![p.endpoint().unwrap().to_string()];
        while p.retry().is_ok() {
            let ep = p.endpoint().unwrap().to_string();
            assert!(!tried.contains(&ep));
            tried.push(ep);
            assert_eq!(r.in_flight(), 1);
        }
        assert_eq!(tried.len(), 4);
        p.finish(0);
        assert_eq!(r.in_flight(), 0);
    }

    #[test]
    fn set_endpoints_keeps_state_of_staying_endpoints() {
        let r = router();
        let held = r.pick(&[(b"x-env", b"gray")], &chat("m1", "x"));
        r.set_endpoints(
            "gray",
            &[
                "127.0.0.1:9101".parse().unwrap(),
                "127.0.0.1:9102".parse().unwrap(),
            ],
        );
        assert!(r.metrics_text().contains(
            "llmproxy_endpoint_in_flight_requests{cluster=\"gray\",endpoint=\"127.0.0.1:9101\"} 1"
        ));
        r.set_endpoints("gray", &["127.0.0.1:9102".parse().unwrap()]);
        held.finish(200);
        assert_eq!(r.in_flight(), 0);
        assert_eq!(r.endpoints("gray"), vec!["127.0.0.1:9102"]);
    }

    #[test]
    fn intercepts_only_post_to_configured_paths() {
        let r = router();
        assert!(r.should_intercept(b"POST", b"/v1/chat/completions"));
        assert!(r.should_intercept(b"post", b"/v1/completions?x=1"));
        assert!(!r.should_intercept(b"GET", b"/v1/chat/completions"));
        assert!(!r.should_intercept(b"POST", b"/v1/embeddings"));
    }

    /// Two routers attached to one region, as two nginx workers are.
    fn shared_pair() -> (Router, Router, Arc<SharedState>) {
        let region = SharedState::create(crate::state::shared::MIN_SIZE).unwrap();
        let config = || Config::from_json(CONFIG.as_bytes()).unwrap();
        let a = Router::new_shared(config(), &region).unwrap();
        let b = Router::new_shared(config(), &region).unwrap();
        (a, b, region)
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "starts the reaper thread and scans the region: slow under Miri"
    )]
    fn routers_on_one_shared_region_share_prefixes_and_load() {
        let (a, b, region) = shared_pair();
        // A prefix learned by one router is followed by the other.
        let system = "You are a helpful assistant. ".repeat(100);
        let first = a.pick(&[], &chat("m1", &format!("{system} question 0")));
        let home = first.endpoint().unwrap().to_string();
        first.finish(200);
        for i in 1..10 {
            let p = b.pick(&[], &chat("m1", &format!("{system} question {i}")));
            assert_eq!(p.endpoint().unwrap(), home, "request {i}");
            p.finish(200);
        }
        assert!(b.prefix_index_len() > 0 && a.prefix_index_len() == b.prefix_index_len());
        // Load held by one router is seen by the other (and counted once).
        let held: Vec<_> = (0..6)
            .map(|i| a.pick(&[], &chat("m1", &format!("load {i} {}", "y".repeat(500)))))
            .collect();
        assert_eq!(region.total_in_flight(), 6);
        let seen_by_b = b.metrics_part(Part::State);
        let in_flight: u64 = seen_by_b
            .lines()
            .filter(|l| l.starts_with("llmproxy_endpoint_in_flight_requests{cluster=\"prod\""))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum();
        assert_eq!(in_flight, 6, "{seen_by_b}");
        assert!(!b
            .metrics_part(Part::Router)
            .contains("llmproxy_endpoint_in_flight"));
        assert!(seen_by_b.contains("llmproxy_shared_state_workers 2"));
        drop(held);
        assert_eq!(region.total_in_flight(), 0);
        // Detached routers free their worker slots.
        drop((a, b));
        assert_eq!(region.stats().workers, 0);
    }

    #[test]
    #[cfg_attr(miri, ignore = "starts the reaper thread: slow under Miri")]
    fn a_region_without_free_worker_slots_refuses_a_router() {
        let region = SharedState::create(crate::state::shared::MIN_SIZE).unwrap();
        let config = || Config::from_json(CONFIG.as_bytes()).unwrap();
        let held: Vec<Router> = (0..crate::state::shared::MAX_WORKERS)
            .map(|_| Router::new_shared(config(), &region).unwrap())
            .collect();
        let err = Router::new_shared(config(), &region).err().unwrap();
        assert!(err.contains("worker slots"), "{err}");
        drop(held);
        assert!(Router::new_shared(config(), &region).is_ok());
    }
}
