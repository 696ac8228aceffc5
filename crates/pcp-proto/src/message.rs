//! Whole PCP requests and responses: header + opcode body + options.

use std::net::IpAddr;

use crate::body::Body;
use crate::error::{EmitError, Malformed, ParseError};
use crate::header::{Packet, field};
use crate::option::{Direction, Extensions, Options, validate};
use crate::{HEADER_LEN, MAX_MESSAGE_LEN, Opcode, ResultCode, VERSION};

/// A PCP request (RFC 6887 §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    /// Requested lifetime in seconds (0 deletes).
    pub lifetime: u32,
    /// The PCP client's IP address as the client sees it.
    pub client_addr: IpAddr,
    /// Opcode-specific information; it determines the opcode.
    pub body: Body,
    /// Options, in order.
    pub options: Options<'a>,
    /// For AUTHENTICATION only: the result code an RFC 7652 PA-Client message carries
    /// in the header's reserved octet. Other opcodes emit the octet as zero and parse
    /// it as `Success`.
    pub pa_result_code: ResultCode,
}

/// A PCP response (RFC 6887 §7.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response<'a> {
    /// Result code.
    pub result_code: ResultCode,
    /// Granted lifetime (success) or how long the error holds (error), in seconds.
    pub lifetime: u32,
    /// The server's epoch time for this client.
    pub epoch: u32,
    /// Opcode-specific information; it determines the opcode.
    pub body: Body,
    /// Options, in order.
    pub options: Options<'a>,
}

/// Checks length (≥ 2 readable, then direction and version, then 24..=1100, multiple of 4)
/// in the order RFC 6887 §8.3 processes them.
fn check_frame(buf: &[u8], want_response: bool) -> Result<Packet<&[u8]>, ParseError> {
    if buf.len() < 2 {
        return Err(ParseError::TooShort { len: buf.len() });
    }
    let is_response = buf[field::R_OPCODE] & 0x80 != 0;
    if is_response != want_response {
        return Err(ParseError::WrongDirection { is_response });
    }
    if buf[field::VERSION] != VERSION {
        return Err(ParseError::UnsupportedVersion(buf[field::VERSION]));
    }
    let len = buf.len();
    let malformed = if len < HEADER_LEN {
        Some(Malformed::ShorterThanHeader { len })
    } else if len > MAX_MESSAGE_LEN {
        Some(Malformed::TooLong { len })
    } else if !len.is_multiple_of(4) {
        Some(Malformed::NotMultipleOf4 { len })
    } else {
        None
    };
    match malformed {
        Some(m) => Err(ParseError::Malformed(m)),
        None => Ok(Packet::new_unchecked(buf)),
    }
}

/// Parses the opcode body and validates the options after it.
fn parse_body_and_options<'a>(
    packet: Packet<&'a [u8]>,
    direction: Direction,
    ext: Extensions,
) -> Result<(Body, Options<'a>), ParseError> {
    let opcode = packet.opcode();
    let payload = packet.into_inner();
    let payload = &payload[HEADER_LEN..];
    let body = Body::parse(opcode, payload, ext)?;
    let options = validate(opcode, &payload[body.wire_len()..], direction, ext)?;
    Ok((body, options))
}

impl<'a> Request<'a> {
    /// Parses and validates a request with every extension this crate knows
    /// ([`Extensions::ALL`]). See [`ParseError`] for the answer each failure calls for.
    pub fn parse(buf: &'a [u8]) -> Result<Request<'a>, ParseError> {
        Request::parse_with(buf, Extensions::ALL)
    }

    /// Parses and validates a request as a server implementing `ext` must: what it
    /// does not implement is unsupported (UNSUPP_OPCODE, UNSUPP_OPTION) before any
    /// check of its contents.
    pub fn parse_with(buf: &'a [u8], ext: Extensions) -> Result<Request<'a>, ParseError> {
        let packet = check_frame(buf, false)?;
        let (body, options) = parse_body_and_options(packet, Direction::Request, ext)?;
        let pa_result_code = if packet.opcode() == Opcode::Authentication {
            packet.result_code()
        } else {
            ResultCode::Success
        };
        Ok(Request {
            lifetime: packet.lifetime(),
            client_addr: packet.client_addr(),
            body,
            options,
            pa_result_code,
        })
    }

    /// The opcode.
    pub fn opcode(&self) -> Opcode {
        self.body.opcode()
    }

    /// Octets [`Request::emit`] writes.
    pub fn buffer_len(&self) -> usize {
        HEADER_LEN + self.body.wire_len() + self.options.wire_len()
    }

    /// Writes the request at the start of `buf` and returns its length.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize, EmitError> {
        let result = if self.opcode() == Opcode::Authentication {
            self.pa_result_code
        } else {
            ResultCode::Success
        };
        emit_message(
            buf,
            false,
            result,
            self.lifetime,
            &self.body,
            self.options,
            |p| p.set_client_addr(self.client_addr),
        )
    }
}

impl<'a> Response<'a> {
    /// Parses a response. Unknown options, mandatory or not, are kept for the client to
    /// judge; framing, lengths and known-option rules are enforced.
    pub fn parse(buf: &'a [u8]) -> Result<Response<'a>, ParseError> {
        let packet = check_frame(buf, true)?;
        let (body, options) = parse_body_and_options(packet, Direction::Response, Extensions::ALL)?;
        Ok(Response {
            result_code: packet.result_code(),
            lifetime: packet.lifetime(),
            epoch: packet.epoch(),
            body,
            options,
        })
    }

    /// The opcode.
    pub fn opcode(&self) -> Opcode {
        self.body.opcode()
    }

    /// Octets [`Response::emit`] writes.
    pub fn buffer_len(&self) -> usize {
        HEADER_LEN + self.body.wire_len() + self.options.wire_len()
    }

    /// Writes the response at the start of `buf` and returns its length.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize, EmitError> {
        emit_message(
            buf,
            true,
            self.result_code,
            self.lifetime,
            &self.body,
            self.options,
            |p| p.set_epoch(self.epoch),
        )
    }
}

/// Writes the parts requests and responses share; `specific` fills octets 8–23.
fn emit_message(
    buf: &mut [u8],
    response: bool,
    result: ResultCode,
    lifetime: u32,
    body: &Body,
    options: Options<'_>,
    specific: impl FnOnce(&mut Packet<&mut [u8]>),
) -> Result<usize, EmitError> {
    let len = fit(HEADER_LEN + body.wire_len() + options.wire_len(), buf.len())?;
    let mut p = Packet::new_unchecked(&mut buf[..len]);
    p.set_version(VERSION);
    p.set_r_opcode(response, body.opcode());
    p.clear_reserved();
    p.set_result_code(result);
    p.set_lifetime(lifetime);
    specific(&mut p);
    let payload = p.payload_mut();
    body.emit(payload);
    options.emit(&mut payload[body.wire_len()..])?;
    Ok(len)
}

fn fit(need: usize, have: usize) -> Result<usize, EmitError> {
    if need > MAX_MESSAGE_LEN {
        Err(EmitError::TooLong { len: need })
    } else if need > have {
        Err(EmitError::BufferTooSmall { need, have })
    } else {
        Ok(need)
    }
}

/// Builds the error response for a request straight from the request's bytes
/// (RFC 6887 §8.3): the whole request is copied, at most 1100 octets, zero-padded to a
/// multiple of 4 (and to at least a header), so the opcode body and options come back
/// for the client to match; then the R bit, result code, lifetime and epoch are set and
/// the version is set to the one this server speaks (2).
///
/// The 96 bits after the epoch are zero when `parsed` (the request parsed and was then
/// refused); otherwise they keep the last 96 bits of the request's client address, as
/// RFC 6887 §7.2 asks for requests that could not be parsed.
///
/// Returns the response length. Requests under 2 octets or with the R bit set are
/// dropped silently and never reach here.
pub fn emit_error_response(
    request: &[u8],
    result: ResultCode,
    lifetime: u32,
    epoch: u32,
    parsed: bool,
    out: &mut [u8],
) -> Result<usize, EmitError> {
    let opcode = Opcode::from_bits(request.get(1).copied().unwrap_or(0));
    let copy = request.len().min(MAX_MESSAGE_LEN);
    let len = ((copy + 3) & !3).max(HEADER_LEN);
    if out.len() < len {
        return Err(EmitError::BufferTooSmall {
            need: len,
            have: out.len(),
        });
    }
    out[..copy].copy_from_slice(&request[..copy]);
    out[copy..len].fill(0);
    let mut p = Packet::new_unchecked(&mut out[..len]);
    p.set_version(VERSION);
    p.set_r_opcode(true, opcode);
    p.clear_reserved();
    p.set_result_code(result);
    p.set_lifetime(lifetime);
    if parsed {
        p.set_epoch(epoch);
    } else {
        p.set_epoch_only(epoch);
    }
    Ok(len)
}

/// Appends `option` after the PCP message in `buf[..len]` (request or response) and
/// returns the new length. RFC 7652 tags are added this way, last, to a message that is
/// otherwise complete.
pub fn append_option(
    buf: &mut [u8],
    len: usize,
    option: &crate::PcpOption<'_>,
) -> Result<usize, EmitError> {
    let end = fit(len + option.wire_len(), buf.len())?;
    option.emit(&mut buf[len..end])?;
    Ok(end)
}

/// Removes every option with `code` from the PCP message in `buf[..len]` (request or
/// response), in place, and returns the new length. A message that does not parse as
/// far as its options is returned unchanged.
///
/// A server uses it to turn a reply that echoed CHECKPOINT_REQUIRED into the same reply
/// without it, when the backup did not acknowledge in time.
pub fn remove_option(buf: &mut [u8], len: usize, code: crate::OptionCode) -> usize {
    let Some(msg) = buf.get(..len) else {
        return len;
    };
    let Some(packet) = Packet::new_checked(msg) else {
        return len;
    };
    let Some(body) = packet.opcode().body_len() else {
        return len;
    };
    let start = HEADER_LEN + body;
    // Only a whole, well-framed option area is edited.
    let mut at = start;
    while at < len {
        match crate::OptionView::new_checked(&buf[at..len]) {
            Ok(view) => at += view.wire_len(),
            Err(_) => return len,
        }
    }
    let mut at = start;
    let mut end = len;
    let code = u8::from(code);
    while at < end {
        let Ok(view) = crate::OptionView::new_checked(&buf[at..end]) else {
            return end;
        };
        let n = view.wire_len();
        if view.code() == code {
            buf.copy_within(at + n..end, at);
            end -= n;
        } else {
            at += n;
        }
    }
    end
}
