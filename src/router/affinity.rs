//! What keeps a request on an endpoint whatever the algorithm would say, both kept in the
//! prefix index as bindings of a key to an endpoint (bounded, evicted by least recent use,
//! shared by the nginx workers of one zone):
//!
//! - a **session** (`session_affinity`): a request naming one (a header, the OpenAI
//!   `prompt_cache_key` or `user` field) goes where the session went last while that endpoint
//!   is a candidate and not overloaded, and the session is bound to wherever it went;
//! - a **Responses API chain**: a request naming a `previous_response_id` goes to the
//!   endpoint that stored that answer, however loaded (no other engine has it); the answer's
//!   id is bound to its endpoint from the answer's first bytes. With the Metadata-Center's
//!   cache, the binding is also saved there (as a one-hash prefix of that endpoint), and a
//!   chain this gateway does not know is looked up there: another gateway answered it.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::RemoteDepth;
use super::{find_header, HeaderRef, RouterInner};
use crate::background::Event;
use crate::balancer::CandidateLoad;
use crate::config::SessionAffinity;
use crate::hashing;
use crate::response::ResponseReader;
use crate::state::{Cluster, Endpoint, EndpointSet};

/// Where a request's session stands among the candidates of this choice.
#[derive(Clone, Copy)]
pub(super) enum SessionEndpoint {
    /// The request names no session.
    None,
    /// The session is bound to no endpoint of the cluster (never seen, or forgotten).
    New,
    /// The session's endpoint is no candidate (ejected, tried, not serving the subset).
    Elsewhere,
    /// The session's endpoint, at this position of the candidates.
    At(usize),
}

impl SessionEndpoint {
    /// True when the session's endpoint is a candidate.
    pub(super) fn is_bound(&self) -> bool {
        matches!(self, SessionEndpoint::At(_))
    }
}

/// What became of a session's request: the index of its `result` label in
/// [`crate::metrics::SESSION_RESULTS`].
#[derive(Clone, Copy)]
enum SessionResult {
    /// It went to the endpoint the session went to last.
    Kept = 0,
    /// That endpoint was no candidate (ejected, tried, not serving the subset) or overloaded.
    Moved = 1,
    /// The session has no endpoint among the cluster's (never seen, or forgotten).
    New = 2,
}

impl RouterInner {
    /// Where the session `key` (a request's, when it names one) went last, among
    /// `candidates` (positions in `set`).
    pub(super) fn session_endpoint(
        &self,
        key: Option<u64>,
        set: &EndpointSet,
        candidates: &[usize],
    ) -> SessionEndpoint {
        let Some(key) = key else {
            return SessionEndpoint::None;
        };
        match self.index.bound(key, set) {
            None => SessionEndpoint::New,
            Some(pos) => {
                position(candidates, pos).map_or(SessionEndpoint::Elsewhere, SessionEndpoint::At)
            }
        }
    }

    /// The session's endpoint when it keeps the request: a candidate not overloaded by the
    /// thresholds of `session_affinity` over the least loaded candidate (`loads`).
    pub(super) fn keeps_session(
        &self,
        session: &SessionEndpoint,
        loads: &[CandidateLoad],
    ) -> Option<usize> {
        let SessionEndpoint::At(at) = *session else {
            return None;
        };
        let a = self.config.session_affinity.as_ref()?;
        (!overloaded(loads, at, a)).then_some(at)
    }

    /// After the choice: counts what became of the session `key` and binds it to `endpoint`.
    pub(super) fn bind_session(
        &self,
        key: Option<u64>,
        session: SessionEndpoint,
        kept: Option<usize>,
        endpoint: &Arc<Endpoint>,
        now: u64,
    ) {
        let Some(key) = key else { return };
        let result = match (session, kept) {
            (_, Some(_)) => SessionResult::Kept,
            (SessionEndpoint::At(_) | SessionEndpoint::Elsewhere, None) => SessionResult::Moved,
            (SessionEndpoint::New | SessionEndpoint::None, None) => SessionResult::New,
        };
        self.metrics.count_session(result as usize);
        self.index.bind(key, endpoint.id, now);
    }

    /// The endpoint that stored the answer a request continues (`chain`: the key of its
    /// `previous_response_id`), when it is a candidate: its position in `candidates`. Bound
    /// here, or else where the Metadata-Center says (`remote`: its answer to the chain's
    /// lookup). Counted in `llmproxy_response_chains_total`.
    pub(super) fn chain_endpoint(
        &self,
        chain: Option<u64>,
        set: &EndpointSet,
        candidates: &[usize],
        remote: Option<&RemoteDepth>,
    ) -> Option<usize> {
        let key = chain?;
        let identity = self.config.metadata_center.identity;
        let elsewhere = || {
            let remote = remote?;
            let held = |&pos: &usize| {
                let e = &set.endpoints[pos];
                remote.get(&e.wire_id(identity)).is_some_and(|&d| d > 0)
            };
            candidates.iter().position(held)
        };
        let local = (self.index.bound(key, set)).and_then(|pos| position(candidates, pos));
        let at = local.or_else(elsewhere);
        self.metrics.response_chains[at.is_none() as usize].fetch_add(1, Ordering::Relaxed);
        at
    }

    /// True when `chain` (a request's `previous_response_id` key) is bound to no endpoint of
    /// `cluster` here and the Metadata-Center's cache can be asked: another gateway may have
    /// answered it.
    pub(super) fn wants_chain_lookup(&self, chain: Option<u64>, cluster: &Cluster) -> bool {
        let Some(key) = chain else { return false };
        self.lookups.get().is_some() && self.index.bound(key, &cluster.snapshot()).is_none()
    }

    /// Binds a Responses answer's id to the endpoint answering it as soon as the answer's
    /// first bytes show it: a next turn may name it (`previous_response_id`) and only this
    /// engine stored it. Bound before the host forwards those bytes, so before the client can
    /// name it, even when another worker or thread picks the next turn.
    /// With the Metadata-Center, the binding is saved there too, for the other gateways.
    /// (`answer`, `cluster`, `endpoint` and `bound` are those of one routed request.)
    pub(super) fn bind_response(
        &self,
        answer: &ResponseReader,
        cluster: &Arc<Cluster>,
        endpoint: Option<&Arc<Endpoint>>,
        bound: &mut bool,
    ) {
        if *bound {
            return;
        }
        if let (Some(id), Some(e)) = (&answer.capture().response_id, endpoint) {
            let key = hashing::response_key(id);
            self.index.bind(key, e.id, self.clock.now_ms());
            *bound = true;
            // (a no-op without the Metadata-Center)
            self.send(Event::SaveCache {
                cluster: Arc::clone(cluster),
                endpoint: Arc::clone(e),
                hashes: vec![key],
            });
        }
    }
}

/// The position of `pos` (a position in the endpoint set) in `candidates`.
fn position(candidates: &[usize], pos: usize) -> Option<usize> {
    candidates.iter().position(|&c| c == pos)
}

/// The name of the request's session: the configured header's value, else the body's
/// `fields` in order (`prompt_cache_key`, `user`: each read only when configured); empty
/// values name nothing.
pub(super) fn session_name<'a>(
    a: &SessionAffinity,
    headers: &[HeaderRef<'a>],
    fields: [Option<&'a str>; 2],
) -> Option<&'a [u8]> {
    let header = (!a.header.is_empty())
        .then(|| find_header(headers, &a.header))
        .flatten();
    let fields = fields.into_iter().map(|f| f.map(str::as_bytes));
    std::iter::once(header)
        .chain(fields)
        .flatten()
        .find(|name| !name.is_empty())
}

/// The session rule: the candidate at `at` is overloaded when it has more than
/// `max_extra_requests` requests in flight beyond the least loaded candidate and more than
/// `max_load_ratio` times as many (both, as sglang-router's balance thresholds).
fn overloaded(loads: &[CandidateLoad], at: usize, a: &SessionAffinity) -> bool {
    let least = loads.iter().map(|l| l.in_flight).min().unwrap_or(0);
    let own = loads[at].in_flight;
    own > least.saturating_add(a.max_extra_requests) && own as f64 > a.max_load_ratio * least as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_moves_only_past_both_thresholds() {
        let a = SessionAffinity {
            max_load_ratio: 1.5,
            max_extra_requests: 8,
            ..SessionAffinity::default()
        };
        let l = |q| CandidateLoad {
            in_flight: q,
            ..CandidateLoad::default()
        };
        let at = |own: u64, least: u64| overloaded(&[l(own), l(least), l(least + 5)], 0, &a);
        assert!(!at(8, 0), "8 beyond: not more than 8");
        assert!(at(9, 0));
        assert!(!at(28, 20), "8 beyond and 1.4 times");
        assert!(!at(29, 20), "9 beyond but 1.45 times");
        assert!(!at(30, 20), "10 beyond but exactly 1.5 times");
        assert!(at(31, 20));
        assert!(!at(0, 0), "the least loaded itself");
        let ratio_only = SessionAffinity {
            max_extra_requests: 0,
            ..a.clone()
        };
        assert!(!overloaded(&[l(3), l(2)], 0, &ratio_only));
        assert!(overloaded(&[l(4), l(2)], 0, &ratio_only));
    }
}
