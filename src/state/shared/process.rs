//! Whether an attached process is still alive: `/proc/<pid>/stat` (gone, zombie, or a reused
//! pid with another start time), `kill(pid, 0)` where there is no /proc.

/// True unless process `pid` is gone, a zombie, or a different process with the same id
/// (its start time differs from `start_time`, when known).
pub(super) fn process_alive(pid: u32, start_time: u64) -> bool {
    match read_stat(pid) {
        Some((state, start)) => {
            !matches!(state, 'Z' | 'X' | 'x') && (start_time == 0 || start == start_time)
        }
        // No entry while /proc is mounted: gone.
        None if std::path::Path::new("/proc/self/stat").exists() => false,
        // No /proc: ask the kernel (ESRCH = gone; EPERM = alive, another user's).
        None => {
            // SAFETY: signal 0 only checks for existence.
            let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
            r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
        }
    }
}

pub(super) fn process_start_time(pid: u32) -> Option<u64> {
    read_stat(pid).map(|(_, start)| start)
}

/// State letter and start time (field 22) from `/proc/<pid>/stat`.
fn read_stat(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // Fields 4..=21 precede the start time.
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}
