//! Helpers shared by pcpd's process-level tests (and, through `#[path]`, by pcpctl's):
//! start a real `pcpd` on its own loopback address with a temporary config file, stop
//! it when the test ends, talk to its admin API over HTTP and to its PCP socket over UDP.
//!
//! Addresses: every daemon gets its own `127.X.Y.1`, where X comes from the test
//! process id (so that two test runs on one machine, e.g. two worktrees, do not meet)
//! and Y counts daemons within the process. Only loopback is ever used.
#![allow(dead_code)]

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use pcp_proto::{Body, MapBody, Options, PcpOption, PeerBody, Request, Response, ResultCode};

/// How long a daemon may take to answer `GET /status` after it was started.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a UDP request waits for its answer.
const UDP_TIMEOUT: Duration = Duration::from_secs(3);

static NEXT_SLOT: AtomicU32 = AtomicU32::new(0);

/// A fresh loopback address for one daemon: `127.X.Y.1` (see the module doc).
pub fn fresh_ip() -> Ipv4Addr {
    let pid = std::process::id();
    let slot = NEXT_SLOT.fetch_add(1, Ordering::Relaxed);
    // X in 100..=199 keeps clear of 127.0.x.x, which other tools (pcpperf) use.
    let x = 100 + (pid % 100) as u8;
    let y = (slot % 250 + 1) as u8;
    let z = (1 + slot / 250 % 250) as u8;
    Ipv4Addr::new(127, x, y, z)
}

/// A port that was free on `ip` a moment ago (TCP or UDP).
pub fn free_port(ip: Ipv4Addr, udp: bool) -> u16 {
    if udp {
        UdpSocket::bind((ip, 0))
            .and_then(|s| s.local_addr())
            .expect("bind a UDP port on loopback")
            .port()
    } else {
        TcpListener::bind((ip, 0))
            .and_then(|s| s.local_addr())
            .expect("bind a TCP port on loopback")
            .port()
    }
}

/// A unique temporary directory, removed by [`Pcpd`]'s or [`TempDir`]'s drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates `$TMPDIR/pcpd-test-<pid>-<n>`.
    pub fn new() -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "pcpd-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create a temporary directory");
        TempDir(dir)
    }

    /// A path inside it.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
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

/// Starts building a daemon run from the `pcpd` binary at `bin`.
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

/// Polls `f` every 10 ms until it gives a value; panics after `limit`, saying `what`.
pub fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Timers of a pair (the `[ha]` keys other than the addresses and the role).
#[derive(Debug, Clone, Copy)]
pub struct HaTiming {
    /// `heartbeat_ms`.
    pub heartbeat_ms: u64,
    /// `detection_ms`.
    pub detection_ms: u64,
    /// `ack_timeout_ms`.
    pub ack_timeout_ms: u64,
}

impl Default for HaTiming {
    fn default() -> Self {
        HaTiming {
            heartbeat_ms: 100,
            detection_ms: 500,
            ack_timeout_ms: 250,
        }
    }
}

/// One node of a planned pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    /// The first node (normally started `active`).
    A,
    /// The second node (normally started `backup`).
    B,
}

/// An active/backup pair's addresses, fixed before either node starts: each node has its
/// own fresh loopback address, on which it listens for PCP, admin and replication.
#[derive(Debug, Clone)]
pub struct PairPlan {
    /// Node A's address.
    pub ip_a: Ipv4Addr,
    /// Node B's address.
    pub ip_b: Ipv4Addr,
    /// Node A's replication (`[ha] listen`) address.
    pub ha_a: SocketAddr,
    /// Node B's replication address.
    pub ha_b: SocketAddr,
    /// The server sections both nodes run with.
    pub server_config: String,
    /// The timers.
    pub timing: HaTiming,
}

impl PairPlan {
    /// Two fresh addresses with a free UDP replication port each.
    pub fn new(server_config: &str, timing: HaTiming) -> PairPlan {
        let (ip_a, ip_b) = (fresh_ip(), fresh_ip());
        PairPlan {
            ip_a,
            ip_b,
            ha_a: SocketAddr::new(IpAddr::V4(ip_a), free_port(ip_a, true)),
            ha_b: SocketAddr::new(IpAddr::V4(ip_b), free_port(ip_b, true)),
            server_config: server_config.to_string(),
            timing,
        }
    }

    /// The `[ha]` section of `node` starting as `role` (`"active"` or `"backup"`).
    pub fn ha_section(&self, node: Node, role: &str) -> String {
        let (listen, peer) = match node {
            Node::A => (self.ha_a, self.ha_b),
            Node::B => (self.ha_b, self.ha_a),
        };
        let t = self.timing;
        format!(
            "[ha]\nlisten = \"{listen}\"\npeer = \"{peer}\"\nrole = \"{role}\"\n\
             heartbeat_ms = {}\ndetection_ms = {}\nack_timeout_ms = {}\n",
            t.heartbeat_ms, t.detection_ms, t.ack_timeout_ms
        )
    }

    /// The whole config file of `node` starting as `role`.
    pub fn config(&self, node: Node, role: &str) -> String {
        format!(
            "{}\n\n{}",
            self.server_config.trim_end(),
            self.ha_section(node, role)
        )
    }

    /// Starts `node` as `role` with the `[ha]` section in its config file.
    pub fn start(&self, bin: impl Into<PathBuf>, node: Node, role: &str) -> Pcpd {
        let ip = match node {
            Node::A => self.ip_a,
            Node::B => self.ip_b,
        };
        pcpd(bin).at(ip).config(&self.config(node, role)).start()
    }
}

/// The role `GET /ha` of `d` shows, `None` when it does not answer.
pub fn role(d: &Pcpd) -> Option<String> {
    d.try_ha()
        .and_then(|h| h["role"].as_str().map(str::to_string))
}

/// Waits until `d`'s `GET /ha` satisfies `f`; returns that answer.
pub fn wait_ha(
    d: &Pcpd,
    limit: Duration,
    what: &str,
    f: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut last = None;
    let deadline = Instant::now() + limit;
    loop {
        if let Some(h) = d.try_ha() {
            if f(&h) {
                return h;
            }
            last = Some(h);
        }
        assert!(
            Instant::now() < deadline,
            "{}: timed out after {limit:?} waiting for {what}; last GET /ha: {last:?}",
            d.pcp
        );
        std::thread::sleep(Duration::from_millis(10));
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

/// The value of the sample `key` (`name{labels}` exactly as exposed) in Prometheus text.
pub fn metric(text: &str, key: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

/// One HTTP request; the status and body, or why there was no answer.
pub fn try_http(method: &str, addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .proxy(None)
        .build();
    let agent = ureq::Agent::new_with_config(config);
    let url = format!("http://{addr}{path}");
    let resp = match method {
        "POST" => agent.post(&url).send_empty(),
        "DELETE" => agent.delete(&url).call(),
        _ => agent.get(&url).call(),
    };
    let mut resp = resp.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| e.to_string())?;
    Ok((status, body))
}

/// One HTTP request; panics without an answer.
pub fn http(method: &str, addr: SocketAddr, path: &str) -> (u16, String) {
    try_http(method, addr, path).unwrap_or_else(|e| panic!("{method} http://{addr}{path}: {e}"))
}

/// A MAP request's parameters.
#[derive(Debug, Clone, Copy)]
pub struct Map {
    /// IANA protocol number.
    pub protocol: u8,
    /// Internal port.
    pub internal_port: u16,
    /// Requested lifetime (0 deletes).
    pub lifetime: u32,
    /// Mapping nonce.
    pub nonce: [u8; 12],
    /// Send CHECKPOINT_REQUIRED (192).
    pub checkpoint: bool,
}

impl Map {
    /// A UDP MAP for `internal_port`, one hour, with option 192, nonce from the port.
    pub fn udp(internal_port: u16) -> Map {
        let mut nonce = *b"test-nonce-0";
        nonce[10..].copy_from_slice(&internal_port.to_be_bytes());
        Map {
            protocol: pcp_proto::protocol::UDP,
            internal_port,
            lifetime: 3600,
            nonce,
            checkpoint: true,
        }
    }

    /// The same without option 192.
    pub fn without_checkpoint(mut self) -> Map {
        self.checkpoint = false;
        self
    }
}

/// A parsed PCP answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Result code.
    pub result: ResultCode,
    /// Lifetime.
    pub lifetime: u32,
    /// Assigned external endpoint (MAP/PEER bodies).
    pub external: Option<SocketAddr>,
    /// Whether option 192 came back.
    pub checkpoint_echoed: bool,
    /// The server's epoch time for this client.
    pub epoch: u32,
    /// The datagram.
    pub raw: Vec<u8>,
}

/// A UDP PCP/NAT-PMP client bound to one loopback address.
pub struct PcpClient {
    sock: UdpSocket,
    server: SocketAddr,
}

impl PcpClient {
    /// A client on `local`:(free port) talking to `server`.
    pub fn new(local: IpAddr, server: SocketAddr) -> PcpClient {
        let sock = UdpSocket::bind((local, 0)).expect("bind the client socket");
        sock.set_read_timeout(Some(UDP_TIMEOUT))
            .expect("set a read timeout");
        PcpClient { sock, server }
    }

    /// The client's address (what PCP's client address field must say).
    pub fn ip(&self) -> IpAddr {
        self.sock.local_addr().expect("local_addr").ip()
    }

    /// Sends `datagram` and returns the answer; panics after the timeout.
    pub fn exchange(&self, datagram: &[u8]) -> Vec<u8> {
        self.send(datagram);
        self.recv().unwrap_or_else(|e| {
            panic!("no answer from {} within {UDP_TIMEOUT:?}: {e}", self.server)
        })
    }

    /// Sends `datagram` without waiting for an answer.
    pub fn send(&self, datagram: &[u8]) {
        self.sock
            .send_to(datagram, self.server)
            .expect("send the datagram");
    }

    /// Waits for a datagram.
    pub fn recv(&self) -> std::io::Result<Vec<u8>> {
        let mut buf = [0u8; 2048];
        let (n, from) = self.sock.recv_from(&mut buf)?;
        assert_eq!(from, self.server, "answer from an unexpected address");
        Ok(buf[..n].to_vec())
    }

    /// Waits up to `wait` for a datagram; `None` when none came.
    pub fn recv_within(&self, wait: Duration) -> Option<Vec<u8>> {
        self.sock.set_read_timeout(Some(wait)).expect("timeout");
        let got = self.recv().ok();
        self.sock
            .set_read_timeout(Some(UDP_TIMEOUT))
            .expect("timeout");
        got
    }

    /// Sends a MAP and parses the answer.
    pub fn map(&self, m: Map) -> Answer {
        parse_answer(&self.exchange(&self.map_request(m)))
    }

    /// Sends a MAP and waits up to `wait` for the answer to *it* (same nonce, protocol
    /// and internal port; anything else that comes in meanwhile is skipped).
    pub fn try_map(&self, m: Map, wait: Duration) -> Option<Answer> {
        self.send(&self.map_request(m));
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let raw = self.recv_within(left)?;
            let Ok(resp) = Response::parse(&raw) else {
                continue;
            };
            if let Body::Map(b) = resp.body
                && b.nonce == m.nonce
                && b.protocol == m.protocol
                && b.internal_port == m.internal_port
            {
                return Some(parse_answer(&raw));
            }
        }
    }

    /// The MAP request for `m` from this client's address.
    pub fn map_request(&self, m: Map) -> Vec<u8> {
        self.request(m, None)
    }

    /// Sends a PEER for `m` with remote peer `remote` and parses the answer.
    pub fn peer(&self, m: Map, remote: SocketAddr) -> Answer {
        parse_answer(&self.exchange(&self.request(m, Some(remote))))
    }

    /// A MAP request, or with `remote` a PEER request, for `m`.
    pub fn request(&self, m: Map, remote: Option<SocketAddr>) -> Vec<u8> {
        let opts = [PcpOption::CheckpointRequired];
        let mapping = MapBody {
            nonce: m.nonce,
            protocol: m.protocol,
            internal_port: m.internal_port,
            external_port: 0,
            external_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        };
        let req = Request {
            lifetime: m.lifetime,
            client_addr: self.ip(),
            body: match remote {
                None => Body::Map(mapping),
                Some(r) => Body::Peer(PeerBody {
                    mapping,
                    remote_port: r.port(),
                    remote_addr: r.ip(),
                }),
            },
            options: if m.checkpoint {
                Options::from_list(&opts)
            } else {
                Options::EMPTY
            },
            pa_result_code: ResultCode::Success,
        };
        let mut buf = [0u8; pcp_proto::MAX_MESSAGE_LEN];
        let n = req.emit(&mut buf).expect("emit the request");
        buf[..n].to_vec()
    }
}

/// Parses a PCP answer; panics when it is not one.
pub fn parse_answer(raw: &[u8]) -> Answer {
    let resp = Response::parse(raw).unwrap_or_else(|e| panic!("bad PCP answer {raw:02x?}: {e}"));
    Answer {
        result: resp.result_code,
        lifetime: resp.lifetime,
        external: resp
            .body
            .mapping()
            .map(|m| SocketAddr::new(m.external_addr, m.external_port)),
        checkpoint_echoed: resp.options.checkpoint_required(),
        epoch: resp.epoch,
        raw: raw.to_vec(),
    }
}

/// Runs `bin` with `args` to the end (at most `limit`), returning status, stdout and
/// stderr.
pub fn run(bin: &Path, args: &[&str], limit: Duration) -> (ExitStatus, String, String) {
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    // Drain both pipes on threads so that a chatty child never blocks.
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{} {args:?} still running after {limit:?}", bin.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (
        status,
        t_out.join().expect("stdout reader"),
        t_err.join().expect("stderr reader"),
    )
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A config that honours checkpoints without a backup, plus `extra` TOML.
pub fn honour_config(extra: &str) -> String {
    format!(
        "[pool]\naddresses = [\"192.0.2.1\"]\n\n[checkpoint]\nwithout_backup = \"honour\"\n\n{extra}"
    )
}
