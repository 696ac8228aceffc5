//! Replication and failover of checkpointed PCP mappings between an active and a
//! backup node (the RFC 7767 promise: a mapping whose reply carried option 192
//! survives the active's failure).
//!
//! Sans-IO like the server core: [`HaNode`] takes frames and time, and gives frames,
//! timers and [`Event`]s. The daemon connects it to UDP and to the server core; the
//! simulator in `tests/sim.rs` connects two of them through a lossy, reordering,
//! partitioning network with crashes, and checks the promise after every failover.
//!
//! The protocol (see [`wire`]): the active streams sequenced records (upsert, remove,
//! host state, bulk start/end) in DATA frames; the backup applies them strictly in
//! order and acknowledges cumulatively; unacknowledged records are sent again
//! (go-back-N). A backup that is new or lost the thread gets a paced full copy first
//! and is *ready* only once it is complete. Every frame carries the sender's term: a
//! node that hears a higher term steps down; a promotion takes a new term.
//!
//! What a shell decides around the node — when a reply held for the backup goes out,
//! with or without option 192, and what a late one withdraws; mirrored mappings a
//! standby core cannot install yet — is in [`shell`], shared by pcpd and the simulator.
//!
//! With a pre-shared key the shell seals and opens every frame with [`seal`]
//! (authenticated encryption, replay window) around the node; without one the frames
//! are exactly those of [`wire`].
#![forbid(unsafe_code)]

#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod node;
pub mod seal;
pub mod shell;
pub mod wire;

pub use node::{Beacon, Event, HaConfig, HaNode, HaStatus, REPLICA_BATCH, Replica, Retired, Role};
