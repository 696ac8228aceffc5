//! The RADIUS front end (`radius::server`) datagram by datagram: a NAS written here
//! with the client-side codec drives our `TtlsPeer` through it. Success (the MS-MPPE
//! keys decrypt to the MSK the peer derived), failure, and every packet the RFCs say
//! to drop or reject: malformed, not an Access-Request, wrong or missing
//! Message-Authenticator, retransmitted, replayed or unknown State, too many
//! half-finished conversations, expiry.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use pcp_auth::eap::{EapPeer, PeerStep};
use pcp_eap::radius::server::{
    Dropped, Outcome, RadiusServer, RadiusServerConfig, Rejected, Reply,
};
use pcp_eap::radius::{self, AccessRequest, Answer};
use pcp_eap::{Embedded, TtlsPeer};
use pcp_testkit::eap::{embedded, ttls_peer};
use pcp_testkit::tls::Pki;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rustls::pki_types::CertificateDer;

const SECRET: &[u8] = b"front-end-secret";
const NAS: &str = "127.0.0.1:40000";

fn nas_addr() -> SocketAddr {
    NAS.parse().unwrap()
}

fn pki() -> (CertificateDer<'static>, Embedded) {
    // Several EAP-TTLS fragments, each several EAP-Message attributes.
    let pki = Pki::large("aaa.example", 40, "aaa.example");
    (pki.ca.clone(), embedded(&pki))
}

fn peer(ca: &CertificateDer<'static>, password: &str) -> TtlsPeer {
    ttls_peer(ca, "aaa.example", "alice", password.as_bytes())
}

fn server(backend: Embedded, max_sessions: usize) -> RadiusServer {
    let mut cfg = RadiusServerConfig::new(SECRET.to_vec());
    cfg.max_sessions = max_sessions;
    cfg.session_timeout_ms = 10_000;
    RadiusServer::new(cfg, backend)
}

/// A NAS: identifiers, fresh Request Authenticators, the State to echo.
struct Nas {
    secret: Vec<u8>,
    id: u8,
    state: Option<Vec<u8>>,
}

impl Nas {
    fn new() -> Nas {
        Nas {
            secret: SECRET.to_vec(),
            id: 0,
            state: None,
        }
    }

    /// An Access-Request carrying `eap` (and the State to echo) and its authenticator.
    fn request(&mut self, eap: Option<&[u8]>) -> (Vec<u8>, [u8; 16]) {
        let mut attributes = vec![(radius::ATTR_USER_NAME, b"anonymous".to_vec())];
        if let Some(s) = &self.state {
            attributes.push((radius::ATTR_STATE, s.clone()));
        }
        match eap {
            Some([]) => attributes.push((radius::ATTR_EAP_MESSAGE, Vec::new())),
            Some(e) => attributes.extend(radius::eap_attributes(e)),
            None => {}
        }
        // Distinct across every NAS of the test binary, as a real NAS's are random.
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let mut auth = [0x5a; 16];
        auth[..8].copy_from_slice(&NEXT.fetch_add(1, Ordering::Relaxed).to_be_bytes());
        self.id = self.id.wrapping_add(1);
        let p = radius::encode_request(&AccessRequest { attributes }, self.id, &auth, &self.secret);
        (p, auth)
    }
}

/// The reply of an outcome, verified and decoded as the NAS does.
fn answer(o: &Outcome, auth: &[u8; 16]) -> (Reply, Answer) {
    let Outcome::Reply { reply, kind } = o else {
        panic!("dropped: {o:?}");
    };
    (
        kind.clone(),
        radius::decode_response(reply, auth, SECRET).unwrap(),
    )
}

/// A whole conversation from the peer's EAP-Response/Identity to the server's final
/// answer, and what the peer made of that answer.
fn converse(srv: &mut RadiusServer, nas: &mut Nas, p: &mut TtlsPeer) -> (Reply, Answer, PeerStep) {
    let PeerStep::Respond(mut eap) = p.receive(&[1, 0, 0, 5, 1]) else {
        panic!("no identity response");
    };
    for _ in 0..50 {
        let (req, auth) = nas.request(Some(&eap));
        let (kind, a) = answer(&srv.handle(0, nas_addr(), &req), &auth);
        let packet = a.eap.clone().expect("every answer carries EAP");
        match kind {
            Reply::Challenge => {
                nas.state = a.state.clone();
                match p.receive(&packet) {
                    PeerStep::Respond(r) => eap = r,
                    other => panic!("peer: {other:?}"),
                }
            }
            _ => {
                let end = p.receive(&packet);
                return (kind, a, end);
            }
        }
    }
    panic!("no end");
}

#[test]
fn conversation_ends_in_accept_with_the_peers_msk_in_mppe_keys() {
    let (ca, backend) = pki();
    let mut srv = server(backend, 8);
    let mut p = peer(&ca, "correct horse");
    let (kind, a, end) = converse(&mut srv, &mut Nas::new(), &mut p);
    assert_eq!(
        kind,
        Reply::Accept {
            identity: "alice".into()
        }
    );
    assert_eq!(end, PeerStep::Success);
    assert_eq!(a.code, radius::ACCESS_ACCEPT);
    assert_eq!(a.user_name.as_deref(), Some("alice"));
    let msk = p.msk().unwrap();
    assert_eq!(msk.len(), 64);
    assert_eq!(a.msk, Some(msk), "Recv-Key || Send-Key is the peer's MSK");
    assert_eq!(srv.sessions(), 0, "a finished conversation is forgotten");
}

#[test]
fn wrong_password_ends_in_reject_with_eap_failure() {
    let (ca, backend) = pki();
    let mut srv = server(backend, 8);
    let mut p = peer(&ca, "wrong");
    let (kind, a, end) = converse(&mut srv, &mut Nas::new(), &mut p);
    assert_eq!(kind, Reply::Reject(Rejected::Failed));
    assert_eq!(a.code, radius::ACCESS_REJECT);
    assert_eq!(a.eap.as_ref().map(|e| e[0]), Some(4), "EAP-Failure");
    assert_eq!(a.msk, None);
    assert_eq!(end, PeerStep::Failure);
    assert_eq!(srv.sessions(), 0);
}

#[test]
fn malformed_and_foreign_packets_are_dropped_silently() {
    let (_, backend) = pki();
    let mut srv = server(backend, 8);
    let (good, _) = Nas::new().request(Some(&[2, 1, 0, 6, 1, b'a']));
    let mut short_len = good.clone();
    short_len[2..4].copy_from_slice(&19u16.to_be_bytes());
    let mut long_len = good.clone();
    long_len[2..4].copy_from_slice(&((good.len() + 1) as u16).to_be_bytes());
    let mut huge_len = good.clone();
    huge_len[2..4].copy_from_slice(&4097u16.to_be_bytes());
    // An attribute of length 1 and one running past the end.
    let mut bad_attr = good.clone();
    bad_attr[21] = 1;
    let mut past_end = good.clone();
    past_end[21] = 250;
    let cases: [(&str, &[u8]); 7] = [
        ("empty", &[]),
        ("header only, truncated", &good[..19]),
        ("length below 20", &short_len),
        ("length beyond the datagram", &long_len),
        ("length beyond 4096", &huge_len),
        ("attribute length 1", &bad_attr),
        ("attribute past the end", &past_end),
    ];
    for (what, p) in cases {
        assert!(
            matches!(
                srv.handle(0, nas_addr(), p),
                Outcome::Dropped(Dropped::Malformed(_))
            ),
            "{what}"
        );
    }
    // An Accounting-Request, an Access-Accept: not for us.
    for code in [4u8, radius::ACCESS_ACCEPT] {
        let mut p = good.clone();
        p[0] = code;
        assert_eq!(
            srv.handle(0, nas_addr(), &p),
            Outcome::Dropped(Dropped::NotAccessRequest(code))
        );
    }
    // Octets beyond Length are padding: still answered.
    let mut padded = good.clone();
    padded.extend_from_slice(&[0; 7]);
    assert!(matches!(
        srv.handle(0, nas_addr(), &padded),
        Outcome::Reply {
            kind: Reply::Challenge,
            ..
        }
    ));
    assert_eq!(srv.sessions(), 1);
}

#[test]
fn wrong_secret_missing_or_tampered_message_authenticator_is_dropped() {
    let (_, backend) = pki();
    let mut srv = server(backend, 8);
    let identity = [2u8, 1, 0, 6, 1, b'a'];
    let mut other = Nas::new();
    other.secret = b"not-the-secret".to_vec();
    let (p, _) = other.request(Some(&identity));
    assert_eq!(
        srv.handle(0, nas_addr(), &p),
        Outcome::Dropped(Dropped::Unauthenticated(
            "Message-Authenticator does not verify"
        ))
    );
    // The same request without its Message-Authenticator (sent first, 18 octets).
    let (mut p, _) = Nas::new().request(Some(&identity));
    assert_eq!(p[20], radius::ATTR_MESSAGE_AUTHENTICATOR);
    p.drain(20..38);
    let len = p.len() as u16;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    assert_eq!(
        srv.handle(0, nas_addr(), &p),
        Outcome::Dropped(Dropped::Unauthenticated(
            "no (or more than one) Message-Authenticator"
        ))
    );
    // One octet of an attribute changed after signing.
    let (mut p, _) = Nas::new().request(Some(&identity));
    p[22] ^= 1;
    assert!(matches!(
        srv.handle(0, nas_addr(), &p),
        Outcome::Dropped(Dropped::Unauthenticated(_))
    ));
    assert_eq!(srv.sessions(), 0, "nothing dropped left a conversation");
}

#[test]
fn retransmission_gets_the_same_reply_without_a_second_conversation() {
    let (_, backend) = pki();
    let mut srv = server(backend, 8);
    let (p, _) = Nas::new().request(Some(&[2, 1, 0, 6, 1, b'a']));
    let Outcome::Reply { reply: first, .. } = srv.handle(0, nas_addr(), &p) else {
        panic!()
    };
    assert_eq!(
        srv.handle(5, nas_addr(), &p),
        Outcome::Reply {
            reply: first.clone(),
            kind: Reply::Retransmission
        }
    );
    assert_eq!(srv.sessions(), 1);
    // The same bytes from another port are another request (RFC 5080 §2.2.2 keys
    // duplicates by source too).
    let other: SocketAddr = "127.0.0.1:40001".parse().unwrap();
    assert!(matches!(
        srv.handle(5, other, &p),
        Outcome::Reply {
            kind: Reply::Challenge,
            ..
        }
    ));
    assert_eq!(srv.sessions(), 2);
}

#[test]
fn replayed_and_unknown_state_is_rejected() {
    let (ca, backend) = pki();
    let mut srv = server(backend, 8);
    let mut p = peer(&ca, "correct horse");
    let mut nas = Nas::new();
    let PeerStep::Respond(id_resp) = p.receive(&[1, 0, 0, 5, 1]) else {
        panic!()
    };
    let (req, auth) = nas.request(Some(&id_resp));
    let (_, a) = answer(&srv.handle(0, nas_addr(), &req), &auth);
    let old_state = a.state.clone().unwrap();
    assert_eq!(old_state.len(), 16);
    nas.state = Some(old_state.clone());
    let PeerStep::Respond(hello) = p.receive(&a.eap.unwrap()) else {
        panic!()
    };
    let (req, auth) = nas.request(Some(&hello));
    let (kind, a) = answer(&srv.handle(0, nas_addr(), &req), &auth);
    assert_eq!(kind, Reply::Challenge);
    assert_ne!(
        a.state.as_ref(),
        Some(&old_state),
        "a fresh State each time"
    );
    // The same State in a new request (not a retransmission): already used.
    let (req, auth) = nas.request(Some(&hello));
    let (kind, a) = answer(&srv.handle(0, nas_addr(), &req), &auth);
    assert_eq!(kind, Reply::Reject(Rejected::UnknownState));
    assert_eq!(a.eap.as_ref().map(|e| e[0]), Some(4), "EAP-Failure");
    // A State we never sent, and one of the wrong length.
    for s in [vec![0xaa; 16], b"short".to_vec()] {
        nas.state = Some(s);
        let (req, auth) = nas.request(Some(&hello));
        let (kind, _) = answer(&srv.handle(0, nas_addr(), &req), &auth);
        assert_eq!(kind, Reply::Reject(Rejected::UnknownState));
    }
    assert_eq!(srv.sessions(), 1, "the live conversation is untouched");
}

#[test]
fn half_finished_conversations_are_bounded_and_expire() {
    let (_, backend) = pki();
    let mut srv = server(backend, 2);
    let identity = [2u8, 1, 0, 6, 1, b'a'];
    let mut states = Vec::new();
    for _ in 0..2 {
        let mut nas = Nas::new();
        let (req, auth) = nas.request(Some(&identity));
        let (kind, a) = answer(&srv.handle(0, nas_addr(), &req), &auth);
        assert_eq!(kind, Reply::Challenge);
        states.push(a.state.unwrap());
    }
    let (req, auth) = Nas::new().request(Some(&identity));
    let (kind, a) = answer(&srv.handle(1_000, nas_addr(), &req), &auth);
    assert_eq!(kind, Reply::Reject(Rejected::TooManySessions));
    assert_eq!(a.eap.as_ref().map(|e| e[0]), Some(4));
    assert_eq!(srv.sessions(), 2);
    assert_eq!(srv.poll_timeout(), Some(10_000));
    // At the timeout both are forgotten: room again, and their States are unknown.
    srv.handle_timeout(10_000);
    assert_eq!(srv.sessions(), 0);
    let mut nas = Nas::new();
    nas.state = Some(states[0].clone());
    let (req, auth) = nas.request(Some(&[2, 2, 0, 6, 21, 0]));
    let (kind, _) = answer(&srv.handle(10_000, nas_addr(), &req), &auth);
    assert_eq!(kind, Reply::Reject(Rejected::UnknownState));
    let (req, auth) = Nas::new().request(Some(&identity));
    let (kind, _) = answer(&srv.handle(10_000, nas_addr(), &req), &auth);
    assert_eq!(kind, Reply::Challenge);
}

#[test]
fn eap_start_gets_an_identity_request_and_no_eap_is_rejected() {
    let (_, backend) = pki();
    let mut srv = server(backend, 8);
    let (req, auth) = Nas::new().request(Some(&[]));
    let (kind, a) = answer(&srv.handle(0, nas_addr(), &req), &auth);
    assert_eq!(kind, Reply::Challenge);
    let eap = a.eap.unwrap();
    assert_eq!((eap[0], eap[4]), (1, 1), "EAP-Request/Identity");
    let (req, auth) = Nas::new().request(None);
    let (kind, _) = answer(&srv.handle(0, nas_addr(), &req), &auth);
    assert_eq!(kind, Reply::Reject(Rejected::NoEap));
    // A first EAP packet that is not an identity response: ignored, no conversation.
    let (req, _) = Nas::new().request(Some(&[2, 1, 0, 6, 21, 0]));
    assert_eq!(
        srv.handle(0, nas_addr(), &req),
        Outcome::Dropped(Dropped::EapDiscarded)
    );
    assert_eq!(srv.sessions(), 1);
}

/// Random datagrams and random corruptions of a valid request: never a panic, never
/// a conversation.
#[test]
fn random_and_corrupted_datagrams_never_panic() {
    let (_, backend) = pki();
    let mut srv = server(backend, 8);
    let mut rng = StdRng::seed_from_u64(7652);
    let (good, _) = Nas::new().request(Some(&[2, 1, 0, 6, 1, b'a']));
    for i in 0..20_000 {
        let p: Vec<u8> = if i % 2 == 0 {
            let n = rng.random_range(0..200);
            let mut p: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            if p.len() >= 4 && rng.random_bool(0.5) {
                p[0] = 1;
                p[2..4].copy_from_slice(&(n as u16).to_be_bytes());
            }
            p
        } else {
            let mut p = good.clone();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..p.len());
                p[at] = rng.random();
            }
            if p == good {
                continue;
            }
            p
        };
        assert!(
            matches!(srv.handle(0, nas_addr(), &p), Outcome::Dropped(_)),
            "{p:?}"
        );
    }
    assert_eq!(srv.sessions(), 0);
}
