//! The radix tree of one cluster: cumulative prompt-chunk hashes (u64) along its paths, each
//! node tagged with the locations (engines) that saved a path through it, and when.
//!
//! Behaviour follows the origin (`pkg/meta/cache`, see spec 1.5): every node on an inserted path
//! carries the location; a query returns, per location, the number of leading chunks matched
//! (its deepest node on the query path), top-K by depth; nodes and location entries expire after
//! `expire` (1 h). Differences, all fixing origin defects:
//! * bounded memory: a budget of entries per tree (nodes + stored hashes + location tags) and a
//!   cap on location tags per node; the least recently used nodes are evicted first;
//! * a query is read-only (expired data is skipped, GC removes it);
//! * GC never disables a tree: expired nodes are exactly the oldest part of the LRU list, so a
//!   pass pops them from the head in batches (`expire`);
//! * a query stops at the first partial match inside a node.
//!
//! LRU invariant: an insert touches its path from the deepest node up to the root's child, so
//! every node sits after all of its descendants in the LRU list; the list head is always a leaf
//! and evicting it never orphans a subtree.
//!
//! The tree knows nothing of the pool, the locks or the memory budget (`cache/mod.rs`): it
//! reports its size (`bytes`, `cost`) and evicts when told. `CacheConfig` lives here because
//! most of it (TTL, per-tree and per-node caps) is read by the tree; the pool reads the rest.

use std::time::Duration;

use hashbrown::HashMap;
use serde::Serialize;
use slab::Slab;
use smallvec::SmallVec;

use super::MaxAges;
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
/// Estimated bytes of an empty tree: the tree, its root and the slab's first allocation (room
/// for 4 nodes).
pub const EMPTY_TREE_BYTES: usize =
    std::mem::size_of::<Tree>() + NODE_BYTES + 2 * std::mem::size_of::<Node>();

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
        self.match_within(keys, top_k, now, cfg, &MaxAges::default())
    }

    /// [`Tree::match_all`] counting each location's tags older than its limit in `ages` (when
    /// shorter than the configured expiry) as absent.
    pub fn match_within(
        &self,
        keys: &[u64],
        top_k: usize,
        now: Duration,
        cfg: &CacheConfig,
        ages: &MaxAges,
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
                if t + ages.expire_of(&loc, cfg.expire) <= now {
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
    pub(crate) fn check(&self) {
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
