//! Prometheus metrics: the origin's metric names where they apply (with the status-code label
//! recorded after the handler ran, fixing the origin's always-200 bug), process metrics, and
//! this server's own counters (`metadata_center_*`: evictions, GC, retries, replication).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

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
    pub render_lock: parking_lot::Mutex<()>,
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
    pub fn render(&self, extra: &str) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        let mut s = String::from_utf8_lossy(&buf).into_owned();
        s.push_str(extra);
        s
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
