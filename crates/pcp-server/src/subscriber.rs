//! Network attachment points (RFC 7767 §3.2): every request is charged to a subscriber.
//! An authenticated request (RFC 7652) is charged to its PCP identity: the configured
//! entry that lists the identity, or else a subscriber of its own named after it. Any
//! other request is charged by its internal address: longest-prefix match in the
//! configured table, or else a prefix derived with the default IPv4/IPv6 masks.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::config::{DEFAULT_TIER, SubscriberConfig};
use crate::rate::TokenBucket;
use crate::time::Time;

/// Who is charged for a mapping.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SubscriberId {
    /// A configured subscriber, by its id.
    Named(Arc<str>),
    /// A subscriber derived from the source prefix.
    Prefix(IpNet),
    /// An authenticated PCP identity that no configured entry lists.
    Identity(Arc<str>),
}

impl std::fmt::Display for SubscriberId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubscriberId::Named(n) => f.write_str(n),
            SubscriberId::Prefix(p) => write!(f, "{p}"),
            // Distinct from configured ids and prefixes, which share the namespace.
            SubscriberId::Identity(n) => write!(f, "identity:{n}"),
        }
    }
}

/// Configured subscribers of one prefix length: network → (id, tier).
type Bucket = HashMap<IpNet, (Arc<str>, Arc<str>)>;

/// The subscriber table: configured prefixes, by prefix length, longest first.
#[derive(Debug, Clone)]
pub struct SubscriberTable {
    /// ((is IPv6, prefix length), masked network → (id, tier)), longest first.
    by_len: Vec<((bool, u8), Bucket)>,
    ipv4_mask: u8,
    ipv6_mask: u8,
    default_tier: Arc<str>,
    tiers: HashMap<Arc<str>, Arc<str>>,
    /// Identity → (id, tier) of the configured entry that lists it.
    identities: HashMap<Arc<str>, (Arc<str>, Arc<str>)>,
}

impl SubscriberTable {
    /// Builds the table from configuration (already validated).
    pub fn new(cfg: &SubscriberConfig) -> SubscriberTable {
        let mut lens: HashMap<(bool, u8), Bucket> = HashMap::new();
        let mut identities = HashMap::new();
        for e in &cfg.entries {
            let id: Arc<str> = e.id.as_str().into();
            let tier: Arc<str> = e.tier.as_str().into();
            for name in &e.identities {
                identities
                    .entry(Arc::from(name.as_str()))
                    .or_insert_with(|| (id.clone(), tier.clone()));
            }
            for p in &e.prefixes {
                lens.entry((matches!(p, IpNet::V6(_)), p.prefix_len()))
                    .or_default()
                    .insert(p.trunc(), (id.clone(), tier.clone()));
            }
        }
        let tiers = cfg
            .entries
            .iter()
            .map(|e| (Arc::from(e.id.as_str()), Arc::from(e.tier.as_str())))
            .collect();
        let mut by_len: Vec<_> = lens.into_iter().collect();
        by_len.sort_by_key(|b| std::cmp::Reverse(b.0.1));
        SubscriberTable {
            by_len,
            ipv4_mask: cfg.ipv4_mask,
            ipv6_mask: cfg.ipv6_mask,
            default_tier: DEFAULT_TIER.into(),
            tiers,
            identities,
        }
    }

    /// The subscriber and tier a request is charged to: by its authenticated
    /// `identity` when it has one, else by its internal address.
    pub fn resolve(&self, addr: IpAddr, identity: Option<&str>) -> (SubscriberId, Arc<str>) {
        match identity {
            Some(name) => match self.identities.get(name) {
                Some((id, tier)) => (SubscriberId::Named(id.clone()), tier.clone()),
                None => (
                    SubscriberId::Identity(name.into()),
                    self.default_tier.clone(),
                ),
            },
            None => self.lookup(addr),
        }
    }

    /// The tier a subscriber has under this table.
    pub fn tier_of(&self, id: &SubscriberId) -> Arc<str> {
        match id {
            SubscriberId::Named(n) => self.tiers.get(n).cloned(),
            SubscriberId::Prefix(_) | SubscriberId::Identity(_) => None,
        }
        .unwrap_or_else(|| self.default_tier.clone())
    }

    /// The subscriber and tier of a mapping replicated from the previous active,
    /// which charged it to `charged` (docs/HA.md): the same identity resolved here, the
    /// same configured entry when this node has it, else by `addr` as any
    /// unauthenticated request.
    pub fn adopted(&self, addr: IpAddr, charged: &SubscriberId) -> (SubscriberId, Arc<str>) {
        match charged {
            SubscriberId::Identity(name) => self.resolve(addr, Some(name)),
            SubscriberId::Named(id) => match self.tiers.get(id) {
                Some(tier) => (charged.clone(), tier.clone()),
                None => self.lookup(addr),
            },
            SubscriberId::Prefix(_) => self.lookup(addr),
        }
    }

    /// The subscriber and tier an internal address belongs to.
    pub fn lookup(&self, addr: IpAddr) -> (SubscriberId, Arc<str>) {
        for ((v6, len), nets) in &self.by_len {
            if *v6 != addr.is_ipv6() {
                continue;
            }
            if let Ok(net) = IpNet::new(addr, *len)
                && let Some((id, tier)) = nets.get(&net.trunc())
            {
                return (SubscriberId::Named(id.clone()), tier.clone());
            }
        }
        let mask = if addr.is_ipv4() {
            self.ipv4_mask
        } else {
            self.ipv6_mask
        };
        let net = IpNet::new(addr, mask)
            .map(|n| n.trunc())
            .unwrap_or_else(|_| IpNet::from(addr));
        (SubscriberId::Prefix(net), self.default_tier.clone())
    }
}

/// What the server tracks per subscriber.
#[derive(Debug, Clone)]
pub struct SubscriberState {
    /// The subscriber's tier.
    pub tier: Arc<str>,
    /// Mappings held.
    pub mappings: u32,
    /// Checkpointed mappings held.
    pub checkpointed: u32,
    /// Checkpoint rate bucket.
    pub bucket: TokenBucket,
}

impl SubscriberState {
    /// A subscriber first seen at `now`, with a full bucket.
    pub fn new(tier: Arc<str>, burst: u32, now: Time) -> Self {
        SubscriberState {
            tier,
            mappings: 0,
            checkpointed: 0,
            bucket: TokenBucket::full(burst, now),
        }
    }
}

/// Subscribers with mappings, in a slab so that each mapping names its subscriber
/// with a `u32`.
#[derive(Debug, Default)]
pub struct Store {
    slots: Vec<Option<(SubscriberId, SubscriberState)>>,
    free: Vec<u32>,
    by_id: crate::FastMap<SubscriberId, u32>,
}

impl Store {
    /// The slot of a subscriber with state.
    pub fn find(&self, id: &SubscriberId) -> Option<u32> {
        self.by_id.get(id).copied()
    }

    /// A live slot.
    pub fn get(&self, slot: u32) -> &(SubscriberId, SubscriberState) {
        self.slots[slot as usize].as_ref().expect("live subscriber")
    }

    /// A live slot, to change.
    pub fn get_mut(&mut self, slot: u32) -> &mut SubscriberState {
        &mut self.slots[slot as usize]
            .as_mut()
            .expect("live subscriber")
            .1
    }

    /// Adds a subscriber (absent until now) and returns its slot.
    pub fn insert(&mut self, id: SubscriberId, state: SubscriberState) -> u32 {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
        };
        self.by_id.insert(id.clone(), slot);
        self.slots[slot as usize] = Some((id, state));
        slot
    }

    /// Forgets a subscriber.
    pub fn remove(&mut self, slot: u32) {
        if let Some((id, _)) = self.slots.get_mut(slot as usize).and_then(Option::take) {
            self.by_id.remove(&id);
            self.free.push(slot);
        }
    }

    /// Every subscriber with state.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &SubscriberId, &SubscriberState)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|(id, st)| (i as u32, id, st)))
    }

    /// Every subscriber, to change (reloads).
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&SubscriberId, &mut SubscriberState)> {
        self.slots.iter_mut().flatten().map(|(id, st)| (&*id, st))
    }

    /// Number of subscribers with state.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SubscriberEntry;

    fn table() -> SubscriberTable {
        SubscriberTable::new(&SubscriberConfig {
            ipv4_mask: 32,
            ipv6_mask: 56,
            entries: vec![
                SubscriberEntry {
                    prefixes: vec!["10.0.0.0/8".parse().unwrap()],
                    identities: vec![],
                    id: "big".into(),
                    tier: "bronze".into(),
                },
                SubscriberEntry {
                    prefixes: vec![
                        "10.1.0.0/16".parse().unwrap(),
                        "2001:db8:1::/48".parse().unwrap(),
                    ],
                    identities: vec!["alice".into(), "bob".into()],
                    id: "acme".into(),
                    tier: "gold".into(),
                },
            ],
        })
    }

    #[test]
    fn longest_prefix_wins() {
        let t = table();
        let (id, tier) = t.lookup("10.1.2.3".parse().unwrap());
        assert_eq!((id.to_string(), &*tier), ("acme".into(), "gold"));
        let (id, tier) = t.lookup("10.2.2.3".parse().unwrap());
        assert_eq!((id.to_string(), &*tier), ("big".into(), "bronze"));
        let (id, _) = t.lookup("2001:db8:1:ff::1".parse().unwrap());
        assert_eq!(id.to_string(), "acme");
    }

    #[test]
    fn identity_wins_over_address() {
        let t = table();
        // Alice is acme's wherever she connects from.
        let (id, tier) = t.resolve("192.0.2.7".parse().unwrap(), Some("alice"));
        assert_eq!((id.to_string(), &*tier), ("acme".into(), "gold"));
        // An unlisted identity is a subscriber of its own, even inside acme's prefix.
        let (id, tier) = t.resolve("10.1.2.3".parse().unwrap(), Some("carol"));
        assert_eq!(id, SubscriberId::Identity("carol".into()));
        assert_eq!(
            (id.to_string(), &*tier),
            ("identity:carol".into(), "default")
        );
        // Unauthenticated: by address.
        let (id, _) = t.resolve("10.1.2.3".parse().unwrap(), None);
        assert_eq!(id.to_string(), "acme");
        // Names are compared exactly.
        let (id, _) = t.resolve("10.1.2.3".parse().unwrap(), Some("Alice"));
        assert_eq!(id, SubscriberId::Identity("Alice".into()));
    }

    #[test]
    fn defaults_group_by_mask() {
        let t = table();
        let (id, tier) = t.lookup("192.0.2.7".parse().unwrap());
        assert_eq!((id.to_string(), &*tier), ("192.0.2.7/32".into(), "default"));
        let (a, _) = t.lookup("2001:db8:2:ab::1".parse().unwrap());
        let (b, _) = t.lookup("2001:db8:2:cd::2".parse().unwrap());
        assert_eq!(a, b, "one /56, one subscriber");
        assert_eq!(a.to_string(), "2001:db8:2::/56");
    }
}
