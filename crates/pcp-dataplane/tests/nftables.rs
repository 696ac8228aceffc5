//! The nftables data plane against the real kernel, in a network namespace this test
//! creates and removes: install, replace, remove, reconcile, filters, IPv6, and the
//! kernel refusing (a full map: NO_RESOURCES; the table deleted behind pcpd's back:
//! a failure), with nothing of a refused batch left behind.
//!
//! Needs root. Without it the test prints a loud SKIP and passes. Each test re-runs
//! this binary inside its namespace (`ip netns exec`), so no code here changes the
//! namespace of a running process.
#![cfg(all(feature = "nftables", target_os = "linux"))]

use std::process::{Command, Stdio};

use pcp_dataplane::nftables::{NftConfig, NftDataPlane};
use pcp_dataplane::{DataPlane, DataPlaneError, Direction, Entry, Filter, Op};

const INNER: &str = "PCP_NFT_TEST_INNER";

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A namespace removed on drop.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Runs test `name` of this binary inside a fresh namespace; returns false (after a
/// loud SKIP) when that is not possible here. Inside the namespace (`INNER` set) it
/// returns true at once and the caller runs the body.
fn in_netns(name: &str) -> bool {
    if std::env::var_os(INNER).is_some() {
        return true;
    }
    if !is_root() {
        eprintln!("!! SKIP {name}: needs root (network namespaces, nftables)");
        return false;
    }
    let tag: u32 = name
        .bytes()
        .fold(7, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    let ns = Netns(format!("pcpnft{}-{}", std::process::id(), tag % 10_000));
    let _ = Command::new("ip")
        .args(["netns", "del", &ns.0])
        .stderr(Stdio::null())
        .status();
    assert!(
        Command::new("ip")
            .args(["netns", "add", &ns.0])
            .status()
            .unwrap()
            .success()
    );
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(INNER, "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("1 passed"),
        "inner run failed:\n{text}"
    );
    // The body ran in the namespace; nothing more to do out here.
    false
}

fn nft_list(table: &str) -> String {
    let out = Command::new("nft")
        .args(["list", "table", "inet", table])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn map(ext_port: u16, internal: &str) -> Entry {
    Entry {
        direction: Direction::Inbound,
        protocol: 17,
        internal: internal.parse().unwrap(),
        external: format!("192.0.2.1:{ext_port}").parse().unwrap(),
        filters: Box::new([]),
    }
}

#[test]
fn install_replace_remove_and_reconcile() {
    if !in_netns("install_replace_remove_and_reconcile") {
        return;
    }
    // Something the previous run left: the declaration replaces it.
    let stale = "table inet t1 {\n map dnat4 {\n  type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service\n  elements = { 192.0.2.9 . udp . 9 : 10.9.9.9 . 9 }\n }\n}\ntable inet other {\n chain c {\n }\n}\n";
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), stale.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success());
    let mut dp = NftDataPlane::open(NftConfig {
        table: "t1".into(),
        ..NftConfig::default()
    })
    .unwrap();
    assert!(
        !nft_list("t1").contains("10.9.9.9"),
        "stale element removed"
    );

    let a = map(4000, "10.0.0.2:5000");
    let mut peer = Entry {
        direction: Direction::Outbound {
            remote: "198.51.100.7:443".parse().unwrap(),
        },
        protocol: 6,
        internal: "10.0.0.2:6000".parse().unwrap(),
        external: "192.0.2.1:4001".parse().unwrap(),
        filters: Box::new([]),
    };
    let v6 = Entry {
        direction: Direction::Inbound,
        protocol: 6,
        internal: "[2001:db8:1::2]:80".parse().unwrap(),
        external: "[2001:db8:ff::1]:8080".parse().unwrap(),
        filters: Box::new([Filter {
            remote_addr: "2001:db8:77::".parse().unwrap(),
            prefix_len: 48,
            remote_port: 0,
        }]),
    };
    dp.apply(&[
        Op::Install(a.clone()),
        Op::Install(peer.clone()),
        Op::Install(v6.clone()),
    ])
    .unwrap();
    assert_eq!(dp.len(), 3);
    let t = nft_list("t1");
    assert!(
        t.contains("192.0.2.1 . udp . 4000 : 10.0.0.2 . 5000"),
        "{t}"
    );
    assert!(
        t.contains("10.0.0.2 . udp . 5000 : 192.0.2.1 . 4000"),
        "{t}"
    );
    assert!(
        t.contains("10.0.0.2 . tcp . 6000 . 198.51.100.7 . 443 : 192.0.2.1 . 4001"),
        "{t}"
    );
    assert!(
        t.contains("2001:db8:ff::1 . tcp . 8080 : 2001:db8:1::2 . 80"),
        "{t}"
    );
    assert!(
        t.contains("2001:db8:ff::1 . tcp . 8080 . 2001:db8:77::/48 . 0-65535"),
        "{t}"
    );
    // Another table is never touched.
    assert!(nft_list("other").contains("chain c"));

    // Re-pointing an entry (same identity, new filters) and a remove in one batch.
    let mut a2 = a.clone();
    a2.filters = Box::new([
        Filter {
            remote_addr: "198.51.100.0".parse().unwrap(),
            prefix_len: 24,
            remote_port: 53,
        },
        Filter {
            remote_addr: "198.51.100.7".parse().unwrap(),
            prefix_len: 32,
            remote_port: 0,
        },
    ]);
    peer.external = "192.0.2.1:4001".parse().unwrap();
    dp.apply(&[Op::Install(a2.clone()), Op::Remove(peer.clone())])
        .unwrap();
    let t = nft_list("t1");
    assert!(!t.contains("198.51.100.7 . 443"), "{t}");
    assert!(t.contains("192.0.2.1 . udp . 4000"), "{t}");
    assert_eq!(dp.len(), 2);
    // Removing what is absent is not an error.
    dp.apply(&[Op::Remove(peer.clone())]).unwrap();

    // Reconcile: someone removed an element behind pcpd's back and added another.
    let del = Command::new("nft")
        .args(["delete element inet t1 dnat6 { 2001:db8:ff::1 . tcp . 8080 }"])
        .status()
        .unwrap();
    assert!(del.success());
    let add = Command::new("nft")
        .args(["add element inet t1 dnat4 { 192.0.2.1 . tcp . 9999 : 10.6.6.6 . 1 }"])
        .status()
        .unwrap();
    assert!(add.success());
    // pcpd's view is still what it committed; reconcile to it (from a fresh open, as
    // at start, and from the running data plane, as after a failed batch).
    let want = [a2.clone(), v6.clone()];
    dp.reconcile(&want).unwrap();
    let t = nft_list("t1");
    assert!(
        t.contains("2001:db8:ff::1 . tcp . 8080 :"),
        "missing one re-added: {t}"
    );
    // The stranger is not in pcpd's view, so reconcile from a fresh open removes it.
    let mut fresh = NftDataPlane::open(NftConfig {
        table: "t1".into(),
        ..NftConfig::default()
    })
    .unwrap();
    fresh.reconcile(&want).unwrap();
    let t = nft_list("t1");
    assert!(!t.contains("10.6.6.6"), "{t}");
    assert!(
        t.contains("192.0.2.1 . udp . 4000 : 10.0.0.2 . 5000"),
        "{t}"
    );
    assert!(
        t.contains("2001:db8:ff::1 . tcp . 8080 : 2001:db8:1::2 . 80"),
        "{t}"
    );
    assert_eq!(fresh.len(), 2);
    fresh.shutdown().unwrap();
    assert!(nft_list("t1").is_empty(), "table removed on shutdown");
    assert!(nft_list("other").contains("chain c"));
}

#[test]
fn kernel_refusals_leave_nothing_behind() {
    if !in_netns("kernel_refusals_leave_nothing_behind") {
        return;
    }
    let mut dp = NftDataPlane::open(NftConfig {
        table: "t2".into(),
        max_elements: Some(2),
        ..NftConfig::default()
    })
    .unwrap();
    dp.apply(&[Op::Install(map(1000, "10.0.0.2:1000"))])
        .unwrap();
    dp.apply(&[Op::Install(map(1001, "10.0.0.2:1001"))])
        .unwrap();
    // dnat4 is full: the third mapping is refused whole (its msnat4 element too).
    let err = dp
        .apply(&[Op::Install(map(1002, "10.0.0.2:1002"))])
        .unwrap_err();
    assert!(matches!(err, DataPlaneError::NoResources(_)), "{err:?}");
    let t = nft_list("t2");
    assert!(!t.contains("1002"), "{t}");
    assert_eq!(dp.len(), 2);
    // A batch mixing a good remove with a refused install is refused whole.
    let err = dp
        .apply(&[
            Op::Remove(map(1000, "10.0.0.2:1000")),
            Op::Install(map(1003, "10.0.0.2:1003")),
            Op::Install(map(1004, "10.0.0.2:1004")),
        ])
        .unwrap_err();
    assert!(matches!(err, DataPlaneError::NoResources(_)), "{err:?}");
    assert!(nft_list("t2").contains("192.0.2.1 . udp . 1000"));
    // The table deleted behind pcpd's back: a failure, not a panic, and reconcile
    // cannot pretend either.
    assert!(
        Command::new("nft")
            .args(["delete", "table", "inet", "t2"])
            .status()
            .unwrap()
            .success()
    );
    let err = dp
        .apply(&[Op::Install(map(1005, "10.0.0.2:1005"))])
        .unwrap_err();
    assert!(matches!(err, DataPlaneError::Failure(_)), "{err:?}");
    assert!(dp.reconcile(&[]).is_err());
}
