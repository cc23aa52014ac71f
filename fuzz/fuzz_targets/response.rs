//! The response reader (learning from the answer) with arbitrary bytes and arbitrary chunking:
//! never a panic, the capture never exceeds its cap, and the same bytes cut differently give
//! the same capture.
#![no_main]
use libfuzzer_sys::fuzz_target;
use llmproxy::hashing::PrefixHasher;
use llmproxy::request::RequestKind;
use llmproxy::response::ResponseReader;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else { return };
    let kind = if sel & 1 != 0 { RequestKind::Chat } else { RequestKind::Completions };
    let cap = [0usize, 7, 64, 4096][usize::from(sel >> 1) & 3];
    let step = usize::from(sel >> 3).max(1);
    let read = |step: usize| {
        let mut r = ResponseReader::new(kind, cap);
        for c in rest.chunks(step) {
            r.feed(c, false);
        }
        r.end();
        r
    };
    let a = read(step);
    let b = read(rest.len().max(1));
    let (ca, cb) = (a.capture(), b.capture());
    assert!(ca.text.len() <= cap);
    assert_eq!((&ca.text, &ca.tool_calls, ca.usage), (&cb.text, &cb.tool_calls, cb.usage));
    assert_eq!(ca.learnable(), cb.learnable());
    let mut h = PrefixHasher::new("m", 16);
    ca.render_next_turn(&mut h);
});
