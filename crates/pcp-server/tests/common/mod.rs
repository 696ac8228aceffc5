//! Shared helpers for the pcp-server integration tests: a simulated clock around
//! [`Server::handle`], request builders on top of the `pcp-proto` codec, and owned
//! responses that are easy to assert on.
//!
//! Every test file uses a different subset of these helpers.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use pcp_proto::{
    Body, MapBody, OptionCode, Options, PcpOption, PeerBody, Request, Response, ResultCode, natpmp,
    protocol,
};
use pcp_server::config::{PolicyRule, RuleAction, WithoutBackup};
use pcp_server::{Effect, Mapping, MappingKey, Reply, Server, ServerConfig, Time};

/// Where the simulated clock starts (not zero, so that "time 0" bugs show).
pub const START: Time = Time(1_000_000);
/// The source port every simulated client sends from.
pub const CLIENT_PORT: u16 = 40_000;
/// The default pool's only external address.
pub const EXTERNAL: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));

/// `10.0.0.n`.
pub fn host(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))
}

/// A remote peer `198.51.100.n`.
pub fn remote(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 51, 100, n))
}

/// The default configuration with `checkpoint.without_backup = Honour`, so checkpoints
/// are granted without a backup (what most checkpoint tests want).
pub fn honour_cfg() -> ServerConfig {
    let mut cfg = ServerConfig::default();
    cfg.checkpoint.without_backup = WithoutBackup::Honour;
    cfg
}

/// A policy rule with no conditions.
pub fn rule(name: &str, action: RuleAction) -> PolicyRule {
    PolicyRule {
        name: name.into(),
        action,
        tiers: vec![],
        subscribers: vec![],
        internal_prefixes: vec![],
        opcodes: vec![],
        protocols: vec![],
        internal_ports: vec![],
        remote_ports: vec![],
        remote_prefixes: vec![],
    }
}

/// A policy rule matching one internal port.
pub fn port_rule(name: &str, action: RuleAction, port: u16) -> PolicyRule {
    let mut r = rule(name, action);
    r.internal_ports = vec![port.to_string().parse().expect("port range")];
    r
}

/// A PCP MAP or PEER request under construction.
#[derive(Debug, Clone)]
pub struct Req {
    /// The PCP Client's IP Address field.
    pub client: IpAddr,
    /// The packet's source address.
    pub src: IpAddr,
    /// Requested lifetime.
    pub lifetime: u32,
    /// Mapping nonce.
    pub nonce: [u8; 12],
    /// IANA protocol.
    pub protocol: u8,
    /// Internal port.
    pub internal_port: u16,
    /// Suggested external port.
    pub ext_port: u16,
    /// Suggested external address.
    pub ext_addr: IpAddr,
    /// Remote peer (PEER) or none (MAP).
    pub peer: Option<(IpAddr, u16)>,
    /// Options, in order.
    pub options: Vec<PcpOption<'static>>,
}

impl Req {
    /// A UDP MAP from `host` for `internal_port`, lifetime 3600 s, nonce `[1; 12]`.
    pub fn map(host: IpAddr, internal_port: u16) -> Req {
        Req {
            client: host,
            src: host,
            lifetime: 3600,
            nonce: [1; 12],
            protocol: protocol::UDP,
            internal_port,
            ext_port: 0,
            ext_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            peer: None,
            options: Vec::new(),
        }
    }

    /// A UDP PEER from `host:internal_port` to `remote:remote_port`.
    pub fn peer(host: IpAddr, internal_port: u16, remote: IpAddr, remote_port: u16) -> Req {
        Req {
            peer: Some((remote, remote_port)),
            ..Req::map(host, internal_port)
        }
    }

    /// Sets the lifetime.
    pub fn lifetime(mut self, l: u32) -> Req {
        self.lifetime = l;
        self
    }

    /// Sets the nonce.
    pub fn nonce(mut self, n: [u8; 12]) -> Req {
        self.nonce = n;
        self
    }

    /// Sets the protocol.
    pub fn protocol(mut self, p: u8) -> Req {
        self.protocol = p;
        self
    }

    /// Sets the suggested external endpoint.
    pub fn suggest(mut self, addr: IpAddr, port: u16) -> Req {
        self.ext_addr = addr;
        self.ext_port = port;
        self
    }

    /// Sets the PCP Client's IP Address field (not the source).
    pub fn client_field(mut self, ip: IpAddr) -> Req {
        self.client = ip;
        self
    }

    /// Sets the packet's source and the client field together.
    pub fn from(mut self, ip: IpAddr) -> Req {
        self.client = ip;
        self.src = ip;
        self
    }

    /// Appends an option.
    pub fn opt(mut self, o: PcpOption<'static>) -> Req {
        self.options.push(o);
        self
    }

    /// Appends CHECKPOINT_REQUIRED (192).
    pub fn cp(self) -> Req {
        self.opt(PcpOption::CheckpointRequired)
    }

    /// The key of the mapping this request is about (without THIRD_PARTY).
    pub fn key(&self) -> MappingKey {
        MappingKey {
            internal: self.src,
            protocol: self.protocol,
            internal_port: self.internal_port,
            remote: self.peer,
        }
    }

    /// The request on the wire.
    pub fn bytes(&self) -> Vec<u8> {
        let mapping = MapBody {
            nonce: self.nonce,
            protocol: self.protocol,
            internal_port: self.internal_port,
            external_port: self.ext_port,
            external_addr: self.ext_addr,
        };
        let body = match self.peer {
            None => Body::Map(mapping),
            Some((remote_addr, remote_port)) => Body::Peer(PeerBody {
                mapping,
                remote_port,
                remote_addr,
            }),
        };
        let req = Request {
            lifetime: self.lifetime,
            client_addr: self.client,
            body,
            options: Options::from_list(&self.options),
            pa_result_code: ResultCode::Success,
        };
        let mut buf = vec![0u8; 2048];
        let n = req.emit(&mut buf).expect("request fits");
        buf.truncate(n);
        buf
    }
}

/// A 24-octet request header: version, R bit + opcode octet, lifetime, client address.
pub fn raw_header(version: u8, r_opcode: u8, lifetime: u32, client: IpAddr) -> Vec<u8> {
    let mut b = vec![0u8; 24];
    b[0] = version;
    b[1] = r_opcode;
    b[4..8].copy_from_slice(&lifetime.to_be_bytes());
    b[8..24].copy_from_slice(&pcp_proto::encode_addr(client));
    b
}

/// An ANNOUNCE request from `host`.
pub fn announce(host: IpAddr) -> Vec<u8> {
    raw_header(2, 0, 0, host)
}

/// A NAT-PMP map request.
pub fn natpmp_map(
    proto: natpmp::Protocol,
    internal_port: u16,
    suggested: u16,
    life: u32,
) -> Vec<u8> {
    let mut buf = [0u8; 16];
    let n = natpmp::Request::Map(natpmp::MapRequest {
        protocol: proto,
        internal_port,
        suggested_external_port: suggested,
        lifetime: life,
    })
    .emit(&mut buf)
    .expect("fits");
    buf[..n].to_vec()
}

/// An owned PCP response.
#[derive(Debug, Clone)]
pub struct Resp {
    /// The response octets.
    pub bytes: Vec<u8>,
}

impl Resp {
    /// The parsed response.
    pub fn parsed(&self) -> Response<'_> {
        Response::parse(&self.bytes).unwrap_or_else(|e| panic!("bad response {e}: {self:?}"))
    }

    /// Result code.
    pub fn result(&self) -> ResultCode {
        ResultCode::from(self.bytes[3])
    }

    /// Lifetime field.
    pub fn lifetime(&self) -> u32 {
        u32::from_be_bytes(self.bytes[4..8].try_into().expect("4 octets"))
    }

    /// Epoch field.
    pub fn epoch(&self) -> u32 {
        u32::from_be_bytes(self.bytes[8..12].try_into().expect("4 octets"))
    }

    /// The MAP-shaped part of the body (MAP or PEER).
    pub fn mapping(&self) -> MapBody {
        *self.parsed().body.mapping().expect("a MAP or PEER body")
    }

    /// The assigned external endpoint.
    pub fn external(&self) -> (IpAddr, u16) {
        let m = self.mapping();
        (m.external_addr, m.external_port)
    }

    /// Codes of the options the response carries, in order.
    pub fn option_codes(&self) -> Vec<u8> {
        self.parsed()
            .options
            .iter()
            .map(|o| u8::from(o.code()))
            .collect()
    }

    /// Whether the response carries CHECKPOINT_REQUIRED.
    pub fn has_checkpoint(&self) -> bool {
        self.parsed()
            .options
            .contains(OptionCode::CheckpointRequired)
    }
}

/// A server on a simulated clock.
pub struct Harness {
    /// The server under test.
    pub server: Server,
    /// Simulated time.
    pub now: Time,
    /// Effects of the last call.
    pub effects: Vec<Effect>,
    /// Whether the last reply was `Reply::Hold` (to be sent once the backup has
    /// acknowledged the replication effects).
    pub held: bool,
}

impl Harness {
    /// A server with `cfg` started at [`START`].
    pub fn new(cfg: ServerConfig) -> Harness {
        Harness {
            server: Server::new(cfg, START, 7).expect("valid config"),
            now: START,
            effects: Vec::new(),
            held: false,
        }
    }

    /// A server with [`honour_cfg`].
    pub fn honour() -> Harness {
        Harness::new(honour_cfg())
    }

    /// Sends raw octets from `src`; returns the reply octets (sent now or held), or
    /// `None` when dropped. The effects of this call replace [`Harness::effects`].
    pub fn send_raw(&mut self, bytes: &[u8], src: IpAddr) -> Option<Vec<u8>> {
        self.effects.clear();
        let mut reply = [0u8; 1100];
        let r = self.server.handle(
            bytes,
            SocketAddr::new(src, CLIENT_PORT),
            self.now,
            &mut reply,
            &mut self.effects,
        );
        self.held = matches!(r, Reply::Hold(_));
        match r {
            Reply::Drop => None,
            Reply::Send(n) | Reply::Hold(n) => Some(reply[..n].to_vec()),
        }
    }

    /// Sends raw PCP octets from `src` and expects a PCP reply.
    pub fn pcp_raw(&mut self, bytes: &[u8], src: IpAddr) -> Resp {
        let bytes = self
            .send_raw(bytes, src)
            .expect("the server answers this request");
        Resp { bytes }
    }

    /// Sends a request and returns the response.
    pub fn pcp(&mut self, req: &Req) -> Resp {
        self.pcp_raw(&req.bytes(), req.src)
    }

    /// Sends a request and asserts SUCCESS.
    pub fn ok(&mut self, req: &Req) -> Resp {
        let r = self.pcp(req);
        assert_eq!(r.result(), ResultCode::Success, "{req:?}");
        r
    }

    /// Sends a NAT-PMP datagram from `src` and parses the reply.
    pub fn natpmp(&mut self, bytes: &[u8], src: IpAddr) -> natpmp::Response {
        let reply = self
            .send_raw(bytes, src)
            .expect("the server answers NAT-PMP");
        natpmp::Response::parse(&reply).expect("a NAT-PMP response")
    }

    /// Advances the clock by `ms` milliseconds (without expiring anything).
    pub fn advance_ms(&mut self, ms: u64) {
        self.now = Time(self.now.0 + ms);
    }

    /// Advances the clock by `secs` seconds (without expiring anything).
    pub fn advance_secs(&mut self, secs: u64) {
        self.advance_ms(secs * 1000);
    }

    /// Runs [`Server::expire`] at the current time; effects replace [`Harness::effects`].
    pub fn expire(&mut self) {
        self.effects.clear();
        self.server.expire(self.now, &mut self.effects);
    }

    /// The mapping with this key, cloned.
    pub fn mapping(&self, key: &MappingKey) -> Option<Mapping> {
        self.server.mapping(key)
    }

    /// The data plane refused the batch of the last request (`bytes` from `src`):
    /// [`Server::refuse`] it with `code`. Returns the rewritten reply; the take-back's
    /// effects replace [`Harness::effects`].
    pub fn refuse(&mut self, bytes: &[u8], src: IpAddr, code: ResultCode) -> Option<Vec<u8>> {
        self.effects.clear();
        let mut reply = [0u8; 1100];
        let r = self.server.refuse(
            bytes,
            SocketAddr::new(src, CLIENT_PORT),
            self.now,
            code,
            &mut reply,
            &mut self.effects,
        );
        self.held = matches!(r, Reply::Hold(_));
        match r {
            Reply::Drop => None,
            Reply::Send(n) | Reply::Hold(n) => Some(reply[..n].to_vec()),
        }
    }

    /// Asserts the server's internal invariants.
    pub fn check(&self) {
        self.server
            .check_invariants()
            .unwrap_or_else(|e| panic!("invariant broken: {e}"));
    }
}
