//! Pair mode with real processes: an active and a backup `pcpd`, each on its own
//! loopback address, replicating over UDP; the active killed with SIGKILL under
//! checkpointed load, frozen with SIGSTOP, restarted, switched over and promoted.
//!
//! The property checked after every takeover is RFC 7767's promise: every mapping whose
//! reply carried CHECKPOINT_REQUIRED (192), and that no later request superseded, exists
//! on the new active with the same external address and port and at least the lifetime
//! the reply promised (to the second: `GET /mappings` shows whole seconds).
//!
//! `PCP_FAILOVER_ROUNDS=N` sets the number of kill rounds (default 20);
//! `PCP_FAILOVER_SEED=S` replays a run (each round prints its seed).

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{HaTiming, Map, Node, PairPlan, PcpClient, Pcpd, free_port, fresh_ip, wait_ha};
use pcp_proto::ResultCode;

const PCPD: &str = env!("CARGO_BIN_EXE_pcpd");

/// Simulated hosts per round, each with its own source address and thread.
const HOSTS: usize = 4;
/// Mappings each host cycles through (internal ports `FIRST_PORT..`).
const PORTS_PER_HOST: u16 = 40;
const FIRST_PORT: u16 = 20_000;
/// Longest the load waits for one answer from a live active before it gives up.
const ANSWER_WAIT: Duration = Duration::from_secs(2);
/// Longest a takeover may take before the test calls it a failure (detection is
/// 500 ms; a loaded CI machine may add a lot).
const TAKEOVER_LIMIT: Duration = Duration::from_secs(5);

/// Limits generous enough that the load is never refused for quota or rate: every
/// request asking for 192 is checkpointed (and every promise must then survive).
const SERVER_CONFIG: &str = "\
[pool]
addresses = [\"192.0.2.1\", \"192.0.2.2\"]

[tiers.default]
mapping_quota = 4096
checkpoint_quota = 4096
checkpoint_rate = 1000000.0
checkpoint_burst = 1000000

# The load hosts send closed-loop as fast as loopback allows (over 4000 requests/s each
# on a quiet machine): the per-host flood guard would drop them and stall the load.
[limits]
host_rate = 0
";

/// SplitMix64: a seeded, dependency-free generator (rounds must replay from a seed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// What a reply carrying 192 promised: this external endpoint until `expires`.
#[derive(Debug, Clone, Copy)]
struct Promise {
    external: SocketAddr,
    expires: Instant,
}

/// One host's run.
#[derive(Debug, Default)]
struct HostResult {
    ip: Option<IpAddr>,
    /// Live promises by internal port (all UDP).
    promises: HashMap<u16, Promise>,
    requests: u64,
    answers: u64,
    echoed: u64,
    /// Requests a live active did not answer within [`ANSWER_WAIT`].
    timeouts: u64,
    /// Every answer: when its request was sent, how long it took, whether it echoed 192.
    log: Vec<(Instant, Duration, bool)>,
}

/// Flags the driver raises.
#[derive(Default)]
struct Control {
    /// Stop sending (finish the request in flight).
    stop: AtomicBool,
    /// The server was killed and reaped: whatever it sent is already queued, so an
    /// empty socket means no answer will ever come.
    killed: AtomicBool,
}

/// Closed-loop load from one host: mostly MAP+192 renewals and creations with random
/// lifetimes, some without 192 (which clears the checkpoint) and some deletes. A new
/// request for a mapping supersedes its promise (it may shorten, unprotect or delete
/// it); the answer, if it carries 192, makes the new one.
fn run_host(client: PcpClient, seed: u64, ctl: Arc<Control>) -> HostResult {
    let mut rng = Rng(seed);
    let mut r = HostResult {
        ip: Some(client.ip()),
        ..HostResult::default()
    };
    while !ctl.stop.load(Ordering::Relaxed) {
        let port = FIRST_PORT + rng.range(0, u64::from(PORTS_PER_HOST) - 1) as u16;
        let roll = rng.range(0, 99);
        let mut m = Map::udp(port);
        m.lifetime = rng.range(120, 900) as u32;
        if roll >= 85 {
            m.checkpoint = false;
        }
        if roll >= 95 {
            m.lifetime = 0;
        }
        r.promises.remove(&port);
        let sent = Instant::now();
        client.send(&client.map_request(m));
        r.requests += 1;
        let deadline = Instant::now() + ANSWER_WAIT;
        let answer = loop {
            let killed = ctl.killed.load(Ordering::Relaxed);
            match client.recv_within(Duration::from_millis(50)) {
                Some(raw) => {
                    let Ok(resp) = pcp_proto::Response::parse(&raw) else {
                        continue;
                    };
                    match resp.body {
                        pcp_proto::Body::Map(b)
                            if b.nonce == m.nonce && b.internal_port == m.internal_port =>
                        {
                            break Some(common::parse_answer(&raw));
                        }
                        _ => continue,
                    }
                }
                None if killed => break None,
                None if Instant::now() >= deadline => {
                    r.timeouts += 1;
                    break None;
                }
                None => {}
            }
        };
        let Some(a) = answer else {
            // No answer: whether the request was applied is unknown, and a late answer
            // could be mistaken for the next one's. This host is done.
            break;
        };
        let received = Instant::now();
        r.answers += 1;
        r.log.push((sent, received - sent, a.checkpoint_echoed));
        if a.result == ResultCode::Success && a.lifetime > 0 && a.checkpoint_echoed {
            r.echoed += 1;
            r.promises.insert(
                port,
                Promise {
                    external: a.external.expect("a MAP body"),
                    expires: received + Duration::from_secs(u64::from(a.lifetime)),
                },
            );
        }
    }
    r
}

/// Starts `HOSTS` load threads against `server`, each on a fresh source address.
fn start_load(
    server: SocketAddr,
    rng: &mut Rng,
    ctl: &Arc<Control>,
) -> Vec<JoinHandle<HostResult>> {
    (0..HOSTS)
        .map(|_| {
            let client = PcpClient::new(IpAddr::V4(fresh_ip()), server);
            let seed = rng.next();
            let ctl = ctl.clone();
            std::thread::spawn(move || run_host(client, seed, ctl))
        })
        .collect()
}

fn join_load(threads: Vec<JoinHandle<HostResult>>) -> Vec<HostResult> {
    threads
        .into_iter()
        .map(|t| t.join().expect("a load thread panicked"))
        .collect()
}

/// Checks every live promise against `GET /mappings` of `d`; returns how many.
fn check_promises(d: &Pcpd, hosts: &[HostResult], context: &str) -> usize {
    let list = d.mappings();
    let checked_at = Instant::now();
    let table: HashMap<(String, u64, u64), &serde_json::Value> = list
        .iter()
        .map(|m| {
            (
                (
                    m["internal_address"].as_str().unwrap_or("").to_string(),
                    m["protocol"].as_u64().unwrap_or(0),
                    m["internal_port"].as_u64().unwrap_or(0),
                ),
                m,
            )
        })
        .collect();
    let mut checked = 0;
    let mut broken = Vec::new();
    for h in hosts {
        let ip = h.ip.expect("host address").to_string();
        for (port, p) in &h.promises {
            if p.expires <= checked_at {
                continue;
            }
            checked += 1;
            let promised = p.expires.duration_since(checked_at).as_secs_f64();
            match table.get(&(ip.clone(), 17, u64::from(*port))) {
                None => broken.push(format!("{ip}:{port} missing (promised {}", p.external)),
                Some(m) => {
                    let ext = SocketAddr::new(
                        m["external_address"]
                            .as_str()
                            .and_then(|s| s.parse().ok())
                            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
                        m["external_port"].as_u64().unwrap_or(0) as u16,
                    );
                    let left = m["lifetime_remaining"].as_f64().unwrap_or(0.0);
                    if ext != p.external {
                        broken.push(format!(
                            "{ip}:{port} external {ext}, promised {}",
                            p.external
                        ));
                    } else if left < promised - 1.0 {
                        broken.push(format!(
                            "{ip}:{port} lifetime_remaining {left}, promised {promised:.3} s"
                        ));
                    } else if m["checkpointed"] != true {
                        broken.push(format!("{ip}:{port} no longer checkpointed: {m}"));
                    }
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "{context}: {} of {checked} promises broken on {}:\n{}",
        broken.len(),
        d.pcp,
        broken.join("\n")
    );
    checked
}

/// A pair: A started active, B backup, both ready (bulk copy done, heartbeats flowing).
fn start_pair(plan: &PairPlan) -> (Pcpd, Pcpd) {
    let a = plan.start(PCPD, Node::A, "active");
    let b = plan.start(PCPD, Node::B, "backup");
    wait_ha(&a, Duration::from_secs(10), "A active and ready", |h| {
        h["role"] == "active" && h["ready"] == true && h["backup_status"] == "ready"
    });
    wait_ha(&b, Duration::from_secs(10), "B backup and ready", |h| {
        h["role"] == "backup" && h["ready"] == true
    });
    (a, b)
}

/// Creates `n` checkpointed mappings from each of `hosts` fresh hosts on `d`; every
/// answer must echo 192. Returns (host address, internal port, external endpoint).
fn checkpoint_some(d: &Pcpd, hosts: usize, n: u16) -> Vec<(IpAddr, u16, SocketAddr)> {
    let mut out = Vec::new();
    for _ in 0..hosts {
        let c = PcpClient::new(IpAddr::V4(fresh_ip()), d.pcp);
        for k in 0..n {
            let port = 30_000 + k;
            let a = c.map(Map::udp(port));
            assert_eq!(a.result, ResultCode::Success);
            assert!(a.checkpoint_echoed, "192 echoed with a ready backup");
            out.push((c.ip(), port, a.external.expect("MAP body")));
        }
    }
    out
}

/// Every one of `made` is on `d`, checkpointed, with the same external endpoint.
fn assert_has(d: &Pcpd, made: &[(IpAddr, u16, SocketAddr)]) {
    let list = d.mappings();
    for (ip, port, ext) in made {
        let found = list
            .iter()
            .find(|m| m["internal_address"] == ip.to_string() && m["internal_port"] == *port);
        let m = found.unwrap_or_else(|| panic!("{ip}:{port} missing on {}", d.pcp));
        assert_eq!(m["external_address"], ext.ip().to_string(), "{m}");
        assert_eq!(m["external_port"], ext.port(), "{m}");
        assert_eq!(m["checkpointed"], true, "{m}");
    }
}

fn term(h: &serde_json::Value) -> u64 {
    h["term"].as_u64().expect("a term")
}

/// Polls both nodes for `span`: never both active in one term. Returns the last views.
fn never_two_actives(
    a: &Pcpd,
    b: &Pcpd,
    span: Duration,
) -> (Option<serde_json::Value>, Option<serde_json::Value>) {
    let end = Instant::now() + span;
    let (mut last_a, mut last_b) = (None, None);
    while Instant::now() < end {
        let (ha, hb) = (a.try_ha(), b.try_ha());
        if let (Some(x), Some(y)) = (&ha, &hb) {
            assert!(
                !(x["role"] == "active" && y["role"] == "active" && term(x) == term(y)),
                "two actives in term {}: A {x}, B {y}",
                term(x)
            );
        }
        last_a = ha.or(last_a);
        last_b = hb.or(last_b);
        std::thread::sleep(Duration::from_millis(10));
    }
    (last_a, last_b)
}

/// (a) SIGKILL the active at a random moment under checkpointed load; the backup takes
/// over with every live promise. Repeated `PCP_FAILOVER_ROUNDS` times (default 20).
#[test]
fn kill_9_under_checkpointed_load_keeps_every_promise() {
    let rounds: u64 = std::env::var("PCP_FAILOVER_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let base_seed: u64 = std::env::var("PCP_FAILOVER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("kill -9 rounds: {rounds}, PCP_FAILOVER_SEED={base_seed}");
    let mut takeovers = Vec::new();
    let mut total_checked = 0;
    for round in 0..rounds {
        let seed = base_seed.wrapping_add(round);
        let mut rng = Rng(seed);
        let plan = PairPlan::new(SERVER_CONFIG, HaTiming::default());
        let (mut a, b) = start_pair(&plan);

        let ctl = Arc::new(Control::default());
        let load = start_load(a.pcp, &mut rng, &ctl);
        let kill_after = Duration::from_millis(rng.range(150, 900));
        std::thread::sleep(kill_after);
        let killed_at = Instant::now();
        a.kill9();
        ctl.killed.store(true, Ordering::Relaxed);
        ctl.stop.store(true, Ordering::Relaxed);

        let h = wait_ha(&b, TAKEOVER_LIMIT, "B takes over", |h| {
            h["role"] == "active"
        });
        let takeover = killed_at.elapsed();
        let hosts = join_load(load);
        let context = format!("round {round} (seed {seed}, killed after {kill_after:?})");
        let timeouts: u64 = hosts.iter().map(|h| h.timeouts).sum();
        assert_eq!(
            timeouts, 0,
            "{context}: the live active left requests unanswered"
        );
        let echoed: u64 = hosts.iter().map(|h| h.echoed).sum();
        assert!(echoed > 0, "{context}: no reply carried 192");
        let checked = check_promises(&b, &hosts, &context);
        assert!(
            h["adopted"].as_u64().unwrap_or(0) >= checked as u64,
            "{context}: adopted {} < {checked} live promises",
            h["adopted"]
        );

        // The new active answers, and a promised mapping keeps its endpoint.
        if let Some((host, (port, p))) = hosts
            .iter()
            .find_map(|h| h.promises.iter().next().map(|p| (h.ip.expect("ip"), p)))
        {
            let c = PcpClient::new(host, b.pcp);
            let r = c.map(Map::udp(*port));
            assert_eq!(r.result, ResultCode::Success, "{context}");
            assert_eq!(r.external, Some(p.external), "{context}: renewal on B");
        }
        let requests: u64 = hosts.iter().map(|h| h.requests).sum();
        eprintln!(
            "round {round:2} seed {seed}: kill after {:4} ms, {requests:5} requests, \
             {echoed:5} echoed 192, {checked:3} live promises checked, takeover {:4} ms \
             (term {})",
            kill_after.as_millis(),
            takeover.as_millis(),
            h["term"]
        );
        takeovers.push(takeover);
        total_checked += checked;
    }
    takeovers.sort();
    if let (Some(min), Some(max)) = (takeovers.first(), takeovers.last()) {
        eprintln!(
            "{rounds} rounds: {total_checked} promises checked; takeover min {} ms, \
             median {} ms, max {} ms",
            min.as_millis(),
            takeovers[takeovers.len() / 2].as_millis(),
            max.as_millis()
        );
    }
    assert!(
        rounds == 0 || total_checked > 0,
        "no promise was ever checked"
    );
}

/// (b) The active's backup never came up: MAP+192 gets SUCCESS without 192, and the
/// mapping says why. Pair mode from the command-line flags (default timers).
#[test]
fn without_a_backup_192_is_not_echoed_and_the_reason_is_backup_not_ready() {
    let ip = fresh_ip();
    let ha = SocketAddr::new(IpAddr::V4(ip), free_port(ip, true));
    let peer_ip = fresh_ip();
    let peer = SocketAddr::new(IpAddr::V4(peer_ip), free_port(peer_ip, true));
    let d = common::pcpd(PCPD)
        .at(ip)
        .config(SERVER_CONFIG)
        .args([
            "--ha-listen".to_string(),
            ha.to_string(),
            "--ha-peer".to_string(),
            peer.to_string(),
            "--ha-role".to_string(),
            "active".to_string(),
        ])
        .start();
    let h = wait_ha(&d, Duration::from_secs(10), "active after joining", |h| {
        h["role"] == "active"
    });
    assert_eq!(h["enabled"], true);
    assert_eq!(h["ready"], false, "{h}");
    assert_eq!(h["peer_connected"], false, "{h}");
    assert_eq!(h["backup_status"], "not_ready", "{h}");
    assert_eq!(
        term(&h) % 2,
        1,
        "a node started active takes odd terms: {h}"
    );

    let c = d.client();
    let sent = Instant::now();
    let a = c.map(Map::udp(5060));
    let waited = sent.elapsed();
    assert_eq!(a.result, ResultCode::Success);
    assert!(!a.checkpoint_echoed, "no backup: 192 must not be echoed");
    assert!(
        waited < Duration::from_millis(200),
        "not held for a backup that is not there: {waited:?}"
    );
    let m = d.mapping(17, 5060);
    assert_eq!(m["checkpointed"], false, "{m}");
    assert_eq!(m["checkpoint_reason"], "backup_not_ready", "{m}");
    let h = d.ha();
    assert_eq!(h["held_responses"], 0, "{h}");
    assert_eq!(h["released_responses"], 0, "{h}");
    assert_eq!(d.get_json("/status")["backup"], "not_ready");
}

/// (c) A planned switchover under checkpointed load loses no promise; the old active
/// ends as a ready backup, the new one answers and echoes 192 again.
#[test]
fn switchover_keeps_every_checkpoint_and_swaps_roles() {
    let plan = PairPlan::new(SERVER_CONFIG, HaTiming::default());
    let (a, b) = start_pair(&plan);
    let term_a = term(&a.ha());
    let made = checkpoint_some(&a, 2, 25);

    let ctl = Arc::new(Control::default());
    let mut rng = Rng(0x5717_c40e);
    let load = start_load(a.pcp, &mut rng, &ctl);
    std::thread::sleep(Duration::from_millis(300));
    // A switchover on a backup is refused.
    let (status, body) = b.post("/ha/switchover");
    assert_eq!(status, 409, "{body}");
    let (status, body) = a.post("/ha/switchover");
    assert_eq!(status, 200, "{body}");
    // A stops answering at once: the load's last requests go unanswered.
    ctl.stop.store(true, Ordering::Relaxed);

    let hb = wait_ha(&b, Duration::from_secs(5), "B active", |h| {
        h["role"] == "active"
    });
    let ha = wait_ha(&a, Duration::from_secs(5), "A backup", |h| {
        h["role"] == "backup"
    });
    assert!(term(&hb) > term_a, "a new term: {hb}");
    assert_eq!(term(&hb) % 2, 0, "B started backup: even terms: {hb}");
    assert_eq!(term(&ha), term(&hb), "A follows B's term: {ha}");
    let hosts = join_load(load);
    let echoed: u64 = hosts.iter().map(|h| h.echoed).sum();
    assert!(echoed > 0, "the load made promises");
    let checked = check_promises(&b, &hosts, "after switchover");
    assert_has(&b, &made);
    eprintln!("switchover: {} + {checked} promises kept", made.len());

    // The new active answers; once A holds a full copy, 192 is echoed again.
    wait_ha(&b, Duration::from_secs(10), "B's backup ready", |h| {
        h["ready"] == true
    });
    let (ip, port, ext) = made[0];
    let r = PcpClient::new(ip, b.pcp).map(Map::udp(port));
    assert_eq!(r.result, ResultCode::Success);
    assert_eq!(r.external, Some(ext));
    assert!(r.checkpoint_echoed, "ready backup again: 192 echoed");
    let status = b.get_json("/status");
    let ha = wait_ha(&a, Duration::from_secs(5), "A's copy complete", |h| {
        h["ready"] == true && h["stored"] == status["checkpointed"]
    });
    assert_eq!(ha["role"], "backup");
    // A no longer answers PCP.
    let c = PcpClient::new(ip, a.pcp);
    assert!(
        c.try_map(Map::udp(port), Duration::from_millis(300))
            .is_none(),
        "a backup must keep quiet"
    );
}

/// (d) Fencing: the killed active restarts with its configured role `active` while the
/// backup has taken over. It must follow, never be active in the other's term, and get
/// a full copy.
#[test]
fn restarted_old_active_ends_as_backup_with_a_full_copy() {
    let plan = PairPlan::new(SERVER_CONFIG, HaTiming::default());
    let (mut a, b) = start_pair(&plan);
    let made = checkpoint_some(&a, 2, 20);
    // A PEER mapping with 192 too (held and replicated like a MAP).
    let peer_host = PcpClient::new(IpAddr::V4(fresh_ip()), a.pcp);
    let remote = SocketAddr::from(([198, 51, 100, 7], 443));
    let mut pm = Map::udp(6000);
    pm.protocol = 6;
    let peer = peer_host.peer(pm, remote);
    assert_eq!(peer.result, ResultCode::Success);
    assert!(peer.checkpoint_echoed, "PEER with 192 and a ready backup");
    a.kill9();
    let hb = wait_ha(&b, TAKEOVER_LIMIT, "B takes over", |h| {
        h["role"] == "active"
    });
    assert_has(&b, &made);
    let list = b.mappings();
    let adopted_peer = list
        .iter()
        .find(|m| m["opcode"] == "peer")
        .unwrap_or_else(|| panic!("the PEER mapping is missing: {list:#?}"));
    assert_eq!(adopted_peer["internal_address"], peer_host.ip().to_string());
    assert_eq!(adopted_peer["remote_address"], "198.51.100.7");
    assert_eq!(adopted_peer["remote_port"], 443);
    assert_eq!(
        adopted_peer["external_port"],
        peer.external.expect("PEER body").port()
    );
    assert_eq!(adopted_peer["checkpointed"], true);
    // One more checkpointed mapping made on B alone; it has no backup now.
    let c = PcpClient::new(IpAddr::V4(fresh_ip()), b.pcp);
    let r = c.map(Map::udp(40_000));
    assert_eq!(r.result, ResultCode::Success);
    assert!(!r.checkpoint_echoed, "B has no backup yet");

    let a = plan.start(PCPD, Node::A, "active");
    let (last_a, last_b) = never_two_actives(&a, &b, Duration::from_secs(3));
    assert_eq!(last_b.expect("B answers")["role"], "active");
    assert_eq!(last_a.expect("A answers")["role"], "backup");
    let status = b.get_json("/status");
    let ha = wait_ha(&a, Duration::from_secs(10), "A ready with B's copy", |h| {
        h["role"] == "backup" && h["ready"] == true && h["stored"] == status["checkpointed"]
    });
    assert_eq!(term(&ha), term(&hb));
    assert_eq!(status["checkpointed"].as_u64(), Some(made.len() as u64 + 1));
    let hb = b.ha();
    assert_eq!(hb["role"], "active");
    assert_eq!(hb["ready"], true, "{hb}");
    // With a ready backup again, B echoes 192.
    assert!(c.map(Map::udp(40_001)).checkpoint_echoed);
}

/// (d) Fencing of a stale active: frozen with SIGSTOP, the active misses the takeover;
/// resumed, it still believes it is active (in its old term) until it hears the new
/// active's higher term and steps down. Nothing it answers meanwhile carries 192.
#[test]
fn frozen_active_is_fenced_when_it_resumes() {
    let plan = PairPlan::new(SERVER_CONFIG, HaTiming::default());
    let (a, b) = start_pair(&plan);
    let made = checkpoint_some(&a, 1, 10);
    let term_a = term(&a.ha());
    a.signal("STOP");
    let hb = wait_ha(&b, TAKEOVER_LIMIT, "B takes over", |h| {
        h["role"] == "active"
    });
    assert!(term(&hb) > term_a);
    assert_has(&b, &made);
    // A request queued at the frozen node: served (if at all) after it resumes.
    let (ip, port, _) = made[0];
    let stale = PcpClient::new(ip, a.pcp);
    let mut m = Map::udp(port);
    m.lifetime = 1800;
    stale.send(&stale.map_request(m));
    a.signal("CONT");
    let (last_a, last_b) = never_two_actives(&a, &b, Duration::from_secs(3));
    assert_eq!(last_b.expect("B answers")["role"], "active");
    let last_a = last_a.expect("A answers");
    assert_eq!(last_a["role"], "backup", "{last_a}");
    assert_eq!(term(&last_a), term(&hb), "{last_a}");
    if let Some(raw) = stale.recv_within(Duration::from_millis(100)) {
        let r = common::parse_answer(&raw);
        assert!(
            !r.checkpoint_echoed,
            "a fenced active must not promise: {r:?}"
        );
    }
    let status = b.get_json("/status");
    wait_ha(&a, Duration::from_secs(10), "A ready with B's copy", |h| {
        h["ready"] == true && h["stored"] == status["checkpointed"]
    });
    assert_has(&b, &made);
}

/// A stale active that served after the takeover: frozen with SIGSTOP while the
/// backup takes over, it resumes with a host's renewal (lifetime 1800) queued in its
/// socket. If it answers it before hearing the new term, the host now counts on state
/// the new active never got, while its epoch there was carried over (all its mappings
/// were checkpointed): once the old active steps down, its HELLO says it ran past the
/// takeover, and the new active restarts that host's epoch and announces to it. Whether
/// it answers before it steps down is a race: the test asserts the ANNOUNCE only when the
/// answer came (the deterministic cases are in `crates/pcp-ha/tests/heal.rs` and
/// `core.rs`).
#[test]
fn a_stale_active_that_served_makes_the_new_active_announce_to_carried_over_hosts() {
    let plan = PairPlan::new(SERVER_CONFIG, HaTiming::default());
    let (a, b) = start_pair(&plan);
    let p_ip = fresh_ip();
    let p_announce = announce_listener(p_ip);
    let p = PcpClient::new(IpAddr::V4(p_ip), a.pcp);
    // Run until the epoch is a few seconds old, so that a reset is unmistakable.
    common::wait_for(Duration::from_secs(10), "epoch >= 3", || {
        let r = p.map(Map::udp(5000));
        assert!(r.checkpoint_echoed);
        (r.epoch >= 3).then_some(()).or_else(|| {
            std::thread::sleep(Duration::from_millis(200));
            None
        })
    });
    wait_ha(
        &a,
        Duration::from_secs(2),
        "nothing left to acknowledge",
        |h| h["lag"] == 0,
    );
    a.signal("STOP");
    wait_ha(&b, TAKEOVER_LIMIT, "B takes over", |h| {
        h["role"] == "active"
    });
    let mut buf = [0u8; 1100];
    p_announce
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    assert!(
        p_announce.recv_from(&mut buf).is_err(),
        "a protected host is not announced to at the takeover"
    );
    let mut m = Map::udp(5000);
    m.lifetime = 1800;
    p.send(&p.map_request(m));
    a.signal("CONT");
    wait_ha(&a, Duration::from_secs(5), "A stepped down", |h| {
        h["role"] == "backup"
    });
    let served = p.recv_within(Duration::from_millis(500)).is_some();
    p_announce
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let ann = p_announce.recv_from(&mut buf);
    if served {
        eprintln!("the stale active answered the renewal: expecting an ANNOUNCE from B");
        let (n, from) = ann.expect("an ANNOUNCE once the stale active stepped down");
        assert_eq!(from, b.pcp, "sent from the new active's PCP address");
        let r = pcp_proto::Response::parse(&buf[..n]).expect("a PCP response");
        assert_eq!(r.body, pcp_proto::Body::Announce);
        assert!(r.epoch <= 3, "the host's epoch starts again: {}", r.epoch);
    } else {
        // It may still have recorded the renewal and held its reply for an
        // acknowledgement that never came (a reset then is conservative, not wrong).
        eprintln!(
            "no answer from the stale active; ANNOUNCE from B: {}",
            ann.is_ok()
        );
    }
}

/// (e) `POST /ha/promote` on a ready backup: it becomes active with every checkpoint,
/// and the old active, hearing the higher term, steps down.
#[test]
fn promote_on_a_backup_promotes_it() {
    let plan = PairPlan::new(SERVER_CONFIG, HaTiming::default());
    let (a, b) = start_pair(&plan);
    let made = checkpoint_some(&a, 2, 10);
    let term_a = term(&a.ha());

    let (status, body) = a.post("/ha/promote");
    assert_eq!(status, 409, "the active cannot be promoted: {body}");
    assert!(body.contains("already active"), "{body}");

    let (status, body) = b.post("/ha/promote");
    assert_eq!(status, 200, "{body}");
    let hb = b.ha();
    assert_eq!(hb["role"], "active", "promote is synchronous: {hb}");
    assert!(term(&hb) > term_a);
    assert_eq!(hb["adopted"].as_u64(), Some(made.len() as u64), "{hb}");
    assert_has(&b, &made);
    let (last_a, _) = never_two_actives(&a, &b, Duration::from_secs(1));
    assert_eq!(last_a.expect("A answers")["role"], "backup");
    wait_ha(&a, Duration::from_secs(10), "A ready", |h| {
        h["ready"] == true && h["stored"].as_u64() == Some(made.len() as u64)
    });
    let (ip, port, ext) = made[0];
    let r = PcpClient::new(ip, b.pcp).map(Map::udp(port));
    assert_eq!(r.external, Some(ext));
    assert!(r.checkpoint_echoed);
    let (status, body) = b.post("/ha/promote");
    assert_eq!(status, 409, "{body}");
}

/// RFC 6887 §8.5: whether a client that saw epoch `s1` at `c1` and `s2` at `c2` must
/// conclude that the server lost its state.
fn state_lost(c1: Instant, s1: u32, c2: Instant, s2: u32) -> bool {
    if u64::from(s2) + 1 < u64::from(s1) {
        return true;
    }
    let client_delta = c2.duration_since(c1).as_secs_f64();
    let server_delta = f64::from(s2) - f64::from(s1);
    client_delta + 2.0 < server_delta - server_delta / 16.0
        || server_delta + 2.0 < client_delta - client_delta / 16.0
}

/// A socket on `ip`'s PCP client port (5350), where unsolicited ANNOUNCEs arrive.
fn announce_listener(ip: Ipv4Addr) -> std::net::UdpSocket {
    let s = std::net::UdpSocket::bind((ip, pcp_proto::CLIENT_PORT))
        .unwrap_or_else(|e| panic!("bind {ip}:{}: {e}", pcp_proto::CLIENT_PORT));
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    s
}

/// Maps UDP 5000 with 192 for `p` until the epoch is a few seconds old, so that a
/// reset is unmistakable; returns that answer.
fn aged_protected_map(p: &PcpClient) -> common::Answer {
    common::wait_for(Duration::from_secs(10), "epoch >= 3", || {
        let r = p.map(Map::udp(5000));
        assert!(r.checkpoint_echoed);
        if r.epoch >= 3 {
            Some(r)
        } else {
            std::thread::sleep(Duration::from_millis(200));
            None
        }
    })
}

/// The epoch of the unsolicited ANNOUNCE `listener` receives (within its read
/// timeout), checked to come from `from` with SUCCESS; `what` says which host expects
/// it.
fn expect_announce(listener: &std::net::UdpSocket, from: SocketAddr, what: &str) -> u32 {
    let mut buf = [0u8; 1100];
    let (n, sender) = listener
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(sender, from, "sent from the new active's PCP address");
    let ann = pcp_proto::Response::parse(&buf[..n]).expect("a PCP response");
    assert_eq!(ann.body, pcp_proto::Body::Announce);
    assert_eq!(ann.result_code, ResultCode::Success);
    ann.epoch
}

/// No ANNOUNCE reaches `listener` within 300 ms: its host lost nothing.
fn assert_told_nothing(listener: &std::net::UdpSocket) {
    let mut buf = [0u8; 1100];
    listener
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    assert!(
        listener.recv_from(&mut buf).is_err(),
        "a host that lost nothing is not told anything"
    );
}

/// The protected host of `p1` (answered at `c1`), renewing through `p` on the new
/// active, keeps its external port and sees a continuous epoch.
fn assert_continuous(p: &PcpClient, p1: &common::Answer, c1: Instant) {
    let p2 = p.map(Map::udp(5000));
    let c2 = Instant::now();
    assert_eq!(p2.external, p1.external);
    assert!(
        !state_lost(c1, p1.epoch, c2, p2.epoch),
        "protected host: epoch {} then {} after {:?} must look continuous",
        p1.epoch,
        p2.epoch,
        c2 - c1
    );
}

/// Epoch continuity across a takeover: a host whose mappings were all checkpointed sees
/// a continuous epoch (it lost nothing); a host that also held an unprotected mapping
/// sees its epoch start again and gets an unsolicited ANNOUNCE at once.
#[test]
fn takeover_keeps_the_epoch_of_protected_hosts_and_announces_to_the_others() {
    let plan = PairPlan::new(SERVER_CONFIG, HaTiming::default());
    let (mut a, b) = start_pair(&plan);
    let (p_ip, u_ip) = (fresh_ip(), fresh_ip());
    let (p_announce, u_announce) = (announce_listener(p_ip), announce_listener(u_ip));
    let p = PcpClient::new(IpAddr::V4(p_ip), a.pcp);
    let u = PcpClient::new(IpAddr::V4(u_ip), a.pcp);
    let p1 = aged_protected_map(&p);
    let u1 = u.map(Map::udp(5000));
    assert!(u1.checkpoint_echoed);
    let u_plain = u.map(Map::udp(5001).without_checkpoint());
    assert!(!u_plain.checkpoint_echoed);
    let c1 = Instant::now();
    // The host record saying that U holds an unprotected mapping is replicated after
    // the (unheld) answer: let the backup acknowledge it.
    common::kill_settled_active(&mut a, &b, TAKEOVER_LIMIT);

    let ann_epoch = expect_announce(
        &u_announce,
        b.pcp,
        "an ANNOUNCE for the host that lost an unprotected mapping",
    );
    assert!(ann_epoch <= 1, "the host's epoch starts again: {ann_epoch}");
    assert_told_nothing(&p_announce);

    assert_continuous(&PcpClient::new(IpAddr::V4(p_ip), b.pcp), &p1, c1);
    let u2 = PcpClient::new(IpAddr::V4(u_ip), b.pcp).map(Map::udp(5000));
    assert_eq!(u2.external, u1.external, "its checkpointed mapping is kept");
    assert!(
        state_lost(c1, u1.epoch, Instant::now(), u2.epoch),
        "host with a lost mapping: epoch {} then {} must signal the loss",
        u1.epoch,
        u2.epoch
    );
    let ours: Vec<serde_json::Value> = b
        .mappings()
        .into_iter()
        .filter(|m| m["internal_address"] == u_ip.to_string())
        .collect();
    assert_eq!(
        ours.len(),
        1,
        "only the checkpointed one is left: {ours:#?}"
    );
    assert_eq!(ours[0]["internal_port"], 5000);
}

/// A host that held only unprotected mappings loses them all in a takeover. The
/// active replicates one record per host when it gets its first unprotected mapping
/// (not waited for), so the successor knows it: its epoch starts again and it gets an
/// ANNOUNCE at once (from the new active's PCP address) instead of learning of the loss
/// at its next renewal, while a fully protected host hears nothing and keeps its epoch.
#[test]
fn takeover_announces_to_a_host_that_held_only_unprotected_mappings() {
    let plan = PairPlan::new(SERVER_CONFIG, HaTiming::default());
    let (mut a, b) = start_pair(&plan);
    let (p_ip, o_ip) = (fresh_ip(), fresh_ip());
    let (p_announce, o_announce) = (announce_listener(p_ip), announce_listener(o_ip));
    let p = PcpClient::new(IpAddr::V4(p_ip), a.pcp);
    let o = PcpClient::new(IpAddr::V4(o_ip), a.pcp);
    let p1 = aged_protected_map(&p);
    for port in [6000, 6001] {
        let r = o.map(Map::udp(port).without_checkpoint());
        assert_eq!(r.result, ResultCode::Success);
        assert!(!r.checkpoint_echoed);
    }
    let o1 = o.map(Map::udp(6001).without_checkpoint());
    let c1 = Instant::now();
    common::kill_settled_active(&mut a, &b, TAKEOVER_LIMIT);

    let ann_epoch = expect_announce(
        &o_announce,
        b.pcp,
        "an ANNOUNCE for the host that held only unprotected mappings",
    );
    assert!(
        state_lost(c1, o1.epoch, Instant::now(), ann_epoch),
        "the ANNOUNCE's epoch {ann_epoch} after {} must signal the loss",
        o1.epoch
    );
    assert_told_nothing(&p_announce);
    let h = b.ha();
    assert_eq!(
        h["lost_hosts"]["unprotected"].as_u64(),
        Some(1),
        "only the host with unprotected mappings lost state: {h}"
    );

    assert_continuous(&PcpClient::new(IpAddr::V4(p_ip), b.pcp), &p1, c1);
    assert!(
        !b.mappings()
            .iter()
            .any(|m| m["internal_address"] == o_ip.to_string()),
        "the unprotected mappings are gone"
    );
}

/// The backup dies under checkpointed load: held replies go out without 192 within the
/// ack timeout and nothing is promised while no backup exists; the backup restarts and
/// is resynchronised (bulk copy) while the load goes on; then the active is killed and
/// every promise, old and new, is on the new active.
#[test]
fn backup_lost_and_resynced_under_load_then_active_killed() {
    let seed = std::env::var("PCP_FAILOVER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0xb4c0_0001_u64);
    let plan = PairPlan::new(SERVER_CONFIG, HaTiming::default());
    let (mut a, mut b) = start_pair(&plan);
    let ctl = Arc::new(Control::default());
    let mut rng = Rng(seed);
    let load = start_load(a.pcp, &mut rng, &ctl);

    std::thread::sleep(Duration::from_millis(400));
    b.kill9();
    let backup_dead = Instant::now();
    std::thread::sleep(Duration::from_millis(1000));
    let h = a.ha();
    assert_eq!(h["backup_status"], "not_ready", "{h}");
    assert_eq!(h["held_responses"], 0, "{h}");
    let backup_back = Instant::now();
    let b = plan.start(PCPD, Node::B, "backup");
    let resynced = wait_ha(&a, Duration::from_secs(10), "A's backup ready again", |h| {
        h["ready"] == true && h["backup_status"] == "ready"
    });
    let resync = backup_back.elapsed();
    std::thread::sleep(Duration::from_millis(400));

    let killed_at = Instant::now();
    a.kill9();
    ctl.killed.store(true, Ordering::Relaxed);
    ctl.stop.store(true, Ordering::Relaxed);
    wait_ha(&b, TAKEOVER_LIMIT, "B takes over", |h| {
        h["role"] == "active"
    });
    let takeover = killed_at.elapsed();
    let hosts = join_load(load);
    let context = format!("seed {seed}");
    assert_eq!(
        hosts.iter().map(|h| h.timeouts).sum::<u64>(),
        0,
        "{context}"
    );
    let mut false_promises = 0;
    let mut slowest = Duration::ZERO;
    let mut echoed_after = 0;
    for (sent, took, echoed) in hosts.iter().flat_map(|h| &h.log) {
        slowest = slowest.max(*took);
        if *echoed && *sent > backup_dead && *sent < backup_back {
            false_promises += 1;
        }
        if *echoed && *sent > backup_back {
            echoed_after += 1;
        }
    }
    assert_eq!(
        false_promises, 0,
        "{context}: 192 echoed for requests sent while no backup existed"
    );
    assert!(
        slowest < Duration::from_millis(1000),
        "{context}: an answer took {slowest:?} (ack timeout 250 ms)"
    );
    assert!(echoed_after > 0, "{context}: 192 again after the resync");
    let checked = check_promises(&b, &hosts, &context);
    eprintln!(
        "backup lost: ack timeouts {}, resync {} ms (lag {}), slowest answer {} ms; \
         then active killed: takeover {} ms, {checked} promises checked",
        resynced["ack_timeouts"],
        resync.as_millis(),
        resynced["lag"],
        slowest.as_millis(),
        takeover.as_millis()
    );
}

/// A host's first unprotected mapping is answered at once, before the record that
/// marks the host unprotected reaches the backup. If the active dies in between, the
/// successor keeps the host's epoch and sends no ANNOUNCE: the host is never told that
/// it lost a mapping (RFC 6887 §8.5) until it happens to renew it.
#[test]
fn unprotected_host_record_is_replicated_before_the_answer() {
    let attempts = 10;
    let mut missed = Vec::new();
    for i in 0..attempts {
        let plan = PairPlan::new(SERVER_CONFIG, HaTiming::default());
        let (mut a, b) = start_pair(&plan);
        let u_ip = fresh_ip();
        let listener = announce_listener(u_ip);
        let u = PcpClient::new(IpAddr::V4(u_ip), a.pcp);
        assert!(u.map(Map::udp(5000)).checkpoint_echoed);
        // Its first unprotected mapping: answered, then the active dies at once.
        let plain = u.map(Map::udp(5001).without_checkpoint());
        a.kill9();
        assert_eq!(plain.result, ResultCode::Success);
        wait_ha(&b, TAKEOVER_LIMIT, "B takes over", |h| {
            h["role"] == "active"
        });
        let mut buf = [0u8; 1100];
        listener
            .set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        if listener.recv_from(&mut buf).is_err() {
            missed.push(i);
        }
    }
    assert!(
        missed.is_empty(),
        "no ANNOUNCE after the takeover in attempts {missed:?} of {attempts}: the host \
         lost mapping 5001 and its epoch continues"
    );
}

/// Misconfiguration: both nodes configured `active` and started together. Both take
/// over after their join time, in the same (odd) term; the first frame each hears from
/// the other makes the one with the lower incarnation step down. Nothing is promised
/// meanwhile (neither has a ready backup), and the pair converges: one active, one
/// ready backup, 192 echoed.
#[test]
fn two_nodes_configured_active_converge_to_one() {
    let plan = PairPlan::new(SERVER_CONFIG, HaTiming::default());
    let a = plan.start(PCPD, Node::A, "active");
    let b = plan.start(PCPD, Node::B, "active");
    let (ha, hb) = common::wait_for(Duration::from_secs(10), "one active, one backup", || {
        let (ha, hb) = (a.try_ha()?, b.try_ha()?);
        let roles = (ha["role"].as_str()?, hb["role"].as_str()?);
        matches!(roles, ("active", "backup") | ("backup", "active")).then_some((ha, hb))
    });
    let (active, backup) = if ha["role"] == "active" {
        (&a, &b)
    } else {
        (&b, &a)
    };
    assert_eq!(term(&ha), term(&hb), "A {ha}, B {hb}");
    wait_ha(backup, Duration::from_secs(10), "backup ready", |h| {
        h["ready"] == true
    });
    wait_ha(
        active,
        Duration::from_secs(10),
        "active sees a ready backup",
        |h| h["backup_status"] == "ready",
    );
    let (last_a, last_b) = never_two_actives(&a, &b, Duration::from_secs(1));
    assert_ne!(last_a.expect("A")["role"], last_b.expect("B")["role"]);
    assert!(active.client().map(Map::udp(7000)).checkpoint_echoed);
}

/// A switchover asked of an active whose backup died a while ago must be refused: there
/// is nobody to hand over to.
#[test]
fn switchover_is_refused_when_the_backup_is_gone() {
    let plan = PairPlan::new(SERVER_CONFIG, HaTiming::default());
    let (a, mut b) = start_pair(&plan);
    b.kill9();
    wait_ha(&a, Duration::from_secs(5), "A sees no backup", |h| {
        h["peer_connected"] == false && h["backup_status"] == "not_ready"
    });
    let (status, body) = a.post("/ha/switchover");
    let h = a.ha();
    assert_eq!(
        status, 409,
        "switchover without a live backup: {body}; then {h}"
    );
}

/// If the backup dies during a switchover, the draining node must not stay out of
/// service for good: after the detection time it should serve again (or at least
/// `POST /ha/promote` should bring it back).
#[test]
fn draining_without_a_backup_resumes_service() {
    let plan = PairPlan::new(SERVER_CONFIG, HaTiming::default());
    let (a, b) = start_pair(&plan);
    let made = checkpoint_some(&a, 1, 3);
    // Freeze the backup, then ask for the handover: it can never complete.
    b.signal("STOP");
    let (status, body) = a.post("/ha/switchover");
    assert_eq!(status, 200, "{body}");
    std::thread::sleep(Duration::from_secs(2));
    let h = a.ha();
    let (ip, port, _) = made[0];
    let c = PcpClient::new(ip, a.pcp);
    let answered = c.try_map(Map::udp(port), Duration::from_millis(500));
    let (status, body) = a.post("/ha/promote");
    let after = a.ha();
    let answered_after = c.try_map(Map::udp(port), Duration::from_millis(500));
    b.signal("CONT");
    assert!(
        answered.is_some() || (status == 200 && answered_after.is_some()),
        "the only live node serves nobody: {h}; promote answered {status} {body}, \
         then {after}, PCP answer after promote: {answered_after:?}"
    );
}

/// Creates `per_host` checkpointed mappings (internal ports 10000…) from each of `hosts`
/// fresh hosts on `d`, `batch` requests in flight per host; stops at the first missing
/// answer. Returns how many answers were SUCCESS with 192.
fn fill(d: &Pcpd, hosts: usize, per_host: u16, batch: u16) -> usize {
    let mut echoed = 0;
    for _ in 0..hosts {
        let c = PcpClient::new(IpAddr::V4(fresh_ip()), d.pcp);
        for start in (0..per_host).step_by(usize::from(batch)) {
            let end = (start + batch).min(per_host);
            for k in start..end {
                c.send(&c.map_request(Map::udp(10_000 + k)));
            }
            for _ in start..end {
                let Some(raw) = c.recv_within(Duration::from_secs(2)) else {
                    return echoed;
                };
                let a = common::parse_answer(&raw);
                if a.result == ResultCode::Success && a.checkpoint_echoed {
                    echoed += 1;
                }
            }
        }
    }
    echoed
}

/// A switchover of a pair holding many checkpointed mappings keeps them all. The old
/// active, stepping down, tears its table down under the core lock; when that takes
/// longer than its join time (`detection_ms × 1.25`) it must still follow the new
/// active — not take over again with an empty table, whose higher term makes the new
/// active drop everything. Short timers make 28 000 mappings (debug build) enough; with
/// the default timers the same happens from about 900 000 in a release build
/// (`scripts/bench/ha-switchover.sh`). (With timers this short a node may also stall
/// past `detection_ms` while a hash table grows during the fill — a spurious takeover,
/// which then goes through the same step-down. Either way, every mapping whose answer
/// carried 192 must be on the active at the end.)
#[test]
fn switchover_of_a_large_table_keeps_it() {
    let timing = HaTiming {
        heartbeat_ms: 15,
        detection_ms: 32,
        ack_timeout_ms: 1000,
    };
    let plan = PairPlan::new(&SERVER_CONFIG.replace("4096", "100000"), timing);
    let (a, b) = start_pair(&plan);
    let n = fill(&a, 10, 2800, 50) as u64;
    std::thread::sleep(Duration::from_millis(500));
    if a.ha()["role"] == "active" {
        wait_ha(&b, Duration::from_secs(20), "B stores every mapping", |h| {
            h["stored"].as_u64() == Some(n) && h["ready"] == true
        });
        let (status, body) = a.post("/ha/switchover");
        assert_eq!(status, 200, "{body}");
    }
    std::thread::sleep(Duration::from_secs(2));
    let (ha, hb) = (a.ha(), b.ha());
    let active = if ha["role"] == "active" { &a } else { &b };
    let held = active.get_json("/status");
    assert!(
        held["checkpointed"].as_u64().unwrap_or(0) >= n,
        "{n} answers carried 192; after the switchover: A {ha}, B {hb}; the active holds \
         {held}"
    );
}

/// `[ha] state_file`: a node restarted with its state file never takes a term it took
/// before (without the file it would take term 1 again); an unreadable file stops it.
#[test]
fn restarted_node_with_a_state_file_takes_a_new_term() {
    let dir = common::TempDir::new();
    let state = dir.join("ha.state");
    let ip = fresh_ip();
    let ha = SocketAddr::new(IpAddr::V4(ip), free_port(ip, true));
    let peer_ip = fresh_ip();
    let peer = SocketAddr::new(IpAddr::V4(peer_ip), free_port(peer_ip, true));
    let config = format!(
        "{SERVER_CONFIG}\n[ha]\nlisten = \"{ha}\"\npeer = \"{peer}\"\nrole = \"active\"\n\
         detection_ms = 300\nstate_file = \"{}\"\n",
        state.display()
    );
    let mut terms = Vec::new();
    for _ in 0..3 {
        let mut d = common::pcpd(PCPD).at(ip).config(&config).start();
        let h = wait_ha(&d, Duration::from_secs(10), "active after joining", |h| {
            h["role"] == "active"
        });
        let t = term(&h);
        let kept = std::fs::read_to_string(&state).expect("the state file is written");
        assert!(kept.contains(&format!("term {t}")), "{kept}");
        terms.push(t);
        d.kill9();
    }
    assert!(
        terms.windows(2).all(|w| w[1] > w[0]) && terms.iter().all(|t| t % 2 == 1),
        "each start takes a new odd term: {terms:?}"
    );

    std::fs::write(&state, "garbage\n").expect("write");
    let cfg = dir.join("bad.toml");
    std::fs::write(&cfg, &config).expect("write");
    let admin_port = free_port(ip, false);
    let out = std::process::Command::new(PCPD)
        .arg("--config")
        .arg(&cfg)
        .arg("--listen")
        .arg(SocketAddr::new(IpAddr::V4(ip), free_port(ip, true)).to_string())
        .arg("--admin")
        .arg(SocketAddr::new(IpAddr::V4(ip), admin_port).to_string())
        .output()
        .expect("run pcpd");
    assert!(!out.status.success(), "started with a corrupt state file");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ha.state"), "the error names the file: {err}");
}

/// `[ha] serving_file` whose lock another process holds (a second pcpd on the same
/// file): pcpd does not start, says which file, and leaves the file alone (it would
/// otherwise run with no liveness lock, or overwrite the other's "serving").
#[test]
fn a_held_serving_file_lock_stops_startup() {
    let dir = common::TempDir::new();
    let serving = dir.join("serving");
    std::fs::write(&serving, "0\n").expect("write");
    let lock = std::fs::File::create(dir.join("serving.lock")).expect("lock file");
    lock.try_lock().expect("the test holds the lock");
    let ip = fresh_ip();
    let ha = SocketAddr::new(IpAddr::V4(ip), free_port(ip, true));
    let peer_ip = fresh_ip();
    let peer = SocketAddr::new(IpAddr::V4(peer_ip), free_port(peer_ip, true));
    let config = format!(
        "{SERVER_CONFIG}\n[ha]\nlisten = \"{ha}\"\npeer = \"{peer}\"\nrole = \"active\"\n\
         serving_file = \"{}\"\n",
        serving.display()
    );
    let cfg = dir.join("pcpd.toml");
    std::fs::write(&cfg, &config).expect("write");
    let cfg = cfg.display().to_string();
    let listen = SocketAddr::new(IpAddr::V4(ip), free_port(ip, true)).to_string();
    let admin = SocketAddr::new(IpAddr::V4(ip), free_port(ip, false)).to_string();
    let (status, _out, err) = common::run(
        PCPD.as_ref(),
        &["--config", &cfg, "--listen", &listen, "--admin", &admin],
        Duration::from_secs(30),
    );
    assert!(!status.success(), "started without the lock: {err}");
    assert!(
        err.contains("serving_file") && err.contains("serving.lock"),
        "the error names the file: {err}"
    );
    assert_eq!(
        std::fs::read_to_string(&serving).expect("read"),
        "0\n",
        "the other's serving file was overwritten"
    );
    drop(lock);
}

/// Every `pcp_ha_*` sample of `d`'s `GET /metrics`, by its full key (name and labels).
fn ha_metrics(d: &Pcpd) -> HashMap<String, f64> {
    d.get("/metrics")
        .lines()
        .filter(|l| l.starts_with("pcp_ha_"))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn sample(m: &HashMap<String, f64>, key: &str) -> f64 {
    *m.get(key).unwrap_or_else(|| panic!("no {key} in {m:#?}"))
}

/// The one `pcp_ha_role` sample at 1, checking that the others are 0.
fn role_metric(m: &HashMap<String, f64>) -> String {
    let on: Vec<&str> = ["joining", "active", "promoting", "draining", "backup"]
        .into_iter()
        .filter(|r| sample(m, &format!("pcp_ha_role{{role=\"{r}\"}}")) == 1.0)
        .collect();
    assert_eq!(on.len(), 1, "exactly one role at 1: {m:#?}");
    on[0].to_string()
}

/// The HA metrics of both nodes of a pair follow a failover and a fencing: roles,
/// terms, readiness, the backup's store, released replies, then on the successor the
/// promotion, the mappings adopted and the hosts that lost state (and the ANNOUNCE
/// sent to them), and on the old active, resumed, its step-down.
#[test]
fn ha_metrics_follow_a_failover_on_both_nodes() {
    let plan = PairPlan::new(SERVER_CONFIG, HaTiming::default());
    let (a, b) = start_pair(&plan);
    let (ma, mb) = (ha_metrics(&a), ha_metrics(&b));
    assert_eq!(role_metric(&ma), "active");
    assert_eq!(role_metric(&mb), "backup");
    assert_eq!(sample(&ma, "pcp_ha_active"), 1.0);
    assert_eq!(sample(&mb, "pcp_ha_active"), 0.0);
    assert_eq!(sample(&ma, "pcp_ha_term"), term(&a.ha()) as f64);
    assert_eq!(sample(&mb, "pcp_ha_ready"), 1.0);
    assert_eq!(
        sample(&ma, "pcp_ha_backup_status{status=\"ready\"}"),
        1.0,
        "{ma:#?}"
    );
    assert_eq!(sample(&ma, "pcp_ha_link_keyed"), 0.0);
    assert_eq!(sample(&mb, "pcp_ha_standby_backlog_records"), 0.0);
    assert_eq!(sample(&mb, "pcp_ha_promotions_total"), 0.0);

    let made = checkpoint_some(&a, 2, 3);
    let u_ip = fresh_ip();
    let u_announce = announce_listener(u_ip);
    let u = PcpClient::new(IpAddr::V4(u_ip), a.pcp);
    assert!(u.map(Map::udp(5000)).checkpoint_echoed);
    assert!(!u.map(Map::udp(5001).without_checkpoint()).checkpoint_echoed);
    wait_ha(
        &a,
        Duration::from_secs(2),
        "nothing left to acknowledge",
        |h| h["lag"] == 0,
    );
    let ma2 = ha_metrics(&a);
    assert!(
        sample(&ma2, "pcp_ha_released_total")
            >= sample(&ma, "pcp_ha_released_total") + made.len() as f64 + 1.0,
        "every promise was released after an acknowledgement: {ma2:#?}"
    );
    common::wait_for(Duration::from_secs(5), "B stores the copy", || {
        (sample(&ha_metrics(&b), "pcp_ha_stored_mappings") == made.len() as f64 + 1.0).then_some(())
    });

    a.signal("STOP");
    wait_ha(&b, TAKEOVER_LIMIT, "B takes over", |h| {
        h["role"] == "active"
    });
    let mut buf = [0u8; 1100];
    u_announce
        .recv_from(&mut buf)
        .expect("an ANNOUNCE to the host that lost a mapping");
    let mb2 = ha_metrics(&b);
    assert_eq!(role_metric(&mb2), "active");
    assert!(sample(&mb2, "pcp_ha_term") > sample(&mb, "pcp_ha_term"));
    assert_eq!(sample(&mb2, "pcp_ha_promotions_total"), 1.0);
    assert_eq!(
        sample(&mb2, "pcp_ha_adopted_mappings"),
        made.len() as f64 + 1.0
    );
    assert_eq!(sample(&mb2, "pcp_ha_adopt_failures"), 0.0);
    assert_eq!(
        sample(&mb2, "pcp_ha_lost_hosts{reason=\"unprotected\"}"),
        1.0
    );
    assert_eq!(
        sample(&mb2, "pcp_ha_lost_hosts{reason=\"adopt_failed\"}"),
        0.0
    );
    assert!(b.metric("pcp_announces_total{outcome=\"plain\"}") >= Some(1.0));
    assert_eq!(
        b.metric("pcp_announces_total{outcome=\"tagged\"}"),
        Some(0.0)
    );
    common::wait_for(
        Duration::from_secs(5),
        "B: no peer, no ready backup",
        || {
            let m = ha_metrics(&b);
            (sample(&m, "pcp_ha_peer_connected") == 0.0
                && sample(&m, "pcp_ha_backup_status{status=\"ready\"}") == 0.0)
                .then_some(())
        },
    );

    a.signal("CONT");
    wait_ha(
        &a,
        Duration::from_secs(10),
        "A back as a ready backup",
        |h| h["role"] == "backup" && h["ready"] == true,
    );
    let ma3 = ha_metrics(&a);
    assert_eq!(role_metric(&ma3), "backup");
    assert_eq!(sample(&ma3, "pcp_ha_demotions_total"), 1.0);
    assert_eq!(sample(&ma3, "pcp_ha_term"), sample(&mb2, "pcp_ha_term"));
    assert_eq!(sample(&ma3, "pcp_ha_ready"), 1.0);
    common::wait_for(
        Duration::from_secs(5),
        "B sees a ready backup again",
        || {
            let m = ha_metrics(&b);
            (sample(&m, "pcp_ha_backup_status{status=\"ready\"}") == 1.0
                && sample(&m, "pcp_ha_peer_connected") == 1.0)
                .then_some(())
        },
    );
}

/// Issue (takeover ANNOUNCE): a host that lost state at a takeover gets the RFC 6887
/// §14.1.1 burst — several copies at growing gaps, not one datagram that a single loss
/// defeats — from the service address it talks to. Each node listens on two
/// addresses, the second (its service address for the host, `[[acl.listen]]`) the
/// only one whose access list names the host: every copy must come from B's.
#[test]
fn takeover_announce_is_a_burst_from_the_hosts_service_address() {
    let plan = PairPlan::new(SERVER_CONFIG, HaTiming::default());
    let h = fresh_ip();
    let service = |node: Node| {
        let ip = fresh_ip();
        let addr = SocketAddr::new(IpAddr::V4(ip), free_port(ip, true));
        let role = if node == Node::A { "active" } else { "backup" };
        let own = match node {
            Node::A => plan.ip_a,
            Node::B => plan.ip_b,
        };
        let text = format!(
            "{}\n[[acl.listen]]\naddress = \"{addr}\"\nallow = [\"{h}/32\"]\n",
            plan.config(node, role)
        );
        let d = common::pcpd(PCPD)
            .at(own)
            .config(&text)
            .args(["--listen".to_string(), addr.to_string()])
            .start();
        (d, addr)
    };
    let (mut a, a_service) = service(Node::A);
    let (b, b_service) = service(Node::B);
    wait_ha(&a, Duration::from_secs(10), "A active and ready", |h| {
        h["role"] == "active" && h["backup_status"] == "ready"
    });
    wait_ha(&b, Duration::from_secs(10), "B backup and ready", |h| {
        h["role"] == "backup" && h["ready"] == true
    });
    let listener = announce_listener(h);
    let c = PcpClient::new(IpAddr::V4(h), a_service);
    assert!(c.map(Map::udp(5000)).checkpoint_echoed);
    assert!(!c.map(Map::udp(5001).without_checkpoint()).checkpoint_echoed);
    common::kill_settled_active(&mut a, &b, TAKEOVER_LIMIT);
    // Copies at 0, 250, 750, 1750 and 3750 ms (the second up to 250 ms late: the
    // expiry task's tick); 4.5 s sees five.
    let mut copies: Vec<(Instant, SocketAddr, u32)> = Vec::new();
    let until = Instant::now() + Duration::from_millis(4500);
    let mut buf = [0u8; 1100];
    listener
        .set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    while Instant::now() < until {
        if let Ok((n, from)) = listener.recv_from(&mut buf) {
            let r = pcp_proto::Response::parse(&buf[..n]).expect("a PCP response");
            assert_eq!(r.body, pcp_proto::Body::Announce);
            copies.push((Instant::now(), from, r.epoch));
        }
    }
    assert!(copies.len() >= 4, "a burst, not one datagram: {copies:?}");
    for (_, from, epoch) in &copies {
        assert_eq!(
            *from, b_service,
            "from B's service address for the host (not its first listen address {})",
            b.pcp
        );
        assert!(*epoch <= 5, "the host's epoch starts again: {epoch}");
    }
    let gaps: Vec<Duration> = copies.windows(2).map(|w| w[1].0 - w[0].0).collect();
    // Each copy is scheduled from the moment the one before left, so from the second
    // gap on each is at least its nominal 250 ms × 2^k (less the receiver's jitter);
    // the first may run late by the expiry task's tick.
    assert!(
        gaps[0] >= Duration::from_millis(200),
        "copies are spaced: {gaps:?}"
    );
    for (k, g) in gaps.iter().enumerate().skip(1) {
        assert!(
            *g + Duration::from_millis(50) >= Duration::from_millis(250 << k),
            "gap {k} doubles: {gaps:?}"
        );
    }
    assert!(gaps[2] > gaps[0], "the gaps grow: {gaps:?}");
}

/// Continues a process stopped with SIGSTOP when dropped (also on a panic), so a failed
/// assertion never leaves a frozen pcpd behind (the node's own guard then kills it).
struct Frozen<'a>(&'a Pcpd);

impl<'a> Frozen<'a> {
    /// Sends SIGSTOP and waits until every thread of `d` is stopped: the signal is
    /// delivered asynchronously, and on a loaded machine a thread may otherwise still
    /// acknowledge a record after `kill` returned.
    fn stop(d: &'a Pcpd) -> Frozen<'a> {
        d.signal("STOP");
        let frozen = Frozen(d);
        let stopped =
            pcp_testkit::wait_until(Duration::from_secs(5), || all_threads_stopped(d.pid()));
        assert!(stopped, "pcpd {} did not stop", d.pid());
        frozen
    }
}

/// Whether every thread of process `pid` is in state T (stopped), per /proc.
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| {
            // "tid (comm) S ...": the state follows the last ')'.
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(['T', 't']))
        })
    })
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        self.0.signal("CONT");
    }
}

/// "Backup too slow", end to end: the backup is frozen (SIGSTOP) while it still counts
/// as heard, so the active holds a checkpointed reply for it. The reply must go out
/// SUCCESS without 192 after about `ack_timeout_ms`, withdrawn as `backup_timeout` and
/// counted in `GET /ha` and in `pcp_ha_ack_timeouts_total`; meanwhile another client's
/// request is answered at once, not after the held one. Once the backup runs again the
/// pair recovers and 192 is echoed again. Then once more for a host whose mappings were
/// all checkpointed: withdrawing the promise exposes it, so its reply waits a second
/// time for the "host exposed" record (docs/HA.md, "Sync before respond") and goes out
/// after at most twice `ack_timeout_ms`, still without 192, counted once.
#[test]
fn frozen_backup_costs_one_ack_timeout_and_blocks_nobody_else() {
    // A detection time well above the holds, so the frozen backup still counts as heard
    // (the reply is held rather than refused at once as `backup_not_ready`).
    let timing = HaTiming {
        heartbeat_ms: 100,
        detection_ms: 6000,
        ack_timeout_ms: 1000,
    };
    let ack_timeout = Duration::from_millis(timing.ack_timeout_ms);
    let slack = Duration::from_millis(1500);
    let plan = PairPlan::new(SERVER_CONFIG, timing);
    let (a, b) = start_pair(&plan);
    let held_client = PcpClient::new(IpAddr::V4(fresh_ip()), a.pcp);
    let other_client = PcpClient::new(IpAddr::V4(fresh_ip()), a.pcp);
    let protected_client = PcpClient::new(IpAddr::V4(fresh_ip()), a.pcp);
    // All hosts known to the pair before the freeze, and the first two already
    // "exposed" (holding checkpointed and unprotected mappings): a reply that changes
    // whether a host is exposed also waits for the backup to hold that fact (the last
    // part of this test).
    for c in [&held_client, &other_client] {
        let first = c.map(Map::udp(7000).without_checkpoint());
        assert_eq!(first.result, ResultCode::Success);
        assert!(c.map(Map::udp(7002)).checkpoint_echoed);
    }
    assert!(protected_client.map(Map::udp(7000)).checkpoint_echoed);
    let timeouts = || a.ha()["ack_timeouts"].as_u64().expect("ack_timeouts");
    let metric = || {
        a.metric("pcp_ha_ack_timeouts_total")
            .expect("pcp_ha_ack_timeouts_total")
    };
    let (timeouts_before, metric_before) = (timeouts(), metric());

    let frozen = Frozen::stop(&b);
    let sent = Instant::now();
    held_client.send(&held_client.map_request(Map::udp(7001)));
    std::thread::sleep(Duration::from_millis(100));
    let other = other_client
        .try_map(Map::udp(7001).without_checkpoint(), Duration::from_secs(5))
        .expect("the other client is answered while a reply is held");
    let other_at = sent.elapsed();
    let held_raw = held_client
        .recv_within(ack_timeout + Duration::from_secs(3))
        .expect("the held reply goes out after the ack timeout");
    let held_at = sent.elapsed();
    let held = common::parse_answer(&held_raw);
    let (h, metric_after) = (a.ha(), metric());
    let m = a
        .mappings()
        .into_iter()
        .find(|m| {
            m["internal_address"] == held_client.ip().to_string() && m["internal_port"] == 7001
        })
        .expect("the mapping of the held reply");
    drop(frozen);
    eprintln!("other client answered after {other_at:?}, the held reply after {held_at:?}");

    assert_eq!(other.result, ResultCode::Success);
    assert!(
        other_at < held_at,
        "the other client was answered after the held reply ({other_at:?} vs {held_at:?})"
    );
    assert!(
        other_at < ack_timeout,
        "the other client waited for the held reply: {other_at:?}"
    );
    assert_eq!(held.result, ResultCode::Success, "{held:?}");
    assert!(!held.checkpoint_echoed, "192 echoed with a frozen backup");
    assert!(
        held_at >= ack_timeout.mul_f64(0.9),
        "the reply was not held for the backup: {held_at:?}"
    );
    assert!(
        held_at <= ack_timeout + slack,
        "held far beyond ack_timeout_ms: {held_at:?}"
    );
    assert_eq!(
        h["ack_timeouts"].as_u64(),
        Some(timeouts_before + 1),
        "GET /ha counts the late reply: {h}"
    );
    assert_eq!(
        metric_after,
        metric_before + 1.0,
        "pcp_ha_ack_timeouts_total"
    );
    assert_eq!(m["checkpointed"], false, "{m}");
    assert_eq!(m["checkpoint_reason"], "backup_timeout", "{m}");
    assert_eq!(h["role"], "active", "no takeover meanwhile: {h}");

    // Recovery: the backup runs again, catches up, and 192 is honoured again.
    wait_ha(&a, Duration::from_secs(10), "backup ready again", |h| {
        h["backup_status"] == "ready" && h["lag"] == 0
    });
    let again = held_client.map(Map::udp(7001));
    assert_eq!(again.result, ResultCode::Success);
    assert!(
        again.checkpoint_echoed,
        "192 again once the backup acknowledges"
    );
    assert_eq!(a.ha()["role"], "active");
    wait_ha(
        &b,
        Duration::from_secs(5),
        "B holds the renewed checkpoint",
        |h| h["role"] == "backup" && h["stored"].as_u64() >= Some(2),
    );

    // A host with only checkpointed mappings: the withdrawal exposes it, one more wait.
    let before = timeouts();
    let frozen = Frozen::stop(&b);
    let sent = Instant::now();
    let late = protected_client.try_map(Map::udp(7001), 2 * ack_timeout + Duration::from_secs(3));
    let late_at = sent.elapsed();
    let after = timeouts();
    drop(frozen);
    let late = late.expect("the reply that exposes its host goes out too");
    eprintln!("the reply exposing its host went out after {late_at:?}");
    assert_eq!(late.result, ResultCode::Success);
    assert!(!late.checkpoint_echoed, "192 echoed with a frozen backup");
    assert!(
        late_at >= ack_timeout.mul_f64(0.9) && late_at <= 2 * ack_timeout + slack,
        "{late_at:?}"
    );
    assert_eq!(
        after,
        before + 1,
        "counted once though it waited twice: {before} -> {after}"
    );
    wait_ha(&a, Duration::from_secs(10), "backup ready again", |h| {
        h["backup_status"] == "ready" && h["lag"] == 0
    });
    assert!(protected_client.map(Map::udp(7003)).checkpoint_echoed);
}
