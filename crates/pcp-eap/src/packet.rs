//! EAP packets (RFC 3748 §4):
//!
//! ```text
//! | Code (8) | Identifier (8) | Length (16) | Type (8, requests/responses) | Type-Data |
//! ```

/// EAP Request.
pub const REQUEST: u8 = 1;
/// EAP Response.
pub const RESPONSE: u8 = 2;
/// EAP Success.
pub const SUCCESS: u8 = 3;
/// EAP Failure.
pub const FAILURE: u8 = 4;

/// Identity (RFC 3748 §5.1).
pub const TYPE_IDENTITY: u8 = 1;
/// Legacy Nak (RFC 3748 §5.3.1).
pub const TYPE_NAK: u8 = 3;
/// EAP-TTLS (RFC 5281).
pub const TYPE_TTLS: u8 = 21;

/// Why bytes are not an EAP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// Shorter than its header, or than its Length field says.
    #[error("truncated EAP packet")]
    Truncated,
    /// The Length field is below the minimum for the code.
    #[error("EAP length field {0} too small")]
    BadLength(u16),
    /// Unknown code.
    #[error("unknown EAP code {0}")]
    BadCode(u8),
}

/// One EAP packet, borrowing its type data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    /// Code (1–4).
    pub code: u8,
    /// Identifier.
    pub id: u8,
    /// Type of a request or response; `None` for Success and Failure.
    pub typ: Option<u8>,
    /// Type-Data.
    pub data: &'a [u8],
}

impl<'a> Packet<'a> {
    /// Parses one packet; octets after Length are ignored (RFC 3748 §4.1: padding).
    pub fn parse(b: &'a [u8]) -> Result<Packet<'a>, PacketError> {
        if b.len() < 4 {
            return Err(PacketError::Truncated);
        }
        let len = u16::from_be_bytes([b[2], b[3]]);
        let l = usize::from(len);
        if b.len() < l {
            return Err(PacketError::Truncated);
        }
        match b[0] {
            SUCCESS | FAILURE => Ok(Packet {
                code: b[0],
                id: b[1],
                typ: None,
                data: &[],
            }),
            REQUEST | RESPONSE if l >= 5 => Ok(Packet {
                code: b[0],
                id: b[1],
                typ: Some(b[4]),
                data: &b[5..l],
            }),
            REQUEST | RESPONSE => Err(PacketError::BadLength(len)),
            c => Err(PacketError::BadCode(c)),
        }
    }

    /// The packet's octets.
    pub fn to_vec(&self) -> Vec<u8> {
        let len = 4 + usize::from(self.typ.is_some()) + self.data.len();
        let mut v = Vec::with_capacity(len);
        v.push(self.code);
        v.push(self.id);
        v.extend_from_slice(&(len as u16).to_be_bytes());
        v.extend(self.typ);
        v.extend_from_slice(self.data);
        v
    }
}

/// An EAP-Success with `id`.
pub fn success(id: u8) -> Vec<u8> {
    vec![SUCCESS, id, 0, 4]
}

/// An EAP-Failure with `id`.
pub fn failure(id: u8) -> Vec<u8> {
    vec![FAILURE, id, 0, 4]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let p = Packet {
            code: REQUEST,
            id: 7,
            typ: Some(TYPE_IDENTITY),
            data: b"",
        };
        let b = p.to_vec();
        assert_eq!(b, [1, 7, 0, 5, 1]);
        assert_eq!(Packet::parse(&b).unwrap(), p);
        assert_eq!(Packet::parse(&success(3)).unwrap().code, SUCCESS);
        assert_eq!(Packet::parse(&[1, 1, 0, 9, 1]), Err(PacketError::Truncated));
        assert_eq!(Packet::parse(&[1, 1, 0, 4]), Err(PacketError::BadLength(4)));
        assert_eq!(Packet::parse(&[9, 1, 0, 4]), Err(PacketError::BadCode(9)));
        // Trailing octets beyond Length are padding.
        assert_eq!(
            Packet::parse(&[2, 1, 0, 6, 1, b'a', 0, 0]).unwrap().data,
            b"a"
        );
    }
}
