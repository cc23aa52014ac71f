//! The HTTP API (axum), wire-compatible with the aigw metadata-center. This file builds the
//! router: which routes exist and which layers wrap them. The rest of the server, by job:
//!
//! * `state`: the application state handed to every handler, and the trace id;
//! * `middleware`: connection tracking, trace id, request metrics and access log, body limit
//!   and deadline, panic catcher, bearer-token check, 404;
//! * `load_api`: `/v1/load/stats`, `/v1/load/prompt` (and the broadcast to replication peers);
//! * `cache_api`: `/v1/cache/query`, `/v1/cache/save` and the debug endpoints;
//! * `replica_api`: `/v1/replica/event`, the replication receiver;
//! * `ops_api`: `/log/level`, `/health`, `/healthz`, `/metrics`.
//!
//! The request and response bodies are in `crate::wire`, the metrics rendering in
//! `crate::metrics`. Dependencies run one way: this file → the handler files → `state`.

mod cache_api;
mod load_api;
mod middleware;
mod ops_api;
mod replica_api;
mod state;

use std::sync::Arc;

use axum::middleware::{from_fn, from_fn_with_state};
use axum::routing::{delete, get, post};
use axum::Router;

use cache_api::{cache_query, cache_save, debug_force_gc, debug_model_tree};
use load_api::{add_request, delete_prompt, delete_request, query_load};
use middleware::{
    auth, not_found, panic_response, read_body, record_metrics, trace, track_request,
};
use ops_api::{health, log_level, metrics};
use replica_api::replica_event;

pub use middleware::MAX_BODY_BYTES;
pub use state::{AppState, LogReload, TraceId};
// The request bodies, here as well for the fuzz target (`fuzz/fuzz_targets/metadata_center.rs`).
pub use crate::wire::{CacheQuery, CacheSave, DeleteRequest, InferenceRequest};

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
        .route_layer(from_fn_with_state(state.clone(), read_body))
        .route_layer(from_fn_with_state(state.clone(), auth));
    Router::new()
        .merge(api)
        .merge(open)
        .fallback(not_found)
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            panic_response,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(from_fn_with_state(state.clone(), record_metrics))
        .layer(from_fn(trace))
        .layer(from_fn(track_request))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::MemoryBudget;
    use crate::cache::CachePool;
    use crate::config::Settings;
    use crate::load::LoadStore;
    use crate::memory::Evictor;
    use crate::metrics::Metrics;
    use crate::retry::Retrier;
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
        let memory = Arc::new(Evictor::new(budget, load.clone(), cache.clone()));
        let state = Arc::new(AppState {
            store: crate::store::Store::Memory {
                load: load.clone(),
                cache: cache.clone(),
                memory: memory.clone(),
            },
            memory,
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
