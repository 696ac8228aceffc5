//! The PCP server's side of PA sessions (RFC 7652 §3): a table of sessions keyed by
//! session ID, each with its EAP authenticator, PA message stream and PCP SA; checking
//! the AUTHENTICATION_TAG of common requests and tagging their responses.
//!
//! Sans-IO: datagrams and `now` in; datagrams ([`Server::poll_transmit`]), events
//! ([`Server::poll_event`]) and a timer ([`Server::poll_timeout`]) out. Independent of
//! the PCP server core: the shell asks [`Server::check_request`] before serving a common
//! request and [`Server::protect_response`] after.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use pcp_proto::{Opcode, PcpOption, Request, ResultCode, emit_error_response};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::crypto::{SUPPORTED_MACS, SUPPORTED_PRFS, TransportKey};
use crate::eap::{AuthStep, EapAuthenticator};
use crate::pa::{Link, Side, build};
use crate::replay::{REAUTH_THRESHOLD, ReplayWindow, SeqVerdict};
use crate::retransmit::{Retransmit, RetransmitConfig};
use crate::table::{Table, Timed};
use crate::{Time, tag};

/// Server settings.
#[derive(Clone)]
pub struct ServerConfig {
    /// Retransmission of PA messages (RFC 7652 §6.3 applies RFC 6887's to servers too).
    pub retransmit: RetransmitConfig,
    /// SESSION_LIFETIME granted, in seconds.
    pub session_lifetime: u32,
    /// Most sessions at once; PA-Initiations beyond are dropped (RFC 7652 §8: keep as
    /// little state as possible for unauthenticated exchanges).
    pub max_sessions: usize,
    /// ID_INDICATOR sent in the first PA-Server, if any.
    pub id_indicator: Option<String>,
    /// Authorization of an authenticated identity (AUTHORIZATION_FAILED when false);
    /// `None` authorizes everyone who authenticates.
    pub authorize: Option<Authorize>,
    /// Most sessions without an SA per source prefix (/24 for IPv4, /56 for IPv6);
    /// PA-Initiations beyond are dropped, so one network cannot fill the table with
    /// spoofed PA-Initiations (RFC 7652 §8, docs/AUTH.md S4).
    pub max_half_open_per_prefix: usize,
}

/// Decides whether an authenticated identity may use the server.
pub type Authorize = Arc<dyn Fn(&str) -> bool + Send + Sync>;

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("retransmit", &self.retransmit)
            .field("session_lifetime", &self.session_lifetime)
            .field("max_sessions", &self.max_sessions)
            .field("id_indicator", &self.id_indicator)
            .field("max_half_open_per_prefix", &self.max_half_open_per_prefix)
            .finish_non_exhaustive()
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            retransmit: RetransmitConfig::default(),
            session_lifetime: 3600,
            max_sessions: 65_536,
            id_indicator: None,
            authorize: None,
            max_half_open_per_prefix: 256,
        }
    }
}

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Where to.
    pub dst: SocketAddr,
    /// The PCP message.
    pub payload: Vec<u8>,
}

/// How far a successor's outgoing common sequence number jumps past the exported one
/// ([`Server::import`]): the exporter may have tagged up to this many replies of the
/// session after its last export reached the successor (docs/AUTH.md "Pair mode").
pub const FAILOVER_OUT_JUMP: u32 = 1 << 16;

/// An established session as another server needs it ([`Server::export`],
/// [`Server::import`]). Holds the transport key: treat it as a secret.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionExport {
    /// Session ID.
    pub session_id: u32,
    /// The client's address (tagged requests must come from its IP).
    pub client: SocketAddr,
    /// The authenticated identity.
    pub identity: Arc<str>,
    /// The session's nonce (a re-authentication derives its key with it).
    pub nonce: u32,
    /// Key ID of the transport key.
    pub key_id: u32,
    /// The transport key (RFC 7652 §4). The MSK it was derived from is not exported:
    /// verifying and tagging need only this, and a re-authentication brings a new MSK.
    pub key: [u8; crate::crypto::KEY_LEN],
    /// Negotiated PRF (IKEv2 transform ID).
    pub prf: u32,
    /// Negotiated MAC algorithm (IKEv2 transform ID).
    pub mac: u32,
    /// Milliseconds of session lifetime left when exported.
    pub remaining_ms: u64,
    /// Next PA sequence number expected from the client.
    pub pa_in: u32,
    /// Next PA sequence number to send.
    pub pa_out: u32,
    /// Common-message sequence numbers.
    pub sequence: SequenceState,
}

impl std::fmt::Debug for SessionExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionExport")
            .field("session_id", &self.session_id)
            .field("client", &self.client)
            .field("identity", &self.identity)
            .field("key_id", &self.key_id)
            .field("remaining_ms", &self.remaining_ms)
            .field("sequence", &self.sequence)
            .finish_non_exhaustive()
    }
}

/// The common-message sequence numbers of a session (RFC 7652 §6.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SequenceState {
    /// The last request accepted: its sequence number and MAC.
    pub last_in: Option<(u32, [u8; 16])>,
    /// The sequence number the next reply gets.
    pub next_out: u32,
}

/// Why [`Server::import`] refused a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ImportError {
    /// Session ID or key ID 0.
    #[error("session ID and key ID must not be 0")]
    Invalid,
    /// Algorithms this server does not implement.
    #[error("unsupported algorithms PRF {prf} / MAC {mac}")]
    Algorithm {
        /// PRF.
        prf: u32,
        /// MAC.
        mac: u32,
    },
    /// No lifetime left.
    #[error("session expired")]
    Expired,
    /// The session table is full.
    #[error("session table full")]
    Full,
}

/// Why a session ended or never got an SA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// EAP said no: AUTHENTICATION_FAILED sent.
    AuthenticationFailed,
    /// Authenticated but not authorized: AUTHORIZATION_FAILED sent.
    AuthorizationFailed,
    /// The client's algorithm lists differ from the ones offered:
    /// DOWNGRADE_ATTACK_DETECTED sent.
    DowngradeDetected,
    /// The client chose no PRF or MAC, or one not offered.
    NoCommonAlgorithm,
    /// The client sent AUTHENTICATION_FAILED or AUTHORIZATION_FAILED (it could not
    /// authenticate or authorize the server).
    RefusedByClient,
    /// The client terminated it.
    ByClient,
    /// This server terminated it ([`Server::terminate`]).
    ByServer,
    /// The lifetime ran out.
    Expired,
    /// No answer within the maximum retransmission duration.
    Timeout,
}

/// What happened, for the operator and the PCP server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEvent {
    /// A client authenticated: common requests tagged for `session_id` are its.
    Established {
        /// Session ID.
        session_id: u32,
        /// The client's address.
        client: SocketAddr,
        /// The authenticated identity.
        identity: Arc<str>,
        /// Session lifetime in seconds.
        lifetime: u32,
    },
    /// A re-authentication succeeded.
    Reauthenticated {
        /// Session ID.
        session_id: u32,
        /// The authenticated identity.
        identity: Arc<str>,
    },
    /// The session is gone (or never got an SA).
    Ended {
        /// Session ID.
        session_id: u32,
        /// Why.
        cause: Cause,
    },
}

/// Why a tagged common request was discarded (RFC 7652 §6.2: silently).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discard {
    /// The session has no SA yet (or the key ID is not its key's).
    NoKey,
    /// The request comes from another address than the session's client.
    WrongClient,
    /// The sequence number was used before.
    Replay,
    /// The MAC does not verify, or the tag is malformed.
    BadTag,
}

/// What [`Server::check_request`] makes of a common request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// No AUTHENTICATION_TAG: the PCP server decides (AUTHENTICATION_REQUIRED where
    /// authentication is required).
    Untagged,
    /// The tag verified: the request is from `identity`'s session.
    Authenticated {
        /// Session ID (for [`Server::protect_response`]).
        session_id: u32,
        /// The authenticated identity.
        identity: Arc<str>,
        /// The very message accepted last time (a retransmission): answer it again.
        retransmission: bool,
    },
    /// The tag names no session: answer UNKNOWN_SESSION_ID (RFC 7652 §3.2).
    UnknownSession,
    /// Discard silently, change nothing.
    Discard(Discard),
}

/// Why a response could not be tagged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProtectError {
    /// No such session with an SA.
    #[error("no PCP SA for session")]
    NoSession,
    /// The sequence space is used up.
    #[error("common sequence numbers exhausted")]
    SequenceExhausted,
    /// The tag does not fit.
    #[error("tag does not fit: {0}")]
    Tag(#[from] tag::TagError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// EAP exchange (an SA exists during a re-authentication).
    Eap,
    /// AUTHENTICATION_SUCCEEDED sent; waiting for the client's, tagged with the new key.
    AwaitFinal,
    /// SA in place.
    Established,
    /// SESSION_TERMINATED sent.
    Terminating,
}

#[derive(Debug, Clone)]
struct Sa {
    key: TransportKey,
    common_out: u32,
    common_in: ReplayWindow,
    expires: Time,
}

struct Session<A> {
    client: SocketAddr,
    nonce: u32,
    /// Whether the client's nonce must be echoed in the next PA-Server (§3.1.2).
    echo_nonce: bool,
    /// The exchange started with a PA-Initiation (its duplicates are matched by nonce).
    phase: Phase,
    link: Link,
    auth: A,
    chosen: bool,
    sa: Option<Sa>,
    /// The key of the AUTHENTICATION_SUCCEEDED awaiting the client's confirmation.
    pending: Option<(TransportKey, Arc<str>)>,
    identity: Option<Arc<str>>,
    last_key_id: u32,
    /// The authenticator waits for its back end ([`AuthStep::Pending`]).
    waiting: bool,
    /// Without an SA the session ends when this passes: the MRD after our last PA
    /// message (RFC 7652 §6.3, §8), whatever the authenticator does with the client's.
    deadline: Time,
    /// The PCP server's epoch for this client minus `epoch(now)` as of the client's
    /// last message, so PA-Server messages (also those sent on timers) carry the epoch
    /// its common responses carry (RFC 7652 §3.3, RFC 6887 §8.5; review I1).
    epoch_offset: i64,
    /// The PA-Acknowledgement sent for the client's message the back end works on
    /// (RFC 7652 §3.1.3, §6.3), sent again for its duplicates meanwhile.
    ack: Option<Vec<u8>>,
    /// When the session was opened.
    created: Time,
    /// When its first SA was installed.
    established: Option<Time>,
    /// Tagged common requests of this session accepted / refused (bad tag, replay,
    /// wrong address, no key).
    accepted: u64,
    refused: u64,
}

impl<A> Timed for Session<A> {
    /// The earliest of: the next retransmission or giving up on the outstanding PA
    /// message, the SA's expiry (or, without an SA, the end of the half-open
    /// exchange), and at once when an established session's sequence space is nearly
    /// used up (re-authentication, RFC 7652 §3.4).
    fn deadline(&self, cfg: &RetransmitConfig) -> Option<Time> {
        let exhausted = self.link.out_seq >= REAUTH_THRESHOLD
            || self
                .sa
                .as_ref()
                .is_some_and(|sa| sa.common_out >= REAUTH_THRESHOLD);
        if self.phase == Phase::Established && exhausted {
            return Some(Time(0));
        }
        let r = self.link.retransmit.as_ref().map(|r| r.deadline(cfg));
        let e = self.sa.as_ref().map_or(self.deadline, |sa| sa.expires);
        Some(r.map_or(e, |r| r.min(e)))
    }
}

impl<A> Session<A> {
    /// The Epoch Time for a PA-Server sent at `now`.
    fn epoch_at(&self, now: Time) -> u32 {
        let e = i64::from(epoch(now)).saturating_add(self.epoch_offset);
        u32::try_from(e.max(0)).unwrap_or(u32::MAX)
    }
}

/// `epoch` as an offset from the origin's seconds at `now`.
fn epoch_offset(now: Time, epoch_now: u32) -> i64 {
    i64::from(epoch_now) - i64::from(epoch(now))
}

/// Where a session is, for the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// EAP exchange under way (no SA yet).
    Authenticating,
    /// EAP exchange under way with an SA in place (re-authentication).
    Reauthenticating,
    /// AUTHENTICATION_SUCCEEDED sent, awaiting the client's confirmation.
    Confirming,
    /// SA in place.
    Established,
    /// SESSION_TERMINATED sent, awaiting the client's answer.
    Terminating,
}

impl SessionState {
    /// A stable lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            SessionState::Authenticating => "authenticating",
            SessionState::Reauthenticating => "reauthenticating",
            SessionState::Confirming => "confirming",
            SessionState::Established => "established",
            SessionState::Terminating => "terminating",
        }
    }
}

/// A snapshot of one session (admin API): nothing secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// Session ID.
    pub session_id: u32,
    /// The client's address.
    pub client: SocketAddr,
    /// The authenticated identity (once an SA exists).
    pub identity: Option<Arc<str>>,
    /// Where the session is.
    pub state: SessionState,
    /// When it was opened.
    pub created: Time,
    /// When its first SA was installed.
    pub established: Option<Time>,
    /// When the SA expires.
    pub expires: Option<Time>,
    /// Next PA sequence number expected from the client / to be sent.
    pub pa_in: u32,
    /// Next PA sequence number to be sent.
    pub pa_out: u32,
    /// Last common sequence number accepted from the client.
    pub common_in: Option<u32>,
    /// Next common sequence number for a response.
    pub common_out: Option<u32>,
    /// Tagged common requests accepted.
    pub accepted: u64,
    /// Tagged common requests refused (bad tag, replay, wrong address, no key).
    pub refused: u64,
    /// Waiting for the back end's answer.
    pub waiting_backend: bool,
}

impl<A> Session<A> {
    /// §6.2/§6.5 for a tagged common request: key, address, sequence number, MAC; the
    /// number is recorded only when everything holds.
    fn verify_common(
        sa: Option<&mut Sa>,
        client: SocketAddr,
        src: IpAddr,
        datagram: &[u8],
        at: &tag::Located,
    ) -> Result<SeqVerdict, Discard> {
        let sa = sa.ok_or(Discard::NoKey)?;
        if at.key_id != sa.key.id {
            return Err(Discard::NoKey);
        }
        if src != client.ip() {
            return Err(Discard::WrongClient);
        }
        let mac = &datagram[at.mac.clone()];
        let verdict = sa.common_in.check(at.sequence_number, mac);
        if verdict == SeqVerdict::Replay {
            return Err(Discard::Replay);
        }
        if tag::check(datagram, at, &sa.key).is_err() {
            return Err(Discard::BadTag);
        }
        sa.common_in.accept(at.sequence_number, mac);
        Ok(verdict)
    }

    fn info(&self, session_id: u32) -> SessionInfo {
        let state = match self.phase {
            Phase::Eap if self.sa.is_some() => SessionState::Reauthenticating,
            Phase::Eap => SessionState::Authenticating,
            Phase::AwaitFinal => SessionState::Confirming,
            Phase::Established => SessionState::Established,
            Phase::Terminating => SessionState::Terminating,
        };
        SessionInfo {
            session_id,
            client: self.client,
            identity: self.sa.as_ref().and(self.identity.clone()),
            state,
            created: self.created,
            established: self.established,
            expires: self.sa.as_ref().map(|sa| sa.expires),
            pa_in: self.link.in_seq,
            pa_out: self.link.out_seq,
            common_in: self.sa.as_ref().and_then(|sa| sa.common_in.last()),
            common_out: self.sa.as_ref().map(|sa| sa.common_out),
            accepted: self.accepted,
            refused: self.refused,
            waiting_backend: self.waiting,
        }
    }
}

/// The server side of all PA sessions.
pub struct Server<A, F> {
    cfg: ServerConfig,
    new_authenticator: F,
    out: Outbox,
    /// By ID, with their deadlines indexed. Every public method that changes sessions
    /// through `get_mut` ends with `sessions.settle()` (the request path re-indexes in
    /// place with `update`), so the index is exact between calls; only
    /// `authenticator_mut` leaves its session marked until the next call, which
    /// `poll_timeout` reads right meanwhile.
    sessions: Table<Session<A>>,
    /// Sessions whose PA-Initiation is not answered by a PA-Client yet, by client
    /// address and nonce, so a retransmitted PA-Initiation finds its session.
    initiations: HashMap<(SocketAddr, u32), u32>,
    events: VecDeque<ServerEvent>,
    /// Sessions waiting for their back end, not yet seen by the shell.
    backend: VecDeque<u32>,
    /// How many sessions with an SA each client IP has ([`Server::has_session_from`]).
    with_sa: HashMap<IpAddr, u32>,
    /// How many sessions without an SA each source prefix has (S4).
    half_open: HashMap<IpAddr, u32>,
    /// The server-initiated session not answered yet of each client IP, and when its
    /// first PA-Server last went out: at most one per source (S4).
    started: HashMap<IpAddr, (u32, Time)>,
}

impl<A, F> std::fmt::Debug for Server<A, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("sessions", &self.sessions.len())
            .finish_non_exhaustive()
    }
}

fn epoch(now: Time) -> u32 {
    // PA-Server messages carry the seconds since the shell's time origin.
    u32::try_from(now.0 / 1000).unwrap_or(u32::MAX)
}

impl<A: EapAuthenticator, F: FnMut() -> A> Server<A, F> {
    /// A server with an OS-seeded random generator (session IDs).
    pub fn new(cfg: ServerConfig, new_authenticator: F) -> Server<A, F> {
        Server::with_rng(cfg, new_authenticator, StdRng::from_os_rng())
    }

    /// A server with the given random generator (deterministic tests).
    pub fn with_rng(cfg: ServerConfig, new_authenticator: F, rng: StdRng) -> Server<A, F> {
        let retransmit = cfg.retransmit;
        Server {
            out: Outbox {
                transmits: VecDeque::new(),
                rng,
                retransmit: cfg.retransmit,
            },
            cfg,
            new_authenticator,
            sessions: Table::new(retransmit),
            initiations: HashMap::new(),
            events: VecDeque::new(),
            backend: VecDeque::new(),
            with_sa: HashMap::new(),
            half_open: HashMap::new(),
            started: HashMap::new(),
        }
    }

    /// Sessions in the table (any phase).
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Whether `ip` has a session with an SA (RFC 7652 §3.1.3: its untagged common
    /// requests get AUTHENTICATION_REQUIRED even where authentication is optional).
    pub fn has_session_from(&self, ip: IpAddr) -> bool {
        self.with_sa.contains_key(&ip)
    }

    fn count_sa(&mut self, ip: IpAddr, up: bool) {
        count(&mut self.with_sa, ip, up);
    }

    /// Whether `ip`'s prefix may open another session without an SA.
    fn half_open_allowed(&self, ip: IpAddr) -> bool {
        self.half_open
            .get(&prefix_of(ip))
            .is_none_or(|&n| (n as usize) < self.cfg.max_half_open_per_prefix)
    }

    /// The identity of an established session.
    pub fn identity(&self, session_id: u32) -> Option<&str> {
        let s = self.sessions.get(&session_id)?;
        s.sa.as_ref().and(s.identity.as_deref())
    }

    /// Snapshots of all sessions, in no particular order.
    pub fn sessions(&self) -> impl Iterator<Item = SessionInfo> + '_ {
        self.sessions.iter().map(|(&id, s)| s.info(id))
    }

    /// A snapshot of one session.
    pub fn session(&self, session_id: u32) -> Option<SessionInfo> {
        self.sessions.get(&session_id).map(|s| s.info(session_id))
    }

    /// The settings in force.
    pub fn config(&self) -> &ServerConfig {
        &self.cfg
    }

    /// New settings (a reload): sessions opened from now on get them; an SA in place
    /// keeps the lifetime it was granted.
    pub fn set_config(&mut self, cfg: ServerConfig) {
        self.out.retransmit = cfg.retransmit;
        if cfg.retransmit != self.cfg.retransmit {
            // The MRD moves the give-up time of every exchange under way.
            self.sessions.set_config(cfg.retransmit);
        }
        self.cfg = cfg;
    }

    /// A new maker of authenticators (a reload: new certificate, credentials or back
    /// end). Conversations under way keep the authenticator they started with; new
    /// ones and re-authentications get the new kind.
    pub fn set_authenticator(&mut self, new_authenticator: F) {
        self.new_authenticator = new_authenticator;
    }

    /// The state a successor needs to keep verifying and tagging an established
    /// session (HA replication, docs/AUTH.md "Pair mode"), with the lifetime left at
    /// `now`; `None` for a session without an SA. During a re-authentication it is the
    /// SA in use (the exchange itself is not exported).
    pub fn export(&self, session_id: u32, now: Time) -> Option<SessionExport> {
        let s = self.sessions.get(&session_id)?;
        let sa = s.sa.as_ref()?;
        let identity = s.identity.clone()?;
        Some(SessionExport {
            session_id,
            client: s.client,
            identity,
            nonce: s.nonce,
            key_id: sa.key.id,
            key: *sa.key.as_bytes(),
            prf: crate::crypto::PRF_HMAC_SHA2_256,
            mac: crate::crypto::AUTH_HMAC_SHA2_256_128,
            remaining_ms: sa.expires.0.saturating_sub(now.0),
            pa_in: s.link.in_seq,
            pa_out: s.link.out_seq,
            sequence: self.sequence_state(session_id)?,
        })
    }

    /// The sequence-number state of an established session's common messages: what
    /// moves with every request, replicated far more often than the rest.
    pub fn sequence_state(&self, session_id: u32) -> Option<SequenceState> {
        let sa = self.sessions.get(&session_id)?.sa.as_ref()?;
        Some(SequenceState {
            last_in: sa.common_in.state(),
            next_out: sa.common_out,
        })
    }

    /// Installs a session exported by another server (a takeover): from now on its
    /// tagged requests verify here and its replies are tagged here, without a new
    /// authentication. Replaces a session with the same ID. The outgoing common
    /// sequence number jumps [`FAILOVER_OUT_JUMP`] past the exported one, since the
    /// exporter may have tagged replies after its last export; incoming numbers must be
    /// greater than the exported last one (or be that very message again).
    pub fn import(&mut self, now: Time, state: &SessionExport) -> Result<(), ImportError> {
        if state.session_id == 0 || state.key_id == 0 {
            return Err(ImportError::Invalid);
        }
        if !SUPPORTED_PRFS.contains(&state.prf) || !SUPPORTED_MACS.contains(&state.mac) {
            return Err(ImportError::Algorithm {
                prf: state.prf,
                mac: state.mac,
            });
        }
        if state.remaining_ms == 0 {
            return Err(ImportError::Expired);
        }
        if !self.sessions.contains_key(&state.session_id)
            && self.sessions.len() >= self.cfg.max_sessions
        {
            return Err(ImportError::Full);
        }
        let id = state.session_id;
        let mut s = self.fresh(now, state.client, state.nonce);
        s.phase = Phase::Established;
        // Established here as far as this server's operator can tell.
        s.established = Some(now);
        s.link = Link::new(state.pa_out, state.pa_in);
        s.chosen = true;
        s.identity = Some(state.identity.clone());
        s.last_key_id = state.key_id;
        s.sa = Some(Sa {
            key: TransportKey::from_bytes(state.key_id, state.key),
            common_out: state.sequence.next_out.saturating_add(FAILOVER_OUT_JUMP),
            common_in: ReplayWindow::resume(state.sequence.last_in),
            expires: Time(now.0.saturating_add(state.remaining_ms)),
        });
        // The replaced session leaves its indexes; this one counts for its IP (S2).
        self.forget(id);
        let ip = s.client.ip();
        self.sessions.insert(id, s);
        self.count_sa(ip, true);
        Ok(())
    }

    /// Drops every session without a word to its client: a node stepping down from
    /// active (its successor holds the replicated ones) or about to import a
    /// replicated set.
    pub fn forget_all(&mut self) {
        self.sessions.clear();
        self.initiations.clear();
        self.backend.clear();
        self.with_sa.clear();
        self.half_open.clear();
        self.started.clear();
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events.pop_front()
    }

    fn new_session_id(&mut self) -> u32 {
        loop {
            let id: u32 = self.out.rng.random();
            if id != 0 && !self.sessions.contains_key(&id) {
                return id;
            }
        }
    }

    /// Starts a server-initiated session with `client` (RFC 7652 §3.1.2), e.g. after
    /// answering its common request with AUTHENTICATION_REQUIRED. Returns the session
    /// ID, or `None` when the table is full.
    ///
    /// At most one such session per client IP waits for the client's first answer: asked
    /// again meanwhile (the client retries its request), the server sends that
    /// session's first PA-Server again, at most once per 500 ms. The first PA-Server is
    /// not retransmitted on a timer: only the client's messages make the server send
    /// (docs/AUTH.md S4).
    pub fn start(&mut self, now: Time, client: SocketAddr) -> Option<u32> {
        self.start_at_epoch(now, client, epoch(now))
    }

    /// [`Server::start`] with the PCP server's Epoch Time for `client` at `now` (the
    /// PA-Server messages carry it, advancing with `now`).
    pub fn start_at_epoch(&mut self, now: Time, client: SocketAddr, epoch: u32) -> Option<u32> {
        if let Some(&(id, last)) = self.started.get(&client.ip())
            && let Some(s) = self.sessions.get(&id)
        {
            if now.saturating_since(last) >= crate::pa::DUPLICATE_REPLY_GAP
                && let Some(m) = &s.link.last_out
            {
                self.out.transmits.push_back(Transmit {
                    dst: s.client,
                    payload: m.clone(),
                });
                self.started.insert(client.ip(), (id, now));
            }
            return Some(id);
        }
        if self.sessions.len() >= self.cfg.max_sessions || !self.half_open_allowed(client.ip()) {
            return None;
        }
        let id = self.new_session_id();
        let mut session = self.fresh(now, client, 0);
        session.epoch_offset = epoch_offset(now, epoch);
        self.sessions.insert(id, session);
        count(&mut self.half_open, prefix_of(client.ip()), true);
        self.started.insert(client.ip(), (id, now));
        self.open(now, id, None);
        self.sessions.settle();
        Some(id)
    }

    fn fresh(&mut self, now: Time, client: SocketAddr, nonce: u32) -> Session<A> {
        Session {
            client,
            nonce,
            echo_nonce: false,
            phase: Phase::Eap,
            link: Link::new(0, 0),
            auth: (self.new_authenticator)(),
            chosen: false,
            sa: None,
            pending: None,
            identity: None,
            last_key_id: 0,
            waiting: false,
            deadline: now.plus(self.cfg.retransmit.mrd),
            epoch_offset: 0,
            ack: None,
            created: now,
            established: None,
            accepted: 0,
            refused: 0,
        }
    }

    /// Sends the first PA-Server of a session: EAP request, algorithm lists, ID
    /// indicator, and the client's nonce when it sent one.
    fn open(&mut self, now: Time, id: u32, nonce: Option<u32>) {
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        let eap = s.auth.start();
        let mut opts: Vec<PcpOption> = Vec::new();
        opts.extend(nonce.map(PcpOption::Nonce));
        opts.extend(SUPPORTED_PRFS.iter().map(|&p| PcpOption::Prf(p)));
        opts.extend(SUPPORTED_MACS.iter().map(|&m| PcpOption::MacAlgorithm(m)));
        if let Some(ind) = &self.cfg.id_indicator {
            opts.push(PcpOption::IdIndicator(ind));
        }
        opts.push(PcpOption::EapPayload(&eap));
        let opts: Vec<PcpOption<'_>> = opts;
        // Not retransmitted (S4): the address is not verified yet, and the client's
        // retransmissions are answered with it.
        self.out.send(
            now,
            id,
            s,
            ResultCode::AuthenticationRequest,
            &opts,
            None,
            false,
        );
    }

    /// Handles a PA-Client message (an AUTHENTICATION request) from `src`. PA-Server
    /// messages carry the seconds since the time origin of `now` as Epoch Time; a shell
    /// in front of a PCP server core uses [`Server::handle_at_epoch`].
    pub fn handle(&mut self, now: Time, src: SocketAddr, datagram: &[u8]) {
        self.handle_at_epoch(now, src, epoch(now), datagram);
    }

    /// [`Server::handle`] with the Epoch Time the PCP server core gives `src` at `now`:
    /// the session's PA-Server messages carry it from now on, advancing with `now`
    /// (RFC 7652 §3.3 "an appropriate Epoch Time").
    pub fn handle_at_epoch(&mut self, now: Time, src: SocketAddr, epoch: u32, datagram: &[u8]) {
        self.pa_message(now, src, epoch, datagram);
        self.sessions.settle();
    }

    fn pa_message(&mut self, now: Time, src: SocketAddr, epoch: u32, datagram: &[u8]) {
        let req = match Request::parse(datagram) {
            Ok(req) => req,
            Err(e) => {
                // RFC 6887 §8.3, as the core answers any request (review M4): the
                // error's code, ADDRESS_MISMATCH first for a well-framed header.
                if let Some(mut code) = e.result_code() {
                    let framed = matches!(
                        e,
                        pcp_proto::ParseError::UnsupportedOption { .. }
                            | pcp_proto::ParseError::MalformedOption { .. }
                            | pcp_proto::ParseError::Malformed(
                                pcp_proto::Malformed::BodyTruncated { .. }
                            )
                    );
                    let p = pcp_proto::Packet::new_unchecked(datagram);
                    if framed && p.client_addr().to_canonical() != src.ip().to_canonical() {
                        code = ResultCode::AddressMismatch;
                    }
                    self.error_answer(src, datagram, code, false, epoch);
                }
                return;
            }
        };
        if req.client_addr.to_canonical() != src.ip().to_canonical() {
            self.error_answer(src, datagram, ResultCode::AddressMismatch, true, epoch);
            return;
        }
        let pcp_proto::Body::Authentication(body) = req.body else {
            return;
        };
        if body.session_id == 0 {
            self.initiation(now, src, epoch, datagram, &req);
            return;
        }
        let Some(s) = self.sessions.get_mut(&body.session_id) else {
            // RFC 7652 §3.2 / IANA 20: no PA session with this ID.
            let mut out = vec![0u8; pcp_proto::MAX_MESSAGE_LEN];
            if let Ok(n) = emit_error_response(
                datagram,
                ResultCode::UnknownSessionId,
                0,
                epoch,
                true,
                &mut out,
            ) {
                out.truncate(n);
                self.out.transmits.push_back(Transmit {
                    dst: src,
                    payload: out,
                });
            }
            return;
        };
        if src.ip() != s.client.ip() {
            return;
        }
        s.epoch_offset = epoch_offset(now, epoch);
        if let Some(allowed) = s.link.duplicate_allowed(datagram, now) {
            // While the back end thinks, our last message is not the answer to it:
            // §6.3 "if no outgoing PA message has been generated for the received
            // duplicate PA message yet, the device needs to send a
            // PA-Acknowledgement" (rate-limited like any answer to a duplicate).
            // Otherwise our last message, if it answers this one (S3).
            let answer = if s.waiting {
                s.ack.clone()
            } else {
                s.link.answer()
            }
            .filter(|_| allowed);
            self.out
                .transmits
                .extend(answer.map(|payload| Transmit { dst: src, payload }));
            return;
        }
        if body.sequence_number != s.link.in_seq {
            return;
        }
        // Which key must have tagged it: the pending one for the confirmation of a
        // (re-)authentication, the SA's otherwise, none before the first SA.
        let rc = req.pa_result_code;
        let key = if s.phase == Phase::AwaitFinal && rc == ResultCode::AuthenticationSucceeded {
            s.pending.as_ref().map(|(k, _)| k)
        } else {
            s.sa.as_ref().map(|sa| &sa.key)
        };
        if let Some(k) = key
            && !tag::verify(datagram, k).is_ok_and(|t| t.key_id == k.id)
        {
            return;
        }
        if let Some(acked) = req.options.received_pak() {
            if acked == s.link.out_seq.wrapping_sub(1)
                && let Some(r) = &mut s.link.retransmit
            {
                r.acknowledged();
            }
            return;
        }
        let id = body.session_id;
        if s.client != src {
            // Keep the PA-Initiation's entry findable by `remove` (a NAT rebinding).
            if self.initiations.get(&(s.client, s.nonce)) == Some(&id) {
                self.initiations.remove(&(s.client, s.nonce));
                self.initiations.insert((src, s.nonce), id);
            }
            s.client = src;
        }
        if s.link.in_seq == 0 && self.started.get(&src.ip()).is_some_and(|&(v, _)| v == id) {
            // The server-initiated session is answered: no longer the one to resend.
            self.started.remove(&src.ip());
        }
        match (s.phase, rc) {
            (Phase::Eap | Phase::AwaitFinal, ResultCode::AuthenticationReply) => {
                if s.phase == Phase::AwaitFinal {
                    return;
                }
                if s.link.in_seq == 0 && s.link.out_seq == 1 && s.sa.is_none() {
                    // First PA-Client of a server-initiated session: its nonce (if any)
                    // keys the session and comes back in our next message (§3.1.2).
                    if let Some(n) = req.options.nonce() {
                        s.nonce = n;
                        s.echo_nonce = true;
                    }
                }
                s.link.accepted(datagram);
                self.eap_reply(now, id, &req);
            }
            (Phase::AwaitFinal, ResultCode::AuthenticationSucceeded) => {
                s.link.accepted(datagram);
                self.confirmed(now, id, &req);
            }
            // A re-authentication asked by the client (docs/AUTH.md: INITIATION in an
            // established session); it also wins over one this server started (§3.4).
            (Phase::Established | Phase::Eap, ResultCode::Initiation) if s.sa.is_some() => {
                s.link.accepted(datagram);
                s.auth = (self.new_authenticator)();
                s.waiting = false;
                self.reauth_request(now, id);
            }
            (_, ResultCode::SessionTerminated) => {
                s.link.accepted(datagram);
                if s.phase != Phase::Terminating {
                    // §3.3: answer with a termination-indicating PA message.
                    let key = s.sa.as_ref().map(|sa| sa.key.clone());
                    self.out.send(
                        now,
                        id,
                        s,
                        ResultCode::SessionTerminated,
                        &[],
                        key.as_ref(),
                        false,
                    );
                    self.remove(id, Cause::ByClient);
                } else {
                    self.remove(id, Cause::ByServer);
                }
            }
            // §3.1.3: the client refusing the server (it could not authenticate or
            // authorize it) ends the session "immediately" (review M5).
            (_, ResultCode::AuthenticationFailed | ResultCode::AuthorizationFailed) => {
                s.link.accepted(datagram);
                self.remove(id, Cause::RefusedByClient);
            }
            _ => {}
        }
    }

    /// The PCP server core's Epoch Time for `session_id`'s client at `now` (from a
    /// tagged common request of that session): the session's PA-Server messages carry
    /// it from now on (I1), also after an HA import or a reset of the client's epoch.
    pub fn note_epoch(&mut self, session_id: u32, now: Time, epoch: u32) {
        if let Some(s) = self.sessions.get_mut(&session_id) {
            s.epoch_offset = epoch_offset(now, epoch);
        }
        self.sessions.settle();
    }

    /// An RFC 6887 error answer to the PA-Client in `datagram` (a copy of it).
    fn error_answer(
        &mut self,
        src: SocketAddr,
        datagram: &[u8],
        code: ResultCode,
        parsed: bool,
        epoch: u32,
    ) {
        let lifetime = if code.is_short_lifetime_error() {
            30
        } else {
            1800
        };
        let mut out = vec![0u8; pcp_proto::MAX_MESSAGE_LEN];
        if let Ok(n) = emit_error_response(datagram, code, lifetime, epoch, parsed, &mut out) {
            out.truncate(n);
            self.out.transmits.push_back(Transmit {
                dst: src,
                payload: out,
            });
        }
    }

    /// A PA-Initiation (session ID 0): a new session, or a retransmission of the one
    /// that opened a session not answered yet.
    fn initiation(
        &mut self,
        now: Time,
        src: SocketAddr,
        epoch: u32,
        datagram: &[u8],
        req: &Request,
    ) {
        // §6.4: a session's first PA message has sequence number 0 (review M9).
        let first =
            matches!(req.body, pcp_proto::Body::Authentication(b) if b.sequence_number == 0);
        if req.pa_result_code != ResultCode::Initiation || !first {
            return;
        }
        // §3.1.1: the PA-Initiation MUST carry a NONCE; without one it is dropped.
        let Some(nonce) = req.options.nonce() else {
            return;
        };
        if let Some(&id) = self.initiations.get(&(src, nonce)) {
            if let Some(s) = self.sessions.get_mut(&id)
                && let Some(answer) = s.link.duplicate(datagram, now)
            {
                self.out
                    .transmits
                    .extend(answer.map(|payload| Transmit { dst: src, payload }));
            }
            return;
        }
        if self.sessions.len() >= self.cfg.max_sessions || !self.half_open_allowed(src.ip()) {
            return;
        }
        let id = self.new_session_id();
        let mut s = self.fresh(now, src, nonce);
        s.epoch_offset = epoch_offset(now, epoch);
        s.link.accepted(datagram);
        self.sessions.insert(id, s);
        count(&mut self.half_open, prefix_of(src.ip()), true);
        self.initiations.insert((src, nonce), id);
        self.open(now, id, Some(nonce));
    }

    /// An EAP response in a session: on to the authenticator.
    fn eap_reply(&mut self, now: Time, id: u32, req: &Request) {
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        if !s.chosen {
            // §3.1.3: the client's first reply names one PRF and one MAC it chose from
            // the lists offered.
            let prfs: Vec<u32> = req.options.prfs().collect();
            let macs: Vec<u32> = req.options.mac_algorithms().collect();
            let ok = prfs.len() == 1
                && macs.len() == 1
                && SUPPORTED_PRFS.contains(&prfs[0])
                && SUPPORTED_MACS.contains(&macs[0]);
            if !ok {
                self.fail(
                    now,
                    id,
                    ResultCode::AuthenticationFailed,
                    None,
                    Cause::NoCommonAlgorithm,
                );
                return;
            }
            s.chosen = true;
        }
        let Some(eap) = req.options.eap_payload() else {
            return;
        };
        let step = s.auth.receive(eap);
        self.step(now, id, step);
    }

    /// Sessions whose authenticator answered [`AuthStep::Pending`]: the shell takes
    /// what the authenticator has for its back end ([`Server::authenticator_mut`]) and
    /// later calls [`Server::resume`].
    pub fn poll_backend(&mut self) -> Option<u32> {
        self.backend.pop_front()
    }

    /// The shell could not hand the message `session_id` waits on to its back end (a
    /// full work queue, say): the session forgets that message and stops waiting, so
    /// the client's retransmission of it is taken as new, not answered as a
    /// duplicate. The authenticator must not have acted on the message yet. Nothing
    /// happens for a session that is gone or not waiting.
    pub fn backend_refused(&mut self, session_id: u32) {
        let Some(s) = self.sessions.get_mut(&session_id) else {
            return;
        };
        if !s.waiting || s.phase != Phase::Eap {
            return;
        }
        s.waiting = false;
        s.ack = None;
        s.link.unaccept();
        self.backend.retain(|&id| id != session_id);
        self.sessions.settle();
    }

    /// The authenticator of a session (to reach a back end's outgoing request).
    pub fn authenticator_mut(&mut self, session_id: u32) -> Option<&mut A> {
        self.sessions.get_mut(&session_id).map(|s| &mut s.auth)
    }

    /// The back end answered for `session_id`: `f` turns the answer into the next
    /// step with the session's authenticator (which discards an answer it no longer
    /// waits for). Nothing happens for a session that is gone or not waiting.
    pub fn resume(&mut self, now: Time, session_id: u32, f: impl FnOnce(&mut A) -> AuthStep) {
        self.resume_step(now, session_id, f);
        self.sessions.settle();
    }

    fn resume_step(&mut self, now: Time, session_id: u32, f: impl FnOnce(&mut A) -> AuthStep) {
        let Some(s) = self.sessions.get_mut(&session_id) else {
            return;
        };
        if !s.waiting || s.phase != Phase::Eap {
            return;
        }
        let step = f(&mut s.auth);
        self.step(now, session_id, step);
    }

    /// Carries out what the authenticator decided.
    fn step(&mut self, now: Time, id: u32, step: AuthStep) {
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        s.waiting = matches!(step, AuthStep::Pending) || (s.waiting && step == AuthStep::Discard);
        if !s.waiting {
            s.ack = None;
        }
        let current = s.sa.as_ref().map(|sa| sa.key.clone());
        match step {
            AuthStep::Request(packet) => {
                let mut opts = Vec::new();
                if std::mem::take(&mut s.echo_nonce) {
                    opts.push(PcpOption::Nonce(s.nonce));
                }
                opts.push(PcpOption::EapPayload(&packet));
                self.out.send(
                    now,
                    id,
                    s,
                    ResultCode::AuthenticationRequest,
                    &opts,
                    current.as_ref(),
                    true,
                );
            }
            AuthStep::Success {
                packet,
                msk,
                identity,
            } => {
                let authorized = self.cfg.authorize.as_ref().is_none_or(|f| f(&identity));
                if !authorized {
                    self.fail(
                        now,
                        id,
                        ResultCode::AuthorizationFailed,
                        Some(&packet),
                        Cause::AuthorizationFailed,
                    );
                    return;
                }
                let key_id = s.last_key_id.wrapping_add(1).max(1);
                s.last_key_id = key_id;
                let key = TransportKey::derive(&msk, id, s.nonce, key_id);
                let mut opts = Vec::new();
                if std::mem::take(&mut s.echo_nonce) {
                    opts.push(PcpOption::Nonce(s.nonce));
                }
                opts.push(PcpOption::SessionLifetime(self.cfg.session_lifetime));
                opts.push(PcpOption::EapPayload(&packet));
                // §3.1.3: SUCCEEDED is already tagged with the new transport key.
                self.out.send(
                    now,
                    id,
                    s,
                    ResultCode::AuthenticationSucceeded,
                    &opts,
                    Some(&key),
                    true,
                );
                s.pending = Some((key, Arc::from(identity)));
                s.phase = Phase::AwaitFinal;
            }
            AuthStep::Failure { packet } => {
                self.fail(
                    now,
                    id,
                    ResultCode::AuthenticationFailed,
                    Some(&packet),
                    Cause::AuthenticationFailed,
                );
            }
            AuthStep::Discard => {}
            AuthStep::Pending => {
                self.backend.push_back(id);
                if !s.auth.acknowledge_pending() {
                    return;
                }
                // §3.1.3: the answer cannot be sent at once (the back end, e.g. a
                // RADIUS server, takes its time): acknowledge the client's message
                // so it stops retransmitting (docs/AUTH.md, "PA-Acknowledgements").
                let acked = s.link.in_seq.wrapping_sub(1);
                let mut opts = Vec::new();
                if s.echo_nonce {
                    opts.push(PcpOption::Nonce(s.nonce));
                }
                opts.push(PcpOption::ReceivedPak(acked));
                // §6.4: a PA-Acknowledgement moves no sequence number; it carries the
                // number our next PA message will have.
                if let Some(m) = build(
                    Side::Server(s.epoch_at(now)),
                    ResultCode::AuthenticationRequest,
                    id,
                    s.link.out_seq,
                    &opts,
                    current.as_ref(),
                ) {
                    self.out.transmits.push_back(Transmit {
                        dst: s.client,
                        payload: m.clone(),
                    });
                    s.ack = Some(m);
                }
            }
        }
    }

    /// The client's AUTHENTICATION_SUCCEEDED, tagged with the new key: downgrade check,
    /// then the new SA.
    fn confirmed(&mut self, now: Time, id: u32, req: &Request) {
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        let Some((key, identity)) = s.pending.take() else {
            return;
        };
        // §3.1.3: the algorithm lists must be the ones offered (as sets).
        let mut prfs: Vec<u32> = req.options.prfs().collect();
        let mut macs: Vec<u32> = req.options.mac_algorithms().collect();
        prfs.sort_unstable();
        prfs.dedup();
        macs.sort_unstable();
        macs.dedup();
        if prfs != SUPPORTED_PRFS || macs != SUPPORTED_MACS {
            if s.sa.is_some() {
                // A re-authentication: the client reset its PA sequence numbers when it
                // sent this confirmation (§3.4), so the answer is the new SA's first.
                s.link.out_seq = 0;
            }
            self.out.send(
                now,
                id,
                s,
                ResultCode::DowngradeAttackDetected,
                &[],
                Some(&key),
                false,
            );
            self.remove(id, Cause::DowngradeDetected);
            return;
        }
        let reauth = s.sa.is_some();
        let ip = s.client.ip();
        s.sa = Some(Sa {
            key,
            common_out: 0,
            common_in: ReplayWindow::new(),
            expires: now.plus_secs(self.cfg.session_lifetime),
        });
        s.identity = Some(identity.clone());
        s.established.get_or_insert(now);
        s.phase = Phase::Established;
        s.link.retransmit = None;
        if reauth {
            // §3.4: sequence numbers start again at zero with the new SA.
            s.link.out_seq = 0;
            s.link.in_seq = 0;
            self.events.push_back(ServerEvent::Reauthenticated {
                session_id: id,
                identity,
            });
        } else {
            self.events.push_back(ServerEvent::Established {
                session_id: id,
                client: s.client,
                identity,
                lifetime: self.cfg.session_lifetime,
            });
            self.count_sa(ip, true);
            count(&mut self.half_open, prefix_of(ip), false);
        }
    }

    /// First EAP request of a re-authentication, tagged with the current key.
    fn reauth_request(&mut self, now: Time, id: u32) {
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        let Some(key) = s.sa.as_ref().map(|sa| sa.key.clone()) else {
            return;
        };
        s.phase = Phase::Eap;
        s.pending = None;
        let eap = s.auth.start();
        self.out.send(
            now,
            id,
            s,
            ResultCode::AuthenticationRequest,
            &[PcpOption::EapPayload(&eap)],
            Some(&key),
            true,
        );
    }

    /// Starts a re-authentication of an established session (RFC 7652 §3.4).
    pub fn reauthenticate(&mut self, now: Time, session_id: u32) {
        if self
            .sessions
            .get(&session_id)
            .is_none_or(|s| s.phase != Phase::Established)
        {
            return;
        }
        let Some(s) = self.sessions.get_mut(&session_id) else {
            return;
        };
        s.auth = (self.new_authenticator)();
        s.waiting = false;
        self.reauth_request(now, session_id);
        self.sessions.settle();
    }

    /// Ends a session: SESSION_TERMINATED to the client, retransmitted until it answers
    /// (RFC 7652 §3.3).
    pub fn terminate(&mut self, now: Time, session_id: u32) {
        let Some(s) = self.sessions.get_mut(&session_id) else {
            return;
        };
        let key = s.sa.as_ref().map(|sa| sa.key.clone());
        s.phase = Phase::Terminating;
        self.out.send(
            now,
            session_id,
            s,
            ResultCode::SessionTerminated,
            &[],
            key.as_ref(),
            true,
        );
        self.sessions.settle();
    }

    /// Sends a final failure PA-Server and drops the session (§3.1.3: terminated "immediately").
    fn fail(&mut self, now: Time, id: u32, rc: ResultCode, eap: Option<&[u8]>, cause: Cause) {
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        let key = s.sa.as_ref().map(|sa| sa.key.clone());
        let opts: Vec<PcpOption> = eap.map(PcpOption::EapPayload).into_iter().collect();
        self.out.send(now, id, s, rc, &opts, key.as_ref(), false);
        self.remove(id, cause);
    }

    fn remove(&mut self, id: u32, cause: Cause) {
        self.forget(id);
        self.events.push_back(ServerEvent::Ended {
            session_id: id,
            cause,
        });
    }

    /// Takes a session out of the table and of every index (no event).
    fn forget(&mut self, id: u32) {
        if let Some(s) = self.sessions.remove(&id) {
            let ip = s.client.ip();
            if s.sa.is_some() {
                self.count_sa(ip, false);
            } else {
                count(&mut self.half_open, prefix_of(ip), false);
            }
            // O(1), not a scan: floods of half-open sessions end in bulk.
            if self.initiations.get(&(s.client, s.nonce)) == Some(&id) {
                self.initiations.remove(&(s.client, s.nonce));
            }
            if self.started.get(&ip).is_some_and(|&(v, _)| v == id) {
                self.started.remove(&ip);
            }
        }
    }

    /// When [`Server::handle_timeout`] must run next. O(1) in the number of sessions
    /// (their deadlines are indexed).
    pub fn poll_timeout(&self) -> Option<Time> {
        self.sessions.next()
    }

    /// Runs the timers: retransmissions, giving up, expiry, and re-authentication when a
    /// sequence space is nearly used up. Visits only the sessions whose deadline has
    /// passed (O(log n) plus their number).
    pub fn handle_timeout(&mut self, now: Time) {
        for id in self.sessions.due(now) {
            self.run_timers(now, id);
        }
        self.sessions.settle();
    }

    /// [`Server::poll_timeout`] by looking at every session: the reference the deadline
    /// index is tested and benchmarked against. Not for use.
    #[doc(hidden)]
    pub fn poll_timeout_scan(&self) -> Option<Time> {
        self.sessions.scan_next()
    }

    /// [`Server::handle_timeout`] finding the due sessions by looking at every session
    /// (as before the index), then running them in the same order. Not for use.
    #[doc(hidden)]
    pub fn handle_timeout_scan(&mut self, now: Time) {
        for id in self.sessions.scan_due(now) {
            self.run_timers(now, id);
        }
        self.sessions.settle();
    }

    /// Sessions changed but not re-indexed (tests: none between calls).
    #[doc(hidden)]
    pub fn unsettled_timers(&self) -> usize {
        self.sessions.unsettled()
    }

    /// The timers of one session whose deadline has passed.
    fn run_timers(&mut self, now: Time, id: u32) {
        let cfg = self.cfg.retransmit;
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        if s.sa.as_ref().is_some_and(|sa| now >= sa.expires) {
            self.remove(id, Cause::Expired);
            return;
        }
        // Giving up on a termination is the server's doing; on anything else, a
        // timeout.
        let cause = if s.phase == Phase::Terminating {
            Cause::ByServer
        } else {
            Cause::Timeout
        };
        if s.sa.is_none() && now >= s.deadline {
            // A half-open session the client stopped feeding (S1 in docs/AUTH.md).
            self.remove(id, cause);
            return;
        }
        if let Some(r) = &mut s.link.retransmit {
            if r.expired(now, &cfg) {
                self.remove(id, cause);
                return;
            }
            if r.due(now, &cfg, &mut self.out.rng)
                && let Some(m) = &s.link.last_out
            {
                self.out.transmits.push_back(Transmit {
                    dst: s.client,
                    payload: m.clone(),
                });
            }
        }
        let exhausted = s.link.out_seq >= REAUTH_THRESHOLD
            || s.sa
                .as_ref()
                .is_some_and(|sa| sa.common_out >= REAUTH_THRESHOLD);
        if s.phase == Phase::Established && exhausted {
            self.reauthenticate(now, id);
        }
    }

    /// Checks the AUTHENTICATION_TAG of a common request from `src` (RFC 7652 §6.2,
    /// §6.5). Nothing changes unless the tag verifies; then its sequence number is
    /// recorded.
    pub fn check_request(&mut self, src: IpAddr, datagram: &[u8]) -> Check {
        // Not framed far enough to hold a tag: untagged (the core judges the framing).
        let at = match tag::locate(datagram) {
            Ok(at) if at.code == pcp_proto::OptionCode::AuthenticationTag => at,
            Ok(_) | Err(tag::TagError::Missing | tag::TagError::NotFramed) => {
                return Check::Untagged;
            }
            Err(_) => return Check::Discard(Discard::BadTag),
        };
        if Opcode::from_bits(datagram[1]) == Opcode::Authentication {
            return Check::Untagged;
        }
        let id = at.session_id;
        self.sessions
            .update(&id, |s| {
                // A session this server is terminating serves nothing more (§3.3): the
                // client that missed SESSION_TERMINATED learns it this way.
                if s.phase == Phase::Terminating {
                    return Check::UnknownSession;
                }
                let verdict = match Session::<A>::verify_common(
                    s.sa.as_mut(),
                    s.client,
                    src,
                    datagram,
                    &at,
                ) {
                    Ok(v) => v,
                    Err(why) => {
                        s.refused += 1;
                        return Check::Discard(why);
                    }
                };
                s.accepted += 1;
                let Some(identity) = s.identity.as_ref() else {
                    return Check::Discard(Discard::NoKey);
                };
                Check::Authenticated {
                    session_id: id,
                    identity: identity.clone(),
                    retransmission: verdict == SeqVerdict::Retransmission,
                }
            })
            .unwrap_or(Check::UnknownSession)
    }

    /// Tags the response in `buf[..len]` for `session_id` with the next common sequence
    /// number; returns the new length.
    pub fn protect_response(
        &mut self,
        session_id: u32,
        buf: &mut [u8],
        len: usize,
    ) -> Result<usize, ProtectError> {
        // Crossing REAUTH_THRESHOLD makes the session due at once.
        self.sessions
            .update(&session_id, |s| {
                let sa = s.sa.as_mut().ok_or(ProtectError::NoSession)?;
                if sa.common_out == u32::MAX {
                    return Err(ProtectError::SequenceExhausted);
                }
                let n = tag::seal(buf, len, &sa.key, (session_id, sa.common_out))?;
                sa.common_out += 1;
                Ok(n)
            })
            .unwrap_or(Err(ProtectError::NoSession))
    }
}

/// Adds or takes one from `key`'s count, dropping counts that reach zero.
fn count(map: &mut HashMap<IpAddr, u32>, key: IpAddr, up: bool) {
    if up {
        *map.entry(key).or_insert(0) += 1;
    } else if let Some(n) = map.get_mut(&key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(&key);
        }
    }
}

/// The prefix half-open sessions are counted by: /24 for IPv4, /56 for IPv6 (a
/// typical subscriber's delegation).
fn prefix_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4((u32::from(v4) & 0xffff_ff00).into()),
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 72) - 1)).into()),
    }
}

/// Where PA messages leave: the queue the shell drains and the randomness of the
/// retransmission timers. A field of its own so that a session borrowed from the
/// table can send through it.
struct Outbox {
    transmits: VecDeque<Transmit>,
    rng: StdRng,
    /// `ServerConfig::retransmit` (the configuration never changes after start).
    retransmit: RetransmitConfig,
}

impl Outbox {
    /// Sends a PA message of session `id` with the next sequence number, tagged with
    /// `key` when given; `awaiting` arms retransmission until the client answers.
    #[allow(clippy::too_many_arguments)]
    fn send<A>(
        &mut self,
        now: Time,
        id: u32,
        s: &mut Session<A>,
        rc: ResultCode,
        opts: &[PcpOption<'_>],
        key: Option<&TransportKey>,
        awaiting: bool,
    ) {
        let seq = s.link.next_out();
        // §3.1.2: the PA-Server after the client's first PA-Client echoes its nonce,
        // whatever it says (also a failure or a termination; review M2).
        let with_nonce: Vec<PcpOption<'_>>;
        let opts = if std::mem::take(&mut s.echo_nonce) {
            with_nonce = std::iter::once(PcpOption::Nonce(s.nonce))
                .chain(opts.iter().cloned())
                .collect();
            &with_nonce[..]
        } else {
            opts
        };
        let Some(msg) = build(Side::Server(s.epoch_at(now)), rc, id, seq, opts, key) else {
            return;
        };
        let retransmit = awaiting.then(|| Retransmit::start(now, &self.retransmit, &mut self.rng));
        self.transmits.push_back(Transmit {
            dst: s.client,
            payload: msg.clone(),
        });
        s.link.sent(msg, retransmit);
        s.deadline = now.plus(self.retransmit.mrd);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    impl EapAuthenticator for Echo {
        fn start(&mut self) -> Vec<u8> {
            vec![1, 1, 0, 5, 1]
        }
        fn receive(&mut self, _: &[u8]) -> AuthStep {
            AuthStep::Discard
        }
    }

    /// RFC 7652 §3.4: when its sequence space runs out the server re-authenticates.
    #[test]
    fn sequence_space_running_out_triggers_reauthentication() {
        let mut s = Server::with_rng(ServerConfig::default(), || Echo, StdRng::seed_from_u64(1));
        let client: SocketAddr = "192.0.2.1:5350".parse().unwrap();
        let key = TransportKey::from_bytes(1, [3; 32]);
        let mut session = s.fresh(Time(0), client, 9);
        session.phase = Phase::Established;
        session.identity = Some(Arc::from("alice"));
        session.sa = Some(Sa {
            key: key.clone(),
            common_out: REAUTH_THRESHOLD - 1,
            common_in: ReplayWindow::new(),
            expires: Time(u64::MAX),
        });
        s.sessions.insert(77, session);
        s.handle_timeout(Time(0));
        assert!(s.poll_transmit().is_none(), "not yet");
        let mut buf = [0u8; 1100];
        let resp = pcp_proto::Response {
            result_code: ResultCode::Success,
            lifetime: 0,
            epoch: 0,
            body: pcp_proto::Body::Announce,
            options: pcp_proto::Options::EMPTY,
        };
        let n = resp.emit(&mut buf).unwrap();
        s.protect_response(77, &mut buf, n).unwrap();
        s.handle_timeout(Time(0));
        let t = s.poll_transmit().expect("a re-authentication request");
        let r = pcp_proto::Response::parse(&t.payload).unwrap();
        assert_eq!(r.result_code, ResultCode::AuthenticationRequest);
        assert!(r.options.eap_payload().is_some());
        assert!(
            tag::verify(&t.payload, &key).is_ok(),
            "tagged with the current key"
        );
    }

    /// Review M3: DOWNGRADE_ATTACK_DETECTED at the end of a re-authentication carries
    /// PA sequence number 0, the one the client expects after its reset (§3.4).
    #[test]
    fn downgrade_during_reauthentication_reaches_the_client() {
        let mut s = Server::with_rng(ServerConfig::default(), || Echo, StdRng::seed_from_u64(1));
        let client: SocketAddr = "192.0.2.1:5350".parse().unwrap();
        let new = TransportKey::from_bytes(2, [4; 32]);
        let mut session = s.fresh(Time(0), client, 9);
        session.phase = Phase::AwaitFinal;
        session.identity = Some(Arc::from("alice"));
        session.sa = Some(Sa {
            key: TransportKey::from_bytes(1, [3; 32]),
            common_out: 0,
            common_in: ReplayWindow::new(),
            expires: Time(u64::MAX),
        });
        session.pending = Some((new.clone(), Arc::from("alice")));
        session.link = Link::new(7, 5);
        s.sessions.insert(77, session);
        let side = Side::Client(client.ip());
        let rc = ResultCode::AuthenticationSucceeded;
        let confirmation = build(side, rc, 77, 5, &[PcpOption::Prf(99)], Some(&new)).unwrap();
        s.handle(Time(0), client, &confirmation);
        let t = s.poll_transmit().expect("DOWNGRADE_ATTACK_DETECTED");
        let r = pcp_proto::Response::parse(&t.payload).unwrap();
        assert_eq!(r.result_code, ResultCode::DowngradeAttackDetected);
        let pcp_proto::Body::Authentication(b) = r.body else {
            panic!("not a PA message");
        };
        assert_eq!(b.sequence_number, 0);
        assert!(tag::verify(&t.payload, &new).is_ok());
        assert_eq!(s.session_count(), 0);
    }
}
