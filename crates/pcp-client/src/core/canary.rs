//! Blind-echo detection.
//!
//! A server that copies every request option into its success responses (the real
//! miniupnpd does) would echo CHECKPOINT_REQUIRED without honouring it, faking a "yes".
//! The client therefore adds an unknown *optional* option (the canary, code
//! [`CANARY_CODE`] with a random 4-octet token) to its MAP and PEER requests until the
//! first success response from the server tells it which kind of server this is:
//!
//! - canary absent: the server drops options it does not process, as RFC 6887 §7.3
//!   says, so the presence of option 192 in its responses means what RFC 7767 says;
//! - canary present: the server echoes blindly; option 192 in its responses means
//!   nothing, and the checkpoint state is reported as *unknown*;
//! - the server refused the canary (UNSUPP_OPTION / MALFORMED_OPTION for an option
//!   it must ignore): it is not conformant either; requests go on without the canary and
//!   the checkpoint state is *unknown*.
//!
//! Error responses are whole copies of the request (RFC 6887 §8.3), so they carry the
//! canary from every server and are never used to judge.

use pcp_proto::{Options, PcpOption};

/// The canary's option code: private use (224–255), optional to process (≥ 128).
pub const CANARY_CODE: u8 = 255;

/// What the client knows about a server's option handling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EchoVerdict {
    /// Not probed yet (or probing disabled).
    Untested,
    /// The server leaves out options it does not process: its option 192 is trusted.
    Conformant,
    /// The server echoed the canary: its option 192 proves nothing.
    BlindEcho,
    /// The server refused the canary, an option it must ignore: not trusted either.
    RejectsUnknown,
}

impl EchoVerdict {
    /// Whether option 192 in this server's responses can be believed.
    pub fn trusts_checkpoint_echo(self) -> bool {
        matches!(self, EchoVerdict::Conformant | EchoVerdict::Untested)
    }
}

/// The canary option carrying `token`.
pub(crate) fn option(token: &[u8; 4]) -> PcpOption<'_> {
    PcpOption::Unknown {
        code: CANARY_CODE,
        data: token,
    }
}

/// Whether a response's options carry the canary back.
pub(crate) fn echoed(options: &Options<'_>) -> bool {
    options.iter().any(|o| {
        matches!(
            o,
            PcpOption::Unknown {
                code: CANARY_CODE,
                ..
            }
        )
    })
}
