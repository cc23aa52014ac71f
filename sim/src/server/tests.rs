//! Tests of the simulated servers: speeds, the metrics page, usage in answers.

use super::*;

/// One server on an ephemeral 127.0.0.1 port, its engine and HTTP API running on the test's
/// runtime (they stop with it).
async fn start(cfg: EngineConfig) -> String {
    start_reporting(cfg, CacheReport::Measured).await
}

/// [`start`], telling `cached_tokens` in `usage` or not.
async fn start_reporting(cfg: EngineConfig, cache_report: CacheReport) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let s = Arc::new(
        Server::new(format!("127.0.0.1:{port}"), port, "m".into(), 16, cfg)
            .with_cache_report(cache_report),
    );
    tokio::spawn(s.clone().run_engine());
    let router = app(s.clone(), Arc::new(vec![s]));
    tokio::spawn(async move { axum::serve(l, router).await });
    format!("http://127.0.0.1:{port}")
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

#[test]
fn speed_divides_each_servers_step_times_repeating_over_the_fleet() {
    #[derive(clap::Parser)]
    struct P {
        #[command(flatten)]
        a: ServeArgs,
    }
    use clap::Parser as _;
    let a = P::parse_from(["x", "--speed", "1,0.5"]).a;
    let base = a.engine_config();
    let slow = a.engine_config_of(3); // the list repeats: server 3 has speed 0.5
    assert_eq!(a.engine_config_of(2).prefill_token_s, base.prefill_token_s);
    assert!((slow.step_base_s - 2.0 * base.step_base_s).abs() < 1e-12);
    assert!((slow.prefill_token_s - 2.0 * base.prefill_token_s).abs() < 1e-12);
    assert!((slow.decode_seq_s - 2.0 * base.decode_seq_s).abs() < 1e-12);
    assert_eq!(slow.num_gpu_blocks, base.num_gpu_blocks);
    let default = P::parse_from(["x"]).a;
    assert_eq!(default.engine_config_of(7).step_base_s, base.step_base_s);
}

/// The value of the sample `name{...}` on a Prometheus text page.
fn sample(page: &str, name: &str) -> f64 {
    let line = page
        .lines()
        .find(|l| l.starts_with(&format!("{name}{{")))
        .unwrap_or_else(|| panic!("no {name} in\n{page}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

async fn metrics_page(c: &reqwest::Client, u: &str) -> String {
    c.get(format!("{u}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn prompt(tokens: usize) -> String {
    "abcd".repeat(tokens)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_page_has_the_vllm_names_and_follows_the_load() {
    // Slow steps and one running request at a time, so that the queue is observable.
    let cfg = EngineConfig {
        step_base_s: 0.02,
        max_num_seqs: 1,
        num_gpu_blocks: 512,
        ..EngineConfig::default()
    };
    let u = start(cfg).await;
    let c = client();
    let page = metrics_page(&c, &u).await;
    for name in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:request_success_total",
        "vllm:cache_config_info",
    ] {
        assert!(page.contains(&format!("# TYPE {name} ")), "{name}");
        assert!(page.contains(&format!("# HELP {name} ")), "{name}");
    }
    assert_eq!(sample(&page, "vllm:num_requests_running"), 0.0);
    assert_eq!(sample(&page, "vllm:kv_cache_usage_perc"), 0.0);
    // vLLM's config info: a gauge of value 1, the configuration in its labels.
    let info = page
        .lines()
        .find(|l| l.starts_with("vllm:cache_config_info{"))
        .unwrap();
    assert!(info.contains("num_gpu_blocks=\"512\""), "{info}");
    assert!(info.contains("block_size=\"16\""), "{info}");
    assert_eq!(sample(&page, "vllm:cache_config_info"), 1.0);

    // Two requests of the same 800-token prompt, 20 output tokens each.
    let body = json!({"messages": [{"role": "user", "content": prompt(800)}], "max_tokens": 20});
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let (c, u, body) = (c.clone(), u.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            post_json(&c, &format!("{u}/v1/chat/completions"), &body).await
        }));
    }
    let mut seen = false;
    for _ in 0..100 {
        let p = metrics_page(&c, &u).await;
        if sample(&p, "vllm:num_requests_running") == 1.0
            && sample(&p, "vllm:num_requests_waiting") == 1.0
        {
            let kv = sample(&p, "vllm:kv_cache_usage_perc");
            assert!(kv > 0.0 && kv < 1.0, "{kv}");
            assert_eq!(kv, sample(&p, "vllm:gpu_cache_usage_perc"));
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(seen, "never saw one running and one waiting request");
    for t in tasks {
        t.await.unwrap();
    }
    let p = metrics_page(&c, &u).await;
    assert_eq!(sample(&p, "vllm:num_requests_running"), 0.0);
    assert_eq!(sample(&p, "vllm:num_requests_waiting"), 0.0);
    assert_eq!(sample(&p, "vllm:kv_cache_usage_perc"), 0.0);
    assert_eq!(sample(&p, "vllm:request_success_total"), 2.0);
    assert_eq!(sample(&p, "vllm:generation_tokens_total"), 40.0);
    let prompt_tokens = sample(&p, "vllm:prompt_tokens_total");
    assert!(prompt_tokens > 1600.0, "{prompt_tokens}");
    // The second request found the first one's blocks.
    assert!(sample(&p, "vllm:prefix_cache_queries_total") >= prompt_tokens);
    let hits = sample(&p, "vllm:prefix_cache_hits_total");
    assert!(hits >= 784.0, "{hits}");
}

/// POSTs `body` as JSON to `url` and reads the JSON answer.
async fn post_json(c: &reqwest::Client, url: &str, body: &Value) -> Value {
    c.post(url)
        .json(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn sse(c: &reqwest::Client, url: &str, body: &Value) -> Vec<String> {
    let r = c.post(url).json(body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_in_json_responses_and_only_in_the_last_sse_chunk_when_asked() {
    let u = start(EngineConfig {
        step_base_s: 0.001,
        ..EngineConfig::default()
    })
    .await;
    let c = client();
    let chat = format!("{u}/v1/chat/completions");
    let msgs =
        json!([{"role": "system", "content": prompt(300)}, {"role": "user", "content": "hi"}]);
    let r = post_json(&c, &chat, &json!({"messages": msgs, "max_tokens": 7})).await;
    let usage = &r["usage"];
    let prompt_tokens = usage["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 300);
    assert_eq!(usage["completion_tokens"], 7);
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), prompt_tokens + 7);
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 0);
    let reply = r["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();

    // Streamed without stream_options (or include_usage false): no usage anywhere.
    for opts in [json!(null), json!({"include_usage": false})] {
        let mut body = json!({"messages": msgs, "max_tokens": 7, "stream": true});
        if !opts.is_null() {
            body["stream_options"] = opts;
        }
        let datas = sse(&c, &chat, &body).await;
        assert_eq!(datas.last().unwrap(), "[DONE]");
        assert_eq!(datas.len(), 7 + 1);
        for d in &datas[..datas.len() - 1] {
            let v: Value = serde_json::from_str(d).unwrap();
            assert!(v.get("usage").is_none(), "{d}");
            assert_eq!(v["choices"].as_array().unwrap().len(), 1);
        }
    }
    // With include_usage: one extra chunk before [DONE], `choices: []` and the usage; the
    // content chunks carry none. The prompt is cached now, and the reply is the same text.
    let body = json!({"messages": msgs, "max_tokens": 7, "stream": true, "stream_options": {"include_usage": true}});
    let datas = sse(&c, &chat, &body).await;
    assert_eq!(datas.len(), 7 + 2);
    assert_eq!(datas.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = datas[..datas.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["object"], "chat.completion.chunk");
    assert_eq!(last["usage"]["prompt_tokens"].as_u64(), Some(prompt_tokens));
    assert_eq!(last["usage"]["completion_tokens"], 7);
    let cached = last["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached >= 288 && cached < prompt_tokens, "{cached}");
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|v| v.get("usage").is_none()));
    let streamed: String = chunks[..chunks.len() - 1]
        .iter()
        .map(|v| v["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, reply, "generation is a function of the prompt");
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "length"
    );

    // The completions API too.
    let body = json!({"prompt": prompt(40), "max_tokens": 3, "stream": true, "stream_options": {"include_usage": true}});
    let datas = sse(&c, &format!("{u}/v1/completions"), &body).await;
    let v: Value = serde_json::from_str(&datas[datas.len() - 2]).unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"], json!([]));
    assert_eq!(v["usage"]["prompt_tokens"], 40);
    assert_eq!(v["usage"]["completion_tokens"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cache_report_usage_has_no_cached_tokens_or_zeros() {
    // `--no-cache-report`: no prompt_tokens_details; `--cache-report-zeros`: always 0
    for (report, expected) in [(CacheReport::Absent, None), (CacheReport::Zeros, Some(0))] {
        let u = start_reporting(
            EngineConfig {
                step_base_s: 0.001,
                ..EngineConfig::default()
            },
            report,
        )
        .await;
        let c = client();
        let chat = format!("{u}/v1/chat/completions");
        let msgs =
            json!([{"role": "system", "content": prompt(300)}, {"role": "user", "content": "hi"}]);
        let cached = |usage: &Value| {
            usage
                .pointer("/prompt_tokens_details/cached_tokens")
                .map(|v| v.as_u64().unwrap())
        };
        // twice: the second time the prompt is cached, and still nothing says so
        for _ in 0..2 {
            let r = post_json(&c, &chat, &json!({"messages": msgs, "max_tokens": 3})).await;
            assert_eq!(r["usage"]["completion_tokens"], 3);
            assert_eq!(cached(&r["usage"]), expected, "{r}");
            if expected.is_none() {
                assert!(r["usage"].get("prompt_tokens_details").is_none(), "{r}");
            }
        }
        let body = json!({"messages": msgs, "max_tokens": 3, "stream": true, "stream_options": {"include_usage": true}});
        let datas = sse(&c, &chat, &body).await;
        let last: Value = serde_json::from_str(&datas[datas.len() - 2]).unwrap();
        assert_eq!(last["usage"]["completion_tokens"], 3);
        assert_eq!(cached(&last["usage"]), expected, "{last}");
        // the engine did find the prompt cached: the fleet's counters say so
        let stats: Value = c
            .get(format!("{u}/sim/stats"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(
            stats["totals"]["cached_tokens"].as_f64().unwrap() > 500.0,
            "{stats}"
        );
    }
}
