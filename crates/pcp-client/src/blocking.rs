//! A blocking facade over [`crate::tokio`] for programs without an async runtime.
//!
//! The client runs on a current-thread tokio runtime in a thread of its own (which
//! drives the socket and timers); the calls here block the caller until the answer.
//!
//! Authentication (RFC 7652) is configured exactly as for the async API, in
//! [`ClientOptions::authentication`]: `connect` returns once the client is authenticated
//! (or with [`Error::Authentication`]), and from then on every request is tagged.
//!
//! ```no_run
//! use pcp_client::blocking::PcpClient;
//! use pcp_client::core::MappingRequest;
//! use pcp_client::tokio::ClientOptions;
//! use std::time::Duration;
//!
//! let client = PcpClient::connect(ClientOptions::new("192.0.2.1:5351".parse().unwrap()))?;
//! let mut m = client.map(MappingRequest::map(6, 8080).checkpoint(true))?;
//! let grant = m.granted(Some(Duration::from_secs(10)))?;
//! println!("{} ({})", grant.external, grant.checkpoint);
//! # Ok::<(), pcp_client::Error>(())
//! ```
//!
//! With authentication:
//!
//! ```no_run
//! use pcp_client::blocking::PcpClient;
//! use pcp_client::core::{Authentication, MappingRequest};
//! use pcp_client::tokio::ClientOptions;
//! use std::time::Duration;
//!
//! let auth = Authentication::ttls("alice", b"correct horse", "/etc/pcp/ca.pem", "pcp.example")?;
//! let opts = ClientOptions::new("192.0.2.1:5351".parse().unwrap()).authentication(auth);
//! let client = PcpClient::connect(opts)?; // authenticates first
//! let mut m = client.map(MappingRequest::map(17, 5060))?; // tagged
//! println!("{}", m.granted(Some(Duration::from_secs(10)))?.external);
//! # Ok::<(), pcp_client::Error>(())
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::thread::JoinHandle;
use std::time::Duration;

use ::tokio::runtime::Handle;
use ::tokio::sync::oneshot;

use crate::core::{Apply, Event, Grant, MappingId, MappingRequest, MappingStatus, Version};
use crate::error::Error;
use crate::tokio::{self as async_api, AnnounceInfo, ClientOptions};

/// A blocking PCP client for one server.
#[derive(Debug)]
pub struct PcpClient {
    inner: Option<async_api::PcpClient>,
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl PcpClient {
    /// Starts the runtime thread, opens the socket(s) and starts the client.
    pub fn connect(opts: ClientOptions) -> Result<PcpClient, Error> {
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("pcp-client".into())
            .spawn(move || {
                let rt = match ::tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e));
                        return;
                    }
                };
                let _ = handle_tx.send(Ok(rt.handle().clone()));
                // Drives IO and timers until told to stop (or the client is dropped).
                let _ = rt.block_on(stop_rx);
            })
            .map_err(runtime_error)?;
        let handle = handle_rx
            .recv()
            .map_err(|_| Error::Closed)?
            .map_err(runtime_error)?;
        let inner = handle.block_on(async_api::PcpClient::connect(opts))?;
        Ok(PcpClient {
            inner: Some(inner),
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn inner(&self) -> &async_api::PcpClient {
        // Only taken in Drop.
        self.inner.as_ref().expect("client present until dropped")
    }

    /// The server.
    pub fn server(&self) -> SocketAddr {
        self.inner().server()
    }

    /// Creates a mapping; see [`async_api::PcpClient::map`].
    pub fn map(&self, req: MappingRequest) -> Result<Mapping, Error> {
        let m = self.handle.block_on(self.inner().map(req))?;
        Ok(Mapping {
            inner: Some(m),
            handle: self.handle.clone(),
        })
    }

    /// Sends an ANNOUNCE; see [`async_api::PcpClient::announce`].
    pub fn announce(&self, timeout: Option<Duration>) -> Result<AnnounceInfo, Error> {
        let server = self.server();
        block_with_timeout(&self.handle, timeout, server, self.inner().announce())
    }

    /// Every mapping's state, the last epoch seen, and the protocol spoken.
    pub fn status(&self) -> Result<(Vec<MappingStatus>, Option<u32>, Version), Error> {
        self.handle.block_on(self.inner().status())
    }

    /// Client-wide events (authentication, server state lost, NAT-PMP fallback):
    /// a receiver to poll with `try_recv` or block on with `blocking_recv`.
    pub fn subscribe(&self) -> ::tokio::sync::broadcast::Receiver<Event> {
        self.inner().subscribe()
    }

    /// With authentication: waits (at most `timeout`) until a PCP SA is in place; see
    /// [`async_api::PcpClient::authenticated`].
    pub fn authenticated(&self, timeout: Option<Duration>) -> Result<(), Error> {
        let server = self.server();
        block_with_timeout(&self.handle, timeout, server, self.inner().authenticated())
    }

    /// With authentication: ends the session (SESSION_TERMINATED); a later request
    /// authenticates again.
    pub fn end_session(&self) -> Result<(), Error> {
        self.inner().end_session()
    }
}

impl Drop for PcpClient {
    fn drop(&mut self) {
        // Let the task finish (it ends an authenticated session) before the runtime
        // stops: its end closes the event channel. Mapping handles still alive keep it
        // running; then the wait is cut short.
        if let Some(inner) = self.inner.take() {
            let mut events = inner.subscribe();
            drop(inner);
            self.handle.block_on(async {
                let closed = async {
                    while !matches!(
                        events.recv().await,
                        Err(::tokio::sync::broadcast::error::RecvError::Closed)
                    ) {}
                };
                let _ = ::tokio::time::timeout(Duration::from_millis(200), closed).await;
            });
        }
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn runtime_error(e: std::io::Error) -> Error {
    Error::Bind {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source: e,
    }
}

fn block_with_timeout<T>(
    handle: &Handle,
    timeout: Option<Duration>,
    server: SocketAddr,
    fut: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    handle.block_on(async {
        match timeout {
            Some(d) => ::tokio::time::timeout(d, fut)
                .await
                .unwrap_or(Err(Error::NoResponse { server })),
            None => fut.await,
        }
    })
}

/// A blocking mapping handle. Valid while its [`PcpClient`] lives.
#[derive(Debug)]
pub struct Mapping {
    inner: Option<async_api::Mapping>,
    handle: Handle,
}

impl Mapping {
    fn inner(&mut self) -> &mut async_api::Mapping {
        self.inner.as_mut().expect("mapping present until consumed")
    }

    /// Its id.
    pub fn id(&self) -> MappingId {
        self.inner.as_ref().map_or(MappingId(0), |m| m.id())
    }

    /// Waits for the first answer (at most `timeout`).
    pub fn granted(&mut self, timeout: Option<Duration>) -> Result<Grant, Error> {
        let handle = self.handle.clone();
        let server = SocketAddr::from(([0, 0, 0, 0], 0));
        block_with_timeout(&handle, timeout, server, self.inner().granted())
    }

    /// The next event, waiting at most `timeout`; `None` on timeout or when the mapping
    /// is gone.
    pub fn next_event(&mut self, timeout: Option<Duration>) -> Option<Event> {
        let handle = self.handle.clone();
        let m = self.inner();
        handle.block_on(async {
            match timeout {
                Some(d) => ::tokio::time::timeout(d, m.next_event())
                    .await
                    .ok()
                    .flatten(),
                None => m.next_event().await,
            }
        })
    }

    /// Changes the checkpoint flag, on the next renewal or now.
    pub fn set_checkpoint(&mut self, on: bool, apply: Apply) -> Result<(), Error> {
        let handle = self.handle.clone();
        handle.block_on(self.inner().set_checkpoint(on, apply))
    }

    /// Deletes the mapping; `true` if the server confirmed.
    pub fn delete(mut self) -> Result<bool, Error> {
        let m = self.inner.take().ok_or(Error::Closed)?;
        self.handle.block_on(m.delete())
    }
}
