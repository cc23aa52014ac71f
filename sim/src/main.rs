//! llmproxy-sim: a simulated vLLM-like model-server fleet, a load generator, and a driver that
//! compares routers on the same trace.

pub mod compare;
pub mod engine;
pub mod kv;
pub mod load;
pub mod proxy;
pub mod replay;
pub mod saturation;
pub mod server;
pub mod workload;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "llmproxy-sim",
    version,
    about = "Simulated LLM serving fleet and routing benchmark"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run N simulated OpenAI-compatible model servers on 127.0.0.1.
    Serve(server::ServeArgs),
    /// Replay a seeded trace against one target and report latency, throughput, cache hits.
    Load(LoadArgs),
    /// Replay the same trace against several targets and compare them side by side.
    Compare(compare::CompareArgs),
    /// A minimal streaming proxy (round robin or least request) as a reference target.
    Proxy(proxy::ProxyArgs),
    /// Find the rate at which a target (round robin) stops keeping up with a workload.
    Saturation(saturation::SaturationArgs),
}

#[derive(clap::Args)]
struct LoadArgs {
    /// Base URL of the target (a router or one simulated server); several comma-separated
    /// URLs split the trace between them (see --split).
    #[arg(long)]
    target: String,
    /// Name of this run in the output.
    #[arg(long, default_value = "target")]
    label: String,
    /// Reset the fleet (POST /sim/reset on --stats-url) before the run.
    #[arg(long)]
    reset: bool,
    /// Write the summary (and every request record) as JSON here.
    #[arg(long)]
    json_out: Option<std::path::PathBuf>,
    #[command(flatten)]
    workload: workload::WorkloadArgs,
    #[command(flatten)]
    run: load::RunArgs,
}

async fn load_cmd(a: LoadArgs) -> Result<(), String> {
    let trace = workload::generate(&a.workload)?;
    if a.reset {
        let url = a
            .run
            .stats_url
            .as_deref()
            .ok_or("--reset needs --stats-url")?;
        load::reset_fleet(&load::http_client()?, url).await?;
    }
    eprintln!(
        "trace: {} sessions, up to {} requests over {:.0}s at {:.1} req/s -> {}",
        trace.sessions.len(),
        trace.max_requests(),
        trace.duration_s,
        a.workload.rate,
        a.target
    );
    let out = load::run(&a.target, &a.label, &trace, &a.run).await?;
    let s = load::summarize(&a.label, &a.target, &out, a.run.warmup);
    println!("{}", load::table(std::slice::from_ref(&s)));
    for (k, n) in &s.error_kinds {
        println!("error x{n}: {k}");
    }
    if let Some(p) = &a.json_out {
        let doc =
            serde_json::json!({"summary": &s, "workload": &a.workload, "records": &out.records});
        std::fs::write(p, serde_json::to_string_pretty(&doc).unwrap_or_default())
            .map_err(|e| format!("cannot write {}: {e}", p.display()))?;
    }
    if s.ok == 0 {
        return Err("no request succeeded".into());
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("llmproxy-sim: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let res = rt.block_on(async move {
        match cli.cmd {
            Cmd::Serve(a) => server::serve(a).await,
            Cmd::Load(a) => load_cmd(a).await,
            Cmd::Compare(a) => compare::compare(a).await,
            Cmd::Proxy(a) => proxy::run(a).await,
            Cmd::Saturation(a) => saturation::saturation(a).await,
        }
    });
    if let Err(e) = res {
        eprintln!("llmproxy-sim: {e}");
        std::process::exit(1);
    }
}
