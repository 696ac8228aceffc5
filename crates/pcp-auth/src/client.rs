//! The PCP client's side of a PA session (RFC 7652 §3): start (its own PA-Initiation or
//! a server's unsolicited PA-Server), the EAP exchange with retransmission, the PCP SA,
//! tags on common requests and their responses, re-authentication before the session
//! lifetime or the sequence space runs out, termination and recovery from a lost session.
//!
//! Sans-IO: datagrams and `now` in, datagrams ([`Client::poll_transmit`]), events
//! ([`Client::poll_event`]) and a timer ([`Client::poll_timeout`]) out.

use std::collections::VecDeque;
use std::net::IpAddr;

use pcp_proto::{Opcode, PcpOption, Response, ResultCode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::crypto::{SUPPORTED_MACS, SUPPORTED_PRFS, TransportKey};
use crate::eap::{EapPeer, PeerStep};
use crate::pa::{Link, Side, build};
use crate::replay::{REAUTH_THRESHOLD, ReplayWindow, SeqVerdict};
use crate::retransmit::{Retransmit, RetransmitConfig};
use crate::{Time, tag};

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The PCP client's IP address, written into the header of every PA-Client message.
    pub client_addr: IpAddr,
    /// Retransmission of PA messages.
    pub retransmit: RetransmitConfig,
    /// Whether to answer a server's unsolicited PA-Server (RFC 7652 §3.1.2: the client
    /// may "silently discard" it "according to its local policies").
    pub accept_server_initiated: bool,
    /// Re-authenticate at this share of the session lifetime, in percent (1–99).
    pub reauth_percent: u8,
}

impl ClientConfig {
    /// Defaults for a client at `client_addr`: RFC 6887 timing with a 120 s MRD,
    /// server-initiated sessions accepted, re-authentication at 80 % of the lifetime.
    pub fn new(client_addr: IpAddr) -> ClientConfig {
        ClientConfig {
            client_addr,
            retransmit: RetransmitConfig::default(),
            accept_server_initiated: true,
            reauth_percent: 80,
        }
    }
}

/// Why authentication did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The server said AUTHENTICATION_FAILED.
    AuthenticationFailed,
    /// The server said AUTHORIZATION_FAILED.
    AuthorizationFailed,
    /// The server said DOWNGRADE_ATTACK_DETECTED.
    DowngradeDetected,
    /// The server offers no PRF or no MAC algorithm this client implements.
    NoCommonAlgorithm,
    /// This client's EAP method gave up (e.g. the server's certificate is not valid).
    Eap,
    /// No answer within the maximum retransmission duration.
    Timeout,
}

/// Why an established session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The server terminated it.
    ByServer,
    /// This client terminated it ([`Client::terminate`]).
    ByClient,
    /// Its lifetime ran out before a re-authentication succeeded.
    Expired,
    /// The server no longer knows it (UNKNOWN_SESSION_ID or AUTHENTICATION_REQUIRED to a
    /// tagged request); a new authentication has been started.
    Lost,
}

/// What happened, for the application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientEvent {
    /// A PCP SA is in place: common requests can be tagged.
    Established {
        /// The session ID.
        session_id: u32,
        /// Session lifetime in seconds.
        lifetime: u32,
    },
    /// A re-authentication succeeded: new key, new lifetime.
    Reauthenticated {
        /// Session lifetime in seconds.
        lifetime: u32,
    },
    /// Authentication or re-authentication failed; the session is gone.
    Failed(Failure),
    /// The session ended.
    Ended(Ended),
}

/// Why a common message could not be tagged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProtectError {
    /// No PCP SA: authenticate first.
    #[error("no PCP SA: not authenticated")]
    NoSession,
    /// The sequence space is used up; wait for the re-authentication.
    #[error("common sequence numbers exhausted")]
    SequenceExhausted,
    /// The tag does not fit (message too long, or buffer too small).
    #[error("tag does not fit: {0}")]
    Tag(#[from] tag::TagError),
}

/// Why a common response was refused (RFC 7652 §6.2: discard it silently).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// Not a PCP response.
    #[error("not a PCP response")]
    NotResponse,
    /// No PCP SA to check it with.
    #[error("no PCP SA")]
    NoSession,
    /// No tag, or a tag that does not verify, is for another session or key.
    #[error("bad or missing tag: {0}")]
    Tag(tag::TagError),
    /// The tag names another session or key.
    #[error("tag for another session or key")]
    WrongSession,
    /// Sequence number already used.
    #[error("replayed sequence number {0}")]
    Replay(u32),
    /// The server lost the session; a new authentication has been started.
    #[error("session lost at the server; re-authenticating")]
    SessionLost,
}

/// The PCP SA (RFC 7652 §4) once a key exists.
#[derive(Debug, Clone)]
struct Sa {
    key: TransportKey,
    common_out: u32,
    common_in: ReplayWindow,
    expires: Time,
    reauth_at: Time,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing going on.
    Idle,
    /// PA-Initiation sent, waiting for the first PA-Server.
    Initiating,
    /// EAP exchange (first authentication, or re-authentication when an SA exists).
    Eap,
    /// SA in place.
    Established,
    /// SESSION_TERMINATED sent, waiting for the server's.
    Terminating,
}

/// The client side of one PA session.
pub struct Client<P: EapPeer> {
    cfg: ClientConfig,
    peer: P,
    rng: StdRng,
    phase: Phase,
    session_id: u32,
    nonce: u32,
    /// The server initiated and our nonce must come back in its next message.
    expect_nonce: bool,
    link: Link,
    /// PRF and MAC lists of the server's first PA-Server (to send back, §3.1.3).
    offered: (Vec<u32>, Vec<u32>),
    /// Whether the chosen algorithms went out in a PA-Client yet.
    algorithms_sent: bool,
    sa: Option<Sa>,
    transmits: VecDeque<Vec<u8>>,
    events: VecDeque<ClientEvent>,
}

impl<P: EapPeer> std::fmt::Debug for Client<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("phase", &self.phase)
            .field("session_id", &self.session_id)
            .finish_non_exhaustive()
    }
}

impl<P: EapPeer> Client<P> {
    /// A client with an OS-seeded random generator (nonces).
    pub fn new(cfg: ClientConfig, peer: P) -> Client<P> {
        Client::with_rng(cfg, peer, StdRng::from_os_rng())
    }

    /// A client with the given random generator (deterministic tests).
    pub fn with_rng(cfg: ClientConfig, peer: P, rng: StdRng) -> Client<P> {
        Client {
            cfg,
            peer,
            rng,
            phase: Phase::Idle,
            session_id: 0,
            nonce: 0,
            expect_nonce: false,
            link: Link::new(0, 0),
            offered: (Vec::new(), Vec::new()),
            algorithms_sent: false,
            sa: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// The EAP peer.
    pub fn peer(&self) -> &P {
        &self.peer
    }

    /// Whether a PCP SA is in place (common requests can be tagged).
    pub fn is_established(&self) -> bool {
        self.sa.is_some()
    }

    /// Whether nothing is going on: no session and no exchange under way (before
    /// [`Client::start`], or after a failure or the end of a session).
    pub fn is_idle(&self) -> bool {
        self.phase == Phase::Idle
    }

    /// The session ID (0 before the server assigned one).
    pub fn session_id(&self) -> u32 {
        self.session_id
    }

    /// The next PA message to send.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// Starts a new PA session with a PA-Initiation (RFC 7652 §3.1.1), dropping any
    /// current one.
    pub fn start(&mut self, now: Time) {
        self.reset();
        self.nonce = self.rng.random();
        self.link = Link::new(0, 0);
        self.phase = Phase::Initiating;
        let nonce = [PcpOption::Nonce(self.nonce)];
        self.send(now, ResultCode::Initiation, &nonce, None, true);
    }

    /// Ends the session: SESSION_TERMINATED to the server (RFC 7652 §3.3); the SA goes
    /// when the server answers or the exchange times out.
    pub fn terminate(&mut self, now: Time) {
        match self.phase {
            Phase::Idle | Phase::Terminating => {}
            Phase::Initiating => self.close(None),
            Phase::Eap | Phase::Established => {
                self.phase = Phase::Terminating;
                let key = self.sa.as_ref().map(|s| s.key.clone());
                self.send(now, ResultCode::SessionTerminated, &[], key.as_ref(), true);
            }
        }
    }

    /// When [`Client::handle_timeout`] must run next.
    pub fn poll_timeout(&self) -> Option<Time> {
        let retransmit = self
            .link
            .retransmit
            .as_ref()
            .map(|r| r.deadline(&self.cfg.retransmit));
        let sa = self.sa.as_ref().map(|s| {
            if self.phase == Phase::Established {
                s.reauth_at.min(s.expires)
            } else {
                s.expires
            }
        });
        [retransmit, sa].into_iter().flatten().min()
    }

    /// Runs the timers: retransmission, giving up, re-authentication, expiry.
    pub fn handle_timeout(&mut self, now: Time) {
        if let Some(sa) = &self.sa
            && now >= sa.expires
        {
            self.close(Some(ClientEvent::Ended(Ended::Expired)));
            return;
        }
        let cfg = self.cfg.retransmit;
        if let Some(r) = &mut self.link.retransmit {
            if r.expired(now, &cfg) {
                let ev = if self.phase == Phase::Terminating {
                    ClientEvent::Ended(Ended::ByClient)
                } else {
                    ClientEvent::Failed(Failure::Timeout)
                };
                self.close(Some(ev));
                return;
            }
            if r.due(now, &cfg, &mut self.rng)
                && let Some(m) = &self.link.last_out
            {
                self.transmits.push_back(m.clone());
            }
        }
        if self.phase == Phase::Established
            && let Some(sa) = &self.sa
            && now >= sa.reauth_at
        {
            self.reauthenticate(now);
        }
    }

    /// Starts a re-authentication in the current session (RFC 7652 §3.4): a tagged
    /// PA-Client with result code INITIATION (docs/AUTH.md: RFC 7652's RE-AUTHENTICATION
    /// code was never allocated).
    pub fn reauthenticate(&mut self, now: Time) {
        if self.phase != Phase::Established {
            return;
        }
        let Some(key) = self.sa.as_ref().map(|s| s.key.clone()) else {
            return;
        };
        self.peer.restart();
        self.phase = Phase::Eap;
        self.algorithms_sent = true;
        self.send(now, ResultCode::Initiation, &[], Some(&key), true);
    }

    /// Handles one datagram from the server: PA-Server messages drive the session;
    /// anything else is ignored (common responses go to [`Client::verify_response`]).
    pub fn handle(&mut self, now: Time, datagram: &[u8]) {
        let Ok(resp) = Response::parse(datagram) else {
            return;
        };
        let pcp_proto::Body::Authentication(body) = resp.body else {
            return;
        };
        if let Some(answer) = self.link.duplicate(datagram, now) {
            self.transmits.extend(answer);
            return;
        }
        match self.phase {
            Phase::Idle => self.server_initiated(now, datagram, &resp, body.session_id),
            Phase::Initiating => self.first_answer(now, datagram, &resp, body.session_id),
            Phase::Eap | Phase::Established | Phase::Terminating => {
                if body.session_id != self.session_id {
                    return;
                }
                self.in_session(now, datagram, &resp, body.sequence_number);
            }
        }
    }

    fn server_initiated(&mut self, now: Time, datagram: &[u8], resp: &Response, session: u32) {
        let pcp_proto::Body::Authentication(body) = resp.body else {
            return;
        };
        if !self.cfg.accept_server_initiated
            || resp.result_code != ResultCode::AuthenticationRequest
            || session == 0
            || body.sequence_number != 0
        {
            return;
        }
        self.reset();
        self.session_id = session;
        self.nonce = self.rng.random();
        self.expect_nonce = true;
        self.link = Link::new(0, 0);
        self.phase = Phase::Eap;
        self.eap_begin(now, datagram, resp);
    }

    fn first_answer(&mut self, now: Time, datagram: &[u8], resp: &Response, session: u32) {
        let pcp_proto::Body::Authentication(body) = resp.body else {
            return;
        };
        // RFC 7652 §5.3: a PA-Server without our nonce is silently discarded.
        if resp.options.nonce() != Some(self.nonce)
            || resp.result_code != ResultCode::AuthenticationRequest
            || session == 0
            || body.sequence_number != 0
        {
            return;
        }
        self.session_id = session;
        self.phase = Phase::Eap;
        self.eap_begin(now, datagram, resp);
    }

    /// The server's first PA-Server of a session: algorithm lists and the first EAP
    /// request.
    fn eap_begin(&mut self, now: Time, datagram: &[u8], resp: &Response) {
        self.offered = (
            resp.options.prfs().collect(),
            resp.options.mac_algorithms().collect(),
        );
        self.algorithms_sent = false;
        let common = SUPPORTED_PRFS.iter().any(|p| self.offered.0.contains(p))
            && SUPPORTED_MACS.iter().any(|m| self.offered.1.contains(m));
        self.link.accepted(datagram);
        if !common {
            self.send(now, ResultCode::AuthenticationFailed, &[], None, false);
            self.close(Some(ClientEvent::Failed(Failure::NoCommonAlgorithm)));
            return;
        }
        self.peer.restart();
        self.eap_request(now, resp);
    }

    fn in_session(&mut self, now: Time, datagram: &[u8], resp: &Response, seq: u32) {
        if seq != self.link.in_seq {
            return;
        }
        // RFC 7652 §5.3: when the client sent a nonce in its first PA-Client, the
        // server's next PA-Server echoes it.
        if self.expect_nonce && resp.options.nonce() != Some(self.nonce) {
            return;
        }
        // With an SA, every PA-Server is tagged with its key; the SUCCEEDED that ends a
        // (re-)authentication is tagged with the new key and checked below.
        let succeeded = resp.result_code == ResultCode::AuthenticationSucceeded;
        if !succeeded
            && let Some(sa) = &self.sa
            && !self.tag_ok(datagram, &sa.key)
        {
            return;
        }
        if let Some(acked) = resp.options.received_pak() {
            // A PA-Acknowledgement: no sequence number moves (§6.4).
            if acked == self.link.out_seq.wrapping_sub(1)
                && let Some(r) = &mut self.link.retransmit
            {
                r.acknowledged();
            }
            return;
        }
        match (self.phase, resp.result_code) {
            (
                Phase::Eap,
                ResultCode::AuthenticationRequest | ResultCode::AuthenticationRequired,
            ) => {
                self.expect_nonce = false;
                self.link.accepted(datagram);
                self.eap_request(now, resp);
            }
            // A server-initiated re-authentication (§3.4; 15 as §3.4 writes it, 22 as
            // §5.1 requires).
            (
                Phase::Established,
                ResultCode::AuthenticationRequest | ResultCode::AuthenticationRequired,
            ) if resp.options.eap_payload().is_some() => {
                self.link.accepted(datagram);
                self.peer.restart();
                self.phase = Phase::Eap;
                self.algorithms_sent = true;
                self.eap_request(now, resp);
            }
            (Phase::Eap, ResultCode::AuthenticationSucceeded) => {
                self.succeeded(now, datagram, resp);
            }
            (Phase::Eap, ResultCode::AuthenticationFailed) => {
                self.link.accepted(datagram);
                self.close(Some(ClientEvent::Failed(Failure::AuthenticationFailed)));
            }
            (Phase::Eap, ResultCode::AuthorizationFailed) => {
                self.link.accepted(datagram);
                self.close(Some(ClientEvent::Failed(Failure::AuthorizationFailed)));
            }
            (_, ResultCode::DowngradeAttackDetected) => {
                self.link.accepted(datagram);
                self.close(Some(ClientEvent::Failed(Failure::DowngradeDetected)));
            }
            (Phase::Terminating, ResultCode::SessionTerminated) => {
                self.link.accepted(datagram);
                self.close(Some(ClientEvent::Ended(Ended::ByClient)));
            }
            (_, ResultCode::SessionTerminated) => {
                // §3.3: answer with a termination-indicating PA message, then drop the SA.
                self.link.accepted(datagram);
                let key = self.sa.as_ref().map(|s| s.key.clone());
                self.send(now, ResultCode::SessionTerminated, &[], key.as_ref(), false);
                self.close(Some(ClientEvent::Ended(Ended::ByServer)));
            }
            _ => {}
        }
    }

    fn tag_ok(&self, datagram: &[u8], key: &TransportKey) -> bool {
        tag::verify(datagram, key).is_ok_and(|t| t.key_id == key.id)
    }

    /// Feeds the EAP request of `resp` to the peer and answers it.
    fn eap_request(&mut self, now: Time, resp: &Response) {
        let Some(eap) = resp.options.eap_payload() else {
            return;
        };
        match self.peer.receive(eap) {
            PeerStep::Respond(packet) => {
                let mut opts = Vec::new();
                if self.link.out_seq == 0 && self.session_id != 0 && self.expect_nonce {
                    opts.push(PcpOption::Nonce(self.nonce));
                }
                if !self.algorithms_sent {
                    // §3.1.3: the chosen PRF and MAC go in the next PA-Client.
                    opts.push(PcpOption::Prf(SUPPORTED_PRFS[0]));
                    opts.push(PcpOption::MacAlgorithm(SUPPORTED_MACS[0]));
                    self.algorithms_sent = true;
                }
                opts.push(PcpOption::EapPayload(&packet));
                let key = self.sa.as_ref().map(|s| s.key.clone());
                self.send(
                    now,
                    ResultCode::AuthenticationReply,
                    &opts,
                    key.as_ref(),
                    true,
                );
            }
            PeerStep::Discard | PeerStep::Success => {}
            PeerStep::Failure => {
                let key = self.sa.as_ref().map(|s| s.key.clone());
                self.send(
                    now,
                    ResultCode::AuthenticationFailed,
                    &[],
                    key.as_ref(),
                    false,
                );
                self.close(Some(ClientEvent::Failed(Failure::Eap)));
            }
        }
    }

    /// AUTHENTICATION_SUCCEEDED: EAP-Success, the new key, SESSION_LIFETIME.
    fn succeeded(&mut self, now: Time, datagram: &[u8], resp: &Response) {
        let (Some(eap), Some(lifetime), Ok(at)) = (
            resp.options.eap_payload(),
            resp.options.session_lifetime(),
            tag::locate(datagram),
        ) else {
            return;
        };
        // The method must agree that it succeeded and hold an MSK; a peer that already
        // took EAP-Success (a retransmission we could not match) keeps its MSK.
        let step = self.peer.receive(eap);
        if !matches!(step, PeerStep::Success | PeerStep::Discard) {
            return;
        }
        let Some(msk) = self.peer.msk() else {
            return;
        };
        let key = TransportKey::derive(&msk, self.session_id, self.nonce, at.key_id);
        if tag::check(datagram, &at, &key).is_err() {
            return;
        }
        if let Some(old) = &self.sa
            && old.key.id == at.key_id
        {
            // A new key must have a new ID (docs/AUTH.md).
            return;
        }
        self.link.accepted(datagram);
        // §3.1.3: the first secure PA-Client carries every PRF and MAC the server offered,
        // for its downgrade check.
        let prfs: Vec<PcpOption> = self.offered.0.iter().map(|&p| PcpOption::Prf(p)).collect();
        let macs: Vec<PcpOption> = self
            .offered
            .1
            .iter()
            .map(|&m| PcpOption::MacAlgorithm(m))
            .collect();
        let opts: Vec<PcpOption> = prfs.into_iter().chain(macs).collect();
        self.send(
            now,
            ResultCode::AuthenticationSucceeded,
            &opts,
            Some(&key),
            false,
        );
        let reauth = self.sa.is_some();
        let share = u64::from(self.cfg.reauth_percent.clamp(1, 99));
        self.sa = Some(Sa {
            key,
            common_out: 0,
            common_in: ReplayWindow::new(),
            expires: now.plus_secs(lifetime),
            reauth_at: Time(now.0 + u64::from(lifetime) * 10 * share),
        });
        if reauth {
            // §3.4: "PA and PCP message sequence numbers must also be reset to zero."
            self.link.out_seq = 0;
            self.link.in_seq = 0;
        }
        self.phase = Phase::Established;
        self.events.push_back(if reauth {
            ClientEvent::Reauthenticated { lifetime }
        } else {
            ClientEvent::Established {
                session_id: self.session_id,
                lifetime,
            }
        });
    }

    /// Builds and queues a PA-Client message with the next sequence number.
    fn send(
        &mut self,
        now: Time,
        rc: ResultCode,
        opts: &[PcpOption<'_>],
        key: Option<&TransportKey>,
        awaiting: bool,
    ) {
        let seq = self.link.next_out();
        let side = Side::Client(self.cfg.client_addr);
        let Some(msg) = build(side, rc, self.session_id, seq, opts, key) else {
            self.close(Some(ClientEvent::Failed(Failure::Eap)));
            return;
        };
        let retransmit =
            awaiting.then(|| Retransmit::start(now, &self.cfg.retransmit, &mut self.rng));
        self.transmits.push_back(msg.clone());
        self.link.sent(msg, retransmit);
        if self.link.out_seq >= REAUTH_THRESHOLD
            && let Some(sa) = &mut self.sa
        {
            sa.reauth_at = now;
        }
    }

    fn reset(&mut self) {
        self.sa = None;
        self.session_id = 0;
        self.expect_nonce = false;
        self.offered = (Vec::new(), Vec::new());
        self.link = Link::new(0, 0);
    }

    /// Drops the SA and the session; the last messages stay to answer duplicates.
    fn close(&mut self, event: Option<ClientEvent>) {
        self.sa = None;
        self.phase = Phase::Idle;
        self.link.retransmit = None;
        self.events.extend(event);
    }

    /// Tags the common request in `buf[..len]` (RFC 7652 §6.1): appends an
    /// AUTHENTICATION_TAG with the next common sequence number and its MAC, and returns
    /// the new length. A retransmission of a request is tagged again (a new sequence
    /// number), so a lost or reordered copy never wedges the sequence (docs/AUTH.md).
    pub fn protect(
        &mut self,
        now: Time,
        buf: &mut [u8],
        len: usize,
    ) -> Result<usize, ProtectError> {
        let session_id = self.session_id;
        let sa = self.sa.as_mut().ok_or(ProtectError::NoSession)?;
        if sa.common_out == u32::MAX {
            return Err(ProtectError::SequenceExhausted);
        }
        let n = tag::seal(buf, len, &sa.key, (session_id, sa.common_out))?;
        sa.common_out += 1;
        if sa.common_out >= REAUTH_THRESHOLD {
            sa.reauth_at = sa.reauth_at.min(now);
        }
        Ok(n)
    }

    /// Checks a common response (RFC 7652 §6.2, §6.5) and records its sequence number.
    /// An untagged UNKNOWN_SESSION_ID or AUTHENTICATION_REQUIRED means the server lost
    /// the session (§3.2): the SA is dropped and a full authentication started.
    pub fn verify_response(&mut self, now: Time, msg: &[u8]) -> Result<(), Rejected> {
        let resp = Response::parse(msg).map_err(|_| Rejected::NotResponse)?;
        if resp.opcode() == Opcode::Authentication {
            return Err(Rejected::NotResponse);
        }
        let session_id = self.session_id;
        if self.sa.is_none() {
            return Err(Rejected::NoSession);
        }
        // §3.2: the server lost the session. Its answer cannot be tagged (it has no
        // key), and being an error copy of our request it may still carry our own tag.
        if matches!(
            resp.result_code,
            ResultCode::UnknownSessionId | ResultCode::AuthenticationRequired
        ) {
            self.close(Some(ClientEvent::Ended(Ended::Lost)));
            self.start(now);
            return Err(Rejected::SessionLost);
        }
        let sa = self.sa.as_mut().ok_or(Rejected::NoSession)?;
        let at = tag::locate(msg).map_err(Rejected::Tag)?;
        if at.session_id != session_id || at.key_id != sa.key.id {
            return Err(Rejected::WrongSession);
        }
        let mac = &msg[at.mac.clone()];
        // The server tags every response afresh, so even the same sequence number with
        // the same MAC is a replay here.
        if sa.common_in.check(at.sequence_number, mac) != SeqVerdict::New {
            return Err(Rejected::Replay(at.sequence_number));
        }
        tag::check(msg, &at, &sa.key).map_err(Rejected::Tag)?;
        sa.common_in.accept(at.sequence_number, mac);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoPeer;
    impl EapPeer for NoPeer {
        fn receive(&mut self, _: &[u8]) -> PeerStep {
            PeerStep::Discard
        }
        fn msk(&self) -> Option<Vec<u8>> {
            None
        }
        fn restart(&mut self) {}
    }

    fn established(common_out: u32) -> Client<NoPeer> {
        let addr = IpAddr::from([192, 0, 2, 1]);
        let mut c = Client::with_rng(ClientConfig::new(addr), NoPeer, StdRng::seed_from_u64(1));
        c.session_id = 7;
        c.phase = Phase::Established;
        c.sa = Some(Sa {
            key: TransportKey::from_bytes(1, [9; 32]),
            common_out,
            common_in: ReplayWindow::new(),
            expires: Time(1_000_000_000),
            reauth_at: Time(900_000_000),
        });
        c
    }

    fn map(buf: &mut [u8]) -> usize {
        let req = pcp_proto::Request {
            lifetime: 60,
            client_addr: IpAddr::from([192, 0, 2, 1]),
            body: pcp_proto::Body::Announce,
            options: pcp_proto::Options::EMPTY,
            pa_result_code: ResultCode::Success,
        };
        req.emit(buf).unwrap()
    }

    /// RFC 7652 §3.4: at 2^32 − 2^16 the client MUST re-authenticate.
    #[test]
    fn sequence_space_running_out_triggers_reauthentication() {
        let now = Time(5_000);
        let mut c = established(REAUTH_THRESHOLD - 2);
        let mut buf = [0u8; 1100];
        let n = map(&mut buf);
        c.protect(now, &mut buf, n).unwrap();
        assert_eq!(c.poll_timeout(), Some(Time(900_000_000)), "not yet");
        let n = map(&mut buf);
        c.protect(now, &mut buf, n).unwrap();
        assert_eq!(c.poll_timeout(), Some(now));
        c.handle_timeout(now);
        let pa = c.poll_transmit().expect("a re-authentication request");
        let r = pcp_proto::Request::parse(&pa).unwrap();
        assert_eq!(r.pa_result_code, ResultCode::Initiation);
        assert!(tag::verify(&pa, &TransportKey::from_bytes(1, [9; 32])).is_ok());
        // Common messages stay protected with the current SA meanwhile (§3.4).
        let n = map(&mut buf);
        assert!(c.protect(now, &mut buf, n).is_ok());
    }

    #[test]
    fn the_last_sequence_number_is_never_used() {
        let mut c = established(u32::MAX);
        let mut buf = [0u8; 1100];
        let n = map(&mut buf);
        assert_eq!(
            c.protect(Time(0), &mut buf, n),
            Err(ProtectError::SequenceExhausted)
        );
    }
}
