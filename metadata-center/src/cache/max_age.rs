//! The cache query's per-location age limits (`max_age_ms`, our extension of the origin's
//! wire): a location's claims saved longer ago than its limit count as absent for that query.
//! Gateways send how long they expect each endpoint to keep a prefix in its KV cache, so claims
//! are aged as their own index's are instead of living for the whole cache TTL.
//!
//! Built once per query that carries limits and read once per tag the query's walk visits, so
//! both sides are cheap: no hashing, no formatting; two sorted lists searched by bisection.

use std::time::Duration;

use crate::endpoint::Endpoint;

/// Per location, the oldest claim a query accepts, in ms; locations not listed: the TTL.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MaxAges {
    /// By endpoint (the in-memory tree's tags), sorted.
    by_endpoint: Vec<(Endpoint, u64)>,
    /// By name as the query sent it (the Redis store's tags are the saved `ip` in canonical
    /// text, which is what a gateway sends back), sorted.
    by_name: Vec<(Box<str>, u64)>,
}

impl MaxAges {
    /// The limits `(location, ms)`; a location listed twice keeps its last limit.
    pub fn new(limits: impl IntoIterator<Item = (Endpoint, u64)>) -> Self {
        Self::from_named(limits.into_iter().map(|(ep, ms)| (ep, ep.to_string(), ms)))
    }

    /// The limits `(location, name as sent, ms)` of a query; a name listed twice keeps its
    /// last limit.
    pub fn from_named(limits: impl IntoIterator<Item = (Endpoint, String, u64)>) -> Self {
        let mut by_endpoint = Vec::new();
        let mut by_name = Vec::new();
        for (ep, name, ms) in limits {
            by_endpoint.push((ep, ms));
            by_name.push((name.into_boxed_str(), ms));
        }
        // reversed, stable sorts put the last limit first among equals; dedup keeps the first
        by_endpoint.reverse();
        by_name.reverse();
        by_endpoint.sort_by_key(|(ep, _)| *ep);
        by_endpoint.dedup_by_key(|(ep, _)| *ep);
        by_name.sort_by(|a, b| a.0.cmp(&b.0));
        by_name.dedup_by(|a, b| a.0 == b.0);
        MaxAges {
            by_endpoint,
            by_name,
        }
    }

    /// True when no location has a limit (every claim lives for the TTL).
    pub fn is_empty(&self) -> bool {
        self.by_endpoint.is_empty()
    }

    /// How long `loc`'s claims count: `ttl`, or the location's limit when shorter.
    pub fn expire_of(&self, loc: &Endpoint, ttl: Duration) -> Duration {
        if self.by_endpoint.is_empty() {
            return ttl;
        }
        match self.by_endpoint.binary_search_by(|(ep, _)| ep.cmp(loc)) {
            Ok(i) => ttl.min(Duration::from_millis(self.by_endpoint[i].1)),
            Err(_) => ttl,
        }
    }

    /// [`MaxAges::expire_of`] for a location named by its text, in ms.
    pub fn ttl_ms_of(&self, name: &[u8], ttl_ms: u64) -> u64 {
        if self.by_name.is_empty() {
            return ttl_ms;
        }
        match (self.by_name).binary_search_by(|(n, _)| n.as_bytes().cmp(name)) {
            Ok(i) => ttl_ms.min(self.by_name[i].1),
            Err(_) => ttl_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listed_location_gets_the_shorter_of_its_limit_and_the_ttl() {
        let ep = |s: &str| -> Endpoint { s.parse().unwrap() };
        let (a, b) = (ep("10.0.0.1:80"), ep("fd00::1"));
        let ages = MaxAges::new([(a, 1), (b, 90_000), (a, 5_000)]);
        let ttl = Duration::from_secs(60);
        assert_eq!(
            ages.expire_of(&a, ttl),
            Duration::from_secs(5),
            "the last limit"
        );
        assert_eq!(ages.expire_of(&b, ttl), ttl);
        assert_eq!(ages.expire_of(&ep("10.0.0.2:80"), ttl), ttl);
        assert_eq!(ages.ttl_ms_of(b"10.0.0.1:80", 60_000), 5_000);
        assert_eq!(ages.ttl_ms_of(b"fd00::1", 60_000), 60_000);
        assert_eq!(ages.ttl_ms_of(b"10.0.0.2:80", 60_000), 60_000);
        assert!(MaxAges::default().is_empty() && !ages.is_empty());
        // many locations: each found by bisection
        let many: Vec<(Endpoint, u64)> = (0..300u64)
            .map(|i| (ep(&format!("10.0.{}.{}:8000", i / 200, i % 200)), 1_000 + i))
            .collect();
        let ages = MaxAges::new(many.clone());
        for (loc, ms) in many {
            assert_eq!(ages.expire_of(&loc, ttl), Duration::from_millis(ms));
            assert_eq!(ages.ttl_ms_of(loc.to_string().as_bytes(), 60_000), ms);
        }
    }
}
