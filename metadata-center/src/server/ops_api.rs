//! Operations endpoints: `POST /log/level`, `GET /health`, `/healthz` and `/metrics` (the
//! rendering itself is `Metrics::render`).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use tracing::level_filters::LevelFilter;

use super::state::{St, TraceId};
use crate::envelope::{self, decode, ApiError, CODE_INTERNAL};
use crate::wire::LogLevelParam;

pub(super) async fn log_level(
    State(st): St,
    Extension(t): Extension<TraceId>,
    body: Bytes,
) -> Response {
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

pub(super) async fn health(Extension(t): Extension<TraceId>) -> Response {
    envelope::ok(&t.0, "ok")
}

pub(super) async fn metrics(State(st): St) -> Response {
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
