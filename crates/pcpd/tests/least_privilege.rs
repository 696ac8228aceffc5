//! Least privilege (issue 7): the shipped systemd unit (`dist/pcpd.service`) keeps its
//! hardening, systemd accepts it and rates its exposure low; and pcpd really runs as an
//! unprivileged user with no capabilities beyond CAP_NET_ADMIN.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::*;
use pcp_proto::ResultCode;

const PCPD: &str = env!("CARGO_BIN_EXE_pcpd");

fn unit_text() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dist/pcpd.service");
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// `[Service]` keys → every value given (a key may repeat).
fn service_keys(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut in_service = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
            continue;
        }
        if !in_service || line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            out.entry(k.trim().into())
                .or_default()
                .push(v.trim().into());
        }
    }
    out
}

#[test]
fn the_unit_keeps_its_hardening() {
    let keys = service_keys(&unit_text());
    let one = |k: &str| -> String {
        let v = keys.get(k).unwrap_or_else(|| panic!("{k}= missing"));
        v.last().unwrap().clone()
    };
    assert_eq!(one("User"), "pcpd");
    assert_eq!(one("Group"), "pcpd");
    // CAP_NET_ADMIN (nftables) and nothing else: the ports are unprivileged.
    assert_eq!(one("CapabilityBoundingSet"), "CAP_NET_ADMIN");
    assert_eq!(one("AmbientCapabilities"), "CAP_NET_ADMIN");
    for (k, v) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("ProtectClock", "yes"),
        ("RestrictNamespaces", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("RestrictRealtime", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
        ("UMask", "0077"),
    ] {
        assert_eq!(one(k), v, "{k}");
    }
    assert!(keys["SystemCallFilter"].contains(&"@system-service".to_string()));
    assert!(
        keys["SystemCallFilter"]
            .iter()
            .any(|f| f.starts_with('~') && f.contains("@privileged")),
        "privileged system calls denied"
    );
    let families = one("RestrictAddressFamilies");
    assert!(!families.contains("AF_PACKET"), "{families}");
    assert!(!keys.contains_key("ReadWritePaths"), "nothing to write");
}

#[test]
fn systemd_accepts_the_unit_and_rates_it_low_exposure() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!(
            "SKIP (loud): systemd-analyze is not installed; the unit is checked by parsing only"
        );
        return;
    }
    // `verify` checks the executable exists: point it at the binary under test.
    let dir = TempDir::new();
    let unit = dir.join("pcpd.service");
    std::fs::write(&unit, unit_text().replace("/usr/local/bin/pcpd", PCPD)).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("systemd-analyze verify");
    assert!(
        out.status.success(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze security");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("exposure level for pcpd.service:").nth(1))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    // 0 is a sealed box, 10 is root with everything; the unit scored 1.7 when written.
    assert!(score <= 2.0, "exposure {score}:\n{text}");
}

#[test]
fn pcpd_runs_unprivileged_with_only_cap_net_admin() {
    if !nix_is_root() {
        eprintln!("SKIP (loud): needs root to drop to an unprivileged user; CI runs as root");
        return;
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("SKIP (loud): setpriv (util-linux) is not installed");
        return;
    }
    // A wrapper that does what the unit does: user nobody, no groups, no new
    // privileges, bounding and inheritable sets down to CAP_NET_ADMIN.
    // The binary is copied out of the build tree, which `nobody` may not be able to
    // reach (a clone under /root, say).
    let dir = TempDir::new();
    let bin = dir.join("pcpd");
    std::fs::copy(PCPD, &bin).expect("copy pcpd");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let wrapper = dir.join("pcpd-unprivileged");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec setpriv --reuid=65534 --regid=65534 --clear-groups --no-new-privs \
             --bounding-set=-all,+net_admin --inh-caps=-all,+net_admin --ambient-caps=-all,+net_admin {} \"$@\"\n",
            bin.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = pcpd(&wrapper).config(&honour_config("")).start();
    let a = d.client().map(Map::udp(5000));
    assert_eq!(a.result, ResultCode::Success);
    assert!(a.checkpoint_echoed);
    // It is who it should be.
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    assert!(field("Uid:").starts_with("65534"), "{status}");
    assert_eq!(
        field("CapEff:"),
        "0000000000001000",
        "only CAP_NET_ADMIN (bit 12)"
    );
    assert_eq!(field("CapBnd:"), "0000000000001000");
    assert_eq!(field("NoNewPrivs:"), "1");
}

fn nix_is_root() -> bool {
    // The effective uid, from /proc (no libc dependency for one number).
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}
