//! When to send unsolicited ANNOUNCE after state loss (RFC 6887 §14.1.1): a burst of
//! copies at doubling intervals from 250 ms.

use std::time::Duration;

use crate::time::Time;

/// Copies sent after a state loss.
pub const ANNOUNCE_COUNT: u32 = 10;
/// Gap before the second copy; each later gap doubles.
pub const ANNOUNCE_FIRST_GAP: Duration = Duration::from_millis(250);

/// A burst of ANNOUNCE copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnnounceSchedule {
    next: Time,
    gap: Duration,
    left: u32,
}

impl AnnounceSchedule {
    /// A burst starting at `now`.
    pub fn start(now: Time) -> Self {
        AnnounceSchedule {
            next: now,
            gap: ANNOUNCE_FIRST_GAP,
            left: ANNOUNCE_COUNT,
        }
    }

    /// When the next copy is due, if any is left.
    pub fn next_due(&self) -> Option<Time> {
        (self.left > 0).then_some(self.next)
    }

    /// Whether a copy is due at `now`; if so it counts as sent.
    pub fn poll(&mut self, now: Time) -> bool {
        if self.left == 0 || now < self.next {
            return false;
        }
        self.left -= 1;
        self.next = now.plus(self.gap);
        self.gap *= 2;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_copies_doubling() {
        let mut s = AnnounceSchedule::start(Time(0));
        let mut sent = vec![];
        let mut t = Time(0);
        while let Some(due) = s.next_due() {
            t = t.max(due);
            assert!(s.poll(t));
            sent.push(t.0);
        }
        assert_eq!(sent.len(), 10);
        assert_eq!(&sent[..4], &[0, 250, 750, 1750]);
        assert!(!s.poll(Time(u64::MAX)));
    }
}
