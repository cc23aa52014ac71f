//! Picks that may wait for the Metadata-Center's cache answer: `pick_async` (the decision
//! goes to a callback on a lookup thread) and `pick_start` (the host polls a
//! [`PendingPick`]), and the lookup job that decides them off the request path.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::RemoteDepth;
use super::{failed_request, HeaderRef, LogContext, PickedRequest, Routed, Router, RouterInner};
use crate::background::client::{CacheQuery, Client};
use crate::background::Lookup;
use crate::error::PickError;

impl Router {
    /// Routes one request, asking the Metadata-Center for cache matches first when remote
    /// lookups are enabled. Returns `None` when the decision is pending: `done` will then be
    /// called exactly once, from the lookup thread. Otherwise returns the (local) decision and
    /// never calls `done`.
    pub fn pick_async(
        &self,
        headers: &[HeaderRef],
        body: &[u8],
        done: Box<dyn FnOnce(PickedRequest) + Send>,
    ) -> Option<PickedRequest> {
        let started = Instant::now();
        let inner = &self.inner;
        let log = LogContext::capture(inner, headers, body);
        let mut routed = match inner.prepare(headers, body) {
            Ok(r) => r,
            Err(e) => return Some(self.inner.finish_pick(Err(e), started, log)),
        };
        // a chain this gateway does not know: ask where its answer is
        routed.chain_remote = inner.wants_chain_lookup(routed.chain, &routed.cluster);
        let wants_remote =
            routed.chain_remote || routed.stored_remote || inner.wants_cache_depth(&routed);
        let routed = match (wants_remote, inner.lookups.get()) {
            (true, Some(tx)) => {
                let job = LookupJob {
                    router: Arc::clone(inner),
                    pending: Some((routed, done, log)),
                    started,
                };
                match tx.try_send(job) {
                    Ok(()) => return None,
                    Err(e) => {
                        // Queue full: decide here, and answer directly (the callback is dropped).
                        inner.metrics.lookups_local.fetch_add(1, Ordering::Relaxed);
                        let (routed, _done, log) =
                            e.into_inner().pending.take().expect("undecided");
                        (routed, log)
                    }
                }
            }
            _ => (routed, log),
        };
        let (mut routed, log) = routed;
        let result = inner.choose(&mut routed, None).map(|()| routed);
        Some(inner.finish_pick(result, started, log))
    }

    /// Like [`Router::pick_async`] for hosts that poll instead of taking a callback on a
    /// library thread (LuaJIT in nginx): a pending decision comes back as a [`PendingPick`]
    /// to poll from the host's own event loop.
    pub fn pick_start(&self, headers: &[HeaderRef], body: &[u8]) -> PickStart {
        if self.inner.lookups.get().is_none() {
            return PickStart::Decided(self.pick(headers, body));
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        // A send fails only when the PendingPick is gone: the decision is then dropped, which
        // finishes it with "no response".
        let deliver = Box::new(move |request: PickedRequest| drop(tx.send(request)));
        match self.pick_async(headers, body, deliver) {
            Some(request) => PickStart::Decided(request),
            None => PickStart::Pending(PendingPick {
                router: Arc::clone(&self.inner),
                decision: Some(rx),
            }),
        }
    }
}

/// The host's callback for a `pick_async` decision.
type PickCallback = Box<dyn FnOnce(PickedRequest) + Send>;

/// A `pick_async` decision waiting for the Metadata-Center's cache answer.
pub(crate) struct LookupJob {
    router: Arc<RouterInner>,
    /// The request, the host's callback and the request log's context, taken when the
    /// decision is made.
    pending: Option<(Routed, PickCallback, Option<Box<LogContext>>)>,
    started: Instant,
}

impl LookupJob {
    /// Decides with the cache answer (`None`: local data only) and hands the decision to
    /// the host's callback. `expired`: no lookup was made (the job waited too long).
    fn decide(&mut self, remote: Option<&RemoteDepth>, expired: bool) {
        let Some((mut routed, done, log)) = self.pending.take() else {
            return;
        };
        let m = &self.router.metrics;
        let counter = match (remote.is_some(), expired) {
            (true, _) => &m.lookups_remote,
            (false, true) => &m.lookups_expired,
            (false, false) => &m.lookups_local,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        // Whatever happens while deciding, the host's callback runs exactly once: a panic
        // becomes an internal error for this request (its stream is answered, not left
        // waiting).
        let router = &self.router;
        let started = self.started;
        let decided = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            #[cfg(test)]
            if tests::PANIC_WHILE_DECIDING.load(Ordering::Relaxed) {
                panic!("injected panic while deciding");
            }
            let result = router.choose(&mut routed, remote).map(|()| routed);
            router.finish_pick(result, started, log)
        }));
        let picked = decided.unwrap_or_else(|_| {
            failed_request(
                router,
                PickError::Internal {
                    message: "internal error while deciding the pick".into(),
                },
            )
        });
        // The host's callback runs on a library thread; a panic in it must not kill the thread.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || done(picked)));
    }
}

impl Lookup for LookupJob {
    fn run(mut self, client: &mut Client) {
        // A job that waited a whole lookup timeout in the queue (lookups slower than the
        // request rate) decides from local data at once instead of waiting another timeout.
        let timeout = Duration::from_millis(self.router.config.metadata_center.timeout_ms);
        if self.started.elapsed() >= timeout {
            self.decide(None, true);
            return;
        }
        // One deadline for the whole lookup, counted from the pick: every replica tried
        // shares it, so the decision comes within `timeout_ms` of the pick.
        let deadline = self.started + timeout;
        let Some((routed, _, _)) = &mut self.pending else {
            return;
        };
        if routed.stored_remote {
            // where a stored answer is: found, it is bound here and `choose` pins to it
            let answered = self.router.find_stored_answer(routed, client, deadline);
            self.decide(answered.then(RemoteDepth::new).as_ref(), false);
            return;
        }
        let set = routed.cluster.snapshot();
        // a chain's lookup asks who holds its answer's key, whatever the key's age
        let chain = routed.chain.filter(|_| routed.chain_remote);
        let query = CacheQuery {
            cluster: &routed.cluster.name,
            prompt_hash: match &chain {
                Some(key) => std::slice::from_ref(key),
                None => &routed.prefix_hashes,
            },
            top_k: set.endpoints.len().max(1),
            max_age_ms: match chain {
                Some(_) => Default::default(),
                None => self.router.remote_claim_max_ages(&set),
            },
        };
        let remote = client.query_cache(&query, deadline).ok().map(|locs| {
            locs.into_iter()
                .map(|l| (l.ip, l.length))
                .collect::<RemoteDepth>()
        });
        self.decide(remote.as_ref(), false);
    }
}

impl Drop for LookupJob {
    /// A job dropped undecided (the router was freed while lookups were queued) decides from
    /// local data, so the host's callback still runs exactly once and no request hangs.
    fn drop(&mut self) {
        self.decide(None, false);
    }
}

/// What [`Router::pick_start`] gives: the decision, or a pending one to poll.
#[allow(clippy::large_enum_variant)] // like `pick`'s result: moved once, straight to the host
pub enum PickStart {
    /// Decided at once (also every error).
    Decided(PickedRequest),
    /// Waiting for the Metadata-Center's cache answer.
    Pending(PendingPick),
}

/// A `pick_start` decision being made on the lookup thread. Dropping it before the decision
/// is taken finishes that decision with "no response" once it arrives.
pub struct PendingPick {
    router: Arc<RouterInner>,
    /// Where the decision arrives; `None` once taken.
    decision: Option<crossbeam_channel::Receiver<PickedRequest>>,
}

impl PendingPick {
    /// The decision once it is made, exactly once; `None` while it is still pending and after
    /// it was taken. Never blocks.
    pub fn try_take(&mut self) -> Option<PickedRequest> {
        let taken = match self.decision.as_ref()?.try_recv() {
            Ok(request) => request,
            Err(crossbeam_channel::TryRecvError::Empty) => return None,
            // The library lost the decision without answering (a bug): say so, once.
            Err(crossbeam_channel::TryRecvError::Disconnected) => failed_request(
                &self.router,
                PickError::Internal {
                    message: "the pending decision was lost".into(),
                },
            ),
        };
        self.decision = None;
        Some(taken)
    }

    /// True once the decision was taken with [`PendingPick::try_take`].
    pub fn is_taken(&self) -> bool {
        self.decision.is_none()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;

    /// Makes the next deferred decisions panic (test only).
    pub(super) static PANIC_WHILE_DECIDING: AtomicBool = AtomicBool::new(false);

    #[test]
    fn a_panic_while_deciding_still_calls_the_callback_once_with_an_error() {
        let router = Router::from_json(
            br#"{"model_mapping_rule": {"m": {"rules": [{"cluster": "c", "backend": "vllm"}]}},
                 "clusters": {"c": {"endpoints": ["127.0.0.1:1"]}}}"#,
        )
        .unwrap();
        let body = br#"{"model": "m", "messages": [{"role": "user", "content": "hello"}]}"#;
        let routed = router.inner.prepare(&[], body).unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut job = LookupJob {
            router: Arc::clone(&router.inner),
            pending: Some((
                routed,
                Box::new(move |p: PickedRequest| drop(tx.send(p))),
                None,
            )),
            started: Instant::now(),
        };
        PANIC_WHILE_DECIDING.store(true, Ordering::Relaxed);
        job.decide(None, false);
        PANIC_WHILE_DECIDING.store(false, Ordering::Relaxed);
        drop(job);
        let answers: Vec<PickedRequest> = rx.try_iter().collect();
        assert_eq!(answers.len(), 1, "the callback runs exactly once");
        assert_eq!(answers[0].http_status(), 500);
        drop(answers);
        assert_eq!(router.in_flight(), 0);
    }
}
