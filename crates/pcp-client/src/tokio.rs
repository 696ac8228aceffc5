//! The async API: a [`PcpClient`] owns a UDP socket and the sans-IO [`Client`] core in a
//! background task; each mapping is a [`Mapping`] handle that streams its [`Event`]s.
//!
//! ```no_run
//! # async fn demo() -> Result<(), pcp_client::Error> {
//! use pcp_client::tokio::{ClientOptions, PcpClient};
//! use pcp_client::core::MappingRequest;
//!
//! let client = PcpClient::connect(ClientOptions::new("192.0.2.1:5351".parse().unwrap())).await?;
//! let mut voip = client
//!     .map(MappingRequest::map(17, 5060).lifetime(3600).checkpoint(true))
//!     .await?;
//! let grant = voip.granted().await?;
//! println!("{} checkpoint {}", grant.external, grant.checkpoint);
//! while let Some(event) = voip.next_event().await {
//!     println!("{event:?}"); // renewed, external changed, lost, …
//! }
//! # Ok(()) }
//! ```
//!
//! Dropping a [`Mapping`] stops renewing it (the server drops it when its lifetime
//! ends); [`Mapping::delete`] removes it now. Dropping the [`PcpClient`] and every
//! handle stops the task, ending an authenticated session (SESSION_TERMINATED) first.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use ::tokio::net::UdpSocket;
use ::tokio::sync::{broadcast, mpsc, oneshot};
use ::tokio::time::Instant;

use crate::core::{
    Apply, AuthFailure, Client, Config, Event, Grant, LostReason, MappingId, MappingRequest,
    MappingStatus, RequestError, RetransmitConfig, Time, Version,
};
use crate::error::Error;
use crate::gateway;

pub use crate::core::Authentication;

/// How to reach the server and how to behave.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The server; `None` discovers it (default gateway, port 5351).
    pub server: Option<SocketAddr>,
    /// Local address to bind (default: any address of the server's family, any port).
    pub bind: Option<SocketAddr>,
    /// Where to listen for unsolicited ANNOUNCEs too (normally `0.0.0.0:5350`); `None`
    /// listens only on the request socket (where unicast ANNOUNCEs to it arrive).
    pub announce_listen: Option<SocketAddr>,
    /// Join the all-hosts group (224.0.0.1 / ff02::1) on the ANNOUNCE socket, as RFC
    /// 6887 §14.1 servers multicast there. Off by default.
    pub join_multicast: bool,
    /// Retransmission parameters.
    pub retransmit: RetransmitConfig,
    /// Blind-echo detection (on by default).
    pub canary: bool,
    /// NAT-PMP fallback (on by default).
    pub natpmp_fallback: bool,
    /// Spread of re-creations after an unsolicited ANNOUNCE (default 5 s).
    pub announce_spread: Duration,
    /// Seed for nonces and jitter (default: from the OS).
    pub seed: Option<u64>,
    /// PCP authentication (RFC 7652): when set, `connect` authenticates first (and
    /// fails with [`Error::Authentication`] if that fails), every request is tagged and
    /// every response checked; NAT-PMP is then never used. See
    /// [`Authentication::ttls`] and the [crate docs](crate#authentication).
    pub authentication: Option<Authentication>,
}

impl ClientOptions {
    /// Defaults for `server`.
    pub fn new(server: SocketAddr) -> ClientOptions {
        ClientOptions {
            server: Some(server),
            ..ClientOptions::discover()
        }
    }

    /// Defaults, with the server at the default gateway.
    pub fn discover() -> ClientOptions {
        ClientOptions {
            server: None,
            bind: None,
            announce_listen: None,
            join_multicast: false,
            retransmit: RetransmitConfig::default(),
            canary: true,
            natpmp_fallback: true,
            announce_spread: Duration::from_secs(5),
            seed: None,
            authentication: None,
        }
    }

    /// Binds the request socket to `addr`.
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.bind = Some(addr);
        self
    }

    /// Listens for ANNOUNCEs on `addr` too, optionally joining the all-hosts group.
    pub fn announce_listen(mut self, addr: SocketAddr, join_multicast: bool) -> Self {
        self.announce_listen = Some(addr);
        self.join_multicast = join_multicast;
        self
    }

    /// Sets the retransmission parameters.
    pub fn retransmit(mut self, r: RetransmitConfig) -> Self {
        self.retransmit = r;
        self
    }

    /// Authenticates with `a` (RFC 7652).
    pub fn authentication(mut self, a: Authentication) -> Self {
        self.authentication = Some(a);
        self
    }
}

/// The answer to [`PcpClient::announce`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct AnnounceInfo {
    /// The server's epoch time.
    pub epoch: u32,
    /// The protocol it answered in.
    pub version: Version,
}

enum Cmd {
    Create(
        MappingRequest,
        oneshot::Sender<Result<(MappingId, mpsc::UnboundedReceiver<Event>), RequestError>>,
    ),
    SetCheckpoint(
        MappingId,
        bool,
        Apply,
        oneshot::Sender<Result<(), RequestError>>,
    ),
    Delete(MappingId, oneshot::Sender<Result<(), RequestError>>),
    Release(MappingId),
    DeleteByNonce(
        MappingRequest,
        oneshot::Sender<Result<(MappingId, mpsc::UnboundedReceiver<Event>), RequestError>>,
    ),
    Announce(oneshot::Sender<Result<AnnounceInfo, Error>>),
    Status(oneshot::Sender<(Vec<MappingStatus>, Option<u32>, Version)>),
    Authenticated(oneshot::Sender<Result<(), AuthFailure>>),
    EndSession,
}

/// An async PCP client for one server.
#[derive(Debug)]
pub struct PcpClient {
    cmds: mpsc::UnboundedSender<Cmd>,
    events: broadcast::Sender<Event>,
    server: SocketAddr,
    local: SocketAddr,
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cmd")
    }
}

/// The address this host uses towards `server`.
fn local_ip_towards(server: SocketAddr) -> Result<IpAddr, Error> {
    let any: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let probe =
        std::net::UdpSocket::bind(any).map_err(|source| Error::Bind { addr: any, source })?;
    probe
        .connect(server)
        .and_then(|()| probe.local_addr())
        .map(|a| a.ip())
        .map_err(|source| Error::NoRoute { server, source })
}

fn announce_socket(addr: SocketAddr, join: bool) -> Result<UdpSocket, Error> {
    use socket2::{Domain, Protocol, Socket, Type};
    let bind_err = |source| Error::Bind { addr, source };
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .map_err(bind_err)?;
    // Several clients on one host may listen on 5350.
    sock.set_reuse_address(true).map_err(bind_err)?;
    sock.bind(&addr.into()).map_err(bind_err)?;
    if join {
        match addr {
            SocketAddr::V4(_) => sock
                .join_multicast_v4(&Ipv4Addr::new(224, 0, 0, 1), &Ipv4Addr::UNSPECIFIED)
                .map_err(bind_err)?,
            SocketAddr::V6(_) => sock
                .join_multicast_v6(&"ff02::1".parse().unwrap_or(Ipv6Addr::UNSPECIFIED), 0)
                .map_err(bind_err)?,
        }
    }
    sock.set_nonblocking(true).map_err(bind_err)?;
    UdpSocket::from_std(sock.into()).map_err(bind_err)
}

impl PcpClient {
    /// Opens the socket(s) and starts the background task on the current runtime.
    pub async fn connect(opts: ClientOptions) -> Result<PcpClient, Error> {
        let server = match opts.server {
            Some(s) => s,
            None => SocketAddr::new(
                IpAddr::V4(gateway::default_gateway()?),
                pcp_proto::SERVER_PORT,
            ),
        };
        let bind = opts.bind.unwrap_or(match server {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        });
        let sock = UdpSocket::bind(bind)
            .await
            .map_err(|source| Error::Bind { addr: bind, source })?;
        let local = sock
            .local_addr()
            .map_err(|source| Error::Bind { addr: bind, source })?;
        let client_ip = if local.ip().is_unspecified() {
            local_ip_towards(server)?
        } else {
            local.ip()
        };
        let announce = match opts.announce_listen {
            Some(a) => Some(announce_socket(a, opts.join_multicast)?),
            None => None,
        };
        let mut cfg = Config::new(server, client_ip);
        cfg.retransmit = opts.retransmit;
        cfg.canary = opts.canary;
        cfg.natpmp_fallback = opts.natpmp_fallback;
        cfg.announce_spread = opts.announce_spread;
        cfg.authentication = opts.authentication;
        let authenticating = cfg.authentication.is_some();
        let seed = opts.seed.unwrap_or_else(rand::random);
        let start = Instant::now();
        let core = Client::new(cfg, Time::ZERO, seed);
        let (cmds, rx) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(64);
        let driver = Driver {
            core,
            sock,
            announce,
            start,
            routes: HashMap::new(),
            announce_waiters: Vec::new(),
            auth_waiters: Vec::new(),
            events: events.clone(),
        };
        ::tokio::spawn(driver.run(rx));
        if authenticating {
            let (tx, done) = oneshot::channel();
            cmds.send(Cmd::Authenticated(tx))
                .map_err(|_| Error::Closed)?;
            // Dropping `cmds` on failure stops the task.
            done.await
                .map_err(|_| Error::Closed)?
                .map_err(|f| Error::Authentication(f.into()))?;
        }
        Ok(PcpClient {
            cmds,
            events,
            server,
            local: SocketAddr::new(client_ip, local.port()),
        })
    }

    /// The server.
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// This client's address and port as sent in requests.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Client-wide events (server state lost, NAT-PMP fallback), for whoever listens.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Creates a mapping (MAP or PEER, per the request) and returns its handle at once;
    /// await [`Mapping::granted`] for the answer.
    pub async fn map(&self, req: MappingRequest) -> Result<Mapping, Error> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Create(req, tx))
            .map_err(|_| Error::Closed)?;
        let (id, events) = rx.await.map_err(|_| Error::Closed)??;
        Ok(Mapping {
            id,
            cmds: self.cmds.clone(),
            events,
            server: self.server,
            last: None,
            done: false,
        })
    }

    /// Deletes a mapping made elsewhere (e.g. by an earlier `pcpc map`), named by its
    /// request and nonce. `Ok(true)` when the server confirmed.
    pub async fn delete_by_nonce(&self, req: MappingRequest) -> Result<bool, Error> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::DeleteByNonce(req, tx))
            .map_err(|_| Error::Closed)?;
        let (_, mut events) = rx.await.map_err(|_| Error::Closed)??;
        let mut refused = None;
        while let Some(e) = events.recv().await {
            match e {
                Event::Error { result, .. } => refused = Some(result),
                Event::Deleted { confirmed, .. } => {
                    return match (confirmed, refused) {
                        (true, _) => Ok(true),
                        (false, Some(result)) => Err(Error::Refused { result }),
                        (false, None) => Err(Error::NoResponse {
                            server: self.server,
                        }),
                    };
                }
                _ => {}
            }
        }
        Err(Error::Closed)
    }

    /// Sends an ANNOUNCE and returns the server's epoch. A state loss it reveals makes
    /// the client re-create its mappings.
    pub async fn announce(&self) -> Result<AnnounceInfo, Error> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Announce(tx))
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Every mapping's state, the last epoch seen, and the protocol spoken.
    pub async fn status(&self) -> Result<(Vec<MappingStatus>, Option<u32>, Version), Error> {
        let (tx, rx) = oneshot::channel();
        self.cmds.send(Cmd::Status(tx)).map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)
    }

    /// With authentication: waits until a PCP SA is in place (at once if it is), or
    /// fails with the reason the next attempt failed.
    pub async fn authenticated(&self) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Authenticated(tx))
            .map_err(|_| Error::Closed)?;
        rx.await
            .map_err(|_| Error::Closed)?
            .map_err(|f| Error::Authentication(f.into()))
    }

    /// With authentication: ends the session (SESSION_TERMINATED, RFC 7652 §3.3). A
    /// later request authenticates again.
    pub fn end_session(&self) -> Result<(), Error> {
        self.cmds.send(Cmd::EndSession).map_err(|_| Error::Closed)
    }
}

/// A mapping: its events, and what can be done with it.
#[derive(Debug)]
pub struct Mapping {
    id: MappingId,
    cmds: mpsc::UnboundedSender<Cmd>,
    events: mpsc::UnboundedReceiver<Event>,
    server: SocketAddr,
    last: Option<Grant>,
    done: bool,
}

impl Mapping {
    /// Its id.
    pub fn id(&self) -> MappingId {
        self.id
    }

    /// The last grant seen through this handle.
    pub fn last_grant(&self) -> Option<Grant> {
        self.last
    }

    /// The next event: granted, renewed, external changed, checkpoint changed, error,
    /// lost, deleted, and the client-wide server-state-lost and NAT-PMP fallback.
    /// `None` once the mapping is gone for good.
    pub async fn next_event(&mut self) -> Option<Event> {
        if self.done {
            return None;
        }
        let e = self.events.recv().await;
        self.observe(e.as_ref());
        e
    }

    fn observe(&mut self, e: Option<&Event>) {
        match e {
            Some(Event::Granted { grant, .. } | Event::Renewed { grant, .. }) => {
                self.last = Some(*grant);
            }
            Some(e) if e.is_final() => self.done = true,
            None => self.done = true,
            _ => {}
        }
    }

    /// Waits for the first answer: the grant, or why there is none. After a temporary
    /// refusal ([`Error::Temporary`]) the client keeps asking; call again to wait on.
    pub async fn granted(&mut self) -> Result<Grant, Error> {
        loop {
            match self.next_event().await {
                Some(Event::Granted { grant, .. }) => return Ok(grant),
                Some(Event::Error {
                    result, retry_in, ..
                }) => return Err(Error::Temporary { result, retry_in }),
                Some(Event::Lost { reason, .. }) => {
                    return Err(match reason {
                        LostReason::Refused(result) => Error::Refused { result },
                        LostReason::NoResponse => Error::NoResponse {
                            server: self.server,
                        },
                        LostReason::Unsupported => Error::NatPmpOnly {
                            server: self.server,
                        },
                        LostReason::Expired => continue,
                    });
                }
                Some(Event::Deleted { .. }) => return Err(Error::Gone("deleted".into())),
                Some(_) => {}
                None => return Err(Error::Closed),
            }
        }
    }

    /// Changes whether CHECKPOINT_REQUIRED is asked for, on the next renewal or now.
    pub async fn set_checkpoint(&self, on: bool, apply: Apply) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::SetCheckpoint(self.id, on, apply, tx))
            .map_err(|_| Error::Closed)?;
        Ok(rx.await.map_err(|_| Error::Closed)??)
    }

    /// Deletes the mapping and waits for the outcome: `true` if the server confirmed.
    pub async fn delete(mut self) -> Result<bool, Error> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Delete(self.id, tx))
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)??;
        loop {
            match self.events.recv().await {
                Some(Event::Deleted { confirmed, .. }) => {
                    self.done = true;
                    return Ok(confirmed);
                }
                Some(Event::Lost { reason, .. }) if reason != LostReason::Expired => {
                    self.done = true;
                    return Ok(false);
                }
                Some(_) => {}
                None => return Err(Error::Closed),
            }
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.cmds.send(Cmd::Release(self.id));
        }
    }
}

impl futures_core::Stream for Mapping {
    type Item = Event;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        if self.done {
            return Poll::Ready(None);
        }
        let r = self.events.poll_recv(cx);
        if let Poll::Ready(e) = &r {
            let e = e.clone();
            self.observe(e.as_ref());
        }
        r
    }
}

struct Driver {
    core: Client,
    sock: UdpSocket,
    announce: Option<UdpSocket>,
    start: Instant,
    routes: HashMap<MappingId, mpsc::UnboundedSender<Event>>,
    announce_waiters: Vec<oneshot::Sender<Result<AnnounceInfo, Error>>>,
    auth_waiters: Vec<oneshot::Sender<Result<(), AuthFailure>>>,
    events: broadcast::Sender<Event>,
}

async fn recv_opt(s: Option<&UdpSocket>, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
    match s {
        Some(s) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

impl Driver {
    fn now(&self) -> Time {
        Time(u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    async fn flush(&mut self) {
        let now = self.now();
        while let Some(t) = self.core.poll_transmit(now) {
            // A failed send is like a lost datagram: retransmission covers it.
            let _ = self.sock.send_to(&t.payload, t.destination).await;
        }
        while let Some(e) = self.core.poll_event() {
            self.route(e);
        }
    }

    fn route(&mut self, e: Event) {
        match &e {
            Event::AnnounceReply { epoch, version } => {
                for w in self.announce_waiters.drain(..) {
                    let _ = w.send(Ok(AnnounceInfo {
                        epoch: *epoch,
                        version: *version,
                    }));
                }
            }
            Event::AnnounceTimeout => {
                let server = self.core.config().server;
                for w in self.announce_waiters.drain(..) {
                    let _ = w.send(Err(Error::NoResponse { server }));
                }
            }
            Event::Authenticated { .. } => {
                for w in self.auth_waiters.drain(..) {
                    let _ = w.send(Ok(()));
                }
            }
            Event::AuthenticationFailed { failure } => {
                for w in self.auth_waiters.drain(..) {
                    let _ = w.send(Err(*failure));
                }
            }
            _ => {}
        }
        match e.mapping() {
            Some(id) => {
                if let Some(tx) = self.routes.get(&id) {
                    let _ = tx.send(e.clone());
                }
                if e.is_final() {
                    self.routes.remove(&id);
                }
            }
            None => {
                for tx in self.routes.values() {
                    let _ = tx.send(e.clone());
                }
                let _ = self.events.send(e);
            }
        }
    }

    fn command(&mut self, cmd: Cmd) {
        let now = self.now();
        match cmd {
            Cmd::Create(req, reply) => {
                let r = self.core.create(req, now).map(|id| {
                    let (tx, rx) = mpsc::unbounded_channel();
                    self.routes.insert(id, tx);
                    (id, rx)
                });
                let _ = reply.send(r);
            }
            Cmd::SetCheckpoint(id, on, apply, reply) => {
                let _ = reply.send(self.core.set_checkpoint(id, on, apply, now));
            }
            Cmd::Delete(id, reply) => {
                let _ = reply.send(self.core.delete(id, now));
            }
            Cmd::DeleteByNonce(req, reply) => {
                let r = self.core.delete_by_nonce(req, now).map(|id| {
                    let (tx, rx) = mpsc::unbounded_channel();
                    self.routes.insert(id, tx);
                    (id, rx)
                });
                let _ = reply.send(r);
            }
            Cmd::Release(id) => {
                let _ = self.core.release(id);
                self.routes.remove(&id);
            }
            Cmd::Announce(reply) => {
                self.announce_waiters.push(reply);
                self.core.announce(now);
            }
            Cmd::Status(reply) => {
                let _ = reply.send((
                    self.core.mappings(),
                    self.core.last_epoch(),
                    self.core.version(),
                ));
            }
            Cmd::Authenticated(reply) => {
                if self.core.config().authentication.is_none() || self.core.is_authenticated() {
                    let _ = reply.send(Ok(()));
                } else {
                    self.auth_waiters.push(reply);
                }
            }
            Cmd::EndSession => self.core.end_session(now),
        }
    }

    async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<Cmd>) {
        let mut buf = vec![0u8; 2048];
        let mut abuf = vec![0u8; 2048];
        loop {
            self.flush().await;
            let deadline = self
                .core
                .poll_timeout()
                .map(|t| self.start + Duration::from_millis(t.0));
            let sleep = async {
                match deadline {
                    Some(d) => ::tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            ::tokio::select! {
                r = self.sock.recv_from(&mut buf) => {
                    if let Ok((n, from)) = r {
                        let now = self.now();
                        self.core.handle_datagram(&buf[..n], from, now);
                    }
                }
                r = recv_opt(self.announce.as_ref(), &mut abuf) => {
                    if let Ok((n, from)) = r {
                        let now = self.now();
                        self.core.handle_datagram(&abuf[..n], from, now);
                    }
                }
                c = cmds.recv() => match c {
                    Some(cmd) => self.command(cmd),
                    // The client and every handle are gone: end the PA session (one
                    // SESSION_TERMINATED, so that the server frees it now) and stop.
                    None => {
                        let now = self.now();
                        self.core.end_session(now);
                        self.flush().await;
                        return;
                    }
                },
                () = sleep => {
                    let now = self.now();
                    self.core.handle_timeout(now);
                }
            }
        }
    }
}
