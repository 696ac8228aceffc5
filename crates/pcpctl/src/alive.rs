//! `pcpctl alive FILE`: keepalived's liveness check of the local pcpd (docs/HA.md,
//! "keepalived"). It reads the two files pcpd keeps next to its `[ha] serving_file`
//! and asks pcpd nothing, so a pcpd that is merely busy cannot fail it:
//!
//! - `FILE.lock`: pcpd holds an exclusive `flock` on it for as long as the process
//!   exists; the kernel lets go of it the moment pcpd dies, however it dies.
//! - `FILE.alive`: a thread of pcpd's own sets its modification time every heartbeat
//!   (at most 100 ms).
//!   A pcpd that is stopped or frozen (SIGSTOP, a cgroup freezer) keeps its lock, but
//!   not this marker fresh; its backup takes over after `detection_ms` of silence, and
//!   the marker says that `detection_ms` too (`stale_after_ms`), so the check fails
//!   from the moment the backup may serve.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// What pcpd's liveness marker says of itself: how often pcpd touches it, and after how
/// long untouched pcpd counts as stalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marker {
    /// How often pcpd touches it (`touch_ms`: its `heartbeat_ms`, at most 100).
    pub touch: Duration,
    /// Untouched for this long, pcpd is stalled (`stale_after_ms`, its
    /// `detection_ms`).
    pub stale_after: Duration,
}

impl Marker {
    /// Parses the marker's line, `touch_ms=100 stale_after_ms=500` (both keys needed,
    /// in any order; other keys are left for later versions).
    pub fn parse(text: &str) -> Option<Marker> {
        let (mut touch, mut stale_after) = (None, None);
        for word in text.split_whitespace() {
            let (key, value) = word.split_once('=')?;
            let ms = || value.parse::<u64>().ok().map(Duration::from_millis);
            match key {
                "touch_ms" => touch = Some(ms()?),
                "stale_after_ms" => stale_after = Some(ms()?),
                _ => {}
            }
        }
        let m = Marker {
            touch: touch?,
            stale_after: stale_after?,
        };
        (!m.touch.is_zero() && m.stale_after >= m.touch).then_some(m)
    }

    /// How long to watch an old-looking marker for a touch: three touches (pcpd
    /// touches at least every 100 ms), well inside keepalived's script `timeout 1`.
    fn watch(self) -> Duration {
        (self.touch * 3).min(MAX_WATCH)
    }
}

/// The longest the check watches the marker for a touch.
const MAX_WATCH: Duration = Duration::from_millis(600);

/// Why the local pcpd does not count as alive (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum NotAlive {
    /// A file cannot be opened, locked or read.
    #[error("{}: {source}{}", .path.display(), hint(.source))]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Nobody holds the lock: pcpd is not running.
    #[error("{}: nobody holds it: pcpd is not running", .path.display())]
    NotRunning {
        /// The lock file.
        path: PathBuf,
    },
    /// The marker is not one pcpd wrote.
    #[error("{}: not a pcpd liveness marker: {text:?}", .path.display())]
    BadMarker {
        /// The marker.
        path: PathBuf,
        /// What it holds.
        text: String,
    },
    /// The marker is old (or from the future) and was not touched while watched: pcpd
    /// holds its lock but does not run, or cannot touch it.
    #[error(
        "{}: untouched for {} ms (stale after {} ms), and not touched within {} ms: pcpd is stopped or frozen, or cannot touch it (see its log)",
        .path.display(), .age.as_millis(), .stale_after.as_millis(), .watched.as_millis()
    )]
    Stalled {
        /// The marker.
        path: PathBuf,
        /// Since its last touch, by the clock.
        age: Duration,
        /// The marker's `stale_after_ms`.
        stale_after: Duration,
        /// How long it was watched for a touch.
        watched: Duration,
    },
}

/// What to check, for an error opening or reading a file.
fn hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::NotFound => " (is [ha] serving_file this path, and has pcpd started?)",
        std::io::ErrorKind::PermissionDenied => {
            " (pcpd's files are its own: run the check as root, keepalived's script_user root)"
        }
        _ => "",
    }
}

/// `FILE` with `suffix` added to its name (`serving` -> `serving.lock`).
fn sibling(file: &Path, suffix: &str) -> PathBuf {
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    file.with_file_name(name)
}

/// The liveness check of the pcpd whose `[ha] serving_file` is `serving_file`: Ok with
/// a line to print when it runs, the reason otherwise.
pub fn check(serving_file: &Path) -> Result<String, NotAlive> {
    let unreadable = |path: &Path| {
        let path = path.to_path_buf();
        move |source| NotAlive::Unreadable { path, source }
    };
    let lock = sibling(serving_file, ".lock");
    let f = std::fs::File::open(&lock).map_err(unreadable(&lock))?;
    match f.try_lock() {
        Ok(()) => {
            // Let go at once: a pcpd starting now waits for it a moment.
            let _ = f.unlock();
            return Err(NotAlive::NotRunning { path: lock });
        }
        Err(std::fs::TryLockError::WouldBlock) => {}
        Err(std::fs::TryLockError::Error(e)) => return Err(unreadable(&lock)(e)),
    }
    drop(f);
    let path = sibling(serving_file, ".alive");
    let text = match std::fs::read_to_string(&path) {
        // A pcpd older than the marker (upgrade pcpd on both nodes before keepalived's
        // configuration), or one that has taken its lock and is writing the marker
        // this instant: the lock is all there is to go by.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(format!(
                "alive: pcpd holds {}; no liveness marker {} (a pcpd without one cannot be \
                 seen frozen)\n",
                lock.display(),
                path.display()
            ));
        }
        r => r.map_err(unreadable(&path))?,
    };
    let marker = Marker::parse(&text).ok_or_else(|| NotAlive::BadMarker {
        path: path.clone(),
        text: text.trim_end().to_string(),
    })?;
    let modified = || {
        std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .map_err(unreadable(&path))
    };
    let first = modified()?;
    // From the future (the clock stepped back, maybe while pcpd was frozen): watched
    // like an old one.
    let age = SystemTime::now().duration_since(first);
    if let Ok(age) = age
        && age < marker.stale_after
    {
        return Ok(format!(
            "alive: pcpd holds {} and touched {} {} ms ago\n",
            lock.display(),
            path.display(),
            age.as_millis()
        ));
    }
    // Old by the clock, but a clock stepped forward looks the same: alive if pcpd
    // touches it now.
    let age = age.unwrap_or_default();
    let watched = marker.watch();
    let start = Instant::now();
    while start.elapsed() < watched {
        std::thread::sleep((marker.touch / 4).max(Duration::from_millis(5)));
        if modified()? != first {
            return Ok(format!(
                "alive: pcpd holds {} and touches {} (the clock says {} ms since the touch before)\n",
                lock.display(),
                path.display(),
                age.as_millis()
            ));
        }
    }
    Err(NotAlive::Stalled {
        path,
        age,
        stale_after: marker.stale_after,
        watched,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A serving file's directory with a held lock (another open file: flock locks
    /// belong to open files, so this process's check sees it held) and a marker.
    struct Setup {
        dir: pcp_testkit::TempDir,
        _lock: std::fs::File,
    }

    impl Setup {
        fn new(marker: &str) -> Setup {
            let dir = pcp_testkit::TempDir::new();
            let lock = std::fs::File::create(dir.join("serving.lock")).unwrap();
            lock.try_lock().unwrap();
            std::fs::write(dir.join("serving.alive"), marker).unwrap();
            Setup { dir, _lock: lock }
        }

        fn serving(&self) -> PathBuf {
            self.dir.join("serving")
        }

        /// Sets the marker's modification time `ago` in the past.
        fn age(&self, ago: Duration) {
            let f = std::fs::File::open(self.dir.join("serving.alive")).unwrap();
            f.set_modified(SystemTime::now() - ago).unwrap();
        }
    }

    const MARKER: &str = "touch_ms=20 stale_after_ms=100\n";

    #[test]
    fn parses_what_pcpd_writes_and_refuses_anything_else() {
        let m = Marker::parse("touch_ms=100 stale_after_ms=500\n").unwrap();
        assert_eq!(m.touch, Duration::from_millis(100));
        assert_eq!(m.stale_after, Duration::from_millis(500));
        assert_eq!(
            Marker::parse("stale_after_ms=500 later=1 touch_ms=100"),
            Some(m)
        );
        for bad in [
            "",
            "0\n",
            "touch_ms=100",
            "touch_ms=x stale_after_ms=500",
            "touch_ms=0 stale_after_ms=500",
            "touch_ms=500 stale_after_ms=100",
            "touch_ms=100 stale_after_ms=500 junk",
        ] {
            assert_eq!(Marker::parse(bad), None, "{bad:?}");
        }
        // Within keepalived's script timeout even for a slow heartbeat.
        assert_eq!(m.watch(), Duration::from_millis(300));
        let slow = Marker::parse("touch_ms=400 stale_after_ms=2000").unwrap();
        assert_eq!(slow.watch(), MAX_WATCH);
    }

    #[test]
    fn a_held_lock_and_a_fresh_marker_pass() {
        let s = Setup::new(MARKER);
        let out = check(&s.serving()).unwrap();
        assert!(out.starts_with("alive: "), "{out}");
    }

    #[test]
    fn a_free_or_missing_lock_is_not_running() {
        let s = Setup::new(MARKER);
        drop(s._lock);
        let err = check(&s.dir.join("serving")).unwrap_err();
        assert!(matches!(err, NotAlive::NotRunning { .. }), "{err:?}");
        assert!(err.to_string().contains("serving.lock"), "{err}");
        // The check let go of the lock it took.
        let f = std::fs::File::open(s.dir.join("serving.lock")).unwrap();
        f.try_lock().expect("the check must not keep the lock");
        let err = check(&s.dir.join("elsewhere")).unwrap_err();
        assert!(matches!(err, NotAlive::Unreadable { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("elsewhere.lock") && msg.contains("has pcpd started?"),
            "{msg}"
        );
    }

    #[test]
    fn an_old_untouched_marker_is_stalled() {
        let s = Setup::new(MARKER);
        s.age(Duration::from_secs(3));
        let start = Instant::now();
        let err = check(&s.serving()).unwrap_err();
        assert!(
            matches!(err, NotAlive::Stalled { watched, .. } if watched == Duration::from_millis(60)),
            "{err:?}"
        );
        assert!(start.elapsed() >= Duration::from_millis(60));
        assert!(err.to_string().contains("stopped or frozen"), "{err}");
    }

    /// A clock stepped forward makes a live pcpd's marker look old: it passes because
    /// it is touched while watched.
    #[test]
    fn an_old_marker_that_is_touched_passes() {
        let s = Setup::new(MARKER);
        s.age(Duration::from_secs(3));
        let path = s.dir.join("serving.alive");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let toucher = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut t = SystemTime::now() - Duration::from_secs(3);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(20));
                    t += Duration::from_millis(20);
                    let f = std::fs::File::open(&path).unwrap();
                    f.set_modified(t).unwrap();
                }
            })
        };
        let r = check(&s.serving());
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        toucher.join().unwrap();
        let out = r.unwrap();
        assert!(out.contains("touches"), "{out}");
    }

    /// A clock stepped back makes a marker look as if from the future: untouched, it is
    /// stalled all the same.
    #[test]
    fn an_untouched_marker_from_the_future_is_stalled() {
        let s = Setup::new(MARKER);
        let f = std::fs::File::open(s.dir.join("serving.alive")).unwrap();
        f.set_modified(SystemTime::now() + Duration::from_secs(60))
            .unwrap();
        let err = check(&s.serving()).unwrap_err();
        assert!(matches!(err, NotAlive::Stalled { .. }), "{err:?}");
    }

    #[test]
    fn a_foreign_marker_is_refused_and_a_missing_one_leaves_the_lock_to_decide() {
        let s = Setup::new("0\n");
        let err = check(&s.serving()).unwrap_err();
        assert!(matches!(err, NotAlive::BadMarker { .. }), "{err:?}");
        let s = Setup::new(MARKER);
        std::fs::remove_file(s.dir.join("serving.alive")).unwrap();
        let out = check(&s.serving()).unwrap();
        assert!(out.contains("no liveness marker"), "{out}");
        drop(s._lock);
        let err = check(&s.dir.join("serving")).unwrap_err();
        assert!(matches!(err, NotAlive::NotRunning { .. }), "{err:?}");
    }
}
