//! Authentication and encryption of the replication link with a pre-shared key.
//!
//! A layer around the frames of [`crate::wire`]: the shell seals what
//! [`crate::HaNode::poll_transmit`] (or a [`crate::Beacon`]) wrote, and opens what it
//! read before [`crate::HaNode::handle_frame`] sees it. Without a key nothing here runs
//! and the wire format is that of [`crate::wire`], unchanged.
//!
//! ```text
//! sealed:  header (32, version octet 0x80|VERSION) | salt (16) | counter (8) | body ⊕ ChaCha20 | tag (16)
//! ```
//!
//! - The header, salt and counter are the associated data; the body (everything after
//!   the header) is encrypted. ChaCha20-Poly1305 from `ring`.
//! - Nonces never repeat under one key: every sender draws a random 128-bit salt when
//!   it starts and derives its own key from the pre-shared key with HKDF-SHA256 and
//!   that salt; the nonce is a 64-bit counter under that key, never reset. Two
//!   processes (two nodes, or one node before and after a restart) share a key only
//!   if they draw the same salt (2^-64 after 2^32 restarts).
//! - Replays: the receiver keeps, for the peer's current salt, a sliding window of
//!   [`REPLAY_WINDOW`] counters (as IPsec does, RFC 4303 §3.4.3). A frame under one of
//!   the last [`RETIRED_SALTS`] salts the peer used before is refused outright; a frame
//!   of an older boot than that, or any frame of the peer's current boot replayed to a
//!   receiver that restarted since, is authentic and is handled once — the node's own
//!   fencing then applies (docs/HA.md "Replication link security").
//! - The sealed header's version octet has its high bit set: a receiver without a key
//!   (or of an older build) reads it as a newer version and drops it, so a frame is
//!   never taken for what it is not.
//! - A frame under the node's own salt (a reflection of its own traffic) is refused.

use std::sync::atomic::{AtomicU64, Ordering};

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use ring::rand::{SecureRandom as _, SystemRandom};

use crate::wire::{HEADER_LEN, MAGIC, VERSION};

/// Version octet of a sealed frame.
pub const SEALED_VERSION: u8 = 0x80 | VERSION;
/// Octets of salt in a sealed frame.
pub const SALT_LEN: usize = 16;
/// Octets a sealed frame has more than the plain one (salt, counter, tag).
pub const OVERHEAD: usize = SALT_LEN + 8 + TAG_LEN;
/// Shortest pre-shared key accepted, in octets.
pub const MIN_KEY_LEN: usize = 32;
/// Longest pre-shared key accepted, in octets.
pub const MAX_KEY_LEN: usize = 256;
/// Frames a receiver accepts out of order behind the newest one it saw.
pub const REPLAY_WINDOW: u64 = 1024;
/// Former salts of the peer a receiver remembers (and refuses).
pub const RETIRED_SALTS: usize = 16;

const TAG_LEN: usize = 16;
const AAD_LEN: usize = HEADER_LEN + SALT_LEN + 8;
const INFO: &[u8] = b"pcp-ha link v1";

/// Why a pre-shared key was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// Neither hex nor base64.
    #[error("not hex or base64 (expected one line of at least {MIN_KEY_LEN} random octets)")]
    Malformed,
    /// Too short.
    #[error("{0} octets, at least {MIN_KEY_LEN} needed (head -c32 /dev/urandom | base64)")]
    Short(usize),
    /// Too long.
    #[error("{0} octets, at most {MAX_KEY_LEN}")]
    Long(usize),
    /// Not random.
    #[error("not random: only {0} distinct octet values (head -c32 /dev/urandom | base64)")]
    Weak(usize),
}

/// Why a frame was not opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// Failed authentication (forged, corrupted, another key, truncated).
    Auth,
    /// Authentic, but seen before (or from a retired boot of the peer).
    Replay,
    /// A plain frame at a node with a key.
    Unkeyed,
    /// A sealed frame at a node without a key.
    Keyed,
}

impl Reject {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Reject::Auth => "auth",
            Reject::Replay => "replay",
            Reject::Unkeyed => "unkeyed",
            Reject::Keyed => "keyed",
        }
    }
}

/// Whether `frame` is sealed (by its version octet): what a node without a key uses
/// to tell a keyed peer from garbage.
pub fn is_sealed(frame: &[u8]) -> bool {
    frame.len() > 4 && frame[..4] == MAGIC && frame[4] == SEALED_VERSION
}

/// The pre-shared key.
#[derive(Clone)]
pub struct LinkKey(hkdf::Prk);

impl std::fmt::Debug for LinkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkKey(..)")
    }
}

impl LinkKey {
    /// Reads a key: one line of hex or standard base64 (surrounding white space is
    /// ignored), at least [`MIN_KEY_LEN`] octets that look random.
    pub fn parse(text: &str) -> Result<LinkKey, KeyError> {
        let text = text.trim();
        let octets = decode_hex(text)
            .or_else(|| {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD.decode(text).ok()
            })
            .ok_or(KeyError::Malformed)?;
        LinkKey::from_octets(&octets)
    }

    /// A key from its octets (checked as [`LinkKey::parse`] does).
    pub fn from_octets(octets: &[u8]) -> Result<LinkKey, KeyError> {
        if octets.len() < MIN_KEY_LEN {
            return Err(KeyError::Short(octets.len()));
        }
        if octets.len() > MAX_KEY_LEN {
            return Err(KeyError::Long(octets.len()));
        }
        let mut seen = [false; 256];
        for &b in octets {
            seen[usize::from(b)] = true;
        }
        let distinct = seen.iter().filter(|s| **s).count();
        // 32 random octets have ~30 distinct values; fewer than 8 is a pattern or a
        // placeholder ("0000…", "abab…"), not a secret.
        if distinct < 8 {
            return Err(KeyError::Weak(distinct));
        }
        // Extract once with a fixed salt; each sender's salt goes in at expansion
        // (see `boot_key`), so the PSK itself is never an AEAD key.
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, INFO).extract(octets);
        Ok(LinkKey(prk))
    }

    fn boot_key(&self, salt: &[u8; SALT_LEN]) -> LessSafeKey {
        let info = [INFO, salt.as_slice()];
        let okm = self
            .0
            .expand(&info, &CHACHA20_POLY1305)
            .expect("a 32-octet output is within HKDF-SHA256's limit");
        let mut key = [0u8; 32];
        okm.fill(&mut key)
            .expect("32 octets asked of a 32-octet OKM");
        LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &key).expect("32-octet key"))
    }
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    let text = text.as_bytes();
    if !text.len().is_multiple_of(2) || !text.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    text.chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).ok()?, 16).ok())
        .collect()
}

/// The sending side of one process: its salt, its key and its counter. Shared by
/// every thread that sends (the counter is atomic), so one process never uses a
/// nonce twice.
pub struct Sealer {
    salt: [u8; SALT_LEN],
    key: LessSafeKey,
    counter: AtomicU64,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("counter", &self.counter.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// A sender with a fresh random salt (`None` if the system has no randomness).
    pub fn new(key: &LinkKey) -> Option<Sealer> {
        let mut salt = [0u8; SALT_LEN];
        SystemRandom::new().fill(&mut salt).ok()?;
        Some(Sealer::with_salt(key, salt))
    }

    /// A sender with the given salt: for deterministic tests only — a salt used twice
    /// with one key reuses nonces.
    pub fn with_salt(key: &LinkKey, salt: [u8; SALT_LEN]) -> Sealer {
        Sealer {
            salt,
            key: key.boot_key(&salt),
            counter: AtomicU64::new(0),
        }
    }

    /// This sender's salt.
    pub fn salt(&self) -> [u8; SALT_LEN] {
        self.salt
    }

    /// The counter the next frame gets.
    pub fn next_counter(&self) -> u64 {
        self.counter.load(Ordering::Relaxed)
    }

    /// Seals the plain frame in `buf[..len]` in place; `buf` must have [`OVERHEAD`]
    /// octets of room after it. Returns the sealed length, or `None` if the frame is
    /// not a frame, does not fit, or the counter is spent.
    pub fn seal(&self, buf: &mut [u8], len: usize) -> Option<usize> {
        if len < HEADER_LEN || len + OVERHEAD > buf.len() || buf[..4] != MAGIC {
            return None;
        }
        // fetch_update: never wraps, so a nonce cannot come round again.
        let counter = self
            .counter
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| c.checked_add(1))
            .ok()?;
        let body = len - HEADER_LEN;
        buf.copy_within(HEADER_LEN..len, AAD_LEN);
        buf[4] = SEALED_VERSION;
        buf[HEADER_LEN..HEADER_LEN + SALT_LEN].copy_from_slice(&self.salt);
        buf[HEADER_LEN + SALT_LEN..AAD_LEN].copy_from_slice(&counter.to_be_bytes());
        let (aad, rest) = buf.split_at_mut(AAD_LEN);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(counter), Aad::from(&*aad), &mut rest[..body])
            .ok()?;
        rest[body..body + TAG_LEN].copy_from_slice(tag.as_ref());
        Some(len + OVERHEAD)
    }
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// The receiving side: the peer's current boot (its salt, the derived key, the replay
/// window) and the salts it used before. Fixed size: nothing grows with what arrives.
pub struct Opener {
    key: LinkKey,
    own_salt: [u8; SALT_LEN],
    peer: Option<PeerBoot>,
    retired: [[u8; SALT_LEN]; RETIRED_SALTS],
    retired_len: usize,
    retired_next: usize,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener")
            .field("highest", &self.peer.as_ref().map(|p| p.highest))
            .field("retired", &self.retired_len)
            .finish_non_exhaustive()
    }
}

struct PeerBoot {
    salt: [u8; SALT_LEN],
    key: LessSafeKey,
    /// Highest counter accepted.
    highest: u64,
    /// Bit i: counter `highest - i` was accepted.
    seen: [u64; (REPLAY_WINDOW / 64) as usize],
}

impl PeerBoot {
    fn fresh(&self, c: u64) -> bool {
        if c > self.highest {
            return true;
        }
        let back = self.highest - c;
        back < REPLAY_WINDOW && self.seen[(back / 64) as usize] & (1 << (back % 64)) == 0
    }

    fn mark(&mut self, c: u64) {
        if c > self.highest {
            let shift = c - self.highest;
            if shift >= REPLAY_WINDOW {
                self.seen = [0; (REPLAY_WINDOW / 64) as usize];
            } else {
                shift_window(&mut self.seen, shift as usize);
            }
            self.highest = c;
        }
        let back = self.highest - c;
        self.seen[(back / 64) as usize] |= 1 << (back % 64);
    }
}

/// Moves every bit of the window `by` places towards older counters.
fn shift_window(w: &mut [u64], by: usize) {
    let (words, bits) = (by / 64, by % 64);
    for i in (0..w.len()).rev() {
        let hi = if i >= words { w[i - words] } else { 0 };
        let lo = if i > words { w[i - words - 1] } else { 0 };
        w[i] = if bits == 0 {
            hi
        } else {
            (hi << bits) | (lo >> (64 - bits))
        };
    }
}

impl Opener {
    /// A receiver for frames sealed with `key`; `own_salt` is this process's sender
    /// salt (frames under it are reflections and are refused).
    pub fn new(key: &LinkKey, own_salt: [u8; SALT_LEN]) -> Opener {
        Opener {
            key: key.clone(),
            own_salt,
            peer: None,
            retired: [[0; SALT_LEN]; RETIRED_SALTS],
            retired_len: 0,
            retired_next: 0,
        }
    }

    /// Opens the sealed frame in `buf` in place. On success the plain frame (as
    /// [`crate::wire`] writes it) is `buf[..n]` for the returned `n`.
    pub fn open(&mut self, buf: &mut [u8]) -> Result<usize, Reject> {
        if buf.len() < 5 || buf[..4] != MAGIC {
            return Err(Reject::Auth);
        }
        if buf[4] != SEALED_VERSION {
            return Err(if buf[4] == VERSION {
                Reject::Unkeyed
            } else {
                Reject::Auth
            });
        }
        if buf.len() < AAD_LEN + TAG_LEN {
            return Err(Reject::Auth);
        }
        let salt: [u8; SALT_LEN] = buf[HEADER_LEN..HEADER_LEN + SALT_LEN]
            .try_into()
            .unwrap_or_default();
        let counter = u64::from_be_bytes(
            buf[HEADER_LEN + SALT_LEN..AAD_LEN]
                .try_into()
                .unwrap_or_default(),
        );
        if salt == self.own_salt {
            return Err(Reject::Auth);
        }
        if self.retired[..self.retired_len].contains(&salt) {
            return Err(Reject::Replay);
        }
        let current = self.peer.as_ref().is_some_and(|p| p.salt == salt);
        if current && !self.peer.as_ref().is_some_and(|p| p.fresh(counter)) {
            // Checked before the tag too (cheap), and again after it below.
            return Err(Reject::Replay);
        }
        // A salt not seen yet: the peer restarted, or a forgery. One key derivation
        // per such frame; nothing is kept unless it authenticates.
        let new_key = (!current).then(|| self.key.boot_key(&salt));
        let key = match (&new_key, &self.peer) {
            (Some(k), _) => k,
            (None, Some(p)) => &p.key,
            (None, None) => return Err(Reject::Auth),
        };
        let (aad, rest) = buf.split_at_mut(AAD_LEN);
        let plain = key
            .open_in_place(nonce(counter), Aad::from(&*aad), rest)
            .map_err(|_| Reject::Auth)?
            .len();
        match new_key {
            Some(key) => {
                let mut boot = PeerBoot {
                    salt,
                    key,
                    highest: counter,
                    seen: [0; (REPLAY_WINDOW / 64) as usize],
                };
                boot.seen[0] = 1;
                if let Some(old) = self.peer.replace(boot) {
                    self.retire(old.salt);
                }
            }
            None => {
                if let Some(p) = &mut self.peer {
                    p.mark(counter);
                }
            }
        }
        buf.copy_within(AAD_LEN..AAD_LEN + plain, HEADER_LEN);
        buf[4] = VERSION;
        Ok(HEADER_LEN + plain)
    }

    fn retire(&mut self, salt: [u8; SALT_LEN]) {
        self.retired[self.retired_next] = salt;
        self.retired_next = (self.retired_next + 1) % RETIRED_SALTS;
        self.retired_len = (self.retired_len + 1).min(RETIRED_SALTS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{self, Header, Kind, Writer};
    use proptest::prelude::*;

    const PSK: [u8; 32] = [
        0x3b, 0x91, 0x0c, 0xe4, 0x57, 0x22, 0xa8, 0x6f, 0x10, 0xd3, 0x4e, 0x99, 0x01, 0x7a, 0xc5,
        0x38, 0x62, 0xfe, 0x0b, 0x84, 0x2d, 0x1e, 0xb7, 0x46, 0x93, 0x5c, 0xea, 0x70, 0x08, 0x31,
        0xdf, 0xa2,
    ];

    fn key() -> LinkKey {
        LinkKey::from_octets(&PSK).unwrap()
    }

    /// A plain DATA-shaped frame with `body` after the header.
    fn plain(body: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; wire::MAX_FRAME + OVERHEAD];
        let mut w = Writer::new(&mut buf);
        let h = Header {
            kind: Kind::Data,
            flags: 1,
            term: 7,
            sender: 0xabc,
            stream: 0xdef,
        };
        wire::write_header(&mut w, &h).unwrap();
        let n = w.len();
        buf[n..n + body.len()].copy_from_slice(body);
        buf.truncate(n + body.len());
        buf
    }

    fn sealed(s: &Sealer, body: &[u8]) -> Vec<u8> {
        let mut f = plain(body);
        let n = f.len();
        f.resize(n + OVERHEAD, 0);
        assert_eq!(s.seal(&mut f, n), Some(n + OVERHEAD));
        f
    }

    fn open(o: &mut Opener, f: &[u8]) -> Result<Vec<u8>, Reject> {
        let mut b = f.to_vec();
        o.open(&mut b).map(|n| b[..n].to_vec())
    }

    #[test]
    fn round_trip_restores_the_plain_frame_and_hides_the_body() {
        let s = Sealer::with_salt(&key(), [1; SALT_LEN]);
        let mut o = Opener::new(&key(), [2; SALT_LEN]);
        let body = b"mapping records the link must not show".to_vec();
        let f = sealed(&s, &body);
        assert!(is_sealed(&f));
        assert!(
            !f.windows(body.len()).any(|w| w == body.as_slice()),
            "body in clear"
        );
        assert_eq!(open(&mut o, &f), Ok(plain(&body)));
        // A plain reader drops it as a newer version.
        let err = wire::read_header(&mut wire::Reader::new(&f)).unwrap_err();
        assert_eq!(err, wire::WireError::Version(SEALED_VERSION));
    }

    #[test]
    fn wrong_key_unkeyed_truncated_and_reflected_frames_are_refused() {
        let s = Sealer::with_salt(&key(), [1; SALT_LEN]);
        let mut other = PSK;
        other[0] ^= 1;
        let mut o = Opener::new(&LinkKey::from_octets(&other).unwrap(), [2; SALT_LEN]);
        let f = sealed(&s, b"x");
        assert_eq!(open(&mut o, &f), Err(Reject::Auth));
        let mut o = Opener::new(&key(), [2; SALT_LEN]);
        assert_eq!(open(&mut o, &plain(b"x")), Err(Reject::Unkeyed));
        for cut in 0..f.len() {
            assert!(open(&mut o, &f[..cut]).is_err(), "truncated to {cut}");
        }
        let mut own = Opener::new(&key(), [1; SALT_LEN]);
        assert_eq!(open(&mut own, &f), Err(Reject::Auth), "own frame reflected");
        assert_eq!(open(&mut o, &f), Ok(plain(b"x")));
    }

    #[test]
    fn replays_are_refused_and_fresh_reordered_frames_accepted() {
        let s = Sealer::with_salt(&key(), [1; SALT_LEN]);
        let mut o = Opener::new(&key(), [2; SALT_LEN]);
        let frames: Vec<_> = (0..3000u32).map(|i| sealed(&s, &i.to_be_bytes())).collect();
        // Out of order within the window: 10, then 0..10 backwards, then 11.
        assert!(open(&mut o, &frames[10]).is_ok());
        for (i, f) in frames[..10].iter().enumerate().rev() {
            assert!(open(&mut o, f).is_ok(), "fresh frame {i} behind the newest");
        }
        for (i, f) in frames[..=10].iter().enumerate() {
            assert_eq!(open(&mut o, f), Err(Reject::Replay), "replay of {i}");
        }
        assert!(open(&mut o, &frames[11]).is_ok());
        // A jump, then the far side of the window.
        assert!(open(&mut o, &frames[11 + REPLAY_WINDOW as usize + 5]).is_ok());
        assert_eq!(
            open(&mut o, &frames[12]),
            Err(Reject::Replay),
            "behind the window"
        );
        assert!(
            open(&mut o, &frames[11 + REPLAY_WINDOW as usize]).is_ok(),
            "inside it"
        );
        assert_eq!(
            open(&mut o, &frames[11 + REPLAY_WINDOW as usize]),
            Err(Reject::Replay)
        );
    }

    #[test]
    fn a_restarted_peer_is_followed_and_its_old_boot_refused() {
        let mut o = Opener::new(&key(), [2; SALT_LEN]);
        let old = Sealer::with_salt(&key(), [3; SALT_LEN]);
        let new = Sealer::with_salt(&key(), [4; SALT_LEN]);
        let early = sealed(&old, b"a");
        let late = sealed(&old, b"b");
        assert!(open(&mut o, &early).is_ok());
        assert!(
            open(&mut o, &sealed(&new, b"c")).is_ok(),
            "restart: counter 0 again"
        );
        assert_eq!(
            open(&mut o, &late),
            Err(Reject::Replay),
            "fresh frame of a retired boot"
        );
    }

    #[test]
    fn nonces_never_repeat() {
        let a = Sealer::new(&key()).unwrap();
        let b = Sealer::new(&key()).unwrap();
        assert_ne!(a.salt(), b.salt(), "two senders, two salts");
        let mut last = None;
        for _ in 0..100 {
            let f = sealed(&a, b"x");
            let c = u64::from_be_bytes(f[HEADER_LEN + SALT_LEN..AAD_LEN].try_into().unwrap());
            assert!(
                last.is_none_or(|l| c > l),
                "counter went from {last:?} to {c}"
            );
            last = Some(c);
        }
        // A spent counter seals nothing rather than wrap.
        a.counter.store(u64::MAX, Ordering::Relaxed);
        let mut f = plain(b"x");
        let n = f.len();
        f.resize(n + OVERHEAD, 0);
        assert_eq!(a.seal(&mut f, n), None);
    }

    #[test]
    fn keys_are_parsed_and_weak_ones_refused() {
        let hex: String = PSK.iter().map(|b| format!("{b:02x}")).collect();
        assert!(LinkKey::parse(&format!("  {hex}\n")).is_ok());
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(PSK);
        assert!(LinkKey::parse(&b64).is_ok());
        assert_eq!(LinkKey::parse(&hex[..62]).unwrap_err(), KeyError::Short(31));
        assert_eq!(
            LinkKey::parse(&"ab".repeat(32)).unwrap_err(),
            KeyError::Weak(1)
        );
        assert_eq!(
            LinkKey::parse("not a key!").unwrap_err(),
            KeyError::Malformed
        );
        assert_eq!(LinkKey::parse("").unwrap_err(), KeyError::Short(0));
    }

    proptest! {
        #[test]
        fn any_single_bit_flip_is_refused(
            body in proptest::collection::vec(any::<u8>(), 0..300),
            bit in any::<proptest::sample::Index>(),
        ) {
            let s = Sealer::with_salt(&key(), [1; SALT_LEN]);
            let mut f = sealed(&s, &body);
            let bit = bit.index(f.len() * 8);
            f[bit / 8] ^= 1 << (bit % 8);
            let mut o = Opener::new(&key(), [2; SALT_LEN]);
            prop_assert!(open(&mut o, &f).is_err(), "bit {} flipped and accepted", bit);
        }

        #[test]
        fn garbage_never_opens(f in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut o = Opener::new(&key(), [2; SALT_LEN]);
            prop_assert!(open(&mut o, &f).is_err());
        }
    }
}
