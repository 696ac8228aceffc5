//! `pcpd` driving the Linux kernel's NAT (`dataplane = "nftables"`) in network
//! namespaces the tests create and remove, with traffic through it:
//!
//! ```text
//!                        ┌ nat-a: pcpd (active) ┐
//!  lan: 10.0.0.2 ── br ──┤   pair 10.255.0.0/30 ├── br ── wan: 192.0.2.100
//!                        └ nat-b: pcpd (backup) ┘
//!  gateway 10.0.0.1 and external address 192.0.2.1 live on the active NAT box
//! ```
//!
//! - `map_translates_and_kernel_refusal_is_no_resources`: one NAT box; MAPs made with
//!   `pcpc` carry UDP and TCP from the WAN host to the LAN host through the external
//!   address; a full nftables map makes the next request NO_RESOURCES with nothing
//!   of it left in the table; the table goes on clean exit.
//! - `filter_restricts_who_reaches_a_map`: a MAP with FILTERs lets the allowed WAN host
//!   in; one whose FILTER names somebody else keeps it out.
//! - `failover_keeps_checkpointed_services`: two NAT boxes in pair mode. The LAN host
//!   maps a UDP and a TCP service with `--checkpoint`, one without, one without but
//!   kept (`--keep`), and a PEER with `--checkpoint`; the active is killed with
//!   SIGKILL and the test moves the gateway and external addresses to the backup (what
//!   keepalived would do). Then the checkpointed services answer again on the same
//!   external ports, the unprotected one does not, the kept one is re-created after
//!   the backup's ANNOUNCE, a TCP connection opened before the failure carries on,
//!   and the PEER flow leaves from the same external port.
//!
//! Root only (a loud SKIP otherwise). Needs `ip`, `nft`, `sysctl`.

use std::process::Stdio;
use std::time::{Duration, Instant};

use pcp_testkit::netns::{self, Lab, Session, cannot_run};
use pcp_testkit::{pcpc_bin, poll};

const PCPD: &str = env!("CARGO_BIN_EXE_pcpd");
const LAN_HOST: &str = "10.0.0.2";
const GATEWAY: &str = "10.0.0.1";
const EXTERNAL: &str = "192.0.2.1";
const WAN_HOST: &str = "192.0.2.100";

/// Not a test: the traffic helpers the tests run inside their namespaces.
#[test]
#[ignore = "helper process of the namespace tests"]
fn netns_helper() {
    netns::helper_main();
}

fn skip(test: &str) -> bool {
    match cannot_run(&["ip", "nft", "sysctl"]) {
        Some(why) => {
            eprintln!("!! SKIP {test}: {why}");
            true
        }
        None => false,
    }
}

/// The namespaces: a LAN host and a WAN host, each with a bridge, and `nats` NAT
/// boxes with a leg on each bridge; the first NAT box holds the gateway and external
/// addresses. Returns the lab and the NAT boxes' namespaces.
fn topology(tag: &str, nats: usize) -> (Lab, String, String, Vec<String>) {
    let mut lab = Lab::new(tag);
    let lan = lab.netns("lan");
    let wan = lab.netns("wan");
    let mut boxes = Vec::new();
    let mut lan_ports = Vec::new();
    let mut wan_ports = Vec::new();
    for i in 0..nats {
        let ns = lab.netns(&format!("nat{i}"));
        lab.veth(&ns, "lan0", &lan, &format!("l{i}"));
        lab.veth(&ns, "wan0", &wan, &format!("w{i}"));
        lab.sysctl(&ns, "net.ipv4.ip_forward=1");
        lan_ports.push(format!("l{i}"));
        wan_ports.push(format!("w{i}"));
        boxes.push(ns);
    }
    let lp: Vec<&str> = lan_ports.iter().map(String::as_str).collect();
    let wp: Vec<&str> = wan_ports.iter().map(String::as_str).collect();
    lab.bridge(&lan, "br0", &lp);
    lab.bridge(&wan, "br0", &wp);
    lab.ip(
        &lan,
        &["addr", "add", &format!("{LAN_HOST}/24"), "dev", "br0"],
    );
    lab.ip(&lan, &["route", "add", "default", "via", GATEWAY]);
    lab.ip(
        &wan,
        &["addr", "add", &format!("{WAN_HOST}/24"), "dev", "br0"],
    );
    hold_addresses(&lab, &boxes[0]);
    if nats == 2 {
        lab.veth(&boxes[0], "pair0", &boxes[1], "pair0");
        lab.ip(&boxes[0], &["addr", "add", "10.255.0.1/30", "dev", "pair0"]);
        lab.ip(&boxes[1], &["addr", "add", "10.255.0.2/30", "dev", "pair0"]);
    }
    (lab, lan, wan, boxes)
}

/// Puts the gateway and external addresses on NAT box `ns`.
fn hold_addresses(lab: &Lab, ns: &str) {
    lab.ip(
        ns,
        &["addr", "add", &format!("{GATEWAY}/24"), "dev", "lan0"],
    );
    lab.ip(
        ns,
        &["addr", "add", &format!("{EXTERNAL}/24"), "dev", "wan0"],
    );
}

fn config(extra: &str) -> String {
    format!(
        "[pcpd]\nlisten = [\"0.0.0.0:5351\"]\nadmin = \"127.0.0.1:8351\"\ndataplane = \"nftables\"\n\
         [pool]\naddresses = [\"{EXTERNAL}\"]\nport_min = 20000\nport_max = 29999\n\
         [tiers.default]\nmapping_quota = 64\ncheckpoint_quota = 64\n\
         checkpoint_rate = 100.0\ncheckpoint_burst = 100\n{extra}"
    )
}

/// Starts pcpd in `ns` with `config`; its output goes to `<dir>/<ns>.log`.
fn start_pcpd(lab: &mut Lab, ns: &str, config: &str, dir: &std::path::Path) -> usize {
    let path = dir.join(format!("{ns}.toml"));
    std::fs::write(&path, config).unwrap();
    let log = std::fs::File::create(dir.join(format!("{ns}.log"))).unwrap();
    let i = lab.spawn(
        ns,
        &[PCPD, "--config", path.to_str().unwrap()],
        Stdio::from(log.try_clone().unwrap()),
        Stdio::from(log),
    );
    let up = poll(Duration::from_secs(10), Duration::from_millis(50), || {
        lab.helper_once(ns, &["http", "127.0.0.1:8351", "/status"])
    });
    assert!(up.is_some(), "pcpd in {ns} did not start:\n{}", logs(dir));
    i
}

fn logs(dir: &std::path::Path) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().extension().is_some_and(|x| x == "log") {
            out += &format!(
                "--- {}\n{}",
                e.path().display(),
                std::fs::read_to_string(e.path()).unwrap_or_default()
            );
        }
    }
    out
}

/// `pcpc --json …` in the LAN namespace: the parsed `granted` line, or the output.
fn pcpc(lab: &Lab, lan: &str, args: &[&str]) -> Result<serde_json::Value, String> {
    let mut all = vec![
        pcpc_bin().to_str().unwrap(),
        "--json",
        "--server",
        "10.0.0.1:5351",
        "--timeout",
        "5",
        "--irt-ms",
        "300",
    ];
    all.extend_from_slice(args);
    let out = lab.exec(lan, &all);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "granted")
        .ok_or_else(|| format!("{text}{}", String::from_utf8_lossy(&out.stderr)))
}

fn port_of(v: &serde_json::Value) -> u16 {
    v["external_port"].as_u64().expect("external_port") as u16
}

fn nft_table(lab: &Lab, ns: &str) -> String {
    String::from_utf8_lossy(
        &lab.exec(ns, &["nft", "list", "table", "inet", "pcpd"])
            .stdout,
    )
    .into_owned()
}

/// A WAN-side probe of `proto` to the external address and `port`: the LAN echo's
/// answer, if one came.
fn probe(lab: &Lab, wan: &str, proto: &str, port: u16) -> Option<String> {
    let target = format!("{EXTERNAL}:{port}");
    lab.helper_once(wan, &[&format!("{proto}-probe"), &target])
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("pcpd-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn map_translates_and_kernel_refusal_is_no_resources() {
    if skip("map_translates_and_kernel_refusal_is_no_resources") {
        return;
    }
    let (mut lab, lan, wan, boxes) = topology("pn1", 1);
    let nat = boxes[0].clone();
    let dir = tempdir("nft1");
    // dnat4 holds at most 3 elements: the fourth MAP is refused by the kernel.
    let pcpd = start_pcpd(
        &mut lab,
        &nat,
        &config("[nftables]\nmax_elements = 3\n"),
        &dir,
    );
    lab.helper(&lan, &["udp-echo", &format!("{LAN_HOST}:5000")]);
    lab.helper(&lan, &["tcp-echo", &format!("{LAN_HOST}:5001")]);
    let u = pcpc(
        &lab,
        &lan,
        &["map", "--proto", "udp", "--internal-port", "5000"],
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&dir)));
    let t = pcpc(
        &lab,
        &lan,
        &["map", "--proto", "tcp", "--internal-port", "5001"],
    )
    .unwrap();
    assert_eq!(u["external_address"], EXTERNAL);
    let table = nft_table(&lab, &nat);
    assert!(
        table.contains(&format!(
            "{EXTERNAL} . udp . {} : {LAN_HOST} . 5000",
            port_of(&u)
        )),
        "{table}"
    );
    // Traffic: the WAN host reaches the LAN host's services through the external
    // address, and the LAN host sees the WAN host's own address (no source NAT).
    let answer = poll(Duration::from_secs(5), Duration::from_millis(100), || {
        probe(&lab, &wan, "udp", port_of(&u))
    })
    .unwrap_or_else(|| panic!("no UDP answer through the MAP\n{table}"));
    assert!(answer.starts_with(&format!("from {WAN_HOST}:")), "{answer}");
    let answer = probe(&lab, &wan, "tcp", port_of(&t)).expect("TCP through the MAP");
    assert!(answer.starts_with(&format!("from {WAN_HOST}:")), "{answer}");
    // A port nobody mapped is not forwarded.
    let unmapped = if port_of(&u) == 29_999 {
        29_998
    } else {
        29_999
    };
    assert_eq!(probe(&lab, &wan, "udp", unmapped), None);

    // The kernel refuses the next MAP: NO_RESOURCES (not SUCCESS), nothing left.
    let third = pcpc(
        &lab,
        &lan,
        &["map", "--proto", "udp", "--internal-port", "5002"],
    );
    assert!(third.is_ok(), "the third element still fits: {third:?}");
    let fourth = pcpc(
        &lab,
        &lan,
        &["map", "--proto", "udp", "--internal-port", "5003"],
    );
    let err = fourth.expect_err("the fourth MAP must be refused");
    assert!(err.contains("NO_RESOURCES"), "{err}");
    let table = nft_table(&lab, &nat);
    assert!(!table.contains(". 5003"), "{table}");
    let mappings = lab
        .helper_once(&nat, &["http", "127.0.0.1:8351", "/mappings"])
        .unwrap();
    assert!(!mappings.contains("5003"), "{mappings}");

    // Clean exit removes the table.
    let pid = lab.child(pcpd).id();
    netns::run(&["kill", "-TERM", &pid.to_string()]);
    let _ = lab.child(pcpd).wait();
    assert_eq!(nft_table(&lab, &nat), "", "table removed on exit");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn filter_restricts_who_reaches_a_map() {
    if skip("filter_restricts_who_reaches_a_map") {
        return;
    }
    let (mut lab, lan, wan, boxes) = topology("pn4", 1);
    let dir = tempdir("nft4");
    start_pcpd(&mut lab, &boxes[0], &config(""), &dir);
    for port in [5004, 5005] {
        lab.helper(&lan, &["udp-echo", &format!("{LAN_HOST}:{port}")]);
    }
    // FILTER allowing the WAN host (by a prefix and a host inside it, which the data
    // plane must merge), and one allowing only somebody else.
    let open = pcpc(
        &lab,
        &lan,
        &[
            "map",
            "--proto",
            "udp",
            "--internal-port",
            "5004",
            "--filter",
            "192.0.2.0/24:9",
            "--filter",
            &format!("{WAN_HOST}/32"),
        ],
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&dir)));
    let closed = pcpc(
        &lab,
        &lan,
        &[
            "map",
            "--proto",
            "udp",
            "--internal-port",
            "5005",
            "--filter",
            "192.0.2.200/32",
        ],
    )
    .unwrap();
    let got = poll(Duration::from_secs(5), Duration::from_millis(100), || {
        probe(&lab, &wan, "udp", port_of(&open))
    });
    assert!(
        got.is_some(),
        "the allowed peer is let in\n{}",
        nft_table(&lab, &boxes[0])
    );
    assert_eq!(
        probe(&lab, &wan, "udp", port_of(&closed)),
        None,
        "a peer outside the FILTER is kept out"
    );
    let table = nft_table(&lab, &boxes[0]);
    assert!(
        table.contains(&format!(
            "{EXTERNAL} . udp . {} . 192.0.2.200 . 0-65535",
            port_of(&closed)
        )),
        "{table}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn failover_keeps_checkpointed_services() {
    if skip("failover_keeps_checkpointed_services") {
        return;
    }
    failover(true);
}

/// The same with `[ha] preinstall = false`: the backup installs the checkpointed
/// mappings into its kernel only when it takes over.
#[test]
fn failover_keeps_checkpointed_services_installed_on_promotion() {
    if skip("failover_keeps_checkpointed_services_installed_on_promotion") {
        return;
    }
    failover(false);
}

fn failover(preinstall: bool) {
    let tag = if preinstall { "pn2" } else { "pn3" };
    // Generous by default: on a loaded machine a short detection time lets the backup
    // take over from a live active in the middle of the test (docs/BENCHMARKS.md ran
    // with PCP_NETNS_DETECTION_MS=600).
    let detection_ms: u64 = std::env::var("PCP_NETNS_DETECTION_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    let (mut lab, lan, wan, boxes) = topology(tag, 2);
    let (a, b) = (boxes[0].clone(), boxes[1].clone());
    let dir = tempdir(tag);
    let ha = |listen: &str, peer: &str, role: &str| {
        config(&format!(
            "[ha]\nlisten = \"{listen}:5400\"\npeer = \"{peer}:5400\"\nrole = \"{role}\"\n\
             heartbeat_ms = 100\ndetection_ms = {detection_ms}\npreinstall = {preinstall}\n"
        ))
    };
    let active = start_pcpd(
        &mut lab,
        &a,
        &ha("10.255.0.1", "10.255.0.2", "active"),
        &dir,
    );
    start_pcpd(
        &mut lab,
        &b,
        &ha("10.255.0.2", "10.255.0.1", "backup"),
        &dir,
    );
    // The active's backup is ready once it says so.
    let ready = poll(Duration::from_secs(10), Duration::from_millis(100), || {
        lab.helper_once(&a, &["http", "127.0.0.1:8351", "/ha"])
            .filter(|s| s.contains("\"ready\":true"))
    });
    assert!(
        ready.is_some(),
        "the pair never became ready\n{}",
        logs(&dir)
    );

    for (proto, port) in [("udp", 5000), ("tcp", 5001), ("udp", 5002), ("udp", 5003)] {
        lab.helper(
            &lan,
            &[&format!("{proto}-echo"), &format!("{LAN_HOST}:{port}")],
        );
    }
    lab.helper(&wan, &["udp-echo", &format!("{WAN_HOST}:7000")]);
    let map = |proto: &str, port: &str, cp: bool| {
        let mut args = vec!["map", "--proto", proto, "--internal-port", port];
        if cp {
            args.push("--checkpoint");
        }
        pcpc(&lab, &lan, &args).unwrap_or_else(|e| panic!("{e}\n{}", logs(&dir)))
    };
    let udp = map("udp", "5000", true);
    let tcp = map("tcp", "5001", true);
    let bare = map("udp", "5002", false);
    assert_eq!(udp["checkpoint"], "honoured", "{udp}");
    assert_eq!(tcp["checkpoint"], "honoured", "{tcp}");
    let peer = pcpc(
        &lab,
        &lan,
        &[
            "peer",
            "--proto",
            "udp",
            "--internal-port",
            "6000",
            "--remote",
            &format!("{WAN_HOST}:7000"),
            "--checkpoint",
        ],
    )
    .unwrap();
    // A kept, unprotected mapping: its client re-creates it when told of the loss.
    let keep_log = std::fs::File::create(dir.join("keep.out")).unwrap();
    let pcpc_path = pcpc_bin().to_str().unwrap().to_string();
    lab.spawn(
        &lan,
        &[
            &pcpc_path,
            "--json",
            "--server",
            "10.0.0.1:5351",
            "--announce-listen",
            "0.0.0.0:5350",
            "map",
            "--proto",
            "udp",
            "--internal-port",
            "5003",
            "--keep",
        ],
        Stdio::from(keep_log),
        Stdio::null(),
    );

    // Before the failure: everything reachable, the PEER flow leaves from its port.
    for (proto, v) in [("udp", &udp), ("tcp", &tcp), ("udp", &bare)] {
        let got = poll(Duration::from_secs(5), Duration::from_millis(100), || {
            probe(&lab, &wan, proto, port_of(v))
        });
        assert!(got.is_some(), "{proto} {} before the failure", port_of(v));
    }
    let peer_src = |lab: &Lab| {
        lab.helper_once(
            &lan,
            &[
                "udp-probe",
                &format!("{WAN_HOST}:7000"),
                &format!("{LAN_HOST}:6000"),
            ],
        )
    };
    let seen = peer_src(&lab).expect("the PEER flow");
    assert!(
        seen.starts_with(&format!("from {EXTERNAL}:{} ", port_of(&peer))),
        "{seen} (PEER {peer})"
    );
    let session = lab.helper(
        &wan,
        &["tcp-session", &format!("{EXTERNAL}:{}", port_of(&tcp))],
    );
    let mut session = Session::of(&mut lab, session);
    assert!(session.say("hello").contains("from "), "session before");
    // With preinstall the backup holds the checkpointed mappings in its own kernel
    // table already; without, its table is empty until it takes over.
    let pre = nft_table(&lab, &b);
    assert_eq!(
        pre.contains(&format!("udp . {} :", port_of(&udp))),
        preinstall,
        "{pre}"
    );
    assert!(
        !pre.contains(&format!("udp . {} :", port_of(&bare))),
        "{pre}"
    );

    // A client can tell an epoch reset only once more than 2 s have passed since its
    // last answer (RFC 6887 §8.5: client delta > server delta + 2 s).
    std::thread::sleep(Duration::from_secs(3));
    // The active dies; its addresses move to the backup (its links go down with it).
    let killed = Instant::now();
    let _ = lab.child(active).kill();
    let _ = lab.child(active).wait();
    lab.ip(&a, &["link", "set", "lan0", "down"]);
    lab.ip(&a, &["link", "set", "wan0", "down"]);
    hold_addresses(&lab, &b);
    // What gratuitous ARP from the new holder would do.
    lab.ip(&lan, &["neigh", "flush", "all"]);
    lab.ip(&wan, &["neigh", "flush", "all"]);

    let back = poll(Duration::from_secs(10), Duration::from_millis(20), || {
        probe(&lab, &wan, "udp", port_of(&udp))
    });
    assert!(
        back.is_some(),
        "checkpointed UDP service not back\n{}\n{}",
        nft_table(&lab, &b),
        logs(&dir)
    );
    let reachable_after = killed.elapsed();
    assert!(
        probe(&lab, &wan, "tcp", port_of(&tcp)).is_some(),
        "checkpointed TCP"
    );
    // The unprotected mapping is gone (its host was told by ANNOUNCE; a client that
    // does not keep its mapping does not come back).
    assert_eq!(probe(&lab, &wan, "udp", port_of(&bare)), None);
    // The long-lived TCP connection carries on (conntrack picks it up mid-stream on
    // the backup; the backup's DNAT and SNAT maps give the same translation).
    let answer = session.say("still there?");
    assert!(
        answer.starts_with("from "),
        "TCP session after failover: {answer}"
    );
    // PEER keeps its external port.
    let seen = peer_src(&lab).expect("the PEER flow after failover");
    assert!(
        seen.starts_with(&format!("from {EXTERNAL}:{} ", port_of(&peer))),
        "{seen} (PEER {peer})"
    );
    // The kept mapping is re-created on the backup after its ANNOUNCE.
    let recreated = poll(Duration::from_secs(15), Duration::from_millis(100), || {
        nft_table(&lab, &b)
            .contains(&format!("{LAN_HOST} . udp . 5003 :"))
            .then_some(())
    });
    assert!(
        recreated.is_some(),
        "kept mapping not re-created:\n{}\n{}",
        std::fs::read_to_string(dir.join("keep.out")).unwrap_or_default(),
        nft_table(&lab, &b)
    );
    eprintln!(
        "preinstall = {preinstall}: checkpointed UDP service reachable again \
         {reachable_after:?} after SIGKILL (addresses moved at once; detection_ms = {detection_ms})"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
