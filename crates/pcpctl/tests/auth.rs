//! `pcpctl auth sessions` / `pcpctl auth terminate` against a real `pcpd` with
//! `[auth] default = "required"`, a client authenticated with EAP-TTLS/PAP (pcp-auth +
//! pcp-eap over loopback UDP), and the admin and read-only tokens.

mod support;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use pcp_auth::Time;
use pcp_auth::client::{Client, ClientConfig, ClientEvent};
use pcp_testkit::eap::{AuthFiles, ttls_peer, users_line};
use support::{pcpctl, start};

#[test]
fn auth_sessions_and_terminate() {
    let dir = pcp_testkit::TempDir::new();
    let files = AuthFiles::write(&dir.0, "pcp.example", &users_line("alice", b"pw"));
    let token = |name: &str, t: &str| {
        let p = dir.join(name);
        std::fs::write(&p, format!("{t}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p.display().to_string()
    };
    let admin = token("admin.token", "pcpctl-auth-admin-0123456789");
    let read = token("read.token", "pcpctl-auth-read-0123456789");
    let d = start(Some(&format!(
        "[pcpd]\nadmin_token_file = \"{admin}\"\nadmin_read_token_file = \"{read}\"\n\n{}session_lifetime = 900\n",
        files.section("required")
    )));

    let (code, out, err) = pcpctl(&d, &["--token-file", &read, "auth", "sessions"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(out, "no PCP authentication sessions\n");

    // Alice authenticates.
    let ip = IpAddr::V4(d.ip);
    let sock = UdpSocket::bind(SocketAddr::new(ip, 0)).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let peer = ttls_peer(&files.ca_der, "pcp.example", "alice", b"pw");
    let mut client = Client::new(ClientConfig::new(ip), peer);
    let origin = Instant::now();
    let now = || Time(origin.elapsed().as_millis() as u64);
    client.start(now());
    let mut buf = [0u8; 2048];
    let event = loop {
        assert!(origin.elapsed() < Duration::from_secs(20), "no outcome");
        while let Some(m) = client.poll_transmit() {
            sock.send_to(&m, d.pcp).unwrap();
        }
        if let Some(e) = client.poll_event() {
            break e;
        }
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            client.handle(now(), &buf[..n]);
        }
        client.handle_timeout(now());
    };
    assert!(
        matches!(event, ClientEvent::Established { .. }),
        "{event:?}"
    );
    let id = pcp_testkit::wait_for(Duration::from_secs(5), "the session established", || {
        let (_, out, _) = pcpctl(&d, &["--token-file", &read, "auth", "sessions", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        let s = v.as_array()?.first()?.clone();
        (s["state"] == "established").then(|| s["session_id"].as_u64().unwrap())
    });

    let (code, out, err) = pcpctl(&d, &["--token-file", &read, "auth", "sessions"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let local = sock.local_addr().unwrap().to_string();
    let row = out.lines().nth(1).unwrap_or_default();
    for want in [
        id.to_string().as_str(),
        "alice",
        &local,
        "established",
        "ago",
        "in 14m",
    ] {
        assert!(row.contains(want), "{want:?} missing in\n{out}");
    }
    assert!(out.ends_with("1 session\n"), "{out}");

    // Terminating needs the admin token; an unknown ID is refused with pcpd's reason.
    let sid = id.to_string();
    let (code, _, err) = pcpctl(&d, &["--token-file", &read, "auth", "terminate", &sid]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("403"), "{err}");
    let other = (id ^ 1).to_string();
    let (code, _, err) = pcpctl(&d, &["--token-file", &admin, "auth", "terminate", &other]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&format!("no PA session {other}")), "{err}");
    let (code, out, err) = pcpctl(&d, &["--token-file", &admin, "auth", "terminate", &sid]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("SESSION_TERMINATED") && out.contains("alice"),
        "{out}"
    );
    // The client hears it.
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut ended = false;
    while Instant::now() < deadline && !ended {
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            client.handle(now(), &buf[..n]);
        }
        ended =
            std::iter::from_fn(|| client.poll_event()).any(|e| matches!(e, ClientEvent::Ended(_)));
    }
    assert!(ended, "no SESSION_TERMINATED at the client");
}
