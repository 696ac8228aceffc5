//! The RADIUS codec both sides share (RFC 2865 §3, RFC 3579 §3, RFC 2548 §2.4): the
//! header, the attribute walk, encoding with a Message-Authenticator, the Response
//! Authenticator, EAP-Message splitting and joining, and MS-MPPE key encryption.
//!
//! ```text
//! | Code (8) | Identifier (8) | Length (16) | Authenticator (128) | Attributes... |
//! ```

use hmac::{Hmac, KeyInit, Mac};
use md5::{Digest, Md5};

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
/// The RADIUS header: code, identifier, length, authenticator.
pub const HEADER_LEN: usize = 20;

type HmacMd5 = Hmac<Md5>;

pub(crate) fn hmac_md5(key: &[u8], data: &[u8]) -> [u8; 16] {
    let mut m = <HmacMd5 as KeyInit>::new_from_slice(key).expect("HMAC takes any key");
    m.update(data);
    m.finalize().into_bytes().into()
}

pub(crate) fn md5(parts: &[&[u8]]) -> [u8; 16] {
    let mut h = Md5::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

pub(crate) fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// One attribute: its offset in the attribute area, type and value.
pub type Attribute<'a> = (usize, u8, &'a [u8]);

/// A packet whose header and attributes parse (nothing verified yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed<'a> {
    /// The packet up to its Length field (octets beyond are padding, RFC 2865 §3).
    pub bytes: &'a [u8],
    /// Code.
    pub code: u8,
    /// Identifier.
    pub id: u8,
    /// Request or Response Authenticator.
    pub authenticator: [u8; 16],
    /// The attributes in order.
    pub attributes: Vec<Attribute<'a>>,
}

impl<'a> Parsed<'a> {
    /// Parses a datagram: a header whose Length is within 20–4096 octets and no more
    /// than the datagram (RFC 2865 §3: shorter packets are silently discarded), and
    /// attributes that tile the rest exactly.
    pub fn parse(p: &'a [u8]) -> Result<Parsed<'a>, &'static str> {
        if p.len() < HEADER_LEN {
            return Err("shorter than a RADIUS header");
        }
        let len = usize::from(u16::from_be_bytes([p[2], p[3]]));
        if !(HEADER_LEN..=MAX_PACKET).contains(&len) || len > p.len() {
            return Err("bad length field");
        }
        let bytes = &p[..len];
        let attributes = attributes(&bytes[HEADER_LEN..]).ok_or("attributes do not parse")?;
        Ok(Parsed {
            bytes,
            code: bytes[0],
            id: bytes[1],
            authenticator: bytes[4..20].try_into().expect("16 octets"),
            attributes,
        })
    }

    /// The first value of attribute `t`.
    pub fn first(&self, t: u8) -> Option<&'a [u8]> {
        self.attributes
            .iter()
            .find(|(_, a, _)| *a == t)
            .map(|(_, _, v)| *v)
    }

    /// The EAP-Message attributes joined in order (RFC 3579 §3.1), if any.
    pub fn eap_message(&self) -> Option<Vec<u8>> {
        let mut eap: Option<Vec<u8>> = None;
        for (_, t, v) in &self.attributes {
            if *t == ATTR_EAP_MESSAGE {
                eap.get_or_insert_default().extend_from_slice(v);
            }
        }
        eap
    }

    /// Checks the one Message-Authenticator (RFC 3579 §3.2): HMAC-MD5 keyed with the
    /// shared secret over the packet with `authenticator` in the Authenticator field
    /// (the request's own for a request, the request's for a response) and the
    /// attribute's value zeroed.
    pub fn check_message_authenticator(
        &self,
        authenticator: &[u8; 16],
        secret: &[u8],
    ) -> Result<(), &'static str> {
        let mas: Vec<_> = self
            .attributes
            .iter()
            .filter(|(_, t, _)| *t == ATTR_MESSAGE_AUTHENTICATOR)
            .collect();
        let [(at, _, ma)] = mas.as_slice() else {
            return Err("no (or more than one) Message-Authenticator");
        };
        if ma.len() != 16 {
            return Err("Message-Authenticator is not 16 octets");
        }
        let mut copy = self.bytes.to_vec();
        copy[4..20].copy_from_slice(authenticator);
        let off = HEADER_LEN + at + 2;
        copy[off..off + 16].fill(0);
        if !constant_eq(&hmac_md5(secret, &copy), ma) {
            return Err("Message-Authenticator does not verify");
        }
        Ok(())
    }

    /// MS-MPPE-Recv-Key and MS-MPPE-Send-Key (Microsoft Vendor-Specific attributes),
    /// decrypted with the Request Authenticator `req_auth`; `None` for a key absent or
    /// not decrypting.
    pub fn ms_mppe_keys(
        &self,
        req_auth: &[u8; 16],
        secret: &[u8],
    ) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
        let (mut recv, mut send) = (None, None);
        for (_, t, v) in &self.attributes {
            if *t != ATTR_VENDOR_SPECIFIC || v.len() <= 4 {
                continue;
            }
            if u32::from_be_bytes([v[0], v[1], v[2], v[3]]) != VENDOR_MICROSOFT {
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
        (recv, send)
    }
}

/// Walks attributes; `None` if they do not tile the octets exactly.
pub fn attributes(b: &[u8]) -> Option<Vec<Attribute<'_>>> {
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

/// Splits `eap` into EAP-Message attributes of at most 253 octets (RFC 3579 §3.1).
pub fn eap_attributes(eap: &[u8]) -> impl Iterator<Item = (u8, Vec<u8>)> + '_ {
    eap.chunks(MAX_ATTR_VALUE)
        .map(|c| (ATTR_EAP_MESSAGE, c.to_vec()))
}

/// Encodes a packet with `authenticator` in its header, a Message-Authenticator
/// (RFC 3579 §3.2) and the attributes: a complete Access-Request, or a response before
/// its Response Authenticator. The Message-Authenticator is the **first** attribute,
/// as the BlastRADIUS hardening (CVE-2024-3596) asks — an MD5 chosen-prefix collision
/// needs attacker-controlled octets before it — and computed last over the whole
/// packet. Receivers accept it anywhere.
pub fn encode(
    code: u8,
    id: u8,
    authenticator: &[u8; 16],
    attributes: &[(u8, Vec<u8>)],
    secret: &[u8],
) -> Vec<u8> {
    let mut p = vec![code, id, 0, 0];
    p.extend_from_slice(authenticator);
    p.extend_from_slice(&[ATTR_MESSAGE_AUTHENTICATOR, 18]);
    let ma_at = p.len();
    p.extend_from_slice(&[0; 16]);
    for (t, v) in attributes {
        debug_assert!(v.len() <= MAX_ATTR_VALUE);
        p.push(*t);
        p.push((v.len() + 2) as u8);
        p.extend_from_slice(v);
    }
    let len = p.len() as u16;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    let ma = hmac_md5(secret, &p);
    p[ma_at..ma_at + 16].copy_from_slice(&ma);
    p
}

/// The Response Authenticator: MD5(Code, Identifier, Length, Request Authenticator,
/// attributes, secret) (RFC 2865 §3).
pub fn response_authenticator(p: &[u8], req_auth: &[u8; 16], secret: &[u8]) -> [u8; 16] {
    md5(&[&p[..4], req_auth, &p[HEADER_LEN..], secret])
}

/// Encodes a response to a request with `req_auth`: attributes, then a
/// Message-Authenticator, then the Response Authenticator.
pub fn encode_response(
    code: u8,
    id: u8,
    req_auth: &[u8; 16],
    attributes: &[(u8, Vec<u8>)],
    secret: &[u8],
) -> Vec<u8> {
    let mut p = encode(code, id, req_auth, attributes, secret);
    let ra = response_authenticator(&p, req_auth, secret);
    p[4..20].copy_from_slice(&ra);
    p
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

/// Encrypts an MS-MPPE key with `salt` (its high bit is set here, as RFC 2548 §2.4.2
/// requires), the inverse of [`mppe_key`].
pub fn mppe_encrypt(key: &[u8], salt: [u8; 2], req_auth: &[u8; 16], secret: &[u8]) -> Vec<u8> {
    let salt = [salt[0] | 0x80, salt[1]];
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

/// A Microsoft Vendor-Specific attribute carrying MS-MPPE-Send-Key or -Recv-Key
/// (`vendor_type`), `key` encrypted with `salt` for the request with `req_auth`.
pub fn ms_mppe_attribute(
    vendor_type: u8,
    key: &[u8],
    salt: [u8; 2],
    req_auth: &[u8; 16],
    secret: &[u8],
) -> (u8, Vec<u8>) {
    let enc = mppe_encrypt(key, salt, req_auth, secret);
    let mut v = VENDOR_MICROSOFT.to_be_bytes().to_vec();
    v.push(vendor_type);
    v.push((enc.len() + 2) as u8);
    v.extend(enc);
    (ATTR_VENDOR_SPECIFIC, v)
}
