//! Deterministic tests of the sans-IO core against a fake server, with simulated time:
//! retransmission and renewal timing, epoch-loss detection and re-creation, ANNOUNCE,
//! nonces, checkpoint states (incl. blind-echo detection) and the NAT-PMP fallback; and
//! PCP authentication (RFC 7652) behind pcp-auth's gate over a lossy, reordering network:
//! the PA exchange, tags on every request, re-authentication, a server restart losing
//! the session, SESSION_TERMINATED, refusals and forged answers.

#[path = "support/auth_sim.rs"]
mod auth_sim;
#[path = "support/fake.rs"]
mod fake;
/// pcp-auth's toy EAP method (one home for it).
#[path = "../../pcp-auth/tests/support/mod.rs"]
mod toy;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use fake::{CLIENT, Mode, SERVER, Sim, nonce_of};
use pcp_client::core::{
    Apply, CheckpointState, Config, EchoVerdict, Event, Kind, LossCause, LostReason,
    MappingRequest, RequestError, Time, Version,
};
use pcp_proto::{PcpOption, ResultCode, protocol};

const UDP: u8 = protocol::UDP;

fn gaps(times: &[Time]) -> Vec<u64> {
    times.windows(2).map(|w| w[1].0 - w[0].0).collect()
}

#[test]
fn retransmission_doubles_from_irt_with_jitter_up_to_mrt() {
    for seed in 0..20 {
        let mut sim = Sim::with_config(Mode::Silent, Config::new(SERVER, CLIENT), seed);
        sim.client
            .create_map(UDP, 5000, 600, false, sim.now)
            .unwrap();
        sim.run_secs(6000);
        let times: Vec<Time> = sim.sent.iter().map(|s| s.0).collect();
        assert_eq!(times[0], Time::ZERO, "first request at once");
        let g = gaps(&times);
        assert!((2700..=3300).contains(&g[0]), "RT1 {} (seed {seed})", g[0]);
        for w in g.windows(2) {
            let base = (2 * w[0]).min(1_024_000) as f64;
            let rt = w[1] as f64;
            assert!(
                rt >= 0.9 * base - 1.0 && rt <= 1.1 * base + 1.0,
                "RT {rt} after {} (seed {seed}): {g:?}",
                w[0]
            );
        }
        let max = *g.iter().max().unwrap();
        assert!(max <= 1_126_400, "capped at (1+0.1)·MRT: {max}");
        assert!(max >= 921_600, "reaches MRT: {g:?}");
        // Every transmission is the same request (same nonce).
        let reqs = sim.requests();
        assert!(
            reqs.iter()
                .all(|(_, r)| nonce_of(r) == nonce_of(&reqs[0].1))
        );
        // MRC = MRD = 0: never gives up.
        assert!(
            !sim.take_events()
                .iter()
                .any(|e| matches!(e, Event::Lost { .. }))
        );
    }
}

#[test]
fn mrc_and_mrd_end_retransmission() {
    let mut cfg = Config::new(SERVER, CLIENT);
    cfg.retransmit.mrc = 4;
    let mut sim = Sim::with_config(Mode::Silent, cfg, 3);
    let id = sim
        .client
        .create_map(UDP, 5000, 600, false, sim.now)
        .unwrap();
    sim.run_secs(3600);
    assert_eq!(sim.sent.len(), 4, "MRC = 4 transmissions");
    let ev = sim.events.clone();
    assert_eq!(ev.len(), 1);
    assert_eq!(
        ev[0].1,
        Event::Lost {
            id,
            reason: LostReason::NoResponse
        }
    );
    // Lost after the 4th wait: after the 4th send, within its RT.
    let last = sim.sent[3].0;
    assert!(ev[0].0 > last && ev[0].0.0 - last.0 <= 26_400 + 1);
    assert!(sim.client.mapping(id).is_none());

    let mut cfg = Config::new(SERVER, CLIENT);
    cfg.retransmit.mrd = Duration::from_secs(20);
    let mut sim = Sim::with_config(Mode::Silent, cfg, 4);
    sim.client
        .create_map(UDP, 5000, 600, false, sim.now)
        .unwrap();
    sim.run_secs(3600);
    // 0, ~3, ~9, ~21 > 20: three transmissions, lost at exactly 20 s.
    assert_eq!(
        sim.sent.len(),
        3,
        "{:?}",
        sim.sent.iter().map(|s| s.0).collect::<Vec<_>>()
    );
    assert_eq!(sim.events.len(), 1);
    assert_eq!(sim.events[0].0, Time::from_secs(20), "gives up at MRD");
}

#[test]
fn renewal_in_the_half_to_five_eighths_window_with_the_same_nonce() {
    for seed in 0..20 {
        let mut sim = Sim::with_config(Mode::Pcp, Config::new(SERVER, CLIENT), seed);
        let id = sim
            .client
            .create_map(UDP, 5000, 1000, false, sim.now)
            .unwrap();
        sim.flush();
        let ev = sim.take_events();
        let Event::Granted { grant, .. } = ev[0] else {
            panic!("{ev:?}")
        };
        assert_eq!(grant.lifetime, 1000);
        sim.run_secs(3000);
        let reqs = sim.requests();
        let nonce = nonce_of(&reqs[0].1);
        assert!(reqs.iter().all(|(_, r)| nonce_of(r) == nonce), "one nonce");
        // Each renewal lands 500..=625 s after the previous grant (answered at once).
        for w in reqs.windows(2) {
            let d = w[1].0.0 - w[0].0.0;
            assert!(
                (500_000..=625_000).contains(&d),
                "renewal after {d} ms (seed {seed})"
            );
            // A renewal suggests the granted external endpoint.
            let m = w[1].1.body.mapping().unwrap();
            assert_eq!(m.external_port, grant.external.port());
        }
        assert!(reqs.len() >= 5);
        let n = reqs.len();
        let renewed = sim
            .take_events()
            .into_iter()
            .filter(|e| matches!(e, Event::Renewed { id: i, .. } if *i == id))
            .count();
        assert_eq!(renewed, n - 1);
    }
}

#[test]
fn unanswered_renewals_back_off_then_the_mapping_expires_and_is_recreated() {
    let mut sim = Sim::with_config(Mode::Pcp, Config::new(SERVER, CLIENT), 11);
    let id = sim
        .client
        .create_map(UDP, 5000, 800, false, sim.now)
        .unwrap();
    sim.flush();
    sim.take_events();
    sim.sent.clear();
    sim.online = false;
    sim.run_secs(800);
    let mut t: Vec<u64> = sim.sent.iter().map(|s| s.0.0).collect();
    // At expiry (800 s) the client starts re-creating it at once.
    assert_eq!(t.pop(), Some(800_000), "{t:?}");
    assert!(t.len() >= 4, "{t:?}");
    assert!((400_000..=500_000).contains(&t[0]), "{t:?}");
    assert!((600_000..=650_000).contains(&t[1]), "{t:?}");
    assert!((700_000..=725_000).contains(&t[2]), "{t:?}");
    assert!((750_000..=762_500).contains(&t[3]), "{t:?}");
    for w in t.windows(2) {
        assert!(w[1] - w[0] >= 4000, "four seconds apart: {t:?}");
    }
    assert!(t.iter().all(|&x| x < 800_000));
    let ev = sim.take_events();
    assert_eq!(
        ev,
        vec![Event::Lost {
            id,
            reason: LostReason::Expired
        }]
    );
    // It keeps trying to re-create (IRT schedule) and succeeds when the server is back.
    sim.online = true;
    sim.run_secs(10);
    let ev = sim.take_events();
    assert!(
        matches!(ev.as_slice(), [Event::Granted { id: i, .. }] if *i == id),
        "{ev:?}"
    );
}

#[test]
fn epoch_going_back_recreates_every_mapping_at_once_with_their_nonces() {
    let mut sim = Sim::with_config(Mode::Pcp, Config::new(SERVER, CLIENT), 5);
    let a = sim
        .client
        .create_map(UDP, 5000, 3600, true, sim.now)
        .unwrap();
    sim.run_secs(100);
    let b = sim
        .client
        .create_map(UDP, 5001, 3600, false, sim.now)
        .unwrap();
    let c = sim
        .client
        .create(
            MappingRequest::peer(UDP, 5002, "198.51.100.7:3478".parse().unwrap()).lifetime(3600),
            sim.now,
        )
        .unwrap();
    sim.run_secs(100);
    sim.take_events();
    let nonces: Vec<[u8; 12]> = [a, b, c]
        .iter()
        .map(|id| sim.client.mapping(*id).unwrap().nonce)
        .collect();
    // The server reboots; the client learns it from the next response it gets.
    sim.server.restart(sim.now);
    sim.run_secs(10);
    sim.sent.clear();
    let d = sim
        .client
        .create_map(UDP, 5003, 3600, false, sim.now)
        .unwrap();
    sim.flush();
    let ev = sim.take_events();
    assert!(
        matches!(
            ev[0],
            Event::ServerStateLost {
                previous_epoch: 100,
                epoch: 10,
                cause: LossCause::Response
            }
        ),
        "{ev:?}"
    );
    // All four requests went out at the same instant: d, then a, b, c re-created.
    let reqs = sim.requests();
    assert_eq!(reqs.len(), 4, "{reqs:?}");
    assert!(reqs.iter().all(|(t, _)| *t == sim.now));
    let sent_nonces: Vec<[u8; 12]> = reqs.iter().skip(1).map(|(_, r)| nonce_of(r)).collect();
    assert_eq!(sent_nonces, nonces, "re-created with the nonces they had");
    // They suggest their old external endpoints.
    let old_a = sim.server.table.len();
    assert_eq!(old_a, 4);
    let granted: Vec<_> = ev
        .iter()
        .filter_map(|e| match e {
            Event::Granted { id, .. } => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(granted, vec![d, a, b, c]);
    let a_checkpoint = ev.iter().find_map(|e| match e {
        Event::Granted { id, grant } if *id == a => Some(grant.checkpoint),
        _ => None,
    });
    assert_eq!(a_checkpoint, Some(CheckpointState::Honoured), "flag kept");
    // The restarted fake hands out other ports: ExternalChanged for a, b, c.
    let changed = ev
        .iter()
        .filter(|e| matches!(e, Event::ExternalChanged { .. }))
        .count();
    assert_eq!(changed, 3, "{ev:?}");
}

#[test]
fn renewal_revealing_a_restart_reports_granted_and_recreates_the_rest() {
    let mut sim = Sim::with_config(Mode::Pcp, Config::new(SERVER, CLIENT), 6);
    let a = sim
        .client
        .create_map(UDP, 5000, 200, false, sim.now)
        .unwrap();
    let b = sim
        .client
        .create_map(UDP, 5001, 3600, false, sim.now)
        .unwrap();
    sim.run_secs(50);
    sim.take_events();
    sim.server.restart(sim.now);
    // a renews within 100..125 s; b (3600 s) would not renew before 1800 s.
    sim.run_secs(80);
    let ev = sim.take_events();
    assert!(matches!(ev[0], Event::ServerStateLost { .. }), "{ev:?}");
    assert!(
        matches!(ev[1], Event::Granted { id, .. } if id == a),
        "{ev:?}"
    );
    assert!(
        ev.iter()
            .any(|e| matches!(e, Event::Granted { id, .. } if *id == b))
    );
    assert_eq!(
        sim.server.table.len(),
        2,
        "both exist on the restarted server"
    );
}

#[test]
fn announce_with_a_reset_epoch_recreates_within_the_spread() {
    let mut sim = Sim::with_config(Mode::Pcp, Config::new(SERVER, CLIENT), 8);
    let a = sim
        .client
        .create_map(UDP, 5000, 3600, false, sim.now)
        .unwrap();
    sim.run_secs(300);
    sim.take_events();
    sim.sent.clear();
    // An ANNOUNCE with a consistent epoch changes nothing.
    let ok = sim.server.announce(sim.now);
    sim.deliver(&ok, SocketAddr::new(SERVER.ip(), 5351));
    assert!(sim.take_events().is_empty());
    // One from another address is ignored even with a reset epoch.
    sim.server.restart(sim.now);
    let reset = sim.server.announce(sim.now);
    sim.deliver(&reset, "127.0.0.99:5351".parse().unwrap());
    assert!(sim.take_events().is_empty());
    assert!(sim.sent.is_empty());
    // From the server (multicast arrives from its address, any port): state lost.
    let t0 = sim.now;
    sim.deliver(&reset, SocketAddr::new(SERVER.ip(), 40000));
    let ev = sim.take_events();
    assert_eq!(
        ev,
        vec![Event::ServerStateLost {
            previous_epoch: 300,
            epoch: 0,
            cause: LossCause::Announce
        }]
    );
    sim.run_secs(10);
    assert_eq!(sim.sent.len(), 1);
    let delay = sim.sent[0].0.0 - t0.0;
    assert!(delay <= 5000, "re-created within 5 s: {delay}");
    let ev = sim.take_events();
    assert!(
        matches!(ev[0], Event::Granted { id, .. } if id == a),
        "{ev:?}"
    );
}

#[test]
fn announce_request_reports_the_epoch() {
    let mut sim = Sim::new(Mode::Pcp);
    sim.run_secs(1);
    sim.server.epoch_base = Time::ZERO;
    sim.client.announce(sim.now);
    sim.flush();
    assert_eq!(
        sim.take_events(),
        vec![Event::AnnounceReply {
            epoch: 1,
            version: Version::Pcp
        }]
    );
    let req = fake::parse_request(&sim.sent[0].1);
    assert_eq!(req.opcode(), pcp_proto::Opcode::Announce);
}

#[test]
fn checkpoint_honoured_and_not_honoured_by_a_conformant_server() {
    let mut sim = Sim::new(Mode::Pcp);
    let a = sim
        .client
        .create_map(UDP, 5000, 600, true, sim.now)
        .unwrap();
    sim.flush();
    // The first request carries 192 and the canary.
    let r = fake::parse_request(&sim.sent[0].1);
    assert!(r.options.checkpoint_required());
    assert!(
        r.options
            .iter()
            .any(|o| matches!(o, PcpOption::Unknown { code: 255, .. }))
    );
    assert_eq!(sim.client.echo_verdict(), EchoVerdict::Conformant);
    let ev = sim.take_events();
    assert!(
        matches!(ev[0], Event::Granted { id, grant } if id == a && grant.checkpoint == CheckpointState::Honoured),
        "{ev:?}"
    );
    // The server stops honouring (say, quota): the next mapping says so.
    sim.server.honour = false;
    let b = sim
        .client
        .create_map(UDP, 5001, 600, true, sim.now)
        .unwrap();
    let c = sim
        .client
        .create_map(UDP, 5002, 600, false, sim.now)
        .unwrap();
    sim.flush();
    // The canary went once: later requests do not carry it.
    let r = fake::parse_request(&sim.sent[1].1);
    assert!(
        !r.options
            .iter()
            .any(|o| matches!(o, PcpOption::Unknown { .. }))
    );
    let ev = sim.take_events();
    assert!(
        matches!(ev[0], Event::Granted { id, grant } if id == b && grant.checkpoint == CheckpointState::NotHonoured)
    );
    assert!(
        matches!(ev[1], Event::Granted { id, grant } if id == c && grant.checkpoint == CheckpointState::NotRequested)
    );
}

#[test]
fn blind_echo_server_gives_unknown_not_a_fake_yes() {
    let mut sim = Sim::new(Mode::BlindEcho);
    let a = sim
        .client
        .create_map(UDP, 5000, 600, true, sim.now)
        .unwrap();
    sim.flush();
    assert_eq!(sim.client.echo_verdict(), EchoVerdict::BlindEcho);
    let ev = sim.take_events();
    assert!(
        matches!(ev[0], Event::Granted { id, grant } if id == a && grant.checkpoint == CheckpointState::Unknown),
        "{ev:?}"
    );
    // Still unknown for later mappings, which no longer carry the canary.
    let b = sim
        .client
        .create_map(UDP, 5001, 600, true, sim.now)
        .unwrap();
    sim.flush();
    let ev = sim.take_events();
    assert!(
        matches!(ev[0], Event::Granted { id, grant } if id == b && grant.checkpoint == CheckpointState::Unknown)
    );
    // And without the canary the client would have been fooled: the fake echoes 192.
    let mut cfg = Config::new(SERVER, CLIENT);
    cfg.canary = false;
    let mut fooled = Sim::with_config(Mode::BlindEcho, cfg, 1);
    fooled
        .client
        .create_map(UDP, 5000, 600, true, fooled.now)
        .unwrap();
    fooled.flush();
    let ev = fooled.take_events();
    assert!(
        matches!(ev[0], Event::Granted { grant, .. } if grant.checkpoint == CheckpointState::Honoured)
    );
}

#[test]
fn server_refusing_the_canary_is_asked_again_without_it_and_reported_unknown() {
    let mut sim = Sim::new(Mode::RejectUnknown);
    let a = sim
        .client
        .create_map(UDP, 5000, 600, true, sim.now)
        .unwrap();
    sim.flush();
    assert_eq!(sim.sent.len(), 2, "retried at once");
    let r = fake::parse_request(&sim.sent[1].1);
    assert!(
        !r.options
            .iter()
            .any(|o| matches!(o, PcpOption::Unknown { .. }))
    );
    assert_eq!(sim.client.echo_verdict(), EchoVerdict::RejectsUnknown);
    let ev = sim.take_events();
    assert!(
        matches!(ev[0], Event::Granted { id, grant } if id == a && grant.checkpoint == CheckpointState::Unknown),
        "{ev:?}"
    );
}

#[test]
fn checkpoint_flag_change_now_or_on_the_next_renewal() {
    let mut sim = Sim::new(Mode::Pcp);
    let a = sim
        .client
        .create_map(UDP, 5000, 1000, true, sim.now)
        .unwrap();
    sim.run_secs(10);
    sim.take_events();
    sim.sent.clear();
    // Next renewal: nothing sent now.
    sim.client
        .set_checkpoint(a, false, Apply::NextRenewal, sim.now)
        .unwrap();
    sim.flush();
    assert!(sim.sent.is_empty());
    sim.run_secs(700);
    let reqs = sim.requests();
    assert_eq!(reqs.len(), 1);
    assert!(
        !reqs[0].1.options.checkpoint_required(),
        "renewal without 192"
    );
    let ev = sim.take_events();
    assert!(
        matches!(ev[0], Event::Renewed { grant, .. } if grant.checkpoint == CheckpointState::NotRequested)
    );
    assert!(matches!(
        ev[1],
        Event::CheckpointChanged {
            previous: CheckpointState::Honoured,
            ..
        }
    ));
    // Now: a renewal with 192 goes out at once, same nonce.
    sim.sent.clear();
    sim.client
        .set_checkpoint(a, true, Apply::Now, sim.now)
        .unwrap();
    sim.flush();
    let reqs = sim.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].0, sim.now);
    assert!(reqs[0].1.options.checkpoint_required());
    assert_eq!(nonce_of(&reqs[0].1), sim.client.mapping(a).unwrap().nonce);
    let ev = sim.take_events();
    assert!(
        matches!(ev[0], Event::Renewed { grant, .. } if grant.checkpoint == CheckpointState::Honoured)
    );
}

#[test]
fn short_errors_are_retried_after_their_lifetime_long_ones_end_the_mapping() {
    let mut sim = Sim::new(Mode::Error(ResultCode::UserExQuota, 30));
    let a = sim
        .client
        .create_map(UDP, 5000, 600, false, sim.now)
        .unwrap();
    sim.flush();
    let ev = sim.take_events();
    assert_eq!(
        ev,
        vec![Event::Error {
            id: a,
            result: ResultCode::UserExQuota,
            retry_in: Duration::from_secs(30)
        }]
    );
    sim.server.mode = Mode::Pcp;
    sim.run_secs(29);
    assert_eq!(sim.sent.len(), 1);
    sim.run_secs(1);
    assert_eq!(sim.sent.len(), 2);
    assert!(matches!(sim.take_events()[0], Event::Granted { .. }));

    let mut sim = Sim::new(Mode::Error(ResultCode::NotAuthorized, 1800));
    let b = sim
        .client
        .create_map(UDP, 5000, 600, false, sim.now)
        .unwrap();
    sim.run_secs(4000);
    assert_eq!(sim.sent.len(), 1);
    assert_eq!(
        sim.take_events(),
        vec![Event::Lost {
            id: b,
            reason: LostReason::Refused(ResultCode::NotAuthorized)
        }]
    );
}

#[test]
fn delete_uses_the_nonce_and_lifetime_zero() {
    let mut sim = Sim::new(Mode::Pcp);
    let a = sim
        .client
        .create_map(UDP, 5000, 600, true, sim.now)
        .unwrap();
    sim.flush();
    sim.client.delete(a, sim.now).unwrap();
    sim.flush();
    let reqs = sim.requests();
    assert_eq!(reqs[1].1.lifetime, 0);
    assert_eq!(nonce_of(&reqs[1].1), nonce_of(&reqs[0].1));
    assert!(!reqs[1].1.options.checkpoint_required());
    let ev = sim.take_events();
    assert_eq!(
        ev.last(),
        Some(&Event::Deleted {
            id: a,
            confirmed: true
        })
    );
    assert!(sim.server.table.is_empty());
    assert!(sim.client.mapping(a).is_none());
    // Against a silent server a delete gives up after three tries.
    let mut sim = Sim::new(Mode::Pcp);
    let b = sim
        .client
        .create_map(UDP, 5000, 600, false, sim.now)
        .unwrap();
    sim.flush();
    sim.online = false;
    sim.client.delete(b, sim.now).unwrap();
    sim.run_secs(100);
    assert_eq!(sim.sent.len(), 4);
    assert_eq!(
        sim.take_events().last(),
        Some(&Event::Deleted {
            id: b,
            confirmed: false
        })
    );
}

#[test]
fn options_are_sent_when_asked() {
    let mut sim = Sim::new(Mode::Pcp);
    let tp: IpAddr = "127.0.0.77".parse().unwrap();
    let filter = pcp_proto::Filter {
        prefix_len: 120,
        remote_port: 0,
        remote_addr: "198.51.100.0".parse().unwrap(),
    };
    sim.client
        .create(
            MappingRequest::map(UDP, 5000)
                .lifetime(600)
                .third_party(tp)
                .prefer_failure(true)
                .filter(filter)
                .description("game server")
                .suggest("203.0.113.5:6000".parse().unwrap()),
            sim.now,
        )
        .unwrap();
    sim.flush();
    let r = fake::parse_request(&sim.sent[0].1);
    assert_eq!(r.options.third_party(), Some(tp));
    assert!(r.options.prefer_failure());
    assert_eq!(r.options.filters().collect::<Vec<_>>(), vec![filter]);
    assert_eq!(r.options.description(), Some("game server"));
    assert!(!r.options.checkpoint_required());
    let m = r.body.mapping().unwrap();
    assert_eq!(m.external_port, 6000);
    // Requests that cannot be made are refused with a reason.
    let peer = MappingRequest::peer(UDP, 5000, "198.51.100.1:9".parse().unwrap());
    assert_eq!(
        sim.client
            .create(peer.clone().prefer_failure(true), sim.now),
        Err(RequestError::MapOnlyOption)
    );
    assert_eq!(
        sim.client.create(peer.lifetime(0), sim.now),
        Err(RequestError::ZeroLifetime)
    );
    let long = "x".repeat(1017);
    assert!(matches!(
        sim.client
            .create(MappingRequest::map(UDP, 1).description(long), sim.now),
        Err(RequestError::DescriptionTooLong { len: 1017 })
    ));
}

#[test]
fn natpmp_only_server_falls_back_and_reports_checkpoint_not_supported() {
    let mut sim = Sim::new(Mode::NatPmpOnly);
    let a = sim
        .client
        .create_map(UDP, 5000, 600, true, sim.now)
        .unwrap();
    let p = sim
        .client
        .create(
            MappingRequest::peer(UDP, 5001, "198.51.100.1:9".parse().unwrap()),
            sim.now,
        )
        .unwrap();
    sim.flush();
    assert_eq!(sim.client.version(), Version::NatPmp);
    let ev = sim.take_events();
    assert_eq!(ev[0], Event::FellBackToNatPmp);
    assert!(ev.contains(&Event::Lost {
        id: p,
        reason: LostReason::Unsupported
    }));
    let granted = ev.iter().find_map(|e| match e {
        Event::Granted { id, grant } if *id == a => Some(*grant),
        _ => None,
    });
    let g = granted.expect("granted over NAT-PMP");
    assert_eq!(g.version, Version::NatPmp);
    assert_eq!(g.checkpoint, CheckpointState::NotSupported);
    assert_eq!(g.external.ip(), IpAddr::V4(fake::EXTERNAL));
    // NAT-PMP requests went out: a map request (12 octets) and an address request.
    assert!(
        sim.sent
            .iter()
            .any(|(_, b)| b.len() == 12 && b[0] == 0 && b[1] == 1)
    );
    assert!(sim.sent.iter().any(|(_, b)| b == &[0, 0]));
    // PEER is refused up front from now on.
    assert_eq!(
        sim.client.create(
            MappingRequest::peer(UDP, 5002, "198.51.100.1:9".parse().unwrap()),
            sim.now
        ),
        Err(RequestError::NatPmpCannot)
    );
    // Renewal and delete over NAT-PMP.
    sim.sent.clear();
    sim.run_secs(400);
    assert!(
        sim.take_events()
            .iter()
            .any(|e| matches!(e, Event::Renewed { .. }))
    );
    sim.client.delete(a, sim.now).unwrap();
    sim.flush();
    assert_eq!(
        sim.take_events(),
        vec![Event::Deleted {
            id: a,
            confirmed: true
        }]
    );
    assert!(sim.server.table.is_empty());
}

/// An old NAT-PMP-only server answers a PCP request with RFC 6886 §3.5's reply as the
/// RFC printed it: opcode 0 (not erratum 3618's 128), result 1, epoch.
#[test]
fn natpmp_unsupported_version_reply_with_opcode_0_falls_back() {
    let legacy = [0u8, 0, 0, 1, 0, 0, 0, 0];
    let mut sim = Sim::new(Mode::Silent);
    let a = sim
        .client
        .create_map(UDP, 5000, 600, false, sim.now)
        .unwrap();
    sim.flush();
    // Only from the server's own address and port, and only result 1.
    sim.deliver(&legacy, SocketAddr::new(SERVER.ip(), 5350));
    sim.deliver(&[0, 0, 0, 2, 0, 0, 0, 0], SERVER);
    sim.deliver(&[0, 0, 0, 1, 0, 0], SERVER);
    assert_eq!(sim.client.version(), Version::Pcp);
    assert!(sim.take_events().is_empty());
    sim.server.mode = Mode::NatPmpOnly;
    sim.deliver(&legacy, SERVER);
    assert_eq!(sim.client.version(), Version::NatPmp);
    let ev = sim.take_events();
    assert_eq!(ev[0], Event::FellBackToNatPmp, "{ev:?}");
    assert!(
        ev.iter()
            .any(|e| matches!(e, Event::Granted { id, grant } if *id == a && grant.version == Version::NatPmp)),
        "{ev:?}"
    );

    // Without NAT-PMP fallback the mapping is refused with UNSUPP_VERSION.
    let mut cfg = Config::new(SERVER, CLIENT);
    cfg.natpmp_fallback = false;
    let mut sim = Sim::with_config(Mode::Silent, cfg, 1);
    let a = sim
        .client
        .create_map(UDP, 5000, 600, false, sim.now)
        .unwrap();
    sim.flush();
    sim.deliver(&legacy, SERVER);
    assert_eq!(
        sim.take_events(),
        vec![Event::Lost {
            id: a,
            reason: LostReason::Refused(ResultCode::UnsuppVersion)
        }]
    );
}

/// RFC 6886 §3.5: a refusal may come in the bare 8-octet form (opcode, result, epoch),
/// which names the protocol but not the port.
#[test]
fn natpmp_short_refusals_reach_the_one_waiting_mapping() {
    let mut sim = Sim::new(Mode::NatPmpOnly);
    sim.client
        .create_map(UDP, 4000, 600, false, sim.now)
        .unwrap();
    sim.flush();
    assert_eq!(sim.client.version(), Version::NatPmp);
    sim.take_events();
    sim.server.mode = Mode::Silent;
    sim.run_secs(10);
    let epoch = |sim: &Sim| ((sim.now.0 / 1000) as u32).to_be_bytes();
    let short = |op: u8, result: u8, e: [u8; 4]| [0, op, 0, result, e[0], e[1], e[2], e[3]];

    let t = sim
        .client
        .create_map(protocol::TCP, 5000, 600, false, sim.now)
        .unwrap();
    sim.flush();
    sim.deliver(&short(130, 2, epoch(&sim)), SERVER);
    assert_eq!(
        sim.take_events(),
        vec![Event::Lost {
            id: t,
            reason: LostReason::Refused(ResultCode::NotAuthorized)
        }]
    );

    // Two UDP requests outstanding: whose refusal it is cannot be told; both go on.
    let u1 = sim
        .client
        .create_map(UDP, 5001, 600, false, sim.now)
        .unwrap();
    let u2 = sim
        .client
        .create_map(UDP, 5002, 600, false, sim.now)
        .unwrap();
    sim.flush();
    sim.deliver(&short(129, 4, epoch(&sim)), SERVER);
    assert!(sim.take_events().is_empty());
    sim.client.release(u2).unwrap();
    // One left: out of resources is a short error, retried later.
    sim.deliver(&short(129, 4, epoch(&sim)), SERVER);
    let ev = sim.take_events();
    assert!(
        matches!(ev.as_slice(), [Event::Error { id, result: ResultCode::NoResources, .. }] if *id == u1),
        "{ev:?}"
    );
}

#[test]
fn peer_requests_carry_the_remote_and_kind() {
    let mut sim = Sim::new(Mode::Pcp);
    let remote: SocketAddr = "198.51.100.7:3478".parse().unwrap();
    let id = sim
        .client
        .create(
            MappingRequest::peer(UDP, 5000, remote).checkpoint(true),
            sim.now,
        )
        .unwrap();
    sim.flush();
    let r = fake::parse_request(&sim.sent[0].1);
    match r.body {
        pcp_proto::Body::Peer(p) => {
            assert_eq!(p.remote_port, 3478);
            assert_eq!(p.remote_addr, remote.ip());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(sim.client.mapping(id).unwrap().kind, Kind::Peer { remote });
    assert!(
        matches!(sim.take_events()[0], Event::Granted { grant, .. } if grant.checkpoint == CheckpointState::Honoured)
    );
}

#[test]
fn same_seed_same_run() {
    let run = |seed| {
        let mut sim = Sim::with_config(Mode::Silent, Config::new(SERVER, CLIENT), seed);
        sim.client
            .create_map(UDP, 5000, 600, true, sim.now)
            .unwrap();
        sim.run_secs(200);
        sim.sent.clone()
    };
    assert_eq!(run(42), run(42));
    assert_ne!(run(42), run(43));
}

// ---------------------------------------------------------------------------------------
// PCP authentication (RFC 7652)

use auth_sim::{AuthSim, auth_config};
use pcp_client::core::{AuthFailure, SessionEnd};

fn authenticated(ev: &[Event]) -> Vec<(u32, bool)> {
    ev.iter()
        .filter_map(|e| match e {
            Event::Authenticated {
                session_id,
                reauthentication,
                ..
            } => Some((*session_id, *reauthentication)),
            _ => None,
        })
        .collect()
}

fn granted_ids(ev: &[Event]) -> Vec<pcp_client::core::MappingId> {
    ev.iter()
        .filter_map(|e| match e {
            Event::Granted { id, .. } => Some(*id),
            _ => None,
        })
        .collect()
}

/// Every common request the client sent carries an AUTHENTICATION_TAG, last.
fn all_tagged(sim: &AuthSim) {
    let reqs = sim.common_requests();
    assert!(!reqs.is_empty());
    for r in reqs {
        let at = pcp_auth::tag::locate(r).expect("every request is tagged");
        assert_eq!(at.mac.end, r.len(), "the tag is the last option");
    }
}

#[test]
fn authentication_comes_first_then_every_request_is_tagged() {
    let mut sim = AuthSim::new(auth_config("secret"), 3600, 1);
    let id = sim
        .client
        .create_map(UDP, 5000, 600, true, sim.now)
        .unwrap();
    // Nothing but PA messages before the SA.
    sim.run_secs(0);
    assert!(sim.common_requests().is_empty());
    sim.run_secs(1);
    let ev = sim.take_events();
    assert!(sim.client.is_authenticated());
    let session = sim.client.session_id().unwrap();
    assert_eq!(authenticated(&ev), vec![(session, false)], "{ev:?}");
    let Some(Event::Granted { id: gid, grant }) =
        ev.iter().find(|e| matches!(e, Event::Granted { .. }))
    else {
        panic!("{ev:?}")
    };
    assert_eq!(*gid, id);
    assert_eq!(grant.checkpoint, CheckpointState::Honoured);
    // The first request went out without waiting out a retransmission.
    assert_eq!(sim.common_requests().len(), 1);
    sim.run_secs(2000);
    all_tagged(&sim);
    let s = sim.gate.stats();
    assert_eq!((s.required, s.bad_tag, s.replayed), (0, 0, 0), "{s:?}");
    assert!(s.authenticated >= 4, "renewals went through: {s:?}");
    assert_eq!(sim.server.table.len(), 1);
}

#[test]
fn authentication_and_mappings_survive_loss_reordering_partitions_and_crashes() {
    for seed in 0..300 {
        let mut cfg = auth_config("secret");
        cfg.canary = seed % 2 == 0;
        let mut sim = AuthSim::new(cfg, 400, seed);
        sim.loss = 0.25;
        sim.max_delay = 1500;
        let a = sim
            .client
            .create_map(UDP, 5000, 300, true, sim.now)
            .unwrap();
        let b = sim
            .client
            .create(
                MappingRequest::map(protocol::TCP, 8080).lifetime(300),
                sim.now,
            )
            .unwrap();
        sim.run_secs(1200);
        // A partition of up to 5 minutes, or (every third seed) a server crash that
        // loses every mapping and PA session.
        if seed % 3 == 0 {
            sim.restart_server(seed + 7);
        } else {
            sim.online = false;
            sim.run_secs(seed * 37 % 300);
            sim.online = true;
        }
        sim.run_secs(1200);
        let ev = sim.take_events();
        let auths = authenticated(&ev);
        assert!(!auths.is_empty(), "seed {seed}: {ev:?}");
        assert!(
            auths.iter().any(|&(_, re)| re),
            "seed {seed}: re-authenticated at least once (400 s sessions): {auths:?}"
        );
        // Gave up on nothing for good.
        for e in &ev {
            match e {
                Event::Lost { reason, .. } => {
                    assert_eq!(*reason, LostReason::Expired, "seed {seed}: {e:?}")
                }
                Event::AuthenticationFailed { failure } => {
                    assert_eq!(*failure, AuthFailure::Timeout, "seed {seed}")
                }
                Event::Deleted { .. } => panic!("seed {seed}: {e:?}"),
                _ => {}
            }
        }
        let g = granted_ids(&ev);
        assert!(g.contains(&a) && g.contains(&b), "seed {seed}: {ev:?}");
        all_tagged(&sim);
        // Every response the client acted on verified: nothing untagged was sent.
        assert_eq!(sim.gate.stats().required, 0, "seed {seed}");
        // Still kept alive at the end (or being re-created after an unlucky expiry).
        sim.loss = 0.0;
        sim.run_secs(400);
        for id in [a, b] {
            assert!(
                sim.client.mapping(id).unwrap().grant.is_some(),
                "seed {seed}: {id} alive"
            );
        }
        assert_eq!(sim.server.table.len(), 2, "seed {seed}");
    }
}

#[test]
fn reauthentication_at_eighty_percent_keeps_requests_verifying() {
    let mut sim = AuthSim::new(auth_config("secret"), 100, 7);
    sim.client
        .create_map(UDP, 5000, 60, false, sim.now)
        .unwrap();
    sim.run_secs(1000);
    let times: Vec<Time> = sim
        .events
        .iter()
        .filter(|(_, e)| matches!(e, Event::Authenticated { .. }))
        .map(|(t, _)| *t)
        .collect();
    let ev = sim.take_events();
    let auths = authenticated(&ev);
    assert!(auths.len() >= 11, "{auths:?}");
    assert!(!auths[0].1 && auths[1..].iter().all(|a| a.1), "{auths:?}");
    assert!(auths.iter().all(|a| a.0 == auths[0].0), "one session");
    for w in times.windows(2) {
        let d = w[1].0 - w[0].0;
        assert!(
            (80_000..=81_000).contains(&d),
            "re-authenticated after {d} ms"
        );
    }
    assert!(
        !ev.iter().any(|e| matches!(
            e,
            Event::Lost { .. } | Event::SessionEnded { .. } | Event::AuthenticationFailed { .. }
        )),
        "{ev:?}"
    );
    let renewed = ev
        .iter()
        .filter(|e| matches!(e, Event::Renewed { .. }))
        .count();
    assert!(renewed >= 25, "{renewed}");
    let s = sim.gate.stats();
    assert_eq!((s.bad_tag, s.replayed, s.required), (0, 0, 0), "{s:?}");
}

#[test]
fn server_restart_losing_the_session_reauthenticates_and_recreates_everything() {
    for seed in 0..50 {
        let mut sim = AuthSim::new(auth_config("secret"), 3600, seed);
        let ids: Vec<_> = (0..3)
            .map(|i| {
                sim.client
                    .create_map(UDP, 5000 + i, 1000, i == 0, sim.now)
                    .unwrap()
            })
            .collect();
        sim.run_secs(100);
        let before = sim.client.session_id().unwrap();
        sim.take_events();
        sim.restart_server(seed + 1000);
        sim.loss = if seed % 2 == 0 { 0.0 } else { 0.2 };
        sim.max_delay = 300;
        // The next renewal (≤ 625 s) gets UNKNOWN_SESSION_ID.
        sim.run_secs(1000);
        let ev = sim.take_events();
        assert!(
            ev.contains(&Event::SessionEnded {
                reason: SessionEnd::Lost
            }),
            "seed {seed}: {ev:?}"
        );
        let auths = authenticated(&ev);
        assert!(
            auths.iter().any(|&(s, re)| !re && s != before),
            "seed {seed}: a new session: {auths:?}"
        );
        assert!(
            ev.iter()
                .any(|e| matches!(e, Event::ServerStateLost { .. })),
            "seed {seed}: the restart's epoch seen: {ev:?}"
        );
        let g = granted_ids(&ev);
        for id in &ids {
            assert!(g.contains(id), "seed {seed}: {id} re-created: {ev:?}");
        }
        assert_eq!(sim.server.table.len(), 3, "seed {seed}");
        assert_eq!(sim.gate.stats().required, 0);
        all_tagged(&sim);
    }
}

#[test]
fn session_terminated_by_the_server_is_answered_and_replaced() {
    let mut sim = AuthSim::new(auth_config("secret"), 3600, 3);
    let id = sim
        .client
        .create_map(UDP, 5000, 600, false, sim.now)
        .unwrap();
    sim.run_secs(10);
    let first = sim.client.session_id().unwrap();
    sim.take_events();
    let now = pcp_auth::Time(sim.now.0);
    sim.gate.server.terminate(now, first);
    sim.run_secs(1000);
    let ev = sim.take_events();
    assert_eq!(
        ev[0],
        Event::SessionEnded {
            reason: SessionEnd::ByServer
        },
        "{ev:?}"
    );
    let auths = authenticated(&ev);
    assert!(
        matches!(auths.as_slice(), [(s, false)] if *s != first),
        "{auths:?}"
    );
    assert!(
        ev.iter()
            .any(|e| matches!(e, Event::Renewed { id: i, .. } if *i == id)),
        "renewals go on in the new session: {ev:?}"
    );
    assert_eq!(sim.gate.stats().required, 0);
}

#[test]
fn client_ending_its_session_authenticates_again_when_asked() {
    let mut sim = AuthSim::new(auth_config("secret"), 3600, 4);
    sim.client.announce(sim.now);
    sim.run_secs(5);
    assert!(sim.client.is_authenticated());
    sim.client.end_session(sim.now);
    sim.run_secs(5);
    let ev = sim.take_events();
    assert!(
        ev.contains(&Event::SessionEnded {
            reason: SessionEnd::ByClient
        }),
        "{ev:?}"
    );
    assert!(!sim.client.is_authenticated());
    assert_eq!(
        sim.gate.server.session_count(),
        0,
        "the server dropped it too"
    );
    sim.client
        .create_map(UDP, 5000, 600, false, sim.now)
        .unwrap();
    sim.run_secs(5);
    let ev = sim.take_events();
    assert_eq!(authenticated(&ev).len(), 1, "{ev:?}");
    assert_eq!(granted_ids(&ev).len(), 1, "{ev:?}");
    // Ending a session while keeping a mapping: a new one at once, renewals go on.
    let before = sim.client.session_id().unwrap();
    sim.client.end_session(sim.now);
    sim.run_secs(600);
    let ev = sim.take_events();
    assert!(
        ev.contains(&Event::SessionEnded {
            reason: SessionEnd::ByClient
        }),
        "{ev:?}"
    );
    assert!(
        matches!(authenticated(&ev).as_slice(), [(s, false)] if *s != before),
        "{ev:?}"
    );
    assert!(
        ev.iter().any(|e| matches!(e, Event::Renewed { .. })),
        "{ev:?}"
    );
    assert_eq!(sim.gate.stats().required, 0);
}

#[test]
fn wrong_password_loses_every_mapping_and_sends_no_request() {
    let mut sim = AuthSim::new(auth_config("wrong"), 3600, 5);
    let a = sim
        .client
        .create_map(UDP, 5000, 600, false, sim.now)
        .unwrap();
    sim.client.announce(sim.now);
    sim.run_secs(300);
    let ev = sim.take_events();
    assert_eq!(
        ev,
        vec![
            Event::AuthenticationFailed {
                failure: AuthFailure::AuthenticationFailed
            },
            Event::Lost {
                id: a,
                reason: LostReason::Refused(ResultCode::AuthenticationFailed)
            },
            Event::AnnounceTimeout,
        ]
    );
    assert!(sim.common_requests().is_empty(), "no request without an SA");
    assert_eq!(sim.client.poll_timeout(), None, "nothing more to do");
}

#[test]
fn unreachable_server_times_out_and_the_client_keeps_trying() {
    let mut sim = AuthSim::new(auth_config("secret"), 3600, 6);
    let a = sim
        .client
        .create_map(UDP, 5000, 600, false, sim.now)
        .unwrap();
    sim.online = false;
    sim.run_secs(250);
    let ev = sim.take_events();
    assert_eq!(
        ev,
        vec![
            Event::AuthenticationFailed {
                failure: AuthFailure::Timeout
            };
            2
        ],
        "PA MRD 120 s, twice"
    );
    assert!(sim.common_requests().is_empty());
    sim.online = true;
    sim.run_secs(200);
    let ev = sim.take_events();
    assert_eq!(granted_ids(&ev), vec![a], "{ev:?}");

    // With MRC/MRD limits, what waits for a first answer gives up with the PA exchange.
    let mut cfg = auth_config("secret");
    cfg.retransmit.mrc = 3;
    let mut sim = AuthSim::new(cfg, 3600, 6);
    let a = sim
        .client
        .create_map(UDP, 5000, 600, false, sim.now)
        .unwrap();
    sim.online = false;
    sim.run_secs(250);
    let ev = sim.take_events();
    assert_eq!(
        ev,
        vec![
            Event::AuthenticationFailed {
                failure: AuthFailure::Timeout
            },
            Event::Lost {
                id: a,
                reason: LostReason::NoResponse
            }
        ]
    );
    assert_eq!(sim.client.poll_timeout(), None);
}

#[test]
fn granted_mappings_expire_on_time_while_the_client_cannot_authenticate() {
    // 50 s sessions, a 100 s mapping: the server becomes unreachable, the session
    // expires at 50 s (its re-authentication unanswered), and nothing can be
    // authenticated when the mapping's lifetime ends.
    let mut sim = AuthSim::new(auth_config("secret"), 50, 8);
    let a = sim
        .client
        .create_map(UDP, 5000, 100, false, sim.now)
        .unwrap();
    sim.run_secs(1);
    sim.take_events();
    let granted_at = sim.now;
    sim.online = false;
    sim.run_secs(150);
    assert!(
        sim.events.iter().any(|(_, e)| *e
            == Event::SessionEnded {
                reason: SessionEnd::Expired
            }),
        "{:?}",
        sim.events
    );
    let lost: Vec<Time> = sim
        .events
        .iter()
        .filter(|(_, e)| {
            *e == Event::Lost {
                id: a,
                reason: LostReason::Expired,
            }
        })
        .map(|(t, _)| *t)
        .collect();
    assert_eq!(lost.len(), 1, "{:?}", sim.events);
    assert!(
        lost[0] <= granted_at + Duration::from_secs(101),
        "expired on time: {lost:?}"
    );
}

#[test]
fn forged_untagged_answers_announces_and_natpmp_are_ignored() {
    let mut sim = AuthSim::new(auth_config("secret"), 3600, 9);
    let a = sim
        .client
        .create_map(UDP, 5000, 600, false, sim.now)
        .unwrap();
    sim.run_secs(5);
    sim.take_events();
    // The granted answer, tagged: a replay of it is dropped.
    let tagged = sim
        .replies
        .iter()
        .rev()
        .find(|(_, r)| pcp_proto::Opcode::from_bits(r[1]) == pcp_proto::Opcode::Map)
        .unwrap()
        .1
        .clone();
    // A renewal outstanding, so that an answer would be taken.
    sim.client
        .set_checkpoint(a, false, Apply::Now, sim.now)
        .unwrap();
    sim.client.handle_datagram(&tagged, SERVER, sim.now);
    // An untagged answer with another external port, an epoch-0 ANNOUNCE on both
    // sockets, and a NAT-PMP UNSUPP_VERSION.
    let mut fake = fake::FakeServer::new(fake::Mode::Pcp);
    fake.next_port = 60000;
    let mut req = sim.common_requests()[0].to_vec();
    let len = req.len();
    let n = pcp_proto::remove_option(&mut req, len, pcp_proto::OptionCode::AuthenticationTag);
    let forged = fake.handle(&req[..n], Time::ZERO).unwrap();
    sim.client.handle_datagram(&forged, SERVER, sim.now);
    let announce = fake.announce(Time::ZERO);
    sim.client.handle_datagram(&announce, SERVER, sim.now);
    let listener = SocketAddr::new(SERVER.ip(), 5350);
    sim.client.handle_datagram(&announce, listener, sim.now);
    sim.client
        .handle_datagram(&[0, 128, 0, 1, 0, 0, 0, 0], SERVER, sim.now);
    sim.client
        .handle_datagram(&[0, 0, 0, 1, 0, 0, 0, 0], SERVER, sim.now);
    if let Some(e) = sim.client.poll_event() {
        panic!("forgery acted on: {e:?}");
    }
    assert_eq!(sim.client.version(), Version::Pcp);
    let g = sim.client.mapping(a).unwrap().grant.unwrap();
    assert!(g.external.port() < 60000, "{g:?}");
}

#[test]
fn same_seed_same_authenticated_run() {
    let run = |seed| {
        let mut sim = AuthSim::new(auth_config("secret"), 300, seed);
        sim.loss = 0.2;
        sim.max_delay = 700;
        sim.client
            .create_map(UDP, 5000, 200, true, sim.now)
            .unwrap();
        sim.run_secs(1500);
        (sim.sent, sim.events)
    };
    assert_eq!(run(42), run(42));
    assert_ne!(run(42).0, run(43).0);
}

#[test]
fn authentication_events_serialize_for_json_output() {
    let j = |e: &Event| serde_json::to_value(e).unwrap();
    assert_eq!(
        j(&Event::Authenticated {
            session_id: 7,
            lifetime: 3600,
            reauthentication: true
        }),
        serde_json::json!({"event": "authenticated", "session_id": 7, "lifetime": 3600, "reauthentication": true})
    );
    assert_eq!(
        j(&Event::AuthenticationFailed {
            failure: AuthFailure::AuthorizationFailed
        }),
        serde_json::json!({"event": "authentication_failed", "failure": "authorization_failed"})
    );
    assert_eq!(
        j(&Event::SessionEnded {
            reason: SessionEnd::Lost
        }),
        serde_json::json!({"event": "session_ended", "reason": "lost"})
    );
    assert_eq!(
        AuthFailure::DowngradeDetected.result_code(),
        ResultCode::DowngradeAttackDetected
    );
}
