//! A trivial streaming HTTP proxy with round-robin or least-request balancing, used as a
//! reference target (and to test the comparison driver without Envoy).

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::serve::ListenerExt;
use futures_util::StreamExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Policy {
    RoundRobin,
    LeastRequest,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ProxyArgs {
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:18080")]
    pub listen: String,
    /// Backend base URLs (repeat, or comma-separated).
    #[arg(long = "backend", required = true, value_delimiter = ',')]
    pub backends: Vec<String>,
    #[arg(long, value_enum, default_value_t = Policy::RoundRobin)]
    pub policy: Policy,
}

struct Shared {
    client: reqwest::Client,
    backends: Vec<String>,
    inflight: Vec<AtomicUsize>,
    next: AtomicUsize,
    policy: Policy,
}

struct InflightGuard(Arc<Shared>, usize);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight[self.1].fetch_sub(1, Ordering::Relaxed);
    }
}

fn pick(s: &Shared) -> usize {
    let n = s.backends.len();
    let start = s.next.fetch_add(1, Ordering::Relaxed) % n;
    match s.policy {
        Policy::RoundRobin => start,
        Policy::LeastRequest => (0..n)
            .map(|k| (start + k) % n)
            .min_by_key(|&i| s.inflight[i].load(Ordering::Relaxed))
            .unwrap_or(start),
    }
}

const HOP: &[&str] = &[
    "host",
    "connection",
    "content-length",
    "transfer-encoding",
    "keep-alive",
    "upgrade",
];

async fn forward(State(s): State<Arc<Shared>>, req: Request) -> Response {
    let i = pick(&s);
    s.inflight[i].fetch_add(1, Ordering::Relaxed);
    let guard = InflightGuard(s.clone(), i);
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, 64 << 20).await {
        Ok(b) => b,
        Err(e) => return (StatusCode::PAYLOAD_TOO_LARGE, e.to_string()).into_response(),
    };
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let url = format!("{}{pq}", s.backends[i]);
    let mut rb = s.client.request(parts.method.clone(), &url).body(body);
    for (k, v) in parts.headers.iter() {
        if !HOP.contains(&k.as_str()) {
            rb = rb.header(k, v);
        }
    }
    let resp = match rb.send().await {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_GATEWAY, format!("upstream {url}: {e}")).into_response(),
    };
    let mut out = Response::builder().status(resp.status());
    for (k, v) in resp.headers().iter() {
        if !HOP.contains(&k.as_str()) {
            out = out.header(k, v);
        }
    }
    let stream = resp.bytes_stream().map(move |c| {
        let _keep = &guard; // released when the body is done or dropped
        c
    });
    out.body(Body::from_stream(stream))
        .unwrap_or_else(|e| (StatusCode::BAD_GATEWAY, e.to_string()).into_response())
}

pub async fn run(a: ProxyArgs) -> Result<(), String> {
    let backends: Vec<String> = a
        .backends
        .iter()
        .map(|b| b.trim_end_matches('/').to_string())
        .filter(|b| !b.is_empty())
        .collect();
    if backends.is_empty() {
        return Err("no --backend".into());
    }
    let shared = Arc::new(Shared {
        client: crate::load::http_client()?,
        inflight: backends.iter().map(|_| AtomicUsize::new(0)).collect(),
        backends,
        next: AtomicUsize::new(0),
        policy: a.policy,
    });
    let l = tokio::net::TcpListener::bind(&a.listen)
        .await
        .map_err(|e| format!("cannot bind {}: {e}", a.listen))?;
    let local = l
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| a.listen.clone());
    let l = l.tap_io(|t| {
        let _ = t.set_nodelay(true);
    });
    println!(
        "llmproxy-sim proxy: {:?} -> {}",
        a.policy,
        shared.backends.join(" ")
    );
    println!("listening: http://{local}");
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    let app = axum::Router::new().fallback(forward).with_state(shared);
    tokio::select! {
        r = axum::serve(l, app) => r.map_err(|e| format!("proxy stopped: {e}")),
        _ = crate::server::shutdown_signal() => Ok(()),
    }
}
