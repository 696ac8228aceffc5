//! `pcpc` against a real third-party server: Debian's `miniupnpd` (package
//! `miniupnpd-nftables`), in network namespaces this test creates and removes:
//!
//! ```text
//!  LAN ns                     gateway ns (miniupnpd, nftables)          WAN ns
//!  10.77.0.2 ──veth── 10.77.0.1 │ 198.51.100.1 ──veth── 198.51.100.2 (STUN responder)
//! ```
//!
//! It checks that MAP works (the DNAT rule appears in miniupnpd's nftables chain), and
//! that the checkpoint state is reported *unknown*, because miniupnpd echoes every
//! request option blindly — and that without the canary the same answer would have
//! looked like "honoured".
//!
//! Needs root (namespaces, nftables) and `miniupnpd`, `nft`, `ip`. Without them it
//! says so and skips, unless `PCPC_REQUIRE_MINIUPNPD=1`, which turns a skip into a
//! failure (set it where the test command installs the package).
//!
//! Facts it relies on: Debian's `nft_init.sh` sources a helper the package does not
//! ship, so the test creates miniupnpd's table and chains itself (table `inet filter`;
//! chains `miniupnpd`, `prerouting_miniupnpd`, `postrouting_miniupnpd`). miniupnpd turns
//! port forwarding off when its WAN address is in a reserved range unless STUN shows a
//! 1:1 mapping, so the WAN namespace runs a tiny STUN responder (this test binary,
//! re-run as the ignored `stun_responder` test). With `-d` miniupnpd logs to stderr.

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use pcp_testkit::netns::{cannot_run, is_root, run, tool};

const PCPC: &str = env!("CARGO_BIN_EXE_pcpc");
const LAN_HOST: &str = "10.77.0.2";
const LAN_GW: &str = "10.77.0.1";
const WAN_GW: &str = "198.51.100.1";
const WAN_STUN: &str = "198.51.100.2";

/// Why the test cannot run here, if it cannot.
fn missing() -> Option<String> {
    let why = cannot_run(&["miniupnpd", "nft", "ip"])?;
    Some(if is_root() {
        format!("{why} (apt-get install -y miniupnpd-nftables nftables iproute2)")
    } else {
        why
    })
}

/// Namespaces, links, processes and files of one run; all removed on drop.
struct Lab {
    lan: String,
    gw: String,
    wan: String,
    dir: PathBuf,
    children: Vec<Child>,
}

impl Lab {
    fn new() -> Lab {
        let id = std::process::id() % 100_000;
        let p = format!("pc{id}");
        let lab = Lab {
            lan: format!("{p}-lan"),
            gw: format!("{p}-gw"),
            wan: format!("{p}-wan"),
            dir: std::env::temp_dir().join(format!("pcpc-miniupnpd-{id}")),
            children: Vec::new(),
        };
        lab.teardown();
        std::fs::create_dir_all(&lab.dir).unwrap();
        for ns in [&lab.lan, &lab.gw, &lab.wan] {
            run(&["ip", "netns", "add", ns]);
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        // Link names are per namespace once moved, but are created in ours first.
        let (l, gl, w, gw) = (
            format!("{p}l"),
            format!("{p}gl"),
            format!("{p}w"),
            format!("{p}gw"),
        );
        run(&["ip", "link", "add", &l, "type", "veth", "peer", "name", &gl]);
        run(&["ip", "link", "set", &l, "netns", &lab.lan]);
        run(&["ip", "link", "set", &gl, "netns", &lab.gw]);
        run(&["ip", "link", "add", &w, "type", "veth", "peer", "name", &gw]);
        run(&["ip", "link", "set", &w, "netns", &lab.wan]);
        run(&["ip", "link", "set", &gw, "netns", &lab.gw]);
        let addr = |ns: &str, dev: &str, a: &str| {
            run(&["ip", "-n", ns, "addr", "add", a, "dev", dev]);
            run(&["ip", "-n", ns, "link", "set", dev, "up"]);
        };
        addr(&lab.lan, &l, &format!("{LAN_HOST}/24"));
        addr(&lab.gw, &gl, &format!("{LAN_GW}/24"));
        addr(&lab.gw, &gw, &format!("{WAN_GW}/24"));
        addr(&lab.wan, &w, &format!("{WAN_STUN}/24"));
        run(&[
            "ip", "-n", &lab.lan, "route", "add", "default", "via", LAN_GW,
        ]);
        run(&[
            "ip",
            "netns",
            "exec",
            &lab.gw,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        // miniupnpd's nftables structure (what nft_init.sh would make).
        let nft = lab.dir.join("init.nft");
        std::fs::write(
            &nft,
            "table inet filter {\n\
             chain forward { type filter hook forward priority 0; policy accept; jump miniupnpd; }\n\
             chain miniupnpd { }\n\
             chain prerouting { type nat hook prerouting priority -100; policy accept; jump prerouting_miniupnpd; }\n\
             chain postrouting { type nat hook postrouting priority 100; policy accept; jump postrouting_miniupnpd; }\n\
             chain prerouting_miniupnpd { }\n\
             chain postrouting_miniupnpd { }\n\
             }\n",
        )
        .unwrap();
        run(&[
            "ip",
            "netns",
            "exec",
            &lab.gw,
            "nft",
            "-f",
            nft.to_str().unwrap(),
        ]);
        let mut lab = lab;
        // The STUN responder in the WAN namespace: this binary, as the ignored test.
        let me = std::env::current_exe().unwrap();
        let stun = Command::new("ip")
            .args(["netns", "exec", &lab.wan])
            .arg(&me)
            .args(["stun_responder", "--exact", "--ignored", "--nocapture"])
            .env("PCPC_STUN_BIND", format!("{WAN_STUN}:3478"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        lab.children.push(stun);
        lab
    }

    fn start_miniupnpd(&mut self, gw_lan_dev: &str, gw_wan_dev: &str) -> PathBuf {
        let conf = self.dir.join("miniupnpd.conf");
        let log = self.dir.join("miniupnpd.log");
        std::fs::write(
            &conf,
            format!(
                "ext_ifname={gw_wan_dev}\nlistening_ip={gw_lan_dev}\nenable_natpmp=yes\n\
                 enable_upnp=no\next_perform_stun=yes\next_stun_host={WAN_STUN}\n\
                 ext_stun_port=3478\nsecure_mode=no\nmin_lifetime=120\nmax_lifetime=86400\n\
                 lease_file={}\nuuid=3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b\n\
                 allow 1024-65535 0.0.0.0/0 1024-65535\ndeny 0-65535 0.0.0.0/0 0-65535\n",
                self.dir.join("leases").display()
            ),
        )
        .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.gw])
            .arg(tool("miniupnpd").unwrap())
            .arg("-d")
            .arg("-f")
            .arg(&conf)
            .arg("-P")
            .arg(self.dir.join("miniupnpd.pid"))
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(self.dir.join("miniupnpd.err")).unwrap())
            .spawn()
            .unwrap();
        self.children.push(child);
        log
    }

    fn log(&self) -> String {
        ["miniupnpd.log", "miniupnpd.err"]
            .iter()
            .map(|f| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default())
            .collect()
    }

    fn teardown(&self) {
        for ns in [&self.lan, &self.gw, &self.wan] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("miniupnpd output:\n{}", self.log());
        }
        self.teardown();
    }
}

fn pcpc_in(ns: &str, args: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", ns, PCPC])
        .args(["--server", &format!("{LAN_GW}:5351"), "--timeout", "8"])
        .args(["--irt-ms", "500"])
        .args(args)
        .output()
        .unwrap()
}

fn json(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "pcpc failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_str(
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or(""),
    )
    .unwrap()
}

#[test]
fn miniupnpd_maps_and_its_blind_echo_gives_checkpoint_unknown() {
    if let Some(why) = missing() {
        let msg = format!("SKIPPED miniupnpd interop test: {why}");
        if std::env::var_os("PCPC_REQUIRE_MINIUPNPD").is_some_and(|v| v == "1") {
            panic!("{msg} (PCPC_REQUIRE_MINIUPNPD=1)");
        }
        eprintln!("\n!!!!! {msg} !!!!!\n");
        return;
    }
    let mut lab = Lab::new();
    let p = format!("pc{}", std::process::id() % 100_000);
    let log = lab.start_miniupnpd(&format!("{p}gl"), &format!("{p}gw"));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default() + &lab.log();
        if text.contains("Listening for NAT-PMP/PCP traffic") {
            assert!(
                text.contains("Port forwarding is now enabled"),
                "STUN did not enable forwarding:\n{text}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "miniupnpd did not start:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // MAP with CHECKPOINT_REQUIRED: granted, but the checkpoint state is unknown.
    let v = json(&pcpc_in(
        &lab.lan,
        &[
            "--json",
            "map",
            "--proto",
            "udp",
            "--internal-port",
            "5000",
            "--lifetime",
            "600",
            "--checkpoint",
        ],
    ));
    assert_eq!(v["checkpoint"], "unknown", "{v}");
    assert_eq!(v["external_address"], WAN_GW, "{v}");
    assert_eq!(v["external_port"], 5000, "{v}");
    assert_eq!(v["version"], "pcp");
    let rules = run(&[
        "ip",
        "netns",
        "exec",
        &lab.gw,
        "nft",
        "list",
        "chain",
        "inet",
        "filter",
        "prerouting_miniupnpd",
    ]);
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(
        rules.contains(&format!("dnat ip to {LAN_HOST}:5000")),
        "the mapping is in miniupnpd's chain:\n{rules}"
    );

    // Without the canary the same server looks like it honours the checkpoint.
    let v = json(&pcpc_in(
        &lab.lan,
        &[
            "--json",
            "--no-canary",
            "map",
            "--proto",
            "tcp",
            "--internal-port",
            "5001",
            "--lifetime",
            "600",
            "--checkpoint",
        ],
    ));
    assert_eq!(v["checkpoint"], "honoured", "the fake yes: {v}");

    // Delete with the nonce removes the rule.
    let nonce = v["nonce"].as_str().unwrap().to_string();
    let o = pcpc_in(
        &lab.lan,
        &[
            "delete",
            "--proto",
            "tcp",
            "--internal-port",
            "5001",
            "--nonce",
            &nonce,
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rules = run(&[
        "ip",
        "netns",
        "exec",
        &lab.gw,
        "nft",
        "list",
        "chain",
        "inet",
        "filter",
        "prerouting_miniupnpd",
    ]);
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(!rules.contains(&format!("{LAN_HOST}:5001")), "{rules}");
    assert!(rules.contains(&format!("{LAN_HOST}:5000")), "{rules}");
}

/// Not a test: the STUN responder the test above runs in the WAN namespace (with
/// `PCPC_STUN_BIND`). Answers Binding Requests with MAPPED-ADDRESS = the sender, from
/// the address it was asked on, for at most 60 s.
#[test]
#[ignore = "helper process of miniupnpd_maps_and_its_blind_echo_gives_checkpoint_unknown"]
fn stun_responder() {
    let Some(bind) = std::env::var_os("PCPC_STUN_BIND") else {
        return;
    };
    let bind: SocketAddr = bind.to_str().unwrap().parse().unwrap();
    let sock = UdpSocket::bind(bind).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let end = Instant::now() + Duration::from_secs(60);
    let mut buf = [0u8; 1024];
    while Instant::now() < end {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        if n < 20 || buf[0] != 0x00 || buf[1] != 0x01 {
            continue;
        }
        let SocketAddr::V4(from4) = from else {
            continue;
        };
        let mut resp = Vec::with_capacity(32);
        resp.extend_from_slice(&[0x01, 0x01, 0x00, 12]);
        resp.extend_from_slice(&buf[4..20]); // magic cookie + transaction id
        resp.extend_from_slice(&[0x00, 0x01, 0x00, 0x08, 0x00, 0x01]);
        resp.extend_from_slice(&from4.port().to_be_bytes());
        resp.extend_from_slice(&from4.ip().octets());
        let _ = sock.send_to(&resp, from);
    }
}
