//! The daemon's owners of state. The server core and the data plane sit behind one lock
//! (`Core`): they are single-threaded by design and each call is short — but some calls
//! are not (a hash table growing near a million mappings, a takeover). The HA node and
//! the replies waiting for the backup sit behind a lock of their own (`Pair`), taken by
//! the request path only to queue records and by the replication thread for frames,
//! timers and heartbeats: a heartbeat never waits for the request path.
//!
//! Lock order: `Core` before `Pair`. Whoever holds `Pair` never waits for `Core`; what
//! the HA node asks of the core (bulk chunks, standby mirroring, promotion, step-down,
//! withdrawing late promises) is queued in `Pair::for_core` and carried out by the core
//! task ([`Core::ha_work`]).

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pcp_dataplane::{DataPlane, DataPlaneError, Op};
use pcp_ha::seal::{LinkKey, Opener, Reject, Sealer};
use pcp_ha::shell::{HeldReplies, Pending};
use pcp_ha::{Event, HaNode};
use pcp_proto::ResultCode;
use pcp_server::{BackupStatus, Change, Effect, Reply, Server, Time};
use tokio::net::UdpSocket;

use crate::config::Config;
use crate::metrics::Latency;

/// A reply that echoes option 192, waiting for the backup's acknowledgement (when it
/// goes out, and with or without 192, is decided by [`pcp_ha::shell::HeldReplies`],
/// which the simulator checks).
pub type Held = pcp_ha::shell::Held<Dest>;

/// Where a held reply goes.
#[derive(Debug)]
pub struct Dest {
    /// The client's address.
    pub addr: SocketAddr,
    /// Which listen socket it came in on.
    pub socket: usize,
    /// When the request arrived (latency).
    pub received: Instant,
    /// The PA session that authenticated the request: the reply is tagged when it is
    /// finally sent, after any rewrite (RFC 7652, docs/AUTH.md).
    pub session: Option<u32>,
}

/// A datagram served in a group ([`Core::handle_group`]).
#[derive(Debug)]
pub struct Job {
    /// The datagram is `datagram[..len]`.
    pub datagram: Vec<u8>,
    /// Its length.
    pub len: usize,
    /// Where it came from.
    pub src: SocketAddr,
    /// Which listen socket it came in on.
    pub socket: usize,
    /// When it was received (latency).
    pub received: Instant,
    /// The reply is written here (`Reply::Send(n)`: `reply[..n]`).
    pub reply: Vec<u8>,
    /// What to do with it.
    pub answer: Reply,
    /// The identity the authentication gate verified it as (RFC 7652), if any.
    pub identity: Option<Arc<str>>,
    /// The PA session that authenticated it: a held reply is tagged when sent.
    pub session: Option<u32>,
}

impl Job {
    /// An empty job with buffers for any datagram and reply.
    pub fn new(socket: usize) -> Job {
        Job {
            datagram: vec![0; 2048],
            len: 0,
            src: SocketAddr::from(([0, 0, 0, 0], 0)),
            socket,
            received: Instant::now(),
            reply: vec![0; pcp_proto::MAX_MESSAGE_LEN + 64],
            answer: Reply::Drop,
            identity: None,
            session: None,
        }
    }
}

/// A request of a group, served and waiting for the group's data plane batch.
struct Served {
    reply: Reply,
    journal: pcp_server::Journal,
    held: Option<Held>,
    /// Its replication records end here in `Core::changes`.
    changes_end: usize,
}

/// Data plane operations after which a group's batch is committed before the next
/// request is served: a batch must stay one kernel transaction (all-or-nothing) —
/// 128 operations are some tens of KiB of netlink messages, well under the 128 KiB a
/// transaction holds.
pub const GROUP_OPS: usize = 128;

/// Records queued for the core (mirrored changes, and one per other event) above
/// which a backup holds its acknowledgements.
const BACKLOG_HIGH: usize = 64 * 1024;
/// ... and below which it releases them.
const BACKLOG_LOW: usize = 16 * 1024;

/// What the beacon thread needs (`daemon::spawn_replication`), outside the pair
/// lock: the HA node's latest proof of life and when the link last sent anything.
/// While the pair lock is busy for longer than a heartbeat (bulk work, a thread
/// holding it descheduled on a starved machine), the beacon thread sends the
/// proof of life itself, so that the peer never counts a wait for a lock as silence.
#[derive(Debug, Default)]
pub struct BeaconCell {
    /// The node's beacon as of its last change (`None`: nothing to say out of turn).
    pub beacon: Mutex<Option<pcp_ha::Beacon>>,
    /// When a frame last went to the peer from the pair (milliseconds of shared time).
    pub last_sent: AtomicU64,
    /// Seals the beacon when the link has a key (the pair's own sealer: one counter).
    pub sealer: std::sync::OnceLock<Arc<Sealer>>,
}

/// The replication link's key material in use (see [`pcp_ha::seal`]).
#[derive(Debug)]
pub struct Link {
    /// This process's sending side, shared with the beacon thread.
    pub sealer: Arc<Sealer>,
    /// The peer's boots as seen from here.
    pub opener: Opener,
}

/// Replication frames refused before the HA node saw them (docs/HA.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LinkRejects {
    /// Failed authentication.
    pub auth: u64,
    /// Replayed.
    pub replay: u64,
    /// Plain frames at a node with a key.
    pub unkeyed: u64,
    /// Protected frames at a node without a key.
    pub keyed: u64,
}

/// Hosts that lost state at a takeover, by reason: their epoch starts again and they
/// get the ANNOUNCE burst (docs/HA.md "Epoch continuity and ANNOUNCE"). A host may
/// count under several reasons.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LostHosts {
    /// Known to hold mappings that were not checkpointed.
    pub unprotected: usize,
    /// A checkpointed mapping of theirs could not be adopted (its external endpoint
    /// not free in this node's pool, or a conflicting mapping).
    pub adopt_failed: usize,
    /// A replicated mapping of theirs was never installed in the standby core (its
    /// external endpoint stayed taken until the takeover).
    pub never_installed: usize,
}

/// The unsolicited ANNOUNCE burst to the hosts that lost state at a takeover (RFC 6887
/// §14.1.1's schedule, as the start-up burst), each from the listen socket it talks to.
#[derive(Debug)]
struct Burst {
    schedule: pcp_server::announce::AnnounceSchedule,
    /// Host, and the index of the listen socket its copies leave from.
    targets: Vec<(IpAddr, usize)>,
    /// The copy under way: how many hosts it reached so far (`None` between copies).
    /// A copy to hundreds of thousands of hosts goes out [`ANNOUNCE_PAGE`] hosts at a
    /// time: built and sent under the core lock in one go, it would stall every request.
    sent: Option<usize>,
    /// When the copy under way goes on.
    resume: Time,
}

impl Burst {
    fn new(targets: Vec<(IpAddr, usize)>, now: Time) -> Burst {
        Burst {
            schedule: pcp_server::announce::AnnounceSchedule::start(now),
            targets,
            sent: None,
            resume: now,
        }
    }

    /// When the burst next has something to send.
    fn next_due(&self) -> Option<Time> {
        match self.sent {
            Some(_) => Some(self.resume),
            None => self.schedule.next_due(),
        }
    }
}

/// Most hosts one wake of a takeover's ANNOUNCE burst sends a copy to (one datagram
/// each, or one per PA session).
const ANNOUNCE_PAGE: usize = 4096;

/// The pause between two pages of one ANNOUNCE copy: the core lock is free meanwhile.
const ANNOUNCE_PAGE_GAP: Duration = Duration::from_millis(1);

/// An unsolicited ANNOUNCE to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsolicited {
    /// The index of the listen socket it leaves from.
    pub socket: usize,
    /// Where it goes (the host's port 5350).
    pub to: SocketAddr,
    /// The message.
    pub datagram: Vec<u8>,
    /// Whether it carries an AUTHENTICATION_TAG.
    pub tagged: bool,
}

/// Unsolicited ANNOUNCEs sent to hosts (after takeovers), since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AnnounceStats {
    /// Sent without a tag (the host has no PA session).
    pub plain: u64,
    /// Tagged for a PA session of the host (RFC 7652).
    pub tagged: u64,
    /// Not sent: the host has a PA session that could not tag it, or the socket
    /// refused it.
    pub failed: u64,
}

/// At most one warning about refused frames per this long.
const REJECT_LOG_EVERY: Duration = Duration::from_secs(10);

/// Pair mode state, behind its own lock (see the module doc).
pub struct Pair {
    /// The HA state machine.
    pub node: HaNode,
    /// The peer's replication address.
    pub peer: SocketAddr,
    /// Replies waiting for acknowledgements, in sequence order.
    pub held: HeldReplies<Dest>,
    /// Replies released after the backup's acknowledgement.
    pub released: u64,
    /// Mappings adopted at the last takeover.
    pub adopted: usize,
    /// Failed adoptions (conflicts) at the last takeover.
    pub adopt_failures: usize,
    /// Hosts that lost state at the last takeover, by reason.
    pub lost_hosts: LostHosts,
    /// Promotions of the HA node (takeovers, switchovers, `pcpctl promote`), since start.
    pub promotions: u64,
    /// Step-downs (a newer active was heard), since start.
    pub demotions: u64,
    /// The PCP listen sockets (released replies go out on them).
    pub sockets: Vec<Arc<UdpSocket>>,
    /// The authentication gate, which tags released replies of authenticated requests
    /// (its lock is taken while holding this one, never the other way round).
    pub auth: Option<crate::auth::SharedAuth>,
    /// Latency of the replies released here (receive to send).
    pub latency: Latency,
    /// Events the server core must act on, in order.
    pub for_core: VecDeque<Event>,
    /// What `for_core` holds, in records (a mirrored batch counts its changes).
    backlog: usize,
    /// Held replies past their deadline: the core withdraws their promise, then sends
    /// them (a reply must never say less than the core's state).
    pub late: Vec<Held>,
    origin: Instant,
    frame_buf: Vec<u8>,
    socket: Option<std::net::UdpSocket>,
    /// When the HA node last promoted itself (the core logs how long carrying it out
    /// took: applying the standby backlog, then the takeover).
    pub promoted_at: Option<Instant>,
    /// Where the term is kept across restarts, and the term last written there.
    state_file: Option<(std::path::PathBuf, u64)>,
    /// Shared with the beacon thread.
    pub beacon: Arc<BeaconCell>,
    /// The replication link's protection (`[ha] key_file`), `None` for plain frames.
    pub link: Option<Link>,
    /// Frames refused by the link layer, by reason.
    pub rejected: LinkRejects,
    /// When a refused frame was last logged (rate limit).
    reject_logged: Option<Instant>,
}

impl Pair {
    /// Pair state around `node`, with the core's clock origin.
    pub fn new(node: HaNode, peer: SocketAddr, ack_timeout: Duration, origin: Instant) -> Pair {
        Pair {
            node,
            peer,
            held: HeldReplies::new(ack_timeout),
            released: 0,
            adopted: 0,
            adopt_failures: 0,
            lost_hosts: LostHosts::default(),
            promotions: 0,
            demotions: 0,
            sockets: Vec::new(),
            auth: None,
            latency: Latency::default(),
            for_core: VecDeque::new(),
            backlog: 0,
            late: Vec::new(),
            origin,
            frame_buf: Vec::new(),
            socket: None,
            promoted_at: None,
            state_file: None,
            beacon: Arc::default(),
            link: None,
            rejected: LinkRejects::default(),
            reject_logged: None,
        }
    }

    /// Seals and opens every replication frame with `key` (docs/HA.md "Replication
    /// link security"). `None` if the system gives no randomness for the salt.
    pub fn set_link_key(&mut self, key: &LinkKey) -> Option<()> {
        let sealer = Arc::new(Sealer::new(key)?);
        let opener = Opener::new(key, sealer.salt());
        self.beacon.sealer.set(sealer.clone()).ok()?;
        self.link = Some(Link { sealer, opener });
        Some(())
    }

    fn refuse(&mut self, why: Reject) {
        let n = match why {
            Reject::Auth => &mut self.rejected.auth,
            Reject::Replay => &mut self.rejected.replay,
            Reject::Unkeyed => &mut self.rejected.unkeyed,
            Reject::Keyed => &mut self.rejected.keyed,
        };
        *n += 1;
        if self
            .reject_logged
            .is_some_and(|t| t.elapsed() < REJECT_LOG_EVERY)
        {
            return;
        }
        self.reject_logged = Some(Instant::now());
        let peer = self.peer;
        let r = self.rejected;
        match why {
            Reject::Unkeyed => tracing::warn!(%peer, ?r,
                "replication frame without protection refused: this node has [ha] key_file, the peer has none; the pair does not peer until both use the same key"),
            Reject::Keyed => tracing::warn!(%peer, ?r,
                "protected replication frame refused: the peer has [ha] key_file, this node has none; the pair does not peer until both use the same key"),
            Reject::Auth => tracing::warn!(%peer, ?r,
                "replication frame failed authentication (another key, corrupted or forged): dropped; check that both nodes use the same [ha] key_file"),
            Reject::Replay => tracing::warn!(%peer, ?r,
                "replayed replication frame dropped"),
        }
    }

    /// Keeps the term in `path` (see [`read_term`]); the node starts from the term
    /// found there.
    pub fn keep_term_in(&mut self, path: std::path::PathBuf, term: u64) {
        self.node.set_term_floor(term);
        self.state_file = Some((path, term));
    }

    /// Writes a new term to the state file before anything of that term goes out.
    fn persist_term(&mut self) {
        let term = self.node.term();
        let Some((path, written)) = self.state_file.as_mut() else {
            return;
        };
        if term <= *written {
            return;
        }
        match write_term(path, term) {
            Ok(()) => *written = term,
            Err(e) => {
                tracing::error!(error = %e, path = %path.display(), term, "cannot record the HA term")
            }
        }
    }

    /// The shared time for an instant (same origin as the core's).
    pub fn time_of(&self, at: Instant) -> Time {
        Time(at.saturating_duration_since(self.origin).as_millis() as u64)
    }

    /// The time now.
    pub fn now(&self) -> Time {
        self.time_of(Instant::now())
    }

    /// The instant shared time counts from.
    pub fn origin(&self) -> Instant {
        self.origin
    }

    /// Whether the core has work queued.
    pub fn core_work(&self) -> bool {
        !self.for_core.is_empty() || !self.late.is_empty()
    }

    /// Backup: holds acknowledgements while the core's queue is long (and releases them
    /// once it is short), so the copy never runs further ahead of the standby core than
    /// this: bounded memory, and "acknowledged" stays close to "installed".
    fn backpressure(&mut self) {
        let queued = self.backlog;
        if queued > BACKLOG_HIGH {
            self.node.hold_acks(true);
        } else if queued < BACKLOG_LOW {
            self.node.hold_acks(false);
        }
    }

    /// Handles a replication frame from the peer.
    pub fn frame(&mut self, frame: &mut [u8]) {
        let opened = match &mut self.link {
            Some(link) => link.opener.open(frame),
            None if pcp_ha::seal::is_sealed(frame) => Err(Reject::Keyed),
            None => Ok(frame.len()),
        };
        let frame = match opened {
            Ok(n) => &frame[..n],
            Err(why) => return self.refuse(why),
        };
        let now = self.now();
        let t = Instant::now();
        self.node.handle_frame(frame, now);
        slow("handling a replication frame", t);
        self.route_events(now);
    }

    /// Frees what a role change let go of (a million records take a while) on a
    /// thread of its own, so a takeover does not wait for it.
    fn free_retired(&mut self) {
        if let Some(old) = self.node.take_retired() {
            let _ = std::thread::Builder::new()
                .name("pcpd-free".into())
                .spawn(move || drop(old));
        }
    }

    /// Tells the HA node that every frame that reached the replication socket before
    /// `at` was handled (see [`HaNode::link_read`]): silence is judged up to there.
    pub fn link_read(&mut self, at: Time) {
        self.node.link_read(at);
    }

    /// Runs HA timers and held-reply deadlines. Returns when to run again.
    pub fn tick(&mut self) -> Instant {
        let now = self.now();
        if self.node.poll_timeout().is_some_and(|t| t <= now) {
            let t = Instant::now();
            self.node.handle_timeout(now);
            slow("running HA timers", t);
        }
        self.route_events(now);
        self.late.extend(self.held.take_late(now));
        let next = self
            .node
            .poll_timeout()
            .into_iter()
            .chain(self.held.next_deadline())
            .min()
            .map_or(now.plus(Duration::from_millis(100)), |t| t);
        self.origin + Duration::from_millis(next.0)
    }

    /// Queues PA session changes for the backup (see `Auth::take_replication`).
    pub fn push_sessions(&mut self, changes: Vec<crate::auth::SessionChange>) {
        if changes.is_empty() {
            return;
        }
        let now = self.now();
        for c in changes {
            match c {
                crate::auth::SessionChange::Up(r) => self.node.push_session(r, now),
                crate::auth::SessionChange::Seq(id, s) => self.node.push_session_seq(id, s, now),
                crate::auth::SessionChange::End(id) => self.node.push_session_end(id, now),
            };
        }
    }

    /// Sends the peer whatever the HA node has to say now. Frames go out under the pair
    /// lock, so that two threads transmitting never reorder them on the wire (a gap
    /// would cost a go-back-N timeout).
    pub fn transmit(&mut self) {
        let now = self.now();
        let mut buf = std::mem::take(&mut self.frame_buf);
        buf.resize(pcp_ha::wire::MAX_FRAME + pcp_ha::seal::OVERHEAD, 0);
        while let Some(n) = self
            .node
            .poll_transmit(now, &mut buf[..pcp_ha::wire::MAX_FRAME])
        {
            let n = match &self.link {
                Some(link) => match link.sealer.seal(&mut buf, n) {
                    Some(n) => n,
                    None => continue,
                },
                None => n,
            };
            if let Some(sock) = &self.socket {
                match sock.send_to(&buf[..n], self.peer) {
                    Ok(_) => self.beacon.last_sent.store(now.0, Ordering::Relaxed),
                    // A full send buffer loses the frame; go-back-N sends it again.
                    Err(e) => tracing::debug!(error = %e, peer = %self.peer, "replication send"),
                }
            }
        }
        self.frame_buf = buf;
        // Transmitting may ask for a bulk chunk.
        self.route_events(now);
    }

    /// The replication socket frames are sent on (non-blocking).
    pub fn set_socket(&mut self, sock: std::net::UdpSocket) {
        self.socket = Some(sock);
    }

    /// Acknowledgements are handled here (held replies go out from this thread); the
    /// rest is for the core.
    fn route_events(&mut self, now: Time) {
        self.free_retired();
        self.backpressure();
        *self.beacon.beacon.lock().unwrap_or_else(|p| p.into_inner()) = self.node.beacon();
        while let Some(ev) = self.node.poll_event() {
            match ev {
                Event::Acked(cum) => self.release(cum, now),
                Event::Promoted { .. } => {
                    self.promoted_at = Some(Instant::now());
                    self.promotions += 1;
                    self.queue_for_core(ev);
                }
                Event::Demoted { .. } => {
                    self.demotions += 1;
                    // Nothing held will be confirmed by this stream any more; the
                    // clients retransmit to whoever serves now.
                    self.held.clear();
                    self.queue_for_core(ev);
                }
                ev => self.queue_for_core(ev),
            }
        }
    }

    fn queue_for_core(&mut self, ev: Event) {
        self.backlog += weight(&ev);
        self.for_core.push_back(ev);
    }

    /// Records queued for the core.
    pub fn backlog(&self) -> usize {
        self.backlog
    }

    /// Takes the next events for the core: about `records` records' worth, at least
    /// one event.
    fn take_for_core(&mut self, records: usize) -> Vec<Event> {
        let mut taken = 0;
        let mut n = 0;
        for ev in &self.for_core {
            if n > 0 && taken >= records {
                break;
            }
            taken += weight(ev);
            n += 1;
        }
        self.backlog = self.backlog.saturating_sub(taken);
        self.for_core.drain(..n).collect()
    }

    /// Holds `h` until the backup acknowledged record `h.seq`.
    fn hold(&mut self, h: Held, now: Time) {
        // Nothing to wait for (this node stopped being active meanwhile): the reply
        // goes out through the late path, without 192.
        if let Some(h) = self.held.hold(h, now) {
            self.late.push(h);
        }
    }

    /// Sends every held reply whose records the backup now holds.
    fn release(&mut self, cum: u64, now: Time) {
        let ready = self.held.release(cum, now);
        self.released += ready.len() as u64;
        for h in ready {
            send_held(&self.sockets, self.auth.as_ref(), &mut self.latency, &h);
        }
    }
}

/// For a held reply to an authenticated request: queues its session's sequence numbers
/// (the request's included) after the reply's own records and returns that record's
/// sequence number, which the reply then waits for — so a reply echoing 192 never
/// leaves before the backup knows the request's sequence number (docs/AUTH.md "Pair
/// mode"). `None` when nothing was queued (no session, not replicated, or unchanged
/// since the last record, which the reply's records follow anyway).
fn held_session_seq(
    auth: Option<&crate::auth::SharedAuth>,
    p: &mut Pair,
    session: Option<u32>,
    now: Time,
) -> Option<u64> {
    let (auth, id) = (auth?, session?);
    // The gate's lock under the pair's: the allowed order (module doc of auth.rs).
    let a = crate::auth::lock(auth);
    if p.node.has_session(id) {
        let seq = a.sequence_for_backup(id)?;
        p.node.push_session_seq(id, seq, now)
    } else {
        // Established in this very group (its record is queued after it): the whole
        // session now.
        let record = a.session_for_backup(id)?;
        p.node.push_session(record, now)
    }
}

/// The hosts whose state a mapping is: the client that asked for it, and the internal
/// host (they differ under THIRD_PARTY).
fn hosts_of(m: &pcp_server::Mapping) -> impl Iterator<Item = IpAddr> {
    let (client, internal) = (m.client.to_canonical(), m.key.internal.to_canonical());
    std::iter::once(client).chain((internal != client).then_some(internal))
}

/// Logs an HA node call that took long enough to matter for failure detection.
fn slow(what: &str, since: Instant) {
    let took = since.elapsed();
    if took >= Duration::from_millis(20) {
        tracing::info!(took_ms = took.as_millis() as u64, "{what}");
    }
}

/// Records an event stands for in the core's backlog.
fn weight(ev: &Event) -> usize {
    match ev {
        Event::Replica(r) => r.len().max(1),
        _ => 1,
    }
}

/// The term recorded in a state file: `Ok(0)` when there is none yet.
pub fn read_term(path: &std::path::Path) -> Result<u64, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .lines()
            .find_map(|l| l.strip_prefix("term "))
            .and_then(|t| t.trim().parse().ok())
            .ok_or_else(|| format!("{}: no \"term N\" line", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Writes the term to a temporary file, syncs it and renames it over `path`: a crash
/// leaves the old term or the new one, never a torn file.
fn write_term(path: &std::path::Path, term: u64) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    writeln!(f, "# pcpd HA state: the highest term this node has seen")?;
    writeln!(f, "term {term}")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Sends a held reply as it finally is (aged, maybe without 192): tagged now when its
/// request was authenticated, so the tag covers exactly what goes out.
fn send_held(
    sockets: &[Arc<UdpSocket>],
    auth: Option<&crate::auth::SharedAuth>,
    latency: &mut Latency,
    h: &Held,
) {
    let mut tagged;
    let reply: &[u8] = match (h.to.session, auth) {
        (Some(_), Some(a)) => {
            tagged = h.reply.clone();
            tagged.resize(pcp_proto::MAX_MESSAGE_LEN, 0);
            match crate::auth::lock(a)
                .gate
                .outbound(h.to.session, &mut tagged, h.reply.len())
            {
                Some(n) => &tagged[..n],
                // The session is gone: an untagged answer would be dropped by the
                // client anyway, which retransmits and re-authenticates.
                None => return,
            }
        }
        _ => &h.reply,
    };
    if let Some(sock) = sockets.get(h.to.socket)
        && let Err(e) = sock.try_send_to(reply, h.to.addr)
    {
        // No address: a held reply echoes 192, so its address would tell which host
        // holds a checkpointed flow (issue 7, privacy).
        tracing::debug!(error = %e, "sending a held reply");
    }
    latency.record(h.to.received.elapsed());
}

/// Everything behind the core lock.
pub struct Core {
    /// The protocol core.
    pub server: Server,
    /// What enforces mappings.
    pub dataplane: Box<dyn DataPlane>,
    /// The configuration in force (reloads replace it).
    pub config: Config,
    /// Request latency, receive to send (replies sent at once).
    pub latency: Latency,
    /// Data plane batches that failed (each is logged).
    pub dataplane_failures: u64,
    /// A batch failed outside a request (expiry, mirroring, takeover): the data plane
    /// may differ from the core's table until the next reconcile.
    pub dataplane_dirty: bool,
    /// Pair mode, when configured (its own lock).
    pub pair: Option<Arc<Mutex<Pair>>>,
    /// The PCP listen sockets (ANNOUNCEs and late replies go out on them).
    pub sockets: Vec<Arc<UdpSocket>>,
    /// Their access lists (with the refusal counters), in the same order.
    pub acls: Vec<Arc<crate::acl::SocketAcl>>,
    /// The authentication gate, for the admin API (its own lock: never take it while
    /// holding the core's; clone the handle and let go of the core first).
    pub auth: Option<crate::auth::SharedAuth>,
    /// Whether this core serves PCP: always without a pair; in pair mode from the
    /// moment it carried out a promotion until a step-down.
    serving: bool,
    /// Standby: replicated mappings whose external endpoint a stale entry still holds,
    /// installed once the copy's sweep removes it.
    pending: Pending,
    /// The ANNOUNCE burst of the last takeover, while copies are left.
    burst: Option<Burst>,
    /// Unsolicited ANNOUNCEs sent.
    pub announces: AnnounceStats,
    /// Whether the HA node serves (mirrored by the replication thread): a draining or
    /// demoted node stops answering at once.
    node_serves: Arc<AtomicBool>,
    origin: Instant,
    seed: u64,
    /// Mappings the server core's (and data plane's) tables are sized for at start and
    /// after a step-down (standby backup: the checkpoint capacity).
    presize: usize,
    effects: Vec<Effect>,
    ops: Vec<Op>,
    changes: Vec<Change>,
}

/// The core shared between tasks.
#[derive(Clone)]
pub struct Shared {
    core: Arc<Mutex<Core>>,
    pair: Option<Arc<Mutex<Pair>>>,
    /// Wakes the replication thread (records were queued).
    pub kick_ha: Arc<tokio::sync::Notify>,
    /// Wakes the core task (HA work queued).
    pub kick_core: Arc<tokio::sync::Notify>,
    /// Wakes the expiry task (its next wake came earlier: an ANNOUNCE burst began).
    pub kick_expiry: Arc<tokio::sync::Notify>,
    node_serves: Arc<AtomicBool>,
    /// Whether this node serves, for the serving file's writer (`[ha] serving_file`).
    pub serving_tx: Arc<tokio::sync::watch::Sender<crate::serving_file::State>>,
}

impl Shared {
    /// Wraps a core (and its pair state, if any).
    pub fn new(core: Core) -> Shared {
        let pair = core.pair.clone();
        let node_serves = core.node_serves.clone();
        Shared {
            core: Arc::new(Mutex::new(core)),
            pair,
            kick_ha: Arc::new(tokio::sync::Notify::new()),
            kick_core: Arc::new(tokio::sync::Notify::new()),
            kick_expiry: Arc::new(tokio::sync::Notify::new()),
            node_serves,
            serving_tx: Arc::new(tokio::sync::watch::Sender::new(Some(false))),
        }
    }

    /// Locks the core. A panic while holding the lock is a bug that already aborted a
    /// task; the state stays usable, so the poison is ignored.
    pub fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Locks the pair state (pair mode). Never wait for the core while holding it.
    #[track_caller]
    // A closure (`map`) would report its own location instead of the caller's.
    #[allow(clippy::manual_map)]
    pub fn lock_pair(&self) -> Option<PairGuard<'_>> {
        match &self.pair {
            Some(p) => Some(lock_pair(p)),
            None => None,
        }
    }

    /// Publishes whether the HA node serves, and wakes the core task when the HA node
    /// queued work for it. Call after every HA operation, with the pair lock held.
    pub fn after_ha(&self, pair: &mut Pair) {
        pair.persist_term();
        let serves = pair.node.serves();
        // Only a role change touches the watch (the request path calls this too).
        if self.node_serves.swap(serves, Ordering::AcqRel) != serves {
            crate::serving_file::publish(&self.serving_tx, serves);
        }
        if pair.core_work() {
            self.kick_core.notify_one();
        }
    }

    /// Wakes the replication thread (records were queued).
    pub fn kick(&self) {
        self.kick_ha.notify_one();
    }
}

/// The pair lock, held. Waiting for it or holding it long enough to delay heartbeats
/// is logged with the place that did it (the replication thread needs it for every
/// frame and timer).
pub struct PairGuard<'a> {
    guard: MutexGuard<'a, Pair>,
    since: Instant,
    at: &'static std::panic::Location<'static>,
}

/// Waits or holds longer than this are logged.
const PAIR_LOCK_SLOW: Duration = Duration::from_millis(50);

#[track_caller]
fn lock_pair(p: &Mutex<Pair>) -> PairGuard<'_> {
    let at = std::panic::Location::caller();
    let asked = Instant::now();
    let guard = p.lock().unwrap_or_else(|p| p.into_inner());
    let since = Instant::now();
    let waited = since - asked;
    if waited >= PAIR_LOCK_SLOW {
        tracing::info!(waited_ms = waited.as_millis() as u64, at = %at, "waited for the pair lock");
    }
    PairGuard { guard, since, at }
}

impl std::ops::Deref for PairGuard<'_> {
    type Target = Pair;
    fn deref(&self) -> &Pair {
        &self.guard
    }
}

impl std::ops::DerefMut for PairGuard<'_> {
    fn deref_mut(&mut self) -> &mut Pair {
        &mut self.guard
    }
}

impl Drop for PairGuard<'_> {
    fn drop(&mut self) {
        let held = self.since.elapsed();
        if held >= PAIR_LOCK_SLOW {
            tracing::info!(held_ms = held.as_millis() as u64, at = %self.at, "held the pair lock");
        }
    }
}

impl Core {
    /// A core whose clock origin is `origin`.
    pub fn new(
        server: Server,
        dataplane: Box<dyn DataPlane>,
        config: Config,
        origin: Instant,
        seed: u64,
        pair: Option<Pair>,
    ) -> Core {
        // A standby backup receives a full copy of up to `[checkpoint] capacity`
        // mappings: its tables are sized for it up front (growing them a million
        // entries in stalls the copy and rehashes everything). Only their index is
        // written now; memory is touched as mappings arrive. An active keeps the
        // size once it took over, so its tables do not grow under load either.
        // Any node: `[pcpd] expected_mappings`, so that an active (or a single node)
        // does not stall while its tables grow under load either.
        let presize = pair
            .as_ref()
            .filter(|p| p.node.config().standby)
            .map_or(0, |p| p.node.config().expected)
            .max(config.daemon.expected_mappings);
        let mut server = server;
        let mut dataplane = dataplane;
        server.reserve(presize);
        dataplane.reserve(presize);
        Core {
            presize,
            server,
            dataplane,
            config,
            latency: Latency::default(),
            dataplane_failures: 0,
            dataplane_dirty: false,
            serving: pair.is_none(),
            pair: pair.map(|p| Arc::new(Mutex::new(p))),
            sockets: Vec::new(),
            acls: Vec::new(),
            auth: None,
            pending: Pending::default(),
            burst: None,
            announces: AnnounceStats::default(),
            node_serves: Arc::new(AtomicBool::new(false)),
            origin,
            seed,
            effects: Vec::new(),
            ops: Vec::new(),
            changes: Vec::new(),
        }
    }

    /// The core's time for an instant.
    pub fn time_of(&self, at: Instant) -> Time {
        Time(at.saturating_duration_since(self.origin).as_millis() as u64)
    }

    /// The core's time now.
    pub fn now(&self) -> Time {
        self.time_of(Instant::now())
    }

    /// The instant of a core time.
    /// The epoch the server core gives `client` now (for answers made outside it: the
    /// authentication gate's).
    pub fn epoch_for(&mut self, client: IpAddr) -> u32 {
        let now = self.now();
        self.server.epochs().epoch(client.to_canonical(), now)
    }

    pub fn instant_of(&self, t: Time) -> Instant {
        self.origin + Duration::from_millis(t.0)
    }

    #[track_caller]
    // A closure (`map`) would report its own location instead of the caller's.
    #[allow(clippy::manual_map)]
    fn lock_pair(&self) -> Option<PairGuard<'_>> {
        match self.pair.as_deref() {
            Some(p) => Some(lock_pair(p)),
            None => None,
        }
    }

    /// Whether the core carried out a promotion (pair mode) and serves unless draining.
    pub fn serving(&self) -> bool {
        self.serving
    }

    /// Whether this node answers PCP now (always, unless it is a backup or draining).
    pub fn serves(&self) -> bool {
        self.serving && (self.pair.is_none() || self.node_serves.load(Ordering::Acquire))
    }

    /// Serves one datagram received on listen socket `socket`, alone (the daemon
    /// serves groups, [`Core::handle_group`]). A reply to send now is in `reply`; a
    /// reply that must wait for the backup is kept in the pair state and sent by the
    /// replication thread.
    #[cfg(test)]
    pub fn handle(
        &mut self,
        datagram: &[u8],
        src: SocketAddr,
        socket: usize,
        received: Instant,
        reply: &mut [u8],
    ) -> Reply {
        if !self.serves() {
            // A backup keeps quiet: the active (or the address's next owner) answers.
            return Reply::Drop;
        }
        let now = self.now();
        // Expiry first, in its own batch: the request's batch then holds only what the
        // request did, and a refusal takes back exactly that.
        self.server.expire(now, &mut self.effects);
        self.apply_effects(now);
        self.serve_alone(
            datagram,
            src,
            socket,
            received,
            reply,
            now,
            false,
            (None, None),
        )
    }

    /// Serves a group of datagrams with one data plane batch for all of them (group
    /// commit: one netlink transaction instead of one per request). Answers are left
    /// in each job's `answer` (and `reply`); replies held for the backup are kept in
    /// the pair state as with [`Core::handle`].
    ///
    /// The requests are served in order; their data plane operations go to the data
    /// plane together (cut after [`GROUP_OPS`] operations, so that a batch stays one
    /// kernel transaction) and their replication records are queued only once that
    /// batch committed. When the batch fails, the group is taken back, last request
    /// first, each through its journal — the table is then exactly what it was
    /// before the group, as is the data plane (batches are all-or-nothing), and
    /// nothing was replicated — and every request is served again alone, with its own
    /// batch: it is committed alone or refused, exactly as without grouping.
    pub fn handle_group(&mut self, jobs: &mut [Job]) {
        for j in jobs.iter_mut() {
            j.answer = Reply::Drop;
        }
        if !self.serves() || jobs.is_empty() {
            return;
        }
        let now = self.now();
        self.server.expire(now, &mut self.effects);
        self.apply_effects(now);
        self.ops.clear();
        self.changes.clear();
        let mut group = Vec::with_capacity(jobs.len());
        let mut first = 0;
        for i in 0..jobs.len() {
            let j = &mut jobs[i];
            let r = self.server.handle_as(
                &j.datagram[..j.len],
                j.src,
                j.identity.as_deref(),
                now,
                &mut j.reply,
                &mut self.effects,
            );
            let held = self.held_for(&r, &j.reply, j.src, j.socket, j.received, now, j.session);
            for e in self.effects.drain(..) {
                match e {
                    Effect::DataPlane(op) => self.ops.push(op),
                    Effect::Replicate(change) => self.changes.push(change),
                }
            }
            group.push(Served {
                reply: r,
                journal: self.server.take_journal(),
                held,
                changes_end: self.changes.len(),
            });
            if self.ops.len() >= GROUP_OPS || i + 1 == jobs.len() {
                self.commit_group(&mut jobs[first..=i], std::mem::take(&mut group), now);
                first = i + 1;
            }
        }
    }

    /// Commits the data plane batch of the requests just served (`jobs`, `served`):
    /// on success queues their records and sets their answers; on failure takes them
    /// back and serves them one by one (see [`Core::handle_group`]).
    fn commit_group(&mut self, jobs: &mut [Job], mut served: Vec<Served>, now: Time) {
        let failed = if self.ops.is_empty() {
            None
        } else {
            self.dataplane.apply(&self.ops).err()
        };
        let ops = self.ops.len();
        self.ops.clear();
        if let Some(e) = failed {
            self.dataplane_failures += 1;
            tracing::warn!(error = %e, ops, requests = jobs.len(), "data plane refused a group's batch; serving its requests one by one");
            // Nothing of the group was replicated or installed: take it back, last
            // first, and drop the take-back's records with the withheld ones.
            self.changes.clear();
            let mut journals = Vec::with_capacity(served.len());
            for s in served.into_iter().rev() {
                journals.push(s.journal.admitted());
                self.server.take_back(s.journal, now, &mut self.effects);
            }
            self.effects.clear();
            journals.reverse();
            for (j, admitted) in jobs.iter_mut().zip(journals) {
                // A request the rate limiter dropped stays dropped.
                if admitted {
                    j.answer = self.serve_alone(
                        &j.datagram[..j.len],
                        j.src,
                        j.socket,
                        j.received,
                        &mut j.reply,
                        now,
                        true,
                        (j.identity.as_deref(), j.session),
                    );
                }
            }
            return;
        }
        let changes = std::mem::take(&mut self.changes);
        let any_held = served.iter().any(|s| s.held.is_some());
        if let (Some(pair), true) = (self.pair.as_deref(), !changes.is_empty() || any_held) {
            let mut p = lock_pair(pair);
            let mut from = 0;
            for s in &mut served {
                let mut seq = 0;
                for change in &changes[from..s.changes_end] {
                    if let Some(x) = p.node.push_served(change, now) {
                        seq = x;
                    }
                }
                if let Some(mut h) = s.held.take() {
                    h.seq = held_session_seq(self.auth.as_ref(), &mut p, h.to.session, now)
                        .unwrap_or(seq);
                    p.hold(h, now);
                } else {
                    for change in &changes[from..s.changes_end] {
                        p.held.supersede(change);
                    }
                }
                from = s.changes_end;
            }
        }
        self.changes = changes;
        self.changes.clear();
        for (j, s) in jobs.iter_mut().zip(served) {
            j.answer = self.answer_of(s.reply);
        }
    }

    /// The reply of a request that `r` asks to hold for the backup, when this node has one.
    #[allow(clippy::too_many_arguments)]
    fn held_for(
        &self,
        r: &Reply,
        reply: &[u8],
        to: SocketAddr,
        socket: usize,
        received: Instant,
        now: Time,
        session: Option<u32>,
    ) -> Option<Held> {
        match r {
            Reply::Hold(n) if self.pair.is_some() => Some(Held {
                seq: 0,
                reply: reply[..*n].to_vec(),
                key: held_key(&reply[..*n], to),
                at: now,
                deadline: now,
                waited: false,
                to: Dest {
                    addr: to,
                    socket,
                    received,
                    session,
                },
            }),
            _ => None,
        }
    }

    /// What the shell does with a committed request's reply.
    fn answer_of(&self, r: Reply) -> Reply {
        match r {
            Reply::Hold(_) if self.pair.is_some() => Reply::Drop,
            // Without a pair the core never holds (its backup status stays `None`).
            Reply::Hold(n) => Reply::Send(n),
            other => other,
        }
    }

    /// Serves one request with a data plane batch of its own (expiry already done at
    /// `now`). `again`: the request was served before and taken back (the rate
    /// limiter is not charged twice).
    #[allow(clippy::too_many_arguments)]
    fn serve_alone(
        &mut self,
        datagram: &[u8],
        src: SocketAddr,
        socket: usize,
        received: Instant,
        reply: &mut [u8],
        now: Time,
        again: bool,
        (identity, session): (Option<&str>, Option<u32>),
    ) -> Reply {
        let r = if again {
            self.server
                .handle_again(datagram, src, identity, now, reply, &mut self.effects)
        } else {
            self.server
                .handle_as(datagram, src, identity, now, reply, &mut self.effects)
        };
        let held = self.held_for(&r, reply, src, socket, received, now, session);
        if let Err(e) = self.apply_effects_holding(now, held, true) {
            // No false SUCCESS: the kernel does not translate what the reply would
            // promise. The request is taken back and answered with the error; the
            // backup never heard of it (its records were withheld), so the take-back's
            // records, which cancel them, are dropped too.
            let code = match e {
                DataPlaneError::Failure(_) => ResultCode::NetworkFailure,
                DataPlaneError::NoResources(_) => ResultCode::NoResources,
            };
            let r = self
                .server
                .refuse(datagram, src, now, code, reply, &mut self.effects);
            self.effects.clear();
            return r;
        }
        self.answer_of(r)
    }

    /// Removes expired mappings, and sends the ANNOUNCE copies due.
    pub fn expire(&mut self) {
        self.send_announces();
        let now = self.now();
        self.server.expire(now, &mut self.effects);
        self.apply_effects(now);
        if self.dataplane_dirty {
            let _ = self.reconcile();
        }
    }

    /// Makes the data plane hold exactly the core's mappings.
    pub fn reconcile(&mut self) -> Result<(), DataPlaneError> {
        let entries: Vec<pcp_dataplane::Entry> = self
            .server
            .mappings()
            .map(|m| pcp_server::entry_of(&m.key, m.external, &m.filters))
            .collect();
        let r = self.dataplane.reconcile(&entries);
        match &r {
            Ok(()) => {
                if self.dataplane_dirty {
                    tracing::info!(entries = entries.len(), "data plane reconciled");
                }
                self.dataplane_dirty = false;
            }
            Err(e) => tracing::error!(error = %e, "reconciling the data plane"),
        }
        r
    }

    /// Carries out pending effects that are not a client's request (expiry, mirroring,
    /// takeover): data plane operations as one batch, replication records to the HA
    /// node. A failed batch is logged and counted and the data plane marked for a
    /// reconcile; the core has moved on regardless. Returns the last sequence number
    /// queued (0: none).
    fn apply_effects(&mut self, now: Time) -> u64 {
        self.apply_effects_holding(now, None, false).unwrap_or(0)
    }

    /// [`Core::apply_effects`], and holds `held` (if any) until the backup acknowledged
    /// the records just queued. The pair lock is taken once, after the data plane.
    /// For a client's `request` the data plane goes first and must succeed: on failure
    /// nothing is queued for the backup, nothing is held, and the error is returned
    /// (the caller refuses the request).
    fn apply_effects_holding(
        &mut self,
        now: Time,
        held: Option<Held>,
        request: bool,
    ) -> Result<u64, DataPlaneError> {
        self.ops.clear();
        self.changes.clear();
        for e in self.effects.drain(..) {
            match e {
                Effect::DataPlane(op) => self.ops.push(op),
                Effect::Replicate(change) => self.changes.push(change),
            }
        }
        if !self.ops.is_empty()
            && let Err(e) = self.dataplane.apply(&self.ops)
        {
            self.dataplane_failures += 1;
            if request {
                tracing::warn!(error = %e, ops = self.ops.len(), "data plane refused a request's batch");
                self.changes.clear();
                return Err(e);
            }
            tracing::error!(error = %e, ops = self.ops.len(), "data plane batch failed; reconciling at the next tick");
            self.dataplane_dirty = true;
        }
        if self.changes.is_empty() && held.is_none() {
            return Ok(0);
        }
        let Some(pair) = self.pair.as_deref() else {
            return Ok(0);
        };
        let mut p = lock_pair(pair);
        let mut seq = 0;
        for change in &self.changes {
            let pushed = if request {
                p.node.push_served(change, now)
            } else {
                p.node.push(change, now)
            };
            if let Some(s) = pushed {
                seq = s;
            }
        }
        if let Some(mut h) = held {
            h.seq = held_session_seq(self.auth.as_ref(), &mut p, h.to.session, now).unwrap_or(seq);
            p.hold(h, now);
        } else if request {
            for change in &self.changes {
                p.held.supersede(change);
            }
        }
        Ok(seq)
    }

    /// Carries out one batch of what the HA node queued for the core: bulk chunks,
    /// standby mirroring, promotion, step-down, and late replies. Returns whether the
    /// replication thread has something new to send, and whether more is queued (the
    /// caller releases the core lock between batches, so that requests and the admin
    /// API are not shut out while a copy streams in).
    pub fn ha_work(&mut self) -> (bool, bool) {
        let (events, late, more) = {
            let Some(mut p) = self.lock_pair() else {
                return (false, false);
            };
            let events = p.take_for_core(4096);
            p.backpressure();
            (events, std::mem::take(&mut p.late), !p.for_core.is_empty())
        };
        if events.is_empty() && late.is_empty() {
            return (false, more);
        }
        let now = self.now();
        // Acknowledgements may be due again (backpressure released).
        let mut kicked = !events.is_empty();
        for ev in events {
            // Mirrored changes go to the data plane as one batch per run of them (one
            // netlink transaction instead of one per mapping), cut after `GROUP_OPS`
            // operations so that a batch stays one kernel transaction; anything else
            // sees the data plane in step.
            let mirrored = matches!(ev, Event::Replica(_));
            if !mirrored && !self.effects.is_empty() {
                self.apply_effects(now);
            }
            kicked |= self.core_event(ev, now);
        }
        if !self.effects.is_empty() {
            self.apply_effects(now);
        }
        if !late.is_empty() {
            self.late_replies(late, now);
            kicked = true;
        }
        (kicked, more)
    }

    fn core_event(&mut self, ev: Event, now: Time) -> bool {
        match ev {
            Event::Acked(_) => false,
            Event::BackupStatus(s) => {
                tracing::info!(status = ?s, "backup status");
                self.server.set_backup_status(s);
                false
            }
            Event::NeedBulk { cursor } => {
                let chunk = self
                    .lock_pair()
                    .map_or(2048, |p| p.node.config().bulk_chunk);
                let (maps, next) = self.server.checkpointed_from(cursor, chunk);
                let hosts: Vec<IpAddr> = if next.is_none() {
                    self.server.unprotected_hosts().collect()
                } else {
                    Vec::new()
                };
                if let Some(mut p) = self.lock_pair() {
                    p.node.bulk_chunk(cursor, &maps, next, &hosts, now);
                }
                true
            }
            Event::Replica(change) => {
                self.mirror(change, now);
                false
            }
            Event::Demoted { term } => {
                tracing::warn!(term, "a newer active exists: stepping down to backup");
                self.serving = false;
                // The new active speaks for the service address now.
                self.burst = None;
                self.reset_server(now);
                if let Some(a) = &self.auth {
                    crate::auth::lock(a).drop_sessions();
                }
                false
            }
            Event::PredecessorDiverged { term } => {
                self.predecessor_diverged(term, now);
                self.send_announces();
                false
            }
            Event::Promoted {
                term,
                mappings,
                unprotected_hosts,
                protected_hosts,
                epoch_base,
                complete,
            } => {
                self.take_over(
                    term,
                    &mappings,
                    (&unprotected_hosts, &protected_hosts),
                    epoch_base,
                    complete,
                    now,
                );
                // The replicated PA sessions, before the first request is served.
                if let Some(a) = &self.auth {
                    let sessions = self
                        .lock_pair()
                        .map(|p| p.node.sessions(now))
                        .unwrap_or_default();
                    crate::auth::lock(a).adopt_sessions(&sessions);
                }
                self.serving = true;
                // The burst's first copy, once the sessions are adopted: it is tagged
                // for them.
                self.send_announces();
                true
            }
        }
    }

    /// Standby: keeps this backup's own core (and data plane) in step with the copy, so
    /// that a takeover has nothing left to install.
    fn mirror(&mut self, change: pcp_ha::Replica, now: Time) {
        match change {
            pcp_ha::Replica::Upsert(maps) => {
                for m in maps {
                    self.pending
                        .upsert(&mut self.server, m, now, &mut self.effects);
                    self.mirror_batch_full(now);
                }
            }
            pcp_ha::Replica::Remove(keys) => {
                for k in &keys {
                    self.server.mirror_remove(k, &mut self.effects);
                    self.mirror_batch_full(now);
                }
                // What the active removed must not come back from what waits.
                self.pending.remove(&keys);
                self.pending.retry(&mut self.server, now, &mut self.effects);
            }
        }
        // The rest is applied by `ha_work`, at the end of the run of mirrored changes.
    }

    /// Cuts the data plane batch of a run of mirrored changes once it holds
    /// `GROUP_OPS` operations (one kernel transaction each).
    fn mirror_batch_full(&mut self, now: Time) {
        if self.effects.len() >= GROUP_OPS {
            self.apply_effects(now);
        }
    }

    /// A fresh, empty server core (and data plane): this node stopped being active.
    fn reset_server(&mut self, now: Time) {
        let removals: Vec<Op> = self
            .server
            .mappings()
            .map(|m| Op::Remove(pcp_server::entry_of(&m.key, m.external, &m.filters)))
            .collect();
        if !removals.is_empty()
            && let Err(e) = self.dataplane.apply(&removals)
        {
            tracing::error!(error = %e, "clearing the data plane");
            self.dataplane_dirty = true;
        }
        self.seed = self.seed.wrapping_add(1);
        if let Ok(s) = Server::new(self.config.server.clone(), now, self.seed) {
            self.server = s;
            self.server.reserve(self.presize);
        }
        self.pending.clear();
        let base = self.server.epochs().base();
        if let Some(mut p) = self.lock_pair() {
            p.node.set_epoch_base(base);
        }
    }

    fn take_over(
        &mut self,
        term: u64,
        mappings: &[pcp_server::Mapping],
        (unprotected, protected): (&[IpAddr], &[IpAddr]),
        epoch_base: Option<Time>,
        complete: bool,
        now: Time,
    ) {
        // The epoch starts now for every client (any of them may have lost state),
        // except hosts whose every mapping is held here: theirs continues. In standby
        // mode the core already holds the copy; otherwise a fresh one adopts it.
        // Hosts of a checkpointed mapping that is not installed here lost state as
        // surely as those of an unprotected one: their epoch starts again and they are
        // told, whatever their other mappings (the issue's "keeps the epoch continuous
        // for hosts whose mappings were all checkpointed" means all *held here*).
        let mut never_installed: Vec<IpAddr> = Vec::new();
        let mut not_installed = 0;
        if mappings.is_empty() {
            self.server.epochs().set_base(now);
            for m in self.pending.take() {
                // One that expired meanwhile is gone on the old active too.
                if m.expires > now {
                    not_installed += 1;
                    never_installed.extend(hosts_of(&m));
                }
            }
            if not_installed > 0 {
                tracing::error!(
                    count = not_installed,
                    "replicated mappings never installed (their external endpoints stayed taken): their hosts lost state"
                );
            }
        } else {
            self.reset_server(now);
        }
        if let Some(base) = epoch_base {
            if mappings.is_empty() && protected.is_empty() {
                // Standby: the hosts this core holds, less those known exposed.
                let exposed: std::collections::HashSet<&IpAddr> = unprotected.iter().collect();
                let hosts: Vec<IpAddr> = self
                    .server
                    .hosts()
                    .filter(|h| !exposed.contains(h))
                    .collect();
                for host in hosts {
                    self.server.epochs().set(host, base);
                }
            }
            for host in protected {
                self.server.epochs().set(*host, base);
            }
        }
        let mut failures = 0;
        let mut adopt_failed: Vec<IpAddr> = Vec::new();
        let (mut unavailable, mut exists) = (0usize, 0usize);
        for m in mappings {
            if let Err(e) = self.server.adopt(m, now, &mut self.effects) {
                // Not logged one by one: the error names the mapping, and the log
                // must not say which flows of which host are checkpointed (issue 7).
                // The counts go to the log below, GET /ha and the metrics.
                failures += 1;
                match e {
                    pcp_server::AdoptError::EndpointUnavailable(_) => unavailable += 1,
                    pcp_server::AdoptError::Exists(_) => exists += 1,
                }
                adopt_failed.extend(hosts_of(m));
            }
        }
        self.apply_effects(now);
        adopt_failed.sort_unstable();
        adopt_failed.dedup();
        never_installed.sort_unstable();
        never_installed.dedup();
        if failures > 0 {
            tracing::error!(
                failures,
                endpoint_unavailable = unavailable,
                exists,
                hosts = adopt_failed.len(),
                "checkpointed mappings not adopted (is the pool the same on both nodes?): their hosts lost state"
            );
        }
        // Hosts that lost state: their epoch starts again now, and they are told at
        // once (then at doubling gaps), so they re-create what they lost.
        let mut lost: Vec<IpAddr> = unprotected
            .iter()
            .chain(&adopt_failed)
            .chain(&never_installed)
            .map(|h| h.to_canonical())
            .collect();
        lost.sort_unstable();
        lost.dedup();
        for host in &lost {
            self.server.epochs().reset(*host, now);
        }
        let targets: Vec<(IpAddr, usize)> = lost
            .iter()
            .filter_map(|h| Some((*h, self.announce_socket(*h)?)))
            .collect();
        if targets.len() < lost.len() {
            tracing::warn!(
                hosts = lost.len() - targets.len(),
                "no listen socket of their address family admits some hosts that lost state: not announced"
            );
        }
        self.burst = (!targets.is_empty()).then(|| Burst::new(targets, now));
        let lost_hosts = LostHosts {
            unprotected: unprotected.len(),
            adopt_failed: adopt_failed.len(),
            never_installed: never_installed.len(),
        };
        let base = self.server.epochs().base();
        let adopted = if mappings.is_empty() {
            self.server.checkpointed_count() as usize
        } else {
            mappings.len() - failures
        };
        let mut promotion_ms = 0;
        if let Some(mut p) = self.lock_pair() {
            p.node.set_epoch_base(base);
            p.adopted = adopted;
            p.adopt_failures = failures + not_installed;
            p.lost_hosts = lost_hosts;
            promotion_ms = p.promoted_at.map_or(0, |t| t.elapsed().as_millis() as u64);
        }
        tracing::warn!(
            term,
            adopted,
            failures = failures + not_installed,
            complete,
            promotion_ms,
            announced = lost.len(),
            unprotected = lost_hosts.unprotected,
            adopt_failed = lost_hosts.adopt_failed,
            never_installed = lost_hosts.never_installed,
            "took over as active"
        );
    }

    /// The active this node took over from served on after the takeover (an HA-link
    /// partition, or it was frozen and woke up) and has now stepped down, dropping
    /// whatever it changed meanwhile. Which clients it answered is unknown here, so
    /// every client whose epoch was carried over at the takeover (the only ones that
    /// would see a continuous epoch and miss the loss) starts its epoch again now and
    /// gets the ANNOUNCE burst. Clients this node never carried over already see an
    /// epoch that started at the takeover, earlier than the one the old active showed
    /// them.
    fn predecessor_diverged(&mut self, term: u64, now: Time) {
        let hosts = self.server.epochs().carried_over();
        for host in &hosts {
            self.server.epochs().reset(*host, now);
        }
        let mut targets: Vec<(IpAddr, usize)> = hosts
            .iter()
            .filter_map(|h| Some((*h, self.announce_socket(*h)?)))
            .collect();
        tracing::warn!(
            term,
            hosts = hosts.len(),
            announced = targets.len(),
            "the previous active served after the takeover and stepped down: epochs carried over from it start again"
        );
        if targets.is_empty() || !self.serving {
            return;
        }
        // A burst still running (the takeover's) goes on with the new hosts, from the
        // start of the schedule.
        if let Some(old) = self.burst.take() {
            targets.extend(old.targets);
            targets.sort_unstable();
            targets.dedup();
        }
        self.burst = Some(Burst::new(targets, now));
    }

    /// The listen socket an ANNOUNCE to `host` leaves from: the address the host talks
    /// to, as far as this node can tell — of the host's address family, admitting the
    /// host, the one whose access list names it most specifically (`[[acl.listen]]`),
    /// the first of those on a tie. A successor never saw the host's requests; the
    /// access lists are what says which service address is whose.
    fn announce_socket(&self, host: IpAddr) -> Option<usize> {
        let host = host.to_canonical();
        let mut best: Option<(usize, (u8, bool))> = None;
        for (i, sock) in self.sockets.iter().enumerate() {
            let Ok(local) = sock.local_addr() else {
                continue;
            };
            // A dual-stack socket ([::]) reaches IPv4 hosts too, but one of the
            // host's own family is preferred on a tie.
            let same = local.is_ipv4() == host.is_ipv4();
            if !same && local.ip() != IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED) {
                continue;
            }
            let specific = match self.acls.get(i) {
                Some(acl) => match acl.match_len(host) {
                    Some(n) => n,
                    None => continue,
                },
                None => 0,
            };
            let score = (specific, same);
            if best.is_none_or(|(_, b)| score > b) {
                best = Some((i, score));
            }
        }
        best.map(|(i, _)| i)
    }

    /// The ANNOUNCE copies due at `now`, if any, for the hosts of the takeover's burst:
    /// the next page (at most [`ANNOUNCE_PAGE`] hosts) of the copy under way. The next
    /// copy of the schedule starts once the one before reached every host.
    /// A host with PA sessions gets one copy per session, tagged for it as a response
    /// would be (RFC 7652 §3.2: an unsolicited message to a client with a PA session
    /// carries its tag); the others one plain copy.
    pub fn announce_due(&mut self, now: Time) -> Vec<Unsolicited> {
        if !self.serves() {
            // Stepped down or draining: whoever serves next speaks for the address.
            self.burst = None;
            return Vec::new();
        }
        let Some(burst) = self.burst.as_mut() else {
            return Vec::new();
        };
        let from = match burst.sent {
            Some(_) if now < burst.resume => return Vec::new(),
            Some(n) => n,
            None if !burst.schedule.poll(now) => return Vec::new(),
            None => 0,
        };
        let to = burst.targets.len().min(from + ANNOUNCE_PAGE);
        let page = burst.targets[from..to].to_vec();
        if to < burst.targets.len() {
            burst.sent = Some(to);
            burst.resume = now.plus(ANNOUNCE_PAGE_GAP);
        } else {
            burst.sent = None;
            if burst.schedule.next_due().is_none() {
                self.burst = None;
            }
        }
        self.announce_to(&page, now, true)
    }

    /// ANNOUNCE datagrams to `targets` (host, listen socket) at `now`: one per PA
    /// session of a host that has any, tagged for it; with `plain`, one untagged for
    /// each other host.
    fn announce_to(
        &mut self,
        targets: &[(IpAddr, usize)],
        now: Time,
        plain: bool,
    ) -> Vec<Unsolicited> {
        let mut auth = self.auth.as_ref().filter(|a| a.on()).map(crate::auth::lock);
        let sessions = auth
            .as_ref()
            .map(|a| a.sessions_of(targets.iter().map(|(h, _)| *h)))
            .unwrap_or_default();
        let mut out = Vec::with_capacity(targets.len());
        let mut buf = [0u8; pcp_proto::MAX_MESSAGE_LEN];
        for &(host, socket) in targets {
            let to = SocketAddr::new(host, pcp_proto::CLIENT_PORT);
            let n = self.server.announce(Some(host), now, &mut buf);
            match (sessions.get(&host), auth.as_mut()) {
                (Some(ids), Some(a)) => {
                    for id in ids {
                        let mut tagged = buf;
                        match a.tag_unsolicited(*id, &mut tagged, n) {
                            Some(len) => out.push(Unsolicited {
                                socket,
                                to,
                                datagram: tagged[..len].to_vec(),
                                tagged: true,
                            }),
                            None => self.announces.failed += 1,
                        }
                    }
                }
                _ if plain => out.push(Unsolicited {
                    socket,
                    to,
                    datagram: buf[..n].to_vec(),
                    tagged: false,
                }),
                _ => {}
            }
        }
        out
    }

    /// A copy of the start-up ANNOUNCE burst for the hosts with PA sessions: the
    /// multicast copy carries no tag (it is for everyone), and a client with a session
    /// drops untagged messages (RFC 7652 §3.2), so each gets a unicast copy tagged for
    /// its session.
    pub fn send_session_announces(&mut self, now: Time) {
        let hosts = match self.auth.as_ref().filter(|a| a.on()) {
            Some(a) => crate::auth::lock(a).session_hosts(),
            None => return,
        };
        let targets: Vec<(IpAddr, usize)> = hosts
            .into_iter()
            .filter_map(|h| Some((h, self.announce_socket(h)?)))
            .collect();
        let out = self.announce_to(&targets, now, false);
        self.send(out);
    }

    /// Sends ANNOUNCE datagrams, counting them.
    fn send(&mut self, out: Vec<Unsolicited>) {
        for u in out {
            let sent = self
                .sockets
                .get(u.socket)
                .map(|s| s.try_send_to(&u.datagram, u.to));
            match sent {
                Some(Ok(_)) if u.tagged => self.announces.tagged += 1,
                Some(Ok(_)) => self.announces.plain += 1,
                // A full send buffer loses this copy; the next one follows.
                _ => self.announces.failed += 1,
            }
        }
    }

    /// Sends the ANNOUNCE copies due now ([`Core::announce_due`]).
    pub fn send_announces(&mut self) {
        let now = self.now();
        let out = self.announce_due(now);
        self.send(out);
    }

    /// Whether an ANNOUNCE copy is under way, its next page due at the next wake
    /// ([`Core::next_wake`]).
    pub fn announce_paging(&self) -> bool {
        self.burst.as_ref().is_some_and(|b| b.sent.is_some())
    }

    /// When the core next has timed work: an expiry, or an ANNOUNCE copy.
    pub fn next_wake(&mut self) -> Option<Time> {
        let burst = self.burst.as_ref().and_then(Burst::next_due);
        match (self.server.next_timeout(), burst) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Replies the backup did not confirm in time go out without 192, and their
    /// mappings stop being checkpointed: an honest "not honoured". When withdrawing
    /// makes a host record (the host's first unprotected mapping), the reply waits once
    /// more, for the backup to hold it — a successor that still holds the mapping at its
    /// older expiry must know to reset the host's epoch (see `pcp_ha::shell::withdraw`).
    fn late_replies(&mut self, late: Vec<Held>, now: Time) {
        for mut h in late {
            // Only a promise is withdrawn (a reply held because it exposed its host goes
            // out as it is), and only if no later request changed the mapping since.
            // Decided under the core lock, which every request holds.
            let withdraw = self
                .pair
                .as_deref()
                .is_some_and(|p| lock_pair(p).held.settle(&mut h));
            if withdraw && pcp_ha::shell::withdraw(&mut self.server, &h.key, &mut self.effects) {
                // Not a client's request: a data plane failure is healed later.
                let _ = self.apply_effects_holding(now, Some(h), false);
                continue;
            }
            self.apply_effects(now);
            pcp_server::age_held_reply(&mut h.reply, now.since(h.at));
            send_held(&self.sockets, self.auth.as_ref(), &mut self.latency, &h);
        }
    }

    /// Operator command: promote this backup now.
    pub fn promote(pair: &mut Pair) -> Result<(), String> {
        let now = pair.now();
        if pair.node.serves() {
            return Err("this node is already active".into());
        }
        pair.node.promote(now);
        pair.route_events(now);
        Ok(())
    }

    /// Operator command: hand over to the backup.
    pub fn switchover(pair: &mut Pair) -> Result<(), String> {
        let now = pair.now();
        if pair.node.switchover(now) {
            Ok(())
        } else {
            Err("only an active with a ready backup can hand over".into())
        }
    }

    /// The backup status the server core works with.
    pub fn backup_status(&self) -> BackupStatus {
        self.server.backup_status()
    }
}

/// The key of the mapping a held (MAP or PEER success) reply is about.
fn held_key(reply: &[u8], src: SocketAddr) -> pcp_server::MappingKey {
    let resp = pcp_proto::Response::parse(reply).ok();
    let third_party = resp.and_then(|r| r.options.third_party());
    let (mapping, remote) = match resp.map(|r| r.body) {
        Some(pcp_proto::Body::Peer(p)) => (Some(p.mapping), Some((p.remote_addr, p.remote_port))),
        Some(pcp_proto::Body::Map(m)) => (Some(m), None),
        _ => (None, None),
    };
    let m = mapping.unwrap_or(pcp_proto::MapBody {
        nonce: [0; 12],
        protocol: 0,
        internal_port: 0,
        external_port: 0,
        external_addr: IpAddr::from([0, 0, 0, 0]),
    });
    pcp_server::MappingKey {
        internal: third_party.unwrap_or(src.ip().to_canonical()),
        protocol: m.protocol,
        internal_port: m.internal_port,
        remote,
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use pcp_dataplane::memory::MemoryDataPlane;
    use pcp_proto::{Body, MapBody, Options, Request, Response};

    /// The memory data plane, refusing every batch while `refuse` is set.
    struct Flaky {
        inner: MemoryDataPlane,
        refuse: Arc<std::sync::atomic::AtomicBool>,
    }

    impl DataPlane for Flaky {
        fn apply(&mut self, batch: &[Op]) -> Result<(), DataPlaneError> {
            if self.refuse.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(DataPlaneError::Failure("injected".into()));
            }
            self.inner.apply(batch)
        }
        fn len(&self) -> usize {
            self.inner.len()
        }
        fn name(&self) -> &'static str {
            "flaky"
        }
        fn reconcile(&mut self, entries: &[pcp_dataplane::Entry]) -> Result<(), DataPlaneError> {
            if self.refuse.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(DataPlaneError::Failure("injected".into()));
            }
            self.inner.reconcile(entries)
        }
    }

    #[test]
    fn a_dirty_data_plane_is_reconciled_at_the_next_tick() {
        let config = Config::embedded();
        let server = Server::new(config.server.clone(), Time(0), 1).unwrap();
        let refuse = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let dp = Flaky {
            inner: MemoryDataPlane::new(),
            refuse: refuse.clone(),
        };
        let mut core = Core::new(server, Box::new(dp), config, Instant::now(), 1, None);
        let src: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let mut reply = vec![0u8; 1100];
        for port in [5000, 5001] {
            core.handle(&map_request(port, 3600), src, 0, Instant::now(), &mut reply);
        }
        assert_eq!(core.dataplane.len(), 2);
        // The kernel lost its entries behind pcpd's back, and a batch outside a request
        // failed (marking the data plane dirty); the reconcile fails too at first.
        core.dataplane.reconcile(&[]).unwrap();
        core.dataplane_dirty = true;
        refuse.store(true, std::sync::atomic::Ordering::Relaxed);
        core.expire();
        assert!(
            core.dataplane_dirty,
            "still dirty while the data plane refuses"
        );
        refuse.store(false, std::sync::atomic::Ordering::Relaxed);
        core.expire();
        assert!(!core.dataplane_dirty);
        assert_eq!(core.dataplane.len(), 2, "both mappings back");
    }

    fn map_request(port: u16, lifetime: u32) -> Vec<u8> {
        let req = Request {
            lifetime,
            client_addr: "10.0.0.1".parse().unwrap(),
            body: Body::Map(MapBody {
                nonce: [7; 12],
                protocol: 17,
                internal_port: port,
                external_port: 0,
                external_addr: "0.0.0.0".parse().unwrap(),
            }),
            options: Options::EMPTY,
            pa_result_code: ResultCode::Success,
        };
        let mut buf = vec![0u8; 1100];
        let n = req.emit(&mut buf).unwrap();
        buf.truncate(n);
        buf
    }

    #[test]
    fn a_refused_batch_is_answered_with_network_failure_and_leaves_nothing() {
        let config = Config::embedded();
        let server = Server::new(config.server.clone(), Time(0), 1).unwrap();
        let refuse = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let dp = Flaky {
            inner: MemoryDataPlane::new(),
            refuse: refuse.clone(),
        };
        let mut core = Core::new(server, Box::new(dp), config, Instant::now(), 1, None);
        let src: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let mut reply = vec![0u8; 1100];
        let r = core.handle(&map_request(5000, 3600), src, 0, Instant::now(), &mut reply);
        let Reply::Send(n) = r else { panic!("{r:?}") };
        let resp = Response::parse(&reply[..n]).unwrap();
        assert_eq!(resp.result_code, ResultCode::NetworkFailure);
        assert_eq!(resp.lifetime, 30, "short error lifetime");
        assert_eq!(core.server.mapping_count(), 0);
        assert_eq!(core.dataplane.len(), 0);
        assert_eq!(core.dataplane_failures, 1);
        // Once the data plane works again the same request succeeds.
        refuse.store(false, std::sync::atomic::Ordering::Relaxed);
        let r = core.handle(&map_request(5000, 3600), src, 0, Instant::now(), &mut reply);
        let Reply::Send(n) = r else { panic!("{r:?}") };
        assert_eq!(
            Response::parse(&reply[..n]).unwrap().result_code,
            ResultCode::Success
        );
        assert_eq!((core.server.mapping_count(), core.dataplane.len()), (1, 1));
        core.server.check_invariants().unwrap();
    }

    /// The memory data plane, counting batches.
    struct Counting {
        inner: MemoryDataPlane,
        batches: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl DataPlane for Counting {
        fn apply(&mut self, batch: &[Op]) -> Result<(), DataPlaneError> {
            self.batches
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.inner.apply(batch)
        }
        fn len(&self) -> usize {
            self.inner.len()
        }
        fn name(&self) -> &'static str {
            "counting"
        }
        fn reconcile(&mut self, entries: &[pcp_dataplane::Entry]) -> Result<(), DataPlaneError> {
            self.inner.reconcile(entries)
        }
    }

    fn replicated(port: u16) -> pcp_server::Mapping {
        let host: IpAddr = "10.0.0.9".parse().unwrap();
        pcp_server::Mapping {
            key: pcp_server::MappingKey {
                internal: host,
                protocol: 17,
                internal_port: port,
                remote: None,
            },
            nonce: [3; 12],
            origin: pcp_server::Origin::Pcp,
            client: host,
            external: pcp_server::pool::ExternalEndpoint {
                addr: "192.0.2.1".parse().unwrap(),
                protocol: 17,
                port,
            },
            expires: Time(3_600_000),
            lifetime: 3600,
            subscriber: pcp_server::subscriber::SubscriberId::Named("replicated".into()),
            checkpoint_requested: true,
            checkpoint: pcp_server::Reason::Requested,
            filters: Box::new([]),
            description: None,
            created: Time(0),
        }
    }

    /// A replicated mapping of `host` at external port `port` of `ext`.
    fn replicated_at(host: &str, port: u16, ext: &str) -> pcp_server::Mapping {
        let host: IpAddr = host.parse().unwrap();
        let mut m = replicated(port);
        m.key.internal = host;
        m.client = host;
        m.external.addr = ext.parse().unwrap();
        m
    }

    /// A pair-mode core at 100 s past its clock's origin (so that an epoch base of
    /// 1 s is visibly older than a reset), listening on 127.0.0.1 and 127.0.0.2 (the
    /// second's access list names 10.0.0.8 alone); `standby` as `[ha] preinstall`.
    fn takeover_core(standby: bool) -> (Core, tokio::runtime::Runtime) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        let mut config = Config::embedded();
        let listen: Vec<SocketAddr> = vec![
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.2:0".parse().unwrap(),
        ];
        config.acl.listen = vec![crate::acl::ListenAcl {
            address: listen[1],
            allow: vec!["10.0.0.8/32".parse().unwrap()],
        }];
        let server = Server::new(config.server.clone(), Time(0), 1).unwrap();
        let ha = pcp_ha::HaConfig {
            standby,
            ..pcp_ha::HaConfig::default()
        };
        let origin = Instant::now()
            .checked_sub(Duration::from_secs(100))
            .unwrap();
        let pair = Pair::new(
            HaNode::new(ha, false, 7, Time(0)),
            "127.0.0.1:1".parse().unwrap(),
            Duration::from_millis(250),
            origin,
        );
        let mut core = Core::new(
            server,
            Box::new(MemoryDataPlane::new()),
            config.clone(),
            origin,
            1,
            Some(pair),
        );
        {
            let _rt = rt.enter();
            for a in &listen {
                let std = std::net::UdpSocket::bind(a).unwrap();
                std.set_nonblocking(true).unwrap();
                core.sockets
                    .push(Arc::new(UdpSocket::from_std(std).unwrap()));
                core.acls
                    .push(Arc::new(crate::acl::SocketAcl::new(&config.acl, *a)));
            }
        }
        // Promoted: it serves.
        core.serving = true;
        core.node_serves.store(true, Ordering::Release);
        (core, rt)
    }

    /// Runs the takeover's ANNOUNCE burst to its end from `start`, each copy at the
    /// moment it falls due; returns each copy's time and datagrams.
    fn run_burst(core: &mut Core, start: Time) -> Vec<(Time, Vec<Unsolicited>)> {
        let mut copies = Vec::new();
        let mut t = start;
        while let Some(due) = core.burst.as_ref().and_then(|b| b.schedule.next_due()) {
            assert!(copies.len() < 20, "the burst does not end");
            t = t.max(due);
            assert_eq!(core.next_wake(), Some(due), "the expiry task wakes for it");
            copies.push((t, core.announce_due(t)));
        }
        copies
    }

    /// Issue (epoch continuity): a host whose checkpointed mapping could not be adopted
    /// lost state just like one that held an unprotected mapping — its epoch starts
    /// again and it gets the ANNOUNCE burst — while a host whose every mapping was
    /// adopted keeps its epoch and is told nothing. The burst follows RFC 6887
    /// §14.1.1 (ten copies, doubling gaps from 250 ms), and each host's copies leave
    /// from the listen socket whose access list names it.
    #[test]
    fn a_failed_adoption_resets_the_hosts_epoch_and_announces_to_it() {
        let (mut core, _rt) = takeover_core(false);
        let now = core.now();
        let base = Time(1_000);
        let (kept, failed, exposed): (IpAddr, IpAddr, IpAddr) = (
            "10.0.0.7".parse().unwrap(),
            "10.0.0.8".parse().unwrap(),
            "10.0.0.6".parse().unwrap(),
        );
        let mappings = vec![
            replicated_at("10.0.0.7", 2000, "192.0.2.1"),
            replicated_at("10.0.0.6", 2001, "192.0.2.1"),
            // Not in this node's pool (the nodes' pools differ): not adoptable.
            replicated_at("10.0.0.8", 2002, "198.51.100.1"),
            replicated_at("10.0.0.8", 2003, "192.0.2.1"),
        ];
        core.take_over(
            2,
            &mappings,
            (&[exposed], &[kept, failed]),
            Some(base),
            true,
            now,
        );
        assert_eq!(core.server.mapping_count(), 3);
        assert_eq!(core.server.epochs().base_of(kept), base, "kept: continuous");
        assert_eq!(
            core.server.epochs().base_of(failed),
            now,
            "a mapping of its was not adopted: its epoch starts again"
        );
        assert_eq!(core.server.epochs().base_of(exposed), now);
        {
            let p = core.lock_pair().unwrap();
            assert_eq!((p.adopted, p.adopt_failures), (3, 1));
            assert_eq!(
                p.lost_hosts,
                LostHosts {
                    unprotected: 1,
                    adopt_failed: 1,
                    never_installed: 0
                }
            );
        }
        let copies = run_burst(&mut core, now);
        let times: Vec<u64> = copies.iter().map(|(t, _)| t.0 - now.0).collect();
        assert_eq!(
            times,
            [0, 250, 750, 1750, 3750, 7750, 15750, 31750, 63750, 127750]
        );
        for (t, out) in &copies {
            let mut to: Vec<(usize, SocketAddr)> = out.iter().map(|o| (o.socket, o.to)).collect();
            to.sort();
            assert_eq!(
                to,
                [
                    (0, SocketAddr::new(exposed, pcp_proto::CLIENT_PORT)),
                    (1, SocketAddr::new(failed, pcp_proto::CLIENT_PORT)),
                ],
                "only the hosts that lost state, each from its own listen socket"
            );
            for u in out {
                assert!(!u.tagged, "no PA session, no tag");
                let r = Response::parse(&u.datagram).unwrap();
                assert_eq!(r.body, Body::Announce);
                assert_eq!(
                    u64::from(r.epoch),
                    (t.0 - now.0) / 1000,
                    "epoch from the takeover"
                );
            }
        }
        assert_eq!(core.next_wake(), core.server.next_timeout(), "burst over");
    }

    /// A takeover that lost many hosts sends each copy of the burst in pages of at
    /// most `ANNOUNCE_PAGE` hosts, a wake apart (the core lock free between them), and
    /// still reaches every host with every copy of the schedule.
    #[test]
    fn a_large_announce_burst_goes_out_in_pages() {
        let (mut core, _rt) = takeover_core(false);
        let now = core.now();
        let lost: Vec<IpAddr> = (0..2 * ANNOUNCE_PAGE as u32 + 100)
            .map(|i| IpAddr::V4(std::net::Ipv4Addr::from(0x0a01_0000 + i)))
            .collect();
        core.take_over(2, &[], (&lost, &[]), Some(Time(1_000)), true, now);
        let first = core.announce_due(now);
        assert_eq!(first.len(), ANNOUNCE_PAGE, "one page on the first wake");
        assert_eq!(
            core.next_wake(),
            Some(now.plus(ANNOUNCE_PAGE_GAP)),
            "the rest of the copy soon after"
        );
        assert!(
            core.announce_due(now).is_empty(),
            "not again on the same wake"
        );
        let mut per_host: std::collections::HashMap<IpAddr, usize> = Default::default();
        for u in &first {
            *per_host.entry(u.to.ip()).or_default() += 1;
        }
        let mut wakes = 1;
        let mut t = now;
        while core.burst.is_some() {
            assert!(wakes < 100, "the burst does not end");
            t = t.max(core.next_wake().unwrap());
            let out = core.announce_due(t);
            assert!(out.len() <= ANNOUNCE_PAGE, "at most one page per wake");
            for u in &out {
                *per_host.entry(u.to.ip()).or_default() += 1;
            }
            wakes += 1;
        }
        assert_eq!(per_host.len(), lost.len(), "every host announced to");
        assert!(
            per_host
                .values()
                .all(|n| *n == pcp_server::announce::ANNOUNCE_COUNT as usize),
            "every host gets every copy of the schedule"
        );
        assert_eq!(wakes, 3 * pcp_server::announce::ANNOUNCE_COUNT);
    }

    /// The previous active served on after the takeover (a healed partition): every
    /// host whose epoch was carried over starts again and joins the ANNOUNCE burst;
    /// hosts already reset at the takeover keep their (already new) epoch.
    #[test]
    fn a_diverged_predecessor_resets_carried_over_epochs_and_announces() {
        let (mut core, _rt) = takeover_core(false);
        let now = core.now();
        let base = Time(1_000);
        let (kept, exposed): (IpAddr, IpAddr) =
            ("10.0.0.7".parse().unwrap(), "10.0.0.6".parse().unwrap());
        let mappings = vec![
            replicated_at("10.0.0.7", 2000, "192.0.2.1"),
            replicated_at("10.0.0.6", 2001, "192.0.2.1"),
        ];
        core.take_over(2, &mappings, (&[exposed], &[kept]), Some(base), true, now);
        core.serving = true;
        assert_eq!(core.server.epochs().base_of(kept), base);
        let first = core.announce_due(now);
        assert_eq!(
            first.len(),
            1,
            "the takeover announces to the exposed host only"
        );
        let later = Time(now.0 + 5_000);
        core.predecessor_diverged(2, later);
        assert_eq!(
            core.server.epochs().base_of(kept),
            later,
            "carried over: reset"
        );
        assert_eq!(core.server.epochs().base_of(exposed), now, "already reset");
        let out = core.announce_due(later);
        let mut to: Vec<IpAddr> = out.iter().map(|o| o.to.ip()).collect();
        to.sort();
        assert_eq!(
            to,
            [exposed, kept],
            "the burst goes on with the carried-over host"
        );
        for u in &out {
            let r = Response::parse(&u.datagram).unwrap();
            assert_eq!(r.body, Body::Announce);
            if u.to.ip() == kept {
                assert_eq!(r.epoch, 0, "its epoch starts at the report");
            }
        }
        // Reported once: nothing is carried over any more.
        assert!(core.server.epochs().carried_over().is_empty());
    }

    /// The same on a standby backup (the default): the hosts of its own core.
    #[test]
    fn a_diverged_predecessor_resets_carried_over_epochs_on_a_standby() {
        let (mut core, _rt) = takeover_core(true);
        let kept: IpAddr = "10.0.0.7".parse().unwrap();
        let now = core.now();
        core.mirror(
            pcp_ha::Replica::Upsert(vec![replicated_at("10.0.0.7", 2000, "192.0.2.1")]),
            now,
        );
        core.apply_effects(now);
        core.take_over(3, &[], (&[], &[]), Some(Time(1_000)), true, now);
        core.serving = true;
        assert_eq!(core.server.epochs().carried_over(), [kept]);
        let later = Time(now.0 + 5_000);
        core.predecessor_diverged(3, later);
        assert_eq!(core.server.epochs().base_of(kept), later);
        let out = core.announce_due(later);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].to.ip(), kept);
    }

    /// The same for a standby backup: a replicated mapping its core could never install
    /// (pending at the takeover) means its host lost state.
    #[test]
    fn a_mapping_never_installed_on_the_standby_resets_the_hosts_epoch() {
        let (mut core, _rt) = takeover_core(true);
        let (kept, failed): (IpAddr, IpAddr) =
            ("10.0.0.7".parse().unwrap(), "10.0.0.8".parse().unwrap());
        let now = core.now();
        core.mirror(
            pcp_ha::Replica::Upsert(vec![
                replicated_at("10.0.0.7", 2000, "192.0.2.1"),
                replicated_at("10.0.0.8", 2001, "192.0.2.1"),
                replicated_at("10.0.0.8", 2002, "198.51.100.1"),
            ]),
            now,
        );
        core.apply_effects(now);
        assert_eq!(core.pending.len(), 1);
        let base = Time(1_000);
        core.take_over(3, &[], (&[], &[]), Some(base), true, now);
        assert_eq!(core.server.epochs().base_of(kept), base, "kept: continuous");
        assert_eq!(core.server.epochs().base_of(failed), now, "lost one: reset");
        {
            let p = core.lock_pair().unwrap();
            assert_eq!((p.adopted, p.adopt_failures), (2, 1));
            assert_eq!(p.lost_hosts.never_installed, 1);
        }
        let first = core.announce_due(now);
        let to: Vec<(usize, SocketAddr)> = first.iter().map(|o| (o.socket, o.to)).collect();
        assert_eq!(to, [(1, SocketAddr::new(failed, pcp_proto::CLIENT_PORT))]);
        // A step-down ends the burst: the new active speaks for the address.
        core.serving = false;
        assert!(core.announce_due(Time(now.0 + 300_000)).is_empty());
        assert!(core.burst.is_none());
    }

    /// A standby backup mirrors a run of replicated changes into its data plane in
    /// batches of `GROUP_OPS` operations (one netlink transaction each with
    /// nftables), not one per mapping; a non-mirror event in between ends the run, so
    /// it sees the data plane in step.
    #[test]
    fn mirrored_changes_reach_the_data_plane_one_batch_per_run() {
        let config = Config::embedded();
        let server = Server::new(config.server.clone(), Time(0), 1).unwrap();
        let batches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let dp = Counting {
            inner: MemoryDataPlane::new(),
            batches: batches.clone(),
        };
        let ha = pcp_ha::HaConfig {
            standby: true,
            expected: 1000,
            ..pcp_ha::HaConfig::default()
        };
        let node = HaNode::new(ha, false, 7, Time(0));
        let origin = Instant::now();
        let pair = Pair::new(
            node,
            "127.0.0.1:1".parse().unwrap(),
            Duration::from_millis(250),
            origin,
        );
        let mut core = Core::new(server, Box::new(dp), config, origin, 1, Some(pair));
        {
            let mut p = core.lock_pair().unwrap();
            // In events of 100 (as the HA node batches them): a data plane batch
            // is cut inside an event.
            for first in [2000, 2100, 2200] {
                let run = (first..first + 100).map(replicated).collect();
                p.for_core
                    .push_back(Event::Replica(pcp_ha::Replica::Upsert(run)));
            }
            p.for_core
                .push_back(Event::BackupStatus(BackupStatus::NotReady));
            let gone = (2000..2010)
                .map(|port| replicated(port).key)
                .collect::<Vec<_>>();
            p.for_core
                .push_back(Event::Replica(pcp_ha::Replica::Remove(gone)));
        }
        core.ha_work();
        assert_eq!(
            batches.load(std::sync::atomic::Ordering::Relaxed),
            4,
            "300 installs in batches of 128, 128 and 44; 10 removals in another"
        );
        assert_eq!(
            (core.server.mapping_count(), core.dataplane.len()),
            (290, 290)
        );
        core.server.check_invariants().unwrap();
    }

    /// `[pcpd] expected_mappings` sizes the server core's table up front on any node,
    /// not only on a standby backup (whose tables follow `[checkpoint] capacity`).
    #[test]
    fn expected_mappings_sizes_the_tables_up_front() {
        let core = |expected: usize| {
            let mut config = Config::embedded();
            config.daemon.expected_mappings = expected;
            let server = Server::new(config.server.clone(), Time(0), 1).unwrap();
            let dp = Box::new(MemoryDataPlane::new());
            Core::new(server, dp, config, Instant::now(), 1, None)
        };
        assert!(core(0).server.capacity() < 1000);
        let sized = core(300_000);
        assert!(
            sized.server.capacity() >= 300_000,
            "{}",
            sized.server.capacity()
        );
        // A standby backup sizes for the larger of the two.
        let mut config = Config::embedded();
        config.daemon.expected_mappings = 5000;
        let server = Server::new(config.server.clone(), Time(0), 1).unwrap();
        let ha = pcp_ha::HaConfig {
            standby: true,
            expected: 70_000,
            ..pcp_ha::HaConfig::default()
        };
        let origin = Instant::now();
        let pair = Pair::new(
            HaNode::new(ha, false, 7, Time(0)),
            "127.0.0.1:1".parse().unwrap(),
            Duration::from_millis(250),
            origin,
        );
        let standby = Core::new(
            server,
            Box::new(MemoryDataPlane::new()),
            config,
            origin,
            1,
            Some(pair),
        );
        assert!(standby.server.capacity() >= 70_000);
    }

    /// A data plane that refuses batches: any batch touching a poisoned internal port
    /// (as a kernel refusing one element would), and a random share of the others; it
    /// counts the batches it was given.
    struct Chaos {
        inner: Arc<Mutex<MemoryDataPlane>>,
        rng: rand::rngs::SmallRng,
        fail_per_mille: u32,
        poisoned: Vec<u16>,
        applies: Arc<std::sync::atomic::AtomicU64>,
    }

    impl DataPlane for Chaos {
        fn apply(&mut self, batch: &[Op]) -> Result<(), DataPlaneError> {
            use rand::Rng;
            self.applies.fetch_add(1, Ordering::Relaxed);
            let poisoned = batch.iter().any(|op| {
                let (Op::Install(e) | Op::Remove(e)) = op;
                self.poisoned.contains(&e.internal.port())
            });
            if poisoned {
                return Err(DataPlaneError::Failure("poisoned element".into()));
            }
            if self.rng.random_range(0..1000) < self.fail_per_mille {
                return Err(if self.rng.random_bool(0.5) {
                    DataPlaneError::Failure("injected".into())
                } else {
                    DataPlaneError::NoResources("injected".into())
                });
            }
            self.inner.lock().unwrap().apply(batch)
        }
        fn len(&self) -> usize {
            self.inner.lock().unwrap().len()
        }
        fn name(&self) -> &'static str {
            "chaos"
        }
        fn reconcile(&mut self, entries: &[pcp_dataplane::Entry]) -> Result<(), DataPlaneError> {
            self.inner.lock().unwrap().reconcile(entries)
        }
    }

    type Key = (IpAddr, u8, u16);

    fn request(host: u8, protocol: u8, port: u16, lifetime: u32, nonce: u8, ext: u16) -> Vec<u8> {
        let req = Request {
            lifetime,
            client_addr: IpAddr::from([10, 0, 0, host]),
            body: Body::Map(MapBody {
                nonce: [nonce; 12],
                protocol,
                internal_port: port,
                external_port: ext,
                external_addr: "0.0.0.0".parse().unwrap(),
            }),
            options: Options::EMPTY,
            pa_result_code: ResultCode::Success,
        };
        let mut buf = vec![0u8; 1100];
        let n = req.emit(&mut buf).unwrap();
        buf.truncate(n);
        buf
    }

    fn job(datagram: &[u8], host: u8) -> Job {
        let mut j = Job::new(0);
        j.datagram[..datagram.len()].copy_from_slice(datagram);
        j.len = datagram.len();
        j.src = SocketAddr::from(([10, 0, 0, host], 40000));
        j
    }

    /// What a reply tells its client: `Some(Some(ext))` installed at `ext`,
    /// `Some(None)` deleted, `None` an error (nothing changed) or no reply.
    fn outcome(j: &Job) -> Option<Option<SocketAddr>> {
        let Reply::Send(n) = j.answer else {
            return None;
        };
        let r = Response::parse(&j.reply[..n]).unwrap();
        if r.result_code != ResultCode::Success {
            return None;
        }
        let Body::Map(m) = r.body else { panic!() };
        Some((r.lifetime > 0).then(|| SocketAddr::new(m.external_addr, m.external_port)))
    }

    fn chaos_core(
        fail_per_mille: u32,
        poisoned: Vec<u16>,
        seed: u64,
    ) -> (
        Core,
        Arc<Mutex<MemoryDataPlane>>,
        Arc<std::sync::atomic::AtomicU64>,
    ) {
        use rand::SeedableRng;
        let config = Config::embedded();
        let server = Server::new(config.server.clone(), Time(0), seed).unwrap();
        let inner = Arc::new(Mutex::new(MemoryDataPlane::new()));
        let applies = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let dp = Chaos {
            inner: inner.clone(),
            rng: rand::rngs::SmallRng::seed_from_u64(seed),
            fail_per_mille,
            poisoned,
            applies: applies.clone(),
        };
        let core = Core::new(server, Box::new(dp), config, Instant::now(), seed, None);
        (core, inner, applies)
    }

    #[test]
    fn a_healthy_group_is_one_data_plane_batch() {
        let (mut core, inner, applies) = chaos_core(0, vec![], 1);
        let mut jobs: Vec<Job> = (0..32)
            .map(|i| job(&request(1, 17, 6000 + i, 3600, 7, 0), 1))
            .collect();
        core.handle_group(&mut jobs);
        assert!(jobs.iter().all(|j| matches!(outcome(j), Some(Some(_)))));
        assert_eq!(
            applies.load(Ordering::Relaxed),
            1,
            "one batch for 32 requests"
        );
        assert_eq!(inner.lock().unwrap().len(), 32);
    }

    #[test]
    fn a_refused_element_in_a_group_refuses_only_its_request() {
        let (mut core, inner, applies) = chaos_core(0, vec![5001], 1);
        // The second renews what the first creates, the fourth deletes it: the
        // take-back goes last first, and the one-by-one pass sees each in turn.
        let mut jobs = vec![
            job(&request(1, 17, 5000, 3600, 7, 0), 1),
            job(&request(1, 17, 5000, 3600, 7, 0), 1),
            job(&request(1, 17, 5001, 3600, 7, 0), 1),
            job(&request(1, 17, 5000, 0, 7, 0), 1),
            job(&request(1, 17, 5002, 3600, 7, 0), 1),
        ];
        core.handle_group(&mut jobs);
        let got: Vec<_> = jobs.iter().map(outcome).collect();
        assert!(matches!(got[0], Some(Some(_))), "{got:?}");
        assert_eq!(got[1], got[0], "the renewal keeps the endpoint");
        assert_eq!(got[2], None, "the poisoned request is refused");
        let Reply::Send(n) = jobs[2].answer else {
            panic!()
        };
        assert_eq!(
            Response::parse(&jobs[2].reply[..n]).unwrap().result_code,
            ResultCode::NetworkFailure
        );
        assert_eq!(got[3], Some(None), "deleted");
        assert!(matches!(got[4], Some(Some(_))));
        // The group's batch, then four batches of their own (the renewal has none).
        assert_eq!(applies.load(Ordering::Relaxed), 5);
        let ports: Vec<u16> = inner
            .lock()
            .unwrap()
            .entries()
            .map(|e| e.internal.port())
            .collect();
        assert_eq!(ports, vec![5002]);
        assert_eq!(core.server.mapping_count(), 1);
        assert_eq!(core.dataplane_failures, 2);
        core.server.check_invariants().unwrap();
    }

    /// Groups of random MAP requests (creations, renewals, deletions, wrong nonces,
    /// suggested ports; several about the same mapping) against a data plane that
    /// refuses some batches: after every group, the table and the data plane hold
    /// exactly what the replies told, in order — a SUCCESS is installed at the
    /// endpoint it named (or deleted), an error left nothing.
    #[test]
    fn every_reply_of_a_group_tells_the_truth_whatever_fails() {
        use rand::{Rng, SeedableRng};
        let seeds: u64 = std::env::var("PCP_GROUP_SEEDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(300);
        let (mut refused, mut mixed) = (0u64, 0u64);
        for seed in 0..seeds {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
            let poisoned = vec![5000 + rng.random_range(0..12u16)];
            let (mut core, inner, _) = chaos_core(rng.random_range(0..500), poisoned, seed);
            let mut model: std::collections::HashMap<Key, SocketAddr> = Default::default();
            for _group in 0..20 {
                let n = rng.random_range(1..=32);
                let mut jobs: Vec<Job> = (0..n)
                    .map(|_| {
                        let host = rng.random_range(1..=3u8);
                        let proto = if rng.random_bool(0.8) { 17 } else { 6 };
                        let port = 5000 + rng.random_range(0..12u16);
                        let lifetime = if rng.random_bool(0.25) { 0 } else { 3600 };
                        let nonce = if rng.random_bool(0.05) { 9 } else { 7 };
                        let ext = if rng.random_bool(0.3) {
                            1024 + rng.random_range(0..64u16)
                        } else {
                            0
                        };
                        job(&request(host, proto, port, lifetime, nonce, ext), host)
                    })
                    .collect();
                let failures = core.dataplane_failures;
                core.handle_group(&mut jobs);
                let mut successes = 0;
                for j in &jobs {
                    let Some(o) = outcome(j) else { continue };
                    let Body::Map(m) = Request::parse(&j.datagram[..j.len]).unwrap().body else {
                        panic!()
                    };
                    let key = (j.src.ip(), m.protocol, m.internal_port);
                    match o {
                        Some(ext) => {
                            successes += 1;
                            model.insert(key, ext);
                        }
                        None => {
                            model.remove(&key);
                        }
                    }
                }
                if core.dataplane_failures > failures {
                    refused += 1;
                    if successes > 0 {
                        mixed += 1;
                    }
                }
                let table: std::collections::HashMap<Key, SocketAddr> = core
                    .server
                    .mappings()
                    .map(|m| {
                        let ext = SocketAddr::new(m.external.addr, m.external.port);
                        ((m.key.internal, m.key.protocol, m.key.internal_port), ext)
                    })
                    .collect();
                assert_eq!(
                    table, model,
                    "seed {seed}: the table is what the replies told"
                );
                let installed: std::collections::HashMap<Key, SocketAddr> = inner
                    .lock()
                    .unwrap()
                    .entries()
                    .map(|e| {
                        let key = (e.internal.ip(), e.protocol, e.internal.port());
                        (key, e.external)
                    })
                    .collect();
                assert_eq!(
                    installed, model,
                    "seed {seed}: the data plane is what the replies told"
                );
                core.server
                    .check_invariants()
                    .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            }
        }
        assert!(refused > seeds, "failures were injected ({refused} groups)");
        assert!(
            mixed > seeds / 2,
            "refused groups still committed requests ({mixed})"
        );
    }
}
