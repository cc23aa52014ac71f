//! Finds the request rate at which a target (normally round robin) stops keeping up with a
//! workload: runs the same seeded workload at increasing rates, then bisects between the last
//! rate that kept up and the first that did not. A run is *saturated* when the fleet's waiting
//! queue or the TTFT grows during the run (last third of the sending window against the middle
//! third), or more than 1 % of the requests fail. The load levels are then ≈75 % and
//! ≈95 % of the saturation rate.

use crate::load::{self, RunArgs};
use crate::workload::{self, WorkloadArgs};
use serde::Serialize;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct SaturationArgs {
    /// The target to saturate (e.g. the reference proxy in round-robin mode, or plain Envoy).
    #[arg(long)]
    pub target: String,
    /// First rate probed (requests/s).
    #[arg(long, default_value_t = 4.0)]
    pub from: f64,
    /// Rate multiplier between probes until one saturates.
    #[arg(long, default_value_t = 1.25)]
    pub factor: f64,
    /// Highest rate probed.
    #[arg(long, default_value_t = 64.0)]
    pub max_rate: f64,
    /// Bisection probes between the last rate that kept up and the first that did not.
    #[arg(long, default_value_t = 3)]
    pub bisect: u32,
    /// Growth factor (last third / middle third) of the queue or TTFT that counts as saturated.
    #[arg(long, default_value_t = 2.0)]
    pub growth: f64,
    /// TTFT growth counts only when the last third's mean TTFT exceeds this (s).
    #[arg(long, default_value_t = 1.0)]
    pub min_ttft_s: f64,
    /// Queue growth counts only when the last third's mean fleet waiting queue exceeds this.
    #[arg(long, default_value_t = 4.0)]
    pub min_queue: f64,
    /// Write every probe and the result as JSON here.
    #[arg(long)]
    pub json_out: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub workload: WorkloadArgs,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    pub rate: f64,
    pub requests: usize,
    pub ok: usize,
    pub errors: usize,
    pub ttft_mean_s: f64,
    pub ttft_mid_s: f64,
    pub ttft_last_s: f64,
    pub queue_mid: f64,
    pub queue_last: f64,
    pub utilization: Option<f64>,
    pub saturated: bool,
    pub reason: String,
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = v.fold((0.0, 0usize), |a, x| (a.0 + x, a.1 + 1));
    if n == 0 {
        0.0
    } else {
        s / n as f64
    }
}

/// The saturation verdict of one run: (saturated, reason). `ttft` are (send time, TTFT) of the
/// successful requests, `queue` (time, fleet waiting requests) samples, both in seconds from the
/// start of the run; `duration` the sending window.
pub fn verdict(
    a: &SaturationArgs,
    duration: f64,
    requests: usize,
    errors: usize,
    ttft: &[(f64, f64)],
    queue: &[(f64, f64)],
) -> (bool, f64, f64, f64, f64, String) {
    let third = duration / 3.0;
    let in_mid = |t: f64| t >= third && t < 2.0 * third;
    let in_last = |t: f64| t >= 2.0 * third && t <= duration;
    let tm = mean(ttft.iter().filter(|x| in_mid(x.0)).map(|x| x.1));
    let tl = mean(ttft.iter().filter(|x| in_last(x.0)).map(|x| x.1));
    let qm = mean(queue.iter().filter(|x| in_mid(x.0)).map(|x| x.1));
    let ql = mean(queue.iter().filter(|x| in_last(x.0)).map(|x| x.1));
    let mut why = Vec::new();
    if requests > 0 && errors as f64 > 0.01 * requests as f64 {
        why.push(format!("{errors} errors"));
    }
    if tl > a.growth * tm && tl > a.min_ttft_s {
        why.push(format!("TTFT {:.0} -> {:.0} ms", tm * 1e3, tl * 1e3));
    }
    if ql > a.growth * qm && ql > a.min_queue {
        why.push(format!("queue {qm:.1} -> {ql:.1}"));
    }
    (!why.is_empty(), tm, tl, qm, ql, why.join(", "))
}

async fn probe(a: &SaturationArgs, rate: f64) -> Result<Probe, String> {
    let stats = a
        .run
        .stats_url
        .clone()
        .ok_or("saturation needs --stats-url (the fleet's queue)")?;
    let client = load::http_client()?;
    load::wait_fleet_idle(&client, &stats, Duration::from_secs(300)).await?;
    load::reset_fleet(&client, &stats).await?;
    let mut w = a.workload.clone();
    w.rate = rate;
    let trace = workload::generate(&w)?;
    // Sample the fleet's waiting queue once a second while the trace is sent.
    let sampler = {
        let (client, stats) = (client.clone(), stats.clone());
        let until = w.duration;
        tokio::spawn(async move {
            let t0 = Instant::now();
            let mut out = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let t = t0.elapsed().as_secs_f64();
                if t > until + 1.0 {
                    break;
                }
                if let Ok(s) = load::fetch_stats(&client, &stats).await {
                    out.push((t, s["totals"]["waiting"].as_f64().unwrap_or(0.0)));
                }
            }
            out
        })
    };
    let label = format!("rate {rate:.2}");
    let out = load::run(&a.target, &label, &trace, &a.run).await?;
    let queue = sampler.await.unwrap_or_default();
    let s = load::summarize(&label, &a.target, &out, a.run.warmup);
    let ttft: Vec<(f64, f64)> = out
        .records
        .iter()
        .filter(|r| r.ok)
        .filter_map(|r| Some((r.sent_s, r.ttft_s?)))
        .collect();
    let (saturated, tm, tl, qm, ql, reason) =
        verdict(a, w.duration, s.requests, s.errors, &ttft, &queue);
    Ok(Probe {
        rate,
        requests: s.requests,
        ok: s.ok,
        errors: s.errors,
        ttft_mean_s: s.ttft_s.mean,
        ttft_mid_s: tm,
        ttft_last_s: tl,
        queue_mid: qm,
        queue_last: ql,
        utilization: s.fleet_utilization,
        saturated,
        reason,
    })
}

pub async fn saturation(a: SaturationArgs) -> Result<(), String> {
    if !(a.from > 0.0 && a.factor > 1.0 && a.max_rate >= a.from) {
        return Err("need --from > 0, --factor > 1, --max-rate >= --from".into());
    }
    let mut probes: Vec<Probe> = Vec::new();
    let mut ok_rate: Option<f64> = None;
    let mut bad_rate: Option<f64> = None;
    let mut rate = a.from;
    while rate <= a.max_rate + 1e-9 {
        let p = probe(&a, rate).await?;
        eprintln!("{}", probe_line(&p));
        let sat = p.saturated;
        probes.push(p);
        if sat {
            bad_rate = Some(rate);
            break;
        }
        ok_rate = Some(rate);
        rate *= a.factor;
    }
    if let (Some(mut lo), Some(mut hi)) = (ok_rate, bad_rate) {
        for _ in 0..a.bisect {
            let mid = (lo + hi) / 2.0;
            let p = probe(&a, mid).await?;
            eprintln!("{}", probe_line(&p));
            if p.saturated {
                hi = mid;
            } else {
                lo = mid;
            }
            probes.push(p);
        }
        ok_rate = Some(lo);
        bad_rate = Some(hi);
    }
    probes.sort_by(|x, y| x.rate.total_cmp(&y.rate));
    println!("| rate | ok | err | TTFT mean | TTFT mid third | TTFT last third | queue mid | queue last | util | saturated |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|:--|");
    for p in &probes {
        println!(
            "| {:.2} | {} | {} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} | {} | {} |",
            p.rate,
            p.ok,
            p.errors,
            p.ttft_mean_s * 1e3,
            p.ttft_mid_s * 1e3,
            p.ttft_last_s * 1e3,
            p.queue_mid,
            p.queue_last,
            p.utilization
                .map(|u| format!("{:.1}%", u * 100.0))
                .unwrap_or("-".into()),
            if p.saturated { &p.reason } else { "no" }
        );
    }
    let estimate = match (ok_rate, bad_rate) {
        (Some(lo), Some(hi)) => {
            let sat = (lo + hi) / 2.0;
            println!(
                "saturation ≈ {sat:.2} req/s (kept up at {lo:.2}, saturated at {hi:.2}); 75 % = {:.2} req/s, 95 % = {:.2} req/s",
                0.75 * sat,
                0.95 * sat
            );
            Some(sat)
        }
        (None, Some(hi)) => {
            println!("already saturated at the first rate {hi:.2} req/s: lower --from");
            None
        }
        _ => {
            println!(
                "not saturated up to {:.2} req/s: raise --max-rate",
                probes.last().map(|p| p.rate).unwrap_or(a.from)
            );
            None
        }
    };
    if let Some(path) = &a.json_out {
        let doc = serde_json::json!({
            "target": a.target,
            "workload": &a.workload,
            "probes": probes,
            "saturation_rate": estimate,
            "rate_75": estimate.map(|s| 0.75 * s),
            "rate_95": estimate.map(|s| 0.95 * s),
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc).unwrap_or_default())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

fn probe_line(p: &Probe) -> String {
    format!(
        "rate {:.2}: {} ok, {} errors, TTFT mean {:.0} ms (mid third {:.0}, last third {:.0}), queue {:.1} -> {:.1}: {}",
        p.rate,
        p.ok,
        p.errors,
        p.ttft_mean_s * 1e3,
        p.ttft_mid_s * 1e3,
        p.ttft_last_s * 1e3,
        p.queue_mid,
        p.queue_last,
        if p.saturated { &p.reason } else { "keeps up" }
    )
}
