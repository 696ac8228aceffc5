//! What a shell around [`HaNode`](crate::HaNode) decides about its server core, sans-IO:
//! which replies echoing option 192 go out when ([`HeldReplies`]), and how a standby
//! backup keeps mirrored mappings it could not install yet ([`Pending`]).
//!
//! pcpd's core (`crates/pcpd/src/core.rs`) and the simulator (`tests/sim.rs`) both use
//! these, so the simulator checks the rules pcpd runs, not a copy of them.

use std::time::Duration;

use pcp_proto::OptionCode;
use pcp_server::{Change, Effect, FastMap, FastSet, Mapping, MappingKey, Server, Time};

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
    /// Whether it already ran out one wait (a reply held once more after withdrawing
    /// its promise, see [`withdraw`]): [`HeldReplies::timed_out`] counts it once.
    pub waited: bool,
}

/// Replies held for the backup, oldest first (sequence numbers and deadlines both
/// grow in the order replies are held).
#[derive(Debug)]
pub struct HeldReplies<T> {
    ack_timeout: Duration,
    held: Vec<Held<T>>,
    /// Per mapping with replies held (or late, not yet settled): the last request
    /// that changed it — the sequence number of its held reply, or 0 for a request
    /// answered at once ([`HeldReplies::supersede`]) — and how many of its replies
    /// are still held or unsettled.
    latest: FastMap<MappingKey, Latest>,
    /// Replies whose wait ran out, since start, each counted once.
    timed_out: u64,
}

/// See `HeldReplies::latest`.
#[derive(Debug, Clone, Copy)]
struct Latest {
    seq: u64,
    count: u32,
}

impl<T> HeldReplies<T> {
    /// Replies wait at most `ack_timeout` for the backup.
    pub fn new(ack_timeout: Duration) -> HeldReplies<T> {
        HeldReplies {
            ack_timeout,
            held: Vec::new(),
            latest: FastMap::default(),
            timed_out: 0,
        }
    }

    /// Holds `h` until the backup acknowledged record `h.seq`, for at most the ack
    /// timeout. A reply with nothing to wait for (`seq` 0: this node stopped being
    /// active meanwhile) is given back, due now: the shell sends it through
    /// [`HeldReplies::settle`] like a late one, without 192.
    pub fn hold(&mut self, mut h: Held<T>, now: Time) -> Option<Held<T>> {
        let l = self
            .latest
            .entry(h.key)
            .or_insert(Latest { seq: 0, count: 0 });
        l.seq = h.seq;
        l.count += 1;
        if h.seq == 0 {
            h.deadline = now;
            return Some(h);
        }
        h.deadline = now.plus(self.ack_timeout);
        self.held.push(h);
        None
    }

    /// The replies whose records the backup holds now (every record up to `cum`),
    /// aged by the time they waited: they go out as they are, with 192 — except a
    /// reply whose mapping a later request changed meanwhile: it no longer says what
    /// the server holds, the later reply does, so it goes out without 192 (a client
    /// that gets it after the later one must not take it for a promise).
    pub fn release(&mut self, cum: u64, now: Time) -> Vec<Held<T>> {
        let split = self.held.partition_point(|h| h.seq <= cum);
        let mut ready: Vec<Held<T>> = self.held.drain(..split).collect();
        for h in &mut ready {
            if !self.last_of(&h.key, h.seq) {
                strip_192(&mut h.reply);
            }
            pcp_server::age_held_reply(&mut h.reply, now.since(h.at));
        }
        ready
    }

    /// Whether the reply held for record `seq` is the last request that changed `key`;
    /// it leaves the queue.
    fn last_of(&mut self, key: &MappingKey, seq: u64) -> bool {
        let Some(l) = self.latest.get_mut(key) else {
            return false;
        };
        let last = l.seq == seq;
        l.count = l.count.saturating_sub(1);
        if l.count == 0 {
            self.latest.remove(key);
        }
        last
    }

    /// Notes a change made by a request whose reply was not held (it went out at
    /// once: a delete, or a renewal without 192): a reply still held for that mapping
    /// is outdated by it (see [`HeldReplies::release`]), and one that turns out late
    /// must not withdraw what the later request left.
    pub fn supersede(&mut self, change: &Change) {
        let key = match change {
            Change::Upsert(m) => &m.key,
            Change::Remove(k) => k,
            Change::Host { .. } => return,
        };
        if let Some(l) = self.latest.get_mut(key) {
            l.seq = 0;
        }
    }

    /// The replies past their deadline: each goes through [`HeldReplies::settle`].
    pub fn take_late(&mut self, now: Time) -> Vec<Held<T>> {
        let split = self.held.partition_point(|h| h.deadline <= now);
        let mut late: Vec<Held<T>> = self.held.drain(..split).collect();
        for h in &mut late {
            self.timed_out += u64::from(!h.waited);
            h.waited = true;
        }
        late
    }

    /// Replies that ran out their wait (went out without 192, or held once more), since
    /// start; a reply that waited twice counts once.
    pub fn timed_out(&self) -> u64 {
        self.timed_out
    }

    /// Decides about a late reply (from [`HeldReplies::take_late`], or given back by
    /// [`HeldReplies::hold`]): removes option 192 from it (nothing confirmed it) and
    /// returns whether the shell must withdraw its mapping's checkpoint ([`withdraw`]):
    /// only when the reply promised one and no later request changed the mapping
    /// since (a later promise must not be taken back under it; a later reply decides).
    pub fn settle(&mut self, h: &mut Held<T>) -> bool {
        let promised = strip_192(&mut h.reply);
        let last = self.last_of(&h.key, h.seq);
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

/// Removes option 192 from a reply; returns whether it carried it.
fn strip_192(reply: &mut Vec<u8>) -> bool {
    let promised = pcp_proto::Response::parse(reply).is_ok_and(|r| r.options.checkpoint_required());
    if promised {
        let len = reply.len();
        let n = pcp_proto::remove_option(reply, len, OptionCode::CheckpointRequired);
        reply.truncate(n);
    }
    promised
}

/// Withdraws the checkpoint of a late reply's mapping (after [`HeldReplies::settle`]
/// said so): its records go to `effects`. Returns whether the withdrawal made a host
/// record saying "this host now holds unprotected mappings": the reply must then be
/// held once more, for that record. The record follows the mapping's own (a remove),
/// and a successor that missed both still holds the mapping, checkpointed, at the
/// expiry it had before; without the host record it keeps the host's epoch
/// continuous. If the late reply was a renewal, the host counts on the later expiry
/// it was told and loses the mapping at the earlier one, with no epoch change to tell
/// it. Whether the host keeps other checkpointed mappings does not matter: the
/// successor's copy of this one is enough. The second wait only delays a reply that is
/// already late.
pub fn withdraw(server: &mut Server, key: &MappingKey, effects: &mut Vec<Effect>) -> bool {
    let from = effects.len();
    server.withdraw_checkpoint(key, effects)
        && effects[from..].iter().any(|e| {
            matches!(
                e,
                Effect::Replicate(Change::Host {
                    unprotected: true,
                    ..
                })
            )
        })
}

/// Standby backup: mirrored mappings that could not be installed yet, because a stale
/// mapping still holds their external endpoint (the sweep at the end of a full copy,
/// or a later remove, frees it). A remove record of a waiting mapping drops it
/// ([`Pending::remove`]); a newer upsert replaces it.
#[derive(Debug, Default)]
pub struct Pending {
    maps: Vec<Mapping>,
}

impl Pending {
    /// Installs a mirrored mapping in the standby core, or keeps it for later.
    pub fn upsert(
        &mut self,
        server: &mut Server,
        m: Mapping,
        now: Time,
        effects: &mut Vec<Effect>,
    ) {
        // A newer record of the mapping replaces one still waiting: the older one must
        // never be installed over it later.
        self.forget(|k| *k == m.key);
        if server.mirror_upsert(&m, now, effects).is_err() {
            self.maps.push(m);
        }
    }

    /// The active removed these mappings (deleted, expired, no longer checkpointed, or
    /// swept at the end of a copy): what waits for them is dropped, before
    /// [`Pending::retry`], or the retry would bring back a mapping the active deleted
    /// (and a takeover would serve it).
    pub fn remove(&mut self, keys: &[MappingKey]) {
        if self.maps.is_empty() || keys.is_empty() {
            return;
        }
        if keys.len() <= 8 {
            self.forget(|k| keys.contains(k));
        } else {
            let gone: FastSet<&MappingKey> = keys.iter().collect();
            self.forget(|k| gone.contains(k));
        }
    }

    /// Drops the waiting mappings whose key `gone` names.
    fn forget(&mut self, gone: impl Fn(&MappingKey) -> bool) {
        if !self.maps.is_empty() {
            self.maps.retain(|m| !gone(&m.key));
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

    /// Hands over the mappings still waiting (takeover: their hosts lost state).
    pub fn take(&mut self) -> Vec<Mapping> {
        std::mem::take(&mut self.maps)
    }
}
