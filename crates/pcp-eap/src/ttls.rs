//! EAP-TTLS v0 framing (RFC 5281 §9.1): flags, fragmentation of the TLS stream
//! (§9.2.2), and the Diameter-style AVPs of the tunnel (§10).
//!
//! ```text
//! | Flags: L M S 0 0 Version(3) | [TLS Message Length (32), if L] | TLS Data |
//! ```

/// Length-included flag.
pub const FLAG_L: u8 = 0x80;
/// More-fragments flag.
pub const FLAG_M: u8 = 0x40;
/// Start flag.
pub const FLAG_S: u8 = 0x20;
/// Version bits (we speak version 0).
pub const VERSION_MASK: u8 = 0x07;

/// TLS data octets per EAP-TTLS fragment: an EAP packet must fit
/// [`pcp_auth::eap::MAX_EAP_PACKET`] with its 5-octet header, the flags octet and the
/// 4-octet length.
pub const FRAGMENT_LEN: usize = pcp_auth::eap::MAX_EAP_PACKET - 10;

/// Largest TLS message we reassemble (a handshake flight with a certificate chain).
pub const MAX_MESSAGE: usize = 64 * 1024;

/// The TTLS payload of an EAP-TTLS packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// Flags octet.
    pub flags: u8,
    /// TLS Message Length when L is set.
    pub total: Option<u32>,
    /// TLS data of this fragment.
    pub data: &'a [u8],
}

impl<'a> Frame<'a> {
    /// Parses the Type-Data of an EAP-TTLS packet.
    pub fn parse(b: &'a [u8]) -> Option<Frame<'a>> {
        let (&flags, rest) = b.split_first()?;
        if flags & FLAG_L != 0 {
            if rest.len() < 4 {
                return None;
            }
            let total = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
            Some(Frame {
                flags,
                total: Some(total),
                data: &rest[4..],
            })
        } else {
            Some(Frame {
                flags,
                total: None,
                data: rest,
            })
        }
    }

    /// The Type-Data octets.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![self.flags];
        if let Some(t) = self.total {
            v.extend_from_slice(&t.to_be_bytes());
        }
        v.extend_from_slice(self.data);
        v
    }
}

/// Outgoing TLS data cut into fragments (RFC 5281 §9.2.2): the first carries L and the
/// total length when there is more than one; all but the last carry M.
#[derive(Debug, Default)]
pub struct Outgoing {
    data: Vec<u8>,
    at: usize,
}

impl Outgoing {
    /// Queues a TLS message (a whole flight).
    pub fn set(&mut self, data: Vec<u8>) {
        self.data = data;
        self.at = 0;
    }

    /// Whether fragments remain to be sent.
    pub fn pending(&self) -> bool {
        self.at < self.data.len()
    }

    /// The next fragment's Type-Data.
    pub fn next_fragment(&mut self) -> Vec<u8> {
        let first = self.at == 0;
        let end = (self.at + FRAGMENT_LEN).min(self.data.len());
        let more = end < self.data.len();
        let mut flags = 0;
        if more {
            flags |= FLAG_M;
        }
        let total = (first && more).then_some(self.data.len() as u32);
        if total.is_some() {
            flags |= FLAG_L;
        }
        let frame = Frame {
            flags,
            total,
            data: &self.data[self.at..end],
        }
        .to_vec();
        self.at = end;
        frame
    }
}

/// Reassembly of incoming fragments.
#[derive(Debug, Default)]
pub struct Incoming {
    buf: Vec<u8>,
    expected: Option<usize>,
}

/// What a received fragment completes.
#[derive(Debug, PartialEq, Eq)]
pub enum Reassembly {
    /// More fragments follow: acknowledge this one.
    More,
    /// The whole TLS message.
    Done(Vec<u8>),
    /// Too long, or longer than announced.
    Invalid,
}

impl Incoming {
    /// Adds one fragment.
    pub fn add(&mut self, f: &Frame) -> Reassembly {
        if let Some(t) = f.total
            && self.buf.is_empty()
        {
            let t = t as usize;
            if t > MAX_MESSAGE {
                return Reassembly::Invalid;
            }
            self.expected = Some(t);
        }
        self.buf.extend_from_slice(f.data);
        if self.buf.len() > self.expected.unwrap_or(MAX_MESSAGE) {
            self.reset();
            return Reassembly::Invalid;
        }
        if f.flags & FLAG_M != 0 {
            return Reassembly::More;
        }
        self.expected = None;
        Reassembly::Done(std::mem::take(&mut self.buf))
    }

    fn reset(&mut self) {
        self.buf.clear();
        self.expected = None;
    }
}

/// RADIUS User-Name (RFC 5281 §11.2.5 carries PAP as RADIUS attributes in AVPs).
pub const AVP_USER_NAME: u32 = 1;
/// RADIUS User-Password.
pub const AVP_USER_PASSWORD: u32 = 2;
/// The M (mandatory) AVP flag.
const AVP_FLAG_M: u8 = 0x40;
/// The V (vendor) AVP flag.
const AVP_FLAG_V: u8 = 0x80;

/// Encodes one AVP (RFC 5281 §10.1) with the M flag, padded to 4 octets.
pub fn avp(code: u32, data: &[u8]) -> Vec<u8> {
    let len = 8 + data.len();
    let mut v = Vec::with_capacity(len + 3);
    v.extend_from_slice(&code.to_be_bytes());
    v.push(AVP_FLAG_M);
    v.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    v.extend_from_slice(data);
    while v.len() % 4 != 0 {
        v.push(0);
    }
    v
}

/// One AVP: code, Vendor-ID (when the V flag is set), data.
pub type Avp<'a> = (u32, Option<u32>, &'a [u8]);

/// Decodes a sequence of AVPs; `None` if malformed.
pub fn parse_avps(mut b: &[u8]) -> Option<Vec<Avp<'_>>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        if b.len() < 8 {
            return None;
        }
        let code = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let flags = b[4];
        let len = u32::from_be_bytes([0, b[5], b[6], b[7]]) as usize;
        let (vendor, hdr) = if flags & AVP_FLAG_V != 0 {
            if b.len() < 12 {
                return None;
            }
            (Some(u32::from_be_bytes([b[8], b[9], b[10], b[11]])), 12)
        } else {
            (None, 8)
        };
        if len < hdr || len > b.len() {
            return None;
        }
        out.push((code, vendor, &b[hdr..len]));
        let padded = (len + 3) & !3;
        b = &b[padded.min(b.len())..];
    }
    Some(out)
}

/// The User-Password AVP data for PAP: the password padded with NULs to a multiple of
/// 16 octets (RFC 5281 §11.2.5).
pub fn pap_password(pw: &[u8]) -> Vec<u8> {
    let mut v = pw.to_vec();
    let n = v.len().div_ceil(16).max(1) * 16;
    v.resize(n, 0);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragments_reassemble_with_l_and_m_flags() {
        let data: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
        let mut out = Outgoing::default();
        out.set(data.clone());
        let mut inc = Incoming::default();
        let mut frames = Vec::new();
        while out.pending() {
            frames.push(out.next_fragment());
        }
        assert_eq!(frames.len(), 3);
        let f0 = Frame::parse(&frames[0]).unwrap();
        assert_eq!(f0.flags, FLAG_L | FLAG_M);
        assert_eq!(f0.total, Some(2500));
        assert_eq!(Frame::parse(&frames[2]).unwrap().flags, 0);
        assert!(
            frames
                .iter()
                .all(|f| f.len() + 5 <= pcp_auth::eap::MAX_EAP_PACKET)
        );
        assert_eq!(
            inc.add(&Frame::parse(&frames[0]).unwrap()),
            Reassembly::More
        );
        assert_eq!(
            inc.add(&Frame::parse(&frames[1]).unwrap()),
            Reassembly::More
        );
        assert_eq!(
            inc.add(&Frame::parse(&frames[2]).unwrap()),
            Reassembly::Done(data)
        );
        // Longer than announced.
        let mut inc = Incoming::default();
        let lie = Frame {
            flags: FLAG_L | FLAG_M,
            total: Some(4),
            data: &[1, 2, 3, 4, 5],
        };
        assert_eq!(inc.add(&lie), Reassembly::Invalid);
    }

    #[test]
    fn avps_round_trip() {
        let mut b = avp(AVP_USER_NAME, b"alice");
        b.extend(avp(AVP_USER_PASSWORD, &pap_password(b"pw")));
        let avps = parse_avps(&b).unwrap();
        assert_eq!(avps[0], (1, None, &b"alice"[..]));
        assert_eq!(avps[1].2.len(), 16);
        assert!(parse_avps(&b[..7]).is_none());
    }
}
