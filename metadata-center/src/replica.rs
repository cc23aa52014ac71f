//! Replication to peer replicas (origin spec 1.4): after a local load change the event is sent
//! to every peer as `POST /v1/replica/event` with an `Event-Type` header; receivers apply it
//! without re-broadcasting.
//!
//! Differences from the origin (which starts one goroutine per peer per event): each peer has a
//! fixed set of workers, each with a bounded queue; an event goes to the queue chosen by its key
//! (a hash of the request id), so the events of one request reach a peer in order (an add is not
//! overtaken by its delete on the way) while different requests are sent in parallel; a full
//! queue drops the event (adds before deletes) and counts it. Each send gets one retry and a
//! whole-request timeout. Peers come from a static list and/or a DNS name re-resolved
//! periodically; a peer that turns out to be this very process (same instance id in the response)
//! is skipped from then on, so POD_IP is not required.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::RwLock;

pub const EVENT_ADD: &str = "load.stats.set";
pub const EVENT_DELETE: &str = "load.stats.delete";
pub const EVENT_DELETE_PROMPT: &str = "load.prompt.delete";
pub const INSTANCE_HEADER: &str = "x-metadata-center-instance";

#[derive(Clone)]
pub struct Event {
    /// Events with the same key (hash of the request id) are delivered in order.
    pub key: u64,
    pub kind: &'static str,
    pub body: Bytes,
    pub trace_id: String,
}

#[derive(Default)]
pub struct ReplicaCounters {
    pub sent: AtomicU64,
    pub failed: AtomicU64,
    pub retried: AtomicU64,
    pub dropped: AtomicU64,
    pub skipped_self: AtomicU64,
    pub received: AtomicU64,
}

struct Peer {
    /// One bounded queue and one worker per shard; an event goes to shard `key % shards`.
    shards: Vec<tokio::sync::mpsc::Sender<Event>>,
    is_self: Arc<AtomicBool>,
}

pub struct ReplicatorConfig {
    /// Total queue capacity per peer, split over its workers.
    pub queue_size: usize,
    pub workers_per_peer: usize,
    pub request_timeout: Duration,
    pub dial_timeout: Duration,
    pub auth_token: Option<String>,
    pub instance_id: String,
}

pub struct Replicator {
    cfg: ReplicatorConfig,
    client: reqwest::Client,
    peers: RwLock<HashMap<String, Peer>>,
    pub counters: Arc<ReplicaCounters>,
}

impl Replicator {
    pub fn new(cfg: ReplicatorConfig) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .timeout(cfg.request_timeout)
            .connect_timeout(cfg.dial_timeout)
            .tcp_keepalive(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(300))
            .no_proxy()
            .build()
            .map_err(|e| format!("replication client: {e}"))?;
        Ok(Replicator {
            cfg,
            client,
            peers: RwLock::new(HashMap::new()),
            counters: Arc::new(ReplicaCounters::default()),
        })
    }

    pub fn peer_list(&self) -> Vec<String> {
        let mut v: Vec<String> = self.peers.read().keys().cloned().collect();
        v.sort();
        v
    }

    /// Replace the peer set (addresses `host:port`). Workers of removed peers finish when their
    /// queue is dropped; new peers get a worker. Must run inside the tokio runtime.
    pub fn set_peers(&self, addrs: &BTreeSet<String>) {
        let mut peers = self.peers.write();
        peers.retain(|k, _| addrs.contains(k));
        for addr in addrs {
            if peers.contains_key(addr) {
                continue;
            }
            let is_self = Arc::new(AtomicBool::new(false));
            let workers = self.cfg.workers_per_peer.max(1);
            let per_shard = (self.cfg.queue_size / workers).max(1);
            let mut shards = Vec::with_capacity(workers);
            for _ in 0..workers {
                let (tx, rx) = tokio::sync::mpsc::channel(per_shard);
                tokio::spawn(worker(
                    self.client.clone(),
                    addr.clone(),
                    rx,
                    is_self.clone(),
                    self.counters.clone(),
                    self.cfg.auth_token.clone(),
                    self.cfg.instance_id.clone(),
                ));
                shards.push(tx);
            }
            tracing::info!(peer = %addr, workers, "replication peer added");
            peers.insert(addr.clone(), Peer { shards, is_self });
        }
    }

    /// Queue `ev` for every peer; never waits.
    pub fn broadcast(&self, ev: &Event) {
        let peers = self.peers.read();
        for p in peers.values() {
            if p.is_self.load(Ordering::Relaxed) {
                self.counters.skipped_self.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let tx = &p.shards[(ev.key % p.shards.len() as u64) as usize];
            // Under overload, adds give way first: the last tenth of a queue is kept for
            // deletes (a lost delete leaves phantom load on the peer until the TTL; a lost
            // add only makes the later deletes miss there).
            let reserve = tx.max_capacity() / 10;
            if ev.kind == EVENT_ADD && tx.capacity() <= reserve {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if tx.try_send(ev.clone()).is_err() {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn queued(&self) -> usize {
        self.peers
            .read()
            .values()
            .flat_map(|p| p.shards.iter())
            .map(|tx| tx.max_capacity() - tx.capacity())
            .sum()
    }
}

async fn worker(
    client: reqwest::Client,
    addr: String,
    mut rx: tokio::sync::mpsc::Receiver<Event>,
    is_self: Arc<AtomicBool>,
    counters: Arc<ReplicaCounters>,
    token: Option<String>,
    instance_id: String,
) {
    let url = format!("http://{addr}/v1/replica/event");
    while let Some(ev) = rx.recv().await {
        if is_self.load(Ordering::Relaxed) {
            counters.skipped_self.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let mut ok = false;
        for attempt in 0..2 {
            if attempt > 0 {
                counters.retried.fetch_add(1, Ordering::Relaxed);
            }
            let mut req = client
                .post(&url)
                .header("content-type", "application/json")
                .header("TraceId", &ev.trace_id)
                .header("Event-Type", ev.kind)
                .header(INSTANCE_HEADER, &instance_id)
                .body(ev.body.clone());
            if let Some(t) = &token {
                req = req.bearer_auth(t);
            }
            match req.send().await {
                Ok(resp) => {
                    let from_self = resp
                        .headers()
                        .get(INSTANCE_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|v| v == instance_id);
                    if from_self {
                        tracing::info!(peer = %addr, "replication peer is this instance; skipping it");
                        is_self.store(true, Ordering::Relaxed);
                        ok = true;
                        break;
                    }
                    if resp.status().as_u16() == 200 {
                        ok = true;
                        break;
                    }
                    tracing::debug!(peer = %addr, status = resp.status().as_u16(), kind = ev.kind, "replication rejected");
                }
                Err(e) => {
                    tracing::debug!(peer = %addr, error = %e, kind = ev.kind, "replication send failed")
                }
            }
        }
        if ok {
            counters.sent.fetch_add(1, Ordering::Relaxed);
        } else {
            counters.failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(peer = %addr, kind = ev.kind, trace_id = %ev.trace_id, "replication failed after retry");
        }
    }
}

/// Peer discovery: static peers plus, when `svc_host` is set, its DNS A/AAAA records on
/// `target_port`, minus `pod_ip`. Re-resolved every `interval`; a failed lookup keeps the old set.
/// The peers found are shown in `dns_hosts` (the `dns_lookup_hosts{domain,host}` gauge).
pub async fn discovery_loop(
    rep: Arc<Replicator>,
    static_peers: Vec<String>,
    svc_host: Option<String>,
    target_port: u16,
    pod_ip: Option<IpAddr>,
    interval: Duration,
    dns_hosts: prometheus::IntGaugeVec,
) {
    let base: BTreeSet<String> = static_peers.into_iter().collect();
    let mut dns: BTreeSet<String> = BTreeSet::new();
    loop {
        if let Some(host) = &svc_host {
            match tokio::net::lookup_host((host.as_str(), target_port)).await {
                Ok(addrs) => {
                    let found: BTreeSet<String> = addrs
                        .filter(|a| Some(a.ip()) != pod_ip)
                        .map(|a| a.to_string())
                        .collect();
                    if found != dns {
                        dns_hosts.reset();
                        for a in &found {
                            dns_hosts.with_label_values(&[host, a]).set(1);
                        }
                        dns = found;
                    }
                }
                Err(e) => {
                    tracing::warn!(host = %host, error = %e, "peer DNS lookup failed; keeping the previous peers")
                }
            }
        }
        let all: BTreeSet<String> = base.union(&dns).cloned().collect();
        rep.set_peers(&all);
        if svc_host.is_none() {
            return;
        }
        tokio::time::sleep(interval).await;
    }
}
