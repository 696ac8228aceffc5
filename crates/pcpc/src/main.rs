//! `pcpc`: a PCP client CLI with RFC 7767 check-pointing.
//!
//! ```text
//! pcpc map    --server ADDR --proto udp|tcp --internal-port N [--external-port N]
//!             [--lifetime S] [--checkpoint] [--keep] [--json] [options…]
//! pcpc peer   --server ADDR --proto P --internal-port N --remote ADDR:PORT [...]
//! pcpc delete --server ADDR --proto P --internal-port N --nonce HEX [--remote ADDR:PORT]
//! pcpc announce --server ADDR            ask for the server's epoch
//! pcpc announce --listen ADDR            print unsolicited ANNOUNCEs as they come
//! pcpc explain --policy FILE --app NAME [flow…]   should this flow be checkpointed, why
//! pcpc run     --policy FILE             keep the policy file's flows, checkpointed per it
//! ```
//!
//! Without `--server`, the server is the default gateway (Linux), port 5351.
//! `--identity NAME --password-file FILE --ca FILE` authenticates first (RFC 7652,
//! EAP-TTLS/PAP) and tags every request.
//! Exit codes: 0 done; 1 the server refused, did not answer, or a file was bad; 2 usage.
#![forbid(unsafe_code)]

mod cmd;
mod output;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// PCP client (RFC 6887, NAT-PMP fallback) with RFC 7767 CHECKPOINT_REQUIRED.
#[derive(Debug, Parser)]
#[command(name = "pcpc", version, about)]
pub struct Cli {
    /// The PCP server, HOST:PORT (default: the default gateway, port 5351).
    #[arg(long, value_name = "ADDR", global = true)]
    pub server: Option<String>,
    /// Local address to send from (default: chosen by the routing table).
    #[arg(long, value_name = "ADDR", global = true)]
    pub bind: Option<SocketAddr>,
    /// Machine-readable output: one JSON object per line.
    #[arg(long, global = true)]
    pub json: bool,
    /// Give up waiting for an answer after this many seconds.
    #[arg(long, value_name = "SECS", default_value = "10", global = true)]
    pub timeout: f64,
    /// Initial retransmission time in milliseconds (RFC 6887 IRT; default 3000).
    #[arg(long, value_name = "MS", default_value = "3000", global = true)]
    pub irt_ms: u64,
    /// Do not probe the server for blind option echoing: believe its option 192 echo
    /// (a server that echoes every option, like miniupnpd, then looks like it honours).
    #[arg(long, global = true)]
    pub no_canary: bool,
    /// Listen for unsolicited ANNOUNCEs here too (e.g. 0.0.0.0:5350), with `--keep`/`run`.
    #[arg(long, value_name = "ADDR", global = true)]
    pub announce_listen: Option<SocketAddr>,
    /// With --announce-listen: join the all-hosts multicast group (224.0.0.1 / ff02::1).
    #[arg(long, global = true, requires = "announce_listen")]
    pub announce_multicast: bool,
    /// Maximum transmissions of a request (RFC 6887 MRC; 0 = no limit).
    #[arg(long, value_name = "N", default_value = "0", global = true)]
    pub mrc: u32,
    /// Maximum retransmission duration in seconds (RFC 6887 MRD; 0 = no limit).
    #[arg(long, value_name = "SECS", default_value = "0", global = true)]
    pub mrd: u64,
    /// Authenticate as this user before any request (RFC 7652, EAP-TTLS with PAP inside)
    /// and tag every request; needs --password-file and --ca.
    #[arg(long, value_name = "NAME", global = true, requires_all = ["password_file", "ca"])]
    pub identity: Option<String>,
    /// File whose first line is the password for --identity.
    #[arg(long, value_name = "FILE", global = true, requires = "identity")]
    pub password_file: Option<PathBuf>,
    /// PEM file of the CA certificate(s) the server's certificate must chain to.
    #[arg(long, value_name = "FILE", global = true, requires = "identity")]
    pub ca: Option<PathBuf>,
    /// Name the server's certificate must carry (default: the host of --server).
    #[arg(long, value_name = "NAME", global = true, requires = "identity")]
    pub server_name: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create an inbound mapping (MAP) and print it.
    Map(MapArgs),
    /// Create an outbound mapping to one remote peer (PEER) and print it.
    Peer(PeerArgs),
    /// Delete a mapping made earlier (needs the nonce `pcpc map` printed).
    Delete(DeleteArgs),
    /// Ask the server for its epoch, or listen for its unsolicited ANNOUNCEs.
    Announce(AnnounceArgs),
    /// Should this flow be checkpointed, according to a policy file, and why.
    Explain(ExplainArgs),
    /// Keep the flows of a policy file mapped, checkpointed as the policy says.
    Run(RunArgs),
}

/// Transport protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Proto {
    /// UDP (17).
    Udp,
    /// TCP (6).
    Tcp,
    /// SCTP (132).
    Sctp,
    /// DCCP (33).
    Dccp,
}

impl Proto {
    /// IANA number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Udp => 17,
            Proto::Tcp => 6,
            Proto::Sctp => 132,
            Proto::Dccp => 33,
        }
    }
}

/// What MAP and PEER share.
#[derive(Debug, Args)]
pub struct Common {
    /// Transport protocol.
    #[arg(long, value_enum)]
    pub proto: Proto,
    /// Internal port.
    #[arg(long, value_name = "N")]
    pub internal_port: u16,
    /// Suggested external port.
    #[arg(long, value_name = "N")]
    pub external_port: Option<u16>,
    /// Suggested external address.
    #[arg(long, value_name = "IP")]
    pub external_addr: Option<IpAddr>,
    /// Requested lifetime in seconds.
    #[arg(long, value_name = "S", default_value = "7200")]
    pub lifetime: u32,
    /// Ask for CHECKPOINT_REQUIRED (RFC 7767).
    #[arg(long)]
    pub checkpoint: bool,
    /// Keep renewing until interrupted, printing each event; delete on Ctrl-C.
    #[arg(long)]
    pub keep: bool,
    /// DESCRIPTION option text.
    #[arg(long, value_name = "TEXT")]
    pub description: Option<String>,
    /// THIRD_PARTY: make the mapping for this internal address.
    #[arg(long, value_name = "IP")]
    pub third_party: Option<IpAddr>,
    /// Reuse this nonce (24 hex digits), e.g. to renew a mapping made earlier.
    #[arg(long, value_name = "HEX")]
    pub nonce: Option<String>,
}

/// `pcpc map`.
#[derive(Debug, Args)]
pub struct MapArgs {
    /// Protocol, ports, lifetime, checkpoint…
    #[command(flatten)]
    pub common: Common,
    /// PREFER_FAILURE: the suggested external endpoint or nothing.
    #[arg(long)]
    pub prefer_failure: bool,
    /// FILTER: accept only from this remote prefix, `ADDR/LEN[:PORT]` (repeatable).
    #[arg(long, value_name = "ADDR/LEN[:PORT]")]
    pub filter: Vec<String>,
}

/// `pcpc peer`.
#[derive(Debug, Args)]
pub struct PeerArgs {
    /// Protocol, ports, lifetime, checkpoint…
    #[command(flatten)]
    pub common: Common,
    /// The remote peer, ADDR:PORT.
    #[arg(long, value_name = "ADDR:PORT")]
    pub remote: SocketAddr,
}

/// `pcpc delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Transport protocol.
    #[arg(long, value_enum)]
    pub proto: Proto,
    /// Internal port.
    #[arg(long, value_name = "N")]
    pub internal_port: u16,
    /// The mapping's nonce (24 hex digits, as `pcpc map` printed it).
    #[arg(long, value_name = "HEX")]
    pub nonce: String,
    /// For a PEER mapping: its remote peer.
    #[arg(long, value_name = "ADDR:PORT")]
    pub remote: Option<SocketAddr>,
    /// For a THIRD_PARTY mapping: its internal address.
    #[arg(long, value_name = "IP")]
    pub third_party: Option<IpAddr>,
}

/// `pcpc announce`.
#[derive(Debug, Args)]
pub struct AnnounceArgs {
    /// Listen here for unsolicited ANNOUNCEs (e.g. 0.0.0.0:5350) and print each.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// With --listen: join the all-hosts multicast group (224.0.0.1 / ff02::1).
    #[arg(long, requires = "listen")]
    pub multicast: bool,
    /// With --listen: stop after this many ANNOUNCEs.
    #[arg(long, value_name = "N", requires = "listen")]
    pub count: Option<usize>,
}

/// The flow `pcpc explain` asks about.
#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The policy file (TOML).
    #[arg(long, value_name = "FILE")]
    pub policy: PathBuf,
    /// Application name.
    #[arg(long, value_name = "NAME")]
    pub app: String,
    /// Transport protocol.
    #[arg(long, value_enum)]
    pub proto: Option<Proto>,
    /// Internal port.
    #[arg(long, value_name = "N")]
    pub internal_port: Option<u16>,
    /// Remote peer, ADDR or ADDR:PORT.
    #[arg(long, value_name = "ADDR[:PORT]")]
    pub remote: Option<String>,
    /// A tag of the flow (repeatable), e.g. emergency.
    #[arg(long, value_name = "TAG")]
    pub tag: Vec<String>,
    /// The application asks for a checkpoint itself.
    #[arg(long)]
    pub asked: bool,
    /// Local time to evaluate at, HH:MM (default: now).
    #[arg(long, value_name = "HH:MM")]
    pub at: Option<String>,
    /// Flows of this host already checkpointed (for the per-host limit).
    #[arg(long, value_name = "N", default_value = "0")]
    pub already: usize,
}

/// `pcpc run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The policy file (TOML) with its `[[flow]]` list.
    #[arg(long, value_name = "FILE")]
    pub policy: PathBuf,
    /// Re-evaluate the policy (time windows) this often, in seconds.
    #[arg(long, value_name = "SECS", default_value = "60")]
    pub every: u64,
    /// Stop after this many seconds (default: until interrupted).
    #[arg(long, value_name = "SECS")]
    pub for_secs: Option<u64>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pcpc: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(cmd::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pcpc: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--timeout` as a duration.
pub fn timeout(cli: &Cli) -> Duration {
    Duration::from_secs_f64(cli.timeout.clamp(0.001, 86_400.0))
}
