//! PCP authentication (RFC 7652), sans-IO.
//!
//! - [`crypto`]: transport-key derivation (PRF_HMAC_SHA2_256) and message MACs
//!   (AUTH_HMAC_SHA2_256_128).
//! - [`tag`]: the AUTHENTICATION_TAG / PA_AUTHENTICATION_TAG at the end of a message:
//!   seal and verify.
//! - [`replay`]: sequence numbers of common messages.
//! - [`client::Client`] and [`server::Server`]: the PA session state machines, driven by
//!   datagrams and `now`, producing datagrams, events and timers, over any EAP method
//!   that implements [`eap::EapPeer`] / [`eap::EapAuthenticator`].
//!
//! - [`gate::Gate`]: per-prefix `off | optional | required` in front of a PCP server
//!   core: what to serve, what to refuse, and tags on the replies.
//!
//! Every choice RFC 7652 leaves open is recorded in `docs/AUTH.md`.
#![forbid(unsafe_code)]

pub mod client;
pub mod crypto;
pub mod eap;
pub mod gate;
mod pa;
pub mod replay;
pub mod retransmit;
pub mod server;
mod table;
pub mod tag;
mod time;

pub use crypto::TransportKey;
pub use retransmit::RetransmitConfig;
pub use time::Time;
