//! Memory and cost per mapping of the server core at scale (a benchmark, not a test).
//!
//! `cargo run --release -p pcp-server --example scale -- [MAPPINGS]` creates MAPPINGS
//! mappings (default 1 000 000) through `Server::handle`, then reports resident bytes
//! per mapping and the cost of a renewal at that size against the cost at 1 000
//! mappings, measured in the same run.

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

/// Mean nanoseconds per renewal over `rounds` passes of the first `live` mappings.
fn renew_cost(server: &mut Server, live: usize, rounds: usize, now: Time) -> f64 {
    let mut req = [0u8; 1100];
    let mut reply = [0u8; 1100];
    let mut effects: Vec<Effect> = Vec::new();
    let count = 200_000.min(live * rounds);
    let start = Instant::now();
    for k in 0..count {
        // A stride spreads the renewals over the whole table, as real clients do.
        let i = (k * 7919) % live;
        let (n, src) = request(i, true, &mut req);
        let r = server.handle(&req[..n], src, now, &mut reply, &mut effects);
        assert!(matches!(r, Reply::Send(_)));
        effects.clear();
    }
    start.elapsed().as_nanos() as f64 / count as f64
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let now = Time(1_000);
    let mut server = Server::new(config(n), now, 1).expect("config");
    let mut req = [0u8; 1100];
    let mut reply = [0u8; 1100];
    let mut effects: Vec<Effect> = Vec::new();

    for i in 0..1000 {
        let (len, src) = request(i, true, &mut req);
        server.handle(&req[..len], src, now, &mut reply, &mut effects);
        effects.clear();
    }
    let small = renew_cost(&mut server, 1000, 200, now);
    let rss_before = rss_bytes();
    let t = Instant::now();
    for i in 1000..n {
        let (len, src) = request(i, true, &mut req);
        let r = server.handle(&req[..len], src, now, &mut reply, &mut effects);
        assert!(matches!(r, Reply::Send(_)));
        effects.clear();
    }
    let create_ns = t.elapsed().as_nanos() as f64 / (n - 1000).max(1) as f64;
    let rss_after = rss_bytes();
    assert_eq!(server.mapping_count(), n);
    let large = renew_cost(&mut server, n, 1, now);
    println!("mappings: {n}");
    println!("create: {create_ns:.0} ns/mapping");
    println!(
        "resident: {:.0} bytes/mapping (RSS {} -> {} MiB)",
        (rss_after.saturating_sub(rss_before)) as f64 / (n - 1000).max(1) as f64,
        rss_before >> 20,
        rss_after >> 20
    );
    println!(
        "renew at 1k: {small:.0} ns; renew at {n}: {large:.0} ns; ratio (1k/large) {:.2}",
        small / large
    );

    // A takeover: adopt every mapping into a fresh core (what a backup does when it
    // becomes active).
    let all: Vec<_> = server.mappings().collect();
    let mut fresh = Server::new(config(n), now, 2).expect("config");
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
