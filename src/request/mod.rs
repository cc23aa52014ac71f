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

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

use crate::error::PickError;
use crate::hashing::{PrefixHasher, CHARS_PER_TOKEN};

pub(crate) mod anthropic;
pub(crate) mod responses;

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

/// A JSON string borrowed from the input when it has no escapes (copied only when it has).
///
/// serde's own `Cow<str>` always copies inside an `Option` or a `Vec`; this one borrows
/// wherever it sits, which saves an allocation per string on the request path.
pub(crate) struct JsonStr<'a>(Cow<'a, str>);

impl std::ops::Deref for JsonStr<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for JsonStr<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = JsonStr<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(JsonStr(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(JsonStr(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(JsonStr(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V(std::marker::PhantomData))
    }
}

#[derive(Deserialize)]
struct Body<'a> {
    #[serde(borrow, default)]
    model: Option<JsonStr<'a>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(borrow, default)]
    messages: Option<Vec<Message<'a>>>,
    #[serde(borrow, default)]
    prompt: Option<Prompt<'a>>,
    /// Responses API: the conversation's new items (or one user message).
    #[serde(borrow, default)]
    input: Option<responses::Input<'a>>,
    /// Responses API: the system message.
    #[serde(borrow, default)]
    instructions: Option<JsonStr<'a>>,
    /// Responses API: the stored answer this request continues.
    #[serde(borrow, default)]
    previous_response_id: Option<JsonStr<'a>>,
    /// Messages API: the system prompt (a string or text blocks).
    #[serde(borrow, default)]
    system: Content<'a>,
    /// Raw: read as a string only when asked ([`Extract::user`]); any other value is ignored.
    #[serde(borrow, default)]
    user: Option<&'a serde_json::value::RawValue>,
    /// Raw, like `user` ([`Extract::cache_key`]).
    #[serde(borrow, default)]
    prompt_cache_key: Option<&'a serde_json::value::RawValue>,
    /// `/generate`: the prompt (a string or strings). Raw: read as a prompt only for that
    /// kind (a Responses request's `text` is an object of its own).
    #[serde(borrow, default)]
    text: Option<&'a serde_json::value::RawValue>,
    /// `/generate`: the prompt as token ids (an array, or arrays). Raw, like `text`.
    #[serde(borrow, default)]
    input_ids: Option<&'a serde_json::value::RawValue>,
    /// `/generate` of Text Generation Inference: the prompt (a string). Raw, like `text`.
    #[serde(borrow, default)]
    inputs: Option<&'a serde_json::value::RawValue>,
    /// Chat, Responses, Messages: the tool definitions, which the engine's chat template
    /// renders into the prompt ([`tool_definitions`]). Raw: hashed as sent.
    #[serde(borrow, default)]
    tools: Option<&'a serde_json::value::RawValue>,
    /// Chat: the deprecated `functions` (the tool definitions of older clients).
    #[serde(borrow, default)]
    functions: Option<&'a serde_json::value::RawValue>,
    /// vLLM: the cache domain of the request (its KV cache is shared only with requests of
    /// the same salt). Raw: any value, as sent, is its domain.
    #[serde(borrow, default)]
    cache_salt: Option<&'a serde_json::value::RawValue>,
    /// SGLang: the cache domain of the request (as vLLM's `cache_salt`).
    #[serde(borrow, default)]
    extra_key: Option<&'a serde_json::value::RawValue>,
    /// SGLang: the LoRA adapter of the request (each adapter's KV cache is its own).
    #[serde(borrow, default)]
    lora_path: Option<&'a serde_json::value::RawValue>,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default)]
    role: Option<JsonStr<'a>>,
    #[serde(borrow, default)]
    content: Content<'a>,
    #[serde(borrow, default)]
    tool_calls: Option<Vec<ToolCall<'a>>>,
}

#[derive(Deserialize)]
struct ToolCall<'a> {
    #[serde(borrow, default)]
    function: Option<FunctionCall<'a>>,
}

#[derive(Deserialize)]
struct FunctionCall<'a> {
    #[serde(borrow, default)]
    name: Option<JsonStr<'a>>,
    /// A JSON-encoded string (OpenAI), or the arguments' JSON itself (some clients send an
    /// object; vLLM takes both).
    #[serde(borrow, default)]
    arguments: Option<&'a serde_json::value::RawValue>,
}

/// A tool call's arguments as rendered: a string's text, any other value's JSON as sent.
fn arguments_text(
    arguments: Option<&serde_json::value::RawValue>,
) -> Result<Cow<'_, str>, serde_json::Error> {
    match arguments.map(|a| a.get()) {
        None => Ok(Cow::Borrowed("")),
        Some(raw) if raw.starts_with('"') => serde_json::from_str::<JsonStr>(raw).map(|s| s.0),
        Some(raw) => Ok(Cow::Borrowed(raw)),
    }
}

/// A content part (chat, Responses), or a content block (Messages API: also of an answer,
/// and a streamed block's delta, [`crate::response`]).
#[derive(Deserialize)]
pub(crate) struct Part<'a> {
    #[serde(rename = "type", borrow, default)]
    pub(crate) kind: Option<JsonStr<'a>>,
    #[serde(borrow, default)]
    pub(crate) text: Option<JsonStr<'a>>,
    /// Messages API `tool_use`: the tool's name.
    #[serde(borrow, default)]
    pub(crate) name: Option<JsonStr<'a>>,
    /// Messages API `tool_result`: a string or text blocks.
    #[serde(borrow, default)]
    content: Content<'a>,
    /// A chat `image_url` part's image (`{"url"}`), a Responses `input_image`'s (a string).
    #[serde(borrow, default)]
    image_url: Option<Media<'a>>,
    /// A chat `video_url` part's video (vLLM).
    #[serde(borrow, default)]
    video_url: Option<Media<'a>>,
    /// A chat `input_audio` part's audio (`{"data", "format"}`).
    #[serde(borrow, default)]
    input_audio: Option<Media<'a>>,
    /// A Messages API `image` or `document` block's source (`{"data"}` or `{"url"}`).
    #[serde(borrow, default)]
    source: Option<Media<'a>>,
    /// A Responses `input_image` or `input_file` given by file id.
    #[serde(borrow, default)]
    file_id: Option<JsonStr<'a>>,
}

impl Part<'_> {
    /// True when the part's `type` is `kind`.
    pub(crate) fn is(&self, kind: &str) -> bool {
        self.kind.as_deref() == Some(kind)
    }

    /// What identifies the medium of a media part (an image, audio clip, video or file): its
    /// URL, data or file id. None for text and tool parts.
    pub(crate) fn media(&self) -> Option<&str> {
        [
            &self.image_url,
            &self.video_url,
            &self.input_audio,
            &self.source,
        ]
        .into_iter()
        .find_map(|m| m.as_ref().and_then(|m| m.0.as_deref()))
        .or(self.file_id.as_deref())
    }
}

/// A media reference: a string (a URL), or an object whose `url`, `data` or `file_id` says
/// which medium it is (its other fields, such as `detail` or `format`, do not).
pub(crate) struct Media<'a>(Option<JsonStr<'a>>);

impl<'de: 'a, 'a> Deserialize<'de> for Media<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Media<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a URL or an object with a url, data or file_id")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Media(Some(JsonStr(Cow::Borrowed(v)))))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Media(Some(JsonStr(Cow::Owned(v.to_owned())))))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Media(None))
            }
            fn visit_map<M: de::MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut found = None;
                while let Some(key) = map.next_key::<JsonStr<'de>>()? {
                    if found.is_none() && matches!(&*key, "url" | "data" | "file_id") {
                        found = map.next_value::<Option<JsonStr<'a>>>()?;
                    } else {
                        map.next_value::<de::IgnoredAny>()?;
                    }
                }
                Ok(Media(found))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// Message content: absent/null, a string, or an array of parts.
#[derive(Default)]
enum Content<'a> {
    #[default]
    Empty,
    Text(Cow<'a, str>),
    Parts(Vec<Part<'a>>),
}

impl<'de: 'a, 'a> Deserialize<'de> for Content<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Content<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, an array of content parts, or null")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Content::Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Content::Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Content::Text(Cow::Owned(v)))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Content::Empty)
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Content::Empty)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut parts = Vec::with_capacity(seq.size_hint().unwrap_or(1));
                while let Some(p) = seq.next_element::<Part<'a>>()? {
                    parts.push(p);
                }
                Ok(Content::Parts(parts))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// Completions prompt: a string, an array of strings, token ids, or arrays of token ids (the
/// four forms of the OpenAI API; vLLM and SGLang take them all).
enum Prompt<'a> {
    One(Cow<'a, str>),
    Many(Vec<JsonStr<'a>>),
    Tokens(Vec<u32>),
    ManyTokens(Vec<Vec<u32>>),
}

/// One element of a prompt array: a string, a token id, or an array of token ids.
enum PromptItem<'a> {
    Text(JsonStr<'a>),
    Token(u32),
    Tokens(Vec<u32>),
}

impl<'de: 'a, 'a> Deserialize<'de> for PromptItem<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = PromptItem<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, a token id or an array of token ids")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(PromptItem::Text(JsonStr(Cow::Borrowed(v))))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(PromptItem::Text(JsonStr(Cow::Owned(v.to_owned()))))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(PromptItem::Text(JsonStr(Cow::Owned(v))))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                u32::try_from(v)
                    .map(PromptItem::Token)
                    .map_err(|_| E::custom(format!("token id {v} out of range")))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                Vec::<u32>::deserialize(de::value::SeqAccessDeserializer::new(seq))
                    .map(PromptItem::Tokens)
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// `first` and the rest of `seq`, each of the same form as `first` (`same` takes it out of
/// the item, `None` for another form: the array mixes forms).
fn alike<'de: 'a, 'a, A: SeqAccess<'de>, T>(
    mut seq: A,
    first: T,
    same: impl Fn(PromptItem<'a>) -> Option<T>,
) -> Result<Vec<T>, A::Error> {
    let mut all = vec![first];
    while let Some(item) = seq.next_element::<PromptItem<'a>>()? {
        let item = same(item)
            .ok_or_else(|| de::Error::custom("prompt array mixes strings, token ids and arrays"))?;
        all.push(item);
    }
    Ok(all)
}

impl<'de: 'a, 'a> Deserialize<'de> for Prompt<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Prompt<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, an array of strings, of token ids or of token id arrays")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Prompt::One(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Prompt::One(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Prompt::One(Cow::Owned(v)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                // the first element says which array it is; the others must be alike
                let Some(first) = seq.next_element::<PromptItem<'a>>()? else {
                    return Ok(Prompt::Many(Vec::new()));
                };
                Ok(match first {
                    PromptItem::Text(t) => Prompt::Many(alike(seq, t, |i| match i {
                        PromptItem::Text(t) => Some(t),
                        _ => None,
                    })?),
                    PromptItem::Token(t) => Prompt::Tokens(alike(seq, t, |i| match i {
                        PromptItem::Token(t) => Some(t),
                        _ => None,
                    })?),
                    PromptItem::Tokens(ts) => Prompt::ManyTokens(alike(seq, ts, |i| match i {
                        PromptItem::Tokens(ts) => Some(ts),
                        _ => None,
                    })?),
                })
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
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

/// What a completions-style prompt was: what a next turn can extend (one prompt, which its
/// answer follows) and in which form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PromptForm {
    /// One prompt of text.
    OneText,
    /// One prompt of token ids.
    OneOfIds,
    /// Several prompts (a batch): one answer each, no single next turn extends them.
    Several,
}

/// Renders a completions-style prompt (`param`: the field it came from, for errors).
fn render_prompt(
    hasher: &mut PrefixHasher,
    prompt: Option<Prompt>,
    param: &'static str,
) -> Result<PromptForm, PickError> {
    match prompt {
        None => Err(PickError::bad_request(
            format!("you must provide a {param} parameter"),
            Some(param),
        )),
        Some(Prompt::One(p)) => {
            hasher.feed_str(&p);
            Ok(PromptForm::OneText)
        }
        Some(Prompt::Many(ps)) => {
            if ps.is_empty() {
                return Err(PickError::bad_request(
                    format!("{param} must not be an empty array"),
                    Some(param),
                ));
            }
            for (i, p) in ps.iter().enumerate() {
                if i > 0 {
                    hasher.feed(b"\n");
                }
                hasher.feed_str(p);
            }
            Ok(match ps.len() {
                1 => PromptForm::OneText,
                _ => PromptForm::Several,
            })
        }
        // Token ids: hashed as tokens, so the same ids share a prefix.
        Some(Prompt::Tokens(ts)) => {
            hasher.feed_tokens(&ts);
            Ok(PromptForm::OneOfIds)
        }
        Some(Prompt::ManyTokens(tss)) => {
            if tss.iter().any(Vec::is_empty) {
                return Err(PickError::bad_request(
                    format!("{param} must not contain an empty token array"),
                    Some(param),
                ));
            }
            for ts in &tss {
                hasher.feed_tokens(ts);
            }
            Ok(PromptForm::Several)
        }
    }
}

fn render_message(h: &mut PrefixHasher, m: &Message, index: usize) -> Result<(), PickError> {
    let role = match m.role.as_deref() {
        Some(r) if !r.is_empty() => r,
        _ => {
            return Err(PickError::bad_request(
                format!("messages[{index}].role is required"),
                Some("messages"),
            ))
        }
    };
    open_message(h, role.as_bytes());
    render_content(h, &m.content);
    for call in m.tool_calls.iter().flatten() {
        if let Some(f) = &call.function {
            let arguments = arguments_text(f.arguments).map_err(|e| {
                PickError::bad_request(format!("invalid JSON body: {e}"), Some("messages"))
            })?;
            tool_call(
                h,
                f.name.as_deref().unwrap_or("").as_bytes(),
                arguments.as_bytes(),
            );
        }
    }
    close_message(h);
    Ok(())
}

/// Renders a message's content: a string, or its text parts separated by `\n` (`text`, and
/// the Responses API's `input_text` and `output_text`; images and audio are not text).
fn render_content(h: &mut PrefixHasher, content: &Content) {
    match content {
        Content::Empty => {}
        Content::Text(t) => h.feed_str(t),
        Content::Parts(parts) => {
            let mut first = true;
            for p in parts {
                let is_text = matches!(
                    p.kind.as_deref(),
                    None | Some("text") | Some("input_text") | Some("output_text")
                );
                match (is_text, &p.text, p.media()) {
                    (true, Some(t), _) => {
                        if !first {
                            h.feed(b"\n");
                        }
                        h.feed_str(t);
                    }
                    (false, _, Some(medium)) => {
                        if !first {
                            h.feed(b"\n");
                        }
                        h.feed_media(medium.as_bytes());
                    }
                    _ => continue,
                }
                first = false;
            }
        }
    }
}

/// True for the roles of system prompts (`system`, and `developer` of OpenAI's newer models),
/// which a chat template renders before the tool definitions.
pub(crate) fn is_system_role(role: &str) -> bool {
    role == "system" || role == "developer"
}

/// A request's tool definitions (`tools`) as sent: `None` when absent, null or an empty
/// array. Hashed as the client wrote them (a client sends the same definitions, spelt the
/// same, every turn); not a JSON array, they are not definitions an engine would render.
fn tool_definitions(tools: Option<&serde_json::value::RawValue>) -> Option<&str> {
    let raw = tools?.get();
    let inner = raw.strip_prefix('[')?.strip_suffix(']')?;
    (!inner.trim_ascii().is_empty()).then_some(raw)
}

/// Renders the tool definitions, if any: `<|tools|>\n`, their JSON as sent, `\n`; placed
/// after the system prompt and before the conversation, as chat templates place them (Qwen,
/// Hermes, gpt-oss: in the system turn, after its text; the Anthropic API's caching order).
pub(crate) fn render_tools(h: &mut PrefixHasher, tools: Option<&str>) {
    if let Some(tools) = tools {
        open_message(h, b"tools");
        h.feed_str(tools);
        close_message(h);
    }
}

/// Renders the start of a message of `role`: `<|role|>\n`. With [`tool_call`] and
/// [`close_message`], the one definition of the chat rendering (also used to render an
/// answer as the next turn will send it back: [`crate::response`]).
pub(crate) fn open_message(h: &mut PrefixHasher, role: &[u8]) {
    h.feed(b"<|");
    h.feed(role);
    h.feed(b"|>\n");
}

/// Renders one tool call of a message, after its text.
pub(crate) fn tool_call(h: &mut PrefixHasher, name: &[u8], arguments: &[u8]) {
    h.feed(b"\n<|tool_call|>");
    h.feed(name);
    h.feed(b"\n");
    h.feed(arguments);
}

/// Renders the end of a message.
pub(crate) fn close_message(h: &mut PrefixHasher) {
    h.feed(b"\n");
}

#[cfg(test)]
mod tests;
