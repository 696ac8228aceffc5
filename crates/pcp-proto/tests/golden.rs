//! Byte-exact vectors written by hand from the RFC layouts (RFC 6887 §7, §11.1, §12.1,
//! §7.3; RFC 7767 §3.1; RFC 6886 §3), and every class of parse error.

use std::net::IpAddr;

use pcp_proto::{
    Body, Malformed, MapBody, OptionError, Options, ParseError, PcpOption, PeerBody, Request,
    Response, ResultCode, emit_error_response, natpmp, protocol,
};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Hex with optional whitespace and `|` separators, for readable vectors.
fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
    assert!(digits.len().is_multiple_of(2), "odd number of hex digits");
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

const NONCE: [u8; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];

/// MAP request, UDP 5060, lifetime 3600, client 192.0.2.10, no suggestion, option 192.
const MAP_192: &str = "
    02 01 0000 | 00000e10 | 00000000 00000000 0000ffff c000020a
    0102030405060708090a0b0c | 11 000000 | 13c4 0000 | 00000000 00000000 0000ffff 00000000
    c0 00 0000";

fn map_body(external_port: u16, external_addr: &str) -> MapBody {
    MapBody {
        nonce: NONCE,
        protocol: protocol::UDP,
        internal_port: 5060,
        external_port,
        external_addr: ip(external_addr),
    }
}

#[test]
fn map_request_with_checkpoint_required() {
    let bytes = hex(MAP_192);
    assert_eq!(bytes.len(), 64);
    let opts = [PcpOption::CheckpointRequired];
    let want = Request {
        lifetime: 3600,
        client_addr: ip("192.0.2.10"),
        body: Body::Map(map_body(0, "0.0.0.0")),
        options: Options::from_list(&opts),
        pa_result_code: ResultCode::Success,
    };
    assert_eq!(Request::parse(&bytes).unwrap(), want);
    let mut out = [0u8; 1100];
    let n = want.emit(&mut out).unwrap();
    assert_eq!(&out[..n], &bytes[..]);
    assert!(
        Request::parse(&bytes)
            .unwrap()
            .options
            .checkpoint_required()
    );
}

#[test]
fn peer_request_with_checkpoint_required_ipv6() {
    let bytes = hex("
        02 02 0000 | 00000078 | 20010db8 00000000 00000000 00000001
        0102030405060708090a0b0c | 06 000000 | 1f90 1f90 | 20010db8 0000ffff 00000000 00000005
        01bb 0000 | 20010db8 00000000 00000000 000000aa
        c0 00 0000");
    assert_eq!(bytes.len(), 24 + 56 + 4);
    let opts = [PcpOption::CheckpointRequired];
    let want = Request {
        lifetime: 120,
        client_addr: ip("2001:db8::1"),
        body: Body::Peer(PeerBody {
            mapping: MapBody {
                nonce: NONCE,
                protocol: protocol::TCP,
                internal_port: 8080,
                external_port: 8080,
                external_addr: ip("2001:db8:0:ffff::5"),
            },
            remote_port: 443,
            remote_addr: ip("2001:db8::aa"),
        }),
        options: Options::from_list(&opts),
        pa_result_code: ResultCode::Success,
    };
    assert_eq!(Request::parse(&bytes).unwrap(), want);
    let mut out = [0u8; 1100];
    let n = want.emit(&mut out).unwrap();
    assert_eq!(&out[..n], &bytes[..]);
}

#[test]
fn map_success_response_with_checkpoint_required() {
    let bytes = hex("
        02 81 00 00 | 00000e10 | 0000002a | 00000000 00000000 00000000
        0102030405060708090a0b0c | 11 000000 | 13c4 c350 | 00000000 00000000 0000ffff cb007101
        c0 00 0000");
    let opts = [PcpOption::CheckpointRequired];
    let want = Response {
        result_code: ResultCode::Success,
        lifetime: 3600,
        epoch: 42,
        body: Body::Map(map_body(50000, "203.0.113.1")),
        options: Options::from_list(&opts),
    };
    assert_eq!(Response::parse(&bytes).unwrap(), want);
    let mut out = [0u8; 1100];
    let n = want.emit(&mut out).unwrap();
    assert_eq!(&out[..n], &bytes[..]);
}

#[test]
fn announce_request_and_response() {
    let req = hex("02 00 0000 | 00000000 | 00000000 00000000 0000ffff c000020a");
    let r = Request::parse(&req).unwrap();
    assert_eq!(r.body, Body::Announce);
    assert!(r.options.is_empty());
    let resp = Response {
        result_code: ResultCode::Success,
        lifetime: 0,
        epoch: 7,
        body: Body::Announce,
        options: Options::EMPTY,
    };
    let mut out = [0u8; 64];
    let n = resp.emit(&mut out).unwrap();
    assert_eq!(
        &out[..n],
        &hex("02 80 0000 | 00000000 | 00000007 | 00000000 00000000 00000000")[..]
    );
}

#[test]
fn options_are_padded_and_unknown_optional_ones_kept() {
    // DESCRIPTION "abc" (3 octets, one pad), then unknown optional 200 with 5 octets.
    let mut bytes = hex(MAP_192);
    bytes.truncate(60);
    bytes.extend(hex("80 00 0003 61626300 | c8 00 0005 0102030405 000000"));
    let r = Request::parse(&bytes).unwrap();
    let got: Vec<_> = r.options.iter().collect();
    assert_eq!(
        got,
        [
            PcpOption::Description("abc"),
            PcpOption::Unknown {
                code: 200,
                data: &[1, 2, 3, 4, 5]
            }
        ]
    );
    let mut out = [0u8; 1100];
    let n = r.emit(&mut out).unwrap();
    assert_eq!(&out[..n], &bytes[..]);
}

#[test]
fn filter_third_party_prefer_failure_port_set() {
    let mut bytes = hex(MAP_192);
    bytes.truncate(60);
    bytes.extend(hex("
        01 00 0010 00000000 00000000 0000ffff c0000263
        02 00 0000
        03 00 0014 00 78 0000 00000000 00000000 0000ffff c6336400
        82 00 0005 0004 1388 01 000000"));
    let r = Request::parse(&bytes).unwrap();
    assert_eq!(r.options.third_party(), Some(ip("192.0.2.99")));
    assert!(r.options.prefer_failure());
    let filters: Vec<_> = r.options.filters().collect();
    assert_eq!(filters.len(), 1);
    assert_eq!(filters[0].prefix_len, 120);
    assert_eq!(filters[0].remote_addr, ip("198.51.100.0"));
    let ps = r.options.port_set().unwrap();
    assert_eq!(
        (ps.size, ps.first_internal_port, ps.parity),
        (4, 5000, true)
    );
    assert!(!r.options.checkpoint_required());
}

/// Replaces the option area of the MAP vector with `opts`.
fn map_with_options(opts: &str) -> Vec<u8> {
    let mut bytes = hex(MAP_192);
    bytes.truncate(60);
    bytes.extend(hex(opts));
    bytes
}

fn option_error(bytes: &[u8]) -> (u8, OptionError) {
    match Request::parse(bytes) {
        Err(ParseError::MalformedOption { code, reason }) => (code, reason),
        other => panic!("expected MALFORMED_OPTION, got {other:?}"),
    }
}

#[test]
fn silent_drops() {
    for bytes in [hex(""), hex("02")] {
        let e = Request::parse(&bytes).unwrap_err();
        assert_eq!(e, ParseError::TooShort { len: bytes.len() });
        assert!(e.is_silent_drop());
    }
    let mut resp = hex(MAP_192);
    resp[1] |= 0x80;
    let e = Request::parse(&resp).unwrap_err();
    assert_eq!(e, ParseError::WrongDirection { is_response: true });
    assert_eq!(e.result_code(), None);
}

#[test]
fn unsupported_version() {
    let mut bytes = hex(MAP_192);
    bytes[0] = 1;
    let e = Request::parse(&bytes).unwrap_err();
    assert_eq!(e, ParseError::UnsupportedVersion(1));
    assert_eq!(e.result_code(), Some(ResultCode::UnsuppVersion));
}

#[test]
fn malformed_request_lengths() {
    let full = hex(MAP_192);
    let cases: [(Vec<u8>, Malformed); 4] = [
        (
            full[..20].to_vec(),
            Malformed::ShorterThanHeader { len: 20 },
        ),
        (
            [&full[..], &[0u8; 2]].concat(),
            Malformed::NotMultipleOf4 { len: 66 },
        ),
        (
            [&full[..60], &vec![0u8; 1044][..]].concat(),
            Malformed::TooLong { len: 1104 },
        ),
        (
            full[..48].to_vec(),
            Malformed::BodyTruncated {
                opcode: 1,
                need: 36,
                have: 24,
            },
        ),
    ];
    for (bytes, want) in cases {
        let e = Request::parse(&bytes).unwrap_err();
        assert_eq!(e, ParseError::Malformed(want));
        assert_eq!(e.result_code(), Some(ResultCode::MalformedRequest));
    }
}

#[test]
fn unsupported_opcode() {
    let mut bytes = hex(MAP_192);
    bytes[1] = 0x05;
    let e = Request::parse(&bytes).unwrap_err();
    assert_eq!(e, ParseError::UnsupportedOpcode(5));
    assert_eq!(e.result_code(), Some(ResultCode::UnsuppOpcode));
}

#[test]
fn unsupported_mandatory_option_but_not_optional() {
    let e = Request::parse(&map_with_options("63 00 0000")).unwrap_err();
    assert_eq!(e, ParseError::UnsupportedOption { code: 99 });
    assert_eq!(e.result_code(), Some(ResultCode::UnsuppOption));
    assert!(Request::parse(&map_with_options("e3 00 0000")).is_ok());
}

#[test]
fn malformed_options() {
    use OptionError::*;
    let cases = [
        ("c0 00 0004 00000000", (192, BadLength { len: 4 })),
        ("c0 00 0000 c0 00 0000", (192, Repeated)),
        ("c0 00 0008 00000000", (192, Overrun { len: 8 })),
        ("02 00 0000 02 00 0000", (2, Repeated)),
        (
            "01 00 000c 00000000 00000000 00000000",
            (1, BadLength { len: 12 }),
        ),
        (
            "03 00 0014 00 21 0000 00000000 00000000 0000ffff c6336400",
            (3, InvalidField("prefix length")),
        ),
        (
            "03 00 0014 00 81 0000 20010db8 00000000 00000000 00000000",
            (3, InvalidField("prefix length")),
        ),
        ("80 00 0002 ff fe 0000", (128, InvalidField("not UTF-8"))),
        ("82 00 0004 00000000", (130, BadLength { len: 4 })),
        (
            "82 00 0005 0000 1388 00 000000",
            (130, InvalidField("port set size 0")),
        ),
        ("81 00 0004 00000000", (129, BadLength { len: 4 })),
        (
            "81 00 000e 000d 00000000 00000000 00000000 0000",
            (129, InvalidField("Prefix64-Length")),
        ),
    ];
    for (opts, want) in cases {
        let e = option_error(&map_with_options(opts));
        assert_eq!(e, want, "options {opts}");
    }
    // PREFER_FAILURE and FILTER are MAP-only; CHECKPOINT_REQUIRED is MAP/PEER only.
    let announce = hex("02 00 0000 | 00000000 | 00000000 00000000 0000ffff c000020a c0 00 0000");
    assert_eq!(option_error(&announce), (192, NotAllowedForOpcode));
    let mut peer = hex("02 02 0000 | 00000078 | 00000000 00000000 0000ffff c000020a
         0102030405060708090a0b0c 11000000 13c40000 00000000 00000000 0000ffff 00000000
         0050 0000 00000000 00000000 0000ffff c6336401");
    peer.extend(hex("02 00 0000"));
    assert_eq!(option_error(&peer), (2, NotAllowedForOpcode));
}

#[test]
fn error_response_copies_the_opcode_body() {
    let req = hex(MAP_192);
    let mut out = [0u8; 1100];
    let n = emit_error_response(&req, ResultCode::UserExQuota, 30, 99, true, &mut out).unwrap();
    let want = hex("
        02 81 00 0a | 0000001e | 00000063 | 00000000 00000000 00000000
        0102030405060708090a0b0c | 11 000000 | 13c4 0000 | 00000000 00000000 0000ffff 00000000
        c0 00 0000");
    assert_eq!(&out[..n], &want[..]);
    let r = Response::parse(&out[..n]).unwrap();
    assert_eq!(r.result_code, ResultCode::UserExQuota);
    assert_eq!(r.body, Body::Map(map_body(0, "0.0.0.0")));

    // A request shorter than a header still gets a whole header back, version 2.
    let n = emit_error_response(
        &hex("01 01 0000"),
        ResultCode::UnsuppVersion,
        1800,
        5,
        false,
        &mut out,
    )
    .unwrap();
    assert_eq!(
        &out[..n],
        &hex("02 81 0001 00000708 00000005 000000000000000000000000")[..]
    );

    // An unparsed request keeps the last 96 bits of its client address after the epoch,
    // is copied whole and zero-padded to a multiple of 4.
    let mut odd = hex(MAP_192);
    odd.push(0xee);
    let n =
        emit_error_response(&odd, ResultCode::MalformedRequest, 1800, 5, false, &mut out).unwrap();
    assert_eq!(n, 68);
    assert_eq!(&out[12..24], &odd[12..24]);
    assert_eq!(&out[24..65], &odd[24..65]);
    assert_eq!(&out[65..68], &[0, 0, 0]);

    // Longer than 1100: the first 1100 octets come back.
    let long = [&hex(MAP_192)[..], &vec![0u8; 2000][..]].concat();
    let n = emit_error_response(
        &long,
        ResultCode::MalformedRequest,
        1800,
        5,
        false,
        &mut out,
    )
    .unwrap();
    assert_eq!(n, 1100);
}

#[test]
fn natpmp_vectors() {
    assert_eq!(
        natpmp::Request::parse(&hex("0000")).unwrap(),
        natpmp::Request::ExternalAddress
    );
    let map = hex("00 02 0000 1f90 0000 00001c20");
    let want = natpmp::Request::Map(natpmp::MapRequest {
        protocol: natpmp::Protocol::Tcp,
        internal_port: 8080,
        suggested_external_port: 0,
        lifetime: 7200,
    });
    assert_eq!(natpmp::Request::parse(&map).unwrap(), want);
    let mut out = [0u8; 16];
    assert_eq!(want.emit(&mut out), Some(12));
    assert_eq!(&out[..12], &map[..]);

    let resp = natpmp::Response::Map {
        protocol: natpmp::Protocol::Tcp,
        result: natpmp::ResultCode::Success,
        epoch: 1000,
        internal_port: 8080,
        external_port: 40000,
        lifetime: 7200,
    };
    let n = resp.emit(&mut out).unwrap();
    assert_eq!(
        &out[..n],
        &hex("00 82 0000 000003e8 1f90 9c40 00001c20")[..]
    );
    assert_eq!(natpmp::Response::parse(&out[..n]).unwrap(), resp);

    let ext = natpmp::Response::ExternalAddress {
        result: natpmp::ResultCode::Success,
        epoch: 1,
        external_addr: "203.0.113.1".parse().unwrap(),
    };
    let n = ext.emit(&mut out).unwrap();
    assert_eq!(&out[..n], &hex("00 80 0000 00000001 cb007101")[..]);

    assert_eq!(
        natpmp::Request::parse(&hex("00 07 0000")).unwrap_err(),
        natpmp::ParseError::UnsupportedOpcode(7)
    );
    let err = natpmp::ParseError::UnsupportedOpcode(7)
        .response(3)
        .unwrap();
    let n = err.emit(&mut out).unwrap();
    assert_eq!(&out[..n], &hex("00 87 0005 00000003")[..]);
    assert_eq!(
        natpmp::Request::parse(&hex("00 01 0000")).unwrap_err(),
        natpmp::ParseError::TooShort { len: 4 }
    );
    assert_eq!(
        natpmp::Request::parse(&hex("00 81 0000")).unwrap_err(),
        natpmp::ParseError::WrongDirection
    );
}

/// RFC 6886 §3.5's "unsupported version" reply: version 0, opcode 0 as the RFC printed
/// it (older servers) or 128 as erratum 3618 corrected it, result 1, epoch. Both parse
/// as the same error; we emit the corrected form.
#[test]
fn natpmp_unsupported_version_reply_in_both_forms() {
    let want = natpmp::Response::Error {
        request_opcode: 0,
        result: natpmp::ResultCode::UnsupportedVersion,
        epoch: 0x0001_e240,
    };
    // Opcode 0 (RFC 6886 as published).
    assert_eq!(
        natpmp::Response::parse(&hex("00 00 0001 0001e240")).unwrap(),
        want
    );
    // Opcode 128 (erratum 3618).
    assert_eq!(
        natpmp::Response::parse(&hex("00 80 0001 0001e240")).unwrap(),
        want
    );
    let mut out = [0u8; 16];
    let n = want.emit(&mut out).unwrap();
    assert_eq!(&out[..n], &hex("00 80 0001 0001e240")[..]);
    // Only "unsupported version" is a reply with opcode 0: anything else is a request.
    assert_eq!(
        natpmp::Response::parse(&hex("00 00 0000 0001e240")).unwrap_err(),
        natpmp::ParseError::WrongDirection
    );
    assert_eq!(
        natpmp::Response::parse(&hex("00 00 0002 0001e240")).unwrap_err(),
        natpmp::ParseError::WrongDirection
    );
    assert_eq!(
        natpmp::Response::parse(&hex("00 00 0001 0001")).unwrap_err(),
        natpmp::ParseError::TooShort { len: 6 }
    );
    // A server parsing the 2-octet external-address request is unaffected.
    assert_eq!(
        natpmp::Request::parse(&hex("0000")).unwrap(),
        natpmp::Request::ExternalAddress
    );
}

#[test]
fn remove_option_strips_checkpoint_from_a_reply() {
    let opts = [
        PcpOption::Description("voip"),
        PcpOption::CheckpointRequired,
        PcpOption::PreferFailure,
    ];
    let resp = Response {
        result_code: ResultCode::Success,
        lifetime: 3600,
        epoch: 9,
        body: Body::Map(map_body(50000, "203.0.113.1")),
        options: Options::from_list(&opts),
    };
    let mut buf = [0u8; 1100];
    let n = resp.emit(&mut buf).unwrap();
    let m = pcp_proto::remove_option(&mut buf, n, pcp_proto::OptionCode::CheckpointRequired);
    assert_eq!(m, n - 4);
    let back = Response::parse(&buf[..m]).unwrap();
    let kept: Vec<_> = back.options.iter().collect();
    assert_eq!(
        kept,
        [PcpOption::Description("voip"), PcpOption::PreferFailure]
    );
    assert_eq!(back.body, resp.body);
    // An option area that does not frame is left alone, even before the bad option.
    let mut bad = hex(MAP_192);
    bad.extend(hex("01 00 0064"));
    let len = bad.len();
    assert_eq!(
        pcp_proto::remove_option(&mut bad, len, pcp_proto::OptionCode::CheckpointRequired),
        len
    );
    // Nothing to remove: unchanged.
    assert_eq!(
        pcp_proto::remove_option(&mut buf, m, pcp_proto::OptionCode::CheckpointRequired),
        m
    );
}
