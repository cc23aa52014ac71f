//! The load generator's client of SGLang's native API (`--api generate` and `--api
//! generate-ids`, `POST /generate`): each turn's request body, and the answer's text, token ids
//! and token counts read from the cumulative events of a stream or from one JSON answer.
//!
//! `generate`: the conversation so far (system message, user messages, the replies as received)
//! is sent as one `text`, rendered with the simulated model's chat template ([`render_chat`],
//! ChatML-like, ending with the assistant's header): the same string `/v1/chat/completions`
//! makes of the same messages, so each turn's text extends the previous turn's text and reply
//! exactly, and the engine's prefix cache and a prefix-aware router see the shared prefix. A
//! session's tools (`--tools-field`) are rendered into the system turn of the text as the
//! server's template renders a chat request's `tools`.
//!
//! `generate-ids`: as RL rollout frameworks and agents that tokenize themselves do, every turn
//! sends `input_ids`: the previous turn's `input_ids`, the previous answer's `output_ids` as
//! received, then the ids of what the chat template adds for the new user message ([`push_turn`]:
//! its text packed 4 bytes per id by [`encode_ids`], the last id padded with spaces).

use super::Streamed;
use crate::server::{encode_ids, render_chat};
use serde_json::{json, Value};
use std::time::Instant;

/// The path of SGLang's native generation API.
pub const PATH: &str = "/generate";

/// The body of a `/generate` turn: `messages`, the conversation so far (system message first,
/// this turn's user message last), rendered as one `text` with the session's `tools` (chat
/// completions' shape, `--tools-field`) where the server's chat template puts them.
pub fn body(
    model: &str,
    messages: &[Value],
    tools: Option<&[Value]>,
    max_tokens: u64,
    stream: bool,
) -> Value {
    let text = render_chat(messages, tools);
    request(model, "text", text.into(), max_tokens, stream)
}

/// The body of a `/generate` turn of `--api generate-ids`: the conversation's `input_ids` (see
/// [`push_turn`]).
pub fn ids_body(model: &str, input_ids: &[u64], max_tokens: u64, stream: bool) -> Value {
    request(model, "input_ids", json!(input_ids), max_tokens, stream)
}

/// A `/generate` body with the prompt `prompt` in field `field` (`text` or `input_ids`).
fn request(model: &str, field: &str, prompt: Value, max_tokens: u64, stream: bool) -> Value {
    let mut body = json!({
        "model": model,
        "sampling_params": {"max_new_tokens": max_tokens},
        "stream": stream,
    });
    body[field] = prompt;
    body
}

/// Appends to a `--api generate-ids` conversation's ids (the previous turn's `input_ids`, then
/// its answer's `output_ids`; empty on the first turn) the ids of the new user message, the last
/// of `messages` (the conversation so far): on the first turn the chat template's text of all
/// of `messages` (system message and user message) and of the session's `tools`, on later turns the text the template puts
/// after the previous reply (`<|im_end|>` closing it, then the user message and the assistant's
/// header), packed by [`encode_ids`]. Before padding, the ids' text is the chat template's text
/// of the conversation with the replies as their ids.
pub fn push_turn(ids: &mut Vec<u64>, messages: &[Value], tools: Option<&[Value]>) {
    let text = if ids.is_empty() {
        render_chat(messages, tools)
    } else {
        let last = render_chat(&messages[messages.len() - 1..], None);
        format!("<|im_end|>\n{last}")
    };
    ids.extend(encode_ids(&text));
}

/// Reads one streamed event (`text` and `output_ids` are the whole answer so far): the first
/// token's time at the first non-empty text, the text, the token ids, and the counts of its
/// `meta_info` (the last event's are the answer's).
pub fn read_event(out: &mut Streamed, v: &Value) {
    let text = v["text"].as_str().unwrap_or("");
    if text.len() > out.content.len() {
        out.first_token.get_or_insert_with(Instant::now);
        out.chunks += 1;
    }
    if !text.is_empty() {
        out.content = text.to_string();
    }
    read_ids_and_meta(out, v);
}

/// Reads a whole answer: its text, token ids and the counts of its `meta_info`.
pub fn read_answer(out: &mut Streamed, v: &Value) -> Result<(), String> {
    match v["text"].as_str().filter(|t| !t.is_empty()) {
        Some(t) => out.content = t.to_string(),
        None => return Err("no text in answer".into()),
    }
    read_ids_and_meta(out, v);
    Ok(())
}

/// The `output_ids` (when the answer has them) and the token counts of its `meta_info`.
fn read_ids_and_meta(out: &mut Streamed, v: &Value) {
    if let Some(ids) = v["output_ids"].as_array() {
        out.output_ids = ids.iter().filter_map(Value::as_u64).collect();
    }
    let meta = &v["meta_info"];
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
        let b1 = body("m", &messages, None, 8, true);
        assert_eq!(
            (&b1["sampling_params"]["max_new_tokens"], &b1["stream"]),
            (&json!(8), &json!(true))
        );
        let t1 = b1["text"].as_str().unwrap().to_string();
        assert!(t1.starts_with("<|im_start|>system\nYou are terse."), "{t1}");
        let answer = " abc def ghi";
        messages.push(json!({"role": "assistant", "content": answer}));
        messages.push(json!({"role": "user", "content": "second question"}));
        let b2 = body("m", &messages, None, 4, false);
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
            &json!({"text": "ok", "output_ids": [5], "meta_info": meta(1, json!(null))}),
        )
        .unwrap();
        assert_eq!((out.content.as_str(), out.usage_cached), ("ok", Some(4)));
        assert_eq!(out.output_ids, [5]);
        assert!(read_answer(&mut Streamed::default(), &json!({"text": ""})).is_err());
    }

    #[test]
    fn each_turns_ids_extend_the_previous_ids_and_its_output_ids() {
        let mut messages = vec![
            json!({"role": "system", "content": "You are terse."}),
            json!({"role": "user", "content": "first question"}),
        ];
        let mut ids = Vec::new();
        push_turn(&mut ids, &messages, None);
        let b1 = ids_body("m", &ids, 8, true);
        assert_eq!(
            (&b1["sampling_params"]["max_new_tokens"], &b1["stream"]),
            (&json!(8), &json!(true))
        );
        assert!(b1.get("text").is_none(), "{b1}");
        let ids1: Vec<u64> = b1["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        // The first turn is the chat template's text packed 4 bytes per id.
        assert_eq!(ids1, encode_ids(&render_chat(&messages, None)));
        // The answer's ids, read from the last (cumulative) event, are resent as received.
        let mut out = Streamed::default();
        let meta = json!({"prompt_tokens": ids1.len(), "completion_tokens": 2});
        read_event(
            &mut out,
            &json!({"text": " ab", "output_ids": [7], "meta_info": meta}),
        );
        read_event(
            &mut out,
            &json!({"text": " ab cd", "output_ids": [7, 9], "meta_info": meta}),
        );
        assert_eq!(out.output_ids, [7, 9]);
        ids.extend(&out.output_ids);
        messages.push(json!({"role": "assistant", "content": out.content}));
        messages.push(json!({"role": "user", "content": "second question"}));
        push_turn(&mut ids, &messages, None);
        let b2 = ids_body("m", &ids, 4, false);
        let ids2: Vec<u64> = b2["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let prefix = [&ids1[..], &[7, 9]].concat();
        assert!(ids2.starts_with(&prefix), "{ids1:?}\n{ids2:?}");
        // Then the template's text after a reply: its end, the user message, the header.
        let next =
            "<|im_end|>\n<|im_start|>user\nsecond question<|im_end|>\n<|im_start|>assistant\n";
        assert_eq!(ids2[prefix.len()..], encode_ids(next)[..]);
        assert_eq!(b2["stream"], false);
    }
}
