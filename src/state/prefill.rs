//! The prefill a picked request holds on its endpoint, and when it ends.
//!
//! A request's prompt counts as prefill on its endpoint (the `prefix_cost` queue, the origin's
//! prefill load) from the pick until its first token. A streamed answer shows its first token
//! as its first byte. An answer that is not streamed (`"stream": false`, the OpenAI SDKs'
//! default) shows its first byte only when it is complete: counting its prompt as prefill until
//! then would charge an endpoint for prefill long done while it decodes, and push traffic away
//! from the endpoints that hold its prefix.
//!
//! Engines admit waiting requests first come, first served (vLLM; SGLang with `fcfs`, while
//! its default `lpm` reorders by prefix match, where this is an approximation), and a running
//! request's prefill goes before a later one's: when a request picked later shows its first
//! token, every request picked before it on that endpoint is past its prefill. So the prefill of
//! a non-streamed request waits in a small list of this router's ([`HiddenPrefill`]) and is
//! released by the first token of any later pick of the endpoint, from this router or, in
//! shared mode, any worker (the endpoint's pick numbers and the latest pick with a first token
//! live in its counters), or at the latest when the request itself ends.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// What a picked request holds on its endpoint until its first token (or its end).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefillHold {
    /// The endpoint's pick number of the request (from 1; 0 = nothing held).
    pub pick: u64,
    /// Prompt characters counted as prefill.
    pub prompt_chars: u64,
    /// Of those, the characters the endpoint must compute.
    pub uncached_chars: u64,
    /// The answer is streamed: its first byte is its first token.
    pub streamed: bool,
}

/// The prefill of this router's non-streamed requests on one endpoint.
pub(super) struct HiddenPrefill {
    /// Pick number of the oldest entry, `u64::MAX` when none: the pick path's lock-free check.
    oldest: AtomicU64,
    pending: Mutex<Vec<PrefillHold>>,
}

impl Default for HiddenPrefill {
    fn default() -> Self {
        Self {
            oldest: AtomicU64::new(u64::MAX),
            pending: Mutex::new(Vec::new()),
        }
    }
}

impl HiddenPrefill {
    /// Keeps `hold` (of a non-streamed request) until a later first token or its own end.
    pub(super) fn keep(&self, hold: PrefillHold) {
        let mut pending = self.lock();
        pending.push(hold);
        self.oldest.fetch_min(hold.pick, Ordering::Relaxed);
    }

    /// Takes the entry of pick `pick` back, if no sweep has released it yet.
    pub(super) fn take(&self, pick: u64) -> Option<PrefillHold> {
        let mut pending = self.lock();
        let at = pending.iter().position(|h| h.pick == pick)?;
        let hold = pending.swap_remove(at);
        self.store_oldest(&pending);
        Some(hold)
    }

    /// Takes every entry picked at or before `done` (none, without locking or allocating,
    /// when the oldest is later).
    pub(super) fn take_up_to(&self, done: u64) -> Vec<PrefillHold> {
        if self.oldest.load(Ordering::Relaxed) > done {
            return Vec::new();
        }
        let mut pending = self.lock();
        let mut over = Vec::new();
        pending.retain(|h| {
            let is_over = h.pick <= done;
            if is_over {
                over.push(*h);
            }
            !is_over
        });
        self.store_oldest(&pending);
        over
    }

    /// Entries waiting.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }

    fn store_oldest(&self, pending: &[PrefillHold]) {
        let oldest = pending.iter().map(|h| h.pick).min().unwrap_or(u64::MAX);
        self.oldest.store(oldest, Ordering::Relaxed);
    }

    /// The list, even after a panic elsewhere while it was held (its entries stay valid).
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<PrefillHold>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use crate::state::{Endpoint, SharedState};

    fn addr() -> SocketAddr {
        "10.0.0.1:80".parse().unwrap()
    }

    /// (prompt characters in prefill, uncached ones, non-streamed entries waiting).
    fn prefill(e: &Endpoint) -> (u64, u64, usize) {
        (
            e.prefill_chars(),
            e.uncached_prefill_chars(),
            e.hidden_prefill.len(),
        )
    }

    #[test]
    fn a_later_picks_first_token_ends_the_prefill_of_an_answer_not_streamed() {
        let e = Endpoint::new(0, addr(), 1);
        let hidden = e.acquire(1_000, 400, false);
        let streamed = e.acquire(100, 100, true);
        assert_eq!(prefill(&e), (1_100, 500, 1));
        e.first_token(streamed);
        assert_eq!(
            prefill(&e),
            (0, 0, 0),
            "picked before it: past its prefill too"
        );
        e.drop_prefill(hidden); // its own end: nothing left to release
        assert_eq!(prefill(&e), (0, 0, 0));
        assert_eq!(e.in_flight(), 2, "the requests themselves still run");
    }

    #[test]
    fn an_earlier_picks_first_token_leaves_a_later_one_in_prefill() {
        let e = Endpoint::new(0, addr(), 1);
        let earlier = e.acquire(100, 100, true);
        let hidden = e.acquire(1_000, 400, false);
        e.first_token(earlier);
        e.sweep_prefill();
        assert_eq!(prefill(&e), (1_000, 400, 1));
        e.drop_prefill(hidden);
        assert_eq!(prefill(&e), (0, 0, 0), "released once, at its own end");
        e.sweep_prefill();
        e.drop_prefill(hidden);
        assert_eq!(prefill(&e), (0, 0, 0));
    }

    #[test]
    fn answers_not_streamed_end_each_others_prefill_in_pick_order() {
        let e = Endpoint::new(0, addr(), 1);
        let [a, b, c] = [300, 200, 100].map(|n| e.acquire(n, n, false));
        e.first_token(b); // b's answer came whole: a was picked before it
        assert_eq!(prefill(&e), (100, 100, 1));
        e.first_token(a); // a's own answer: already released
        assert_eq!(prefill(&e), (100, 100, 1));
        e.drop_prefill(c);
        assert_eq!(prefill(&e), (0, 0, 0));
    }

    #[test]
    fn another_workers_first_token_releases_this_workers_prefill_at_its_next_sweep() {
        let s = SharedState::create(crate::state::shared::MIN_SIZE).unwrap();
        let (a, b) = (s.attach().unwrap(), s.attach().unwrap());
        let ea = Endpoint::shared(addr(), 1, a.lease("c", addr()).unwrap());
        let eb = Endpoint::shared(addr(), 1, b.lease("c", addr()).unwrap());
        let hidden = ea.acquire(1_000, 400, false);
        let streamed = eb.acquire(100, 100, true);
        assert_eq!(
            (ea.prefill_chars(), eb.uncached_prefill_chars()),
            (1_100, 500)
        );
        eb.first_token(streamed);
        assert_eq!(prefill(&ea), (1_000, 400, 1), "worker a has not looked yet");
        ea.sweep_prefill();
        assert_eq!(prefill(&ea), (0, 0, 0));
        assert_eq!(prefill(&eb), (0, 0, 0));
        ea.drop_prefill(hidden);
        assert_eq!(ea.prefill_chars(), 0);
    }
}
