//! The RFC 7652 algorithms: transport-key derivation (§4) with PRF_HMAC_SHA2_256 and
//! message authentication with AUTH_HMAC_SHA2_256_128 (RFC 4868), over RustCrypto's
//! `hmac` and `sha2`.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// IKEv2 transform type 2 ID of PRF_HMAC_SHA2_256, the PRF every implementation supports.
pub const PRF_HMAC_SHA2_256: u32 = 5;
/// IKEv2 transform type 3 ID of AUTH_HMAC_SHA2_256_128, the MAC every implementation
/// supports.
pub const AUTH_HMAC_SHA2_256_128: u32 = 12;
/// Octets of an AUTH_HMAC_SHA2_256_128 MAC: HMAC-SHA-256 truncated to 128 bits.
pub const MAC_LEN: usize = 16;
/// Octets of a transport key: the PRF_HMAC_SHA2_256 output, which is also the key length
/// of AUTH_HMAC_SHA2_256_128 (RFC 4868 §2.1.1).
pub const KEY_LEN: usize = 32;
/// The label of the transport-key derivation (RFC 7652 §4), without a terminating NUL.
pub const LABEL: &[u8] = b"IETF PCP";

/// The PRFs this implementation offers, in order of preference.
pub const SUPPORTED_PRFS: &[u32] = &[PRF_HMAC_SHA2_256];
/// The MAC algorithms this implementation offers, in order of preference.
pub const SUPPORTED_MACS: &[u32] = &[AUTH_HMAC_SHA2_256_128];

/// A transport key with the ID it is known by.
#[derive(Clone, PartialEq, Eq)]
pub struct TransportKey {
    /// The key ID carried in the tags made with this key.
    pub id: u32,
    key: [u8; KEY_LEN],
}

impl std::fmt::Debug for TransportKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransportKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl TransportKey {
    /// Derives the transport key of RFC 7652 §4:
    /// `prf(MSK, "IETF PCP" || Session ID || Nonce || Key ID)` with PRF_HMAC_SHA2_256
    /// (HMAC-SHA-256 keyed with the MSK). Session ID, Nonce and Key ID enter as 4 octets
    /// each in network byte order, as they appear on the wire (docs/AUTH.md).
    pub fn derive(msk: &[u8], session_id: u32, nonce: u32, key_id: u32) -> TransportKey {
        let mut m = hmac(msk);
        m.update(LABEL);
        m.update(&session_id.to_be_bytes());
        m.update(&nonce.to_be_bytes());
        m.update(&key_id.to_be_bytes());
        let mut key = [0; KEY_LEN];
        key.copy_from_slice(&m.finalize().into_bytes());
        TransportKey { id: key_id, key }
    }

    /// A key from raw octets (tests and known-answer checks).
    pub fn from_bytes(id: u32, key: [u8; KEY_LEN]) -> TransportKey {
        TransportKey { id, key }
    }

    /// The key octets.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.key
    }

    /// AUTH_HMAC_SHA2_256_128 over `parts` in order (the message with its MAC field
    /// zeroed, in pieces so that nothing is copied).
    pub fn mac(&self, parts: &[&[u8]]) -> [u8; MAC_LEN] {
        let mut m = hmac(&self.key);
        for p in parts {
            m.update(p);
        }
        let mut out = [0; MAC_LEN];
        out.copy_from_slice(&m.finalize().into_bytes()[..MAC_LEN]);
        out
    }

    /// Whether `tag` is the AUTH_HMAC_SHA2_256_128 MAC of `parts`, compared in constant
    /// time.
    pub fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        if tag.len() != MAC_LEN {
            return false;
        }
        let mut m = hmac(&self.key);
        for p in parts {
            m.update(p);
        }
        m.verify_truncated_left(tag).is_ok()
    }
}

fn hmac(key: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length (longer ones are hashed), so this cannot fail.
    <HmacSha256 as KeyInit>::new_from_slice(key).expect("HMAC accepts keys of any length")
}
