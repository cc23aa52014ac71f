//! Requests on a stored Responses answer: `GET`/`DELETE /v1/responses/{id}`, `GET
//! …/{id}/input_items`, `POST …/{id}/cancel` (clients polling a `background` answer, reading
//! or deleting one). Only the engine that stored the answer knows it. This gateway knows which
//! one when the answer came through it ([`RouterInner::bind_response`]), and another gateway's
//! answers through the Metadata-Center (each binding is saved there): such a request is
//! intercepted and pinned to that endpoint, in whichever cluster it is. An id nobody knows is
//! not routed: it passes through untouched to the host's own balancing, as any request outside
//! `intercept_paths` (`should_intercept` refuses it, or with remote lookups on, the pick ends
//! in [`PickError::PassThrough`] once the Metadata-Center has not found it either).
//!
//! These requests carry no prompt: no prefill is held, no TTFT observed, the answer not read
//! (its usage was counted when it was made), nothing reported to the Metadata-Center.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::pick::Routed;
use super::{find_header, HeaderRef, RouterInner};
use crate::background::client::{CacheQuery, Client};
use crate::error::PickError;
use crate::hashing;
use crate::request::{responses, RequestKind};
use crate::response::ResponseReader;
use crate::state::Cluster;
use crate::transcode::{Transcoder, UpstreamRequest};

/// Index of `pinned` in [`crate::metrics::CHAIN_RESULTS`].
const PINNED: usize = 0;
/// Index of `unknown`.
const UNKNOWN: usize = 1;

impl RouterInner {
    /// The answer id a request on a stored answer names, under any Responses path of
    /// `intercept_paths`.
    fn stored_answer_id<'p>(&self, method: &[u8], path: &'p [u8]) -> Option<&'p str> {
        self.config
            .intercept_paths
            .iter()
            .filter(|p| RequestKind::from_path(p) == Some(RequestKind::Responses))
            .find_map(|p| responses::stored_answer_id(method, path, p.as_bytes()))
    }

    /// The cluster holding the endpoint the answer's `key` is bound to here.
    fn stored_answer_home(&self, key: u64) -> Option<Arc<Cluster>> {
        let clusters = self.clusters.all();
        (clusters.into_iter()).find(|cluster| self.index.bound(key, &cluster.snapshot()).is_some())
    }

    /// True when `method` and `path` name a stored answer whose endpoint this gateway knows,
    /// or may learn from the Metadata-Center (remote lookups on): the request must go through
    /// `pick`. Otherwise it is counted as passed through.
    pub(super) fn intercepts_stored_answer(&self, method: &[u8], path: &[u8]) -> bool {
        let Some(id) = self.stored_answer_id(method, path) else {
            return false;
        };
        let key = hashing::response_key(id);
        let known = self.lookups.get().is_some() || self.stored_answer_home(key).is_some();
        if !known {
            self.metrics.stored_answer_requests[UNKNOWN].fetch_add(1, Ordering::Relaxed);
        }
        known
    }

    /// The routing of a request on a stored answer, when `headers` name one (`:method`,
    /// `:path`): its body (none) is not read. Its cluster is the one whose endpoint holds the
    /// answer; unknown here, the lookup finds it ([`RouterInner::find_stored_answer`]) or the
    /// request passes through.
    pub(super) fn prepare_stored(
        &self,
        headers: &[HeaderRef],
    ) -> Option<Result<Routed, PickError>> {
        let method = find_header(headers, ":method")?;
        let id = self.stored_answer_id(method, find_header(headers, ":path")?)?;
        let key = hashing::response_key(id);
        let home = self.stored_answer_home(key);
        let remote = home.is_none() && self.lookups.get().is_some();
        let routed = match home {
            Some(cluster) => self.stored_routed(cluster, key),
            // any routed cluster until the lookup finds the answer's
            None if remote => (self.clusters.all().into_iter())
                .find_map(|cluster| self.stored_routed(cluster, key)),
            None => None,
        };
        let Some(mut routed) = routed else {
            return Some(Err(self.pass_through()));
        };
        routed.stored_remote = remote;
        Some(Ok(routed))
    }

    /// A routed request on the stored answer `key` in `cluster`, with the first rule of a
    /// model served there (its cluster header and scene for the host, its model for the
    /// metrics); None when no rule routes to `cluster`.
    fn stored_routed(&self, cluster: Arc<Cluster>, key: u64) -> Option<Routed> {
        // (models in the config's order: the same one every time)
        let (model, route, rule) = self.model_names.iter().find_map(|model| {
            let route = self.models.get(model)?;
            let rule = route
                .rules
                .iter()
                .find(|rule| rule.cluster == cluster.name)?;
            Some((model, route, rule))
        })?;
        Some(Routed {
            rule: Arc::clone(rule),
            cluster,
            endpoint: None,
            tried: Vec::new(),
            model: model.clone(),
            model_slot: route.slot,
            stream: false,
            prompt_chars: 0,
            prefill: Default::default(),
            prefix_hashes: Vec::new(),
            session: None,
            chain: None,
            stored_answer: Some(key),
            stored_remote: false,
            // the answer is bound already
            response_bound: true,
            chain_remote: false,
            cache_ratio: 0.0,
            expected_cache_ratio: 0.0,
            claim: None,
            sync: None,
            upstream_model: model.clone(),
            subset: None,
            upstream: UpstreamRequest::default(),
            transcoder: Transcoder::passthrough(),
            answer: ResponseReader::ignoring(),
            learn_tail: None,
            pick_view: None,
        })
    }

    /// An unknown stored answer: not routed, counted.
    fn pass_through(&self) -> PickError {
        self.metrics.stored_answer_requests[UNKNOWN].fetch_add(1, Ordering::Relaxed);
        PickError::PassThrough {
            reason: "no endpoint is known to store this response".into(),
        }
    }

    /// Sends a request on a stored answer (`key`: its id's) to the endpoint that stored it.
    /// Unknown: passes through. A retry finds none (503): no other engine has the answer.
    pub(super) fn choose_stored(&self, r: &mut Routed, key: u64) -> Result<(), PickError> {
        let set = r.cluster.snapshot();
        if !r.tried.is_empty() {
            return Err(PickError::NoEndpoint {
                cluster: r.cluster.name.clone(),
            });
        }
        let Some(pos) = self.index.bound(key, &set) else {
            return Err(self.pass_through());
        };
        let endpoint = &set.endpoints[pos];
        r.prefill = endpoint.acquire(0, 0, true);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.metrics.stored_answer_requests[PINNED].fetch_add(1, Ordering::Relaxed);
        r.tried.push(endpoint.id);
        r.endpoint = Some(Arc::clone(endpoint));
        Ok(())
    }

    /// For a request on a stored answer unknown here (on the lookup thread): asks the
    /// Metadata-Center, cluster after cluster within `deadline`, which endpoint holds the
    /// answer's key. A holder found is bound here (later requests on the answer need no
    /// lookup) and `r` moves to its cluster. Returns whether the Metadata-Center answered.
    pub(super) fn find_stored_answer(
        &self,
        r: &mut Routed,
        client: &mut Client,
        deadline: Instant,
    ) -> bool {
        let Some(key) = r.stored_answer else {
            return false;
        };
        let identity = self.config.metadata_center.identity;
        let mut answered = false;
        for cluster in self.clusters.all() {
            let set = cluster.snapshot();
            if set.endpoints.is_empty() {
                continue;
            }
            let query = CacheQuery {
                cluster: &cluster.name,
                prompt_hash: std::slice::from_ref(&key),
                top_k: set.endpoints.len(),
                max_age_ms: Default::default(),
            };
            let Ok(locations) = client.query_cache(&query, deadline) else {
                break; // (the deadline is shared: the next cluster would fail too)
            };
            answered = true;
            let holds = |wire_id: &str| (locations.iter()).any(|l| l.length > 0 && l.ip == wire_id);
            let Some(holder) = set.endpoints.iter().find(|e| holds(&e.wire_id(identity))) else {
                continue;
            };
            self.index.bind(key, holder.id, self.clock.now_ms());
            if let Some(routed) = self.stored_routed(Arc::clone(&cluster), key) {
                *r = routed;
            }
            break;
        }
        answered
    }
}
