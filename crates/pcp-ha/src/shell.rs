//! What a shell around [`HaNode`](crate::HaNode) decides about its server core, sans-IO:
//! which replies echoing option 192 go out when ([`HeldReplies`]), and how a standby
//! backup keeps mirrored mappings it could not install yet ([`Pending`]).
//!
//! pcpd's core (`crates/pcpd/src/core.rs`) and the simulator (`tests/sim.rs`) both use
//! these, so the simulator checks the rules pcpd runs, not a copy of them.

use std::time::Duration;

use pcp_proto::OptionCode;
use pcp_server::{Change, Effect, FastMap, Mapping, MappingKey, Server, Time};

/// A reply waiting for the backup's acknowledgement of record `seq`.
#[derive(Debug)]
pub struct Held<T> {
    /// Records up to this sequence number must be acknowledged (0: nothing to wait
    /// for, the reply goes out at once without 192).
    pub seq: u64,
    /// The reply.
    pub reply: Vec<u8>,
    /// The mapping it is about (its checkpoint is withdrawn if the backup is too slow).
    pub key: MappingKey,
    /// When it was held.
    pub at: Time,
    /// When it goes out without 192 at the latest (set by [`HeldReplies::hold`]).
    pub deadline: Time,
    /// Where it goes: the shell's own.
    pub to: T,
}

/// Replies held for the backup, oldest first (sequence numbers and deadlines both
/// grow in the order replies are held).
#[derive(Debug)]
pub struct HeldReplies<T> {
    ack_timeout: Duration,
    held: Vec<Held<T>>,
    /// Per mapping, the sequence number of the last reply held for it, until that
    /// reply is released or settled. A late reply withdraws its mapping's checkpoint
    /// only if it is still the last one held for the mapping: a newer request may
    /// have promised it again, and that promise must not be taken back under it.
    latest: FastMap<MappingKey, u64>,
}

impl<T> HeldReplies<T> {
    /// Replies wait at most `ack_timeout` for the backup.
    pub fn new(ack_timeout: Duration) -> HeldReplies<T> {
        HeldReplies {
            ack_timeout,
            held: Vec::new(),
            latest: FastMap::default(),
        }
    }

    /// Holds `h` until the backup acknowledged record `h.seq`, for at most the ack
    /// timeout. A reply with nothing to wait for (`seq` 0: this node stopped being
    /// active meanwhile) is given back, due now: the shell sends it through
    /// [`HeldReplies::settle`] like a late one, without 192.
    pub fn hold(&mut self, mut h: Held<T>, now: Time) -> Option<Held<T>> {
        self.latest.insert(h.key, h.seq);
        if h.seq == 0 {
            h.deadline = now;
            return Some(h);
        }
        h.deadline = now.plus(self.ack_timeout);
        self.held.push(h);
        None
    }

    /// The replies whose records the backup holds now (every record up to `cum`),
    /// aged by the time they waited: they go out as they are, with 192.
    pub fn release(&mut self, cum: u64, now: Time) -> Vec<Held<T>> {
        let split = self.held.partition_point(|h| h.seq <= cum);
        let ready: Vec<Held<T>> = self.held.drain(..split).collect();
        for h in &ready {
            if self.latest.get(&h.key) == Some(&h.seq) {
                self.latest.remove(&h.key);
            }
        }
        let mut ready = ready;
        for h in &mut ready {
            pcp_server::age_held_reply(&mut h.reply, now.since(h.at));
        }
        ready
    }

    /// The replies past their deadline: each goes through [`HeldReplies::settle`].
    pub fn take_late(&mut self, now: Time) -> Vec<Held<T>> {
        let split = self.held.partition_point(|h| h.deadline <= now);
        self.held.drain(..split).collect()
    }

    /// Decides about a late reply: removes option 192 from it (nothing confirmed it)
    /// and returns whether the shell must withdraw its mapping's checkpoint
    /// ([`withdraw`]): only when the reply promised one and no newer reply was held
    /// for the same mapping since (that one decides, when it is released or late).
    pub fn settle(&mut self, h: &mut Held<T>) -> bool {
        let promised = pcp_proto::Response::parse(&h.reply)
            .is_ok_and(|r| r.options.checkpoint_required());
        let len = h.reply.len();
        let n = pcp_proto::remove_option(&mut h.reply, len, OptionCode::CheckpointRequired);
        h.reply.truncate(n);
        let last = self.latest.get(&h.key) == Some(&h.seq);
        if last {
            self.latest.remove(&h.key);
        }
        promised && last
    }

    /// Forgets every held reply (this node stepped down: nothing will confirm them; the
    /// clients retransmit to whoever serves now).
    pub fn clear(&mut self) {
        self.held.clear();
        self.latest.clear();
    }

    /// The earliest deadline.
    pub fn next_deadline(&self) -> Option<Time> {
        self.held.first().map(|h| h.deadline)
    }

    /// Replies held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

/// Withdraws the checkpoint of a late reply's mapping (after [`HeldReplies::settle`]
/// said so): its records go to `effects`. Returns whether that left the mapping's host
/// exposed (it now holds an unprotected mapping): the reply must then be held once
/// more, for the "host exposed" record, so that a successor knows to reset the host's
/// epoch.
pub fn withdraw(server: &mut Server, key: &MappingKey, effects: &mut Vec<Effect>) -> bool {
    let from = effects.len();
    server.withdraw_checkpoint(key, effects)
        && effects[from..]
            .iter()
            .any(|e| matches!(e, Effect::Replicate(Change::Host { .. })))
}

/// Standby backup: mirrored mappings that could not be installed yet, because a stale
/// mapping still holds their external endpoint (the sweep at the end of a full copy,
/// or a later remove, frees it).
#[derive(Debug, Default)]
pub struct Pending {
    maps: Vec<Mapping>,
}

impl Pending {
    /// Installs a mirrored mapping in the standby core, or keeps it for later.
    pub fn upsert(&mut self, server: &mut Server, m: Mapping, now: Time, effects: &mut Vec<Effect>) {
        if server.mirror_upsert(&m, now, effects).is_err() {
            self.maps.push(m);
        }
    }

    /// After removals: installs what waited and is not expired, if it now fits.
    pub fn retry(&mut self, server: &mut Server, now: Time, effects: &mut Vec<Effect>) {
        for m in std::mem::take(&mut self.maps) {
            if m.expires > now && server.mirror_upsert(&m, now, effects).is_err() {
                self.maps.push(m);
            }
        }
    }

    /// Mappings waiting.
    pub fn len(&self) -> usize {
        self.maps.len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }

    /// Forgets them (takeover: what never fitted is logged by the shell; step-down).
    pub fn clear(&mut self) {
        self.maps.clear();
    }
}
