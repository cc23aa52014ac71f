//! The request log's writer thread: takes finished requests' JSON lines from a bounded queue
//! and appends them to the log file (or to stderr, which every host sends to its own log).
//!
//! The request path only `try_send`s (a full queue drops the line and counts it); the thread
//! owns the file: it opens it in append mode, writes in batches, flushes whenever the queue is
//! empty, and once a second checks whether the path still names the open file. A rename
//! (logrotate's default) makes it reopen the path; `copytruncate` needs nothing (appends go to
//! the new end). A failed open or write counts the line as failed, says so on stderr once per
//! failure streak, and the next second tries again: a full disk or an unwritable path costs
//! lines, never a proxy worker's time.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TrySendError};

use super::threads::{spawn_quiet, ThreadGuard};

/// How often the writer checks that the path still names its open file.
pub const ROTATION_CHECK: Duration = Duration::from_secs(1);

/// What became of the request log's lines (rendered as `llmproxy_request_log_lines_total`).
#[derive(Default)]
pub struct LogCounters {
    /// Lines appended to the log.
    pub written: AtomicU64,
    /// Lines dropped because the queue was full (the writer could not keep up).
    pub dropped: AtomicU64,
    /// Lines lost to a failed open or write (unwritable path, full disk).
    pub failed: AtomicU64,
    /// Times the file was reopened after a rotation.
    pub reopened: AtomicU64,
}

/// The request path's end of the request log.
pub struct LogSender {
    tx: Sender<String>,
    counters: Arc<LogCounters>,
}

impl LogSender {
    /// Queues one line (without its newline); drops and counts it when the queue is full.
    pub fn send(&self, mut line: String) {
        line.push('\n');
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.tx.try_send(line) {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The counters shared with the writer.
    pub fn counters(&self) -> &Arc<LogCounters> {
        &self.counters
    }
}

/// Where lines go.
enum Sink {
    /// A file, reopened when rotated; `None` while it cannot be opened.
    File {
        path: PathBuf,
        file: Option<io::BufWriter<File>>,
        /// (device, inode) of the open file.
        identity: Option<(u64, u64)>,
    },
    Stderr,
}

/// Starts the writer thread for `path` ("" = stderr) with a queue of `queue` lines.
pub fn start_log_writer(path: &str, queue: usize) -> io::Result<(LogSender, ThreadGuard)> {
    let (tx, rx) = bounded::<String>(queue.max(1));
    let counters = Arc::new(LogCounters::default());
    let sink = if path.is_empty() {
        Sink::Stderr
    } else {
        Sink::File {
            path: PathBuf::from(path),
            file: None,
            identity: None,
        }
    };
    let thread_counters = Arc::clone(&counters);
    let guard = spawn_quiet("llmproxy-log", move |_stop| {
        run(rx, sink, &thread_counters);
    })?;
    Ok((LogSender { tx, counters }, guard))
}

/// The writer's loop: until every sender is gone and the queue is drained.
fn run(rx: Receiver<String>, mut sink: Sink, counters: &LogCounters) {
    let mut failing = false;
    sink.reopen_if_rotated(counters, &mut failing);
    let mut last_check = Instant::now();
    loop {
        match rx.recv_timeout(ROTATION_CHECK) {
            Ok(line) => {
                sink.write_line(&line, counters, &mut failing);
                // drain what is queued, then flush once
                while let Ok(line) = rx.try_recv() {
                    sink.write_line(&line, counters, &mut failing);
                }
                sink.flush(counters, &mut failing);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                sink.flush(counters, &mut failing);
                return;
            }
        }
        if last_check.elapsed() >= ROTATION_CHECK {
            last_check = Instant::now();
            sink.reopen_if_rotated(counters, &mut failing);
        }
    }
}

/// (device, inode) of what `path` names now.
fn identity_of(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

impl Sink {
    /// Opens the file when it is not open, or when its path now names another file (renamed
    /// away by a rotation, or deleted).
    fn reopen_if_rotated(&mut self, counters: &LogCounters, failing: &mut bool) {
        let Sink::File {
            path,
            file,
            identity,
        } = self
        else {
            return;
        };
        let now = identity_of(path);
        if file.is_some() && now.is_some() && now == *identity {
            return;
        }
        let rotated = file.is_some();
        if let Some(mut old) = file.take() {
            let _ = old.flush();
        }
        match OpenOptions::new().create(true).append(true).open(&*path) {
            Ok(f) => {
                *identity = f.metadata().ok().map(|m| (m.dev(), m.ino()));
                *file = Some(io::BufWriter::with_capacity(64 << 10, f));
                if rotated {
                    counters.reopened.fetch_add(1, Ordering::Relaxed);
                }
                *failing = false;
            }
            Err(e) => report(failing, &format!("cannot open {}: {e}", path.display())),
        }
    }

    fn write_line(&mut self, line: &str, counters: &LogCounters, failing: &mut bool) {
        let result = match self {
            Sink::File { file: None, .. } => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Sink::File {
                file: Some(f),
                path,
                ..
            } => write_to(f, line).map_err(|e| format!("cannot write {}: {e}", path.display())),
            Sink::Stderr => {
                write_to(&mut io::stderr().lock(), line).map_err(|e| format!("stderr: {e}"))
            }
        };
        match result {
            Ok(()) => {
                counters.written.fetch_add(1, Ordering::Relaxed);
            }
            Err(msg) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                report(failing, &msg);
                // a write error leaves the buffer in an unknown state: start over next check
                if let Sink::File { file, identity, .. } = self {
                    discard(file);
                    *identity = None;
                }
            }
        }
    }

    fn flush(&mut self, counters: &LogCounters, failing: &mut bool) {
        let Sink::File {
            file,
            path,
            identity,
        } = self
        else {
            return;
        };
        let Some(f) = file else {
            return;
        };
        if let Err(e) = f.flush() {
            // the lines still in the buffer are lost: move them from written to failed
            let lost = f.buffer().iter().filter(|&&b| b == b'\n').count() as u64;
            counters.failed.fetch_add(lost, Ordering::Relaxed);
            let _ = counters
                .written
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
                    Some(w.saturating_sub(lost))
                });
            report(failing, &format!("cannot write {}: {e}", path.display()));
            discard(file);
            *identity = None;
        }
    }
}

/// Closes a file whose buffer can no longer be written, without trying to flush it again.
fn discard(file: &mut Option<io::BufWriter<File>>) {
    if let Some(f) = file.take() {
        let _ = f.into_parts();
    }
}

/// One `write_all` per line with its newline: the buffer never splits a line between two
/// writes, so nginx workers appending to the same file (`O_APPEND`) never interleave inside one.
fn write_to(w: &mut impl Write, line: &str) -> io::Result<()> {
    w.write_all(line.as_bytes())
}

/// Says what failed on stderr, once per failure streak.
fn report(failing: &mut bool, msg: &str) {
    if !*failing {
        *failing = true;
        eprintln!("llmproxy: request log: {msg}; lines are counted as failed until it works again");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_in(paths: &[PathBuf]) -> Vec<String> {
        paths
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .flat_map(|t| t.lines().map(str::to_owned).collect::<Vec<_>>())
            .collect()
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "llmproxy-log-{name}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn lines_survive_rename_and_copytruncate_rotations_under_load() {
        let dir = temp_dir("rotate");
        let path = dir.join("requests.log");
        let (tx, guard) = start_log_writer(path.to_str().unwrap(), 100_000).unwrap();
        let counters = Arc::clone(tx.counters());
        wait_for("the file", || path.exists());
        let mut rotated = Vec::new();
        for i in 0..30_000u32 {
            tx.send(format!("{{\"n\":{i}}}"));
            if i % 10_000 == 5_000 {
                // logrotate's default: rename, the writer reopens the path within a second
                let old = dir.join(format!("requests.log.{i}"));
                std::fs::rename(&path, &old).unwrap();
                rotated.push(old);
                wait_for("the reopen", || {
                    counters.reopened.load(Ordering::Relaxed) == rotated.len() as u64
                });
            }
        }
        drop(tx);
        drop(guard);
        wait_for("every line", || {
            let c = &counters;
            c.written.load(Ordering::Relaxed)
                + c.dropped.load(Ordering::Relaxed)
                + c.failed.load(Ordering::Relaxed)
                == 30_000
        });
        // flushes happen when the queue empties: wait until the files hold what was written
        let mut all = rotated.clone();
        all.push(path.clone());
        wait_for("the files", || {
            lines_in(&all).len() as u64 == counters.written.load(Ordering::Relaxed)
        });
        let lines = lines_in(&all);
        assert_eq!(counters.dropped.load(Ordering::Relaxed), 0);
        assert_eq!(counters.failed.load(Ordering::Relaxed), 0);
        assert_eq!(lines.len(), 30_000, "no line lost across three renames");
        let mut seen: Vec<u32> = lines
            .iter()
            .map(|l| {
                l.trim_start_matches("{\"n\":")
                    .trim_end_matches('}')
                    .parse()
                    .unwrap()
            })
            .collect();
        seen.sort_unstable();
        let missing: Vec<u32> = (0..30_000)
            .filter(|n| seen.binary_search(n).is_err())
            .collect();
        assert!(
            missing.is_empty(),
            "missing {:?}",
            &missing[..missing.len().min(10)]
        );
        seen.dedup();
        assert_eq!(seen.len(), 30_000, "a line written twice");
        assert_eq!(counters.reopened.load(Ordering::Relaxed), 3);

        // copytruncate: the file is copied and cut to zero; appends go on at its new end
        let (tx, guard) = start_log_writer(path.to_str().unwrap(), 1000).unwrap();
        let counters = Arc::clone(tx.counters());
        tx.send("before".into());
        wait_for("the first line", || {
            std::fs::read_to_string(&path)
                .unwrap()
                .ends_with("before\n")
        });
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        tx.send("after".into());
        drop(tx);
        drop(guard);
        wait_for("the second line", || {
            counters.written.load(Ordering::Relaxed) == 2
        });
        wait_for("the flush", || {
            std::fs::read_to_string(&path).unwrap() == "after\n"
        });
        assert_eq!(counters.reopened.load(Ordering::Relaxed), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unwritable_path_counts_failed_lines_and_recovers_when_it_works_again() {
        let dir = temp_dir("unwritable");
        let path = dir.join("sub").join("requests.log"); // the directory does not exist yet
        let (tx, guard) = start_log_writer(path.to_str().unwrap(), 1000).unwrap();
        let counters = Arc::clone(tx.counters());
        for _ in 0..5 {
            tx.send("lost".into());
        }
        wait_for("5 failed lines", || {
            counters.failed.load(Ordering::Relaxed) == 5
        });
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        // the next rotation check opens it
        std::thread::sleep(ROTATION_CHECK + Duration::from_millis(300));
        tx.send("kept".into());
        drop(tx);
        drop(guard);
        wait_for("the line after recovery", || {
            std::fs::read_to_string(&path).is_ok_and(|t| t == "kept\n")
        });
        assert_eq!(counters.written.load(Ordering::Relaxed), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let (tx, _rx) = bounded::<String>(2);
        let sender = LogSender {
            tx,
            counters: Arc::default(),
        };
        let started = Instant::now();
        for _ in 0..1000 {
            sender.send("x".into());
        }
        assert_eq!(sender.counters.dropped.load(Ordering::Relaxed), 998);
        // the request path never waits for the writer
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
