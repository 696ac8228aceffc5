//! A reload that moves a host to another subscriber moves its mappings (and their
//! accounting) at their next renewal; NAT-PMP results are counted under the PCP result
//! with the same meaning.

use std::net::{IpAddr, SocketAddr};

use pcp_proto::{Body, MapBody, Options, PcpOption, Request, ResultCode};
use pcp_server::config::{SubscriberEntry, TierConfig, WithoutBackup};
use pcp_server::stats::RequestKind;
use pcp_server::{Effect, Reply, Server, ServerConfig, Time};

fn map(host: IpAddr, port: u16, buf: &mut [u8]) -> usize {
    let opts = [PcpOption::CheckpointRequired];
    Request {
        lifetime: 600,
        client_addr: host,
        body: Body::Map(MapBody {
            nonce: [7; 12],
            protocol: 17,
            internal_port: port,
            external_port: 0,
            external_addr: IpAddr::from([0, 0, 0, 0]),
        }),
        options: Options::from_list(&opts),
        pa_result_code: ResultCode::Success,
    }
    .emit(buf)
    .unwrap()
}

fn send(s: &mut Server, host: IpAddr, port: u16, now: Time) {
    let mut req = [0u8; 128];
    let mut reply = [0u8; 1100];
    let n = map(host, port, &mut req);
    let mut fx: Vec<Effect> = Vec::new();
    let r = s.handle(
        &req[..n],
        SocketAddr::new(host, 1),
        now,
        &mut reply,
        &mut fx,
    );
    assert!(matches!(r, Reply::Send(_)));
}

#[test]
fn reload_moves_a_host_to_its_new_subscriber_on_renewal() {
    let mut cfg = ServerConfig::default();
    cfg.checkpoint.without_backup = WithoutBackup::Honour;
    let host: IpAddr = "10.0.0.1".parse().unwrap();
    let mut s = Server::new(cfg.clone(), Time(0), 1).unwrap();
    send(&mut s, host, 5000, Time(0));
    send(&mut s, host, 5001, Time(0));
    let subs: Vec<String> = s.subscribers().map(|(id, _, _)| id.to_string()).collect();
    assert_eq!(subs, ["10.0.0.1/32"]);

    cfg.tiers.insert(
        "gold".into(),
        TierConfig {
            mapping_quota: 10,
            checkpoint_quota: 10,
            checkpoint_rate: 10.0,
            checkpoint_burst: 10,
        },
    );
    cfg.subscribers.entries.push(SubscriberEntry {
        prefixes: vec!["10.0.0.0/24".parse().unwrap()],
        identities: vec![],
        id: "acme".into(),
        tier: "gold".into(),
    });
    s.reload(cfg).unwrap();
    send(&mut s, host, 5000, Time(1000));
    s.check_invariants().unwrap();
    let mut subs: Vec<(String, u32, u32, String)> = s
        .subscribers()
        .map(|(id, st, _)| {
            (
                id.to_string(),
                st.mappings,
                st.checkpointed,
                st.tier.to_string(),
            )
        })
        .collect();
    subs.sort();
    assert_eq!(
        subs,
        [
            ("10.0.0.1/32".into(), 1, 1, "default".into()),
            ("acme".into(), 1, 1, "gold".into())
        ]
    );
    send(&mut s, host, 5001, Time(2000));
    s.check_invariants().unwrap();
    let subs: Vec<String> = s.subscribers().map(|(id, _, _)| id.to_string()).collect();
    assert_eq!(subs, ["acme"]);
}

#[test]
fn natpmp_results_are_counted_by_meaning() {
    let mut s = Server::new(ServerConfig::default(), Time(0), 1).unwrap();
    let mut reply = [0u8; 64];
    let mut fx: Vec<Effect> = Vec::new();
    let src = SocketAddr::new("10.0.0.2".parse().unwrap(), 1);
    // Opcode 3 is not a NAT-PMP opcode: "unsupported opcode" (5).
    s.handle(&[0, 3], src, Time(0), &mut reply, &mut fx);
    let counts: Vec<_> = s.stats().answered_counts().collect();
    assert_eq!(counts, [(RequestKind::NatPmp, ResultCode::UnsuppOpcode, 1)]);
}

#[test]
fn a_forced_checkpoint_that_loses_its_rule_must_fit_the_quota() {
    use pcp_server::config::{PolicyRule, RuleAction};
    let mut cfg = ServerConfig::default();
    cfg.checkpoint.without_backup = WithoutBackup::Honour;
    let t = cfg.tiers.get_mut("default").unwrap();
    t.checkpoint_quota = 1;
    cfg.policy = vec![PolicyRule {
        name: "force-6000".into(),
        action: RuleAction::Force,
        tiers: vec![],
        subscribers: vec![],
        identities: vec![],
        internal_prefixes: vec![],
        opcodes: vec![],
        protocols: vec![],
        internal_ports: vec!["6000".parse().unwrap()],
        remote_ports: vec![],
        remote_prefixes: vec![],
    }];
    let host: IpAddr = "10.0.0.1".parse().unwrap();
    let mut s = Server::new(cfg.clone(), Time(0), 1).unwrap();
    send(&mut s, host, 5000, Time(0));
    send(&mut s, host, 6000, Time(0));
    assert_eq!(
        s.checkpointed_count(),
        2,
        "one asked for, one forced past the quota"
    );
    cfg.policy.clear();
    s.reload(cfg).unwrap();
    send(&mut s, host, 6000, Time(1000));
    let m = s.mappings().find(|m| m.key.internal_port == 6000).unwrap();
    assert_eq!(m.checkpoint, pcp_server::Reason::Quota);
    assert_eq!(s.checkpointed_count(), 1);
    s.check_invariants().unwrap();
}
