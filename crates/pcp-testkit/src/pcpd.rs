//! A real `pcpd` for a test: its own loopback address and admin port, a temporary
//! config file, killed on drop (printing what it said when the test panicked).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::admin::{http, metric, try_http};
use crate::bins::pcpd_bin;
use crate::pcp::PcpClient;
use crate::ports::{free_port, fresh_ip};
use crate::tempdir::TempDir;

/// How long a daemon may take to answer `GET /status` after it was started.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// `[checkpoint] without_backup = "honour"`: honour option 192 without a backup.
pub const HONOUR: &str = "[checkpoint]\nwithout_backup = \"honour\"\n";

/// A config with short lifetimes (min 4 s, max one hour) plus `extra` TOML.
pub fn short_lifetime_config(extra: &str) -> String {
    format!("[lifetime]\nmin = 4\nmax = 3600\n{extra}\n")
}

/// A config that honours checkpoints without a backup, plus `extra` TOML.
pub fn honour_config(extra: &str) -> String {
    format!(
        "[pool]\naddresses = [\"192.0.2.1\"]\n\n[checkpoint]\nwithout_backup = \"honour\"\n\n{extra}"
    )
}

/// How to start a daemon.
pub struct Builder {
    bin: PathBuf,
    config: Option<String>,
    pcp_port: Option<u16>,
    ip: Option<Ipv4Addr>,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

/// Starts building a daemon run from the `pcpd` binary at `bin` (pcpd's own tests:
/// `env!("CARGO_BIN_EXE_pcpd")`; other packages': [`pcpd_bin`]).
pub fn pcpd(bin: impl Into<PathBuf>) -> Builder {
    Builder {
        bin: bin.into(),
        config: None,
        pcp_port: None,
        ip: None,
        args: Vec::new(),
        env: Vec::new(),
    }
}

impl Builder {
    /// Runs with `--config FILE`, FILE holding `text` (without it: embedded defaults).
    pub fn config(mut self, text: &str) -> Builder {
        self.config = Some(text.to_string());
        self
    }

    /// Listens for PCP on this port (default: a free one). crab_nat needs 5351.
    pub fn pcp_port(mut self, port: u16) -> Builder {
        self.pcp_port = Some(port);
        self
    }

    /// Runs on this loopback address (default: a [`fresh_ip`]). Pair mode needs it:
    /// each node's config names the other's replication address before either starts.
    pub fn at(mut self, ip: Ipv4Addr) -> Builder {
        self.ip = Some(ip);
        self
    }

    /// Sets an environment variable (after the default `RUST_LOG=info`).
    pub fn env(mut self, key: &str, value: &str) -> Builder {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Adds command-line arguments (after `--config`, `--listen` and `--admin`).
    pub fn args<I, S>(mut self, args: I) -> Builder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Starts the daemon and waits until its admin API answers. If it cannot bind (the
    /// address or port is taken by someone else), it is tried again on a fresh address
    /// (with [`Builder::at`]: on the same address, fresh ports).
    pub fn start(self) -> Pcpd {
        let mut last = String::new();
        for _ in 0..5 {
            match self.try_start() {
                Ok(p) => return p,
                Err(e) if e.contains("cannot bind") => last = e,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("pcpd could not bind on any fresh loopback address: {last}");
    }

    fn try_start(&self) -> Result<Pcpd, String> {
        let ip = self.ip.unwrap_or_else(fresh_ip);
        let dir = TempDir::new();
        let pcp = SocketAddr::new(
            IpAddr::V4(ip),
            self.pcp_port.unwrap_or_else(|| free_port(ip, true)),
        );
        let admin = SocketAddr::new(IpAddr::V4(ip), free_port(ip, false));
        let config_path = self.config.as_ref().map(|text| {
            let p = dir.join("pcpd.toml");
            std::fs::write(&p, text).expect("write the config file");
            p
        });
        let stdout = std::fs::File::create(dir.join("stdout")).expect("stdout file");
        let stderr = std::fs::File::create(dir.join("stderr")).expect("stderr file");
        let mut cmd = Command::new(&self.bin);
        if let Some(p) = &config_path {
            cmd.arg("--config").arg(p);
        }
        cmd.arg("--listen")
            .arg(pcp.to_string())
            .arg("--admin")
            .arg(admin.to_string())
            .args(&self.args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.bin.display()))?;
        let mut p = Pcpd {
            child,
            dir,
            ip,
            pcp,
            admin,
            config_path,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = p.child.try_wait().expect("try_wait") {
                return Err(format!(
                    "pcpd exited before it was ready ({status}); output:\n{}",
                    p.output()
                ));
            }
            // 401: the API is up and asks for a token (`admin_token_file`).
            if let Ok((200 | 401, _)) = try_http("GET", admin, "/status") {
                return Ok(p);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "pcpd not ready after {READY_TIMEOUT:?}; output:\n{}",
                    p.output()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A running daemon; dropping it kills the process and removes its files.
pub struct Pcpd {
    child: Child,
    dir: TempDir,
    /// Its loopback address (PCP and admin are both on it).
    pub ip: Ipv4Addr,
    /// PCP/NAT-PMP UDP address.
    pub pcp: SocketAddr,
    /// Admin HTTP address.
    pub admin: SocketAddr,
    /// The config file, when started with one.
    pub config_path: Option<PathBuf>,
}

impl Pcpd {
    /// The workspace's pcpd ([`pcpd_bin`]) on a fresh address with `config`.
    pub fn start(config: &str) -> Pcpd {
        pcpd(pcpd_bin()).config(config).start()
    }

    /// The workspace's pcpd listening for PCP on `pcp` (e.g. where a killed one was)
    /// with `config`.
    pub fn start_at(pcp: SocketAddr, config: &str) -> Pcpd {
        let IpAddr::V4(ip) = pcp.ip() else {
            panic!("IPv4 loopback only")
        };
        pcpd(pcpd_bin())
            .at(ip)
            .pcp_port(pcp.port())
            .config(config)
            .start()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it printed so far (stdout, then stderr).
    pub fn output(&self) -> String {
        let read = |n: &str| std::fs::read_to_string(self.dir.join(n)).unwrap_or_default();
        format!(
            "--- stdout\n{}--- stderr\n{}",
            read("stdout"),
            read("stderr")
        )
    }

    /// Replaces the config file's text (for a reload).
    pub fn rewrite_config(&self, text: &str) {
        let p = self.config_path.as_ref().expect("started with --config");
        std::fs::write(p, text).expect("rewrite the config file");
    }

    /// Sends a signal by name (`HUP`, `TERM`) with the `kill` command.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill(1)");
        assert!(status.success(), "kill -{name} {} failed", self.pid());
    }

    /// Waits up to `limit` for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `GET path` on the admin API; panics unless 200.
    pub fn get(&self, path: &str) -> String {
        let (status, body) = http("GET", self.admin, path);
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    /// `GET path` parsed as JSON.
    pub fn get_json(&self, path: &str) -> serde_json::Value {
        let body = self.get(path);
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }

    /// `GET /mappings`, as a list.
    pub fn mappings(&self) -> Vec<serde_json::Value> {
        match self.get_json("/mappings") {
            serde_json::Value::Array(v) => v,
            other => panic!("/mappings is not a list: {other}"),
        }
    }

    /// The one mapping of `protocol` / `internal_port` in `GET /mappings`.
    pub fn mapping(&self, protocol: u8, internal_port: u16) -> serde_json::Value {
        let all = self.mappings();
        let found: Vec<&serde_json::Value> = all
            .iter()
            .filter(|m| m["protocol"] == protocol && m["internal_port"] == internal_port)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "mapping {protocol}/{internal_port} in {all:#?}"
        );
        found[0].clone()
    }

    /// The first mapping of `internal_port` in `GET /mappings`, if there is one.
    pub fn find_mapping(&self, internal_port: u16) -> Option<serde_json::Value> {
        self.mappings()
            .into_iter()
            .find(|m| m["internal_port"] == internal_port)
    }

    /// `GET /metrics`, one sample: the value of the line `key value`.
    pub fn metric(&self, key: &str) -> Option<f64> {
        metric(&self.get("/metrics"), key)
    }

    /// A PCP client on a fresh socket bound to this daemon's own address.
    pub fn client(&self) -> PcpClient {
        PcpClient::new(IpAddr::V4(self.ip), self.pcp)
    }

    /// Kills the process with SIGKILL (no chance to clean up or say goodbye) and reaps
    /// it: when this returns, everything it sent is in its receivers' buffers.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `GET /ha`.
    pub fn ha(&self) -> serde_json::Value {
        self.get_json("/ha")
    }

    /// `GET /ha`, `None` when the admin API does not answer (yet, or any more).
    pub fn try_ha(&self) -> Option<serde_json::Value> {
        match try_http("GET", self.admin, "/ha") {
            Ok((200, body)) => serde_json::from_str(&body).ok(),
            _ => None,
        }
    }

    /// `POST path`: status and body.
    pub fn post(&self, path: &str) -> (u16, String) {
        http("POST", self.admin, path)
    }
}

impl Drop for Pcpd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("pcpd {} output:\n{}", self.pcp, self.output());
        }
    }
}

/// Polls `f` every `step` until it gives a value or `limit` passes.
pub fn poll<T>(limit: Duration, step: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(step);
    }
}

/// Polls `f` every 10 ms until it gives a value; panics after `limit`, saying `what`.
pub fn wait_for<T>(limit: Duration, what: &str, f: impl FnMut() -> Option<T>) -> T {
    poll(limit, Duration::from_millis(10), f)
        .unwrap_or_else(|| panic!("timed out after {limit:?}: {what}"))
}

/// Polls `f` every 50 ms until it is true (`true`) or `limit` passes (`false`).
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    poll(limit, Duration::from_millis(50), || f().then_some(())).is_some()
}
