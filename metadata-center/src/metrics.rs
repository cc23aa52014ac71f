//! Prometheus metrics: the origin's metric names where they apply (with the status-code label
//! recorded after the handler ran, fixing the origin's always-200 bug), process metrics, and
//! this server's own counters (`metadata_center_*`: evictions, GC, retries, replication).
//!
//! This file owns the registry (`Metrics`, the families the HTTP layer and replication update)
//! and the rendering of a scrape (`Metrics::render`): the per-engine gauges rebuilt from the load
//! store, then the `metadata_center_*` families read from the stores', the budget's, the
//! listener's and the replicator's counters (`Sources`). The `GET /metrics` handler only calls it.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::budget::MemoryBudget;
use crate::cache::CachePool;
use crate::listener::Connections;
use crate::load::LoadStore;
use crate::replica::Replicator;
use crate::retry::Retrier;
use crate::store::redis::{Op, RedisStore};

/// What a scrape reads besides the registry: the live state behind the gauges and the other
/// modules' counters.
pub struct Sources<'a> {
    pub load: &'a LoadStore,
    pub cache: &'a CachePool,
    pub budget: &'a MemoryBudget,
    pub retrier: &'a Retrier,
    /// The listener's counters (absent when the router is served without `BoundedListener`).
    pub connections: Option<&'a Connections>,
    pub replicator: Option<&'a Replicator>,
    /// The Redis store, when it is the one in use (its operation outcomes).
    pub redis: Option<&'a RedisStore>,
}

pub struct Metrics {
    registry: Registry,
    pub http_status: IntCounterVec,
    pub http_duration_us: HistogramVec,
    pub model_engine_count: IntGaugeVec,
    pub queued_num: IntGaugeVec,
    pub prompt_length: IntGaugeVec,
    pub replication_latency_ms: Histogram,
    pub node_alive: IntGauge,
    pub dns_lookup_hosts: IntGaugeVec,
    pub auth_failures: AtomicU64,
    /// Requests answered 408 because the body did not arrive within `HTTP.BodyTimeout`.
    pub body_timeouts: AtomicU64,
    /// Scrapes rebuild the per-engine gauges; one at a time so none sees a half-built set.
    render_lock: parking_lot::Mutex<()>,
}

impl Metrics {
    pub fn new(version: &str) -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let http_status = IntCounterVec::new(
            Opts::new(
                "http_request_status_code_total",
                "HTTP responses by route, method and status code",
            ),
            &["url", "method", "status_code"],
        )?;
        let http_duration_us = HistogramVec::new(
            HistogramOpts::new(
                "http_request_duration_us",
                "HTTP request latency in microseconds",
            )
            .buckets(vec![
                100.0, 250.0, 500.0, 1000.0, 2000.0, 5000.0, 20000.0, 100000.0,
            ]),
            &["method", "url"],
        )?;
        let model_engine_count = IntGaugeVec::new(
            Opts::new("model_engine_count", "Engines known per cluster"),
            &["model_name"],
        )?;
        let queued_num = IntGaugeVec::new(
            Opts::new("queued_num", "Requests in flight per engine"),
            &["model_name", "engine_ip"],
        )?;
        let prompt_length = IntGaugeVec::new(
            Opts::new("prompt_length", "Prompt bytes still in prefill per engine"),
            &["model_name", "engine_ip"],
        )?;
        let app_version = IntGaugeVec::new(
            Opts::new("app_version_info", "Server version"),
            &["version"],
        )?;
        let replication_latency_ms = Histogram::with_opts(
            HistogramOpts::new(
                "replication_latency_ms",
                "Delay from the sender's timestamp to the replicated apply",
            )
            .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]),
        )?;
        let node_alive = IntGauge::new(
            "metacenter_node_alive",
            "1 while this metadata-center serves",
        )?;
        let dns_lookup_hosts = IntGaugeVec::new(
            Opts::new("dns_lookup_hosts", "Peers found by DNS discovery"),
            &["domain", "host"],
        )?;
        registry.register(Box::new(http_status.clone()))?;
        registry.register(Box::new(http_duration_us.clone()))?;
        registry.register(Box::new(model_engine_count.clone()))?;
        registry.register(Box::new(queued_num.clone()))?;
        registry.register(Box::new(prompt_length.clone()))?;
        registry.register(Box::new(app_version.clone()))?;
        registry.register(Box::new(replication_latency_ms.clone()))?;
        registry.register(Box::new(node_alive.clone()))?;
        registry.register(Box::new(dns_lookup_hosts.clone()))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        app_version.with_label_values(&[version]).set(1);
        node_alive.set(1);
        Ok(Metrics {
            registry,
            http_status,
            http_duration_us,
            model_engine_count,
            queued_num,
            prompt_length,
            replication_latency_ms,
            node_alive,
            dns_lookup_hosts,
            auth_failures: AtomicU64::new(0),
            body_timeouts: AtomicU64::new(0),
            render_lock: parking_lot::Mutex::new(()),
        })
    }

    /// Prometheus text: the registry, then `extra` (already formatted families).
    fn encode(&self, extra: &str) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        let mut s = String::from_utf8_lossy(&buf).into_owned();
        s.push_str(extra);
        s
    }

    /// The whole `/metrics` text: the registry (with the per-engine gauges rebuilt from the load
    /// store's live state) and this server's own families, read from `s` at scrape time.
    pub fn render(&self, s: &Sources<'_>) -> String {
        let m = self;
        let _one_at_a_time = m.render_lock.lock();
        m.model_engine_count.reset();
        m.queued_num.reset();
        m.prompt_length.reset();
        let (clusters, omitted) = s.load.snapshot(s.load.config().max_engine_series);
        for (cluster, engines) in clusters {
            m.model_engine_count
                .with_label_values(&[&cluster])
                .set(engines.len() as i64);
            for e in engines {
                m.queued_num
                    .with_label_values(&[&cluster, &e.ip])
                    .set(i64::from(e.queued_req_num));
                m.prompt_length
                    .with_label_values(&[&cluster, &e.ip])
                    .set(i64::from(e.prompt_length));
            }
        }
        let lc = &s.load.counters;
        let cc = &s.cache.counters;
        let mut f = Families::default();
        f.family(
            "metadata_center_load_requests",
            "gauge",
            "Requests tracked",
            &[("", s.load.request_count() as u64)],
        );
        f.family(
            "metadata_center_load_clusters",
            "gauge",
            "Clusters tracked",
            &[("", s.load.cluster_count() as u64)],
        );
        f.family(
            "metadata_center_metrics_engines_omitted",
            "gauge",
            "Engines left out of the per-engine metrics (Load.MaxEngineSeries)",
            &[("", omitted as u64)],
        );
        f.family(
            "metadata_center_load_events_total",
            "counter",
            "Load API outcomes",
            &[
                ("event=\"added\"", get(&lc.added)),
                ("event=\"duplicate\"", get(&lc.duplicates)),
                ("event=\"deleted\"", get(&lc.deleted)),
                ("event=\"prompt_released\"", get(&lc.prompt_released)),
                ("event=\"miss\"", get(&lc.misses)),
            ],
        );
        f.family(
            "metadata_center_load_expired_total",
            "counter",
            "Entries removed by the load GC (TTL)",
            &[
                ("kind=\"request\"", get(&lc.expired_requests)),
                ("kind=\"engine\"", get(&lc.expired_engines)),
                ("kind=\"cluster\"", get(&lc.expired_clusters)),
            ],
        );
        f.family(
            "metadata_center_load_evicted_total",
            "counter",
            "Entries evicted by the capacity bounds",
            &[
                ("kind=\"request\"", get(&lc.evicted_requests)),
                ("kind=\"engine\"", get(&lc.evicted_engines)),
                ("kind=\"cluster\"", get(&lc.evicted_clusters)),
            ],
        );
        f.family(
            "metadata_center_delete_retries_total",
            "counter",
            "Delayed retries of deletes that found no request",
            &[
                ("result=\"hit\"", get(&s.retrier.retried_hit)),
                ("result=\"miss\"", get(&s.retrier.retried_miss)),
                ("result=\"dropped\"", get(&s.retrier.dropped)),
            ],
        );
        f.family(
            "metadata_center_delete_retries_pending",
            "gauge",
            "Retries waiting",
            &[("", s.retrier.pending() as u64)],
        );
        let (nodes, entries) = s.cache.totals();
        f.family(
            "metadata_center_cache_clusters",
            "gauge",
            "Cache trees",
            &[("", s.cache.cluster_count() as u64)],
        );
        f.family(
            "metadata_center_cache_nodes",
            "gauge",
            "Radix nodes over all trees",
            &[("", nodes as u64)],
        );
        f.family(
            "metadata_center_cache_entries",
            "gauge",
            "Budgeted entries over all trees",
            &[("", entries as u64)],
        );
        f.family(
            "metadata_center_cache_ops_total",
            "counter",
            "Cache operations",
            &[
                ("op=\"save\"", get(&cc.saves)),
                ("op=\"query\"", get(&cc.queries)),
                ("op=\"query_hit\"", get(&cc.query_hits)),
            ],
        );
        f.family(
            "metadata_center_cache_removed_nodes_total",
            "counter",
            "Radix nodes removed",
            &[
                ("reason=\"expired\"", get(&cc.expired_nodes)),
                ("reason=\"evicted\"", get(&cc.evicted_nodes)),
            ],
        );
        f.family(
            "metadata_center_cache_evicted_clusters_total",
            "counter",
            "Cache trees evicted by the cluster cap",
            &[("", get(&cc.evicted_clusters))],
        );
        let b = s.budget;
        f.family(
            "metadata_center_memory_budget_bytes",
            "gauge",
            "Memory budget for the load and cache stores (Memory.MaxMemoryMB)",
            &[("", b.limit())],
        );
        f.family(
            "metadata_center_memory_estimated_bytes",
            "gauge",
            "Estimated bytes held by the stores, counted against the budget",
            &[
                ("store=\"load\"", b.load_bytes()),
                ("store=\"cache\"", b.cache_bytes()),
            ],
        );
        f.family(
            "metadata_center_memory_evicted_total",
            "counter",
            "Entries evicted to stay within the memory budget",
            &[
                ("kind=\"cache_node\"", get(&b.counters.cache_nodes)),
                ("kind=\"cache_cluster\"", get(&b.counters.cache_clusters)),
                ("kind=\"request\"", get(&b.counters.requests)),
                ("kind=\"cluster\"", get(&b.counters.clusters)),
            ],
        );
        if let Some(c) = s.connections {
            f.family(
                "metadata_center_connections_open",
                "gauge",
                "Open client connections",
                &[("", c.open() as u64)],
            );
            f.family(
                "metadata_center_connections_closed_total",
                "counter",
                "Connections closed by a server deadline",
                &[
                    ("reason=\"idle\"", get(&c.counters.idle_closed)),
                    (
                        "reason=\"header_timeout\"",
                        get(&c.counters.header_timeouts),
                    ),
                    ("reason=\"body_timeout\"", get(&m.body_timeouts)),
                ],
            );
        }
        f.family(
            "metadata_center_auth_failures_total",
            "counter",
            "Rejected by the token check",
            &[("", get(&m.auth_failures))],
        );
        if let Some(rep) = s.replicator {
            let c = &rep.counters;
            f.family(
                "metadata_center_replication_events_total",
                "counter",
                "Replication events",
                &[
                    ("result=\"sent\"", get(&c.sent)),
                    ("result=\"failed\"", get(&c.failed)),
                    ("result=\"retried\"", get(&c.retried)),
                    ("result=\"dropped\"", get(&c.dropped)),
                    ("result=\"skipped_self\"", get(&c.skipped_self)),
                    ("result=\"received\"", get(&c.received)),
                ],
            );
            f.family(
                "metadata_center_replication_queued",
                "gauge",
                "Events waiting in peer queues",
                &[("", rep.queued() as u64)],
            );
            f.family(
                "metadata_center_replication_peers",
                "gauge",
                "Known peers",
                &[("", rep.peer_list().len() as u64)],
            );
        }
        if let Some(r) = s.redis {
            let mut samples = Vec::new();
            for op in Op::ALL {
                let (ok, error, timeout) = r.counters.get(op);
                for (result, v) in [("ok", ok), ("error", error), ("timeout", timeout)] {
                    samples.push((format!("op=\"{}\",result=\"{result}\"", op.name()), v));
                }
            }
            let samples: Vec<(&str, u64)> = samples.iter().map(|(l, v)| (l.as_str(), *v)).collect();
            f.family(
                "metadata_center_store_ops_total",
                "counter",
                "Redis store operations by outcome (error and timeout: answered from nothing)",
                &samples,
            );
            f.family(
                "metadata_center_store_shared_load_queries_total",
                "counter",
                "Load queries answered by the Redis call of an identical one in flight",
                &[("", r.counters.shared_load_queries())],
            );
            f.family(
                "metadata_center_store_skipped_saves_total",
                "counter",
                "Cache saves of prefixes this replica had all saved within the refresh granularity",
                &[("", r.counters.skipped_saves())],
            );
            f.family(
                "metadata_center_store_plain_cache_queries_total",
                "counter",
                "Cache queries sent as a plain HMGET (Redis clock known from the last second), no script",
                &[("", r.counters.plain_cache_queries())],
            );
            f.family(
                "metadata_center_store_cache_query_pipelines_total",
                "counter",
                "Batches that carried the plain cache queries, one HMGET each (several queries ready together share one)",
                &[("", r.counters.cache_query_pipelines())],
            );
        }
        m.encode(&f.into_string())
    }
}

/// Builder for hand-written metric families (values read from atomics at scrape time).
#[derive(Default)]
pub struct Families(String);

impl Families {
    pub fn family(&mut self, name: &str, kind: &str, help: &str, samples: &[(&str, u64)]) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
        for (labels, v) in samples {
            if labels.is_empty() {
                let _ = writeln!(self.0, "{name} {v}");
            } else {
                let _ = writeln!(self.0, "{name}{{{labels}}} {v}");
            }
        }
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

pub fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}
