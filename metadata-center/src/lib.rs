//! llmproxy Metadata-Center: a server wire-compatible with the aigw metadata-center (load stats,
//! KV-cache index, replication), with bounded memory and Prometheus metrics.
//!
//! Where things are (each layer uses only the ones below it):
//!
//! * `main.rs`: the binary: CLI, logging, startup (stores, replicator, GC tasks), shutdown.
//! * `server/`: the HTTP API. `mod.rs` builds the router; `state` (the app state), `middleware`,
//!   and one file per group of routes: `load_api`, `cache_api`, `replica_api`, `ops_api`.
//! * `metrics`: the Prometheus registry and the rendering of a scrape.
//! * `config`: settings from defaults, file, environment and flags.
//! * `store/`: the store the handlers call: the in-memory stores below (default) or Redis
//!   (`store/redis/`: connection, key layout, Lua scripts), chosen by `--store`.
//! * `memory`: the eviction order over both stores when the memory budget is exceeded.
//! * `retry`: the delayed retry of deletes that found no request.
//! * `wire`: the API's request and response bodies and their validation rules.
//! * `load/`: the load store (requests in flight per engine per cluster) and its clock, `Stamp`.
//! * `cache/`: the KV-cache index: the pool (`mod.rs`) of per-cluster radix trees (`tree.rs`).
//! * `budget`: the memory budget as plain accounting (the stores report their size to it).
//! * `envelope`: the response envelope, error codes and gin-style body decoding.
//! * `listener`: the TCP listener with its connection cap, idle timeout and header deadline.
//! * `replica`: replication to peers (bounded queues, DNS discovery).
//! * `endpoint`: engine addresses (IPv4, IPv6, optional port).
//!
//! Without the `server` feature (on by default) only `wire`, `envelope`'s decoding, `cache/`,
//! `budget` and `endpoint` are built: the fuzz targets' build.

pub mod budget;
pub mod cache;
pub mod endpoint;
pub mod envelope;
pub mod wire;

#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod listener;
#[cfg(feature = "server")]
pub mod load;
#[cfg(feature = "server")]
pub mod memory;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod replica;
#[cfg(feature = "server")]
pub mod retry;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod store;
