//! RADIUS pass-through back end (RFC 2865, RFC 3579 "RADIUS Support for EAP", RFC 2548
//! for the keys): the PCP server is the EAP pass-through authenticator (a NAS) and a
//! real AAA server (FreeRADIUS, …) runs EAP-TTLS.
//!
//! Sans-IO, in two parts:
//! - [`RadiusAuthenticator`] is the [`EapAuthenticator`] of one PA conversation. It
//!   answers the first EAP-Response/Identity's request itself (RFC 3579 §2.1: the NAS
//!   may start with EAP-Request/Identity), then hands every EAP response to the back
//!   end ([`AuthStep::Pending`]) as an [`AccessRequest`] taken with
//!   [`RadiusAuthenticator::take_request`], and turns each verified [`Answer`] into the
//!   next step ([`RadiusAuthenticator::answer`]).
//! - [`RadiusClient`] owns the identifiers of one UDP socket: it encodes each request
//!   with its Request Authenticator and Message-Authenticator, retransmits it
//!   unchanged (RFC 5080 §2.2.1) and gives up after the configured tries, and checks
//!   every response (identifier, Response Authenticator, Message-Authenticator) before
//!   decoding it — EAP-Message reassembled, State, User-Name, and the MSK from
//!   MS-MPPE-Recv-Key || MS-MPPE-Send-Key (decrypted as RFC 2548 §2.4.2–2.4.3 say).
//!
//! The codec both directions share is [`wire`]; [`server`] is the other direction, a
//! RADIUS front end of the embedded EAP-TTLS server (for `eapol_test` and other NASes).
//!
//! Why not a RADIUS crate: the crates on crates.io each own their socket (blocking or
//! async), and none decrypts MS-MPPE keys; the codec needed here is two digests and a
//! TLV walk.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use pcp_auth::eap::{AuthStep, EapAuthenticator, MAX_EAP_PACKET};

use crate::packet::{self, Packet};

pub mod server;
pub mod wire;

pub use wire::{
    ACCESS_ACCEPT, ACCESS_CHALLENGE, ACCESS_REJECT, ACCESS_REQUEST, ATTR_EAP_MESSAGE,
    ATTR_FRAMED_MTU, ATTR_MESSAGE_AUTHENTICATOR, ATTR_NAS_IDENTIFIER, ATTR_SERVICE_TYPE,
    ATTR_STATE, ATTR_USER_NAME, ATTR_VENDOR_SPECIFIC, MAX_ATTR_VALUE, MAX_PACKET, MS_MPPE_RECV_KEY,
    MS_MPPE_SEND_KEY, VENDOR_MICROSOFT, eap_attributes, encode_response, mppe_encrypt, mppe_key,
};

/// Framed-MTU sent: the AAA server sizes its EAP-TTLS fragments to it, so that each
/// EAP packet fits a PA message ([`MAX_EAP_PACKET`], with room for EAP and TTLS
/// headers).
pub const FRAMED_MTU: u32 = 900;

/// Why the back end cannot be used, or why an exchange failed — each naming what an
/// operator should fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RadiusError {
    /// The shared-secret file.
    #[error("{file}: {reason} (auth.radius.secret_file: the RADIUS shared secret, one line)")]
    Secret {
        /// The file.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// No answer after every try.
    #[error(
        "RADIUS server {server} did not answer {tries} tries: check auth.radius.server, that the server lists this host as a client, and that both use the same shared secret (a server silently drops requests signed with another)"
    )]
    Timeout {
        /// The server.
        server: String,
        /// Tries made.
        tries: u32,
    },
    /// A response failed verification.
    #[error(
        "RADIUS response from {server} dropped: {reason} (a wrong shared secret in auth.radius.secret_file shows up as this)"
    )]
    BadResponse {
        /// The server.
        server: String,
        /// What failed.
        reason: &'static str,
    },
    /// An Access-Accept without usable keys.
    #[error(
        "RADIUS Access-Accept from {server} carries no MS-MPPE-Recv-Key/Send-Key: the AAA server must send the EAP keys to this NAS (FreeRADIUS does for EAP-TTLS)"
    )]
    NoKeys {
        /// The server.
        server: String,
    },
    /// The AAA server's EAP packets do not fit PCP.
    #[error(
        "RADIUS server {server} sent a {len}-octet EAP packet; PCP carries at most {MAX_EAP_PACKET}: set the server's EAP-TTLS fragment size to at most {FRAMED_MTU} (it is sent Framed-MTU = {FRAMED_MTU})"
    )]
    EapTooLarge {
        /// The server.
        server: String,
        /// The packet's length.
        len: usize,
    },
}

/// Reads a shared secret: the file's first line, without its line ending.
pub fn load_secret(path: &Path) -> Result<Vec<u8>, RadiusError> {
    let err = |reason: String| RadiusError::Secret {
        file: path.display().to_string(),
        reason,
    };
    let text = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let line = text.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.is_empty() {
        return Err(err("empty".into()));
    }
    Ok(line.to_vec())
}

/// An Access-Request before the client gives it an identifier: its attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessRequest {
    /// (type, value) in order; EAP-Message already split.
    pub attributes: Vec<(u8, Vec<u8>)>,
}

/// A verified response, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Access-Accept, -Reject or -Challenge.
    pub code: u8,
    /// The EAP packet (EAP-Message attributes joined), if any.
    pub eap: Option<Vec<u8>>,
    /// State, to echo.
    pub state: Option<Vec<u8>>,
    /// User-Name, if the server sent one.
    pub user_name: Option<String>,
    /// MS-MPPE-Recv-Key || MS-MPPE-Send-Key, both present and decrypted.
    pub msk: Option<Vec<u8>>,
}

/// Encodes a request with identifier `id` and Request Authenticator `auth`; a
/// Message-Authenticator is always appended (RFC 3579 §3.2) and computed last.
pub fn encode_request(req: &AccessRequest, id: u8, auth: &[u8; 16], secret: &[u8]) -> Vec<u8> {
    wire::encode(ACCESS_REQUEST, id, auth, &req.attributes, secret)
}

/// Verifies a response to the request with Request Authenticator `req_auth` and
/// decodes it (RFC 2865 §3, RFC 3579 §3.2, RFC 2548 §2.4).
pub fn decode_response(
    p: &[u8],
    req_auth: &[u8; 16],
    secret: &[u8],
) -> Result<Answer, &'static str> {
    let p = wire::Parsed::parse(p)?;
    let code = p.code;
    if ![ACCESS_ACCEPT, ACCESS_REJECT, ACCESS_CHALLENGE].contains(&code) {
        return Err("not an Access-Accept, -Reject or -Challenge");
    }
    let expect = wire::response_authenticator(p.bytes, req_auth, secret);
    if !wire::constant_eq(&expect, &p.authenticator) {
        return Err("Response Authenticator does not verify");
    }
    // Always required: every response to an EAP request carries one (RFC 3579 §3.2).
    p.check_message_authenticator(req_auth, secret)?;
    let eap = p.eap_message();
    if code == ACCESS_CHALLENGE && eap.is_none() {
        return Err("Access-Challenge without EAP-Message");
    }
    let msk = match p.ms_mppe_keys(req_auth, secret) {
        (Some(mut r), Some(s)) => {
            r.extend_from_slice(&s);
            Some(r)
        }
        _ => None,
    };
    Ok(Answer {
        code,
        eap,
        state: p.first(ATTR_STATE).map(<[u8]>::to_vec),
        user_name: p
            .first(ATTR_USER_NAME)
            .and_then(|v| String::from_utf8(v.to_vec()).ok()),
        msk,
    })
}

/// What the back end is configured with.
#[derive(Debug, Clone)]
pub struct RadiusConfig {
    /// The AAA server, for messages.
    pub server: String,
    /// The shared secret.
    pub secret: Vec<u8>,
    /// NAS-Identifier sent in every request.
    pub nas_identifier: String,
    /// Milliseconds before a retransmission.
    pub timeout_ms: u64,
    /// Transmissions of one request in all before giving up.
    pub tries: u32,
}

/// The pass-through authenticator of one PA conversation.
#[derive(Debug)]
pub struct RadiusAuthenticator {
    cfg: Arc<RadiusConfig>,
    /// Identifier of the outstanding EAP request.
    id: u8,
    identity: Option<String>,
    state: Option<Vec<u8>>,
    outgoing: Option<AccessRequest>,
    waiting: bool,
}

impl RadiusAuthenticator {
    /// A new conversation.
    pub fn new(cfg: Arc<RadiusConfig>) -> RadiusAuthenticator {
        RadiusAuthenticator {
            cfg,
            id: 0,
            identity: None,
            state: None,
            outgoing: None,
            waiting: false,
        }
    }

    /// The Access-Request made by the last [`AuthStep::Pending`], once.
    pub fn take_request(&mut self) -> Option<AccessRequest> {
        self.outgoing.take()
    }

    /// The identity of the client's EAP-Response/Identity (the outer identity, which
    /// may be anonymous), once it came.
    pub fn identity(&self) -> Option<&str> {
        self.identity.as_deref()
    }

    /// Whether it waits for the back end's answer.
    pub fn waiting(&self) -> bool {
        self.waiting
    }

    fn failure(&mut self) -> AuthStep {
        self.waiting = false;
        AuthStep::Failure {
            packet: packet::failure(self.id),
        }
    }

    /// The back end's verified answer (or the reason there is none, which the shell
    /// logs): the next step. An Access-Accept without a 64-octet MSK, or an EAP packet
    /// too large for PCP, fails the conversation ([`RadiusClient::receive`] reports
    /// both as errors).
    pub fn answer(&mut self, answer: Result<Answer, RadiusError>) -> AuthStep {
        if !self.waiting {
            return AuthStep::Discard;
        }
        let a = match answer {
            Ok(a) => a,
            // The shell logged the error it passed on.
            Err(_) => return self.failure(),
        };
        self.waiting = false;
        if let Some(eap) = &a.eap
            && eap.len() > MAX_EAP_PACKET
        {
            return self.failure();
        }
        match a.code {
            ACCESS_CHALLENGE => {
                let Some(eap) = a.eap else {
                    return self.failure();
                };
                match Packet::parse(&eap) {
                    Ok(p) if p.code == packet::REQUEST => {
                        self.id = p.id;
                        self.state = a.state;
                        AuthStep::Request(eap)
                    }
                    _ => self.failure(),
                }
            }
            ACCESS_ACCEPT => {
                let Some(msk) = a.msk.filter(|m| m.len() >= 64) else {
                    return self.failure();
                };
                let identity = a
                    .user_name
                    .or_else(|| self.identity.clone())
                    .unwrap_or_default();
                let packet = match a.eap {
                    Some(e) if Packet::parse(&e).is_ok_and(|p| p.code == packet::SUCCESS) => e,
                    _ => packet::success(self.id),
                };
                AuthStep::Success {
                    packet,
                    msk,
                    identity,
                }
            }
            _ => {
                let packet = match a.eap {
                    Some(e) if Packet::parse(&e).is_ok_and(|p| p.code == packet::FAILURE) => e,
                    _ => packet::failure(self.id),
                };
                AuthStep::Failure { packet }
            }
        }
    }
}

impl EapAuthenticator for RadiusAuthenticator {
    fn start(&mut self) -> Vec<u8> {
        self.id = 0;
        self.identity = None;
        self.state = None;
        self.outgoing = None;
        self.waiting = false;
        Packet {
            code: packet::REQUEST,
            id: self.id,
            typ: Some(packet::TYPE_IDENTITY),
            data: &[],
        }
        .to_vec()
    }

    fn receive(&mut self, b: &[u8]) -> AuthStep {
        let Ok(p) = Packet::parse(b) else {
            return AuthStep::Discard;
        };
        if p.code != packet::RESPONSE || p.id != self.id || self.waiting {
            return AuthStep::Discard;
        }
        if p.typ == Some(packet::TYPE_IDENTITY) && self.identity.is_none() {
            self.identity = Some(String::from_utf8_lossy(p.data).into_owned());
        }
        let mut attributes = Vec::new();
        if let Some(name) = &self.identity {
            let mut n = name.as_bytes().to_vec();
            n.truncate(MAX_ATTR_VALUE);
            attributes.push((ATTR_USER_NAME, n));
        }
        // Service-Type = Authenticate-Only (8): the NAS only wants the keys.
        attributes.push((ATTR_SERVICE_TYPE, 8u32.to_be_bytes().to_vec()));
        let mut nas = self.cfg.nas_identifier.as_bytes().to_vec();
        nas.truncate(MAX_ATTR_VALUE);
        attributes.push((ATTR_NAS_IDENTIFIER, nas));
        attributes.push((ATTR_FRAMED_MTU, FRAMED_MTU.to_be_bytes().to_vec()));
        if let Some(s) = &self.state {
            attributes.push((ATTR_STATE, s.clone()));
        }
        attributes.extend(eap_attributes(
            &b[..usize::from(u16::from_be_bytes([b[2], b[3]]))],
        ));
        self.outgoing = Some(AccessRequest { attributes });
        self.waiting = true;
        AuthStep::Pending
    }
}

/// A request in flight.
#[derive(Debug, Clone)]
struct InFlight {
    session: u32,
    auth: [u8; 16],
    bytes: Vec<u8>,
    tries: u32,
    deadline_ms: u64,
}

/// What [`RadiusClient`] gives back for a session.
pub type Outcome = (u32, Result<Answer, RadiusError>);

/// The requests of one UDP socket to one AAA server: identifiers, retransmission,
/// verification. Time is milliseconds on the caller's clock.
#[derive(Debug)]
pub struct RadiusClient {
    cfg: Arc<RadiusConfig>,
    next_id: u8,
    flight: HashMap<u8, InFlight>,
    rng: ring::rand::SystemRandom,
}

impl RadiusClient {
    /// A client with `cfg`.
    pub fn new(cfg: Arc<RadiusConfig>) -> RadiusClient {
        RadiusClient {
            cfg,
            next_id: 0,
            flight: HashMap::new(),
            rng: ring::rand::SystemRandom::new(),
        }
    }

    /// Encodes `req` of `session`: the datagram to send, or `None` when all 256
    /// identifiers are in flight (the caller fails the session: the AAA server is far
    /// behind).
    pub fn send(&mut self, session: u32, req: &AccessRequest, now_ms: u64) -> Option<Vec<u8>> {
        use ring::rand::SecureRandom;
        // A session has at most one request in flight: a new one replaces it.
        self.flight.retain(|_, f| f.session != session);
        let id = (0..=255u8)
            .map(|i| self.next_id.wrapping_add(i))
            .find(|i| !self.flight.contains_key(i))?;
        self.next_id = id.wrapping_add(1);
        let mut auth = [0u8; 16];
        self.rng.fill(&mut auth).ok()?;
        let bytes = encode_request(req, id, &auth, &self.cfg.secret);
        self.flight.insert(
            id,
            InFlight {
                session,
                auth,
                bytes: bytes.clone(),
                tries: 1,
                deadline_ms: now_ms + self.cfg.timeout_ms,
            },
        );
        Some(bytes)
    }

    /// A datagram from the server: the session it answers and the verified answer (or
    /// why it cannot be used: no keys in an Access-Accept, an EAP packet too large for
    /// PCP), `None` for a datagram that is not an answer in flight, or the error of one
    /// that fails verification (dropped; the request stays in flight).
    pub fn receive(&mut self, datagram: &[u8]) -> Result<Option<Outcome>, RadiusError> {
        let Some(id) = datagram.get(1) else {
            return Ok(None);
        };
        let Some(f) = self.flight.get(id) else {
            return Ok(None);
        };
        match decode_response(datagram, &f.auth, &self.cfg.secret) {
            Ok(a) => {
                let f = self.flight.remove(id).expect("in flight");
                let server = self.cfg.server.clone();
                let a = match &a.eap {
                    Some(e) if e.len() > MAX_EAP_PACKET => Err(RadiusError::EapTooLarge {
                        server,
                        len: e.len(),
                    }),
                    _ if a.code == ACCESS_ACCEPT && a.msk.as_ref().is_none_or(|m| m.len() < 64) => {
                        Err(RadiusError::NoKeys { server })
                    }
                    _ => Ok(a),
                };
                Ok(Some((f.session, a)))
            }
            // Not removed: a forged or corrupted copy must not cancel the request.
            Err(reason) => Err(RadiusError::BadResponse {
                server: self.cfg.server.clone(),
                reason,
            }),
        }
    }

    /// When [`RadiusClient::handle_timeout`] must run next.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.flight.values().map(|f| f.deadline_ms).min()
    }

    /// Retransmissions due (to send) and sessions given up on.
    pub fn handle_timeout(&mut self, now_ms: u64) -> (Vec<Vec<u8>>, Vec<Outcome>) {
        let (mut again, mut failed) = (Vec::new(), Vec::new());
        let mut done = Vec::new();
        for (id, f) in &mut self.flight {
            if f.deadline_ms > now_ms {
                continue;
            }
            if f.tries >= self.cfg.tries {
                done.push(*id);
                failed.push((
                    f.session,
                    Err(RadiusError::Timeout {
                        server: self.cfg.server.clone(),
                        tries: f.tries,
                    }),
                ));
            } else {
                f.tries += 1;
                f.deadline_ms = now_ms + self.cfg.timeout_ms;
                again.push(f.bytes.clone());
            }
        }
        for id in done {
            self.flight.remove(&id);
        }
        (again, failed)
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.flight.len()
    }
}
