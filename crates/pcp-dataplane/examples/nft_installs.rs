//! Mapping installs per second into the nftables data plane, against the in-memory one
//! as the baseline of the same run (docs/BENCHMARKS.md). Needs root; run it inside a
//! network namespace of its own (scripts/bench/nftables.sh does):
//!
//! ```text
//! ip netns add b; ip netns exec b target/release/examples/nft_installs [TOTAL] [BATCH…]
//! ```
//!
//! For each batch size (default 1, 64 and 1024 entries per `apply`), fills a fresh table
//! with TOTAL (default 100 000) MAP entries and prints the cost per entry of each
//! successive tenth of the fill (is it flat from the first thousands to the last?),
//! then removes them all the same way.
#![forbid(unsafe_code)]

#[cfg(all(feature = "nftables", target_os = "linux"))]
fn main() {
    use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
    use std::time::Instant;

    use pcp_dataplane::memory::MemoryDataPlane;
    use pcp_dataplane::nftables::{NftConfig, NftDataPlane};
    use pcp_dataplane::{DataPlane, Direction, Entry, Op};

    let args: Vec<String> = std::env::args().skip(1).collect();
    let total: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let batches: Vec<usize> = if args.len() > 1 {
        args[1..].iter().filter_map(|a| a.parse().ok()).collect()
    } else {
        vec![1, 64, 1024]
    };
    let entry = |i: usize| Entry {
        direction: Direction::Inbound,
        protocol: if i.is_multiple_of(2) { 17 } else { 6 },
        internal: SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(0x0a00_0000 + (i / 1000) as u32 + 1),
            10_000 + (i % 1000) as u16,
        )),
        external: SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::new(192, 0, 2, 1 + (i / 60_000) as u8),
            1024 + (i % 60_000) as u16,
        )),
        filters: Box::new([]),
    };
    let entries: Vec<Entry> = (0..total).map(entry).collect();
    let run = |name: &str, dp: &mut dyn DataPlane, batch: usize| {
        let tenth = (total / 10).max(1);
        let mut line = Vec::new();
        let start = Instant::now();
        let mut mark = Instant::now();
        for (n, chunk) in entries.chunks(batch).enumerate() {
            let ops: Vec<Op> = chunk.iter().cloned().map(Op::Install).collect();
            dp.apply(&ops).expect("install");
            let done = (n + 1) * batch;
            if done % tenth < batch && done >= tenth {
                line.push(mark.elapsed().as_secs_f64() * 1e6 / tenth as f64);
                mark = Instant::now();
            }
        }
        let fill = start.elapsed().as_secs_f64();
        assert_eq!(dp.len(), total);
        let start = Instant::now();
        for chunk in entries.chunks(batch) {
            let ops: Vec<Op> = chunk.iter().cloned().map(Op::Remove).collect();
            dp.apply(&ops).expect("remove");
        }
        let empty = start.elapsed().as_secs_f64();
        assert_eq!(dp.len(), 0);
        let per: Vec<String> = line.iter().map(|us| format!("{us:.2}")).collect();
        println!(
            "{name:9} batch {batch:5}: install {:>9.0}/s, remove {:>9.0}/s; µs per install by tenth of the fill: {}",
            total as f64 / fill,
            total as f64 / empty,
            per.join(" ")
        );
        total as f64 / fill
    };
    println!("{total} MAP entries (2 elements each in nftables: dnat4 + msnat4)");
    for &batch in &batches {
        let mem = run("memory", &mut MemoryDataPlane::new(), batch);
        let mut nft = NftDataPlane::open(NftConfig {
            table: "pcpdbench".into(),
            ..NftConfig::default()
        })
        .expect("open the nftables data plane (root, in a namespace of its own)");
        let n = run("nftables", &mut nft, batch);
        nft.remove_table().expect("remove the table");
        println!(
            "          batch {batch:5}: nftables / memory = {:.4}",
            n / mem
        );
    }
}

#[cfg(not(all(feature = "nftables", target_os = "linux")))]
fn main() {
    eprintln!("build with --features nftables (Linux)");
}
