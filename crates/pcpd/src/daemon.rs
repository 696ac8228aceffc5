//! Sockets, timers and signals around the core.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pcp_auth::gate::Inbound;
use pcp_dataplane::DataPlane;
use pcp_dataplane::memory::MemoryDataPlane;
use pcp_dataplane::nftables::{NftConfig, NftDataPlane};
use pcp_server::{Reply, Server};
use tokio::net::UdpSocket;

use crate::acl::{Reject, SocketAcl};
use crate::config::{Config, DataPlaneKind, HaRole};
use crate::core::{Core, Job, Pair, Shared};
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
    AdminAuth(#[from] crate::admin_auth::AuthError),
    /// The HA state file exists but cannot be read.
    #[error("HA state file {0}")]
    State(String),
    /// The data plane could not start.
    #[error("data plane: {0}")]
    DataPlane(String),
    /// The authentication back end could not start (certificate, key, credentials).
    #[error("[auth]: {0}")]
    Auth(#[from] crate::auth::BuildError),
    /// The replication link's key file is unusable.
    #[error("{0}")]
    LinkKey(#[from] crate::config::ConfigFileError),
    /// `[ha] serving_file` cannot be taken: its lock is held by another process, or
    /// the file or its lock cannot be written.
    #[error("[ha] serving_file {}: {source}", .path.display())]
    ServingFile {
        /// The serving file.
        path: std::path::PathBuf,
        /// Why.
        source: crate::serving_file::ClaimError,
    },
    /// No randomness for the replication link's salt.
    #[error("[ha] key_file: the system gives no randomness for the link's salt")]
    Random,
}

/// The longest the expiry task sleeps, so that a new earlier expiry is never missed by
/// more than this.
const EXPIRY_TICK: Duration = Duration::from_millis(250);

/// Runs pcpd until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), StartError> {
    // Signal handlers first: from the moment anything answers, SIGHUP reloads and
    // SIGTERM stops cleanly instead of killing the process.
    let signals = Signals::install();
    // Held until the process ends: keepalived's liveness check (docs/HA.md). Without
    // it keepalived never sees this node alive, and a second pcpd with the same file
    // would overwrite the first's: either is a setup error, so pcpd stops before it
    // touches anything else.
    // The liveness marker next to it is touched from then on: a pcpd that stops
    // running (SIGSTOP, a freezer) keeps its lock, but not its marker fresh.
    let serving = config.ha.as_ref().and_then(|h| {
        let path = h.serving_file.clone()?;
        Some((path, h.heartbeat_ms, h.detection_ms))
    });
    let _running = match serving {
        Some((path, heartbeat_ms, detection_ms)) => {
            let lock =
                crate::serving_file::claim(&path, Duration::from_secs(2)).map_err(|source| {
                    StartError::ServingFile {
                        path: path.clone(),
                        source,
                    }
                })?;
            let toucher = crate::serving_file::spawn_alive(
                &path,
                Duration::from_millis(heartbeat_ms),
                Duration::from_millis(detection_ms),
            )
            .map_err(|source| StartError::ServingFile {
                path: path.clone(),
                source: crate::serving_file::ClaimError::Io {
                    path: crate::serving_file::alive_path(&path),
                    source,
                },
            })?;
            Some((lock, toucher))
        }
        None => None,
    };
    let origin = Instant::now();
    let seed = rand::random::<u64>();
    let mut server = Server::new(config.server.clone(), pcp_server::Time(0), seed)?;
    // Always there (a reload may turn authentication on); off, it costs one atomic load.
    let auth = Some(crate::auth::Auth::build(&config.auth)?);
    let dataplane: Box<dyn DataPlane> = match config.daemon.dataplane {
        DataPlaneKind::Memory => Box::new(MemoryDataPlane::new()),
        DataPlaneKind::Nftables => {
            let n = &config.nftables;
            let dp = NftDataPlane::open(NftConfig {
                table: n.table.clone(),
                remove_on_exit: n.remove_on_exit,
                max_elements: (n.max_elements > 0).then_some(n.max_elements),
                nft: n.nft.clone(),
            })
            .map_err(|e| StartError::DataPlane(e.to_string()))?;
            tracing::info!(table = %n.table, "nftables table declared (inet family)");
            Box::new(dp)
        }
    };
    // Tokens before anything listens: an API that would be open beyond this host
    // refuses to start.
    let admin_auth = crate::admin_auth::Auth::load(
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
            let ha_key = match &ha.key_file {
                Some(path) => Some(crate::config::read_key_file(
                    path,
                    config.path.as_deref().map(|p| (p, 0)),
                )?),
                None => None,
            };
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
                // The backup keeps its core and data plane in step (`preinstall`, the
                // default): a takeover installs nothing (issue: failover within a second
                // with a million mappings).
                standby: ha.preinstall,
                window: replication_window(&sock),
                expected: usize::try_from(config.server.checkpoint.capacity).unwrap_or(0),
                ..HaConfig::default()
            };
            let mut node = HaNode::new(
                cfg,
                ha.role == HaRole::Active,
                rand::random::<u64>() | 1,
                pcp_server::Time(0),
            );
            node.set_epoch_base(server.epochs().base());
            let mut pair = Pair::new(
                node,
                ha.peer,
                Duration::from_millis(ha.ack_timeout_ms),
                origin,
            );
            pair.sockets = sockets.clone();
            pair.auth = auth.clone();
            if let Some(key) = &ha_key {
                pair.set_link_key(key).ok_or(StartError::Random)?;
                tracing::info!("replication link authenticated and encrypted ([ha] key_file)");
            }
            if let Some(a) = &auth {
                crate::auth::lock(a).replicate = ha.replicate_sessions;
            }
            if let Some(path) = &ha.state_file {
                let term = crate::core::read_term(path).map_err(StartError::State)?;
                tracing::info!(term, path = %path.display(), "HA term from the state file");
                pair.keep_term_in(path.clone(), term);
            }
            Some((sock, pair))
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
    core.auth = auth.clone();
    let shared = Shared::new(core);
    // The serving file says "not serving" before the HA node can change its role.
    let serving_writer = config_serving_file(&shared).and_then(|path| {
        let rx = shared.serving_tx.subscribe();
        match crate::serving_file::spawn(path, rx, tokio::runtime::Handle::current()) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the serving file's writer");
                None
            }
        }
    });

    for (i, (sock, acl)) in sockets.iter().zip(&acls).enumerate() {
        tracing::info!(
            listen = %acl.listen,
            allow = ?acl.allowed().iter().map(ToString::to_string).collect::<Vec<_>>(),
            reject = ?acl.reject,
            "client access list"
        );
        tokio::spawn(serve_socket(
            sock.clone(),
            i,
            shared.clone(),
            acl.clone(),
            auth.clone(),
            sockets.clone(),
        ));
    }
    if let Some(auth) = &auth {
        crate::auth::lock(auth).sockets = sockets.clone();
        tokio::spawn(crate::auth::timers(auth.clone(), sockets.clone()));
    }
    tokio::spawn(expiry(shared.clone()));
    if let Some(sock) = ha_sock {
        tokio::spawn(core_work(shared.clone()));
        match sock.into_std() {
            Ok(sock) => spawn_replication(sock, shared.clone()),
            Err(e) => tracing::error!(error = %e, "replication socket"),
        }
    }
    if shared.lock().config.daemon.announce_multicast {
        tokio::spawn(announce_start(sockets.clone(), shared.clone()));
    }
    let app = crate::admin::router(shared.clone(), admin_auth.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(admin, app).await {
            tracing::error!(error = %e, "admin API stopped");
        }
    });
    tracing::info!(
        listen = ?listen,
        admin = %admin_addr,
        admin_auth = if admin_auth.required() { "bearer token" } else { "none (loopback)" },
        dataplane = shared.lock().dataplane.name(),
        "pcpd started"
    );
    signals.run(shared.clone()).await;
    tracing::info!("pcpd stopping");
    // keepalived drops the address before anything else stops.
    shared.serving_tx.send_replace(None);
    if let Some(t) = serving_writer {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    if let Err(e) = shared.lock().dataplane.shutdown() {
        tracing::error!(error = %e, "data plane shutdown");
    }
    Ok(())
}

/// `[ha] serving_file`, if set.
fn config_serving_file(shared: &Shared) -> Option<std::path::PathBuf> {
    shared
        .lock()
        .config
        .ha
        .as_ref()
        .and_then(|h| h.serving_file.clone())
}

/// Receives, serves and answers datagrams on one socket: the access list first, then
/// with authentication on, the gate decides and tags the reply (docs/AUTH.md).
async fn serve_socket(
    sock: Arc<UdpSocket>,
    index: usize,
    shared: Shared,
    acl: Arc<SocketAcl>,
    auth: Option<crate::auth::SharedAuth>,
    sockets: Vec<Arc<UdpSocket>>,
) {
    let ctx = Serve {
        sock: &sock,
        index,
        shared: &shared,
        acl: &acl,
        auth: auth.as_ref(),
        sockets: &sockets,
    };
    let mut jobs: Vec<Job> = (0..BATCH).map(|_| Job::new(index)).collect();
    let mut sessions: Vec<Option<u32>> = vec![None; BATCH];
    loop {
        let (n, src) = match sock.recv_from(&mut jobs[0].datagram).await {
            Ok(x) => x,
            Err(e) => {
                // ICMP errors from earlier sends surface here on some systems; keep going.
                tracing::debug!(error = %e, "recv_from");
                continue;
            }
        };
        let mut queued = 0;
        if ctx.admit(&mut jobs[0], n, src, &mut sessions[0]).await {
            queued = 1;
        }
        // Whatever else is already queued is served with it: one data plane batch
        // (one netlink transaction) and one replication frame for the lot — group
        // commit.
        for _ in 1..BATCH {
            let j = &mut jobs[queued];
            match sock.try_recv_from(&mut j.datagram) {
                Ok((n, src)) => {
                    if ctx.admit(j, n, src, &mut sessions[queued]).await {
                        queued += 1;
                    }
                }
                Err(_) => break,
            }
        }
        if queued > 0 {
            ctx.serve(&mut jobs[..queued], &sessions[..queued]).await;
        }
        // PA session changes and the sequence numbers of the sessions just served, for
        // the backup (docs/AUTH.md "Pair mode"); taken before the pair lock (the
        // gate's lock is never held while taking it).
        let sessions_out = match &auth {
            Some(a) => crate::auth::lock(a).take_replication(&sessions[..queued]),
            None => Vec::new(),
        };
        // Records queued for the backup go out now, from this task: no wake-up of the
        // replication thread on a request's path.
        if let Some(mut p) = shared.lock_pair() {
            p.push_sessions(sessions_out);
            p.transmit();
            shared.after_ha(&mut p);
        }
    }
}

/// Datagrams served per socket in one group: one data plane batch, and the
/// replication records they queued sent in one frame.
const BATCH: usize = 32;

/// What serving one socket needs.
struct Serve<'a> {
    sock: &'a UdpSocket,
    index: usize,
    shared: &'a Shared,
    acl: &'a SocketAcl,
    auth: Option<&'a crate::auth::SharedAuth>,
    sockets: &'a [Arc<UdpSocket>],
}

impl Serve<'_> {
    /// Readies the datagram in `job.datagram[..n]` for the core: the socket's access
    /// list first, then, with authentication on, the gate (its own answers go out at
    /// once). Returns whether the core serves it (`session`: the session that
    /// authenticated it).
    async fn admit(
        &self,
        job: &mut Job,
        n: usize,
        src: SocketAddr,
        session: &mut Option<u32>,
    ) -> bool {
        job.received = Instant::now();
        job.src = src;
        job.len = n;
        job.identity = None;
        job.session = None;
        *session = None;
        if !self.acl.admits(src.ip()) {
            // Not a client of this address: counted, and dropped before the lock, or
            // refused by the core (rate-limited like any answer).
            if self.acl.reject == Reject::Drop {
                return false;
            }
            let answer = {
                let mut core = self.shared.lock();
                if !core.serves() {
                    return false;
                }
                let now = core.now();
                core.server
                    .not_authorized(&job.datagram[..n], src, now, &mut job.reply)
            };
            if let Reply::Send(len) = answer {
                let _ = self.sock.try_send_to(&job.reply[..len], src);
            }
            return false;
        }
        let Some(auth) = self.auth.filter(|a| a.on()) else {
            return true;
        };
        // The gate's work (PA messages, EAP, TLS) is the costliest of all: the
        // per-host rate limit comes first (a request the gate passes on is charged
        // again by the core). The gate's answers carry the core's epoch. A node that
        // does not serve (a backup) keeps quiet for PA messages too.
        let epoch = {
            let mut core = self.shared.lock();
            if !core.serves() {
                return false;
            }
            let now = core.now();
            if !core.server.admit(src.ip(), now) {
                return false;
            }
            core.epoch_for(src.ip())
        };
        // Under the gate's lock only the gate's own bookkeeping: EAP work of the
        // embedded back end goes to the worker pool, RADIUS requests and the log lines
        // leave after the lock is released.
        let (verdict, out, radius_out, events) = {
            let mut a = crate::auth::lock(auth);
            let now = a.now();
            if job.datagram.get(1).is_some_and(|b| b & 0x7f == 3) {
                a.route(src, self.index);
            }
            let v = a.gate.inbound(now, src, epoch, &mut job.datagram, n);
            let radius_out = a.backend_requests();
            let events = a.take_events();
            (v, a.transmits(), radius_out, events)
        };
        events.log();
        // Non-blocking: a full socket buffer is a loss the RADIUS retransmission
        // covers.
        for (sock, d) in radius_out {
            let _ = sock.try_send(&d);
        }
        crate::auth::send_all(self.sockets, out).await;
        match verdict {
            Inbound::Serve {
                len,
                session: s,
                identity,
            } => {
                job.len = len;
                job.identity = identity;
                job.session = s;
                *session = s;
                true
            }
            Inbound::Answer(a) => {
                if let Err(e) = self.sock.send_to(&a, src).await {
                    tracing::debug!(error = %e, %src, "send_to");
                }
                false
            }
            Inbound::Handled | Inbound::Drop => false,
        }
    }

    /// Serves a group under one core lock and sends the replies to send now (held
    /// replies go out when the backup acknowledges, from whoever hears it).
    async fn serve(&self, jobs: &mut [Job], sessions: &[Option<u32>]) {
        {
            let mut core = self.shared.lock();
            core.handle_group(jobs);
            // Latency up to the reply being ready (sending is a non-blocking syscall
            // right after).
            for j in jobs.iter() {
                if matches!(j.answer, Reply::Send(_)) {
                    core.latency.record(j.received.elapsed());
                }
            }
        }
        for (j, session) in jobs.iter_mut().zip(sessions) {
            let Reply::Send(len) = j.answer else {
                continue;
            };
            let len = match (self.auth, session) {
                (Some(a), Some(_)) => {
                    match crate::auth::lock(a)
                        .gate
                        .outbound(*session, &mut j.reply, len)
                    {
                        Some(l) => l,
                        None => continue,
                    }
                }
                _ => len,
            };
            let sent = match self.sock.try_send_to(&j.reply[..len], j.src) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.sock.send_to(&j.reply[..len], j.src).await.map(|_| ())
                }
                other => other.map(|_| ()),
            };
            if let Err(e) = sent {
                tracing::debug!(error = %e, src = %j.src, "send_to");
            }
        }
    }
}

/// The receive buffer pcpd asks for on the replication socket (the kernel caps it at
/// `net.core.rmem_max`, 4 MiB on common distributions, 208 KiB on some).
const HA_RCVBUF: usize = 4 << 20;

/// Enlarges the replication socket's buffers and returns the send window that fits
/// the receive buffer obtained (the peer's is assumed alike: both run this code). A
/// burst larger than the peer's buffer is dropped and only resent after a timeout,
/// which is what held the bulk copy back.
fn replication_window(sock: &UdpSocket) -> usize {
    let s = socket2::SockRef::from(sock);
    let _ = s.set_recv_buffer_size(HA_RCVBUF);
    let _ = s.set_send_buffer_size(HA_RCVBUF);
    // Linux reports twice what it grants (bookkeeping included); a quarter of the
    // report leaves room for each datagram's overhead.
    let got = s.recv_buffer_size().unwrap_or(212_992);
    let window = (got / 4).clamp(64 * 1024, 2 << 20);
    tracing::info!(rcvbuf = got, window, "replication socket");
    window
}

/// Starts the replication link on a thread of its own, with its own runtime: frames,
/// timers and heartbeats must never wait for the PCP path or the core lock, even on a
/// one-thread runtime or while the core is busy for a long time.
pub fn spawn_replication(sock: std::net::UdpSocket, shared: Shared) {
    // Frames go out on a second handle of the socket, from whichever thread has them
    // (the PCP path sends its records itself); this thread receives.
    match sock.set_nonblocking(true).and_then(|()| sock.try_clone()) {
        Ok(tx) => {
            let beacon = tx
                .try_clone()
                .map_err(|e| tracing::error!(error = %e, "beacon socket"));
            if let Some(mut p) = shared.lock_pair() {
                p.set_socket(tx);
                if let Ok(b) = beacon {
                    spawn_beacon(b, &p);
                }
            }
        }
        Err(e) => tracing::error!(error = %e, "replication socket"),
    }
    // The drain before the timers reads through a plain handle: tokio's `try_recv_from`
    // answers from the readiness its reactor last saw, and the reactor does not run
    // while this thread waits for the pair lock, so frames that arrived meanwhile
    // would stay invisible to it (and the timers would take them for silence).
    let drain = match sock.try_clone() {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, "replication socket");
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("pcpd-ha".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the replication runtime");
                    return;
                }
            };
            rt.block_on(async move {
                match UdpSocket::from_std(sock) {
                    Ok(sock) => replicate(sock, drain, shared).await,
                    Err(e) => tracing::error!(error = %e, "replication socket"),
                }
            });
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the replication thread");
    }
}

/// Sends the HA node's beacon ([`pcp_ha::Beacon`]) from a thread of its own whenever
/// nothing went to the peer for 1.5 heartbeats: the replication thread is then
/// waiting for the pair lock (bulk work; a holder descheduled on a starved machine)
/// or for the CPU, and the peer must not count that as silence. Never takes the pair
/// lock. A link quiet for longer than [`BEACON_LIMIT`] (or four detection times) is a
/// node stuck for good: the beacon stops covering for it, and the peer may take over.
fn spawn_beacon(sock: std::net::UdpSocket, pair: &crate::core::Pair) {
    let cell = pair.beacon.clone();
    let peer = pair.peer;
    let cfg = *pair.node.config();
    let origin = pair.origin();
    let spawned = std::thread::Builder::new()
        .name("pcpd-beacon".into())
        .spawn(move || {
            let mut buf = vec![0u8; 256];
            let quiet = cfg.heartbeat + cfg.heartbeat / 2;
            let limit = BEACON_LIMIT.max(cfg.detection * 4);
            let mut sent: Option<Instant> = None;
            loop {
                std::thread::sleep(cfg.heartbeat / 4);
                let now = Instant::now();
                let since = now.saturating_duration_since(
                    origin
                        + Duration::from_millis(
                            cell.last_sent.load(std::sync::atomic::Ordering::Relaxed),
                        ),
                );
                if since < quiet
                    || since > limit
                    || sent.is_some_and(|t| now.saturating_duration_since(t) < cfg.heartbeat)
                {
                    continue;
                }
                let beacon = *cell.beacon.lock().unwrap_or_else(|p| p.into_inner());
                let Some(beacon) = beacon else { continue };
                let t = pcp_server::Time(now.saturating_duration_since(origin).as_millis() as u64);
                let Some(n) = beacon.write(t, &mut buf) else {
                    continue;
                };
                let n = match cell.sealer.get() {
                    Some(sealer) => match sealer.seal(&mut buf, n) {
                        Some(n) => n,
                        None => continue,
                    },
                    None => n,
                };
                if sock.send_to(&buf[..n], peer).is_ok() {
                    sent = Some(now);
                    tracing::debug!(quiet_ms = since.as_millis() as u64, "beacon sent");
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the beacon thread");
    }
}

/// How long a quiet link is covered by the beacon at least (see `spawn_beacon`).
const BEACON_LIMIT: Duration = Duration::from_secs(2);

/// Frames read from the replication socket per pass before timers run (a pass that
/// stops short comes back at once).
const DRAIN: usize = 256;

/// Runs the replication link: frames from the peer, timers, and sending whatever the
/// HA node has to say (woken at once when requests queue records). Takes only the
/// pair lock; work for the core is queued and the core task woken.
async fn replicate(sock: UdpSocket, drain: std::net::UdpSocket, shared: Shared) {
    let mut buf = vec![0u8; 65536];
    let Some(peer) = shared.lock_pair().map(|p| p.peer) else {
        return;
    };
    loop {
        let wake = match shared.lock_pair() {
            Some(mut p) => {
                // Frames that queued while this thread waited (for the lock, for the
                // CPU) come before timers: the time is taken first, then the socket
                // read until empty, so the HA node judges silence only on what reached
                // the socket before that time (issue #4: a backup whose timer ran
                // late took over with the active's heartbeats unread in its socket).
                let read_at = p.now();
                let mut drained = false;
                for _ in 0..DRAIN {
                    match drain.recv_from(&mut buf) {
                        Ok((n, from)) if from.ip() == peer.ip() => p.frame(&mut buf[..n]),
                        Ok((_, from)) => {
                            tracing::warn!(%from, "replication frame from an unknown address dropped");
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            drained = true;
                            break;
                        }
                        // ICMP errors from earlier sends surface here; keep reading.
                        Err(e) => tracing::debug!(error = %e, "replication recv"),
                    }
                }
                if drained {
                    p.link_read(read_at);
                }
                let wake = p.tick();
                p.transmit();
                shared.after_ha(&mut p);
                if drained { wake } else { Instant::now() }
            }
            None => return,
        };
        tokio::select! {
            r = sock.recv_from(&mut buf) => match r {
                Ok((n, from)) => {
                    if from.ip() == peer.ip() {
                        if let Some(mut p) = shared.lock_pair() {
                            p.frame(&mut buf[..n]);
                            // The acknowledgement (backup) goes out before the core
                            // task is woken: on a shared CPU the woken task may run
                            // first, and its mirroring must not delay the ack the
                            // active's held replies wait for.
                            p.transmit();
                            shared.after_ha(&mut p);
                        }
                    } else {
                        tracing::warn!(%from, "replication frame from an unknown address dropped");
                    }
                }
                Err(e) => tracing::debug!(error = %e, "replication recv"),
            },
            _ = tokio::time::sleep_until(wake.into()) => {}
            _ = shared.kick_ha.notified() => {}
        }
    }
}

/// Carries out what the HA node asks of the server core (bulk chunks, standby
/// mirroring, promotion, step-down, late replies), under the core lock.
async fn core_work(shared: Shared) {
    loop {
        shared.kick_core.notified().await;
        loop {
            let (kick, more, paging) = {
                let mut core = shared.lock();
                let (kick, more) = core.ha_work();
                (kick, more, core.announce_paging())
            };
            if kick {
                shared.kick();
            }
            if paging {
                // A takeover's first ANNOUNCE copy is under way: its next page is due
                // sooner than the expiry task's next tick.
                shared.kick_expiry.notify_one();
            }
            if !more {
                break;
            }
            // The core lock was released: let requests and the admin API in.
            tokio::task::yield_now().await;
        }
    }
}

/// Removes mappings as their lifetimes end, and sends the copies of a takeover's
/// ANNOUNCE burst as they fall due.
async fn expiry(shared: Shared) {
    loop {
        let wake = {
            let mut core = shared.lock();
            core.expire();
            let next = core.next_wake().map(|t| core.instant_of(t));
            let cap = Instant::now() + EXPIRY_TICK;
            next.map_or(cap, |n| n.min(cap))
        };
        tokio::select! {
            _ = tokio::time::sleep_until(wake.into()) => {}
            _ = shared.kick_expiry.notified() => {}
        }
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
            let mut core = shared.lock();
            let now = core.now();
            schedule.poll(now);
            // A node that does not serve (a pair's backup) keeps quiet: the active
            // speaks for the address, and its clients' epoch is the active's.
            if !core.serves() {
                continue;
            }
            core.send_session_announces(now);
            core.server.announce(None, now, &mut buf)
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

/// Re-reads the config file and applies what can change without a restart: the
/// server core's settings and `[auth]` (docs/AUTH.md, "Reload"). Everything is checked
/// and loaded first; a file, line or key that is wrong refuses the whole reload and
/// the running configuration stays.
pub fn reload(shared: &Shared) -> Result<String, String> {
    let path = shared.lock().config.path.clone();
    let Some(path) = path else {
        return Err("pcpd runs on embedded defaults (no --config): nothing to reload".into());
    };
    let new = Config::load(&path).map_err(|e| e.to_string())?;
    // `[ha]` takes effect at a restart only: the running one (with any --ha-key-file)
    // decides whether a reload may turn authentication on.
    let running_ha = shared.lock().config.ha.clone();
    if let Some(message) =
        crate::config::session_replication_problem(running_ha.as_ref(), &new.auth)
    {
        return Err(format!(
            "{}:{}: ha.replicate_sessions: {message}",
            path.display(),
            new.replicate_line
        ));
    }
    let auth =
        crate::auth::prepare(&new.auth).map_err(|e| format!("{}: [auth] {e}", path.display()))?;
    let shared_auth = {
        let mut core = shared.lock();
        if new.daemon != core.config.daemon {
            tracing::warn!("[pcpd] changes take effect at the next restart");
        }
        core.server
            .reload(new.server.clone())
            .map_err(|e| e.to_string())?;
        core.config.server = new.server;
        core.config.auth = new.auth;
        core.auth.clone()
    };
    // The gate's lock outside the core's.
    let notes = shared_auth
        .map(|a| crate::auth::apply(&a, auth))
        .unwrap_or_default();
    let core = shared.lock();
    let mut msg = format!(
        "reloaded {}: {} policy rules, {} tiers, auth {}",
        path.display(),
        core.config.server.policy.len(),
        core.config.server.tiers.len(),
        if core.config.auth.enabled() {
            "on"
        } else {
            "off"
        },
    );
    if !notes.is_empty() {
        msg.push_str(&format!(" ({notes})"));
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket as StdUdp;

    use pcp_ha::wire::{self, Header, Kind, Writer};

    use super::*;

    /// A pair-mode core whose replication thread talks to `peer`, with 20 ms
    /// heartbeats and 100 ms detection.
    fn pair_core(start_active: bool, peer: SocketAddr) -> (Shared, SocketAddr) {
        let config = Config::embedded();
        let origin = Instant::now();
        let server = Server::new(config.server.clone(), pcp_server::Time(0), 7).unwrap();
        let cfg = HaConfig {
            heartbeat: Duration::from_millis(20),
            detection: Duration::from_millis(100),
            join: Duration::from_millis(100),
            standby: true,
            ..HaConfig::default()
        };
        let node = HaNode::new(cfg, start_active, 0x1234_5679, pcp_server::Time(0));
        let pair = Pair::new(node, peer, Duration::from_millis(250), origin);
        let core = Core::new(
            server,
            Box::new(MemoryDataPlane::new()),
            config,
            origin,
            7,
            Some(pair),
        );
        let shared = Shared::new(core);
        let sock = StdUdp::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        spawn_replication(sock, shared.clone());
        (shared, addr)
    }

    /// Receives frames on `sock` for `span`; returns the longest silence.
    fn longest_gap(
        sock: &StdUdp,
        span: Duration,
        mut answer: impl FnMut(&StdUdp, SocketAddr),
    ) -> (Duration, usize) {
        sock.set_read_timeout(Some(Duration::from_millis(10)))
            .unwrap();
        let start = Instant::now();
        let mut last = start;
        let mut gap = Duration::ZERO;
        let mut frames = 0;
        let mut buf = [0u8; 65536];
        while start.elapsed() < span {
            if let Ok((_, from)) = sock.recv_from(&mut buf) {
                frames += 1;
                gap = gap.max(last.elapsed());
                last = Instant::now();
                answer(sock, from);
            }
        }
        (gap.max(last.elapsed()), frames)
    }

    /// `[ha] serving_file`: the HA node's promotion reaches the file while the core
    /// lock is held all along (the file IO is off the core's and the replication
    /// thread's path), and a stop turns it back to "not serving".
    #[test]
    fn the_serving_file_follows_the_role_without_the_core_lock() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_time()
            .build()
            .unwrap();
        let dir = pcp_testkit::TempDir::new();
        let path = dir.join("serving");
        // A peer that never answers: the node started active takes over after its join
        // time.
        let silent = StdUdp::bind("127.0.0.1:0").unwrap();
        let (shared, _) = pair_core(true, silent.local_addr().unwrap());
        let busy = shared.lock();
        let writer = crate::serving_file::spawn(
            path.clone(),
            shared.serving_tx.subscribe(),
            rt.handle().clone(),
        )
        .unwrap();
        let read = || std::fs::read_to_string(&path).unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(10);
        while read() != "0\n" {
            assert!(Instant::now() < deadline, "serving file: {:?}", read());
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            shared.lock_pair().unwrap().node.role(),
            pcp_ha::Role::Active
        );
        drop(busy);
        shared.serving_tx.send_replace(None);
        writer.join().unwrap();
        assert_eq!(read(), "1\n");
    }

    /// Issue #4: a core busy for longer than the detection time (a hash table growing
    /// near a million mappings) must not silence the active's heartbeats, or the
    /// backup takes over from a live active.
    #[test]
    fn heartbeats_go_out_while_the_core_lock_is_held() {
        let peer = StdUdp::bind("127.0.0.1:0").unwrap();
        let (shared, _) = pair_core(true, peer.local_addr().unwrap());
        // Let it join and become active.
        let (_, frames) = longest_gap(&peer, Duration::from_millis(300), |_, _| {});
        assert!(
            frames > 3,
            "the node sends before the stall ({frames} frames)"
        );
        let stalled = shared.lock();
        let (gap, frames) = longest_gap(&peer, Duration::from_millis(1000), |_, _| {});
        drop(stalled);
        assert!(
            frames >= 20,
            "{frames} frames in 1 s of 20 ms heartbeats while the core was busy"
        );
        // A thread blocked on the core would be silent for the whole 1 s stall; the
        // margin below that absorbs scheduling delays on a loaded 2-CPU CI machine.
        assert!(
            gap < Duration::from_millis(400),
            "{gap:?} without a frame while the core was busy"
        );
        let role = shared.lock_pair().unwrap().node.role();
        assert_eq!(role, pcp_ha::Role::Active);
    }

    /// Issue #4 (spurious takeover under CPU starvation): the pair lock held for a
    /// second on the active — bulk work under it, or its holder descheduled on a
    /// starved machine — must not silence the active towards the backup: the beacon
    /// thread speaks for it. Fails without the beacon (no frame in that second).
    #[test]
    fn heartbeats_go_out_while_the_pair_lock_is_held() {
        let peer = StdUdp::bind("127.0.0.1:0").unwrap();
        let (shared, _) = pair_core(true, peer.local_addr().unwrap());
        let (_, frames) = longest_gap(&peer, Duration::from_millis(300), |_, _| {});
        assert!(
            frames > 3,
            "the node sends before the stall ({frames} frames)"
        );
        let stalled = shared.lock_pair();
        // Past what the replication thread sent before it blocked on the lock.
        std::thread::sleep(Duration::from_millis(50));
        let mut buf = [0u8; 256];
        while peer.recv_from(&mut buf).is_ok() {}
        peer.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let (n, _) = peer
            .recv_from(&mut buf)
            .expect("a frame while the lock is held");
        let h = wire::read_header(&mut wire::Reader::new(&buf[..n])).unwrap();
        assert_eq!(h.kind, Kind::Beat, "the beacon is a heartbeat");
        let (gap, frames) = longest_gap(&peer, Duration::from_millis(1000), |_, _| {});
        drop(stalled);
        // Beacons every ~30 ms; the margins allow for a starved test machine (this
        // thread's own wake-ups included). Without the beacon there is no frame at
        // all until the lock is released.
        assert!(
            frames >= 10,
            "{frames} frames in 1 s of 20 ms heartbeats while the pair lock was held"
        );
        assert!(
            gap < Duration::from_millis(250),
            "{gap:?} without a frame while the pair lock was held"
        );
        let role = shared.lock_pair().unwrap().node.role();
        assert_eq!(role, pcp_ha::Role::Active);
    }

    /// Issue #4, the spurious takeover's cause: the backup's replication thread,
    /// woken by its timer, found its socket empty, then waited for the pair lock (held
    /// here for 1 s; on a starved machine, a holder descheduled) while the active's
    /// heartbeats queued in the socket, then ran its timers with the time it got the
    /// lock: a second of "silence", and it took over from a live active. Now the time
    /// is taken and the socket read under the lock, before the timers.
    #[test]
    fn backup_does_not_take_over_after_waiting_for_its_pair_lock() {
        let active = StdUdp::bind("127.0.0.1:0").unwrap();
        let (shared, backup) = pair_core(false, active.local_addr().unwrap());
        let beat = |sock: &StdUdp| {
            let mut buf = [0u8; 128];
            let mut w = Writer::new(&mut buf);
            let h = Header {
                kind: Kind::Beat,
                flags: 0,
                term: 1,
                sender: 99,
                stream: 99,
            };
            wire::write_header(&mut w, &h).unwrap();
            wire::write_u64(&mut w, 0).unwrap();
            wire::write_u64(&mut w, 0).unwrap();
            let n = w.len();
            let _ = sock.send_to(&buf[..n], backup);
        };
        // Following the (fake) active.
        for _ in 0..15 {
            beat(&active);
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            shared.lock_pair().unwrap().node.role(),
            pcp_ha::Role::Backup
        );
        let stalled = shared.lock_pair();
        // No heartbeat for 60 ms: the replication thread's own timer (20 ms) wakes it,
        // it finds the socket empty and blocks on the lock. Then the active goes on.
        std::thread::sleep(Duration::from_millis(60));
        let until = Instant::now() + Duration::from_millis(1000);
        while Instant::now() < until {
            beat(&active);
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(stalled);
        for _ in 0..10 {
            beat(&active);
            std::thread::sleep(Duration::from_millis(20));
        }
        let role = shared.lock_pair().unwrap().node.role();
        assert_eq!(
            role,
            pcp_ha::Role::Backup,
            "took over with the active's heartbeats unread in its socket"
        );
    }

    /// The backup's side: while its core is busy it keeps hearing the active and
    /// acknowledging, and does not take over.
    #[test]
    fn backup_keeps_answering_and_does_not_take_over_while_its_core_is_busy() {
        let active = StdUdp::bind("127.0.0.1:0").unwrap();
        let (shared, backup) = pair_core(false, active.local_addr().unwrap());
        let beat = |sock: &StdUdp, _from: SocketAddr| {
            let mut buf = [0u8; 128];
            let mut w = Writer::new(&mut buf);
            let h = Header {
                kind: Kind::Beat,
                flags: 0,
                term: 1,
                sender: 99,
                stream: 99,
            };
            wire::write_header(&mut w, &h).unwrap();
            wire::write_u64(&mut w, 0).unwrap();
            wire::write_u64(&mut w, 0).unwrap();
            let n = w.len();
            let _ = sock.send_to(&buf[..n], backup);
        };
        beat(&active, backup);
        let (_, frames) = longest_gap(&active, Duration::from_millis(300), beat);
        assert!(
            frames > 3,
            "the backup answers before the stall ({frames} frames)"
        );
        let stalled = shared.lock();
        let (gap, frames) = longest_gap(&active, Duration::from_millis(1000), beat);
        drop(stalled);
        assert!(
            frames >= 20,
            "{frames} frames in 1 s while the backup's core was busy"
        );
        // As above: a blocked thread would be silent for the whole 1 s stall.
        assert!(
            gap < Duration::from_millis(400),
            "{gap:?} without an answer while the core was busy"
        );
        let role = shared.lock_pair().unwrap().node.role();
        assert_eq!(role, pcp_ha::Role::Backup, "took over from a live active");
    }
}
