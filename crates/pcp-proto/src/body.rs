//! Opcode-specific information: MAP (RFC 6887 §11.1), PEER (§12.1) and
//! AUTHENTICATION (RFC 7652 §5.1). The same layout serves requests and responses.

use std::net::IpAddr;

use crate::addr::{read_addr, write_addr};
use crate::header::{read_u16, read_u32, write_u16, write_u32};
use crate::{Extensions, Malformed, Opcode, ParseError};

/// Length of the MAP opcode body.
pub const MAP_LEN: usize = 36;
/// Length of the PEER opcode body.
pub const PEER_LEN: usize = 56;
/// Length of the AUTHENTICATION opcode body.
pub const AUTHENTICATION_LEN: usize = 8;

mod field {
    pub const NONCE: core::ops::Range<usize> = 0..12;
    pub const PROTOCOL: usize = 12;
    pub const RESERVED: core::ops::Range<usize> = 13..16;
    pub const INTERNAL_PORT: usize = 16;
    pub const EXTERNAL_PORT: usize = 18;
    pub const EXTERNAL_ADDR: usize = 20;
    // PEER only, after the MAP fields:
    pub const REMOTE_PORT: usize = 36;
    pub const PEER_RESERVED: core::ops::Range<usize> = 38..40;
    pub const REMOTE_ADDR: usize = 40;
    // AUTHENTICATION:
    pub const SESSION_ID: usize = 0;
    pub const SEQUENCE: usize = 4;
}

/// A view of a MAP body (also the first 36 octets of a PEER body).
#[derive(Debug, Clone, Copy)]
pub struct MapView<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> MapView<T> {
    /// Wraps a buffer that holds at least a MAP body.
    pub fn new_checked(buffer: T) -> Option<Self> {
        (buffer.as_ref().len() >= MAP_LEN).then_some(MapView { buffer })
    }
    /// Mapping nonce.
    pub fn nonce(&self) -> [u8; 12] {
        let mut n = [0; 12];
        n.copy_from_slice(&self.buffer.as_ref()[field::NONCE]);
        n
    }
    /// IANA protocol number (0 = all).
    pub fn protocol(&self) -> u8 {
        self.buffer.as_ref()[field::PROTOCOL]
    }
    /// Internal port.
    pub fn internal_port(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::INTERNAL_PORT)
    }
    /// Suggested (request) or assigned (response) external port.
    pub fn external_port(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::EXTERNAL_PORT)
    }
    /// Suggested (request) or assigned (response) external address.
    pub fn external_addr(&self) -> IpAddr {
        read_addr(self.buffer.as_ref(), field::EXTERNAL_ADDR)
    }
}

/// A view of a PEER body.
#[derive(Debug, Clone, Copy)]
pub struct PeerView<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> PeerView<T> {
    /// Wraps a buffer that holds at least a PEER body.
    pub fn new_checked(buffer: T) -> Option<Self> {
        (buffer.as_ref().len() >= PEER_LEN).then_some(PeerView { buffer })
    }
    /// The MAP-shaped first part.
    pub fn mapping(&self) -> MapView<&[u8]> {
        MapView {
            buffer: self.buffer.as_ref(),
        }
    }
    /// Remote peer port.
    pub fn remote_port(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::REMOTE_PORT)
    }
    /// Remote peer address.
    pub fn remote_addr(&self) -> IpAddr {
        read_addr(self.buffer.as_ref(), field::REMOTE_ADDR)
    }
}

/// Owned MAP body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MapBody {
    /// Mapping nonce, chosen by the client and kept across renewals.
    pub nonce: [u8; 12],
    /// IANA protocol number (0 = all protocols).
    pub protocol: u8,
    /// Internal port (0 = all ports).
    pub internal_port: u16,
    /// Suggested (request) or assigned (response) external port.
    pub external_port: u16,
    /// Suggested (request) or assigned (response) external address.
    pub external_addr: IpAddr,
}

impl MapBody {
    /// Reads a MAP body from a view; reserved octets are ignored.
    pub fn parse<T: AsRef<[u8]>>(view: &MapView<T>) -> MapBody {
        MapBody {
            nonce: view.nonce(),
            protocol: view.protocol(),
            internal_port: view.internal_port(),
            external_port: view.external_port(),
            external_addr: view.external_addr(),
        }
    }

    /// Writes the body into the first [`MAP_LEN`] octets of `buf`.
    pub fn emit(&self, buf: &mut [u8]) {
        buf[field::NONCE].copy_from_slice(&self.nonce);
        buf[field::PROTOCOL] = self.protocol;
        buf[field::RESERVED].fill(0);
        write_u16(buf, field::INTERNAL_PORT, self.internal_port);
        write_u16(buf, field::EXTERNAL_PORT, self.external_port);
        write_addr(buf, field::EXTERNAL_ADDR, self.external_addr);
    }
}

/// Owned PEER body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerBody {
    /// The fields PEER shares with MAP.
    pub mapping: MapBody,
    /// Remote peer port.
    pub remote_port: u16,
    /// Remote peer address.
    pub remote_addr: IpAddr,
}

impl PeerBody {
    /// Reads a PEER body from a view; reserved octets are ignored.
    pub fn parse<T: AsRef<[u8]>>(view: &PeerView<T>) -> PeerBody {
        PeerBody {
            mapping: MapBody::parse(&view.mapping()),
            remote_port: view.remote_port(),
            remote_addr: view.remote_addr(),
        }
    }

    /// Writes the body into the first [`PEER_LEN`] octets of `buf`.
    pub fn emit(&self, buf: &mut [u8]) {
        self.mapping.emit(buf);
        write_u16(buf, field::REMOTE_PORT, self.remote_port);
        buf[field::PEER_RESERVED].fill(0);
        write_addr(buf, field::REMOTE_ADDR, self.remote_addr);
    }
}

/// A view of an AUTHENTICATION body (RFC 7652 §5.2).
#[derive(Debug, Clone, Copy)]
pub struct AuthenticationView<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> AuthenticationView<T> {
    /// Wraps a buffer that holds at least an AUTHENTICATION body.
    pub fn new_checked(buffer: T) -> Option<Self> {
        (buffer.as_ref().len() >= AUTHENTICATION_LEN).then_some(AuthenticationView { buffer })
    }
    /// PA session identifier (0 in a PA-Initiation).
    pub fn session_id(&self) -> u32 {
        read_u32(self.buffer.as_ref(), field::SESSION_ID)
    }
    /// PA message sequence number.
    pub fn sequence_number(&self) -> u32 {
        read_u32(self.buffer.as_ref(), field::SEQUENCE)
    }
}

/// Owned AUTHENTICATION body (RFC 7652 §5.2). The result code of a PA-Client message
/// travels in the request header ([`crate::Request::pa_result_code`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AuthenticationBody {
    /// PA session identifier, chosen by the server; 0 in a PA-Initiation.
    pub session_id: u32,
    /// PA message sequence number (RFC 7652 §6.4).
    pub sequence_number: u32,
}

impl AuthenticationBody {
    /// Reads an AUTHENTICATION body from a view.
    pub fn parse<T: AsRef<[u8]>>(view: &AuthenticationView<T>) -> AuthenticationBody {
        AuthenticationBody {
            session_id: view.session_id(),
            sequence_number: view.sequence_number(),
        }
    }

    /// Writes the body into the first [`AUTHENTICATION_LEN`] octets of `buf`.
    pub fn emit(&self, buf: &mut [u8]) {
        write_u32(buf, field::SESSION_ID, self.session_id);
        write_u32(buf, field::SEQUENCE, self.sequence_number);
    }
}

/// Opcode-specific information of a request or response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Body {
    /// ANNOUNCE has no body.
    Announce,
    /// MAP body.
    Map(MapBody),
    /// PEER body.
    Peer(PeerBody),
    /// AUTHENTICATION body.
    Authentication(AuthenticationBody),
}

impl Body {
    /// The opcode this body belongs to.
    pub fn opcode(&self) -> Opcode {
        match self {
            Body::Announce => Opcode::Announce,
            Body::Map(_) => Opcode::Map,
            Body::Peer(_) => Opcode::Peer,
            Body::Authentication(_) => Opcode::Authentication,
        }
    }

    /// Length on the wire.
    pub fn wire_len(&self) -> usize {
        self.opcode().body_len().unwrap_or(0)
    }

    /// The MAP-shaped part of a MAP or PEER body.
    pub fn mapping(&self) -> Option<&MapBody> {
        match self {
            Body::Map(m) => Some(m),
            Body::Peer(p) => Some(&p.mapping),
            _ => None,
        }
    }

    /// Parses the body for `opcode` from the start of `payload`; AUTHENTICATION is an
    /// unsupported opcode unless `ext` has authentication.
    pub(crate) fn parse(
        opcode: Opcode,
        payload: &[u8],
        ext: Extensions,
    ) -> Result<Body, ParseError> {
        let need = opcode
            .body_len()
            .filter(|_| opcode != Opcode::Authentication || ext.authentication)
            .ok_or(ParseError::UnsupportedOpcode(opcode.to_bits()))?;
        if payload.len() < need {
            return Err(ParseError::Malformed(Malformed::BodyTruncated {
                opcode: opcode.to_bits(),
                need,
                have: payload.len(),
            }));
        }
        Ok(match opcode {
            Opcode::Announce => Body::Announce,
            Opcode::Map => Body::Map(MapBody::parse(&MapView { buffer: payload })),
            Opcode::Peer => Body::Peer(PeerBody::parse(&PeerView { buffer: payload })),
            Opcode::Authentication => {
                Body::Authentication(AuthenticationBody::parse(&AuthenticationView {
                    buffer: payload,
                }))
            }
            Opcode::Unknown(v) => return Err(ParseError::UnsupportedOpcode(v)),
        })
    }

    /// Writes the body at the start of `buf` (which must hold [`Body::wire_len`] octets).
    pub(crate) fn emit(&self, buf: &mut [u8]) {
        match self {
            Body::Announce => {}
            Body::Map(m) => m.emit(buf),
            Body::Peer(p) => p.emit(buf),
            Body::Authentication(a) => a.emit(buf),
        }
    }
}
