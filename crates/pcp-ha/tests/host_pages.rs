//! A full copy sends the hosts holding unprotected mappings in pages, under the same
//! backpressure as the mapping chunks: with far more such hosts than the send log may
//! hold, the copy completes once, without starting again, and the backup reports
//! ready only with every host (they used to be appended all at once: the log
//! overflowed, and the copy begun anew was closed at once by the old one's end, so the
//! backup became ready holding only the last hosts).
//! An answer to a bulk request of a copy dropped since is not taken for the new copy.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use pcp_ha::wire::MAX_FRAME;
use pcp_ha::{Event, HaConfig, HaNode, Role};
use pcp_server::pool::ExternalEndpoint;
use pcp_server::subscriber::SubscriberId;
use pcp_server::{Change, Mapping, MappingKey, Origin, Reason, Time};

const HB: u64 = 100;
const MAX_LOG: usize = 64;
const HOSTS: u32 = 5000;

fn cfg() -> HaConfig {
    HaConfig {
        heartbeat: Duration::from_millis(HB),
        detection: Duration::from_millis(500),
        max_log: MAX_LOG,
        bulk_chunk: 16,
        ..HaConfig::default()
    }
}

fn host(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
}

/// An active whose server holds no checkpointed mapping and `HOSTS` hosts with
/// unprotected ones, and its backup.
struct Pair {
    a: HaNode,
    b: HaNode,
    hosts: Vec<IpAddr>,
    /// Full copies the active began (a bulk request from cursor 0).
    copies: usize,
    buf: Vec<u8>,
}

impl Pair {
    fn new() -> (Pair, Time) {
        let mut p = Pair {
            a: HaNode::new(cfg(), true, 11, Time(0)),
            b: HaNode::new(cfg(), false, 22, Time(0)),
            hosts: (1..=HOSTS).map(host).collect(),
            copies: 0,
            buf: vec![0; MAX_FRAME],
        };
        p.a.promote(Time(0));
        (p, Time(0))
    }

    /// Frames both ways until neither node has anything to say; bulk requests are
    /// answered as the server core answers them. Bounded: a copy that starts again
    /// and again would keep frames moving for ever.
    fn pump(&mut self, now: Time, rounds: usize) {
        for _ in 0..rounds {
            let mut moved = false;
            while let Some(ev) = self.a.poll_event() {
                if let Event::NeedBulk { cursor } = ev {
                    if cursor == 0 {
                        self.copies += 1;
                    }
                    self.a.bulk_chunk(cursor, &[], None, &self.hosts, now);
                }
            }
            while let Some(n) = self.a.poll_transmit(now, &mut self.buf) {
                self.b.handle_frame(&self.buf[..n], now);
                moved = true;
            }
            while self.b.poll_event().is_some() {}
            while let Some(n) = self.b.poll_transmit(now, &mut self.buf) {
                self.a.handle_frame(&self.buf[..n], now);
                moved = true;
            }
            if !moved {
                return;
            }
        }
    }

    fn tick(&mut self, now: Time) {
        self.a.handle_timeout(now);
        self.b.link_read(now);
        self.b.handle_timeout(now);
        self.pump(now, 2000);
    }

    /// The backup takes over (the active is gone); the hosts it knew to hold
    /// unprotected mappings.
    fn take_over(&mut self, mut now: Time) -> Vec<IpAddr> {
        for _ in 0..40 {
            now = now.plus(Duration::from_millis(HB));
            self.b.link_read(now);
            self.b.handle_timeout(now);
            while let Some(ev) = self.b.poll_event() {
                if let Event::Promoted {
                    unprotected_hosts,
                    complete,
                    ..
                } = ev
                {
                    assert!(complete, "the backup held a complete copy");
                    return unprotected_hosts;
                }
            }
        }
        panic!("the backup never took over");
    }
}

#[test]
fn many_unprotected_hosts_copy_in_pages_and_the_backup_gets_ready() {
    let (mut p, mut now) = Pair::new();
    for _ in 0..50 {
        now = now.plus(Duration::from_millis(HB));
        p.tick(now);
        if p.a.status(now).ready {
            break;
        }
    }
    assert_eq!(p.copies, 1, "one full copy, never started again");
    assert!(p.a.status(now).ready, "the active sees its backup ready");
    assert!(p.b.status(now).ready, "the backup holds the whole copy");
    let mut held = p.take_over(now);
    held.sort();
    assert_eq!(
        held.len(),
        p.hosts.len(),
        "the backup knows every unprotected host"
    );
    assert!(held == p.hosts, "the backup knows every unprotected host");
}

#[test]
fn a_host_change_during_the_host_pages_wins_over_the_copy() {
    let (mut p, mut now) = Pair::new();
    // The first exchanges start the copy and send its first pages.
    now = now.plus(Duration::from_millis(HB));
    p.a.handle_timeout(now);
    p.b.link_read(now);
    p.b.handle_timeout(now);
    p.pump(now, 20);
    assert_eq!(p.copies, 1, "the copy began");
    assert!(!p.b.status(now).ready, "the copy is still under way");
    // A host of the snapshot not sent yet (pages go from the end or the start: take
    // one from each end and the middle) loses its last unprotected mapping, and a new
    // host gets one.
    let gone = [
        p.hosts[0],
        p.hosts[p.hosts.len() / 2],
        p.hosts[p.hosts.len() - 1],
    ];
    for h in gone {
        p.a.push(
            &Change::Host {
                host: h,
                unprotected: false,
            },
            now,
        );
    }
    let new = host(HOSTS + 1);
    p.a.push(
        &Change::Host {
            host: new,
            unprotected: true,
        },
        now,
    );
    for _ in 0..50 {
        now = now.plus(Duration::from_millis(HB));
        p.tick(now);
        if p.a.status(now).ready {
            break;
        }
    }
    assert_eq!(p.copies, 1, "one full copy, never started again");
    assert!(p.a.status(now).ready);
    let mut want: Vec<IpAddr> = p
        .hosts
        .iter()
        .copied()
        .filter(|h| !gone.contains(h))
        .chain([new])
        .collect();
    want.sort();
    let mut held = p.take_over(now);
    held.sort();
    assert_eq!(held.len(), want.len());
    assert!(held == want, "a live change is not undone by the copy");
    assert_eq!(p.b.role(), Role::Active);
}

fn mapping(port: u16, now: Time) -> Mapping {
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
        subscriber: SubscriberId::Named("s".into()),
        checkpoint_requested: true,
        checkpoint: Reason::Requested,
        filters: Box::new([]),
        description: None,
        created: now,
    }
}

/// Frames both ways until neither node has anything to say; bulk requests go to
/// `requests` for the caller to answer.
fn exchange(a: &mut HaNode, b: &mut HaNode, now: Time, requests: &mut Vec<u32>) {
    let mut buf = vec![0u8; MAX_FRAME];
    for _ in 0..2000 {
        let mut moved = false;
        while let Some(ev) = a.poll_event() {
            if let Event::NeedBulk { cursor } = ev {
                requests.push(cursor);
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

/// The shell answers a bulk request (one mapping per chunk) after the copy it was
/// asked for was dropped and a new one began: the new copy must still send every
/// mapping from the first.
#[test]
fn a_bulk_answer_for_a_dropped_copy_is_ignored() {
    let cfg = HaConfig {
        bulk_chunk: 1,
        ..cfg()
    };
    let mut now = Time(0);
    let maps: Vec<Mapping> = (1..=5).map(|p| mapping(p, now)).collect();
    let answer = |a: &mut HaNode, cursor: u32, now: Time| {
        let from = cursor as usize;
        let next = (from + 1 < maps.len()).then_some(from as u32 + 1);
        a.bulk_chunk(cursor, &maps[from..from + 1], next, &[], now);
    };
    let mut a = HaNode::new(cfg, true, 11, now);
    let mut b = HaNode::new(cfg, false, 22, now);
    a.promote(now);
    let mut requests = Vec::new();
    let mut stale = None;
    for _ in 0..20 {
        now = now.plus(Duration::from_millis(HB));
        a.handle_timeout(now);
        b.link_read(now);
        b.handle_timeout(now);
        exchange(&mut a, &mut b, now, &mut requests);
        for cursor in std::mem::take(&mut requests) {
            if cursor == 2 {
                // The shell is still building this answer...
                stale = Some(cursor);
            } else {
                answer(&mut a, cursor, now);
            }
        }
        if stale.is_some() {
            break;
        }
    }
    let stale = stale.expect("the copy asked for its third chunk");
    // ... when the backup restarts: it needs a fresh copy.
    let mut b = HaNode::new(cfg, false, 33, now);
    for _ in 0..3 {
        now = now.plus(Duration::from_millis(HB));
        a.handle_timeout(now);
        b.link_read(now);
        b.handle_timeout(now);
        exchange(&mut a, &mut b, now, &mut requests);
    }
    assert_eq!(requests.first(), Some(&0), "a new copy began");
    // The late answer comes in now.
    answer(&mut a, stale, now);
    for _ in 0..30 {
        now = now.plus(Duration::from_millis(HB));
        a.handle_timeout(now);
        b.link_read(now);
        b.handle_timeout(now);
        exchange(&mut a, &mut b, now, &mut requests);
        for cursor in std::mem::take(&mut requests) {
            answer(&mut a, cursor, now);
        }
        if a.status(now).ready {
            break;
        }
    }
    assert!(b.status(now).ready, "the new copy completed");
    assert_eq!(
        b.status(now).stored,
        maps.len(),
        "every mapping in the copy"
    );
}
