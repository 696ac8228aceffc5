//! Replays the fuzz corpus (`fuzz/corpus/parse/`) and every saved crash
//! (`fuzz/regressions/`) through `pcp_proto::fuzzing::check_invariants`, the very function
//! the `parse` fuzz target runs, so a plain `cargo test` keeps every input the fuzzer
//! ever tripped on fixed.
//!
//! The seed files are written by this file's ignored test:
//! `cargo test -p pcp-proto --test fuzz_corpus -- --ignored write_seed_corpus`.

use std::net::IpAddr;
use std::panic;
use std::path::{Path, PathBuf};

use pcp_proto::fuzzing::check_invariants;
use pcp_proto::natpmp;
use pcp_proto::{
    AuthenticationBody, AuthenticationTag, Body, Filter, MAX_MESSAGE_LEN, MapBody, Options,
    PaAuthenticationTag, PcpOption, PeerBody, PortSet, Request, Response, ResultCode, protocol,
};
use pcp_testkit::corpus::{self, files, hex};

fn fuzz_dir(sub: &str) -> PathBuf {
    corpus::fuzz_dir(env!("CARGO_MANIFEST_DIR"), sub)
}

/// Runs the invariants over each input; returns the names of those that panicked.
fn failing<'a>(inputs: impl IntoIterator<Item = (String, &'a [u8])>) -> Vec<String> {
    inputs
        .into_iter()
        .filter(|(_, data)| panic::catch_unwind(|| check_invariants(data)).is_err())
        .map(|(name, data)| format!("{name} ({} octets): {}", data.len(), hex(data)))
        .collect()
}

fn replay(dir: &Path) -> (usize, Vec<String>) {
    let paths = files(dir);
    let loaded: Vec<(String, Vec<u8>)> = paths
        .iter()
        .map(|p| {
            let data = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.display().to_string(), data)
        })
        .collect();
    let bad = failing(loaded.iter().map(|(n, d)| (n.clone(), d.as_slice())));
    (loaded.len(), bad)
}

#[test]
fn corpus_and_regressions_hold_the_fuzz_invariants() {
    let (seeds, mut bad) = replay(&fuzz_dir("corpus/parse"));
    assert!(
        seeds >= 10,
        "expected the committed seed corpus in fuzz/corpus/parse, found {seeds} files"
    );
    let (_, bad_regressions) = replay(&fuzz_dir("regressions"));
    bad.extend(bad_regressions);
    assert!(
        bad.is_empty(),
        "{} input(s) violate the fuzz invariants (panic messages above):\n{}",
        bad.len(),
        bad.join("\n")
    );
}

/// The parser a seed is meant for.
#[derive(Debug, Clone, Copy)]
enum Kind {
    PcpRequest,
    PcpResponse,
    NatpmpRequest,
    NatpmpResponse,
}

fn addr(s: &str) -> IpAddr {
    s.parse().expect("address literal")
}

fn map_body(nonce: &[u8; 12], proto: u8, internal: u16, external: u16, ext: &str) -> MapBody {
    MapBody {
        nonce: *nonce,
        protocol: proto,
        internal_port: internal,
        external_port: external,
        external_addr: addr(ext),
    }
}

fn request(lifetime: u32, client: &str, body: Body, options: &[PcpOption<'_>]) -> Vec<u8> {
    emit_request(&Request {
        lifetime,
        client_addr: addr(client),
        body,
        options: Options::from_list(options),
        pa_result_code: ResultCode::Success,
    })
}

fn emit_request(req: &Request<'_>) -> Vec<u8> {
    let mut buf = [0u8; MAX_MESSAGE_LEN];
    let n = req.emit(&mut buf).expect("seed request emits");
    buf[..n].to_vec()
}

fn response(
    result_code: ResultCode,
    lifetime: u32,
    body: Body,
    options: &[PcpOption<'_>],
) -> Vec<u8> {
    let resp = Response {
        result_code,
        lifetime,
        epoch: 123_456,
        body,
        options: Options::from_list(options),
    };
    let mut buf = [0u8; MAX_MESSAGE_LEN];
    let n = resp.emit(&mut buf).expect("seed response emits");
    buf[..n].to_vec()
}

fn natpmp_request(req: natpmp::Request) -> Vec<u8> {
    let mut buf = [0u8; 16];
    let n = req.emit(&mut buf).expect("seed NAT-PMP request emits");
    buf[..n].to_vec()
}

fn natpmp_response(resp: natpmp::Response) -> Vec<u8> {
    let mut buf = [0u8; 16];
    let n = resp.emit(&mut buf).expect("seed NAT-PMP response emits");
    buf[..n].to_vec()
}

/// The hand-made seeds: valid messages of every kind the codec parses.
fn seeds() -> Vec<(&'static str, Kind, Vec<u8>)> {
    use Kind::*;
    let map_v4 = map_body(b"seed-nonce-1", protocol::UDP, 5060, 0, "0.0.0.0");
    let map_v6 = map_body(b"seed-nonce-2", protocol::TCP, 443, 8443, "2001:db8::1");
    let peer = PeerBody {
        mapping: map_body(b"seed-nonce-3", protocol::TCP, 40000, 40000, "198.51.100.7"),
        remote_port: 443,
        remote_addr: addr("203.0.113.9"),
    };
    let filter = Filter {
        prefix_len: 64,
        remote_port: 0,
        remote_addr: addr("2001:db8:1::"),
    };
    let port_set = PortSet {
        size: 16,
        first_internal_port: 6000,
        parity: true,
    };
    vec![
        (
            "pcp-map-request-v4-checkpoint",
            PcpRequest,
            request(
                3600,
                "192.0.2.10",
                Body::Map(map_v4),
                &[PcpOption::CheckpointRequired],
            ),
        ),
        (
            "pcp-map-request-v6-prefer-failure-filter-description-checkpoint",
            PcpRequest,
            request(
                7200,
                "2001:db8::10",
                Body::Map(map_v6),
                &[
                    PcpOption::PreferFailure,
                    PcpOption::Filter(filter),
                    PcpOption::Description("web server"),
                    PcpOption::CheckpointRequired,
                ],
            ),
        ),
        (
            "pcp-map-request-third-party-port-set-checkpoint",
            PcpRequest,
            request(
                600,
                "192.0.2.1",
                Body::Map(map_v4),
                &[
                    PcpOption::ThirdParty(addr("192.0.2.77")),
                    PcpOption::PortSet(port_set),
                    PcpOption::CheckpointRequired,
                ],
            ),
        ),
        (
            "pcp-map-request-delete-all",
            PcpRequest,
            request(
                0,
                "192.0.2.10",
                Body::Map(map_body(b"seed-nonce-4", protocol::ALL, 0, 0, "0.0.0.0")),
                &[],
            ),
        ),
        (
            "pcp-map-request-unknown-optional-200-prefix64",
            PcpRequest,
            request(
                60,
                "192.0.2.10",
                Body::Map(map_v4),
                &[
                    PcpOption::Unknown {
                        code: 200,
                        data: b"abc",
                    },
                    // RFC 7225: Prefix64-Length 12 (a /96), then 64:ff9b::/96 and suffix.
                    PcpOption::Prefix64(&[0, 12, 0, 0x64, 0xff, 0x9b, 0, 0, 0, 0, 0, 0, 0, 0]),
                ],
            ),
        ),
        (
            "pcp-peer-request-checkpoint-description",
            PcpRequest,
            request(
                120,
                "192.0.2.10",
                Body::Peer(peer),
                &[PcpOption::CheckpointRequired, PcpOption::Description("sip")],
            ),
        ),
        (
            "pcp-announce-request",
            PcpRequest,
            request(0, "192.0.2.10", Body::Announce, &[]),
        ),
        (
            "pcp-authentication-initiation-nonce",
            PcpRequest,
            emit_request(&Request {
                lifetime: 0,
                client_addr: addr("192.0.2.10"),
                body: Body::Authentication(AuthenticationBody {
                    session_id: 0,
                    sequence_number: 0,
                }),
                options: Options::from_list(&[PcpOption::Nonce(0x0102_0304)]),
                pa_result_code: ResultCode::Initiation,
            }),
        ),
        (
            "pcp-authentication-server-eap-algorithms",
            PcpResponse,
            response(
                ResultCode::AuthenticationRequest,
                0,
                Body::Authentication(AuthenticationBody {
                    session_id: 0xdead_beef,
                    sequence_number: 0,
                }),
                &[
                    PcpOption::Nonce(0x0102_0304),
                    PcpOption::Prf(5),
                    PcpOption::MacAlgorithm(12),
                    PcpOption::IdIndicator("example.net"),
                    // EAP-Request/Identity.
                    PcpOption::EapPayload(&[1, 1, 0, 5, 1]),
                ],
            ),
        ),
        (
            "pcp-authentication-client-succeeded-tagged",
            PcpRequest,
            emit_request(&Request {
                lifetime: 0,
                client_addr: addr("2001:db8::10"),
                body: Body::Authentication(AuthenticationBody {
                    session_id: 0xdead_beef,
                    sequence_number: 7,
                }),
                options: Options::from_list(&[
                    PcpOption::Prf(5),
                    PcpOption::MacAlgorithm(12),
                    PcpOption::PaAuthenticationTag(PaAuthenticationTag {
                        key_id: 1,
                        mac: &[0xaa; 16],
                    }),
                ]),
                pa_result_code: ResultCode::AuthenticationSucceeded,
            }),
        ),
        (
            "pcp-authentication-server-succeeded-lifetime-tagged",
            PcpResponse,
            response(
                ResultCode::AuthenticationSucceeded,
                0,
                Body::Authentication(AuthenticationBody {
                    session_id: 0xdead_beef,
                    sequence_number: 7,
                }),
                &[
                    PcpOption::SessionLifetime(3600),
                    PcpOption::PaAuthenticationTag(PaAuthenticationTag {
                        key_id: 1,
                        mac: &[0x55; 16],
                    }),
                ],
            ),
        ),
        (
            "pcp-authentication-ack",
            PcpRequest,
            emit_request(&Request {
                lifetime: 0,
                client_addr: addr("192.0.2.10"),
                body: Body::Authentication(AuthenticationBody {
                    session_id: 0xdead_beef,
                    sequence_number: 3,
                }),
                options: Options::from_list(&[PcpOption::ReceivedPak(2)]),
                pa_result_code: ResultCode::AuthenticationReply,
            }),
        ),
        (
            "pcp-map-request-checkpoint-authentication-tag",
            PcpRequest,
            request(
                3600,
                "192.0.2.10",
                Body::Map(map_v4),
                &[
                    PcpOption::CheckpointRequired,
                    PcpOption::AuthenticationTag(AuthenticationTag {
                        session_id: 0xdead_beef,
                        sequence_number: 42,
                        key_id: 1,
                        mac: &[0x11; 16],
                    }),
                ],
            ),
        ),
        (
            "pcp-map-response-success-checkpoint",
            PcpResponse,
            response(
                ResultCode::Success,
                3600,
                Body::Map(map_body(
                    b"seed-nonce-1",
                    protocol::UDP,
                    5060,
                    62000,
                    "198.51.100.1",
                )),
                &[PcpOption::CheckpointRequired],
            ),
        ),
        (
            "pcp-peer-response-success-checkpoint",
            PcpResponse,
            response(
                ResultCode::Success,
                120,
                Body::Peer(peer),
                &[PcpOption::CheckpointRequired],
            ),
        ),
        (
            "pcp-map-response-no-resources",
            PcpResponse,
            response(ResultCode::NoResources, 30, Body::Map(map_v6), &[]),
        ),
        (
            "pcp-map-response-unknown-mandatory-99",
            PcpResponse,
            response(
                ResultCode::Success,
                3600,
                Body::Map(map_v4),
                &[PcpOption::Unknown {
                    code: 99,
                    data: &[7; 8],
                }],
            ),
        ),
        (
            "pcp-announce-response",
            PcpResponse,
            response(ResultCode::Success, 0, Body::Announce, &[]),
        ),
        (
            "natpmp-external-address-request",
            NatpmpRequest,
            natpmp_request(natpmp::Request::ExternalAddress),
        ),
        (
            "natpmp-map-udp-request",
            NatpmpRequest,
            natpmp_request(natpmp::Request::Map(natpmp::MapRequest {
                protocol: natpmp::Protocol::Udp,
                internal_port: 5060,
                suggested_external_port: 5060,
                lifetime: 7200,
            })),
        ),
        (
            "natpmp-external-address-response",
            NatpmpResponse,
            natpmp_response(natpmp::Response::ExternalAddress {
                result: natpmp::ResultCode::Success,
                epoch: 99,
                external_addr: "198.51.100.1".parse().expect("v4"),
            }),
        ),
        (
            "natpmp-map-tcp-response",
            NatpmpResponse,
            natpmp_response(natpmp::Response::Map {
                protocol: natpmp::Protocol::Tcp,
                result: natpmp::ResultCode::Success,
                epoch: 99,
                internal_port: 22,
                external_port: 2222,
                lifetime: 3600,
            }),
        ),
        (
            "natpmp-error-response-unsupported-opcode",
            NatpmpResponse,
            natpmp_response(natpmp::Response::Error {
                request_opcode: 5,
                result: natpmp::ResultCode::UnsupportedOpcode,
                epoch: 99,
            }),
        ),
    ]
}

fn parses_as(kind: Kind, data: &[u8]) -> bool {
    match kind {
        Kind::PcpRequest => Request::parse(data).is_ok(),
        Kind::PcpResponse => Response::parse(data).is_ok(),
        Kind::NatpmpRequest => natpmp::Request::parse(data).is_ok(),
        Kind::NatpmpResponse => natpmp::Response::parse(data).is_ok(),
    }
}

#[test]
fn seeds_parse_hold_the_invariants_and_are_committed() {
    let seeds = seeds();
    for (name, kind, data) in &seeds {
        assert!(
            parses_as(*kind, data),
            "seed {name} does not parse as {kind:?}"
        );
    }
    let bad = failing(seeds.iter().map(|(n, _, d)| (n.to_string(), d.as_slice())));
    assert!(
        bad.is_empty(),
        "seeds violate the invariants:\n{}",
        bad.join("\n")
    );
    let dir = fuzz_dir("corpus/parse");
    for (name, _, data) in &seeds {
        let on_disk = std::fs::read(dir.join(name)).ok();
        assert!(
            on_disk.as_deref() == Some(data.as_slice()),
            "fuzz/corpus/parse/{name} is missing or stale; regenerate with \
             `cargo test -p pcp-proto --test fuzz_corpus -- --ignored write_seed_corpus`"
        );
    }
}

/// Writes the seeds into `fuzz/corpus/parse/` (run by hand after changing them).
#[test]
#[ignore = "writes the seed files; run by hand"]
fn write_seed_corpus() {
    let dir = fuzz_dir("corpus/parse");
    std::fs::create_dir_all(&dir).expect("create corpus dir");
    for (name, _, data) in seeds() {
        std::fs::write(dir.join(name), data).expect("write seed");
    }
}
