//! llmproxy-sim: a simulated vLLM-like model-server fleet, a load generator, and a driver that
//! compares routers on the same trace.

pub mod engine;
pub mod kv;
pub mod server;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "llmproxy-sim", version, about = "Simulated LLM serving fleet and routing benchmark")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run N simulated OpenAI-compatible model servers on 127.0.0.1.
    Serve(server::ServeArgs),
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
        }
    });
    if let Err(e) = res {
        eprintln!("llmproxy-sim: {e}");
        std::process::exit(1);
    }
}
