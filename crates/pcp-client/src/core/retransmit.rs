//! Request retransmission (RFC 6887 §8.1.1) and renewal timing (§11.2.1).
//!
//! Retransmission, until a first answer:
//!
//! ```text
//! RT = (1 + RAND) * IRT                    for the first transmission
//! RT = (1 + RAND) * MIN(2 * RTprev, MRT)   for each one after it
//! RAND uniform in [-0.1, +0.1]
//! ```
//!
//! MRC (transmissions at most, 0 = no limit) and MRD (time since the first
//! transmission, 0 = no limit) end the attempt; the last wait is cut short so that it
//! ends at MRD.
//!
//! Renewal of a granted mapping: attempt `k` (0, 1, 2, …) is sent at a uniformly random
//! point of `[1 - 1/2^(k+1), 1 - 1/2^(k+1) + 1/2^(k+3)]` of the lifetime (1/2–5/8, then
//! 3/4–3/4+1/16, then 7/8–7/8+1/32, …), never less than four seconds after the previous
//! attempt; none is sent at or after expiry.

use std::time::Duration;

use rand::Rng;
use rand::rngs::SmallRng;

use super::Time;

/// Retransmission parameters (RFC 6887 §8.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetransmitConfig {
    /// Initial retransmission time (IRT, default 3 s).
    pub irt: Duration,
    /// Maximum retransmission time (MRT, default 1024 s).
    pub mrt: Duration,
    /// Maximum number of transmissions (MRC); 0 means no limit (the default).
    pub mrc: u32,
    /// Maximum retransmission duration (MRD); zero means no limit (the default).
    pub mrd: Duration,
}

impl Default for RetransmitConfig {
    fn default() -> Self {
        RetransmitConfig {
            irt: Duration::from_secs(3),
            mrt: Duration::from_secs(1024),
            mrc: 0,
            mrd: Duration::ZERO,
        }
    }
}

impl RetransmitConfig {
    /// The NAT-PMP schedule (RFC 6886 §3.1): 250 ms doubling, nine transmissions.
    pub fn natpmp() -> RetransmitConfig {
        RetransmitConfig {
            irt: Duration::from_millis(250),
            mrt: Duration::from_secs(64),
            mrc: 9,
            mrd: Duration::ZERO,
        }
    }
}

/// `(1 + RAND) * ms` with RAND uniform in [-0.1, +0.1], in whole milliseconds.
fn jitter(ms: u64, rng: &mut SmallRng) -> u64 {
    let r: f64 = rng.random_range(-0.1..=0.1);
    ((1.0 + r) * ms as f64).round() as u64
}

/// The retransmission state of one outstanding request.
#[derive(Debug, Clone)]
pub(crate) struct Retransmit {
    cfg: RetransmitConfig,
    /// First transmission.
    started: Option<Time>,
    /// Transmissions so far.
    sent: u32,
    /// The current RT in milliseconds (0 before the first transmission).
    rt_ms: u64,
}

impl Retransmit {
    /// A request not sent yet.
    pub fn new(cfg: RetransmitConfig) -> Retransmit {
        Retransmit {
            cfg,
            started: None,
            sent: 0,
            rt_ms: 0,
        }
    }

    /// Transmissions so far.
    pub fn sent(&self) -> u32 {
        self.sent
    }

    /// Whether the request may not be transmitted again at `now` (MRC or MRD reached).
    pub fn exhausted(&self, now: Time) -> bool {
        if self.cfg.mrc != 0 && self.sent >= self.cfg.mrc {
            return true;
        }
        match self.started {
            Some(start) if !self.cfg.mrd.is_zero() => now.saturating_since(start) >= self.cfg.mrd,
            _ => false,
        }
    }

    /// Records a transmission at `now`; returns when to retransmit (or, when MRC or MRD
    /// is reached by then, when to give up).
    pub fn on_send(&mut self, now: Time, rng: &mut SmallRng) -> Time {
        let start = *self.started.get_or_insert(now);
        self.sent += 1;
        let irt = millis(self.cfg.irt);
        let mrt = millis(self.cfg.mrt);
        self.rt_ms = if self.sent == 1 {
            jitter(irt, rng)
        } else {
            jitter(self.rt_ms.saturating_mul(2).min(mrt), rng)
        }
        .max(1);
        let next = Time(now.0.saturating_add(self.rt_ms));
        if self.cfg.mrd.is_zero() {
            next
        } else {
            next.min(start + self.cfg.mrd)
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Minimum spacing of renewal attempts (RFC 6887 §11.2.1).
pub(crate) const RENEWAL_MIN_SPACING: Duration = Duration::from_secs(4);

/// When to send renewal attempt `attempt` of a mapping granted at `granted_at` for
/// `lifetime_secs`, not earlier than [`RENEWAL_MIN_SPACING`] after `last_sent`.
/// `None` when that would be at or after expiry.
pub(crate) fn renewal_time(
    granted_at: Time,
    lifetime_secs: u32,
    attempt: u32,
    last_sent: Option<Time>,
    rng: &mut SmallRng,
) -> Option<Time> {
    let life = u64::from(lifetime_secs) * 1000;
    let expires = Time(granted_at.0 + life);
    let shift = attempt.min(60);
    let lo = life - (life >> (shift + 1));
    let width = life >> (shift + 3).min(63);
    let mut at = Time(granted_at.0 + lo + rng.random_range(0..=width));
    if let Some(last) = last_sent {
        at = at.max(last + RENEWAL_MIN_SPACING);
    }
    (at < expires).then_some(at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn first_rt_is_irt_with_ten_percent_jitter() {
        let (mut lo, mut hi) = (u64::MAX, 0);
        for seed in 0..500 {
            let mut rng = SmallRng::seed_from_u64(seed);
            let mut r = Retransmit::new(RetransmitConfig::default());
            let next = r.on_send(Time(1000), &mut rng);
            let rt = next.0 - 1000;
            assert!((2700..=3300).contains(&rt), "RT {rt}");
            lo = lo.min(rt);
            hi = hi.max(rt);
        }
        assert!(lo < 2800 && hi > 3200, "jitter spans the range: {lo}..{hi}");
    }

    #[test]
    fn renewal_window_is_half_to_five_eighths() {
        for seed in 0..200 {
            let mut rng = SmallRng::seed_from_u64(seed);
            let t = renewal_time(Time(0), 800, 0, None, &mut rng).unwrap();
            assert!((400_000..=500_000).contains(&t.0), "{t}");
            let t1 = renewal_time(Time(0), 800, 1, Some(t), &mut rng).unwrap();
            assert!((600_000..=650_000).contains(&t1.0), "{t1}");
            let t2 = renewal_time(Time(0), 800, 2, Some(t1), &mut rng).unwrap();
            assert!((700_000..=725_000).contains(&t2.0), "{t2}");
        }
    }

    #[test]
    fn renewals_keep_four_seconds_apart_and_stop_before_expiry() {
        let mut rng = SmallRng::seed_from_u64(7);
        let mut last = None;
        let mut times = vec![];
        for k in 0.. {
            match renewal_time(Time(0), 20, k, last, &mut rng) {
                Some(t) => {
                    if let Some(l) = last {
                        assert!(t.0 >= l.0 + 4000);
                    }
                    assert!(t.0 < 20_000);
                    times.push(t);
                    last = Some(t);
                }
                None => break,
            }
        }
        assert!(times.len() >= 2 && times.len() <= 5, "{times:?}");
    }
}
