//! OpenAI request parsing: model, stream flag, and the canonical prompt.
//!
//! Two request kinds are understood: `/v1/chat/completions` (`messages`, with string content
//! or content parts, of any role) and `/v1/completions` (`prompt`: a string, an array of
//! strings, token ids or arrays of token ids). Only what routing needs is extracted; every
//! other field is skipped without being copied.
//!
//! The prompt is not the raw JSON: it is a canonical rendering, so two clients that format
//! the same conversation differently (key order, whitespace, escapes) hash the same. For chat:
//! for every message `<|role|>\n`, then its text parts separated by `\n`, then the function
//! name and arguments of each tool call, then `\n`. Non-text parts (images, audio) are not part
//! of the prompt. For completions: the prompt string; several prompts are joined with `\n`;
//! token ids are each 4 bytes, little-endian ([`PrefixHasher::feed_tokens`]).
//! The rendering is streamed straight into the prefix hasher; it is never materialised.
//!
//! Prompt length, used for prefill-load accounting, is the number of characters of that
//! rendering (tokens ≈ characters / 4 where a token estimate is reported).

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

use crate::error::PickError;
use crate::hashing::PrefixHasher;

/// Which OpenAI endpoint a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// `/v1/chat/completions`
    Chat,
    /// `/v1/completions`
    Completions,
}

impl RequestKind {
    /// Kind named by a request path (query string ignored), if it is one we know.
    pub fn from_path(path: &str) -> Option<Self> {
        let path = path.split('?').next().unwrap_or(path);
        match path.trim_end_matches('/') {
            p if p.ends_with("/chat/completions") => Some(Self::Chat),
            p if p.ends_with("/completions") => Some(Self::Completions),
            _ => None,
        }
    }
}

/// What routing needs from a request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedRequest {
    /// The `model` field.
    pub model: String,
    /// The `stream` flag (false when absent).
    pub stream: bool,
    /// Chat or completions.
    pub kind: RequestKind,
    /// Cumulative prefix hashes of the canonical prompt.
    pub prefix_hashes: Vec<u64>,
    /// Length of the canonical prompt in characters.
    pub prompt_chars: u64,
    /// The OpenAI `user` field, when it is a string and [`Extract::user`] asked for it.
    pub user: Option<String>,
}

/// What [`parse_with_tail`] extracts beyond what every pick needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extract {
    /// The hasher at the end of the prompt, to learn the answer (`learn_response_bytes`).
    pub tail: bool,
    /// The `user` field (`session_affinity.user_field`).
    pub user: bool,
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
    /// Raw: read as a string only when asked ([`Extract::user`]); any other value is ignored.
    #[serde(borrow, default)]
    user: Option<&'a serde_json::value::RawValue>,
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

impl FunctionCall<'_> {
    /// The arguments as rendered: a string's text, any other value's JSON as sent.
    fn arguments_text(&self) -> Result<Cow<'_, str>, serde_json::Error> {
        match self.arguments.map(|a| a.get()) {
            None => Ok(Cow::Borrowed("")),
            Some(raw) if raw.starts_with('"') => serde_json::from_str::<JsonStr>(raw).map(|s| s.0),
            Some(raw) => Ok(Cow::Borrowed(raw)),
        }
    }
}

#[derive(Deserialize)]
struct Part<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<JsonStr<'a>>,
    #[serde(borrow, default)]
    text: Option<JsonStr<'a>>,
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
/// prompt): to learn the answer ([`crate::response`]); and the `user` field when
/// `extract.user`.
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

    let model = match &parsed.model {
        Some(m) if !m.is_empty() => &**m,
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
    let mut extendable = true;
    match kind {
        RequestKind::Chat => {
            let messages = parsed.messages.unwrap_or_default();
            if messages.is_empty() {
                return Err(PickError::bad_request(
                    "messages must be a non-empty array",
                    Some("messages"),
                ));
            }
            for (i, m) in messages.iter().enumerate() {
                render_message(&mut hasher, m, i)?;
            }
        }
        RequestKind::Completions => match parsed.prompt {
            None => {
                return Err(PickError::bad_request(
                    "you must provide a prompt parameter",
                    Some("prompt"),
                ))
            }
            Some(Prompt::One(p)) => hasher.feed_str(&p),
            Some(Prompt::Many(ps)) => {
                if ps.is_empty() {
                    return Err(PickError::bad_request(
                        "prompt must not be an empty array",
                        Some("prompt"),
                    ));
                }
                for (i, p) in ps.iter().enumerate() {
                    if i > 0 {
                        hasher.feed(b"\n");
                    }
                    hasher.feed_str(p);
                }
                // One answer per prompt: no single next turn extends them all.
                extendable = ps.len() == 1;
            }
            // Token ids: hashed as tokens, so the same ids share a prefix. The answer comes
            // back as text, which the next prompt's ids do not spell: nothing to learn.
            Some(Prompt::Tokens(ts)) => {
                hasher.feed_tokens(&ts);
                extendable = false;
            }
            Some(Prompt::ManyTokens(tss)) => {
                if tss.iter().any(Vec::is_empty) {
                    return Err(PickError::bad_request(
                        "prompt must not contain an empty token array",
                        Some("prompt"),
                    ));
                }
                for ts in &tss {
                    hasher.feed_tokens(ts);
                }
                extendable = false;
            }
        },
    }
    let (prefix_hashes, prompt_chars) = hasher.take_hashes();
    let tail = (extract.tail && extendable).then_some(hasher);
    let user = (parsed.user)
        .filter(|_| extract.user)
        .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok());
    let parsed = ParsedRequest {
        model: model.to_owned(),
        stream: parsed.stream.unwrap_or(false),
        kind,
        prefix_hashes,
        prompt_chars,
        user,
    };
    Ok((parsed, tail))
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
    match &m.content {
        Content::Empty => {}
        Content::Text(t) => h.feed_str(t),
        Content::Parts(parts) => {
            let mut first = true;
            for p in parts {
                let is_text = matches!(p.kind.as_deref(), None | Some("text") | Some("input_text"));
                if let (true, Some(t)) = (is_text, &p.text) {
                    if !first {
                        h.feed(b"\n");
                    }
                    h.feed_str(t);
                    first = false;
                }
            }
        }
    }
    for call in m.tool_calls.iter().flatten() {
        if let Some(f) = &call.function {
            let arguments = f.arguments_text().map_err(|e| {
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
mod tests {
    use super::*;

    fn p(body: &str) -> Result<ParsedRequest, PickError> {
        parse(body.as_bytes(), None, 512)
    }

    #[test]
    fn chat_with_string_content() {
        let r = p(r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hello"}]}"#)
            .unwrap();
        assert_eq!(r.model, "m");
        assert!(r.stream);
        assert_eq!(r.kind, RequestKind::Chat);
        // "<|user|>\nhello\n"
        assert_eq!(r.prompt_chars, 15);
        assert_eq!(r.prefix_hashes.len(), 1);
    }

    #[test]
    fn canonical_rendering_ignores_json_formatting() {
        let a = p(r#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"a\nb"}]}"#).unwrap();
        let b = p("{ \"messages\" : [ {\"content\": \"be brief\", \"role\": \"system\", \"name\": \"x\"},\n {\"content\": [{\"type\":\"text\",\"text\":\"a\\u000ab\"}], \"role\":\"user\"} ],\n \"model\": \"m\", \"temperature\": 0.3 }").unwrap();
        assert_eq!(a.prefix_hashes, b.prefix_hashes);
        assert_eq!(a.prompt_chars, b.prompt_chars);
    }

    #[test]
    fn image_parts_do_not_count_and_roles_do() {
        let with_image = p(r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}},{"type":"text","text":"what is this"}]}]}"#).unwrap();
        let text_only =
            p(r#"{"model":"m","messages":[{"role":"user","content":"what is this"}]}"#).unwrap();
        assert_eq!(with_image.prefix_hashes, text_only.prefix_hashes);
        let as_system =
            p(r#"{"model":"m","messages":[{"role":"system","content":"what is this"}]}"#).unwrap();
        assert_ne!(as_system.prefix_hashes, text_only.prefix_hashes);
    }

    #[test]
    fn tool_calls_and_tool_messages_are_part_of_the_prompt() {
        let a = p(r#"{"model":"m","messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"1","type":"function","function":{"name":"get","arguments":"{\"x\":1}"}}]},{"role":"tool","tool_call_id":"1","content":"42"}]}"#).unwrap();
        let b = p(r#"{"model":"m","messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"1","type":"function","function":{"name":"get","arguments":"{\"x\":2}"}}]},{"role":"tool","tool_call_id":"1","content":"42"}]}"#).unwrap();
        assert_ne!(a.prefix_hashes, b.prefix_hashes);
        // arguments sent as the object itself (vLLM takes both): its JSON as sent, which is
        // the encoded string's text when written alike
        let object = p(r#"{"model":"m","messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"1","type":"function","function":{"name":"get","arguments":{"x":1}}}]},{"role":"tool","tool_call_id":"1","content":"42"}]}"#).unwrap();
        assert_eq!(object.prefix_hashes, a.prefix_hashes);
        assert_eq!(object.prompt_chars, a.prompt_chars);
        let args = |args: &str| {
            let body = format!(
                r#"{{"model":"m","messages":[{{"role":"assistant","tool_calls":[{{"function":{{"name":"get"{args}}}}}]}}]}}"#
            );
            p(&body).unwrap().prefix_hashes
        };
        assert_eq!(args(""), args(r#","arguments":null"#));
        assert_eq!(args(""), args(r#","arguments":"""#));
        assert_ne!(args(""), args(r#","arguments":[1]"#));
    }

    #[test]
    fn escaped_strings_read_like_plain_ones() {
        let plain = p(r#"{"model":"m1","messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        let escaped =
            p(r#"{"model":"m\u0031","messages":[{"role":"\u0075ser","content":"hi"}]}"#).unwrap();
        assert_eq!(escaped.model, "m1");
        assert_eq!(escaped.prefix_hashes, plain.prefix_hashes);
        let many = |b: &str| parse(b.as_bytes(), Some(RequestKind::Completions), 512).unwrap();
        assert_eq!(
            many(r#"{"model":"m","prompt":["a\n","b"]}"#).prefix_hashes,
            many(r#"{"model":"m","prompt":["a\u000a","b"]}"#).prefix_hashes
        );
    }

    #[test]
    fn completions_string_and_array() {
        let one = parse(
            br#"{"model":"m","prompt":"once upon a time"}"#,
            Some(RequestKind::Completions),
            512,
        )
        .unwrap();
        assert_eq!(one.kind, RequestKind::Completions);
        assert_eq!(one.prompt_chars, 16);
        let many = p(r#"{"model":"m","prompt":["once upon", "a time"]}"#).unwrap();
        assert_eq!(many.kind, RequestKind::Completions);
        assert_eq!(many.prompt_chars, 16);
    }

    #[test]
    fn completions_of_token_ids() {
        // 300 token ids (1,200 bytes: two full 512-byte chunks), then another question
        let ids = |tail: u32| {
            let v: Vec<u32> = (0..300).chain([tail]).collect();
            serde_json::to_string(&v).unwrap()
        };
        let tokens = |body: String| {
            parse_with_tail(
                body.as_bytes(),
                None,
                512,
                Extract {
                    tail: true,
                    ..Extract::default()
                },
            )
            .unwrap()
        };
        let (a, tail) = tokens(format!(r#"{{"model":"m","prompt":{}}}"#, ids(7)));
        let (b, _) = tokens(format!(r#"{{"model":"m","prompt":{}}}"#, ids(8)));
        assert_eq!(a.kind, RequestKind::Completions);
        assert_eq!(a.prompt_chars, 301 * 4, "4 characters per token");
        assert_eq!(a.prefix_hashes.len(), 3);
        assert_eq!(
            a.prefix_hashes[..2],
            b.prefix_hashes[..2],
            "the same ids, the same prefix"
        );
        assert_ne!(a.prefix_hashes[2], b.prefix_hashes[2]);
        assert!(
            tail.is_none(),
            "an answer in text does not extend token ids"
        );
        // arrays of token arrays: one after the other, as the strings of an array are
        let (many, _) = tokens(format!(r#"{{"model":"m","prompt":[{},[1,2]]}}"#, ids(7)));
        assert_eq!(many.prompt_chars, (301 + 2) * 4);
        assert_eq!(many.prefix_hashes[..2], a.prefix_hashes[..2]);
        // the largest id
        let max = p(r#"{"model":"m","prompt":[4294967295]}"#).unwrap();
        assert_eq!((max.prompt_chars, max.prefix_hashes.len()), (4, 1));
    }

    #[test]
    fn the_user_field_only_when_asked_and_only_a_string() {
        let user = |body: &str| {
            let want = Extract {
                user: true,
                ..Extract::default()
            };
            parse_with_tail(body.as_bytes(), None, 512, want)
                .unwrap()
                .0
                .user
        };
        let chat = r#"{"model":"m","user":"alice","messages":[{"role":"user","content":"x"}]}"#;
        assert_eq!(user(chat).as_deref(), Some("alice"));
        assert_eq!(p(chat).unwrap().user, None, "not asked");
        assert_eq!(
            user(r#"{"model":"m","prompt":"x","user":"b\u00f6b"}"#).as_deref(),
            Some("böb")
        );
        // anything but a string is ignored, as it was before the field was read
        for other in ["7", "null", "true", "[1, {\"a\": 2}]", "{\"id\": \"x\"}"] {
            let body = format!(r#"{{"model":"m","user":{other},"prompt":"x"}}"#);
            assert_eq!(user(&body), None, "{body}");
            assert!(p(&body).is_ok(), "{body}");
        }
    }

    #[test]
    fn path_decides_the_kind() {
        assert_eq!(
            RequestKind::from_path("/v1/chat/completions?x=1"),
            Some(RequestKind::Chat)
        );
        assert_eq!(
            RequestKind::from_path("/v1/completions"),
            Some(RequestKind::Completions)
        );
        assert_eq!(RequestKind::from_path("/v1/embeddings"), None);
        // A chat body sent to /v1/completions lacks a prompt.
        let e = parse(
            br#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#,
            Some(RequestKind::Completions),
            512,
        )
        .unwrap_err();
        assert_eq!(e.http_status(), 400);
    }

    #[test]
    fn bad_requests_are_400_with_reason() {
        let cases = [
            ("", "request body is empty"),
            ("   ", "request body is empty"),
            ("{\"model\":", "invalid JSON body"),
            ("[1,2]", "invalid JSON body"),
            (
                r#"{"messages":[{"role":"user","content":"x"}]}"#,
                "you must provide a model parameter",
            ),
            (
                r#"{"model":"","messages":[{"role":"user","content":"x"}]}"#,
                "you must provide a model parameter",
            ),
            (
                r#"{"model":7,"messages":[]}"#,
                "invalid JSON body: invalid type: integer",
            ),
            (
                r#"{"model":"m","messages":[]}"#,
                "messages must be a non-empty array",
            ),
            (
                r#"{"model":"m"}"#,
                "request has neither messages nor prompt",
            ),
            (
                r#"{"model":"m","messages":[{"content":"x"}]}"#,
                "messages[0].role is required",
            ),
            (
                r#"{"model":"m","stream":"yes","messages":[{"role":"user","content":"x"}]}"#,
                "invalid JSON body: invalid type: string",
            ),
            (
                r#"{"model":"m","prompt":[]}"#,
                "prompt must not be an empty array",
            ),
            (r#"{"model":"m","prompt":42}"#, "invalid JSON body"),
            (
                r#"{"model":"m","prompt":[1,"a"]}"#,
                "invalid JSON body: prompt array mixes strings, token ids and arrays",
            ),
            (
                r#"{"model":"m","prompt":["a",[1]]}"#,
                "invalid JSON body: prompt array mixes",
            ),
            (r#"{"model":"m","prompt":[-1]}"#, "invalid JSON body"),
            (
                r#"{"model":"m","prompt":[4294967296]}"#,
                "invalid JSON body: token id 4294967296 out of range",
            ),
            (r#"{"model":"m","prompt":[[1,"a"]]}"#, "invalid JSON body"),
            (
                r#"{"model":"m","prompt":[[1],[]]}"#,
                "prompt must not contain an empty token array",
            ),
        ];
        for (body, want) in cases {
            let e = p(body).unwrap_err();
            assert_eq!(e.http_status(), 400, "{body}");
            assert!(e.to_string().starts_with(want), "{body}: {e}");
        }
    }

    #[test]
    fn invalid_utf8_and_deep_nesting_are_rejected_cleanly() {
        let mut body = br#"{"model":"m","messages":[{"role":"user","content":""#.to_vec();
        body.extend_from_slice(&[0xff, 0xfe]);
        body.extend_from_slice(br#""}]}"#);
        let e = parse(&body, None, 512).unwrap_err();
        assert_eq!(e.http_status(), 400);
        assert!(e.to_string().contains("not UTF-8 at byte 51"), "{e}");
        // in a field routing ignores as well: JSON text is UTF-8 whatever the field
        let mut body = br#"{"model":"m","name":""#.to_vec();
        body.push(0xc3);
        body.extend_from_slice(br#"","messages":[{"role":"user","content":"hi"}]}"#);
        assert_eq!(parse(&body, None, 512).unwrap_err().http_status(), 400);

        let deep = format!(
            "{{\"model\":\"m\",\"x\":{}{}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(
            parse(deep.as_bytes(), None, 512).unwrap_err().http_status(),
            400
        );
    }
}
