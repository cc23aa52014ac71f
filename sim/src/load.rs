//! Open-loop load generator: replays a trace against one target URL, streams every response
//! (SSE), and measures TTFT, end-to-end latency, throughput, errors, per-server share, the
//! fleet's prefix-cache hit rate (from the simulator's /sim/stats) and its own send lateness.

use crate::workload::{Kind, Session, Tool, Trace};
use futures_util::StreamExt;
use reqwest::header::HeaderName;
use serde::Serialize;
use serde_json::{json, Value};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod generate;
mod responses;
mod summary;

pub use responses::Api;

pub use summary::{kind_hits_string, share_string, summarize, table, Dist, ServerShare, Summary};

#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct RunArgs {
    /// Path of the chat completions endpoint on the target.
    #[arg(long, default_value = "/v1/chat/completions")]
    pub path: String,
    /// The API the sessions speak: chat completions (at `--path`), the Responses API
    /// (`/v1/responses`) resending the conversation (`responses`) or naming the previous
    /// answer (`responses-chained`, `previous_response_id`), or SGLang's native `/generate`
    /// with the conversation rendered as one text (`generate`) or sent as token ids, each turn
    /// the previous turn's ids and answer's `output_ids` then the new message's
    /// (`generate-ids`).
    #[arg(long, value_enum, default_value_t = Api::Chat)]
    pub api: Api,
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
    /// Share of the sessions (0–1, chosen by session number) whose requests are not streamed
    /// (`"stream": false`, one JSON answer), as the OpenAI SDKs send by default: the gateway
    /// sees their first byte only when the answer is complete. Their TTFT is not observable
    /// and is left out of the TTFT statistics; their e2e latency counts.
    #[arg(long, default_value_t = 0.0, value_parser = share_arg)]
    pub non_stream_share: f64,
}

/// A `--non-stream-share` value, checked to be within 0–1.
fn share_arg(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("want a share within 0-1, got {s:?}")),
    }
}

/// True when session `session` is one of the `share` of sessions that do not stream: a fixed
/// hash of its number, so every target of a comparison gets the same sessions unstreamed.
pub fn session_streams(session: usize, share: f64) -> bool {
    let h = xxhash_rust::xxh3::xxh3_64(&(session as u64).to_le_bytes());
    (h >> 11) as f64 / (1u64 << 53) as f64 >= share
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
    /// `--non-stream-share`.
    non_stream_share: f64,
    /// `--api`.
    api: Api,
}

/// The `--session-header` name, checked.
fn session_header(arg: Option<&str>) -> Result<Option<HeaderName>, String> {
    arg.map(|h| {
        HeaderName::from_bytes(h.as_bytes())
            .map_err(|_| format!("--session-header: not a header name: {h:?}"))
    })
    .transpose()
}

/// The POST of turn `turn` of session `session`: `body` as JSON, `x-request-id:
/// SESSION-TURN` (a gateway's request log joins the run's records by it), and the session's id
/// in `session_header` when given.
fn turn_request(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
    session_header: Option<&HeaderName>,
    session: usize,
    turn: usize,
) -> reqwest::RequestBuilder {
    let rb = (client.post(url).json(body)).header("x-request-id", format!("{session}-{turn}"));
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
            .map(|u| match args.api {
                Api::Chat => format!("{u}{}", args.path),
                Api::Generate | Api::GenerateIds => format!("{u}{}", generate::PATH),
                Api::Responses | Api::ResponsesChained => format!("{u}{}", responses::PATH),
            })
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
        non_stream_share: args.non_stream_share,
        api: args.api,
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

/// The `tools` of a request of `api` (`--tools-field`), each with one required string
/// parameter `path`: chat completions' shape (`{"type": "function", "function": {name,
/// description, parameters}}`, which `--api generate` and `generate-ids` render into their
/// text as the server would), or the Responses API's (`{"type": "function", name, description,
/// parameters}`).
pub fn tools_json(api: Api, tools: &[Tool]) -> Vec<Value> {
    let parameters = json!({
        "type": "object",
        "properties": {"path": {"type": "string"}},
        "required": ["path"],
    });
    tools
        .iter()
        .map(|t| {
            let mut f =
                json!({"name": t.name, "description": t.description, "parameters": parameters});
            match api {
                Api::Responses | Api::ResponsesChained => {
                    f["type"] = "function".into();
                    f
                }
                Api::Chat | Api::Generate | Api::GenerateIds => {
                    json!({"type": "function", "function": f})
                }
            }
        })
        .collect()
}

/// The request bodies of one session's turns for `--api`: what they say besides the messages
/// (model, streaming, the session's tools), and the conversation's token ids under
/// `--api generate-ids`.
struct Bodies<'a> {
    api: Api,
    model: &'a str,
    stream: bool,
    /// Ask for `usage` in the stream.
    stream_usage: bool,
    /// The session has a system message (first of the messages; the Responses APIs send it
    /// as `instructions`).
    system: bool,
    /// The session's `tools` in `api`'s shape (`--tools-field`).
    tools: Option<Vec<Value>>,
    /// `--api generate-ids`: the conversation's token ids so far.
    ids: Vec<u64>,
}

impl<'a> Bodies<'a> {
    fn new(api: Api, model: &'a str, s: &Session, stream: bool, stream_usage: bool) -> Self {
        Bodies {
            api,
            model,
            stream,
            stream_usage,
            system: s.system.is_some(),
            tools: s.tools.as_deref().map(|t| tools_json(api, t)),
            ids: Vec::new(),
        }
    }

    /// The body of the turn whose conversation so far is `messages` (the system message first,
    /// this turn's user message last); `previous`: the previous answer's id (Responses).
    fn turn(&mut self, messages: &[Value], previous: Option<&str>, max_tokens: u64) -> Value {
        let tools = self.tools.as_deref();
        let (model, stream) = (self.model, self.stream);
        let mut body = match self.api {
            Api::Generate => generate::body(model, messages, tools, max_tokens, stream),
            Api::GenerateIds => {
                generate::push_turn(&mut self.ids, messages, tools);
                generate::ids_body(model, &self.ids, max_tokens, stream)
            }
            Api::Chat => {
                let mut body = json!({
                    "model": model,
                    "messages": messages,
                    "max_tokens": max_tokens,
                    "stream": stream,
                });
                if stream && self.stream_usage {
                    body["stream_options"] = json!({"include_usage": true});
                }
                body
            }
            Api::Responses | Api::ResponsesChained => {
                let (instructions, conversation) = match messages.split_first() {
                    Some((sys, rest)) if self.system => (sys["content"].as_str(), rest),
                    _ => (None, messages),
                };
                responses::body(
                    self.api,
                    model,
                    instructions,
                    conversation,
                    previous,
                    max_tokens,
                    stream,
                )
            }
        };
        if let (Some(t), Api::Chat | Api::Responses | Api::ResponsesChained) = (tools, self.api) {
            body["tools"] = t.into();
        }
        body
    }
}

async fn run_session(ctx: Arc<Ctx>, s: Session) {
    let mut messages: Vec<Value> = Vec::new();
    if let Some(sys) = &s.system {
        messages.push(json!({"role": "system", "content": &**sys}));
    }
    let mut scheduled = ctx.t0 + Duration::from_secs_f64(s.start_s);
    let stream = session_streams(s.id, ctx.non_stream_share);
    let mut previous: Option<String> = None;
    let mut bodies = Bodies::new(ctx.api, &ctx.model, &s, stream, ctx.stream_usage);
    for (i, turn) in s.turns.iter().enumerate() {
        if i > 0 {
            scheduled = Instant::now() + Duration::from_secs_f64(turn.think_s);
        }
        if scheduled >= ctx.end {
            break;
        }
        tokio::time::sleep_until(scheduled.into()).await;
        messages.push(json!({"role": "user", "content": &turn.user}));
        let body = bodies.turn(&messages, previous.as_deref(), turn.max_tokens);
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
            one_request(&ctx, &ctx.urls[gateway], &body, (s.id, i), stream),
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
        let err = err.or_else(|| {
            let no_ids = ctx.api == Api::GenerateIds && out.output_ids.is_empty();
            no_ids.then(|| "no output_ids in answer".to_string())
        });
        let ok = err.is_none();
        ctx.progress.done.fetch_add(1, Ordering::Relaxed);
        if !ok {
            ctx.progress.errors.fetch_add(1, Ordering::Relaxed);
        }
        let since = |t: Instant| t.saturating_duration_since(ctx.t0).as_secs_f64();
        let content = out.content;
        previous = out.response_id;
        if ctx.api == Api::GenerateIds {
            bodies.ids.extend(&out.output_ids);
        }
        ctx.records.lock().unwrap().push(Record {
            kind: s.kind,
            session: s.id,
            turn: i,
            scheduled_s: since(scheduled),
            sent_s: since(sent),
            ttft_s: out
                .first_token
                .filter(|_| stream)
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
    /// Responses API: the answer's id.
    response_id: Option<String>,
    /// `/generate`: the answer's token ids (the last event's, cumulative).
    output_ids: Vec<u64>,
}

async fn one_request(
    ctx: &Ctx,
    url: &str,
    body: &Value,
    (session, turn): (usize, usize),
    stream: bool,
) -> Result<Streamed, (Streamed, String)> {
    let mut out = Streamed::default();
    let header = ctx.session_header.as_ref();
    let request = turn_request(&ctx.client, url, body, header, session, turn);
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
    if !stream {
        return read_answer(resp, out).await;
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
            if v.get("type").is_some() {
                match responses::read_event(&mut out, &v) {
                    Ok(end) => done |= end,
                    Err(e) => return Err((out, e)),
                }
                continue;
            }
            if let Some(err) = v.get("error") {
                return Err((out, format!("error chunk: {err}")));
            }
            if v.get("meta_info").is_some() {
                generate::read_event(&mut out, &v);
                continue;
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
            out.read_usage(&v);
        }
    }
    if !done {
        return Err((
            out,
            "stream ended without [DONE] (or response.completed)".into(),
        ));
    }
    if out.first_token.is_none() {
        return Err((out, "no content in stream".into()));
    }
    Ok(out)
}

impl Streamed {
    /// Takes the token counts of an answer's (or a chunk's) `usage`, when it has one.
    fn read_usage(&mut self, v: &Value) {
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            self.usage_prompt = u["prompt_tokens"].as_u64();
            self.usage_completion = u["completion_tokens"].as_u64();
            self.usage_cached = u
                .pointer("/prompt_tokens_details/cached_tokens")
                .and_then(Value::as_u64);
        }
    }
}

/// Reads a non-streamed answer: one JSON document with the whole reply and its `usage`
/// (`first_token` is the time it arrived).
async fn read_answer(
    resp: reqwest::Response,
    mut out: Streamed,
) -> Result<Streamed, (Streamed, String)> {
    let bytes = match resp.bytes().await {
        Ok(b) => b,
        Err(e) => return Err((out, format!("answer: {}", short_err(&e)))),
    };
    out.first_token = Some(Instant::now());
    let v: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => return Err((out, format!("bad JSON answer: {e}"))),
    };
    if v.get("output").is_some() {
        return match responses::read_answer(&mut out, &v) {
            Ok(()) => {
                out.chunks = out.usage_completion.unwrap_or(1);
                Ok(out)
            }
            Err(e) => Err((out, e)),
        };
    }
    if v.get("meta_info").is_some() {
        return match generate::read_answer(&mut out, &v) {
            Ok(()) => {
                out.chunks = out.usage_completion.unwrap_or(1);
                Ok(out)
            }
            Err(e) => Err((out, e)),
        };
    }
    let Some(content) = v
        .pointer("/choices/0/message/content")
        .or_else(|| v.pointer("/choices/0/text"))
        .and_then(Value::as_str)
        .filter(|c| !c.is_empty())
    else {
        return Err((out, "no content in answer".into()));
    };
    out.content = content.to_string();
    out.read_usage(&v);
    out.chunks = out.usage_completion.unwrap_or(1);
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
            3,
        )
        .build()
        .map_err(|e| e.to_string())?;
        Ok(req.headers().clone())
    }

    #[test]
    fn session_header_sends_the_session_id_and_is_off_by_default_and_every_turn_has_an_id() {
        let h = sent_headers(&["--session-header", "X-Session-Id"]).unwrap();
        assert_eq!(h.get("x-session-id").unwrap(), "42");
        let h = sent_headers(&[]).unwrap();
        assert!(h.get("x-session-id").is_none(), "{h:?}");
        assert_eq!(h.get("x-request-id").unwrap(), "42-3", "session-turn");
        assert_eq!(h.len(), 2, "content-type and x-request-id only: {h:?}");
        let e = sent_headers(&["--session-header", "x session"]).unwrap_err();
        assert_eq!(e, "--session-header: not a header name: \"x session\"");
    }

    /// A short-text agent trace (3 agent prompts) with `extra` workload arguments.
    fn agent_trace(extra: &[&str]) -> Trace {
        #[derive(Parser)]
        struct W {
            #[command(flatten)]
            w: crate::workload::WorkloadArgs,
        }
        let mut v = vec!["x", "--mix", "agent=1", "--rate", "2", "--duration", "60"];
        v.extend_from_slice(&["--agent-prompts", "3", "--agent-system-tokens", "200:400"]);
        v.extend_from_slice(&[
            "--agent-context-tokens",
            "50:100",
            "--agent-tool-tokens",
            "20",
        ]);
        v.extend_from_slice(extra);
        crate::workload::generate(&W::parse_from(v).w).unwrap()
    }

    /// The bodies of the first two turns of session `s` under `api` (the first answer: " abc",
    /// id `resp_1`), and the conversation of each.
    fn two_turns(api: Api, s: &Session) -> Vec<(Value, Vec<Value>)> {
        let mut bodies = Bodies::new(api, "m", s, true, true);
        let mut messages = vec![json!({"role": "system", "content": s.system.as_deref()})];
        messages.push(json!({"role": "user", "content": s.turns[0].user}));
        let b1 = bodies.turn(&messages, None, 8);
        let first = messages.clone();
        bodies.ids.extend(crate::server::encode_ids(" abc"));
        messages.push(json!({"role": "assistant", "content": " abc"}));
        messages.push(json!({"role": "user", "content": s.turns[1].user}));
        let b2 = bodies.turn(&messages, Some("resp_1"), 8);
        vec![(b1, first), (b2, messages)]
    }

    #[test]
    fn the_tools_field_sends_the_agent_prompt_as_four_tools_on_every_api() {
        use crate::server::{encode_ids, render_chat};
        use crate::workload::{AGENT_TOOLS_SYSTEM, AGENT_TOOL_NAMES};
        let plain = agent_trace(&[]);
        let with = agent_trace(&["--tools-field"]);
        let parameters = json!({"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]});
        let mut systems = std::collections::BTreeSet::new();
        let mut tool_sets = std::collections::BTreeSet::new();
        for (p, w) in plain.sessions.iter().zip(&with.sessions) {
            let words: Vec<&str> = p.system.as_deref().unwrap().split_whitespace().collect();
            let words = words.join(" ");
            let chat_tools = tools_json(Api::Chat, w.tools.as_deref().unwrap());
            for (b, _) in two_turns(Api::Chat, w) {
                systems.insert(b["messages"][0].to_string());
                assert_eq!(b["messages"][0]["content"], AGENT_TOOLS_SYSTEM);
                let tools = b["tools"].as_array().unwrap();
                assert_eq!(tools, &chat_tools);
                assert_eq!(tools.len(), 4);
                let mut descriptions = Vec::new();
                for (t, name) in tools.iter().zip(AGENT_TOOL_NAMES) {
                    assert_eq!(t["type"], "function");
                    let f = &t["function"];
                    assert_eq!((&f["name"], &f["parameters"]), (&json!(name), &parameters));
                    descriptions.push(f["description"].as_str().unwrap());
                }
                assert_eq!(descriptions.join(" "), words);
                tool_sets.insert(b["tools"].to_string());
            }
            for api in [Api::Responses, Api::ResponsesChained] {
                for (b, _) in two_turns(api, w) {
                    assert_eq!(b["instructions"], AGENT_TOOLS_SYSTEM, "{api:?}");
                    let tools = b["tools"].as_array().unwrap();
                    let descriptions: Vec<&str> = tools
                        .iter()
                        .zip(AGENT_TOOL_NAMES)
                        .map(|(t, name)| {
                            assert_eq!(
                                (&t["type"], &t["name"]),
                                (&json!("function"), &json!(name))
                            );
                            assert_eq!(t["parameters"], parameters);
                            assert!(t.get("function").is_none(), "{t}");
                            t["description"].as_str().unwrap()
                        })
                        .collect();
                    assert_eq!(descriptions.join(" "), words);
                }
            }
            // /generate: the text the server's template makes of the chat request, tools
            // included; each turn's text extends the previous one and its answer.
            let turns = two_turns(Api::Generate, w);
            for (b, messages) in &turns {
                assert_eq!(b["text"], render_chat(messages, Some(&chat_tools)));
                assert!(b.get("tools").is_none());
            }
            let t1 = turns[0].0["text"].as_str().unwrap();
            assert!(turns[1].0["text"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{t1} abc")));
            let ids = two_turns(Api::GenerateIds, w);
            assert_eq!(ids[0].0["input_ids"], json!(encode_ids(t1)));
            let ids2 = ids[1].0["input_ids"].as_array().unwrap();
            assert!(ids2.starts_with(ids[0].0["input_ids"].as_array().unwrap()));
            // Without the flag: the agent prompt is the system text, and no request has tools.
            for api in [
                Api::Chat,
                Api::Responses,
                Api::ResponsesChained,
                Api::Generate,
                Api::GenerateIds,
            ] {
                for (b, messages) in two_turns(api, p) {
                    assert!(b.get("tools").is_none(), "{api:?}: {b}");
                    assert_eq!(messages[0]["content"].as_str(), p.system.as_deref());
                    if api == Api::Generate {
                        assert_eq!(b["text"], render_chat(&messages, None));
                    }
                }
            }
            let (b, messages) = &two_turns(Api::Chat, p)[0];
            let expected = json!({"model": "m", "messages": messages, "max_tokens": 8, "stream": true, "stream_options": {"include_usage": true}});
            assert_eq!(b, &expected);
        }
        assert_eq!(
            systems.len(),
            1,
            "one system message for every agent prompt"
        );
        assert_eq!(
            tool_sets.len(),
            3,
            "the agent prompts differ in their tools"
        );
    }

    #[test]
    fn the_non_streamed_share_picks_that_share_of_sessions_the_same_way_every_time() {
        let parse = |v: &str| {
            Cli::try_parse_from(["load", "--non-stream-share", v]).map(|c| c.run.non_stream_share)
        };
        assert_eq!(parse("0.25").unwrap(), 0.25);
        assert!(parse("1.5").is_err() && parse("-0.1").is_err() && parse("x").is_err());
        let unstreamed = |share| (0..10_000).filter(|&s| !session_streams(s, share)).count();
        assert_eq!(unstreamed(0.0), 0, "the default streams every session");
        assert_eq!(unstreamed(1.0), 10_000);
        let quarter = unstreamed(0.25);
        assert!((2_300..2_700).contains(&quarter), "{quarter} of 10,000");
        assert!((0..10_000).all(|s| session_streams(s, 0.25) == session_streams(s, 0.25)));
    }
}
