//! `pcpc` end to end: the built binary against a real `pcpd` (and, for the *unknown*
//! checkpoint state, a tiny blind-echo server in a thread), over loopback only.

mod support;

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use pcp_proto::{Body, Request, Response, ResultCode};
use pcp_testkit::TempDir;
use pcp_testkit::eap::{AuthFiles, PASSWORD, users_line};
use pcp_testkit::pcpd::{HONOUR, Pcpd, short_lifetime_config, wait_until};
use pcp_testkit::ports::{free_udp, fresh_ip};
use support::{PCPC, identity_map_args};

fn pcpc(ip: IpAddr, server: SocketAddr, args: &[&str]) -> Output {
    support::pcpc(ip, server, 5, args)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "pcpc failed: {}", stderr(o));
    serde_json::from_str(stdout(o).lines().next().unwrap_or(""))
        .unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

#[test]
fn map_json_honoured_then_delete_with_the_nonce() {
    let p = Pcpd::start(&short_lifetime_config(HONOUR));
    let ip = IpAddr::V4(p.ip);
    let o = pcpc(
        ip,
        p.pcp,
        &[
            "--json",
            "map",
            "--proto",
            "udp",
            "--internal-port",
            "5060",
            "--lifetime",
            "600",
            "--checkpoint",
            "--description",
            "sip",
        ],
    );
    let v = json(&o);
    assert_eq!(v["checkpoint"], "honoured");
    assert_eq!(v["lifetime"], 600);
    assert_eq!(v["opcode"], "map");
    let m = p.find_mapping(5060).expect("on the server");
    assert_eq!(m["checkpointed"], true);
    assert_eq!(m["external_port"], v["external_port"]);
    assert_eq!(m["description"], "sip");
    let nonce = v["nonce"].as_str().unwrap().to_string();
    assert_eq!(nonce.len(), 24);
    // A wrong nonce is refused, and says so.
    let o = pcpc(
        ip,
        p.pcp,
        &[
            "delete",
            "--proto",
            "udp",
            "--internal-port",
            "5060",
            "--nonce",
            "000000000000000000000001",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("NOT_AUTHORIZED"), "{}", stderr(&o));
    assert!(p.find_mapping(5060).is_some());
    // The right one deletes it.
    let o = pcpc(
        ip,
        p.pcp,
        &[
            "delete",
            "--proto",
            "udp",
            "--internal-port",
            "5060",
            "--nonce",
            &nonce,
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("deleted udp internal port 5060"));
    assert!(p.find_mapping(5060).is_none());
}

#[test]
fn human_output_says_not_honoured_over_quota() {
    let p = Pcpd::start(&short_lifetime_config(&format!(
        "{HONOUR}[tiers.default]\ncheckpoint_quota = 0\n"
    )));
    let o = pcpc(
        IpAddr::V4(p.ip),
        p.pcp,
        &[
            "map",
            "--proto",
            "tcp",
            "--internal-port",
            "8443",
            "--checkpoint",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.starts_with("MAP tcp internal port 8443 -> external "),
        "{out}"
    );
    assert!(out.contains("checkpoint  not honoured"), "{out}");
    assert!(out.contains("(PCP)"), "{out}");
    assert_eq!(p.find_mapping(8443).unwrap()["checkpoint_reason"], "quota");
}

#[test]
fn keep_renews_prints_events_and_deletes_on_interrupt() {
    let p = Pcpd::start(&short_lifetime_config(HONOUR));
    let mut child = Command::new(PCPC)
        .args(["--server", &p.pcp.to_string()])
        .args(["--bind", &SocketAddr::new(IpAddr::V4(p.ip), 0).to_string()])
        .args(["--json", "map", "--proto", "udp", "--internal-port", "7000"])
        .args(["--lifetime", "4"])
        .args(["--checkpoint", "--keep"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["event"], "granted");
    assert_eq!(first["opcode"], "map");
    assert_eq!(first["checkpoint"], "honoured");
    let renewed: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(renewed["event"], "renewed", "{renewed}");
    assert_eq!(renewed["grant"]["checkpoint"], "honoured");
    assert_eq!(p.find_mapping(7000).unwrap()["checkpointed"], true);
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(child.wait().unwrap().success());
    assert!(rest.iter().any(|l| l.contains("\"deleted\"")), "{rest:?}");
    assert!(p.find_mapping(7000).is_none(), "deleted on interrupt");
}

#[test]
fn announce_prints_the_epoch_and_no_server_fails_with_advice() {
    let p = Pcpd::start(&short_lifetime_config(""));
    let o = pcpc(IpAddr::V4(p.ip), p.pcp, &["announce"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains(": epoch "), "{}", stdout(&o));
    let ip = fresh_ip();
    let nobody = SocketAddr::new(IpAddr::V4(ip), free_udp(ip));
    let o = Command::new(PCPC)
        .args([
            "--server",
            &nobody.to_string(),
            "--bind",
            &format!("{ip}:0"),
        ])
        .args([
            "--timeout",
            "0.5",
            "map",
            "--proto",
            "udp",
            "--internal-port",
            "1",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no answer from"), "{}", stderr(&o));
    // Usage errors exit 2.
    let o = Command::new(PCPC)
        .args(["map", "--proto", "icmp"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
}

/// A server that copies every request option into its success response, as
/// miniupnpd does. Answers `n` requests.
fn blind_echo_server(sock: UdpSocket, n: usize) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 1100];
        for _ in 0..n {
            let Ok((len, from)) = sock.recv_from(&mut buf) else {
                return;
            };
            let Ok(req) = Request::parse(&buf[..len]) else {
                continue;
            };
            let mut body = req.body;
            if let Body::Map(m) = &mut body {
                m.external_port = 40000;
                m.external_addr = "192.0.2.77".parse().unwrap();
            }
            let resp = Response {
                result_code: ResultCode::Success,
                lifetime: req.lifetime,
                epoch: 1,
                body,
                options: req.options,
            };
            let mut out = [0u8; 1100];
            let k = resp.emit(&mut out).unwrap();
            let _ = sock.send_to(&out[..k], from);
        }
    });
}

#[test]
fn blind_echo_server_gives_checkpoint_unknown() {
    let ip = fresh_ip();
    let sock = UdpSocket::bind((ip, 0)).unwrap();
    let server = sock.local_addr().unwrap();
    blind_echo_server(sock, 1);
    let o = pcpc(
        IpAddr::V4(ip),
        server,
        &[
            "--json",
            "map",
            "--proto",
            "udp",
            "--internal-port",
            "9000",
            "--checkpoint",
        ],
    );
    let v = json(&o);
    assert_eq!(v["checkpoint"], "unknown", "{v}");
    assert_eq!(v["external"], "192.0.2.77:40000");
}

#[test]
fn explain_shows_the_deciding_rule() {
    let policy = concat!(env!("CARGO_MANIFEST_DIR"), "/policy.example.toml");
    let run = |args: &[&str]| {
        Command::new(PCPC)
            .args(["explain", "--policy", policy])
            .args(args)
            .output()
            .unwrap()
    };
    let o = run(&[
        "--app",
        "quake",
        "--proto",
        "udp",
        "--internal-port",
        "27960",
        "--at",
        "19:30",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("quake udp port 27960: CHECKPOINT"), "{out}");
    assert!(out.contains("\"evening-games\""), "{out}");
    let o = run(&[
        "--app",
        "torrent",
        "--asked",
        "--tag",
        "emergency",
        "--json",
    ]);
    let v = json(&o);
    assert_eq!(v["decision"]["checkpoint"], true);
    assert_eq!(v["decision"]["rule"], "emergency-calls");
    assert_eq!(v["decision"]["layer"], "locked");
    assert_eq!(v["decision"]["overridden"][0][0], "no-p2p");
    let o = run(&[
        "--app",
        "quake",
        "--proto",
        "udp",
        "--internal-port",
        "27960",
        "--at",
        "19:30",
        "--already",
        "4",
    ]);
    assert!(stdout(&o).contains("no checkpoint"), "{}", stdout(&o));
    assert!(stdout(&o).contains("limit 4"), "{}", stdout(&o));
    // A broken policy file: file, line, what is wrong.
    let dir = std::env::temp_dir().join(format!("pcpc-explain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[[rule]]\nname = \"x\"\naction = \"sometimes\"\n").unwrap();
    let o = Command::new(PCPC)
        .args(["explain", "--policy", bad.to_str().unwrap(), "--app", "a"])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("bad.toml:3:"), "{}", stderr(&o));
}

#[test]
fn run_keeps_the_policy_flows_checkpointed_as_decided() {
    let p = Pcpd::start(&short_lifetime_config(HONOUR));
    let dir = std::env::temp_dir().join(format!("pcpc-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("policy.toml");
    std::fs::write(
        &file,
        r#"
[[rule]]
name = "emergency"
locked = true
tags = ["emergency"]
action = "always"

[[rule]]
name = "no-bulk"
apps = ["*"]
action = "never"

[[flow]]
app = "voip"
proto = "udp"
internal_port = 5060
tags = ["emergency"]
lifetime = 600

[[flow]]
app = "backup"
proto = "tcp"
internal_port = 873
asked = true
lifetime = 600
"#,
    )
    .unwrap();
    let child = Command::new(PCPC)
        .args(["--server", &p.pcp.to_string()])
        .args(["--bind", &SocketAddr::new(IpAddr::V4(p.ip), 0).to_string()])
        .args([
            "--json",
            "run",
            "--policy",
            file.to_str().unwrap(),
            "--for-secs",
            "3",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || p.mappings().len() == 2),
        "{:?}",
        p.mappings()
    );
    assert_eq!(p.find_mapping(5060).unwrap()["checkpointed"], true);
    let backup = p.find_mapping(873).unwrap();
    assert_eq!(backup["checkpointed"], false);
    assert_eq!(
        backup["checkpoint_requested"], false,
        "the user's never wins"
    );
    assert_eq!(
        p.find_mapping(5060).unwrap()["description"],
        "voip udp/5060"
    );
    let out = child.wait_with_output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("\"granted\"").count(), 2, "{text}");
    assert_eq!(text.matches("\"deleted\"").count(), 2, "{text}");
    assert!(p.mappings().is_empty(), "deleted at the end");
}

/// `--identity` needs its password file and CA; bad files are named. (The exchange
/// itself is tested against pcpd: crates/pcpd/tests/auth.rs.)
#[test]
fn identity_flags_are_checked_and_bad_files_named() {
    let ip = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    let server = SocketAddr::new(ip, 9);
    let o = pcpc(
        ip,
        server,
        &[
            "--identity",
            "alice",
            "map",
            "--proto",
            "udp",
            "--internal-port",
            "1",
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--password-file"), "{}", stderr(&o));
    let dir = std::env::temp_dir().join(format!("pcpc-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pw = dir.join("pw");
    std::fs::write(&pw, "secret\n").unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, "not a certificate\n").unwrap();
    let o = pcpc(
        ip,
        server,
        &[
            "--identity",
            "alice",
            "--password-file",
            pw.to_str().unwrap(),
            "--ca",
            ca.to_str().unwrap(),
            "map",
            "--proto",
            "udp",
            "--internal-port",
            "1",
        ],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("ca.pem"), "{}", stderr(&o));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `pcpc --identity --password-file --ca` against pcpd with `auth = "required"` and the
/// embedded EAP-TTLS back end: authenticates, maps with tagged requests; a wrong
/// password fails; without --identity the server says AUTHENTICATION_REQUIRED.
#[test]
fn identity_authenticates_against_pcpd_and_maps() {
    let dir = TempDir::new();
    let files = AuthFiles::write(
        &dir.0,
        "pcp.example",
        &users_line("alice", PASSWORD.as_bytes()),
    );
    let path = |n: &str| dir.path_str(n);
    std::fs::write(path("pw"), "correct horse\n").unwrap();
    std::fs::write(path("bad"), "wrong\n").unwrap();
    let auth = files.section("required");
    let p = Pcpd::start(&short_lifetime_config(&auth));
    let ip = IpAddr::V4(p.ip);
    let (pw, bad, ca_pem) = (path("pw"), path("bad"), path("ca.pem"));
    let map = |password: &str| {
        pcpc(
            ip,
            p.pcp,
            &identity_map_args(password, &ca_pem, "pcp.example", "7000"),
        )
    };
    let v = json(&map(&pw));
    assert_eq!(v["lifetime"], 600);
    assert!(p.find_mapping(7000).is_some(), "not on the server");
    let o = map(&bad);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("authentication"), "{}", stderr(&o));
    let o = pcpc(
        ip,
        p.pcp,
        &["map", "--proto", "udp", "--internal-port", "7001"],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("AUTHENTICATION_REQUIRED"),
        "{}",
        stderr(&o)
    );
}
