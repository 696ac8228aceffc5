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
use pcp_auth::server::{
    Cause, Server, ServerConfig as SessionConfig, ServerEvent, SessionState, Transmit,
};
use pcp_eap::radius::{RadiusAuthenticator, RadiusConfig, RadiusError};
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
    /// Most sessions still authenticating (no SA yet) per source /24 (IPv4) or /56
    /// (IPv6), so that one network cannot fill `max_sessions` (docs/AUTH.md, S4).
    pub max_half_open_per_prefix: usize,
    /// Open a server-initiated session when answering AUTHENTICATION_REQUIRED.
    pub server_initiated: bool,
    /// RADIUS pass-through to an AAA server instead of the embedded back end.
    pub radius: Option<RadiusSection>,
    /// Failed-attempt limits per identity and per source address.
    pub attempts: crate::limit::AttemptsSection,
}

/// `[auth.radius]`: the AAA servers that run EAP-TTLS (docs/AUTH.md).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RadiusSection {
    /// One AAA server's authentication address, e.g. `"192.0.2.5:1812"`.
    #[serde(default)]
    pub server: Option<SocketAddr>,
    /// AAA servers in order of preference (failover, docs/AUTH.md): addresses, or
    /// `{ address = "...", secret_file = "..." }` for a server with its own secret.
    #[serde(default)]
    pub servers: Vec<AaaServerEntry>,
    /// File holding the shared secret (first line), for servers without their own.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// NAS-Identifier sent in every Access-Request.
    #[serde(default = "default_nas_identifier")]
    pub nas_identifier: String,
    /// Milliseconds before an Access-Request is sent again.
    #[serde(default = "default_radius_timeout")]
    pub timeout_ms: u64,
    /// Transmissions of one Access-Request to one server before it counts as dead.
    #[serde(default = "default_radius_tries")]
    pub tries: u32,
    /// Seconds a server that did not answer is passed over before it is tried again.
    #[serde(default = "default_dead_time")]
    pub dead_time_s: u64,
}

/// One entry of `auth.radius.servers`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum AaaServerEntry {
    /// `"192.0.2.5:1812"`: with `auth.radius.secret_file`.
    Address(SocketAddr),
    /// `{ address = "192.0.2.5:1812", secret_file = "/etc/pcpd/aaa1-secret" }`.
    WithSecret(AaaServerTable),
}

/// A server with its own shared secret.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AaaServerTable {
    /// Authentication address.
    pub address: SocketAddr,
    /// Its shared secret (first line); `auth.radius.secret_file` when absent.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
}

impl RadiusSection {
    /// The AAA servers in order of preference, each with the secret file it uses.
    pub fn server_list(&self) -> Vec<(SocketAddr, Option<&PathBuf>)> {
        self.server
            .iter()
            .map(|a| (*a, self.secret_file.as_ref()))
            .chain(self.servers.iter().map(|e| match e {
                AaaServerEntry::Address(a) => (*a, self.secret_file.as_ref()),
                AaaServerEntry::WithSecret(t) => (
                    t.address,
                    t.secret_file.as_ref().or(self.secret_file.as_ref()),
                ),
            }))
            .collect()
    }
}

fn default_dead_time() -> u64 {
    30
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
    /// The embedded back end's files, with the key that names the bad one.
    #[error("{key}: {source}")]
    Embedded {
        /// `auth.certificate`, `auth.key` or `auth.credentials`.
        key: &'static str,
        /// What is wrong, with the file (and line, for credentials).
        source: pcp_eap::BackendError,
    },
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
            max_half_open_per_prefix: SessionConfig::default().max_half_open_per_prefix,
            server_initiated: false,
            radius: None,
            attempts: crate::limit::AttemptsSection::default(),
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
        // Checked with auth off too: a reload may turn it on with these bounds.
        if self.max_sessions == 0 {
            return Some(("auth.max_sessions", "must be at least 1".into()));
        }
        if self.max_half_open_per_prefix == 0 {
            return Some(("auth.max_half_open_per_prefix", "must be at least 1".into()));
        }
        if self.attempts.burst > 0 && self.attempts.every_s == 0 {
            return Some((
                "auth.attempts.every_s",
                "must be at least 1 (or burst = 0 to turn the limit off)".into(),
            ));
        }
        if self.attempts.burst > 0 && self.attempts.identity_burst == 0 {
            return Some((
                "auth.attempts.identity_burst",
                "must be at least 1 (or burst = 0 to turn the limits off)".into(),
            ));
        }
        if self.attempts.max_tracked == 0 {
            return Some(("auth.attempts.max_tracked", "must be at least 1".into()));
        }
        if !self.enabled() {
            return None;
        }
        if let Some(r) = &self.radius {
            let list = r.server_list();
            if list.is_empty() {
                return Some((
                    "auth.radius.servers",
                    "name the AAA server (server = \"ADDR\") or servers (servers = [\"ADDR\", ...])".into(),
                ));
            }
            for (i, (a, secret)) in list.iter().enumerate() {
                if list[..i].iter().any(|(b, _)| b == a) {
                    return Some(("auth.radius.servers", format!("{a} is listed twice")));
                }
                if secret.is_none() {
                    return Some((
                        "auth.radius.secret_file",
                        format!(
                            "no shared secret for {a}: set secret_file (for all) or the server's own"
                        ),
                    ));
                }
            }
            if r.dead_time_s == 0 {
                return Some(("auth.radius.dead_time_s", "must be at least 1".into()));
            }
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
    /// EAP-TTLS here, its work (TLS, Argon2) on the worker pool ([`Job`]).
    Embedded(Offloaded),
    /// Passed through to a RADIUS server.
    Radius(RadiusAuthenticator),
    /// Authentication is off everywhere (no back end configured): the gate sends no
    /// PA message to a session machine then, so this only fails whoever reaches it.
    Off,
}

/// An embedded EAP-TTLS conversation. Its EAP responses are not processed under the
/// gate's lock: [`EapAuthenticator::receive`] queues the response and answers
/// [`AuthStep::Pending`]; [`Auth::backend_requests`] hands it to the worker pool as a
/// [`Job`] and the result comes back through `Server::resume`, so a TLS handshake or
/// an Argon2 verification stalls neither the receive task nor other clients.
#[derive(Debug)]
pub struct Offloaded {
    backend: Embedded,
    conv: Arc<Mutex<TtlsAuthenticator>>,
    /// A new value with every start and response, unique in the process
    /// ([`next_generation`]): a job's result is for this conversation and response
    /// only if its generation is still the current one — also after a
    /// re-authentication gave the session a fresh conversation.
    generation: u64,
    queued: Option<Vec<u8>>,
}

/// A generation no conversation had before. A counter per conversation would start
/// again at 0 in the fresh conversation of a re-authentication, so that a stale job of
/// the old one could match the new one's generation.
fn next_generation() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl Offloaded {
    fn new(backend: Embedded) -> Offloaded {
        Offloaded {
            conv: Arc::new(Mutex::new(backend.authenticator())),
            backend,
            generation: next_generation(),
            queued: None,
        }
    }
}

/// One EAP response of an embedded conversation to process off the gate's lock.
pub struct Job {
    session: u32,
    generation: u64,
    conv: Arc<Mutex<TtlsAuthenticator>>,
    packet: Vec<u8>,
    src: std::net::IpAddr,
    limiter: Arc<Mutex<crate::limit::Limiter>>,
    origin: Instant,
}

/// What a [`Job`] gave.
pub struct Done {
    session: u32,
    generation: u64,
    step: AuthStep,
    /// The identity whose password was checked (or refused unchecked).
    identity: Option<String>,
    /// The failed-attempt limits refused it: not a failed attempt itself.
    refused: bool,
    src: std::net::IpAddr,
}

impl Job {
    /// Runs the TLS and password work (a blocking thread).
    pub fn run(self) -> Done {
        let mut conv = self.conv.lock().unwrap_or_else(|p| p.into_inner());
        let now = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        let source_ok = self
            .limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(None, self.src, now)
            .is_ok();
        // A source out of attempts costs no TLS work either.
        let (step, refused) = if source_ok {
            let (limiter, src, origin) = (self.limiter.clone(), self.src, self.origin);
            conv.set_admission(Some(Arc::new(move |user: &str| {
                let now = u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX);
                limiter
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .admit(Some(user), src, now)
                    .is_ok()
            })));
            let step = conv.receive(&self.packet);
            let refused = matches!(step, AuthStep::Failure { .. })
                && conv.attempted().is_some_and(|(_, r)| r);
            (step, refused)
        } else {
            (conv.refuse(), true)
        };
        Done {
            session: self.session,
            generation: self.generation,
            identity: conv.attempted().map(|(u, _)| u.to_string()),
            refused,
            step,
            src: self.src,
        }
    }
}

impl EapAuthenticator for Backend {
    fn acknowledge_pending(&self) -> bool {
        // A local worker answers within milliseconds; RADIUS may take seconds.
        !matches!(self, Backend::Embedded(_))
    }
    fn start(&mut self) -> Vec<u8> {
        match self {
            Backend::Embedded(o) => {
                // A fresh conversation: a job of the old one may still hold its lock.
                o.generation = next_generation();
                o.queued = None;
                let mut a = o.backend.authenticator();
                let first = a.start();
                o.conv = Arc::new(Mutex::new(a));
                first
            }
            Backend::Radius(a) => a.start(),
            Backend::Off => pcp_eap::packet::failure(0),
        }
    }
    fn receive(&mut self, packet: &[u8]) -> AuthStep {
        match self {
            Backend::Embedded(o) => {
                o.generation = next_generation();
                o.queued = Some(packet.to_vec());
                AuthStep::Pending
            }
            Backend::Radius(a) => a.receive(packet),
            Backend::Off => AuthStep::Failure {
                packet: pcp_eap::packet::failure(0),
            },
        }
    }
}

type Factory = Box<dyn FnMut() -> Backend + Send>;

/// The RADIUS leg: the AAA servers and the requests in flight (`crate::aaa`).
pub struct Radius {
    /// The servers.
    pub pool: crate::aaa::Pool,
    /// The settings it was made from (a reload that keeps them keeps it).
    section: RadiusSection,
    secrets: Vec<Vec<u8>>,
    /// Requests no AAA server could answer, asked again later (docs/AUTH.md, "An
    /// unavailable back end"), by session.
    retries: HashMap<u32, Retry>,
}

/// A request of a session whose back end did not answer.
struct Retry {
    /// The request, until it is sent again (`None` while that copy is in flight).
    req: Option<pcp_eap::radius::AccessRequest>,
    /// Times it was given up on so far.
    attempts: u32,
    /// When to send it again (ms on the gate's clock).
    due: u64,
}

/// First wait before asking the AAA servers again, doubled after each failure up to
/// [`RETRY_MAX_MS`]; the PA session's own limit (the MRD after its PA-Acknowledgement,
/// S1) ends the retries.
const RETRY_FIRST_MS: u64 = 1_000;
const RETRY_MAX_MS: u64 = 16_000;

impl Radius {
    /// Asks again for `session` later, with exponential backoff.
    fn defer(&mut self, session: u32, req: pcp_eap::radius::AccessRequest, now: u64) -> u64 {
        let r = self.retries.entry(session).or_insert(Retry {
            req: None,
            attempts: 0,
            due: now,
        });
        let wait = RETRY_FIRST_MS
            .saturating_mul(1 << r.attempts.min(10))
            .min(RETRY_MAX_MS);
        r.attempts += 1;
        r.req = Some(req);
        r.due = now.saturating_add(wait);
        wait
    }

    /// The session is over or answered: no retry.
    fn settle(&mut self, session: u32) {
        self.retries.remove(&session);
    }

    /// Retries due now, taken out for sending.
    fn due_retries(&mut self, now: u64) -> Vec<(u32, pcp_eap::radius::AccessRequest)> {
        self.retries
            .iter_mut()
            .filter(|(_, r)| r.due <= now)
            .filter_map(|(id, r)| r.req.take().map(|q| (*id, q)))
            .collect()
    }

    /// When the next retry is due.
    fn next_retry(&self) -> Option<u64> {
        self.retries
            .values()
            .filter(|r| r.req.is_some())
            .map(|r| r.due)
            .min()
    }
}

/// Counters of PA sessions for the operator (docs/AUTH.md, "Operating").
#[derive(Debug, Clone, Default)]
pub struct SessionStats {
    /// Sessions that got their first SA.
    pub established: u64,
    /// Sessions that ended without an SA, by cause.
    pub failed: HashMap<&'static str, u64>,
    /// Established sessions that ended, by cause.
    pub ended: HashMap<&'static str, u64>,
    /// Terminations pcpd started, by reason (`admin`, `user_removed`, `auth_off`,
    /// `aaa_gone`).
    pub terminated: HashMap<&'static str, u64>,
    /// Back-end requests asked again because no AAA server answered (or none could
    /// take one more request) — never reported to the client as a failure.
    pub backend_retries: u64,
}

/// One PA session as the admin API shows it (`GET /auth/sessions`): no key material.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SessionView {
    /// Session ID (decimal; `DELETE /auth/sessions/{id}` takes it).
    pub session_id: u32,
    /// The authenticated identity (the subscriber), once authenticated.
    pub identity: Option<String>,
    /// The client's address and port.
    pub client: SocketAddr,
    /// `authenticating`, `reauthenticating`, `confirming`, `established`, `terminating`.
    pub state: &'static str,
    /// When the PA exchange started (Unix seconds).
    pub created_at: u64,
    /// When the client first authenticated (Unix seconds).
    pub established_at: Option<u64>,
    /// When the SA expires (Unix seconds).
    pub expires_at: Option<u64>,
    /// Seconds until then.
    pub expires_in: Option<u64>,
    /// Next PA sequence number expected from the client.
    pub pa_seq_in: u32,
    /// Next PA sequence number this server sends.
    pub pa_seq_out: u32,
    /// Last common-message sequence number accepted from the client.
    pub seq_in: Option<u32>,
    /// Next common-message sequence number of a tagged response.
    pub seq_out: Option<u32>,
    /// Tagged requests of this session accepted.
    pub accepted: u64,
    /// Tagged requests of this session refused (bad tag, replay, wrong address).
    pub refused: u64,
    /// Waiting for the AAA server's answer.
    pub waiting_backend: bool,
}

/// A stable name of why a session ended.
pub fn cause_name(c: Cause) -> &'static str {
    match c {
        Cause::AuthenticationFailed => "authentication_failed",
        Cause::AuthorizationFailed => "authorization_failed",
        Cause::DowngradeDetected => "downgrade_detected",
        Cause::NoCommonAlgorithm => "no_common_algorithm",
        Cause::RefusedByClient => "refused_by_client",
        Cause::ByClient => "by_client",
        Cause::ByServer => "by_server",
        Cause::Expired => "expired",
        Cause::Timeout => "timeout",
    }
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
pub fn session_record(s: &pcp_auth::server::SessionExport) -> pcp_ha::wire::SessionRecord {
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
pub fn session_state(r: &pcp_ha::wire::SessionRecord) -> pcp_auth::server::SessionExport {
    pcp_auth::server::SessionExport {
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
    /// The section in force.
    section: AuthSection,
    /// The embedded back end in force (a reload checks identities against it).
    embedded: Option<Embedded>,
    /// Sessions with an SA (to tell an ended session from a failed one).
    live: std::collections::HashSet<u32>,
    /// Session counters.
    pub stats: SessionStats,
    /// The PCP listen sockets (the RADIUS receiver sends PA messages on them).
    pub sockets: Vec<Arc<UdpSocket>>,
    /// Pair mode with `[ha] replicate_sessions`: session changes are queued for the
    /// backup ([`Auth::take_replication`]).
    pub replicate: bool,
    /// Session changes not yet handed to the HA node.
    changes: Vec<SessionChange>,
    /// Failed-attempt limits (own lock: the worker threads consult it without the
    /// gate's).
    pub limiter: Arc<Mutex<crate::limit::Limiter>>,
    /// The worker pool's queue of embedded EAP work; `None` outside a runtime (the
    /// work then runs in place).
    jobs: Option<Arc<JobPool>>,
}

/// The embedded back end's work waiting for a worker: bounded and fair between
/// sources (`crate::jobs`). Its lock is taken under the gate's, never the reverse.
pub struct JobPool {
    queue: Mutex<crate::jobs::FairQueue<Job>>,
    ready: tokio::sync::Notify,
}

impl JobPool {
    fn new() -> JobPool {
        JobPool {
            queue: Mutex::new(crate::jobs::FairQueue::new(
                crate::jobs::MAX_QUEUED,
                crate::jobs::MAX_PER_SOURCE,
            )),
            ready: tokio::sync::Notify::new(),
        }
    }

    fn queue(&self) -> MutexGuard<'_, crate::jobs::FairQueue<Job>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `job`, or hands it back when the queue is full.
    fn push(&self, job: Job) -> Result<(), Job> {
        let src = job.src;
        self.queue().push(src, job)?;
        self.ready.notify_one();
        Ok(())
    }

    /// The next job, waiting for one.
    async fn next(&self) -> Job {
        loop {
            if let Some(job) = self.queue().pop() {
                return job;
            }
            // A push since the pop left a permit: no wake-up is lost.
            self.ready.notified().await;
        }
    }
}

/// The gate behind its lock, and whether any source can authenticate at all (read
/// without the lock on every datagram, so a pcpd without `[auth]` pays nothing).
pub struct AuthCell {
    on: std::sync::atomic::AtomicBool,
    inner: Mutex<Auth>,
}

impl AuthCell {
    /// Whether any source has authentication on.
    pub fn on(&self) -> bool {
        self.on.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Shared handle.
pub type SharedAuth = Arc<AuthCell>;

/// Locks the gate; a poisoned lock (a panic elsewhere) leaves usable state.
pub fn lock(a: &SharedAuth) -> MutexGuard<'_, Auth> {
    a.inner.lock().unwrap_or_else(|p| p.into_inner())
}

/// A checked `[auth]` section with its files loaded and its socket open, ready to be
/// put in force ([`Auth::build`] at start, [`apply`] on reload). Making one changes
/// nothing, so a reload that fails here leaves the running configuration alone.
pub struct Prepared {
    section: AuthSection,
    backend: PreparedBackend,
}

enum PreparedBackend {
    Off,
    Embedded(Embedded),
    Radius {
        /// Each server's settings, address and socket, in order of preference.
        servers: Vec<(Arc<RadiusConfig>, SocketAddr, UdpSocket)>,
    },
}

/// Loads what `s` names (certificate, key, credentials, or the RADIUS secret) and
/// opens the RADIUS socket.
pub fn prepare(s: &AuthSection) -> Result<Prepared, BuildError> {
    let backend = match (&s.radius, &s.certificate, &s.key, &s.credentials) {
        _ if !s.enabled() => PreparedBackend::Off,
        (Some(r), ..) => {
            let mut servers = Vec::new();
            for (addr, secret_file) in r.server_list() {
                // Config::load refuses a server without a secret (`problem`).
                let Some(secret_file) = secret_file else {
                    continue;
                };
                let cfg = Arc::new(RadiusConfig {
                    server: addr.to_string(),
                    secret: pcp_eap::radius::load_secret(secret_file)?,
                    nas_identifier: r.nas_identifier.clone(),
                    timeout_ms: r.timeout_ms,
                    tries: r.tries,
                });
                let sock = radius_socket(addr).map_err(|error| BuildError::Socket {
                    server: addr,
                    error,
                })?;
                servers.push((cfg, addr, sock));
            }
            PreparedBackend::Radius { servers }
        }
        (None, Some(cert), Some(key), Some(creds)) => {
            PreparedBackend::Embedded(Embedded::load(cert, key, creds).map_err(|source| {
                let key = match &source {
                    pcp_eap::BackendError::Credentials(_) => "auth.credentials",
                    pcp_eap::BackendError::Pem { file, .. }
                        if *file == key.display().to_string() =>
                    {
                        "auth.key"
                    }
                    pcp_eap::BackendError::Pem { .. } => "auth.certificate",
                    _ => "auth.certificate / auth.key",
                };
                BuildError::Embedded { key, source }
            })?)
        }
        // Config::load refuses this (`AuthSection::problem`).
        _ => PreparedBackend::Off,
    };
    Ok(Prepared {
        section: s.clone(),
        backend,
    })
}

fn session_config(s: &AuthSection) -> SessionConfig {
    SessionConfig {
        session_lifetime: s.session_lifetime,
        max_sessions: s.max_sessions,
        max_half_open_per_prefix: s.max_half_open_per_prefix,
        ..SessionConfig::default()
    }
}

fn rules(s: &AuthSection) -> Rules {
    Rules {
        default: s.default.into(),
        prefixes: s
            .prefixes
            .iter()
            .map(|p| (p.prefix, p.auth.into()))
            .collect(),
    }
}

impl Auth {
    /// Builds the gate from a validated section: loads certificate, key and credentials,
    /// or the RADIUS secret and opens the RADIUS socket (inside the runtime). The gate
    /// exists even with authentication off, so a reload can turn it on.
    pub fn build(s: &AuthSection) -> Result<SharedAuth, BuildError> {
        let p = prepare(s)?;
        let factory: Factory = Box::new(|| Backend::Off);
        let gate = Gate::new(rules(s), Server::new(session_config(s), factory));
        let cell = Arc::new(AuthCell {
            on: std::sync::atomic::AtomicBool::new(false),
            inner: Mutex::new(Auth {
                gate,
                origin: Instant::now(),
                routes: HashMap::new(),
                radius: None,
                section: s.clone(),
                embedded: None,
                live: std::collections::HashSet::new(),
                stats: SessionStats::default(),
                sockets: Vec::new(),
                replicate: false,
                changes: Vec::new(),
                limiter: Arc::new(Mutex::new(crate::limit::Limiter::new(s.attempts))),
                jobs: None,
            }),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let pool = Arc::new(JobPool::new());
            lock(&cell).jobs = Some(pool.clone());
            rt.spawn(workers(cell.clone(), pool));
        }
        apply(&cell, p);
        Ok(cell)
    }

    /// Puts `p` in force: rules, session settings and the back end for new
    /// conversations. Established sessions stay unless the new configuration no longer
    /// allows them: their source is now `off`, or (embedded back end) their identity
    /// is no longer in the credentials file; those are terminated (SESSION_TERMINATED,
    /// RFC 7652 §3.3). Conversations under way finish with the back end they started
    /// with, except RADIUS ones whose AAA server changed (they fail: their requests
    /// were in flight to the old one). Returns what changed, for the log.
    fn put_in_force(&mut self, p: Prepared) -> String {
        let now = self.now();
        let mut notes = Vec::new();
        let (factory, embedded, radius_servers): (Factory, _, _) = match p.backend {
            PreparedBackend::Off => (Box::new(|| Backend::Off), None, None),
            PreparedBackend::Embedded(e) => {
                let b = e.clone();
                (
                    Box::new(move || Backend::Embedded(Offloaded::new(b.clone()))),
                    Some(e),
                    None,
                )
            }
            PreparedBackend::Radius { servers } => {
                // The authenticator uses the settings common to all servers.
                let c = servers.first().map(|(c, _, _)| c.clone());
                let f: Factory = match c {
                    Some(c) => {
                        Box::new(move || Backend::Radius(RadiusAuthenticator::new(c.clone())))
                    }
                    None => Box::new(|| Backend::Off),
                };
                (f, None, Some(servers))
            }
        };
        // The RADIUS leg: kept when nothing of it changed, else replaced.
        let new_section = p.section.radius.clone();
        let keep = match (&self.radius, &new_section, &radius_servers) {
            (Some(cur), Some(sec), Some(servers)) => {
                cur.section == *sec
                    && cur.secrets.len() == servers.len()
                    && cur
                        .secrets
                        .iter()
                        .zip(servers)
                        .all(|(a, (c, _, _))| *a == c.secret)
            }
            _ => false,
        };
        if !keep {
            // Requests waiting for the old AAA servers: an unbound one goes to the new
            // servers at once; a bound one's State means nothing to them, so its session
            // is terminated and the client starts again (docs/AUTH.md, "An unavailable
            // back end"). Neither is a failed authentication.
            let mut waiting = Vec::new();
            if let Some(mut old) = self.radius.take() {
                waiting.extend(old.pool.take_flights());
                for (id, r) in old.retries.drain() {
                    if let Some(req) = r.req {
                        let bound = req
                            .attributes
                            .iter()
                            .any(|(t, _)| *t == pcp_eap::radius::ATTR_STATE);
                        waiting.push((id, req, bound));
                    }
                }
            }
            if let (Some(sec), Some(servers)) = (new_section, radius_servers) {
                let secrets = servers.iter().map(|(c, _, _)| c.secret.clone()).collect();
                self.radius = Some(Radius {
                    pool: crate::aaa::Pool::new(servers, sec.dead_time_s),
                    section: sec,
                    secrets,
                    retries: HashMap::new(),
                });
            }
            let (mut moved, mut restarted) = (0, 0);
            for (id, req, bound) in waiting {
                match self.radius.as_mut() {
                    Some(r) if !bound => {
                        r.retries.insert(
                            id,
                            Retry {
                                req: Some(req),
                                attempts: 0,
                                due: now.0,
                            },
                        );
                        moved += 1;
                    }
                    _ => {
                        self.terminate(now, id, "aaa_gone");
                        restarted += 1;
                    }
                }
            }
            if moved + restarted > 0 {
                notes.push(format!(
                    "{moved} authentication(s) waiting for the old AAA servers asked again, {restarted} restarted"
                ));
            }
        }
        self.gate.server.set_authenticator(factory);
        lock_limiter(&self.limiter).set_config(p.section.attempts);
        self.gate.server.set_config(session_config(&p.section));
        self.gate.rules = rules(&p.section);
        self.gate.initiate = p.section.server_initiated;
        // Sessions the new configuration no longer allows.
        let doomed: Vec<(u32, &'static str)> = self
            .gate
            .server
            .sessions()
            .filter(|i| i.state != SessionState::Terminating)
            .filter_map(|i| {
                if self.gate.rules.mode(i.client.ip()) == Mode::Off {
                    return Some((i.session_id, "auth_off"));
                }
                let who = i.identity.as_deref()?;
                let e = embedded.as_ref()?;
                (!e.knows(who)).then_some((i.session_id, "user_removed"))
            })
            .collect();
        for (id, reason) in &doomed {
            tracing::info!(
                session_id = id,
                reason,
                "reload: terminating PCP authentication session"
            );
            self.terminate(now, *id, reason);
        }
        if !doomed.is_empty() {
            notes.push(format!("{} session(s) terminated", doomed.len()));
        }
        self.embedded = embedded;
        self.section = p.section;
        notes.join(", ")
    }

    /// Unix seconds of a time on the gate's clock.
    fn unix(&self, t: pcp_auth::Time) -> u64 {
        let now = self.now();
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let at = (wall as i128) + i128::from(t.0) - i128::from(now.0);
        u64::try_from(at / 1000).unwrap_or(0)
    }

    /// The sessions for the admin API, oldest first.
    pub fn session_views(&self) -> Vec<SessionView> {
        let now = self.now();
        let mut v: Vec<(pcp_auth::Time, SessionView)> = self
            .gate
            .server
            .sessions()
            .map(|i| {
                (
                    i.created,
                    SessionView {
                        session_id: i.session_id,
                        identity: i.identity.as_deref().map(str::to_string),
                        client: i.client,
                        state: i.state.name(),
                        created_at: self.unix(i.created),
                        established_at: i.established.map(|t| self.unix(t)),
                        expires_at: i.expires.map(|t| self.unix(t)),
                        expires_in: i.expires.map(|t| t.0.saturating_sub(now.0) / 1000),
                        pa_seq_in: i.pa_in,
                        pa_seq_out: i.pa_out,
                        seq_in: i.common_in,
                        seq_out: i.common_out,
                        accepted: i.accepted,
                        refused: i.refused,
                        waiting_backend: i.waiting_backend,
                    },
                )
            })
            .collect();
        v.sort_by_key(|(t, s)| (*t, s.session_id));
        v.into_iter().map(|(_, s)| s).collect()
    }

    /// Terminates a session (SESSION_TERMINATED, RFC 7652 §3.3), counted by `reason`.
    /// A session already being terminated is left alone (and counted once).
    /// Whether it existed.
    pub fn terminate(&mut self, now: pcp_auth::Time, id: u32, reason: &'static str) -> bool {
        match self.gate.server.session(id) {
            None => return false,
            Some(i) if i.state == SessionState::Terminating => return true,
            Some(_) => {}
        }
        self.gate.server.terminate(now, id);
        *self.stats.terminated.entry(reason).or_default() += 1;
        true
    }
    /// Hands the Access-Requests of sessions that went to the back end to the RADIUS
    /// servers: the datagrams to send, each with the socket of its AAA server.
    pub fn backend_requests(&mut self) -> crate::aaa::Datagrams {
        let mut out = Vec::new();
        let now = self.now();
        while let Some(id) = self.gate.server.poll_backend() {
            let src = self.gate.server.session(id).map(|i| i.client.ip());
            let req = match self.gate.server.authenticator_mut(id) {
                Some(Backend::Radius(a)) => a.take_request(),
                Some(Backend::Embedded(o)) => {
                    if let (Some(packet), Some(src)) = (o.queued.take(), src) {
                        let job = Job {
                            session: id,
                            generation: o.generation,
                            conv: o.conv.clone(),
                            packet,
                            src,
                            limiter: self.limiter.clone(),
                            origin: self.origin,
                        };
                        match &self.jobs {
                            Some(pool) => {
                                if pool.push(job).is_err() {
                                    // Full (a flood): the session forgets the message
                                    // and the client's retransmission brings it again
                                    // (docs/AUTH.md, "EAP work off the gate's lock").
                                    self.gate.server.backend_refused(id);
                                    tracing::debug!(
                                        session_id = id,
                                        %src,
                                        "embedded EAP work queue full: waiting for the client's retransmission"
                                    );
                                }
                            }
                            None => self.apply_done(job.run()),
                        }
                    }
                    continue;
                }
                _ => None,
            };
            let Some(req) = req else {
                continue;
            };
            if let Some(r) = self.radius.as_mut() {
                r.settle(id);
            }
            // A new conversation of a source out of attempts is refused without asking
            // the AAA server. Not by identity: the only one known here is the outer
            // identity, which clients send as "anonymous" (docs/AUTH.md, "Attempt
            // limits"): limiting it would let anyone lock every user out.
            let fresh = !req
                .attributes
                .iter()
                .any(|(t, _)| *t == pcp_eap::radius::ATTR_STATE);
            if fresh
                && let Some(src) = src
                && lock_limiter(&self.limiter).admit(None, src, now.0).is_err()
            {
                self.gate.server.resume(now, id, |a| match a {
                    Backend::Radius(r) => r.answer(Err(RadiusError::BadResponse {
                        server: String::new(),
                        reason: "refused by auth.attempts",
                    })),
                    _ => AuthStep::Discard,
                });
                continue;
            }
            self.send_backend(now, id, req, &mut out);
        }
        out
    }

    /// Puts the result of an embedded conversation's [`Job`] in force, and counts a
    /// failed attempt (or forgives the identity's failures after a success).
    fn apply_done(&mut self, d: Done) {
        let now = self.now();
        match &d.step {
            AuthStep::Failure { .. } if !d.refused => {
                lock_limiter(&self.limiter).failed(d.identity.as_deref(), d.src, now.0)
            }
            AuthStep::Success { identity, .. } => {
                lock_limiter(&self.limiter).succeeded(identity, d.src, now.0)
            }
            _ => {}
        }
        let generation = d.generation;
        self.gate.server.resume(now, d.session, |b| match b {
            Backend::Embedded(o) if o.generation == generation => d.step,
            _ => AuthStep::Discard,
        });
    }

    /// Sends one Access-Request, or defers it (back end busy) or restarts its session
    /// (its AAA server is gone): a back end that cannot answer now never fails the
    /// client's authentication (docs/AUTH.md, "An unavailable back end").
    fn send_backend(
        &mut self,
        now: pcp_auth::Time,
        id: u32,
        req: pcp_eap::radius::AccessRequest,
        out: &mut crate::aaa::Datagrams,
    ) {
        let Some(r) = self.radius.as_mut() else {
            // A reload removed the RADIUS back end while this conversation went on.
            self.terminate(now, id, "aaa_gone");
            return;
        };
        match r.pool.send(id, req, now.0) {
            Ok(d) => out.push(d),
            Err(crate::aaa::NotSent::Busy(req)) => {
                let wait = r.defer(id, req, now.0);
                self.stats.backend_retries += 1;
                tracing::warn!(
                    session_id = id,
                    retry_ms = wait,
                    "RADIUS: the AAA server has 256 requests in flight; asking again later"
                );
            }
            Err(crate::aaa::NotSent::Unbound) => {
                tracing::warn!(
                    session_id = id,
                    "RADIUS: the conversation's AAA server is no longer configured; the client starts again"
                );
                self.terminate(now, id, "aaa_gone");
            }
        }
    }

    /// A datagram from the AAA server of `sock`.
    pub fn radius_datagram(&mut self, sock: &Arc<UdpSocket>, datagram: &[u8]) {
        let now = self.now();
        let Some(r) = self.radius.as_mut() else {
            return;
        };
        match r.pool.receive(sock, datagram) {
            Ok(Some((id, answer))) => {
                r.settle(id);
                if let Err(e) = &answer {
                    tracing::warn!(session_id = id, error = %e, "RADIUS");
                }
                let src = self.gate.server.session(id).map(|i| i.client.ip());
                let (mut failed, mut succeeded) = (false, None);
                self.gate.server.resume(now, id, |a| match a {
                    Backend::Radius(r) => {
                        let step = r.answer(answer);
                        match &step {
                            AuthStep::Failure { .. } => failed = true,
                            AuthStep::Success { identity, .. } => {
                                succeeded = Some(identity.clone());
                            }
                            _ => {}
                        }
                        step
                    }
                    _ => AuthStep::Discard,
                });
                // A rejection counts against the source only (see `backend_requests`);
                // the AAA server keeps its own per-user policy.
                if failed && let Some(src) = src {
                    lock_limiter(&self.limiter).failed(None, src, now.0);
                }
                // The identity the AAA server vouched for (its User-Name, else the outer
                // one): forgiven, as on the embedded path.
                if let (Some(identity), Some(src)) = (succeeded, src) {
                    lock_limiter(&self.limiter).succeeded(&identity, src, now.0);
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "RADIUS"),
        }
    }

    /// RADIUS retransmissions and retries due (datagrams to send), and when to come
    /// back. A request no AAA server answered is asked again later, with backoff,
    /// while its PA session lasts: the client was acknowledged and waits.
    fn radius_timeout(&mut self) -> (crate::aaa::Datagrams, Option<u64>) {
        let now = self.now();
        let Some(r) = self.radius.as_mut() else {
            return (Vec::new(), None);
        };
        let (mut out, failed) = r.pool.handle_timeout(now.0);
        self.stats.backend_retries += failed.len() as u64;
        for g in failed {
            let wait = r.defer(g.session, g.req, now.0);
            tracing::warn!(session_id = g.session, error = %g.error, retry_ms = wait, "RADIUS: no answer; asking again later (the client waits, acknowledged)");
        }
        let due = r.due_retries(now.0);
        for (id, req) in due {
            self.send_backend(now, id, req, &mut out);
        }
        let next = self.radius.as_ref().and_then(|r| {
            [r.pool.poll_timeout(), r.next_retry()]
                .into_iter()
                .flatten()
                .min()
        });
        (out, next)
    }

    /// Now on the gate's clock.
    pub fn now(&self) -> pcp_auth::Time {
        pcp_auth::Time(u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    /// What happened to PA sessions, counted (and queued for the backup in pair mode),
    /// to be logged once the lock is released: a burst of expiries writes its log
    /// lines while requests go on.
    pub fn take_events(&mut self) -> EventLog {
        let now = self.now();
        let mut out = Vec::new();
        while let Some(e) = self.gate.server.poll_event() {
            if self.replicate {
                match &e {
                    ServerEvent::Established { session_id, .. }
                    | ServerEvent::Reauthenticated { session_id, .. } => {
                        if let Some(st) = self.gate.server.export(*session_id, now) {
                            self.changes.push(SessionChange::Up(session_record(&st)));
                        }
                    }
                    ServerEvent::Ended { session_id, .. } => {
                        self.changes.push(SessionChange::End(*session_id));
                    }
                }
            }
            match &e {
                ServerEvent::Established { session_id, .. } => {
                    self.stats.established += 1;
                    self.live.insert(*session_id);
                }
                ServerEvent::Reauthenticated { .. } => {}
                ServerEvent::Ended { session_id, cause } => {
                    if let Some(r) = self.radius.as_mut() {
                        r.pool.forget(*session_id);
                        r.settle(*session_id);
                    }
                    let by = if self.live.remove(session_id) {
                        &mut self.stats.ended
                    } else {
                        &mut self.stats.failed
                    };
                    *by.entry(cause_name(*cause)).or_default() += 1;
                }
            }
            out.push(e);
        }
        EventLog(out)
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

    /// The sessions with an SA of each of `hosts` that has any (RFC 7652 §3.2: an
    /// unsolicited message to a client with a PA session must be tagged). One pass
    /// over the sessions, and none when no host has one.
    pub fn sessions_of(
        &self,
        hosts: impl Iterator<Item = std::net::IpAddr>,
    ) -> HashMap<std::net::IpAddr, Vec<u32>> {
        let mut out: HashMap<std::net::IpAddr, Vec<u32>> = hosts
            .map(|h| h.to_canonical())
            .filter(|h| self.gate.server.has_session_from(*h))
            .map(|h| (h, Vec::new()))
            .collect();
        if out.is_empty() {
            return out;
        }
        for s in self.gate.server.sessions() {
            if s.common_out.is_none() {
                continue;
            }
            if let Some(ids) = out.get_mut(&s.client.ip().to_canonical()) {
                ids.push(s.session_id);
            }
        }
        out.retain(|_, ids| !ids.is_empty());
        out
    }

    /// The hosts with a session that has an SA.
    pub fn session_hosts(&self) -> Vec<std::net::IpAddr> {
        let mut hosts: Vec<std::net::IpAddr> = self
            .gate
            .server
            .sessions()
            .filter(|s| s.common_out.is_some())
            .map(|s| s.client.ip().to_canonical())
            .collect();
        hosts.sort_unstable();
        hosts.dedup();
        hosts
    }

    /// Tags an unsolicited message (an ANNOUNCE) in `buf[..len]` for session `id` as
    /// any response (its key, its next sequence number) and queues that sequence
    /// number for the backup, so that a successor never reuses it (the client would
    /// drop its message as a replay). `None`: the session cannot tag it (gone).
    pub fn tag_unsolicited(&mut self, id: u32, buf: &mut [u8], len: usize) -> Option<usize> {
        let n = self.gate.outbound(Some(id), buf, len)?;
        if self.replicate
            && let Some(s) = self.gate.server.sequence_state(id)
        {
            self.changes
                .push(SessionChange::Seq(id, sequence_record(&s)));
        }
        Some(n)
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

/// PA session events taken under the gate's lock ([`Auth::take_events`]), to log after
/// releasing it.
#[must_use = "the events are logged by EventLog::log"]
pub struct EventLog(Vec<ServerEvent>);

impl EventLog {
    /// Writes one log line per event.
    pub fn log(self) {
        for e in self.0 {
            match e {
                ServerEvent::Established {
                    session_id,
                    client,
                    identity,
                    lifetime,
                } => {
                    tracing::info!(session_id, %client, %identity, lifetime, "PCP authentication succeeded")
                }
                ServerEvent::Reauthenticated {
                    session_id,
                    identity,
                } => {
                    tracing::info!(session_id, %identity, "PCP re-authentication succeeded")
                }
                ServerEvent::Ended { session_id, cause } => {
                    tracing::info!(session_id, ?cause, "PCP authentication session ended")
                }
            }
        }
    }
}

/// Puts a prepared `[auth]` in force (start or reload) and starts the RADIUS receiver
/// if a new AAA server needs one. Returns what changed beyond the settings, for the log.
pub fn apply(cell: &SharedAuth, p: Prepared) -> String {
    let on = p.section.enabled();
    let notes = lock(cell).put_in_force(p);
    cell.on.store(on, std::sync::atomic::Ordering::Relaxed);
    spawn_radius_receiver(cell);
    flush(cell);
    notes
}

/// Sends at once what is queued outside a datagram's path (SESSION_TERMINATED of a
/// reload or an operator's command), without waiting for the timer task: non-blocking
/// sends, a loss is covered by the retransmission.
pub fn flush(cell: &SharedAuth) {
    let (out, radius_out, sockets, events) = {
        let mut a = lock(cell);
        let r = a.backend_requests();
        let events = a.take_events();
        (a.transmits(), r, a.sockets.clone(), events)
    };
    events.log();
    for (sock, d) in radius_out {
        let _ = sock.try_send(&d);
    }
    for (socket, t) in out {
        let sock = socket
            .and_then(|i| sockets.get(i))
            .or_else(|| socket_for(&sockets, t.dst));
        if let Some(sock) = sock
            && let Err(e) = sock.try_send_to(&t.payload, t.dst)
        {
            tracing::debug!(error = %e, dst = %t.dst, "PA send_to");
        }
    }
}

/// Locks the failed-attempt limits.
fn lock_limiter(l: &Mutex<crate::limit::Limiter>) -> MutexGuard<'_, crate::limit::Limiter> {
    l.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs the embedded back end's [`Job`]s on blocking threads, at most one per core
/// at a time (Argon2 is memory-hard: unbounded parallelism would only trade CPU for
/// RAM), and puts each result in force under the gate's lock; logging and sending
/// happen after it is released.
async fn workers(cell: SharedAuth, pool: Arc<JobPool>) {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    let permits = Arc::new(tokio::sync::Semaphore::new(n));
    loop {
        // A worker first, then the job whose source's turn it is: jobs wait in the
        // fair queue, not in this task.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let job = pool.next().await;
        let cell = cell.clone();
        tokio::spawn(async move {
            let done = tokio::task::spawn_blocking(move || job.run()).await;
            drop(permit);
            let Ok(done) = done else {
                return;
            };
            let (out, radius_out, sockets, events) = {
                let mut a = lock(&cell);
                a.apply_done(done);
                let r = a.backend_requests();
                let events = a.take_events();
                (a.transmits(), r, a.sockets.clone(), events)
            };
            events.log();
            send_radius(radius_out).await;
            send_all(&sockets, out).await;
        });
    }
}

/// Starts the tasks receiving the AAA servers' answers, where none runs.
fn spawn_radius_receiver(cell: &SharedAuth) {
    let mut a = lock(cell);
    let Some(r) = a.radius.as_mut() else {
        return;
    };
    // Outside a runtime (unit tests of the config) there is nothing to receive with.
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    for s in r.pool.servers.iter_mut().filter(|s| s.receiver.is_none()) {
        let task = rt.spawn(radius_receiver(cell.clone(), s.sock.clone()));
        s.receiver = Some(task.abort_handle());
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

/// Sends Access-Requests, each on its AAA server's socket.
pub async fn send_radius(out: crate::aaa::Datagrams) {
    for (sock, d) in out {
        if let Err(e) = sock.send(&d).await {
            tracing::warn!(error = %e, "RADIUS send");
        }
    }
}

/// Receives the AAA server's answers on `sock` (aborted when a reload replaces it).
async fn radius_receiver(auth: SharedAuth, sock: Arc<UdpSocket>) {
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
        let (out, radius_out, sockets, events) = {
            let mut a = lock(&auth);
            let mine = a
                .radius
                .as_ref()
                .is_some_and(|r| r.pool.servers.iter().any(|s| Arc::ptr_eq(&s.sock, &sock)));
            if !mine {
                return;
            }
            a.radius_datagram(&sock, &buf[..n]);
            let r = a.backend_requests();
            let events = a.take_events();
            (a.transmits(), r, a.sockets.clone(), events)
        };
        events.log();
        send_radius(radius_out).await;
        send_all(&sockets, out).await;
    }
}

/// Appends the gate's and the sessions' counters to the Prometheus text.
pub fn render_metrics(out: &mut String, a: &Auth) {
    use std::fmt::Write;
    let s = a.gate.stats();
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
    let mut states: HashMap<&'static str, u64> = HashMap::new();
    for i in a.gate.server.sessions() {
        *states.entry(i.state.name()).or_default() += 1;
    }
    let _ = writeln!(
        out,
        "# HELP pcp_auth_sessions PA sessions now, by state (established = with an SA)."
    );
    let _ = writeln!(out, "# TYPE pcp_auth_sessions gauge");
    for st in [
        SessionState::Authenticating,
        SessionState::Reauthenticating,
        SessionState::Confirming,
        SessionState::Established,
        SessionState::Terminating,
    ] {
        let n = states.get(st.name()).copied().unwrap_or(0);
        let _ = writeln!(out, "pcp_auth_sessions{{state=\"{}\"}} {n}", st.name());
    }
    let st = &a.stats;
    let _ = writeln!(
        out,
        "# HELP pcp_auth_sessions_established_total PA sessions that got their first SA."
    );
    let _ = writeln!(out, "# TYPE pcp_auth_sessions_established_total counter");
    let _ = writeln!(
        out,
        "pcp_auth_sessions_established_total {}",
        st.established
    );
    let all_causes = [
        Cause::AuthenticationFailed,
        Cause::AuthorizationFailed,
        Cause::DowngradeDetected,
        Cause::NoCommonAlgorithm,
        Cause::RefusedByClient,
        Cause::ByClient,
        Cause::ByServer,
        Cause::Expired,
        Cause::Timeout,
    ];
    for (name, help, map) in [
        (
            "pcp_auth_sessions_failed_total",
            "PA sessions that ended without an SA, by cause.",
            &st.failed,
        ),
        (
            "pcp_auth_sessions_ended_total",
            "Established PA sessions that ended, by cause.",
            &st.ended,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        for c in all_causes {
            let c = cause_name(c);
            let n = map.get(c).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}{{cause=\"{c}\"}} {n}");
        }
    }
    let _ = writeln!(
        out,
        "# HELP pcp_auth_sessions_terminated_total Terminations pcpd started (SESSION_TERMINATED), by reason."
    );
    let _ = writeln!(out, "# TYPE pcp_auth_sessions_terminated_total counter");
    for r in ["admin", "user_removed", "auth_off", "aaa_gone"] {
        let n = st.terminated.get(r).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "pcp_auth_sessions_terminated_total{{reason=\"{r}\"}} {n}"
        );
    }
    {
        let l = lock_limiter(&a.limiter);
        let _ = writeln!(
            out,
            "# HELP pcp_auth_attempts_failed_total Failed authentication attempts counted against [auth.attempts]."
        );
        let _ = writeln!(out, "# TYPE pcp_auth_attempts_failed_total counter");
        let _ = writeln!(out, "pcp_auth_attempts_failed_total {}", l.failed);
        let _ = writeln!(
            out,
            "# HELP pcp_auth_attempts_refused_total Attempts refused unchecked by [auth.attempts], by the limit that refused them."
        );
        let _ = writeln!(out, "# TYPE pcp_auth_attempts_refused_total counter");
        for (by, n) in [
            ("identity", l.refused_identity),
            ("source", l.refused_source),
        ] {
            let _ = writeln!(out, "pcp_auth_attempts_refused_total{{by=\"{by}\"}} {n}");
        }
    }
    if let Some(pool) = &a.jobs {
        let (queued, dropped) = {
            let q = pool.queue();
            (q.len(), q.dropped)
        };
        let _ = writeln!(
            out,
            "# HELP pcp_auth_eap_jobs_queued Embedded EAP work (TLS, password checks) waiting for a worker."
        );
        let _ = writeln!(out, "# TYPE pcp_auth_eap_jobs_queued gauge");
        let _ = writeln!(out, "pcp_auth_eap_jobs_queued {queued}");
        let _ = writeln!(
            out,
            "# HELP pcp_auth_eap_jobs_dropped_total Embedded EAP work refused because the queue (or the source's share) was full; the client's retransmission brings it again."
        );
        let _ = writeln!(out, "# TYPE pcp_auth_eap_jobs_dropped_total counter");
        let _ = writeln!(out, "pcp_auth_eap_jobs_dropped_total {dropped}");
    }
    if let Some(r) = &a.radius {
        let _ = writeln!(
            out,
            "# HELP pcp_auth_backend_retries_total AAA requests asked again later because no AAA server answered (not reported to the client as a failure)."
        );
        let _ = writeln!(out, "# TYPE pcp_auth_backend_retries_total counter");
        let _ = writeln!(out, "pcp_auth_backend_retries_total {}", st.backend_retries);
        let dead = r.pool.dead(a.now().0);
        let _ = writeln!(
            out,
            "# HELP pcp_auth_radius_server_up Whether an AAA server is used (0: it did not answer and is passed over for auth.radius.dead_time_s)."
        );
        let _ = writeln!(out, "# TYPE pcp_auth_radius_server_up gauge");
        for s in &r.pool.servers {
            let up = u8::from(!dead.contains(&s.addr));
            let _ = writeln!(
                out,
                "pcp_auth_radius_server_up{{server=\"{}\"}} {up}",
                s.addr
            );
        }
    }
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

/// Runs the PA sessions' timers (retransmissions, expiry, re-authentication). Each
/// wake costs the gate's lock for the timers that are due (the server indexes its
/// sessions' deadlines), not for every session; logging and sending happen after the
/// lock is released.
pub async fn timers(auth: SharedAuth, sockets: Vec<Arc<UdpSocket>>) {
    loop {
        let (out, radius_out, events, wake) = {
            let mut a = lock(&auth);
            let now = a.now();
            a.gate.server.handle_timeout(now);
            let (mut radius_out, radius_next) = a.radius_timeout();
            radius_out.extend(a.backend_requests());
            let events = a.take_events();
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
                events,
                Instant::now() + wait.max(Duration::from_millis(5)),
            )
        };
        events.log();
        send_radius(radius_out).await;
        send_all(&sockets, out).await;
        tokio::time::sleep_until(wake.into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcp_auth::client::{Client, ClientConfig, ClientEvent};
    use pcp_testkit::eap::{AuthFiles, PASSWORD, ttls_peer, users_line};

    /// The embedded back end's EAP work runs on the worker pool, not in the call that
    /// holds the gate's lock: right after the gate took the client's EAP response the
    /// session waits for its back end and nothing is answered yet (no
    /// PA-Acknowledgement either); the worker's answer comes later, with the lock
    /// free meanwhile, and the exchange completes. A conversation restarted while its
    /// job runs ignores the stale result (generation check).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn embedded_eap_work_runs_off_the_gate_lock() {
        let dir = pcp_testkit::TempDir::new();
        let files = AuthFiles::write(
            &dir.0,
            "pcp.example",
            &users_line("alice", PASSWORD.as_bytes()),
        );
        let section = AuthSection {
            default: AuthMode::Required,
            certificate: Some(files.cert.clone()),
            key: Some(files.key.clone()),
            credentials: Some(files.users.clone()),
            ..AuthSection::default()
        };
        let cell = Auth::build(&section).unwrap();
        let server = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        lock(&cell).sockets = vec![server.clone()];
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let me = sock.local_addr().unwrap();
        let peer = ttls_peer(&files.ca_der, "pcp.example", "alice", PASSWORD.as_bytes());
        let mut client = Client::new(ClientConfig::new(me.ip()), peer);
        let origin = Instant::now();
        let now = || pcp_auth::Time(origin.elapsed().as_millis() as u64);
        client.start(now());
        let (mut offloaded, mut buf) = (0, [0u8; 2048]);
        let deadline = Instant::now() + Duration::from_secs(30);
        let event = loop {
            assert!(Instant::now() < deadline, "no outcome");
            if let Some(e) = client.poll_event() {
                break e;
            }
            while let Some(mut m) = client.poll_transmit() {
                let n = m.len();
                m.resize(1100, 0);
                let (out, waiting) = {
                    let mut a = lock(&cell);
                    let t = a.now();
                    a.gate.inbound(t, me, 0, &mut m, n);
                    assert!(a.backend_requests().is_empty());
                    let waiting: Vec<u32> = a
                        .gate
                        .server
                        .sessions()
                        .filter(|s| s.waiting_backend)
                        .map(|s| s.session_id)
                        .collect();
                    (a.transmits(), waiting)
                };
                if !waiting.is_empty() {
                    assert!(out.is_empty(), "answered under the lock: {out:?}");
                    offloaded += 1;
                }
                send_all(std::slice::from_ref(&server), out).await;
            }
            if let Ok(Ok((n, _))) =
                tokio::time::timeout(Duration::from_millis(20), sock.recv_from(&mut buf)).await
            {
                client.handle(now(), &buf[..n]);
            }
            client.handle_timeout(now());
        };
        assert!(
            matches!(event, ClientEvent::Established { .. }),
            "{event:?}"
        );
        assert!(
            offloaded >= 2,
            "EAP responses processed in place: {offloaded}"
        );

        // A result for an older generation of a conversation is ignored; one for the
        // current generation is applied. A second client gets as far as its first EAP
        // response, which is queued but not handed to the pool here.
        let peer = ttls_peer(&files.ca_der, "pcp.example", "alice", PASSWORD.as_bytes());
        let mut second = Client::new(ClientConfig::new(me.ip()), peer);
        let other: SocketAddr = "127.0.0.1:9".parse().unwrap();
        second.start(now());
        let mut id = None;
        for _ in 0..2 {
            let mut m = second.poll_transmit().expect("a PA-Client");
            let n = m.len();
            m.resize(1100, 0);
            let mut a = lock(&cell);
            let t = a.now();
            a.gate.inbound(t, other, 0, &mut m, n);
            for t in a.transmits() {
                second.handle(now(), &t.1.payload);
            }
            id = a
                .gate
                .server
                .sessions()
                .find(|s| s.client == other && s.waiting_backend)
                .map(|s| s.session_id);
        }
        let id = id.expect("the second client's session waits for its back end");
        let mut a = lock(&cell);
        let generation = match a.gate.server.authenticator_mut(id) {
            Some(Backend::Embedded(o)) => o.generation,
            _ => panic!("not the embedded back end"),
        };
        let failed = |generation| Done {
            session: id,
            generation,
            step: AuthStep::Failure {
                packet: pcp_eap::packet::failure(0),
            },
            identity: None,
            refused: false,
            src: other.ip(),
        };
        a.apply_done(failed(generation.wrapping_sub(1)));
        assert!(
            a.gate.server.session(id).is_some_and(|s| s.waiting_backend),
            "a stale result was applied"
        );
        a.apply_done(failed(generation));
        assert!(
            a.gate.server.session(id).is_none(),
            "the result was not applied"
        );
    }

    /// A re-authentication gives the session a fresh conversation; a job of the old
    /// one still running must not match any generation of the new one (review of
    /// 2026-12-04: both counted from 0, so the old conversation's second job had the
    /// new one's second generation).
    #[test]
    fn a_fresh_conversation_never_reuses_a_generation() {
        let pki = pcp_testkit::tls::Pki::for_name("pcp.example");
        let backend = pcp_testkit::eap::embedded(&pki);
        let generations = |b: &mut Backend| {
            let mut seen = Vec::new();
            b.start();
            for _ in 0..3 {
                b.receive(&[2, 0, 0, 5, 1]);
                match b {
                    Backend::Embedded(o) => seen.push(o.generation),
                    _ => unreachable!(),
                }
            }
            seen
        };
        let mut old = Backend::Embedded(Offloaded::new(backend.clone()));
        let mut fresh = Backend::Embedded(Offloaded::new(backend));
        let (a, b) = (generations(&mut old), generations(&mut fresh));
        assert!(a.iter().all(|g| !b.contains(g)), "{a:?} {b:?}");
    }
}
