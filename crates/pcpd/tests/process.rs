//! Process-level tests: the real `pcpd` binary, started with a temporary config file on
//! its own loopback address, driven over UDP (PCP, NAT-PMP) and its admin HTTP API, and
//! signalled with kill(1).

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::{Map, Pcpd, honour_config, http, metric, run, workspace_root};
use pcp_proto::{Packet, ResultCode, natpmp};

const PCPD: &str = env!("CARGO_BIN_EXE_pcpd");

fn start(config: &str) -> Pcpd {
    common::pcpd(PCPD).config(config).start()
}

/// A deny-everything rule, appended to a config to change policy on reload.
const DENY_ALL: &str = "[[policy]]\nname = \"no-checkpoints\"\naction = \"deny\"\n";

#[test]
fn map_with_checkpoint_is_honoured_echoed_and_listed() {
    let d = start(&honour_config(""));
    let c = d.client();

    let a = c.map(Map::udp(5060));
    assert_eq!(a.result, ResultCode::Success);
    assert!(
        a.checkpoint_echoed,
        "option 192 must be echoed when honoured"
    );
    assert_eq!(a.lifetime, 3600);
    let ext = a.external.expect("a MAP body");
    assert_eq!(ext.ip(), IpAddr::from([192, 0, 2, 1]));

    let m = d.mapping(17, 5060);
    for key in [
        "opcode",
        "client",
        "protocol",
        "internal_address",
        "internal_port",
        "external_address",
        "external_port",
        "lifetime_remaining",
        "checkpointed",
        "checkpoint_reason",
    ] {
        assert!(!m[key].is_null(), "field {key} missing in {m:#}");
    }
    assert_eq!(m["opcode"], "map");
    assert_eq!(m["client"], c.ip().to_string());
    assert_eq!(m["internal_address"], c.ip().to_string());
    assert_eq!(m["external_address"], "192.0.2.1");
    assert_eq!(m["external_port"], ext.port());
    assert_eq!(m["checkpointed"], true);
    assert_eq!(m["checkpoint_reason"], "requested");
    let left = m["lifetime_remaining"].as_u64().expect("a number");
    assert!((3590..=3600).contains(&left), "lifetime_remaining {left}");

    // Without 192: SUCCESS, no echo, not checkpointed.
    let b = c.map(Map::udp(5062).without_checkpoint());
    assert_eq!(b.result, ResultCode::Success);
    assert!(!b.checkpoint_echoed);
    let m = d.mapping(17, 5062);
    assert_eq!(m["checkpointed"], false);
    assert_eq!(m["checkpoint_reason"], "not_requested");

    let status = d.get_json("/status");
    assert_eq!(status["mappings"], 2);
    assert_eq!(status["checkpointed"], 1);
    assert_eq!(status["backup"], "none");
}

#[test]
fn default_config_does_not_echo_checkpoint_without_backup() {
    // No --config: embedded defaults, whose without_backup is "refuse".
    let d = common::pcpd(PCPD).start();
    let a = d.client().map(Map::udp(4000));
    assert_eq!(a.result, ResultCode::Success);
    assert!(
        !a.checkpoint_echoed,
        "no backup: 192 must not be echoed (a false promise)"
    );
    let m = d.mapping(17, 4000);
    assert_eq!(m["checkpointed"], false);
    assert_eq!(m["checkpoint_reason"], "no_backup");
    assert_eq!(d.get_json("/status")["config"], serde_json::Value::Null);
    assert_eq!(
        d.metric("pcp_checkpoint_decisions_total{reason=\"no_backup\"}"),
        Some(1.0)
    );
}

#[test]
fn checkpoint_quota_is_enforced_and_counted() {
    let d = start(&honour_config(
        "[tiers.default]\ncheckpoint_quota = 1\nmapping_quota = 10\n",
    ));
    let c = d.client();
    let first = c.map(Map::udp(6000));
    assert_eq!(first.result, ResultCode::Success);
    assert!(first.checkpoint_echoed);
    let second = c.map(Map::udp(6001));
    assert_eq!(second.result, ResultCode::Success, "over quota is no error");
    assert!(
        !second.checkpoint_echoed,
        "over quota: 192 must not be echoed"
    );

    assert_eq!(d.mapping(17, 6000)["checkpoint_reason"], "requested");
    let m = d.mapping(17, 6001);
    assert_eq!(m["checkpointed"], false);
    assert_eq!(m["checkpoint_reason"], "quota");

    let text = d.get("/metrics");
    assert_eq!(
        metric(&text, "pcp_requests_total{kind=\"map\",result=\"SUCCESS\"}"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "pcp_checkpoint_decisions_total{reason=\"quota\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            "pcp_checkpoint_decisions_total{reason=\"requested\"}"
        ),
        Some(1.0)
    );
    assert_eq!(metric(&text, "pcp_mappings"), Some(2.0));
    assert_eq!(metric(&text, "pcp_checkpointed_mappings"), Some(1.0));

    let subs = d.get_json("/subscribers");
    let subs = subs.as_array().expect("a list");
    assert_eq!(subs.len(), 1, "{subs:#?}");
    let s = &subs[0];
    assert_eq!(s["id"], format!("{}/32", c.ip()));
    assert_eq!(s["tier"], "default");
    assert_eq!(s["mappings"], 2);
    assert_eq!(s["mapping_quota"], 10);
    assert_eq!(s["checkpointed"], 1);
    assert_eq!(s["checkpoint_quota"], 1);
    let tokens = s["checkpoint_tokens"].as_f64().expect("a number");
    assert!(
        (0.0..=8.0).contains(&tokens),
        "tokens within the burst: {tokens}"
    );
}

/// Renews `m` until its reason is `want` (a reload is applied asynchronously after the
/// signal); returns the last answer.
fn renew_until(d: &Pcpd, m: Map, want: &str) -> common::Answer {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let a = d.client().map(m);
        let reason = d.mapping(m.protocol, m.internal_port)["checkpoint_reason"].clone();
        if reason == want || Instant::now() > deadline {
            assert_eq!(reason, want, "reason after the reload\n{}", d.output());
            return a;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sighup_reload_applies_policy_and_keeps_mappings() {
    let base = honour_config("");
    let d = start(&base);
    let m = Map::udp(7000);
    let a = d.client().map(m);
    assert!(a.checkpoint_echoed);
    let port = a.external.expect("MAP body").port();
    assert_eq!(d.mapping(17, 7000)["checkpoint_reason"], "requested");

    d.rewrite_config(&format!("{base}\n{DENY_ALL}"));
    d.signal("HUP");
    let r = renew_until(&d, m, "denied");
    assert_eq!(r.result, ResultCode::Success);
    assert!(!r.checkpoint_echoed, "a deny rule: 192 must not be echoed");
    assert_eq!(
        r.external.expect("MAP body").port(),
        port,
        "the mapping survived"
    );
    let after = d.mapping(17, 7000);
    assert_eq!(after["external_port"], port);
    assert_eq!(after["checkpointed"], false);
    assert!(
        after["checkpoint_detail"]
            .as_str()
            .unwrap_or("")
            .contains("no-checkpoints"),
        "{after:#}"
    );
    assert_eq!(d.get_json("/status")["checkpointed"], 0);
    assert!(d.output().contains("reloaded"), "{}", d.output());
}

#[test]
fn post_reload_applies_policy_and_refuses_a_broken_file() {
    let base = honour_config("");
    let d = start(&base);
    let m = Map::udp(7100);
    let port = d.client().map(m).external.expect("MAP body").port();

    // A broken file is refused with file, line and key, and the old config stays.
    d.rewrite_config(&format!("{base}\n[mapping]\nmax_filterz = 3\n"));
    let (status, body) = http("POST", d.admin, "/reload");
    assert_eq!(status, 422, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["ok"], false);
    let err = v["error"].as_str().expect("an error");
    let path = d
        .config_path
        .as_ref()
        .expect("config")
        .display()
        .to_string();
    let line = base.lines().count() + 3;
    assert!(err.contains(&format!("{path}:{line}:")), "{err}");
    assert!(err.contains("max_filterz"), "{err}");
    assert!(d.client().map(m).checkpoint_echoed, "old policy still on");

    d.rewrite_config(&format!("{base}\n{DENY_ALL}"));
    let (status, body) = http("POST", d.admin, "/reload");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["ok"], true);
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("1 policy rules"),
        "{v}"
    );
    let r = d.client().map(m);
    assert!(!r.checkpoint_echoed);
    assert_eq!(r.external.expect("MAP body").port(), port);
    assert_eq!(d.mapping(17, 7100)["checkpoint_reason"], "denied");
}

#[test]
fn sigterm_exits_zero_within_two_seconds() {
    let mut d = start(&honour_config(""));
    assert_eq!(d.client().map(Map::udp(8000)).result, ResultCode::Success);
    let t = Instant::now();
    d.signal("TERM");
    let status = d
        .wait_exit(Duration::from_secs(2))
        .unwrap_or_else(|| panic!("still running 2 s after SIGTERM\n{}", d.output()));
    assert!(status.success(), "exit status {status}\n{}", d.output());
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[test]
fn unknown_key_is_reported_with_file_line_and_key_and_exit_2() {
    let dir = common::TempDir::new();
    let path = dir.join("bad.toml");
    // Line 5 holds the unknown key.
    let text = "[pool]\naddresses = [\"192.0.2.1\"]\n\n[lifetime]\nmaximum = 100\n";
    std::fs::write(&path, text).expect("write");
    let path_s = path.display().to_string();
    let ip = common::fresh_ip();
    let (listen, admin) = (format!("{ip}:0"), format!("{ip}:0"));
    let args = [
        "--config",
        path_s.as_str(),
        "--listen",
        &listen,
        "--admin",
        &admin,
    ];
    let (status, _out, err) = run(PCPD.as_ref(), &args, Duration::from_secs(10));
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains(&format!("{path_s}:5:")), "{err}");
    assert!(err.contains("maximum"), "{err}");

    // --check reports it the same way.
    let (status, _out, err) = run(
        PCPD.as_ref(),
        &["--config", &path_s, "--check"],
        Duration::from_secs(10),
    );
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains(&format!("{path_s}:5:")), "{err}");
}

#[test]
fn check_accepts_the_example_config() {
    let example = workspace_root().join("docs/pcpd.example.toml");
    let example = example.display().to_string();
    let (status, out, err) = run(
        PCPD.as_ref(),
        &["--config", &example, "--check"],
        Duration::from_secs(10),
    );
    assert!(status.success(), "{status}: {err}");
    assert!(out.contains("configuration OK"), "{out}");
}

#[test]
fn natpmp_external_address_is_the_first_ipv4_pool_address() {
    let d = start("[pool]\naddresses = [\"2001:db8::7\", \"198.51.100.7\", \"198.51.100.8\"]\n");
    let c = d.client();
    let mut buf = [0u8; 16];
    let n = natpmp::Request::ExternalAddress
        .emit(&mut buf)
        .expect("emit");
    let raw = c.exchange(&buf[..n]);
    match natpmp::Response::parse(&raw).expect("a NAT-PMP answer") {
        natpmp::Response::ExternalAddress {
            result,
            external_addr,
            ..
        } => {
            assert_eq!(result, natpmp::ResultCode::Success);
            assert_eq!(external_addr, Ipv4Addr::new(198, 51, 100, 7));
        }
        other => panic!("not an external address answer: {other:?}"),
    }
    assert_eq!(
        d.metric("pcp_requests_total{kind=\"natpmp\",result=\"SUCCESS\"}"),
        Some(1.0)
    );
}

#[test]
fn malformed_datagram_gets_malformed_request_and_serving_goes_on() {
    let d = start(&honour_config(""));
    let c = d.client();

    let first = c.map(Map::udp(9000));
    assert_eq!(first.result, ResultCode::Success);

    // A well-formed MAP request cut to 26 octets: not a multiple of 4.
    let req = pcp_proto::Request {
        lifetime: 100,
        client_addr: c.ip(),
        body: pcp_proto::Body::Map(pcp_proto::MapBody {
            nonce: *b"malformed-01",
            protocol: 17,
            internal_port: 9001,
            external_port: 0,
            external_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        }),
        options: pcp_proto::Options::EMPTY,
        pa_result_code: ResultCode::Success,
    };
    let mut ok = [0u8; pcp_proto::MAX_MESSAGE_LEN];
    let full = req.emit(&mut ok).expect("emit");
    assert!(full > 26);
    let raw = c.exchange(&ok[..26]);
    let p = Packet::new_unchecked(&raw[..]);
    assert!(raw.len() >= 24 && raw.len().is_multiple_of(4), "{raw:02x?}");
    assert_eq!(raw[0], 2, "version");
    assert_eq!(raw[1], 0x81, "R bit + MAP");
    assert_eq!(p.result_code(), ResultCode::MalformedRequest);

    // A 1-octet datagram is dropped without an answer (RFC 6887 §8.3).
    c.send(&[2]);
    assert!(c.recv_within(Duration::from_millis(200)).is_none());

    // Still serving: a valid MAP right after.
    let again = c.map(Map::udp(9002));
    assert_eq!(again.result, ResultCode::Success);
    assert!(again.checkpoint_echoed);
    assert_eq!(
        d.metric("pcp_requests_total{kind=\"map\",result=\"MALFORMED_REQUEST\"}"),
        Some(1.0)
    );
    assert_eq!(d.metric("pcp_dropped_total"), Some(1.0));
    assert_eq!(d.mappings().len(), 2);
}

#[test]
fn admin_api_answers_unknown_paths_with_404() {
    let d = common::pcpd(PCPD).start();
    let (status, _) = http("GET", d.admin, "/nope");
    assert_eq!(status, 404);
    // Reload without --config is refused with a reason, and pcpd keeps running.
    let (status, body) = http("POST", d.admin, "/reload");
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("embedded defaults"), "{body}");
    let addr: SocketAddr = d.admin;
    assert_eq!(http("GET", addr, "/status").0, 200);
}
