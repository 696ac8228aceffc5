//! `pcpperf`: a load generator for PCP (RFC 6887) servers, loopback only.
//!
//! * `pcpperf echo` — a trivial responder (R bit, SUCCESS, fixed epoch, the rest
//!   reflected) that is the throughput floor any real server is compared with.
//! * `pcpperf flood` — one host sending MAP requests as fast as it can (abuse
//!   resistance: run it beside a paced `pcpperf map --rate R`).
//! * `pcpperf map` / `pcpperf peer` — closed-loop load: N clients, each on its own
//!   loopback source address, each keeping W requests outstanding, renewing M mappings,
//!   optionally with CHECKPOINT_REQUIRED (option 192, RFC 7767). Reports requests,
//!   responses, timeouts, req/s, latency percentiles and result codes, as text or JSON.
//!
//! Every address it sends to or binds is checked to be in 127.0.0.0/8 or `::1`.
#![forbid(unsafe_code)]

mod addr;
mod echo;
mod flood;
mod load;
mod report;

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use pcp_proto::Opcode;

/// Load generator for PCP servers (RFC 6887, option 192 of RFC 7767). Loopback only.
#[derive(Debug, Parser)]
#[command(name = "pcpperf", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Trivial responder, the throughput floor: echoes each datagram of ≥ 24 octets with
    /// the R bit set, result SUCCESS, a fixed epoch and octets 12..24 zeroed.
    Echo(EchoArgs),
    /// Closed-loop MAP load.
    Map(LoadArgs),
    /// Closed-loop PEER load (remote peer 127.0.0.250, port 20000 + mapping index).
    Peer(LoadArgs),
    /// One host flooding at full speed: MAP requests for ever new internal ports from
    /// one source address, answers ignored. Prints what it sent.
    Flood(FloodArgs),
}

#[derive(Debug, Args)]
struct EchoArgs {
    /// Address to listen on (loopback only; port 0 picks a free one, printed at start).
    #[arg(long, default_value = "127.0.0.1:5351", value_parser = addr::parse_bind)]
    bind: SocketAddr,
    /// Stop after this many seconds (default: run until SIGINT/SIGTERM).
    #[arg(long, value_name = "S", value_parser = parse_secs)]
    duration: Option<Duration>,
}

#[derive(Debug, Args)]
struct LoadArgs {
    /// The PCP server (loopback only: 127.0.0.0/8 or [::1]).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:5351", value_parser = addr::parse_server)]
    server: SocketAddr,
    /// Simulated clients, each with its own socket and source address.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    clients: u32,
    /// Requests each client keeps outstanding.
    #[arg(long, value_name = "W", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    window: u32,
    /// Measured period in seconds.
    #[arg(long, value_name = "S", default_value = "5", value_parser = parse_secs)]
    duration: Duration,
    /// Warm-up in seconds before measuring; its numbers are discarded.
    #[arg(long, value_name = "S", default_value = "1", value_parser = parse_secs)]
    warmup: Duration,
    /// Add CHECKPOINT_REQUIRED (option 192) to each request.
    #[arg(long)]
    checkpoint: bool,
    /// Mappings each client cycles through (internal ports 10000, 10001, …).
    #[arg(long, value_name = "M", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=55_536))]
    mappings: u32,
    /// Requested lifetime in seconds.
    #[arg(long, value_name = "L", default_value_t = 3600)]
    lifetime: u32,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Source address of the first client; the next clients count up from it
    /// (loopback only; with an IPv6 server every client uses ::1).
    #[arg(long, value_name = "IP", default_value = "127.0.1.1", value_parser = addr::parse_source_base)]
    source_base: IpAddr,
    /// Runtime worker threads (1 = single-threaded; the server needs CPU too).
    #[arg(long, value_name = "T", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    threads: u32,
    /// Requests per second each client sends at most (default 0: as fast as the
    /// window allows). A paced client is the well-behaved host beside `pcpperf flood`.
    #[arg(long, value_name = "R", default_value_t = 0.0, value_parser = parse_rate)]
    rate: f64,
}

#[derive(Debug, Args)]
struct FloodArgs {
    /// The PCP server (loopback only).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:5351", value_parser = addr::parse_server)]
    server: SocketAddr,
    /// The flooding host's address (loopback only).
    #[arg(long, value_name = "IP", default_value = "127.0.9.1", value_parser = addr::parse_source_base)]
    source: IpAddr,
    /// How long to flood, in seconds.
    #[arg(long, value_name = "S", default_value = "10", value_parser = parse_secs)]
    duration: Duration,
    /// Add CHECKPOINT_REQUIRED (option 192) to each request.
    #[arg(long)]
    checkpoint: bool,
}

/// Parses a non-negative, finite rate.
fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r >= 0.0 => Ok(r),
        _ => Err(format!(
            "`{s}` is not a non-negative number of requests per second"
        )),
    }
}

/// Parses a non-negative number of seconds, fractions allowed.
fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    Duration::try_from_secs_f64(v)
        .map_err(|_| format!("`{s}` is not a non-negative number of seconds"))
}

/// Resolves when the process gets SIGINT or (on Unix) SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn load(opcode: Opcode, a: LoadArgs) -> Result<(), String> {
    let json = a.json;
    let report = load::run(load::LoadConfig {
        opcode,
        server: a.server,
        clients: a.clients,
        window: a.window,
        duration: a.duration,
        warmup: a.warmup,
        mappings: a.mappings,
        lifetime: a.lifetime,
        checkpoint: a.checkpoint,
        source_base: a.source_base,
        threads: a.threads,
        rate: a.rate,
    })?;
    if json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Echo(a) => echo::run(a.bind, a.duration),
        Command::Map(a) => load(Opcode::Map, a),
        Command::Peer(a) => load(Opcode::Peer, a),
        Command::Flood(a) => flood::run(a.server, a.source, a.duration, a.checkpoint).map(|r| {
            println!("{r}");
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pcpperf: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn seconds_parse() {
        assert_eq!(parse_secs("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_secs("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_secs("-1").is_err());
        assert!(parse_secs("soon").is_err());
    }
}
