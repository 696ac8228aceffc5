//! What the host records of hosts with unprotected mappings cost (a benchmark, not a
//! test; docs/BENCHMARKS.md, "Host records for unprotected hosts").
//!
//! `cargo run --release -p pcp-ha --example host_records -- [HOSTS] [ROUNDS]` serves
//! HOSTS (default 200 000) fresh hosts one MAP each, without option 192, through a
//! server core whose backup is ready — every one is a host's first unprotected mapping,
//! so each now yields one `Change::Host` record — then renews each once (no record).
//! Per request it times, in the same round:
//!
//! - `first/core`: `Server::handle` alone (what the client waits for: the record is not
//!   waited for);
//! - `first/core+ha`: the same plus pushing its records into an active [`HaNode`],
//!   writing them into frames and applying them on a backup node (the whole extra work
//!   a record costs the pair, off the reply's path except the push);
//! - `first/core+push`: `Server::handle` and pushing its records into the active node
//!   (what pcpd's core task does before it sends the reply);
//! - `renew/core`: renewals (no record: unchanged by the host records).
//!
//! Reports ns per request and, for `first/core+push` and `first/core+ha`, the ratio to
//! `first/core` of the same round.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use pcp_ha::wire::MAX_FRAME;
use pcp_ha::{Event, HaConfig, HaNode};
use pcp_proto::{Body, MapBody, Options, Request, ResultCode};
use pcp_server::checkpoint::BackupStatus;
use pcp_server::{Effect, Server, ServerConfig, Time};

fn host(i: usize) -> IpAddr {
    IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8])
}

fn map_request(h: IpAddr) -> Vec<u8> {
    let req = Request {
        lifetime: 3600,
        client_addr: h,
        body: Body::Map(MapBody {
            nonce: [7; 12],
            protocol: 17,
            internal_port: 5000,
            external_port: 0,
            external_addr: IpAddr::from([0u8; 16]),
        }),
        options: Options::from_list(&[]),
        pa_result_code: ResultCode::Success,
    };
    let mut buf = vec![0u8; 1100];
    let n = req.emit(&mut buf).expect("request fits");
    buf.truncate(n);
    buf
}

fn config(hosts: usize) -> ServerConfig {
    let mut cfg = ServerConfig::default();
    cfg.pool.addresses = (1..=32).map(|i| IpAddr::from([198, 18, 0, i])).collect();
    cfg.limits.host_rate = 0.0;
    cfg.checkpoint.capacity = 2 * hosts as u64;
    cfg
}

/// A ready pair of HA nodes (A active, B its backup).
fn pair(now: Time, buf: &mut [u8]) -> (HaNode, HaNode) {
    let cfg = HaConfig {
        heartbeat: Duration::from_millis(100),
        detection: Duration::from_secs(3600),
        ..HaConfig::default()
    };
    let mut a = HaNode::new(cfg, true, 11, now);
    let mut b = HaNode::new(cfg, false, 22, now);
    a.promote(now);
    let mut t = now;
    for _ in 0..10 {
        t = t.plus(Duration::from_millis(100));
        exchange(&mut a, &mut b, t, buf);
    }
    assert!(a.status(t).ready, "the backup holds the copy");
    (a, b)
}

fn exchange(a: &mut HaNode, b: &mut HaNode, now: Time, buf: &mut [u8]) {
    for n in [&mut *a, &mut *b] {
        n.handle_timeout(now);
        while let Some(ev) = n.poll_event() {
            if let Event::NeedBulk { cursor } = ev {
                n.bulk_chunk(cursor, &[], None, &[], now);
            }
        }
    }
    while let Some(n) = a.poll_transmit(now, buf) {
        b.handle_frame(&buf[..n], now);
    }
    while let Some(n) = b.poll_transmit(now, buf) {
        a.handle_frame(&buf[..n], now);
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let hosts: usize = args.next().map_or(200_000, |a| a.parse().expect("HOSTS"));
    let rounds: usize = args.next().map_or(3, |a| a.parse().expect("ROUNDS"));
    let requests: Vec<Vec<u8>> = (0..hosts).map(|i| map_request(host(i))).collect();
    let mut reply = vec![0u8; 1100];
    let mut buf = vec![0u8; MAX_FRAME];
    for round in 1..=rounds {
        let start = Time(1_000);
        // first/core: the core alone.
        let mut s = Server::new(config(hosts), start, round as u64).expect("config");
        s.set_backup_status(BackupStatus::Ready);
        let mut fx = Vec::new();
        let mut records = 0usize;
        let t0 = Instant::now();
        for (i, r) in requests.iter().enumerate() {
            fx.clear();
            let src = SocketAddr::new(host(i), 5350);
            s.handle(r, src, start, &mut reply, &mut fx);
            records += fx
                .iter()
                .filter(|e| matches!(e, Effect::Replicate(_)))
                .count();
        }
        let core = t0.elapsed();
        // renew/core: every host renews its one mapping (no record).
        let t0 = Instant::now();
        for (i, r) in requests.iter().enumerate() {
            fx.clear();
            s.handle(
                r,
                SocketAddr::new(host(i), 5350),
                start,
                &mut reply,
                &mut fx,
            );
        }
        let renew = t0.elapsed();
        drop(s);
        // first/core+ha: the same requests on a fresh core, records through the pair.
        let mut s = Server::new(config(hosts), start, round as u64).expect("config");
        s.set_backup_status(BackupStatus::Ready);
        let (mut a, mut b) = pair(start, &mut buf);
        let now = start.plus(Duration::from_secs(1));
        let t0 = Instant::now();
        for (i, r) in requests.iter().enumerate() {
            fx.clear();
            let src = SocketAddr::new(host(i), 5350);
            s.handle(r, src, now, &mut reply, &mut fx);
            for e in &fx {
                if let Effect::Replicate(c) = e {
                    a.push(c, now);
                }
            }
            if i % 64 == 63 {
                exchange(&mut a, &mut b, now, &mut buf);
            }
        }
        exchange(&mut a, &mut b, now, &mut buf);
        let both = t0.elapsed();
        assert_eq!(a.status(now).lag, 0, "the backup applied every record");
        // first/core+push: what is on the reply's path in pcpd (the core task pushes
        // the records under the pair lock; frames go out from the replication thread).
        drop(s);
        let mut s = Server::new(config(hosts), start, round as u64).expect("config");
        s.set_backup_status(BackupStatus::Ready);
        let (mut a, mut b) = pair(start, &mut buf);
        let t0 = Instant::now();
        for (i, r) in requests.iter().enumerate() {
            fx.clear();
            let src = SocketAddr::new(host(i), 5350);
            s.handle(r, src, now, &mut reply, &mut fx);
            for e in &fx {
                if let Effect::Replicate(c) = e {
                    a.push(c, now);
                }
            }
        }
        let pushed = t0.elapsed();
        exchange(&mut a, &mut b, now, &mut buf);
        let ns = |d: Duration| d.as_nanos() as f64 / hosts as f64;
        println!(
            "round {round}: {hosts} hosts, {records} records; first/core {:.0} ns, first/core+push {:.0} ns ({:.2} x), first/core+ha {:.0} ns ({:.2} x), renew/core {:.0} ns",
            ns(core),
            ns(pushed),
            ns(pushed) / ns(core),
            ns(both),
            ns(both) / ns(core),
            ns(renew)
        );
    }
}
