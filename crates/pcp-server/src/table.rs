//! The mapping table, the bindings of internal endpoints to external ones, and the
//! expiry index — laid out for a million mappings in a few hundred bytes each.
//!
//! Records live in a slab (`Vec` + free list) and are named by a `u32`. One hash map,
//! keyed by internal endpoint, holds the endpoint's external binding, its MAP record
//! and the head of a list of its PEER records (linked through the records). The expiry
//! heap holds `(time, record)` pairs with lazy deletion.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::IpAddr;

use crate::pool::ExternalEndpoint;
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

/// The rarely-present parts of a record, boxed so that the common record stays small.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Extra {
    /// The PCP client that asked, when not the internal host (THIRD_PARTY).
    pub client: Option<IpAddr>,
    /// FILTERs.
    pub filters: Box<[pcp_proto::Filter]>,
    /// DESCRIPTION.
    pub description: Option<Box<str>>,
}

/// A checkpoint reason packed into 4 octets: its code index and, for rule reasons, the
/// rule name's index (see `server::RuleNames`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PackedReason {
    /// Index into [`crate::Reason::CODES`].
    pub code: u8,
    /// Rule name index, for `forced` and `denied`.
    pub rule: u16,
}

/// No record.
pub(crate) const NONE: u32 = u32::MAX;

/// One mapping as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Internal endpoint.
    pub endpoint: InternalEndpoint,
    /// Remote peer (PEER).
    pub remote: Option<(IpAddr, u16)>,
    /// Owner's nonce.
    pub nonce: [u8; 12],
    /// When it expires.
    pub expires: Time,
    /// Lifetime granted by the last request, in seconds.
    pub lifetime: u32,
    /// Creation time, whole seconds of [`Time`].
    pub created_secs: u32,
    /// Subscriber slot (see `subscriber::Store`).
    pub sub: u32,
    /// Checkpoint state and why.
    pub reason: PackedReason,
    /// PCP or NAT-PMP.
    pub origin: Origin,
    /// Whether option 192 was in the last request.
    pub requested: bool,
    /// Client, filters, description when present.
    pub extra: Option<Box<Extra>>,
    next_peer: u32,
}

impl Record {
    /// A record with the given identity; `extra` only when it carries something.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        key: &MappingKey,
        nonce: [u8; 12],
        expires: Time,
        lifetime: u32,
        created: Time,
        sub: u32,
        reason: PackedReason,
        origin: Origin,
        requested: bool,
        extra: Option<Box<Extra>>,
    ) -> Record {
        Record {
            endpoint: key.endpoint(),
            remote: key.remote,
            nonce,
            expires,
            lifetime,
            created_secs: u32::try_from(created.as_secs()).unwrap_or(u32::MAX),
            sub,
            reason,
            origin,
            requested,
            extra,
            next_peer: NONE,
        }
    }

    /// The mapping's key.
    pub fn key(&self) -> MappingKey {
        MappingKey {
            internal: self.endpoint.addr,
            protocol: self.endpoint.protocol,
            internal_port: self.endpoint.port,
            remote: self.remote,
        }
    }

    /// The FILTERs.
    pub fn filters(&self) -> &[pcp_proto::Filter] {
        self.extra.as_deref().map_or(&[], |e| &e.filters)
    }
}

/// A binding, 16 octets: the external address is an index into `Table::addrs` because a
/// million bindings share a handful of pool addresses, and an `IpAddr` here would cost
/// 12 more octets per hash slot (about 25 MiB at 1 M mappings).
#[derive(Debug, Clone, Copy)]
struct Endpoint {
    ext_addr: u32,
    ext_port: u16,
    map: u32,
    peers: u32,
}

/// The table with its indices.
#[derive(Debug, Default)]
pub struct Table {
    endpoints: crate::FastMap<InternalEndpoint, Endpoint>,
    /// Every external address ever bound, indexed by `Endpoint::ext_addr`. Only grows,
    /// by the pool's addresses: a handful, or a few thousand after many reloads.
    addrs: Vec<IpAddr>,
    addr_index: crate::FastMap<IpAddr, u32>,
    slots: Vec<Option<Record>>,
    free: Vec<u32>,
    len: usize,
    expiry: BinaryHeap<Reverse<(Time, u32)>>,
}

impl Table {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of mappings.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Makes room for `additional` more mappings without growing: a hash table of a
    /// million entries that grows stalls its owner for tens to hundreds of
    /// milliseconds and rehashes everything. Only the index's control octets are
    /// written now; the rest is touched as entries arrive.
    pub fn reserve(&mut self, additional: usize) {
        self.endpoints.reserve(additional);
        self.slots.reserve(additional);
        self.expiry.reserve(additional);
    }

    /// Mappings it holds without growing its index.
    pub fn capacity(&self) -> usize {
        self.endpoints.capacity()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The record `id` (which must be live).
    pub fn get(&self, id: u32) -> &Record {
        self.slots[id as usize].as_ref().expect("live record")
    }

    /// The record `id` to change; a changed `expires` must be re-indexed with
    /// [`Table::reindex_expiry`].
    pub fn get_mut(&mut self, id: u32) -> &mut Record {
        self.slots[id as usize].as_mut().expect("live record")
    }

    /// Every live record with its id.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &Record)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.as_ref().map(|r| (i as u32, r)))
    }

    /// Live records from slot `from` on, in slot order.
    pub fn iter_from(&self, from: u32) -> impl Iterator<Item = (u32, &Record)> {
        self.slots
            .iter()
            .enumerate()
            .skip(from as usize)
            .filter_map(|(i, r)| r.as_ref().map(|r| (i as u32, r)))
    }

    /// The record with this key.
    pub fn find(&self, key: &MappingKey) -> Option<u32> {
        let ep = self.endpoints.get(&key.endpoint())?;
        match key.remote {
            None => (ep.map != NONE).then_some(ep.map),
            Some(remote) => {
                let mut id = ep.peers;
                while id != NONE {
                    let r = self.get(id);
                    if r.remote == Some(remote) {
                        return Some(id);
                    }
                    id = r.next_peer;
                }
                None
            }
        }
    }

    /// The external endpoint an internal endpoint is bound to, if any mapping holds it.
    pub fn binding(&self, ep: &InternalEndpoint) -> Option<ExternalEndpoint> {
        self.endpoints.get(ep).map(|e| ExternalEndpoint {
            addr: self.addrs[e.ext_addr as usize],
            protocol: ep.protocol,
            port: e.ext_port,
        })
    }

    /// The external endpoint of a live record.
    pub fn external_of(&self, id: u32) -> ExternalEndpoint {
        let ep = self.get(id).endpoint;
        self.binding(&ep)
            .expect("a live record's endpoint is bound")
    }

    /// Inserts a record (its key must be absent) bound to `external` (ignored when its
    /// endpoint is already bound). Returns its id and whether the binding is new (the
    /// caller takes the endpoint from the pool).
    pub fn insert(&mut self, mut record: Record, external: ExternalEndpoint) -> (u32, bool) {
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
        };
        let mut fresh = false;
        let addr_index = &mut self.addr_index;
        let addrs = &mut self.addrs;
        let ep = self.endpoints.entry(record.endpoint).or_insert_with(|| {
            fresh = true;
            let ext_addr = *addr_index.entry(external.addr).or_insert_with(|| {
                addrs.push(external.addr);
                (addrs.len() - 1) as u32
            });
            Endpoint {
                ext_addr,
                ext_port: external.port,
                map: NONE,
                peers: NONE,
            }
        });
        if record.remote.is_some() {
            record.next_peer = ep.peers;
            ep.peers = id;
        } else {
            ep.map = id;
        }
        self.expiry.push(Reverse((record.expires, id)));
        self.slots[id as usize] = Some(record);
        self.len += 1;
        self.compact_expiry();
        (id, fresh)
    }

    /// Inserts a record whose internal endpoint no mapping holds yet, bound to
    /// `external`, with a single probe of the index; returns its id, or, when the
    /// endpoint is bound after all (`None`, nothing changed: the caller takes the
    /// general path).
    pub fn insert_unbound(&mut self, record: Record, external: ExternalEndpoint) -> Option<u32> {
        use std::collections::hash_map::Entry;
        let Entry::Vacant(slot) = self.endpoints.entry(record.endpoint) else {
            return None;
        };
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
        };
        let addrs = &mut self.addrs;
        let ext_addr = *self.addr_index.entry(external.addr).or_insert_with(|| {
            addrs.push(external.addr);
            (addrs.len() - 1) as u32
        });
        let (map, peers) = match record.remote {
            Some(_) => (NONE, id),
            None => (id, NONE),
        };
        slot.insert(Endpoint {
            ext_addr,
            ext_port: external.port,
            map,
            peers,
        });
        self.expiry.push(Reverse((record.expires, id)));
        self.slots[id as usize] = Some(record);
        self.len += 1;
        self.compact_expiry();
        Some(id)
    }

    /// Indexes a record's new expiry.
    pub fn reindex_expiry(&mut self, id: u32) {
        let t = self.get(id).expires;
        self.expiry.push(Reverse((t, id)));
        self.compact_expiry();
    }

    /// Removes a record. Returns it and, when no other mapping holds its external
    /// endpoint any more, that endpoint (for the caller to release to the pool).
    pub fn remove(&mut self, id: u32) -> Option<(Record, Option<ExternalEndpoint>)> {
        let record = self.slots.get_mut(id as usize)?.take()?;
        self.free.push(id);
        self.len -= 1;
        let key = record.endpoint;
        let Some(ep) = self.endpoints.get(&key).copied() else {
            return Some((record, None));
        };
        let mut ep2 = ep;
        if record.remote.is_none() {
            ep2.map = NONE;
        } else if ep.peers == id {
            ep2.peers = record.next_peer;
        } else {
            let mut prev = ep.peers;
            while prev != NONE {
                let next = self.get(prev).next_peer;
                if next == id {
                    self.get_mut(prev).next_peer = record.next_peer;
                    break;
                }
                prev = next;
            }
        }
        let freed = if ep2.map == NONE && ep2.peers == NONE {
            self.endpoints.remove(&key);
            Some(ExternalEndpoint {
                addr: self.addrs[ep.ext_addr as usize],
                protocol: key.protocol,
                port: ep.ext_port,
            })
        } else {
            self.endpoints.insert(key, ep2);
            None
        };
        Some((record, freed))
    }

    /// The earliest expiry still live.
    pub fn next_expiry(&mut self) -> Option<Time> {
        while let Some(Reverse((t, id))) = self.expiry.peek() {
            if self.is_live_at(*id, *t) {
                return Some(*t);
            }
            self.expiry.pop();
        }
        None
    }

    fn is_live_at(&self, id: u32, t: Time) -> bool {
        self.slots
            .get(id as usize)
            .and_then(Option::as_ref)
            .is_some_and(|r| r.expires == t)
    }

    /// The id of a record whose expiry is at or before `now`, if any.
    pub fn pop_expired(&mut self, now: Time) -> Option<u32> {
        let t = self.next_expiry()?;
        if t > now {
            return None;
        }
        self.expiry.pop().map(|Reverse((_, id))| id)
    }

    /// Ids of every record of an internal address (a scan: only for the rare
    /// delete-all requests).
    pub fn ids_of_host(&self, internal: IpAddr) -> Vec<u32> {
        self.iter()
            .filter(|(_, r)| r.endpoint.addr == internal)
            .map(|(id, _)| id)
            .collect()
    }

    /// Rebuilds the expiry index when renewals have filled it with stale entries, so a
    /// client renewing in a loop cannot grow it without bound. Amortised O(1).
    fn compact_expiry(&mut self) {
        if self.expiry.len() > 2 * self.len + 1024 {
            let live: Vec<_> = self
                .iter()
                .map(|(id, r)| Reverse((r.expires, id)))
                .collect();
            self.expiry = BinaryHeap::from(live);
        }
    }

    /// Checks every index against the records (tests and debugging).
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        let mut externals: HashMap<ExternalEndpoint, InternalEndpoint> = HashMap::new();
        for (key, ep) in &self.endpoints {
            let ext = ExternalEndpoint {
                addr: self.addrs[ep.ext_addr as usize],
                protocol: key.protocol,
                port: ep.ext_port,
            };
            if let Some(other) = externals.insert(ext, *key) {
                return Err(format!("{ext:?} bound to both {other:?} and {key:?}"));
            }
            if ep.map == NONE && ep.peers == NONE {
                return Err(format!("{key:?} bound with no mapping"));
            }
            if ep.map != NONE {
                let r = self.slots.get(ep.map as usize).and_then(Option::as_ref);
                if !r.is_some_and(|r| r.endpoint == *key && r.remote.is_none()) {
                    return Err(format!("{key:?} MAP record {} is not its MAP", ep.map));
                }
                seen.insert(ep.map);
            }
            let mut id = ep.peers;
            while id != NONE {
                let r = self
                    .slots
                    .get(id as usize)
                    .and_then(Option::as_ref)
                    .ok_or_else(|| format!("{key:?} lists dead PEER record {id}"))?;
                if r.endpoint != *key || r.remote.is_none() || !seen.insert(id) {
                    return Err(format!("{key:?} PEER list is corrupt at {id}"));
                }
                id = r.next_peer;
            }
        }
        for (id, r) in self.iter() {
            if !seen.contains(&id) {
                return Err(format!("{:?} is not reachable from its endpoint", r.key()));
            }
            if !self
                .expiry
                .iter()
                .any(|Reverse((t, i))| *i == id && *t == r.expires)
            {
                return Err(format!("{:?} missing from the expiry index", r.key()));
            }
        }
        if seen.len() != self.len {
            return Err(format!(
                "{} records reachable, {} counted",
                seen.len(),
                self.len
            ));
        }
        Ok(())
    }
}
