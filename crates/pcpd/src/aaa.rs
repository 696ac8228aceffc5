//! The AAA servers of the RADIUS back end (`[auth.radius]`, docs/AUTH.md "Several AAA
//! servers"): one UDP socket and one `pcp_eap::radius::RadiusClient` (identifiers,
//! retransmission, verification) per server, the choice of server for each
//! Access-Request, and failover.
//!
//! - A conversation's first Access-Request (no State) goes to the first server in
//!   order of preference that is not marked dead. Once a server answered with an
//!   Access-Challenge, the conversation is bound to it: its State means nothing to
//!   another server.
//! - A server that does not answer after `tries` transmissions (RFC 5080 §2.2.1: same
//!   Identifier and Request Authenticator each time) is marked dead for `dead_time_s`
//!   and passed over meanwhile; then it is tried again. Its unbound request fails over
//!   to the next server not tried yet for it, as a new request (that server's own
//!   Identifier, Request Authenticator and secret). A bound conversation fails: the
//!   client starts again and lands on a live server.
//! - With every server dead, the one dead the longest is tried anyway: pcpd never
//!   refuses without asking.
//! - Any verified answer marks its server alive again.
//! - A request no server answered, or one that cannot be sent now (256 identifiers in
//!   flight), is handed back to the caller ([`GivenUp`], [`NotSent::Busy`]), which
//!   asks again later: a back end that is down is not a refused credential
//!   (docs/AUTH.md, "An unavailable back end"). A bound conversation stays bound, so
//!   its retry goes to the server that holds its State.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use pcp_eap::radius::{
    ACCESS_CHALLENGE, ATTR_STATE, AccessRequest, Outcome, RadiusClient, RadiusConfig,
};

/// The datagram for one AAA server, with the socket to send it on.
pub type Datagram = (Arc<UdpSocket>, Vec<u8>);
use tokio::net::UdpSocket;

/// One AAA server.
pub struct Aaa {
    /// Its address.
    pub addr: SocketAddr,
    client: RadiusClient,
    /// Connected to it (only its answers come in).
    pub sock: Arc<UdpSocket>,
    /// Passed over until then (ms on the gate's clock): it did not answer.
    dead_until: Option<u64>,
    /// The task receiving its answers; stopped when the server is dropped.
    pub receiver: Option<tokio::task::AbortHandle>,
}

impl Drop for Aaa {
    fn drop(&mut self) {
        if let Some(t) = self.receiver.take() {
            t.abort();
        }
    }
}

/// A request of a session in flight.
struct Flight {
    server: usize,
    req: AccessRequest,
    /// Servers this request went to.
    tried: Vec<bool>,
    /// It carries a State: bound to its server.
    bound: bool,
}

/// The AAA servers, in order of preference.
pub struct Pool {
    /// The servers.
    pub servers: Vec<Aaa>,
    dead_ms: u64,
    flight: HashMap<u32, Flight>,
    /// The server each conversation is bound to (it sent an Access-Challenge).
    bound: HashMap<u32, usize>,
}

/// Datagrams to send, each with the socket of its AAA server.
pub type Datagrams = Vec<(Arc<UdpSocket>, Vec<u8>)>;

/// What [`Pool::handle_timeout`] gives: datagrams to send, requests given up on.
pub type Timeouts = (Datagrams, Vec<GivenUp>);

/// A request no AAA server answered after every try and failover.
#[derive(Debug)]
pub struct GivenUp {
    /// Its session.
    pub session: u32,
    /// The request, to ask again later.
    pub req: AccessRequest,
    /// Why (for the log).
    pub error: pcp_eap::radius::RadiusError,
}

/// Why [`Pool::send`] sent nothing.
#[derive(Debug)]
pub enum NotSent {
    /// The server has 256 requests in flight: the request, to send later.
    Busy(AccessRequest),
    /// The conversation is bound to a server no longer configured (a reload): its
    /// State means nothing to the others, the conversation must start again.
    Unbound,
}

impl Pool {
    /// Servers from their settings (same order) and sockets; `dead_time_s` as configured.
    pub fn new(servers: Vec<(Arc<RadiusConfig>, SocketAddr, UdpSocket)>, dead_time_s: u64) -> Pool {
        Pool {
            servers: servers
                .into_iter()
                .map(|(cfg, addr, sock)| Aaa {
                    addr,
                    client: RadiusClient::new(cfg),
                    sock: Arc::new(sock),
                    dead_until: None,
                    receiver: None,
                })
                .collect(),
            dead_ms: dead_time_s.saturating_mul(1000),
            flight: HashMap::new(),
            bound: HashMap::new(),
        }
    }

    fn alive(&self, i: usize, now: u64) -> bool {
        self.servers[i].dead_until.is_none_or(|t| now >= t)
    }

    /// The server for a new request: the first live one not tried yet, else the
    /// untried one dead the longest.
    fn pick(&self, now: u64, tried: &[bool]) -> Option<usize> {
        let untried = || (0..self.servers.len()).filter(|&i| !tried[i]);
        untried()
            .find(|&i| self.alive(i, now))
            .or_else(|| untried().min_by_key(|&i| self.servers[i].dead_until))
    }

    /// Sends `req` of `session`: the socket and datagram, or why it cannot go now.
    pub fn send(
        &mut self,
        session: u32,
        req: AccessRequest,
        now: u64,
    ) -> Result<Datagram, NotSent> {
        let bound = req.attributes.iter().any(|(t, _)| *t == ATTR_STATE);
        let n = self.servers.len();
        let server = if bound {
            *self.bound.get(&session).ok_or(NotSent::Unbound)?
        } else {
            self.bound.remove(&session);
            match self.pick(now, &vec![false; n]) {
                Some(i) => i,
                None => return Err(NotSent::Busy(req)),
            }
        };
        let Some(d) = self
            .servers
            .get_mut(server)
            .and_then(|s| s.client.send(session, &req, now))
        else {
            return Err(NotSent::Busy(req));
        };
        let mut tried = vec![false; n];
        tried[server] = true;
        self.flight.insert(
            session,
            Flight {
                server,
                req,
                tried,
                bound,
            },
        );
        Ok((self.servers[server].sock.clone(), d))
    }

    /// Takes every request in flight (a reload replaces the servers): each with its
    /// session and whether it is bound to its server.
    pub fn take_flights(&mut self) -> Vec<(u32, AccessRequest, bool)> {
        self.bound.clear();
        self.flight
            .drain()
            .map(|(id, f)| (id, f.req, f.bound))
            .collect()
    }

    /// A datagram that came in on `sock`: the session it answers and the answer, or
    /// the error of one that fails verification.
    pub fn receive(
        &mut self,
        sock: &Arc<UdpSocket>,
        datagram: &[u8],
    ) -> Result<Option<Outcome>, pcp_eap::radius::RadiusError> {
        let Some(i) = self.servers.iter().position(|s| Arc::ptr_eq(&s.sock, sock)) else {
            return Ok(None);
        };
        let Some((session, answer)) = self.servers[i].client.receive(datagram)? else {
            return Ok(None);
        };
        if self.servers[i].dead_until.take().is_some() {
            tracing::info!(server = %self.servers[i].addr, "RADIUS server answers again");
        }
        self.flight.remove(&session);
        match &answer {
            Ok(a) if a.code == ACCESS_CHALLENGE => {
                self.bound.insert(session, i);
            }
            _ => {
                self.bound.remove(&session);
            }
        }
        Ok(Some((session, answer)))
    }

    /// Retransmissions due, failovers, and sessions given up on.
    pub fn handle_timeout(&mut self, now: u64) -> Timeouts {
        let (mut out, mut failed) = (Vec::new(), Vec::new());
        for i in 0..self.servers.len() {
            let (again, gave_up) = self.servers[i].client.handle_timeout(now);
            let sock = self.servers[i].sock.clone();
            out.extend(again.into_iter().map(|d| (sock.clone(), d)));
            if gave_up.is_empty() {
                continue;
            }
            if self.alive(i, now) {
                tracing::warn!(
                    server = %self.servers[i].addr,
                    dead_time_s = self.dead_ms / 1000,
                    "RADIUS server did not answer: passed over for the dead time"
                );
            }
            self.servers[i].dead_until = Some(now + self.dead_ms);
            for (session, answer) in gave_up {
                match self.fail_over(session, now) {
                    Some(d) => out.push(d),
                    None => {
                        // The binding stays: the retry goes to the server holding the
                        // conversation's State.
                        if let Some(f) = self.flight.remove(&session) {
                            failed.push(GivenUp {
                                session,
                                req: f.req,
                                error: answer.err().unwrap_or(
                                    pcp_eap::radius::RadiusError::Timeout {
                                        server: self.servers[i].addr.to_string(),
                                        tries: 0,
                                    },
                                ),
                            });
                        }
                    }
                }
            }
        }
        (out, failed)
    }

    /// Sends the unbound request of `session` to a server it has not tried.
    fn fail_over(&mut self, session: u32, now: u64) -> Option<(Arc<UdpSocket>, Vec<u8>)> {
        let f = self.flight.get(&session)?;
        if f.bound {
            return None;
        }
        let j = self.pick(now, &f.tried)?;
        let d = self.servers[j].client.send(session, &f.req, now)?;
        tracing::info!(
            session_id = session,
            from = %self.servers[f.server].addr,
            to = %self.servers[j].addr,
            "RADIUS failover"
        );
        let f = self.flight.get_mut(&session)?;
        f.tried[j] = true;
        f.server = j;
        Some((self.servers[j].sock.clone(), d))
    }

    /// When [`Pool::handle_timeout`] must run next (ms).
    pub fn poll_timeout(&self) -> Option<u64> {
        self.servers
            .iter()
            .filter_map(|s| s.client.poll_timeout())
            .min()
    }

    /// A session ended: forget its binding.
    pub fn forget(&mut self, session: u32) {
        self.flight.remove(&session);
        self.bound.remove(&session);
    }

    /// Whether a server is passed over now (admin view, tests).
    pub fn dead(&self, now: u64) -> Vec<SocketAddr> {
        (0..self.servers.len())
            .filter(|&i| !self.alive(i, now))
            .map(|i| self.servers[i].addr)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcp_eap::radius::{ATTR_EAP_MESSAGE, encode_response};

    const SECRET: &[u8] = b"s";

    fn pool(n: usize) -> Pool {
        let servers = (0..n)
            .map(|i| {
                let addr: SocketAddr = format!("127.0.0.1:{}", 40_000 + i).parse().unwrap();
                let cfg = Arc::new(RadiusConfig {
                    server: addr.to_string(),
                    secret: SECRET.to_vec(),
                    nas_identifier: "t".into(),
                    timeout_ms: 100,
                    tries: 2,
                });
                let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                s.set_nonblocking(true).unwrap();
                (cfg, addr, UdpSocket::from_std(s).unwrap())
            })
            .collect();
        Pool::new(servers, 10)
    }

    fn request(state: bool) -> AccessRequest {
        let mut attributes = vec![(ATTR_EAP_MESSAGE, vec![2, 0, 0, 5, 1])];
        if state {
            attributes.push((ATTR_STATE, b"st".to_vec()));
        }
        AccessRequest { attributes }
    }

    /// The answer the server would give to `datagram`.
    fn challenge(datagram: &[u8]) -> Vec<u8> {
        let auth: [u8; 16] = datagram[4..20].try_into().unwrap();
        encode_response(
            ACCESS_CHALLENGE,
            datagram[1],
            &auth,
            &[
                (ATTR_EAP_MESSAGE, vec![1, 1, 0, 4]),
                (ATTR_STATE, b"st".to_vec()),
            ],
            SECRET,
        )
    }

    fn index(p: &Pool, sock: &Arc<UdpSocket>) -> usize {
        p.servers
            .iter()
            .position(|s| Arc::ptr_eq(&s.sock, sock))
            .unwrap()
    }

    /// Order of preference, failover of an unbound request after `tries`, the dead
    /// server passed over for the dead time and asked again after it, conversations
    /// bound to the server that challenged them (no failover), and every server
    /// dead: the one dead the longest is asked.
    #[tokio::test]
    async fn failover_dead_time_and_bound_conversations() {
        let mut p = pool(3);
        let (s, d) = p.send(1, request(false), 0).unwrap();
        assert_eq!(index(&p, &s), 0, "the preferred server first");
        // Two tries to server 0, then server 1 (a new request: another identifier
        // space and authenticator).
        let (out, failed) = p.handle_timeout(100);
        assert_eq!((out.len(), failed.len()), (1, 0));
        assert_eq!(out[0].1, d, "a retransmission is the same datagram");
        let (out, failed) = p.handle_timeout(200);
        assert!(failed.is_empty());
        assert_eq!(out.len(), 1);
        assert_eq!(index(&p, &out[0].0), 1, "failed over");
        assert_ne!(out[0].1[4..20], d[4..20]);
        assert_eq!(p.dead(200), vec![p.servers[0].addr]);
        // Server 1 challenges: alive, and the conversation is bound to it.
        let answer = challenge(&out[0].1);
        let s1 = p.servers[1].sock.clone();
        let (sid, a) = p.receive(&s1, &answer).unwrap().unwrap();
        assert_eq!(sid, 1);
        assert_eq!(a.unwrap().code, ACCESS_CHALLENGE);
        // A new conversation skips dead server 0.
        let (s, d2) = p.send(2, request(false), 300).unwrap();
        assert_eq!(index(&p, &s), 1);
        assert!(p.receive(&s1, &challenge(&d2)).unwrap().is_some());
        // The bound conversation's next request goes to server 1 and, unanswered,
        // fails instead of moving to a server that does not know its State.
        let (s, _) = p.send(1, request(true), 300).unwrap();
        assert_eq!(index(&p, &s), 1);
        p.handle_timeout(400);
        let (out, mut failed) = p.handle_timeout(500);
        assert!(out.is_empty());
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].session, 1);
        // Still bound: the retry goes to the server that holds the State.
        let (s, _) = p.send(1, failed.pop().unwrap().req, 600).unwrap();
        assert_eq!(index(&p, &s), 1);
        p.forget(1);
        // After the dead time server 0 is asked again.
        let (s, _) = p.send(3, request(false), 200 + 10_000).unwrap();
        assert_eq!(index(&p, &s), 0);
        p.forget(3);
        // A State whose server is unknown (binding forgotten) cannot be sent.
        assert!(matches!(
            p.send(4, request(true), 20_000),
            Err(NotSent::Unbound)
        ));
        // Every server dead: the one dead the longest.
        let mut q = pool(2);
        q.servers[0].dead_until = Some(5_000);
        q.servers[1].dead_until = Some(4_000);
        let (s, _) = q.send(9, request(false), 1_000).unwrap();
        assert_eq!(index(&q, &s), 1);
    }

    /// A server with 256 requests in flight takes no more: the request comes back
    /// (to be asked again later), it does not fail its session.
    #[tokio::test]
    async fn a_full_identifier_space_hands_the_request_back() {
        let mut p = pool(1);
        for session in 0..256 {
            p.send(session, request(false), 0).unwrap();
        }
        let Err(NotSent::Busy(req)) = p.send(256, request(false), 0) else {
            panic!("the 257th request was sent or refused for good");
        };
        assert_eq!(req, request(false));
        p.forget(0);
        // Once one answer is in (here: a request no longer in flight), it goes.
        let (s, d) = p.send(0, request(false), 0).unwrap();
        let answer = challenge(&d);
        assert!(p.receive(&s, &answer).unwrap().is_some());
        assert!(p.send(256, req, 0).is_ok());
    }
}
