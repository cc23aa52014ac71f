//! The server's middleware, outermost first: the connection's request tracking (stops the
//! listener's header deadline), the trace id, the request metrics and access log (with bounded
//! label values), the body size limit, the panic catcher; then, on the API routes only, the
//! bearer-token check and the body deadline. Also the 404 fallback.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{ConnectInfo, FromRequest, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Extension;

use super::state::{St, TraceId};
use crate::envelope::{self, ApiError, CODE_INTERNAL, CODE_UNAUTHORIZED};
use crate::listener::ConnHandle;

/// Largest request body (413 above).
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// Outermost: tell the connection that a request reached the service (its headers are
/// complete, so the listener's header deadline stops) and when it is done.
pub(super) async fn track_request(req: Request, next: Next) -> Response {
    let _serving = req
        .extensions()
        .get::<ConnectInfo<ConnHandle>>()
        .map(|c| c.0.request_started());
    next.run(req).await
}

/// Read the whole body within `HTTP.BodyTimeout` of the headers, or answer 408 and close the
/// connection. Handlers then read the buffered body; the size limit and its 413 are axum's
/// (`DefaultBodyLimit`), as before.
pub(super) async fn read_body(State(st): St, req: Request, next: Next) -> Response {
    if req.body().is_end_stream() {
        return next.run(req).await;
    }
    if req.body().size_hint().lower() > MAX_BODY_BYTES as u64 {
        // A Content-Length above the limit: answer now rather than wait for the body. (Same
        // answer as axum's when the limit is found while reading.)
        return closing(
            (
                StatusCode::PAYLOAD_TOO_LARGE,
                "Failed to buffer the request body: length limit exceeded",
            )
                .into_response(),
        );
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
            closing((StatusCode::REQUEST_TIMEOUT, "request body timeout").into_response())
        }
    }
}

/// `resp` with `connection: close`: answered before the request's body was read, so the
/// connection is closed after it (the client must not send another request on it).
fn closing(mut resp: Response) -> Response {
    resp.headers_mut()
        .insert("connection", HeaderValue::from_static("close"));
    resp
}

pub(super) fn panic_response(err: Box<dyn std::any::Any + Send + 'static>) -> Response {
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

pub(super) async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "404 page not found").into_response()
}

pub(super) async fn trace(mut req: Request, next: Next) -> Response {
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

/// The route paths of `server::router` (the debug ones too), the values of the `url` label.
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

pub(super) async fn record_metrics(State(st): St, req: Request, next: Next) -> Response {
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

pub(super) async fn auth(
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
            let resp = envelope::fail(&t.0, &e);
            return if req.body().is_end_stream() {
                resp
            } else {
                closing(resp)
            };
        }
    }
    next.run(req).await
}
