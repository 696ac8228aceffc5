//! A standby's mirror of replicated mappings (`Server::mirror_upsert`): its one-probe
//! path (an internal endpoint that holds nothing, a free external endpoint) and its
//! general path (replacing, a second PEER of a bound endpoint, a refused endpoint)
//! must leave exactly what adopting the final set into a fresh server leaves.

mod common;

use std::net::IpAddr;

use common::*;
use pcp_dataplane::Op;
use pcp_proto::Filter;
use pcp_server::pool::ExternalEndpoint;
use pcp_server::subscriber::SubscriberId;
use pcp_server::{AdoptError, Effect, Mapping, MappingKey, Origin, Reason, Server, entry_of};

fn mapping(h: u8, port: u16, remote: Option<(IpAddr, u16)>, ext_port: u16) -> Mapping {
    Mapping {
        key: MappingKey {
            internal: host(h),
            protocol: 17,
            internal_port: port,
            remote,
        },
        nonce: [h; 12],
        origin: Origin::Pcp,
        client: host(h),
        external: ExternalEndpoint {
            addr: EXTERNAL,
            protocol: 17,
            port: ext_port,
        },
        expires: START.plus(std::time::Duration::from_secs(600)),
        lifetime: 600,
        subscriber: SubscriberId::Named("replicated".into()),
        checkpoint_requested: true,
        checkpoint: Reason::Requested,
        filters: Box::new([]),
        description: None,
        created: START,
    }
}

fn sorted(it: impl Iterator<Item = Mapping>) -> Vec<Mapping> {
    let mut v: Vec<Mapping> = it.collect();
    v.sort_by_key(|m| m.key);
    v
}

fn installs(fx: &[Effect]) -> Vec<pcp_dataplane::Entry> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::DataPlane(Op::Install(e)) => Some(e.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn mirrored_mappings_are_what_adopting_them_gives() {
    let mut s = Server::new(honour_cfg(), START, 1).unwrap();
    let map = mapping(1, 1000, None, 5000);
    let peer = mapping(1, 1001, Some((remote(1), 80)), 5001);
    // A second PEER of the same internal endpoint shares its external endpoint.
    let peer2 = mapping(1, 1001, Some((remote(2), 443)), 5001);
    let mut extra = mapping(2, 2000, None, 5002);
    extra.client = host(9);
    extra.description = Some("cam".into());
    extra.filters = Box::new([Filter {
        prefix_len: 120,
        remote_port: 0,
        remote_addr: "::ffff:198.51.100.0".parse().unwrap(),
    }]);
    for m in [&map, &peer, &peer2, &extra] {
        let mut fx = Vec::new();
        s.mirror_upsert(m, START, &mut fx).unwrap();
        s.check_invariants().unwrap();
        // The data plane installs exactly this mapping.
        assert_eq!(
            installs(&fx),
            vec![entry_of(&m.key, m.external, &m.filters)],
            "{:?}",
            m.key
        );
    }
    // Replaced with another external endpoint (the internal endpoint is bound).
    let moved = mapping(1, 1000, None, 5003);
    s.mirror_upsert(&moved, START, &mut Vec::new()).unwrap();
    s.check_invariants().unwrap();
    // An external endpoint another internal endpoint holds is refused; nothing changes.
    let clash = mapping(3, 3000, None, 5002);
    let before = sorted(s.mappings());
    assert!(matches!(
        s.mirror_upsert(&clash, START, &mut Vec::new()),
        Err(AdoptError::EndpointUnavailable(_))
    ));
    assert_eq!(sorted(s.mappings()), before);
    s.check_invariants().unwrap();

    let mut r = Server::new(honour_cfg(), START, 2).unwrap();
    for m in [&moved, &peer, &peer2, &extra] {
        r.adopt(m, START, &mut Vec::new()).unwrap();
    }
    assert_eq!(sorted(s.mappings()), sorted(r.mappings()));
    assert_eq!(
        (s.mapping_count(), s.checkpointed_count()),
        (r.mapping_count(), r.checkpointed_count())
    );
    // The old endpoint of the moved mapping went back to the pool: a new mapping may
    // take it.
    s.mirror_upsert(&mapping(4, 4000, None, 5000), START, &mut Vec::new())
        .unwrap();
    s.check_invariants().unwrap();
}
