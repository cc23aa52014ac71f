//! Load accounting: requests in flight and prompt bytes still in prefill, per engine, per cluster.
//!
//! Semantics follow the origin (`pkg/meta/load`): duplicate adds are ignored by `request_id`; the
//! prompt part of a request is released exactly once (prompt-delete or full delete, whichever
//! comes first); requests, engines and clusters expire after `req_expire`. Differences: memory is
//! bounded (caps on requests, clusters and engines per cluster, oldest evicted first and counted),
//! and GC is incremental (bounded batches, the lock is released between them) so requests are
//! never stalled behind a long sweep.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hashbrown::HashMap;
use hashlink::LinkedHashMap;
use parking_lot::Mutex;
use serde::Serialize;

use crate::endpoint::Endpoint;

#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Request / engine / cluster TTL (origin: 660 s).
    pub req_expire: Duration,
    pub max_requests: usize,
    pub max_clusters: usize,
    pub max_engines_per_cluster: usize,
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            req_expire: Duration::from_secs(660),
            max_requests: 1_000_000,
            max_clusters: 10_000,
            max_engines_per_cluster: 10_000,
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

#[derive(Default)]
struct Inner {
    requests: LinkedHashMap<String, Req>,
    clusters: HashMap<Arc<str>, Cluster>,
    next_gen: u64,
    last_mono: Duration,
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
    pub counters: LoadCounters,
}

fn inc(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl LoadStore {
    pub fn new(cfg: LoadConfig) -> Self {
        LoadStore {
            cfg,
            inner: Mutex::new(Inner::default()),
            counters: LoadCounters::default(),
        }
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
            let Some((_, old)) = inner.requests.pop_front() else {
                break;
            };
            release(&mut inner.clusters, &old, true, now);
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
        {
            let stalest = inner
                .clusters
                .iter()
                .min_by_key(|(_, c)| c.updated)
                .map(|(k, _)| k.clone());
            if let Some(k) = stalest {
                inner.clusters.remove(&k);
                inc(&self.counters.evicted_clusters, 1);
            }
        }
        let key: Arc<str> = match inner.clusters.get_key_value(cluster) {
            Some((k, _)) => k.clone(),
            None => {
                let k: Arc<str> = Arc::from(cluster);
                inner.clusters.insert(
                    k.clone(),
                    Cluster {
                        updated: now.mono,
                        engines: HashMap::new(),
                    },
                );
                k
            }
        };
        let cl = inner.clusters.get_mut(&key).expect("present");
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
                inc(&self.counters.evicted_engines, 1);
            }
        }
        let next_gen = &mut inner.next_gen;
        let eng = cl.engines.entry(ep).or_insert_with(|| {
            *next_gen += 1;
            Engine {
                gen: *next_gen,
                queued: 0,
                prompt: 0,
                updated_wall_ns: now.wall_ns,
                updated: now.mono,
            }
        });
        (key, eng.gen)
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
        if req.prompt_left > 0 {
            inc(&self.counters.prompt_released, 1);
        }
        release(&mut inner.clusters, &req, true, now);
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
            release(&mut inner.clusters, &snapshot, false, now);
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

    /// All clusters and engines (for metrics).
    pub fn snapshot(&self) -> Vec<(String, Vec<EngineView>)> {
        let g = self.inner.lock();
        g.clusters
            .iter()
            .map(|(k, c)| {
                (
                    k.to_string(),
                    c.engines.iter().map(|(ep, e)| view(ep, e)).collect(),
                )
            })
            .collect()
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
                let (_, r) = inner.requests.pop_front().expect("front exists");
                release(&mut inner.clusters, &r, true, now);
                n += 1;
            }
            report.requests += n;
            if n < batch.max(1) {
                break;
            }
            drop(g);
            std::thread::yield_now();
        }
        let mut g = self.inner.lock();
        g.clusters.retain(|_, cl| {
            if cl.updated + ttl <= now.mono {
                report.clusters += 1;
                return false;
            }
            cl.engines.retain(|_, e| {
                let keep = e.updated + ttl > now.mono;
                report.engines += usize::from(!keep);
                keep
            });
            true
        });
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
/// the engine was evicted or re-created since (generation check).
fn release(clusters: &mut HashMap<Arc<str>, Cluster>, r: &Req, dequeue: bool, now: Stamp) {
    let Some(cl) = clusters.get_mut(&r.cluster) else {
        return;
    };
    let Some(e) = cl.engines.get_mut(&r.engine) else {
        return;
    };
    if e.gen != r.engine_gen {
        return;
    }
    cl.updated = now.mono;
    if dequeue {
        e.queued = (e.queued - 1).max(0);
    }
    e.prompt = (e.prompt - r.prompt_left).max(0);
    e.updated = now.mono;
    e.updated_wall_ns = now.wall_ns;
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
