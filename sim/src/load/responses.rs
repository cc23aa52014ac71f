//! The load generator's Responses API clients (`--api responses`, `--api responses-chained`):
//! each turn's request body, and the answer's text, usage and id read from the typed events of
//! a stream or from a response object.
//!
//! `responses` resends the whole conversation as input items each turn (`store: false`, as
//! Codex-style agents do); `responses-chained` sends only the new user message and names the
//! previous answer (`previous_response_id`): the engine that stored it prepends the
//! conversation, and any other engine answers 404. Agent sessions under `--tools-field` send
//! their `tools` (the Responses shape) on every turn, chained ones included.

use super::Streamed;
use serde_json::{json, Value};
use std::time::Instant;

/// Which API the sessions speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Api {
    /// `/v1/chat/completions` (the `--path`), the whole conversation every turn.
    Chat,
    /// `/v1/responses`, the whole conversation as input items every turn (`store: false`).
    Responses,
    /// `/v1/responses`, the new message only, naming the previous answer.
    ResponsesChained,
    /// SGLang's native `/generate`, the whole conversation rendered as one `text` every turn
    /// (in [`super::generate`]).
    Generate,
    /// SGLang's native `/generate` with `input_ids`: the previous turn's ids, its answer's
    /// `output_ids`, then the new user message's ids, every turn (in [`super::generate`]).
    GenerateIds,
}

/// The path of the Responses API.
pub const PATH: &str = "/v1/responses";

/// The body of a Responses turn. `conversation`: the messages so far, this turn's user message
/// last, without the system message (`instructions` here, sent every turn: the previous
/// answer's instructions are not carried over); `previous`: the previous answer's id.
pub fn body(
    api: Api,
    model: &str,
    instructions: Option<&str>,
    conversation: &[Value],
    previous: Option<&str>,
    max_tokens: u64,
    stream: bool,
) -> Value {
    let mut body = json!({
        "model": model,
        "max_output_tokens": max_tokens,
        "stream": stream,
    });
    if let Some(i) = instructions {
        body["instructions"] = i.into();
    }
    match api {
        Api::ResponsesChained => {
            let last = conversation.last().cloned().unwrap_or(Value::Null);
            body["input"] = json!([last]);
            if let Some(id) = previous {
                body["previous_response_id"] = id.into();
            }
        }
        Api::Responses | Api::Chat | Api::Generate | Api::GenerateIds => {
            body["input"] = Value::Array(conversation.to_vec());
            body["store"] = false.into();
        }
    }
    body
}

/// Reads one streamed event; true at the end (`response.completed` or `.incomplete`).
pub fn read_event(out: &mut Streamed, v: &Value) -> Result<bool, String> {
    match v["type"].as_str().unwrap_or("") {
        "response.created" => {
            out.response_id = v
                .pointer("/response/id")
                .and_then(Value::as_str)
                .map(str::to_string);
        }
        "response.output_text.delta" => {
            let delta = v["delta"].as_str().unwrap_or("");
            if !delta.is_empty() {
                out.first_token.get_or_insert_with(Instant::now);
                out.chunks += 1;
                out.content.push_str(delta);
            }
        }
        "response.completed" | "response.incomplete" => {
            read_usage(out, &v["response"]);
            return Ok(true);
        }
        "error" | "response.failed" => return Err(format!("error event: {v}")),
        _ => {}
    }
    Ok(false)
}

/// Reads a whole answer (a response object): its text, id and usage.
pub fn read_answer(out: &mut Streamed, v: &Value) -> Result<(), String> {
    out.response_id = v["id"].as_str().map(str::to_string);
    let items = v["output"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    for item in items.iter().filter(|i| i["type"] == "message") {
        for part in item["content"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            out.content.push_str(part["text"].as_str().unwrap_or(""));
        }
    }
    if out.content.is_empty() {
        return Err("no output text in answer".into());
    }
    read_usage(out, v);
    Ok(())
}

/// The token counts of a response object's `usage`, in the Responses API's names.
fn read_usage(out: &mut Streamed, response: &Value) {
    if let Some(u) = response.get("usage").filter(|u| u.is_object()) {
        out.usage_prompt = u["input_tokens"].as_u64();
        out.usage_completion = u["output_tokens"].as_u64();
        out.usage_cached = u
            .pointer("/input_tokens_details/cached_tokens")
            .and_then(Value::as_u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chained_turns_send_the_new_message_and_name_the_previous_answer() {
        let conv = [
            json!({"role": "user", "content": "a"}),
            json!({"role": "assistant", "content": "b"}),
            json!({"role": "user", "content": "c"}),
        ];
        let b = body(
            Api::ResponsesChained,
            "m",
            Some("sys"),
            &conv,
            Some("resp_1"),
            8,
            true,
        );
        assert_eq!(b["input"], json!([{"role": "user", "content": "c"}]));
        assert_eq!(
            (
                b["previous_response_id"].as_str(),
                b["instructions"].as_str()
            ),
            (Some("resp_1"), Some("sys"))
        );
        let b = body(Api::Responses, "m", None, &conv, Some("resp_1"), 8, false);
        assert_eq!(b["input"].as_array().unwrap().len(), 3);
        assert_eq!(
            (b.get("previous_response_id"), &b["store"]),
            (None, &json!(false))
        );
    }

    #[test]
    fn events_and_answers_give_text_usage_and_id() {
        let mut out = Streamed::default();
        let usage = json!({"input_tokens": 10, "output_tokens": 2, "input_tokens_details": {"cached_tokens": 4}});
        assert!(!read_event(
            &mut out,
            &json!({"type": "response.created", "response": {"id": "resp_9"}})
        )
        .unwrap());
        assert!(!read_event(
            &mut out,
            &json!({"type": "response.output_text.delta", "delta": "hi "})
        )
        .unwrap());
        assert!(read_event(
            &mut out,
            &json!({"type": "response.completed", "response": {"usage": usage}})
        )
        .unwrap());
        assert_eq!(
            (out.content.as_str(), out.response_id.as_deref(), out.chunks),
            ("hi ", Some("resp_9"), 1)
        );
        assert_eq!(
            (out.usage_prompt, out.usage_completion, out.usage_cached),
            (Some(10), Some(2), Some(4))
        );
        assert!(read_event(&mut out, &json!({"type": "error", "message": "x"})).is_err());
        let mut out = Streamed::default();
        let answer = json!({"id": "resp_2", "output": [{"type": "reasoning"},
            {"type": "message", "content": [{"type": "output_text", "text": "ok"}]}], "usage": usage});
        read_answer(&mut out, &answer).unwrap();
        assert_eq!(
            (
                out.content.as_str(),
                out.response_id.as_deref(),
                out.usage_cached
            ),
            ("ok", Some("resp_2"), Some(4))
        );
    }
}
