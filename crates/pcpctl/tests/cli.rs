//! pcpctl end to end: the built `pcpctl` binary against a real `pcpd` process.
//!
//! Where pcpd comes from: it is another package's binary, which Cargo does not hand to
//! this package's tests (`CARGO_BIN_EXE_*` only names the package's own binaries, and
//! artifact dependencies are unstable). [`pcpd_bin`] takes the `pcpd` that sits next to
//! this `pcpctl` (same target directory, target and profile, found from
//! `CARGO_BIN_EXE_pcpctl`, so `CARGO_TARGET_DIR`, `--target` and `--release` work).
//! `cargo test --workspace` (what CI runs) has just built it. When it is missing, or
//! older than any source it is built from (e.g. `cargo test -p pcpctl` after editing
//! pcpd), the test runs `cargo build -p pcpd` into that same place first. It does not
//! build unconditionally: a plain `cargo build` resolves features without
//! dev-dependencies, so it would recompile tokio & co. and replace the binary that
//! `cargo test` just made (about a minute on a 2-core machine, each run).
//!
//! The process helpers are pcpd's own test helpers, shared by path.

#[path = "../../pcpd/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use common::{Map, Pcpd, honour_config, metric, workspace_root};

const PCPCTL: &str = env!("CARGO_BIN_EXE_pcpctl");

/// What pcpd is built from, relative to the workspace root.
const PCPD_SOURCES: [&str; 10] = [
    "Cargo.toml",
    "Cargo.lock",
    "crates/pcpd/Cargo.toml",
    "crates/pcpd/src",
    "crates/pcp-server/Cargo.toml",
    "crates/pcp-server/src",
    "crates/pcp-proto/Cargo.toml",
    "crates/pcp-proto/src",
    "crates/pcp-dataplane/Cargo.toml",
    "crates/pcp-dataplane/src",
];

/// The newest modification time of a file or anything under a directory.
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

/// The pcpd binary next to this pcpctl, built first when missing or stale.
fn pcpd_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let profile_dir = Path::new(PCPCTL).parent().expect("pcpctl's directory");
        let bin = profile_dir.join(format!("pcpd{}", std::env::consts::EXE_SUFFIX));
        let built = std::fs::metadata(&bin).and_then(|m| m.modified()).ok();
        let root = workspace_root();
        let sources = PCPD_SOURCES
            .iter()
            .filter_map(|p| newest(&root.join(p)))
            .max();
        let fresh = matches!((built, sources), (Some(b), Some(s)) if b >= s);
        if !fresh {
            build_pcpd(profile_dir);
        }
        assert!(bin.exists(), "{} missing after the build", bin.display());
        bin
    })
}

/// `cargo build -p pcpd` into `profile_dir`'s target directory, target and profile.
fn build_pcpd(profile_dir: &Path) {
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .expect("a profile directory name");
    // <target-dir>/<profile>/, or <target-dir>/<triple>/<profile>/ with --target. Cargo
    // marks a target directory's root with CACHEDIR.TAG; a triple directory is named
    // after the architecture the tests run on.
    let up = profile_dir.parent().expect("target directory");
    let up_name = up.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let is_triple = !up.join("CACHEDIR.TAG").exists()
        && up_name.starts_with(&format!("{}-", std::env::consts::ARCH));
    let (target_dir, triple) = if is_triple {
        (up.parent().expect("target directory"), Some(up_name))
    } else {
        (up, None)
    };
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(workspace_root())
        .args(["build", "--quiet", "-p", "pcpd", "--bin", "pcpd"])
        .arg("--target-dir")
        .arg(target_dir);
    if let Some(t) = triple {
        cmd.args(["--target", t]);
    }
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let out = cmd.output().expect("run cargo build -p pcpd");
    assert!(
        out.status.success(),
        "cargo build -p pcpd failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn start(config: Option<&str>) -> Pcpd {
    let b = common::pcpd(pcpd_bin());
    match config {
        Some(c) => b.config(c),
        None => b,
    }
    .start()
}

/// Runs pcpctl against `d` with `args`; (exit code, stdout, stderr).
fn pcpctl(d: &Pcpd, args: &[&str]) -> (Option<i32>, String, String) {
    let admin = d.admin.to_string();
    let mut all = vec!["--admin", admin.as_str()];
    all.extend_from_slice(args);
    let (status, out, err) = common::run(Path::new(PCPCTL), &all, Duration::from_secs(20));
    (status.code(), out, err)
}

const DENY_ALL: &str = "[[policy]]\nname = \"no-checkpoints\"\naction = \"deny\"\n";

#[test]
fn reload_applies_policy_without_losing_mappings() {
    let base = honour_config("");
    let d = start(Some(&base));
    let m = Map::udp(5060);
    let a = d.client().map(m);
    assert!(a.checkpoint_echoed);
    let port = a.external.expect("MAP body").port();

    d.rewrite_config(&format!("{base}\n{DENY_ALL}"));
    let (code, out, err) = pcpctl(&d, &["reload"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let path = d
        .config_path
        .as_ref()
        .expect("config")
        .display()
        .to_string();
    assert!(out.contains(&format!("reloaded {path}")), "{out}");
    assert!(out.contains("1 policy rules"), "{out}");

    // POST /reload is synchronous: the next renewal already sees the deny rule.
    let r = d.client().map(m);
    assert!(!r.checkpoint_echoed, "denied: 192 must not be echoed");
    assert_eq!(r.external.expect("MAP body").port(), port, "mapping kept");
    let v = d.mapping(17, 5060);
    assert_eq!(v["checkpoint_reason"], "denied");
    assert_eq!(v["external_port"], port);
}

#[test]
fn refused_reload_exits_1_with_pcpds_reason() {
    let base = honour_config("");
    let d = start(Some(&base));
    // Line 9 (after the 6 lines of `base`, a blank one and `[lifetime]`) has an
    // unknown key.
    d.rewrite_config(&format!("{base}\n[lifetime]\nmaxx = 10\n"));
    let (code, out, err) = pcpctl(&d, &["reload"]);
    assert_eq!(code, Some(1), "{out}{err}");
    let path = d
        .config_path
        .as_ref()
        .expect("config")
        .display()
        .to_string();
    assert!(err.starts_with("pcpctl: reload refused: "), "{err}");
    assert!(err.contains(&format!("{path}:9:")), "{err}");
    assert!(err.contains("maxx"), "{err}");
    assert!(out.is_empty(), "{out}");

    // Without --config there is nothing to reload.
    let plain = start(None);
    let (code, _, err) = pcpctl(&plain, &["reload"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("embedded defaults"), "{err}");
}

#[test]
fn mappings_table_and_json() {
    let d = start(Some(&honour_config(
        "[[policy]]\nname = \"tcp-never\"\naction = \"deny\"\nprotocols = [6]\n",
    )));
    let c = d.client();
    let udp = c.map(Map::udp(5060));
    let mut tcp = Map::udp(443);
    tcp.protocol = 6;
    let tcp_ans = c.map(tcp);
    let ip = c.ip();

    let (code, out, err) = pcpctl(&d, &["mappings"]);
    assert_eq!(code, Some(0), "{err}");
    let mut lines = out.lines();
    let header = lines.next().expect("a header");
    for col in [
        "OPCODE",
        "INTERNAL",
        "EXTERNAL",
        "PROTO",
        "LIFETIME",
        "CHECKPOINTED",
        "REASON",
        "SUBSCRIBER",
    ] {
        assert!(header.contains(col), "{header}");
    }
    let rows: Vec<&str> = lines.collect();
    let udp_row = rows
        .iter()
        .find(|r| r.contains(&format!("{ip}:5060")))
        .unwrap_or_else(|| panic!("no UDP row in\n{out}"));
    let udp_ext = udp.external.expect("MAP body");
    for cell in [
        "map",
        &udp_ext.to_string(),
        "udp",
        "yes",
        "requested",
        &format!("{ip}/32"),
    ] {
        assert!(udp_row.contains(cell), "{cell:?} missing in {udp_row}");
    }
    let tcp_row = rows
        .iter()
        .find(|r| r.contains(&format!("{ip}:443")))
        .unwrap_or_else(|| panic!("no TCP row in\n{out}"));
    for cell in [" tcp ", " no ", "denied", "denied by rule tcp-never"] {
        assert!(tcp_row.contains(cell), "{cell:?} missing in {tcp_row}");
    }
    assert!(
        out.contains("2 mappings, 1 checkpointed"),
        "summary line in\n{out}"
    );

    let (code, out, err) = pcpctl(&d, &["mappings", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("pcpctl --json is JSON");
    let list = v.as_array().expect("a list");
    assert_eq!(list.len(), 2);
    let tcp_json = list
        .iter()
        .find(|m| m["protocol"] == 6)
        .expect("the TCP mapping");
    assert_eq!(
        tcp_json["external_port"],
        tcp_ans.external.expect("MAP body").port()
    );
    assert_eq!(tcp_json["checkpoint_reason"], "denied");
}

#[test]
fn subscribers_status_and_metrics() {
    let d = start(Some(&honour_config(
        "[tiers.default]\ncheckpoint_quota = 1\nmapping_quota = 5\ncheckpoint_burst = 4\n",
    )));
    let c = d.client();
    assert!(c.map(Map::udp(1000)).checkpoint_echoed);
    assert!(!c.map(Map::udp(1001)).checkpoint_echoed);

    let (code, out, err) = pcpctl(&d, &["subscribers"]);
    assert_eq!(code, Some(0), "{err}");
    let header = out.lines().next().expect("header");
    for col in ["ID", "TIER", "MAPPINGS", "CHECKPOINTED", "TOKENS"] {
        assert!(header.contains(col), "{header}");
    }
    let row = out.lines().nth(1).expect("one subscriber");
    let id = format!("{}/32", c.ip());
    for cell in [id.as_str(), "default", "2/5", "1/1", "/4"] {
        assert!(row.contains(cell), "{cell:?} missing in {row}");
    }
    let (code, out, _) = pcpctl(&d, &["subscribers", "--json"]);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v[0]["checkpointed"], 1);

    let (code, out, err) = pcpctl(&d, &["status"]);
    assert_eq!(code, Some(0), "{err}");
    for want in [
        format!("listen:       {}", d.pcp),
        "mappings:     2".to_string(),
        "checkpointed: 1".to_string(),
        "backup:       none".to_string(),
        format!(
            "config:       {}",
            d.config_path.as_ref().expect("config").display()
        ),
    ] {
        assert!(out.contains(&want), "{want:?} missing in\n{out}");
    }
    let (code, out, _) = pcpctl(&d, &["status", "--json"]);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["mappings"], 2);

    let (code, out, err) = pcpctl(&d, &["metrics"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        metric(&out, "pcp_requests_total{kind=\"map\",result=\"SUCCESS\"}"),
        Some(2.0),
        "{out}"
    );
    assert_eq!(
        metric(&out, "pcp_checkpoint_decisions_total{reason=\"quota\"}"),
        Some(1.0)
    );
    assert!(out.contains("# TYPE pcp_mappings gauge"), "{out}");
}

#[test]
fn unreachable_admin_api_is_a_clear_error_and_exit_1() {
    // A port that was free a moment ago, on an address nothing else uses.
    let ip = common::fresh_ip();
    let admin = format!("{ip}:{}", common::free_port(ip, false));
    for cmd in ["status", "mappings", "reload", "metrics"] {
        let (status, out, err) = common::run(
            Path::new(PCPCTL),
            &["--admin", &admin, cmd],
            Duration::from_secs(20),
        );
        assert_eq!(status.code(), Some(1), "{cmd}: {err}");
        assert!(
            err.starts_with(&format!("pcpctl: cannot reach pcpd admin API at {admin}: ")),
            "{cmd}: {err}"
        );
        assert!(out.is_empty());
    }
}

#[test]
fn bad_usage_exits_2() {
    let (status, _, err) = common::run(Path::new(PCPCTL), &["frobnicate"], Duration::from_secs(20));
    assert_eq!(status.code(), Some(2), "{err}");
    let (status, _, err) = common::run(
        Path::new(PCPCTL),
        &["--timeout", "0", "status"],
        Duration::from_secs(20),
    );
    assert_eq!(status.code(), Some(2), "{err}");
}
