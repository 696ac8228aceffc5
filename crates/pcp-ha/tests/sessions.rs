//! PA sessions (RFC 7652) and subscribers over the replication stream
//! (docs/AUTH.md "Pair mode"): a backup holds the active's established sessions with
//! their latest sequence numbers, drops ended and expired ones, gets them with a full
//! copy, and hands them over at a takeover; replicated mappings name the subscriber
//! the active charged; a backup of an older build gets no session records at all.

use std::time::Duration;

use pcp_ha::wire::{FLAG_SESSIONS, MAX_FRAME, SequenceRecord, SessionRecord};
use pcp_ha::{Event, HaConfig, HaNode, Replica};
use pcp_server::pool::ExternalEndpoint;
use pcp_server::subscriber::SubscriberId;
use pcp_server::{Change, Mapping, MappingKey, Origin, Reason, Time};

/// Delivers frames both ways until neither node has anything to say; returns the
/// backup's events. `old_backup`: the backup's frames lose [`FLAG_SESSIONS`], as from
/// a build that does not read session records.
fn pump(a: &mut HaNode, b: &mut HaNode, now: Time, old_backup: bool) -> Vec<Event> {
    let mut buf = vec![0u8; MAX_FRAME];
    let mut events = Vec::new();
    loop {
        let mut moved = false;
        while let Some(ev) = a.poll_event() {
            if let Event::NeedBulk { cursor } = ev {
                a.bulk_chunk(cursor, &[], None, &[], now);
            }
        }
        while let Some(n) = a.poll_transmit(now, &mut buf) {
            b.handle_frame(&buf[..n], now);
            moved = true;
        }
        events.extend(std::iter::from_fn(|| b.poll_event()));
        while let Some(n) = b.poll_transmit(now, &mut buf) {
            if old_backup {
                buf[6] &= !FLAG_SESSIONS;
            }
            a.handle_frame(&buf[..n], now);
            moved = true;
        }
        if !moved {
            return events;
        }
    }
}

fn cfg() -> HaConfig {
    HaConfig {
        heartbeat: Duration::from_millis(100),
        detection: Duration::from_millis(500),
        standby: true,
        ..HaConfig::default()
    }
}

/// A pair with a ready backup, at the returned time.
fn pair(old_backup: bool) -> (HaNode, HaNode, Time) {
    let mut a = HaNode::new(cfg(), true, 11, Time(0));
    let mut b = HaNode::new(cfg(), false, 22, Time(0));
    a.promote(Time(0));
    let mut now = Time(0);
    for _ in 0..5 {
        now = now.plus(Duration::from_millis(100));
        a.handle_timeout(now);
        b.handle_timeout(now);
        pump(&mut a, &mut b, now, old_backup);
    }
    assert!(a.status(now).ready);
    (a, b, now)
}

fn session(id: u32, remaining_ms: u32) -> SessionRecord {
    SessionRecord {
        session_id: id,
        client: "192.0.2.10:5350".parse().unwrap(),
        identity: "alice".into(),
        nonce: 42,
        key_id: 1,
        key: [id as u8; 32],
        prf: 5,
        mac: 12,
        remaining_ms,
        pa_in: 2,
        pa_out: 3,
        sequence: SequenceRecord {
            last_in: None,
            next_out: 0,
        },
    }
}

fn mapping(port: u16, subscriber: SubscriberId, now: Time) -> Mapping {
    Mapping {
        key: MappingKey {
            internal: "10.0.0.1".parse().unwrap(),
            protocol: 17,
            internal_port: port,
            remote: None,
        },
        nonce: [1; 12],
        origin: Origin::Pcp,
        client: "10.0.0.1".parse().unwrap(),
        external: ExternalEndpoint {
            addr: "192.0.2.1".parse().unwrap(),
            protocol: 17,
            port,
        },
        expires: now.plus(Duration::from_secs(600)),
        lifetime: 600,
        subscriber,
        checkpoint_requested: true,
        checkpoint: Reason::Requested,
        filters: Box::new([]),
        description: None,
        created: now,
    }
}

/// Runs the backup alone (the active died) until it takes over.
fn fail_over(b: &mut HaNode, mut now: Time) -> Time {
    for _ in 0..20 {
        now = now.plus(Duration::from_millis(100));
        // Nothing arrives: the link was read to the end (see `HaNode::link_read`).
        b.link_read(now);
        b.handle_timeout(now);
        let mut buf = vec![0u8; MAX_FRAME];
        while b.poll_transmit(now, &mut buf).is_some() {}
        if b.serves() {
            return now;
        }
    }
    panic!("no takeover");
}

#[test]
fn sessions_and_their_sequence_numbers_survive_a_takeover() {
    let (mut a, mut b, now) = pair(false);
    assert!(a.push_session(session(1, 600_000), now).is_some());
    assert!(a.push_session(session(2, 600_000), now).is_some());
    let seq = SequenceRecord {
        last_in: Some((17, [9; 16])),
        next_out: 15,
    };
    assert!(a.push_session_seq(1, seq, now).is_some());
    // Unchanged numbers and unknown sessions queue nothing.
    assert!(a.push_session_seq(1, seq, now).is_none());
    assert!(a.push_session_seq(3, seq, now).is_none());
    assert!(a.push_session_end(2, now).is_some());
    let alice = SubscriberId::Identity("alice".into());
    let gold = SubscriberId::Named("gold-7".into());
    a.push(
        &Change::Upsert(Box::new(mapping(5000, alice.clone(), now))),
        now,
    );
    a.push(
        &Change::Upsert(Box::new(mapping(5001, alice.clone(), now))),
        now,
    );
    a.push(
        &Change::Upsert(Box::new(mapping(5002, gold.clone(), now))),
        now,
    );
    let events = pump(&mut a, &mut b, now, false);
    let mirrored: Vec<Mapping> = events
        .into_iter()
        .flat_map(|e| match e {
            Event::Replica(Replica::Upsert(m)) => m,
            _ => Vec::new(),
        })
        .collect();
    assert_eq!(mirrored.len(), 3);
    assert_eq!(mirrored[0].subscriber, alice);
    assert_eq!(mirrored[2].subscriber, gold);
    // One string for both of alice's mappings (interned), not one each.
    let (SubscriberId::Identity(x), SubscriberId::Identity(y)) =
        (&mirrored[0].subscriber, &mirrored[1].subscriber)
    else {
        panic!()
    };
    assert!(std::sync::Arc::ptr_eq(x, y));

    let held = b.sessions(now);
    assert_eq!(held.len(), 1, "session 2 ended");
    assert_eq!(held[0].session_id, 1);
    assert_eq!(held[0].sequence, seq);
    assert_eq!(held[0].key, [1; 32]);
    // The active dies; the backup takes over with the session, its lifetime running on.
    let later = fail_over(&mut b, now);
    let handed = b.sessions(later);
    assert_eq!(handed.len(), 1);
    let elapsed = later.since(now).as_millis() as u32;
    assert!(handed[0].remaining_ms <= 600_000 - elapsed);
    assert!(handed[0].remaining_ms >= 600_000 - elapsed - 10);
    // And past its lifetime it is gone.
    assert!(b.sessions(later.plus(Duration::from_secs(600))).is_empty());
}

#[test]
fn a_new_backup_gets_the_sessions_with_its_full_copy() {
    let mut a = HaNode::new(cfg(), true, 11, Time(0));
    a.promote(Time(0));
    let now = Time(10);
    // No backup yet: kept for the copy, nothing queued.
    assert!(a.push_session(session(7, 60_000), now).is_none());
    assert!(a.push_session(session(8, 1_000), now).is_none());
    let mut b = HaNode::new(cfg(), false, 22, now);
    // Session 8 expires before the copy is made: not copied.
    let mut t = now;
    for _ in 0..20 {
        t = t.plus(Duration::from_millis(100));
        a.handle_timeout(t);
        b.handle_timeout(t);
        pump(&mut a, &mut b, t, false);
    }
    assert!(a.status(t).ready);
    let held = b.sessions(t);
    assert_eq!(held.iter().map(|s| s.session_id).collect::<Vec<_>>(), [7]);
    assert!(held[0].remaining_ms <= 60_000 - 2_000);
    // A backup that steps up and back down again forgets them: its new active sends them.
    let t2 = fail_over(&mut b, t);
    assert_eq!(b.sessions(t2).len(), 1);
}

#[test]
fn a_backup_of_an_older_build_gets_no_session_records() {
    let (mut a, mut b, now) = pair(true);
    assert!(a.push_session(session(1, 600_000), now).is_none());
    let alice = SubscriberId::Identity("alice".into());
    assert!(
        a.push(&Change::Upsert(Box::new(mapping(5000, alice, now))), now)
            .is_some()
    );
    pump(&mut a, &mut b, now, true);
    assert_eq!(a.status(now).lag, 0, "everything sent was acknowledged");
    assert!(b.sessions(now).is_empty());
    assert_eq!(b.status(now).stored, 1);
}

#[test]
fn a_demoted_active_forgets_its_sessions() {
    let (mut a, mut b, now) = pair(false);
    a.push_session(session(1, 600_000), now);
    pump(&mut a, &mut b, now, false);
    // The backup takes over while the active is cut off, which meanwhile establishes
    // a session the new active never hears of.
    let later = fail_over(&mut b, now);
    a.push_session(session(2, 600_000), later);
    assert_eq!(a.sessions(later).len(), 2);
    // When they hear each other again the old active steps down, forgets both, and
    // gets the new active's: session 1 only.
    let mut t = later;
    for _ in 0..10 {
        t = t.plus(Duration::from_millis(100));
        a.handle_timeout(t);
        b.handle_timeout(t);
        pump(&mut b, &mut a, t, false);
    }
    assert!(!a.serves() && b.serves());
    let held: Vec<u32> = a.sessions(t).iter().map(|s| s.session_id).collect();
    assert_eq!(held, [1]);
}

/// An identity longer than `wire::MAX_NAME` is never replicated (a record must fit a
/// frame, or the stream would wedge on it): its session stays home, its mappings are
/// replicated as charged by address.
#[test]
fn oversized_names_are_not_replicated() {
    let (mut a, mut b, now) = pair(false);
    let long: std::sync::Arc<str> = "x".repeat(pcp_ha::wire::MAX_NAME + 1).into();
    let mut s = session(1, 600_000);
    s.identity = long.clone();
    assert!(a.push_session(s, now).is_none());
    assert!(!a.has_session(1));
    a.push(
        &Change::Upsert(Box::new(mapping(5000, SubscriberId::Identity(long), now))),
        now,
    );
    let events = pump(&mut a, &mut b, now, false);
    let subscriber = events.into_iter().find_map(|e| match e {
        Event::Replica(Replica::Upsert(m)) => m.into_iter().next().map(|m| m.subscriber),
        _ => None,
    });
    assert!(
        matches!(subscriber, Some(SubscriberId::Prefix(_))),
        "{subscriber:?}"
    );
    assert!(b.sessions(now).is_empty());
}

/// A backup's beacon (sent by its shell while the node is busy, see
/// `HaNode::beacon`) says what its ACKs say: that it reads session records. One that
/// did not would make the active take the backup for an older build, drop its log and
/// start a new full copy — unready for a while, on every busy moment of the backup.
#[test]
fn a_backup_beacon_keeps_saying_it_reads_sessions() {
    let (mut a, mut b, now) = pair(false);
    assert!(a.push_session(session(1, 600_000), now).is_some());
    pump(&mut a, &mut b, now, false);
    assert!(a.status(now).ready);
    let beacon = b.beacon().expect("a following backup has a beacon");
    let mut buf = vec![0u8; MAX_FRAME];
    let n = beacon.write(now, &mut buf).unwrap();
    assert_ne!(buf[6] & FLAG_SESSIONS, 0, "the beacon's flags");
    a.handle_frame(&buf[..n], now);
    assert!(a.status(now).ready, "the active still counts on its backup");
}
