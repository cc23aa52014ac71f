//! A run's results: latency distributions, per-server shares, the fleet's hit rate by request
//! kind (from the simulator's `/sim/stats` and the answers' usage), and the Markdown table
//! the comparisons print.

use super::{Record, RunOutput};
use crate::workload::Kind;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Dist {
    pub n: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Dist {
    pub fn of(v: &[f64]) -> Dist {
        if v.is_empty() {
            return Dist::default();
        }
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        let q = |p: f64| s[((p * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1];
        Dist {
            n: s.len(),
            mean: s.iter().sum::<f64>() / s.len() as f64,
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            max: s[s.len() - 1],
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ServerShare {
    pub server: String,
    pub requests: u64,
    pub share: f64,
    /// From the simulator: prompt tokens, cached tokens and busy fraction during the run.
    pub prompt_tokens: Option<f64>,
    pub cached_tokens: Option<f64>,
    pub utilization: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub label: String,
    pub target: String,
    pub requests: usize,
    pub ok: usize,
    pub errors: usize,
    pub error_kinds: BTreeMap<String, usize>,
    pub ttft_s: Dist,
    pub e2e_s: Dist,
    /// Mean time per output token after the first (s).
    pub tpot_s: Dist,
    pub wall_s: f64,
    pub req_per_s: f64,
    pub output_tok_per_s: f64,
    pub send_lateness_s: Dist,
    /// Fleet prefix-cache hit rate: cached prompt tokens / prompt tokens (simulator stats).
    pub fleet_hit_rate: Option<f64>,
    /// The same from the responses' usage.prompt_tokens_details.cached_tokens.
    pub client_hit_rate: Option<f64>,
    pub fleet_utilization: Option<f64>,
    pub per_server: Vec<ServerShare>,
    pub per_kind_ttft_s: BTreeMap<String, Dist>,
    /// Prefix-cache hit rate per request kind, from the responses' usage (cached prompt tokens
    /// / prompt tokens of the successful requests of that kind).
    pub per_kind_hit_rate: BTreeMap<String, f64>,
    /// Requests per target URL when the run split the trace over several URLs.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub per_gateway: Vec<u64>,
}

fn num(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(0.0)
}

pub fn summarize(label: &str, target: &str, out: &RunOutput, warmup: f64) -> Summary {
    let recs: Vec<&Record> = out.records.iter().filter(|r| r.sent_s >= warmup).collect();
    let ok: Vec<&&Record> = recs.iter().filter(|r| r.ok).collect();
    let mut error_kinds = BTreeMap::new();
    for r in recs.iter().filter(|r| !r.ok) {
        let e = r.error.clone().unwrap_or_default();
        let key: String = e.chars().take(60).collect();
        *error_kinds.entry(key).or_insert(0) += 1;
    }
    let ttft: Vec<f64> = ok.iter().filter_map(|r| r.ttft_s).collect();
    let e2e: Vec<f64> = ok.iter().map(|r| r.e2e_s).collect();
    let tpot: Vec<f64> = ok
        .iter()
        .filter(|r| r.output_tokens > 1)
        .filter_map(|r| {
            r.ttft_s
                .map(|t| (r.e2e_s - t) / (r.output_tokens - 1) as f64)
        })
        .collect();
    let late: Vec<f64> = out
        .records
        .iter()
        .map(|r| (r.sent_s - r.scheduled_s).max(0.0))
        .collect();
    // Throughput over the measured window: from the first measured send to the last completion.
    let start = recs.iter().map(|r| r.sent_s).fold(f64::INFINITY, f64::min);
    let end = recs.iter().map(|r| r.sent_s + r.e2e_s).fold(0.0, f64::max);
    let window = if end > start {
        end - start
    } else {
        out.wall_s.max(1e-9)
    };
    let out_tokens: u64 = ok.iter().map(|r| r.output_tokens).sum();
    let (pt, ct): (u64, u64) = ok
        .iter()
        .filter_map(|r| Some((r.prompt_tokens?, r.cached_tokens?)))
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    let client_hit_rate = if pt > 0 {
        Some(ct as f64 / pt as f64)
    } else {
        None
    };

    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for r in &recs {
        let k = r.served_by.clone().unwrap_or_else(|| "(none)".into());
        *counts.entry(k).or_insert(0) += 1;
    }
    // Fleet stats deltas.
    let mut fleet_hit_rate = None;
    let mut fleet_utilization = None;
    let mut fleet_servers: BTreeMap<String, (f64, f64, f64)> = BTreeMap::new();
    if let (Some(b), Some(a)) = (&out.fleet_before, &out.fleet_after) {
        let empty = vec![];
        let before: BTreeMap<String, &Value> = b["servers"]
            .as_array()
            .unwrap_or(&empty)
            .iter()
            .map(|s| (s["name"].as_str().unwrap_or("").to_string(), s))
            .collect();
        let (mut p, mut c, mut util_sum, mut n) = (0.0, 0.0, 0.0, 0.0);
        for s in a["servers"].as_array().unwrap_or(&empty) {
            let name = s["name"].as_str().unwrap_or("").to_string();
            let z = json!({});
            let bs = before.get(&name).copied().unwrap_or(&z);
            // A reset between the snapshots restarts the counters: then the after value is the delta.
            let reset = num(s, "elapsed_s") < num(bs, "elapsed_s");
            let d = |k: &str| {
                if reset {
                    num(s, k)
                } else {
                    num(s, k) - num(bs, k)
                }
            };
            let (dp, dc, db, de) = (
                d("prompt_tokens"),
                d("cached_tokens"),
                d("busy_s"),
                d("elapsed_s"),
            );
            let util = if de > 0.0 { (db / de).min(1.0) } else { 0.0 };
            p += dp;
            c += dc;
            util_sum += util;
            n += 1.0;
            fleet_servers.insert(name, (dp, dc, util));
        }
        if p > 0.0 {
            fleet_hit_rate = Some(c / p);
        }
        if n > 0.0 {
            fleet_utilization = Some(util_sum / n);
        }
    }
    let total = recs.len().max(1) as f64;
    let mut names: Vec<String> = counts.keys().cloned().collect();
    for k in fleet_servers.keys() {
        if !counts.contains_key(k) {
            names.push(k.clone());
        }
    }
    names.sort();
    let per_server = names
        .into_iter()
        .map(|k| {
            let n = counts.get(&k).copied().unwrap_or(0);
            let f = fleet_servers.get(&k);
            ServerShare {
                share: n as f64 / total,
                requests: n,
                prompt_tokens: f.map(|x| x.0),
                cached_tokens: f.map(|x| x.1),
                utilization: f.map(|x| x.2),
                server: k,
            }
        })
        .collect();
    let mut per_kind_ttft_s = BTreeMap::new();
    let mut per_kind_hit_rate = BTreeMap::new();
    for kind in Kind::ALL {
        let v: Vec<f64> = ok
            .iter()
            .filter(|r| r.kind == kind)
            .filter_map(|r| r.ttft_s)
            .collect();
        if !v.is_empty() {
            per_kind_ttft_s.insert(kind.name().to_string(), Dist::of(&v));
        }
        let (p, c) = ok
            .iter()
            .filter(|r| r.kind == kind)
            .filter_map(|r| Some((r.prompt_tokens?, r.cached_tokens?)))
            .fold((0u64, 0u64), |a, b| (a.0 + b.0, a.1 + b.1));
        if p > 0 {
            per_kind_hit_rate.insert(kind.name().to_string(), c as f64 / p as f64);
        }
    }
    let gateways = recs.iter().map(|r| r.gateway + 1).max().unwrap_or(0);
    let per_gateway: Vec<u64> = if gateways > 1 {
        (0..gateways)
            .map(|g| recs.iter().filter(|r| r.gateway == g).count() as u64)
            .collect()
    } else {
        Vec::new()
    };
    Summary {
        label: label.to_string(),
        target: target.to_string(),
        requests: recs.len(),
        ok: ok.len(),
        errors: recs.len() - ok.len(),
        error_kinds,
        ttft_s: Dist::of(&ttft),
        e2e_s: Dist::of(&e2e),
        tpot_s: Dist::of(&tpot),
        wall_s: out.wall_s,
        req_per_s: ok.len() as f64 / window,
        output_tok_per_s: out_tokens as f64 / window,
        send_lateness_s: Dist::of(&late),
        fleet_hit_rate,
        client_hit_rate,
        fleet_utilization,
        per_server,
        per_kind_ttft_s,
        per_kind_hit_rate,
        per_gateway,
    }
}

fn ms(x: f64) -> String {
    format!("{:.0}", x * 1e3)
}

fn pct(x: Option<f64>) -> String {
    x.map(|v| format!("{:.1}%", v * 100.0))
        .unwrap_or_else(|| "-".into())
}

/// Share per server as "25/25/26/24" (percent, servers sorted by name).
pub fn share_string(s: &Summary) -> String {
    s.per_server
        .iter()
        .filter(|p| p.server != "(none)")
        .map(|p| format!("{:.0}", p.share * 100.0))
        .collect::<Vec<_>>()
        .join("/")
}

/// Hit rate per request kind as "chat 62 rag 71 unique 0" (percent, from usage).
pub fn kind_hits_string(s: &Summary) -> String {
    s.per_kind_hit_rate
        .iter()
        .map(|(k, h)| format!("{k} {:.0}", h * 100.0))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One table, one row per run.
pub fn table(runs: &[Summary]) -> String {
    let head = [
        "policy",
        "ok",
        "err",
        "TTFT mean",
        "p50",
        "p90",
        "p99",
        "e2e mean",
        "e2e p50",
        "e2e p99",
        "req/s",
        "out tok/s",
        "hit rate",
        "util",
        "share % per server",
        "late max",
        "hit % by kind",
    ];
    // Left-aligned columns: the policy, the shares and the per-kind hit rates.
    let left = |i: usize| i == 0 || i == 14 || i == 16;
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|s| {
            vec![
                s.label.clone(),
                s.ok.to_string(),
                s.errors.to_string(),
                ms(s.ttft_s.mean),
                ms(s.ttft_s.p50),
                ms(s.ttft_s.p90),
                ms(s.ttft_s.p99),
                ms(s.e2e_s.mean),
                ms(s.e2e_s.p50),
                ms(s.e2e_s.p99),
                format!("{:.2}", s.req_per_s),
                format!("{:.0}", s.output_tok_per_s),
                pct(s.fleet_hit_rate.or(s.client_hit_rate)),
                pct(s.fleet_utilization),
                share_string(s),
                ms(s.send_lateness_s.max),
                kind_hits_string(s),
            ]
        })
        .collect();
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let mut out = String::new();
    let line = |cells: &[String], out: &mut String| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if left(i) {
                    format!("{:<w$}", c, w = w[i])
                } else {
                    format!("{:>w$}", c, w = w[i])
                }
            })
            .collect();
        out.push_str(&format!("| {} |\n", parts.join(" | ")));
    };
    line(
        &head.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        &mut out,
    );
    out.push_str(&format!(
        "|{}|\n",
        w.iter()
            .enumerate()
            .map(|(i, n)| if left(i) {
                format!(":{}", "-".repeat(n + 1))
            } else {
                format!("{}:", "-".repeat(n + 1))
            })
            .collect::<Vec<_>>()
            .join("|")
    ));
    for r in &rows {
        line(r, &mut out);
    }
    out.push_str("(times in ms; hit rate = cached prompt tokens / prompt tokens over the fleet; util = mean busy fraction of the servers; hit % by kind from the responses' usage)\n");
    for s in runs.iter().filter(|s| !s.per_gateway.is_empty()) {
        let g: Vec<String> = s.per_gateway.iter().map(u64::to_string).collect();
        out.push_str(&format!(
            "{}: requests per target URL {}\n",
            s.label,
            g.join("/")
        ));
    }
    out
}
