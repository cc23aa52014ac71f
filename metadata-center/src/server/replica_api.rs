//! The replication receiver: `POST /v1/replica/event` applies a peer's load event locally
//! (never re-broadcast) and answers with this instance's id, so a sender that reached itself
//! can tell.

use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::Response;
use axum::Extension;

use super::load_api::{apply_add, apply_delete, now_ns};
use super::state::{AppState, St, TraceId};
use crate::envelope::{self, decode, ApiError};
use crate::replica;
use crate::retry::RetryKind;
use crate::wire::{DeleteRequest, InferenceRequest};

pub(super) async fn replica_event(
    State(st): St,
    Extension(t): Extension<TraceId>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut resp = replica_apply(&st, &t, &headers, &body).await;
    if let Ok(v) = HeaderValue::from_str(&st.instance_id) {
        resp.headers_mut().insert(replica::INSTANCE_HEADER, v);
    }
    resp
}

async fn replica_apply(st: &AppState, t: &TraceId, headers: &HeaderMap, body: &[u8]) -> Response {
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
            if apply_add(st, &r).await.is_err() {
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
            apply_delete(st, r.request_id.as_deref().unwrap_or_default(), k).await;
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
