//! The router's millisecond clock on `CLOCK_MONOTONIC`, so that processes sharing one
//! shared-state region (nginx workers) agree on every timestamp stored in it.

/// Milliseconds since the clock's epoch: the time base of ejection deadlines, remote-load
/// timestamps, prefix-index recency and cluster activity.
#[derive(Clone, Copy)]
pub struct Clock {
    /// `CLOCK_MONOTONIC` milliseconds at the epoch (system-wide: equal in every process).
    epoch_ms: u64,
}

impl Clock {
    /// A clock starting now.
    pub fn start() -> Self {
        Self::from_epoch(monotonic_ms())
    }

    /// A clock whose epoch is `epoch_ms` on `CLOCK_MONOTONIC` (a shared region's epoch).
    pub fn from_epoch(epoch_ms: u64) -> Self {
        Self { epoch_ms }
    }

    /// Milliseconds since the epoch.
    pub fn now_ms(&self) -> u64 {
        monotonic_ms().saturating_sub(self.epoch_ms)
    }
}

/// `CLOCK_MONOTONIC` in milliseconds: one time line for every process of the machine.
pub fn monotonic_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clocks_with_one_epoch_agree() {
        let a = Clock::start();
        let b = Clock::from_epoch(a.epoch_ms);
        std::thread::sleep(std::time::Duration::from_millis(5));
        let (x, y) = (a.now_ms(), b.now_ms());
        assert!(x >= 5 && y >= 5 && x.abs_diff(y) <= 1, "{x} {y}");
    }
}
