//! The mapping table, the bindings of internal endpoints to external ones, and the
//! expiry index.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::IpAddr;

use crate::checkpoint::Reason;
use crate::pool::ExternalEndpoint;
use crate::subscriber::SubscriberId;
use crate::time::Time;

/// What identifies a mapping: MAP by internal (address, protocol, port); PEER also by
/// its remote peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MappingKey {
    /// Internal address.
    pub internal: IpAddr,
    /// IANA protocol.
    pub protocol: u8,
    /// Internal port.
    pub internal_port: u16,
    /// Remote peer (PEER only).
    pub remote: Option<(IpAddr, u16)>,
}

impl MappingKey {
    /// The internal endpoint the mapping translates.
    pub fn endpoint(&self) -> InternalEndpoint {
        InternalEndpoint {
            addr: self.internal,
            protocol: self.protocol,
            port: self.internal_port,
        }
    }

    /// Whether this is a PEER mapping.
    pub fn is_peer(&self) -> bool {
        self.remote.is_some()
    }
}

/// An internal (address, protocol, port): every mapping of it shares one external
/// endpoint (endpoint-independent mapping, RFC 4787).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InternalEndpoint {
    /// Internal address.
    pub addr: IpAddr,
    /// IANA protocol.
    pub protocol: u8,
    /// Internal port.
    pub port: u16,
}

/// Which protocol created a mapping; each may only renew or delete its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin {
    /// PCP MAP or PEER.
    Pcp,
    /// NAT-PMP.
    NatPmp,
}

/// A mapping and all the server knows about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapping {
    /// Identity.
    pub key: MappingKey,
    /// Nonce of the client that owns it.
    pub nonce: [u8; 12],
    /// PCP or NAT-PMP.
    pub origin: Origin,
    /// The PCP client that asked (differs from `key.internal` under THIRD_PARTY).
    pub client: IpAddr,
    /// Assigned external endpoint.
    pub external: ExternalEndpoint,
    /// When it expires.
    pub expires: Time,
    /// Lifetime granted by the last request, in seconds.
    pub lifetime: u32,
    /// Subscriber charged.
    pub subscriber: SubscriberId,
    /// Whether the client asked for a checkpoint (option 192) in its last request.
    pub checkpoint_requested: bool,
    /// Checkpoint state and why.
    pub checkpoint: Reason,
    /// FILTERs (MAP).
    pub filters: Box<[pcp_proto::Filter]>,
    /// DESCRIPTION, if given.
    pub description: Option<Box<str>>,
    /// When it was created.
    pub created: Time,
}

impl Mapping {
    /// Whether it is checkpointed.
    pub fn is_checkpointed(&self) -> bool {
        self.checkpoint.is_checkpointed()
    }
}

#[derive(Debug, Clone, Copy)]
struct Binding {
    external: ExternalEndpoint,
    refs: u32,
}

/// The table with its indices.
#[derive(Debug, Default)]
pub struct Table {
    mappings: HashMap<MappingKey, Mapping>,
    bindings: HashMap<InternalEndpoint, Binding>,
    /// Expiry index with lazy deletion: an entry is live when the mapping still exists
    /// and expires at exactly that time; renewals push a new entry.
    expiry: BinaryHeap<Reverse<(Time, MappingKey)>>,
}

impl Table {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of mappings.
    pub fn len(&self) -> usize {
        self.mappings.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.mappings.is_empty()
    }

    /// The mapping with this key.
    pub fn get(&self, key: &MappingKey) -> Option<&Mapping> {
        self.mappings.get(key)
    }

    /// Every mapping, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Mapping> {
        self.mappings.values()
    }

    /// The external endpoint an internal endpoint is bound to, if any mapping holds it.
    pub fn binding(&self, ep: &InternalEndpoint) -> Option<ExternalEndpoint> {
        self.bindings.get(ep).map(|b| b.external)
    }

    /// Inserts a new mapping (its key must be absent). Returns true when its external
    /// endpoint is newly bound (the caller takes it from the pool).
    pub fn insert(&mut self, m: Mapping) -> bool {
        let ep = m.key.endpoint();
        let fresh = match self.bindings.get_mut(&ep) {
            Some(b) => {
                b.refs += 1;
                false
            }
            None => {
                self.bindings.insert(
                    ep,
                    Binding {
                        external: m.external,
                        refs: 1,
                    },
                );
                true
            }
        };
        self.expiry.push(Reverse((m.expires, m.key)));
        self.mappings.insert(m.key, m);
        self.compact_expiry();
        fresh
    }

    /// Updates a mapping in place; a changed expiry is indexed.
    pub fn update(&mut self, key: &MappingKey, f: impl FnOnce(&mut Mapping)) {
        if let Some(m) = self.mappings.get_mut(key) {
            let before = m.expires;
            f(m);
            if m.expires != before {
                self.expiry.push(Reverse((m.expires, *key)));
                self.compact_expiry();
            }
        }
    }

    /// Removes a mapping. Returns it and, when no other mapping holds its external
    /// endpoint any more, that endpoint (for the caller to release to the pool).
    pub fn remove(&mut self, key: &MappingKey) -> Option<(Mapping, Option<ExternalEndpoint>)> {
        let m = self.mappings.remove(key)?;
        let ep = key.endpoint();
        let freed = match self.bindings.get_mut(&ep) {
            Some(b) if b.refs > 1 => {
                b.refs -= 1;
                None
            }
            Some(_) => self.bindings.remove(&ep).map(|b| b.external),
            None => None,
        };
        Some((m, freed))
    }

    /// The earliest expiry still live.
    pub fn next_expiry(&mut self) -> Option<Time> {
        while let Some(Reverse((t, key))) = self.expiry.peek() {
            if self.mappings.get(key).is_some_and(|m| m.expires == *t) {
                return Some(*t);
            }
            self.expiry.pop();
        }
        None
    }

    /// The key of a mapping whose expiry is at or before `now`, if any.
    pub fn pop_expired(&mut self, now: Time) -> Option<MappingKey> {
        let t = self.next_expiry()?;
        if t > now {
            return None;
        }
        self.expiry.pop().map(|Reverse((_, key))| key)
    }

    /// Keys of every mapping of an internal address (a scan: only for the rare
    /// delete-all requests).
    pub fn keys_of_host(&self, internal: IpAddr) -> Vec<MappingKey> {
        self.mappings
            .keys()
            .filter(|k| k.internal == internal)
            .copied()
            .collect()
    }

    /// Rebuilds the expiry index when renewals have filled it with stale entries, so a
    /// client renewing in a loop cannot grow it without bound. Amortised O(1).
    fn compact_expiry(&mut self) {
        if self.expiry.len() > 2 * self.mappings.len() + 1024 {
            self.expiry = self
                .mappings
                .values()
                .map(|m| Reverse((m.expires, m.key)))
                .collect();
        }
    }

    /// Checks every index against the table (tests and debug builds).
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut refs: HashMap<InternalEndpoint, u32> = HashMap::new();
        let mut externals: HashMap<ExternalEndpoint, InternalEndpoint> = HashMap::new();
        for m in self.mappings.values() {
            let ep = m.key.endpoint();
            *refs.entry(ep).or_default() += 1;
            let b = self
                .bindings
                .get(&ep)
                .ok_or_else(|| format!("{:?} has no binding", m.key))?;
            if b.external != m.external {
                return Err(format!("{:?} external differs from its binding", m.key));
            }
            if let Some(other) = externals.insert(m.external, ep)
                && other != ep
            {
                return Err(format!("{:?} shared by {other:?} and {ep:?}", m.external));
            }
            let indexed = self
                .expiry
                .iter()
                .any(|Reverse((t, k))| *k == m.key && *t == m.expires);
            if !indexed {
                return Err(format!("{:?} missing from the expiry index", m.key));
            }
        }
        for (ep, b) in &self.bindings {
            if refs.get(ep) != Some(&b.refs) {
                return Err(format!("binding {ep:?} counts {} refs", b.refs));
            }
        }
        Ok(())
    }
}
