//! `pcp-radiusd`: the embedded EAP-TTLS server behind RADIUS on one UDP socket — a
//! test and interop tool (e.g. for wpa_supplicant's `eapol_test`), a thin shell over
//! [`pcp_eap::radius::server::RadiusServer`]. Prints `listening on ADDR` on stdout
//! once bound (so `--listen 127.0.0.1:0` works), and one line per answered or dropped
//! datagram on stderr.
#![forbid(unsafe_code)]

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use pcp_eap::radius::server::{Outcome, RadiusServer, RadiusServerConfig};
use pcp_eap::radius::{MAX_PACKET, load_secret};
use pcp_eap::{Embedded, hash_password};

/// RADIUS (RFC 2865/3579) front end of pcp-eap's embedded EAP-TTLS/PAP server.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// UDP address to listen on (port 0: any free port).
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:1812")]
    listen: SocketAddr,
    /// File whose first line is the shared secret of every NAS.
    #[arg(long, value_name = "FILE", required_unless_present = "hash_password")]
    secret_file: Option<PathBuf>,
    /// The server certificate chain (PEM).
    #[arg(long, value_name = "FILE", required_unless_present = "hash_password")]
    cert: Option<PathBuf>,
    /// The server's private key (PEM).
    #[arg(long, value_name = "FILE", required_unless_present = "hash_password")]
    key: Option<PathBuf>,
    /// Credentials file: `name:argon2-hash` lines.
    #[arg(long, value_name = "FILE", required_unless_present = "hash_password")]
    credentials: Option<PathBuf>,
    /// Half-finished conversations kept at most.
    #[arg(long, default_value_t = 1024)]
    max_sessions: usize,
    /// Seconds a conversation waits for the NAS's next request.
    #[arg(long, default_value_t = 30)]
    session_timeout: u64,
    /// Read a password (one line) on stdin, print its Argon2id hash for a credentials
    /// file (`name:HASH`), and exit.
    #[arg(long, exclusive = true)]
    hash_password: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let done = if args.hash_password {
        hash()
    } else {
        run(&args)
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pcp-radiusd: {e}");
            ExitCode::from(2)
        }
    }
}

fn hash() -> Result<(), Box<dyn std::error::Error>> {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let pw = line.strip_suffix('\n').unwrap_or(&line);
    let pw = pw.strip_suffix('\r').unwrap_or(pw);
    println!("{}", hash_password(pw.as_bytes())?);
    Ok(())
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let file = |f: &Option<PathBuf>| f.clone().unwrap_or_default();
    let backend = Embedded::load(
        &file(&args.cert),
        &file(&args.key),
        &file(&args.credentials),
    )?;
    let mut cfg = RadiusServerConfig::new(load_secret(&file(&args.secret_file))?);
    cfg.max_sessions = args.max_sessions;
    cfg.session_timeout_ms = args.session_timeout.saturating_mul(1000);
    let mut server = RadiusServer::new(cfg, backend);
    let sock = UdpSocket::bind(args.listen)
        .map_err(|e| format!("cannot bind UDP {}: {e}", args.listen))?;
    println!("listening on {}", sock.local_addr()?);
    let origin = Instant::now();
    let mut buf = vec![0u8; MAX_PACKET];
    loop {
        let now = origin.elapsed().as_millis() as u64;
        let wait = server.poll_timeout().map(|t| t.saturating_sub(now).max(1));
        sock.set_read_timeout(wait.map(Duration::from_millis))?;
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                server.handle_timeout(origin.elapsed().as_millis() as u64);
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let now = origin.elapsed().as_millis() as u64;
        match server.handle(now, from, &buf[..n]) {
            Outcome::Dropped(why) => eprintln!("{from}: dropped: {why}"),
            Outcome::Reply { reply, kind } => {
                eprintln!("{from}: {kind:?} ({} sessions)", server.sessions());
                if let Err(e) = sock.send_to(&reply, from) {
                    eprintln!("{from}: send: {e}");
                }
            }
        }
    }
}
