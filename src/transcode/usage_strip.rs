//! `force_stream_usage`'s response side: drops the usage-only chunk a client did not ask for.
//!
//! With `force_stream_usage` the router sets `stream_options.include_usage` on streamed
//! requests so the server reports the answer's token counts (vLLM, SGLang and OpenAI send
//! them in one extra event before `data: [DONE]`: `choices` empty, `usage` set). A client
//! that did not ask for it must not see that event: this filter passes every other byte
//! unchanged and removes exactly that event.
//!
//! Chunks of any size and boundary: complete events are released as soon as their blank
//! line arrives, a partial one waits for the rest. The common chunk (whole events, no
//! `"usage"` in it) passes without a copy. Each input byte is scanned once; an event is
//! parsed only when it contains `"usage"`. Error answers and non-SSE bodies pass untouched.

use memchr::memmem;
use serde::de::IgnoredAny;
use serde::Deserialize;

/// Longest partial event held back (a usage event is a few hundred bytes; a longer event
/// is released as it comes).
const MAX_HELD_EVENT: usize = 64 * 1024;

/// The filter of one response.
#[derive(Debug, Default)]
pub struct UsageStripper {
    /// The unterminated event so far.
    held: Vec<u8>,
    /// Where the scan for the next line end resumes in `held`.
    scanned: usize,
    /// Start of the current line in `held`.
    line_start: usize,
    /// The first non-blank byte was seen (a `{` means a JSON body, not an event stream).
    started: bool,
    /// The body is not an event stream, or an event grew too long: pass the rest as is.
    passing: bool,
    /// Events were removed (the client gets fewer bytes than the server sent).
    pub stripped: u32,
}

/// What one `feed` produced.
pub enum Strip {
    /// The input chunk unchanged.
    Same,
    /// These bytes were appended to the output instead (possibly none).
    Rewritten,
}

#[derive(Deserialize)]
struct Probe {
    #[serde(default)]
    choices: Option<Vec<IgnoredAny>>,
    #[serde(default)]
    usage: Option<IgnoredAny>,
}

impl UsageStripper {
    /// Feeds one chunk of a 2xx event-stream answer; appends what the client gets to `out`
    /// unless the result is [`Strip::Same`].
    pub fn feed(&mut self, chunk: &[u8], end_of_stream: bool, out: &mut Vec<u8>) -> Strip {
        if self.passing {
            return Strip::Same;
        }
        if !self.started {
            if let Some(&first) = chunk.iter().find(|b| !b.is_ascii_whitespace()) {
                self.started = true;
                if first == b'{' {
                    // a JSON body (an error the server sent with 200): not ours to touch
                    self.passing = true;
                    if self.held.is_empty() {
                        return Strip::Same;
                    }
                    out.append(&mut self.held); // the blanks held before it
                    out.extend_from_slice(chunk);
                    return Strip::Rewritten;
                }
            }
        }
        if self.held.is_empty() {
            let whole_events = chunk.ends_with(b"\n\n") || chunk.ends_with(b"\n\r\n");
            if whole_events && memmem::find(chunk, b"\"usage\"").is_none() {
                return Strip::Same;
            }
        }
        self.held.extend_from_slice(chunk);
        let mut released = 0;
        while let Some(i) = memchr::memchr(b'\n', &self.held[self.scanned..]) {
            let end = self.scanned + i + 1;
            let line = &self.held[self.line_start..end];
            let blank = line == b"\n" || line == b"\r\n";
            self.scanned = end;
            self.line_start = end;
            if blank {
                let event = &self.held[released..end];
                if self.is_usage_only(event) {
                    self.stripped += 1;
                } else {
                    out.extend_from_slice(event);
                }
                released = end;
            }
        }
        if end_of_stream {
            let tail = &self.held[released..];
            if !self.is_usage_only(tail) {
                out.extend_from_slice(tail);
            }
            released = self.held.len();
        } else if self.held.len() - released > MAX_HELD_EVENT {
            out.extend_from_slice(&self.held[released..]);
            released = self.held.len();
            self.passing = true;
        }
        self.held.drain(..released);
        self.scanned -= released.min(self.scanned);
        self.line_start -= released.min(self.line_start);
        if self.held.is_empty() {
            (self.scanned, self.line_start) = (0, 0);
        }
        Strip::Rewritten
    }

    /// True for one event whose data is a chunk with empty `choices` and a `usage` object.
    fn is_usage_only(&self, event: &[u8]) -> bool {
        if memmem::find(event, b"\"usage\"").is_none() {
            return false;
        }
        let mut data = Vec::new();
        for line in event.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if let Some(rest) = line.strip_prefix(b"data:") {
                if !data.is_empty() {
                    data.push(b'\n');
                }
                data.extend_from_slice(rest.strip_prefix(b" ").unwrap_or(rest));
            } else if !line.is_empty() && !line.starts_with(b":") {
                return false; // `event:`/`id:` lines: some other protocol's event, keep it
            }
        }
        match serde_json::from_slice::<Probe>(&data) {
            Ok(p) => p.usage.is_some() && p.choices.is_some_and(|c| c.is_empty()),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const STREAM: &[u8] =
        b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n\
data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n\
data: {\"id\":\"x\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2}}\n\n\
data: [DONE]\n\n";

    fn expected() -> Vec<u8> {
        let s = std::str::from_utf8(STREAM).unwrap();
        let cut = s.find("data: {\"id\":\"x\"").unwrap();
        let end = s[cut..].find("\n\n").unwrap() + cut + 2;
        [&STREAM[..cut], &STREAM[end..]].concat()
    }

    fn run(pieces: &[&[u8]]) -> (Vec<u8>, u32) {
        let mut s = UsageStripper::default();
        let mut client = Vec::new();
        for (i, p) in pieces.iter().enumerate() {
            let mut out = Vec::new();
            match s.feed(p, i + 1 == pieces.len(), &mut out) {
                Strip::Same => client.extend_from_slice(p),
                Strip::Rewritten => client.extend_from_slice(&out),
            }
        }
        (client, s.stripped)
    }

    #[test]
    fn removes_the_usage_chunk_and_nothing_else() {
        let (client, stripped) = run(&[STREAM]);
        assert_eq!(
            String::from_utf8(client).unwrap(),
            String::from_utf8(expected()).unwrap()
        );
        assert_eq!(stripped, 1);
    }

    #[test]
    fn content_chunks_pass_without_a_copy() {
        let mut s = UsageStripper::default();
        let mut out = Vec::new();
        let chunk = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n";
        assert!(matches!(s.feed(chunk, false, &mut out), Strip::Same));
        assert!(out.is_empty());
    }

    #[test]
    fn crlf_events_and_a_missing_final_blank_line() {
        let stream = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\r\n\r\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\r\n\r\ndata: [DONE]";
        let (client, stripped) = run(&[stream]);
        assert_eq!(
            client,
            b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\r\n\r\ndata: [DONE]".to_vec()
        );
        assert_eq!(stripped, 1);
        // the usage event last, without its blank line
        let (client, _) = run(&[b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}"]);
        assert!(client.is_empty());
    }

    #[test]
    fn keeps_what_is_not_a_usage_only_chunk() {
        for kept in [
            &b"data: {\"choices\":[{\"delta\":{}}],\"usage\":{\"prompt_tokens\":1}}\n\n"[..],
            b"data: {\"choices\":[],\"usage\":null}\n\n",
            b"event: ping\ndata: {\"choices\":[],\"usage\":{}}\n\n",
            b"data: {\"choices\":[],\"usage\":{bad json\n\n",
            b"{\"error\":{\"message\":\"x\",\"usage\":1}}",
            b"\n \n{\"choices\":[],\"usage\":{}}\n\n",
        ] {
            assert_eq!(
                run(&[kept]).0,
                kept.to_vec(),
                "{}",
                String::from_utf8_lossy(kept)
            );
            for cut in 0..kept.len() {
                assert_eq!(
                    run(&[&kept[..cut], &kept[cut..]]).0,
                    kept.to_vec(),
                    "cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn a_long_event_is_released_not_held() {
        let mut big = b"data: \"".to_vec();
        big.extend(std::iter::repeat_n(b'x', MAX_HELD_EVENT + 10));
        let mut s = UsageStripper::default();
        let mut out = Vec::new();
        assert!(matches!(s.feed(&big, false, &mut out), Strip::Rewritten));
        assert_eq!(out, big);
        assert!(matches!(
            s.feed(b"usage\"\n\n", true, &mut out),
            Strip::Same
        ));
    }

    proptest! {
        #[test]
        fn any_chunking_gives_the_same_output(cuts in proptest::collection::vec(0usize..STREAM.len(), 0..6)) {
            let mut cuts = cuts;
            cuts.sort_unstable();
            cuts.dedup();
            let mut pieces = Vec::new();
            let mut start = 0;
            for c in cuts {
                pieces.push(&STREAM[start..c]);
                start = c;
            }
            pieces.push(&STREAM[start..]);
            let (client, stripped) = run(&pieces);
            prop_assert_eq!(client, expected());
            prop_assert_eq!(stripped, 1);
        }

        #[test]
        fn garbage_never_panics_and_loses_nothing_but_usage_events(
            data in proptest::collection::vec(any::<u8>(), 0..300),
            cut in 0usize..300,
        ) {
            let cut = cut.min(data.len());
            let (client, stripped) = run(&[&data[..cut], &data[cut..]]);
            if stripped == 0 {
                prop_assert_eq!(client, data);
            }
        }
    }
}
