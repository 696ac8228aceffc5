//! The CHECKPOINT_REQUIRED decision (RFC 7767 §3.2): was it asked, does policy force or
//! deny it, is there a backup to hold it, and is there room (global capacity, the
//! subscriber's quota and rate)?

use std::sync::Arc;

use crate::config::{RuleAction, TierConfig, WithoutBackup};
use crate::policy::Verdict;
use crate::subscriber::SubscriberState;
use crate::time::Time;

/// Why a mapping is, or is not, checkpointed. Shown per mapping in the admin API and
/// counted in metrics.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Checkpointed: the client asked (option 192) and there was room.
    Requested,
    /// Checkpointed: a `force` rule says so, asked or not.
    Forced(Arc<str>),
    /// Not checkpointed: not asked and no rule forces it.
    NotRequested,
    /// Not checkpointed: a `deny` rule says so.
    Denied(Arc<str>),
    /// Not checkpointed: the subscriber's checkpoint quota is used up.
    Quota,
    /// Not checkpointed: the subscriber is checkpointing faster than its rate.
    Rate,
    /// Not checkpointed: the node's checkpoint capacity is used up.
    Capacity,
    /// Not checkpointed: no backup is configured (and `without_backup = "refuse"`).
    NoBackup,
    /// Not checkpointed: the backup is not connected or not yet in sync.
    BackupNotReady,
    /// Not checkpointed: the backup did not acknowledge in time.
    BackupTimeout,
}

impl Reason {
    /// Whether this reason means the mapping is checkpointed.
    pub fn is_checkpointed(&self) -> bool {
        matches!(self, Reason::Requested | Reason::Forced(_))
    }

    /// A stable snake_case code for metrics labels and JSON.
    pub fn code(&self) -> &'static str {
        match self {
            Reason::Requested => "requested",
            Reason::Forced(_) => "forced",
            Reason::NotRequested => "not_requested",
            Reason::Denied(_) => "denied",
            Reason::Quota => "quota",
            Reason::Rate => "rate",
            Reason::Capacity => "capacity",
            Reason::NoBackup => "no_backup",
            Reason::BackupNotReady => "backup_not_ready",
            Reason::BackupTimeout => "backup_timeout",
        }
    }

    /// Every code, for metrics that list each one.
    pub const CODES: [&'static str; 10] = [
        "requested",
        "forced",
        "not_requested",
        "denied",
        "quota",
        "rate",
        "capacity",
        "no_backup",
        "backup_not_ready",
        "backup_timeout",
    ];
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Forced(rule) => write!(f, "forced by rule {rule}"),
            Reason::Denied(rule) => write!(f, "denied by rule {rule}"),
            Reason::Requested => f.write_str("requested by the client"),
            Reason::NotRequested => f.write_str("not requested"),
            Reason::Quota => f.write_str("subscriber checkpoint quota reached"),
            Reason::Rate => f.write_str("subscriber checkpoint rate exceeded"),
            Reason::Capacity => f.write_str("node checkpoint capacity reached"),
            Reason::NoBackup => f.write_str("no backup configured"),
            Reason::BackupNotReady => f.write_str("backup not ready"),
            Reason::BackupTimeout => f.write_str("backup did not acknowledge in time"),
        }
    }
}

/// Interned rule names, so that a stored reason takes 4 octets (see
/// [`crate::table::PackedReason`]). Grows only with distinct names ever configured.
#[derive(Debug, Default, Clone)]
pub struct RuleNames {
    names: Vec<Arc<str>>,
    index: std::collections::HashMap<Arc<str>, u16>,
}

impl RuleNames {
    fn intern(&mut self, name: &Arc<str>) -> u16 {
        if let Some(i) = self.index.get(name) {
            return *i;
        }
        let i = u16::try_from(self.names.len()).unwrap_or(u16::MAX);
        if i < u16::MAX {
            self.names.push(name.clone());
            self.index.insert(name.clone(), i);
        }
        i
    }

    /// Packs a reason.
    pub fn pack(&mut self, r: &Reason) -> crate::table::PackedReason {
        let code = Reason::CODES
            .iter()
            .position(|c| *c == r.code())
            .unwrap_or(0) as u8;
        let rule = match r {
            Reason::Forced(n) | Reason::Denied(n) => self.intern(n),
            _ => 0,
        };
        crate::table::PackedReason { code, rule }
    }

    /// Unpacks a reason.
    pub fn unpack(&self, p: crate::table::PackedReason) -> Reason {
        let rule = || {
            self.names
                .get(usize::from(p.rule))
                .cloned()
                .unwrap_or_else(|| Arc::from("?"))
        };
        match Reason::CODES.get(usize::from(p.code)).copied() {
            Some("requested") => Reason::Requested,
            Some("forced") => Reason::Forced(rule()),
            Some("denied") => Reason::Denied(rule()),
            Some("quota") => Reason::Quota,
            Some("rate") => Reason::Rate,
            Some("capacity") => Reason::Capacity,
            Some("no_backup") => Reason::NoBackup,
            Some("backup_not_ready") => Reason::BackupNotReady,
            Some("backup_timeout") => Reason::BackupTimeout,
            _ => Reason::NotRequested,
        }
    }
}

/// Whether a packed reason means checkpointed.
pub fn packed_is_checkpointed(p: crate::table::PackedReason) -> bool {
    p.code <= 1
}

/// Whether there is a backup to checkpoint to, as the HA layer reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackupStatus {
    /// This node runs alone.
    #[default]
    None,
    /// A backup is configured but not connected or not in sync.
    NotReady,
    /// A backup is connected and in sync.
    Ready,
}

/// The inputs of one decision.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    /// Option 192 was in the request.
    pub requested: bool,
    /// The matching policy rule, if any.
    pub verdict: Option<&'a Verdict>,
    /// The mapping is already checkpointed (a renewal): no new quota or rate is used.
    pub already: bool,
    /// It was checkpointed by a `force` rule: if it is now kept because asked, it must
    /// fit the quota like any asked-for checkpoint.
    pub already_forced: bool,
}

/// The packed code of [`Reason::Forced`].
pub const FORCED_CODE: u8 = 1;

/// The node-wide checkpoint count against its capacity.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ledger {
    /// Checkpointed mappings held.
    pub count: u64,
    /// Most the node may hold.
    pub capacity: u64,
}

/// Decides, without changing anything: the caller commits with [`commit`] once the
/// whole request is known to succeed.
pub fn decide(
    ask: Ask<'_>,
    tier: &TierConfig,
    sub: &mut SubscriberState,
    ledger: &Ledger,
    backup: BackupStatus,
    without_backup: WithoutBackup,
    now: Time,
) -> Reason {
    let forced_by = match ask.verdict {
        Some(Verdict {
            action: RuleAction::Deny,
            rule,
        }) => return Reason::Denied(rule.clone()),
        Some(Verdict {
            action: RuleAction::Force,
            rule,
        }) => Some(rule.clone()),
        _ => None,
    };
    if !ask.requested && forced_by.is_none() {
        return Reason::NotRequested;
    }
    match (backup, without_backup) {
        (BackupStatus::None, WithoutBackup::Refuse) => return Reason::NoBackup,
        (BackupStatus::NotReady, _) => return Reason::BackupNotReady,
        _ => {}
    }
    let honoured = match forced_by {
        Some(rule) => Reason::Forced(rule),
        None => Reason::Requested,
    };
    if ask.already {
        // Kept without new quota or rate, unless a forced one turns into an asked-for
        // one (its rule is gone): then the quota, which already counts it, must hold it.
        if ask.already_forced
            && matches!(honoured, Reason::Requested)
            && sub.checkpointed > tier.checkpoint_quota
        {
            return Reason::Quota;
        }
        return honoured;
    }
    if ledger.count >= ledger.capacity {
        return Reason::Capacity;
    }
    if matches!(honoured, Reason::Requested) {
        if sub.checkpointed >= tier.checkpoint_quota {
            return Reason::Quota;
        }
        if !sub
            .bucket
            .available(tier.checkpoint_rate, tier.checkpoint_burst, now)
        {
            return Reason::Rate;
        }
    }
    honoured
}

/// Applies a decision's accounting: a newly checkpointed mapping takes a quota slot, a
/// capacity slot and (when asked, not forced) a rate token; an uncheckpointed one gives
/// its slots back.
pub fn commit(was: bool, now: &Reason, sub: &mut SubscriberState, ledger: &mut Ledger) {
    match (was, now.is_checkpointed()) {
        (false, true) => {
            sub.checkpointed += 1;
            ledger.count += 1;
            if matches!(now, Reason::Requested) {
                sub.bucket.take();
            }
        }
        (true, false) => release(sub, ledger),
        _ => {}
    }
}

/// Gives back a checkpointed mapping's slots (deleted, expired, or flag cleared).
pub fn release(sub: &mut SubscriberState, ledger: &mut Ledger) {
    sub.checkpointed = sub.checkpointed.saturating_sub(1);
    ledger.count = ledger.count.saturating_sub(1);
}
