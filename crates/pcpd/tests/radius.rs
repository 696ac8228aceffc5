//! The RADIUS back end of the real `pcpd` with several AAA servers (docs/AUTH.md,
//! "Several AAA servers"): a dead one that never answers and a live fake one (EAP-TTLS
//! of the embedded back end behind `pcp-eap`'s RADIUS front end, in this test). pcpd fails over, marks the
//! dead server and passes it over for the next client; a PA client with a short
//! retransmission time gets PA-Acknowledgements while the AAA side is slow and never
//! retransmits.

mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::TempDir;
use pcp_auth::Time;
use pcp_auth::client::{Client, ClientConfig, ClientEvent};
use pcp_eap::Embedded;
use pcp_eap::radius::server::{self, RadiusServer, RadiusServerConfig};
use pcp_eap::rustls::pki_types::CertificateDer;
use pcp_proto::Response;
use pcp_testkit::eap::{PASSWORD, embedded, ttls_peer};
use pcp_testkit::tls::Pki;

const PCPD: &str = env!("CARGO_BIN_EXE_pcpd");
const SECRET: &[u8] = b"aaa-shared-secret";

/// A UDP server on loopback, stopped when dropped.
struct Aaa {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    /// Milliseconds to wait before answering the next request (once).
    delay_next_ms: Arc<AtomicU64>,
    /// While set, requests are counted and dropped (a back end that is down).
    mute: Arc<AtomicBool>,
    /// Requests answered at most; later ones are counted and dropped.
    answer_limit: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Drop for Aaa {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A server that counts requests and answers none (a dead AAA server that still has
/// its port: no ICMP, only silence).
fn dead_aaa(ip: IpAddr) -> Aaa {
    fake_aaa(ip, None)
}

/// The fake AAA server: `pcp-eap`'s RADIUS front end (`radius::server`) of the
/// embedded EAP-TTLS back end, counting requests and, when asked, slow to answer.
fn fake_aaa(ip: IpAddr, backend: Option<Embedded>) -> Aaa {
    let sock = UdpSocket::bind(SocketAddr::new(ip, 0)).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let addr = sock.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let delay_next_ms = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mute = Arc::new(AtomicBool::new(false));
    let answer_limit = Arc::new(AtomicUsize::new(usize::MAX));
    let (r, d, st, m, lim) = (
        requests.clone(),
        delay_next_ms.clone(),
        stop.clone(),
        mute.clone(),
        answer_limit.clone(),
    );
    std::thread::spawn(move || {
        let mut aaa =
            backend.map(|b| RadiusServer::new(RadiusServerConfig::new(SECRET.to_vec()), b));
        let origin = Instant::now();
        let mut buf = [0u8; 4096];
        while !st.load(Ordering::SeqCst) {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                continue;
            };
            let seen = r.fetch_add(1, Ordering::SeqCst) + 1;
            if m.load(Ordering::SeqCst) || seen > lim.load(Ordering::SeqCst) {
                continue;
            }
            let Some(aaa) = aaa.as_mut() else {
                continue;
            };
            std::thread::sleep(Duration::from_millis(d.swap(0, Ordering::SeqCst)));
            let now = origin.elapsed().as_millis() as u64;
            if let server::Outcome::Reply { reply, .. } = aaa.handle(now, from, &buf[..n]) {
                let _ = sock.send_to(&reply, from);
            }
        }
    });
    Aaa {
        addr,
        requests,
        delay_next_ms,
        mute,
        answer_limit,
        stop,
    }
}

/// The AAA side's certificate (for `aaa.example`) and alice's credentials.
fn pki() -> (CertificateDer<'static>, Embedded) {
    let pki = Pki::for_name("aaa.example");
    (pki.ca.clone(), embedded(&pki))
}

/// What one client's authentication looked like.
struct Outcome {
    event: ClientEvent,
    /// PA-Acknowledgements received.
    acks: usize,
    /// Bitwise copies of earlier PA-Client messages sent (retransmissions).
    copies: usize,
    took: Duration,
}

/// Alice authenticates from `ip` against pcpd at `server`, with a 300 ms IRT.
fn authenticate(ca: &CertificateDer<'static>, ip: IpAddr, server: SocketAddr) -> Outcome {
    let peer = ttls_peer(ca, "aaa.example", "alice", PASSWORD.as_bytes());
    authenticate_with(peer, ip, server)
}

/// One authentication from `ip` with `peer`, with a 300 ms IRT.
fn authenticate_with(peer: pcp_eap::TtlsPeer, ip: IpAddr, server: SocketAddr) -> Outcome {
    let sock = UdpSocket::bind(SocketAddr::new(ip, 0)).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut cfg = ClientConfig::new(ip);
    cfg.retransmit.irt = Duration::from_millis(300);
    let mut client = Client::new(cfg, peer);
    let origin = Instant::now();
    let now = || Time(origin.elapsed().as_millis() as u64);
    let (mut acks, mut copies, mut sent) = (0, 0, Vec::<Vec<u8>>::new());
    client.start(now());
    let mut buf = [0u8; 2048];
    loop {
        assert!(origin.elapsed() < Duration::from_secs(20), "no outcome");
        while let Some(m) = client.poll_transmit() {
            if sent.contains(&m) {
                copies += 1;
            } else {
                sent.push(m.clone());
            }
            sock.send_to(&m, server).unwrap();
        }
        if let Some(event) = client.poll_event() {
            return Outcome {
                event,
                acks,
                copies,
                took: origin.elapsed(),
            };
        }
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            if Response::parse(&buf[..n]).is_ok_and(|r| r.options.received_pak().is_some()) {
                acks += 1;
            }
            client.handle(now(), &buf[..n]);
        }
        client.handle_timeout(now());
    }
}

#[test]
fn failover_past_a_dead_aaa_server_and_pa_acknowledgements_meanwhile() {
    let dir = TempDir::new();
    let ip = IpAddr::V4(common::fresh_ip());
    let (ca, backend) = pki();
    let dead = dead_aaa(ip);
    let live = fake_aaa(ip, Some(backend));
    let secret = dir.join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let config = format!(
        "[auth]\ndefault = \"required\"\n[auth.radius]\nservers = [\"{}\", \"{}\"]\nsecret_file = \"{}\"\ntimeout_ms = 1500\ntries = 1\ndead_time_s = 60\n",
        dead.addr,
        live.addr,
        secret.display()
    );
    let pcpd = common::pcpd(PCPD).config(&config).start();
    let client_ip = IpAddr::V4(pcpd.ip);

    // The first Access-Request goes to the preferred server, which says nothing for
    // 1.5 s; pcpd marks it dead and asks the next one. Meanwhile the client
    // (300 ms IRT) is acknowledged and does not retransmit.
    let first = authenticate(&ca, client_ip, pcpd.pcp);
    assert!(
        matches!(first.event, ClientEvent::Established { .. }),
        "{:?}\n{}",
        first.event,
        pcpd.output()
    );
    assert_eq!(
        dead.requests.load(Ordering::SeqCst),
        1,
        "tries to the dead server"
    );
    assert!(first.acks >= 1, "no PA-Acknowledgement while failing over");
    assert_eq!(first.copies, 0, "the client retransmitted");
    assert!(
        pcpd.output().contains("RADIUS failover"),
        "{}",
        pcpd.output()
    );
    let up = |a: &Aaa| {
        pcpd.metric(&format!(
            "pcp_auth_radius_server_up{{server=\"{}\"}}",
            a.addr
        ))
    };
    assert_eq!(up(&dead), Some(0.0));
    assert_eq!(up(&live), Some(1.0));

    // The next client goes straight to the live server; a slow answer (1.2 s, within
    // the RADIUS timeout but four of the client's IRTs) is covered by the
    // acknowledgement.
    live.delay_next_ms.store(1_200, Ordering::SeqCst);
    let second = authenticate(&ca, client_ip, pcpd.pcp);
    assert!(
        matches!(second.event, ClientEvent::Established { .. }),
        "{:?}",
        second.event
    );
    assert_eq!(
        dead.requests.load(Ordering::SeqCst),
        1,
        "dead server asked again"
    );
    assert!(second.acks >= 1);
    assert_eq!(second.copies, 0, "the client retransmitted");
    assert!(second.took >= Duration::from_millis(1_200));
    // The server installs the second SA when the client's confirmation arrives, just
    // after the client considers itself done.
    let sessions = common::poll(Duration::from_secs(5), Duration::from_millis(20), || {
        let s = pcpd.get_json("/auth/sessions");
        (s.as_array().map(Vec::len) == Some(2)).then_some(s)
    })
    .unwrap_or_else(|| panic!("two sessions: {}", pcpd.get_json("/auth/sessions")));
    assert!(
        sessions
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["identity"] == "alice")
    );

    // A reload that changes nothing of [auth.radius] keeps the servers as they are
    // (the dead one stays passed over); one that drops the dead server uses the rest,
    // and the sessions stay.
    let (status, body) = pcpd.post("/reload");
    assert_eq!(status, 200, "{body}");
    assert_eq!(up(&dead), Some(0.0), "reload forgot the dead mark");
    pcpd.rewrite_config(&config.replace(&format!("\"{}\", ", dead.addr), ""));
    let (status, body) = pcpd.post("/reload");
    assert_eq!(status, 200, "{body}");
    assert_eq!(up(&dead), None);
    assert_eq!(up(&live), Some(1.0));
    let third = authenticate(&ca, client_ip, pcpd.pcp);
    assert!(
        matches!(third.event, ClientEvent::Established { .. }),
        "{:?}",
        third.event
    );
    assert_eq!(dead.requests.load(Ordering::SeqCst), 1);
    common::wait_for(Duration::from_secs(5), "the third SA", || {
        (pcpd.get_json("/auth/sessions").as_array().map(Vec::len) == Some(3)).then_some(())
    });
}

/// A back end that is down is not a wrong password (docs/AUTH.md, "An unavailable
/// back end"): with the only AAA server silent, pcpd does not answer
/// AUTHENTICATION_FAILED; it keeps the acknowledged client waiting and asks the AAA
/// server again with backoff. Once the server answers, the same client authenticates,
/// without a restart of anything. A genuine refusal (wrong password) is still
/// AUTHENTICATION_FAILED at once.
#[test]
fn an_aaa_server_down_at_first_then_up_the_client_authenticates() {
    let dir = TempDir::new();
    let ip = IpAddr::V4(common::fresh_ip());
    let (ca, backend) = pki();
    let aaa = fake_aaa(ip, Some(backend));
    aaa.mute.store(true, Ordering::SeqCst);
    let secret = dir.join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let config = format!(
        "[auth]\ndefault = \"required\"\n[auth.radius]\nservers = [\"{}\"]\nsecret_file = \"{}\"\ntimeout_ms = 150\ntries = 2\n",
        aaa.addr,
        secret.display()
    );
    let pcpd = common::pcpd(PCPD).config(&config).start();
    // The AAA server comes up once pcpd has given up on it twice (2 tries each).
    let (requests, mute) = (aaa.requests.clone(), aaa.mute.clone());
    let waker = std::thread::spawn(move || {
        let t0 = Instant::now();
        while requests.load(Ordering::SeqCst) < 4 && t0.elapsed() < Duration::from_secs(15) {
            std::thread::sleep(Duration::from_millis(20));
        }
        mute.store(false, Ordering::SeqCst);
    });
    let out = authenticate(&ca, IpAddr::V4(pcpd.ip), pcpd.pcp);
    waker.join().unwrap();
    assert!(
        matches!(out.event, ClientEvent::Established { .. }),
        "{:?}\n{}",
        out.event,
        pcpd.output()
    );
    assert!(out.acks >= 1, "the waiting client was not acknowledged");
    assert!(
        aaa.requests.load(Ordering::SeqCst) >= 4,
        "the AAA server was not asked while down"
    );
    let retries = pcpd.metric("pcp_auth_backend_retries_total").unwrap_or(0.0);
    assert!(retries >= 2.0, "retries counted: {retries}");
    assert_eq!(
        pcpd.metric("pcp_auth_sessions_failed_total{cause=\"authentication_failed\"}"),
        Some(0.0)
    );
    // A wrong password is refused at once, and counted as such.
    let peer = ttls_peer(&ca, "aaa.example", "alice", b"wrong");
    let failed = authenticate_with(peer, IpAddr::V4(pcpd.ip), pcpd.pcp);
    assert!(
        matches!(
            failed.event,
            ClientEvent::Failed(pcp_auth::client::Failure::AuthenticationFailed)
        ),
        "{:?}",
        failed.event
    );
    assert_eq!(
        pcpd.metric("pcp_auth_sessions_failed_total{cause=\"authentication_failed\"}"),
        Some(1.0)
    );
}

/// A reload that replaces the AAA server while a conversation is bound to the old one
/// (its State means nothing to the new one) restarts that conversation: the client
/// gets SESSION_TERMINATED, not AUTHENTICATION_FAILED, and authenticates again with
/// the new server (docs/AUTH.md, "An unavailable back end").
#[test]
fn a_reload_restarts_a_conversation_bound_to_a_removed_aaa_server() {
    let dir = TempDir::new();
    let ip = IpAddr::V4(common::fresh_ip());
    let (ca, backend) = pki();
    let old = fake_aaa(ip, Some(backend.clone()));
    // It answers the first request (an Access-Challenge: the conversation is bound to
    // it), then falls silent.
    old.answer_limit.store(1, Ordering::SeqCst);
    let new = fake_aaa(ip, Some(backend));
    let secret = dir.join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let config = |aaa: &Aaa| {
        format!(
            "[auth]\ndefault = \"required\"\n[auth.radius]\nservers = [\"{}\"]\nsecret_file = \"{}\"\ntimeout_ms = 200\ntries = 2\n",
            aaa.addr,
            secret.display()
        )
    };
    let pcpd = common::pcpd(PCPD).config(&config(&old)).start();
    let client_ip = IpAddr::V4(pcpd.ip);
    let first = std::thread::scope(|scope| {
        scope.spawn(|| {
            common::wait_for(Duration::from_secs(15), "the bound request", || {
                (old.requests.load(Ordering::SeqCst) >= 2).then_some(())
            });
            pcpd.rewrite_config(&config(&new));
            let (status, body) = pcpd.post("/reload");
            assert_eq!(status, 200, "{body}");
        });
        authenticate(&ca, client_ip, pcpd.pcp)
    });
    assert_eq!(
        first.event,
        ClientEvent::Ended(pcp_auth::client::Ended::ByServer),
        "{}",
        pcpd.output()
    );
    assert_eq!(
        pcpd.metric("pcp_auth_sessions_terminated_total{reason=\"aaa_gone\"}"),
        Some(1.0)
    );
    assert_eq!(
        pcpd.metric("pcp_auth_sessions_failed_total{cause=\"authentication_failed\"}"),
        Some(0.0)
    );
    let again = authenticate(&ca, client_ip, pcpd.pcp);
    assert!(
        matches!(again.event, ClientEvent::Established { .. }),
        "{:?}",
        again.event
    );
    assert!(new.requests.load(Ordering::SeqCst) >= 1);
}

/// With RADIUS, wrong passwords do not lock other users out (review of 2026-12-04):
/// every client sends the outer identity "anonymous", so a limit on it would refuse
/// everyone after `burst` failures from anywhere. Three wrong passwords (burst 2) from
/// three addresses, then bob, with his password, from a fourth address authenticates;
/// and a source that failed `burst` times is still refused (by source).
#[test]
fn wrong_passwords_through_radius_do_not_lock_out_other_users() {
    let dir = TempDir::new();
    let pki = Pki::for_name("aaa.example");
    let users = format!(
        "{}{}",
        pcp_testkit::eap::users_line("alice", PASSWORD.as_bytes()),
        pcp_testkit::eap::users_line("bob", b"battery staple")
    );
    let creds = pcp_eap::Credentials::parse(&users, "test").unwrap();
    let backend = Embedded::new(pki.chain(), pki.key(), creds).unwrap();
    let aaa = fake_aaa(IpAddr::V4(common::fresh_ip()), Some(backend));
    let secret = dir.join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let config = format!(
        "[auth]\ndefault = \"required\"\n[auth.attempts]\nburst = 2\nevery_s = 600\n[auth.radius]\nservers = [\"{}\"]\nsecret_file = \"{}\"\n",
        aaa.addr,
        secret.display()
    );
    let pcpd = common::pcpd(PCPD).config(&config).start();
    let wrong = || ttls_peer(&pki.ca, "aaa.example", "alice", b"wrong");
    let refused = |o: &Outcome| {
        matches!(
            o.event,
            ClientEvent::Failed(pcp_auth::client::Failure::AuthenticationFailed)
        )
    };
    for _ in 0..3 {
        let ip = IpAddr::V4(common::fresh_ip());
        let o = authenticate_with(wrong(), ip, pcpd.pcp);
        assert!(refused(&o), "{:?}", o.event);
    }
    assert_eq!(pcpd.metric("pcp_auth_attempts_failed_total"), Some(3.0));
    let bob = ttls_peer(&pki.ca, "aaa.example", "bob", b"battery staple");
    let o = authenticate_with(bob, IpAddr::V4(common::fresh_ip()), pcpd.pcp);
    assert!(
        matches!(o.event, ClientEvent::Established { .. }),
        "bob locked out by others' failures: {:?}\n{}",
        o.event,
        pcpd.output()
    );
    assert_eq!(
        pcpd.metric("pcp_auth_attempts_refused_total{by=\"identity\"}"),
        Some(0.0)
    );
    // The source limit still holds: two failures from one address, then refused
    // without asking the AAA server.
    let ip = IpAddr::V4(common::fresh_ip());
    for _ in 0..2 {
        assert!(refused(&authenticate_with(wrong(), ip, pcpd.pcp)));
    }
    let asked = aaa.requests.load(Ordering::SeqCst);
    let o = authenticate(&pki.ca, ip, pcpd.pcp);
    assert!(refused(&o), "{:?}", o.event);
    assert_eq!(aaa.requests.load(Ordering::SeqCst), asked);
    assert_eq!(
        pcpd.metric("pcp_auth_attempts_refused_total{by=\"source\"}"),
        Some(1.0)
    );
}
