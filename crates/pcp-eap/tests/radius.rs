//! RADIUS pass-through against an AAA server in this process, on loopback UDP: our
//! RADIUS front end (`radius::server`: State, EAP-Message split at 253 octets,
//! Message-Authenticator, MSK in MS-MPPE-Recv/Send-Key) of the embedded EAP-TTLS
//! server, and a PCP client authenticates through `pcp-auth`'s server with
//! [`RadiusAuthenticator`]. The AAA side checks every request's Message-Authenticator
//! with its own HMAC-MD5 code first.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use md5::Md5;
use pcp_auth::Time;
use pcp_auth::client::{Client, ClientConfig, ClientEvent};
use pcp_auth::eap::{AuthStep, EapAuthenticator};
use pcp_auth::server::{Check, Server, ServerConfig, ServerEvent};
use pcp_eap::radius::server::{Outcome, RadiusServer, RadiusServerConfig};
use pcp_eap::radius::{self, RadiusAuthenticator, RadiusClient, RadiusConfig, RadiusError};
use pcp_eap::{Embedded, TtlsPeer};
use pcp_testkit::eap::{embedded, ttls_peer};
use pcp_testkit::pcp::tcp_map_request;
use pcp_testkit::tls::Pki;
use rustls::pki_types::CertificateDer;

const CLIENT_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));
const CLIENT: SocketAddr = SocketAddr::new(CLIENT_IP, 5350);
const SECRET: &[u8] = b"s3cret-shared";

/// What the fake saw.
#[derive(Default)]
struct Seen {
    requests: AtomicUsize,
    split: AtomicUsize,
    /// Milliseconds the fake takes to answer its first request (a slow AAA server).
    delay_first_ms: std::sync::atomic::AtomicU64,
}

/// The fake AAA server: our RADIUS front end (`radius::server`) of the embedded
/// EAP-TTLS back end, until the process ends. It first checks each request's
/// Message-Authenticator with its own HMAC-MD5 code (a wrong one is silently dropped,
/// as a real server does), and ignores the first `drop_first` requests (to exercise
/// retransmission).
fn fake_radius(
    backend: Embedded,
    secret: &'static [u8],
    drop_first: usize,
    seen: Arc<Seen>,
) -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let addr = sock.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut server = RadiusServer::new(RadiusServerConfig::new(secret.to_vec()), backend);
        let origin = Instant::now();
        let mut buf = [0u8; 4096];
        let mut dropped = 0;
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let p = &buf[..n];
            // Independent check of the request's Message-Authenticator.
            let mut attrs = Vec::new();
            let mut i = 20;
            while i < n {
                attrs.push((i, p[i], p[i + 2..i + usize::from(p[i + 1])].to_vec()));
                i += usize::from(p[i + 1]);
            }
            let (ma_at, _, ma) = attrs.iter().find(|a| a.1 == 80).expect("MA sent").clone();
            let mut z = p.to_vec();
            z[ma_at + 2..ma_at + 18].fill(0);
            let mut m = <Hmac<Md5> as KeyInit>::new_from_slice(secret).unwrap();
            m.update(&z);
            if m.verify_slice(&ma).is_err() {
                continue; // as a real server: silently dropped
            }
            seen.requests.fetch_add(1, Ordering::SeqCst);
            if dropped < drop_first {
                dropped += 1;
                continue;
            }
            assert!(attrs.iter().filter(|a| a.1 == 79).all(|a| a.2.len() <= 253));
            let delay = seen.delay_first_ms.swap(0, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(delay));
            let now = origin.elapsed().as_millis() as u64;
            let Outcome::Reply { reply, .. } = server.handle(now, from, p) else {
                continue;
            };
            let eap_parts = radius::wire::Parsed::parse(&reply)
                .unwrap()
                .attributes
                .iter()
                .filter(|a| a.1 == radius::ATTR_EAP_MESSAGE)
                .count();
            if eap_parts > 1 {
                seen.split.fetch_add(1, Ordering::SeqCst);
            }
            let _ = sock.send_to(&reply, from);
        }
    });
    addr
}

/// A CA and a large certificate for `aaa.example` (several EAP-TTLS fragments, each
/// several EAP-Message attributes), and the embedded back end with alice.
fn pki() -> (CertificateDer<'static>, Embedded) {
    let pki = Pki::large("aaa.example", 40, "aaa.example");
    (pki.ca.clone(), embedded(&pki))
}

type Srv = Server<RadiusAuthenticator, Box<dyn FnMut() -> RadiusAuthenticator>>;

struct Run {
    client_events: Vec<ClientEvent>,
    server_events: Vec<ServerEvent>,
    errors: Vec<RadiusError>,
    client: Client<TtlsPeer>,
    server: Srv,
}

/// A PCP client and server (RADIUS back end at `aaa`) until the client has an outcome.
fn run(aaa: SocketAddr, secret: &[u8], ca: &CertificateDer<'static>, password: &str) -> Run {
    run_with(aaa, secret, ca, password, &Paced::default())
}

/// How [`run_with`] paces the exchange, and what it counted.
#[derive(Default)]
struct Paced {
    /// The client's initial retransmission time (RFC 6887's 3 s when `None`).
    irt: Option<Duration>,
    /// RADIUS timeout (300 ms when `None`).
    radius_timeout_ms: Option<u64>,
    /// Drop the server's PA-Acknowledgements before the client sees them.
    drop_acks: bool,
    /// PA-Acknowledgements the server sent.
    acks: std::cell::Cell<usize>,
    /// PA-Client messages the client sent again (bitwise copies).
    client_copies: std::cell::Cell<usize>,
}

/// [`run`] with the pacing of `p`.
fn run_with(
    aaa: SocketAddr,
    secret: &[u8],
    ca: &CertificateDer<'static>,
    password: &str,
    p: &Paced,
) -> Run {
    let cfg = Arc::new(RadiusConfig {
        server: aaa.to_string(),
        secret: secret.to_vec(),
        nas_identifier: "pcpd-test".into(),
        timeout_ms: p.radius_timeout_ms.unwrap_or(300),
        tries: 3,
    });
    let peer = ttls_peer(ca, "aaa.example", "alice", password.as_bytes());
    let mut ccfg = ClientConfig::new(CLIENT_IP);
    if let Some(irt) = p.irt {
        ccfg.retransmit.irt = irt;
    }
    let mut client = Client::new(ccfg, peer);
    let mut sent: Vec<Vec<u8>> = Vec::new();
    let c2 = cfg.clone();
    let mut server: Srv = Server::new(
        ServerConfig::default(),
        Box::new(move || RadiusAuthenticator::new(c2.clone())),
    );
    let mut rc = RadiusClient::new(cfg);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let origin = Instant::now();
    let now = || Time(origin.elapsed().as_millis() as u64);
    let (mut ce, mut se, mut errors) = (Vec::new(), Vec::new(), Vec::new());
    client.start(now());
    let mut buf = [0u8; 4096];
    while origin.elapsed() < Duration::from_secs(30) {
        while let Some(m) = client.poll_transmit() {
            if sent.contains(&m) {
                p.client_copies.set(p.client_copies.get() + 1);
            } else {
                sent.push(m.clone());
            }
            server.handle(now(), CLIENT, &m);
        }
        while let Some(t) = server.poll_transmit() {
            let is_ack = pcp_proto::Response::parse(&t.payload)
                .is_ok_and(|r| r.options.received_pak().is_some());
            if is_ack {
                p.acks.set(p.acks.get() + 1);
                if p.drop_acks {
                    continue;
                }
            }
            client.handle(now(), &t.payload);
        }
        while let Some(id) = server.poll_backend() {
            let req = server
                .authenticator_mut(id)
                .unwrap()
                .take_request()
                .unwrap();
            let bytes = rc.send(id, &req, now().0).unwrap();
            sock.send_to(&bytes, aaa).unwrap();
        }
        ce.extend(std::iter::from_fn(|| client.poll_event()));
        se.extend(std::iter::from_fn(|| server.poll_event()));
        if !ce.is_empty() {
            // Let the confirmation reach the server.
            while let Some(m) = client.poll_transmit() {
                server.handle(now(), CLIENT, &m);
            }
            se.extend(std::iter::from_fn(|| server.poll_event()));
            break;
        }
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            match rc.receive(&buf[..n]) {
                Ok(Some((id, answer))) => {
                    if let Err(e) = &answer {
                        errors.push(e.clone());
                    }
                    server.resume(now(), id, |a| a.answer(answer))
                }
                Ok(None) => {}
                Err(e) => errors.push(e),
            }
        }
        let (again, failed) = rc.handle_timeout(now().0);
        for b in again {
            sock.send_to(&b, aaa).unwrap();
        }
        for (id, e) in failed {
            if let Err(x) = &e {
                errors.push(x.clone());
            }
            server.resume(now(), id, |a| a.answer(e));
        }
        client.handle_timeout(now());
        server.handle_timeout(now());
    }
    Run {
        client_events: ce,
        server_events: se,
        errors,
        client,
        server,
    }
}

fn tagged_map_checks(r: &mut Run) -> Check {
    let (mut buf, n) = tcp_map_request(CLIENT_IP, 22, 3600);
    let n = r.client.protect(Time(0), &mut buf, n).unwrap();
    r.server.check_request(CLIENT_IP, &buf[..n])
}

#[test]
fn eap_ttls_through_radius_gives_both_sides_the_same_msk() {
    let (ca, backend) = pki();
    let seen = Arc::new(Seen::default());
    // The first request is lost: the client retransmits it unchanged.
    let aaa = fake_radius(backend, SECRET, 1, seen.clone());
    let mut r = run(aaa, SECRET, &ca, "correct horse");
    assert!(
        matches!(r.client_events[..], [ClientEvent::Established { .. }]),
        "{:?} {:?}",
        r.client_events,
        r.errors
    );
    assert!(
        matches!(&r.server_events[..], [ServerEvent::Established { identity, .. }] if &**identity == "alice"),
        "{:?}",
        r.server_events
    );
    // The MSK came from MS-MPPE-Recv-Key || MS-MPPE-Send-Key: the tag verifies.
    assert!(matches!(
        tagged_map_checks(&mut r),
        Check::Authenticated { .. }
    ));
    assert!(
        seen.split.load(Ordering::SeqCst) > 0,
        "the certificate flight needs several EAP-Message attributes, joined again"
    );
    assert!(r.errors.is_empty(), "{:?}", r.errors);
}

#[test]
fn wrong_password_is_rejected_through_radius() {
    let (ca, backend) = pki();
    let seen = Arc::new(Seen::default());
    let aaa = fake_radius(backend, SECRET, 0, seen.clone());
    let r = run(aaa, SECRET, &ca, "wrong");
    assert!(
        matches!(r.client_events[..], [ClientEvent::Failed(_)]),
        "{:?}",
        r.client_events
    );
    // Refused by the AAA server's Access-Reject after the whole TTLS exchange, not
    // by a timeout.
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(seen.requests.load(Ordering::SeqCst) > 4);
    assert!(
        r.server_events
            .iter()
            .all(|e| !matches!(e, ServerEvent::Established { .. }))
    );
}

#[test]
fn wrong_shared_secret_times_out_with_an_error_naming_the_fix() {
    let (ca, backend) = pki();
    let seen = Arc::new(Seen::default());
    let aaa = fake_radius(backend, SECRET, 0, seen.clone());
    let r = run(aaa, b"not-the-secret", &ca, "correct horse");
    assert!(
        matches!(r.client_events[..], [ClientEvent::Failed(_)]),
        "{:?}",
        r.client_events
    );
    assert_eq!(
        seen.requests.load(Ordering::SeqCst),
        0,
        "the fake dropped them all"
    );
    let msg = r
        .errors
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        matches!(r.errors[..], [RadiusError::Timeout { tries: 3, .. }]),
        "{msg}"
    );
    assert!(msg.contains("shared secret"), "{msg}");
}

#[test]
fn responses_failing_verification_are_dropped() {
    let auth = [7u8; 16];
    let good = radius::encode_response(11, 1, &auth, &[(79, vec![1, 2, 0, 5, 1])], SECRET);
    assert!(radius::decode_response(&good, &auth, SECRET).is_ok());
    assert_eq!(
        radius::decode_response(&good, &auth, b"other"),
        Err("Response Authenticator does not verify")
    );
    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    assert!(radius::decode_response(&flipped, &auth, SECRET).is_err());
    // Without a Message-Authenticator (Response Authenticator fixed up): refused.
    let mut p = vec![11, 1, 0, 0];
    p.extend_from_slice(&auth);
    p.extend_from_slice(&[79, 7, 1, 2, 0, 5, 1]);
    let len = p.len() as u16;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    let mut h = <Md5 as md5::Digest>::new();
    md5::Digest::update(&mut h, &p);
    md5::Digest::update(&mut h, SECRET);
    let ra: [u8; 16] = md5::Digest::finalize(h).into();
    p[4..20].copy_from_slice(&ra);
    assert_eq!(
        radius::decode_response(&p, &auth, SECRET),
        Err("no (or more than one) Message-Authenticator")
    );
}

#[test]
fn mppe_keys_round_trip_and_long_eap_splits_at_253() {
    let auth = [9u8; 16];
    let key: Vec<u8> = (0..32).collect();
    let enc = radius::mppe_encrypt(&key, [0x81, 0x22], &auth, SECRET);
    assert_eq!(enc.len(), 2 + 48);
    assert_eq!(radius::mppe_key(&enc, &auth, SECRET), Some(key.clone()));
    assert_ne!(radius::mppe_key(&enc, &auth, b"x"), Some(key));
    let eap = vec![0u8; 600];
    let parts: Vec<_> = radius::eap_attributes(&eap).map(|(_, v)| v.len()).collect();
    assert_eq!(parts, [253, 253, 94]);
}

/// The authenticator itself: Identity locally, then everything to the back end.
#[test]
fn authenticator_forwards_identity_with_user_name_and_echoes_state() {
    let cfg = Arc::new(RadiusConfig {
        server: "x".into(),
        secret: SECRET.to_vec(),
        nas_identifier: "n".into(),
        timeout_ms: 1,
        tries: 1,
    });
    let mut a = RadiusAuthenticator::new(cfg);
    let req = a.start();
    assert_eq!(req, [1, 0, 0, 5, 1]);
    assert_eq!(
        a.receive(b"\x02\x00\x00\x0e\x01anonymous"),
        AuthStep::Pending
    );
    let r = a.take_request().unwrap();
    assert!(r.attributes.contains(&(1, b"anonymous".to_vec())));
    // A copy while waiting is not forwarded twice.
    assert_eq!(
        a.receive(b"\x02\x00\x00\x0e\x01anonymous"),
        AuthStep::Discard
    );
    let step = a.answer(Ok(radius::Answer {
        code: radius::ACCESS_CHALLENGE,
        eap: Some(vec![1, 5, 0, 6, 21, 0x20]),
        state: Some(b"st".to_vec()),
        user_name: None,
        msk: None,
    }));
    assert_eq!(step, AuthStep::Request(vec![1, 5, 0, 6, 21, 0x20]));
    assert_eq!(a.receive(&[2, 5, 0, 6, 21, 0]), AuthStep::Pending);
    let r = a.take_request().unwrap();
    assert!(r.attributes.contains(&(24, b"st".to_vec())));
    // A long response goes in EAP-Message attributes of at most 253 octets, in order.
    let _ = a.answer(Ok(radius::Answer {
        code: radius::ACCESS_CHALLENGE,
        eap: Some(vec![1, 6, 0, 6, 21, 0]),
        state: None,
        user_name: None,
        msk: None,
    }));
    let mut long = vec![2, 6, 2, 0x58, 21, 0];
    long.resize(600, 0xab);
    assert_eq!(a.receive(&long), AuthStep::Pending);
    let r = a.take_request().unwrap();
    let parts: Vec<&Vec<u8>> = r
        .attributes
        .iter()
        .filter(|(t, _)| *t == 79)
        .map(|(_, v)| v)
        .collect();
    assert_eq!(
        parts.iter().map(|v| v.len()).collect::<Vec<_>>(),
        [253, 253, 94]
    );
    assert_eq!(
        parts.into_iter().flatten().copied().collect::<Vec<u8>>(),
        long
    );
    // An Accept without keys cannot key the session.
    let step = a.answer(Ok(radius::Answer {
        code: radius::ACCESS_ACCEPT,
        eap: Some(vec![3, 5, 0, 4]),
        state: None,
        user_name: None,
        msk: None,
    }));
    assert!(matches!(step, AuthStep::Failure { .. }));
}

/// A slow AAA server (RFC 7652 §3.1.3, §6.3): the PCP server acknowledges the client's
/// PA message while the Access-Request is out, so the client does not retransmit; when
/// the acknowledgement is lost, the client's copies are answered with it again and
/// never start a second RADIUS exchange (same number of Access-Requests as against a
/// fast server).
#[test]
fn slow_aaa_server_pa_acknowledgement_and_no_second_exchange() {
    let (ca, backend) = pki();
    let fast = Arc::new(Seen::default());
    let aaa = fake_radius(backend.clone(), SECRET, 0, fast.clone());
    let paced = Paced {
        irt: Some(Duration::from_millis(200)),
        radius_timeout_ms: Some(5_000),
        ..Paced::default()
    };
    let r = run_with(aaa, SECRET, &ca, "correct horse", &paced);
    assert!(matches!(
        r.client_events[..],
        [ClientEvent::Established { .. }]
    ));
    let baseline = fast.requests.load(Ordering::SeqCst);

    // 1.5 s for the first answer: without an acknowledgement a 200 ms IRT would
    // retransmit three times.
    let slow = Arc::new(Seen::default());
    slow.delay_first_ms.store(1_500, Ordering::SeqCst);
    let aaa = fake_radius(backend.clone(), SECRET, 0, slow.clone());
    let paced = Paced {
        irt: Some(Duration::from_millis(200)),
        radius_timeout_ms: Some(5_000),
        ..Paced::default()
    };
    let r = run_with(aaa, SECRET, &ca, "correct horse", &paced);
    assert!(
        matches!(r.client_events[..], [ClientEvent::Established { .. }]),
        "{:?} {:?}",
        r.client_events,
        r.errors
    );
    assert!(paced.acks.get() >= 1, "no PA-Acknowledgement");
    assert_eq!(paced.client_copies.get(), 0, "the client retransmitted");
    assert_eq!(slow.requests.load(Ordering::SeqCst), baseline);

    // The acknowledgements lost: the client retransmits, each copy is acknowledged
    // again, and the AAA server still sees one exchange.
    let lossy = Arc::new(Seen::default());
    lossy.delay_first_ms.store(1_500, Ordering::SeqCst);
    let aaa = fake_radius(backend, SECRET, 0, lossy.clone());
    let paced = Paced {
        irt: Some(Duration::from_millis(200)),
        radius_timeout_ms: Some(5_000),
        drop_acks: true,
        ..Paced::default()
    };
    let r = run_with(aaa, SECRET, &ca, "correct horse", &paced);
    assert!(matches!(
        r.client_events[..],
        [ClientEvent::Established { .. }]
    ));
    assert!(
        paced.client_copies.get() >= 2,
        "{}",
        paced.client_copies.get()
    );
    assert!(paced.acks.get() >= 2, "copies not acknowledged");
    assert_eq!(
        lossy.requests.load(Ordering::SeqCst),
        baseline,
        "a second exchange"
    );
}
