//! Prometheus text exposition of the core's counters. The core keeps plain integers
//! (it is single-threaded and must not depend on a metrics library); rendering them
//! in the text format is a few lines, so no registry crate sits in between.

use std::fmt::Write;
use std::time::Duration;

use crate::core::{Core, Pair};

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.1, 1.0,
];

/// A latency histogram with fixed buckets.
#[derive(Debug, Clone, Default)]
pub struct Latency {
    counts: [u64; BUCKETS.len()],
    over: u64,
    sum: f64,
}

impl Latency {
    /// Records one request.
    pub fn record(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        self.sum += s;
        match BUCKETS.iter().position(|b| s <= *b) {
            Some(i) => self.counts[i] += 1,
            None => self.over += 1,
        }
    }

    /// Adds another histogram's counts (replies released by the replication thread).
    pub fn merge(&mut self, other: &Latency) {
        for (a, b) in self.counts.iter_mut().zip(other.counts) {
            *a += b;
        }
        self.over += other.over;
        self.sum += other.sum;
    }

    fn count(&self) -> u64 {
        self.counts.iter().sum::<u64>() + self.over
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Renders every metric (`pair`: the pair state, locked after the core).
pub fn render(core: &Core, pair: Option<&Pair>) -> String {
    let mut out = String::with_capacity(4096);
    let stats = core.server.stats();

    header(
        &mut out,
        "pcp_requests_total",
        "counter",
        "Requests answered, by kind and result code.",
    );
    for (kind, code, n) in stats.answered_counts() {
        let _ = writeln!(
            out,
            "pcp_requests_total{{kind=\"{}\",result=\"{}\"}} {n}",
            kind.label(),
            code.name()
        );
    }
    header(
        &mut out,
        "pcp_dropped_total",
        "counter",
        "Datagrams dropped without an answer.",
    );
    let _ = writeln!(out, "pcp_dropped_total {}", stats.dropped);
    header(
        &mut out,
        "pcp_rate_limited_total",
        "counter",
        "Datagrams dropped by the per-host request-rate limit ([limits]).",
    );
    let _ = writeln!(out, "pcp_rate_limited_total {}", stats.rate_limited);
    let fp = core.server.footprint();
    header(
        &mut out,
        "pcp_rate_limit_hosts",
        "gauge",
        "Hosts whose request-rate buckets are tracked.",
    );
    let _ = writeln!(out, "pcp_rate_limit_hosts {}", fp.guard.hosts);
    header(
        &mut out,
        "pcpd_acl_rejected_total",
        "counter",
        "Datagrams from sources outside a listen address's access list ([acl]).",
    );
    for acl in &core.acls {
        let _ = writeln!(
            out,
            "pcpd_acl_rejected_total{{listen=\"{}\"}} {}",
            acl.listen,
            acl.rejected()
        );
    }

    header(
        &mut out,
        "pcp_checkpoint_decisions_total",
        "counter",
        "Checkpoint decisions made on MAP/PEER/NAT-PMP requests, by reason.",
    );
    for (reason, n) in stats.decision_counts() {
        let _ = writeln!(
            out,
            "pcp_checkpoint_decisions_total{{reason=\"{reason}\"}} {n}"
        );
    }

    header(&mut out, "pcp_mappings", "gauge", "Mappings held.");
    let _ = writeln!(out, "pcp_mappings {}", core.server.mapping_count());
    header(
        &mut out,
        "pcp_checkpointed_mappings",
        "gauge",
        "Checkpointed mappings held.",
    );
    let _ = writeln!(
        out,
        "pcp_checkpointed_mappings {}",
        core.server.checkpointed_count()
    );
    header(
        &mut out,
        "pcp_checkpoint_capacity",
        "gauge",
        "Checkpointed mappings the node may hold.",
    );
    let _ = writeln!(
        out,
        "pcp_checkpoint_capacity {}",
        core.server.config().checkpoint.capacity
    );
    header(
        &mut out,
        "pcp_subscribers",
        "gauge",
        "Subscribers holding mappings.",
    );
    let _ = writeln!(out, "pcp_subscribers {}", core.server.subscribers().count());
    header(
        &mut out,
        "pcp_expired_total",
        "counter",
        "Mappings removed at the end of their lifetime.",
    );
    let _ = writeln!(out, "pcp_expired_total {}", stats.expired);
    header(
        &mut out,
        "pcp_dataplane_entries",
        "gauge",
        "Entries installed in the data plane.",
    );
    let _ = writeln!(out, "pcp_dataplane_entries {}", core.dataplane.len());
    header(
        &mut out,
        "pcp_dataplane_failures_total",
        "counter",
        "Data plane batches that failed.",
    );
    let _ = writeln!(
        out,
        "pcp_dataplane_failures_total {}",
        core.dataplane_failures
    );

    header(
        &mut out,
        "pcp_announces_total",
        "counter",
        "Unsolicited unicast ANNOUNCEs (to hosts that lost state at a takeover; tagged start-up copies for PA sessions), by outcome.",
    );
    let a = core.announces;
    for (outcome, n) in [
        ("plain", a.plain),
        ("tagged", a.tagged),
        ("failed", a.failed),
    ] {
        let _ = writeln!(out, "pcp_announces_total{{outcome=\"{outcome}\"}} {n}");
    }

    let ha = crate::admin::ha_view(core, pair);
    if ha.enabled {
        header(
            &mut out,
            "pcp_ha_active",
            "gauge",
            "1 when this node serves as the active.",
        );
        let _ = writeln!(out, "pcp_ha_active {}", u8::from(ha.role == "active"));
        header(
            &mut out,
            "pcp_ha_role",
            "gauge",
            "1 for the role this node is in (as GET /ha's role), 0 for the others.",
        );
        for role in ["joining", "active", "promoting", "draining", "backup"] {
            let _ = writeln!(
                out,
                "pcp_ha_role{{role=\"{role}\"}} {}",
                u8::from(ha.role == role)
            );
        }
        header(
            &mut out,
            "pcp_ha_backup_status",
            "gauge",
            "1 for what the server core is told about the backup (GET /ha's backup_status).",
        );
        for status in ["ready", "not_ready", "none"] {
            let _ = writeln!(
                out,
                "pcp_ha_backup_status{{status=\"{status}\"}} {}",
                u8::from(ha.backup_status == status)
            );
        }
        header(&mut out, "pcp_ha_term", "gauge", "Current HA term.");
        let _ = writeln!(out, "pcp_ha_term {}", ha.term);
        header(
            &mut out,
            "pcp_ha_peer_connected",
            "gauge",
            "1 when the peer is heard.",
        );
        let _ = writeln!(out, "pcp_ha_peer_connected {}", u8::from(ha.peer_connected));
        header(
            &mut out,
            "pcp_ha_ready",
            "gauge",
            "1 when the backup holds a complete copy.",
        );
        let _ = writeln!(out, "pcp_ha_ready {}", u8::from(ha.ready));
        header(
            &mut out,
            "pcp_ha_lag_records",
            "gauge",
            "Records not yet acknowledged or applied.",
        );
        let _ = writeln!(out, "pcp_ha_lag_records {}", ha.lag);
        header(
            &mut out,
            "pcp_ha_held_responses",
            "gauge",
            "Replies waiting for the backup.",
        );
        let _ = writeln!(out, "pcp_ha_held_responses {}", ha.held_responses);
        header(
            &mut out,
            "pcp_ha_released_total",
            "counter",
            "Held replies released after an acknowledgement.",
        );
        let _ = writeln!(out, "pcp_ha_released_total {}", ha.released_responses);
        header(
            &mut out,
            "pcp_ha_ack_timeouts_total",
            "counter",
            "Held replies sent without 192 after the wait ran out.",
        );
        let _ = writeln!(out, "pcp_ha_ack_timeouts_total {}", ha.ack_timeouts);
        header(
            &mut out,
            "pcp_ha_frames_rejected_total",
            "counter",
            "Replication frames dropped by the link layer ([ha] key_file), by reason.",
        );
        let r = ha.frames_rejected;
        for (reason, n) in [
            ("auth", r.auth),
            ("replay", r.replay),
            ("unkeyed", r.unkeyed),
            ("keyed", r.keyed),
        ] {
            let _ = writeln!(
                out,
                "pcp_ha_frames_rejected_total{{reason=\"{reason}\"}} {n}"
            );
        }
        header(
            &mut out,
            "pcp_ha_stored_mappings",
            "gauge",
            "Checkpointed mappings held for a takeover.",
        );
        let _ = writeln!(out, "pcp_ha_stored_mappings {}", ha.stored);
        header(
            &mut out,
            "pcp_ha_sessions",
            "gauge",
            "PCP authentication sessions replicated (held for a takeover, or kept for the backup).",
        );
        let _ = writeln!(out, "pcp_ha_sessions {}", ha.sessions);
        header(
            &mut out,
            "pcp_ha_link_keyed",
            "gauge",
            "1 when the replication link is authenticated and encrypted ([ha] key_file).",
        );
        let _ = writeln!(out, "pcp_ha_link_keyed {}", u8::from(ha.link_keyed));
        header(
            &mut out,
            "pcp_ha_standby_backlog_records",
            "gauge",
            "Backup: replicated changes not yet applied to the standby core.",
        );
        let _ = writeln!(out, "pcp_ha_standby_backlog_records {}", ha.standby_backlog);
        header(
            &mut out,
            "pcp_ha_adopted_mappings",
            "gauge",
            "Checkpointed mappings adopted at the last takeover.",
        );
        let _ = writeln!(out, "pcp_ha_adopted_mappings {}", ha.adopted);
        header(
            &mut out,
            "pcp_ha_adopt_failures",
            "gauge",
            "Checkpointed mappings that could not be installed at the last takeover.",
        );
        let _ = writeln!(out, "pcp_ha_adopt_failures {}", ha.adopt_failures);
        header(
            &mut out,
            "pcp_ha_lost_hosts",
            "gauge",
            "Hosts that lost state at the last takeover (epoch reset, ANNOUNCE), by reason.",
        );
        let l = ha.lost_hosts;
        for (reason, n) in [
            ("unprotected", l.unprotected),
            ("adopt_failed", l.adopt_failed),
            ("never_installed", l.never_installed),
        ] {
            let _ = writeln!(out, "pcp_ha_lost_hosts{{reason=\"{reason}\"}} {n}");
        }
        header(
            &mut out,
            "pcp_ha_promotions_total",
            "counter",
            "Promotions of this node (takeovers, switchovers, promote).",
        );
        let _ = writeln!(out, "pcp_ha_promotions_total {}", ha.promotions);
        header(
            &mut out,
            "pcp_ha_demotions_total",
            "counter",
            "Step-downs of this node (a newer active was heard).",
        );
        let _ = writeln!(out, "pcp_ha_demotions_total {}", ha.demotions);
    }

    let mut merged = core.latency.clone();
    if let Some(p) = pair {
        merged.merge(&p.latency);
    }
    let l = &merged;
    header(
        &mut out,
        "pcp_request_duration_seconds",
        "histogram",
        "Time from receiving a request to handing its answer to the socket.",
    );
    let mut cumulative = 0;
    for (b, n) in BUCKETS.iter().zip(l.counts.iter()) {
        cumulative += n;
        let _ = writeln!(
            out,
            "pcp_request_duration_seconds_bucket{{le=\"{b}\"}} {cumulative}"
        );
    }
    let _ = writeln!(
        out,
        "pcp_request_duration_seconds_bucket{{le=\"+Inf\"}} {}",
        l.count()
    );
    let _ = writeln!(out, "pcp_request_duration_seconds_sum {}", l.sum);
    let _ = writeln!(out, "pcp_request_duration_seconds_count {}", l.count());
    out
}
