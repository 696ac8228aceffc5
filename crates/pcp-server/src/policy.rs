//! Network policy that overrides client signalling (RFC 7767 §5: "A network device can
//! always override the end user signaling"). Rules are evaluated in order; the first
//! whose every condition matches decides.

use std::net::IpAddr;
use std::sync::Arc;

use crate::config::{OpcodeName, PolicyRule, RuleAction};
use crate::subscriber::SubscriberId;

/// What the policy knows about a flow.
#[derive(Debug, Clone, Copy)]
pub struct Flow<'a> {
    /// Subscriber charged.
    pub subscriber: &'a SubscriberId,
    /// Its tier.
    pub tier: &'a str,
    /// The identity the request was authenticated as (RFC 7652), if any.
    pub identity: Option<&'a str>,
    /// MAP or PEER.
    pub opcode: OpcodeName,
    /// Internal address.
    pub internal: IpAddr,
    /// IANA protocol.
    pub protocol: u8,
    /// Internal port.
    pub internal_port: u16,
    /// Remote peer of a PEER.
    pub remote: Option<(IpAddr, u16)>,
}

/// A matched rule: its action and its name (the reason shown to operators).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// What to do.
    pub action: RuleAction,
    /// Which rule said so.
    pub rule: Arc<str>,
}

/// The ordered rule list.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: Vec<(Arc<str>, PolicyRule)>,
}

impl Policy {
    /// Compiles the configured rules.
    pub fn new(rules: &[PolicyRule]) -> Policy {
        Policy {
            rules: rules
                .iter()
                .map(|r| (Arc::from(r.name.as_str()), r.clone()))
                .collect(),
        }
    }

    /// The first rule matching `flow`, if any.
    pub fn evaluate(&self, flow: &Flow<'_>) -> Option<Verdict> {
        self.rules
            .iter()
            .find(|(_, r)| matches(r, flow))
            .map(|(name, r)| Verdict {
                action: r.action,
                rule: name.clone(),
            })
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether there are no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

fn any_or<T>(list: &[T], f: impl Fn(&T) -> bool) -> bool {
    list.is_empty() || list.iter().any(f)
}

fn matches(r: &PolicyRule, f: &Flow<'_>) -> bool {
    any_or(&r.tiers, |t| t == f.tier)
        && any_or(&r.subscribers, |s| match f.subscriber {
            SubscriberId::Named(n) => **n == **s,
            SubscriberId::Prefix(_) | SubscriberId::Identity(_) => f.subscriber.to_string() == *s,
        })
        && any_or(&r.identities, |i| f.identity == Some(i.as_str()))
        && any_or(&r.internal_prefixes, |p| p.contains(&f.internal))
        && any_or(&r.opcodes, |o| *o == f.opcode)
        && any_or(&r.protocols, |p| *p == f.protocol)
        && any_or(&r.internal_ports, |p| p.contains(f.internal_port))
        && any_or(&r.remote_ports, |p| {
            f.remote.is_some_and(|(_, port)| p.contains(port))
        })
        && any_or(&r.remote_prefixes, |p| {
            f.remote.is_some_and(|(addr, _)| p.contains(&addr))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, action: RuleAction) -> PolicyRule {
        PolicyRule {
            name: name.into(),
            action,
            tiers: vec![],
            subscribers: vec![],
            identities: vec![],
            internal_prefixes: vec![],
            opcodes: vec![],
            protocols: vec![],
            internal_ports: vec![],
            remote_ports: vec![],
            remote_prefixes: vec![],
        }
    }

    #[test]
    fn first_match_wins_and_conditions_combine() {
        let mut sip = rule("emergency-sip", RuleAction::Force);
        sip.protocols = vec![17];
        sip.internal_ports = vec!["5060-5061".parse().unwrap()];
        let mut bronze = rule("bronze-never", RuleAction::Deny);
        bronze.tiers = vec!["bronze".into()];
        let policy = Policy::new(&[sip, bronze]);
        let sub = SubscriberId::Named("x".into());
        let mut flow = Flow {
            subscriber: &sub,
            tier: "bronze",
            identity: None,
            opcode: OpcodeName::Map,
            internal: "10.0.0.1".parse().unwrap(),
            protocol: 17,
            internal_port: 5061,
            remote: None,
        };
        assert_eq!(
            policy.evaluate(&flow).unwrap().rule.as_ref(),
            "emergency-sip"
        );
        flow.protocol = 6;
        assert_eq!(policy.evaluate(&flow).unwrap().action, RuleAction::Deny);
        flow.tier = "gold";
        assert!(policy.evaluate(&flow).is_none());
    }

    #[test]
    fn remote_conditions_never_match_a_map() {
        let mut r = rule("to-cdn", RuleAction::Force);
        r.remote_prefixes = vec!["198.51.100.0/24".parse().unwrap()];
        let policy = Policy::new(&[r]);
        let sub = SubscriberId::Named("x".into());
        let mut flow = Flow {
            subscriber: &sub,
            tier: "default",
            identity: None,
            opcode: OpcodeName::Map,
            internal: "10.0.0.1".parse().unwrap(),
            protocol: 6,
            internal_port: 443,
            remote: None,
        };
        assert!(policy.evaluate(&flow).is_none());
        flow.opcode = OpcodeName::Peer;
        flow.remote = Some(("198.51.100.9".parse().unwrap(), 443));
        assert!(policy.evaluate(&flow).is_some());
    }
}
