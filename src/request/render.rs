//! The canonical rendering of a prompt into the prefix hasher: chat messages, their content
//! and tool calls, the tool definitions, and completions-style prompts (module docs of
//! [`super`]). The chat functions are the one definition of the rendering, also used to render
//! an answer as the next turn will send it back ([`crate::response`]).

use super::body::{arguments_text, Content, Message, Prompt};
use crate::error::PickError;
use crate::hashing::PrefixHasher;

/// What a completions-style prompt was: what a next turn can extend (one prompt, which its
/// answer follows) and in which form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PromptForm {
    /// One prompt of text.
    OneText,
    /// One prompt of token ids.
    OneOfIds,
    /// Several prompts (a batch): one answer each, no single next turn extends them.
    Several,
}

/// Renders a completions-style prompt (`param`: the field it came from, for errors).
pub(super) fn render_prompt(
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

/// The role of element `index` of the array `field` (a chat message, a Responses input item):
/// a 400 naming it when absent or empty.
pub(super) fn required_role<'r>(
    role: Option<&'r str>,
    field: &'static str,
    index: usize,
) -> Result<&'r str, PickError> {
    role.filter(|r| !r.is_empty()).ok_or_else(|| {
        PickError::bad_request(format!("{field}[{index}].role is required"), Some(field))
    })
}

/// Renders chat message `index` (its role, content and tool calls).
pub(super) fn render_message(
    h: &mut PrefixHasher,
    m: &Message,
    index: usize,
) -> Result<(), PickError> {
    let role = required_role(m.role.as_deref(), "messages", index)?;
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
pub(super) fn render_content(h: &mut PrefixHasher, content: &Content) {
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
pub(super) fn is_system_role(role: &str) -> bool {
    role == "system" || role == "developer"
}

/// A request's tool definitions (`tools`) as sent: `None` when absent, null or an empty
/// array. Hashed as the client wrote them (a client sends the same definitions, spelt the
/// same, every turn); not a JSON array, they are not definitions an engine would render.
pub(super) fn tool_definitions(tools: Option<&serde_json::value::RawValue>) -> Option<&str> {
    let raw = tools?.get();
    let inner = raw.strip_prefix('[')?.strip_suffix(']')?;
    (!inner.trim_ascii().is_empty()).then_some(raw)
}

/// Renders the tool definitions, if any: `<|tools|>\n`, their JSON as sent, `\n`; placed
/// after the system prompt and before the conversation, as chat templates place them (Qwen,
/// Hermes, gpt-oss: in the system turn, after its text; the Anthropic API's caching order).
pub(super) fn render_tools(h: &mut PrefixHasher, tools: Option<&str>) {
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
