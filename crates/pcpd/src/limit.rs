//! Failed-attempt limits of PCP authentication (`[auth.attempts]`, docs/AUTH.md
//! "Attempt limits"). Token buckets: one per source address (IPv6 per /64, which one
//! host usually holds whole), one per identity *and source network* (IPv4 /24, IPv6
//! /56), and one per identity across all sources with a larger `identity_burst`.
//! Every failed authentication takes a token from each; an attempt whose source,
//! identity-and-network or identity has no token left is refused before its password
//! is checked (no Argon2 work), and counted. Tokens come back one per `every_s`.
//!
//! The split is the trade-off between guessing and locking out: a guesser gets
//! `burst` tries per identity per network and `identity_burst` per identity in all,
//! then one per `every_s`; someone who only knows a user name can lock that user out
//! of the guesser's network with `burst` failures from it, and out of everywhere only
//! with `identity_burst` failures from `identity_burst / burst` networks — except
//! from the sources the user trusts (below).
//!
//! What a guesser cannot do is lock a user out of a source the user authenticated
//! from within `trusted_s`: such a source is exempt from both identity limits (only
//! its own source limit, which only its own failures fill, can refuse it), and an
//! untrusted source in a network the user authenticated from is exempt from the
//! global one. The guesser in the user's own /24 or /56 — on a CGN's subscriber LAN
//! the usual neighbour — still exhausts the identity-and-network bucket, but that
//! refuses only the user's other, untrusted addresses there. Trust costs no guessing
//! power: a trusted source still gets `burst` failures then one per `every_s`, like
//! any fresh source, and only successes (valid credentials) create or refresh it, so
//! a flood of failures cannot push it out of its tables.
//!
//! Identities are kept as a keyed hash (SipHash with a random per-process key), so a
//! client's user name, up to 64 KiB inside TTLS, costs 8 octets here and cannot be
//! chosen to collide. Every table holds at most `max_tracked` entries; the one
//! changed longest ago goes first, found in amortised O(1) (a queue in change order).
//!
//! Sans-IO: time is milliseconds on the caller's clock.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash, RandomState};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Deserialize;

/// `[auth.attempts]`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct AttemptsSection {
    /// Failed attempts allowed in a row, per source address and per identity from one
    /// network; 0 turns the limits off.
    pub burst: u32,
    /// Failed attempts allowed in a row per identity from all sources together.
    pub identity_burst: u32,
    /// Seconds until one more failed attempt is allowed.
    pub every_s: u32,
    /// Seconds a source (and its network) stays trusted for an identity after the
    /// identity authenticated from it; 0 trusts nothing.
    pub trusted_s: u32,
    /// Entries remembered at most per table (the ones changed longest ago go first).
    pub max_tracked: usize,
}

impl Default for AttemptsSection {
    fn default() -> Self {
        AttemptsSection {
            burst: 5,
            identity_burst: 50,
            every_s: 30,
            trusted_s: 604_800,
            max_tracked: 65_536,
        }
    }
}

/// Which limit refused an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The identity used up its failed attempts (from this network, or in all).
    Identity,
    /// The source address used up its failed attempts.
    Source,
}

/// A map of at most `max` entries where the entry changed longest ago is evicted
/// first: `order` lists (key, stamp) in change order, entries whose stamp moved on
/// are skipped when met and compacted away once they outnumber the live ones.
#[derive(Debug)]
struct Table<K, V> {
    map: HashMap<K, (V, u64)>,
    order: VecDeque<(K, u64)>,
    stamp: u64,
}

impl<K, V> Default for Table<K, V> {
    fn default() -> Self {
        Table {
            map: HashMap::new(),
            order: VecDeque::new(),
            stamp: 0,
        }
    }
}

impl<K: Hash + Eq + Clone, V> Table<K, V> {
    fn get(&self, k: &K) -> Option<&V> {
        self.map.get(k).map(|(v, _)| v)
    }

    fn put(&mut self, k: K, v: V, max: usize) {
        self.stamp += 1;
        self.map.insert(k.clone(), (v, self.stamp));
        self.order.push_back((k, self.stamp));
        while self.map.len() > max.max(1) {
            let Some((k, stamp)) = self.order.pop_front() else {
                break;
            };
            if self.map.get(&k).is_some_and(|(_, s)| *s == stamp) {
                self.map.remove(&k);
            }
        }
        // Stale positions (a key changed again, or forgotten): one O(n) pass after
        // at least n pushes, so O(1) per change amortised, and `order` stays within
        // twice the table.
        if self.order.len() > 2 * self.map.len() + 16 {
            let map = &self.map;
            self.order
                .retain(|(k, stamp)| map.get(k).is_some_and(|(_, s)| s == stamp));
        }
    }

    fn remove(&mut self, k: &K) {
        self.map.remove(k);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens at `at`, in thousandths (so refills need no floating point).
    milli: u64,
    at: u64,
}

/// Token buckets of `burst` tokens by key.
#[derive(Debug)]
struct Buckets<K> {
    table: Table<K, Bucket>,
}

impl<K> Default for Buckets<K> {
    fn default() -> Self {
        Buckets {
            table: Table::default(),
        }
    }
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    fn level(b: &Bucket, now: u64, burst: u32, cfg: &AttemptsSection) -> u64 {
        let full = u64::from(burst) * 1000;
        let per_ms = u64::from(cfg.every_s).max(1);
        // 1000 milli-tokens per `every_s` seconds = 1 milli-token per `every_s` ms.
        let refill = now.saturating_sub(b.at) / per_ms;
        b.milli.saturating_add(refill).min(full)
    }

    fn allowed(&self, k: &K, now: u64, burst: u32, cfg: &AttemptsSection) -> bool {
        self.table
            .get(k)
            .is_none_or(|b| Self::level(b, now, burst, cfg) >= 1000)
    }

    fn take(&mut self, k: K, now: u64, burst: u32, cfg: &AttemptsSection) {
        let full = u64::from(burst) * 1000;
        let level = self
            .table
            .get(&k)
            .map_or(full, |b| Self::level(b, now, burst, cfg));
        let b = Bucket {
            milli: level.saturating_sub(1000),
            at: now,
        };
        self.table.put(k, b, cfg.max_tracked);
    }

    fn forget(&mut self, k: &K) {
        self.table.remove(k);
    }
}

/// An identity as kept here: its keyed hash.
type IdKey = u64;

/// The limits of identities and sources, with the refusals counted.
#[derive(Debug, Default)]
pub struct Limiter {
    cfg: AttemptsSection,
    /// The per-process key of the identities' hash.
    hasher: RandomState,
    sources: Buckets<IpAddr>,
    /// An identity from one network.
    pairs: Buckets<(IdKey, IpAddr)>,
    /// An identity from everywhere.
    identities: Buckets<IdKey>,
    /// Sources (as [`source_key`]) an identity authenticated from, with the time of
    /// its last success there: neither of its limits refuses them.
    trusted_sources: Table<(IdKey, IpAddr), u64>,
    /// Networks an identity authenticated from, with the time of its last success
    /// there: its global limit does not refuse them.
    trusted_networks: Table<(IdKey, IpAddr), u64>,
    /// Attempts refused because the identity had no attempt left.
    pub refused_identity: u64,
    /// Attempts refused because the source had no attempt left.
    pub refused_source: u64,
    /// Failed attempts recorded.
    pub failed: u64,
}

/// The key of a source: the address, IPv6 cut to its /64.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
    }
}

/// The network of a source for an identity's limit: IPv4 /24, IPv6 /56.
fn network_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            IpAddr::V4(Ipv4Addr::new(o[0], o[1], o[2], 0))
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3] & 0xff00, 0, 0, 0, 0))
        }
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

    fn id_key(&self, identity: &str) -> IdKey {
        self.hasher.hash_one(identity)
    }

    /// Whether `identity` (when known) from `src` may try now; a refusal is counted.
    pub fn admit(&mut self, identity: Option<&str>, src: IpAddr, now: u64) -> Result<(), Refusal> {
        let cfg = self.cfg;
        if cfg.burst == 0 {
            return Ok(());
        }
        if !self.sources.allowed(&source_key(src), now, cfg.burst, &cfg) {
            self.refused_source += 1;
            return Err(Refusal::Source);
        }
        if let Some(id) = identity {
            let (id, net) = (self.id_key(id), network_key(src));
            let trusted = |t: &Table<(IdKey, IpAddr), u64>, k: IpAddr| {
                t.get(&(id, k)).is_some_and(|&at| {
                    now.saturating_sub(at) < u64::from(cfg.trusted_s).saturating_mul(1000)
                })
            };
            // A trusted source is refused by neither identity limit: otherwise a
            // guesser in the user's own network could lock the user out of it.
            let refused = !trusted(&self.trusted_sources, source_key(src))
                && (!self.pairs.allowed(&(id, net), now, cfg.burst, &cfg)
                    || (!self.identities.allowed(&id, now, cfg.identity_burst, &cfg)
                        && !trusted(&self.trusted_networks, net)));
            if refused {
                self.refused_identity += 1;
                return Err(Refusal::Identity);
            }
        }
        Ok(())
    }

    /// A failed attempt of `identity` (when known) from `src`.
    pub fn failed(&mut self, identity: Option<&str>, src: IpAddr, now: u64) {
        self.failed += 1;
        let cfg = self.cfg;
        if cfg.burst == 0 {
            return;
        }
        self.sources.take(source_key(src), now, cfg.burst, &cfg);
        if let Some(id) = identity {
            let id = self.id_key(id);
            self.pairs
                .take((id, network_key(src)), now, cfg.burst, &cfg);
            self.identities.take(id, now, cfg.identity_burst, &cfg);
        }
    }

    /// A successful authentication of `identity` from `src` at `now`: its failures are
    /// forgiven (not the source's, which a guesser holding one valid account could
    /// otherwise reset), and for `trusted_s` its limits no longer refuse that source
    /// and its global limit no longer refuses that network.
    pub fn succeeded(&mut self, identity: &str, src: IpAddr, now: u64) {
        let (id, net) = (self.id_key(identity), network_key(src));
        self.identities.forget(&id);
        self.pairs.forget(&(id, net));
        if self.cfg.trusted_s > 0 {
            let max = self.cfg.max_tracked;
            self.trusted_sources.put((id, source_key(src)), now, max);
            self.trusted_networks.put((id, net), now, max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(burst: u32, every_s: u32) -> AttemptsSection {
        AttemptsSection {
            burst,
            identity_burst: 3,
            every_s,
            trusted_s: 60,
            max_tracked: 4,
        }
    }

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));
    const C: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));

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
        l.succeeded("alice", B, 10_002);
        assert_eq!(l.admit(Some("alice"), B, 10_003), Ok(()));
        assert_eq!(l.admit(None, A, 10_003), Err(Refusal::Source));
        // Full again after burst × every_s.
        assert_eq!(l.admit(Some("alice"), A, 40_002), Ok(()));
    }

    /// Someone who knows alice's name locks her out of their own network with `burst`
    /// failures, not out of hers; only `identity_burst` failures from several networks
    /// lock her out everywhere — except from a network she authenticated from.
    #[test]
    fn an_identity_is_limited_per_network_then_globally_except_where_trusted() {
        let mut l = Limiter::new(cfg(2, 600));
        let home: IpAddr = "203.0.113.7".parse().unwrap();
        l.succeeded("alice", home, 0);
        for ip in ["192.0.2.1", "192.0.2.2"] {
            l.failed(Some("alice"), ip.parse().unwrap(), 0);
        }
        assert_eq!(l.admit(Some("alice"), B, 1), Err(Refusal::Identity));
        // Another network: alice may still try (her global limit has 1 of 3 left).
        assert_eq!(l.admit(Some("alice"), C, 1), Ok(()));
        l.failed(Some("alice"), C, 1);
        // Three failures in all: refused from any other network ...
        let elsewhere: IpAddr = "198.18.0.1".parse().unwrap();
        assert_eq!(l.admit(Some("alice"), elsewhere, 2), Err(Refusal::Identity));
        // ... but not from home, nor is bob affected.
        assert_eq!(l.admit(Some("alice"), home, 2), Ok(()));
        assert_eq!(l.admit(Some("bob"), elsewhere, 2), Ok(()));
        // IPv6: the identity's network is the /56.
        let a: IpAddr = "2001:db8:1:200::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2ff::1".parse().unwrap();
        let c: IpAddr = "2001:db8:1:300::1".parse().unwrap();
        l.failed(Some("carol"), a, 3);
        l.failed(Some("carol"), "2001:db8:1:201::1".parse().unwrap(), 3);
        assert_eq!(l.admit(Some("carol"), b, 4), Err(Refusal::Identity));
        assert_eq!(l.admit(Some("carol"), c, 4), Ok(()));
    }

    /// The finding of 2026-12-04: a guesser in alice's own /24 used to lock her out
    /// of it with `burst` failures. Now her trusted source stays open to her (refused
    /// only by its own source limit, which only its failures fill), while the guesser
    /// and a fresh address of the same /24 are refused; the trust ends after
    /// `trusted_s`, and `trusted_s = 0` trusts nothing.
    #[test]
    fn a_guesser_in_the_users_network_cannot_lock_out_her_trusted_source() {
        let mut l = Limiter::new(cfg(2, 600));
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let (home, guesser, fresh) = (ip("203.0.113.7"), ip("203.0.113.9"), ip("203.0.113.20"));
        l.succeeded("alice", home, 0);
        for t in [1, 2] {
            assert_eq!(l.admit(Some("alice"), guesser, t), Ok(()));
            l.failed(Some("alice"), guesser, t);
        }
        assert_eq!(l.admit(Some("alice"), guesser, 3), Err(Refusal::Source));
        assert_eq!(l.admit(Some("alice"), fresh, 3), Err(Refusal::Identity));
        assert_eq!(l.admit(Some("alice"), home, 3), Ok(()));
        // Guessers in other networks use up her global limit too: home stays open.
        for (t, g) in [(4, "198.51.100.1"), (5, "198.18.0.1")] {
            l.failed(Some("alice"), ip(g), t);
        }
        assert_eq!(
            l.admit(Some("alice"), ip("192.0.2.77"), 6),
            Err(Refusal::Identity)
        );
        assert_eq!(l.admit(Some("alice"), home, 6), Ok(()));
        // Trust is per identity: bob from home is limited like anyone.
        l.failed(Some("bob"), guesser, 7);
        l.failed(Some("bob"), fresh, 7);
        assert_eq!(l.admit(Some("bob"), home, 8), Err(Refusal::Identity));
        // A trusted IPv4 source is the address, not its /24: a neighbour is not trusted.
        assert_eq!(
            l.admit(Some("alice"), ip("203.0.113.8"), 8),
            Err(Refusal::Identity)
        );
        // Home's own failures fill its own source limit.
        l.failed(Some("alice"), home, 9);
        l.failed(Some("alice"), home, 10);
        assert_eq!(l.admit(Some("alice"), home, 11), Err(Refusal::Source));
        // trusted_s (60 s) after her success: no longer trusted.
        let mut l2 = Limiter::new(cfg(2, 600));
        l2.succeeded("alice", home, 0);
        l2.failed(Some("alice"), guesser, 1);
        l2.failed(Some("alice"), guesser, 2);
        assert_eq!(l2.admit(Some("alice"), home, 59_999), Ok(()));
        assert_eq!(
            l2.admit(Some("alice"), home, 60_000),
            Err(Refusal::Identity)
        );
        // A new success renews it.
        l2.succeeded("alice", home, 60_001);
        l2.failed(Some("alice"), guesser, 60_002);
        assert_eq!(l2.admit(Some("alice"), home, 60_003), Ok(()));
        // trusted_s = 0: nothing trusted.
        let mut l3 = Limiter::new(AttemptsSection {
            trusted_s: 0,
            ..cfg(2, 600)
        });
        l3.succeeded("alice", home, 0);
        l3.failed(Some("alice"), guesser, 1);
        l3.failed(Some("alice"), guesser, 2);
        assert_eq!(l3.admit(Some("alice"), home, 3), Err(Refusal::Identity));
        assert_eq!(l3.trusted_sources.len() + l3.trusted_networks.len(), 0);
    }

    /// IPv6: a trusted source is its /64 (privacy addresses rotate inside it), the
    /// identity's network its /56.
    #[test]
    fn an_ipv6_trusted_source_is_its_64() {
        let mut l = Limiter::new(cfg(2, 600));
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        l.succeeded("alice", ip("2001:db8:1:200::1"), 0);
        l.failed(Some("alice"), ip("2001:db8:1:201::1"), 1);
        l.failed(Some("alice"), ip("2001:db8:1:202::1"), 1);
        assert_eq!(
            l.admit(Some("alice"), ip("2001:db8:1:200:ffff::2"), 2),
            Ok(())
        );
        assert_eq!(
            l.admit(Some("alice"), ip("2001:db8:1:203::1"), 2),
            Err(Refusal::Identity)
        );
    }

    /// Failures never push trust out: a flood of failures from new sources and names,
    /// far beyond `max_tracked`, leaves alice's trusted source trusted.
    #[test]
    fn failures_cannot_evict_trust() {
        let mut l = Limiter::new(cfg(2, 600));
        let home: IpAddr = "203.0.113.7".parse().unwrap();
        l.succeeded("alice", home, 0);
        for i in 0..1000u32 {
            let src = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            l.failed(Some(&format!("u{i}")), src, 1);
        }
        let guesser: IpAddr = "203.0.113.9".parse().unwrap();
        l.failed(Some("alice"), guesser, 2);
        l.failed(Some("alice"), guesser, 2);
        assert_eq!(
            l.admit(Some("alice"), "203.0.113.20".parse().unwrap(), 3),
            Err(Refusal::Identity)
        );
        assert_eq!(l.admit(Some("alice"), home, 3), Ok(()));
    }

    /// A user name of any length is one fixed-size key, and distinct long names stay
    /// apart.
    #[test]
    fn long_identities_are_hashed() {
        let mut l = Limiter::new(cfg(1, 600));
        let long_a = "a".repeat(60_000);
        let long_b = format!("{}b", "a".repeat(59_999));
        l.failed(Some(&long_a), A, 0);
        assert_eq!(l.admit(Some(&long_a), B, 1), Err(Refusal::Identity));
        assert_eq!(l.admit(Some(&long_b), B, 1), Ok(()));
        assert_eq!(std::mem::size_of::<IdKey>(), 8);
    }

    /// An IPv6 source is its /64; burst 0 turns the limit off.
    #[test]
    fn ipv6_prefix_and_off_switch() {
        let mut l = Limiter::new(cfg(1, 60));
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        l.failed(None, a, 0);
        assert_eq!(l.admit(None, b, 1), Err(Refusal::Source));
        assert_eq!(l.admit(None, c, 1), Ok(()));
        let mut off = Limiter::new(cfg(0, 60));
        for t in 0..10 {
            off.failed(Some("alice"), A, t);
            assert_eq!(off.admit(Some("alice"), A, t), Ok(()));
        }
    }

    /// Every table stays within `max_tracked`, its change queue within a small
    /// multiple of it, and the entries changed longest ago are the ones evicted: the
    /// most recent failures are still refused, the oldest forgotten.
    #[test]
    fn tables_are_bounded_and_evict_the_oldest_first() {
        let mut l = Limiter::new(cfg(1, 600));
        let ip = |i: u32| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + (i << 8)));
        for i in 0..1000u32 {
            l.failed(Some(&format!("u{i}")), ip(i), u64::from(i));
            // The same source again (a stale queue position each time).
            l.failed(Some(&format!("u{i}")), ip(i), u64::from(i));
            for n in [
                l.sources.table.len(),
                l.pairs.table.len(),
                l.identities.table.len(),
            ] {
                assert!(n <= 4, "{n}");
            }
            assert!(l.sources.table.order.len() <= 2 * 4 + 17);
            l.succeeded(&format!("u{i}"), ip(i + 1), u64::from(i));
            for t in [&l.trusted_sources, &l.trusted_networks] {
                assert!(t.len() <= 4 && t.order.len() <= 2 * 4 + 17);
            }
        }
        assert_eq!(l.admit(None, ip(999), 1000), Err(Refusal::Source));
        assert_eq!(l.admit(None, ip(996), 1000), Err(Refusal::Source));
        assert_eq!(l.admit(None, ip(995), 1000), Ok(()));
        assert_eq!(l.admit(None, ip(0), 1000), Ok(()));
    }

    /// The table alone: a key changed again moves to the back of the eviction order.
    #[test]
    fn a_changed_entry_is_evicted_last() {
        let mut t: Table<u32, ()> = Table::default();
        for k in 0..3 {
            t.put(k, (), 3);
        }
        t.put(0, (), 3);
        t.put(3, (), 3);
        assert!(t.get(&1).is_none());
        assert!(t.get(&0).is_some() && t.get(&2).is_some() && t.get(&3).is_some());
        t.remove(&2);
        t.put(4, (), 3);
        assert_eq!(t.len(), 3);
        assert!(t.get(&0).is_some());
    }
}
