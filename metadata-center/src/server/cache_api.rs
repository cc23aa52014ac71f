//! The cache API: `POST /v1/cache/query` and `/v1/cache/save`, and the debug endpoints
//! (`/cache/admin/debug/*`, routed only with `METADATA_CENTER_DEBUG_MODE=true`).

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::response::Response;
use axum::Extension;

use super::state::{St, TraceId};
use crate::envelope::{self, decode_with, validation_error};
use crate::load::Stamp;
use crate::wire::{CacheQuery, CacheSave, ClusterQuery, Location, Locations};

pub(super) async fn cache_query(
    State(st): St,
    Extension(t): Extension<TraceId>,
    body: Bytes,
) -> Response {
    let mut q: CacheQuery = match decode_with(&body, &st.cache_limits()) {
        Ok(q) => q,
        Err(e) => return envelope::fail(&t.0, &e),
    };
    let ages = match q.take_max_ages() {
        Ok(ages) => ages,
        Err(e) => return envelope::fail(&t.0, &e),
    };
    let found = st
        .store
        .cache_query(
            q.cluster.as_deref().unwrap_or_default(),
            q.prompt_hash.as_deref().unwrap_or_default(),
            q.k(),
            &ages,
        )
        .await;
    let locations = found
        .into_iter()
        .map(|(ep, length)| Location {
            ip: ep.to_string(),
            length,
        })
        .collect();
    envelope::ok(&t.0, Locations { locations })
}

pub(super) async fn cache_save(
    State(st): St,
    Extension(t): Extension<TraceId>,
    body: Bytes,
) -> Response {
    let s: CacheSave = match decode_with(&body, &st.cache_limits()) {
        Ok(s) => s,
        Err(e) => return envelope::fail(&t.0, &e),
    };
    let ep = match s.location() {
        Ok(ep) => ep,
        Err(e) => return envelope::fail(&t.0, &e),
    };
    st.store
        .cache_save(
            s.cluster.as_deref().unwrap_or_default(),
            s.prompt_hash.as_deref().unwrap_or_default(),
            ep,
        )
        .await;
    envelope::ok(&t.0, ())
}

// Debug endpoints (METADATA_CENTER_DEBUG_MODE=true)

pub(super) async fn debug_model_tree(
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

pub(super) async fn debug_force_gc(State(st): St, Extension(t): Extension<TraceId>) -> Response {
    let cache = st.cache.clone();
    let _ = tokio::task::spawn_blocking(move || cache.gc(Stamp::now().mono, 4096)).await;
    envelope::ok(&t.0, ())
}
