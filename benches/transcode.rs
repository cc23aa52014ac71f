//! Triton → OpenAI SSE transcoding of a 1 MiB streamed response, fed whole (the baseline in
//! the same run) and in 16 KiB, 1 KiB and 64-byte pieces; also one 1 MiB event (no boundary
//! until the end) in 1 KiB pieces. A linear transcoder costs about the same per byte however
//! the response is chunked. The same for the answer reader (`llmproxy::response`: text and
//! usage of every answer the hosts observe): a 1 MiB OpenAI SSE stream whole and in pieces, and
//! one 1 MiB JSON answer in 1 KiB pieces. `make bench`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use llmproxy::request::RequestKind;
use llmproxy::response::ResponseReader;
use llmproxy::transcode::usage_strip::{Strip, UsageStripper};
use llmproxy::transcode::{Output, Transcoder};

/// Triton generate_stream events of ~80 bytes each, about `size` bytes in all.
fn token_stream(size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size + 128);
    let mut i = 0;
    while out.len() < size {
        out.extend_from_slice(
            format!("data: {{\"model_name\":\"ensemble\",\"text_output\":\"tok{i} \"}}\n\n")
                .as_bytes(),
        );
        i += 1;
    }
    out
}

/// One event whose text is about `size` bytes.
fn one_long_event(size: usize) -> Vec<u8> {
    format!(
        "data: {{\"model_name\":\"ensemble\",\"text_output\":\"{}\"}}\n\n",
        "x".repeat(size)
    )
    .into_bytes()
}

fn transcode(body: &[u8], piece: usize) -> usize {
    let mut t = Transcoder::triton(RequestKind::Chat, true, "m");
    t.response_status(200);
    let chunks: Vec<&[u8]> = body.chunks(piece).collect();
    let mut produced = 0;
    for (i, c) in chunks.iter().enumerate() {
        if let Output::Bytes(b) = t.feed(c, i + 1 == chunks.len()) {
            produced += b.len();
        }
    }
    produced
}

fn bench_transcode(c: &mut Criterion) {
    let mut group = c.benchmark_group("transcode_1MiB_stream");
    let stream = token_stream(1 << 20);
    group.throughput(Throughput::Bytes(stream.len() as u64));
    for piece in [stream.len(), 16 << 10, 1 << 10, 64] {
        let name = if piece == stream.len() {
            "whole".to_string()
        } else {
            format!("{piece}B")
        };
        group.bench_with_input(BenchmarkId::new("pieces", name), &piece, |b, &piece| {
            b.iter(|| assert!(transcode(&stream, piece) > 0))
        });
    }
    let long = one_long_event(1 << 20);
    group.bench_function("one_event_in_1KiB_pieces", |b| {
        b.iter(|| assert!(transcode(&long, 1 << 10) > 0))
    });
    group.finish();
}

/// OpenAI chat SSE chunks of ~100 bytes each, about `size` bytes in all, then the usage chunk.
fn openai_stream(size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size + 256);
    let mut i = 0;
    while out.len() < size {
        out.extend_from_slice(
            format!(
                "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{i} \"}}}}]}}\n\n"
            )
            .as_bytes(),
        );
        i += 1;
    }
    out.extend_from_slice(
        b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":99}}\n\ndata: [DONE]\n\n",
    );
    out
}

/// One non-streamed answer whose text is about `size` bytes.
fn openai_json(size: usize) -> Vec<u8> {
    format!(
        "{{\"choices\":[{{\"index\":0,\"message\":{{\"role\":\"assistant\",\"content\":\"{}\"}},\"finish_reason\":\"stop\"}}],\"usage\":{{\"prompt_tokens\":1,\"completion_tokens\":2}}}}",
        "x".repeat(size)
    )
    .into_bytes()
}

/// Reads an answer in `piece`-byte chunks with a text cap of `cap` bytes (0: the usage only,
/// as without learning); the completion tokens it saw.
fn read_capped(body: &[u8], piece: usize, cap: usize) -> u64 {
    let mut r = ResponseReader::new(RequestKind::Chat, cap);
    let chunks: Vec<&[u8]> = body.chunks(piece).collect();
    for (i, c) in chunks.iter().enumerate() {
        r.feed(c, i + 1 == chunks.len());
    }
    r.capture().usage.map_or(0, |u| u.completion_tokens)
}

/// Reads an answer in `piece`-byte chunks with a cap of 2 MiB; the completion tokens it saw.
fn read(body: &[u8], piece: usize) -> u64 {
    read_capped(body, piece, 2 << 20)
}

/// `force_stream_usage`'s stripper over `chunks` of an answer: the bytes the client gets.
fn strip(chunks: &[&[u8]]) -> usize {
    let mut s = UsageStripper::default();
    let mut out = Vec::new();
    let mut sent = 0;
    for (i, c) in chunks.iter().enumerate() {
        out.clear();
        sent += match s.feed(c, i + 1 == chunks.len(), &mut out) {
            Strip::Same => c.len(),
            Strip::Rewritten => out.len(),
        };
    }
    sent
}

fn bench_response_reader(c: &mut Criterion) {
    let mut group = c.benchmark_group("response_reader_1MiB");
    let stream = openai_stream(1 << 20);
    group.throughput(Throughput::Bytes(stream.len() as u64));
    for piece in [stream.len(), 16 << 10, 1 << 10, 64] {
        let name = if piece == stream.len() {
            "whole".to_string()
        } else {
            format!("{piece}B")
        };
        group.bench_with_input(BenchmarkId::new("sse_pieces", name), &piece, |b, &piece| {
            b.iter(|| assert_eq!(read(&stream, piece), 99))
        });
    }
    let json = openai_json(1 << 20);
    group.bench_function("json_answer_in_1KiB_pieces", |b| {
        b.iter(|| assert_eq!(read(&json, 1 << 10), 2))
    });
    // without learning: the usage only
    group.bench_function("usage_only/sse_1KiB_pieces", |b| {
        b.iter(|| assert_eq!(read_capped(&stream, 1 << 10, 0), 99))
    });
    group.bench_function("usage_only/json_answer_in_1KiB_pieces", |b| {
        b.iter(|| assert_eq!(read_capped(&json, 1 << 10, 0), 2))
    });
    // force_stream_usage: the usage chunk removed, from chunks of one event each (as vLLM
    // flushes them) and from 1 KiB pieces
    let usage_event = 74; // bytes of the usage event
    let mut per_event: Vec<&[u8]> = Vec::new();
    let mut start = 0;
    for i in 1..stream.len() {
        if &stream[i - 1..=i] == b"\n\n" {
            per_event.push(&stream[start..=i]);
            start = i + 1;
        }
    }
    group.bench_function("strip_usage/one_event_per_chunk", |b| {
        b.iter(|| assert_eq!(strip(&per_event), stream.len() - usage_event))
    });
    let pieces: Vec<&[u8]> = stream.chunks(1 << 10).collect();
    group.bench_function("strip_usage/1KiB_pieces", |b| {
        b.iter(|| assert_eq!(strip(&pieces), stream.len() - usage_event))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = bench_transcode, bench_response_reader
}
criterion_main!(benches);
