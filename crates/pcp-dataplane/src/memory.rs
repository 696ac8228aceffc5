//! The in-memory data plane: records entries, enforces nothing. The default, and what
//! tests inspect.

use std::collections::HashMap;
use std::net::SocketAddr;

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

/// Records entries in a hash map.
#[derive(Debug, Default)]
pub struct MemoryDataPlane {
    entries: HashMap<EntryId, Entry>,
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
            entries: HashMap::new(),
            limit: Some(limit),
        }
    }

    /// The installed entry with this identity.
    pub fn get(&self, id: &EntryId) -> Option<&Entry> {
        self.entries.get(id)
    }

    /// Every installed entry.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }
}

impl DataPlane for MemoryDataPlane {
    fn apply(&mut self, batch: &[Op]) -> Result<(), DataPlaneError> {
        if let Some(limit) = self.limit {
            let adds = batch.iter().filter(|o| matches!(o, Op::Install(_))).count();
            if self.entries.len() + adds > limit {
                return Err(DataPlaneError::NoResources(format!(
                    "memory data plane limited to {limit} entries"
                )));
            }
        }
        for op in batch {
            match op {
                Op::Install(e) => {
                    self.entries.insert(EntryId::of(e), e.clone());
                }
                Op::Remove(e) => {
                    self.entries.remove(&EntryId::of(e));
                }
            }
        }
        Ok(())
    }

    fn len(&self) -> usize {
        self.entries.len()
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
        self.entries = entries
            .iter()
            .map(|e| (EntryId::of(e), e.clone()))
            .collect();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(port: u16) -> Entry {
        Entry {
            direction: Direction::Inbound,
            protocol: 17,
            internal: "10.0.0.1:5060".parse().unwrap(),
            external: SocketAddr::new("192.0.2.1".parse().unwrap(), port),
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
        assert!(dp.get(&EntryId::of(&entry(1001))).is_some());
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
