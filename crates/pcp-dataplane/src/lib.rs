//! The data plane a PCP server drives.
//!
//! The server core decides; the data plane enforces. Operations come in batches so an
//! implementation can commit many mappings in one transaction (one netlink batch for
//! nftables). [`memory::MemoryDataPlane`] is the default: it records entries and needs no
//! privileges. [`nftables::NftDataPlane`] (feature `nftables`, Linux) drives a
//! kernel NAT.
#![forbid(unsafe_code)]

pub mod memory;
#[cfg(all(feature = "nftables", target_os = "linux"))]
pub mod nftables;

use std::net::{IpAddr, SocketAddr};

/// Which way an entry translates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// A MAP: inbound traffic to `external` is forwarded to `internal` (DNAT).
    Inbound,
    /// A PEER: outbound traffic from `internal` to `remote` leaves as `external` (SNAT).
    Outbound {
        /// The remote peer.
        remote: SocketAddr,
    },
}

/// A remote-peer restriction on an inbound entry (from the PCP FILTER option).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Filter {
    /// Remote address prefix.
    pub remote_addr: IpAddr,
    /// Significant bits of `remote_addr` in its own family (0–32 for IPv4, 0–128 for IPv6).
    pub prefix_len: u8,
    /// Remote port; 0 means any.
    pub remote_port: u16,
}

/// One translation the data plane must enforce.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Entry {
    /// Inbound (MAP) or outbound (PEER).
    pub direction: Direction,
    /// IANA protocol number.
    pub protocol: u8,
    /// Internal endpoint.
    pub internal: SocketAddr,
    /// External endpoint.
    pub external: SocketAddr,
    /// Inbound restrictions; empty means any remote peer may reach `external`.
    pub filters: Box<[Filter]>,
}

/// One change to the data plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Add an entry, or replace the entry with the same identity (direction, protocol,
    /// external endpoint, and remote peer for outbound).
    Install(Entry),
    /// Remove the entry with this identity; removing an absent entry is not an error.
    Remove(Entry),
}

/// Why a batch could not be applied. The whole batch is then not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DataPlaneError {
    /// The kernel or device refused or failed; the request should get NETWORK_FAILURE.
    #[error("data plane failure: {0}")]
    Failure(String),
    /// The device is out of room; the request should get NO_RESOURCES.
    #[error("data plane out of resources: {0}")]
    NoResources(String),
}

/// Something that enforces translations.
pub trait DataPlane: Send {
    /// Applies a batch atomically: all operations or none.
    fn apply(&mut self, batch: &[Op]) -> Result<(), DataPlaneError>;
    /// Number of entries installed.
    fn len(&self) -> usize;
    /// Whether no entries are installed.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Makes room for `additional` more entries, where the data plane keeps its own
    /// tables (a standby backup expecting a full copy). Default: nothing.
    fn reserve(&mut self, additional: usize) {
        let _ = additional;
    }
    /// A short name for logs and the admin API (`"memory"`, `"nftables"`).
    fn name(&self) -> &'static str;
    /// Makes the installed entries exactly `entries`: stale ones removed, missing ones
    /// added. Used at start and to heal after a batch failed outside a request (an
    /// expiry whose removals the kernel refused).
    fn reconcile(&mut self, entries: &[Entry]) -> Result<(), DataPlaneError>;
    /// Clean shutdown: release what the data plane owns, where configured so.
    fn shutdown(&mut self) -> Result<(), DataPlaneError> {
        Ok(())
    }
}
