//! The client against the real `pcpd` process, over loopback: checkpoint honoured, not
//! honoured (quota, no backup), the flag cleared on renewal, a server restart detected
//! (from a response's epoch, and from a unicast ANNOUNCE) with every mapping re-created,
//! refusals, PEER, and the blocking facade.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use pcp_client::Error;
use pcp_client::core::{
    Apply, CheckpointState, Event, LossCause, MappingRequest, RetransmitConfig,
};
use pcp_client::tokio::{ClientOptions, Mapping, PcpClient};
use pcp_proto::{Body, Options, Response, ResultCode};
use pcp_testkit::pcpd::{HONOUR, Pcpd, short_lifetime_config, wait_until};
use pcp_testkit::ports::{free_udp, fresh_ip};

const UDP: u8 = 17;
const TCP: u8 = 6;
const T: Duration = Duration::from_secs(10);

fn opts(p: &Pcpd) -> ClientOptions {
    ClientOptions::new(p.pcp)
        .bind(SocketAddr::new(IpAddr::V4(p.ip), 0))
        .retransmit(RetransmitConfig {
            irt: Duration::from_millis(300),
            ..RetransmitConfig::default()
        })
}

async fn next(m: &mut Mapping) -> Event {
    tokio::time::timeout(T, m.next_event())
        .await
        .expect("an event within 10 s")
        .expect("the mapping is alive")
}

/// Waits for an event matching `f`, skipping others.
async fn until(m: &mut Mapping, f: impl Fn(&Event) -> bool) -> Event {
    loop {
        let e = next(m).await;
        if f(&e) {
            return e;
        }
    }
}

async fn blocking<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honoured_when_the_server_honours() {
    let p = Pcpd::start(&short_lifetime_config(HONOUR));
    let client = PcpClient::connect(opts(&p)).await.unwrap();
    let mut m = client
        .map(
            MappingRequest::map(UDP, 5060)
                .lifetime(600)
                .checkpoint(true),
        )
        .await
        .unwrap();
    let g = m.granted().await.unwrap();
    assert_eq!(g.checkpoint, CheckpointState::Honoured);
    assert_eq!(g.lifetime, 600);
    assert_ne!(g.external.port(), 0);
    let mut plain = client
        .map(MappingRequest::map(TCP, 8080).lifetime(600))
        .await
        .unwrap();
    assert_eq!(
        plain.granted().await.unwrap().checkpoint,
        CheckpointState::NotRequested
    );
    let (server_view, plain_view) =
        blocking(move || (p.find_mapping(5060), p.find_mapping(8080))).await;
    let (server_view, plain_view) = (server_view.unwrap(), plain_view.unwrap());
    assert_eq!(server_view["checkpointed"], true);
    assert_eq!(server_view["external_port"], g.external.port());
    assert_eq!(plain_view["checkpointed"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_honoured_over_quota_or_without_backup() {
    let p = Pcpd::start(&short_lifetime_config(&format!(
        "{HONOUR}[tiers.default]\ncheckpoint_quota = 1\n"
    )));
    let client = PcpClient::connect(opts(&p)).await.unwrap();
    let mut a = client
        .map(
            MappingRequest::map(UDP, 5000)
                .lifetime(600)
                .checkpoint(true),
        )
        .await
        .unwrap();
    assert_eq!(
        a.granted().await.unwrap().checkpoint,
        CheckpointState::Honoured
    );
    let mut b = client
        .map(
            MappingRequest::map(UDP, 5001)
                .lifetime(600)
                .checkpoint(true),
        )
        .await
        .unwrap();
    assert_eq!(
        b.granted().await.unwrap().checkpoint,
        CheckpointState::NotHonoured
    );
    let view = blocking(move || p.find_mapping(5001)).await.unwrap();
    assert_eq!(view["checkpointed"], false);
    assert_eq!(view["checkpoint_reason"], "quota");

    // pcpd's default: no backup, no promise.
    let q = Pcpd::start(&short_lifetime_config(""));
    let client = PcpClient::connect(opts(&q)).await.unwrap();
    let mut c = client
        .map(
            MappingRequest::map(UDP, 5002)
                .lifetime(600)
                .checkpoint(true),
        )
        .await
        .unwrap();
    assert_eq!(
        c.granted().await.unwrap().checkpoint,
        CheckpointState::NotHonoured
    );
    let view = blocking(move || q.find_mapping(5002)).await.unwrap();
    assert_eq!(view["checkpoint_reason"], "no_backup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flag_cleared_on_the_next_renewal_and_set_again_now() {
    let p = std::sync::Arc::new(Pcpd::start(&short_lifetime_config(HONOUR)));
    let client = PcpClient::connect(opts(&p)).await.unwrap();
    // Lifetime 4 s: renewals every 2–2.5 s.
    let mut m = client
        .map(MappingRequest::map(UDP, 6000).lifetime(4).checkpoint(true))
        .await
        .unwrap();
    let g = m.granted().await.unwrap();
    assert_eq!(g.checkpoint, CheckpointState::Honoured);
    let p2 = p.clone();
    assert_eq!(
        blocking(move || p2.find_mapping(6000)).await.unwrap()["checkpointed"],
        true
    );

    m.set_checkpoint(false, Apply::NextRenewal).await.unwrap();
    // Still checkpointed until the renewal (nothing sent now).
    let p2 = p.clone();
    assert_eq!(
        blocking(move || p2.find_mapping(6000)).await.unwrap()["checkpointed"],
        true
    );
    let e = until(&mut m, |e| matches!(e, Event::Renewed { .. })).await;
    let Event::Renewed { grant, .. } = e else {
        unreachable!()
    };
    assert_eq!(grant.checkpoint, CheckpointState::NotRequested);
    assert_eq!(
        grant.external, g.external,
        "same mapping: the nonce was kept"
    );
    let p2 = p.clone();
    let view = blocking(move || p2.find_mapping(6000)).await.unwrap();
    assert_eq!(view["checkpointed"], false);
    assert_eq!(view["checkpoint_requested"], false);

    // Set again, now: a renewal goes out at once.
    let t0 = std::time::Instant::now();
    m.set_checkpoint(true, Apply::Now).await.unwrap();
    let e = until(&mut m, |e| matches!(e, Event::Renewed { .. })).await;
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t0.elapsed()
    );
    let Event::Renewed { grant, .. } = e else {
        unreachable!()
    };
    assert_eq!(grant.checkpoint, CheckpointState::Honoured);
    let p2 = p.clone();
    assert_eq!(
        blocking(move || p2.find_mapping(6000)).await.unwrap()["checkpointed"],
        true
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_is_detected_and_every_mapping_recreated() {
    let mut first = Pcpd::start(&short_lifetime_config(HONOUR));
    let addr = first.pcp;
    let client = PcpClient::connect(opts(&first)).await.unwrap();
    let mut events = client.subscribe();
    // `short` renews every 2–2.5 s; `long` (120 s) would not renew for a minute.
    let mut short = client
        .map(MappingRequest::map(UDP, 7000).lifetime(4).checkpoint(true))
        .await
        .unwrap();
    let mut long = client
        .map(
            MappingRequest::map(TCP, 7001)
                .lifetime(120)
                .checkpoint(true),
        )
        .await
        .unwrap();
    short.granted().await.unwrap();
    long.granted().await.unwrap();
    // Let the client see the epoch advance to ≥ 4.
    for _ in 0..2 {
        until(&mut short, |e| matches!(e, Event::Renewed { .. })).await;
    }
    let second = blocking(move || {
        first.kill9();
        Pcpd::start_at(addr, &short_lifetime_config(HONOUR))
    })
    .await;
    assert!(second.mappings().is_empty());
    // The next renewal of `short` meets the new server: its epoch went back.
    let e = tokio::time::timeout(T, events.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(
            e,
            Event::ServerStateLost {
                cause: LossCause::Response,
                ..
            }
        ),
        "{e:?}"
    );
    // `long` is re-created at once, long before its own renewal.
    let e = until(&mut long, |e| matches!(e, Event::Granted { .. })).await;
    let Event::Granted { grant, .. } = e else {
        unreachable!()
    };
    assert_eq!(grant.checkpoint, CheckpointState::Honoured);
    let ok = blocking(move || {
        let ok = wait_until(Duration::from_secs(3), || {
            second.find_mapping(7000).is_some() && second.find_mapping(7001).is_some()
        });
        (ok, second.mappings())
    })
    .await;
    assert!(ok.0, "both mappings on the new pcpd: {:#?}", ok.1);
    assert!(
        ok.1.iter().all(|m| m["checkpointed"] == true),
        "{:#?}",
        ok.1
    );
}

/// An unsolicited ANNOUNCE from the server's address with epoch `epoch`.
fn announce_bytes(epoch: u32) -> Vec<u8> {
    let r = Response {
        result_code: ResultCode::Success,
        lifetime: 0,
        epoch,
        body: Body::Announce,
        options: Options::EMPTY,
    };
    let mut buf = vec![0; 24];
    r.emit(&mut buf).unwrap();
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announce_to_the_listener_after_a_restart_recreates_mappings() {
    let mut first = Pcpd::start(&short_lifetime_config(HONOUR));
    let addr = first.pcp;
    let listen = SocketAddr::new(IpAddr::V4(first.ip), free_udp(first.ip));
    let mut o = opts(&first).announce_listen(listen, false);
    o.announce_spread = Duration::from_millis(200);
    let client = PcpClient::connect(o).await.unwrap();
    let mut a = client
        .map(MappingRequest::map(UDP, 7100).lifetime(120))
        .await
        .unwrap();
    a.granted().await.unwrap();
    tokio::time::sleep(Duration::from_millis(3200)).await;
    // The client's epoch view: ~3 s; an ANNOUNCE still saying so changes nothing.
    let info = client.announce().await.unwrap();
    assert!(info.epoch >= 3, "{info:?}");
    let second = blocking(move || {
        first.kill9();
        Pcpd::start_at(addr, &short_lifetime_config(HONOUR))
    })
    .await;
    // A forged ANNOUNCE from another address is ignored.
    let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
    stranger.send_to(&announce_bytes(0), listen).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = blocking(move || {
        assert!(
            second.find_mapping(7100).is_none(),
            "nothing re-created yet"
        );
        second
    })
    .await;
    // The new server's ANNOUNCE (sent unicast to the listener; pcpd's own goes to the
    // multicast group, which tests do not use).
    let from_server = UdpSocket::bind((second.ip, 0)).unwrap();
    from_server.send_to(&announce_bytes(0), listen).unwrap();
    let e = until(&mut a, |e| {
        matches!(e, Event::ServerStateLost { .. } | Event::Granted { .. })
    })
    .await;
    assert!(
        matches!(
            e,
            Event::ServerStateLost {
                cause: LossCause::Announce,
                ..
            }
        ),
        "{e:?}"
    );
    until(&mut a, |e| matches!(e, Event::Granted { .. })).await;
    let found = blocking(move || second.find_mapping(7100)).await;
    assert!(found.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_peer_and_delete() {
    let p = std::sync::Arc::new(Pcpd::start(&short_lifetime_config(HONOUR)));
    let client = PcpClient::connect(opts(&p)).await.unwrap();
    // THIRD_PARTY is not allowed by default: NOT_AUTHORIZED, a long-lifetime error.
    let mut tp = client
        .map(MappingRequest::map(UDP, 5000).third_party("127.9.9.9".parse().unwrap()))
        .await
        .unwrap();
    match tp.granted().await {
        Err(Error::Refused { result }) => assert_eq!(result, ResultCode::NotAuthorized),
        other => panic!("{other:?}"),
    }
    // PEER with a checkpoint and a description.
    let remote: SocketAddr = "198.51.100.20:3478".parse().unwrap();
    let mut peer = client
        .map(
            MappingRequest::peer(UDP, 5004, remote)
                .lifetime(300)
                .checkpoint(true)
                .description("call to 198.51.100.20"),
        )
        .await
        .unwrap();
    let g = peer.granted().await.unwrap();
    assert_eq!(g.checkpoint, CheckpointState::Honoured);
    let p2 = p.clone();
    let v = blocking(move || p2.find_mapping(5004)).await.unwrap();
    assert_eq!(v["opcode"], "peer");
    assert_eq!(v["remote_port"], 3478);
    assert_eq!(v["description"], "call to 198.51.100.20");
    assert_eq!(v["checkpointed"], true);
    // A PEER cannot be deleted (RFC 6887 §12.1): the client only stops renewing it.
    assert!(!peer.delete().await.unwrap());
    let p2 = p.clone();
    assert!(blocking(move || p2.find_mapping(5004)).await.is_some());
    // A MAP can: confirmed, and gone from the server.
    let mut map = client
        .map(
            MappingRequest::map(UDP, 5005)
                .lifetime(300)
                .checkpoint(true),
        )
        .await
        .unwrap();
    map.granted().await.unwrap();
    assert!(map.delete().await.unwrap());
    let p2 = p.clone();
    assert!(blocking(move || p2.find_mapping(5005)).await.is_none());
}

#[test]
fn blocking_facade_maps_and_deletes() {
    let p = Pcpd::start(&short_lifetime_config(HONOUR));
    let client = pcp_client::blocking::PcpClient::connect(opts(&p)).unwrap();
    let mut m = client
        .map(
            MappingRequest::map(TCP, 2222)
                .lifetime(300)
                .checkpoint(true),
        )
        .unwrap();
    let g = m.granted(Some(T)).unwrap();
    assert_eq!(g.checkpoint, CheckpointState::Honoured);
    assert_eq!(
        p.find_mapping(2222).unwrap()["external_port"],
        g.external.port()
    );
    let (list, epoch, _) = client.status().unwrap();
    assert_eq!(list.len(), 1);
    assert!(epoch.is_some());
    assert!(m.delete().unwrap());
    assert!(p.find_mapping(2222).is_none());
    // No server there: announce times out.
    let ip = fresh_ip();
    let nobody = SocketAddr::new(IpAddr::V4(ip), free_udp(ip));
    let c = pcp_client::blocking::PcpClient::connect(
        ClientOptions::new(nobody).bind(SocketAddr::new(IpAddr::V4(ip), 0)),
    )
    .unwrap();
    assert!(matches!(
        c.announce(Some(Duration::from_millis(300))),
        Err(Error::NoResponse { .. })
    ));
}
