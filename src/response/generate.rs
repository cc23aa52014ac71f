//! Answers of SGLang's native `/generate`: one object `{"text", "meta_info", …}` (`meta_info`:
//! `prompt_tokens`, `completion_tokens`, `cached_tokens`, `finish_reason`), or, streamed, the
//! same object in each `data:` event, then `data: [DONE]`. SGLang streams the whole text so
//! far in every event (its default) or, with `--incremental-streaming-output`, only the new
//! text: an event whose text extends the text captured so far is read as the whole text,
//! any other as new text. (An incremental event that happens to repeat everything before it
//! is taken for the whole text: rare, and it only shortens what is learned.)

use serde::de::IgnoredAny;
use serde::Deserialize;

use super::{ResponseReader, Usage};
use crate::request::JsonStr;

/// One streamed event, or the whole answer: only the fields read here.
#[derive(Deserialize)]
pub(super) struct Answer<'a> {
    #[serde(borrow, default)]
    text: Option<JsonStr<'a>>,
    #[serde(default)]
    meta_info: Option<MetaInfo>,
    #[serde(default)]
    error: Option<IgnoredAny>,
}

/// SGLang's `meta_info`: its token counts (cumulative in a stream) and the finish reason
/// (null until the end).
#[derive(Deserialize)]
struct MetaInfo {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    cached_tokens: Option<u64>,
    #[serde(default)]
    finish_reason: Option<IgnoredAny>,
}

impl ResponseReader {
    /// Applies one `/generate` event or whole answer; false (and capture stopped) for an
    /// error.
    pub(super) fn apply_generate(&mut self, a: Answer) -> bool {
        if a.error.is_some() {
            self.fail();
            return false;
        }
        if let Some(text) = &a.text {
            let known = self.out.text.as_slice();
            let new = match text.as_bytes().strip_prefix(known) {
                Some(rest) if !known.is_empty() => rest,
                _ => text.as_bytes(),
            };
            self.take_text(new);
        }
        if let Some(m) = a.meta_info {
            if let Some(prompt_tokens) = m.prompt_tokens {
                self.out.usage = Some(Usage {
                    prompt_tokens,
                    completion_tokens: m.completion_tokens.unwrap_or(0),
                    cached_tokens: m.cached_tokens,
                });
            }
            if m.finish_reason.is_some() {
                self.finish_seen = true;
            }
        }
        true
    }
}
