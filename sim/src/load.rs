//! Open-loop load generator: replays a trace against one target URL, streams every response
//! (SSE), and measures TTFT, end-to-end latency, throughput, errors, per-server share, the
//! fleet's prefix-cache hit rate (from the simulator's /sim/stats) and its own send lateness.

use crate::workload::{Kind, Trace};
use futures_util::StreamExt;
use reqwest::header::HeaderName;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct RunArgs {
    /// Path of the chat completions endpoint on the target.
    #[arg(long, default_value = "/v1/chat/completions")]
    pub path: String,
    /// Seconds allowed for one request.
    #[arg(long, default_value_t = 120.0)]
    pub request_timeout: f64,
    /// Seconds to wait for in-flight requests after the last send.
    #[arg(long, default_value_t = 60.0)]
    pub drain_timeout: f64,
    /// Requests sent in the first WARMUP seconds are left out of the statistics (the fleet's
    /// hit rate and utilisation are then measured from the end of the warm-up).
    #[arg(long, default_value_t = 0.0)]
    pub warmup: f64,
    /// Simulator URL (any server of the fleet) for /sim/stats: fleet cache hit rate,
    /// utilisation. Optional.
    #[arg(long)]
    pub stats_url: Option<String>,
    /// No progress line on stderr.
    #[arg(long)]
    pub quiet: bool,
    /// With several target URLs (comma-separated, e.g. two gateway replicas in front of the
    /// same fleet): `session` sends every turn of a session to the same URL (chosen by a hash of
    /// the session), `alternate` sends consecutive requests to the URLs in turn.
    #[arg(long, value_enum, default_value_t = Split::Session)]
    pub split: Split,
    /// Send each session's id (its number in the workload) in this request header on every
    /// turn, e.g. `x-session-id` for a gateway's `session_affinity`. Off by default.
    #[arg(long, value_name = "NAME")]
    pub session_header: Option<String>,
    /// Do not ask for `usage` in the streams (`stream_options.include_usage`), as many OpenAI
    /// clients do not: the answers then carry no token counts (the hit rate per kind is left
    /// empty; the fleet's comes from `--stats-url`).
    #[arg(long)]
    pub no_stream_usage: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Session,
    Alternate,
}

/// The URLs of a target: one base URL, or several separated by commas.
pub fn target_urls(target: &str) -> Vec<String> {
    target
        .split(',')
        .map(|u| u.trim().trim_end_matches('/').to_string())
        .filter(|u| !u.is_empty())
        .collect()
}

/// Which of `n` URLs gets request number `seq` (counting over the run) of session `session`.
pub fn pick_url(split: Split, n: usize, session: usize, seq: u64) -> usize {
    if n <= 1 {
        return 0;
    }
    match split {
        Split::Session => {
            (xxhash_rust::xxh3::xxh3_64(&(session as u64).to_le_bytes()) % n as u64) as usize
        }
        Split::Alternate => (seq % n as u64) as usize,
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub kind: Kind,
    pub session: usize,
    pub turn: usize,
    /// Times in seconds from the start of the run.
    pub scheduled_s: f64,
    pub sent_s: f64,
    pub ttft_s: Option<f64>,
    pub e2e_s: f64,
    pub ok: bool,
    pub error: Option<String>,
    pub output_tokens: u64,
    pub prompt_tokens: Option<u64>,
    pub cached_tokens: Option<u64>,
    pub served_by: Option<String>,
    /// Index of the target URL the request went to (several URLs: see --split).
    pub gateway: usize,
}

#[derive(Default)]
struct Progress {
    sent: AtomicU64,
    done: AtomicU64,
    errors: AtomicU64,
    max_late_us: AtomicU64,
}

pub struct RunOutput {
    pub records: Vec<Record>,
    pub wall_s: f64,
    pub fleet_before: Option<Value>,
    pub fleet_after: Option<Value>,
}

struct Ctx {
    client: reqwest::Client,
    urls: Vec<String>,
    split: Split,
    sent_seq: AtomicU64,
    model: String,
    t0: Instant,
    end: Instant,
    timeout: Duration,
    records: Mutex<Vec<Record>>,
    progress: Progress,
    /// `--session-header`.
    session_header: Option<HeaderName>,
    /// Ask for `usage` in every stream (not `--no-stream-usage`).
    stream_usage: bool,
}

/// The `--session-header` name, checked.
fn session_header(arg: Option<&str>) -> Result<Option<HeaderName>, String> {
    arg.map(|h| {
        HeaderName::from_bytes(h.as_bytes())
            .map_err(|_| format!("--session-header: not a header name: {h:?}"))
    })
    .transpose()
}

/// The POST of one turn of session `session`: `body` as JSON, and the session's id in
/// `session_header` when given.
fn turn_request(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
    session_header: Option<&HeaderName>,
    session: usize,
) -> reqwest::RequestBuilder {
    let rb = client.post(url).json(body);
    match session_header {
        Some(name) => rb.header(name, session.to_string()),
        None => rb,
    }
}

pub fn http_client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(4096)
        .no_proxy()
        .build()
        .map_err(|e| format!("http client: {e}"))
}

pub async fn fetch_stats(client: &reqwest::Client, base: &str) -> Result<Value, String> {
    let url = format!("{}/sim/stats", base.trim_end_matches('/'));
    let r = client
        .get(&url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    if !r.status().is_success() {
        return Err(format!("GET {url}: HTTP {}", r.status()));
    }
    r.json().await.map_err(|e| format!("GET {url}: {e}"))
}

pub async fn reset_fleet(client: &reqwest::Client, base: &str) -> Result<(), String> {
    let url = format!("{}/sim/reset", base.trim_end_matches('/'));
    let r = client
        .post(&url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| format!("POST {url}: {e}"))?;
    if !r.status().is_success() {
        return Err(format!("POST {url}: HTTP {}", r.status()));
    }
    Ok(())
}

/// Wait until no request is running or waiting anywhere in the fleet.
pub async fn wait_fleet_idle(
    client: &reqwest::Client,
    base: &str,
    limit: Duration,
) -> Result<(), String> {
    let until = Instant::now() + limit;
    loop {
        let s = fetch_stats(client, base).await?;
        let busy = s["totals"]["running"].as_f64().unwrap_or(0.0)
            + s["totals"]["waiting"].as_f64().unwrap_or(0.0);
        if busy == 0.0 {
            return Ok(());
        }
        if Instant::now() > until {
            return Err(format!("fleet still has {busy} requests after {limit:?}"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn run(
    target: &str,
    label: &str,
    trace: &Trace,
    args: &RunArgs,
) -> Result<RunOutput, String> {
    let client = http_client()?;
    let session_header = session_header(args.session_header.as_deref())?;
    if target_urls(target).is_empty() {
        return Err(format!("no URL in target {target:?}"));
    }
    let fleet_before = match &args.stats_url {
        Some(u) => Some(fetch_stats(&client, u).await?),
        None => None,
    };
    let lead = Duration::from_millis(200);
    let t0 = Instant::now() + lead;
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        urls: target_urls(target)
            .iter()
            .map(|u| format!("{u}{}", args.path))
            .collect(),
        split: args.split,
        sent_seq: AtomicU64::new(0),
        model: trace.model.clone(),
        t0,
        end: t0 + Duration::from_secs_f64(trace.duration_s),
        timeout: Duration::from_secs_f64(args.request_timeout),
        records: Mutex::new(Vec::new()),
        progress: Progress::default(),
        session_header,
        stream_usage: !args.no_stream_usage,
    });
    // With a warm-up, the fleet's counters are read again when it ends, so that the hit rate and
    // utilisation cover the measured part only.
    let warm_snapshot = match (&args.stats_url, args.warmup > 0.0) {
        (Some(u), true) => {
            let (client, u) = (client.clone(), u.clone());
            let at = t0 + Duration::from_secs_f64(args.warmup);
            Some(tokio::spawn(async move {
                tokio::time::sleep_until(at.into()).await;
                fetch_stats(&client, &u).await
            }))
        }
        _ => None,
    };
    let mut set = tokio::task::JoinSet::new();
    for s in &trace.sessions {
        let ctx = ctx.clone();
        let s = s.clone();
        set.spawn(async move { run_session(ctx, s).await });
    }
    let ticker = if args.quiet {
        None
    } else {
        let ctx = ctx.clone();
        let label = label.to_string();
        let total = trace.max_requests();
        let dur = trace.duration_s;
        Some(tokio::spawn(async move {
            progress_loop(ctx, label, total, dur).await
        }))
    };
    let deadline = ctx.end + Duration::from_secs_f64(args.drain_timeout);
    let mut unfinished = 0;
    loop {
        tokio::select! {
            r = set.join_next() => if r.is_none() { break },
            _ = tokio::time::sleep_until(deadline.into()) => {
                unfinished = set.len();
                set.abort_all();
                while set.join_next().await.is_some() {}
                break;
            }
        }
    }
    if let Some(t) = ticker {
        t.abort();
        if std::io::stderr().is_terminal() {
            eprintln!();
        }
    }
    let wall_s = Instant::now().saturating_duration_since(t0).as_secs_f64();
    let late_max = ctx.progress.max_late_us.load(Ordering::Relaxed) as f64 / 1e6;
    if late_max > 0.1 {
        eprintln!(
            "[{label}] warning: the load generator sent a request {:.0} ms late: it is short of CPU, results are less reliable",
            late_max * 1e3
        );
    }
    if unfinished > 0 {
        eprintln!("[{label}] {unfinished} sessions still in flight after the drain timeout were cancelled");
    }
    let fleet_after = match &args.stats_url {
        Some(u) => Some(fetch_stats(&client, u).await?),
        None => None,
    };
    let mut fleet_before = fleet_before;
    if let Some(h) = warm_snapshot {
        if h.is_finished() {
            match h.await {
                Ok(Ok(v)) => fleet_before = Some(v),
                Ok(Err(e)) => eprintln!("[{label}] fleet stats at the end of the warm-up: {e}"),
                Err(_) => {}
            }
        } else {
            h.abort();
        }
    }
    let mut records = std::mem::take(&mut *ctx.records.lock().unwrap());
    records.sort_by(|a, b| a.sent_s.total_cmp(&b.sent_s));
    Ok(RunOutput {
        records,
        wall_s,
        fleet_before,
        fleet_after,
    })
}

async fn progress_loop(ctx: Arc<Ctx>, label: String, total: usize, dur: f64) {
    let tty = std::io::stderr().is_terminal();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n = 0u64;
    loop {
        tick.tick().await;
        n += 1;
        let p = &ctx.progress;
        let (sent, done, err) = (
            p.sent.load(Ordering::Relaxed),
            p.done.load(Ordering::Relaxed),
            p.errors.load(Ordering::Relaxed),
        );
        let t = Instant::now()
            .saturating_duration_since(ctx.t0)
            .as_secs_f64();
        let late = p.max_late_us.load(Ordering::Relaxed) as f64 / 1e3;
        let line = format!(
            "[{label}] {t:6.1}s/{dur:.0}s  sent {sent}/{total}  done {done}  in-flight {}  errors {err}  max send lateness {late:.1} ms",
            sent - done
        );
        if tty {
            eprint!("\r{line}   ");
        } else if n.is_multiple_of(5) {
            eprintln!("{line}");
        }
    }
}

async fn run_session(ctx: Arc<Ctx>, s: crate::workload::Session) {
    let mut messages: Vec<Value> = Vec::new();
    if let Some(sys) = &s.system {
        messages.push(json!({"role": "system", "content": &**sys}));
    }
    let mut scheduled = ctx.t0 + Duration::from_secs_f64(s.start_s);
    for (i, turn) in s.turns.iter().enumerate() {
        if i > 0 {
            scheduled = Instant::now() + Duration::from_secs_f64(turn.think_s);
        }
        if scheduled >= ctx.end {
            break;
        }
        tokio::time::sleep_until(scheduled.into()).await;
        messages.push(json!({"role": "user", "content": &turn.user}));
        let mut body = json!({
            "model": ctx.model,
            "messages": messages,
            "max_tokens": turn.max_tokens,
            "stream": true,
        });
        if ctx.stream_usage {
            body["stream_options"] = json!({"include_usage": true});
        }
        let seq = ctx.sent_seq.fetch_add(1, Ordering::Relaxed);
        let gateway = pick_url(ctx.split, ctx.urls.len(), s.id, seq);
        let sent = Instant::now();
        let late = sent.saturating_duration_since(scheduled);
        ctx.progress
            .max_late_us
            .fetch_max(late.as_micros() as u64, Ordering::Relaxed);
        ctx.progress.sent.fetch_add(1, Ordering::Relaxed);
        let res = tokio::time::timeout(
            ctx.timeout,
            one_request(&ctx, &ctx.urls[gateway], &body, s.id),
        )
        .await;
        let e2e = sent.elapsed().as_secs_f64();
        let (out, err) = match res {
            Ok(Ok(out)) => (out, None),
            Ok(Err((out, e))) => (out, Some(e)),
            Err(_) => (
                Streamed::default(),
                Some(format!("timeout after {:?}", ctx.timeout)),
            ),
        };
        let ok = err.is_none();
        ctx.progress.done.fetch_add(1, Ordering::Relaxed);
        if !ok {
            ctx.progress.errors.fetch_add(1, Ordering::Relaxed);
        }
        let since = |t: Instant| t.saturating_duration_since(ctx.t0).as_secs_f64();
        let content = out.content;
        ctx.records.lock().unwrap().push(Record {
            kind: s.kind,
            session: s.id,
            turn: i,
            scheduled_s: since(scheduled),
            sent_s: since(sent),
            ttft_s: out
                .first_token
                .map(|t| t.saturating_duration_since(sent).as_secs_f64()),
            e2e_s: e2e,
            ok,
            error: err,
            output_tokens: out.usage_completion.unwrap_or(out.chunks),
            prompt_tokens: out.usage_prompt,
            cached_tokens: out.usage_cached,
            served_by: out.served_by,
            gateway,
        });
        if !ok {
            break;
        }
        messages.push(json!({"role": "assistant", "content": content}));
    }
}

#[derive(Default)]
struct Streamed {
    first_token: Option<Instant>,
    content: String,
    chunks: u64,
    usage_prompt: Option<u64>,
    usage_cached: Option<u64>,
    usage_completion: Option<u64>,
    served_by: Option<String>,
}

async fn one_request(
    ctx: &Ctx,
    url: &str,
    body: &Value,
    session: usize,
) -> Result<Streamed, (Streamed, String)> {
    let mut out = Streamed::default();
    let request = turn_request(&ctx.client, url, body, ctx.session_header.as_ref(), session);
    let resp = match request.send().await {
        Ok(r) => r,
        Err(e) => return Err((out, format!("connect: {}", short_err(&e)))),
    };
    out.served_by = resp
        .headers()
        .get("x-served-by")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        let mut text: String = text.chars().take(200).collect();
        text = text.replace('\n', " ");
        return Err((out, format!("HTTP {}: {text}", status.as_u16())));
    }
    let mut stream = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut done = false;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => return Err((out, format!("stream: {}", short_err(&e)))),
        };
        buf.extend_from_slice(&chunk);
        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim();
            let Some(data) = line.strip_prefix("data:") else {
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let v: Value = match serde_json::from_str(data) {
                Ok(v) => v,
                Err(e) => return Err((out, format!("bad SSE chunk: {e}"))),
            };
            if let Some(err) = v.get("error") {
                return Err((out, format!("error chunk: {err}")));
            }
            if let Some(c) = v
                .pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
                .or_else(|| v.pointer("/choices/0/text").and_then(Value::as_str))
            {
                if !c.is_empty() {
                    if out.first_token.is_none() {
                        out.first_token = Some(Instant::now());
                    }
                    out.chunks += 1;
                    out.content.push_str(c);
                }
            }
            if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                out.usage_prompt = u["prompt_tokens"].as_u64();
                out.usage_completion = u["completion_tokens"].as_u64();
                out.usage_cached = u
                    .pointer("/prompt_tokens_details/cached_tokens")
                    .and_then(Value::as_u64);
            }
        }
    }
    if !done {
        return Err((out, "stream ended without [DONE]".into()));
    }
    if out.first_token.is_none() {
        return Err((out, "no content in stream".into()));
    }
    Ok(out)
}

fn short_err(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(x) = src {
        s = format!("{s}: {x}");
        src = x.source();
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Summaries

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Dist {
    pub n: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Dist {
    pub fn of(v: &[f64]) -> Dist {
        if v.is_empty() {
            return Dist::default();
        }
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        let q = |p: f64| s[((p * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1];
        Dist {
            n: s.len(),
            mean: s.iter().sum::<f64>() / s.len() as f64,
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            max: s[s.len() - 1],
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ServerShare {
    pub server: String,
    pub requests: u64,
    pub share: f64,
    /// From the simulator: prompt tokens, cached tokens and busy fraction during the run.
    pub prompt_tokens: Option<f64>,
    pub cached_tokens: Option<f64>,
    pub utilization: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub label: String,
    pub target: String,
    pub requests: usize,
    pub ok: usize,
    pub errors: usize,
    pub error_kinds: BTreeMap<String, usize>,
    pub ttft_s: Dist,
    pub e2e_s: Dist,
    /// Mean time per output token after the first (s).
    pub tpot_s: Dist,
    pub wall_s: f64,
    pub req_per_s: f64,
    pub output_tok_per_s: f64,
    pub send_lateness_s: Dist,
    /// Fleet prefix-cache hit rate: cached prompt tokens / prompt tokens (simulator stats).
    pub fleet_hit_rate: Option<f64>,
    /// The same from the responses' usage.prompt_tokens_details.cached_tokens.
    pub client_hit_rate: Option<f64>,
    pub fleet_utilization: Option<f64>,
    pub per_server: Vec<ServerShare>,
    pub per_kind_ttft_s: BTreeMap<String, Dist>,
    /// Prefix-cache hit rate per request kind, from the responses' usage (cached prompt tokens
    /// / prompt tokens of the successful requests of that kind).
    pub per_kind_hit_rate: BTreeMap<String, f64>,
    /// Requests per target URL when the run split the trace over several URLs.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub per_gateway: Vec<u64>,
}

fn num(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(0.0)
}

pub fn summarize(label: &str, target: &str, out: &RunOutput, warmup: f64) -> Summary {
    let recs: Vec<&Record> = out.records.iter().filter(|r| r.sent_s >= warmup).collect();
    let ok: Vec<&&Record> = recs.iter().filter(|r| r.ok).collect();
    let mut error_kinds = BTreeMap::new();
    for r in recs.iter().filter(|r| !r.ok) {
        let e = r.error.clone().unwrap_or_default();
        let key: String = e.chars().take(60).collect();
        *error_kinds.entry(key).or_insert(0) += 1;
    }
    let ttft: Vec<f64> = ok.iter().filter_map(|r| r.ttft_s).collect();
    let e2e: Vec<f64> = ok.iter().map(|r| r.e2e_s).collect();
    let tpot: Vec<f64> = ok
        .iter()
        .filter(|r| r.output_tokens > 1)
        .filter_map(|r| {
            r.ttft_s
                .map(|t| (r.e2e_s - t) / (r.output_tokens - 1) as f64)
        })
        .collect();
    let late: Vec<f64> = out
        .records
        .iter()
        .map(|r| (r.sent_s - r.scheduled_s).max(0.0))
        .collect();
    // Throughput over the measured window: from the first measured send to the last completion.
    let start = recs.iter().map(|r| r.sent_s).fold(f64::INFINITY, f64::min);
    let end = recs.iter().map(|r| r.sent_s + r.e2e_s).fold(0.0, f64::max);
    let window = if end > start {
        end - start
    } else {
        out.wall_s.max(1e-9)
    };
    let out_tokens: u64 = ok.iter().map(|r| r.output_tokens).sum();
    let (pt, ct): (u64, u64) = ok
        .iter()
        .filter_map(|r| Some((r.prompt_tokens?, r.cached_tokens?)))
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    let client_hit_rate = if pt > 0 {
        Some(ct as f64 / pt as f64)
    } else {
        None
    };

    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for r in &recs {
        let k = r.served_by.clone().unwrap_or_else(|| "(none)".into());
        *counts.entry(k).or_insert(0) += 1;
    }
    // Fleet stats deltas.
    let mut fleet_hit_rate = None;
    let mut fleet_utilization = None;
    let mut fleet_servers: BTreeMap<String, (f64, f64, f64)> = BTreeMap::new();
    if let (Some(b), Some(a)) = (&out.fleet_before, &out.fleet_after) {
        let empty = vec![];
        let before: BTreeMap<String, &Value> = b["servers"]
            .as_array()
            .unwrap_or(&empty)
            .iter()
            .map(|s| (s["name"].as_str().unwrap_or("").to_string(), s))
            .collect();
        let (mut p, mut c, mut util_sum, mut n) = (0.0, 0.0, 0.0, 0.0);
        for s in a["servers"].as_array().unwrap_or(&empty) {
            let name = s["name"].as_str().unwrap_or("").to_string();
            let z = json!({});
            let bs = before.get(&name).copied().unwrap_or(&z);
            // A reset between the snapshots restarts the counters: then the after value is the delta.
            let reset = num(s, "elapsed_s") < num(bs, "elapsed_s");
            let d = |k: &str| {
                if reset {
                    num(s, k)
                } else {
                    num(s, k) - num(bs, k)
                }
            };
            let (dp, dc, db, de) = (
                d("prompt_tokens"),
                d("cached_tokens"),
                d("busy_s"),
                d("elapsed_s"),
            );
            let util = if de > 0.0 { (db / de).min(1.0) } else { 0.0 };
            p += dp;
            c += dc;
            util_sum += util;
            n += 1.0;
            fleet_servers.insert(name, (dp, dc, util));
        }
        if p > 0.0 {
            fleet_hit_rate = Some(c / p);
        }
        if n > 0.0 {
            fleet_utilization = Some(util_sum / n);
        }
    }
    let total = recs.len().max(1) as f64;
    let mut names: Vec<String> = counts.keys().cloned().collect();
    for k in fleet_servers.keys() {
        if !counts.contains_key(k) {
            names.push(k.clone());
        }
    }
    names.sort();
    let per_server = names
        .into_iter()
        .map(|k| {
            let n = counts.get(&k).copied().unwrap_or(0);
            let f = fleet_servers.get(&k);
            ServerShare {
                share: n as f64 / total,
                requests: n,
                prompt_tokens: f.map(|x| x.0),
                cached_tokens: f.map(|x| x.1),
                utilization: f.map(|x| x.2),
                server: k,
            }
        })
        .collect();
    let mut per_kind_ttft_s = BTreeMap::new();
    let mut per_kind_hit_rate = BTreeMap::new();
    for kind in Kind::ALL {
        let v: Vec<f64> = ok
            .iter()
            .filter(|r| r.kind == kind)
            .filter_map(|r| r.ttft_s)
            .collect();
        if !v.is_empty() {
            per_kind_ttft_s.insert(kind.name().to_string(), Dist::of(&v));
        }
        let (p, c) = ok
            .iter()
            .filter(|r| r.kind == kind)
            .filter_map(|r| Some((r.prompt_tokens?, r.cached_tokens?)))
            .fold((0u64, 0u64), |a, b| (a.0 + b.0, a.1 + b.1));
        if p > 0 {
            per_kind_hit_rate.insert(kind.name().to_string(), c as f64 / p as f64);
        }
    }
    let gateways = recs.iter().map(|r| r.gateway + 1).max().unwrap_or(0);
    let per_gateway: Vec<u64> = if gateways > 1 {
        (0..gateways)
            .map(|g| recs.iter().filter(|r| r.gateway == g).count() as u64)
            .collect()
    } else {
        Vec::new()
    };
    Summary {
        label: label.to_string(),
        target: target.to_string(),
        requests: recs.len(),
        ok: ok.len(),
        errors: recs.len() - ok.len(),
        error_kinds,
        ttft_s: Dist::of(&ttft),
        e2e_s: Dist::of(&e2e),
        tpot_s: Dist::of(&tpot),
        wall_s: out.wall_s,
        req_per_s: ok.len() as f64 / window,
        output_tok_per_s: out_tokens as f64 / window,
        send_lateness_s: Dist::of(&late),
        fleet_hit_rate,
        client_hit_rate,
        fleet_utilization,
        per_server,
        per_kind_ttft_s,
        per_kind_hit_rate,
        per_gateway,
    }
}

fn ms(x: f64) -> String {
    format!("{:.0}", x * 1e3)
}

fn pct(x: Option<f64>) -> String {
    x.map(|v| format!("{:.1}%", v * 100.0))
        .unwrap_or_else(|| "-".into())
}

/// Share per server as "25/25/26/24" (percent, servers sorted by name).
pub fn share_string(s: &Summary) -> String {
    s.per_server
        .iter()
        .filter(|p| p.server != "(none)")
        .map(|p| format!("{:.0}", p.share * 100.0))
        .collect::<Vec<_>>()
        .join("/")
}

/// Hit rate per request kind as "chat 62 rag 71 unique 0" (percent, from usage).
pub fn kind_hits_string(s: &Summary) -> String {
    s.per_kind_hit_rate
        .iter()
        .map(|(k, h)| format!("{k} {:.0}", h * 100.0))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One table, one row per run.
pub fn table(runs: &[Summary]) -> String {
    let head = [
        "policy",
        "ok",
        "err",
        "TTFT mean",
        "p50",
        "p90",
        "p99",
        "e2e mean",
        "e2e p50",
        "e2e p99",
        "req/s",
        "out tok/s",
        "hit rate",
        "util",
        "share % per server",
        "late max",
        "hit % by kind",
    ];
    // Left-aligned columns: the policy, the shares and the per-kind hit rates.
    let left = |i: usize| i == 0 || i == 14 || i == 16;
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|s| {
            vec![
                s.label.clone(),
                s.ok.to_string(),
                s.errors.to_string(),
                ms(s.ttft_s.mean),
                ms(s.ttft_s.p50),
                ms(s.ttft_s.p90),
                ms(s.ttft_s.p99),
                ms(s.e2e_s.mean),
                ms(s.e2e_s.p50),
                ms(s.e2e_s.p99),
                format!("{:.2}", s.req_per_s),
                format!("{:.0}", s.output_tok_per_s),
                pct(s.fleet_hit_rate.or(s.client_hit_rate)),
                pct(s.fleet_utilization),
                share_string(s),
                ms(s.send_lateness_s.max),
                kind_hits_string(s),
            ]
        })
        .collect();
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let mut out = String::new();
    let line = |cells: &[String], out: &mut String| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if left(i) {
                    format!("{:<w$}", c, w = w[i])
                } else {
                    format!("{:>w$}", c, w = w[i])
                }
            })
            .collect();
        out.push_str(&format!("| {} |\n", parts.join(" | ")));
    };
    line(
        &head.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        &mut out,
    );
    out.push_str(&format!(
        "|{}|\n",
        w.iter()
            .enumerate()
            .map(|(i, n)| if left(i) {
                format!(":{}", "-".repeat(n + 1))
            } else {
                format!("{}:", "-".repeat(n + 1))
            })
            .collect::<Vec<_>>()
            .join("|")
    ));
    for r in &rows {
        line(r, &mut out);
    }
    out.push_str("(times in ms; hit rate = cached prompt tokens / prompt tokens over the fleet; util = mean busy fraction of the servers; hit % by kind from the responses' usage)\n");
    for s in runs.iter().filter(|s| !s.per_gateway.is_empty()) {
        let g: Vec<String> = s.per_gateway.iter().map(u64::to_string).collect();
        out.push_str(&format!(
            "{}: requests per target URL {}\n",
            s.label,
            g.join("/")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    /// The headers of turn requests of session 42 with `args` on the command line.
    fn sent_headers(args: &[&str]) -> Result<reqwest::header::HeaderMap, String> {
        let cli = Cli::try_parse_from(std::iter::once("load").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        let name = session_header(cli.run.session_header.as_deref())?;
        let client = reqwest::Client::new();
        let body = json!({"model": "m", "messages": []});
        let req = turn_request(
            &client,
            "http://127.0.0.1:1/v1/chat/completions",
            &body,
            name.as_ref(),
            42,
        )
        .build()
        .map_err(|e| e.to_string())?;
        Ok(req.headers().clone())
    }

    #[test]
    fn session_header_sends_the_session_id_and_is_off_by_default() {
        let h = sent_headers(&["--session-header", "X-Session-Id"]).unwrap();
        assert_eq!(h.get("x-session-id").unwrap(), "42");
        let h = sent_headers(&[]).unwrap();
        assert!(h.get("x-session-id").is_none(), "{h:?}");
        assert_eq!(h.len(), 1, "content-type only: {h:?}");
        let e = sent_headers(&["--session-header", "x session"]).unwrap_err();
        assert_eq!(e, "--session-header: not a header name: \"x session\"");
    }
}
