//! Finds the request rate at which a target (normally round robin) stops keeping up with a
//! workload: runs the same seeded workload at increasing rates, then bisects between the last
//! rate that kept up and the first that did not. A run is *saturated* when the work in the fleet
//! or the TTFT grows during the run: the mean over the last third of the sending window exceeds
//! the mean over the middle third by more than --queue-growth requests in the fleet (running +
//! waiting, sampled every second from /sim/stats: a prefill-bound server admits requests and
//! prefills them slowly, a KV-bound one leaves them waiting) or by more than --ttft-growth-s
//! seconds of TTFT; or more than 1 % of the requests fail. Below saturation both stay flat
//! (open-loop arrivals, same mix over the run); above it they grow linearly with time. The load levels are then ≈75 % and
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
    /// Growth of the mean TTFT (s, last third minus middle third of the run) that counts as
    /// saturated.
    #[arg(long, default_value_t = 0.5)]
    pub ttft_growth_s: f64,
    /// Growth of the mean number of requests in the fleet (running + waiting, last third minus
    /// middle third of the run) that counts as saturated.
    #[arg(long, default_value_t = 8.0)]
    pub queue_growth: f64,
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
    /// Successful requests per second (first send to last completion): what the fleet served.
    pub served_per_s: f64,
    pub ttft_mean_s: f64,
    pub ttft_mid_s: f64,
    pub ttft_last_s: f64,
    pub in_fleet_mid: f64,
    pub in_fleet_last: f64,
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
/// start of the run (the queue is the number of requests in the fleet); `duration` the sending
/// window.
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
    if tl - tm > a.ttft_growth_s {
        why.push(format!("TTFT {:.0} -> {:.0} ms", tm * 1e3, tl * 1e3));
    }
    if ql - qm > a.queue_growth {
        why.push(format!("in fleet {qm:.1} -> {ql:.1}"));
    }
    (!why.is_empty(), tm, tl, qm, ql, why.join(", "))
}

async fn probe(a: &SaturationArgs, rate: f64) -> Result<Probe, String> {
    let stats = a
        .run
        .stats_url
        .clone()
        .ok_or("saturation needs --stats-url (the requests in the fleet)")?;
    let client = load::http_client()?;
    load::wait_fleet_idle(&client, &stats, Duration::from_secs(300)).await?;
    load::reset_fleet(&client, &stats).await?;
    let mut w = a.workload.clone();
    w.rate = rate;
    let trace = workload::generate(&w)?;
    // Sample the requests in the fleet once a second while the trace is sent.
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
                    let n = s["totals"]["waiting"].as_f64().unwrap_or(0.0)
                        + s["totals"]["running"].as_f64().unwrap_or(0.0);
                    out.push((t, n));
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
        served_per_s: s.req_per_s,
        ttft_mean_s: s.ttft_s.mean,
        ttft_mid_s: tm,
        ttft_last_s: tl,
        in_fleet_mid: qm,
        in_fleet_last: ql,
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
    println!("| rate | ok | err | served req/s | TTFT mean | TTFT mid third | TTFT last third | in fleet mid | in fleet last | util | saturated |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:--|");
    for p in &probes {
        println!(
            "| {:.2} | {} | {} | {:.2} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} | {} | {} |",
            p.rate,
            p.ok,
            p.errors,
            p.served_per_s,
            p.ttft_mean_s * 1e3,
            p.ttft_mid_s * 1e3,
            p.ttft_last_s * 1e3,
            p.in_fleet_mid,
            p.in_fleet_last,
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
        "rate {:.2}: {} ok, {} errors, TTFT mean {:.0} ms (mid third {:.0}, last third {:.0}), requests in the fleet {:.1} -> {:.1}: {}",
        p.rate,
        p.ok,
        p.errors,
        p.ttft_mean_s * 1e3,
        p.ttft_mid_s * 1e3,
        p.ttft_last_s * 1e3,
        p.in_fleet_mid,
        p.in_fleet_last,
        if p.saturated { &p.reason } else { "keeps up" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct P {
        #[command(flatten)]
        a: SaturationArgs,
    }

    #[test]
    fn a_growing_queue_or_ttft_is_saturation_a_steady_one_is_not() {
        let a = P::parse_from(["x", "--target", "http://127.0.0.1:1"]).a;
        let secs: Vec<f64> = (0..60).map(f64::from).collect();
        // Steady: a noisy few requests in the fleet, TTFT around 300 ms.
        let queue: Vec<(f64, f64)> = secs.iter().map(|&t| (t, (t as u64 % 5) as f64)).collect();
        let ttft: Vec<(f64, f64)> = secs.iter().map(|&t| (t, 0.3 + 0.1 * (t % 3.0))).collect();
        assert!(!verdict(&a, 60.0, 600, 0, &ttft, &queue).0);
        // The requests in the fleet grow by 0.5 a second (arrivals above service rate).
        let ramp: Vec<(f64, f64)> = secs.iter().map(|&t| (t, 0.5 * t)).collect();
        let (sat, .., why) = verdict(&a, 60.0, 600, 0, &ttft, &ramp);
        assert!(sat && why.contains("in fleet"), "{why}");
        // TTFT growing with it.
        let slow: Vec<(f64, f64)> = secs.iter().map(|&t| (t, 0.1 * t)).collect();
        let (sat, .., why) = verdict(&a, 60.0, 600, 0, &slow, &queue);
        assert!(sat && why.contains("TTFT"), "{why}");
        // Errors.
        assert!(verdict(&a, 60.0, 600, 7, &ttft, &queue).0);
    }
}
