//! Tags on whole PCP messages (RFC 7652 §6.1, §6.2): the AUTHENTICATION_TAG of a common
//! message and the PA_AUTHENTICATION_TAG of a PA message are the last option, and the MAC
//! covers the entire message (header, body, every option, the tag with its MAC field
//! zero).

use std::ops::Range;

use pcp_proto::{
    AuthenticationTag, HEADER_LEN, OPTION_HEADER_LEN, Opcode, OptionCode, OptionView,
    PaAuthenticationTag, PcpOption, append_option, pa_tag, tag,
};

use crate::crypto::{MAC_LEN, TransportKey};

/// Why a tag could not be found, made or checked. Every one means: silently discard
/// (RFC 7652 §6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TagError {
    /// The message is not a framed PCP message with a known opcode.
    #[error("not a framed PCP message")]
    NotFramed,
    /// The last option is not the tag this opcode takes.
    #[error("no tag as the last option")]
    Missing,
    /// The MAC field is not the length of the session's MAC algorithm.
    #[error("MAC of {0} octets, expected 16")]
    MacLength(usize),
    /// The MAC does not verify.
    #[error("MAC does not verify")]
    BadMac,
    /// The tag does not fit in the message buffer or would pass 1100 octets.
    #[error("no room for the tag")]
    NoRoom,
}

/// A tag found at the end of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    /// AUTHENTICATION_TAG (common message) or PA_AUTHENTICATION_TAG (PA message).
    pub code: OptionCode,
    /// Session ID: from the tag of a common message, from the body of a PA message.
    pub session_id: u32,
    /// Sequence number: from the tag of a common message, from the body of a PA message.
    pub sequence_number: u32,
    /// Key ID.
    pub key_id: u32,
    /// Where the MAC sits in the message.
    pub mac: Range<usize>,
}

/// Finds the tag at the end of `msg` (request or response), as the codec framed it:
/// AUTHENTICATION_TAG for MAP, PEER and ANNOUNCE, PA_AUTHENTICATION_TAG for
/// AUTHENTICATION.
pub fn locate(msg: &[u8]) -> Result<Located, TagError> {
    if msg.len() < HEADER_LEN {
        return Err(TagError::NotFramed);
    }
    let opcode = Opcode::from_bits(msg[1]);
    let body = opcode.body_len().ok_or(TagError::NotFramed)?;
    let mut at = HEADER_LEN + body;
    if msg.len() < at {
        return Err(TagError::NotFramed);
    }
    let mut last = None;
    while at < msg.len() {
        let view = OptionView::new_checked(&msg[at..]).map_err(|_| TagError::NotFramed)?;
        last = Some((at, view.code(), usize::from(view.data_len())));
        at += view.wire_len();
    }
    let (start, code, len) = last.ok_or(TagError::Missing)?;
    let data = start + OPTION_HEADER_LEN;
    let read = |off: usize| {
        let b = &msg[data + off..data + off + 4];
        u32::from_be_bytes([b[0], b[1], b[2], b[3]])
    };
    let code = OptionCode::from(code);
    match (opcode, code) {
        (Opcode::Authentication, OptionCode::PaAuthenticationTag) if len >= pa_tag::MAC => {
            let body = &msg[HEADER_LEN..];
            Ok(Located {
                code,
                session_id: u32::from_be_bytes([body[0], body[1], body[2], body[3]]),
                sequence_number: u32::from_be_bytes([body[4], body[5], body[6], body[7]]),
                key_id: read(pa_tag::KEY_ID),
                mac: data + pa_tag::MAC..data + len,
            })
        }
        (Opcode::Map | Opcode::Peer | Opcode::Announce, OptionCode::AuthenticationTag)
            if len >= tag::MAC =>
        {
            Ok(Located {
                code,
                session_id: read(tag::SESSION_ID),
                sequence_number: read(tag::SEQUENCE),
                key_id: read(tag::KEY_ID),
                mac: data + tag::MAC..data + len,
            })
        }
        _ => Err(TagError::Missing),
    }
}

/// The MAC of `msg` with the MAC field at `mac` taken as zero.
fn compute(msg: &[u8], mac: &Range<usize>, key: &TransportKey) -> [u8; MAC_LEN] {
    let zeros = [0u8; MAC_LEN];
    key.mac(&[&msg[..mac.start], &zeros[..mac.len()], &msg[mac.end..]])
}

/// Appends the tag for `key` to the complete message in `buf[..len]`, computes its MAC
/// and returns the new length. For a PA message the session ID and sequence number are
/// the body's and `session` is ignored; for a common message `session` gives them.
pub fn seal(
    buf: &mut [u8],
    len: usize,
    key: &TransportKey,
    session: (u32, u32),
) -> Result<usize, TagError> {
    if len < HEADER_LEN || buf.len() < len {
        return Err(TagError::NotFramed);
    }
    let zero = [0u8; MAC_LEN];
    let option = match Opcode::from_bits(buf[1]) {
        Opcode::Authentication => PcpOption::PaAuthenticationTag(PaAuthenticationTag {
            key_id: key.id,
            mac: &zero,
        }),
        Opcode::Map | Opcode::Peer | Opcode::Announce => {
            PcpOption::AuthenticationTag(AuthenticationTag {
                session_id: session.0,
                sequence_number: session.1,
                key_id: key.id,
                mac: &zero,
            })
        }
        Opcode::Unknown(_) => return Err(TagError::NotFramed),
    };
    let n = append_option(buf, len, &option).map_err(|_| TagError::NoRoom)?;
    let at = locate(&buf[..n])?;
    let mac = compute(&buf[..n], &at.mac, key);
    buf[at.mac].copy_from_slice(&mac);
    Ok(n)
}

/// Checks the tag at the end of `msg` with `key` (RFC 7652 §6.2): the MAC must have the
/// algorithm's length and verify over the message with the MAC field zeroed. Returns
/// where the tag is; the caller checks session, key ID and sequence number.
pub fn verify(msg: &[u8], key: &TransportKey) -> Result<Located, TagError> {
    let at = locate(msg)?;
    check(msg, &at, key)?;
    Ok(at)
}

/// Checks the MAC of an already located tag.
pub fn check(msg: &[u8], at: &Located, key: &TransportKey) -> Result<(), TagError> {
    if at.mac.len() != MAC_LEN {
        return Err(TagError::MacLength(at.mac.len()));
    }
    let zeros = [0u8; MAC_LEN];
    let parts = [&msg[..at.mac.start], &zeros[..], &msg[at.mac.end..]];
    if key.verify(&parts, &msg[at.mac.clone()]) {
        Ok(())
    } else {
        Err(TagError::BadMac)
    }
}
