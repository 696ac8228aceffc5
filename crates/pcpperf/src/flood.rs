//! `pcpperf flood`: one host sending MAP requests as fast as one thread can, each for
//! a new internal port (so each one the server let through would create a mapping),
//! answers never read. It measures nothing about the server itself; run it beside a
//! paced `pcpperf map --rate R` and compare that client's success with an idle run.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use pcp_proto::{Body, MapBody, Options, PcpOption, Request, ResultCode};

use crate::addr;

/// What a flood sent.
#[derive(Debug, Clone, Copy)]
pub struct FloodReport {
    /// Datagrams sent.
    pub sent: u64,
    /// Sends that failed (ICMP errors reported on the socket, full buffers).
    pub failed: u64,
    /// How long it ran.
    pub elapsed: Duration,
}

impl std::fmt::Display for FloodReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        write!(
            f,
            "flood: sent {} in {:.1} s ({:.0}/s), {} sends failed",
            self.sent,
            secs,
            self.sent as f64 / secs,
            self.failed
        )
    }
}

/// The MAP request for internal port `port` from `client`.
fn request(client: IpAddr, port: u16, checkpoint: bool, buf: &mut [u8]) -> usize {
    let opts = [PcpOption::CheckpointRequired];
    let mut nonce = *b"flood-nonce0";
    nonce[10..].copy_from_slice(&port.to_be_bytes());
    Request {
        lifetime: 3600,
        client_addr: client,
        body: Body::Map(MapBody {
            nonce,
            protocol: pcp_proto::protocol::UDP,
            internal_port: port,
            external_port: 0,
            external_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        }),
        options: if checkpoint {
            Options::from_list(&opts)
        } else {
            Options::EMPTY
        },
        pa_result_code: ResultCode::Success,
    }
    .emit(buf)
    .unwrap_or(0)
}

/// Floods `server` from `source` for `duration`.
pub fn run(
    server: SocketAddr,
    source: IpAddr,
    duration: Duration,
    checkpoint: bool,
) -> Result<FloodReport, String> {
    if !addr::is_loopback(server.ip()) || !addr::is_loopback(source) {
        return Err("flood: loopback addresses only".into());
    }
    let sock = UdpSocket::bind((source, 0))
        .and_then(|s| s.connect(server).map(|()| s))
        .map_err(|e| format!("cannot open a socket from {source} to {server}: {e}"))?;
    // 4,096 distinct requests, built once: ports 1024.. (each a new mapping).
    let mut reqs = Vec::with_capacity(4096);
    for i in 0..4096u16 {
        let mut buf = [0u8; 128];
        let n = request(source, 1024 + i, checkpoint, &mut buf);
        reqs.push(buf[..n].to_vec());
    }
    let start = Instant::now();
    let (mut sent, mut failed) = (0u64, 0u64);
    while start.elapsed() < duration {
        for r in reqs.iter().take(256) {
            match sock.send(r) {
                Ok(_) => sent += 1,
                Err(_) => failed += 1,
            }
        }
        reqs.rotate_left(256);
    }
    Ok(FloodReport {
        sent,
        failed,
        elapsed: start.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_non_loopback() {
        let r = run(
            "192.0.2.1:5351".parse().unwrap(),
            "127.0.0.1".parse().unwrap(),
            Duration::ZERO,
            false,
        );
        assert!(r.is_err());
    }

    #[test]
    fn requests_parse_and_name_the_source() {
        let mut buf = [0u8; 128];
        let ip: IpAddr = "127.0.9.1".parse().unwrap();
        let n = request(ip, 4000, true, &mut buf);
        let r = Request::parse(&buf[..n]).unwrap();
        assert_eq!(r.client_addr, ip);
        assert!(r.options.checkpoint_required());
    }
}
