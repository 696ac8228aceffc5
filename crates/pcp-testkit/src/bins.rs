//! The workspace's binaries for tests of other packages.
//!
//! A package's tests get the path of its *own* binaries from Cargo
//! (`env!("CARGO_BIN_EXE_<name>")`), not those of another package (artifact
//! dependencies are unstable). So a binary of another package is taken from the
//! directory this test runs from (same target directory, target triple and profile,
//! found from the test executable, so `CARGO_TARGET_DIR`, `--target` and `--release`
//! work). `cargo test --workspace` (what CI runs) has just built it. When it is
//! missing, or older than any source it is built from (e.g. `cargo test -p pcpctl`
//! after editing pcpd), the test runs `cargo build -p <package>` into that same place
//! first. It does not build unconditionally: a plain `cargo build` resolves features
//! without dev-dependencies, so it would recompile tokio & co. and replace the binary
//! that `cargo test` just made (about a minute on a 2-core machine, each run).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::SystemTime;

/// What pcpd is built from, relative to the workspace root.
pub const PCPD_SOURCES: &[&str] = &[
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

/// What pcpc is built from, relative to the workspace root.
pub const PCPC_SOURCES: &[&str] = &[
    "Cargo.toml",
    "Cargo.lock",
    "crates/pcpc/Cargo.toml",
    "crates/pcpc/src",
    "crates/pcp-client/Cargo.toml",
    "crates/pcp-client/src",
    "crates/pcp-proto/Cargo.toml",
    "crates/pcp-proto/src",
    "crates/pcp-auth/Cargo.toml",
    "crates/pcp-auth/src",
    "crates/pcp-eap/Cargo.toml",
    "crates/pcp-eap/src",
];

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("the workspace root")
        .to_path_buf()
}

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

/// The directory of the target and profile this test runs from (`target/debug`):
/// a test executable is `<profile dir>/deps/<test>-<hash>`.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    exe.parent()
        .and_then(Path::parent)
        .expect("the profile directory")
        .to_path_buf()
}

/// The pcpd binary, built first when missing or stale (see the module doc).
pub fn pcpd_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| fresh_bin("pcpd", PCPD_SOURCES))
}

/// The pcpc binary, built first when missing or stale (see the module doc).
pub fn pcpc_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| fresh_bin("pcpc", PCPC_SOURCES))
}

/// Binary `name` of package `name` in [`profile_dir`], built first when missing or
/// older than any of `sources` (relative to the workspace root).
pub fn fresh_bin(name: &str, sources: &[&str]) -> PathBuf {
    let dir = profile_dir();
    let bin = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    let built = std::fs::metadata(&bin).and_then(|m| m.modified()).ok();
    let root = workspace_root();
    let sources = sources.iter().filter_map(|p| newest(&root.join(p))).max();
    let fresh = matches!((built, sources), (Some(b), Some(s)) if b >= s);
    if !fresh {
        build(name, &dir);
    }
    assert!(bin.exists(), "{} missing after the build", bin.display());
    bin
}

/// `cargo build -p <name> --bin <name>` into `profile_dir`'s target directory, target
/// and profile.
pub fn build(name: &str, profile_dir: &Path) {
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
        .args(["build", "--quiet", "-p", name, "--bin", name])
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
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("run cargo build -p {name}: {e}"));
    assert!(
        out.status.success(),
        "cargo build -p {name} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
