//! Runs the same trace against several named targets (resetting the simulated fleet between
//! runs), prints one side-by-side table, writes results.json / results.md, a TTFT CDF plot and
//! every request's record (records/NAME.jsonl).

use crate::load::{self, RunArgs, Summary};
use crate::workload::{self, WorkloadArgs};
use serde_json::json;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, clap::Args)]
pub struct CompareArgs {
    /// A target as NAME=URL (repeat; runs in the given order). NAME=URL1,URL2 splits the trace
    /// over several URLs (e.g. two gateway replicas; see --split).
    #[arg(long = "target", required = true, value_parser = parse_target)]
    pub targets: Vec<(String, String)>,
    /// Directory for results.json, results.md and ttft_cdf.png.
    #[arg(long, default_value = "build/compare")]
    pub out_dir: PathBuf,
    /// Seconds to wait between runs (after the fleet is idle and reset).
    #[arg(long, default_value_t = 1.0)]
    pub pause: f64,
    /// Python with matplotlib for the plot (default: .venv/bin/python if present, else python3).
    #[arg(long)]
    pub plot_python: Option<String>,
    /// The plotting script.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../tools/plot/ttft_cdf.py"))]
    pub plot_script: String,
    /// Skip the plot.
    #[arg(long)]
    pub no_plot: bool,
    /// Title of the plot and the markdown.
    #[arg(long, default_value = "TTFT per routing policy")]
    pub title: String,
    #[command(flatten)]
    pub workload: WorkloadArgs,
    #[command(flatten)]
    pub run: RunArgs,
}

fn parse_target(s: &str) -> Result<(String, String), String> {
    let (n, u) = s
        .split_once('=')
        .ok_or_else(|| format!("target {s:?} is not NAME=URL"))?;
    let urls = load::target_urls(u);
    if n.is_empty()
        || urls.is_empty()
        || !urls
            .iter()
            .all(|u| u.starts_with("http://") || u.starts_with("https://"))
    {
        return Err(format!(
            "target {s:?} is not NAME=http://HOST:PORT[,http://HOST2:PORT2...]"
        ));
    }
    Ok((n.to_string(), u.to_string()))
}

/// Writes every request's record of target `name` as one JSON line each to
/// `OUT/records/NAME.jsonl` (session, turn, times, tokens, `served_by`: for analyses the
/// summary does not make, such as how often a session changed servers).
fn write_records(
    out_dir: &std::path::Path,
    name: &str,
    records: &[load::Record],
) -> Result<(), String> {
    let dir = out_dir.join("records");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut lines = String::new();
    for r in records {
        lines += &serde_json::to_string(r).map_err(|e| e.to_string())?;
        lines.push('\n');
    }
    write(&dir.join(format!("{name}.jsonl")), &lines)
}

pub async fn compare(a: CompareArgs) -> Result<(), String> {
    let trace = workload::generate(&a.workload)?;
    let client = load::http_client()?;
    std::fs::create_dir_all(&a.out_dir)
        .map_err(|e| format!("cannot create {}: {e}", a.out_dir.display()))?;
    eprintln!(
        "trace: {} sessions, up to {} requests over {:.0}s at {:.1} req/s (seed {}, mix {:?})",
        trace.sessions.len(),
        trace.max_requests(),
        trace.duration_s,
        a.workload.rate,
        a.workload.seed,
        a.workload.mix
    );
    let mut summaries: Vec<Summary> = Vec::new();
    let mut runs_json = Vec::new();
    for (i, (name, url)) in a.targets.iter().enumerate() {
        if let Some(stats) = &a.run.stats_url {
            load::wait_fleet_idle(&client, stats, Duration::from_secs(120)).await?;
            load::reset_fleet(&client, stats).await?;
        }
        if i > 0 && a.pause > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(a.pause)).await;
        }
        eprintln!("==> {name}: {url}");
        let out = load::run(url, name, &trace, &a.run).await?;
        let s = load::summarize(name, url, &out, a.run.warmup);
        eprintln!(
            "    {} ok, {} errors, TTFT mean {:.0} ms p99 {:.0} ms, hit rate {}",
            s.ok,
            s.errors,
            s.ttft_s.mean * 1e3,
            s.ttft_s.p99 * 1e3,
            s.fleet_hit_rate
                .or(s.client_hit_rate)
                .map(|h| format!("{:.1}%", h * 100.0))
                .unwrap_or("-".into())
        );
        let ttft: Vec<f64> = out
            .records
            .iter()
            .filter(|r| r.ok && r.sent_s >= a.run.warmup)
            .filter_map(|r| r.ttft_s)
            .collect();
        runs_json.push(json!({"summary": &s, "ttft_s": ttft}));
        write_records(&a.out_dir, name, &out.records)?;
        summaries.push(s);
    }
    let table = load::table(&summaries);
    println!("{table}");
    let doc = json!({
        "title": a.title,
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "generated_unix": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "workload": &a.workload,
        "run": &a.run,
        "runs": runs_json,
    });
    let json_path = a.out_dir.join("results.json");
    write(
        &json_path,
        &serde_json::to_string_pretty(&doc).unwrap_or_default(),
    )?;
    write(
        &a.out_dir.join("results.md"),
        &format!("## {}\n\n{table}", a.title),
    )?;
    eprintln!("wrote {} and results.md", json_path.display());
    if !a.no_plot {
        let png = a.out_dir.join("ttft_cdf.png");
        let py = a.plot_python.clone().unwrap_or_else(|| {
            if std::path::Path::new(".venv/bin/python").exists() {
                ".venv/bin/python".into()
            } else {
                "python3".into()
            }
        });
        let st = tokio::process::Command::new(&py)
            .arg(&a.plot_script)
            .arg(&json_path)
            .arg(&png)
            .status()
            .await
            .map_err(|e| format!("cannot run {py} {}: {e}", a.plot_script))?;
        if !st.success() {
            return Err(format!(
                "plot failed ({py} {}; needs matplotlib): {st}",
                a.plot_script
            ));
        }
        eprintln!("wrote {}", png.display());
    }
    let failed: Vec<&str> = summaries
        .iter()
        .filter(|s| s.ok == 0)
        .map(|s| s.label.as_str())
        .collect();
    if !failed.is_empty() {
        return Err(format!(
            "no successful request through: {}",
            failed.join(", ")
        ));
    }
    Ok(())
}

fn write(p: &std::path::Path, s: &str) -> Result<(), String> {
    std::fs::write(p, s).map_err(|e| format!("cannot write {}: {e}", p.display()))
}
