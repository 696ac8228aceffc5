//! Interop with a third-party PCP client: the `crab_nat` crate (crates.io), driving a
//! real `pcpd` process. Every outcome crab_nat reports is checked against pcpd's own
//! view (`GET /mappings`).
//!
//! crab_nat always sends to port 5351 (`crab_nat::GATEWAY_PORT`) from a socket bound to
//! 0.0.0.0, so each test starts pcpd on `127.X.Y.Z:5351` with its own address (see
//! `common::fresh_ip`); the kernel then picks 127.0.0.1 as the source, which is the
//! client address crab_nat must put in its requests.
//!
//! What crab_nat cannot do: it has no way to send options, so it never asks for
//! CHECKPOINT_REQUIRED (192) — its mappings are `not_requested` unless a `force` policy
//! rule checkpoints them anyway (tested below), and it cannot see whether 192 was
//! echoed. Everything else it offers is covered: PCP MAP (UDP, TCP), renew, delete,
//! PEER (create, renew, delete) and NAT-PMP (external address, map, delete).

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU16;
use std::time::Duration;

use common::Pcpd;
use crab_nat::pcp::{self, BaseMapRequest};
use crab_nat::{
    GatewayAddress, InternetProtocol, PortMapping, PortMappingOptions, PortMappingType,
    TimeoutConfig,
};

const PCPD: &str = env!("CARGO_BIN_EXE_pcpd");

/// The source address the kernel gives a socket on 0.0.0.0 talking to 127.0.0.0/8.
const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// pcpd answers at once on loopback: fail fast instead of crab_nat's default retries.
const TIMEOUTS: TimeoutConfig = TimeoutConfig {
    initial_timeout: Duration::from_millis(1500),
    max_retries: 1,
    max_retry_timeout: Some(Duration::from_secs(2)),
};

fn start(config: &str) -> Pcpd {
    common::pcpd(PCPD)
        .config(config)
        .pcp_port(crab_nat::GATEWAY_PORT)
        .start()
}

fn gateway(d: &Pcpd) -> GatewayAddress {
    GatewayAddress::IpV4(d.ip)
}

fn options(lifetime: u32) -> PortMappingOptions {
    PortMappingOptions {
        external_port: None,
        lifetime_seconds: Some(lifetime),
        timeout_config: Some(TIMEOUTS),
    }
}

fn port(p: u16) -> NonZeroU16 {
    NonZeroU16::new(p).expect("non-zero port")
}

const POOL: &str = "[pool]\naddresses = [\"192.0.2.1\"]\n";

/// pcpd's record of `protocol`/`internal_port` agrees with what crab_nat was told.
fn check_listed(d: &Pcpd, m: &PortMapping, protocol: u8, opcode: &str) -> serde_json::Value {
    let v = d.mapping(protocol, m.internal_port().get());
    assert_eq!(v["opcode"], opcode, "{v:#}");
    assert_eq!(v["client"], CLIENT.to_string());
    assert_eq!(v["internal_address"], CLIENT.to_string());
    assert_eq!(v["external_port"], m.external_port().get(), "{v:#}");
    assert_eq!(v["external_address"], "192.0.2.1");
    v
}

#[tokio::test]
async fn crab_nat_maps_udp_and_tcp_over_pcp() {
    let d = start(POOL);
    let udp = PortMapping::new(
        gateway(&d),
        CLIENT,
        InternetProtocol::Udp,
        port(5000),
        options(600),
    )
    .await
    .expect("crab_nat UDP map");
    let tcp = PortMapping::new(
        gateway(&d),
        CLIENT,
        InternetProtocol::Tcp,
        port(5000),
        options(600),
    )
    .await
    .expect("crab_nat TCP map");
    for m in [&udp, &tcp] {
        // PCP was used, not the NAT-PMP fallback, and the address is the pool's.
        match m.mapping_type() {
            PortMappingType::Pcp { external_ip, .. } => {
                assert_eq!(external_ip, IpAddr::from([192, 0, 2, 1]));
            }
            other => panic!("expected PCP, got {other}"),
        }
        assert_eq!(m.lifetime(), 600);
    }
    let v = check_listed(&d, &udp, 17, "map");
    assert_eq!(v["checkpointed"], false);
    assert_eq!(v["checkpoint_reason"], "not_requested");
    check_listed(&d, &tcp, 6, "map");
    assert_eq!(d.mappings().len(), 2);
}

#[tokio::test]
async fn crab_nat_renews_keeping_the_external_port() {
    let d = start(POOL);
    let mut m = PortMapping::new(
        gateway(&d),
        CLIENT,
        InternetProtocol::Udp,
        port(5001),
        options(300),
    )
    .await
    .expect("crab_nat map");
    let before = m.external_port();
    m.renew().await.expect("crab_nat renew");
    assert_eq!(
        m.external_port(),
        before,
        "a renewal keeps the external port"
    );
    assert_eq!(m.lifetime(), 300);
    check_listed(&d, &m, 17, "map");
    assert_eq!(d.mappings().len(), 1, "a renewal creates nothing new");
    assert_eq!(
        d.metric("pcp_requests_total{kind=\"map\",result=\"SUCCESS\"}"),
        Some(2.0)
    );
}

#[tokio::test]
async fn crab_nat_deletes_its_mappings() {
    let d = start(POOL);
    let udp = PortMapping::new(
        gateway(&d),
        CLIENT,
        InternetProtocol::Udp,
        port(5002),
        options(600),
    )
    .await
    .expect("crab_nat UDP map");
    let tcp = PortMapping::new(
        gateway(&d),
        CLIENT,
        InternetProtocol::Tcp,
        port(5003),
        options(600),
    )
    .await
    .expect("crab_nat TCP map");
    assert_eq!(d.mappings().len(), 2);
    udp.try_drop()
        .await
        .map_err(|(e, _)| e)
        .expect("crab_nat UDP delete");
    let left = d.mappings();
    assert_eq!(left.len(), 1, "{left:#?}");
    assert_eq!(left[0]["protocol"], 6);
    tcp.try_drop()
        .await
        .map_err(|(e, _)| e)
        .expect("crab_nat TCP delete");
    assert!(d.mappings().is_empty());
    assert_eq!(d.get_json("/status")["mappings"], 0);
}

#[tokio::test]
async fn crab_nat_peer_create_renew_delete() {
    let d = start(POOL);
    let remote = SocketAddr::from(([198, 51, 100, 20], 443));
    let mut p = pcp::peer_mapping(
        BaseMapRequest::new(gateway(&d), CLIENT, InternetProtocol::Tcp, port(5004)),
        None,
        None,
        remote,
        options(400),
    )
    .await
    .expect("crab_nat PEER");
    assert_eq!(p.external_ip(), IpAddr::from([192, 0, 2, 1]));
    assert_eq!(p.lifetime_seconds(), 400);
    let v = d.mapping(6, 5004);
    assert_eq!(v["opcode"], "peer", "{v:#}");
    assert_eq!(v["remote_address"], "198.51.100.20");
    assert_eq!(v["remote_port"], 443);
    assert_eq!(v["external_port"], p.external_port().get());

    let before = p.external_port();
    p.renew().await.expect("crab_nat PEER renew");
    assert_eq!(p.external_port(), before);
    assert_eq!(d.mappings().len(), 1);
    assert_eq!(
        d.metric("pcp_requests_total{kind=\"peer\",result=\"SUCCESS\"}"),
        Some(2.0)
    );

    // crab_nat "deletes" a PEER with lifetime 0, which RFC 6887 §12.1 does not allow
    // ("it is not possible to reduce the lifetime of a mapping (or delete it, with
    // requested lifetime=0) using PEER"): pcpd answers with the mapping's remaining
    // lifetime, crab_nat reports that as a failed delete, and the mapping stays.
    let external = p.external_port().get();
    let dropped = p.try_drop().await;
    assert!(dropped.is_err(), "crab_nat saw a PEER delete succeed");
    let v = d.mapping(6, 5004);
    assert_eq!(v["external_port"], external, "{v:#}");
    assert!(v["lifetime_remaining"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn crab_nat_mapping_is_checkpointed_by_a_force_rule() {
    // crab_nat cannot send option 192; a force rule checkpoints its SIP mapping anyway.
    let d = start(&format!(
        "{POOL}\n[checkpoint]\nwithout_backup = \"honour\"\n\n[[policy]]\nname = \"sip\"\n\
         action = \"force\"\ninternal_ports = [5060]\n"
    ));
    let sip = PortMapping::new(
        gateway(&d),
        CLIENT,
        InternetProtocol::Udp,
        port(5060),
        options(600),
    )
    .await
    .expect("crab_nat map");
    let other = PortMapping::new(
        gateway(&d),
        CLIENT,
        InternetProtocol::Udp,
        port(5070),
        options(600),
    )
    .await
    .expect("crab_nat map");
    let v = check_listed(&d, &sip, 17, "map");
    assert_eq!(v["checkpointed"], true);
    assert_eq!(v["checkpoint_reason"], "forced");
    let v = check_listed(&d, &other, 17, "map");
    assert_eq!(v["checkpoint_reason"], "not_requested");
}

#[tokio::test]
async fn crab_nat_natpmp_external_address_map_and_delete() {
    let d = start("[pool]\naddresses = [\"2001:db8::1\", \"198.51.100.9\"]\n");
    let ext = crab_nat::natpmp::external_address(gateway(&d), Some(TIMEOUTS))
        .await
        .expect("crab_nat NAT-PMP external address");
    assert_eq!(ext, Ipv4Addr::new(198, 51, 100, 9));

    let m = crab_nat::natpmp::port_mapping(
        gateway(&d),
        InternetProtocol::Udp,
        port(5005),
        options(600),
    )
    .await
    .expect("crab_nat NAT-PMP map");
    assert!(matches!(m.mapping_type(), PortMappingType::NatPmp));
    let v = d.mapping(17, 5005);
    assert_eq!(v["opcode"], "natpmp", "{v:#}");
    // NAT-PMP can only speak of IPv4: the mapping must be on the address it announced.
    assert_eq!(v["external_address"], "198.51.100.9", "{v:#}");
    assert_eq!(v["external_port"], m.external_port().get());
    m.try_drop()
        .await
        .map_err(|(e, _)| e)
        .expect("crab_nat NAT-PMP delete");
    assert!(d.mappings().is_empty());
}
