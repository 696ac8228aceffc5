//! Memory and cost per mapping of the server core at scale (a benchmark, not a test).
//!
//! `cargo run --release -p pcp-server --example scale -- [MAPPINGS]` creates MAPPINGS
//! mappings (default 1 000 000) through `Server::handle`, then reports resident bytes
//! per mapping and the cost of a renewal at that size against the cost at 1 000
//! mappings, measured in the same run: two cores side by side, renewed in alternating
//! rounds so that whatever else the machine does falls on both alike; the median round
//! of each counts.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use pcp_proto::{Body, MapBody, Options, PcpOption, Request, ResultCode, protocol};
use pcp_server::config::TierConfig;
use pcp_server::{Effect, Reply, Server, ServerConfig, Time};

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn config(n: usize) -> ServerConfig {
    let mut cfg = ServerConfig::default();
    let addrs = n / 60_000 + 1;
    cfg.pool.addresses = (0..addrs)
        .map(|i| IpAddr::from([198, 18, (i / 250) as u8, (i % 250 + 1) as u8]))
        .collect();
    cfg.tiers.insert(
        "default".into(),
        TierConfig {
            mapping_quota: 1_000_000,
            checkpoint_quota: 1_000_000,
            checkpoint_rate: 1e9,
            checkpoint_burst: 1_000_000_000,
        },
    );
    cfg.checkpoint.without_backup = pcp_server::config::WithoutBackup::Honour;
    cfg
}

/// Host `i / 1000`, port `10000 + i % 1000`.
fn request(i: usize, checkpoint: bool, buf: &mut [u8]) -> (usize, SocketAddr) {
    let host = IpAddr::from([
        10,
        (i / 1000 / 65536) as u8,
        (i / 1000 / 256 % 256) as u8,
        (i / 1000 % 256) as u8,
    ]);
    let opts = [PcpOption::CheckpointRequired];
    let mut nonce = [0u8; 12];
    nonce[..8].copy_from_slice(&(i as u64).to_be_bytes());
    let req = Request {
        lifetime: 3600,
        client_addr: host,
        body: Body::Map(MapBody {
            nonce,
            protocol: protocol::UDP,
            internal_port: 10_000 + (i % 1000) as u16,
            external_port: 0,
            external_addr: IpAddr::from([0, 0, 0, 0]),
        }),
        options: Options::from_list(if checkpoint { &opts } else { &[] }),
        pa_result_code: ResultCode::Success,
    };
    (req.emit(buf).expect("fits"), SocketAddr::new(host, 40_000))
}

/// Renewals per measured round.
const ROUND: usize = 20_000;
/// Rounds per core.
const ROUNDS: usize = 15;

/// Mean nanoseconds per renewal over one round of `ROUND` renewals of the `live`
/// mappings, starting at renewal number `from`.
fn renew_cost(server: &mut Server, live: usize, from: usize, now: Time) -> f64 {
    let mut req = [0u8; 1100];
    let mut reply = [0u8; 1100];
    let mut effects: Vec<Effect> = Vec::new();
    let start = Instant::now();
    for k in from..from + ROUND {
        // A stride spreads the renewals over the whole table, as real clients do.
        let i = (k * 7919) % live;
        let (n, src) = request(i, true, &mut req);
        let r = server.handle(&req[..n], src, now, &mut reply, &mut effects);
        assert!(matches!(r, Reply::Send(_)));
        effects.clear();
    }
    start.elapsed().as_nanos() as f64 / ROUND as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Fills a fresh core with mappings `0..n`.
fn fill(n: usize, now: Time) -> Server {
    let mut server = Server::new(config(n), now, 1).expect("config");
    let mut req = [0u8; 1100];
    let mut reply = [0u8; 1100];
    let mut effects: Vec<Effect> = Vec::new();
    for i in 0..n {
        let (len, src) = request(i, true, &mut req);
        let r = server.handle(&req[..len], src, now, &mut reply, &mut effects);
        assert!(matches!(r, Reply::Send(_)));
        effects.clear();
    }
    assert_eq!(server.mapping_count(), n);
    server
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let now = Time(1_000);
    let mut small = fill(1000, now);
    let rss_before = rss_bytes();
    let t = Instant::now();
    let mut server = fill(n, now);
    let create_ns = t.elapsed().as_nanos() as f64 / n as f64;
    let rss_after = rss_bytes();
    let (mut at_small, mut at_large) = (Vec::new(), Vec::new());
    for r in 0..ROUNDS {
        at_small.push(renew_cost(&mut small, 1000, r * ROUND, now));
        at_large.push(renew_cost(&mut server, n, r * ROUND, now));
    }
    let (small_ns, large_ns) = (median(at_small), median(at_large));
    println!("mappings: {n}");
    println!("create: {create_ns:.0} ns/mapping");
    println!(
        "resident: {:.0} bytes/mapping (RSS {} -> {} MiB)",
        (rss_after.saturating_sub(rss_before)) as f64 / n as f64,
        rss_before >> 20,
        rss_after >> 20
    );
    println!(
        "renew at 1k: {small_ns:.0} ns; renew at {n}: {large_ns:.0} ns; ratio (1k/large) {:.2} \
         (medians of {ROUNDS} alternating rounds of {ROUND})",
        small_ns / large_ns
    );

    // A takeover: adopt every mapping into a fresh core (what a backup does when it
    // becomes active).
    let all: Vec<_> = server.mappings().collect();
    let mut fresh = Server::new(config(n), now, 2).expect("config");
    let mut effects: Vec<Effect> = Vec::new();
    let t = Instant::now();
    for m in &all {
        fresh.adopt(m, now, &mut effects).expect("adoptable");
        effects.clear();
    }
    let adopt_ns = t.elapsed().as_nanos() as f64 / n as f64;
    println!(
        "adopt: {adopt_ns:.0} ns/mapping ({:.0} ms for {n})",
        adopt_ns * n as f64 / 1e6
    );
}
