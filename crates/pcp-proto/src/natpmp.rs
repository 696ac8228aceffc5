//! NAT-PMP (RFC 6886), version 0, which a PCP server also serves on port 5351.
//!
//! ```text
//! external address request:  | 0 | 0 |
//! external address response: | 0 | 128 | result (16) | epoch (32) | external IPv4 (32) |
//! map request:               | 0 | 1=UDP,2=TCP | reserved (16) | internal port | suggested external port | lifetime (32) |
//! map response:              | 0 | 128+op | result (16) | epoch (32) | internal port | external port | lifetime (32) |
//! error response:            | 0 | 128+op | result (16) | epoch (32) |
//! ```

use std::net::Ipv4Addr;

use crate::header::{read_u16, read_u32, write_u16, write_u32};

/// Length of an external-address request.
pub const EXTERNAL_ADDRESS_REQUEST_LEN: usize = 2;
/// Length of a map request.
pub const MAP_REQUEST_LEN: usize = 12;
/// Length of the common response header (also a whole error response).
pub const RESPONSE_HEADER_LEN: usize = 8;
/// Length of an external-address response.
pub const EXTERNAL_ADDRESS_RESPONSE_LEN: usize = 12;
/// Length of a map response.
pub const MAP_RESPONSE_LEN: usize = 16;
/// Opcode offset of responses.
const RESPONSE_BIT: u8 = 128;

/// The transport protocol of a NAT-PMP mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// Opcode 1.
    Udp,
    /// Opcode 2.
    Tcp,
}

impl Protocol {
    /// The request opcode.
    pub fn opcode(self) -> u8 {
        match self {
            Protocol::Udp => 1,
            Protocol::Tcp => 2,
        }
    }
    /// The IANA protocol number.
    pub fn iana(self) -> u8 {
        match self {
            Protocol::Udp => crate::protocol::UDP,
            Protocol::Tcp => crate::protocol::TCP,
        }
    }
    fn from_opcode(op: u8) -> Option<Protocol> {
        match op {
            1 => Some(Protocol::Udp),
            2 => Some(Protocol::Tcp),
            _ => None,
        }
    }
}

/// NAT-PMP result codes (RFC 6886 §3.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResultCode {
    /// 0.
    Success,
    /// 1.
    UnsupportedVersion,
    /// 2: refused, e.g. mapping disabled by policy.
    NotAuthorized,
    /// 3: e.g. the NAT has no external address.
    NetworkFailure,
    /// 4: e.g. no ports left.
    OutOfResources,
    /// 5.
    UnsupportedOpcode,
    /// Anything else, kept.
    Unknown(u16),
}

impl From<u16> for ResultCode {
    fn from(v: u16) -> Self {
        match v {
            0 => ResultCode::Success,
            1 => ResultCode::UnsupportedVersion,
            2 => ResultCode::NotAuthorized,
            3 => ResultCode::NetworkFailure,
            4 => ResultCode::OutOfResources,
            5 => ResultCode::UnsupportedOpcode,
            other => ResultCode::Unknown(other),
        }
    }
}

impl From<ResultCode> for u16 {
    fn from(c: ResultCode) -> u16 {
        match c {
            ResultCode::Success => 0,
            ResultCode::UnsupportedVersion => 1,
            ResultCode::NotAuthorized => 2,
            ResultCode::NetworkFailure => 3,
            ResultCode::OutOfResources => 4,
            ResultCode::UnsupportedOpcode => 5,
            ResultCode::Unknown(v) => v,
        }
    }
}

/// A NAT-PMP map request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MapRequest {
    /// UDP or TCP.
    pub protocol: Protocol,
    /// Internal port (0 with lifetime 0: delete all of this client's mappings).
    pub internal_port: u16,
    /// Suggested external port (0: no preference).
    pub suggested_external_port: u16,
    /// Requested lifetime in seconds (0 deletes).
    pub lifetime: u32,
}

/// A NAT-PMP request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Request {
    /// Opcode 0: what is my external address?
    ExternalAddress,
    /// Opcodes 1 and 2: create, renew or delete a mapping.
    Map(MapRequest),
}

/// A NAT-PMP response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Response {
    /// Opcode 128.
    ExternalAddress {
        /// Result.
        result: ResultCode,
        /// Seconds since the start of the server's epoch.
        epoch: u32,
        /// The external IPv4 address.
        external_addr: Ipv4Addr,
    },
    /// Opcodes 129 and 130.
    Map {
        /// UDP or TCP.
        protocol: Protocol,
        /// Result.
        result: ResultCode,
        /// Seconds since the start of the server's epoch.
        epoch: u32,
        /// Internal port.
        internal_port: u16,
        /// Mapped external port.
        external_port: u16,
        /// Granted lifetime in seconds.
        lifetime: u32,
    },
    /// A bare 8-octet response: the answer to an unsupported version or opcode.
    Error {
        /// The request's opcode (the response carries it plus 128).
        request_opcode: u8,
        /// Result.
        result: ResultCode,
        /// Seconds since the start of the server's epoch.
        epoch: u32,
    },
}

/// Why a NAT-PMP message could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Too short for its opcode: drop silently.
    #[error("NAT-PMP message of {len} octets is too short")]
    TooShort {
        /// Length.
        len: usize,
    },
    /// A request parser was given a response or the reverse: drop silently.
    #[error("NAT-PMP message in the wrong direction")]
    WrongDirection,
    /// Version other than 0: answer UnsupportedVersion (an [`Response::Error`]).
    #[error("NAT-PMP version {0} is not supported")]
    UnsupportedVersion(u8),
    /// Unknown opcode: answer UnsupportedOpcode (an [`Response::Error`]).
    #[error("NAT-PMP opcode {0} is not supported")]
    UnsupportedOpcode(u8),
}

impl ParseError {
    /// The error response a server sends for this, if any.
    pub fn response(&self, epoch: u32) -> Option<Response> {
        match *self {
            ParseError::TooShort { .. } | ParseError::WrongDirection => None,
            ParseError::UnsupportedVersion(_) => Some(Response::Error {
                request_opcode: 0,
                result: ResultCode::UnsupportedVersion,
                epoch,
            }),
            ParseError::UnsupportedOpcode(op) => Some(Response::Error {
                request_opcode: op,
                result: ResultCode::UnsupportedOpcode,
                epoch,
            }),
        }
    }
}

/// Whether the datagram should be treated as NAT-PMP (version octet 0).
pub fn is_natpmp(buf: &[u8]) -> bool {
    buf.first() == Some(&0)
}

impl Request {
    /// Parses a request.
    pub fn parse(buf: &[u8]) -> Result<Request, ParseError> {
        if buf.len() < EXTERNAL_ADDRESS_REQUEST_LEN {
            return Err(ParseError::TooShort { len: buf.len() });
        }
        if buf[0] != 0 {
            return Err(ParseError::UnsupportedVersion(buf[0]));
        }
        let op = buf[1];
        if op >= RESPONSE_BIT {
            return Err(ParseError::WrongDirection);
        }
        if op == 0 {
            return Ok(Request::ExternalAddress);
        }
        let protocol = Protocol::from_opcode(op).ok_or(ParseError::UnsupportedOpcode(op))?;
        if buf.len() < MAP_REQUEST_LEN {
            return Err(ParseError::TooShort { len: buf.len() });
        }
        Ok(Request::Map(MapRequest {
            protocol,
            internal_port: read_u16(buf, 4),
            suggested_external_port: read_u16(buf, 6),
            lifetime: read_u32(buf, 8),
        }))
    }

    /// Octets [`Request::emit`] writes.
    pub fn buffer_len(&self) -> usize {
        match self {
            Request::ExternalAddress => EXTERNAL_ADDRESS_REQUEST_LEN,
            Request::Map(_) => MAP_REQUEST_LEN,
        }
    }

    /// Writes the request; returns its length or `None` if `buf` is too small.
    pub fn emit(&self, buf: &mut [u8]) -> Option<usize> {
        let len = self.buffer_len();
        let buf = buf.get_mut(..len)?;
        buf[0] = 0;
        match self {
            Request::ExternalAddress => buf[1] = 0,
            Request::Map(m) => {
                buf[1] = m.protocol.opcode();
                write_u16(buf, 2, 0);
                write_u16(buf, 4, m.internal_port);
                write_u16(buf, 6, m.suggested_external_port);
                write_u32(buf, 8, m.lifetime);
            }
        }
        Some(len)
    }
}

impl Response {
    /// Parses a response. A non-success response shorter than its opcode's full form
    /// parses as [`Response::Error`].
    ///
    /// The "unsupported version" reply parses as `Response::Error { request_opcode: 0,
    /// result: UnsupportedVersion, .. }` in both of its forms: opcode 128 (erratum 3618,
    /// what [`Response::emit`] writes) and opcode 0, which RFC 6886 §3.5 itself printed
    /// and older servers send (the 8-octet reply of such a server to a PCP request). Any
    /// other opcode below 128 is a request: [`ParseError::WrongDirection`].
    pub fn parse(buf: &[u8]) -> Result<Response, ParseError> {
        if buf.len() < RESPONSE_HEADER_LEN {
            return Err(ParseError::TooShort { len: buf.len() });
        }
        if buf[0] != 0 {
            return Err(ParseError::UnsupportedVersion(buf[0]));
        }
        let op = buf[1];
        let result = ResultCode::from(read_u16(buf, 2));
        let epoch = read_u32(buf, 4);
        if op == 0 && result == ResultCode::UnsupportedVersion {
            return Ok(Response::Error {
                request_opcode: 0,
                result,
                epoch,
            });
        }
        if op < RESPONSE_BIT {
            return Err(ParseError::WrongDirection);
        }
        let request_opcode = op - RESPONSE_BIT;
        let full = match request_opcode {
            0 => EXTERNAL_ADDRESS_RESPONSE_LEN,
            1 | 2 => MAP_RESPONSE_LEN,
            _ => usize::MAX,
        };
        if buf.len() < full {
            return if result == ResultCode::Success {
                Err(ParseError::TooShort { len: buf.len() })
            } else {
                Ok(Response::Error {
                    request_opcode,
                    result,
                    epoch,
                })
            };
        }
        Ok(match Protocol::from_opcode(request_opcode) {
            None => Response::ExternalAddress {
                result,
                epoch,
                external_addr: Ipv4Addr::from(read_u32(buf, 8)),
            },
            Some(protocol) => Response::Map {
                protocol,
                result,
                epoch,
                internal_port: read_u16(buf, 8),
                external_port: read_u16(buf, 10),
                lifetime: read_u32(buf, 12),
            },
        })
    }

    /// Octets [`Response::emit`] writes.
    pub fn buffer_len(&self) -> usize {
        match self {
            Response::ExternalAddress { .. } => EXTERNAL_ADDRESS_RESPONSE_LEN,
            Response::Map { .. } => MAP_RESPONSE_LEN,
            Response::Error { .. } => RESPONSE_HEADER_LEN,
        }
    }

    /// Writes the response; returns its length or `None` if `buf` is too small.
    pub fn emit(&self, buf: &mut [u8]) -> Option<usize> {
        let len = self.buffer_len();
        let buf = buf.get_mut(..len)?;
        buf[0] = 0;
        let (op, result, epoch) = match *self {
            Response::ExternalAddress { result, epoch, .. } => (0, result, epoch),
            Response::Map {
                protocol,
                result,
                epoch,
                ..
            } => (protocol.opcode(), result, epoch),
            Response::Error {
                request_opcode,
                result,
                epoch,
            } => (request_opcode, result, epoch),
        };
        buf[1] = op.wrapping_add(RESPONSE_BIT);
        write_u16(buf, 2, result.into());
        write_u32(buf, 4, epoch);
        match *self {
            Response::ExternalAddress { external_addr, .. } => {
                buf[8..12].copy_from_slice(&external_addr.octets());
            }
            Response::Map {
                internal_port,
                external_port,
                lifetime,
                ..
            } => {
                write_u16(buf, 8, internal_port);
                write_u16(buf, 10, external_port);
                write_u32(buf, 12, lifetime);
            }
            Response::Error { .. } => {}
        }
        Some(len)
    }
}
