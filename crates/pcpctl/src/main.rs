//! `pcpctl`: the admin CLI for pcpd, over its JSON admin API.
//!
//! ```text
//! pcpctl [--admin ADDR] mappings [--json]     the mapping table (or the raw JSON)
//! pcpctl [--admin ADDR] subscribers [--json]  subscribers and their quotas
//! pcpctl [--admin ADDR] status [--json]       version, uptime, counts, config
//! pcpctl [--admin ADDR] reload                re-read pcpd's config file
//! pcpctl [--admin ADDR] metrics               the Prometheus text
//! pcpctl [--admin ADDR] ha [--json]           pair mode: role, term, readiness, lag
//! pcpctl [--admin ADDR] ha --serving          exit 0 only if this pcpd answers PCP now
//! pcpctl [--admin ADDR] promote               make this backup active now
//! pcpctl [--admin ADDR] switchover            hand over from this active to its backup
//! pcpctl [--admin ADDR] auth sessions [--json] PCP authentication (RFC 7652) sessions
//! pcpctl [--admin ADDR] auth terminate ID     end a session (SESSION_TERMINATED)
//! pcpctl alive FILE                           exit 0 only if the pcpd whose [ha]
//!                                             serving_file is FILE runs (no API)
//! ```
//!
//! `--token-file FILE` (or `PCPCTL_TOKEN_FILE`) sends the bearer token pcpd's admin
//! API asks for when it has `[pcpd] admin_token_file` (or the read-only token).
//!
//! Exit codes: 0 done; 1 pcpd could not be reached, answered an error, or refused the
//! command (reload, promote, switchover, auth terminate: pcpd's reason is printed), or
//! (`ha --serving`) this pcpd does not answer PCP now, or (`alive`) it is not running
//! or stalled; 2 bad usage.
#![forbid(unsafe_code)]

mod alive;
mod api;
mod format;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::api::{ApiError, Client};

/// Admin CLI for pcpd (PCP server with RFC 7767 check-pointing).
#[derive(Debug, Parser)]
#[command(name = "pcpctl", version, about)]
struct Cli {
    /// pcpd's admin API: HOST:PORT or http://HOST:PORT.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:8351",
        global = true
    )]
    admin: String,
    /// File holding pcpd's admin bearer token (the admin or the read-only one); also
    /// from PCPCTL_TOKEN_FILE. Never the token itself on the command line.
    #[arg(long, value_name = "FILE", env = "PCPCTL_TOKEN_FILE", global = true)]
    token_file: Option<std::path::PathBuf>,
    /// Give up on a request after this many seconds.
    #[arg(long, value_name = "SECS", default_value = "5", value_parser = parse_timeout, global = true)]
    timeout: Duration,
    #[command(subcommand)]
    command: Command,
}

/// What to do.
#[derive(Debug, Subcommand)]
enum Command {
    /// List mappings: opcode, endpoints, protocol, lifetime left, checkpoint state.
    Mappings {
        /// Print pcpd's JSON as received instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List subscribers: tier, mappings and checkpoints against quotas, tokens.
    Subscribers {
        /// Print pcpd's JSON as received instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show pcpd's status.
    Status {
        /// Print pcpd's JSON as received.
        #[arg(long)]
        json: bool,
    },
    /// Make pcpd re-read its config file (policy, tiers, limits; mappings are kept).
    Reload,
    /// Print pcpd's Prometheus metrics.
    Metrics,
    /// Show pair mode (HA): role, term, peer, readiness, replication lag, held replies.
    Ha {
        /// Print pcpd's JSON as received.
        #[arg(long, conflicts_with = "serving")]
        json: bool,
        /// Health check for keepalived (docs/HA.md "keepalived"): exit 0 only if this
        /// pcpd answers PCP now (role active or promoting, or standalone); exit 1 when
        /// it is a backup, joining, draining (a switchover away from it) or unreachable.
        #[arg(long)]
        serving: bool,
    },
    /// Promote this backup to active now, even without a complete copy (what it holds
    /// is all there is). The old active, if alive, steps down when it hears the new
    /// term. Refused (exit 1) on a node that is already active or not in pair mode.
    Promote,
    /// Planned handover: this active stops answering, waits until its backup holds
    /// every record, and the backup takes over; no checkpoint is lost. Refused (exit 1)
    /// unless this node is active with a ready backup.
    Switchover,
    /// Liveness check for keepalived (docs/HA.md "keepalived"), from the files next to
    /// pcpd's `[ha] serving_file`, without asking pcpd: exit 0 while pcpd holds
    /// FILE.lock and touches FILE.alive; exit 1 when it is not running, or stopped or
    /// frozen (FILE.alive untouched for its `detection_ms`). Whatever its role.
    Alive {
        /// pcpd's `[ha] serving_file`.
        file: std::path::PathBuf,
    },
    /// PCP authentication (RFC 7652): PA sessions.
    Auth {
        #[command(subcommand)]
        command: AuthCommand,
    },
}

/// `pcpctl auth ...`.
#[derive(Debug, Subcommand)]
enum AuthCommand {
    /// List PA sessions: identity, client, state, when authenticated, expiry, sequence
    /// numbers, tagged requests accepted and refused.
    Sessions {
        /// Print pcpd's JSON as received instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Terminate a PA session: the client gets SESSION_TERMINATED and must
    /// authenticate again. Needs the admin token; exit 1 for an unknown session.
    Terminate {
        /// The session ID (from `pcpctl auth sessions`).
        id: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pcpctl: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--timeout`: positive seconds, fractions allowed.
fn parse_timeout(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs > 0.0 && secs < 1e9 => {
            Ok(Duration::from_secs_f64(secs))
        }
        _ => Err(format!("expected a positive number of seconds, not {s:?}")),
    }
}

/// Raw JSON as received, ending in one newline.
fn raw(body: String) -> String {
    let mut s = body.trim_end().to_string();
    s.push('\n');
    s
}

fn run(cli: &Cli) -> Result<String, Box<dyn std::error::Error>> {
    match &cli.command {
        // Asks pcpd nothing: a hung admin API must not fail it.
        Command::Alive { file } => Ok(alive::check(file)?),
        _ => Ok(api_command(cli)?),
    }
}

/// The commands over pcpd's admin API.
fn api_command(cli: &Cli) -> Result<String, ApiError> {
    let mut client = Client::new(&cli.admin, cli.timeout)?;
    if let Some(path) = &cli.token_file {
        let text = std::fs::read_to_string(path).map_err(|e| ApiError::Token {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let token = text.lines().next().unwrap_or("").trim().to_string();
        if token.is_empty() {
            return Err(ApiError::Token {
                path: path.display().to_string(),
                reason: "empty".into(),
            });
        }
        client = client.with_token(token);
    }
    match &cli.command {
        Command::Mappings { json } => {
            let (list, body) = client.get_json::<Vec<api::Mapping>>("/mappings")?;
            Ok(if *json {
                raw(body)
            } else {
                format::mappings(&list)
            })
        }
        Command::Subscribers { json } => {
            let (list, body) = client.get_json::<Vec<api::Subscriber>>("/subscribers")?;
            Ok(if *json {
                raw(body)
            } else {
                format::subscribers(&list)
            })
        }
        Command::Status { json } => {
            let (status, body) = client.get_json::<api::Status>("/status")?;
            Ok(if *json {
                raw(body)
            } else {
                format::status(&status)
            })
        }
        Command::Reload => {
            let message = client.reload()?;
            Ok(format!("{message}\n"))
        }
        Command::Metrics => client.get_text("/metrics"),
        Command::Ha { json, serving } => {
            let (ha, body) = client.get_json::<api::Ha>("/ha")?;
            if *serving {
                return format::serving(&ha).map_err(|role| ApiError::NotServing { role });
            }
            Ok(if *json { raw(body) } else { format::ha(&ha) })
        }
        Command::Promote => Ok(format!("{}\n", client.promote()?)),
        Command::Switchover => Ok(format!("{}\n", client.switchover()?)),
        Command::Auth {
            command: AuthCommand::Sessions { json },
        } => {
            let (list, body) = client.get_json::<Vec<api::AuthSession>>("/auth/sessions")?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            Ok(if *json {
                raw(body)
            } else {
                format::auth_sessions(&list, now)
            })
        }
        Command::Auth {
            command: AuthCommand::Terminate { id },
        } => Ok(format!("{}\n", client.terminate(*id)?)),
        Command::Alive { .. } => unreachable!("`run` checks aliveness without the API"),
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
    fn admin_defaults_to_loopback_8351_and_is_global() {
        let cli = Cli::try_parse_from(["pcpctl", "mappings", "--json"]).unwrap();
        assert_eq!(cli.admin, "127.0.0.1:8351");
        assert!(matches!(cli.command, Command::Mappings { json: true }));
        let cli = Cli::try_parse_from(["pcpctl", "status", "--admin", "127.0.0.9:1"]).unwrap();
        assert_eq!(cli.admin, "127.0.0.9:1");
        assert_eq!(cli.timeout, Duration::from_secs(5));
    }

    #[test]
    fn ha_commands_parse() {
        let cli = Cli::try_parse_from(["pcpctl", "ha", "--json"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Ha {
                json: true,
                serving: false
            }
        ));
        let cli = Cli::try_parse_from(["pcpctl", "ha", "--serving"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Ha {
                json: false,
                serving: true
            }
        ));
        assert!(Cli::try_parse_from(["pcpctl", "ha", "--serving", "--json"]).is_err());
        let cli = Cli::try_parse_from(["pcpctl", "--admin", "127.0.0.9:1", "promote"]).unwrap();
        assert!(matches!(cli.command, Command::Promote));
        assert_eq!(cli.admin, "127.0.0.9:1");
        let cli = Cli::try_parse_from(["pcpctl", "switchover"]).unwrap();
        assert!(matches!(cli.command, Command::Switchover));
        assert!(Cli::try_parse_from(["pcpctl", "promote", "--json"]).is_err());
        let cli = Cli::try_parse_from(["pcpctl", "alive", "/run/pcpd/serving"]).unwrap();
        assert!(
            matches!(&cli.command, Command::Alive { file } if file == std::path::Path::new("/run/pcpd/serving"))
        );
        assert!(Cli::try_parse_from(["pcpctl", "alive"]).is_err());
    }

    #[test]
    fn auth_commands_parse() {
        let cli = Cli::try_parse_from(["pcpctl", "auth", "sessions", "--json"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Auth {
                command: AuthCommand::Sessions { json: true }
            }
        ));
        let cli = Cli::try_parse_from(["pcpctl", "auth", "terminate", "4000000000"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Auth {
                command: AuthCommand::Terminate { id: 4_000_000_000 }
            }
        ));
        assert!(Cli::try_parse_from(["pcpctl", "auth", "terminate", "alice"]).is_err());
        assert!(Cli::try_parse_from(["pcpctl", "auth", "terminate"]).is_err());
    }

    #[test]
    fn timeout_must_be_positive() {
        assert_eq!(parse_timeout("0.5"), Ok(Duration::from_millis(500)));
        for bad in ["0", "-1", "nan", "inf", "x"] {
            assert!(parse_timeout(bad).is_err(), "{bad}");
        }
    }
}
