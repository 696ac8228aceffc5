//! Abuse resistance of the core (issue 7): per-host rate limiting ahead of all work,
//! bounded per-host state under a million distinct sources, no amplification, and no
//! way for one host to use another subscriber's quota.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use common::*;
use pcp_proto::{PcpOption, ResultCode};
use pcp_server::config::LimitsConfig;
use pcp_server::{Reply, Server, Time};

fn limits(rate: f64, burst: u32) -> LimitsConfig {
    LimitsConfig {
        host_rate: rate,
        host_burst: burst,
        ..LimitsConfig::default()
    }
}

#[test]
fn a_flooding_host_is_cut_at_its_rate_and_others_are_untouched() {
    let mut cfg = honour_cfg();
    cfg.limits = limits(10.0, 20);
    let mut h = Harness::new(cfg);
    let flooder = host(1);
    let mut answered = 0;
    for i in 0..1000u16 {
        // Every request would create a mapping: that is the work the limit saves.
        if h.send_raw(&Req::map(flooder, 1000 + i).bytes(), flooder)
            .is_some()
        {
            answered += 1;
        }
    }
    assert_eq!(answered, 20, "the burst, then silence");
    assert_eq!(h.server.stats().rate_limited, 980);
    // Dropped ahead of all work: no mapping, no subscriber, no answer counted.
    assert_eq!(h.server.mapping_count(), 20);
    assert_eq!(h.server.stats().dropped, 0);
    // Another host is served at once.
    h.ok(&Req::map(host(2), 5000).cp());
    // The flooder gets its rate back as time passes: 10/s.
    h.advance_secs(1);
    let again = (0..100u16)
        .filter(|i| {
            h.send_raw(&Req::map(flooder, 3000 + i).bytes(), flooder)
                .is_some()
        })
        .count();
    assert_eq!(again, 10);
    h.check();
}

#[test]
fn the_limit_comes_before_expiry_and_parsing() {
    // A rate-limited datagram does no work at all: not even the expiry peek that every
    // served request does (observable: the expired mapping is still there).
    let mut cfg = honour_cfg();
    cfg.limits = limits(0.1, 1);
    cfg.lifetime.min = 2;
    let mut h = Harness::new(cfg);
    h.ok(&Req::map(host(1), 5000).lifetime(2));
    // The token is spent; it comes back after 10 s, the mapping ends after 2 s.
    h.advance_ms(2500);
    assert!(h.send_raw(&announce(host(1)), host(1)).is_none());
    assert_eq!(h.server.stats().rate_limited, 1);
    assert_eq!(
        h.server.mapping_count(),
        1,
        "the dropped datagram expired nothing"
    );
}

/// A MAP request from `src` with CHECKPOINT_REQUIRED.
fn map_cp(src: IpAddr, port: u16) -> Vec<u8> {
    Req::map(src, port).cp().bytes()
}

/// The `i`-th distinct source: IPv4 10.0.0.0/8 for even `i`, IPv6 (one per /64) for
/// odd `i`.
fn source(i: u32) -> IpAddr {
    if i.is_multiple_of(2) {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i / 2))
    } else {
        IpAddr::V6(Ipv6Addr::new(
            0x2001,
            0xdb8,
            (i >> 16) as u16,
            i as u16,
            0,
            0,
            0,
            1,
        ))
    }
}

#[test]
fn a_million_sources_leave_bounded_state() {
    // The stated bound (docs/ARCHITECTURE.md, "Abuse resistance"): the rate limiter
    // tracks at most 2 × limits.max_hosts hosts (≈ 48 B each, ≤ 2 × 4 MiB for the
    // default 65,536), and everything else the core keeps per host or subscriber is
    // capped by the pool (one binding per mapping) plus subscribers whose checkpoint
    // bucket is refilling (≤ burst / rate seconds of new subscribers).
    let mut cfg = honour_cfg();
    cfg.pool.addresses = vec![
        IpAddr::from([192, 0, 2, 1]),
        "2001:db8:ffff::1".parse().unwrap(),
    ];
    cfg.pool.port_min = 10_000;
    cfg.pool.port_max = 19_999; // 2 × 10,000 bindings
    cfg.lifetime.min = 30;
    let max_hosts = cfg.limits.max_hosts;
    let pool = 2 * 10_000;
    let mut server = Server::new(cfg, START, 1).unwrap();
    let mut reply = [0u8; 1100];
    let mut effects = Vec::new();
    let mut now = START;
    let mut answered = 0u64;
    let mut peak = pcp_server::Footprint::default();
    const N: u32 = 1_000_000;
    for i in 0..N {
        // 20,000 new sources a second (50 s in all), each asking for a checkpointed
        // mapping with a 30 s lifetime; every fourth then deletes it again (its
        // subscriber stays until its checkpoint bucket is full again).
        if i % 20 == 0 {
            now = Time(now.0 + 1);
        }
        let src = source(i);
        let sa = SocketAddr::new(src, 40_000);
        let req = if i % 4 == 3 {
            Req::map(src, 7000).cp().lifetime(0).bytes()
        } else {
            map_cp(src, 7000)
        };
        if i % 4 == 3 {
            // The delete goes to the source that made the mapping just before.
            let prev = SocketAddr::new(source(i - 1), 40_000);
            let del = Req::map(prev.ip(), 7000).lifetime(0).bytes();
            effects.clear();
            let _ = server.handle(&del, prev, now, &mut reply, &mut effects);
        }
        effects.clear();
        if !matches!(
            server.handle(&req, sa, now, &mut reply, &mut effects),
            Reply::Drop
        ) {
            answered += 1;
        }
        if i % 10_000 == 0 {
            let f = server.footprint();
            peak.guard.hosts = peak.guard.hosts.max(f.guard.hosts);
            peak.guard.bytes = peak.guard.bytes.max(f.guard.bytes);
            peak.subscribers = peak.subscribers.max(f.subscribers);
            peak.idle_subscribers = peak.idle_subscribers.max(f.idle_subscribers);
            peak.hosts = peak.hosts.max(f.hosts);
            peak.mappings = peak.mappings.max(f.mappings);
            peak.epoch_exceptions = peak.epoch_exceptions.max(f.epoch_exceptions);
        }
    }
    server.check_invariants().unwrap();
    eprintln!("{answered} of {N} answered; peak footprint {peak:?}");
    assert!(answered > 100_000, "the limiter must not drop everyone");
    assert!(
        peak.guard.hosts <= 2 * max_hosts,
        "limiter tracks {} hosts",
        peak.guard.hosts
    );
    assert!(
        peak.guard.bytes <= 2 * 4 * 1024 * 1024 * 2,
        "limiter holds {} octets",
        peak.guard.bytes
    );
    assert!(peak.mappings <= pool, "{} mappings", peak.mappings);
    assert!(peak.hosts <= pool);
    // Subscribers: those with mappings, plus those refilling (burst 8 at 2/s: 4 s of
    // new subscribers at 20,000 a second, well under 100,000).
    assert!(
        peak.subscribers <= pool + 100_000,
        "{} subscribers",
        peak.subscribers
    );
    assert!(peak.idle_subscribers <= 100_000);
    assert_eq!(peak.epoch_exceptions, 0);
    // And it all drains: once every lifetime has ended and buckets refilled.
    server.expire(Time(now.0 + 3_600_000), &mut effects);
    let f = server.footprint();
    assert_eq!((f.mappings, f.hosts, f.subscribers), (0, 0, 0), "{f:?}");
}

#[test]
fn replies_are_never_much_larger_than_requests() {
    // No amplification: whatever arrives, the reply is at most one PCP header (24
    // octets) longer: RFC 6887 answers even a 2-octet datagram of another version with
    // a 24-octet UNSUPP_VERSION; error replies copy the request padded to whole
    // words; NAT-PMP's 2-octet external-address request gets 12 octets.
    const AMPLIFICATION: usize = 24;
    let mut cfg = honour_cfg();
    cfg.limits = limits(0.0, 1);
    cfg.mapping.third_party_prefixes = vec!["10.0.0.0/8".parse().unwrap()];
    let mut h = Harness::new(cfg);
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let check = |h: &mut Harness, bytes: &[u8], src: IpAddr| {
        if let Some(r) = h.send_raw(bytes, src) {
            assert!(
                r.len() <= bytes.len() + AMPLIFICATION,
                "{} octets answered with {}",
                bytes.len(),
                r.len()
            );
        }
    };
    // Valid requests of every kind, with and without options.
    for i in 0..200u16 {
        let src = host((i % 5) as u8 + 1);
        check(&mut h, &Req::map(src, 1000 + i).bytes(), src);
        check(&mut h, &Req::map(src, 2000 + i).cp().bytes(), src);
        check(
            &mut h,
            &Req::peer(src, 3000 + i, remote(1), 80)
                .opt(PcpOption::ThirdParty(host(200)))
                .cp()
                .bytes(),
            src,
        );
        check(&mut h, &announce(src), src);
        check(&mut h, &[0, 0], src);
        check(
            &mut h,
            &natpmp_map(pcp_proto::natpmp::Protocol::Udp, 4000 + i, 0, 60),
            src,
        );
    }
    // Random octets of every length, PCP and NAT-PMP versions, request bit clear.
    for len in 0..=1100usize {
        for version in [0u8, 1, 2] {
            let mut b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if let Some(v) = b.first_mut() {
                *v = version;
            }
            if let Some(op) = b.get_mut(1) {
                *op &= 0x7f;
            }
            check(&mut h, &b, host(1));
        }
    }
}

#[test]
fn one_host_cannot_spend_another_subscribers_quota() {
    let mut cfg = honour_cfg();
    let tier = cfg.tiers.get_mut("default").unwrap();
    tier.checkpoint_quota = 2;
    tier.mapping_quota = 4;
    cfg.mapping.third_party_prefixes = vec!["10.0.0.9/32".parse().unwrap()];
    let mut h = Harness::new(cfg);
    let (attacker, victim, proxy) = (host(1), host(2), host(9));
    // 1. The attacker names the victim in the client address field: ADDRESS_MISMATCH.
    for p in 0..10 {
        let r = h.pcp(&Req::map(attacker, 5000 + p).cp().client_field(victim));
        assert_eq!(r.result(), ResultCode::AddressMismatch);
    }
    // 2. THIRD_PARTY from a source outside mapping.third_party_prefixes: NOT_AUTHORIZED.
    for p in 0..10 {
        let r = h.pcp(
            &Req::map(attacker, 5000 + p)
                .cp()
                .opt(PcpOption::ThirdParty(victim)),
        );
        assert_eq!(r.result(), ResultCode::NotAuthorized);
    }
    // 3. The attacker spends its own quotas to the end.
    for p in 0..10 {
        h.pcp(&Req::map(attacker, 6000 + p).cp());
    }
    assert_eq!(h.server.mapping_count(), 4, "the attacker's mapping quota");
    // 4. The attacker cannot take over the victim's mapping (another nonce) either.
    h.ok(&Req::map(victim, 7000).cp());
    let r = h.pcp(
        &Req::map(attacker, 7000)
            .nonce([6; 12])
            .client_field(victim)
            .lifetime(0),
    );
    assert_eq!(r.result(), ResultCode::AddressMismatch);
    let r = h.pcp(
        &Req::map(attacker, 7000)
            .nonce([6; 12])
            .opt(PcpOption::ThirdParty(victim))
            .lifetime(0),
    );
    assert_eq!(r.result(), ResultCode::NotAuthorized);
    let m = h
        .mapping(&Req::map(victim, 7000).key())
        .expect("still there");
    assert_eq!(m.nonce, [1; 12]);
    // The victim still has its whole checkpoint quota (2) and mapping quota (4).
    let r = h.ok(&Req::map(victim, 7001).cp());
    assert!(r.has_checkpoint(), "victim's second checkpoint honoured");
    for p in 7002..7004 {
        h.ok(&Req::map(victim, p));
    }
    assert_eq!(
        h.pcp(&Req::map(victim, 7004)).result(),
        ResultCode::UserExQuota,
        "the victim's own quota, no less"
    );
    // 5. An authorised THIRD_PARTY proxy acts for a host on that host's quota only.
    let other = host(3);
    let r = h.ok(&Req::map(proxy, 8000).cp().opt(PcpOption::ThirdParty(other)));
    assert!(r.has_checkpoint());
    let subs: Vec<(String, u32)> = h
        .server
        .subscribers()
        .map(|(id, st, _)| (id.to_string(), st.checkpointed))
        .collect();
    assert!(subs.contains(&("10.0.0.3/32".into(), 1)), "{subs:?}");
    assert!(!subs.iter().any(|(id, _)| id == "10.0.0.9/32"), "{subs:?}");
    h.check();
}
