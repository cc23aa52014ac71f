//! What the request path tells the sync thread: one event per step of a request's life
//! (added, prompt done, done, cache saved), through a bounded queue that never blocks, and a
//! separate never-dropped queue for the releases.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_channel::Sender;

use crate::state::{Cluster, Endpoint};

/// The sync identity of one upstream attempt of a request.
pub struct RequestSync {
    /// Unique request id on the wire.
    pub id: String,
    /// The server knows this request (its add was delivered).
    pub(super) delivered: AtomicBool,
    /// The request has finished on the request path (its delete is queued).
    pub(super) finished: AtomicBool,
    /// Prompt characters this router reported for it and not yet released.
    pub(super) reported_prompt: AtomicU64,
}

impl RequestSync {
    /// A new id.
    pub fn new(id: String) -> Arc<Self> {
        Arc::new(Self {
            id,
            delivered: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            reported_prompt: AtomicU64::new(0),
        })
    }

    /// Marks the request finished; call before queueing its `Done`.
    pub fn mark_finished(&self) {
        self.finished.store(true, Ordering::Relaxed);
    }
}

/// What the request path tells the sync thread.
pub enum Event {
    /// A request was picked for `endpoint`.
    Add {
        /// Request identity.
        req: Arc<RequestSync>,
        /// Its cluster.
        cluster: Arc<Cluster>,
        /// Its endpoint.
        endpoint: Arc<Endpoint>,
        /// Prompt length.
        prompt_chars: u64,
        /// With cache awareness: the prompt's prefix hashes, which the endpoint holds from
        /// now on, saved right after the add (one queue slot for both).
        claim: Option<Vec<u64>>,
    },
    /// The first token arrived: prefill is over.
    PromptDone {
        /// Request identity.
        req: Arc<RequestSync>,
        /// Its cluster.
        cluster: Arc<Cluster>,
        /// Its endpoint.
        endpoint: Arc<Endpoint>,
    },
    /// The request finished (call `RequestSync::mark_finished` first).
    Done {
        /// Request identity.
        req: Arc<RequestSync>,
        /// Its cluster.
        cluster: Arc<Cluster>,
        /// Its endpoint.
        endpoint: Arc<Endpoint>,
    },
    /// The endpoint answered successfully: it now holds these prefixes (a learned answer's
    /// chain; the prompt's own is the `claim` of its add).
    SaveCache {
        /// Cluster.
        cluster: Arc<Cluster>,
        /// Endpoint.
        endpoint: Arc<Endpoint>,
        /// Cumulative prefix hashes.
        hashes: Vec<u64>,
    },
}

/// The request path's end of the event channel.
pub struct EventSender {
    /// Adds and cache saves (bounded; dropped when full).
    tx: Sender<Event>,
    /// Releases (unbounded; never dropped).
    releases: Sender<Event>,
}

impl EventSender {
    /// The sender of the two queues: `tx` bounded (adds, cache saves), `releases` unbounded.
    pub(super) fn new(tx: Sender<Event>, releases: Sender<Event>) -> Self {
        Self { tx, releases }
    }

    /// Queues an event without ever waiting; false when it was dropped (queue full). Releases
    /// are never dropped.
    pub fn send(&self, e: Event) -> bool {
        match e {
            Event::PromptDone { .. } | Event::Done { .. } => self.releases.send(e).is_ok(),
            _ => self.tx.try_send(e).is_ok(),
        }
    }
}
