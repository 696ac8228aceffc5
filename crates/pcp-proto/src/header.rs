//! Zero-copy view of the common PCP header (RFC 6887 §7.1, §7.2).
//!
//! ```text
//! request:  | version | R|opcode | reserved (16)          | requested lifetime (32) | client IP (128)    |
//! response: | version | R|opcode | reserved | result code | lifetime (32)           | epoch (32) | 0 (96) |
//! ```

use std::net::IpAddr;

use crate::addr::{read_addr, write_addr};
use crate::{HEADER_LEN, Opcode, ResultCode};

/// Named field offsets of the common header.
pub(crate) mod field {
    use std::ops::Range;
    pub const VERSION: usize = 0;
    pub const R_OPCODE: usize = 1;
    pub const RESERVED: usize = 2;
    pub const RESULT: usize = 3;
    pub const LIFETIME: Range<usize> = 4..8;
    pub const CLIENT_ADDR: usize = 8;
    pub const EPOCH: Range<usize> = 8..12;
    pub const RESPONSE_RESERVED: Range<usize> = 12..24;
    pub const BODY: usize = 24;
}

/// The R bit: set in responses.
const R_BIT: u8 = 0x80;

/// A view of a PCP message in a byte buffer.
///
/// Accessors read fixed offsets; [`Packet::new_checked`] guarantees the header fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without checking its length; accessors may then panic.
    pub fn new_unchecked(buffer: T) -> Packet<T> {
        Packet { buffer }
    }

    /// Wraps a buffer that holds at least a full header.
    pub fn new_checked(buffer: T) -> Option<Packet<T>> {
        (buffer.as_ref().len() >= HEADER_LEN).then_some(Packet { buffer })
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Version octet.
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VERSION]
    }

    /// Whether the R (response) bit is set.
    pub fn is_response(&self) -> bool {
        self.buffer.as_ref()[field::R_OPCODE] & R_BIT != 0
    }

    /// The opcode.
    pub fn opcode(&self) -> Opcode {
        Opcode::from_bits(self.buffer.as_ref()[field::R_OPCODE])
    }

    /// The result code of a response (in a request this octet is reserved, except for an
    /// RFC 7652 PA-Client message which carries a result code there).
    pub fn result_code(&self) -> ResultCode {
        ResultCode::from(self.buffer.as_ref()[field::RESULT])
    }

    /// The (requested, in a request) lifetime in seconds.
    pub fn lifetime(&self) -> u32 {
        read_u32(self.buffer.as_ref(), field::LIFETIME.start)
    }

    /// The PCP client's IP address of a request.
    pub fn client_addr(&self) -> IpAddr {
        read_addr(self.buffer.as_ref(), field::CLIENT_ADDR)
    }

    /// The epoch time of a response.
    pub fn epoch(&self) -> u32 {
        read_u32(self.buffer.as_ref(), field::EPOCH.start)
    }

    /// Everything after the header: opcode-specific information, then options.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[field::BODY..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Sets the version octet.
    pub fn set_version(&mut self, v: u8) {
        self.buffer.as_mut()[field::VERSION] = v;
    }

    /// Sets the R bit and opcode.
    pub fn set_r_opcode(&mut self, response: bool, opcode: Opcode) {
        self.buffer.as_mut()[field::R_OPCODE] = opcode.to_bits() | if response { R_BIT } else { 0 };
    }

    /// Sets the reserved octet that precedes the result code.
    pub fn clear_reserved(&mut self) {
        self.buffer.as_mut()[field::RESERVED] = 0;
    }

    /// Sets the result-code octet.
    pub fn set_result_code(&mut self, code: ResultCode) {
        self.buffer.as_mut()[field::RESULT] = code.to_u8();
    }

    /// Sets the lifetime.
    pub fn set_lifetime(&mut self, secs: u32) {
        write_u32(self.buffer.as_mut(), field::LIFETIME.start, secs);
    }

    /// Sets the PCP client's IP address (request).
    pub fn set_client_addr(&mut self, addr: IpAddr) {
        write_addr(self.buffer.as_mut(), field::CLIENT_ADDR, addr);
    }

    /// Sets the epoch and zeroes the 96 reserved bits that follow (response).
    pub fn set_epoch(&mut self, epoch: u32) {
        let buf = self.buffer.as_mut();
        write_u32(buf, field::EPOCH.start, epoch);
        buf[field::RESPONSE_RESERVED].fill(0);
    }

    /// Sets the epoch and leaves the 96 bits after it as they are (an error response to
    /// a request that did not parse keeps the request's bits there, RFC 6887 §7.2).
    pub fn set_epoch_only(&mut self, epoch: u32) {
        write_u32(self.buffer.as_mut(), field::EPOCH.start, epoch);
    }

    /// Mutable access to everything after the header.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::BODY..]
    }
}

pub(crate) fn read_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([buf[at], buf[at + 1]])
}

pub(crate) fn read_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

pub(crate) fn write_u16(buf: &mut [u8], at: usize, v: u16) {
    buf[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

pub(crate) fn write_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
