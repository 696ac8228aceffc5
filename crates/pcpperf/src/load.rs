//! `pcpperf map` / `pcpperf peer`: closed-loop load from simulated PCP clients.
//!
//! Each client has its own UDP socket, bound to its own loopback address and connected
//! to the server, and keeps up to `window` requests outstanding. It cycles through
//! `mappings` mappings; each mapping's request is encoded once (its nonce is stable),
//! so every repeat is a renewal. Nothing is retransmitted: a request unanswered after
//! [`TIMEOUT`] counts as timed out and frees its window slot.
//!
//! Counting is by *send time*: a request belongs to the measured period when it was
//! sent inside it. After the period ends, clients stop sending and wait for their
//! outstanding requests to be answered or to time out, so
//! `requests == responses + timeouts` for the measured period.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use pcp_proto::{
    Body, MapBody, Opcode, Options, PcpOption, PeerBody, Request, Response, ResultCode,
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

use crate::addr;
use crate::report::{Counters, Report};

/// How long a request may stay unanswered before it counts as timed out.
pub const TIMEOUT: Duration = Duration::from_secs(1);
/// Internal port of a client's first mapping.
pub const FIRST_INTERNAL_PORT: u16 = 10_000;
/// Remote peer port of a client's first PEER mapping.
pub const FIRST_REMOTE_PORT: u16 = 20_000;
/// Remote peer address of PEER requests to an IPv4 server.
pub const REMOTE_PEER_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 250);
/// How often an idle client wakes to expire requests and notice the end of a phase.
const TICK: Duration = Duration::from_millis(10);
/// Datagrams handled per wake-up before a client refills its window.
const BUDGET: usize = 64;
/// Latencies above this (in ns) are clamped; far beyond [`TIMEOUT`].
const MAX_LATENCY_NS: u64 = 10_000_000_000;

/// Everything a load run needs; checked by [`run`].
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// MAP or PEER.
    pub opcode: Opcode,
    /// The PCP server (loopback).
    pub server: SocketAddr,
    /// Number of simulated clients.
    pub clients: u32,
    /// Outstanding requests per client.
    pub window: u32,
    /// Length of the measured period.
    pub duration: Duration,
    /// Length of the warm-up, whose numbers are discarded.
    pub warmup: Duration,
    /// Mappings per client.
    pub mappings: u32,
    /// Requested lifetime in seconds.
    pub lifetime: u32,
    /// Whether each request carries CHECKPOINT_REQUIRED (option 192).
    pub checkpoint: bool,
    /// Source address of the first client.
    pub source_base: IpAddr,
    /// Runtime worker threads (1: a single-threaded runtime).
    pub threads: u32,
    /// Requests per second each client sends at most (0: as fast as its window
    /// allows). A paced client is a well-behaved host beside a flood (`pcpperf flood`).
    pub rate: f64,
}

/// One mapping a client renews: its identity and its encoded request.
#[derive(Debug, Clone)]
struct Mapping {
    nonce: [u8; 12],
    datagram: Vec<u8>,
}

/// A request waiting for its response.
#[derive(Debug, Clone, Copy)]
struct Pending {
    seq: u64,
    sent: Instant,
    measured: bool,
}

/// The run's clock: warm-up, then the measured period, then draining.
#[derive(Debug)]
struct Phases {
    start: Instant,
    warmup_ns: u64,
    /// End of the measured period, in ns after `start`; lowered by SIGINT/SIGTERM.
    measure_end_ns: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Warmup,
    Measure,
    Done,
}

impl Phases {
    fn at(&self, now: Instant) -> Phase {
        let t = nanos(now.saturating_duration_since(self.start));
        if t < self.warmup_ns {
            Phase::Warmup
        } else if t < self.measure_end_ns.load(Ordering::Relaxed) {
            Phase::Measure
        } else {
            Phase::Done
        }
    }

    /// Ends the measured period now (or makes it empty if still warming up).
    fn stop_now(&self) {
        let t = nanos(self.start.elapsed()).max(self.warmup_ns);
        self.measure_end_ns.fetch_min(t, Ordering::Relaxed);
    }

    fn measured(&self) -> Duration {
        Duration::from_nanos(
            self.measure_end_ns
                .load(Ordering::Relaxed)
                .saturating_sub(self.warmup_ns),
        )
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// What one client measured.
struct ClientStats {
    counters: Counters,
    latency_ns: Histogram<u64>,
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).expect("valid histogram bounds")
}

/// The first internal port of client `client`'s mappings: clients that share the one
/// IPv6 loopback address get disjoint port ranges so that their mappings differ.
fn first_port(cfg: &LoadConfig, client: u32) -> u16 {
    match cfg.server {
        SocketAddr::V4(_) => FIRST_INTERNAL_PORT,
        SocketAddr::V6(_) => FIRST_INTERNAL_PORT + (client * cfg.mappings) as u16,
    }
}

fn check(cfg: &LoadConfig) -> Result<Vec<IpAddr>, String> {
    if !addr::is_loopback(cfg.server.ip()) {
        return Err(format!(
            "server {} is not a loopback address: pcpperf only talks to loopback",
            cfg.server.ip()
        ));
    }
    if !matches!(cfg.opcode, Opcode::Map | Opcode::Peer) {
        return Err(format!("cannot generate {:?} requests", cfg.opcode));
    }
    if cfg.clients == 0 || cfg.window == 0 || cfg.mappings == 0 || cfg.threads == 0 {
        return Err("--clients, --window, --mappings and --threads must be at least 1".into());
    }
    // Each IPv4 client has its own address; IPv6 clients share ::1 and split the ports.
    let port_users = if cfg.server.is_ipv4() { 1 } else { cfg.clients };
    let last_port =
        u64::from(FIRST_INTERNAL_PORT) + u64::from(port_users) * u64::from(cfg.mappings) - 1;
    if last_port > u64::from(u16::MAX) {
        return Err(format!(
            "{} mappings{} do not fit in internal ports {FIRST_INTERNAL_PORT}..=65535",
            u64::from(port_users) * u64::from(cfg.mappings),
            if port_users > 1 {
                " (IPv6 clients share ::1, so their ports are disjoint)"
            } else {
                ""
            }
        ));
    }
    addr::client_sources(cfg.source_base, cfg.clients, cfg.server)
}

/// The nonce of mapping `k` of client `client`: stable, so repeats are renewals.
fn nonce(client: u32, k: u32) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..2].copy_from_slice(b"pp");
    n[2..6].copy_from_slice(&client.to_be_bytes());
    n[6..10].copy_from_slice(&k.to_be_bytes());
    n[10..].copy_from_slice(b"pf");
    n
}

fn build_mappings(cfg: &LoadConfig, client: u32, client_addr: IpAddr) -> Vec<Mapping> {
    let unspecified = match client_addr {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let remote_addr = match client_addr {
        IpAddr::V4(_) => IpAddr::V4(REMOTE_PEER_V4),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
    };
    let checkpoint = [PcpOption::CheckpointRequired];
    let options = if cfg.checkpoint {
        Options::from_list(&checkpoint)
    } else {
        Options::EMPTY
    };
    let base = first_port(cfg, client);
    (0..cfg.mappings)
        .map(|k| {
            let nonce = nonce(client, k);
            let mapping = MapBody {
                nonce,
                protocol: pcp_proto::protocol::UDP,
                internal_port: base + k as u16,
                external_port: 0,
                external_addr: unspecified,
            };
            let body = match cfg.opcode {
                Opcode::Peer => Body::Peer(PeerBody {
                    mapping,
                    remote_port: FIRST_REMOTE_PORT + (k % 40_000) as u16,
                    remote_addr,
                }),
                _ => Body::Map(mapping),
            };
            let request = Request {
                lifetime: cfg.lifetime,
                client_addr,
                body,
                options,
                pa_result_code: ResultCode::Success,
            };
            let mut buf = vec![0u8; request.buffer_len()];
            let n = request.emit(&mut buf).expect("a MAP/PEER request fits");
            buf.truncate(n);
            Mapping {
                nonce,
                datagram: buf,
            }
        })
        .collect()
}

fn client_socket(source: IpAddr, server: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(
        Domain::for_address(server),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    // Connecting sends nothing; it pins the destination and filters other sources.
    socket.connect(&server.into())?;
    UdpSocket::from_std(socket.into())
}

/// Runs the load and returns the report.
pub fn run(cfg: LoadConfig) -> Result<Report, String> {
    let sources = check(&cfg)?;
    let rt = if cfg.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.threads as usize)
            .enable_all()
            .build()
    }
    .map_err(|e| format!("cannot start the runtime: {e}"))?;
    rt.block_on(drive(cfg, sources))
}

async fn drive(cfg: LoadConfig, sources: Vec<IpAddr>) -> Result<Report, String> {
    let mut sockets = Vec::with_capacity(sources.len());
    for &source in &sources {
        let socket = client_socket(source, cfg.server).map_err(|e| {
            format!(
                "cannot open a socket from {source} to {}: {e}{}",
                cfg.server,
                if e.kind() == io::ErrorKind::AddrNotAvailable {
                    " (is the address configured on the loopback interface?)"
                } else {
                    ""
                }
            )
        })?;
        sockets.push(socket);
    }
    let start = Instant::now();
    let warmup_ns = nanos(cfg.warmup);
    let phases = Arc::new(Phases {
        start,
        warmup_ns,
        measure_end_ns: AtomicU64::new(warmup_ns.saturating_add(nanos(cfg.duration))),
    });
    let watcher = {
        let phases = Arc::clone(&phases);
        tokio::spawn(async move {
            crate::shutdown_signal().await;
            phases.stop_now();
        })
    };
    let cfg = Arc::new(cfg);
    let mut tasks = Vec::with_capacity(sockets.len());
    for (i, (socket, source)) in sockets.into_iter().zip(sources).enumerate() {
        let mappings = build_mappings(&cfg, i as u32, source);
        let (cfg, phases) = (Arc::clone(&cfg), Arc::clone(&phases));
        tasks.push(tokio::spawn(async move {
            client(socket, mappings, &cfg, &phases, i as u32).await
        }));
    }
    let mut counters = Counters::default();
    let mut latency = new_histogram();
    let mut failure = None;
    for task in tasks {
        match task.await {
            Ok(Ok(stats)) => {
                counters.add(&stats.counters);
                latency
                    .add(&stats.latency_ns)
                    .map_err(|e| format!("cannot merge histograms: {e:?}"))?;
            }
            Ok(Err(e)) => failure = Some(e),
            Err(e) => failure = Some(format!("a client task failed: {e}")),
        }
    }
    watcher.abort();
    if let Some(e) = failure {
        return Err(e);
    }
    Ok(Report::new(&cfg, phases.measured(), counters, &latency))
}

/// One simulated client: closed loop over its own socket.
async fn client(
    socket: UdpSocket,
    mappings: Vec<Mapping>,
    cfg: &LoadConfig,
    phases: &Phases,
    index: u32,
) -> Result<ClientStats, String> {
    let m = mappings.len();
    let window = cfg.window as usize;
    let base_port = first_port(cfg, index);
    let mut stats = ClientStats {
        counters: Counters::default(),
        latency_ns: new_histogram(),
    };
    // Per mapping, the outstanding requests oldest first; identical bytes go out for a
    // mapping, so a response answers that mapping's oldest outstanding request.
    let mut pending: Vec<VecDeque<Pending>> = vec![VecDeque::new(); m];
    // (seq, mapping, sent) in send order; answered entries are dropped lazily.
    let mut order: VecDeque<(u64, usize, Instant)> = VecDeque::new();
    let mut outstanding = 0usize;
    let mut next = 0usize;
    let mut seq = 0u64;
    let mut buf = [0u8; 2048];
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let fail = |what: &str, e: io::Error| format!("client {index}: {what} failed: {e}");
    // Pacing (`rate`): request k is due at k / rate after the start, whatever the
    // answers do (an open loop while the window has room). The timer's resolution is
    // a millisecond: requests go out in bursts of rate / 1000. Latency counts from
    // the actual send (from the due time, the timer's own lag would dominate); a
    // server that falls behind shows as fewer requests sent than offered.
    let mut sent_total = 0u64;
    let paced_from = Instant::now();
    let due = |k: u64| {
        if cfg.rate > 0.0 {
            paced_from + Duration::from_secs_f64(k as f64 / cfg.rate)
        } else {
            // Unpaced: never (the select! below evaluates its sleep regardless).
            paced_from + Duration::from_secs(1 << 30)
        }
    };

    loop {
        let now = Instant::now();
        expire(&mut order, &mut pending, &mut outstanding, &mut stats, now);
        let phase = phases.at(now);
        if phase == Phase::Done {
            if outstanding == 0 {
                break;
            }
        } else {
            while outstanding < window {
                if cfg.rate > 0.0 && due(sent_total) > now {
                    break;
                }
                let sent_at = now;
                let k = next;
                match socket.try_send(&mappings[k].datagram) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    // An ICMP error for an earlier datagram: this one was not sent.
                    Err(e) if transient(&e) => {
                        stats.counters.icmp_errors += 1;
                        break;
                    }
                    Err(e) => return Err(fail("send", e)),
                }
                next = (next + 1) % m;
                sent_total += 1;
                let measured = phase == Phase::Measure;
                pending[k].push_back(Pending {
                    seq,
                    sent: sent_at,
                    measured,
                });
                order.push_back((seq, k, sent_at));
                seq += 1;
                outstanding += 1;
                if measured {
                    stats.counters.requests += 1;
                }
            }
        }

        tokio::select! {
            ready = socket.readable() => {
                ready.map_err(|e| fail("wait", e))?;
                for _ in 0..BUDGET {
                    let n = match socket.try_recv(&mut buf) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if transient(&e) => {
                            stats.counters.icmp_errors += 1;
                            continue;
                        }
                        Err(e) => return Err(fail("receive", e)),
                    };
                    let received = Instant::now();
                    let after_warmup = phases.at(received) != Phase::Warmup;
                    let Some((k, code, checkpoint, parsed)) =
                        classify(&buf[..n], cfg.opcode, base_port, &mappings)
                    else {
                        if after_warmup {
                            stats.counters.unmatched += 1;
                        }
                        continue;
                    };
                    let Some(p) = pending[k].pop_front() else {
                        // Answer to a request that already timed out (or a duplicate).
                        if after_warmup {
                            stats.counters.unmatched += 1;
                        }
                        continue;
                    };
                    outstanding -= 1;
                    if p.measured {
                        let c = &mut stats.counters;
                        c.responses += 1;
                        c.results[usize::from(code.to_u8())] += 1;
                        c.checkpoint_echoed += u64::from(checkpoint);
                        c.parse_errors += u64::from(!parsed);
                        let ns = nanos(received.saturating_duration_since(p.sent));
                        stats.latency_ns.saturating_record(ns.clamp(1, MAX_LATENCY_NS));
                    }
                }
            }
            _ = tick.tick() => {}
            // The next paced request, on time (not at the next tick).
            _ = tokio::time::sleep_until(due(sent_total).into()),
                if cfg.rate > 0.0 && outstanding < window && phase != Phase::Done => {}
        }
    }
    Ok(stats)
}

/// Drops answered entries from the front of `order` and times out requests older
/// than [`TIMEOUT`].
fn expire(
    order: &mut VecDeque<(u64, usize, Instant)>,
    pending: &mut [VecDeque<Pending>],
    outstanding: &mut usize,
    stats: &mut ClientStats,
    now: Instant,
) {
    while let Some(&(seq, k, sent)) = order.front() {
        // The oldest unresolved request of all is the oldest of its mapping, so an
        // entry not at its mapping's front has been answered.
        if pending[k].front().map(|p| p.seq) != Some(seq) {
            order.pop_front();
            continue;
        }
        if now.saturating_duration_since(sent) < TIMEOUT {
            break;
        }
        order.pop_front();
        if let Some(p) = pending[k].pop_front() {
            *outstanding -= 1;
            if p.measured {
                stats.counters.timeouts += 1;
            }
        }
    }
}

/// Which mapping a response answers, with its result code, whether it carried
/// CHECKPOINT_REQUIRED, and whether it parsed. A response that does not parse is
/// still matched by the raw nonce and internal port (so its slot is freed) when it is
/// long enough to carry them.
fn classify(
    datagram: &[u8],
    opcode: Opcode,
    base_port: u16,
    mappings: &[Mapping],
) -> Option<(usize, ResultCode, bool, bool)> {
    let (nonce, port, code, checkpoint, parsed) = match Response::parse(datagram) {
        Ok(resp) => {
            if resp.opcode() != opcode {
                return None;
            }
            let m = resp.body.mapping()?;
            (
                m.nonce,
                m.internal_port,
                resp.result_code,
                resp.options.checkpoint_required(),
                true,
            )
        }
        Err(_) => {
            const BODY: usize = pcp_proto::HEADER_LEN;
            if datagram.len() < BODY + 36
                || datagram[1] & 0x80 == 0
                || Opcode::from_bits(datagram[1] & 0x7f) != opcode
            {
                return None;
            }
            let mut nonce = [0u8; 12];
            nonce.copy_from_slice(&datagram[BODY..BODY + 12]);
            let port = u16::from_be_bytes([datagram[BODY + 16], datagram[BODY + 17]]);
            (nonce, port, ResultCode::from(datagram[3]), false, false)
        }
    };
    let k = usize::from(port.checked_sub(base_port)?);
    (mappings.get(k)?.nonce == nonce).then_some((k, code, checkpoint, parsed))
}

/// Errors a UDP socket reports for an earlier datagram (an ICMP message): not fatal.
fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(opcode: Opcode, checkpoint: bool) -> LoadConfig {
        LoadConfig {
            opcode,
            server: "127.0.0.1:5351".parse().unwrap(),
            clients: 2,
            window: 4,
            duration: Duration::from_secs(1),
            warmup: Duration::ZERO,
            mappings: 3,
            lifetime: 3600,
            checkpoint,
            source_base: "127.0.1.1".parse().unwrap(),
            threads: 1,
            rate: 0.0,
        }
    }

    #[test]
    fn requests_carry_the_source_address_and_stable_nonces() {
        let c = cfg(Opcode::Peer, true);
        let src: IpAddr = "127.0.1.2".parse().unwrap();
        let maps = build_mappings(&c, 1, src);
        assert_eq!(maps.len(), 3);
        for (k, m) in maps.iter().enumerate() {
            let req = Request::parse(&m.datagram).unwrap();
            assert_eq!(req.client_addr, src);
            assert_eq!(req.lifetime, 3600);
            assert!(req.options.checkpoint_required());
            let Body::Peer(p) = req.body else {
                panic!("not PEER")
            };
            assert_eq!(p.mapping.nonce, nonce(1, k as u32));
            assert_eq!(p.mapping.internal_port, FIRST_INTERNAL_PORT + k as u16);
            assert_eq!(p.mapping.protocol, pcp_proto::protocol::UDP);
            assert_eq!(p.remote_addr, IpAddr::V4(REMOTE_PEER_V4));
            assert_eq!(p.remote_port, FIRST_REMOTE_PORT + k as u16);
        }
        // Same client, same mapping: same bytes (a renewal).
        assert_eq!(build_mappings(&c, 1, src)[2].datagram, maps[2].datagram);
        let plain = build_mappings(&cfg(Opcode::Map, false), 0, src);
        assert!(
            !Request::parse(&plain[0].datagram)
                .unwrap()
                .options
                .checkpoint_required()
        );
    }

    #[test]
    fn echoed_requests_are_classified() {
        let c = cfg(Opcode::Map, true);
        let maps = build_mappings(&c, 0, "127.0.1.1".parse().unwrap());
        let mut d = maps[2].datagram.clone();
        assert!(crate::echo::make_response(&mut d));
        assert_eq!(
            classify(&d, Opcode::Map, FIRST_INTERNAL_PORT, &maps),
            Some((2, ResultCode::Success, true, true))
        );
        // Another client's nonce does not match.
        let other = build_mappings(&c, 1, "127.0.1.2".parse().unwrap());
        assert_eq!(classify(&d, Opcode::Map, FIRST_INTERNAL_PORT, &other), None);
        // Wrong opcode, or a request, does not match.
        assert_eq!(classify(&d, Opcode::Peer, FIRST_INTERNAL_PORT, &maps), None);
        assert_eq!(
            classify(&maps[2].datagram, Opcode::Map, FIRST_INTERNAL_PORT, &maps),
            None
        );
        // Unparsable but long enough: matched raw, reported as not parsed.
        d[0] = 9;
        d[3] = 8;
        assert_eq!(
            classify(&d, Opcode::Map, FIRST_INTERNAL_PORT, &maps),
            Some((2, ResultCode::NoResources, false, false))
        );
    }

    #[test]
    fn ipv6_clients_split_the_port_range() {
        let mut c = cfg(Opcode::Map, false);
        c.server = "[::1]:5351".parse().unwrap();
        c.source_base = "::1".parse().unwrap();
        assert_eq!(first_port(&c, 0), FIRST_INTERNAL_PORT);
        assert_eq!(first_port(&c, 1), FIRST_INTERNAL_PORT + 3);
        assert!(check(&c).is_ok());
        c.mappings = 30_000;
        assert!(check(&c).unwrap_err().contains("internal ports"));
    }

    #[test]
    fn refuses_non_loopback_servers() {
        let mut c = cfg(Opcode::Map, false);
        c.server = "192.0.2.1:5351".parse().unwrap();
        assert!(check(&c).unwrap_err().contains("loopback"));
    }
}
