//! The server core: one datagram, its source and the time in; a reply and effects out.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use pcp_dataplane::{Direction, Entry, Op};
use pcp_proto::{
    Body, Extensions, MapBody, Opcode, OptionCode, Options, ParseError, PcpOption, Request,
    Response, ResultCode, emit_error_response, natpmp,
};
use rand::SeedableRng;
use rand::rngs::SmallRng;

use crate::checkpoint::{self, Ask, BackupStatus, Ledger, RuleNames};
use crate::config::{ConfigError, OpcodeName, ServerConfig, TierConfig};
use crate::epoch::Epochs;
use crate::guard::{Guard, GuardFootprint};
use crate::mapping::Mapping;
use crate::policy::{Flow, Policy};
use crate::pool::{AllocError, AllocRequest, ExternalEndpoint, Pool};
use crate::stats::{RequestKind, Stats};
use crate::subscriber::{self, SubscriberId, SubscriberState, SubscriberTable};
use crate::table::{Extra, MappingKey, Origin, Record, Table};
use crate::time::Time;

/// What to do with the reply buffer after [`Server::handle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// Send nothing (the RFC says drop silently).
    Drop,
    /// Send the first `n` octets of the reply buffer to the request's source.
    Send(usize),
    /// Send the first `n` octets only once the backup has acknowledged the
    /// `Effect::Replicate` records this call produced: the reply echoes
    /// CHECKPOINT_REQUIRED, or it makes a protected host exposed (see `Change::Host`).
    /// If the acknowledgement does not come in time and the reply echoes 192, call
    /// [`Server::withdraw_checkpoint`] and send it with option 192 removed
    /// ([`pcp_proto::remove_option`]): an honest "not honoured".
    Hold(usize),
}

/// A side effect the shell must carry out.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Change the data plane.
    DataPlane(Op),
    /// Tell the backup about a change to a checkpointed mapping.
    Replicate(Change),
}

/// A change to the set of checkpointed mappings.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// The mapping is (still) checkpointed; this is its current state.
    Upsert(Box<Mapping>),
    /// The mapping is gone or no longer checkpointed.
    Remove(MappingKey),
    /// Whether an internal host now holds mappings that are not checkpointed, whether
    /// or not it also has checkpointed ones: sent when it gets its first unprotected
    /// mapping and when it holds none any more (one record per transition, not per
    /// mapping). A successor keeps the epoch of hosts whose mappings it holds and that
    /// hold no unprotected ones, and resets (and announces to) every host known to
    /// hold unprotected mappings: they lose state in a takeover. A host with only
    /// unprotected mappings is announced to as well, instead of learning of the loss
    /// at its next renewal.
    Host {
        /// The internal host.
        host: IpAddr,
        /// It holds unprotected mappings.
        unprotected: bool,
    },
}

/// Per internal host: how many mappings, how many checkpointed.
#[derive(Debug, Clone, Copy, Default)]
struct HostCount {
    mappings: u32,
    checkpointed: u32,
}

impl HostCount {
    /// Holds mappings that are not checkpointed (what `Change::Host` replicates).
    fn unprotected(&self) -> bool {
        self.mappings > self.checkpointed
    }

    /// Has checkpointed mappings and unprotected ones too: a successor that missed
    /// the `Change::Host` record would keep this host's epoch (it holds mappings of
    /// it) and hide the loss of the unprotected ones.
    fn exposed(&self) -> bool {
        self.checkpointed > 0 && self.unprotected()
    }
}

/// Counts of everything the core keeps per host or subscriber (see
/// [`Server::footprint`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Footprint {
    /// The request-rate limiter's buckets.
    pub guard: GuardFootprint,
    /// Subscribers with state (mappings, or a checkpoint bucket still refilling).
    pub subscribers: usize,
    /// Entries of the queue of subscribers waiting for their bucket to refill.
    pub idle_subscribers: usize,
    /// Internal hosts with mappings.
    pub hosts: usize,
    /// Clients with an epoch of their own.
    pub epoch_exceptions: usize,
    /// Mappings.
    pub mappings: usize,
}

/// Why a replicated mapping could not be adopted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdoptError {
    /// Its external endpoint is not in this node's pool, or already taken here.
    #[error("external endpoint {0:?} is not free in this node's pool")]
    EndpointUnavailable(ExternalEndpoint),
    /// A mapping with the same key already exists here.
    #[error("mapping {0:?} already exists")]
    Exists(MappingKey),
}

/// The PCP (and NAT-PMP) server core. Sans-IO: it never reads a clock or touches a
/// socket; the shell feeds it datagrams and time and carries out its [`Effect`]s.
#[derive(Debug)]
pub struct Server {
    cfg: ServerConfig,
    policy: Policy,
    subscribers: SubscriberTable,
    subs: subscriber::Store,
    table: Table,
    rules: RuleNames,
    hosts: crate::FastMap<IpAddr, HostCount>,
    /// Subscribers without mappings whose buckets are refilling, by when they are full.
    idle: std::collections::BinaryHeap<Reverse<(Time, SubscriberId)>>,
    /// The latest time seen (handle / expire).
    clock: Time,
    /// Set when the request being served made a host exposed (see `Change::Host`).
    exposed_now: bool,
    pool: Pool,
    ledger: Ledger,
    epochs: Epochs,
    backup: BackupStatus,
    stats: Stats,
    rng: SmallRng,
    /// What the request being served changed in the table, for [`Server::refuse`].
    undo: Vec<Undo>,
    /// The answer the request being served was counted as, for [`Server::take_back`].
    answered: Option<(RequestKind, ResultCode)>,
    /// Whether the request being served passed the rate limiter.
    admitted: bool,
    /// The subscribers whose checkpoint rate tokens the request being served took, one
    /// entry per token (given back if it is taken back or refused).
    spent: Vec<SubscriberId>,
    guard: Guard,
}

/// What one request did to the server, taken out with [`Server::take_journal`] so that
/// a shell committing several requests' data plane operations in one batch can take
/// them all back ([`Server::take_back`], last first) when that batch fails.
///
/// Every change a request makes to a mapping is recorded (a renewal that only moves
/// the expiry too: a later request of the same batch may depend on it, and its
/// replication records are withheld with the batch's).
#[derive(Debug, Default)]
pub struct Journal {
    undo: Vec<Undo>,
    answered: Option<(RequestKind, ResultCode)>,
    admitted: bool,
    spent: Vec<SubscriberId>,
}

impl Journal {
    /// Whether the request passed the rate limiter (a request it dropped is not served
    /// again after a take-back).
    pub fn admitted(&self) -> bool {
        self.admitted
    }

    /// Whether the request changed no mapping.
    pub fn is_empty(&self) -> bool {
        self.undo.is_empty()
    }
}

/// One change a request made to the table, recorded so that a request whose data plane
/// batch fails can be taken back ([`Server::refuse`]).
#[derive(Debug)]
enum Undo {
    /// A new mapping was created.
    Created(MappingKey),
    /// An existing mapping changed what the data plane enforces; this was it before.
    Replaced(Box<Mapping>),
    /// A mapping was deleted; this was it.
    Removed(Box<Mapping>),
}

/// A mapping request after validation, before commitment.
struct Ask2<'a> {
    key: MappingKey,
    nonce: [u8; 12],
    origin: Origin,
    client: IpAddr,
    lifetime: u32,
    suggested: (Option<IpAddr>, Option<u16>),
    prefer_failure: bool,
    filters: Option<&'a [pcp_proto::Filter]>,
    description: Option<&'a str>,
    requested: bool,
    /// The PCP identity the request was authenticated as (RFC 7652), if any.
    identity: Option<&'a str>,
}

/// What a served mapping request produced.
struct Granted {
    external: ExternalEndpoint,
    lifetime: u32,
    checkpointed: bool,
}

impl Server {
    /// A server with `cfg` whose epoch starts at `now`; `seed` seeds port randomisation
    /// (pass real entropy in production, a fixed value in simulations).
    pub fn new(cfg: ServerConfig, now: Time, seed: u64) -> Result<Server, ConfigError> {
        cfg.validate()?;
        Ok(Server {
            policy: Policy::new(&cfg.policy),
            subscribers: SubscriberTable::new(&cfg.subscribers),
            subs: subscriber::Store::default(),
            table: Table::new(),
            rules: RuleNames::default(),
            hosts: crate::FastMap::default(),
            idle: std::collections::BinaryHeap::new(),
            clock: now,
            exposed_now: false,
            pool: Pool::new(&cfg.pool),
            ledger: Ledger {
                count: 0,
                capacity: cfg.checkpoint.capacity,
            },
            epochs: Epochs::new(now),
            backup: BackupStatus::None,
            stats: Stats::default(),
            rng: SmallRng::seed_from_u64(seed),
            undo: Vec::new(),
            answered: None,
            admitted: false,
            spent: Vec::new(),
            guard: Guard::new(&cfg.limits, now),
            cfg,
        })
    }

    /// Replaces policy, tiers, subscribers, lifetimes and limits without touching
    /// mappings. Existing mappings meet the new rules at their next renewal. The pool
    /// cannot change while mappings hold its endpoints: that needs a restart.
    pub fn reload(&mut self, cfg: ServerConfig) -> Result<(), ConfigError> {
        cfg.validate()?;
        if cfg.pool != self.cfg.pool {
            return Err(ConfigError::Invalid {
                key: "pool".into(),
                problem: "the external pool cannot change on reload; restart pcpd".into(),
            });
        }
        self.policy = Policy::new(&cfg.policy);
        self.subscribers = SubscriberTable::new(&cfg.subscribers);
        self.ledger.capacity = cfg.checkpoint.capacity;
        self.guard.configure(&cfg.limits, self.clock);
        // Tiers apply now; a host that moved to another subscriber moves with its
        // next request (see `create_or_renew`).
        for (id, st) in self.subs.iter_mut() {
            st.tier = self.subscribers.tier_of(id);
        }
        self.cfg = cfg;
        Ok(())
    }

    /// The configuration in force.
    pub fn config(&self) -> &ServerConfig {
        &self.cfg
    }

    /// Tells the core whether a backup can take checkpoints.
    pub fn set_backup_status(&mut self, status: BackupStatus) {
        self.backup = status;
    }

    /// The backup status last reported.
    pub fn backup_status(&self) -> BackupStatus {
        self.backup
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Every mapping, as owned views.
    pub fn mappings(&self) -> impl Iterator<Item = Mapping> + '_ {
        self.table.iter().map(|(id, _)| self.view(id))
    }

    /// The mapping with this key.
    pub fn mapping(&self, key: &MappingKey) -> Option<Mapping> {
        self.table.find(key).map(|id| self.view(id))
    }

    /// The public view of record `id`.
    fn view(&self, id: u32) -> Mapping {
        let r = self.table.get(id);
        let extra = r.extra.as_deref();
        Mapping {
            key: r.key(),
            nonce: r.nonce,
            origin: r.origin,
            client: extra.and_then(|e| e.client).unwrap_or(r.endpoint.addr),
            external: self.table.external_of(id),
            expires: r.expires,
            lifetime: r.lifetime,
            subscriber: self.subs.get(r.sub).0.clone(),
            checkpoint_requested: r.requested,
            checkpoint: self.rules.unpack(r.reason),
            filters: r.filters().into(),
            description: extra.and_then(|e| e.description.clone()),
            created: Time(u64::from(r.created_secs) * 1000),
        }
    }

    /// Number of mappings.
    pub fn mapping_count(&self) -> usize {
        self.table.len()
    }

    /// Number of checkpointed mappings.
    pub fn checkpointed_count(&self) -> u64 {
        self.ledger.count
    }

    /// Every subscriber with state, and its tier's limits.
    pub fn subscribers(
        &self,
    ) -> impl Iterator<Item = (&SubscriberId, &SubscriberState, &TierConfig)> {
        self.subs
            .iter()
            .map(|(_, id, st)| (id, st, self.cfg.tier(&st.tier)))
    }

    /// What the core keeps per host and per subscriber, for the bounded-state checks
    /// and metrics.
    pub fn footprint(&self) -> Footprint {
        Footprint {
            guard: self.guard.footprint(),
            subscribers: self.subs.len(),
            idle_subscribers: self.idle.len(),
            hosts: self.hosts.len(),
            epoch_exceptions: self.epochs.exceptions(),
            mappings: self.table.len(),
        }
    }

    /// Epoch bookkeeping (HA keeps it continuous across a takeover).
    pub fn epochs(&mut self) -> &mut Epochs {
        &mut self.epochs
    }

    /// When [`Server::expire`] next has work.
    pub fn next_timeout(&mut self) -> Option<Time> {
        self.table.next_expiry()
    }

    /// Removes every mapping whose lifetime has ended by `now`.
    pub fn expire(&mut self, now: Time, effects: &mut Vec<Effect>) {
        self.clock = self.clock.max(now);
        while let Some(id) = self.table.pop_expired(now) {
            self.remove_mapping(id, effects);
            self.stats.expired += 1;
        }
        while let Some(Reverse((t, _))) = self.idle.peek() {
            if *t > now {
                break;
            }
            let Some(Reverse((_, id))) = self.idle.pop() else {
                break;
            };
            if let Some(slot) = self.subs.find(&id)
                && self.subs.get(slot).1.mappings == 0
            {
                self.retire_subscriber(slot);
            }
        }
    }

    /// Forgets a subscriber that holds no mapping — but only once its checkpoint
    /// bucket is full again: forgetting it earlier would hand it a fresh burst, so
    /// deleting all mappings would reset the rate limit (RFC 7767 §3.2). Until then it
    /// waits in the idle queue.
    fn retire_subscriber(&mut self, slot: u32) {
        let now = self.clock;
        let (id, st) = self.subs.get(slot);
        let tier = self.cfg.tier(&st.tier);
        let missing = f64::from(tier.checkpoint_burst)
            - st.bucket
                .tokens(tier.checkpoint_rate, tier.checkpoint_burst, now);
        if missing <= 0.0 {
            self.subs.remove(slot);
        } else if tier.checkpoint_rate > 0.0 {
            let full_in = std::time::Duration::from_secs_f64(missing / tier.checkpoint_rate);
            let id = id.clone();
            self.idle.push(Reverse((
                now.plus(full_in).plus(std::time::Duration::from_millis(1)),
                id,
            )));
        }
        // With a zero rate the bucket never refills: the state is kept for good.
    }

    /// The unsolicited ANNOUNCE for `client` (unicast) or, with `None`, for everyone
    /// (multicast), written into `buf`.
    pub fn announce(&self, client: Option<IpAddr>, now: Time, buf: &mut [u8]) -> usize {
        let epoch = match client {
            Some(c) => self.epochs.epoch(c, now),
            None => self.epochs.global(now),
        };
        Response {
            result_code: ResultCode::Success,
            lifetime: 0,
            epoch,
            body: Body::Announce,
            options: Options::EMPTY,
        }
        .emit(buf)
        .unwrap_or(0)
    }

    /// Handles one datagram from `src` received at `now`. The reply, if any, is written
    /// into `reply` (1100 octets suffice); effects are appended to `effects`.
    pub fn handle(
        &mut self,
        datagram: &[u8],
        src: SocketAddr,
        now: Time,
        reply: &mut [u8],
        effects: &mut Vec<Effect>,
    ) -> Reply {
        self.handle_as(datagram, src, None, now, reply, effects)
    }

    /// [`Server::handle`] for a request that the shell authenticated (RFC 7652) as
    /// `identity`: its mappings are charged to the subscriber of that identity
    /// (`subscribers.entries[].identities`, else a subscriber of its own) instead of
    /// the one of its address, and policy rules with `identities` can match it. The
    /// core trusts the shell: the tag was verified and removed before this call.
    pub fn handle_as(
        &mut self,
        datagram: &[u8],
        src: SocketAddr,
        identity: Option<&str>,
        now: Time,
        reply: &mut [u8],
        effects: &mut Vec<Effect>,
    ) -> Reply {
        self.begin_request();
        let src_ip = src.ip().to_canonical();
        // First of all, before any lookup: a flooding host costs one hash lookup.
        if !self.guard.admit(src_ip, now) {
            self.stats.rate_limited += 1;
            return Reply::Drop;
        }
        self.serve_datagram(datagram, src, identity, now, reply, effects)
    }

    /// Serves again a datagram whose first serving was taken back
    /// ([`Server::take_back`]): as [`Server::handle_as`], but without charging the
    /// rate limiter a second time.
    pub fn handle_again(
        &mut self,
        datagram: &[u8],
        src: SocketAddr,
        identity: Option<&str>,
        now: Time,
        reply: &mut [u8],
        effects: &mut Vec<Effect>,
    ) -> Reply {
        self.begin_request();
        self.serve_datagram(datagram, src, identity, now, reply, effects)
    }

    /// Starts the journal of a new request (see [`Journal`]).
    fn begin_request(&mut self) {
        self.undo.clear();
        self.spent.clear();
        self.answered = None;
        self.admitted = false;
    }

    /// The journal of the request just served (see [`Journal`]).
    pub fn take_journal(&mut self) -> Journal {
        Journal {
            undo: std::mem::take(&mut self.undo),
            answered: self.answered.take(),
            admitted: std::mem::take(&mut self.admitted),
            spent: std::mem::take(&mut self.spent),
        }
    }

    fn serve_datagram(
        &mut self,
        datagram: &[u8],
        src: SocketAddr,
        identity: Option<&str>,
        now: Time,
        reply: &mut [u8],
        effects: &mut Vec<Effect>,
    ) -> Reply {
        self.admitted = true;
        let src_ip = src.ip().to_canonical();
        self.exposed_now = false;
        // A mapping whose lifetime has ended is gone, even if the shell's expiry timer
        // has not run yet (a peek when nothing is due). A shell that may have to
        // [`Server::refuse`] the request calls [`Server::expire`] first, so that the
        // request's effects are its own.
        self.expire(now, effects);
        if natpmp::is_natpmp(datagram) {
            return self.handle_natpmp(datagram, src_ip, now, reply, effects);
        }
        // RFC 7652 is not served here (yet): parsed as by a server without it, the
        // AUTHENTICATION opcode is UNSUPP_OPCODE and options 4–12 UNSUPP_OPTION
        // whatever their contents (see docs/AUTH.md).
        match Request::parse_with(datagram, Extensions::BASE) {
            Ok(req) => {
                let kind = RequestKind::of(req.opcode());
                let result = self.serve(&req, src_ip, identity, now, reply, effects);
                match result {
                    Ok((n, echoed)) => {
                        self.count_answer(kind, ResultCode::Success);
                        // A promise needs the backup's word first, and so does a host
                        // becoming exposed; with no backup configured
                        // (`without_backup = "honour"`) there is none to wait for.
                        let exposed = std::mem::take(&mut self.exposed_now);
                        if (echoed || exposed) && self.backup == BackupStatus::Ready {
                            Reply::Hold(n)
                        } else {
                            Reply::Send(n)
                        }
                    }
                    Err(code) => self.error(datagram, code, true, kind, src_ip, now, reply),
                }
            }
            Err(e) => {
                let Some(mut code) = e.result_code() else {
                    self.stats.dropped += 1;
                    return Reply::Drop;
                };
                // RFC 6887 §8.3 checks the client address before the opcode, its body
                // and its options: those errors come from a well-framed header.
                let framed = matches!(
                    e,
                    ParseError::UnsupportedOpcode(_)
                        | ParseError::UnsupportedOption { .. }
                        | ParseError::MalformedOption { .. }
                        | ParseError::Malformed(pcp_proto::Malformed::BodyTruncated { .. })
                );
                if framed {
                    let p = pcp_proto::Packet::new_unchecked(datagram);
                    if p.client_addr() != src_ip {
                        code = ResultCode::AddressMismatch;
                    }
                }
                let kind = RequestKind::of(Opcode::from_bits(datagram[1]));
                self.error(datagram, code, false, kind, src_ip, now, reply)
            }
        }
    }

    /// Charges one datagram from `src` to its host's rate limit (`[limits]`) without
    /// serving it; `false`: drop it (counted in `rate_limited`). For shells that do
    /// costly work of their own before [`Server::handle`] (the RFC 7652 gate): a
    /// datagram they pass on is charged again there.
    pub fn admit(&mut self, src: IpAddr, now: Time) -> bool {
        if self.guard.admit(src.to_canonical(), now) {
            true
        } else {
            self.stats.rate_limited += 1;
            false
        }
    }

    /// Answers a datagram from a source the shell must not serve (its access list says
    /// so): NOT_AUTHORIZED to a PCP request (RFC 6887 §7.4: the request is copied, no
    /// state is touched), nothing to NAT-PMP or to what would be dropped anyway. The
    /// per-host rate limit applies first, as in [`Server::handle`].
    pub fn not_authorized(
        &mut self,
        datagram: &[u8],
        src: SocketAddr,
        now: Time,
        reply: &mut [u8],
    ) -> Reply {
        let src_ip = src.ip().to_canonical();
        if !self.guard.admit(src_ip, now) {
            self.stats.rate_limited += 1;
            return Reply::Drop;
        }
        if natpmp::is_natpmp(datagram) {
            self.stats.dropped += 1;
            return Reply::Drop;
        }
        let parsed = match Request::parse(datagram) {
            Ok(_) => true,
            Err(e) if e.result_code().is_some() => false,
            Err(_) => {
                self.stats.dropped += 1;
                return Reply::Drop;
            }
        };
        let kind = RequestKind::of(Opcode::from_bits(datagram[1]));
        self.error(
            datagram,
            ResultCode::NotAuthorized,
            parsed,
            kind,
            src_ip,
            now,
            reply,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn error(
        &mut self,
        datagram: &[u8],
        code: ResultCode,
        parsed: bool,
        kind: RequestKind,
        src: IpAddr,
        now: Time,
        reply: &mut [u8],
    ) -> Reply {
        self.count_answer(kind, code);
        let lifetime = self.error_lifetime(code);
        let epoch = self.epochs.epoch(src, now);
        match emit_error_response(datagram, code, lifetime, epoch, parsed, reply) {
            Ok(n) => Reply::Send(n),
            Err(_) => Reply::Drop,
        }
    }

    /// Counts the answer of the request being served (and remembers it, so that a
    /// take-back can retract it).
    fn count_answer(&mut self, kind: RequestKind, code: ResultCode) {
        self.stats.answered(kind, code);
        self.answered = Some((kind, code));
    }

    fn error_lifetime(&self, code: ResultCode) -> u32 {
        // CANNOT_PROVIDE_EXTERNAL is given only when a suggested endpoint is taken right
        // now, which may clear soon: short.
        if code.is_short_lifetime_error() || code == ResultCode::CannotProvideExternal {
            self.cfg.lifetime.short_error
        } else {
            self.cfg.lifetime.long_error
        }
    }

    /// Serves a parsed request; on success writes the response and returns its length.
    fn serve(
        &mut self,
        req: &Request<'_>,
        src: IpAddr,
        identity: Option<&str>,
        now: Time,
        reply: &mut [u8],
        effects: &mut Vec<Effect>,
    ) -> Result<(usize, bool), ResultCode> {
        if req.client_addr != src {
            return Err(ResultCode::AddressMismatch);
        }
        let (mapping, remote) = match &req.body {
            Body::Announce => {
                let resp = Response {
                    result_code: ResultCode::Success,
                    lifetime: 0,
                    epoch: self.epochs.epoch(src, now),
                    body: Body::Announce,
                    options: Options::EMPTY,
                };
                let n = resp.emit(reply).map_err(|_| ResultCode::NoResources)?;
                return Ok((n, false));
            }
            Body::Map(m) => (*m, None),
            Body::Peer(p) => (p.mapping, Some((p.remote_addr, p.remote_port))),
            // Refused by the parser (Extensions::BASE); kept for exhaustiveness.
            Body::Authentication(_) => return Err(ResultCode::UnsuppOpcode),
        };
        let internal = match req.options.third_party() {
            Some(tp) if tp != src => {
                let ok = self
                    .cfg
                    .mapping
                    .third_party_prefixes
                    .iter()
                    .any(|p| p.contains(&src));
                if !ok {
                    return Err(ResultCode::NotAuthorized);
                }
                tp
            }
            _ => src,
        };
        let filters = self.filters(req.options)?;
        let granted = self.serve_mapping(
            req, &mapping, remote, internal, src, identity, &filters, now, effects,
        )?;
        self.write_success(req, &mapping, remote, &granted, src, now, reply)
    }

    /// FILTERs of a request: `None` when absent (keep what the mapping has), an empty
    /// list when a FILTER with prefix length 0 asks to remove them all.
    fn filters(&self, options: Options<'_>) -> Result<Option<Vec<pcp_proto::Filter>>, ResultCode> {
        let mut any = false;
        let mut list = Vec::new();
        for f in options.filters() {
            any = true;
            if f.prefix_len == 0 {
                list.clear();
            } else if !list.contains(&f) {
                list.push(f);
            }
        }
        if list.len() > self.cfg.mapping.max_filters {
            return Err(ResultCode::ExcessiveRemotePeers);
        }
        Ok(any.then_some(list))
    }

    #[allow(clippy::too_many_arguments)]
    fn serve_mapping(
        &mut self,
        req: &Request<'_>,
        body: &MapBody,
        remote: Option<(IpAddr, u16)>,
        internal: IpAddr,
        client: IpAddr,
        identity: Option<&str>,
        filters: &Option<Vec<pcp_proto::Filter>>,
        now: Time,
        effects: &mut Vec<Effect>,
    ) -> Result<Granted, ResultCode> {
        let is_peer = remote.is_some();
        // RFC 6887 §11.1: with protocol 0 the internal port "MUST be ignored on reception".
        let internal_port = if body.protocol == 0 {
            0
        } else {
            body.internal_port
        };
        if req.lifetime == 0 && !is_peer && (body.protocol == 0 || internal_port == 0) {
            return self.delete_all(internal, body.protocol, &body.nonce, Origin::Pcp, effects);
        }
        if body.protocol == 0 || !self.cfg.mapping.protocols.contains(&body.protocol) {
            return Err(ResultCode::UnsuppProtocol);
        }
        if let Some((raddr, rport)) = remote
            && (internal_port == 0 || rport == 0 || raddr.is_unspecified())
        {
            return Err(ResultCode::MalformedRequest);
        }
        if internal_port == 0 {
            // "All ports" of a protocol is not something a shared-address NAT can give.
            return Err(ResultCode::NotAuthorized);
        }
        let suggested_addr = Some(body.external_addr).filter(|a| !a.is_unspecified());
        let suggested_port = Some(body.external_port).filter(|p| *p != 0);
        let ask = Ask2 {
            key: MappingKey {
                internal,
                protocol: body.protocol,
                internal_port,
                remote,
            },
            nonce: body.nonce,
            origin: Origin::Pcp,
            client,
            lifetime: req.lifetime,
            suggested: (suggested_addr, suggested_port),
            prefer_failure: req.options.prefer_failure(),
            filters: filters.as_deref(),
            description: req.options.description(),
            requested: req.options.checkpoint_required(),
            identity,
        };
        // "It is not possible to reduce the lifetime of a mapping (or delete it, with
        // requested lifetime=0) using PEER" (RFC 6887 §12.1): a PEER only extends.
        if req.lifetime == 0 && !is_peer {
            return self.delete_one(&ask, effects);
        }
        self.create_or_renew(&ask, now, effects)
    }

    fn delete_one(
        &mut self,
        ask: &Ask2<'_>,
        effects: &mut Vec<Effect>,
    ) -> Result<Granted, ResultCode> {
        let external = match self.table.find(&ask.key) {
            None => ExternalEndpoint {
                addr: ask.suggested.0.unwrap_or(IpAddr::from([0u8; 4])),
                protocol: ask.key.protocol,
                port: ask.suggested.1.unwrap_or(0),
            },
            Some(id) => {
                let r = self.table.get(id);
                if r.nonce != ask.nonce || r.origin != ask.origin {
                    return Err(ResultCode::NotAuthorized);
                }
                let ext = self.table.external_of(id);
                self.undo.push(Undo::Removed(Box::new(self.view(id))));
                self.remove_mapping(id, effects);
                ext
            }
        };
        Ok(Granted {
            external,
            lifetime: 0,
            checkpointed: false,
        })
    }

    /// Deletes every MAP of `internal` (of `protocol`, unless 0) that `nonce` owns.
    fn delete_all(
        &mut self,
        internal: IpAddr,
        protocol: u8,
        nonce: &[u8; 12],
        origin: Origin,
        effects: &mut Vec<Effect>,
    ) -> Result<Granted, ResultCode> {
        for id in self.table.ids_of_host(internal) {
            let r = self.table.get(id);
            let owned = (protocol == 0 || r.endpoint.protocol == protocol)
                && r.origin == origin
                && (origin == Origin::NatPmp || r.nonce == *nonce)
                && r.remote.is_none();
            if owned {
                self.undo.push(Undo::Removed(Box::new(self.view(id))));
                self.remove_mapping(id, effects);
            }
        }
        Ok(Granted {
            external: ExternalEndpoint {
                addr: IpAddr::from([0u8; 4]),
                protocol,
                port: 0,
            },
            lifetime: 0,
            checkpointed: false,
        })
    }

    fn create_or_renew(
        &mut self,
        ask: &Ask2<'_>,
        now: Time,
        effects: &mut Vec<Effect>,
    ) -> Result<Granted, ResultCode> {
        let existing = self.table.find(&ask.key);
        if let Some(id) = existing {
            let r = self.table.get(id);
            if r.nonce != ask.nonce || r.origin != ask.origin {
                return Err(ResultCode::NotAuthorized);
            }
        }
        // The subscriber, looked up afresh: a reload may have moved the host to another
        // one, and a renewal then moves the mapping with its accounting. Its state is a
        // copy until the commit, so a refused request changes nothing.
        let (subscriber, tier_name) = self.subscribers.resolve(ask.key.internal, ask.identity);
        let sub_slot = self.subs.find(&subscriber);
        let old_slot = existing.map(|id| self.table.get(id).sub);
        let moving = old_slot.is_some() && old_slot != sub_slot;
        let tier = *self.cfg.tier(&tier_name);
        let mut state = match sub_slot {
            Some(slot) => self.subs.get(slot).1.clone(),
            None => SubscriberState::new(tier_name.clone(), tier.checkpoint_burst, now),
        };
        state.tier = tier_name.clone();
        let was_checkpointed = existing
            .is_some_and(|id| checkpoint::packed_is_checkpointed(self.table.get(id).reason));
        if moving {
            state.mappings += 1;
            if was_checkpointed {
                state.checkpointed += 1;
            }
        }
        if existing.is_none() && state.mappings >= tier.mapping_quota {
            return Err(ResultCode::UserExQuota);
        }

        // The external endpoint: kept on renewal, shared with the internal endpoint's
        // other mappings, or newly allocated.
        let external = match self.table.binding(&ask.key.endpoint()) {
            Some(ext) => ext,
            None => {
                let alloc = AllocRequest {
                    internal: ask.key.internal,
                    internal_port: ask.key.internal_port,
                    protocol: ask.key.protocol,
                    suggested_addr: ask.suggested.0,
                    suggested_port: ask.suggested.1,
                    prefer_failure: ask.prefer_failure,
                };
                self.pool
                    .choose(&alloc, &mut self.rng)
                    .map_err(|e| match e {
                        AllocError::CannotProvide => ResultCode::CannotProvideExternal,
                        AllocError::Exhausted => ResultCode::NoResources,
                    })?
            }
        };
        if ask.prefer_failure {
            let addr_ok = ask.suggested.0.is_none_or(|a| a == external.addr);
            let port_ok = ask.suggested.1.is_none_or(|p| p == external.port);
            if !(addr_ok && port_ok) {
                return Err(ResultCode::CannotProvideExternal);
            }
        }

        let mut lifetime = ask
            .lifetime
            .clamp(self.cfg.lifetime.min, self.cfg.lifetime.max);
        if let (Some(id), true) = (existing, ask.key.is_peer()) {
            lifetime = lifetime.max(now.secs_until(self.table.get(id).expires));
        }
        let verdict = if self.policy.is_empty() {
            None
        } else {
            self.policy.evaluate(&Flow {
                subscriber: &subscriber,
                tier: &tier_name,
                identity: ask.identity,
                opcode: if ask.key.is_peer() {
                    OpcodeName::Peer
                } else {
                    OpcodeName::Map
                },
                internal: ask.key.internal,
                protocol: ask.key.protocol,
                internal_port: ask.key.internal_port,
                remote: ask.key.remote,
            })
        };
        let was_forced =
            existing.is_some_and(|id| self.table.get(id).reason.code == checkpoint::FORCED_CODE);
        let reason = checkpoint::decide(
            Ask {
                requested: ask.requested,
                verdict: verdict.as_ref(),
                already: was_checkpointed,
                already_forced: was_forced,
            },
            &tier,
            &mut state,
            &self.ledger,
            self.backup,
            self.cfg.checkpoint.without_backup,
            now,
        );

        // Everything that can fail has been checked: commit. A renewal is journaled
        // first, as the mapping is now (its subscriber may be retired below).
        // Recorded even when the data plane does not change: a renewal's lifetime,
        // checkpoint and accounting are taken back with its batch.
        if let Some(id) = existing {
            self.undo.push(Undo::Replaced(Box::new(self.view(id))));
        }
        self.stats.decided(&reason);
        if !was_checkpointed && matches!(reason, crate::Reason::Requested) {
            // `commit` takes a rate token for it.
            self.spent.push(subscriber.clone());
        }
        checkpoint::commit(was_checkpointed, &reason, &mut state, &mut self.ledger);
        let checkpointed = reason.is_checkpointed();
        self.host_delta(
            ask.key.internal,
            i32::from(existing.is_none()),
            i32::from(checkpointed) - i32::from(was_checkpointed),
            effects,
        );
        let packed = self.rules.pack(&reason);
        let expires = now.plus_secs(lifetime);
        if existing.is_none() {
            state.mappings += 1;
        }
        if let (true, Some(old)) = (moving, old_slot) {
            let st = self.subs.get_mut(old);
            st.mappings = st.mappings.saturating_sub(1);
            if was_checkpointed {
                st.checkpointed = st.checkpointed.saturating_sub(1);
            }
            if st.mappings == 0 {
                self.retire_subscriber(old);
            }
        }
        let sub = match sub_slot {
            Some(slot) => {
                *self.subs.get_mut(slot) = state;
                slot
            }
            None => self.subs.insert(subscriber, state),
        };
        let client = (ask.client != ask.key.internal).then_some(ask.client);
        let (id, install) = match existing {
            Some(id) => {
                let install = ask
                    .filters
                    .is_some_and(|f| f != self.table.get(id).filters());
                let r = self.table.get_mut(id);
                if ask.filters.is_some() || ask.description.is_some() || client.is_some() {
                    let extra = r.extra.get_or_insert_with(Default::default);
                    if let Some(f) = ask.filters {
                        extra.filters = f.into();
                    }
                    if let Some(d) = ask.description {
                        extra.description = Some(d.into());
                    }
                    extra.client = client;
                } else if let Some(extra) = r.extra.as_mut() {
                    extra.client = None;
                }
                r.lifetime = lifetime;
                r.requested = ask.requested;
                r.reason = packed;
                r.sub = sub;
                if r.expires != expires {
                    r.expires = expires;
                    self.table.reindex_expiry(id);
                }
                (id, install)
            }
            None => {
                let extra = (client.is_some()
                    || ask.description.is_some()
                    || ask.filters.is_some_and(|f| !f.is_empty()))
                .then(|| {
                    Box::new(Extra {
                        client,
                        filters: ask.filters.unwrap_or_default().into(),
                        description: ask.description.map(Into::into),
                    })
                });
                let record = Record::new(
                    &ask.key,
                    ask.nonce,
                    expires,
                    lifetime,
                    now,
                    sub,
                    packed,
                    ask.origin,
                    ask.requested,
                    extra,
                );
                let (id, fresh) = self.table.insert(record, external);
                if fresh {
                    self.pool.take(external);
                }
                self.undo.push(Undo::Created(ask.key));
                (id, true)
            }
        };
        if install {
            effects.push(Effect::DataPlane(Op::Install(self.entry(id))));
        }
        if checkpointed {
            effects.push(Effect::Replicate(Change::Upsert(Box::new(self.view(id)))));
        } else if was_checkpointed {
            effects.push(Effect::Replicate(Change::Remove(ask.key)));
        }
        Ok(Granted {
            external,
            lifetime,
            checkpointed,
        })
    }

    /// The data plane entry of record `id`.
    fn entry(&self, id: u32) -> Entry {
        let r = self.table.get(id);
        entry_of(&r.key(), self.table.external_of(id), r.filters())
    }

    /// Removes a mapping with all its accounting and effects.
    fn remove_mapping(&mut self, id: u32, effects: &mut Vec<Effect>) {
        let external = self.table.external_of(id);
        let Some((r, freed)) = self.table.remove(id) else {
            return;
        };
        if let Some(ep) = freed {
            self.pool.release(&ep);
        }
        let checkpointed = checkpoint::packed_is_checkpointed(r.reason);
        let st = self.subs.get_mut(r.sub);
        st.mappings = st.mappings.saturating_sub(1);
        if checkpointed {
            checkpoint::release(st, &mut self.ledger);
        }
        if st.mappings == 0 {
            self.retire_subscriber(r.sub);
        }
        let key = r.key();
        effects.push(Effect::DataPlane(Op::Remove(entry_of(
            &key,
            external,
            r.filters(),
        ))));
        if checkpointed {
            effects.push(Effect::Replicate(Change::Remove(key)));
        }
        self.host_delta(key.internal, -1, -i32::from(checkpointed), effects);
    }

    /// Updates a host's counts; tells the backup when it starts or stops holding
    /// unprotected mappings. Only the record of a host that becomes exposed (it has
    /// checkpointed mappings) makes the reply wait: a successor that never heard of
    /// the unprotected mappings of a host of which it holds nothing still resets that
    /// host's epoch (only the ANNOUNCE is missed), so a host without checkpointed
    /// mappings costs no wait for the backup.
    fn host_delta(
        &mut self,
        host: IpAddr,
        mappings: i32,
        checkpointed: i32,
        effects: &mut Vec<Effect>,
    ) {
        if mappings == 0 && checkpointed == 0 {
            return;
        }
        let c = self.hosts.entry(host).or_default();
        let before = c.unprotected();
        c.mappings = c.mappings.saturating_add_signed(mappings);
        c.checkpointed = c.checkpointed.saturating_add_signed(checkpointed);
        let after = c.unprotected();
        if after && !before && c.exposed() {
            // The backup must know before the host is answered: a takeover in
            // between would keep its epoch (it holds the host's checkpointed
            // mappings) and hide the loss of the new mapping. A host that already
            // held unprotected mappings when it got its checkpointed ones needs no
            // wait: its record went first, and the backup applies records in order.
            self.exposed_now = true;
        }
        if c.mappings == 0 {
            self.hosts.remove(&host);
        }
        if before != after {
            effects.push(Effect::Replicate(Change::Host {
                host,
                unprotected: after,
            }));
        }
    }

    /// Whether `host` holds mappings that are not checkpointed (it loses state in a
    /// takeover).
    pub fn host_unprotected(&self, host: IpAddr) -> bool {
        self.hosts.get(&host).is_some_and(HostCount::unprotected)
    }

    /// Whether `host` has checkpointed mappings and unprotected ones too: the backup
    /// must hold that fact before such a host is answered (see `Change::Host`).
    pub fn host_exposed(&self, host: IpAddr) -> bool {
        self.hosts.get(&host).is_some_and(HostCount::exposed)
    }

    /// Hosts holding mappings.
    pub fn hosts(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.hosts.keys().copied()
    }

    /// Hosts holding mappings that are not checkpointed (for a bulk copy to a
    /// backup).
    pub fn unprotected_hosts(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.hosts
            .iter()
            .filter(|(_, c)| c.unprotected())
            .map(|(h, _)| *h)
    }

    /// The data plane refused the batch of the request just passed to
    /// [`Server::handle`]: takes back everything that request did to the table (a new
    /// mapping is removed and its port freed, a changed one restored, a deleted one put
    /// back) and rewrites `reply` as an error with `code` (NETWORK_FAILURE or
    /// NO_RESOURCES) and the short error lifetime, so that no client is told SUCCESS
    /// for a translation the kernel does not make.
    ///
    /// Batches are all-or-nothing, so the data plane still holds what it held before
    /// the request: the take-back has no data plane operations. Its replication
    /// records are appended to `effects`; they cancel the request's own, so a shell
    /// that withheld those (replicating only after the data plane succeeded) drops
    /// both.
    pub fn refuse(
        &mut self,
        datagram: &[u8],
        src: SocketAddr,
        now: Time,
        code: ResultCode,
        reply: &mut [u8],
        effects: &mut Vec<Effect>,
    ) -> Reply {
        let spent = std::mem::take(&mut self.spent);
        self.refund(spent);
        let undo = std::mem::take(&mut self.undo);
        self.undo_changes(undo, now, effects);
        self.exposed_now = false;
        let src_ip = src.ip().to_canonical();
        if natpmp::is_natpmp(datagram) {
            self.stats.retract(RequestKind::NatPmp, ResultCode::Success);
            self.stats.answered(RequestKind::NatPmp, code);
            let epoch = self.epochs.epoch(src_ip, now);
            let resp = match natpmp::Request::parse(datagram) {
                Ok(natpmp::Request::Map(m)) => natpmp::Response::Map {
                    protocol: m.protocol,
                    result: natpmp_code(code),
                    epoch,
                    internal_port: m.internal_port,
                    external_port: 0,
                    lifetime: 0,
                },
                // Only MAP requests change the data plane.
                _ => return Reply::Drop,
            };
            return match resp.emit(reply) {
                Some(n) => Reply::Send(n),
                None => Reply::Drop,
            };
        }
        let kind = RequestKind::of(Opcode::from_bits(datagram.get(1).copied().unwrap_or(0)));
        self.stats.retract(kind, ResultCode::Success);
        self.error(datagram, code, true, kind, src_ip, now, reply)
    }

    /// Takes back a request served earlier, from its journal: what it did to the
    /// table is undone and its answer no longer counted. Requests served after it
    /// must have been taken back first (last first): each journal undoes its request
    /// from the state that request left. As with [`Server::refuse`], the data plane
    /// is assumed never to have received the request's operations, and the
    /// replication records appended to `effects` cancel the request's own.
    pub fn take_back(&mut self, journal: Journal, now: Time, effects: &mut Vec<Effect>) {
        // Tokens first: a subscriber the undo leaves without mappings is then forgotten
        // at once if its bucket is full again, as if the request had never come.
        self.refund(journal.spent);
        self.undo_changes(journal.undo, now, effects);
        if let Some((kind, code)) = journal.answered {
            self.stats.retract(kind, code);
        }
        self.exposed_now = false;
    }

    /// Gives back the checkpoint rate tokens a request took (it was taken back or
    /// refused: it checkpointed nothing, so it must not cost the subscriber its rate).
    fn refund(&mut self, spent: Vec<SubscriberId>) {
        for id in spent {
            if let Some(slot) = self.subs.find(&id) {
                let st = self.subs.get_mut(slot);
                let burst = self.cfg.tier(&st.tier).checkpoint_burst;
                st.bucket.refund(burst);
            }
        }
    }

    fn undo_changes(&mut self, mut undo: Vec<Undo>, now: Time, effects: &mut Vec<Effect>) {
        let mut undone = Vec::new();
        while let Some(u) = undo.pop() {
            match u {
                Undo::Created(key) => {
                    if let Some(id) = self.table.find(&key) {
                        self.remove_mapping(id, &mut undone);
                    }
                }
                Undo::Replaced(old) => {
                    if let Some(id) = self.table.find(&old.key) {
                        self.remove_mapping(id, &mut undone);
                    }
                    self.restore(&old, now, &mut undone);
                }
                Undo::Removed(old) => self.restore(&old, now, &mut undone),
            }
        }
        effects.extend(
            undone
                .into_iter()
                .filter(|e| matches!(e, Effect::Replicate(_))),
        );
    }

    /// Puts a mapping taken away by a refused request back as it was, charged to the
    /// subscriber it was charged to (which may be an identity's, not the address's).
    fn restore(&mut self, m: &Mapping, now: Time, effects: &mut Vec<Effect>) {
        let tier = self.subscribers.tier_of(&m.subscriber);
        match self.install(m, Some((m.subscriber.clone(), tier)), now, effects) {
            Ok(()) if m.is_checkpointed() => {
                effects.push(Effect::Replicate(Change::Upsert(Box::new(m.clone()))));
            }
            Ok(()) => {}
            // Its endpoint was freed by the same request, so this cannot happen; if it
            // did, the mapping stays gone, which the invariants check would show.
            Err(_) => {}
        }
    }

    /// Clears the checkpoint of the mapping with `key` because the backup did not
    /// acknowledge it in time (reason `backup_timeout`), returning its quota and
    /// capacity. Returns whether anything changed.
    pub fn withdraw_checkpoint(&mut self, key: &MappingKey, effects: &mut Vec<Effect>) -> bool {
        let Some(id) = self.table.find(key) else {
            return false;
        };
        let r = self.table.get(id);
        if !checkpoint::packed_is_checkpointed(r.reason) {
            return false;
        }
        let sub = r.sub;
        let reason = crate::Reason::BackupTimeout;
        self.table.get_mut(id).reason = self.rules.pack(&reason);
        checkpoint::release(self.subs.get_mut(sub), &mut self.ledger);
        self.stats.decided(&reason);
        effects.push(Effect::Replicate(Change::Remove(*key)));
        self.host_delta(key.internal, 0, -1, effects);
        true
    }

    /// Makes room for `mappings` more mappings in the table (see [`Table::reserve`]),
    /// e.g. a standby backup expecting a full copy of its active's checkpointed
    /// mappings.
    pub fn reserve(&mut self, mappings: usize) {
        self.table.reserve(mappings);
    }

    /// Mappings the table holds without growing.
    pub fn capacity(&self) -> usize {
        self.table.capacity()
    }

    /// Installs a mapping replicated from the previous active (takeover): same key,
    /// nonce, external endpoint and expiry; checkpointed with the reason it had.
    /// Charged to the subscriber `m.subscriber` names as this node's configuration
    /// finds it ([`SubscriberTable::adopted`]: an identity resolved again, a configured
    /// entry by id, else by address). Effects carry the data plane install.
    pub fn adopt(
        &mut self,
        m: &Mapping,
        now: Time,
        effects: &mut Vec<Effect>,
    ) -> Result<(), AdoptError> {
        self.install(m, None, now, effects)
    }

    /// [`Server::adopt`], charged to `charge` (subscriber, tier) when given, else to
    /// this node's lookup of the internal address.
    fn install(
        &mut self,
        m: &Mapping,
        charge: Option<(SubscriberId, Arc<str>)>,
        now: Time,
        effects: &mut Vec<Effect>,
    ) -> Result<(), AdoptError> {
        if self.table.find(&m.key).is_some() {
            return Err(AdoptError::Exists(m.key));
        }
        match self.table.binding(&m.key.endpoint()) {
            Some(ext) if ext != m.external => {
                return Err(AdoptError::EndpointUnavailable(m.external));
            }
            Some(_) => {}
            None if !self.pool.is_free(&m.external) => {
                return Err(AdoptError::EndpointUnavailable(m.external));
            }
            None => {}
        }
        let (subscriber, tier_name) =
            charge.unwrap_or_else(|| self.subscribers.adopted(m.key.internal, &m.subscriber));
        let tier = *self.cfg.tier(&tier_name);
        let checkpointed = m.is_checkpointed();
        let sub = match self.subs.find(&subscriber) {
            Some(slot) => slot,
            None => self.subs.insert(
                subscriber,
                SubscriberState::new(tier_name, tier.checkpoint_burst, now),
            ),
        };
        let st = self.subs.get_mut(sub);
        st.mappings += 1;
        if checkpointed {
            st.checkpointed += 1;
            self.ledger.count += 1;
        }
        let client = (m.client != m.key.internal).then_some(m.client);
        let extra =
            (client.is_some() || m.description.is_some() || !m.filters.is_empty()).then(|| {
                Box::new(Extra {
                    client,
                    filters: m.filters.clone(),
                    description: m.description.clone(),
                })
            });
        let packed = self.rules.pack(&m.checkpoint);
        let record = Record::new(
            &m.key,
            m.nonce,
            m.expires,
            m.lifetime,
            m.created,
            sub,
            packed,
            m.origin,
            m.checkpoint_requested,
            extra,
        );
        let (id, fresh) = self.table.insert(record, m.external);
        if fresh {
            self.pool.take(m.external);
        }
        effects.push(Effect::DataPlane(Op::Install(self.entry(id))));
        self.host_delta(m.key.internal, 1, i32::from(checkpointed), effects);
        Ok(())
    }

    /// Standby (a backup keeping its core in step with the active): installs or
    /// replaces a replicated mapping.
    pub fn mirror_upsert(
        &mut self,
        m: &Mapping,
        now: Time,
        effects: &mut Vec<Effect>,
    ) -> Result<(), AdoptError> {
        // The common case of a full copy into a standby: nothing of this internal
        // endpoint is held, and its external endpoint is free.
        if self.pool.is_free(&m.external) && self.install_unbound(m, now, effects) {
            return Ok(());
        }
        if let Some(id) = self.table.find(&m.key) {
            self.remove_mapping(id, effects);
        }
        self.adopt(m, now, effects)
    }

    /// [`Server::install`] of a mapping to a free external endpoint, when its internal
    /// endpoint holds no mapping: one probe of the table's index (instead of four) and
    /// the data plane entry made from `m` instead of looked up again. Returns `false`,
    /// having changed nothing, when the internal endpoint is bound after all.
    fn install_unbound(&mut self, m: &Mapping, now: Time, effects: &mut Vec<Effect>) -> bool {
        let checkpointed = m.is_checkpointed();
        let record = Record::new(
            &m.key,
            m.nonce,
            m.expires,
            m.lifetime,
            m.created,
            u32::MAX,
            self.rules.pack(&m.checkpoint),
            m.origin,
            m.checkpoint_requested,
            None,
        );
        let Some(id) = self.table.insert_unbound(record, m.external) else {
            return false;
        };
        // Charged to the subscriber the active charged (an identity, RFC 7652).
        let (subscriber, tier_name) = self.subscribers.adopted(m.key.internal, &m.subscriber);
        let sub = match self.subs.find(&subscriber) {
            Some(slot) => slot,
            None => {
                let tier = *self.cfg.tier(&tier_name);
                self.subs.insert(
                    subscriber,
                    SubscriberState::new(tier_name, tier.checkpoint_burst, now),
                )
            }
        };
        let st = self.subs.get_mut(sub);
        st.mappings += 1;
        if checkpointed {
            st.checkpointed += 1;
            self.ledger.count += 1;
        }
        let client = (m.client != m.key.internal).then_some(m.client);
        let r = self.table.get_mut(id);
        r.sub = sub;
        if client.is_some() || m.description.is_some() || !m.filters.is_empty() {
            r.extra = Some(Box::new(Extra {
                client,
                filters: m.filters.clone(),
                description: m.description.clone(),
            }));
        }
        self.pool.take(m.external);
        effects.push(Effect::DataPlane(Op::Install(entry_of(
            &m.key, m.external, &m.filters,
        ))));
        self.host_delta(m.key.internal, 1, i32::from(checkpointed), effects);
        true
    }

    /// Standby: removes a mapping the active no longer checkpoints.
    pub fn mirror_remove(&mut self, key: &MappingKey, effects: &mut Vec<Effect>) {
        if let Some(id) = self.table.find(key) {
            self.remove_mapping(id, effects);
        }
    }

    /// Up to `max` checkpointed mappings from record slot `cursor` on, and the cursor to
    /// continue from (`None`: done). For paced bulk copies to a backup.
    pub fn checkpointed_from(&self, cursor: u32, max: usize) -> (Vec<Mapping>, Option<u32>) {
        let mut out = Vec::with_capacity(max.min(1024));
        for (id, r) in self.table.iter_from(cursor) {
            if out.len() == max {
                return (out, Some(id));
            }
            if checkpoint::packed_is_checkpointed(r.reason) {
                out.push(self.view(id));
            }
        }
        (out, None)
    }

    #[allow(clippy::too_many_arguments)]
    fn write_success(
        &self,
        req: &Request<'_>,
        body: &MapBody,
        remote: Option<(IpAddr, u16)>,
        granted: &Granted,
        src: IpAddr,
        now: Time,
        reply: &mut [u8],
    ) -> Result<(usize, bool), ResultCode> {
        // Echo only what was processed: THIRD_PARTY, PREFER_FAILURE, FILTER, DESCRIPTION,
        // and CHECKPOINT_REQUIRED when asked *and* honoured (RFC 7767 §3.2).
        let mut echo = [PcpOption::PreferFailure; 64];
        let mut n = 0;
        for o in req.options.iter() {
            let keep = match o.code() {
                OptionCode::ThirdParty
                | OptionCode::PreferFailure
                | OptionCode::Filter
                | OptionCode::Description => true,
                OptionCode::CheckpointRequired => granted.checkpointed,
                _ => false,
            };
            if keep && n < echo.len() {
                echo[n] = o;
                n += 1;
            }
        }
        let assigned = MapBody {
            nonce: body.nonce,
            protocol: body.protocol,
            internal_port: body.internal_port,
            external_port: granted.external.port,
            external_addr: granted.external.addr,
        };
        let resp = Response {
            result_code: ResultCode::Success,
            lifetime: granted.lifetime,
            epoch: self.epochs.epoch(src, now),
            body: match remote {
                None => Body::Map(assigned),
                Some((remote_addr, remote_port)) => Body::Peer(pcp_proto::PeerBody {
                    mapping: assigned,
                    remote_port,
                    remote_addr,
                }),
            },
            options: Options::from_list(&echo[..n]),
        };
        let echoed = resp.options.checkpoint_required();
        let n = resp.emit(reply).map_err(|_| ResultCode::NoResources)?;
        Ok((n, echoed))
    }

    fn handle_natpmp(
        &mut self,
        datagram: &[u8],
        src: IpAddr,
        now: Time,
        reply: &mut [u8],
        effects: &mut Vec<Effect>,
    ) -> Reply {
        use natpmp::{Request as NReq, Response as NResp, ResultCode as NCode};
        if !src.is_ipv4() {
            self.stats.dropped += 1;
            return Reply::Drop;
        }
        let epoch = self.epochs.epoch(src, now);
        let resp = match NReq::parse(datagram) {
            Err(e) => match e.response(epoch) {
                Some(r) => r,
                None => {
                    self.stats.dropped += 1;
                    return Reply::Drop;
                }
            },
            Ok(NReq::ExternalAddress) => {
                match self.cfg.pool.addresses.iter().find_map(|a| match a {
                    IpAddr::V4(v4) => Some(*v4),
                    IpAddr::V6(_) => None,
                }) {
                    Some(external_addr) => NResp::ExternalAddress {
                        result: NCode::Success,
                        epoch,
                        external_addr,
                    },
                    None => NResp::ExternalAddress {
                        result: NCode::NetworkFailure,
                        epoch,
                        external_addr: std::net::Ipv4Addr::UNSPECIFIED,
                    },
                }
            }
            Ok(NReq::Map(m)) => {
                let protocol = m.protocol.iana();
                let outcome = if m.lifetime == 0 && m.internal_port == 0 {
                    self.delete_all(src, protocol, &[0; 12], Origin::NatPmp, effects)
                } else {
                    let ask = Ask2 {
                        key: MappingKey {
                            internal: src,
                            protocol,
                            internal_port: m.internal_port,
                            remote: None,
                        },
                        nonce: [0; 12],
                        origin: Origin::NatPmp,
                        client: src,
                        lifetime: m.lifetime,
                        suggested: (None, Some(m.suggested_external_port).filter(|p| *p != 0)),
                        prefer_failure: false,
                        filters: None,
                        description: None,
                        requested: false,
                        // NAT-PMP cannot authenticate.
                        identity: None,
                    };
                    if m.lifetime == 0 {
                        self.delete_one(&ask, effects)
                    } else if m.internal_port == 0 {
                        Err(ResultCode::NotAuthorized)
                    } else {
                        self.create_or_renew(&ask, now, effects)
                    }
                };
                match outcome {
                    Ok(g) => NResp::Map {
                        protocol: m.protocol,
                        result: NCode::Success,
                        epoch,
                        internal_port: m.internal_port,
                        external_port: if g.lifetime == 0 { 0 } else { g.external.port },
                        lifetime: g.lifetime,
                    },
                    Err(code) => NResp::Map {
                        protocol: m.protocol,
                        result: natpmp_code(code),
                        epoch,
                        internal_port: m.internal_port,
                        external_port: 0,
                        lifetime: 0,
                    },
                }
            }
        };
        let code = match resp {
            NResp::ExternalAddress { result, .. }
            | NResp::Map { result, .. }
            | NResp::Error { result, .. } => pcp_equivalent(result),
        };
        self.count_answer(RequestKind::NatPmp, code);
        match resp.emit(reply) {
            Some(n) => Reply::Send(n),
            None => Reply::Drop,
        }
    }

    /// Checks every internal index and the accounting against the table.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.table.check_invariants()?;
        let mut per_sub: HashMap<u32, (u32, u32)> = HashMap::new();
        let mut total_cp = 0u64;
        let mut bound = std::collections::HashSet::new();
        for (id, r) in self.table.iter() {
            let e = per_sub.entry(r.sub).or_default();
            e.0 += 1;
            if checkpoint::packed_is_checkpointed(r.reason) {
                e.1 += 1;
                total_cp += 1;
            }
            let ext = self.table.external_of(id);
            if bound.insert(ext) && self.pool.is_free(&ext) {
                return Err(format!(
                    "{:?} holds {ext:?} which the pool thinks free",
                    r.key()
                ));
            }
        }
        if bound.len() != self.pool.taken() {
            return Err(format!(
                "{} external endpoints bound, the pool counts {} taken",
                bound.len(),
                self.pool.taken()
            ));
        }
        if total_cp != self.ledger.count {
            return Err(format!(
                "ledger counts {} checkpoints, table holds {total_cp}",
                self.ledger.count
            ));
        }
        for (slot, id, st) in self.subs.iter() {
            let (maps, cps) = per_sub.get(&slot).copied().unwrap_or_default();
            if (st.mappings, st.checkpointed) != (maps, cps) {
                return Err(format!(
                    "subscriber {id} counts {}/{} mappings/checkpoints, table holds {maps}/{cps}",
                    st.mappings, st.checkpointed
                ));
            }
        }
        if per_sub
            .keys()
            .any(|slot| !self.subs.iter().any(|(s, _, _)| s == *slot))
        {
            return Err("a subscriber with mappings has no state".into());
        }
        let mut per_host: HashMap<IpAddr, (u32, u32)> = HashMap::new();
        for (_, r) in self.table.iter() {
            let e = per_host.entry(r.endpoint.addr).or_default();
            e.0 += 1;
            e.1 += u32::from(checkpoint::packed_is_checkpointed(r.reason));
        }
        if per_host.len() != self.hosts.len()
            || per_host.iter().any(|(h, (m, c))| {
                self.hosts
                    .get(h)
                    .is_none_or(|hc| (hc.mappings, hc.checkpointed) != (*m, *c))
            })
        {
            return Err("per-host counts disagree with the table".into());
        }
        Ok(())
    }
}

/// Ages a held reply before it is finally sent: its Lifetime field is lowered by the
/// time it was held (rounded up to whole seconds), so the client never counts on more
/// than the mapping has left.
pub fn age_held_reply(reply: &mut [u8], held: std::time::Duration) {
    if let Some(mut p) = pcp_proto::Packet::new_checked(&mut *reply) {
        let lost = u32::try_from(held.as_millis().div_ceil(1000)).unwrap_or(u32::MAX);
        let l = p.lifetime();
        if l > 0 {
            p.set_lifetime(l.saturating_sub(lost).max(1));
        }
    }
}

/// The PCP result code with the same meaning as a NAT-PMP one (for metrics).
fn pcp_equivalent(code: natpmp::ResultCode) -> ResultCode {
    use natpmp::ResultCode as N;
    match code {
        N::Success => ResultCode::Success,
        N::UnsupportedVersion => ResultCode::UnsuppVersion,
        N::NotAuthorized => ResultCode::NotAuthorized,
        N::NetworkFailure => ResultCode::NetworkFailure,
        N::OutOfResources => ResultCode::NoResources,
        N::UnsupportedOpcode => ResultCode::UnsuppOpcode,
        N::Unknown(v) => ResultCode::Unknown(v.min(255) as u8),
    }
}

/// The NAT-PMP result closest to a PCP one.
fn natpmp_code(code: ResultCode) -> natpmp::ResultCode {
    use natpmp::ResultCode as N;
    match code {
        ResultCode::NotAuthorized | ResultCode::UnsuppProtocol => N::NotAuthorized,
        ResultCode::NetworkFailure => N::NetworkFailure,
        ResultCode::NoResources | ResultCode::UserExQuota | ResultCode::CannotProvideExternal => {
            N::OutOfResources
        }
        _ => N::NotAuthorized,
    }
}

/// The data plane entry for a mapping.
pub fn entry_of(
    key: &MappingKey,
    external: ExternalEndpoint,
    filters: &[pcp_proto::Filter],
) -> Entry {
    Entry {
        direction: match key.remote {
            None => Direction::Inbound,
            Some((addr, port)) => Direction::Outbound {
                remote: SocketAddr::new(addr, port),
            },
        },
        protocol: key.protocol,
        internal: SocketAddr::new(key.internal, key.internal_port),
        external: SocketAddr::new(external.addr, external.port),
        filters: filters
            .iter()
            .map(|f| pcp_dataplane::Filter {
                remote_addr: f.remote_addr,
                prefix_len: match f.remote_addr {
                    IpAddr::V4(_) => f.prefix_len.saturating_sub(96),
                    IpAddr::V6(_) => f.prefix_len,
                },
                remote_port: f.remote_port,
            })
            .collect(),
    }
}
