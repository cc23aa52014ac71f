//! Load loop against a running metadata-center on this machine:
//!   cargo run --release -p llmproxy-metadata-center --example mc_bench -- http://127.0.0.1:PORT[,http://…] [seconds] [concurrency]
//!   cargo run --release -p llmproxy-metadata-center --example mc_bench -- --in-process
//!   cargo run --release -p llmproxy-metadata-center --example mc_bench -- --redis redis://127.0.0.1:PORT [seconds] [concurrency]
//! (`--redis`: the Redis store called directly, without HTTP: what the store itself costs)
//! Scenarios (each bounded by `seconds`): the request lifecycle (add, prompt delete, delete),
//! load polling, cache save and cache query on a tree of realistic prompts. With several base
//! URLs (replicas over one shared store), connection `w` talks to replica `w % n`.
//! `MC_BENCH_CPU=server:PID[+PID…][,redis:PID…]` adds, per named group of processes on this
//! machine, the CPU time they spent per API call during each scenario (from
//! `/proc/PID/task/*/schedstat`): steadier than calls/s when the machine is shared.
//! `MC_BENCH_MAX_AGES=1` makes the cache queries carry `max_age_ms` for the 16 engines, as
//! llmproxy's gateways send it. `MC_BENCH_SHARED_CHUNKS=N` (default 8) sets how many of each
//! prompt's 64 chunks are a system prompt every conversation shares.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::json;

struct Stats {
    ops: u64,
    lat_us: Vec<u32>,
    errors: u64,
}

fn rnd(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// Chunks of system prompt every conversation shares at the start of its prompt: 8, or
/// `MC_BENCH_SHARED_CHUNKS` (at most 64).
fn shared_chunks() -> usize {
    static SHARED: OnceLock<usize> = OnceLock::new();
    *SHARED.get_or_init(|| {
        std::env::var("MC_BENCH_SHARED_CHUNKS")
            .ok()
            .map(|v| {
                v.parse()
                    .expect("MC_BENCH_SHARED_CHUNKS: a number of chunks")
            })
            .unwrap_or(8)
            .min(64)
    })
}

/// Prompt `conv` of a workload: the shared system prompt (8 chunks unless
/// `MC_BENCH_SHARED_CHUNKS` says otherwise), then the conversation's own chunks; hashes are
/// cumulative like the client's (each depends on all before it).
fn prompt(conv: u64, len: usize) -> Vec<u64> {
    let mut h = 0xcbf29ce484222325u64;
    let shared = shared_chunks();
    (0..len)
        .map(|i| {
            let chunk = if i < shared {
                i as u64
            } else {
                (conv << 16) | i as u64
            };
            h = (h ^ chunk).wrapping_mul(0x100000001b3).rotate_left(17);
            h
        })
        .collect()
}

/// Named groups of processes whose CPU time is reported per API call (`MC_BENCH_CPU`).
struct CpuMeter {
    groups: Vec<(String, Vec<u32>)>,
}

static CPU_METER: OnceLock<CpuMeter> = OnceLock::new();

impl CpuMeter {
    /// `server:123+456,redis:789`; empty when the variable is unset. A malformed entry stops
    /// the benchmark (a typo would otherwise silently drop a column).
    fn from_env() -> CpuMeter {
        let spec = std::env::var("MC_BENCH_CPU").unwrap_or_default();
        let groups = spec
            .split(',')
            .filter(|g| !g.is_empty())
            .map(|g| {
                let (name, pids) = g
                    .split_once(':')
                    .unwrap_or_else(|| panic!("MC_BENCH_CPU: {g:?} is not NAME:PID[+PID…]"));
                let pids = pids
                    .split('+')
                    .map(|p| {
                        p.parse()
                            .unwrap_or_else(|_| panic!("MC_BENCH_CPU: {p:?} is not a PID"))
                    })
                    .collect();
                (name.to_string(), pids)
            })
            .collect();
        CpuMeter { groups }
    }

    fn get() -> &'static CpuMeter {
        CPU_METER.get_or_init(CpuMeter::from_env)
    }

    /// CPU nanoseconds each group has run so far (every thread's `schedstat`).
    fn sample(&self) -> Vec<u64> {
        self.groups
            .iter()
            .map(|(_, pids)| pids.iter().map(|&p| process_cpu_ns(p)).sum())
            .collect()
    }

    /// The table's header, with one column per group.
    fn header(&self, first: &str) {
        let (mut names, mut rules) = (String::new(), String::new());
        for (name, _) in &self.groups {
            let col = format!(" {name} µs CPU/call");
            rules.push_str(&format!("|{}", "-".repeat(col.chars().count() + 1)));
            names.push_str(&format!("|{col} "));
        }
        println!("| scenario                           | {first} | iter/s    | p50 µs  | p99 µs  | errors {names}|");
        println!("|------------------------------------|-----------|-----------|---------|---------|--------{rules}|");
    }
}

/// CPU time of every thread of `pid` in ns (0 when the process is gone).
fn process_cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Runs `f` on `conc` connections for `secs`, each calling again as soon as its call returns;
/// prints the scenario's row and returns the API calls per second.
async fn run<F, Fut>(name: &str, secs: u64, conc: usize, f: F) -> f64
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static + Clone,
    Fut: std::future::Future<Output = (u64, bool)> + Send,
{
    run_paced(name, secs, conc, None, f).await
}

/// `run`, or with `pace` = calls per second, calls started on a fixed schedule (call `i` at
/// `i / pace` s, shared out over the connections): the latency a gateway sees below saturation.
async fn run_paced<F, Fut>(name: &str, secs: u64, conc: usize, pace: Option<f64>, f: F) -> f64
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static + Clone,
    Fut: std::future::Future<Output = (u64, bool)> + Send,
{
    let meter = CpuMeter::get();
    let cpu_before = meter.sample();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let counter = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let start = Instant::now();
    for w in 0..conc {
        let f = f.clone();
        let counter = counter.clone();
        tasks.push(tokio::spawn(async move {
            let mut st = Stats {
                ops: 0,
                lat_us: Vec::new(),
                errors: 0,
            };
            while Instant::now() < deadline {
                let i = counter.fetch_add(1, Ordering::Relaxed);
                if let Some(rate) = pace {
                    let at = start + Duration::from_secs_f64(i as f64 / rate);
                    if at >= deadline {
                        break;
                    }
                    tokio::time::sleep_until(at.into()).await;
                }
                let t = Instant::now();
                let (n, ok) = f(w, i).await;
                st.lat_us
                    .push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                st.ops += n;
                st.errors += u64::from(!ok);
            }
            st
        }));
    }
    let mut all = Stats {
        ops: 0,
        lat_us: Vec::new(),
        errors: 0,
    };
    for t in tasks {
        let s = t.await.expect("task");
        all.ops += s.ops;
        all.errors += s.errors;
        all.lat_us.extend(s.lat_us);
    }
    let el = start.elapsed().as_secs_f64();
    let cpu: String = meter
        .sample()
        .iter()
        .zip(&cpu_before)
        .zip(&meter.groups)
        .map(|((after, before), (name, _))| {
            let per_call = (after - before) as f64 / 1000.0 / all.ops.max(1) as f64;
            let width = format!(" {name} µs CPU/call").chars().count();
            format!("{per_call:>width$.1} |")
        })
        .collect();
    all.lat_us.sort_unstable();
    let pct = |p: f64| {
        all.lat_us
            .get(((all.lat_us.len() as f64 * p) as usize).min(all.lat_us.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "| {name:<34} | {:>9.0} | {:>9.0} | {:>7} | {:>7} | {:>6} |{cpu}",
        all.ops as f64 / el,
        all.lat_us.len() as f64 / el,
        pct(0.5),
        pct(0.99),
        all.errors
    );
    all.ops as f64 / el
}

async fn send(c: &reqwest::Client, method: reqwest::Method, url: String, body: String) -> bool {
    match c.request(method, url).body(body).send().await {
        Ok(r) => r.status().is_success(),
        Err(_) => false,
    }
}

/// The same data structures without HTTP, on one thread: what the server's own work costs.
fn in_process() {
    use llmproxy_metadata_center::cache::{CacheConfig, CachePool};
    use llmproxy_metadata_center::load::{AddRequest, LoadConfig, LoadStore, Stamp};
    let eps: Vec<llmproxy_metadata_center::endpoint::Endpoint> = (0..16)
        .map(|i| format!("10.0.0.{}:8000", i + 1).parse().unwrap())
        .collect();
    let load = LoadStore::new(LoadConfig::default());
    let n = 300_000u64;
    let t = Instant::now();
    for i in 0..n {
        let id = format!("r{i}");
        let now = Stamp::now();
        let ep = eps[(i % 16) as usize];
        load.add(
            &AddRequest {
                cluster: "bench",
                request_id: &id,
                prompt_length: 4096,
                engine: ep,
            },
            now,
        );
        load.delete_prompt(&id, now);
        load.delete(&id, now);
    }
    let el = t.elapsed().as_secs_f64();
    println!(
        "| in-process lifecycle (3 ops)       | {:>9.0} | {:>9.0} |         |         |        |",
        3.0 * n as f64 / el,
        n as f64 / el
    );
    let pool = CachePool::new(CacheConfig::default());
    let t = Instant::now();
    let saves = 50_000u64;
    for i in 0..saves {
        let conv = i % 5000;
        pool.save(
            "bench",
            &prompt(conv, 64),
            eps[(conv % 16) as usize],
            Stamp::now().mono,
        );
    }
    let el = t.elapsed().as_secs_f64();
    println!(
        "| in-process cache save (64 hashes)  | {:>9.0} | {:>9.0} |         |         |        |",
        saves as f64 / el,
        saves as f64 / el
    );
    let t = Instant::now();
    let queries = 200_000u64;
    let mut hits = 0usize;
    let mut seed = 7u64;
    for _ in 0..queries {
        let conv = rnd(&mut seed) % 5000;
        let mut h = prompt(conv, 64);
        h.extend((0..8).map(|k| rnd(&mut seed) ^ k));
        hits += pool.query("bench", &h, 5, Stamp::now().mono).len();
    }
    let el = t.elapsed().as_secs_f64();
    assert!(hits > 0);
    println!(
        "| in-process cache query (72 hashes) | {:>9.0} | {:>9.0} |         |         |        |",
        queries as f64 / el,
        queries as f64 / el
    );
    let (nodes, entries) = pool.totals();
    println!("(tree after the saves: {nodes} nodes, {entries} entries)");
}

/// The Redis store called directly (no HTTP), `conc` tasks at a time: the store's own cost.
async fn redis_direct(url: &str, secs: u64, conc: usize) {
    use llmproxy_metadata_center::load::AddRequest;
    use llmproxy_metadata_center::retry::RetryKind;
    use llmproxy_metadata_center::store::{RedisConfig, RedisStore, StoreSpec};
    let store = Arc::new(
        RedisStore::open(RedisConfig {
            spec: StoreSpec::parse("--redis", url).expect("redis URL"),
            op_timeout: Duration::from_millis(50),
            connect_timeout: Duration::from_secs(1),
            key_prefix: "mc-bench".into(),
            load_ttl: Duration::from_secs(660),
            cache_ttl: Duration::from_secs(3600),
            max_prefixes_per_cluster: 4_000_000,
            max_locations_per_prefix: 256,
            top_k: 5,
        })
        .expect("store"),
    );
    let eps: Arc<Vec<llmproxy_metadata_center::endpoint::Endpoint>> = Arc::new(
        (0..16)
            .map(|i| format!("10.0.0.{}:8000", i + 1).parse().unwrap())
            .collect(),
    );
    println!("Redis store without HTTP: {url}, {secs} s per scenario, {conc} tasks");
    CpuMeter::get().header("ops/s    ");
    {
        let (s, eps) = (store.clone(), eps.clone());
        run(
            "store lifecycle add+prompt-del+del",
            secs,
            conc,
            move |w, i| {
                let (s, eps) = (s.clone(), eps.clone());
                async move {
                    let id = format!("direct-{w}-{i}");
                    s.add(&AddRequest {
                        cluster: "bench",
                        request_id: &id,
                        prompt_length: 4096,
                        engine: eps[(i % 16) as usize],
                    })
                    .await;
                    let p = s.delete(&id, RetryKind::DeletePrompt).await;
                    let d = s.delete(&id, RetryKind::Delete).await;
                    (3, p && d)
                }
            },
        )
        .await;
    }
    {
        let s = store.clone();
        run("store load query (16 engines)", secs, conc, move |_, _| {
            let s = s.clone();
            async move { (1, s.query_load("bench").await.is_some()) }
        })
        .await;
    }
    {
        let (s, eps) = (store.clone(), eps.clone());
        run("store cache save (64 hashes)", secs, conc, move |_, i| {
            let (s, eps) = (s.clone(), eps.clone());
            async move {
                let mut seed = i.wrapping_mul(0x9e3779b97f4a7c15) | 1;
                let conv = rnd(&mut seed) % 5000;
                s.cache_save("bench", &prompt(conv, 64), eps[(conv % 16) as usize])
                    .await;
                (1, true)
            }
        })
        .await;
    }
    {
        let s = store.clone();
        run("store cache query (72 hashes)", secs, conc, move |_, i| {
            let s = s.clone();
            async move {
                let mut seed = i.wrapping_mul(0x2545f4914f6cdd1d) | 1;
                let conv = rnd(&mut seed) % 5000;
                let mut h = prompt(conv, 64);
                h.extend((0..8).map(|k| rnd(&mut seed) ^ k));
                (1, !s.cache_query("bench", &h, 5).await.is_empty())
            }
        })
        .await;
    }
    let (mut ok, mut failed) = (0, 0);
    for op in llmproxy_metadata_center::store::redis::Op::ALL {
        let (o, e, t) = store.counters.get(op);
        ok += o;
        failed += e + t;
    }
    println!("(store operations: {ok} answered, {failed} errors or timeouts)");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("--redis") {
        let url = argv.get(2).expect("--redis URL");
        let secs = argv.get(3).and_then(|s| s.parse().ok()).unwrap_or(5);
        let conc = argv.get(4).and_then(|s| s.parse().ok()).unwrap_or(16);
        redis_direct(url, secs, conc).await;
        return;
    }
    if std::env::args().any(|a| a == "--in-process") {
        println!("| scenario                           | ops/s     | iter/s    |");
        in_process();
        return;
    }
    let args: Vec<String> = std::env::args().collect();
    let base = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let bases: Arc<Vec<String>> = Arc::new(base.split(',').map(str::to_string).collect());
    let pick = move |w: usize| bases[w % bases.len()].clone();
    let secs: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    let conc: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(16);
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(conc)
        .build()
        .expect("client");
    let eps: Arc<Vec<String>> =
        Arc::new((0..16).map(|i| format!("10.0.0.{}:8000", i + 1)).collect());
    println!(
        "metadata-center benchmark: {base}, {secs} s per scenario, {conc} concurrent connections"
    );
    CpuMeter::get().header("API ops/s");

    // 1. Request lifecycle: add, prompt delete, delete (3 API calls per iteration).
    {
        let (c, b, eps) = (client.clone(), pick.clone(), eps.clone());
        run("lifecycle add+prompt-del+del", secs, conc, move |w, i| {
            let (c, b, eps) = (c.clone(), b(w), eps.clone());
            async move {
                let id = format!("bench-{w}-{i}");
                let add = json!({"cluster":"bench","request_id":id,"prompt_length":4096,"ip":eps[(i % 16) as usize],"timestamp":1});
                let del = json!({"request_id": id, "cluster": "", "ip": ""}).to_string();
                let a = send(&c, reqwest::Method::POST, format!("{b}/v1/load/stats"), add.to_string()).await;
                let p = send(&c, reqwest::Method::DELETE, format!("{b}/v1/load/prompt"), del.clone()).await;
                let d = send(&c, reqwest::Method::DELETE, format!("{b}/v1/load/stats"), del).await;
                (3, a && p && d)
            }
        })
        .await;
    }
    // 2. Load polling with 16 engines holding in-flight requests.
    for i in 0..64 {
        let add = json!({"cluster":"bench","request_id":format!("held-{i}"),"prompt_length":100,"ip":eps[i % 16]});
        send(
            &client,
            reqwest::Method::POST,
            format!("{}/v1/load/stats", pick(0)),
            add.to_string(),
        )
        .await;
    }
    {
        let (c, b) = (client.clone(), pick.clone());
        run("load query (16 engines)", secs, conc, move |w, _| {
            let (c, b) = (c.clone(), b(w));
            async move {
                let ok = matches!(c.get(format!("{b}/v1/load/stats?cluster=bench")).send().await, Ok(r) if r.status().is_success());
                (1, ok)
            }
        })
        .await;
    }
    // 3. Cache save: 64-chunk prompts (32 KiB of prompt at 512 B/chunk), 5,000 conversations.
    {
        let (c, b, eps) = (client.clone(), pick.clone(), eps.clone());
        run("cache save (64 hashes)", secs, conc, move |w, i| {
            let (c, b, eps) = (c.clone(), b(w), eps.clone());
            async move {
                let mut seed = i.wrapping_mul(0x9e3779b97f4a7c15) | 1;
                let conv = rnd(&mut seed) % 5000;
                let body = json!({"cluster":"bench","prompt_hash":prompt(conv, 64),"ip":eps[(conv % 16) as usize]});
                (1, send(&c, reqwest::Method::POST, format!("{b}/v1/cache/save"), body.to_string()).await)
            }
        })
        .await;
    }
    // 4. Cache query on that tree: known conversation plus 8 new chunks; as fast as it goes,
    //    then at half that rate (the latency of a lookup below saturation). With
    //    MC_BENCH_MAX_AGES=1 each query lists the 16 engines in `max_age_ms`, as llmproxy's
    //    gateways do once they know the engines' cache residency (1 h each: the same answers).
    {
        let (c, b) = (client.clone(), pick.clone());
        let ages = (std::env::var("MC_BENCH_MAX_AGES").as_deref() == Ok("1")).then(|| {
            let limits = eps.iter().map(|ep| (ep.clone(), json!(3_600_000)));
            serde_json::Value::Object(limits.collect())
        });
        let query = move |w: usize, i: u64| {
            let (c, b, ages) = (c.clone(), b(w), ages.clone());
            async move {
                let mut seed = i.wrapping_mul(0x2545f4914f6cdd1d) | 1;
                let conv = rnd(&mut seed) % 5000;
                let mut h = prompt(conv, 64);
                h.extend((0..8).map(|k| rnd(&mut seed) ^ k));
                let mut body = json!({"cluster":"bench","prompt_hash":h,"top_k":5});
                if let Some(ages) = ages {
                    body["max_age_ms"] = ages;
                }
                (
                    1,
                    send(
                        &c,
                        reqwest::Method::POST,
                        format!("{b}/v1/cache/query"),
                        body.to_string(),
                    )
                    .await,
                )
            }
        };
        let rate = run(
            "cache query (72 hashes, top_k 5)",
            secs,
            conc,
            query.clone(),
        )
        .await;
        run_paced(
            "cache query at half that rate",
            secs,
            conc,
            Some(rate / 2.0),
            query,
        )
        .await;
    }
}
