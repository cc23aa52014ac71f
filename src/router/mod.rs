//! The router: one per proxy filter config, shared by every worker thread.
//!
//! It owns the lifecycle of a request from the routing point of view:
//! `pick` (parse → match rule → score → account, in `pick.rs`) gives a [`PickedRequest`]
//! (`request.rs`); [`PickedRequest::first_token`] releases the prefill load;
//! [`PickedRequest::finish_with`] releases the request and feeds passive health. Dropping an
//! unfinished request finishes it with "no response", so accounting can never leak from Rust
//! code. Picks that wait for a remote cache lookup (`pick_async`, `pick_start`) live in
//! `lookup.rs`; what keeps a request on an endpoint whatever the algorithm says (sessions,
//! Responses API chains) in `affinity.rs`; requests on a stored Responses answer (`GET
//! /v1/responses/{id}`, …: no body, pinned to the answer's endpoint) in `stored.rs`.
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

mod affinity;
mod log_line;
mod lookup;
mod pick;
mod request;
mod stored;

use log_line::LogContext;
pub(crate) use lookup::LookupJob;
pub use lookup::{PendingPick, PickStart};
use pick::Routed;
pub use request::{Outcome, PickedRequest};

/// A request header as the host hands it over (name matched case-insensitively).
pub type HeaderRef<'a> = (&'a [u8], &'a [u8]);

/// Cache matches from the Metadata-Center: endpoint wire id → leading chunks it holds.
type RemoteDepth = std::collections::HashMap<String, usize>;

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
            metrics: Arc::new(RouterMetrics::default()),
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
        if inner.config.engine_metrics.enabled {
            let reader = background::engine_metrics::EngineMetricsReader {
                settings: inner.config.engine_metrics.clone(),
                clusters: Arc::downgrade(&inner.clusters),
                metrics: Arc::clone(&inner.metrics),
                clock: inner.clock,
            };
            if let Ok(guard) = background::start_engine_metrics(reader) {
                guards.push(guard);
            }
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

    /// True when a request with this method and path must go through `pick`: a POST to one
    /// of `intercept_paths`, or a request on a stored Responses answer whose endpoint this
    /// gateway knows ([`stored`]).
    pub fn should_intercept(&self, method: &[u8], path: &[u8]) -> bool {
        if !method.eq_ignore_ascii_case(b"POST") {
            return self.inner.intercepts_stored_answer(method, path);
        }
        let bare = path.split(|&b| b == b'?').next().unwrap_or(path);
        let config = &self.inner.config;
        config.intercept_paths.iter().any(|p| p.as_bytes() == bare)
            || self.inner.intercepts_stored_answer(method, path)
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
                cache_capacity_tokens: inner.config.cache_capacity_tokens,
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

/// The value of header `name` (case-insensitive), if the host passed it.
pub(super) fn find_header<'a>(headers: &[HeaderRef<'a>], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
        .map(|(_, v)| *v)
}

#[cfg(test)]
mod tests;
