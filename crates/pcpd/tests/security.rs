//! pcpd's security properties end to end (issue 7): the admin API's bearer tokens and
//! its refusal to run open beyond loopback, client access lists per listen address
//! (with their counter), and logs that reveal neither clients' flows nor nonces.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use pcp_proto::ResultCode;

const PCPD: &str = env!("CARGO_BIN_EXE_pcpd");
const ADMIN_TOKEN: &str = "adm-7f3c9a1e5b2d4c6f8a0e";
const READ_TOKEN: &str = "rd-2b4d6f8a0c1e3a5c7e9b";

fn token_file(dir: &TempDir, name: &str, token: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p.display().to_string()
}

/// One request with an optional bearer token: status and body.
fn call(method: &str, addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .proxy(None)
        .build();
    let agent = ureq::Agent::new_with_config(config);
    let url = format!("http://{addr}{path}");
    let auth = token.map(|t| format!("Bearer {t}"));
    let resp = if method == "POST" {
        let mut r = agent.post(&url);
        if let Some(a) = &auth {
            r = r.header("Authorization", a);
        }
        r.send_empty()
    } else {
        let mut r = agent.get(&url);
        if let Some(a) = &auth {
            r = r.header("Authorization", a);
        }
        r.call()
    };
    let mut resp = resp.expect("an HTTP answer");
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_to_string().unwrap_or_default())
}

#[test]
fn admin_api_beyond_loopback_without_a_token_refuses_to_start() {
    // 192.0.2.1 (TEST-NET-1) is not on this machine: were the token check missing,
    // pcpd would fail to bind it instead — a different error. Nothing listens beyond
    // loopback either way.
    let ip = fresh_ip();
    let pcp = SocketAddr::new(IpAddr::V4(ip), free_port(ip, true));
    let out = Command::new(PCPD)
        .args(["--listen", &pcp.to_string(), "--admin", "192.0.2.1:8351"])
        .stdin(Stdio::null())
        .output()
        .expect("run pcpd");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("admin_token_file"), "{err}");
    assert!(!err.contains("cannot bind"), "{err}");
}

#[test]
fn admin_tokens_separate_reading_from_changing() {
    let dir = TempDir::new();
    let admin = token_file(&dir, "admin.token", ADMIN_TOKEN);
    let read = token_file(&dir, "read.token", READ_TOKEN);
    let d = pcpd(PCPD)
        .config(&honour_config(&format!(
            "[pcpd]\nadmin_token_file = \"{admin}\"\nadmin_read_token_file = \"{read}\"\n"
        )))
        .start();
    let a = d.admin;
    for path in ["/status", "/mappings", "/subscribers", "/metrics", "/ha"] {
        assert_eq!(
            call("GET", a, path, None).0,
            401,
            "GET {path} without a token"
        );
        assert_eq!(call("GET", a, path, Some("wrong-token-123456")).0, 401);
        assert_eq!(call("GET", a, path, Some(READ_TOKEN)).0, 200, "GET {path}");
        assert_eq!(call("GET", a, path, Some(ADMIN_TOKEN)).0, 200, "GET {path}");
    }
    for path in ["/reload", "/ha/promote", "/ha/switchover"] {
        assert_eq!(call("POST", a, path, None).0, 401, "POST {path}");
        assert_eq!(
            call("POST", a, path, Some(READ_TOKEN)).0,
            403,
            "POST {path} with the read-only token"
        );
    }
    let (status, body) = call("POST", a, "/reload", Some(ADMIN_TOKEN));
    assert_eq!(status, 200, "{body}");
    // The tokens never reach the log.
    let out = d.output();
    assert!(
        !out.contains(ADMIN_TOKEN) && !out.contains(READ_TOKEN),
        "{out}"
    );
}

#[test]
fn a_world_readable_token_file_is_refused() {
    let dir = TempDir::new();
    let admin = token_file(&dir, "admin.token", ADMIN_TOKEN);
    std::fs::set_permissions(&admin, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = dir.join("pcpd.toml");
    std::fs::write(&cfg, format!("[pcpd]\nadmin_token_file = \"{admin}\"\n")).unwrap();
    let ip = fresh_ip();
    let out = Command::new(PCPD)
        .arg("--config")
        .arg(&cfg)
        .args([
            "--listen",
            &SocketAddr::new(IpAddr::V4(ip), free_port(ip, true)).to_string(),
            "--admin",
            &SocketAddr::new(IpAddr::V4(ip), free_port(ip, false)).to_string(),
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run pcpd");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("every user"), "{err}");
}

/// A daemon on its own address whose one listen address answers only `allow`.
fn acl_daemon(allow: &str, reject: &str) -> Pcpd {
    let ip = fresh_ip();
    let port = free_port(ip, true);
    pcpd(PCPD)
        .at(ip)
        .pcp_port(port)
        .config(&honour_config(&format!(
            "[acl]\nreject = \"{reject}\"\n\n[[acl.listen]]\naddress = \"{ip}:{port}\"\nallow = [\"{allow}\"]\n"
        )))
        .start()
}

#[test]
fn access_lists_drop_other_clients_silently_and_count_them() {
    let ip = fresh_ip();
    let allowed = PcpClient::new(IpAddr::V4(ip), "0.0.0.0:9".parse().unwrap()).ip();
    let d = acl_daemon(&format!("{allowed}/32"), "drop");
    let ok = PcpClient::new(allowed, d.pcp);
    assert_eq!(ok.map(Map::udp(5000)).result, ResultCode::Success);
    let other = Ipv4Addr::new(ip.octets()[0], ip.octets()[1], ip.octets()[2], 99);
    let other = PcpClient::new(IpAddr::V4(other), d.pcp);
    for port in 6000..6005 {
        other.send(&other.map_request(Map::udp(port)));
    }
    assert!(
        other.recv_within(Duration::from_millis(500)).is_none(),
        "answered"
    );
    let key = format!("pcpd_acl_rejected_total{{listen=\"{}\"}}", d.pcp);
    wait_for(Duration::from_secs(2), "the refusals counted", || {
        (d.metric(&key) == Some(5.0)).then_some(())
    });
    assert_eq!(d.mappings().len(), 1, "nothing made for the refused client");
}

#[test]
fn access_lists_can_answer_not_authorized() {
    let ip = fresh_ip();
    let d = acl_daemon("127.0.0.250/32", "not_authorized");
    let other = PcpClient::new(IpAddr::V4(ip), d.pcp);
    let a = other.map(Map::udp(5000));
    assert_eq!(a.result, ResultCode::NotAuthorized);
    assert!(d.mappings().is_empty());
    let key = format!("pcpd_acl_rejected_total{{listen=\"{}\"}}", d.pcp);
    assert_eq!(d.metric(&key), Some(1.0));
}

#[test]
fn logs_and_metrics_reveal_no_flows_and_no_nonces() {
    // Everything pcpd and its libraries log at the most verbose level, while a client
    // makes, renews, checkpoints and deletes mappings and the operator reads the API.
    let d = pcpd(PCPD)
        .config(&honour_config(""))
        .env("RUST_LOG", "trace")
        .start();
    let ip = fresh_ip();
    let client_ip = Ipv4Addr::new(ip.octets()[0], ip.octets()[1], ip.octets()[2], 77);
    let c = PcpClient::new(IpAddr::V4(client_ip), d.pcp);
    let nonce = [
        0xa7, 0x3c, 0x51, 0xe9, 0x0b, 0xd4, 0x62, 0xf8, 0x1d, 0x9e, 0x47, 0xc2,
    ];
    let mut m = Map::udp(47_123);
    m.nonce = nonce;
    assert!(c.map(m).checkpoint_echoed);
    assert!(c.map(m).checkpoint_echoed);
    let mut plain = Map::udp(47_124).without_checkpoint();
    plain.nonce = nonce;
    c.map(plain);
    // A request the core refuses (another nonce for the same mapping).
    let mut thief = m;
    thief.nonce[0] ^= 1;
    assert_eq!(c.map(thief).result, ResultCode::NotAuthorized);
    let mut del = m;
    del.lifetime = 0;
    c.map(del);
    // The operator's view has the detail (that is where it belongs)...
    let metrics = d.get("/metrics");
    let _ = d.get("/mappings");
    std::thread::sleep(Duration::from_millis(300));
    let out = d.output();
    assert!(out.contains("TRACE") || out.contains("DEBUG") || out.contains("INFO"));
    // ...but neither the log nor the metrics name the client, its ports or its nonce.
    let hex: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
    let dec = format!("{:?}", nonce); // [167, 60, …]
    for (what, text) in [("log", &out), ("metrics", &metrics)] {
        for needle in [
            client_ip.to_string(),
            "47123".to_string(),
            "47124".to_string(),
            hex.clone(),
            dec.clone(),
            dec.replace(' ', ""),
        ] {
            assert!(
                !text.contains(&needle),
                "the {what} reveals {needle}:\n{text}"
            );
        }
    }
}
