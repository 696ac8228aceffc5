//! Time as the core sees it: milliseconds on a monotonic clock whose origin the shell
//! picks. The core never reads a clock; simulations pass whatever they like.

use std::time::Duration;

/// A point in time, in milliseconds since an origin chosen by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Time(pub u64);

impl Time {
    /// Milliseconds since the origin.
    pub fn as_millis(self) -> u64 {
        self.0
    }

    /// Whole seconds since the origin.
    pub fn as_secs(self) -> u64 {
        self.0 / 1000
    }

    /// `self + secs` seconds.
    pub fn plus_secs(self, secs: u32) -> Time {
        Time(self.0.saturating_add(u64::from(secs) * 1000))
    }

    /// `self + d`.
    pub fn plus(self, d: Duration) -> Time {
        Time(self.0.saturating_add(d.as_millis() as u64))
    }

    /// Time from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Time) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }

    /// Whole seconds from `self` until `later`, rounded up, zero if past.
    pub fn secs_until(self, later: Time) -> u32 {
        let ms = later.0.saturating_sub(self.0);
        u32::try_from(ms.div_ceil(1000)).unwrap_or(u32::MAX)
    }
}
