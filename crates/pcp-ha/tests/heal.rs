//! A partition of the HA link heals (docs/HA.md, "Fencing: terms"): the backup took
//! over while the old active went on serving in its lower term. When the old active
//! hears the new term it steps down and drops what it changed meanwhile; its HELLO says
//! which stream it ran and how far, so the new active learns whether its predecessor
//! changed anything it never received ([`Event::PredecessorDiverged`]) and can reset
//! the epochs it carried over from it.

use std::net::IpAddr;
use std::time::Duration;

use pcp_ha::wire::MAX_FRAME;
use pcp_ha::{Event, HaConfig, HaNode, Role};
use pcp_server::{Change, Time};

const HB: u64 = 100;
const DETECTION: u64 = 500;

fn cfg() -> HaConfig {
    HaConfig {
        heartbeat: Duration::from_millis(HB),
        detection: Duration::from_millis(DETECTION),
        ..HaConfig::default()
    }
}

/// Two nodes on a link that can be cut; every event either node emitted is kept.
struct Pair {
    a: HaNode,
    b: HaNode,
    link: bool,
    /// Frames from A to B are lost (while `link` is up, B's reach A).
    a_to_b_lost: bool,
    now: Time,
    a_events: Vec<Event>,
    b_events: Vec<Event>,
    buf: Vec<u8>,
}

impl Pair {
    /// A active, B a ready backup of it.
    fn ready() -> Pair {
        let mut p = Pair {
            a: HaNode::new(cfg(), true, 11, Time(0)),
            b: HaNode::new(cfg(), false, 22, Time(0)),
            link: true,
            a_to_b_lost: false,
            now: Time(0),
            a_events: Vec::new(),
            b_events: Vec::new(),
            buf: vec![0; MAX_FRAME],
        };
        p.a.promote(Time(0));
        p.run(Duration::from_millis(600));
        assert!(p.a.status(p.now).ready, "the backup holds the copy");
        assert_eq!(p.b.role(), Role::Backup);
        p
    }

    /// Both nodes run every 50 ms for `d`, exchanging frames while the link is up.
    fn run(&mut self, d: Duration) {
        let end = self.now.plus(d);
        while self.now < end {
            self.now = self.now.plus(Duration::from_millis(50));
            let now = self.now;
            for (node, events) in [
                (&mut self.a, &mut self.a_events),
                (&mut self.b, &mut self.b_events),
            ] {
                node.handle_timeout(now);
                while let Some(ev) = node.poll_event() {
                    if let Event::NeedBulk { cursor } = ev {
                        node.bulk_chunk(cursor, &[], None, &[], now);
                    }
                    events.push(ev);
                }
            }
            let mut to_b = Vec::new();
            while let Some(n) = self.a.poll_transmit(now, &mut self.buf) {
                to_b.push(self.buf[..n].to_vec());
            }
            let mut to_a = Vec::new();
            while let Some(n) = self.b.poll_transmit(now, &mut self.buf) {
                to_a.push(self.buf[..n].to_vec());
            }
            if self.link && !self.a_to_b_lost {
                for f in &to_b {
                    self.b.handle_frame(f, now);
                }
            }
            if self.link {
                for f in &to_a {
                    self.a.handle_frame(f, now);
                }
            }
            self.a.link_read(now);
            self.b.link_read(now);
        }
    }

    /// Cuts the link until B has taken over.
    fn partition_until_b_takes_over(&mut self) {
        self.link = false;
        self.run(Duration::from_millis(2 * DETECTION + 200));
        assert_eq!(self.b.role(), Role::Active, "B took over");
        assert_eq!(self.a.role(), Role::Active, "A does not know yet");
    }

    /// Heals the link until A has stepped down and follows B.
    fn heal(&mut self) {
        self.link = true;
        self.run(Duration::from_millis(1000));
        assert_eq!(self.a.role(), Role::Backup, "A stepped down");
        assert!(
            self.a_events
                .iter()
                .any(|e| matches!(e, Event::Demoted { .. })),
            "A was told to drop its state"
        );
    }

    fn diverged(&self) -> usize {
        self.b_events
            .iter()
            .filter(|e| matches!(e, Event::PredecessorDiverged { .. }))
            .count()
    }
}

fn host_record(n: u8) -> Change {
    Change::Host {
        host: IpAddr::from([10, 0, 0, n]),
        unprotected: true,
    }
}

/// The old active recorded a change after B stopped hearing it (it served a client in
/// the partition): once the link heals, B is told, once.
#[test]
fn a_predecessor_that_changed_state_in_a_partition_is_reported_once_healed() {
    let mut p = Pair::ready();
    p.partition_until_b_takes_over();
    let now = p.now;
    assert!(p.a.push(&host_record(1), now).is_some(), "A still records");
    p.run(Duration::from_millis(200));
    assert_eq!(p.diverged(), 0, "nothing is known before the link heals");
    p.heal();
    assert_eq!(
        p.diverged(),
        1,
        "B learns its predecessor diverged: {:?}",
        p.b_events
    );
    // A keeps following B; nothing more is reported.
    p.run(Duration::from_millis(1000));
    assert_eq!(p.diverged(), 1);
    assert_eq!(p.b.role(), Role::Active);
}

/// The old active changed nothing after the takeover (it was cut off but idle, or
/// everything it recorded reached B first): no reset is due.
#[test]
fn an_idle_predecessor_is_not_reported() {
    let mut p = Pair::ready();
    // Recorded and applied by B before the partition.
    let now = p.now;
    p.a.push(&host_record(2), now);
    p.run(Duration::from_millis(300));
    p.partition_until_b_takes_over();
    p.heal();
    assert_eq!(p.diverged(), 0, "{:?}", p.b_events);
}

/// A planned switchover hands over only once B applied everything: no report.
#[test]
fn a_switchover_is_not_a_divergence() {
    let mut p = Pair::ready();
    let now = p.now;
    p.a.push(&host_record(3), now);
    assert!(p.a.switchover(now));
    p.run(Duration::from_millis(1500));
    assert_eq!(p.b.role(), Role::Active);
    assert_eq!(p.a.role(), Role::Backup);
    assert_eq!(p.diverged(), 0, "{:?}", p.b_events);
}

/// The old active's shell answered a request just after its node stepped down (it had
/// not learned so yet): the change is lost with the rest, so it counts as served past
/// the takeover, and the node's ACKs still say so. Changes that are not answers (expiry,
/// mirroring a copy) do not count.
#[test]
fn a_request_answered_just_after_the_step_down_counts() {
    let mut p = Pair::ready();
    p.partition_until_b_takes_over();
    p.link = true;
    p.run(Duration::from_millis(300));
    assert_eq!(p.a.role(), Role::Backup, "A stepped down");
    assert_eq!(p.diverged(), 0, "A changed nothing in the partition");
    let now = p.now;
    assert_eq!(
        p.a.push(&host_record(4), now),
        None,
        "a backup records nothing"
    );
    p.run(Duration::from_millis(200));
    assert_eq!(p.diverged(), 0, "an expiry is not an answer");
    let now = p.now;
    assert_eq!(p.a.push_served(&host_record(5), now), None);
    p.run(Duration::from_millis(200));
    assert_eq!(p.diverged(), 1, "{:?}", p.b_events);
}

/// A flapping HA link: A hears B's term and steps down, but nothing it says reaches B
/// for longer than the old report lasted (2 × detection; A keeps hearing B, so it
/// stays a backup). Once A's frames get through again, B still learns that its
/// predecessor diverged.
#[test]
fn a_step_down_is_reported_after_a_flapping_link() {
    let mut p = Pair::ready();
    p.partition_until_b_takes_over();
    let now = p.now;
    assert!(p.a.push(&host_record(6), now).is_some(), "A still records");
    // B's frames reach A, A's are lost, well past the old report's lifetime.
    p.link = true;
    p.a_to_b_lost = true;
    p.run(Duration::from_millis(4 * DETECTION));
    assert_eq!(p.a.role(), Role::Backup, "A stepped down");
    assert_eq!(p.b.role(), Role::Active);
    assert_eq!(p.diverged(), 0, "B heard nothing of A");
    p.a_to_b_lost = false;
    p.run(Duration::from_millis(1000));
    assert_eq!(p.diverged(), 1, "{:?}", p.b_events);
    // A follows B's stream and keeps saying what it ran: reported once all the same.
    p.run(Duration::from_millis(3000));
    assert!(p.b.status(p.now).ready, "A holds B's copy");
    assert_eq!(p.diverged(), 1);
}
