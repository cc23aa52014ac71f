//! Answers of the OpenAI Responses API (`/v1/responses`): their text, function calls, usage
//! and id.
//!
//! A streamed answer is a sequence of typed events (`response.created`, …,
//! `response.output_text.delta`, `response.output_item.added` of a `function_call`,
//! `response.function_call_arguments.delta`, `response.completed`); no `[DONE]` ends it. A
//! whole answer is one response object (`output` items, `usage`). The usage names are the
//! Responses API's (`input_tokens`, `output_tokens`, `input_tokens_details.cached_tokens`),
//! read as the chat names' aliases ([`super::Usage`]).
//!
//! The answer's id (`resp_…`) is what a client names as `previous_response_id` to continue
//! the conversation on the engine that stored it: [`first_id`] finds it in the answer's first
//! bytes, before any event is parsed, so a bound on the events never hides it.

use serde::de::IgnoredAny;
use serde::Deserialize;

use super::{RawUsage, ResponseReader};
use crate::request::JsonStr;

/// Longest response id kept (ids are ~40 bytes: `resp_` and a UUID).
pub(super) const MAX_ID_BYTES: usize = 256;
/// How far into an answer its id is looked for.
pub(super) const ID_HEAD_BYTES: usize = 4096;

/// One streamed event, or a whole answer (a response object): only the fields read here.
#[derive(Deserialize)]
pub(super) struct Event<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<JsonStr<'a>>,
    /// A response object's items (a whole answer; a stream's `response.completed` too).
    #[serde(borrow, default)]
    output: Option<Vec<OutputItem<'a>>>,
    #[serde(default)]
    usage: Option<RawUsage>,
    #[serde(default)]
    error: Option<IgnoredAny>,
    /// `response.created`, `response.completed`, …: the response object.
    #[serde(borrow, default)]
    response: Option<Box<Event<'a>>>,
    /// `response.output_text.delta`, `response.function_call_arguments.delta`.
    #[serde(borrow, default)]
    delta: Option<JsonStr<'a>>,
    /// `response.output_item.added`.
    #[serde(borrow, default)]
    item: Option<OutputItem<'a>>,
    #[serde(default)]
    output_index: Option<u64>,
}

/// An output item: a message (its text parts) or a function call.
#[derive(Deserialize)]
struct OutputItem<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<JsonStr<'a>>,
    #[serde(borrow, default)]
    content: Option<Vec<OutputPart<'a>>>,
    #[serde(borrow, default)]
    name: Option<JsonStr<'a>>,
    #[serde(borrow, default)]
    arguments: Option<JsonStr<'a>>,
}

#[derive(Deserialize)]
struct OutputPart<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<JsonStr<'a>>,
    #[serde(borrow, default)]
    text: Option<JsonStr<'a>>,
}

/// The value of the first `"id"` key in `head` (the start of an answer), when `head` holds
/// all of it: a whole answer starts with its id, a stream's `response.created` event with
/// the response object, whose first key is its id. None for an id with escapes or too long.
pub(super) fn first_id(head: &[u8]) -> Option<String> {
    let at = memchr::memmem::find(head, b"\"id\"")?;
    let rest = head[at + 4..].trim_ascii_start().strip_prefix(b":")?;
    let rest = rest.trim_ascii_start().strip_prefix(b"\"")?;
    let end = memchr::memchr2(b'"', b'\\', rest)?;
    if rest[end] != b'"' || end == 0 || end > MAX_ID_BYTES {
        return None;
    }
    std::str::from_utf8(&rest[..end]).ok().map(str::to_owned)
}

impl ResponseReader {
    /// Applies one Responses event or whole answer; false (and capture stopped) for an error.
    pub(super) fn apply_responses(&mut self, e: Event, whole: bool) -> bool {
        let kind = e.kind.as_deref().unwrap_or("");
        if e.error.is_some() || kind == "error" || kind == "response.failed" {
            self.fail();
            return false;
        }
        if whole {
            self.take_output(e.output.as_deref().unwrap_or_default());
            if let Some(u) = e.usage {
                self.out.usage = Some(u.into());
            }
            return true;
        }
        match kind {
            "response.output_text.delta" => {
                if let Some(d) = &e.delta {
                    self.take_text(d.as_bytes());
                }
            }
            "response.output_item.added" => {
                let call = e.item.as_ref().filter(|i| is(&i.kind, "function_call"));
                if let Some(item) = call {
                    let index = self.out.tool_calls.len();
                    self.call_outputs.push(e.output_index.unwrap_or(u64::MAX));
                    let name = item.name.as_deref().unwrap_or("");
                    let arguments = item.arguments.as_deref().unwrap_or("");
                    self.take_tool_call(index, name, arguments);
                }
            }
            "response.function_call_arguments.delta" => {
                let at = e.output_index.unwrap_or(u64::MAX);
                let index = self.call_outputs.iter().position(|&o| o == at);
                if let (Some(index), Some(d)) = (index, &e.delta) {
                    self.take_tool_call(index, "", d);
                }
            }
            // the end: completed, or stopped by `max_output_tokens` (a proper end too)
            "response.completed" | "response.incomplete" => {
                if let Some(u) = e.response.and_then(|r| r.usage) {
                    self.out.usage = Some(u.into());
                }
                self.finish_seen = true;
            }
            _ => {}
        }
        true
    }

    /// A whole answer's output items: the text of its messages, its function calls.
    fn take_output(&mut self, output: &[OutputItem]) {
        for item in output {
            match item.kind.as_deref() {
                Some("message") => {
                    let parts = item.content.as_deref().unwrap_or_default();
                    for part in parts.iter().filter(|p| is(&p.kind, "output_text")) {
                        self.take_text(part.text.as_deref().unwrap_or("").as_bytes());
                    }
                }
                Some("function_call") => {
                    let index = self.out.tool_calls.len();
                    let name = item.name.as_deref().unwrap_or("");
                    let arguments = item.arguments.as_deref().unwrap_or("");
                    self.take_tool_call(index, name, arguments);
                }
                _ => {}
            }
        }
    }
}

fn is(kind: &Option<JsonStr>, want: &str) -> bool {
    kind.as_deref() == Some(want)
}
