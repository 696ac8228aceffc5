//! pcpd's configuration file: a `[pcpd]` section for the daemon itself, the server
//! core's sections (`[lifetime]`, `[pool]`, `[subscribers]`, `[tiers.*]`,
//! `[checkpoint]`, `[[policy]]`, `[mapping]`) beside it, and `[auth]` (RFC 7652,
//! `crate::auth`). Every error names the file, the
//! line and the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use pcp_server::ServerConfig;
use pcp_server::config::{
    CheckpointConfig, LifetimeConfig, LimitsConfig, MappingConfig, PolicyRule, PoolConfig,
    SubscriberConfig, TierConfig,
};
use serde::Deserialize;
use std::collections::BTreeMap;

pub use crate::acl::AclSection;
use crate::auth::AuthSection;

/// The daemon's own settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DaemonSection {
    /// PCP/NAT-PMP listen addresses.
    pub listen: Vec<SocketAddr>,
    /// Admin HTTP API address.
    pub admin: SocketAddr,
    /// Data plane: `"memory"` (default) or `"nftables"` (see `[nftables]`).
    pub dataplane: DataPlaneKind,
    /// Log filter (tracing `EnvFilter` syntax), overridden by `RUST_LOG`.
    pub log: String,
    /// At start (a state loss for every client), multicast unsolicited ANNOUNCE to
    /// 224.0.0.1:5350 / [ff02::1]:5350 from each listen socket (RFC 6887 §14.1.1).
    /// Off by default: only useful where the clients share the served link. A node
    /// that does not serve (a pair's backup) sends none; hosts with PA sessions get
    /// tagged unicast copies.
    pub announce_multicast: bool,
    /// Runtime threads: 1 runs everything on one thread; more (default 2) use a
    /// multi-threaded runtime.
    pub threads: usize,
    /// File holding the admin API's bearer token (every endpoint). Required when
    /// `admin` is not a loopback address; never on the command line.
    pub admin_token_file: Option<PathBuf>,
    /// File holding a read-only bearer token (`GET` endpoints only).
    pub admin_read_token_file: Option<PathBuf>,
    /// Receive buffer of each PCP listen socket, octets (the kernel caps it at
    /// net.core.rmem_max). A deep queue rides out a flood's bursts and scheduling
    /// hiccups, so other hosts' requests are not lost behind it.
    pub recv_buffer: usize,
    /// Mappings the server core and data plane are sized for at start (0: not sized;
    /// a standby backup in pair mode sizes for `[checkpoint] capacity` at least).
    /// Growing a table past a million entries stalls the node for hundreds of ms.
    pub expected_mappings: usize,
    /// Back large tables by transparent huge pages (see `hugepages`): a faster bulk
    /// copy, but page-zeroing stalls while the tables fill (off by default).
    pub huge_pages: bool,
}

impl Default for DaemonSection {
    fn default() -> Self {
        DaemonSection {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], pcp_proto::SERVER_PORT))],
            admin: SocketAddr::from(([127, 0, 0, 1], 8351)),
            dataplane: DataPlaneKind::Memory,
            log: "info".into(),
            announce_multicast: false,
            threads: 2,
            admin_token_file: None,
            admin_read_token_file: None,
            recv_buffer: 4 << 20,
            expected_mappings: 0,
            huge_pages: false,
        }
    }
}

/// High availability: this node and its peer (RFC 7767 check-pointing needs both).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HaSection {
    /// Where this node receives its peer's replication frames (UDP).
    pub listen: SocketAddr,
    /// The peer's `listen` address.
    pub peer: SocketAddr,
    /// The role this node starts in; the node started `active` takes over when no
    /// active is heard, the `backup` follows.
    pub role: HaRole,
    /// Idle heartbeat interval, milliseconds.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// Silence after which the backup takes over, milliseconds.
    #[serde(default = "default_detection_ms")]
    pub detection_ms: u64,
    /// Longest a reply echoing option 192 waits for the backup's acknowledgement
    /// before it goes out without the option (and the checkpoint is cleared).
    #[serde(default = "default_ack_timeout_ms")]
    pub ack_timeout_ms: u64,
    /// File where this node keeps the highest HA term it has seen, so that after a
    /// restart it never takes a term it (or its peer) already used. Written (atomically)
    /// before any frame of a new term goes out. Without it a restarted node starts from
    /// term 0 and learns the current term on contact.
    #[serde(default)]
    pub state_file: Option<std::path::PathBuf>,
    /// The backup installs replicated mappings into its own data plane as they arrive
    /// (true), or only when it takes over (false). See docs/BENCHMARKS.md for which
    /// fails over faster.
    #[serde(default = "default_preinstall")]
    pub preinstall: bool,
    /// Replicate established PCP authentication sessions (RFC 7652: identity,
    /// transport key, sequence numbers) so that their clients need not authenticate
    /// again after a failover. Without `key_file` the keys would cross the
    /// replication link in clear: pcpd then refuses to start with authentication on
    /// unless `replicate_sessions_in_clear` says the link is trusted (docs/HA.md).
    #[serde(default = "default_preinstall")]
    pub replicate_sessions: bool,
    /// The operator's statement that the replication link is a trusted, dedicated
    /// network: PA session keys may cross it in clear (no `key_file`).
    #[serde(default)]
    pub replicate_sessions_in_clear: bool,
    /// File holding the pre-shared key that authenticates and encrypts every
    /// replication frame (one line: at least 32 random octets, hex or base64; readable
    /// by its owner only). Both nodes use the same key; without it frames are plain.
    #[serde(default)]
    pub key_file: Option<std::path::PathBuf>,
    /// File pcpd rewrites (atomically) on every role change for keepalived's
    /// `track_file`: `0` while this node serves PCP (active or promoting), `1`
    /// otherwise and after a clean stop (docs/HA.md, "keepalived").
    #[serde(default)]
    pub serving_file: Option<std::path::PathBuf>,
}

/// Reads and checks the replication link's key file (`[ha] key_file`). `config` is
/// the configuration file and line naming it, for the error; `None` when it came from
/// `--ha-key-file`.
pub fn read_key_file(
    path: &Path,
    config: Option<(&Path, usize)>,
) -> Result<pcp_ha::seal::LinkKey, ConfigFileError> {
    let (cfg_path, line) = config.unwrap_or((Path::new("--ha-key-file"), 0));
    let invalid = |message: String| ConfigFileError::Invalid {
        path: cfg_path.to_path_buf(),
        line,
        key: "ha.key_file".into(),
        message: format!("{}: {message}", path.display()),
    };
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::metadata(path).map_err(|e| invalid(e.to_string()))?;
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(invalid(format!(
            "mode {:03o}: readable or writable by group or others; chmod 600 it",
            mode & 0o777
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| invalid(e.to_string()))?;
    if text.trim().lines().count() > 1 {
        return Err(invalid("more than one line".into()));
    }
    pcp_ha::seal::LinkKey::parse(&text).map_err(|e| invalid(e.to_string()))
}

fn default_preinstall() -> bool {
    true
}

fn default_heartbeat_ms() -> u64 {
    100
}
fn default_detection_ms() -> u64 {
    500
}
fn default_ack_timeout_ms() -> u64 {
    250
}

/// The role a node starts in.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum HaRole {
    /// Serve, and replicate to the peer.
    Active,
    /// Follow the peer, take over when it fails.
    Backup,
}

/// Which data plane drives translations.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum DataPlaneKind {
    /// Record mappings in memory (no privileges; enforces nothing).
    #[default]
    Memory,
    /// Drive the Linux kernel's NAT through an nftables table of pcpd's own.
    Nftables,
}

/// The nftables data plane (`dataplane = "nftables"`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct NftablesSection {
    /// The table (family `inet`) pcpd owns; it never touches another.
    pub table: String,
    /// Delete the table when pcpd stops cleanly (SIGTERM/SIGINT).
    pub remove_on_exit: bool,
    /// Most elements each of the table's maps and sets may hold; beyond, requests get
    /// NO_RESOURCES. 0: no limit but the kernel's memory.
    pub max_elements: u32,
    /// The `nft` binary that declares the table at start.
    pub nft: String,
}

impl Default for NftablesSection {
    fn default() -> Self {
        NftablesSection {
            table: "pcpd".into(),
            remove_on_exit: true,
            max_elements: 0,
            nft: "nft".into(),
        }
    }
}

/// The whole file. The server sections mirror [`ServerConfig`] so that one
/// `deny_unknown_fields` pass checks every key with its position.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
struct File {
    pcpd: DaemonSection,
    lifetime: LifetimeConfig,
    pool: PoolConfig,
    subscribers: SubscriberConfig,
    tiers: Option<BTreeMap<String, TierConfig>>,
    checkpoint: CheckpointConfig,
    policy: Vec<PolicyRule>,
    mapping: MappingConfig,
    limits: LimitsConfig,
    acl: AclSection,
    ha: Option<HaSection>,
    nftables: NftablesSection,
    auth: AuthSection,
}

/// Everything pcpd runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where it came from (`None`: embedded defaults).
    pub path: Option<PathBuf>,
    /// Daemon settings.
    pub daemon: DaemonSection,
    /// Server core settings.
    pub server: ServerConfig,
    /// Pair mode, when configured.
    pub ha: Option<HaSection>,
    /// Which clients each listen address answers.
    pub acl: AclSection,
    /// The nftables data plane's settings.
    pub nftables: NftablesSection,
    /// PCP authentication (RFC 7652).
    pub auth: AuthSection,
    /// Line of `ha.replicate_sessions` (else of `[ha]`) in the file, for
    /// [`Config::check_session_replication`]'s error; 0 when unknown.
    pub replicate_line: usize,
}

/// Why pair mode must not run with `auth` and `ha` as they are: PA session keys would
/// cross the replication link in clear (no key file, no opt-in).
pub fn session_replication_problem(ha: Option<&HaSection>, auth: &AuthSection) -> Option<String> {
    let ha = ha?;
    if !auth.enabled() || !ha.replicate_sessions || ha.key_file.is_some() {
        return None;
    }
    if ha.replicate_sessions_in_clear {
        return None;
    }
    Some(
        "PCP authentication is on and PA session keys would cross the replication link \
         in clear: set ha.key_file (or --ha-key-file), or replicate_sessions = false \
         (clients authenticate again after a failover), or replicate_sessions_in_clear \
         = true if the link is a trusted, dedicated network (docs/HA.md)"
            .into(),
    )
}

/// A configuration pcpd cannot run with.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a key is unknown or has a bad value.
    #[error("{path}:{line}: {key}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line of the offending key (0 when unknown).
        line: usize,
        /// Dotted key path.
        key: String,
        /// What is wrong.
        message: String,
    },
}

impl Config {
    /// The embedded defaults: PCP on 127.0.0.1:5351, admin on 127.0.0.1:8351, memory
    /// data plane.
    pub fn embedded() -> Config {
        Config {
            path: None,
            daemon: DaemonSection::default(),
            server: ServerConfig::default(),
            ha: None,
            acl: AclSection::default(),
            nftables: NftablesSection::default(),
            auth: AuthSection::default(),
            replicate_line: 0,
        }
    }

    /// Refuses pair mode that would replicate PA session keys in clear
    /// ([`session_replication_problem`]); checked once the command line has had its
    /// say (`--ha-key-file`, `--ha-listen`), naming the file, line and key.
    pub fn check_session_replication(&self) -> Result<(), ConfigFileError> {
        match session_replication_problem(self.ha.as_ref(), &self.auth) {
            None => Ok(()),
            Some(message) => Err(ConfigFileError::Invalid {
                path: self
                    .path
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("--ha-listen")),
                line: self.replicate_line,
                key: "ha.replicate_sessions".into(),
                message,
            }),
        }
    }

    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates `text` as if read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigFileError> {
        let invalid = |line, key: String, message: String| ConfigFileError::Invalid {
            path: path.to_path_buf(),
            line,
            key,
            message,
        };
        let de = toml::Deserializer::parse(text).map_err(|e| {
            invalid(
                line_of_span(text, e.span()),
                String::new(),
                e.message().into(),
            )
        })?;
        let file: File = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let line = match inner.span() {
                Some(span) => line_of_span(text, Some(span)),
                None => line_of_key(text, &key),
            };
            invalid(line, key, inner.message().to_string())
        })?;
        let mut server = ServerConfig {
            lifetime: file.lifetime,
            pool: file.pool,
            subscribers: file.subscribers,
            checkpoint: file.checkpoint,
            policy: file.policy,
            mapping: file.mapping,
            limits: file.limits,
            ..ServerConfig::default()
        };
        if let Some(tiers) = file.tiers {
            server.tiers.extend(tiers);
        }
        server.validate().map_err(|e| match e {
            pcp_server::ConfigError::Invalid { key, problem } => {
                invalid(line_of_key(text, &key), key, problem)
            }
        })?;
        let nft = &file.nftables;
        if nft.table.is_empty()
            || !nft
                .table
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(invalid(
                line_of_key(text, "nftables.table"),
                "nftables.table".into(),
                format!("{:?}: letters, digits, '_' and '-' only", nft.table),
            ));
        }
        if let Some(ha) = &file.ha
            && ha.heartbeat_ms == 0
        {
            return Err(invalid(
                line_of_key(text, "ha.heartbeat_ms"),
                "ha.heartbeat_ms".into(),
                "must be at least 1".into(),
            ));
        }
        if let Some(ha) = &file.ha
            && ha.detection_ms <= 2 * ha.heartbeat_ms
        {
            return Err(invalid(
                line_of_key(text, "ha.detection_ms"),
                "ha.detection_ms".into(),
                format!("must exceed twice ha.heartbeat_ms ({} ms)", ha.heartbeat_ms),
            ));
        }
        if let Some(key_file) = file.ha.as_ref().and_then(|h| h.key_file.as_deref()) {
            read_key_file(key_file, Some((path, line_of_key(text, "ha.key_file"))))?;
        }
        if let Some((key, message)) = file.auth.problem() {
            return Err(invalid(line_of_key(text, key), key.into(), message));
        }
        Ok(Config {
            path: Some(path.to_path_buf()),
            daemon: file.pcpd,
            server,
            ha: file.ha,
            acl: file.acl,
            nftables: file.nftables,
            auth: file.auth,
            replicate_line: line_of_key(text, "ha.replicate_sessions"),
        })
    }
}

/// 1-based line of a byte span's start (0 when unknown).
fn line_of_span(text: &str, span: Option<std::ops::Range<usize>>) -> usize {
    span.map_or(0, |s| {
        text[..s.start.min(text.len())].matches('\n').count() + 1
    })
}

/// Best-effort 1-based line of a dotted key (`tiers.gold.checkpoint_rate`,
/// `policy[2].tiers`): the key's own line inside its table if found, else its table's
/// header, else 0.
fn line_of_key(text: &str, key: &str) -> usize {
    let parts: Vec<&str> = key
        .split('.')
        .map(|p| p.split('[').next().unwrap_or(p))
        .filter(|p| !p.is_empty())
        .collect();
    let Some((last, tables)) = parts.split_last() else {
        return 0;
    };
    let lines: Vec<&str> = text.lines().collect();
    let is_header = |l: &str, name: &str| {
        let l = l.trim();
        l == format!("[{name}]") || l == format!("[[{name}]]")
    };
    // The deepest table header on the path that the file has.
    let mut start = 0;
    let mut found_table = 0;
    for depth in (1..=tables.len()).rev() {
        let name = tables[..depth].join(".");
        if let Some(i) = lines.iter().position(|l| is_header(l, &name)) {
            start = i;
            found_table = i + 1;
            break;
        }
    }
    for (i, l) in lines.iter().enumerate().skip(start) {
        if i > start && l.trim_start().starts_with('[') && found_table != 0 {
            break;
        }
        let t = l.trim_start();
        if t.starts_with(last) && t[last.len()..].trim_start().starts_with('=') {
            return i + 1;
        }
    }
    found_table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> (usize, String, String) {
        match Config::parse(Path::new("pcpd.toml"), text) {
            Err(ConfigFileError::Invalid {
                line, key, message, ..
            }) => (line, key, message),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn empty_file_is_the_embedded_defaults() {
        let c = Config::parse(Path::new("x.toml"), "").unwrap();
        assert_eq!(c.server, ServerConfig::default());
        assert_eq!(c.daemon, DaemonSection::default());
    }

    #[test]
    fn auth_section_modes_per_prefix_and_its_errors() {
        let c = Config::parse(
            Path::new("x.toml"),
            "[auth]\ndefault = \"optional\"\ncertificate = \"c\"\nkey = \"k\"\ncredentials = \"u\"\n\n[[auth.prefixes]]\nprefix = \"10.0.0.0/8\"\nauth = \"required\"\n",
        )
        .unwrap();
        assert!(c.auth.enabled());
        assert_eq!(c.auth.prefixes[0].auth, crate::auth::AuthMode::Required);
        // On without its files: the key is named.
        let (line, key, _) = err("[pcpd]\n\n[auth]\ndefault = \"required\"\n");
        assert_eq!((line, key.as_str()), (3, "auth.certificate"));
        let (_, key, msg) =
            err("[auth]\n[[auth.prefixes]]\nprefix = \"10.0.0.0/8\"\nauth = \"sometimes\"\n");
        assert!(key.contains("auth"), "{key}");
        assert!(
            msg.contains("sometimes") || msg.contains("variant"),
            "{msg}"
        );
        // Pair mode too.
        let c = Config::parse(
            Path::new("x.toml"),
            "[ha]\nlisten = \"127.0.0.1:1\"\npeer = \"127.0.0.1:2\"\nrole = \"active\"\n[auth]\ndefault = \"optional\"\ncertificate = \"c\"\nkey = \"k\"\ncredentials = \"u\"\n",
        )
        .unwrap();
        assert!(c.auth.enabled() && c.ha.is_some());
        // ... but not with PA session keys replicated in clear: refused naming the
        // file, the line and the key, unless a key file, no replication, or the
        // operator's opt-in; auth off needs none of them.
        let ha = "[ha]\nlisten = \"127.0.0.1:1\"\npeer = \"127.0.0.1:2\"\nrole = \"active\"\n";
        let auth = "[auth]\ndefault = \"optional\"\ncertificate = \"c\"\nkey = \"k\"\ncredentials = \"u\"\n";
        match c.check_session_replication() {
            Err(ConfigFileError::Invalid {
                path,
                line,
                key,
                message,
            }) => {
                assert_eq!((path.to_str(), line), (Some("x.toml"), 1));
                assert_eq!(key, "ha.replicate_sessions");
                assert!(
                    message.contains("key_file") && message.contains("replicate_sessions_in_clear"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
        let with = |extra: &str| {
            Config::parse(Path::new("x.toml"), &format!("{ha}{extra}{auth}")).unwrap()
        };
        let c = with("replicate_sessions = true\n");
        assert!(matches!(
            c.check_session_replication(),
            Err(ConfigFileError::Invalid { line: 5, .. })
        ));
        assert!(
            with("replicate_sessions = false\n")
                .check_session_replication()
                .is_ok()
        );
        assert!(
            with("replicate_sessions_in_clear = true\n")
                .check_session_replication()
                .is_ok()
        );
        let mut keyed = with("");
        keyed.ha.as_mut().unwrap().key_file = Some("k".into());
        assert!(keyed.check_session_replication().is_ok());
        let off = Config::parse(Path::new("x.toml"), ha).unwrap();
        assert!(off.check_session_replication().is_ok());
        // [auth.attempts]: the limits' settings are checked naming the key.
        for (text, want) in [
            ("burst = 3\nevery_s = 0\n", "auth.attempts.every_s"),
            ("identity_burst = 0\n", "auth.attempts.identity_burst"),
            ("max_tracked = 0\n", "auth.attempts.max_tracked"),
        ] {
            let (line, key, _) = err(&format!("[auth.attempts]\n{text}"));
            assert_eq!((line, key.as_str()), (text.lines().count() + 1, want));
        }
        assert!(
            Config::parse(
                Path::new("x.toml"),
                "[auth.attempts]\nburst = 0\nidentity_burst = 0\n"
            )
            .is_ok()
        );
        // The session table's bounds: defaults, set, and zero refused naming the key.
        assert_eq!(
            (c.auth.max_sessions, c.auth.max_half_open_per_prefix),
            (65_536, 256)
        );
        let c = Config::parse(
            Path::new("x.toml"),
            "[auth]\nmax_sessions = 1000\nmax_half_open_per_prefix = 16\n",
        )
        .unwrap();
        assert_eq!(
            (c.auth.max_sessions, c.auth.max_half_open_per_prefix),
            (1000, 16)
        );
        for key in ["max_sessions", "max_half_open_per_prefix"] {
            let (line, k, _) = err(&format!("[auth]\ndefault = \"off\"\n{key} = 0\n"));
            assert_eq!((line, k), (3, format!("auth.{key}")));
        }
        // RADIUS instead of the embedded files; not both.
        let c = Config::parse(
            Path::new("x.toml"),
            "[auth]\ndefault = \"required\"\n[auth.radius]\nserver = \"127.0.0.1:1812\"\nsecret_file = \"s\"\n",
        )
        .unwrap();
        let r = c.auth.radius.unwrap();
        assert_eq!(
            (r.timeout_ms, r.tries, r.nas_identifier.as_str()),
            (1000, 3, "pcpd")
        );
        let (_, key, msg) = err(
            "[auth]\ndefault = \"required\"\ncredentials = \"u\"\n[auth.radius]\nserver = \"127.0.0.1:1812\"\nsecret_file = \"s\"\n",
        );
        assert_eq!(key, "auth.credentials");
        assert!(msg.contains("embedded"), "{msg}");
        let (_, key, _) = err(
            "[auth]\ndefault = \"required\"\n[auth.radius]\nserver = \"127.0.0.1:1812\"\nsecret_file = \"s\"\ntries = 0\n",
        );
        assert_eq!(key, "auth.radius.tries");
        // Several AAA servers, one with its own secret; none, twice, or without a
        // secret is refused naming the key.
        let c = Config::parse(
            Path::new("x.toml"),
            "[auth]\ndefault = \"required\"\n[auth.radius]\nservers = [\"127.0.0.1:1812\", { address = \"127.0.0.2:1812\", secret_file = \"t\" }]\nsecret_file = \"s\"\n",
        )
        .unwrap();
        let r = c.auth.radius.unwrap();
        let list = r.server_list();
        assert_eq!(list.len(), 2);
        assert_eq!(list[1].1.unwrap().to_str(), Some("t"));
        assert_eq!(r.dead_time_s, 30);
        for (text, want) in [
            ("secret_file = \"s\"\n", "auth.radius.servers"),
            (
                "servers = [\"127.0.0.1:1812\", \"127.0.0.1:1812\"]\nsecret_file = \"s\"\n",
                "auth.radius.servers",
            ),
            (
                "servers = [\"127.0.0.1:1812\"]\n",
                "auth.radius.secret_file",
            ),
            (
                "server = \"127.0.0.1:1812\"\nsecret_file = \"s\"\ndead_time_s = 0\n",
                "auth.radius.dead_time_s",
            ),
        ] {
            let (_, key, msg) = err(&format!(
                "[auth]\ndefault = \"required\"\n[auth.radius]\n{text}"
            ));
            assert_eq!(key, want, "{text}: {msg}");
        }
        // Off is the default and needs nothing.
        assert!(
            !Config::parse(Path::new("x.toml"), "")
                .unwrap()
                .auth
                .enabled()
        );
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let (line, key, msg) =
            err("[pcpd]\nadmin = \"127.0.0.1:1\"\n\n[pool]\nport_min = 2000\nbogus = 1\n");
        assert_eq!(line, 6);
        assert!(key.contains("pool"), "{key}");
        assert!(msg.contains("bogus"), "{msg}");
    }

    #[test]
    fn bad_value_names_line_and_key() {
        let (line, key, _) = err("[tiers.gold]\nmapping_quota = 10\ncheckpoint_quota = \"many\"\n");
        assert_eq!(line, 3);
        assert_eq!(key, "tiers.gold.checkpoint_quota");
    }

    #[test]
    fn semantic_errors_name_line_and_key() {
        let (line, key, msg) =
            err("[pool]\naddresses = [\"192.0.2.1\"]\nport_min = 3000\nport_max = 2000\n");
        assert_eq!((line, key.as_str()), (3, "pool.port_min"));
        assert!(msg.contains("port_max"));
        let (line, key, _) = err(
            "[[subscribers.entries]]\nprefixes = [\"10.0.0.0/8\"]\nid = \"a\"\ntier = \"platinum\"\n",
        );
        assert_eq!(key, "subscribers.entries[0].tier");
        assert_eq!(line, 4);
    }

    #[test]
    fn syntax_errors_have_a_line() {
        let (line, _, _) = err("[pool]\nport_min = = 3\n");
        assert_eq!(line, 2);
    }

    #[test]
    fn nftables_section_is_checked() {
        let c = Config::parse(
            Path::new("x.toml"),
            "[pcpd]\ndataplane = \"nftables\"\n[nftables]\ntable = \"edge\"\nmax_elements = 10\n",
        )
        .unwrap();
        assert_eq!(c.daemon.dataplane, DataPlaneKind::Nftables);
        assert_eq!(
            (c.nftables.table.as_str(), c.nftables.max_elements),
            ("edge", 10)
        );
        assert!(c.nftables.remove_on_exit);
        let (line, key, _) = err("[nftables]\n\ntable = \"a b\"\n");
        assert_eq!((line, key.as_str()), (3, "nftables.table"));
        let (line, key, _) = err("[pcpd]\ndataplane = \"iptables\"\n");
        assert_eq!((line, key.as_str()), (2, "pcpd.dataplane"));
        let c = Config::parse(
            Path::new("t.toml"),
            "[pcpd]\nexpected_mappings = 2000000\nhuge_pages = true\n",
        )
        .unwrap();
        assert_eq!(
            (c.daemon.expected_mappings, c.daemon.huge_pages),
            (2_000_000, true)
        );
        let (line, key, _) = err("[pcpd]\n\nexpected_mappings = -5\n");
        assert_eq!((line, key.as_str()), (3, "pcpd.expected_mappings"));
    }

    #[test]
    fn the_example_config_parses() {
        let text = include_str!("../../../docs/pcpd.example.toml");
        let c = Config::parse(Path::new("docs/pcpd.example.toml"), text).unwrap();
        assert!(c.server.tiers.contains_key("gold"));
        assert!(!c.server.policy.is_empty());
        // The documented defaults are the defaults.
        assert_eq!(c.server.limits, pcp_server::config::LimitsConfig::default());
        assert_eq!(c.acl.allow, AclSection::default().allow);
        assert_eq!(c.daemon.recv_buffer, DaemonSection::default().recv_buffer);
        assert_eq!(
            (c.daemon.expected_mappings, c.daemon.huge_pages),
            (0, DaemonSection::default().huge_pages)
        );
        assert_eq!(c.acl.listen.len(), 1);
    }

    #[test]
    fn ha_serving_file_is_optional() {
        let ha =
            "[ha]\nlisten = \"10.255.0.1:5400\"\npeer = \"10.255.0.2:5400\"\nrole = \"active\"\n";
        let c = Config::parse(Path::new("t.toml"), ha).unwrap();
        assert_eq!(c.ha.unwrap().serving_file, None);
        let text = format!("{ha}serving_file = \"/run/pcpd/serving\"\n");
        let c = Config::parse(Path::new("t.toml"), &text).unwrap();
        assert_eq!(
            c.ha.unwrap().serving_file.as_deref(),
            Some(Path::new("/run/pcpd/serving"))
        );
        // Zero would spin the threads that beat and touch the liveness marker.
        let (line, key, _) = err(&format!("{ha}heartbeat_ms = 0\n"));
        assert_eq!((line, key.as_str()), (5, "ha.heartbeat_ms"));
    }

    #[test]
    fn security_keys_are_checked_with_their_line() {
        let (line, key, _) = err("[limits]
host_rate = -1.0
");
        assert_eq!((line, key.as_str()), (2, "limits.host_rate"));
        let (line, key, _) = err("[acl]
reject = \"maybe\"
");
        assert_eq!((line, key.as_str()), (2, "acl.reject"));
        let (line, key, _) = err("[acl]
allow = [\"10.0.0.0/33\"]
");
        assert_eq!(line, 2);
        assert!(key.starts_with("acl.allow"), "{key}");
    }
}
