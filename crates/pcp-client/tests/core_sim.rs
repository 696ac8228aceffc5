//! Deterministic tests of the sans-IO core against a fake server, with simulated time:
//! retransmission and renewal timing, epoch-loss detection and re-creation, ANNOUNCE,
//! nonces, checkpoint states (incl. blind-echo detection) and the NAT-PMP fallback.

#[path = "support/fake.rs"]
mod fake;

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
