//! The admin HTTP API (JSON, plus Prometheus text at `/metrics`).
//!
//! Read-only: `GET /status`, `GET /mappings`, `GET /subscribers`, `GET /metrics`,
//! `GET /ha`, `GET /auth/sessions`. Mutating: `POST /reload`, `POST /ha/promote`,
//! `POST /ha/switchover`, `DELETE /auth/sessions/{id}`.
//! Who may call which is `admin_auth.rs`'s job (bearer tokens, a read-only one for `GET`).

use std::net::IpAddr;

use axum::extract::Path;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use pcp_server::{BackupStatus, Mapping, Origin, Time};
use serde::Serialize;

use crate::core::{Core, Pair, Shared};
use crate::daemon;

/// One mapping as the API shows it. Nonces never leave the daemon.
#[derive(Debug, Serialize)]
pub struct MappingView {
    /// `"map"`, `"peer"`, or `"natpmp"`.
    pub opcode: &'static str,
    /// The PCP client that asked.
    pub client: IpAddr,
    /// IANA protocol number.
    pub protocol: u8,
    /// Internal address.
    pub internal_address: IpAddr,
    /// Internal port.
    pub internal_port: u16,
    /// External address.
    pub external_address: IpAddr,
    /// External port.
    pub external_port: u16,
    /// Remote peer address (PEER).
    pub remote_address: Option<IpAddr>,
    /// Remote peer port (PEER).
    pub remote_port: Option<u16>,
    /// Seconds until it expires.
    pub lifetime_remaining: u32,
    /// Lifetime granted by the last request.
    pub lifetime: u32,
    /// Whether it is checkpointed.
    pub checkpointed: bool,
    /// Whether the client asked (option 192) in its last request.
    pub checkpoint_requested: bool,
    /// Why it is or is not checkpointed: a stable code.
    pub checkpoint_reason: &'static str,
    /// The same in words, with the rule name where a rule decided.
    pub checkpoint_detail: String,
    /// Subscriber charged.
    pub subscriber: String,
    /// FILTERs as `addr/len:port`.
    pub filters: Vec<String>,
    /// DESCRIPTION option text.
    pub description: Option<String>,
    /// Seconds since it was created.
    pub age: u64,
}

impl MappingView {
    /// The view of `m` at `now`.
    pub fn of(m: &Mapping, now: Time) -> MappingView {
        MappingView {
            opcode: match (m.origin, m.key.remote) {
                (Origin::NatPmp, _) => "natpmp",
                (Origin::Pcp, None) => "map",
                (Origin::Pcp, Some(_)) => "peer",
            },
            client: m.client,
            protocol: m.key.protocol,
            internal_address: m.key.internal,
            internal_port: m.key.internal_port,
            external_address: m.external.addr,
            external_port: m.external.port,
            remote_address: m.key.remote.map(|r| r.0),
            remote_port: m.key.remote.map(|r| r.1),
            lifetime_remaining: now.secs_until(m.expires),
            lifetime: m.lifetime,
            checkpointed: m.is_checkpointed(),
            checkpoint_requested: m.checkpoint_requested,
            checkpoint_reason: m.checkpoint.code(),
            checkpoint_detail: m.checkpoint.to_string(),
            subscriber: m.subscriber.to_string(),
            filters: m
                .filters
                .iter()
                .map(|f| format!("{}/{}:{}", f.remote_addr, f.prefix_len, f.remote_port))
                .collect(),
            description: m.description.as_deref().map(str::to_string),
            age: now.since(m.created).as_secs(),
        }
    }
}

/// One subscriber's use of its limits.
#[derive(Debug, Serialize)]
pub struct SubscriberView {
    /// Id (configured name or derived prefix).
    pub id: String,
    /// Tier.
    pub tier: String,
    /// Mappings held.
    pub mappings: u32,
    /// Tier's mapping quota.
    pub mapping_quota: u32,
    /// Checkpointed mappings held.
    pub checkpointed: u32,
    /// Tier's checkpoint quota.
    pub checkpoint_quota: u32,
    /// Checkpoint tokens available now.
    pub checkpoint_tokens: f64,
    /// Tier's checkpoint rate per second.
    pub checkpoint_rate: f64,
    /// Tier's checkpoint burst.
    pub checkpoint_burst: u32,
}

/// Daemon status.
#[derive(Debug, Serialize)]
pub struct StatusView {
    /// pcpd version.
    pub version: &'static str,
    /// Seconds since start.
    pub uptime: u64,
    /// Listen addresses.
    pub listen: Vec<String>,
    /// Data plane name.
    pub dataplane: &'static str,
    /// Mappings held.
    pub mappings: usize,
    /// Checkpointed mappings held.
    pub checkpointed: u64,
    /// `"none"`, `"not_ready"` or `"ready"`.
    pub backup: &'static str,
    /// Config file in force.
    pub config: Option<String>,
}

/// The router.
pub fn router(shared: Shared, auth: crate::admin_auth::Auth) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/mappings", get(mappings))
        .route("/subscribers", get(subscribers))
        .route("/metrics", get(metrics))
        .route("/reload", post(reload))
        .route("/auth/sessions", get(auth_sessions))
        .route("/auth/sessions/{id}", delete(auth_terminate))
        .route("/ha", get(ha))
        .route("/ha/promote", post(promote))
        .route("/ha/switchover", post(switchover))
        .with_state(shared)
        .layer(axum::middleware::from_fn_with_state(
            auth,
            crate::admin_auth::check,
        ))
}

async fn status(State(s): State<Shared>) -> Json<StatusView> {
    let core = s.lock();
    Json(StatusView {
        version: env!("CARGO_PKG_VERSION"),
        uptime: core.now().as_secs(),
        listen: core
            .config
            .daemon
            .listen
            .iter()
            .map(|a| a.to_string())
            .collect(),
        dataplane: core.dataplane.name(),
        mappings: core.server.mapping_count(),
        checkpointed: core.server.checkpointed_count(),
        backup: match core.server.backup_status() {
            BackupStatus::None => "none",
            BackupStatus::NotReady => "not_ready",
            BackupStatus::Ready => "ready",
        },
        config: core.config.path.as_ref().map(|p| p.display().to_string()),
    })
}

async fn mappings(State(s): State<Shared>) -> Json<Vec<MappingView>> {
    let mut v: Vec<MappingView> = {
        let core = s.lock();
        let now = core.now();
        core.server
            .mappings()
            .map(|m| MappingView::of(&m, now))
            .collect()
    };
    v.sort_by_key(|m| {
        (
            m.internal_address,
            m.protocol,
            m.internal_port,
            m.remote_address,
            m.remote_port,
        )
    });
    Json(v)
}

async fn subscribers(State(s): State<Shared>) -> Json<Vec<SubscriberView>> {
    let core = s.lock();
    let now = core.now();
    let mut v: Vec<SubscriberView> = core
        .server
        .subscribers()
        .map(|(id, st, tier)| SubscriberView {
            id: id.to_string(),
            tier: st.tier.to_string(),
            mappings: st.mappings,
            mapping_quota: tier.mapping_quota,
            checkpointed: st.checkpointed,
            checkpoint_quota: tier.checkpoint_quota,
            checkpoint_tokens: st
                .bucket
                .tokens(tier.checkpoint_rate, tier.checkpoint_burst, now),
            checkpoint_rate: tier.checkpoint_rate,
            checkpoint_burst: tier.checkpoint_burst,
        })
        .collect();
    v.sort_by(|a, b| a.id.cmp(&b.id));
    Json(v)
}

async fn metrics(State(s): State<Shared>) -> impl IntoResponse {
    // Not nested: the core's lock is never taken while holding the gate's.
    let auth = s.lock().auth.clone();
    let auth = auth.and_then(|a| {
        let g = crate::auth::lock(&a);
        // Once authentication was on, its counters stay (a reload may turn it off).
        (a.on() || g.stats.established > 0 || g.gate.stats().pa_messages() > 0).then(|| {
            let mut t = String::new();
            crate::auth::render_metrics(&mut t, &g);
            t
        })
    });
    let text = {
        let core = s.lock();
        let pair = s.lock_pair();
        let mut text = crate::metrics::render(&core, pair.as_deref());
        if let Some(a) = auth {
            text.push_str(&a);
        }
        text
    };
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

async fn reload(State(s): State<Shared>) -> impl IntoResponse {
    match daemon::reload(&s) {
        Ok(msg) => (
            StatusCode::OK,
            Json(serde_json::json!({ "ok": true, "message": msg })),
        ),
        Err(msg) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(serde_json::json!({ "ok": false, "error": msg })),
        ),
    }
}

/// `GET /auth/sessions`: the PA sessions (RFC 7652), oldest first.
async fn auth_sessions(State(s): State<Shared>) -> Json<Vec<crate::auth::SessionView>> {
    let auth = s.lock().auth.clone();
    Json(
        auth.map(|a| crate::auth::lock(&a).session_views())
            .unwrap_or_default(),
    )
}

/// `DELETE /auth/sessions/{id}`: terminate a PA session; the client gets
/// SESSION_TERMINATED (RFC 7652 §3.3, retransmitted until it answers) and its tagged
/// requests are no longer served.
async fn auth_terminate(State(s): State<Shared>, Path(id): Path<String>) -> impl IntoResponse {
    let refuse = |status, error: String| {
        (
            status,
            Json(serde_json::json!({ "ok": false, "error": error })),
        )
    };
    let Ok(id) = id.trim().parse::<u32>() else {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!("{id:?} is not a session ID (a decimal number, see GET /auth/sessions)"),
        );
    };
    let Some(auth) = s.lock().auth.clone() else {
        return refuse(StatusCode::NOT_FOUND, format!("no PA session {id}"));
    };
    let info = {
        let mut a = crate::auth::lock(&auth);
        let now = a.now();
        let info = a.gate.server.session(id);
        if info.is_some() {
            a.terminate(now, id, "admin");
        }
        info
    };
    crate::auth::flush(&auth);
    match info {
        None => refuse(StatusCode::NOT_FOUND, format!("no PA session {id}")),
        Some(i) => {
            let who = i.identity.as_deref().unwrap_or("not authenticated yet");
            tracing::info!(session_id = id, identity = who, client = %i.client, "PA session terminated by the operator");
            (
                StatusCode::OK,
                Json(serde_json::json!({
                    "ok": true,
                    "message": format!("session {id} ({who}, {}): SESSION_TERMINATED sent", i.client),
                })),
            )
        }
    }
}

/// Pair-mode status.
#[derive(Debug, Serialize)]
pub struct HaView {
    /// Whether pair mode is configured.
    pub enabled: bool,
    /// `"active"`, `"promoting"` (promoted, the core not yet serving), `"backup"`,
    /// `"joining"`, `"draining"`, or `"standalone"`.
    pub role: &'static str,
    /// Current term.
    pub term: u64,
    /// Whether the peer was heard within the detection time.
    pub peer_connected: bool,
    /// Active: the backup holds a complete copy. Backup: this node does.
    pub ready: bool,
    /// Replication lag in records.
    pub lag: u64,
    /// Replies waiting for the backup's acknowledgement.
    pub held_responses: usize,
    /// Replies released after an acknowledgement, since start.
    pub released_responses: u64,
    /// Replies that went out without 192 because the backup was too slow.
    pub ack_timeouts: u64,
    /// Checkpointed mappings held for a takeover (backup).
    pub stored: usize,
    /// PCP authentication sessions replicated: held for a takeover (backup), kept
    /// for the backup (active).
    pub sessions: usize,
    /// What the server core is told about the backup: `none`, `not_ready`, `ready`.
    pub backup_status: &'static str,
    /// Mappings adopted at the last takeover.
    pub adopted: usize,
    /// Backup: replicated changes not yet applied to the standby core (a takeover
    /// applies them first).
    pub standby_backlog: usize,
    /// The replication link is authenticated and encrypted (`[ha] key_file`).
    pub link_keyed: bool,
    /// Replication frames refused before the HA node saw them, by reason.
    pub frames_rejected: crate::core::LinkRejects,
    /// Checkpointed mappings not adopted at the last takeover (not installable here).
    pub adopt_failures: usize,
    /// Hosts that lost state at the last takeover, by reason (epoch reset, ANNOUNCE).
    pub lost_hosts: crate::core::LostHosts,
    /// Promotions of this node (takeovers, switchovers, promote), since start.
    pub promotions: u64,
    /// Step-downs of this node, since start.
    pub demotions: u64,
}

/// The pair-mode status of `core` (and its pair state, locked after the core).
pub fn ha_view(core: &crate::core::Core, pair: Option<&crate::core::Pair>) -> HaView {
    let backup_status = match core.backup_status() {
        BackupStatus::None => "none",
        BackupStatus::NotReady => "not_ready",
        BackupStatus::Ready => "ready",
    };
    match pair {
        None => HaView {
            enabled: false,
            role: "standalone",
            term: 0,
            peer_connected: false,
            ready: false,
            lag: 0,
            held_responses: 0,
            released_responses: 0,
            ack_timeouts: 0,
            stored: 0,
            sessions: 0,
            backup_status,
            adopted: 0,
            standby_backlog: 0,
            link_keyed: false,
            frames_rejected: crate::core::LinkRejects::default(),
            adopt_failures: 0,
            lost_hosts: crate::core::LostHosts::default(),
            promotions: 0,
            demotions: 0,
        },
        Some(p) => {
            let st = p.node.status(p.now());
            HaView {
                enabled: true,
                // Between the HA node's promotion and the core carrying it out (a
                // takeover, epoch setup) the node does not answer yet.
                role: if st.role == pcp_ha::Role::Active && !core.serving() {
                    "promoting"
                } else {
                    st.role.name()
                },
                term: st.term,
                peer_connected: st.peer_connected,
                ready: st.ready,
                lag: st.lag,
                held_responses: p.held.len(),
                released_responses: p.released,
                ack_timeouts: p.held.timed_out(),
                stored: st.stored,
                sessions: p.node.session_count(),
                backup_status,
                adopted: p.adopted,
                standby_backlog: p.backlog(),
                link_keyed: p.link.is_some(),
                frames_rejected: p.rejected,
                adopt_failures: p.adopt_failures,
                lost_hosts: p.lost_hosts,
                promotions: p.promotions,
                demotions: p.demotions,
            }
        }
    }
}

async fn ha(State(s): State<Shared>) -> Json<HaView> {
    let core = s.lock();
    let pair = s.lock_pair();
    Json(ha_view(&core, pair.as_deref()))
}

/// Runs an operator command on the pair state.
fn pair_command(s: &Shared, f: fn(&mut Pair) -> Result<(), String>) -> Result<(), String> {
    let r = {
        let mut p = s.lock_pair().ok_or("pcpd is not in pair mode")?;
        let r = f(&mut p);
        s.after_ha(&mut p);
        r
    };
    s.kick();
    r
}

async fn promote(State(s): State<Shared>) -> impl IntoResponse {
    command_result(pair_command(&s, Core::promote), "promoted")
}

async fn switchover(State(s): State<Shared>) -> impl IntoResponse {
    command_result(
        pair_command(&s, Core::switchover),
        "handing over to the backup",
    )
}

fn command_result(r: Result<(), String>, ok: &str) -> (StatusCode, Json<serde_json::Value>) {
    match r {
        Ok(()) => (
            StatusCode::OK,
            Json(serde_json::json!({ "ok": true, "message": ok })),
        ),
        Err(e) => (
            StatusCode::CONFLICT,
            Json(serde_json::json!({ "ok": false, "error": e })),
        ),
    }
}
