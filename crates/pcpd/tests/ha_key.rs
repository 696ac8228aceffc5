//! The replication link with a pre-shared key (`[ha] key_file`), real processes: a
//! keyed pair replicates and survives SIGKILL of the active; a pair whose keys differ
//! never peers, counts what it refuses and does not echo 192; a keyed backup ignores a
//! forged plain frame from the active's address.

mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{HaTiming, Map, Node, PairPlan, PcpClient, Pcpd, TempDir, fresh_ip, wait_ha};
use pcp_ha::wire::{self, Header, Kind, Writer};
use pcp_proto::ResultCode;

const PCPD: &str = env!("CARGO_BIN_EXE_pcpd");

const SERVER_CONFIG: &str = "\
[pool]
addresses = [\"192.0.2.1\"]

[tiers.default]
checkpoint_quota = 64
";

/// Writes a key file (mode 600) holding `key` as hex.
fn key_file(dir: &TempDir, name: &str, key: &[u8; 32]) -> PathBuf {
    let path = dir.join(name);
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&path, format!("{hex}\n")).expect("write the key file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    path
}

fn key(seed: u8) -> [u8; 32] {
    std::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(seed) ^ 0x5a)
}

/// Starts `node` as `role` with `key_file` in its `[ha]` section (the last one).
fn start(plan: &PairPlan, node: Node, role: &str, key: &std::path::Path) -> Pcpd {
    let ip = match node {
        Node::A => plan.ip_a,
        Node::B => plan.ip_b,
    };
    let text = format!(
        "{}key_file = \"{}\"\n",
        plan.config(node, role),
        key.display()
    );
    common::pcpd(PCPD).at(ip).config(&text).start()
}

fn rejected(d: &Pcpd, reason: &str) -> f64 {
    d.metric(&format!(
        "pcp_ha_frames_rejected_total{{reason=\"{reason}\"}}"
    ))
    .unwrap_or_else(|| panic!("{}: no {reason} reject metric", d.pcp))
}

fn ready_pair(plan: &PairPlan, ka: &std::path::Path, kb: &std::path::Path) -> (Pcpd, Pcpd) {
    let a = start(plan, Node::A, "active", ka);
    let b = start(plan, Node::B, "backup", kb);
    wait_ha(&a, Duration::from_secs(10), "A active, backup ready", |h| {
        h["role"] == "active" && h["backup_status"] == "ready"
    });
    wait_ha(&b, Duration::from_secs(10), "B backup and ready", |h| {
        h["role"] == "backup" && h["ready"] == true
    });
    (a, b)
}

#[test]
fn a_keyed_pair_replicates_and_a_checkpoint_survives_kill_9() {
    let dir = TempDir::new();
    let k = key_file(&dir, "ha.key", &key(1));
    let plan = PairPlan::new(SERVER_CONFIG, HaTiming::default());
    let (mut a, b) = ready_pair(&plan, &k, &k);
    assert_eq!(a.ha()["link_keyed"], true);
    let c = PcpClient::new(IpAddr::V4(fresh_ip()), a.pcp);
    let ans = c.map(Map::udp(4000));
    assert_eq!(ans.result, ResultCode::Success);
    assert!(ans.checkpoint_echoed, "ready keyed backup: 192 echoed");
    let ext = ans.external.expect("MAP body");
    wait_ha(&b, Duration::from_secs(5), "B stores the mapping", |h| {
        h["stored"].as_u64() >= Some(1)
    });
    a.kill9();
    wait_ha(&b, Duration::from_secs(5), "B takes over", |h| {
        h["role"] == "active"
    });
    let m = b.mapping(17, 4000);
    assert_eq!(m["external_address"], ext.ip().to_string(), "{m}");
    assert_eq!(m["external_port"], ext.port(), "{m}");
    assert_eq!(m["checkpointed"], true, "{m}");
    assert_eq!(rejected(&b, "auth"), 0.0);
    assert_eq!(rejected(&b, "replay"), 0.0);
}

#[test]
fn a_pair_with_different_keys_does_not_peer() {
    let dir = TempDir::new();
    let ka = key_file(&dir, "a.key", &key(1));
    let kb = key_file(&dir, "b.key", &key(2));
    let plan = PairPlan::new(SERVER_CONFIG, HaTiming::default());
    let a = start(&plan, Node::A, "active", &ka);
    let b = start(&plan, Node::B, "backup", &kb);
    wait_ha(&a, Duration::from_secs(10), "A active", |h| {
        h["role"] == "active"
    });
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let (ha, hb) = (a.ha(), b.ha());
        assert_ne!(
            ha["backup_status"], "ready",
            "A peered with a wrong key: {ha}"
        );
        assert!(
            !(hb["role"] == "backup" && hb["ready"] == true),
            "B ready with a wrong key: {hb}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_ha(&b, Duration::from_secs(5), "B refuses A's frames", |h| {
        h["frames_rejected"]["auth"].as_u64() > Some(0)
    });
    assert!(rejected(&a, "auth") > 0.0, "A refuses B's frames");
    let c = PcpClient::new(IpAddr::V4(fresh_ip()), a.pcp);
    let ans = c.map(Map::udp(4001));
    assert_eq!(ans.result, ResultCode::Success);
    assert!(!ans.checkpoint_echoed, "no peer: 192 not honoured");
    assert_eq!(a.mapping(17, 4001)["checkpoint_reason"], "backup_not_ready");
    assert!(
        a.output().contains("failed authentication"),
        "the warning says why:\n{}",
        a.output()
    );
}

#[test]
fn a_keyed_backup_ignores_forged_plain_frames() {
    let dir = TempDir::new();
    let k = key_file(&dir, "ha.key", &key(3));
    let plan = PairPlan::new(SERVER_CONFIG, HaTiming::default());
    let (a, b) = ready_pair(&plan, &k, &k);
    let before = b.ha();
    let term = before["term"].as_u64().expect("term");
    // From the active's address (the shell checks only the IP), a higher term: a
    // plain node would step to it.
    let forger = UdpSocket::bind(SocketAddr::new(IpAddr::V4(plan.ip_a), 0)).expect("bind");
    let mut buf = vec![0u8; wire::MAX_FRAME];
    for kind in [Kind::Data, Kind::Beat, Kind::Handover] {
        let mut w = Writer::new(&mut buf);
        let h = Header {
            kind,
            flags: 0,
            term: term + 10,
            sender: 7,
            stream: 7,
        };
        wire::write_header(&mut w, &h).expect("header");
        if kind == Kind::Data {
            let at = wire::write_data_prefix(&mut w, 1).expect("prefix");
            wire::patch_count(&mut w, at, 0);
        } else {
            wire::write_u64(&mut w, 0).expect("seq");
            wire::write_u64(&mut w, 0).expect("epoch");
        }
        let n = w.len();
        forger.send_to(&buf[..n], plan.ha_b).expect("send");
    }
    let h = wait_ha(&b, Duration::from_secs(5), "B counts the forgeries", |h| {
        h["frames_rejected"]["unkeyed"].as_u64() >= Some(3)
    });
    assert_eq!(h["role"], "backup", "{h}");
    assert_eq!(h["term"].as_u64(), Some(term), "forged term taken: {h}");
    assert_eq!(rejected(&b, "unkeyed"), 3.0);
    // The link still works.
    let c = PcpClient::new(IpAddr::V4(fresh_ip()), a.pcp);
    assert!(c.map(Map::udp(4002)).checkpoint_echoed);
}

#[test]
fn a_world_readable_or_short_key_file_is_refused_naming_it() {
    let dir = TempDir::new();
    let k = key_file(&dir, "ha.key", &key(4));
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let plan = PairPlan::new(SERVER_CONFIG, HaTiming::default());
    let cfg = dir.join("pcpd.toml");
    let text = format!(
        "{}key_file = \"{}\"\n",
        plan.config(Node::A, "active"),
        k.display()
    );
    std::fs::write(&cfg, text).expect("config");
    let out = std::process::Command::new(PCPD)
        .arg("--config")
        .arg(&cfg)
        .arg("--check")
        .output()
        .expect("run pcpd");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("ha.key_file") && err.contains("ha.key") && err.contains("644"),
        "{err}"
    );
    std::fs::write(&k, "c2hvcnQ=\n").expect("short key");
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let out = std::process::Command::new(PCPD)
        .arg("--config")
        .arg(&cfg)
        .arg("--check")
        .output()
        .expect("run pcpd");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("ha.key_file") && err.contains("5 octets"),
        "{err}"
    );
}

#[test]
fn a_keyed_node_and_a_plain_one_do_not_peer_and_say_why() {
    let dir = TempDir::new();
    let k = key_file(&dir, "ha.key", &key(5));
    let plan = PairPlan::new(SERVER_CONFIG, HaTiming::default());
    let a = start(&plan, Node::A, "active", &k);
    let b = plan.start(PCPD, Node::B, "backup");
    wait_ha(
        &a,
        Duration::from_secs(10),
        "A refuses B's plain frames",
        |h| h["role"] == "active" && h["frames_rejected"]["unkeyed"].as_u64() > Some(0),
    );
    wait_ha(
        &b,
        Duration::from_secs(10),
        "B refuses A's sealed frames",
        |h| h["frames_rejected"]["keyed"].as_u64() > Some(0),
    );
    assert_ne!(a.ha()["backup_status"], "ready");
    assert!(a.output().contains("the peer has none"), "{}", a.output());
    assert!(b.output().contains("this node has none"), "{}", b.output());
}
