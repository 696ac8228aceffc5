//! Sockets, timers and signals around the core.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pcp_dataplane::memory::MemoryDataPlane;
use pcp_server::{Reply, Server};
use tokio::net::UdpSocket;

use crate::acl::{Reject, SocketAcl};
use crate::config::{Config, DataPlaneKind, HaRole};
use crate::core::{Core, Pair, Shared};
use pcp_ha::{HaConfig, HaNode};

/// Why pcpd could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listen or admin address could not be bound.
    #[error("cannot bind {what} {addr}: {source}")]
    Bind {
        /// "PCP listen address" or "admin address".
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The server core refused the configuration.
    #[error("configuration: {0}")]
    Config(#[from] pcp_server::ConfigError),
    /// The admin API's tokens are missing or unusable.
    #[error("admin API: {0}")]
    Auth(#[from] crate::auth::AuthError),
}

/// The longest the expiry task sleeps, so that a new earlier expiry is never missed by
/// more than this.
const EXPIRY_TICK: Duration = Duration::from_millis(250);

/// Runs pcpd until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), StartError> {
    // Signal handlers first: from the moment anything answers, SIGHUP reloads and
    // SIGTERM stops cleanly instead of killing the process.
    let signals = Signals::install();
    let origin = Instant::now();
    let seed = rand::random::<u64>();
    let mut server = Server::new(config.server.clone(), pcp_server::Time(0), seed)?;
    let dataplane = match config.daemon.dataplane {
        DataPlaneKind::Memory => Box::new(MemoryDataPlane::new()),
    };
    // Tokens before anything listens: an API that would be open beyond this host
    // refuses to start.
    let auth = crate::auth::Auth::load(
        config.daemon.admin,
        config.daemon.admin_token_file.as_deref(),
        config.daemon.admin_read_token_file.as_deref(),
    )?;
    for l in &config.acl.listen {
        if !config.daemon.listen.contains(&l.address) {
            tracing::warn!(address = %l.address, "[[acl.listen]] names an address pcpd does not listen on");
        }
    }
    let acls: Vec<Arc<SocketAcl>> = config
        .daemon
        .listen
        .iter()
        .map(|a| Arc::new(SocketAcl::new(&config.acl, *a)))
        .collect();
    let mut sockets = Vec::new();
    for addr in &config.daemon.listen {
        let sock = UdpSocket::bind(addr)
            .await
            .map_err(|source| StartError::Bind {
                what: "PCP listen address",
                addr: *addr,
                source,
            })?;
        if let Err(e) =
            socket2::SockRef::from(&sock).set_recv_buffer_size(config.daemon.recv_buffer)
        {
            tracing::warn!(error = %e, "cannot set the PCP socket's receive buffer");
        }
        sockets.push(Arc::new(sock));
    }
    let admin_addr = config.daemon.admin;
    let admin = tokio::net::TcpListener::bind(admin_addr)
        .await
        .map_err(|source| StartError::Bind {
            what: "admin address",
            addr: admin_addr,
            source,
        })?;
    let listen: Vec<String> = sockets
        .iter()
        .filter_map(|s| s.local_addr().ok())
        .map(|a| a.to_string())
        .collect();
    let ha = match &config.ha {
        Some(ha) => {
            let sock = UdpSocket::bind(ha.listen)
                .await
                .map_err(|source| StartError::Bind {
                    what: "HA listen address",
                    addr: ha.listen,
                    source,
                })?;
            let cfg = HaConfig {
                heartbeat: Duration::from_millis(ha.heartbeat_ms),
                detection: Duration::from_millis(ha.detection_ms),
                join: Duration::from_millis(ha.detection_ms + ha.detection_ms / 4),
                // The backup keeps its core and data plane in step: a takeover installs
                // nothing (issue: failover within a second with a million mappings).
                standby: true,
                ..HaConfig::default()
            };
            let mut node = HaNode::new(
                cfg,
                ha.role == HaRole::Active,
                rand::random::<u64>() | 1,
                pcp_server::Time(0),
            );
            node.set_epoch_base(server.epochs().base());
            Some((
                Arc::new(sock),
                Pair {
                    node,
                    peer: ha.peer,
                    held: Vec::new(),
                    ack_timeout: Duration::from_millis(ha.ack_timeout_ms),
                    timeouts: 0,
                    released: 0,
                    adopted: 0,
                    adopt_failures: 0,
                    pending: Vec::new(),
                },
            ))
        }
        None => None,
    };
    let (ha_sock, pair) = match ha {
        Some((s, p)) => (Some(s), Some(p)),
        None => (None, None),
    };
    let mut core = Core::new(server, dataplane, config, origin, seed, pair);
    core.sockets = sockets.clone();
    core.acls = acls.clone();
    let shared = Shared::new(core);

    for (i, (sock, acl)) in sockets.iter().zip(&acls).enumerate() {
        tracing::info!(
            listen = %acl.listen,
            allow = ?acl.allowed().iter().map(ToString::to_string).collect::<Vec<_>>(),
            reject = ?acl.reject,
            "client access list"
        );
        tokio::spawn(serve_socket(sock.clone(), i, shared.clone(), acl.clone()));
    }
    tokio::spawn(expiry(shared.clone()));
    if let Some(sock) = ha_sock {
        tokio::spawn(replicate(sock, shared.clone()));
    }
    if shared.lock().config.daemon.announce_multicast {
        tokio::spawn(announce_start(sockets.clone(), shared.clone()));
    }
    let app = crate::admin::router(shared.clone(), auth.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(admin, app).await {
            tracing::error!(error = %e, "admin API stopped");
        }
    });
    tracing::info!(
        listen = ?listen,
        admin = %admin_addr,
        admin_auth = if auth.required() { "bearer token" } else { "none (loopback)" },
        dataplane = shared.lock().dataplane.name(),
        "pcpd started"
    );
    signals.run(shared).await;
    tracing::info!("pcpd stopping");
    Ok(())
}

/// Receives, serves and answers datagrams on one socket.
async fn serve_socket(sock: Arc<UdpSocket>, index: usize, shared: Shared, acl: Arc<SocketAcl>) {
    let mut buf = vec![0u8; 2048];
    let mut reply = vec![0u8; pcp_proto::MAX_MESSAGE_LEN];
    loop {
        let (n, src) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                // ICMP errors from earlier sends surface here on some systems; keep going.
                tracing::debug!(error = %e, "recv_from");
                continue;
            }
        };
        let received = Instant::now();
        if !acl.admits(src.ip()) {
            // Not a client of this address: counted, and dropped before the lock, or
            // refused by the core (rate-limited like any answer).
            if acl.reject == Reject::Drop {
                continue;
            }
            let answer = {
                let mut core = shared.lock();
                if !core.serves() {
                    continue;
                }
                let now = core.now();
                core.server.refuse(&buf[..n], src, now, &mut reply)
            };
            if let Reply::Send(len) = answer {
                let _ = sock.try_send_to(&reply[..len], src);
            }
            continue;
        }
        // One lock per request: serve, and count the latency up to the reply being
        // ready (sending is a non-blocking syscall right after).
        let answer = {
            let mut core = shared.lock();
            let answer = core.handle(&buf[..n], src, index, received, &mut reply);
            if matches!(answer, Reply::Send(_)) {
                core.latency.record(received.elapsed());
            }
            answer
        };
        if shared.has_pair() {
            // Records may have been queued for the backup: send them now.
            shared.kick();
        }
        // Held replies (waiting for the backup) are sent by the replication task.
        if let Reply::Send(len) = answer {
            let sent = match sock.try_send_to(&reply[..len], src) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    sock.send_to(&reply[..len], src).await.map(|_| ())
                }
                other => other.map(|_| ()),
            };
            if let Err(e) = sent {
                tracing::debug!(error = %e, %src, "send_to");
            }
        }
    }
}

/// Runs the replication link: frames from the peer, timers, and sending whatever the
/// HA node has to say (woken at once when requests queue records).
async fn replicate(sock: Arc<UdpSocket>, shared: Shared) {
    let mut buf = vec![0u8; 65536];
    let mut out = Vec::new();
    loop {
        // Frames that queued while the core was busy (a long takeover or step-down)
        // come before timers: silence is judged on what the peer actually sent.
        while let Ok((n, from)) = sock.try_recv_from(&mut buf) {
            if shared.lock().ha_peer().is_some_and(|p| p.ip() == from.ip()) {
                shared.lock().ha_frame(&buf[..n]);
            }
        }
        let wake = shared
            .lock()
            .ha_tick()
            .unwrap_or_else(|| Instant::now() + Duration::from_millis(100));
        let peer = shared.lock().ha_transmit(&mut out);
        if let Some(peer) = peer {
            for frame in out.drain(..) {
                if let Err(e) = sock.send_to(&frame, peer).await {
                    tracing::debug!(error = %e, %peer, "replication send");
                }
            }
        }
        tokio::select! {
            r = sock.recv_from(&mut buf) => match r {
                Ok((n, from)) => {
                    if peer.is_some_and(|p| p.ip() == from.ip()) {
                        shared.lock().ha_frame(&buf[..n]);
                    } else {
                        tracing::warn!(%from, "replication frame from an unknown address dropped");
                    }
                }
                Err(e) => tracing::debug!(error = %e, "replication recv"),
            },
            _ = tokio::time::sleep_until(wake.into()) => {}
            _ = shared.1.notified() => {}
        }
    }
}

/// Removes mappings as their lifetimes end.
async fn expiry(shared: Shared) {
    loop {
        let wake = {
            let mut core = shared.lock();
            core.expire();
            let next = core.server.next_timeout().map(|t| core.instant_of(t));
            let cap = Instant::now() + EXPIRY_TICK;
            next.map_or(cap, |n| n.min(cap))
        };
        tokio::time::sleep_until(wake.into()).await;
    }
}

/// Multicasts the start-up ANNOUNCE burst: every client's state was just lost.
async fn announce_start(sockets: Vec<Arc<UdpSocket>>, shared: Shared) {
    let mut schedule = {
        let core = shared.lock();
        pcp_server::announce::AnnounceSchedule::start(core.now())
    };
    let mut buf = [0u8; pcp_proto::HEADER_LEN];
    while let Some(due) = schedule.next_due() {
        let at = shared.lock().instant_of(due);
        tokio::time::sleep_until(at.into()).await;
        let n = {
            let core = shared.lock();
            schedule.poll(core.now());
            core.server.announce(None, core.now(), &mut buf)
        };
        for sock in &sockets {
            let to: SocketAddr = match sock.local_addr() {
                Ok(SocketAddr::V4(_)) => SocketAddr::from(([224, 0, 0, 1], pcp_proto::CLIENT_PORT)),
                Ok(SocketAddr::V6(_)) => SocketAddr::from((
                    std::net::Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1),
                    pcp_proto::CLIENT_PORT,
                )),
                Err(_) => continue,
            };
            if let Err(e) = sock.send_to(&buf[..n], to).await {
                tracing::warn!(error = %e, %to, "unsolicited ANNOUNCE");
            }
        }
    }
}

/// The signals pcpd reacts to.
struct Signals(
    Option<(
        tokio::signal::unix::Signal,
        tokio::signal::unix::Signal,
        tokio::signal::unix::Signal,
    )>,
);

impl Signals {
    fn install() -> Signals {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(t), Ok(i), Ok(h)) => Signals(Some((t, i, h))),
            _ => {
                tracing::error!("cannot install signal handlers; stop with SIGKILL");
                Signals(None)
            }
        }
    }

    /// Waits for SIGTERM/SIGINT, reloading on SIGHUP meanwhile.
    async fn run(self, shared: Shared) {
        let Some((mut term, mut int, mut hup)) = self.0 else {
            std::future::pending::<()>().await;
            return;
        };
        loop {
            tokio::select! {
                _ = term.recv() => return,
                _ = int.recv() => return,
                _ = hup.recv() => match reload(&shared) {
                    Ok(msg) => tracing::info!("{msg}"),
                    Err(msg) => tracing::error!("reload refused: {msg}"),
                },
            }
        }
    }
}

/// Re-reads the config file and applies what can change without a restart.
pub fn reload(shared: &Shared) -> Result<String, String> {
    let path = shared.lock().config.path.clone();
    let Some(path) = path else {
        return Err("pcpd runs on embedded defaults (no --config): nothing to reload".into());
    };
    let new = Config::load(&path).map_err(|e| e.to_string())?;
    let mut core = shared.lock();
    if new.daemon != core.config.daemon {
        tracing::warn!("[pcpd] changes take effect at the next restart");
    }
    core.server
        .reload(new.server.clone())
        .map_err(|e| e.to_string())?;
    core.config.server = new.server;
    Ok(format!(
        "reloaded {}: {} policy rules, {} tiers",
        path.display(),
        core.config.server.policy.len(),
        core.config.server.tiers.len()
    ))
}
