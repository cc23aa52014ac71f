//! Tests of request parsing and the canonical prompt rendering.

use super::*;
use crate::hashing::prefix_hashes;

fn p(body: &str) -> Result<ParsedRequest, PickError> {
    parse(body.as_bytes(), None, 512)
}

#[test]
fn chat_with_string_content() {
    let r =
        p(r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hello"}]}"#).unwrap();
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
fn roles_are_part_of_the_prompt() {
    let text_only =
        p(r#"{"model":"m","messages":[{"role":"user","content":"what is this"}]}"#).unwrap();
    let as_system =
        p(r#"{"model":"m","messages":[{"role":"system","content":"what is this"}]}"#).unwrap();
    assert_ne!(as_system.prefix_hashes, text_only.prefix_hashes);
}

#[test]
fn media_parts_are_hashed_by_what_they_show_and_cost_their_tokens() {
    // A long shared system prompt, then a user message of an image and a question: prompts
    // with different images share the system prompt's chunks and differ from the image on.
    let system = "s".repeat(64);
    let chat = |image: &str| {
        let body = serde_json::json!({"model": "m", "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": [
                {"type": "image_url", "image_url": serde_json::from_str::<serde_json::Value>(image).unwrap()},
                {"type": "text", "text": "what is this"}]}]});
        let extract = Extract {
            media_part_tokens: 576,
            ..Extract::default()
        };
        parse_with_tail(body.to_string().as_bytes(), None, 16, extract)
            .unwrap()
            .0
    };
    let cat = chat(r#"{"url": "https://x/cat.png"}"#);
    let dog = chat(r#"{"url": "https://x/dog.png"}"#);
    let system_chunks = 64 / 16;
    assert_eq!(
        cat.prefix_hashes[..system_chunks],
        dog.prefix_hashes[..system_chunks]
    );
    assert_ne!(
        cat.prefix_hashes[system_chunks + 1..],
        dog.prefix_hashes[system_chunks + 1..]
    );
    // the same image, however the client details it, is the same prefix
    let cat_detailed = chat(r#"{"detail": "high", "url": "https://x/cat.png"}"#);
    assert_eq!(cat.prefix_hashes, cat_detailed.prefix_hashes);
    // an image costs its tokens' characters in the prompt's length
    let text_only = parse_with_tail(
        serde_json::json!({"model": "m", "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": [{"type": "text", "text": "what is this"}]}]})
        .to_string()
        .as_bytes(),
        None,
        16,
        Extract::default(),
    )
    .unwrap()
    .0;
    // (and the separator between the image and the question)
    assert_eq!(cat.prompt_chars, text_only.prompt_chars + 576 * 4 + 1);
    // audio and video parts, a data URL, a Responses input_image, an Anthropic image block
    let other = |body: &str, kind| {
        let (parsed, _) =
            parse_with_tail(body.as_bytes(), Some(kind), 16, Extract::default()).unwrap();
        parsed.prefix_hashes
    };
    let audio = r#"{"model":"m","messages":[{"role":"user","content":[{"type":"input_audio","input_audio":{"data":"UklGR","format":"wav"}}]}]}"#;
    let video = r#"{"model":"m","messages":[{"role":"user","content":[{"type":"video_url","video_url":{"url":"https://x/v.mp4"}}]}]}"#;
    let data_url = r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]}]}"#;
    let empty = r#"{"model":"m","messages":[{"role":"user","content":[]}]}"#;
    let empty = other(empty, RequestKind::Chat);
    for body in [audio, video, data_url] {
        assert_ne!(other(body, RequestKind::Chat), empty, "{body}");
    }
    let responses = |url: &str| {
        other(
            &format!(
                r#"{{"model":"m","input":[{{"role":"user","content":[{{"type":"input_image","image_url":"{url}"}},{{"type":"input_text","text":"hi"}}]}}]}}"#
            ),
            RequestKind::Responses,
        )
    };
    assert_ne!(
        responses("https://x/cat.png"),
        responses("https://x/dog.png")
    );
    let messages = |data: &str| {
        other(
            &format!(
                r#"{{"model":"m","max_tokens":8,"messages":[{{"role":"user","content":[{{"type":"image","source":{{"type":"base64","media_type":"image/png","data":"{data}"}}}},{{"type":"text","text":"hi"}}]}}]}}"#
            ),
            RequestKind::Messages,
        )
    };
    assert_ne!(messages("AAAA"), messages("BBBB"));
    assert_eq!(messages("AAAA"), messages("AAAA"));
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

/// Leading hashes two prompts share.
fn shared(a: &ParsedRequest, b: &ParsedRequest) -> usize {
    (a.prefix_hashes.iter())
        .zip(&b.prefix_hashes)
        .take_while(|(x, y)| x == y)
        .count()
}

#[test]
fn tool_definitions_are_part_of_the_prompt_after_the_system_messages() {
    let tools = |name: &str| {
        format!(
            r#"[{{"type":"function","function":{{"name":"{name}","description":"{}","parameters":{{"type":"object"}}}}}}]"#,
            "reads a file of the repository and returns its text ".repeat(4)
        )
    };
    let chat = |tools: &str, user: &str| {
        let body = format!(
            r#"{{"model":"m","messages":[{{"role":"system","content":"You are an agent."}},{{"role":"developer","content":"Be careful."}},{{"role":"user","content":"{user}"}}]{tools}}}"#
        );
        parse(body.as_bytes(), None, 16).unwrap()
    };
    let read = tools("read_file");
    let with = |user: &str| chat(&format!(r#","tools":{read}"#), user);
    let a = with("fix a.py");
    // rendered after the system and developer messages, as sent
    let expected = format!(
        "<|system|>\nYou are an agent.\n<|developer|>\nBe careful.\n<|tools|>\n{read}\n<|user|>\nfix a.py\n"
    );
    assert_eq!(a.prefix_hashes, prefix_hashes("m", expected.as_bytes(), 16));
    assert_eq!(a.prompt_chars, expected.len() as u64);
    // none, null and an empty array render nothing
    let none = chat("", "fix a.py");
    for empty in [r#","tools":null"#, r#","tools":[]"#, r#","tools":[ ]"#] {
        let r = chat(empty, "fix a.py");
        assert_eq!(r.prefix_hashes, none.prefix_hashes, "{empty}");
        assert_eq!(r.prompt_chars, none.prompt_chars);
    }
    assert_eq!(a.prompt_chars, none.prompt_chars + 11 + read.len() as u64);
    // another session of the agent shares the system prompt and the tools; an agent with other
    // tools only the system prompt
    let system = "<|system|>\nYou are an agent.\n<|developer|>\nBe careful.\n".len() / 16;
    let tools_end = (system * 16 + 11 + read.len()) / 16;
    assert!(shared(&a, &with("write b.py")) >= tools_end);
    let other = chat(&format!(r#","tools":{}"#, tools("edit_file")), "fix a.py");
    assert!(shared(&a, &other) < tools_end);
    assert!(shared(&a, &other) >= system);
    assert_eq!(shared(&a, &none), system);
    // older clients' `functions` render as tools do
    let functions = chat(&format!(r#","functions":{read}"#), "fix a.py");
    assert_eq!(functions.prefix_hashes, a.prefix_hashes);
    // the same definitions in a Responses request (after its instructions and system items)
    // and in a Messages request (after its system prompt)
    let responses_body = format!(
        r#"{{"model":"m","instructions":"You are an agent.","tools":{read},"input":[{{"role":"developer","content":"Be careful."}},{{"role":"user","content":"fix a.py"}}]}}"#
    );
    let r = parse(responses_body.as_bytes(), Some(RequestKind::Responses), 16).unwrap();
    assert_eq!(r.prefix_hashes, a.prefix_hashes);
    let messages_body = format!(
        r#"{{"model":"m","system":"You are an agent.","tools":{read},"messages":[{{"role":"user","content":"fix a.py"}}]}}"#
    );
    let m = parse(messages_body.as_bytes(), Some(RequestKind::Messages), 16).unwrap();
    let expected =
        format!("<|system|>\nYou are an agent.\n<|tools|>\n{read}\n<|user|>\nfix a.py\n");
    assert_eq!(m.prefix_hashes, prefix_hashes("m", expected.as_bytes(), 16));
}

#[test]
fn cache_salts_and_adapters_keep_the_same_prompt_apart() {
    let chat = |extra: &str| {
        let body = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}]{extra}}}"#,
            "the same long question ".repeat(8)
        );
        parse(body.as_bytes(), None, 16).unwrap()
    };
    let plain = chat("");
    let salted = chat(r#","cache_salt":"tenant-a""#);
    // the same salt, spelt the same, is the same domain; null is none
    assert_eq!(
        chat(r#","cache_salt":"tenant-a""#).prefix_hashes,
        salted.prefix_hashes
    );
    assert_eq!(
        chat(r#","cache_salt":null"#).prefix_hashes,
        plain.prefix_hashes
    );
    assert_eq!(salted.prompt_chars, plain.prompt_chars);
    // another salt, or none, or another field of the same value: nothing shared
    for other in [
        chat(r#","cache_salt":"tenant-b""#),
        plain.clone(),
        chat(r#","extra_key":"tenant-a""#),
        chat(r#","lora_path":"tenant-a""#),
    ] {
        assert_eq!(shared(&salted, &other), 0);
    }
    // /generate's adapter too
    let generate = |extra: &str| {
        let body = format!(r#"{{"text":"{}"{extra}}}"#, "a prompt ".repeat(8));
        let extract = Extract {
            default_model: Some("m"),
            ..Extract::default()
        };
        parse_with_tail(body.as_bytes(), Some(RequestKind::Generate), 16, extract)
            .unwrap()
            .0
    };
    let adapter = generate(r#","lora_path":"sql-lora""#);
    assert_eq!(shared(&adapter, &generate("")), 0);
    assert_eq!(
        adapter.prefix_hashes,
        generate(r#","lora_path":"sql-lora""#).prefix_hashes
    );
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

fn responses(body: &str) -> Result<ParsedRequest, PickError> {
    parse(body.as_bytes(), Some(RequestKind::Responses), 16)
}

#[test]
fn responses_render_as_the_chat_of_the_same_conversation() {
    assert_eq!(
        RequestKind::from_path("/v1/responses"),
        Some(RequestKind::Responses)
    );
    // retrieving or cancelling a stored answer is not a request to route by its prompt
    assert_eq!(RequestKind::from_path("/v1/responses/resp_1/cancel"), None);
    let items = responses(
        r#"{"model":"m","instructions":"be brief","stream":true,"input":[
        {"role":"user","content":"what is x?"},
        {"type":"reasoning","id":"rs_1","summary":[]},
        {"type":"message","role":"assistant","content":[{"type":"output_text","text":"let me check","annotations":[]}]},
        {"type":"function_call","call_id":"c1","name":"get","arguments":"{\"x\":1}"},
        {"type":"function_call_output","call_id":"c1","output":"42"},
        {"type":"message","role":"user","content":[{"type":"input_text","text":"thanks"},{"type":"input_image","image_url":"data:,"}]}
    ]}"#,
    )
    .unwrap();
    let chat = parse(
        br#"{"model":"m","messages":[
        {"role":"system","content":"be brief"},
        {"role":"user","content":"what is x?"},
        {"role":"assistant","content":"let me check"},
        {"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"get","arguments":"{\"x\":1}"}}]},
        {"role":"tool","tool_call_id":"c1","content":"42"},
        {"role":"user","content":[{"type":"text","text":"thanks"},{"type":"image_url","image_url":{"url":"data:,"}}]}
    ]}"#,
        None,
        16,
    )
    .unwrap();
    assert_eq!(items.kind, RequestKind::Responses);
    assert!(items.stream);
    assert_eq!(items.prefix_hashes, chat.prefix_hashes);
    assert_eq!(items.prompt_chars, chat.prompt_chars);
    assert_eq!(items.previous_response, None);
    // a string input is one user message
    let one = responses(r#"{"model":"m","input":"hello there, how are you"}"#).unwrap();
    let chat =
        br#"{"model":"m","messages":[{"role":"user","content":"hello there, how are you"}]}"#;
    let chat = parse(chat, None, 16).unwrap();
    assert_eq!(one.prefix_hashes, chat.prefix_hashes);
}

#[test]
fn responses_name_the_answer_they_continue() {
    let r = responses(r#"{"model":"m","previous_response_id":"resp_abc","input":"and then?"}"#)
        .unwrap();
    assert_eq!(r.previous_response.as_deref(), Some("resp_abc"));
    let r = responses(r#"{"model":"m","previous_response_id":"","input":"x"}"#).unwrap();
    assert_eq!(r.previous_response, None);
    // only the Responses API has stored answers
    let r = p(r#"{"model":"m","previous_response_id":"resp_abc","messages":[{"role":"user","content":"x"}]}"#)
        .unwrap();
    assert_eq!(r.previous_response, None);
    // the next turn of a chained request does not extend its prompt: nothing to learn
    let learn = Extract {
        tail: true,
        ..Extract::default()
    };
    let tail = |body: &str| {
        parse_with_tail(body.as_bytes(), Some(RequestKind::Responses), 16, learn)
            .unwrap()
            .1
    };
    assert!(tail(r#"{"model":"m","previous_response_id":"resp_abc","input":"x"}"#).is_none());
    assert!(tail(r#"{"model":"m","input":"x"}"#).is_some());
}

#[test]
fn bad_responses_requests_are_400_with_reason() {
    let cases = [
        (r#"{"model":"m"}"#, "you must provide an input parameter"),
        (
            r#"{"model":"m","input":[]}"#,
            "input must not be an empty array",
        ),
        (r#"{"model":"m","input":42}"#, "invalid JSON body"),
        (
            r#"{"model":"m","input":[{"type":"message","content":"x"}]}"#,
            "input[0].role is required",
        ),
        (
            r#"{"model":"m","instructions":7,"input":"x"}"#,
            "invalid JSON body",
        ),
        (r#"{"model":"m","input":["x"]}"#, "invalid JSON body"),
    ];
    for (body, want) in cases {
        let e = responses(body).unwrap_err();
        assert_eq!(e.http_status(), 400, "{body}");
        assert!(e.to_string().starts_with(want), "{body}: {e}");
    }
}

fn messages(body: &str) -> Result<ParsedRequest, PickError> {
    parse(body.as_bytes(), Some(RequestKind::Messages), 16)
}

#[test]
fn anthropic_messages_render_as_the_chat_of_the_same_conversation() {
    assert_eq!(
        RequestKind::from_path("/v1/messages?beta=true"),
        Some(RequestKind::Messages)
    );
    // Claude Code's shape: system blocks, tool_use with an object input, tool_result blocks
    let blocks = messages(
        r#"{"model":"m","max_tokens":64,"stream":true,
        "system":[{"type":"text","text":"You are a coder.","cache_control":{"type":"ephemeral"}},{"type":"text","text":" Be brief."}],
        "tools":[{"name":"read","input_schema":{"type":"object"}}],
        "messages":[
        {"role":"user","content":[{"type":"text","text":"fix a.py"},{"type":"image","source":{"type":"base64","data":"AAAA"}}]},
        {"role":"assistant","content":[{"type":"thinking","thinking":"hmm","signature":"s"},{"type":"text","text":"reading"},{"type":"tool_use","id":"t1","name":"read","input":{"path":"a.py"}}]},
        {"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":[{"type":"text","text":"print(1)"}]}]}
    ]}"#,
    )
    .unwrap();
    assert!(blocks.stream && blocks.kind == RequestKind::Messages);
    // the same conversation, by another client: strings, another input spelling
    let strings = messages(
        r#"{"model":"m","system":"You are a coder. Be brief.","tools":[{"name":"read","input_schema":{"type":"object"}}],"messages":[
        {"role":"user","content":[{"type":"text","text":"fix a.py"},{"type":"image","source":{"data":"AAAA","type":"base64"}}]},
        {"role":"assistant","content":[{"type":"text","text":"reading"},{"type":"tool_use","id":"t1","name":"read","input":{ "path" : "a.py" }}]},
        {"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":"print(1)"}]}
    ]}"#,
    )
    .unwrap();
    assert_eq!(blocks.prefix_hashes, strings.prefix_hashes);
    assert_eq!(blocks.prompt_chars, strings.prompt_chars);
    // the tool result is part of the prompt
    let other = messages(
        r#"{"model":"m","system":"You are a coder. Be brief.","tools":[{"name":"read","input_schema":{"type":"object"}}],"messages":[
        {"role":"user","content":[{"type":"text","text":"fix a.py"},{"type":"image","source":{"type":"base64","data":"AAAA"}}]},
        {"role":"assistant","content":[{"type":"text","text":"reading"},{"type":"tool_use","id":"t1","name":"read","input":{}}]},
        {"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":"print(2)"}]}
    ]}"#,
    )
    .unwrap();
    assert_ne!(other.prefix_hashes, strings.prefix_hashes);
    assert_eq!(other.prompt_chars, strings.prompt_chars);
    for (body, want) in [
        (
            r#"{"model":"m","messages":[]}"#,
            "messages must be a non-empty array",
        ),
        (r#"{"model":"m"}"#, "messages must be a non-empty array"),
        (
            r#"{"model":"m","messages":[{"content":"x"}]}"#,
            "messages[0].role is required",
        ),
        (
            r#"{"model":"m","system":7,"messages":[{"role":"user","content":"x"}]}"#,
            "invalid JSON body",
        ),
    ] {
        let e = messages(body).unwrap_err();
        assert_eq!(e.http_status(), 400, "{body}");
        assert!(e.to_string().starts_with(want), "{body}: {e}");
    }
}

#[test]
fn requests_on_a_stored_answer_name_its_id() {
    use super::responses::stored_answer_id;
    fn id(method: &str, path: &'static str) -> Option<&'static str> {
        stored_answer_id(method.as_bytes(), path.as_bytes(), b"/openai/v1/responses")
    }
    assert_eq!(id("GET", "/openai/v1/responses/resp_1"), Some("resp_1"));
    assert_eq!(
        id("get", "/openai/v1/responses/resp_1?stream=true"),
        Some("resp_1")
    );
    assert_eq!(id("DELETE", "/openai/v1/responses/resp_1"), Some("resp_1"));
    assert_eq!(
        id("GET", "/openai/v1/responses/resp_1/input_items?limit=5"),
        Some("resp_1")
    );
    assert_eq!(
        id("POST", "/openai/v1/responses/resp_1/cancel"),
        Some("resp_1")
    );
    for (method, path) in [
        ("POST", "/openai/v1/responses/resp_1"),
        ("DELETE", "/openai/v1/responses/resp_1/cancel"),
        ("POST", "/openai/v1/responses/resp_1/input_items"),
        ("GET", "/openai/v1/responses/resp_1/cancel/x"),
        ("GET", "/openai/v1/responses/"),
        ("GET", "/openai/v1/responses//cancel"),
        ("GET", "/openai/v1/responsesX/resp_1"),
        ("GET", "/v1/responses/resp_1"),
    ] {
        assert_eq!(id(method, path), None, "{method} {path}");
    }
}

#[test]
fn sglang_generate_reads_text_or_input_ids_and_may_name_no_model() {
    let generate = |body: &str, default_model: Option<&str>| {
        let extract = Extract {
            default_model,
            ..Extract::default()
        };
        parse_with_tail(body.as_bytes(), Some(RequestKind::Generate), 16, extract).map(|(p, _)| p)
    };
    // no model: the router's only one, hashed as the completion of the same text
    let text = r#"{"text": "The capital of France is", "sampling_params": {"max_new_tokens": 8}, "stream": true}"#;
    let g = generate(text, Some("m")).unwrap();
    let completion = parse(
        br#"{"model": "m", "prompt": "The capital of France is"}"#,
        None,
        16,
    )
    .unwrap();
    assert_eq!(
        (g.kind, g.model.as_str(), g.stream, &g.prefix_hashes),
        (RequestKind::Generate, "m", true, &completion.prefix_hashes)
    );
    // a model in the body wins; token ids as a completion's
    let one = generate(r#"{"input_ids": [1, 2, 3]}"#, Some("m")).unwrap();
    assert!(
        one.token_prompt,
        "one prompt of ids: its answer's output_ids are learned"
    );
    assert!(!g.token_prompt);
    let ids = generate(
        r#"{"model": "other", "input_ids": [[1, 2, 3], [1, 2, 4]]}"#,
        Some("m"),
    )
    .unwrap();
    assert!(!ids.token_prompt, "a batch: no next turn extends it");
    let tokens = parse(
        br#"{"model": "other", "prompt": [[1, 2, 3], [1, 2, 4]]}"#,
        None,
        16,
    )
    .unwrap();
    assert_eq!(
        (ids.model.as_str(), &ids.prefix_hashes),
        ("other", &tokens.prefix_hashes)
    );
    // text wins over input_ids (SGLang takes one of them)
    let both = generate(
        r#"{"text": "The capital of France is", "input_ids": [9]}"#,
        Some("m"),
    )
    .unwrap();
    assert_eq!(both.prefix_hashes, completion.prefix_hashes);
    // errors: several models and none named; no prompt; a prompt of the wrong type
    let e = generate(r#"{"text": "x"}"#, None).unwrap_err();
    assert!(e.to_string().contains("add \"model\""), "{e}");
    let e = generate(r#"{"sampling_params": {}}"#, Some("m")).unwrap_err();
    assert!(e.to_string().contains("text or input_ids"), "{e}");
    assert!(
        matches!(
            e,
            PickError::BadRequest {
                param: Some("text"),
                ..
            }
        ),
        "{e:?}"
    );
    // Text Generation Inference's `inputs` and vLLM's demo server's `prompt`: the same prompt
    let tgi = generate(
        r#"{"inputs": "The capital of France is", "parameters": {"max_new_tokens": 8}}"#,
        Some("m"),
    )
    .unwrap();
    assert_eq!(tgi.prefix_hashes, completion.prefix_hashes);
    let demo = generate(r#"{"prompt": "The capital of France is"}"#, Some("m")).unwrap();
    assert_eq!(demo.prefix_hashes, completion.prefix_hashes);
    let e = generate(r#"{"inputs": 7}"#, Some("m")).unwrap_err();
    assert!(e.to_string().starts_with("invalid inputs:"), "{e}");
    let e = generate(r#"{"text": {"a": 1}}"#, Some("m")).unwrap_err();
    assert!(e.to_string().starts_with("invalid text:"), "{e}");
    // another API's `text` object is not a prompt (the Responses API's output format)
    let r = parse_with_tail(
        br#"{"model": "m", "input": "hi", "text": {"format": {"type": "text"}}}"#,
        Some(RequestKind::Responses),
        16,
        Extract::default(),
    );
    assert!(r.is_ok(), "{:?}", r.err());
    assert_eq!(
        RequestKind::from_path("/generate"),
        Some(RequestKind::Generate)
    );
    assert_eq!(RequestKind::from_path("/v2/models/m/generate"), None);
}

#[test]
fn llama_completion_reads_its_prompt_and_may_name_no_model() {
    let kind = Some(RequestKind::LlamaCompletion);
    let extract = Extract {
        default_model: Some("m"),
        ..Extract::default()
    };
    let body =
        br#"{"prompt": "Once upon a time", "n_predict": 64, "stream": true, "cache_prompt": true}"#;
    let (l, _) = parse_with_tail(body, kind, 16, extract).unwrap();
    let completion = parse(br#"{"model": "m", "prompt": "Once upon a time"}"#, None, 16).unwrap();
    assert_eq!(
        (l.kind, l.model.as_str(), l.stream, &l.prefix_hashes),
        (
            RequestKind::LlamaCompletion,
            "m",
            true,
            &completion.prefix_hashes
        )
    );
    let e = parse_with_tail(br#"{"prompt": "x"}"#, kind, 16, Extract::default())
        .map(|(p, _)| p)
        .unwrap_err();
    assert!(e.to_string().contains("add \"model\""), "{e}");
    assert_eq!(
        RequestKind::from_path("/completion"),
        Some(RequestKind::LlamaCompletion)
    );
    assert_eq!(
        RequestKind::from_path("/v1/completions"),
        Some(RequestKind::Completions)
    );
}
