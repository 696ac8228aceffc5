//! The daemon's single owner of the server core and the data plane. Socket tasks, the
//! expiry timer and the admin API all go through it, under one lock: the core is
//! single-threaded by design and each call is short.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use pcp_dataplane::{DataPlane, Op};
use pcp_server::{Effect, Reply, Server, Time};

use crate::config::Config;
use crate::metrics::Latency;

/// Everything behind the lock.
pub struct Core {
    /// The protocol core.
    pub server: Server,
    /// What enforces mappings.
    pub dataplane: Box<dyn DataPlane>,
    /// The configuration in force (reloads replace it).
    pub config: Config,
    /// Request latency, receive to send.
    pub latency: Latency,
    /// Data plane batches that failed (each is logged).
    pub dataplane_failures: u64,
    origin: Instant,
    effects: Vec<Effect>,
    ops: Vec<Op>,
}

/// The core shared between tasks.
#[derive(Clone)]
pub struct Shared(Arc<Mutex<Core>>);

impl Shared {
    /// Wraps a core.
    pub fn new(core: Core) -> Shared {
        Shared(Arc::new(Mutex::new(core)))
    }

    /// Locks the core. A panic while holding the lock is a bug that already aborted a
    /// task; the state stays usable, so the poison is ignored.
    pub fn lock(&self) -> MutexGuard<'_, Core> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Core {
    /// A core whose clock origin is now.
    pub fn new(
        server: Server,
        dataplane: Box<dyn DataPlane>,
        config: Config,
        origin: Instant,
    ) -> Core {
        Core {
            server,
            dataplane,
            config,
            latency: Latency::default(),
            dataplane_failures: 0,
            origin,
            effects: Vec::new(),
            ops: Vec::new(),
        }
    }

    /// The core's time for an instant.
    pub fn time_of(&self, at: Instant) -> Time {
        Time(at.saturating_duration_since(self.origin).as_millis() as u64)
    }

    /// The core's time now.
    pub fn now(&self) -> Time {
        self.time_of(Instant::now())
    }

    /// The instant of a core time.
    pub fn instant_of(&self, t: Time) -> Instant {
        self.origin + std::time::Duration::from_millis(t.0)
    }

    /// Serves one datagram; the reply, if any, is in `reply`.
    pub fn handle(&mut self, datagram: &[u8], src: SocketAddr, reply: &mut [u8]) -> Reply {
        let now = self.now();
        let r = self
            .server
            .handle(datagram, src, now, reply, &mut self.effects);
        self.apply_effects();
        r
    }

    /// Removes expired mappings.
    pub fn expire(&mut self) {
        let now = self.now();
        self.server.expire(now, &mut self.effects);
        self.apply_effects();
    }

    /// Carries out pending effects: data plane operations as one batch. Replication
    /// effects have no taker on a node without a backup.
    fn apply_effects(&mut self) {
        self.ops.clear();
        for e in self.effects.drain(..) {
            if let Effect::DataPlane(op) = e {
                self.ops.push(op);
            }
        }
        if self.ops.is_empty() {
            return;
        }
        if let Err(e) = self.dataplane.apply(&self.ops) {
            self.dataplane_failures += 1;
            tracing::error!(error = %e, ops = self.ops.len(), "data plane batch failed");
        }
    }
}
