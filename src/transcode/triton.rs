//! Triton Inference Server (TensorRT-LLM backend), HTTP generate extension.
//!
//! Request: an OpenAI chat or completions body becomes
//! `POST /v2/models/{model}/generate` (or `generate_stream`) with
//! `{"text_input", "max_tokens", "stream", "temperature", "top_p", "top_k", "stop_words",
//! "random_seed", "presence_penalty", "frequency_penalty", "exclude_input_in_output": true}`
//! (top-level fields are handed to the model's input tensors by Triton).
//!
//! Response: `{"model_name", "model_version", "text_output"}` (one object, or one SSE `data:`
//! event per piece when streaming), or `{"error": "..."}` — also mid-stream. They become
//! OpenAI `chat.completion` / `text_completion` objects and SSE chunks ending with
//! `data: [DONE]`, whatever way the bytes are split across network chunks.

use serde_json::{json, Map, Value};

use super::templates::ChatTemplate;
use crate::error::PickError;
use crate::request::RequestKind;

/// Default `max_tokens` when the client gives none (Triton's TensorRT-LLM ensemble requires it).
pub const DEFAULT_MAX_TOKENS: u64 = 256;

/// Builds the Triton generate path and body from an OpenAI request body.
pub fn build_request(
    body: &[u8],
    kind: RequestKind,
    upstream_model: &str,
    template: ChatTemplate,
    stream: bool,
) -> Result<(String, Vec<u8>), PickError> {
    if matches!(
        kind,
        RequestKind::Responses
            | RequestKind::Messages
            | RequestKind::Generate
            | RequestKind::LlamaCompletion
    ) {
        return Err(PickError::bad_request(
            "the Responses API (/v1/responses), the Messages API (/v1/messages), SGLang's /generate and llama.cpp's /completion are not served by a triton backend: use /v1/chat/completions",
            None,
        ));
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| PickError::bad_request(format!("invalid JSON body: {e}"), None))?;
    let text_input = match kind {
        RequestKind::Chat => {
            let messages = v.get("messages").and_then(Value::as_array).ok_or_else(|| {
                PickError::bad_request("messages must be an array", Some("messages"))
            })?;
            let rendered: Vec<(&str, String)> = messages
                .iter()
                .map(|m| {
                    let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
                    (role, content_text(m.get("content")))
                })
                .collect();
            template.render(rendered)
        }
        RequestKind::Completions
        | RequestKind::Responses
        | RequestKind::Messages
        | RequestKind::Generate
        | RequestKind::LlamaCompletion => match v.get("prompt") {
            Some(Value::String(p)) => p.clone(),
            Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
                a[0].as_str().unwrap_or_default().to_string()
            }
            _ => {
                return Err(PickError::bad_request(
                    "the triton backend takes exactly one prompt string",
                    Some("prompt"),
                ))
            }
        },
    };
    let mut out = Map::new();
    out.insert("text_input".into(), Value::String(text_input));
    let max_tokens = v
        .get("max_completion_tokens")
        .or_else(|| v.get("max_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(DEFAULT_MAX_TOKENS);
    out.insert("max_tokens".into(), json!(max_tokens));
    out.insert("stream".into(), json!(stream));
    out.insert("exclude_input_in_output".into(), json!(true));
    for (from, to) in [
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("top_k", "top_k"),
        ("seed", "random_seed"),
        ("presence_penalty", "presence_penalty"),
        ("frequency_penalty", "frequency_penalty"),
    ] {
        if let Some(x) = v.get(from).filter(|x| x.is_number()) {
            out.insert(to.into(), x.clone());
        }
    }
    match v.get("stop") {
        Some(Value::String(s)) => {
            out.insert("stop_words".into(), json!([s]));
        }
        Some(Value::Array(a)) if !a.is_empty() => {
            out.insert("stop_words".into(), Value::Array(a.clone()));
        }
        _ => {}
    }
    let verb = if stream {
        "generate_stream"
    } else {
        "generate"
    };
    let path = format!(
        "/v2/models/{}/{verb}",
        crate::background::client::url_encode(upstream_model)
    );
    Ok((
        path,
        serde_json::to_vec(&Value::Object(out)).unwrap_or_default(),
    ))
}

/// Text of an OpenAI message `content`: the string, or its text parts joined by `\n`.
fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter(|p| {
                p.get("type")
                    .and_then(Value::as_str)
                    .is_none_or(|t| t == "text")
            })
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// One Triton response object, interpreted.
pub enum Piece {
    /// Generated text.
    Text(String),
    /// An error reported by Triton.
    Error(String),
}

/// Interprets one Triton JSON object.
pub fn parse_piece(bytes: &[u8]) -> Piece {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(v) => {
            if let Some(e) = v.get("error") {
                let msg = e
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| e.to_string());
                return Piece::Error(msg);
            }
            match v.get("text_output") {
                Some(Value::String(t)) => Piece::Text(t.clone()),
                Some(Value::Array(a)) => Piece::Text(
                    a.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .concat(),
                ),
                _ => Piece::Error("triton response has no text_output".into()),
            }
        }
        Err(e) => Piece::Error(format!("malformed triton response: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_request_becomes_generate_stream() {
        let body = br#"{"model":"m","stream":true,"max_tokens":32,"temperature":0.2,"seed":7,"stop":"END",
            "messages":[{"role":"system","content":"Be brief."},{"role":"user","content":[{"type":"text","text":"Hi"},{"type":"image_url","image_url":{"url":"x"}}]}]}"#;
        let (path, out) = build_request(
            body,
            RequestKind::Chat,
            "ensemble",
            ChatTemplate::ChatMl,
            true,
        )
        .unwrap();
        assert_eq!(path, "/v2/models/ensemble/generate_stream");
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["text_input"], "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
        assert_eq!(v["max_tokens"], 32);
        assert_eq!(v["stream"], true);
        assert_eq!(v["temperature"], 0.2);
        assert_eq!(v["random_seed"], 7);
        assert_eq!(v["stop_words"], json!(["END"]));
        assert_eq!(v["exclude_input_in_output"], true);
    }

    #[test]
    fn completions_request_and_defaults() {
        let (path, out) = build_request(
            br#"{"model":"m","prompt":"Once"}"#,
            RequestKind::Completions,
            "llama 3/x",
            ChatTemplate::Plain,
            false,
        )
        .unwrap();
        assert_eq!(path, "/v2/models/llama%203%2Fx/generate");
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["text_input"], "Once");
        assert_eq!(v["max_tokens"], DEFAULT_MAX_TOKENS);
        assert!(v.get("temperature").is_none());
        let e = build_request(
            br#"{"model":"m","prompt":["a","b"]}"#,
            RequestKind::Completions,
            "m",
            ChatTemplate::Plain,
            false,
        )
        .unwrap_err();
        assert_eq!(e.http_status(), 400);
    }

    #[test]
    fn pieces() {
        assert!(
            matches!(parse_piece(br#"{"model_name":"e","text_output":"hi"}"#), Piece::Text(t) if t == "hi")
        );
        assert!(matches!(parse_piece(br#"{"error":"boom"}"#), Piece::Error(e) if e == "boom"));
        assert!(matches!(parse_piece(b"{nope"), Piece::Error(_)));
        assert!(matches!(
            parse_piece(br#"{"model_name":"e"}"#),
            Piece::Error(_)
        ));
    }
}
