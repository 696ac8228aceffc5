//! Epoch time, kept per client (RFC 6887 §8.5 lets a server keep one per client). One
//! node-wide base serves every client; a client gets its own base only when its epoch
//! must differ — after a takeover lost its unprotected mappings, say — so the
//! bookkeeping stays as small as the set of exceptions.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::time::Time;

/// Epoch bases.
#[derive(Debug, Clone)]
pub struct Epochs {
    base: Time,
    per_client: HashMap<IpAddr, Time>,
}

impl Epochs {
    /// Every client's epoch starts at `base`.
    pub fn new(base: Time) -> Self {
        Epochs {
            base,
            per_client: HashMap::new(),
        }
    }

    /// The node-wide base.
    pub fn base(&self) -> Time {
        self.base
    }

    /// When `client`'s epoch started.
    pub fn base_of(&self, client: IpAddr) -> Time {
        self.per_client.get(&client).copied().unwrap_or(self.base)
    }

    /// Moves the node-wide base (a successor continuing its predecessor's epoch).
    pub fn set_base(&mut self, base: Time) {
        self.base = base;
    }

    /// `client`'s epoch time at `now`, in seconds.
    pub fn epoch(&self, client: IpAddr, now: Time) -> u32 {
        u32::try_from(now.since(self.base_of(client)).as_secs()).unwrap_or(u32::MAX)
    }

    /// The node-wide epoch time at `now` (multicast ANNOUNCE).
    pub fn global(&self, now: Time) -> u32 {
        u32::try_from(now.since(self.base).as_secs()).unwrap_or(u32::MAX)
    }

    /// Starts `client`'s epoch again at `now`: it lost state.
    pub fn reset(&mut self, client: IpAddr, now: Time) {
        self.per_client.insert(client, now);
    }

    /// Sets `client`'s base explicitly (continuity after a takeover).
    pub fn set(&mut self, client: IpAddr, base: Time) {
        if base == self.base {
            self.per_client.remove(&client);
        } else {
            self.per_client.insert(client, base);
        }
    }

    /// Clients with a base of their own.
    pub fn exceptions(&self) -> usize {
        self.per_client.len()
    }

    /// Clients whose epoch started before the node-wide base: a successor carried
    /// their epoch over from its predecessor (see `docs/HA.md`, "Epoch continuity").
    pub fn carried_over(&self) -> Vec<IpAddr> {
        self.per_client
            .iter()
            .filter(|(_, b)| **b < self.base)
            .map(|(c, _)| *c)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carried_over_lists_only_clients_older_than_the_base() {
        let mut e = Epochs::new(Time(5_000));
        let (a, b, c): (IpAddr, IpAddr, IpAddr) = (
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            "10.0.0.3".parse().unwrap(),
        );
        e.set(a, Time(1_000));
        e.reset(b, Time(6_000));
        e.set(c, Time(5_000));
        assert_eq!(e.carried_over(), vec![a]);
        e.reset(a, Time(7_000));
        assert!(e.carried_over().is_empty());
    }

    #[test]
    fn per_client_reset() {
        let mut e = Epochs::new(Time(1_000));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(e.epoch(a, Time(11_500)), 10);
        e.reset(a, Time(11_000));
        assert_eq!(e.epoch(a, Time(11_500)), 0);
        assert_eq!(e.epoch(b, Time(11_500)), 10);
        e.set(a, Time(1_000));
        assert_eq!(e.exceptions(), 0);
    }
}
