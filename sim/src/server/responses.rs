//! The OpenAI Responses API of one simulated server (`POST /v1/responses`), shaped as vLLM
//! answers it: the request's `instructions` and `input` items become chat messages rendered with
//! [`render_chat`] with the request's `tools` (as received, in the system turn), so a
//! conversation continued turn after turn extends its previous prompt and finds it in the
//! engine's prefix cache; the answer is a `response` object (JSON) or the
//! Responses SSE events (`response.created` … `response.completed`, no `[DONE]`).
//!
//! This module owns the server's stored responses ([`Store`]): as in vLLM and SGLang they live in
//! the memory of the server that produced them, so a `previous_response_id` is only known to
//! that server (404 elsewhere in the fleet).

use super::wire::{
    collect_tokens, error_response, parse_object, render_chat, token_stream, unix_now,
};
use super::{CacheReport, Ev, Server};
use crate::engine::Usage;
use axum::http::StatusCode;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// Stored responses kept per server; the oldest are dropped beyond this.
const MAX_STORED: usize = 10_000;

/// The conversation of one stored response: the messages it added (its input and its output,
/// not its instructions) after those of the response it continued. Responses continuing the
/// same one share its part of the conversation.
struct Turn {
    prev: Option<Arc<Turn>>,
    messages: Vec<Value>,
}

impl Turn {
    /// The whole conversation, oldest message first.
    fn conversation(&self) -> Vec<Value> {
        let mut chain = vec![self];
        while let Some(p) = chain.last().and_then(|t| t.prev.as_deref()) {
            chain.push(p);
        }
        chain
            .iter()
            .rev()
            .flat_map(|t| t.messages.iter().cloned())
            .collect()
    }
}

impl Drop for Turn {
    /// Unlinks a long chain iteratively (the default drop would recurse once per turn).
    fn drop(&mut self) {
        let mut next = self.prev.take();
        while let Some(t) = next {
            next = match Arc::try_unwrap(t) {
                Ok(mut t) => t.prev.take(),
                Err(_) => None,
            };
        }
    }
}

/// One server's stored responses, by id, at most `capacity` of them (oldest dropped first).
pub(super) struct Store {
    port: u16,
    capacity: usize,
    next: AtomicU64,
    inner: Mutex<StoreInner>,
}

#[derive(Default)]
struct StoreInner {
    by_id: HashMap<String, Arc<Turn>>,
    order: VecDeque<String>,
}

impl Store {
    /// The empty store of the server listening on `port` (its ids include the port).
    pub(super) fn new(port: u16) -> Self {
        Self::with_capacity(port, MAX_STORED)
    }

    fn with_capacity(port: u16, capacity: usize) -> Self {
        Store {
            port,
            capacity: capacity.max(1),
            next: AtomicU64::new(1),
            inner: Mutex::new(StoreInner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StoreInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh (response id, message id) pair: `resp_<port>_<n>`, `msg_<port>_<n>`.
    fn next_ids(&self) -> (String, String) {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        (
            format!("resp_{}_{n}", self.port),
            format!("msg_{}_{n}", self.port),
        )
    }

    fn get(&self, id: &str) -> Option<Arc<Turn>> {
        self.lock().by_id.get(id).cloned()
    }

    fn put(&self, id: String, turn: Arc<Turn>) {
        let mut g = self.lock();
        if g.by_id.insert(id.clone(), turn).is_none() {
            g.order.push_back(id);
        }
        while g.order.len() > self.capacity {
            if let Some(old) = g.order.pop_front() {
                g.by_id.remove(&old);
            }
        }
    }
}

/// The text of a content part; images, files and other non-text parts are `<|media|>`, as in
/// [`render_chat`].
fn part_text(p: &Value) -> &str {
    let typ = p.get("type").and_then(Value::as_str);
    match (typ, p.get("text").and_then(Value::as_str)) {
        (None | Some("input_text" | "output_text" | "text"), Some(t)) => t,
        _ => "<|media|>",
    }
}

/// A message content (a string, or an array of parts) as one string; None when neither.
fn content_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => Some(parts.iter().map(part_text).collect()),
        _ => None,
    }
}

/// The chat messages (`{role, content}`) of a request's `input`: a string is one user message;
/// in an array, `message` items keep their role, a `function_call` becomes an assistant message
/// `name(arguments)`, a `function_call_output` a `tool` message, and other items (`reasoning`,
/// `item_reference`, ...) are skipped. None when `input` is neither a string nor an array.
fn input_messages(input: &Value) -> Option<Vec<Value>> {
    let items = match input {
        Value::String(s) => return Some(vec![json!({"role": "user", "content": s})]),
        Value::Array(items) => items,
        _ => return None,
    };
    let mut out = Vec::new();
    for it in items {
        let typ = it.get("type").and_then(Value::as_str);
        match typ {
            None | Some("message") => {
                let Some(content) = it.get("content").and_then(content_text) else {
                    continue;
                };
                let role = it.get("role").and_then(Value::as_str).unwrap_or("user");
                out.push(json!({"role": role, "content": content}));
            }
            Some("function_call") => {
                let name = it.get("name").and_then(Value::as_str).unwrap_or("");
                let args = match it.get("arguments") {
                    Some(Value::String(s)) => s.clone(),
                    Some(v) => v.to_string(),
                    None => String::new(),
                };
                out.push(json!({"role": "assistant", "content": format!("{name}({args})")}));
            }
            Some("function_call_output") => {
                let output = match it.get("output") {
                    Some(v) => content_text(v).unwrap_or_else(|| v.to_string()),
                    None => String::new(),
                };
                out.push(json!({"role": "tool", "content": output}));
            }
            Some(_) => {}
        }
    }
    Some(out)
}

/// 404 for a `previous_response_id` this server does not hold, in vLLM's words.
fn unknown_response(id: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": {
            "message": format!("Response with id '{id}' not found."),
            "type": "invalid_request_error",
            "param": "previous_response_id",
            "code": 404,
        }})),
    )
        .into_response()
}

/// What a finished response leaves in the store: this turn's messages after `prev`.
struct Save {
    store: Arc<Store>,
    prev: Option<Arc<Turn>>,
    input: Vec<Value>,
}

impl Save {
    fn save(self, id: &str, text: &str) {
        let mut messages = self.input;
        messages.push(json!({"role": "assistant", "content": text}));
        let turn = Arc::new(Turn {
            prev: self.prev,
            messages,
        });
        self.store.put(id.to_string(), turn);
    }
}

/// The fields of the `response` object that do not change while it is generated.
struct Meta {
    id: String,
    msg_id: String,
    created_at: u64,
    model: String,
    instructions: Option<String>,
    max_output_tokens: usize,
    previous_response_id: Option<String>,
    store: bool,
    cache_report: CacheReport,
}

impl Meta {
    /// The `response` object: `output` and `usage` as given.
    fn response(&self, status: &str, output: Value, usage: Value) -> Value {
        json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "model": self.model,
            "status": status,
            "error": null,
            "incomplete_details": null,
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "output": output,
            "parallel_tool_calls": true,
            "previous_response_id": self.previous_response_id,
            "store": self.store,
            "tool_choice": "auto",
            "tools": [],
            "usage": usage,
        })
    }

    /// The assistant message output item; its one `output_text` part when `text` is given.
    fn message(&self, status: &str, text: Option<&str>) -> Value {
        let content = match text {
            Some(t) => json!([output_text(t)]),
            None => json!([]),
        };
        json!({"type": "message", "id": self.msg_id, "role": "assistant", "status": status, "content": content})
    }

    /// The address of the one text part: `item_id`, `output_index`, `content_index`.
    fn part_ref(&self) -> Value {
        json!({"item_id": self.msg_id, "output_index": 0, "content_index": 0})
    }

    /// The finished `response` object.
    fn completed(&self, text: &str, usage: &Usage) -> Value {
        let output = json!([self.message("completed", Some(text))]);
        self.response("completed", output, usage_json(usage, self.cache_report))
    }
}

fn output_text(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": []})
}

/// A Responses `usage` object; `input_tokens_details` only when the server reports its cache.
fn usage_json(u: &Usage, cache_report: CacheReport) -> Value {
    let mut usage = json!({
        "input_tokens": u.prompt_tokens,
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    });
    if let Some(cached) = cache_report.cached_tokens(u) {
        usage["input_tokens_details"] = json!({"cached_tokens": cached});
    }
    usage
}

/// `POST /v1/responses` on `srv`, continuing and storing conversations in `store`.
pub(super) async fn create(srv: &Arc<Server>, store: &Arc<Store>, body: &[u8]) -> Response {
    let bad = |msg: &str| error_response(StatusCode::BAD_REQUEST, msg);
    let req = match parse_object(body) {
        Ok(v) => v,
        Err(msg) => return bad(&msg),
    };
    let input = match req.get("input").map(input_messages) {
        None => return bad("'input' is required"),
        Some(None) => return bad("'input' must be a string or an array of input items"),
        Some(Some(m)) if m.is_empty() => return bad("'input' has no message to answer"),
        Some(Some(m)) => m,
    };
    let instructions = match req.get("instructions") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return bad("'instructions' must be a string"),
    };
    let previous_response_id = match req.get("previous_response_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return bad("'previous_response_id' must be a string"),
    };
    let prev = match &previous_response_id {
        Some(id) => match store.get(id) {
            Some(t) => Some(t),
            None => return unknown_response(id),
        },
        None => None,
    };
    // This request's instructions first (the previous ones are not carried over), then the
    // stored conversation, then this turn's input.
    let mut messages = Vec::new();
    if let Some(s) = &instructions {
        messages.push(json!({"role": "system", "content": s}));
    }
    if let Some(p) = &prev {
        messages.extend(p.conversation());
    }
    messages.extend(input.iter().cloned());
    let max_output_tokens = req
        .get("max_output_tokens")
        .and_then(Value::as_u64)
        .map(|n| n as usize)
        .unwrap_or(srv.default_max_tokens);
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let keep = req.get("store").and_then(Value::as_bool).unwrap_or(true);
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(&srv.model)
        .to_string();
    // This request's tools render (a stored response's are not carried over either).
    let tools = req
        .get("tools")
        .and_then(Value::as_array)
        .map(Vec::as_slice);
    let (_, rx) = match srv.submit(render_chat(&messages, tools), max_output_tokens) {
        Ok(x) => x,
        Err(msg) => return bad(&msg),
    };
    let (id, msg_id) = store.next_ids();
    let meta = Meta {
        id,
        msg_id,
        created_at: unix_now(),
        model,
        instructions,
        max_output_tokens,
        previous_response_id,
        store: keep,
        cache_report: srv.cache_report,
    };
    let save = keep.then(|| Save {
        store: store.clone(),
        prev,
        input,
    });
    if stream {
        stream_response(rx, meta, save)
    } else {
        collect_response(rx, meta, save).await
    }
}

/// The whole answer as one `response` object (500 if the engine ends the request early).
async fn collect_response(
    mut rx: mpsc::UnboundedReceiver<Ev>,
    meta: Meta,
    save: Option<Save>,
) -> Response {
    let Some((text, usage)) = collect_tokens(&mut rx).await else {
        return error_response(StatusCode::INTERNAL_SERVER_ERROR, "request aborted");
    };
    if let Some(s) = save {
        s.save(&meta.id, &text);
    }
    Json(meta.completed(&text, &usage)).into_response()
}

struct StreamState {
    meta: Meta,
    save: Option<Save>,
    text: String,
    seq: u64,
    /// Events made and not yet handed to the stream.
    out: Vec<Event>,
}

impl StreamState {
    /// Queues event `kind` with `data`, adding its `type` and `sequence_number`.
    fn push(&mut self, kind: &'static str, mut data: Value) {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.seq);
        self.seq += 1;
        self.out
            .push(Event::default().event(kind).data(data.to_string()));
    }

    /// The events of the last token: the text, its part, its item and the response completed;
    /// then the conversation is stored.
    fn finish(&mut self, usage: &Usage) {
        let mut done = self.meta.part_ref();
        done["text"] = json!(self.text);
        done["logprobs"] = json!([]);
        self.push("response.output_text.done", done);
        let mut part = self.meta.part_ref();
        part["part"] = output_text(&self.text);
        self.push("response.content_part.done", part);
        let message = self.meta.message("completed", Some(&self.text));
        self.push(
            "response.output_item.done",
            json!({"output_index": 0, "item": message}),
        );
        let response = self.meta.completed(&self.text, usage);
        self.push("response.completed", json!({"response": response}));
        if let Some(s) = self.save.take() {
            s.save(&self.meta.id, &self.text);
        }
    }
}

/// The Responses SSE events: created, in_progress, the message item and its part added, one
/// `response.output_text.delta` per token, then [`StreamState::finish`]'s. No `[DONE]`.
fn stream_response(rx: mpsc::UnboundedReceiver<Ev>, meta: Meta, save: Option<Save>) -> Response {
    let mut st = StreamState {
        meta,
        save,
        text: String::new(),
        seq: 0,
        out: Vec::new(),
    };
    let start = st.meta.response("in_progress", json!([]), Value::Null);
    st.push("response.created", json!({"response": start.clone()}));
    st.push("response.in_progress", json!({"response": start}));
    let item = st.meta.message("in_progress", None);
    st.push(
        "response.output_item.added",
        json!({"output_index": 0, "item": item}),
    );
    let mut part = st.meta.part_ref();
    part["part"] = output_text("");
    st.push("response.content_part.added", part);
    let first = std::mem::take(&mut st.out);
    token_stream(rx, first, st, |st, text, finished, usage| {
        st.text.push_str(text);
        let mut delta = st.meta.part_ref();
        delta["delta"] = json!(text);
        delta["logprobs"] = json!([]);
        st.push("response.output_text.delta", delta);
        if finished {
            st.finish(usage);
        }
        std::mem::take(&mut st.out)
    })
}

#[cfg(test)]
mod tests;
