//! `force_stream_usage`'s stripper with arbitrary bytes and chunking: never a panic; however
//! the body is cut the client gets the same bytes; a body without `"usage"` passes unchanged;
//! only whole events are ever removed (the output never grows).
#![no_main]
use libfuzzer_sys::fuzz_target;
use llmproxy::transcode::usage_strip::{Strip, UsageStripper};

fn run(pieces: &[&[u8]]) -> Vec<u8> {
    let mut s = UsageStripper::default();
    let mut client = Vec::new();
    for (i, p) in pieces.iter().enumerate() {
        let mut out = Vec::new();
        match s.feed(p, i + 1 == pieces.len(), &mut out) {
            Strip::Same => client.extend_from_slice(p),
            Strip::Rewritten => client.extend_from_slice(&out),
        }
    }
    client
}

fuzz_target!(|data: &[u8]| {
    let Some((&step, body)) = data.split_first() else { return };
    let whole = run(&[body]);
    let pieces: Vec<&[u8]> = body.chunks(usize::from(step).max(1)).collect();
    let cut = if pieces.is_empty() { run(&[b""]) } else { run(&pieces) };
    assert_eq!(whole, cut, "chunking changed the output");
    assert!(whole.len() <= body.len());
    if !body.windows(7).any(|w| w == b"\"usage\"") {
        assert_eq!(whole, body, "a body without usage changed");
    }
});
