//! The cache query's per-location age limits (`max_age_ms`, our extension of the origin's
//! wire): a location's claims saved longer ago than its limit count as absent for that query.
//! Gateways send how long they expect each endpoint to keep a prefix in its KV cache, so claims
//! are aged as their own index's are instead of living for the whole cache TTL.

use std::time::Duration;

use hashbrown::HashMap;

use crate::endpoint::Endpoint;

/// Per location, the oldest claim a query accepts, in ms; locations not listed: the TTL.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MaxAges {
    /// By endpoint, for the in-memory tree.
    by_endpoint: HashMap<Endpoint, u64>,
    /// By the endpoint's canonical text, as the Redis store's tags name it.
    by_name: HashMap<Box<[u8]>, u64>,
}

impl MaxAges {
    /// The limits `(location, ms)`.
    pub fn new(limits: impl IntoIterator<Item = (Endpoint, u64)>) -> Self {
        let by_endpoint: HashMap<Endpoint, u64> = limits.into_iter().collect();
        let by_name = (by_endpoint.iter())
            .map(|(ep, &ms)| (ep.to_string().into_bytes().into_boxed_slice(), ms))
            .collect();
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
        match self.by_endpoint.get(loc) {
            Some(&ms) => ttl.min(Duration::from_millis(ms)),
            None => ttl,
        }
    }

    /// [`MaxAges::expire_of`] for a location named by its canonical text, in ms.
    pub fn ttl_ms_of(&self, name: &[u8], ttl_ms: u64) -> u64 {
        if self.by_name.is_empty() {
            return ttl_ms;
        }
        self.by_name.get(name).map_or(ttl_ms, |&ms| ttl_ms.min(ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listed_location_gets_the_shorter_of_its_limit_and_the_ttl() {
        let (a, b): (Endpoint, Endpoint) =
            ("10.0.0.1:80".parse().unwrap(), "fd00::1".parse().unwrap());
        let ages = MaxAges::new([(a, 5_000), (b, 90_000)]);
        let ttl = Duration::from_secs(60);
        assert_eq!(ages.expire_of(&a, ttl), Duration::from_secs(5));
        assert_eq!(ages.expire_of(&b, ttl), ttl);
        let other: Endpoint = "10.0.0.2:80".parse().unwrap();
        assert_eq!(ages.expire_of(&other, ttl), ttl);
        assert_eq!(ages.ttl_ms_of(b"10.0.0.1:80", 60_000), 5_000);
        assert_eq!(ages.ttl_ms_of(b"fd00::1", 60_000), 60_000);
        assert_eq!(ages.ttl_ms_of(b"10.0.0.2:80", 60_000), 60_000);
        assert!(MaxAges::default().is_empty() && !ages.is_empty());
    }
}
