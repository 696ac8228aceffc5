//! The core's public data types: configuration, mapping requests, events.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use pcp_proto::{Filter, ResultCode};
use serde::Serialize;

use super::auth::{AuthFailure, Authentication, SessionEnd};
use super::retransmit::RetransmitConfig;

/// Identifies one mapping of a [`Client`](super::Client).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct MappingId(pub u64);

impl std::fmt::Display for MappingId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// How a [`Client`](super::Client) behaves towards its one server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The PCP server (usually port 5351).
    pub server: SocketAddr,
    /// This host's address as the server sees it: the PCP Client's IP Address field.
    pub client_addr: IpAddr,
    /// Retransmission of requests until a first answer (RFC 6887 §8.1.1).
    pub retransmit: RetransmitConfig,
    /// Retransmission of NAT-PMP requests after a fallback (RFC 6886 §3.1).
    pub natpmp_retransmit: RetransmitConfig,
    /// Probe the server with an unknown optional option to detect blind echoing
    /// (see [`canary`](super::canary)). On by default.
    pub canary: bool,
    /// Fall back to NAT-PMP when the server only speaks version 0. On by default.
    pub natpmp_fallback: bool,
    /// After an unsolicited ANNOUNCE reveals a state loss, mappings are re-created
    /// after a random delay up to this (RFC 6887 §14.1.3 spreads clients over 5 s).
    /// State loss seen in a response is acted on at once.
    pub announce_spread: Duration,
    /// Transmissions of a delete request before giving up (it is best effort).
    pub delete_attempts: u32,
    /// PCP authentication (RFC 7652): when set, the client authenticates before its
    /// first request, tags every request and accepts only responses whose tag verifies
    /// (see the [module docs](super#authentication)). NAT-PMP is then never used.
    pub authentication: Option<Authentication>,
}

impl Config {
    /// The defaults for `server`, with `client_addr` as this host's address.
    pub fn new(server: SocketAddr, client_addr: IpAddr) -> Config {
        Config {
            server,
            client_addr,
            retransmit: RetransmitConfig::default(),
            natpmp_retransmit: RetransmitConfig::natpmp(),
            canary: true,
            natpmp_fallback: true,
            announce_spread: Duration::from_secs(5),
            delete_attempts: 3,
            authentication: None,
        }
    }
}

/// MAP or PEER.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case", tag = "opcode")]
pub enum Kind {
    /// An inbound mapping (RFC 6887 §11).
    Map,
    /// An outbound mapping towards one remote peer (RFC 6887 §12).
    Peer {
        /// The remote peer.
        remote: SocketAddr,
    },
}

/// What to ask the server for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingRequest {
    /// MAP or PEER.
    pub kind: Kind,
    /// IANA protocol number (6 TCP, 17 UDP, …).
    pub protocol: u8,
    /// Internal port.
    pub internal_port: u16,
    /// Suggested external address and port (port 0: no preference).
    pub suggested_external: Option<SocketAddr>,
    /// Requested lifetime in seconds.
    pub lifetime: u32,
    /// Ask for CHECKPOINT_REQUIRED (RFC 7767).
    pub checkpoint: bool,
    /// THIRD_PARTY: make the mapping for this internal address.
    pub third_party: Option<IpAddr>,
    /// PREFER_FAILURE: the suggested external endpoint or nothing (MAP only).
    pub prefer_failure: bool,
    /// FILTERs (MAP only).
    pub filters: Vec<Filter>,
    /// DESCRIPTION (RFC 7220).
    pub description: Option<String>,
    /// Use this mapping nonce instead of a fresh random one (to renew or delete a
    /// mapping made by another process, e.g. an earlier `pcpc map`).
    pub nonce: Option<[u8; 12]>,
}

/// Lifetime asked for when a request does not say (2 hours, RFC 6886's recommendation).
pub const DEFAULT_LIFETIME: u32 = 7200;

impl MappingRequest {
    /// A MAP request for `protocol`/`internal_port` with the default lifetime.
    pub fn map(protocol: u8, internal_port: u16) -> MappingRequest {
        MappingRequest {
            kind: Kind::Map,
            protocol,
            internal_port,
            suggested_external: None,
            lifetime: DEFAULT_LIFETIME,
            checkpoint: false,
            third_party: None,
            prefer_failure: false,
            filters: Vec::new(),
            description: None,
            nonce: None,
        }
    }

    /// A PEER request from `internal_port` to `remote`.
    pub fn peer(protocol: u8, internal_port: u16, remote: SocketAddr) -> MappingRequest {
        MappingRequest {
            kind: Kind::Peer { remote },
            ..MappingRequest::map(protocol, internal_port)
        }
    }

    /// Sets the requested lifetime.
    pub fn lifetime(mut self, secs: u32) -> Self {
        self.lifetime = secs;
        self
    }

    /// Asks (or not) for CHECKPOINT_REQUIRED.
    pub fn checkpoint(mut self, on: bool) -> Self {
        self.checkpoint = on;
        self
    }

    /// Suggests an external endpoint.
    pub fn suggest(mut self, external: SocketAddr) -> Self {
        self.suggested_external = Some(external);
        self
    }

    /// Adds a DESCRIPTION.
    pub fn description(mut self, text: impl Into<String>) -> Self {
        self.description = Some(text.into());
        self
    }

    /// Makes the request for another internal address (THIRD_PARTY).
    pub fn third_party(mut self, internal: IpAddr) -> Self {
        self.third_party = Some(internal);
        self
    }

    /// Sets PREFER_FAILURE.
    pub fn prefer_failure(mut self, on: bool) -> Self {
        self.prefer_failure = on;
        self
    }

    /// Adds a FILTER.
    pub fn filter(mut self, f: Filter) -> Self {
        self.filters.push(f);
        self
    }

    /// Uses a known nonce.
    pub fn nonce(mut self, nonce: [u8; 12]) -> Self {
        self.nonce = Some(nonce);
        self
    }
}

/// Whether the server holds a checkpoint for a mapping, as far as the client can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointState {
    /// The request did not carry CHECKPOINT_REQUIRED.
    NotRequested,
    /// The server answered with option 192 and is known to echo only what it processed.
    Honoured,
    /// The server answered without option 192.
    NotHonoured,
    /// The server echoes options blindly (or refuses unknown optional ones): its
    /// answer says nothing about the checkpoint.
    Unknown,
    /// The mapping was made over NAT-PMP, which has no options.
    NotSupported,
}

impl CheckpointState {
    /// A word for people.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckpointState::NotRequested => "not requested",
            CheckpointState::Honoured => "honoured",
            CheckpointState::NotHonoured => "not honoured",
            CheckpointState::Unknown => "unknown",
            CheckpointState::NotSupported => "not supported (NAT-PMP)",
        }
    }
}

impl std::fmt::Display for CheckpointState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which protocol the server is spoken to in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Version {
    /// PCP version 2.
    Pcp,
    /// NAT-PMP (version 0), after the server refused version 2.
    NatPmp,
}

/// What the server granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Grant {
    /// External address and port.
    pub external: SocketAddr,
    /// Granted lifetime in seconds.
    pub lifetime: u32,
    /// The server's epoch time in the response.
    pub epoch: u32,
    /// The checkpoint state.
    pub checkpoint: CheckpointState,
    /// Protocol spoken.
    pub version: Version,
}

/// Why a mapping is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "reason", content = "detail")]
pub enum LostReason {
    /// The server refused it with a long-lifetime error; asking again will not help.
    /// The client forgets the mapping.
    Refused(#[serde(serialize_with = "ser_result")] ResultCode),
    /// No answer within MRC/MRD; the client forgets the mapping.
    NoResponse,
    /// It expired before a renewal was answered; the client goes on trying to create
    /// it again (a `Granted` follows when the server answers).
    Expired,
    /// The server speaks only NAT-PMP, which cannot make this mapping (PEER, or a
    /// protocol other than UDP and TCP); the client forgets the mapping.
    Unsupported,
}

fn ser_result<S: serde::Serializer>(r: &ResultCode, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&result_name(*r))
}

/// The RFC name of a result code, e.g. `USER_EX_QUOTA` (`UNKNOWN(n)` for codes no RFC
/// names).
pub fn result_name(r: ResultCode) -> String {
    r.to_string()
}

/// How a server state loss was noticed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LossCause {
    /// A response's epoch failed validation.
    Response,
    /// An ANNOUNCE's epoch failed validation.
    Announce,
}

/// Something the application may want to know. Mapping events carry the mapping's id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "event")]
pub enum Event {
    /// The mapping was created (also after a re-creation).
    Granted {
        /// The mapping.
        id: MappingId,
        /// What the server granted.
        grant: Grant,
    },
    /// A renewal was answered.
    Renewed {
        /// The mapping.
        id: MappingId,
        /// What the server granted.
        grant: Grant,
    },
    /// The external endpoint differs from the previous grant (follows `Granted` or
    /// `Renewed`).
    ExternalChanged {
        /// The mapping.
        id: MappingId,
        /// The previous external endpoint.
        previous: SocketAddr,
        /// The new grant.
        grant: Grant,
    },
    /// The checkpoint state differs from the previous grant (follows `Renewed` or
    /// `Granted`).
    CheckpointChanged {
        /// The mapping.
        id: MappingId,
        /// The previous state.
        previous: CheckpointState,
        /// The new grant.
        grant: Grant,
    },
    /// The server answered with a short-lifetime error; the client asks again later.
    Error {
        /// The mapping.
        id: MappingId,
        /// The result code.
        #[serde(serialize_with = "ser_result")]
        result: ResultCode,
        /// When the client asks again.
        #[serde(serialize_with = "ser_secs")]
        retry_in: Duration,
    },
    /// The mapping is gone; see the reason for what the client does next.
    Lost {
        /// The mapping.
        id: MappingId,
        /// Why.
        reason: LostReason,
    },
    /// The mapping was deleted (`confirmed`: the server said so).
    Deleted {
        /// The mapping.
        id: MappingId,
        /// Whether the server answered the delete.
        confirmed: bool,
    },
    /// The server lost its mapping state; every mapping is being re-created.
    ServerStateLost {
        /// The epoch seen before.
        previous_epoch: u32,
        /// The epoch now.
        epoch: u32,
        /// How it was noticed.
        cause: LossCause,
    },
    /// The server speaks only NAT-PMP; the client switched to it.
    FellBackToNatPmp,
    /// The answer to [`Client::announce`](super::Client::announce).
    AnnounceReply {
        /// The server's epoch.
        epoch: u32,
        /// Protocol the server answered in.
        version: Version,
    },
    /// [`Client::announce`](super::Client::announce) got no answer within MRC/MRD.
    AnnounceTimeout,
    /// PCP authentication (RFC 7652) succeeded: requests are tagged with the new key
    /// from now on.
    Authenticated {
        /// The PA session ID the server assigned.
        session_id: u32,
        /// Session lifetime in seconds; the client re-authenticates before it ends.
        lifetime: u32,
        /// A re-authentication within the session (new key) rather than a new session.
        reauthentication: bool,
    },
    /// Authentication failed. After a timeout the client tries again while it has
    /// mappings to keep; after a refusal (wrong password, not authorized, downgrade,
    /// certificate) every mapping is lost with the matching result code and the client
    /// tries again only when asked for something new.
    AuthenticationFailed {
        /// Why.
        failure: AuthFailure,
    },
    /// The authenticated session ended; while the client has mappings to keep (or a
    /// request to send) it authenticates again at once, and requests wait for the new
    /// session.
    SessionEnded {
        /// Why.
        reason: SessionEnd,
    },
}

fn ser_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl Event {
    /// The mapping the event is about, if any.
    pub fn mapping(&self) -> Option<MappingId> {
        match self {
            Event::Granted { id, .. }
            | Event::Renewed { id, .. }
            | Event::ExternalChanged { id, .. }
            | Event::CheckpointChanged { id, .. }
            | Event::Error { id, .. }
            | Event::Lost { id, .. }
            | Event::Deleted { id, .. } => Some(*id),
            _ => None,
        }
    }

    /// Whether the client has forgotten the mapping after this event.
    pub fn is_final(&self) -> bool {
        match self {
            Event::Deleted { .. } => true,
            Event::Lost { reason, .. } => *reason != LostReason::Expired,
            _ => false,
        }
    }
}

/// A mapping's state as the client knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MappingStatus {
    /// The mapping.
    pub id: MappingId,
    /// MAP or PEER.
    pub kind: Kind,
    /// IANA protocol number.
    pub protocol: u8,
    /// Internal port.
    pub internal_port: u16,
    /// The nonce, kept across renewals (hex in JSON).
    #[serde(serialize_with = "ser_hex")]
    pub nonce: [u8; 12],
    /// Whether CHECKPOINT_REQUIRED is asked for (on the next request).
    pub checkpoint_wanted: bool,
    /// The last grant, if any.
    pub grant: Option<Grant>,
    /// Whether a delete is under way.
    pub deleting: bool,
}

fn ser_hex<S: serde::Serializer>(n: &[u8; 12], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex(n))
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses 24 hex digits into a nonce.
pub fn parse_nonce(s: &str) -> Option<[u8; 12]> {
    let s = s.trim();
    if s.len() != 24 || !s.is_ascii() {
        return None;
    }
    let mut n = [0u8; 12];
    for (i, b) in n.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(n)
}

/// When a checkpoint flag change goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Apply {
    /// Send a renewal now.
    Now,
    /// Carry it on the next scheduled renewal.
    NextRenewal,
}

/// Why a request cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Lifetime 0 means delete; use `delete` for that.
    #[error(
        "a lifetime of 0 would delete the mapping: ask for at least 1 second (use delete to remove a mapping)"
    )]
    ZeroLifetime,
    /// Internal port 0 ("all ports") is not something this client asks for.
    #[error("internal port 0 means all ports: name the port to map")]
    ZeroPort,
    /// PEER needs a remote endpoint.
    #[error("a PEER mapping needs a remote address and a non-zero remote port")]
    NoRemote,
    /// FILTER and PREFER_FAILURE are valid for MAP only (RFC 6887 §13).
    #[error("FILTER and PREFER_FAILURE are valid for MAP only: drop them from the PEER request")]
    MapOnlyOption,
    /// The description does not fit in a PCP message.
    #[error("the description is {len} octets; at most 1016 fit in a PCP message: shorten it")]
    DescriptionTooLong {
        /// Its length.
        len: usize,
    },
    /// The whole request exceeds 1100 octets.
    #[error(
        "the request would be {len} octets, over PCP's 1100: use fewer filters or a shorter description"
    )]
    TooLong {
        /// Its length.
        len: usize,
    },
    /// The server speaks NAT-PMP only, which has MAP for UDP and TCP and nothing else.
    #[error(
        "the server speaks only NAT-PMP, which maps UDP and TCP ports only (no PEER, no options)"
    )]
    NatPmpCannot,
    /// Deleting a mapping made elsewhere needs its nonce.
    #[error(
        "deleting a mapping made by another process needs its nonce (24 hex digits, as `pcpc map` prints)"
    )]
    NoNonce,
    /// PEER mappings cannot be deleted (RFC 6887 §12.1).
    #[error(
        "a PEER mapping cannot be deleted (RFC 6887 §12.1): stop renewing it and it expires at the end of its lifetime"
    )]
    PeerCannotDelete,
    /// No such mapping.
    #[error("no mapping {0}: it was deleted or lost")]
    NoSuchMapping(MappingId),
}
