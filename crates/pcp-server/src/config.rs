//! What an operator configures. Deserialised from pcpd's TOML; every key has a default
//! so that an empty file (or none) runs.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;

/// The server core's whole configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Lifetime limits and error lifetimes.
    pub lifetime: LifetimeConfig,
    /// The external address and port pool.
    pub pool: PoolConfig,
    /// How a request's source maps to a subscriber (its network attachment point).
    pub subscribers: SubscriberConfig,
    /// Per-tier limits; the tier named `default` applies to subscribers with no tier.
    pub tiers: BTreeMap<String, TierConfig>,
    /// Global checkpoint settings.
    pub checkpoint: CheckpointConfig,
    /// Rules that override what clients ask, first match wins.
    pub policy: Vec<PolicyRule>,
    /// Request-handling limits and permissions.
    pub mapping: MappingConfig,
    /// Per-host request-rate limits (abuse resistance).
    pub limits: LimitsConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            lifetime: LifetimeConfig::default(),
            pool: PoolConfig::default(),
            subscribers: SubscriberConfig::default(),
            tiers: BTreeMap::from([(DEFAULT_TIER.to_string(), TierConfig::default())]),
            checkpoint: CheckpointConfig::default(),
            policy: Vec::new(),
            mapping: MappingConfig::default(),
            limits: LimitsConfig::default(),
        }
    }
}

/// Per-host request-rate limiting (see `guard.rs`): checked first for every datagram,
/// before anything costly.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Datagrams per second one host may send, sustained; beyond, they are dropped
    /// silently. 0 turns limiting off. A PCP client sends a few per mapping lifetime;
    /// the default leaves room for THIRD_PARTY proxies and NAT-PMP bursts.
    pub host_rate: f64,
    /// Datagrams one host may send in a burst.
    pub host_burst: u32,
    /// Hosts whose buckets are tracked at once (per generation; memory is at most
    /// about 2 × this × 64 octets). Hosts beyond share one overflow bucket.
    pub max_hosts: usize,
    /// IPv6 sources are limited per prefix of this length (a host owns its /64).
    pub ipv6_prefix: u8,
    /// Datagrams per second all untracked hosts together may send (only used while
    /// `max_hosts` are tracked: a flood of spoofed sources).
    pub overflow_rate: f64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            host_rate: 1000.0,
            host_burst: 2000,
            max_hosts: 65_536,
            ipv6_prefix: 64,
            overflow_rate: 5000.0,
        }
    }
}

/// The tier subscribers get when none is configured for them.
pub const DEFAULT_TIER: &str = "default";

/// Lifetimes, in seconds.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct LifetimeConfig {
    /// Shortest lifetime granted (RFC 6887 §15 recommends at least 120 s).
    pub min: u32,
    /// Longest lifetime granted (at most 24 h recommended).
    pub max: u32,
    /// Lifetime of short-lifetime errors (NETWORK_FAILURE, NO_RESOURCES, USER_EX_QUOTA).
    pub short_error: u32,
    /// Lifetime of long-lifetime errors.
    pub long_error: u32,
}

impl Default for LifetimeConfig {
    fn default() -> Self {
        LifetimeConfig {
            min: 120,
            max: 86_400,
            short_error: 30,
            long_error: 1800,
        }
    }
}

/// External addresses and ports handed out.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// External addresses, IPv4 and/or IPv6.
    pub addresses: Vec<IpAddr>,
    /// Lowest external port handed out.
    pub port_min: u16,
    /// Highest external port handed out.
    pub port_max: u16,
    /// Give an even internal port an even external port and an odd one an odd one
    /// (RTP/RTCP pairs rely on it).
    pub preserve_parity: bool,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            // TEST-NET-1: the embedded default drives the in-memory data plane only.
            addresses: vec![IpAddr::from([192, 0, 2, 1])],
            port_min: 1024,
            port_max: 65535,
            preserve_parity: false,
        }
    }
}

/// How sources are grouped into subscribers.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct SubscriberConfig {
    /// Prefix length grouping IPv4 sources with no configured entry (32: one per address).
    pub ipv4_mask: u8,
    /// Prefix length grouping IPv6 sources with no configured entry (56: a typical
    /// delegated prefix).
    pub ipv6_mask: u8,
    /// Configured subscribers, longest prefix wins.
    pub entries: Vec<SubscriberEntry>,
}

impl Default for SubscriberConfig {
    fn default() -> Self {
        SubscriberConfig {
            ipv4_mask: 32,
            ipv6_mask: 56,
            entries: Vec::new(),
        }
    }
}

/// One configured subscriber: its attachment prefixes and/or its PCP identities
/// (RFC 7652: the identity a client authenticated as, see docs/AUTH.md).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SubscriberEntry {
    /// The subscriber's attachment prefixes.
    #[serde(default)]
    pub prefixes: Vec<IpNet>,
    /// Authenticated identities charged to this subscriber, wherever they connect from
    /// (an authenticated request is charged by identity, never by prefix).
    #[serde(default)]
    pub identities: Vec<String>,
    /// A stable name shown in the admin API and metrics.
    pub id: String,
    /// Tier name; must be a key of `tiers`.
    #[serde(default = "default_tier")]
    pub tier: String,
}

fn default_tier() -> String {
    DEFAULT_TIER.to_string()
}

/// Limits per subscriber of a tier.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TierConfig {
    /// Mappings (MAP and PEER) a subscriber may hold: beyond, USER_EX_QUOTA.
    pub mapping_quota: u32,
    /// Checkpointed mappings a subscriber may hold (RFC 7767 §3.2 "SHOULD restrict").
    pub checkpoint_quota: u32,
    /// New checkpoints per second a subscriber may make, sustained.
    pub checkpoint_rate: f64,
    /// New checkpoints a subscriber may make in a burst.
    pub checkpoint_burst: u32,
}

impl Default for TierConfig {
    fn default() -> Self {
        TierConfig {
            mapping_quota: 256,
            checkpoint_quota: 16,
            checkpoint_rate: 2.0,
            checkpoint_burst: 8,
        }
    }
}

/// Global checkpoint settings.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Checkpointed mappings the whole node may hold (what the backup can take).
    pub capacity: u64,
    /// What to do with a checkpoint when no backup is configured.
    pub without_backup: WithoutBackup,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            capacity: 1_000_000,
            without_backup: WithoutBackup::Refuse,
        }
    }
}

/// Whether a node with no backup configured honours checkpoints.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum WithoutBackup {
    /// Never echo option 192: with no backup, a checkpoint is a promise nobody keeps.
    #[default]
    Refuse,
    /// Honour as if a backup were there (labs, policy tests, or a data plane that
    /// replicates by other means). The admin API still shows there is no backup.
    Honour,
}

/// Request-handling limits and permissions.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct MappingConfig {
    /// Protocols mappings may be made for (IANA numbers).
    pub protocols: Vec<u8>,
    /// Sources allowed to use THIRD_PARTY (act for another internal address).
    pub third_party_prefixes: Vec<IpNet>,
    /// FILTER options one MAP may carry: beyond, EXCESSIVE_REMOTE_PEERS.
    pub max_filters: usize,
}

impl Default for MappingConfig {
    fn default() -> Self {
        MappingConfig {
            protocols: vec![
                pcp_proto::protocol::TCP,
                pcp_proto::protocol::UDP,
                pcp_proto::protocol::SCTP,
                pcp_proto::protocol::DCCP,
            ],
            third_party_prefixes: Vec::new(),
            max_filters: 8,
        }
    }
}

/// A policy rule: when every given condition matches, `action` decides.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PolicyRule {
    /// Shown as the reason of every decision the rule makes.
    pub name: String,
    /// What the rule does.
    pub action: RuleAction,
    /// Tiers it applies to (empty: any).
    #[serde(default)]
    pub tiers: Vec<String>,
    /// Subscriber ids it applies to (empty: any).
    #[serde(default)]
    pub subscribers: Vec<String>,
    /// Authenticated PCP identities it applies to (empty: any; an unauthenticated
    /// request never matches a non-empty list).
    #[serde(default)]
    pub identities: Vec<String>,
    /// Internal address prefixes (empty: any).
    #[serde(default)]
    pub internal_prefixes: Vec<IpNet>,
    /// `"map"` and/or `"peer"` (empty: both).
    #[serde(default)]
    pub opcodes: Vec<OpcodeName>,
    /// IANA protocol numbers (empty: any).
    #[serde(default)]
    pub protocols: Vec<u8>,
    /// Internal port ranges, `"5060"` or `"5060-5061"` (empty: any).
    #[serde(default)]
    pub internal_ports: Vec<PortRange>,
    /// Remote peer port ranges of a PEER (empty: any; a MAP never matches a non-empty list).
    #[serde(default)]
    pub remote_ports: Vec<PortRange>,
    /// Remote peer prefixes of a PEER (empty: any; a MAP never matches a non-empty list).
    #[serde(default)]
    pub remote_prefixes: Vec<IpNet>,
}

/// What a policy rule does with the checkpoint flag.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum RuleAction {
    /// Checkpoint even when not asked (subject only to the global capacity and the backup).
    Force,
    /// Never checkpoint, even when asked.
    Deny,
    /// Checkpoint when asked, within quota and rate (the default without rules).
    Honour,
}

/// An opcode name in a rule.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum OpcodeName {
    /// MAP.
    Map,
    /// PEER.
    Peer,
}

/// An inclusive port range, written `"80"` or `"5060-5061"` (or a bare integer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    /// First port.
    pub first: u16,
    /// Last port.
    pub last: u16,
}

impl PortRange {
    /// Whether `port` lies in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl std::str::FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parse = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|_| format!("{p:?} is not a port number (0-65535)"))
        };
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => {
                let p = parse(s)?;
                (p, p)
            }
        };
        if first > last {
            return Err(format!("port range {s:?} runs backwards"));
        }
        Ok(PortRange { first, last })
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(u16),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(p) => Ok(PortRange { first: p, last: p }),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A configuration the server cannot run with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A value is out of range or inconsistent.
    #[error("{key}: {problem}")]
    Invalid {
        /// Dotted path of the key, e.g. `pool.port_min`.
        key: String,
        /// What is wrong.
        problem: String,
    },
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

impl ServerConfig {
    /// Checks cross-field consistency that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.lifetime;
        if l.min == 0 || l.min > l.max {
            return Err(invalid(
                "lifetime.min",
                format!("must be between 1 and lifetime.max ({})", l.max),
            ));
        }
        if self.pool.addresses.is_empty() {
            return Err(invalid("pool.addresses", "at least one external address"));
        }
        if self.pool.port_min == 0 || self.pool.port_min > self.pool.port_max {
            return Err(invalid(
                "pool.port_min",
                format!(
                    "must be between 1 and pool.port_max ({})",
                    self.pool.port_max
                ),
            ));
        }
        if self.subscribers.ipv4_mask > 32 {
            return Err(invalid("subscribers.ipv4_mask", "at most 32"));
        }
        if self.subscribers.ipv6_mask > 128 {
            return Err(invalid("subscribers.ipv6_mask", "at most 128"));
        }
        if !self.tiers.contains_key(DEFAULT_TIER) {
            return Err(invalid(
                "tiers",
                format!("a tier named {DEFAULT_TIER:?} is required"),
            ));
        }
        for (name, t) in &self.tiers {
            if !(t.checkpoint_rate.is_finite() && t.checkpoint_rate >= 0.0) {
                return Err(invalid(
                    format!("tiers.{name}.checkpoint_rate"),
                    "must be a non-negative number",
                ));
            }
        }
        let lim = &self.limits;
        if !(lim.host_rate.is_finite() && lim.host_rate >= 0.0) {
            return Err(invalid("limits.host_rate", "must be a non-negative number"));
        }
        if !(lim.overflow_rate.is_finite() && lim.overflow_rate >= 0.0) {
            return Err(invalid(
                "limits.overflow_rate",
                "must be a non-negative number",
            ));
        }
        if lim.host_rate > 0.0 && lim.host_burst == 0 {
            return Err(invalid(
                "limits.host_burst",
                "at least 1 when limiting is on",
            ));
        }
        if lim.host_rate > 0.0 && lim.max_hosts < 2 {
            return Err(invalid(
                "limits.max_hosts",
                "at least 2 when limiting is on",
            ));
        }
        if lim.ipv6_prefix > 128 {
            return Err(invalid("limits.ipv6_prefix", "at most 128"));
        }
        for (i, e) in self.subscribers.entries.iter().enumerate() {
            if !self.tiers.contains_key(&e.tier) {
                return Err(invalid(
                    format!("subscribers.entries[{i}].tier"),
                    format!("unknown tier {:?}", e.tier),
                ));
            }
            if e.prefixes.is_empty() && e.identities.is_empty() {
                return Err(invalid(
                    format!("subscribers.entries[{i}].prefixes"),
                    "at least one prefix or identity",
                ));
            }
            for name in &e.identities {
                if name.is_empty() {
                    return Err(invalid(
                        format!("subscribers.entries[{i}].identities"),
                        "an identity cannot be empty",
                    ));
                }
                let earlier = self.subscribers.entries[..i]
                    .iter()
                    .position(|o| o.identities.contains(name));
                if let Some(j) = earlier {
                    return Err(invalid(
                        format!("subscribers.entries[{i}].identities"),
                        format!("identity {name:?} is already in subscribers.entries[{j}]"),
                    ));
                }
            }
        }
        for (i, r) in self.policy.iter().enumerate() {
            if let Some(t) = r.tiers.iter().find(|t| !self.tiers.contains_key(*t)) {
                return Err(invalid(
                    format!("policy[{i}].tiers"),
                    format!("unknown tier {t:?}"),
                ));
            }
        }
        Ok(())
    }

    /// The limits of `tier`, falling back to the default tier.
    pub fn tier(&self, tier: &str) -> &TierConfig {
        self.tiers
            .get(tier)
            .or_else(|| self.tiers.get(DEFAULT_TIER))
            .unwrap_or(&DEFAULT_TIER_CONFIG)
    }
}

static DEFAULT_TIER_CONFIG: TierConfig = TierConfig {
    mapping_quota: 256,
    checkpoint_quota: 16,
    checkpoint_rate: 2.0,
    checkpoint_burst: 8,
};
