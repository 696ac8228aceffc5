//! Active/backup pairs of real daemons: addresses planned before either node starts,
//! the `[ha]` sections, and waiting on `GET /ha`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::pcpd::{Pcpd, pcpd};
use crate::ports::{free_port, fresh_ip};

/// Timers of a pair (the `[ha]` keys other than the addresses and the role).
#[derive(Debug, Clone, Copy)]
pub struct HaTiming {
    /// `heartbeat_ms`.
    pub heartbeat_ms: u64,
    /// `detection_ms`.
    pub detection_ms: u64,
    /// `ack_timeout_ms`.
    pub ack_timeout_ms: u64,
}

impl Default for HaTiming {
    fn default() -> Self {
        HaTiming {
            heartbeat_ms: 100,
            detection_ms: 500,
            ack_timeout_ms: 250,
        }
    }
}

/// One node of a planned pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    /// The first node (normally started `active`).
    A,
    /// The second node (normally started `backup`).
    B,
}

/// An active/backup pair's addresses, fixed before either node starts: each node has its
/// own fresh loopback address, on which it listens for PCP, admin and replication.
#[derive(Debug, Clone)]
pub struct PairPlan {
    /// Node A's address.
    pub ip_a: Ipv4Addr,
    /// Node B's address.
    pub ip_b: Ipv4Addr,
    /// Node A's replication (`[ha] listen`) address.
    pub ha_a: SocketAddr,
    /// Node B's replication address.
    pub ha_b: SocketAddr,
    /// The server sections both nodes run with.
    pub server_config: String,
    /// The timers.
    pub timing: HaTiming,
}

impl PairPlan {
    /// Two fresh addresses with a free UDP replication port each.
    pub fn new(server_config: &str, timing: HaTiming) -> PairPlan {
        let (ip_a, ip_b) = (fresh_ip(), fresh_ip());
        PairPlan {
            ip_a,
            ip_b,
            ha_a: SocketAddr::new(IpAddr::V4(ip_a), free_port(ip_a, true)),
            ha_b: SocketAddr::new(IpAddr::V4(ip_b), free_port(ip_b, true)),
            server_config: server_config.to_string(),
            timing,
        }
    }

    /// The `[ha]` section of `node` starting as `role` (`"active"` or `"backup"`).
    pub fn ha_section(&self, node: Node, role: &str) -> String {
        let (listen, peer) = match node {
            Node::A => (self.ha_a, self.ha_b),
            Node::B => (self.ha_b, self.ha_a),
        };
        let t = self.timing;
        format!(
            "[ha]\nlisten = \"{listen}\"\npeer = \"{peer}\"\nrole = \"{role}\"\n\
             heartbeat_ms = {}\ndetection_ms = {}\nack_timeout_ms = {}\n",
            t.heartbeat_ms, t.detection_ms, t.ack_timeout_ms
        )
    }

    /// The whole config file of `node` starting as `role`.
    pub fn config(&self, node: Node, role: &str) -> String {
        format!(
            "{}\n\n{}",
            self.server_config.trim_end(),
            self.ha_section(node, role)
        )
    }

    /// Starts `node` as `role` with the `[ha]` section in its config file.
    pub fn start(&self, bin: impl Into<PathBuf>, node: Node, role: &str) -> Pcpd {
        let ip = match node {
            Node::A => self.ip_a,
            Node::B => self.ip_b,
        };
        pcpd(bin).at(ip).config(&self.config(node, role)).start()
    }
}

/// The role `GET /ha` of `d` shows, `None` when it does not answer.
pub fn role(d: &Pcpd) -> Option<String> {
    d.try_ha()
        .and_then(|h| h["role"].as_str().map(str::to_string))
}

/// Waits until `d`'s `GET /ha` satisfies `f`; returns that answer.
pub fn wait_ha(
    d: &Pcpd,
    limit: Duration,
    what: &str,
    f: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut last = None;
    let deadline = Instant::now() + limit;
    loop {
        if let Some(h) = d.try_ha() {
            if f(&h) {
                return h;
            }
            last = Some(h);
        }
        assert!(
            Instant::now() < deadline,
            "{}: timed out after {limit:?} waiting for {what}; last GET /ha: {last:?}",
            d.pcp
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until the active `a` has nothing left for its backup to acknowledge, kills it
/// with SIGKILL and waits (up to `limit`) until `b` is active; returns `b`'s `GET /ha`.
pub fn kill_settled_active(a: &mut Pcpd, b: &Pcpd, limit: Duration) -> serde_json::Value {
    wait_ha(
        a,
        Duration::from_secs(2),
        "nothing left to acknowledge",
        |h| h["lag"] == 0,
    );
    a.kill9();
    wait_ha(b, limit, "B takes over", |h| h["role"] == "active")
}
