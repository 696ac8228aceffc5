//! The `pcpc` binary ↔ the real `pcpd` (embedded EAP-TTLS back end) through a small
//! loopback UDP proxy in the test that plays the man in the middle: it replays a
//! captured tagged request, flips a bit of one, adds an algorithm to the server's
//! offer (downgrade), or passes everything. Also: failed-attempt limits
//! (`[auth.attempts]`), an SA that expires under a running `pcpc`, and the longest
//! `[[auth.prefixes]]` match. pcpd's verdicts are read from `GET /metrics`.

mod support;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pcp_proto::{Body, Options, PcpOption, Request, Response, ResultCode};
use pcp_testkit::TempDir;
use pcp_testkit::eap::{AuthFiles, PASSWORD, users_line};
use pcp_testkit::pcpd::{Pcpd, short_lifetime_config, wait_until};
use pcp_testkit::ports::fresh_ip;
use support::{PCPC, identity_map_args};

/// Which way a datagram goes through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// pcpc → pcpd.
    Up,
    /// pcpd → pcpc.
    Down,
}

type Rewrite = Box<dyn FnMut(Dir, &[u8]) -> Vec<Vec<u8>> + Send>;

/// A UDP proxy on loopback: pcpc talks to `addr`, the proxy talks to pcpd from the
/// same IP as pcpc (PCP checks the client address), and `rewrite` decides what goes
/// on (nothing: dropped; several: the extra ones injected). Stops when dropped.
struct Proxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Proxy {
    fn start(ip: IpAddr, server: SocketAddr, mut rewrite: Rewrite) -> Proxy {
        let front = UdpSocket::bind(SocketAddr::new(ip, 0)).unwrap();
        let back = UdpSocket::bind(SocketAddr::new(ip, 0)).unwrap();
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_millis(5))).unwrap();
        }
        let addr = front.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut client: Option<SocketAddr> = None;
            let mut buf = [0u8; 2048];
            while !st.load(Ordering::SeqCst) {
                if let Ok((n, from)) = front.recv_from(&mut buf) {
                    client = Some(from);
                    for m in rewrite(Dir::Up, &buf[..n]) {
                        let _ = back.send_to(&m, server);
                    }
                }
                if let Ok((n, from)) = back.recv_from(&mut buf)
                    && from == server
                    && let Some(c) = client
                {
                    for m in rewrite(Dir::Down, &buf[..n]) {
                        let _ = front.send_to(&m, c);
                    }
                }
            }
        });
        Proxy {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

/// Whether `m` is a MAP request carrying an AUTHENTICATION_TAG.
fn tagged_map(m: &[u8]) -> bool {
    Request::parse(m).is_ok_and(|r| {
        matches!(r.body, Body::Map(_))
            && r.options
                .iter()
                .any(|o| matches!(o, PcpOption::AuthenticationTag(_)))
    })
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// pcpd with `auth = "required"`, alice (and bob) in its credentials, plus `extra`.
struct Setup {
    dir: TempDir,
    pcpd: Pcpd,
}

impl Setup {
    fn new(extra: &str) -> Setup {
        Setup::with_auth(|files| files.section("required"), extra)
    }

    fn with_auth(section: impl FnOnce(&AuthFiles) -> String, extra: &str) -> Setup {
        let dir = TempDir::new();
        let users = format!(
            "{}{}",
            users_line("alice", PASSWORD.as_bytes()),
            users_line("bob", b"battery staple")
        );
        let files = AuthFiles::write(&dir.0, "pcp.example", &users);
        std::fs::write(dir.path_str("pw"), format!("{PASSWORD}\n")).unwrap();
        std::fs::write(dir.path_str("bob-pw"), "battery staple\n").unwrap();
        std::fs::write(dir.path_str("bad"), "wrong\n").unwrap();
        let pcpd = Pcpd::start(&short_lifetime_config(&format!(
            "{}{extra}",
            section(&files)
        )));
        Setup { dir, pcpd }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path_str(name)
    }

    /// `pcpc map` of UDP `port` as alice with the password file `pw`, from `ip` to
    /// `server`.
    fn map_as(&self, ip: IpAddr, server: SocketAddr, pw: &str, port: &str) -> Output {
        let (pw, ca) = (self.path(pw), self.path("ca.pem"));
        support::pcpc(
            ip,
            server,
            10,
            &identity_map_args(&pw, &ca, "pcp.example", port),
        )
    }

    fn metric(&self, key: &str) -> f64 {
        self.pcpd.metric(key).unwrap_or(0.0)
    }

    fn requests(&self, outcome: &str) -> f64 {
        self.metric(&format!("pcp_auth_requests_total{{outcome=\"{outcome}\"}}"))
    }
}

/// A replayed tagged request is refused and counted; pcpc, whose first answer the
/// proxy lost, succeeds with its retransmission (tagged anew). The proxy holds back
/// pcpd's answer to the first tagged MAP, forwards pcpc's retransmission, then sends
/// the captured first request again — behind a newer one from the same session.
#[test]
fn pcpc_through_a_replaying_proxy_succeeds_and_pcpd_refuses_the_replay() {
    let s = Setup::new("");
    let ip = IpAddr::V4(s.pcpd.ip);
    let captured: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let (cap, mut drop_next_answer) = (captured.clone(), false);
    let proxy = Proxy::start(
        ip,
        s.pcpd.pcp,
        Box::new(move |dir, m| {
            let mut cap = cap.lock().unwrap();
            match dir {
                Dir::Up if tagged_map(m) => {
                    cap.push(m.to_vec());
                    match cap.len() {
                        1 => {
                            drop_next_answer = true;
                            vec![m.to_vec()]
                        }
                        // The retransmission, then the replay of the first.
                        2 => vec![m.to_vec(), cap[0].clone()],
                        _ => vec![m.to_vec()],
                    }
                }
                Dir::Down if Response::parse(m).is_ok_and(|r| matches!(r.body, Body::Map(_))) => {
                    if std::mem::take(&mut drop_next_answer) {
                        Vec::new()
                    } else {
                        vec![m.to_vec()]
                    }
                }
                _ => vec![m.to_vec()],
            }
        }),
    );
    let o = s.map_as(ip, proxy.addr, "pw", "7100");
    assert!(o.status.success(), "{}\n{}", stderr(&o), s.pcpd.output());
    let v: serde_json::Value = serde_json::from_str(stdout(&o).lines().next().unwrap()).unwrap();
    assert_eq!(v["lifetime"], 600, "{v}");
    assert!(captured.lock().unwrap().len() >= 2, "no retransmission");
    assert!(
        wait_until(Duration::from_secs(5), || s.requests("replayed") >= 1.0),
        "replay not counted: {}",
        s.pcpd.get("/metrics")
    );
    assert!(s.requests("authenticated") >= 2.0);
    assert_eq!(s.requests("bad_tag"), 0.0);
    assert!(s.pcpd.find_mapping(7100).is_some());
}

/// A tagged request with one bit flipped (its lifetime) is dropped by pcpd and
/// counted as a bad tag; pcpc retransmits, the copy goes through untouched, and the
/// mapping has the lifetime pcpc asked for, not the tampered one.
#[test]
fn pcpc_through_a_tampering_proxy_succeeds_and_pcpd_drops_the_forgery() {
    let s = Setup::new("");
    let ip = IpAddr::V4(s.pcpd.ip);
    let mut tampered = false;
    let proxy = Proxy::start(
        ip,
        s.pcpd.pcp,
        Box::new(move |dir, m| {
            let mut m = m.to_vec();
            if dir == Dir::Up && tagged_map(&m) && !std::mem::replace(&mut tampered, true) {
                // Lifetime, octets 4..8: 600 becomes 600 | 1 << 20.
                m[5] ^= 0x10;
            }
            vec![m]
        }),
    );
    let o = s.map_as(ip, proxy.addr, "pw", "7200");
    assert!(o.status.success(), "{}\n{}", stderr(&o), s.pcpd.output());
    assert_eq!(s.requests("bad_tag"), 1.0, "{}", s.pcpd.get("/metrics"));
    // Granted as asked (600 s); the tampered request would have got the maximum.
    assert_eq!(s.pcpd.mapping(17, 7200)["lifetime"], 600);
}

/// A man in the middle adds an algorithm to pcpd's offer (the unprotected first
/// PA-Server): pcpc echoes the list it saw in its confirmation, pcpd answers
/// DOWNGRADE_ATTACK_DETECTED and drops the session, and pcpc fails clearly.
#[test]
fn pcpc_detects_nothing_wrong_but_pcpd_refuses_a_downgraded_offer() {
    let s = Setup::new("");
    let ip = IpAddr::V4(s.pcpd.ip);
    let proxy = Proxy::start(
        ip,
        s.pcpd.pcp,
        Box::new(|dir, m| {
            let Ok(r) = Response::parse(m) else {
                return vec![m.to_vec()];
            };
            let offer = r.options.iter().any(|o| matches!(o, PcpOption::Prf(_)));
            if dir != Dir::Down || !offer {
                return vec![m.to_vec()];
            }
            let mut opts: Vec<_> = r.options.iter().collect();
            opts.insert(1, PcpOption::MacAlgorithm(2));
            let forged = Response {
                options: Options::from_list(&opts),
                ..r
            };
            let mut buf = vec![0u8; 1100];
            let n = forged.emit(&mut buf).unwrap();
            buf.truncate(n);
            vec![buf]
        }),
    );
    let o = s.map_as(ip, proxy.addr, "pw", "7300");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("DOWNGRADE") || err.contains("Downgrade"),
        "pcpc's report: {err}"
    );
    assert_eq!(
        s.metric("pcp_auth_sessions_failed_total{cause=\"downgrade_detected\"}"),
        1.0
    );
    assert_eq!(s.metric("pcp_auth_sessions_established_total"), 0.0);
    assert!(s.pcpd.find_mapping(7300).is_none());
}

/// `[auth.attempts]`: a client with a wrong password is refused (AUTHENTICATION_FAILED,
/// pcpc exits 1 naming it), and after `burst` failures its source is refused even
/// with the right password, and alice's identity from another address of its /24
/// too — both without a password check, counted; bob from a third address still
/// authenticates.
#[test]
fn wrong_passwords_are_rate_limited_per_source_and_identity() {
    let s = Setup::new("[auth.attempts]\nburst = 2\nevery_s = 600\n");
    let ip = IpAddr::V4(s.pcpd.ip);
    for port in ["7400", "7401"] {
        let o = s.map_as(ip, s.pcpd.pcp, "bad", port);
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(
            stderr(&o).contains("AUTHENTICATION_FAILED"),
            "{}",
            stderr(&o)
        );
    }
    assert_eq!(s.metric("pcp_auth_attempts_failed_total"), 2.0);
    assert_eq!(
        s.metric("pcp_auth_attempts_refused_total{by=\"source\"}"),
        0.0
    );
    // The right password from the same source: refused unchecked.
    let o = s.map_as(ip, s.pcpd.pcp, "pw", "7402");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(
        s.metric("pcp_auth_attempts_refused_total{by=\"source\"}"),
        1.0
    );
    // alice from another address of the same /24: her identity is out of attempts
    // there too.
    let o4 = s.pcpd.ip.octets();
    let other = IpAddr::V4([o4[0], o4[1], o4[2], o4[3] ^ 1].into());
    let o = s.map_as(other, s.pcpd.pcp, "pw", "7403");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(
        s.metric("pcp_auth_attempts_refused_total{by=\"identity\"}"),
        1.0
    );
    // Nothing refused by the limits is a failed attempt.
    assert_eq!(s.metric("pcp_auth_attempts_failed_total"), 2.0);
    // bob, from a third address, is not affected.
    let third = IpAddr::V4([o4[0], o4[1], o4[2], o4[3] ^ 2].into());
    let (pw, ca) = (s.path("bob-pw"), s.path("ca.pem"));
    let mut args = identity_map_args(&pw, &ca, "pcp.example", "7404");
    args[2] = "bob";
    let o = support::pcpc(third, s.pcpd.pcp, 10, &args);
    assert!(o.status.success(), "{}\n{}", stderr(&o), s.pcpd.output());
    assert!(s.pcpd.find_mapping(7404).is_some());
}

/// The finding of 2026-12-04 (docs/AUTH.md, "Attempt limits"): a guesser in alice's
/// own /24 with `burst = 2` wrong passwords no longer locks her out of the address she
/// authenticated from: a fresh address of that /24 is refused by identity, unchecked
/// and counted, while from her address she authenticates again and maps.
#[test]
fn a_guesser_in_the_users_network_cannot_lock_out_her_trusted_address() {
    let s = Setup::new("[auth.attempts]\nburst = 2\nevery_s = 600\n");
    let home = IpAddr::V4(s.pcpd.ip);
    let o = s.map_as(home, s.pcpd.pcp, "pw", "7410");
    assert!(o.status.success(), "{}\n{}", stderr(&o), s.pcpd.output());
    let o4 = s.pcpd.ip.octets();
    let guesser = IpAddr::V4([o4[0], o4[1], o4[2], o4[3] ^ 1].into());
    for port in ["7411", "7412"] {
        let o = s.map_as(guesser, s.pcpd.pcp, "bad", port);
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    }
    assert_eq!(s.metric("pcp_auth_attempts_failed_total"), 2.0);
    // alice from a fresh address of the same /24: her identity is out of attempts
    // there, refused unchecked.
    let fresh = IpAddr::V4([o4[0], o4[1], o4[2], o4[3] ^ 2].into());
    let o = s.map_as(fresh, s.pcpd.pcp, "pw", "7413");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(s.pcpd.find_mapping(7413).is_none());
    assert_eq!(
        s.metric("pcp_auth_attempts_refused_total{by=\"identity\"}"),
        1.0
    );
    // alice at home: authenticated (her password checked, not refused) and mapped.
    let o = s.map_as(home, s.pcpd.pcp, "pw", "7414");
    assert!(o.status.success(), "{}\n{}", stderr(&o), s.pcpd.output());
    assert!(s.pcpd.find_mapping(7414).is_some());
    assert_eq!(
        s.metric("pcp_auth_attempts_refused_total{by=\"identity\"}"),
        1.0
    );
    assert_eq!(s.metric("pcp_auth_attempts_failed_total"), 2.0);
}

/// `pcpc map --keep` with a 4 s PA session lifetime: the proxy swallows every PA message
/// of pcpc's re-authentication, so the SA expires at both ends; pcpc says so,
/// authenticates a new session (once the proxy lets PA messages through again) and
/// keeps renewing its mapping, tagged.
#[test]
fn pcpc_keep_outlives_an_expired_session() {
    let s = Setup::with_auth(
        |f| format!("{}session_lifetime = 4\n", f.section("required")),
        "",
    );
    let ip = IpAddr::V4(s.pcpd.ip);
    // From 1 s to 5 s after the first session is established, no PA message either way:
    // re-authentication is due at 80 % of 4 s, the SA ends at 4 s.
    let mut established: Option<Instant> = None;
    let proxy = Proxy::start(
        ip,
        s.pcpd.pcp,
        Box::new(move |dir, m| {
            let pa = m.get(1).is_some_and(|b| b & 0x7f == 3);
            if dir == Dir::Down
                && established.is_none()
                && Response::parse(m)
                    .is_ok_and(|r| r.result_code == ResultCode::AuthenticationSucceeded)
            {
                established = Some(Instant::now());
            }
            let blocked = established.is_some_and(|t| {
                let t = t.elapsed();
                t > Duration::from_secs(1) && t < Duration::from_secs(5)
            });
            if pa && blocked {
                Vec::new()
            } else {
                vec![m.to_vec()]
            }
        }),
    );
    let (pw, ca) = (s.path("pw"), s.path("ca.pem"));
    let mut child: Child = Command::new(PCPC)
        .arg("--server")
        .arg(proxy.addr.to_string())
        .arg("--bind")
        .arg(SocketAddr::new(ip, 0).to_string())
        .args(["--irt-ms", "300"])
        .args([
            "--identity",
            "alice",
            "--password-file",
            &pw,
            "--ca",
            &ca,
            "--server-name",
            "pcp.example",
            "map",
            "--proto",
            "udp",
            "--internal-port",
            "7500",
            "--lifetime",
            "4",
            "--keep",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let reauthenticated = wait_until(Duration::from_secs(25), || {
        s.metric("pcp_auth_sessions_established_total") >= 2.0
    });
    // Renewed under the new session.
    let kept = wait_until(Duration::from_secs(10), || {
        s.requests("authenticated") >= 3.0 && s.pcpd.find_mapping(7500).is_some()
    });
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let (so, se) = (stdout(&out), stderr(&out));
    assert!(reauthenticated, "{so}\n{se}\n{}", s.pcpd.output());
    assert_eq!(
        s.metric("pcp_auth_sessions_ended_total{cause=\"expired\"}"),
        1.0,
        "{}",
        s.pcpd.get("/metrics")
    );
    let text = format!("{so}{se}");
    assert!(
        text.contains("PCP session ended (Expired)"),
        "pcpc did not report it: {text}"
    );
    assert!(kept, "not renewed under the new session: {text}");
}

/// The longest `[[auth.prefixes]]` match wins, whatever the order of the entries:
/// `off` for a /24 inside a `required` /16 and /8, `required` again for one /32 inside
/// that /24. The entries are ordered so that neither the first nor the last match
/// would give these answers.
#[test]
fn the_longest_auth_prefix_wins() {
    let ip = fresh_ip();
    let o = ip.octets();
    let required_host = std::net::Ipv4Addr::new(o[0], o[1], o[2], o[3] ^ 2);
    let prefixes = format!(
        "[[auth.prefixes]]\nprefix = \"127.0.0.0/8\"\nauth = \"required\"\n\
         [[auth.prefixes]]\nprefix = \"{required_host}/32\"\nauth = \"required\"\n\
         [[auth.prefixes]]\nprefix = \"{}.{}.{}.0/24\"\nauth = \"off\"\n\
         [[auth.prefixes]]\nprefix = \"{}.{}.0.0/16\"\nauth = \"required\"\n",
        o[0], o[1], o[2], o[0], o[1]
    );
    let s = Setup::with_auth(|f| format!("{}{prefixes}", f.section("off")), "");
    let untagged = |from: std::net::Ipv4Addr, port: &str| {
        support::pcpc(
            IpAddr::V4(from),
            s.pcpd.pcp,
            5,
            &["map", "--proto", "udp", "--internal-port", port],
        )
    };
    let out = untagged(ip, "7600");
    assert!(out.status.success(), "{}", stderr(&out));
    let out = untagged(required_host, "7601");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("AUTHENTICATION_REQUIRED"),
        "{}",
        stderr(&out)
    );
    assert!(s.pcpd.find_mapping(7600).is_some());
    assert!(s.pcpd.find_mapping(7601).is_none());
    assert!(
        s.requests("authentication_required") >= 1.0,
        "{}",
        s.pcpd.get("/metrics")
    );
}

/// The `pcpc` binary against pcpd with RADIUS pass-through to an AAA server (the
/// embedded EAP-TTLS server behind `pcp-eap`'s RADIUS front end, in a thread) that
/// drops the first requests: pcpd does not answer AUTHENTICATION_FAILED for a back end
/// that did not answer, it asks again with backoff while pcpc waits (acknowledged),
/// and once the AAA server answers the same pcpc run authenticates and maps.
#[test]
fn pcpc_authenticates_once_the_aaa_server_answers() {
    use pcp_eap::Embedded;
    use pcp_eap::radius::server::{Outcome, RadiusServer, RadiusServerConfig};
    use std::sync::atomic::AtomicUsize;

    const SECRET: &[u8] = b"aaa-secret";
    let dir = TempDir::new();
    let files = AuthFiles::write(
        &dir.0,
        "aaa.example",
        &users_line("alice", PASSWORD.as_bytes()),
    );
    std::fs::write(dir.path_str("pw"), format!("{PASSWORD}\n")).unwrap();
    std::fs::write(dir.path_str("secret"), SECRET).unwrap();
    let backend = Embedded::load(&files.cert, &files.key, &files.users).unwrap();
    let aaa_ip = fresh_ip();
    let aaa = UdpSocket::bind((aaa_ip, 0)).unwrap();
    aaa.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let aaa_addr = aaa.local_addr().unwrap();
    let (seen, stop) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let (n, st) = (seen.clone(), stop.clone());
    let server = std::thread::spawn(move || {
        let mut radius = RadiusServer::new(RadiusServerConfig::new(SECRET.to_vec()), backend);
        let origin = Instant::now();
        let mut buf = [0u8; 4096];
        while !st.load(Ordering::SeqCst) {
            let Ok((len, from)) = aaa.recv_from(&mut buf) else {
                continue;
            };
            // Down for the first four requests (two given-up rounds of two tries).
            if n.fetch_add(1, Ordering::SeqCst) < 4 {
                continue;
            }
            let now = origin.elapsed().as_millis() as u64;
            if let Outcome::Reply { reply, .. } = radius.handle(now, from, &buf[..len]) {
                let _ = aaa.send_to(&reply, from);
            }
        }
    });
    let config = format!(
        "[auth]\ndefault = \"required\"\n[auth.radius]\nserver = \"{aaa_addr}\"\nsecret_file = \"{}\"\ntimeout_ms = 200\ntries = 2\n",
        dir.path_str("secret")
    );
    let p = Pcpd::start(&short_lifetime_config(&config));
    let ip = IpAddr::V4(p.ip);
    let (pw, ca) = (dir.path_str("pw"), dir.path_str("ca.pem"));
    let o = support::pcpc(
        ip,
        p.pcp,
        30,
        &identity_map_args(&pw, &ca, "aaa.example", "7700"),
    );
    stop.store(true, Ordering::SeqCst);
    server.join().unwrap();
    assert!(o.status.success(), "{}\n{}", stderr(&o), p.output());
    assert!(
        seen.load(Ordering::SeqCst) > 4,
        "the AAA server was not asked again"
    );
    assert!(p.metric("pcp_auth_backend_retries_total").unwrap_or(0.0) >= 2.0);
    assert_eq!(
        p.metric("pcp_auth_sessions_failed_total{cause=\"authentication_failed\"}"),
        Some(0.0)
    );
    assert!(p.find_mapping(7700).is_some());
}
