//! What a backup spends per mapping of a bulk copy (a benchmark, not a test).
//!
//! `cargo run --release -p pcp-ha --example resync -- [MAPPINGS] [ROUNDS]` has an
//! active node write a full copy of MAPPINGS checkpointed mappings (default 1 000 000,
//! 100 hosts × 10 000 ports, 32 external addresses, as `scripts/bench/ha-failover.sh`
//! fills) into frames once, then replays those frames, ROUNDS times (default 3), into:
//!
//! - `decode`: a plain loop reading every record (the baseline: what the wire format
//!   costs at least);
//! - `node`: a backup [`HaNode`] without standby (decode + store in its copy);
//! - `standby`: a standby backup node whose [`Replica`] events are mirrored into a
//!   server core and an in-memory data plane, as pcpd's core task does
//!   (`Core::mirror`): the whole work of a standby backup during a resync. Twice: with
//!   tables that grow as the copy arrives and a data plane batch per mapping (pcpd
//!   before the tables were pre-sized), and pre-sized with a batch per 4096 (pcpd now).
//!
//! With `RESYNC_KEYED=1` instead: the backup node alone, with plain frames and with
//! frames sealed and opened by the link layer (`[ha] key_file`), interleaved.
//!
//! Reports records/s per stage and, in brackets, its ratio to `decode` of the same
//! round; once by wall time and once by the thread's CPU time (which a loaded machine
//! inflates less: it leaves out the time other processes had the CPU).

use std::net::IpAddr;
use std::time::{Duration, Instant};

use pcp_dataplane::memory::MemoryDataPlane;
use pcp_dataplane::{DataPlane, Op};
use pcp_ha::seal::{LinkKey, Opener, Sealer};
use pcp_ha::wire::{self, Kind, MAX_FRAME, Reader};
use pcp_ha::{Event, HaConfig, HaNode, Replica};
use pcp_server::config::TierConfig;
use pcp_server::pool::ExternalEndpoint;
use pcp_server::subscriber::SubscriberId;
use pcp_server::{Effect, Mapping, MappingKey, Origin, Reason, Server, ServerConfig, Time};

const ADDRS: usize = 32;
const PER_HOST: usize = 10_000;

fn pool_addr(i: usize) -> IpAddr {
    IpAddr::from([198, 18, 0, (i % ADDRS + 1) as u8])
}

fn server_config(n: usize) -> ServerConfig {
    let mut cfg = ServerConfig::default();
    cfg.pool.addresses = (0..ADDRS).map(pool_addr).collect();
    cfg.pool.port_min = 1024;
    cfg.pool.port_max = 65535;
    cfg.checkpoint.capacity = 2 * n as u64;
    cfg.tiers.insert(
        "default".into(),
        TierConfig {
            mapping_quota: PER_HOST as u32,
            checkpoint_quota: PER_HOST as u32,
            checkpoint_rate: 1e9,
            checkpoint_burst: 1_000_000_000,
        },
    );
    cfg
}

fn mapping(i: usize) -> Mapping {
    let host = i / PER_HOST;
    let internal = IpAddr::from([10, 8, (host / 256) as u8, (host % 256) as u8]);
    let mut nonce = [0u8; 12];
    nonce[..8].copy_from_slice(&(i as u64).to_be_bytes());
    Mapping {
        key: MappingKey {
            internal,
            protocol: 17,
            internal_port: 1024 + (i % PER_HOST) as u16,
            remote: None,
        },
        nonce,
        origin: Origin::Pcp,
        client: internal,
        external: ExternalEndpoint {
            addr: pool_addr(i),
            protocol: 17,
            port: 1024 + (i / ADDRS) as u16,
        },
        expires: Time(3_600_000),
        lifetime: 3600,
        subscriber: SubscriberId::Named("x".into()),
        checkpoint_requested: true,
        checkpoint: Reason::Requested,
        filters: Box::new([]),
        description: None,
        created: Time(0),
    }
}

fn cfg(standby: bool, n: usize) -> HaConfig {
    HaConfig {
        standby,
        expected: n,
        window: 1 << 30,
        max_log: 1 << 24,
        ..HaConfig::default()
    }
}

/// The DATA frames of a full copy of `n` mappings, in order.
fn copy_frames(n: usize) -> Vec<Vec<u8>> {
    let maps: Vec<Mapping> = (0..n).map(mapping).collect();
    let now = Time(0);
    let mut a = HaNode::new(cfg(false, 0), true, 1, now);
    a.promote(now);
    let mut b = HaNode::new(cfg(false, 0), false, 2, now);
    let mut buf = vec![0u8; MAX_FRAME];
    let mut frames = Vec::new();
    loop {
        let mut moved = false;
        while let Some(ev) = a.poll_event() {
            if let Event::NeedBulk { cursor } = ev {
                let from = cursor as usize;
                let to = (from + 4096).min(n);
                let next = (to < n).then_some(to as u32);
                a.bulk_chunk(cursor, &maps[from..to], next, &[], now);
                moved = true;
            }
        }
        while let Some(len) = a.poll_transmit(now, &mut buf) {
            let f = &buf[..len];
            if wire::read_header(&mut Reader::new(f)).is_ok_and(|h| h.kind == Kind::Data) {
                frames.push(f.to_vec());
            }
            b.handle_frame(f, now);
            moved = true;
        }
        while b.poll_event().is_some() {}
        while let Some(len) = b.poll_transmit(now, &mut buf) {
            a.handle_frame(&buf[..len], now);
            moved = true;
        }
        if !moved {
            break;
        }
    }
    assert_eq!(b.status(now).stored, n, "the copy reached the backup");
    assert!(b.status(now).ready);
    frames
}

/// Reads every record, 5 times over (so that it runs long enough to time).
fn decode(frames: &[Vec<u8>]) -> usize {
    let mut n = 0;
    for f in frames.iter().cycle().take(5 * frames.len()) {
        let mut r = Reader::new(f);
        wire::read_header(&mut r).unwrap();
        let (_, count) = wire::read_data_prefix(&mut r).unwrap();
        for _ in 0..count {
            std::hint::black_box(wire::read_record(&mut r).unwrap());
            n += 1;
        }
    }
    n
}

fn node_only(frames: &[Vec<u8>], n: usize) -> usize {
    let now = Time(1);
    let mut b = HaNode::new(cfg(false, n), false, 3, now);
    for f in frames {
        b.handle_frame(f, now);
        while b.poll_event().is_some() {}
    }
    let stored = b.status(now).stored;
    std::thread::spawn(move || drop(b));
    stored
}

/// As [`node_only`], every frame sealed by the active's link layer and opened by the
/// backup's first (`[ha] key_file`): both ends' crypto on one CPU.
fn node_keyed(frames: &[Vec<u8>], n: usize) -> usize {
    let now = Time(1);
    let key =
        LinkKey::from_octets(&std::array::from_fn::<u8, 32, _>(|i| i as u8 * 13 + 5)).expect("key");
    let sealer = Sealer::new(&key).expect("randomness");
    let mut opener = Opener::new(&key, [0; pcp_ha::seal::SALT_LEN]);
    let mut buf = vec![0u8; MAX_FRAME + pcp_ha::seal::OVERHEAD];
    let mut b = HaNode::new(cfg(false, n), false, 3, now);
    for f in frames {
        buf[..f.len()].copy_from_slice(f);
        let sealed = sealer.seal(&mut buf, f.len()).expect("seal");
        let plain = opener.open(&mut buf[..sealed]).expect("open");
        b.handle_frame(&buf[..plain], now);
        while b.poll_event().is_some() {}
    }
    let stored = b.status(now).stored;
    std::thread::spawn(move || drop(b));
    stored
}

/// As pcpd's core task: every replica change through the server core, its data plane
/// operations applied as one batch per `batch` changes; with `presize`, the core and
/// data plane sized for the copy up front (as pcpd does from its checkpoint capacity).
fn standby(frames: &[Vec<u8>], n: usize, presize: bool, batch: usize) -> usize {
    let now = Time(1);
    let mut b = HaNode::new(cfg(true, n), false, 4, now);
    let mut server = Server::new(server_config(n), now, 4).unwrap();
    let mut dp = MemoryDataPlane::new();
    if presize {
        server.reserve(2 * n);
        dp.reserve(2 * n);
    }
    let mut effects = Vec::new();
    let mut ops: Vec<Op> = Vec::new();
    let mut queued = 0;
    for f in frames {
        b.handle_frame(f, now);
        while let Some(ev) = b.poll_event() {
            let Event::Replica(change) = ev else { continue };
            let mut flush = |effects: &mut Vec<Effect>| {
                queued += 1;
                if queued == batch {
                    queued = 0;
                    ops.clear();
                    ops.extend(effects.drain(..).filter_map(|e| match e {
                        Effect::DataPlane(op) => Some(op),
                        Effect::Replicate(_) => None,
                    }));
                    dp.apply(&ops).unwrap();
                }
            };
            match change {
                Replica::Upsert(maps) => {
                    for m in &maps {
                        server.mirror_upsert(m, now, &mut effects).unwrap();
                        flush(&mut effects);
                    }
                }
                Replica::Remove(keys) => {
                    for k in &keys {
                        server.mirror_remove(k, &mut effects);
                        flush(&mut effects);
                    }
                }
            }
        }
    }
    ops.clear();
    ops.extend(effects.drain(..).filter_map(|e| match e {
        Effect::DataPlane(op) => Some(op),
        Effect::Replicate(_) => None,
    }));
    dp.apply(&ops).unwrap();
    assert_eq!(dp.len(), n);
    let held = server.checkpointed_count() as usize;
    // Freed outside the timing, as pcpd frees a retired copy on another thread.
    std::thread::spawn(move || drop((b, server, dp)));
    held
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

/// CPU time this thread has used (user + system, from /proc, 10 ms ticks): on a
/// shared machine, wall time also counts the time other processes had the CPU.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses), from the state on:
    // utime is the 12th, stime the 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    let ticks = field(11) + field(12);
    Duration::from_millis(ticks * 10)
}

/// Runs `stage`, returning records/s by wall time and by this thread's CPU time.
fn timed(stage: impl FnOnce() -> usize) -> (f64, f64) {
    let (t, c) = (Instant::now(), cpu_time());
    let n = stage();
    (rate(n, t.elapsed()), rate(n, cpu_time() - c))
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args
        .next()
        .map_or(1_000_000, |a| a.parse().expect("MAPPINGS"));
    let rounds: usize = args.next().map_or(3, |a| a.parse().expect("ROUNDS"));
    let t = Instant::now();
    let frames = copy_frames(n);
    let octets: usize = frames.iter().map(Vec::len).sum();
    println!(
        "copy of {n} mappings: {} frames, {octets} octets ({:.1} per record), written in {:?}",
        frames.len(),
        octets as f64 / n as f64,
        t.elapsed()
    );
    if let Ok(stage) = std::env::var("RESYNC_ONLY") {
        // For a profiler: one stage only, no timing.
        for _ in 0..rounds {
            let s = match stage.as_str() {
                "decode" => decode(&frames),
                "node" => node_only(&frames, n),
                "keyed" => node_keyed(&frames, n),
                "grown" => standby(&frames, n, false, 1),
                _ => standby(&frames, n, true, 4096),
            };
            println!("{stage}: {s} records");
        }
        return;
    }
    if std::env::var_os("RESYNC_KEYED").is_some() {
        // The link's cost: plain and keyed backup node, interleaved A/B/B/A per round
        // so that a noisy neighbour weighs on both alike.
        for round in 1..=rounds {
            let mut plain = (0.0, 0.0);
            let mut keyed = (0.0, 0.0);
            for keyed_turn in [false, true, true, false] {
                let (w, c) = if keyed_turn {
                    timed(|| node_keyed(&frames, n))
                } else {
                    timed(|| node_only(&frames, n))
                };
                let acc = if keyed_turn { &mut keyed } else { &mut plain };
                acc.0 += w / 2.0;
                acc.1 += c / 2.0;
            }
            println!(
                "round {round}: node plain {:.0} rec/s, keyed {:.0} ({:.3}) wall | plain {:.0}, keyed {:.0} ({:.3}) cpu",
                plain.0,
                keyed.0,
                keyed.0 / plain.0,
                plain.1,
                keyed.1,
                keyed.1 / plain.1
            );
        }
        return;
    }
    for round in 1..=rounds {
        let (base, base_cpu) = timed(|| decode(&frames));
        let (node, node_cpu) = timed(|| {
            let s = node_only(&frames, n);
            assert_eq!(s, n);
            s
        });
        let (plain, plain_cpu) = timed(|| {
            let s = standby(&frames, n, false, 1);
            assert_eq!(s, n);
            s
        });
        let (sb, sb_cpu) = timed(|| {
            let s = standby(&frames, n, true, 4096);
            assert_eq!(s, n);
            s
        });
        println!(
            "round {round} (wall): decode {base:.0} rec/s | node {node:.0} ({:.3}) | standby, grown and per change {plain:.0} ({:.3}) | standby, presized and per 4096 {sb:.0} ({:.3})",
            node / base,
            plain / base,
            sb / base
        );
        println!(
            "round {round} (cpu):  decode {base_cpu:.0} rec/s | node {node_cpu:.0} ({:.3}) | standby, grown and per change {plain_cpu:.0} ({:.3}) | standby, presized and per 4096 {sb_cpu:.0} ({:.3})",
            node_cpu / base_cpu,
            plain_cpu / base_cpu,
            sb_cpu / base_cpu
        );
    }
}
