//! `pcp_ha::shell`: what goes out with option 192 and what a late reply withdraws, on a
//! real server core. Each rule here was first found broken by the simulator
//! (`tests/sim.rs`, seeds 51 and 940 before the fix).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use pcp_ha::shell::{Held, HeldReplies, Pending, withdraw};
use pcp_proto::{Body, MapBody, Options, PcpOption, Request, Response};
use pcp_server::config::TierConfig;
use pcp_server::{
    BackupStatus, Change, Effect, Mapping, MappingKey, Reply, Server, ServerConfig, Time,
};

const HOST: [u8; 4] = [10, 0, 0, 1];

fn server() -> Server {
    let mut cfg = ServerConfig::default();
    cfg.pool.port_min = 10_000;
    cfg.pool.port_max = 10_999;
    cfg.tiers.insert(
        "default".into(),
        TierConfig {
            mapping_quota: 100,
            checkpoint_quota: 100,
            checkpoint_rate: 1000.0,
            checkpoint_burst: 1000,
        },
    );
    let mut s = Server::new(cfg, Time(0), 1).unwrap();
    s.set_backup_status(BackupStatus::Ready);
    s
}

fn key() -> MappingKey {
    MappingKey {
        internal: IpAddr::from(HOST),
        protocol: 17,
        internal_port: 5000,
        remote: None,
    }
}

/// Serves a MAP for the one mapping; returns the reply and the records it made.
fn request(
    s: &mut Server,
    lifetime: u32,
    ask_192: bool,
    now: Time,
) -> (Reply, Vec<u8>, Vec<Change>) {
    map(s, 5000, lifetime, ask_192, now)
}

/// Serves a MAP from `HOST` for internal port `port`, lifetime 30.
fn serve(s: &mut Server, port: u16, ask_192: bool, now: Time) -> Vec<Change> {
    map(s, port, 30, ask_192, now).2
}

/// Serves a MAP from `HOST` for internal port `port`.
fn map(
    s: &mut Server,
    port: u16,
    lifetime: u32,
    ask_192: bool,
    now: Time,
) -> (Reply, Vec<u8>, Vec<Change>) {
    let opts = [PcpOption::CheckpointRequired];
    let req = Request {
        lifetime,
        client_addr: IpAddr::from(HOST),
        body: Body::Map(MapBody {
            nonce: [7; 12],
            protocol: 17,
            internal_port: port,
            external_port: 0,
            external_addr: IpAddr::from([0, 0, 0, 0]),
        }),
        options: Options::from_list(if ask_192 { &opts } else { &[] }),
        pa_result_code: pcp_proto::ResultCode::Success,
    };
    let mut buf = [0u8; 1100];
    let n = req.emit(&mut buf).unwrap();
    let mut reply = vec![0u8; 1100];
    let mut fx = Vec::new();
    let r = s.handle(
        &buf[..n],
        SocketAddr::new(IpAddr::from(HOST), 1),
        now,
        &mut reply,
        &mut fx,
    );
    let len = match r {
        Reply::Send(n) | Reply::Hold(n) => n,
        Reply::Drop => 0,
    };
    reply.truncate(len);
    let changes = fx
        .into_iter()
        .filter_map(|e| match e {
            Effect::Replicate(c) => Some(c),
            Effect::DataPlane(_) => None,
        })
        .collect();
    (r, reply, changes)
}

fn held(seq: u64, reply: Vec<u8>, at: Time) -> Held<()> {
    Held {
        seq,
        reply,
        key: key(),
        at,
        deadline: at,
        to: (),
        waited: false,
    }
}

fn has_192(reply: &[u8]) -> bool {
    Response::parse(reply)
        .unwrap()
        .options
        .checkpoint_required()
}

fn checkpointed(s: &Server) -> bool {
    s.mapping(&key()).is_some_and(|m| m.is_checkpointed())
}

#[test]
fn a_late_reply_does_not_withdraw_a_later_promise() {
    let mut s = server();
    let mut q = HeldReplies::new(Duration::from_millis(300));
    let (r1, a, _) = request(&mut s, 30, true, Time(0));
    assert!(matches!(r1, Reply::Hold(_)) && has_192(&a));
    assert!(q.hold(held(1, a, Time(0)), Time(0)).is_none());
    // The client asks again before the first answer left: a second promise.
    let (_, b, _) = request(&mut s, 40, true, Time(100));
    assert!(q.hold(held(2, b, Time(100)), Time(100)).is_none());
    // The first one is late: it goes out without 192, and leaves the mapping alone.
    let mut late = q.take_late(Time(300));
    assert_eq!(late.len(), 1);
    assert!(
        !q.settle(&mut late[0]),
        "the later promise must not be withdrawn"
    );
    assert!(!has_192(&late[0].reply));
    assert!(checkpointed(&s));
    // The second one is confirmed: its 192 names a checkpointed mapping.
    let out = q.release(2, Time(350));
    assert_eq!(out.len(), 1);
    assert!(has_192(&out[0].reply));
    assert!(q.is_empty());
}

#[test]
fn a_late_reply_that_is_the_last_withdraws_its_promise() {
    let mut s = server();
    let mut q = HeldReplies::new(Duration::from_millis(300));
    let (_, a, _) = request(&mut s, 30, true, Time(0));
    q.hold(held(1, a, Time(0)), Time(0));
    assert!(q.take_late(Time(299)).is_empty());
    let mut late = q.take_late(Time(300));
    assert!(q.settle(&mut late[0]));
    assert!(!has_192(&late[0].reply));
    let mut fx = Vec::new();
    // The mapping stays, unprotected: the host's only mapping, so the host is not
    // exposed, yet the reply must wait again for its host record — a successor that
    // missed the remove still holds the mapping at its older expiry.
    let again = withdraw(&mut s, &key(), &mut fx);
    assert!(!checkpointed(&s));
    assert!(!s.host_exposed(IpAddr::from(HOST)));
    let host_record = fx.iter().position(|e| {
        matches!(
            e,
            Effect::Replicate(Change::Host {
                unprotected: true,
                ..
            })
        )
    });
    let remove = fx
        .iter()
        .position(|e| matches!(e, Effect::Replicate(Change::Remove(_))));
    assert!(remove.is_some() && host_record.is_some() && remove < host_record);
    assert!(again, "the host record must be waited for");
    assert_eq!(q.timed_out(), 1);
    // The second wait runs out too: still one reply that went out late.
    let mut second = late.pop().expect("the late reply");
    second.seq = 2;
    assert!(q.hold(second, Time(300)).is_none());
    let late = q.take_late(Time(600));
    assert_eq!(late.len(), 1);
    assert_eq!(
        q.timed_out(),
        1,
        "a reply that waited twice is counted once"
    );
}

#[test]
fn a_withdrawal_with_no_host_record_does_not_wait_again() {
    let mut s = server();
    // The host already holds an unprotected mapping: withdrawing makes no host record.
    let other = MappingKey {
        internal_port: 5001,
        ..key()
    };
    let (_, _, changes) = request(&mut s, 30, true, Time(0));
    assert!(!changes.is_empty());
    serve(&mut s, 5001, false, Time(0));
    assert!(s.mapping(&other).is_some_and(|m| !m.is_checkpointed()));
    let mut fx = Vec::new();
    assert!(!withdraw(&mut s, &key(), &mut fx));
    assert!(!checkpointed(&s));
    assert!(
        !fx.iter()
            .any(|e| matches!(e, Effect::Replicate(Change::Host { .. })))
    );
}

#[test]
fn a_reply_outdated_by_a_later_answer_goes_out_without_192() {
    let mut s = server();
    let mut q = HeldReplies::new(Duration::from_millis(300));
    let (_, a, _) = request(&mut s, 30, true, Time(0));
    q.hold(held(1, a, Time(0)), Time(0));
    // A renewal without 192, answered at once, unprotects the mapping.
    let (r2, _, changes) = request(&mut s, 20, false, Time(50));
    assert!(matches!(r2, Reply::Send(_)));
    assert!(!changes.is_empty() && !checkpointed(&s));
    for c in &changes {
        q.supersede(c);
    }
    // The first reply's record is confirmed only now: it must not promise any more.
    let out = q.release(1, Time(100));
    assert_eq!(out.len(), 1);
    assert!(!has_192(&out[0].reply));
    assert!(q.is_empty());
}

#[test]
fn a_reply_with_nothing_to_wait_for_is_given_back() {
    let mut s = server();
    let mut q = HeldReplies::new(Duration::from_millis(300));
    let (_, a, _) = request(&mut s, 30, true, Time(0));
    let mut back = q.hold(held(0, a, Time(0)), Time(0)).expect("given back");
    assert!(q.is_empty() && q.next_deadline().is_none());
    assert!(q.settle(&mut back));
    assert!(!has_192(&back.reply));
}

/// Two mirrored mappings of the same external endpoint: `old` (installed on the
/// standby, stale) and `new` (which the active gave that endpoint since); `new` waits.
fn standby_with_a_pending_mapping() -> (Server, Pending, Mapping, Mapping) {
    let mut active = server();
    serve(&mut active, 5000, true, Time(0));
    let old = active.mapping(&key()).expect("mapped");
    assert!(old.is_checkpointed());
    let mut new = old.clone();
    new.key.internal_port = 5001;
    let mut standby = server();
    let mut pending = Pending::default();
    let mut fx = Vec::new();
    pending.upsert(&mut standby, old.clone(), Time(10), &mut fx);
    pending.upsert(&mut standby, new.clone(), Time(10), &mut fx);
    assert!(standby.mapping(&old.key).is_some());
    assert!(standby.mapping(&new.key).is_none());
    assert_eq!(pending.len(), 1, "its endpoint is still held");
    (standby, pending, old, new)
}

/// What pcpd's core and the simulator do with a remove record on a standby.
fn mirror_remove(standby: &mut Server, pending: &mut Pending, keys: &[MappingKey], now: Time) {
    let mut fx = Vec::new();
    for k in keys {
        standby.mirror_remove(k, &mut fx);
    }
    pending.remove(keys);
    pending.retry(standby, now, &mut fx);
}

#[test]
fn a_standby_does_not_bring_back_a_mapping_the_active_deleted() {
    let (mut standby, mut pending, old, new) = standby_with_a_pending_mapping();
    // The active deletes the waiting mapping, then the end of the copy sweeps the
    // stale one, freeing the endpoint.
    mirror_remove(&mut standby, &mut pending, &[new.key], Time(20));
    mirror_remove(&mut standby, &mut pending, &[old.key], Time(30));
    assert!(
        standby.mapping(&new.key).is_none(),
        "a deleted mapping came back"
    );
    assert!(pending.is_empty() && pending.take().is_empty());
    assert_eq!(standby.mappings().count(), 0);
}

#[test]
fn a_standby_installs_a_waiting_mapping_once_its_endpoint_is_freed() {
    let (mut standby, mut pending, old, new) = standby_with_a_pending_mapping();
    // Many keys at once (a sweep), none of them the waiting one.
    let mut keys: Vec<MappingKey> = (6000..6020)
        .map(|p| MappingKey {
            internal_port: p,
            ..key()
        })
        .collect();
    keys.push(old.key);
    mirror_remove(&mut standby, &mut pending, &keys, Time(30));
    assert!(pending.is_empty());
    let m = standby.mapping(&new.key).expect("installed");
    assert_eq!(m.external, new.external);
}

#[test]
fn a_newer_record_replaces_a_waiting_one() {
    let (mut standby, mut pending, old, new) = standby_with_a_pending_mapping();
    // The active moved the waiting mapping to another endpoint: the newer record fits.
    let mut moved = new.clone();
    moved.external.port = new.external.port + 1;
    let mut fx = Vec::new();
    pending.upsert(&mut standby, moved.clone(), Time(20), &mut fx);
    assert!(
        pending.is_empty(),
        "the older record must not wait any more"
    );
    mirror_remove(&mut standby, &mut pending, &[old.key], Time(30));
    let m = standby.mapping(&new.key).expect("installed");
    assert_eq!(m.external, moved.external, "the older record came back");
}
