//! HTTP API (axum): routes, handlers and middleware (trace id, metrics, optional auth). The
//! request and response bodies are in `crate::wire`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{ConnectInfo, FromRequest, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Router};
use serde::Serialize;
use tracing::level_filters::LevelFilter;

use crate::cache::CachePool;
use crate::config::Settings;
use crate::envelope::{
    self, decode, decode_with, validation_error, ApiError, CODE_INTERNAL, CODE_UNAUTHORIZED,
};
use crate::listener::{ConnHandle, Connections};
use crate::load::{AddRequest, LoadStore, Retrier, RetryKind, Stamp};
use crate::memory::Evictor;
use crate::metrics::{Metrics, Sources};
use crate::replica::{self, Event, Replicator};
// The request bodies, here as well for the fuzz target (`fuzz/fuzz_targets/metadata_center.rs`).
use crate::wire::{CacheLimits, ClusterQuery, Location, Locations, LogLevelParam};
pub use crate::wire::{CacheQuery, CacheSave, DeleteRequest, InferenceRequest};

pub type LogReload = Box<dyn Fn(LevelFilter) -> Result<(), String> + Send + Sync>;

pub struct AppState {
    pub settings: Settings,
    pub load: Arc<LoadStore>,
    pub cache: Arc<CachePool>,
    /// The memory budget shared by `load` and `cache`, and its eviction order.
    pub memory: Evictor,
    /// The listener's counters and its free connection slots (for metrics).
    pub connections: Option<Connections>,
    pub retrier: Retrier,
    pub replicator: Option<Arc<Replicator>>,
    pub metrics: Arc<Metrics>,
    pub log_reload: LogReload,
    pub instance_id: String,
}

impl AppState {
    /// The limits cache bodies are validated against (`[Cache] MaxPromptHashes`).
    pub fn cache_limits(&self) -> CacheLimits {
        CacheLimits {
            max_prompt_hashes: self.settings.max_prompt_hashes,
        }
    }

    /// What a metrics scrape reads.
    pub fn sources(&self) -> Sources<'_> {
        Sources {
            load: &self.load,
            cache: &self.cache,
            budget: self.memory.budget(),
            retrier: &self.retrier,
            connections: self.connections.as_ref(),
            replicator: self.replicator.as_deref(),
        }
    }
}

type St = State<Arc<AppState>>;

#[derive(Clone)]
pub struct TraceId(pub Arc<str>);

/// Largest request body (413 above).
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Router

pub fn router(state: Arc<AppState>) -> Router {
    let mut api = Router::new()
        .route(
            "/v1/load/stats",
            get(query_load).post(add_request).delete(delete_request),
        )
        .route("/v1/load/prompt", delete(delete_prompt))
        .route("/v1/cache/query", post(cache_query))
        .route("/v1/cache/save", post(cache_save))
        .route("/v1/replica/event", post(replica_event))
        .route("/log/level", post(log_level));
    if state.settings.debug_mode {
        api = api
            .route("/cache/admin/debug/model_tree", get(debug_model_tree))
            .route("/cache/admin/debug/force_gc", post(debug_force_gc));
    }
    let open = Router::new()
        .route("/health", get(health))
        .route("/healthz", get(health))
        .route("/metrics", get(metrics));
    // Inner first: the body is read (within its deadline) only once the token was accepted.
    let api = api
        .route_layer(middleware::from_fn_with_state(state.clone(), read_body))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .merge(api)
        .merge(open)
        .fallback(not_found)
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            panic_response,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            record_metrics,
        ))
        .layer(middleware::from_fn(trace))
        .layer(middleware::from_fn(track_request))
        .with_state(state)
}

/// Outermost: tell the connection that a request reached the service (its headers are
/// complete, so the listener's header deadline stops) and when it is done.
async fn track_request(req: Request, next: Next) -> Response {
    let _serving = req
        .extensions()
        .get::<ConnectInfo<ConnHandle>>()
        .map(|c| c.0.request_started());
    next.run(req).await
}

/// Read the whole body within `HTTP.BodyTimeout` of the headers, or answer 408 and close the
/// connection. Handlers then read the buffered body; the size limit and its 413 are axum's
/// (`DefaultBodyLimit`), as before.
async fn read_body(State(st): St, req: Request, next: Next) -> Response {
    if req.body().is_end_stream() {
        return next.run(req).await;
    }
    if req.body().size_hint().lower() > MAX_BODY_BYTES as u64 {
        // A Content-Length above the limit: answer now rather than wait for the body. (Same
        // answer as axum's when the limit is found while reading.)
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            "Failed to buffer the request body: length limit exceeded",
        )
            .into_response();
    }
    let (parts, body) = req.into_parts();
    let probe = Request::from_parts(parts.clone(), body);
    match tokio::time::timeout(st.settings.body_timeout, Bytes::from_request(probe, &())).await {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Ok(Err(rejection)) => rejection.into_response(),
        Err(_) => {
            st.metrics.body_timeouts.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(path = parts.uri.path(), "request body timeout");
            let mut resp = (StatusCode::REQUEST_TIMEOUT, "request body timeout").into_response();
            resp.headers_mut()
                .insert("connection", HeaderValue::from_static("close"));
            resp
        }
    }
}

fn panic_response(err: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let reason = err
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| err.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into());
    tracing::error!(%reason, "handler panicked");
    envelope::fail(
        "",
        &ApiError {
            code: CODE_INTERNAL,
            message: "Internal server error".into(),
            reason,
        },
    )
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "404 page not found").into_response()
}

// ---------------------------------------------------------------------------------------------
// Middleware

async fn trace(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("TraceId")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let tid = TraceId(Arc::from(id.as_str()));
    req.extensions_mut().insert(tid);
    let mut resp = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("X-Trace-ID", v);
    }
    resp
}

const KNOWN_PATHS: &[&str] = &[
    "/v1/load/stats",
    "/v1/load/prompt",
    "/v1/cache/query",
    "/v1/cache/save",
    "/v1/replica/event",
    "/log/level",
    "/health",
    "/healthz",
    "/metrics",
    "/cache/admin/debug/model_tree",
    "/cache/admin/debug/force_gc",
];

/// The `method` label: the standard methods, anything else is `other`. The raw method is not a
/// label value: a client can send any token there, and every distinct value would be a new
/// series kept forever (a flood of random methods grew the server by 2 KB per request).
fn method_label(m: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// The `url` label: a route path, anything else is `other`.
fn url_label(path: &str) -> &'static str {
    KNOWN_PATHS
        .iter()
        .find(|p| **p == path)
        .copied()
        .unwrap_or("other")
}

async fn record_metrics(State(st): St, req: Request, next: Next) -> Response {
    let url = url_label(req.uri().path());
    let method = method_label(req.method());
    let trace = req.extensions().get::<TraceId>().cloned();
    let start = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    // Access log (the origin's gin log fields that apply), at debug level: `POST /log/level`
    // turns it on at run time.
    tracing::debug!(
        target: "access",
        method,
        url,
        status = %status,
        latency_us = start.elapsed().as_micros() as u64,
        trace_id = trace.as_ref().map(|t| &*t.0).unwrap_or(""),
        "request"
    );
    st.metrics
        .http_status
        .with_label_values(&[url, method, &status])
        .inc();
    if url != "/metrics" {
        st.metrics
            .http_duration_us
            .with_label_values(&[method, url])
            .observe(start.elapsed().as_secs_f64() * 1e6);
    }
    resp
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn auth(
    State(st): St,
    Extension(t): Extension<TraceId>,
    req: Request,
    next: Next,
) -> Response {
    if let Some(token) = &st.settings.auth_token {
        let given = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if !given.is_some_and(|g| ct_eq(g.as_bytes(), token.as_bytes())) {
            st.metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
            let e = ApiError {
                code: CODE_UNAUTHORIZED,
                message: "Unauthorized".into(),
                reason: "missing or invalid Authorization: Bearer token".into(),
            };
            return envelope::fail(&t.0, &e);
        }
    }
    next.run(req).await
}

// ---------------------------------------------------------------------------------------------
// Load handlers

async fn query_load(
    State(st): St,
    Extension(t): Extension<TraceId>,
    RawQuery(q): RawQuery,
) -> Response {
    let parsed: ClusterQuery = match serde_urlencoded::from_str(q.as_deref().unwrap_or("")) {
        Ok(p) => p,
        Err(e) => return envelope::fail(&t.0, &ApiError::invalid(e.to_string())),
    };
    let Some(cluster) = parsed.cluster.filter(|c| !c.is_empty()) else {
        return envelope::fail(
            &t.0,
            &validation_error("QueryLoadParam", "Cluster", "required"),
        );
    };
    envelope::ok(&t.0, st.load.query(&cluster))
}

fn now_ns() -> i64 {
    Stamp::now().wall_ns
}

/// Apply an add locally. Shared by the API and the replication receiver.
fn apply_add(st: &AppState, r: &InferenceRequest) -> Result<(), ApiError> {
    let engine = r.engine()?;
    st.load.add(
        &AddRequest {
            cluster: r.cluster.as_deref().unwrap_or_default(),
            request_id: r.request_id.as_deref().unwrap_or_default(),
            prompt_length: r.prompt_length.unwrap_or(0),
            engine,
        },
        Stamp::now(),
    );
    st.memory.enforce();
    Ok(())
}

fn apply_delete(st: &AppState, id: &str, kind: RetryKind) {
    let now = Stamp::now();
    let found = match kind {
        RetryKind::Delete => st.load.delete(id, now),
        RetryKind::DeletePrompt => st.load.delete_prompt(id, now),
    };
    if !found {
        st.retrier.schedule(kind, id);
    }
}

fn replicate<T: Serialize>(
    st: &AppState,
    kind: &'static str,
    request_id: &str,
    body: &T,
    trace: &TraceId,
) {
    if let Some(rep) = &st.replicator {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        request_id.hash(&mut h);
        match serde_json::to_vec(body) {
            Ok(b) => rep.broadcast(&Event {
                key: h.finish(),
                kind,
                body: Bytes::from(b),
                trace_id: trace.0.to_string(),
            }),
            Err(e) => tracing::error!(error = %e, "cannot encode replication event"),
        }
    }
}

async fn add_request(State(st): St, Extension(t): Extension<TraceId>, body: Bytes) -> Response {
    let mut r: InferenceRequest = match decode(&body) {
        Ok(r) => r,
        Err(e) => return envelope::fail(&t.0, &e),
    };
    if let Err(e) = apply_add(&st, &r) {
        return envelope::fail(&t.0, &e);
    }
    r.timestamp = Some(r.timestamp.filter(|ts| *ts > 0).unwrap_or_else(now_ns));
    let id = r.request_id.clone().unwrap_or_default();
    replicate(&st, replica::EVENT_ADD, &id, &r, &t);
    envelope::ok(&t.0, ())
}

async fn delete_common(st: &AppState, t: &TraceId, body: &[u8], kind: RetryKind) -> Response {
    let mut r: DeleteRequest = match decode(body) {
        Ok(r) => r,
        Err(e) => return envelope::fail(&t.0, &e),
    };
    apply_delete(st, r.request_id.as_deref().unwrap_or_default(), kind);
    r.timestamp = Some(r.timestamp.filter(|ts| *ts > 0).unwrap_or_else(now_ns));
    let ev = if kind == RetryKind::Delete {
        replica::EVENT_DELETE
    } else {
        replica::EVENT_DELETE_PROMPT
    };
    let id = r.request_id.clone().unwrap_or_default();
    replicate(st, ev, &id, &r, t);
    envelope::ok(&t.0, ())
}

async fn delete_request(State(st): St, Extension(t): Extension<TraceId>, body: Bytes) -> Response {
    delete_common(&st, &t, &body, RetryKind::Delete).await
}

async fn delete_prompt(State(st): St, Extension(t): Extension<TraceId>, body: Bytes) -> Response {
    delete_common(&st, &t, &body, RetryKind::DeletePrompt).await
}

// ---------------------------------------------------------------------------------------------
// Cache handlers

async fn cache_query(State(st): St, Extension(t): Extension<TraceId>, body: Bytes) -> Response {
    let q: CacheQuery = match decode_with(&body, &st.cache_limits()) {
        Ok(q) => q,
        Err(e) => return envelope::fail(&t.0, &e),
    };
    let found = st.cache.query(
        q.cluster.as_deref().unwrap_or_default(),
        q.prompt_hash.as_deref().unwrap_or_default(),
        q.k(),
        Stamp::now().mono,
    );
    let locations = found
        .into_iter()
        .map(|(ep, length)| Location {
            ip: ep.to_string(),
            length,
        })
        .collect();
    envelope::ok(&t.0, Locations { locations })
}

async fn cache_save(State(st): St, Extension(t): Extension<TraceId>, body: Bytes) -> Response {
    let s: CacheSave = match decode_with(&body, &st.cache_limits()) {
        Ok(s) => s,
        Err(e) => return envelope::fail(&t.0, &e),
    };
    let ep = match s.location() {
        Ok(ep) => ep,
        Err(e) => return envelope::fail(&t.0, &e),
    };
    st.cache.save(
        s.cluster.as_deref().unwrap_or_default(),
        s.prompt_hash.as_deref().unwrap_or_default(),
        ep,
        Stamp::now().mono,
    );
    st.memory.enforce();
    envelope::ok(&t.0, ())
}

// ---------------------------------------------------------------------------------------------
// Replication receiver

async fn replica_event(
    State(st): St,
    Extension(t): Extension<TraceId>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut resp = replica_apply(&st, &t, &headers, &body);
    if let Ok(v) = HeaderValue::from_str(&st.instance_id) {
        resp.headers_mut().insert(replica::INSTANCE_HEADER, v);
    }
    resp
}

fn replica_apply(st: &AppState, t: &TraceId, headers: &HeaderMap, body: &[u8]) -> Response {
    let sender = headers
        .get(replica::INSTANCE_HEADER)
        .and_then(|v| v.to_str().ok());
    if sender == Some(st.instance_id.as_str()) {
        // Sent by this process to itself (it is in its own peer list): nothing to apply.
        return envelope::ok(&t.0, ());
    }
    let Some(kind) = headers
        .get("Event-Type")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty())
    else {
        return envelope::fail(&t.0, &ApiError::invalid("missing Event-Type header"));
    };
    let handler_err = || ApiError::invalid("handler execute error");
    let ts = match kind {
        replica::EVENT_ADD => {
            let Ok(r) = decode::<InferenceRequest>(body) else {
                return envelope::fail(&t.0, &handler_err());
            };
            if apply_add(st, &r).is_err() {
                return envelope::fail(&t.0, &handler_err());
            }
            r.timestamp
        }
        replica::EVENT_DELETE | replica::EVENT_DELETE_PROMPT => {
            let Ok(r) = decode::<DeleteRequest>(body) else {
                return envelope::fail(&t.0, &handler_err());
            };
            let k = if kind == replica::EVENT_DELETE {
                RetryKind::Delete
            } else {
                RetryKind::DeletePrompt
            };
            apply_delete(st, r.request_id.as_deref().unwrap_or_default(), k);
            r.timestamp
        }
        _ => return envelope::fail(&t.0, &ApiError::invalid("Unsupported event type")),
    };
    if let Some(rep) = &st.replicator {
        rep.counters.received.fetch_add(1, Ordering::Relaxed);
    }
    if let Some(ts) = ts.filter(|ts| *ts > 0) {
        let ms = (now_ns() - ts) as f64 / 1e6;
        if ms >= 0.0 {
            st.metrics.replication_latency_ms.observe(ms);
        }
    }
    envelope::ok(&t.0, ())
}

// ---------------------------------------------------------------------------------------------
// Other endpoints

async fn log_level(State(st): St, Extension(t): Extension<TraceId>, body: Bytes) -> Response {
    let p: LogLevelParam = match decode(&body) {
        Ok(p) => p,
        Err(e) => return envelope::fail(&t.0, &e),
    };
    let level = match p.level.as_deref().unwrap_or("") {
        "TRACE" => LevelFilter::TRACE,
        "DEBUG" => LevelFilter::DEBUG,
        "INFO" => LevelFilter::INFO,
        "WARN" => LevelFilter::WARN,
        "ERROR" | "FATAL" => LevelFilter::ERROR,
        _ => {
            return envelope::fail(
                &t.0,
                &ApiError::invalid(
                    "log LevelParam can only be [TRACE DEBUG INFO WARN ERROR FATAL]",
                ),
            )
        }
    };
    match (st.log_reload)(level) {
        Ok(()) => envelope::ok(&t.0, "log level updated successfully"),
        Err(e) => envelope::fail(
            &t.0,
            &ApiError {
                code: CODE_INTERNAL,
                message: "Internal server error".into(),
                reason: e,
            },
        ),
    }
}

async fn health(Extension(t): Extension<TraceId>) -> Response {
    envelope::ok(&t.0, "ok")
}

async fn metrics(State(st): St) -> Response {
    let st2 = st.clone();
    let text = tokio::task::spawn_blocking(move || st2.metrics.render(&st2.sources()))
        .await
        .unwrap_or_default();
    let mut resp = (StatusCode::OK, text).into_response();
    resp.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

// ---------------------------------------------------------------------------------------------
// Debug endpoints (METADATA_CENTER_DEBUG_MODE=true)

async fn debug_model_tree(
    State(st): St,
    Extension(t): Extension<TraceId>,
    RawQuery(q): RawQuery,
) -> Response {
    let parsed: ClusterQuery =
        serde_urlencoded::from_str(q.as_deref().unwrap_or("")).unwrap_or_default();
    let Some(cluster) = parsed.cluster.filter(|c| !c.is_empty()) else {
        return envelope::fail(
            &t.0,
            &validation_error("ModelTreeParam", "Cluster", "required"),
        );
    };
    let info: std::collections::BTreeMap<String, crate::cache::LevelStats> = st
        .cache
        .level_stats(&cluster)
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let update_time = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    envelope::ok(
        &t.0,
        serde_json::json!({ "info": info, "update_time": update_time }),
    )
}

async fn debug_force_gc(State(st): St, Extension(t): Extension<TraceId>) -> Response {
    let cache = st.cache.clone();
    let _ = tokio::task::spawn_blocking(move || cache.gc(Stamp::now().mono, 4096)).await;
    envelope::ok(&t.0, ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::MemoryBudget;
    use std::future::IntoFuture;
    use std::time::Duration;

    /// A router over fresh stores, served on an ephemeral port; returns its base URL.
    async fn serve(settings: Settings) -> String {
        let budget = Arc::new(MemoryBudget::unlimited());
        let load = Arc::new(LoadStore::with_budget(
            settings.load.clone(),
            budget.clone(),
        ));
        let cache = Arc::new(CachePool::with_budget(
            settings.cache.clone(),
            budget.clone(),
        ));
        let state = Arc::new(AppState {
            memory: Evictor::new(budget, load.clone(), cache.clone()),
            retrier: Retrier::start(load.clone(), 16, Duration::from_secs(1)),
            load,
            cache,
            settings,
            connections: None,
            replicator: None,
            metrics: Arc::new(Metrics::new("test").unwrap()),
            log_reload: Box::new(|_| Ok(())),
            instance_id: "test".into(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(axum::serve(listener, router(state)).into_future());
        format!("http://{addr}")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_server_checks_prompt_hashes_against_its_own_limit() {
        // Two servers in one process: building the second must not change the first one's
        // limit (it used to be a process-global set by `router`).
        let strict = serve(Settings {
            max_prompt_hashes: 2,
            ..Settings::default()
        })
        .await;
        let lenient = serve(Settings::default()).await;
        let client = reqwest::Client::new();
        let save = |base: &str, hashes: &str| {
            client
                .post(format!("{base}/v1/cache/save"))
                .body(format!(
                    r#"{{"cluster":"m","prompt_hash":{hashes},"ip":"10.0.0.1"}}"#
                ))
                .send()
        };
        let status = |r: reqwest::Response| r.status().as_u16();
        assert_eq!(status(save(&strict, "[1,2]").await.unwrap()), 200);
        assert_eq!(status(save(&strict, "[1,2,3]").await.unwrap()), 400);
        assert_eq!(status(save(&lenient, "[1,2,3]").await.unwrap()), 200);
        let query = client
            .post(format!("{strict}/v1/cache/query"))
            .body(r#"{"cluster":"m","prompt_hash":[1,2,3]}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(status(query), 400);
    }
}
