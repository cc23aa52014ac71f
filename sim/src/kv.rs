//! Paged KV cache of fixed-size blocks with prefix caching.
//!
//! A block is either anonymous (being filled, or a duplicate of a block someone else already
//! registered) or identified by the chained hash of everything up to and including it. Hashed
//! blocks that no running request references stay resident as a prefix cache and are evicted
//! least recently released first, only when a new block is needed and no block is free.

use std::collections::{BTreeMap, HashMap};

pub type BlockHash = u64;

/// One block held by a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Block {
    Anon,
    Hashed(BlockHash),
}

#[derive(Debug)]
struct Entry {
    refs: u32,
    /// Position in the eviction order while `refs == 0`.
    lru_seq: Option<u64>,
}

#[derive(Debug)]
pub struct KvCache {
    capacity: usize,
    anon_used: usize,
    in_use_hashed: usize,
    hashed: HashMap<BlockHash, Entry>,
    lru: BTreeMap<u64, BlockHash>,
    next_seq: u64,
    evictions: u64,
}

impl KvCache {
    pub fn new(capacity: usize) -> Self {
        KvCache {
            capacity,
            anon_used: 0,
            in_use_hashed: 0,
            hashed: HashMap::new(),
            lru: BTreeMap::new(),
            next_seq: 0,
            evictions: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Blocks referenced by running requests.
    pub fn used(&self) -> usize {
        self.anon_used + self.in_use_hashed
    }

    /// Blocks kept only as prefix cache (evictable).
    pub fn cached_unused(&self) -> usize {
        self.lru.len()
    }

    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Blocks that can be handed out now, evicting cached ones if needed.
    pub fn available(&self) -> usize {
        self.capacity - self.used()
    }

    fn free_now(&self) -> usize {
        self.capacity - self.anon_used - self.hashed.len()
    }

    /// Number of leading hashes that are resident (in use or cached).
    pub fn match_prefix(&self, hashes: &[BlockHash]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.hashed.contains_key(h))
            .count()
    }

    /// How many of these resident hashes are only cached (would leave the evictable pool when
    /// acquired).
    pub fn count_unreferenced(&self, hashes: &[BlockHash]) -> usize {
        hashes
            .iter()
            .filter(|h| self.hashed.get(h).is_some_and(|e| e.refs == 0))
            .count()
    }

    /// Take a reference on a resident block. Returns false if it is not resident.
    pub fn acquire(&mut self, hash: BlockHash) -> bool {
        match self.hashed.get_mut(&hash) {
            Some(e) => {
                if e.refs == 0 {
                    if let Some(seq) = e.lru_seq.take() {
                        self.lru.remove(&seq);
                    }
                    self.in_use_hashed += 1;
                }
                e.refs += 1;
                true
            }
            None => false,
        }
    }

    /// Allocate an anonymous block, evicting the least recently released cached block when no
    /// block is free. Returns false when every block is referenced.
    pub fn alloc(&mut self) -> bool {
        if self.free_now() == 0 {
            let Some((_, victim)) = self.lru.pop_first() else {
                return false;
            };
            self.hashed.remove(&victim);
            self.evictions += 1;
        }
        self.anon_used += 1;
        true
    }

    /// Register a filled anonymous block under its hash. If another block already carries
    /// that hash the block stays anonymous (a duplicate) and `Block::Anon` is returned.
    pub fn register(&mut self, hash: BlockHash) -> Block {
        if self.hashed.contains_key(&hash) {
            return Block::Anon;
        }
        self.anon_used -= 1;
        self.in_use_hashed += 1;
        self.hashed.insert(
            hash,
            Entry {
                refs: 1,
                lru_seq: None,
            },
        );
        Block::Hashed(hash)
    }

    /// Drop a reference. Hashed blocks stay cached; anonymous ones become free.
    pub fn release(&mut self, block: Block) {
        match block {
            Block::Anon => self.anon_used -= 1,
            Block::Hashed(h) => {
                let e = self
                    .hashed
                    .get_mut(&h)
                    .expect("released block must be resident");
                e.refs -= 1;
                if e.refs == 0 {
                    self.in_use_hashed -= 1;
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    e.lru_seq = Some(seq);
                    self.lru.insert(seq, h);
                }
            }
        }
    }

    /// Forget every cached block that no request references (like `/reset_prefix_cache`).
    pub fn flush_unreferenced(&mut self) {
        for (_, h) in std::mem::take(&mut self.lru) {
            self.hashed.remove(&h);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_blocks_stay_cached_and_evict_lru_first() {
        let mut kv = KvCache::new(3);
        for h in [1u64, 2, 3] {
            assert!(kv.alloc());
            assert_eq!(kv.register(h), Block::Hashed(h));
        }
        assert!(!kv.alloc(), "all blocks referenced");
        kv.release(Block::Hashed(2));
        kv.release(Block::Hashed(1));
        assert_eq!(kv.used(), 1);
        assert_eq!(kv.match_prefix(&[1, 2, 3, 4]), 3);
        // Block 2 was released first: it is evicted first.
        assert!(kv.alloc());
        assert_eq!(kv.match_prefix(&[2]), 0);
        assert_eq!(kv.match_prefix(&[1]), 1);
        assert_eq!(kv.evictions(), 1);
        // Re-acquiring protects a block from eviction.
        assert!(kv.acquire(1));
        assert!(!kv.alloc());
        assert_eq!(kv.used(), 3);
    }

    #[test]
    fn duplicate_registration_stays_anonymous_and_frees() {
        let mut kv = KvCache::new(4);
        assert!(kv.alloc());
        assert_eq!(kv.register(7), Block::Hashed(7));
        assert!(kv.alloc());
        assert_eq!(kv.register(7), Block::Anon);
        assert_eq!(kv.used(), 2);
        kv.release(Block::Anon);
        kv.release(Block::Hashed(7));
        assert_eq!(kv.used(), 0);
        assert_eq!(kv.cached_unused(), 1);
        kv.flush_unreferenced();
        assert_eq!(kv.match_prefix(&[7]), 0);
        assert_eq!(kv.available(), 4);
    }
}
