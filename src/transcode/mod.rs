//! What goes upstream and what comes back: model rewrites, Triton transcoding, and the
//! per-request response transcoder.
//!
//! For OpenAI-compatible backends (`vllm`, `sglang`, `tensorrt-llm`) the body passes
//! through unchanged unless the upstream model differs from the client's (`target_model`,
//! or a LoRA subset), in which case only `model` is rewritten. For `triton` the request is
//! rebuilt for the generate extension and the response is transcoded back to OpenAI shape.
//!
//! The response transcoder is also where first-token detection happens for every backend:
//! it reports the first chunk that carries content.

pub mod templates;
pub mod triton;
pub mod usage_strip;

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::error::PickError;
use crate::request::RequestKind;
use templates::ChatTemplate;
use usage_strip::{Strip, UsageStripper};

/// Largest response body buffered for transcoding (non-streamed Triton answers).
const MAX_BUFFERED_RESPONSE: usize = 64 << 20;

/// How the request goes upstream when it differs from what the client sent.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UpstreamRequest {
    /// New path (Triton generate), or None to keep the client's.
    pub path: Option<String>,
    /// New body, or None to forward the client's unchanged.
    pub body: Option<Vec<u8>>,
}

/// Rewrites `model` in an OpenAI body, keeping every other field.
pub fn rewrite_model(body: &[u8], model: &str) -> Result<Vec<u8>, PickError> {
    let mut v = parse_body(body)?;
    if let Some(obj) = v.as_object_mut() {
        obj.insert("model".into(), Value::String(model.to_string()));
    }
    Ok(serde_json::to_vec(&v).unwrap_or_default())
}

fn parse_body(body: &[u8]) -> Result<Value, PickError> {
    serde_json::from_slice(body)
        .map_err(|e| PickError::bad_request(format!("invalid JSON body: {e}"), None))
}

/// `force_stream_usage` on a streamed request: sets `stream_options.include_usage` unless
/// the client did (and `model` when it changes). Returns the new body (None: unchanged) and
/// whether the usage chunk must be stripped again (the client did not ask for it).
fn force_usage(body: &[u8], model: Option<&str>) -> Result<(Option<Vec<u8>>, bool), PickError> {
    let mut v = parse_body(body)?;
    let Some(obj) = v.as_object_mut() else {
        return Ok((None, false));
    };
    let asked = obj
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        == Some(true);
    if asked && model.is_none() {
        return Ok((None, false));
    }
    if let Some(m) = model {
        obj.insert("model".into(), Value::String(m.to_string()));
    }
    if !asked {
        match obj.get_mut("stream_options").and_then(Value::as_object_mut) {
            Some(options) => {
                options.insert("include_usage".into(), Value::Bool(true));
            }
            None => {
                obj.insert("stream_options".into(), json!({"include_usage": true}));
            }
        }
    }
    Ok((Some(serde_json::to_vec(&v).unwrap_or_default()), !asked))
}

/// What the request needs beyond its routing.
#[derive(Debug, Clone, Copy)]
pub struct PlanOptions<'a> {
    /// Chat or completions.
    pub kind: RequestKind,
    /// The model the client named.
    pub client_model: &'a str,
    /// The model the backend serves.
    pub upstream_model: &'a str,
    /// Triton backend: its chat template.
    pub triton_template: Option<ChatTemplate>,
    /// The client asked for a stream.
    pub stream: bool,
    /// `force_stream_usage`.
    pub force_stream_usage: bool,
}

/// Plans the upstream request for a backend.
pub fn plan(body: &[u8], o: PlanOptions) -> Result<(UpstreamRequest, Transcoder), PickError> {
    // (an engine's own API reads no `model`: its body is never rewritten for one)
    let renamed = (o.upstream_model != o.client_model && !o.kind.is_engine_native())
        .then_some(o.upstream_model);
    match o.triton_template {
        Some(template) => {
            let (path, body) =
                triton::build_request(body, o.kind, o.upstream_model, template, o.stream)?;
            Ok((
                UpstreamRequest {
                    path: Some(path),
                    body: Some(body),
                },
                Transcoder::triton(o.kind, o.stream, o.client_model),
            ))
        }
        // (Responses and Messages streams always carry their usage: nothing to ask for)
        None if o.stream
            && o.force_stream_usage
            && matches!(o.kind, RequestKind::Chat | RequestKind::Completions) =>
        {
            let (body, strip) = force_usage(body, renamed)?;
            let transcoder = if strip {
                Transcoder::strip_usage()
            } else {
                Transcoder::passthrough()
            };
            Ok((UpstreamRequest { path: None, body }, transcoder))
        }
        None => match renamed {
            Some(model) => Ok((
                UpstreamRequest {
                    path: None,
                    body: Some(rewrite_model(body, model)?),
                },
                Transcoder::passthrough(),
            )),
            None => Ok((UpstreamRequest::default(), Transcoder::passthrough())),
        },
    }
}

enum Mode {
    Passthrough,
    Triton {
        kind: RequestKind,
        stream: bool,
    },
    /// A passthrough stream that drops the usage chunk the router asked for
    /// (`force_stream_usage`); `same` when the last chunk passed unchanged.
    StripUsage {
        strip: UsageStripper,
        same: bool,
    },
}

/// Per-request response transcoder; handles arbitrary chunk boundaries.
pub struct Transcoder {
    mode: Mode,
    client_model: String,
    id: String,
    created: u64,
    upstream_status: u32,
    buf: Vec<u8>,
    out: Vec<u8>,
    sent_role: bool,
    done: bool,
    seen_content: bool,
}

/// What one `feed` produced.
pub enum Output<'a> {
    /// Emit the input chunk unchanged.
    Same,
    /// Emit these bytes instead (possibly none).
    Bytes(&'a [u8]),
}

impl Transcoder {
    /// No transcoding: chunks pass unchanged; only the first chunk is noticed.
    pub fn passthrough() -> Self {
        Self::new(Mode::Passthrough, "")
    }

    /// An OpenAI stream whose usage-only chunk the client did not ask for: dropped.
    pub fn strip_usage() -> Self {
        Self::new(
            Mode::StripUsage {
                strip: UsageStripper::default(),
                same: true,
            },
            "",
        )
    }

    /// Triton generate → OpenAI.
    pub fn triton(kind: RequestKind, stream: bool, client_model: &str) -> Self {
        Self::new(Mode::Triton { kind, stream }, client_model)
    }

    fn new(mode: Mode, client_model: &str) -> Self {
        // Only Triton writes responses of its own: the others need no id, no clock.
        let writes = matches!(mode, Mode::Triton { .. });
        Self {
            mode,
            client_model: client_model.to_string(),
            id: if writes {
                format!("{:016x}", fastrand::u64(..))
            } else {
                String::new()
            },
            created: if writes {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
            } else {
                0
            },
            upstream_status: 200,
            buf: Vec::new(),
            out: Vec::new(),
            sent_role: false,
            done: false,
            seen_content: false,
        }
    }

    /// True when the response body is rewritten (hosts drop `content-length`).
    pub fn needs_transcoding(&self) -> bool {
        !matches!(self.mode, Mode::Passthrough)
    }

    /// True when the server's own answer is what the client gets, up to dropped chunks: the
    /// answer reader then reads the input (with the usage), not the output.
    pub fn answer_is_upstream(&self) -> bool {
        !matches!(self.mode, Mode::Triton { .. })
    }

    /// Records the upstream status at response headers; returns the status for the client.
    pub fn response_status(&mut self, upstream_status: u32) -> u32 {
        self.upstream_status = upstream_status;
        upstream_status
    }

    /// The content type the client gets, when it changes.
    pub fn content_type(&self) -> Option<&'static str> {
        match self.mode {
            Mode::Passthrough | Mode::StripUsage { .. } => None,
            Mode::Triton { stream: true, .. } if self.upstream_status < 400 => {
                Some("text/event-stream")
            }
            Mode::Triton { .. } => Some("application/json"),
        }
    }

    /// What the last `feed` produced.
    pub fn last_output(&self) -> Output<'_> {
        match self.mode {
            Mode::Passthrough | Mode::StripUsage { same: true, .. } => Output::Same,
            Mode::Triton { .. } | Mode::StripUsage { .. } => Output::Bytes(&self.out),
        }
    }

    /// True once a chunk with content has been seen (the first token).
    pub fn seen_content(&self) -> bool {
        self.seen_content
    }

    /// Feeds one upstream body chunk; returns what to send to the client.
    pub fn feed(&mut self, chunk: &[u8], end_of_stream: bool) -> Output<'_> {
        self.out.clear();
        let (kind, stream) = match &mut self.mode {
            Mode::Triton { kind, stream } => (*kind, *stream),
            Mode::Passthrough => {
                self.seen_content |= !chunk.is_empty();
                return Output::Same;
            }
            Mode::StripUsage { strip, same } => {
                self.seen_content |= !chunk.is_empty();
                // an error answer is the server's own JSON: untouched
                *same = self.upstream_status >= 400
                    || matches!(strip.feed(chunk, end_of_stream, &mut self.out), Strip::Same);
                return self.last_output();
            }
        };
        if self.done {
            return Output::Bytes(&[]);
        }
        if self.buf.len() + chunk.len() > MAX_BUFFERED_RESPONSE {
            self.done = true;
            self.out = error_json(
                "upstream response too large to transcode",
                self.upstream_status,
            );
            return Output::Bytes(&self.out);
        }
        if self.upstream_status >= 400 {
            // An error before inference began: one JSON object, whatever the request asked.
            self.buf.extend_from_slice(chunk);
            if end_of_stream {
                let msg = match triton::parse_piece(&self.buf) {
                    triton::Piece::Error(m) => m,
                    triton::Piece::Text(t) => t,
                };
                self.out = error_json(&msg, self.upstream_status);
                self.done = true;
            }
            return Output::Bytes(&self.out);
        }
        if stream {
            // The buffer holds no complete event: only its last byte and the new ones can
            // form a boundary, so each byte is scanned once and the consumed events are
            // removed in one go (linear in the response, however it is chunked).
            let scan_from = self.buf.len().saturating_sub(1);
            self.buf
                .extend(chunk.iter().copied().filter(|&b| b != b'\r'));
            let buf = std::mem::take(&mut self.buf);
            let (mut start, mut pos) = (0, scan_from);
            while let Some(i) = find(&buf[pos..], b"\n\n") {
                let end = pos + i + 2;
                self.sse_event(kind, &buf[start..end]);
                if self.done {
                    return Output::Bytes(&self.out);
                }
                (start, pos) = (end, end);
            }
            self.buf = buf;
            self.buf.drain(..start);
            if end_of_stream {
                let tail = std::mem::take(&mut self.buf);
                if !tail.iter().all(u8::is_ascii_whitespace) {
                    self.sse_event(kind, &tail);
                }
                if !self.done {
                    let last = self.chunk_json(kind, None, Some("stop"));
                    self.push_sse(&last);
                    self.out.extend_from_slice(b"data: [DONE]\n\n");
                    self.done = true;
                }
            }
        } else {
            self.buf.extend_from_slice(chunk);
            if end_of_stream {
                let body = match triton::parse_piece(&self.buf) {
                    triton::Piece::Text(t) => {
                        self.seen_content = true;
                        self.completion_json(kind, &t)
                    }
                    triton::Piece::Error(m) => error_json(&m, 502),
                };
                self.out = body;
                self.done = true;
            }
        }
        Output::Bytes(&self.out)
    }

    fn sse_event(&mut self, kind: RequestKind, event: &[u8]) {
        let mut data = Vec::new();
        for line in event.split(|&b| b == b'\n') {
            if let Some(rest) = line.strip_prefix(b"data:") {
                if !data.is_empty() {
                    data.push(b'\n');
                }
                data.extend_from_slice(rest.strip_prefix(b" ").unwrap_or(rest));
            }
        }
        if data.is_empty() || data == b"[DONE]" {
            return;
        }
        match triton::parse_piece(&data) {
            triton::Piece::Text(t) => {
                self.seen_content = true;
                let c = self.chunk_json(kind, Some(&t), None);
                self.push_sse(&c);
            }
            triton::Piece::Error(m) => {
                let e = error_json(&m, 502);
                self.push_sse(&e);
                self.done = true;
            }
        }
    }

    fn push_sse(&mut self, json: &[u8]) {
        self.out.extend_from_slice(b"data: ");
        self.out.extend_from_slice(json);
        self.out.extend_from_slice(b"\n\n");
    }

    fn chunk_json(
        &mut self,
        kind: RequestKind,
        text: Option<&str>,
        finish: Option<&str>,
    ) -> Vec<u8> {
        let v = match kind {
            RequestKind::Chat => {
                let mut delta = serde_json::Map::new();
                if !self.sent_role {
                    delta.insert("role".into(), json!("assistant"));
                    self.sent_role = true;
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({
                    "id": format!("chatcmpl-{}", self.id), "object": "chat.completion.chunk",
                    "created": self.created, "model": self.client_model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
                })
            }
            // (a Responses, Messages or /generate request never reaches Triton: `build_request`
            // refuses it)
            RequestKind::Completions
            | RequestKind::Responses
            | RequestKind::Messages
            | RequestKind::Generate
            | RequestKind::LlamaCompletion => json!({
                "id": format!("cmpl-{}", self.id), "object": "text_completion",
                "created": self.created, "model": self.client_model,
                "choices": [{"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish}],
            }),
        };
        serde_json::to_vec(&v).unwrap_or_default()
    }

    fn completion_json(&self, kind: RequestKind, text: &str) -> Vec<u8> {
        let v = match kind {
            RequestKind::Chat => json!({
                "id": format!("chatcmpl-{}", self.id), "object": "chat.completion",
                "created": self.created, "model": self.client_model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": null, "finish_reason": "stop"}],
            }),
            // (a Responses, Messages or /generate request never reaches Triton: `build_request`
            // refuses it)
            RequestKind::Completions
            | RequestKind::Responses
            | RequestKind::Messages
            | RequestKind::Generate
            | RequestKind::LlamaCompletion => json!({
                "id": format!("cmpl-{}", self.id), "object": "text_completion",
                "created": self.created, "model": self.client_model,
                "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": "stop"}],
            }),
        };
        serde_json::to_vec(&v).unwrap_or_default()
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// OpenAI error JSON for a backend failure.
fn error_json(message: &str, status: u32) -> Vec<u8> {
    let kind = if status < 500 {
        "invalid_request_error"
    } else {
        "upstream_error"
    };
    serde_json::to_vec(&json!({
        "error": {"message": message, "type": kind, "param": null, "code": status}
    }))
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A recorded-style Triton generate_stream body.
    const STREAM: &[u8] = b"data: {\"model_name\":\"ensemble\",\"model_version\":\"1\",\"text_output\":\"Hel\"}\n\n\
data: {\"model_name\":\"ensemble\",\"model_version\":\"1\",\"text_output\":\"lo \xc3\xa9t\xc3\xa9\"}\r\n\r\n\
data: {\"model_name\":\"ensemble\",\"model_version\":\"1\",\"text_output\":\"!\"}";

    fn run(t: &mut Transcoder, chunks: &[&[u8]]) -> Vec<u8> {
        let mut all = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            match t.feed(c, i + 1 == chunks.len()) {
                Output::Same => all.extend_from_slice(c),
                Output::Bytes(b) => all.extend_from_slice(b),
            }
        }
        all
    }

    fn sse_texts(out: &[u8]) -> (String, Vec<Value>) {
        let s = String::from_utf8(out.to_vec()).unwrap();
        assert!(s.ends_with("data: [DONE]\n\n"), "{s}");
        let events: Vec<Value> = s
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter(|e| *e != "[DONE]")
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        let text = events
            .iter()
            .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
            .collect();
        (text, events)
    }

    #[test]
    fn stream_becomes_openai_chunks_with_done() {
        let mut t = Transcoder::triton(RequestKind::Chat, true, "qwen");
        t.response_status(200);
        assert_eq!(t.content_type(), Some("text/event-stream"));
        let out = run(&mut t, &[STREAM]);
        let (text, events) = sse_texts(&out);
        assert_eq!(text, "Hello été!");
        assert_eq!(events[0]["object"], "chat.completion.chunk");
        assert_eq!(events[0]["model"], "qwen");
        assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(
            events.last().unwrap()["choices"][0]["finish_reason"],
            "stop"
        );
        assert!(t.seen_content());
    }

    proptest! {
        // Every split of the stream into up to 4 chunks gives the same client output.
        #[test]
        fn any_chunking_gives_the_same_text(cuts in proptest::collection::vec(0usize..STREAM.len(), 0..4)) {
            let mut cuts = cuts;
            cuts.sort();
            let mut chunks: Vec<&[u8]> = Vec::new();
            let mut start = 0;
            for c in cuts { chunks.push(&STREAM[start..c]); start = c; }
            chunks.push(&STREAM[start..]);
            let mut t = Transcoder::triton(RequestKind::Chat, true, "qwen");
            let (text, _) = sse_texts(&run(&mut t, &chunks));
            prop_assert_eq!(text, "Hello été!");
        }

        // Arbitrary bytes never panic and always end in a well-formed answer.
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..400), stream in any::<bool>()) {
            let mut t = Transcoder::triton(RequestKind::Completions, stream, "m");
            let out = run(&mut t, &[&data]);
            if !stream {
                let v: Value = serde_json::from_slice(&out).unwrap();
                prop_assert!(v.get("error").is_some() || v.get("choices").is_some());
            }
        }
    }

    #[test]
    fn byte_by_byte_and_many_events_in_one_chunk_give_the_same_output() {
        // 2,000 events: fed whole, one byte at a time, and in 7-byte pieces.
        let stream: Vec<u8> = (0..2000)
            .flat_map(|i| {
                format!("data: {{\"model_name\":\"e\",\"text_output\":\"t{i} \"}}\r\n\r\n")
                    .into_bytes()
            })
            .collect();
        let whole = {
            let mut t = Transcoder::triton(RequestKind::Chat, true, "m");
            run(&mut t, &[&stream])
        };
        for piece in [1, 7] {
            let chunks: Vec<&[u8]> = stream.chunks(piece).collect();
            let mut t = Transcoder::triton(RequestKind::Chat, true, "m");
            let out = run(&mut t, &chunks);
            let (text, _) = sse_texts(&out);
            assert_eq!(text, sse_texts(&whole).0, "pieces of {piece}");
            assert!(text.starts_with("t0 t1 ") && text.ends_with("t1999 "));
        }
    }

    #[test]
    fn every_single_split_point() {
        for cut in 0..=STREAM.len() {
            let mut t = Transcoder::triton(RequestKind::Chat, true, "qwen");
            let (text, _) = sse_texts(&run(&mut t, &[&STREAM[..cut], &STREAM[cut..]]));
            assert_eq!(text, "Hello été!", "cut at {cut}");
        }
    }

    #[test]
    fn non_stream_json_and_completions() {
        let mut t = Transcoder::triton(RequestKind::Chat, false, "qwen");
        t.response_status(200);
        assert_eq!(t.content_type(), Some("application/json"));
        let out = run(
            &mut t,
            &[br#"{"model_name":"ensemble","text_o"#, br#"utput":"42"}"#],
        );
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["content"], "42");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");

        let mut t = Transcoder::triton(RequestKind::Completions, true, "m");
        let out = run(
            &mut t,
            &[b"data: {\"text_output\":\"a\"}\n\ndata: {\"text_output\":\"b\"}\n\n"],
        );
        let s = String::from_utf8(out).unwrap();
        assert!(
            s.contains("\"object\":\"text_completion\"")
                && s.contains("\"text\":\"a\"")
                && s.ends_with("data: [DONE]\n\n")
        );
    }

    #[test]
    fn errors_become_openai_errors() {
        // Before inference: HTTP error with a JSON body.
        let mut t = Transcoder::triton(RequestKind::Chat, true, "m");
        assert_eq!(t.response_status(400), 400);
        assert_eq!(t.content_type(), Some("application/json"));
        let out = run(&mut t, &[br#"{"error":"unknown model"}"#]);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["error"]["message"], "unknown model");
        assert_eq!(v["error"]["code"], 400);
        // Mid-stream: an error event ends the stream.
        let mut t = Transcoder::triton(RequestKind::Chat, true, "m");
        let out = run(&mut t, &[b"data: {\"text_output\":\"a\"}\n\ndata: {\"error\":\"engine died\"}\n\ndata: {\"text_output\":\"b\"}\n\n"]);
        let s = String::from_utf8(out).unwrap();
        assert!(
            s.contains("engine died") && !s.contains("\"b\"") && !s.contains("[DONE]"),
            "{s}"
        );
        // Malformed non-stream body.
        let mut t = Transcoder::triton(RequestKind::Chat, false, "m");
        let v: Value = serde_json::from_slice(&run(&mut t, &[b"<html>oops"])).unwrap();
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("malformed triton response"));
    }

    #[test]
    fn passthrough_and_model_rewrite() {
        let mut t = Transcoder::passthrough();
        assert!(!t.needs_transcoding());
        assert!(matches!(t.feed(b"", false), Output::Same));
        assert!(!t.seen_content());
        assert!(matches!(t.feed(b"data: x\n\n", false), Output::Same));
        assert!(t.seen_content());

        let options = |client_model, upstream_model| PlanOptions {
            kind: RequestKind::Chat,
            client_model,
            upstream_model,
            triton_template: None,
            stream: false,
            force_stream_usage: true, // not a stream: no effect
        };
        let (up, _) = plan(
            br#"{"model":"alias","temperature":0.5,"messages":[]}"#,
            options("alias", "real-model"),
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&up.body.unwrap()).unwrap();
        assert_eq!(v["model"], "real-model");
        assert_eq!(v["temperature"], 0.5);
        assert_eq!(up.path, None);
        let (up, _) = plan(br#"{"model":"m"}"#, options("m", "m")).unwrap();
        assert_eq!(up, UpstreamRequest::default());
    }

    #[test]
    fn force_stream_usage_asks_for_usage_and_strips_it_only_for_clients_that_did_not() {
        let options = |upstream_model, force| PlanOptions {
            kind: RequestKind::Chat,
            client_model: "m",
            upstream_model,
            triton_template: None,
            stream: true,
            force_stream_usage: force,
        };
        let plain =
            br#"{"model":"m","stream":true,"stream_options":{"continuous_usage_stats":false}}"#;
        // off: untouched
        let (up, t) = plan(plain, options("m", false)).unwrap();
        assert_eq!(up, UpstreamRequest::default());
        assert!(!t.needs_transcoding());
        // on: include_usage set beside the client's other options, the usage chunk stripped
        let (up, mut t) = plan(plain, options("m", true)).unwrap();
        let v: Value = serde_json::from_slice(&up.body.unwrap()).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["stream_options"]["continuous_usage_stats"], false);
        assert_eq!(v["model"], "m");
        assert!(t.needs_transcoding() && t.answer_is_upstream());
        assert_eq!(t.content_type(), None);
        let content = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n";
        assert!(matches!(t.feed(content, false), Output::Same));
        assert!(t.seen_content());
        let usage = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3}}\n\ndata: [DONE]\n\n";
        let Output::Bytes(out) = t.feed(usage, true) else {
            panic!("the usage chunk passed")
        };
        assert_eq!(out, b"data: [DONE]\n\n");
        // an error answer passes as the server sent it
        let (_, mut t) = plan(plain, options("m", true)).unwrap();
        t.response_status(400);
        assert!(matches!(t.feed(b"{\"error\":{}}", true), Output::Same));
        // the client asked for usage: forwarded as is (or only renamed), nothing stripped
        let asked = br#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#;
        let (up, t) = plan(asked, options("m", true)).unwrap();
        assert_eq!(up, UpstreamRequest::default());
        assert!(!t.needs_transcoding());
        let (up, t) = plan(asked, options("served", true)).unwrap();
        let v: Value = serde_json::from_slice(&up.body.unwrap()).unwrap();
        assert_eq!(
            (
                v["model"].as_str(),
                v["stream_options"]["include_usage"].as_bool()
            ),
            (Some("served"), Some(true))
        );
        assert!(!t.needs_transcoding());
        // no stream_options at all, and a renamed model
        let (up, t) = plan(br#"{"model":"m","stream":true}"#, options("served", true)).unwrap();
        let v: Value = serde_json::from_slice(&up.body.unwrap()).unwrap();
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"include_usage": true})
        );
        assert_eq!(v["model"], "served");
        assert!(t.needs_transcoding());
    }
}
