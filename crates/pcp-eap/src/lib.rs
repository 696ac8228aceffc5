//! EAP for PCP authentication (RFC 7652 §3.1.3): the EAP packet layer (RFC 3748) and
//! EAP-TTLS v0 (RFC 5281), the method RFC 7652 makes mandatory, over rustls (TLS 1.2,
//! ring provider), with PAP as the inner method and the embedded back end (certificate,
//! key, Argon2-hashed credentials). [`TtlsPeer`] and [`TtlsAuthenticator`] plug into
//! `pcp-auth`'s session machines. [`radius`] passes EAP through to an AAA server, and
//! puts the embedded server behind RADIUS (`pcp-radiusd`).
//!
//! TLS records are cut into EAP-TTLS fragments (L and M flags, empty acknowledgements)
//! small enough that each EAP packet fits a PA message under PCP's 1100 octets.
#![forbid(unsafe_code)]

pub mod authenticator;
pub mod credentials;
pub mod packet;
pub mod peer;
pub mod radius;
mod tls;
pub mod ttls;

pub use authenticator::{Admission, BackendError, Embedded, TtlsAuthenticator};
pub use credentials::{Credentials, CredentialsError, hash_password};
pub use peer::{PeerConfig, TtlsPeer};
/// The rustls this crate is built on (trust anchors, server names, PEM parsing).
pub use rustls;
pub use tls::{MSK_LEN, TTLS_LABEL};
