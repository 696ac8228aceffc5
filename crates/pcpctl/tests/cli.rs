//! pcpctl end to end: the built `pcpctl` binary against a real `pcpd` process (see
//! `support` for where pcpd comes from). The process helpers are pcpd's own test
//! helpers, shared by path.

mod support;

use std::path::Path;
use std::time::Duration;

use pcp_testkit::{Map, honour_config, metric};
use support::{PCPCTL, pcpctl, start};

const DENY_ALL: &str = "[[policy]]\nname = \"no-checkpoints\"\naction = \"deny\"\n";

#[test]
fn reload_applies_policy_without_losing_mappings() {
    let base = honour_config("");
    let d = start(Some(&base));
    let m = Map::udp(5060);
    let a = d.client().map(m);
    assert!(a.checkpoint_echoed);
    let port = a.external.expect("MAP body").port();

    d.rewrite_config(&format!("{base}\n{DENY_ALL}"));
    let (code, out, err) = pcpctl(&d, &["reload"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let path = d
        .config_path
        .as_ref()
        .expect("config")
        .display()
        .to_string();
    assert!(out.contains(&format!("reloaded {path}")), "{out}");
    assert!(out.contains("1 policy rules"), "{out}");

    // POST /reload is synchronous: the next renewal already sees the deny rule.
    let r = d.client().map(m);
    assert!(!r.checkpoint_echoed, "denied: 192 must not be echoed");
    assert_eq!(r.external.expect("MAP body").port(), port, "mapping kept");
    let v = d.mapping(17, 5060);
    assert_eq!(v["checkpoint_reason"], "denied");
    assert_eq!(v["external_port"], port);
}

#[test]
fn refused_reload_exits_1_with_pcpds_reason() {
    let base = honour_config("");
    let d = start(Some(&base));
    // Line 9 (after the 6 lines of `base`, a blank one and `[lifetime]`) has an
    // unknown key.
    d.rewrite_config(&format!("{base}\n[lifetime]\nmaxx = 10\n"));
    let (code, out, err) = pcpctl(&d, &["reload"]);
    assert_eq!(code, Some(1), "{out}{err}");
    let path = d
        .config_path
        .as_ref()
        .expect("config")
        .display()
        .to_string();
    assert!(err.starts_with("pcpctl: reload refused: "), "{err}");
    assert!(err.contains(&format!("{path}:9:")), "{err}");
    assert!(err.contains("maxx"), "{err}");
    assert!(out.is_empty(), "{out}");

    // Without --config there is nothing to reload.
    let plain = start(None);
    let (code, _, err) = pcpctl(&plain, &["reload"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("embedded defaults"), "{err}");
}

#[test]
fn mappings_table_and_json() {
    let d = start(Some(&honour_config(
        "[[policy]]\nname = \"tcp-never\"\naction = \"deny\"\nprotocols = [6]\n",
    )));
    let c = d.client();
    let udp = c.map(Map::udp(5060));
    let mut tcp = Map::udp(443);
    tcp.protocol = 6;
    let tcp_ans = c.map(tcp);
    let ip = c.ip();

    let (code, out, err) = pcpctl(&d, &["mappings"]);
    assert_eq!(code, Some(0), "{err}");
    let mut lines = out.lines();
    let header = lines.next().expect("a header");
    for col in [
        "OPCODE",
        "INTERNAL",
        "EXTERNAL",
        "PROTO",
        "LIFETIME",
        "CHECKPOINTED",
        "REASON",
        "SUBSCRIBER",
    ] {
        assert!(header.contains(col), "{header}");
    }
    let rows: Vec<&str> = lines.collect();
    let udp_row = rows
        .iter()
        .find(|r| r.contains(&format!("{ip}:5060")))
        .unwrap_or_else(|| panic!("no UDP row in\n{out}"));
    let udp_ext = udp.external.expect("MAP body");
    for cell in [
        "map",
        &udp_ext.to_string(),
        "udp",
        "yes",
        "requested",
        &format!("{ip}/32"),
    ] {
        assert!(udp_row.contains(cell), "{cell:?} missing in {udp_row}");
    }
    let tcp_row = rows
        .iter()
        .find(|r| r.contains(&format!("{ip}:443")))
        .unwrap_or_else(|| panic!("no TCP row in\n{out}"));
    for cell in [" tcp ", " no ", "denied", "denied by rule tcp-never"] {
        assert!(tcp_row.contains(cell), "{cell:?} missing in {tcp_row}");
    }
    assert!(
        out.contains("2 mappings, 1 checkpointed"),
        "summary line in\n{out}"
    );

    let (code, out, err) = pcpctl(&d, &["mappings", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("pcpctl --json is JSON");
    let list = v.as_array().expect("a list");
    assert_eq!(list.len(), 2);
    let tcp_json = list
        .iter()
        .find(|m| m["protocol"] == 6)
        .expect("the TCP mapping");
    assert_eq!(
        tcp_json["external_port"],
        tcp_ans.external.expect("MAP body").port()
    );
    assert_eq!(tcp_json["checkpoint_reason"], "denied");
}

#[test]
fn subscribers_status_and_metrics() {
    let d = start(Some(&honour_config(
        "[tiers.default]\ncheckpoint_quota = 1\nmapping_quota = 5\ncheckpoint_burst = 4\n",
    )));
    let c = d.client();
    assert!(c.map(Map::udp(1000)).checkpoint_echoed);
    assert!(!c.map(Map::udp(1001)).checkpoint_echoed);

    let (code, out, err) = pcpctl(&d, &["subscribers"]);
    assert_eq!(code, Some(0), "{err}");
    let header = out.lines().next().expect("header");
    for col in ["ID", "TIER", "MAPPINGS", "CHECKPOINTED", "TOKENS"] {
        assert!(header.contains(col), "{header}");
    }
    let row = out.lines().nth(1).expect("one subscriber");
    let id = format!("{}/32", c.ip());
    for cell in [id.as_str(), "default", "2/5", "1/1", "/4"] {
        assert!(row.contains(cell), "{cell:?} missing in {row}");
    }
    let (code, out, _) = pcpctl(&d, &["subscribers", "--json"]);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v[0]["checkpointed"], 1);

    let (code, out, err) = pcpctl(&d, &["status"]);
    assert_eq!(code, Some(0), "{err}");
    for want in [
        format!("listen:       {}", d.pcp),
        "mappings:     2".to_string(),
        "checkpointed: 1".to_string(),
        "backup:       none".to_string(),
        format!(
            "config:       {}",
            d.config_path.as_ref().expect("config").display()
        ),
    ] {
        assert!(out.contains(&want), "{want:?} missing in\n{out}");
    }
    let (code, out, _) = pcpctl(&d, &["status", "--json"]);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["mappings"], 2);

    let (code, out, err) = pcpctl(&d, &["metrics"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        metric(&out, "pcp_requests_total{kind=\"map\",result=\"SUCCESS\"}"),
        Some(2.0),
        "{out}"
    );
    assert_eq!(
        metric(&out, "pcp_checkpoint_decisions_total{reason=\"quota\"}"),
        Some(1.0)
    );
    assert!(out.contains("# TYPE pcp_mappings gauge"), "{out}");
}

#[test]
fn unreachable_admin_api_is_a_clear_error_and_exit_1() {
    // A port that was free a moment ago, on an address nothing else uses.
    let ip = pcp_testkit::fresh_ip();
    let admin = format!("{ip}:{}", pcp_testkit::free_port(ip, false));
    for cmd in ["status", "mappings", "reload", "metrics"] {
        let (status, out, err) = pcp_testkit::run(
            Path::new(PCPCTL),
            &["--admin", &admin, cmd],
            Duration::from_secs(20),
        );
        assert_eq!(status.code(), Some(1), "{cmd}: {err}");
        assert!(
            err.starts_with(&format!("pcpctl: cannot reach pcpd admin API at {admin}: ")),
            "{cmd}: {err}"
        );
        assert!(out.is_empty());
    }
}

#[test]
fn bad_usage_exits_2() {
    let (status, _, err) =
        pcp_testkit::run(Path::new(PCPCTL), &["frobnicate"], Duration::from_secs(20));
    assert_eq!(status.code(), Some(2), "{err}");
    let (status, _, err) = pcp_testkit::run(
        Path::new(PCPCTL),
        &["--timeout", "0", "status"],
        Duration::from_secs(20),
    );
    assert_eq!(status.code(), Some(2), "{err}");
}

#[test]
fn token_file_authenticates_and_read_only_tokens_cannot_change_anything() {
    use std::os::unix::fs::PermissionsExt;
    let dir = pcp_testkit::TempDir::new();
    let write = |name: &str, token: &str| {
        let p = dir.join(name);
        std::fs::write(&p, format!("{token}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p.display().to_string()
    };
    let admin = write("admin.token", "pcpctl-admin-token-0123456789");
    let read = write("read.token", "pcpctl-read-token-0123456789");
    let d = start(Some(&honour_config(&format!(
        "[pcpd]\nadmin_token_file = \"{admin}\"\nadmin_read_token_file = \"{read}\"\n"
    ))));
    // Without a token: refused, with the status in the message.
    let (code, out, err) = pcpctl(&d, &["status"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("401"), "{err}");
    // The read-only token reads, but cannot reload.
    let (code, out, err) = pcpctl(&d, &["--token-file", &read, "status"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, err) = pcpctl(&d, &["--token-file", &read, "reload"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("403"), "{err}");
    // The admin token does both.
    let (code, out, err) = pcpctl(&d, &["--token-file", &admin, "reload"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("reloaded"), "{out}");
    // A missing token file is an error naming it.
    let (code, _, err) = pcpctl(&d, &["--token-file", "/nonexistent/token", "status"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("/nonexistent/token"), "{err}");
}
