//! Failure detection judges the active's silence on what the backup could actually
//! hear (issue #4, spurious takeovers on a starved machine): a timer that fires late,
//! with the active's heartbeats still unread in the socket, or right after the backup's
//! own thread did not run, is not evidence that the active is gone. A backup that keeps
//! running and reading while the active is silent still takes over within the
//! detection time.

use std::collections::VecDeque;
use std::time::Duration;

use pcp_ha::wire::MAX_FRAME;
use pcp_ha::{Event, HaConfig, HaNode, Role};
use pcp_server::Time;

const HB: u64 = 100;
const DETECTION: u64 = 500;

fn cfg() -> HaConfig {
    HaConfig {
        heartbeat: Duration::from_millis(HB),
        detection: Duration::from_millis(DETECTION),
        ..HaConfig::default()
    }
}

/// An active and a backup on a link whose frames towards the backup queue in a
/// socket buffer until the backup's shell reads them.
struct Pair {
    a: HaNode,
    b: HaNode,
    /// Frames sent to the backup, not yet read.
    to_b: VecDeque<Vec<u8>>,
    buf: Vec<u8>,
}

impl Pair {
    /// A pair whose backup holds the (empty) copy: ready, so it takes over after
    /// `DETECTION` of silence.
    fn ready() -> (Pair, Time) {
        let mut p = Pair {
            a: HaNode::new(cfg(), true, 11, Time(0)),
            b: HaNode::new(cfg(), false, 22, Time(0)),
            to_b: VecDeque::new(),
            buf: vec![0; MAX_FRAME],
        };
        p.a.promote(Time(0));
        let mut now = Time(0);
        for _ in 0..5 {
            now = now.plus(Duration::from_millis(HB));
            p.active_runs(now);
            p.backup_reads(now);
            p.backup_runs(now);
        }
        assert!(p.a.status(now).ready, "the backup holds the copy");
        assert_eq!(p.b.role(), Role::Backup);
        (p, now)
    }

    /// The active's thread runs: timers, events, frames out (into the backup's
    /// socket buffer), and it reads the backup's answers at once.
    fn active_runs(&mut self, now: Time) {
        self.a.handle_timeout(now);
        while let Some(ev) = self.a.poll_event() {
            if let Event::NeedBulk { cursor } = ev {
                self.a.bulk_chunk(cursor, &[], None, &[], now);
            }
        }
        while let Some(n) = self.a.poll_transmit(now, &mut self.buf) {
            self.to_b.push_back(self.buf[..n].to_vec());
        }
    }

    /// The backup's shell reads its socket until empty (after taking `now`).
    fn backup_reads(&mut self, now: Time) {
        while let Some(f) = self.to_b.pop_front() {
            self.b.handle_frame(&f, now);
        }
        self.b.link_read(now);
        self.backup_answers(now);
    }

    /// The backup's timers run (without reading the socket first).
    fn backup_runs(&mut self, now: Time) {
        self.b.handle_timeout(now);
        self.backup_answers(now);
    }

    fn backup_answers(&mut self, now: Time) {
        while self.b.poll_event().is_some() {}
        while let Some(n) = self.b.poll_transmit(now, &mut self.buf) {
            self.a.handle_frame(&self.buf[..n], now);
        }
    }
}

/// The backup's timers keep running (every 50 ms) but its shell is held up before
/// reading the socket for longer than the detection time, while the active's
/// heartbeats queue in it: no takeover. Once it reads, it goes on following.
#[test]
fn a_timer_that_runs_before_the_link_is_read_does_not_take_over() {
    let (mut p, start) = Pair::ready();
    let mut now = start;
    for _ in 0..16 {
        now = now.plus(Duration::from_millis(50));
        p.active_runs(now);
        p.backup_runs(now);
        assert_eq!(
            p.b.role(),
            Role::Backup,
            "took over at +{:?} with {} heartbeats unread",
            now.since(start),
            p.to_b.len()
        );
    }
    assert!(p.to_b.len() >= 7, "the active kept sending");
    p.backup_reads(now);
    p.backup_runs(now);
    assert_eq!(p.b.role(), Role::Backup);
    assert!(p.b.status(now).peer_connected);
}

/// The whole machine stalls (both nodes' threads descheduled for 700 ms, longer than
/// the detection time); the backup resumes first, reads an empty socket: that is not
/// the active's silence. The active resumes 100 ms later and is heard: no takeover.
#[test]
fn the_backup_own_stall_is_not_the_active_silence() {
    let (mut p, start) = Pair::ready();
    let mut now = start;
    now = now.plus(Duration::from_millis(700));
    p.backup_reads(now);
    p.backup_runs(now);
    assert_eq!(
        p.b.role(),
        Role::Backup,
        "took over right after its own 700 ms stall"
    );
    for _ in 0..4 {
        now = now.plus(Duration::from_millis(50));
        p.active_runs(now);
        p.backup_reads(now);
        p.backup_runs(now);
        assert_eq!(p.b.role(), Role::Backup, "at +{:?}", now.since(start));
    }
    assert!(p.b.status(now).peer_connected);
}

/// The active dies; a backup that keeps running and reading takes over within the
/// detection time (plus the step of its loop).
#[test]
fn a_running_backup_takes_over_within_the_detection_time() {
    let (mut p, start) = Pair::ready();
    let mut now = start;
    let took = loop {
        now = now.plus(Duration::from_millis(10));
        p.backup_reads(now);
        p.backup_runs(now);
        if p.b.role() == Role::Active {
            break now.since(start);
        }
        assert!(now.since(start) < Duration::from_secs(5), "never took over");
    };
    assert!(
        took <= Duration::from_millis(DETECTION + 10),
        "took over after {took:?}"
    );
}

/// The active dies while the backup itself stalls now and then (300 ms at a time,
/// longer than a heartbeat): it still takes over within twice the detection time.
#[test]
fn a_stalling_backup_still_takes_over_within_twice_the_detection_time() {
    let (mut p, start) = Pair::ready();
    let mut now = start;
    let mut i = 0;
    let took = loop {
        i += 1;
        let step = if i % 3 == 0 { 300 } else { 20 };
        now = now.plus(Duration::from_millis(step));
        p.backup_reads(now);
        p.backup_runs(now);
        if p.b.role() == Role::Active {
            break now.since(start);
        }
        assert!(now.since(start) < Duration::from_secs(5), "never took over");
    };
    assert!(
        took <= Duration::from_millis(2 * DETECTION + 300),
        "took over after {took:?}"
    );
}

/// The active's node is busy for 800 ms (its shell cannot call it: a lock held by
/// bulk work); the shell sends the node's beacon instead, written afresh each time:
/// the backup keeps following, and the epoch it learns from them is the active's.
/// Without the beacons the same backup takes over.
#[test]
fn beacons_from_a_busy_active_keep_the_backup_following() {
    for beacons in [true, false] {
        let (mut p, start) = Pair::ready();
        let beacon = p.a.beacon().expect("an active has a beacon");
        let mut now = start;
        let mut took_over = None;
        for i in 1..=16 {
            now = now.plus(Duration::from_millis(50));
            if beacons && i % 2 == 0 {
                let n = beacon.write(now, &mut p.buf).unwrap();
                p.to_b.push_back(p.buf[..n].to_vec());
            }
            p.backup_reads(now);
            p.backup_runs(now);
            if p.b.role() == Role::Active && took_over.is_none() {
                took_over = Some(now.since(start));
            }
        }
        if !beacons {
            assert!(took_over.is_some(), "the control: silence is detected");
            continue;
        }
        assert_eq!(took_over, None, "took over from an active sending beacons");
        assert!(p.b.status(now).peer_connected);
        // The active is gone now: the epoch base the backup takes over with is the
        // one the beacons carried.
        let mut epoch = None;
        while epoch.is_none() {
            now = now.plus(Duration::from_millis(50));
            p.backup_reads(now);
            p.b.handle_timeout(now);
            while let Some(ev) = p.b.poll_event() {
                if let Event::Promoted { epoch_base, .. } = ev {
                    epoch = Some(epoch_base);
                }
            }
        }
        assert_eq!(epoch, Some(Some(Time(0))), "the active's epoch base (0)");
    }
}

/// A backup's beacon is an acknowledgement the active takes as proof of life, and
/// never claims more than the backup applied.
#[test]
fn a_backup_beacon_is_a_cumulative_ack() {
    let (mut p, now) = Pair::ready();
    let beacon = p.b.beacon().expect("a following backup has a beacon");
    let later = now.plus(Duration::from_millis(DETECTION + 100));
    assert!(
        !p.a.status(later).peer_connected,
        "silent for longer than detection"
    );
    let n = beacon.write(later, &mut p.buf).unwrap();
    let lag = p.a.status(now).lag;
    p.a.handle_frame(&p.buf[..n], later);
    assert!(p.a.status(later).peer_connected, "the beacon proves life");
    assert_eq!(p.a.status(later).lag, lag);
    let fresh = HaNode::new(cfg(), false, 33, Time(0));
    assert_eq!(
        fresh.beacon(),
        None,
        "a backup not following says HELLO itself"
    );
}
