//! The sans-IO client core: every PCP decision, no sockets and no clock.
//!
//! A [`Client`] talks to one server. The caller owns the socket and the clock and drives
//! the core:
//!
//! ```text
//! create / set_checkpoint / delete / announce   (application)
//! handle_datagram(bytes, from, now)             (a datagram arrived)
//! handle_timeout(now)                           (poll_timeout() passed)
//! poll_transmit(now) -> Some(Transmit)          (send it; repeat until None)
//! poll_event() -> Some(Event)                   (tell the application; repeat)
//! poll_timeout() -> Some(Time)                  (call handle_timeout then)
//! ```
//!
//! What it does on its own: retransmits requests (IRT/MRT/MRC/MRD with jitter,
//! [`retransmit`]), renews mappings in the 1/2–5/8 window and after it, validates the
//! epoch of every response and ANNOUNCE ([`epoch`]) and re-creates every mapping on a
//! detected state loss, keeps one nonce per mapping for its whole life, detects servers
//! that echo options blindly ([`canary`]) so that a CHECKPOINT_REQUIRED echo is only
//! believed from a server that does not, and falls back to NAT-PMP when the server
//! speaks only version 0 (its UNSUPP_VERSION reply in either the RFC 6886 form, opcode
//! 0, or erratum 3618's, opcode 128).
//!
//! # Authentication
//!
//! With [`Config::authentication`] set, the core also runs the PCP authentication (RFC
//! 7652) PA session (`pcp_auth::client::Client` over the configured EAP peer) and keeps
//! every rule about it here, so that every shell behaves the same:
//!
//! - The PA exchange starts in [`Client::new`]; its messages come out of
//!   [`Client::poll_transmit`] like any other datagram, with their own retransmission,
//!   and PA messages from the server go in through [`Client::handle_datagram`].
//! - No request goes out without a PCP SA: mapping and ANNOUNCE timers that fall due
//!   meanwhile wait (without using up their retransmissions) and fire the moment
//!   [`Event::Authenticated`] is reported. A granted mapping whose lifetime runs out
//!   meanwhile is reported [`LostReason::Expired`] on time.
//! - Every transmission of a request is tagged afresh (AUTHENTICATION_TAG with the next
//!   sequence number); a response is handled only when its tag verifies, is for this
//!   session and key and is not a replay; everything else (untagged or unsolicited
//!   ANNOUNCEs, NAT-PMP, forged or stale answers) is dropped, as RFC 7652 §6.2 asks.
//! - Re-authentication (new key, §3.4) happens at 80 % of the session lifetime and
//!   before the sequence space runs out; requests stay tagged with the current key
//!   meanwhile.
//! - UNKNOWN_SESSION_ID (or AUTHENTICATION_REQUIRED) to a tagged request means the
//!   server lost the session (a restart, a failover): the SA is dropped, a new session
//!   authenticated, and the request goes out again under it; the restart's epoch then
//!   makes the client re-create every mapping as usual. SESSION_TERMINATED from the
//!   server and an expired session are handled the same way while the client has
//!   mappings to keep.
//! - A refusal (AUTHENTICATION_FAILED, AUTHORIZATION_FAILED, DOWNGRADE_ATTACK_DETECTED,
//!   an invalid server certificate) loses every mapping with that result code
//!   ([`LostReason::Refused`]); no answer within the PA MRD is
//!   [`Event::AuthenticationFailed`] with [`AuthFailure::Timeout`] and a new attempt
//!   while there is something to keep.

mod auth;
pub mod canary;
pub mod epoch;
pub mod retransmit;
mod time;
mod types;

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use pcp_proto::{
    Body, MapBody, Opcode, Options, PcpOption, PeerBody, Request, Response, ResultCode, natpmp,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

pub use auth::{AuthFailure, Authentication, SessionEnd};
pub use canary::EchoVerdict;
use epoch::{EpochValidator, Rule, Verdict};
pub use retransmit::RetransmitConfig;
use retransmit::{Retransmit, renewal_time};
pub use time::Time;
pub use types::*;

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// The datagram.
    pub payload: Vec<u8>,
    /// Where to send it.
    pub destination: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not granted yet, or being re-created.
    Creating,
    /// Granted and kept alive.
    Active,
    /// A delete is under way.
    Deleting,
}

#[derive(Debug, Clone)]
enum Tx {
    /// Nothing outstanding; the timer is the next renewal (Active) or a retry after a
    /// short error (Creating).
    Idle,
    /// A create request outstanding.
    Create(Retransmit),
    /// A renewal outstanding (attempt 0 is the first).
    Renew { attempt: u32 },
    /// A delete outstanding.
    Delete(Retransmit),
}

#[derive(Debug, Clone)]
struct Mapping {
    id: MappingId,
    req: MappingRequest,
    nonce: [u8; 12],
    checkpoint: bool,
    phase: Phase,
    /// The last grant and when it was received.
    grant: Option<(Grant, Time)>,
    tx: Tx,
    timer: Option<Time>,
    /// What the last request carried.
    sent_checkpoint: bool,
    sent_canary: bool,
    /// NAT-PMP: a port granted while the external address is not known yet
    /// (external port, lifetime, epoch, was it a re-creation).
    pending_natpmp: Option<(u16, u32, u32, bool)>,
}

impl Mapping {
    fn expires(&self) -> Option<Time> {
        self.grant
            .map(|(g, at)| at + Duration::from_secs(u64::from(g.lifetime)))
    }

    fn status(&self) -> MappingStatus {
        MappingStatus {
            id: self.id,
            kind: self.req.kind,
            protocol: self.req.protocol,
            internal_port: self.req.internal_port,
            nonce: self.nonce,
            checkpoint_wanted: self.checkpoint,
            grant: self.grant.map(|g| g.0),
            deleting: self.phase == Phase::Deleting,
        }
    }
}

/// An outstanding ANNOUNCE (PCP) or external-address (NAT-PMP) request.
#[derive(Debug, Clone)]
struct Probe {
    retransmit: Retransmit,
    timer: Time,
    /// Asked for by the application (report the answer) or by the core (NAT-PMP
    /// external address).
    by_app: bool,
}

/// The sans-IO PCP client for one server. See the [module docs](self).
#[derive(Debug)]
pub struct Client {
    cfg: Config,
    rng: SmallRng,
    version: Version,
    epoch: EpochValidator,
    echo: EchoVerdict,
    canary_token: [u8; 4],
    mappings: BTreeMap<MappingId, Mapping>,
    next_id: u64,
    outbox: VecDeque<Transmit>,
    events: VecDeque<Event>,
    probe: Option<Probe>,
    natpmp_addr: Option<Ipv4Addr>,
    /// The PA session, with authentication.
    auth: Option<auth::PaClient>,
}

const SHORT_ERRORS: [ResultCode; 4] = [
    ResultCode::NetworkFailure,
    ResultCode::NoResources,
    ResultCode::UserExQuota,
    ResultCode::CannotProvideExternal,
];

/// How long to wait before asking again after a NAT-PMP error (it has no lifetime).
const NATPMP_ERROR_RETRY: Duration = Duration::from_secs(30);

impl Client {
    /// A client for `config.server`, starting at `now`; `seed` seeds every random choice
    /// (nonces, jitter, the canary token), so runs with the same seed and inputs are
    /// identical.
    pub fn new(config: Config, now: Time, seed: u64) -> Client {
        let mut rng = SmallRng::seed_from_u64(seed);
        let canary_token = rng.random();
        let auth = config.authentication.as_ref().map(|a| {
            let mut pa = a.session(config.client_addr, rng.random());
            pa.start(pa_time(now));
            pa
        });
        Client {
            auth,
            echo: EchoVerdict::Untested,
            cfg: config,
            rng,
            version: Version::Pcp,
            epoch: EpochValidator::default(),
            canary_token,
            mappings: BTreeMap::new(),
            next_id: 1,
            outbox: VecDeque::new(),
            events: VecDeque::new(),
            probe: None,
            natpmp_addr: None,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The protocol the server is spoken to in.
    pub fn version(&self) -> Version {
        self.version
    }

    /// What the client knows about the server's option echoing.
    pub fn echo_verdict(&self) -> EchoVerdict {
        self.echo
    }

    /// The last epoch the server sent.
    pub fn last_epoch(&self) -> Option<u32> {
        self.epoch.last()
    }

    /// Whether a PCP SA is in place (with [`Config::authentication`]; always `false`
    /// without).
    pub fn is_authenticated(&self) -> bool {
        self.auth.as_ref().is_some_and(|a| a.is_established())
    }

    /// The PA session ID once the server assigned one (with authentication).
    pub fn session_id(&self) -> Option<u32> {
        self.auth
            .as_ref()
            .map(|a| a.session_id())
            .filter(|&id| id != 0)
    }

    /// Ends the authenticated session: SESSION_TERMINATED to the server (RFC 7652
    /// §3.3), then [`Event::SessionEnded`] with [`SessionEnd::ByClient`]. A new session
    /// is authenticated as soon as there is something to send: at once while mappings
    /// are kept, else on the next [`create`](Self::create) or
    /// [`announce`](Self::announce) (delete or release mappings first to stop). Nothing
    /// happens without authentication.
    pub fn end_session(&mut self, now: Time) {
        if let Some(a) = &mut self.auth {
            a.terminate(pa_time(now));
        }
        self.pump_auth(now);
    }

    /// With authentication: no request may go out until a PCP SA is in place.
    fn gated(&self) -> bool {
        self.auth.as_ref().is_some_and(|a| !a.is_established())
    }

    /// Starts authenticating when the PA session is idle (after a refusal or the end of
    /// a session) and the application asks for something.
    fn authenticate_if_idle(&mut self, now: Time) {
        if let Some(a) = &mut self.auth
            && a.is_idle()
        {
            a.start(pa_time(now));
        }
    }

    /// Moves the PA session's datagrams to the outbox and acts on its events.
    fn pump_auth(&mut self, now: Time) {
        let Some(a) = &mut self.auth else {
            return;
        };
        let mut happened = Vec::new();
        loop {
            while let Some(m) = a.poll_transmit() {
                self.outbox.push_back(Transmit {
                    payload: m,
                    destination: self.cfg.server,
                });
            }
            let Some(e) = a.poll_event() else {
                break;
            };
            happened.push((e, a.session_id()));
        }
        for (e, session_id) in happened {
            use pcp_auth::client::ClientEvent as E;
            match e {
                E::Established {
                    session_id,
                    lifetime,
                } => {
                    self.events.push_back(Event::Authenticated {
                        session_id,
                        lifetime,
                        reauthentication: false,
                    });
                }
                E::Reauthenticated { lifetime } => {
                    self.events.push_back(Event::Authenticated {
                        session_id,
                        lifetime,
                        reauthentication: true,
                    });
                }
                E::Failed(f) => self.auth_failed(f.into(), now),
                E::Ended(end) => self.session_ended(end.into(), now),
            }
        }
        // Anything started above (a new PA-Initiation) goes out now too.
        if let Some(a) = &mut self.auth {
            while let Some(m) = a.poll_transmit() {
                self.outbox.push_back(Transmit {
                    payload: m,
                    destination: self.cfg.server,
                });
            }
        }
    }

    /// Whether the client has anything to keep or ask for.
    fn has_work(&self) -> bool {
        !self.mappings.is_empty() || self.probe.is_some()
    }

    fn auth_failed(&mut self, failure: AuthFailure, now: Time) {
        self.events
            .push_back(Event::AuthenticationFailed { failure });
        if failure == AuthFailure::Timeout {
            // Like an unanswered request: with MRC/MRD limits, what was waiting for a
            // first answer gives up; the rest waits for the server to come back.
            let limited = self.cfg.retransmit.mrc != 0 || !self.cfg.retransmit.mrd.is_zero();
            if limited {
                let waiting: Vec<MappingId> = self
                    .mappings
                    .values()
                    .filter(|m| m.phase != Phase::Active)
                    .map(|m| m.id)
                    .collect();
                for id in waiting {
                    self.give_up(id, LostReason::NoResponse);
                }
                self.drop_probe();
            }
            if self.has_work() {
                self.authenticate_if_idle(now);
            }
            return;
        }
        // A refusal does not go away by asking again.
        let ids: Vec<MappingId> = self.mappings.keys().copied().collect();
        for id in ids {
            self.give_up(id, LostReason::Refused(failure.result_code()));
        }
        self.drop_probe();
    }

    fn session_ended(&mut self, reason: SessionEnd, now: Time) {
        self.events.push_back(Event::SessionEnded { reason });
        // After Lost, pcp-auth has started a new session already.
        if self.has_work() {
            self.authenticate_if_idle(now);
        }
    }

    /// Ends a mapping that cannot be served: a delete under way is reported unconfirmed.
    fn give_up(&mut self, id: MappingId, reason: LostReason) {
        match self.mappings.get(&id).map(|m| m.phase) {
            Some(Phase::Deleting) => {
                self.mappings.remove(&id);
                self.events.push_back(Event::Deleted {
                    id,
                    confirmed: false,
                });
            }
            Some(_) => self.forget(id, reason),
            None => {}
        }
    }

    fn drop_probe(&mut self) {
        if let Some(p) = self.probe.take()
            && p.by_app
        {
            self.events.push_back(Event::AnnounceTimeout);
        }
    }

    /// While requests wait for a PCP SA, granted mappings still expire on time.
    fn expire_waiting(&mut self, now: Time) {
        for m in self.mappings.values_mut() {
            if m.phase == Phase::Active && m.expires().is_some_and(|e| e <= now) {
                m.phase = Phase::Creating;
                m.tx = Tx::Idle;
                m.timer = Some(now);
                self.events.push_back(Event::Lost {
                    id: m.id,
                    reason: LostReason::Expired,
                });
            }
        }
    }

    /// Asks for a mapping; the first request goes out on the next
    /// [`poll_transmit`](Self::poll_transmit).
    pub fn create(&mut self, req: MappingRequest, now: Time) -> Result<MappingId, RequestError> {
        self.validate(&req)?;
        let id = MappingId(self.next_id);
        self.next_id += 1;
        let nonce = req.nonce.unwrap_or_else(|| self.rng.random());
        let m = Mapping {
            id,
            checkpoint: req.checkpoint,
            req,
            nonce,
            phase: Phase::Creating,
            grant: None,
            tx: Tx::Idle,
            timer: Some(now),
            sent_checkpoint: false,
            sent_canary: false,
            pending_natpmp: None,
        };
        self.mappings.insert(id, m);
        self.authenticate_if_idle(now);
        self.fire_due(now);
        Ok(id)
    }

    /// Shorthand for a MAP [`create`](Self::create).
    pub fn create_map(
        &mut self,
        protocol: u8,
        internal_port: u16,
        lifetime: u32,
        checkpoint: bool,
        now: Time,
    ) -> Result<MappingId, RequestError> {
        self.create(
            MappingRequest::map(protocol, internal_port)
                .lifetime(lifetime)
                .checkpoint(checkpoint),
            now,
        )
    }

    fn validate(&self, req: &MappingRequest) -> Result<(), RequestError> {
        if req.lifetime == 0 {
            return Err(RequestError::ZeroLifetime);
        }
        if req.internal_port == 0 {
            return Err(RequestError::ZeroPort);
        }
        if let Kind::Peer { remote } = req.kind {
            if remote.port() == 0 || remote.ip().is_unspecified() {
                return Err(RequestError::NoRemote);
            }
            if req.prefer_failure || !req.filters.is_empty() {
                return Err(RequestError::MapOnlyOption);
            }
        }
        if let Some(d) = &req.description
            && d.len() > 1016
        {
            return Err(RequestError::DescriptionTooLong { len: d.len() });
        }
        if self.version == Version::NatPmp && !natpmp_can(req) {
            return Err(RequestError::NatPmpCannot);
        }
        let len = self.request_len(req);
        if len > pcp_proto::MAX_MESSAGE_LEN {
            return Err(RequestError::TooLong { len });
        }
        Ok(())
    }

    fn request_len(&self, req: &MappingRequest) -> usize {
        let body = match req.kind {
            Kind::Map => 36,
            Kind::Peer { .. } => 56,
        };
        let pad = |n: usize| 4 + n.div_ceil(4) * 4;
        24 + body
            + req.third_party.map_or(0, |_| pad(16))
            + usize::from(req.prefer_failure) * pad(0)
            + req.filters.len() * pad(20)
            + req.description.as_ref().map_or(0, |d| pad(d.len()))
            + pad(0)
            + pad(4)
            + if self.auth.is_some() { TAG_ROOM } else { 0 }
    }

    /// Changes whether CHECKPOINT_REQUIRED is asked for: on the next renewal, or now
    /// (a renewal is sent at once).
    pub fn set_checkpoint(
        &mut self,
        id: MappingId,
        on: bool,
        apply: Apply,
        now: Time,
    ) -> Result<(), RequestError> {
        let m = self
            .mappings
            .get_mut(&id)
            .ok_or(RequestError::NoSuchMapping(id))?;
        m.checkpoint = on;
        m.req.checkpoint = on;
        if apply == Apply::Now && m.phase == Phase::Active {
            m.timer = Some(now);
        }
        self.fire_due(now);
        Ok(())
    }

    /// Deletes a mapping (lifetime 0, same nonce). `Deleted` follows.
    ///
    /// A PEER mapping cannot be deleted (RFC 6887 §12.1: a PEER request with lifetime 0
    /// does not shorten it): the client stops renewing it and reports
    /// `Deleted { confirmed: false }` at once; the server drops it when it expires.
    pub fn delete(&mut self, id: MappingId, now: Time) -> Result<(), RequestError> {
        let cfg = self.retransmit_cfg();
        let m = self
            .mappings
            .get_mut(&id)
            .ok_or(RequestError::NoSuchMapping(id))?;
        if let Kind::Peer { .. } = m.req.kind {
            self.mappings.remove(&id);
            self.events.push_back(Event::Deleted {
                id,
                confirmed: false,
            });
            return Ok(());
        }
        m.phase = Phase::Deleting;
        m.tx = Tx::Delete(Retransmit::new(cfg));
        m.timer = Some(now);
        self.fire_due(now);
        Ok(())
    }

    /// Deletes a mapping this client does not hold (made by another process, e.g. an
    /// earlier `pcpc map`), named by its request and nonce. `Deleted` follows (after an
    /// `Error` if the server refused, e.g. NOT_AUTHORIZED for a wrong nonce).
    pub fn delete_by_nonce(
        &mut self,
        req: MappingRequest,
        now: Time,
    ) -> Result<MappingId, RequestError> {
        let nonce = req.nonce.ok_or(RequestError::NoNonce)?;
        if let Kind::Peer { .. } = req.kind {
            return Err(RequestError::PeerCannotDelete);
        }
        self.validate(&MappingRequest {
            lifetime: 1,
            ..req.clone()
        })?;
        let id = MappingId(self.next_id);
        self.next_id += 1;
        let cfg = self.retransmit_cfg();
        self.mappings.insert(
            id,
            Mapping {
                id,
                checkpoint: false,
                req,
                nonce,
                phase: Phase::Deleting,
                grant: None,
                tx: Tx::Delete(Retransmit::new(cfg)),
                timer: Some(now),
                sent_checkpoint: false,
                sent_canary: false,
                pending_natpmp: None,
            },
        );
        self.fire_due(now);
        Ok(id)
    }

    /// Forgets a mapping without telling the server: no more renewals, no events; the
    /// server drops it when its lifetime ends.
    pub fn release(&mut self, id: MappingId) -> Result<(), RequestError> {
        self.mappings
            .remove(&id)
            .map(|_| ())
            .ok_or(RequestError::NoSuchMapping(id))
    }

    /// Asks the server for its epoch (ANNOUNCE; over NAT-PMP, the external-address
    /// request). `AnnounceReply` or `AnnounceTimeout` follows; a state loss it reveals
    /// is handled like any other.
    pub fn announce(&mut self, now: Time) {
        self.probe = Some(Probe {
            retransmit: Retransmit::new(self.retransmit_cfg()),
            timer: now,
            by_app: true,
        });
        self.authenticate_if_idle(now);
        self.fire_due(now);
    }

    /// The state of one mapping.
    pub fn mapping(&self, id: MappingId) -> Option<MappingStatus> {
        self.mappings.get(&id).map(Mapping::status)
    }

    /// The state of every mapping.
    pub fn mappings(&self) -> Vec<MappingStatus> {
        self.mappings.values().map(Mapping::status).collect()
    }

    /// The next datagram to send, if any. Timers due at `now` are handled first.
    pub fn poll_transmit(&mut self, now: Time) -> Option<Transmit> {
        self.pump_auth(now);
        self.fire_due(now);
        self.outbox.pop_front()
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) should be called next.
    pub fn poll_timeout(&self) -> Option<Time> {
        let pa = self
            .auth
            .as_ref()
            .and_then(|a| a.poll_timeout())
            .map(|t| Time(t.0));
        let own = if self.gated() {
            // Requests wait for the SA; only expiries of granted mappings run.
            self.mappings
                .values()
                .filter(|m| m.phase == Phase::Active)
                .filter_map(Mapping::expires)
                .min()
        } else {
            self.mappings
                .values()
                .filter_map(|m| m.timer)
                .chain(self.probe.as_ref().map(|p| p.timer))
                .min()
        };
        own.into_iter().chain(pa).min()
    }

    /// Handles every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Time) {
        if let Some(a) = &mut self.auth {
            a.handle_timeout(pa_time(now));
        }
        self.pump_auth(now);
        self.fire_due(now);
    }

    fn retransmit_cfg(&self) -> RetransmitConfig {
        match self.version {
            Version::Pcp => self.cfg.retransmit,
            Version::NatPmp => self.cfg.natpmp_retransmit,
        }
    }

    fn fire_due(&mut self, now: Time) {
        if self.gated() {
            self.expire_waiting(now);
            return;
        }
        // Firing may set timers to `now` again (e.g. re-create after expiry); bound the
        // loop so that a bug cannot spin.
        for _ in 0..8 {
            let due: Vec<MappingId> = self
                .mappings
                .values()
                .filter(|m| m.timer.is_some_and(|t| t <= now))
                .map(|m| m.id)
                .collect();
            let probe_due = self.probe.as_ref().is_some_and(|p| p.timer <= now);
            if due.is_empty() && !probe_due {
                return;
            }
            for id in due {
                self.fire(id, now);
            }
            if probe_due {
                self.fire_probe(now);
            }
        }
    }

    fn fire_probe(&mut self, now: Time) {
        let Some(mut p) = self.probe.take() else {
            return;
        };
        if p.retransmit.exhausted(now) {
            if p.by_app {
                self.events.push_back(Event::AnnounceTimeout);
            }
            return;
        }
        let payload = match self.version {
            Version::Pcp => self.build_announce(),
            Version::NatPmp => {
                let mut buf = vec![0u8; 2];
                let n = natpmp::Request::ExternalAddress
                    .emit(&mut buf)
                    .unwrap_or_default();
                buf.truncate(n);
                buf
            }
        };
        self.send(payload, now);
        p.timer = p.retransmit.on_send(now, &mut self.rng);
        self.probe = Some(p);
    }

    fn fire(&mut self, id: MappingId, now: Time) {
        let cfg = self.retransmit_cfg();
        let delete_attempts = self.cfg.delete_attempts.max(1);
        let Some(m) = self.mappings.get_mut(&id) else {
            return;
        };
        m.timer = None;
        match (m.phase, &mut m.tx) {
            (Phase::Creating, Tx::Idle | Tx::Renew { .. } | Tx::Delete(_)) => {
                m.tx = Tx::Create(Retransmit::new(cfg));
                self.fire(id, now);
            }
            (Phase::Creating, Tx::Create(r)) => {
                if r.exhausted(now) {
                    self.forget(id, LostReason::NoResponse);
                    return;
                }
                let next = r.on_send(now, &mut self.rng);
                m.timer = Some(next);
                self.send_mapping(id, false, now);
            }
            (Phase::Active, Tx::Idle) => {
                let next = m
                    .grant
                    .and_then(|(g, at)| renewal_time(at, g.lifetime, 1, Some(now), &mut self.rng));
                m.tx = Tx::Renew { attempt: 0 };
                m.timer = next.or(m.expires());
                self.send_mapping(id, false, now);
            }
            (Phase::Active, Tx::Renew { attempt, .. }) => {
                let attempt = *attempt;
                if m.expires().is_none_or(|e| now >= e) {
                    m.phase = Phase::Creating;
                    m.tx = Tx::Idle;
                    m.timer = Some(now);
                    self.events.push_back(Event::Lost {
                        id,
                        reason: LostReason::Expired,
                    });
                    return;
                }
                let attempt = attempt + 1;
                let next = m.grant.and_then(|(g, at)| {
                    renewal_time(at, g.lifetime, attempt + 1, Some(now), &mut self.rng)
                });
                m.tx = Tx::Renew { attempt };
                m.timer = next.or(m.expires());
                self.send_mapping(id, false, now);
            }
            (Phase::Active, Tx::Create(_) | Tx::Delete(_)) => {
                m.tx = Tx::Idle;
                m.timer = Some(now);
            }
            (Phase::Deleting, Tx::Delete(r)) => {
                if r.exhausted(now) || r.sent() >= delete_attempts {
                    self.mappings.remove(&id);
                    self.events.push_back(Event::Deleted {
                        id,
                        confirmed: false,
                    });
                    return;
                }
                let next = r.on_send(now, &mut self.rng);
                m.timer = Some(next);
                self.send_mapping(id, true, now);
            }
            (Phase::Deleting, _) => {
                m.tx = Tx::Delete(Retransmit::new(cfg));
                m.timer = Some(now);
            }
        }
    }

    fn forget(&mut self, id: MappingId, reason: LostReason) {
        self.mappings.remove(&id);
        self.events.push_back(Event::Lost { id, reason });
    }

    /// Queues a request; with authentication, tagged (each transmission anew: a new
    /// sequence number, so that loss or reordering never wedges the sequence).
    fn send(&mut self, mut payload: Vec<u8>, now: Time) {
        if let Some(a) = &mut self.auth
            && payload.first() == Some(&pcp_proto::VERSION)
        {
            let len = payload.len();
            payload.resize(len + TAG_ROOM, 0);
            match a.protect(pa_time(now), &mut payload, len) {
                Ok(n) => payload.truncate(n),
                // No SA (cannot happen: requests wait for one) or the sequence space is
                // used up until the re-authentication: like a lost datagram.
                Err(_) => return,
            }
        }
        self.outbox.push_back(Transmit {
            payload,
            destination: self.cfg.server,
        });
    }

    fn build_announce(&self) -> Vec<u8> {
        let req = Request {
            lifetime: 0,
            client_addr: self.cfg.client_addr,
            body: Body::Announce,
            options: Options::EMPTY,
            pa_result_code: ResultCode::Success,
        };
        emit_request(&req)
    }

    /// Builds and queues the request for mapping `id` (a delete when `delete`).
    fn send_mapping(&mut self, id: MappingId, delete: bool, now: Time) {
        let use_canary = self.cfg.canary && self.echo == EchoVerdict::Untested;
        let Some(m) = self.mappings.get_mut(&id) else {
            return;
        };
        let lifetime = if delete { 0 } else { m.req.lifetime };
        let suggested = m
            .grant
            .map(|(g, _)| g.external)
            .or(m.req.suggested_external);
        let payload = match self.version {
            Version::NatPmp => {
                m.sent_checkpoint = m.checkpoint && !delete;
                m.sent_canary = false;
                let protocol = if m.req.protocol == pcp_proto::protocol::TCP {
                    natpmp::Protocol::Tcp
                } else {
                    natpmp::Protocol::Udp
                };
                let r = natpmp::Request::Map(natpmp::MapRequest {
                    protocol,
                    internal_port: m.req.internal_port,
                    suggested_external_port: if delete {
                        0
                    } else {
                        suggested.map_or(0, |s| s.port())
                    },
                    lifetime,
                });
                let mut buf = vec![0u8; natpmp::MAP_REQUEST_LEN];
                let n = r.emit(&mut buf).unwrap_or_default();
                buf.truncate(n);
                buf
            }
            Version::Pcp => {
                let checkpoint = m.checkpoint && !delete;
                let canary = use_canary && !delete;
                m.sent_checkpoint = checkpoint;
                m.sent_canary = canary;
                let like = match m.req.kind {
                    Kind::Peer { remote } => remote.ip(),
                    Kind::Map => m.req.third_party.unwrap_or(self.cfg.client_addr),
                };
                let ext_addr = suggested.map_or_else(
                    || match like {
                        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                    },
                    |s| s.ip(),
                );
                let mb = MapBody {
                    nonce: m.nonce,
                    protocol: m.req.protocol,
                    internal_port: m.req.internal_port,
                    external_port: suggested.map_or(0, |s| s.port()),
                    external_addr: ext_addr,
                };
                let body = match m.req.kind {
                    Kind::Map => Body::Map(mb),
                    Kind::Peer { remote } => Body::Peer(PeerBody {
                        mapping: mb,
                        remote_port: remote.port(),
                        remote_addr: remote.ip(),
                    }),
                };
                let mut opts: Vec<PcpOption<'_>> = Vec::new();
                if let Some(tp) = m.req.third_party {
                    opts.push(PcpOption::ThirdParty(tp));
                }
                if !delete {
                    if m.req.prefer_failure && m.req.kind == Kind::Map {
                        opts.push(PcpOption::PreferFailure);
                    }
                    if m.req.kind == Kind::Map {
                        opts.extend(m.req.filters.iter().copied().map(PcpOption::Filter));
                    }
                    if let Some(d) = &m.req.description {
                        opts.push(PcpOption::Description(d));
                    }
                }
                if checkpoint {
                    opts.push(PcpOption::CheckpointRequired);
                }
                if canary {
                    opts.push(canary::option(&self.canary_token));
                }
                let req = Request {
                    lifetime,
                    client_addr: self.cfg.client_addr,
                    body,
                    options: Options::from_list(&opts),
                    pa_result_code: ResultCode::Success,
                };
                emit_request(&req)
            }
        };
        self.send(payload, now);
    }

    /// Handles a datagram from `from` (the server's socket, or the ANNOUNCE listener).
    /// Datagrams not from the server's address are ignored.
    pub fn handle_datagram(&mut self, buf: &[u8], from: SocketAddr, now: Time) {
        if from.ip() != self.cfg.server.ip() || buf.len() < 2 {
            return;
        }
        if self.auth.is_some() {
            self.handle_authenticated(buf, from, now);
            self.pump_auth(now);
            self.fire_due(now);
            return;
        }
        match buf[0] {
            pcp_proto::NATPMP_VERSION => self.handle_natpmp(buf, from, now),
            pcp_proto::VERSION => self.handle_pcp(buf, from, now),
            _ => {}
        }
        self.fire_due(now);
    }

    /// With authentication: PA messages to the PA session; a response only once its tag
    /// verified (and with the tag removed). NAT-PMP and anything not from the server's
    /// own address and port (the ANNOUNCE listener) cannot be authenticated: dropped.
    fn handle_authenticated(&mut self, buf: &[u8], from: SocketAddr, now: Time) {
        let Some(a) = &mut self.auth else {
            return;
        };
        if buf[0] != pcp_proto::VERSION || from != self.cfg.server {
            return;
        }
        if Opcode::from_bits(buf[1]) == Opcode::Authentication {
            a.handle(pa_time(now), buf);
            return;
        }
        if a.verify_response(pa_time(now), buf).is_err() {
            return;
        }
        let mut msg = buf.to_vec();
        let n = pcp_proto::remove_option(
            &mut msg,
            buf.len(),
            pcp_proto::OptionCode::AuthenticationTag,
        );
        self.handle_pcp(&msg[..n], from, now);
    }

    fn handle_pcp(&mut self, buf: &[u8], from: SocketAddr, now: Time) {
        let Ok(resp) = Response::parse(buf) else {
            return;
        };
        let solicited = from == self.cfg.server;
        match resp.opcode() {
            Opcode::Announce => {
                let answered = solicited && self.probe.as_ref().is_some_and(|p| p.by_app);
                let verdict = self.epoch.check(Rule::Pcp, now, resp.epoch);
                if let Verdict::Invalid { previous } = verdict {
                    let cause = if answered {
                        LossCause::Response
                    } else {
                        LossCause::Announce
                    };
                    self.state_lost(previous, resp.epoch, cause, None, now);
                }
                if answered && resp.result_code == ResultCode::Success {
                    self.probe = None;
                    self.events.push_back(Event::AnnounceReply {
                        epoch: resp.epoch,
                        version: Version::Pcp,
                    });
                }
            }
            Opcode::Map | Opcode::Peer if solicited => {
                let Some(body) = resp.body.mapping() else {
                    return;
                };
                let target = self
                    .mappings
                    .values()
                    .find(|m| {
                        m.nonce == body.nonce
                            && m.req.protocol == body.protocol
                            && m.req.internal_port == body.internal_port
                            && matches!(
                                (m.req.kind, resp.body),
                                (Kind::Map, Body::Map(_)) | (Kind::Peer { .. }, Body::Peer(_))
                            )
                    })
                    .map(|m| m.id);
                let verdict = self.epoch.check(Rule::Pcp, now, resp.epoch);
                let lost = matches!(verdict, Verdict::Invalid { .. });
                if let Verdict::Invalid { previous } = verdict {
                    self.state_lost(previous, resp.epoch, LossCause::Response, target, now);
                }
                if let Some(id) = target {
                    self.on_mapping_response(id, &resp, lost, now);
                }
            }
            _ => {}
        }
    }

    fn on_mapping_response(&mut self, id: MappingId, resp: &Response<'_>, lost: bool, now: Time) {
        let echo_before = self.echo;
        let Some(m) = self.mappings.get_mut(&id) else {
            return;
        };
        if matches!(m.tx, Tx::Idle) {
            return; // late duplicate
        }
        if resp.result_code == ResultCode::Success {
            if m.phase == Phase::Deleting {
                if resp.lifetime == 0 {
                    self.mappings.remove(&id);
                    self.events.push_back(Event::Deleted {
                        id,
                        confirmed: true,
                    });
                }
                return;
            }
            if resp.lifetime == 0 {
                return;
            }
            if m.sent_canary {
                self.echo = if canary::echoed(&resp.options) {
                    EchoVerdict::BlindEcho
                } else {
                    EchoVerdict::Conformant
                };
            }
            let checkpoint = if !m.sent_checkpoint {
                CheckpointState::NotRequested
            } else if !self.echo.trusts_checkpoint_echo() {
                CheckpointState::Unknown
            } else if resp.options.checkpoint_required() {
                CheckpointState::Honoured
            } else {
                CheckpointState::NotHonoured
            };
            let Some(body) = resp.body.mapping() else {
                return;
            };
            let grant = Grant {
                external: SocketAddr::new(body.external_addr, body.external_port),
                lifetime: resp.lifetime,
                epoch: resp.epoch,
                checkpoint,
                version: Version::Pcp,
            };
            let created = m.phase == Phase::Creating || lost;
            Self::granted(m, grant, created, now, &mut self.rng, &mut self.events);
            return;
        }
        // Error responses copy the request; never judge the canary from them, but a
        // server that refuses the canary (an option it must ignore) gets none again.
        if m.sent_canary
            && echo_before == EchoVerdict::Untested
            && matches!(
                resp.result_code,
                ResultCode::UnsuppOption | ResultCode::MalformedOption
            )
        {
            self.echo = EchoVerdict::RejectsUnknown;
            if let Tx::Create(_) = m.tx {
                m.tx = Tx::Idle;
            }
            m.timer = Some(now);
            return;
        }
        let result = resp.result_code;
        if m.phase == Phase::Deleting {
            self.mappings.remove(&id);
            self.events.push_back(Event::Error {
                id,
                result,
                retry_in: Duration::ZERO,
            });
            self.events.push_back(Event::Deleted {
                id,
                confirmed: false,
            });
            return;
        }
        if SHORT_ERRORS.contains(&result) {
            let retry_in = Duration::from_secs(u64::from(resp.lifetime.max(1)));
            let retry_in = Self::short_error(m, retry_in, now);
            self.events.push_back(Event::Error {
                id,
                result,
                retry_in,
            });
        } else {
            self.forget(id, LostReason::Refused(result));
        }
    }

    /// Schedules the retry after a short-lifetime error; returns the delay.
    fn short_error(m: &mut Mapping, retry_in: Duration, now: Time) -> Duration {
        match m.phase {
            Phase::Creating => {
                m.tx = Tx::Idle;
                m.timer = Some(now + retry_in);
                retry_in
            }
            // A renewal keeps its schedule (which ends at expiry).
            _ => m.timer.map_or(Duration::ZERO, |t| t.saturating_since(now)),
        }
    }

    fn granted(
        m: &mut Mapping,
        grant: Grant,
        created: bool,
        now: Time,
        rng: &mut SmallRng,
        events: &mut VecDeque<Event>,
    ) {
        let id = m.id;
        let previous = m.grant.map(|g| g.0);
        events.push_back(if created {
            Event::Granted { id, grant }
        } else {
            Event::Renewed { id, grant }
        });
        if let Some(p) = previous {
            if p.external != grant.external {
                events.push_back(Event::ExternalChanged {
                    id,
                    previous: p.external,
                    grant,
                });
            }
            if p.checkpoint != grant.checkpoint {
                events.push_back(Event::CheckpointChanged {
                    id,
                    previous: p.checkpoint,
                    grant,
                });
            }
        }
        m.phase = Phase::Active;
        m.grant = Some((grant, now));
        m.tx = Tx::Idle;
        m.timer = Some(
            renewal_time(now, grant.lifetime, 0, None, rng)
                .unwrap_or(now + Duration::from_millis(u64::from(grant.lifetime) * 500)),
        );
    }

    /// The server lost its state: re-create every mapping but `except` (whose own
    /// response revealed it and re-created it already).
    fn state_lost(
        &mut self,
        previous_epoch: u32,
        epoch: u32,
        cause: LossCause,
        except: Option<MappingId>,
        now: Time,
    ) {
        self.events.push_back(Event::ServerStateLost {
            previous_epoch,
            epoch,
            cause,
        });
        if self.cfg.canary {
            // It may be another server now: probe again.
            self.echo = EchoVerdict::Untested;
        }
        let spread = match cause {
            LossCause::Response => 0,
            LossCause::Announce => {
                u64::try_from(self.cfg.announce_spread.as_millis()).unwrap_or(u64::MAX)
            }
        };
        for m in self.mappings.values_mut() {
            if Some(m.id) == except || m.phase == Phase::Deleting {
                continue;
            }
            let delay = if spread == 0 {
                0
            } else {
                self.rng.random_range(0..=spread)
            };
            m.phase = Phase::Creating;
            m.tx = Tx::Idle;
            m.timer = Some(Time(now.0 + delay));
        }
    }

    fn handle_natpmp(&mut self, buf: &[u8], from: SocketAddr, now: Time) {
        let solicited = from == self.cfg.server;
        // A NAT-PMP-only server answers a PCP request with a bare 8-octet UNSUPP_VERSION
        // (opcode 128 per erratum 3618, 0 as RFC 6886 §3.5 printed it; both parse as
        // this error). Nothing else in version 0 means anything to a PCP client.
        if self.version == Version::Pcp {
            if solicited
                && let Ok(natpmp::Response::Error {
                    result: natpmp::ResultCode::UnsupportedVersion,
                    epoch,
                    ..
                }) = natpmp::Response::parse(buf)
            {
                let _ = self.epoch.check(Rule::NatPmp, now, epoch);
                self.fall_back(now);
            }
            return;
        }
        let Ok(resp) = natpmp::Response::parse(buf) else {
            return;
        };
        match resp {
            natpmp::Response::ExternalAddress {
                result,
                epoch,
                external_addr,
            } => {
                let verdict = self.epoch.check(Rule::NatPmp, now, epoch);
                let answered = solicited && self.probe.is_some();
                if let Verdict::Invalid { previous } = verdict {
                    let cause = if answered {
                        LossCause::Response
                    } else {
                        LossCause::Announce
                    };
                    self.state_lost(previous, epoch, cause, None, now);
                }
                if result != natpmp::ResultCode::Success {
                    return;
                }
                if answered {
                    let by_app = self.probe.as_ref().is_some_and(|p| p.by_app);
                    self.probe = None;
                    if by_app {
                        self.events.push_back(Event::AnnounceReply {
                            epoch,
                            version: Version::NatPmp,
                        });
                    }
                }
                self.natpmp_address(external_addr, now);
            }
            natpmp::Response::Map {
                protocol,
                result,
                epoch,
                internal_port,
                external_port,
                lifetime,
            } if solicited => {
                let target = self
                    .mappings
                    .values()
                    .find(|m| {
                        m.req.kind == Kind::Map
                            && m.req.protocol == protocol.iana()
                            && m.req.internal_port == internal_port
                            && !matches!(m.tx, Tx::Idle)
                    })
                    .map(|m| m.id);
                let verdict = self.epoch.check(Rule::NatPmp, now, epoch);
                let lost = matches!(verdict, Verdict::Invalid { .. });
                if let Verdict::Invalid { previous } = verdict {
                    self.state_lost(previous, epoch, LossCause::Response, target, now);
                }
                let Some(id) = target else {
                    return;
                };
                self.on_natpmp_map(id, result, epoch, external_port, lifetime, lost, now);
            }
            // A refusal in the bare 8-octet form names the protocol but not the port:
            // it is acted on when exactly one request of that protocol is outstanding
            // (otherwise retransmission goes on, and the full form may follow).
            natpmp::Response::Error {
                request_opcode: op @ (1 | 2),
                result,
                epoch,
            } if solicited && result != natpmp::ResultCode::Success => {
                let protocol = if op == 1 {
                    pcp_proto::protocol::UDP
                } else {
                    pcp_proto::protocol::TCP
                };
                let mut waiting = self.mappings.values().filter(|m| {
                    m.req.kind == Kind::Map
                        && m.req.protocol == protocol
                        && !matches!(m.tx, Tx::Idle)
                });
                let (Some(m), None) = (waiting.next(), waiting.next()) else {
                    return;
                };
                let id = m.id;
                let verdict = self.epoch.check(Rule::NatPmp, now, epoch);
                let lost = matches!(verdict, Verdict::Invalid { .. });
                if let Verdict::Invalid { previous } = verdict {
                    self.state_lost(previous, epoch, LossCause::Response, Some(id), now);
                }
                self.on_natpmp_map(id, result, epoch, 0, 0, lost, now);
            }
            _ => {}
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_natpmp_map(
        &mut self,
        id: MappingId,
        result: natpmp::ResultCode,
        epoch: u32,
        external_port: u16,
        lifetime: u32,
        lost: bool,
        now: Time,
    ) {
        let addr = self.natpmp_addr;
        let Some(m) = self.mappings.get_mut(&id) else {
            return;
        };
        if result == natpmp::ResultCode::Success {
            if m.phase == Phase::Deleting {
                if lifetime == 0 {
                    self.mappings.remove(&id);
                    self.events.push_back(Event::Deleted {
                        id,
                        confirmed: true,
                    });
                }
                return;
            }
            if lifetime == 0 {
                return;
            }
            let created = m.phase == Phase::Creating || lost;
            match addr {
                Some(a) => {
                    let grant = natpmp_grant(m, a, external_port, lifetime, epoch);
                    Self::granted(m, grant, created, now, &mut self.rng, &mut self.events);
                }
                None => {
                    m.pending_natpmp = Some((external_port, lifetime, epoch, created));
                    m.tx = Tx::Idle;
                    m.timer = None;
                    if self.probe.is_none() {
                        self.probe = Some(Probe {
                            retransmit: Retransmit::new(self.cfg.natpmp_retransmit),
                            timer: now,
                            by_app: false,
                        });
                    }
                }
            }
            return;
        }
        let pcp = match result {
            natpmp::ResultCode::NotAuthorized => ResultCode::NotAuthorized,
            natpmp::ResultCode::NetworkFailure => ResultCode::NetworkFailure,
            natpmp::ResultCode::OutOfResources => ResultCode::NoResources,
            natpmp::ResultCode::UnsupportedOpcode => ResultCode::UnsuppOpcode,
            natpmp::ResultCode::UnsupportedVersion => ResultCode::UnsuppVersion,
            natpmp::ResultCode::Success => ResultCode::Success,
            natpmp::ResultCode::Unknown(v) => ResultCode::from(u8::try_from(v).unwrap_or(255)),
        };
        if m.phase == Phase::Deleting {
            self.mappings.remove(&id);
            self.events.push_back(Event::Deleted {
                id,
                confirmed: false,
            });
            return;
        }
        if SHORT_ERRORS.contains(&pcp) {
            let retry_in = Self::short_error(m, NATPMP_ERROR_RETRY, now);
            self.events.push_back(Event::Error {
                id,
                result: pcp,
                retry_in,
            });
        } else {
            self.forget(id, LostReason::Refused(pcp));
        }
    }

    fn natpmp_address(&mut self, addr: Ipv4Addr, now: Time) {
        let old = self.natpmp_addr.replace(addr);
        for m in self.mappings.values_mut() {
            if let Some((port, lifetime, epoch, created)) = m.pending_natpmp.take() {
                let grant = natpmp_grant(m, addr, port, lifetime, epoch);
                Self::granted(m, grant, created, now, &mut self.rng, &mut self.events);
            } else if old.is_some_and(|o| o != addr)
                && let Some((g, at)) = m.grant
            {
                let grant = Grant {
                    external: SocketAddr::new(IpAddr::V4(addr), g.external.port()),
                    ..g
                };
                m.grant = Some((grant, at));
                self.events.push_back(Event::ExternalChanged {
                    id: m.id,
                    previous: g.external,
                    grant,
                });
            }
        }
    }

    /// The server speaks only NAT-PMP.
    fn fall_back(&mut self, now: Time) {
        if !self.cfg.natpmp_fallback {
            let ids: Vec<MappingId> = self.mappings.keys().copied().collect();
            for id in ids {
                self.forget(id, LostReason::Refused(ResultCode::UnsuppVersion));
            }
            return;
        }
        self.version = Version::NatPmp;
        self.events.push_back(Event::FellBackToNatPmp);
        let ids: Vec<MappingId> = self.mappings.keys().copied().collect();
        for id in ids {
            let Some(m) = self.mappings.get_mut(&id) else {
                continue;
            };
            if !natpmp_can(&m.req) {
                self.forget(id, LostReason::Unsupported);
                continue;
            }
            m.tx = match m.phase {
                Phase::Deleting => Tx::Delete(Retransmit::new(self.cfg.natpmp_retransmit)),
                Phase::Creating => Tx::Create(Retransmit::new(self.cfg.natpmp_retransmit)),
                Phase::Active => Tx::Idle,
            };
            m.timer = Some(now);
        }
        let by_app = self.probe.as_ref().is_some_and(|p| p.by_app);
        self.probe = Some(Probe {
            retransmit: Retransmit::new(self.cfg.natpmp_retransmit),
            timer: now,
            by_app,
        });
    }
}

fn natpmp_can(req: &MappingRequest) -> bool {
    req.kind == Kind::Map
        && (req.protocol == pcp_proto::protocol::UDP || req.protocol == pcp_proto::protocol::TCP)
}

fn natpmp_grant(m: &Mapping, addr: Ipv4Addr, port: u16, lifetime: u32, epoch: u32) -> Grant {
    Grant {
        external: SocketAddr::new(IpAddr::V4(addr), port),
        lifetime,
        epoch,
        checkpoint: if m.sent_checkpoint {
            CheckpointState::NotSupported
        } else {
            CheckpointState::NotRequested
        },
        version: Version::NatPmp,
    }
}

/// Room for an AUTHENTICATION_TAG (4 header + 12 session, sequence, key ID + 16 MAC).
const TAG_ROOM: usize = 32;

fn pa_time(now: Time) -> pcp_auth::Time {
    pcp_auth::Time(now.0)
}

fn emit_request(req: &Request<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; req.buffer_len()];
    // Lengths were checked when the mapping was created.
    let n = req.emit(&mut buf).unwrap_or_default();
    buf.truncate(n);
    buf
}
