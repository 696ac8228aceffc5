//! `pcpctl ha`, `pcpctl promote` and `pcpctl switchover` against a real pair of `pcpd`
//! processes (see `support` for where pcpd comes from).

mod support;

use std::time::Duration;

use pcp_proto::ResultCode;
use pcp_testkit::pcpd_bin;
use pcp_testkit::{HaTiming, Map, Node, PairPlan, Pcpd, wait_ha};
use support::{pcpctl, start};

const SERVER_CONFIG: &str = "\
[pool]
addresses = [\"192.0.2.1\"]

[tiers.default]
checkpoint_quota = 100
checkpoint_rate = 1000.0
checkpoint_burst = 100
";

/// A pair, A active and B backup, both ready.
fn pair() -> (Pcpd, Pcpd) {
    let plan = PairPlan::new(SERVER_CONFIG, HaTiming::default());
    let a = plan.start(pcpd_bin(), Node::A, "active");
    let b = plan.start(pcpd_bin(), Node::B, "backup");
    wait_ha(&a, Duration::from_secs(10), "A active, backup ready", |h| {
        h["role"] == "active" && h["backup_status"] == "ready"
    });
    wait_ha(&b, Duration::from_secs(10), "B ready", |h| {
        h["ready"] == true
    });
    (a, b)
}

/// `pcpctl ha --json` parsed.
fn ha_json(d: &Pcpd) -> serde_json::Value {
    let (code, out, err) = pcpctl(d, &["ha", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("pcpctl ha --json: {e}: {out}"))
}

#[test]
fn ha_shows_both_roles_as_text_and_json() {
    let (a, b) = pair();
    assert!(a.client().map(Map::udp(5060)).checkpoint_echoed);
    wait_ha(&b, Duration::from_secs(5), "B stores the mapping", |h| {
        h["stored"] == 1
    });

    let (code, out, err) = pcpctl(&a, &["ha"]);
    assert_eq!(code, Some(0), "{err}");
    for line in [
        "role:          active",
        "term:          1",
        "peer:          connected",
        "ready:         yes (the backup holds a complete copy)",
        "backup:        ready",
        "held:          0",
        "released:      1",
    ] {
        assert!(out.lines().any(|l| l == line), "{line:?} missing in\n{out}");
    }
    let (code, out, err) = pcpctl(&b, &["ha"]);
    assert_eq!(code, Some(0), "{err}");
    for line in [
        "role:          backup",
        "ready:         yes (this node holds a complete copy)",
        "stored:        1",
    ] {
        assert!(out.lines().any(|l| l == line), "{line:?} missing in\n{out}");
    }

    let v = ha_json(&a);
    assert_eq!(v["role"], "active");
    assert_eq!(v["enabled"], true);
    assert_eq!(v["released_responses"], 1);
    let v = ha_json(&b);
    assert_eq!(v["role"], "backup");
    assert_eq!(v["stored"], 1);
}

#[test]
fn switchover_hands_over_and_refusals_exit_1_with_pcpds_reason() {
    let (a, b) = pair();
    let c = a.client();
    let made = c.map(Map::udp(5060));
    assert!(made.checkpoint_echoed);

    // Refused: promote on the active, switchover on the backup.
    let (code, out, err) = pcpctl(&a, &["promote"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert_eq!(
        err,
        "pcpctl: promote refused: this node is already active\n"
    );
    assert!(out.is_empty(), "{out}");
    let (code, _, err) = pcpctl(&b, &["switchover"]);
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(
        err,
        "pcpctl: switchover refused: only an active with a ready backup can hand over\n"
    );

    // The keepalived health check: only the active serves.
    let (code, out, err) = pcpctl(&a, &["ha", "--serving"]);
    assert_eq!(
        (code, out.as_str()),
        (Some(0), "serving: role active (term 1)\n"),
        "{err}"
    );
    let (code, out, err) = pcpctl(&b, &["ha", "--serving"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert_eq!(err, "pcpctl: not serving: role backup (term 1)\n");

    let (code, out, err) = pcpctl(&a, &["switchover"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "handing over to the backup\n");
    pcp_testkit::wait_for(Duration::from_secs(5), "roles swapped", || {
        (ha_json(&a)["role"] == "backup" && ha_json(&b)["role"] == "active").then_some(())
    });
    // The check follows the roles: the address would move to B.
    let (code, _, err) = pcpctl(&a, &["ha", "--serving"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.starts_with("pcpctl: not serving: role backup"), "{err}");
    let (code, out, err) = pcpctl(&b, &["ha", "--serving"]);
    assert_eq!(
        (code, out.as_str()),
        (Some(0), "serving: role active (term 2)\n"),
        "{err}"
    );
    // The mapping is on B, same endpoint; B answers for it.
    let r = pcp_testkit::PcpClient::new(c.ip(), b.pcp).map(Map::udp(5060));
    assert_eq!(r.result, ResultCode::Success);
    assert_eq!(r.external, made.external);
    wait_ha(&a, Duration::from_secs(10), "A holds B's copy", |h| {
        h["ready"] == true && h["stored"] == 1
    });
}

#[test]
fn promote_makes_a_backup_active() {
    let (a, b) = pair();
    let made = a.client().map(Map::udp(5060));
    assert!(made.checkpoint_echoed);
    let (code, out, err) = pcpctl(&b, &["promote"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "promoted\n");
    let v = ha_json(&b);
    assert_eq!(v["role"], "active");
    assert_eq!(v["term"], 2, "B started backup: its first term is even");
    assert_eq!(v["adopted"], 1);
    wait_ha(&a, Duration::from_secs(5), "A steps down", |h| {
        h["role"] == "backup" && h["term"] == 2
    });
}

#[test]
fn ha_commands_on_a_standalone_pcpd() {
    let d = start(None);
    let (code, out, err) = pcpctl(&d, &["ha"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out,
        "role:          standalone (pair mode not configured)\n"
    );
    assert_eq!(ha_json(&d)["role"], "standalone");
    let (code, out, err) = pcpctl(&d, &["ha", "--serving"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "serving: standalone (pair mode not configured)\n");
    for cmd in ["promote", "switchover"] {
        let (code, out, err) = pcpctl(&d, &[cmd]);
        assert_eq!(code, Some(1), "{cmd}: {out}{err}");
        assert_eq!(
            err,
            format!("pcpctl: {cmd} refused: pcpd is not in pair mode\n")
        );
    }
}

/// Continues a SIGSTOPped pcpd even when an assertion fails.
struct Stopped(u32);

impl Stopped {
    fn stop(pid: u32) -> Stopped {
        signal("-STOP", pid);
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        signal("-CONT", self.0);
    }
}

fn signal(sig: &str, pid: u32) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid}");
}

/// `pcpctl alive FILE`, keepalived's liveness check, against a real pcpd with `[ha]
/// serving_file`: it passes while pcpd runs; fails once pcpd is SIGSTOPped for longer
/// than its `detection_ms` (it still holds its lock, and its file still says it
/// serves); passes again after SIGCONT; and fails once pcpd is killed.
#[test]
fn alive_follows_a_running_stopped_and_killed_pcpd() {
    let timing = HaTiming::default();
    let plan = PairPlan::new(SERVER_CONFIG, timing);
    let dir = pcp_testkit::TempDir::new();
    let serving = dir.join("serving");
    let config = format!(
        "{}serving_file = \"{}\"\n",
        plan.config(Node::A, "active"),
        serving.display()
    );
    let mut a = pcp_testkit::pcpd(pcpd_bin())
        .at(plan.ip_a)
        .config(&config)
        .start();
    let file = serving.display().to_string();
    let alive = |d: &Pcpd| pcpctl(d, &["alive", &file]);
    let (code, out, err) = alive(&a);
    assert_eq!(code, Some(0), "a running pcpd: {out}{err}");
    assert!(out.starts_with("alive: "), "{out}");
    assert_eq!(
        std::fs::read_to_string(dir.join("serving.alive")).unwrap(),
        "touch_ms=100 stale_after_ms=500\n"
    );

    wait_ha(&a, Duration::from_secs(10), "A active", |h| {
        h["role"] == "active"
    });
    let serves = pcp_testkit::poll(Duration::from_secs(5), Duration::from_millis(20), || {
        (std::fs::read_to_string(&serving).ok()? == "0\n").then_some(())
    });
    assert!(serves.is_some(), "the active's file says 0");
    {
        let _stopped = Stopped::stop(a.pid());
        std::thread::sleep(Duration::from_millis(timing.detection_ms + 200));
        let (code, out, err) = alive(&a);
        assert_eq!(code, Some(1), "a stopped pcpd: {out}{err}");
        assert!(err.contains("stopped or frozen"), "{err}");
        assert_eq!(
            std::fs::read_to_string(&serving).unwrap(),
            "0\n",
            "a stopped active's file still says it serves: only this check sees it"
        );
    }
    let back = pcp_testkit::poll(Duration::from_secs(5), Duration::from_millis(50), || {
        (alive(&a).0 == Some(0)).then_some(())
    });
    assert!(back.is_some(), "alive again after SIGCONT");

    a.kill9();
    let (code, out, err) = alive(&a);
    assert_eq!(code, Some(1), "a killed pcpd: {out}{err}");
    assert!(err.contains("not running"), "{err}");
}
