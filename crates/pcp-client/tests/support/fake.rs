//! A fake PCP / NAT-PMP server for deterministic tests of the sans-IO core, built on
//! `pcp-proto`, and a simulator that moves time forward.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use pcp_client::core::{Client, Config, Event, Time, Transmit};
use pcp_proto::{
    Body, Opcode, Options, PcpOption, Request, Response, ResultCode, emit_error_response, natpmp,
};

pub const SERVER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9)), 5351);
pub const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10));
pub const EXTERNAL: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 5);

/// How the fake answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// RFC-conformant PCP: echoes 192 when `honour`, never unknown options.
    Pcp,
    /// Copies every request option into success responses (like miniupnpd).
    BlindEcho,
    /// Refuses unknown optional options with MALFORMED_OPTION (non-conformant).
    RejectUnknown,
    /// Speaks NAT-PMP only.
    NatPmpOnly,
    /// Answers every MAP/PEER with this error.
    Error(ResultCode, u32),
    /// Never answers.
    Silent,
}

pub struct FakeServer {
    pub mode: Mode,
    pub honour: bool,
    /// Epoch starts here.
    pub epoch_base: Time,
    /// Max lifetime granted.
    pub max_lifetime: u32,
    /// (protocol, internal port) → (nonce, external port, checkpointed).
    pub table: HashMap<(u8, u16), ([u8; 12], u16, bool)>,
    /// Next external port.
    pub next_port: u16,
    /// Every request received: time and bytes.
    pub received: Vec<(Time, Vec<u8>)>,
}

impl FakeServer {
    pub fn new(mode: Mode) -> FakeServer {
        FakeServer {
            mode,
            honour: true,
            epoch_base: Time::ZERO,
            max_lifetime: 3600,
            table: HashMap::new(),
            next_port: 40000,
            received: Vec::new(),
        }
    }

    pub fn epoch(&self, now: Time) -> u32 {
        ((now.0.saturating_sub(self.epoch_base.0)) / 1000) as u32
    }

    /// Loses all state and restarts its epoch at `now`.
    pub fn restart(&mut self, now: Time) {
        self.table.clear();
        self.epoch_base = now;
        self.next_port += 1000;
    }

    /// An unsolicited ANNOUNCE response.
    pub fn announce(&self, now: Time) -> Vec<u8> {
        let r = Response {
            result_code: ResultCode::Success,
            lifetime: 0,
            epoch: self.epoch(now),
            body: Body::Announce,
            options: Options::EMPTY,
        };
        let mut buf = vec![0; r.buffer_len()];
        let n = r.emit(&mut buf).unwrap();
        buf.truncate(n);
        buf
    }

    pub fn handle(&mut self, req: &[u8], now: Time) -> Option<Vec<u8>> {
        self.received.push((now, req.to_vec()));
        if self.mode == Mode::Silent {
            return None;
        }
        if self.mode == Mode::NatPmpOnly {
            return self.handle_natpmp(req, now);
        }
        let epoch = self.epoch(now);
        let r = Request::parse(req).ok()?;
        let mut out = vec![0u8; 1100];
        if let Mode::Error(code, life) = self.mode
            && r.opcode() != Opcode::Announce
        {
            let n = emit_error_response(req, code, life, epoch, true, &mut out).unwrap();
            out.truncate(n);
            return Some(out);
        }
        let has_unknown = r
            .options
            .iter()
            .any(|o| matches!(o, PcpOption::Unknown { .. }));
        if self.mode == Mode::RejectUnknown && has_unknown {
            let n = emit_error_response(
                req,
                ResultCode::MalformedOption,
                1800,
                epoch,
                true,
                &mut out,
            )
            .unwrap();
            out.truncate(n);
            return Some(out);
        }
        let (body, lifetime) = match r.body {
            Body::Announce => (Body::Announce, 0),
            Body::Map(_) | Body::Peer(_) => {
                let mut body = r.body;
                let mb = match &mut body {
                    Body::Map(m) => m,
                    Body::Peer(p) => &mut p.mapping,
                    _ => unreachable!(),
                };
                let key = (mb.protocol, mb.internal_port);
                let ckpt = self.honour && r.options.checkpoint_required();
                if r.lifetime == 0 {
                    if let Some(e) = self.table.get(&key)
                        && e.0 != mb.nonce
                    {
                        let n = emit_error_response(
                            req,
                            ResultCode::NotAuthorized,
                            1800,
                            epoch,
                            true,
                            &mut out,
                        )
                        .unwrap();
                        out.truncate(n);
                        return Some(out);
                    }
                    self.table.remove(&key);
                    (body, 0)
                } else {
                    let port = match self.table.get(&key) {
                        Some(e) if e.0 != mb.nonce => {
                            let n = emit_error_response(
                                req,
                                ResultCode::NotAuthorized,
                                1800,
                                epoch,
                                true,
                                &mut out,
                            )
                            .unwrap();
                            out.truncate(n);
                            return Some(out);
                        }
                        Some(e) => e.1,
                        None => {
                            self.next_port += 1;
                            self.next_port
                        }
                    };
                    self.table.insert(key, (mb.nonce, port, ckpt));
                    mb.external_port = port;
                    mb.external_addr = IpAddr::V4(EXTERNAL);
                    (body, r.lifetime.min(self.max_lifetime))
                }
            }
            Body::Authentication(_) => return None,
        };
        let mut list: Vec<PcpOption<'_>> = Vec::new();
        match self.mode {
            Mode::BlindEcho => list.extend(r.options.iter()),
            _ => {
                if let Some(tp) = r.options.third_party() {
                    list.push(PcpOption::ThirdParty(tp));
                }
                if self.honour && r.options.checkpoint_required() && lifetime > 0 {
                    list.push(PcpOption::CheckpointRequired);
                }
            }
        }
        let resp = Response {
            result_code: ResultCode::Success,
            lifetime,
            epoch,
            body,
            options: Options::from_list(&list),
        };
        let n = resp.emit(&mut out).unwrap();
        out.truncate(n);
        Some(out)
    }

    fn handle_natpmp(&mut self, req: &[u8], now: Time) -> Option<Vec<u8>> {
        let epoch = self.epoch(now);
        let mut out = vec![0u8; 16];
        let resp = match natpmp::Request::parse(req) {
            Err(natpmp::ParseError::UnsupportedVersion(_)) => natpmp::Response::Error {
                request_opcode: 0,
                result: natpmp::ResultCode::UnsupportedVersion,
                epoch,
            },
            Err(_) => return None,
            Ok(natpmp::Request::ExternalAddress) => natpmp::Response::ExternalAddress {
                result: natpmp::ResultCode::Success,
                epoch,
                external_addr: EXTERNAL,
            },
            Ok(natpmp::Request::Map(m)) => {
                let key = (m.protocol.iana(), m.internal_port);
                let port = if m.lifetime == 0 {
                    self.table.remove(&key);
                    0
                } else {
                    let port = self.table.get(&key).map(|e| e.1).unwrap_or_else(|| {
                        self.next_port += 1;
                        self.next_port
                    });
                    self.table.insert(key, ([0; 12], port, false));
                    port
                };
                natpmp::Response::Map {
                    protocol: m.protocol,
                    result: natpmp::ResultCode::Success,
                    epoch,
                    internal_port: m.internal_port,
                    external_port: port,
                    lifetime: m.lifetime.min(self.max_lifetime),
                }
            }
        };
        let n = resp.emit(&mut out)?;
        out.truncate(n);
        Some(out)
    }
}

/// A parsed PCP request the client sent.
pub fn parse_request(bytes: &[u8]) -> Request<'_> {
    Request::parse(bytes).expect("the client sends valid PCP requests")
}

/// The client and the fake, with simulated time.
pub struct Sim {
    pub client: Client,
    pub server: FakeServer,
    pub now: Time,
    /// Everything the client sent: when, and the bytes.
    pub sent: Vec<(Time, Vec<u8>)>,
    pub events: Vec<(Time, Event)>,
    /// While false, datagrams from the client are lost.
    pub online: bool,
}

impl Sim {
    pub fn new(mode: Mode) -> Sim {
        Sim::with_config(mode, Config::new(SERVER, CLIENT), 1)
    }

    pub fn with_config(mode: Mode, cfg: Config, seed: u64) -> Sim {
        Sim {
            client: Client::new(cfg, Time::ZERO, seed),
            server: FakeServer::new(mode),
            now: Time::ZERO,
            sent: Vec::new(),
            events: Vec::new(),
            online: true,
        }
    }

    /// Delivers everything queued, both ways, at the current time.
    pub fn flush(&mut self) {
        while let Some(Transmit {
            payload,
            destination,
        }) = self.client.poll_transmit(self.now)
        {
            assert_eq!(destination, SERVER);
            self.sent.push((self.now, payload.clone()));
            if self.online
                && let Some(resp) = self.server.handle(&payload, self.now)
            {
                self.client.handle_datagram(&resp, SERVER, self.now);
            }
        }
        while let Some(e) = self.client.poll_event() {
            self.events.push((self.now, e));
        }
    }

    /// Runs timers until `until` (inclusive).
    pub fn run_until(&mut self, until: Time) {
        self.flush();
        while let Some(t) = self.client.poll_timeout() {
            if t > until {
                break;
            }
            assert!(t >= self.now, "timeout in the past: {t} < {}", self.now);
            self.now = t;
            self.client.handle_timeout(t);
            self.flush();
        }
        self.now = until;
        self.flush();
    }

    /// Runs for `secs` more seconds.
    pub fn run_secs(&mut self, secs: u64) {
        let until = Time(self.now.0 + secs * 1000);
        self.run_until(until);
    }

    /// Delivers a datagram to the client now.
    pub fn deliver(&mut self, bytes: &[u8], from: SocketAddr) {
        self.client.handle_datagram(bytes, from, self.now);
        self.flush();
    }

    /// Events so far, without times; clears them.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
            .into_iter()
            .map(|(_, e)| e)
            .collect()
    }

    /// The requests sent so far, parsed (PCP only).
    pub fn requests(&self) -> Vec<(Time, Request<'_>)> {
        self.sent
            .iter()
            .filter(|(_, b)| b[0] == 2)
            .map(|(t, b)| (*t, parse_request(b)))
            .collect()
    }
}

/// The mapping nonce of a MAP or PEER request.
pub fn nonce_of(r: &Request<'_>) -> [u8; 12] {
    r.body.mapping().expect("MAP or PEER").nonce
}
