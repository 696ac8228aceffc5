//! Application checkpoint policy: which flows should ask for CHECKPOINT_REQUIRED, and
//! why.
//!
//! A policy file (TOML) holds rules in three layers, and a per-host limit:
//!
//! ```toml
//! # At most this many flows of this host ask for a checkpoint (locked rules excepted).
//! max_checkpointed = 4
//!
//! [[rule]]
//! name = "emergency-calls"
//! locked = true               # an administrator's rule: nothing the user sets overrides it
//! tags = ["emergency"]
//! action = "always"
//!
//! [[rule]]
//! name = "evening-games"
//! layer = "user"              # "user" (the default) overrides "app"
//! apps = ["quake"]
//! protocols = ["udp"]
//! ports = ["27960-27970"]     # internal ports
//! time = ["18:00-23:00"]      # local time; "22:00-02:00" wraps midnight
//! days = ["fri", "sat"]
//! action = "always"
//!
//! [[rule]]
//! name = "voip-default"
//! layer = "app"               # an application's own default
//! apps = ["voip"]
//! remote = ["198.51.100.0/24"]
//! remote_ports = [5060]
//! action = "when-asked"
//!
//! [[flow]]                    # what `pcpc run` keeps mapped
//! app = "voip"
//! proto = "udp"
//! internal_port = 5060
//! tags = ["emergency"]
//! ```
//!
//! Precedence: locked rules, then `user` rules, then `app` rules, first match in file
//! order within each; with no match, the flow's own ask decides (`when-asked`).
//! Actions: `always` (checkpoint), `never`, `when-asked` (checkpoint if the application
//! asked). The per-host limit then turns away asks beyond `max_checkpointed`, except
//! those a locked rule makes.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What a rule does with a flow it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Checkpoint it.
    Always,
    /// Do not.
    Never,
    /// Checkpoint it if the application asks.
    WhenAsked,
}

impl Action {
    /// The word used in policy files.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Always => "always",
            Action::Never => "never",
            Action::WhenAsked => "when-asked",
        }
    }
}

/// Who wrote a rule; decides precedence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layer {
    /// An administrator's locked rule: wins over everything.
    Locked,
    /// The user's override.
    User,
    /// An application's default.
    App,
}

impl Layer {
    fn describe(self) -> &'static str {
        match self {
            Layer::Locked => "locked by the administrator",
            Layer::User => "user rule",
            Layer::App => "application default",
        }
    }
}

/// A number or a string in a list of ports (`5060`, `"5060"`, `"5060-5061"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum PortSpec {
    Num(u16),
    Text(String),
}

/// A protocol by name or number.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum ProtoSpec {
    Num(u8),
    Text(String),
}

/// One or several strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    #[serde(default)]
    locked: bool,
    layer: Option<Layer>,
    #[serde(default)]
    apps: Vec<String>,
    #[serde(default)]
    protocols: Vec<ProtoSpec>,
    #[serde(default)]
    ports: Vec<PortSpec>,
    #[serde(default)]
    remote: Vec<String>,
    #[serde(default)]
    remote_ports: Vec<PortSpec>,
    #[serde(default)]
    tags: Vec<String>,
    time: Option<OneOrMany>,
    #[serde(default)]
    days: Vec<String>,
    action: Action,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlow {
    app: String,
    proto: ProtoSpec,
    internal_port: u16,
    external_port: Option<u16>,
    remote: Option<SocketAddr>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    asked: bool,
    lifetime: Option<u32>,
    description: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    max_checkpointed: Option<usize>,
    #[serde(default)]
    rule: Vec<RawRule>,
    #[serde(default)]
    flow: Vec<RawFlow>,
}

/// An inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PortRange(pub u16, pub u16);

impl PortRange {
    fn contains(self, p: u16) -> bool {
        (self.0..=self.1).contains(&p)
    }
}

/// An address prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Prefix {
    /// Network address.
    pub addr: IpAddr,
    /// Prefix length.
    pub len: u8,
}

impl Prefix {
    fn parse(s: &str) -> Option<Prefix> {
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim().parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            Some(l) => l.trim().parse().ok().filter(|&n: &u8| n <= max)?,
            None => max,
        };
        Some(Prefix { addr, len })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// A daily time window in minutes since midnight, `[start, end)`, wrapping past
/// midnight when `end <= start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Window {
    /// Start, minutes since midnight.
    pub start: u16,
    /// End (exclusive), minutes since midnight (1440 = midnight at the end).
    pub end: u16,
}

impl Window {
    fn contains(self, minute: u16) -> bool {
        if self.start < self.end {
            (self.start..self.end).contains(&minute)
        } else {
            minute >= self.start || minute < self.end
        }
    }
}

/// Parses `HH:MM` (00:00–24:00) into minutes since midnight.
pub fn parse_hhmm(s: &str) -> Option<u16> {
    let (h, m) = s.trim().split_once(':')?;
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    (m < 60 && (h < 24 || (h == 24 && m == 0))).then_some(h * 60 + m)
}

/// A day of the week.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Day {
    /// Monday.
    Mon,
    /// Tuesday.
    Tue,
    /// Wednesday.
    Wed,
    /// Thursday.
    Thu,
    /// Friday.
    Fri,
    /// Saturday.
    Sat,
    /// Sunday.
    Sun,
}

impl Day {
    fn parse(s: &str) -> Option<Day> {
        Some(match s.trim().to_ascii_lowercase().get(..3)? {
            "mon" => Day::Mon,
            "tue" => Day::Tue,
            "wed" => Day::Wed,
            "thu" => Day::Thu,
            "fri" => Day::Fri,
            "sat" => Day::Sat,
            "sun" => Day::Sun,
            _ => return None,
        })
    }
}

/// A local time of day and weekday, at which a policy is evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LocalTime {
    /// Minutes since midnight.
    pub minute: u16,
    /// Day of the week.
    pub day: Day,
}

impl LocalTime {
    /// Now, in the system's time zone.
    pub fn now() -> LocalTime {
        let z = jiff::Zoned::now();
        LocalTime {
            minute: u16::try_from(z.hour()).unwrap_or(0) * 60
                + u16::try_from(z.minute()).unwrap_or(0),
            day: match z.weekday() {
                jiff::civil::Weekday::Monday => Day::Mon,
                jiff::civil::Weekday::Tuesday => Day::Tue,
                jiff::civil::Weekday::Wednesday => Day::Wed,
                jiff::civil::Weekday::Thursday => Day::Thu,
                jiff::civil::Weekday::Friday => Day::Fri,
                jiff::civil::Weekday::Saturday => Day::Sat,
                jiff::civil::Weekday::Sunday => Day::Sun,
            },
        }
    }

    /// `HH:MM` today (the weekday of now).
    pub fn at(hhmm: &str) -> Option<LocalTime> {
        Some(LocalTime {
            minute: parse_hhmm(hhmm)?,
            day: LocalTime::now().day,
        })
    }
}

/// A rule, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rule {
    /// Its name (shown by `explain`).
    pub name: String,
    /// Its layer (`Locked` when marked locked).
    pub layer: Layer,
    /// Application names (empty: any; `"*"` also means any).
    pub apps: Vec<String>,
    /// IANA protocol numbers.
    pub protocols: Vec<u8>,
    /// Internal ports.
    pub ports: Vec<PortRange>,
    /// Remote prefixes.
    pub remote: Vec<Prefix>,
    /// Remote ports.
    pub remote_ports: Vec<PortRange>,
    /// Tags, any of which matches.
    pub tags: Vec<String>,
    /// Time-of-day windows, any of which matches.
    pub time: Vec<Window>,
    /// Days, any of which matches.
    pub days: Vec<Day>,
    /// The action.
    pub action: Action,
}

/// A flow to decide about.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Flow {
    /// Application name.
    pub app: String,
    /// IANA protocol number.
    pub protocol: Option<u8>,
    /// Internal port.
    pub internal_port: Option<u16>,
    /// Remote peer address.
    pub remote: Option<IpAddr>,
    /// Remote peer port.
    pub remote_port: Option<u16>,
    /// Tags (e.g. `emergency`).
    pub tags: Vec<String>,
    /// Whether the application itself asks for a checkpoint.
    pub asked: bool,
}

/// A flow `pcpc run` keeps, with how to map it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FlowSpec {
    /// The flow, as the policy sees it.
    pub flow: Flow,
    /// External port to suggest.
    pub external_port: Option<u16>,
    /// Remote peer: PEER instead of MAP.
    pub remote: Option<SocketAddr>,
    /// Lifetime to ask for.
    pub lifetime: Option<u32>,
    /// DESCRIPTION.
    pub description: Option<String>,
}

impl Rule {
    /// Whether the rule matches `flow` at `at`.
    pub fn matches(&self, flow: &Flow, at: LocalTime) -> bool {
        let any = |ok: bool, empty: bool| empty || ok;
        any(
            self.apps.iter().any(|a| a == "*" || *a == flow.app),
            self.apps.is_empty(),
        ) && any(
            flow.protocol.is_some_and(|p| self.protocols.contains(&p)),
            self.protocols.is_empty(),
        ) && any(
            flow.internal_port
                .is_some_and(|p| self.ports.iter().any(|r| r.contains(p))),
            self.ports.is_empty(),
        ) && any(
            flow.remote
                .is_some_and(|a| self.remote.iter().any(|p| p.contains(a))),
            self.remote.is_empty(),
        ) && any(
            flow.remote_port
                .is_some_and(|p| self.remote_ports.iter().any(|r| r.contains(p))),
            self.remote_ports.is_empty(),
        ) && any(
            self.tags.iter().any(|t| flow.tags.contains(t)),
            self.tags.is_empty(),
        ) && any(
            self.time.iter().any(|w| w.contains(at.minute)),
            self.time.is_empty(),
        ) && any(self.days.contains(&at.day), self.days.is_empty())
    }
}

/// Why a policy file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// It could not be read.
    #[error("cannot read the policy file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It is not valid TOML, or has an unknown key or a wrong type.
    #[error("{path}:{line}: {message} (see the pcp_client::policy docs for the format)")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A value is out of range.
    #[error("{path}: rule {rule:?}, {field}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The rule (or flow) name.
        rule: String,
        /// The key.
        field: &'static str,
        /// What is wrong and what is expected.
        message: String,
    },
}

/// A loaded policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// Per-host limit on flows asking for a checkpoint (`None`: no limit).
    pub max_checkpointed: Option<usize>,
    /// Rules in file order.
    pub rules: Vec<Rule>,
    /// Flows for `pcpc run`.
    pub flows: Vec<FlowSpec>,
}

/// The answer to "should this flow be checkpointed, and why".
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// Ask for CHECKPOINT_REQUIRED?
    pub checkpoint: bool,
    /// The deciding rule's name (`None`: no rule matched; the flow's own ask decided).
    pub rule: Option<String>,
    /// Its layer.
    pub layer: Option<Layer>,
    /// Its action (`when-asked` when no rule matched).
    pub action: Action,
    /// The policy would checkpoint, but the per-host limit is reached.
    pub limited: bool,
    /// Rules of lower precedence that matched too and were overridden (name, action).
    pub overridden: Vec<(String, Action)>,
    /// One sentence for people.
    pub reason: String,
}

fn protocol_number(p: &ProtoSpec) -> Option<u8> {
    match p {
        ProtoSpec::Num(n) => Some(*n),
        ProtoSpec::Text(s) => match s.to_ascii_lowercase().as_str() {
            "udp" => Some(17),
            "tcp" => Some(6),
            "sctp" => Some(132),
            "dccp" => Some(33),
            other => other.parse().ok(),
        },
    }
}

/// `udp`, `tcp`, … for an IANA number (or the number).
pub fn protocol_name(p: u8) -> String {
    match p {
        17 => "udp".into(),
        6 => "tcp".into(),
        132 => "sctp".into(),
        33 => "dccp".into(),
        n => n.to_string(),
    }
}

fn port_range(p: &PortSpec) -> Option<PortRange> {
    match p {
        PortSpec::Num(n) => Some(PortRange(*n, *n)),
        PortSpec::Text(s) => match s.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                (a <= b).then_some(PortRange(a, b))
            }
            None => s.trim().parse().ok().map(|n| PortRange(n, n)),
        },
    }
}

impl Policy {
    /// Reads and validates a policy file.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Policy::parse(path, &text)
    }

    /// Parses and validates `text` (as read from `path`, for messages).
    pub fn parse(path: &Path, text: &str) -> Result<Policy, PolicyError> {
        let raw: RawPolicy = toml::from_str(text).map_err(|e| PolicyError::Syntax {
            path: path.to_path_buf(),
            line: e.span().map_or(0, |s| {
                text[..s.start.min(text.len())].lines().count().max(1)
            }),
            message: e.message().to_string(),
        })?;
        let invalid = |rule: &str, field, message: String| PolicyError::Invalid {
            path: path.to_path_buf(),
            rule: rule.to_string(),
            field,
            message,
        };
        let mut rules = Vec::new();
        for r in raw.rule {
            let protocols = r
                .protocols
                .iter()
                .map(|p| {
                    protocol_number(p).ok_or_else(|| {
                        invalid(
                            &r.name,
                            "protocols",
                            format!("{p:?} is not udp, tcp, sctp, dccp or a number 0-255"),
                        )
                    })
                })
                .collect::<Result<_, _>>()?;
            let ports = |list: &[PortSpec], field| {
                list.iter()
                    .map(|p| {
                        port_range(p).ok_or_else(|| {
                            invalid(
                                &r.name,
                                field,
                                format!("{p:?} is not a port or a range like \"5060-5061\""),
                            )
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
            };
            let remote = r
                .remote
                .iter()
                .map(|s| {
                    Prefix::parse(s).ok_or_else(|| {
                        invalid(
                            &r.name,
                            "remote",
                            format!("{s:?} is not an address or prefix like \"198.51.100.0/24\""),
                        )
                    })
                })
                .collect::<Result<_, _>>()?;
            let time = r
                .time
                .clone()
                .map(OneOrMany::into_vec)
                .unwrap_or_default()
                .iter()
                .map(|w| {
                    w.split_once('-')
                        .and_then(|(a, b)| {
                            Some(Window {
                                start: parse_hhmm(a)?,
                                end: parse_hhmm(b)?,
                            })
                        })
                        .filter(|w| w.start != w.end)
                        .ok_or_else(|| {
                            invalid(
                                &r.name,
                                "time",
                                format!("{w:?} is not a window like \"18:00-23:00\""),
                            )
                        })
                })
                .collect::<Result<_, _>>()?;
            let days = r
                .days
                .iter()
                .map(|d| {
                    Day::parse(d).ok_or_else(|| {
                        invalid(&r.name, "days", format!("{d:?} is not mon, tue, … sun"))
                    })
                })
                .collect::<Result<_, _>>()?;
            if r.locked && r.layer == Some(Layer::App) {
                return Err(invalid(
                    &r.name,
                    "locked",
                    "a locked rule is an administrator's, not an application default: drop `layer = \"app\"`".into(),
                ));
            }
            rules.push(Rule {
                layer: if r.locked {
                    Layer::Locked
                } else {
                    r.layer.unwrap_or(Layer::User)
                },
                apps: r.apps.clone(),
                protocols,
                ports: ports(&r.ports, "ports")?,
                remote,
                remote_ports: ports(&r.remote_ports, "remote_ports")?,
                tags: r.tags.clone(),
                time,
                days,
                action: r.action,
                name: r.name,
            });
        }
        let mut flows = Vec::new();
        for f in raw.flow {
            let protocol = protocol_number(&f.proto).ok_or_else(|| {
                invalid(
                    &f.app,
                    "proto",
                    format!("{:?} is not udp, tcp, sctp, dccp or a number", f.proto),
                )
            })?;
            if f.internal_port == 0 {
                return Err(invalid(
                    &f.app,
                    "internal_port",
                    "0 is not a port: name the port to map".into(),
                ));
            }
            flows.push(FlowSpec {
                flow: Flow {
                    app: f.app,
                    protocol: Some(protocol),
                    internal_port: Some(f.internal_port),
                    remote: f.remote.map(|r| r.ip()),
                    remote_port: f.remote.map(|r| r.port()),
                    tags: f.tags,
                    asked: f.asked,
                },
                external_port: f.external_port,
                remote: f.remote,
                lifetime: f.lifetime,
                description: f.description,
            });
        }
        Ok(Policy {
            max_checkpointed: raw.max_checkpointed,
            rules,
            flows,
        })
    }

    /// Should `flow` be checkpointed at `at`, given that `already` flows of this host
    /// are checkpointed — and why.
    pub fn explain(&self, flow: &Flow, at: LocalTime, already: usize) -> Decision {
        let mut matching: Vec<&Rule> = self.rules.iter().filter(|r| r.matches(flow, at)).collect();
        // Stable: file order within a layer.
        matching.sort_by_key(|r| r.layer);
        let winner = matching.first().copied();
        let overridden = matching
            .iter()
            .skip(1)
            .map(|r| (r.name.clone(), r.action))
            .collect();
        let action = winner.map_or(Action::WhenAsked, |r| r.action);
        let wanted = match action {
            Action::Always => true,
            Action::Never => false,
            Action::WhenAsked => flow.asked,
        };
        let locked = winner.is_some_and(|r| r.layer == Layer::Locked);
        let limited = wanted && !locked && self.max_checkpointed.is_some_and(|m| already >= m);
        let checkpoint = wanted && !limited;
        let asked = if flow.asked {
            "the application asks"
        } else {
            "the application does not ask"
        };
        let mut reason = match winner {
            Some(r) => format!(
                "rule {:?} ({}) says {}",
                r.name,
                r.layer.describe(),
                r.action.as_str()
            ),
            None => "no rule matches".to_string(),
        };
        if action == Action::WhenAsked {
            reason.push_str(&format!(" and {asked}"));
        }
        if limited {
            reason.push_str(&format!(
                ", but this host already has {already} checkpointed flows (limit {})",
                self.max_checkpointed.unwrap_or(0)
            ));
        } else if locked && wanted && self.max_checkpointed.is_some_and(|m| already >= m) {
            reason.push_str(" (locked rules are exempt from the per-host limit)");
        }
        Decision {
            checkpoint,
            rule: winner.map(|r| r.name.clone()),
            layer: winner.map(|r| r.layer),
            action,
            limited,
            overridden,
            reason,
        }
    }

    /// Decides every flow of `flows` together at `at`, applying the per-host limit:
    /// flows a locked rule checkpoints first, then the others in order.
    pub fn plan(&self, flows: &[Flow], at: LocalTime) -> Vec<Decision> {
        let mut out: Vec<Option<Decision>> = vec![None; flows.len()];
        let mut count = 0;
        let first = self.explain_order(flows, at);
        for i in first {
            let d = self.explain(&flows[i], at, count);
            if d.checkpoint {
                count += 1;
            }
            out[i] = Some(d);
        }
        out.into_iter().flatten().collect()
    }

    fn explain_order(&self, flows: &[Flow], at: LocalTime) -> Vec<usize> {
        let locked = |f: &Flow| {
            let d = self.explain(f, at, 0);
            d.layer == Some(Layer::Locked) && d.checkpoint
        };
        let mut order: Vec<usize> = (0..flows.len()).filter(|&i| locked(&flows[i])).collect();
        order.extend((0..flows.len()).filter(|&i| !locked(&flows[i])));
        order
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
max_checkpointed = 2

[[rule]]
name = "no-checkpoints-please"
apps = ["*"]
action = "never"

[[rule]]
name = "emergency-calls"
locked = true
tags = ["emergency"]
action = "always"

[[rule]]
name = "evening-games"
apps = ["quake"]
protocols = ["udp"]
ports = ["27960-27970", 27000]
time = "18:00-23:00"
action = "always"

[[rule]]
name = "voip-default"
layer = "app"
apps = ["voip"]
remote = ["198.51.100.0/24"]
remote_ports = [5060]
action = "when-asked"

[[flow]]
app = "voip"
proto = "udp"
internal_port = 5060
remote = "198.51.100.7:5060"
tags = ["emergency"]
"#;

    fn at(hhmm: &str) -> LocalTime {
        LocalTime {
            minute: parse_hhmm(hhmm).unwrap(),
            day: Day::Wed,
        }
    }

    fn policy() -> Policy {
        Policy::parse(Path::new("p.toml"), POLICY).unwrap()
    }

    #[test]
    fn layers_and_precedence() {
        let mut p = policy();
        // The user's catch-all "never" would win over the app default…
        let voip = Flow {
            app: "voip".into(),
            protocol: Some(17),
            internal_port: Some(5060),
            remote: Some("198.51.100.7".parse().unwrap()),
            remote_port: Some(5060),
            tags: vec![],
            asked: true,
        };
        let d = p.explain(&voip, at("12:00"), 0);
        assert!(!d.checkpoint);
        assert_eq!(d.rule.as_deref(), Some("no-checkpoints-please"));
        assert_eq!(
            d.overridden,
            vec![("voip-default".into(), Action::WhenAsked)]
        );
        // …but not over the locked emergency rule.
        let call = Flow {
            tags: vec!["emergency".into()],
            ..voip.clone()
        };
        let d = p.explain(&call, at("12:00"), 5);
        assert!(d.checkpoint, "{d:?}");
        assert_eq!(d.layer, Some(Layer::Locked));
        assert!(!d.limited, "locked rules are exempt from the limit");
        // Without the user's rule the app default applies: when asked.
        p.rules.remove(0);
        assert!(p.explain(&voip, at("12:00"), 0).checkpoint);
        let unasked = Flow {
            asked: false,
            ..voip.clone()
        };
        let d = p.explain(&unasked, at("12:00"), 0);
        assert!(!d.checkpoint);
        assert!(d.reason.contains("does not ask"), "{}", d.reason);
    }

    #[test]
    fn time_windows_ports_and_the_host_limit() {
        let mut p = policy();
        p.rules.remove(0);
        let game = Flow {
            app: "quake".into(),
            protocol: Some(17),
            internal_port: Some(27960),
            ..Flow::default()
        };
        assert!(p.explain(&game, at("19:30"), 0).checkpoint);
        assert!(!p.explain(&game, at("23:00"), 0).checkpoint, "end excluded");
        assert!(!p.explain(&game, at("17:59"), 0).checkpoint);
        let tcp = Flow {
            protocol: Some(6),
            ..game.clone()
        };
        assert!(!p.explain(&tcp, at("19:30"), 0).checkpoint);
        let d = p.explain(&game, at("19:30"), 2);
        assert!(!d.checkpoint && d.limited, "{d:?}");
        assert!(d.reason.contains("limit 2"), "{}", d.reason);
        // No rule: the flow's own ask.
        let other = Flow {
            app: "browser".into(),
            asked: true,
            ..Flow::default()
        };
        let d = p.explain(&other, at("10:00"), 0);
        assert!(d.checkpoint && d.rule.is_none());
    }

    #[test]
    fn plan_puts_locked_flows_first_under_the_limit() {
        let mut p = policy();
        p.rules.remove(0);
        p.max_checkpointed = Some(1);
        let game = Flow {
            app: "quake".into(),
            protocol: Some(17),
            internal_port: Some(27000),
            ..Flow::default()
        };
        let call = Flow {
            app: "voip".into(),
            tags: vec!["emergency".into()],
            ..Flow::default()
        };
        let d = p.plan(&[game.clone(), call.clone()], at("20:00"));
        assert!(d[1].checkpoint, "the emergency call");
        assert!(
            !d[0].checkpoint && d[0].limited,
            "the game waits: {:?}",
            d[0]
        );
    }

    #[test]
    fn wrapping_window_and_days() {
        let w = Window {
            start: parse_hhmm("22:00").unwrap(),
            end: parse_hhmm("02:00").unwrap(),
        };
        assert!(w.contains(parse_hhmm("23:59").unwrap()));
        assert!(w.contains(parse_hhmm("01:00").unwrap()));
        assert!(!w.contains(parse_hhmm("02:00").unwrap()));
        let p = Policy::parse(
            Path::new("x"),
            "[[rule]]\nname = \"weekend\"\ndays = [\"sat\", \"sunday\"]\naction = \"always\"\n",
        )
        .unwrap();
        let f = Flow::default();
        let sat = LocalTime {
            minute: 0,
            day: Day::Sat,
        };
        assert!(p.explain(&f, sat, 0).checkpoint);
        assert!(!p.explain(&f, at("00:00"), 0).checkpoint);
    }

    #[test]
    fn errors_name_the_place() {
        let e = Policy::parse(
            Path::new("p.toml"),
            "[[rule]]\nname = \"x\"\naction = \"sometimes\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("p.toml:3:"), "{e}");
        let e = Policy::parse(
            Path::new("p.toml"),
            "[[rule]]\nname = \"x\"\ntime = \"18-23\"\naction = \"always\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("rule \"x\", time"), "{e}");
        let e = Policy::parse(
            Path::new("p.toml"),
            "[[rule]]\nname = \"x\"\ncolour = 1\naction = \"always\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("colour"), "{e}");
        let p = policy();
        assert_eq!(p.flows.len(), 1);
        assert_eq!(
            p.flows[0].remote,
            Some("198.51.100.7:5060".parse().unwrap())
        );
    }
}
