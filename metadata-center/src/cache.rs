//! KV-cache index: one radix tree per cluster over cumulative prompt-chunk hashes (u64), each node
//! tagged with the locations (engines) that saved a path through it.
//!
//! Behaviour follows the origin (`pkg/meta/cache`, see spec 1.5): every node on an inserted path
//! carries the location; a query returns, per location, the number of leading chunks matched
//! (its deepest node on the query path), top-K by depth; nodes and location entries expire after
//! `expire` (1 h). Differences, all fixing origin defects:
//! * bounded memory: a per-tree budget of entries (nodes + stored hashes + location tags), a
//!   cap on location tags per node, and the server-wide memory budget (`crate::budget`) over all
//!   trees; the least recently used nodes are evicted first;
//! * queries take a read lock and never mutate (expired data is skipped, GC removes it);
//! * GC never disables a tree: expired nodes are exactly the oldest part of the LRU list, so a
//!   pass pops them in small batches under the write lock, and inserts/queries just wait briefly;
//! * a query stops at the first partial match inside a node.
//!
//! LRU invariant: an insert touches its path from the deepest node up to the root's child, so
//! every node sits after all of its descendants in the LRU list; the list head is always a leaf
//! and evicting it never orphans a subtree.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hashbrown::HashMap;
use parking_lot::RwLock;
use serde::Serialize;
use slab::Slab;
use smallvec::SmallVec;

use crate::budget::MemoryBudget;
use crate::endpoint::Endpoint;

#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// Node and location TTL (origin: 1 h).
    pub expire: Duration,
    /// Default top-K when a query asks for ≤ 0 (origin: 5).
    pub top_k: usize,
    /// Budget per cluster tree, in entries: one per node, per stored hash, per location tag.
    pub max_entries_per_cluster: usize,
    pub max_clusters: usize,
    pub max_locations_per_node: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            expire: Duration::from_secs(3600),
            top_k: 5,
            max_entries_per_cluster: 4_000_000,
            max_clusters: 1_000,
            max_locations_per_node: 256,
        }
    }
}

type NodeId = usize;
const NIL: NodeId = usize::MAX;

struct Node {
    prefix: Vec<u64>,
    children: HashMap<u64, NodeId>,
    parent: NodeId,
    locs: SmallVec<[(Endpoint, Duration); 4]>,
    touched: Duration,
    prev: NodeId,
    next: NodeId,
}

/// Estimated bytes of one radix node besides its hashes and tags: the node in the slab (plus a
/// quarter for the slab's spare capacity), its slot in the parent's child map (with the map's
/// spare capacity) and the allocator's header of its prefix vector. Calibrated against the RSS
/// of the server (docs/metadata-center.md).
pub const NODE_BYTES: usize =
    std::mem::size_of::<Node>() + std::mem::size_of::<Node>() / 4 + 8 + 48 + 16;
/// Estimated bytes of one stored hash.
pub const HASH_BYTES: usize = 8;
/// Estimated bytes of one location tag.
pub const TAG_BYTES: usize = std::mem::size_of::<(Endpoint, Duration)>();
/// Estimated bytes of one cluster tree besides its nodes: the handle, its map entry, the root and
/// the slab's first allocation (room for 4 nodes) (plus the cluster name, counted separately).
pub const TREE_BYTES: usize = std::mem::size_of::<TreeHandle>()
    + 16
    + std::mem::size_of::<Tree>()
    + NODE_BYTES
    + 2 * std::mem::size_of::<Node>()
    + 64;

pub struct Tree {
    nodes: Slab<Node>,
    root: NodeId,
    head: NodeId,
    tail: NodeId,
    /// Stored hashes over all nodes.
    hashes: usize,
    /// Location tags over all nodes.
    tags: usize,
    last: Duration,
}

#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evictions {
    pub expired: usize,
    pub evicted: usize,
}

fn lcp(a: &[u64], b: &[u64]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl Default for Tree {
    fn default() -> Self {
        Self::new()
    }
}

impl Tree {
    pub fn new() -> Self {
        let mut nodes = Slab::new();
        let root = nodes.insert(Node {
            prefix: Vec::new(),
            children: HashMap::new(),
            parent: NIL,
            locs: SmallVec::new(),
            touched: Duration::ZERO,
            prev: NIL,
            next: NIL,
        });
        Tree {
            nodes,
            root,
            head: NIL,
            tail: NIL,
            hashes: 0,
            tags: 0,
            last: Duration::ZERO,
        }
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len() - 1
    }

    /// Budgeted entries: one per node, per stored hash, per location tag.
    pub fn cost(&self) -> usize {
        self.node_count() + self.hashes + self.tags
    }

    /// Estimated bytes held by the nodes (the tree's fixed part is in `TREE_BYTES`).
    pub fn bytes(&self) -> usize {
        self.node_count() * NODE_BYTES + self.hashes * HASH_BYTES + self.tags * TAG_BYTES
    }

    /// Last use of the least recently used node, `None` when the tree is empty.
    pub fn oldest(&self) -> Option<Duration> {
        (self.head != NIL).then(|| self.nodes[self.head].touched)
    }

    /// Remove the least recently used node (always a leaf). Returns false when empty.
    pub fn evict_oldest(&mut self) -> bool {
        if self.head == NIL {
            return false;
        }
        self.remove_subtree(self.head);
        true
    }

    pub fn is_empty(&self) -> bool {
        self.nodes[self.root].children.is_empty()
    }

    fn unlink(&mut self, id: NodeId) {
        let (prev, next) = (self.nodes[id].prev, self.nodes[id].next);
        if prev == NIL {
            if self.head == id {
                self.head = next;
            }
        } else {
            self.nodes[prev].next = next;
        }
        if next == NIL {
            if self.tail == id {
                self.tail = prev;
            }
        } else {
            self.nodes[next].prev = prev;
        }
        self.nodes[id].prev = NIL;
        self.nodes[id].next = NIL;
    }

    fn push_back(&mut self, id: NodeId) {
        self.nodes[id].prev = self.tail;
        self.nodes[id].next = NIL;
        if self.tail == NIL {
            self.head = id;
        } else {
            let t = self.tail;
            self.nodes[t].next = id;
        }
        self.tail = id;
    }

    fn new_node(&mut self, prefix: Vec<u64>, parent: NodeId, now: Duration) -> NodeId {
        let node = Node {
            prefix,
            children: HashMap::new(),
            parent,
            locs: SmallVec::new(),
            touched: now,
            prev: NIL,
            next: NIL,
        };
        self.hashes += node.prefix.len();
        let id = self.nodes.insert(node);
        self.push_back(id);
        id
    }

    /// Tag `id` with `loc` at `now`, dropping expired tags and the oldest tag when full.
    fn tag(&mut self, id: NodeId, loc: Endpoint, now: Duration, cfg: &CacheConfig) {
        let n = &mut self.nodes[id];
        let before = n.locs.len();
        n.locs.retain(|(l, t)| *l == loc || *t + cfg.expire > now);
        if let Some(e) = n.locs.iter_mut().find(|(l, _)| *l == loc) {
            e.1 = now;
        } else {
            if n.locs.len() >= cfg.max_locations_per_node.max(1) {
                if let Some(oldest) = n
                    .locs
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, (_, t))| *t)
                    .map(|(i, _)| i)
                {
                    n.locs.swap_remove(oldest);
                }
            }
            n.locs.push((loc, now));
        }
        let after = n.locs.len();
        self.tags = self.tags + after - before;
    }

    /// Insert a hash path tagged with `loc`. Returns how many nodes the budget evicted.
    pub fn insert(
        &mut self,
        keys: &[u64],
        loc: Endpoint,
        now: Duration,
        cfg: &CacheConfig,
    ) -> usize {
        let now = now.max(self.last);
        self.last = now;
        // Path nodes from the root downwards; touched in reverse afterwards.
        let mut path: SmallVec<[NodeId; 32]> = SmallVec::new();
        let mut cur = self.root;
        let mut i = 0;
        while i < keys.len() {
            let rest = &keys[i..];
            let Some(&child) = self.nodes[cur].children.get(&rest[0]) else {
                let leaf = self.new_node(rest.to_vec(), cur, now);
                self.nodes[cur].children.insert(rest[0], leaf);
                self.tag(leaf, loc, now, cfg);
                path.push(leaf);
                break;
            };
            let common = lcp(&self.nodes[child].prefix, rest);
            if common == self.nodes[child].prefix.len() {
                self.tag(child, loc, now, cfg);
                path.push(child);
                i += common;
                cur = child;
                continue;
            }
            // Split `child` at `common`: a new middle node takes the shared part and a copy of
            // the child's live tags plus `loc`; the child keeps the rest of its prefix.
            let tail_prefix = self.nodes[child].prefix.split_off(common);
            let head_prefix = std::mem::replace(&mut self.nodes[child].prefix, tail_prefix);
            self.hashes -= head_prefix.len();
            let mid = self.new_node(head_prefix, cur, now);
            let live: SmallVec<[(Endpoint, Duration); 4]> = self.nodes[child]
                .locs
                .iter()
                .copied()
                .filter(|(_, t)| *t + cfg.expire > now)
                .collect();
            self.tags += live.len();
            self.nodes[mid].locs = live;
            self.tag(mid, loc, now, cfg);
            let child_key = self.nodes[child].prefix[0];
            self.nodes[mid].children.insert(child_key, child);
            self.nodes[child].parent = mid;
            self.nodes[cur].children.insert(rest[0], mid);
            path.push(mid);
            path.push(child);
            i += common;
            if i < keys.len() {
                let leaf = self.new_node(keys[i..].to_vec(), mid, now);
                self.nodes[mid].children.insert(keys[i], leaf);
                self.tag(leaf, loc, now, cfg);
                path.push(leaf);
            }
            break;
        }
        // Deepest first, so ancestors end up after their descendants in the LRU list.
        // (`child` after a split is a sibling of the new leaf, both below `mid`.)
        for &id in path.iter().rev() {
            self.nodes[id].touched = now;
            self.unlink(id);
            self.push_back(id);
        }
        let mut evicted = 0;
        while self.cost() > cfg.max_entries_per_cluster && self.head != NIL {
            evicted += self.remove_subtree(self.head);
        }
        evicted
    }

    /// Remove `id` and everything below it. Returns the number of nodes removed.
    fn remove_subtree(&mut self, id: NodeId) -> usize {
        let parent = self.nodes[id].parent;
        let key = self.nodes[id].prefix.first().copied();
        if let (Some(k), true) = (key, parent != NIL) {
            if self.nodes[parent].children.get(&k) == Some(&id) {
                self.nodes[parent].children.remove(&k);
            }
        }
        let mut stack = vec![id];
        let mut n = 0;
        while let Some(x) = stack.pop() {
            self.unlink(x);
            let node = self.nodes.remove(x);
            self.hashes -= node.prefix.len();
            self.tags -= node.locs.len();
            stack.extend(node.children.values().copied());
            n += 1;
        }
        n
    }

    /// Remove up to `budget` expired nodes, oldest first.
    pub fn expire(&mut self, now: Duration, cfg: &CacheConfig, budget: usize) -> (usize, bool) {
        let mut n = 0;
        while n < budget && self.head != NIL && self.nodes[self.head].touched + cfg.expire <= now {
            n += self.remove_subtree(self.head);
        }
        let more = self.head != NIL && self.nodes[self.head].touched + cfg.expire <= now;
        (n, more)
    }

    /// Per location, the number of leading hashes matched, best `top_k` first (ties: the more
    /// recently saved location first, then by address). Read-only.
    pub fn match_all(
        &self,
        keys: &[u64],
        top_k: usize,
        now: Duration,
        cfg: &CacheConfig,
    ) -> Vec<(Endpoint, usize)> {
        // Location -> (deepest depth, latest tag time). A map, so a node with many tags on a
        // deep path stays linear in the number of tags visited.
        let mut best: HashMap<Endpoint, (usize, Duration)> = HashMap::new();
        let mut depth = 0;
        let mut cur = self.root;
        let mut i = 0;
        while i < keys.len() {
            let Some(&child) = self.nodes[cur].children.get(&keys[i]) else {
                break;
            };
            let node = &self.nodes[child];
            if node.touched + cfg.expire <= now {
                break;
            }
            let common = lcp(&node.prefix, &keys[i..]);
            depth += common;
            for &(loc, t) in &node.locs {
                if t + cfg.expire <= now {
                    continue;
                }
                let e = best.entry(loc).or_insert((depth, t));
                e.0 = depth;
                e.1 = e.1.max(t);
            }
            if common < node.prefix.len() {
                break;
            }
            i += common;
            cur = child;
        }
        let mut best: Vec<(Endpoint, usize, Duration)> =
            best.into_iter().map(|(l, (d, t))| (l, d, t)).collect();
        best.sort_by(|a, b| b.1.cmp(&a.1).then(b.2.cmp(&a.2)).then(a.0.cmp(&b.0)));
        best.into_iter()
            .take(top_k)
            .map(|(l, d, _)| (l, d))
            .collect()
    }

    /// Per depth level (1 = children of the root): node count and prefix length statistics.
    pub fn level_stats(&self) -> std::collections::BTreeMap<usize, LevelStats> {
        let mut out: std::collections::BTreeMap<usize, LevelStats> = Default::default();
        let mut stack: Vec<(NodeId, usize)> = self.nodes[self.root]
            .children
            .values()
            .map(|&c| (c, 1))
            .collect();
        while let Some((id, level)) = stack.pop() {
            let n = &self.nodes[id];
            let s = out.entry(level).or_insert(LevelStats {
                min_prefix_len: usize::MAX,
                ..Default::default()
            });
            s.nodes_count += 1;
            s.prefix_total += n.prefix.len();
            s.max_prefix_len = s.max_prefix_len.max(n.prefix.len());
            s.min_prefix_len = s.min_prefix_len.min(n.prefix.len());
            stack.extend(n.children.values().map(|&c| (c, level + 1)));
        }
        out
    }

    /// Structural self-check used by tests: parent/child links, LRU order and cost.
    #[cfg(test)]
    fn check(&self) {
        let (mut hashes, mut tags) = (0, 0);
        let mut seen = 0;
        let mut pos = std::collections::HashMap::new();
        let mut x = self.head;
        let mut last = Duration::ZERO;
        while x != NIL {
            pos.insert(x, seen);
            seen += 1;
            assert!(self.nodes[x].touched >= last, "LRU list ordered by time");
            last = self.nodes[x].touched;
            x = self.nodes[x].next;
        }
        assert_eq!(seen, self.node_count(), "every node is in the LRU list");
        for (id, n) in self.nodes.iter() {
            hashes += n.prefix.len();
            tags += n.locs.len();
            for (k, &c) in &n.children {
                assert_eq!(self.nodes[c].prefix[0], *k);
                assert_eq!(self.nodes[c].parent, id);
                if id != self.root {
                    assert!(
                        pos[&c] < pos[&id],
                        "descendants precede ancestors in the LRU list"
                    );
                }
            }
        }
        assert_eq!((hashes, tags), (self.hashes, self.tags));
    }
}

#[derive(Serialize, Default, Debug, Clone, PartialEq, Eq)]
pub struct LevelStats {
    pub nodes_count: usize,
    pub prefix_total: usize,
    pub max_prefix_len: usize,
    pub min_prefix_len: usize,
}

pub struct TreeHandle {
    tree: RwLock<Tree>,
    /// Monotonic ns of the last save (LRU order of trees at the cluster cap).
    last_used: AtomicU64,
    budget: Arc<MemoryBudget>,
    /// Bytes charged for the tree itself (handle, map entry, root, cluster name).
    fixed_bytes: usize,
}

impl TreeHandle {
    fn new(cluster: &str, budget: Arc<MemoryBudget>) -> Self {
        let fixed_bytes = TREE_BYTES + cluster.len();
        budget.add_cache(fixed_bytes as i64);
        TreeHandle {
            tree: RwLock::new(Tree::new()),
            last_used: AtomicU64::new(0),
            budget,
            fixed_bytes,
        }
    }

    /// Run `f` on the tree under the write lock and report the change of its size to the budget.
    fn mutate<R>(&self, f: impl FnOnce(&mut Tree) -> R) -> R {
        let mut t = self.tree.write();
        let before = t.bytes();
        let r = f(&mut t);
        self.budget.add_cache(t.bytes() as i64 - before as i64);
        r
    }
}

impl Drop for TreeHandle {
    /// A tree leaves the budget when its last handle goes, whatever removed it from the pool
    /// (cluster cap, GC, budget) and even if a save still held it at that moment.
    fn drop(&mut self) {
        let held = self.fixed_bytes + self.tree.get_mut().bytes();
        self.budget.add_cache(-(held as i64));
    }
}

#[derive(Default)]
pub struct CacheCounters {
    pub saves: AtomicU64,
    pub queries: AtomicU64,
    pub query_hits: AtomicU64,
    pub expired_nodes: AtomicU64,
    pub evicted_nodes: AtomicU64,
    pub evicted_clusters: AtomicU64,
}

/// All cluster trees.
pub struct CachePool {
    cfg: CacheConfig,
    trees: RwLock<HashMap<String, Arc<TreeHandle>>>,
    budget: Arc<MemoryBudget>,
    pub counters: CacheCounters,
}

/// Nodes evicted from one tree before the pool looks again for the globally oldest one.
const BUDGET_BATCH: usize = 256;

impl CachePool {
    /// A pool with no memory budget (tests, benchmarks).
    pub fn new(cfg: CacheConfig) -> Self {
        Self::with_budget(cfg, Arc::new(MemoryBudget::unlimited()))
    }

    /// A pool that reports its estimated size to `budget`.
    pub fn with_budget(cfg: CacheConfig, budget: Arc<MemoryBudget>) -> Self {
        CachePool {
            cfg,
            trees: RwLock::new(HashMap::new()),
            budget,
            counters: CacheCounters::default(),
        }
    }

    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }

    fn get(&self, cluster: &str) -> Option<Arc<TreeHandle>> {
        self.trees.read().get(cluster).cloned()
    }

    /// `POST /v1/cache/save`.
    pub fn save(&self, cluster: &str, keys: &[u64], loc: Endpoint, now: Duration) {
        self.counters.saves.fetch_add(1, Ordering::Relaxed);
        if keys.is_empty() {
            return;
        }
        let handle = match self.get(cluster) {
            Some(h) => h,
            None => {
                let mut trees = self.trees.write();
                if !trees.contains_key(cluster) && trees.len() >= self.cfg.max_clusters.max(1) {
                    let lru = trees
                        .iter()
                        .min_by_key(|(_, h)| h.last_used.load(Ordering::Relaxed))
                        .map(|(k, _)| k.clone());
                    if let Some(k) = lru {
                        trees.remove(&k);
                        self.counters
                            .evicted_clusters
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
                let budget = &self.budget;
                trees
                    .entry(cluster.to_string())
                    .or_insert_with(|| Arc::new(TreeHandle::new(cluster, budget.clone())))
                    .clone()
            }
        };
        handle
            .last_used
            .fetch_max(now.as_nanos() as u64, Ordering::Relaxed);
        let evicted = handle.mutate(|t| t.insert(keys, loc, now, &self.cfg));
        if evicted > 0 {
            self.counters
                .evicted_nodes
                .fetch_add(evicted as u64, Ordering::Relaxed);
        }
    }

    /// `POST /v1/cache/query`. `top_k == 0` means the configured default.
    pub fn query(
        &self,
        cluster: &str,
        keys: &[u64],
        top_k: usize,
        now: Duration,
    ) -> Vec<(Endpoint, usize)> {
        self.counters.queries.fetch_add(1, Ordering::Relaxed);
        let Some(h) = self.get(cluster) else {
            return Vec::new();
        };
        let k = if top_k == 0 { self.cfg.top_k } else { top_k };
        let out = h.tree.read().match_all(keys, k, now, &self.cfg);
        if !out.is_empty() {
            self.counters.query_hits.fetch_add(1, Ordering::Relaxed);
        }
        out
    }

    /// One GC pass: expired nodes are removed in batches (the write lock is released between
    /// batches), then trees left empty and unused for a TTL are dropped.
    pub fn gc(&self, now: Duration, batch: usize) -> usize {
        let handles: Vec<(String, Arc<TreeHandle>)> = self
            .trees
            .read()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut removed = 0;
        for (_, h) in &handles {
            loop {
                let (n, more) = h.mutate(|t| t.expire(now, &self.cfg, batch.max(1)));
                removed += n;
                if !more {
                    break;
                }
                std::thread::yield_now();
            }
        }
        self.counters
            .expired_nodes
            .fetch_add(removed as u64, Ordering::Relaxed);
        let expire_ns = self.cfg.expire.as_nanos() as u64;
        let now_ns = now.as_nanos() as u64;
        self.trees.write().retain(|_, h| {
            !(h.tree.read().is_empty() && h.last_used.load(Ordering::Relaxed) + expire_ns <= now_ns)
        });
        removed
    }

    pub fn cluster_count(&self) -> usize {
        self.trees.read().len()
    }

    /// Evict the least recently used nodes over all trees (oldest node first) until the memory
    /// budget is back under its low watermark or the cache is empty. Trees left empty are
    /// dropped. Returns the number of nodes evicted. (When to call it: `crate::memory`.)
    pub fn shrink_for_budget(&self) -> usize {
        let budget = &*self.budget;
        let mut evicted = 0;
        while budget.above_target() {
            // The tree holding the oldest node, and the age of the runner-up, so one pass can
            // evict from the victim until it is no longer the oldest.
            let handles: Vec<(String, Arc<TreeHandle>)> = self
                .trees
                .read()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if handles.is_empty() {
                break;
            }
            // Empty trees sort first (`None` < `Some`): dropping them frees their fixed part.
            let ages: Vec<Option<Duration>> = handles
                .iter()
                .map(|(_, h)| h.tree.read().oldest())
                .collect();
            let Some(i) = (0..ages.len()).min_by_key(|&i| ages[i]) else {
                break;
            };
            let runner_up = ages
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .filter_map(|(_, a)| *a)
                .min();
            let (name, h) = &handles[i];
            // The budget learns of the change when `mutate` returns, so count here.
            let need = budget.used().saturating_sub(budget.low_watermark()) as usize;
            let (n, empty) = h.mutate(|t| {
                let start = t.bytes();
                let mut n = 0;
                while n < BUDGET_BATCH
                    && start - t.bytes() < need
                    && t.oldest().is_some_and(|o| runner_up.is_none_or(|r| o <= r))
                {
                    t.evict_oldest();
                    n += 1;
                }
                (n, t.is_empty())
            });
            evicted += n;
            if empty {
                let mut trees = self.trees.write();
                if trees.get(name).is_some_and(|cur| Arc::ptr_eq(cur, h)) {
                    trees.remove(name);
                    budget
                        .counters
                        .cache_clusters
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        budget
            .counters
            .cache_nodes
            .fetch_add(evicted as u64, Ordering::Relaxed);
        self.counters
            .evicted_nodes
            .fetch_add(evicted as u64, Ordering::Relaxed);
        evicted
    }

    /// (nodes, entries) over all trees.
    pub fn totals(&self) -> (usize, usize) {
        let handles: Vec<Arc<TreeHandle>> = self.trees.read().values().cloned().collect();
        handles.iter().fold((0, 0), |(n, c), h| {
            let t = h.tree.read();
            (n + t.node_count(), c + t.cost())
        })
    }

    pub fn level_stats(
        &self,
        cluster: &str,
    ) -> Option<std::collections::BTreeMap<usize, LevelStats>> {
        self.get(cluster).map(|h| h.tree.read().level_stats())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::net::{IpAddr, Ipv4Addr};

    fn loc(id: u32) -> Endpoint {
        Endpoint {
            ip: IpAddr::V4(Ipv4Addr::from(id)),
            port: None,
        }
    }

    fn ids(v: Vec<(Endpoint, usize)>) -> BTreeMap<u32, usize> {
        v.into_iter()
            .map(|(e, d)| match e.ip {
                IpAddr::V4(a) => (u32::from(a), d),
                IpAddr::V6(_) => unreachable!(),
            })
            .collect()
    }

    const T0: Duration = Duration::from_secs(10);

    fn origin_tree(cfg: &CacheConfig) -> Tree {
        let mut t = Tree::new();
        let inserts: &[(&[u64], u32)] = &[
            (&[1, 2, 3, 4, 5, 6], 1),
            (&[1, 2, 3, 4], 1),
            (&[1, 2, 3, 4], 2),
            (&[1, 2, 3], 3),
            (&[1, 2, 3, 5, 6], 4),
            (&[1, 2, 3, 5, 6], 3),
            (&[1, 2, 3, 7, 8], 5),
            (&[2, 3, 4, 5], 6),
            (&[2, 3, 4, 6], 7),
        ];
        for (k, l) in inserts {
            t.insert(k, loc(*l), T0, cfg);
            t.check();
        }
        t
    }

    #[test]
    fn origin_behaviour_vectors() {
        let cfg = CacheConfig {
            top_k: 100,
            ..Default::default()
        };
        let t = origin_tree(&cfg);
        let q = |k: &[u64]| ids(t.match_all(k, 100, T0, &cfg));
        assert_eq!(
            q(&[1, 2, 3, 4, 5, 6]),
            BTreeMap::from([(1, 6), (2, 4), (3, 3), (4, 3), (5, 3)])
        );
        assert_eq!(
            q(&[1, 2, 3, 5]),
            BTreeMap::from([(1, 3), (2, 3), (3, 4), (4, 4), (5, 3)])
        );
        assert_eq!(
            q(&[1, 2, 3, 9]),
            BTreeMap::from([(1, 3), (2, 3), (3, 3), (4, 3), (5, 3)])
        );
        assert_eq!(q(&[2, 3, 4, 5]), BTreeMap::from([(6, 4), (7, 3)]));
        assert_eq!(q(&[9]), BTreeMap::new());
        assert_eq!(q(&[]), BTreeMap::new());
        // Structure: [1,2,3] -> {[4] -> [5,6], [5,6], [7,8]} and [2,3,4] -> {[5], [6]}.
        assert_eq!(t.node_count(), 8);
    }

    #[test]
    fn origin_top_k_vector() {
        let cfg = CacheConfig::default();
        let mut t = Tree::new();
        t.insert(&[1], loc(100), T0, &cfg);
        for l in [101, 102] {
            t.insert(&[1, 2, 3], loc(l), T0, &cfg);
        }
        for l in [103, 104] {
            t.insert(&[1, 2, 3, 4], loc(l), T0, &cfg);
        }
        t.check();
        let got = ids(t.match_all(&[1, 2, 3, 4], 3, T0, &cfg));
        assert_eq!(got.len(), 3);
        assert_eq!(got.get(&103), Some(&4));
        assert_eq!(got.get(&104), Some(&4));
        assert!(
            got.get(&101) == Some(&3) || got.get(&102) == Some(&3),
            "{got:?}"
        );
        assert!(!got.contains_key(&100));
    }

    #[test]
    fn stops_at_partial_match_inside_a_node() {
        // The origin keeps walking children after a partial match; with non-cumulative keys
        // that yields wrong depths. [1,2,3] then child [4]; query [1,9,4] must stop at depth 1.
        let cfg = CacheConfig::default();
        let mut t = Tree::new();
        t.insert(&[1, 2, 3, 4], loc(1), T0, &cfg);
        t.insert(&[1, 2, 3], loc(2), T0, &cfg);
        assert_eq!(
            ids(t.match_all(&[1, 9, 4], 5, T0, &cfg)),
            BTreeMap::from([(1, 1), (2, 1)])
        );
    }

    #[test]
    fn ttl_hides_then_gc_removes_expired_nodes_and_tags() {
        let cfg = CacheConfig {
            expire: Duration::from_secs(100),
            ..Default::default()
        };
        let mut t = Tree::new();
        t.insert(&[1, 2, 3], loc(1), Duration::from_secs(0), &cfg);
        t.insert(&[1, 2, 3, 4], loc(2), Duration::from_secs(50), &cfg);
        let at = |s| Duration::from_secs(s);
        assert_eq!(
            ids(t.match_all(&[1, 2, 3, 4], 5, at(99), &cfg)),
            BTreeMap::from([(1, 3), (2, 4)])
        );
        // loc 1's tag on [1,2,3] expired at 100 although the node was refreshed at 50.
        assert_eq!(
            ids(t.match_all(&[1, 2, 3, 4], 5, at(120), &cfg)),
            BTreeMap::from([(2, 4)])
        );
        // Query is read-only: nothing was removed.
        assert_eq!(t.node_count(), 2);
        assert_eq!(t.expire(at(120), &cfg, 100), (0, false));
        assert_eq!(
            ids(t.match_all(&[1, 2, 3, 4], 5, at(150), &cfg)),
            BTreeMap::new()
        );
        assert_eq!(t.expire(at(150), &cfg, 100), (2, false));
        assert!(t.is_empty());
        assert_eq!(t.cost(), 0);
        t.check();
    }

    #[test]
    fn gc_is_incremental() {
        let cfg = CacheConfig {
            expire: Duration::from_secs(10),
            ..Default::default()
        };
        let mut t = Tree::new();
        for i in 0..50u64 {
            t.insert(&[i, i + 1000], loc(1), Duration::from_secs(0), &cfg);
        }
        let (n, more) = t.expire(Duration::from_secs(10), &cfg, 20);
        assert_eq!((n, more), (20, true));
        let (n, more) = t.expire(Duration::from_secs(10), &cfg, 1000);
        assert_eq!((n, more), (30, false));
        t.check();
    }

    #[test]
    fn budget_evicts_least_recently_used_paths() {
        // Each 4-hash path costs 1 node + 4 hashes + 1 tag = 6 entries.
        let cfg = CacheConfig {
            max_entries_per_cluster: 60,
            ..Default::default()
        };
        let mut t = Tree::new();
        let mut evicted = 0;
        for i in 0..20u64 {
            evicted += t.insert(
                &[i, 100 + i, 200 + i, 300 + i],
                loc(1),
                Duration::from_secs(i),
                &cfg,
            );
            t.check();
            assert!(t.cost() <= 60);
        }
        assert_eq!(evicted, 10);
        // Paths 0..9 are gone, 10..19 remain.
        assert!(t
            .match_all(&[9, 109], 5, Duration::from_secs(20), &cfg)
            .is_empty());
        assert_eq!(
            ids(t.match_all(&[10, 110], 5, Duration::from_secs(20), &cfg)),
            BTreeMap::from([(1, 2)])
        );
        // Re-using an old path refreshes it, so the next eviction takes the now-oldest one.
        t.insert(&[10, 110, 210, 310], loc(2), Duration::from_secs(30), &cfg);
        t.insert(&[50, 150, 250, 350], loc(1), Duration::from_secs(31), &cfg);
        t.check();
        assert!(!t
            .match_all(&[10], 5, Duration::from_secs(32), &cfg)
            .is_empty());
        assert!(t
            .match_all(&[11], 5, Duration::from_secs(32), &cfg)
            .is_empty());
    }

    #[test]
    fn location_tags_per_node_are_capped() {
        let cfg = CacheConfig {
            max_locations_per_node: 3,
            ..Default::default()
        };
        let mut t = Tree::new();
        for l in 1..=5u32 {
            t.insert(&[7, 8], loc(l), Duration::from_secs(u64::from(l)), &cfg);
        }
        t.check();
        assert_eq!(
            ids(t.match_all(&[7, 8], 10, Duration::from_secs(6), &cfg)),
            BTreeMap::from([(3, 2), (4, 2), (5, 2)])
        );
    }

    #[test]
    fn random_operations_keep_the_structure_consistent() {
        let cfg = CacheConfig {
            max_entries_per_cluster: 400,
            expire: Duration::from_secs(50),
            max_locations_per_node: 4,
            ..Default::default()
        };
        let mut t = Tree::new();
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for step in 0..3000u64 {
            let len = (rnd() % 12) as usize;
            let base = rnd() % 4;
            // Cumulative-looking paths sharing prefixes.
            let keys: Vec<u64> = (0..len)
                .map(|i| base * 100 + (i as u64) * ((rnd() % 3 == 0) as u64 + 1))
                .collect();
            let now = Duration::from_secs(step / 10);
            match rnd() % 5 {
                0 => {
                    t.expire(now, &cfg, 7);
                }
                1 => {
                    let got = t.match_all(&keys, 3, now, &cfg);
                    assert!(got.len() <= 3);
                    assert!(got.iter().all(|(_, d)| *d <= keys.len() && *d > 0));
                }
                _ => {
                    t.insert(&keys, loc((rnd() % 6) as u32), now, &cfg);
                    if !keys.is_empty() {
                        // A path just saved is found in full by its location.
                        let got = t.match_all(&keys, 100, now, &cfg);
                        assert_eq!(got[0].1, keys.len(), "{keys:?} {got:?}");
                    }
                }
            }
            assert!(t.cost() <= 400);
        }
        t.check();
    }

    #[test]
    fn pool_creates_queries_and_drops_empty_trees() {
        let cfg = CacheConfig {
            expire: Duration::from_secs(10),
            max_clusters: 2,
            ..Default::default()
        };
        let p = CachePool::new(cfg);
        assert!(p.query("m", &[1], 0, Duration::ZERO).is_empty());
        p.save("m", &[1, 2], loc(1), Duration::from_secs(1));
        p.save("n", &[1, 2], loc(2), Duration::from_secs(2));
        assert_eq!(
            ids(p.query("m", &[1, 2, 3], 0, Duration::from_secs(3))),
            BTreeMap::from([(1, 2)])
        );
        p.save("o", &[5], loc(3), Duration::from_secs(4)); // evicts "m", least recently used
        assert_eq!(p.cluster_count(), 2);
        assert!(p.query("m", &[1, 2], 0, Duration::from_secs(4)).is_empty());
        assert_eq!(p.gc(Duration::from_secs(13), 10), 1, "n's node expired");
        assert_eq!(
            p.cluster_count(),
            1,
            "n dropped: empty and unused for a TTL"
        );
        assert_eq!(p.level_stats("o").unwrap()[&1].nodes_count, 1);
    }

    #[test]
    fn the_estimate_follows_every_change_and_leaves_with_the_trees() {
        let budget = Arc::new(MemoryBudget::unlimited());
        let cfg = CacheConfig {
            expire: Duration::from_secs(10),
            max_clusters: 3,
            max_entries_per_cluster: 50,
            ..Default::default()
        };
        let p = CachePool::with_budget(cfg, budget.clone());
        let recount = |p: &CachePool| -> u64 {
            p.trees
                .read()
                .iter()
                .map(|(k, h)| (TREE_BYTES + k.len() + h.tree.read().bytes()) as u64)
                .sum()
        };
        for i in 0..200u64 {
            let path: Vec<u64> = (0..(i % 7)).map(|k| (i % 5) * 10 + k).collect();
            p.save(
                &format!("c{}", i % 4),
                &path,
                loc((i % 3) as u32),
                Duration::from_secs(i / 10),
            );
            assert_eq!(budget.cache_bytes(), recount(&p));
        }
        p.gc(Duration::from_secs(25), 3);
        assert_eq!(budget.cache_bytes(), recount(&p));
        p.gc(Duration::from_secs(100), 3);
        assert_eq!(budget.cache_bytes(), recount(&p));
        drop(p);
        assert_eq!(budget.cache_bytes(), 0);
    }

    mod model {
        //! Property: with no capacity pressure, a location's answer is the longest common
        //! prefix of the query with any of its paths saved within the TTL. The tree must agree
        //! with that brute-force model for any keys (cumulative or not).
        use super::*;
        use proptest::prelude::*;

        fn lcp_len(a: &[u64], b: &[u64]) -> usize {
            a.iter().zip(b).take_while(|(x, y)| x == y).count()
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(300))]
            #[test]
            fn tree_matches_brute_force(
                saves in prop::collection::vec(
                    (prop::collection::vec(0u64..4, 0..7), 0u32..5, 0u64..3),
                    1..40,
                ),
                queries in prop::collection::vec(prop::collection::vec(0u64..4, 0..8), 1..10),
                extra in 0u64..12,
            ) {
                let cfg = CacheConfig { expire: Duration::from_secs(10), ..Default::default() };
                let mut t = Tree::new();
                let mut now = 0u64;
                let mut saved: Vec<(Vec<u64>, u32, u64)> = Vec::new();
                for (path, l, dt) in &saves {
                    now += dt;
                    t.insert(path, loc(*l), Duration::from_secs(now), &cfg);
                    saved.push((path.clone(), *l, now));
                }
                t.check();
                let at = now + extra;
                for q in &queries {
                    let got = ids(t.match_all(q, usize::MAX, Duration::from_secs(at), &cfg));
                    let mut want: BTreeMap<u32, usize> = BTreeMap::new();
                    for (p, l, when) in &saved {
                        let d = lcp_len(q, p);
                        if d > 0 && when + 10 > at {
                            let e = want.entry(*l).or_insert(0);
                            *e = (*e).max(d);
                        }
                    }
                    prop_assert_eq!(&got, &want, "query {:?} at {}", q, at);
                }
                // GC removes exactly what queries already ignored.
                t.expire(Duration::from_secs(at), &cfg, usize::MAX);
                t.check();
                for q in &queries {
                    let after = ids(t.match_all(q, usize::MAX, Duration::from_secs(at), &cfg));
                    let mut want: BTreeMap<u32, usize> = BTreeMap::new();
                    for (p, l, when) in &saved {
                        let d = lcp_len(q, p);
                        if d > 0 && when + 10 > at {
                            let e = want.entry(*l).or_insert(0);
                            *e = (*e).max(d);
                        }
                    }
                    prop_assert_eq!(after, want);
                }
            }
        }
    }
}
