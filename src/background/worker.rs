//! The sync thread's loop: reports load events to the Metadata-Center and polls the shared load
//! of active clusters into the endpoints' atomics.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{select, Receiver};

use super::client::{self, AddRequest, Client, DeleteRequest, SaveCache};
use super::events::Event;
use crate::metrics::RouterMetrics;
use crate::state::{Clock, Cluster, Clusters};

/// A cluster counts as active (and is polled) this long after its last pick.
const ACTIVE_FOR_MS: u64 = 10_000;
/// How long a stopped sync thread keeps sending the releases still queued (in the
/// background: nobody waits for it).
pub(super) const RELEASE_DRAIN: Duration = Duration::from_millis(1500);

/// The sync thread's state. It holds the clusters weakly: once the router is gone there is
/// nothing left to update.
pub(super) struct Worker {
    pub(super) clusters: Weak<Clusters>,
    pub(super) metrics: Arc<RouterMetrics>,
    pub(super) clock: Clock,
    pub(super) client: Client,
    pub(super) identity: crate::config::EndpointIdentity,
    pub(super) poll_every: Duration,
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Worker {
    pub(super) fn run(
        &mut self,
        events: Receiver<Event>,
        releases: Receiver<Event>,
        stop: Receiver<()>,
    ) {
        let mut next_poll = Instant::now();
        loop {
            if Instant::now() >= next_poll {
                self.poll_load();
                next_poll = Instant::now() + self.poll_every;
            }
            let deadline = next_poll;
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
        self.metrics.count_sync(ok);
    }

    fn handle(&mut self, e: Event) {
        let identity = self.identity;
        let client = &mut self.client;
        let ok = match e {
            Event::Add {
                req,
                cluster,
                endpoint,
                prompt_chars,
                claim,
            } => {
                let ip = endpoint.wire_id(identity);
                let save = |client: &mut Client, hashes: &[u64]| {
                    client
                        .save_cache(&SaveCache {
                            cluster: &cluster.name,
                            prompt_hash: hashes,
                            ip: &ip,
                        })
                        .is_ok()
                };
                if req.finished.load(Ordering::Relaxed) {
                    // over before it was reported: nothing to add, nothing to delete; the
                    // endpoint computed the prompt all the same
                    let Some(hashes) = claim else { return };
                    let ok = save(client, &hashes);
                    self.count(ok);
                    return;
                }
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
                if let (Ok(()), Some(hashes)) = (&result, claim) {
                    self.metrics.count_sync(true); // the add
                    save(client, &hashes)
                } else {
                    result.is_ok()
                }
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
        let Some(clusters) = self.clusters.upgrade() else {
            return;
        };
        let now_ms = self.clock.now_ms();
        let active: Vec<Arc<Cluster>> = clusters
            .all()
            .into_iter()
            .filter(|c| c.is_active(now_ms, ACTIVE_FOR_MS))
            .collect();
        drop(clusters);
        let identity = self.identity;
        let client = &mut self.client;
        for cluster in active {
            let result = client.query_load(&cluster.name);
            let ok = result.is_ok();
            if let Ok(engines) = result {
                let set = cluster.snapshot();
                let at = self.clock.now_ms();
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
            self.metrics.count_sync(ok);
        }
    }
}
