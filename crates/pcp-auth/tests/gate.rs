//! The gate in front of a real PCP server core (pcp-server, in memory), with a client
//! that authenticates over the PA session machines: what `auth = off | optional |
//! required` does to untagged, tagged, replayed, tampered and stale requests, and that
//! nothing of a refused request changes the core's state.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use pcp_auth::Time;
use pcp_auth::client::{Client, ClientConfig};
use pcp_auth::gate::{Gate, Inbound, Mode, Rules};
use pcp_auth::server::{Server, ServerConfig};
use pcp_proto::{Body, MapBody, Options, Request, Response, ResultCode};
use pcp_server::Reply;
use rand::SeedableRng;
use rand::rngs::StdRng;
use support::{ToyPeer, ToyServer};

const CLIENT_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5));
const CLIENT: SocketAddr = SocketAddr::new(CLIENT_IP, 5350);

type Factory = Box<dyn FnMut() -> ToyServer>;

struct Bed {
    now: Time,
    gate: Gate<ToyServer, Factory>,
    core: pcp_server::Server,
    client: Client<ToyPeer>,
}

impl Bed {
    fn new(mode: Mode) -> Bed {
        let server = Server::with_rng(
            ServerConfig::default(),
            Box::new(|| ToyServer::new(&[("alice", "pw")], 1)) as Factory,
            StdRng::seed_from_u64(1),
        );
        let rules = Rules {
            default: Mode::Off,
            prefixes: vec![("10.0.0.0/8".parse().unwrap(), mode)],
        };
        let core =
            pcp_server::Server::new(pcp_server::ServerConfig::default(), pcp_server::Time(0), 1)
                .unwrap();
        let client = Client::with_rng(
            ClientConfig::new(CLIENT_IP),
            ToyPeer::new("alice", "pw"),
            StdRng::seed_from_u64(2),
        );
        Bed {
            now: Time(1_000),
            gate: Gate::new(rules, server),
            core,
            client,
        }
    }

    /// Runs the PA exchange over a perfect link.
    fn authenticate(&mut self) {
        self.client.start(self.now);
        for _ in 0..50 {
            let mut moved = false;
            while let Some(mut m) = self.client.poll_transmit() {
                let n = m.len();
                assert_eq!(
                    self.gate.inbound(self.now, CLIENT, 0, &mut m, n),
                    Inbound::Handled
                );
                moved = true;
            }
            while let Some(t) = self.gate.poll_transmit() {
                self.client.handle(self.now, &t.payload);
                moved = true;
            }
            if !moved {
                break;
            }
        }
        assert!(self.client.is_established());
    }

    /// Sends `req` (tagged by the client when `tag`) through gate and core; returns the
    /// wire request and what came back.
    fn send(&mut self, req: &Request<'_>, tag: bool) -> (Vec<u8>, Option<Vec<u8>>) {
        let mut buf = vec![0u8; 1100];
        let mut n = req.emit(&mut buf).unwrap();
        if tag {
            n = self.client.protect(self.now, &mut buf, n).unwrap();
        }
        let wire = buf[..n].to_vec();
        (wire.clone(), self.deliver(&wire))
    }

    /// Puts raw request bytes through gate and core.
    fn deliver(&mut self, wire: &[u8]) -> Option<Vec<u8>> {
        let mut buf = wire.to_vec();
        buf.resize(1100, 0);
        match self.gate.inbound(self.now, CLIENT, 0, &mut buf, wire.len()) {
            Inbound::Serve { len, session, .. } => {
                let mut reply = vec![0u8; 1100];
                let mut effects = Vec::new();
                let t = pcp_server::Time(self.now.0);
                let n = match self
                    .core
                    .handle(&buf[..len], CLIENT, t, &mut reply, &mut effects)
                {
                    Reply::Send(n) | Reply::Hold(n) => n,
                    Reply::Drop => return None,
                };
                let n = self.gate.outbound(session, &mut reply, n)?;
                reply.truncate(n);
                Some(reply)
            }
            Inbound::Answer(a) => Some(a),
            Inbound::Handled | Inbound::Drop => None,
        }
    }
}

fn map(port: u16, lifetime: u32) -> Request<'static> {
    Request {
        lifetime,
        client_addr: CLIENT_IP,
        body: Body::Map(MapBody {
            nonce: [3; 12],
            protocol: 17,
            internal_port: port,
            external_port: 0,
            external_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        }),
        options: Options::EMPTY,
        pa_result_code: ResultCode::Success,
    }
}

fn code(reply: &[u8]) -> ResultCode {
    Response::parse(reply).unwrap().result_code
}

#[test]
fn required_refuses_untagged_and_serves_tagged_with_tagged_replies() {
    let mut b = Bed::new(Mode::Required);
    let (_, r) = b.send(&map(5000, 3600), false);
    assert_eq!(code(&r.unwrap()), ResultCode::AuthenticationRequired);
    assert_eq!(b.core.mapping_count(), 0);
    assert_eq!(b.gate.stats().required, 1);

    b.authenticate();
    let (_, r) = b.send(&map(5000, 3600), true);
    let r = r.expect("a reply");
    assert_eq!(code(&r), ResultCode::Success);
    assert_eq!(b.client.verify_response(b.now, &r), Ok(()));
    assert_eq!(b.core.mapping_count(), 1);
    assert_eq!(b.gate.stats().authenticated, 1);
}

#[test]
fn replayed_and_tampered_requests_are_dropped_counted_and_change_nothing() {
    let mut b = Bed::new(Mode::Required);
    b.authenticate();
    let (create, r) = b.send(&map(5000, 3600), true);
    assert_eq!(code(&r.unwrap()), ResultCode::Success);
    // The client deletes the mapping.
    let (_, r) = b.send(&map(5000, 0), true);
    assert_eq!(code(&r.unwrap()), ResultCode::Success);
    assert_eq!(b.core.mapping_count(), 0);
    // An attacker replays the creation: dropped, counted, no mapping.
    assert_eq!(b.deliver(&create), None);
    assert_eq!(b.core.mapping_count(), 0);
    assert_eq!(b.gate.stats().replayed, 1);
    // A tampered request (another port) is dropped too.
    let mut buf = vec![0u8; 1100];
    let n = map(6000, 3600).emit(&mut buf).unwrap();
    let n = b.client.protect(b.now, &mut buf, n).unwrap();
    buf[24 + 16] ^= 0xff; // internal port
    assert_eq!(b.deliver(&buf[..n]), None);
    assert_eq!(b.core.mapping_count(), 0);
    assert_eq!(b.gate.stats().bad_tag, 1);
}

#[test]
fn optional_serves_both_and_still_checks_tags() {
    let mut b = Bed::new(Mode::Optional);
    let (_, r) = b.send(&map(5000, 3600), false);
    assert_eq!(code(&r.unwrap()), ResultCode::Success);
    b.authenticate();
    let (tagged, r) = b.send(&map(5001, 3600), true);
    let r = r.unwrap();
    assert_eq!(b.client.verify_response(b.now, &r), Ok(()));
    let mut bad = tagged.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert_eq!(b.deliver(&bad), None);
    assert_eq!(b.core.mapping_count(), 2);
}

#[test]
fn off_answers_as_a_server_without_rfc7652() {
    let mut b = Bed::new(Mode::Off);
    // Authenticate against a gate that is on for this test, then switch the prefix off.
    b.gate.rules.prefixes[0].1 = Mode::Required;
    b.authenticate();
    b.gate.rules.prefixes[0].1 = Mode::Off;
    let (_, r) = b.send(&map(5000, 3600), true);
    assert_eq!(code(&r.unwrap()), ResultCode::UnsuppOption);
    b.client.start(b.now);
    let mut pa = b.client.poll_transmit().unwrap();
    let n = pa.len();
    pa.resize(1100, 0);
    let r = match b.gate.inbound(b.now, CLIENT, 0, &mut pa, n) {
        Inbound::Serve { len, .. } => {
            let mut reply = vec![0u8; 1100];
            match b.core.handle(
                &pa[..len],
                CLIENT,
                pcp_server::Time(0),
                &mut reply,
                &mut Vec::new(),
            ) {
                Reply::Send(n) => reply[..n].to_vec(),
                other => panic!("{other:?}"),
            }
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(code(&r), ResultCode::UnsuppOpcode);
    assert_eq!(b.core.mapping_count(), 0);
}

#[test]
fn a_session_the_server_lost_gets_unknown_session_id_and_the_client_recovers() {
    let mut b = Bed::new(Mode::Required);
    b.authenticate();
    // The gate's sessions are lost (restart).
    b.gate.server = Server::with_rng(
        ServerConfig::default(),
        Box::new(|| ToyServer::new(&[("alice", "pw")], 9)) as Factory,
        StdRng::seed_from_u64(9),
    );
    let (_, r) = b.send(&map(5000, 3600), true);
    let r = r.unwrap();
    assert_eq!(code(&r), ResultCode::UnknownSessionId);
    assert_eq!(b.gate.stats().unknown_session, 1);
    assert!(b.client.verify_response(b.now, &r).is_err());
    // The client started over by itself; finish the exchange and map.
    for _ in 0..50 {
        let mut moved = false;
        while let Some(mut m) = b.client.poll_transmit() {
            let n = m.len();
            b.gate.inbound(b.now, CLIENT, 0, &mut m, n);
            moved = true;
        }
        while let Some(t) = b.gate.poll_transmit() {
            b.client.handle(b.now, &t.payload);
            moved = true;
        }
        if !moved {
            break;
        }
    }
    assert!(b.client.is_established());
    let (_, r) = b.send(&map(5000, 3600), true);
    assert_eq!(code(&r.unwrap()), ResultCode::Success);
}
