//! A pcpd pair behind real keepalived, in network namespaces the test creates and
//! removes, with keepalived's configuration and notify script generated from the
//! documented example (`docs/keepalived/`), so the example itself is what runs:
//!
//! ```text
//!                     ┌ na: eth0 192.0.2.11, pcpd active, keepalived ┐
//!  cli: 192.0.2.100 ─ br0                                            ha0 10.255.0.0/30
//!                     └ nb: eth0 192.0.2.12, pcpd backup, keepalived ┘
//!  service address (VRRP virtual IP) 192.0.2.53, on whichever node keepalived chose
//! ```
//!
//! - `switchover_and_kill_9_move_the_service_address_within_one_retransmission`: both
//!   pcpd push their role into `[ha] serving_file`, keepalived's `track_file`. Under
//!   checkpointed load from the client namespace (16 hosts, requests retransmitted at
//!   RFC 6887 timing: 3 s, then 6 s), `pcpctl switchover` on the active, then back.
//!   Every request is answered by at most its first retransmission, every mapping whose
//!   last answer echoed 192 is on the new active with the same external endpoint, the
//!   old active is a backup whose file says 1, and the service address moved with the
//!   role within a loose budget of the new active's file saying 0 (measured times are
//!   printed). Then `kill -9` of the active: its file stays 0, its liveness check
//!   (`pcpctl alive`: the lock is free) takes the address away and the survivor gets it
//!   within the budget of its takeover. The killed node restarts and follows as
//!   backup. Then SIGSTOP of the active under load: its file stays 0 and it keeps its
//!   lock, but its liveness marker goes stale, so the address follows the takeover
//!   within the same budget and every request is answered by its first
//!   retransmission; continued, the frozen node steps down. Then the new active's admin
//!   API is silenced (nftables drops it): its answering check takes the address away,
//!   and gives it back once the API answers. Last, SIGTERM of the active: its file
//!   says 1 and the address leaves it.
//!   At every VRRP MASTER the documented notify script finds pcpd already active (the
//!   file made VRRP follow pcpd) and never promotes.
//!
//! Root only (a loud SKIP otherwise). Needs `ip`, `sysctl`, `nft` and `keepalived` (Debian
//! package `keepalived`); with `PCPD_REQUIRE_KEEPALIVED=1` (scripts/test as root) a
//! missing keepalived is a failure.

use std::collections::HashMap;
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pcp_testkit::netns::{self, HELPER_ENV, Lab, cannot_run};
use pcp_testkit::{Map, PcpClient, TempDir, parse_answer, poll, workspace_root};

const PCPD: &str = env!("CARGO_BIN_EXE_pcpd");
const CLIENT: &str = "192.0.2.100";
const VIP: &str = "192.0.2.53";
const NODE_IP: [&str; 2] = ["192.0.2.11", "192.0.2.12"];
const HA_IP: [&str; 2] = ["10.255.0.1", "10.255.0.2"];
/// Load threads in the client namespace (concurrent hosts' worth of requests, so that
/// many cross each handover), each with its own internal ports.
const THREADS: u16 = 16;
const PORTS_PER_THREAD: u16 = 30;
const FIRST_PORT: u16 = 20_000;
/// RFC 6887 §8.1.1: initial retransmission time 3 s, each further one doubles, with a
/// random factor of ±10 %.
const IRT: Duration = Duration::from_secs(3);

/// The helpers this test runs inside its namespaces: `pcp-load` (below) or those of
/// [`netns::helper_main`].
#[test]
#[ignore = "helper process of the namespace tests"]
fn netns_helper() {
    let Ok(spec) = std::env::var(HELPER_ENV) else {
        return;
    };
    if spec.starts_with("pcp-load ") {
        pcp_load(&spec);
    } else {
        netns::helper_main();
    }
}

fn skip(test: &str) -> bool {
    let why = cannot_run(&["ip", "sysctl", "nft", "keepalived"]);
    match why {
        Some(why)
            if why.contains("keepalived")
                && std::env::var_os("PCPD_REQUIRE_KEEPALIVED").is_some() =>
        {
            panic!("{test}: {why} and PCPD_REQUIRE_KEEPALIVED is set (apt-get install keepalived)")
        }
        Some(why) => {
            eprintln!("!! SKIP {test}: {why}");
            true
        }
        None => false,
    }
}

/// One request's fate, as the load helper reports it.
#[derive(Debug, Clone)]
struct Outcome {
    port: u16,
    /// Milliseconds after the load started when the request was first sent.
    sent_ms: u64,
    /// 1: answered before its retransmission; 2: after it (before the second one);
    /// 0: not answered by then.
    attempt: u8,
    echoed: bool,
    external: Option<SocketAddr>,
    lifetime: u32,
}

/// `pcp-load SERVER CLIENT_IP RUN_MS`: `THREADS` threads, each cycling through its own
/// internal ports with MAP + 192 (one request at a time, 25 ms apart), retransmitting
/// an unanswered request like an RFC 6887 client: after IRT × (1 ± 0.1), then twice
/// that. Stops starting requests after RUN_MS; prints one line per request
/// (`> R port sent_ms attempt echoed external lifetime`) and `> DONE`.
fn pcp_load(spec: &str) {
    let args: Vec<&str> = spec.split(' ').collect();
    let server: SocketAddr = args[1].parse().expect("server");
    let ip: IpAddr = args[2].parse().expect("client address");
    let run = Duration::from_millis(args[3].parse().expect("run ms"));
    let start = Instant::now();
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            std::thread::spawn(move || {
                let client = PcpClient::new(ip, server);
                let mut out = Vec::new();
                let mut seed = 0x9e37_79b9_u64 ^ u64::from(t);
                let mut k = 0u16;
                while start.elapsed() < run {
                    let port = FIRST_PORT + t * PORTS_PER_THREAD + k % PORTS_PER_THREAD;
                    k = k.wrapping_add(1);
                    let mut m = Map::udp(port);
                    m.lifetime = 600;
                    let request = client.map_request(m);
                    seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    // RAND in [-0.1, 0.1].
                    let rand = ((seed >> 33) % 2001) as f64 / 10_000.0 - 0.1;
                    let rt1 = IRT.mul_f64(1.0 + rand);
                    let sent = Instant::now();
                    let sent_ms = start.elapsed().as_millis() as u64;
                    client.send(&request);
                    let mut attempt = 1;
                    let mut retransmit_at = sent + rt1;
                    let give_up = sent + rt1 + rt1 * 2;
                    let answer = loop {
                        let now = Instant::now();
                        if now >= give_up {
                            break None;
                        }
                        if attempt == 1 && now >= retransmit_at {
                            client.send(&request);
                            attempt = 2;
                            retransmit_at = give_up;
                        }
                        let wait = retransmit_at.min(give_up).saturating_duration_since(now);
                        let Some(raw) = client.recv_within(wait.max(Duration::from_millis(1)))
                        else {
                            continue;
                        };
                        match pcp_proto::Response::parse(&raw).map(|r| r.body) {
                            Ok(pcp_proto::Body::Map(b))
                                if b.nonce == m.nonce && b.internal_port == port =>
                            {
                                break Some(parse_answer(&raw));
                            }
                            _ => continue,
                        }
                    };
                    out.push(match answer {
                        Some(a) => Outcome {
                            port,
                            sent_ms,
                            attempt,
                            echoed: a.checkpoint_echoed
                                && a.result == pcp_proto::ResultCode::Success,
                            external: a.external,
                            lifetime: a.lifetime,
                        },
                        None => Outcome {
                            port,
                            sent_ms,
                            attempt: 0,
                            echoed: false,
                            external: None,
                            lifetime: 0,
                        },
                    });
                    std::thread::sleep(Duration::from_millis(25));
                }
                out
            })
        })
        .collect();
    for t in threads {
        for o in t.join().expect("a load thread") {
            println!(
                "> R {} {} {} {} {} {}",
                o.port,
                o.sent_ms,
                o.attempt,
                o.echoed,
                o.external.map_or("-".to_string(), |e| e.to_string()),
                o.lifetime
            );
        }
    }
    println!("> DONE");
}

fn parse_outcomes(text: &str) -> Vec<Outcome> {
    assert!(
        text.lines().any(|l| l == "> DONE"),
        "the load helper did not finish:\n{text}"
    );
    text.lines()
        .filter_map(|l| l.strip_prefix("> R "))
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            Outcome {
                port: f[0].parse().unwrap(),
                sent_ms: f[1].parse().unwrap(),
                attempt: f[2].parse().unwrap(),
                echoed: f[3] == "true",
                external: f[4].parse().ok(),
                lifetime: f[5].parse().unwrap(),
            }
        })
        .collect()
}

/// The lab, keepalived's process ids, and the directory of configs and logs. Drop stops
/// keepalived first (its VRRP child too, whose pid it wrote), then the lab removes
/// pcpd and the namespaces.
struct Pair {
    lab: Lab,
    dir: TempDir,
    ns: [String; 2],
    cli: String,
    pcpd: [Option<usize>; 2],
    keepalived: Vec<usize>,
}

impl Drop for Pair {
    fn drop(&mut self) {
        for &i in &self.keepalived {
            let pid = self.lab.child(i).id();
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        for &i in &self.keepalived {
            while Instant::now() < deadline && matches!(self.lab.child(i).try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Whatever is left (a VRRP child whose parent was killed) by its pid file.
        for n in 0..2 {
            for f in ["keepalived.pid", "vrrp.pid"] {
                if let Ok(pid) = std::fs::read_to_string(self.dir.join(&format!("{n}-{f}"))) {
                    let pid = pid.trim();
                    if !pid.is_empty() && Path::new(&format!("/proc/{pid}")).exists() {
                        let _ = Command::new("kill").args(["-KILL", pid]).status();
                    }
                }
            }
        }
    }
}

impl Pair {
    fn pcpctl(&self, n: usize, args: &[&str]) -> (bool, String) {
        let pcpctl = pcpctl_bin();
        let mut all = vec![pcpctl.to_str().unwrap(), "--admin", "127.0.0.1:8351"];
        all.extend_from_slice(args);
        let out = self.lab.exec(&self.ns[n], &all);
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    fn ha(&self, n: usize) -> Option<serde_json::Value> {
        let (ok, out) = self.pcpctl(n, &["ha", "--json"]);
        ok.then(|| serde_json::from_str(&out).ok()).flatten()
    }

    fn wait_ha(&self, n: usize, what: &str, f: impl Fn(&serde_json::Value) -> bool) {
        let got = poll(Duration::from_secs(15), Duration::from_millis(50), || {
            self.ha(n).filter(|h| f(h))
        });
        assert!(
            got.is_some(),
            "node {n}: timed out waiting for {what}; GET /ha: {:?}\n{}",
            self.ha(n),
            self.logs()
        );
    }

    /// Node `n`'s serving file (`[ha] serving_file`, keepalived's track_file).
    fn serving_path(&self, n: usize) -> PathBuf {
        self.dir.join(&format!("serving{n}"))
    }

    /// What node `n`'s serving file says.
    fn serving_file(&self, n: usize) -> String {
        std::fs::read_to_string(self.serving_path(n)).unwrap_or_default()
    }

    /// Watches the service address move to node `to`: returns when node `to`'s serving
    /// file first said 0 and when the address was on `to` only, both after `t0`.
    fn watch_move(&self, to: usize, t0: Instant, what: &str) -> (Duration, Duration) {
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut serving = None;
        loop {
            if serving.is_none() && self.serving_file(to) == "0\n" {
                serving = Some(t0.elapsed());
            }
            if self.holds_vip(to) && !self.holds_vip(1 - to) {
                let moved = t0.elapsed();
                // The file may have flipped between this round's two looks.
                let serving = serving
                    .or_else(|| (self.serving_file(to) == "0\n").then_some(moved))
                    .unwrap_or_else(|| {
                        panic!(
                            "{what}: the address moved to node {to} while its file said {:?}\n{}",
                            self.serving_file(to),
                            self.logs()
                        )
                    });
                return (serving, moved);
            }
            assert!(
                Instant::now() < deadline,
                "{what}: the service address is not (only) on node {to}; serving files {:?} {:?}\n{}",
                self.serving_file(0),
                self.serving_file(1),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether node `n` holds the service address on eth0.
    fn holds_vip(&self, n: usize) -> bool {
        let out = self
            .lab
            .exec(&self.ns[n], &["ip", "-4", "addr", "show", "dev", "eth0"]);
        String::from_utf8_lossy(&out.stdout).contains(&format!("inet {VIP}/"))
    }

    /// Waits until exactly node `n` holds the service address.
    fn wait_vip(&self, n: usize, what: &str) -> Duration {
        let t = Instant::now();
        let ok = poll(Duration::from_secs(15), Duration::from_millis(20), || {
            (self.holds_vip(n) && !self.holds_vip(1 - n)).then_some(())
        });
        assert!(
            ok.is_some(),
            "{what}: the service address is not (only) on node {n}\n{}",
            self.logs()
        );
        t.elapsed()
    }

    fn start_pcpd(&mut self, n: usize) {
        let role = if n == 0 { "active" } else { "backup" };
        let config = format!(
            "[acl]\nallow = [\"192.0.2.0/24\"]\n\
             [pool]\naddresses = [\"198.51.100.1\"]\n\
             [tiers.default]\nmapping_quota = 4096\ncheckpoint_quota = 4096\n\
             checkpoint_rate = 100000.0\ncheckpoint_burst = 100000\n\
             [ha]\nlisten = \"{}:5400\"\npeer = \"{}:5400\"\nrole = \"{role}\"\n\
             serving_file = \"{}\"\n",
            HA_IP[n],
            HA_IP[1 - n],
            self.serving_path(n).display()
        );
        let path = self.dir.join(&format!("pcpd{n}.toml"));
        std::fs::write(&path, config).unwrap();
        let log = std::fs::File::create(self.dir.join(&format!("pcpd{n}.log"))).unwrap();
        let listen = format!("{VIP}:5351");
        let ns = self.ns[n].clone();
        let i = self.lab.spawn(
            &ns,
            &[
                "env",
                "RUST_LOG=info",
                "NO_COLOR=1",
                PCPD,
                "--config",
                path.to_str().unwrap(),
                "--listen",
                &listen,
                "--admin",
                "127.0.0.1:8351",
            ],
            Stdio::from(log.try_clone().unwrap()),
            Stdio::from(log),
        );
        self.pcpd[n] = Some(i);
        let up = poll(Duration::from_secs(10), Duration::from_millis(50), || {
            self.ha(n)
        });
        assert!(up.is_some(), "pcpd {n} did not start:\n{}", self.logs());
    }

    fn start_keepalived(&mut self, n: usize) {
        let conf = self.dir.join(&format!("keepalived{n}.conf"));
        std::fs::write(&conf, keepalived_conf(n, &self.dir)).unwrap();
        let log = std::fs::File::create(self.dir.join(&format!("keepalived{n}.log"))).unwrap();
        let ns = self.ns[n].clone();
        let s = |f: &str| self.dir.path_str(&format!("{n}-{f}"));
        let (pid, vrrp, conf) = (
            s("keepalived.pid"),
            s("vrrp.pid"),
            conf.to_str().unwrap().to_string(),
        );
        let i = self.lab.spawn(
            &ns,
            &[
                "keepalived",
                "--dont-fork",
                "--log-console",
                "--log-detail",
                "--vrrp",
                "--use-file",
                &conf,
                "--pid",
                &pid,
                "--vrrp_pid",
                &vrrp,
            ],
            Stdio::from(log.try_clone().unwrap()),
            Stdio::from(log),
        );
        self.keepalived.push(i);
    }

    /// What node `n`'s notify script logged so far.
    fn notify_log(&self, n: usize) -> String {
        std::fs::read_to_string(self.dir.join(&format!("notify{n}.log"))).unwrap_or_default()
    }

    /// Waits until node `n`'s notify script logged its `count`th MASTER line; returns it.
    fn wait_notify_master(&self, n: usize, count: usize) -> String {
        let line = poll(Duration::from_secs(10), Duration::from_millis(20), || {
            self.notify_log(n)
                .lines()
                .filter(|l| l.starts_with("VRRP MASTER"))
                .nth(count - 1)
                .map(str::to_string)
        });
        line.unwrap_or_else(|| {
            panic!(
                "node {n}: notify MASTER #{count} not logged\n{}",
                self.logs()
            )
        })
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.dir.0)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        files.sort();
        for p in files {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            out += &format!("--- {} (last lines)\n", p.display());
            for l in tail.iter().rev() {
                out += l;
                out.push('\n');
            }
        }
        out
    }

    /// Runs the load helper in the client namespace for `run`, calling `during` once
    /// `before` has passed; returns the outcomes.
    fn under_load(
        &mut self,
        run: Duration,
        before: Duration,
        during: impl FnOnce(&mut Pair),
    ) -> Vec<Outcome> {
        let cli = self.cli.clone();
        let spec = format!("pcp-load {VIP}:5351 {CLIENT} {}", run.as_millis());
        let i = self.lab.helper(&cli, &[&spec]);
        std::thread::sleep(before);
        during(self);
        let mut text = String::new();
        let child = self.lab.child(i);
        child
            .stdout
            .take()
            .expect("piped stdout")
            .read_to_string(&mut text)
            .expect("read the load helper's output");
        let _ = child.wait();
        parse_outcomes(&text)
    }
}

fn pcpctl_bin() -> &'static Path {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        pcp_testkit::bins::fresh_bin(
            "pcpctl",
            &[
                "Cargo.toml",
                "Cargo.lock",
                "crates/pcpctl/Cargo.toml",
                "crates/pcpctl/src",
            ],
        )
    })
}

/// keepalived's configuration of node `n` (0: A, 1: B), made from
/// `docs/keepalived/keepalived.conf`: node B's values from its `# B:` marks, the real
/// pcpctl, and the documented notify script (with the real pcpctl) copied to `dir`.
fn keepalived_conf(n: usize, dir: &TempDir) -> String {
    let root = workspace_root();
    let example = std::fs::read_to_string(root.join("docs/keepalived/keepalived.conf"))
        .expect("docs/keepalived/keepalived.conf");
    let pcpctl = pcpctl_bin().to_str().unwrap().to_string();
    let script = std::fs::read_to_string(root.join("docs/keepalived/pcpd-notify.sh"))
        .expect("docs/keepalived/pcpd-notify.sh");
    // Its log lines go to a file the test reads instead of syslog.
    let logger = r#"logger -t pcpd-notify -- "$*" 2>/dev/null || echo "pcpd-notify: $*" >&2"#;
    assert!(
        script.contains(logger),
        "the notify script's log line changed: update this test"
    );
    let script = script
        .replace(
            logger,
            &format!(
                r#"echo "$*" >> {}"#,
                dir.path_str(&format!("notify{n}.log"))
            ),
        )
        .replace("/usr/local/bin/pcpctl", &pcpctl);
    let notify = dir.join(&format!("pcpd-notify{n}.sh"));
    std::fs::write(&notify, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&notify, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut out = String::new();
    let mut marks = 0;
    for line in example.lines() {
        let mut line = line.to_string();
        if let Some((code, comment)) = line.split_once('#')
            && !code.trim().is_empty()
            && let Some(b) = comment.trim().strip_prefix("B:")
            && n == 1
        {
            // "KEY VALUE  # B: OTHER ...": the last word before the mark becomes OTHER.
            let other = b.split_whitespace().next().expect("a value after B:");
            let value = code.split_whitespace().last().unwrap();
            let at = code.rfind(value).unwrap();
            line = format!("{}{other}", &code[..at]);
            marks += 1;
        }
        out += &line
            .replace("/usr/local/bin/pcpctl", &pcpctl)
            .replace("/run/pcpd/serving", &dir.path_str(&format!("serving{n}")))
            .replace("/etc/keepalived/pcpd-notify.sh", notify.to_str().unwrap());
        out.push('\n');
    }
    if n == 1 {
        assert_eq!(marks, 4, "the example's B: marks changed: update this test");
    }
    for must in [
        "track_file pcpd_serving",
        "/run/pcpd/serving",
        "weight 0",
        "--timeout 0.8 status",
        "/usr/local/bin/pcpctl alive /run/pcpd/serving",
        "fall 3",
        "version 3",
        "interface eth0",
        "unicast_src_ip",
    ] {
        assert!(
            example.contains(must),
            "the example lost {must:?}: update this test"
        );
    }
    out
}

/// The namespaces, pcpd on both nodes, keepalived on both, the address on node 0.
fn setup(tag: &str) -> Pair {
    let mut lab = Lab::new(tag);
    let cli = lab.netns("cli");
    let na = lab.netns("na");
    let nb = lab.netns("nb");
    lab.veth(&na, "eth0", &cli, "pa");
    lab.veth(&nb, "eth0", &cli, "pb");
    lab.bridge(&cli, "br0", &["pa", "pb"]);
    lab.ip(
        &cli,
        &["addr", "add", &format!("{CLIENT}/24"), "dev", "br0"],
    );
    lab.veth(&na, "ha0", &nb, "ha0");
    for (n, ns) in [&na, &nb].into_iter().enumerate() {
        lab.ip(
            ns,
            &["addr", "add", &format!("{}/24", NODE_IP[n]), "dev", "eth0"],
        );
        lab.ip(
            ns,
            &["addr", "add", &format!("{}/30", HA_IP[n]), "dev", "ha0"],
        );
        // Both pcpd listen on the service address before they hold it (docs/HA.md).
        lab.sysctl(ns, "net.ipv4.ip_nonlocal_bind=1");
    }
    let mut pair = Pair {
        lab,
        dir: TempDir::new(),
        ns: [na, nb],
        cli,
        pcpd: [None, None],
        keepalived: Vec::new(),
    };
    pair.start_pcpd(0);
    pair.start_pcpd(1);
    pair.wait_ha(0, "A active with a ready backup", |h| {
        h["role"] == "active" && h["backup_status"] == "ready"
    });
    pair.wait_ha(1, "B a ready backup", |h| {
        h["role"] == "backup" && h["ready"] == true
    });
    pair.start_keepalived(0);
    pair.start_keepalived(1);
    let took = pair.wait_vip(0, "pair start");
    eprintln!("service address on A after {took:?}");
    let line = pair.wait_notify_master(0, 1);
    assert!(line.contains("pcpd active (term 1)"), "{line}");
    pair
}

/// Every request answered by at most its first retransmission; at least one needed it
/// (the load did cross the handover). Promises: with `renewed_by_successor` false (a
/// switchover: the new active has a ready backup at once), every mapping whose last
/// answer echoed 192 is on node `n`, same external endpoint, checkpointed. With it true
/// (a kill: the survivor has no backup, so its answers lawfully come without 192 and
/// withdraw the checkpoint), every mapping that any answer promised with 192 is on node
/// `n` with the promised external endpoint.
fn check(pair: &Pair, n: usize, outcomes: &[Outcome], what: &str, renewed_by_successor: bool) {
    assert!(
        outcomes.len() > 50,
        "{what}: too little load: {outcomes:?}\n{}",
        pair.logs()
    );
    let lost: Vec<&Outcome> = outcomes.iter().filter(|o| o.attempt == 0).collect();
    assert!(
        lost.is_empty(),
        "{what}: {} requests not answered by their first retransmission: {lost:?}\n{}",
        lost.len(),
        pair.logs()
    );
    let retransmitted: Vec<u64> = outcomes
        .iter()
        .filter(|o| o.attempt == 2)
        .map(|o| o.sent_ms)
        .collect();
    assert!(
        !retransmitted.is_empty(),
        "{what}: no request needed a retransmission: the handover was not under load"
    );
    let mut last: HashMap<u16, &Outcome> = HashMap::new();
    for o in outcomes
        .iter()
        .filter(|o| !renewed_by_successor || o.echoed)
    {
        if last.get(&o.port).is_none_or(|p| p.sent_ms <= o.sent_ms) {
            last.insert(o.port, o);
        }
    }
    let (ok, out) = pair.pcpctl(n, &["mappings", "--json"]);
    assert!(ok, "{out}");
    let list: Vec<serde_json::Value> = serde_json::from_str(&out).expect("GET /mappings JSON");
    let mut promises = 0;
    let mut broken = Vec::new();
    for o in last.values().filter(|o| o.echoed && o.lifetime > 0) {
        promises += 1;
        let m = list.iter().find(|m| {
            m["internal_address"] == CLIENT
                && m["protocol"] == 17
                && m["internal_port"] == u64::from(o.port)
        });
        let Some(m) = m else {
            broken.push(format!(
                "port {} missing (promised {:?})",
                o.port, o.external
            ));
            continue;
        };
        let ext = format!(
            "{}:{}",
            m["external_address"].as_str().unwrap_or(""),
            m["external_port"]
        );
        if Some(ext.clone()) != o.external.map(|e| e.to_string())
            || (!renewed_by_successor && m["checkpointed"] != true)
        {
            broken.push(format!(
                "port {}: {ext} {m}, promised {:?}",
                o.port, o.external
            ));
        }
    }
    assert!(promises > 0, "{what}: no answer echoed 192");
    assert!(
        broken.is_empty(),
        "{what}: promises broken on node {n}:\n{}",
        broken.join("\n")
    );
    eprintln!(
        "{what}: {} requests, {} answered after their retransmission (sent at {:?} ms), \
         {promises} promises kept",
        outcomes.len(),
        retransmitted.len(),
        retransmitted
    );
}

/// Loose bound on how long after the new active's serving file says 0 the address is
/// on it: keepalived reads the file at once (inotify) and VRRP hands over in at most
/// its master-down time (3 x 0.2 s + skew); after a kill -9 or a SIGSTOP the dead or
/// frozen node's `pcpctl alive` check must fail first (within 1 s of the peer's
/// takeover). Generous for a loaded CI machine.
const MOVE_BUDGET: Duration = Duration::from_millis(2500);

/// After the active failed at `t0` (`what`): node `to` takes over and the address
/// follows within [`MOVE_BUDGET`] of its takeover.
fn takeover_moves(p: &Pair, to: usize, t0: Instant, what: &str) {
    let name = ["A", "B"][to];
    let (serving, moved) = p.watch_move(to, t0, what);
    eprintln!(
        "{what}: {name} took over (its file said 0) after {serving:?}, address on {name} \
         after {moved:?} ({:?} after the takeover)",
        moved - serving
    );
    assert!(
        moved - serving < MOVE_BUDGET,
        "{what}: the address took {:?} after {name} took over",
        moved - serving
    );
}

/// A planned switchover from node `from` under load; checks the promises and that the
/// address followed the role.
fn switchover(pair: &mut Pair, from: usize, term: u64, master: usize) {
    let to = 1 - from;
    pair.wait_ha(from, "the active's backup ready", |h| {
        h["backup_status"] == "ready"
    });
    pair.wait_ha(to, "the backup's copy complete", |h| h["ready"] == true);
    let what = format!("switchover {from}->{to}");
    let outcomes = pair.under_load(Duration::from_secs(7), Duration::from_secs(3), |p| {
        let t0 = Instant::now();
        let (ok, out) = p.pcpctl(from, &["switchover"]);
        assert!(ok, "pcpctl switchover: {out}");
        let (serving, moved) = p.watch_move(to, t0, &what);
        eprintln!(
            "{what}: node {to}'s file said 0 after {serving:?}, address there after \
             {moved:?} ({:?} later)",
            moved - serving
        );
        assert!(
            moved - serving < MOVE_BUDGET,
            "{what}: the address took {:?} after the new active's file said 0",
            moved - serving
        );
    });
    pair.wait_ha(to, "the new active", |h| h["role"] == "active");
    pair.wait_ha(from, "the old active a backup", |h| h["role"] == "backup");
    assert_eq!(
        pair.serving_file(from),
        "1\n",
        "{what}: the old active's file"
    );
    pair.wait_vip(to, &format!("after {what}"));
    check(pair, to, &outcomes, &what, false);
    // The notify script found pcpd already active: the file made VRRP follow pcpd.
    let line = pair.wait_notify_master(to, master);
    assert!(
        line.contains(&format!("pcpd active (term {term})")),
        "{line}"
    );
    let (serving, out) = pair.pcpctl(from, &["ha", "--serving"]);
    assert!(!serving, "the old active must not pass ha --serving: {out}");
}

#[test]
fn switchover_and_kill_9_move_the_service_address_within_one_retransmission() {
    let test = "switchover_and_kill_9_move_the_service_address_within_one_retransmission";
    if skip(test) {
        return;
    }
    let mut pair = setup("kad");
    assert_eq!(pair.serving_file(0), "0\n");
    assert_eq!(pair.serving_file(1), "1\n");

    // Planned switchovers under load, there and back.
    switchover(&mut pair, 0, 2, 1);
    switchover(&mut pair, 1, 3, 2);

    // Unplanned: kill -9 of the active (A) once B holds a full copy again. A's file
    // stays "0" (nobody rewrites it): its lock check takes the address away.
    pair.wait_ha(1, "B's copy complete", |h| h["ready"] == true);
    pair.wait_ha(0, "A's backup ready", |h| h["backup_status"] == "ready");
    let outcomes = pair.under_load(Duration::from_secs(7), Duration::from_secs(3), |p| {
        let i = p.pcpd[0].take().expect("A's pcpd");
        let child = p.lab.child(i);
        let t0 = Instant::now();
        child.kill().expect("kill -9 A's pcpd");
        let _ = child.wait();
        takeover_moves(p, 1, t0, "kill -9");
    });
    assert_eq!(pair.serving_file(0), "0\n", "a killed pcpd's file is stale");
    pair.wait_ha(1, "B active again", |h| h["role"] == "active");
    pair.wait_vip(1, "after kill -9");
    check(&pair, 1, &outcomes, "kill -9", true);
    let line = pair.wait_notify_master(1, 2);
    assert!(line.contains("pcpd active (term 4)"), "{line}");
    for n in 0..2 {
        let log = pair.notify_log(n);
        assert!(
            !log.contains("promote"),
            "node {n}: pcpd decides, not VRRP:\n{log}"
        );
    }

    // A restarted old active follows as backup and does not take the address back.
    pair.start_pcpd(0);
    pair.wait_ha(0, "A a ready backup", |h| {
        h["role"] == "backup" && h["ready"] == true
    });
    pair.wait_ha(1, "B's backup ready", |h| h["backup_status"] == "ready");
    assert_eq!(pair.serving_file(0), "1\n", "A's file as a backup");
    assert!(
        pair.holds_vip(1) && !pair.holds_vip(0),
        "the address stays on B"
    );

    // Unplanned again: the active (B) frozen (SIGSTOP) under load. It keeps its lock
    // and its file says 0, but stops touching its liveness marker: A takes over after
    // `detection_ms`, and B's `pcpctl alive` check fails from then on, so the address
    // moves within one retransmission, as after a kill.
    let pid = pair.lab.child(pair.pcpd[1].expect("B's pcpd")).id();
    let frozen = Continue(pid);
    let outcomes = pair.under_load(Duration::from_secs(7), Duration::from_secs(3), |p| {
        let t0 = Instant::now();
        signal("-STOP", pid);
        takeover_moves(p, 0, t0, "SIGSTOP");
        assert_eq!(p.serving_file(1), "0\n", "a frozen pcpd's file is stale");
    });
    drop(frozen);
    pair.wait_ha(0, "A active", |h| h["role"] == "active");
    pair.wait_vip(0, "after SIGSTOP");
    check(&pair, 0, &outcomes, "SIGSTOP", true);
    let line = pair.wait_notify_master(0, 3);
    assert!(line.contains("pcpd active (term 5)"), "{line}");
    // Continued, B learns of the newer term and follows as backup.
    pair.wait_ha(1, "B fenced, a backup again", |h| h["role"] == "backup");
    let says_one = poll(Duration::from_secs(5), Duration::from_millis(20), || {
        (pair.serving_file(1) == "1\n").then_some(())
    });
    assert!(says_one.is_some(), "B's file after it stepped down");

    // A pcpd that runs but does not answer (a deadlocked core: simulated by dropping
    // its admin API's packets) keeps its lock and its marker fresh: its answering check
    // (`pcpctl status`, fall 3) takes the address away (B is a backup: nobody holds it)
    // and gives it back once pcpd answers again.
    let block = |verb: &str| {
        let out = pair.lab.exec(
            &pair.ns[0],
            &["nft", verb, "table", "inet", "pcpd_test_block"],
        );
        assert!(out.status.success(), "nft {verb}: {out:?}");
    };
    block("add");
    let out = pair.lab.exec(
        &pair.ns[0],
        &[
            "nft",
            "add chain inet pcpd_test_block out { type filter hook output priority 0; }; \
             add rule inet pcpd_test_block out tcp dport 8351 drop",
        ],
    );
    assert!(out.status.success(), "nft rule: {out:?}");
    let t0 = Instant::now();
    let gone = poll(Duration::from_secs(15), Duration::from_millis(20), || {
        (!pair.holds_vip(0)).then_some(())
    });
    let silent = t0.elapsed();
    block("delete");
    assert!(
        gone.is_some(),
        "the address stayed on a pcpd whose admin API does not answer\n{}",
        pair.logs()
    );
    eprintln!("admin API silent: address left A after {silent:?}");
    assert!(
        !pair.holds_vip(1),
        "B is a backup: it must not take the address"
    );
    let back = pair.wait_vip(0, "once A's admin API answers again");
    eprintln!("admin API back: address on A after {back:?}");

    // A clean stop says "not serving" at once: the address leaves A.
    let i = pair.pcpd[0].take().expect("A's pcpd");
    signal("-TERM", pair.lab.child(i).id());
    let _ = pair.lab.child(i).wait();
    assert_eq!(pair.serving_file(0), "1\n", "A's file after a clean stop");
    let gone = poll(Duration::from_secs(10), Duration::from_millis(20), || {
        (!pair.holds_vip(0) && !pair.holds_vip(1)).then_some(())
    });
    assert!(
        gone.is_some(),
        "the address stayed after pcpd stopped\n{}",
        pair.logs()
    );
}

/// Sends `sig` to `pid`.
fn signal(sig: &str, pid: u32) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid}");
}

/// Continues a stopped process when dropped, whatever happened meanwhile.
struct Continue(u32);

impl Drop for Continue {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}
