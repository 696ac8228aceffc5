//! What both ends of a PA session share: building PA messages, the PA sequence numbers
//! (RFC 7652 §6.4), the last incoming and outgoing message for duplicates, and the one
//! outstanding message's retransmission (§6.3).

use std::net::IpAddr;
use std::time::Duration;

use pcp_proto::{
    AuthenticationBody, Body, MAX_MESSAGE_LEN, Options, PcpOption, Request, Response, ResultCode,
};

use crate::crypto::TransportKey;
use crate::retransmit::Retransmit;
use crate::{Time, tag};

/// Smallest gap between two answers to duplicates of the same message (RFC 7652 §6.3:
/// "The rate of replying to duplicate PA messages MUST be limited").
pub(crate) const DUPLICATE_REPLY_GAP: Duration = Duration::from_millis(500);

/// Header fields that differ between a PA-Client (request) and a PA-Server (response).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Side {
    /// A PA-Client message from this PCP client address.
    Client(IpAddr),
    /// A PA-Server message with this epoch.
    Server(u32),
}

/// Builds one PA message, tagged with `key` when given. `None` when it cannot be
/// emitted (more than 1100 octets).
pub(crate) fn build(
    side: Side,
    rc: ResultCode,
    session_id: u32,
    sequence_number: u32,
    options: &[PcpOption<'_>],
    key: Option<&TransportKey>,
) -> Option<Vec<u8>> {
    let body = Body::Authentication(AuthenticationBody {
        session_id,
        sequence_number,
    });
    let mut buf = vec![0u8; MAX_MESSAGE_LEN];
    // RFC 7652 §5.1: the lifetime of PA messages is zero on transmission.
    let n = match side {
        Side::Client(client_addr) => Request {
            lifetime: 0,
            client_addr,
            body,
            options: Options::from_list(options),
            pa_result_code: rc,
        }
        .emit(&mut buf),
        Side::Server(epoch) => Response {
            result_code: rc,
            lifetime: 0,
            epoch,
            body,
            options: Options::from_list(options),
        }
        .emit(&mut buf),
    }
    .ok()?;
    let n = match key {
        Some(k) => tag::seal(&mut buf, n, k, (session_id, sequence_number)).ok()?,
        None => n,
    };
    buf.truncate(n);
    Some(buf)
}

/// One end's view of the PA message stream of a session.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    /// Next outgoing PA sequence number.
    pub out_seq: u32,
    /// Next incoming PA sequence number expected.
    pub in_seq: u32,
    /// The last PA message accepted from the partner, as received.
    pub last_in: Option<Vec<u8>>,
    /// The last PA message sent (what a duplicate of `last_in` is answered with).
    pub last_out: Option<Vec<u8>>,
    /// The outstanding message's retransmission, while an answer is awaited.
    pub retransmit: Option<Retransmit>,
    last_dup_reply: Option<Time>,
    /// `last_out` was sent after `last_in` arrived, so it may answer its copies. The
    /// last message of an exchange (a confirmation, a termination answer) gets no
    /// answer, and answering its copies with what preceded it makes two ends bounce
    /// those two messages for ever (review S3, docs/AUTH.md).
    answered: bool,
}

impl Link {
    pub fn new(out_seq: u32, in_seq: u32) -> Link {
        Link {
            out_seq,
            in_seq,
            last_in: None,
            last_out: None,
            retransmit: None,
            last_dup_reply: None,
            answered: false,
        }
    }

    /// Whether `datagram` is the last accepted message again (RFC 7652 §6.3: answer it
    /// with the last outgoing message). Returns the answer when the rate limit allows
    /// and our last message was sent after it arrived (an answer to it).
    pub fn duplicate(&mut self, datagram: &[u8], now: Time) -> Option<Option<Vec<u8>>> {
        let allowed = self.duplicate_allowed(datagram, now)?;
        Some(self.answer().filter(|_| allowed))
    }

    /// Whether `datagram` is the last accepted message again and, if so, whether the
    /// rate limit lets us answer this copy (RFC 7652 §6.3 "MUST be limited"); an
    /// allowed answer counts against the limit.
    pub fn duplicate_allowed(&mut self, datagram: &[u8], now: Time) -> Option<bool> {
        if self.last_in.as_deref() != Some(datagram) {
            return None;
        }
        let allowed = self
            .last_dup_reply
            .is_none_or(|t| now.saturating_since(t) >= DUPLICATE_REPLY_GAP);
        if allowed {
            self.last_dup_reply = Some(now);
        }
        Some(allowed)
    }

    /// What answers a copy of `last_in`: `last_out` if it was sent after `last_in`
    /// arrived, nothing otherwise.
    pub fn answer(&self) -> Option<Vec<u8>> {
        self.last_out.clone().filter(|_| self.answered)
    }

    /// Undoes the last [`Link::accepted`]: its message was not taken on after all, so
    /// a copy of it is taken as new rather than as a duplicate.
    pub fn unaccept(&mut self) {
        self.in_seq = self.in_seq.wrapping_sub(1);
        self.last_in = None;
        self.last_dup_reply = None;
        self.answered = false;
    }

    /// Records an accepted incoming message (not a PA-Acknowledgement).
    pub fn accepted(&mut self, datagram: &[u8]) {
        self.in_seq = self.in_seq.wrapping_add(1);
        self.last_in = Some(datagram.to_vec());
        self.last_dup_reply = None;
        self.answered = false;
        // Whatever we sent has been answered.
        self.retransmit = None;
    }

    /// Takes the next outgoing sequence number.
    pub fn next_out(&mut self) -> u32 {
        let s = self.out_seq;
        self.out_seq = self.out_seq.wrapping_add(1);
        s
    }

    /// Records a sent message; `awaiting` starts its retransmission.
    pub fn sent(&mut self, msg: Vec<u8>, retransmit: Option<Retransmit>) {
        self.last_out = Some(msg);
        self.answered = true;
        self.retransmit = retransmit;
    }
}
