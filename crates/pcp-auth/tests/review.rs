//! Regression tests for the findings of the RFC 7652 review (docs/AUTH.md, "Review
//! findings"): each drives the server or client with hand-made PA messages, so the
//! attack or the lost/duplicated packet is exactly the one the finding describes.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use pcp_auth::Time;
use pcp_auth::crypto::{AUTH_HMAC_SHA2_256_128, PRF_HMAC_SHA2_256};
use pcp_auth::server::{Cause, Server, ServerConfig, ServerEvent};
use pcp_proto::{AuthenticationBody, Body, Options, PcpOption, Request, Response, ResultCode};
use rand::SeedableRng;
use rand::rngs::StdRng;
use support::ToyServer;

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
    pa(src.ip(), ResultCode::Initiation, 0, 0, &[PcpOption::Nonce(nonce)])
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
    let deadline = s.poll_timeout().expect("a half-open session has a deadline");
    assert!(deadline <= t0.plus(Duration::from_secs(120)), "{deadline:?}");
    s.handle_timeout(t0.plus(Duration::from_secs(48 * 3600)));
    assert_eq!(s.session_count(), 0);
    assert!(
        std::iter::from_fn(|| s.poll_event()).any(|e| e
            == ServerEvent::Ended {
                session_id: sid,
                cause: Cause::Timeout
            })
    );
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
