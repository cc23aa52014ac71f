//! Background threads: everything a router does on the network, off the request path.
//!
//! A router runs up to three kinds of threads, all with every signal blocked:
//!
//! The sync thread (when the Metadata-Center is enabled) owns:
//! - reporting load events to the Metadata-Center (request added at pick, prompt released at
//!   first token, request removed at finish, the prompt's prefix claimed with the add,
//!   a learned answer's chain saved at finish), fed by a bounded
//!   crossbeam channel that the request path only `try_send`s into (full → dropped, counted);
//! - polling `GET /v1/load/stats` for every recently active cluster every `load_poll_ms`, and
//!   storing what *other* gateways put on each endpoint into the endpoint's atomics, which the
//!   scorer reads without locks.
//!
//! The resolver thread (when there is a host name to resolve) owns every DNS lookup: the
//! Metadata-Center's host and the DNS clusters, whose endpoint sets it swaps.
//!
//! The engine metrics reader (`engine_metrics.enabled`) reads every endpoint's Prometheus
//! page each period: requests its engine runs and queues, stored in the endpoint.
//!
//! Lookup threads (`lookup_threads`, only when remote cache lookups are enabled) answer
//! `pick_async` / `pick_start` lookups in parallel, each within `timeout_ms`, and hand the
//! decision to the host (callback or ticket).
//!
//! Adds and cache saves go through a bounded queue and are dropped (and counted) when it is
//! full. Releases (prompt delete, delete) go through their own queue and are never dropped:
//! a lost delete would leave phantom load on the server until its TTL. There are at most two
//! per picked request, and the circuit breaker drains them fast when the server is down.
//! A request whose add was not delivered sends no deletes, and a request that finished
//! before its add went out is skipped entirely — under a backlog the queue sheds work
//! instead of growing.
//!
//! Files: `threads.rs` (spawning and stopping), `events.rs` (the request path's queue),
//! `worker.rs` (the sync thread's loop), `client.rs` (the Metadata-Center wire client),
//! `resolver.rs` (every DNS lookup, on a thread of its own), `engine_metrics.rs` (the
//! endpoints' own metrics pages, on a thread of its own), `log_writer.rs` (the request
//! log's file, on a thread of its own).
//! This module depends on the state it updates (`crate::state`), never on the router.

pub mod client;
pub mod engine_metrics;
mod events;
pub mod log_writer;
mod resolver;
mod threads;
mod worker;

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Weak};
use std::time::Duration;

use crossbeam_channel::{bounded, select, Sender};

use crate::config::MetadataCenter;
use crate::metrics::RouterMetrics;
use crate::state::{Clock, Clusters, SharedState};
use client::{Client, ServerAddrs};
pub use events::{Event, EventSender, RequestSync};
pub use resolver::Resolver;
use threads::spawn_quiet;
pub use threads::{ThreadGroup, ThreadGuard};
use worker::Worker;

/// A unit of work for a lookup thread. A job dropped without running (or while unwinding from
/// a panic) must still answer whoever waits for it.
pub trait Lookup: Send + 'static {
    /// Runs with the lookup thread's client.
    fn run(self, client: &mut Client);
}

/// Starts the resolver thread when there is a host name to resolve (see [`Resolver`]).
pub(crate) fn start_resolver(resolver: Resolver) -> std::io::Result<Option<ThreadGuard>> {
    if !resolver.has_work() {
        return Ok(None);
    }
    spawn_quiet("llmproxy-resolve", move |stop| resolver.run(stop)).map(Some)
}

/// Starts the engine metrics reader (see [`engine_metrics`]).
pub(crate) fn start_engine_metrics(
    reader: engine_metrics::EngineMetricsReader,
) -> std::io::Result<ThreadGuard> {
    spawn_quiet("llmproxy-engines", move |stop| reader.run(stop))
}

/// How often an attached router's reaper looks for dead workers in its shared region.
pub const REAP_INTERVAL: Duration = Duration::from_millis(500);

/// Starts the reaper of a shared region: every [`REAP_INTERVAL`] it takes back the share of
/// workers whose process is gone (see [`SharedState::reap_dead_workers`]).
pub(crate) fn start_reaper(shared: Arc<SharedState>) -> std::io::Result<ThreadGuard> {
    spawn_quiet("llmproxy-reap", move |stop| loop {
        match stop.recv_timeout(REAP_INTERVAL) {
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                shared.reap_dead_workers();
            }
            _ => return,
        }
    })
}

/// What the sync thread updates: the router's clusters (held weakly), metrics and clock.
pub struct SyncTarget {
    /// The clusters whose remote load is polled and whose DNS endpoints are replaced.
    pub clusters: Weak<Clusters>,
    /// Where calls are counted.
    pub metrics: Arc<RouterMetrics>,
    /// The router's clock (remote-load timestamps, cluster activity).
    pub clock: Clock,
}

/// Starts the sync thread (the Metadata-Center is enabled). Returns the request path's
/// sender and the guard that stops the thread.
pub(crate) fn start_sync(
    target: SyncTarget,
    settings: &MetadataCenter,
    addrs: &Arc<ServerAddrs>,
) -> std::io::Result<(EventSender, ThreadGuard)> {
    let (tx, rx) = bounded::<Event>(settings.queue_size.max(1));
    let (releases, release_rx) = crossbeam_channel::unbounded::<Event>();
    let client = Client::new(
        settings.clone(),
        Duration::from_millis(settings.async_timeout_ms),
        Arc::clone(addrs),
    );
    let mut worker = Worker {
        clusters: target.clusters,
        metrics: target.metrics,
        clock: target.clock,
        client,
        identity: settings.identity,
        poll_every: Duration::from_millis(settings.load_poll_ms),
    };
    let guard = spawn_quiet("llmproxy-sync", move |stop| {
        worker.run(rx, release_rx, stop)
    })?;
    Ok((EventSender::new(tx, releases), guard))
}

/// Starts `settings.lookup_threads` lookup threads sharing one queue of `capacity` jobs, each
/// with its own client (connection and circuit breaker).
pub fn start_lookups<L: Lookup>(
    settings: &MetadataCenter,
    addrs: &Arc<ServerAddrs>,
    capacity: usize,
) -> std::io::Result<(Sender<L>, ThreadGroup)> {
    let (tx, rx) = bounded::<L>(capacity);
    let mut group = ThreadGroup::default();
    for i in 0..settings.lookup_threads.max(1) {
        let rx = rx.clone();
        let mut client = Client::new(
            settings.clone(),
            Duration::from_millis(settings.timeout_ms),
            Arc::clone(addrs),
        );
        group.push(spawn_quiet(&format!("llmproxy-lookup-{i}"), move |stop| {
            loop {
                select! {
                    recv(stop) -> _ => break,
                    recv(rx) -> job => match job {
                        // A panic must not kill the thread; the job, dropped while unwinding,
                        // still answers its host (see `Lookup`).
                        Ok(job) => {
                            let run = AssertUnwindSafe(|| job.run(&mut client));
                            let _ = std::panic::catch_unwind(run);
                        }
                        Err(_) => break,
                    },
                }
            }
            // Jobs still queued at shutdown are dropped here, where each decides from local
            // data and answers its host (they hold the router, so the queue would otherwise
            // never be freed and their streams would wait forever).
            for job in rx.try_iter() {
                drop(job);
            }
        })?);
    }
    Ok((tx, group))
}
