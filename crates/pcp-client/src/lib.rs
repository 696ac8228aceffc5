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
//!
//! # Authentication
//!
//! PCP authentication (RFC 7652) is one setting, the same for every API: an
//! [`Authentication`](core::Authentication), usually
//! [`Authentication::ttls`](core::Authentication::ttls) (EAP-TTLS/PAP: an identity, a
//! password, the CA that signed the server's certificate and the name that certificate
//! carries; the server's certificate is validated strictly). The PA exchange, the tag on
//! every request, the check of every response's tag, re-authentication before the
//! session or its sequence numbers run out, and recovery from a server that lost the
//! session (UNKNOWN_SESSION_ID, SESSION_TERMINATED) all live in the sans-IO core, so
//! the three APIs behave alike; the [core docs](core#authentication) list the rules.
//! [`Event::Authenticated`](core::Event::Authenticated),
//! [`Event::AuthenticationFailed`](core::Event::AuthenticationFailed) and
//! [`Event::SessionEnded`](core::Event::SessionEnded) report the session's life.
//!
//! Async: `connect` returns once authenticated, or [`Error::Authentication`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), pcp_client::Error> {
//! use pcp_client::core::{Authentication, MappingRequest};
//! use pcp_client::tokio::{ClientOptions, PcpClient};
//!
//! let auth = Authentication::ttls("alice", b"correct horse", "ca.pem", "pcp.example")?;
//! let opts = ClientOptions::new("192.0.2.1:5351".parse().unwrap()).authentication(auth);
//! let client = PcpClient::connect(opts).await?;
//! let mut m = client.map(MappingRequest::map(17, 5060).checkpoint(true)).await?;
//! println!("{}", m.granted().await?.external);
//! # Ok(()) }
//! ```
//!
//! Blocking: the same options.
//!
//! ```no_run
//! use pcp_client::blocking::PcpClient;
//! use pcp_client::core::{Authentication, MappingRequest};
//! use pcp_client::tokio::ClientOptions;
//! use std::time::Duration;
//!
//! let auth = Authentication::ttls("alice", b"correct horse", "ca.pem", "pcp.example")?;
//! let opts = ClientOptions::new("192.0.2.1:5351".parse().unwrap()).authentication(auth);
//! let client = PcpClient::connect(opts)?;
//! let mut m = client.map(MappingRequest::map(17, 5060))?;
//! println!("{}", m.granted(Some(Duration::from_secs(10)))?.external);
//! # Ok::<(), pcp_client::Error>(())
//! ```
//!
//! Sans-IO: put it in [`Config::authentication`](core::Config::authentication); the PA
//! messages come out of `poll_transmit` with the requests (which wait for the session)
//! and go into `handle_datagram` like any answer.
//!
//! ```no_run
//! use pcp_client::core::{Authentication, Client, Config, Event, MappingRequest, Time};
//! use std::net::UdpSocket;
//! use std::time::{Duration, Instant};
//!
//! let server = "192.0.2.1:5351".parse().unwrap();
//! let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
//! let mut cfg = Config::new(server, "192.0.2.10".parse().unwrap());
//! cfg.authentication = Some(Authentication::ttls("alice", b"pw", "ca.pem", "pcp.example")?);
//! let start = Instant::now();
//! let now = || Time(start.elapsed().as_millis() as u64);
//! let mut client = Client::new(cfg, now(), rand::random());
//! client.create(MappingRequest::map(17, 5060), now()).unwrap();
//! let mut buf = [0u8; 1100];
//! loop {
//!     while let Some(t) = client.poll_transmit(now()) {
//!         sock.send_to(&t.payload, t.destination).unwrap();
//!     }
//!     while let Some(e) = client.poll_event() {
//!         println!("{e:?}"); // Authenticated, Granted, ...
//!     }
//!     let wait = client.poll_timeout().map_or(Duration::from_secs(1), |t| {
//!         Duration::from_millis(t.0.saturating_sub(now().0).max(1))
//!     });
//!     sock.set_read_timeout(Some(wait)).unwrap();
//!     match sock.recv_from(&mut buf) {
//!         Ok((n, from)) => client.handle_datagram(&buf[..n], from, now()),
//!         Err(_) => client.handle_timeout(now()),
//!     }
//! }
//! # Ok::<(), pcp_client::AuthSetupError>(())
//! ```
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
