//! Failed-attempt limits of PCP authentication (`[auth.attempts]`, docs/AUTH.md
//! "Attempt limits"): one token bucket per identity and one per source address
//! (IPv6 per /64, which one host usually holds whole). Every failed authentication
//! takes a token from both; an attempt whose identity or source has no token left is
//! refused before its password is checked (no Argon2 work), and counted. Tokens come
//! back one per `every_s`, up to `burst`, so a user who mistyped can try again a little
//! later while a guesser gets `burst` tries and then one per `every_s`.
//!
//! Sans-IO: time is milliseconds on the caller's clock.

use std::collections::HashMap;
use std::net::IpAddr;

use serde::Deserialize;

/// `[auth.attempts]`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct AttemptsSection {
    /// Failed attempts allowed in a row, per identity and per source address; 0 turns
    /// the limit off.
    pub burst: u32,
    /// Seconds until one more failed attempt is allowed.
    pub every_s: u32,
    /// Identities and sources remembered at most (the oldest full buckets go first).
    pub max_tracked: usize,
}

impl Default for AttemptsSection {
    fn default() -> Self {
        AttemptsSection {
            burst: 5,
            every_s: 30,
            max_tracked: 65_536,
        }
    }
}

/// Which limit refused an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The identity used up its failed attempts.
    Identity,
    /// The source address used up its failed attempts.
    Source,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens at `at`, in thousandths (so refills need no floating point).
    milli: u64,
    at: u64,
}

/// Token buckets by key.
#[derive(Debug)]
struct Buckets<K> {
    map: HashMap<K, Bucket>,
}

impl<K> Default for Buckets<K> {
    fn default() -> Self {
        Buckets {
            map: HashMap::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone> Buckets<K> {
    fn level(b: &Bucket, now: u64, cfg: &AttemptsSection) -> u64 {
        let full = u64::from(cfg.burst) * 1000;
        let per_ms = u64::from(cfg.every_s).max(1);
        // 1000 milli-tokens per `every_s` seconds = 1 milli-token per `every_s` ms.
        let refill = now.saturating_sub(b.at) / per_ms;
        b.milli.saturating_add(refill).min(full)
    }

    fn allowed(&self, k: &K, now: u64, cfg: &AttemptsSection) -> bool {
        self.map
            .get(k)
            .is_none_or(|b| Self::level(b, now, cfg) >= 1000)
    }

    fn take(&mut self, k: &K, now: u64, cfg: &AttemptsSection) {
        let full = u64::from(cfg.burst) * 1000;
        let level = self.map.get(k).map_or(full, |b| Self::level(b, now, cfg));
        self.map.insert(
            k.clone(),
            Bucket {
                milli: level.saturating_sub(1000),
                at: now,
            },
        );
        if self.map.len() > cfg.max_tracked {
            // Full buckets are the same as none; then the ones closest to full.
            self.map.retain(|_, b| Self::level(b, now, cfg) < full);
            while self.map.len() > cfg.max_tracked {
                let Some(k) = self
                    .map
                    .iter()
                    .max_by_key(|(_, b)| Self::level(b, now, cfg))
                    .map(|(k, _)| k.clone())
                else {
                    break;
                };
                self.map.remove(&k);
            }
        }
    }

    fn forget(&mut self, k: &K) {
        self.map.remove(k);
    }
}

/// The limits of identities and sources, with the refusals counted.
#[derive(Debug, Default)]
pub struct Limiter {
    cfg: AttemptsSection,
    identities: Buckets<String>,
    sources: Buckets<IpAddr>,
    /// Attempts refused because the identity had no attempt left.
    pub refused_identity: u64,
    /// Attempts refused because the source had no attempt left.
    pub refused_source: u64,
    /// Failed attempts recorded.
    pub failed: u64,
}

/// The key of a source: the address, IPv6 cut to its /64.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl Limiter {
    /// A limiter with `cfg`.
    pub fn new(cfg: AttemptsSection) -> Limiter {
        Limiter {
            cfg,
            ..Limiter::default()
        }
    }

    /// New settings (a reload); what was counted stays.
    pub fn set_config(&mut self, cfg: AttemptsSection) {
        self.cfg = cfg;
    }

    /// Whether `identity` (when known) from `src` may try now; a refusal is counted.
    pub fn admit(&mut self, identity: Option<&str>, src: IpAddr, now: u64) -> Result<(), Refusal> {
        if self.cfg.burst == 0 {
            return Ok(());
        }
        if !self.sources.allowed(&source_key(src), now, &self.cfg) {
            self.refused_source += 1;
            return Err(Refusal::Source);
        }
        if let Some(id) = identity
            && !self.identities.allowed(&id.to_string(), now, &self.cfg)
        {
            self.refused_identity += 1;
            return Err(Refusal::Identity);
        }
        Ok(())
    }

    /// A failed attempt of `identity` (when known) from `src`.
    pub fn failed(&mut self, identity: Option<&str>, src: IpAddr, now: u64) {
        self.failed += 1;
        if self.cfg.burst == 0 {
            return;
        }
        self.sources.take(&source_key(src), now, &self.cfg);
        if let Some(id) = identity {
            self.identities.take(&id.to_string(), now, &self.cfg);
        }
    }

    /// A successful authentication of `identity`: its failures are forgiven (not the
    /// source's, which a guesser holding one valid account could otherwise reset).
    pub fn succeeded(&mut self, identity: &str) {
        self.identities.forget(&identity.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(burst: u32, every_s: u32) -> AttemptsSection {
        AttemptsSection {
            burst,
            every_s,
            max_tracked: 4,
        }
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    /// `burst` failures, then refusals (identity and source, counted) until `every_s`
    /// gives one attempt back; other identities and sources are not affected; a
    /// success forgives the identity but not the source.
    #[test]
    fn burst_then_one_attempt_per_period() {
        let mut l = Limiter::new(cfg(2, 10));
        for t in [0, 1] {
            assert_eq!(l.admit(Some("alice"), A, t), Ok(()));
            l.failed(Some("alice"), A, t);
        }
        assert_eq!(l.admit(Some("bob"), A, 2), Err(Refusal::Source));
        assert_eq!(l.admit(Some("alice"), B, 2), Err(Refusal::Identity));
        assert_eq!(l.admit(Some("bob"), B, 2), Ok(()));
        assert_eq!((l.refused_source, l.refused_identity), (1, 1));
        // 10 s after the last failure: one attempt back (not two).
        assert_eq!(l.admit(Some("alice"), A, 9_000), Err(Refusal::Source));
        assert_eq!(l.admit(Some("alice"), A, 10_001), Ok(()));
        l.failed(Some("alice"), A, 10_001);
        assert_eq!(l.admit(Some("alice"), A, 10_002), Err(Refusal::Source));
        // A success elsewhere forgives alice, not source A.
        l.succeeded("alice");
        assert_eq!(l.admit(Some("alice"), B, 10_003), Ok(()));
        assert_eq!(l.admit(None, A, 10_003), Err(Refusal::Source));
        // Full again after burst × every_s.
        assert_eq!(l.admit(Some("alice"), A, 40_002), Ok(()));
    }

    /// An IPv6 source is its /64; burst 0 turns the limit off; the table stays bounded.
    #[test]
    fn ipv6_prefix_off_switch_and_bound() {
        let mut l = Limiter::new(cfg(1, 60));
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        l.failed(None, a, 0);
        assert_eq!(l.admit(None, b, 1), Err(Refusal::Source));
        assert_eq!(l.admit(None, c, 1), Ok(()));
        for i in 0..100u8 {
            l.failed(Some(&format!("u{i}")), IpAddr::V4([10, 0, 0, i].into()), 2);
        }
        assert!(l.sources.map.len() <= 4 && l.identities.map.len() <= 4);
        let mut off = Limiter::new(cfg(0, 60));
        for t in 0..10 {
            off.failed(Some("alice"), A, t);
            assert_eq!(off.admit(Some("alice"), A, t), Ok(()));
        }
    }
}
