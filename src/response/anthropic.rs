//! Answers of the Anthropic Messages API (`/v1/messages`): their text, tool calls and usage.
//!
//! A streamed answer is a sequence of typed events: `message_start` (the message, with the
//! prompt's `usage.input_tokens`), `content_block_start` (a `text`, `tool_use` or `thinking`
//! block at an `index`), `content_block_delta` (`text_delta`, `input_json_delta`,
//! `thinking_delta`), `content_block_stop`, `message_delta` (`stop_reason`, the output's
//! `usage.output_tokens`), `message_stop`; vLLM ends with `data: [DONE]` too. A whole answer is
//! one message object (`content` blocks, `usage`).
//!
//! Only what the next turn renders is captured ([`crate::request::anthropic`]): the text, and
//! each tool call's name (not its input). The usage is read for its token counts; the cache
//! fields (`cache_read_input_tokens`) are not taken as the engine's cached tokens: engines
//! fill `input_tokens` with the whole prompt (vLLM) or, as Anthropic defines it, with the part
//! after the cache, so no share of cached tokens can be read from them reliably.

use serde::de::IgnoredAny;
use serde::Deserialize;

use super::{RawUsage, ResponseReader, Usage};
use crate::request::{JsonStr, Part};

/// One streamed event, or a whole answer (a message object): only the fields read here.
#[derive(Deserialize)]
pub(super) struct Event<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<JsonStr<'a>>,
    /// A whole answer's blocks.
    #[serde(borrow, default)]
    content: Option<Vec<Part<'a>>>,
    #[serde(default)]
    usage: Option<RawUsage>,
    #[serde(default)]
    error: Option<IgnoredAny>,
    /// `message_start`: the message (its `usage`).
    #[serde(default)]
    message: Option<StartedMessage>,
    /// `content_block_start`: the block.
    #[serde(borrow, default)]
    content_block: Option<Part<'a>>,
    /// `content_block_delta`: `{type, text | partial_json | thinking}`.
    #[serde(borrow, default)]
    delta: Option<Part<'a>>,
}

#[derive(Deserialize)]
pub(super) struct StartedMessage {
    #[serde(default)]
    usage: Option<RawUsage>,
}

impl ResponseReader {
    /// Applies one Messages API event or whole answer; false (and capture stopped) for an
    /// error.
    pub(super) fn apply_messages(&mut self, e: Event, whole: bool) -> bool {
        let kind = e.kind.as_deref().unwrap_or("");
        if e.error.is_some() || kind == "error" {
            self.fail();
            return false;
        }
        if whole {
            for b in e.content.iter().flatten() {
                self.take_block(b);
            }
            self.merge_usage(e.usage);
            return true;
        }
        match kind {
            "message_start" => self.merge_usage(e.message.and_then(|m| m.usage)),
            "content_block_start" => {
                if let Some(b) = &e.content_block {
                    self.take_block(b);
                }
            }
            "content_block_delta" => {
                let text = (e.delta.as_ref()).filter(|d| d.is("text_delta"));
                if let Some(t) = text.and_then(|d| d.text.as_deref()) {
                    self.take_text(t.as_bytes());
                }
            }
            "message_delta" => {
                self.merge_usage(e.usage);
                self.finish_seen = true;
            }
            "message_stop" => self.finish_seen = true,
            _ => {}
        }
        true
    }

    /// A text block's text, or a tool call (its name: the input is not rendered).
    fn take_block(&mut self, b: &Part) {
        if b.is("text") {
            self.take_text(b.text.as_deref().unwrap_or("").as_bytes());
        } else if b.is("tool_use") {
            let index = self.out.tool_calls.len();
            self.take_tool_call(index, b.name.as_deref().unwrap_or(""), "");
        }
    }

    /// Takes the counts a `usage` has, keeping those it lacks (`message_delta` carries only
    /// the output's); the cached tokens stay unknown (see the module doc).
    fn merge_usage(&mut self, usage: Option<RawUsage>) {
        let Some(u) = usage else { return };
        let old = self.out.usage.unwrap_or_default();
        self.out.usage = Some(Usage {
            prompt_tokens: u.prompt_tokens.unwrap_or(old.prompt_tokens),
            completion_tokens: u.completion_tokens.unwrap_or(old.completion_tokens),
            cached_tokens: None,
        });
    }
}
