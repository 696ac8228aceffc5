//! Time as the session layer sees it: milliseconds on a monotonic clock whose origin the
//! caller picks. Nothing here reads a clock.

use std::time::Duration;

/// A point in time, in milliseconds since an origin chosen by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Time(pub u64);

impl Time {
    /// `self + d`.
    pub fn plus(self, d: Duration) -> Time {
        Time(
            self.0
                .saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        )
    }

    /// `self + secs` seconds.
    pub fn plus_secs(self, secs: u32) -> Time {
        Time(self.0.saturating_add(u64::from(secs) * 1000))
    }

    /// Time elapsed since `earlier` (zero if `earlier` is later).
    pub fn saturating_since(self, earlier: Time) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}
