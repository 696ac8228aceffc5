//! A PCP (RFC 6887) client with NAT-PMP (RFC 6886) fallback and application-initiated
//! check-pointing (RFC 7767 CHECKPOINT_REQUIRED).
//!
//! - [`core`]: the sans-IO state machine ([`core::Client`]): retransmission, renewal,
//!   epoch validation and re-creation, ANNOUNCE, version fallback, blind-echo detection.
//! - [`tokio`]: the async API ([`tokio::PcpClient`]) that owns a UDP socket and the core,
//!   with mapping handles that stream events.
//! - [`blocking`]: the same for programs without an async runtime.
//! - [`policy`]: which flows an application or user wants checkpointed, and why.
//! - [`gateway`]: the default gateway (Linux), where the PCP server usually is.
//!
//! Whether a checkpoint was honoured is read from the response (option 192 present),
//! but only believed from a server that does not echo options blindly: the client
//! probes each server once with an unknown optional option and reports
//! [`CheckpointState::Unknown`](core::CheckpointState::Unknown) for servers that echo it.
#![forbid(unsafe_code)]

pub mod blocking;
pub mod core;
mod error;
pub mod gateway;
pub mod policy;
pub mod tokio;
mod ttls;

pub use error::{Error, result_hint};
pub use ttls::AuthSetupError;
