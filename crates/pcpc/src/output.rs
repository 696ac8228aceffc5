//! What pcpc prints: human text by default, one JSON object per line with `--json`.

use pcp_client::core::{Event, Grant, Kind, LostReason, Version, hex, result_name};
use pcp_client::policy::{Decision, Flow, protocol_name};
use serde_json::{Value, json};

/// Prints one JSON value on a line.
pub fn json_line(v: &Value) {
    println!("{v}");
}

/// What the mapping is, for headers.
#[derive(Debug, Clone)]
pub struct Subject {
    /// MAP or PEER.
    pub kind: Kind,
    /// IANA protocol.
    pub protocol: u8,
    /// Internal port.
    pub internal_port: u16,
    /// The server.
    pub server: String,
}

fn version_name(v: Version) -> &'static str {
    match v {
        Version::Pcp => "PCP",
        Version::NatPmp => "NAT-PMP",
    }
}

/// The grant of a new mapping.
pub fn grant(json: bool, s: &Subject, g: &Grant, nonce: &[u8; 12]) {
    let opcode = match s.kind {
        Kind::Map => "map",
        Kind::Peer { .. } => "peer",
    };
    if json {
        let mut v = json!({
            "event": "granted",
            "opcode": opcode,
            "protocol": protocol_name(s.protocol),
            "internal_port": s.internal_port,
            "external": g.external.to_string(),
            "external_address": g.external.ip().to_string(),
            "external_port": g.external.port(),
            "lifetime": g.lifetime,
            "epoch": g.epoch,
            "checkpoint": g.checkpoint,
            "version": g.version,
            "nonce": hex(nonce),
            "server": s.server,
        });
        if let Kind::Peer { remote } = s.kind {
            v["remote"] = json!(remote.to_string());
        }
        json_line(&v);
        return;
    }
    let peer = match s.kind {
        Kind::Peer { remote } => format!(" to {remote}"),
        Kind::Map => String::new(),
    };
    println!(
        "{} {} internal port {}{} -> external {}",
        opcode.to_uppercase(),
        protocol_name(s.protocol),
        s.internal_port,
        peer,
        g.external
    );
    println!("  lifetime    {} s", g.lifetime);
    println!("  epoch       {}", g.epoch);
    println!("  checkpoint  {}", g.checkpoint);
    println!("  nonce       {}", hex(nonce));
    println!("  server      {} ({})", s.server, version_name(g.version));
}

/// One event, as a line of text (without the mapping's name).
pub fn event_text(e: &Event) -> String {
    let g = |g: &Grant| {
        format!(
            "external {}, lifetime {} s, epoch {}, checkpoint {}",
            g.external, g.lifetime, g.epoch, g.checkpoint
        )
    };
    match e {
        Event::Granted { grant, .. } => format!("granted: {}", g(grant)),
        Event::Renewed { grant, .. } => format!("renewed: {}", g(grant)),
        Event::ExternalChanged {
            previous, grant, ..
        } => format!("external address changed: {previous} -> {}", grant.external),
        Event::CheckpointChanged {
            previous, grant, ..
        } => format!("checkpoint changed: {previous} -> {}", grant.checkpoint),
        Event::Error {
            result, retry_in, ..
        } => format!(
            "server answered {} ({}); asking again in {} s",
            result_name(*result),
            pcp_client::result_hint(*result),
            retry_in.as_secs()
        ),
        Event::Lost { reason, .. } => match reason {
            LostReason::Refused(r) => format!(
                "lost: refused with {} ({})",
                result_name(*r),
                pcp_client::result_hint(*r)
            ),
            LostReason::NoResponse => "lost: no answer from the server".into(),
            LostReason::Expired => {
                "lost: expired before a renewal was answered; re-creating it".into()
            }
            LostReason::Unsupported => {
                "lost: the server speaks only NAT-PMP, which cannot make it".into()
            }
        },
        Event::Deleted { confirmed, .. } => {
            if *confirmed {
                "deleted".into()
            } else {
                "stopped renewing; the server did not confirm a delete (a PEER mapping cannot be deleted: it expires at the end of its lifetime)".into()
            }
        }
        Event::ServerStateLost {
            previous_epoch,
            epoch,
            ..
        } => format!(
            "server lost its state (epoch {previous_epoch} -> {epoch}); re-creating every mapping"
        ),
        Event::FellBackToNatPmp => "the server speaks only NAT-PMP: falling back to it".into(),
        Event::AnnounceReply { epoch, version } => {
            format!("server epoch {epoch} ({})", version_name(*version))
        }
        Event::AnnounceTimeout => "no answer to ANNOUNCE".into(),
        Event::Authenticated {
            session_id,
            lifetime,
            reauthentication,
        } => format!(
            "{} (PCP session {session_id}, lifetime {lifetime} s)",
            if *reauthentication {
                "re-authenticated"
            } else {
                "authenticated"
            }
        ),
        Event::AuthenticationFailed { failure } => {
            format!("authentication failed: {failure:?}")
        }
        Event::SessionEnded { reason } => {
            format!("PCP session ended ({reason:?}); authenticating again when needed")
        }
    }
}

/// One event, printed.
pub fn event(json: bool, label: &str, e: &Event) {
    if json {
        let mut v = serde_json::to_value(e).unwrap_or(Value::Null);
        if let Value::Object(m) = &mut v {
            m.insert("flow".into(), json!(label));
        }
        json_line(&v);
    } else {
        println!("{label}: {}", event_text(e));
    }
}

/// A policy decision.
pub fn decision(json: bool, flow: &Flow, d: &Decision) {
    if json {
        json_line(&json!({
            "flow": flow,
            "decision": d,
        }));
        return;
    }
    let what = if d.checkpoint {
        "CHECKPOINT"
    } else {
        "no checkpoint"
    };
    let port = flow
        .internal_port
        .map(|p| format!(" port {p}"))
        .unwrap_or_default();
    let proto = flow.protocol.map(protocol_name).unwrap_or_default();
    println!("{} {proto}{port}: {what}", flow.app);
    println!("  because {}", d.reason);
    for (name, action) in &d.overridden {
        println!("  overrides rule {name:?} ({})", action.as_str());
    }
}
