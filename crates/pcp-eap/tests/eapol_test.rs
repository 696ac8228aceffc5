//! wpa_supplicant's `eapol_test` (Debian package `eapoltest`) — an independent EAP-TTLS
//! peer and RADIUS NAS — against `pcp-radiusd`, our embedded EAP-TTLS server behind
//! RADIUS, on loopback with a generated CA, server certificate and user. Success is
//! not enough: `eapol_test` compares the MSK its own TLS stack derived with the
//! MS-MPPE-Recv-Key we sent, and must report "MPPE keys OK: 1  mismatch: 0".
//!
//! Needs `eapol_test`: a loud SKIP without it, unless `PCPD_REQUIRE_EAPOLTEST` is set
//! (scripts/test sets it as root, after installing the package).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use pcp_eap::hash_password;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair,
};

const RADIUSD: &str = env!("CARGO_BIN_EXE_pcp-radiusd");
const SECRET: &str = "eapol-test-secret";

fn eapol_test() -> Option<PathBuf> {
    let found = ["/usr/bin/eapol_test", "/usr/sbin/eapol_test"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    if found.is_none() {
        assert!(
            std::env::var_os("PCPD_REQUIRE_EAPOLTEST").is_none(),
            "PCPD_REQUIRE_EAPOLTEST is set but eapol_test is not installed (apt-get install eapoltest)"
        );
        eprintln!(
            "!! SKIP eapol_test interop: eapol_test not installed (Debian package eapoltest; scripts/test installs it as root)"
        );
    }
    found
}

/// A directory with the CA, the server's certificate and key, credentials and secret.
struct Fixture {
    dir: PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Fixture {
    fn new(tag: &str) -> Fixture {
        let dir = std::env::temp_dir().join(format!("pcp-eapol-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Distinct subjects: with rcgen's default for both, OpenSSL takes the server's
        // certificate (issuer = subject) for a self-signed one and refuses it.
        ca_params.distinguished_name = DistinguishedName::new();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "pcp-eap test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        // Enough names that the certificate flight needs several EAP-TTLS fragments
        // (L and M flags) and each of those several EAP-Message attributes.
        let mut names = vec!["radius.pcp.example".to_string()];
        names.extend((0..60).map(|i| format!("filler-{i}.pcp.example")));
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "radius.pcp.example");
        let cert = params.signed_by(&key, &ca).unwrap();
        let w = |name: &str, text: &str| std::fs::write(dir.join(name), text).unwrap();
        w("ca.pem", &ca.pem());
        w("cert.pem", &format!("{}{}", cert.pem(), ca.pem()));
        w("key.pem", &key.serialize_pem());
        let h = hash_password(b"correct horse").unwrap();
        w("credentials", &format!("alice:{h}\n"));
        w("secret", &format!("{SECRET}\n"));
        Fixture { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// `pcp-radiusd` on 127.0.0.1 at a port the kernel picked, killed on drop.
struct Radiusd {
    child: Child,
    port: u16,
}

impl Drop for Radiusd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Radiusd {
    fn start(f: &Fixture) -> Radiusd {
        let mut child = Command::new(RADIUSD)
            .arg("--listen=127.0.0.1:0")
            .arg("--secret-file")
            .arg(f.path("secret"))
            .arg("--cert")
            .arg(f.path("cert.pem"))
            .arg("--key")
            .arg(f.path("key.pem"))
            .arg("--credentials")
            .arg(f.path("credentials"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
            .unwrap_or_else(|| panic!("pcp-radiusd said {line:?}"))
            .port();
        Radiusd { child, port }
    }
}

/// Runs `eapol_test` with EAP-TTLS and `phase2` against the server; its output.
fn run(bin: &Path, f: &Fixture, port: u16, password: &str, phase2: &str) -> Output {
    let conf = f.path(&format!("eapol-{port}-{password}.conf").replace(' ', "_"));
    std::fs::write(
        &conf,
        format!(
            r#"network={{
    ssid="pcp"
    key_mgmt=WPA-EAP
    eap=TTLS
    anonymous_identity="anonymous"
    identity="alice"
    password="{password}"
    ca_cert="{ca}"
    domain_suffix_match="radius.pcp.example"
    phase2="{phase2}"
}}
"#,
            ca = f.path("ca.pem").display()
        ),
    )
    .unwrap();
    Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-s", SECRET])
        .args(["-t", "20", "-r", "0"])
        .output()
        .unwrap()
}

/// `eapol_test`'s whole output, also printed (shown when the test fails).
fn text(o: &Output) -> String {
    let t = format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!("---- eapol_test output ----\n{t}\n---- end of eapol_test output ----");
    t
}

#[test]
fn eapol_test_authenticates_with_ttls_pap_and_agrees_on_the_msk() {
    let Some(bin) = eapol_test() else { return };
    let f = Fixture::new("ok");
    let srv = Radiusd::start(&f);
    let out = run(&bin, &f, srv.port, "correct horse", "auth=PAP");
    let t = text(&out);
    let tail: String = t.lines().rev().take(60).collect::<Vec<_>>().join("\n");
    assert!(
        out.status.success(),
        "eapol_test failed ({}); last lines reversed:\n{tail}",
        out.status
    );
    assert!(
        t.contains("MPPE keys OK: 1  mismatch: 0"),
        "the MSK differs from eapol_test's: {tail}"
    );
    assert!(t.lines().any(|l| l.trim() == "SUCCESS"), "{tail}");
}

#[test]
fn eapol_test_with_a_wrong_password_fails() {
    let Some(bin) = eapol_test() else { return };
    let f = Fixture::new("bad");
    let srv = Radiusd::start(&f);
    let out = run(&bin, &f, srv.port, "battery staple", "auth=PAP");
    let t = text(&out);
    let tail: String = t.lines().rev().take(40).collect::<Vec<_>>().join("\n");
    assert!(!out.status.success(), "eapol_test succeeded: {tail}");
    // Refused by an Access-Reject, not by a timeout.
    assert!(
        t.contains("Access-Reject"),
        "no Access-Reject received: {tail}"
    );
    assert!(!t.contains("MPPE keys OK: 1"), "{tail}");
}
