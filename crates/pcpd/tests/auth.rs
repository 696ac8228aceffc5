//! PCP authentication end to end against the real `pcpd` binary on loopback: an
//! EAP-TTLS/PAP client (pcp-auth + pcp-eap) authenticates with the embedded back end
//! (generated certificates, an Argon2 credentials file), then its tagged MAP is served
//! and answered tagged; untagged, replayed and tampered requests are refused and change
//! nothing; a wrong password fails.

mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::{HaTiming, Node, PairPlan, Pcpd, TempDir, wait_ha};
use pcp_auth::Time;
use pcp_auth::client::{Client, ClientConfig, ClientEvent, Ended, Failure};
use pcp_eap::TtlsPeer;
use pcp_proto::{Body, MapBody, Options, PcpOption, Request, Response, ResultCode};
use pcp_testkit::eap::{AuthFiles, PASSWORD, ttls_peer, users_line};
use pcp_testkit::tls::Pki;
use rustls::pki_types::CertificateDer;

const PCPD: &str = env!("CARGO_BIN_EXE_pcpd");

struct Setup {
    _dir: TempDir,
    pcpd: Pcpd,
    ca: CertificateDer<'static>,
}

fn setup(mode: &str) -> Setup {
    setup_with(mode, 600)
}

fn setup_with(mode: &str, lifetime: u32) -> Setup {
    setup_config(mode, lifetime, "")
}

/// [`setup_with`] with `extra` appended to pcpd's configuration.
fn setup_config(mode: &str, lifetime: u32, extra: &str) -> Setup {
    let dir = TempDir::new();
    let (auth, ca) = auth_files(&dir, mode, lifetime);
    let pcpd = common::pcpd(PCPD).config(&format!("{auth}{extra}")).start();
    Setup {
        _dir: dir,
        pcpd,
        ca,
    }
}

/// A CA, a server certificate for `pcp.example`, alice's credentials in `dir`, and the
/// `[auth]` section that uses them.
fn auth_files(dir: &TempDir, mode: &str, lifetime: u32) -> (String, CertificateDer<'static>) {
    let files = AuthFiles::write(
        &dir.0,
        "pcp.example",
        &users_line("alice", PASSWORD.as_bytes()),
    );
    let config = format!("{}session_lifetime = {lifetime}\n", files.section(mode));
    (config, files.ca_der)
}

struct Peer {
    sock: UdpSocket,
    server: SocketAddr,
    ip: IpAddr,
    client: Client<TtlsPeer>,
    origin: Instant,
}

impl Peer {
    fn new(s: &Setup, password: &str) -> Peer {
        Peer::new_at(s, password, IpAddr::V4(s.pcpd.ip))
    }

    /// A peer (alice) sending from loopback address `ip`.
    fn new_at(s: &Setup, password: &str, ip: IpAddr) -> Peer {
        Peer::to(&s.ca, s.pcpd.pcp, password, ip)
    }

    /// A peer (alice) sending from `ip` to the server at `server`.
    fn to(ca: &CertificateDer<'static>, server: SocketAddr, password: &str, ip: IpAddr) -> Peer {
        Peer::user(ca, server, "alice", password, ip)
    }

    /// A peer authenticating as `user`.
    fn user(
        ca: &CertificateDer<'static>,
        server: SocketAddr,
        user: &str,
        password: &str,
        ip: IpAddr,
    ) -> Peer {
        let sock = UdpSocket::bind(SocketAddr::new(ip, 0)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let peer = ttls_peer(ca, "pcp.example", user, password.as_bytes());
        Peer {
            sock,
            server,
            ip,
            client: Client::new(ClientConfig::new(ip), peer),
            origin: Instant::now(),
        }
    }

    fn now(&self) -> Time {
        Time(self.origin.elapsed().as_millis() as u64)
    }

    /// Handles whatever the server sends for up to `d` (answering PA messages), until
    /// the session ends; the client's events meanwhile.
    fn listen(&mut self, d: Duration) -> Vec<ClientEvent> {
        let deadline = Instant::now() + d;
        let mut buf = [0u8; 2048];
        let mut events = Vec::new();
        while Instant::now() < deadline {
            if let Ok((n, _)) = self.sock.recv_from(&mut buf) {
                let now = self.now();
                self.client.handle(now, &buf[..n]);
            }
            while let Some(m) = self.client.poll_transmit() {
                self.sock.send_to(&m, self.server).unwrap();
            }
            events.extend(std::iter::from_fn(|| self.client.poll_event()));
            if events.iter().any(|e| matches!(e, ClientEvent::Ended(_))) {
                break;
            }
        }
        events
    }

    /// Runs the PA exchange until an event or 20 s.
    fn authenticate(&mut self) -> ClientEvent {
        self.authenticate_through(|m| m.to_vec())
    }

    /// [`Peer::authenticate`] with every datagram from the server passed through `mitm`
    /// first (a man in the middle).
    fn authenticate_through(&mut self, mut mitm: impl FnMut(&[u8]) -> Vec<u8>) -> ClientEvent {
        self.client.start(self.now());
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            while let Some(m) = self.client.poll_transmit() {
                self.sock.send_to(&m, self.server).unwrap();
            }
            if let Some(e) = self.client.poll_event() {
                return e;
            }
            if let Ok((n, _)) = self.sock.recv_from(&mut buf) {
                let now = self.now();
                let m = mitm(&buf[..n]);
                self.client.handle(now, &m);
            }
            let now = self.now();
            self.client.handle_timeout(now);
        }
        panic!("no outcome within 20 s");
    }

    fn map(&mut self, port: u16, tag: bool) -> Vec<u8> {
        self.map_with(port, tag, &[])
    }

    fn map_with(&mut self, port: u16, tag: bool, options: &[PcpOption<'_>]) -> Vec<u8> {
        let req = Request {
            lifetime: 600,
            client_addr: self.ip,
            body: Body::Map(MapBody {
                nonce: [5; 12],
                protocol: 17,
                internal_port: port,
                external_port: 0,
                external_addr: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            }),
            options: Options::from_list(options),
            pa_result_code: ResultCode::Success,
        };
        let mut buf = vec![0u8; 1100];
        let mut n = req.emit(&mut buf).unwrap();
        if tag {
            n = self.client.protect(self.now(), &mut buf, n).unwrap();
        }
        buf.truncate(n);
        buf
    }

    /// Sends `msg` and returns the answer, if one comes within 500 ms.
    fn exchange(&self, msg: &[u8]) -> Option<Vec<u8>> {
        self.sock.send_to(msg, self.server).unwrap();
        let deadline = Instant::now() + Duration::from_millis(500);
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            if let Ok((n, _)) = self.sock.recv_from(&mut buf) {
                let r = &buf[..n];
                // Only answers to MAP requests (PA messages may still trickle in).
                if r.len() > 1 && r[1] & 0x7f == 1 {
                    return Some(r.to_vec());
                }
            }
        }
        None
    }
}

fn result(r: &[u8]) -> ResultCode {
    Response::parse(r).unwrap().result_code
}

#[test]
fn required_authentication_with_eap_ttls_then_tagged_map() {
    let s = setup("required");
    let mut p = Peer::new(&s, "correct horse");
    // Untagged: AUTHENTICATION_REQUIRED, nothing mapped.
    let untagged = p.map(5000, false);
    let r = p.exchange(&untagged).expect("an answer");
    assert_eq!(result(&r), ResultCode::AuthenticationRequired);
    assert!(s.pcpd.mappings().is_empty());

    let e = p.authenticate();
    assert!(
        matches!(e, ClientEvent::Established { lifetime: 600, .. }),
        "{e:?}"
    );
    // The server installs the SA when the client's confirmation arrives.
    common::wait_for(Duration::from_secs(5), "the server's SA", || {
        s.pcpd
            .output()
            .contains("PCP authentication succeeded")
            .then_some(())
    });

    // The first tagged MAP verifies at the server and its answer at the client: both
    // derived the same MSK.
    let first = p.map(5000, true);
    let r = p.exchange(&first).expect("an answer");
    assert_eq!(result(&r), ResultCode::Success);
    let now = p.now();
    assert_eq!(p.client.verify_response(now, &r), Ok(()));
    assert_eq!(s.pcpd.mappings().len(), 1);

    // A newer request, then the first one replayed: no answer, no change.
    let second = p.map(5001, true);
    assert_eq!(result(&p.exchange(&second).unwrap()), ResultCode::Success);
    assert_eq!(p.exchange(&first), None, "replay answered");
    // Tampered: no answer.
    let mut third = p.map(5002, true);
    third[24 + 16] ^= 0x40;
    assert_eq!(p.exchange(&third), None, "tampered request answered");
    assert_eq!(s.pcpd.mappings().len(), 2);
    // Refusals are counted.
    let m = |o: &str| {
        s.pcpd
            .metric(&format!("pcp_auth_requests_total{{outcome=\"{o}\"}}"))
    };
    assert_eq!(m("replayed"), Some(1.0));
    assert_eq!(m("bad_tag"), Some(1.0));
    assert_eq!(m("authentication_required"), Some(1.0));
    assert_eq!(m("authenticated"), Some(2.0));
}

#[test]
fn wrong_password_fails() {
    let s = setup("required");
    let mut p = Peer::new(&s, "wrong");
    assert_eq!(
        p.authenticate(),
        ClientEvent::Failed(Failure::AuthenticationFailed)
    );
    assert!(s.pcpd.mappings().is_empty());
}

#[test]
fn off_keeps_answering_as_a_server_without_rfc7652() {
    let s = setup("off");
    let mut p = Peer::new(&s, "correct horse");
    let mut m = p.map(5000, false);
    assert_eq!(result(&p.exchange(&m).unwrap()), ResultCode::Success);
    // A tagged request (a tag appended by hand: this client has no session).
    m[4..8].copy_from_slice(&0u32.to_be_bytes());
    m.extend_from_slice(&[5, 0, 0, 28]);
    m.extend_from_slice(&[0; 28]);
    assert_eq!(result(&p.exchange(&m).unwrap()), ResultCode::UnsuppOption);
}

/// What `pcpc --identity --password-file --ca` runs: the pcp-client library with
/// authentication, which authenticates in `connect` and tags every request.
#[test]
fn pcp_client_library_authenticates_then_maps() {
    use pcp_client::core::MappingRequest;
    use pcp_client::tokio::{Authentication, ClientOptions, PcpClient};
    let s = setup("required");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ip = IpAddr::V4(s.pcpd.ip);
    let opts = |password: &'static str| {
        let ca = s.ca.clone();
        let mut o = ClientOptions::new(s.pcpd.pcp);
        o.bind = Some(SocketAddr::new(ip, 0));
        o.authentication = Some(Authentication::new(move || {
            Box::new(ttls_peer(&ca, "pcp.example", "alice", password.as_bytes()))
        }));
        o
    };
    rt.block_on(async {
        let c = PcpClient::connect(opts("correct horse"))
            .await
            .expect("authenticated");
        c.map(MappingRequest::map(17, 6000)).await.expect("mapped");
        let e = PcpClient::connect(opts("wrong")).await.unwrap_err();
        assert!(
            matches!(
                e,
                pcp_client::Error::Authentication(Failure::AuthenticationFailed)
            ),
            "{e}"
        );
    });
    let maps = s.pcpd.mappings();
    assert_eq!(maps.len(), 1, "{maps:?}");
}

/// An expired session is gone at the server: a request tagged for it gets
/// UNKNOWN_SESSION_ID, and the client authenticates again and carries on.
#[test]
fn expired_session_gets_unknown_session_id_and_the_client_recovers() {
    let s = setup_with("required", 1);
    let mut p = Peer::new(&s, "correct horse");
    assert!(matches!(
        p.authenticate(),
        ClientEvent::Established { lifetime: 1, .. }
    ));
    std::thread::sleep(Duration::from_millis(2500));
    let stale = p.map(5000, true);
    let r = p.exchange(&stale).expect("an answer");
    assert_eq!(result(&r), ResultCode::UnknownSessionId);
    assert!(s.pcpd.mappings().is_empty());
    let now = p.now();
    assert!(p.client.verify_response(now, &r).is_err());
    assert_eq!(p.client.poll_event(), Some(ClientEvent::Ended(Ended::Lost)));
    assert!(matches!(p.authenticate(), ClientEvent::Established { .. }));
    let fresh = p.map(5000, true);
    assert_eq!(result(&p.exchange(&fresh).unwrap()), ResultCode::Success);
}

/// `server_initiated = true` (RFC 7652 §3.1.2) through the real pcpd: a client that
/// has not started a session sends an untagged MAP, gets AUTHENTICATION_REQUIRED and
/// pcpd's own PA-Server (session ID chosen by pcpd, sequence number 0); it answers,
/// authenticates in that session and its tagged MAP is served. Its retried untagged
/// MAP meanwhile opens no second session (S4).
#[test]
fn server_initiated_session_through_pcpd() {
    let s = setup_config("required", 600, "server_initiated = true\n");
    let mut p = Peer::new(&s, "correct horse");
    let untagged = p.map(5100, false);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 2048];
    let (mut required, mut first_pa) = (0, None);
    let mut last_untagged = Instant::now();
    p.sock.send_to(&untagged, p.server).unwrap();
    let event = loop {
        assert!(Instant::now() < deadline, "no outcome\n{}", s.pcpd.output());
        if let Some(e) = p.client.poll_event() {
            break e;
        }
        if let Ok((n, _)) = p.sock.recv_from(&mut buf) {
            let m = &buf[..n];
            match m.get(1).map(|b| b & 0x7f) {
                Some(1) => {
                    assert_eq!(result(m), ResultCode::AuthenticationRequired);
                    required += 1;
                }
                Some(3) => {
                    let r = Response::parse(m).unwrap();
                    if let Body::Authentication(a) = r.body {
                        first_pa.get_or_insert(a.session_id);
                    }
                    let now = p.now();
                    p.client.handle(now, m);
                }
                _ => {}
            }
        }
        // The application retries its request meanwhile.
        if last_untagged.elapsed() > Duration::from_millis(700) && !p.client.is_established() {
            p.sock.send_to(&untagged, p.server).unwrap();
            last_untagged = Instant::now();
        }
        while let Some(m) = p.client.poll_transmit() {
            p.sock.send_to(&m, p.server).unwrap();
        }
        let now = p.now();
        p.client.handle_timeout(now);
    };
    let ClientEvent::Established { session_id, .. } = event else {
        panic!("{event:?}\n{}", s.pcpd.output());
    };
    assert!(required >= 1, "no AUTHENTICATION_REQUIRED");
    assert_eq!(first_pa, Some(session_id), "not pcpd's session");
    // pcpd installs the SA (and the identity) when the client's confirmation arrives,
    // just after the client considers itself done.
    let sessions = common::poll(Duration::from_secs(5), Duration::from_millis(20), || {
        let j = s.pcpd.get_json("/auth/sessions");
        (j.as_array()
            .is_some_and(|l| l.iter().any(|x| x["identity"] == "alice")))
        .then_some(j)
    })
    .unwrap_or_else(|| panic!("alice's SA: {}", s.pcpd.get_json("/auth/sessions")));
    let list = sessions.as_array().unwrap();
    assert_eq!(list.len(), 1, "{sessions}");
    assert_eq!(list[0]["session_id"], session_id);
    let tagged = p.map(5100, true);
    let r = p.exchange(&tagged).expect("an answer");
    assert_eq!(result(&r), ResultCode::Success);
    assert!(s.pcpd.find_mapping(5100).is_some());
}

/// A man in the middle adds a PRF to pcpd's unprotected first PA-Server (RFC 7652 §8:
/// the algorithm lists travel before any key); the client's confirmation repeats what
/// it saw, pcpd notices, says DOWNGRADE_ATTACK_DETECTED and keeps no session.
#[test]
fn downgrade_attempt_is_detected() {
    let s = setup("required");
    let mut p = Peer::new(&s, "correct horse");
    let mut first = true;
    let e = p.authenticate_through(|m| {
        let Ok(r) = Response::parse(m) else {
            return m.to_vec();
        };
        if !std::mem::take(&mut first) {
            return m.to_vec();
        }
        let mut opts: Vec<_> = r.options.iter().collect();
        opts.insert(1, pcp_proto::PcpOption::Prf(2));
        let forged = Response {
            options: Options::from_list(&opts),
            ..r
        };
        let mut buf = vec![0u8; 1100];
        let n = forged.emit(&mut buf).unwrap();
        buf.truncate(n);
        buf
    });
    // The client holds an SA from its confirmation on, until pcpd's verdict arrives.
    assert!(matches!(e, ClientEvent::Established { .. }), "{e:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 2048];
    let verdict = loop {
        assert!(Instant::now() < deadline, "no verdict from pcpd");
        if let Some(e) = p.client.poll_event() {
            break e;
        }
        if let Ok((n, _)) = p.sock.recv_from(&mut buf) {
            let now = p.now();
            p.client.handle(now, &buf[..n]);
        }
    };
    assert_eq!(verdict, ClientEvent::Failed(Failure::DowngradeDetected));
    assert!(!p.client.is_established());
    common::wait_for(Duration::from_secs(5), "the server's verdict", || {
        s.pcpd.output().contains("DowngradeDetected").then_some(())
    });
    let m = p.map(5000, false);
    assert_eq!(
        result(&p.exchange(&m).unwrap()),
        ResultCode::AuthenticationRequired
    );
}

/// The authenticated identity is the subscriber (docs/AUTH.md): alice, listed under
/// subscriber `acme` (a tier of one mapping), is one subscriber from two addresses; an
/// unauthenticated request from an address with a PA session gets
/// AUTHENTICATION_REQUIRED even in `optional` mode (RFC 7652 §3.1.3), one from a third
/// address is charged to its prefix.
#[test]
fn identity_is_the_subscriber_across_addresses() {
    let extra = "[tiers.default]\n[tiers.gold]\nmapping_quota = 1\n\
        [[subscribers.entries]]\nid = \"acme\"\nidentities = [\"alice\"]\ntier = \"gold\"\n";
    let s = setup_config("optional", 600, extra);
    let mut a = Peer::new(&s, "correct horse");
    let o = s.pcpd.ip.octets();
    let other = std::net::Ipv4Addr::new(o[0], o[1], o[2], o[3] ^ 1);
    let mut b = Peer::new_at(&s, "correct horse", IpAddr::V4(other));
    for p in [&mut a, &mut b] {
        assert!(matches!(p.authenticate(), ClientEvent::Established { .. }));
    }
    common::wait_for(Duration::from_secs(5), "both SAs at the server", || {
        (s.pcpd
            .output()
            .matches("PCP authentication succeeded")
            .count()
            >= 2)
            .then_some(())
    });
    let m = a.map(5000, true);
    let r = a.exchange(&m).expect("an answer");
    assert_eq!(result(&r), ResultCode::Success);
    assert_eq!(s.pcpd.mapping(17, 5000)["subscriber"], "acme");
    // Alice from the other address: acme's one mapping is used up.
    let m = b.map(5001, true);
    let r = b.exchange(&m).expect("an answer");
    assert_eq!(result(&r), ResultCode::UserExQuota);
    let now = b.now();
    assert!(b.client.verify_response(now, &r).is_ok(), "answered tagged");
    // The same address unauthenticated: refused, it has a PA session.
    let m = b.map(5001, false);
    assert_eq!(
        result(&b.exchange(&m).unwrap()),
        ResultCode::AuthenticationRequired
    );
    // Another address unauthenticated is its own subscriber.
    let third = std::net::Ipv4Addr::new(o[0], o[1], o[2], o[3] ^ 2);
    let mut c = Peer::new_at(&s, "correct horse", IpAddr::V4(third));
    let m = c.map(5001, false);
    assert_eq!(result(&c.exchange(&m).unwrap()), ResultCode::Success);
    assert_eq!(
        s.pcpd.mapping(17, 5001)["subscriber"],
        format!("{third}/32").as_str()
    );
    let subs = s.pcpd.get_json("/subscribers");
    assert!(subs.to_string().contains("\"acme\""), "{subs}");
}

/// Pair mode (docs/AUTH.md "Pair mode"): a checkpointed MAP's reply is held until the
/// backup holds the mapping and tagged when it is finally sent, so it verifies at the
/// client with option 192. The PA session and the mapping's subscriber are
/// replicated: after `kill -9` of the active, the successor accepts the client's next
/// tagged renewal without a new authentication (its reply verifies: the successor's
/// sequence numbers are past the old active's), refuses a replay of the request the
/// old active served, and charges the adopted mapping to alice's subscriber (a
/// quota of one: her next mapping is refused).
#[test]
fn pair_mode_keeps_sessions_and_identities_across_a_failover() {
    let dir = TempDir::new();
    let (auth, ca) = auth_files(&dir, "required", 600);
    let config = auth
        + "[tiers.default]\n[tiers.gold]\nmapping_quota = 1\n\
           [[subscribers.entries]]\nid = \"acme\"\nidentities = [\"alice\"]\ntier = \"gold\"\n";
    let plan = PairPlan::new(&config, HaTiming::default());
    let mut a = start_keyed(&plan, &dir, Node::A, "active");
    let b = start_keyed(&plan, &dir, Node::B, "backup");
    wait_ha(&a, Duration::from_secs(10), "A active and ready", |h| {
        h["role"] == "active" && h["ready"] == true && h["backup_status"] == "ready"
    });
    wait_ha(&b, Duration::from_secs(10), "B backup and ready", |h| {
        h["role"] == "backup" && h["ready"] == true
    });
    // The client talks to A from B's address: after the failover its packets reach B
    // from the same source, as with a service address that moved.
    let client_ip = IpAddr::V4(plan.ip_b);
    let mut p = Peer::to(&ca, a.pcp, "correct horse", client_ip);
    authenticate_at(&mut p, &a);
    let m = p.map_with(5000, true, &[PcpOption::CheckpointRequired]);
    let r = p.exchange(&m).expect("the held reply, released");
    let now = p.now();
    p.client
        .verify_response(now, &r)
        .expect("tagged after release");
    let resp = Response::parse(&r).unwrap();
    assert_eq!(resp.result_code, ResultCode::Success);
    assert!(resp.options.checkpoint_required(), "promised: 192 echoed");
    let Body::Map(body) = resp.body else {
        panic!("not a MAP")
    };
    // A second request, so that the first is no longer the last one accepted (the
    // last one again, bitwise, is a retransmission and answered again, here as on a
    // successor).
    let m2 = p.map_with(5000, true, &[PcpOption::CheckpointRequired]);
    let r = p.exchange(&m2).expect("the renewal's reply");
    let now = p.now();
    p.client.verify_response(now, &r).expect("tagged");
    // The backup's standby copy is charged to alice's subscriber already.
    common::wait_for(Duration::from_secs(5), "B's copy charged to acme", || {
        (b.mapping(17, 5000)["subscriber"] == "acme").then_some(())
    });
    // It holds the session for a takeover.
    common::wait_for(Duration::from_secs(5), "B holds the session", || {
        (b.ha()["sessions"] == 1).then_some(())
    });
    // The backup keeps quiet, PA messages included.
    let mut q = Peer::to(&ca, b.pcp, "correct horse", client_ip);
    q.client.start(q.now());
    let first = q.client.poll_transmit().unwrap();
    q.sock.send_to(&first, b.pcp).unwrap();
    let mut buf = [0u8; 2048];
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        q.sock.recv_from(&mut buf).is_err(),
        "a backup answered a PA-Initiation"
    );

    a.kill9();
    wait_ha(&b, Duration::from_secs(10), "B takes over", |h| {
        h["role"] == "active"
    });
    p.server = b.pcp;
    // A replay of an earlier request the old active served: the session's last
    // sequence number was replicated, so the successor drops it.
    assert!(p.exchange(&m).is_none(), "the successor answered a replay");
    // The last one, bitwise, is answered again as a retransmission (its answer may
    // have been lost with the old active).
    let r = p.exchange(&m2).expect("a retransmission is answered");
    assert_eq!(result(&r), ResultCode::Success);
    let now = p.now();
    p.client
        .verify_response(now, &r)
        .expect("tagged afresh by B");
    assert_eq!(
        b.metric("pcp_auth_requests_total{outcome=\"replayed\"}"),
        Some(1.0)
    );
    // The client's next tagged renewal: served, tagged, no new authentication.
    let renew = p.map_with(5000, true, &[PcpOption::CheckpointRequired]);
    let r = p.exchange(&renew).expect("an answer");
    assert_eq!(result(&r), ResultCode::Success);
    let now = p.now();
    p.client.verify_response(now, &r).expect("tagged by B");
    assert_eq!(p.client.poll_event(), None, "the session carried on");
    assert!(
        !b.output().contains("PCP authentication succeeded"),
        "nobody authenticated with B"
    );
    assert!(b.output().contains("PA sessions adopted"), "{}", b.output());
    let Body::Map(renewed) = Response::parse(&r).unwrap().body else {
        panic!("not a MAP")
    };
    // The same mapping, kept across the failover, and still alice's subscriber's.
    assert_eq!(renewed.external_port, body.external_port);
    assert_eq!(b.mapping(17, 5000)["subscriber"], "acme");
    // acme's quota of one is used by the adopted mapping.
    let more = p.map_with(5001, true, &[]);
    let r = p.exchange(&more).expect("an answer");
    assert_eq!(result(&r), ResultCode::UserExQuota);
    let now = p.now();
    p.client.verify_response(now, &r).expect("tagged by B");
}

/// `[ha] replicate_sessions = false` (an HA link that cannot be trusted with keys,
/// docs/HA.md): nothing of the session reaches the backup, so after `kill -9` of the
/// active the successor answers the client's next tagged request UNKNOWN_SESSION_ID,
/// the client authenticates with it and renews its (replicated) mapping.
/// Starts `node` of `plan` as `role` with a replication link key (`[ha] key_file`,
/// one file in `dir` for both): PA session keys are replicated, which pcpd refuses
/// over a plain link.
fn start_keyed(plan: &PairPlan, dir: &TempDir, node: Node, role: &str) -> Pcpd {
    let key = link_key(dir);
    let ip = match node {
        Node::A => plan.ip_a,
        Node::B => plan.ip_b,
    };
    let text = format!(
        "{}key_file = \"{}\"\n",
        plan.config(node, role),
        key.display()
    );
    common::pcpd(PCPD).at(ip).config(&text).start()
}

/// A replication link key file (mode 600) in `dir`.
fn link_key(dir: &TempDir) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let key = dir.join("ha.key");
    let hex: String = (0..32u8)
        .map(|b| format!("{:02x}", b.wrapping_mul(73) ^ 0xa5))
        .collect();
    std::fs::write(&key, format!("{hex}\n")).expect("write the key file");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    key
}

/// Pair mode with authentication on refuses to start when PA session keys would cross
/// the replication link in clear (review of 2026-12-04), naming the file, the line and
/// the key; a key file (also `--ha-key-file`), `replicate_sessions = false` or the
/// operator's `replicate_sessions_in_clear = true` are accepted, and so is pair mode
/// without authentication.
#[test]
fn pair_mode_refuses_to_replicate_session_keys_in_clear() {
    let dir = TempDir::new();
    let (auth, _) = auth_files(&dir, "required", 600);
    let plan = PairPlan::new(&auth, HaTiming::default());
    let check = |text: &str, args: &[&str]| {
        let cfg = dir.join("pcpd.toml");
        std::fs::write(&cfg, text).expect("config");
        let out = std::process::Command::new(PCPD)
            .arg("--config")
            .arg(&cfg)
            .args(args)
            .arg("--check")
            .output()
            .expect("run pcpd");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let plain = plan.config(Node::A, "active");
    let (code, err) = check(&plain, &[]);
    assert_eq!(code, Some(2), "{err}");
    let ha_line = plain.lines().position(|l| l.trim() == "[ha]").unwrap() + 1;
    assert!(
        err.contains(&format!("pcpd.toml:{ha_line}: ha.replicate_sessions:"))
            && err.contains("in clear"),
        "{err}"
    );
    let key = link_key(&dir);
    let key_arg = key.display().to_string();
    for (text, args) in [
        (format!("{plain}key_file = \"{key_arg}\"\n"), vec![]),
        (plain.clone(), vec!["--ha-key-file", key_arg.as_str()]),
        (format!("{plain}replicate_sessions = false\n"), vec![]),
        (
            format!("{plain}replicate_sessions_in_clear = true\n"),
            vec![],
        ),
        (
            PairPlan::new("", HaTiming::default()).config(Node::A, "active"),
            vec![],
        ),
    ] {
        let (code, err) = check(&text, &args);
        assert_eq!(code, Some(0), "{text}\n{args:?}\n{err}");
    }
    // A reload cannot turn authentication on over a plain link either (`[ha]` is the
    // running one: it changes at a restart only); the running configuration stays.
    let no_auth = PairPlan::new("", HaTiming::default());
    let a = no_auth.start(PCPD, Node::A, "active");
    let section = auth.replace("default = \"required\"", "default = \"optional\"");
    a.rewrite_config(&format!(
        "{section}\n{}",
        no_auth.ha_section(Node::A, "active")
    ));
    let (status, body) = a.post("/reload");
    assert_ne!(status, 200, "{body}");
    assert!(body.contains("ha.replicate_sessions"), "{body}");
    assert_eq!(
        a.metric("pcp_auth_sessions_established_total"),
        None,
        "auth turned on"
    );
}

#[test]
fn without_session_replication_clients_reauthenticate_after_failover() {
    let dir = TempDir::new();
    let (auth, ca) = auth_files(&dir, "required", 600);
    let plan = PairPlan::new(&auth, HaTiming::default());
    let start = |node, role, ip| {
        common::pcpd(PCPD)
            .at(ip)
            .config(&(plan.config(node, role) + "replicate_sessions = false\n"))
            .start()
    };
    let mut a = start(Node::A, "active", plan.ip_a);
    let b = start(Node::B, "backup", plan.ip_b);
    wait_ha(&a, Duration::from_secs(10), "A active and ready", |h| {
        h["role"] == "active" && h["ready"] == true && h["backup_status"] == "ready"
    });
    wait_ha(&b, Duration::from_secs(10), "B backup and ready", |h| {
        h["role"] == "backup" && h["ready"] == true
    });
    let mut p = Peer::to(&ca, a.pcp, "correct horse", IpAddr::V4(plan.ip_b));
    assert!(matches!(p.authenticate(), ClientEvent::Established { .. }));
    let m = p.map_with(5000, true, &[PcpOption::CheckpointRequired]);
    let r = p.exchange(&m).expect("the held reply, released");
    let now = p.now();
    p.client.verify_response(now, &r).expect("tagged");
    let Body::Map(body) = Response::parse(&r).unwrap().body else {
        panic!("not a MAP")
    };
    assert_eq!(a.ha()["sessions"], 0, "nothing kept for the backup");
    assert_eq!(b.ha()["sessions"], 0);
    a.kill9();
    wait_ha(&b, Duration::from_secs(10), "B takes over", |h| {
        h["role"] == "active"
    });
    p.server = b.pcp;
    let stale = p.map_with(5000, true, &[PcpOption::CheckpointRequired]);
    let r = p.exchange(&stale).expect("an answer");
    assert_eq!(result(&r), ResultCode::UnknownSessionId);
    let now = p.now();
    assert!(p.client.verify_response(now, &r).is_err());
    assert_eq!(p.client.poll_event(), Some(ClientEvent::Ended(Ended::Lost)));
    authenticate_at(&mut p, &b);
    let renew = p.map_with(5000, true, &[]);
    let r = p.exchange(&renew).expect("an answer");
    let now = p.now();
    p.client.verify_response(now, &r).expect("tagged by B");
    let Body::Map(renewed) = Response::parse(&r).unwrap().body else {
        panic!("not a MAP")
    };
    assert_eq!(renewed.external_port, body.external_port);
}

/// RFC 7652 §3.2 at a takeover: a host with a PA session that lost an unprotected
/// mapping gets the successor's unsolicited ANNOUNCE tagged for its (replicated)
/// session, each copy with a sequence number of its own, so that the client — which
/// drops untagged messages while it has a session — verifies and acts on it.
/// Verified with the client side of `pcp-auth` (key, session, replay window).
#[test]
fn takeover_announce_is_tagged_for_the_hosts_pa_session() {
    let dir = TempDir::new();
    let (auth, ca) = auth_files(&dir, "required", 600);
    let plan = PairPlan::new(&auth, HaTiming::default());
    let mut a = start_keyed(&plan, &dir, Node::A, "active");
    let b = start_keyed(&plan, &dir, Node::B, "backup");
    wait_ha(&a, Duration::from_secs(10), "A active and ready", |h| {
        h["role"] == "active" && h["ready"] == true && h["backup_status"] == "ready"
    });
    wait_ha(&b, Duration::from_secs(10), "B backup and ready", |h| {
        h["role"] == "backup" && h["ready"] == true
    });
    let host = common::fresh_ip();
    let listener = UdpSocket::bind((host, pcp_proto::CLIENT_PORT)).expect("bind 5350");
    listener
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut p = Peer::to(&ca, a.pcp, "correct horse", IpAddr::V4(host));
    authenticate_at(&mut p, &a);
    let m = p.map_with(5000, true, &[PcpOption::CheckpointRequired]);
    let r = p.exchange(&m).expect("the held reply, released");
    let now = p.now();
    p.client.verify_response(now, &r).expect("tagged");
    assert!(Response::parse(&r).unwrap().options.checkpoint_required());
    // An unprotected mapping: the host now has something to lose.
    let m = p.map_with(5001, true, &[]);
    let r = p.exchange(&m).expect("an answer");
    let now = p.now();
    p.client.verify_response(now, &r).expect("tagged");
    assert!(!Response::parse(&r).unwrap().options.checkpoint_required());
    common::wait_for(Duration::from_secs(5), "B holds the session", || {
        (b.ha()["sessions"] == 1).then_some(())
    });
    common::kill_settled_active(&mut a, &b, Duration::from_secs(10));
    let mut copies = Vec::new();
    let until = Instant::now() + Duration::from_millis(1500);
    let mut buf = [0u8; 1100];
    while Instant::now() < until {
        if let Ok((n, from)) = listener.recv_from(&mut buf) {
            assert_eq!(from, b.pcp, "from the successor's PCP address");
            copies.push(buf[..n].to_vec());
        }
    }
    assert!(
        copies.len() >= 2,
        "the burst's first copies: {}",
        copies.len()
    );
    for d in &copies {
        let now = p.now();
        p.client
            .verify_response(now, d)
            .expect("tagged for the client's session, not a replay");
        let r = Response::parse(d).unwrap();
        assert_eq!(r.body, Body::Announce);
        assert!(r.epoch <= 2, "the host's epoch starts again: {}", r.epoch);
    }
    assert_eq!(p.client.poll_event(), None, "the session carried on");
    assert!(b.metric("pcp_announces_total{outcome=\"tagged\"}") >= Some(copies.len() as f64));
    assert_eq!(
        b.metric("pcp_announces_total{outcome=\"plain\"}"),
        Some(0.0),
        "nothing untagged to a host with a PA session"
    );
}

/// The start-up ANNOUNCE burst (`announce_multicast`) is multicast, hence untagged,
/// and a client with a PA session drops untagged messages (RFC 7652 §3.2): a host
/// that has a session while the burst lasts gets its copies unicast, tagged for its
/// session. Verified with the client side of `pcp-auth`.
#[test]
fn startup_announce_burst_reaches_a_pa_session_tagged() {
    let s = setup_config("required", 600, "\n[pcpd]\nannounce_multicast = true\n");
    let host = common::fresh_ip();
    let listener = UdpSocket::bind((host, pcp_proto::CLIENT_PORT)).expect("bind 5350");
    listener
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut p = Peer::new_at(&s, "correct horse", IpAddr::V4(host));
    assert!(matches!(p.authenticate(), ClientEvent::Established { .. }));
    // Copies at 0.25, 0.75, 1.75, 3.75, 7.75 s … after the start: one falls after
    // the session is up.
    let until = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 1100];
    let got = loop {
        assert!(
            Instant::now() < until,
            "no ANNOUNCE for the PA session's host"
        );
        if let Ok((n, from)) = listener.recv_from(&mut buf) {
            assert_eq!(from, s.pcpd.pcp, "from pcpd's PCP address");
            break buf[..n].to_vec();
        }
    };
    let now = p.now();
    p.client
        .verify_response(now, &got)
        .expect("tagged for the client's session");
    assert_eq!(Response::parse(&got).unwrap().body, Body::Announce);
    assert!(s.pcpd.metric("pcp_announces_total{outcome=\"tagged\"}") >= Some(1.0));
}

/// A new CA and server certificate for `pcp.example` written over `dir`'s, returning
/// the CA.
fn new_certificate(dir: &TempDir) -> CertificateDer<'static> {
    let pki = Pki::for_name("pcp.example");
    pki.write_server(&dir.join("cert.pem"), &dir.join("key.pem"));
    pki.ca
}

/// `POST /reload`: (status, body).
fn reload(s: &Setup) -> (u16, String) {
    s.pcpd.post("/reload")
}

/// `[auth]` reloads without a restart (docs/AUTH.md, "Reload"): a user removed from the
/// credentials file loses their session (SESSION_TERMINATED) while the others keep
/// theirs; a new certificate is used for new sessions only; a broken file refuses the
/// whole reload (file, line, key) and the running configuration goes on; a mode change
/// takes effect; SIGHUP does the same as `POST /reload`.
#[test]
fn reload_of_auth_keeps_valid_sessions_and_refuses_a_broken_file() {
    let dir = TempDir::new();
    let (auth, ca) = auth_files(&dir, "required", 600);
    let users = dir.join("users");
    let alice = std::fs::read_to_string(&users).unwrap();
    let bob = users_line("bob", b"hunter2");
    std::fs::write(&users, format!("{alice}{bob}")).unwrap();
    let pcpd = common::pcpd(PCPD).config(&auth).start();
    let s = Setup {
        _dir: dir,
        pcpd,
        ca: ca.clone(),
    };
    let o = s.pcpd.ip.octets();
    let other = IpAddr::V4(std::net::Ipv4Addr::new(o[0], o[1], o[2], o[3] ^ 1));
    let mut a = Peer::new(&s, "correct horse");
    let mut b = Peer::user(&ca, s.pcpd.pcp, "bob", "hunter2", other);
    for p in [&mut a, &mut b] {
        assert!(matches!(p.authenticate(), ClientEvent::Established { .. }));
    }
    common::wait_for(Duration::from_secs(5), "both SAs at the server", || {
        (s.pcpd
            .output()
            .matches("PCP authentication succeeded")
            .count()
            >= 2)
            .then_some(())
    });

    // Bob leaves the credentials file, the certificate changes (another CA).
    std::fs::write(&users, &alice).unwrap();
    let new_ca = new_certificate(&s._dir);
    let (status, body) = reload(&s);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("1 session(s) terminated"), "{body}");
    // Bob is told (RFC 7652 §3.3) and answers; his tagged requests are not served.
    let events = b.listen(Duration::from_secs(5));
    assert!(
        events.contains(&ClientEvent::Ended(Ended::ByServer)),
        "{events:?}"
    );
    // Alice's session survives the new certificate.
    let m = a.map(5000, true);
    let r = a.exchange(&m).expect("an answer");
    assert_eq!(result(&r), ResultCode::Success);
    // New sessions get the new certificate: a client trusting the old CA fails, one
    // trusting the new CA succeeds; bob cannot come back.
    let mut old = Peer::to(&ca, s.pcpd.pcp, "correct horse", other);
    assert!(matches!(old.authenticate(), ClientEvent::Failed(_)));
    let mut new = Peer::to(&new_ca, s.pcpd.pcp, "correct horse", other);
    assert!(matches!(
        new.authenticate(),
        ClientEvent::Established { .. }
    ));
    let mut b2 = Peer::user(&new_ca, s.pcpd.pcp, "bob", "hunter2", other);
    assert_eq!(
        b2.authenticate(),
        ClientEvent::Failed(Failure::AuthenticationFailed)
    );

    // A broken credentials file with a mode change: refused as a whole, naming the
    // file, line and key; still `required`, alice still served.
    let config = s.pcpd.config_path.clone().unwrap();
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&users, format!("{alice}# comment\nmallory\n")).unwrap();
    s.pcpd
        .rewrite_config(&text.replace("default = \"required\"", "default = \"optional\""));
    let (status, body) = reload(&s);
    assert_eq!(status, 422, "{body}");
    assert!(
        body.contains("auth.credentials") && body.contains(&format!("{}:3", users.display())),
        "{body}"
    );
    let m = a.map(5001, false);
    let r = a.exchange(&m).expect("an answer");
    assert_eq!(result(&r), ResultCode::AuthenticationRequired);
    let m = a.map(5001, true);
    let r = a.exchange(&m).expect("an answer");
    assert_eq!(result(&r), ResultCode::Success);
    // Fixed, by SIGHUP: `optional` now.
    std::fs::write(&users, &alice).unwrap();
    s.pcpd.signal("HUP");
    common::wait_for(Duration::from_secs(5), "the SIGHUP reload", || {
        s.pcpd.output().contains("auth on").then_some(())
    });
    // Untagged requests are served, except from an address with a PA session (RFC
    // 7652 §3.1.3, docs/AUTH.md S2).
    let m = a.map(5002, false);
    let r = a.exchange(&m).expect("an answer");
    assert_eq!(result(&r), ResultCode::AuthenticationRequired);
    let third = IpAddr::V4(std::net::Ipv4Addr::new(o[0], o[1], o[2], o[3] ^ 2));
    let mut c = Peer::to(&new_ca, s.pcpd.pcp, "correct horse", third);
    let m = c.map(5002, false);
    let r = c.exchange(&m).expect("an answer");
    assert_eq!(result(&r), ResultCode::Success, "untagged served");
}

/// A pcpd started with authentication off turns it on at a reload, and off again.
#[test]
fn reload_turns_auth_on_and_off() {
    let dir = TempDir::new();
    let (auth, ca) = auth_files(&dir, "required", 600);
    let off = auth.replace("default = \"required\"", "default = \"off\"");
    let pcpd = common::pcpd(PCPD).config(&off).start();
    let s = Setup {
        _dir: dir,
        pcpd,
        ca,
    };
    let mut p = Peer::new(&s, "correct horse");
    let m = p.map(5000, false);
    let r = p.exchange(&m).expect("an answer");
    assert_eq!(result(&r), ResultCode::Success);
    s.pcpd.rewrite_config(&auth);
    let (status, body) = reload(&s);
    assert_eq!(status, 200, "{body}");
    let m = p.map(5001, false);
    let r = p.exchange(&m).expect("an answer");
    assert_eq!(result(&r), ResultCode::AuthenticationRequired);
    authenticate_at(&mut p, &s.pcpd);
    let m = p.map(5001, true);
    let r = p.exchange(&m).expect("an answer");
    assert_eq!(result(&r), ResultCode::Success);
    // Off again: the session is terminated and untagged requests are served.
    s.pcpd.rewrite_config(&off);
    let (status, body) = reload(&s);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("1 session(s) terminated"), "{body}");
    let m = p.map(5002, false);
    let r = p.exchange(&m).expect("an answer");
    assert_eq!(result(&r), ResultCode::Success);
}

/// The operator's view of PA sessions: `GET /auth/sessions` (identity, client, times,
/// sequence numbers, tagged requests accepted and refused), `DELETE
/// /auth/sessions/{id}` (SESSION_TERMINATED to the client), and the session metrics.
#[test]
fn admin_api_lists_and_terminates_sessions() {
    let s = setup("required");
    let mut p = Peer::new(&s, "correct horse");
    let mut wrong = Peer::to(&s.ca, s.pcpd.pcp, "wrong", IpAddr::V4(s.pcpd.ip));
    assert_eq!(
        wrong.authenticate(),
        ClientEvent::Failed(Failure::AuthenticationFailed)
    );
    authenticate_at(&mut p, &s.pcpd);
    let first = p.map(5000, true);
    assert_eq!(result(&p.exchange(&first).unwrap()), ResultCode::Success);
    let second = p.map(5001, true);
    assert_eq!(result(&p.exchange(&second).unwrap()), ResultCode::Success);
    assert_eq!(p.exchange(&first), None, "replay answered");

    let list = s.pcpd.get_json("/auth/sessions");
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    let v = &list[0];
    let local = p.sock.local_addr().unwrap().to_string();
    assert_eq!(v["identity"], "alice");
    assert_eq!(v["client"], local.as_str());
    assert_eq!(v["state"], "established");
    assert_eq!(v["accepted"], 2);
    assert_eq!(v["refused"], 1);
    assert_eq!(v["seq_in"], 1, "last accepted common sequence number");
    assert_eq!(v["seq_out"], 2, "two tagged responses sent");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let established = v["established_at"].as_u64().unwrap();
    assert!(established <= now && established + 30 > now, "{v}");
    assert_eq!(v["expires_at"].as_u64().unwrap(), established + 600, "{v}");
    assert!(v["expires_in"].as_u64().unwrap() > 590, "{v}");
    let id = v["session_id"].as_u64().unwrap();

    let m = |k: &str| s.pcpd.metric(k);
    assert_eq!(m("pcp_auth_sessions{state=\"established\"}"), Some(1.0));
    assert_eq!(m("pcp_auth_sessions_established_total"), Some(1.0));
    assert_eq!(
        m("pcp_auth_sessions_failed_total{cause=\"authentication_failed\"}"),
        Some(1.0)
    );

    // Unknown or malformed IDs.
    let (status, body) = common::http(
        "DELETE",
        s.pcpd.admin,
        &format!("/auth/sessions/{}", id ^ 1),
    );
    assert_eq!(status, 404, "{body}");
    let (status, body) = common::http("DELETE", s.pcpd.admin, "/auth/sessions/alice");
    assert_eq!(status, 400, "{body}");
    // Terminated: the client is told and answers; the session is gone.
    let (status, body) = common::http("DELETE", s.pcpd.admin, &format!("/auth/sessions/{id}"));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("alice"), "{body}");
    let events = p.listen(Duration::from_secs(5));
    assert!(
        events.contains(&ClientEvent::Ended(Ended::ByServer)),
        "{events:?}"
    );
    common::wait_for(Duration::from_secs(5), "the session gone", || {
        s.pcpd
            .get_json("/auth/sessions")
            .as_array()
            .unwrap()
            .is_empty()
            .then_some(())
    });
    assert_eq!(
        m("pcp_auth_sessions_terminated_total{reason=\"admin\"}"),
        Some(1.0)
    );
    assert_eq!(
        m("pcp_auth_sessions_ended_total{cause=\"by_server\"}"),
        Some(1.0)
    );
    assert_eq!(m("pcp_auth_sessions{state=\"established\"}"), Some(0.0));
}

/// One slow login stalls nobody else (docs/AUTH.md, "EAP work off the gate's lock"):
/// user `slow` has a deliberately expensive Argon2 hash (128 MiB, 6 passes; it never
/// verifies). While pcpd checks it, another client's untagged MAPs (`optional` mode:
/// they pass the gate and its lock too) keep being answered. Were the check done in
/// the receive task or under the gate's lock, no answer could come while it runs: the
/// longest silence would be about as long as the check itself.
#[test]
fn a_slow_password_check_does_not_stall_other_clients() {
    let dir = TempDir::new();
    let users = format!(
        "{}slow:$argon2id$v=19$m=131072,t=6,p=1$c2FsdHNhbHRzYWx0${}\n",
        users_line("alice", PASSWORD.as_bytes()),
        "A".repeat(43)
    );
    let files = AuthFiles::write(&dir.0, "pcp.example", &users);
    let pcpd = common::pcpd(PCPD)
        .config(&files.section("optional"))
        .start();
    let (ca, server) = (files.ca_der.clone(), pcpd.pcp);
    let o = pcpd.ip.octets();
    let other = IpAddr::V4([o[0], o[1], o[2], o[3] ^ 1].into());
    let slow_ip = IpAddr::V4(pcpd.ip);
    let login = std::thread::spawn(move || {
        let mut p = Peer::user(&ca, server, "slow", "anything", slow_ip);
        let started = Instant::now();
        let e = p.authenticate();
        (e, started, Instant::now())
    });
    // The other client asks every 20 ms and notes when answers come.
    let sock = UdpSocket::bind(SocketAddr::new(other, 0)).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let req = Request {
        lifetime: 600,
        client_addr: other,
        body: Body::Map(MapBody {
            nonce: [9; 12],
            protocol: 17,
            internal_port: 5900,
            external_port: 0,
            external_addr: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        }),
        options: Options::from_list(&[]),
        pa_result_code: ResultCode::Success,
    };
    let mut msg = vec![0u8; 1100];
    let n = req.emit(&mut msg).unwrap();
    msg.truncate(n);
    let mut answers = Vec::new();
    let mut buf = [0u8; 2048];
    while !login.is_finished() {
        sock.send_to(&msg, server).unwrap();
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            assert_eq!(result(&buf[..n]), ResultCode::Success);
            answers.push(Instant::now());
        }
    }
    let (event, started, ended) = login.join().unwrap();
    assert_eq!(
        event,
        ClientEvent::Failed(Failure::AuthenticationFailed),
        "{}",
        pcpd.output()
    );
    let took = ended - started;
    // The longest silence towards the other client while the login ran.
    let mut marks: Vec<Instant> = answers
        .into_iter()
        .filter(|t| *t > started && *t < ended)
        .collect();
    marks.insert(0, started);
    marks.push(ended);
    let silence = marks
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    assert!(
        silence < took / 2,
        "the other client got no answer for {silence:?} of a {took:?} login"
    );
}

/// Authenticates `p` and waits until `d` installed the security association (it does
/// when the client's confirmation arrives, after the client considers itself done).
fn authenticate_at(p: &mut Peer, d: &Pcpd) {
    assert!(matches!(p.authenticate(), ClientEvent::Established { .. }));
    common::wait_for(Duration::from_secs(5), "the server's SA", || {
        d.output()
            .contains("PCP authentication succeeded")
            .then_some(())
    });
}
