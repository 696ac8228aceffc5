//! PCP options (RFC 6887 §7.3 and the options of RFC 6887 §13, RFC 7220, RFC 7225,
//! RFC 7753, RFC 7652 and RFC 7767).
//!
//! ```text
//! | option code (8) | reserved (8) | option length (16) | data (length octets, padded to 4) |
//! ```

use std::net::IpAddr;

use crate::addr::{read_addr, write_addr};
use crate::error::{EmitError, OptionError, ParseError};
use crate::header::{read_u16, read_u32, write_u16, write_u32};
use crate::{Opcode, body::MAP_LEN};

/// Length of an option header.
pub const OPTION_HEADER_LEN: usize = 4;

mod field {
    pub const CODE: usize = 0;
    pub const RESERVED: usize = 1;
    pub const LENGTH: usize = 2;
    pub const DATA: usize = 4;
}

/// Field offsets inside AUTHENTICATION_TAG data (RFC 7652 §5.4).
pub mod tag {
    /// Session ID.
    pub const SESSION_ID: usize = 0;
    /// Sequence Number.
    pub const SEQUENCE: usize = 4;
    /// Key ID.
    pub const KEY_ID: usize = 8;
    /// Authentication Data (the MAC).
    pub const MAC: usize = 12;
}

/// Field offsets inside PA_AUTHENTICATION_TAG data (RFC 7652 §5.5).
pub mod pa_tag {
    /// Key ID.
    pub const KEY_ID: usize = 0;
    /// Authentication Data (the MAC).
    pub const MAC: usize = 4;
}

/// A PCP option code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OptionCode {
    /// 1: THIRD_PARTY.
    ThirdParty,
    /// 2: PREFER_FAILURE.
    PreferFailure,
    /// 3: FILTER.
    Filter,
    /// 4: NONCE (RFC 7652).
    Nonce,
    /// 5: AUTHENTICATION_TAG (RFC 7652).
    AuthenticationTag,
    /// 6: PA_AUTHENTICATION_TAG (RFC 7652).
    PaAuthenticationTag,
    /// 7: EAP_PAYLOAD (RFC 7652).
    EapPayload,
    /// 8: PRF, the pseudo-random function (RFC 7652).
    Prf,
    /// 9: MAC_ALGORITHM (RFC 7652).
    MacAlgorithm,
    /// 10: SESSION_LIFETIME (RFC 7652).
    SessionLifetime,
    /// 11: RECEIVED_PAK (RFC 7652).
    ReceivedPak,
    /// 12: ID_INDICATOR (RFC 7652).
    IdIndicator,
    /// 128: DESCRIPTION (RFC 7220).
    Description,
    /// 129: PREFIX64 (RFC 7225).
    Prefix64,
    /// 130: PORT_SET (RFC 7753).
    PortSet,
    /// 192: CHECKPOINT_REQUIRED (RFC 7767).
    CheckpointRequired,
    /// Any other code.
    Unknown(u8),
}

impl From<u8> for OptionCode {
    fn from(v: u8) -> Self {
        match v {
            1 => OptionCode::ThirdParty,
            2 => OptionCode::PreferFailure,
            3 => OptionCode::Filter,
            4 => OptionCode::Nonce,
            5 => OptionCode::AuthenticationTag,
            6 => OptionCode::PaAuthenticationTag,
            7 => OptionCode::EapPayload,
            8 => OptionCode::Prf,
            9 => OptionCode::MacAlgorithm,
            10 => OptionCode::SessionLifetime,
            11 => OptionCode::ReceivedPak,
            12 => OptionCode::IdIndicator,
            128 => OptionCode::Description,
            129 => OptionCode::Prefix64,
            130 => OptionCode::PortSet,
            192 => OptionCode::CheckpointRequired,
            other => OptionCode::Unknown(other),
        }
    }
}

impl From<OptionCode> for u8 {
    fn from(c: OptionCode) -> u8 {
        match c {
            OptionCode::ThirdParty => 1,
            OptionCode::PreferFailure => 2,
            OptionCode::Filter => 3,
            OptionCode::Nonce => 4,
            OptionCode::AuthenticationTag => 5,
            OptionCode::PaAuthenticationTag => 6,
            OptionCode::EapPayload => 7,
            OptionCode::Prf => 8,
            OptionCode::MacAlgorithm => 9,
            OptionCode::SessionLifetime => 10,
            OptionCode::ReceivedPak => 11,
            OptionCode::IdIndicator => 12,
            OptionCode::Description => 128,
            OptionCode::Prefix64 => 129,
            OptionCode::PortSet => 130,
            OptionCode::CheckpointRequired => 192,
            OptionCode::Unknown(v) => v,
        }
    }
}

impl OptionCode {
    /// Codes 0–127 are mandatory to process; 128–255 optional (RFC 6887 §7.3).
    pub fn is_mandatory(self) -> bool {
        u8::from(self) < 128
    }

    /// Whether this crate knows the option.
    pub fn is_known(self) -> bool {
        !matches!(self, OptionCode::Unknown(_))
    }

    /// Whether this is one of the RFC 7652 authentication options (codes 4–12).
    pub fn is_authentication(self) -> bool {
        (4..=12).contains(&u8::from(self))
    }

    /// The RFC's upper-case name.
    pub fn name(self) -> &'static str {
        match self {
            OptionCode::ThirdParty => "THIRD_PARTY",
            OptionCode::PreferFailure => "PREFER_FAILURE",
            OptionCode::Filter => "FILTER",
            OptionCode::Nonce => "NONCE",
            OptionCode::AuthenticationTag => "AUTHENTICATION_TAG",
            OptionCode::PaAuthenticationTag => "PA_AUTHENTICATION_TAG",
            OptionCode::EapPayload => "EAP_PAYLOAD",
            OptionCode::Prf => "PRF",
            OptionCode::MacAlgorithm => "MAC_ALGORITHM",
            OptionCode::SessionLifetime => "SESSION_LIFETIME",
            OptionCode::ReceivedPak => "RECEIVED_PAK",
            OptionCode::IdIndicator => "ID_INDICATOR",
            OptionCode::Description => "DESCRIPTION",
            OptionCode::Prefix64 => "PREFIX64",
            OptionCode::PortSet => "PORT_SET",
            OptionCode::CheckpointRequired => "CHECKPOINT_REQUIRED",
            OptionCode::Unknown(_) => "UNKNOWN",
        }
    }

    /// What the RFCs allow for this option; `None` for codes the parsing end does not
    /// implement (unknown codes, and the RFC 7652 ones when authentication is off).
    fn rule(self, ext: Extensions) -> Option<Rule> {
        use LenRule::*;
        const ANNOUNCE: u8 = 1 << 0;
        const MAP: u8 = 1 << 1;
        const PEER: u8 = 1 << 2;
        const AUTH: u8 = 1 << 3;
        const ANY: u8 = 0b1111;
        if self.is_authentication() && !ext.authentication {
            return None;
        }
        // RFC 7652 §7 (IANA registrations) gives opcodes, lengths and occurrences of
        // options 4–12; §6.1 puts the tags at the end of the message.
        let (len, opcodes, once) = match self {
            OptionCode::ThirdParty => (Exact(16), MAP | PEER, true),
            OptionCode::PreferFailure => (Exact(0), MAP, true),
            OptionCode::Filter => (Exact(20), MAP, false),
            OptionCode::Nonce | OptionCode::ReceivedPak | OptionCode::SessionLifetime => {
                (Exact(4), AUTH, true)
            }
            OptionCode::Prf | OptionCode::MacAlgorithm => (Exact(4), AUTH, false),
            OptionCode::AuthenticationTag => {
                (Min(AUTHENTICATION_TAG_MIN_LEN), MAP | PEER | ANNOUNCE, true)
            }
            OptionCode::PaAuthenticationTag => (Min(PA_AUTHENTICATION_TAG_MIN_LEN), AUTH, true),
            OptionCode::EapPayload => (Min(EAP_HEADER_LEN), AUTH, true),
            OptionCode::IdIndicator => (Any, AUTH, true),
            OptionCode::Description => (Any, MAP | PEER, true),
            OptionCode::Prefix64 => (Min(PREFIX64_MIN_LEN), ANY, false),
            OptionCode::PortSet => (Exact(PORT_SET_LEN), MAP, true),
            OptionCode::CheckpointRequired => (Exact(0), MAP | PEER, true),
            OptionCode::Unknown(_) => return None,
        };
        let response_only = matches!(self, OptionCode::SessionLifetime | OptionCode::IdIndicator);
        let last = matches!(
            self,
            OptionCode::AuthenticationTag | OptionCode::PaAuthenticationTag
        );
        Some(Rule {
            len,
            opcodes,
            once,
            response_only,
            last,
        })
    }
}

impl std::fmt::Display for OptionCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}({})", self.name(), u8::from(*self))
    }
}

#[derive(Debug, Clone, Copy)]
enum LenRule {
    Exact(u16),
    Min(u16),
    Any,
}

#[derive(Debug, Clone, Copy)]
struct Rule {
    len: LenRule,
    /// Bit `n` set: allowed with opcode `n`.
    opcodes: u8,
    once: bool,
    /// "May appear in: Response" only (RFC 7652 SESSION_LIFETIME, ID_INDICATOR).
    response_only: bool,
    /// Must be the last option (the RFC 7652 tags, which cover everything before them).
    last: bool,
}

impl Rule {
    fn allows_opcode(&self, opcode: Opcode) -> bool {
        let bit = opcode.to_bits();
        bit < 8 && self.opcodes & (1 << bit) != 0
    }

    fn allows_len(&self, len: u16) -> bool {
        match self.len {
            LenRule::Exact(n) => len == n,
            LenRule::Min(n) => len >= n,
            LenRule::Any => true,
        }
    }
}

/// Smallest AUTHENTICATION_TAG data: Session ID, Sequence Number and Key ID (RFC 7652
/// §5.4: the Option-Length counts this "12-octet fixed-length header" and the MAC).
pub const AUTHENTICATION_TAG_MIN_LEN: u16 = 12;
/// Smallest PA_AUTHENTICATION_TAG data: the Key ID (RFC 7652 §5.5).
pub const PA_AUTHENTICATION_TAG_MIN_LEN: u16 = 4;
/// An EAP packet has at least its 4-octet header (RFC 3748 §4): code, identifier, length.
const EAP_HEADER_LEN: u16 = 4;
/// Data length of FILTER.
const FILTER_LEN: u16 = 20;
/// Data length of PORT_SET.
const PORT_SET_LEN: u16 = 5;
/// Smallest PREFIX64 data (RFC 7225 §4): Prefix64-Length (16 bits) then the 12 octets
/// of Prefix64 and Suffix; an IPv4 prefix list may follow.
const PREFIX64_MIN_LEN: u16 = 14;
/// Largest Prefix64-Length, in octets (a /96).
const PREFIX64_MAX_PREFIX: u16 = 12;

/// FILTER option data (RFC 6887 §13.3): permit traffic only from this remote prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Filter {
    /// Significant bits of `remote_addr`: 0–128 for IPv6, 96–128 for IPv4 (whose
    /// IPv4-mapped form carries 96 fixed bits). 0 means "remove all filters".
    pub prefix_len: u8,
    /// Remote peer port; 0 means all ports.
    pub remote_port: u16,
    /// Remote peer address.
    pub remote_addr: IpAddr,
}

/// PORT_SET option data (RFC 7753 §4): ask for a contiguous set of ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortSet {
    /// Number of ports requested or assigned (never 0).
    pub size: u16,
    /// First internal port of the set.
    pub first_internal_port: u16,
    /// Parity preservation requested (P bit).
    pub parity: bool,
}

/// AUTHENTICATION_TAG option data (RFC 7652 §5.4): the tag of a common PCP message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AuthenticationTag<'a> {
    /// PA session the message belongs to.
    pub session_id: u32,
    /// Sequence number of the common message (RFC 7652 §6.5).
    pub sequence_number: u32,
    /// Transport key ID (0 when the MSK is used directly).
    pub key_id: u32,
    /// The MAC ("Authentication Data"); its length depends on the session's MAC
    /// algorithm, and the option's padding follows it.
    pub mac: &'a [u8],
}

/// PA_AUTHENTICATION_TAG option data (RFC 7652 §5.5): the tag of a PA message, whose
/// session ID and sequence number are in the AUTHENTICATION body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PaAuthenticationTag<'a> {
    /// Transport key ID (0 when the MSK is used directly).
    pub key_id: u32,
    /// The MAC ("Authentication Data").
    pub mac: &'a [u8],
}

/// One PCP option with its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PcpOption<'a> {
    /// THIRD_PARTY: the internal address the request is made for.
    ThirdParty(IpAddr),
    /// PREFER_FAILURE: give exactly the suggested external address/port or fail.
    PreferFailure,
    /// FILTER: a remote peer filter.
    Filter(Filter),
    /// NONCE (RFC 7652 §5.3): the client's random nonce of a PA session start.
    Nonce(u32),
    /// AUTHENTICATION_TAG (RFC 7652 §5.4): tag of a common (MAP, PEER, ANNOUNCE) message.
    AuthenticationTag(AuthenticationTag<'a>),
    /// PA_AUTHENTICATION_TAG (RFC 7652 §5.5): tag of a PA message.
    PaAuthenticationTag(PaAuthenticationTag<'a>),
    /// EAP_PAYLOAD (RFC 7652 §5.6): one EAP packet.
    EapPayload(&'a [u8]),
    /// PRF (RFC 7652 §5.7): an IKEv2 transform type 2 ID (5 = PRF_HMAC_SHA2_256).
    Prf(u32),
    /// MAC_ALGORITHM (RFC 7652 §5.8): an IKEv2 transform type 3 ID
    /// (12 = AUTH_HMAC_SHA2_256_128).
    MacAlgorithm(u32),
    /// SESSION_LIFETIME (RFC 7652 §5.9): PA session lifetime in seconds.
    SessionLifetime(u32),
    /// RECEIVED_PAK (RFC 7652 §5.10): sequence number of the PA message acknowledged.
    ReceivedPak(u32),
    /// ID_INDICATOR (RFC 7652 §5.11): the authority whose credentials to use.
    IdIndicator(&'a str),
    /// DESCRIPTION: UTF-8 text.
    Description(&'a str),
    /// PREFIX64 (RFC 7225): data kept raw — Prefix64-Length (16), 12 octets of prefix
    /// and suffix, then an optional IPv4 prefix list.
    Prefix64(&'a [u8]),
    /// PORT_SET.
    PortSet(PortSet),
    /// CHECKPOINT_REQUIRED (RFC 7767): protect this mapping against failover.
    CheckpointRequired,
    /// An option this crate does not know, kept as received.
    Unknown {
        /// The option code.
        code: u8,
        /// The option data.
        data: &'a [u8],
    },
}

impl<'a> PcpOption<'a> {
    /// The option code.
    pub fn code(&self) -> OptionCode {
        match self {
            PcpOption::ThirdParty(_) => OptionCode::ThirdParty,
            PcpOption::PreferFailure => OptionCode::PreferFailure,
            PcpOption::Filter(_) => OptionCode::Filter,
            PcpOption::Nonce(_) => OptionCode::Nonce,
            PcpOption::AuthenticationTag(_) => OptionCode::AuthenticationTag,
            PcpOption::PaAuthenticationTag(_) => OptionCode::PaAuthenticationTag,
            PcpOption::EapPayload(_) => OptionCode::EapPayload,
            PcpOption::Prf(_) => OptionCode::Prf,
            PcpOption::MacAlgorithm(_) => OptionCode::MacAlgorithm,
            PcpOption::SessionLifetime(_) => OptionCode::SessionLifetime,
            PcpOption::ReceivedPak(_) => OptionCode::ReceivedPak,
            PcpOption::IdIndicator(_) => OptionCode::IdIndicator,
            PcpOption::Description(_) => OptionCode::Description,
            PcpOption::Prefix64(_) => OptionCode::Prefix64,
            PcpOption::PortSet(_) => OptionCode::PortSet,
            PcpOption::CheckpointRequired => OptionCode::CheckpointRequired,
            PcpOption::Unknown { code, .. } => OptionCode::from(*code),
        }
    }

    /// Length of the data (without header or padding).
    pub fn data_len(&self) -> usize {
        match self {
            PcpOption::ThirdParty(_) => 16,
            PcpOption::PreferFailure | PcpOption::CheckpointRequired => 0,
            PcpOption::Filter(_) => usize::from(FILTER_LEN),
            PcpOption::PortSet(_) => usize::from(PORT_SET_LEN),
            PcpOption::Description(s) | PcpOption::IdIndicator(s) => s.len(),
            PcpOption::Nonce(_)
            | PcpOption::Prf(_)
            | PcpOption::MacAlgorithm(_)
            | PcpOption::SessionLifetime(_)
            | PcpOption::ReceivedPak(_) => 4,
            PcpOption::AuthenticationTag(t) => {
                usize::from(AUTHENTICATION_TAG_MIN_LEN) + t.mac.len()
            }
            PcpOption::PaAuthenticationTag(t) => {
                usize::from(PA_AUTHENTICATION_TAG_MIN_LEN) + t.mac.len()
            }
            PcpOption::EapPayload(data)
            | PcpOption::Prefix64(data)
            | PcpOption::Unknown { data, .. } => data.len(),
        }
    }

    /// Octets on the wire: header, data and padding.
    pub fn wire_len(&self) -> usize {
        OPTION_HEADER_LEN + padded(self.data_len())
    }

    /// Decodes one option's data. `data` excludes header and padding.
    fn decode(code: u8, data: &'a [u8]) -> Result<PcpOption<'a>, OptionError> {
        let code = OptionCode::from(code);
        Ok(match code {
            OptionCode::ThirdParty => PcpOption::ThirdParty(read_addr(data, 0)),
            OptionCode::PreferFailure => PcpOption::PreferFailure,
            OptionCode::Filter => {
                let remote_addr = read_addr(data, 4);
                let prefix_len = data[1];
                let valid = match remote_addr {
                    IpAddr::V4(_) => prefix_len == 0 || (96..=128).contains(&prefix_len),
                    IpAddr::V6(_) => prefix_len <= 128,
                };
                if !valid {
                    return Err(OptionError::InvalidField("prefix length"));
                }
                PcpOption::Filter(Filter {
                    prefix_len,
                    remote_port: read_u16(data, 2),
                    remote_addr,
                })
            }
            OptionCode::Description => PcpOption::Description(
                std::str::from_utf8(data).map_err(|_| OptionError::InvalidField("not UTF-8"))?,
            ),
            OptionCode::Prefix64 => {
                if read_u16(data, 0) > PREFIX64_MAX_PREFIX {
                    return Err(OptionError::InvalidField("Prefix64-Length"));
                }
                PcpOption::Prefix64(data)
            }
            OptionCode::PortSet if read_u16(data, 0) == 0 => {
                return Err(OptionError::InvalidField("port set size 0"));
            }
            OptionCode::PortSet => PcpOption::PortSet(PortSet {
                size: read_u16(data, 0),
                first_internal_port: read_u16(data, 2),
                parity: data[4] & 1 != 0,
            }),
            OptionCode::CheckpointRequired => PcpOption::CheckpointRequired,
            OptionCode::Nonce => PcpOption::Nonce(read_u32(data, 0)),
            OptionCode::Prf => PcpOption::Prf(read_u32(data, 0)),
            OptionCode::MacAlgorithm => PcpOption::MacAlgorithm(read_u32(data, 0)),
            OptionCode::SessionLifetime => PcpOption::SessionLifetime(read_u32(data, 0)),
            OptionCode::ReceivedPak => PcpOption::ReceivedPak(read_u32(data, 0)),
            OptionCode::AuthenticationTag => PcpOption::AuthenticationTag(AuthenticationTag {
                session_id: read_u32(data, tag::SESSION_ID),
                sequence_number: read_u32(data, tag::SEQUENCE),
                key_id: read_u32(data, tag::KEY_ID),
                mac: &data[tag::MAC..],
            }),
            OptionCode::PaAuthenticationTag => {
                PcpOption::PaAuthenticationTag(PaAuthenticationTag {
                    key_id: read_u32(data, pa_tag::KEY_ID),
                    mac: &data[pa_tag::MAC..],
                })
            }
            OptionCode::EapPayload => PcpOption::EapPayload(data),
            OptionCode::IdIndicator => PcpOption::IdIndicator(
                std::str::from_utf8(data).map_err(|_| OptionError::InvalidField("not UTF-8"))?,
            ),
            c => PcpOption::Unknown {
                code: c.into(),
                data,
            },
        })
    }

    /// Writes the option (header, data, zero padding) at the start of `buf`, which
    /// must hold [`PcpOption::wire_len`] octets.
    pub(crate) fn emit(&self, buf: &mut [u8]) -> Result<usize, EmitError> {
        let code = u8::from(self.code());
        let len = u16::try_from(self.data_len()).map_err(|_| EmitError::BadOption {
            code,
            reason: "data longer than 65535 octets",
        })?;
        let total = self.wire_len();
        buf[field::CODE] = code;
        buf[field::RESERVED] = 0;
        write_u16(buf, field::LENGTH, len);
        let data = &mut buf[field::DATA..total];
        data.fill(0);
        match self {
            PcpOption::ThirdParty(addr) => write_addr(data, 0, *addr),
            PcpOption::PreferFailure | PcpOption::CheckpointRequired => {}
            PcpOption::Filter(f) => {
                data[1] = f.prefix_len;
                write_u16(data, 2, f.remote_port);
                write_addr(data, 4, f.remote_addr);
            }
            PcpOption::PortSet(p) => {
                write_u16(data, 0, p.size);
                write_u16(data, 2, p.first_internal_port);
                data[4] = u8::from(p.parity);
            }
            PcpOption::Description(s) | PcpOption::IdIndicator(s) => {
                data[..s.len()].copy_from_slice(s.as_bytes())
            }
            PcpOption::Nonce(v)
            | PcpOption::Prf(v)
            | PcpOption::MacAlgorithm(v)
            | PcpOption::SessionLifetime(v)
            | PcpOption::ReceivedPak(v) => write_u32(data, 0, *v),
            PcpOption::AuthenticationTag(t) => {
                write_u32(data, tag::SESSION_ID, t.session_id);
                write_u32(data, tag::SEQUENCE, t.sequence_number);
                write_u32(data, tag::KEY_ID, t.key_id);
                data[tag::MAC..tag::MAC + t.mac.len()].copy_from_slice(t.mac);
            }
            PcpOption::PaAuthenticationTag(t) => {
                write_u32(data, pa_tag::KEY_ID, t.key_id);
                data[pa_tag::MAC..pa_tag::MAC + t.mac.len()].copy_from_slice(t.mac);
            }
            PcpOption::EapPayload(d)
            | PcpOption::Prefix64(d)
            | PcpOption::Unknown { data: d, .. } => data[..d.len()].copy_from_slice(d),
        }
        Ok(total)
    }
}

fn padded(len: usize) -> usize {
    (len + 3) & !3
}

/// A zero-copy view of one option at the start of a buffer.
#[derive(Debug, Clone, Copy)]
pub struct OptionView<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> OptionView<T> {
    /// Wraps a buffer that holds at least the option header and its padded data.
    pub fn new_checked(buffer: T) -> Result<Self, OptionError> {
        let b = buffer.as_ref();
        if b.len() < OPTION_HEADER_LEN {
            return Err(OptionError::HeaderTruncated);
        }
        let len = read_u16(b, field::LENGTH);
        if b.len() - OPTION_HEADER_LEN < padded(usize::from(len)) {
            return Err(OptionError::Overrun { len });
        }
        Ok(OptionView { buffer })
    }
    /// Option code.
    pub fn code(&self) -> u8 {
        self.buffer.as_ref()[field::CODE]
    }
    /// Data length, excluding padding.
    pub fn data_len(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::LENGTH)
    }
    /// The option's data, excluding padding.
    pub fn data(&self) -> &[u8] {
        &self.buffer.as_ref()[field::DATA..field::DATA + usize::from(self.data_len())]
    }
    /// Octets the option takes, header and padding included.
    pub fn wire_len(&self) -> usize {
        OPTION_HEADER_LEN + padded(usize::from(self.data_len()))
    }
}

/// Which end is parsing: a server is strict about unknown mandatory options in
/// requests; a client keeps whatever a response carries that it can frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    Request,
    Response,
}

/// An ordered list of options: either validated wire bytes (after parsing) or a slice
/// of [`PcpOption`]s (to emit). Comparing two lists compares their options in order.
#[derive(Clone, Copy)]
pub struct Options<'a>(Store<'a>);

impl std::fmt::Debug for Options<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[derive(Debug, Clone, Copy)]
enum Store<'a> {
    Wire(&'a [u8]),
    List(&'a [PcpOption<'a>]),
}

impl<'a> Options<'a> {
    /// No options.
    pub const EMPTY: Options<'static> = Options(Store::List(&[]));

    /// Options to emit, in this order.
    pub const fn from_list(list: &'a [PcpOption<'a>]) -> Options<'a> {
        Options(Store::List(list))
    }

    /// Iterates the options in order.
    pub fn iter(&self) -> OptionIter<'a> {
        match self.0 {
            Store::Wire(bytes) => OptionIter::Wire(bytes),
            Store::List(list) => OptionIter::List(list.iter()),
        }
    }

    /// Whether there are no options.
    pub fn is_empty(&self) -> bool {
        match self.0 {
            Store::Wire(b) => b.is_empty(),
            Store::List(l) => l.is_empty(),
        }
    }

    /// Number of options.
    pub fn len(&self) -> usize {
        self.iter().count()
    }

    /// Octets the options take on the wire.
    pub fn wire_len(&self) -> usize {
        match self.0 {
            Store::Wire(b) => b.len(),
            Store::List(l) => l.iter().map(PcpOption::wire_len).sum(),
        }
    }

    /// Whether an option with this code is present.
    pub fn contains(&self, code: OptionCode) -> bool {
        self.iter().any(|o| o.code() == code)
    }

    /// Whether CHECKPOINT_REQUIRED (192) is present.
    pub fn checkpoint_required(&self) -> bool {
        self.contains(OptionCode::CheckpointRequired)
    }

    /// Whether PREFER_FAILURE is present.
    pub fn prefer_failure(&self) -> bool {
        self.contains(OptionCode::PreferFailure)
    }

    /// The THIRD_PARTY internal address, if present.
    pub fn third_party(&self) -> Option<IpAddr> {
        self.iter().find_map(|o| match o {
            PcpOption::ThirdParty(a) => Some(a),
            _ => None,
        })
    }

    /// The DESCRIPTION text, if present.
    pub fn description(&self) -> Option<&'a str> {
        self.iter().find_map(|o| match o {
            PcpOption::Description(d) => Some(d),
            _ => None,
        })
    }

    /// The PORT_SET request, if present.
    pub fn port_set(&self) -> Option<PortSet> {
        self.iter().find_map(|o| match o {
            PcpOption::PortSet(p) => Some(p),
            _ => None,
        })
    }

    /// The NONCE, if present.
    pub fn nonce(&self) -> Option<u32> {
        self.iter().find_map(|o| match o {
            PcpOption::Nonce(n) => Some(n),
            _ => None,
        })
    }

    /// The AUTHENTICATION_TAG, if present.
    pub fn authentication_tag(&self) -> Option<AuthenticationTag<'a>> {
        self.iter().find_map(|o| match o {
            PcpOption::AuthenticationTag(t) => Some(t),
            _ => None,
        })
    }

    /// The PA_AUTHENTICATION_TAG, if present.
    pub fn pa_authentication_tag(&self) -> Option<PaAuthenticationTag<'a>> {
        self.iter().find_map(|o| match o {
            PcpOption::PaAuthenticationTag(t) => Some(t),
            _ => None,
        })
    }

    /// The EAP_PAYLOAD, if present.
    pub fn eap_payload(&self) -> Option<&'a [u8]> {
        self.iter().find_map(|o| match o {
            PcpOption::EapPayload(p) => Some(p),
            _ => None,
        })
    }

    /// Every PRF transform ID, in order.
    pub fn prfs(&self) -> impl Iterator<Item = u32> + 'a {
        self.iter().filter_map(|o| match o {
            PcpOption::Prf(v) => Some(v),
            _ => None,
        })
    }

    /// Every MAC_ALGORITHM transform ID, in order.
    pub fn mac_algorithms(&self) -> impl Iterator<Item = u32> + 'a {
        self.iter().filter_map(|o| match o {
            PcpOption::MacAlgorithm(v) => Some(v),
            _ => None,
        })
    }

    /// The SESSION_LIFETIME in seconds, if present.
    pub fn session_lifetime(&self) -> Option<u32> {
        self.iter().find_map(|o| match o {
            PcpOption::SessionLifetime(v) => Some(v),
            _ => None,
        })
    }

    /// The RECEIVED_PAK sequence number, if present.
    pub fn received_pak(&self) -> Option<u32> {
        self.iter().find_map(|o| match o {
            PcpOption::ReceivedPak(v) => Some(v),
            _ => None,
        })
    }

    /// The ID_INDICATOR, if present.
    pub fn id_indicator(&self) -> Option<&'a str> {
        self.iter().find_map(|o| match o {
            PcpOption::IdIndicator(s) => Some(s),
            _ => None,
        })
    }

    /// Every FILTER, in order.
    pub fn filters(&self) -> impl Iterator<Item = Filter> + 'a {
        self.iter().filter_map(|o| match o {
            PcpOption::Filter(f) => Some(f),
            _ => None,
        })
    }

    /// Writes the options at the start of `buf` (which must hold [`Options::wire_len`]).
    pub(crate) fn emit(&self, buf: &mut [u8]) -> Result<usize, EmitError> {
        match self.0 {
            Store::Wire(b) => {
                buf[..b.len()].copy_from_slice(b);
                Ok(b.len())
            }
            Store::List(list) => {
                let mut at = 0;
                for o in list {
                    at += o.emit(&mut buf[at..])?;
                }
                Ok(at)
            }
        }
    }
}

impl PartialEq for Options<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for Options<'_> {}

impl Default for Options<'_> {
    fn default() -> Self {
        Options(Store::List(&[]))
    }
}

impl<'a> IntoIterator for Options<'a> {
    type Item = PcpOption<'a>;
    type IntoIter = OptionIter<'a>;
    fn into_iter(self) -> OptionIter<'a> {
        self.iter()
    }
}

/// Iterator over [`Options`].
#[derive(Debug, Clone)]
pub enum OptionIter<'a> {
    /// Over validated wire bytes.
    #[doc(hidden)]
    Wire(&'a [u8]),
    /// Over a list.
    #[doc(hidden)]
    List(std::slice::Iter<'a, PcpOption<'a>>),
}

impl<'a> Iterator for OptionIter<'a> {
    type Item = PcpOption<'a>;
    fn next(&mut self) -> Option<PcpOption<'a>> {
        match self {
            OptionIter::List(it) => it.next().copied(),
            OptionIter::Wire(rest) => {
                // The bytes were validated when the Options were built, so framing and
                // decoding succeed; a failure would only end the iteration early.
                let view = OptionView::new_checked(*rest).ok()?;
                let (this, tail) = rest.split_at(view.wire_len());
                *rest = tail;
                let data = &this[field::DATA..field::DATA + usize::from(view.data_len())];
                PcpOption::decode(view.code(), data).ok()
            }
        }
    }
}

/// Protocol extensions the parsing end implements beyond RFC 6887 and the options this
/// crate always knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Extensions {
    /// RFC 7652 authentication: the AUTHENTICATION opcode and options 4–12. When off,
    /// the opcode is unsupported (UNSUPP_OPCODE) and the options are unknown
    /// mandatory-to-process options (UNSUPP_OPTION) whatever their contents, as from
    /// any server that does not implement RFC 7652.
    pub authentication: bool,
}

impl Extensions {
    /// Everything this crate can parse.
    pub const ALL: Extensions = Extensions {
        authentication: true,
    };
    /// RFC 6887 and the non-authentication options only.
    pub const BASE: Extensions = Extensions {
        authentication: false,
    };
}

impl Default for Extensions {
    fn default() -> Self {
        Extensions::ALL
    }
}

/// Validates the option area of a request (`bytes`, everything after the opcode body)
/// for `opcode` and returns it as [`Options`].
///
/// Checks framing, lengths, values, opcode applicability, direction, repetition and
/// placement (the RFC 7652 tags come last). An unknown option with a mandatory code is
/// UNSUPP_OPTION; an unknown optional one is kept (a server ignores it and does not
/// echo it).
pub fn validate_options(opcode: Opcode, bytes: &[u8]) -> Result<Options<'_>, ParseError> {
    validate(opcode, bytes, Direction::Request, Extensions::ALL)
}

pub(crate) fn validate(
    opcode: Opcode,
    bytes: &[u8],
    direction: Direction,
    ext: Extensions,
) -> Result<Options<'_>, ParseError> {
    let mut seen = [0u64; 4];
    let mut rest = bytes;
    while !rest.is_empty() {
        let code = rest[0];
        let fail = |reason| ParseError::MalformedOption { code, reason };
        let view = OptionView::new_checked(rest).map_err(fail)?;
        let data = view.data();
        let oc = OptionCode::from(code);
        match oc.rule(ext) {
            None if oc.is_mandatory() && direction == Direction::Request => {
                return Err(ParseError::UnsupportedOption { code });
            }
            None => {}
            Some(rule) => {
                if !rule.allows_opcode(opcode) {
                    return Err(fail(OptionError::NotAllowedForOpcode));
                }
                if rule.response_only && direction == Direction::Request {
                    return Err(fail(OptionError::ResponseOnly));
                }
                if rule.last && view.wire_len() != rest.len() {
                    return Err(fail(OptionError::NotLast));
                }
                if !rule.allows_len(view.data_len()) {
                    return Err(fail(OptionError::BadLength {
                        len: view.data_len(),
                    }));
                }
                let (word, bit) = (usize::from(code / 64), code % 64);
                if rule.once && seen[word] & (1 << bit) != 0 {
                    return Err(fail(OptionError::Repeated));
                }
                seen[word] |= 1 << bit;
                PcpOption::decode(code, data).map_err(fail)?;
            }
        }
        rest = &rest[view.wire_len()..];
    }
    Ok(Options(Store::Wire(bytes)))
}

// The MAP body length keeps option offsets 4-aligned; a change to it would break framing.
const _: () = assert!(MAP_LEN.is_multiple_of(4));
