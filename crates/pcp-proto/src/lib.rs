//! Wire codec for the Port Control Protocol.
//!
//! Covers PCP version 2 ([RFC 6887]) with its options — including
//! CHECKPOINT_REQUIRED ([RFC 7767], code 192) — the AUTHENTICATION opcode, result
//! codes and options of PCP authentication ([RFC 7652]), and NAT-PMP ([RFC 6886],
//! version 0).
//!
//! The shape follows smoltcp's `wire` module: zero-copy *views* over a byte buffer
//! ([`Packet`], [`MapView`], [`PeerView`], [`OptionView`]) with named field offsets, and
//! owned *representations* ([`Request`], [`Response`], [`natpmp::Request`], …) with
//! `parse` and `emit`. Parsing and emitting never allocate; variable-length data (the
//! option list, a description) borrows from the input buffer.
//!
//! Parse errors are typed ([`ParseError`]) so that a server maps each directly to its
//! answer: silently drop, or respond with a specific [`ResultCode`].
//!
//! [RFC 6887]: https://www.rfc-editor.org/rfc/rfc6887
//! [RFC 7767]: https://www.rfc-editor.org/rfc/rfc7767
//! [RFC 6886]: https://www.rfc-editor.org/rfc/rfc6886
//! [RFC 7652]: https://www.rfc-editor.org/rfc/rfc7652
#![forbid(unsafe_code)]

mod addr;
mod body;
mod error;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod header;
mod message;
pub mod natpmp;
mod opcode;
mod option;
mod result_code;

pub use addr::{decode_addr, encode_addr};
pub use body::{
    AUTHENTICATION_LEN, AuthenticationBody, AuthenticationView, Body, MapBody, MapView, PeerBody,
    PeerView,
};
pub use error::{EmitError, Malformed, OptionError, ParseError};
pub use header::Packet;
pub use message::{Request, Response, append_option, emit_error_response, remove_option};
pub use opcode::Opcode;
pub use option::{
    AUTHENTICATION_TAG_MIN_LEN, AuthenticationTag, Extensions, Filter, OPTION_HEADER_LEN,
    OptionCode, OptionIter, OptionView, Options, PA_AUTHENTICATION_TAG_MIN_LEN,
    PaAuthenticationTag, PcpOption, PortSet, pa_tag, tag, validate_options,
};
pub use result_code::ResultCode;

/// UDP port a PCP (and NAT-PMP) server listens on.
pub const SERVER_PORT: u16 = 5351;
/// UDP port a PCP client listens on for unsolicited ANNOUNCE messages.
pub const CLIENT_PORT: u16 = 5350;
/// The PCP version this crate speaks.
pub const VERSION: u8 = 2;
/// The NAT-PMP version (RFC 6886).
pub const NATPMP_VERSION: u8 = 0;
/// Largest PCP message in octets (RFC 6887 §7).
pub const MAX_MESSAGE_LEN: usize = 1100;
/// Length of the common request and response header.
pub const HEADER_LEN: usize = 24;

/// IANA protocol numbers that PCP mappings commonly name.
pub mod protocol {
    /// "All protocols" in a MAP request (RFC 6887 §11.1).
    pub const ALL: u8 = 0;
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
    /// SCTP.
    pub const SCTP: u8 = 132;
    /// DCCP.
    pub const DCCP: u8 = 33;
}
