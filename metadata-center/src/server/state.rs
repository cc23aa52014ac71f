//! What every handler and middleware of the server gets: the application state (the store the
//! handlers call, the in-memory stores behind it or left empty, memory policy, replicator,
//! metrics, settings) and the request's trace id.

use std::sync::Arc;

use axum::extract::State;
use tracing::level_filters::LevelFilter;

use crate::cache::CachePool;
use crate::config::Settings;
use crate::listener::Connections;
use crate::load::LoadStore;
use crate::memory::Evictor;
use crate::metrics::{Metrics, Sources};
use crate::replica::Replicator;
use crate::retry::Retrier;
use crate::store::Store;
use crate::wire::CacheLimits;

pub type LogReload = Box<dyn Fn(LevelFilter) -> Result<(), String> + Send + Sync>;

pub struct AppState {
    pub settings: Settings,
    /// What the API handlers read and write: the in-memory `load` and `cache` below, or Redis
    /// (then those two stay empty).
    pub store: Store,
    pub load: Arc<LoadStore>,
    pub cache: Arc<CachePool>,
    /// The memory budget shared by `load` and `cache`, and its eviction order.
    pub memory: Arc<Evictor>,
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
            redis: self.store.redis(),
        }
    }
}

/// The state as handlers and middleware extract it.
pub(super) type St = State<Arc<AppState>>;

/// The request's trace id (the `TraceId` header, or a new UUID), set by `middleware::trace`.
#[derive(Clone)]
pub struct TraceId(pub Arc<str>);
