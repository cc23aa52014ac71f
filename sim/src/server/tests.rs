//! Tests of the simulated servers: speeds, the metrics page, usage in answers, SGLang's
//! `/generate`.

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
        // /generate's meta_info says the same
        let text = render_chat(msgs.as_array().unwrap(), None);
        let body = json!({"text": text, "sampling_params": {"max_new_tokens": 3}});
        let r = post_json(&c, &format!("{u}/generate"), &body).await;
        assert_eq!(r["meta_info"]["completion_tokens"], 3);
        let meta_cached = r["meta_info"]
            .get("cached_tokens")
            .map(|v| v.as_u64().unwrap());
        assert_eq!(meta_cached, expected, "{r}");
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

/// POSTs `body` to `{u}/generate`: the status and the JSON answer.
async fn generate(c: &reqwest::Client, u: &str, body: &Value) -> (u16, Value) {
    let r = c
        .post(format!("{u}/generate"))
        .json(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

fn fast() -> EngineConfig {
    EngineConfig {
        step_base_s: 0.001,
        ..EngineConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_answers_text_ids_and_meta_info_and_caches_like_completions() {
    let u = start(fast()).await;
    let c = client();
    let p1 = prompt(300);
    let body = json!({"text": p1, "sampling_params": {"max_new_tokens": 5}, "model": "any"});
    let (status, r) = generate(&c, &u, &body).await;
    assert_eq!(status, 200, "{r}");
    let text = r["text"].as_str().unwrap().to_string();
    assert_eq!(text.len(), 5 * crate::engine::CHARS_PER_TOKEN, "{r}");
    assert_eq!(r["output_ids"].as_array().unwrap().len(), 5, "{r}");
    let meta = &r["meta_info"];
    assert_eq!(
        (&meta["prompt_tokens"], &meta["completion_tokens"]),
        (&json!(300), &json!(5))
    );
    assert_eq!(meta["cached_tokens"], 0, "{r}");
    assert_eq!(
        meta["finish_reason"],
        json!({"type": "length", "length": 5})
    );
    assert!(meta["e2e_latency"].as_f64().unwrap() > 0.0, "{r}");
    assert!(meta["id"].as_str().is_some_and(|id| !id.is_empty()), "{r}");
    // The same engine path as a completion of the same prompt: the same reply.
    let compl = json!({"prompt": p1, "max_tokens": 5});
    let r = post_json(&c, &format!("{u}/v1/completions"), &compl).await;
    assert_eq!(r["choices"][0]["text"], text.as_str());
    // A text extending the first prompt and its reply finds them cached; no sampling_params:
    // the server's default length.
    let p2 = format!("{p1}{text}{}", prompt(40));
    let (_, r) = generate(&c, &u, &json!({"text": p2})).await;
    let meta = &r["meta_info"];
    assert_eq!(meta["prompt_tokens"], 345);
    assert_eq!(meta["completion_tokens"], 16);
    let cached = meta["cached_tokens"].as_u64().unwrap();
    assert!((300..345).contains(&cached), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_streams_the_whole_text_so_far_then_done() {
    let u = start(fast()).await;
    let c = client();
    let body =
        json!({"text": prompt(50), "sampling_params": {"max_new_tokens": 6}, "stream": true});
    let r = c
        .post(format!("{u}/generate"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    let datas = sse(&c, &format!("{u}/generate"), &body).await;
    assert_eq!(datas.len(), 6 + 1, "{datas:?}");
    assert_eq!(datas.last().unwrap(), "[DONE]");
    let events: Vec<Value> = datas[..6]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let mut previous = String::new();
    for (i, e) in events.iter().enumerate() {
        let text = e["text"].as_str().unwrap();
        assert!(
            text.starts_with(&previous) && text.len() > previous.len(),
            "event {i}: {text:?} after {previous:?}"
        );
        previous = text.to_string();
        assert_eq!(e["output_ids"].as_array().unwrap().len(), i + 1, "{e}");
        let meta = &e["meta_info"];
        assert_eq!(meta["completion_tokens"], i + 1, "{e}");
        assert_eq!(meta["prompt_tokens"], 50, "{e}");
        let finish = &meta["finish_reason"];
        if i < 5 {
            assert!(finish.is_null(), "{e}");
        } else {
            assert_eq!(finish, &json!({"type": "length", "length": 6}), "{e}");
        }
    }
    // The whole streamed answer is the non-streamed one, token ids included.
    let mut unstreamed = body.clone();
    unstreamed["stream"] = false.into();
    let (_, r) = generate(&c, &u, &unstreamed).await;
    assert_eq!(r["text"], events[5]["text"]);
    assert_eq!(r["output_ids"], events[5]["output_ids"]);
    assert!(
        r["meta_info"]["cached_tokens"].as_u64().unwrap() >= 48,
        "{r}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_takes_input_ids_and_rejects_requests_without_one_prompt() {
    let u = start(fast()).await;
    let c = client();
    let ids: Vec<u64> = (0..40).map(|i| i * 37).collect();
    let body = json!({"input_ids": ids, "sampling_params": {"max_new_tokens": 3}});
    let (status, r) = generate(&c, &u, &body).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["meta_info"]["prompt_tokens"], 40, "{r}");
    // Rendered as a completion's token-id prompt is: the same reply.
    let compl = json!({"prompt": ids, "max_tokens": 3});
    let r2 = post_json(&c, &format!("{u}/v1/completions"), &compl).await;
    assert_eq!(r2["choices"][0]["text"], r["text"]);
    for (body, msg) in [
        (
            json!({"sampling_params": {"max_new_tokens": 3}}),
            "required",
        ),
        (json!({"text": null, "input_ids": []}), "input_ids"),
        (json!({"text": ["a", "b"]}), "batch"),
        (json!({"input_ids": [[1, 2], [3]]}), "batch"),
        (json!({"text": 5}), "text"),
        (json!([1, 2]), "JSON object"),
    ] {
        let (status, r) = generate(&c, &u, &body).await;
        assert_eq!(status, 400, "{body}: {r}");
        let m = r["error"]["message"].as_str().unwrap();
        assert!(m.contains(msg), "{body}: {m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_resending_input_ids_and_output_ids_hits_the_cache_on_the_generated_part() {
    let u = start(fast()).await;
    let c = client();
    let ids_of = |v: &Value| -> Vec<u64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|id| id.as_u64().unwrap())
            .collect()
    };
    // A tokenizing client's first turn: 300 ids of a text.
    let text: String = (0..300).map(|i| format!("w{i:03}")).collect();
    let ids1 = encode_ids(&text);
    assert_eq!(ids1.len(), 300);
    let body = json!({"input_ids": ids1, "sampling_params": {"max_new_tokens": 64}});
    let (status, r) = generate(&c, &u, &body).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["meta_info"]["prompt_tokens"], 300, "{r}");
    let out = ids_of(&r["output_ids"]);
    assert_eq!(out.len(), 64, "{r}");
    // Every output id packs its token's 4 characters.
    assert_eq!(out, encode_ids(r["text"].as_str().unwrap()));
    let more = encode_ids(&"next turn ".repeat(16)); // 40 ids
    let turn2 = |middle: &[u64]| {
        let ids = [&ids1[..], middle, &more[..]].concat();
        json!({"input_ids": ids, "sampling_params": {"max_new_tokens": 1}})
    };
    // Resending the prompt with other ids in place of the answer: only the prompt is cached.
    let other: Vec<u64> = (0..64).map(|i| 1_000 + i).collect();
    let (_, r) = generate(&c, &u, &turn2(&other)).await;
    assert_eq!(r["meta_info"]["prompt_tokens"], 404, "{r}");
    let unrelated = r["meta_info"]["cached_tokens"].as_u64().unwrap();
    assert!((288..=300).contains(&unrelated), "{r}");
    // Resending input_ids + output_ids: the generated part is cached too (all but the last
    // token's KV, never computed, and the last partial block).
    let (_, r) = generate(&c, &u, &turn2(&out)).await;
    assert_eq!(r["meta_info"]["prompt_tokens"], 404, "{r}");
    let resent = r["meta_info"]["cached_tokens"].as_u64().unwrap();
    assert!(resent >= 300 + 64 - 16, "{resent} cached: {r}");
    assert!(resent >= unrelated + 48, "{resent} vs {unrelated}");
}

/// Chat-completions function tools whose descriptions are `tokens` tokens each.
fn chat_tools(names: &[&str], tokens: usize) -> Vec<Value> {
    names
        .iter()
        .map(|n| json!({"type": "function", "function": {"name": n, "description": prompt(tokens), "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_of_a_chat_request_are_part_of_its_prompt_and_of_the_cache() {
    let u = start(fast()).await;
    let c = client();
    let chat = format!("{u}/v1/chat/completions");
    let msgs =
        json!([{"role": "system", "content": prompt(100)}, {"role": "user", "content": "hi"}]);
    let msgs_slice = msgs.as_array().unwrap();
    let tokens_of = |text: &str| text.len().div_ceil(crate::engine::CHARS_PER_TOKEN) as u64;
    let prompt_tokens = |r: &Value| r["usage"]["prompt_tokens"].as_u64().unwrap();
    let cached = |r: &Value| {
        r["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
    };
    let plain = post_json(&c, &chat, &json!({"messages": msgs, "max_tokens": 2})).await;
    assert_eq!(
        prompt_tokens(&plain),
        tokens_of(&render_chat(msgs_slice, None))
    );
    // The same messages with 2 tools of 300 tokens of description: the prompt grows by them
    // (and their JSON), exactly as the template renders them.
    let tools = chat_tools(&["read_file", "search"], 300);
    let body = json!({"messages": msgs, "tools": tools, "max_tokens": 2});
    let with = post_json(&c, &chat, &body).await;
    let rendered = render_chat(msgs_slice, Some(&tools));
    assert_eq!(prompt_tokens(&with), tokens_of(&rendered));
    let grown = prompt_tokens(&with) - prompt_tokens(&plain);
    assert!((600..700).contains(&grown), "{grown} tokens more");
    // The system text is a cached prefix (the tools come after it); then the whole prompt is.
    assert!((96..=104).contains(&cached(&with)), "{with}");
    let again = post_json(&c, &chat, &body).await;
    assert!(cached(&again) + 16 >= prompt_tokens(&with), "{again}");
    // The legacy `functions` array renders the same way.
    let functions: Vec<Value> = tools.iter().map(|t| t["function"].clone()).collect();
    let body = json!({"messages": msgs, "functions": functions, "max_tokens": 2});
    let r = post_json(&c, &chat, &body).await;
    assert_eq!(
        prompt_tokens(&r),
        tokens_of(&render_chat(msgs_slice, Some(&functions)))
    );
    // A client rendering the same template for /generate sends the same prompt: all cached.
    let (_, r) = generate(
        &c,
        &u,
        &json!({"text": rendered, "sampling_params": {"max_new_tokens": 2}}),
    )
    .await;
    assert_eq!(r["meta_info"]["prompt_tokens"], prompt_tokens(&with));
    let hit = r["meta_info"]["cached_tokens"].as_u64().unwrap();
    assert!(hit + 16 >= prompt_tokens(&with), "{r}");
}
