//! llmproxy: an LLM inference load balancer that runs inside the proxy.
//!
//! For every OpenAI-style request the host proxy (Envoy, nginx, any C program) hands the body
//! to [`Router::pick`]: the library parses it, matches the model's routing rule, hashes the
//! prompt's prefix, and picks the replica that will answer fastest, the one that already
//! holds the prefix in its KV cache and is not drowning in prefill work. No I/O happens on
//! that path.
//!
//! Layout, by concern:
//! - [`config`]: the JSON config (the origin's format plus our additions), by stage: `raw`
//!   serde shapes → `validate` / `rules` checks with JSON paths (`env` merges the
//!   environment) → the public types in `types`;
//! - [`request`]: OpenAI request parsing and the canonical prompt;
//! - [`hashing`]: cumulative prefix hashes of the prompt;
//! - [`transcode`]: upstream rewrites (target model, LoRA, Triton) and response transcoding;
//! - [`balancer`]: pure selection algorithms (`inference_lb`, random, round robin, least request);
//! - [`state`]: endpoints, clusters, load counters and the local prefix index;
//! - [`router`]: the request lifecycle (pick → first token → finish) tying them together;
//! - [`sync`]: the background thread: Metadata-Center reports and polls, DNS clusters;
//! - [`metrics`]: counters, histograms and Prometheus rendering;
//! - [`error`]: client-facing errors with their HTTP status and OpenAI JSON;
//! - [`ffi`]: the C ABI (`include/llmproxy.h`): the panic boundary and helpers, then one
//!   file per handle (`router`, `pick`, `request`) and `errors` for hosts' own errors.

pub mod balancer;
pub mod config;
pub mod error;
pub mod ffi;
pub mod hashing;
pub mod metrics;
pub mod request;
pub mod router;
pub mod state;
pub mod sync;
pub mod transcode;

pub use config::{Config, ConfigError};
pub use error::PickError;
pub use router::{Outcome, PendingPick, PickStart, PickedRequest, Router};
