//! How the library runs its threads: every signal blocked, stopped by dropping a guard, never
//! joined (a proxy worker that frees a router must not wait for a thread stuck in a call).

use crossbeam_channel::{bounded, Receiver, Sender};

/// Background threads stopped together: dropping the group tells every thread to stop and
/// returns at once. Each thread finishes on its own (a call in progress ends within its
/// deadline, queued releases are sent within `RELEASE_DRAIN`) and frees what it holds; the
/// caller, often a proxy worker, never waits for one.
#[derive(Default)]
pub struct ThreadGroup(Vec<ThreadGuard>);

impl ThreadGroup {
    /// Adds a thread to the group.
    pub fn push(&mut self, guard: ThreadGuard) {
        self.0.push(guard);
    }

    /// Moves every thread of `other` into this group.
    pub fn append(&mut self, mut other: ThreadGroup) {
        self.0.append(&mut other.0);
    }
}

/// Tells a background thread to stop when dropped, without waiting for it (the thread is
/// detached and ends by itself).
pub struct ThreadGuard {
    /// Dropping the sender wakes the thread's `recv(stop)`.
    _stop: Sender<()>,
}

/// Spawns a thread with every signal blocked (the host's signal handling stays on its own
/// threads; a library thread must never receive SIGCHLD, SIGTERM, …).
pub(super) fn spawn_quiet(
    name: &str,
    body: impl FnOnce(Receiver<()>) + Send + 'static,
) -> std::io::Result<ThreadGuard> {
    let (stop_tx, stop_rx) = bounded::<()>(0);
    // SAFETY: plain libc calls on a zeroed sigset; the old mask is restored right after.
    let old = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        old
    };
    let spawned = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || body(stop_rx));
    // SAFETY: restores the mask saved above.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
    }
    // The JoinHandle is dropped: the thread is detached.
    spawned?;
    Ok(ThreadGuard { _stop: stop_tx })
}
