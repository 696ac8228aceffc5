//! `[ha] serving_file`: pcpd pushes whether it serves PCP to keepalived's
//! `track_file` (docs/HA.md, "keepalived") instead of being polled for it.
//!
//! The file holds `0` while this node serves PCP (HA role active, or promoting itself:
//! what `pcpctl ha --serving` passes on) and `1` otherwise (joining, backup, draining,
//! stopping). keepalived's `track_file` with `weight 0` reads a non-zero value as FAULT,
//! so the service address can only be on the node that serves.
//!
//! Role changes are observed under the pair lock (`Shared::after_ha`), on the request
//! path and the replication thread: they only publish the new value on a watch channel.
//! A thread of its own does the file IO, so a slow disk never delays a reply or a
//! heartbeat.
//!
//! Two more files next to it tell keepalived's liveness check (`pcpctl alive FILE`)
//! that pcpd runs: the lock ([`lock_path`], held while the process exists) and the
//! liveness marker ([`alive_path`]), touched by a thread of its own every heartbeat
//! (at most every 100 ms).
//! A pcpd that is stopped or frozen (SIGSTOP, a cgroup freezer, swapped out) keeps its
//! lock and its "serving" but stops touching the marker; its backup takes over after
//! `detection_ms` of silence, and the marker, untouched for as long, moves the address
//! there too.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::watch;

/// What the watch channel carries: `Some(serving)` while pcpd runs, `None` once it
/// stops (the file then says "not serving" for good).
pub type State = Option<bool>;

/// How often the writer rewrites the file even without a change, so that a file
/// someone removed or edited comes back (keepalived reads a missing file as 0, which
/// would count as serving).
const REASSERT: Duration = Duration::from_secs(2);

/// The file's content for a state.
fn content(state: State) -> &'static str {
    if state == Some(true) { "0\n" } else { "1\n" }
}

/// Writes the state atomically: a temporary file in the same directory, renamed over
/// `path`. keepalived watches the directory (inotify) and reads the file on the rename
/// (`IN_MOVED_TO`); a reader never sees a truncated or empty file, which it would read
/// as 0 (serving).
pub fn write(path: &Path, state: State) -> std::io::Result<()> {
    write_atomic(path, content(state))
}

/// Writes `content` to a temporary file in `path`'s directory and renames it over
/// `path`.
fn write_atomic(path: &Path, content: &str) -> std::io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("the serving file has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(content.as_bytes())?;
    // No fsync: the file lives in /run (tmpfs) and only matters while the system runs.
    drop(f);
    std::fs::rename(&tmp, path)
}

/// `path` with `suffix` added to its file name (`serving` -> `serving.lock`).
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

/// The lock file next to the serving file (`serving` -> `serving.lock`).
pub fn lock_path(path: &Path) -> PathBuf {
    sibling(path, ".lock")
}

/// Takes the exclusive lock (flock) on [`lock_path`] and returns the open file: the lock
/// lasts as long as the file stays open, that is, until this process ends, however it
/// ends. A crashed pcpd cannot rewrite its serving file, but the kernel releases its
/// lock at once, so keepalived's check (`pcpctl alive`, like `flock --nonblock
/// --conflict-exit-code 0 LOCK /bin/false` before it) sees a free lock the moment pcpd
/// is gone. Waits up to `wait` for whoever holds it (a check takes it for an instant).
pub fn lock(path: &Path, wait: Duration) -> std::io::Result<std::fs::File> {
    // Read-only when it exists: keepalived's check (root) may have created it first,
    // and an flock needs no write access.
    let lock = lock_path(path);
    let f = match std::fs::File::open(&lock) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock)?,
        r => r?,
    };
    let deadline = std::time::Instant::now() + wait;
    loop {
        match f.try_lock() {
            Ok(()) => return Ok(f),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    "another process holds the serving file's lock (a second pcpd?)",
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
    }
}

/// The liveness marker next to the serving file (`serving` -> `serving.alive`).
pub fn alive_path(path: &Path) -> PathBuf {
    sibling(path, ".alive")
}

/// What the liveness marker says of itself, for `pcpctl alive`: how often pcpd
/// touches it, and after how long untouched pcpd counts as stalled (its `detection_ms`:
/// by then its peer may have taken over). One line, `touch_ms=100 stale_after_ms=500`.
fn marker_content(touch: Duration, stale_after: Duration) -> String {
    format!(
        "touch_ms={} stale_after_ms={}\n",
        touch.as_millis(),
        stale_after.as_millis()
    )
}

/// The longest interval between two touches of the liveness marker, whatever
/// `heartbeat_ms`: `pcpctl alive` watches an old-looking marker for a few touches
/// within keepalived's script timeout (1 s).
const MAX_TOUCH: Duration = Duration::from_millis(100);

/// Stops the thread that touches the liveness marker when dropped ([`spawn_alive`]).
#[derive(Debug)]
pub struct Toucher {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Toucher {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Writes the liveness marker (atomically, like the serving file) and starts the
/// thread that touches it (sets its modification time) every `heartbeat` (at most
/// [`MAX_TOUCH`]) until the returned [`Toucher`] is dropped; pcpd keeps it for as long
/// as it runs. At every touch it also checks what the marker says, and rewrites one
/// someone removed or changed; it logs once when it cannot. The thread does nothing
/// else and takes no lock, so only a process that does not run at all (stopped,
/// frozen) stops touching it.
pub fn spawn_alive(
    path: &Path,
    heartbeat: Duration,
    stale_after: Duration,
) -> std::io::Result<Toucher> {
    let touch = heartbeat.clamp(Duration::from_millis(1), MAX_TOUCH);
    let marker = alive_path(path);
    let content = marker_content(touch, stale_after);
    write_atomic(&marker, &content)?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let thread = std::thread::Builder::new()
        .name("pcpd-alive".into())
        .spawn(move || {
            let mut failing = false;
            let mut buf = String::with_capacity(64);
            loop {
                std::thread::sleep(touch);
                if stopped.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                let ok = std::fs::File::open(&marker).and_then(|mut f| {
                    buf.clear();
                    std::io::Read::read_to_string(&mut f, &mut buf)?;
                    f.set_modified(std::time::SystemTime::now())
                });
                if ok.is_ok() && buf == content {
                    failing = false;
                    continue;
                }
                match write_atomic(&marker, &content) {
                    Ok(()) => {
                        tracing::warn!(path = %marker.display(), "liveness marker was changed or removed: rewritten");
                        failing = false;
                    }
                    Err(e) => {
                        if !failing {
                            tracing::error!(error = %e, path = %marker.display(), "cannot touch the liveness marker (keepalived's check will take the address away)");
                        }
                        failing = true;
                    }
                }
            }
        })?;
    Ok(Toucher {
        stop,
        thread: Some(thread),
    })
}

/// Why pcpd cannot take its serving file at startup ([`claim`]).
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// Another process holds the lock: a second pcpd with the same `serving_file`.
    #[error("{}: held by another process (a second pcpd with the same serving_file?)", lock_path(.0).display())]
    Held(PathBuf),
    /// The lock file or the serving file cannot be opened, locked or written.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Takes the serving file at startup: its lock ([`lock`], held until the process ends),
/// with the file saying "not serving" before the lock is held, waiting up to `wait`
/// for the lock. An error stops pcpd: without the lock keepalived's check never sees
/// it alive, and a second pcpd must not write another's file.
///
/// Both orders of "write, lock" go wrong: writing first would overwrite the file of a
/// pcpd that holds it, and locking first would show a crashed run's "serving" beside a
/// held lock, for an instant. So the lock is taken once to learn that nobody holds it,
/// let go, the file written, and the lock taken again (a second pcpd starting in that
/// instant fails the same way).
pub fn claim(path: &Path, wait: Duration) -> Result<std::fs::File, ClaimError> {
    let lock_err = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::WouldBlock {
            ClaimError::Held(path.to_path_buf())
        } else {
            ClaimError::Io {
                path: lock_path(path),
                source: e,
            }
        }
    };
    let f = lock(path, wait).map_err(lock_err)?;
    f.unlock().map_err(lock_err)?;
    write(path, Some(false)).map_err(|source| ClaimError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    drop(f);
    lock(path, wait).map_err(lock_err)
}

/// Whether the file already says what `state` means.
fn says(path: &Path, state: State) -> bool {
    std::fs::read_to_string(path).is_ok_and(|c| c == content(state))
}

/// Starts the writer thread: it writes the current state at once, then on every
/// change, and re-asserts it every [`REASSERT`]. It ends after writing the stopped
/// state (`None`) or when the sender is dropped (the file then says "not serving").
pub fn spawn(
    path: PathBuf,
    mut rx: watch::Receiver<State>,
    rt: tokio::runtime::Handle,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("pcpd-serving-file".into())
        .spawn(move || {
            let mut written: Option<State> = None;
            // Log a failing write once, not at every re-assert.
            let mut failing = false;
            loop {
                let state = *rx.borrow_and_update();
                let changed = written != Some(state);
                if changed || !says(&path, state) {
                    match write(&path, state) {
                        Ok(()) => {
                            let serving = state == Some(true);
                            if changed {
                                tracing::info!(path = %path.display(), serving, "serving file written");
                            } else {
                                tracing::warn!(path = %path.display(), serving, "serving file was changed or removed: rewritten");
                            }
                            written = Some(state);
                            failing = false;
                        }
                        Err(e) => {
                            if !failing {
                                tracing::error!(error = %e, path = %path.display(), "cannot write the serving file (keepalived reads a missing file as serving)");
                            }
                            failing = true;
                            written = None;
                        }
                    }
                }
                if state.is_none() {
                    return;
                }
                let changed = rt.block_on(async {
                    tokio::time::timeout(REASSERT, rx.changed()).await
                });
                if let Ok(Err(_)) = changed {
                    // The sender is gone: pcpd is stopping.
                    if let Err(e) = write(&path, None) {
                        tracing::error!(error = %e, path = %path.display(), "cannot write the serving file");
                    }
                    return;
                }
            }
        })
}

/// Publishes a new serving state; cheap, never blocks on IO. Leaves a stopped state
/// alone.
pub fn publish(tx: &watch::Sender<State>, serving: bool) {
    tx.send_if_modified(|s| match s {
        Some(v) if *v != serving => {
            *v = serving;
            true
        }
        _ => false,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn dir() -> pcp_testkit::TempDir {
        pcp_testkit::TempDir::new()
    }

    fn wait_for(path: &Path, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = std::fs::read_to_string(path).unwrap_or_default();
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {got:?}, want {want:?}",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn writes_zero_only_while_serving_and_leaves_no_temporary_file() {
        let d = dir();
        let path = d.join("serving");
        write(&path, Some(true)).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "0\n");
        write(&path, Some(false)).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1\n");
        write(&path, None).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1\n");
        let names: Vec<_> = std::fs::read_dir(&d.0)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("serving")]);
    }

    /// A reader racing the writer sees a whole value every time: never an empty or
    /// partial file (keepalived would read those as 0, serving).
    #[test]
    fn readers_never_see_a_torn_file() {
        let d = dir();
        let path = d.join("serving");
        write(&path, Some(false)).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (path, stop) = (path.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut reads = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let c = std::fs::read_to_string(&path).expect("the file always exists");
                    assert!(c == "0\n" || c == "1\n", "torn read: {c:?}");
                    reads += 1;
                }
                reads
            })
        };
        for i in 0..2000 {
            write(&path, Some(i % 2 == 0)).unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
    }

    /// The lock is held exactly while its holder keeps it open: another open file
    /// description (keepalived's check, `pcpctl alive`) cannot take it before, can after.
    #[test]
    fn the_lock_is_held_until_released() {
        let d = dir();
        let path = d.join("serving");
        // Already there (keepalived's check may create it first): opened as it is.
        std::fs::write(lock_path(&path), "").unwrap();
        let held = lock(&path, Duration::ZERO).unwrap();
        let other = std::fs::File::open(lock_path(&path)).unwrap();
        assert!(matches!(
            other.try_lock(),
            Err(std::fs::TryLockError::WouldBlock)
        ));
        assert!(lock(&path, Duration::from_millis(50)).is_err());
        drop(held);
        other.try_lock().expect("free once its holder is gone");
        other.unlock().unwrap();
        assert_eq!(lock_path(&path), d.join("serving.lock"));
    }

    /// Startup: a crashed run's "serving" is overwritten and the lock is held after.
    #[test]
    fn claim_says_not_serving_and_holds_the_lock() {
        let d = dir();
        let path = d.join("serving");
        std::fs::write(&path, "0\n").unwrap();
        let held = claim(&path, Duration::ZERO).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1\n");
        let other = std::fs::File::open(lock_path(&path)).unwrap();
        assert!(matches!(
            other.try_lock(),
            Err(std::fs::TryLockError::WouldBlock)
        ));
        drop(held);
        other.try_lock().expect("free once pcpd is gone");
    }

    /// Startup with the lock held elsewhere (a second pcpd on the same file): an error
    /// naming the lock file, and the other's file left as it is.
    #[test]
    fn claim_fails_on_a_held_lock_and_leaves_the_file_alone() {
        let d = dir();
        let path = d.join("serving");
        std::fs::write(&path, "0\n").unwrap();
        let first = lock(&path, Duration::ZERO).unwrap();
        let err = claim(&path, Duration::from_millis(50)).unwrap_err();
        assert!(matches!(err, ClaimError::Held(_)), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains(&lock_path(&path).display().to_string()),
            "{msg}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "0\n", "clobbered");
        drop(first);
    }

    /// A serving file in a directory that does not exist: an error naming the file.
    #[test]
    fn claim_fails_where_nothing_can_be_written() {
        let d = dir();
        let path = d.join("missing").join("serving");
        let err = claim(&path, Duration::ZERO).unwrap_err();
        assert!(matches!(err, ClaimError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("missing"), "{err}");
    }

    /// The marker says what `pcpctl alive` needs, is touched every `touch`, and comes
    /// back when removed.
    #[test]
    fn the_liveness_marker_is_touched_and_rewritten() {
        let d = dir();
        let path = d.join("serving");
        let marker = alive_path(&path);
        assert_eq!(marker, d.join("serving.alive"));
        let touch = Duration::from_millis(10);
        let toucher = spawn_alive(&path, touch, Duration::from_millis(50)).unwrap();
        assert_eq!(
            std::fs::read_to_string(&marker).unwrap(),
            "touch_ms=10 stale_after_ms=50\n"
        );
        let mtime = || std::fs::metadata(&marker).and_then(|m| m.modified()).ok();
        let first = mtime().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while mtime() == Some(first) {
            assert!(Instant::now() < deadline, "never touched");
            std::thread::sleep(touch);
        }
        std::fs::remove_file(&marker).unwrap();
        wait_for(&marker, "touch_ms=10 stale_after_ms=50\n");
        std::fs::write(&marker, "garbled").unwrap();
        wait_for(&marker, "touch_ms=10 stale_after_ms=50\n");
        // Stopped for good once dropped: no longer touched.
        drop(toucher);
        let last = mtime().unwrap();
        std::thread::sleep(touch * 5);
        assert_eq!(mtime(), Some(last));
        // The heartbeat is capped: pcpctl alive watches for a few touches within 1 s.
        let slow = d.join("slow");
        let _slow = spawn_alive(&slow, Duration::from_secs(2), Duration::from_secs(5)).unwrap();
        assert_eq!(
            std::fs::read_to_string(alive_path(&slow)).unwrap(),
            "touch_ms=100 stale_after_ms=5000\n"
        );
    }

    #[test]
    fn the_writer_follows_every_transition_and_says_not_serving_when_stopped() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_time()
            .build()
            .unwrap();
        let d = dir();
        let path = d.join("serving");
        // A stale "serving" from a crashed run is overwritten at once.
        std::fs::write(&path, "0\n").unwrap();
        let (tx, rx) = watch::channel(Some(false));
        let handle = rt.handle().clone();
        let writer = spawn(path.clone(), rx, handle).unwrap();
        wait_for(&path, "1\n");
        publish(&tx, true);
        wait_for(&path, "0\n");
        publish(&tx, false);
        wait_for(&path, "1\n");
        publish(&tx, true);
        wait_for(&path, "0\n");
        // Removed behind pcpd's back: re-asserted.
        std::fs::remove_file(&path).unwrap();
        wait_for(&path, "0\n");
        // Stopping: "not serving" for good, even if a late role change is published.
        tx.send_replace(None);
        publish(&tx, true);
        writer.join().unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1\n");
    }
}
