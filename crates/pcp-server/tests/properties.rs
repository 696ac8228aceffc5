//! Property tests: random sequences of PCP MAP/PEER and NAT-PMP requests, time advances
//! with expiry, backup status changes and policy reloads, with the server's invariants
//! and the RFC 7767 limits checked after every step.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use common::*;
use pcp_dataplane::{Direction, Entry, Op};
use pcp_proto::{ResultCode, natpmp, protocol};
use pcp_server::config::{RuleAction, SubscriberEntry, TierConfig};
use pcp_server::subscriber::SubscriberId;
use pcp_server::{
    BackupStatus, Change, Effect, Mapping, MappingKey, Reason, ServerConfig, Time, entry_of,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

// ---------------------------------------------------------------------------------------
// The simulated deployment.

/// Pool ports: 8 per protocol, so exhaustion happens.
const PORT_MIN: u16 = 20_000;
const PORT_MAX: u16 = 20_007;
/// Node checkpoint capacity.
const CAPACITY: u64 = 8;
/// Internal ports the hosts use; 5060 is forced, 5061 denied when the deny rule is on.
const PORTS: [u16; 4] = [5000, 5001, 5060, 5061];

fn hosts() -> [IpAddr; 4] {
    [
        host(1),
        host(2),
        "10.0.1.1".parse().unwrap(),
        "10.0.1.2".parse().unwrap(),
    ]
}

fn remotes() -> [(IpAddr, u16); 2] {
    [(remote(1), 80), (remote(2), 443)]
}

/// Quotas above the bursts, so that the rate is what binds first.
const DEFAULT_TIER: TierConfig = TierConfig {
    mapping_quota: 6,
    checkpoint_quota: 3,
    checkpoint_rate: 0.1,
    checkpoint_burst: 2,
};

const GOLD_TIER: TierConfig = TierConfig {
    mapping_quota: 8,
    checkpoint_quota: 4,
    checkpoint_rate: 0.25,
    checkpoint_burst: 3,
};

fn config(deny: bool) -> ServerConfig {
    let mut cfg = honour_cfg();
    cfg.pool.port_min = PORT_MIN;
    cfg.pool.port_max = PORT_MAX;
    cfg.checkpoint.capacity = CAPACITY;
    cfg.tiers.insert("default".into(), DEFAULT_TIER);
    cfg.tiers.insert("gold".into(), GOLD_TIER);
    cfg.subscribers.entries = vec![SubscriberEntry {
        prefixes: vec!["10.0.1.0/24".parse().unwrap()],
        identities: vec![],
        id: "acme".into(),
        tier: "gold".into(),
    }];
    cfg.policy = vec![port_rule("sip", RuleAction::Force, 5060)];
    if deny {
        cfg.policy
            .push(port_rule("no-5061", RuleAction::Deny, 5061));
    }
    cfg
}

fn tier_of(id: &SubscriberId) -> TierConfig {
    match id {
        SubscriberId::Named(n) if &**n == "acme" => GOLD_TIER,
        _ => DEFAULT_TIER,
    }
}

// ---------------------------------------------------------------------------------------
// Operations.

#[derive(Debug, Clone)]
enum Step {
    /// A PCP MAP (peer = None) or PEER request.
    Pcp {
        host: usize,
        tcp: bool,
        port: u16,
        peer: Option<usize>,
        lifetime: u32,
        wrong_nonce: bool,
        cp: bool,
        suggest: u16,
    },
    /// A PCP delete-all (protocol 0, internal port 0, lifetime 0) of the host's MAPs.
    PcpDeleteAll { host: usize, wrong_nonce: bool },
    /// A NAT-PMP map request (port 0 and lifetime 0: delete all).
    NatPmp {
        host: usize,
        tcp: bool,
        port: u16,
        lifetime: u32,
    },
    /// Advance the clock by this many milliseconds, then expire.
    Advance(u64),
    /// Change the backup status.
    Backup(BackupStatus),
    /// Reload the configuration with or without the deny rule.
    Reload { deny: bool },
}

fn step() -> impl Strategy<Value = Step> {
    let pcp = (
        0..4usize,
        prop::bool::weighted(0.3),
        prop::sample::select(PORTS.to_vec()),
        prop::option::weighted(0.2, 0..2usize),
        prop_oneof![2 => Just(0u32), 8 => prop::sample::select(vec![60u32, 120, 300, 3600])],
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.6),
        prop_oneof![6 => Just(0u16), 3 => PORT_MIN..=PORT_MAX, 1 => Just(30_000u16)],
    )
        .prop_map(
            |(host, tcp, port, peer, lifetime, wrong_nonce, cp, suggest)| Step::Pcp {
                host,
                tcp,
                port,
                peer,
                lifetime,
                wrong_nonce,
                cp,
                suggest,
            },
        );
    let natpmp = (
        0..4usize,
        any::<bool>(),
        prop_oneof![4 => prop::sample::select(PORTS.to_vec()), 1 => Just(0u16)],
        prop::sample::select(vec![0u32, 120, 3600]),
    )
        .prop_map(|(host, tcp, port, lifetime)| Step::NatPmp {
            host,
            tcp,
            port,
            lifetime,
        });
    prop_oneof![
        10 => pcp,
        2 => natpmp,
        1 => (0..4usize, prop::bool::weighted(0.1))
            .prop_map(|(host, wrong_nonce)| Step::PcpDeleteAll { host, wrong_nonce }),
        3 => prop_oneof![3 => 0..3_000u64, 1 => 100_000..400_000u64].prop_map(Step::Advance),
        1 => prop::sample::select(vec![BackupStatus::None, BackupStatus::NotReady, BackupStatus::Ready])
            .prop_map(Step::Backup),
        1 => any::<bool>().prop_map(|deny| Step::Reload { deny }),
    ]
}

// ---------------------------------------------------------------------------------------
// The model the properties are checked against.

struct World {
    h: Harness,
    /// Checkpoint grants (not checkpointed before → `Requested` after) per subscriber.
    grants: HashMap<SubscriberId, Vec<Time>>,
    /// The data plane, as the effects built it.
    dataplane: HashMap<(Direction, u8, SocketAddr), Entry>,
    /// The backup's copy, as the replication effects built it.
    replica: HashMap<MappingKey, Mapping>,
    /// Per host, whether it holds unprotected mappings, as `Change::Host` told.
    unprotected: HashMap<IpAddr, bool>,
    /// Whether the rate property counts grants across a subscriber losing all its state.
    strict_rate: bool,
}

fn dp_id(e: &Entry) -> (Direction, u8, SocketAddr) {
    (e.direction, e.protocol, e.external)
}

fn nonce_of(host: usize, wrong: bool) -> [u8; 12] {
    if wrong {
        [0xEE; 12]
    } else {
        [host as u8 + 1; 12]
    }
}

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(TestCaseError::fail(format!($($fmt)+)));
        }
    };
}

impl World {
    fn new(strict_rate: bool) -> World {
        World {
            h: Harness::new(config(false)),
            grants: HashMap::new(),
            dataplane: HashMap::new(),
            replica: HashMap::new(),
            unprotected: HashMap::new(),
            strict_rate,
        }
    }

    fn apply_effects(&mut self) {
        for e in &self.h.effects {
            match e {
                Effect::DataPlane(Op::Install(entry)) => {
                    self.dataplane.insert(dp_id(entry), entry.clone());
                }
                Effect::DataPlane(Op::Remove(entry)) => {
                    self.dataplane.remove(&dp_id(entry));
                }
                Effect::Replicate(Change::Upsert(m)) => {
                    self.replica.insert(m.key, (**m).clone());
                }
                Effect::Replicate(Change::Remove(k)) => {
                    self.replica.remove(k);
                }
                Effect::Replicate(Change::Host { host, unprotected }) => {
                    self.unprotected.insert(*host, *unprotected);
                }
            }
        }
    }

    fn epoch(&self) -> u32 {
        ((self.h.now.0 - START.0) / 1000) as u32
    }

    fn step(&mut self, s: &Step) -> Result<(), TestCaseError> {
        match *s {
            Step::Pcp {
                host,
                tcp,
                port,
                peer,
                lifetime,
                wrong_nonce,
                cp,
                suggest,
            } => self.pcp(host, tcp, port, peer, lifetime, wrong_nonce, cp, suggest)?,
            Step::PcpDeleteAll { host, wrong_nonce } => self.pcp_delete_all(host, wrong_nonce)?,
            Step::NatPmp {
                host,
                tcp,
                port,
                lifetime,
            } => self.natpmp(host, tcp, port, lifetime)?,
            Step::Advance(ms) => {
                self.h.advance_ms(ms);
                self.h.expire();
                self.apply_effects();
                let now = self.h.now;
                ensure!(
                    self.h.server.mappings().all(|m| m.expires > now),
                    "a mapping outlived its lifetime"
                );
                ensure!(
                    self.h.server.next_timeout().is_none_or(|t| t > now),
                    "next_timeout in the past after expire"
                );
            }
            Step::Backup(b) => self.h.server.set_backup_status(b),
            Step::Reload { deny } => self
                .h
                .server
                .reload(config(deny))
                .map_err(|e| TestCaseError::fail(format!("reload: {e}")))?,
        }
        self.check()
    }

    #[allow(clippy::too_many_arguments)]
    fn pcp(
        &mut self,
        host: usize,
        tcp: bool,
        port: u16,
        peer: Option<usize>,
        lifetime: u32,
        wrong_nonce: bool,
        cp: bool,
        suggest: u16,
    ) -> Result<(), TestCaseError> {
        let src = hosts()[host];
        let mut req = match peer {
            None => Req::map(src, port),
            Some(p) => {
                let (ra, rp) = remotes()[p];
                Req::peer(src, port, ra, rp)
            }
        }
        .protocol(if tcp { protocol::TCP } else { protocol::UDP })
        .lifetime(lifetime)
        .nonce(nonce_of(host, wrong_nonce));
        if suggest != 0 {
            req = req.suggest(EXTERNAL, suggest);
        }
        if cp {
            req = req.cp();
        }
        let key = req.key();
        let before = self.h.mapping(&key);
        let r = self.h.pcp(&req);
        self.apply_effects();
        let after = self.h.mapping(&key);

        ensure!(
            r.epoch() == self.epoch(),
            "epoch {} != {}",
            r.epoch(),
            self.epoch()
        );
        // RFC 7767 §3.2: never echo 192 unless asked; echo exactly when honoured.
        let echoed = r.result() == ResultCode::Success && r.has_checkpoint();
        ensure!(!echoed || cp, "192 echoed to a request without it: {req:?}");
        // A reply promising a checkpoint, or making a protected host exposed, waits
        // for a ready backup's acknowledgement; the record of a host that gets its
        // first unprotected mapping while it has no checkpointed one is not waited for.
        let ready = self.h.server.backup_status() == BackupStatus::Ready;
        let exposes = self.h.effects.iter().any(|e| {
            matches!(
                e,
                Effect::Replicate(Change::Host {
                    host,
                    unprotected: true,
                }) if self.h.server.host_exposed(*host)
            )
        });
        ensure!(
            self.h.held == ((echoed || exposes) && ready),
            "held {} but echoed {echoed} with backup {:?}",
            self.h.held,
            self.h.server.backup_status()
        );
        // A MAP with lifetime 0 deletes; a PEER with lifetime 0 may delete (as the server
        // does today) or keep the mapping (RFC 6887 §12.1): both are checked as they come.
        let deleted = r.result() == ResultCode::Success && after.is_none();
        ensure!(
            !deleted || lifetime == 0,
            "SUCCESS with lifetime {lifetime} but no mapping: {req:?}"
        );
        if r.result() == ResultCode::Success && !deleted {
            let m = after.as_ref().expect("not deleted");
            ensure!(
                lifetime > 0 || req.peer.is_some(),
                "MAP delete kept the mapping"
            );
            ensure!(
                echoed == (cp && m.is_checkpointed()),
                "echo {echoed} but requested {cp} and mapping {:?}",
                m.checkpoint
            );
            ensure!(
                r.external() == (m.external.addr, m.external.port),
                "response external {:?} differs from the mapping's {:?}",
                r.external(),
                m.external
            );
            ensure!(r.lifetime() == m.lifetime, "lifetime differs");
            if let Some(b) = &before {
                ensure!(
                    b.external == m.external,
                    "renewal moved the external endpoint"
                );
            }
            let newly = m.checkpoint == Reason::Requested
                && !before.as_ref().is_some_and(|b| b.is_checkpointed());
            if newly {
                self.grants
                    .entry(m.subscriber.clone())
                    .or_default()
                    .push(self.h.now);
            }
        } else if r.result() != ResultCode::Success {
            ensure!(
                after == before,
                "error {} changed the mapping: {before:?} -> {after:?}",
                r.result()
            );
            ensure!(
                r.bytes[24..] == req.bytes()[24..],
                "error does not copy the request"
            );
        } else {
            ensure!(!echoed, "192 echoed on a delete");
            ensure!(
                r.lifetime() == 0,
                "delete answered lifetime {}",
                r.lifetime()
            );
        }
        match r.result() {
            ResultCode::NoResources => {
                let used: HashSet<_> = self
                    .h
                    .server
                    .mappings()
                    .filter(|m| m.key.protocol == req.protocol)
                    .map(|m| m.external)
                    .collect();
                ensure!(
                    used.len() == usize::from(PORT_MAX - PORT_MIN + 1),
                    "NO_RESOURCES with only {} of the pool's ports in use (leak?)",
                    used.len()
                );
            }
            ResultCode::UserExQuota => {
                let id = sub_of(key.internal);
                let held = self
                    .h
                    .server
                    .mappings()
                    .filter(|m| m.subscriber == id)
                    .count();
                ensure!(
                    before.is_none() && held as u32 >= tier_of(&id).mapping_quota,
                    "USER_EX_QUOTA with {held} mappings"
                );
            }
            _ => {}
        }
        Ok(())
    }

    fn pcp_delete_all(&mut self, host: usize, wrong_nonce: bool) -> Result<(), TestCaseError> {
        let src = hosts()[host];
        let nonce = nonce_of(host, wrong_nonce);
        let req = Req::map(src, 0).protocol(0).lifetime(0).nonce(nonce);
        let owned: Vec<MappingKey> = self
            .h
            .server
            .mappings()
            .filter(|m| {
                m.key.internal == src
                    && !m.key.is_peer()
                    && m.origin == pcp_server::Origin::Pcp
                    && m.nonce == nonce
            })
            .map(|m| m.key)
            .collect();
        let r = self.h.pcp(&req);
        self.apply_effects();
        ensure!(
            r.result() == ResultCode::Success,
            "delete-all answered {}",
            r.result()
        );
        ensure!(
            r.lifetime() == 0 && !r.has_checkpoint(),
            "delete-all response"
        );
        for k in owned {
            ensure!(self.h.mapping(&k).is_none(), "delete-all left {k:?}");
        }
        ensure!(
            self.h.server.mappings().all(|m| m.key.internal != src
                || m.key.is_peer()
                || m.origin != pcp_server::Origin::Pcp
                || m.nonce != nonce),
            "delete-all left a mapping it owns"
        );
        Ok(())
    }

    fn natpmp(
        &mut self,
        host: usize,
        tcp: bool,
        port: u16,
        lifetime: u32,
    ) -> Result<(), TestCaseError> {
        let src = hosts()[host];
        let proto = if tcp {
            natpmp::Protocol::Tcp
        } else {
            natpmp::Protocol::Udp
        };
        let resp = self.h.natpmp(&natpmp_map(proto, port, 0, lifetime), src);
        self.apply_effects();
        match resp {
            natpmp::Response::Map {
                result,
                epoch,
                internal_port,
                external_port,
                lifetime: granted,
                ..
            } => {
                ensure!(epoch == self.epoch(), "NAT-PMP epoch");
                ensure!(internal_port == port, "NAT-PMP internal port not copied");
                if result == natpmp::ResultCode::Success && lifetime > 0 {
                    let key = MappingKey {
                        internal: src,
                        protocol: proto.iana(),
                        internal_port: port,
                        remote: None,
                    };
                    let m = self.h.mapping(&key).ok_or_else(|| {
                        TestCaseError::fail("NAT-PMP SUCCESS without a mapping".to_string())
                    })?;
                    ensure!(
                        (m.external.port, m.lifetime) == (external_port, granted),
                        "NAT-PMP response differs from the mapping"
                    );
                    ensure!(
                        !m.is_checkpointed() || m.checkpoint != Reason::Requested,
                        "NAT-PMP requested a checkpoint"
                    );
                }
            }
            other => return Err(TestCaseError::fail(format!("unexpected {other:?}"))),
        }
        Ok(())
    }

    /// The properties that hold after every step.
    fn check(&mut self) -> Result<(), TestCaseError> {
        let server = &self.h.server;
        server
            .check_invariants()
            .map_err(|e| TestCaseError::fail(format!("check_invariants: {e}")))?;

        let all: Vec<Mapping> = server.mappings().collect();

        // Per subscriber: mapping quota and (client-requested) checkpoint quota.
        let mut per_sub: HashMap<&SubscriberId, (u32, u32)> = HashMap::new();
        let mut checkpointed = 0u64;
        for m in &all {
            let e = per_sub.entry(&m.subscriber).or_default();
            e.0 += 1;
            if m.checkpoint == Reason::Requested {
                e.1 += 1;
            }
            if m.is_checkpointed() {
                checkpointed += 1;
            }
            ensure!(
                m.subscriber == sub_of(m.key.internal),
                "mapping charged to the wrong subscriber"
            );
        }
        for (id, (maps, cps)) in &per_sub {
            let t = tier_of(id);
            ensure!(
                *maps <= t.mapping_quota,
                "{id} holds {maps} mappings > quota {}",
                t.mapping_quota
            );
            ensure!(
                *cps <= t.checkpoint_quota,
                "{id} holds {cps} requested checkpoints > quota {}",
                t.checkpoint_quota
            );
        }
        ensure!(
            checkpointed <= CAPACITY,
            "{checkpointed} checkpoints > capacity {CAPACITY}"
        );
        ensure!(
            server.checkpointed_count() == checkpointed,
            "checkpointed_count"
        );

        // External endpoints are never shared between internal endpoints.
        let mut owner: HashMap<(IpAddr, u8, u16), (IpAddr, u8, u16)> = HashMap::new();
        for m in &all {
            let ext = (m.external.addr, m.external.protocol, m.external.port);
            let int = (m.key.internal, m.key.protocol, m.key.internal_port);
            ensure!(
                m.external.protocol == m.key.protocol,
                "external protocol differs"
            );
            ensure!(
                (PORT_MIN..=PORT_MAX).contains(&m.external.port) && m.external.addr == EXTERNAL,
                "external {:?} outside the pool",
                m.external
            );
            if let Some(other) = owner.insert(ext, int) {
                ensure!(other == int, "{ext:?} shared by {other:?} and {int:?}");
            }
        }

        // Checkpoint grants within any window never exceed burst + rate × window.
        if !self.strict_rate {
            let alive: HashSet<&SubscriberId> = server.subscribers().map(|(id, _, _)| id).collect();
            self.grants.retain(|id, _| alive.contains(id));
        }
        for (id, times) in &self.grants {
            let t = tier_of(id);
            for i in 0..times.len() {
                for j in i..times.len() {
                    let window = (times[j].0 - times[i].0) as f64 / 1000.0;
                    let allowed = f64::from(t.checkpoint_burst) + t.checkpoint_rate * window;
                    let n = (j - i + 1) as f64;
                    let within = n <= allowed + 1e-9;
                    ensure!(
                        within,
                        "{id}: {n} checkpoints granted within {window} s (burst {}, rate {})",
                        t.checkpoint_burst,
                        t.checkpoint_rate
                    );
                }
            }
        }

        // The effects describe the table: the data plane holds one entry per mapping,
        // and the backup holds exactly the checkpointed mappings, as they are now.
        let expected_dp: HashMap<_, _> = all
            .iter()
            .map(|m| {
                let e = entry_of(&m.key, m.external, &m.filters);
                (dp_id(&e), e)
            })
            .collect();
        ensure!(
            expected_dp == self.dataplane,
            "data plane effects diverged from the table"
        );
        for host in hosts() {
            // Unprotected: holds a mapping that is not checkpointed, whatever else it
            // holds (a successor must announce to it). Exposed: checkpointed mappings
            // and unprotected ones side by side.
            let unprotected = all
                .iter()
                .any(|m| m.key.internal == host && !m.is_checkpointed());
            let exposed = unprotected
                && all
                    .iter()
                    .any(|m| m.key.internal == host && m.is_checkpointed());
            ensure!(
                self.unprotected.get(&host).copied().unwrap_or(false) == unprotected,
                "Change::Host for {host} says unprotected={:?}, table says {unprotected}",
                self.unprotected.get(&host)
            );
            ensure!(
                server.host_unprotected(host) == unprotected,
                "host_unprotected({host}) differs from the table"
            );
            ensure!(
                server.host_exposed(host) == exposed,
                "host_exposed({host}) differs from the table"
            );
        }
        let expected_replica: HashMap<_, _> = all
            .iter()
            .filter(|m| m.is_checkpointed())
            .map(|m| (m.key, m.clone()))
            .collect();
        ensure!(
            expected_replica == self.replica,
            "replication effects diverged: expected {:?}, replica {:?}",
            expected_replica.keys().collect::<Vec<_>>(),
            self.replica.keys().collect::<Vec<_>>()
        );
        Ok(())
    }
}

fn sub_of(internal: IpAddr) -> SubscriberId {
    match internal {
        IpAddr::V4(v4) if v4.octets()[..3] == [10, 0, 1] => SubscriberId::Named(Arc::from("acme")),
        other => SubscriberId::Prefix(ipnet::IpNet::from(other)),
    }
}

fn run(steps: &[Step], strict_rate: bool) -> Result<(), TestCaseError> {
    let mut w = World::new(strict_rate);
    w.check()?;
    for (i, s) in steps.iter().enumerate() {
        w.step(s)
            .map_err(|e| TestCaseError::fail(format!("step {i} {s:?}: {e}")))?;
    }
    Ok(())
}

fn cfg(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // Only files under tests/ may be created: no regression files.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(cfg(512))]

    #[test]
    fn random_operations_keep_invariants_and_checkpoint_limits(
        steps in prop::collection::vec(step(), 1..80)
    ) {
        run(&steps, false)?;
    }
}

proptest! {
    #![proptest_config(cfg(256))]

    /// The rate limit also holds across a subscriber deleting (or expiring) all its
    /// mappings (RFC 7767 §3.2 rate per network attachment point).
    #[test]
    fn checkpoint_rate_holds_across_subscriber_state_loss(
        steps in prop::collection::vec(step(), 1..80)
    ) {
        run(&steps, true)?;
    }
}
