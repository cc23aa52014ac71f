//! The resolver thread: every DNS lookup the library makes happens here, never on the request
//! path and never on a thread that talks to the Metadata-Center. It re-resolves the
//! Metadata-Center's host name (every [`client::RESOLVE_EVERY`]) into [`ServerAddrs`] and the
//! DNS clusters (every `dns_refresh_ms`, Istio `outbound|PORT||HOST` names) into their
//! endpoint sets. A slow or black-holed resolver only delays this thread: calls use the last
//! good addresses, clusters keep their last good endpoints.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver};

use super::client::{self, ServerAddrs};
use crate::state::Clusters;

/// What the resolver thread keeps resolved.
pub struct Resolver {
    /// The Metadata-Center's addresses, when its host is a name.
    pub server: Option<Arc<ServerAddrs>>,
    /// DNS clusters: (cluster name, `host:port`).
    pub dns_clusters: Vec<(String, String)>,
    /// Where resolved DNS clusters go (held weakly: nothing to do once the router is gone).
    pub clusters: Weak<Clusters>,
    /// How often DNS clusters are re-resolved.
    pub dns_refresh: Duration,
}

impl Resolver {
    /// True when there is anything to resolve.
    pub fn has_work(&self) -> bool {
        self.server.is_some() || !self.dns_clusters.is_empty()
    }

    /// Resolves everything at once, then each kind on its own period, until `stop`.
    pub(super) fn run(&self, stop: Receiver<()>) {
        let mut next_server = Instant::now();
        let mut next_clusters = Instant::now();
        loop {
            if let Some(server) = &self.server {
                if Instant::now() >= next_server {
                    // A failure keeps the last good addresses.
                    if let Some(addrs) = server.name().and_then(resolve) {
                        server.set(addrs);
                    }
                    next_server = Instant::now() + client::RESOLVE_EVERY;
                }
            }
            if !self.dns_clusters.is_empty() && Instant::now() >= next_clusters {
                if !self.resolve_clusters() {
                    return; // the router is gone
                }
                next_clusters = Instant::now() + self.dns_refresh;
            }
            let mut next = Instant::now() + client::RESOLVE_EVERY;
            if self.server.is_some() {
                next = next.min(next_server);
            }
            if !self.dns_clusters.is_empty() {
                next = next.min(next_clusters);
            }
            select! {
                recv(stop) -> _ => return,
                default(next.saturating_duration_since(Instant::now())) => {}
            }
        }
    }

    /// Re-resolves the DNS clusters and swaps endpoint sets that changed; false once the
    /// clusters are gone.
    fn resolve_clusters(&self) -> bool {
        for (cluster, target) in &self.dns_clusters {
            let Some(addrs) = resolve(target.as_str()) else {
                continue; // keep the last good set
            };
            let Some(clusters) = self.clusters.upgrade() else {
                return false;
            };
            clusters.update_resolved(cluster, &addrs);
        }
        true
    }
}

/// Resolves `target` (blocking: only ever called on this thread): its addresses sorted and
/// deduplicated, None on failure or an empty answer.
fn resolve(target: impl ToSocketAddrs) -> Option<Vec<SocketAddr>> {
    let mut addrs: Vec<SocketAddr> = target.to_socket_addrs().ok()?.collect();
    addrs.sort();
    addrs.dedup();
    (!addrs.is_empty()).then_some(addrs)
}
