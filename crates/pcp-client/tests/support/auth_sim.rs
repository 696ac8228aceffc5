//! An authenticating network for the sans-IO core: the fake PCP server behind
//! `pcp_auth`'s gate and PA server (with pcp-auth's toy EAP method), joined to the client
//! by a seeded lossy, reordering network, with simulated time.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use pcp_auth::gate::{Gate, Mode as GateMode, Rules};
use pcp_auth::server::{Server, ServerConfig};
use pcp_client::core::{Authentication, Client, Config, Event, Time, Transmit};
use rand::rngs::{SmallRng, StdRng};
use rand::{Rng, SeedableRng};

use crate::fake::{CLIENT, FakeServer, Mode, SERVER};
use crate::toy::{ToyPeer, ToyServer};

/// The client's socket as the server sees it.
pub const CLIENT_SOCK: SocketAddr = SocketAddr::new(CLIENT, 40_000);

pub type ToyGate = Gate<ToyServer, Box<dyn FnMut() -> ToyServer + Send>>;

/// A gate requiring authentication for everyone, alice with "secret" known.
pub fn gate(session_lifetime: u32, seed: u64) -> ToyGate {
    let cfg = ServerConfig {
        session_lifetime,
        ..ServerConfig::default()
    };
    let mut n = seed;
    let make: Box<dyn FnMut() -> ToyServer + Send> = Box::new(move || {
        n += 1;
        ToyServer::new(&[("alice", "secret")], n)
    });
    let server = Server::with_rng(cfg, make, StdRng::seed_from_u64(seed ^ 0x5eed));
    Gate::new(
        Rules {
            default: GateMode::Required,
            prefixes: Vec::new(),
        },
        server,
    )
}

/// The client's authentication with the toy method.
pub fn toy_auth(password: &'static str) -> Authentication {
    Authentication::new(move || Box::new(ToyPeer::new("alice", password)))
}

/// A client configuration that authenticates as alice with `password`.
pub fn auth_config(password: &'static str) -> Config {
    let mut cfg = Config::new(SERVER, CLIENT);
    cfg.authentication = Some(toy_auth(password));
    cfg
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    ToServer,
    ToClient,
}

pub struct AuthSim {
    pub client: Client,
    pub server: FakeServer,
    pub gate: ToyGate,
    pub now: Time,
    /// Share of datagrams lost, each way.
    pub loss: f64,
    /// Each datagram takes 1..=max_delay ms (different delays reorder them).
    pub max_delay: u64,
    /// While false, everything is lost.
    pub online: bool,
    net: SmallRng,
    in_flight: Vec<(Time, u64, Dir, Vec<u8>)>,
    order: u64,
    /// Everything the client sent.
    pub sent: Vec<(Time, Vec<u8>)>,
    /// Everything the server side sent to the client.
    pub replies: Vec<(Time, Vec<u8>)>,
    pub events: Vec<(Time, Event)>,
    session_lifetime: u32,
}

impl AuthSim {
    pub fn new(cfg: Config, session_lifetime: u32, seed: u64) -> AuthSim {
        AuthSim {
            client: Client::new(cfg, Time::ZERO, seed),
            server: FakeServer::new(Mode::Pcp),
            gate: gate(session_lifetime, seed),
            now: Time::ZERO,
            loss: 0.0,
            max_delay: 1,
            online: true,
            net: SmallRng::seed_from_u64(seed.wrapping_mul(7919)),
            in_flight: Vec::new(),
            order: 0,
            sent: Vec::new(),
            replies: Vec::new(),
            events: Vec::new(),
            session_lifetime,
        }
    }

    fn pa_now(&self) -> pcp_auth::Time {
        pcp_auth::Time(self.now.0)
    }

    fn put(&mut self, dir: Dir, bytes: Vec<u8>) {
        if !self.online || self.net.random_bool(self.loss) {
            return;
        }
        let delay = self.net.random_range(1..=self.max_delay.max(1));
        self.order += 1;
        self.in_flight
            .push((Time(self.now.0 + delay), self.order, dir, bytes));
    }

    /// Moves the client's output onto the network and collects its events.
    fn drain_client(&mut self) {
        while let Some(Transmit {
            payload,
            destination,
        }) = self.client.poll_transmit(self.now)
        {
            assert_eq!(destination, SERVER);
            self.sent.push((self.now, payload.clone()));
            self.put(Dir::ToServer, payload);
        }
        while let Some(e) = self.client.poll_event() {
            self.events.push((self.now, e));
        }
    }

    /// Moves the PA server's output onto the network.
    fn drain_server(&mut self) {
        while let Some(t) = self.gate.poll_transmit() {
            assert_eq!(t.dst, CLIENT_SOCK);
            self.replies.push((self.now, t.payload.clone()));
            self.put(Dir::ToClient, t.payload);
        }
        while self.gate.server.poll_event().is_some() {}
    }

    /// What the server side does with a datagram from the client.
    fn serve(&mut self, req: Vec<u8>) {
        use pcp_auth::gate::Inbound;
        let now = self.now;
        let pa_now = self.pa_now();
        let epoch = self.server.epoch(now);
        let len = req.len();
        let mut buf = req;
        buf.resize(1100, 0);
        match self.gate.inbound(pa_now, CLIENT_SOCK, epoch, &mut buf, len) {
            Inbound::Serve { len, session, .. } => {
                if let Some(mut resp) = self.server.handle(&buf[..len], now) {
                    let n = resp.len();
                    resp.resize(n + 64, 0);
                    if let Some(n) = self.gate.outbound(session, &mut resp, n) {
                        resp.truncate(n);
                        self.replies.push((now, resp.clone()));
                        self.put(Dir::ToClient, resp);
                    }
                }
            }
            Inbound::Answer(a) => {
                self.replies.push((now, a.clone()));
                self.put(Dir::ToClient, a);
            }
            Inbound::Handled | Inbound::Drop => {}
        }
        self.drain_server();
    }

    fn next_delivery(&self) -> Option<(Time, u64)> {
        self.in_flight.iter().map(|f| (f.0, f.1)).min()
    }

    /// Runs everything (deliveries, both sides' timers) until `until`.
    pub fn run_until(&mut self, until: Time) {
        self.drain_client();
        self.drain_server();
        loop {
            let timers = [
                self.client.poll_timeout(),
                self.gate.server.poll_timeout().map(|t| Time(t.0)),
                self.next_delivery().map(|d| d.0),
            ];
            let Some(t) = timers.into_iter().flatten().min() else {
                break;
            };
            if t > until {
                break;
            }
            assert!(t >= self.now, "time going back: {t} < {}", self.now);
            self.now = t;
            // Deliveries first (in send order among equal times), then timers.
            while let Some((at, order)) = self.next_delivery()
                && at <= self.now
            {
                let i = self
                    .in_flight
                    .iter()
                    .position(|f| f.1 == order)
                    .expect("in flight");
                let (_, _, dir, bytes) = self.in_flight.swap_remove(i);
                match dir {
                    Dir::ToServer => self.serve(bytes),
                    Dir::ToClient => {
                        self.client.handle_datagram(&bytes, SERVER, self.now);
                    }
                }
                self.drain_client();
            }
            if self.client.poll_timeout().is_some_and(|c| c <= self.now) {
                self.client.handle_timeout(self.now);
            }
            let pa_now = self.pa_now();
            if self.gate.server.poll_timeout().is_some_and(|s| s <= pa_now) {
                self.gate.server.handle_timeout(pa_now);
            }
            self.drain_client();
            self.drain_server();
        }
        self.now = until;
        self.drain_client();
    }

    /// Runs for `secs` more seconds.
    pub fn run_secs(&mut self, secs: u64) {
        let until = self.now + Duration::from_secs(secs);
        self.run_until(until);
    }

    /// Events so far, without times; clears them.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
            .into_iter()
            .map(|(_, e)| e)
            .collect()
    }

    /// The server loses everything: its mappings, its epoch and every PA session.
    pub fn restart_server(&mut self, seed: u64) {
        self.server.restart(self.now);
        self.gate = gate(self.session_lifetime, seed);
        self.in_flight.clear();
    }

    /// The common (non-PA) PCP requests the client sent.
    pub fn common_requests(&self) -> Vec<&[u8]> {
        self.sent
            .iter()
            .filter(|(_, b)| {
                b[0] == pcp_proto::VERSION
                    && pcp_proto::Opcode::from_bits(b[1]) != pcp_proto::Opcode::Authentication
            })
            .map(|(_, b)| b.as_slice())
            .collect()
    }
}
