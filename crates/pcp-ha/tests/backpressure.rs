//! A backup that holds its acknowledgements (`HaNode::hold_acks`, the shell's
//! backpressure while its standby core catches up) stops the active's progress without
//! looking dead, and releasing them lets the active catch up at once.

use std::time::Duration;

use pcp_ha::wire::MAX_FRAME;
use pcp_ha::{Event, HaConfig, HaNode};
use pcp_server::{Change, MappingKey, Time};

/// Delivers frames both ways until neither node has anything to say; the active's
/// bulk requests are answered with an empty server.
fn pump(a: &mut HaNode, b: &mut HaNode, now: Time) {
    let mut buf = vec![0u8; MAX_FRAME];
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
        while b.poll_event().is_some() {}
        while let Some(n) = b.poll_transmit(now, &mut buf) {
            a.handle_frame(&buf[..n], now);
            moved = true;
        }
        if !moved {
            return;
        }
    }
}

fn key(port: u16) -> MappingKey {
    MappingKey {
        internal: "10.0.0.1".parse().unwrap(),
        protocol: 17,
        internal_port: port,
        remote: None,
    }
}

#[test]
fn held_acks_stop_progress_but_not_liveness() {
    let cfg = HaConfig {
        heartbeat: Duration::from_millis(100),
        detection: Duration::from_millis(500),
        ..HaConfig::default()
    };
    let mut a = HaNode::new(cfg, true, 11, Time(0));
    let mut b = HaNode::new(cfg, false, 22, Time(0));
    a.promote(Time(0));
    let mut now = Time(0);
    for _ in 0..5 {
        now = now.plus(Duration::from_millis(100));
        a.handle_timeout(now);
        b.link_read(now);
        b.handle_timeout(now);
        pump(&mut a, &mut b, now);
    }
    assert!(a.status(now).ready, "the backup holds the (empty) copy");
    assert_eq!(a.status(now).lag, 0);

    b.hold_acks(true);
    for port in 1..=10 {
        a.push(&Change::Remove(key(port)), now);
    }
    // Longer than the detection time, with heartbeats: still alive, no progress.
    for _ in 0..8 {
        now = now.plus(Duration::from_millis(100));
        a.handle_timeout(now);
        b.link_read(now);
        b.handle_timeout(now);
        pump(&mut a, &mut b, now);
    }
    let st = a.status(now);
    assert!(
        st.peer_connected,
        "held acknowledgements still prove liveness"
    );
    assert_eq!(st.lag, 10, "nothing acknowledged while held");
    assert_eq!(b.role(), pcp_ha::Role::Backup);

    b.hold_acks(false);
    pump(&mut a, &mut b, now);
    assert_eq!(
        a.status(now).lag,
        0,
        "released: everything acknowledged at once"
    );
}
