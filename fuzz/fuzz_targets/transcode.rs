//! The Triton response transcoder with arbitrary bytes and arbitrary chunking: never a
//! panic; a streamed answer always ends with [DONE] or an error event; a non-streamed one is
//! always valid JSON.
#![no_main]
use libfuzzer_sys::fuzz_target;
use llmproxy::request::RequestKind;
use llmproxy::transcode::{Output, Transcoder};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else { return };
    let stream = sel & 1 != 0;
    let kind = if sel & 2 != 0 { RequestKind::Chat } else { RequestKind::Completions };
    let mut t = Transcoder::triton(kind, stream, "m");
    t.response_status(if sel & 4 != 0 { 500 } else { 200 });
    let step = usize::from(sel >> 3).max(1);
    let mut out = Vec::new();
    let chunks: Vec<&[u8]> = rest.chunks(step).collect();
    for (i, c) in chunks.iter().enumerate() {
        match t.feed(c, i + 1 == chunks.len()) {
            Output::Same => out.extend_from_slice(c),
            Output::Bytes(b) => out.extend_from_slice(b),
        }
    }
    if chunks.is_empty() {
        if let Output::Bytes(b) = t.feed(b"", true) {
            out.extend_from_slice(b);
        }
    }
    if stream && sel & 4 == 0 {
        let s = String::from_utf8_lossy(&out);
        assert!(s.ends_with("data: [DONE]\n\n") || s.contains("\"error\""), "{s}");
    } else {
        serde_json::from_slice::<serde_json::Value>(&out).expect("valid JSON");
    }
});
