//! The server's deadline index against the brute-force scan it replaced: many clients
//! driven through random operations (authentication, tagged requests, terminations,
//! re-authentications, server-initiated sessions, imports, a forget-all, a reload,
//! sequence spaces running out) and random advances of `now`, on two servers in
//! lockstep: one runs its timers from the index ([`Server::handle_timeout`]), its twin
//! by looking at every session ([`Server::handle_timeout_scan`]). After every step
//! `poll_timeout` must be the brute-force minimum, both must have sent and reported
//! the same, and after a timer run no session may be left due.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use pcp_auth::client::{Client, ClientConfig};
use pcp_auth::replay::REAUTH_THRESHOLD;
use pcp_auth::server::{FAILOVER_OUT_JUMP, Server, ServerConfig, ServerEvent, Transmit};
use pcp_auth::{RetransmitConfig, Time};
use pcp_proto::{Body, MapBody, Options, Request, Response, ResultCode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::{ToyPeer, ToyServer};

type Factory = Box<dyn FnMut() -> ToyServer>;

fn factory() -> Factory {
    let mut n = 0;
    Box::new(move || {
        n += 1000;
        ToyServer::new(&[("alice", "correct horse")], n)
    })
}

fn ip(i: usize) -> IpAddr {
    // Several /24s, so the half-open cap per prefix is not what limits the test.
    IpAddr::V4(Ipv4Addr::new(198, 51, (i % 4) as u8, 10 + i as u8))
}

fn addr(i: usize) -> SocketAddr {
    SocketAddr::new(ip(i), 5350)
}

fn retransmit(mrd_s: u64) -> RetransmitConfig {
    RetransmitConfig {
        irt: Duration::from_millis(700),
        mrt: Duration::from_secs(8),
        mrd: Duration::from_secs(mrd_s),
    }
}

fn config(mrd_s: u64) -> ServerConfig {
    ServerConfig {
        retransmit: retransmit(mrd_s),
        session_lifetime: 40,
        ..ServerConfig::default()
    }
}

/// The server with the index and its twin that scans, fed the same.
struct Twins {
    indexed: Server<ToyServer, Factory>,
    scanning: Server<ToyServer, Factory>,
    timer_runs: usize,
    due_runs: usize,
}

impl Twins {
    fn new(seed: u64) -> Twins {
        let s = || Server::with_rng(config(20), factory(), StdRng::seed_from_u64(seed));
        Twins {
            indexed: s(),
            scanning: s(),
            timer_runs: 0,
            due_runs: 0,
        }
    }

    /// Does `f` to both, then checks they agree and the index is exact.
    fn both<R: PartialEq + std::fmt::Debug>(
        &mut self,
        what: &str,
        mut f: impl FnMut(&mut Server<ToyServer, Factory>) -> R,
    ) -> R {
        let a = f(&mut self.indexed);
        let b = f(&mut self.scanning);
        assert_eq!(a, b, "{what}: the twins answered differently");
        self.check(what);
        a
    }

    fn check(&self, what: &str) {
        for s in [&self.indexed, &self.scanning] {
            assert_eq!(
                s.poll_timeout(),
                s.poll_timeout_scan(),
                "{what}: poll_timeout is not the earliest deadline of any session"
            );
            assert_eq!(s.unsettled_timers(), 0, "{what}: index left unsettled");
        }
        assert_eq!(self.indexed.session_count(), self.scanning.session_count());
    }

    fn timers(&mut self, now: Time) {
        self.timer_runs += 1;
        if self.indexed.poll_timeout().is_some_and(|t| t <= now) {
            self.due_runs += 1;
        }
        self.indexed.handle_timeout(now);
        self.scanning.handle_timeout_scan(now);
        self.check("handle_timeout");
        assert!(
            self.indexed.poll_timeout_scan().is_none_or(|t| t > now),
            "a session due at {now:?} was left unprocessed"
        );
    }

    /// What both sent and reported since the last call (the same, or the test fails).
    fn drain(&mut self) -> (Vec<Transmit>, Vec<ServerEvent>) {
        let out = |s: &mut Server<ToyServer, Factory>| {
            let t: Vec<Transmit> = std::iter::from_fn(|| s.poll_transmit()).collect();
            let e: Vec<ServerEvent> = std::iter::from_fn(|| s.poll_event()).collect();
            (t, e)
        };
        let a = out(&mut self.indexed);
        let b = out(&mut self.scanning);
        assert_eq!(a, b, "the twins sent or reported differently");
        a
    }
}

fn map_request(i: usize) -> Request<'static> {
    Request {
        lifetime: 3600,
        client_addr: ip(i),
        body: Body::Map(MapBody {
            nonce: [7; 12],
            protocol: 17,
            internal_port: 1000 + i as u16,
            external_port: 0,
            external_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        }),
        options: Options::EMPTY,
        pa_result_code: ResultCode::Success,
    }
}

fn run(seed: u64, steps: usize) -> (usize, usize, usize) {
    const CLIENTS: usize = 24;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut clients: Vec<Client<ToyPeer>> = (0..CLIENTS)
        .map(|i| {
            let mut cfg = ClientConfig::new(ip(i));
            cfg.retransmit = retransmit(20);
            cfg.reauth_percent = 60;
            Client::with_rng(
                cfg,
                ToyPeer::new("alice", "correct horse"),
                StdRng::seed_from_u64(seed.wrapping_mul(31).wrapping_add(i as u64)),
            )
        })
        .collect();
    let mut twins = Twins::new(seed);
    let mut now = Time(1_000_000);
    // (deliver at, to the server?, client, datagram)
    let mut net: Vec<(Time, bool, usize, Vec<u8>)> = Vec::new();
    let mut established = 0;
    let mut reauth_forced = 0;
    for step in 0..steps {
        let what = format!("seed {seed} step {step}");
        match rng.random_range(0..100) {
            // Time passes: mostly a little, sometimes past lifetimes and MRDs.
            0..=34 => {
                let d = if rng.random_bool(0.1) {
                    rng.random_range(0..90_000)
                } else {
                    rng.random_range(0..1_500)
                };
                now = Time(now.0 + d);
                let (due, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut net)
                    .into_iter()
                    .partition(|m| m.0 <= now);
                net = rest;
                for (_, to_server, i, m) in due {
                    if to_server {
                        twins.both(&what, |s| s.handle(now, addr(i), &m));
                    } else {
                        clients[i].handle(now, &m);
                    }
                }
                for c in &mut clients {
                    c.handle_timeout(now);
                }
                twins.timers(now);
            }
            35..=49 => {
                let i = rng.random_range(0..CLIENTS);
                if clients[i].is_idle() {
                    clients[i].start(now);
                }
            }
            // A tagged request and its tagged reply.
            50..=64 => {
                let i = rng.random_range(0..CLIENTS);
                if !clients[i].is_established() {
                    continue;
                }
                let mut buf = vec![0u8; 1100];
                let n = map_request(i).emit(&mut buf).unwrap();
                let Ok(n) = clients[i].protect(now, &mut buf, n) else {
                    continue;
                };
                buf.truncate(n);
                let check = twins.both(&what, |s| s.check_request(ip(i), &buf));
                if let pcp_auth::server::Check::Authenticated { session_id, .. } = check {
                    let resp = Response {
                        result_code: ResultCode::Success,
                        lifetime: 3600,
                        epoch: 1,
                        body: Request::parse(&buf).unwrap().body,
                        options: Options::EMPTY,
                    };
                    let mut out = vec![0u8; 1100];
                    let n = resp.emit(&mut out).unwrap();
                    let r = twins.both(&what, |s| {
                        let mut o = out.clone();
                        s.protect_response(session_id, &mut o, n).map(|n| {
                            o.truncate(n);
                            o
                        })
                    });
                    if let Ok(o) = r {
                        let _ = clients[i].verify_response(now, &o);
                    }
                }
            }
            65..=69 => {
                let ids: Vec<u32> = twins.indexed.sessions().map(|s| s.session_id).collect();
                if let Some(&id) = ids.get(rng.random_range(0..ids.len().max(1))) {
                    twins.both(&what, |s| s.terminate(now, id));
                }
            }
            70..=74 => {
                let ids: Vec<u32> = twins.indexed.sessions().map(|s| s.session_id).collect();
                if let Some(&id) = ids.get(rng.random_range(0..ids.len().max(1))) {
                    twins.both(&what, |s| s.reauthenticate(now, id));
                }
            }
            75..=79 => {
                let i = rng.random_range(0..CLIENTS);
                twins.both(&what, |s| s.start(now, addr(i)));
            }
            // Re-import an established session (a takeover), sometimes with little
            // lifetime left, sometimes with its sequence space nearly used up.
            80..=87 => {
                let ids: Vec<u32> = twins.indexed.sessions().map(|s| s.session_id).collect();
                let Some(&id) = ids.get(rng.random_range(0..ids.len().max(1))) else {
                    continue;
                };
                let Some(mut e) = twins.indexed.export(id, now) else {
                    continue;
                };
                match rng.random_range(0..3) {
                    0 => e.remaining_ms = rng.random_range(1..5_000),
                    1 => {
                        e.sequence.next_out = REAUTH_THRESHOLD - FAILOVER_OUT_JUMP - 1;
                        reauth_forced += 1;
                    }
                    _ => {}
                }
                let _ = twins.both(&what, |s| s.import(now, &e));
            }
            88 => {
                twins.both(&what, |s| s.forget_all());
            }
            89 => {
                let mrd = rng.random_range(5..40);
                twins.both(&what, |s| {
                    let mut c = s.config().clone();
                    c.retransmit = retransmit(mrd);
                    s.set_config(c);
                });
            }
            // A client ends its session.
            90..=92 => {
                let i = rng.random_range(0..CLIENTS);
                if clients[i].is_established() {
                    clients[i].terminate(now);
                }
            }
            _ => {
                let i = rng.random_range(0..CLIENTS);
                if clients[i].is_established() {
                    clients[i].reauthenticate(now);
                }
            }
        }
        // Out onto a network that loses some and delays all.
        let (sent, events) = twins.drain();
        established += events
            .iter()
            .filter(|e| matches!(e, ServerEvent::Established { .. }))
            .count();
        for t in sent {
            let Some(i) = (0..CLIENTS).find(|&i| addr(i) == t.dst) else {
                panic!("{what}: sent to {}", t.dst);
            };
            if !rng.random_bool(0.1) {
                net.push((Time(now.0 + rng.random_range(1..400)), false, i, t.payload));
            }
        }
        for (i, c) in clients.iter_mut().enumerate() {
            while let Some(m) = c.poll_transmit() {
                if !rng.random_bool(0.1) {
                    net.push((Time(now.0 + rng.random_range(1..400)), true, i, m));
                }
            }
            while c.poll_event().is_some() {}
        }
    }
    assert!(twins.timer_runs > 0);
    (established, twins.due_runs, reauth_forced)
}

#[test]
fn deadline_index_matches_the_brute_force_scan_under_random_operations() {
    let (mut established, mut due, mut forced) = (0, 0, 0);
    for seed in 0..12 {
        let (e, d, f) = run(seed, 3_000);
        established += e;
        due += d;
        forced += f;
    }
    // The operations reached what they are meant to exercise.
    assert!(established > 100, "only {established} sessions established");
    assert!(due > 500, "only {due} timer runs had a session due");
    assert!(forced > 10, "only {forced} sequence spaces near exhaustion");
}

/// Crossing REAUTH_THRESHOLD is not a time: the session must become due at once, or
/// its re-authentication would wait for some unrelated deadline.
#[test]
fn sequence_space_running_out_makes_the_session_due_at_once() {
    let mut twins = Twins::new(7);
    let now = Time(5_000);
    let e = pcp_auth::server::SessionExport {
        session_id: 42,
        client: addr(1),
        identity: "alice".into(),
        nonce: 1,
        key_id: 1,
        key: [9; 32],
        prf: pcp_auth::crypto::PRF_HMAC_SHA2_256,
        mac: pcp_auth::crypto::AUTH_HMAC_SHA2_256_128,
        remaining_ms: 3_600_000,
        pa_in: 3,
        pa_out: 3,
        sequence: pcp_auth::server::SequenceState {
            last_in: None,
            next_out: REAUTH_THRESHOLD - FAILOVER_OUT_JUMP - 1,
        },
    };
    twins.both("import", |s| s.import(now, &e)).unwrap();
    assert_eq!(twins.indexed.poll_timeout(), Some(Time(now.0 + 3_600_000)));
    let resp = Response {
        result_code: ResultCode::Success,
        lifetime: 0,
        epoch: 0,
        body: Body::Announce,
        options: Options::EMPTY,
    };
    let mut buf = [0u8; 1100];
    let n = resp.emit(&mut buf).unwrap();
    twins
        .both("protect", |s| s.protect_response(42, &mut buf.clone(), n))
        .unwrap();
    assert!(
        twins.indexed.poll_timeout().is_some_and(|t| t <= now),
        "due at once: {:?}",
        twins.indexed.poll_timeout()
    );
    twins.timers(now);
    let (sent, _) = twins.drain();
    assert_eq!(sent.len(), 1, "the re-authentication request");
    let r = Response::parse(&sent[0].payload).unwrap();
    assert_eq!(r.result_code, ResultCode::AuthenticationRequest);
}
