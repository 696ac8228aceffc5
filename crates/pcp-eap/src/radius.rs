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
//! Why not a RADIUS crate: the crates on crates.io each own their socket (blocking or
//! async), and none decrypts MS-MPPE keys; the codec needed here is two digests and a
//! TLV walk.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use hmac::{Hmac, KeyInit, Mac};
use md5::{Digest, Md5};
use pcp_auth::eap::{AuthStep, EapAuthenticator, MAX_EAP_PACKET};

use crate::packet::{self, Packet};

/// Access-Request.
pub const ACCESS_REQUEST: u8 = 1;
/// Access-Accept.
pub const ACCESS_ACCEPT: u8 = 2;
/// Access-Reject.
pub const ACCESS_REJECT: u8 = 3;
/// Access-Challenge.
pub const ACCESS_CHALLENGE: u8 = 11;

/// User-Name.
pub const ATTR_USER_NAME: u8 = 1;
/// Service-Type.
pub const ATTR_SERVICE_TYPE: u8 = 6;
/// Framed-MTU.
pub const ATTR_FRAMED_MTU: u8 = 12;
/// State.
pub const ATTR_STATE: u8 = 24;
/// Vendor-Specific.
pub const ATTR_VENDOR_SPECIFIC: u8 = 26;
/// NAS-Identifier.
pub const ATTR_NAS_IDENTIFIER: u8 = 32;
/// EAP-Message (RFC 3579 §3.1).
pub const ATTR_EAP_MESSAGE: u8 = 79;
/// Message-Authenticator (RFC 3579 §3.2).
pub const ATTR_MESSAGE_AUTHENTICATOR: u8 = 80;
/// Microsoft's vendor ID (RFC 2548).
pub const VENDOR_MICROSOFT: u32 = 311;
/// MS-MPPE-Send-Key.
pub const MS_MPPE_SEND_KEY: u8 = 16;
/// MS-MPPE-Recv-Key.
pub const MS_MPPE_RECV_KEY: u8 = 17;

/// Largest attribute value (255 minus the 2-octet attribute header).
pub const MAX_ATTR_VALUE: usize = 253;
/// Largest RADIUS packet (RFC 2865 §3).
pub const MAX_PACKET: usize = 4096;
/// Framed-MTU sent: the AAA server sizes its EAP-TTLS fragments to it, so that each
/// EAP packet fits a PA message ([`MAX_EAP_PACKET`], with room for EAP and TTLS
/// headers).
pub const FRAMED_MTU: u32 = 900;

type HmacMd5 = Hmac<Md5>;

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

/// Splits `eap` into EAP-Message attributes of at most 253 octets (RFC 3579 §3.1).
pub fn eap_attributes(eap: &[u8]) -> impl Iterator<Item = (u8, Vec<u8>)> + '_ {
    eap.chunks(MAX_ATTR_VALUE)
        .map(|c| (ATTR_EAP_MESSAGE, c.to_vec()))
}

/// Encodes a request with identifier `id` and Request Authenticator `auth`; a
/// Message-Authenticator is always appended (RFC 3579 §3.2) and computed last.
pub fn encode_request(req: &AccessRequest, id: u8, auth: &[u8; 16], secret: &[u8]) -> Vec<u8> {
    let mut p = vec![ACCESS_REQUEST, id, 0, 0];
    p.extend_from_slice(auth);
    for (t, v) in &req.attributes {
        debug_assert!(v.len() <= MAX_ATTR_VALUE);
        p.push(*t);
        p.push((v.len() + 2) as u8);
        p.extend_from_slice(v);
    }
    p.extend_from_slice(&[ATTR_MESSAGE_AUTHENTICATOR, 18]);
    let ma_at = p.len();
    p.extend_from_slice(&[0; 16]);
    let len = p.len() as u16;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    let ma = hmac_md5(secret, &p);
    p[ma_at..ma_at + 16].copy_from_slice(&ma);
    p
}

fn hmac_md5(key: &[u8], data: &[u8]) -> [u8; 16] {
    let mut m = <HmacMd5 as KeyInit>::new_from_slice(key).expect("HMAC takes any key");
    m.update(data);
    m.finalize().into_bytes().into()
}

fn md5(parts: &[&[u8]]) -> [u8; 16] {
    let mut h = Md5::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// Walks attributes; `None` if they do not tile the octets exactly.
fn attributes(b: &[u8]) -> Option<Vec<(usize, u8, &[u8])>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let t = b[i];
        let l = usize::from(*b.get(i + 1)?);
        if l < 2 || i + l > b.len() {
            return None;
        }
        out.push((i, t, &b[i + 2..i + l]));
        i += l;
    }
    Some(out)
}

/// Verifies a response to the request with Request Authenticator `req_auth` and
/// decodes it (RFC 2865 §3, RFC 3579 §3.2, RFC 2548 §2.4).
pub fn decode_response(
    p: &[u8],
    req_auth: &[u8; 16],
    secret: &[u8],
) -> Result<Answer, &'static str> {
    if p.len() < 20 {
        return Err("shorter than a RADIUS header");
    }
    let len = usize::from(u16::from_be_bytes([p[2], p[3]]));
    if !(20..=MAX_PACKET).contains(&len) || len > p.len() {
        return Err("bad length field");
    }
    let p = &p[..len];
    let code = p[0];
    if ![ACCESS_ACCEPT, ACCESS_REJECT, ACCESS_CHALLENGE].contains(&code) {
        return Err("not an Access-Accept, -Reject or -Challenge");
    }
    let expect = md5(&[&p[..4], req_auth, &p[20..], secret]);
    if !constant_eq(&expect, &p[4..20]) {
        return Err("Response Authenticator does not verify");
    }
    let attrs = attributes(&p[20..]).ok_or("attributes do not parse")?;
    let mas: Vec<_> = attrs
        .iter()
        .filter(|(_, t, _)| *t == ATTR_MESSAGE_AUTHENTICATOR)
        .collect();
    // Always required: every response to an EAP request carries one (RFC 3579 §3.2).
    let [(at, _, ma)] = mas.as_slice() else {
        return Err("no (or more than one) Message-Authenticator");
    };
    if ma.len() != 16 {
        return Err("Message-Authenticator is not 16 octets");
    }
    let mut copy = p.to_vec();
    copy[4..20].copy_from_slice(req_auth);
    let off = 20 + at + 2;
    copy[off..off + 16].fill(0);
    if !constant_eq(&hmac_md5(secret, &copy), ma) {
        return Err("Message-Authenticator does not verify");
    }
    let mut eap: Option<Vec<u8>> = None;
    let (mut state, mut user_name, mut recv, mut send) = (None, None, None, None);
    for (_, t, v) in &attrs {
        match *t {
            ATTR_EAP_MESSAGE => eap.get_or_insert_default().extend_from_slice(v),
            ATTR_STATE => state = Some(v.to_vec()),
            ATTR_USER_NAME => user_name = String::from_utf8(v.to_vec()).ok(),
            ATTR_VENDOR_SPECIFIC if v.len() > 4 => {
                let vendor = u32::from_be_bytes([v[0], v[1], v[2], v[3]]);
                if vendor != VENDOR_MICROSOFT {
                    continue;
                }
                for (_, vt, vv) in attributes(&v[4..]).unwrap_or_default() {
                    match vt {
                        MS_MPPE_RECV_KEY => recv = mppe_key(vv, req_auth, secret),
                        MS_MPPE_SEND_KEY => send = mppe_key(vv, req_auth, secret),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if code == ACCESS_CHALLENGE && eap.is_none() {
        return Err("Access-Challenge without EAP-Message");
    }
    let msk = match (recv, send) {
        (Some(mut r), Some(s)) => {
            r.extend_from_slice(&s);
            Some(r)
        }
        _ => None,
    };
    Ok(Answer {
        code,
        eap,
        state,
        user_name,
        msk,
    })
}

/// Decrypts an MS-MPPE-Send/Recv-Key value: Salt (2, high bit set) and the string
/// encrypted with MD5(secret || Request Authenticator || Salt), then MD5(secret ||
/// previous cipher block) (RFC 2548 §2.4.2). The plaintext is a key length, the key
/// and padding.
pub fn mppe_key(v: &[u8], req_auth: &[u8; 16], secret: &[u8]) -> Option<Vec<u8>> {
    if v.len() < 2 + 16 || !(v.len() - 2).is_multiple_of(16) || v[0] & 0x80 == 0 {
        return None;
    }
    let (salt, cipher) = v.split_at(2);
    let mut plain = Vec::with_capacity(cipher.len());
    let mut b = md5(&[secret, req_auth, salt]);
    for c in cipher.chunks(16) {
        plain.extend(c.iter().zip(b).map(|(c, b)| c ^ b));
        b = md5(&[secret, c]);
    }
    let len = usize::from(plain[0]);
    (len > 0 && len < plain.len()).then(|| plain[1..1 + len].to_vec())
}

/// Encrypts an MS-MPPE key with `salt` (the AAA server's side; for tests).
pub fn mppe_encrypt(key: &[u8], salt: [u8; 2], req_auth: &[u8; 16], secret: &[u8]) -> Vec<u8> {
    let mut plain = vec![key.len() as u8];
    plain.extend_from_slice(key);
    plain.resize(plain.len().div_ceil(16) * 16, 0);
    let mut out = salt.to_vec();
    let mut b = md5(&[secret, req_auth, &salt]);
    for p in plain.chunks(16) {
        let c: Vec<u8> = p.iter().zip(b).map(|(p, b)| p ^ b).collect();
        b = md5(&[secret, &c]);
        out.extend_from_slice(&c);
    }
    out
}

/// Encodes a response to a request with `req_auth` (the AAA server's side; for tests
/// and fakes): attributes, then a Message-Authenticator, then the Response
/// Authenticator.
pub fn encode_response(
    code: u8,
    id: u8,
    req_auth: &[u8; 16],
    attributes: &[(u8, Vec<u8>)],
    secret: &[u8],
) -> Vec<u8> {
    let mut p = vec![code, id, 0, 0];
    p.extend_from_slice(req_auth);
    for (t, v) in attributes {
        p.push(*t);
        p.push((v.len() + 2) as u8);
        p.extend_from_slice(v);
    }
    p.extend_from_slice(&[ATTR_MESSAGE_AUTHENTICATOR, 18]);
    let ma_at = p.len();
    p.extend_from_slice(&[0; 16]);
    let len = p.len() as u16;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    let ma = hmac_md5(secret, &p);
    p[ma_at..ma_at + 16].copy_from_slice(&ma);
    let ra = md5(&[&p[..4], req_auth, &p[20..], secret]);
    p[4..20].copy_from_slice(&ra);
    p
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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

    /// The sessions with a request in flight.
    pub fn sessions(&self) -> impl Iterator<Item = u32> + '_ {
        self.flight.values().map(|f| f.session)
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.flight.len()
    }
}
