//! A token bucket for checkpoint rates.

use crate::time::Time;

/// Tokens refill at `rate` per second up to `burst`; each checkpoint takes one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenBucket {
    tokens: f64,
    updated: Time,
}

impl TokenBucket {
    /// A full bucket.
    pub fn full(burst: u32, now: Time) -> TokenBucket {
        TokenBucket {
            tokens: f64::from(burst),
            updated: now,
        }
    }

    fn refill(&mut self, rate: f64, burst: u32, now: Time) {
        let secs = now.since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + secs * rate).min(f64::from(burst));
        self.updated = self.updated.max(now);
    }

    /// Whether a token is there now (without taking it).
    pub fn available(&mut self, rate: f64, burst: u32, now: Time) -> bool {
        self.refill(rate, burst, now);
        self.tokens >= 1.0
    }

    /// Takes a token; the caller has checked [`TokenBucket::available`].
    pub fn take(&mut self) {
        self.tokens -= 1.0;
    }

    /// Gives back a token taken for a checkpoint that was taken back (never above
    /// the burst).
    pub fn refund(&mut self, burst: u32) {
        self.tokens = (self.tokens + 1.0).min(f64::from(burst));
    }

    /// Tokens left at `now` (for the admin API).
    pub fn tokens(&self, rate: f64, burst: u32, now: Time) -> f64 {
        let mut b = *self;
        b.refill(rate, burst, now);
        b.tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate() {
        let mut b = TokenBucket::full(2, Time(0));
        for _ in 0..2 {
            assert!(b.available(1.0, 2, Time(0)));
            b.take();
        }
        assert!(!b.available(1.0, 2, Time(999)));
        assert!(b.available(1.0, 2, Time(1000)));
        b.take();
        // Never more than the burst, however long idle.
        assert!((b.tokens(1.0, 2, Time(1_000_000)) - 2.0).abs() < 1e-9);
    }
}
