//! The load API: `GET`/`POST`/`DELETE /v1/load/stats` and `DELETE /v1/load/prompt`. Local
//! changes are broadcast to the replication peers; the apply functions are shared with the
//! replication receiver (`replica_api`).

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::response::Response;
use axum::Extension;
use serde::Serialize;

use super::state::{AppState, St, TraceId};
use crate::envelope::{self, decode, validation_error, ApiError};
use crate::load::{AddRequest, Stamp};
use crate::replica::{self, Event};
use crate::retry::RetryKind;
use crate::wire::{ClusterQuery, DeleteRequest, InferenceRequest};

pub(super) async fn query_load(
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
    envelope::ok(&t.0, st.store.query_load(&cluster).await)
}

pub(super) fn now_ns() -> i64 {
    Stamp::now().wall_ns
}

/// Apply an add to the store. Shared by the API and the replication receiver.
pub(super) async fn apply_add(st: &AppState, r: &InferenceRequest) -> Result<(), ApiError> {
    let engine = r.engine()?;
    st.store
        .add(&AddRequest {
            cluster: r.cluster.as_deref().unwrap_or_default(),
            request_id: r.request_id.as_deref().unwrap_or_default(),
            prompt_length: r.prompt_length.unwrap_or(0),
            engine,
        })
        .await;
    Ok(())
}

pub(super) async fn apply_delete(st: &AppState, id: &str, kind: RetryKind) {
    if !st.store.delete(id, kind).await {
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

pub(super) async fn add_request(
    State(st): St,
    Extension(t): Extension<TraceId>,
    body: Bytes,
) -> Response {
    let mut r: InferenceRequest = match decode(&body) {
        Ok(r) => r,
        Err(e) => return envelope::fail(&t.0, &e),
    };
    if let Err(e) = apply_add(&st, &r).await {
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
    apply_delete(st, r.request_id.as_deref().unwrap_or_default(), kind).await;
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

pub(super) async fn delete_request(
    State(st): St,
    Extension(t): Extension<TraceId>,
    body: Bytes,
) -> Response {
    delete_common(&st, &t, &body, RetryKind::Delete).await
}

pub(super) async fn delete_prompt(
    State(st): St,
    Extension(t): Extension<TraceId>,
    body: Bytes,
) -> Response {
    delete_common(&st, &t, &body, RetryKind::DeletePrompt).await
}
