//! Model checks of the lock-free endpoint state with loom: every interleaving of the
//! concurrent updates a proxy's worker threads make (acquire, first token, finish, failures)
//! within loom's bounds. Only built with `--cfg loom`: `make test-loom`.
#![cfg(loom)]

use std::net::SocketAddr;
use std::sync::Arc;

use llmproxy::state::Endpoint;
use loom::thread;

/// Explores every interleaving with up to three preemptions per execution (loom's usual
/// bound; unbounded, the four-atomic request path of three threads does not finish).
fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(f);
}

fn endpoint() -> Arc<Endpoint> {
    let addr: SocketAddr = "127.0.0.1:8000".parse().unwrap();
    Arc::new(Endpoint::new(0, addr, 0))
}

/// Two workers run a whole request each (pick → first token → finish) while a third reads the
/// load for scoring: the reader never sees more than both requests, and everything returns to
/// zero.
#[test]
fn concurrent_requests_return_every_counter_to_zero() {
    model(|| {
        let ep = endpoint();
        let workers: Vec<_> = [(100u64, 40u64), (7, 7)]
            .into_iter()
            .map(|(prompt, uncached)| {
                let ep = Arc::clone(&ep);
                thread::spawn(move || {
                    ep.acquire(prompt, uncached, true);
                    ep.release_prefill(prompt, uncached);
                    ep.release_request();
                })
            })
            .collect();
        let in_flight = ep.in_flight();
        let prefill = ep.prefill_chars();
        let uncached = ep.uncached_prefill_chars();
        assert!(in_flight <= 2 && prefill <= 107 && uncached <= 47);
        for w in workers {
            w.join().unwrap();
        }
        assert_eq!(
            (
                ep.in_flight(),
                ep.prefill_chars(),
                ep.uncached_prefill_chars()
            ),
            (0, 0, 0)
        );
        assert_eq!(ep.picks(), 2);
    });
}

/// A release racing an acquire on another worker (a finish for a request whose counters were
/// already saturated at zero) never wraps a counter around.
#[test]
fn releases_never_wrap_below_zero() {
    model(|| {
        let ep = endpoint();
        let releaser = {
            let ep = Arc::clone(&ep);
            thread::spawn(move || {
                ep.release_prefill(50, 50);
                ep.release_request();
            })
        };
        ep.acquire(10, 10, true);
        releaser.join().unwrap();
        assert!(ep.in_flight() <= 1);
        assert!(ep.prefill_chars() <= 10 && ep.uncached_prefill_chars() <= 10);
    });
}

/// Failures reported at the same time by two workers that both reach the threshold eject the
/// endpoint exactly once.
#[test]
fn simultaneous_failures_eject_once() {
    model(|| {
        let ep = endpoint();
        ep.record_failure(1_000, 2, 30_000);
        let other = {
            let ep = Arc::clone(&ep);
            thread::spawn(move || ep.record_failure(1_000, 2, 30_000))
        };
        let mine = ep.record_failure(1_000, 2, 30_000);
        let theirs = other.join().unwrap();
        // Both concurrent failures are at or past the threshold of 2: exactly one ejects.
        assert_eq!(
            u8::from(mine) + u8::from(theirs),
            1,
            "ejected by both or neither"
        );
        assert_eq!(ep.ejections(), 1);
        assert!(ep.is_ejected(1_001));
        assert_eq!(ep.failures(), 3);
    });
}
