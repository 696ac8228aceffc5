//! A fuzzing session for the server core, shared by the cargo-fuzz target
//! (`crates/pcp-server/fuzz`) and the corpus replay test, so both check exactly the
//! same invariants.
//!
//! The input is a little program: each step either sends a datagram (built from
//! fields in the input, then optionally corrupted, or taken raw), advances time and
//! expires, or flips the backup status. After every step the server's indices and
//! accounting must agree, every reply must be well-formed and no larger than its
//! request plus a small bound, and 192 may be echoed only to a request that carried it.

use std::net::{IpAddr, SocketAddr};

use pcp_proto::{Body, MapBody, Options, PcpOption, PeerBody, Request, Response, ResultCode};

use crate::config::{PolicyRule, RuleAction, TierConfig, WithoutBackup};
use crate::{BackupStatus, Effect, Reply, Server, ServerConfig, Time};

/// Reads the input a byte at a time; zeros once exhausted.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.byte(), self.byte()])
    }
    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

const HOSTS: [[u8; 4]; 4] = [[10, 0, 0, 1], [10, 0, 0, 2], [10, 1, 0, 3], [10, 9, 0, 4]];

fn config() -> ServerConfig {
    let mut cfg = ServerConfig::default();
    cfg.pool.addresses = vec![IpAddr::from([192, 0, 2, 1]), "2001:db8::1".parse().unwrap()];
    cfg.pool.port_min = 2000;
    cfg.pool.port_max = 2040;
    cfg.pool.preserve_parity = true;
    cfg.lifetime.min = 2;
    cfg.lifetime.max = 60;
    cfg.tiers.insert(
        "default".into(),
        TierConfig {
            mapping_quota: 12,
            checkpoint_quota: 4,
            checkpoint_rate: 1.0,
            checkpoint_burst: 2,
        },
    );
    cfg.checkpoint.capacity = 9;
    cfg.checkpoint.without_backup = WithoutBackup::Honour;
    cfg.mapping.third_party_prefixes = vec!["10.9.0.0/16".parse().unwrap()];
    cfg.mapping.max_filters = 2;
    // A tight per-host limit, so sessions also go through the limiter's drops and
    // generation changes.
    cfg.limits.host_rate = 20.0;
    cfg.limits.host_burst = 24;
    cfg.limits.max_hosts = 4;
    cfg.limits.overflow_rate = 10.0;
    cfg.policy = vec![
        PolicyRule {
            name: "sip".into(),
            action: RuleAction::Force,
            tiers: vec![],
            subscribers: vec![],
            identities: vec![],
            internal_prefixes: vec![],
            opcodes: vec![],
            protocols: vec![17],
            internal_ports: vec!["5060".parse().unwrap()],
            remote_ports: vec![],
            remote_prefixes: vec![],
        },
        PolicyRule {
            name: "deny-10.1".into(),
            action: RuleAction::Deny,
            tiers: vec![],
            subscribers: vec![],
            identities: vec![],
            internal_prefixes: vec!["10.1.0.0/16".parse().unwrap()],
            opcodes: vec![],
            protocols: vec![],
            internal_ports: vec![],
            remote_ports: vec![],
            remote_prefixes: vec![],
        },
    ];
    cfg
}

/// Builds a request from input fields into `buf`; returns its length and source.
fn build(inp: &mut Input<'_>, buf: &mut [u8]) -> (usize, SocketAddr) {
    let host = IpAddr::from(HOSTS[usize::from(inp.byte() % 4)]);
    let flags = inp.byte();
    let protocol = [17, 6, 0, 1][usize::from(flags % 4)];
    let internal_port = [5060, 5061, 0, 7000][usize::from((flags >> 2) % 4)];
    let lifetime = [0, 1, 30, 100_000][usize::from((flags >> 4) % 4)];
    let mut nonce = [0u8; 12];
    nonce[0] = inp.byte() % 3;
    let sel = inp.byte();
    let ext_port = if sel & 1 != 0 {
        2000 + u16::from(sel >> 3) % 48
    } else {
        0
    };
    let ext_addr = if sel & 2 != 0 {
        IpAddr::from([192, 0, 2, 1])
    } else {
        IpAddr::from([0, 0, 0, 0])
    };
    let mut opts = [PcpOption::CheckpointRequired; 5];
    let mut n = 0;
    let o = inp.byte();
    if o & 1 != 0 {
        opts[n] = PcpOption::CheckpointRequired;
        n += 1;
    }
    if o & 2 != 0 {
        opts[n] = PcpOption::PreferFailure;
        n += 1;
    }
    if o & 4 != 0 {
        opts[n] = PcpOption::ThirdParty(IpAddr::from(HOSTS[usize::from(o >> 6)]));
        n += 1;
    }
    for _ in 0..(o >> 3) % 4 {
        if n < opts.len() {
            opts[n] = PcpOption::Filter(pcp_proto::Filter {
                prefix_len: [0, 120, 128][usize::from(inp.byte() % 3)],
                remote_port: 443,
                remote_addr: IpAddr::from([198, 51, 100, inp.byte()]),
            });
            n += 1;
        }
    }
    let map = MapBody {
        nonce,
        protocol,
        internal_port,
        external_port: ext_port,
        external_addr: ext_addr,
    };
    let body = match (flags >> 6) % 4 {
        0 | 1 => Body::Map(map),
        2 => Body::Peer(PeerBody {
            mapping: map,
            remote_port: [0, 443, 80][usize::from(inp.byte() % 3)],
            remote_addr: IpAddr::from([198, 51, 100, inp.byte() % 4]),
        }),
        _ => Body::Announce,
    };
    let opts = if matches!(body, Body::Announce) {
        &opts[..0]
    } else {
        &opts[..n]
    };
    let req = Request {
        lifetime,
        client_addr: host,
        body,
        options: Options::from_list(opts),
        pa_result_code: ResultCode::Success,
    };
    let len = req.emit(buf).unwrap_or(0);
    (len, SocketAddr::new(host, 40_000))
}

/// Runs one session; panics on any broken invariant.
pub fn run(data: &[u8]) {
    let mut inp = Input(data);
    let mut now = Time(1_000);
    let mut server = Server::new(config(), now, 7).expect("valid config");
    let mut req = [0u8; 1200];
    let mut reply = [0u8; 1100];
    let mut effects: Vec<Effect> = Vec::new();
    let mut steps = 0;
    while !inp.is_empty() && steps < 256 {
        steps += 1;
        match inp.byte() % 8 {
            0..=3 => {
                let (mut len, src) = build(&mut inp, &mut req);
                // Sometimes corrupt one octet of the well-formed request.
                let c = inp.byte();
                if c & 0x80 != 0 && len > 0 {
                    let at = usize::from(inp.byte()) % len;
                    req[at] = inp.byte();
                }
                if c & 0x40 != 0 {
                    len = len.saturating_sub(usize::from(c & 7) * 4);
                }
                step(&mut server, &req[..len], src, now, &mut reply, &mut effects);
            }
            4 => {
                // A raw datagram from a known or unknown source.
                let n = usize::from(inp.byte());
                let from = inp.byte();
                let raw = inp.take(n).to_vec();
                let src = match from % 3 {
                    0 => SocketAddr::new(IpAddr::from(HOSTS[usize::from(from >> 6)]), 1),
                    1 => SocketAddr::new("2001:db8:5::9".parse().unwrap(), 2),
                    _ => SocketAddr::new(IpAddr::from([127, 0, 0, 1]), 3),
                };
                step(&mut server, &raw, src, now, &mut reply, &mut effects);
            }
            5 | 6 => {
                now = Time(now.0 + u64::from(inp.u16()) * 10);
                server.expire(now, &mut effects);
                effects.clear();
            }
            _ => match inp.byte() % 4 {
                0 => server.set_backup_status(BackupStatus::None),
                1 => server.set_backup_status(BackupStatus::NotReady),
                2 => server.set_backup_status(BackupStatus::Ready),
                _ => {
                    // The backup did not acknowledge one checkpoint in time.
                    let pick = usize::from(inp.byte());
                    let key = server
                        .mappings()
                        .filter(|m| m.is_checkpointed())
                        .nth(pick % 8)
                        .map(|m| m.key);
                    if let Some(key) = key {
                        effects.clear();
                        assert!(server.withdraw_checkpoint(&key, &mut effects));
                        assert!(!server.mapping(&key).is_some_and(|m| m.is_checkpointed()));
                    }
                }
            },
        }
        if let Err(e) = server.check_invariants() {
            panic!("invariant broken after step {steps}: {e}");
        }
        let cap = server.config().checkpoint.capacity;
        assert!(server.checkpointed_count() <= cap, "capacity exceeded");
        for (id, st, tier) in server.subscribers() {
            assert!(
                st.checkpointed <= tier.checkpoint_quota
                    || server
                        .mappings()
                        .any(|m| m.subscriber == *id
                            && matches!(m.checkpoint, crate::Reason::Forced(_))),
                "subscriber {id} over its checkpoint quota without forced mappings"
            );
        }
    }
}

fn step(
    server: &mut Server,
    datagram: &[u8],
    src: SocketAddr,
    now: Time,
    reply: &mut [u8],
    effects: &mut Vec<Effect>,
) {
    effects.clear();
    let backup = server.backup_status();
    let answer = server.handle(datagram, src, now, reply, effects);
    if let Reply::Hold(n) = answer {
        // Held only when a ready backup must confirm a reply that echoes 192 or makes
        // a host exposed.
        assert_eq!(backup, BackupStatus::Ready, "held without a ready backup");
        let resp = Response::parse(&reply[..n]).expect("a held reply is a success reply");
        let exposes = effects.iter().any(|e| {
            matches!(
                e,
                Effect::Replicate(crate::Change::Host {
                    unprotected: true,
                    ..
                })
            )
        });
        assert!(
            resp.options.checkpoint_required() || exposes,
            "held reply without 192 that exposes no host"
        );
    }
    if let Reply::Send(n) | Reply::Hold(n) = answer {
        // No amplification: an answer is never longer than its request, except the
        // padding of an error copy to whole words, the 24-octet floor of a PCP error
        // header and NAT-PMP's fixed replies.
        let bound = datagram.len().next_multiple_of(4).max(24);
        assert!(
            n <= bound,
            "reply of {n} to a {}-octet request",
            datagram.len()
        );
        if pcp_proto::natpmp::is_natpmp(&reply[..n]) {
            pcp_proto::natpmp::Response::parse(&reply[..n]).expect("well-formed NAT-PMP reply");
        } else if let Ok(resp) = Response::parse(&reply[..n]) {
            if resp.result_code == ResultCode::Success && resp.options.checkpoint_required() {
                let asked = Request::parse(datagram).is_ok_and(|r| r.options.checkpoint_required());
                assert!(asked, "192 echoed to a request without it");
            }
        } else {
            // Error replies to requests that did not parse copy what they can; they
            // must still carry a well-formed header.
            let p = pcp_proto::Packet::new_checked(&reply[..n]).expect("a whole header");
            assert!(p.is_response() && p.version() == pcp_proto::VERSION);
            assert_ne!(p.result_code(), ResultCode::Success);
        }
    }
}
