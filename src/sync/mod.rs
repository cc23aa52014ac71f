//! The sync thread: everything a router does on the network, off the request path.
//!
//! One dedicated OS thread per router (all signals blocked) owns:
//! - reporting load events to the Metadata-Center (request added at pick, prompt released at
//!   first token, request removed at finish, cache saved on success), fed by a bounded
//!   crossbeam channel that the request path only `try_send`s into (full → dropped, counted);
//! - polling `GET /v1/load/stats` for every recently active cluster every `load_poll_ms`, and
//!   storing what *other* gateways put on each endpoint into the endpoint's atomics, which the
//!   scorer reads without locks;
//! - re-resolving DNS clusters and swapping their endpoint sets.
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

pub mod client;

use std::net::{SocketAddr, ToSocketAddrs};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{bounded, select, Receiver, Sender};

use crate::config::MetadataCenter;
use crate::router::RouterInner;
use crate::state::{Cluster, Endpoint};
use client::{AddRequest, Client, DeleteRequest, SaveCache, ServerAddrs};

/// A cluster counts as active (and is polled) this long after its last pick.
const ACTIVE_FOR_MS: u64 = 10_000;
/// How long a stopped sync thread keeps sending the releases still queued (in the
/// background: nobody waits for it).
const RELEASE_DRAIN: Duration = Duration::from_millis(1500);

/// The sync identity of one upstream attempt of a request.
pub struct RequestSync {
    /// Unique request id on the wire.
    pub id: String,
    /// The server knows this request (its add was delivered).
    delivered: AtomicBool,
    /// The request has finished on the request path (its delete is queued).
    finished: AtomicBool,
    /// Prompt characters this router reported for it and not yet released.
    reported_prompt: AtomicU64,
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
    /// The endpoint answered successfully: it now holds these prefixes.
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
    /// Queues an event without ever waiting; false when it was dropped (queue full). Releases
    /// are never dropped.
    pub fn send(&self, e: Event) -> bool {
        match e {
            Event::PromptDone { .. } | Event::Done { .. } => self.releases.send(e).is_ok(),
            _ => self.tx.try_send(e).is_ok(),
        }
    }
}

/// A unit of work for a lookup thread. A job dropped without running (or while unwinding from
/// a panic) must still answer whoever waits for it.
pub trait Lookup: Send + 'static {
    /// Runs with the lookup thread's client.
    fn run(self, client: &mut Client);
}

/// Background threads stopped together: dropping the group tells every thread to stop and
/// returns at once. Each thread finishes on its own (a call in progress ends within its
/// deadline, queued releases are sent within [`RELEASE_DRAIN`]) and frees what it holds; the
/// caller, often a proxy worker, never waits for one.
#[derive(Default)]
pub struct ThreadGroup(Vec<ThreadGuard>);

impl ThreadGroup {
    /// Adds a thread to the group.
    pub fn push(&mut self, guard: ThreadGuard) {
        self.0.push(guard);
    }

    /// Moves every thread of `other` into this group.
    pub fn append(&mut self, mut other: ThreadGroup) {
        self.0.append(&mut other.0);
    }
}

/// Tells a background thread to stop when dropped, without waiting for it (the thread is
/// detached and ends by itself).
pub struct ThreadGuard {
    /// Dropping the sender wakes the thread's `recv(stop)`.
    _stop: Sender<()>,
}

/// Spawns a thread with every signal blocked (the host's signal handling stays on its own
/// threads; a library thread must never receive SIGCHLD, SIGTERM, …).
fn spawn_quiet(
    name: &str,
    body: impl FnOnce(Receiver<()>) + Send + 'static,
) -> std::io::Result<ThreadGuard> {
    let (stop_tx, stop_rx) = bounded::<()>(0);
    // SAFETY: plain libc calls on a zeroed sigset; the old mask is restored right after.
    let old = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        old
    };
    let spawned = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || body(stop_rx));
    // SAFETY: restores the mask saved above.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
    }
    // The JoinHandle is dropped: the thread is detached.
    spawned?;
    Ok(ThreadGuard { _stop: stop_tx })
}

/// Starts the resolver thread of the Metadata-Center's host name when it is not a literal IP:
/// it resolves at once and then every [`client::RESOLVE_EVERY`], so that no call ever waits
/// for DNS (a black-holed resolver only delays this thread; calls use the last good
/// addresses, or fail fast until there are some).
pub(crate) fn start_resolver(addrs: &Arc<ServerAddrs>) -> std::io::Result<Option<ThreadGuard>> {
    if !addrs.needs_resolution() {
        return Ok(None);
    }
    let addrs = Arc::clone(addrs);
    spawn_quiet("llmproxy-resolve", move |stop| loop {
        addrs.refresh();
        select! {
            recv(stop) -> _ => return,
            default(client::RESOLVE_EVERY) => {}
        }
    })
    .map(Some)
}

/// Starts the sync thread. Returns the request path's sender (when the metadata-center is
/// enabled) and the guard that stops the thread.
pub(crate) fn start(
    router: Weak<RouterInner>,
    settings: &MetadataCenter,
    addrs: &Arc<ServerAddrs>,
    dns_clusters: Vec<(String, String)>,
    dns_refresh: Duration,
) -> std::io::Result<(Option<EventSender>, ThreadGuard)> {
    let (tx, rx) = bounded::<Event>(settings.queue_size.max(1));
    let (releases, release_rx) = crossbeam_channel::unbounded::<Event>();
    let sender = settings.enabled.then_some(EventSender { tx, releases });
    let client = settings.enabled.then(|| {
        Client::new(
            settings.clone(),
            Duration::from_millis(settings.async_timeout_ms),
            Arc::clone(addrs),
        )
    });
    let mut worker = Worker {
        router,
        client,
        identity: settings.identity,
        poll_every: Duration::from_millis(settings.load_poll_ms),
        dns_clusters,
        dns_refresh,
    };
    let guard = spawn_quiet("llmproxy-sync", move |stop| {
        worker.run(rx, release_rx, stop)
    })?;
    Ok((sender, guard))
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

struct Worker {
    router: Weak<RouterInner>,
    client: Option<Client>,
    identity: crate::config::EndpointIdentity,
    poll_every: Duration,
    dns_clusters: Vec<(String, String)>,
    dns_refresh: Duration,
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Worker {
    fn run(&mut self, events: Receiver<Event>, releases: Receiver<Event>, stop: Receiver<()>) {
        let mut next_poll = Instant::now();
        let mut next_dns = Instant::now();
        loop {
            let now = Instant::now();
            if !self.dns_clusters.is_empty() && now >= next_dns {
                self.resolve_dns();
                next_dns = Instant::now() + self.dns_refresh;
            }
            if self.client.is_some() && now >= next_poll {
                self.poll_load();
                next_poll = Instant::now() + self.poll_every;
            }
            let mut deadline = next_poll;
            if self.client.is_none() {
                deadline = next_dns;
            } else if !self.dns_clusters.is_empty() {
                deadline = deadline.min(next_dns);
            }
            // Releases first: they are what keeps the server's view free of phantom load.
            if let Ok(e) = releases.try_recv() {
                self.handle(e);
                continue;
            }
            let wait = deadline.saturating_duration_since(Instant::now());
            select! {
                recv(stop) -> _ => {
                    self.drain_releases(&releases, RELEASE_DRAIN);
                    return;
                }
                recv(releases) -> e => match e {
                    Ok(e) => self.handle(e),
                    Err(_) => return,
                },
                recv(events) -> e => match e {
                    Ok(e) => self.handle(e),
                    Err(_) => return,
                },
                default(wait) => {}
            }
        }
    }

    /// At shutdown: sends the releases still queued, for at most `budget` (within the stop
    /// wait), so a config reload does not leave phantom load behind.
    fn drain_releases(&mut self, releases: &Receiver<Event>, budget: Duration) {
        let until = Instant::now() + budget;
        while Instant::now() < until {
            match releases.try_recv() {
                Ok(e) => self.handle(e),
                Err(_) => return,
            }
        }
    }

    fn count(&self, ok: bool) {
        if let Some(r) = self.router.upgrade() {
            r.metrics().count_sync(ok);
        }
    }

    fn handle(&mut self, e: Event) {
        let identity = self.identity;
        let Some(client) = self.client.as_mut() else {
            return;
        };
        let ok = match e {
            Event::Add {
                req,
                cluster,
                endpoint,
                prompt_chars,
            } => {
                if req.finished.load(Ordering::Relaxed) {
                    return; // over before it was reported: nothing to add, nothing to delete
                }
                let ip = endpoint.wire_id(identity);
                let result = client.add_request(&AddRequest {
                    request_id: &req.id,
                    cluster: &cluster.name,
                    prompt_length: prompt_chars,
                    ip: &ip,
                    timestamp: unix_nanos(),
                });
                match &result {
                    Ok(()) => {
                        req.delivered.store(true, Ordering::Relaxed);
                        req.reported_prompt.store(prompt_chars, Ordering::Relaxed);
                        endpoint.reported_add(prompt_chars);
                    }
                    // A timeout may still reach a stalled server later: send the delete anyway
                    // (the server ignores deletes of requests it never saw).
                    Err(client::CallError::Transport(_)) => {
                        req.delivered.store(true, Ordering::Relaxed);
                    }
                    Err(_) => {}
                }
                result.is_ok()
            }
            Event::PromptDone {
                req,
                cluster,
                endpoint,
            } => {
                // Unknown to the server, or finished already: the delete releases the prompt.
                if !req.delivered.load(Ordering::Relaxed) || req.finished.load(Ordering::Relaxed) {
                    return;
                }
                let ok = client
                    .delete_prompt(&DeleteRequest {
                        request_id: &req.id,
                        cluster: &cluster.name,
                        timestamp: unix_nanos(),
                    })
                    .is_ok();
                if ok {
                    endpoint.reported_release(0, req.reported_prompt.swap(0, Ordering::Relaxed));
                }
                ok
            }
            Event::Done {
                req,
                cluster,
                endpoint,
            } => {
                if !req.delivered.load(Ordering::Relaxed) {
                    return;
                }
                let ok = client
                    .delete_request(&DeleteRequest {
                        request_id: &req.id,
                        cluster: &cluster.name,
                        timestamp: unix_nanos(),
                    })
                    .is_ok();
                if ok {
                    endpoint.reported_release(1, req.reported_prompt.swap(0, Ordering::Relaxed));
                }
                ok
            }
            Event::SaveCache {
                cluster,
                endpoint,
                hashes,
            } => client
                .save_cache(&SaveCache {
                    cluster: &cluster.name,
                    prompt_hash: &hashes,
                    ip: &endpoint.wire_id(identity),
                })
                .is_ok(),
        };
        self.count(ok);
    }

    /// Polls the shared load of every recently active cluster.
    fn poll_load(&mut self) {
        let Some(router) = self.router.upgrade() else {
            return;
        };
        let now_ms = router.now_ms();
        let active: Vec<Arc<Cluster>> = router
            .clusters()
            .into_iter()
            .filter(|c| c.is_active(now_ms, ACTIVE_FOR_MS))
            .collect();
        drop(router);
        let identity = self.identity;
        let weak = self.router.clone();
        let Some(client) = self.client.as_mut() else {
            return;
        };
        for cluster in active {
            let result = client.query_load(&cluster.name);
            let ok = result.is_ok();
            if let Ok(engines) = result {
                let set = cluster.snapshot();
                let at = weak.upgrade().map_or(0, |r| r.now_ms());
                for e in &set.endpoints {
                    let id = e.wire_id(identity);
                    let (q, l) = engines.iter().find(|x| x.ip == id).map_or((0, 0), |x| {
                        (
                            x.queued_req_num.max(0) as u64,
                            x.prompt_length.max(0) as u64,
                        )
                    });
                    e.set_remote_load(q, l, at);
                }
            }
            if let Some(r) = weak.upgrade() {
                r.metrics().count_sync(ok);
            }
        }
    }

    /// Re-resolves DNS clusters and swaps endpoint sets that changed.
    fn resolve_dns(&mut self) {
        for (cluster, target) in &self.dns_clusters {
            let Ok(found) = target.to_socket_addrs() else {
                continue;
            };
            let mut addrs: Vec<SocketAddr> = found.collect();
            addrs.sort();
            addrs.dedup();
            if addrs.is_empty() {
                continue; // keep the last good set
            }
            let Some(router) = self.router.upgrade() else {
                return;
            };
            router.update_dns_cluster(cluster, &addrs);
        }
    }
}
