//! Regression tests for the findings of the RFC 7652 review (docs/AUTH.md, "Review
//! findings"): each drives the server or client with hand-made PA messages, so the
//! attack or the lost/duplicated packet is exactly the one the finding describes.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use pcp_auth::Time;
use pcp_auth::client::{Client, ClientConfig, ClientEvent, Ended};
use pcp_auth::crypto::{AUTH_HMAC_SHA2_256_128, PRF_HMAC_SHA2_256};
use pcp_auth::gate::{Gate, Inbound, Mode, Rules};
use pcp_auth::server::{Cause, Server, ServerConfig, ServerEvent};
use pcp_proto::{AuthenticationBody, Body, Options, PcpOption, Request, Response, ResultCode};
use pcp_testkit::pcp::tcp_map_request;
use rand::SeedableRng;
use rand::rngs::StdRng;
use support::{ToyPeer, ToyServer};

const IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));
const SRC: SocketAddr = SocketAddr::new(IP, 5350);

type Srv = Server<ToyServer, Box<dyn FnMut() -> ToyServer>>;

fn server(cfg: ServerConfig) -> Srv {
    Server::with_rng(
        cfg,
        Box::new(|| ToyServer::new(&[("alice", "pw")], 7)),
        StdRng::seed_from_u64(2),
    )
}

/// An untagged PA-Client message.
fn pa(from: IpAddr, rc: ResultCode, session_id: u32, seq: u32, opts: &[PcpOption]) -> Vec<u8> {
    let req = Request {
        lifetime: 0,
        client_addr: from,
        body: Body::Authentication(AuthenticationBody {
            session_id,
            sequence_number: seq,
        }),
        options: Options::from_list(opts),
        pa_result_code: rc,
    };
    let mut b = vec![0u8; 1100];
    let n = req.emit(&mut b).unwrap();
    b.truncate(n);
    b
}

/// Everything the server sends, parsed: (destination, result code, session ID, sequence
/// number, raw).
fn sent(s: &mut Srv) -> Vec<(SocketAddr, ResultCode, u32, u32, Vec<u8>)> {
    std::iter::from_fn(|| s.poll_transmit())
        .map(|t| {
            let r = Response::parse(&t.payload).unwrap();
            let Body::Authentication(b) = r.body else {
                panic!("not a PA message")
            };
            (
                t.dst,
                r.result_code,
                b.session_id,
                b.sequence_number,
                t.payload.clone(),
            )
        })
        .collect()
}

/// A PA-Initiation from `src` with `nonce`.
fn initiation(src: SocketAddr, nonce: u32) -> Vec<u8> {
    pa(
        src.ip(),
        ResultCode::Initiation,
        0,
        0,
        &[PcpOption::Nonce(nonce)],
    )
}

/// S1: a session whose client chose algorithms but sent no EAP payload (so the
/// authenticator never answers and no retransmission timer runs) still ends after the
/// maximum retransmission duration.
#[test]
fn s1_half_open_session_without_eap_payload_expires() {
    let mut s = server(ServerConfig::default());
    let t0 = Time(1_000);
    s.handle(t0, SRC, &initiation(SRC, 42));
    let first = sent(&mut s);
    assert_eq!(first.len(), 1);
    let sid = first[0].2;
    let reply = pa(
        IP,
        ResultCode::AuthenticationReply,
        sid,
        1,
        &[
            PcpOption::Prf(PRF_HMAC_SHA2_256),
            PcpOption::MacAlgorithm(AUTH_HMAC_SHA2_256_128),
        ],
    );
    s.handle(t0, SRC, &reply);
    assert_eq!(s.session_count(), 1);
    let deadline = s
        .poll_timeout()
        .expect("a half-open session has a deadline");
    assert!(
        deadline <= t0.plus(Duration::from_secs(120)),
        "{deadline:?}"
    );
    s.handle_timeout(t0.plus(Duration::from_secs(48 * 3600)));
    assert_eq!(s.session_count(), 0);
    assert!(std::iter::from_fn(|| s.poll_event()).any(|e| e
        == ServerEvent::Ended {
            session_id: sid,
            cause: Cause::Timeout
        }));
}

/// S1: the same with an EAP payload the authenticator discards (wrong identifier).
#[test]
fn s1_half_open_session_with_discarded_eap_expires() {
    let mut s = server(ServerConfig::default());
    let t0 = Time(1_000);
    s.handle(t0, SRC, &initiation(SRC, 43));
    let sid = sent(&mut s)[0].2;
    let bogus = [2u8, 99, 0, 6, 1, b'x'];
    let reply = pa(
        IP,
        ResultCode::AuthenticationReply,
        sid,
        1,
        &[
            PcpOption::Prf(PRF_HMAC_SHA2_256),
            PcpOption::MacAlgorithm(AUTH_HMAC_SHA2_256_128),
            PcpOption::EapPayload(&bogus),
        ],
    );
    s.handle(t0, SRC, &reply);
    assert!(sent(&mut s).is_empty());
    // Run the timers the way a shell does.
    let mut now = t0;
    while let Some(t) = s.poll_timeout() {
        assert!(t.0 < t0.0 + 3_600_000, "still there after an hour");
        now = t.max(now);
        s.handle_timeout(now);
        sent(&mut s);
    }
    assert_eq!(s.session_count(), 0);
}

/// A client and server authenticated over a perfect link at `now`; returns the client's
/// last PA message (its AUTHENTICATION_SUCCEEDED confirmation) and the server's (its
/// AUTHENTICATION_SUCCEEDED).
fn established_pair(now: Time) -> (Client<ToyPeer>, Srv, Vec<u8>, Vec<u8>) {
    let mut c = Client::with_rng(
        ClientConfig::new(IP),
        ToyPeer::new("alice", "pw"),
        StdRng::seed_from_u64(1),
    );
    let mut s = server(ServerConfig::default());
    c.start(now);
    let (mut last, mut last_server) = (Vec::new(), Vec::new());
    for _ in 0..30 {
        while let Some(m) = c.poll_transmit() {
            s.handle(now, SRC, &m);
            last = m;
        }
        while let Some(t) = s.poll_transmit() {
            c.handle(now, &t.payload);
            last_server = t.payload;
        }
    }
    assert!(c.is_established());
    (c, s, last, last_server)
}

/// S3: one duplicate of the client's confirmation, on a path with 600 ms round trips
/// (above the 500 ms duplicate-answer limit), does not start a ping-pong.
#[test]
fn s3_duplicate_of_the_confirmation_is_not_answered() {
    let t0 = Time(10_000);
    let (mut c, mut s, confirmation, _) = established_pair(t0);
    let r = Request::parse(&confirmation).unwrap();
    assert_eq!(r.pa_result_code, ResultCode::AuthenticationSucceeded);
    let mut now = t0;
    let mut to_server = vec![confirmation];
    let mut bounces = 0;
    for _ in 0..20 {
        now = now.plus(Duration::from_millis(600));
        let mut to_client = Vec::new();
        for m in to_server.drain(..) {
            s.handle(now, SRC, &m);
        }
        to_client.extend(std::iter::from_fn(|| s.poll_transmit()).map(|t| t.payload));
        bounces += to_client.len();
        now = now.plus(Duration::from_millis(600));
        for m in to_client {
            c.handle(now, &m);
        }
        to_server.extend(std::iter::from_fn(|| c.poll_transmit()));
        bounces += to_server.len();
    }
    assert_eq!(bounces, 0, "the copy of a final message got answers");
    assert!(c.is_established());
    assert_eq!(s.session_count(), 1);
}

/// S3: the server's SUCCEEDED copy (its confirmation lost) is still answered by the
/// client with its confirmation, once.
#[test]
fn s3_copy_of_succeeded_is_still_answered_once() {
    let t0 = Time(10_000);
    let (mut c, _s, _, succeeded) = established_pair(t0);
    assert_eq!(
        Response::parse(&succeeded).unwrap().result_code,
        ResultCode::AuthenticationSucceeded
    );
    c.handle(t0.plus(Duration::from_secs(1)), &succeeded);
    let answers: Vec<_> = std::iter::from_fn(|| c.poll_transmit()).collect();
    assert_eq!(answers.len(), 1);
    let r = Request::parse(&answers[0]).unwrap();
    assert_eq!(r.pa_result_code, ResultCode::AuthenticationSucceeded);
}

fn gate(mode: Mode) -> Gate<ToyServer, Box<dyn FnMut() -> ToyServer>> {
    let rules = Rules {
        default: Mode::Off,
        prefixes: vec![("192.0.2.0/24".parse().unwrap(), mode)],
    };
    Gate::new(rules, server(ServerConfig::default()))
}

/// Authenticates `c` through the gate (perfect link).
fn authenticate(
    g: &mut Gate<ToyServer, Box<dyn FnMut() -> ToyServer>>,
    c: &mut Client<ToyPeer>,
    now: Time,
) {
    c.start(now);
    for _ in 0..30 {
        while let Some(mut m) = c.poll_transmit() {
            let n = m.len();
            assert_eq!(g.inbound(now, SRC, 0, &mut m, n), Inbound::Handled);
        }
        while let Some(t) = g.poll_transmit() {
            c.handle(now, &t.payload);
        }
    }
    assert!(c.is_established());
}

fn untagged_map(from: IpAddr) -> Vec<u8> {
    let (mut b, n) = tcp_map_request(from, 80, 60);
    b.truncate(n);
    b
}

fn through(
    g: &mut Gate<ToyServer, Box<dyn FnMut() -> ToyServer>>,
    now: Time,
    src: SocketAddr,
    m: &[u8],
) -> Inbound {
    let mut buf = m.to_vec();
    buf.resize(1100, 0);
    g.inbound(now, src, 0, &mut buf, m.len())
}

/// S2: with `auth = optional`, an untagged request from the address of an
/// authenticated client gets AUTHENTICATION_REQUIRED (RFC 7652 §3.1.3); other
/// addresses are still served untagged, and so is the client's after its session ends.
#[test]
fn s2_optional_refuses_untagged_requests_from_an_authenticated_address() {
    let now = Time(5_000);
    let mut g = gate(Mode::Optional);
    let other = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 11)), 5350);
    assert!(matches!(
        through(&mut g, now, SRC, &untagged_map(IP)),
        Inbound::Serve { session: None, .. }
    ));
    let mut c = Client::with_rng(
        ClientConfig::new(IP),
        ToyPeer::new("alice", "pw"),
        StdRng::seed_from_u64(1),
    );
    authenticate(&mut g, &mut c, now);
    let Inbound::Answer(a) = through(&mut g, now, SRC, &untagged_map(IP)) else {
        panic!("served untagged from an authenticated address");
    };
    assert_eq!(
        Response::parse(&a).unwrap().result_code,
        ResultCode::AuthenticationRequired
    );
    assert!(matches!(
        through(&mut g, now, other, &untagged_map(other.ip())),
        Inbound::Serve { session: None, .. }
    ));
    // The session ends (the client terminates it): untagged is served again.
    c.terminate(now);
    for _ in 0..5 {
        while let Some(mut m) = c.poll_transmit() {
            let n = m.len();
            g.inbound(now, SRC, 0, &mut m, n);
        }
        while let Some(t) = g.poll_transmit() {
            c.handle(now, &t.payload);
        }
    }
    assert_eq!(g.server.session_count(), 0);
    assert!(matches!(
        through(&mut g, now, SRC, &untagged_map(IP)),
        Inbound::Serve { session: None, .. }
    ));
}

/// S4: a (possibly spoofed) PA-Initiation gets one PA-Server and nothing more on a
/// timer; the sender's own retransmissions get it again; the session is gone after MRD.
#[test]
fn s4_first_pa_server_is_not_retransmitted() {
    let mut s = server(ServerConfig::default());
    let t0 = Time(1_000);
    let init = initiation(SRC, 7);
    s.handle(t0, SRC, &init);
    let first = sent(&mut s);
    assert_eq!(first.len(), 1);
    let mut timer_sent = 0;
    let mut now = t0;
    while let Some(t) = s.poll_timeout() {
        now = t.max(now);
        s.handle_timeout(now);
        timer_sent += sent(&mut s).len();
    }
    assert_eq!(
        timer_sent, 0,
        "PA-Servers sent to an unverified address on a timer"
    );
    assert_eq!(s.session_count(), 0);
    assert!(now <= t0.plus(Duration::from_secs(121)));
    // A real client's retransmission is answered with the same PA-Server.
    let mut s = server(ServerConfig::default());
    s.handle(t0, SRC, &init);
    let first = sent(&mut s);
    s.handle(t0.plus(Duration::from_secs(3)), SRC, &init);
    let again = sent(&mut s);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].4, first[0].4);
    assert_eq!(s.session_count(), 1);
}

/// S4: the gate's server-initiated sessions: one per source however often it retries
/// its untagged request; retries re-send that session's first PA-Server (rate-limited).
#[test]
fn s4_one_server_initiated_session_per_source() {
    let mut g = gate(Mode::Required);
    g.initiate = true;
    let mut now = Time(1_000);
    let mut pa_servers = 0;
    for _ in 0..6 {
        let Inbound::Answer(a) = through(&mut g, now, SRC, &untagged_map(IP)) else {
            panic!("not refused");
        };
        assert_eq!(
            Response::parse(&a).unwrap().result_code,
            ResultCode::AuthenticationRequired
        );
        pa_servers += std::iter::from_fn(|| g.poll_transmit()).count();
        now = now.plus(Duration::from_millis(200));
    }
    assert_eq!(g.server.session_count(), 1);
    // 0 ms, then 1000 ms (the 200/400/600/800 ms retries are within 500 ms of a send).
    assert!((1..=3).contains(&pa_servers), "{pa_servers}");
    // Another source gets its own.
    let other = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 11)), 5350);
    through(&mut g, now, other, &untagged_map(other.ip()));
    assert_eq!(g.server.session_count(), 2);
}

/// S4: sessions without an SA are capped per /24 (IPv4) and /56 (IPv6).
#[test]
fn s4_half_open_sessions_are_capped_per_prefix() {
    let cfg = ServerConfig {
        max_half_open_per_prefix: 4,
        ..ServerConfig::default()
    };
    let mut s = server(cfg);
    let t0 = Time(1_000);
    for i in 1..=10u8 {
        let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, i)), 5350);
        s.handle(t0, src, &initiation(src, u32::from(i)));
    }
    assert_eq!(s.session_count(), 4);
    for i in 1..=10u16 {
        let src = SocketAddr::new(
            IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0x12, 0, 0, 0, i)),
            5350,
        );
        s.handle(t0, src, &initiation(src, u32::from(i)));
    }
    assert_eq!(s.session_count(), 8);
    let elsewhere = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)), 5350);
    s.handle(t0, elsewhere, &initiation(elsewhere, 1));
    assert_eq!(s.session_count(), 9);
    // When they time out, the prefix may open sessions again.
    s.handle_timeout(t0.plus(Duration::from_secs(200)));
    assert_eq!(s.session_count(), 0);
    let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 200)), 5350);
    s.handle(t0.plus(Duration::from_secs(201)), src, &initiation(src, 99));
    assert_eq!(s.session_count(), 1);
}

/// I1: PA-Server messages carry the Epoch Time the PCP server core gives the client
/// (passed to the gate), advancing with time, also for messages sent on timers.
#[test]
fn i1_pa_server_epoch_is_the_cores() {
    let mut g = gate(Mode::Required);
    let t0 = Time(1_000);
    let mut c = Client::with_rng(
        ClientConfig::new(IP),
        ToyPeer::new("alice", "pw"),
        StdRng::seed_from_u64(1),
    );
    c.start(t0);
    let mut m = c.poll_transmit().unwrap();
    let n = m.len();
    // The core's epoch for this client: 90 000 s (e.g. continued after a takeover).
    assert_eq!(g.inbound(t0, SRC, 90_000, &mut m, n), Inbound::Handled);
    let first = g.poll_transmit().unwrap();
    assert_eq!(Response::parse(&first.payload).unwrap().epoch, 90_000);
    let t1 = t0.plus(Duration::from_secs(2));
    c.handle(t1, &first.payload);
    let mut m = c.poll_transmit().unwrap();
    let n = m.len();
    g.inbound(t1, SRC, 90_002, &mut m, n);
    let second = g.poll_transmit().unwrap();
    assert_eq!(Response::parse(&second.payload).unwrap().epoch, 90_002);
    // Sent on the server's own initiative 10 s later: still the core's clock.
    let id = match Response::parse(&second.payload).unwrap().body {
        Body::Authentication(b) => b.session_id,
        _ => unreachable!(),
    };
    let t2 = t1.plus(Duration::from_secs(10));
    g.server.terminate(t2, id);
    let term = g.poll_transmit().unwrap();
    assert_eq!(Response::parse(&term.payload).unwrap().epoch, 90_012);
    // A server-initiated session too.
    let mut g = gate(Mode::Required);
    g.initiate = true;
    let mut buf = untagged_map(IP);
    let n = buf.len();
    buf.resize(1100, 0);
    let _ = g.inbound(t0, SRC, 777, &mut buf, n);
    let pa = g.poll_transmit().expect("the server-initiated PA-Server");
    assert_eq!(Response::parse(&pa.payload).unwrap().epoch, 777);
}

/// M1: UNKNOWN_SESSION_ID in answer to a PA-Client (the server lost the session)
/// makes the client start a full authentication at once, not wait out the MRD.
#[test]
fn m1_unknown_session_id_in_a_pa_server_restarts_authentication() {
    let t0 = Time(10_000);
    let (mut c, _old, _, _) = established_pair(t0);
    std::iter::from_fn(|| c.poll_event()).for_each(drop);
    // The server restarts and forgets everything.
    let mut s = server(ServerConfig::default());
    c.reauthenticate(t0);
    let init = c.poll_transmit().unwrap();
    s.handle(t0, SRC, &init);
    let answer = s.poll_transmit().expect("UNKNOWN_SESSION_ID");
    assert_eq!(
        Response::parse(&answer.payload).unwrap().result_code,
        ResultCode::UnknownSessionId
    );
    // A forged one for another sequence number changes nothing.
    let mut forged = answer.payload.clone();
    forged[31] ^= 1; // the low octet of the sequence number
    c.handle(t0, &forged);
    assert!(c.poll_transmit().is_none());
    c.handle(t0, &answer.payload);
    let events: Vec<_> = std::iter::from_fn(|| c.poll_event()).collect();
    assert_eq!(events, [ClientEvent::Ended(Ended::Lost)]);
    let next = c.poll_transmit().expect("a new PA-Initiation");
    let r = Request::parse(&next).unwrap();
    assert_eq!(r.pa_result_code, ResultCode::Initiation);
    assert!(matches!(
        r.body,
        Body::Authentication(AuthenticationBody { session_id: 0, .. })
    ));
    // And it authenticates with the new server.
    s.handle(t0, SRC, &next);
    for _ in 0..30 {
        while let Some(t) = s.poll_transmit() {
            c.handle(t0, &t.payload);
        }
        while let Some(m) = c.poll_transmit() {
            s.handle(t0, SRC, &m);
        }
    }
    assert!(c.is_established());
}

/// I2: a SUCCEEDED whose PA_AUTHENTICATION_TAG has Key ID 0 (RFC 7652 §5.4: the MSK
/// used directly) is refused explicitly: AUTHENTICATION_FAILED and a failure event,
/// not a silent wait until the MRD.
#[test]
fn i2_key_id_zero_is_refused_explicitly() {
    let now = Time(10_000);
    let mut c = Client::with_rng(
        ClientConfig::new(IP),
        ToyPeer::new("alice", "pw"),
        StdRng::seed_from_u64(1),
    );
    let mut s = server(ServerConfig::default());
    c.start(now);
    let mut refused = None;
    'run: for _ in 0..30 {
        while let Some(m) = c.poll_transmit() {
            if Request::parse(&m).unwrap().pa_result_code == ResultCode::AuthenticationFailed {
                refused = Some(m);
                break 'run;
            }
            s.handle(now, SRC, &m);
        }
        while let Some(t) = s.poll_transmit() {
            let mut m = t.payload;
            if Response::parse(&m).unwrap().result_code == ResultCode::AuthenticationSucceeded {
                // The last option is the PA_AUTHENTICATION_TAG: Key ID, then 16 MAC octets.
                let n = m.len();
                m[n - 20..n - 16].copy_from_slice(&[0; 4]);
            }
            c.handle(now, &m);
        }
    }
    assert!(refused.is_some(), "no AUTHENTICATION_FAILED");
    assert!(!c.is_established());
    let events: Vec<_> = std::iter::from_fn(|| c.poll_event()).collect();
    assert_eq!(
        events,
        [ClientEvent::Failed(
            pcp_auth::client::Failure::NoCommonAlgorithm
        )]
    );
}

/// M2: in a server-initiated session, the PA-Server after the client's first PA-Client
/// echoes its nonce also when it is a failure (here: an algorithm not offered), so the
/// client does not drop it and stall.
#[test]
fn m2_failure_after_the_first_pa_client_echoes_the_nonce() {
    let now = Time(1_000);
    let mut s = server(ServerConfig::default());
    let sid = s.start(now, SRC).unwrap();
    sent(&mut s);
    let identity = [2u8, 1, 0, 10, 1, b'a', b'l', b'i', b'c', b'e'];
    let reply = pa(
        IP,
        ResultCode::AuthenticationReply,
        sid,
        0,
        &[
            PcpOption::Nonce(0xdead_beef),
            PcpOption::Prf(99),
            PcpOption::MacAlgorithm(AUTH_HMAC_SHA2_256_128),
            PcpOption::EapPayload(&identity),
        ],
    );
    s.handle(now, SRC, &reply);
    let out = sent(&mut s);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].1, ResultCode::AuthenticationFailed);
    let r = Response::parse(&out[0].4).unwrap();
    assert_eq!(r.options.nonce(), Some(0xdead_beef));
}

/// M5: AUTHORIZATION_FAILED from the client ends the session at once (§3.1.3).
#[test]
fn m5_authorization_failed_from_the_client_ends_the_session() {
    let now = Time(1_000);
    let mut s = server(ServerConfig::default());
    s.handle(now, SRC, &initiation(SRC, 5));
    let sid = sent(&mut s)[0].2;
    let refusal = pa(IP, ResultCode::AuthorizationFailed, sid, 1, &[]);
    s.handle(now, SRC, &refusal);
    assert_eq!(s.session_count(), 0);
    assert!(std::iter::from_fn(|| s.poll_event()).any(|e| e
        == ServerEvent::Ended {
            session_id: sid,
            cause: Cause::RefusedByClient
        }));
}

/// M9: a PA-Initiation must have sequence number 0 (§6.4); another one opens nothing.
#[test]
fn m9_pa_initiation_with_a_nonzero_sequence_number_is_dropped() {
    let now = Time(1_000);
    let mut s = server(ServerConfig::default());
    let bad = pa(IP, ResultCode::Initiation, 0, 3, &[PcpOption::Nonce(1)]);
    s.handle(now, SRC, &bad);
    assert_eq!(s.session_count(), 0);
    assert!(sent(&mut s).is_empty());
    s.handle(now, SRC, &initiation(SRC, 1));
    assert_eq!(s.session_count(), 1);
}

/// M4: bad PA-Client messages get RFC 6887's answers: ADDRESS_MISMATCH when the header's
/// client address is not the source, the parse error's code otherwise.
#[test]
fn m4_bad_pa_client_messages_get_rfc6887_answers() {
    let now = Time(1_000);
    let mut s = server(ServerConfig::default());
    let elsewhere = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 99));
    s.handle(
        now,
        SRC,
        &pa(
            elsewhere,
            ResultCode::Initiation,
            0,
            0,
            &[PcpOption::Nonce(1)],
        ),
    );
    let out: Vec<_> = std::iter::from_fn(|| s.poll_transmit()).collect();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].payload[1], 0x80 | 3, "a response to AUTHENTICATION");
    assert_eq!(out[0].payload[3], u8::from(ResultCode::AddressMismatch));
    assert_eq!(s.session_count(), 0);
    // A NONCE option of the wrong length.
    let mut bad = initiation(SRC, 1);
    assert_eq!(bad[32], 4, "NONCE option first");
    bad[35] = 8;
    bad.extend_from_slice(&[0; 4]);
    s.handle(now, SRC, &bad);
    let out: Vec<_> = std::iter::from_fn(|| s.poll_transmit()).collect();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].payload[3], u8::from(ResultCode::MalformedOption));
    assert_eq!(s.session_count(), 0);
}

/// M7: an AUTHENTICATION_SUCCEEDED whose EAP packet the client's method refuses (here
/// an EAP-Failure inside it) is answered with AUTHENTICATION_FAILED and fails at once.
#[test]
fn m7_succeeded_the_method_refuses_is_answered_authentication_failed() {
    let now = Time(10_000);
    let mut c = Client::with_rng(
        ClientConfig::new(IP),
        ToyPeer::new("alice", "pw"),
        StdRng::seed_from_u64(1),
    );
    let mut s = server(ServerConfig::default());
    c.start(now);
    let mut refused = false;
    for _ in 0..30 {
        while let Some(m) = c.poll_transmit() {
            let rc = Request::parse(&m).unwrap().pa_result_code;
            refused |= rc == ResultCode::AuthenticationFailed;
            s.handle(now, SRC, &m);
        }
        while let Some(t) = s.poll_transmit() {
            let mut m = t.payload;
            let r = Response::parse(&m).unwrap();
            if r.result_code == ResultCode::AuthenticationSucceeded {
                let eap = r.options.eap_payload().unwrap();
                let at = eap.as_ptr() as usize - m.as_ptr() as usize;
                assert_eq!(m[at], 3, "EAP-Success");
                m[at] = 4;
            }
            c.handle(now, &m);
        }
    }
    assert!(refused, "no AUTHENTICATION_FAILED");
    let events: Vec<_> = std::iter::from_fn(|| c.poll_event()).collect();
    assert_eq!(
        events,
        [ClientEvent::Failed(pcp_auth::client::Failure::Eap)]
    );
    assert_eq!(s.session_count(), 0, "the server ended it too");
}

/// I1: a tagged common request also tells the session the core's current epoch (e.g.
/// after the client's epoch was reset): the next PA-Server the server sends on its own
/// carries it.
#[test]
fn i1_tagged_requests_update_the_pa_epoch() {
    let now = Time(5_000);
    let mut g = gate(Mode::Required);
    let mut c = Client::with_rng(
        ClientConfig::new(IP),
        ToyPeer::new("alice", "pw"),
        StdRng::seed_from_u64(1),
    );
    authenticate(&mut g, &mut c, now);
    let mut buf = untagged_map(IP);
    let n = buf.len();
    buf.resize(1100, 0);
    let n = c.protect(now, &mut buf, n).unwrap();
    let Inbound::Serve {
        session: Some(sid), ..
    } = g.inbound(now, SRC, 4_000, &mut buf, n)
    else {
        panic!("not served");
    };
    g.server.terminate(now.plus(Duration::from_secs(3)), sid);
    let term = g.poll_transmit().unwrap();
    assert_eq!(Response::parse(&term.payload).unwrap().epoch, 4_003);
}

/// S2 with HA: an imported session counts for its client's address (untagged requests
/// refused in `optional` mode), and a node forgetting everything forgets that too.
#[test]
fn s2_imported_sessions_count_and_forget_all_clears() {
    let t0 = Time(10_000);
    let (_c, s, _, _) = established_pair(t0);
    let sid = s.sessions().next().unwrap().session_id;
    let state = s.export(sid, t0).expect("established");
    let mut g = gate(Mode::Optional);
    g.server.import(t0, &state).unwrap();
    assert!(g.server.has_session_from(IP));
    assert!(matches!(
        through(&mut g, t0, SRC, &untagged_map(IP)),
        Inbound::Answer(_)
    ));
    // Importing it again (a newer record) does not count it twice.
    g.server.import(t0, &state).unwrap();
    g.server.forget_all();
    assert!(!g.server.has_session_from(IP));
    assert!(matches!(
        through(&mut g, t0, SRC, &untagged_map(IP)),
        Inbound::Serve { session: None, .. }
    ));
}
