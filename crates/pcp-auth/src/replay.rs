//! Sequence numbers of common PCP messages (RFC 7652 §6.5) and when the sequence space
//! calls for re-authentication (§3.4).

/// When an outgoing sequence number reaches this, the sender MUST re-authenticate
/// (RFC 7652 §3.4: 2^32 − 2^16).
pub const REAUTH_THRESHOLD: u32 = u32::MAX - 0xffff;

/// What [`ReplayWindow::check`] makes of an incoming sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqVerdict {
    /// Newer than anything accepted: accept (after the MAC verifies).
    New,
    /// The last accepted number again with the same MAC, i.e. the very same message: a
    /// retransmission of a request whose answer was lost. Accept; the caller answers it.
    Retransmission,
    /// Older, or the last number with a different MAC: silently discard.
    Replay,
}

/// The incoming side of RFC 7652 §6.5: a message is refused when its sequence number is
/// smaller than the next one expected.
///
/// The RFC stores the last accepted number and refuses only smaller ones, which would
/// let anyone replay the last message forever. Here the last number is accepted again
/// only for the bitwise-identical message (same MAC, and the MAC covers the whole
/// message), which is what a client's retransmission is (docs/AUTH.md).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayWindow {
    last: Option<(u32, [u8; 16])>,
}

impl ReplayWindow {
    /// A window that has accepted nothing yet (sequence numbers start at 0).
    pub fn new() -> ReplayWindow {
        ReplayWindow::default()
    }

    /// Classifies `seq` carried with `mac`, without changing anything.
    pub fn check(&self, seq: u32, mac: &[u8]) -> SeqVerdict {
        match self.last {
            None => SeqVerdict::New,
            Some((last, _)) if seq > last => SeqVerdict::New,
            Some((last, m)) if seq == last && m[..] == *mac => SeqVerdict::Retransmission,
            Some(_) => SeqVerdict::Replay,
        }
    }

    /// Records an accepted message: call only after its MAC verified.
    pub fn accept(&mut self, seq: u32, mac: &[u8]) {
        let mut m = [0; 16];
        let n = mac.len().min(16);
        m[..n].copy_from_slice(&mac[..n]);
        self.last = Some((seq, m));
    }

    /// The last accepted sequence number.
    pub fn last(&self) -> Option<u32> {
        self.last.map(|(s, _)| s)
    }

    /// The last accepted sequence number with its MAC: all the window holds, for a
    /// successor to carry on from ([`ReplayWindow::resume`]).
    pub fn state(&self) -> Option<(u32, [u8; 16])> {
        self.last
    }

    /// A window that has accepted `last` (sequence number and MAC) and nothing after.
    pub fn resume(last: Option<(u32, [u8; 16])>) -> ReplayWindow {
        ReplayWindow { last }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_accepted_older_and_altered_refused_identical_is_retransmission() {
        let mut w = ReplayWindow::new();
        assert_eq!(w.check(0, &[1; 16]), SeqVerdict::New);
        w.accept(0, &[1; 16]);
        assert_eq!(w.check(0, &[1; 16]), SeqVerdict::Retransmission);
        assert_eq!(w.check(0, &[2; 16]), SeqVerdict::Replay);
        assert_eq!(w.check(5, &[2; 16]), SeqVerdict::New);
        w.accept(5, &[2; 16]);
        // A gap is fine (a client gave up on a request), going back is not.
        assert_eq!(w.check(3, &[3; 16]), SeqVerdict::Replay);
        assert_eq!(w.check(0, &[1; 16]), SeqVerdict::Replay);
        assert_eq!(w.check(u32::MAX, &[3; 16]), SeqVerdict::New);
        assert_eq!(w.last(), Some(5));
    }
}
