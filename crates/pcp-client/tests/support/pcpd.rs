//! Runs a real `pcpd` for a test: its own loopback address and admin port, a temporary
//! config file, killed on drop. Only loopback is used.
//!
//! The binary is the `pcpd` beside this test's target directory (`target/debug/pcpd`);
//! when it is missing or older than its sources, `cargo build -p pcpd` makes it first.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

static SLOT: AtomicU32 = AtomicU32::new(0);

/// A fresh `127.X.Y.Z` for one test: X from the process id (200–249, clear of the
/// ranges pcpd's and pcpctl's tests use), Y.Z counting.
pub fn fresh_ip() -> Ipv4Addr {
    let x = 200 + (std::process::id() % 50) as u8;
    let n = SLOT.fetch_add(1, Ordering::Relaxed);
    Ipv4Addr::new(127, x, (n / 250 + 1) as u8, (n % 250 + 1) as u8)
}

/// A TCP port free on `ip` a moment ago.
pub fn free_tcp(ip: Ipv4Addr) -> u16 {
    TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A UDP port free on `ip` a moment ago.
pub fn free_udp(ip: Ipv4Addr) -> u16 {
    UdpSocket::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("workspace root")
        .to_path_buf()
}

fn newest(path: &Path) -> Option<SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    let own = meta.modified().ok();
    if !meta.is_dir() {
        return own;
    }
    std::fs::read_dir(path)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| newest(&e.path()))
        .chain(own)
        .max()
}

/// The target profile directory this test runs from (`target/debug`).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/debug/deps/<test> → target/debug
    exe.parent()
        .and_then(Path::parent)
        .expect("profile directory")
        .to_path_buf()
}

/// The pcpd binary, built when missing or stale.
pub fn pcpd_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    static BUILD: Mutex<()> = Mutex::new(());
    BIN.get_or_init(|| {
        let _g = BUILD.lock().unwrap();
        let dir = profile_dir();
        let bin = dir.join("pcpd");
        let built = std::fs::metadata(&bin).and_then(|m| m.modified()).ok();
        let root = workspace_root();
        let sources = [
            "crates/pcpd/src",
            "crates/pcp-server/src",
            "crates/pcp-proto/src",
            "crates/pcp-dataplane/src",
        ]
        .iter()
        .filter_map(|p| newest(&root.join(p)))
        .max();
        if !matches!((built, sources), (Some(b), Some(s)) if b >= s) {
            let target_dir = dir.parent().expect("target directory");
            let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug");
            let mut cmd = Command::new(env!("CARGO"));
            cmd.current_dir(&root)
                .args(["build", "--quiet", "-p", "pcpd", "--bin", "pcpd"])
                .arg("--target-dir")
                .arg(target_dir);
            if profile == "release" {
                cmd.arg("--release");
            }
            let out = cmd.output().expect("run cargo build -p pcpd");
            assert!(
                out.status.success(),
                "cargo build -p pcpd failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(bin.exists(), "{} missing", bin.display());
        bin
    })
    .clone()
}

/// A running pcpd; dropping it kills it.
pub struct Pcpd {
    child: Child,
    dir: PathBuf,
    pub ip: Ipv4Addr,
    pub pcp: SocketAddr,
    pub admin: SocketAddr,
}

/// A config with short lifetimes (min 4 s) plus `extra` TOML.
pub fn config(extra: &str) -> String {
    format!("[lifetime]\nmin = 4\nmax = 3600\n{extra}\n")
}

/// Honour 192 without a backup.
pub const HONOUR: &str = "[checkpoint]\nwithout_backup = \"honour\"\n";

impl Pcpd {
    /// Starts pcpd on a fresh address with `config`.
    pub fn start(config: &str) -> Pcpd {
        let ip = fresh_ip();
        let pcp = SocketAddr::new(IpAddr::V4(ip), free_udp(ip));
        Pcpd::start_at(pcp, config)
    }

    /// Starts pcpd listening on `pcp` (e.g. where a killed one was).
    pub fn start_at(pcp: SocketAddr, config: &str) -> Pcpd {
        let IpAddr::V4(ip) = pcp.ip() else {
            panic!("IPv4 loopback only")
        };
        let admin = SocketAddr::new(pcp.ip(), free_tcp(ip));
        let dir = std::env::temp_dir().join(format!(
            "pcp-client-test-{}-{}",
            std::process::id(),
            SLOT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("pcpd.toml");
        std::fs::write(&cfg, config).unwrap();
        let child = Command::new(pcpd_bin())
            .arg("--config")
            .arg(&cfg)
            .arg("--listen")
            .arg(pcp.to_string())
            .arg("--admin")
            .arg(admin.to_string())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("out")).unwrap())
            .stderr(std::fs::File::create(dir.join("err")).unwrap())
            .spawn()
            .expect("start pcpd");
        let mut p = Pcpd {
            child,
            dir,
            ip,
            pcp,
            admin,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = p.child.try_wait().unwrap() {
                panic!("pcpd exited ({s}):\n{}", p.output());
            }
            if http_get(admin, "/status").is_ok() {
                return p;
            }
            assert!(Instant::now() < deadline, "pcpd not ready:\n{}", p.output());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn output(&self) -> String {
        let r = |n| std::fs::read_to_string(self.dir.join(n)).unwrap_or_default();
        format!("--- stdout\n{}--- stderr\n{}", r("out"), r("err"))
    }

    /// `GET /mappings`.
    pub fn mappings(&self) -> Vec<serde_json::Value> {
        let body = http_get(self.admin, "/mappings").expect("GET /mappings");
        serde_json::from_str(&body).expect("JSON")
    }

    /// The mapping of `internal_port` in `GET /mappings`, if present.
    pub fn mapping(&self, internal_port: u16) -> Option<serde_json::Value> {
        self.mappings()
            .into_iter()
            .find(|m| m["internal_port"] == internal_port)
    }

    /// Kills it and waits for it to exit.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Pcpd {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("pcpd {} output:\n{}", self.pcp, self.output());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// GET over HTTP/1.1; the body if 200.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let config = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .proxy(None)
        .build();
    let agent = ureq::Agent::new_with_config(config);
    let mut resp = agent
        .get(&format!("http://{addr}{path}"))
        .call()
        .map_err(|e| e.to_string())?;
    resp.body_mut().read_to_string().map_err(|e| e.to_string())
}

/// Polls `f` every 50 ms until it is true or `limit` passes.
pub fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
