//! The load generator's client of SGLang's native API (`--api generate`, `POST /generate`):
//! each turn's request body, and the answer's text and token counts read from the cumulative
//! events of a stream or from one JSON answer.
//!
//! The conversation so far (system message, user messages, the replies as received) is sent as
//! one `text`, rendered with the simulated model's chat template ([`render_chat`], ChatML-like,
//! ending with the assistant's header): the same string `/v1/chat/completions` makes of the same
//! messages, so each turn's text extends the previous turn's text and reply exactly, and the
//! engine's prefix cache and a prefix-aware router see the shared prefix.

use super::Streamed;
use crate::server::render_chat;
use serde_json::{json, Value};
use std::time::Instant;

/// The path of SGLang's native generation API.
pub const PATH: &str = "/generate";

/// The body of a `/generate` turn: `messages`, the conversation so far (system message first,
/// this turn's user message last), rendered as one `text`.
pub fn body(model: &str, messages: &[Value], max_tokens: u64, stream: bool) -> Value {
    json!({
        "model": model,
        "text": render_chat(messages),
        "sampling_params": {"max_new_tokens": max_tokens},
        "stream": stream,
    })
}

/// Reads one streamed event (`text` is the whole text so far): the first token's time at the
/// first non-empty text, the text, and the counts of its `meta_info` (the last event's are the
/// answer's).
pub fn read_event(out: &mut Streamed, v: &Value) {
    let text = v["text"].as_str().unwrap_or("");
    if text.len() > out.content.len() {
        out.first_token.get_or_insert_with(Instant::now);
        out.chunks += 1;
    }
    if !text.is_empty() {
        out.content = text.to_string();
    }
    read_meta(out, &v["meta_info"]);
}

/// Reads a whole answer: its text and the counts of its `meta_info`.
pub fn read_answer(out: &mut Streamed, v: &Value) -> Result<(), String> {
    match v["text"].as_str().filter(|t| !t.is_empty()) {
        Some(t) => out.content = t.to_string(),
        None => return Err("no text in answer".into()),
    }
    read_meta(out, &v["meta_info"]);
    Ok(())
}

/// The token counts of a `meta_info`.
fn read_meta(out: &mut Streamed, meta: &Value) {
    out.usage_prompt = meta["prompt_tokens"].as_u64();
    out.usage_completion = meta["completion_tokens"].as_u64();
    out.usage_cached = meta["cached_tokens"].as_u64();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_turns_text_extends_the_previous_text_and_its_answer() {
        let mut messages = vec![
            json!({"role": "system", "content": "You are terse."}),
            json!({"role": "user", "content": "first question"}),
        ];
        let b1 = body("m", &messages, 8, true);
        assert_eq!(
            (&b1["sampling_params"]["max_new_tokens"], &b1["stream"]),
            (&json!(8), &json!(true))
        );
        let t1 = b1["text"].as_str().unwrap().to_string();
        assert!(t1.starts_with("<|im_start|>system\nYou are terse."), "{t1}");
        let answer = " abc def ghi";
        messages.push(json!({"role": "assistant", "content": answer}));
        messages.push(json!({"role": "user", "content": "second question"}));
        let b2 = body("m", &messages, 4, false);
        let t2 = b2["text"].as_str().unwrap();
        assert!(t2.starts_with(&format!("{t1}{answer}")), "{t1:?}\n{t2:?}");
        assert!(t2.contains("second question") && t2.len() > t1.len() + answer.len());
        assert_eq!(b2["stream"], false);
    }

    #[test]
    fn cumulative_events_and_answers_give_text_and_counts() {
        let mut out = Streamed::default();
        let meta = |n: u64, finish: Value| json!({"prompt_tokens": 10, "completion_tokens": n, "cached_tokens": 4, "finish_reason": finish});
        read_event(
            &mut out,
            &json!({"text": " ab", "meta_info": meta(1, Value::Null)}),
        );
        let first = out.first_token;
        assert!(first.is_some());
        read_event(
            &mut out,
            &json!({"text": " ab cd", "meta_info": meta(2, json!({"type": "length"}))}),
        );
        assert_eq!(out.first_token, first);
        assert_eq!((out.content.as_str(), out.chunks), (" ab cd", 2));
        assert_eq!(
            (out.usage_prompt, out.usage_completion, out.usage_cached),
            (Some(10), Some(2), Some(4))
        );
        let mut out = Streamed::default();
        read_answer(
            &mut out,
            &json!({"text": "ok", "meta_info": meta(1, json!(null))}),
        )
        .unwrap();
        assert_eq!((out.content.as_str(), out.usage_cached), ("ok", Some(4)));
        assert!(read_answer(&mut Streamed::default(), &json!({"text": ""})).is_err());
    }
}
