//! Retransmission of PA messages with the RFC 6887 §8.1.1 schedule, which RFC 7652 §6.3
//! applies to servers too:
//!
//! ```text
//! RT = (1 + RAND) * IRT                    for the first transmission
//! RT = (1 + RAND) * MIN(2 * RTprev, MRT)   for each one after it
//! RAND uniform in [-0.1, +0.1]
//! ```
//!
//! RFC 7652 §6.3 ends the session when the "maximum retransmission duration" passes
//! without an answer, so a PA exchange needs a finite MRD even though RFC 6887's default
//! is none: 120 s by default (docs/AUTH.md).

use std::time::Duration;

use rand::Rng;

use crate::Time;

/// Retransmission parameters of PA messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetransmitConfig {
    /// Initial retransmission time (IRT, 3 s).
    pub irt: Duration,
    /// Maximum retransmission time (MRT, 1024 s).
    pub mrt: Duration,
    /// Maximum retransmission duration (MRD): the session ends when it passes without
    /// an answer. Must not be zero.
    pub mrd: Duration,
}

impl Default for RetransmitConfig {
    fn default() -> Self {
        RetransmitConfig {
            irt: Duration::from_secs(3),
            mrt: Duration::from_secs(1024),
            mrd: Duration::from_secs(120),
        }
    }
}

/// The retransmission state of the one outstanding PA message.
#[derive(Debug, Clone)]
pub(crate) struct Retransmit {
    started: Time,
    rt_ms: u64,
    /// Next retransmission; `None` after a PA-Acknowledgement (only the MRD runs on).
    next: Option<Time>,
}

fn jitter(ms: u64, rng: &mut impl Rng) -> u64 {
    let r: f64 = rng.random_range(-0.1..=0.1);
    (((1.0 + r) * ms as f64).round() as u64).max(1)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Retransmit {
    /// A message first sent at `now`.
    pub fn start(now: Time, cfg: &RetransmitConfig, rng: &mut impl Rng) -> Retransmit {
        let rt_ms = jitter(millis(cfg.irt), rng);
        Retransmit {
            started: now,
            rt_ms,
            next: Some(Time(now.0.saturating_add(rt_ms))),
        }
    }

    /// When the message must go again, or the exchange be given up.
    pub fn deadline(&self, cfg: &RetransmitConfig) -> Time {
        let give_up = self.started.plus(cfg.mrd);
        self.next.map_or(give_up, |n| n.min(give_up))
    }

    /// Whether the exchange is given up at `now`.
    pub fn expired(&self, now: Time, cfg: &RetransmitConfig) -> bool {
        now >= self.started.plus(cfg.mrd)
    }

    /// Whether the message is due again at `now`; if so, schedules the next time.
    pub fn due(&mut self, now: Time, cfg: &RetransmitConfig, rng: &mut impl Rng) -> bool {
        match self.next {
            Some(t) if now >= t => {
                self.rt_ms = jitter(self.rt_ms.saturating_mul(2).min(millis(cfg.mrt)), rng);
                self.next = Some(Time(now.0.saturating_add(self.rt_ms)));
                true
            }
            _ => false,
        }
    }

    /// A PA-Acknowledgement arrived: stop retransmitting, keep waiting until MRD.
    pub fn acknowledged(&mut self) {
        self.next = None;
    }
}
