//! Answers of SGLang's native `/generate`: one object `{"text", "meta_info", …}` (`meta_info`:
//! `prompt_tokens`, `completion_tokens`, `cached_tokens`, `finish_reason`), or, streamed, the
//! same object in each `data:` event, then `data: [DONE]`. SGLang streams the whole text so
//! far in every event (its default) or, with `--incremental-streaming-output`, only the new
//! text: an event whose text extends the text captured so far is read as the whole text,
//! any other as new text. (An incremental event that happens to repeat everything before it
//! is taken for the whole text: rare, and it only shortens what is learned.) For a prompt of
//! token ids the answer's `output_ids` are read the same way instead of its text: the next
//! turn of an RL rollout or agent sends the ids back, followed by its own. Text Generation
//! Inference's `/generate` answers `{"generated_text", "details"}`: its text is read alike (it
//! reports no cached tokens).

use serde::de::IgnoredAny;
use serde::Deserialize;

use super::{ResponseReader, Usage};
use crate::request::JsonStr;

/// One streamed event, or the whole answer: only the fields read here.
#[derive(Deserialize)]
pub(super) struct Answer<'a> {
    /// The generated text (Text Generation Inference's `/generate` names it `generated_text`).
    #[serde(borrow, default, alias = "generated_text")]
    text: Option<JsonStr<'a>>,
    /// Parsed only when the ids are learned.
    #[serde(borrow, default)]
    output_ids: Option<&'a serde_json::value::RawValue>,
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
        if self.out.tokens {
            let ids = a
                .output_ids
                .map(|raw| serde_json::from_str::<Vec<u32>>(raw.get()));
            match ids {
                Some(Ok(ids)) => self.take_token_ids(&ids),
                Some(Err(_)) => {
                    self.fail();
                    return false;
                }
                None => {}
            }
        } else if let Some(text) = &a.text {
            self.take_text(after_known(text.as_bytes(), &self.out.text));
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

    /// Takes the new ids of an event's `output_ids` (all so far, or only the new ones), 4
    /// bytes each under the cap.
    fn take_token_ids(&mut self, ids: &[u32]) {
        if self.out.capped {
            return;
        }
        let new = after_known(ids, &self.out.token_ids);
        let take = self.budget(4 * new.len()) / 4;
        self.out.token_ids.extend_from_slice(&new[..take]);
    }
}

/// What `event` adds to `known`: its rest when it starts with all of `known` (the whole so
/// far), else all of it (only the new part).
fn after_known<'e, T: PartialEq>(event: &'e [T], known: &[T]) -> &'e [T] {
    match event.strip_prefix(known) {
        Some(rest) if !known.is_empty() => rest,
        _ => event,
    }
}
