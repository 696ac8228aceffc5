//! Client access lists: which source prefixes each PCP listen address answers.
//!
//! Checked in the socket task before the core's lock is taken, so a refused source
//! costs a prefix comparison. A refused datagram is dropped silently (the default:
//! nothing tells a scanner a PCP server is there) or, with `reject = "not_authorized"`,
//! answered NOT_AUTHORIZED by the core (rate-limited like any answer). Either way it is
//! counted per listen address (`pcpd_acl_rejected_total`).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};

use ipnet::IpNet;
use serde::Deserialize;

/// What to do with a datagram from a source outside the list.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Reject {
    /// Drop silently.
    #[default]
    Drop,
    /// Answer PCP requests NOT_AUTHORIZED.
    NotAuthorized,
}

/// The `[acl]` section.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct AclSection {
    /// Client prefixes answered on every listen address that has no list of its own.
    /// Default: loopback, RFC 1918, shared address space (100.64/10), IPv6 ULA and
    /// link-local — the inside of a typical NAT. Public client addresses (an ISP's
    /// IPv6 customers, say) must be listed.
    pub allow: Vec<IpNet>,
    /// `"drop"` (default) or `"not_authorized"`.
    pub reject: Reject,
    /// Lists for particular listen addresses.
    pub listen: Vec<ListenAcl>,
}

impl Default for AclSection {
    fn default() -> Self {
        AclSection {
            allow: [
                "127.0.0.0/8",
                "10.0.0.0/8",
                "172.16.0.0/12",
                "192.168.0.0/16",
                "100.64.0.0/10",
                "169.254.0.0/16",
                "::1/128",
                "fc00::/7",
                "fe80::/10",
            ]
            .iter()
            .map(|p| p.parse().expect("valid prefix"))
            .collect(),
            reject: Reject::Drop,
            listen: Vec::new(),
        }
    }
}

/// The list of one listen address.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ListenAcl {
    /// The listen address (as in `[pcpd] listen`).
    pub address: SocketAddr,
    /// Client prefixes it answers (empty: none).
    pub allow: Vec<IpNet>,
}

/// The access list in force on one socket, with its counter.
#[derive(Debug)]
pub struct SocketAcl {
    /// The listen address.
    pub listen: SocketAddr,
    allow: Vec<IpNet>,
    /// What to do with the others.
    pub reject: Reject,
    rejected: AtomicU64,
}

impl SocketAcl {
    /// The list `section` gives listen address `listen`.
    pub fn new(section: &AclSection, listen: SocketAddr) -> SocketAcl {
        let allow = section
            .listen
            .iter()
            .find(|l| l.address == listen)
            .map_or_else(|| section.allow.clone(), |l| l.allow.clone());
        SocketAcl {
            listen,
            allow,
            reject: section.reject,
            rejected: AtomicU64::new(0),
        }
    }

    /// Whether `src` may talk to this socket; counts it when not.
    pub fn admits(&self, src: IpAddr) -> bool {
        let src = src.to_canonical();
        if self.allow.iter().any(|p| p.contains(&src)) {
            return true;
        }
        self.rejected.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// The length of the longest prefix of the list that holds `host` (`None`: not a
    /// client of this address). Not counted: a lookup, not a datagram.
    pub fn match_len(&self, host: IpAddr) -> Option<u8> {
        let host = host.to_canonical();
        self.allow
            .iter()
            .filter(|p| p.contains(&host))
            .map(IpNet::prefix_len)
            .max()
    }

    /// Datagrams refused so far.
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// The prefixes, for the start-up log.
    pub fn allowed(&self) -> &[IpNet] {
        &self.allow
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_serves_loopback_and_private_only() {
        let a = SocketAcl::new(&AclSection::default(), "127.0.0.1:5351".parse().unwrap());
        for ok in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.1.1",
            "100.64.0.9",
            "::1",
            "fd00::1",
        ] {
            assert!(a.admits(ok.parse().unwrap()), "{ok}");
        }
        // IPv4-mapped IPv6 sources (dual-stack sockets) are judged as IPv4.
        assert!(a.admits("::ffff:10.0.0.1".parse().unwrap()));
        assert_eq!(a.rejected(), 0);
        for no in ["8.8.8.8", "2001:db8::1", "::ffff:8.8.8.8", "192.0.2.1"] {
            assert!(!a.admits(no.parse().unwrap()), "{no}");
        }
        assert_eq!(a.rejected(), 4);
    }

    #[test]
    fn per_listen_lists_replace_the_default() {
        let s = AclSection {
            listen: vec![ListenAcl {
                address: "127.0.0.2:5351".parse().unwrap(),
                allow: vec!["127.0.0.7/32".parse().unwrap()],
            }],
            ..AclSection::default()
        };
        let a = SocketAcl::new(&s, "127.0.0.2:5351".parse().unwrap());
        assert!(a.admits("127.0.0.7".parse().unwrap()));
        assert!(!a.admits("127.0.0.8".parse().unwrap()));
        let b = SocketAcl::new(&s, "127.0.0.3:5351".parse().unwrap());
        assert!(b.admits("127.0.0.8".parse().unwrap()));
        // The most specific list names the address a host talks to (the takeover's
        // ANNOUNCE leaves from it); a lookup is not a refusal.
        assert_eq!(a.match_len("127.0.0.7".parse().unwrap()), Some(32));
        assert_eq!(b.match_len("127.0.0.7".parse().unwrap()), Some(8));
        assert_eq!(a.match_len("127.0.0.9".parse().unwrap()), None);
        assert_eq!(a.rejected(), 1);
    }
}
