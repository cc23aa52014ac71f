//! llmproxy: an LLM inference load balancer that runs inside the proxy.
//!
//! For every OpenAI-style request the host proxy (Envoy, nginx, any C program) hands the body
//! to [`Router::pick`]: the library parses it, matches the model's routing rule, hashes the
//! prompt's prefix, and picks the replica that will answer fastest, the one that already
//! holds the prefix in its KV cache and is not drowning in prefill work. No I/O happens on
//! that path.
//!
//! Layout, by concern (each module's doc says what it owns):
//! - [`config`]: the JSON config (the origin's format plus our additions), by stage: `raw`
//!   serde shapes → `validate` / `rules` checks with JSON paths (`env` merges the
//!   environment) → the public types in `types`;
//! - [`request`]: OpenAI request parsing and the canonical prompt;
//! - [`response`]: incremental reading of OpenAI answers (assistant text, usage), to learn
//!   the next turn's prefix;
//! - [`hashing`]: cumulative prefix hashes of the prompt and their model domain;
//! - [`transcode`]: upstream rewrites (target model, LoRA, Triton) and response transcoding;
//! - [`balancer`]: pure selection algorithms (`inference_lb`, `prefix_cost`, random, round
//!   robin, least request) behind one interface (`Algorithm::select`);
//! - [`state`]: endpoints, clusters, load counters, the local prefix index and the clock;
//! - [`router`]: the request lifecycle (pick → first token → finish) tying them together:
//!   `router/pick.rs` is the pick path top down, `router/request.rs` the request handle,
//!   `router/lookup.rs` the picks that wait for a remote cache lookup;
//! - [`background`]: the library's threads: Metadata-Center reports and polls, lookups, DNS;
//!   it depends on `state`, never on `router`;
//! - [`metrics`]: the router's counters and its Prometheus page; [`prometheus`]: the text
//!   format (histograms, families, escaping);
//! - [`error`]: client-facing errors with their HTTP status and OpenAI JSON;
//! - [`ffi`]: the C ABI (`include/llmproxy.h`): the panic boundary and helpers, then one
//!   file per handle (`router`, `pick`, `request`) and `errors` for hosts' own errors.

pub mod background;
pub mod balancer;
pub mod config;
pub mod error;
pub mod ffi;
pub mod hashing;
pub mod metrics;
pub mod prometheus;
pub mod request;
pub mod response;
pub mod router;
pub mod state;
pub mod transcode;

pub use config::{Config, ConfigError};
pub use error::PickError;
pub use router::{Outcome, PendingPick, PickStart, PickedRequest, Router};
