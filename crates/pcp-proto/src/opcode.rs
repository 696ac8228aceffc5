//! PCP opcodes (RFC 6887 §19.2, RFC 7652).

/// A PCP opcode (the low 7 bits of the second header octet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Opcode {
    /// 0: ANNOUNCE.
    Announce,
    /// 1: MAP.
    Map,
    /// 2: PEER.
    Peer,
    /// 3: AUTHENTICATION (RFC 7652).
    Authentication,
    /// Any other 7-bit value.
    Unknown(u8),
}

impl Opcode {
    /// Decodes the low 7 bits of `value`.
    pub fn from_bits(value: u8) -> Opcode {
        match value & 0x7f {
            0 => Opcode::Announce,
            1 => Opcode::Map,
            2 => Opcode::Peer,
            3 => Opcode::Authentication,
            other => Opcode::Unknown(other),
        }
    }

    /// The 7-bit value on the wire.
    pub fn to_bits(self) -> u8 {
        match self {
            Opcode::Announce => 0,
            Opcode::Map => 1,
            Opcode::Peer => 2,
            Opcode::Authentication => 3,
            Opcode::Unknown(v) => v & 0x7f,
        }
    }

    /// Length of the opcode-specific information that follows the header.
    pub fn body_len(self) -> Option<usize> {
        match self {
            Opcode::Announce => Some(0),
            Opcode::Map => Some(crate::body::MAP_LEN),
            Opcode::Peer => Some(crate::body::PEER_LEN),
            Opcode::Authentication => Some(crate::body::AUTHENTICATION_LEN),
            Opcode::Unknown(_) => None,
        }
    }

    /// The RFC's upper-case name.
    pub fn name(self) -> &'static str {
        match self {
            Opcode::Announce => "ANNOUNCE",
            Opcode::Map => "MAP",
            Opcode::Peer => "PEER",
            Opcode::Authentication => "AUTHENTICATION",
            Opcode::Unknown(_) => "UNKNOWN",
        }
    }
}

impl std::fmt::Display for Opcode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Opcode::Unknown(v) => write!(f, "UNKNOWN({v})"),
            known => f.write_str(known.name()),
        }
    }
}
