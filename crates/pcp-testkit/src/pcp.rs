//! PCP over UDP from a test: MAP and PEER requests from a socket on loopback, and their
//! answers parsed.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use pcp_proto::{Body, MapBody, Options, PcpOption, PeerBody, Request, Response, ResultCode};

/// How long a UDP request waits for its answer.
pub const UDP_TIMEOUT: Duration = Duration::from_secs(3);

/// A MAP request's parameters.
#[derive(Debug, Clone, Copy)]
pub struct Map {
    /// IANA protocol number.
    pub protocol: u8,
    /// Internal port.
    pub internal_port: u16,
    /// Requested lifetime (0 deletes).
    pub lifetime: u32,
    /// Mapping nonce.
    pub nonce: [u8; 12],
    /// Send CHECKPOINT_REQUIRED (192).
    pub checkpoint: bool,
}

impl Map {
    /// A UDP MAP for `internal_port`, one hour, with option 192, nonce from the port.
    pub fn udp(internal_port: u16) -> Map {
        let mut nonce = *b"test-nonce-0";
        nonce[10..].copy_from_slice(&internal_port.to_be_bytes());
        Map {
            protocol: pcp_proto::protocol::UDP,
            internal_port,
            lifetime: 3600,
            nonce,
            checkpoint: true,
        }
    }

    /// The same without option 192.
    pub fn without_checkpoint(mut self) -> Map {
        self.checkpoint = false;
        self
    }
}

/// A parsed PCP answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Result code.
    pub result: ResultCode,
    /// Lifetime.
    pub lifetime: u32,
    /// Assigned external endpoint (MAP/PEER bodies).
    pub external: Option<SocketAddr>,
    /// Whether option 192 came back.
    pub checkpoint_echoed: bool,
    /// The server's epoch time for this client.
    pub epoch: u32,
    /// The datagram.
    pub raw: Vec<u8>,
}

/// A UDP PCP/NAT-PMP client bound to one loopback address.
pub struct PcpClient {
    sock: UdpSocket,
    server: SocketAddr,
}

impl PcpClient {
    /// A client on `local`:(free port) talking to `server`.
    pub fn new(local: IpAddr, server: SocketAddr) -> PcpClient {
        let sock = UdpSocket::bind((local, 0)).expect("bind the client socket");
        sock.set_read_timeout(Some(UDP_TIMEOUT))
            .expect("set a read timeout");
        PcpClient { sock, server }
    }

    /// The client's address (what PCP's client address field must say).
    pub fn ip(&self) -> IpAddr {
        self.sock.local_addr().expect("local_addr").ip()
    }

    /// Sends `datagram` and returns the answer; panics after the timeout.
    pub fn exchange(&self, datagram: &[u8]) -> Vec<u8> {
        self.send(datagram);
        self.recv().unwrap_or_else(|e| {
            panic!("no answer from {} within {UDP_TIMEOUT:?}: {e}", self.server)
        })
    }

    /// Sends `datagram` without waiting for an answer.
    pub fn send(&self, datagram: &[u8]) {
        self.sock
            .send_to(datagram, self.server)
            .expect("send the datagram");
    }

    /// Waits for a datagram.
    pub fn recv(&self) -> std::io::Result<Vec<u8>> {
        let mut buf = [0u8; 2048];
        let (n, from) = self.sock.recv_from(&mut buf)?;
        assert_eq!(from, self.server, "answer from an unexpected address");
        Ok(buf[..n].to_vec())
    }

    /// Waits up to `wait` for a datagram; `None` when none came.
    pub fn recv_within(&self, wait: Duration) -> Option<Vec<u8>> {
        self.sock.set_read_timeout(Some(wait)).expect("timeout");
        let got = self.recv().ok();
        self.sock
            .set_read_timeout(Some(UDP_TIMEOUT))
            .expect("timeout");
        got
    }

    /// Sends a MAP and parses the answer.
    pub fn map(&self, m: Map) -> Answer {
        parse_answer(&self.exchange(&self.map_request(m)))
    }

    /// Sends a MAP and waits up to `wait` for the answer to *it* (same nonce, protocol
    /// and internal port; anything else that comes in meanwhile is skipped).
    pub fn try_map(&self, m: Map, wait: Duration) -> Option<Answer> {
        self.send(&self.map_request(m));
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let raw = self.recv_within(left)?;
            let Ok(resp) = Response::parse(&raw) else {
                continue;
            };
            if let Body::Map(b) = resp.body
                && b.nonce == m.nonce
                && b.protocol == m.protocol
                && b.internal_port == m.internal_port
            {
                return Some(parse_answer(&raw));
            }
        }
    }

    /// The MAP request for `m` from this client's address.
    pub fn map_request(&self, m: Map) -> Vec<u8> {
        self.request(m, None)
    }

    /// Sends a PEER for `m` with remote peer `remote` and parses the answer.
    pub fn peer(&self, m: Map, remote: SocketAddr) -> Answer {
        parse_answer(&self.exchange(&self.request(m, Some(remote))))
    }

    /// A MAP request, or with `remote` a PEER request, for `m`.
    pub fn request(&self, m: Map, remote: Option<SocketAddr>) -> Vec<u8> {
        let opts = [PcpOption::CheckpointRequired];
        let mapping = MapBody {
            nonce: m.nonce,
            protocol: m.protocol,
            internal_port: m.internal_port,
            external_port: 0,
            external_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        };
        let req = Request {
            lifetime: m.lifetime,
            client_addr: self.ip(),
            body: match remote {
                None => Body::Map(mapping),
                Some(r) => Body::Peer(PeerBody {
                    mapping,
                    remote_port: r.port(),
                    remote_addr: r.ip(),
                }),
            },
            options: if m.checkpoint {
                Options::from_list(&opts)
            } else {
                Options::EMPTY
            },
            pa_result_code: ResultCode::Success,
        };
        let mut buf = [0u8; pcp_proto::MAX_MESSAGE_LEN];
        let n = req.emit(&mut buf).expect("emit the request");
        buf[..n].to_vec()
    }
}

/// Parses a PCP answer; panics when it is not one.
pub fn parse_answer(raw: &[u8]) -> Answer {
    let resp = Response::parse(raw).unwrap_or_else(|e| panic!("bad PCP answer {raw:02x?}: {e}"));
    Answer {
        result: resp.result_code,
        lifetime: resp.lifetime,
        external: resp
            .body
            .mapping()
            .map(|m| SocketAddr::new(m.external_addr, m.external_port)),
        checkpoint_echoed: resp.options.checkpoint_required(),
        epoch: resp.epoch,
        raw: raw.to_vec(),
    }
}

/// A TCP MAP request from `client_addr` (nonce `[1; 12]`, `internal_port`, `lifetime`),
/// emitted into a buffer of 1100 octets, room enough for an AUTHENTICATION_TAG option
/// after it; the buffer and the request's length.
pub fn tcp_map_request(client_addr: IpAddr, internal_port: u16, lifetime: u32) -> (Vec<u8>, usize) {
    let req = Request {
        lifetime,
        client_addr,
        body: Body::Map(MapBody {
            nonce: [1; 12],
            protocol: 6,
            internal_port,
            external_port: 0,
            external_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        }),
        options: Options::EMPTY,
        pa_result_code: ResultCode::Success,
    };
    let mut buf = vec![0u8; 1100];
    let n = req.emit(&mut buf).expect("emit the request");
    (buf, n)
}
