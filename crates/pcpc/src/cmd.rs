//! The subcommands.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use pcp_client::core::{
    Apply, Event, Kind, MappingRequest, RetransmitConfig, parse_nonce, result_name,
};
use pcp_client::policy::{Flow, LocalTime, Policy, PolicyError, protocol_name};
use pcp_client::tokio::{ClientOptions, Mapping, PcpClient};
use pcp_proto::{Filter, Opcode, Response};
use serde_json::json;
use tokio::sync::mpsc;

use crate::output::{self, Subject};
use crate::{AnnounceArgs, Cli, Command, Common, DeleteArgs, ExplainArgs, RunArgs, timeout};

/// Why a command failed; the message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    /// From the client library.
    #[error(transparent)]
    Client(#[from] pcp_client::Error),
    /// From the policy file.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// A bad argument value.
    #[error("{0}")]
    Usage(String),
    /// No answer in time.
    #[error(
        "no answer from {server} within {secs} s: check that a PCP server listens there (UDP 5351) or raise --timeout"
    )]
    Timeout {
        /// The server.
        server: SocketAddr,
        /// The timeout.
        secs: f64,
    },
    /// A socket error.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Runs the command.
pub async fn run(cli: Cli) -> Result<(), CmdError> {
    match &cli.command {
        Command::Map(a) => {
            let mut req = request(&a.common, Kind::Map)?;
            req.prefer_failure = a.prefer_failure;
            for f in &a.filter {
                req.filters.push(parse_filter(f)?);
            }
            map(&cli, &a.common, req).await
        }
        Command::Peer(a) => {
            let req = request(&a.common, Kind::Peer { remote: a.remote })?;
            map(&cli, &a.common, req).await
        }
        Command::Delete(a) => delete(&cli, a).await,
        Command::Announce(a) => announce(&cli, a).await,
        Command::Explain(a) => explain(&cli, a),
        Command::Run(a) => run_policy(&cli, a).await,
    }
}

fn server_addr(cli: &Cli) -> Result<Option<SocketAddr>, CmdError> {
    let Some(s) = &cli.server else {
        return Ok(None);
    };
    let with_port = if s.parse::<IpAddr>().is_ok() || !s.contains(':') {
        format!("{s}:{}", pcp_proto::SERVER_PORT)
    } else {
        s.clone()
    };
    with_port
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .map(Some)
        .ok_or_else(|| {
            CmdError::Usage(format!(
                "--server {s}: not an address; give HOST:PORT, e.g. 192.168.1.1:5351"
            ))
        })
}

fn options(cli: &Cli) -> Result<ClientOptions, CmdError> {
    let mut o = match server_addr(cli)? {
        Some(s) => ClientOptions::new(s),
        None => ClientOptions::discover(),
    };
    o.bind = cli.bind;
    o.retransmit = RetransmitConfig {
        irt: Duration::from_millis(cli.irt_ms.max(1)),
        mrc: cli.mrc,
        mrd: Duration::from_secs(cli.mrd),
        ..RetransmitConfig::default()
    };
    o.canary = !cli.no_canary;
    o.announce_listen = cli.announce_listen;
    o.join_multicast = cli.announce_multicast;
    if let Some(identity) = &cli.identity {
        o.authentication = Some(authentication(cli, identity)?);
    }
    Ok(o)
}

/// The EAP-TTLS peer for `--identity`, `--password-file`, `--ca`, `--server-name`.
fn authentication(cli: &Cli, identity: &str) -> Result<pcp_client::core::Authentication, CmdError> {
    let (Some(pw_file), Some(ca)) = (&cli.password_file, &cli.ca) else {
        return Err(CmdError::Usage(
            "--identity needs --password-file and --ca".into(),
        ));
    };
    let text = std::fs::read_to_string(pw_file)
        .map_err(|e| CmdError::Usage(format!("{}: {e}", pw_file.display())))?;
    let password = text.lines().next().unwrap_or("").as_bytes().to_vec();
    let name = match &cli.server_name {
        Some(n) => n.clone(),
        None => {
            let s = cli.server.clone().ok_or_else(|| {
                CmdError::Usage("--identity needs --server-name or --server".into())
            })?;
            s.rsplit_once(':')
                .map_or(s.clone(), |(h, _)| h.to_string())
                .trim_matches(|c| c == '[' || c == ']')
                .to_string()
        }
    };
    pcp_client::core::Authentication::ttls(identity, &password, ca, &name)
        .map_err(|e| CmdError::Usage(e.to_string()))
}

fn request(c: &Common, kind: Kind) -> Result<MappingRequest, CmdError> {
    let mut req = match kind {
        Kind::Map => MappingRequest::map(c.proto.number(), c.internal_port),
        Kind::Peer { remote } => MappingRequest::peer(c.proto.number(), c.internal_port, remote),
    };
    req.lifetime = c.lifetime;
    req.checkpoint = c.checkpoint;
    req.description = c.description.clone();
    req.third_party = c.third_party;
    if c.external_port.is_some() || c.external_addr.is_some() {
        let ip = c.external_addr.unwrap_or(match kind {
            Kind::Peer { remote } if remote.is_ipv6() => IpAddr::from([0u16; 8]),
            _ => IpAddr::from([0u8; 4]),
        });
        req.suggested_external = Some(SocketAddr::new(ip, c.external_port.unwrap_or(0)));
    }
    if let Some(n) = &c.nonce {
        req.nonce = Some(nonce(n)?);
    }
    Ok(req)
}

fn nonce(s: &str) -> Result<[u8; 12], CmdError> {
    parse_nonce(s).ok_or_else(|| {
        CmdError::Usage(format!(
            "--nonce {s}: a nonce is 24 hex digits, as `pcpc map` prints it"
        ))
    })
}

/// `ADDR/LEN[:PORT]`; for IPv4 the length counts the /32 (it is sent as /96+LEN).
fn parse_filter(s: &str) -> Result<Filter, CmdError> {
    let bad = || {
        CmdError::Usage(format!(
            "--filter {s}: expected ADDR/LEN[:PORT], e.g. 198.51.100.0/24:443 or [2001:db8::]/32:0"
        ))
    };
    let (prefix, port) = match s.rsplit_once(':') {
        Some((p, port)) if p.contains('/') && !port.contains('/') => {
            (p, port.parse::<u16>().map_err(|_| bad())?)
        }
        _ => (s, 0),
    };
    let (addr, len) = prefix.split_once('/').ok_or_else(bad)?;
    let addr: IpAddr = addr
        .trim_matches(|c| c == '[' || c == ']')
        .parse()
        .map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    let prefix_len = match addr {
        IpAddr::V4(_) if len <= 32 => 96 + len,
        IpAddr::V6(_) if len <= 128 => len,
        _ => return Err(bad()),
    };
    Ok(Filter {
        prefix_len,
        remote_port: port,
        remote_addr: addr,
    })
}

async fn with_timeout<T>(
    cli: &Cli,
    server: SocketAddr,
    f: impl Future<Output = Result<T, pcp_client::Error>>,
) -> Result<T, CmdError> {
    match tokio::time::timeout(timeout(cli), f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(CmdError::Timeout {
            server,
            secs: cli.timeout,
        }),
    }
}

async fn map(cli: &Cli, c: &Common, req: MappingRequest) -> Result<(), CmdError> {
    let client = PcpClient::connect(options(cli)?).await?;
    let server = client.server();
    let subject = Subject {
        kind: req.kind,
        protocol: req.protocol,
        internal_port: req.internal_port,
        server: server.to_string(),
    };
    let mut m = client.map(req).await?;
    let grant = with_timeout(cli, server, m.granted()).await?;
    let (list, _, _) = client.status().await?;
    let nonce = list
        .iter()
        .find(|s| s.id == m.id())
        .map(|s| s.nonce)
        .unwrap_or_default();
    output::grant(cli.json, &subject, &grant, &nonce);
    if !c.keep {
        return Ok(());
    }
    let label = format!(
        "{}/{}",
        protocol_name(subject.protocol),
        subject.internal_port
    );
    loop {
        tokio::select! {
            e = m.next_event() => match e {
                Some(e) => {
                    output::event(cli.json, &label, &e);
                    if e.is_final() {
                        return Ok(());
                    }
                }
                None => return Ok(()),
            },
            _ = tokio::signal::ctrl_c() => {
                let id = m.id();
                let confirmed = with_timeout(cli, server, m.delete()).await?;
                output::event(cli.json, &label, &Event::Deleted { id, confirmed });
                return Ok(());
            }
        }
    }
}

async fn delete(cli: &Cli, a: &DeleteArgs) -> Result<(), CmdError> {
    let client = PcpClient::connect(options(cli)?).await?;
    let server = client.server();
    let mut req = match a.remote {
        Some(r) => MappingRequest::peer(a.proto.number(), a.internal_port, r),
        None => MappingRequest::map(a.proto.number(), a.internal_port),
    };
    req.nonce = Some(nonce(&a.nonce)?);
    req.third_party = a.third_party;
    let confirmed = with_timeout(cli, server, client.delete_by_nonce(req)).await?;
    if cli.json {
        output::json_line(&json!({
            "event": "deleted",
            "protocol": protocol_name(a.proto.number()),
            "internal_port": a.internal_port,
            "confirmed": confirmed,
            "server": server.to_string(),
        }));
    } else {
        println!(
            "deleted {} internal port {} on {server}",
            protocol_name(a.proto.number()),
            a.internal_port
        );
    }
    Ok(())
}

async fn announce(cli: &Cli, a: &AnnounceArgs) -> Result<(), CmdError> {
    let Some(listen) = a.listen else {
        let client = PcpClient::connect(options(cli)?).await?;
        let server = client.server();
        let info = with_timeout(cli, server, client.announce()).await?;
        if cli.json {
            output::json_line(&json!({
                "event": "announce_reply",
                "server": server.to_string(),
                "epoch": info.epoch,
                "version": info.version,
            }));
        } else {
            println!(
                "{server}: epoch {} ({})",
                info.epoch,
                match info.version {
                    pcp_client::core::Version::Pcp => "PCP",
                    pcp_client::core::Version::NatPmp => "NAT-PMP",
                }
            );
        }
        return Ok(());
    };
    let sock = tokio::net::UdpSocket::bind(listen)
        .await
        .map_err(|source| CmdError::Listen {
            addr: listen,
            source,
        })?;
    if a.multicast {
        let r = match listen {
            SocketAddr::V4(_) => sock.join_multicast_v4(
                std::net::Ipv4Addr::new(224, 0, 0, 1),
                std::net::Ipv4Addr::UNSPECIFIED,
            ),
            SocketAddr::V6(_) => sock.join_multicast_v6(
                &"ff02::1".parse().unwrap_or(std::net::Ipv6Addr::UNSPECIFIED),
                0,
            ),
        };
        r.map_err(|source| CmdError::Listen {
            addr: listen,
            source,
        })?;
    }
    let only = server_addr(cli)?.map(|s| s.ip());
    let mut seen = 0;
    let mut buf = [0u8; 1100];
    while a.count.is_none_or(|c| seen < c) {
        let (n, from) = tokio::select! {
            r = sock.recv_from(&mut buf) => r.map_err(|source| CmdError::Listen { addr: listen, source })?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        if only.is_some_and(|ip| ip != from.ip()) {
            continue;
        }
        let Ok(r) = Response::parse(&buf[..n]) else {
            continue;
        };
        if r.opcode() != Opcode::Announce {
            continue;
        }
        seen += 1;
        if cli.json {
            output::json_line(&json!({
                "event": "announce",
                "from": from.to_string(),
                "epoch": r.epoch,
                "result": result_name(r.result_code),
            }));
        } else {
            println!("ANNOUNCE from {from}: epoch {}", r.epoch);
        }
    }
    Ok(())
}

fn explain(cli: &Cli, a: &ExplainArgs) -> Result<(), CmdError> {
    let policy = Policy::load(&a.policy)?;
    let at = match &a.at {
        Some(t) => LocalTime::at(t)
            .ok_or_else(|| CmdError::Usage(format!("--at {t}: expected HH:MM, e.g. 19:30")))?,
        None => LocalTime::now(),
    };
    let (remote, remote_port) = match &a.remote {
        None => (None, None),
        Some(r) => match r.parse::<SocketAddr>() {
            Ok(sa) => (Some(sa.ip()), Some(sa.port())),
            Err(_) => (
                Some(r.parse::<IpAddr>().map_err(|_| {
                    CmdError::Usage(format!("--remote {r}: expected ADDR or ADDR:PORT"))
                })?),
                None,
            ),
        },
    };
    let flow = Flow {
        app: a.app.clone(),
        protocol: a.proto.map(|p| p.number()),
        internal_port: a.internal_port,
        remote,
        remote_port,
        tags: a.tag.clone(),
        asked: a.asked,
    };
    let d = policy.explain(&flow, at, a.already);
    output::decision(cli.json, &flow, &d);
    Ok(())
}

fn flow_label(f: &Flow) -> String {
    format!(
        "{} {}/{}",
        f.app,
        f.protocol.map(protocol_name).unwrap_or_default(),
        f.internal_port.unwrap_or(0)
    )
}

async fn run_policy(cli: &Cli, a: &RunArgs) -> Result<(), CmdError> {
    let policy = Policy::load(&a.policy)?;
    if policy.flows.is_empty() {
        return Err(CmdError::Usage(format!(
            "{}: no [[flow]] to keep; add flows (app, proto, internal_port, …)",
            a.policy.display()
        )));
    }
    let client = PcpClient::connect(options(cli)?).await?;
    let server = client.server();
    let flows: Vec<Flow> = policy.flows.iter().map(|f| f.flow.clone()).collect();
    let mut decisions = policy.plan(&flows, LocalTime::now());
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Event)>();
    let mut handles: Vec<Mapping> = Vec::new();
    for (spec, d) in policy.flows.iter().zip(&decisions) {
        let label = flow_label(&spec.flow);
        output::decision(cli.json, &spec.flow, d);
        let protocol = spec.flow.protocol.unwrap_or(17);
        let port = spec.flow.internal_port.unwrap_or(0);
        let mut req = match spec.remote {
            Some(r) => MappingRequest::peer(protocol, port, r),
            None => MappingRequest::map(protocol, port),
        };
        req.checkpoint = d.checkpoint;
        req.description = spec.description.clone().or(Some(label.clone()));
        if let Some(l) = spec.lifetime {
            req.lifetime = l;
        }
        if let Some(p) = spec.external_port {
            req.suggested_external = Some(SocketAddr::new(IpAddr::from([0u8; 4]), p));
        }
        let m = client.map(req).await?;
        handles.push(m);
    }
    // One task per handle forwards its events into one channel and takes checkpoint
    // changes (Some) and the final delete (None) over a channel of its own.
    let mut controls = Vec::new();
    for (i, mut m) in handles.into_iter().enumerate() {
        let tx = tx.clone();
        let (ctl, mut ctl_rx) = mpsc::unbounded_channel::<Option<bool>>();
        controls.push(ctl);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    e = m.next_event() => match e {
                        Some(e) => { let _ = tx.send((i, e)); }
                        None => return,
                    },
                    c = ctl_rx.recv() => match c {
                        Some(Some(on)) => { let _ = m.set_checkpoint(on, Apply::Now).await; }
                        Some(None) | None => {
                            let id = m.id();
                            let confirmed = m.delete().await.unwrap_or(false);
                            let _ = tx.send((i, Event::Deleted { id, confirmed }));
                            return;
                        }
                    },
                }
            }
        });
    }
    drop(tx);
    let labels: Vec<String> = flows.iter().map(flow_label).collect();
    let mut tick = tokio::time::interval(Duration::from_secs(a.every.max(1)));
    tick.tick().await;
    let stop = async {
        match a.for_secs {
            Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    };
    tokio::pin!(stop);
    loop {
        tokio::select! {
            Some((i, e)) = rx.recv() => output::event(cli.json, &labels[i], &e),
            _ = tick.tick() => {
                let now = policy.plan(&flows, LocalTime::now());
                for (i, (old, new)) in decisions.iter().zip(&now).enumerate() {
                    if old.checkpoint != new.checkpoint {
                        output::decision(cli.json, &flows[i], new);
                        let _ = controls[i].send(Some(new.checkpoint));
                    }
                }
                decisions = now;
            }
            () = &mut stop => break,
        }
    }
    for c in &controls {
        let _ = c.send(None);
    }
    let _ = with_timeout(cli, server, async {
        while let Some((i, e)) = rx.recv().await {
            output::event(cli.json, &labels[i], &e);
        }
        Ok(())
    })
    .await;
    Ok(())
}
