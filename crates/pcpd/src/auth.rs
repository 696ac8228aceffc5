//! PCP authentication in pcpd (RFC 7652, docs/AUTH.md): the `[auth]` section, the gate
//! in front of the server core (`off | optional | required` per source prefix), the
//! embedded EAP-TTLS back end, and the task that runs the PA sessions' timers.
//!
//! The gate has its own lock, taken before the core's and never while holding it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use pcp_auth::gate::{Gate, Mode, Rules};
use pcp_auth::server::{Server, ServerConfig as SessionConfig, Transmit};
use pcp_eap::{Embedded, TtlsAuthenticator};
use serde::Deserialize;
use tokio::net::UdpSocket;

/// `off`, `optional` or `required`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// No RFC 7652: AUTHENTICATION is UNSUPP_OPCODE, tagged requests UNSUPP_OPTION.
    #[default]
    Off,
    /// Tagged and untagged requests are served; tags must verify.
    Optional,
    /// Only requests with a valid tag are served.
    Required,
}

impl From<AuthMode> for Mode {
    fn from(m: AuthMode) -> Mode {
        match m {
            AuthMode::Off => Mode::Off,
            AuthMode::Optional => Mode::Optional,
            AuthMode::Required => Mode::Required,
        }
    }
}

/// One `[[auth.prefixes]]` entry.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuthPrefix {
    /// Source prefix.
    pub prefix: IpNet,
    /// Its mode.
    pub auth: AuthMode,
}

/// The `[auth]` section.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSection {
    /// Mode of sources no prefix entry matches.
    pub default: AuthMode,
    /// Modes per source prefix, longest prefix wins.
    pub prefixes: Vec<AuthPrefix>,
    /// PEM certificate chain of the EAP-TTLS server.
    pub certificate: Option<PathBuf>,
    /// PEM private key of that certificate.
    pub key: Option<PathBuf>,
    /// Credentials file (`name:$argon2id$...` lines).
    pub credentials: Option<PathBuf>,
    /// SESSION_LIFETIME granted, in seconds.
    pub session_lifetime: u32,
    /// Most PA sessions at once.
    pub max_sessions: usize,
    /// Open a server-initiated session when answering AUTHENTICATION_REQUIRED.
    pub server_initiated: bool,
}

impl Default for AuthSection {
    fn default() -> Self {
        AuthSection {
            default: AuthMode::Off,
            prefixes: Vec::new(),
            certificate: None,
            key: None,
            credentials: None,
            session_lifetime: 3600,
            max_sessions: 65_536,
            server_initiated: false,
        }
    }
}

impl AuthSection {
    /// Whether any source can authenticate.
    pub fn enabled(&self) -> bool {
        self.default != AuthMode::Off || self.prefixes.iter().any(|p| p.auth != AuthMode::Off)
    }

    /// The first problem, as (key, message), for the config loader.
    pub fn problem(&self, pair_mode: bool) -> Option<(&'static str, String)> {
        if !self.enabled() {
            return None;
        }
        if pair_mode {
            return Some((
                "auth",
                "authentication is not supported in pair mode yet (docs/AUTH.md)".into(),
            ));
        }
        for (key, v) in [
            ("auth.certificate", &self.certificate),
            ("auth.key", &self.key),
            ("auth.credentials", &self.credentials),
        ] {
            if v.is_none() {
                return Some((key, "required when any source has auth on".into()));
            }
        }
        if self.session_lifetime == 0 {
            return Some(("auth.session_lifetime", "must be at least 1".into()));
        }
        None
    }
}

type Factory = Box<dyn FnMut() -> TtlsAuthenticator + Send>;

/// The gate and its clock.
pub struct Auth {
    /// The gate.
    pub gate: Gate<TtlsAuthenticator, Factory>,
    origin: Instant,
    /// The listen socket each client's PA messages came in on: answers and
    /// retransmissions leave from the address the client talks to.
    routes: HashMap<SocketAddr, usize>,
}

/// Shared handle.
pub type SharedAuth = Arc<Mutex<Auth>>;

/// Locks the gate; a poisoned lock (a panic elsewhere) leaves usable state.
pub fn lock(a: &SharedAuth) -> MutexGuard<'_, Auth> {
    a.lock().unwrap_or_else(|p| p.into_inner())
}

impl Auth {
    /// Builds the gate from a validated section: loads certificate, key and credentials.
    pub fn build(s: &AuthSection) -> Result<Option<SharedAuth>, pcp_eap::BackendError> {
        if !s.enabled() {
            return Ok(None);
        }
        let (Some(cert), Some(key), Some(creds)) = (&s.certificate, &s.key, &s.credentials) else {
            return Ok(None);
        };
        let backend = Embedded::load(cert, key, creds)?;
        let cfg = SessionConfig {
            session_lifetime: s.session_lifetime,
            max_sessions: s.max_sessions,
            ..SessionConfig::default()
        };
        let factory: Factory = Box::new(move || backend.authenticator());
        let rules = Rules {
            default: s.default.into(),
            prefixes: s
                .prefixes
                .iter()
                .map(|p| (p.prefix, p.auth.into()))
                .collect(),
        };
        let mut gate = Gate::new(rules, Server::new(cfg, factory));
        gate.initiate = s.server_initiated;
        Ok(Some(Arc::new(Mutex::new(Auth {
            gate,
            origin: Instant::now(),
            routes: HashMap::new(),
        }))))
    }

    /// Now on the gate's clock.
    pub fn now(&self) -> pcp_auth::Time {
        pcp_auth::Time(u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    /// Logs what happened to PA sessions.
    pub fn log_events(&mut self) {
        while let Some(e) = self.gate.server.poll_event() {
            match e {
                pcp_auth::server::ServerEvent::Established {
                    session_id,
                    client,
                    identity,
                    lifetime,
                } => {
                    tracing::info!(session_id, %client, %identity, lifetime, "PCP authentication succeeded")
                }
                pcp_auth::server::ServerEvent::Reauthenticated {
                    session_id,
                    identity,
                } => {
                    tracing::info!(session_id, %identity, "PCP re-authentication succeeded")
                }
                pcp_auth::server::ServerEvent::Ended { session_id, cause } => {
                    tracing::info!(session_id, ?cause, "PCP authentication session ended")
                }
            }
        }
    }

    /// Remembers that `client` talks to listen socket `socket`.
    pub fn route(&mut self, client: SocketAddr, socket: usize) {
        // Bounded: forget everything when it outgrows the session table.
        if self.routes.len() > 2 * self.gate.server.session_count() + 1024 {
            self.routes.clear();
        }
        self.routes.insert(client, socket);
    }

    /// The PA messages to send, each with the index of the socket to send it from.
    pub fn transmits(&mut self) -> Vec<(Option<usize>, Transmit)> {
        std::iter::from_fn(|| self.gate.poll_transmit())
            .map(|t| (self.routes.get(&t.dst).copied(), t))
            .collect()
    }
}

/// Appends the gate's counters to the Prometheus text.
pub fn render_metrics(out: &mut String, s: &pcp_auth::gate::GateStats) {
    use std::fmt::Write;
    let _ = writeln!(
        out,
        "# HELP pcp_auth_requests_total Common requests seen by the authentication gate, by outcome."
    );
    let _ = writeln!(out, "# TYPE pcp_auth_requests_total counter");
    for (outcome, n) in [
        ("authenticated", s.authenticated),
        ("authentication_required", s.required),
        ("unknown_session", s.unknown_session),
        ("replayed", s.replayed),
        ("bad_tag", s.bad_tag),
    ] {
        let _ = writeln!(out, "pcp_auth_requests_total{{outcome=\"{outcome}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP pcp_auth_pa_messages_total PA messages received."
    );
    let _ = writeln!(out, "# TYPE pcp_auth_pa_messages_total counter");
    let _ = writeln!(out, "pcp_auth_pa_messages_total {}", s.pa_messages());
}

/// The listen socket to send to `dst` from: the first of its address family.
pub fn socket_for(sockets: &[Arc<UdpSocket>], dst: SocketAddr) -> Option<&Arc<UdpSocket>> {
    sockets
        .iter()
        .find(|s| s.local_addr().is_ok_and(|a| a.is_ipv4() == dst.is_ipv4()))
}

/// Sends PA messages.
pub async fn send_all(sockets: &[Arc<UdpSocket>], out: Vec<(Option<usize>, Transmit)>) {
    for (socket, t) in out {
        let sock = socket
            .and_then(|i| sockets.get(i))
            .or_else(|| socket_for(sockets, t.dst));
        if let Some(sock) = sock
            && let Err(e) = sock.send_to(&t.payload, t.dst).await
        {
            tracing::debug!(error = %e, dst = %t.dst, "PA send_to");
        }
    }
}

/// Runs the PA sessions' timers (retransmissions, expiry, re-authentication).
pub async fn timers(auth: SharedAuth, sockets: Vec<Arc<UdpSocket>>) {
    loop {
        let (out, wake) = {
            let mut a = lock(&auth);
            let now = a.now();
            a.gate.server.handle_timeout(now);
            a.log_events();
            let out = a.transmits();
            let next = a.gate.server.poll_timeout();
            let wait = next.map_or(Duration::from_secs(1), |t| {
                Duration::from_millis(t.0.saturating_sub(now.0)).min(Duration::from_secs(1))
            });
            (out, Instant::now() + wait.max(Duration::from_millis(5)))
        };
        send_all(&sockets, out).await;
        tokio::time::sleep_until(wake.into()).await;
    }
}
