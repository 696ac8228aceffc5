//! One node of an active/backup pair: the replication sender when active, the receiver
//! when backup, and the role changes between (promotion, fencing, switchover).
//!
//! Sans-IO: frames and time go in ([`HaNode::handle_frame`], [`HaNode::handle_timeout`]),
//! frames, timers and [`Event`]s come out ([`HaNode::poll_transmit`],
//! [`HaNode::poll_timeout`], [`HaNode::poll_event`]).

use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::Duration;

use pcp_server::subscriber::SubscriberId;
use pcp_server::{BackupStatus, Change, FastMap, FastSet, Mapping, MappingKey, Reason, Time};

use crate::wire::{
    self, Header, Interner, Kind, MappingRecord, Reader, Record, SequenceRecord, SessionRecord,
    Subscriber, Writer,
};

/// Timing and limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HaConfig {
    /// How often the active sends a heartbeat (and the backup its ack) when idle.
    pub heartbeat: Duration,
    /// Silence after which the peer counts as gone (the backup then promotes).
    pub detection: Duration,
    /// Unacknowledged records are sent again after this long.
    pub retransmit: Duration,
    /// How long a node that starts as active first listens for an existing active.
    pub join: Duration,
    /// Records kept for the backup before it must resync with a bulk copy instead
    /// (bounds memory when the backup is slow or away).
    pub max_log: usize,
    /// Records per bulk chunk asked of the server; a new chunk is asked for when fewer
    /// than this many records wait to be sent.
    pub bulk_chunk: usize,
    /// Octets of DATA frames in flight (sent, not acknowledged) at most: the send
    /// window. Keep it under the backup's UDP receive buffer, or a burst is dropped
    /// and only sent again after `retransmit`.
    pub window: usize,
    /// Checkpointed mappings the backup's copy is sized for up front (the node's
    /// checkpoint capacity): growing a table of a million entries stalls the
    /// replication path for hundreds of milliseconds. Memory is touched only as
    /// entries arrive.
    pub expected: usize,
    /// Standby mode: the shell keeps a live copy in its own server from
    /// [`Event::Replica`] events, so a takeover has nothing left to install
    /// ([`Event::Promoted`] then carries no mappings).
    pub standby: bool,
}

impl Default for HaConfig {
    fn default() -> Self {
        HaConfig {
            heartbeat: Duration::from_millis(100),
            detection: Duration::from_millis(500),
            retransmit: Duration::from_millis(150),
            join: Duration::from_millis(1000),
            max_log: 1 << 20,
            bulk_chunk: 4096,
            // Under a default 208 KiB UDP receive buffer (with its per-datagram
            // overhead), so a burst is not dropped and resent after a timeout. A shell
            // that enlarges the buffer should enlarge this too.
            window: 128 * 1024,
            standby: false,
            expected: 0,
        }
    }
}

/// How often a backup drops expired entries from its copy.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// The role this node plays now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Started as active: listening for an existing active before taking over.
    Joining,
    /// Serving PCP and replicating to the backup.
    Active,
    /// Planned switchover in progress: not serving, waiting for the backup to catch up.
    Draining,
    /// Following the active; not serving PCP.
    Backup,
}

impl Role {
    /// Name for the admin API.
    pub fn name(self) -> &'static str {
        match self {
            Role::Joining => "joining",
            Role::Active => "active",
            Role::Draining => "draining",
            Role::Backup => "backup",
        }
    }
}

/// What the shell must act on.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Every record up to this sequence number is held by the backup: release held
    /// replies waiting on it.
    Acked(u64),
    /// Tell the server core whether checkpoints can be honoured now.
    BackupStatus(BackupStatus),
    /// Start serving as active: adopt these mappings (expiries already in local
    /// time; none in standby mode, where the shell already holds them); keep the previous epoch only for `protected_hosts` (every other client's
    /// epoch starts again: it may have lost state), and announce to
    /// `unprotected_hosts`, which are known to have lost mappings.
    Promoted {
        /// The new term.
        term: u64,
        /// Checkpointed mappings to install.
        mappings: Vec<Mapping>,
        /// Hosts that also held unprotected mappings.
        unprotected_hosts: Vec<IpAddr>,
        /// Hosts whose every mapping was checkpointed and is adopted. Empty in standby
        /// mode: they are the hosts of the shell's standby core that are not in
        /// `unprotected_hosts`.
        protected_hosts: Vec<IpAddr>,
        /// The previous active's epoch base in local time, if it was heard.
        epoch_base: Option<Time>,
        /// Whether this node held a complete copy (it was a ready backup). `false`
        /// after a double failure or a forced promotion: promises may be lost.
        complete: bool,
    },
    /// Stop serving and drop all mapping state: a newer active exists.
    Demoted {
        /// The newer term.
        term: u64,
    },
    /// The active this node took over from kept serving after the takeover (a
    /// partition of the HA link, or it was frozen and woke up) and changed state this
    /// node never received, then stepped down (it said so in its HELLO). Its clients
    /// may have lost mappings here without any epoch saying so: the shell restarts
    /// the epoch of every client whose epoch it carried over from that predecessor,
    /// and announces to them.
    PredecessorDiverged {
        /// This node's term.
        term: u64,
    },
    /// Standby mode, backup: the copy changed; mirror it.
    Replica(Replica),
    /// Supply the next bulk chunk with [`HaNode::bulk_chunk`], from this cursor.
    NeedBulk {
        /// Where to continue.
        cursor: u32,
    },
}

/// A change to the backup's copy, for a shell that keeps a standby server in step.
/// Consecutive records of the same kind come as one event (up to [`REPLICA_BATCH`]
/// of them): a full copy streams a million mappings through a standby backup, and an
/// event (with its allocation) per mapping cost as much as decoding it.
#[derive(Debug, Clone, PartialEq)]
pub enum Replica {
    /// Install or replace these mappings, in this order (expiries in local time).
    Upsert(Vec<Mapping>),
    /// Remove these mappings (removed, or swept at the end of a full copy).
    Remove(Vec<MappingKey>),
}

impl Replica {
    /// How many mappings it changes.
    pub fn len(&self) -> usize {
        match self {
            Replica::Upsert(m) => m.len(),
            Replica::Remove(k) => k.len(),
        }
    }

    /// Whether it changes none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Most changes one [`Replica`] event carries (a sweep at the end of a full copy may
/// carry more: it is one event).
pub const REPLICA_BATCH: usize = 1024;

/// What the admin API shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaStatus {
    /// Role.
    pub role: Role,
    /// Term.
    pub term: u64,
    /// Whether the peer was heard within the detection time.
    pub peer_connected: bool,
    /// Active: the backup holds a full copy. Backup: this node does.
    pub ready: bool,
    /// Records not yet acknowledged (active) or not yet applied (backup, when known).
    pub lag: u64,
    /// Checkpointed mappings held for a takeover (backup).
    pub stored: usize,
}

#[derive(Debug, Clone)]
struct LogEntry {
    seq: u64,
    record: Record,
    /// For upserts: when the mapping expires (local time), to compute the remaining
    /// lifetime at the moment the frame is written.
    expires: Time,
}

#[derive(Debug, Default)]
struct Sender {
    next_seq: u64,
    log: VecDeque<LogEntry>,
    acked: u64,
    sent_up_to: u64,
    last_progress: Time,
    peer_heard: Option<Time>,
    peer_ready: bool,
    /// Seq of the BulkStart of a bulk copy not yet acknowledged complete.
    barrier: Option<u64>,
    bulk_cursor: Option<u32>,
    bulk_end_seq: Option<u64>,
    bulk_requested: bool,
    /// The copy's last phase: hosts holding unprotected mappings (as the server had
    /// them after the last mapping chunk) still to be sent, paced like the chunks, and
    /// its BulkEnd after them. A million of them at once would overflow the log.
    bulk_hosts: Option<Vec<IpAddr>>,
    /// Hosts a live record was queued for since `bulk_hosts` was taken: that record is
    /// newer than the snapshot's, which is then skipped.
    bulk_hosts_changed: FastSet<IpAddr>,
    /// DATA frames in flight: (last sequence number, octets), oldest first.
    frames: VecDeque<(u64, usize)>,
    /// Their octets.
    in_flight: usize,
    last_beat: Option<Time>,
    reported_ack: u64,
    reported_status: Option<BackupStatus>,
    handover_sent: Option<Time>,
    /// The backup reads session records ([`wire::FLAG_SESSIONS`]).
    peer_sessions: bool,
}

/// One mapping of a backup's copy.
#[derive(Debug)]
struct Stored {
    /// When it expires (local time).
    expires: Time,
    /// The copy generation that last refreshed it.
    generation: u32,
    /// Its external endpoint.
    external: (IpAddr, u16),
    /// The whole record, for a takeover to install; `None` in standby mode, where the
    /// shell's core holds the mapping (and a copy of a million full records would cost
    /// ~200 octets each, moved around as the copy streams in).
    record: Option<Box<MappingRecord>>,
}

#[derive(Debug, Default)]
struct Receiver {
    stream: u64,
    applied: u64,
    /// This stream's full copy is complete.
    ready: bool,
    /// Held a complete copy at some point since this node started: the store is then a
    /// superset of every promise (a later copy refreshes it, it never wipes it).
    ever_ready: bool,
    /// Copy generation: BulkStart opens a new one; BulkEnd sweeps entries of older ones.
    generation: u32,
    store: FastMap<MappingKey, Stored>,
    unprotected: FastMap<IpAddr, u32>,
    active_heard: Option<Time>,
    epoch_base: Option<Time>,
    last_ack: Option<Time>,
    ack_due: bool,
    handover_at: Option<u64>,
    /// The active's last sequence number as its heartbeat said.
    active_last_seq: u64,
    /// Acknowledge no further than this (the shell's backpressure, see
    /// [`HaNode::hold_acks`]).
    ack_cap: Option<u64>,
    /// Time since `active_heard` during which this node itself did not run (its
    /// shell's thread descheduled or blocked beyond a heartbeat): not the active's
    /// silence (see [`HaNode::handle_timeout`]).
    blackout: Duration,
}

impl Receiver {
    fn sized(expected: usize) -> Receiver {
        let mut rx = Receiver::default();
        rx.store.reserve(expected);
        rx
    }
}

/// A node's proof of life, written without the node: a heartbeat (active) or a
/// cumulative acknowledgement (backup) as of the snapshot, for a shell to send when
/// the node itself is busy — behind a lock held by bulk work, say — so that the peer
/// does not count the wait as silence. Taken with [`HaNode::beacon`] after every call
/// that changes the node; sending an old one is harmless (a heartbeat carries no
/// records, an acknowledgement is cumulative, a stale term is fenced).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Beacon {
    header: Header,
    /// Heartbeat: the last sequence number; acknowledgement: the records applied.
    seq: u64,
    /// Heartbeat: the epoch base, so that the epoch it carries is right when sent.
    epoch_base: Option<Time>,
}

impl Beacon {
    /// Writes the frame as of `now` into `buf` (at least [`wire::MAX_FRAME`] octets).
    pub fn write(&self, now: Time, buf: &mut [u8]) -> Option<usize> {
        let mut w = Writer::new(buf);
        wire::write_header(&mut w, &self.header)?;
        wire::write_u64(&mut w, self.seq)?;
        if let Some(base) = self.epoch_base {
            wire::write_u64(&mut w, now.since(base).as_millis() as u64)?;
        }
        Some(w.len())
    }
}

/// The largest term or sequence number a frame may carry (see `handle_frame`).
const MAX_NUMBER: u64 = 1 << 62;

/// One node.
#[derive(Debug)]
pub struct HaNode {
    cfg: HaConfig,
    incarnation: u64,
    role: Role,
    term: u64,
    started: Time,
    tx: Sender,
    rx: Receiver,
    epoch_base: Time,
    events: VecDeque<Event>,
    /// A frame to answer a stale peer with (fencing), sent on the next poll.
    fence_due: bool,
    /// Term parity (see `next_term`).
    parity: u64,
    /// Silence tolerated before a backup without a complete copy takes over anyway.
    orphan_wait: Duration,
    /// The copy a promotion or step-down let go of, for the shell to free where it does
    /// not delay anything ([`HaNode::take_retired`]); freeing a million records takes
    /// longer than a takeover may.
    retired: Option<Retired>,
    /// When expired entries were last swept from the copy.
    last_sweep: Time,
    /// Every frame that reached this node before this time has been handled (see
    /// [`HaNode::link_read`]): silence is judged up to here, not up to `now`.
    link_read: Time,
    /// When the shell last called into this node (its own scheduling gaps).
    last_run: Time,
    /// PA sessions (RFC 7652): as backup, the replicated ones, for a takeover; as
    /// active, the shell's own (pushed with [`HaNode::push_session`]), for full copies.
    sessions: FastMap<u32, StoredSession>,
    /// Names (identities, subscriber ids) shared by the records held.
    names: Interner,
    /// Active: the stream this node followed before it took over, and the last record
    /// of it applied (see [`Event::PredecessorDiverged`]).
    predecessor: Option<(u64, u64)>,
    /// Backup after a step-down: the stream this node ran as active and its last
    /// sequence number (counting requests its shell still answered after the
    /// step-down, [`HaNode::push_served`]). Its HELLOs and ACKs say so for as long as
    /// it is a backup, not for a while: a flapping HA link may drop every one sent in
    /// any given time, and the new active must still learn it (it reports it once per
    /// predecessor, so repeating costs 16 octets an ACK and nothing else).
    stepped_down: Option<(u64, u64)>,
}

/// One replicated PA session.
#[derive(Debug)]
struct StoredSession {
    record: SessionRecord,
    /// When the session expires (local time).
    expires: Time,
    /// The copy generation that last refreshed it (see `Receiver::generation`).
    generation: u32,
}

/// State a node let go of (see [`HaNode::take_retired`]).
#[derive(Debug)]
pub struct Retired(#[allow(dead_code)] Vec<Junk>);

/// What [`Retired`] holds.
#[derive(Debug)]
enum Junk {
    Copy(#[allow(dead_code)] Receiver),
    Log(#[allow(dead_code)] VecDeque<LogEntry>),
}

impl HaNode {
    /// A node that starts as active (`true`: it first listens for an existing active
    /// for [`HaConfig::join`]) or as backup. `incarnation` must differ at every start
    /// (a random number): it names this node's replication stream.
    pub fn new(cfg: HaConfig, start_active: bool, incarnation: u64, now: Time) -> HaNode {
        HaNode {
            cfg,
            incarnation,
            role: if start_active {
                Role::Joining
            } else {
                Role::Backup
            },
            term: 0,
            started: now,
            tx: Sender::default(),
            rx: Receiver::sized(cfg.expected),
            epoch_base: now,
            events: VecDeque::new(),
            fence_due: false,
            parity: u64::from(start_active),
            // The node meant to be active waits least, so the two do not race.
            orphan_wait: if start_active { cfg.join } else { cfg.join * 3 },
            retired: None,
            last_sweep: now,
            sessions: FastMap::default(),
            names: Interner::default(),
            link_read: now,
            last_run: now,
            predecessor: None,
            stepped_down: None,
        }
    }

    /// Tells the node that every frame that reached it before `at` has been passed to
    /// [`HaNode::handle_frame`]: the shell read its socket until empty after `at` (take
    /// `at` before reading). A node declares its peer gone only on silence up to such
    /// a time: a timer that fires late — the shell's thread descheduled, or blocked on
    /// a lock, for longer than the detection time — while the peer's heartbeats wait
    /// unread in the socket is not silence. A shell that never calls this never
    /// promotes on silence.
    pub fn link_read(&mut self, at: Time) {
        self.ran(at);
        self.link_read = self.link_read.max(at);
    }

    /// Notes that the shell ran at `now`. A gap longer than a heartbeat (the shell
    /// wakes at least that often, see [`HaNode::poll_timeout`]) means this node's own
    /// thread did not run: the peer's frames may not have been sent either (a starved
    /// machine stalls both), so that time is not counted as the peer's silence.
    fn ran(&mut self, now: Time) {
        let gap = now.since(self.last_run);
        if let Some(excess) = gap.checked_sub(self.cfg.heartbeat) {
            self.rx.blackout += excess;
        }
        self.last_run = self.last_run.max(now);
    }

    /// How long the active has been silent as far as this backup can tell (`None`:
    /// not long enough to act on yet): silence up to the last complete read of the
    /// link, less the time this node itself did not run, but never less than the
    /// raw silence minus one detection time (so that a node starved again and again
    /// still takes over within twice the detection time).
    fn silent_for(&self, since: Time, now: Time) -> Duration {
        let read = self.link_read.min(now);
        let silence = read.since(since);
        let own = self.rx.blackout.min(self.cfg.detection);
        silence.saturating_sub(own)
    }

    /// This node's proof of life as it stands (see [`Beacon`]): `None` while it has
    /// nothing it may say out of turn (a backup not yet following a stream introduces
    /// itself with a HELLO, which asks for a copy: only the node itself sends that).
    pub fn beacon(&self) -> Option<Beacon> {
        match self.role {
            Role::Active | Role::Draining => Some(Beacon {
                header: self.header(Kind::Beat, 0, self.incarnation),
                seq: self.tx.next_seq.saturating_sub(1),
                epoch_base: Some(self.epoch_base),
            }),
            Role::Backup if self.rx.stream != 0 && self.rx.applied != 0 => Some(Beacon {
                // The same flags as a real ACK: one without FLAG_SESSIONS would tell the
                // active that this backup stopped reading session records.
                header: self.header(
                    Kind::Ack,
                    u8::from(self.rx.ready) | wire::FLAG_SESSIONS,
                    self.rx.stream,
                ),
                seq: self
                    .rx
                    .ack_cap
                    .map_or(self.rx.applied, |c| c.min(self.rx.applied)),
                epoch_base: None,
            }),
            _ => None,
        }
    }

    /// Current role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Current term.
    pub fn term(&self) -> u64 {
        self.term
    }

    /// Whether this node serves PCP now.
    pub fn serves(&self) -> bool {
        self.role == Role::Active
    }

    /// Sets the epoch base the active advertises (the server core's global base).
    pub fn set_epoch_base(&mut self, base: Time) {
        self.epoch_base = base;
    }

    /// Status for the admin API.
    pub fn status(&self, now: Time) -> HaStatus {
        let heard = match self.role {
            Role::Active | Role::Draining => self.tx.peer_heard,
            _ => self.rx.active_heard,
        };
        let peer_connected = heard.is_some_and(|t| now.since(t) <= self.cfg.detection);
        match self.role {
            Role::Active | Role::Draining => HaStatus {
                role: self.role,
                term: self.term,
                peer_connected,
                ready: peer_connected && self.tx.peer_ready && self.tx.barrier.is_none(),
                lag: self
                    .tx
                    .next_seq
                    .saturating_sub(1)
                    .saturating_sub(self.tx.acked),
                stored: 0,
            },
            _ => HaStatus {
                role: self.role,
                term: self.term,
                peer_connected,
                ready: self.rx.ready,
                lag: self.rx.active_last_seq.saturating_sub(self.rx.applied),
                stored: self.rx.store.len(),
            },
        }
    }

    /// [`HaNode::push`] for a change a client's request made: if this node stepped down
    /// meanwhile (the shell answered the request before it learned so), the change is
    /// lost, and counted as served past the takeover in what the node tells the new
    /// active ([`Event::PredecessorDiverged`]).
    pub fn push_served(&mut self, change: &Change, now: Time) -> Option<u64> {
        if !matches!(self.role, Role::Active | Role::Draining)
            && let Some(sd) = &mut self.stepped_down
        {
            sd.1 += 1;
        }
        self.push(change, now)
    }

    /// Queues a change to a checkpointed mapping for the backup; returns its sequence
    /// number (held replies wait for it), or `None` when this node is not active.
    pub fn push(&mut self, change: &Change, now: Time) -> Option<u64> {
        if !matches!(self.role, Role::Active | Role::Draining) {
            return None;
        }
        let (record, expires) = match change {
            Change::Upsert(m) => (Record::Upsert(record_of(m)), m.expires),
            Change::Remove(k) => (Record::Remove(*k), now),
            Change::Host { host, unprotected } => {
                if self.tx.bulk_hosts.is_some() {
                    self.tx.bulk_hosts_changed.insert(*host);
                }
                (
                    Record::Host {
                        host: *host,
                        unprotected: *unprotected,
                    },
                    now,
                )
            }
        };
        Some(self.append(record, expires, now))
    }

    fn append(&mut self, record: Record, expires: Time, now: Time) -> u64 {
        let seq = self.tx.next_seq;
        self.tx.next_seq += 1;
        self.tx.log.push_back(LogEntry {
            seq,
            record,
            expires,
        });
        if self.tx.log.len() > self.cfg.max_log {
            // The backup cannot keep up: forget the log (bounded memory) and resync it
            // with a fresh bulk copy once it is heard again.
            self.drop_log();
            self.tx.bulk_cursor = None;
            self.tx.peer_ready = false;
            self.start_bulk(now);
        }
        seq
    }

    /// Queues a PA session established or re-authenticated on this active (its
    /// remaining lifetime counted from `now`); kept for full copies too. Returns its
    /// sequence number, or `None` when this node is not active or its backup does not
    /// read session records (an older build).
    pub fn push_session(&mut self, mut record: SessionRecord, now: Time) -> Option<u64> {
        if !matches!(self.role, Role::Active | Role::Draining)
            || record.identity.len() > wire::MAX_NAME
        {
            return None;
        }
        let expires = now.plus(Duration::from_millis(u64::from(record.remaining_ms)));
        record.identity = self.names.get(&record.identity);
        let id = record.session_id;
        self.sessions.insert(
            id,
            StoredSession {
                record: record.clone(),
                expires,
                generation: 0,
            },
        );
        self.tx
            .peer_sessions
            .then(|| self.append(Record::Session(record), expires, now))
    }

    /// Queues the sequence numbers of a session after authenticated requests (see
    /// docs/AUTH.md for what a successor makes of them). `None` as for
    /// [`HaNode::push_session`], or for a session this node does not know.
    pub fn push_session_seq(
        &mut self,
        session_id: u32,
        sequence: SequenceRecord,
        now: Time,
    ) -> Option<u64> {
        if !matches!(self.role, Role::Active | Role::Draining) {
            return None;
        }
        let st = self.sessions.get_mut(&session_id)?;
        if st.record.sequence == sequence {
            return None;
        }
        st.record.sequence = sequence;
        self.tx.peer_sessions.then(|| {
            self.append(
                Record::SessionSeq {
                    session_id,
                    sequence,
                },
                now,
                now,
            )
        })
    }

    /// Queues the end of a PA session.
    pub fn push_session_end(&mut self, session_id: u32, now: Time) -> Option<u64> {
        if !matches!(self.role, Role::Active | Role::Draining) {
            return None;
        }
        self.sessions.remove(&session_id)?;
        self.tx
            .peer_sessions
            .then(|| self.append(Record::SessionEnd(session_id), now, now))
    }

    /// The PA sessions this node holds that are not expired, with their lifetime left
    /// at `now`: after a takeover ([`Event::Promoted`]) the shell installs them in its
    /// authentication server, so their clients carry on without authenticating again.
    pub fn sessions(&self, now: Time) -> Vec<SessionRecord> {
        let mut out: Vec<SessionRecord> = self
            .sessions
            .values()
            .filter(|st| st.expires > now)
            .map(|st| SessionRecord {
                remaining_ms: u32::try_from(st.expires.since(now).as_millis()).unwrap_or(u32::MAX),
                ..st.record.clone()
            })
            .collect();
        out.sort_by_key(|r| r.session_id);
        out
    }

    /// Whether this node holds PA session `id`.
    pub fn has_session(&self, id: u32) -> bool {
        self.sessions.contains_key(&id)
    }

    /// PA sessions held: as backup, replicated ones for a takeover; as active, the
    /// ones kept for the backup (expired ones go at the next sweep).
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Supplies a bulk chunk (after [`Event::NeedBulk`]): the cursor that event carried,
    /// the checkpointed mappings from it on, the cursor to continue from (`None`: done)
    /// and, with the last chunk, the hosts holding unprotected mappings (sent in pages
    /// after it, under the same backpressure as the chunks). An answer to a request of
    /// a copy dropped since (the log overflowed, the backup lost the thread) is
    /// ignored: taken for the new copy, it would move that copy's cursor past mappings
    /// it never sent.
    pub fn bulk_chunk(
        &mut self,
        cursor: u32,
        mappings: &[Mapping],
        next: Option<u32>,
        unprotected_hosts: &[IpAddr],
        now: Time,
    ) {
        if !self.tx.bulk_requested || self.tx.bulk_cursor != Some(cursor) {
            return;
        }
        self.tx.bulk_requested = false;
        let copy = self.tx.barrier;
        for m in mappings {
            self.append(Record::Upsert(record_of(m)), m.expires, now);
        }
        // The log may have overflowed above and a new copy begun (from cursor 0): the
        // rest of this answer belongs to the copy dropped.
        if self.tx.barrier != copy {
            return;
        }
        match next {
            Some(c) => self.tx.bulk_cursor = Some(c),
            None => {
                self.tx.bulk_cursor = None;
                self.tx.bulk_hosts_changed.clear();
                self.tx.bulk_hosts = Some(unprotected_hosts.to_vec());
                self.bulk_host_page(now);
            }
        }
    }

    /// Queues the next page of the copy's hosts (no more than a chunk, and no more than
    /// keeps the log under half its limit, but at least one so that the copy always
    /// moves on), and after the last one the copy's end.
    fn bulk_host_page(&mut self, now: Time) {
        let room = (self.cfg.max_log / 2)
            .saturating_sub(self.tx.log.len())
            .min(self.cfg.bulk_chunk)
            .max(1);
        let mut sent = 0;
        while sent < room {
            let Some(hosts) = &mut self.tx.bulk_hosts else {
                return;
            };
            let Some(host) = hosts.pop() else { break };
            if self.tx.bulk_hosts_changed.contains(&host) {
                continue;
            }
            self.append(
                Record::Host {
                    host,
                    unprotected: true,
                },
                now,
                now,
            );
            sent += 1;
        }
        if self.tx.bulk_hosts.as_ref().is_none_or(|h| !h.is_empty()) {
            return;
        }
        self.tx.bulk_hosts = None;
        self.tx.bulk_hosts_changed = FastSet::default();
        if self.tx.peer_sessions {
            let copy = self.tx.barrier;
            self.queue_sessions(now);
            // Overflowed: the new copy under way must not get this one's end.
            if self.tx.barrier != copy {
                return;
            }
        }
        let end = self.append(Record::BulkEnd, now, now);
        self.tx.bulk_end_seq = Some(end);
    }

    fn start_bulk(&mut self, now: Time) {
        if self.tx.bulk_cursor.is_some() {
            return;
        }
        // A copy in its host phase is dropped with it.
        self.tx.bulk_hosts = None;
        self.tx.bulk_hosts_changed = FastSet::default();
        let start = self.tx.next_seq;
        self.tx.next_seq += 1;
        self.tx.log.push_back(LogEntry {
            seq: start,
            record: Record::BulkStart,
            expires: now,
        });
        self.tx.barrier = Some(start);
        self.tx.bulk_cursor = Some(0);
        self.tx.bulk_end_seq = None;
        self.tx.bulk_requested = false;
        self.rewind(start - 1);
    }

    /// The copy a promotion or step-down let go of, if any: drop it on another thread
    /// (it is freed at the next role change otherwise).
    pub fn take_retired(&mut self) -> Option<Retired> {
        self.retired.take()
    }

    /// Keeps what a role change let go of for the shell to free elsewhere.
    fn retire(&mut self, junk: Junk) {
        self.retired
            .get_or_insert_with(|| Retired(Vec::new()))
            .0
            .push(junk);
    }

    /// Forgets the send log (a fresh copy replaces it), freeing it elsewhere.
    fn drop_log(&mut self) {
        let old = std::mem::take(&mut self.tx.log);
        if !old.is_empty() {
            self.retire(Junk::Log(old));
        }
    }

    /// Backup backpressure: while `hold` is true, acknowledgements (still sent, as
    /// liveness) stop advancing, so the active's window fills and it stops sending
    /// records until the shell caught up (a standby core applying a copy more slowly
    /// than it arrives). Bounds what queues between this node and the shell.
    pub fn hold_acks(&mut self, hold: bool) {
        match (hold, self.rx.ack_cap) {
            (true, None) => self.rx.ack_cap = Some(self.rx.applied),
            (false, Some(_)) => {
                self.rx.ack_cap = None;
                self.rx.ack_due = true;
            }
            _ => {}
        }
    }

    /// Raises the term to at least `term`: the highest term this node saw before a
    /// restart (kept by the shell), so that it never takes a term already used.
    pub fn set_term_floor(&mut self, term: u64) {
        self.term = self.term.max(term);
    }

    /// The configuration.
    pub fn config(&self) -> &HaConfig {
        &self.cfg
    }

    /// Forgets which frames are in flight: everything after `sent_up_to` is sent again.
    fn rewind(&mut self, sent_up_to: u64) {
        self.tx.sent_up_to = sent_up_to;
        self.tx.frames.clear();
        self.tx.in_flight = 0;
    }

    /// Drops acknowledged frames from the flight count.
    fn landed(&mut self) {
        while let Some(&(last, n)) = self.tx.frames.front() {
            if last > self.tx.acked {
                break;
            }
            self.tx.frames.pop_front();
            self.tx.in_flight -= n;
        }
    }

    /// Operator command: promote this backup now (even if not ready: what it holds is
    /// all there is).
    pub fn promote(&mut self, now: Time) {
        match self.role {
            Role::Backup | Role::Joining => self.become_active(now),
            // Abort a switchover: serve again.
            Role::Draining => {
                self.role = Role::Active;
                self.tx.handover_sent = None;
                self.report_status(now);
            }
            Role::Active => {}
        }
    }

    /// Operator command on the active: hand over to the backup without losing a
    /// checkpoint. This node stops serving at once and steps down when the backup has
    /// everything and takes over.
    pub fn switchover(&mut self, now: Time) -> bool {
        let alive = self
            .tx
            .peer_heard
            .is_some_and(|t| now.since(t) <= self.cfg.detection);
        if self.role == Role::Active && alive && self.tx.peer_ready && self.tx.barrier.is_none() {
            self.role = Role::Draining;
            true
        } else {
            false
        }
    }

    fn become_active(&mut self, now: Time) {
        self.term = self.next_term(self.term);
        let mut mappings = Vec::new();
        if !self.cfg.standby {
            mappings.reserve(self.rx.store.len());
            for st in self.rx.store.values() {
                if let Some(record) = &st.record
                    && st.expires > now
                {
                    mappings.push(mapping_of(record, st.expires, now));
                }
            }
            mappings.sort_by_key(|m| m.key);
        }
        let mut unprotected_hosts: Vec<IpAddr> = self.rx.unprotected.keys().copied().collect();
        unprotected_hosts.sort();
        // In standby mode the shell's core holds the same hosts and finds them there
        // (a scan of a million stored records would delay the takeover).
        let mut protected_hosts: Vec<IpAddr> = Vec::new();
        if !self.cfg.standby {
            let mut hosts = std::collections::HashSet::new();
            for (k, st) in &self.rx.store {
                if st.expires > now && !self.rx.unprotected.contains_key(&k.internal) {
                    hosts.insert(k.internal);
                }
            }
            protected_hosts.extend(hosts);
            protected_hosts.sort();
        }
        let epoch_base = self.rx.epoch_base;
        let complete = self.rx.ever_ready;
        self.predecessor = (self.rx.stream != 0).then_some((self.rx.stream, self.rx.applied));
        self.stepped_down = None;
        let old = std::mem::take(&mut self.rx);
        self.retire(Junk::Copy(old));
        self.tx = Sender {
            next_seq: 1,
            last_progress: now,
            ..Sender::default()
        };
        self.role = Role::Active;
        self.events.push_back(Event::Promoted {
            term: self.term,
            mappings,
            unprotected_hosts,
            protected_hosts,
            epoch_base,
            complete,
        });
        // A new stream opens with a full copy of what this node holds once it has
        // adopted the mappings above, so any follower gets everything.
        self.start_bulk(now);
        self.report_status(now);
    }

    /// A HELLO from a peer that stepped down from active: if it ran the stream this
    /// node took over from, past the last record this node applied of it, it changed
    /// state (answered clients, renewed, deleted) that this node never held.
    fn stepped_down_peer(&mut self, r: &mut Reader<'_>) {
        let (Ok(stream), Ok(last)) = (r.u64(), r.u64()) else {
            return;
        };
        let Some((followed, applied)) = self.predecessor else {
            return;
        };
        if stream != followed || last <= applied {
            return;
        }
        // Once per predecessor.
        self.predecessor = None;
        self.events
            .push_back(Event::PredecessorDiverged { term: self.term });
    }

    /// The next term this node may take: terms of the node that starts active are odd,
    /// of the other even, so two nodes can never be active in the same term.
    fn next_term(&self, after: u64) -> u64 {
        let t = after + 1;
        if t % 2 == self.parity { t } else { t + 1 }
    }

    fn demote(&mut self, term: u64, now: Time) {
        self.term = term;
        if matches!(self.role, Role::Active | Role::Draining) {
            self.events.push_back(Event::Demoted { term });
            // Said until this node is active again: the shell may still answer a
            // request or two before it learns of the step-down (see `push_served`),
            // and the frames saying so may be lost.
            self.stepped_down = Some((self.incarnation, self.tx.next_seq.saturating_sub(1)));
        }
        self.predecessor = None;
        self.role = Role::Backup;
        let old = std::mem::take(&mut self.tx);
        self.retire(Junk::Log(old.log));
        let fresh = Receiver::sized(self.cfg.expected);
        let old = std::mem::replace(&mut self.rx, fresh);
        self.retire(Junk::Copy(old));
        // The new active holds the sessions and sends them with its full copy.
        self.sessions.clear();
        // An active was just heard: the wait before an orphan takeover starts now,
        // not at this node's start.
        self.started = now;
    }

    /// Handles a frame from the peer.
    pub fn handle_frame(&mut self, frame: &[u8], now: Time) {
        self.ran(now);
        let mut r = Reader::new(frame);
        let Ok(h) = wire::read_header(&mut r) else {
            return;
        };
        if h.sender == self.incarnation {
            return;
        }
        // Terms and sequence numbers grow one step at a time and never come near
        // 2^62: a frame claiming more is corrupt or forged, and the arithmetic on it
        // (next term, first + count) would overflow. Found by the `decode` fuzz target.
        if h.term > MAX_NUMBER || r.clone().u64().is_ok_and(|seq| seq > MAX_NUMBER) {
            return;
        }
        if h.term > self.term {
            if matches!(self.role, Role::Active | Role::Draining) {
                self.demote(h.term, now);
            } else {
                // A backup or joining node only learns the term; it follows an active
                // when one speaks (DATA, BEAT, HANDOVER).
                self.term = h.term;
            }
        } else if h.term < self.term {
            // A stale peer: answer with our term so it learns and steps down.
            self.fence_due = true;
            if matches!(h.kind, Kind::Data | Kind::Beat | Kind::Handover) {
                return;
            }
        }
        match self.role {
            Role::Active | Role::Draining => self.active_frame(&h, &mut r, now),
            Role::Backup | Role::Joining => self.backup_frame(&h, &mut r, now),
        }
    }

    fn active_frame(&mut self, h: &Header, r: &mut Reader<'_>, now: Time) {
        match h.kind {
            Kind::Ack | Kind::Hello => {
                let Ok(applied) = r.u64() else { return };
                if h.flags & wire::FLAG_STEPPED_DOWN != 0 {
                    self.stepped_down_peer(&mut r.clone());
                }
                self.tx.peer_heard = Some(now);
                self.peer_reads_sessions(h.flags & wire::FLAG_SESSIONS != 0, now);
                let follows_us = h.stream == self.incarnation;
                let first_kept = self.tx.log.front().map_or(self.tx.next_seq, |e| e.seq);
                if h.kind == Kind::Hello {
                    if follows_us && applied + 1 >= first_kept {
                        // Resume: send again whatever it has not applied.
                        self.rewind(applied);
                    } else if let Some(b) = self.tx.barrier.filter(|b| *b >= first_kept) {
                        // A copy is under way and still whole in the log: from its start.
                        self.rewind(b - 1);
                    } else {
                        // The backup lost the thread (new, restarted, or too far
                        // behind): it gets a fresh full copy.
                        self.tx.peer_ready = false;
                        self.drop_log();
                        self.tx.bulk_cursor = None;
                        self.start_bulk(now);
                    }
                }
                if follows_us {
                    if applied > self.tx.acked {
                        self.tx.acked = applied.min(self.tx.next_seq.saturating_sub(1));
                        self.tx.last_progress = now;
                        while self.tx.log.front().is_some_and(|e| e.seq <= self.tx.acked) {
                            self.tx.log.pop_front();
                        }
                        self.landed();
                    }
                    if self.tx.bulk_end_seq.is_some_and(|e| self.tx.acked >= e) {
                        self.tx.barrier = None;
                        self.tx.bulk_end_seq = None;
                    }
                    self.tx.peer_ready = h.flags & 1 != 0 && self.tx.barrier.is_none();
                }
                self.report(now);
            }
            Kind::Data | Kind::Beat | Kind::Handover => {
                // Another active in the same term (misconfiguration or a race at
                // start): the lower incarnation steps down.
                if h.term == self.term && h.sender > self.incarnation {
                    self.demote(self.term, now);
                }
            }
        }
    }

    /// What the backup said about session records (ACK/HELLO flag). When it starts
    /// reading them, every held session is queued (a copy already sent had none);
    /// when it stops (replaced by an older build), a log holding session records it
    /// cannot read is replaced by a fresh copy.
    fn peer_reads_sessions(&mut self, reads: bool, now: Time) {
        if reads == self.tx.peer_sessions {
            return;
        }
        self.tx.peer_sessions = reads;
        if reads {
            self.queue_sessions(now);
        } else if self.tx.log.iter().any(|e| {
            matches!(
                e.record,
                Record::Session(_) | Record::SessionSeq { .. } | Record::SessionEnd(_)
            )
        }) {
            self.tx.peer_ready = false;
            self.drop_log();
            self.tx.bulk_cursor = None;
            self.start_bulk(now);
        }
    }

    /// Queues a record of every live session held (full copy, or a backup that just
    /// started reading them).
    fn queue_sessions(&mut self, now: Time) {
        let mut live: Vec<(Time, SessionRecord)> = self
            .sessions
            .values()
            .filter(|st| st.expires > now)
            .map(|st| (st.expires, st.record.clone()))
            .collect();
        live.sort_by_key(|(_, r)| r.session_id);
        for (expires, r) in live {
            self.append(Record::Session(r), expires, now);
        }
    }

    fn report(&mut self, now: Time) {
        // During a full copy nothing is reported: a reply held for a record from before
        // the copy is safe only once the whole copy (which includes its mapping) is in.
        let acked = match self.tx.barrier {
            Some(_) => 0,
            None => self.tx.acked,
        };
        if acked > self.tx.reported_ack {
            self.tx.reported_ack = acked;
            self.events.push_back(Event::Acked(acked));
        }
        self.report_status(now);
    }

    fn report_status(&mut self, now: Time) {
        let status = match self.role {
            Role::Active => {
                let alive = self
                    .tx
                    .peer_heard
                    .is_some_and(|t| now.since(t) <= self.cfg.detection);
                if alive && self.tx.peer_ready && self.tx.barrier.is_none() {
                    BackupStatus::Ready
                } else {
                    BackupStatus::NotReady
                }
            }
            _ => BackupStatus::NotReady,
        };
        if self.tx.reported_status != Some(status) {
            self.tx.reported_status = Some(status);
            self.events.push_back(Event::BackupStatus(status));
        }
    }

    fn backup_frame(&mut self, h: &Header, r: &mut Reader<'_>, now: Time) {
        match h.kind {
            Kind::Data | Kind::Beat | Kind::Handover => {}
            // Another backup (or joining node) talking to us: nothing to follow.
            Kind::Ack | Kind::Hello => return,
        }
        if self.role == Role::Joining {
            // An active exists: follow it.
            self.role = Role::Backup;
        }
        if h.stream != self.rx.stream {
            // A new active stream: follow it from its start (it resumes from 0 or sends
            // a full copy). What we hold stays until that copy sweeps it.
            self.rx.stream = h.stream;
            self.rx.applied = 0;
            self.rx.ready = false;
            self.rx.active_last_seq = 0;
            self.rx.handover_at = None;
        }
        self.rx.active_heard = Some(now);
        self.rx.blackout = Duration::ZERO;
        self.rx.ack_due = true;
        match h.kind {
            Kind::Beat => {
                let (Ok(last), Ok(epoch_ms)) = (r.u64(), r.u64()) else {
                    return;
                };
                self.rx.active_last_seq = last;
                self.rx.epoch_base = Some(Time(now.0.saturating_sub(epoch_ms)));
            }
            Kind::Handover => {
                let Ok(last) = r.u64() else { return };
                self.rx.handover_at = Some(last);
            }
            Kind::Data => {
                let Ok((first, count)) = wire::read_data_prefix(r) else {
                    return;
                };
                if first > self.rx.applied + 1 {
                    // A gap. Only a full copy may start past it: it replaces everything.
                    let mut peek = r.clone();
                    if count == 0 || wire::read_record(&mut peek) != Ok(Record::BulkStart) {
                        return; // ack what we have; the active goes back
                    }
                    self.rx.applied = first - 1;
                }
                for i in 0..u64::from(count) {
                    let Ok(rec) = wire::read_record_in(r, &mut self.names) else {
                        return;
                    };
                    let seq = first + i;
                    if seq != self.rx.applied + 1 {
                        continue; // already applied
                    }
                    self.apply(rec, now);
                    self.rx.applied = seq;
                }
                self.rx.active_last_seq = self.rx.active_last_seq.max(self.rx.applied);
            }
            Kind::Ack | Kind::Hello => {}
        }
        if let Some(last) = self.rx.handover_at
            && self.rx.applied >= last
            && self.rx.ready
        {
            self.become_active(now);
        }
    }

    fn apply(&mut self, rec: Record, now: Time) {
        match rec {
            Record::Upsert(m) => {
                // Received no earlier than written: the local expiry is never earlier
                // than the one promised.
                let expires = now.plus(Duration::from_millis(u64::from(m.remaining_ms)));
                let key = m.key;
                let external = (m.external_addr, m.external_port);
                let record = if self.cfg.standby {
                    let view = into_mapping(m, expires, now);
                    match self.events.back_mut() {
                        Some(Event::Replica(Replica::Upsert(run))) if run.len() < REPLICA_BATCH => {
                            run.push(view)
                        }
                        _ => {
                            let mut run = Vec::with_capacity(256);
                            run.push(view);
                            self.events.push_back(Event::Replica(Replica::Upsert(run)));
                        }
                    }
                    None
                } else {
                    Some(Box::new(m))
                };
                self.rx.store.insert(
                    key,
                    Stored {
                        expires,
                        generation: self.rx.generation,
                        external,
                        record,
                    },
                );
            }
            Record::Remove(k) => {
                if self.rx.store.remove(&k).is_some() && self.cfg.standby {
                    match self.events.back_mut() {
                        Some(Event::Replica(Replica::Remove(run))) if run.len() < REPLICA_BATCH => {
                            run.push(k)
                        }
                        _ => self
                            .events
                            .push_back(Event::Replica(Replica::Remove(vec![k]))),
                    }
                }
            }
            Record::Host { host, unprotected } => {
                if unprotected {
                    self.rx.unprotected.insert(host, self.rx.generation);
                } else {
                    self.rx.unprotected.remove(&host);
                }
            }
            Record::BulkStart => {
                // Mark, don't wipe: until the copy completes, what we held still
                // protects every promise made before.
                self.rx.generation += 1;
                self.rx.ready = false;
            }
            Record::BulkEnd => {
                let g = self.rx.generation;
                if self.cfg.standby {
                    let swept: Vec<MappingKey> = self
                        .rx
                        .store
                        .iter()
                        .filter(|(_, st)| st.generation != g)
                        .map(|(k, _)| *k)
                        .collect();
                    if !swept.is_empty() {
                        self.events
                            .push_back(Event::Replica(Replica::Remove(swept)));
                    }
                }
                self.rx.store.retain(|_, st| st.generation == g);
                self.rx.unprotected.retain(|_, gen_| *gen_ == g);
                self.sessions.retain(|_, st| st.generation == g);
                self.names.prune();
                self.rx.ready = true;
                self.rx.ever_ready = true;
            }
            Record::Session(record) => {
                let expires = now.plus(Duration::from_millis(u64::from(record.remaining_ms)));
                self.sessions.insert(
                    record.session_id,
                    StoredSession {
                        record,
                        expires,
                        generation: self.rx.generation,
                    },
                );
            }
            Record::SessionSeq {
                session_id,
                sequence,
            } => {
                if let Some(st) = self.sessions.get_mut(&session_id) {
                    st.record.sequence = sequence;
                }
            }
            Record::SessionEnd(id) => {
                self.sessions.remove(&id);
            }
        }
    }

    /// The next frame to send to the peer, written into `buf` (at least
    /// [`wire::MAX_FRAME`] octets).
    pub fn poll_transmit(&mut self, now: Time, buf: &mut [u8]) -> Option<usize> {
        match self.role {
            Role::Active | Role::Draining => self.transmit_active(now, buf),
            Role::Backup | Role::Joining => self.transmit_backup(now, buf),
        }
    }

    fn header(&self, kind: Kind, flags: u8, stream: u64) -> Header {
        Header {
            kind,
            flags,
            term: self.term,
            sender: self.incarnation,
            stream,
        }
    }

    fn transmit_active(&mut self, now: Time, buf: &mut [u8]) -> Option<usize> {
        let queued = self
            .tx
            .next_seq
            .saturating_sub(1)
            .saturating_sub(self.tx.sent_up_to);
        if self.tx.bulk_cursor.is_some()
            && !self.tx.bulk_requested
            && queued < self.cfg.bulk_chunk as u64
            && self.tx.log.len() < self.cfg.max_log / 2
        {
            self.tx.bulk_requested = true;
            let cursor = self.tx.bulk_cursor.unwrap_or(0);
            self.events.push_back(Event::NeedBulk { cursor });
        }
        if self.tx.bulk_hosts.is_some()
            && queued < self.cfg.bulk_chunk as u64
            && self.tx.log.len() < self.cfg.max_log / 2
        {
            self.bulk_host_page(now);
        }
        // Records before the log's start are gone (acknowledged, or replaced by a
        // full copy): the backup's progress counts from there.
        let floor = self
            .tx
            .log
            .front()
            .map_or(self.tx.next_seq, |e| e.seq)
            .saturating_sub(1)
            .max(self.tx.acked);
        // Go back when nothing was acknowledged for a while.
        if floor < self.tx.sent_up_to && now.since(self.tx.last_progress) >= self.cfg.retransmit {
            self.rewind(floor);
            self.tx.last_progress = now;
        }
        if self.tx.sent_up_to < floor {
            self.rewind(floor);
        }
        let first = self.tx.sent_up_to + 1;
        let has_data = self.tx.log.back().is_some_and(|e| e.seq >= first);
        // One frame may always be in flight, whatever the window.
        let room = self.tx.in_flight == 0 || self.tx.in_flight + wire::MAX_FRAME <= self.cfg.window;
        if has_data && room {
            let mut w = Writer::new(buf);
            wire::write_header(&mut w, &self.header(Kind::Data, 0, self.incarnation))?;
            let at = wire::write_data_prefix(&mut w, first)?;
            let skip = self
                .tx
                .log
                .front()
                .map_or(0, |e| first.saturating_sub(e.seq)) as usize;
            let mut count = 0u16;
            for e in self.tx.log.iter().skip(skip) {
                // The lifetime left now, not when the record was queued.
                let remaining = u32::try_from(e.expires.since(now).as_millis()).unwrap_or(u32::MAX);
                // A record is at most ~500 octets (16 filters would be more, and then it
                // starts the next frame); stop while a whole one surely fits.
                if w.remaining() < 600
                    || wire::write_record_remaining(&mut w, &e.record, remaining).is_none()
                {
                    break;
                }
                count += 1;
                if count == u16::MAX {
                    break;
                }
            }
            if count > 0 {
                wire::patch_count(&mut w, at, count);
                if self.tx.acked == self.tx.sent_up_to {
                    self.tx.last_progress = now;
                }
                self.tx.sent_up_to = first + u64::from(count) - 1;
                self.tx.frames.push_back((self.tx.sent_up_to, w.len()));
                self.tx.in_flight += w.len();
                self.tx.last_beat = Some(now);
                return Some(w.len());
            }
        }
        if self.role == Role::Draining
            && self.tx.acked + 1 >= self.tx.next_seq
            && self
                .tx
                .handover_sent
                .is_none_or(|t| now.since(t) >= self.cfg.heartbeat)
        {
            self.tx.handover_sent = Some(now);
            let mut w = Writer::new(buf);
            wire::write_header(&mut w, &self.header(Kind::Handover, 0, self.incarnation))?;
            wire::write_u64(&mut w, self.tx.next_seq.saturating_sub(1))?;
            return Some(w.len());
        }
        if self.fence_due
            || self
                .tx
                .last_beat
                .is_none_or(|t| now.since(t) >= self.cfg.heartbeat)
        {
            self.fence_due = false;
            self.tx.last_beat = Some(now);
            let mut w = Writer::new(buf);
            wire::write_header(&mut w, &self.header(Kind::Beat, 0, self.incarnation))?;
            wire::write_u64(&mut w, self.tx.next_seq.saturating_sub(1))?;
            wire::write_u64(&mut w, now.since(self.epoch_base).as_millis() as u64)?;
            return Some(w.len());
        }
        None
    }

    fn transmit_backup(&mut self, now: Time, buf: &mut [u8]) -> Option<usize> {
        let due = self.rx.ack_due
            || self.fence_due
            || self
                .rx
                .last_ack
                .is_none_or(|t| now.since(t) >= self.cfg.heartbeat);
        if !due {
            return None;
        }
        self.rx.ack_due = false;
        self.fence_due = false;
        self.rx.last_ack = Some(now);
        // Before following a stream, introduce ourselves so the active knows to send a
        // copy; once following, acknowledge (which also resumes after a gap).
        let kind = if self.rx.stream == 0 || self.rx.applied == 0 {
            Kind::Hello
        } else {
            Kind::Ack
        };
        // After a step-down, the node says what it ran: the new active learns whether
        // it served past the takeover.
        let stepped_down = self.stepped_down;
        let mut w = Writer::new(buf);
        let mut flags = u8::from(self.rx.ready) | wire::FLAG_SESSIONS;
        if stepped_down.is_some() {
            flags |= wire::FLAG_STEPPED_DOWN;
        }
        wire::write_header(&mut w, &self.header(kind, flags, self.rx.stream))?;
        let applied = self
            .rx
            .ack_cap
            .map_or(self.rx.applied, |c| c.min(self.rx.applied));
        wire::write_u64(&mut w, applied)?;
        if let Some((stream, last)) = stepped_down {
            wire::write_u64(&mut w, stream)?;
            wire::write_u64(&mut w, last)?;
        }
        Some(w.len())
    }

    /// When [`HaNode::handle_timeout`] should next run.
    pub fn poll_timeout(&self) -> Option<Time> {
        let hb = |t: Option<Time>| t.map_or(self.started, |t| t.plus(self.cfg.heartbeat));
        Some(match self.role {
            Role::Active | Role::Draining => hb(self.tx.last_beat)
                .min(self.tx.last_progress.plus(self.cfg.retransmit))
                .min(
                    self.tx
                        .peer_heard
                        .map_or(Time(u64::MAX), |t| t.plus(self.cfg.detection)),
                ),
            Role::Backup => {
                let wait = if self.rx.ever_ready {
                    self.cfg.detection
                } else {
                    self.orphan_wait
                };
                // Later by the time this node itself did not run (see `silent_for`).
                let own = self.rx.blackout.min(self.cfg.detection);
                hb(self.rx.last_ack).min(
                    self.rx
                        .active_heard
                        .unwrap_or(self.started)
                        .plus(wait + own),
                )
            }
            Role::Joining => hb(self.rx.last_ack).min(self.started.plus(self.cfg.join)),
        })
    }

    /// Runs timers: failure detection and promotion. The peer's silence is judged
    /// only up to the last [`HaNode::link_read`].
    pub fn handle_timeout(&mut self, now: Time) {
        self.ran(now);
        match self.role {
            Role::Joining => {
                if self.link_read.min(now).since(self.started) >= self.cfg.join {
                    self.become_active(now);
                }
            }
            Role::Backup => {
                let silent_since = self.rx.active_heard.unwrap_or(self.started);
                let silence = self.silent_for(silent_since, now);
                if self.rx.ever_ready
                    && self.rx.active_heard.is_some()
                    && silence > self.cfg.detection
                {
                    self.become_active(now);
                } else if !self.rx.ever_ready && silence > self.orphan_wait {
                    // Nobody has been active for long and we never held a full copy
                    // (both nodes lost state): serving beats not serving.
                    self.become_active(now);
                }
                // Drop what expired while waiting, so memory follows the active's
                // table (a takeover skips expired entries anyway). Rarely: the scan
                // visits the whole copy (tens of ms at a million).
                if now.since(self.last_sweep) >= SWEEP_EVERY {
                    self.last_sweep = now;
                    self.rx.store.retain(|_, st| st.expires > now);
                    self.sessions.retain(|_, st| st.expires > now);
                    self.names.prune();
                }
            }
            Role::Draining => {
                // The backup went away mid-handover: nobody will take over, so serve
                // again rather than drain forever.
                let alive = self
                    .tx
                    .peer_heard
                    .is_some_and(|t| now.since(t) <= self.cfg.detection);
                if !alive {
                    self.role = Role::Active;
                    self.tx.handover_sent = None;
                }
                self.report_status(now);
            }
            Role::Active => {
                if now.since(self.last_sweep) >= SWEEP_EVERY {
                    self.last_sweep = now;
                    self.sessions.retain(|_, st| st.expires > now);
                    self.names.prune();
                }
                self.report_status(now);
            }
        }
    }

    /// The checkpointed mappings this backup holds for a takeover: key and external
    /// endpoint.
    pub fn stored(&self) -> impl Iterator<Item = (MappingKey, (IpAddr, u16))> + '_ {
        self.rx.store.iter().map(|(k, st)| (*k, st.external))
    }

    /// The next event for the shell.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

/// The record replicated for a mapping.
fn record_of(m: &Mapping) -> MappingRecord {
    MappingRecord {
        key: m.key,
        nonce: m.nonce,
        external_addr: m.external.addr,
        external_port: m.external.port,
        remaining_ms: 0,
        lifetime: m.lifetime,
        origin: m.origin,
        requested: m.checkpoint_requested,
        forced_by: match &m.checkpoint {
            Reason::Forced(rule) => Some(rule.to_string()),
            _ => None,
        },
        client: m.client,
        filters: m.filters.to_vec(),
        description: m.description.as_deref().map(str::to_string),
        subscriber: match &m.subscriber {
            SubscriberId::Identity(n) if n.len() <= wire::MAX_NAME => {
                Subscriber::Identity(n.clone())
            }
            SubscriberId::Named(n) if n.len() <= wire::MAX_NAME => Subscriber::Entry(n.clone()),
            _ => Subscriber::Address,
        },
    }
}

/// The subscriber a replicated mapping names, for `Server::adopt` to charge the same
/// one (by address: the internal host's own prefix, which `adopt` looks up again).
/// Names are the interned ones of the record: no allocation per mapping.
fn replicated_subscriber(s: &Subscriber, key: &MappingKey) -> SubscriberId {
    match s {
        Subscriber::Identity(n) => SubscriberId::Identity(n.clone()),
        Subscriber::Entry(n) => SubscriberId::Named(n.clone()),
        Subscriber::Address => SubscriberId::Prefix(key.internal.into()),
    }
}

/// [`mapping_of`], taking the record (its strings and filters move instead of being
/// copied: a full copy streams a million of them through a standby backup).
fn into_mapping(r: MappingRecord, expires: Time, now: Time) -> Mapping {
    Mapping {
        key: r.key,
        nonce: r.nonce,
        origin: r.origin,
        client: r.client,
        external: pcp_server::pool::ExternalEndpoint {
            addr: r.external_addr,
            protocol: r.key.protocol,
            port: r.external_port,
        },
        expires,
        lifetime: r.lifetime,
        subscriber: replicated_subscriber(&r.subscriber, &r.key),
        checkpoint_requested: r.requested,
        checkpoint: match r.forced_by {
            Some(rule) => Reason::Forced(rule.into()),
            None => Reason::Requested,
        },
        filters: r.filters.into(),
        description: r.description.map(Into::into),
        created: now,
    }
}

/// The mapping a successor installs for a record.
fn mapping_of(r: &MappingRecord, expires: Time, now: Time) -> Mapping {
    Mapping {
        key: r.key,
        nonce: r.nonce,
        origin: r.origin,
        client: r.client,
        external: pcp_server::pool::ExternalEndpoint {
            addr: r.external_addr,
            protocol: r.key.protocol,
            port: r.external_port,
        },
        expires,
        lifetime: r.lifetime,
        subscriber: replicated_subscriber(&r.subscriber, &r.key),
        checkpoint_requested: r.requested,
        checkpoint: match &r.forced_by {
            Some(rule) => Reason::Forced(rule.as_str().into()),
            None => Reason::Requested,
        },
        filters: r.filters.clone().into(),
        description: r.description.as_deref().map(Into::into),
        created: now,
    }
}
