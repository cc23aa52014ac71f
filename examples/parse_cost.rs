//! Repeats one step of the request path N times, for counting its instructions with callgrind
//! (`make bench-parse-instructions` runs it for two N and prints the cost of one repetition).
//!
//!     cargo run --release --example parse_cost -- STEP N
//!
//! Steps: `request` (a 1 KiB chat body: parse, prefix hashes, the tail kept for learning;
//! `request-64k` the same with a 64 KiB body),
//! `answer` (a 150-byte JSON chat answer read for its text and usage), `stream` (a streamed
//! answer of 100 vLLM-style chunks, per answer), and the floors that no parse with serde_json
//! goes under: `request-floor` and `answer-floor` (the same documents only checked and skipped,
//! `serde::de::IgnoredAny`).

use std::hint::black_box;

use llmproxy::request::{parse_with_tail, Extract, RequestKind};
use llmproxy::response::ResponseReader;

/// A chat body of about `size` bytes (one user message of plain words).
fn chat_body(size: usize) -> Vec<u8> {
    let mut text = String::from("request 3:");
    let words = [
        "alpha", "beta", "gamma", "delta", "kappa", "lambda", "sigma", "omega",
    ];
    let mut i = 0usize;
    while text.len() + 70 < size {
        text.push_str(&format!(
            " {}{}",
            words[i % words.len()],
            (i * 7919) % 10_000
        ));
        i += 1;
    }
    serde_json::to_vec(&serde_json::json!({
        "model": "qwen3-8b",
        "messages": [{"role": "user", "content": text}],
    }))
    .expect("a JSON value serialises")
}

const ANSWER: &[u8] = br#"{"id":"cmpl-bench","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok from f1"},"finish_reason":"stop"}]}"#;

fn stream_events(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            format!(
                "data: {{\"id\":\"chatcmpl-8f2c\",\"object\":\"chat.completion.chunk\",\"created\":1733300000,\"model\":\"qwen3-8b\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" word{i}\"}},\"logprobs\":null,\"finish_reason\":null}}]}}\n\n"
            )
            .into_bytes()
        })
        .collect()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let step = args.next().unwrap_or_default();
    let n: usize = match args.next().map(|s| s.parse()) {
        Some(Ok(n)) => n,
        _ => {
            eprintln!(
                "usage: parse_cost request|request-64k|answer|stream|request-floor|answer-floor N"
            );
            std::process::exit(2);
        }
    };
    let body = chat_body(1024);
    let big_body = chat_body(64 * 1024);
    let events = stream_events(100);
    let extract = Extract {
        tail: true,
        ..Extract::default()
    };
    for _ in 0..n {
        match step.as_str() {
            "request" => {
                let parsed =
                    parse_with_tail(black_box(&body), Some(RequestKind::Chat), 512, extract);
                black_box(parsed.expect("the body parses"));
            }
            "request-64k" => {
                let parsed =
                    parse_with_tail(black_box(&big_body), Some(RequestKind::Chat), 512, extract);
                black_box(parsed.expect("the body parses"));
            }
            "answer" => {
                let mut reader = ResponseReader::new(RequestKind::Chat, 64 * 1024);
                reader.feed(black_box(ANSWER), false);
                reader.end();
                assert!(reader.capture().complete);
            }
            "stream" => {
                let mut reader = ResponseReader::new(RequestKind::Chat, 64 * 1024);
                for e in &events {
                    reader.feed(black_box(e), false);
                }
                reader.feed(b"data: [DONE]\n\n", true);
                assert!(reader.capture().complete);
            }
            "request-floor" => {
                let v: serde::de::IgnoredAny = serde_json::from_slice(black_box(&body)).unwrap();
                black_box(v);
            }
            "answer-floor" => {
                let v: serde::de::IgnoredAny = serde_json::from_slice(black_box(ANSWER)).unwrap();
                black_box(v);
            }
            other => {
                eprintln!("unknown step {other:?}");
                std::process::exit(2);
            }
        }
    }
}
