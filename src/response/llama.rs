//! Answers of llama.cpp server's native `/completion`: one object `{"content", "stop",
//! "tokens_evaluated", "tokens_predicted", "timings": {"cache_n", "prompt_n", "predicted_n"}, …}`,
//! or streamed as `data:` events of the same object, each with only the new `content`, the
//! last with `"stop": true`, the token counts and `timings` (llama.cpp sends no `[DONE]` on
//! this API). The prompt's tokens are `tokens_evaluated` (else `prompt_n + cache_n`), the
//! cached ones `timings.cache_n`: the prompt's tokens the slot's cache already held.

use serde::de::IgnoredAny;
use serde::Deserialize;

use super::{ResponseReader, Usage};
use crate::request::JsonStr;

/// One streamed event, or the whole answer: only the fields read here.
#[derive(Deserialize)]
pub(super) struct Answer<'a> {
    #[serde(borrow, default)]
    content: Option<JsonStr<'a>>,
    #[serde(default)]
    stop: Option<bool>,
    #[serde(default)]
    tokens_evaluated: Option<u64>,
    #[serde(default)]
    tokens_predicted: Option<u64>,
    #[serde(default)]
    timings: Option<Timings>,
    #[serde(default)]
    error: Option<IgnoredAny>,
}

/// llama.cpp's `timings`: the token counts of the prompt's cached and computed parts and of
/// the prediction.
#[derive(Deserialize)]
struct Timings {
    #[serde(default)]
    cache_n: Option<u64>,
    #[serde(default)]
    prompt_n: Option<u64>,
    #[serde(default)]
    predicted_n: Option<u64>,
}

impl ResponseReader {
    /// Applies one `/completion` event or whole answer; false (and capture stopped) for an
    /// error.
    pub(super) fn apply_llama(&mut self, a: Answer) -> bool {
        if a.error.is_some() {
            self.fail();
            return false;
        }
        if let Some(content) = &a.content {
            self.take_text(content.as_bytes());
        }
        if a.stop == Some(true) {
            self.finish_seen = true;
        }
        let cached = a.timings.as_ref().and_then(|t| t.cache_n);
        let computed = a.timings.as_ref().and_then(|t| t.prompt_n);
        let prompt = a
            .tokens_evaluated
            .or(computed.map(|n| n + cached.unwrap_or(0)));
        if let Some(prompt_tokens) = prompt {
            let predicted = a.timings.as_ref().and_then(|t| t.predicted_n);
            self.out.usage = Some(Usage {
                prompt_tokens,
                completion_tokens: a.tokens_predicted.or(predicted).unwrap_or(0),
                cached_tokens: cached,
            });
        }
        true
    }
}
