//! The router: one per proxy filter config, shared by every worker thread.
//!
//! It owns the lifecycle of a request from the routing point of view:
//! `pick` (parse → match rule → score → account) gives a [`PickedRequest`];
//! [`PickedRequest::first_token`] releases the prefill load; [`PickedRequest::finish`]
//! releases the request and feeds passive health. Dropping an unfinished request finishes it
//! with "no response", so accounting can never leak from Rust code.
//!
//! Nothing here does I/O or waits on a lock held across work: endpoint sets are swapped with
//! `arc-swap`, counters are atomics, the prefix index takes short shard locks. Picks that
//! wait for a remote cache lookup (`pick_async`, `pick_start`) live in [`lookup`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::balancer::{self, CandidateLoad};
use crate::config::{Algorithm, Backend, Config, ConfigError, Rule, Subset};
use crate::error::PickError;
use crate::metrics::{escape_label, family, header, RouterMetrics, PICK_OUTCOMES};
use crate::request::{self, RequestKind};
use crate::state::{Cluster, Endpoint, EndpointSet, PrefixIndex};
use crate::sync::client::ServerAddrs;
use crate::sync::{self, Event, EventSender, RequestSync, ThreadGroup};
use crate::transcode::{self, Output, Transcoder, UpstreamRequest};

mod lookup;

pub(crate) use lookup::LookupJob;
pub use lookup::{PendingPick, PickStart};

/// A request header as the host hands it over (name matched case-insensitively).
pub type HeaderRef<'a> = (&'a [u8], &'a [u8]);

struct ModelRoute {
    slot: usize,
    rules: Vec<Arc<Rule>>,
}

/// Scheduling slack on top of the lookup timeout within which a pending pick is decided.
pub const PENDING_SLACK: Duration = Duration::from_millis(50);

pub(crate) struct RouterInner {
    config: Config,
    models: HashMap<String, ModelRoute>,
    model_names: Vec<String>,
    clusters: ArcSwap<HashMap<String, Arc<Cluster>>>,
    index: PrefixIndex,
    metrics: RouterMetrics,
    epoch: Instant,
    next_endpoint_id: AtomicU32,
    in_flight: AtomicU64,
    /// Serialises endpoint-set replacements (never taken on the request path).
    update_lock: Mutex<()>,
    /// Queue to the sync thread, when the Metadata-Center is enabled.
    events: OnceLock<EventSender>,
    /// Queue to the lookup thread, when remote cache lookups are enabled.
    lookups: OnceLock<crossbeam_channel::Sender<LookupJob>>,
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
        let mut models = HashMap::new();
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
        let inner = Arc::new(RouterInner {
            index: PrefixIndex::new(config.prefix_index_capacity),
            models,
            model_names,
            clusters: ArcSwap::from_pointee(HashMap::new()),
            metrics: RouterMetrics::default(),
            epoch: Instant::now(),
            next_endpoint_id: AtomicU32::new(1),
            in_flight: AtomicU64::new(0),
            update_lock: Mutex::new(()),
            events: OnceLock::new(),
            lookups: OnceLock::new(),
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
            router.inner.replace_endpoints(name, &addrs, false);
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
        if mc.enabled {
            if let Ok(Some(guard)) = sync::start_resolver(&addrs) {
                guards.push(guard);
            }
        }
        if mc.enabled || !dns.is_empty() {
            let refresh = Duration::from_millis(inner.config.dns_refresh_ms);
            if let Ok((sender, guard)) =
                sync::start(Arc::downgrade(inner), mc, &addrs, dns, refresh)
            {
                if let Some(s) = sender {
                    let _ = inner.events.set(s);
                }
                guards.push(guard);
            }
        }
        if mc.enabled && mc.cache_enabled {
            if let Ok((tx, lookup_threads)) = sync::start_lookups::<LookupJob>(mc, &addrs, 256) {
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
        self.inner.replace_endpoints(cluster, endpoints, true);
    }

    /// The current endpoints of a cluster, as `ip:port`.
    pub fn endpoints(&self, cluster: &str) -> Vec<String> {
        self.inner
            .clusters
            .load()
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
        let result = self.inner.prepare(headers, body).and_then(|mut r| {
            self.inner.choose(&mut r, None)?;
            Ok(r)
        });
        self.inner.finish_pick(result, started)
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
        self.inner.render_metrics()
    }
}

fn find_header<'a>(headers: &[HeaderRef<'a>], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
        .map(|(_, v)| *v)
}

fn match_rule<'r>(rules: &'r [Arc<Rule>], headers: &[HeaderRef]) -> Option<&'r Arc<Rule>> {
    rules.iter().find(|r| {
        r.headers
            .iter()
            .all(|h| find_header(headers, &h.key) == Some(h.value.as_bytes()))
    })
}

/// The routing part of a picked request.
struct Routed {
    rule: Arc<Rule>,
    cluster: Arc<Cluster>,
    /// None after a retry found no other endpoint.
    endpoint: Option<Arc<Endpoint>>,
    tried: Vec<u32>,
    model: String,
    model_slot: usize,
    stream: bool,
    prompt_chars: u64,
    /// Prompt characters the chosen endpoint must compute (not expected in its cache).
    uncached_chars: u64,
    prefix_hashes: Vec<u64>,
    cache_ratio: f64,
    /// Metadata-Center identity of the current attempt.
    sync: Option<Arc<RequestSync>>,
    /// The model name the backend receives.
    upstream_model: String,
    /// Index of the rule subset chosen for this request.
    subset: Option<usize>,
    /// Path/body rewrites for the upstream.
    upstream: UpstreamRequest,
    /// Response transcoder (also detects the first token).
    transcoder: Transcoder,
}

/// Chooses one of a rule's subsets by weight (None when the rule has none).
fn pick_subset(subsets: &[Subset]) -> Option<usize> {
    let total: u64 = subsets.iter().map(|s| s.weight as u64).sum();
    if total == 0 {
        return None;
    }
    let mut ticket = fastrand::u64(..total);
    subsets.iter().position(|s| {
        if ticket < s.weight as u64 {
            true
        } else {
            ticket -= s.weight as u64;
            false
        }
    })
}

/// True when endpoint `e` may serve a request routed to `subset`: its labels include the
/// subset's labels and, when adapters are declared in the cluster, it serves the adapter.
fn serves_subset(e: &Endpoint, subset: &Subset, adapters_declared: bool) -> bool {
    subset
        .labels
        .iter()
        .all(|(k, v)| e.labels.get(k) == Some(v))
        && (subset.lora.is_empty() || !adapters_declared || e.lora_adapters.contains(&subset.lora))
}

impl RouterInner {
    pub(crate) fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub(crate) fn metrics(&self) -> &RouterMetrics {
        &self.metrics
    }

    /// Every cluster (for the sync thread).
    pub(crate) fn clusters(&self) -> Vec<Arc<Cluster>> {
        self.clusters.load().values().cloned().collect()
    }

    /// Replaces a cluster's endpoints (created if unknown); endpoints that stay keep their
    /// state. `count` says whether the update shows in `llmproxy_endpoint_updates_total`.
    fn replace_endpoints(&self, cluster: &str, endpoints: &[SocketAddr], count: bool) {
        let inner = self;
        let _guard = inner.update_lock.lock().unwrap_or_else(|p| p.into_inner());
        let existing = inner.clusters.load().get(cluster).cloned();
        let c = match existing {
            Some(c) => c,
            None => {
                let c = Arc::new(Cluster::new(cluster));
                let mut map = HashMap::clone(&inner.clusters.load());
                map.insert(cluster.to_string(), Arc::clone(&c));
                inner.clusters.store(Arc::new(map));
                c
            }
        };
        let models = inner.model_names.len();
        let specs = inner.config.clusters.get(cluster);
        c.replace(endpoints, |addr| {
            let mut e = Endpoint::new(
                inner.next_endpoint_id.fetch_add(1, Ordering::Relaxed),
                addr,
                models,
            );
            // Labels and adapters come from the config's entry for this address, if any.
            if let Some(spec) = specs.and_then(|s| s.iter().find(|s| s.addr == addr)) {
                e.labels = spec.labels.clone();
                e.lora_adapters = spec.lora_adapters.clone();
            }
            e
        });
        if count {
            inner
                .metrics
                .endpoint_updates
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Replaces a DNS cluster's endpoints when the resolved set changed.
    pub(crate) fn update_dns_cluster(&self, cluster: &str, addrs: &[SocketAddr]) {
        let current: Vec<SocketAddr> = self
            .clusters
            .load()
            .get(cluster)
            .map(|c| c.snapshot().endpoints.iter().map(|e| e.addr).collect())
            .unwrap_or_default();
        let mut sorted = current;
        sorted.sort();
        if sorted != addrs {
            self.replace_endpoints(cluster, addrs, true);
        }
    }

    fn finish_pick(
        self: &Arc<Self>,
        result: Result<Routed, PickError>,
        started: Instant,
    ) -> PickedRequest {
        let m = &self.metrics;
        match &result {
            Ok(_) => m.count_pick("routed"),
            Err(e) => m.count_pick(e.outcome()),
        }
        m.pick_duration.observe(started.elapsed().as_secs_f64());
        PickedRequest {
            router: Arc::clone(self),
            result,
            picked_at: started,
            first_token_seen: false,
            finished: false,
        }
    }

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

    /// Parses the request and matches its rule: everything but the endpoint choice.
    fn prepare(&self, headers: &[HeaderRef], body: &[u8]) -> Result<Routed, PickError> {
        let limit = self.config.max_body_bytes;
        if body.len() as u64 > limit {
            return Err(PickError::PayloadTooLarge {
                size: body.len() as u64,
                limit,
            });
        }
        let kind = find_header(headers, ":path")
            .and_then(|p| std::str::from_utf8(p).ok())
            .and_then(RequestKind::from_path);
        let parsed = request::parse(body, kind, self.config.hash_chunk_bytes)?;
        let route = self
            .models
            .get(&parsed.model)
            .ok_or_else(|| PickError::ModelNotFound {
                message: format!("the model `{}` does not exist", parsed.model),
            })?;
        let rule = match_rule(&route.rules, headers).ok_or_else(|| PickError::ModelNotFound {
            message: format!(
                "no routing rule of model `{}` matches the request headers",
                parsed.model
            ),
        })?;
        let cluster = self
            .clusters
            .load()
            .get(&rule.cluster)
            .cloned()
            .ok_or_else(|| PickError::NoEndpoint {
                cluster: rule.cluster.clone(),
            })?;
        // A weighted subset (labels / LoRA adapter), then the model the backend serves.
        let subset = pick_subset(&rule.subset);
        let lora = subset.map(|i| rule.subset[i].lora.as_str()).unwrap_or("");
        let upstream_model = if !lora.is_empty() {
            lora
        } else if !rule.target_model.is_empty() {
            rule.target_model.as_str()
        } else {
            parsed.model.as_str()
        };
        let triton = (rule.backend == Backend::Triton).then_some(rule.chat_template);
        let (upstream, transcoder) = transcode::plan(
            body,
            parsed.kind,
            &parsed.model,
            upstream_model,
            triton,
            parsed.stream,
        )?;
        let mut prefix_hashes = parsed.prefix_hashes;
        if upstream_model != parsed.model {
            // Another served model (an adapter, an alias) has KV caches of its own.
            let salt = xxhash_rust::xxh3::xxh3_64(upstream_model.as_bytes());
            prefix_hashes.iter_mut().for_each(|h| *h ^= salt);
        }
        let upstream_model = upstream_model.to_string();
        Ok(Routed {
            rule: Arc::clone(rule),
            cluster,
            endpoint: None,
            tried: Vec::new(),
            model_slot: route.slot,
            model: parsed.model,
            upstream_model,
            subset,
            stream: parsed.stream,
            prompt_chars: parsed.prompt_chars,
            uncached_chars: parsed.prompt_chars,
            prefix_hashes,
            cache_ratio: 0.0,
            sync: None,
            upstream,
            transcoder,
        })
    }

    /// Chooses an endpoint for `r` among those not tried yet, and accounts it. `remote`
    /// holds cache matches from the Metadata-Center (wire id → chunks), when asked.
    fn choose(
        &self,
        r: &mut Routed,
        remote: Option<&HashMap<String, usize>>,
    ) -> Result<(), PickError> {
        let set = r.cluster.snapshot();
        let now = self.now_ms();
        let subset = r.subset.map(|i| &r.rule.subset[i]);
        let adapters_declared = set.endpoints.iter().any(|e| !e.lora_adapters.is_empty());
        let untried = |e: &&Arc<Endpoint>| {
            !r.tried.contains(&e.id)
                && subset.is_none_or(|s| serves_subset(e, s, adapters_declared))
        };
        let mut candidates: Vec<usize> = (0..set.endpoints.len())
            .filter(|&i| untried(&&set.endpoints[i]) && !set.endpoints[i].is_ejected(now))
            .collect();
        if candidates.is_empty() {
            // Every endpoint is ejected: fail open rather than refuse all traffic.
            candidates = (0..set.endpoints.len())
                .filter(|&i| untried(&&set.endpoints[i]))
                .collect();
        }
        if candidates.is_empty() {
            return Err(PickError::NoEndpoint {
                cluster: r.cluster.name.clone(),
            });
        }
        let params = self.config.lb_params(&r.model);
        let draw = self.rng_counter.fetch_add(1, Ordering::Relaxed);
        let mut rng =
            fastrand::Rng::with_seed(self.rng_seed ^ draw.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let use_index = matches!(
            self.config.algorithm,
            Algorithm::InferenceLb | Algorithm::PrefixCost
        ) && params.cache_aware;
        let mut depth = if use_index && !r.prefix_hashes.is_empty() {
            self.index.matched_chunks(&r.prefix_hashes, &set)
        } else {
            vec![0; set.endpoints.len()]
        };
        if let Some(remote) = remote {
            let identity = self.config.metadata_center.identity;
            for (d, e) in depth.iter_mut().zip(&set.endpoints) {
                if let Some(&m) = remote.get(&e.wire_id(identity)) {
                    *d = (*d).max(m.min(r.prefix_hashes.len()));
                }
            }
        }
        let total_chunks = r.prefix_hashes.len().max(1) as f64;
        let stale = self.config.metadata_center.load_stale_ms;
        let chosen = match self.config.algorithm {
            Algorithm::InferenceLb => {
                let loads = loads_of(&set, &candidates, &depth, total_chunks, now, stale);
                candidates[balancer::inference_lb(&loads, &params, &mut rng)]
            }
            Algorithm::PrefixCost => {
                let loads = loads_of(&set, &candidates, &depth, total_chunks, now, stale);
                candidates[balancer::prefix_cost(&loads, r.prompt_chars, &params, &mut rng)]
            }
            Algorithm::Random => candidates[balancer::random(candidates.len(), &mut rng)],
            Algorithm::RoundRobin => {
                candidates[balancer::round_robin(&r.cluster.rr_cursor, candidates.len())]
            }
            Algorithm::LeastRequest => {
                let loads = loads_of(&set, &candidates, &depth, total_chunks, now, stale);
                candidates[balancer::least_request(&loads, &mut rng)]
            }
        };
        let endpoint = Arc::clone(&set.endpoints[chosen]);
        r.cache_ratio = depth[chosen] as f64 / total_chunks;
        r.uncached_chars = (r.prompt_chars as f64 * (1.0 - r.cache_ratio)).round() as u64;
        endpoint.acquire(r.prompt_chars, r.uncached_chars);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        if use_index {
            self.index.record(&r.prefix_hashes, endpoint.id, now);
        }
        self.metrics.decision_cache_ratio.observe(r.cache_ratio);
        self.metrics
            .prompt_chars
            .fetch_add(r.prompt_chars, Ordering::Relaxed);
        self.metrics.cached_prompt_chars.fetch_add(
            (r.prompt_chars as f64 * r.cache_ratio) as u64,
            Ordering::Relaxed,
        );
        r.cluster.touch(now);
        if self.events.get().is_some() {
            let req = RequestSync::new(self.next_request_id());
            // A dropped add means the server never hears of this request: no releases either.
            if self.send(Event::Add {
                req: Arc::clone(&req),
                cluster: Arc::clone(&r.cluster),
                endpoint: Arc::clone(&endpoint),
                prompt_chars: r.prompt_chars,
            }) {
                r.sync = Some(req);
            }
        }
        r.tried.push(endpoint.id);
        r.endpoint = Some(endpoint);
        Ok(())
    }

    fn render_metrics(&self) -> String {
        let m = &self.metrics;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::with_capacity(4096);
        let picks: Vec<(String, u64)> = PICK_OUTCOMES
            .iter()
            .zip(&m.picks)
            .map(|(o, c)| (format!("outcome=\"{o}\""), load(c)))
            .collect();
        family(
            &mut out,
            "llmproxy_picks_total",
            "counter",
            "Pick decisions by outcome.",
            &picks,
        );
        let finished: Vec<(String, u64)> = ["none", "2xx", "3xx", "4xx", "5xx"]
            .iter()
            .zip(&m.finished)
            .map(|(class, c)| (format!("status=\"{class}\""), load(c)))
            .collect();
        family(
            &mut out,
            "llmproxy_finished_requests_total",
            "counter",
            "Finished requests by upstream status class (none = no upstream response).",
            &finished,
        );
        let single = |v: u64| [(String::new(), v)];
        for (name, kind, help, value) in [
            (
                "llmproxy_in_flight_requests",
                "gauge",
                "Requests picked and not yet finished.",
                load(&self.in_flight),
            ),
            (
                "llmproxy_retries_total",
                "counter",
                "Re-picks after a failed upstream connection.",
                load(&m.retries),
            ),
            (
                "llmproxy_endpoint_updates_total",
                "counter",
                "Endpoint sets replaced through the API or DNS.",
                load(&m.endpoint_updates),
            ),
            (
                "llmproxy_metadata_center_events_dropped_total",
                "counter",
                "Sync events dropped because the queue was full.",
                load(&m.sync_dropped),
            ),
            (
                "llmproxy_prompt_chars_total",
                "counter",
                "Prompt characters of routed requests.",
                load(&m.prompt_chars),
            ),
            (
                "llmproxy_cached_prompt_chars_total",
                "counter",
                "Prompt characters the chosen endpoint was expected to hold in its KV cache.",
                load(&m.cached_prompt_chars),
            ),
            (
                "llmproxy_prefix_index_entries",
                "gauge",
                "Chunk hashes in the local prefix index.",
                self.index.len() as u64,
            ),
            (
                "llmproxy_prefix_index_evictions_total",
                "counter",
                "Prefix index entries evicted to stay within capacity.",
                self.index.evictions(),
            ),
        ] {
            family(&mut out, name, kind, help, &single(value));
        }
        family(
            &mut out,
            "llmproxy_metadata_center_calls_total",
            "counter",
            "Metadata-Center calls by result (failed includes circuit-breaker refusals).",
            &[
                ("result=\"ok\"".into(), load(&m.sync_ok)),
                ("result=\"failed\"".into(), load(&m.sync_failed)),
            ],
        );
        family(
            &mut out,
            "llmproxy_remote_cache_lookups_total",
            "counter",
            "pick_async / pick_start decisions by the cache data they used.",
            &[
                ("result=\"remote\"".into(), load(&m.lookups_remote)),
                ("result=\"local_fallback\"".into(), load(&m.lookups_local)),
                (
                    "result=\"expired_in_queue\"".into(),
                    load(&m.lookups_expired),
                ),
            ],
        );
        header(
            &mut out,
            "llmproxy_pick_duration_seconds",
            "histogram",
            "Time spent in pick: parse, hash, score, account.",
        );
        m.pick_duration
            .render(&mut out, "llmproxy_pick_duration_seconds", "");
        header(
            &mut out,
            "llmproxy_decision_cache_ratio",
            "histogram",
            "Prefix-cache match ratio of the chosen endpoint.",
        );
        m.decision_cache_ratio
            .render(&mut out, "llmproxy_decision_cache_ratio", "");

        let clusters = self.clusters.load();
        let mut names: Vec<&String> = clusters.keys().collect();
        names.sort();
        type Getter = fn(&Endpoint, u64) -> u64;
        let families: [(&str, &str, &str, Getter); 7] = [
            (
                "llmproxy_endpoint_in_flight_requests",
                "gauge",
                "In-flight requests per endpoint.",
                |e, _| e.in_flight(),
            ),
            (
                "llmproxy_endpoint_prefill_chars",
                "gauge",
                "Prompt characters still in prefill per endpoint.",
                |e, _| e.prefill_chars(),
            ),
            (
                "llmproxy_endpoint_picks_total",
                "counter",
                "Picks per endpoint.",
                |e, _| e.picks(),
            ),
            (
                "llmproxy_endpoint_failures_total",
                "counter",
                "Failed requests (502/503/504) per endpoint.",
                |e, _| e.failures(),
            ),
            (
                "llmproxy_endpoint_ejections_total",
                "counter",
                "Passive-health ejections per endpoint.",
                |e, _| e.ejections(),
            ),
            (
                "llmproxy_endpoint_ejected",
                "gauge",
                "1 while the endpoint is ejected.",
                |e, now| e.is_ejected(now) as u64,
            ),
            (
                "llmproxy_endpoint_remote_in_flight_requests",
                "gauge",
                "In-flight requests other gateways reported for the endpoint (last Metadata-Center poll).",
                |e, _| e.remote_in_flight(),
            ),
        ];
        let now = self.now_ms();
        let sets: Vec<(&String, Arc<EndpointSet>)> = names
            .iter()
            .map(|c| (*c, clusters[*c].snapshot()))
            .collect();
        for (name, kind, help, get) in families {
            let samples: Vec<(String, u64)> = sets
                .iter()
                .flat_map(|(c, set)| {
                    set.endpoints.iter().map(move |e| {
                        let labels =
                            format!("cluster=\"{}\",endpoint=\"{}\"", escape_label(c), e.address);
                        (labels, get(e, now))
                    })
                })
                .collect();
            family(&mut out, name, kind, help, &samples);
        }
        header(
            &mut out,
            "llmproxy_time_to_first_token_seconds",
            "histogram",
            "Time from pick to first response byte, per model and endpoint.",
        );
        for c in &names {
            for e in &clusters[*c].snapshot().endpoints {
                for (slot, h) in e.ttft_histograms() {
                    let labels = format!(
                        "model=\"{}\",cluster=\"{}\",endpoint=\"{}\"",
                        escape_label(&self.model_names[slot]),
                        escape_label(c),
                        e.address
                    );
                    h.render(&mut out, "llmproxy_time_to_first_token_seconds", &labels);
                }
            }
        }
        out
    }
}

/// Candidate loads: this router's live counts plus, when fresh, what other gateways put on
/// each endpoint (from the Metadata-Center).
fn loads_of(
    set: &EndpointSet,
    candidates: &[usize],
    depth: &[usize],
    total_chunks: f64,
    now_ms: u64,
    stale_ms: u64,
) -> Vec<CandidateLoad> {
    candidates
        .iter()
        .map(|&i| {
            let e = &set.endpoints[i];
            let (rq, rl) = e.remote_load(now_ms, stale_ms).unwrap_or((0, 0));
            CandidateLoad {
                in_flight: e.in_flight() + rq,
                prefill_chars: e.prefill_chars() + rl,
                cache_ratio: depth[i] as f64 / total_chunks,
                uncached_prefill_chars: e.uncached_prefill_chars() + rl,
            }
        })
        .collect()
}

/// A counted request handle carrying `error`, for failures outside the normal pick path.
fn failed_request(router: &Arc<RouterInner>, error: PickError) -> PickedRequest {
    router.metrics.count_pick(error.outcome());
    PickedRequest {
        router: Arc::clone(router),
        result: Err(error),
        picked_at: Instant::now(),
        first_token_seen: false,
        finished: false,
    }
}

/// A request from pick to finish. Must be finished (or dropped) exactly once.
pub struct PickedRequest {
    router: Arc<RouterInner>,
    result: Result<Routed, PickError>,
    picked_at: Instant,
    first_token_seen: bool,
    finished: bool,
}

impl PickedRequest {
    /// The error, when the request could not be routed.
    pub fn error(&self) -> Option<&PickError> {
        self.result.as_ref().err()
    }

    /// HTTP status for the client: 200 when routed.
    pub fn http_status(&self) -> u32 {
        match &self.result {
            Ok(r) if r.endpoint.is_some() => 200,
            Ok(r) => PickError::NoEndpoint {
                cluster: r.cluster.name.clone(),
            }
            .http_status(),
            Err(e) => e.http_status(),
        }
    }

    fn routed(&self) -> Option<&Routed> {
        self.result.as_ref().ok()
    }

    /// Chosen endpoint `ip:port`.
    pub fn endpoint(&self) -> Option<&str> {
        self.routed()?.endpoint.as_ref().map(|e| e.address.as_str())
    }

    /// Cluster of the matched rule.
    pub fn cluster(&self) -> Option<&str> {
        self.routed().map(|r| r.cluster.name.as_str())
    }

    /// Backend of the matched rule.
    pub fn backend(&self) -> Option<&'static str> {
        self.routed().map(|r| r.rule.backend.as_str())
    }

    /// Requested model.
    pub fn model(&self) -> Option<&str> {
        self.routed().map(|r| r.model.as_str())
    }

    /// Scene name of the matched rule.
    pub fn scene(&self) -> Option<&str> {
        self.routed().map(|r| r.rule.scene_name.as_str())
    }

    /// The request's `stream` flag.
    pub fn is_stream(&self) -> bool {
        self.routed().is_some_and(|r| r.stream)
    }

    /// Prefix-cache match ratio of the chosen endpoint at decision time.
    pub fn cache_ratio(&self) -> f64 {
        self.routed().map_or(0.0, |r| r.cache_ratio)
    }

    /// Prompt length in characters.
    pub fn prompt_chars(&self) -> u64 {
        self.routed().map_or(0, |r| r.prompt_chars)
    }

    /// OpenAI error JSON when not routed.
    pub fn error_body(&self) -> Option<String> {
        match &self.result {
            Err(e) => Some(e.to_json()),
            Ok(r) if r.endpoint.is_none() => Some(
                PickError::NoEndpoint {
                    cluster: r.cluster.name.clone(),
                }
                .to_json(),
            ),
            Ok(_) => None,
        }
    }

    /// The model name the backend receives (differs from `model` after a rewrite).
    pub fn upstream_model(&self) -> Option<&str> {
        self.routed().map(|r| r.upstream_model.as_str())
    }

    /// The upstream path when it differs from the client's (Triton generate).
    pub fn upstream_path(&self) -> Option<&str> {
        self.routed()?.upstream.path.as_deref()
    }

    /// The upstream body when it differs from the client's.
    pub fn upstream_body(&self) -> Option<&[u8]> {
        self.routed()?.upstream.body.as_deref()
    }

    /// True when the response body is transcoded (hosts drop `content-length`).
    pub fn needs_transcoding(&self) -> bool {
        self.routed()
            .is_some_and(|r| r.transcoder.needs_transcoding())
    }

    /// Call once at the upstream response headers: returns the status for the client.
    pub fn response_status(&mut self, upstream_status: u32) -> u32 {
        match &mut self.result {
            Ok(r) => r.transcoder.response_status(upstream_status),
            Err(_) => upstream_status,
        }
    }

    /// The response content type for the client, when transcoding changes it.
    pub fn response_content_type(&self) -> Option<&'static str> {
        self.routed().and_then(|r| r.transcoder.content_type())
    }

    /// Feeds one upstream response chunk: returns the bytes for the client (`None`: the
    /// chunk unchanged). The first chunk with content marks the first token.
    pub fn transcode_response(&mut self, chunk: &[u8], end_of_stream: bool) -> Option<&[u8]> {
        let seen_before = self.routed().is_some_and(|r| r.transcoder.seen_content());
        let seen_now = match &mut self.result {
            Ok(r) => {
                let _ = r.transcoder.feed(chunk, end_of_stream);
                r.transcoder.seen_content()
            }
            Err(_) => return None,
        };
        if seen_now && !seen_before {
            self.first_token();
        }
        match &mut self.result {
            Ok(r) => match r.transcoder.last_output() {
                Output::Same => None,
                Output::Bytes(b) => Some(b),
            },
            Err(_) => None,
        }
    }

    /// Re-picks another endpoint after a connect failure; the failed one is not tried again
    /// and counts one failure. Accounting moves to the new endpoint.
    pub fn retry(&mut self) -> Result<(), PickError> {
        let router = Arc::clone(&self.router);
        let first_token_seen = self.first_token_seen;
        let Ok(r) = &mut self.result else {
            return Err(self.error().cloned().unwrap_or(PickError::Internal {
                message: "retry of an unrouted request".into(),
            }));
        };
        if let Some(old) = r.endpoint.take() {
            if let Some(req) = r.sync.take() {
                req.mark_finished();
                router.send(Event::Done {
                    req,
                    cluster: Arc::clone(&r.cluster),
                    endpoint: Arc::clone(&old),
                });
            }
            if !first_token_seen {
                old.release_prefill(r.prompt_chars, r.uncached_chars);
            }
            old.release_request();
            router.in_flight.fetch_sub(1, Ordering::Relaxed);
            let ej = router.config.ejection;
            old.record_failure(router.now_ms(), ej.consecutive_failures, ej.eject_ms);
        }
        router.metrics.retries.fetch_add(1, Ordering::Relaxed);
        self.first_token_seen = false;
        self.picked_at = Instant::now();
        router.choose(r, None)
    }

    /// The first response byte arrived: prefill is over. Idempotent.
    pub fn first_token(&mut self) {
        if self.first_token_seen || self.finished {
            return;
        }
        self.first_token_seen = true;
        if let Ok(r) = &self.result {
            if let Some(e) = &r.endpoint {
                e.release_prefill(r.prompt_chars, r.uncached_chars);
                if let Some(h) = e.ttft(r.model_slot) {
                    h.observe(self.picked_at.elapsed().as_secs_f64());
                }
                if let Some(req) = &r.sync {
                    self.router.send(Event::PromptDone {
                        req: Arc::clone(req),
                        cluster: Arc::clone(&r.cluster),
                        endpoint: Arc::clone(e),
                    });
                }
            }
        }
    }

    /// The request is over; `upstream_status` is the upstream's HTTP status, 0 for none
    /// (the same as [`PickedRequest::finish_with`] and [`Outcome::Upstream`]).
    pub fn finish(self, upstream_status: u32) {
        self.finish_with(upstream_status, Outcome::Upstream);
    }

    /// The request is over: `status` is what the client got (for metrics), `outcome` says
    /// whom it tells about the endpoint's health (passive ejection).
    pub fn finish_with(mut self, status: u32, outcome: Outcome) {
        self.finish_inner(status, outcome);
    }

    fn finish_inner(&mut self, upstream_status: u32, outcome: Outcome) {
        if self.finished {
            return;
        }
        self.finished = true;
        let router = &self.router;
        let first_token_seen = self.first_token_seen;
        if let Ok(r) = &mut self.result {
            if let Some(e) = &r.endpoint {
                if let Some(req) = r.sync.take() {
                    req.mark_finished();
                    router.send(Event::Done {
                        req,
                        cluster: Arc::clone(&r.cluster),
                        endpoint: Arc::clone(e),
                    });
                    let cache_aware = router.config.lb_params(&r.model).cache_aware;
                    if (100..400).contains(&upstream_status)
                        && cache_aware
                        && !r.prefix_hashes.is_empty()
                    {
                        router.send(Event::SaveCache {
                            cluster: Arc::clone(&r.cluster),
                            endpoint: Arc::clone(e),
                            hashes: std::mem::take(&mut r.prefix_hashes),
                        });
                    }
                }
                if !first_token_seen {
                    e.release_prefill(r.prompt_chars, r.uncached_chars);
                }
                e.release_request();
                router.in_flight.fetch_sub(1, Ordering::Relaxed);
                match outcome.health(upstream_status) {
                    Some(false) => {
                        let ej = router.config.ejection;
                        e.record_failure(router.now_ms(), ej.consecutive_failures, ej.eject_ms);
                    }
                    Some(true) => e.record_success(),
                    None => {}
                }
                router.metrics.count_finish(upstream_status);
            }
        }
    }
}

impl Drop for PickedRequest {
    fn drop(&mut self) {
        self.finish_inner(0, Outcome::Local);
    }
}

/// How a request ended, as far as the endpoint's health is concerned: only what the endpoint
/// itself did counts toward passive ejection, never what a client or the proxy caused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The status is the endpoint's own response: 502–504 count as failures, 100–498 as
    /// successes, anything else (0, 499, 500, 501, 505+) says nothing.
    Upstream,
    /// The endpoint failed before sending a response byte: connect failure, or the
    /// connection was reset or closed before any response.
    EndpointFailed,
    /// The proxy or the client ended the request (a route timeout, a local reply, the client
    /// went away): says nothing about the endpoint.
    Local,
}

impl Outcome {
    /// `Some(true)` a success, `Some(false)` a failure, `None` neutral.
    pub fn health(self, status: u32) -> Option<bool> {
        match (self, status) {
            (Outcome::EndpointFailed, _) => Some(false),
            (Outcome::Local, _) => None,
            (Outcome::Upstream, 502..=504) => Some(false),
            (Outcome::Upstream, 100..=498) => Some(true),
            (Outcome::Upstream, _) => None,
        }
    }
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

    #[test]
    fn load_steers_away_from_busy_endpoints() {
        let r = router();
        // Hold 20 requests with the same prefix in flight: load must spread them.
        let system = "shared system prompt ".repeat(200);
        let held: Vec<_> = (0..20)
            .map(|i| r.pick(&[], &chat("m1", &format!("{system}{i}"))))
            .collect();
        let mut per = HashMap::new();
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
}
