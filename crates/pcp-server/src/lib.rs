//! The sans-IO core of a PCP server (RFC 6887) with NAT-PMP (RFC 6886) and
//! application-initiated check-pointing (RFC 7767).
//!
//! [`Server::handle`] takes a datagram, its source and the current [`Time`], writes the
//! reply into a caller's buffer and appends [`Effect`]s (data plane operations,
//! replication of checkpointed mappings) for the shell to carry out. It never reads a
//! clock or touches a socket, so every rule is tested deterministically.
#![forbid(unsafe_code)]

pub mod announce;
pub mod checkpoint;
pub mod config;
pub mod epoch;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod guard;
mod mapping;
pub mod policy;
pub mod pool;
pub mod rate;
mod server;
pub mod stats;
pub mod subscriber;
pub mod table;
pub mod time;

pub use checkpoint::{BackupStatus, Reason};
pub use config::{ConfigError, ServerConfig};
pub use mapping::Mapping;
pub use server::{
    AdoptError, Change, Effect, Footprint, Journal, Reply, Server, age_held_reply, entry_of,
};
pub use table::{MappingKey, Origin};
pub use time::Time;

/// The hash map of the per-mapping indices (mapping table, bindings, hosts,
/// subscribers): foldhash with a random per-process seed instead of SipHash — a
/// mapping costs a dozen hash lookups, and SipHash was a fifth of a standby backup's
/// work during a full copy (`crates/pcp-ha/examples/resync.rs`). Keys are
/// client-influenced (internal address and port), so the seed is random and never
/// revealed: colliding keys cannot be computed offline, and every subscriber's keys
/// are bounded by its tier's quota anyway.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// The set counterpart of [`FastMap`].
pub type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
