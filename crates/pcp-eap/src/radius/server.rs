//! A RADIUS front end of the embedded EAP-TTLS server (RFC 2865, RFC 3579, RFC 2548):
//! a NAS (an access point, a switch, `eapol_test`) passes EAP through Access-Requests,
//! and [`RadiusServer`] runs each conversation on a [`TtlsAuthenticator`] keyed by the
//! State it sent last. It exists so that independent EAP peers — wpa_supplicant's
//! `eapol_test` above all — can test our EAP-TTLS server and its MSK.
//!
//! Sans-IO: a datagram and the time in, a datagram to send back (or a silent drop, with
//! the reason) out.
//! - Every Access-Request must carry a Message-Authenticator that verifies with the
//!   shared secret; otherwise it is silently dropped (RFC 3579 §3.2, and the
//!   "BlastRADIUS" hardening of requiring it on every request). So is every packet
//!   that is not a well-formed Access-Request (RFC 2865 §3).
//! - A retransmission (same source, Identifier and Request Authenticator, RFC 5080
//!   §2.2.2) gets the cached response again, without running EAP twice.
//! - Access-Challenge: the next EAP request, split at 253 octets, and a fresh random
//!   State. Access-Accept: EAP-Success, User-Name (the inner identity), and the MSK as
//!   MS-MPPE-Recv-Key (its first 32 octets) and MS-MPPE-Send-Key (the next 32),
//!   salt-encrypted (RFC 2548 §2.4.2–2.4.3), as FreeRADIUS sends them. Access-Reject:
//!   EAP-Failure — for a failed authentication, an unknown or already used State, or
//!   no room for another conversation.
//! - Bounded: at most [`RadiusServerConfig::max_sessions`] half-finished conversations, each
//!   forgotten [`RadiusServerConfig::session_timeout_ms`] after its last answer, and as many
//!   cached responses, kept as long.

use std::collections::HashMap;
use std::net::SocketAddr;

use pcp_auth::eap::{AuthStep, EapAuthenticator};
use ring::rand::{SecureRandom, SystemRandom};

use super::wire::{self, Parsed};
use super::{
    ACCESS_ACCEPT, ACCESS_CHALLENGE, ACCESS_REJECT, ACCESS_REQUEST, ATTR_EAP_MESSAGE, ATTR_STATE,
    ATTR_USER_NAME, MAX_ATTR_VALUE, MS_MPPE_RECV_KEY, MS_MPPE_SEND_KEY,
};
use crate::authenticator::{Embedded, TtlsAuthenticator};
use crate::packet;

/// Settings of the front end.
#[derive(Debug, Clone)]
pub struct RadiusServerConfig {
    /// The shared secret of every NAS.
    pub secret: Vec<u8>,
    /// Half-finished conversations kept at most; a new one beyond gets an
    /// Access-Reject.
    pub max_sessions: usize,
    /// Milliseconds a conversation waits for the NAS's next request (and a response
    /// stays cached for retransmissions).
    pub session_timeout_ms: u64,
}

impl RadiusServerConfig {
    /// `secret` with 1024 conversations of 30 s at most.
    pub fn new(secret: Vec<u8>) -> RadiusServerConfig {
        RadiusServerConfig {
            secret,
            max_sessions: 1024,
            session_timeout_ms: 30_000,
        }
    }
}

/// Why a datagram got no answer (RFC 2865 §3 and RFC 3579 §3.2 call for silence).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Dropped {
    /// Not a RADIUS packet: truncated, bad length, attributes that do not parse.
    #[error("malformed: {0}")]
    Malformed(&'static str),
    /// A RADIUS packet other than an Access-Request.
    #[error("code {0} is not an Access-Request")]
    NotAccessRequest(u8),
    /// The Message-Authenticator is missing or does not verify: not from a NAS
    /// holding our shared secret (or a wrong shared secret).
    #[error("{0} (a NAS with another shared secret shows up as this)")]
    Unauthenticated(&'static str),
    /// The EAP method ignored the EAP packet (e.g. a stale identifier); the
    /// conversation waits for the right one.
    #[error("EAP packet ignored by the conversation")]
    EapDiscarded,
}

/// Why an authenticated Access-Request got an Access-Reject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// EAP ended in failure (wrong password, unknown user, TLS failure, Nak).
    Failed,
    /// A State we did not send, or sent and already answered, or expired.
    UnknownState,
    /// [`RadiusServerConfig::max_sessions`] conversations are in progress.
    TooManySessions,
    /// No EAP-Message: this server only does EAP.
    NoEap,
}

/// What became of one datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Silently dropped.
    Dropped(Dropped),
    /// Answered with `reply`.
    Reply {
        /// The datagram to send back to the source.
        reply: Vec<u8>,
        /// What it says.
        kind: Reply,
    },
}

/// The kind of a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Access-Challenge: the conversation goes on.
    Challenge,
    /// Access-Accept for the inner `identity`.
    Accept {
        /// The authenticated (inner) identity.
        identity: String,
    },
    /// Access-Reject.
    Reject(Rejected),
    /// The cached response to a retransmitted request, sent again.
    Retransmission,
}

/// A response's attributes before encoding: (type, value).
type Attributes = Vec<(u8, Vec<u8>)>;

/// What identifies a request for duplicate detection (RFC 5080 §2.2.2).
type RequestKey = (SocketAddr, u8, [u8; 16]);

struct Session {
    auth: TtlsAuthenticator,
    expires_ms: u64,
}

/// The RADIUS front end: conversations by State, cached responses by request.
pub struct RadiusServer {
    cfg: RadiusServerConfig,
    backend: Embedded,
    sessions: HashMap<[u8; 16], Session>,
    answered: HashMap<RequestKey, (u64, Vec<u8>)>,
    rng: SystemRandom,
}

impl std::fmt::Debug for RadiusServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RadiusServer")
            .field("sessions", &self.sessions.len())
            .field("answered", &self.answered.len())
            .finish_non_exhaustive()
    }
}

impl RadiusServer {
    /// A front end of `backend`.
    pub fn new(cfg: RadiusServerConfig, backend: Embedded) -> RadiusServer {
        RadiusServer {
            cfg,
            backend,
            sessions: HashMap::new(),
            answered: HashMap::new(),
            rng: SystemRandom::new(),
        }
    }

    /// Half-finished conversations.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Forgets conversations and cached responses whose time has passed.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        self.sessions.retain(|_, s| s.expires_ms > now_ms);
        self.answered.retain(|_, (exp, _)| *exp > now_ms);
    }

    /// When [`RadiusServer::handle_timeout`] has something to forget.
    pub fn poll_timeout(&self) -> Option<u64> {
        let s = self.sessions.values().map(|s| s.expires_ms);
        s.chain(self.answered.values().map(|(e, _)| *e)).min()
    }

    /// One datagram from `from` at `now_ms`.
    pub fn handle(&mut self, now_ms: u64, from: SocketAddr, datagram: &[u8]) -> Outcome {
        self.handle_timeout(now_ms);
        let p = match Parsed::parse(datagram) {
            Ok(p) => p,
            Err(e) => return Outcome::Dropped(Dropped::Malformed(e)),
        };
        if p.code != ACCESS_REQUEST {
            return Outcome::Dropped(Dropped::NotAccessRequest(p.code));
        }
        if let Err(e) = p.check_message_authenticator(&p.authenticator, &self.cfg.secret) {
            return Outcome::Dropped(Dropped::Unauthenticated(e));
        }
        let key = (from, p.id, p.authenticator);
        if let Some((_, reply)) = self.answered.get(&key) {
            return Outcome::Reply {
                reply: reply.clone(),
                kind: Reply::Retransmission,
            };
        }
        let (attributes, kind) = match self.step(now_ms, &p) {
            Ok(r) => r,
            Err(d) => return Outcome::Dropped(d),
        };
        let code = match kind {
            Reply::Challenge => ACCESS_CHALLENGE,
            Reply::Accept { .. } => ACCESS_ACCEPT,
            _ => ACCESS_REJECT,
        };
        let reply =
            wire::encode_response(code, p.id, &p.authenticator, &attributes, &self.cfg.secret);
        self.remember(key, now_ms, reply.clone());
        Outcome::Reply { reply, kind }
    }

    /// Caches a response for retransmissions, within the same bound as sessions.
    fn remember(&mut self, key: RequestKey, now_ms: u64, reply: Vec<u8>) {
        if self.answered.len() >= self.cfg.max_sessions {
            let oldest = self.answered.iter().min_by_key(|(_, (e, _))| *e);
            if let Some(k) = oldest.map(|(k, _)| *k) {
                self.answered.remove(&k);
            }
        }
        if self.cfg.max_sessions > 0 {
            let expires = now_ms + self.cfg.session_timeout_ms;
            self.answered.insert(key, (expires, reply));
        }
    }

    /// Runs EAP for an authenticated Access-Request: the response's attributes.
    fn step(&mut self, now_ms: u64, p: &Parsed<'_>) -> Result<(Attributes, Reply), Dropped> {
        let reject = |why: Rejected, eap_id: u8| {
            let attrs = vec![(ATTR_EAP_MESSAGE, packet::failure(eap_id))];
            Ok((attrs, Reply::Reject(why)))
        };
        let Some(eap) = p.eap_message() else {
            return reject(Rejected::NoEap, 0);
        };
        let eap_id = eap.get(1).copied().unwrap_or(0);
        let (state, auth, step) = match p.first(ATTR_STATE) {
            Some(state) => {
                let Some(s) = <[u8; 16]>::try_from(state)
                    .ok()
                    .and_then(|s| self.sessions.remove(&s).map(|x| (s, x)))
                else {
                    return reject(Rejected::UnknownState, eap_id);
                };
                let (state, mut session) = s;
                let step = session.auth.receive(&eap);
                (Some((state, session.expires_ms)), session.auth, step)
            }
            None => {
                if self.sessions.len() >= self.cfg.max_sessions {
                    return reject(Rejected::TooManySessions, eap_id);
                }
                let mut auth = self.backend.authenticator();
                // An empty EAP-Message is EAP-Start (RFC 3579 §2.1): ask who it is.
                let step = if eap.is_empty() {
                    AuthStep::Request(auth.start())
                } else {
                    auth.begin(&eap)
                };
                (None, auth, step)
            }
        };
        match step {
            AuthStep::Request(req) => {
                let Some(new) = self.new_state() else {
                    return reject(Rejected::Failed, eap_id);
                };
                let mut attrs: Vec<_> = wire::eap_attributes(&req).collect();
                attrs.push((ATTR_STATE, new.to_vec()));
                self.sessions.insert(
                    new,
                    Session {
                        auth,
                        expires_ms: now_ms + self.cfg.session_timeout_ms,
                    },
                );
                Ok((attrs, Reply::Challenge))
            }
            AuthStep::Success {
                packet,
                msk,
                identity,
            } if msk.len() >= 64 => {
                let mut salts = [0u8; 2];
                if self.rng.fill(&mut salts).is_err() {
                    return reject(Rejected::Failed, eap_id);
                }
                // Distinct salts (RFC 2548 §2.4.2: unique per attribute).
                let (rs, ss) = ([salts[0], salts[1] & !1], [salts[0], salts[1] | 1]);
                let ra = &p.authenticator;
                let secret = &self.cfg.secret;
                let mut name = identity.as_bytes().to_vec();
                name.truncate(MAX_ATTR_VALUE);
                let mut attrs: Vec<_> = wire::eap_attributes(&packet).collect();
                attrs.push((ATTR_USER_NAME, name));
                // As FreeRADIUS: Recv-Key the first half of the MSK, Send-Key the second.
                attrs.push(wire::ms_mppe_attribute(
                    MS_MPPE_RECV_KEY,
                    &msk[..32],
                    rs,
                    ra,
                    secret,
                ));
                attrs.push(wire::ms_mppe_attribute(
                    MS_MPPE_SEND_KEY,
                    &msk[32..64],
                    ss,
                    ra,
                    secret,
                ));
                Ok((attrs, Reply::Accept { identity }))
            }
            AuthStep::Success { packet, .. } => {
                // No keys to give (cannot happen with EAP-TTLS): no Accept without them.
                let id = packet.get(1).copied().unwrap_or(eap_id);
                reject(Rejected::Failed, id)
            }
            AuthStep::Failure { packet } => {
                let attrs = wire::eap_attributes(&packet).collect();
                Ok((attrs, Reply::Reject(Rejected::Failed)))
            }
            AuthStep::Discard | AuthStep::Pending => {
                // The conversation stays under its State, its deadline unchanged.
                if let Some((state, expires_ms)) = state {
                    self.sessions.insert(state, Session { auth, expires_ms });
                }
                Err(Dropped::EapDiscarded)
            }
        }
    }

    /// A fresh random State; `None` only without system randomness.
    fn new_state(&self) -> Option<[u8; 16]> {
        let mut s = [0u8; 16];
        loop {
            self.rng.fill(&mut s).ok()?;
            if !self.sessions.contains_key(&s) {
                return Some(s);
            }
        }
    }
}
