//! The key layout in Redis. Every key of a cluster carries the cluster name as its hash tag
//! (`{…}`), so all of one cluster's keys live in one Redis Cluster slot and each script touches
//! one node. `P` is the key prefix (`[Store] KeyPrefix`, default `llmproxy-mc`):
//!
//! | key | type | holds | TTL |
//! |---|---|---|---|
//! | `P:{C}:req` | hash | request id → `engine \n prompt left` | load TTL, refreshed by each write |
//! | `P:{C}:exp` | sorted set | request id, scored by its expiry (ms) | load TTL |
//! | `P:{C}:eng` | hash | `q|engine` queued, `p|engine` prompt, `t|engine` updated (ns) | load TTL |
//! | `P:rid:{R}` | string | request id → its cluster (deletes carry no cluster) | load TTL |
//! | `P:{C}:nodes` | hash | prefix digest → `location=ms,…` (its tags, newest first) | cache TTL |
//! | `P:{C}:lru` | sorted set | prefix digests scored by last write (ms) | cache TTL |
//!
//! A prefix is named by a digest of the whole prefix (all its hashes, in order), computed here,
//! so a node of the in-memory radix tree is one field, whatever the client's hashes are.

/// The hash tag of a cluster: its name with `%`, `{` and `}` escaped (a `}` in the name would
/// end the tag early and split the cluster over slots).
pub fn tag(cluster: &str) -> String {
    let mut out = String::with_capacity(cluster.len() + 2);
    out.push('{');
    for c in cluster.chars() {
        match c {
            '%' => out.push_str("%25"),
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            c => out.push(c),
        }
    }
    out.push('}');
    out
}

/// The keys of one cluster.
pub struct ClusterKeys {
    base: String,
}

impl ClusterKeys {
    pub fn new(prefix: &str, cluster: &str) -> Self {
        ClusterKeys {
            base: format!("{prefix}:{}", tag(cluster)),
        }
    }

    /// Requests in flight: id → `engine \n prompt left`.
    pub fn requests(&self) -> String {
        format!("{}:req", self.base)
    }

    /// Requests in flight by expiry.
    pub fn expiry(&self) -> String {
        format!("{}:exp", self.base)
    }

    /// Per-engine counters.
    pub fn engines(&self) -> String {
        format!("{}:eng", self.base)
    }

    /// Prefix digests by last write.
    pub fn lru(&self) -> String {
        format!("{}:lru", self.base)
    }

    /// Prefix nodes: digest → tags.
    pub fn nodes(&self) -> String {
        format!("{}:nodes", self.base)
    }
}

/// A prefix digest as a field name: 16 lower-case hex digits (on the stack: a query names 72
/// of them).
pub fn digest_field(d: u64) -> [u8; 16] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = HEX[((d >> (60 - 4 * i)) & 0xf) as usize];
    }
    out
}

/// The index from a request id to its cluster.
pub fn request_index(prefix: &str, request_id: &str) -> String {
    format!("{prefix}:rid:{}", tag(request_id))
}

/// The digests of every prefix of `hashes` (one per position): each names the whole prefix up
/// to it, so two different prefixes ending in the same hash are two nodes, as in the tree.
pub fn prefix_digests(hashes: &[u64]) -> Vec<u64> {
    let mut d = 0x6c6c_6d70_726f_7879_u64; // "llmproxy"
    hashes
        .iter()
        .map(|&h| {
            d = mix(d ^ mix(h));
            d
        })
        .collect()
}

/// splitmix64's finalizer: a bijective 64-bit mix.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_cluster_one_tag_even_with_braces_in_its_name() {
        assert_eq!(tag("m"), "{m}");
        assert_eq!(tag("a}b{c%"), "{a%7Db%7Bc%25}");
        let k = ClusterKeys::new("p", "x}y");
        for key in [k.requests(), k.expiry(), k.engines(), k.lru(), k.nodes()] {
            assert!(key.starts_with("p:{x%7Dy}:"), "{key}");
        }
        assert_eq!(request_index("p", "r1"), "p:rid:{r1}");
    }

    #[test]
    fn a_digest_field_is_its_hex() {
        for d in [0, 1, 0xdead_beef, u64::MAX, 0x0123_4567_89ab_cdef] {
            assert_eq!(digest_field(d), format!("{d:016x}").as_bytes());
        }
    }

    #[test]
    fn a_digest_names_the_whole_prefix() {
        let a = prefix_digests(&[1, 2, 3]);
        let b = prefix_digests(&[1, 2, 4]);
        let c = prefix_digests(&[9, 2, 3]);
        assert_eq!(a[..2], b[..2]);
        assert_ne!(a[2], b[2]);
        assert_ne!(a[2], c[2], "same last hash, different prefix");
        assert_ne!(a[1], c[1]);
    }
}
