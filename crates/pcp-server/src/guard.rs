//! Per-host request-rate limiting, ahead of everything else the core does.
//!
//! Every datagram costs its source one token from that host's bucket (an IPv4 address,
//! or an IPv6 prefix of `limits.ipv6_prefix` bits: one host owns a whole /64). An empty
//! bucket means the datagram is dropped before any parsing beyond the first octet, any
//! table lookup, any subscriber work or replication: a host flooding at full speed costs
//! the server one hash lookup per datagram and cannot crowd out the others.
//!
//! **Bounded state.** Buckets live in two generations. A host's bucket moves into the
//! current one whenever it sends; every `period` (long enough for an empty bucket to
//! fill up again) the current generation becomes the old one and the old one is
//! dropped: a host silent for a whole period has a full bucket, exactly what an absent
//! entry means, so forgetting it changes nothing. Each generation holds at most
//! `max_hosts` entries. Newcomers may fill only half of the current generation, so
//! hosts already known keep their place however many (spoofed) sources appear; a
//! newcomer that finds no room shares one *overflow* bucket with every other
//! untracked host. Memory is therefore at most two tables of `max_hosts` entries,
//! whatever the number of sources.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use crate::config::LimitsConfig;
use crate::time::Time;

/// A token bucket refilled continuously; `Copy` and 16 octets.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Time,
}

impl Bucket {
    fn full(burst: f64, now: Time) -> Bucket {
        Bucket {
            tokens: burst,
            updated: now,
        }
    }

    /// Takes a token if there is one at `now`.
    fn take(&mut self, rate: f64, burst: f64, now: Time) -> bool {
        let secs = now.since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + secs * rate).min(burst);
        self.updated = self.updated.max(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What the limiter tracks, for metrics and the bounded-state test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuardFootprint {
    /// Host buckets held (both generations).
    pub hosts: usize,
    /// Octets the two tables have allocated (entries plus control bytes), approximately.
    pub bytes: usize,
}

/// The per-host request limiter.
#[derive(Debug)]
pub struct Guard {
    rate: f64,
    burst: f64,
    max_hosts: usize,
    ipv6_prefix: u8,
    overflow_rate: f64,
    period: Duration,
    current: HashMap<u128, Bucket>,
    old: HashMap<u128, Bucket>,
    overflow: Bucket,
    rotated: Time,
}

impl Guard {
    /// A limiter with `cfg`'s limits, started at `now`.
    pub fn new(cfg: &LimitsConfig, now: Time) -> Guard {
        let mut g = Guard {
            rate: 0.0,
            burst: 0.0,
            max_hosts: 0,
            ipv6_prefix: 64,
            overflow_rate: 0.0,
            period: Duration::from_secs(1),
            current: HashMap::new(),
            old: HashMap::new(),
            overflow: Bucket::full(0.0, now),
            rotated: now,
        };
        g.configure(cfg, now);
        g
    }

    /// Applies new limits (a reload); hosts keep their buckets.
    pub fn configure(&mut self, cfg: &LimitsConfig, now: Time) {
        self.rate = cfg.host_rate;
        self.burst = f64::from(cfg.host_burst.max(1));
        self.max_hosts = cfg.max_hosts;
        self.ipv6_prefix = cfg.ipv6_prefix.min(128);
        self.overflow_rate = cfg.overflow_rate;
        // An empty bucket is full again after burst / rate: a generation must last at
        // least that long so that only full buckets are ever forgotten.
        let fill = if self.rate > 0.0 {
            self.burst / self.rate
        } else {
            0.0
        };
        self.period = Duration::from_secs_f64(fill.clamp(1.0, 3600.0));
        self.overflow = Bucket::full(self.overflow_burst(), now);
    }

    fn overflow_burst(&self) -> f64 {
        self.burst.max(self.overflow_rate)
    }

    /// Whether limiting is on (`limits.host_rate > 0`).
    pub fn enabled(&self) -> bool {
        self.rate > 0.0
    }

    /// The key of `ip`'s bucket: an IPv4 address, or its IPv6 prefix.
    fn key(&self, ip: IpAddr) -> u128 {
        match ip {
            IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
            IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                match self.ipv6_prefix {
                    0 => 0,
                    p if p >= 128 => bits,
                    p => bits & (u128::MAX << (128 - u32::from(p))),
                }
            }
        }
    }

    /// Charges one datagram from `ip` at `now`; `false`: drop it.
    pub fn admit(&mut self, ip: IpAddr, now: Time) -> bool {
        if !self.enabled() {
            return true;
        }
        let elapsed = now.since(self.rotated);
        if elapsed >= self.period {
            if elapsed >= self.period * 2 {
                // Both generations have been silent for a whole period.
                self.old.clear();
                self.current.clear();
            } else {
                std::mem::swap(&mut self.current, &mut self.old);
                self.current.clear();
            }
            self.rotated = now;
        }
        let (rate, burst) = (self.rate, self.burst);
        let key = self.key(ip);
        if let Some(b) = self.current.get_mut(&key) {
            return b.take(rate, burst, now);
        }
        if let Some(mut b) = self.old.remove(&key) {
            let ok = b.take(rate, burst, now);
            if self.current.len() < self.max_hosts {
                self.current.insert(key, b);
            } else {
                self.old.insert(key, b);
            }
            return ok;
        }
        // A newcomer: room for it only in the first half, so that known hosts
        // returning from the old generation always find their place.
        if self.current.len() < self.max_hosts / 2 {
            let mut b = Bucket::full(burst, now);
            let ok = b.take(rate, burst, now);
            self.current.insert(key, b);
            return ok;
        }
        let ob = self.overflow_burst();
        self.overflow.take(self.overflow_rate, ob, now)
    }

    /// What is tracked now.
    pub fn footprint(&self) -> GuardFootprint {
        // hashbrown: a power-of-two number of slots ≥ capacity × 8/7, each an entry
        // plus one control octet.
        let slots = |m: &HashMap<u128, Bucket>| {
            if m.capacity() == 0 {
                0
            } else {
                (m.capacity() * 8 / 7).next_power_of_two()
            }
        };
        let per = std::mem::size_of::<(u128, Bucket)>() + 1;
        GuardFootprint {
            hosts: self.current.len() + self.old.len(),
            bytes: (slots(&self.current) + slots(&self.old)) * per,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(max_hosts: usize) -> LimitsConfig {
        LimitsConfig {
            host_rate: 10.0,
            host_burst: 20,
            max_hosts,
            ipv6_prefix: 64,
            overflow_rate: 50.0,
        }
    }

    fn v4(i: u32) -> IpAddr {
        IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i))
    }

    #[test]
    fn burst_then_rate_per_host() {
        let mut g = Guard::new(&cfg(100), Time(0));
        let a = v4(1);
        let admitted = (0..100).filter(|_| g.admit(a, Time(0))).count();
        assert_eq!(admitted, 20, "the burst, then nothing");
        // Another host is not affected.
        assert!(g.admit(v4(2), Time(0)));
        // 10/s: after 1 s, ten more.
        let admitted = (0..100).filter(|_| g.admit(a, Time(1000))).count();
        assert_eq!(admitted, 10);
    }

    #[test]
    fn ipv6_hosts_are_prefixes() {
        let mut g = Guard::new(&cfg(100), Time(0));
        let mut n = 0;
        for i in 0..100u16 {
            let ip = IpAddr::from([0x2001, 0xdb8, 0, 1, 0, 0, 0, i]);
            n += usize::from(g.admit(ip, Time(0)));
        }
        assert_eq!(n, 20, "one /64 is one host");
        assert!(g.admit("2001:db8:0:2::1".parse().unwrap(), Time(0)));
    }

    #[test]
    fn forgetting_idle_hosts_never_refills_early() {
        // A host that emptied its bucket and keeps sending is never forgotten.
        let mut g = Guard::new(&cfg(100), Time(0));
        let a = v4(1);
        let mut t = 0;
        let mut admitted = 0;
        while t < 20_000 {
            admitted += usize::from(g.admit(a, Time(t)));
            t += 10; // 100 datagrams a second, 10 allowed
        }
        // 20 burst + 10/s × 20 s (the last step lands just short of 20 s).
        assert!((215..=220).contains(&admitted), "{admitted}");
    }

    #[test]
    fn known_hosts_keep_their_place_under_a_spoofed_flood() {
        let mut g = Guard::new(&cfg(1000), Time(0));
        let known = v4(0xffff);
        // The known host empties its bucket.
        while g.admit(known, Time(0)) {}
        let mut spoofed = 0u32;
        let mut admitted_known = 0;
        for ms in (0..30_000).step_by(5) {
            for _ in 0..50 {
                spoofed += 1;
                g.admit(v4(spoofed), Time(ms));
            }
            admitted_known += usize::from(g.admit(known, Time(ms)));
            let f = g.footprint();
            assert!(f.hosts <= 2000, "{} hosts tracked", f.hosts);
        }
        // The known host keeps getting its 10/s (300 in 30 s), not the overflow's share.
        assert!(admitted_known >= 290, "{admitted_known}");
        // And it never got a fresh bucket (at most 10/s after the burst was spent).
        assert!(admitted_known <= 301, "{admitted_known}");
    }

    #[test]
    fn newcomers_beyond_the_table_share_the_overflow_bucket() {
        let mut g = Guard::new(&cfg(10), Time(0));
        let admitted = (0..1000).filter(|i| g.admit(v4(*i), Time(0))).count();
        // 5 newcomers tracked (half the table), the rest share a burst of 50.
        assert_eq!(admitted, 5 + 50);
    }

    #[test]
    fn zero_rate_turns_it_off() {
        let mut c = cfg(10);
        c.host_rate = 0.0;
        let mut g = Guard::new(&c, Time(0));
        assert!((0..10_000).all(|i| g.admit(v4(i % 3), Time(0))));
        assert_eq!(g.footprint().hosts, 0);
    }
}
