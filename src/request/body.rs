//! The JSON shapes of request bodies that routing reads: the body's fields, messages, content
//! parts, media references and completions prompts, each deserialized borrowing from the body
//! (no string is copied unless it holds escapes, [`JsonStr`]) and skipping every other field.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

use super::responses;

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
pub(super) struct Body<'a> {
    #[serde(borrow, default)]
    pub(super) model: Option<JsonStr<'a>>,
    #[serde(default)]
    pub(super) stream: Option<bool>,
    #[serde(borrow, default)]
    pub(super) messages: Option<Vec<Message<'a>>>,
    #[serde(borrow, default)]
    pub(super) prompt: Option<Prompt<'a>>,
    /// Responses API: the conversation's new items (or one user message).
    #[serde(borrow, default)]
    pub(super) input: Option<responses::Input<'a>>,
    /// Responses API: the system message.
    #[serde(borrow, default)]
    pub(super) instructions: Option<JsonStr<'a>>,
    /// Responses API: the stored answer this request continues.
    #[serde(borrow, default)]
    pub(super) previous_response_id: Option<JsonStr<'a>>,
    /// Messages API: the system prompt (a string or text blocks).
    #[serde(borrow, default)]
    pub(super) system: Content<'a>,
    /// Raw: read as a string only when asked ([`super::Extract::user`]); any other value is
    /// ignored.
    #[serde(borrow, default)]
    pub(super) user: Option<&'a serde_json::value::RawValue>,
    /// Raw, like `user` ([`super::Extract::cache_key`]).
    #[serde(borrow, default)]
    pub(super) prompt_cache_key: Option<&'a serde_json::value::RawValue>,
    /// `/generate`: the prompt (a string or strings). Raw: read as a prompt only for that
    /// kind (a Responses request's `text` is an object of its own).
    #[serde(borrow, default)]
    pub(super) text: Option<&'a serde_json::value::RawValue>,
    /// `/generate`: the prompt as token ids (an array, or arrays). Raw, like `text`.
    #[serde(borrow, default)]
    pub(super) input_ids: Option<&'a serde_json::value::RawValue>,
    /// `/generate` of Text Generation Inference: the prompt (a string). Raw, like `text`.
    #[serde(borrow, default)]
    pub(super) inputs: Option<&'a serde_json::value::RawValue>,
    /// Chat, Responses, Messages: the tool definitions, which the engine's chat template
    /// renders into the prompt ([`super::render::tool_definitions`]). Raw: hashed as sent.
    #[serde(borrow, default)]
    pub(super) tools: Option<&'a serde_json::value::RawValue>,
    /// Chat: the deprecated `functions` (the tool definitions of older clients).
    #[serde(borrow, default)]
    pub(super) functions: Option<&'a serde_json::value::RawValue>,
    /// vLLM: the cache domain of the request (its KV cache is shared only with requests of
    /// the same salt). Raw: any value, as sent, is its domain.
    #[serde(borrow, default)]
    pub(super) cache_salt: Option<&'a serde_json::value::RawValue>,
    /// SGLang: the cache domain of the request (as vLLM's `cache_salt`).
    #[serde(borrow, default)]
    pub(super) extra_key: Option<&'a serde_json::value::RawValue>,
    /// SGLang: the LoRA adapter of the request (each adapter's KV cache is its own).
    #[serde(borrow, default)]
    pub(super) lora_path: Option<&'a serde_json::value::RawValue>,
}

#[derive(Deserialize)]
pub(super) struct Message<'a> {
    #[serde(borrow, default)]
    pub(super) role: Option<JsonStr<'a>>,
    #[serde(borrow, default)]
    pub(super) content: Content<'a>,
    #[serde(borrow, default)]
    pub(super) tool_calls: Option<Vec<ToolCall<'a>>>,
}

#[derive(Deserialize)]
pub(super) struct ToolCall<'a> {
    #[serde(borrow, default)]
    pub(super) function: Option<FunctionCall<'a>>,
}

#[derive(Deserialize)]
pub(super) struct FunctionCall<'a> {
    #[serde(borrow, default)]
    pub(super) name: Option<JsonStr<'a>>,
    /// A JSON-encoded string (OpenAI), or the arguments' JSON itself (some clients send an
    /// object; vLLM takes both).
    #[serde(borrow, default)]
    pub(super) arguments: Option<&'a serde_json::value::RawValue>,
}

/// A tool call's arguments as rendered: a string's text, any other value's JSON as sent.
pub(super) fn arguments_text(
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
    pub(super) content: Content<'a>,
    /// A chat `image_url` part's image (`{"url"}`), a Responses `input_image`'s (a string).
    #[serde(borrow, default)]
    pub(super) image_url: Option<Media<'a>>,
    /// A chat `video_url` part's video (vLLM).
    #[serde(borrow, default)]
    pub(super) video_url: Option<Media<'a>>,
    /// A chat `input_audio` part's audio (`{"data", "format"}`).
    #[serde(borrow, default)]
    pub(super) input_audio: Option<Media<'a>>,
    /// A Messages API `image` or `document` block's source (`{"data"}` or `{"url"}`).
    #[serde(borrow, default)]
    pub(super) source: Option<Media<'a>>,
    /// A Responses `input_image` or `input_file` given by file id.
    #[serde(borrow, default)]
    pub(super) file_id: Option<JsonStr<'a>>,
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
pub(super) enum Content<'a> {
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
pub(super) enum Prompt<'a> {
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
