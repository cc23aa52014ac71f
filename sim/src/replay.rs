//! Replay of recorded request traces in the Mooncake format (the FAST'25 traces of
//! `kvcache-ai/Mooncake`, also read by NVIDIA Dynamo's and llm-d's benchmark tools): one JSON
//! object per line with `timestamp` (arrival, milliseconds), `input_length` and `output_length`
//! (tokens) and `hash_ids`, one id per block of `--replay-block-tokens` prompt tokens, where equal
//! ids mean equal content (a prefix two requests share). The text is not in the trace: every id
//! becomes a block of seeded filler text (the same id, the same text, in every request that
//! names it), so the replayed prompts share exactly the prefixes the recorded ones shared and a
//! router sees the production trace's reuse structure and arrival pattern.
//!
//! Each request becomes a one-turn session of kind `replay` whose single user message is the
//! concatenation of its blocks (the last block cut to the request's length). The clock is scaled
//! so that the replayed window's mean rate is `--rate` (bursts and gaps keep their shape), and
//! `--replay-token-scale` shrinks every length (blocks and outputs) to fit the simulated
//! servers' KV cache and context window, keeping the shared fraction of every prompt.

use crate::engine::CHARS_PER_TOKEN;
use crate::workload::{words, Kind, Session, Trace, Turn, WorkloadArgs};
use std::collections::HashMap;
use std::io::BufRead;
use std::path::Path;

/// One line of a Mooncake-format trace.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Record {
    /// Arrival time, milliseconds from the trace's start.
    pub timestamp: f64,
    /// Prompt tokens.
    pub input_length: u64,
    /// Generated tokens.
    pub output_length: u64,
    /// One id per block of the prompt, in order; equal ids are equal content.
    pub hash_ids: Vec<u64>,
}

/// Reads a Mooncake-format trace; errors name the line and what is wrong with it.
pub fn read_records(path: &Path) -> Result<Vec<Record>, String> {
    let file = std::fs::File::open(path)
        .map_err(|e| format!("--replay {}: cannot open: {e}", path.display()))?;
    let mut records = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| format!("--replay {}: cannot read: {e}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let r: Record = serde_json::from_str(&line).map_err(|e| {
            format!(
                "--replay {} line {}: not a trace record ({{\"timestamp\", \"input_length\", \"output_length\", \"hash_ids\"}}): {e}",
                path.display(),
                i + 1
            )
        })?;
        if !r.timestamp.is_finite() || r.timestamp < 0.0 {
            return Err(format!(
                "--replay {} line {}: timestamp must be a finite number >= 0",
                path.display(),
                i + 1
            ));
        }
        if r.hash_ids.is_empty() || r.input_length == 0 {
            return Err(format!(
                "--replay {} line {}: a request needs input_length > 0 and at least one hash id",
                path.display(),
                i + 1
            ));
        }
        records.push(r);
    }
    if records.is_empty() {
        return Err(format!("--replay {}: no records", path.display()));
    }
    Ok(records)
}

/// The replayed trace of `a.replay` (see the module docs).
pub fn trace(a: &WorkloadArgs) -> Result<Trace, String> {
    let path = a.replay.as_deref().ok_or("no --replay file")?;
    build(&read_records(path)?, a)
}

/// Builds the trace from parsed records (the records need not be sorted by time); `--rate`
/// and `--duration` are checked by [`crate::workload::generate`].
pub fn build(records: &[Record], a: &WorkloadArgs) -> Result<Trace, String> {
    if !(a.replay_token_scale > 0.0 && a.replay_token_scale <= 1.0) {
        return Err("--replay-token-scale must be within (0, 1]".into());
    }
    if a.replay_block_tokens == 0 {
        return Err("--replay-block-tokens must be >= 1".into());
    }
    let scale = |tokens: u64| ((tokens as f64 * a.replay_token_scale).round() as u64).max(1);
    let block = scale(a.replay_block_tokens);

    let mut order: Vec<&Record> = records
        .iter()
        .filter(|r| r.timestamp >= a.replay_start_s * 1e3)
        .collect();
    order.sort_by(|x, y| x.timestamp.total_cmp(&y.timestamp));
    let Some(first) = order.first() else {
        return Err(format!(
            "--replay: no record at or after --replay-start-s {}",
            a.replay_start_s
        ));
    };
    let t0 = first.timestamp;
    // The window is the first `rate × duration` records; the clock maps their span onto the
    // duration so that their mean gap is 1 / rate.
    let want = ((a.rate * a.duration).round() as usize).clamp(1, order.len());
    let span_s = (order[want - 1].timestamp - t0) / 1e3;
    let clock = if span_s > 0.0 {
        a.duration * (want as f64 - 1.0).max(1.0) / want as f64 / span_s
    } else {
        1.0
    };

    let mut texts: HashMap<u64, String> = HashMap::new();
    let mut sessions = Vec::with_capacity(want);
    for r in order.iter() {
        let start_s = (r.timestamp - t0) / 1e3 * clock;
        if start_s >= a.duration {
            break;
        }
        let prompt_tokens = scale(r.input_length).min(a.replay_max_prompt_tokens.max(1));
        let mut user = String::with_capacity(prompt_tokens as usize * CHARS_PER_TOKEN);
        let mut left = prompt_tokens;
        for &id in &r.hash_ids {
            if left == 0 {
                break;
            }
            let text = texts.entry(id).or_insert_with(|| {
                let mut rng =
                    fastrand::Rng::with_seed(a.seed ^ id.wrapping_mul(0x9e37_79b9_7f4a_7c15));
                words(&mut rng, block)
            });
            let take = left.min(block);
            user.push_str(&text[..take as usize * CHARS_PER_TOKEN]);
            left -= take;
        }
        let id = sessions.len();
        sessions.push(Session {
            id,
            kind: Kind::Replay,
            start_s,
            system: None,
            tools: None,
            turns: vec![Turn {
                user,
                max_tokens: scale(r.output_length),
                think_s: 0.0,
            }],
            tenant: None,
            episode: None,
        });
    }
    Ok(Trace {
        sessions,
        duration_s: a.duration,
        model: a.model.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> WorkloadArgs {
        let mut v = vec!["--replay", "unused.jsonl"];
        v.extend_from_slice(extra);
        crate::workload::args_from(&v)
    }

    fn rec(ms: f64, input: u64, output: u64, ids: &[u64]) -> Record {
        Record {
            timestamp: ms,
            input_length: input,
            output_length: output,
            hash_ids: ids.to_vec(),
        }
    }

    #[test]
    fn equal_ids_give_equal_text_and_the_last_block_is_cut_to_the_length() {
        let records = [
            rec(0.0, 1000, 100, &[7, 8]),
            rec(1000.0, 1200, 50, &[7, 8, 9]),
            rec(2000.0, 300, 10, &[7]),
            rec(3000.0, 700, 10, &[10, 8]),
        ];
        let a = args(&[
            "--replay-block-tokens",
            "512",
            "--rate",
            "1",
            "--duration",
            "100",
        ]);
        let t = build(&records, &a).unwrap();
        assert_eq!(t.sessions.len(), 4);
        let user = |i: usize| t.sessions[i].turns[0].user.clone();
        let chars = CHARS_PER_TOKEN;
        assert_eq!(user(0).len(), 1000 * chars);
        assert_eq!(user(1).len(), 1200 * chars);
        // Request 1 extends request 0: same first 1000 tokens (block 8 cut at 488 in request 0).
        assert!(user(1).starts_with(&user(0)));
        // A request that names only block 7, cut at 300 tokens, is a prefix of both.
        assert!(user(0).starts_with(&user(2)));
        // Block 8 after another first block: the same text, not a shared prefix.
        assert_ne!(user(3)[..512 * chars], user(0)[..512 * chars]);
        assert_eq!(user(3)[512 * chars..], user(0)[512 * chars..700 * chars]);
        assert_eq!(t.sessions[1].turns[0].max_tokens, 50);
        assert!(t
            .sessions
            .iter()
            .all(|s| s.kind == Kind::Replay && s.system.is_none()));
    }

    #[test]
    fn the_clock_is_scaled_to_the_rate_and_the_window_to_the_duration() {
        // 100 requests one trace-second apart: at 10 req/s over 5 s, 50 requests 0.1 s apart.
        let records: Vec<Record> = (0..100)
            .map(|i| rec(i as f64 * 1000.0, 64, 8, &[i]))
            .collect();
        let t = build(&records, &args(&["--rate", "10", "--duration", "5"])).unwrap();
        assert!(
            (49..=50).contains(&t.sessions.len()),
            "{}",
            t.sessions.len()
        );
        let gap = t.sessions[1].start_s - t.sessions[0].start_s;
        assert!((gap - 0.1).abs() < 0.005, "gap {gap}");
        // Bursts keep their shape: two requests at the same trace time stay together.
        let mut bursty = records.clone();
        bursty[1].timestamp = 0.0;
        let t = build(&bursty, &args(&["--rate", "10", "--duration", "5"])).unwrap();
        assert_eq!(t.sessions[0].start_s, t.sessions[1].start_s);
        // --replay-start-s skips the trace's first seconds.
        let t = build(
            &records,
            &args(&["--rate", "10", "--duration", "5", "--replay-start-s", "50"]),
        )
        .unwrap();
        assert_eq!(
            t.sessions[0].turns[0].user,
            build(&records[50..], &args(&["--rate", "10", "--duration", "5"]))
                .unwrap()
                .sessions[0]
                .turns[0]
                .user
        );
    }

    #[test]
    fn lengths_scale_and_are_capped() {
        let records = [rec(0.0, 1000, 400, &[1, 2])];
        let t = build(
            &records,
            &args(&[
                "--replay-token-scale",
                "0.25",
                "--replay-max-prompt-tokens",
                "200",
            ]),
        )
        .unwrap();
        let s = &t.sessions[0];
        assert_eq!(s.turns[0].user.len(), 200 * CHARS_PER_TOKEN);
        assert_eq!(s.turns[0].max_tokens, 100);
        let t = build(&records, &args(&["--replay-token-scale", "0.25"])).unwrap();
        assert_eq!(t.sessions[0].turns[0].user.len(), 250 * CHARS_PER_TOKEN);
        assert!(build(&records, &args(&["--replay-token-scale", "0"])).is_err());
        assert!(build(&records, &args(&["--replay-token-scale", "2"])).is_err());
    }

    #[test]
    fn bad_files_are_refused_with_the_line() {
        let dir = std::env::temp_dir().join(format!("llmproxy-sim-replay-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("t.jsonl");
        std::fs::write(&p, "{\"timestamp\":0,\"input_length\":5,\"output_length\":1,\"hash_ids\":[1]}\n\n{\"timestamp\":1}\n").unwrap();
        let e = read_records(&p).unwrap_err();
        assert!(e.contains("line 3") && e.contains("hash_ids"), "{e}");
        std::fs::write(
            &p,
            "{\"timestamp\":0,\"input_length\":5,\"output_length\":1,\"hash_ids\":[]}\n",
        )
        .unwrap();
        assert!(read_records(&p).unwrap_err().contains("line 1"));
        std::fs::write(&p, "").unwrap();
        assert!(read_records(&p).unwrap_err().contains("no records"));
        std::fs::write(&p, "{\"timestamp\":0,\"input_length\":5,\"output_length\":1,\"hash_ids\":[1],\"extra\":true}\n").unwrap();
        assert_eq!(read_records(&p).unwrap().len(), 1);
        assert!(read_records(&dir.join("missing.jsonl"))
            .unwrap_err()
            .contains("cannot open"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
