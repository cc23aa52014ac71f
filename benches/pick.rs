//! Hot-path benchmark: pick (parse + hash + score + account) then finish, on realistic chat
//! bodies from 1 KiB to 1 MiB, with 8, 64 and 1000 endpoints. `make bench`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use llmproxy::Router;

fn router(endpoints: usize) -> Router {
    let eps: Vec<String> = (0..endpoints)
        .map(|i| format!("\"10.{}.{}.{}:8000\"", i / 65536, (i / 256) % 256, i % 256))
        .collect();
    let config = format!(
        r#"{{"model_mapping_rule": {{"m": {{"rules": [{{"cluster": "c", "backend": "vllm"}}]}}}},
            "clusters": {{"c": {{"endpoints": [{}]}}}}, "max_body_bytes": 4194304}}"#,
        eps.join(",")
    );
    Router::from_json(config.as_bytes()).unwrap()
}

/// A chat body of about `size` bytes: a long system prompt with escapes, a short question.
fn body(size: usize, variant: usize) -> Vec<u8> {
    let sentence = "The quick brown fox jumps over the lazy dog; \\\"quoted\\\" text.\\n";
    let system = sentence.repeat(size / sentence.len());
    format!(
        r#"{{"model":"m","stream":true,"temperature":0.7,"messages":[{{"role":"system","content":"{system}"}},{{"role":"user","content":"question number {variant}"}}]}}"#
    )
    .into_bytes()
}

fn bench_pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    for &size in &[1usize << 10, 16 << 10, 256 << 10, 1 << 20] {
        for &endpoints in &[8usize, 64, 1000] {
            let r = router(endpoints);
            let bodies: Vec<Vec<u8>> = (0..16).map(|v| body(size, v)).collect();
            group.throughput(Throughput::Bytes(bodies[0].len() as u64));
            let mut i = 0;
            group.bench_with_input(
                BenchmarkId::new(format!("{}KiB", size >> 10), endpoints),
                &endpoints,
                |b, _| {
                    b.iter(|| {
                        i = (i + 1) % bodies.len();
                        let p = r.pick(&[], &bodies[i]);
                        assert_eq!(p.http_status(), 200);
                        p.finish(200);
                    })
                },
            );
        }
    }
    group.finish();

    // Baseline in the same run: what merely parsing the same body into a generic JSON tree
    // costs (no hashing, no scoring), to read the pick numbers against.
    let mut baseline = c.benchmark_group("baseline_serde_json_value");
    for &size in &[1usize << 10, 16 << 10, 256 << 10, 1 << 20] {
        let b0 = body(size, 0);
        baseline.throughput(Throughput::Bytes(b0.len() as u64));
        baseline.bench_function(format!("{}KiB", size >> 10), |b| {
            b.iter(|| serde_json::from_slice::<serde_json::Value>(&b0).unwrap())
        });
    }
    baseline.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = bench_pick
}
criterion_main!(benches);
