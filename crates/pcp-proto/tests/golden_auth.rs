//! Byte-exact vectors written by hand from the RFC 7652 layouts: the PA-Client header
//! (Figure 2), the AUTHENTICATION body (§5.2), options 4–12 (§5.3–§5.11) and their IANA
//! rules (§7.1–§7.9), and how a server without RFC 7652 answers them.

use std::net::IpAddr;

use pcp_proto::{
    AuthenticationBody, AuthenticationTag, Body, Extensions, OptionCode, OptionError, Options,
    PaAuthenticationTag, ParseError, PcpOption, Request, Response, ResultCode,
};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
    assert!(digits.len().is_multiple_of(2), "odd number of hex digits");
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

fn emit_req(r: &Request<'_>) -> Vec<u8> {
    let mut out = [0u8; 1100];
    let n = r.emit(&mut out).unwrap();
    out[..n].to_vec()
}

fn emit_resp(r: &Response<'_>) -> Vec<u8> {
    let mut out = [0u8; 1100];
    let n = r.emit(&mut out).unwrap();
    out[..n].to_vec()
}

/// PA-Initiation (§3.1.1): result code INITIATION (14) in octet 3 of the request
/// header, Session ID and Sequence Number 0, a NONCE.
const PA_INITIATION: &str = "
    02 03 00 0e | 00000000 | 00000000 00000000 0000ffff c000020a
    00000000 | 00000000
    04 00 0004 | 12345678";

#[test]
fn pa_initiation_carries_its_result_code_in_the_request_header() {
    let bytes = hex(PA_INITIATION);
    let opts = [PcpOption::Nonce(0x1234_5678)];
    let want = Request {
        lifetime: 0,
        client_addr: ip("192.0.2.10"),
        body: Body::Authentication(AuthenticationBody {
            session_id: 0,
            sequence_number: 0,
        }),
        options: Options::from_list(&opts),
        pa_result_code: ResultCode::Initiation,
    };
    let got = Request::parse(&bytes).unwrap();
    assert_eq!(got, want);
    assert_eq!(got.options.nonce(), Some(0x1234_5678));
    assert_eq!(emit_req(&want), bytes);
}

#[test]
fn pa_server_message_with_eap_request_and_algorithm_lists() {
    // AUTHENTICATION_REQUEST (22), session 0xdeadbeef, seq 0, the nonce echoed, PRF 5
    // and 2 (HMAC_SHA1), MAC 12, ID_INDICATOR "isp.example" (11 octets + 1 pad), and
    // EAP-Request/Identity (code 1, id 1, length 5, type 1: 5 octets + 3 pad).
    let bytes = hex("
        02 83 00 16 | 00000000 | 0000002a | 00000000 00000000 00000000
        deadbeef | 00000000
        04 00 0004 12345678
        08 00 0004 00000005
        08 00 0004 00000002
        09 00 0004 0000000c
        0c 00 000b 6973702e 6578616d 706c6500
        07 00 0005 01010005 01000000");
    let opts = [
        PcpOption::Nonce(0x1234_5678),
        PcpOption::Prf(5),
        PcpOption::Prf(2),
        PcpOption::MacAlgorithm(12),
        PcpOption::IdIndicator("isp.example"),
        PcpOption::EapPayload(&[1, 1, 0, 5, 1]),
    ];
    let want = Response {
        result_code: ResultCode::AuthenticationRequest,
        lifetime: 0,
        epoch: 42,
        body: Body::Authentication(AuthenticationBody {
            session_id: 0xdead_beef,
            sequence_number: 0,
        }),
        options: Options::from_list(&opts),
    };
    let got = Response::parse(&bytes).unwrap();
    assert_eq!(got, want);
    assert_eq!(got.options.prfs().collect::<Vec<_>>(), [5, 2]);
    assert_eq!(got.options.mac_algorithms().collect::<Vec<_>>(), [12]);
    assert_eq!(got.options.id_indicator(), Some("isp.example"));
    assert_eq!(got.options.eap_payload(), Some(&[1u8, 1, 0, 5, 1][..]));
    assert_eq!(emit_resp(&want), bytes);
}

#[test]
fn pa_server_success_with_session_lifetime_and_pa_tag() {
    // §5.5: the Option-Length counts the 4-octet Key ID and the 16-octet MAC: 20.
    let bytes = hex("
        02 83 00 11 | 00000000 | 00000001 | 00000000 00000000 00000000
        deadbeef | 00000003
        0a 00 0004 00000e10
        06 00 0014 00000001 000102030405060708090a0b0c0d0e0f");
    let mac: Vec<u8> = (0..16).collect();
    let opts = [
        PcpOption::SessionLifetime(3600),
        PcpOption::PaAuthenticationTag(PaAuthenticationTag {
            key_id: 1,
            mac: &mac,
        }),
    ];
    let want = Response {
        result_code: ResultCode::AuthenticationSucceeded,
        lifetime: 0,
        epoch: 1,
        body: Body::Authentication(AuthenticationBody {
            session_id: 0xdead_beef,
            sequence_number: 3,
        }),
        options: Options::from_list(&opts),
    };
    let got = Response::parse(&bytes).unwrap();
    assert_eq!(got, want);
    assert_eq!(got.options.session_lifetime(), Some(3600));
    assert_eq!(
        got.options.pa_authentication_tag(),
        Some(PaAuthenticationTag {
            key_id: 1,
            mac: &mac
        })
    );
    assert_eq!(emit_resp(&want), bytes);
}

#[test]
fn pa_acknowledgement() {
    let bytes = hex("
        02 03 00 17 | 00000000 | 00000000 00000000 0000ffff c000020a
        deadbeef | 00000002
        0b 00 0004 00000001");
    let r = Request::parse(&bytes).unwrap();
    assert_eq!(r.pa_result_code, ResultCode::AuthenticationReply);
    assert_eq!(r.options.received_pak(), Some(1));
    assert_eq!(emit_req(&r), bytes);
}

#[test]
fn map_with_authentication_tag_last() {
    // §5.4: Option-Length = 12 (Session ID, Sequence Number, Key ID) + 16 (MAC) = 28.
    let bytes = hex("
        02 01 0000 | 00000e10 | 00000000 00000000 0000ffff c000020a
        0102030405060708090a0b0c | 11 000000 | 13c4 0000 | 00000000 00000000 0000ffff 00000000
        c0 00 0000
        05 00 001c deadbeef 00000007 00000001 ffeeddccbbaa99887766554433221100");
    let r = Request::parse(&bytes).unwrap();
    let mac = hex("ffeeddccbbaa99887766554433221100");
    assert_eq!(
        r.options.authentication_tag(),
        Some(AuthenticationTag {
            session_id: 0xdead_beef,
            sequence_number: 7,
            key_id: 1,
            mac: &mac,
        })
    );
    assert!(r.options.checkpoint_required());
    assert_eq!(emit_req(&r), bytes);
}

fn map(opts: &str) -> Vec<u8> {
    let mut b = hex("
        02 01 0000 | 00000e10 | 00000000 00000000 0000ffff c000020a
        0102030405060708090a0b0c | 11 000000 | 13c4 0000 | 00000000 00000000 0000ffff 00000000");
    b.extend(hex(opts));
    b
}

fn auth_request(opts: &str) -> Vec<u8> {
    let mut b = hex("
        02 03 00 17 | 00000000 | 00000000 00000000 0000ffff c000020a
        deadbeef | 00000001");
    b.extend(hex(opts));
    b
}

fn malformed(bytes: &[u8]) -> (u8, OptionError) {
    match Request::parse(bytes) {
        Err(ParseError::MalformedOption { code, reason }) => (code, reason),
        other => panic!("expected MALFORMED_OPTION, got {other:?}"),
    }
}

#[test]
fn iana_rules_of_options_4_to_12() {
    use OptionError::*;
    let tag = "05 00 001c deadbeef 00000007 00000001 ffeeddccbbaa99887766554433221100";
    let pa_tag = "06 00 0014 00000001 ffeeddccbbaa99887766554433221100";
    // Valid for AUTHENTICATION only (§7.1, §7.3–§7.9).
    for opt in [
        "04 00 0004 00000001",
        "07 00 0004 01010004",
        "08 00 0004 00000005",
        "09 00 0004 0000000c",
        "0b 00 0004 00000001",
        pa_tag,
    ] {
        let code = hex(opt)[0];
        assert_eq!(
            malformed(&map(opt)),
            (code, NotAllowedForOpcode),
            "{opt} in MAP"
        );
    }
    // AUTHENTICATION_TAG: MAP, PEER, ANNOUNCE only (§7.2).
    assert_eq!(malformed(&auth_request(tag)), (5, NotAllowedForOpcode));
    // Fixed lengths.
    for opt in [
        "04 00 0008 00000001 00000002",
        "08 00 0000",
        "0b 00 0002 0000 0000",
    ] {
        let code = hex(opt)[0];
        assert!(
            matches!(malformed(&auth_request(opt)), (c, BadLength { .. }) if c == code),
            "{opt}"
        );
    }
    // The tags' fixed fields and a whole EAP header are required.
    assert_eq!(
        malformed(&map("05 00 0008 deadbeef 00000007")),
        (5, BadLength { len: 8 })
    );
    assert_eq!(
        malformed(&auth_request("06 00 0000")),
        (6, BadLength { len: 0 })
    );
    assert_eq!(
        malformed(&auth_request("07 00 0003 010100 00")),
        (7, BadLength { len: 3 })
    );
    // Maximum occurrences 1, except PRF and MAC_ALGORITHM.
    for opt in [
        "04 00 0004 00000001",
        "0b 00 0004 00000001",
        "07 00 0004 01010004",
    ] {
        let code = hex(opt)[0];
        assert_eq!(
            malformed(&auth_request(&format!("{opt} {opt}"))),
            (code, Repeated)
        );
    }
    let lists = auth_request(
        "08 00 0004 00000005 08 00 0004 00000002 09 00 0004 0000000c 09 00 0004 0000000d",
    );
    let r = Request::parse(&lists).unwrap();
    assert_eq!(r.options.prfs().collect::<Vec<_>>(), [5, 2]);
    assert_eq!(r.options.mac_algorithms().collect::<Vec<_>>(), [12, 13]);
    // SESSION_LIFETIME and ID_INDICATOR: "May appear in: Response" only.
    assert_eq!(
        malformed(&auth_request("0a 00 0004 00000e10")),
        (10, ResponseOnly)
    );
    assert_eq!(
        malformed(&auth_request("0c 00 0001 61000000")),
        (12, ResponseOnly)
    );
    // ID_INDICATOR is UTF-8 (checked in responses, where it may appear).
    let mut resp = hex("
        02 83 00 16 | 00000000 | 00000000 | 00000000 00000000 00000000
        deadbeef | 00000000");
    resp.extend(hex("0c 00 0002 fffe 0000"));
    assert_eq!(
        Response::parse(&resp).unwrap_err(),
        ParseError::MalformedOption {
            code: 12,
            reason: InvalidField("not UTF-8")
        }
    );
    // The tags come last (§6.1: "appends ... at the end").
    assert_eq!(malformed(&map(&format!("{tag} c0 00 0000"))), (5, NotLast));
    assert_eq!(
        malformed(&auth_request(&format!("{pa_tag} 04 00 0004 00000001"))),
        (6, NotLast)
    );
    assert!(Request::parse(&map(&format!("c0 00 0000 {tag}"))).is_ok());
}

/// A server without RFC 7652 does not understand options 4–12: whatever their
/// contents, they are unsupported mandatory options (UNSUPP_OPTION, RFC 6887 §7.3),
/// and AUTHENTICATION is an unsupported opcode checked before any option.
#[test]
fn without_authentication_support() {
    let base = Extensions::BASE;
    for opt in [
        "04 00 0004 00000001",
        "04 00 0003 000000 00",
        "05 00 0000",
        "0a 00 0004 00000e10",
        "0c 00 0002 fffe 0000",
    ] {
        let code = hex(opt)[0];
        let e = Request::parse_with(&map(opt), base).unwrap_err();
        assert_eq!(e, ParseError::UnsupportedOption { code }, "{opt}");
        assert_eq!(e.result_code(), Some(ResultCode::UnsuppOption));
    }
    for bytes in [
        hex(PA_INITIATION),
        auth_request("04 00 0004 00000001 04 00 0004 00000001"),
    ] {
        let e = Request::parse_with(&bytes, base).unwrap_err();
        assert_eq!(e, ParseError::UnsupportedOpcode(3));
        assert_eq!(e.result_code(), Some(ResultCode::UnsuppOpcode));
    }
    // Everything else parses the same.
    let plain = map("c0 00 0000");
    assert_eq!(
        Request::parse_with(&plain, base).unwrap(),
        Request::parse(&plain).unwrap()
    );
}

#[test]
fn option_codes_and_result_codes_of_rfc7652() {
    let names = [
        (4, "NONCE"),
        (5, "AUTHENTICATION_TAG"),
        (6, "PA_AUTHENTICATION_TAG"),
        (7, "EAP_PAYLOAD"),
        (8, "PRF"),
        (9, "MAC_ALGORITHM"),
        (10, "SESSION_LIFETIME"),
        (11, "RECEIVED_PAK"),
        (12, "ID_INDICATOR"),
    ];
    for (code, name) in names {
        let c = OptionCode::from(code);
        assert_eq!(c.name(), name);
        assert!(c.is_authentication() && c.is_mandatory() && c.is_known());
        assert_eq!(u8::from(c), code);
    }
    let results = [
        (14, "INITIATION"),
        (15, "AUTHENTICATION_REQUIRED"),
        (16, "AUTHENTICATION_FAILED"),
        (17, "AUTHENTICATION_SUCCEEDED"),
        (18, "AUTHORIZATION_FAILED"),
        (19, "SESSION_TERMINATED"),
        (20, "UNKNOWN_SESSION_ID"),
        (21, "DOWNGRADE_ATTACK_DETECTED"),
        (22, "AUTHENTICATION_REQUEST"),
        (23, "AUTHENTICATION_REPLY"),
    ];
    for (v, name) in results {
        assert_eq!(ResultCode::from(v).name(), name);
        assert_eq!(ResultCode::from(v).to_u8(), v);
    }
}

/// Other opcodes keep octet 3 of the request header reserved: emitted 0, ignored.
#[test]
fn reserved_octet_of_other_requests_is_ignored() {
    let mut bytes = map("");
    bytes[3] = 0x0e;
    let r = Request::parse(&bytes).unwrap();
    assert_eq!(r.pa_result_code, ResultCode::Success);
    assert_eq!(emit_req(&r)[3], 0);
}

/// `append_option` after an emitted message gives the bytes of the message emitted with
/// the option last.
#[test]
fn append_option_puts_a_tag_last() {
    let mut buf = map("c0 00 0000");
    let len = buf.len();
    buf.resize(1100, 0);
    let mac = [0x5a; 16];
    let tag = PcpOption::AuthenticationTag(AuthenticationTag {
        session_id: 9,
        sequence_number: 1,
        key_id: 1,
        mac: &mac,
    });
    let n = pcp_proto::append_option(&mut buf, len, &tag).unwrap();
    assert_eq!(n, len + 32);
    let r = Request::parse(&buf[..n]).unwrap();
    assert_eq!(r.options.iter().last(), Some(tag));
    // Too long for PCP.
    let mut small = map("");
    small.resize(1100, 0);
    assert!(pcp_proto::append_option(&mut small, 1076, &tag).is_err());
}
