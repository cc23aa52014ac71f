//! The OpenAI Responses API (`/v1/responses`): its `instructions` and `input` rendered as the
//! chat rendering of the same conversation.
//!
//! `instructions` is a system message first, then the leading system messages of `input`, then
//! the `tools` definitions (as sent, [`super::render::render_tools`]); `input` is a string (one
//! user message) or an array of items: a message (`type` "message" or none) renders as a chat
//! message (its `input_text` / `output_text` parts are text), a `function_call` as an
//! assistant message holding that one tool call, a `function_call_output` as a `tool` message.
//! Other items (reasoning, references to stored items, built-in tool calls) are not text the
//! prompt shows and are skipped. A client that resends the whole conversation (`store: false`)
//! therefore hashes turn after turn like a chat client, and the answer learned from the
//! stream is rendered the same way ([`crate::response`]).
//!
//! A client that names `previous_response_id` sends only the new items: the engine that
//! stored the previous answer prepends the conversation, and no other engine has it. That
//! request is pinned by the router, not matched by its prefix.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

use super::body::{arguments_text, Content, JsonStr};
use super::render::{close_message, is_system_role, open_message, render_content};
use super::render::{render_tools, required_role, tool_call};
use super::{PickError, PrefixHasher};

/// The `input` field: one user message, or the conversation's items.
pub(super) enum Input<'a> {
    Text(Cow<'a, str>),
    Items(Vec<Item<'a>>),
}

/// One input item: only the fields a rendering reads.
#[derive(Deserialize)]
pub(super) struct Item<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<JsonStr<'a>>,
    #[serde(borrow, default)]
    role: Option<JsonStr<'a>>,
    #[serde(borrow, default)]
    content: Content<'a>,
    /// `function_call`: the function's name.
    #[serde(borrow, default)]
    name: Option<JsonStr<'a>>,
    /// `function_call`: its arguments (a JSON-encoded string, or the JSON itself).
    #[serde(borrow, default)]
    arguments: Option<&'a serde_json::value::RawValue>,
    /// `function_call_output`: a string or content parts.
    #[serde(borrow, default)]
    output: Content<'a>,
}

impl<'de: 'a, 'a> Deserialize<'de> for Input<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Input<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or an array of input items")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Input::Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Input::Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Input::Text(Cow::Owned(v)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(1));
                while let Some(item) = seq.next_element::<Item<'a>>()? {
                    items.push(item);
                }
                Ok(Input::Items(items))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// Renders a Responses request's prompt into `h`.
pub(super) fn render(
    h: &mut PrefixHasher,
    instructions: Option<&str>,
    tools: Option<&str>,
    input: Option<Input>,
) -> Result<(), PickError> {
    let Some(input) = input else {
        return Err(PickError::bad_request(
            "you must provide an input parameter",
            Some("input"),
        ));
    };
    if let Some(text) = instructions.filter(|t| !t.is_empty()) {
        open_message(h, b"system");
        h.feed_str(text);
        close_message(h);
    }
    match input {
        Input::Text(text) => {
            render_tools(h, tools);
            open_message(h, b"user");
            h.feed_str(&text);
            close_message(h);
        }
        Input::Items(items) => {
            if items.is_empty() {
                return Err(PickError::bad_request(
                    "input must not be an empty array",
                    Some("input"),
                ));
            }
            // the tool definitions after the leading system messages, as in a chat
            let mut tools = tools;
            for (i, item) in items.iter().enumerate() {
                let system = matches!(item.kind.as_deref(), None | Some("message"))
                    && item.role.as_deref().is_some_and(is_system_role);
                if !system {
                    render_tools(h, tools.take());
                }
                render_item(h, item, i)?;
            }
            render_tools(h, tools);
        }
    }
    Ok(())
}

fn render_item(h: &mut PrefixHasher, item: &Item, index: usize) -> Result<(), PickError> {
    match item.kind.as_deref() {
        None | Some("message") => {
            let role = required_role(item.role.as_deref(), "input", index)?;
            open_message(h, role.as_bytes());
            render_content(h, &item.content);
            close_message(h);
        }
        Some("function_call") => {
            let arguments = arguments_text(item.arguments).map_err(|e| {
                PickError::bad_request(format!("invalid JSON body: {e}"), Some("input"))
            })?;
            let name = item.name.as_deref().unwrap_or("");
            function_call(h, name.as_bytes(), arguments.as_bytes());
        }
        Some("function_call_output") => {
            open_message(h, b"tool");
            render_content(h, &item.output);
            close_message(h);
        }
        Some(_) => {}
    }
    Ok(())
}

/// Renders a `function_call` item: an assistant message holding that one call (also how an
/// answer's function calls are rendered for the next turn).
pub(crate) fn function_call(h: &mut PrefixHasher, name: &[u8], arguments: &[u8]) {
    open_message(h, b"assistant");
    tool_call(h, name, arguments);
    close_message(h);
}

/// The answer id a request on a stored Responses answer names: `GET` or `DELETE
/// {base}/{id}`, `GET {base}/{id}/input_items`, `POST {base}/{id}/cancel`, where `base` is
/// the Responses path (`/v1/responses`); the query is ignored. None for every other method
/// and path (creating an answer is a `POST {base}` with a body).
pub fn stored_answer_id<'p>(method: &[u8], path: &'p [u8], base: &[u8]) -> Option<&'p str> {
    let path = path.split(|&b| b == b'?').next().unwrap_or(path);
    let rest = path.strip_prefix(base)?.strip_prefix(b"/")?;
    let rest = std::str::from_utf8(rest).ok()?;
    let (id, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let method_fits = match tail {
        "" => method.eq_ignore_ascii_case(b"GET") || method.eq_ignore_ascii_case(b"DELETE"),
        "input_items" => method.eq_ignore_ascii_case(b"GET"),
        "cancel" => method.eq_ignore_ascii_case(b"POST"),
        _ => false,
    };
    (method_fits && !id.is_empty()).then_some(id)
}
