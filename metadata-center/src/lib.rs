//! llmproxy Metadata-Center: a server wire-compatible with the aigw metadata-center (load stats,
//! KV-cache index, replication), with bounded memory and Prometheus metrics.

pub mod budget;
pub mod cache;
pub mod config;
pub mod endpoint;
pub mod envelope;
pub mod listener;
pub mod load;
pub mod memory;
pub mod metrics;
pub mod replica;
pub mod retry;
pub mod server;
pub mod wire;
