//! The HTTP API of one simulated server: OpenAI chat and text completions (JSON or SSE, with
//! `usage` and `prompt_tokens_details.cached_tokens`), the Responses API (`POST /v1/responses`,
//! in [`super::responses`], with this server's stored responses), SGLang's native
//! `POST /generate` (in [`super::generate`]), the engine's Prometheus page in vLLM's names,
//! SGLang's `/get_load`, and the simulator's own `/sim/*` endpoints. Each request is rendered to
//! a prompt (chat messages with the request's `tools` or legacy `functions`, by [`render_chat`])
//! and handed to the server's engine task ([`super::Server`]); tokens come back over a channel.

use super::responses::{self, Store};
use super::wire::{
    collect_tokens, error_response, parse_object, push_token_id, render_chat, request_tools,
    token_stream, unix_now,
};
use super::{ratio, CacheReport, Ev, Server};
use crate::engine::Usage;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::sync::Arc;
use tokio::sync::mpsc;

#[derive(Clone)]
struct AppState {
    server: Arc<Server>,
    fleet: Arc<Vec<Arc<Server>>>,
    /// This server's stored responses (`previous_response_id`), not shared with the fleet.
    responses: Arc<Store>,
}

fn completion_prompt(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) if !items.is_empty() => {
            let mut out = String::new();
            for it in items {
                match it {
                    Value::String(s) => out.push_str(s),
                    // Token ids: one token each, rendered as CHARS_PER_TOKEN characters.
                    Value::Number(n) => push_token_id(&mut out, n.as_u64().unwrap_or(0)),
                    _ => return None,
                }
            }
            Some(out)
        }
        _ => None,
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Api {
    Chat,
    Completions,
}

async fn chat_completions(State(st): State<AppState>, body: Bytes) -> Response {
    generate(st, body, Api::Chat).await
}

async fn completions(State(st): State<AppState>, body: Bytes) -> Response {
    generate(st, body, Api::Completions).await
}

async fn create_response(State(st): State<AppState>, body: Bytes) -> Response {
    responses::create(&st.server, &st.responses, &body).await
}

async fn generate(st: AppState, body: Bytes, api: Api) -> Response {
    let req = match parse_object(&body) {
        Ok(v) => v,
        Err(msg) => return error_response(StatusCode::BAD_REQUEST, &msg),
    };
    let prompt = match api {
        Api::Chat => match req.get("messages").and_then(Value::as_array) {
            Some(msgs) if !msgs.is_empty() => render_chat(msgs, request_tools(&req)),
            _ => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "'messages' must be a non-empty array",
                )
            }
        },
        Api::Completions => match req.get("prompt").and_then(completion_prompt) {
            Some(p) => p,
            None => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "'prompt' must be a string, an array of strings or token ids",
                )
            }
        },
    };
    let srv = &st.server;
    let max_tokens = req
        .get("max_completion_tokens")
        .and_then(Value::as_u64)
        .or_else(|| req.get("max_tokens").and_then(Value::as_u64))
        .map(|n| n as usize)
        .unwrap_or(srv.default_max_tokens);
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = req
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(&srv.model)
        .to_string();
    let (id, rx) = match srv.submit(prompt, max_tokens) {
        Ok(x) => x,
        Err(msg) => return error_response(StatusCode::BAD_REQUEST, &msg),
    };
    let (prefix, object, chunk_object) = match api {
        Api::Chat => ("chatcmpl", "chat.completion", "chat.completion.chunk"),
        Api::Completions => ("cmpl", "text_completion", "text_completion"),
    };
    let rid = format!("{prefix}-{}-{id}", srv.port);
    let created = unix_now();
    if stream {
        let fmt = ChunkFmt {
            api,
            rid,
            created,
            model,
            object: chunk_object,
            cache_report: srv.cache_report,
        };
        sse_response(rx, fmt, include_usage)
    } else {
        collect_response(rx, api, rid, created, model, object, srv.cache_report).await
    }
}

struct ChunkFmt {
    api: Api,
    rid: String,
    created: u64,
    model: String,
    object: &'static str,
    cache_report: CacheReport,
}

impl ChunkFmt {
    fn token(&self, text: &str, first: bool, finished: bool) -> String {
        let finish = if finished {
            json!("length")
        } else {
            Value::Null
        };
        let choice = match self.api {
            Api::Chat => {
                let delta = if first {
                    json!({"role": "assistant", "content": text})
                } else {
                    json!({"content": text})
                };
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Api::Completions => {
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
            }
        };
        json!({"id": self.rid, "object": self.object, "created": self.created, "model": self.model, "choices": [choice]}).to_string()
    }

    fn usage(&self, u: &Usage) -> String {
        json!({"id": self.rid, "object": self.object, "created": self.created, "model": self.model, "choices": [], "usage": usage_json(u, self.cache_report)}).to_string()
    }
}

/// An OpenAI `usage` object; `prompt_tokens_details` only when the server reports its cache.
fn usage_json(u: &Usage, cache_report: CacheReport) -> Value {
    let mut usage = json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    });
    if let Some(cached) = cache_report.cached_tokens(u) {
        usage["prompt_tokens_details"] = json!({"cached_tokens": cached});
    }
    usage
}

/// The chat or completions stream: a chunk per token (the role with the first), the usage
/// chunk when asked, then `[DONE]`.
fn sse_response(rx: mpsc::UnboundedReceiver<Ev>, fmt: ChunkFmt, include_usage: bool) -> Response {
    let data = |d: String| Event::default().data(d);
    let mut first = true;
    token_stream(rx, Vec::new(), fmt, move |fmt, text, finished, usage| {
        let mut events = vec![data(fmt.token(text, first, finished))];
        first = false;
        if finished {
            if include_usage {
                events.push(data(fmt.usage(usage)));
            }
            events.push(data("[DONE]".to_string()));
        }
        events
    })
}

async fn collect_response(
    mut rx: mpsc::UnboundedReceiver<Ev>,
    api: Api,
    rid: String,
    created: u64,
    model: String,
    object: &str,
    cache_report: CacheReport,
) -> Response {
    let Some((text, usage)) = collect_tokens(&mut rx).await else {
        return error_response(StatusCode::INTERNAL_SERVER_ERROR, "request aborted");
    };
    let choice = match api {
        Api::Chat => {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": "length"})
        }
        Api::Completions => {
            json!({"index": 0, "text": text, "logprobs": null, "finish_reason": "length"})
        }
    };
    Json(json!({"id": rid, "object": object, "created": created, "model": model, "choices": [choice], "usage": usage_json(&usage, cache_report)}))
        .into_response()
}

async fn sglang_generate(State(st): State<AppState>, body: Bytes) -> Response {
    super::generate::generate(&st.server, &body).await
}

async fn health() -> StatusCode {
    StatusCode::OK
}

async fn models(State(st): State<AppState>) -> Json<Value> {
    let s = &st.server;
    let max_len = s.lock().engine.config().max_model_len;
    Json(
        json!({"object": "list", "data": [{"id": s.model, "object": "model", "created": unix_now(), "owned_by": "llmproxy-sim", "root": s.model, "parent": null, "max_model_len": max_len}]}),
    )
}

async fn metrics(State(st): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.server.metrics(),
    )
        .into_response()
}

async fn get_load(State(st): State<AppState>) -> Json<Value> {
    let g = st.server.lock();
    let (r, w) = (g.engine.num_running(), g.engine.num_waiting());
    Json(
        json!([{"dp_rank": 0, "num_reqs": r + w, "num_waiting_reqs": w, "num_tokens": g.engine.tokens_in_flight()}]),
    )
}

async fn sim_stats(State(st): State<AppState>) -> Json<Value> {
    let servers: Vec<Value> = st.fleet.iter().map(|s| s.stats()).collect();
    let sum = |k: &str| {
        servers
            .iter()
            .map(|s| s[k].as_f64().unwrap_or(0.0))
            .sum::<f64>()
    };
    let (p, c) = (sum("prompt_tokens"), sum("cached_tokens"));
    let n = servers.len().max(1) as f64;
    Json(json!({
        "servers": servers,
        "totals": {
            "requests": sum("requests"),
            "finished": sum("finished"),
            "prompt_tokens": p,
            "cached_tokens": c,
            "hit_rate": ratio(c, p),
            "generation_tokens": sum("generation_tokens"),
            "utilization": sum("utilization") / n,
            "running": sum("running"),
            "waiting": sum("waiting"),
        }
    }))
}

async fn sim_reset(State(st): State<AppState>) -> Json<Value> {
    for s in st.fleet.iter() {
        s.reset();
    }
    Json(json!({"reset": st.fleet.len()}))
}

async fn flush_cache(State(st): State<AppState>) -> StatusCode {
    st.server.lock().engine.flush_cache();
    StatusCode::OK
}

async fn not_found(req: Request) -> Response {
    error_response(
        StatusCode::NOT_FOUND,
        &format!("no route for {} {}", req.method(), req.uri().path()),
    )
}

async fn served_by(State(name): State<HeaderValue>, mut resp: Response) -> Response {
    resp.headers_mut().insert("x-served-by", name);
    resp
}

pub(super) fn app(server: Arc<Server>, fleet: Arc<Vec<Arc<Server>>>) -> Router {
    let name =
        HeaderValue::from_str(&server.name).unwrap_or_else(|_| HeaderValue::from_static("sim"));
    let responses = Arc::new(Store::new(server.port));
    let st = AppState {
        server,
        fleet,
        responses,
    };
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/responses", post(create_response))
        .route("/generate", post(sglang_generate))
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route("/get_load", get(get_load))
        .route("/sim/stats", get(sim_stats))
        .route("/sim/reset", post(sim_reset))
        .route("/flush_cache", post(flush_cache))
        .route("/reset_prefix_cache", post(flush_cache))
        // Everything else (/get_model_info, /get_server_info, */render, /tokenize, ...) is a
        // fast 404, which both peer routers treat as "not supported".
        .fallback(not_found)
        .with_state(st)
        .layer(axum::middleware::map_response_with_state(name, served_by))
}
