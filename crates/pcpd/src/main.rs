//! `pcpd`: the PCP (RFC 6887) and NAT-PMP (RFC 6886) server daemon with
//! application-initiated check-pointing (RFC 7767).
//!
//! With no arguments it runs on embedded defaults: PCP on 127.0.0.1:5351, the
//! in-memory data plane, the admin API on 127.0.0.1:8351.
// Denied everywhere but in `hugepages` (the global allocator; see there why).
#![deny(unsafe_code)]

mod aaa;
mod acl;
mod admin;
mod admin_auth;
mod auth;
mod config;
mod core;
mod daemon;
mod hugepages;
mod jobs;
mod limit;
mod metrics;
mod serving_file;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

#[global_allocator]
static ALLOC: hugepages::HugeTables = hugepages::HugeTables;

/// PCP + NAT-PMP server with RFC 7767 check-pointing.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML); see docs/pcpd.example.toml for every key.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// PCP/NAT-PMP listen address (UDP), repeatable; replaces `[pcpd] listen`.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Vec<SocketAddr>,
    /// Admin HTTP API address; replaces `[pcpd] admin`.
    #[arg(long, value_name = "ADDR:PORT")]
    admin: Option<SocketAddr>,
    /// Pair mode: where this node receives its peer's replication frames (UDP).
    #[arg(long, value_name = "ADDR:PORT", requires_all = ["ha_peer", "ha_role"])]
    ha_listen: Option<SocketAddr>,
    /// Pair mode: the peer's --ha-listen address.
    #[arg(long, value_name = "ADDR:PORT", requires_all = ["ha_listen", "ha_role"])]
    ha_peer: Option<SocketAddr>,
    /// Pair mode: the role this node starts in.
    #[arg(long, value_enum, requires_all = ["ha_listen", "ha_peer"])]
    ha_role: Option<config::HaRole>,
    /// Pair mode: the replication link's pre-shared key file; replaces `[ha] key_file`.
    #[arg(long, value_name = "FILE")]
    ha_key_file: Option<PathBuf>,
    /// Pair mode: the file keepalived's `track_file` reads (0: this node serves PCP,
    /// 1: it does not); replaces `[ha] serving_file`.
    #[arg(long, value_name = "FILE")]
    ha_serving_file: Option<PathBuf>,
    /// Check the configuration and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut cfg = match &args.config {
        Some(path) => match config::Config::load(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("pcpd: {e}");
                return ExitCode::from(2);
            }
        },
        None => config::Config::embedded(),
    };
    if !args.listen.is_empty() {
        cfg.daemon.listen = args.listen.clone();
    }
    if let Some(admin) = args.admin {
        cfg.daemon.admin = admin;
    }
    if let (Some(listen), Some(peer), Some(role)) = (args.ha_listen, args.ha_peer, args.ha_role) {
        let mut ha = cfg.ha.clone().unwrap_or(config::HaSection {
            listen,
            peer,
            role,
            heartbeat_ms: 100,
            detection_ms: 500,
            ack_timeout_ms: 250,
            state_file: None,
            preinstall: true,
            replicate_sessions: true,
            replicate_sessions_in_clear: false,
            key_file: None,
            serving_file: None,
        });
        ha.listen = listen;
        ha.peer = peer;
        ha.role = role;
        cfg.ha = Some(ha);
    }
    if let Some(path) = args.ha_key_file {
        let Some(ha) = &mut cfg.ha else {
            eprintln!(
                "pcpd: --ha-key-file needs pair mode ([ha] or --ha-listen/--ha-peer/--ha-role)"
            );
            return ExitCode::from(2);
        };
        if let Err(e) = config::read_key_file(&path, None) {
            eprintln!("pcpd: {e}");
            return ExitCode::from(2);
        }
        ha.key_file = Some(path);
    }
    if let Some(path) = args.ha_serving_file {
        let Some(ha) = &mut cfg.ha else {
            eprintln!(
                "pcpd: --ha-serving-file needs pair mode ([ha] or --ha-listen/--ha-peer/--ha-role)"
            );
            return ExitCode::from(2);
        };
        ha.serving_file = Some(path);
    }
    if let Err(e) = cfg.check_session_replication() {
        eprintln!("pcpd: {e}");
        return ExitCode::from(2);
    }
    hugepages::enable(cfg.daemon.huge_pages);
    if args.check {
        println!("pcpd: configuration OK");
        return ExitCode::SUCCESS;
    }
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.daemon.log))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .init();

    // `threads = 1` runs everything on one thread (the core is single-threaded behind
    // one lock anyway); the default of 2 lets the replication task and the admin API
    // run beside the PCP path. Which serves faster is not settled (docs/BENCHMARKS.md).
    let mut builder = if cfg.daemon.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(cfg.daemon.threads);
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pcpd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(daemon::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pcpd: {e}");
            ExitCode::FAILURE
        }
    }
}
