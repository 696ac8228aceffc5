//! `pcpperf echo`: the trivial responder that sets the throughput floor.
//!
//! Every datagram of at least a PCP header (24 octets) is sent back with the R bit set,
//! result code 0 (SUCCESS), a fixed epoch and the 96 reserved response bits zeroed. The
//! opcode body and options come back as they were, so a request's nonce, internal port
//! and CHECKPOINT_REQUIRED option are reflected. Nothing else is parsed.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

use crate::shutdown_signal;

/// Epoch time every echoed response carries.
pub const ECHO_EPOCH: u32 = 1;

/// Datagrams handled per wake-up before the loop looks at its stop conditions again.
const BUDGET: usize = 256;

/// Turns a request datagram into its echoed response in place. Returns `false` (and
/// leaves the buffer alone) for a datagram shorter than a PCP header.
pub fn make_response(datagram: &mut [u8]) -> bool {
    if datagram.len() < pcp_proto::HEADER_LEN {
        return false;
    }
    datagram[1] |= 0x80;
    datagram[3] = 0;
    datagram[8..12].copy_from_slice(&ECHO_EPOCH.to_be_bytes());
    datagram[12..24].fill(0);
    true
}

/// Binds `bind` and echoes until SIGINT/SIGTERM or until `duration` has passed.
pub fn run(bind: SocketAddr, duration: Option<Duration>) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    rt.block_on(serve(bind, duration))
}

fn bind_socket(bind: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))?;
    // Deep buffers so that a burst from many clients is queued rather than dropped;
    // the kernel caps these at its own limits.
    let _ = socket.set_recv_buffer_size(4 << 20);
    let _ = socket.set_send_buffer_size(4 << 20);
    socket.set_nonblocking(true)?;
    socket.bind(&bind.into())?;
    UdpSocket::from_std(socket.into())
}

async fn serve(bind: SocketAddr, duration: Option<Duration>) -> Result<(), String> {
    let socket = bind_socket(bind).map_err(|e| format!("cannot bind {bind}: {e}"))?;
    let local = socket
        .local_addr()
        .map_err(|e| format!("cannot read the bound address: {e}"))?;
    {
        // The line a script (or tests/cli.rs) waits for before it starts sending.
        let mut out = io::stdout().lock();
        let _ = writeln!(out, "pcpperf echo: listening on {local}");
        let _ = out.flush();
    }
    let started = std::time::Instant::now();
    let stop = async {
        match duration {
            Some(d) => tokio::select! {
                _ = tokio::time::sleep(d) => {}
                _ = shutdown_signal() => {}
            },
            None => shutdown_signal().await,
        }
    };
    tokio::pin!(stop);

    let mut buf = vec![0u8; 65_536];
    let mut answered: u64 = 0;
    let mut ignored: u64 = 0;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            ready = socket.readable() => {
                ready.map_err(|e| format!("socket error: {e}"))?;
                for _ in 0..BUDGET {
                    let (n, from) = match socket.try_recv_from(&mut buf) {
                        Ok(got) => got,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        // ICMP errors reported on the socket: nothing to answer.
                        Err(e) if transient(&e) => continue,
                        Err(e) => return Err(format!("receive failed: {e}")),
                    };
                    let datagram = &mut buf[..n];
                    if !make_response(datagram) {
                        ignored += 1;
                        continue;
                    }
                    match socket.try_send_to(datagram, from) {
                        Ok(_) => answered += 1,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            socket
                                .send_to(datagram, from)
                                .await
                                .map_err(|e| format!("send failed: {e}"))?;
                            answered += 1;
                        }
                        Err(e) if transient(&e) => ignored += 1,
                        Err(e) => return Err(format!("send to {from} failed: {e}")),
                    }
                }
            }
        }
    }
    eprintln!(
        "pcpperf echo: answered {answered} datagrams ({ignored} ignored) in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Errors a UDP socket reports for an earlier datagram (an ICMP message): not fatal.
fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcp_proto::{Body, MapBody, Options, PcpOption, Request, Response, ResultCode};

    #[test]
    fn echoed_request_parses_as_a_success_response() {
        let opts = [PcpOption::CheckpointRequired];
        let req = Request {
            lifetime: 3600,
            client_addr: "127.0.1.1".parse().unwrap(),
            body: Body::Map(MapBody {
                nonce: *b"abcdefghijkl",
                protocol: pcp_proto::protocol::UDP,
                internal_port: 10_000,
                external_port: 0,
                external_addr: "0.0.0.0".parse().unwrap(),
            }),
            options: Options::from_list(&opts),
            pa_result_code: ResultCode::Success,
        };
        let mut buf = [0u8; 256];
        let n = req.emit(&mut buf).unwrap();
        assert!(make_response(&mut buf[..n]));
        let resp = Response::parse(&buf[..n]).unwrap();
        assert_eq!(resp.result_code, ResultCode::Success);
        assert_eq!(resp.epoch, ECHO_EPOCH);
        assert_eq!(resp.lifetime, 3600);
        assert_eq!(resp.body, req.body);
        assert!(resp.options.checkpoint_required());
        assert!(buf[12..24].iter().all(|&b| b == 0));
    }

    #[test]
    fn short_datagrams_are_ignored() {
        let mut short = [2u8; 23];
        assert!(!make_response(&mut short));
        assert_eq!(short, [2u8; 23]);
    }
}
