//! Typed parse and emit errors. Each parse error maps to exactly one server answer.

use crate::ResultCode;

/// Why a PCP message could not be parsed, typed by the answer a server owes for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Too short to read version and opcode: drop silently (RFC 6887 §8.3).
    #[error("datagram of {len} octets is too short to carry a version and opcode")]
    TooShort {
        /// Length of the datagram.
        len: usize,
    },
    /// A request parser was given a response (R bit set), or a response parser a
    /// request: drop silently.
    #[error("the R bit says this is a {}", if *.is_response { "response" } else { "request" })]
    WrongDirection {
        /// Whether the R bit was set.
        is_response: bool,
    },
    /// Version not spoken: UNSUPP_VERSION (or a NAT-PMP answer for version 0).
    #[error("unsupported version {0}")]
    UnsupportedVersion(u8),
    /// MALFORMED_REQUEST.
    #[error("malformed request: {0}")]
    Malformed(Malformed),
    /// UNSUPP_OPCODE.
    #[error("unsupported opcode {0}")]
    UnsupportedOpcode(u8),
    /// UNSUPP_OPTION: an unknown mandatory-to-process option (code < 128).
    #[error("unsupported mandatory option {code}")]
    UnsupportedOption {
        /// The option code.
        code: u8,
    },
    /// MALFORMED_OPTION.
    #[error("malformed option {code}: {reason}")]
    MalformedOption {
        /// The option code.
        code: u8,
        /// What is wrong with it.
        reason: OptionError,
    },
}

impl ParseError {
    /// The result code a server answers with, or `None` when it must drop silently.
    pub fn result_code(&self) -> Option<ResultCode> {
        match self {
            ParseError::TooShort { .. } | ParseError::WrongDirection { .. } => None,
            ParseError::UnsupportedVersion(_) => Some(ResultCode::UnsuppVersion),
            ParseError::Malformed(_) => Some(ResultCode::MalformedRequest),
            ParseError::UnsupportedOpcode(_) => Some(ResultCode::UnsuppOpcode),
            ParseError::UnsupportedOption { .. } => Some(ResultCode::UnsuppOption),
            ParseError::MalformedOption { .. } => Some(ResultCode::MalformedOption),
        }
    }

    /// Whether the message must be dropped without an answer.
    pub fn is_silent_drop(&self) -> bool {
        self.result_code().is_none()
    }
}

/// What makes a request MALFORMED_REQUEST.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// Shorter than the 24-octet header.
    #[error("{len} octets is shorter than the 24-octet header")]
    ShorterThanHeader {
        /// Length of the message.
        len: usize,
    },
    /// Longer than 1100 octets.
    #[error("{len} octets is longer than 1100")]
    TooLong {
        /// Length of the message.
        len: usize,
    },
    /// Not a multiple of 4 octets.
    #[error("{len} octets is not a multiple of 4")]
    NotMultipleOf4 {
        /// Length of the message.
        len: usize,
    },
    /// The opcode body does not fit.
    #[error("opcode {opcode} needs {need} octets of body, {have} present")]
    BodyTruncated {
        /// Opcode.
        opcode: u8,
        /// Octets the body needs.
        need: usize,
        /// Octets present after the header.
        have: usize,
    },
}

/// What is wrong with an option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    /// Fewer than 4 octets left for the option header.
    #[error("option header truncated")]
    HeaderTruncated,
    /// The option's data (with padding) runs past the end of the message.
    #[error("option data of {len} octets runs past the end of the message")]
    Overrun {
        /// Declared data length.
        len: u16,
    },
    /// The length field is not the one this option must have.
    #[error("length {len} is invalid for this option")]
    BadLength {
        /// Declared data length.
        len: u16,
    },
    /// The option is not allowed with this opcode.
    #[error("not allowed with this opcode")]
    NotAllowedForOpcode,
    /// The option appears more often than allowed.
    #[error("appears more often than allowed")]
    Repeated,
    /// A field inside the option has an invalid value.
    #[error("invalid field: {0}")]
    InvalidField(&'static str),
    /// An option that must be last is not.
    #[error("must be the last option")]
    NotLast,
    /// An option that may appear in responses only was found in a request.
    #[error("allowed in responses only")]
    ResponseOnly,
}

/// Why a message could not be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EmitError {
    /// The caller's buffer is too small.
    #[error("buffer of {have} octets cannot hold the {need}-octet message")]
    BufferTooSmall {
        /// Octets needed.
        need: usize,
        /// Octets available.
        have: usize,
    },
    /// The message would exceed 1100 octets.
    #[error("message of {len} octets exceeds the PCP maximum of 1100")]
    TooLong {
        /// Octets the message would take.
        len: usize,
    },
    /// An option cannot be represented (e.g. data longer than 65535 octets).
    #[error("option {code} cannot be encoded: {reason}")]
    BadOption {
        /// The option code.
        code: u8,
        /// Why.
        reason: &'static str,
    },
}
