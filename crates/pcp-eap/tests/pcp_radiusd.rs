//! The `pcp-radiusd` shell itself: errors name the file to fix, and `--hash-password`
//! makes a hash the credentials file accepts.

use std::io::Write;
use std::process::{Command, Stdio};

use pcp_eap::Credentials;

const RADIUSD: &str = env!("CARGO_BIN_EXE_pcp-radiusd");

#[test]
fn hash_password_makes_a_usable_credentials_line() {
    let mut child = Command::new(RADIUSD)
        .arg("--hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"correct horse\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).unwrap();
    let c = Credentials::parse(&format!("alice:{}", hash.trim()), "stdin").unwrap();
    assert!(c.verify("alice", b"correct horse"));
    assert!(
        !c.verify("alice", b"correct horse\n"),
        "the newline is not kept"
    );
}

#[test]
fn a_missing_file_is_named_and_exits_2() {
    let dir = std::env::temp_dir().join(format!("pcp-radiusd-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let missing = dir.join("no-such-cert.pem");
    let out = Command::new(RADIUSD)
        .arg("--listen=127.0.0.1:0")
        .arg("--secret-file")
        .arg(dir.join("secret"))
        .arg("--cert")
        .arg(&missing)
        .arg("--key")
        .arg(dir.join("key.pem"))
        .arg("--credentials")
        .arg(dir.join("credentials"))
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-cert.pem"), "{err}");
}
