//! The in-memory data plane: records entries, enforces nothing. The default, and what
//! tests inspect.
//!
//! It stands in for the kernel's tables, so it must not cost more than the server's own
//! state: the common entry (IPv4, no FILTER) is packed into 22 bytes in a hash set;
//! anything else (IPv6, filters) is kept whole in a second map.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, SocketAddrV4};

use crate::{DataPlane, DataPlaneError, Direction, Entry, Op};

/// Identity of an entry: two installs with the same identity replace each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EntryId {
    /// Inbound or outbound (with the remote peer).
    pub direction: Direction,
    /// IANA protocol number.
    pub protocol: u8,
    /// External endpoint.
    pub external: SocketAddr,
    /// Internal endpoint (outbound entries of different hosts never share an external
    /// endpoint, but the internal one disambiguates when reading).
    pub internal: SocketAddr,
}

impl EntryId {
    /// The identity of `e`.
    pub fn of(e: &Entry) -> EntryId {
        EntryId {
            direction: e.direction,
            protocol: e.protocol,
            external: e.external,
            internal: e.internal,
        }
    }
}

/// An IPv4 entry without filters: its identity is the whole entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PackedV4 {
    external: SocketAddrV4,
    internal: SocketAddrV4,
    /// `None` for inbound; the remote peer for outbound.
    remote: Option<SocketAddrV4>,
    protocol: u8,
}

impl PackedV4 {
    /// The packed form of an identity, when it has one (IPv4 throughout).
    fn of_id(id: &EntryId) -> Option<PackedV4> {
        let v4 = |a: SocketAddr| match a {
            SocketAddr::V4(a) => Some(a),
            SocketAddr::V6(_) => None,
        };
        Some(PackedV4 {
            external: v4(id.external)?,
            internal: v4(id.internal)?,
            remote: match id.direction {
                Direction::Inbound => None,
                Direction::Outbound { remote } => Some(v4(remote)?),
            },
            protocol: id.protocol,
        })
    }

    fn entry(&self) -> Entry {
        Entry {
            direction: match self.remote {
                None => Direction::Inbound,
                Some(r) => Direction::Outbound {
                    remote: SocketAddr::V4(r),
                },
            },
            protocol: self.protocol,
            internal: SocketAddr::V4(self.internal),
            external: SocketAddr::V4(self.external),
            filters: Box::new([]),
        }
    }
}

/// Records entries in hash tables.
#[derive(Debug, Default)]
pub struct MemoryDataPlane {
    /// foldhash with a random per-process seed (see `pcp_server::FastMap`): an
    /// install was a fifth SipHash in a standby backup's full copy.
    packed: HashSet<PackedV4, foldhash::fast::RandomState>,
    /// Entries with filters or an IPv6 endpoint.
    full: HashMap<EntryId, Entry, foldhash::fast::RandomState>,
    /// Capacity beyond which installs fail with NoResources (tests of that path).
    limit: Option<usize>,
}

impl MemoryDataPlane {
    /// An empty, unlimited data plane.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty data plane that refuses to hold more than `limit` entries.
    pub fn with_limit(limit: usize) -> Self {
        MemoryDataPlane {
            limit: Some(limit),
            ..Self::default()
        }
    }

    /// The installed entry with this identity.
    pub fn get(&self, id: &EntryId) -> Option<Entry> {
        match PackedV4::of_id(id) {
            Some(p) if self.packed.contains(&p) => Some(p.entry()),
            _ => self.full.get(id).cloned(),
        }
    }

    /// Every installed entry.
    pub fn entries(&self) -> impl Iterator<Item = Entry> + '_ {
        self.packed
            .iter()
            .map(PackedV4::entry)
            .chain(self.full.values().cloned())
    }

    fn install(&mut self, e: &Entry) {
        let id = EntryId::of(e);
        match PackedV4::of_id(&id) {
            Some(p) if e.filters.is_empty() => {
                // (Hashing the identity for a lookup in an empty map cost a tenth of
                // an install in a standby's full copy.)
                if !self.full.is_empty() {
                    self.full.remove(&id);
                }
                self.packed.insert(p);
            }
            packed => {
                if let Some(p) = packed {
                    self.packed.remove(&p);
                }
                self.full.insert(id, e.clone());
            }
        }
    }

    fn remove(&mut self, e: &Entry) {
        let id = EntryId::of(e);
        if let Some(p) = PackedV4::of_id(&id) {
            self.packed.remove(&p);
        }
        self.full.remove(&id);
    }
}

impl DataPlane for MemoryDataPlane {
    fn reserve(&mut self, additional: usize) {
        self.packed.reserve(additional);
    }
    fn apply(&mut self, batch: &[Op]) -> Result<(), DataPlaneError> {
        if let Some(limit) = self.limit {
            let adds = batch.iter().filter(|o| matches!(o, Op::Install(_))).count();
            if self.len() + adds > limit {
                return Err(DataPlaneError::NoResources(format!(
                    "memory data plane limited to {limit} entries"
                )));
            }
        }
        for op in batch {
            match op {
                Op::Install(e) => self.install(e),
                Op::Remove(e) => self.remove(e),
            }
        }
        Ok(())
    }

    fn len(&self) -> usize {
        self.packed.len() + self.full.len()
    }

    fn name(&self) -> &'static str {
        "memory"
    }

    fn reconcile(&mut self, entries: &[Entry]) -> Result<(), DataPlaneError> {
        if let Some(limit) = self.limit
            && entries.len() > limit
        {
            return Err(DataPlaneError::NoResources(format!(
                "memory data plane limited to {limit} entries"
            )));
        }
        self.packed.clear();
        self.full.clear();
        for e in entries {
            self.install(e);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Filter;

    fn entry(port: u16) -> Entry {
        Entry {
            direction: Direction::Inbound,
            protocol: 17,
            internal: "10.0.0.1:5060".parse().unwrap(),
            external: SocketAddr::new("192.0.2.1".parse().unwrap(), port),
            filters: Box::new([]),
        }
    }

    fn filtered(port: u16) -> Entry {
        Entry {
            filters: Box::new([Filter {
                remote_addr: "198.51.100.0".parse().unwrap(),
                prefix_len: 24,
                remote_port: 0,
            }]),
            ..entry(port)
        }
    }

    fn v6_peer(port: u16) -> Entry {
        Entry {
            direction: Direction::Outbound {
                remote: "[2001:db8::9]:443".parse().unwrap(),
            },
            protocol: 6,
            internal: "[fd00::1]:40000".parse().unwrap(),
            external: SocketAddr::new("2001:db8::1".parse().unwrap(), port),
            filters: Box::new([]),
        }
    }

    #[test]
    fn install_replace_remove() {
        let mut dp = MemoryDataPlane::new();
        dp.apply(&[Op::Install(entry(1000)), Op::Install(entry(1001))])
            .unwrap();
        dp.apply(&[Op::Install(entry(1000))]).unwrap();
        assert_eq!(dp.len(), 2);
        dp.apply(&[Op::Remove(entry(1000)), Op::Remove(entry(1000))])
            .unwrap();
        assert_eq!(dp.len(), 1);
        assert_eq!(dp.get(&EntryId::of(&entry(1001))), Some(entry(1001)));
    }

    #[test]
    fn entries_round_trip_in_both_stores() {
        let mut dp = MemoryDataPlane::new();
        let all = [entry(1), filtered(2), v6_peer(3)];
        dp.apply(&all.clone().map(Op::Install)).unwrap();
        let mut got: Vec<Entry> = dp.entries().collect();
        got.sort_by_key(|e| e.external.port());
        assert_eq!(got, all);
        for e in &all {
            assert_eq!(dp.get(&EntryId::of(e)).as_ref(), Some(e));
        }
    }

    #[test]
    fn gaining_or_losing_filters_replaces_the_entry() {
        let mut dp = MemoryDataPlane::new();
        dp.apply(&[Op::Install(entry(7))]).unwrap();
        dp.apply(&[Op::Install(filtered(7))]).unwrap();
        assert_eq!(dp.len(), 1);
        assert_eq!(dp.get(&EntryId::of(&entry(7))), Some(filtered(7)));
        dp.apply(&[Op::Install(entry(7))]).unwrap();
        assert_eq!(dp.len(), 1);
        assert_eq!(dp.get(&EntryId::of(&entry(7))), Some(entry(7)));
        dp.apply(&[Op::Remove(filtered(7))]).unwrap();
        assert!(dp.is_empty());
    }

    #[test]
    fn packed_entry_stays_small() {
        // The reason this type exists: a million mappings must not cost the daemon
        // hundreds of megabytes in its stand-in for the kernel's tables.
        assert!(std::mem::size_of::<PackedV4>() <= 24);
    }

    #[test]
    fn limit_refuses_whole_batch() {
        let mut dp = MemoryDataPlane::with_limit(1);
        let err = dp
            .apply(&[Op::Install(entry(1)), Op::Install(entry(2))])
            .unwrap_err();
        assert!(matches!(err, DataPlaneError::NoResources(_)));
        assert!(dp.is_empty());
    }
}
