//! Load accounting: requests in flight and prompt bytes still in prefill, per engine, per cluster.
//!
//! Semantics follow the origin (`pkg/meta/load`): duplicate adds are ignored by `request_id`; the
//! prompt part of a request is released exactly once (prompt-delete or full delete, whichever
//! comes first); requests, engines and clusters expire after `req_expire`. Differences: memory is
//! bounded (caps on requests, clusters and engines per cluster, and the server-wide memory budget
//! of `crate::budget`; oldest evicted first and counted), and GC is incremental (bounded batches,
//! the lock is released between them) so requests are never stalled behind a long sweep.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hashbrown::HashMap;
use hashlink::LinkedHashMap;
use parking_lot::Mutex;
use serde::Serialize;

use crate::budget::MemoryBudget;
use crate::endpoint::Endpoint;

#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Request / engine / cluster TTL (origin: 660 s).
    pub req_expire: Duration,
    pub max_requests: usize,
    pub max_clusters: usize,
    pub max_engines_per_cluster: usize,
    /// Engines exported in the per-engine metrics (`queued_num`, `prompt_length`).
    pub max_engine_series: usize,
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            req_expire: Duration::from_secs(660),
            max_requests: 1_000_000,
            max_clusters: 10_000,
            max_engines_per_cluster: 10_000,
            max_engine_series: 10_000,
        }
    }
}

/// A point in time: monotonic (for TTLs) and wall clock (for `updated_time`).
#[derive(Clone, Copy, Debug)]
pub struct Stamp {
    pub mono: Duration,
    pub wall_ns: i64,
}

static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

impl Stamp {
    pub fn now() -> Stamp {
        let start = *START.get_or_init(Instant::now);
        let wall_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        Stamp {
            mono: start.elapsed(),
            wall_ns,
        }
    }
}

/// One engine as returned by `GET /v1/load/stats`.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct EngineView {
    pub ip: String,
    pub queued_req_num: i32,
    pub prompt_length: i32,
    /// Unix nanoseconds of the last change.
    pub updated_time: i64,
}

struct Req {
    cluster: Arc<str>,
    engine: Endpoint,
    engine_gen: u64,
    prompt_left: i64,
    created: Duration,
}

struct Engine {
    gen: u64,
    queued: i64,
    prompt: i64,
    updated_wall_ns: i64,
    updated: Duration,
}

struct Cluster {
    updated: Duration,
    engines: HashMap<Endpoint, Engine>,
}

/// Estimated bytes of one request besides its id: the entry in the ordered map (key, value,
/// links), the map's slot and the allocator's headers. Calibrated against the server's RSS.
pub const REQ_BYTES: usize =
    std::mem::size_of::<String>() + std::mem::size_of::<Req>() + 16 + 16 + 16 + 16;
/// Estimated bytes of one cluster besides its name and engines (with the engine map's first
/// allocation, room for 4).
pub const CLUSTER_BYTES: usize = std::mem::size_of::<Arc<str>>()
    + std::mem::size_of::<Cluster>()
    + 16 * 5
    + 3 * (std::mem::size_of::<Endpoint>() + std::mem::size_of::<Engine>());
/// Estimated bytes of one engine (entry plus the map's spare capacity).
pub const ENGINE_BYTES: usize =
    (std::mem::size_of::<Endpoint>() + std::mem::size_of::<Engine>() + 1) * 2;

fn req_bytes(id: &str) -> usize {
    REQ_BYTES + id.len()
}

fn cluster_bytes(name: &str, cl: &Cluster) -> usize {
    CLUSTER_BYTES + name.len() + cl.engines.len() * ENGINE_BYTES
}

#[derive(Default)]
struct Inner {
    requests: LinkedHashMap<String, Req>,
    /// Least recently touched first (every change moves a cluster to the back).
    clusters: LinkedHashMap<Arc<str>, Cluster>,
    next_gen: u64,
    last_mono: Duration,
    /// Estimated bytes held (see `REQ_BYTES`, `CLUSTER_BYTES`, `ENGINE_BYTES`).
    bytes: usize,
}

impl Inner {
    fn pop_oldest_request(&mut self) -> Option<Req> {
        let (id, r) = self.requests.pop_front()?;
        self.bytes -= req_bytes(&id);
        Some(r)
    }

    fn pop_lru_cluster(&mut self) -> Option<Cluster> {
        let (name, cl) = self.clusters.pop_front()?;
        self.bytes -= cluster_bytes(&name, &cl);
        Some(cl)
    }
}

#[derive(Default)]
pub struct LoadCounters {
    pub added: AtomicU64,
    pub duplicates: AtomicU64,
    pub deleted: AtomicU64,
    pub prompt_released: AtomicU64,
    pub misses: AtomicU64,
    pub expired_requests: AtomicU64,
    pub expired_engines: AtomicU64,
    pub expired_clusters: AtomicU64,
    pub evicted_requests: AtomicU64,
    pub evicted_engines: AtomicU64,
    pub evicted_clusters: AtomicU64,
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum AddOutcome {
    Added,
    Duplicate,
}

pub struct AddRequest<'a> {
    pub cluster: &'a str,
    pub request_id: &'a str,
    pub prompt_length: i32,
    pub engine: Endpoint,
}

pub struct LoadStore {
    cfg: LoadConfig,
    inner: Mutex<Inner>,
    budget: Arc<MemoryBudget>,
    pub counters: LoadCounters,
}

fn inc(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl LoadStore {
    /// A store with no memory budget (tests, benchmarks).
    pub fn new(cfg: LoadConfig) -> Self {
        Self::with_budget(cfg, Arc::new(MemoryBudget::unlimited()))
    }

    /// A store that reports its estimated size to `budget`.
    pub fn with_budget(cfg: LoadConfig, budget: Arc<MemoryBudget>) -> Self {
        LoadStore {
            cfg,
            inner: Mutex::new(Inner::default()),
            budget,
            counters: LoadCounters::default(),
        }
    }

    /// Evict the oldest request or the least recently touched cluster (whichever was touched
    /// longer ago) until the memory budget is back under its low watermark or the store is
    /// empty. Evictions do not refresh anything. Returns (requests, clusters) evicted. (When to
    /// call it: `crate::memory`.)
    pub fn shrink_for_budget(&self) -> (usize, usize) {
        let budget = &*self.budget;
        let mut g = self.inner.lock();
        let inner = &mut *g;
        let (mut requests, mut clusters) = (0, 0);
        let need = budget.used().saturating_sub(budget.low_watermark()) as usize;
        let start = inner.bytes;
        while start - inner.bytes < need {
            let req = inner.requests.front().map(|(_, r)| r.created);
            let cl = inner.clusters.front().map(|(_, c)| c.updated);
            match (req, cl) {
                (Some(r), c) if c.is_none_or(|c| r <= c) => {
                    let old = inner.pop_oldest_request().expect("front exists");
                    release(&mut inner.clusters, &old, true, None);
                    requests += 1;
                }
                (_, Some(_)) => {
                    inner.pop_lru_cluster();
                    clusters += 1;
                }
                _ => break,
            }
        }
        self.budget.set_load(inner.bytes);
        drop(g);
        inc(&budget.counters.requests, requests as u64);
        inc(&budget.counters.clusters, clusters as u64);
        inc(&self.counters.evicted_requests, requests as u64);
        inc(&self.counters.evicted_clusters, clusters as u64);
        (requests, clusters)
    }

    /// Estimated bytes held.
    pub fn bytes(&self) -> usize {
        self.inner.lock().bytes
    }

    pub fn config(&self) -> &LoadConfig {
        &self.cfg
    }

    /// `POST /v1/load/stats`.
    pub fn add(&self, r: &AddRequest<'_>, now: Stamp) -> AddOutcome {
        let mut g = self.inner.lock();
        let inner = &mut *g;
        // Keep the request list in creation order even if callers' stamps interleave.
        let created = now.mono.max(inner.last_mono);
        inner.last_mono = created;
        if inner.requests.contains_key(r.request_id) {
            inc(&self.counters.duplicates, 1);
            return AddOutcome::Duplicate;
        }
        while inner.requests.len() >= self.cfg.max_requests.max(1) {
            let Some(old) = inner.pop_oldest_request() else {
                break;
            };
            release(&mut inner.clusters, &old, true, Some(now));
            inc(&self.counters.evicted_requests, 1);
        }
        let (cluster_key, gen) = self.touch_engine(inner, r.cluster, r.engine, now);
        let cl = inner
            .clusters
            .get_mut(&cluster_key)
            .expect("cluster just touched");
        let eng = cl.engines.get_mut(&r.engine).expect("engine just touched");
        eng.queued += 1;
        eng.prompt += i64::from(r.prompt_length.max(0));
        eng.updated = now.mono;
        eng.updated_wall_ns = now.wall_ns;
        inner.requests.insert(
            r.request_id.to_string(),
            Req {
                cluster: cluster_key,
                engine: r.engine,
                engine_gen: gen,
                prompt_left: i64::from(r.prompt_length.max(0)),
                created,
            },
        );
        inner.bytes += req_bytes(r.request_id);
        self.budget.set_load(inner.bytes);
        inc(&self.counters.added, 1);
        AddOutcome::Added
    }

    /// Get or create the cluster and engine entries, evicting the stalest ones at the caps.
    fn touch_engine(
        &self,
        inner: &mut Inner,
        cluster: &str,
        ep: Endpoint,
        now: Stamp,
    ) -> (Arc<str>, u64) {
        if !inner.clusters.contains_key(cluster)
            && inner.clusters.len() >= self.cfg.max_clusters.max(1)
            && inner.pop_lru_cluster().is_some()
        {
            inc(&self.counters.evicted_clusters, 1);
        }
        let key: Arc<str> = match inner.clusters.get_key_value(cluster) {
            Some((k, _)) => k.clone(),
            None => {
                let k: Arc<str> = Arc::from(cluster);
                let cl = Cluster {
                    updated: now.mono,
                    engines: HashMap::new(),
                };
                inner.bytes += cluster_bytes(&k, &cl);
                inner.clusters.insert(k.clone(), cl);
                k
            }
        };
        let cl = inner.clusters.to_back(&key).expect("present");
        cl.updated = now.mono;
        if !cl.engines.contains_key(&ep)
            && cl.engines.len() >= self.cfg.max_engines_per_cluster.max(1)
        {
            let stalest = cl
                .engines
                .iter()
                .min_by_key(|(_, e)| e.updated)
                .map(|(k, _)| *k);
            if let Some(k) = stalest {
                cl.engines.remove(&k);
                inner.bytes -= ENGINE_BYTES;
                inc(&self.counters.evicted_engines, 1);
            }
        }
        let next_gen = &mut inner.next_gen;
        let mut created = false;
        let eng = cl.engines.entry(ep).or_insert_with(|| {
            *next_gen += 1;
            created = true;
            Engine {
                gen: *next_gen,
                queued: 0,
                prompt: 0,
                updated_wall_ns: now.wall_ns,
                updated: now.mono,
            }
        });
        let gen = eng.gen;
        if created {
            inner.bytes += ENGINE_BYTES;
        }
        (key, gen)
    }

    /// `DELETE /v1/load/stats`: remove the request, release its queue slot and any prompt left.
    /// Returns false when the request is unknown (the caller schedules the delayed retry).
    pub fn delete(&self, request_id: &str, now: Stamp) -> bool {
        let mut g = self.inner.lock();
        let inner = &mut *g;
        let Some(req) = inner.requests.remove(request_id) else {
            inc(&self.counters.misses, 1);
            return false;
        };
        inner.bytes -= req_bytes(request_id);
        self.budget.set_load(inner.bytes);
        if req.prompt_left > 0 {
            inc(&self.counters.prompt_released, 1);
        }
        release(&mut inner.clusters, &req, true, Some(now));
        inc(&self.counters.deleted, 1);
        true
    }

    /// `DELETE /v1/load/prompt`: release the prompt part once; the request stays queued.
    pub fn delete_prompt(&self, request_id: &str, now: Stamp) -> bool {
        let mut g = self.inner.lock();
        let inner = &mut *g;
        let Some(req) = inner.requests.get_mut(request_id) else {
            inc(&self.counters.misses, 1);
            return false;
        };
        let left = std::mem::take(&mut req.prompt_left);
        if left > 0 {
            let snapshot = Req {
                cluster: req.cluster.clone(),
                engine: req.engine,
                engine_gen: req.engine_gen,
                prompt_left: left,
                created: req.created,
            };
            release(&mut inner.clusters, &snapshot, false, Some(now));
            inc(&self.counters.prompt_released, 1);
        }
        true
    }

    /// `GET /v1/load/stats`: `None` for an unknown cluster (the origin's `data: null`).
    /// Engines are sorted by address so the answer is deterministic.
    pub fn query(&self, cluster: &str) -> Option<Vec<EngineView>> {
        let g = self.inner.lock();
        let cl = g.clusters.get(cluster)?;
        let mut out: Vec<(Endpoint, EngineView)> = cl
            .engines
            .iter()
            .map(|(ep, e)| (*ep, view(ep, e)))
            .collect();
        drop(g);
        out.sort_by_key(|(ep, _)| *ep);
        Some(out.into_iter().map(|(_, v)| v).collect())
    }

    /// Clusters and their engines for the per-engine metrics, most recently touched clusters
    /// first, whole clusters only, at most `max_engines` engines in all. Also returns the number
    /// of engines left out. (A scrape costs about 1 KB per engine series, far more than the
    /// engine itself, so the budget alone does not bound it.)
    pub fn snapshot(&self, max_engines: usize) -> (Vec<(String, Vec<EngineView>)>, usize) {
        let g = self.inner.lock();
        let mut out = Vec::new();
        let (mut taken, mut omitted) = (0, 0);
        for (k, c) in g.clusters.iter().rev() {
            if omitted > 0 || taken + c.engines.len() > max_engines {
                omitted += c.engines.len();
                continue;
            }
            taken += c.engines.len();
            out.push((
                k.to_string(),
                c.engines.iter().map(|(ep, e)| view(ep, e)).collect(),
            ));
        }
        (out, omitted)
    }

    pub fn request_count(&self) -> usize {
        self.inner.lock().requests.len()
    }

    pub fn cluster_count(&self) -> usize {
        self.inner.lock().clusters.len()
    }

    /// One GC pass (origin: every 60 s): expired requests are removed and their engines
    /// decremented, then expired clusters, then expired engines. Requests are popped oldest-first
    /// in batches of `batch`, releasing the lock between batches.
    pub fn gc(&self, now: Stamp, batch: usize) -> GcReport {
        let ttl = self.cfg.req_expire;
        let mut report = GcReport::default();
        loop {
            let mut g = self.inner.lock();
            let inner = &mut *g;
            let mut n = 0;
            while n < batch.max(1) {
                match inner.requests.front() {
                    Some((_, r)) if r.created + ttl < now.mono => {}
                    _ => break,
                }
                let r = inner.pop_oldest_request().expect("front exists");
                release(&mut inner.clusters, &r, true, Some(now));
                n += 1;
            }
            report.requests += n;
            self.budget.set_load(inner.bytes);
            if n < batch.max(1) {
                break;
            }
            drop(g);
            std::thread::yield_now();
        }
        let mut g = self.inner.lock();
        let inner = &mut *g;
        let mut freed = 0;
        inner.clusters.retain(|name, cl| {
            if cl.updated + ttl <= now.mono {
                report.clusters += 1;
                freed += cluster_bytes(name, cl);
                return false;
            }
            cl.engines.retain(|_, e| {
                let keep = e.updated + ttl > now.mono;
                if !keep {
                    report.engines += 1;
                    freed += ENGINE_BYTES;
                }
                keep
            });
            true
        });
        inner.bytes -= freed;
        self.budget.set_load(inner.bytes);
        drop(g);
        inc(&self.counters.expired_requests, report.requests as u64);
        inc(&self.counters.expired_engines, report.engines as u64);
        inc(&self.counters.expired_clusters, report.clusters as u64);
        report
    }
}

#[derive(Default, Debug, PartialEq, Eq)]
pub struct GcReport {
    pub requests: usize,
    pub engines: usize,
    pub clusters: usize,
}

fn view(ep: &Endpoint, e: &Engine) -> EngineView {
    EngineView {
        ip: ep.to_string(),
        queued_req_num: e.queued.clamp(0, i64::from(i32::MAX)) as i32,
        prompt_length: e.prompt.clamp(0, i64::from(i32::MAX)) as i32,
        updated_time: e.updated_wall_ns,
    }
}

/// Subtract a request from its engine (queue slot if `dequeue`, plus the prompt left). No-op when
/// the engine was evicted or re-created since (generation check). With `now`, the engine and
/// cluster count as touched (the cluster moves to the back of the LRU order); without it (an
/// eviction by the memory budget) their ages are left alone.
fn release(
    clusters: &mut LinkedHashMap<Arc<str>, Cluster>,
    r: &Req,
    dequeue: bool,
    now: Option<Stamp>,
) {
    let Some(cl) = clusters.get_mut(&r.cluster) else {
        return;
    };
    let Some(e) = cl.engines.get_mut(&r.engine) else {
        return;
    };
    if e.gen != r.engine_gen {
        return;
    }
    if dequeue {
        e.queued = (e.queued - 1).max(0);
    }
    e.prompt = (e.prompt - r.prompt_left).max(0);
    if let Some(now) = now {
        e.updated = now.mono;
        e.updated_wall_ns = now.wall_ns;
        cl.updated = now.mono;
        clusters.to_back(&r.cluster);
    }
}

/// Deletes that found no request are retried once, one second later (a delete can overtake its
/// add). The origin starts an unbounded timer per miss; here a bounded FIFO feeds one task, and
/// misses beyond the capacity are dropped and counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryKind {
    Delete,
    DeletePrompt,
}

pub struct Retrier {
    tx: tokio::sync::mpsc::Sender<(tokio::time::Instant, RetryKind, String)>,
    pub dropped: AtomicU64,
    pub retried_hit: Arc<AtomicU64>,
    pub retried_miss: Arc<AtomicU64>,
}

impl Retrier {
    /// Spawns the retry task on the current tokio runtime.
    pub fn start(store: Arc<LoadStore>, capacity: usize, delay: Duration) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(tokio::time::Instant, RetryKind, String)>(
            capacity.max(1),
        );
        let hit = Arc::new(AtomicU64::new(0));
        let miss = Arc::new(AtomicU64::new(0));
        let (h, m) = (hit.clone(), miss.clone());
        tokio::spawn(async move {
            while let Some((due, kind, id)) = rx.recv().await {
                tokio::time::sleep_until(due + delay).await;
                let now = Stamp::now();
                let found = match kind {
                    RetryKind::Delete => store.delete(&id, now),
                    RetryKind::DeletePrompt => store.delete_prompt(&id, now),
                };
                if found {
                    inc(&h, 1);
                } else {
                    inc(&m, 1);
                    tracing::warn!(request_id = %id, ?kind, "delete retry found no request");
                }
            }
        });
        Retrier {
            tx,
            dropped: AtomicU64::new(0),
            retried_hit: hit,
            retried_miss: miss,
        }
    }

    pub fn schedule(&self, kind: RetryKind, request_id: &str) {
        if self
            .tx
            .try_send((tokio::time::Instant::now(), kind, request_id.to_string()))
            .is_err()
        {
            inc(&self.dropped, 1);
        }
    }

    pub fn pending(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> Stamp {
        Stamp {
            mono: Duration::from_secs(secs),
            wall_ns: secs as i64 * 1_000_000_000,
        }
    }

    fn ep(s: &str) -> Endpoint {
        s.parse().unwrap()
    }

    fn add(s: &LoadStore, cluster: &str, id: &str, ip: &str, prompt: i32, t: u64) -> AddOutcome {
        s.add(
            &AddRequest {
                cluster,
                request_id: id,
                prompt_length: prompt,
                engine: ep(ip),
            },
            at(t),
        )
    }

    fn engine(s: &LoadStore, cluster: &str, ip: &str) -> Option<(i32, i32)> {
        s.query(cluster)?
            .into_iter()
            .find(|e| e.ip == ip)
            .map(|e| (e.queued_req_num, e.prompt_length))
    }

    #[test]
    fn add_query_delete_round_trip() {
        let s = LoadStore::new(LoadConfig::default());
        assert_eq!(s.query("m"), None, "unknown cluster is null");
        assert_eq!(add(&s, "m", "r1", "10.0.0.1", 100, 1), AddOutcome::Added);
        assert_eq!(add(&s, "m", "r2", "10.0.0.1", 50, 1), AddOutcome::Added);
        assert_eq!(add(&s, "m", "r3", "10.0.0.2:8000", 7, 1), AddOutcome::Added);
        assert_eq!(engine(&s, "m", "10.0.0.1"), Some((2, 150)));
        assert_eq!(engine(&s, "m", "10.0.0.2:8000"), Some((1, 7)));
        let v = s.query("m").unwrap();
        assert_eq!(v[0].updated_time, 1_000_000_000);
        assert!(s.delete("r1", at(2)));
        assert_eq!(engine(&s, "m", "10.0.0.1"), Some((1, 50)));
        assert!(s.delete("r2", at(2)));
        assert_eq!(engine(&s, "m", "10.0.0.1"), Some((0, 0)));
        assert!(!s.delete("r2", at(2)), "second delete misses");
        assert_eq!(s.counters.misses.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn duplicate_add_is_ignored() {
        let s = LoadStore::new(LoadConfig::default());
        add(&s, "m", "r1", "10.0.0.1", 100, 1);
        assert_eq!(
            add(&s, "m", "r1", "10.0.0.1", 100, 1),
            AddOutcome::Duplicate
        );
        assert_eq!(add(&s, "m", "r1", "10.0.0.9", 5, 1), AddOutcome::Duplicate);
        assert_eq!(engine(&s, "m", "10.0.0.1"), Some((1, 100)));
        assert_eq!(engine(&s, "m", "10.0.0.9"), None);
    }

    #[test]
    fn prompt_is_released_exactly_once() {
        let s = LoadStore::new(LoadConfig::default());
        add(&s, "m", "r1", "10.0.0.1", 100, 1);
        add(&s, "m", "r2", "10.0.0.1", 30, 1);
        assert!(s.delete_prompt("r1", at(2)));
        assert_eq!(
            engine(&s, "m", "10.0.0.1"),
            Some((2, 30)),
            "queue unchanged, prompt released"
        );
        assert!(s.delete_prompt("r1", at(2)), "found again, but a no-op");
        assert_eq!(engine(&s, "m", "10.0.0.1"), Some((2, 30)));
        assert!(s.delete("r1", at(3)));
        assert_eq!(
            engine(&s, "m", "10.0.0.1"),
            Some((1, 30)),
            "full delete does not release the prompt twice"
        );
        // Full delete before prompt delete: the later prompt delete misses.
        assert!(s.delete("r2", at(3)));
        assert_eq!(engine(&s, "m", "10.0.0.1"), Some((0, 0)));
        assert!(!s.delete_prompt("r2", at(3)));
    }

    #[test]
    fn gc_expires_requests_then_engines_then_clusters() {
        let cfg = LoadConfig {
            req_expire: Duration::from_secs(660),
            ..Default::default()
        };
        let s = LoadStore::new(cfg);
        add(&s, "a", "old", "10.0.0.1", 10, 0);
        add(&s, "b", "b1", "10.0.0.3", 30, 0);
        add(&s, "a", "new", "10.0.0.2", 20, 600);
        // At 660 nothing is strictly older than the TTL yet; clusters/engines use <=.
        let r = s.gc(at(661), 1);
        assert_eq!(r.requests, 2, "old and b1 expired (created + 660 < 661)");
        // The releases at 661 refreshed engine 10.0.0.1 and cluster b, so they stay.
        assert_eq!(engine(&s, "a", "10.0.0.1"), Some((0, 0)));
        assert_eq!(engine(&s, "a", "10.0.0.2"), Some((1, 20)));
        let r = s.gc(at(661 + 660), 100);
        assert_eq!(r.requests, 1);
        assert_eq!(r.clusters, 1, "b not touched since 661");
        assert_eq!(s.query("b"), None);
        // a was touched at 1321 by releasing "new", its engine 10.0.0.1 was last updated at 661.
        assert_eq!(r.engines, 1);
        assert_eq!(engine(&s, "a", "10.0.0.1"), None);
        assert_eq!(engine(&s, "a", "10.0.0.2"), Some((0, 0)));
        assert_eq!(s.request_count(), 0);
    }

    #[test]
    fn request_cap_evicts_oldest_and_releases_its_load() {
        let s = LoadStore::new(LoadConfig {
            max_requests: 3,
            ..Default::default()
        });
        for i in 0..5 {
            add(&s, "m", &format!("r{i}"), "10.0.0.1", 10, i);
        }
        assert_eq!(s.request_count(), 3);
        assert_eq!(engine(&s, "m", "10.0.0.1"), Some((3, 30)));
        assert_eq!(s.counters.evicted_requests.load(Ordering::Relaxed), 2);
        assert!(!s.delete("r0", at(9)));
        assert!(s.delete("r4", at(9)));
    }

    #[test]
    fn cluster_and_engine_caps_evict_stalest() {
        let s = LoadStore::new(LoadConfig {
            max_clusters: 2,
            max_engines_per_cluster: 2,
            ..Default::default()
        });
        add(&s, "a", "1", "10.0.0.1", 1, 1);
        add(&s, "b", "2", "10.0.0.1", 1, 2);
        add(&s, "a", "3", "10.0.0.2", 1, 3); // a is now fresher than b
        add(&s, "c", "4", "10.0.0.1", 1, 4); // evicts b
        assert_eq!(s.query("b"), None);
        assert!(s.query("a").is_some() && s.query("c").is_some());
        add(&s, "a", "5", "10.0.0.3", 1, 5); // evicts engine 10.0.0.1 of a (stalest)
        assert_eq!(engine(&s, "a", "10.0.0.1"), None);
        // The request on the evicted engine no longer touches a re-created engine of that name.
        add(&s, "a", "6", "10.0.0.1", 5, 6); // evicts 10.0.0.2
        assert!(s.delete("1", at(7)));
        assert_eq!(engine(&s, "a", "10.0.0.1"), Some((1, 5)));
        assert_eq!(s.counters.evicted_clusters.load(Ordering::Relaxed), 1);
        assert_eq!(s.counters.evicted_engines.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn metrics_snapshot_takes_the_most_recent_clusters_up_to_the_cap() {
        let s = LoadStore::new(LoadConfig::default());
        add(&s, "a", "1", "10.0.0.1", 1, 1);
        add(&s, "a", "2", "10.0.0.2", 1, 2);
        add(&s, "b", "3", "10.0.0.1", 1, 3);
        add(&s, "c", "4", "10.0.0.1", 1, 4);
        s.delete("1", at(5)); // touches a
        let names = |v: Vec<(String, Vec<EngineView>)>| -> Vec<String> {
            v.into_iter().map(|(k, _)| k).collect()
        };
        let (all, omitted) = s.snapshot(100);
        assert_eq!(
            (names(all), omitted),
            (vec!["a".into(), "c".into(), "b".into()], 0)
        );
        let (some, omitted) = s.snapshot(3);
        assert_eq!((names(some), omitted), (vec!["a".into(), "c".into()], 1));
        // Whole clusters only: a (2 engines) does not fit in 1.
        let (none, omitted) = s.snapshot(1);
        assert_eq!((names(none), omitted), (vec![], 4));
    }

    #[test]
    fn the_estimate_follows_every_change() {
        let budget = Arc::new(MemoryBudget::unlimited());
        let s = LoadStore::with_budget(
            LoadConfig {
                max_requests: 3,
                max_clusters: 2,
                max_engines_per_cluster: 2,
                req_expire: Duration::from_secs(10),
                ..Default::default()
            },
            budget.clone(),
        );
        let recount = |s: &LoadStore| {
            let g = s.inner.lock();
            let reqs: usize = g.requests.iter().map(|(id, _)| req_bytes(id)).sum();
            let cls: usize = g.clusters.iter().map(|(k, c)| cluster_bytes(k, c)).sum();
            reqs + cls
        };
        for i in 0..20u64 {
            let cluster = format!("c{}", i % 3);
            let ip = format!("10.0.0.{}", i % 4);
            add(&s, &cluster, &format!("r{i}"), &ip, 5, i);
            assert_eq!(s.bytes(), recount(&s));
            assert_eq!(budget.load_bytes() as usize, s.bytes());
            if i % 3 == 0 {
                s.delete(&format!("r{}", i - 1), at(i));
                assert_eq!(s.bytes(), recount(&s));
            }
        }
        s.gc(at(25), 2);
        assert_eq!(s.bytes(), recount(&s));
        s.gc(at(100), 2); // expires the requests (which refreshes their clusters)
        assert_eq!(s.bytes(), recount(&s));
        s.gc(at(200), 2); // then the clusters
        assert_eq!((s.bytes(), budget.load_bytes()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn delete_before_add_is_retried_once_after_a_second() {
        let s = Arc::new(LoadStore::new(LoadConfig::default()));
        let r = Retrier::start(s.clone(), 2, Duration::from_secs(1));
        assert!(!s.delete("late", Stamp::now()));
        r.schedule(RetryKind::Delete, "late");
        assert!(!s.delete_prompt("late2", Stamp::now()));
        r.schedule(RetryKind::DeletePrompt, "late2");
        r.schedule(RetryKind::Delete, "overflow-1");
        r.schedule(RetryKind::Delete, "overflow-2");
        assert!(
            r.dropped.load(Ordering::Relaxed) >= 1,
            "bounded queue drops beyond capacity"
        );
        let now = Stamp::now();
        s.add(
            &AddRequest {
                cluster: "m",
                request_id: "late",
                prompt_length: 10,
                engine: ep("10.0.0.1"),
            },
            now,
        );
        s.add(
            &AddRequest {
                cluster: "m",
                request_id: "late2",
                prompt_length: 20,
                engine: ep("10.0.0.1"),
            },
            now,
        );
        assert_eq!(engine(&s, "m", "10.0.0.1"), Some((2, 30)));
        tokio::time::sleep(Duration::from_millis(1100)).await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            engine(&s, "m", "10.0.0.1"),
            Some((1, 20 - 20)),
            "late removed, late2 prompt released"
        );
        assert_eq!(r.retried_hit.load(Ordering::Relaxed), 2);
    }

    mod model {
        //! Property: after any sequence of adds, prompt deletes and deletes (duplicates, out of
        //! order, unknown ids), every engine's counters equal the sums over the requests still
        //! held, as a plain map computes them.
        use super::*;
        use proptest::prelude::*;
        use std::collections::HashMap as Map;

        #[derive(Debug, Clone)]
        enum Op {
            Add(u8, u8, i32),
            Prompt(u8),
            Delete(u8),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                (0u8..12, 0u8..3, 0i32..1000).prop_map(|(i, e, p)| Op::Add(i, e, p)),
                (0u8..12).prop_map(Op::Prompt),
                (0u8..12).prop_map(Op::Delete),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(300))]
            #[test]
            fn counters_match_a_plain_model(ops in prop::collection::vec(op(), 1..80)) {
                let s = LoadStore::new(LoadConfig::default());
                // request id -> (engine, prompt still held)
                let mut held: Map<u8, (u8, i64)> = Map::new();
                for (step, o) in ops.iter().enumerate() {
                    let now = at(step as u64);
                    match *o {
                        Op::Add(i, e, p) => {
                            let out = s.add(&AddRequest {
                                cluster: "m",
                                request_id: &format!("r{i}"),
                                prompt_length: p,
                                engine: ep(&format!("10.0.0.{e}:80")),
                            }, now);
                            let dup = held.contains_key(&i);
                            prop_assert_eq!(out == AddOutcome::Duplicate, dup);
                            held.entry(i).or_insert((e, i64::from(p)));
                        }
                        Op::Prompt(i) => {
                            prop_assert_eq!(s.delete_prompt(&format!("r{i}"), now), held.contains_key(&i));
                            if let Some(h) = held.get_mut(&i) {
                                h.1 = 0;
                            }
                        }
                        Op::Delete(i) => {
                            prop_assert_eq!(s.delete(&format!("r{i}"), now), held.remove(&i).is_some());
                        }
                    }
                    for e in 0u8..3 {
                        let (q, p) = held.values().filter(|(he, _)| *he == e)
                            .fold((0i64, 0i64), |(q, p), (_, hp)| (q + 1, p + hp));
                        let got = engine(&s, "m", &format!("10.0.0.{e}:80"))
                            .map(|(q, p)| (i64::from(q), i64::from(p)));
                        // An engine appears with its first add and stays (until GC).
                        prop_assert_eq!(got.unwrap_or((0, 0)), (q, p), "engine {} after {:?}", e, o);
                    }
                }
                prop_assert_eq!(s.request_count(), held.len());
            }
        }
    }
}
