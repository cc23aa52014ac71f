//! Reading a cache query's reply: the nodes Redis returned (one bulk string of tags
//! `location=ms,…` per prefix, nil when absent) walked as the in-memory tree would be.

use redis::Value;

use crate::cache::MaxAges;
use crate::endpoint::Endpoint;

/// How long a query counts a tag, ms: the cache TTL, or a location's shorter limit.
#[derive(Clone, Copy)]
pub struct Ttl<'a> {
    /// The cache TTL in ms.
    pub ms: u64,
    /// The query's per-location limits (`max_age_ms`).
    pub ages: &'a MaxAges,
}

/// The cache query's walk over the query's nodes (shortest prefix first) at Redis time
/// `now_ms`: down the query until a prefix has no live tag (as the tree stops at the first
/// missing node), each location at its deepest prefix; deepest first, then most recently
/// saved, then by address; at most `k`. A tag is live while younger than `ttl` allows for
/// its location.
///
/// Done in two passes: the first finds where the walk ends (a node is live as soon as one tag
/// is: tags are stored newest first, so that is nearly always the first); the second goes back
/// up from there, so a location's first tag met is its deepest, and stops before a node once
/// `k` locations were found deeper (any found higher up would rank after them).
///
/// A node whose bytes equal its neighbour's is not read again in either pass (same tags, same
/// liveness, no location the deeper one did not already give): the private part of a prompt,
/// saved at once for one location, is a run of identical nodes.
pub fn walk(nodes: &[Option<&[u8]>], now_ms: u64, ttl: Ttl, k: usize) -> Vec<(Endpoint, usize)> {
    let live = Liveness { now_ms, ttl };
    // (a node equal to the one above it is live: the walk only gets there past a live one)
    let mut above: Option<&[u8]> = None;
    let end = nodes
        .iter()
        .position(|node| {
            let Some(n) = *node else { return true };
            above.replace(n) != Some(n) && live_tags(n, live).next().is_none()
        })
        .unwrap_or(nodes.len());
    let k = k.max(1);
    // every location met (borrowed from the nodes), and those that are addresses with their
    // deepest live prefix and its tag's time
    let mut seen: Vec<&[u8]> = Vec::new();
    let mut found: Vec<(Endpoint, usize, u64)> = Vec::new();
    // every node above `end` is present (the first pass stopped at a missing one)
    let mut deeper: Option<&[u8]> = None;
    for (i, node) in nodes[..end].iter().enumerate().rev() {
        if found.len() >= k {
            break;
        }
        let node = node.unwrap_or_default();
        if deeper.replace(node) == Some(node) {
            continue;
        }
        let depth = i + 1;
        for (loc, ms) in live_tags(node, live) {
            if seen.contains(&loc) {
                continue;
            }
            seen.push(loc);
            if let Some(ep) = std::str::from_utf8(loc).ok().and_then(|l| l.parse().ok()) {
                found.push((ep, depth, ms));
            }
        }
    }
    found.sort_by(|a, b| b.1.cmp(&a.1).then(b.2.cmp(&a.2)).then(a.0.cmp(&b.0)));
    found.truncate(k);
    found.into_iter().map(|(ep, d, _)| (ep, d)).collect()
}

/// A reply's bytes: `None` for a nil (an absent field), or anything but a bulk string.
pub fn bulk_string(reply: &Value) -> Option<&[u8]> {
    match reply {
        Value::BulkString(bytes) => Some(bytes),
        _ => None,
    }
}

/// When a tag of a query is live.
#[derive(Clone, Copy)]
struct Liveness<'a> {
    now_ms: u64,
    ttl: Ttl<'a>,
}

impl Liveness<'_> {
    /// True when `loc`'s tag stamped at `ms` is live.
    fn holds(&self, loc: &[u8], ms: u64) -> bool {
        let ttl_ms = self.ttl.ages.ttl_ms_of(loc, self.ttl.ms);
        ms > self.now_ms.saturating_sub(ttl_ms)
    }
}

/// A node's well-formed tags (`location=ms`) that are live, in stored order.
fn live_tags<'n>(node: &'n [u8], live: Liveness<'n>) -> impl Iterator<Item = (&'n [u8], u64)> {
    let mut start = 0;
    let tags = memchr::memchr_iter(b',', node)
        .chain([node.len()])
        .map(move |end| {
            let tag = &node[start..end];
            start = end + 1;
            tag
        });
    tags.filter_map(move |tag| {
        let eq = memchr::memchr(b'=', tag)?;
        let ms = parse_digits(&tag[eq + 1..])?;
        let loc = &tag[..eq];
        live.holds(loc, ms).then_some((loc, ms))
    })
}

/// A decimal number of at most 19 digits (a tag's time, a `TIME` field), else `None`.
pub fn parse_digits(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_parse_only_when_all_are_digits_and_fit() {
        assert_eq!(parse_digits(b"1733300000123"), Some(1_733_300_000_123));
        assert_eq!(parse_digits(b"0"), Some(0));
        assert_eq!(
            parse_digits(b"9999999999999999999"),
            Some(9_999_999_999_999_999_999)
        );
        for bad in [
            &b""[..],
            b"12a",
            b"+12",
            b"-1",
            b"1 ",
            b"10000000000000000000",
        ] {
            assert_eq!(parse_digits(bad), None, "{:?}", std::str::from_utf8(bad));
        }
    }

    /// A TTL of `ms` with no per-location limits.
    fn plain(ms: u64) -> Ttl<'static> {
        static NONE: std::sync::LazyLock<MaxAges> = std::sync::LazyLock::new(MaxAges::default);
        Ttl { ms, ages: &NONE }
    }

    /// The walk as first written: down the nodes, each location's tag overwriting its last;
    /// `ages` by location text.
    fn reference_walk(
        nodes: &[Option<Vec<u8>>],
        now: u64,
        ttl: u64,
        ages: &[(String, u64)],
        k: usize,
    ) -> Vec<(Endpoint, usize)> {
        let live_after = |loc: &str| {
            let limit = ages
                .iter()
                .find(|(l, _)| l == loc)
                .map_or(ttl, |a| a.1.min(ttl));
            now.saturating_sub(limit)
        };
        let mut best: Vec<(String, usize, u64)> = Vec::new();
        for (depth, node) in nodes.iter().enumerate() {
            let Some(node) = node else { break };
            let mut live = false;
            for tag in std::str::from_utf8(node).unwrap().split(',') {
                let Some((loc, ms)) = tag.split_once('=') else {
                    continue;
                };
                let Ok(ms) = ms.parse::<u64>() else { continue };
                if ms <= live_after(loc) {
                    continue;
                }
                live = true;
                match best.iter_mut().find(|(l, _, _)| l == loc) {
                    Some(b) => (b.1, b.2) = (depth + 1, ms),
                    None => best.push((loc.to_string(), depth + 1, ms)),
                }
            }
            if !live {
                break;
            }
        }
        let mut found: Vec<(Endpoint, usize, u64)> = best
            .into_iter()
            .filter_map(|(l, d, ms)| Some((l.parse().ok()?, d, ms)))
            .collect();
        found.sort_by(|a, b| b.1.cmp(&a.1).then(b.2.cmp(&a.2)).then(a.0.cmp(&b.0)));
        found.truncate(k.max(1));
        found.into_iter().map(|(ep, d, _)| (ep, d)).collect()
    }

    proptest::proptest! {
        /// Random nodes (up to 6 locations and a malformed one, each at most once per node,
        /// times around the liveness bound, missing nodes, junk tags, runs of a node repeated):
        /// both walks agree.
        #[test]
        fn walk_answers_like_the_reference(
            nodes in proptest::collection::vec(
                (
                    proptest::option::weighted(0.9, proptest::collection::vec((0usize..8, 900u64..1100), 0..8)),
                    proptest::bool::weighted(0.4),
                ),
                0..24,
            ),
            k in 0usize..8,
            limits in proptest::collection::btree_map(0usize..7, 0u64..1500, 0..3),
        ) {
            let repeats: Vec<bool> = nodes.iter().map(|(_, repeat)| *repeat).collect();
            let mut nodes: Vec<Option<Vec<u8>>> = nodes
                .into_iter()
                .map(|(tags, _)| {
                    tags.map(|tags| {
                        let mut used = [false; 8];
                        let mut out: Vec<String> = Vec::new();
                        for (loc, ms) in tags {
                            if std::mem::replace(&mut used[loc], true) {
                                continue;
                            }
                            out.push(match loc {
                                6 => format!("not-an-address={ms}"),
                                7 => "junk".to_string(),
                                l => format!("10.0.0.{l}:80={ms}"),
                            });
                        }
                        out.join(",").into_bytes()
                    })
                })
                .collect();
            // runs of identical nodes (a prompt's private part saved at once), which the walk
            // reads once
            for i in 1..nodes.len() {
                if repeats[i] {
                    nodes[i] = nodes[i - 1].clone();
                }
            }
            let refs: Vec<Option<&[u8]>> = nodes.iter().map(|n| n.as_deref()).collect();
            proptest::prop_assert_eq!(walk(&refs, 2000, plain(1000), k), reference_walk(&nodes, 2000, 1000, &[], k));
            // per-location limits (`max_age_ms`), some beyond the TTL
            let ages = MaxAges::new(limits.iter().map(|(l, &ms)| (format!("10.0.0.{l}:80").parse().unwrap(), ms)));
            let named: Vec<(String, u64)> = limits.iter().map(|(l, &ms)| (format!("10.0.0.{l}:80"), ms)).collect();
            proptest::prop_assert_eq!(
                walk(&refs, 2000, Ttl { ms: 1000, ages: &ages }, k),
                reference_walk(&nodes, 2000, 1000, &named, k)
            );
        }
    }

    #[test]
    fn walk_stops_at_the_first_node_without_a_live_tag() {
        let node = |s: &'static str| Some(s.as_bytes());
        let (a, b, c): (Endpoint, Endpoint, Endpoint) = (
            "10.0.0.1:80".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
            "10.0.0.3:80".parse().unwrap(),
        );
        let nodes = vec![
            node("10.0.0.1:80=2000,10.0.0.2:80=1900,10.0.0.3:80=500"),
            // a malformed tag is skipped; c's tag is expired (TTL 1000 at time 2000)
            node("10.0.0.1:80=2000,junk,10.0.0.2:80=x,10.0.0.3:80=999"),
            node("10.0.0.1:80=1500"),
            // nothing live: the walk ends here, a's deeper tag below is not reached
            node("10.0.0.3:80=900"),
            node("10.0.0.1:80=2000"),
        ];
        assert_eq!(walk(&nodes, 2000, plain(1000), 5), vec![(a, 3), (b, 1)]);
        assert_eq!(walk(&nodes, 2000, plain(1000), 1), vec![(a, 3)]);
        // a missing node ends the walk as well
        assert_eq!(
            walk(
                &[node("10.0.0.3:80=1800"), None, node("10.0.0.1:80=1900")],
                2000,
                plain(1000),
                5
            ),
            vec![(c, 1)]
        );
        // a's claims younger than 400 ms only (`max_age_ms`): its tag of 1500 is past that
        let ages = MaxAges::new([(a, 400)]);
        let ttl = Ttl {
            ms: 1000,
            ages: &ages,
        };
        assert_eq!(walk(&nodes, 2000, ttl, 5), vec![(a, 2), (b, 1)]);
    }
}
