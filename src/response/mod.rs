//! Incremental reader of OpenAI responses: the assistant's answer and the token usage.
//!
//! Fed the response body in chunks of any size and boundary, it recognises a server-sent
//! event stream (`data: {...}` events, `\n\n` or `\r\n\r\n` between events, `data: [DONE]`)
//! or one JSON answer (the first non-blank byte is `{`), and extracts, from choice 0:
//!
//! - chat: the text (`delta.content` / `message.content`) and the tool calls (function name
//!   and arguments, streamed pieces joined by their `index`);
//! - completions: `text`;
//! - `usage` (`prompt_tokens`, `completion_tokens`, `prompt_tokens_details.cached_tokens`),
//!   the last one seen (OpenAI streams it in the final chunk).
//!
//! Answers of the Responses API (typed events, no `[DONE]`; an id the next turn may name)
//! are read by [`responses_api`], those of the Anthropic Messages API by [`anthropic`], those
//! of SGLang's `/generate` (`text` and `meta_info`) by [`generate`], those of llama.cpp's
//! `/completion` (`content`, `timings`) by [`llama`].
//!
//! Captured text is capped (`learn_response_bytes`); a capped answer is still a correct
//! prefix of the next turn. Cost is linear in the response however it is cut: every input
//! byte is scanned once for a line end and copied at most once into the current event (or,
//! for a JSON answer, the body), which is parsed once. Nothing here panics on garbage: a
//! malformed event, an `error` object, or an event or body beyond the bound stops the capture.
//!
//! [`Capture::render_next_turn`] continues the prompt's prefix hasher with the answer
//! rendered as the next turn will send it back (`<|assistant|>\n` text tool calls `\n`, the
//! rendering of `crate::request`; for completions the text right after the prompt).

use std::fmt;

use serde::de::{Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::Deserialize;

use crate::hashing::PrefixHasher;
use crate::request::{self, JsonStr, RequestKind};

mod anthropic;
mod generate;
mod llama;
mod responses_api;

/// Room for the JSON around the captured text (an event's other fields, a body's usage…).
const SLACK_BYTES: usize = 64 * 1024;
/// Tool calls of one answer that are followed (by their `index`).
const MAX_TOOL_CALLS: usize = 64;
/// The end of a JSON answer too long to parse whole that is kept to find its `usage` (the
/// last key of OpenAI-style answers).
const USAGE_TAIL_BYTES: usize = 16 * 1024;

/// Token counts of an answer, as the server reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// `usage.prompt_tokens`
    pub prompt_tokens: u64,
    /// `usage.completion_tokens`
    pub completion_tokens: u64,
    /// `usage.prompt_tokens_details.cached_tokens`, when the server reports it.
    pub cached_tokens: Option<u64>,
}

impl Usage {
    /// The engine's own prefix-cache hit ratio for this prompt (cached / prompt tokens, at
    /// most 1), when it reported cached tokens of a non-empty prompt.
    pub fn cache_hit_ratio(&self) -> Option<f64> {
        let cached = self.cached_tokens?;
        (self.prompt_tokens > 0).then(|| (cached as f64 / self.prompt_tokens as f64).min(1.0))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Nothing but blanks seen yet.
    Detect,
    Sse,
    Json,
    /// `[DONE]` seen, or the JSON answer parsed: later bytes are ignored.
    Done,
    /// Garbage or over the bound: capture stopped.
    Failed,
}

/// What has been captured of one answer.
#[derive(Debug, Default)]
pub struct Capture {
    /// Chat or completions.
    kind: Option<RequestKind>,
    /// Text of choice 0 (at most the cap).
    pub text: Vec<u8>,
    /// Tool calls of choice 0: (function name, arguments), in `index` order.
    pub tool_calls: Vec<(Vec<u8>, Vec<u8>)>,
    /// The cap was reached: `text` (or the tool calls) are a prefix of the answer.
    pub capped: bool,
    /// The answer ended properly: `[DONE]`, a `finish_reason` of choice 0 at the end, or
    /// the JSON answer parsed.
    pub complete: bool,
    /// The last `usage` seen.
    pub usage: Option<Usage>,
    /// Responses API: the answer's id (what a next turn names as `previous_response_id`).
    pub response_id: Option<String>,
    /// `/generate` of token ids: the answer's `output_ids` are captured (in `token_ids`, 4
    /// bytes each under the cap) instead of its text.
    pub tokens: bool,
    /// `/generate` of token ids: the answer's token ids.
    pub token_ids: Vec<u32>,
}

/// The incremental reader: [`ResponseReader::feed`] every chunk, then
/// [`ResponseReader::capture`].
#[derive(Debug)]
pub struct ResponseReader {
    mode: Mode,
    cap: usize,
    /// Bytes captured so far (text + tool call names and arguments).
    captured: usize,
    /// The current unterminated SSE line, or the JSON body.
    line: Vec<u8>,
    /// The data of the current SSE event (its `data:` lines joined by `\n`).
    event: Vec<u8>,
    finish_seen: bool,
    /// `end_of_stream` was fed.
    ended: bool,
    /// A JSON answer beyond the bound: `line` keeps only its end, for the usage.
    json_too_long: bool,
    /// Responses API: the answer's first bytes, until its id is found in them.
    head: Vec<u8>,
    /// Responses API, streamed: the `output_index` of each tool call, in `tool_calls` order.
    call_outputs: Vec<u64>,
    out: Capture,
}

/// One streamed chunk or one whole answer: only the fields read here are kept.
#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default)]
    choices: Option<ChoiceZero<'a>>,
    #[serde(default)]
    usage: Option<RawUsage>,
    #[serde(default)]
    error: Option<IgnoredAny>,
}

/// The `choices` array, of which only choice 0 (the first with `index` 0 or none) is kept:
/// the others are parsed (to be skipped) but never stored.
struct ChoiceZero<'a>(Option<Choice<'a>>);

impl<'de: 'a, 'a> Deserialize<'de> for ChoiceZero<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = ChoiceZero<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array of choices")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut zero = None;
                while let Some(c) = seq.next_element::<Choice<'a>>()? {
                    if zero.is_none() && c.index.unwrap_or(0) == 0 {
                        zero = Some(c);
                    }
                }
                Ok(ChoiceZero(zero))
            }
        }
        d.deserialize_seq(V(std::marker::PhantomData))
    }
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(default)]
    index: Option<u64>,
    #[serde(borrow, default)]
    delta: Option<Delta<'a>>,
    #[serde(borrow, default)]
    message: Option<Delta<'a>>,
    #[serde(borrow, default)]
    text: Option<JsonStr<'a>>,
    /// Only whether it is there (not null) matters.
    #[serde(default)]
    finish_reason: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(borrow, default)]
    content: Option<JsonStr<'a>>,
    #[serde(borrow, default)]
    tool_calls: Option<Vec<ToolCall<'a>>>,
}

#[derive(Deserialize)]
struct ToolCall<'a> {
    #[serde(default)]
    index: Option<u64>,
    #[serde(borrow, default)]
    function: Option<Function<'a>>,
}

#[derive(Deserialize)]
struct Function<'a> {
    #[serde(borrow, default)]
    name: Option<JsonStr<'a>>,
    #[serde(borrow, default)]
    arguments: Option<JsonStr<'a>>,
}

/// A `usage` object, in the names of chat and completions or of the Responses API.
#[derive(Deserialize)]
struct RawUsage {
    #[serde(default, alias = "input_tokens")]
    prompt_tokens: Option<u64>,
    #[serde(default, alias = "output_tokens")]
    completion_tokens: Option<u64>,
    #[serde(default, alias = "input_tokens_details")]
    prompt_tokens_details: Option<Details>,
}

#[derive(Deserialize)]
struct Details {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

impl From<RawUsage> for Usage {
    fn from(u: RawUsage) -> Self {
        Usage {
            prompt_tokens: u.prompt_tokens.unwrap_or(0),
            completion_tokens: u.completion_tokens.unwrap_or(0),
            cached_tokens: u.prompt_tokens_details.and_then(|d| d.cached_tokens),
        }
    }
}

/// The `usage` object in the end of a JSON answer: the last `"usage":` key (not inside a
/// string: an escaped quote precedes those) whose value parses as one.
fn usage_in_tail(tail: &[u8]) -> Option<Usage> {
    let finder = memchr::memmem::FinderRev::new(b"\"usage\"");
    let mut end = tail.len();
    while let Some(at) = finder.rfind(&tail[..end]) {
        end = at;
        if at > 0 && tail[at - 1] == b'\\' {
            continue;
        }
        let rest = tail[at + 7..].trim_ascii_start();
        let Some(value) = rest.strip_prefix(b":") else {
            continue;
        };
        let mut values = serde_json::Deserializer::from_slice(value).into_iter::<RawUsage>();
        if let Some(Ok(u)) = values.next() {
            return Some(u.into());
        }
    }
    None
}

impl ResponseReader {
    /// A reader for the answer to a `kind` request, capturing at most `cap` bytes of text.
    /// With `cap` 0 only the usage is read: events without `"usage"` are not parsed.
    pub fn new(kind: RequestKind, cap: usize) -> Self {
        Self {
            mode: Mode::Detect,
            cap,
            captured: 0,
            line: Vec::new(),
            event: Vec::new(),
            finish_seen: false,
            ended: false,
            json_too_long: false,
            head: Vec::new(),
            call_outputs: Vec::new(),
            out: Capture {
                kind: Some(kind),
                ..Capture::default()
            },
        }
    }

    /// For a `/generate` request of token ids: captures the answer's `output_ids`, which the
    /// next turn resends after the prompt's ids, instead of its text.
    pub fn reading_token_ids(mut self) -> Self {
        self.out.tokens = true;
        self
    }

    /// A reader that reads nothing: for a request on a stored answer, whose usage was counted
    /// when the answer was made.
    pub fn ignoring() -> Self {
        let mut reader = Self::new(RequestKind::Responses, 0);
        reader.out.kind = None;
        reader.ended = true;
        reader
    }

    /// Largest SSE event or JSON body read.
    fn bound(&self) -> usize {
        self.cap.saturating_mul(2).saturating_add(SLACK_BYTES)
    }

    /// Feeds the next chunk of the response body; `end_of_stream` with the last one (an
    /// empty chunk is fine).
    pub fn feed(&mut self, mut chunk: &[u8], end_of_stream: bool) {
        if self.ended {
            return;
        }
        self.ended = end_of_stream;
        if self.out.kind == Some(RequestKind::Responses) {
            self.find_response_id(chunk);
        }
        if self.mode == Mode::Detect {
            match chunk.iter().position(|b| !b.is_ascii_whitespace()) {
                Some(i) => {
                    self.mode = if chunk[i] == b'{' {
                        Mode::Json
                    } else {
                        Mode::Sse
                    };
                    chunk = &chunk[i..];
                }
                None => chunk = &[],
            }
        }
        match self.mode {
            Mode::Sse => self.feed_sse(chunk, end_of_stream),
            Mode::Json => self.feed_json(chunk, end_of_stream),
            Mode::Detect | Mode::Done | Mode::Failed => {}
        }
    }

    /// Ends the response if the host did not say so (e.g. it ended with trailers): a JSON
    /// answer is parsed now, a stream is complete if choice 0 had its `finish_reason`.
    pub fn end(&mut self) {
        self.feed(&[], true);
    }

    /// What was captured (complete or not: see [`Capture::learnable`]).
    pub fn capture(&self) -> &Capture {
        &self.out
    }

    /// Looks for the answer's id in its first [`responses_api::ID_HEAD_BYTES`].
    fn find_response_id(&mut self, chunk: &[u8]) {
        if self.out.response_id.is_some() || self.head.len() >= responses_api::ID_HEAD_BYTES {
            return;
        }
        let take = chunk
            .len()
            .min(responses_api::ID_HEAD_BYTES - self.head.len());
        self.head.extend_from_slice(&chunk[..take]);
        self.out.response_id = responses_api::first_id(&self.head);
        if self.out.response_id.is_some() || self.head.len() >= responses_api::ID_HEAD_BYTES {
            self.head = Vec::new();
        }
    }

    fn fail(&mut self) {
        self.mode = Mode::Failed;
        self.out.complete = false;
        self.line = Vec::new();
        self.event = Vec::new();
    }

    fn feed_json(&mut self, chunk: &[u8], end_of_stream: bool) {
        self.line.extend_from_slice(chunk);
        // Too long to parse whole: keep its end for the usage (trimmed back to the tail
        // whenever it doubles, so each byte is copied a bounded number of times).
        let limit = if self.json_too_long {
            2 * USAGE_TAIL_BYTES
        } else {
            self.bound()
        };
        if self.line.len() > limit {
            self.json_too_long = true;
            self.out.complete = false;
            let excess = self.line.len() - USAGE_TAIL_BYTES;
            self.line.drain(..excess);
        }
        if end_of_stream {
            let body = std::mem::take(&mut self.line);
            if self.json_too_long {
                self.out.usage = usage_in_tail(&body).or(self.out.usage);
                self.mode = Mode::Done;
            } else if self.apply(&body, true) {
                self.out.complete = true;
                self.mode = Mode::Done;
            }
        }
    }

    fn feed_sse(&mut self, mut chunk: &[u8], end_of_stream: bool) {
        while self.mode == Mode::Sse {
            let Some(nl) = memchr::memchr(b'\n', chunk) else {
                break;
            };
            if self.line.is_empty() {
                self.sse_line(&chunk[..nl]);
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(&chunk[..nl]);
                self.sse_line(&line);
                line.clear();
                self.line = line;
            }
            chunk = &chunk[nl + 1..];
        }
        if self.mode != Mode::Sse {
            return;
        }
        if self.line.len() + chunk.len() > self.bound() {
            self.fail();
            return;
        }
        self.line.extend_from_slice(chunk);
        if end_of_stream {
            // A last line and event without their terminators.
            let line = std::mem::take(&mut self.line);
            if !line.is_empty() {
                self.sse_line(&line);
            }
            if self.mode == Mode::Sse {
                self.sse_line(b"");
            }
            if self.mode == Mode::Sse {
                self.out.complete = self.finish_seen;
            }
        }
    }

    /// One SSE line, without its `\n`.
    fn sse_line(&mut self, line: &[u8]) {
        // The same bound whether the line came whole in one chunk or was pieced together.
        if line.len() > self.bound() {
            self.fail();
            return;
        }
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            if !self.event.is_empty() {
                let event = std::mem::take(&mut self.event);
                self.sse_event(&event);
                if self.mode == Mode::Sse {
                    let mut event = event;
                    event.clear();
                    self.event = event;
                }
            }
            return;
        }
        let Some(data) = line.strip_prefix(b"data:") else {
            return; // comments, `event:`, `id:`, `retry:`
        };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        if self.event.len() + data.len() + 1 > self.bound() {
            self.fail();
            return;
        }
        if !self.event.is_empty() {
            self.event.push(b'\n');
        }
        self.event.extend_from_slice(data);
    }

    fn sse_event(&mut self, data: &[u8]) {
        if data.trim_ascii() == b"[DONE]" {
            self.out.complete = true;
            self.mode = Mode::Done;
            self.line = Vec::new();
            self.event = Vec::new();
            return;
        }
        let usage_key: &[u8] = match self.out.kind {
            Some(RequestKind::Generate) => b"\"meta_info\"",
            Some(RequestKind::LlamaCompletion) => b"\"tokens_evaluated\"",
            _ => b"\"usage\"",
        };
        if self.cap == 0 && memchr::memmem::find(data, usage_key).is_none() {
            return; // reading only the usage: this chunk has none
        }
        self.apply(data, false);
    }

    /// Applies one JSON message (a streamed chunk, or the `whole` answer); false (and capture
    /// stopped) when it is not one.
    fn apply(&mut self, json: &[u8], whole: bool) -> bool {
        // UTF-8 checked once (SIMD), not string by string by serde_json.
        let Ok(json) = simdutf8::basic::from_utf8(json) else {
            self.fail();
            return false;
        };
        let applied = match self.out.kind {
            Some(RequestKind::Responses) => serde_json::from_str::<responses_api::Event>(json)
                .map(|e| self.apply_responses(e, whole)),
            Some(RequestKind::Messages) => serde_json::from_str::<anthropic::Event>(json)
                .map(|e| self.apply_messages(e, whole)),
            Some(RequestKind::Generate) => {
                serde_json::from_str::<generate::Answer>(json).map(|a| self.apply_generate(a))
            }
            Some(RequestKind::LlamaCompletion) => {
                serde_json::from_str::<llama::Answer>(json).map(|a| self.apply_llama(a))
            }
            _ => return self.apply_openai(json),
        };
        applied.unwrap_or_else(|_| {
            self.fail();
            false
        })
    }

    /// Applies one chat or completions chunk, or whole answer.
    fn apply_openai(&mut self, json: &str) -> bool {
        let Ok(m) = serde_json::from_str::<Message>(json) else {
            self.fail();
            return false;
        };
        if m.error.is_some() {
            self.fail();
            return false;
        }
        if let Some(u) = m.usage {
            self.out.usage = Some(u.into());
        }
        if let Some(c) = m.choices.and_then(|c| c.0) {
            if c.finish_reason.is_some() {
                self.finish_seen = true;
            }
            if let Some(t) = &c.text {
                self.take_text(t.as_bytes());
            }
            for d in [&c.delta, &c.message].into_iter().flatten() {
                if let Some(t) = &d.content {
                    self.take_text(t.as_bytes());
                }
                for (i, call) in d.tool_calls.iter().flatten().enumerate() {
                    let Some(f) = &call.function else { continue };
                    let index = call.index.map_or(i, |x| x.min(usize::MAX as u64) as usize);
                    self.take_tool_call(
                        index,
                        f.name.as_deref().unwrap_or(""),
                        f.arguments.as_deref().unwrap_or(""),
                    );
                }
            }
        }
        true
    }

    /// Room left under the cap for `len` more bytes: how many to take.
    fn budget(&mut self, len: usize) -> usize {
        let take = len.min(self.cap - self.captured);
        if take < len {
            self.out.capped = true;
        }
        self.captured += take;
        take
    }

    fn take_text(&mut self, t: &[u8]) {
        if self.out.capped {
            return;
        }
        let n = self.budget(t.len());
        self.out.text.extend_from_slice(&t[..n]);
    }

    fn take_tool_call(&mut self, index: usize, name: &str, arguments: &str) {
        if self.out.capped {
            return;
        }
        if index >= MAX_TOOL_CALLS || index > self.out.tool_calls.len() {
            // Too many, or one skipped: the rendering would not be known.
            self.out.capped = true;
            return;
        }
        if index == self.out.tool_calls.len() {
            self.out.tool_calls.push((Vec::new(), Vec::new()));
        }
        let n = self.budget(name.len());
        self.out.tool_calls[index]
            .0
            .extend_from_slice(&name.as_bytes()[..n]);
        let n = self.budget(arguments.len());
        self.out.tool_calls[index]
            .1
            .extend_from_slice(&arguments.as_bytes()[..n]);
    }
}

impl Capture {
    /// True when the answer may be learned: it ended properly or was capped (a capped
    /// answer is still a correct prefix), and it has something to learn.
    pub fn learnable(&self) -> bool {
        let something = !self.text.is_empty() || !self.tool_calls.is_empty();
        (self.complete || self.capped) && (something || !self.token_ids.is_empty())
    }

    /// Feeds `h` (the prompt's hasher at its end) with the answer as the next turn renders
    /// it. A capped answer stops at what is known: the text, without what follows it.
    pub fn render_next_turn(&self, h: &mut PrefixHasher) {
        match self.kind {
            Some(RequestKind::Generate) if self.tokens => h.feed_tokens(&self.token_ids),
            Some(
                RequestKind::Completions | RequestKind::Generate | RequestKind::LlamaCompletion,
            ) => h.feed(&self.text),
            // (a Messages API answer's tool calls have no arguments: `anthropic`)
            Some(RequestKind::Chat | RequestKind::Messages) => {
                request::open_message(h, b"assistant");
                h.feed(&self.text);
                if self.capped {
                    return;
                }
                for (name, arguments) in &self.tool_calls {
                    request::tool_call(h, name, arguments);
                }
                request::close_message(h);
            }
            // each output item as the next turn resends it: the message, then each call
            Some(RequestKind::Responses) => {
                if !self.text.is_empty() {
                    request::open_message(h, b"assistant");
                    h.feed(&self.text);
                    if self.capped {
                        return;
                    }
                    request::close_message(h);
                }
                if self.capped {
                    return; // a call is rendered only whole
                }
                for (name, arguments) in &self.tool_calls {
                    request::responses::function_call(h, name, arguments);
                }
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests;
