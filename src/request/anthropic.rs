//! The Anthropic Messages API (`/v1/messages`, which vLLM and llama.cpp serve for Claude
//! Code and the Anthropic SDKs): its `system` and `messages` rendered as the chat rendering of
//! the same conversation.
//!
//! `system` (a string, or its text blocks joined) is a system message first, the `tools`
//! definitions next (as sent, [`super::render::render_tools`]); each message
//! renders as a chat message of its role whose content is a string or blocks: its `text`
//! blocks are its text (separated by `\n`), then each `tool_result` block (`\n<|tool_result|>`
//! and its string or text blocks), then each `tool_use` block as a tool call of its `name`. A
//! tool call's `input` is not rendered: a client resends it as a JSON object its own library
//! serialises (spacing, escapes), which the engine's streamed `partial_json` does not spell
//! the same, and an answer learned for the next turn must hash as the client will send it back
//! ([`crate::response`]). Image and document blocks render as media parts among the text (their
//! `source`'s data or URL hashed); `thinking` blocks are skipped.
//!
//! The body is read by the chat body's types ([`super::body::Message`], whose content blocks keep
//! the `name` and `content` fields these blocks need).

use super::body::{Content, Message};
use super::render::{close_message, open_message, render_tools, required_role, tool_call};
use super::{PickError, PrefixHasher};

/// Renders a Messages request's prompt into `h`.
pub(super) fn render(
    h: &mut PrefixHasher,
    system: &Content,
    tools: Option<&str>,
    messages: Option<Vec<Message>>,
) -> Result<(), PickError> {
    let messages = messages.unwrap_or_default();
    if messages.is_empty() {
        return Err(PickError::bad_request(
            "messages must be a non-empty array",
            Some("messages"),
        ));
    }
    if !matches!(system, Content::Empty) {
        open_message(h, b"system");
        render_text(h, system, b"");
        close_message(h);
    }
    render_tools(h, tools);
    for (i, m) in messages.iter().enumerate() {
        let role = required_role(m.role.as_deref(), "messages", i)?;
        open_message(h, role.as_bytes());
        let mut empty = render_text(h, &m.content, b"\n");
        if let Content::Parts(blocks) = &m.content {
            for b in blocks.iter().filter(|b| b.is("tool_result")) {
                if !empty {
                    h.feed(b"\n");
                }
                h.feed(b"<|tool_result|>");
                render_text(h, &b.content, b"\n");
                empty = false;
            }
            for b in blocks.iter().filter(|b| b.is("tool_use")) {
                tool_use(h, b.name.as_deref().unwrap_or("").as_bytes());
            }
        }
        close_message(h);
    }
    Ok(())
}

/// Renders the text of `content` (a string, or its `text` blocks separated by `separator`);
/// true when it had none.
fn render_text(h: &mut PrefixHasher, content: &Content, separator: &[u8]) -> bool {
    match content {
        Content::Empty => true,
        Content::Text(t) => {
            h.feed_str(t);
            t.is_empty()
        }
        Content::Parts(blocks) => {
            let mut empty = true;
            for b in blocks {
                let medium = (!b.is("text")).then(|| b.media()).flatten();
                if !b.is("text") && medium.is_none() {
                    continue;
                }
                if !empty {
                    h.feed(separator);
                }
                match medium {
                    Some(medium) => h.feed_media(medium.as_bytes()),
                    None => h.feed_str(b.text.as_deref().unwrap_or("")),
                }
                empty = false;
            }
            empty
        }
    }
}

/// Renders a tool call as a `tool_use` block renders (its name only), also for an answer's.
fn tool_use(h: &mut PrefixHasher, name: &[u8]) {
    tool_call(h, name, b"");
}
