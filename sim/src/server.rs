//! The simulated fleet: N OpenAI-compatible (and SGLang `/generate`) servers in one process, each with its own engine
//! task that sleeps for every step's duration (wall-clock time, so latency is measurable from
//! outside). This module owns the servers, their engine tasks, their counters and `serve`;
//! [`http`] their HTTP API.

use crate::engine::{Engine, EngineConfig, Usage};
use axum::serve::ListenerExt;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};

mod generate;
mod http;
mod responses;
mod wire;

use http::app;
pub use wire::{encode_ids, render_chat};

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Number of model servers.
    #[arg(long, default_value_t = 4)]
    pub servers: usize,
    /// Port of the first server; server i listens on base-port + i (0: ephemeral ports).
    #[arg(long, default_value_t = 18000)]
    pub base_port: u16,
    /// Address to bind (keep it on loopback).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Model id served (requests for any model are accepted and echoed).
    #[arg(long, default_value = "sim-llama-3-8b")]
    pub model: String,
    /// Output tokens when a request gives no max_tokens / max_completion_tokens.
    #[arg(long, default_value_t = 128)]
    pub default_max_tokens: usize,
    /// KV cache capacity per server, in 16-token blocks.
    #[arg(long, default_value_t = EngineConfig::default().num_gpu_blocks)]
    pub num_gpu_blocks: usize,
    /// Tokens per KV block.
    #[arg(long, default_value_t = EngineConfig::default().block_size)]
    pub block_size: usize,
    /// Token budget of one step (chunked prefill).
    #[arg(long, default_value_t = EngineConfig::default().max_num_batched_tokens)]
    pub max_num_batched_tokens: usize,
    /// Maximum running requests per server.
    #[arg(long, default_value_t = EngineConfig::default().max_num_seqs)]
    pub max_num_seqs: usize,
    /// Maximum prompt + output tokens.
    #[arg(long, default_value_t = EngineConfig::default().max_model_len)]
    pub max_model_len: usize,
    /// Step time constant part a, milliseconds.
    #[arg(long, default_value_t = EngineConfig::default().step_base_s * 1e3)]
    pub step_base_ms: f64,
    /// Step time per computed prefill token b, microseconds.
    #[arg(long, default_value_t = EngineConfig::default().prefill_token_s * 1e6)]
    pub prefill_us_per_token: f64,
    /// Step time per decoding request c, microseconds.
    #[arg(long, default_value_t = EngineConfig::default().decode_seq_s * 1e6)]
    pub decode_us_per_seq: f64,
    /// Relative speed of each server, comma-separated, repeated over the fleet when shorter
    /// (`1,1,0.5,0.5`: servers 2 and 3 take twice as long for every step: a mixed fleet of two
    /// GPU generations).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub speed: Vec<f64>,
    /// Leave `prompt_tokens_details.cached_tokens` out of `usage`, as vLLM does without
    /// `--enable-prompt-tokens-details` and SGLang without `--enable-cache-report`.
    #[arg(long, conflicts_with = "cache_report_zeros")]
    pub no_cache_report: bool,
    /// Report `prompt_tokens_details.cached_tokens` as 0 in every `usage`, whatever the engine
    /// found cached: a server (or a proxy in front of it) that fills the field without
    /// measuring it.
    #[arg(long)]
    pub cache_report_zeros: bool,
}

/// What `usage.prompt_tokens_details.cached_tokens` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheReport {
    /// The prompt tokens the engine found cached.
    Measured,
    /// Nothing: no `prompt_tokens_details`.
    Absent,
    /// Always 0.
    Zeros,
}

impl CacheReport {
    /// What a `usage` says of the cached tokens of an answer whose engine found `u`'s.
    pub fn cached_tokens(self, u: &Usage) -> Option<usize> {
        match self {
            CacheReport::Measured => Some(u.cached_tokens),
            CacheReport::Zeros => Some(0),
            CacheReport::Absent => None,
        }
    }
}

impl ServeArgs {
    /// What the servers' `usage` says of their cache (`--no-cache-report`,
    /// `--cache-report-zeros`).
    pub fn cache_report(&self) -> CacheReport {
        if self.no_cache_report {
            CacheReport::Absent
        } else if self.cache_report_zeros {
            CacheReport::Zeros
        } else {
            CacheReport::Measured
        }
    }

    /// The engine of server `i`: [`ServeArgs::engine_config`] with its step times divided by
    /// its `--speed`.
    pub fn engine_config_of(&self, i: usize) -> EngineConfig {
        let mut cfg = self.engine_config();
        let speed = self
            .speed
            .get(i % self.speed.len().max(1))
            .copied()
            .unwrap_or(1.0);
        cfg.step_base_s /= speed;
        cfg.prefill_token_s /= speed;
        cfg.decode_seq_s /= speed;
        cfg
    }

    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            block_size: self.block_size.max(1),
            num_gpu_blocks: self.num_gpu_blocks.max(2),
            max_num_batched_tokens: self.max_num_batched_tokens.max(1),
            max_num_seqs: self.max_num_seqs.max(1),
            max_model_len: self.max_model_len.max(2),
            step_base_s: self.step_base_ms / 1e3,
            prefill_token_s: self.prefill_us_per_token / 1e6,
            decode_seq_s: self.decode_us_per_seq / 1e6,
        }
    }
}

enum Ev {
    Token {
        text: String,
        finished: bool,
        usage: Usage,
    },
}

struct Inner {
    engine: Engine,
    subs: HashMap<u64, mpsc::UnboundedSender<Ev>>,
    since: Instant,
}

pub struct Server {
    pub name: String,
    pub port: u16,
    model: String,
    default_max_tokens: usize,
    /// What `usage` tells of the prompt tokens found cached.
    cache_report: CacheReport,
    inner: Mutex<Inner>,
    notify: Notify,
}

impl Server {
    pub fn new(
        name: String,
        port: u16,
        model: String,
        default_max_tokens: usize,
        cfg: EngineConfig,
    ) -> Self {
        Server {
            name,
            port,
            model,
            default_max_tokens,
            cache_report: CacheReport::Measured,
            inner: Mutex::new(Inner {
                engine: Engine::new(cfg),
                subs: HashMap::new(),
                since: Instant::now(),
            }),
            notify: Notify::new(),
        }
    }

    /// The same server, telling `cached_tokens` in `usage` as `report` says.
    pub fn with_cache_report(mut self, report: CacheReport) -> Self {
        self.cache_report = report;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock would be a bug; keep serving rather than cascade.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn submit(
        &self,
        prompt: String,
        max_tokens: usize,
    ) -> Result<(u64, mpsc::UnboundedReceiver<Ev>), String> {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = {
            let mut g = self.lock();
            let id = g
                .engine
                .submit(prompt, max_tokens)
                .map_err(|e| e.to_string())?;
            g.subs.insert(id, tx);
            id
        };
        self.notify.notify_one();
        Ok((id, rx))
    }

    /// The engine loop: plan a step, let its time pass, deliver its tokens.
    pub async fn run_engine(self: Arc<Self>) {
        let mut prev_end = Instant::now();
        loop {
            let step = {
                let mut g = self.lock();
                // Requests whose client went away stop consuming the engine.
                let gone: Vec<u64> = g
                    .subs
                    .iter()
                    .filter(|(_, tx)| tx.is_closed())
                    .map(|(id, _)| *id)
                    .collect();
                for id in gone {
                    g.subs.remove(&id);
                    g.engine.abort(id);
                }
                g.engine.schedule()
            };
            let Some(step) = step else {
                self.notify.notified().await;
                continue;
            };
            // Back-to-back steps are timed from the previous deadline so that timer
            // granularity does not accumulate.
            let now = Instant::now();
            let start = if now.saturating_duration_since(prev_end) < Duration::from_millis(2) {
                prev_end
            } else {
                now
            };
            let end = start + Duration::from_secs_f64(step.duration_s);
            tokio::time::sleep_until(end.into()).await;
            prev_end = end;
            let mut g = self.lock();
            let ems = g.engine.complete(step);
            let mut dead = Vec::new();
            for em in ems {
                if let Some(tx) = g.subs.get(&em.id) {
                    let sent = tx.send(Ev::Token {
                        text: em.text,
                        finished: em.finished,
                        usage: em.usage,
                    });
                    if sent.is_err() && !em.finished {
                        dead.push(em.id);
                    }
                }
                if em.finished {
                    g.subs.remove(&em.id);
                }
            }
            for id in dead {
                g.subs.remove(&id);
                g.engine.abort(id);
            }
        }
    }

    pub fn stats(&self) -> Value {
        let g = self.lock();
        let c = g.engine.counters;
        let elapsed = g.since.elapsed().as_secs_f64();
        json!({
            "name": self.name,
            "port": self.port,
            "requests": c.requests,
            "finished": c.finished,
            "aborted": c.aborted,
            "rejected": c.rejected,
            "preemptions": c.preemptions,
            "prompt_tokens": c.prompt_tokens,
            "cached_tokens": c.cached_tokens,
            "hit_rate": ratio(c.cached_tokens as f64, c.prompt_tokens as f64),
            "computed_prefill_tokens": c.computed_prefill_tokens,
            "generation_tokens": c.generation_tokens,
            "steps": c.steps,
            "busy_s": c.busy_s,
            "elapsed_s": elapsed,
            "utilization": ratio(c.busy_s, elapsed),
            "running": g.engine.num_running(),
            "waiting": g.engine.num_waiting(),
            "kv_usage": g.engine.kv_usage(),
            "cached_blocks": g.engine.kv().cached_unused(),
            "num_gpu_blocks": g.engine.config().num_gpu_blocks,
            "evictions_total": g.engine.kv().evictions(),
        })
    }

    fn reset(&self) {
        let mut g = self.lock();
        g.engine.reset();
        g.since = Instant::now();
    }

    fn metrics(&self) -> String {
        let g = self.lock();
        let c = g.engine.counters;
        let cfg = g.engine.config();
        let m = &self.model;
        let mut s = String::with_capacity(2048);
        let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{model_name=\"{m}\",engine=\"0\"}} {value}");
        };
        metric(
            "vllm:num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
            g.engine.num_running() as f64,
        );
        metric(
            "vllm:num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
            g.engine.num_waiting() as f64,
        );
        metric(
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
            g.engine.kv_usage(),
        );
        metric(
            "vllm:gpu_cache_usage_perc",
            "gauge",
            "GPU KV-cache usage (legacy name). 1 means 100 percent usage.",
            g.engine.kv_usage(),
        );
        metric(
            "vllm:prefix_cache_queries_total",
            "counter",
            "Prefix cache queries, in tokens.",
            c.prefix_queries as f64,
        );
        metric(
            "vllm:prefix_cache_hits_total",
            "counter",
            "Prefix cache hits, in tokens.",
            c.prefix_hits as f64,
        );
        metric(
            "vllm:prompt_tokens_total",
            "counter",
            "Number of prefill tokens processed.",
            c.prompt_tokens as f64,
        );
        metric(
            "vllm:generation_tokens_total",
            "counter",
            "Number of generation tokens processed.",
            c.generation_tokens as f64,
        );
        metric(
            "vllm:num_preemptions_total",
            "counter",
            "Cumulative number of preemptions.",
            c.preemptions as f64,
        );
        let _ = writeln!(
            s,
            "# HELP vllm:request_success_total Count of successfully processed requests.\n# TYPE vllm:request_success_total counter\nvllm:request_success_total{{model_name=\"{m}\",engine=\"0\",finished_reason=\"length\"}} {}",
            c.finished
        );
        let _ = writeln!(
            s,
            "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n# TYPE vllm:cache_config_info gauge\nvllm:cache_config_info{{block_size=\"{}\",cache_dtype=\"auto\",enable_prefix_caching=\"True\",engine=\"0\",gpu_memory_utilization=\"0.9\",num_cpu_blocks=\"0\",num_gpu_blocks=\"{}\"}} 1.0",
            cfg.block_size, cfg.num_gpu_blocks
        );
        s
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// Bind every server, start their engines, and serve until the process is stopped.
pub async fn serve(args: ServeArgs) -> Result<(), String> {
    if args.servers == 0 {
        return Err("--servers must be at least 1".into());
    }
    if let Some(bad) = args.speed.iter().find(|v| !(v.is_finite() && **v > 0.0)) {
        return Err(format!(
            "--speed: every speed must be a positive number, got {bad}"
        ));
    }
    let cfg = args.engine_config();
    let mut listeners = Vec::new();
    let mut fleet = Vec::new();
    for i in 0..args.servers {
        // Base port 0: every server gets an ephemeral port (printed on the "servers:" line).
        let port = if args.base_port == 0 {
            0
        } else {
            u16::try_from(i)
                .ok()
                .and_then(|i| args.base_port.checked_add(i))
                .ok_or_else(|| format!("port overflow: {} + {i}", args.base_port))?
        };
        let addr = format!("{}:{port}", args.host);
        let l = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| format!("cannot bind {addr}: {e}"))?;
        let port = l.local_addr().map(|a| a.port()).unwrap_or(port);
        listeners.push(l);
        fleet.push(Arc::new(
            Server::new(
                format!("{}:{port}", args.host),
                port,
                args.model.clone(),
                args.default_max_tokens,
                args.engine_config_of(i),
            )
            .with_cache_report(args.cache_report()),
        ));
    }
    let fleet = Arc::new(fleet);
    let mut tasks = tokio::task::JoinSet::new();
    for (l, s) in listeners.into_iter().zip(fleet.iter()) {
        tokio::spawn(s.clone().run_engine());
        let router = app(s.clone(), fleet.clone());
        tasks.spawn(async move {
            let l = l.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            axum::serve(l, router).await
        });
    }
    let speeds: Vec<String> = (0..args.servers)
        .map(|i| args.speed[i % args.speed.len()].to_string())
        .collect();
    println!(
        "llmproxy-sim: {} servers (model {}, {} blocks x {} tokens, step {}ms + {}us/prefill token + {}us/decoding request, speed {})",
        args.servers,
        args.model,
        cfg.num_gpu_blocks,
        cfg.block_size,
        args.step_base_ms,
        args.prefill_us_per_token,
        args.decode_us_per_seq,
        speeds.join(",")
    );
    let urls: Vec<String> = fleet
        .iter()
        .map(|s| format!("http://{}:{}", args.host, s.port))
        .collect();
    // One line that scripts can parse: the base URL of every server.
    println!("servers: {}", urls.join(" "));
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    tokio::select! {
        r = tasks.join_next() => match r {
            Some(Ok(Err(e))) => Err(format!("server stopped: {e}")),
            _ => Err("server stopped".into()),
        },
        _ = shutdown_signal() => Ok(()),
    }
}

pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[cfg(test)]
mod tests;
