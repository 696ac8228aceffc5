//! The cost of one timer tick of the PA server — `poll_timeout` then `handle_timeout`
//! with no session due, what pcpd does under its auth lock on every wake — at 1 k, 16 k
//! and 65 536 established sessions: from the deadline index, and (the baseline, in the
//! same run) by looking at every session as the server did before the index.
//!
//! And what the index costs the request path: `check_request` + `protect_response` of a
//! tagged MAP at 65 536 sessions, next to a baseline that does only their crypto
//! (`tag::verify` of the request, `tag::seal` of the reply).
//!
//! `cargo bench -p pcp-auth --bench timers -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use pcp_auth::Time;
use pcp_auth::crypto::{AUTH_HMAC_SHA2_256_128, PRF_HMAC_SHA2_256};
use pcp_auth::eap::{AuthStep, EapAuthenticator};
use pcp_auth::server::{Check, SequenceState, Server, ServerConfig, SessionExport};
use pcp_auth::{TransportKey, tag};
use pcp_proto::{Body, MapBody, Options, Request, Response, ResultCode};
use rand::SeedableRng;
use rand::rngs::StdRng;

/// Imported sessions never talk EAP.
struct Idle;
impl EapAuthenticator for Idle {
    fn start(&mut self) -> Vec<u8> {
        Vec::new()
    }
    fn receive(&mut self, _: &[u8]) -> AuthStep {
        AuthStep::Discard
    }
}

const NOW: Time = Time(10_000);

/// `n` established sessions (imported, as a takeover would), expiring over the next
/// hour, none due at `NOW`.
fn client(i: u32) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), 5350)
}

fn server(n: u32) -> Server<Idle, fn() -> Idle> {
    let cfg = ServerConfig {
        max_sessions: n as usize,
        ..ServerConfig::default()
    };
    let mut s = Server::with_rng(cfg, (|| Idle) as fn() -> Idle, StdRng::seed_from_u64(1));
    for i in 1..=n {
        let e = SessionExport {
            session_id: i,
            client: client(i),
            identity: "subscriber".into(),
            nonce: i,
            key_id: 1,
            key: [7; 32],
            prf: PRF_HMAC_SHA2_256,
            mac: AUTH_HMAC_SHA2_256_128,
            remaining_ms: 60_000 + u64::from(i) * 3_600_000 / u64::from(n),
            pa_in: 2,
            pa_out: 2,
            sequence: SequenceState::default(),
        };
        s.import(NOW, &e).expect("import");
    }
    assert_eq!(s.session_count(), n as usize);
    assert!(s.poll_timeout().is_some_and(|t| t > NOW), "none due");
    assert_eq!(s.poll_timeout(), s.poll_timeout_scan());
    s
}

fn tick(c: &mut Criterion) {
    let mut g = c.benchmark_group("timer tick, none due");
    for n in [1_024u32, 16_384, 65_536] {
        let mut s = server(n);
        g.bench_with_input(BenchmarkId::new("scan (before)", n), &n, |b, _| {
            b.iter(|| {
                let t = s.poll_timeout_scan();
                s.handle_timeout_scan(black_box(NOW));
                black_box(t)
            })
        });
        g.bench_with_input(BenchmarkId::new("index", n), &n, |b, _| {
            b.iter(|| {
                let t = s.poll_timeout();
                s.handle_timeout(black_box(NOW));
                black_box(t)
            })
        });
        assert_eq!(s.session_count(), n as usize, "nothing expired meanwhile");
    }
    g.finish();
}

fn request(c: &mut Criterion) {
    let n = 65_536;
    let mut s = server(n);
    let key = TransportKey::from_bytes(1, [7; 32]);
    let id = n / 2;
    let ip = client(id).ip();
    let req = Request {
        lifetime: 3600,
        client_addr: ip,
        body: Body::Map(MapBody {
            nonce: [1; 12],
            protocol: 17,
            internal_port: 5060,
            external_port: 0,
            external_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        }),
        options: Options::EMPTY,
        pa_result_code: ResultCode::Success,
    };
    let mut buf = [0u8; 1100];
    let len = req.emit(&mut buf).unwrap();
    let len = tag::seal(&mut buf, len, &key, (id, 5)).unwrap();
    let tagged = buf[..len].to_vec();
    let resp = Response {
        result_code: ResultCode::Success,
        lifetime: 3600,
        epoch: 1,
        body: req.body,
        options: Options::EMPTY,
    };
    let mut out = [0u8; 1100];
    let reply_len = resp.emit(&mut out).unwrap();
    let reply = out;
    // The same request again each time: the server takes it as the client's
    // retransmission (same number and MAC) and serves it, verifying it every time.
    assert!(matches!(
        s.check_request(ip, &tagged),
        Check::Authenticated { session_id, .. } if session_id == id
    ));
    let mut g = c.benchmark_group("tagged request, 65536 sessions");
    g.bench_function("baseline: verify + seal only", |b| {
        b.iter(|| {
            let at = tag::verify(black_box(&tagged), &key).unwrap();
            let mut o = reply;
            let n = tag::seal(&mut o, reply_len, &key, (at.session_id, 9)).unwrap();
            black_box(o[n - 1])
        })
    });
    g.bench_function("check_request + protect_response", |b| {
        b.iter(|| {
            let c = s.check_request(ip, black_box(&tagged));
            debug_assert!(matches!(c, Check::Authenticated { .. }));
            let mut o = reply;
            let n = s.protect_response(id, &mut o, reply_len).unwrap();
            black_box(o[n - 1])
        })
    });
    g.finish();
}

criterion_group!(benches, tick, request);
criterion_main!(benches);
