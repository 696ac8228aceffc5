//! The PA session machines of both sides driven against each other through a simulated
//! network (loss, duplication, reordering by random delay) with a toy EAP method, and
//! deterministic checks of every RFC 7652 session path.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use pcp_auth::Time;
use pcp_auth::client::{Client, ClientConfig, ClientEvent, Ended, Failure, Rejected};
use pcp_auth::server::{Cause, Check, Discard, Server, ServerConfig, ServerEvent};
use pcp_proto::{Body, MapBody, Options, Request, Response, ResultCode, emit_error_response};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::{ToyPeer, ToyServer};

const CLIENT_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));
const CLIENT: SocketAddr = SocketAddr::new(CLIENT_IP, 5350);

type Factory = Box<dyn FnMut() -> ToyServer>;

fn factory() -> Factory {
    let mut n = 0;
    Box::new(move || {
        n += 1000;
        ToyServer::new(&[("alice", "correct horse"), ("bob", "hunter2")], n)
    })
}

struct Net {
    rng: StdRng,
    loss: f64,
    dup: f64,
    max_delay: u64,
    /// (deliver at, to the server?, datagram)
    q: Vec<(Time, bool, Vec<u8>)>,
    /// Every datagram the client sent, for replay attacks.
    from_client: Vec<Vec<u8>>,
}

impl Net {
    fn perfect() -> Net {
        Net::lossy(0, 0.0, 0.0, 1)
    }

    fn lossy(seed: u64, loss: f64, dup: f64, max_delay: u64) -> Net {
        Net {
            rng: StdRng::seed_from_u64(seed),
            loss,
            dup,
            max_delay,
            q: Vec::new(),
            from_client: Vec::new(),
        }
    }

    fn push(&mut self, now: Time, to_server: bool, m: Vec<u8>) {
        if to_server {
            self.from_client.push(m.clone());
        }
        let copies = if self.rng.random_bool(self.dup) { 2 } else { 1 };
        for _ in 0..copies {
            if self.rng.random_bool(self.loss) {
                continue;
            }
            let d = self.rng.random_range(1..=self.max_delay);
            self.q.push((Time(now.0 + d), to_server, m.clone()));
        }
    }
}

struct Pair {
    now: Time,
    client: Client<ToyPeer>,
    server: Server<ToyServer, Factory>,
    net: Net,
    client_events: Vec<ClientEvent>,
    server_events: Vec<ServerEvent>,
}

impl Pair {
    fn new(password: &str, cfg: ServerConfig, net: Net, seed: u64) -> Pair {
        let client = Client::with_rng(
            ClientConfig::new(CLIENT_IP),
            ToyPeer::new("alice", password),
            StdRng::seed_from_u64(seed),
        );
        let server = Server::with_rng(cfg, factory(), StdRng::seed_from_u64(seed ^ 0xabcd));
        Pair {
            now: Time(1_000_000),
            client,
            server,
            net,
            client_events: Vec::new(),
            server_events: Vec::new(),
        }
    }

    fn pump(&mut self) {
        while let Some(m) = self.client.poll_transmit() {
            self.net.push(self.now, true, m);
        }
        while let Some(t) = self.server.poll_transmit() {
            assert_eq!(t.dst, CLIENT);
            self.net.push(self.now, false, t.payload);
        }
        self.client_events
            .extend(std::iter::from_fn(|| self.client.poll_event()));
        self.server_events
            .extend(std::iter::from_fn(|| self.server.poll_event()));
    }

    /// Runs the network and both sides' timers until nothing is left before `until`.
    fn run_until(&mut self, until: Time) {
        for _ in 0..100_000 {
            self.pump();
            let next = [
                self.net.q.iter().map(|(t, _, _)| *t).min(),
                self.client.poll_timeout(),
                self.server.poll_timeout(),
            ]
            .into_iter()
            .flatten()
            .min();
            let Some(next) = next.filter(|t| *t <= until) else {
                self.now = until.max(self.now);
                return;
            };
            self.now = self.now.max(next);
            let now = self.now;
            let (due, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.net.q)
                .into_iter()
                .partition(|(t, _, _)| *t <= now);
            self.net.q = rest;
            for (_, to_server, m) in due {
                if to_server {
                    self.server.handle(now, CLIENT, &m);
                } else {
                    self.client.handle(now, &m);
                }
            }
            self.client.handle_timeout(now);
            self.server.handle_timeout(now);
        }
        panic!("simulation did not settle");
    }

    fn run_for(&mut self, d: Duration) {
        let until = self.now.plus(d);
        self.run_until(until);
    }

    /// A MAP request tagged by the client: (bytes, the server's check).
    fn tagged_map(&mut self, port: u16) -> (Vec<u8>, Check) {
        let req = map_request(port);
        let mut buf = vec![0u8; 1100];
        let n = req.emit(&mut buf).unwrap();
        let n = self.client.protect(self.now, &mut buf, n).unwrap();
        buf.truncate(n);
        let check = self.server.check_request(CLIENT_IP, &buf);
        (buf, check)
    }

    /// The server's tagged success response to `req` for `session`.
    fn tagged_response(&mut self, session: u32, req: &[u8]) -> Vec<u8> {
        let r = Request::parse(req).unwrap();
        let resp = Response {
            result_code: ResultCode::Success,
            lifetime: 3600,
            epoch: 1,
            body: r.body,
            options: Options::EMPTY,
        };
        let mut buf = vec![0u8; 1100];
        let n = resp.emit(&mut buf).unwrap();
        let n = self.server.protect_response(session, &mut buf, n).unwrap();
        buf.truncate(n);
        buf
    }
}

fn map_request(port: u16) -> Request<'static> {
    Request {
        lifetime: 3600,
        client_addr: CLIENT_IP,
        body: Body::Map(MapBody {
            nonce: [7; 12],
            protocol: 17,
            internal_port: port,
            external_port: 0,
            external_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        }),
        options: Options::EMPTY,
        pa_result_code: ResultCode::Success,
    }
}

fn established(p: &Pair) -> Option<u32> {
    p.server_events.iter().find_map(|e| match e {
        ServerEvent::Established {
            session_id,
            identity,
            ..
        } if &**identity == "alice" => Some(*session_id),
        _ => None,
    })
}

#[test]
fn client_initiated_session_then_tagged_map_both_ways() {
    let mut p = Pair::new("correct horse", ServerConfig::default(), Net::perfect(), 1);
    p.client.start(p.now);
    p.run_for(Duration::from_secs(1));
    let sid = established(&p).expect("server established");
    assert_eq!(
        p.client_events,
        [ClientEvent::Established {
            session_id: sid,
            lifetime: 3600
        }]
    );
    assert_eq!(p.server.identity(sid), Some("alice"));
    let (req, check) = p.tagged_map(5000);
    assert_eq!(
        check,
        Check::Authenticated {
            session_id: sid,
            identity: Arc::from("alice"),
            retransmission: false
        }
    );
    let resp = p.tagged_response(sid, &req);
    assert_eq!(p.client.verify_response(p.now, &resp), Ok(()));
    // The same response again is a replay for the client.
    assert!(matches!(
        p.client.verify_response(p.now, &resp),
        Err(Rejected::Replay(0))
    ));
}

#[test]
fn server_initiated_session() {
    let mut p = Pair::new("correct horse", ServerConfig::default(), Net::perfect(), 2);
    let sid = p.server.start(p.now, CLIENT).unwrap();
    p.run_for(Duration::from_secs(1));
    assert_eq!(established(&p), Some(sid));
    assert_eq!(p.client.session_id(), sid);
    let (_, check) = p.tagged_map(5001);
    assert!(matches!(check, Check::Authenticated { .. }), "{check:?}");
    // A client that does not accept server-initiated sessions ignores it.
    let mut cfg = ClientConfig::new(CLIENT_IP);
    cfg.accept_server_initiated = false;
    let mut q = Pair::new("correct horse", ServerConfig::default(), Net::perfect(), 3);
    q.client = Client::with_rng(cfg, ToyPeer::new("alice", "x"), StdRng::seed_from_u64(3));
    q.server.start(q.now, CLIENT).unwrap();
    q.run_for(Duration::from_secs(300));
    assert!(q.client_events.is_empty());
    assert_eq!(q.server.session_count(), 0, "given up after MRD");
    assert!(q.server_events.iter().any(|e| matches!(
        e,
        ServerEvent::Ended {
            cause: Cause::Timeout,
            ..
        }
    )));
}

#[test]
fn wrong_password_fails_on_both_sides_and_leaves_no_session() {
    let mut p = Pair::new("wrong", ServerConfig::default(), Net::perfect(), 4);
    p.client.start(p.now);
    p.run_for(Duration::from_secs(1));
    assert_eq!(
        p.client_events,
        [ClientEvent::Failed(Failure::AuthenticationFailed)]
    );
    assert!(matches!(
        p.server_events[..],
        [ServerEvent::Ended {
            cause: Cause::AuthenticationFailed,
            ..
        }]
    ));
    assert_eq!(p.server.session_count(), 0);
    assert!(!p.client.is_established());
    assert!(p.client.protect(p.now, &mut [0u8; 1100], 60).is_err());
}

#[test]
fn authorization_failed() {
    let cfg = ServerConfig {
        authorize: Some(Arc::new(|id: &str| id != "alice")),
        ..ServerConfig::default()
    };
    let mut p = Pair::new("correct horse", cfg, Net::perfect(), 5);
    p.client.start(p.now);
    p.run_for(Duration::from_secs(1));
    assert_eq!(
        p.client_events,
        [ClientEvent::Failed(Failure::AuthorizationFailed)]
    );
    assert_eq!(p.server.session_count(), 0);
}

#[test]
fn replayed_tampered_and_retransmitted_requests() {
    let mut p = Pair::new("correct horse", ServerConfig::default(), Net::perfect(), 6);
    p.client.start(p.now);
    p.run_for(Duration::from_secs(1));
    let sid = established(&p).unwrap();
    let (first, _) = p.tagged_map(5000);
    // The identical message again: a retransmission, answered again.
    assert!(matches!(
        p.server.check_request(CLIENT_IP, &first),
        Check::Authenticated {
            retransmission: true,
            ..
        }
    ));
    let (second, c) = p.tagged_map(5001);
    assert!(matches!(
        c,
        Check::Authenticated {
            retransmission: false,
            ..
        }
    ));
    // Replaying an older one is refused.
    assert_eq!(
        p.server.check_request(CLIENT_IP, &first),
        Check::Discard(Discard::Replay)
    );
    // Any flipped bit breaks the MAC (header, body, option, MAC itself); nothing is
    // recorded, so the untouched message still verifies afterwards... once.
    let (third, _) = {
        let req = map_request(5002);
        let mut buf = vec![0u8; 1100];
        let n = req.emit(&mut buf).unwrap();
        let n = p.client.protect(p.now, &mut buf, n).unwrap();
        buf.truncate(n);
        (buf, ())
    };
    for i in [4usize, 30, 61, third.len() - 20, third.len() - 1] {
        let mut bad = third.clone();
        bad[i] ^= 0x01;
        let c = p.server.check_request(CLIENT_IP, &bad);
        assert!(matches!(c, Check::Discard(_)), "bit flip at {i}: {c:?}");
    }
    assert!(matches!(
        p.server.check_request(CLIENT_IP, &third),
        Check::Authenticated {
            retransmission: false,
            ..
        }
    ));
    // From another address.
    let (fourth, _) = {
        let req = map_request(5003);
        let mut buf = vec![0u8; 1100];
        let n = req.emit(&mut buf).unwrap();
        let n = p.client.protect(p.now, &mut buf, n).unwrap();
        buf.truncate(n);
        (buf, ())
    };
    assert_eq!(
        p.server
            .check_request(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 99)), &fourth),
        Check::Discard(Discard::WrongClient)
    );
    // Untagged and unknown-session requests.
    let mut plain = vec![0u8; 1100];
    let n = map_request(1).emit(&mut plain).unwrap();
    assert_eq!(
        p.server.check_request(CLIENT_IP, &plain[..n]),
        Check::Untagged
    );
    let mut other = second.clone();
    let at = pcp_auth::tag::locate(&other).unwrap();
    let off = at.mac.start - 12;
    other[off..off + 4].copy_from_slice(&(sid ^ 1).to_be_bytes());
    assert_eq!(
        p.server.check_request(CLIENT_IP, &other),
        Check::UnknownSession
    );
}

#[test]
fn downgrade_of_the_algorithm_lists_is_detected() {
    // A man in the middle adds a (weaker) PRF to the server's unprotected first
    // PA-Server; the client echoes what it saw, the server notices.
    let mut p = Pair::new("correct horse", ServerConfig::default(), Net::perfect(), 7);
    p.client.start(p.now);
    p.pump();
    let (_, _, init) = p.net.q.remove(0);
    p.server.handle(p.now, CLIENT, &init);
    let first = p.server.poll_transmit().unwrap().payload;
    let r = Response::parse(&first).unwrap();
    let mut opts: Vec<_> = r.options.iter().collect();
    opts.insert(1, pcp_proto::PcpOption::Prf(2));
    let forged = Response {
        options: Options::from_list(&opts),
        ..r
    };
    let mut buf = vec![0u8; 1100];
    let n = forged.emit(&mut buf).unwrap();
    p.client.handle(p.now, &buf[..n]);
    p.run_for(Duration::from_secs(1));
    assert!(p.server_events.iter().any(|e| matches!(
        e,
        ServerEvent::Ended {
            cause: Cause::DowngradeDetected,
            ..
        }
    )));
    assert!(
        p.client_events
            .contains(&ClientEvent::Failed(Failure::DowngradeDetected))
    );
    assert!(!p.client.is_established());
    assert_eq!(p.server.session_count(), 0);
}

#[test]
fn lost_session_at_the_server_is_recovered_by_a_new_authentication() {
    let mut p = Pair::new("correct horse", ServerConfig::default(), Net::perfect(), 8);
    p.client.start(p.now);
    p.run_for(Duration::from_secs(1));
    let old = established(&p).unwrap();
    // The server restarts and forgets every SA.
    p.server = Server::with_rng(
        ServerConfig::default(),
        factory(),
        StdRng::seed_from_u64(99),
    );
    p.server_events.clear();
    let (req, check) = p.tagged_map(5000);
    assert_eq!(check, Check::UnknownSession);
    let mut out = vec![0u8; 1100];
    let n = emit_error_response(&req, ResultCode::UnknownSessionId, 0, 1, true, &mut out).unwrap();
    assert_eq!(
        p.client.verify_response(p.now, &out[..n]),
        Err(Rejected::SessionLost)
    );
    p.run_for(Duration::from_secs(1));
    let new = established(&p).expect("authenticated again");
    assert_ne!(new, old);
    assert!(p.client_events.contains(&ClientEvent::Ended(Ended::Lost)));
    let (_, check) = p.tagged_map(5000);
    assert!(matches!(check, Check::Authenticated { .. }));
    // A PA message for a session the server does not know: UNKNOWN_SESSION_ID.
    let mut q = Pair::new("correct horse", ServerConfig::default(), Net::perfect(), 9);
    let stale = p.net.from_client.last().unwrap().clone();
    q.server.handle(q.now, CLIENT, &stale);
    let t = q.server.poll_transmit().expect("an answer");
    assert_eq!(
        Response::parse(&t.payload).unwrap().result_code,
        ResultCode::UnknownSessionId
    );
}

#[test]
fn reauthentication_before_expiry_and_expiry_without_it() {
    let cfg = ServerConfig {
        session_lifetime: 100,
        ..ServerConfig::default()
    };
    let mut p = Pair::new("correct horse", cfg.clone(), Net::perfect(), 10);
    p.client.start(p.now);
    p.run_for(Duration::from_secs(1));
    let sid = established(&p).unwrap();
    let (_, c) = p.tagged_map(1);
    assert!(matches!(c, Check::Authenticated { .. }));
    // The client re-authenticates at 80 s, before the 100 s lifetime, three times over.
    p.run_for(Duration::from_secs(250));
    let reauths = p
        .client_events
        .iter()
        .filter(|e| matches!(e, ClientEvent::Reauthenticated { lifetime: 100 }))
        .count();
    assert_eq!(reauths, 3, "{:?}", p.client_events);
    assert_eq!(
        p.server_events
            .iter()
            .filter(|e| matches!(e, ServerEvent::Reauthenticated { session_id, .. } if *session_id == sid))
            .count(),
        3
    );
    // New key, sequence numbers from zero: tagged requests still verify.
    let (req, c) = p.tagged_map(2);
    assert!(matches!(c, Check::Authenticated { .. }), "{c:?}");
    let at = pcp_auth::tag::locate(&req).unwrap();
    assert_eq!((at.key_id, at.sequence_number), (4, 0));

    // A client that never re-authenticates: both sides drop the session at expiry.
    let mut q = Pair::new("correct horse", cfg, Net::perfect(), 11);
    let mut ccfg = ClientConfig::new(CLIENT_IP);
    ccfg.reauth_percent = 99;
    q.client = Client::with_rng(
        ccfg,
        ToyPeer::new("alice", "correct horse"),
        StdRng::seed_from_u64(11),
    );
    q.client.start(q.now);
    q.run_for(Duration::from_secs(1));
    // Lose every message from now on, so the re-authentication never completes.
    q.net.loss = 1.0;
    q.run_for(Duration::from_secs(200));
    assert!(
        q.client_events
            .contains(&ClientEvent::Ended(Ended::Expired))
    );
    assert!(q.server_events.iter().any(|e| matches!(
        e,
        ServerEvent::Ended {
            cause: Cause::Expired,
            ..
        }
    )));
    assert_eq!(q.server.session_count(), 0);
}

#[test]
fn termination_by_either_side() {
    let mut p = Pair::new("correct horse", ServerConfig::default(), Net::perfect(), 12);
    p.client.start(p.now);
    p.run_for(Duration::from_secs(1));
    let sid = established(&p).unwrap();
    p.client.terminate(p.now);
    p.run_for(Duration::from_secs(1));
    assert!(
        p.client_events
            .contains(&ClientEvent::Ended(Ended::ByClient))
    );
    assert!(p.server_events.contains(&ServerEvent::Ended {
        session_id: sid,
        cause: Cause::ByClient
    }));
    assert_eq!(p.server.session_count(), 0);

    let mut q = Pair::new("correct horse", ServerConfig::default(), Net::perfect(), 13);
    q.client.start(q.now);
    q.run_for(Duration::from_secs(1));
    let sid = established(&q).unwrap();
    q.server.terminate(q.now, sid);
    q.run_for(Duration::from_secs(1));
    assert!(
        q.client_events
            .contains(&ClientEvent::Ended(Ended::ByServer))
    );
    assert!(q.server_events.contains(&ServerEvent::Ended {
        session_id: sid,
        cause: Cause::ByServer
    }));
    assert!(!q.client.is_established());
}

/// Thousands of runs over a network that loses, duplicates and reorders: the two sides
/// never disagree. Either both hold the same SA (a tagged request verifies), or the
/// client gave up and the server holds nothing for it.
#[test]
fn lossy_network_never_leaves_the_sides_disagreeing() {
    let mut ok = 0;
    let seeds = 1000u64;
    for seed in 0..seeds {
        let loss = [0.0, 0.1, 0.3][(seed % 3) as usize];
        let net = Net::lossy(seed, loss, 0.1, 4000);
        let mut p = Pair::new("correct horse", ServerConfig::default(), net, seed);
        p.client.start(p.now);
        p.run_for(Duration::from_secs(400));
        if p.client.is_established() {
            ok += 1;
            let sid = p.client.session_id();
            // The server may still wait for the client's confirmation if it was lost
            // and the server then gave up; otherwise a tagged request verifies.
            match established(&p) {
                Some(s) if p.server.identity(sid).is_some() => {
                    assert_eq!(s, sid, "seed {seed}");
                    let (_, c) = p.tagged_map(9);
                    assert!(
                        matches!(c, Check::Authenticated { .. }),
                        "seed {seed}: {c:?}"
                    );
                }
                _ => assert_eq!(p.server.session_count(), 0, "seed {seed}"),
            }
        } else {
            assert!(
                p.client_events
                    .iter()
                    .any(|e| matches!(e, ClientEvent::Failed(Failure::Timeout))),
                "seed {seed}: {:?}",
                p.client_events
            );
            assert_eq!(
                p.server.session_count(),
                0,
                "seed {seed}: server kept a session"
            );
        }
    }
    assert!(
        ok >= seeds * 9 / 10,
        "only {ok} of {seeds} runs authenticated"
    );
}

/// RFC 7652 §6.3: a PA-Acknowledgement (RECEIVED_PAK) stops the retransmission of the
/// acknowledged message and moves no sequence number; the exchange still ends at MRD.
#[test]
fn pa_acknowledgement_stops_retransmission() {
    let mut p = Pair::new("correct horse", ServerConfig::default(), Net::perfect(), 20);
    p.client.start(p.now);
    let init = p.client.poll_transmit().unwrap();
    p.server.handle(p.now, CLIENT, &init);
    let first = p.server.poll_transmit().unwrap().payload;
    let sid = match Response::parse(&first).unwrap().body {
        Body::Authentication(a) => a.session_id,
        _ => unreachable!(),
    };
    // The first PA-Server is not retransmitted (docs/AUTH.md S4); the second is.
    p.client.handle(p.now, &first);
    let reply = p.client.poll_transmit().unwrap();
    p.server.handle(p.now, CLIENT, &reply);
    let first = p.server.poll_transmit().unwrap().payload;
    let retransmit_at = p.server.poll_timeout().unwrap();
    assert!(retransmit_at.0 - p.now.0 < 4_000, "IRT is about 3 s");
    let opts = [pcp_proto::PcpOption::ReceivedPak(1)];
    let ack = Request {
        lifetime: 0,
        client_addr: CLIENT_IP,
        body: Body::Authentication(pcp_proto::AuthenticationBody {
            session_id: sid,
            sequence_number: 2,
        }),
        options: Options::from_list(&opts),
        pa_result_code: ResultCode::AuthenticationReply,
    };
    let mut buf = vec![0u8; 1100];
    let n = ack.emit(&mut buf).unwrap();
    p.server.handle(p.now, CLIENT, &buf[..n]);
    let next = p.server.poll_timeout().unwrap();
    assert!(
        next.0 - p.now.0 >= 119_000,
        "still retransmitting: {next:?}"
    );
    p.server.handle_timeout(Time(p.now.0 + 10_000));
    assert!(
        p.server.poll_transmit().is_none(),
        "retransmitted after the ack"
    );
    // The sequence number did not move: the client's real reply (seq 2) is accepted.
    p.client.handle(p.now, &first);
    let reply = p.client.poll_transmit().unwrap();
    p.server.handle(p.now, CLIENT, &reply);
    assert!(
        p.server.poll_transmit().is_some(),
        "reply after the ack not accepted"
    );
    // Without any answer the exchange ends at MRD.
    p.server.handle_timeout(Time(p.now.0 + 200_000));
    assert_eq!(p.server.session_count(), 0);
}

/// What the operator sees of a session: state, identity, sequence numbers and the
/// tagged requests accepted and refused; a terminated session serves nothing more.
#[test]
fn session_snapshots_count_requests_and_termination_stops_serving() {
    use pcp_auth::server::SessionState;
    let mut p = Pair::new("correct horse", ServerConfig::default(), Net::perfect(), 30);
    let start = p.now;
    p.client.start(p.now);
    p.run_for(Duration::from_secs(1));
    let sid = established(&p).unwrap();
    let (first, _) = p.tagged_map(5000);
    let (_, _) = p.tagged_map(5001);
    assert_eq!(
        p.server.check_request(CLIENT_IP, &first),
        Check::Discard(Discard::Replay)
    );
    let info = p.server.session(sid).unwrap();
    assert_eq!(info.state, SessionState::Established);
    assert_eq!(info.identity.as_deref(), Some("alice"));
    assert_eq!(info.client, CLIENT);
    assert_eq!((info.accepted, info.refused), (2, 1));
    assert_eq!(info.common_in, Some(1));
    assert_eq!(info.common_out, Some(0));
    assert!(info.created >= start && info.created < start.plus_secs(1));
    assert!(info.established.is_some_and(|t| t > info.created));
    assert_eq!(
        info.expires,
        info.established.map(|t| t.plus_secs(3600)),
        "SA lifetime from establishment"
    );
    assert_eq!(p.server.sessions().count(), 1);

    p.server.terminate(p.now, sid);
    assert_eq!(
        p.server.session(sid).unwrap().state,
        SessionState::Terminating
    );
    let (_, c) = p.tagged_map(5002);
    assert_eq!(c, Check::UnknownSession, "served while terminating");
    p.run_for(Duration::from_secs(1));
    assert!(p.server.session(sid).is_none());
}

/// An authenticator whose back end is slow: its first answer is held until the test
/// resumes the session.
struct Slow {
    inner: ToyServer,
    held: Option<pcp_auth::eap::AuthStep>,
    calls: usize,
}

impl pcp_auth::eap::EapAuthenticator for Slow {
    fn start(&mut self) -> Vec<u8> {
        self.inner.start()
    }
    fn receive(&mut self, packet: &[u8]) -> pcp_auth::eap::AuthStep {
        self.calls += 1;
        let step = self.inner.receive(packet);
        if self.calls == 1 {
            self.held = Some(step);
            return pcp_auth::eap::AuthStep::Pending;
        }
        step
    }
}

/// RFC 7652 §3.1.3 / §6.3: while the back end works, the server acknowledges the
/// client's PA message (RECEIVED_PAK, no sequence number moves) so the client stops
/// retransmitting; a copy that still arrives is answered with the acknowledgement
/// again (rate-limited) and does not reach the back end a second time.
#[test]
fn slow_back_end_gets_a_pa_acknowledgement_and_one_request() {
    let mut server = Server::with_rng(
        ServerConfig::default(),
        || Slow {
            inner: ToyServer::new(&[("alice", "correct horse")], 7),
            held: None,
            calls: 0,
        },
        StdRng::seed_from_u64(40),
    );
    let mut client = Client::with_rng(
        ClientConfig::new(CLIENT_IP),
        ToyPeer::new("alice", "correct horse"),
        StdRng::seed_from_u64(41),
    );
    let mut now = Time(5_000);
    client.start(now);
    let init = client.poll_transmit().unwrap();
    server.handle(now, CLIENT, &init);
    let first = server.poll_transmit().unwrap().payload;
    client.handle(now, &first);
    let reply = client.poll_transmit().expect("the client's EAP reply");
    let reply_seq = match Request::parse(&reply).unwrap().body {
        Body::Authentication(a) => a.sequence_number,
        _ => unreachable!(),
    };
    server.handle(now, CLIENT, &reply);
    let sid = server.poll_backend().expect("to the back end");
    assert_eq!(server.poll_backend(), None);
    let ack = server
        .poll_transmit()
        .expect("a PA-Acknowledgement")
        .payload;
    let r = Response::parse(&ack).unwrap();
    assert_eq!(r.options.received_pak(), Some(reply_seq));
    assert!(r.options.eap_payload().is_none());
    match r.body {
        Body::Authentication(a) => {
            assert_eq!(
                (a.session_id, a.sequence_number),
                (sid, 1),
                "no number used"
            )
        }
        _ => unreachable!(),
    }
    assert!(server.poll_transmit().is_none());
    assert!(server.session(sid).unwrap().waiting_backend);

    // The client's retransmission (it had not heard the ack yet): the ack again, once
    // per 500 ms, and nothing more for the back end.
    now = Time(now.0 + 600);
    server.handle(now, CLIENT, &reply);
    assert_eq!(server.poll_transmit().map(|t| t.payload), Some(ack.clone()));
    server.handle(now, CLIENT, &reply);
    assert!(
        server.poll_transmit().is_none(),
        "duplicate answers not rate-limited"
    );
    assert_eq!(server.poll_backend(), None, "a second back-end exchange");

    // The client hears the ack: it stops retransmitting (only the MRD runs on).
    let before = client.poll_timeout().unwrap();
    assert!(
        before.0 < now.0 + 4_000,
        "retransmission scheduled: {before:?}"
    );
    client.handle(now, &ack);
    assert!(client.poll_transmit().is_none());
    let after = client.poll_timeout().unwrap();
    assert!(after.0 > now.0 + 100_000, "still retransmitting: {after:?}");
    client.handle_timeout(Time(now.0 + 30_000));
    assert!(
        client.poll_transmit().is_none(),
        "retransmitted after the ack"
    );

    // The back end answers (seconds later): the exchange goes on to the end.
    now = Time(now.0 + 4_000);
    server.resume(now, sid, |a| a.held.take().unwrap());
    for _ in 0..20 {
        while let Some(t) = server.poll_transmit() {
            client.handle(now, &t.payload);
        }
        while let Some(m) = client.poll_transmit() {
            server.handle(now, CLIENT, &m);
        }
    }
    assert!(client.is_established());
    assert!(
        std::iter::from_fn(|| server.poll_event())
            .any(|e| matches!(e, ServerEvent::Established { .. }))
    );
}

/// HA (docs/AUTH.md "Pair mode"): a session exported from one server and imported on
/// another keeps working there without a new authentication — its next tagged
/// request verifies, an earlier one is a replay, the bitwise retransmission of the
/// last exported one is answered again, the successor's replies carry numbers the
/// client has not seen — and what the replay window after a takeover cannot do: a
/// request accepted after the last export is accepted once more.
#[test]
fn exported_session_keeps_verifying_on_a_second_server() {
    let mut p = Pair::new("correct horse", ServerConfig::default(), Net::perfect(), 21);
    p.client.start(p.now);
    p.run_for(Duration::from_secs(1));
    let sid = established(&p).unwrap();
    let (r0, c0) = p.tagged_map(5000);
    let (r1, c1) = p.tagged_map(5001);
    assert!(matches!(c0, Check::Authenticated { .. }) && matches!(c1, Check::Authenticated { .. }));
    for r in [&r0, &r1] {
        let resp = p.tagged_response(sid, r);
        assert_eq!(p.client.verify_response(p.now, &resp), Ok(()));
    }
    let state = p
        .server
        .export(sid, p.now)
        .expect("an established session exports");
    assert_eq!(&*state.identity, "alice");
    assert_eq!(state.sequence.last_in.map(|(s, _)| s), Some(1));
    assert_eq!(state.sequence.next_out, 2);
    assert!(state.remaining_ms > 3_590_000 && state.remaining_ms <= 3_600_000);
    // Accepted and answered by the first server after its last export.
    let (late, _) = p.tagged_map(5002);
    let resp = p.tagged_response(sid, &late);
    assert_eq!(p.client.verify_response(p.now, &resp), Ok(()));

    // The successor, a second later.
    let later = p.now.plus(Duration::from_secs(1));
    let mut b = Server::with_rng(
        ServerConfig::default(),
        factory(),
        StdRng::seed_from_u64(99),
    );
    assert_eq!(
        b.check_request(CLIENT_IP, &r1),
        Check::UnknownSession,
        "nothing before import"
    );
    b.import(later, &state).unwrap();
    assert_eq!(b.identity(sid), Some("alice"));
    assert_eq!(
        b.check_request(CLIENT_IP, &r0),
        Check::Discard(Discard::Replay)
    );
    assert!(matches!(
        b.check_request(CLIENT_IP, &r1),
        Check::Authenticated {
            retransmission: true,
            ..
        }
    ));
    // The documented limit: accepted after the export, so unknown to the successor.
    assert!(matches!(
        b.check_request(CLIENT_IP, &late),
        Check::Authenticated {
            retransmission: false,
            ..
        }
    ));
    // The client's next request, tagged as ever.
    p.now = later;
    let (next, _) = p.tagged_map(5003);
    assert_eq!(
        b.check_request(CLIENT_IP, &next),
        Check::Authenticated {
            session_id: sid,
            identity: Arc::from("alice"),
            retransmission: false
        }
    );
    for old in [&r0, &r1, &late] {
        assert_eq!(
            b.check_request(CLIENT_IP, old),
            Check::Discard(Discard::Replay)
        );
    }
    assert_eq!(
        b.check_request(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 99)), &next),
        Check::Discard(Discard::WrongClient)
    );
    // Its reply: tagged by the successor past anything the first server may have used.
    let r = Request::parse(&next).unwrap();
    let resp = Response {
        result_code: ResultCode::Success,
        lifetime: 3600,
        epoch: 1,
        body: r.body,
        options: Options::EMPTY,
    };
    let mut buf = vec![0u8; 1100];
    let n = resp.emit(&mut buf).unwrap();
    let n = b.protect_response(sid, &mut buf, n).unwrap();
    let at = pcp_auth::tag::locate(&buf[..n]).unwrap();
    assert_eq!(at.sequence_number, 2 + pcp_auth::server::FAILOVER_OUT_JUMP);
    assert_eq!(p.client.verify_response(p.now, &buf[..n]), Ok(()));
    // The lifetime carried over: it ends when it would have ended on the first server.
    b.handle_timeout(later.plus(Duration::from_millis(state.remaining_ms - 1)));
    assert_eq!(b.identity(sid), Some("alice"));
    b.handle_timeout(later.plus(Duration::from_millis(state.remaining_ms)));
    assert_eq!(b.identity(sid), None);
    assert!(matches!(
        b.poll_event(),
        Some(ServerEvent::Ended { session_id, cause: Cause::Expired }) if session_id == sid
    ));
}

#[test]
fn import_refuses_what_it_cannot_serve() {
    let mut p = Pair::new("correct horse", ServerConfig::default(), Net::perfect(), 22);
    p.client.start(p.now);
    p.run_for(Duration::from_secs(1));
    let sid = established(&p).unwrap();
    let good = p.server.export(sid, p.now).unwrap();
    assert!(p.server.export(sid ^ 1, p.now).is_none());
    let mut b = Server::with_rng(
        ServerConfig {
            max_sessions: 1,
            ..ServerConfig::default()
        },
        factory(),
        StdRng::seed_from_u64(5),
    );
    use pcp_auth::server::ImportError;
    let mut bad = good.clone();
    bad.mac = 13;
    assert!(matches!(
        b.import(p.now, &bad),
        Err(ImportError::Algorithm { .. })
    ));
    bad = good.clone();
    bad.key_id = 0;
    assert_eq!(b.import(p.now, &bad), Err(ImportError::Invalid));
    bad = good.clone();
    bad.remaining_ms = 0;
    assert_eq!(b.import(p.now, &bad), Err(ImportError::Expired));
    b.import(p.now, &good).unwrap();
    // Importing it again replaces it; another one does not fit.
    b.import(p.now, &good).unwrap();
    bad = good.clone();
    bad.session_id ^= 1;
    assert_eq!(b.import(p.now, &bad), Err(ImportError::Full));
    assert_eq!(b.session_count(), 1);
    b.forget_all();
    assert_eq!(b.session_count(), 0);
}

/// An authenticator that only queues what it gets (like pcpd's embedded back end,
/// whose work runs elsewhere): every response is [`AuthStep::Pending`].
struct Queues {
    got: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
}

impl pcp_auth::eap::EapAuthenticator for Queues {
    fn start(&mut self) -> Vec<u8> {
        ToyServer::new(&[], 7).start()
    }
    fn receive(&mut self, packet: &[u8]) -> pcp_auth::eap::AuthStep {
        self.got.lock().unwrap().push(packet.to_vec());
        pcp_auth::eap::AuthStep::Pending
    }
}

/// A message the shell could not hand to its back end (`backend_refused`: its work
/// queue was full) is forgotten: the client's retransmission of it is taken as new
/// and reaches the back end again, instead of being answered as a duplicate while the
/// session waits for an answer that never comes.
#[test]
fn a_message_refused_by_the_back_end_is_taken_again_when_retransmitted() {
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let g = got.clone();
    let mut server = Server::with_rng(
        ServerConfig::default(),
        move || Queues { got: g.clone() },
        StdRng::seed_from_u64(50),
    );
    let mut client = Client::with_rng(
        ClientConfig::new(CLIENT_IP),
        ToyPeer::new("alice", "correct horse"),
        StdRng::seed_from_u64(51),
    );
    let now = Time(5_000);
    client.start(now);
    server.handle(now, CLIENT, &client.poll_transmit().unwrap());
    client.handle(now, &server.poll_transmit().unwrap().payload);
    let reply = client.poll_transmit().expect("the client's EAP reply");
    server.handle(now, CLIENT, &reply);
    let sid = server.poll_backend().expect("to the back end");
    while server.poll_transmit().is_some() {}
    assert_eq!(got.lock().unwrap().len(), 1);
    // Without the refusal a copy is a duplicate: nothing new for the back end.
    server.handle(Time(5_600), CLIENT, &reply);
    assert_eq!(server.poll_backend(), None);
    server.backend_refused(sid);
    assert!(!server.session(sid).unwrap().waiting_backend);
    server.handle(Time(6_200), CLIENT, &reply);
    assert_eq!(server.poll_backend(), Some(sid), "not taken again");
    assert_eq!(got.lock().unwrap().len(), 2);
    assert!(server.session(sid).unwrap().waiting_backend);
    // Refusing a session that does not wait changes nothing.
    server.backend_refused(sid.wrapping_add(1));
    assert!(server.session(sid).unwrap().waiting_backend);
}
