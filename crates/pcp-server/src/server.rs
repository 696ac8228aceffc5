//! The server core: one datagram, its source and the time in; a reply and effects out.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use pcp_dataplane::{Direction, Entry, Op};
use pcp_proto::{
    Body, MapBody, Opcode, OptionCode, Options, ParseError, PcpOption, Request, Response,
    ResultCode, emit_error_response, natpmp,
};
use rand::SeedableRng;
use rand::rngs::SmallRng;

use crate::checkpoint::{self, Ask, BackupStatus, Ledger};
use crate::config::{ConfigError, OpcodeName, ServerConfig, TierConfig};
use crate::epoch::Epochs;
use crate::policy::{Flow, Policy};
use crate::pool::{AllocError, AllocRequest, ExternalEndpoint, Pool};
use crate::stats::{RequestKind, Stats};
use crate::subscriber::{SubscriberId, SubscriberState, SubscriberTable};
use crate::table::{Mapping, MappingKey, Origin, Table};
use crate::time::Time;

/// What to do with the reply buffer after [`Server::handle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// Send nothing (the RFC says drop silently).
    Drop,
    /// Send the first `n` octets of the reply buffer to the request's source.
    Send(usize),
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
}

/// The PCP (and NAT-PMP) server core. Sans-IO: it never reads a clock or touches a
/// socket; the shell feeds it datagrams and time and carries out its [`Effect`]s.
#[derive(Debug)]
pub struct Server {
    cfg: ServerConfig,
    policy: Policy,
    subscribers: SubscriberTable,
    states: HashMap<SubscriberId, SubscriberState>,
    table: Table,
    pool: Pool,
    ledger: Ledger,
    epochs: Epochs,
    backup: BackupStatus,
    stats: Stats,
    rng: SmallRng,
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
            states: HashMap::new(),
            table: Table::new(),
            pool: Pool::new(&cfg.pool),
            ledger: Ledger {
                count: 0,
                capacity: cfg.checkpoint.capacity,
            },
            epochs: Epochs::new(now),
            backup: BackupStatus::None,
            stats: Stats::default(),
            rng: SmallRng::seed_from_u64(seed),
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
        for st in self.states.values_mut() {
            if !cfg.tiers.contains_key(&*st.tier) {
                st.tier = crate::config::DEFAULT_TIER.into();
            }
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

    /// Every mapping.
    pub fn mappings(&self) -> impl Iterator<Item = &Mapping> {
        self.table.iter()
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
        self.states
            .iter()
            .map(|(id, st)| (id, st, self.cfg.tier(&st.tier)))
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
        while let Some(key) = self.table.pop_expired(now) {
            self.remove_mapping(&key, effects);
            self.stats.expired += 1;
        }
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
        let src_ip = src.ip().to_canonical();
        if natpmp::is_natpmp(datagram) {
            return self.handle_natpmp(datagram, src_ip, now, reply, effects);
        }
        match Request::parse(datagram) {
            Ok(req) => {
                let kind = RequestKind::of(req.opcode());
                let result = self.serve(&req, src_ip, now, reply, effects);
                match result {
                    Ok(n) => {
                        self.stats.answered(kind, ResultCode::Success);
                        Reply::Send(n)
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
        self.stats.answered(kind, code);
        let lifetime = self.error_lifetime(code);
        let epoch = self.epochs.epoch(src, now);
        match emit_error_response(datagram, code, lifetime, epoch, parsed, reply) {
            Ok(n) => Reply::Send(n),
            Err(_) => Reply::Drop,
        }
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
        now: Time,
        reply: &mut [u8],
        effects: &mut Vec<Effect>,
    ) -> Result<usize, ResultCode> {
        if req.client_addr != src {
            return Err(ResultCode::AddressMismatch);
        }
        // RFC 7652 options are mandatory to process; this server does not do PCP
        // authentication yet.
        if req.options.iter().any(|o| o.code().is_authentication()) {
            return Err(ResultCode::UnsuppOption);
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
                return resp.emit(reply).map_err(|_| ResultCode::NoResources);
            }
            Body::Map(m) => (*m, None),
            Body::Peer(p) => (p.mapping, Some((p.remote_addr, p.remote_port))),
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
        let granted =
            self.serve_mapping(req, &mapping, remote, internal, src, &filters, now, effects)?;
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
        };
        if req.lifetime == 0 {
            return self.delete_one(&ask, effects);
        }
        self.create_or_renew(&ask, now, effects)
    }

    fn delete_one(
        &mut self,
        ask: &Ask2<'_>,
        effects: &mut Vec<Effect>,
    ) -> Result<Granted, ResultCode> {
        let external = match self.table.get(&ask.key) {
            None => ExternalEndpoint {
                addr: ask.suggested.0.unwrap_or(IpAddr::from([0u8; 4])),
                protocol: ask.key.protocol,
                port: ask.suggested.1.unwrap_or(0),
            },
            Some(m) if m.nonce != ask.nonce || m.origin != ask.origin => {
                return Err(ResultCode::NotAuthorized);
            }
            Some(m) => {
                let ext = m.external;
                self.remove_mapping(&ask.key, effects);
                ext
            }
        };
        Ok(Granted {
            external,
            lifetime: 0,
            checkpointed: false,
        })
    }

    /// Deletes every mapping of `internal` (of `protocol`, unless 0) that `nonce` owns.
    fn delete_all(
        &mut self,
        internal: IpAddr,
        protocol: u8,
        nonce: &[u8; 12],
        origin: Origin,
        effects: &mut Vec<Effect>,
    ) -> Result<Granted, ResultCode> {
        for key in self.table.keys_of_host(internal) {
            let owned = self.table.get(&key).is_some_and(|m| {
                (protocol == 0 || m.key.protocol == protocol)
                    && m.origin == origin
                    && (origin == Origin::NatPmp || m.nonce == *nonce)
                    && !m.key.is_peer()
            });
            if owned {
                self.remove_mapping(&key, effects);
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
        let existing = self.table.get(&ask.key);
        if let Some(m) = existing
            && (m.nonce != ask.nonce || m.origin != ask.origin)
        {
            return Err(ResultCode::NotAuthorized);
        }
        let (subscriber, tier_name) = match existing {
            Some(m) => {
                let tier = self
                    .states
                    .get(&m.subscriber)
                    .map(|s| s.tier.clone())
                    .unwrap_or_else(|| crate::config::DEFAULT_TIER.into());
                (m.subscriber.clone(), tier)
            }
            None => self.subscribers.lookup(ask.key.internal),
        };
        let tier = *self.cfg.tier(&tier_name);
        let mut state =
            self.states.get(&subscriber).cloned().unwrap_or_else(|| {
                SubscriberState::new(tier_name.clone(), tier.checkpoint_burst, now)
            });

        // The external endpoint: kept on renewal, shared with the internal endpoint's
        // other mappings, or newly allocated.
        if existing.is_none() && state.mappings >= tier.mapping_quota {
            return Err(ResultCode::UserExQuota);
        }
        let external = match (existing, self.table.binding(&ask.key.endpoint())) {
            (Some(m), _) => m.external,
            (None, Some(ext)) => ext,
            (None, None) => {
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

        let lifetime = ask
            .lifetime
            .clamp(self.cfg.lifetime.min, self.cfg.lifetime.max);
        let was_checkpointed = existing.is_some_and(|m| m.is_checkpointed());
        let verdict = self.policy.evaluate(&Flow {
            subscriber: &subscriber,
            tier: &tier_name,
            opcode: if ask.key.is_peer() {
                OpcodeName::Peer
            } else {
                OpcodeName::Map
            },
            internal: ask.key.internal,
            protocol: ask.key.protocol,
            internal_port: ask.key.internal_port,
            remote: ask.key.remote,
        });
        let reason = checkpoint::decide(
            Ask {
                requested: ask.requested,
                verdict: verdict.as_ref(),
                already: was_checkpointed,
            },
            &tier,
            &mut state,
            &self.ledger,
            self.backup,
            self.cfg.checkpoint.without_backup,
            now,
        );

        // Everything that can fail has been checked: commit.
        self.stats.decided(&reason);
        checkpoint::commit(was_checkpointed, &reason, &mut state, &mut self.ledger);
        let checkpointed = reason.is_checkpointed();
        let expires = now.plus_secs(lifetime);
        let old_filters = existing.map(|m| m.filters.clone());
        let filters: Box<[pcp_proto::Filter]> = match (ask.filters, &old_filters) {
            (Some(f), _) => f.into(),
            (None, Some(old)) => old.clone(),
            (None, None) => Box::new([]),
        };
        let install = old_filters.as_ref().is_none_or(|old| *old != filters);
        if existing.is_some() {
            let description = ask.description;
            self.table.update(&ask.key, |m| {
                m.expires = expires;
                m.lifetime = lifetime;
                m.client = ask.client;
                m.checkpoint_requested = ask.requested;
                m.checkpoint = reason;
                m.filters = filters;
                if let Some(d) = description {
                    m.description = Some(d.into());
                }
            });
        } else {
            state.mappings += 1;
            let fresh = self.table.insert(Mapping {
                key: ask.key,
                nonce: ask.nonce,
                origin: ask.origin,
                client: ask.client,
                external,
                expires,
                lifetime,
                subscriber: subscriber.clone(),
                checkpoint_requested: ask.requested,
                checkpoint: reason,
                filters,
                description: ask.description.map(Into::into),
                created: now,
            });
            if fresh {
                self.pool.take(external);
            }
        }
        self.states.insert(subscriber, state);
        let m = self.table.get(&ask.key).expect("just inserted or updated");
        if install {
            effects.push(Effect::DataPlane(Op::Install(entry_of(m))));
        }
        if checkpointed {
            effects.push(Effect::Replicate(Change::Upsert(Box::new(m.clone()))));
        } else if was_checkpointed {
            effects.push(Effect::Replicate(Change::Remove(ask.key)));
        }
        Ok(Granted {
            external,
            lifetime,
            checkpointed,
        })
    }

    /// Removes a mapping with all its accounting and effects.
    fn remove_mapping(&mut self, key: &MappingKey, effects: &mut Vec<Effect>) {
        let Some((m, freed)) = self.table.remove(key) else {
            return;
        };
        if let Some(ep) = freed {
            self.pool.release(&ep);
        }
        if let Some(st) = self.states.get_mut(&m.subscriber) {
            st.mappings = st.mappings.saturating_sub(1);
            if m.is_checkpointed() {
                checkpoint::release(st, &mut self.ledger);
            }
            if st.mappings == 0 {
                self.states.remove(&m.subscriber);
            }
        } else if m.is_checkpointed() {
            self.ledger.count = self.ledger.count.saturating_sub(1);
        }
        effects.push(Effect::DataPlane(Op::Remove(entry_of(&m))));
        if m.is_checkpointed() {
            effects.push(Effect::Replicate(Change::Remove(*key)));
        }
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
    ) -> Result<usize, ResultCode> {
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
        resp.emit(reply).map_err(|_| ResultCode::NoResources)
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
            | NResp::Error { result, .. } => ResultCode::from(u16::from(result).min(255) as u8),
        };
        self.stats.answered(RequestKind::NatPmp, code);
        match resp.emit(reply) {
            Some(n) => Reply::Send(n),
            None => Reply::Drop,
        }
    }

    /// Checks every internal index and the accounting against the table.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.table.check_invariants()?;
        let mut per_sub: HashMap<&SubscriberId, (u32, u32)> = HashMap::new();
        let mut total_cp = 0u64;
        for m in self.table.iter() {
            let e = per_sub.entry(&m.subscriber).or_default();
            e.0 += 1;
            if m.is_checkpointed() {
                e.1 += 1;
                total_cp += 1;
            }
            if !self.pool.is_free(&m.external) && self.pool.owns(m.external.addr) {
                continue;
            }
            return Err(format!(
                "{:?} holds {:?} which the pool thinks free",
                m.key, m.external
            ));
        }
        if total_cp != self.ledger.count {
            return Err(format!(
                "ledger counts {} checkpoints, table holds {total_cp}",
                self.ledger.count
            ));
        }
        for (id, st) in &self.states {
            let (maps, cps) = per_sub.get(id).copied().unwrap_or_default();
            if (st.mappings, st.checkpointed) != (maps, cps) {
                return Err(format!(
                    "subscriber {id} counts {}/{} mappings/checkpoints, table holds {maps}/{cps}",
                    st.mappings, st.checkpointed
                ));
            }
        }
        if per_sub.len() != self.states.len() {
            return Err("a subscriber with mappings has no state".into());
        }
        Ok(())
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
pub fn entry_of(m: &Mapping) -> Entry {
    let ext = SocketAddr::new(m.external.addr, m.external.port);
    Entry {
        direction: match m.key.remote {
            None => Direction::Inbound,
            Some((addr, port)) => Direction::Outbound {
                remote: SocketAddr::new(addr, port),
            },
        },
        protocol: m.key.protocol,
        internal: SocketAddr::new(m.key.internal, m.key.internal_port),
        external: ext,
        filters: m
            .filters
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
