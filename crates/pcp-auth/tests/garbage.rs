//! Arbitrary and mutated datagrams never panic either side, and a server that has
//! sessions never accepts a mutated tagged request.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use pcp_auth::Time;
use pcp_auth::client::{Client, ClientConfig};
use pcp_auth::server::{Check, Server, ServerConfig};
use pcp_testkit::pcp::tcp_map_request;
use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;
use support::{ToyPeer, ToyServer};

const IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
const SRC: SocketAddr = SocketAddr::new(IP, 5350);

type Srv = Server<ToyServer, Box<dyn FnMut() -> ToyServer>>;

/// An established pair (perfect link).
fn pair() -> (Client<ToyPeer>, Srv) {
    let mut c = Client::with_rng(
        ClientConfig::new(IP),
        ToyPeer::new("alice", "pw"),
        StdRng::seed_from_u64(1),
    );
    let mut s: Srv = Server::with_rng(
        ServerConfig::default(),
        Box::new(|| ToyServer::new(&[("alice", "pw")], 7)),
        StdRng::seed_from_u64(2),
    );
    c.start(Time(0));
    for _ in 0..30 {
        while let Some(m) = c.poll_transmit() {
            s.handle(Time(0), SRC, &m);
        }
        while let Some(t) = s.poll_transmit() {
            c.handle(Time(0), &t.payload);
        }
    }
    assert!(c.is_established());
    (c, s)
}

fn tagged(c: &mut Client<ToyPeer>) -> Vec<u8> {
    let (mut b, n) = tcp_map_request(IP, 80, 60);
    let n = c.protect(Time(0), &mut b, n).unwrap();
    b.truncate(n);
    b
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..1200)) {
        let (mut c, mut s) = pair();
        s.handle(Time(1), SRC, &data);
        let _ = s.check_request(IP, &data);
        c.handle(Time(1), &data);
        let _ = c.verify_response(Time(1), &data);
        s.handle_timeout(Time(10_000_000));
        c.handle_timeout(Time(10_000_000));
    }

    #[test]
    fn mutated_tagged_requests_are_never_accepted(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
    ) {
        let (mut c, mut s) = pair();
        let original = tagged(&mut c);
        let mut m = original.clone();
        for (i, x) in flips {
            let i = i.index(m.len());
            m[i] ^= x;
        }
        // Two flips of one octet can cancel out: that is the genuine message.
        prop_assume!(m != original);
        let verdict = s.check_request(IP, &m);
        prop_assert!(!matches!(verdict, Check::Authenticated { .. }), "{verdict:?}");
    }
}
