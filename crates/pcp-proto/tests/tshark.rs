//! External decoder check: messages this codec emits are written into a pcap file and
//! decoded by Wireshark's own dissectors — `portcontrol` (PCP, RFC 6887) and `nat-pmp`
//! (RFC 6886) — through `tshark -T json`. Every field the dissector shows is compared
//! with what the codec was asked to write: header, opcode body, and each option's code,
//! length, padding and (where Wireshark decodes it) data.
//!
//! The expected values come from the test's own reading of the RFCs (numbers for result
//! codes, option codes and data lengths are spelled out here, not taken from the codec).
//!
//! Needs `tshark` on PATH; `./scripts/test` installs it. Without tshark the test fails,
//! unless `PCP_SKIP_TSHARK=1` is set, in which case it prints a loud notice and passes.

mod support {
    pub mod pcap;
}

use std::fmt;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4};
use std::path::PathBuf;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use pcp_proto::{
    Body, Filter, MapBody, Options, PcpOption, PeerBody, PortSet, Request, Response, ResultCode,
    emit_error_response, natpmp, protocol,
};
use serde_json::Value;
use support::pcap::{self, Datagram};

/// The PCP server.
const SERVER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 5351);
/// Two PCP clients on ephemeral ports.
const CLIENT_A: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 33), 40001);
const CLIENT_B: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 34), 40002);
/// Where a server multicasts unsolicited ANNOUNCE responses (RFC 6887 §14.1.3).
const ALL_NODES: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(224, 0, 0, 1), 5350);

const NONCE_A: [u8; 12] = [
    0x5a, 0x1e, 0x00, 0xff, 0x80, 0x01, 0x7f, 0x10, 0xca, 0xfe, 0xba, 0xbe,
];
const NONCE_B: [u8; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
const NONCE_C: [u8; 12] = [0xee; 12];

#[test]
fn wireshark_decodes_what_the_codec_writes() {
    let Some(version) = tshark_version() else {
        return;
    };
    let samples = samples();

    let dir = TempDir::new();
    let file = dir.0.join("pcp-samples.pcap");
    let datagrams: Vec<Datagram<'_>> = samples
        .iter()
        .map(|s| Datagram {
            src: s.src,
            dst: s.dst,
            payload: &s.bytes,
        })
        .collect();
    std::fs::write(&file, pcap::capture(&datagrams))
        .unwrap_or_else(|e| panic!("writing {}: {e}", file.display()));

    // `--no-duplicate-keys` turns the repeated `portcontrol.option` keys of one packet into
    // an array (plain JSON objects would keep only the last). `-n`: no name lookups. An
    // empty configuration directory keeps a developer's Wireshark preferences out.
    let output = Command::new("tshark")
        .arg("-n")
        .arg("-r")
        .arg(&file)
        .args(["-d", "udp.port==5351,portcontrol"])
        .args(["-T", "json", "--no-duplicate-keys"])
        .env("WIRESHARK_CONFIG_DIR", &dir.0)
        .output()
        .expect("running tshark");
    assert!(
        output.status.success(),
        "tshark failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let json: Value = serde_json::from_slice(&output.stdout).expect("tshark's JSON parses");
    let packets = json
        .as_array()
        .expect("tshark -T json prints an array of packets");
    assert_eq!(
        packets.len(),
        samples.len(),
        "tshark read {} packets from the capture, {} were written",
        packets.len(),
        samples.len()
    );

    let mut errors = Vec::new();
    for (sample, packet) in samples.iter().zip(packets) {
        check(sample, packet, &mut errors);
    }
    assert!(
        errors.is_empty(),
        "{version} decodes {} field(s) differently from what the codec meant to write:\n  {}",
        errors.len(),
        errors.join("\n  ")
    );
    eprintln!(
        "{version}: {} messages decoded as the codec meant them",
        samples.len()
    );
}

// ---------------------------------------------------------------------------------------
// The sample messages.

/// One datagram and what Wireshark should show for it.
struct Sample {
    name: &'static str,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    bytes: Vec<u8>,
    expect: Expect,
}

fn samples() -> Vec<Sample> {
    let mut out = Vec::new();

    // 1. MAP request, IPv4, CHECKPOINT_REQUIRED; the IPv4 "any" external address.
    let map_v4 = Request {
        lifetime: 7200,
        client_addr: IpAddr::V4(*CLIENT_A.ip()),
        body: Body::Map(MapBody {
            nonce: NONCE_A,
            protocol: protocol::UDP,
            internal_port: 5000,
            external_port: 6000,
            external_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        }),
        options: Options::from_list(&[PcpOption::CheckpointRequired]),
        pa_result_code: ResultCode::Success,
    };
    out.push(request(
        "MAP request, IPv4, CHECKPOINT_REQUIRED",
        CLIENT_A,
        &map_v4,
    ));

    // 2. MAP request, IPv6 addresses, with every MAP option this codec knows by name.
    // Options whose data length is a multiple of 4 come first: see `dissectable_order`.
    let map_v6_options = [
        PcpOption::ThirdParty(v6("2001:db8:0:1::99")),
        PcpOption::PreferFailure,
        PcpOption::Filter(Filter {
            prefix_len: 128,
            remote_port: 443,
            remote_addr: v6("2001:db8:aaaa::7"),
        }),
        PcpOption::Filter(Filter {
            prefix_len: 48,
            remote_port: 0,
            remote_addr: v6("2001:db8:bbbb::"),
        }),
        PcpOption::CheckpointRequired,
        PcpOption::Description("camera \u{2013} front door"),
        PcpOption::PortSet(PortSet {
            size: 16,
            first_internal_port: 8080,
            parity: true,
        }),
    ];
    let map_v6 = Request {
        lifetime: 3600,
        client_addr: v6("2001:db8:0:1::33"),
        body: Body::Map(MapBody {
            nonce: NONCE_B,
            protocol: protocol::TCP,
            internal_port: 8080,
            external_port: 80,
            external_addr: v6("2001:db8:ffff::1"),
        }),
        options: Options::from_list(&map_v6_options),
        pa_result_code: ResultCode::Success,
    };
    out.push(request(
        "MAP request, IPv6, THIRD_PARTY + PREFER_FAILURE + 2 FILTER + 192 + DESCRIPTION + PORT_SET",
        CLIENT_A,
        &map_v6,
    ));

    // 3. PEER request with CHECKPOINT_REQUIRED.
    let peer = Request {
        lifetime: 300,
        client_addr: IpAddr::V4(*CLIENT_B.ip()),
        body: Body::Peer(PeerBody {
            mapping: MapBody {
                nonce: NONCE_C,
                protocol: protocol::UDP,
                internal_port: 6000,
                external_port: 6001,
                external_addr: v4("198.51.100.1"),
            },
            remote_port: 3478,
            remote_addr: v4("203.0.113.9"),
        }),
        options: Options::from_list(&[PcpOption::CheckpointRequired]),
        pa_result_code: ResultCode::Success,
    };
    out.push(request(
        "PEER request, CHECKPOINT_REQUIRED",
        CLIENT_B,
        &peer,
    ));

    // 4. Successful MAP response with CHECKPOINT_REQUIRED.
    let map_ok = Response {
        result_code: ResultCode::Success,
        lifetime: 3600,
        epoch: 1_234_567,
        body: Body::Map(MapBody {
            external_port: 6000,
            external_addr: v4("198.51.100.1"),
            ..*map_v4.body.mapping().expect("MAP body")
        }),
        options: Options::from_list(&[PcpOption::CheckpointRequired]),
    };
    out.push(response(
        "MAP response, SUCCESS, CHECKPOINT_REQUIRED",
        CLIENT_A,
        &map_ok,
    ));

    // 5. MAP response with the options a server echoes, PORT_SET as assigned.
    let map_v6_ok_options = [
        PcpOption::ThirdParty(v6("2001:db8:0:1::99")),
        PcpOption::Filter(Filter {
            prefix_len: 128,
            remote_port: 443,
            remote_addr: v6("2001:db8:aaaa::7"),
        }),
        PcpOption::CheckpointRequired,
        PcpOption::PortSet(PortSet {
            size: 16,
            first_internal_port: 8080,
            parity: false,
        }),
    ];
    let map_v6_ok = Response {
        result_code: ResultCode::Success,
        lifetime: 1800,
        epoch: 1_234_568,
        body: Body::Map(MapBody {
            external_port: 41_000,
            ..*map_v6.body.mapping().expect("MAP body")
        }),
        options: Options::from_list(&map_v6_ok_options),
    };
    out.push(response(
        "MAP response, IPv6, SUCCESS, THIRD_PARTY + FILTER + 192 + PORT_SET",
        CLIENT_A,
        &map_v6_ok,
    ));

    // 6. Successful PEER response.
    let Body::Peer(peer_body) = peer.body else {
        unreachable!("built as PEER above")
    };
    let peer_ok = Response {
        result_code: ResultCode::Success,
        lifetime: 120,
        epoch: 1_234_569,
        body: Body::Peer(PeerBody {
            mapping: MapBody {
                external_port: 61_001,
                ..peer_body.mapping
            },
            ..peer_body
        }),
        options: Options::from_list(&[PcpOption::CheckpointRequired]),
    };
    out.push(response(
        "PEER response, SUCCESS, CHECKPOINT_REQUIRED",
        CLIENT_B,
        &peer_ok,
    ));

    // 7–9. ANNOUNCE: request, response, and an unsolicited one to the all-nodes group.
    let announce = Request {
        lifetime: 0,
        client_addr: IpAddr::V4(*CLIENT_A.ip()),
        body: Body::Announce,
        options: Options::EMPTY,
        pa_result_code: ResultCode::Success,
    };
    out.push(request("ANNOUNCE request", CLIENT_A, &announce));
    let announce_ok = Response {
        result_code: ResultCode::Success,
        lifetime: 0,
        epoch: 1_234_570,
        body: Body::Announce,
        options: Options::EMPTY,
    };
    out.push(response("ANNOUNCE response", CLIENT_A, &announce_ok));
    let unsolicited = Response {
        epoch: 5,
        ..announce_ok
    };
    out.push(response(
        "unsolicited ANNOUNCE response",
        ALL_NODES,
        &unsolicited,
    ));

    // 10. A short-lifetime error built as a Response.
    let quota = Response {
        result_code: ResultCode::UserExQuota,
        lifetime: 30,
        epoch: 1_234_571,
        body: map_v4.body,
        options: Options::EMPTY,
    };
    out.push(response(
        "MAP response, USER_EX_QUOTA, lifetime 30",
        CLIENT_A,
        &quota,
    ));

    // 11–12. Error responses built from the request's bytes (the whole request comes
    // back): to a request that parsed and was refused, and to one that did not parse.
    out.push(error_response(
        "NOT_AUTHORIZED from emit_error_response, request parsed",
        CLIENT_A,
        &map_v6,
        ResultCode::NotAuthorized,
        1800,
        1_234_572,
        true,
    ));
    out.push(error_response(
        "MALFORMED_OPTION from emit_error_response, request did not parse",
        CLIENT_B,
        &peer,
        ResultCode::MalformedOption,
        1800,
        1_234_573,
        false,
    ));

    // 13. An unknown optional option: 3 data octets, so one octet of padding.
    let unknown_options = [
        PcpOption::CheckpointRequired,
        PcpOption::Unknown {
            code: 200,
            data: &[0xde, 0xad, 0xbe],
        },
    ];
    let map_unknown = Request {
        options: Options::from_list(&unknown_options),
        ..map_v4
    };
    out.push(request(
        "MAP request, unknown optional option 200 with 3 octets",
        CLIENT_A,
        &map_unknown,
    ));

    // 14–19. NAT-PMP, which Wireshark's portcontrol dissector hands to nat-pmp (version 0).
    out.push(natpmp_request(
        "NAT-PMP external address request",
        &natpmp::Request::ExternalAddress,
    ));
    out.push(natpmp_response(
        "NAT-PMP external address response",
        &natpmp::Response::ExternalAddress {
            result: natpmp::ResultCode::Success,
            epoch: 86_400,
            external_addr: Ipv4Addr::new(198, 51, 100, 1),
        },
    ));
    out.push(natpmp_request(
        "NAT-PMP UDP map request",
        &natpmp::Request::Map(natpmp::MapRequest {
            protocol: natpmp::Protocol::Udp,
            internal_port: 5000,
            suggested_external_port: 6000,
            lifetime: 7200,
        }),
    ));
    out.push(natpmp_response(
        "NAT-PMP UDP map response",
        &natpmp::Response::Map {
            protocol: natpmp::Protocol::Udp,
            result: natpmp::ResultCode::Success,
            epoch: 86_401,
            internal_port: 5000,
            external_port: 6000,
            lifetime: 7200,
        },
    ));
    out.push(natpmp_request(
        "NAT-PMP TCP map request",
        &natpmp::Request::Map(natpmp::MapRequest {
            protocol: natpmp::Protocol::Tcp,
            internal_port: 22,
            suggested_external_port: 0,
            lifetime: 0,
        }),
    ));
    out.push(natpmp_response(
        "NAT-PMP TCP map response, NOT_AUTHORIZED",
        &natpmp::Response::Map {
            protocol: natpmp::Protocol::Tcp,
            result: natpmp::ResultCode::NotAuthorized,
            epoch: 86_402,
            internal_port: 22,
            external_port: 0,
            lifetime: 0,
        },
    ));

    out
}

fn request(name: &'static str, client: SocketAddrV4, req: &Request<'_>) -> Sample {
    dissectable_order(name, req.options);
    let mut buf = [0u8; 1100];
    let len = req
        .emit(&mut buf)
        .unwrap_or_else(|e| panic!("{name}: emit: {e}"));
    Sample {
        name,
        src: client,
        dst: SERVER,
        bytes: buf[..len].to_vec(),
        expect: expect_request(req),
    }
}

fn response(name: &'static str, client: SocketAddrV4, resp: &Response<'_>) -> Sample {
    dissectable_order(name, resp.options);
    let mut buf = [0u8; 1100];
    let len = resp
        .emit(&mut buf)
        .unwrap_or_else(|e| panic!("{name}: emit: {e}"));
    Sample {
        name,
        src: SERVER,
        dst: client,
        bytes: buf[..len].to_vec(),
        expect: expect_response(resp),
    }
}

/// An error response made by `emit_error_response` from `req`'s bytes. What it means
/// to write (RFC 6887 §7.2, §8.3): the request's opcode body and options under a
/// response header whose 96 reserved bits are zero if the request `parsed`, else the
/// last 96 bits of the request's client address.
fn error_response(
    name: &'static str,
    client: SocketAddrV4,
    req: &Request<'_>,
    result_code: ResultCode,
    lifetime: u32,
    epoch: u32,
    parsed: bool,
) -> Sample {
    let mut request_bytes = [0u8; 1100];
    let request_len = req
        .emit(&mut request_bytes)
        .unwrap_or_else(|e| panic!("{name}: emit request: {e}"));
    let mut buf = [0u8; 1100];
    let len = emit_error_response(
        &request_bytes[..request_len],
        result_code,
        lifetime,
        epoch,
        parsed,
        &mut buf,
    )
    .unwrap_or_else(|e| panic!("{name}: emit_error_response: {e}"));
    let meant = Response {
        result_code,
        lifetime,
        epoch,
        body: req.body,
        options: req.options,
    };
    dissectable_order(name, meant.options);
    let mut expect = expect_response(&meant);
    if !parsed {
        let client = as_pcp_address(req.client_addr).octets();
        expect.replace("portcontrol.rsp_reserved", text(hex(&client[4..])));
    }
    Sample {
        name,
        src: SERVER,
        dst: client,
        bytes: buf[..len].to_vec(),
        expect,
    }
}

fn natpmp_request(name: &'static str, req: &natpmp::Request) -> Sample {
    let mut buf = [0u8; 16];
    let len = req.emit(&mut buf).expect("NAT-PMP request fits");
    Sample {
        name,
        src: CLIENT_A,
        dst: SERVER,
        bytes: buf[..len].to_vec(),
        expect: expect_natpmp_request(req),
    }
}

fn natpmp_response(name: &'static str, resp: &natpmp::Response) -> Sample {
    let mut buf = [0u8; 16];
    let len = resp.emit(&mut buf).expect("NAT-PMP response fits");
    Sample {
        name,
        src: SERVER,
        dst: CLIENT_A,
        bytes: buf[..len].to_vec(),
        expect: expect_natpmp_response(resp),
    }
}

/// Wireshark's PCP dissector (4.0.17; later sources have the same code) keeps the
/// padding length of the last option whose data length is not a multiple of 4 and
/// applies it again to every later option whose length is, then loses the framing. So
/// within one sample, such "aligned" options must all precede the unaligned ones.
fn dissectable_order(name: &str, options: Options<'_>) {
    let mut unaligned_seen = false;
    for o in options {
        let len = expect_option(&o, false).len;
        if !len.is_multiple_of(4) {
            unaligned_seen = true;
        } else {
            assert!(
                !unaligned_seen,
                "{name}: option {o:?} (length {len}) follows an option whose length is not a \
                 multiple of 4; Wireshark would misframe it. Put it earlier."
            );
        }
    }
}

fn v4(s: &str) -> IpAddr {
    IpAddr::V4(s.parse().expect("IPv4 literal"))
}

fn v6(s: &str) -> IpAddr {
    IpAddr::V6(s.parse().expect("IPv6 literal"))
}

// ---------------------------------------------------------------------------------------
// What Wireshark should show: field names of Wireshark's `portcontrol` and `nat-pmp`
// dissectors, values per RFC 6887 / RFC 6886 / RFC 7220 / RFC 7753 / RFC 7767.

/// An expected field value.
enum Want {
    /// The text tshark prints (numbers in decimal, bytes as `aa:bb:…`).
    Text(String),
    /// A 128-bit PCP address field, shown as IPv6 (an IPv4 address IPv4-mapped).
    PcpAddr(IpAddr),
    /// An IPv4 address field.
    V4(Ipv4Addr),
}

impl Want {
    fn matches(&self, got: &str) -> bool {
        match self {
            Want::Text(t) => t == got,
            Want::PcpAddr(a) => got.parse::<Ipv6Addr>() == Ok(as_pcp_address(*a)),
            Want::V4(a) => got.parse::<Ipv4Addr>() == Ok(*a),
        }
    }
}

impl fmt::Display for Want {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Want::Text(t) => write!(f, "{t:?}"),
            Want::PcpAddr(a) => write!(f, "{} (for {a})", as_pcp_address(*a)),
            Want::V4(a) => write!(f, "{a}"),
        }
    }
}

/// RFC 6887 §5: IPv4 addresses travel IPv4-mapped.
fn as_pcp_address(a: IpAddr) -> Ipv6Addr {
    match a {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

fn text(v: impl ToString) -> Want {
    Want::Text(v.to_string())
}

/// Bytes as tshark prints an FT_BYTES field.
fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Everything expected of one packet.
struct Expect {
    /// The protocol layer tshark should decode the payload as.
    layer: &'static str,
    /// Fields and their values; a field that occurs several times lists each in order.
    fields: Vec<(String, Vec<Want>)>,
    /// Fields that must not appear.
    absent: Vec<String>,
    /// PCP options, in order.
    options: Vec<OptionExpect>,
}

impl Expect {
    fn new(layer: &'static str) -> Expect {
        Expect {
            layer,
            fields: Vec::new(),
            absent: Vec::new(),
            options: Vec::new(),
        }
    }

    fn want(&mut self, key: impl Into<String>, want: Want) {
        self.fields.push((key.into(), vec![want]));
    }

    fn replace(&mut self, key: &str, want: Want) {
        let field = self
            .fields
            .iter_mut()
            .find(|(k, _)| k == key)
            .unwrap_or_else(|| panic!("no expectation for {key} to replace"));
        field.1 = vec![want];
    }

    fn absent(&mut self, key: impl Into<String>) {
        self.absent.push(key.into());
    }
}

struct OptionExpect {
    code: u8,
    /// Data length, without padding.
    len: usize,
    fields: Vec<(&'static str, Want)>,
}

fn expect_request(req: &Request<'_>) -> Expect {
    let mut e = Expect::new("portcontrol");
    e.want("portcontrol.version", text(2));
    e.want("portcontrol.r", text(0));
    e.want("portcontrol.request", text(1));
    e.absent("portcontrol.response");
    e.want("portcontrol.opcode", text(opcode(&req.body)));
    e.want("portcontrol.reserved", text(0));
    e.want("portcontrol.lifetime_req", text(req.lifetime));
    e.want("portcontrol.client_ip", Want::PcpAddr(req.client_addr));
    for key in [
        "portcontrol.result_code",
        "portcontrol.lifetime_rsp",
        "portcontrol.epoch_time",
    ] {
        e.absent(key);
    }
    expect_body(&mut e, &req.body, false);
    e.options = req
        .options
        .iter()
        .map(|o| expect_option(&o, false))
        .collect();
    e
}

fn expect_response(resp: &Response<'_>) -> Expect {
    let mut e = Expect::new("portcontrol");
    e.want("portcontrol.version", text(2));
    e.want("portcontrol.r", text(1));
    // The hidden `portcontrol.response` field is not compared: Wireshark fills it with
    // `(opcode octet & 0x80) == TRUE`, which is 0 for every response.
    e.absent("portcontrol.request");
    e.want("portcontrol.opcode", text(opcode(&resp.body)));
    e.want("portcontrol.reserved", text(0));
    e.want(
        "portcontrol.result_code",
        text(result_code(resp.result_code)),
    );
    e.want("portcontrol.lifetime_rsp", text(resp.lifetime));
    e.want("portcontrol.epoch_time", text(resp.epoch));
    e.want("portcontrol.rsp_reserved", text(hex(&[0; 12])));
    e.absent("portcontrol.lifetime_req");
    e.absent("portcontrol.client_ip");
    expect_body(&mut e, &resp.body, true);
    e.options = resp
        .options
        .iter()
        .map(|o| expect_option(&o, true))
        .collect();
    e
}

/// RFC 6887 §19.2.
fn opcode(body: &Body) -> u8 {
    match body {
        Body::Announce => 0,
        Body::Map(_) => 1,
        Body::Peer(_) => 2,
        Body::Authentication(_) => {
            panic!("Wireshark's portcontrol dissector has no AUTHENTICATION")
        }
    }
}

/// RFC 6887 §7.4, for the codes the samples use.
fn result_code(code: ResultCode) -> u8 {
    match code {
        ResultCode::Success => 0,
        ResultCode::NotAuthorized => 2,
        ResultCode::MalformedOption => 6,
        ResultCode::UserExQuota => 10,
        other => panic!("add the RFC 6887 number of {other:?} to result_code()"),
    }
}

fn expect_body(e: &mut Expect, body: &Body, response: bool) {
    let (kind, m) = match body {
        Body::Announce => {
            e.absent("portcontrol.map.nonce");
            e.absent("portcontrol.peer.nonce");
            return;
        }
        Body::Map(m) => ("map", m),
        Body::Peer(p) => ("peer", &p.mapping),
        Body::Authentication(_) => unreachable!("rejected by opcode()"),
    };
    let key = |field: &str| format!("portcontrol.{kind}.{field}");
    e.want(key("nonce"), text(hex(&m.nonce)));
    e.want(key("protocol"), text(m.protocol));
    e.want(key("internal_port"), text(m.internal_port));
    if response {
        e.want(key("rsp_assigned_external_port"), text(m.external_port));
        e.want(key("rsp_assigned_ext_ip"), Want::PcpAddr(m.external_addr));
    } else {
        e.want(key("req_sug_external_port"), text(m.external_port));
        e.want(key("req_sug_external_ip"), Want::PcpAddr(m.external_addr));
    }
    match body {
        Body::Peer(p) => {
            e.absent("portcontrol.map.nonce");
            // Two reserved fields share the name: 24 bits after the protocol, 16 after
            // the remote peer port.
            e.fields.push((
                key("reserved"),
                vec![text(hex(&[0; 3])), text(hex(&[0; 2]))],
            ));
            e.want(key("remote_peer_port"), text(p.remote_port));
            e.want(key("remote_peer_ip"), Want::PcpAddr(p.remote_addr));
        }
        _ => {
            e.absent("portcontrol.peer.nonce");
            e.want(key("reserved"), text(0));
        }
    }
}

/// Option code and data length per the option's RFC, plus the data fields Wireshark
/// decodes. `response` selects the PORT_SET field name Wireshark uses.
fn expect_option(o: &PcpOption<'_>, response: bool) -> OptionExpect {
    let (code, len, fields) = match *o {
        PcpOption::ThirdParty(a) => (
            1,
            16,
            vec![(
                "portcontrol.option.third_party.internal_ip",
                Want::PcpAddr(a),
            )],
        ),
        PcpOption::PreferFailure => (2, 0, vec![]),
        PcpOption::Filter(f) => (
            3,
            20,
            vec![
                ("portcontrol.option.filter.reserved", text(0)),
                (
                    "portcontrol.option.filter.prefix_length",
                    text(f.prefix_len),
                ),
                (
                    "portcontrol.option.filter.remote_peer_port",
                    text(f.remote_port),
                ),
                (
                    "portcontrol.option.filter.remote_peer_ip",
                    Want::PcpAddr(f.remote_addr),
                ),
            ],
        ),
        // RFC 7220: UTF-8, no terminator; the length counts octets.
        PcpOption::Description(s) => (
            128,
            s.len(),
            vec![("portcontrol.option.description", text(s))],
        ),
        // RFC 7753 §4: size, first internal port, 7 reserved bits and the parity bit.
        // Wireshark calls the port "Suggested/Assigned First Port".
        PcpOption::PortSet(p) => (
            130,
            5,
            vec![
                ("portcontrol.option.portset.size", text(p.size)),
                (
                    if response {
                        "portcontrol.option.portset.rsp_assigned_first_external_port"
                    } else {
                        "portcontrol.option.portset.req_sug_first_external_port"
                    },
                    text(p.first_internal_port),
                ),
                ("portcontrol.option.portset.reserved", text("0x00")),
                (
                    "portcontrol.option.portset.parity",
                    text(u8::from(p.parity)),
                ),
            ],
        ),
        // RFC 7767: no data. Wireshark does not know code 192; with no data it shows
        // just the option header.
        PcpOption::CheckpointRequired => (192, 0, vec![]),
        PcpOption::Unknown { code, data } => (code, data.len(), vec![]),
        ref other => panic!("no expectation for {other:?} yet: add one to expect_option()"),
    };
    OptionExpect { code, len, fields }
}

fn expect_natpmp_request(req: &natpmp::Request) -> Expect {
    let mut e = Expect::new("nat-pmp");
    e.want("nat-pmp.version", text(0));
    match req {
        natpmp::Request::ExternalAddress => {
            e.want("nat-pmp.opcode", text(0));
            e.absent("nat-pmp.internal_port");
        }
        natpmp::Request::Map(m) => {
            e.want("nat-pmp.opcode", text(natpmp_opcode(m.protocol)));
            e.want("nat-pmp.reserved", text(0));
            e.want("nat-pmp.internal_port", text(m.internal_port));
            e.want("nat-pmp.external_port", text(m.suggested_external_port));
            e.want("nat-pmp.pml", text(m.lifetime));
        }
    }
    e.absent("nat-pmp.result_code");
    e.absent("nat-pmp.sssoe");
    e
}

fn expect_natpmp_response(resp: &natpmp::Response) -> Expect {
    let mut e = Expect::new("nat-pmp");
    e.want("nat-pmp.version", text(0));
    match *resp {
        natpmp::Response::ExternalAddress {
            result,
            epoch,
            external_addr,
        } => {
            e.want("nat-pmp.opcode", text(128));
            e.want("nat-pmp.result_code", text(natpmp_result(result)));
            e.want("nat-pmp.sssoe", text(epoch));
            e.want("nat-pmp.external_ip", Want::V4(external_addr));
        }
        natpmp::Response::Map {
            protocol,
            result,
            epoch,
            internal_port,
            external_port,
            lifetime,
        } => {
            e.want("nat-pmp.opcode", text(128 + natpmp_opcode(protocol)));
            e.want("nat-pmp.result_code", text(natpmp_result(result)));
            e.want("nat-pmp.sssoe", text(epoch));
            e.want("nat-pmp.internal_port", text(internal_port));
            e.want("nat-pmp.external_port", text(external_port));
            e.want("nat-pmp.pml", text(lifetime));
        }
        // Wireshark reads opcodes 128–130 in their full layout, so it reports the
        // 8-octet error form as malformed; it is left out.
        natpmp::Response::Error { .. } => {
            panic!("Wireshark cannot decode the 8-octet NAT-PMP error form")
        }
    }
    e
}

/// RFC 6886 §3.3.
fn natpmp_opcode(p: natpmp::Protocol) -> u8 {
    match p {
        natpmp::Protocol::Udp => 1,
        natpmp::Protocol::Tcp => 2,
    }
}

/// RFC 6886 §3.5.
fn natpmp_result(r: natpmp::ResultCode) -> u16 {
    match r {
        natpmp::ResultCode::Success => 0,
        natpmp::ResultCode::UnsupportedVersion => 1,
        natpmp::ResultCode::NotAuthorized => 2,
        natpmp::ResultCode::NetworkFailure => 3,
        natpmp::ResultCode::OutOfResources => 4,
        natpmp::ResultCode::UnsupportedOpcode => 5,
        natpmp::ResultCode::Unknown(v) => v,
    }
}

// ---------------------------------------------------------------------------------------
// Comparing with tshark's JSON.

/// Compares one decoded packet with its sample, appending each difference to `errors`.
fn check(sample: &Sample, packet: &Value, errors: &mut Vec<String>) {
    let mut r = Report {
        sample: sample.name,
        errors,
    };
    let layers = &packet["_source"]["layers"];

    // The frame is the datagram that was written (checks the pcap writer and the pairing).
    let udp = &layers["udp"];
    r.compare(udp, "udp.srcport", &[text(sample.src.port())], "");
    r.compare(udp, "udp.dstport", &[text(sample.dst.port())], "");
    r.compare(udp, "udp.payload", &[text(hex(&sample.bytes))], "");
    r.compare(&layers["ip"], "ip.src", &[Want::V4(*sample.src.ip())], "");
    r.compare(&layers["ip"], "ip.dst", &[Want::V4(*sample.dst.ip())], "");

    if !find_all(layers, "_ws.malformed").is_empty() {
        r.fail(format!(
            "tshark reports a malformed packet: {}",
            layers["_ws.malformed"]
        ));
    }
    let expect = &sample.expect;
    let Some(layer) = layers.get(expect.layer) else {
        r.fail(format!(
            "not decoded as {} (frame.protocols = {})",
            expect.layer, layers["frame"]["frame.protocols"]
        ));
        return;
    };

    for (key, wants) in &expect.fields {
        r.compare(layer, key, wants, "");
    }
    for key in &expect.absent {
        let found = find_all(layer, key);
        if !found.is_empty() {
            r.fail(format!(
                "{key}: shown as {found:?}, but the codec wrote no such field"
            ));
        }
    }

    let options = find_all(layer, "portcontrol.option");
    if options.len() != expect.options.len() {
        let shown: Vec<_> = options
            .iter()
            .map(|o| o["portcontrol.option.code"].as_str().unwrap_or("?"))
            .collect();
        let meant: Vec<_> = expect.options.iter().map(|o| o.code).collect();
        r.fail(format!(
            "options: tshark shows codes {shown:?}, the codec meant {meant:?}"
        ));
    }
    for (i, (got, want)) in options.iter().zip(&expect.options).enumerate() {
        let at = format!("option #{} ({}): ", i + 1, want.code);
        r.compare(got, "portcontrol.option.code", &[text(want.code)], &at);
        r.compare(got, "portcontrol.option.reserved", &[text(0)], &at);
        r.compare(got, "portcontrol.option.length", &[text(want.len)], &at);
        // RFC 6887 §7.3: data padded with zeros to a multiple of 4 octets.
        let padding = (4 - want.len % 4) % 4;
        if padding > 0 {
            let zeros = text(hex(&vec![0; padding]));
            r.compare(got, "portcontrol.option.padding", &[zeros], &at);
        } else if got.get("portcontrol.option.padding").is_some() {
            r.fail(format!(
                "{at}padding shown ({}), but the length is a multiple of 4",
                got["portcontrol.option.padding"]
            ));
        }
        for (key, w) in &want.fields {
            r.compare(got, key, std::slice::from_ref(w), &at);
        }
    }

    // The only remarks allowed: options Wireshark does not know.
    for message in find_all(layer, "_ws.expert.message") {
        let known = expect
            .options
            .iter()
            .any(|o| message.as_str() == Some(&format!("Unknown option: {}", o.code)));
        if !known {
            r.fail(format!("unexpected expert info: {message}"));
        }
    }
}

struct Report<'e> {
    sample: &'static str,
    errors: &'e mut Vec<String>,
}

impl Report<'_> {
    fn fail(&mut self, message: String) {
        self.errors.push(format!("[{}] {message}", self.sample));
    }

    /// `key` must occur below `scope` exactly `wants.len()` times, with these values.
    fn compare(&mut self, scope: &Value, key: &str, wants: &[Want], at: &str) {
        let found = find_all(scope, key);
        let meant = wants
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        if found.len() != wants.len() {
            let shown = if found.is_empty() {
                "nothing".to_owned()
            } else {
                format!("{found:?}")
            };
            self.fail(format!(
                "{at}{key}: tshark shows {shown}, the codec meant {meant}"
            ));
            return;
        }
        let all_match = found
            .iter()
            .zip(wants)
            .all(|(got, want)| got.as_str().is_some_and(|g| want.matches(g)));
        if !all_match {
            self.fail(format!(
                "{at}{key}: tshark shows {found:?}, the codec meant {meant}"
            ));
        }
    }
}

/// Every value stored under `key` anywhere below `v`. With `--no-duplicate-keys` a key
/// that occurs several times in one tree node holds an array of its values, in order;
/// that array is flattened.
fn find_all<'v>(v: &'v Value, key: &str) -> Vec<&'v Value> {
    let mut out = Vec::new();
    collect(v, key, &mut out);
    out
}

fn collect<'v>(v: &'v Value, key: &str, out: &mut Vec<&'v Value>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                if k == key {
                    match child {
                        Value::Array(items) => out.extend(items),
                        other => out.push(other),
                    }
                } else {
                    collect(child, key, out);
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                collect(item, key, out);
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------
// Environment.

/// The first line of `tshark --version`; `None` when tshark is missing and the check is
/// skipped on purpose. Missing otherwise, the test fails: an external check that
/// silently passes checks nothing.
fn tshark_version() -> Option<String> {
    let why = match Command::new("tshark").arg("--version").output() {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            return Some(text.lines().next().unwrap_or("tshark").trim().to_owned());
        }
        Ok(out) => format!("`tshark --version` exited with {}", out.status),
        Err(e) => format!("cannot run tshark: {e}"),
    };
    if std::env::var("PCP_SKIP_TSHARK").as_deref() == Ok("1") {
        // Straight to stderr: the test harness captures `eprintln!` of passing tests.
        let _ = writeln!(
            std::io::stderr(),
            "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
             !!! SKIPPED: the Wireshark (tshark) decoder check of the PCP codec did NOT run.\n\
             !!! {why}; PCP_SKIP_TSHARK=1 is set.\n\
             !!! Run ./scripts/test, which installs tshark, to run it.\n\
             !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
        );
        return None;
    }
    panic!(
        "tshark is needed for this test but is not available ({why}).\n\
         This test checks the PCP codec against Wireshark's own PCP dissector.\n\
         Run ./scripts/test, which installs tshark (or `apt-get install tshark`).\n\
         To skip this check deliberately, set PCP_SKIP_TSHARK=1."
    );
}

/// A fresh directory under the system temp dir, removed (with its contents) on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path =
            std::env::temp_dir().join(format!("pcp-proto-tshark-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
