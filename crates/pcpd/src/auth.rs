//! PCP authentication in pcpd (RFC 7652, docs/AUTH.md): the `[auth]` section, the gate
//! in front of the server core (`off | optional | required` per source prefix), the
//! embedded EAP-TTLS back end, and the task that runs the PA sessions' timers.
//!
//! The gate has its own lock. It may be taken while holding the core's or the pair's
//! (held replies are tagged when they are finally sent, docs/AUTH.md), so the core's
//! and the pair's are never taken while holding the gate's.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use pcp_auth::eap::{AuthStep, EapAuthenticator};
use pcp_auth::gate::{Gate, Mode, Rules};
use pcp_auth::server::{Server, ServerConfig as SessionConfig, Transmit};
use pcp_eap::radius::{RadiusAuthenticator, RadiusClient, RadiusConfig, RadiusError};
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
    /// RADIUS pass-through to an AAA server instead of the embedded back end.
    pub radius: Option<RadiusSection>,
}

/// `[auth.radius]`: the AAA server that runs EAP-TTLS (docs/AUTH.md).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RadiusSection {
    /// The AAA server's authentication address, e.g. `"192.0.2.5:1812"`.
    pub server: SocketAddr,
    /// File holding the shared secret (first line).
    pub secret_file: PathBuf,
    /// NAS-Identifier sent in every Access-Request.
    #[serde(default = "default_nas_identifier")]
    pub nas_identifier: String,
    /// Milliseconds before an Access-Request is sent again.
    #[serde(default = "default_radius_timeout")]
    pub timeout_ms: u64,
    /// Transmissions of one Access-Request before the authentication fails.
    #[serde(default = "default_radius_tries")]
    pub tries: u32,
}

fn default_nas_identifier() -> String {
    "pcpd".into()
}

fn default_radius_timeout() -> u64 {
    1000
}

fn default_radius_tries() -> u32 {
    3
}

/// Why the authentication back end cannot start.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The embedded back end's files.
    #[error(transparent)]
    Embedded(#[from] pcp_eap::BackendError),
    /// The RADIUS back end's secret.
    #[error(transparent)]
    Radius(#[from] RadiusError),
    /// The RADIUS socket.
    #[error("auth.radius: cannot open a UDP socket towards {server}: {error}")]
    Socket {
        /// The AAA server.
        server: SocketAddr,
        /// What the OS said.
        error: std::io::Error,
    },
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
            radius: None,
        }
    }
}

impl AuthSection {
    /// Whether any source can authenticate.
    pub fn enabled(&self) -> bool {
        self.default != AuthMode::Off || self.prefixes.iter().any(|p| p.auth != AuthMode::Off)
    }

    /// The first problem, as (key, message), for the config loader.
    pub fn problem(&self) -> Option<(&'static str, String)> {
        if !self.enabled() {
            return None;
        }
        if let Some(r) = &self.radius {
            for (key, v) in [
                ("auth.certificate", &self.certificate),
                ("auth.key", &self.key),
                ("auth.credentials", &self.credentials),
            ] {
                if v.is_some() {
                    return Some((
                        key,
                        "belongs to the embedded back end; with [auth.radius] the AAA server holds certificate and credentials".into(),
                    ));
                }
            }
            if r.tries == 0 || r.timeout_ms == 0 {
                return Some((
                    "auth.radius.tries",
                    "tries and timeout_ms must be at least 1".into(),
                ));
            }
            if r.nas_identifier.is_empty() || r.nas_identifier.len() > 253 {
                return Some(("auth.radius.nas_identifier", "1 to 253 octets".into()));
            }
        } else {
            for (key, v) in [
                ("auth.certificate", &self.certificate),
                ("auth.key", &self.key),
                ("auth.credentials", &self.credentials),
            ] {
                if v.is_none() {
                    return Some((
                        key,
                        "required when any source has auth on (or configure [auth.radius])".into(),
                    ));
                }
            }
        }
        if self.session_lifetime == 0 {
            return Some(("auth.session_lifetime", "must be at least 1".into()));
        }
        None
    }
}

/// The EAP authenticator of one PA conversation, of whichever back end is configured.
#[derive(Debug)]
pub enum Backend {
    /// EAP-TTLS here.
    Embedded(Box<TtlsAuthenticator>),
    /// Passed through to a RADIUS server.
    Radius(RadiusAuthenticator),
}

impl EapAuthenticator for Backend {
    fn start(&mut self) -> Vec<u8> {
        match self {
            Backend::Embedded(a) => a.start(),
            Backend::Radius(a) => a.start(),
        }
    }
    fn receive(&mut self, packet: &[u8]) -> AuthStep {
        match self {
            Backend::Embedded(a) => a.receive(packet),
            Backend::Radius(a) => a.receive(packet),
        }
    }
}

type Factory = Box<dyn FnMut() -> Backend + Send>;

/// The RADIUS leg: its socket and the requests in flight.
pub struct Radius {
    client: RadiusClient,
    /// Connected to the AAA server.
    pub sock: Arc<UdpSocket>,
}

/// A PA session change for the backup (pair mode, docs/AUTH.md "Pair mode").
#[derive(Debug, Clone, PartialEq)]
pub enum SessionChange {
    /// Established or re-authenticated: the whole session.
    Up(pcp_ha::wire::SessionRecord),
    /// Sequence numbers after authenticated requests.
    Seq(u32, pcp_ha::wire::SequenceRecord),
    /// Ended.
    End(u32),
}

/// The record replicated for an exported session.
pub fn session_record(s: &pcp_auth::server::SessionState) -> pcp_ha::wire::SessionRecord {
    pcp_ha::wire::SessionRecord {
        session_id: s.session_id,
        client: s.client,
        identity: s.identity.clone(),
        nonce: s.nonce,
        key_id: s.key_id,
        key: s.key,
        prf: s.prf,
        mac: s.mac,
        remaining_ms: u32::try_from(s.remaining_ms).unwrap_or(u32::MAX),
        pa_in: s.pa_in,
        pa_out: s.pa_out,
        sequence: sequence_record(&s.sequence),
    }
}

fn sequence_record(s: &pcp_auth::server::SequenceState) -> pcp_ha::wire::SequenceRecord {
    pcp_ha::wire::SequenceRecord {
        last_in: s.last_in,
        next_out: s.next_out,
    }
}

/// The session state of a replicated record.
pub fn session_state(r: &pcp_ha::wire::SessionRecord) -> pcp_auth::server::SessionState {
    pcp_auth::server::SessionState {
        session_id: r.session_id,
        client: r.client,
        identity: r.identity.clone(),
        nonce: r.nonce,
        key_id: r.key_id,
        key: r.key,
        prf: r.prf,
        mac: r.mac,
        remaining_ms: u64::from(r.remaining_ms),
        pa_in: r.pa_in,
        pa_out: r.pa_out,
        sequence: pcp_auth::server::SequenceState {
            last_in: r.sequence.last_in,
            next_out: r.sequence.next_out,
        },
    }
}

/// The gate and its clock.
pub struct Auth {
    /// The gate.
    pub gate: Gate<Backend, Factory>,
    origin: Instant,
    /// The listen socket each client's PA messages came in on: answers and
    /// retransmissions leave from the address the client talks to.
    routes: HashMap<SocketAddr, usize>,
    /// The RADIUS back end, when configured.
    pub radius: Option<Radius>,
    /// Pair mode with `[ha] replicate_sessions`: session changes are queued for the
    /// backup ([`Auth::take_replication`]).
    pub replicate: bool,
    /// Session changes not yet handed to the HA node.
    changes: Vec<SessionChange>,
}

/// Shared handle.
pub type SharedAuth = Arc<Mutex<Auth>>;

/// Locks the gate; a poisoned lock (a panic elsewhere) leaves usable state.
pub fn lock(a: &SharedAuth) -> MutexGuard<'_, Auth> {
    a.lock().unwrap_or_else(|p| p.into_inner())
}

impl Auth {
    /// Builds the gate from a validated section: loads certificate, key and credentials,
    /// or the RADIUS secret and opens the RADIUS socket (inside the runtime).
    pub fn build(s: &AuthSection) -> Result<Option<SharedAuth>, BuildError> {
        if !s.enabled() {
            return Ok(None);
        }
        let (factory, radius): (Factory, _) = match &s.radius {
            Some(r) => {
                let cfg = Arc::new(RadiusConfig {
                    server: r.server.to_string(),
                    secret: pcp_eap::radius::load_secret(&r.secret_file)?,
                    nas_identifier: r.nas_identifier.clone(),
                    timeout_ms: r.timeout_ms,
                    tries: r.tries,
                });
                let sock = radius_socket(r.server).map_err(|error| BuildError::Socket {
                    server: r.server,
                    error,
                })?;
                let c = cfg.clone();
                (
                    Box::new(move || Backend::Radius(RadiusAuthenticator::new(c.clone()))),
                    Some(Radius {
                        client: RadiusClient::new(cfg),
                        sock: Arc::new(sock),
                    }),
                )
            }
            None => {
                let (Some(cert), Some(key), Some(creds)) = (&s.certificate, &s.key, &s.credentials)
                else {
                    return Ok(None);
                };
                let backend = Embedded::load(cert, key, creds)?;
                (
                    Box::new(move || Backend::Embedded(Box::new(backend.authenticator()))),
                    None,
                )
            }
        };
        let cfg = SessionConfig {
            session_lifetime: s.session_lifetime,
            max_sessions: s.max_sessions,
            ..SessionConfig::default()
        };
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
            radius,
            replicate: false,
            changes: Vec::new(),
        }))))
    }

    /// Hands the Access-Requests of sessions that went to the back end to the RADIUS
    /// client: the datagrams to send to the AAA server.
    pub fn backend_requests(&mut self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let now = self.now();
        while let Some(id) = self.gate.server.poll_backend() {
            let req = match self.gate.server.authenticator_mut(id) {
                Some(Backend::Radius(a)) => a.take_request(),
                _ => None,
            };
            let (Some(req), Some(r)) = (req, self.radius.as_mut()) else {
                continue;
            };
            match r.client.send(id, &req, now.0) {
                Some(d) => out.push(d),
                None => {
                    tracing::warn!(
                        session_id = id,
                        "RADIUS: 256 requests in flight, the AAA server is far behind; authentication failed"
                    );
                    self.gate.server.resume(now, id, fail_radius);
                }
            }
        }
        out
    }

    /// A datagram from the AAA server.
    pub fn radius_datagram(&mut self, datagram: &[u8]) {
        let now = self.now();
        let Some(r) = self.radius.as_mut() else {
            return;
        };
        match r.client.receive(datagram) {
            Ok(Some((id, answer))) => {
                if let Err(e) = &answer {
                    tracing::warn!(session_id = id, error = %e, "RADIUS");
                }
                self.gate.server.resume(now, id, |a| match a {
                    Backend::Radius(r) => r.answer(answer),
                    Backend::Embedded(_) => AuthStep::Discard,
                });
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "RADIUS"),
        }
    }

    /// RADIUS retransmissions due (datagrams to send) and sessions given up on.
    fn radius_timeout(&mut self) -> (Vec<Vec<u8>>, Option<u64>) {
        let now = self.now();
        let Some(r) = self.radius.as_mut() else {
            return (Vec::new(), None);
        };
        let (again, failed) = r.client.handle_timeout(now.0);
        let next = r.client.poll_timeout();
        for (id, answer) in failed {
            if let Err(e) = &answer {
                tracing::warn!(session_id = id, error = %e, "RADIUS");
            }
            self.gate.server.resume(now, id, |a| match a {
                Backend::Radius(r) => r.answer(answer),
                Backend::Embedded(_) => AuthStep::Discard,
            });
        }
        (again, next)
    }

    /// Now on the gate's clock.
    pub fn now(&self) -> pcp_auth::Time {
        pcp_auth::Time(u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    /// Logs what happened to PA sessions (and queues it for the backup in pair mode).
    pub fn log_events(&mut self) {
        let now = self.now();
        while let Some(e) = self.gate.server.poll_event() {
            if self.replicate {
                match &e {
                    pcp_auth::server::ServerEvent::Established { session_id, .. }
                    | pcp_auth::server::ServerEvent::Reauthenticated { session_id, .. } => {
                        if let Some(st) = self.gate.server.export(*session_id, now) {
                            self.changes.push(SessionChange::Up(session_record(&st)));
                        }
                    }
                    pcp_auth::server::ServerEvent::Ended { session_id, .. } => {
                        self.changes.push(SessionChange::End(*session_id));
                    }
                }
            }
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

    /// Pair mode: the session changes for the backup since the last call, then the
    /// sequence numbers of the sessions that authenticated `served` requests (after
    /// their replies were tagged). Empty unless [`Auth::replicate`].
    pub fn take_replication(&mut self, served: &[Option<u32>]) -> Vec<SessionChange> {
        if !self.replicate {
            return Vec::new();
        }
        let mut out = std::mem::take(&mut self.changes);
        let mut seen: Vec<u32> = Vec::new();
        for id in served.iter().flatten() {
            if seen.contains(id) {
                continue;
            }
            seen.push(*id);
            if let Some(s) = self.gate.server.sequence_state(*id) {
                out.push(SessionChange::Seq(*id, sequence_record(&s)));
            }
        }
        out
    }

    /// The sequence numbers of session `id` for the backup now, when sessions are
    /// replicated.
    pub fn sequence_for_backup(&self, id: u32) -> Option<pcp_ha::wire::SequenceRecord> {
        if !self.replicate {
            return None;
        }
        self.gate
            .server
            .sequence_state(id)
            .map(|s| sequence_record(&s))
    }

    /// The whole of session `id` for the backup now, when sessions are replicated.
    pub fn session_for_backup(&self, id: u32) -> Option<pcp_ha::wire::SessionRecord> {
        if !self.replicate {
            return None;
        }
        let st = self.gate.server.export(id, self.now())?;
        Some(session_record(&st))
    }

    /// A takeover: the sessions the backup held replace whatever this gate had, so
    /// their clients carry on without authenticating again (docs/AUTH.md).
    pub fn adopt_sessions(&mut self, sessions: &[pcp_ha::wire::SessionRecord]) {
        let now = self.now();
        self.gate.server.forget_all();
        self.changes.clear();
        let mut adopted = 0usize;
        for r in sessions {
            match self.gate.server.import(now, &session_state(r)) {
                Ok(()) => adopted += 1,
                Err(e) => {
                    tracing::warn!(session_id = r.session_id, error = %e, "replicated PA session not adopted")
                }
            }
        }
        if !sessions.is_empty() {
            tracing::info!(
                sessions = adopted,
                "PA sessions adopted at the takeover: their clients carry on without authenticating again"
            );
        }
    }

    /// Stepping down: the new active holds the sessions (and sends them back with its
    /// full copy); this node's are stale.
    pub fn drop_sessions(&mut self) {
        self.gate.server.forget_all();
        self.changes.clear();
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

fn fail_radius(a: &mut Backend) -> AuthStep {
    match a {
        Backend::Radius(r) => r.answer(Err(RadiusError::Timeout {
            server: String::new(),
            tries: 0,
        })),
        Backend::Embedded(_) => AuthStep::Discard,
    }
}

/// A UDP socket connected to the AAA server (only its answers come in).
fn radius_socket(server: SocketAddr) -> std::io::Result<UdpSocket> {
    let local: SocketAddr = if server.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = std::net::UdpSocket::bind(local)?;
    s.connect(server)?;
    s.set_nonblocking(true)?;
    UdpSocket::from_std(s)
}

/// Sends Access-Requests.
pub async fn send_radius(sock: &UdpSocket, out: Vec<Vec<u8>>) {
    for d in out {
        if let Err(e) = sock.send(&d).await {
            tracing::warn!(error = %e, "RADIUS send");
        }
    }
}

/// Receives the AAA server's answers.
pub async fn radius_receiver(auth: SharedAuth, sockets: Vec<Arc<UdpSocket>>) {
    let Some(sock) = lock(&auth).radius.as_ref().map(|r| r.sock.clone()) else {
        return;
    };
    let mut buf = vec![0u8; pcp_eap::radius::MAX_PACKET];
    loop {
        let n = match sock.recv(&mut buf).await {
            Ok(n) => n,
            // ICMP port unreachable and the like: the retransmission timer decides.
            Err(e) => {
                tracing::debug!(error = %e, "RADIUS recv");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let (out, radius_out) = {
            let mut a = lock(&auth);
            a.radius_datagram(&buf[..n]);
            a.log_events();
            let r = a.backend_requests();
            (a.transmits(), r)
        };
        send_radius(&sock, radius_out).await;
        send_all(&sockets, out).await;
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
    let radius_sock = lock(&auth).radius.as_ref().map(|r| r.sock.clone());
    loop {
        let (out, radius_out, wake) = {
            let mut a = lock(&auth);
            let now = a.now();
            a.gate.server.handle_timeout(now);
            let (mut radius_out, radius_next) = a.radius_timeout();
            radius_out.extend(a.backend_requests());
            a.log_events();
            let out = a.transmits();
            let next = [a.gate.server.poll_timeout().map(|t| t.0), radius_next]
                .into_iter()
                .flatten()
                .min();
            let wait = next.map_or(Duration::from_secs(1), |t| {
                Duration::from_millis(t.saturating_sub(now.0)).min(Duration::from_secs(1))
            });
            (
                out,
                radius_out,
                Instant::now() + wait.max(Duration::from_millis(5)),
            )
        };
        if let Some(sock) = &radius_sock {
            send_radius(sock, radius_out).await;
        }
        send_all(&sockets, out).await;
        tokio::time::sleep_until(wake.into()).await;
    }
}
