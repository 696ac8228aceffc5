//! Conformance suite: one test per protocol rule (RFC 6887 PCP, RFC 6886 NAT-PMP,
//! RFC 7767 CHECKPOINT_REQUIRED), driven only through `Server::handle`, `Server::expire`
//! and the public accessors, on a simulated clock.

mod common;

use std::net::IpAddr;
use std::sync::Arc;

use common::*;
use pcp_dataplane::{Direction, Op};
use pcp_proto::{Filter, PcpOption, ResultCode, natpmp, protocol};
use pcp_server::config::{RuleAction, SubscriberEntry, TierConfig};
use pcp_server::subscriber::SubscriberId;
use pcp_server::{BackupStatus, Change, Effect, MappingKey, Origin, Reason};

// ---------------------------------------------------------------------------------------
// Helpers local to this file.

/// Keys of `Change::Upsert` effects.
fn upserts(effects: &[Effect]) -> Vec<MappingKey> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Replicate(Change::Upsert(m)) => Some(m.key),
            _ => None,
        })
        .collect()
}

/// Keys of `Change::Remove` effects.
fn replicate_removes(effects: &[Effect]) -> Vec<MappingKey> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Replicate(Change::Remove(k)) => Some(*k),
            _ => None,
        })
        .collect()
}

/// Data plane entries installed by `effects`.
fn installs(effects: &[Effect]) -> Vec<pcp_dataplane::Entry> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::DataPlane(Op::Install(entry)) => Some(entry.clone()),
            _ => None,
        })
        .collect()
}

/// Data plane entries removed by `effects`.
fn dp_removes(effects: &[Effect]) -> Vec<pcp_dataplane::Entry> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::DataPlane(Op::Remove(entry)) => Some(entry.clone()),
            _ => None,
        })
        .collect()
}

/// The checkpoint reason of the mapping `req` is about.
fn reason(h: &Harness, req: &Req) -> Reason {
    h.mapping(&req.key())
        .unwrap_or_else(|| panic!("no mapping for {:?}", req.key()))
        .checkpoint
}

/// Asserts an error response: R bit and opcode, result, lifetime.
fn assert_error(r: &Resp, opcode: u8, code: ResultCode, lifetime: u32) {
    assert_eq!(r.bytes[0], 2, "version");
    assert_eq!(r.bytes[1], 0x80 | opcode, "R bit and opcode");
    assert_eq!(r.result(), code);
    assert_eq!(r.lifetime(), lifetime, "error lifetime of {code}");
}

const LONG: u32 = 1800;
const SHORT: u32 = 30;
static BIG: [u8; 1044] = [0; 1044];

// ---------------------------------------------------------------------------------------
// RFC 6887 §8.3: framing, silent drops, version, length.

#[test]
fn silently_drops_datagram_shorter_than_two_octets() {
    let mut h = Harness::honour();
    assert_eq!(h.send_raw(&[], host(1)), None);
    assert_eq!(h.send_raw(&[2], host(1)), None);
    assert_eq!(h.send_raw(&[0], host(1)), None, "1-octet NAT-PMP");
    assert_eq!(h.server.mapping_count(), 0);
}

#[test]
fn silently_drops_message_with_r_bit_set() {
    let mut h = Harness::honour();
    let mut b = Req::map(host(1), 5000).bytes();
    b[1] |= 0x80;
    assert_eq!(h.send_raw(&b, host(1)), None);
    assert_eq!(h.send_raw(&announce_with_r(), host(1)), None);
    assert_eq!(h.server.mapping_count(), 0);
}

fn announce_with_r() -> Vec<u8> {
    let mut b = announce(host(1));
    b[1] = 0x80;
    b
}

#[test]
fn unsupp_version_is_answered_with_version_2() {
    let mut h = Harness::honour();
    for version in [1u8, 3, 255] {
        let mut b = Req::map(host(1), 5000).bytes();
        b[0] = version;
        let r = h.pcp_raw(&b, host(1));
        assert_error(&r, 1, ResultCode::UnsuppVersion, LONG);
        assert_eq!(r.bytes.len(), b.len());
        assert_eq!(r.bytes[24..], b[24..], "request copied after the header");
    }
    // Even a 2-octet message of an unknown version gets a (24-octet) answer.
    let r = h.pcp_raw(&[1, 1], host(1));
    assert_eq!((r.bytes.len(), r.bytes[0]), (24, 2));
    assert_eq!(r.result(), ResultCode::UnsuppVersion);
    assert_eq!(h.server.mapping_count(), 0);
}

#[test]
fn malformed_request_when_shorter_than_24_octets() {
    let mut h = Harness::honour();
    let full = Req::map(host(1), 5000).bytes();
    for len in [2usize, 4, 20] {
        let r = h.pcp_raw(&full[..len], host(1));
        assert_error(&r, 1, ResultCode::MalformedRequest, LONG);
        assert_eq!(r.bytes.len(), 24, "zero-padded to a header");
    }
    assert_eq!(h.server.mapping_count(), 0);
}

#[test]
fn malformed_request_when_longer_than_1100_octets() {
    let mut h = Harness::honour();
    // The codec refuses to emit more than 1100 octets: append an optional option by hand.
    let mut b = Req::map(host(1), 5000).bytes();
    b.extend_from_slice(&[200, 0]);
    b.extend_from_slice(&(BIG.len() as u16).to_be_bytes());
    b.extend_from_slice(&BIG);
    assert_eq!(b.len(), 1108);
    let r = h.pcp_raw(&b, host(1));
    assert_error(&r, 1, ResultCode::MalformedRequest, LONG);
    assert_eq!(r.bytes.len(), 1100, "copies at most 1100 octets");
    assert_eq!(r.bytes[24..], b[24..1100]);
    assert_eq!(h.server.mapping_count(), 0);
}

#[test]
fn malformed_request_when_not_a_multiple_of_4() {
    let mut h = Harness::honour();
    let mut b = Req::map(host(1), 5000).bytes();
    b.push(0xAA);
    assert_eq!(b.len(), 61);
    let r = h.pcp_raw(&b, host(1));
    assert_error(&r, 1, ResultCode::MalformedRequest, LONG);
    assert_eq!(r.bytes.len(), 64, "zero-padded to a multiple of 4");
    assert_eq!(r.bytes[24..61], b[24..]);
    assert_eq!(r.bytes[61..], [0, 0, 0]);
    assert_eq!(h.server.mapping_count(), 0);
}

#[test]
fn malformed_request_when_map_body_truncated() {
    let mut h = Harness::honour();
    let b = Req::map(host(1), 5000).bytes();
    let r = h.pcp_raw(&b[..44], host(1));
    assert_error(&r, 1, ResultCode::MalformedRequest, LONG);
    assert_eq!(r.bytes[24..], b[24..44]);
    let p = Req::peer(host(1), 5000, remote(1), 80).bytes();
    let r = h.pcp_raw(&p[..60], host(1));
    assert_error(&r, 2, ResultCode::MalformedRequest, LONG);
    assert_eq!(h.server.mapping_count(), 0);
}

// ---------------------------------------------------------------------------------------
// Opcodes and options.

#[test]
fn unsupp_opcode_for_unknown_opcode() {
    let mut h = Harness::honour();
    let mut b = raw_header(2, 5, 3600, host(1));
    b.extend_from_slice(&[0x5A; 36]);
    let r = h.pcp_raw(&b, host(1));
    assert_error(&r, 5, ResultCode::UnsuppOpcode, LONG);
    assert_eq!(r.bytes[24..], b[24..], "payload copied as is");
    // Header only.
    let r = h.pcp_raw(&raw_header(2, 0x7f, 0, host(1)), host(1));
    assert_error(&r, 0x7f, ResultCode::UnsuppOpcode, LONG);
}

#[test]
fn unsupp_opcode_for_authentication_which_is_not_supported() {
    let mut h = Harness::honour();
    let mut b = raw_header(2, 3, 0, host(1));
    b.extend_from_slice(&[0, 0, 0, 7, 0, 0, 0, 1]); // session id, sequence number
    let r = h.pcp_raw(&b, host(1));
    assert_error(&r, 3, ResultCode::UnsuppOpcode, LONG);
    assert_eq!(r.bytes[24..], b[24..]);
}

/// RFC 6887 §8.3 checks the opcode before processing options: an unsupported opcode is
/// answered UNSUPP_OPCODE whatever options it carries.
#[test]
fn unsupp_opcode_takes_precedence_over_option_processing() {
    let mut h = Harness::honour();
    let mut b = raw_header(2, 3, 0, host(1));
    b.extend_from_slice(&[0, 0, 0, 7, 0, 0, 0, 1]);
    b.extend_from_slice(&[4, 0, 0, 4, 0, 0, 0, 9]); // NONCE (RFC 7652), 4 octets
    let r = h.pcp_raw(&b, host(1));
    assert_error(&r, 3, ResultCode::UnsuppOpcode, LONG);
}

#[test]
fn unsupp_option_for_unknown_mandatory_option() {
    let mut h = Harness::honour();
    let req = Req::map(host(1), 5000).opt(PcpOption::Unknown {
        code: 99,
        data: &[1, 2, 3, 4],
    });
    let r = h.pcp(&req);
    assert_error(&r, 1, ResultCode::UnsuppOption, LONG);
    assert_eq!(h.server.mapping_count(), 0, "no state change on error");
}

#[test]
fn unsupp_option_for_rfc7652_authentication_options_in_map() {
    let mut h = Harness::honour();
    for code in 4u8..=12 {
        let req = Req::map(host(1), 5000).opt(PcpOption::Unknown {
            code,
            data: &[0, 0, 0, 1],
        });
        let r = h.pcp(&req);
        assert_error(&r, 1, ResultCode::UnsuppOption, LONG);
    }
    assert_eq!(h.server.mapping_count(), 0);
}

/// Without RFC 7652 the server does not understand options 4–12, so it cannot judge
/// their length, opcode or repetition: UNSUPP_OPTION whatever they hold (RFC 6887 §7.3:
/// MALFORMED_OPTION is for options "understood by the PCP server").
#[test]
fn rfc7652_options_are_unsupported_whatever_their_contents() {
    let mut h = Harness::honour();
    let odd: [(u8, &[u8]); 4] = [
        (4, &[0, 0, 1]),        // NONCE of 3 octets
        (10, &[0, 0, 0, 0, 0]), // SESSION_LIFETIME of 5, and response-only
        (6, &[]),               // PA_AUTHENTICATION_TAG without a key ID
        (12, &[0xff, 0xfe]),    // ID_INDICATOR that is not UTF-8
    ];
    for (code, data) in odd {
        let req = Req::map(host(1), 5000).opt(PcpOption::Unknown { code, data });
        let r = h.pcp(&req);
        assert_error(&r, 1, ResultCode::UnsuppOption, LONG);
    }
    // AUTHENTICATION with options a server with RFC 7652 would call malformed (two
    // NONCEs; an AUTHENTICATION_TAG, which is for MAP/PEER/ANNOUNCE): the opcode is
    // refused first.
    let mut b = raw_header(2, 3, 0, host(1));
    b.extend_from_slice(&[0, 0, 0, 7, 0, 0, 0, 1]);
    b.extend_from_slice(&[4, 0, 0, 4, 0, 0, 0, 9, 4, 0, 0, 4, 0, 0, 0, 9]);
    b.extend_from_slice(&[5, 0, 0, 12, 0, 0, 0, 7, 0, 0, 0, 1, 0, 0, 0, 0]);
    let r = h.pcp_raw(&b, host(1));
    assert_error(&r, 3, ResultCode::UnsuppOpcode, LONG);
    assert_eq!(h.server.mapping_count(), 0);
}

#[test]
fn unknown_optional_option_is_ignored_and_not_echoed() {
    let mut h = Harness::honour();
    let req = Req::map(host(1), 5000)
        .opt(PcpOption::Unknown {
            code: 200,
            data: &[1, 2, 3],
        })
        .opt(PcpOption::Description("web"));
    let r = h.ok(&req);
    let codes = r.option_codes();
    assert!(
        !codes.contains(&200),
        "unknown optional option echoed: {codes:?}"
    );
    assert_eq!(
        codes,
        vec![128],
        "only the processed DESCRIPTION comes back"
    );
    assert!(h.mapping(&req.key()).is_some());
}

#[test]
fn malformed_option_checkpoint_required_with_nonzero_length() {
    let mut h = Harness::honour();
    let req = Req::map(host(1), 5000).opt(PcpOption::Unknown {
        code: 192,
        data: &[0, 0, 0, 0],
    });
    let b = req.bytes();
    assert_eq!((b[60], b[62], b[63]), (192, 0, 4), "length 4 on the wire");
    let r = h.pcp(&req);
    assert_error(&r, 1, ResultCode::MalformedOption, LONG);
    assert_eq!(h.server.mapping_count(), 0);
}

#[test]
fn malformed_option_checkpoint_required_twice() {
    let mut h = Harness::honour();
    let r = h.pcp(&Req::map(host(1), 5000).cp().cp());
    assert_error(&r, 1, ResultCode::MalformedOption, LONG);
    let r = h.pcp(&Req::peer(host(1), 5000, remote(1), 80).cp().cp());
    assert_error(&r, 2, ResultCode::MalformedOption, LONG);
    assert_eq!(h.server.mapping_count(), 0);
}

#[test]
fn malformed_option_prefer_failure_in_peer() {
    let mut h = Harness::honour();
    let req = Req::peer(host(1), 5000, remote(1), 80).opt(PcpOption::PreferFailure);
    let r = h.pcp(&req);
    assert_error(&r, 2, ResultCode::MalformedOption, LONG);
    assert_eq!(h.server.mapping_count(), 0);
}

// ---------------------------------------------------------------------------------------
// ADDRESS_MISMATCH and error response format.

#[test]
fn address_mismatch_when_client_ip_differs_from_source() {
    let mut h = Harness::honour();
    let req = Req::map(host(1), 5000).client_field(host(2));
    let r = h.pcp(&req);
    assert_error(&r, 1, ResultCode::AddressMismatch, LONG);
    assert_eq!(h.server.mapping_count(), 0);
    // Also for ANNOUNCE.
    let r = h.pcp_raw(&announce(host(2)), host(1));
    assert_error(&r, 0, ResultCode::AddressMismatch, LONG);
}

#[test]
fn address_mismatch_takes_precedence_over_unsupp_opcode() {
    let mut h = Harness::honour();
    let mut b = raw_header(2, 5, 3600, host(2));
    b.extend_from_slice(&[0; 36]);
    let r = h.pcp_raw(&b, host(1));
    assert_error(&r, 5, ResultCode::AddressMismatch, LONG);
    // And over an unknown mandatory option.
    let req = Req::map(host(1), 5000)
        .client_field(host(2))
        .opt(PcpOption::Unknown {
            code: 99,
            data: &[],
        });
    let r = h.pcp(&req);
    assert_error(&r, 1, ResultCode::AddressMismatch, LONG);
}

#[test]
fn error_response_copies_whole_request() {
    let mut h = Harness::honour();
    h.ok(&Req::map(host(1), 5000));
    // A parsed request refused (nonce mismatch) with a body and several options.
    let req = Req::map(host(1), 5000)
        .nonce([9; 12])
        .suggest(EXTERNAL, 45_000)
        .opt(PcpOption::Description("copied"))
        .opt(PcpOption::Filter(Filter {
            prefix_len: 120,
            remote_port: 443,
            remote_addr: remote(0),
        }))
        .cp()
        .opt(PcpOption::Unknown {
            code: 201,
            data: &[7; 5],
        });
    let b = req.bytes();
    h.advance_secs(5);
    let r = h.pcp(&req);
    assert_error(&r, 1, ResultCode::NotAuthorized, LONG);
    assert_eq!(r.bytes.len(), b.len());
    assert_eq!(r.bytes[2], 0, "reserved octet");
    assert_eq!(r.epoch(), 5);
    assert_eq!(
        r.bytes[24..],
        b[24..],
        "opcode body and every option copied"
    );
    // A request refused while parsing (unknown mandatory option) likewise.
    let req = Req::peer(host(1), 6000, remote(3), 8080)
        .cp()
        .opt(PcpOption::Unknown {
            code: 77,
            data: &[1],
        });
    let b = req.bytes();
    let r = h.pcp(&req);
    assert_error(&r, 2, ResultCode::UnsuppOption, LONG);
    assert_eq!(r.bytes[24..], b[24..]);
}

#[test]
fn short_lifetime_errors_carry_30_seconds() {
    // NO_RESOURCES: a one-port pool.
    let mut cfg = honour_cfg();
    cfg.pool.port_min = 5000;
    cfg.pool.port_max = 5000;
    let mut h = Harness::new(cfg);
    h.ok(&Req::map(host(1), 5000));
    let r = h.pcp(&Req::map(host(2), 5000));
    assert_error(&r, 1, ResultCode::NoResources, SHORT);
    // USER_EX_QUOTA: a one-mapping quota.
    let mut cfg = honour_cfg();
    cfg.tiers
        .get_mut("default")
        .expect("default tier")
        .mapping_quota = 1;
    let mut h = Harness::new(cfg);
    h.ok(&Req::map(host(1), 5000));
    let r = h.pcp(&Req::map(host(1), 5001));
    assert_error(&r, 1, ResultCode::UserExQuota, SHORT);
}

#[test]
fn long_lifetime_errors_carry_1800_seconds() {
    let mut cfg = honour_cfg();
    cfg.mapping.max_filters = 0;
    let mut h = Harness::new(cfg);
    h.ok(&Req::map(host(1), 5000));
    let filter = PcpOption::Filter(Filter {
        prefix_len: 128,
        remote_port: 0,
        remote_addr: remote(1),
    });
    let mut bad_version = Req::map(host(1), 1).bytes();
    bad_version[0] = 3;
    let cases: Vec<(Vec<u8>, ResultCode)> = vec![
        (bad_version, ResultCode::UnsuppVersion),
        (
            Req::map(host(1), 5000).nonce([2; 12]).bytes(),
            ResultCode::NotAuthorized,
        ),
        (
            Req::map(host(1), 1).bytes()[..30].to_vec(),
            ResultCode::MalformedRequest,
        ),
        (raw_header(2, 9, 0, host(1)), ResultCode::UnsuppOpcode),
        (
            Req::map(host(1), 1)
                .opt(PcpOption::Unknown {
                    code: 50,
                    data: &[],
                })
                .bytes(),
            ResultCode::UnsuppOption,
        ),
        (
            Req::map(host(1), 1).cp().cp().bytes(),
            ResultCode::MalformedOption,
        ),
        (
            Req::map(host(1), 1).protocol(47).bytes(),
            ResultCode::UnsuppProtocol,
        ),
        (
            Req::map(host(1), 1).client_field(host(2)).bytes(),
            ResultCode::AddressMismatch,
        ),
        (
            Req::map(host(1), 1).opt(filter).bytes(),
            ResultCode::ExcessiveRemotePeers,
        ),
    ];
    for (bytes, code) in cases {
        let r = h.pcp_raw(&bytes, host(1));
        assert_eq!(r.result(), code);
        assert_eq!(r.lifetime(), LONG, "lifetime of {code}");
    }
}

#[test]
fn reserved_96_bits_are_zero_for_parsed_requests() {
    let mut h = Harness::honour();
    let req = Req::map(host(1), 5000);
    let b = req.bytes();
    assert_ne!(
        b[12..24],
        [0; 12],
        "the client address has non-zero low 96 bits"
    );
    let ok = h.ok(&req);
    assert_eq!(ok.bytes[12..24], [0; 12], "success");
    let refused = h.pcp(&req.clone().nonce([3; 12]));
    assert_eq!(refused.result(), ResultCode::NotAuthorized);
    assert_eq!(refused.bytes[12..24], [0; 12], "parsed, then refused");
    let ann = h.pcp_raw(&announce(host(1)), host(1));
    assert_eq!(ann.bytes[12..24], [0; 12], "ANNOUNCE");
}

#[test]
fn reserved_96_bits_copy_client_address_for_unparsed_requests() {
    let mut h = Harness::honour();
    let mut b = Req::map(host(1), 5000).bytes();
    b.push(0);
    let r = h.pcp_raw(&b, host(1));
    assert_eq!(r.result(), ResultCode::MalformedRequest);
    assert_eq!(r.bytes[12..24], b[12..24]);
}

// ---------------------------------------------------------------------------------------
// MAP (RFC 6887 §11).

#[test]
fn map_creates_mapping_with_external_endpoint_from_pool() {
    let mut h = Harness::honour();
    let req = Req::map(host(1), 5000).nonce([0xAB; 12]);
    let r = h.ok(&req);
    let m = r.mapping();
    assert_eq!(m.nonce, [0xAB; 12]);
    assert_eq!((m.protocol, m.internal_port), (protocol::UDP, 5000));
    assert_eq!(m.external_addr, EXTERNAL);
    assert!((1024..=65535).contains(&m.external_port));
    assert_eq!(r.lifetime(), 3600);
    assert_eq!(r.bytes[1], 0x81);
    let stored = h.mapping(&req.key()).expect("mapping stored");
    assert_eq!(
        (stored.external.addr, stored.external.port),
        (m.external_addr, m.external_port)
    );
    assert_eq!(stored.origin, Origin::Pcp);
    assert_eq!(stored.expires, h.now.plus_secs(3600));
    let inst = installs(&h.effects);
    assert_eq!(inst.len(), 1);
    assert_eq!(inst[0].direction, Direction::Inbound);
    assert_eq!(inst[0].internal, "10.0.0.1:5000".parse().unwrap());
    assert_eq!(inst[0].external.port(), m.external_port);
    h.check();
}

#[test]
fn map_renewal_with_same_nonce_keeps_external_port() {
    let mut h = Harness::honour();
    let req = Req::map(host(1), 5000);
    let first = h.ok(&req).external();
    h.advance_secs(100);
    // Even a different suggestion does not move an existing mapping.
    let again = h.ok(&req
        .clone()
        .suggest(EXTERNAL, first.1.wrapping_add(1).max(1024)));
    assert_eq!(again.external(), first);
    assert_eq!(h.server.mapping_count(), 1);
    let m = h.mapping(&req.key()).unwrap();
    assert_eq!(m.expires, h.now.plus_secs(3600), "lifetime restarted");
    h.check();
}

#[test]
fn map_renewal_with_different_nonce_is_not_authorized() {
    let mut h = Harness::honour();
    let req = Req::map(host(1), 5000);
    h.ok(&req);
    let before = h.mapping(&req.key()).unwrap();
    h.advance_secs(10);
    let r = h.pcp(&req.clone().nonce([2; 12]));
    assert_error(&r, 1, ResultCode::NotAuthorized, LONG);
    assert_eq!(h.mapping(&req.key()).unwrap(), before, "mapping untouched");
    assert!(h.effects.is_empty());
}

#[test]
fn map_delete_with_lifetime_zero_is_idempotent() {
    let mut h = Harness::honour();
    let req = Req::map(host(1), 5000);
    let ext = h.ok(&req).external();
    let r = h.ok(&req.clone().lifetime(0));
    assert_eq!(r.lifetime(), 0);
    assert!(h.mapping(&req.key()).is_none());
    let removed = dp_removes(&h.effects);
    assert_eq!(removed.len(), 1);
    assert_eq!(removed[0].external.port(), ext.1);
    // Deleting again still succeeds.
    let r = h.ok(&req.clone().lifetime(0));
    assert_eq!(r.lifetime(), 0);
    assert!(h.effects.is_empty());
    // And the port went back to the pool (the host can have it again).
    h.ok(&req
        .clone()
        .suggest(EXTERNAL, ext.1)
        .opt(PcpOption::PreferFailure));
    h.check();
}

#[test]
fn map_delete_with_wrong_nonce_is_not_authorized() {
    let mut h = Harness::honour();
    let req = Req::map(host(1), 5000);
    h.ok(&req);
    let r = h.pcp(&req.clone().lifetime(0).nonce([5; 12]));
    assert_error(&r, 1, ResultCode::NotAuthorized, LONG);
    assert!(h.mapping(&req.key()).is_some());
    assert!(h.effects.is_empty());
}

#[test]
fn lifetime_is_clamped_to_configured_min_and_max() {
    let mut h = Harness::honour();
    let short = Req::map(host(1), 5000).lifetime(1);
    assert_eq!(h.ok(&short).lifetime(), 120);
    assert_eq!(
        h.mapping(&short.key()).unwrap().expires,
        h.now.plus_secs(120)
    );
    let long = Req::map(host(1), 5001).lifetime(u32::MAX);
    assert_eq!(h.ok(&long).lifetime(), 86_400);
    assert_eq!(h.mapping(&long.key()).unwrap().lifetime, 86_400);
    let inside = Req::map(host(1), 5002).lifetime(600);
    assert_eq!(h.ok(&inside).lifetime(), 600);
}

#[test]
fn suggested_external_port_is_honoured_when_free() {
    let mut h = Harness::honour();
    let r = h.ok(&Req::map(host(1), 5000).suggest(IpAddr::from([0u8; 4]), 45_000));
    assert_eq!(r.external(), (EXTERNAL, 45_000));
    let r = h.ok(&Req::map(host(1), 5001).suggest(EXTERNAL, 45_001));
    assert_eq!(r.external(), (EXTERNAL, 45_001));
}

#[test]
fn prefer_failure_with_taken_suggestion_is_cannot_provide_external() {
    let mut h = Harness::honour();
    h.ok(&Req::map(host(1), 5000).suggest(EXTERNAL, 45_000));
    let req = Req::map(host(2), 5000)
        .suggest(EXTERNAL, 45_000)
        .opt(PcpOption::PreferFailure);
    let r = h.pcp(&req);
    assert_eq!(r.result(), ResultCode::CannotProvideExternal);
    assert_eq!(r.external(), (EXTERNAL, 45_000), "suggestion copied back");
    assert!(h.mapping(&req.key()).is_none(), "no alternative mapping");
    // Free suggestion with PREFER_FAILURE: granted exactly, option echoed.
    let r = h.ok(&req.clone().suggest(EXTERNAL, 45_002));
    assert_eq!(r.external(), (EXTERNAL, 45_002));
    assert_eq!(r.option_codes(), vec![2]);
}

#[test]
fn taken_suggestion_without_prefer_failure_gets_another_port() {
    let mut h = Harness::honour();
    h.ok(&Req::map(host(1), 5000).suggest(EXTERNAL, 45_000));
    let r = h.ok(&Req::map(host(2), 5000).suggest(EXTERNAL, 45_000));
    assert_eq!(r.external().0, EXTERNAL);
    assert_ne!(r.external().1, 45_000);
    h.check();
}

#[test]
fn third_party_from_unauthorised_source_is_not_authorized() {
    let mut h = Harness::honour();
    let req = Req::map(host(1), 5000).opt(PcpOption::ThirdParty(host(9)));
    let r = h.pcp(&req);
    assert_error(&r, 1, ResultCode::NotAuthorized, LONG);
    assert_eq!(h.server.mapping_count(), 0);
}

#[test]
fn third_party_from_authorised_source_maps_third_party_address() {
    let mut cfg = honour_cfg();
    cfg.mapping.third_party_prefixes = vec!["10.0.0.1/32".parse().unwrap()];
    let mut h = Harness::new(cfg);
    let req = Req::map(host(1), 5000).opt(PcpOption::ThirdParty(host(9)));
    let r = h.ok(&req);
    assert_eq!(r.option_codes(), vec![1], "THIRD_PARTY echoed");
    let key = MappingKey {
        internal: host(9),
        ..req.key()
    };
    let m = h.mapping(&key).expect("mapping for the third party");
    assert_eq!(m.client, host(1));
    assert!(h.mapping(&req.key()).is_none(), "nothing for the requester");
    assert_eq!(
        installs(&h.effects)[0].internal,
        "10.0.0.9:5000".parse().unwrap()
    );
    // Host 2 is not authorised.
    let r = h.pcp(&Req::map(host(2), 5000).opt(PcpOption::ThirdParty(host(9))));
    assert_eq!(r.result(), ResultCode::NotAuthorized);
}

#[test]
fn protocol_zero_with_nonzero_lifetime_is_unsupp_protocol() {
    let mut h = Harness::honour();
    let r = h.pcp(&Req::map(host(1), 0).protocol(0));
    assert_error(&r, 1, ResultCode::UnsuppProtocol, LONG);
    assert_eq!(h.server.mapping_count(), 0);
}

#[test]
fn internal_port_zero_is_not_authorized() {
    let mut h = Harness::honour();
    let r = h.pcp(&Req::map(host(1), 0).protocol(protocol::TCP));
    assert_error(&r, 1, ResultCode::NotAuthorized, LONG);
    assert_eq!(h.server.mapping_count(), 0);
}

#[test]
fn mapping_quota_exceeded_is_user_ex_quota() {
    let mut cfg = honour_cfg();
    cfg.tiers.get_mut("default").unwrap().mapping_quota = 2;
    let mut h = Harness::new(cfg);
    h.ok(&Req::map(host(1), 5000));
    h.ok(&Req::peer(host(1), 5001, remote(1), 80));
    let r = h.pcp(&Req::map(host(1), 5002));
    assert_error(&r, 1, ResultCode::UserExQuota, SHORT);
    let r = h.pcp(&Req::peer(host(1), 5000, remote(2), 80));
    assert_error(&r, 2, ResultCode::UserExQuota, SHORT);
    // Renewal at quota is fine, and another subscriber has its own quota.
    h.ok(&Req::map(host(1), 5000));
    h.ok(&Req::map(host(2), 5002));
    assert_eq!(h.server.mapping_count(), 3);
    h.check();
}

#[test]
fn pool_exhausted_is_no_resources() {
    let mut cfg = honour_cfg();
    cfg.pool.port_min = 6000;
    cfg.pool.port_max = 6001;
    let mut h = Harness::new(cfg);
    h.ok(&Req::map(host(1), 5000));
    h.ok(&Req::map(host(2), 5000));
    let r = h.pcp(&Req::map(host(3), 5000));
    assert_error(&r, 1, ResultCode::NoResources, SHORT);
    assert_eq!(h.server.mapping_count(), 2);
    // Ports are per protocol.
    h.ok(&Req::map(host(3), 5000).protocol(protocol::TCP));
    h.check();
}

#[test]
fn filter_is_stored_and_installed_in_data_plane() {
    let mut h = Harness::honour();
    let f = Filter {
        prefix_len: 120,
        remote_port: 443,
        remote_addr: remote(0),
    };
    let req = Req::map(host(1), 5000).opt(PcpOption::Filter(f));
    let r = h.ok(&req);
    assert_eq!(r.option_codes(), vec![3], "FILTER echoed");
    assert_eq!(&*h.mapping(&req.key()).unwrap().filters, &[f]);
    let inst = installs(&h.effects);
    assert_eq!(inst.len(), 1);
    assert_eq!(
        &*inst[0].filters,
        &[pcp_dataplane::Filter {
            remote_addr: remote(0),
            prefix_len: 24,
            remote_port: 443,
        }]
    );
}

#[test]
fn more_filters_than_max_is_excessive_remote_peers() {
    let mut cfg = honour_cfg();
    cfg.mapping.max_filters = 2;
    let mut h = Harness::new(cfg);
    let f = |n| {
        PcpOption::Filter(Filter {
            prefix_len: 128,
            remote_port: 0,
            remote_addr: remote(n),
        })
    };
    let two = Req::map(host(1), 5000).opt(f(1)).opt(f(2));
    h.ok(&two);
    let three = Req::map(host(1), 5001).opt(f(1)).opt(f(2)).opt(f(3));
    let r = h.pcp(&three);
    assert_error(&r, 1, ResultCode::ExcessiveRemotePeers, LONG);
    assert!(h.mapping(&three.key()).is_none());
}

#[test]
fn filter_set_in_renewal_replaces_previous_set_and_prefix_zero_removes_all() {
    let mut h = Harness::honour();
    let f = |n, prefix_len| Filter {
        prefix_len,
        remote_port: 0,
        remote_addr: remote(n),
    };
    let req = Req::map(host(1), 5000);
    h.ok(&req.clone().opt(PcpOption::Filter(f(1, 128))));
    // A refresh with another FILTER replaces the set.
    h.ok(&req.clone().opt(PcpOption::Filter(f(2, 120))));
    assert_eq!(&*h.mapping(&req.key()).unwrap().filters, &[f(2, 120)]);
    let inst = installs(&h.effects);
    assert_eq!(inst.len(), 1, "changed filters reinstalled");
    assert_eq!(inst[0].filters.len(), 1);
    assert_eq!(inst[0].filters[0].remote_addr, remote(2));
    // Prefix length 0 removes every filter.
    h.ok(&req.clone().opt(PcpOption::Filter(f(0, 0))));
    assert!(h.mapping(&req.key()).unwrap().filters.is_empty());
    assert!(installs(&h.effects)[0].filters.is_empty());
}

// ---------------------------------------------------------------------------------------
// PEER (RFC 6887 §12).

#[test]
fn peer_shares_external_endpoint_of_existing_map() {
    let mut h = Harness::honour();
    let ext = h.ok(&Req::map(host(1), 5000)).external();
    let peer = Req::peer(host(1), 5000, remote(7), 3478).nonce([4; 12]);
    let r = h.ok(&peer);
    assert_eq!(r.external(), ext);
    let p = r.parsed();
    match p.body {
        pcp_proto::Body::Peer(b) => {
            assert_eq!((b.remote_addr, b.remote_port), (remote(7), 3478));
        }
        other => panic!("PEER response expected, got {other:?}"),
    }
    let m = h.mapping(&peer.key()).expect("PEER mapping");
    assert_eq!((m.external.addr, m.external.port), ext);
    let inst = installs(&h.effects);
    assert_eq!(
        inst[0].direction,
        Direction::Outbound {
            remote: "198.51.100.7:3478".parse().unwrap()
        }
    );
    assert_eq!(h.server.mapping_count(), 2);
    h.check();
}

#[test]
fn peer_renewal_keeps_external_and_extends_lifetime() {
    let mut h = Harness::honour();
    let peer = Req::peer(host(1), 5000, remote(7), 3478).lifetime(600);
    let ext = h.ok(&peer).external();
    h.advance_secs(300);
    let r = h.ok(&peer);
    assert_eq!(r.external(), ext);
    assert_eq!(r.lifetime(), 600);
    assert_eq!(
        h.mapping(&peer.key()).unwrap().expires,
        h.now.plus_secs(600)
    );
    assert_eq!(h.server.mapping_count(), 1);
}

#[test]
fn peer_with_remote_port_zero_is_malformed_request() {
    let mut h = Harness::honour();
    let r = h.pcp(&Req::peer(host(1), 5000, remote(7), 0));
    assert_error(&r, 2, ResultCode::MalformedRequest, LONG);
    assert_eq!(h.server.mapping_count(), 0);
}

/// RFC 6887 §12.1: "it is not possible to reduce the lifetime of a mapping (or delete
/// it, with requested lifetime=0) using PEER".
#[test]
fn peer_with_lifetime_zero_does_not_delete() {
    let mut h = Harness::honour();
    let peer = Req::peer(host(1), 5000, remote(7), 3478);
    h.ok(&peer);
    let r = h.pcp(&peer.clone().lifetime(0));
    assert!(
        h.mapping(&peer.key()).is_some(),
        "PEER lifetime 0 deleted the mapping (answered {})",
        r.result()
    );
}

// ---------------------------------------------------------------------------------------
// ANNOUNCE and epoch (RFC 6887 §14.1, §8.5).

#[test]
fn announce_is_answered_success_with_lifetime_zero() {
    let mut h = Harness::honour();
    let mut req = announce(host(1));
    req[4..8].copy_from_slice(&3600u32.to_be_bytes());
    let r = h.pcp_raw(&req, host(1));
    assert_eq!(r.bytes.len(), 24);
    assert_eq!(r.bytes[1], 0x80);
    assert_eq!(r.result(), ResultCode::Success);
    assert_eq!(r.lifetime(), 0);
    assert_eq!(h.server.mapping_count(), 0);
}

#[test]
fn epoch_increases_by_one_per_second() {
    let mut h = Harness::honour();
    let epoch = |h: &mut Harness| h.pcp_raw(&announce(host(1)), host(1)).epoch();
    assert_eq!(epoch(&mut h), 0);
    h.advance_ms(999);
    assert_eq!(epoch(&mut h), 0);
    h.advance_ms(1);
    assert_eq!(epoch(&mut h), 1);
    h.advance_secs(1);
    assert_eq!(epoch(&mut h), 2);
    h.advance_secs(3600);
    assert_eq!(epoch(&mut h), 3602);
    // MAP responses (success and error) carry the same epoch.
    assert_eq!(h.ok(&Req::map(host(1), 5000)).epoch(), 3602);
    assert_eq!(h.pcp(&Req::map(host(1), 0)).epoch(), 3602);
    // And NAT-PMP.
    match h.natpmp(&[0, 0], host(1)) {
        natpmp::Response::ExternalAddress { epoch, .. } => assert_eq!(epoch, 3602),
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// NAT-PMP (RFC 6886).

#[test]
fn natpmp_external_address_request() {
    let mut h = Harness::honour();
    h.advance_secs(42);
    let r = h.natpmp(&[0, 0], host(1));
    assert_eq!(
        r,
        natpmp::Response::ExternalAddress {
            result: natpmp::ResultCode::Success,
            epoch: 42,
            external_addr: "192.0.2.1".parse().unwrap(),
        }
    );
}

#[test]
fn natpmp_map_renew_and_delete() {
    let mut h = Harness::honour();
    let map = natpmp_map(natpmp::Protocol::Udp, 5000, 0, 7200);
    let ext = match h.natpmp(&map, host(1)) {
        natpmp::Response::Map {
            protocol,
            result: natpmp::ResultCode::Success,
            internal_port: 5000,
            external_port,
            lifetime: 7200,
            ..
        } => {
            assert_eq!(protocol, natpmp::Protocol::Udp);
            external_port
        }
        other => panic!("{other:?}"),
    };
    let key = Req::map(host(1), 5000).key();
    let m = h.mapping(&key).expect("NAT-PMP mapping");
    assert_eq!((m.origin, m.external.port), (Origin::NatPmp, ext));
    h.advance_secs(60);
    match h.natpmp(&map, host(1)) {
        natpmp::Response::Map {
            result,
            external_port,
            ..
        } => assert_eq!((result, external_port), (natpmp::ResultCode::Success, ext)),
        other => panic!("{other:?}"),
    }
    assert_eq!(h.server.mapping_count(), 1);
    let del = natpmp_map(natpmp::Protocol::Udp, 5000, 0, 0);
    match h.natpmp(&del, host(1)) {
        natpmp::Response::Map {
            result,
            internal_port,
            external_port,
            lifetime,
            ..
        } => assert_eq!(
            (result, internal_port, external_port, lifetime),
            (natpmp::ResultCode::Success, 5000, 0, 0)
        ),
        other => panic!("{other:?}"),
    }
    assert!(h.mapping(&key).is_none());
    assert_eq!(dp_removes(&h.effects).len(), 1);
    // Deleting a mapping that does not exist succeeds too.
    match h.natpmp(&del, host(1)) {
        natpmp::Response::Map { result, .. } => assert_eq!(result, natpmp::ResultCode::Success),
        other => panic!("{other:?}"),
    }
    h.check();
}

#[test]
fn natpmp_delete_all_removes_every_mapping_of_the_protocol() {
    let mut h = Harness::honour();
    for (p, port) in [
        (natpmp::Protocol::Udp, 5000),
        (natpmp::Protocol::Udp, 5001),
        (natpmp::Protocol::Tcp, 5002),
    ] {
        h.natpmp(&natpmp_map(p, port, 0, 3600), host(1));
    }
    h.natpmp(&natpmp_map(natpmp::Protocol::Udp, 6000, 0, 3600), host(2));
    assert_eq!(h.server.mapping_count(), 4);
    match h.natpmp(&natpmp_map(natpmp::Protocol::Udp, 0, 0, 0), host(1)) {
        natpmp::Response::Map {
            result,
            internal_port,
            external_port,
            lifetime,
            ..
        } => assert_eq!(
            (result, internal_port, external_port, lifetime),
            (natpmp::ResultCode::Success, 0, 0, 0)
        ),
        other => panic!("{other:?}"),
    }
    let mut left: Vec<_> = h
        .server
        .mappings()
        .map(|m| (m.key.internal, m.key.protocol, m.key.internal_port))
        .collect();
    left.sort();
    assert_eq!(
        left,
        vec![
            (host(1), protocol::TCP, 5002),
            (host(2), protocol::UDP, 6000)
        ]
    );
    h.check();
}

#[test]
fn natpmp_and_pcp_share_mapping_quota() {
    let mut cfg = honour_cfg();
    cfg.tiers.get_mut("default").unwrap().mapping_quota = 2;
    let mut h = Harness::new(cfg);
    for port in [5000, 5001] {
        match h.natpmp(&natpmp_map(natpmp::Protocol::Tcp, port, 0, 3600), host(1)) {
            natpmp::Response::Map { result, .. } => assert_eq!(result, natpmp::ResultCode::Success),
            other => panic!("{other:?}"),
        }
    }
    let r = h.pcp(&Req::map(host(1), 6000));
    assert_error(&r, 1, ResultCode::UserExQuota, SHORT);
    // And the other way round: NAT-PMP is refused (out of resources) once PCP filled it.
    h.ok(&Req::map(host(2), 6000));
    h.ok(&Req::map(host(2), 6001));
    match h.natpmp(&natpmp_map(natpmp::Protocol::Udp, 7000, 0, 3600), host(2)) {
        natpmp::Response::Map { result, .. } => {
            assert_eq!(result, natpmp::ResultCode::OutOfResources)
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn natpmp_cannot_delete_pcp_mapping() {
    let mut h = Harness::honour();
    let req = Req::map(host(1), 5000);
    h.ok(&req);
    match h.natpmp(&natpmp_map(natpmp::Protocol::Udp, 5000, 0, 0), host(1)) {
        natpmp::Response::Map { result, .. } => {
            assert_eq!(result, natpmp::ResultCode::NotAuthorized)
        }
        other => panic!("{other:?}"),
    }
    assert!(h.mapping(&req.key()).is_some());
    // Nor delete it with delete-all.
    h.natpmp(&natpmp_map(natpmp::Protocol::Udp, 0, 0, 0), host(1));
    assert!(h.mapping(&req.key()).is_some());
}

#[test]
fn natpmp_unsupported_opcode_returns_request_with_result_5() {
    let mut h = Harness::honour();
    h.advance_secs(3);
    let reply = h.send_raw(&[0, 7, 0, 0], host(1)).expect("answered");
    // RFC 6886 §3.5 with erratum 3618: opcode + 128, result 5, epoch.
    assert_eq!(reply[..2], [0, 7 + 128]);
    assert_eq!(u16::from_be_bytes([reply[2], reply[3]]), 5);
    assert_eq!(u32::from_be_bytes(reply[4..8].try_into().unwrap()), 3);
}

#[test]
fn natpmp_response_opcode_is_silently_ignored() {
    let mut h = Harness::honour();
    assert_eq!(h.send_raw(&[0, 128], host(1)), None);
    let mut resp = natpmp_map(natpmp::Protocol::Udp, 5000, 0, 3600);
    resp[1] = 129;
    assert_eq!(h.send_raw(&resp, host(1)), None);
    assert_eq!(h.server.mapping_count(), 0);
}

// ---------------------------------------------------------------------------------------
// Expiry.

#[test]
fn mapping_expires_exactly_when_lifetime_ends() {
    let mut h = Harness::honour();
    let req = Req::map(host(1), 5000).lifetime(120).cp();
    h.ok(&req);
    let expires = h.now.plus_secs(120);
    assert_eq!(h.server.next_timeout(), Some(expires));
    h.now = pcp_server::Time(expires.0 - 1);
    h.expire();
    assert!(h.mapping(&req.key()).is_some(), "present 1 ms before");
    assert!(h.effects.is_empty());
    h.now = expires;
    h.expire();
    assert!(
        h.mapping(&req.key()).is_none(),
        "gone when the lifetime ends"
    );
    let removed = dp_removes(&h.effects);
    assert_eq!(removed.len(), 1);
    assert_eq!(removed[0].internal, "10.0.0.1:5000".parse().unwrap());
    assert_eq!(replicate_removes(&h.effects), vec![req.key()]);
    assert_eq!(h.server.next_timeout(), None);
    h.check();
}

#[test]
fn renewal_moves_expiry() {
    let mut h = Harness::honour();
    let req = Req::map(host(1), 5000).lifetime(120);
    h.ok(&req);
    h.advance_secs(100);
    h.ok(&req);
    h.advance_secs(30); // past the first expiry
    h.expire();
    assert!(h.mapping(&req.key()).is_some());
    h.advance_secs(90);
    h.expire();
    assert!(h.mapping(&req.key()).is_none());
}

// ---------------------------------------------------------------------------------------
// CHECKPOINT_REQUIRED (RFC 7767 §3.2).

#[test]
fn checkpoint_echoed_when_requested_and_honoured() {
    let mut h = Harness::honour();
    let req = Req::map(host(1), 5000).cp();
    let r = h.ok(&req);
    assert!(r.has_checkpoint());
    assert_eq!(reason(&h, &req), Reason::Requested);
    assert_eq!(upserts(&h.effects), vec![req.key()]);
    assert_eq!(h.server.checkpointed_count(), 1);
    // PEER too.
    let peer = Req::peer(host(1), 5001, remote(1), 443).cp();
    assert!(h.ok(&peer).has_checkpoint());
    assert_eq!(reason(&h, &peer), Reason::Requested);
    h.check();
}

#[test]
fn checkpoint_not_echoed_when_not_requested() {
    let mut h = Harness::honour();
    let req = Req::map(host(1), 5000);
    let r = h.ok(&req);
    assert!(!r.has_checkpoint());
    assert_eq!(reason(&h, &req), Reason::NotRequested);
    assert!(upserts(&h.effects).is_empty());
}

#[test]
fn force_rule_checkpoints_but_never_echoes_unrequested_option() {
    let mut cfg = honour_cfg();
    cfg.policy = vec![port_rule("sip", RuleAction::Force, 5060)];
    let mut h = Harness::new(cfg);
    let req = Req::map(host(1), 5060);
    let r = h.ok(&req);
    assert!(!r.has_checkpoint(), "192 echoed without being requested");
    assert_eq!(reason(&h, &req), Reason::Forced(Arc::from("sip")));
    assert_eq!(upserts(&h.effects), vec![req.key()]);
    // Requested and forced: echoed.
    let req2 = Req::map(host(1), 5060).protocol(protocol::TCP).cp();
    assert!(h.ok(&req2).has_checkpoint());
    assert_eq!(reason(&h, &req2), Reason::Forced(Arc::from("sip")));
}

#[test]
fn deny_rule_answers_success_without_checkpoint() {
    let mut cfg = honour_cfg();
    cfg.policy = vec![rule("never", RuleAction::Deny)];
    let mut h = Harness::new(cfg);
    let req = Req::map(host(1), 5000).cp();
    let r = h.ok(&req);
    assert!(!r.has_checkpoint());
    assert_eq!(reason(&h, &req), Reason::Denied(Arc::from("never")));
    assert!(upserts(&h.effects).is_empty());
    assert_eq!(h.server.checkpointed_count(), 0);
}

#[test]
fn checkpoint_quota_exceeded_answers_success_without_checkpoint() {
    let mut cfg = honour_cfg();
    cfg.tiers.get_mut("default").unwrap().checkpoint_quota = 2;
    let mut h = Harness::new(cfg);
    for port in [5000, 5001] {
        assert!(h.ok(&Req::map(host(1), port).cp()).has_checkpoint());
    }
    let third = Req::map(host(1), 5002).cp();
    let r = h.ok(&third);
    assert!(!r.has_checkpoint());
    assert_eq!(reason(&h, &third), Reason::Quota);
    assert!(upserts(&h.effects).is_empty());
    assert_eq!(h.server.mapping_count(), 3, "mapping still created");
    // The quota is per subscriber.
    assert!(h.ok(&Req::map(host(2), 5000).cp()).has_checkpoint());
    h.check();
}

#[test]
fn checkpoint_rate_limited_by_token_bucket() {
    let mut cfg = honour_cfg();
    {
        let t = cfg.tiers.get_mut("default").unwrap();
        t.checkpoint_burst = 3;
        t.checkpoint_rate = 0.5; // one token per 2 s
    }
    let mut h = Harness::new(cfg);
    for port in 5000..5003 {
        assert!(
            h.ok(&Req::map(host(1), port).cp()).has_checkpoint(),
            "burst"
        );
    }
    let over = Req::map(host(1), 5003).cp();
    assert!(!h.ok(&over).has_checkpoint());
    assert_eq!(reason(&h, &over), Reason::Rate);
    h.advance_ms(1999);
    let early = Req::map(host(1), 5004).cp();
    assert!(!h.ok(&early).has_checkpoint());
    assert_eq!(reason(&h, &early), Reason::Rate);
    h.advance_ms(1);
    let refilled = Req::map(host(1), 5005).cp();
    assert!(h.ok(&refilled).has_checkpoint(), "one token after 2 s");
    assert!(!h.ok(&Req::map(host(1), 5006).cp()).has_checkpoint());
    // A long idle period refills to the burst, not beyond.
    h.advance_secs(3600);
    let mut granted = 0;
    for port in 6000..6010 {
        if h.ok(&Req::map(host(1), port).cp()).has_checkpoint() {
            granted += 1;
        }
    }
    assert_eq!(granted, 3);
    // Other subscribers have their own bucket.
    assert!(h.ok(&Req::map(host(2), 5000).cp()).has_checkpoint());
}

#[test]
fn checkpoint_global_capacity_is_enforced() {
    let mut cfg = honour_cfg();
    cfg.checkpoint.capacity = 2;
    cfg.policy = vec![port_rule("sip", RuleAction::Force, 5060)];
    let mut h = Harness::new(cfg);
    assert!(h.ok(&Req::map(host(1), 5000).cp()).has_checkpoint());
    assert!(h.ok(&Req::map(host(2), 5000).cp()).has_checkpoint());
    let full = Req::map(host(3), 5000).cp();
    assert!(!h.ok(&full).has_checkpoint());
    assert_eq!(reason(&h, &full), Reason::Capacity);
    // A force rule does not override the capacity either.
    let forced = Req::map(host(3), 5060);
    h.ok(&forced);
    assert_eq!(reason(&h, &forced), Reason::Capacity);
    assert_eq!(h.server.checkpointed_count(), 2);
}

#[test]
fn default_config_refuses_checkpoints_without_backup() {
    let cfg = pcp_server::ServerConfig {
        policy: vec![port_rule("sip", RuleAction::Force, 5060)],
        ..Default::default()
    };
    let mut h = Harness::new(cfg);
    let req = Req::map(host(1), 5000).cp();
    assert!(!h.ok(&req).has_checkpoint());
    assert_eq!(reason(&h, &req), Reason::NoBackup);
    let forced = Req::map(host(1), 5060).cp();
    assert!(!h.ok(&forced).has_checkpoint());
    assert_eq!(reason(&h, &forced), Reason::NoBackup);
    assert!(upserts(&h.effects).is_empty());
    assert_eq!(h.server.checkpointed_count(), 0);
    // Once a backup is ready, checkpoints are honoured under the default config.
    h.server.set_backup_status(BackupStatus::Ready);
    assert!(h.ok(&req).has_checkpoint());
    assert_eq!(reason(&h, &req), Reason::Requested);
}

#[test]
fn backup_not_ready_refuses_checkpoints() {
    let mut h = Harness::honour();
    h.server.set_backup_status(BackupStatus::NotReady);
    let req = Req::map(host(1), 5000).cp();
    assert!(!h.ok(&req).has_checkpoint());
    assert_eq!(reason(&h, &req), Reason::BackupNotReady);
    h.server.set_backup_status(BackupStatus::Ready);
    assert!(h.ok(&req).has_checkpoint());
}

/// RFC 7767 §3.2: "it is RECOMMENDED to check point state on backup before a response
/// is sent": a reply echoing 192 is held while a backup is ready, and only then.
#[test]
fn reply_echoing_checkpoint_is_held_for_a_ready_backup() {
    let mut h = Harness::new(pcp_server::ServerConfig::default());
    h.server.set_backup_status(BackupStatus::Ready);
    let req = Req::map(host(1), 5000).cp();
    assert!(h.ok(&req).has_checkpoint());
    assert!(h.held, "a promise is held until the backup acknowledges");
    assert_eq!(upserts(&h.effects), vec![req.key()]);
    h.ok(&Req::map(host(2), 5001));
    assert!(!h.held, "nothing promised, nothing held");
    // A protected host's first unprotected mapping is held too: the backup must know
    // the host is exposed before a takeover could hide the loss of that mapping.
    h.ok(&Req::map(host(1), 5001));
    assert!(h.held, "an exposing reply waits for the backup");
    // No backup configured but honoured: nobody to wait for.
    let mut h = Harness::honour();
    assert!(h.ok(&req).has_checkpoint());
    assert!(!h.held);
}

/// `Change::Host` records in `effects`.
fn host_records(effects: &[Effect]) -> Vec<(IpAddr, bool)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Replicate(Change::Host { host, unprotected }) => Some((*host, *unprotected)),
            _ => None,
        })
        .collect()
}

/// A host that holds only unprotected mappings loses them all in a takeover: the
/// backup is told when it gets its first one and when it holds none any more (so that
/// a successor announces to it), once per transition and not per mapping, and never
/// waited for (a successor that missed it holds nothing of the host and resets its
/// epoch anyway). A later checkpointed mapping changes nothing: the record went first.
#[test]
fn a_host_with_only_unprotected_mappings_is_replicated_but_not_waited_for() {
    let mut h = Harness::new(pcp_server::ServerConfig::default());
    h.server.set_backup_status(BackupStatus::Ready);
    let (a, b) = (Req::map(host(1), 5000), Req::map(host(1), 5001));
    h.ok(&a);
    assert_eq!(host_records(&h.effects), vec![(host(1), true)]);
    assert!(!h.held, "no wait for a host without checkpointed mappings");
    assert!(h.server.host_unprotected(host(1)));
    assert!(!h.server.host_exposed(host(1)));
    h.ok(&b);
    assert_eq!(
        host_records(&h.effects),
        vec![],
        "one record per host, not per mapping"
    );
    assert!(!h.held);
    // A checkpointed mapping beside them: held for its promise, no new host record.
    h.ok(&Req::map(host(1), 5002).cp());
    assert!(h.held);
    assert_eq!(host_records(&h.effects), vec![]);
    assert!(h.server.host_exposed(host(1)));
    h.ok(&a.clone().lifetime(0));
    assert_eq!(host_records(&h.effects), vec![]);
    h.ok(&b.clone().lifetime(0));
    assert_eq!(
        host_records(&h.effects),
        vec![(host(1), false)],
        "no unprotected mapping left"
    );
    assert!(!h.held);
    assert!(!h.server.host_unprotected(host(1)));
    assert_eq!(h.server.unprotected_hosts().count(), 0);
    // Its last unprotected mapping expiring says so as well.
    h.ok(&Req::map(host(2), 6000).lifetime(120));
    assert_eq!(
        h.server.unprotected_hosts().collect::<Vec<_>>(),
        vec![host(2)]
    );
    h.advance_secs(121);
    h.expire();
    assert_eq!(host_records(&h.effects), vec![(host(2), false)]);
    h.check();
}

#[test]
fn withdrawn_checkpoint_is_cleared_with_reason_backup_timeout() {
    let mut cfg = pcp_server::ServerConfig::default();
    cfg.tiers.get_mut("default").unwrap().checkpoint_quota = 1;
    let mut h = Harness::new(cfg);
    h.server.set_backup_status(BackupStatus::Ready);
    let req = Req::map(host(1), 5000).cp();
    h.ok(&req);
    assert!(h.held);
    let mut effects = Vec::new();
    assert!(h.server.withdraw_checkpoint(&req.key(), &mut effects));
    assert_eq!(reason(&h, &req), Reason::BackupTimeout);
    assert_eq!(replicate_removes(&effects), vec![req.key()]);
    assert_eq!(h.server.checkpointed_count(), 0);
    assert!(
        !h.server.withdraw_checkpoint(&req.key(), &mut effects),
        "only once"
    );
    // The quota slot came back.
    assert!(h.ok(&Req::map(host(1), 5001).cp()).has_checkpoint());
    h.check();
}

#[test]
fn renewal_with_checkpoint_keeps_flag_without_consuming_quota_or_rate() {
    let mut cfg = honour_cfg();
    {
        let t = cfg.tiers.get_mut("default").unwrap();
        t.checkpoint_quota = 1;
        t.checkpoint_burst = 1;
        t.checkpoint_rate = 0.0;
    }
    let mut h = Harness::new(cfg);
    let req = Req::map(host(1), 5000).cp();
    assert!(h.ok(&req).has_checkpoint());
    for _ in 0..5 {
        h.advance_secs(10);
        let r = h.ok(&req);
        assert!(r.has_checkpoint(), "renewal lost the checkpoint");
        assert_eq!(reason(&h, &req), Reason::Requested);
        assert_eq!(upserts(&h.effects), vec![req.key()], "renewal replicated");
    }
    assert_eq!(h.server.checkpointed_count(), 1);
    h.check();
}

#[test]
fn renewal_without_checkpoint_clears_flag_and_frees_quota() {
    let mut cfg = honour_cfg();
    cfg.tiers.get_mut("default").unwrap().checkpoint_quota = 1;
    let mut h = Harness::new(cfg);
    let a = Req::map(host(1), 5000).cp();
    let b = Req::map(host(1), 5001).cp();
    assert!(h.ok(&a).has_checkpoint());
    assert!(!h.ok(&b).has_checkpoint());
    assert_eq!(reason(&h, &b), Reason::Quota);
    // Renew `a` without 192: cleared, replicated as a removal.
    let plain_a = Req::map(host(1), 5000);
    assert!(!h.ok(&plain_a).has_checkpoint());
    assert_eq!(reason(&h, &a), Reason::NotRequested);
    assert_eq!(replicate_removes(&h.effects), vec![a.key()]);
    assert!(upserts(&h.effects).is_empty());
    assert_eq!(h.server.checkpointed_count(), 0);
    // The slot is free again.
    assert!(h.ok(&b).has_checkpoint());
    assert_eq!(reason(&h, &b), Reason::Requested);
    h.check();
}

#[test]
fn force_rule_still_applies_on_renewal_without_checkpoint() {
    let mut cfg = honour_cfg();
    cfg.policy = vec![port_rule("sip", RuleAction::Force, 5060)];
    let mut h = Harness::new(cfg);
    let req = Req::map(host(1), 5060).cp();
    assert!(h.ok(&req).has_checkpoint());
    let plain = Req::map(host(1), 5060);
    let r = h.ok(&plain);
    assert!(!r.has_checkpoint());
    assert_eq!(reason(&h, &req), Reason::Forced(Arc::from("sip")));
    assert!(replicate_removes(&h.effects).is_empty());
    assert_eq!(upserts(&h.effects), vec![req.key()]);
    assert_eq!(h.server.checkpointed_count(), 1);
}

#[test]
fn replicate_effects_follow_checkpoint_lifecycle() {
    let mut h = Harness::honour();
    let req = Req::map(host(1), 5000).lifetime(300).cp();
    // Created checkpointed → Upsert carrying the current state.
    h.ok(&req);
    let up: Vec<_> = h
        .effects
        .iter()
        .filter_map(|e| match e {
            Effect::Replicate(Change::Upsert(m)) => Some(m.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(up.len(), 1);
    assert_eq!(*up[0], h.mapping(&req.key()).unwrap());
    // Renewed → Upsert.
    h.advance_secs(10);
    h.ok(&req);
    assert_eq!(upserts(&h.effects), vec![req.key()]);
    // Deleted → Remove.
    h.ok(&req.clone().lifetime(0));
    assert_eq!(replicate_removes(&h.effects), vec![req.key()]);
    // Not checkpointed mappings replicate nothing, even when deleted.
    let plain = Req::map(host(1), 5001);
    h.ok(&plain);
    h.ok(&plain.clone().lifetime(0));
    assert!(replicate_removes(&h.effects).is_empty());
    // Expired → Remove (see also mapping_expires_exactly_when_lifetime_ends).
    h.ok(&req);
    h.advance_secs(300);
    h.expire();
    assert_eq!(replicate_removes(&h.effects), vec![req.key()]);
    assert_eq!(h.server.checkpointed_count(), 0);
}

#[test]
fn subscriber_entries_give_their_tier_quotas() {
    let mut cfg = honour_cfg();
    cfg.tiers.get_mut("default").unwrap().checkpoint_quota = 1;
    cfg.tiers.insert(
        "gold".into(),
        TierConfig {
            checkpoint_quota: 3,
            ..TierConfig::default()
        },
    );
    cfg.subscribers.entries = vec![SubscriberEntry {
        prefixes: vec!["10.0.1.0/24".parse().unwrap()],
        identities: vec![],
        id: "acme".into(),
        tier: "gold".into(),
    }];
    let mut h = Harness::new(cfg);
    let gold_a: IpAddr = "10.0.1.5".parse().unwrap();
    let gold_b: IpAddr = "10.0.1.6".parse().unwrap();
    // Both hosts are one subscriber: 3 checkpoints between them.
    let mut granted = 0;
    for (i, h_ip) in [gold_a, gold_b, gold_a, gold_b].into_iter().enumerate() {
        let req = Req::map(h_ip, 5000 + i as u16).cp();
        if h.ok(&req).has_checkpoint() {
            granted += 1;
        } else {
            assert_eq!(reason(&h, &req), Reason::Quota);
        }
        assert_eq!(
            h.mapping(&req.key()).unwrap().subscriber,
            SubscriberId::Named(Arc::from("acme"))
        );
    }
    assert_eq!(granted, 3);
    // A default-tier host gets one.
    assert!(h.ok(&Req::map(host(1), 5000).cp()).has_checkpoint());
    let second = Req::map(host(1), 5001).cp();
    assert!(!h.ok(&second).has_checkpoint());
    assert_eq!(reason(&h, &second), Reason::Quota);
    let gold = h
        .server
        .subscribers()
        .find(|(id, _, _)| **id == SubscriberId::Named(Arc::from("acme")))
        .expect("acme has state");
    assert_eq!(
        (&*gold.1.tier, gold.1.checkpointed, gold.2.checkpoint_quota),
        ("gold", 3, 3)
    );
    h.check();
}

#[test]
fn reload_with_deny_rule_applies_at_next_renewal_and_keeps_mappings() {
    let mut h = Harness::honour();
    let a = Req::map(host(1), 5000).cp();
    let b = Req::map(host(2), 5000).cp();
    let ext_a = h.ok(&a).external();
    h.ok(&b);
    let mut cfg = honour_cfg();
    cfg.policy = vec![rule("no-more", RuleAction::Deny)];
    h.server.reload(cfg).expect("reload");
    assert_eq!(h.server.mapping_count(), 2, "reload keeps mappings");
    assert_eq!(reason(&h, &a), Reason::Requested, "applies only at renewal");
    let r = h.ok(&a);
    assert!(!r.has_checkpoint());
    assert_eq!(r.external(), ext_a, "same mapping, same endpoint");
    assert_eq!(reason(&h, &a), Reason::Denied(Arc::from("no-more")));
    assert_eq!(replicate_removes(&h.effects), vec![a.key()]);
    assert_eq!(reason(&h, &b), Reason::Requested, "not renewed yet");
    assert_eq!(h.server.checkpointed_count(), 1);
    h.check();
}

/// RFC 7767 §3.2: "Administration SHOULD restrict ... the rate of check pointing per
/// network attachment point". Dropping every mapping must not refill the bucket.
#[test]
fn checkpoint_rate_survives_subscriber_dropping_all_mappings() {
    let mut cfg = honour_cfg();
    {
        let t = cfg.tiers.get_mut("default").unwrap();
        t.checkpoint_burst = 2;
        t.checkpoint_rate = 0.01; // one token per 100 s
    }
    let mut h = Harness::new(cfg);
    for port in [5000, 5001] {
        let req = Req::map(host(1), port).cp();
        assert!(h.ok(&req).has_checkpoint());
        h.ok(&req.lifetime(0));
    }
    assert_eq!(h.server.mapping_count(), 0);
    // Burst used up within the same second: no further checkpoint is due.
    let third = Req::map(host(1), 5002).cp();
    let r = h.ok(&third);
    assert!(
        !r.has_checkpoint(),
        "a third checkpoint within the same instant was granted (burst 2)"
    );
    assert_eq!(reason(&h, &third), Reason::Rate);
}

// ---------------------------------------------------------------------------------------
// A data plane that refuses a request's batch: never a false SUCCESS (issue 6).

#[test]
fn refused_new_map_is_network_failure_and_leaves_nothing() {
    let mut h = Harness::honour();
    let req = Req::map(host(1), 5000).suggest(EXTERNAL, 40_000).cp();
    let ok = h.ok(&req);
    assert_eq!(ok.external(), (EXTERNAL, 40_000));
    assert_eq!(installs(&h.effects).len(), 1);
    assert_eq!(upserts(&h.effects), vec![req.key()]);
    let bytes = h
        .refuse(&req.bytes(), req.src, ResultCode::NetworkFailure)
        .expect("an error reply");
    let r = Resp { bytes };
    assert_error(&r, 1, ResultCode::NetworkFailure, SHORT);
    assert!(h.mapping(&req.key()).is_none(), "the refused mapping stays");
    assert_eq!(h.server.mapping_count(), 0);
    assert_eq!(h.server.checkpointed_count(), 0, "capacity given back");
    assert!(installs(&h.effects).is_empty() && dp_removes(&h.effects).is_empty());
    assert_eq!(
        replicate_removes(&h.effects),
        vec![req.key()],
        "cancels the upsert"
    );
    h.check();
    // The port is free again: another host gets it when it asks.
    let other = Req::map(host(2), 6000).suggest(EXTERNAL, 40_000);
    assert_eq!(h.ok(&other).external(), (EXTERNAL, 40_000));
    let counted = h
        .server
        .stats()
        .answered_counts()
        .find(|(k, c, _)| k.label() == "map" && *c == ResultCode::NetworkFailure)
        .map(|(_, _, n)| n);
    assert_eq!(counted, Some(1));
    h.check();
}

#[test]
fn refused_filter_change_restores_the_mapping_as_it_was() {
    let mut h = Harness::honour();
    let f1 = PcpOption::Filter(Filter {
        prefix_len: 128,
        remote_port: 0,
        remote_addr: remote(1),
    });
    let f2 = PcpOption::Filter(Filter {
        prefix_len: 128,
        remote_port: 443,
        remote_addr: remote(2),
    });
    let first = Req::map(host(1), 5000).opt(f1).cp();
    let ext = h.ok(&first).external();
    let before = h.mapping(&first.key()).unwrap();
    h.advance_secs(10);
    let change = Req::map(host(1), 5000).opt(f2).cp().lifetime(7200);
    h.ok(&change);
    assert_eq!(
        installs(&h.effects).len(),
        1,
        "new filters reach the data plane"
    );
    let r = Resp {
        bytes: h
            .refuse(&change.bytes(), change.src, ResultCode::NoResources)
            .unwrap(),
    };
    assert_error(&r, 1, ResultCode::NoResources, SHORT);
    let after = h.mapping(&first.key()).expect("the mapping is still there");
    assert_eq!(after.filters, before.filters);
    assert_eq!(after.expires, before.expires);
    assert_eq!((after.external.addr, after.external.port), ext);
    assert!(after.is_checkpointed());
    assert_eq!(
        upserts(&h.effects),
        vec![first.key()],
        "the backup gets it back"
    );
    h.check();
}

#[test]
fn refused_delete_keeps_the_mapping() {
    let mut h = Harness::honour();
    let req = Req::map(host(1), 5000).cp();
    let ext = h.ok(&req).external();
    let del = req.clone().lifetime(0);
    h.ok(&del);
    assert_eq!(dp_removes(&h.effects).len(), 1);
    let r = Resp {
        bytes: h
            .refuse(&del.bytes(), del.src, ResultCode::NetworkFailure)
            .unwrap(),
    };
    assert_error(&r, 1, ResultCode::NetworkFailure, SHORT);
    let m = h.mapping(&req.key()).expect("the kernel still forwards it");
    assert_eq!((m.external.addr, m.external.port), ext);
    assert!(m.is_checkpointed());
    assert_eq!(h.server.checkpointed_count(), 1);
    h.check();
}

#[test]
fn refused_peer_and_natpmp_get_their_protocols_errors() {
    let mut h = Harness::honour();
    let peer = Req::peer(host(1), 5000, remote(9), 443);
    h.ok(&peer);
    let r = Resp {
        bytes: h
            .refuse(&peer.bytes(), peer.src, ResultCode::NetworkFailure)
            .unwrap(),
    };
    assert_error(&r, 2, ResultCode::NetworkFailure, SHORT);
    assert_eq!(h.server.mapping_count(), 0);
    let map = natpmp_map(natpmp::Protocol::Tcp, 8080, 0, 7200);
    assert!(matches!(
        h.natpmp(&map, host(1)),
        natpmp::Response::Map {
            result: natpmp::ResultCode::Success,
            ..
        }
    ));
    let reply = h
        .refuse(&map, host(1), ResultCode::NoResources)
        .expect("a NAT-PMP error reply");
    match natpmp::Response::parse(&reply).unwrap() {
        natpmp::Response::Map {
            result,
            external_port,
            lifetime,
            ..
        } => {
            assert_eq!(result, natpmp::ResultCode::OutOfResources);
            assert_eq!((external_port, lifetime), (0, 0));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.server.mapping_count(), 0);
    h.check();
}

// ---------------------------------------------------------------------------------------
// PCP identities (RFC 7652 authentication, docs/AUTH.md): an authenticated request is
// charged to its identity's subscriber, wherever it comes from.

/// A config where identity `alice` is subscriber `acme` (tier gold: 2 mappings, burst
/// of 2 checkpoints, no refill to speak of) and the default tier allows 1 mapping.
fn identity_cfg() -> pcp_server::ServerConfig {
    let mut cfg = honour_cfg();
    cfg.tiers.get_mut("default").unwrap().mapping_quota = 1;
    cfg.tiers.insert(
        "gold".into(),
        TierConfig {
            mapping_quota: 3,
            checkpoint_quota: 10,
            checkpoint_rate: 0.001,
            checkpoint_burst: 2,
        },
    );
    cfg.subscribers.entries = vec![SubscriberEntry {
        prefixes: vec![],
        identities: vec!["alice".into()],
        id: "acme".into(),
        tier: "gold".into(),
    }];
    cfg
}

#[test]
fn identity_quota_is_shared_across_addresses() {
    let mut h = Harness::new(identity_cfg());
    let acme = SubscriberId::Named(Arc::from("acme"));
    let v6: IpAddr = "2001:db8::7".parse().unwrap();
    // Alice from three addresses, both families: one subscriber, gold quota of 3.
    for (src, port) in [(host(1), 5000), (host(2), 5000), (v6, 5000)] {
        let req = Req::map(src, port);
        assert_eq!(h.pcp_as(&req, "alice").result(), ResultCode::Success);
        assert_eq!(h.mapping(&req.key()).unwrap().subscriber, acme);
    }
    let fourth = Req::map(host(3), 5000);
    assert_eq!(h.pcp_as(&fourth, "alice").result(), ResultCode::UserExQuota);
    assert!(h.mapping(&fourth.key()).is_none());
    // The same address unauthenticated is its own (default-tier) subscriber...
    h.ok(&fourth);
    assert_eq!(
        h.mapping(&fourth.key()).unwrap().subscriber,
        SubscriberId::Prefix("10.0.0.3/32".parse().unwrap())
    );
    // ...whose quota of 1 alice's mappings from host 1 did not use up either.
    h.ok(&Req::map(host(1), 6000));
    assert_eq!(
        h.pcp(&Req::map(host(1), 6001)).result(),
        ResultCode::UserExQuota
    );
    let (_, st, tier) = h
        .server
        .subscribers()
        .find(|(id, _, _)| **id == acme)
        .expect("acme has state");
    assert_eq!((st.mappings, &*st.tier, tier.mapping_quota), (3, "gold", 3));
    h.check();
}

#[test]
fn identity_checkpoint_rate_is_shared_across_addresses() {
    let mut h = Harness::new(identity_cfg());
    let a = Req::map(host(1), 5000).cp();
    let b = Req::map(host(2), 5000).cp();
    let c = Req::map(host(3), 5000).cp();
    assert!(h.pcp_as(&a, "alice").has_checkpoint());
    assert!(h.pcp_as(&b, "alice").has_checkpoint());
    // Burst of 2 spent, from two addresses: the third address is refused for rate.
    let r = h.pcp_as(&c, "alice");
    assert_eq!(r.result(), ResultCode::Success);
    assert!(!r.has_checkpoint());
    assert_eq!(reason(&h, &c), Reason::Rate);
    h.check();
}

#[test]
fn unlisted_identity_is_a_subscriber_of_its_own() {
    let mut h = Harness::new(identity_cfg());
    let carol = SubscriberId::Identity(Arc::from("carol"));
    let a = Req::map(host(1), 5000);
    assert_eq!(h.pcp_as(&a, "carol").result(), ResultCode::Success);
    assert_eq!(h.mapping(&a.key()).unwrap().subscriber, carol);
    assert_eq!(carol.to_string(), "identity:carol");
    // Default tier (1 mapping) per identity, not per address.
    let b = Req::map(host(2), 5000);
    assert_eq!(h.pcp_as(&b, "carol").result(), ResultCode::UserExQuota);
    // Another identity from the same address has its own quota.
    assert_eq!(h.pcp_as(&b, "dave").result(), ResultCode::Success);
    // A renewal (same nonce) authenticated as someone else moves the mapping, with
    // its accounting, as a reload that moves a host does.
    assert_eq!(h.pcp_as(&a, "dave").result(), ResultCode::Success);
    assert_eq!(
        h.mapping(&a.key()).unwrap().subscriber,
        SubscriberId::Identity(Arc::from("dave"))
    );
    assert!(h.server.subscribers().all(|(id, _, _)| *id != carol));
    h.check();
}

#[test]
fn policy_rule_by_identity() {
    let mut cfg = identity_cfg();
    let mut vip = rule("alice-always", RuleAction::Force);
    vip.identities = vec!["alice".into()];
    let mut never = rule("mallory-never", RuleAction::Deny);
    never.identities = vec!["mallory".into()];
    let mut by_sub = rule("carol-by-subscriber", RuleAction::Force);
    by_sub.subscribers = vec!["identity:carol".into()];
    cfg.policy = vec![vip, never, by_sub];
    let mut h = Harness::new(cfg);
    // Alice is forced without asking; the same host unauthenticated is not.
    let a = Req::map(host(1), 5000);
    assert_eq!(h.pcp_as(&a, "alice").result(), ResultCode::Success);
    assert_eq!(reason(&h, &a), Reason::Forced(Arc::from("alice-always")));
    let anon = Req::map(host(1), 5001);
    h.ok(&anon);
    assert_eq!(reason(&h, &anon), Reason::NotRequested);
    // Mallory asks and is denied.
    let m = Req::map(host(2), 5000).cp();
    let r = h.pcp_as(&m, "mallory");
    assert!(!r.has_checkpoint());
    assert_eq!(reason(&h, &m), Reason::Denied(Arc::from("mallory-never")));
    // A `subscribers` condition names an unlisted identity as `identity:NAME`.
    let c = Req::map(host(3), 5000);
    assert_eq!(h.pcp_as(&c, "carol").result(), ResultCode::Success);
    assert_eq!(
        reason(&h, &c),
        Reason::Forced(Arc::from("carol-by-subscriber"))
    );
    h.check();
}

#[test]
fn refused_delete_restores_the_identity_charge() {
    let mut h = Harness::new(identity_cfg());
    let acme = SubscriberId::Named(Arc::from("acme"));
    let a = Req::map(host(1), 5000).cp();
    assert!(h.pcp_as(&a, "alice").has_checkpoint());
    let del = a.clone().lifetime(0);
    assert_eq!(h.pcp_as(&del, "alice").result(), ResultCode::Success);
    assert!(h.mapping(&a.key()).is_none());
    // The data plane refused the delete's batch: the mapping comes back, charged to
    // acme again (not to host 1's prefix, which has its own quota of 1).
    h.refuse(&del.bytes(), host(1), ResultCode::NetworkFailure);
    let m = h.mapping(&a.key()).expect("restored");
    assert_eq!(m.subscriber, acme);
    assert!(m.is_checkpointed());
    h.check();
}

/// HA (docs/HA.md, docs/AUTH.md): a successor charges an adopted mapping to the
/// subscriber the active charged it to — the identity's entry, an unlisted identity's
/// own subscriber, or the address's — so quotas carry on across a takeover.
#[test]
fn adopted_mappings_keep_the_subscriber_the_active_charged() {
    let mut active = Harness::new(identity_cfg());
    let alice1 = Req::map(host(1), 5000).cp();
    let alice2 = Req::map(host(2), 5000).cp();
    let carol = Req::map(host(3), 5000).cp();
    let plain = Req::map(host(4), 5000).cp();
    for (req, who) in [
        (&alice1, Some("alice")),
        (&alice2, Some("alice")),
        (&carol, Some("carol")),
        (&plain, None),
    ] {
        let r = match who {
            Some(id) => active.pcp_as(req, id),
            None => active.pcp(req),
        };
        assert!(r.has_checkpoint(), "{who:?}");
    }
    let (views, _) = active.server.checkpointed_from(0, 100);
    assert_eq!(views.len(), 4);
    let mut successor = Harness::new(identity_cfg());
    for m in &views {
        successor
            .server
            .mirror_upsert(m, successor.now, &mut successor.effects)
            .unwrap();
    }
    let acme = SubscriberId::Named(Arc::from("acme"));
    assert_eq!(successor.mapping(&alice1.key()).unwrap().subscriber, acme);
    assert_eq!(successor.mapping(&alice2.key()).unwrap().subscriber, acme);
    assert_eq!(
        successor.mapping(&carol.key()).unwrap().subscriber,
        SubscriberId::Identity(Arc::from("carol"))
    );
    assert_eq!(
        successor.mapping(&plain.key()).unwrap().subscriber,
        SubscriberId::Prefix("10.0.0.4/32".parse().unwrap())
    );
    // The quotas carry on: alice's gold quota of 3 has one left, carol's default
    // quota of 1 none.
    assert_eq!(
        successor.pcp_as(&Req::map(host(5), 5000), "alice").result(),
        ResultCode::Success
    );
    assert_eq!(
        successor.pcp_as(&Req::map(host(6), 5000), "alice").result(),
        ResultCode::UserExQuota
    );
    assert_eq!(
        successor.pcp_as(&Req::map(host(7), 5000), "carol").result(),
        ResultCode::UserExQuota
    );
    // A renewal of an adopted mapping, authenticated as before, stays where it is.
    assert_eq!(
        successor.pcp_as(&alice1, "alice").result(),
        ResultCode::Success
    );
    let (_, st, _) = successor
        .server
        .subscribers()
        .find(|(id, _, _)| **id == acme)
        .unwrap();
    assert_eq!((st.mappings, st.checkpointed), (3, 2));
    // An entry this node does not have is charged by address.
    let mut other = Harness::new(honour_cfg());
    for m in &views {
        other
            .server
            .mirror_upsert(m, other.now, &mut other.effects)
            .unwrap();
    }
    assert_eq!(
        other.mapping(&alice1.key()).unwrap().subscriber,
        SubscriberId::Prefix("10.0.0.1/32".parse().unwrap())
    );
    successor.check();
    other.check();
}
