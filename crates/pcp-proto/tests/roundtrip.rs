//! Property tests: `parse(emit(x)) == x` for every message kind and option, byte
//! stability for canonical input, and no panic on any input.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use pcp_proto::{
    AuthenticationBody, AuthenticationTag, Body, Filter, MapBody, Options, PaAuthenticationTag,
    PcpOption, PeerBody, PortSet, Request, Response, ResultCode, natpmp,
};
use proptest::prelude::*;

/// An option with owned data, turned into a borrowed [`PcpOption`] inside the test.
#[derive(Debug, Clone)]
enum Owned {
    ThirdParty(IpAddr),
    PreferFailure,
    Filter(Filter),
    Nonce(u32),
    Prf(u32),
    Mac(u32),
    SessionLifetime(u32),
    ReceivedPak(u32),
    Eap(Vec<u8>),
    IdIndicator(String),
    /// AUTHENTICATION_TAG: session, sequence, key ID, MAC.
    Tag(u32, u32, u32, Vec<u8>),
    /// PA_AUTHENTICATION_TAG: key ID, MAC.
    PaTag(u32, Vec<u8>),
    Description(String),
    Prefix64(Vec<u8>),
    PortSet(PortSet),
    Checkpoint,
    Unknown(u8, Vec<u8>),
}

impl Owned {
    fn borrow(&self) -> PcpOption<'_> {
        match self {
            Owned::ThirdParty(a) => PcpOption::ThirdParty(*a),
            Owned::PreferFailure => PcpOption::PreferFailure,
            Owned::Filter(f) => PcpOption::Filter(*f),
            Owned::Nonce(v) => PcpOption::Nonce(*v),
            Owned::Prf(v) => PcpOption::Prf(*v),
            Owned::Mac(v) => PcpOption::MacAlgorithm(*v),
            Owned::SessionLifetime(v) => PcpOption::SessionLifetime(*v),
            Owned::ReceivedPak(v) => PcpOption::ReceivedPak(*v),
            Owned::Eap(d) => PcpOption::EapPayload(d),
            Owned::IdIndicator(s) => PcpOption::IdIndicator(s),
            Owned::Tag(session_id, sequence_number, key_id, mac) => {
                PcpOption::AuthenticationTag(AuthenticationTag {
                    session_id: *session_id,
                    sequence_number: *sequence_number,
                    key_id: *key_id,
                    mac,
                })
            }
            Owned::PaTag(key_id, mac) => PcpOption::PaAuthenticationTag(PaAuthenticationTag {
                key_id: *key_id,
                mac,
            }),
            Owned::Description(d) => PcpOption::Description(d),
            Owned::Prefix64(d) => PcpOption::Prefix64(d),
            Owned::PortSet(p) => PcpOption::PortSet(*p),
            Owned::Checkpoint => PcpOption::CheckpointRequired,
            Owned::Unknown(code, data) => PcpOption::Unknown { code: *code, data },
        }
    }
}

fn addr() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<u32>().prop_map(|v| IpAddr::V4(Ipv4Addr::from(v))),
        // Excludes the IPv4-mapped range, which decodes as IPv4 by design.
        any::<u128>()
            .prop_filter("not v4-mapped", |v| (v >> 32) != 0xffff)
            .prop_map(|v| IpAddr::V6(Ipv6Addr::from(v))),
    ]
}

fn filter() -> impl Strategy<Value = Filter> {
    (addr(), any::<u16>(), any::<u8>()).prop_map(|(remote_addr, remote_port, p)| Filter {
        prefix_len: match remote_addr {
            IpAddr::V4(_) => 96 + p % 33,
            IpAddr::V6(_) => p % 129,
        },
        remote_port,
        remote_addr,
    })
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

/// RFC 7652 options valid for `opcode` in a request or a response: each once-only option
/// at most once, PRF and MAC_ALGORITHM repeated, response-only ones in responses only;
/// the tag, if any, is returned apart because it must come last.
fn auth_options_for(
    opcode: u8,
    response: bool,
) -> impl Strategy<Value = (Vec<Owned>, Option<Owned>)> {
    let auth = opcode == 3;
    (
        proptest::option::weighted(0.3, any::<u32>()),
        proptest::collection::vec(any::<u32>(), 0..3),
        proptest::collection::vec(any::<u32>(), 0..3),
        proptest::option::weighted(0.3, any::<u32>()),
        proptest::option::weighted(0.3, any::<u32>()),
        proptest::option::weighted(0.3, proptest::collection::vec(any::<u8>(), 4..300)),
        proptest::option::weighted(0.3, "\\PC{0,20}"),
        proptest::option::weighted(0.5, (any::<u32>(), any::<u32>(), any::<u32>(), bytes(33))),
    )
        .prop_map(move |(nonce, prfs, macs, lifetime, pak, eap, id, tag)| {
            let mut v = Vec::new();
            if !auth {
                let tag = tag.map(|(s, q, k, m)| Owned::Tag(s, q, k, m));
                return (v, tag);
            }
            v.extend(nonce.map(Owned::Nonce));
            v.extend(prfs.into_iter().map(Owned::Prf));
            v.extend(macs.into_iter().map(Owned::Mac));
            v.extend(pak.map(Owned::ReceivedPak));
            v.extend(eap.map(Owned::Eap));
            if response {
                v.extend(lifetime.map(Owned::SessionLifetime));
                v.extend(id.map(Owned::IdIndicator));
            }
            (v, tag.map(|(_, _, k, m)| Owned::PaTag(k, m)))
        })
}

/// Options valid for `opcode` (1 MAP, 2 PEER, 0 ANNOUNCE, 3 AUTHENTICATION): each
/// once-only option at most once, in a random order, a tag last.
fn options_for(opcode: u8, response: bool) -> impl Strategy<Value = Vec<Owned>> {
    let map_or_peer = opcode == 1 || opcode == 2;
    let map = opcode == 1;
    (
        proptest::option::weighted(0.3, addr()),
        proptest::bool::weighted(0.3),
        proptest::collection::vec(filter(), 0..3),
        proptest::option::weighted(0.3, "\\PC{0,20}"),
        proptest::option::weighted(
            0.3,
            (1..=u16::MAX, any::<u16>(), any::<bool>()).prop_map(|(size, first, parity)| PortSet {
                size,
                first_internal_port: first,
                parity,
            }),
        ),
        proptest::bool::weighted(0.5),
        auth_options_for(opcode, response),
        proptest::collection::vec(
            (131u8..=255, bytes(9)).prop_filter("not 192", |(c, _)| *c != 192),
            0..3,
        ),
        proptest::option::of(
            (0u16..=12, proptest::collection::vec(any::<u8>(), 12..30))
                .prop_map(|(len, rest)| [&len.to_be_bytes()[..], &rest[..]].concat()),
        ),
    )
        .prop_flat_map(move |(tp, pf, filters, desc, ps, cp, auth, unknown, p64)| {
            let mut v = Vec::new();
            if map_or_peer {
                v.extend(tp.map(Owned::ThirdParty));
                v.extend(desc.map(Owned::Description));
                if cp {
                    v.push(Owned::Checkpoint);
                }
            }
            if map {
                if pf {
                    v.push(Owned::PreferFailure);
                }
                v.extend(filters.into_iter().map(Owned::Filter));
                v.extend(ps.map(Owned::PortSet));
            }
            let (auth, tag) = auth;
            v.extend(auth);
            v.extend(unknown.into_iter().map(|(c, d)| Owned::Unknown(c, d)));
            v.extend(p64.map(Owned::Prefix64));
            Just(v).prop_shuffle().prop_map(move |mut v| {
                v.extend(tag.clone());
                v
            })
        })
}

fn map_body() -> impl Strategy<Value = MapBody> {
    (
        any::<[u8; 12]>(),
        any::<u8>(),
        any::<u16>(),
        any::<u16>(),
        addr(),
    )
        .prop_map(
            |(nonce, protocol, internal_port, external_port, external_addr)| MapBody {
                nonce,
                protocol,
                internal_port,
                external_port,
                external_addr,
            },
        )
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        Just(Body::Announce),
        map_body().prop_map(Body::Map),
        (map_body(), any::<u16>(), addr()).prop_map(|(mapping, remote_port, remote_addr)| {
            Body::Peer(PeerBody {
                mapping,
                remote_port,
                remote_addr,
            })
        }),
        (any::<u32>(), any::<u32>()).prop_map(|(session_id, sequence_number)| {
            Body::Authentication(AuthenticationBody {
                session_id,
                sequence_number,
            })
        }),
    ]
}

fn body_and_options(response: bool) -> impl Strategy<Value = (Body, Vec<Owned>)> {
    body().prop_flat_map(move |b| {
        let opcode = b.opcode().to_bits();
        (Just(b), options_for(opcode, response))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn request_round_trips(
        (body, owned) in body_and_options(false),
        lifetime in any::<u32>(),
        client_addr in addr(),
        pa in any::<u8>(),
    ) {
        let list: Vec<PcpOption<'_>> = owned.iter().map(Owned::borrow).collect();
        let req = Request {
            lifetime,
            client_addr,
            body,
            options: Options::from_list(&list),
            pa_result_code: if matches!(body, Body::Authentication(_)) {
                ResultCode::from(pa)
            } else {
                ResultCode::Success
            },
        };
        let mut buf = [0u8; 2048];
        match req.emit(&mut buf) {
            Ok(n) => {
                prop_assert_eq!(n, req.buffer_len());
                let parsed = Request::parse(&buf[..n]).unwrap();
                prop_assert_eq!(parsed, req);
                // Canonical bytes are stable through parse and emit.
                let mut again = [0u8; 2048];
                let m = parsed.emit(&mut again).unwrap();
                prop_assert_eq!(&again[..m], &buf[..n]);
            }
            Err(pcp_proto::EmitError::TooLong { len }) => prop_assert!(len > 1100),
            Err(e) => prop_assert!(false, "emit failed: {e}"),
        }
    }

    #[test]
    fn response_round_trips(
        (body, owned) in body_and_options(true),
        lifetime in any::<u32>(),
        epoch in any::<u32>(),
        result in any::<u8>(),
    ) {
        let list: Vec<PcpOption<'_>> = owned.iter().map(Owned::borrow).collect();
        let resp = Response {
            result_code: ResultCode::from(result),
            lifetime,
            epoch,
            body,
            options: Options::from_list(&list),
        };
        let mut buf = [0u8; 2048];
        if let Ok(n) = resp.emit(&mut buf) {
            let parsed = Response::parse(&buf[..n]).unwrap();
            prop_assert_eq!(parsed, resp);
            let mut again = [0u8; 2048];
            let m = parsed.emit(&mut again).unwrap();
            prop_assert_eq!(&again[..m], &buf[..n]);
        } else {
            prop_assert!(resp.buffer_len() > 1100);
        }
    }

    #[test]
    fn natpmp_round_trips(
        op in 0u8..3,
        internal_port in any::<u16>(),
        external_port in any::<u16>(),
        lifetime in any::<u32>(),
        epoch in any::<u32>(),
        result in 0u16..10,
        v4 in any::<u32>(),
    ) {
        let protocol = if op == 1 { natpmp::Protocol::Udp } else { natpmp::Protocol::Tcp };
        let req = if op == 0 {
            natpmp::Request::ExternalAddress
        } else {
            natpmp::Request::Map(natpmp::MapRequest {
                protocol,
                internal_port,
                suggested_external_port: external_port,
                lifetime,
            })
        };
        let mut buf = [0u8; 16];
        let n = req.emit(&mut buf).unwrap();
        prop_assert_eq!(natpmp::Request::parse(&buf[..n]).unwrap(), req);

        let result = natpmp::ResultCode::from(result);
        let resp = match op {
            0 => natpmp::Response::ExternalAddress { result, epoch, external_addr: Ipv4Addr::from(v4) },
            _ => natpmp::Response::Map { protocol, result, epoch, internal_port, external_port, lifetime },
        };
        let n = resp.emit(&mut buf).unwrap();
        prop_assert_eq!(natpmp::Response::parse(&buf[..n]).unwrap(), resp);
        let err = natpmp::Response::Error { request_opcode: op, result: natpmp::ResultCode::UnsupportedOpcode, epoch };
        let n = err.emit(&mut buf).unwrap();
        prop_assert_eq!(natpmp::Response::parse(&buf[..n]).unwrap(), err);
    }

    /// Arbitrary bytes never panic any parser, and whatever parses re-emits to a message
    /// that parses to the same value and is no longer than the input.
    #[test]
    fn arbitrary_input_never_panics(data in proptest::collection::vec(any::<u8>(), 0..1200)) {
        check_any(&data)?;
    }

    /// Valid messages with random octets overwritten: the most interesting near-misses.
    #[test]
    fn mutated_messages_never_panic(
        (response, (body, owned)) in any::<bool>().prop_flat_map(|r| (Just(r), body_and_options(r))),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let list: Vec<PcpOption<'_>> = owned.iter().map(Owned::borrow).collect();
        let mut buf = [0u8; 2048];
        let n = if response {
            Response { result_code: ResultCode::Success, lifetime: 1, epoch: 1, body, options: Options::from_list(&list) }.emit(&mut buf)
        } else {
            Request { lifetime: 1, client_addr: IpAddr::V4(Ipv4Addr::LOCALHOST), body, options: Options::from_list(&list), pa_result_code: ResultCode::Success }.emit(&mut buf)
        };
        let Ok(n) = n else { return Ok(()) };
        for (i, v) in flips {
            buf[i.index(n)] = v;
        }
        check_any(&buf[..n])?;
    }
}

fn check_any(data: &[u8]) -> Result<(), TestCaseError> {
    let mut out = [0u8; 2048];
    if let Ok(r) = Request::parse(data) {
        let n = r.emit(&mut out).unwrap();
        prop_assert!(n <= data.len());
        prop_assert_eq!(Request::parse(&out[..n]).unwrap(), r);
    }
    if let Ok(r) = Response::parse(data) {
        let n = r.emit(&mut out).unwrap();
        prop_assert!(n <= data.len());
        prop_assert_eq!(Response::parse(&out[..n]).unwrap(), r);
    }
    if let Ok(r) = natpmp::Request::parse(data) {
        let n = r.emit(&mut out).unwrap();
        prop_assert_eq!(natpmp::Request::parse(&out[..n]).unwrap(), r);
    }
    if let Ok(r) = natpmp::Response::parse(data) {
        let n = r.emit(&mut out).unwrap();
        prop_assert_eq!(natpmp::Response::parse(&out[..n]).unwrap(), r);
    }
    if data.len() >= 2 {
        for parsed in [false, true] {
            let n = pcp_proto::emit_error_response(
                data,
                ResultCode::MalformedRequest,
                1800,
                1,
                parsed,
                &mut out,
            )
            .unwrap();
            prop_assert!(n <= 1100 && n.is_multiple_of(4) && n >= 24);
        }
    }
    Ok(())
}
