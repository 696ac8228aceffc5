//! What pcpctl's end-to-end tests share: the `pcpd` binary to run against, and running
//! the built `pcpctl` against a daemon.
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
//! A test file declares `mod common` (pcpd's process helpers, by path) before
//! `mod support`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use crate::common::{self, Pcpd, workspace_root};

pub const PCPCTL: &str = env!("CARGO_BIN_EXE_pcpctl");

/// What pcpd is built from, relative to the workspace root.
const PCPD_SOURCES: [&str; 16] = [
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
    "crates/pcp-ha/Cargo.toml",
    "crates/pcp-ha/src",
    "crates/pcp-auth/Cargo.toml",
    "crates/pcp-auth/src",
    "crates/pcp-eap/Cargo.toml",
    "crates/pcp-eap/src",
];

/// The newest modification time of a file or anything under a directory.
pub fn newest(path: &Path) -> Option<SystemTime> {
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
pub fn pcpd_bin() -> &'static Path {
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
pub fn build_pcpd(profile_dir: &Path) {
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

pub fn start(config: Option<&str>) -> Pcpd {
    let b = common::pcpd(pcpd_bin());
    match config {
        Some(c) => b.config(c),
        None => b,
    }
    .start()
}

/// Runs pcpctl against `d` with `args`; (exit code, stdout, stderr).
pub fn pcpctl(d: &Pcpd, args: &[&str]) -> (Option<i32>, String, String) {
    let admin = d.admin.to_string();
    let mut all = vec!["--admin", admin.as_str()];
    all.extend_from_slice(args);
    let (status, out, err) = common::run(Path::new(PCPCTL), &all, Duration::from_secs(20));
    (status.code(), out, err)
}
