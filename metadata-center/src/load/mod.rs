//! Load accounting: requests in flight and prompt bytes still in prefill, per engine, per cluster.
//!
//! Semantics follow the origin (`pkg/meta/load`): duplicate adds are ignored by `request_id`; the
//! prompt part of a request is released exactly once (prompt-delete or full delete, whichever
//! comes first); requests, engines and clusters expire after `req_expire`. Differences: memory is
//! bounded (caps on requests, clusters and engines per cluster, and the server-wide memory budget
//! of `crate::budget`; oldest evicted first and counted), and GC is incremental (bounded batches,
//! the lock is released between them) so requests are never stalled behind a long sweep.
//!
//! This file owns the store (`LoadStore`: requests, clusters, engines under one lock, their byte
//! estimate reported to `crate::budget`, `shrink_for_budget` for `crate::memory`) and the clock
//! it is driven by (`Stamp`). The delayed retry of deletes that found no request is
//! `crate::retry`.

#[cfg(test)]
mod tests;

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
