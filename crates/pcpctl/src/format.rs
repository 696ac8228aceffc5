//! Human-readable renderings of the admin API's answers.

use std::fmt::Write;
use std::net::{IpAddr, SocketAddr};

use crate::api::{AuthSession, Ha, Mapping, Status, Subscriber};

/// A plain text table: a header row and left-aligned columns two spaces apart.
struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: &[&str]) -> Table {
        Table {
            rows: vec![header.iter().map(|h| h.to_string()).collect()],
        }
    }

    fn push(&mut self, row: Vec<String>) {
        self.rows.push(row);
    }

    fn render(&self) -> String {
        let cols = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..cols)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|s| s.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                if c + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    let _ = write!(line, "{cell:<w$}  ", w = widths[c]);
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// The name of an IANA protocol number, or the number.
pub fn protocol_name(p: u8) -> String {
    match p {
        0 => "all".into(),
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        33 => "dccp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        n => n.to_string(),
    }
}

/// Seconds as `45s`, `12m05s`, `3h04m05s` or `2d03h04m`.
pub fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d{h:02}h{m:02}m")
    } else if h > 0 {
        format!("{h}h{m:02}m{s:02}s")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

fn endpoint(addr: IpAddr, port: u16) -> String {
    SocketAddr::new(addr, port).to_string()
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.into()
}

/// The mapping table.
pub fn mappings(list: &[Mapping]) -> String {
    if list.is_empty() {
        return "no mappings\n".into();
    }
    let mut t = Table::new(&[
        "OPCODE",
        "INTERNAL",
        "EXTERNAL",
        "REMOTE",
        "PROTO",
        "LIFETIME",
        "CHECKPOINTED",
        "REASON",
        "SUBSCRIBER",
        "DETAIL",
    ]);
    for m in list {
        let remote = match (m.remote_address, m.remote_port) {
            (Some(a), Some(p)) => endpoint(a, p),
            _ => "-".into(),
        };
        t.push(vec![
            m.opcode.clone(),
            endpoint(m.internal_address, m.internal_port),
            endpoint(m.external_address, m.external_port),
            remote,
            protocol_name(m.protocol),
            duration(m.lifetime_remaining.into()),
            yes_no(m.checkpointed),
            m.checkpoint_reason.clone(),
            m.subscriber.clone(),
            m.checkpoint_detail.clone(),
        ]);
    }
    let mut out = t.render();
    let checkpointed = list.iter().filter(|m| m.checkpointed).count();
    let _ = writeln!(
        out,
        "{} mapping{}, {checkpointed} checkpointed",
        list.len(),
        if list.len() == 1 { "" } else { "s" }
    );
    out
}

/// The subscriber table.
pub fn subscribers(list: &[Subscriber]) -> String {
    if list.is_empty() {
        return "no subscribers\n".into();
    }
    let mut t = Table::new(&["ID", "TIER", "MAPPINGS", "CHECKPOINTED", "TOKENS"]);
    for s in list {
        let tokens = match s.checkpoint_burst {
            Some(b) => format!("{:.1}/{b}", s.checkpoint_tokens),
            None => format!("{:.1}", s.checkpoint_tokens),
        };
        t.push(vec![
            s.id.clone(),
            s.tier.clone(),
            format!("{}/{}", s.mappings, s.mapping_quota),
            format!("{}/{}", s.checkpointed, s.checkpoint_quota),
            tokens,
        ]);
    }
    t.render()
}

/// The status lines.
pub fn status(s: &Status) -> String {
    let listen = if s.listen.is_empty() {
        "-".to_string()
    } else {
        s.listen.join(", ")
    };
    let rows = [
        ("version", s.version.clone()),
        ("uptime", duration(s.uptime)),
        ("listen", listen),
        ("dataplane", s.dataplane.clone()),
        ("mappings", s.mappings.to_string()),
        ("checkpointed", s.checkpointed.to_string()),
        ("backup", s.backup.clone()),
        (
            "config",
            s.config
                .clone()
                .unwrap_or_else(|| "(embedded defaults)".into()),
        ),
    ];
    let mut out = String::new();
    for (k, v) in rows {
        let _ = writeln!(out, "{:<13} {v}", format!("{k}:"));
    }
    out
}

/// `ha --serving`: `Ok(line)` when this pcpd answers PCP now, else `Err(role and term)`.
/// `promoting` counts as serving: the node has taken the role and answers within
/// moments, so the service address may start moving to it.
pub fn serving(h: &Ha) -> Result<String, String> {
    let what = if h.enabled {
        format!("role {} (term {})", h.role, h.term)
    } else {
        "standalone (pair mode not configured)".to_string()
    };
    if !h.enabled || h.role == "active" || h.role == "promoting" {
        Ok(format!("serving: {what}\n"))
    } else {
        Err(what)
    }
}

/// The pair-mode status lines.
pub fn ha(h: &Ha) -> String {
    if !h.enabled {
        return "role:          standalone (pair mode not configured)\n".into();
    }
    let rows = [
        ("role", h.role.clone()),
        ("term", h.term.to_string()),
        (
            "peer",
            if h.peer_connected {
                "connected"
            } else {
                "not heard"
            }
            .into(),
        ),
        (
            "ready",
            format!(
                "{} ({})",
                yes_no(h.ready),
                if h.role == "backup" {
                    "this node holds a complete copy"
                } else {
                    "the backup holds a complete copy"
                }
            ),
        ),
        ("lag", format!("{} records", h.lag)),
        ("stored", h.stored.to_string()),
        ("sessions", h.sessions.to_string()),
        ("held", h.held_responses.to_string()),
        ("released", h.released_responses.to_string()),
        ("ack timeouts", h.ack_timeouts.to_string()),
        ("backup", h.backup_status.clone()),
        (
            "adopted",
            format!(
                "{} (failed {}; hosts that lost state: unprotected {}, adopt failed {}, never installed {})",
                h.adopted,
                h.adopt_failures,
                h.lost_hosts.unprotected,
                h.lost_hosts.adopt_failed,
                h.lost_hosts.never_installed
            ),
        ),
        (
            "role changes",
            format!("{} promotions, {} demotions", h.promotions, h.demotions),
        ),
        (
            "link",
            format!(
                "{} (rejected: auth {}, replay {}, unkeyed {}, keyed {})",
                if h.link_keyed { "keyed" } else { "plain" },
                h.frames_rejected.auth,
                h.frames_rejected.replay,
                h.frames_rejected.unkeyed,
                h.frames_rejected.keyed
            ),
        ),
    ];
    let mut out = String::new();
    for (k, v) in rows {
        let _ = writeln!(out, "{:<14} {v}", format!("{k}:"));
    }
    out
}

/// The PA session table (`pcpctl auth sessions`): ages and times left relative to `now`
/// (Unix seconds).
pub fn auth_sessions(list: &[AuthSession], now: u64) -> String {
    if list.is_empty() {
        return "no PCP authentication sessions\n".into();
    }
    let mut t = Table::new(&[
        "SESSION",
        "IDENTITY",
        "CLIENT",
        "STATE",
        "AUTHENTICATED",
        "EXPIRES",
        "PA IN/OUT",
        "SEQ IN/OUT",
        "ACCEPTED",
        "REFUSED",
    ]);
    let opt = |v: Option<u32>| v.map_or("-".to_string(), |v| v.to_string());
    for s in list {
        let mut state = s.state.clone();
        if s.waiting_backend {
            state.push_str(" (AAA)");
        }
        t.push(vec![
            s.session_id.to_string(),
            s.identity.clone().unwrap_or_else(|| "-".into()),
            s.client.clone(),
            state,
            s.established_at.map_or("-".into(), |t| {
                format!("{} ago", duration(now.saturating_sub(t)))
            }),
            s.expires_in
                .map_or("-".into(), |e| format!("in {}", duration(e))),
            format!("{}/{}", s.pa_seq_in, s.pa_seq_out),
            format!("{}/{}", opt(s.seq_in), opt(s.seq_out)),
            s.accepted.to_string(),
            s.refused.to_string(),
        ]);
    }
    let mut out = t.render();
    let _ = writeln!(
        out,
        "{} session{}",
        list.len(),
        if list.len() == 1 { "" } else { "s" }
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping() -> Mapping {
        Mapping {
            opcode: "map".into(),
            client: "10.0.0.2".parse().unwrap(),
            protocol: 17,
            internal_address: "10.0.0.2".parse().unwrap(),
            internal_port: 5060,
            external_address: "2001:db8::1".parse().unwrap(),
            external_port: 40000,
            remote_address: None,
            remote_port: None,
            lifetime_remaining: 3725,
            checkpointed: true,
            checkpoint_reason: "forced".into(),
            checkpoint_detail: "forced by rule emergency-sip".into(),
            subscriber: "10.0.0.2/32".into(),
        }
    }

    #[test]
    fn durations() {
        assert_eq!(duration(0), "0s");
        assert_eq!(duration(59), "59s");
        assert_eq!(duration(65), "1m05s");
        assert_eq!(duration(3725), "1h02m05s");
        assert_eq!(duration(2 * 86_400 + 3 * 3600 + 4 * 60 + 5), "2d03h04m");
    }

    #[test]
    fn protocol_names() {
        assert_eq!(protocol_name(17), "udp");
        assert_eq!(protocol_name(6), "tcp");
        assert_eq!(protocol_name(99), "99");
    }

    #[test]
    fn mapping_table_has_every_column() {
        let text = mappings(&[mapping()]);
        let mut lines = text.lines();
        let header = lines.next().unwrap();
        for col in [
            "OPCODE",
            "INTERNAL",
            "EXTERNAL",
            "PROTO",
            "CHECKPOINTED",
            "REASON",
        ] {
            assert!(header.contains(col), "{header}");
        }
        let row = lines.next().unwrap();
        for cell in [
            "map",
            "10.0.0.2:5060",
            "[2001:db8::1]:40000",
            "udp",
            "1h02m05s",
            "yes",
            "forced",
            "forced by rule emergency-sip",
            "10.0.0.2/32",
        ] {
            assert!(row.contains(cell), "{cell} missing in {row}");
        }
        assert_eq!(lines.next().unwrap(), "1 mapping, 1 checkpointed");
        // Columns line up: each header starts where its cells start.
        assert_eq!(header.find("EXTERNAL"), row.find("[2001:db8::1]:40000"));
    }

    #[test]
    fn serving_only_while_answering_pcp() {
        let mut h = Ha {
            enabled: true,
            role: "active".into(),
            term: 3,
            ..Ha::default()
        };
        assert_eq!(serving(&h), Ok("serving: role active (term 3)\n".into()));
        h.role = "promoting".into();
        assert!(serving(&h).is_ok());
        for role in ["backup", "joining", "draining", "something-new"] {
            h.role = role.into();
            assert_eq!(serving(&h), Err(format!("role {role} (term 3)")));
        }
        h.enabled = false;
        h.role = "standalone".into();
        assert!(serving(&h).is_ok());
    }

    #[test]
    fn ha_lines() {
        let mut h = Ha {
            enabled: true,
            role: "active".into(),
            term: 3,
            peer_connected: true,
            ready: true,
            lag: 2,
            held_responses: 1,
            released_responses: 40,
            ack_timeouts: 0,
            stored: 0,
            sessions: 2,
            backup_status: "ready".into(),
            adopted: 7,
            link_keyed: true,
            frames_rejected: crate::api::FramesRejected {
                auth: 3,
                ..Default::default()
            },
            adopt_failures: 1,
            lost_hosts: crate::api::LostHosts {
                unprotected: 4,
                adopt_failed: 1,
                never_installed: 0,
            },
            promotions: 2,
            demotions: 1,
        };
        let text = ha(&h);
        for line in [
            "role:          active",
            "term:          3",
            "peer:          connected",
            "ready:         yes (the backup holds a complete copy)",
            "lag:           2 records",
            "sessions:      2",
            "held:          1",
            "released:      40",
            "link:          keyed (rejected: auth 3, replay 0, unkeyed 0, keyed 0)",
            "backup:        ready",
            "adopted:       7 (failed 1; hosts that lost state: unprotected 4, adopt failed 1, never installed 0)",
            "role changes:  2 promotions, 1 demotions",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in\n{text}"
            );
        }
        h.enabled = false;
        assert!(ha(&h).contains("standalone"));
    }

    #[test]
    fn empty_lists_say_so() {
        assert_eq!(mappings(&[]), "no mappings\n");
        assert_eq!(subscribers(&[]), "no subscribers\n");
    }

    #[test]
    fn subscriber_table() {
        let text = subscribers(&[Subscriber {
            id: "acme".into(),
            tier: "gold".into(),
            mappings: 3,
            mapping_quota: 1024,
            checkpointed: 1,
            checkpoint_quota: 256,
            checkpoint_tokens: 63.0,
            checkpoint_burst: Some(64),
        }]);
        let row = text.lines().nth(1).unwrap();
        for cell in ["acme", "gold", "3/1024", "1/256", "63.0/64"] {
            assert!(row.contains(cell), "{cell} missing in {row}");
        }
    }

    #[test]
    fn auth_session_table() {
        let json = r#"[{"session_id":3735928559,"identity":"alice","client":"192.0.2.1:5350","state":"established","created_at":1000,"established_at":1001,"expires_at":4601,"expires_in":3540,"pa_seq_in":4,"pa_seq_out":4,"seq_in":7,"seq_out":8,"accepted":8,"refused":2,"waiting_backend":false},
            {"session_id":7,"identity":null,"client":"192.0.2.2:5350","state":"authenticating","created_at":1060,"pa_seq_in":1,"pa_seq_out":1,"accepted":0,"refused":0,"waiting_backend":true}]"#;
        let list: Vec<AuthSession> = serde_json::from_str(json).unwrap();
        let out = auth_sessions(&list, 1061);
        let lines: Vec<&str> = out.lines().collect();
        assert!(
            lines[0].starts_with("SESSION ") && lines[0].ends_with("REFUSED"),
            "{out}"
        );
        assert!(
            lines[1].contains("3735928559") && lines[1].contains("alice"),
            "{out}"
        );
        assert!(
            lines[1].contains("1m00s ago") && lines[1].contains("in 59m00s"),
            "{out}"
        );
        assert!(
            lines[1].contains("7/8") && lines[1].ends_with("8         2"),
            "{out}"
        );
        assert!(
            lines[2].contains("authenticating (AAA)") && lines[2].contains("-/-"),
            "{out}"
        );
        assert_eq!(lines[3], "2 sessions");
        assert_eq!(auth_sessions(&[], 0), "no PCP authentication sessions\n");
    }
}
