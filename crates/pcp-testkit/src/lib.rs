//! What the workspace's integration tests share, in one place: a real `pcpd` started
//! on its own loopback address and killed on drop ([`pcpd`]), where the workspace's
//! binaries are and building them when stale ([`bins`]), free loopback addresses and
//! ports ([`ports`]), temporary directories ([`tempdir`]), the admin API over HTTP
//! ([`admin`]), PCP over UDP ([`pcp`]), active/backup pairs ([`ha`]), other processes
//! ([`process`]), certificates ([`tls`]), EAP-TTLS peers and back ends ([`eap`]),
//! network namespaces for root-only tests ([`netns`]) and fuzz corpora ([`corpus`]).
//!
//! Only a `[dev-dependencies]` entry: nothing here is for production code. Tests use
//! only loopback, or namespaces they create and remove.

pub mod admin;
pub mod bins;
pub mod corpus;
pub mod eap;
pub mod ha;
pub mod netns;
pub mod pcp;
pub mod pcpd;
pub mod ports;
pub mod process;
pub mod tempdir;
pub mod tls;

pub use admin::{http, metric, try_http};
pub use bins::{pcpc_bin, pcpd_bin, workspace_root};
pub use ha::{HaTiming, Node, PairPlan, kill_settled_active, role, wait_ha};
pub use pcp::{Answer, Map, PcpClient, parse_answer};
pub use pcpd::{Builder, Pcpd, honour_config, pcpd, poll, wait_for, wait_until};
pub use ports::{free_port, fresh_ip};
pub use process::run;
pub use tempdir::TempDir;
