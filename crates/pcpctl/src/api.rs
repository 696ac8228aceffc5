//! A blocking client for pcpd's admin HTTP API and the shapes of its answers.
//!
//! The types mirror what `crates/pcpd/src/admin.rs` serializes. The fields pcpctl shows
//! are required (an answer without them is reported as unexpected); the others are
//! optional so that an older or newer pcpd still works.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use serde::Deserialize;

/// Largest answer body read (the mapping list of a busy node is large; 10 MiB, ureq's
/// default, is not enough for a million mappings).
const MAX_BODY: u64 = 1 << 30;

/// One mapping as `GET /mappings` lists it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Mapping {
    /// `"map"`, `"peer"` or `"natpmp"`.
    pub opcode: String,
    /// The PCP client that asked.
    pub client: IpAddr,
    /// IANA protocol number.
    pub protocol: u8,
    /// Internal address.
    pub internal_address: IpAddr,
    /// Internal port.
    pub internal_port: u16,
    /// External address.
    pub external_address: IpAddr,
    /// External port.
    pub external_port: u16,
    /// Remote peer address (PEER only).
    #[serde(default)]
    pub remote_address: Option<IpAddr>,
    /// Remote peer port (PEER only).
    #[serde(default)]
    pub remote_port: Option<u16>,
    /// Seconds until it expires.
    pub lifetime_remaining: u32,
    /// Whether it is checkpointed.
    pub checkpointed: bool,
    /// Why it is or is not checkpointed (stable code).
    pub checkpoint_reason: String,
    /// The same in words.
    #[serde(default)]
    pub checkpoint_detail: String,
    /// Subscriber charged.
    #[serde(default)]
    pub subscriber: String,
}

/// One subscriber as `GET /subscribers` lists it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Subscriber {
    /// Configured name or derived prefix.
    pub id: String,
    /// Tier name.
    pub tier: String,
    /// Mappings held.
    pub mappings: u32,
    /// The tier's mapping quota.
    pub mapping_quota: u32,
    /// Checkpointed mappings held.
    pub checkpointed: u32,
    /// The tier's checkpoint quota.
    pub checkpoint_quota: u32,
    /// Checkpoint tokens available now.
    pub checkpoint_tokens: f64,
    /// The tier's checkpoint burst.
    #[serde(default)]
    pub checkpoint_burst: Option<u32>,
}

/// `GET /status`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Status {
    /// pcpd version.
    pub version: String,
    /// Seconds since start.
    pub uptime: u64,
    /// PCP/NAT-PMP listen addresses.
    pub listen: Vec<String>,
    /// Data plane name.
    pub dataplane: String,
    /// Mappings held.
    pub mappings: u64,
    /// Checkpointed mappings held.
    pub checkpointed: u64,
    /// `"none"`, `"not_ready"` or `"ready"`.
    pub backup: String,
    /// Config file in force (`None`: embedded defaults).
    #[serde(default)]
    pub config: Option<String>,
}

/// One PA session of `GET /auth/sessions` (RFC 7652).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct AuthSession {
    /// Session ID.
    pub session_id: u32,
    /// The authenticated identity, once authenticated.
    pub identity: Option<String>,
    /// The client's address and port.
    pub client: String,
    /// `authenticating`, `reauthenticating`, `confirming`, `established`, `terminating`.
    pub state: String,
    /// When the exchange started (Unix seconds).
    pub created_at: u64,
    /// When the client first authenticated (Unix seconds).
    #[serde(default)]
    pub established_at: Option<u64>,
    /// When the SA expires (Unix seconds).
    #[serde(default)]
    pub expires_at: Option<u64>,
    /// Seconds until then.
    #[serde(default)]
    pub expires_in: Option<u64>,
    /// Next PA sequence number expected from the client.
    pub pa_seq_in: u32,
    /// Next PA sequence number the server sends.
    pub pa_seq_out: u32,
    /// Last common sequence number accepted.
    #[serde(default)]
    pub seq_in: Option<u32>,
    /// Next common sequence number of a response.
    #[serde(default)]
    pub seq_out: Option<u32>,
    /// Tagged requests accepted.
    pub accepted: u64,
    /// Tagged requests refused.
    pub refused: u64,
    /// Waiting for the AAA server.
    #[serde(default)]
    pub waiting_backend: bool,
}

/// `GET /ha`: pair-mode status.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct Ha {
    /// Whether pair mode is configured.
    #[serde(default)]
    pub enabled: bool,
    /// `"active"`, `"promoting"`, `"backup"`, `"joining"`, `"draining"` or `"standalone"`.
    pub role: String,
    /// Current term (odd: the node configured active took it; even: the other).
    pub term: u64,
    /// Whether the peer was heard within the detection time.
    pub peer_connected: bool,
    /// Active: the backup holds a complete copy. Backup: this node does.
    pub ready: bool,
    /// Replication lag in records.
    pub lag: u64,
    /// Replies waiting for the backup's acknowledgement.
    #[serde(default)]
    pub held_responses: u64,
    /// Replies released after an acknowledgement, since start.
    #[serde(default)]
    pub released_responses: u64,
    /// Replies sent without 192 because the backup did not acknowledge in time.
    #[serde(default)]
    pub ack_timeouts: u64,
    /// Checkpointed mappings held for a takeover (backup).
    #[serde(default)]
    pub stored: u64,
    /// PCP authentication sessions replicated (older pcpd: absent, 0).
    #[serde(default)]
    pub sessions: u64,
    /// What the server core is told about the backup: `none`, `not_ready`, `ready`.
    #[serde(default)]
    pub backup_status: String,
    /// Mappings adopted at the last takeover.
    #[serde(default)]
    pub adopted: u64,
    /// The replication link is authenticated and encrypted (older pcpd: absent).
    #[serde(default)]
    pub link_keyed: bool,
    /// Replication frames refused by the link layer, by reason (older pcpd: absent).
    #[serde(default)]
    pub frames_rejected: FramesRejected,
    /// Checkpointed mappings not installed at the last takeover (older pcpd: absent).
    #[serde(default)]
    pub adopt_failures: u64,
    /// Hosts that lost state at the last takeover, by reason (older pcpd: absent).
    #[serde(default)]
    pub lost_hosts: LostHosts,
    /// Promotions of the node since start (older pcpd: absent).
    #[serde(default)]
    pub promotions: u64,
    /// Step-downs of the node since start (older pcpd: absent).
    #[serde(default)]
    pub demotions: u64,
}

/// Hosts that lost state at a takeover (new epoch, ANNOUNCE), by reason.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub struct LostHosts {
    /// Held mappings that were not checkpointed.
    #[serde(default)]
    pub unprotected: u64,
    /// A checkpointed mapping could not be adopted.
    #[serde(default)]
    pub adopt_failed: u64,
    /// A replicated mapping was never installed on the standby.
    #[serde(default)]
    pub never_installed: u64,
}

/// Replication frames refused before the HA node saw them.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub struct FramesRejected {
    /// Failed authentication.
    #[serde(default)]
    pub auth: u64,
    /// Replayed.
    #[serde(default)]
    pub replay: u64,
    /// Plain frames at a node with a key.
    #[serde(default)]
    pub unkeyed: u64,
    /// Protected frames at a node without a key.
    #[serde(default)]
    pub keyed: u64,
}

/// The answer of a mutating `POST` (`/reload`, `/ha/promote`, `/ha/switchover`), both
/// ways.
#[derive(Debug, Clone, Deserialize, PartialEq)]
struct CommandAnswer {
    ok: bool,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

/// What went wrong talking to pcpd.
#[derive(Debug)]
pub enum ApiError {
    /// The `--admin` address does not make a URL.
    BadAddress {
        /// As given.
        admin: String,
        /// Why.
        reason: String,
    },
    /// No HTTP answer: connection refused, timeout, name resolution, broken HTTP.
    Unreachable {
        /// As given.
        admin: String,
        /// Why.
        reason: String,
    },
    /// An HTTP answer other than the expected one.
    Status {
        /// As given.
        admin: String,
        /// `GET /path` or `POST /path`.
        request: String,
        /// HTTP status code.
        status: u16,
        /// The body, trimmed.
        body: String,
    },
    /// A 2xx answer whose body is not what the API documents.
    Unexpected {
        /// As given.
        admin: String,
        /// `GET /path` or `POST /path`.
        request: String,
        /// Why it does not parse.
        reason: String,
    },
    /// The `--token-file` could not be used.
    Token {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// `ha --serving`: this pcpd does not answer PCP now; its role and term.
    NotServing {
        /// `role ROLE (term N)`.
        role: String,
    },
    /// pcpd refused a command (`reload`, `promote`, `switchover`); its reason.
    Refused {
        /// The command.
        command: &'static str,
        /// pcpd's reason.
        reason: String,
    },
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiError::BadAddress { admin, reason } => {
                write!(f, "invalid admin address {admin}: {reason}")
            }
            ApiError::Unreachable { admin, reason } => {
                write!(f, "cannot reach pcpd admin API at {admin}: {reason}")
            }
            ApiError::Status {
                admin,
                request,
                status,
                body,
            } => {
                write!(f, "pcpd admin API at {admin}: {request} answered {status}")?;
                if !body.is_empty() {
                    write!(f, ": {body}")?;
                }
                Ok(())
            }
            ApiError::Unexpected {
                admin,
                request,
                reason,
            } => write!(
                f,
                "pcpd admin API at {admin}: unexpected answer to {request}: {reason}"
            ),
            ApiError::Refused { command, reason } => write!(f, "{command} refused: {reason}"),
            ApiError::NotServing { role } => write!(f, "not serving: {role}"),
            ApiError::Token { path, reason } => write!(f, "token file {path}: {reason}"),
        }
    }
}

impl std::error::Error for ApiError {}

/// A client for one pcpd admin API.
pub struct Client {
    admin: String,
    base: String,
    agent: ureq::Agent,
    token: Option<String>,
}

impl Client {
    /// A client for `admin`: `HOST:PORT` (e.g. `127.0.0.1:8351`, `[::1]:8351`) or an
    /// `http://` URL. Each request gives up after `timeout`.
    pub fn new(admin: &str, timeout: Duration) -> Result<Client, ApiError> {
        let trimmed = admin.trim().trim_end_matches('/');
        if trimmed.is_empty() {
            return Err(ApiError::BadAddress {
                admin: admin.into(),
                reason: "empty".into(),
            });
        }
        let base = if trimmed.starts_with("http://") {
            trimmed.to_string()
        } else if trimmed.contains("://") {
            return Err(ApiError::BadAddress {
                admin: admin.into(),
                reason: "only http:// is supported (the admin API is plain HTTP on loopback)"
                    .into(),
            });
        } else {
            format!("http://{trimmed}")
        };
        let config = ureq::Agent::config_builder()
            // 4xx/5xx are answers to show, not transport errors.
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            // The admin API is local: an HTTP_PROXY meant for the internet must not
            // capture it.
            .proxy(None)
            .user_agent(concat!("pcpctl/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(Client {
            admin: admin.to_string(),
            base,
            agent: ureq::Agent::new_with_config(config),
            token: None,
        })
    }

    /// Sends `Authorization: Bearer <token>` with every request.
    pub fn with_token(mut self, token: String) -> Client {
        self.token = Some(token);
        self
    }

    /// Sends a request and returns the status and body.
    fn send(&self, method: &str, path: &str) -> Result<(u16, String), ApiError> {
        let url = format!("{}{path}", self.base);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let result = match method {
            "DELETE" => {
                let mut r = self.agent.delete(&url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
            "POST" => {
                let mut r = self.agent.post(&url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.send_empty()
            }
            _ => {
                let mut r = self.agent.get(&url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
        };
        let mut resp = result.map_err(|e| self.transport_error(e))?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_BODY)
            .read_to_string()
            .map_err(|e| self.transport_error(e))?;
        Ok((status, body))
    }

    fn transport_error(&self, e: ureq::Error) -> ApiError {
        match e {
            ureq::Error::BadUri(reason) => ApiError::BadAddress {
                admin: self.admin.clone(),
                reason,
            },
            ureq::Error::Http(e) => ApiError::BadAddress {
                admin: self.admin.clone(),
                reason: e.to_string(),
            },
            other => ApiError::Unreachable {
                admin: self.admin.clone(),
                reason: other.to_string(),
            },
        }
    }

    /// `GET path`, expecting 200; the raw body.
    pub fn get_text(&self, path: &str) -> Result<String, ApiError> {
        let (status, body) = self.send("GET", path)?;
        if status != 200 {
            return Err(ApiError::Status {
                admin: self.admin.clone(),
                request: format!("GET {path}"),
                status,
                body: body.trim().to_string(),
            });
        }
        Ok(body)
    }

    /// `GET path`, expecting 200 and JSON of type `T`; the parsed value and the raw body.
    pub fn get_json<T: for<'de> Deserialize<'de>>(
        &self,
        path: &str,
    ) -> Result<(T, String), ApiError> {
        let body = self.get_text(path)?;
        let value = serde_json::from_str(&body).map_err(|e| ApiError::Unexpected {
            admin: self.admin.clone(),
            request: format!("GET {path}"),
            reason: e.to_string(),
        })?;
        Ok((value, body))
    }

    /// `POST /reload`: pcpd's message, or [`ApiError::Refused`] with its reason.
    pub fn reload(&self) -> Result<String, ApiError> {
        self.command("reload", "/reload", "reloaded")
    }

    /// `POST /ha/promote`: make a backup active now.
    pub fn promote(&self) -> Result<String, ApiError> {
        self.command("promote", "/ha/promote", "promoted")
    }

    /// `POST /ha/switchover`: the active hands over to its ready backup.
    pub fn switchover(&self) -> Result<String, ApiError> {
        self.command("switchover", "/ha/switchover", "handing over to the backup")
    }

    /// `DELETE /auth/sessions/{id}`: terminate a PA session (SESSION_TERMINATED).
    pub fn terminate(&self, id: u32) -> Result<String, ApiError> {
        self.command_with(
            "DELETE",
            "terminate",
            &format!("/auth/sessions/{id}"),
            "terminated",
        )
    }

    /// [`Client::command_with`] for `POST`.
    fn command(
        &self,
        command: &'static str,
        path: &str,
        default: &str,
    ) -> Result<String, ApiError> {
        self.command_with("POST", command, path, default)
    }

    /// A mutating `method path` answered `{"ok": true, "message": …}` (pcpd's message,
    /// or `default`) or `{"ok": false, "error": …}` ([`ApiError::Refused`]: 409 for the
    /// HA commands, 422 for reload, 404 for an unknown PA session).
    fn command_with(
        &self,
        method: &str,
        command: &'static str,
        path: &str,
        default: &str,
    ) -> Result<String, ApiError> {
        let request = format!("{method} {path}");
        let (status, body) = self.send(method, path)?;
        let parsed: Option<CommandAnswer> = serde_json::from_str(&body).ok();
        match (status, parsed) {
            (
                200,
                Some(CommandAnswer {
                    ok: true, message, ..
                }),
            ) => Ok(message.unwrap_or_else(|| default.into())),
            (
                _,
                Some(CommandAnswer {
                    ok: false, error, ..
                }),
            ) => Err(ApiError::Refused {
                command,
                reason: error.unwrap_or_else(|| format!("HTTP {status}, no reason given")),
            }),
            (200, _) => Err(ApiError::Unexpected {
                admin: self.admin.clone(),
                request,
                reason: format!("not a command answer: {}", body.trim()),
            }),
            (status, _) => Err(ApiError::Status {
                admin: self.admin.clone(),
                request,
                status,
                body: body.trim().to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_become_urls() {
        let t = Duration::from_secs(1);
        assert_eq!(
            Client::new("127.0.0.1:8351", t).unwrap().base,
            "http://127.0.0.1:8351"
        );
        assert_eq!(
            Client::new("http://[::1]:8351/", t).unwrap().base,
            "http://[::1]:8351"
        );
        assert!(matches!(
            Client::new("https://127.0.0.1:1", t),
            Err(ApiError::BadAddress { .. })
        ));
        assert!(matches!(
            Client::new(" ", t),
            Err(ApiError::BadAddress { .. })
        ));
    }

    #[test]
    fn a_mapping_parses_from_the_daemon_json() {
        let json = r#"{"opcode":"map","client":"10.0.0.2","protocol":17,
            "internal_address":"10.0.0.2","internal_port":5060,
            "external_address":"192.0.2.1","external_port":40000,
            "remote_address":null,"remote_port":null,"lifetime_remaining":3599,
            "lifetime":3600,"checkpointed":true,"checkpoint_requested":true,
            "checkpoint_reason":"requested","checkpoint_detail":"requested by the client",
            "subscriber":"10.0.0.2/32","filters":[],"description":null,"age":1}"#;
        let m: Mapping = serde_json::from_str(json).unwrap();
        assert_eq!(m.external_port, 40000);
        assert!(m.checkpointed);
        assert_eq!(m.remote_address, None);
    }

    #[test]
    fn a_missing_required_field_is_an_error() {
        let json = r#"{"opcode":"map"}"#;
        assert!(serde_json::from_str::<Mapping>(json).is_err());
    }

    #[test]
    fn ha_parses_from_the_daemon_json() {
        let json = r#"{"enabled":true,"role":"backup","term":2,"peer_connected":true,
            "ready":true,"lag":0,"held_responses":0,"released_responses":0,
            "ack_timeouts":0,"stored":12,"backup_status":"not_ready","adopted":0}"#;
        let h: Ha = serde_json::from_str(json).unwrap();
        assert_eq!(h.role, "backup");
        assert_eq!(h.stored, 12);
        assert!(serde_json::from_str::<Ha>(r#"{"enabled":true}"#).is_err());
    }

    #[test]
    fn refusals_name_the_command() {
        let e = ApiError::Refused {
            command: "promote",
            reason: "this node is already active".into(),
        };
        assert_eq!(
            e.to_string(),
            "promote refused: this node is already active"
        );
    }

    #[test]
    fn unreachable_names_the_address() {
        let e = ApiError::Unreachable {
            admin: "127.0.0.1:9".into(),
            reason: "connection refused".into(),
        };
        assert_eq!(
            e.to_string(),
            "cannot reach pcpd admin API at 127.0.0.1:9: connection refused"
        );
    }
}
