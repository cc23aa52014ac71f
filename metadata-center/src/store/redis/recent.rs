//! The recent-saves memo: which (cluster, location, prefix) this replica sent to Redis within
//! the refresh granularity, so a save can leave them out (Redis would leave their tags as they
//! are). Only the last granularity matters, so the memo needs no recency list: two
//! generations of a flat hash map, the older dropped as a whole when the newer is full. Each
//! entry is one 64-bit key (the prefix's digest mixed with its save's cluster and location)
//! and a stamp: a lookup is one or two probes, an insert one, nothing is allocated per entry.
//! Two keys colliding (about one chance in 2^64 per pair) only make one prefix skip one
//! refresh.

use std::hash::{Hash, Hasher};

use hashbrown::HashMap;

use crate::endpoint::Endpoint;

/// Two generations of (key → when it was sent, ms); at most `cap` entries in all.
pub struct RecentSaves {
    newer: HashMap<u64, u64>,
    older: HashMap<u64, u64>,
    /// Entries per generation (half the cap).
    per_generation: usize,
}

/// The keys of one save's prefixes: one per (cluster, location), mixed with each digest.
#[derive(Clone, Copy)]
pub struct SaveKeys(u64);

impl SaveKeys {
    /// The keys of `cluster`'s prefixes saved for `loc`.
    pub fn new(cluster: &str, loc: Endpoint) -> Self {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (cluster, loc).hash(&mut h);
        SaveKeys(h.finish())
    }

    /// The key of the prefix with this digest.
    pub fn of(self, digest: u64) -> u64 {
        super::keys::mix(digest ^ self.0)
    }
}

impl RecentSaves {
    /// A memo of at most `cap` entries (at least 2), its maps allocated up front.
    pub fn new(cap: usize) -> Self {
        let per_generation = (cap / 2).max(1);
        RecentSaves {
            newer: HashMap::with_capacity(per_generation),
            older: HashMap::with_capacity(per_generation),
            per_generation,
        }
    }

    /// Whether `key` was sent less than `granularity_ms` before `now_ms`.
    pub fn is_fresh(&self, key: u64, now_ms: u64, granularity_ms: u64) -> bool {
        self.newer
            .get(&key)
            .or_else(|| self.older.get(&key))
            .is_some_and(|&at| now_ms.saturating_sub(at) < granularity_ms)
    }

    /// `key` was sent at `now_ms`. A full newer generation becomes the older one (the older
    /// one's entries are forgotten; their next save goes to Redis).
    pub fn sent(&mut self, key: u64, now_ms: u64) {
        if self.newer.len() >= self.per_generation && !self.newer.contains_key(&key) {
            std::mem::swap(&mut self.newer, &mut self.older);
            self.newer.clear();
        }
        self.newer.insert(key, now_ms);
    }

    /// Entries held (a key sent in both generations counts twice).
    pub fn len(&self) -> usize {
        self.newer.len() + self.older.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(d: u64) -> u64 {
        SaveKeys::new("m", "10.0.0.1:8000".parse().unwrap()).of(d)
    }

    #[test]
    fn keys_differ_by_cluster_location_and_digest() {
        let (a, b) = (
            "10.0.0.1:8000".parse().unwrap(),
            "10.0.0.2:8000".parse().unwrap(),
        );
        let keys = [
            SaveKeys::new("m", a).of(1),
            SaveKeys::new("m", a).of(2),
            SaveKeys::new("m", b).of(1),
            SaveKeys::new("n", a).of(1),
        ];
        for i in 0..keys.len() {
            for j in i + 1..keys.len() {
                assert_ne!(keys[i], keys[j], "{i} {j}");
            }
        }
        assert_eq!(SaveKeys::new("m", a).of(1), keys[0]);
    }

    #[test]
    fn fresh_only_within_the_granularity() {
        let mut m = RecentSaves::new(8);
        m.sent(key(1), 100);
        assert!(m.is_fresh(key(1), 100, 10));
        assert!(m.is_fresh(key(1), 109, 10));
        assert!(!m.is_fresh(key(1), 110, 10));
        assert!(!m.is_fresh(key(2), 100, 10));
        // sent again: fresh from the new time
        m.sent(key(1), 120);
        assert!(m.is_fresh(key(1), 125, 10));
    }

    #[test]
    fn bounded_and_keeps_the_newest() {
        let mut m = RecentSaves::new(8);
        for d in 0..100 {
            m.sent(key(d), 0);
            assert!(m.len() <= 8, "{} entries after {d}", m.len());
        }
        // the last half of the cap is always remembered, the oldest are forgotten
        assert!(m.len() >= 4);
        for d in 96..100 {
            assert!(m.is_fresh(key(d), 1, 10), "{d}");
        }
        assert!(!m.is_fresh(key(0), 1, 10));
        // a key already in the newer generation is updated in place, not rotated out
        let before = m.len();
        m.sent(key(99), 5);
        assert_eq!(m.len(), before);
        assert!(m.is_fresh(key(98), 6, 10));
    }
}
