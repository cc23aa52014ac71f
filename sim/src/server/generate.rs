//! SGLang's native API of one simulated server (`POST /generate`, a `GenerateReqInput`): the
//! prompt is `text` as is, or `input_ids` rendered as `/v1/completions` renders token ids, so it
//! takes the engine path of a completion of the same prompt string (prefix cache, timing,
//! usage). The answer is `{"text", "output_ids", "meta_info"}` (JSON), or with `stream: true`
//! one SSE event of that shape per token carrying the **whole text so far** (SGLang's default,
//! cumulative), then `data: [DONE]`. `model` is ignored; a batch (`text` or `input_ids` an array
//! of prompts) is a 400.
//!
//! `output_ids` pack each generated token's 4 ASCII characters into its id ([`token_id`]), and
//! `input_ids` render such ids back as those characters ([`push_token_id`]): a rollout that
//! resends `input_ids + output_ids + new ids` sends the prompt string of the previous turn
//! followed by the generated text, so the prefix cache hits on both, as for a resent `text`.

use super::wire::{
    collect_tokens, encode_ids, error_response, parse_object, push_token_id, token_id, token_stream,
};
use super::{CacheReport, Server};
use crate::engine::{Usage, CHARS_PER_TOKEN};
use axum::http::StatusCode;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::time::Instant;

/// The prompt of a request: `text` (a string), else `input_ids` (token ids); or why not.
fn prompt(req: &Value) -> Result<String, &'static str> {
    const BATCH: &str = "batch /generate is not simulated";
    match (req.get("text"), req.get("input_ids")) {
        (Some(Value::String(s)), _) => Ok(s.clone()),
        (Some(Value::Array(_)), _) => Err(BATCH),
        (Some(v), _) if !v.is_null() => Err("'text' must be a string"),
        (_, Some(Value::Array(ids))) if !ids.is_empty() => {
            let mut out = String::with_capacity(ids.len() * CHARS_PER_TOKEN);
            for id in ids {
                match id {
                    Value::Number(n) => push_token_id(&mut out, n.as_u64().unwrap_or(0)),
                    Value::Array(_) => return Err(BATCH),
                    _ => return Err("'input_ids' must be an array of token ids"),
                }
            }
            Ok(out)
        }
        (_, Some(v)) if !v.is_null() => Err("'input_ids' must be a non-empty array of token ids"),
        _ => Err("either 'text' or 'input_ids' is required"),
    }
}

/// What every answer of one request says besides its text.
struct Meta {
    id: String,
    start: Instant,
    cache_report: CacheReport,
}

impl Meta {
    /// The answer (or a stream event) after `text`, whose tokens are `output_ids`; `usage` so
    /// far; `finished` gives the `finish_reason` (always `length`: generation runs to
    /// `max_new_tokens`).
    fn answer(&self, text: &str, output_ids: &[u64], usage: &Usage, finished: bool) -> Value {
        let finish = if finished {
            json!({"type": "length", "length": usage.completion_tokens})
        } else {
            Value::Null
        };
        let mut meta = json!({
            "id": self.id,
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "finish_reason": finish,
            "e2e_latency": self.start.elapsed().as_secs_f64(),
        });
        // As `prompt_tokens_details.cached_tokens` in the OpenAI APIs: left out under
        // `--no-cache-report`, 0 under `--cache-report-zeros`.
        if let Some(cached) = self.cache_report.cached_tokens(usage) {
            meta["cached_tokens"] = cached.into();
        }
        json!({"text": text, "output_ids": output_ids, "meta_info": meta})
    }
}

/// `POST /generate` on `srv`.
pub(super) async fn generate(srv: &Server, body: &[u8]) -> Response {
    let start = Instant::now();
    let bad = |msg: &str| error_response(StatusCode::BAD_REQUEST, msg);
    let req = match parse_object(body) {
        Ok(v) => v,
        Err(msg) => return bad(&msg),
    };
    let prompt = match prompt(&req) {
        Ok(p) => p,
        Err(msg) => return bad(msg),
    };
    let max_new_tokens = req
        .pointer("/sampling_params/max_new_tokens")
        .and_then(Value::as_u64)
        .map(|n| n as usize)
        .unwrap_or(srv.default_max_tokens);
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let (id, mut rx) = match srv.submit(prompt, max_new_tokens) {
        Ok(x) => x,
        Err(msg) => return bad(&msg),
    };
    let meta = Meta {
        id: format!("gen-{}-{id}", srv.port),
        start,
        cache_report: srv.cache_report,
    };
    if !stream {
        let Some((text, usage)) = collect_tokens(&mut rx).await else {
            return error_response(StatusCode::INTERNAL_SERVER_ERROR, "request aborted");
        };
        let ids = encode_ids(&text);
        return Json(meta.answer(&text, &ids, &usage, true)).into_response();
    }
    let state = (meta, String::new(), Vec::new());
    token_stream(rx, Vec::new(), state, |st, token, finished, usage| {
        let (meta, text, ids) = st;
        text.push_str(token);
        ids.push(token_id(token.as_bytes()));
        let answer = meta.answer(text, ids, usage, finished);
        let mut events = vec![Event::default().data(answer.to_string())];
        if finished {
            events.push(Event::default().data("[DONE]"));
        }
        events
    })
}
