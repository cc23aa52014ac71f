//! The OpenAI wire shapes every simulated API shares: error bodies, the JSON body check, the
//! clock of `created` fields, the chat template that turns messages into a prompt, and the
//! engine's tokens of one request turned into a whole answer or into a stream of events.

use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

use super::Ev;
use crate::engine::Usage;

/// Seconds since the Unix epoch.
pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// An OpenAI error body (`{"error": {"message", "type", "param", "code"}}`) with `status`.
pub(super) fn error_response(status: StatusCode, message: &str) -> Response {
    let kind = match status.as_u16() {
        400 => "BadRequestError",
        404 => "NotFoundError",
        _ => "InternalServerError",
    };
    (
        status,
        Json(json!({"error": {"message": message, "type": kind, "param": null, "code": status.as_u16()}})),
    )
        .into_response()
}

/// The chat template of the simulated model (ChatML-like). Multi-turn conversations render to
/// strings that extend the previous turn's rendering, as real templates do.
pub fn render_chat(messages: &[Value]) -> String {
    let mut out = String::new();
    for m in messages {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
        out.push_str("<|im_start|>");
        out.push_str(role);
        out.push('\n');
        match m.get("content") {
            Some(Value::String(s)) => out.push_str(s),
            Some(Value::Array(parts)) => {
                for p in parts {
                    match p.get("text").and_then(Value::as_str) {
                        Some(t) => out.push_str(t),
                        None => out.push_str("<|media|>"),
                    }
                }
            }
            _ => {}
        }
        out.push_str("<|im_end|>\n");
    }
    out.push_str("<|im_start|>assistant\n");
    out
}

/// Appends token id `id` to a prompt: one token, rendered as CHARS_PER_TOKEN digits (the
/// `/v1/completions` token-id prompts and `/generate`'s `input_ids`).
pub(super) fn push_token_id(out: &mut String, id: u64) {
    let _ = write!(out, "{:04}", id % 10_000);
}

/// The id of one generated token (CHARS_PER_TOKEN characters), for `/generate`'s `output_ids`:
/// a function of its text, below a Llama-3-sized vocabulary.
pub(super) fn token_id(token: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(token.as_bytes()) % 128_256
}

/// The request body as a JSON object, or why not (to answer with a 400).
pub(super) fn parse_object(body: &[u8]) -> Result<Value, String> {
    match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err("request body must be a JSON object".into()),
        Err(e) => Err(format!("invalid JSON body: {e}")),
    }
}

/// The whole answer of one request: its text and usage, once the engine finished it; None when
/// the engine ended the request early.
pub(super) async fn collect_tokens(
    rx: &mut mpsc::UnboundedReceiver<Ev>,
) -> Option<(String, Usage)> {
    let mut text = String::new();
    while let Some(Ev::Token {
        text: t,
        finished,
        usage,
    }) = rx.recv().await
    {
        text.push_str(&t);
        if finished {
            return Some((text, usage));
        }
    }
    None
}

/// A server-sent event stream of one request: the `first` events, then for every token the
/// engine sends the events `on_token(state, text, finished, usage)` makes of it; it ends after
/// the finished token (or if the engine dropped the request).
pub(super) fn token_stream<S, F>(
    rx: mpsc::UnboundedReceiver<Ev>,
    first: Vec<Event>,
    state: S,
    on_token: F,
) -> Response
where
    S: Send + 'static,
    F: FnMut(&mut S, &str, bool, &Usage) -> Vec<Event> + Send + 'static,
{
    struct Stream<S, F> {
        rx: mpsc::UnboundedReceiver<Ev>,
        pending: VecDeque<Event>,
        done: bool,
        state: S,
        on_token: F,
    }
    let st = Stream {
        rx,
        pending: first.into(),
        done: false,
        state,
        on_token,
    };
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(ev) = st.pending.pop_front() {
                return Some((Ok::<_, Infallible>(ev), st));
            }
            if st.done {
                return None;
            }
            match st.rx.recv().await {
                Some(Ev::Token {
                    text,
                    finished,
                    usage,
                }) => {
                    let events = (st.on_token)(&mut st.state, &text, finished, &usage);
                    st.pending.extend(events);
                    st.done = finished;
                }
                // The engine never drops a live subscriber; end the stream if it did.
                None => st.done = true,
            }
        }
    });
    Sse::new(stream).into_response()
}
