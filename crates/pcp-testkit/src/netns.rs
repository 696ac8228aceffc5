//! Network namespaces for root-only end-to-end tests: a [`Lab`] of namespaces, links
//! and processes that the test creates and that are all removed on drop (even on a
//! panic), and the small traffic helpers (echo servers, probes, a long-lived TCP
//! connection) that the test binary runs inside the namespaces as child processes
//! (`<test binary> netns_helper --exact --ignored` with `PCP_NETNS_HELPER` set), so
//! that no running process ever changes its own namespace.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};
use std::time::Duration;

/// Set in a helper child: what it is to do (see [`helper_main`]).
pub const HELPER_ENV: &str = "PCP_NETNS_HELPER";

/// Whether this process runs as root.
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Where the system tool `name` is installed (`/usr/sbin`, `/usr/bin`, `/sbin`, `/bin`).
pub fn tool(name: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}

/// Why a root-only namespace test cannot run here (`None`: it can).
pub fn cannot_run(tools: &[&str]) -> Option<String> {
    if !is_root() {
        return Some("not root (network namespaces and nftables need root)".into());
    }
    for t in tools {
        if tool(t).is_none() {
            return Some(format!("{t} is not installed"));
        }
    }
    None
}

/// Runs a command; panics unless it succeeds.
pub fn run(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Namespaces, links and processes of one test; all removed on drop.
pub struct Lab {
    /// Prefix of every name (unique per test process and lab).
    pub prefix: String,
    namespaces: Vec<String>,
    children: Vec<Child>,
}

impl Lab {
    /// An empty lab whose names start with `tag` and this process's id.
    pub fn new(tag: &str) -> Lab {
        Lab {
            prefix: format!("{tag}{}", std::process::id() % 100_000),
            namespaces: Vec::new(),
            children: Vec::new(),
        }
    }

    /// Creates namespace `<prefix>-<name>` with loopback up; returns its name.
    pub fn netns(&mut self, name: &str) -> String {
        let ns = format!("{}-{name}", self.prefix);
        let _ = Command::new("ip")
            .args(["netns", "del", &ns])
            .stderr(Stdio::null())
            .status();
        run(&["ip", "netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        ns
    }

    /// A veth pair: `dev_a` in `ns_a`, `dev_b` in `ns_b`, both up.
    pub fn veth(&self, ns_a: &str, dev_a: &str, ns_b: &str, dev_b: &str) {
        run(&[
            "ip", "-n", ns_a, "link", "add", dev_a, "type", "veth", "peer", "name", dev_b, "netns",
            ns_b,
        ]);
        run(&["ip", "-n", ns_a, "link", "set", dev_a, "up"]);
        run(&["ip", "-n", ns_b, "link", "set", dev_b, "up"]);
    }

    /// A bridge `dev` in `ns` over `ports`, up.
    pub fn bridge(&self, ns: &str, dev: &str, ports: &[&str]) {
        run(&["ip", "-n", ns, "link", "add", dev, "type", "bridge"]);
        for p in ports {
            run(&["ip", "-n", ns, "link", "set", p, "master", dev]);
        }
        run(&["ip", "-n", ns, "link", "set", dev, "up"]);
    }

    /// `ip -n ns <args>`.
    pub fn ip(&self, ns: &str, args: &[&str]) {
        let mut all = vec!["ip", "-n", ns];
        all.extend_from_slice(args);
        run(&all);
    }

    /// Runs a command inside `ns` and returns its output (whatever its status).
    pub fn exec(&self, ns: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("ip netns exec {ns} {args:?}: {e}"))
    }

    /// `sysctl -qw key=value` inside `ns`.
    pub fn sysctl(&self, ns: &str, setting: &str) {
        run(&["ip", "netns", "exec", ns, "sysctl", "-qw", setting]);
    }

    /// Starts `cmd` (program and arguments) inside `ns`; the lab kills it on drop.
    /// Returns its index for [`Lab::child`].
    pub fn spawn(&mut self, ns: &str, cmd: &[&str], stdout: Stdio, stderr: Stdio) -> usize {
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(cmd)
            .stdin(Stdio::piped())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?} in {ns}: {e}"));
        self.children.push(child);
        self.children.len() - 1
    }

    /// A child started with [`Lab::spawn`].
    pub fn child(&mut self, i: usize) -> &mut Child {
        &mut self.children[i]
    }

    /// Starts a helper of this test binary inside `ns` (see [`helper_main`]).
    pub fn helper(&mut self, ns: &str, args: &[&str]) -> usize {
        let me = std::env::current_exe().expect("the test binary");
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(me)
            .args(["netns_helper", "--exact", "--ignored", "--nocapture", "-q"])
            .env(HELPER_ENV, args.join(" "))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("helper {args:?} in {ns}: {e}"));
        self.children.push(child);
        self.children.len() - 1
    }

    /// Runs a helper to completion inside `ns`; its first output line starting with
    /// `> `, without that mark (`None`: it printed none, e.g. a probe that timed out).
    pub fn helper_once(&self, ns: &str, args: &[&str]) -> Option<String> {
        let me = std::env::current_exe().expect("the test binary");
        let out = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(me)
            .args(["netns_helper", "--exact", "--ignored", "--nocapture", "-q"])
            .env(HELPER_ENV, args.join(" "))
            .stdin(Stdio::null())
            .output()
            .expect("run a helper");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("> ").map(str::to_string))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The stdin and stdout of a [`Lab::helper`] `tcp-session`: one line in, one answer
/// line out.
pub struct Session {
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Session {
    /// Takes the pipes of helper `i`, once it has connected.
    pub fn of(lab: &mut Lab, i: usize) -> Session {
        let c = lab.child(i);
        let mut s = Session {
            stdin: c.stdin.take().expect("piped stdin"),
            stdout: BufReader::new(c.stdout.take().expect("piped stdout")),
        };
        let first = s.read_marked();
        assert_eq!(first, "connected", "the session helper could not connect");
        s
    }

    /// The helper's next line marked `> ` (the test harness prints its own lines too),
    /// without the mark; empty when the helper is gone.
    fn read_marked(&mut self) -> String {
        loop {
            let mut line = String::new();
            match self.stdout.read_line(&mut line) {
                Ok(0) | Err(_) => return String::new(),
                Ok(_) => {
                    if let Some(rest) = line.trim_end().strip_prefix("> ") {
                        return rest.to_string();
                    }
                }
            }
        }
    }

    /// Sends `line` over the connection and returns the echo (or the helper's error).
    pub fn say(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").expect("write to the session helper");
        self.stdin.flush().expect("flush");
        self.read_marked()
    }
}

/// The body of the `netns_helper` test when [`HELPER_ENV`] is set. Modes:
/// - `udp-echo ADDR` / `tcp-echo ADDR`: answer every datagram / line with
///   `from <peer> <payload>`, until killed.
/// - `udp-probe TARGET [BIND]` / `tcp-probe TARGET`: send `ping`, print `> <answer>`
///   if one comes within 700 ms.
/// - `tcp-session TARGET`: connect, print `> connected`, then for every stdin line send
///   it and print `> <answer>` (or `> error <why>`).
/// - `http ADDR PATH`: `GET PATH`, print `> <body>` on one line.
pub fn helper_main() {
    let Ok(spec) = std::env::var(HELPER_ENV) else {
        return;
    };
    let args: Vec<&str> = spec.split(' ').collect();
    let addr = |i: usize| -> SocketAddr { args[i].parse().expect("an ADDR:PORT argument") };
    let wait = Duration::from_millis(700);
    match args[0] {
        "udp-echo" => {
            let s = UdpSocket::bind(addr(1)).expect("bind");
            let mut buf = [0u8; 1500];
            loop {
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    let msg = format!("from {from} {}", String::from_utf8_lossy(&buf[..n]));
                    let _ = s.send_to(msg.as_bytes(), from);
                }
            }
        }
        "tcp-echo" => {
            let l = TcpListener::bind(addr(1)).expect("bind");
            for c in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let peer = c.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                    let mut w = c.try_clone().expect("clone");
                    for line in BufReader::new(c).lines() {
                        let Ok(line) = line else { return };
                        if writeln!(w, "from {peer} {line}").is_err() {
                            return;
                        }
                    }
                });
            }
        }
        "udp-probe" => {
            let bind: SocketAddr = if args.len() > 2 {
                addr(2)
            } else {
                "0.0.0.0:0".parse().unwrap()
            };
            let s = UdpSocket::bind(bind).expect("bind");
            s.set_read_timeout(Some(wait)).unwrap();
            let _ = s.send_to(b"ping", addr(1));
            let mut buf = [0u8; 1500];
            if let Ok((n, _)) = s.recv_from(&mut buf) {
                println!("> {}", String::from_utf8_lossy(&buf[..n]));
            }
        }
        "tcp-probe" => {
            if let Ok(mut c) = TcpStream::connect_timeout(&addr(1), wait) {
                c.set_read_timeout(Some(wait)).unwrap();
                let _ = c.write_all(b"ping\n");
                let mut line = String::new();
                if BufReader::new(c).read_line(&mut line).is_ok() && !line.is_empty() {
                    println!("> {}", line.trim());
                }
            }
        }
        "tcp-session" => {
            let c = TcpStream::connect_timeout(&addr(1), Duration::from_secs(3)).expect("connect");
            c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            println!("> connected");
            let mut w = c.try_clone().unwrap();
            let mut r = BufReader::new(c);
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { return };
                let mut answer = String::new();
                let res = writeln!(w, "{line}").and_then(|()| r.read_line(&mut answer));
                match res {
                    Ok(n) if n > 0 => println!("> {}", answer.trim()),
                    Ok(_) => println!("> error closed"),
                    Err(e) => println!("> error {e}"),
                }
                let _ = std::io::stdout().flush();
            }
        }
        "http" => {
            let mut c = TcpStream::connect_timeout(&addr(1), wait).expect("connect");
            c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let _ = write!(
                c,
                "GET {} HTTP/1.0\r\nHost: x\r\nConnection: close\r\n\r\n",
                args[2]
            );
            let mut text = String::new();
            let _ = c.read_to_string(&mut text);
            let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
            println!("> {}", body.replace('\n', " "));
        }
        other => panic!("unknown helper mode {other}"),
    }
}
