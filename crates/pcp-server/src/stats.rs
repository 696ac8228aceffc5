//! Counters the core keeps for metrics. Plain integers: the core is single-threaded;
//! the daemon reads them to render Prometheus text.

use pcp_proto::{Opcode, ResultCode};

use crate::checkpoint::Reason;

/// Which kind of request a counter is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// PCP ANNOUNCE.
    Announce,
    /// PCP MAP.
    Map,
    /// PCP PEER.
    Peer,
    /// PCP AUTHENTICATION or an unknown opcode.
    Other,
    /// NAT-PMP, any opcode.
    NatPmp,
}

impl RequestKind {
    /// Every kind, in counter order.
    pub const ALL: [RequestKind; 5] = [
        RequestKind::Announce,
        RequestKind::Map,
        RequestKind::Peer,
        RequestKind::Other,
        RequestKind::NatPmp,
    ];

    /// Label value.
    pub fn label(self) -> &'static str {
        match self {
            RequestKind::Announce => "announce",
            RequestKind::Map => "map",
            RequestKind::Peer => "peer",
            RequestKind::Other => "other",
            RequestKind::NatPmp => "natpmp",
        }
    }

    /// The kind of a PCP opcode.
    pub fn of(op: Opcode) -> RequestKind {
        match op {
            Opcode::Announce => RequestKind::Announce,
            Opcode::Map => RequestKind::Map,
            Opcode::Peer => RequestKind::Peer,
            _ => RequestKind::Other,
        }
    }
}

/// Result codes counted individually; higher ones share the last slot.
const RESULTS: usize = 24;

/// The core's counters.
#[derive(Debug, Clone)]
pub struct Stats {
    answered: [[u64; RESULTS + 1]; 5],
    /// Datagrams dropped without an answer.
    pub dropped: u64,
    /// Datagrams dropped by the per-host rate limit (not in `dropped`).
    pub rate_limited: u64,
    decisions: [u64; Reason::CODES.len()],
    /// Mappings removed because their lifetime ended.
    pub expired: u64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            answered: [[0; RESULTS + 1]; 5],
            dropped: 0,
            rate_limited: 0,
            decisions: [0; Reason::CODES.len()],
            expired: 0,
        }
    }
}

impl Stats {
    /// Counts an answered request. NAT-PMP results are counted under the PCP code
    /// with the same meaning (NAT-PMP 4 "out of resources" as NO_RESOURCES, …).
    pub fn answered(&mut self, kind: RequestKind, code: ResultCode) {
        let k = RequestKind::ALL
            .iter()
            .position(|x| *x == kind)
            .unwrap_or(3);
        let c = usize::from(code.to_u8()).min(RESULTS);
        self.answered[k][c] += 1;
    }

    /// Takes back one count (a reply that was rewritten before it went out).
    pub fn retract(&mut self, kind: RequestKind, code: ResultCode) {
        let k = RequestKind::ALL
            .iter()
            .position(|x| *x == kind)
            .unwrap_or(3);
        let c = usize::from(code.to_u8()).min(RESULTS);
        self.answered[k][c] = self.answered[k][c].saturating_sub(1);
    }

    /// Counts a checkpoint decision.
    pub fn decided(&mut self, reason: &Reason) {
        if let Some(i) = Reason::CODES.iter().position(|c| *c == reason.code()) {
            self.decisions[i] += 1;
        }
    }

    /// (kind, result code, count) for every non-zero counter.
    pub fn answered_counts(&self) -> impl Iterator<Item = (RequestKind, ResultCode, u64)> + '_ {
        RequestKind::ALL
            .iter()
            .enumerate()
            .flat_map(move |(k, kind)| {
                self.answered[k]
                    .iter()
                    .enumerate()
                    .filter(|(_, n)| **n > 0)
                    .map(move |(c, n)| (*kind, ResultCode::from(c as u8), *n))
            })
    }

    /// (reason code, count) for every reason.
    pub fn decision_counts(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Reason::CODES
            .iter()
            .copied()
            .zip(self.decisions.iter().copied())
    }
}
