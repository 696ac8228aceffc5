//! `pcpc` ↔ `pcpd` ↔ FreeRADIUS: pcpd passes EAP through RADIUS (`[auth.radius]`) to a
//! real FreeRADIUS (Debian package `freeradius`) that this test starts on loopback at
//! an unprivileged port, with a generated configuration (EAP-TTLS/PAP, a generated CA
//! and server certificate, one user; FreeRADIUS's default fragment size) and stops
//! afterwards. The first tagged MAP
//! verifying proves that pcpd's MSK (from FreeRADIUS's MS-MPPE keys) is the one pcpc
//! derived itself.
//!
//! Needs the `freeradius` binary: a loud SKIP without it, unless
//! `PCPD_REQUIRE_FREERADIUS` is set (scripts/test sets it as root, after installing it).

mod support;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pcp_testkit::pcpd::{Pcpd, short_lifetime_config};
use pcp_testkit::ports::free_udp;
use pcp_testkit::tls::Pki;
use support::{identity_map_args, pcpc};

const SECRET: &str = "radius-test-secret";

fn freeradius_bin() -> Option<PathBuf> {
    ["/usr/sbin/freeradius", "/usr/sbin/radiusd"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// FreeRADIUS in the foreground (`-X`), killed on drop.
struct FreeRadius {
    child: Child,
    dir: PathBuf,
}

impl Drop for FreeRadius {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl FreeRadius {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("radiusd.out")).unwrap_or_default()
    }
}

/// Writes a minimal raddb: one client (us), EAP-TTLS with PAP inside, `alice`.
fn write_raddb(dir: &Path, port: u16) {
    let d = dir.display();
    let conf = format!(
        r#"prefix = /usr
exec_prefix = /usr
sysconfdir = /etc
localstatedir = /var
sbindir = /usr/sbin
logdir = {d}
raddbdir = {d}
radacctdir = {d}
name = freeradius
confdir = {d}
modconfdir = {d}
run_dir = {d}
db_dir = {d}
libdir = /usr/lib/freeradius
dictdir = /usr/share/freeradius
pidfile = {d}/radiusd.pid
max_request_time = 30
cleanup_delay = 5
max_requests = 1024
hostname_lookups = no
log {{
    destination = files
    file = {d}/radius.log
    auth = yes
}}
security {{
    allow_core_dumps = no
    max_attributes = 200
    reject_delay = 0
    status_server = no
}}
thread pool {{
    start_servers = 1
    max_servers = 2
    min_spare_servers = 1
    max_spare_servers = 2
    max_requests_per_server = 0
}}
client pcpd {{
    ipaddr = 127.0.0.0/8
    secret = {SECRET}
    require_message_authenticator = yes
}}
modules {{
    pap {{
    }}
    files {{
        filename = {d}/users
    }}
    eap {{
        default_eap_type = ttls
        timer_expire = 60
        ignore_unknown_eap_types = no
        max_sessions = 64
        tls-config tls-common {{
            private_key_file = {d}/server.key
            certificate_file = {d}/server.pem
            ca_file = {d}/ca.pem
            cipher_list = "DEFAULT"
            tls_min_version = "1.2"
            tls_max_version = "1.2"
        }}
        ttls {{
            tls = tls-common
            default_eap_type = md5
            copy_request_to_tunnel = no
            virtual_server = "inner-tunnel"
        }}
    }}
}}
server default {{
    listen {{
        type = auth
        ipaddr = 127.0.0.1
        port = {port}
    }}
    authorize {{
        eap {{
            ok = return
        }}
    }}
    authenticate {{
        eap
    }}
    post-auth {{
        update reply {{
            &User-Name := &session-state:User-Name
        }}
    }}
}}
server inner-tunnel {{
    authorize {{
        files
        pap
    }}
    authenticate {{
        Auth-Type PAP {{
            pap
        }}
    }}
    post-auth {{
        update outer.session-state {{
            &User-Name := &User-Name
        }}
    }}
}}
"#
    );
    std::fs::write(dir.join("radiusd.conf"), conf).unwrap();
    std::fs::write(
        dir.join("users"),
        "alice Cleartext-Password := \"correct horse\"\n",
    )
    .unwrap();
}

fn start_freeradius(bin: &Path, dir: &Path) -> FreeRadius {
    let out = std::fs::File::create(dir.join("radiusd.out")).unwrap();
    let child = Command::new(bin)
        .args(["-X", "-d"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("start freeradius");
    let fr = FreeRadius {
        child,
        dir: dir.to_path_buf(),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !fr.log().contains("Ready to process requests") {
        assert!(
            Instant::now() < deadline,
            "FreeRADIUS did not start:\n{}",
            fr.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    fr
}

#[test]
fn pcpc_authenticates_through_pcpd_to_freeradius() {
    let Some(bin) = freeradius_bin() else {
        assert!(
            std::env::var_os("PCPD_REQUIRE_FREERADIUS").is_none(),
            "PCPD_REQUIRE_FREERADIUS is set but freeradius is not installed"
        );
        eprintln!(
            "!! SKIP pcpc_authenticates_through_pcpd_to_freeradius: no freeradius (apt-get install freeradius)"
        );
        return;
    };
    let dir = std::env::temp_dir().join(format!("pcpc-freeradius-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // Enough names that the server's TLS flight spans several EAP-TTLS fragments:
    // FreeRADIUS keeps its default fragment_size (1024), and only the Framed-MTU pcpd
    // sends keeps each EAP packet small enough for PCP.
    let pki = Pki::large("aaa.example", 60, "aaa.example");
    let path = |n: &str| dir.join(n).to_str().unwrap().to_string();
    std::fs::write(path("server.pem"), &pki.cert_pem).unwrap();
    std::fs::write(path("server.key"), &pki.key_pem).unwrap();
    std::fs::write(path("ca.pem"), &pki.ca_pem).unwrap();
    std::fs::write(path("pw"), "correct horse\n").unwrap();
    std::fs::write(path("bad"), "wrong\n").unwrap();
    std::fs::write(path("secret"), format!("{SECRET}\n")).unwrap();
    let port = free_udp(std::net::Ipv4Addr::LOCALHOST);
    write_raddb(&dir, port);
    let t0 = Instant::now();
    let fr = start_freeradius(&bin, &dir);
    eprintln!("FreeRADIUS ready after {:?}", t0.elapsed());

    let auth = format!(
        "[auth]\ndefault = \"required\"\n[auth.radius]\nserver = \"127.0.0.1:{port}\"\nsecret_file = \"{}\"\ntimeout_ms = 1000\ntries = 3\n",
        path("secret")
    );
    let p = Pcpd::start(&short_lifetime_config(&auth));
    let ip = IpAddr::V4(p.ip);
    let ca_pem = path("ca.pem");
    let map = |password: &str, port: &str| {
        pcpc(
            ip,
            p.pcp,
            10,
            &identity_map_args(password, &ca_pem, "aaa.example", port),
        )
    };
    let o = map(&path("pw"), "7000");
    assert!(
        o.status.success(),
        "pcpc failed: {}\n--- pcpd:\n{}\n--- FreeRADIUS:\n{}",
        String::from_utf8_lossy(&o.stderr),
        p.output(),
        fr.log()
    );
    let m = p.find_mapping(7000).expect("the mapping is on the server");
    // FreeRADIUS returned the inner User-Name: the subscriber is alice, not the
    // outer "anonymous".
    assert_eq!(m["subscriber"], "identity:alice", "{m}");
    eprintln!("authenticated and mapped after {:?}", t0.elapsed());
    let o = map(&path("bad"), "7001");
    eprintln!("wrong password refused after {:?}", t0.elapsed());
    assert_eq!(o.status.code(), Some(1));
    assert!(p.find_mapping(7001).is_none());
    assert!(fr.log().contains("Login incorrect"), "{}", fr.log());
    drop(fr);
    let _ = std::fs::remove_dir_all(&dir);
}
