//! Group commit's take-back: a shell serves several requests, then their common data
//! plane batch fails. Taking every request back through its journal, last first, must
//! leave the server exactly as it was before the group — mappings (endpoints,
//! lifetimes, checkpoints, filters), accounting, host exposure — and the take-back's
//! replication records must cancel the requests' own (the shell withholds both).

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use common::*;
use pcp_proto::{Filter, PcpOption, natpmp, protocol};
use pcp_server::{Change, Effect, Mapping, MappingKey, Server, Time};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Step {
    Pcp {
        host: u8,
        tcp: bool,
        port: u16,
        peer: bool,
        lifetime: u32,
        wrong_nonce: bool,
        cp: bool,
        suggest: u16,
        filter: Option<u8>,
    },
    DeleteAll {
        host: u8,
    },
    NatPmp {
        host: u8,
        port: u16,
        lifetime: u32,
    },
}

fn step() -> impl Strategy<Value = Step> {
    let pcp = (
        (1..=3u8, prop::bool::weighted(0.3), 5000..5004u16),
        prop::bool::weighted(0.2),
        prop_oneof![2 => Just(0u32), 8 => prop::sample::select(vec![120u32, 3600])],
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.5),
        prop_oneof![3 => Just(0u16), 1 => 1024..1040u16],
        prop::option::weighted(0.3, 0..3u8),
    )
        .prop_map(
            |((host, tcp, port), peer, lifetime, wrong_nonce, cp, suggest, filter)| Step::Pcp {
                host,
                tcp,
                port,
                peer,
                lifetime,
                wrong_nonce,
                cp,
                suggest,
                filter,
            },
        );
    prop_oneof![
        10 => pcp,
        1 => (1..=3u8).prop_map(|host| Step::DeleteAll { host }),
        2 => (1..=3u8, prop_oneof![4 => 5000..5004u16, 1 => Just(0u16)], prop::sample::select(vec![0u32, 3600]))
            .prop_map(|(host, port, lifetime)| Step::NatPmp { host, port, lifetime }),
    ]
}

fn datagram(s: &Step) -> (Vec<u8>, IpAddr) {
    match *s {
        Step::Pcp {
            host: h,
            tcp,
            port,
            peer,
            lifetime,
            wrong_nonce,
            cp,
            suggest,
            filter,
        } => {
            let mut r = if peer {
                Req::peer(host(h), port, remote(1), 80)
            } else {
                Req::map(host(h), port)
            };
            r = r
                .lifetime(lifetime)
                .nonce(if wrong_nonce { [0xEE; 12] } else { [h; 12] })
                .protocol(if tcp { protocol::TCP } else { protocol::UDP });
            if suggest != 0 {
                r = r.suggest(EXTERNAL, suggest);
            }
            if cp {
                r = r.cp();
            }
            if let Some(f) = filter {
                r = r.opt(PcpOption::Filter(Filter {
                    prefix_len: if f == 0 { 0 } else { 128 },
                    remote_port: 0,
                    remote_addr: remote(f),
                }));
            }
            (r.bytes(), host(h))
        }
        Step::DeleteAll { host: h } => (
            Req::map(host(h), 0)
                .protocol(0)
                .lifetime(0)
                .nonce([h; 12])
                .bytes(),
            host(h),
        ),
        Step::NatPmp {
            host: h,
            port,
            lifetime,
        } => (
            natpmp_map(natpmp::Protocol::Udp, port, 0, lifetime),
            host(h),
        ),
    }
}

/// What must come back exactly.
#[derive(Debug, PartialEq)]
struct Snapshot {
    mappings: HashMap<MappingKey, Mapping>,
    checkpointed: u64,
    exposed: Vec<bool>,
    subscribers: Vec<(String, u32, u32)>,
    /// Checkpoint rate tokens (in millionths) of every subscriber whose bucket is not
    /// full: a taken-back checkpoint costs nothing.
    tokens: Vec<(String, i64)>,
}

fn snapshot(s: &Server, now: Time) -> Snapshot {
    let mut tokens: Vec<(String, i64)> = s
        .subscribers()
        .map(|(id, st, tier)| {
            let t = st
                .bucket
                .tokens(tier.checkpoint_rate, tier.checkpoint_burst, now);
            (
                format!("{id:?}"),
                (t * 1e6).round() as i64,
                tier.checkpoint_burst,
            )
        })
        .filter(|(_, t, burst)| *t < i64::from(*burst) * 1_000_000)
        .map(|(id, t, _)| (id, t))
        .collect();
    tokens.sort();
    let mut subscribers: Vec<(String, u32, u32)> = s
        .subscribers()
        .map(|(id, st, _)| (format!("{id:?}"), st.mappings, st.checkpointed))
        .filter(|(_, m, _)| *m > 0)
        .collect();
    subscribers.sort();
    Snapshot {
        mappings: s.mappings().map(|m| (m.key, m)).collect(),
        checkpointed: s.checkpointed_count(),
        exposed: (1..=3).map(|h| s.host_unprotected(host(h))).collect(),
        subscribers,
        tokens,
    }
}

/// The backup's copy after `records`.
fn replay(copy: &mut HashMap<MappingKey, Mapping>, records: &[Effect]) {
    for e in records {
        match e {
            Effect::Replicate(Change::Upsert(m)) => {
                copy.insert(m.key, (**m).clone());
            }
            Effect::Replicate(Change::Remove(k)) => {
                copy.remove(k);
            }
            _ => {}
        }
    }
}

fn run(history: &[Step], group: &[Step]) -> Result<(), TestCaseError> {
    let mut server = Server::new(honour_cfg(), START, 7).unwrap();
    let mut reply = [0u8; 1100];
    let mut effects = Vec::new();
    let mut now = START;
    for s in history {
        let (d, src) = datagram(s);
        server.handle(
            &d,
            SocketAddr::new(src, CLIENT_PORT),
            now,
            &mut reply,
            &mut effects,
        );
        now = Time(now.0 + 1500);
    }
    // Expiry before the group, as the shell does.
    server.expire(now, &mut effects);
    effects.clear();
    let before = snapshot(&server, now);
    let mut copy: HashMap<MappingKey, Mapping> = server
        .mappings()
        .filter(|m| m.is_checkpointed())
        .map(|m| (m.key, m))
        .collect();
    let copy_before = copy.clone();
    let mut journals = Vec::new();
    for s in group {
        let (d, src) = datagram(s);
        server.handle(
            &d,
            SocketAddr::new(src, CLIENT_PORT),
            now,
            &mut reply,
            &mut effects,
        );
        journals.push(server.take_journal());
    }
    let mut undone = Vec::new();
    for j in journals.into_iter().rev() {
        server.take_back(j, now, &mut undone);
    }
    server
        .check_invariants()
        .map_err(|e| TestCaseError::fail(format!("invariants: {e}")))?;
    prop_assert_eq!(
        snapshot(&server, now),
        before,
        "the group is taken back exactly"
    );
    replay(&mut copy, &effects);
    replay(&mut copy, &undone);
    prop_assert_eq!(
        copy,
        copy_before,
        "the take-back's records cancel the group's"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(512),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn a_group_taken_back_last_first_leaves_the_server_as_it_was(
        history in prop::collection::vec(step(), 0..24),
        group in prop::collection::vec(step(), 1..12),
    ) {
        run(&history, &group)?;
    }
}

/// A checkpoint taken back (its group's data plane batch failed) gives its rate token
/// back: served again alone, the same request is checkpointed, even with a burst of
/// one. Before the refund, the take-back left the bucket empty and the second serving
/// answered without option 192 (reason `rate`).
#[test]
fn a_taken_back_checkpoint_refunds_its_rate_token() {
    let mut cfg = honour_cfg();
    for tier in cfg.tiers.values_mut() {
        tier.checkpoint_burst = 1;
        tier.checkpoint_rate = 0.001;
    }
    let mut server = Server::new(cfg, START, 7).unwrap();
    let mut reply = [0u8; 1100];
    let mut effects = Vec::new();
    let d = Req::map(host(1), 5000).cp().bytes();
    let src = SocketAddr::new(host(1), CLIENT_PORT);
    let r = server.handle(&d, src, START, &mut reply, &mut effects);
    let n = match r {
        pcp_server::Reply::Hold(n) | pcp_server::Reply::Send(n) => n,
        other => panic!("{other:?}"),
    };
    let j = server.take_journal();
    assert!(
        Resp {
            bytes: reply[..n].to_vec()
        }
        .has_checkpoint(),
        "the first serving checkpoints"
    );
    server.take_back(j, START, &mut effects);
    effects.clear();
    let r = server.handle_again(&d, src, None, START, &mut reply, &mut effects);
    let n = match r {
        pcp_server::Reply::Hold(n) | pcp_server::Reply::Send(n) => n,
        other => panic!("{other:?}"),
    };
    assert!(
        Resp {
            bytes: reply[..n].to_vec()
        }
        .has_checkpoint(),
        "served again after the take-back, still checkpointed (the token came back)"
    );
    server.check_invariants().unwrap();
}

/// A request the data plane refused ([`Server::refuse`]) gives its token back too.
#[test]
fn a_refused_checkpoint_refunds_its_rate_token() {
    let mut cfg = honour_cfg();
    for tier in cfg.tiers.values_mut() {
        tier.checkpoint_burst = 1;
        tier.checkpoint_rate = 0.001;
    }
    let mut server = Server::new(cfg, START, 7).unwrap();
    let mut reply = [0u8; 1100];
    let mut effects = Vec::new();
    let d = Req::map(host(1), 5000).cp().bytes();
    let src = SocketAddr::new(host(1), CLIENT_PORT);
    server.handle(&d, src, START, &mut reply, &mut effects);
    server.refuse(
        &d,
        src,
        START,
        pcp_proto::ResultCode::NetworkFailure,
        &mut reply,
        &mut effects,
    );
    effects.clear();
    let r = server.handle(&d, src, START, &mut reply, &mut effects);
    let n = match r {
        pcp_server::Reply::Hold(n) | pcp_server::Reply::Send(n) => n,
        other => panic!("{other:?}"),
    };
    assert!(
        Resp {
            bytes: reply[..n].to_vec()
        }
        .has_checkpoint(),
        "the retry after a refusal is checkpointed (the token came back)"
    );
}
