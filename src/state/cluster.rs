//! Clusters: named groups of endpoints whose endpoint set is swapped as a whole (readers never
//! lock), and [`Clusters`], the router's registry of them, which owns endpoint-set
//! replacement (configured sets, `set_endpoints`, DNS re-resolution).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use super::shared::PRIVATE_ID;
use super::{Attachment, Endpoint};
use crate::config::EndpointSpec;

/// An immutable view of a cluster's endpoints, swapped as a whole.
pub struct EndpointSet {
    /// The endpoints, in configured order.
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Endpoint id → position in `endpoints` (read for every chunk of every pick: a fast
    /// non-cryptographic hash; ids are ours, not the client's).
    pub position: hashbrown::HashMap<u32, usize>,
}

impl EndpointSet {
    pub(crate) fn new(endpoints: Vec<Arc<Endpoint>>) -> Self {
        let position = endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| (e.id, i))
            .collect();
        Self {
            endpoints,
            position,
        }
    }
}

/// A named group of endpoints that serve the same model(s).
pub struct Cluster {
    /// Cluster name (Envoy cluster, metadata-center key).
    pub name: String,
    endpoints: ArcSwap<EndpointSet>,
    /// Round-robin cursor.
    pub rr_cursor: AtomicUsize,
    /// Router time of the last pick, ms (0 = never): active clusters are polled.
    last_pick_ms: AtomicU64,
}

impl Cluster {
    /// An empty cluster.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            endpoints: ArcSwap::from_pointee(EndpointSet::new(Vec::new())),
            rr_cursor: AtomicUsize::new(0),
            last_pick_ms: AtomicU64::new(0),
        }
    }

    /// Marks the cluster as used at `now_ms`.
    pub fn touch(&self, now_ms: u64) {
        self.last_pick_ms.store(now_ms.max(1), Ordering::Relaxed);
    }

    /// True when the cluster saw a pick within `window_ms` of `now_ms`.
    pub fn is_active(&self, now_ms: u64, window_ms: u64) -> bool {
        let t = self.last_pick_ms.load(Ordering::Relaxed);
        t != 0 && now_ms.saturating_sub(t) <= window_ms
    }

    /// The current endpoint set (lock-free).
    pub fn snapshot(&self) -> Arc<EndpointSet> {
        self.endpoints.load_full()
    }

    /// Replaces the endpoint set. Endpoints whose address stays keep their state;
    /// `make` creates the new ones. Callers serialise replacements.
    pub fn replace(&self, addrs: &[SocketAddr], mut make: impl FnMut(SocketAddr) -> Endpoint) {
        let old = self.endpoints.load();
        let by_addr: HashMap<SocketAddr, &Arc<Endpoint>> =
            old.endpoints.iter().map(|e| (e.addr, e)).collect();
        let mut seen = std::collections::HashSet::new();
        let next: Vec<Arc<Endpoint>> = addrs
            .iter()
            .filter(|a| seen.insert(**a))
            .map(|a| match by_addr.get(a) {
                Some(e) => Arc::clone(e),
                None => Arc::new(make(*a)),
            })
            .collect();
        self.endpoints.store(Arc::new(EndpointSet::new(next)));
    }
}

/// Every cluster of a router by name, and the one place endpoint sets are replaced.
///
/// Shared by the router (which reads it on every pick) and the background threads (which
/// poll remote load for active clusters and replace DNS clusters' endpoints).
pub struct Clusters {
    by_name: ArcSwap<hashbrown::HashMap<String, Arc<Cluster>>>,
    /// Labels and LoRA adapters of configured endpoints, by cluster.
    specs: BTreeMap<String, Vec<EndpointSpec>>,
    /// Number of models (per-model histograms of each endpoint).
    models: usize,
    next_endpoint_id: AtomicU32,
    /// Endpoint-set replacements through the API or DNS.
    updates: AtomicU64,
    /// Serialises replacements (never taken on the request path).
    update_lock: Mutex<()>,
    /// The shared region the endpoints' counters live in (None: in each endpoint).
    shared: Option<Arc<Attachment>>,
}

impl Clusters {
    /// An empty registry; `specs` gives configured endpoints their labels and adapters;
    /// `shared`, when given, is where new endpoints keep their counters.
    pub fn new(
        specs: BTreeMap<String, Vec<EndpointSpec>>,
        models: usize,
        shared: Option<Arc<Attachment>>,
    ) -> Self {
        Self {
            shared,
            by_name: ArcSwap::from_pointee(hashbrown::HashMap::new()),
            specs,
            models,
            next_endpoint_id: AtomicU32::new(1),
            updates: AtomicU64::new(0),
            update_lock: Mutex::new(()),
        }
    }

    /// The cluster named `name` (lock-free).
    pub fn get(&self, name: &str) -> Option<Arc<Cluster>> {
        self.by_name.load().get(name).cloned()
    }

    /// Every cluster, sorted by name.
    pub fn all(&self) -> Vec<Arc<Cluster>> {
        let map = self.by_name.load();
        let mut all: Vec<Arc<Cluster>> = map.values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Endpoint sets replaced through the API or DNS so far.
    pub fn updates(&self) -> u64 {
        self.updates.load(Ordering::Relaxed)
    }

    /// Replaces a cluster's endpoints (created if unknown); endpoints that stay keep their
    /// state. `count` says whether the update counts in [`Clusters::updates`].
    pub fn replace(&self, cluster: &str, endpoints: &[SocketAddr], count: bool) {
        let _guard = self.update_lock.lock().unwrap_or_else(|p| p.into_inner());
        let c = match self.get(cluster) {
            Some(c) => c,
            None => {
                let c = Arc::new(Cluster::new(cluster));
                let mut map = hashbrown::HashMap::clone(&self.by_name.load());
                map.insert(cluster.to_string(), Arc::clone(&c));
                self.by_name.store(Arc::new(map));
                c
            }
        };
        let specs = self.specs.get(cluster);
        c.replace(endpoints, |addr| {
            let lease = self.shared.as_ref().and_then(|s| s.lease(cluster, addr));
            let mut e = match lease {
                Some(lease) => Endpoint::shared(addr, self.models, lease),
                // In-process, or the region's endpoint table is full: counters of its own,
                // with an id no other process uses for the prefix index.
                None => {
                    let id = self.next_endpoint_id.fetch_add(1, Ordering::Relaxed);
                    let private = if self.shared.is_some() { PRIVATE_ID } else { 0 };
                    Endpoint::new(id | private, addr, self.models)
                }
            };
            // Labels and adapters come from the config's entry for this address, if any.
            if let Some(spec) = specs.and_then(|s| s.iter().find(|s| s.addr == addr)) {
                e.labels = spec.labels.clone();
                e.lora_adapters = spec.lora_adapters.clone();
            }
            e
        });
        if count {
            self.updates.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Replaces a DNS cluster's endpoints when the resolved set (sorted) changed.
    pub fn update_resolved(&self, cluster: &str, addrs: &[SocketAddr]) {
        let mut current: Vec<SocketAddr> = self
            .get(cluster)
            .map(|c| c.snapshot().endpoints.iter().map(|e| e.addr).collect())
            .unwrap_or_default();
        current.sort();
        if current != addrs {
            self.replace(cluster, addrs, true);
        }
    }
}
