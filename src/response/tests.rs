//! The answer reader's unit tests: SSE and JSON answers cut anywhere, usage, bounds, learning.

use super::*;

const SSE: &str = concat!(
    "data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
    "data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"}}]}\n\n",
    ": keep-alive\n\n",
    "data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\", w\\u00f6rld\"}}]}\r\n\r\n",
    "data: {\"id\":\"x\",\"choices\":[{\"index\":1,\"delta\":{\"content\":\"other choice\"}}]}\n\n",
    "data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
    "data: {\"id\":\"x\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":3,",
    "\"prompt_tokens_details\":{\"cached_tokens\":8}}}\n\n",
    "data: [DONE]\n\n",
);

fn read(kind: RequestKind, cap: usize, pieces: &[&[u8]]) -> Capture {
    let mut r = ResponseReader::new(kind, cap);
    for (i, p) in pieces.iter().enumerate() {
        r.feed(p, i + 1 == pieces.len());
    }
    std::mem::take(&mut r.out)
}

fn whole(kind: RequestKind, cap: usize, body: &[u8]) -> Capture {
    read(kind, cap, &[body])
}

#[test]
fn sse_text_usage_and_done() {
    let c = whole(RequestKind::Chat, 1024, SSE.as_bytes());
    assert_eq!(c.text, "Hello, wörld".as_bytes());
    assert!(c.complete && !c.capped && c.learnable());
    assert_eq!(
        c.usage,
        Some(Usage {
            prompt_tokens: 12,
            completion_tokens: 3,
            cached_tokens: Some(8)
        })
    );
}

#[test]
fn usage_only_reads_the_usage_of_streams_and_of_answers_too_long_to_parse() {
    let want = Some(Usage {
        prompt_tokens: 12,
        completion_tokens: 3,
        cached_tokens: Some(8),
    });
    // cap 0: no text, the usage still read, however the stream is cut
    let c = whole(RequestKind::Chat, 0, SSE.as_bytes());
    assert_eq!((c.usage, c.text.len()), (want, 0));
    let bytes = SSE.as_bytes();
    for cut in 0..bytes.len() {
        let c = read(RequestKind::Chat, 0, &[&bytes[..cut], &bytes[cut..]]);
        assert_eq!(c.usage, want, "cut at {cut}");
    }
    // a JSON answer far over the bound (1 MiB of text, in 4 KiB pieces), usage last;
    // the text quotes a usage object near the end: not taken for the answer's
    let mut body = br#"{"id":"x","choices":[{"index":0,"message":{"content":""#.to_vec();
    body.extend(std::iter::repeat_n(b'a', 1 << 20));
    body.extend_from_slice(br#" \"usage\": {\"prompt_tokens\": 1}"},"finish_reason":"stop"}],"#);
    body.extend_from_slice(
        br#""usage" : {"prompt_tokens":12,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":8}},"x":[1]}"#,
    );
    for cap in [0, 1024] {
        let pieces: Vec<&[u8]> = body.chunks(4096).collect();
        let c = read(RequestKind::Chat, cap, &pieces);
        assert_eq!(c.usage, want, "cap {cap}");
        assert!(
            !c.complete && !c.learnable(),
            "cap {cap}: not parsed whole, not learned"
        );
    }
    // what is kept of it stays bounded; a truncated usage is none, without a panic
    let mut r = ResponseReader::new(RequestKind::Chat, 0);
    for piece in body[..body.len() - 40].chunks(4096) {
        r.feed(piece, false);
        assert!(
            r.line.len() <= 2 * USAGE_TAIL_BYTES.max(r.bound()),
            "bounded"
        );
    }
    assert!(r.json_too_long && r.line.len() <= 2 * USAGE_TAIL_BYTES);
    r.end();
    assert_eq!(r.capture().usage, None);
}

#[test]
fn any_split_gives_the_same_capture() {
    let want = whole(RequestKind::Chat, 1024, SSE.as_bytes());
    let bytes = SSE.as_bytes();
    let ones: Vec<&[u8]> = bytes.chunks(1).collect();
    let got = read(RequestKind::Chat, 1024, &ones);
    assert_eq!(
        (got.text, got.usage, got.complete),
        (want.text.clone(), want.usage, true)
    );
    for cut in 0..bytes.len() {
        let got = read(RequestKind::Chat, 1024, &[&bytes[..cut], &bytes[cut..]]);
        assert_eq!(got.text, want.text, "cut at {cut}");
        assert!(got.complete, "cut at {cut}");
    }
}

#[test]
fn one_byte_pieces_of_a_long_stream_stay_linear() {
    // 20,000 events fed a byte at a time: quadratic rescanning would take minutes.
    let mut body = Vec::new();
    for i in 0..20_000 {
        body.extend_from_slice(
            format!(
                "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{}\"}}}}]}}\n\n",
                i % 10
            )
            .as_bytes(),
        );
    }
    body.extend_from_slice(b"data: [DONE]\n\n");
    let mut r = ResponseReader::new(RequestKind::Chat, 1 << 20);
    let start = std::time::Instant::now();
    for b in body.chunks(1) {
        r.feed(b, false);
    }
    r.feed(b"", true);
    assert_eq!(r.capture().text.len(), 20_000);
    assert!(r.capture().complete);
    assert!(start.elapsed().as_secs() < 10);
}

#[test]
fn stream_cut_before_the_end_is_not_learnable() {
    let cut = SSE
        .find("data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"delta\":{},")
        .unwrap();
    let c = whole(RequestKind::Chat, 1024, &SSE.as_bytes()[..cut]);
    assert_eq!(c.text, "Hello, wörld".as_bytes());
    assert!(!c.complete && !c.learnable());
    // A finish_reason at the end is enough without [DONE].
    let done = SSE.find("data: {\"id\":\"x\",\"choices\":[],").unwrap();
    assert!(whole(RequestKind::Chat, 1024, &SSE.as_bytes()[..done]).complete);
}

#[test]
fn non_streamed_json() {
    let body = br#" {"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Hi there"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}"#;
    let c = whole(RequestKind::Chat, 1024, body);
    assert_eq!(c.text, b"Hi there");
    assert!(c.complete);
    assert_eq!(
        c.usage,
        Some(Usage {
            prompt_tokens: 5,
            completion_tokens: 2,
            cached_tokens: None
        })
    );
    let ones: Vec<&[u8]> = body.chunks(1).collect();
    assert_eq!(read(RequestKind::Chat, 1024, &ones).text, b"Hi there");
}

#[test]
fn only_choice_zero_is_read_in_whatever_order_the_choices_come() {
    // n=2: choice 1 first, then choice 0 (escaped text: the copied-string path)
    let body = br#"{"choices":[{"index":1,"message":{"content":"second"},"finish_reason":"stop"},{"index":0,"message":{"content":"fir\u0073t"},"finish_reason":"stop"}]}"#;
    let c = whole(RequestKind::Chat, 1024, body);
    assert_eq!(c.text, b"first");
    assert!(c.complete);
    // a null finish_reason is no finish: this stream ends without one, so it is incomplete
    let sse = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"},\"finish_reason\":null}]}\n\n";
    let c = whole(RequestKind::Chat, 1024, sse.as_bytes());
    assert_eq!(c.text, b"a");
    assert!(!c.complete);
}

#[test]
fn completions_text() {
    let sse = "data: {\"choices\":[{\"index\":0,\"text\":\" upon\"}]}\n\ndata: {\"choices\":[{\"index\":0,\"text\":\" a time\",\"finish_reason\":\"length\"}]}\n\ndata: [DONE]\n\n";
    let c = whole(RequestKind::Completions, 1024, sse.as_bytes());
    assert_eq!(c.text, b" upon a time");
    let json = br#"{"choices":[{"index":0,"text":" upon a time","finish_reason":"stop"}]}"#;
    assert_eq!(
        whole(RequestKind::Completions, 1024, json).text,
        b" upon a time"
    );
    let mut h = PrefixHasher::new("m", 16);
    h.feed(b"once");
    c.render_next_turn(&mut h);
    assert_eq!(
        h.finish().0,
        crate::hashing::prefix_hashes("m", b"once upon a time", 16)
    );
}

#[test]
fn cap_keeps_a_prefix() {
    let c = whole(RequestKind::Chat, 7, SSE.as_bytes());
    assert_eq!(c.text, b"Hello, ");
    assert!(c.capped && c.learnable());
    assert_eq!(c.usage.unwrap().prompt_tokens, 12);
    let c = whole(RequestKind::Chat, 0, SSE.as_bytes());
    assert!(c.text.is_empty() && !c.learnable());
}

#[test]
fn tool_calls_render_as_the_request_does() {
    let sse = concat!(
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"let me check\"}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"c1\",\"type\":\"function\",\"function\":{\"name\":\"get\",\"arguments\":\"{\\\"x\\\"\"}}]}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\":1}\"}}]}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":1,\"id\":\"c2\",\"function\":{\"name\":\"put\",\"arguments\":\"{}\"}}]}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\n",
        "data: [DONE]\n\n",
    );
    let c = whole(RequestKind::Chat, 1024, sse.as_bytes());
    assert!(c.learnable());
    let body = br#"{"model":"m","messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"let me check","tool_calls":[{"id":"c1","type":"function","function":{"name":"get","arguments":"{\"x\":1}"}},{"id":"c2","type":"function","function":{"name":"put","arguments":"{}"}}]}]}"#;
    let next = request::parse(body, None, 16).unwrap();
    let (first, tail) = request::parse_with_tail(
        br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
        None,
        16,
        request::Extract {
            tail: true,
            ..Default::default()
        },
    )
    .unwrap();
    let before = first.prompt_chars as usize / 16; // full chunks of the first prompt
    let mut h = tail.unwrap();
    c.render_next_turn(&mut h);
    let learned = h.full_chunk_hashes();
    assert!(!learned.is_empty());
    assert_eq!(learned, &next.prefix_hashes[before..before + learned.len()]);
    // Every full chunk of the next turn (ASCII: characters are bytes).
    assert_eq!(before + learned.len(), next.prompt_chars as usize / 16);
}

proptest::proptest! {
    // Any cut of a stream into pieces gives the capture of the whole.
    #[test]
    fn random_cuts_give_the_same_capture(cuts in proptest::collection::vec(0usize..SSE.len(), 0..12)) {
        let bytes = SSE.as_bytes();
        let mut cuts = cuts;
        cuts.sort();
        let mut pieces = Vec::new();
        let mut start = 0;
        for c in cuts { pieces.push(&bytes[start..c]); start = c; }
        pieces.push(&bytes[start..]);
        let got = read(RequestKind::Chat, 1024, &pieces);
        proptest::prop_assert_eq!(got.text, "Hello, wörld".as_bytes());
        proptest::prop_assert!(got.complete);
        proptest::prop_assert_eq!(got.usage.map(|u| u.completion_tokens), Some(3));
    }

    // Arbitrary bytes, in arbitrary pieces, never panic.
    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
                                   piece in 1usize..50, prefix in 0usize..3) {
        let mut body = [&b""[..], b"data: ", b"{"][prefix].to_vec();
        body.extend_from_slice(&data);
        for kind in [RequestKind::Chat, RequestKind::Completions] {
            let mut r = ResponseReader::new(kind, 64);
            for p in body.chunks(piece) { r.feed(p, false); }
            r.end();
            let mut h = PrefixHasher::new("m", 16);
            r.capture().render_next_turn(&mut h);
            proptest::prop_assert!(r.capture().text.len() <= 64);
        }
    }
}

#[test]
fn garbage_stops_the_capture_without_panicking() {
    let cases: [&[u8]; 6] = [
        b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {nope\n\ndata: [DONE]\n\n",
        b"data: {\"error\":{\"message\":\"overloaded\"}}\n\ndata: [DONE]\n\n",
        b"{\"choices\":[{\"message\":{\"content\":\"a\"}}]",
        b"\xff\xfe\x00garbage\n\n\n",
        b"{\"error\":{\"message\":\"bad\"}}",
        b"data: {\"choices\":[{\"delta\":{\"content\":\"\\ud800\"}}]}\n\n",
    ];
    for body in cases {
        let c = whole(RequestKind::Chat, 1024, body);
        assert!(!c.learnable(), "{:?}", String::from_utf8_lossy(body));
    }
    // An event beyond the bound.
    let mut r = ResponseReader::new(RequestKind::Chat, 16);
    r.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"", false);
    r.feed(&vec![b'a'; 200_000], false);
    r.feed(b"\"}}]}\n\ndata: [DONE]\n\n", true);
    assert!(!r.capture().learnable());
    assert!(r.line.capacity() == 0 && r.event.capacity() == 0);
}

/// A Responses API stream as vLLM sends it: typed events, a text, a function call, the usage
/// in `response.completed`, no `[DONE]`.
const RESPONSES_SSE: &str = concat!(
    "event: response.created\n",
    "data: {\"response\":{\"id\":\"resp_42\",\"object\":\"response\",\"status\":\"in_progress\",\"output\":[],\"usage\":null},\"sequence_number\":0,\"type\":\"response.created\"}\n\n",
    "event: response.output_item.added\n",
    "data: {\"type\":\"response.output_item.added\",\"output_index\":0,\"item\":{\"type\":\"message\",\"id\":\"msg_1\",\"role\":\"assistant\",\"content\":[]}}\n\n",
    "data: {\"type\":\"response.output_text.delta\",\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\"let me \"}\n\n",
    "data: {\"type\":\"response.output_text.delta\",\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\"check\"}\n\n",
    "data: {\"type\":\"response.reasoning_text.delta\",\"output_index\":0,\"delta\":\"not text\"}\n\n",
    "data: {\"type\":\"response.output_item.added\",\"output_index\":1,\"item\":{\"type\":\"function_call\",\"call_id\":\"c1\",\"name\":\"get\",\"arguments\":\"\"}}\n\n",
    "data: {\"type\":\"response.function_call_arguments.delta\",\"output_index\":1,\"delta\":\"{\\\"x\\\"\"}\n\n",
    "data: {\"type\":\"response.function_call_arguments.delta\",\"output_index\":1,\"delta\":\":1}\"}\n\n",
    "event: response.completed\r\n",
    "data: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_42\",\"status\":\"completed\",\"output\":[{\"type\":\"message\",\"content\":[{\"type\":\"output_text\",\"text\":\"let me check\"}]}],",
    "\"usage\":{\"input_tokens\":12,\"input_tokens_details\":{\"cached_tokens\":8},\"output_tokens\":3,\"total_tokens\":15}}}\r\n\r\n",
);

const RESPONSES_USAGE: Option<Usage> = Some(Usage {
    prompt_tokens: 12,
    completion_tokens: 3,
    cached_tokens: Some(8),
});

#[test]
fn responses_streams_give_text_calls_usage_and_id_however_cut() {
    let c = whole(RequestKind::Responses, 1024, RESPONSES_SSE.as_bytes());
    assert_eq!(c.text, b"let me check");
    assert_eq!(c.tool_calls, vec![(b"get".to_vec(), b"{\"x\":1}".to_vec())]);
    assert_eq!(c.usage, RESPONSES_USAGE);
    assert_eq!(c.response_id.as_deref(), Some("resp_42"));
    assert!(c.complete && c.learnable());
    let bytes = RESPONSES_SSE.as_bytes();
    for cut in 0..bytes.len() {
        let got = read(
            RequestKind::Responses,
            1024,
            &[&bytes[..cut], &bytes[cut..]],
        );
        assert_eq!(got.text, c.text, "cut at {cut}");
        assert_eq!(got.tool_calls, c.tool_calls, "cut at {cut}");
        assert_eq!(got.usage, c.usage, "cut at {cut}");
        assert_eq!(got.response_id, c.response_id, "cut at {cut}");
        assert!(got.complete, "cut at {cut}");
        // reading only the usage: the usage and the id all the same
        let got = read(RequestKind::Responses, 0, &[&bytes[..cut], &bytes[cut..]]);
        assert_eq!(
            (got.usage, got.response_id),
            (c.usage, c.response_id.clone())
        );
    }
    // without its completed event the stream was cut: not complete, not learned
    let end = RESPONSES_SSE.find("event: response.completed").unwrap();
    let c = whole(RequestKind::Responses, 1024, &bytes[..end]);
    assert!(!c.complete && !c.learnable());
    assert_eq!(c.response_id.as_deref(), Some("resp_42"));
}

#[test]
fn whole_responses_answers_and_failures() {
    let body = br#"{"id":"resp_7","object":"response","status":"completed","error":null,
        "output":[{"type":"reasoning","summary":[]},
                  {"type":"message","role":"assistant","content":[{"type":"output_text","text":"let me check"}]},
                  {"type":"function_call","call_id":"c1","name":"get","arguments":"{\"x\":1}"}],
        "usage":{"input_tokens":12,"input_tokens_details":{"cached_tokens":8},"output_tokens":3}}"#;
    let c = whole(RequestKind::Responses, 1024, body);
    assert_eq!(c.text, b"let me check");
    assert_eq!(c.tool_calls, vec![(b"get".to_vec(), b"{\"x\":1}".to_vec())]);
    assert_eq!(
        (c.usage, c.response_id.as_deref()),
        (RESPONSES_USAGE, Some("resp_7"))
    );
    assert!(c.complete);
    // a failed stream or an error answer is not learned (and an error has no id)
    let failed = "data: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_8\"}}\n\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"x\"}\n\ndata: {\"type\":\"response.failed\",\"response\":{\"id\":\"resp_8\"}}\n\n";
    let c = whole(RequestKind::Responses, 1024, failed.as_bytes());
    assert!(!c.complete && !c.learnable());
    let c = whole(RequestKind::Responses, 1024, br#"{"error":{"message":"Response with id 'resp_1' not found.","type":"invalid_request_error","code":404}}"#);
    assert!(!c.complete && c.response_id.is_none());
    // ids that are not plain are not taken
    assert_eq!(
        responses_api::first_id(br#"{"id": "resp_1"}"#).as_deref(),
        Some("resp_1")
    );
    assert_eq!(responses_api::first_id(br#"{"id":"a\"b"}"#), None);
    assert_eq!(responses_api::first_id(br#"{"id":""}"#), None);
    let long = format!(r#"{{"id":"{}"}}"#, "r".repeat(300));
    assert_eq!(responses_api::first_id(long.as_bytes()), None);
    // an answer's id is found in its head even when the answer is far over the bound
    let mut huge =
        br#"{"id":"resp_9","output":[{"type":"message","content":[{"type":"output_text","text":""#
            .to_vec();
    huge.extend(std::iter::repeat_n(b'a', 1 << 20));
    huge.extend_from_slice(br#""}]}],"usage":{"input_tokens":5,"output_tokens":1}}"#);
    let pieces: Vec<&[u8]> = huge.chunks(4096).collect();
    let c = read(RequestKind::Responses, 0, &pieces);
    assert_eq!(c.response_id.as_deref(), Some("resp_9"));
    assert_eq!(c.usage.map(|u| u.prompt_tokens), Some(5));
}

#[test]
fn responses_answers_render_as_the_next_turn_resends_them() {
    let c = whole(RequestKind::Responses, 1024, RESPONSES_SSE.as_bytes());
    let first = br#"{"model":"m","instructions":"be brief","input":"what is x?"}"#;
    let next = br#"{"model":"m","instructions":"be brief","input":[
        {"role":"user","content":"what is x?"},
        {"type":"reasoning","summary":[]},
        {"type":"message","role":"assistant","content":[{"type":"output_text","text":"let me check"}]},
        {"type":"function_call","call_id":"c1","name":"get","arguments":"{\"x\":1}"},
        {"type":"function_call_output","call_id":"c1","output":"42"}]}"#;
    assert!(learned_as_next_turn(&c, RequestKind::Responses, first, next) > 2);
}

/// A Messages API stream as vLLM sends it: typed events with `event:` lines, a text block, a
/// tool_use block whose input streams as partial JSON, the usage split over message_start and
/// message_delta, then message_stop and `[DONE]`.
const MESSAGES_SSE: &str = concat!(
    "event: message_start\n",
    "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"usage\":{\"input_tokens\":12,\"output_tokens\":0}}}\n\n",
    "event: content_block_start\n",
    "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"thinking\",\"thinking\":\"\"}}\n\n",
    "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"hmm\"}}\n\n",
    "data: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
    "data: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"text_delta\",\"text\":\"read\"}}\n\n",
    "data: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"text_delta\",\"text\":\"ing\"}}\n\n",
    "data: {\"type\":\"content_block_stop\",\"index\":1}\n\n",
    "data: {\"type\":\"content_block_start\",\"index\":2,\"content_block\":{\"type\":\"tool_use\",\"id\":\"t1\",\"name\":\"read\",\"input\":{}}}\n\n",
    "data: {\"type\":\"content_block_delta\",\"index\":2,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"path\\\":\\\"a.py\\\"}\"}}\n\n",
    "data: {\"type\":\"content_block_stop\",\"index\":2}\n\n",
    "event: message_delta\n",
    "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\"},\"usage\":{\"output_tokens\":3}}\n\n",
    "event: message_stop\n",
    "data: {\"type\":\"message_stop\"}\n\n",
    "data: [DONE]\n\n",
);

#[test]
fn messages_streams_give_text_tool_names_and_usage_however_cut() {
    let want_usage = Some(Usage {
        prompt_tokens: 12,
        completion_tokens: 3,
        cached_tokens: None,
    });
    let c = whole(RequestKind::Messages, 1024, MESSAGES_SSE.as_bytes());
    assert_eq!(c.text, b"reading");
    assert_eq!(c.tool_calls, vec![(b"read".to_vec(), Vec::new())]);
    assert_eq!(c.usage, want_usage);
    assert!(c.complete && c.learnable());
    let bytes = MESSAGES_SSE.as_bytes();
    for cut in 0..bytes.len() {
        let got = read(RequestKind::Messages, 1024, &[&bytes[..cut], &bytes[cut..]]);
        assert_eq!(
            (&got.text, &got.tool_calls, got.usage),
            (&c.text, &c.tool_calls, c.usage),
            "cut at {cut}"
        );
        assert!(got.complete, "cut at {cut}");
        let got = read(RequestKind::Messages, 0, &[&bytes[..cut], &bytes[cut..]]);
        assert_eq!(got.usage, want_usage, "usage only, cut at {cut}");
    }
    // a whole answer; an error answer
    let body = br#"{"id":"msg_2","type":"message","role":"assistant","content":[{"type":"text","text":"reading"},{"type":"tool_use","id":"t1","name":"read","input":{"path":"a.py"}}],"stop_reason":"tool_use","usage":{"input_tokens":12,"output_tokens":3,"cache_read_input_tokens":8}}"#;
    let w = whole(RequestKind::Messages, 1024, body);
    assert_eq!(
        (&w.text, &w.tool_calls, w.usage),
        (&c.text, &c.tool_calls, want_usage)
    );
    let e = whole(
        RequestKind::Messages,
        1024,
        br#"{"type":"error","error":{"type":"overloaded_error","message":"busy"}}"#,
    );
    assert!(!e.complete && !e.learnable());
}

#[test]
fn messages_answers_render_as_the_next_turn_resends_them() {
    let c = whole(RequestKind::Messages, 1024, MESSAGES_SSE.as_bytes());
    let first = br#"{"model":"m","system":"be brief","messages":[{"role":"user","content":"fix a.py please"}]}"#;
    let next = br#"{"model":"m","system":[{"type":"text","text":"be brief"}],"messages":[
        {"role":"user","content":[{"type":"text","text":"fix a.py please"}]},
        {"role":"assistant","content":[{"type":"thinking","thinking":"hmm","signature":"x"},{"type":"text","text":"reading"},{"type":"tool_use","id":"t1","name":"read","input":{"path": "a.py"}}]},
        {"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":"print(1)"}]}]}"#;
    assert!(learned_as_next_turn(&c, RequestKind::Messages, first, next) > 1);
}

/// Renders `c` (the answer to `first`) after `first`'s prompt as a learned next turn, checks
/// that its full chunks are the chunks of `next` (the next turn's body) that follow `first`'s,
/// and returns how many there are. 16-byte chunks.
fn learned_as_next_turn(c: &Capture, kind: RequestKind, first: &[u8], next: &[u8]) -> usize {
    let next = request::parse(next, Some(kind), 16).unwrap();
    let learn = request::Extract {
        tail: true,
        ..Default::default()
    };
    let (first, tail) = request::parse_with_tail(first, Some(kind), 16, learn).unwrap();
    let before = first.prompt_chars as usize / 16;
    let mut h = tail.unwrap();
    c.render_next_turn(&mut h);
    let learned = h.full_chunk_hashes();
    assert_eq!(learned, &next.prefix_hashes[before..before + learned.len()]);
    learned.len()
}

/// SGLang's `/generate` stream: each event the whole text so far, then `[DONE]`.
const GENERATE_SSE: &str = concat!(
    "data: {\"text\":\"The\",\"meta_info\":{\"id\":\"a\",\"prompt_tokens\":12,\"completion_tokens\":1,\"cached_tokens\":8,\"finish_reason\":null}}\n\n",
    "data: {\"text\":\"The capital\",\"meta_info\":{\"id\":\"a\",\"prompt_tokens\":12,\"completion_tokens\":2,\"cached_tokens\":8,\"finish_reason\":null}}\n\n",
    "data: {\"text\":\"The capital is Paris.\",\"meta_info\":{\"id\":\"a\",\"prompt_tokens\":12,\"completion_tokens\":5,\"cached_tokens\":8,\"finish_reason\":{\"type\":\"stop\",\"matched\":2}}}\n\n",
    "data: [DONE]\n\n",
);

#[test]
fn generate_streams_and_answers_give_text_and_usage_however_cut() {
    let want_usage = Some(Usage {
        prompt_tokens: 12,
        completion_tokens: 5,
        cached_tokens: Some(8),
    });
    let c = whole(RequestKind::Generate, 1024, GENERATE_SSE.as_bytes());
    assert_eq!(c.text, b"The capital is Paris.");
    assert_eq!(c.usage, want_usage);
    assert!(c.complete && c.learnable());
    let bytes = GENERATE_SSE.as_bytes();
    for cut in 0..bytes.len() {
        let got = read(RequestKind::Generate, 1024, &[&bytes[..cut], &bytes[cut..]]);
        assert_eq!((&got.text, got.usage), (&c.text, c.usage), "cut at {cut}");
        assert!(got.complete, "cut at {cut}");
        let got = read(RequestKind::Generate, 0, &[&bytes[..cut], &bytes[cut..]]);
        assert_eq!(got.usage, want_usage, "usage only, cut at {cut}");
    }
    // --incremental-streaming-output: each event only the new text
    let incremental = GENERATE_SSE
        .replace("\"The capital is Paris.\"", "\" is Paris.\"")
        .replace("\"The capital\"", "\" capital\"");
    let i = whole(RequestKind::Generate, 1024, incremental.as_bytes());
    assert_eq!((&i.text, i.usage), (&c.text, want_usage));
    // capped: a prefix of the whole text, whichever way it streams
    let capped = whole(RequestKind::Generate, 7, GENERATE_SSE.as_bytes());
    assert_eq!(
        (capped.text.as_slice(), capped.capped),
        (&b"The cap"[..], true)
    );
    // a whole answer; an error answer
    let body = br#"{"text":"The capital is Paris.","output_ids":[1,2,3],"meta_info":{"prompt_tokens":12,"completion_tokens":5,"cached_tokens":8,"finish_reason":{"type":"length","length":5}}}"#;
    let w = whole(RequestKind::Generate, 1024, body);
    assert_eq!((&w.text, w.usage), (&c.text, want_usage));
    assert!(w.learnable());
    let e = whole(
        RequestKind::Generate,
        1024,
        br#"{"error":{"message":"bad"}}"#,
    );
    assert!(!e.complete && !e.learnable());
    // Text Generation Inference's answer
    let tgi = br#"{"generated_text":"The capital is Paris.","details":{"finish_reason":"eos_token","generated_tokens":5}}"#;
    let t = whole(RequestKind::Generate, 1024, tgi);
    assert_eq!((&t.text, t.usage), (&c.text, None));
    assert!(t.complete && t.learnable());
}

#[test]
fn generate_answers_render_as_the_next_turn_resends_them() {
    // a multi-turn client of /generate sends the whole text again: prompt, answer, new input
    let c = whole(RequestKind::Generate, 1024, GENERATE_SSE.as_bytes());
    let first = br#"{"text":"Q: what is the capital of France? A: ","model":"m"}"#;
    let next = br#"{"text":"Q: what is the capital of France? A: The capital is Paris. Q: and of Italy? A: ","model":"m","sampling_params":{"max_new_tokens":8}}"#;
    assert_eq!(
        learned_as_next_turn(&c, RequestKind::Generate, first, next),
        1
    );
}

#[test]
fn generate_answers_to_token_prompts_are_learned_as_their_output_ids() {
    // an RL rollout's next turn: the prompt's ids, the answer's output_ids, the tool's ids
    let read_ids = |pieces: &[&[u8]], cap: usize| {
        let mut r = ResponseReader::new(RequestKind::Generate, cap).reading_token_ids();
        for (i, p) in pieces.iter().enumerate() {
            r.feed(p, i + 1 == pieces.len());
        }
        std::mem::take(&mut r.out)
    };
    let whole_answer = br#"{"text":"ignored","output_ids":[7,8,9,10,11,12],"meta_info":{"prompt_tokens":40,"completion_tokens":6,"cached_tokens":0,"finish_reason":{"type":"stop"}}}"#;
    let c = read_ids(&[whole_answer], 1024);
    assert_eq!(
        (c.token_ids.as_slice(), c.text.is_empty()),
        (&[7, 8, 9, 10, 11, 12][..], true)
    );
    assert!(c.learnable());
    // streamed, each event all the ids so far (or, incremental, only the new ones)
    let cumulative = concat!(
        "data: {\"text\":\"a\",\"output_ids\":[7,8],\"meta_info\":{\"prompt_tokens\":40,\"completion_tokens\":2,\"finish_reason\":null}}\n\n",
        "data: {\"text\":\"ab\",\"output_ids\":[7,8,9,10,11,12],\"meta_info\":{\"prompt_tokens\":40,\"completion_tokens\":6,\"finish_reason\":{\"type\":\"stop\"}}}\n\n",
        "data: [DONE]\n\n",
    );
    let incremental = cumulative.replace("[7,8,9,10,11,12]", "[9,10,11,12]");
    for stream in [cumulative.to_string(), incremental] {
        let bytes = stream.as_bytes();
        for cut in 0..bytes.len() {
            let got = read_ids(&[&bytes[..cut], &bytes[cut..]], 1024);
            assert_eq!(got.token_ids, c.token_ids, "cut at {cut}: {stream}");
            assert!(got.complete);
        }
    }
    // capped: 4 bytes an id
    assert_eq!(read_ids(&[whole_answer], 9).token_ids, vec![7, 8]);
    // garbage ids stop the capture
    let bad = read_ids(
        &[br#"{"output_ids":["x"],"meta_info":{"prompt_tokens":1}}"#],
        64,
    );
    assert!(!bad.learnable());
    // the next turn: the prompt's ids, then the output's, then more
    let prompt: Vec<u32> = (100..140).collect();
    let first = serde_json::json!({"model": "m", "input_ids": prompt}).to_string();
    let mut next_ids = prompt.clone();
    next_ids.extend([7, 8, 9, 10, 11, 12, 500, 501, 502]);
    let next = serde_json::json!({"model": "m", "input_ids": next_ids}).to_string();
    let learned =
        learned_as_next_turn(&c, RequestKind::Generate, first.as_bytes(), next.as_bytes());
    assert!(learned >= 1, "{learned} chunks learned");
}

/// llama.cpp's `/completion` stream: each event the new content, the last `stop` with the
/// counts (no `[DONE]`).
const LLAMA_SSE: &str = concat!(
    "data: {\"content\":\"The\",\"stop\":false,\"id_slot\":0}\n\n",
    "data: {\"content\":\" capital is Paris.\",\"stop\":false,\"id_slot\":0}\n\n",
    "data: {\"content\":\"\",\"stop\":true,\"model\":\"m\",\"tokens_predicted\":5,\"tokens_evaluated\":12,",
    "\"timings\":{\"cache_n\":8,\"prompt_n\":4,\"predicted_n\":5}}\n\n",
);

#[test]
fn llama_completion_streams_and_answers_give_text_and_usage_however_cut() {
    let want_usage = Some(Usage {
        prompt_tokens: 12,
        completion_tokens: 5,
        cached_tokens: Some(8),
    });
    let c = whole(RequestKind::LlamaCompletion, 1024, LLAMA_SSE.as_bytes());
    assert_eq!(
        (c.text.as_slice(), c.usage),
        (&b"The capital is Paris."[..], want_usage)
    );
    assert!(c.complete && c.learnable());
    let bytes = LLAMA_SSE.as_bytes();
    for cut in 0..bytes.len() {
        let got = read(
            RequestKind::LlamaCompletion,
            1024,
            &[&bytes[..cut], &bytes[cut..]],
        );
        assert_eq!((&got.text, got.usage), (&c.text, c.usage), "cut at {cut}");
        assert!(got.complete, "cut at {cut}");
        let got = read(
            RequestKind::LlamaCompletion,
            0,
            &[&bytes[..cut], &bytes[cut..]],
        );
        assert_eq!(got.usage, want_usage, "usage only, cut at {cut}");
    }
    // cut before the last event: not complete, not learned
    let cut = LLAMA_SSE
        .find("data: {\"content\":\"\",\"stop\":true")
        .unwrap();
    let part = whole(RequestKind::LlamaCompletion, 1024, &bytes[..cut]);
    assert!(!part.complete && !part.learnable());
    // a whole answer (the prompt's tokens from the timings when tokens_evaluated is absent)
    let body = br#"{"content":"The capital is Paris.","stop":true,"tokens_predicted":5,"timings":{"cache_n":8,"prompt_n":4,"predicted_n":5}}"#;
    let w = whole(RequestKind::LlamaCompletion, 1024, body);
    assert_eq!((&w.text, w.usage), (&c.text, want_usage));
    let e = whole(
        RequestKind::LlamaCompletion,
        1024,
        br#"{"error":{"code":500,"message":"slot unavailable","type":"server_error"}}"#,
    );
    assert!(!e.learnable());
    // the next turn resends the prompt and the answer, then its own text
    let first = br#"{"prompt":"Q: what is the capital of France? A:","n_predict":8}"#;
    let next = br#"{"prompt":"Q: what is the capital of France? A:The capital is Paris. Q: and of Italy? A:","n_predict":8}"#;
    let learn = request::Extract {
        tail: true,
        default_model: Some("m"),
        ..Default::default()
    };
    let kind = Some(RequestKind::LlamaCompletion);
    let next = request::parse_with_tail(next, kind, 16, learn).unwrap().0;
    let (first, tail) = request::parse_with_tail(first, kind, 16, learn).unwrap();
    let before = first.prompt_chars as usize / 16;
    let mut h = tail.unwrap();
    c.render_next_turn(&mut h);
    let learned = h.full_chunk_hashes();
    assert!(!learned.is_empty());
    assert_eq!(learned, &next.prefix_hashes[before..before + learned.len()]);
}
