//! OpenAI request parsing: model, stream flag, and the canonical prompt.
//!
//! Six request kinds are understood: `/v1/chat/completions` (`messages`, with string content
//! or content parts, of any role), `/v1/completions` (`prompt`: a string, an array of
//! strings, token ids or arrays of token ids), the Responses API's `/v1/responses`
//! (`instructions`, `input`, `previous_response_id`: [`responses`]), the Anthropic
//! Messages API's `/v1/messages` (`system`, `messages` of content blocks: [`anthropic`]),
//! SGLang's native `/generate` (`text` or `input_ids`, read as a completions prompt; the
//! `inputs` of Text Generation Inference's `/generate` and the `prompt` of vLLM's demo server
//! alike) and llama.cpp's native `/completion` (`prompt`); those two engines' own APIs need no
//! `model` (the router's only model when absent). Only what routing needs is extracted; every
//! other field is skipped without being copied.
//!
//! The prompt is not the raw JSON: it is a canonical rendering, so two clients that format
//! the same conversation differently (key order, whitespace, escapes) hash the same. For chat:
//! for every message `<|role|>\n`, then its text parts separated by `\n`, then the function
//! name and arguments of each tool call, then `\n`. The request's tool definitions (`tools`,
//! or the older `functions`), which the engine's chat template renders into the prompt, come
//! after the leading system messages as `<|tools|>\n`, their JSON as sent, `\n` (so agents
//! with different tools part there, and their size counts in the prefill). A media part (an
//! image, audio clip or video: `image_url`, `input_audio`, `video_url`, a Responses
//! `input_image`, an Anthropic `image` or `document` block) renders in its place as a marker
//! and a hash of its URL, data or file id ([`PrefixHasher::feed_media`]), and adds
//! `media_part_tokens` to the prompt's length. For
//! completions: the prompt string; several prompts are joined with `\n`; token ids are each 4
//! bytes, little-endian ([`PrefixHasher::feed_tokens`]). A Responses or Messages request
//! renders as the chat of the same conversation ([`responses`], [`anthropic`]).
//! The rendering is streamed straight into the prefix hasher; it is never materialised.
//!
//! A request that names a cache domain (vLLM's `cache_salt`, SGLang's `extra_key`) or a LoRA
//! adapter (SGLang's `lora_path`) is hashed in that domain ([`PrefixHasher::isolate`]): the
//! engine shares its KV cache with no request of another.
//!
//! Prompt length, used for prefill-load accounting, is the number of characters of that
//! rendering (tokens ≈ characters / 4 where a token estimate is reported).
//!
//! Files: `body.rs` holds the JSON shapes read from a body, `render.rs` the rendering into the
//! hasher, `responses.rs` and `anthropic.rs` those two APIs' shapes and rendering; this file
//! the parse that ties them together.

use crate::error::PickError;
use crate::hashing::{PrefixHasher, CHARS_PER_TOKEN};

pub(crate) mod anthropic;
mod body;
mod render;
pub(crate) mod responses;

use body::{Body, Prompt};
pub(crate) use body::{JsonStr, Part};
use render::PromptForm;
pub(crate) use render::{close_message, open_message, tool_call};
use render::{is_system_role, render_message, render_prompt, render_tools, tool_definitions};

/// Which OpenAI endpoint a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// `/v1/chat/completions`
    Chat,
    /// `/v1/completions`
    Completions,
    /// `/v1/responses` (the OpenAI Responses API)
    Responses,
    /// `/v1/messages` (the Anthropic Messages API)
    Messages,
    /// `/generate` (SGLang's native API: `text` or `input_ids`, no `model` needed)
    Generate,
    /// `/completion` (llama.cpp server's native API: `prompt`, no `model` needed)
    LlamaCompletion,
}

impl RequestKind {
    /// Kind named by a request path (query string ignored), if it is one we know.
    pub fn from_path(path: &str) -> Option<Self> {
        let path = path.split('?').next().unwrap_or(path);
        match path.trim_end_matches('/') {
            p if p.ends_with("/chat/completions") => Some(Self::Chat),
            p if p.ends_with("/completions") => Some(Self::Completions),
            p if p.ends_with("/responses") => Some(Self::Responses),
            p if p.ends_with("/messages") => Some(Self::Messages),
            // (not Triton's /v2/models/{model}/generate, which only the gateway sends)
            p if p.ends_with("/generate") && !p.contains("/models/") => Some(Self::Generate),
            p if p.ends_with("/completion") => Some(Self::LlamaCompletion),
            _ => None,
        }
    }

    /// An engine's own API, whose body names no model (the engine serves one): the router's
    /// only model is the request's when it names none, and the body never has one written in.
    pub fn is_engine_native(self) -> bool {
        matches!(self, Self::Generate | Self::LlamaCompletion)
    }
}

/// What routing needs from a request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedRequest {
    /// The `model` field.
    pub model: String,
    /// The `stream` flag (false when absent).
    pub stream: bool,
    /// Chat, completions, responses or messages.
    pub kind: RequestKind,
    /// Cumulative prefix hashes of the canonical prompt.
    pub prefix_hashes: Vec<u64>,
    /// Length of the canonical prompt in characters.
    pub prompt_chars: u64,
    /// The OpenAI `user` field, when it is a string and [`Extract::user`] asked for it.
    pub user: Option<String>,
    /// The OpenAI `prompt_cache_key` field, when it is a string and [`Extract::cache_key`]
    /// asked for it.
    pub cache_key: Option<String>,
    /// Responses API: the `previous_response_id` this request continues (its engine holds
    /// that conversation; no other does).
    pub previous_response: Option<String>,
    /// `/generate` with one prompt of token ids (`input_ids`): the next turn resends them
    /// followed by the answer's `output_ids`, which are what is learned.
    pub token_prompt: bool,
}

/// What [`parse_with_tail`] extracts beyond what every pick needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extract<'m> {
    /// The model of a `/generate` request that names none (SGLang's native API has no
    /// `model` field): the router's only model, if it has one.
    pub default_model: Option<&'m str>,
    /// Tokens each media part (image, audio, video) adds to the prompt's length
    /// (`media_part_tokens`).
    pub media_part_tokens: u64,
    /// The hasher at the end of the prompt, to learn the answer (`learn_response_bytes`).
    pub tail: bool,
    /// The `user` field (`session_affinity.user_field`).
    pub user: bool,
    /// The `prompt_cache_key` field (`session_affinity.cache_key_field`).
    pub cache_key: bool,
}

/// Parses a request body. `kind` comes from the request path when the host knows it;
/// otherwise the body decides (`messages` → chat, `prompt` → completions).
pub fn parse(
    body: &[u8],
    kind: Option<RequestKind>,
    chunk_bytes: usize,
) -> Result<ParsedRequest, PickError> {
    parse_with_tail(body, kind, chunk_bytes, Extract::default()).map(|(p, _)| p)
}

/// [`parse`], also giving the hasher at the end of the prompt (see [`PrefixHasher::take_hashes`])
/// when `extract.tail` and the next turn extends this prompt (a chat, or a completion of one
/// prompt): to learn the answer ([`crate::response`]); and the `user` and `prompt_cache_key`
/// fields when `extract` asks for them.
pub fn parse_with_tail(
    body: &[u8],
    kind: Option<RequestKind>,
    chunk_bytes: usize,
    extract: Extract,
) -> Result<(ParsedRequest, Option<PrefixHasher>), PickError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(PickError::bad_request(
            "request body is empty: expected an OpenAI JSON request",
            None,
        ));
    }
    // UTF-8 checked once for the whole body (SIMD), not string by string by serde_json.
    let text = simdutf8::compat::from_utf8(body).map_err(|e| {
        PickError::bad_request(
            format!(
                "invalid JSON body: not UTF-8 at byte {} (JSON text is UTF-8)",
                e.valid_up_to()
            ),
            None,
        )
    })?;
    let parsed: Body = serde_json::from_str(text)
        .map_err(|e| PickError::bad_request(format!("invalid JSON body: {e}"), None))?;

    let model =
        match (&parsed.model, kind, extract.default_model) {
            (Some(m), _, _) if !m.is_empty() => &**m,
            (None, Some(k), Some(default)) if k.is_engine_native() => default,
            (None, Some(k), None) if k.is_engine_native() => return Err(PickError::bad_request(
                "a request of an engine's own API (/generate, /completion) that names no model \
                 needs a gateway that routes one model: several are routed here, add \"model\" \
                 to the body",
                Some("model"),
            )),
            _ => {
                return Err(PickError::bad_request(
                    "you must provide a model parameter",
                    Some("model"),
                ))
            }
        };
    let kind = match kind {
        Some(k) => k,
        None if parsed.messages.is_some() => RequestKind::Chat,
        None if parsed.prompt.is_some() => RequestKind::Completions,
        None => {
            return Err(PickError::bad_request(
                "request has neither messages nor prompt",
                Some("messages"),
            ))
        }
    };

    let mut hasher = PrefixHasher::new(model, chunk_bytes);
    // the engine keeps the caches of different salts and adapters apart: so do the hashes
    let isolation = [
        ("cache_salt", parsed.cache_salt),
        ("extra_key", parsed.extra_key),
        ("lora_path", parsed.lora_path),
    ];
    for (field, value) in isolation {
        if let Some(value) = value {
            hasher.isolate(field.as_bytes(), value.get().as_bytes());
        }
    }
    let mut extendable = true;
    let mut token_prompt = false;
    let previous_response = (parsed.previous_response_id)
        .filter(|id| kind == RequestKind::Responses && !id.is_empty())
        .map(|id| id.to_string());
    match kind {
        RequestKind::Chat => {
            let messages = parsed.messages.unwrap_or_default();
            if messages.is_empty() {
                return Err(PickError::bad_request(
                    "messages must be a non-empty array",
                    Some("messages"),
                ));
            }
            // the tool definitions after the leading system messages, where templates put them
            let mut tools = tool_definitions(parsed.tools.or(parsed.functions));
            for (i, m) in messages.iter().enumerate() {
                if !m.role.as_deref().is_some_and(is_system_role) {
                    render_tools(&mut hasher, tools.take());
                }
                render_message(&mut hasher, m, i)?;
            }
            render_tools(&mut hasher, tools);
        }
        RequestKind::Completions | RequestKind::LlamaCompletion => {
            // (token ids: the answer comes back as text, which the next prompt's ids do not
            // spell: nothing to learn)
            let form = render_prompt(&mut hasher, parsed.prompt, "prompt")?;
            extendable = form == PromptForm::OneText;
        }
        RequestKind::Generate => {
            // SGLang's `text` or `input_ids`, Text Generation Inference's `inputs`, or the
            // `prompt` of vLLM's demo API server, which all serve `/generate`
            let (raw, param) = match (parsed.text, parsed.input_ids, parsed.inputs) {
                (Some(text), _, _) => (Some(text), "text"),
                (None, Some(ids), _) => (Some(ids), "input_ids"),
                (None, None, Some(inputs)) => (Some(inputs), "inputs"),
                (None, None, None) if parsed.prompt.is_some() => (None, "prompt"),
                (None, None, None) => {
                    return Err(PickError::bad_request(
                        "a /generate request needs its prompt: text or input_ids (SGLang), \
                         inputs (Text Generation Inference) or prompt",
                        Some("text"),
                    ))
                }
            };
            let prompt = raw
                .map(|raw| serde_json::from_str::<Prompt>(raw.get()))
                .transpose()
                .map_err(|e| {
                    PickError::bad_request(format!("invalid {param}: {e}"), Some(param))
                })?;
            // SGLang answers token ids with their `output_ids`: a next turn of ids extends them
            let form = render_prompt(&mut hasher, prompt.or(parsed.prompt), param)?;
            extendable = form != PromptForm::Several;
            token_prompt = form == PromptForm::OneOfIds;
        }
        RequestKind::Messages => {
            let tools = tool_definitions(parsed.tools);
            anthropic::render(&mut hasher, &parsed.system, tools, parsed.messages)?
        }
        RequestKind::Responses => {
            let tools = tool_definitions(parsed.tools);
            let instructions = parsed.instructions.as_deref();
            responses::render(&mut hasher, instructions, tools, parsed.input)?;
            // A client that names the previous answer sends only what is new: its next turn
            // will too, and never extends this rendering.
            extendable = previous_response.is_none();
        }
    }
    let (prefix_hashes, text_chars) = hasher.take_hashes();
    let media_chars = hasher.media_parts() * extract.media_part_tokens * CHARS_PER_TOKEN;
    let prompt_chars = text_chars + media_chars;
    let tail = (extract.tail && extendable).then_some(hasher);
    let string_if = |raw: Option<&serde_json::value::RawValue>, wanted: bool| {
        raw.filter(|_| wanted)
            .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok())
    };
    let user = string_if(parsed.user, extract.user);
    let cache_key = string_if(parsed.prompt_cache_key, extract.cache_key);
    let parsed = ParsedRequest {
        model: model.to_owned(),
        stream: parsed.stream.unwrap_or(false),
        kind,
        prefix_hashes,
        prompt_chars,
        user,
        cache_key,
        previous_response,
        token_prompt,
    };
    Ok((parsed, tail))
}

#[cfg(test)]
mod tests;
