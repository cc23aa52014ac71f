//! End-to-end: real `llmproxy-sim serve` and `proxy` processes on 127.0.0.1 (ephemeral ports),
//! real HTTP, a seconds-long `compare` run. Every child is killed when the test ends, also on
//! failure.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_llmproxy-sim");

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start the binary and wait (bounded) for a stdout line starting with `prefix`.
fn start(args: &[&str], prefix: &str) -> (Proc, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn llmproxy-sim");
    let out = child.stdout.take().unwrap();
    let proc = Proc(child);
    let (tx, rx) = mpsc::channel();
    let wanted = prefix.to_string();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix(&wanted) {
                let _ = tx.send(rest.trim().to_string());
            }
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("no {prefix:?} line from llmproxy-sim {args:?}"));
    (proc, line)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn fleet_speaks_the_worker_contract() {
    let (_fleet, line) = start(
        &[
            "serve",
            "--servers",
            "2",
            "--base-port",
            "0",
            "--model",
            "m1",
        ],
        "servers:",
    );
    let urls: Vec<String> = line.split_whitespace().map(str::to_string).collect();
    assert_eq!(urls.len(), 2);
    let name0 = urls[0].trim_start_matches("http://").to_string();
    rt().block_on(async {
        let c = reqwest::Client::new();
        let u = &urls[0];
        // Health, models, served-by on every response, fast 404 for the optional endpoints.
        let r = c.get(format!("{u}/health")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-served-by"], name0.as_str());
        let m: Value = c.get(format!("{u}/v1/models")).send().await.unwrap().json().await.unwrap();
        assert_eq!(m["data"][0]["id"], "m1");
        for (method, path) in [("GET", "/get_model_info"), ("GET", "/get_server_info"), ("POST", "/v1/chat/completions/render"), ("POST", "/tokenize")] {
            let r = c.request(method.parse().unwrap(), format!("{u}{path}")).send().await.unwrap();
            assert_eq!(r.status(), 404, "{path}");
            assert!(r.headers().contains_key("x-served-by"));
        }
        // Unknown fields (as the peer routers add them) are ignored; JSON response with usage.
        let body = serde_json::json!({"model": "m1", "messages": [{"role": "system", "content": "s ".repeat(200)}, {"role": "user", "content": "hi"}],
            "max_tokens": 5, "logprobs": false, "no_stop_trim": false, "separate_reasoning": true});
        let r: Value = c.post(format!("{u}/v1/chat/completions")).json(&body).send().await.unwrap().json().await.unwrap();
        assert_eq!(r["object"], "chat.completion");
        assert_eq!(r["usage"]["completion_tokens"], 5);
        assert_eq!(r["choices"][0]["message"]["content"].as_str().unwrap().len(), 20);
        // The same prompt again, streamed: its prefix is cached now.
        let mut body = body.clone();
        body["stream"] = true.into();
        body["stream_options"] = serde_json::json!({"include_usage": true});
        let r = c.post(format!("{u}/v1/chat/completions")).json(&body).send().await.unwrap();
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
        let text = r.text().await.unwrap();
        let datas: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
        assert_eq!(*datas.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = datas[..datas.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
        assert_eq!(chunks[0]["object"], "chat.completion.chunk");
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let usage = &chunks.last().unwrap()["usage"];
        assert!(usage["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() >= 96, "{usage}");
        // Completions API.
        let r: Value = c.post(format!("{}/v1/completions", urls[1])).json(&serde_json::json!({"prompt": "abc", "max_tokens": 2})).send().await.unwrap().json().await.unwrap();
        assert_eq!(r["object"], "text_completion");
        // Bad input is a clear 400.
        let r = c.post(format!("{u}/v1/chat/completions")).body("{not json").send().await.unwrap();
        assert_eq!(r.status(), 400);
        // Metrics with the vLLM names, SGLang-shaped load.
        let metrics = c.get(format!("{u}/metrics")).send().await.unwrap().text().await.unwrap();
        for name in ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:cache_config_info{"] {
            assert!(metrics.contains(name), "missing {name}");
        }
        let hits = metrics.lines().find(|l| l.starts_with("vllm:prefix_cache_hits_total")).unwrap();
        assert!(!hits.ends_with(" 0"), "{hits}");
        let load: Value = c.get(format!("{u}/get_load")).send().await.unwrap().json().await.unwrap();
        assert!(load[0]["num_tokens"].is_u64() && load[0]["num_waiting_reqs"].is_u64());
        // Fleet stats and reset.
        let s: Value = c.get(format!("{}/sim/stats", urls[1])).send().await.unwrap().json().await.unwrap();
        assert_eq!(s["servers"].as_array().unwrap().len(), 2);
        assert_eq!(s["servers"][0]["requests"], 2);
        assert!(s["servers"][0]["cached_tokens"].as_u64().unwrap() > 0);
        assert_eq!(s["servers"][1]["requests"], 1);
        c.post(format!("{u}/sim/reset")).send().await.unwrap();
        let s: Value = c.get(format!("{u}/sim/stats")).send().await.unwrap().json().await.unwrap();
        assert_eq!(s["totals"]["requests"], 0.0);
        // After a reset the cache is cold again.
        let r: Value = c.post(format!("{u}/v1/chat/completions")).json(&serde_json::json!({"messages": [{"role": "user", "content": "s ".repeat(200)}], "max_tokens": 1})).send().await.unwrap().json().await.unwrap();
        assert_eq!(r["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    });
}

#[test]
fn compare_runs_a_trace_through_a_proxy_and_directly() {
    let (_fleet, line) = start(
        &[
            "serve",
            "--servers",
            "2",
            "--base-port",
            "0",
            "--num-gpu-blocks",
            "1024",
        ],
        "servers:",
    );
    let urls: Vec<String> = line.split_whitespace().map(str::to_string).collect();
    let backends = urls.join(",");
    let (_rr, rr_url) = start(
        &["proxy", "--listen", "127.0.0.1:0", "--backend", &backends],
        "listening:",
    );
    let dir = std::env::temp_dir().join(format!("llmproxy-sim-e2e-{}", std::process::id()));
    let dir_s = dir.to_string_lossy().to_string();
    let rr_t = format!("rr={rr_url}");
    let direct_t = format!("direct={}", urls[0]);
    let mut args = vec![
        "compare",
        "--target",
        &rr_t,
        "--target",
        &direct_t,
        "--stats-url",
        &urls[1],
        "--out-dir",
        &dir_s,
        "--duration",
        "4",
        "--rate",
        "6",
        "--think-s",
        "0.3",
        "--tenants",
        "2",
        "--docs",
        "3",
        "--system-tokens",
        "300:600",
        "--doc-tokens",
        "300:600",
        "--unique-tokens",
        "50:200",
        "--output-tokens",
        "8:24",
        "--drain-timeout",
        "20",
        "--pause",
        "0",
        "--quiet",
    ];
    let plot_py = std::env::var("LLMPROXY_SIM_PLOT_PYTHON").ok();
    match &plot_py {
        Some(py) => args.extend(["--plot-python", py.as_str()]),
        None => args.push("--no-plot"),
    }
    let out = Command::new(BIN).args(&args).output().expect("run compare");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "compare failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("| rr ") && stdout.contains("| direct "),
        "{stdout}"
    );
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).unwrap()).unwrap();
    let runs = doc["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for run in runs {
        let s = &run["summary"];
        assert!(s["ok"].as_u64().unwrap() >= 10, "{s}");
        assert_eq!(s["errors"], 0, "{s}");
        assert!(s["ttft_s"]["p50"].as_f64().unwrap() > 0.0);
        assert!(s["e2e_s"]["p50"].as_f64().unwrap() >= s["ttft_s"]["p50"].as_f64().unwrap());
        assert!(
            s["fleet_hit_rate"].as_f64().unwrap() > 0.1,
            "shared prompts must hit: {s}"
        );
        assert!(s["output_tok_per_s"].as_f64().unwrap() > 0.0);
        assert_eq!(
            run["ttft_s"].as_array().unwrap().len() as u64,
            s["ok"].as_u64().unwrap()
        );
    }
    // Round robin spreads over both servers; the direct run hits only the first.
    let share = |i: usize| -> Vec<f64> {
        runs[i]["summary"]["per_server"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["share"].as_f64().unwrap())
            .collect()
    };
    assert!(share(0).iter().all(|&x| x > 0.3), "{:?}", share(0));
    let d = share(1);
    assert!(d.contains(&1.0) && d.contains(&0.0), "{d:?}");
    // The fleet was reset between runs: the direct run's stats show only its own requests.
    let served: f64 = runs[1]["summary"]["per_server"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["prompt_tokens"].as_f64().unwrap_or(0.0))
        .filter(|&x| x > 0.0)
        .count() as f64;
    assert_eq!(served, 1.0);
    if plot_py.is_some() {
        assert!(std::fs::metadata(dir.join("ttft_cdf.png")).unwrap().len() > 10_000);
    }
    // Every request's record, per target.
    for (i, name) in ["rr", "direct"].iter().enumerate() {
        let text = std::fs::read_to_string(dir.join(format!("records/{name}.jsonl"))).unwrap();
        let records: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let s = &runs[i]["summary"];
        assert_eq!(records.len() as u64, s["ok"].as_u64().unwrap(), "{name}");
        assert!(records.iter().all(|r| r["served_by"].is_string()
            && r["session"].is_u64()
            && r["prompt_tokens"].as_u64().unwrap() >= r["cached_tokens"].as_u64().unwrap()));
    }
    if let Some(py) = &plot_py {
        // The compute floor of each policy is below what it measured.
        let records = ["rr", "direct"].map(|n| dir.join(format!("records/{n}.jsonl")));
        let out = Command::new(py)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../scripts/ttft_floor.py"
            ))
            .args(&records)
            .output()
            .expect("run ttft_floor.py");
        let table = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for name in ["rr", "direct"] {
            let row = table
                .lines()
                .find(|l| l.starts_with(&format!("| {name} | all |")))
                .unwrap_or_else(|| panic!("no row of {name}: {table}"));
            let cols: Vec<f64> = row
                .split('|')
                .filter_map(|c| c.trim().parse().ok())
                .collect();
            // n, TTFT mean, compute floor, the rest, best-of-all floor, prompt tokens
            let (mean, floor, rest, best) = (cols[1], cols[2], cols[3], cols[4]);
            assert!(floor > 5.0 && floor <= mean + 1.0, "{row}");
            assert!((mean - floor - rest).abs() <= 1.0 && best <= floor, "{row}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn load_writes_json_and_leaves_the_warmup_out() {
    let (_fleet, line) = start(&["serve", "--servers", "1", "--base-port", "0"], "servers:");
    let url = line.trim().to_string();
    let file = std::env::temp_dir().join(format!("llmproxy-sim-load-{}.json", std::process::id()));
    let file_s = file.to_string_lossy().to_string();
    let out = Command::new(BIN)
        .args([
            "load",
            "--target",
            &url,
            "--stats-url",
            &url,
            "--reset",
            "--label",
            "direct",
            "--json-out",
            &file_s,
            "--duration",
            "3",
            "--rate",
            "6",
            "--warmup",
            "1",
            "--mix",
            "rag=1",
            "--docs",
            "2",
            "--doc-tokens",
            "200:300",
            "--output-tokens",
            "4:8",
            "--quiet",
        ])
        .output()
        .expect("run load");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "load failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("| direct "), "{stdout}");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let _ = std::fs::remove_file(&file);
    let records = doc["records"].as_array().unwrap();
    let after_warmup = records
        .iter()
        .filter(|r| r["sent_s"].as_f64().unwrap() >= 1.0)
        .count();
    let s = &doc["summary"];
    assert!(
        after_warmup >= 5 && after_warmup < records.len(),
        "{after_warmup} of {}",
        records.len()
    );
    assert_eq!(s["requests"].as_u64().unwrap() as usize, after_warmup);
    assert_eq!(s["errors"], 0);
    // Two shared documents: after the warm-up nearly every prompt hits the cache.
    assert!(s["fleet_hit_rate"].as_f64().unwrap() > 0.5, "{s}");
    assert!(records
        .iter()
        .all(|r| r["served_by"].as_str() == Some(url.trim_start_matches("http://"))));
}

#[test]
fn a_client_that_does_not_ask_for_usage_gets_none() {
    let (_fleet, line) = start(&["serve", "--servers", "1", "--base-port", "0"], "servers:");
    let url = line.trim().to_string();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "--target",
            &url,
            "--stats-url",
            &url,
            "--reset",
            "--duration",
            "2",
            "--rate",
            "5",
            "--mix",
            "rag=1",
            "--docs",
            "2",
            "--doc-tokens",
            "200:300",
            "--output-tokens",
            "4:8",
        ];
        args.extend_from_slice(extra);
        load_json(&args).1
    };
    let records = |doc: &Value| doc["records"].as_array().unwrap().clone();
    let asked = run(&[]);
    assert!(
        records(&asked).iter().all(|r| r["prompt_tokens"].is_u64()),
        "{asked}"
    );
    let quiet = run(&["--no-stream-usage"]);
    let quiet_records = records(&quiet);
    assert!(
        !quiet_records.is_empty() && quiet["summary"]["errors"] == 0,
        "{quiet}"
    );
    assert!(
        quiet_records
            .iter()
            .all(|r| r["prompt_tokens"].is_null() && r["ok"] == true),
        "usage came without being asked: {quiet}"
    );
    // the fleet's hit rate still comes from its stats
    assert!(
        quiet["summary"]["fleet_hit_rate"].as_f64().is_some(),
        "{quiet}"
    );
}

/// Runs `llmproxy-sim load` with `args` plus a JSON output file; returns (stdout, the JSON).
fn load_json(args: &[&str]) -> (String, Value) {
    let file = std::env::temp_dir().join(format!(
        "llmproxy-sim-load-{}-{}.json",
        std::process::id(),
        args.iter().map(|a| a.len()).sum::<usize>()
    ));
    let file_s = file.to_string_lossy().to_string();
    let mut all = vec!["load", "--json-out", &file_s, "--quiet"];
    all.extend_from_slice(args);
    let out = Command::new(BIN).args(&all).output().expect("run load");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "load failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let _ = std::fs::remove_file(&file);
    (stdout, doc)
}

/// An agent trace of a few short sessions against one server at `url`, plus `extra` arguments.
fn short_agent_run(url: &str, extra: &[&str]) -> (String, Value) {
    let mut args = vec![
        "--target",
        url,
        "--stats-url",
        url,
        "--reset",
        "--mix",
        "agent=1",
        "--duration",
        "3",
        "--rate",
        "3",
        "--agent-system-tokens",
        "100:200",
        "--agent-context-tokens",
        "200:400",
        "--agent-tool-tokens",
        "20:50",
        "--agent-output-tokens",
        "30:60",
        "--agent-turns",
        "3",
        "--agent-think-s",
        "0.1",
        "--drain-timeout",
        "20",
    ];
    args.extend_from_slice(extra);
    load_json(&args)
}

/// Every later turn of `records` found the previous turn's prompt and reply cached; returns
/// how many later turns there were.
fn later_turns_hit_the_previous_reply(records: &[Value]) -> usize {
    let get = |r: &Value, k: &str| r[k].as_u64().unwrap();
    let mut later_turns = 0;
    for r in records.iter().filter(|r| get(r, "turn") > 0) {
        let prev = records
            .iter()
            .find(|p| p["session"] == r["session"] && get(p, "turn") == get(r, "turn") - 1)
            .unwrap();
        // The previous prompt and the reply the server generated are both in the cache: the
        // load generator resent the reply exactly as received (the last token's KV is never
        // computed, and the last partial block does not count).
        let covered = get(prev, "prompt_tokens") + get(prev, "output_tokens");
        assert!(
            get(r, "cached_tokens") + 16 >= covered,
            "turn {r} after {prev}"
        );
        later_turns += 1;
    }
    later_turns
}

#[test]
fn agent_turns_resend_the_generated_replies() {
    let (_fleet, line) = start(&["serve", "--servers", "1", "--base-port", "0"], "servers:");
    let url = line.trim().to_string();
    let (stdout, doc) = short_agent_run(&url, &[]);
    assert!(stdout.contains("agent "), "{stdout}");
    let records = doc["records"].as_array().unwrap();
    let later_turns = later_turns_hit_the_previous_reply(records);
    assert!(later_turns >= 4, "{later_turns} later turns");
    let s = &doc["summary"];
    assert_eq!(s["errors"], 0);
    assert!(
        s["per_kind_hit_rate"]["agent"].as_f64().unwrap() > 0.3,
        "{s}"
    );
    assert!(s["e2e_s"]["mean"].as_f64().unwrap() > 0.0);
}

#[test]
fn sessions_that_do_not_stream_resend_the_whole_answer_and_have_no_ttft() {
    let (_fleet, line) = start(&["serve", "--servers", "1", "--base-port", "0"], "servers:");
    let url = line.trim().to_string();
    let (_, doc) = short_agent_run(&url, &["--non-stream-share", "1"]);
    let records = doc["records"].as_array().unwrap();
    assert!(
        records
            .iter()
            .all(|r| r["ok"] == true && r["ttft_s"].is_null()),
        "{doc}"
    );
    assert!(records
        .iter()
        .all(|r| r["output_tokens"].as_u64() >= Some(30)));
    let later_turns = later_turns_hit_the_previous_reply(records);
    assert!(later_turns >= 4, "{later_turns} later turns");
    assert!(doc["summary"]["e2e_s"]["mean"].as_f64().unwrap() > 0.0);
}

#[test]
fn generate_sessions_resend_the_generated_replies_as_text_or_ids() {
    // `--api generate`: SGLang's /generate, the conversation as one text; `--api generate-ids`:
    // as input_ids, the previous answer's output_ids resent; streamed (cumulative events) and
    // not.
    let (_fleet, line) = start(&["serve", "--servers", "1", "--base-port", "0"], "servers:");
    let url = line.trim().to_string();
    for (extra, streamed) in [
        (&["--api", "generate"][..], true),
        (&["--api", "generate", "--non-stream-share", "1"][..], false),
        (&["--api", "generate-ids"][..], true),
        (
            &["--api", "generate-ids", "--non-stream-share", "1"][..],
            false,
        ),
    ] {
        let (_, doc) = short_agent_run(&url, extra);
        let records = doc["records"].as_array().unwrap();
        assert!(
            records.iter().all(|r| r["ok"] == true
                && r["ttft_s"].is_null() != streamed
                && r["output_tokens"].as_u64() >= Some(30)),
            "{doc}"
        );
        let later_turns = later_turns_hit_the_previous_reply(records);
        assert!(later_turns >= 4, "{later_turns} later turns");
        let s = &doc["summary"];
        assert_eq!(s["errors"], 0, "{s}");
        assert!(
            s["per_kind_hit_rate"]["agent"].as_f64().unwrap() > 0.3,
            "{s}"
        );
    }
}

#[test]
fn agent_sessions_sending_their_prompt_as_tools_hit_the_cache_on_every_api() {
    // `--tools-field`: the agent prompt travels in `tools` (chat and Responses shapes), or
    // rendered into the text as the server's template does (/generate): every later turn still
    // finds the previous prompt, tools included, and the reply cached.
    let (_fleet, line) = start(&["serve", "--servers", "1", "--base-port", "0"], "servers:");
    let url = line.trim().to_string();
    let first_prompts = |doc: &Value| -> Vec<(u64, u64)> {
        let records = doc["records"].as_array().unwrap();
        let first = records.iter().filter(|r| r["turn"] == 0);
        let mut v: Vec<(u64, u64)> = first
            .map(|r| {
                (
                    r["session"].as_u64().unwrap(),
                    r["prompt_tokens"].as_u64().unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let (_, plain) = short_agent_run(&url, &[]);
    for api in ["chat", "responses", "responses-chained", "generate-ids"] {
        let (_, doc) = short_agent_run(&url, &["--tools-field", "--api", api]);
        assert_eq!(doc["workload"]["tools_field"], true);
        let records = doc["records"].as_array().unwrap();
        assert!(records.iter().all(|r| r["ok"] == true), "{api}: {doc}");
        let later_turns = later_turns_hit_the_previous_reply(records);
        assert!(later_turns >= 4, "{api}: {later_turns} later turns");
        let s = &doc["summary"];
        assert!(
            s["per_kind_hit_rate"]["agent"].as_f64().unwrap() > 0.3,
            "{api}: {s}"
        );
        if api == "chat" {
            // The same sessions' first prompts: the agent prompt's words plus the tools' JSON
            // and the common system line (about 150 tokens).
            let (p, w) = (first_prompts(&plain), first_prompts(&doc));
            assert_eq!(p.len(), w.len());
            for ((sp, tp), (sw, tw)) in p.iter().zip(&w) {
                assert_eq!(sp, sw);
                assert!((tp + 100..tp + 250).contains(tw), "{tp} vs {tw}");
            }
        }
    }
    assert!(plain["workload"].get("tools_field").is_none());
}

#[test]
fn one_trace_split_over_two_urls() {
    let (_fleet, line) = start(&["serve", "--servers", "2", "--base-port", "0"], "servers:");
    let urls: Vec<String> = line.split_whitespace().map(str::to_string).collect();
    let both = urls.join(",");
    let names: Vec<String> = urls
        .iter()
        .map(|u| u.trim_start_matches("http://").to_string())
        .collect();
    // By session: every turn of a session goes to the same URL, and both URLs are used.
    let (stdout, doc) = load_json(&[
        "--target",
        &both,
        "--stats-url",
        &urls[0],
        "--mix",
        "chat=1",
        "--turns",
        "2:3",
        "--think-s",
        "0.2",
        "--system-tokens",
        "100:200",
        "--user-tokens",
        "10:20",
        "--output-tokens",
        "4:8",
        "--duration",
        "3",
        "--rate",
        "8",
        "--split",
        "session",
    ]);
    assert!(stdout.contains("requests per target URL"), "{stdout}");
    let records = doc["records"].as_array().unwrap();
    let mut per_url = [0, 0];
    for r in records {
        let g = r["gateway"].as_u64().unwrap() as usize;
        per_url[g] += 1;
        assert_eq!(r["served_by"].as_str().unwrap(), names[g], "{r}");
        let same_session = records.iter().filter(|p| p["session"] == r["session"]);
        assert!(same_session.clone().all(|p| p["gateway"] == r["gateway"]));
    }
    assert!(per_url[0] > 2 && per_url[1] > 2, "{per_url:?}");
    assert_eq!(doc["summary"]["per_gateway"], serde_json::json!(per_url));
    // Alternating: consecutive requests go to the two URLs in turn (burst workload).
    let (_, doc) = load_json(&[
        "--target",
        &both,
        "--mix",
        "burst=1",
        "--burst-tenants",
        "4",
        "--burst-system-tokens",
        "100:200",
        "--burst-user-tokens",
        "20:40",
        "--burst-requests",
        "10",
        "--burst-len-s",
        "0.5",
        "--output-tokens",
        "2:4",
        "--duration",
        "3",
        "--rate",
        "10",
        "--split",
        "alternate",
    ]);
    let g = doc["summary"]["per_gateway"].as_array().unwrap();
    let (a, b) = (g[0].as_i64().unwrap(), g[1].as_i64().unwrap());
    assert!((a - b).abs() <= 1 && a > 5, "{g:?}");
    assert!(
        doc["summary"]["per_kind_hit_rate"]["burst"]
            .as_f64()
            .unwrap()
            > 0.2
    );
}

#[test]
fn saturation_finds_where_a_slow_server_stops_keeping_up() {
    // One server that prefills 500 tokens/s: prompts of 100-200 tokens, about 3 req/s.
    let (_fleet, line) = start(
        &[
            "serve",
            "--servers",
            "1",
            "--base-port",
            "0",
            "--prefill-us-per-token",
            "2000",
        ],
        "servers:",
    );
    let url = line.trim().to_string();
    let file = std::env::temp_dir().join(format!("llmproxy-sim-sat-{}.json", std::process::id()));
    let file_s = file.to_string_lossy().to_string();
    let out = Command::new(BIN)
        .args([
            "saturation",
            "--target",
            &url,
            "--stats-url",
            &url,
            "--from",
            "1.5",
            "--factor",
            "8",
            "--max-rate",
            "12",
            "--bisect",
            "0",
            "--mix",
            "unique=1",
            "--unique-tokens",
            "100:200",
            "--output-tokens",
            "2:4",
            "--duration",
            "3",
            "--drain-timeout",
            "30",
            "--quiet",
            "--json-out",
            &file_s,
        ])
        .output()
        .expect("run saturation");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "saturation failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("saturation ≈ 6.75 req/s"), "{stdout}");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let _ = std::fs::remove_file(&file);
    let probes = doc["probes"].as_array().unwrap();
    assert_eq!(probes.len(), 2);
    assert_eq!(probes[0]["saturated"], false, "{}", probes[0]);
    assert_eq!(probes[1]["saturated"], true, "{}", probes[1]);
    assert!((doc["rate_75"].as_f64().unwrap() - 0.75 * 6.75).abs() < 1e-9);
}

#[test]
fn a_recorded_trace_is_replayed_with_its_shared_prefixes() {
    let (_fleet, line) = start(&["serve", "--servers", "1", "--base-port", "0"], "servers:");
    let url = line.trim().to_string();
    // Twelve requests 0.5 s apart in the trace's clock (Mooncake format): all share blocks 0 and
    // 1 (two thirds of every prompt), the third block is each one's own.
    let trace =
        std::env::temp_dir().join(format!("llmproxy-sim-replay-{}.jsonl", std::process::id()));
    let lines: Vec<String> = (0..12)
        .map(|i| {
            format!(
                "{{\"timestamp\": {}, \"input_length\": 192, \"output_length\": 4, \"hash_ids\": [0, 1, {}]}}",
                i * 500,
                100 + i
            )
        })
        .collect();
    std::fs::write(&trace, lines.join("\n")).unwrap();
    let trace_s = trace.to_string_lossy().to_string();
    // At 6 req/s over 2 s: the trace's first 12 requests, its clock 3× faster.
    let (_, doc) = load_json(&[
        "--target",
        &url,
        "--stats-url",
        &url,
        "--reset",
        "--replay",
        &trace_s,
        "--replay-block-tokens",
        "64",
        "--rate",
        "6",
        "--duration",
        "2",
    ]);
    let _ = std::fs::remove_file(&trace);
    let records = doc["records"].as_array().unwrap();
    assert_eq!(records.len(), 12, "{doc}");
    assert!(records.iter().all(|r| r["kind"] == "replay"), "{doc}");
    let last_sent = records
        .iter()
        .map(|r| r["sent_s"].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert!(
        (1.7..2.2).contains(&last_sent),
        "last request sent at {last_sent} s"
    );
    let s = &doc["summary"];
    assert_eq!(s["errors"], 0);
    // Every request after the first finds the two shared blocks in the server's cache.
    let hit = s["per_kind_hit_rate"]["replay"].as_f64().unwrap();
    assert!(hit > 0.55 && hit < 0.8, "replay hit rate {hit}: {s}");
}
