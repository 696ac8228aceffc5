//! Epoch validation: has the server lost its mapping state?
//!
//! PCP (RFC 6887 §8.5), in integer arithmetic:
//!
//! ```text
//! first response from this server        → valid
//! curr_server_time < prev_server_time - 1 → invalid (time went backwards)
//! client_delta = curr_client_time - prev_client_time
//! server_delta = curr_server_time - prev_server_time
//! client_delta + 2 < server_delta - server_delta / 16
//!   or server_delta + 2 < client_delta - client_delta / 16 → invalid
//! then prev_* = curr_*
//! ```
//!
//! NAT-PMP (RFC 6886 §3.6): the new Seconds Since Start of Epoch must not be more than
//! 2 s below `prev + 7/8 × elapsed`.

use super::Time;

/// Which rule to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rule {
    /// RFC 6887 §8.5.
    Pcp,
    /// RFC 6886 §3.6.
    NatPmp,
}

/// The result of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// First epoch seen from this server.
    First,
    /// Consistent with the previous one.
    Valid,
    /// The server lost state since `previous`.
    Invalid {
        /// The epoch seen before.
        previous: u32,
    },
}

/// The previous (client time, server epoch) pair.
#[derive(Debug, Clone, Default)]
pub(crate) struct EpochValidator {
    prev: Option<(Time, u32)>,
}

impl EpochValidator {
    /// Validates `epoch` received at `now` and records it.
    pub fn check(&mut self, rule: Rule, now: Time, epoch: u32) -> Verdict {
        let verdict = match self.prev {
            None => Verdict::First,
            Some((prev_client, prev_server)) => {
                let ok = match rule {
                    Rule::Pcp => pcp_valid(prev_client, prev_server, now, epoch),
                    Rule::NatPmp => natpmp_valid(prev_client, prev_server, now, epoch),
                };
                if ok {
                    Verdict::Valid
                } else {
                    Verdict::Invalid {
                        previous: prev_server,
                    }
                }
            }
        };
        self.prev = Some((now, epoch));
        verdict
    }

    /// The last epoch recorded.
    pub fn last(&self) -> Option<u32> {
        self.prev.map(|p| p.1)
    }
}

/// RFC 6887 §8.5.
pub(crate) fn pcp_valid(prev_client: Time, prev_server: u32, now: Time, epoch: u32) -> bool {
    let (prev_s, curr_s) = (i64::from(prev_server), i64::from(epoch));
    if curr_s < prev_s - 1 {
        return false;
    }
    let client_delta = (now.0.saturating_sub(prev_client.0) / 1000) as i64;
    let server_delta = curr_s - prev_s;
    !(client_delta + 2 < server_delta - server_delta / 16
        || server_delta + 2 < client_delta - client_delta / 16)
}

/// RFC 6886 §3.6.
pub(crate) fn natpmp_valid(prev_client: Time, prev_server: u32, now: Time, epoch: u32) -> bool {
    let elapsed_ms = now.0.saturating_sub(prev_client.0) as i64;
    // prev + 7/8 × elapsed, in milliseconds.
    let expected_ms = i64::from(prev_server) * 1000 + elapsed_ms * 7 / 8;
    i64::from(epoch) * 1000 + 2000 >= expected_ms
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcp_rules() {
        let t0 = Time::from_secs(100);
        // Consistent progress, small drift.
        assert!(pcp_valid(t0, 50, Time::from_secs(160), 110));
        assert!(pcp_valid(t0, 50, Time::from_secs(160), 112));
        // Back by one second: tolerated; by two: not.
        assert!(pcp_valid(t0, 50, t0, 49));
        assert!(!pcp_valid(t0, 50, t0, 48));
        // Restart: server at 3 while the client saw 60 s pass.
        assert!(!pcp_valid(t0, 50, Time::from_secs(160), 53));
        // Server jumps ahead (state loss with a lucky reset is not this; a jump is).
        assert!(!pcp_valid(t0, 50, Time::from_secs(110), 100));
        // The 1/16 tolerance: 1600 s client time, server 1600 - 100 + … within.
        assert!(pcp_valid(
            Time::ZERO,
            0,
            Time::from_secs(1600),
            1600 - 100 + 2
        ));
        assert!(!pcp_valid(
            Time::ZERO,
            0,
            Time::from_secs(1600),
            1600 - 100 - 3
        ));
    }

    #[test]
    fn natpmp_rule() {
        let t0 = Time::from_secs(10);
        assert!(natpmp_valid(t0, 100, Time::from_secs(20), 110));
        assert!(natpmp_valid(t0, 100, Time::from_secs(20), 107));
        assert!(!natpmp_valid(t0, 100, Time::from_secs(20), 5));
        assert!(!natpmp_valid(t0, 100, Time::from_secs(90), 160));
    }

    #[test]
    fn validator_records_every_value() {
        let mut v = EpochValidator::default();
        assert_eq!(v.check(Rule::Pcp, Time::from_secs(0), 10), Verdict::First);
        assert_eq!(v.check(Rule::Pcp, Time::from_secs(5), 15), Verdict::Valid);
        assert_eq!(
            v.check(Rule::Pcp, Time::from_secs(6), 0),
            Verdict::Invalid { previous: 15 }
        );
        assert_eq!(v.check(Rule::Pcp, Time::from_secs(7), 1), Verdict::Valid);
        assert_eq!(v.last(), Some(1));
    }
}
