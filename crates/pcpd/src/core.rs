//! The daemon's single owner of the server core, the data plane and (in pair mode) the
//! HA node. Socket tasks, timers and the admin API all go through it, under one lock:
//! the cores are single-threaded by design and each call is short.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pcp_dataplane::{DataPlane, Op};
use pcp_ha::{Event, HaNode};
use pcp_proto::OptionCode;
use pcp_server::{BackupStatus, Effect, Reply, Server, Time};
use tokio::net::UdpSocket;

use crate::config::Config;
use crate::metrics::Latency;

/// A reply that echoes option 192, waiting for the backup's acknowledgement.
#[derive(Debug)]
pub struct Held {
    /// Records up to this sequence number must be acknowledged.
    pub seq: u64,
    /// The reply.
    pub reply: Vec<u8>,
    /// Where it goes.
    pub to: SocketAddr,
    /// Which listen socket it came in on.
    pub socket: usize,
    /// The mapping it is about (withdrawn if the backup is too slow).
    pub key: pcp_server::MappingKey,
    /// When it was held.
    pub at: Time,
    /// When it goes out without 192 at the latest.
    pub deadline: Time,
    /// When the request arrived (latency).
    pub received: Instant,
}

/// Pair mode state.
pub struct Pair {
    /// The HA state machine.
    pub node: HaNode,
    /// The peer's replication address.
    pub peer: SocketAddr,
    /// Replies waiting for acknowledgements, in sequence order.
    pub held: Vec<Held>,
    /// Longest a reply waits.
    pub ack_timeout: Duration,
    /// Replies that went out without 192 because the backup was too slow.
    pub timeouts: u64,
    /// Replies released after the backup's acknowledgement.
    pub released: u64,
    /// Mappings adopted at the last takeover.
    pub adopted: usize,
    /// Failed adoptions (conflicts) at the last takeover.
    pub adopt_failures: usize,
    /// Standby: replicated mappings whose external endpoint a stale entry still holds,
    /// installed once the copy's sweep removes it.
    pub pending: Vec<pcp_server::Mapping>,
}

/// Everything behind the lock.
pub struct Core {
    /// The protocol core.
    pub server: Server,
    /// What enforces mappings.
    pub dataplane: Box<dyn DataPlane>,
    /// The configuration in force (reloads replace it).
    pub config: Config,
    /// Request latency, receive to send.
    pub latency: Latency,
    /// Data plane batches that failed (each is logged).
    pub dataplane_failures: u64,
    /// Pair mode, when configured.
    pub pair: Option<Pair>,
    /// The PCP listen sockets (held replies and ANNOUNCEs go out on them).
    pub sockets: Vec<Arc<UdpSocket>>,
    /// Their access lists (with the refusal counters), in the same order.
    pub acls: Vec<Arc<crate::acl::SocketAcl>>,
    origin: Instant,
    seed: u64,
    effects: Vec<Effect>,
    ops: Vec<Op>,
}

/// The core shared between tasks.
#[derive(Clone)]
pub struct Shared(
    Arc<Mutex<Core>>,
    pub Arc<tokio::sync::Notify>,
    /// Whether pair mode is configured (fixed at start; read without the lock).
    bool,
);

impl Shared {
    /// Wraps a core.
    pub fn new(core: Core) -> Shared {
        let pair = core.pair.is_some();
        Shared(
            Arc::new(Mutex::new(core)),
            Arc::new(tokio::sync::Notify::new()),
            pair,
        )
    }

    /// Whether pair mode is configured.
    pub fn has_pair(&self) -> bool {
        self.2
    }

    /// Locks the core. A panic while holding the lock is a bug that already aborted a
    /// task; the state stays usable, so the poison is ignored.
    pub fn lock(&self) -> MutexGuard<'_, Core> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes the replication task (records were queued).
    pub fn kick(&self) {
        self.1.notify_one();
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
        Core {
            server,
            dataplane,
            config,
            latency: Latency::default(),
            dataplane_failures: 0,
            pair,
            sockets: Vec::new(),
            acls: Vec::new(),
            origin,
            seed,
            effects: Vec::new(),
            ops: Vec::new(),
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
    pub fn instant_of(&self, t: Time) -> Instant {
        self.origin + Duration::from_millis(t.0)
    }

    /// Whether this node answers PCP now (always, unless it is a backup).
    pub fn serves(&self) -> bool {
        self.pair.as_ref().is_none_or(|p| p.node.serves())
    }

    /// Serves one datagram received on listen socket `socket`. A reply to send now is
    /// in `reply`; a reply that must wait for the backup is kept here and sent later.
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
        let r = self
            .server
            .handle(datagram, src, now, reply, &mut self.effects);
        let seq = self.apply_effects(now);
        match (r, self.pair.as_mut()) {
            (Reply::Hold(n), Some(pair)) => {
                let key = held_key(&reply[..n], src);
                pair.held.push(Held {
                    seq,
                    reply: reply[..n].to_vec(),
                    to: src,
                    socket,
                    key,
                    at: now,
                    deadline: now.plus(pair.ack_timeout),
                    received,
                });
                Reply::Drop
            }
            // Without a pair the core never holds (its backup status stays `None`).
            (Reply::Hold(n), None) => Reply::Send(n),
            (other, _) => other,
        }
    }

    /// Removes expired mappings.
    pub fn expire(&mut self) {
        let now = self.now();
        self.server.expire(now, &mut self.effects);
        self.apply_effects(now);
    }

    /// Carries out pending effects: data plane operations as one batch, replication
    /// records to the HA node. Returns the last sequence number queued (0: none).
    fn apply_effects(&mut self, now: Time) -> u64 {
        self.ops.clear();
        let mut seq = 0;
        for e in self.effects.drain(..) {
            match e {
                Effect::DataPlane(op) => self.ops.push(op),
                Effect::Replicate(change) => {
                    if let Some(s) = self.pair.as_mut().and_then(|p| p.node.push(&change, now)) {
                        seq = s;
                    }
                }
            }
        }
        if !self.ops.is_empty()
            && let Err(e) = self.dataplane.apply(&self.ops)
        {
            self.dataplane_failures += 1;
            tracing::error!(error = %e, ops = self.ops.len(), "data plane batch failed");
        }
        seq
    }

    /// Handles a replication frame from the peer.
    pub fn ha_frame(&mut self, frame: &[u8]) {
        let now = self.now();
        if let Some(pair) = self.pair.as_mut() {
            pair.node.handle_frame(frame, now);
        }
        self.ha_events(now);
    }

    /// Runs HA timers and held-reply deadlines. Returns when to run again.
    pub fn ha_tick(&mut self) -> Option<Instant> {
        let now = self.now();
        let pair = self.pair.as_mut()?;
        if pair.node.poll_timeout().is_some_and(|t| t <= now) {
            pair.node.handle_timeout(now);
        }
        self.ha_events(now);
        self.expire_held(now);
        let pair = self.pair.as_ref()?;
        let next = pair
            .node
            .poll_timeout()
            .into_iter()
            .chain(pair.held.first().map(|h| h.deadline))
            .min()?;
        Some(self.instant_of(next))
    }

    /// The peer's replication address (pair mode).
    pub fn ha_peer(&self) -> Option<SocketAddr> {
        self.pair.as_ref().map(|p| p.peer)
    }

    /// Frames to send to the peer now.
    pub fn ha_transmit(&mut self, out: &mut Vec<Vec<u8>>) -> Option<SocketAddr> {
        let now = self.now();
        let pair = self.pair.as_mut()?;
        let mut buf = vec![0u8; pcp_ha::wire::MAX_FRAME];
        while let Some(n) = pair.node.poll_transmit(now, &mut buf) {
            out.push(buf[..n].to_vec());
        }
        let peer = pair.peer;
        // Transmitting may ask for a bulk chunk.
        self.ha_events(now);
        Some(peer)
    }

    fn ha_events(&mut self, now: Time) {
        loop {
            let Some(ev) = self.pair.as_mut().and_then(|p| p.node.poll_event()) else {
                return;
            };
            match ev {
                Event::Acked(cum) => self.release(cum, now),
                Event::BackupStatus(s) => {
                    tracing::info!(status = ?s, "backup status");
                    self.server.set_backup_status(s);
                }
                Event::NeedBulk { cursor } => {
                    let (maps, next) = self.server.checkpointed_from(cursor, 2048);
                    let hosts: Vec<IpAddr> = if next.is_none() {
                        self.server.unprotected_hosts().collect()
                    } else {
                        Vec::new()
                    };
                    if let Some(p) = self.pair.as_mut() {
                        p.node.bulk_chunk(&maps, next, &hosts, now);
                    }
                }
                Event::Replica(change) => self.mirror(change, now),
                Event::Demoted { term } => {
                    tracing::warn!(term, "a newer active exists: stepping down to backup");
                    self.reset_server(now);
                }
                Event::Promoted {
                    term,
                    mappings,
                    unprotected_hosts,
                    protected_hosts,
                    epoch_base,
                    complete,
                } => self.take_over(
                    term,
                    &mappings,
                    (&unprotected_hosts, &protected_hosts),
                    epoch_base,
                    complete,
                    now,
                ),
            }
        }
    }

    /// Standby: keeps this backup's own core (and data plane) in step with the copy, so
    /// that a takeover has nothing left to install.
    fn mirror(&mut self, change: pcp_ha::Replica, now: Time) {
        match change {
            pcp_ha::Replica::Upsert(m) => {
                if self
                    .server
                    .mirror_upsert(&m, now, &mut self.effects)
                    .is_err()
                    && let Some(p) = self.pair.as_mut()
                {
                    p.pending.push(*m);
                }
            }
            pcp_ha::Replica::Remove(keys) => {
                for k in &keys {
                    self.server.mirror_remove(k, &mut self.effects);
                }
                let pending = self.pair.as_mut().map(|p| std::mem::take(&mut p.pending));
                for m in pending.unwrap_or_default() {
                    if m.expires > now
                        && self
                            .server
                            .mirror_upsert(&m, now, &mut self.effects)
                            .is_err()
                        && let Some(p) = self.pair.as_mut()
                    {
                        p.pending.push(m);
                    }
                }
            }
        }
        self.apply_effects(now);
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
        }
        self.seed = self.seed.wrapping_add(1);
        if let Ok(s) = Server::new(self.config.server.clone(), now, self.seed) {
            self.server = s;
        }
        if let Some(p) = self.pair.as_mut() {
            p.held.clear();
            p.node.set_epoch_base(self.server.epochs().base());
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
        if mappings.is_empty() {
            self.server.epochs().set_base(now);
            if let Some(p) = self.pair.as_mut()
                && !p.pending.is_empty()
            {
                tracing::error!(
                    count = p.pending.len(),
                    "replicated mappings never installed (their external endpoints stayed taken)"
                );
                p.pending.clear();
            }
        } else {
            self.reset_server(now);
        }
        if let Some(base) = epoch_base {
            for host in protected {
                self.server.epochs().set(*host, base);
            }
        }
        let mut failures = 0;
        for m in mappings {
            if self.server.adopt(m, now, &mut self.effects).is_err() {
                // Not logged one by one: the error names the mapping, and the log
                // must not say which flows of which host are checkpointed (issue 7).
                // The count goes to the log below and to GET /ha.
                failures += 1;
            }
        }
        self.apply_effects(now);
        // Hosts known to have held unprotected mappings lost state: they are told at
        // once, so they re-create what they lost.
        let mut buf = [0u8; pcp_proto::HEADER_LEN];
        for host in unprotected {
            let n = self.server.announce(Some(*host), now, &mut buf);
            let to = SocketAddr::new(*host, pcp_proto::CLIENT_PORT);
            if let Some(sock) = self
                .sockets
                .iter()
                .find(|s| s.local_addr().is_ok_and(|a| a.is_ipv4() == host.is_ipv4()))
            {
                let _ = sock.try_send_to(&buf[..n], to);
            }
        }
        let base = self.server.epochs().base();
        let adopted = if mappings.is_empty() {
            self.server.checkpointed_count() as usize
        } else {
            mappings.len() - failures
        };
        if let Some(p) = self.pair.as_mut() {
            p.node.set_epoch_base(base);
            p.adopted = adopted;
            p.adopt_failures = failures;
        }
        tracing::warn!(
            term,
            adopted,
            failures,
            complete,
            announced = unprotected.len(),
            "took over as active"
        );
    }

    /// Sends every held reply whose records the backup now holds.
    fn release(&mut self, cum: u64, now: Time) {
        let Some(pair) = self.pair.as_mut() else {
            return;
        };
        let split = pair.held.partition_point(|h| h.seq <= cum);
        let ready: Vec<Held> = pair.held.drain(..split).collect();
        pair.released += ready.len() as u64;
        for mut h in ready {
            pcp_server::age_held_reply(&mut h.reply, now.since(h.at));
            self.send_held(&h);
        }
    }

    /// Replies the backup did not confirm in time go out without 192, and their
    /// mappings stop being checkpointed: an honest "not honoured".
    fn expire_held(&mut self, now: Time) {
        let Some(pair) = self.pair.as_mut() else {
            return;
        };
        if pair.held.first().is_none_or(|h| h.deadline > now) {
            return;
        }
        let (late, waiting): (Vec<Held>, Vec<Held>) =
            pair.held.drain(..).partition(|h| h.deadline <= now);
        pair.held = waiting;
        pair.timeouts += late.len() as u64;
        for mut h in late {
            // Only a promise is withdrawn; a reply held because it exposed its host
            // goes out as it is.
            let promised =
                pcp_proto::Response::parse(&h.reply).is_ok_and(|r| r.options.checkpoint_required());
            if promised {
                self.server.withdraw_checkpoint(&h.key, &mut self.effects);
            }
            let len = h.reply.len();
            let n = pcp_proto::remove_option(&mut h.reply, len, OptionCode::CheckpointRequired);
            h.reply.truncate(n);
            pcp_server::age_held_reply(&mut h.reply, now.since(h.at));
            self.send_held(&h);
        }
        self.apply_effects(now);
    }

    fn send_held(&mut self, h: &Held) {
        if let Some(sock) = self.sockets.get(h.socket)
            && let Err(e) = sock.try_send_to(&h.reply, h.to)
        {
            // No address: a held reply echoes 192, so its address would tell which
            // host holds a checkpointed flow.
            tracing::debug!(error = %e, "sending a held reply");
        }
        self.latency.record(h.received.elapsed());
    }

    /// Operator command: promote this backup now.
    pub fn promote(&mut self) -> Result<(), String> {
        let now = self.now();
        let pair = self.pair.as_mut().ok_or("pcpd is not in pair mode")?;
        if pair.node.serves() {
            return Err("this node is already active".into());
        }
        pair.node.promote(now);
        self.ha_events(now);
        Ok(())
    }

    /// Operator command: hand over to the backup.
    pub fn switchover(&mut self) -> Result<(), String> {
        let now = self.now();
        let pair = self.pair.as_mut().ok_or("pcpd is not in pair mode")?;
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
