//! The external address and port pool: which (address, protocol, port) triples are
//! taken, and random, collision-free allocation of new ones.

use std::hash::BuildHasher;
use std::net::IpAddr;

use rand::Rng;

use crate::config::PoolConfig;

/// An external (address, protocol, port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExternalEndpoint {
    /// External address.
    pub addr: IpAddr,
    /// IANA protocol.
    pub protocol: u8,
    /// External port.
    pub port: u16,
}

/// Why no external endpoint could be given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocError {
    /// The suggestion cannot be met and the client prefers failure.
    CannotProvide,
    /// Every port of every usable address is taken.
    Exhausted,
}

/// Ports of one (address, protocol): a bitmap of all 65536 ports (8 KiB), so a
/// lookup is one bit and finding a free port scans words, not hash entries.
#[derive(Debug, Clone)]
struct PortMap {
    bits: Box<[u64; 1024]>,
    taken: u32,
}

impl PortMap {
    fn new() -> Self {
        PortMap {
            bits: Box::new([0; 1024]),
            taken: 0,
        }
    }
    fn get(&self, port: u16) -> bool {
        self.bits[usize::from(port / 64)] & (1 << (port % 64)) != 0
    }
    fn set(&mut self, port: u16, on: bool) -> bool {
        let (w, b) = (usize::from(port / 64), port % 64);
        let was = self.bits[w] & (1 << b) != 0;
        if on {
            self.bits[w] |= 1 << b;
        } else {
            self.bits[w] &= !(1 << b);
        }
        match (was, on) {
            (false, true) => self.taken += 1,
            (true, false) => self.taken -= 1,
            _ => {}
        }
        was != on
    }
}

/// Taken endpoints and the configured ranges.
#[derive(Debug)]
pub struct Pool {
    addrs: Vec<IpAddr>,
    index: crate::FastMap<IpAddr, usize>,
    port_min: u16,
    port_max: u16,
    preserve_parity: bool,
    /// Per (address index, protocol).
    maps: crate::FastMap<(usize, u8), PortMap>,
    taken: usize,
    hasher: std::collections::hash_map::RandomState,
}

/// What a new mapping asks of the pool.
#[derive(Debug, Clone, Copy)]
pub struct AllocRequest {
    /// Internal address (keeps one host on one external address when it can).
    pub internal: IpAddr,
    /// Internal port (for parity preservation).
    pub internal_port: u16,
    /// IANA protocol.
    pub protocol: u8,
    /// Suggested external address, if not all-zeros.
    pub suggested_addr: Option<IpAddr>,
    /// Suggested external port, if not zero.
    pub suggested_port: Option<u16>,
    /// PREFER_FAILURE: the suggestion or nothing.
    pub prefer_failure: bool,
}

impl Pool {
    /// An empty pool over the configured ranges.
    pub fn new(cfg: &PoolConfig) -> Pool {
        Pool {
            index: cfg
                .addresses
                .iter()
                .enumerate()
                .map(|(i, a)| (*a, i))
                .collect(),
            addrs: cfg.addresses.clone(),
            port_min: cfg.port_min,
            port_max: cfg.port_max,
            preserve_parity: cfg.preserve_parity,
            maps: crate::FastMap::default(),
            taken: 0,
            hasher: Default::default(),
        }
    }

    /// Whether `addr` is one of ours.
    pub fn owns(&self, addr: IpAddr) -> bool {
        self.index.contains_key(&addr)
    }

    fn in_range(&self, port: u16) -> bool {
        (self.port_min..=self.port_max).contains(&port)
    }

    fn is_taken(&self, ep: &ExternalEndpoint) -> bool {
        self.index
            .get(&ep.addr)
            .and_then(|i| self.maps.get(&(*i, ep.protocol)))
            .is_some_and(|m| m.get(ep.port))
    }

    /// Whether the endpoint is one this pool could hand out and nobody holds.
    pub fn is_free(&self, ep: &ExternalEndpoint) -> bool {
        self.owns(ep.addr) && self.in_range(ep.port) && !self.is_taken(ep)
    }

    /// Marks an endpoint taken. Endpoints outside the pool are ignored.
    pub fn take(&mut self, ep: ExternalEndpoint) {
        if let Some(i) = self.index.get(&ep.addr).copied()
            && self
                .maps
                .entry((i, ep.protocol))
                .or_insert_with(PortMap::new)
                .set(ep.port, true)
        {
            self.taken += 1;
        }
    }

    /// Frees an endpoint.
    pub fn release(&mut self, ep: &ExternalEndpoint) {
        if let Some(i) = self.index.get(&ep.addr).copied()
            && let Some(m) = self.maps.get_mut(&(i, ep.protocol))
            && m.set(ep.port, false)
        {
            self.taken -= 1;
        }
    }

    /// Number of endpoints taken.
    pub fn taken(&self) -> usize {
        self.taken
    }

    fn range_len(&self) -> u32 {
        u32::from(self.port_max - self.port_min) + 1
    }

    /// Chooses a free endpoint for `req` without taking it (the caller takes it once the
    /// whole request is known to succeed, so an error leaves no trace).
    pub fn choose(
        &self,
        req: &AllocRequest,
        rng: &mut impl Rng,
    ) -> Result<ExternalEndpoint, AllocError> {
        // The suggestion, whole, when it is ours and free.
        if let (Some(addr), Some(port)) = (req.suggested_addr, req.suggested_port) {
            let ep = ExternalEndpoint {
                addr,
                protocol: req.protocol,
                port,
            };
            if self.is_free(&ep) {
                return Ok(ep);
            }
        }
        if req.prefer_failure {
            // Only the exact suggestion will do; a missing half is "any".
            return self
                .candidates(req)
                .filter(|a| req.suggested_addr.is_none_or(|s| s == *a))
                .find_map(|addr| {
                    let port = req.suggested_port?;
                    let ep = ExternalEndpoint {
                        addr,
                        protocol: req.protocol,
                        port,
                    };
                    self.is_free(&ep).then_some(ep)
                })
                .or_else(|| {
                    // No port suggested: any port on the suggested address.
                    if req.suggested_port.is_none() {
                        self.candidates(req)
                            .filter(|a| req.suggested_addr.is_none_or(|s| s == *a))
                            .find_map(|addr| self.random_port(addr, req, rng))
                    } else {
                        None
                    }
                })
                .ok_or(AllocError::CannotProvide);
        }
        // The suggested port on another of our addresses, then any port.
        if let Some(port) = req.suggested_port {
            for addr in self.candidates(req) {
                let ep = ExternalEndpoint {
                    addr,
                    protocol: req.protocol,
                    port,
                };
                if self.is_free(&ep) {
                    return Ok(ep);
                }
            }
        }
        self.candidates(req)
            .find_map(|addr| self.random_port(addr, req, rng))
            .ok_or(AllocError::Exhausted)
    }

    /// Our addresses in the order to try for `req`: the suggested one first, then the
    /// internal address's family, starting at one fixed per internal host (so a host
    /// keeps one external address: RFC 4787 "paired" pooling), then the other family.
    fn candidates<'a>(&'a self, req: &AllocRequest) -> impl Iterator<Item = IpAddr> + 'a {
        let want_v4 = req
            .suggested_addr
            .map_or(req.internal.is_ipv4(), |a| a.is_ipv4());
        let n = self.addrs.len();
        let start = (self.hasher.hash_one(req.internal) % n as u64) as usize;
        let suggested = req.suggested_addr.filter(|a| self.owns(*a));
        let ordered = (0..n).map(move |i| self.addrs[(start + i) % n]);
        suggested.into_iter().chain(
            ordered
                .clone()
                .filter(move |a| a.is_ipv4() == want_v4)
                .chain(ordered.filter(move |a| a.is_ipv4() != want_v4))
                .filter(move |a| Some(*a) != suggested),
        )
    }

    /// A random free port of `addr`: a few random picks (cheap while the address is
    /// not nearly full), then a scan of the bitmap from a random word.
    fn random_port(
        &self,
        addr: IpAddr,
        req: &AllocRequest,
        rng: &mut impl Rng,
    ) -> Option<ExternalEndpoint> {
        let idx = *self.index.get(&addr)?;
        let map = self.maps.get(&(idx, req.protocol));
        let range = self.range_len();
        if map.is_some_and(|m| m.taken >= range) {
            return None;
        }
        let parity = self.preserve_parity.then_some(req.internal_port & 1);
        let fits = |p: u16| parity.is_none_or(|bit| p & 1 == bit);
        let free = |p: u16| map.is_none_or(|m| !m.get(p));
        let ep = |port| ExternalEndpoint {
            addr,
            protocol: req.protocol,
            port,
        };
        for _ in 0..16 {
            let mut p = self.port_min + rng.random_range(0..range) as u16;
            if !fits(p) {
                p = if p < self.port_max { p + 1 } else { p - 1 };
            }
            if fits(p) && free(p) && self.in_range(p) {
                return Some(ep(p));
            }
        }
        let map = map?;
        let (first, last) = (
            usize::from(self.port_min / 64),
            usize::from(self.port_max / 64),
        );
        let words = last - first + 1;
        let start = rng.random_range(0..words);
        for k in 0..words {
            let w = first + (start + k) % words;
            let mut free_bits = !map.bits[w];
            if let Some(bit) = parity {
                // Keep only ports of the wanted parity (bit 0 of the port = bit index parity).
                free_bits &= if bit == 0 {
                    0x5555_5555_5555_5555
                } else {
                    0xaaaa_aaaa_aaaa_aaaa
                };
            }
            while free_bits != 0 {
                let b = free_bits.trailing_zeros() as u16;
                let port = w as u16 * 64 + b;
                if self.in_range(port) {
                    return Some(ep(port));
                }
                free_bits &= free_bits - 1;
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn pool(min: u16, max: u16, parity: bool) -> Pool {
        Pool::new(&PoolConfig {
            addresses: vec!["192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap()],
            port_min: min,
            port_max: max,
            preserve_parity: parity,
        })
    }

    fn req() -> AllocRequest {
        AllocRequest {
            internal: "10.0.0.1".parse().unwrap(),
            internal_port: 5000,
            protocol: 17,
            suggested_addr: None,
            suggested_port: None,
            prefer_failure: false,
        }
    }

    #[test]
    fn fills_every_port_of_every_address_without_collision() {
        let mut p = pool(2000, 2009, false);
        let mut rng = SmallRng::seed_from_u64(1);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20 {
            let ep = p.choose(&req(), &mut rng).unwrap();
            assert!(seen.insert(ep));
            p.take(ep);
        }
        assert_eq!(p.choose(&req(), &mut rng), Err(AllocError::Exhausted));
        p.release(seen.iter().next().unwrap());
        assert!(p.choose(&req(), &mut rng).is_ok());
    }

    #[test]
    fn suggestion_honoured_when_free_and_prefer_failure_refuses_otherwise() {
        let mut p = pool(2000, 2009, false);
        let mut rng = SmallRng::seed_from_u64(1);
        let mut r = req();
        r.suggested_addr = Some("192.0.2.2".parse().unwrap());
        r.suggested_port = Some(2005);
        let ep = p.choose(&r, &mut rng).unwrap();
        assert_eq!((ep.addr, ep.port), (r.suggested_addr.unwrap(), 2005));
        p.take(ep);
        // Taken: a hint falls back to the same port elsewhere; PREFER_FAILURE refuses.
        let other = p.choose(&r, &mut rng).unwrap();
        assert_eq!(other.port, 2005);
        assert_ne!(other.addr, ep.addr);
        r.prefer_failure = true;
        assert_eq!(p.choose(&r, &mut rng), Err(AllocError::CannotProvide));
    }

    #[test]
    fn parity_is_preserved() {
        let mut p = pool(2000, 2099, true);
        let mut rng = SmallRng::seed_from_u64(7);
        for internal_port in [5000u16, 5001, 6002, 6003] {
            let mut r = req();
            r.internal_port = internal_port;
            let ep = p.choose(&r, &mut rng).unwrap();
            assert_eq!(ep.port & 1, internal_port & 1);
            p.take(ep);
        }
    }
}
