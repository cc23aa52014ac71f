//! The Redis store: the metadata-center's load and cache state in Redis (one server or a Redis
//! Cluster), so any number of metadata-center replicas behind one address answer the same and
//! none of them holds state.
//!
//! This file owns the operations the handlers call (each one round trip to the cluster's slot,
//! plus the request-id index for the load calls, sent concurrently), their deadline and their
//! counters. A failed or late operation is answered from nothing (no load, no cache hit) and
//! counted; the handler never waits longer than `op_timeout` (a query sharing another's call,
//! a load query or a batch of cache queries, makes the call again when its maker goes away).
//! The connection is `conn`, the key layout `keys`, the Lua scripts `scripts`, the gathering of
//! concurrent cache queries into one `HMGET` `batch`, the reading of a cache query's reply
//! `walk`.

mod batch;
mod conn;
pub mod keys;
mod recent;
mod scripts;
mod walk;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::{RedisResult, Value};

use self::batch::{BatchAnswer, DistinctFields, OpenBatches, QueryBatch};
use self::conn::Conn;
use self::keys::{digest_field, prefix_digests, request_index, ClusterKeys};
use self::recent::{RecentSaves, SaveKeys};
use self::scripts::Scripts;
use self::walk::{parse_digits, walk, Ttl};
use super::StoreSpec;
use crate::cache::MaxAges;
use crate::endpoint::Endpoint;
use crate::load::{AddRequest, EngineView};
use crate::retry::RetryKind;

/// Default deadline of one store operation (`[Store] Timeout`, `--store-timeout`).
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_millis(50);
/// Default deadline of one connection attempt, DNS included (`[Store] ConnectTimeout`).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default prefix of every key (`[Store] KeyPrefix`).
pub const DEFAULT_KEY_PREFIX: &str = "llmproxy-mc";

/// Settings of the Redis store.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// `StoreSpec::Redis` or `StoreSpec::RedisCluster`.
    pub spec: StoreSpec,
    /// Deadline of each operation as the handler sees it (all its round trips).
    pub op_timeout: Duration,
    /// Deadline of one connection attempt (made in the background).
    pub connect_timeout: Duration,
    /// Prefix of every key, so several deployments can share one Redis.
    pub key_prefix: String,
    /// TTL of a request in flight that nobody deletes (`Load.ReqExpire`).
    pub load_ttl: Duration,
    /// TTL of a saved prefix (`Cache.Expire`).
    pub cache_ttl: Duration,
    /// Prefixes kept per cluster, least recently saved dropped first
    /// (`Cache.MaxEntriesPerCluster`).
    pub max_prefixes_per_cluster: usize,
    /// Locations kept per prefix, oldest dropped first (`Cache.MaxLocationsPerNode`).
    pub max_locations_per_prefix: usize,
    /// Top-K when a query asks for none (`Cache.TopK`).
    pub top_k: usize,
}

/// The operations, as counted in `metadata_center_store_ops_total{op}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Add,
    Delete,
    DeletePrompt,
    QueryLoad,
    CacheSave,
    CacheQuery,
}

impl Op {
    pub const ALL: [Op; 6] = [
        Op::Add,
        Op::Delete,
        Op::DeletePrompt,
        Op::QueryLoad,
        Op::CacheSave,
        Op::CacheQuery,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::Add => "load_add",
            Op::Delete => "load_delete",
            Op::DeletePrompt => "load_delete_prompt",
            Op::QueryLoad => "load_query",
            Op::CacheSave => "cache_save",
            Op::CacheQuery => "cache_query",
        }
    }
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// Outcomes per operation: answered, failed (Redis error, e.g. connection refused), or past
/// the deadline.
#[derive(Default)]
pub struct StoreCounters {
    ok: [AtomicU64; 6],
    error: [AtomicU64; 6],
    timeout: [AtomicU64; 6],
    /// Load queries answered by another query's call, in flight when they arrived.
    shared_load_queries: AtomicU64,
    /// Cache saves of prefixes all saved recently by this replica: no Redis call.
    skipped_saves: AtomicU64,
    /// Cache queries sent as a plain `HMGET` (the Redis clock known), no script.
    plain_cache_queries: AtomicU64,
    /// Batches of plain cache queries sent (one `HMGET` each, for one or more queries).
    cache_query_pipelines: AtomicU64,
}

impl StoreCounters {
    /// (ok, error, timeout) of `op`.
    pub fn get(&self, op: Op) -> (u64, u64, u64) {
        let i = op as usize;
        (get(&self.ok[i]), get(&self.error[i]), get(&self.timeout[i]))
    }

    /// Load queries that shared the Redis call of one in flight.
    pub fn shared_load_queries(&self) -> u64 {
        get(&self.shared_load_queries)
    }

    /// Cache saves answered without a Redis call (every prefix saved recently).
    pub fn skipped_saves(&self) -> u64 {
        get(&self.skipped_saves)
    }

    /// Cache queries sent without a script.
    pub fn plain_cache_queries(&self) -> u64 {
        get(&self.plain_cache_queries)
    }

    /// Batches that carried the plain cache queries, one `HMGET` each (fewer than the queries
    /// when several were sent together).
    pub fn cache_query_pipelines(&self) -> u64 {
        get(&self.cache_query_pipelines)
    }
}

/// Request ids this replica added recently, with their cluster: a delete that finds its
/// request here skips the index lookup (one round trip less); others ask Redis.
const RECENT_REQUESTS: usize = 65_536;

/// Prefixes this replica saved recently, per cluster and location: a save skips those it
/// wrote less than the refresh granularity ago (Redis would leave their tags as they are), so a
/// chat's next turn or a popular document costs Redis only its new chunks, or no call at all.
/// Two maps of 114,688 entries (7/8 of 131,072 buckets, the map's largest load) of 16 B of key
/// and stamp: ≈ 4.5 MB.
pub const RECENT_SAVES: usize = 2 * 114_688;

/// How long the Redis clock learned from a script's answer is used for plain cache queries.
const CLOCK_FRESH_MS: u64 = 1_000;

/// Redis's clock as this replica last saw it in a script's answer: a cache query that finds
/// it fresh reads the prefixes with a plain `HMGET` and takes its time from here.
struct RedisClock {
    epoch: std::time::Instant,
    /// Redis ms − local ms.
    offset_ms: std::sync::atomic::AtomicI64,
    /// Local ms of the last answer; 0: never.
    seen_at_ms: AtomicU64,
}

impl RedisClock {
    fn new() -> Self {
        RedisClock {
            epoch: std::time::Instant::now(),
            offset_ms: Default::default(),
            seen_at_ms: AtomicU64::new(0),
        }
    }

    fn local_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Redis's time now, if it was seen within `CLOCK_FRESH_MS`.
    fn now_ms(&self) -> Option<u64> {
        let seen = self.seen_at_ms.load(Ordering::Relaxed);
        (seen != 0 && self.local_ms().saturating_sub(seen) < CLOCK_FRESH_MS)
            .then(|| self.estimate_ms())
    }

    /// Redis's time now from the last time seen, however old (0 if never seen).
    fn estimate_ms(&self) -> u64 {
        (self.local_ms() as i64 + self.offset_ms.load(Ordering::Relaxed)).max(0) as u64
    }

    /// Redis answered that its time is `redis_ms`.
    fn saw(&self, redis_ms: u64) {
        let local = self.local_ms();
        self.offset_ms
            .store(redis_ms as i64 - local as i64, Ordering::Relaxed);
        self.seen_at_ms.store(local, Ordering::Relaxed);
    }
}

/// The answer of one load query in flight, shared by every query of the same cluster that
/// arrives before it is answered.
type SharedLoad = Arc<tokio::sync::OnceCell<Option<Vec<EngineView>>>>;

pub struct RedisStore {
    conn: Conn,
    cfg: RedisConfig,
    scripts: Scripts,
    recent: parking_lot::Mutex<hashlink::LruCache<String, Arc<str>>>,
    /// Recent saves (`RECENT_SAVES`): when each was sent, ms since `epoch`.
    saved: parking_lot::Mutex<RecentSaves>,
    epoch: std::time::Instant,
    /// Load queries in flight, per cluster (at most one entry per cluster being queried).
    loads_in_flight: parking_lot::Mutex<hashbrown::HashMap<String, SharedLoad>>,
    /// Plain cache queries about to be sent together, per cluster.
    query_batches: OpenBatches,
    clock: RedisClock,
    pub counters: StoreCounters,
}

impl RedisStore {
    /// Connects lazily: returns at once, also while Redis is down. Needs a tokio runtime.
    pub fn open(cfg: RedisConfig) -> Result<Self, String> {
        let conn = Conn::open(&cfg.spec, cfg.connect_timeout, cfg.op_timeout)?;
        Ok(RedisStore {
            conn,
            cfg,
            scripts: Scripts::new(),
            recent: parking_lot::Mutex::new(hashlink::LruCache::new(RECENT_REQUESTS)),
            saved: parking_lot::Mutex::new(RecentSaves::new(RECENT_SAVES)),
            epoch: std::time::Instant::now(),
            loads_in_flight: parking_lot::Mutex::new(hashbrown::HashMap::new()),
            query_batches: OpenBatches::default(),
            clock: RedisClock::new(),
            counters: StoreCounters::default(),
        })
    }

    pub fn config(&self) -> &RedisConfig {
        &self.cfg
    }

    fn ttl_ms(d: Duration) -> u64 {
        d.as_millis().clamp(1, u64::MAX as u128) as u64
    }

    /// Runs `fut` within the deadline; counts the outcome; `None` when it failed or was late.
    async fn run<T>(&self, op: Op, fut: impl Future<Output = RedisResult<T>>) -> Option<T> {
        self.run_for(op, 1, fut).await
    }

    /// `run` for one Redis call that carries `n` operations `op` (each is counted).
    async fn run_for<T>(
        &self,
        op: Op,
        n: u64,
        fut: impl Future<Output = RedisResult<T>>,
    ) -> Option<T> {
        let i = op as usize;
        match tokio::time::timeout(self.cfg.op_timeout, fut).await {
            Ok(Ok(v)) => {
                self.counters.ok[i].fetch_add(n, Ordering::Relaxed);
                Some(v)
            }
            // The cluster client's own response timeout (also `op_timeout`) counts as a timeout.
            Ok(Err(e)) if e.is_timeout() => {
                self.counters.timeout[i].fetch_add(n, Ordering::Relaxed);
                tracing::debug!(op = op.name(), error = %e, "redis store timeout");
                None
            }
            Ok(Err(e)) => {
                self.counters.error[i].fetch_add(n, Ordering::Relaxed);
                tracing::debug!(op = op.name(), error = %e, "redis store error");
                None
            }
            Err(_) => {
                self.counters.timeout[i].fetch_add(n, Ordering::Relaxed);
                tracing::debug!(op = op.name(), "redis store timeout");
                None
            }
        }
    }

    /// `POST /v1/load/stats`: the request in its cluster (ignored when its id is already
    /// there), and the id → cluster index the deletes need, both in one round trip.
    pub async fn add(&self, r: &AddRequest<'_>) {
        let ttl = Self::ttl_ms(self.cfg.load_ttl);
        let k = ClusterKeys::new(&self.cfg.key_prefix, r.cluster);
        let mut inv = self.scripts.add.prepare_invoke();
        inv.key(k.requests())
            .key(k.expiry())
            .key(k.engines())
            .arg(ttl)
            .arg(r.request_id)
            .arg(r.engine.to_string())
            .arg(r.prompt_length.max(0));
        let mut index = redis::cmd("SET");
        index
            .arg(request_index(&self.cfg.key_prefix, r.request_id))
            .arg(r.cluster)
            .arg("PX")
            .arg(ttl);
        self.recent
            .lock()
            .insert(r.request_id.to_string(), Arc::from(r.cluster));
        let (mut c1, mut c2) = (self.conn.clone(), self.conn.clone());
        self.run(Op::Add, async {
            let (a, b) = tokio::join!(
                inv.invoke_async::<i64>(&mut c1),
                index.query_async::<()>(&mut c2)
            );
            a.and(b)
        })
        .await;
    }

    /// `DELETE /v1/load/stats` (`RetryKind::Delete`) or `/v1/load/prompt`: finds the request's
    /// cluster (among the ids this replica added, else in the index), then releases it there. Returns whether it was found; a failed or
    /// late call answers `true` (a retry would not help).
    pub async fn delete(&self, request_id: &str, kind: RetryKind) -> bool {
        let op = match kind {
            RetryKind::Delete => Op::Delete,
            RetryKind::DeletePrompt => Op::DeletePrompt,
        };
        let ttl = Self::ttl_ms(self.cfg.load_ttl);
        let index = request_index(&self.cfg.key_prefix, request_id);
        let found = self
            .run(op, async {
                let mut c = self.conn.clone();
                let known = if kind == RetryKind::Delete {
                    self.recent.lock().remove(request_id)
                } else {
                    self.recent.lock().get(request_id).cloned()
                };
                let cluster: Option<String> = match known {
                    Some(c) => Some(c.to_string()),
                    None => redis::cmd("GET").arg(&index).query_async(&mut c).await?,
                };
                let Some(cluster) = cluster else {
                    return Ok(false);
                };
                let k = ClusterKeys::new(&self.cfg.key_prefix, &cluster);
                let full = kind == RetryKind::Delete;
                let mut inv = self.scripts.delete.prepare_invoke();
                inv.key(k.requests())
                    .key(k.expiry())
                    .key(k.engines())
                    .arg(ttl)
                    .arg(request_id)
                    .arg(if full { "1" } else { "0" });
                let found = inv.invoke_async::<i64>(&mut c).await? == 1;
                if found && full {
                    // The index goes only once the request is gone (a refused script keeps
                    // both); in the background, so the delete costs one round trip.
                    let (mut c2, timeout) = (self.conn.clone(), self.cfg.op_timeout);
                    let index = index.clone();
                    tokio::spawn(async move {
                        let mut del = redis::cmd("DEL");
                        del.arg(index);
                        let _ = tokio::time::timeout(timeout, del.query_async::<()>(&mut c2)).await;
                    });
                }
                Ok(found)
            })
            .await;
        found.unwrap_or(true)
    }

    /// `GET /v1/load/stats`: `None` for an unknown cluster, and when Redis did not answer.
    ///
    /// Queries of one cluster that arrive while another is in flight share its answer (one
    /// Redis call for all of them: many gateways poll the same cluster every few tens of ms),
    /// so an answer is never older than the call that made it. A caller that gives up (its
    /// handler dropped) leaves the call to the next one waiting; the deadline is the call's.
    pub async fn query_load(&self, cluster: &str) -> Option<Vec<EngineView>> {
        let shared = {
            let mut in_flight = self.loads_in_flight.lock();
            if let Some(s) = in_flight.get(cluster) {
                self.counters
                    .shared_load_queries
                    .fetch_add(1, Ordering::Relaxed);
                Arc::clone(s)
            } else {
                let s = SharedLoad::default();
                in_flight.insert(cluster.to_owned(), Arc::clone(&s));
                s
            }
        };
        let answer = shared
            .get_or_init(|| self.query_load_now(cluster))
            .await
            .clone();
        // answered: later queries make a new call (no poll between get_or_init and this)
        let mut in_flight = self.loads_in_flight.lock();
        if in_flight
            .get(cluster)
            .is_some_and(|s| Arc::ptr_eq(s, &shared))
        {
            in_flight.remove(cluster);
        }
        answer
    }

    /// One load query to Redis.
    async fn query_load_now(&self, cluster: &str) -> Option<Vec<EngineView>> {
        let ttl = Self::ttl_ms(self.cfg.load_ttl);
        let k = ClusterKeys::new(&self.cfg.key_prefix, cluster);
        let mut inv = self.scripts.query_load.prepare_invoke();
        inv.key(k.requests())
            .key(k.expiry())
            .key(k.engines())
            .arg(ttl);
        let mut c = self.conn.clone();
        let flat: Option<Vec<String>> = self
            .run(
                Op::QueryLoad,
                inv.invoke_async::<Option<Vec<String>>>(&mut c),
            )
            .await
            .flatten();
        let flat = flat?;
        let mut out: Vec<(Endpoint, EngineView)> = flat
            .chunks_exact(4)
            .filter_map(|c| {
                let ep: Endpoint = c[0].parse().ok()?;
                let n = |s: &str| s.parse::<i64>().unwrap_or(0);
                Some((
                    ep,
                    EngineView {
                        ip: ep.to_string(),
                        queued_req_num: n(&c[1]).clamp(0, i32::MAX as i64) as i32,
                        prompt_length: n(&c[2]).clamp(0, i32::MAX as i64) as i32,
                        updated_time: n(&c[3]),
                    },
                ))
            })
            .collect();
        out.sort_by_key(|(ep, _)| *ep);
        Some(out.into_iter().map(|(_, v)| v).collect())
    }

    /// How long a location's tag on a prefix is left as is when saved again: TTL / 16, at most
    /// 10 s (so a tag expires between TTL minus this and TTL after its last save).
    fn refresh_granularity(&self) -> u64 {
        (Self::ttl_ms(self.cfg.cache_ttl) / 16).min(10_000)
    }

    /// `POST /v1/cache/save`: tags every prefix of `hashes` with `loc`, except those this
    /// replica tagged with `loc` less than the refresh granularity ago (`RECENT_SAVES`).
    pub async fn cache_save(&self, cluster: &str, hashes: &[u64], loc: Endpoint) {
        let keys = SaveKeys::new(cluster, loc);
        let now = self.epoch.elapsed().as_millis() as u64;
        let granularity = self.refresh_granularity();
        let digests: Vec<u64> = {
            let saved = self.saved.lock();
            prefix_digests(hashes)
                .into_iter()
                .filter(|&d| !saved.is_fresh(keys.of(d), now, granularity))
                .collect()
        };
        if digests.is_empty() {
            self.counters.skipped_saves.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let k = ClusterKeys::new(&self.cfg.key_prefix, cluster);
        let mut inv = self.scripts.cache_save.prepare_invoke();
        inv.key(k.nodes())
            .key(k.lru())
            .arg(Self::ttl_ms(self.cfg.cache_ttl))
            .arg(self.cfg.max_prefixes_per_cluster.max(1))
            .arg(self.cfg.max_locations_per_prefix.max(1))
            .arg(loc.to_string())
            .arg(self.refresh_granularity());
        for &d in &digests {
            inv.arg(&digest_field(d)[..]);
        }
        let mut c = self.conn.clone();
        let answer = self
            .run(Op::CacheSave, inv.invoke_async::<(i64, u64)>(&mut c))
            .await;
        if let Some((_, redis_now)) = answer {
            self.clock.saw(redis_now);
            let mut saved = self.saved.lock();
            for d in digests {
                saved.sent(keys.of(d), now);
            }
        }
    }

    /// Clusters with plain cache queries gathered but not sent yet (none once they are answered).
    pub fn open_query_batches(&self) -> usize {
        self.query_batches.open_count()
    }

    /// Entries of the recent-saves memo (at most `RECENT_SAVES`).
    pub fn recent_saves(&self) -> usize {
        self.saved.lock().len()
    }

    /// `POST /v1/cache/query`: per location, the number of leading hashes of the query it
    /// holds; deepest first, then most recently saved, then by address; at most `top_k` (0: the
    /// configured default). Empty when Redis did not answer.
    pub async fn cache_query(
        &self,
        cluster: &str,
        hashes: &[u64],
        top_k: usize,
    ) -> Vec<(Endpoint, usize)> {
        self.cache_query_within(cluster, hashes, top_k, &MaxAges::default())
            .await
    }

    /// [`RedisStore::cache_query`] counting each location's tags older than its limit in
    /// `ages` (when shorter than the TTL) as absent: the asking gateway's `max_age_ms`.
    ///
    /// With Redis's clock known, the query is read by one plain `HMGET` with the other queries
    /// of the cluster ready at the same moment (`batch`); otherwise the
    /// `cache_query` script reads the clock with the nodes.
    pub async fn cache_query_within(
        &self,
        cluster: &str,
        hashes: &[u64],
        top_k: usize,
        ages: &MaxAges,
    ) -> Vec<(Endpoint, usize)> {
        if hashes.is_empty() {
            return Vec::new();
        }
        let fields: Vec<[u8; 16]> = prefix_digests(hashes)
            .into_iter()
            .map(digest_field)
            .collect();
        let k = if top_k == 0 { self.cfg.top_k } else { top_k };
        let ttl = Ttl {
            ms: Self::ttl_ms(self.cfg.cache_ttl),
            ages,
        };
        if self.clock.now_ms().is_some() {
            self.cache_query_batched(cluster, fields, k, ttl).await
        } else {
            self.cache_query_by_script(cluster, &fields, k, ttl).await
        }
    }

    /// A plain cache query (Redis's clock known): read by one `HMGET` with the other queries
    /// of `cluster` ready now; tags older than `ttl` allows count as absent.
    async fn cache_query_batched(
        &self,
        cluster: &str,
        fields: Vec<[u8; 16]>,
        k: usize,
        ttl: Ttl<'_>,
    ) -> Vec<(Endpoint, usize)> {
        let (batch, index) = self.query_batches.join(cluster, fields);
        // the other queries ready now run up to here and join the batch
        tokio::task::yield_now().await;
        let answer = batch
            .answer
            .get_or_init(|| self.send_query_batch(cluster, &batch))
            .await;
        let Some(answer) = answer else {
            return Vec::new();
        };
        let Some(nodes) = answer.nodes_of(index) else {
            return Vec::new();
        };
        walk(&nodes, answer.now_ms, ttl, k)
    }

    /// A cache query through the `cache_query` script, which also returns Redis's clock.
    async fn cache_query_by_script(
        &self,
        cluster: &str,
        fields: &[[u8; 16]],
        k: usize,
        ttl: Ttl<'_>,
    ) -> Vec<(Endpoint, usize)> {
        let nodes_key = ClusterKeys::new(&self.cfg.key_prefix, cluster).nodes();
        let mut inv = self.scripts.cache_query.prepare_invoke();
        inv.key(&nodes_key);
        for f in fields {
            inv.arg(&f[..]);
        }
        let mut c = self.conn.clone();
        let reply = self
            .run(
                Op::CacheQuery,
                inv.invoke_async::<Vec<Option<Vec<u8>>>>(&mut c),
            )
            .await;
        let Some(reply) = reply else {
            return Vec::new();
        };
        // `TIME` first ([seconds, microseconds]); without it the time reads as 0 (as before
        // the plain path existed) and teaches the clock nothing
        let time = |i: usize| reply.get(i).and_then(|v| parse_digits(v.as_deref()?));
        let now_ms = match (time(0), time(1)) {
            (Some(secs), Some(micros)) => {
                let now = secs * 1000 + micros / 1000;
                self.clock.saw(now);
                now
            }
            _ => 0,
        };
        let nodes: Vec<Option<&[u8]>> = reply.iter().skip(2).map(|n| n.as_deref()).collect();
        walk(&nodes, now_ms, ttl, k)
    }

    /// Sends the plain cache queries of `batch` (of `cluster`) as one `HMGET` of the distinct
    /// prefixes they ask for, closing it first: Redis's time and the values, `None` when Redis
    /// did not answer.
    async fn send_query_batch(
        &self,
        cluster: &str,
        batch: &Arc<QueryBatch>,
    ) -> Option<BatchAnswer> {
        self.query_batches.close(cluster, batch);
        let (distinct, n) = {
            let queries = batch.queries();
            (DistinctFields::of(&queries), queries.len() as u64)
        };
        let c = &self.counters;
        c.plain_cache_queries.fetch_add(n, Ordering::Relaxed);
        c.cache_query_pipelines.fetch_add(1, Ordering::Relaxed);
        // every query has a field (`cache_query_within` answers an empty one itself)
        let nodes_key = ClusterKeys::new(&self.cfg.key_prefix, cluster).nodes();
        let mut hmget = redis::cmd("HMGET");
        hmget.arg(&nodes_key);
        for f in &distinct.fields {
            hmget.arg(&f[..]);
        }
        // the clock was fresh when the queries joined, a moment ago
        let now_ms = self.clock.estimate_ms();
        let mut conn = self.conn.clone();
        self.run_for(
            Op::CacheQuery,
            n,
            hmget.query_async::<Vec<Value>>(&mut conn),
        )
        .await
        .map(|values| BatchAnswer {
            now_ms,
            values,
            slots: distinct.slots,
        })
    }
}
