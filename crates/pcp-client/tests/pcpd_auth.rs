//! Every client API authenticating (RFC 7652, EAP-TTLS/PAP) against the real `pcpd`
//! with `[auth]` required and the embedded back end (a generated CA and server
//! certificate, an Argon2 credentials file), over loopback: the blocking client (success,
//! wrong password, no authentication, a bad CA), the async client giving up on a silent
//! server after the PA MRD, and the async client through a
//! re-authentication and a pcpd restart that loses the session.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pcp_client::Error;
use pcp_client::core::{
    AuthFailure, Authentication, Event, LostReason, MappingRequest, RetransmitConfig, SessionEnd,
};
use pcp_client::tokio::ClientOptions;
use pcp_proto::ResultCode;
use pcp_testkit::TempDir;
use pcp_testkit::eap::{AuthFiles, PASSWORD, users_line};
use pcp_testkit::pcpd::{Pcpd, short_lifetime_config, wait_until};
use pcp_testkit::ports::fresh_ip;

const UDP: u8 = 17;
const T: Duration = Duration::from_secs(30);

/// A directory with the CA, pcpd's certificate for `pcp.example`, its key and alice's
/// credentials; removed on drop.
struct Files {
    dir: TempDir,
    auth: AuthFiles,
}

impl Files {
    fn new() -> Files {
        let dir = TempDir::new();
        let auth = AuthFiles::write(
            &dir.0,
            "pcp.example",
            &users_line("alice", PASSWORD.as_bytes()),
        );
        Files { dir, auth }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// pcpd's configuration: authentication required for everyone.
    fn config(&self, session_lifetime: u32) -> String {
        short_lifetime_config(&format!(
            "{}session_lifetime = {session_lifetime}\n",
            self.auth.section("required")
        ))
    }
}

fn auth(ca: &Path, password: &[u8]) -> Authentication {
    Authentication::ttls("alice", password, ca, "pcp.example").unwrap()
}

fn opts(p: &Pcpd, a: Option<Authentication>) -> ClientOptions {
    let mut o = ClientOptions::new(p.pcp)
        .bind(SocketAddr::new(IpAddr::V4(p.ip), 0))
        .retransmit(RetransmitConfig {
            irt: Duration::from_millis(300),
            ..RetransmitConfig::default()
        });
    o.authentication = a.map(|a| {
        a.retransmit(pcp_auth::RetransmitConfig {
            irt: Duration::from_millis(500),
            ..pcp_auth::RetransmitConfig::default()
        })
    });
    o
}

#[test]
fn blocking_client_authenticates_and_tags_every_request() {
    use pcp_client::blocking::PcpClient;
    let f = Files::new();
    let p = Pcpd::start(&f.config(600));
    let ca = f.path("ca.pem");

    let client =
        PcpClient::connect(opts(&p, Some(auth(&ca, b"correct horse")))).expect("authenticated");
    client.authenticated(Some(T)).expect("an SA in place");
    let mut m = client
        .map(MappingRequest::map(UDP, 6000).lifetime(600))
        .unwrap();
    let g = m.granted(Some(T)).expect("a tagged MAP is served");
    assert_ne!(g.external.port(), 0);
    let view = p.find_mapping(6000).expect("the mapping is on the server");
    assert_eq!(view["subscriber"], "identity:alice", "{view}");
    // A delete is tagged too.
    assert!(m.delete().unwrap(), "delete confirmed");
    assert!(wait_until(T, || p.find_mapping(6000).is_none()));
    // Dropping the client ends its session at the server (SESSION_TERMINATED).
    assert!(!p.output().contains("ByClient"));
    drop(client);
    assert!(
        wait_until(T, || p.output().contains("ByClient")),
        "{}",
        p.output()
    );

    // Wrong password: connect fails with the server's verdict.
    let e = PcpClient::connect(opts(&p, Some(auth(&ca, b"wrong")))).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Authentication(pcp_auth::client::Failure::AuthenticationFailed)
        ),
        "{e}"
    );

    // No authentication: the server says AUTHENTICATION_REQUIRED.
    let plain = PcpClient::connect(opts(&p, None)).unwrap();
    let mut m = plain.map(MappingRequest::map(UDP, 6001)).unwrap();
    match m.granted(Some(T)) {
        Err(Error::Refused { result }) => assert_eq!(result, ResultCode::AuthenticationRequired),
        other => panic!("{other:?}"),
    }

    // A CA that did not sign the server's certificate: the TLS tunnel is refused.
    let other = Files::new();
    let e = PcpClient::connect(opts(
        &p,
        Some(auth(&other.path("ca.pem"), b"correct horse")),
    ))
    .unwrap_err();
    assert!(
        matches!(e, Error::Authentication(pcp_auth::client::Failure::Eap)),
        "{e}"
    );
    assert_eq!(p.mappings().len(), 0, "{:?}", p.mappings());
}

#[test]
fn ttls_setup_errors_name_the_file_and_the_name() {
    let f = Files::new();
    let bad = f.path("bad.pem");
    std::fs::write(&bad, "not a certificate\n").unwrap();
    let e = Authentication::ttls("alice", b"pw", &bad, "pcp.example").unwrap_err();
    assert!(e.to_string().contains("bad.pem"), "{e}");
    let e = Authentication::ttls("alice", b"pw", f.path("missing.pem"), "pcp.example").unwrap_err();
    assert!(e.to_string().contains("missing.pem"), "{e}");
    let e = Authentication::ttls("alice", b"pw", f.path("ca.pem"), "not a name!").unwrap_err();
    assert!(e.to_string().contains("not a name!"), "{e}");
}

/// Waits for a client-wide event matching `f`.
async fn until_event(
    rx: &mut tokio::sync::broadcast::Receiver<Event>,
    seen: &mut Vec<Event>,
    f: impl Fn(&Event) -> bool,
) {
    let deadline = Instant::now() + T;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Ok(e)) => {
                let hit = f(&e);
                seen.push(e);
                if hit {
                    return;
                }
            }
            Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
            other => panic!("no such event within {T:?} ({other:?}); seen {seen:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_client_reauthenticates_and_recovers_from_a_pcpd_restart() {
    use pcp_client::tokio::PcpClient;
    let f = Files::new();
    // 6 s sessions: re-authentication at 4.8 s.
    let config = f.config(6);
    let mut p = Pcpd::start(&config);
    let client = PcpClient::connect(opts(&p, Some(auth(&f.path("ca.pem"), b"correct horse"))))
        .await
        .expect("authenticated");
    let mut events = client.subscribe();
    let mut seen = Vec::new();
    let mut m = client
        .map(MappingRequest::map(UDP, 7000).lifetime(8))
        .await
        .unwrap();
    let first = m.granted().await.unwrap();
    until_event(&mut events, &mut seen, |e| {
        matches!(
            e,
            Event::Authenticated {
                reauthentication: true,
                ..
            }
        )
    })
    .await;
    // Renewals verify under the new key.
    let deadline = Instant::now() + T;
    loop {
        let e = tokio::time::timeout(T, m.next_event())
            .await
            .unwrap()
            .unwrap();
        assert!(!matches!(e, Event::Lost { .. }), "{e:?}");
        if matches!(e, Event::Renewed { .. }) {
            break;
        }
        assert!(Instant::now() < deadline);
    }

    // pcpd restarts: its sessions and mappings are gone. The next renewal is answered
    // UNKNOWN_SESSION_ID; the client authenticates again and re-creates the mapping.
    let at = p.pcp;
    p.kill9();
    let p = tokio::task::spawn_blocking(move || Pcpd::start_at(at, &config))
        .await
        .unwrap();
    until_event(&mut events, &mut seen, |e| {
        *e == Event::SessionEnded {
            reason: SessionEnd::Lost,
        }
    })
    .await;
    until_event(&mut events, &mut seen, |e| {
        matches!(
            e,
            Event::Authenticated {
                reauthentication: false,
                ..
            }
        )
    })
    .await;
    let deadline = Instant::now() + T;
    loop {
        let e = tokio::time::timeout(T, m.next_event())
            .await
            .unwrap()
            .unwrap();
        match e {
            Event::Granted { grant, .. } => {
                assert_eq!(grant.external.ip(), first.external.ip());
                break;
            }
            Event::Lost {
                reason: LostReason::Refused(r),
                ..
            } => panic!("refused {r:?}; seen {seen:?}"),
            Event::AuthenticationFailed { failure } => {
                assert_eq!(failure, AuthFailure::Timeout, "{seen:?}")
            }
            _ => {}
        }
        assert!(Instant::now() < deadline, "{seen:?}");
    }
    let view = tokio::task::spawn_blocking(move || p.find_mapping(7000))
        .await
        .unwrap();
    assert_eq!(view.expect("re-created")["subscriber"], "identity:alice");
}

/// A server that never answers PA messages: `connect` gives up after the PA MRD.
#[tokio::test]
async fn connect_gives_up_after_the_pa_mrd() {
    use pcp_client::tokio::PcpClient;
    let f = Files::new();
    let ip = fresh_ip();
    let silent = std::net::UdpSocket::bind((ip, 0)).unwrap();
    let server = silent.local_addr().unwrap();
    let a = auth(&f.path("ca.pem"), b"pw").retransmit(pcp_auth::RetransmitConfig {
        irt: Duration::from_millis(200),
        mrt: Duration::from_secs(1),
        mrd: Duration::from_secs(2),
    });
    let mut o = ClientOptions::new(server).bind(SocketAddr::new(IpAddr::V4(ip), 0));
    o.authentication = Some(a);
    let started = Instant::now();
    let e = PcpClient::connect(o).await.unwrap_err();
    assert!(
        matches!(e, Error::Authentication(pcp_auth::client::Failure::Timeout)),
        "{e}"
    );
    let took = started.elapsed();
    assert!((Duration::from_millis(1900)..T).contains(&took), "{took:?}");
    // The PA-Initiation was retransmitted meanwhile.
    silent.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 1100];
    let mut n = 0;
    while silent.recv_from(&mut buf).is_ok() {
        n += 1;
    }
    assert!(n >= 3, "{n} PA messages");
}
