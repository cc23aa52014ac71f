//! `llmproxy-metadata-center run [--config FILE] [--host H] [--port P]`
//!
//! The binary: the CLI (into `config::Settings`), logging, the wiring of the parts (stores,
//! memory policy, delete retries, replicator and peer discovery, GC tasks, listener, router) and
//! the graceful shutdown on SIGTERM / SIGINT. Everything else is in the library (`lib.rs`).

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tracing::level_filters::LevelFilter;
use tracing_subscriber::prelude::*;

use llmproxy_metadata_center::budget::MemoryBudget;
use llmproxy_metadata_center::cache::CachePool;
use llmproxy_metadata_center::config::{self, Settings};
use llmproxy_metadata_center::listener::{BoundedListener, ConnHandle};
use llmproxy_metadata_center::load::{LoadStore, Stamp};
use llmproxy_metadata_center::memory::Evictor;
use llmproxy_metadata_center::metrics::Metrics;
use llmproxy_metadata_center::replica::{self, Replicator, ReplicatorConfig};
use llmproxy_metadata_center::retry::Retrier;
use llmproxy_metadata_center::server::{self, AppState, LogReload};
use llmproxy_metadata_center::store::{RedisConfig, RedisStore, Store, StoreSpec};

/// mimalloc: per-thread heaps; under load glibc's malloc showed as arena lock waits and about a
/// fifth of the server's CPU with the Redis store (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Metadata-Center server, wire-compatible with the aigw metadata-center.
#[derive(Parser, Debug)]
#[command(name = "llmproxy-metadata-center", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    args: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the server (the default).
    Run(RunArgs),
}

#[derive(clap::Args, Debug, Default, Clone)]
struct RunArgs {
    /// Config file (.toml, .json or .yaml), origin layout ([HTTP] Host/Port, [Log] Level, ...).
    #[arg(short = 'c', long)]
    config: Option<PathBuf>,
    /// Address to bind (default 127.0.0.1).
    #[arg(long)]
    host: Option<String>,
    /// Port to bind (default 8080; 0 picks a free port, printed on stdout).
    #[arg(long)]
    port: Option<u16>,
    /// HOST:PORT to bind; overrides --host/--port.
    #[arg(long)]
    listen: Option<String>,
    /// Require `Authorization: Bearer <token>` on every API except /health and /metrics.
    #[arg(long, env = "METADATA_CENTER_AUTH_TOKEN", hide_env_values = true)]
    auth_token: Option<String>,
    /// Static replication peers, HOST:PORT, comma separated.
    #[arg(long, value_delimiter = ',')]
    peers: Vec<String>,
    /// Enable the /cache/admin/debug/* endpoints.
    #[arg(long)]
    debug: bool,
    /// Memory budget for the load and cache stores together, in MiB (default 1024); the least
    /// recently used data is evicted beyond it. Also METADATA_CENTER_MAX_MEMORY_MB.
    #[arg(long)]
    max_memory_mb: Option<u64>,
    /// A request's headers must be complete this long after its first byte (Go duration,
    /// default 10s). Also METADATA_CENTER_HEADER_TIMEOUT.
    #[arg(long)]
    header_timeout: Option<String>,
    /// A request's body must be complete this long after its headers (Go duration, default
    /// 30s). Also METADATA_CENTER_BODY_TIMEOUT.
    #[arg(long)]
    body_timeout: Option<String>,
    /// Where the load and cache state lives: `memory` (default, in this process),
    /// `redis://HOST:PORT[/DB]` or `redis+cluster://HOST:PORT,HOST:PORT,...` (shared by every
    /// replica). Also METADATA_CENTER_STORE, `[Store] URL`.
    #[arg(long)]
    store: Option<String>,
    /// Deadline of one Redis store operation (Go duration, default 50ms); past it the server
    /// answers from nothing. Also METADATA_CENTER_STORE_TIMEOUT, `[Store] Timeout`.
    #[arg(long)]
    store_timeout: Option<String>,
}

fn settings(args: &RunArgs) -> Result<Settings, String> {
    let mut s = Settings::default();
    if let Some(path) = &args.config {
        s.apply_file(&config::load_file(path)?)?;
    }
    s.apply_env(|k| std::env::var(k).ok())?;
    if let Some(h) = &args.host {
        s.host = h.clone();
    }
    if let Some(p) = args.port {
        s.port = p;
    }
    if let Some(l) = &args.listen {
        let (h, p) = l
            .rsplit_once(':')
            .ok_or_else(|| format!("--listen {l:?}: expected HOST:PORT"))?;
        s.host = h.trim_start_matches('[').trim_end_matches(']').to_string();
        s.port = p.parse().map_err(|_| format!("--listen {l:?}: bad port"))?;
    }
    if let Some(t) = &args.auth_token {
        s.auth_token = Some(t.clone()).filter(|t| !t.is_empty());
    }
    if !args.peers.is_empty() {
        s.peers = args
            .peers
            .iter()
            .filter(|p| !p.is_empty())
            .cloned()
            .collect();
    }
    if args.debug {
        s.debug_mode = true;
    }
    if let Some(mb) = args.max_memory_mb {
        s.max_memory_mb = mb;
    }
    if let Some(d) = &args.header_timeout {
        s.header_timeout =
            config::parse_go_duration(d).map_err(|e| format!("--header-timeout: {e}"))?;
    }
    if let Some(d) = &args.body_timeout {
        s.body_timeout =
            config::parse_go_duration(d).map_err(|e| format!("--body-timeout: {e}"))?;
    }
    if let Some(v) = &args.store {
        s.store = StoreSpec::parse("--store", v)?;
    }
    if let Some(d) = &args.store_timeout {
        s.store_timeout =
            config::parse_go_duration(d).map_err(|e| format!("--store-timeout: {e}"))?;
    }
    let port = s.replica_target_port;
    s.peers = s.peers.iter().map(|p| peer_with_port(p, port)).collect();
    s.validate()?;
    Ok(s)
}

/// `host:port` for a peer given as `host`, `host:port`, `ip`, `ip:port`, `v6` or `[v6]:port`.
fn peer_with_port(p: &str, port: u16) -> String {
    let p = p.trim();
    if p.parse::<SocketAddr>().is_ok() {
        return p.to_string();
    }
    if let Ok(ip) = p
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
    {
        return SocketAddr::new(ip, port).to_string();
    }
    if p.contains(':') {
        p.to_string()
    } else {
        format!("{p}:{port}")
    }
}

fn init_logging(level: LevelFilter, json: bool) -> LogReload {
    let (filter, handle) = tracing_subscriber::reload::Layer::new(level);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        registry.with(fmt.json()).init();
    } else {
        registry.with(fmt).init();
    }
    Box::new(move |l| handle.modify(|f| *f = l).map_err(|e| e.to_string()))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install SIGTERM handler");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
}

fn main() {
    let cli = Cli::parse();
    let args = match cli.cmd {
        Some(Cmd::Run(a)) => a,
        None => cli.args,
    };
    let s = match settings(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("llmproxy-metadata-center: {e}");
            std::process::exit(2);
        }
    };
    // One worker thread per core (tokio's default); a small blocking pool (GC passes, metrics
    // rendering, DNS lookups) so the thread count stays bounded whatever the traffic.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(8)
        .enable_all()
        .build();
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("llmproxy-metadata-center: cannot start runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(s)) {
        eprintln!("llmproxy-metadata-center: {e}");
        std::process::exit(1);
    }
}

async fn run(s: Settings) -> Result<(), String> {
    let log_reload = init_logging(s.log_level, s.log_json);
    let _ = Stamp::now();
    let addr = if s.host.contains(':') {
        format!("[{}]:{}", s.host, s.port) // IPv6 literal
    } else {
        format!("{}:{}", s.host, s.port)
    };
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let local: SocketAddr = listener.local_addr().map_err(|e| e.to_string())?;
    let listener = BoundedListener::new(
        listener,
        s.max_connections,
        s.idle_timeout,
        s.header_timeout,
    );
    let connections = listener.connections();

    let version = env!("CARGO_PKG_VERSION");
    let metrics = Arc::new(Metrics::new(version).map_err(|e| format!("metrics: {e}"))?);
    let budget = Arc::new(MemoryBudget::from_mb(s.max_memory_mb));
    let load = Arc::new(LoadStore::with_budget(s.load.clone(), budget.clone()));
    let cache = Arc::new(CachePool::with_budget(s.cache.clone(), budget.clone()));
    let memory = Arc::new(Evictor::new(budget, load.clone(), cache.clone()));
    let (store, retrier) = if s.store.is_redis() {
        let redis = Arc::new(
            RedisStore::open(RedisConfig {
                spec: s.store.clone(),
                op_timeout: s.store_timeout,
                connect_timeout: s.store_connect_timeout,
                key_prefix: s.store_key_prefix.clone(),
                load_ttl: s.load.req_expire,
                cache_ttl: s.cache.expire,
                max_prefixes_per_cluster: s.cache.max_entries_per_cluster,
                max_locations_per_prefix: s.cache.max_locations_per_node,
                top_k: s.cache.top_k,
            })
            .map_err(|e| format!("--store: {e}"))?,
        );
        let r = redis.clone();
        let retrier =
            Retrier::start_with(s.retry_queue_size, Duration::from_secs(1), move |k, id| {
                let r = r.clone();
                Box::pin(async move { r.delete(&id, k).await })
            });
        (Store::Redis(redis), retrier)
    } else {
        let store = Store::Memory {
            load: load.clone(),
            cache: cache.clone(),
            memory: memory.clone(),
        };
        let retrier = Retrier::start(load.clone(), s.retry_queue_size, Duration::from_secs(1));
        (store, retrier)
    };
    let instance_id = uuid::Uuid::new_v4().to_string();

    // Always present (it also counts received events); it sends only when it has peers.
    let rep = Arc::new(Replicator::new(ReplicatorConfig {
        queue_size: s.replica_queue_size,
        workers_per_peer: s.replica_workers,
        request_timeout: s.replica_request_timeout,
        dial_timeout: s.replica_dial_timeout,
        auth_token: s.auth_token.clone(),
        instance_id: instance_id.clone(),
    })?);
    // Static peers are known before the first request is served; DNS peers follow.
    rep.set_peers(&s.peers.iter().cloned().collect());
    if s.svc_disc_host.is_some() {
        tokio::spawn(replica::discovery_loop(
            rep.clone(),
            s.peers.clone(),
            s.svc_disc_host.clone(),
            s.replica_target_port,
            s.pod_ip,
            s.dns_lookup_interval,
            metrics.dns_lookup_hosts.clone(),
        ));
    }
    let replicator = Some(rep);

    // Load GC and cache GC: incremental passes on the blocking pool.
    {
        let load = load.clone();
        let every = s.load_gc_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let l = load.clone();
                match tokio::task::spawn_blocking(move || l.gc(Stamp::now(), 4096)).await {
                    Ok(r) if r.requests + r.engines + r.clusters > 0 => {
                        tracing::info!(?r, "load GC")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "load GC failed"),
                }
            }
        });
    }
    {
        let cache = cache.clone();
        let every = s.cache_gc_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let c = cache.clone();
                match tokio::task::spawn_blocking(move || c.gc(Stamp::now().mono, 4096)).await {
                    Ok(n) if n > 0 => tracing::info!(removed = n, "cache GC"),
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "cache GC failed"),
                }
            }
        });
    }

    tracing::info!(
        %local,
        auth = s.auth_token.is_some(),
        peers = ?s.peers,
        svc_disc_host = ?s.svc_disc_host,
        debug = s.debug_mode,
        max_memory_mb = s.max_memory_mb,
        header_timeout = ?s.header_timeout,
        body_timeout = ?s.body_timeout,
        store = ?s.store,
        store_timeout = ?s.store_timeout,
        "metadata-center starting"
    );
    let state = Arc::new(AppState {
        settings: s,
        store,
        load,
        cache,
        memory,
        connections: Some(connections),
        retrier,
        replicator,
        metrics: metrics.clone(),
        log_reload,
        instance_id,
    });
    let app = server::router(state).into_make_service_with_connect_info::<ConnHandle>();
    // Tests and scripts read the bound address from this line.
    println!("listening on {local}");
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    // Graceful shutdown: stop accepting, let requests in flight finish, close idle
    // connections; connections still busy after SHUTDOWN_GRACE are abandoned.
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .into_future(),
    );
    tokio::select! {
        r = &mut server => {
            return match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(format!("server error: {e}")),
                Err(e) => Err(format!("server task failed: {e}")),
            };
        }
        _ = shutdown_signal() => {}
    }
    metrics.node_alive.set(0);
    let _ = stop_tx.send(());
    match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => return Err(format!("server error: {e}")),
        Ok(Err(e)) => return Err(format!("server task failed: {e}")),
        Err(_) => {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "connections still busy at shutdown; closing them")
        }
    }
    tracing::info!("metadata-center stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn peers_get_the_default_port() {
        let f = |p| super::peer_with_port(p, 80);
        assert_eq!(f("10.0.0.1"), "10.0.0.1:80");
        assert_eq!(f("10.0.0.1:8080"), "10.0.0.1:8080");
        assert_eq!(f("fd00::1"), "[fd00::1]:80");
        assert_eq!(f("[fd00::1]"), "[fd00::1]:80");
        assert_eq!(f("[fd00::1]:9"), "[fd00::1]:9");
        assert_eq!(f("mc-0.mc"), "mc-0.mc:80");
        assert_eq!(f("mc-0.mc:8080"), "mc-0.mc:8080");
    }
}
