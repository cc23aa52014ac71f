//! The OpenAI wire shapes every simulated API shares: error bodies, the JSON body check, the
//! clock of `created` fields, the chat template that turns messages into a prompt, and the
//! engine's tokens of one request turned into a whole answer or into a stream of events.

use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

use super::Ev;
use crate::engine::{Usage, CHARS_PER_TOKEN};

/// Seconds since the Unix epoch.
pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// An OpenAI error body (`{"error": {"message", "type", "param", "code"}}`) with `status`.
pub(super) fn error_response(status: StatusCode, message: &str) -> Response {
    let kind = match status.as_u16() {
        400 => "BadRequestError",
        404 => "NotFoundError",
        _ => "InternalServerError",
    };
    (
        status,
        Json(json!({"error": {"message": message, "type": kind, "param": null, "code": status.as_u16()}})),
    )
        .into_response()
}

/// The chat template of the simulated model (ChatML-like). Multi-turn conversations render to
/// strings that extend the previous turn's rendering, as real templates do.
///
/// `tools` (a request's `tools`, or chat's legacy `functions`) render as Qwen2.5/3 and
/// Hermes-style templates put them: inside the system turn, after the system text, under
/// `# Tools`, one tool per line as compact JSON (`{system}\n\n# Tools\n{tool}\n{tool}`). A
/// leading `developer` message counts as the system turn; without a leading system message a
/// system turn holding only the tools comes first. No tools (None or empty): the rendering
/// without them.
pub fn render_chat(messages: &[Value], tools: Option<&[Value]>) -> String {
    let mut out = String::new();
    let mut rest = messages;
    if let Some(tools) = tools.filter(|t| !t.is_empty()) {
        out.push_str("<|im_start|>system\n");
        if let Some((first, later)) = messages.split_first() {
            let role = first.get("role").and_then(Value::as_str);
            if matches!(role, Some("system" | "developer")) {
                push_content(&mut out, first);
                out.push_str("\n\n");
                rest = later;
            }
        }
        out.push_str("# Tools");
        for t in tools {
            out.push('\n');
            out.push_str(&serde_json::to_string(t).unwrap_or_default());
        }
        out.push_str("<|im_end|>\n");
    }
    for m in rest {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
        out.push_str("<|im_start|>");
        out.push_str(role);
        out.push('\n');
        push_content(&mut out, m);
        out.push_str("<|im_end|>\n");
    }
    out.push_str("<|im_start|>assistant\n");
    out
}

/// Appends the text of message `m`'s `content` (a string, or parts whose non-text ones are
/// `<|media|>`).
fn push_content(out: &mut String, m: &Value) {
    match m.get("content") {
        Some(Value::String(s)) => out.push_str(s),
        Some(Value::Array(parts)) => {
            for p in parts {
                match p.get("text").and_then(Value::as_str) {
                    Some(t) => out.push_str(t),
                    None => out.push_str("<|media|>"),
                }
            }
        }
        _ => {}
    }
}

/// The tools a request declares: its `tools` array, else its legacy `functions` array (chat
/// completions); None when neither is a non-empty array.
pub(super) fn request_tools(req: &Value) -> Option<&[Value]> {
    ["tools", "functions"].iter().find_map(|k| {
        req.get(*k)
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .filter(|t| !t.is_empty())
    })
}

/// Appends token id `id` to a prompt: one token, CHARS_PER_TOKEN characters (the
/// `/v1/completions` token-id prompts and `/generate`'s `input_ids`). An id whose 4
/// little-endian bytes are all printable ASCII (0x20..=0x7e, e.g. a generated token's
/// [`token_id`]) renders as those 4 characters, so a resent answer's `output_ids` render as the
/// text the engine generated (and cached); any other id (every id below 0x2000_0000, so every
/// real vocabulary's) renders as 4 digits, `id % 10000`.
pub(super) fn push_token_id(out: &mut String, id: u64) {
    match u32::try_from(id).map(u32::to_le_bytes) {
        Ok(b) if b.iter().all(|c| (0x20..=0x7e).contains(c)) => {
            out.extend(b.iter().map(|&c| c as char))
        }
        _ => {
            let _ = write!(out, "{:04}", id % 10_000);
        }
    }
}

/// The id of one token of at most CHARS_PER_TOKEN bytes (a generated token is exactly 4 ASCII
/// characters, for `/generate`'s `output_ids`; a chunk of a text the load generator sends as
/// `input_ids`): its bytes packed little-endian into a u32, a shorter token padded with spaces,
/// so [`push_token_id`] renders it back when the bytes are printable ASCII. A longer token has a
/// hash of its bytes below a Llama-3-sized vocabulary (rendered as digits).
pub(super) fn token_id(token: &[u8]) -> u64 {
    if token.len() > CHARS_PER_TOKEN {
        return xxhash_rust::xxh3::xxh3_64(token) % 128_256;
    }
    let mut b = [b' '; CHARS_PER_TOKEN];
    b[..token.len()].copy_from_slice(token);
    u32::from_le_bytes(b) as u64
}

/// The token ids of `text`: CHARS_PER_TOKEN bytes per id ([`token_id`]), the last chunk padded
/// with spaces; rendered back by [`push_token_id`] as `text` (padded) where it is printable
/// ASCII.
pub fn encode_ids(text: &str) -> Vec<u64> {
    text.as_bytes()
        .chunks(CHARS_PER_TOKEN)
        .map(token_id)
        .collect()
}

/// The request body as a JSON object, or why not (to answer with a 400).
pub(super) fn parse_object(body: &[u8]) -> Result<Value, String> {
    match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err("request body must be a JSON object".into()),
        Err(e) => Err(format!("invalid JSON body: {e}")),
    }
}

/// The whole answer of one request: its text and usage, once the engine finished it; None when
/// the engine ended the request early.
pub(super) async fn collect_tokens(
    rx: &mut mpsc::UnboundedReceiver<Ev>,
) -> Option<(String, Usage)> {
    let mut text = String::new();
    while let Some(Ev::Token {
        text: t,
        finished,
        usage,
    }) = rx.recv().await
    {
        text.push_str(&t);
        if finished {
            return Some((text, usage));
        }
    }
    None
}

/// A server-sent event stream of one request: the `first` events, then for every token the
/// engine sends the events `on_token(state, text, finished, usage)` makes of it; it ends after
/// the finished token (or if the engine dropped the request).
pub(super) fn token_stream<S, F>(
    rx: mpsc::UnboundedReceiver<Ev>,
    first: Vec<Event>,
    state: S,
    on_token: F,
) -> Response
where
    S: Send + 'static,
    F: FnMut(&mut S, &str, bool, &Usage) -> Vec<Event> + Send + 'static,
{
    struct Stream<S, F> {
        rx: mpsc::UnboundedReceiver<Ev>,
        pending: VecDeque<Event>,
        done: bool,
        state: S,
        on_token: F,
    }
    let st = Stream {
        rx,
        pending: first.into(),
        done: false,
        state,
        on_token,
    };
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(ev) = st.pending.pop_front() {
                return Some((Ok::<_, Infallible>(ev), st));
            }
            if st.done {
                return None;
            }
            match st.rx.recv().await {
                Some(Ev::Token {
                    text,
                    finished,
                    usage,
                }) => {
                    let events = (st.on_token)(&mut st.state, &text, finished, &usage);
                    st.pending.extend(events);
                    st.done = finished;
                }
                // The engine never drops a live subscriber; end the stream if it did.
                None => st.done = true,
            }
        }
    });
    Sse::new(stream).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(ids: &[u64]) -> String {
        let mut out = String::new();
        for &id in ids {
            push_token_id(&mut out, id);
        }
        out
    }

    #[test]
    fn ascii_token_ids_render_back_to_their_characters_and_small_ids_to_digits() {
        // A generated token (a space and three letters) packs into its id and renders back.
        let id = token_id(b" abc");
        assert_eq!(id, u32::from_le_bytes(*b" abc") as u64);
        assert_eq!(render(&[id]), " abc");
        assert_eq!(render(&[token_id(b"x~ Z")]), "x~ Z");
        // A short token is padded with spaces; a long one hashes to a vocabulary-sized id.
        assert_eq!(render(&[token_id(b"ab")]), "ab  ");
        assert!(token_id(b"abcdefgh") < 128_256);
        // Vocabulary-sized ids keep rendering as 4 digits.
        assert_eq!(
            render(&[1, 37, 9_999, 10_001, 50_000, 128_255]),
            "000100379999000100008255"
        );
        // Ids with a byte outside printable ASCII (a newline, a high bit) or above u32: digits.
        let newline = u32::from_le_bytes(*b"a\nbc") as u64;
        assert_eq!(render(&[newline]), format!("{:04}", newline % 10_000));
        assert_eq!(render(&[u32::MAX as u64]).len(), 4);
        assert_eq!(render(&[1 << 40 | id]).len(), 4);
        assert_ne!(render(&[1 << 40 | id]), " abc");
    }

    fn tool(name: &str) -> Value {
        json!({"type": "function", "function": {"name": name, "description": "does it", "parameters": {"type": "object"}}})
    }

    #[test]
    fn without_tools_the_chat_template_renders_as_before() {
        let msgs = [
            json!({"role": "system", "content": "sys"}),
            json!({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]}),
            json!({"role": "assistant", "content": "b"}),
            json!({"content": "c"}),
        ];
        let expected = "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\na<|media|><|im_end|>\n\
            <|im_start|>assistant\nb<|im_end|>\n<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n";
        assert_eq!(render_chat(&msgs, None), expected);
        assert_eq!(render_chat(&msgs, Some(&[])), expected);
        // Absent, null or empty tools (or functions) in a request: none.
        for req in [
            json!({}),
            json!({"tools": null}),
            json!({"tools": []}),
            json!({"functions": []}),
        ] {
            assert_eq!(request_tools(&req), None, "{req}");
        }
    }

    #[test]
    fn tools_render_in_the_system_turn_after_its_text() {
        let tools = [tool("read_file"), tool("search")];
        let t0 = serde_json::to_string(&tools[0]).unwrap();
        let t1 = serde_json::to_string(&tools[1]).unwrap();
        assert!(
            !t0.contains('\n') && t0.contains("\"name\":\"read_file\""),
            "{t0}"
        );
        let user = json!({"role": "user", "content": "hi"});
        let tail = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n";
        for role in ["system", "developer"] {
            let msgs = [json!({"role": role, "content": "Be brief."}), user.clone()];
            assert_eq!(
                render_chat(&msgs, Some(&tools)),
                format!("<|im_start|>system\nBe brief.\n\n# Tools\n{t0}\n{t1}<|im_end|>\n{tail}")
            );
        }
        // No leading system message: a system turn of the tools alone comes first.
        let msgs = [user.clone(), json!({"role": "system", "content": "late"})];
        let text = render_chat(&msgs, Some(&tools[..1]));
        assert!(
            text.starts_with(&format!(
                "<|im_start|>system\n# Tools\n{t0}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
            )),
            "{text}"
        );
        assert!(
            text.contains("<|im_start|>system\nlate<|im_end|>\n"),
            "{text}"
        );
        // A request's tools, else its legacy functions.
        let functions = [json!({"name": "f", "parameters": {}})];
        let req = json!({"tools": tools, "functions": functions});
        assert_eq!(request_tools(&req), Some(&tools[..]));
        let req = json!({"tools": [], "functions": functions});
        assert_eq!(request_tools(&req), Some(&functions[..]));
    }

    #[test]
    fn a_later_turn_with_the_same_tools_extends_the_earlier_rendering() {
        let tools = [tool("read_file"), tool("run_tests")];
        let mut msgs = vec![
            json!({"role": "system", "content": "You are a coding agent."}),
            json!({"role": "user", "content": "fix the bug"}),
        ];
        let first = render_chat(&msgs, Some(&tools));
        msgs.push(json!({"role": "assistant", "content": " ok."}));
        msgs.push(json!({"role": "user", "content": "tests pass"}));
        let second = render_chat(&msgs, Some(&tools));
        assert!(
            second.starts_with(&format!("{first} ok.<|im_end|>\n")),
            "{second}"
        );
        // Without a system message too.
        let first = render_chat(&msgs[1..2], Some(&tools));
        assert!(render_chat(&msgs[1..], Some(&tools)).starts_with(&first));
        // Other tools change the system turn, so the prompt.
        let other = render_chat(&msgs, Some(&tools[..1]));
        assert!(!other.starts_with(&render_chat(&msgs[..2], Some(&tools))));
    }

    #[test]
    fn encoded_text_renders_back_padded_and_resent_answers_extend_the_prompt() {
        let ids = encode_ids("Hello, world!");
        assert_eq!(ids.len(), 4);
        assert_eq!(render(&ids), "Hello, world!   ");
        // input_ids + output_ids render as the prompt followed by the generated text.
        let generated = [" abc", " xyz"];
        let out: Vec<u64> = generated.iter().map(|t| token_id(t.as_bytes())).collect();
        let mut all = ids.clone();
        all.extend(&out);
        assert_eq!(
            render(&all),
            format!("{}{}", render(&ids), generated.concat())
        );
    }
}
