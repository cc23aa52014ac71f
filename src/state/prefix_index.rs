//! The prefix index: chunk hash → endpoints that recently served a prompt with that prefix.
//!
//! One lock-free, set-associative table, the same code whether it lives in the router's own
//! memory (in-process router) or in a shared region (nginx workers, [`super::shared`]):
//! - a chunk hash maps to a set of [`WAYS`] entries; each entry holds the hash, its last use
//!   and up to [`HOLDERS_PER_ENTRY`](super::cells::HOLDERS_PER_ENTRY) holders (endpoint id + last use);
//! - a new hash takes an empty way of its set or evicts the least recently used one, so the
//!   table never grows and the index is least-recently-used within each set;
//! - entries are claimed with compare-and-swap, everything else is a plain atomic store: a
//!   reader racing a writer may see a holder a moment early or late, which only changes a
//!   routing hint, never memory safety. No lock exists, so no process can die holding one.

use std::sync::atomic::Ordering;

use super::cells::{IndexStats, Way, WAYS};
use super::EndpointSet;

/// Recency granularity: an entry's or holder's last use is rewritten only when it is older
/// than this (least-recently-used order at a 100 ms grain, and almost no writes to the cache
/// lines of hot prefixes, which every core and worker reads).
const TOUCH_MS: u64 = 100;

/// Where the table lives.
enum Memory {
    /// The router's own zeroed allocation (pages are committed as they are touched).
    Own { ways: Box<[Way]>, stats: IndexStats },
    /// A shared region (kept mapped by the `Arc`).
    Shared(std::sync::Arc<super::SharedState>),
}

/// Bounded map from chunk hash to the endpoints that recently served that prefix.
pub struct PrefixIndex {
    memory: Memory,
    sets: usize,
    /// Endpoint ids the index does not record (ids that mean nothing to other processes).
    skip_ids: u32,
}

impl PrefixIndex {
    /// An index in the router's own memory, holding at most about `capacity` chunk hashes.
    pub fn new(capacity: usize) -> Self {
        // Miri tracks every byte of an allocation: a default-sized table (12 MiB) per router
        // made its runs of the C ABI tests take tens of minutes. The code is the same.
        #[cfg(miri)]
        let capacity = capacity.min(4096);
        let sets = capacity.div_ceil(WAYS).max(1);
        Self {
            memory: Memory::Own {
                ways: zeroed_ways(sets * WAYS),
                stats: IndexStats::default(),
            },
            sets,
            skip_ids: 0,
        }
    }

    /// The index of a shared region.
    pub fn shared(state: std::sync::Arc<super::SharedState>) -> Self {
        let sets = state.index_table().0.len() / WAYS;
        Self {
            memory: Memory::Shared(state),
            sets,
            skip_ids: super::shared::PRIVATE_ID,
        }
    }

    fn table(&self) -> (&[Way], &IndexStats) {
        match &self.memory {
            Memory::Own { ways, stats } => (ways, stats),
            Memory::Shared(state) => state.index_table(),
        }
    }

    /// The ways of the set `hash` maps to.
    fn set(&self, hash: u64) -> &[Way] {
        // Multiply-shift maps the hash uniformly onto any number of sets.
        let s = ((hash as u128 * self.sets as u128) >> 64) as usize;
        &self.table().0[s * WAYS..(s + 1) * WAYS]
    }

    /// For each endpoint of `set`, how many leading chunks of `hashes` it is known to hold.
    ///
    /// Walks the prefix from the start and stops at the first chunk no endpoint of the set
    /// holds (hashes are cumulative: a longer prefix implies the shorter ones).
    pub fn matched_chunks(&self, hashes: &[u64], set: &EndpointSet) -> Vec<usize> {
        self.resident_chunks(hashes, set, 0, &[])
    }

    /// [`PrefixIndex::matched_chunks`] counting only what each endpoint likely still holds:
    /// a holder last used more than `horizon_ms[p]` before `now_ms` (`p`: its position in
    /// `set`) does not count, its engine has likely evicted the prefix since. An empty
    /// `horizon_ms` sets no limit.
    pub fn resident_chunks(
        &self,
        hashes: &[u64],
        set: &EndpointSet,
        now_ms: u64,
        horizon_ms: &[u64],
    ) -> Vec<usize> {
        let now = stamp(now_ms);
        let mut depth = vec![0usize; set.endpoints.len()];
        for (i, &h) in hashes.iter().enumerate() {
            let key = nonzero(h);
            let Some(way) = self
                .set(h)
                .iter()
                .find(|w| w.key.load(Ordering::Acquire) == key)
            else {
                break;
            };
            let mut any = false;
            for holder in &way.holders {
                let v = holder.load(Ordering::Relaxed);
                if v == 0 {
                    continue;
                }
                if let Some(&pos) = set.position.get(&((v >> 32) as u32)) {
                    let age = now.wrapping_sub(v as u32) as u64;
                    if horizon_ms.get(pos).is_some_and(|&h| age > h) {
                        continue;
                    }
                    depth[pos] = i + 1;
                    any = true;
                }
            }
            // The entry was taken over for another hash while we read it: stop here.
            if !any || way.key.load(Ordering::Acquire) != key {
                break;
            }
        }
        depth
    }

    /// What the index lists for one endpoint, whatever its age: the number of leading chunks
    /// of `hashes` it holds and how long ago (ms) the deepest of them was last used there
    /// (`(0, 0)` when it holds none). A longer prefix is never used more recently than a
    /// shorter one, so that age is the claim's oldest.
    pub fn claim_of(&self, hashes: &[u64], endpoint: u32, now_ms: u64) -> (usize, u64) {
        let now = stamp(now_ms);
        let mut claim = (0, 0);
        for (i, &h) in hashes.iter().enumerate() {
            let key = nonzero(h);
            let held = self
                .set(h)
                .iter()
                .find(|w| w.key.load(Ordering::Acquire) == key)
                .and_then(|way| {
                    (way.holders.iter())
                        .map(|holder| holder.load(Ordering::Relaxed))
                        .find(|&v| v != 0 && (v >> 32) as u32 == endpoint)
                });
            match held {
                Some(v) => claim = (i + 1, now.wrapping_sub(v as u32) as u64),
                None => break,
            }
        }
        claim
    }

    /// Records that `endpoint` now holds every prefix in `hashes`.
    pub fn record(&self, hashes: &[u64], endpoint: u32, now_ms: u64) {
        if endpoint & self.skip_ids != 0 {
            return;
        }
        let stamp = stamp(now_ms);
        let holder = (endpoint as u64) << 32 | stamp as u64;
        for &h in hashes {
            let Some(way) = self.entry(h, now_ms) else {
                continue;
            };
            set_holder(way, endpoint, holder, stamp);
        }
    }

    /// The entry of `hash`, taken (an empty way, or the set's least recently used) when the
    /// index does not hold it; its last use refreshed. None when racing writers kept every
    /// way of the set busy.
    fn entry(&self, hash: u64, now_ms: u64) -> Option<&Way> {
        let key = nonzero(hash);
        let ways = self.set(hash);
        let way = match ways.iter().find(|w| w.key.load(Ordering::Acquire) == key) {
            Some(w) => w,
            None => self.claim(ways, key, now_ms)?,
        };
        // Refreshed at most every TOUCH_MS: a hot prefix recorded by every pick would
        // otherwise bounce its cache line between all the cores (and processes) picking.
        if now_ms.saturating_sub(way.last_use.load(Ordering::Relaxed)) >= TOUCH_MS {
            way.last_use.store(now_ms.max(1), Ordering::Relaxed);
        }
        Some(way)
    }

    /// Binds `key` (a session, never a prefix hash: see [`crate::hashing::session_key`]) to
    /// `endpoint`: from now on it is the key's most recent holder ([`PrefixIndex::bound`]).
    /// Unlike [`PrefixIndex::record`] the holder's time is always rewritten, and a holder
    /// stamped in the same millisecond is made older: a session that moves and moves back
    /// within `TOUCH_MS` must still find the endpoint it went to last. The other holders
    /// stay, older: where the session was before.
    pub fn bind(&self, key: u64, endpoint: u32, now_ms: u64) {
        if endpoint & self.skip_ids != 0 {
            return;
        }
        let Some(way) = self.entry(key, now_ms) else {
            return;
        };
        let stamp = stamp(now_ms);
        for h in &way.holders {
            let v = h.load(Ordering::Relaxed);
            if v != 0 && (v >> 32) as u32 != endpoint && !is_older(v as u32, stamp) {
                let older = stamp.wrapping_sub(1).max(1);
                h.store(v & !0xffff_ffff | older as u64, Ordering::Relaxed);
            }
        }
        let holder = (endpoint as u64) << 32 | stamp as u64;
        match way
            .holders
            .iter()
            .find(|h| (h.load(Ordering::Relaxed) >> 32) as u32 == endpoint)
        {
            Some(h) => h.store(holder, Ordering::Relaxed),
            None => set_holder(way, endpoint, holder, stamp),
        }
    }

    /// The position in `set` of the endpoint `key` was last bound to ([`PrefixIndex::bind`])
    /// among the endpoints of `set`; None when the index holds no binding of `key` to any of
    /// them (never bound, evicted, or every endpoint it was bound to left the set).
    pub fn bound(&self, key: u64, set: &EndpointSet) -> Option<usize> {
        let ways = self.set(key);
        let key = nonzero(key);
        let way = ways.iter().find(|w| w.key.load(Ordering::Acquire) == key)?;
        let mut best: Option<(u32, usize)> = None;
        for holder in &way.holders {
            let v = holder.load(Ordering::Relaxed);
            if v == 0 {
                continue;
            }
            let Some(&pos) = set.position.get(&((v >> 32) as u32)) else {
                continue;
            };
            let stamp = v as u32;
            if best.is_none_or(|(b, _)| is_older(b, stamp)) {
                best = Some((stamp, pos));
            }
        }
        // The entry was taken over for another key while we read it: no binding.
        if way.key.load(Ordering::Acquire) != key {
            return None;
        }
        best.map(|(_, pos)| pos)
    }

    /// Takes an empty way of the set, or the least recently used one, for `key`.
    fn claim<'a>(&self, ways: &'a [Way], key: u64, now_ms: u64) -> Option<&'a Way> {
        let stats = self.table().1;
        for _ in 0..4 {
            let victim = ways
                .iter()
                .min_by_key(|w| match w.key.load(Ordering::Relaxed) {
                    0 => 0,
                    _ => w.last_use.load(Ordering::Relaxed).max(1),
                })
                .expect("a set has ways");
            let old = victim.key.load(Ordering::Acquire);
            if old == key {
                return Some(victim);
            }
            if victim
                .key
                .compare_exchange(old, key, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                for h in &victim.holders {
                    h.store(0, Ordering::Relaxed);
                }
                victim.last_use.store(now_ms.max(1), Ordering::Relaxed);
                if old == 0 {
                    stats.occupied.fetch_add(1, Ordering::Relaxed);
                } else {
                    stats.evictions.fetch_add(1, Ordering::Relaxed);
                }
                return Some(victim);
            }
        }
        None
    }

    /// Number of chunk hashes held.
    pub fn len(&self) -> usize {
        self.table().1.occupied.load(Ordering::Relaxed) as usize
    }

    /// True when the index holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entries evicted so far to stay within capacity.
    pub fn evictions(&self) -> u64 {
        self.table().1.evictions.load(Ordering::Relaxed)
    }

    /// Chunk hashes the index holds at most.
    pub fn capacity(&self) -> usize {
        self.sets * WAYS
    }
}

/// Updates `endpoint`'s holder of `way`, or adds it in an empty holder or over the oldest.
fn set_holder(way: &Way, endpoint: u32, holder: u64, now: u32) {
    // The holder's own entry first: an endpoint is never held twice.
    if let Some(h) = way
        .holders
        .iter()
        .find(|h| (h.load(Ordering::Relaxed) >> 32) as u32 == endpoint)
    {
        if now.wrapping_sub(h.load(Ordering::Relaxed) as u32) >= TOUCH_MS as u32 {
            h.store(holder, Ordering::Relaxed);
        }
        return;
    }
    let free_or_oldest = way
        .holders
        .iter()
        .max_by_key(|h| match h.load(Ordering::Relaxed) {
            0 => u32::MAX,
            // Age, correct across the stamp's wrap-around.
            v => now.wrapping_sub(v as u32).min(u32::MAX - 1),
        })
        .expect("an entry has holders");
    free_or_oldest.store(holder, Ordering::Relaxed);
}

/// True when stamp `a` is older than stamp `b` (modulo 2^32: stamps less than 24 days apart).
fn is_older(a: u32, b: u32) -> bool {
    (b.wrapping_sub(a) as i32) > 0
}

/// The holder time stamp: index time in ms, truncated (ages are taken modulo 2^32), never 0.
fn stamp(now_ms: u64) -> u32 {
    (now_ms as u32).max(1)
}

/// `n` empty ways from a zeroed allocation: large ones come straight from the kernel's zero
/// pages and use memory only as entries are written.
fn zeroed_ways(n: usize) -> Box<[Way]> {
    let layout = std::alloc::Layout::array::<Way>(n).expect("index size fits in memory");
    // SAFETY: `layout` has a non-zero size (n >= WAYS); a `Way` is atomics only, so all-zero
    // bytes are a valid (empty) way; the box frees with the same array layout.
    unsafe {
        let p = std::alloc::alloc_zeroed(layout).cast::<Way>();
        if p.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Box::from_raw(std::ptr::slice_from_raw_parts_mut(p, n))
    }
}

/// Keys are never 0 (the empty marker).
fn nonzero(h: u64) -> u64 {
    h.max(1)
}
