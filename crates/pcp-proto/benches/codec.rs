//! Codec micro-benchmarks: parse and emit of MAP and PEER requests carrying
//! CHECKPOINT_REQUIRED (192), next to a baseline that only copies and sums 64 octets,
//! so that `docs/BENCHMARKS.md` can give every figure as a ratio to it.
//!
//! `cargo bench -p pcp-proto --bench codec -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::net::IpAddr;

use criterion::{Criterion, criterion_group, criterion_main};
use pcp_proto::{
    Body, MAX_MESSAGE_LEN, MapBody, Options, PcpOption, PeerBody, Request, ResultCode, protocol,
};

const CHECKPOINT: [PcpOption<'static>; 1] = [PcpOption::CheckpointRequired];

fn addr(s: &str) -> IpAddr {
    s.parse().expect("address literal")
}

fn map_body() -> MapBody {
    MapBody {
        nonce: *b"bench-nonce1",
        protocol: protocol::UDP,
        internal_port: 5060,
        external_port: 0,
        external_addr: addr("0.0.0.0"),
    }
}

/// A MAP request with CHECKPOINT_REQUIRED: 24 + 36 + 4 = 64 octets.
fn map_request() -> Request<'static> {
    Request {
        lifetime: 3600,
        client_addr: addr("192.0.2.10"),
        body: Body::Map(map_body()),
        options: Options::from_list(&CHECKPOINT),
        pa_result_code: ResultCode::Success,
    }
}

/// A PEER request with CHECKPOINT_REQUIRED: 24 + 56 + 4 = 84 octets.
fn peer_request() -> Request<'static> {
    Request {
        body: Body::Peer(PeerBody {
            mapping: map_body(),
            remote_port: 443,
            remote_addr: addr("203.0.113.9"),
        }),
        ..map_request()
    }
}

fn encode(req: &Request<'_>) -> Vec<u8> {
    let mut buf = [0u8; MAX_MESSAGE_LEN];
    let n = req.emit(&mut buf).expect("emit");
    buf[..n].to_vec()
}

fn codec(c: &mut Criterion) {
    let map = map_request();
    let map_wire = encode(&map);
    assert_eq!(map_wire.len(), 64, "MAP+192 request must be 64 octets");
    let map_wire: [u8; 64] = map_wire.try_into().expect("64 octets");
    assert!(
        Request::parse(&map_wire)
            .expect("parses")
            .options
            .checkpoint_required()
    );

    let peer_wire = encode(&peer_request());
    assert_eq!(peer_wire.len(), 84, "PEER+192 request must be 84 octets");
    assert!(
        Request::parse(&peer_wire)
            .expect("parses")
            .options
            .checkpoint_required()
    );

    c.bench_function("baseline copy 64B", |b| {
        let mut buf = [0u8; 64];
        b.iter(|| {
            buf.copy_from_slice(black_box(&map_wire));
            black_box(&mut buf)
                .iter()
                .map(|&x| u32::from(x))
                .sum::<u32>()
        })
    });

    c.bench_function("parse MAP+192", |b| {
        b.iter(|| Request::parse(black_box(&map_wire)))
    });

    c.bench_function("emit MAP+192", |b| {
        let mut buf = [0u8; MAX_MESSAGE_LEN];
        b.iter(|| black_box(&map).emit(black_box(&mut buf)))
    });

    c.bench_function("parse PEER+192", |b| {
        b.iter(|| Request::parse(black_box(peer_wire.as_slice())))
    });
}

criterion_group!(benches, codec);
criterion_main!(benches);
