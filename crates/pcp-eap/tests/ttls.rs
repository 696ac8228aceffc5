//! EAP-TTLS/PAP end to end with generated certificates: EAP alone (both sides derive the
//! same MSK), then a full PCP client ↔ server PA session in memory over `pcp-auth`, on a
//! perfect and on a lossy network, and every way it must fail.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use pcp_auth::Time;
use pcp_auth::client::{Client, ClientConfig, ClientEvent, Failure};
use pcp_auth::eap::{AuthStep, EapAuthenticator, EapPeer, PeerStep};
use pcp_auth::server::{Cause, Check, Server, ServerConfig, ServerEvent};
use pcp_eap::{Embedded, TtlsAuthenticator, TtlsPeer};
use pcp_proto::MAX_MESSAGE_LEN;
use pcp_testkit::eap::{embedded, ttls_peer, users_line};
use pcp_testkit::pcp::tcp_map_request;
use pcp_testkit::tls::Pki;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rustls::pki_types::CertificateDer;

const CLIENT_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));
const CLIENT: SocketAddr = SocketAddr::new(CLIENT_IP, 5350);

/// A CA and a server certificate for `name` (and 60 filler names, so that the server's
/// certificate flight needs several EAP-TTLS fragments, as a real chain does).
fn make_pki(name: &str) -> Pki {
    Pki::large(name, 60, "pcp.example")
}

fn peer(ca: &CertificateDer<'static>, name: &str, password: &str) -> TtlsPeer {
    ttls_peer(ca, name, "alice", password.as_bytes())
}

/// Runs EAP between the two until one side ends; returns the authenticator's last step
/// and how many requests it sent.
fn eap(auth: &mut TtlsAuthenticator, peer: &mut TtlsPeer) -> (AuthStep, PeerStep, usize) {
    let mut req = auth.start();
    for n in 1..200 {
        assert!(
            req.len() <= pcp_auth::eap::MAX_EAP_PACKET,
            "request of {}",
            req.len()
        );
        match peer.receive(&req) {
            PeerStep::Respond(resp) => {
                assert!(resp.len() <= pcp_auth::eap::MAX_EAP_PACKET);
                match auth.receive(&resp) {
                    AuthStep::Request(r) => req = r,
                    AuthStep::Discard | AuthStep::Pending => {
                        panic!("authenticator discarded a response")
                    }
                    end @ (AuthStep::Success { .. } | AuthStep::Failure { .. }) => {
                        let packet = match &end {
                            AuthStep::Success { packet, .. } | AuthStep::Failure { packet } => {
                                packet.clone()
                            }
                            _ => unreachable!(),
                        };
                        return (end, peer.receive(&packet), n);
                    }
                }
            }
            other => return (AuthStep::Discard, other, n),
        }
    }
    panic!("EAP did not end");
}

#[test]
fn eap_ttls_pap_derives_the_same_msk_on_both_sides() {
    let pki = make_pki("pcp.example");
    let backend = embedded(&pki);
    let mut auth = backend.authenticator();
    let mut p = peer(&pki.ca, "pcp.example", "correct horse");
    let (end, peer_end, requests) = eap(&mut auth, &mut p);
    let AuthStep::Success { msk, identity, .. } = end else {
        panic!("not authenticated: {end:?}");
    };
    assert_eq!(peer_end, PeerStep::Success);
    assert_eq!(identity, "alice");
    assert_eq!(msk.len(), 64);
    assert_eq!(p.msk(), Some(msk.clone()));
    // The certificate flight does not fit one PA message: it went in fragments.
    assert!(requests > 5, "only {requests} requests: no fragmentation?");

    // Another conversation gives another MSK.
    let mut auth2 = backend.authenticator();
    p.restart();
    let (end2, _, _) = eap(&mut auth2, &mut p);
    let AuthStep::Success { msk: msk2, .. } = end2 else {
        panic!()
    };
    assert_ne!(msk, msk2);
}

#[test]
fn wrong_password_unknown_user_and_untrusted_or_misnamed_server_fail() {
    let pki = make_pki("pcp.example");
    let backend = embedded(&pki);
    let (end, peer_end, _) = eap(
        &mut backend.authenticator(),
        &mut peer(&pki.ca, "pcp.example", "nope"),
    );
    assert!(matches!(end, AuthStep::Failure { .. }));
    assert_eq!(peer_end, PeerStep::Failure);
    // A peer that trusts another CA refuses the server's certificate.
    let other = make_pki("pcp.example");
    let (_, peer_end, _) = eap(
        &mut backend.authenticator(),
        &mut peer(&other.ca, "pcp.example", "correct horse"),
    );
    assert_eq!(peer_end, PeerStep::Failure);
    // Or a certificate for another name.
    let (_, peer_end, _) = eap(
        &mut backend.authenticator(),
        &mut peer(&pki.ca, "other.example", "correct horse"),
    );
    assert_eq!(peer_end, PeerStep::Failure);
}

#[test]
fn embedded_backend_loads_pem_files_and_names_bad_ones() {
    let pki = make_pki("pcp.example");
    let dir = std::env::temp_dir().join(format!("pcp-eap-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let creds = dir.join("users");
    std::fs::write(&cert, &pki.cert_pem).unwrap();
    std::fs::write(&key, &pki.key_pem).unwrap();
    std::fs::write(&creds, users_line("alice", b"correct horse")).unwrap();
    let backend = Embedded::load(&cert, &key, &creds).unwrap();
    let (end, _, _) = eap(
        &mut backend.authenticator(),
        &mut peer(&pki.ca, "pcp.example", "correct horse"),
    );
    assert!(matches!(end, AuthStep::Success { .. }));
    std::fs::write(&creds, "alice:not-a-hash\n").unwrap();
    let e = Embedded::load(&cert, &key, &creds).unwrap_err().to_string();
    assert!(e.contains("users:1"), "{e}");
    let e = Embedded::load(&dir.join("missing.pem"), &key, &creds)
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.pem"), "{e}");
    let _ = pki.ca_pem;
    std::fs::remove_dir_all(&dir).unwrap();
}

type Srv = Server<TtlsAuthenticator, Box<dyn FnMut() -> TtlsAuthenticator>>;

/// A PCP client and server authenticating with EAP-TTLS over a network that loses
/// `loss` of the datagrams; returns both sides' events and the pair.
fn pcp_session(
    seed: u64,
    loss: f64,
    password: &str,
) -> (Vec<ClientEvent>, Vec<ServerEvent>, Client<TtlsPeer>, Srv) {
    let pki = make_pki("pcp.example");
    let backend = embedded(&pki);
    let mut client = Client::with_rng(
        ClientConfig::new(CLIENT_IP),
        peer(&pki.ca, "pcp.example", password),
        StdRng::seed_from_u64(seed),
    );
    let mut server: Srv = Server::with_rng(
        ServerConfig::default(),
        Box::new(move || backend.authenticator()),
        StdRng::seed_from_u64(!seed),
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let mut now = Time(1_000);
    let mut q: Vec<(Time, bool, Vec<u8>)> = Vec::new();
    let (mut ce, mut se) = (Vec::new(), Vec::new());
    client.start(now);
    for _ in 0..100_000 {
        while let Some(m) = client.poll_transmit() {
            assert!(m.len() <= MAX_MESSAGE_LEN);
            if !rng.random_bool(loss) {
                q.push((Time(now.0 + rng.random_range(1..500)), true, m));
            }
        }
        while let Some(t) = server.poll_transmit() {
            assert!(t.payload.len() <= MAX_MESSAGE_LEN);
            if !rng.random_bool(loss) {
                q.push((Time(now.0 + rng.random_range(1..500)), false, t.payload));
            }
        }
        ce.extend(std::iter::from_fn(|| client.poll_event()));
        se.extend(std::iter::from_fn(|| server.poll_event()));
        let next = [
            q.iter().map(|(t, _, _)| *t).min(),
            client.poll_timeout(),
            server.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min();
        let Some(next) = next.filter(|t| t.0 < 300_000) else {
            break;
        };
        now = now.max(next);
        let (due, rest): (Vec<_>, Vec<_>) = q.into_iter().partition(|(t, _, _)| *t <= now);
        q = rest;
        for (_, to_server, m) in due {
            if to_server {
                server.handle(now, CLIENT, &m);
            } else {
                client.handle(now, &m);
            }
        }
        client.handle_timeout(now);
        server.handle_timeout(now);
        if client.is_established() && q.is_empty() && !ce.is_empty() && !se.is_empty() {
            break;
        }
    }
    ce.extend(std::iter::from_fn(|| client.poll_event()));
    se.extend(std::iter::from_fn(|| server.poll_event()));
    (ce, se, client, server)
}

fn tagged_map(client: &mut Client<TtlsPeer>, server: &mut Srv) -> Check {
    let (mut buf, n) = tcp_map_request(CLIENT_IP, 22, 3600);
    let n = client.protect(Time(0), &mut buf, n).unwrap();
    server.check_request(CLIENT_IP, &buf[..n])
}

#[test]
fn pcp_client_and_server_authenticate_with_eap_ttls_and_tag_a_map() {
    let (ce, se, mut client, mut server) = pcp_session(1, 0.0, "correct horse");
    assert!(
        matches!(ce[..], [ClientEvent::Established { lifetime: 3600, .. }]),
        "{ce:?}"
    );
    assert!(
        matches!(&se[..], [ServerEvent::Established { identity, .. }] if &**identity == "alice"),
        "{se:?}"
    );
    // The first tagged MAP verifies: both sides derived the same MSK and key.
    assert!(matches!(
        tagged_map(&mut client, &mut server),
        Check::Authenticated { .. }
    ));
}

#[test]
fn pcp_with_eap_ttls_over_a_lossy_network() {
    for seed in 0..6 {
        let (ce, _, mut client, mut server) = pcp_session(seed, 0.15, "correct horse");
        assert!(client.is_established(), "seed {seed}: {ce:?}");
        assert!(
            matches!(
                tagged_map(&mut client, &mut server),
                Check::Authenticated { .. }
            ),
            "seed {seed}"
        );
    }
}

#[test]
fn pcp_with_eap_ttls_wrong_password() {
    let (ce, se, client, server) = pcp_session(2, 0.0, "wrong");
    assert_eq!(ce, [ClientEvent::Failed(Failure::AuthenticationFailed)]);
    assert!(matches!(
        se[..],
        [ServerEvent::Ended {
            cause: Cause::AuthenticationFailed,
            ..
        }]
    ));
    assert!(!client.is_established());
    assert_eq!(server.session_count(), 0);
}
