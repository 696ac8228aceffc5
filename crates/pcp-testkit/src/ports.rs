//! Loopback addresses and ports for one test.
//!
//! Every daemon gets its own `127.X.Y.Z`, where X comes from the test process id (so
//! that two test runs on one machine, e.g. two worktrees, do not meet) and Y.Z count
//! addresses within the process. Only loopback is ever used.

use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT_SLOT: AtomicU32 = AtomicU32::new(0);

/// A fresh loopback address: `127.X.Y.Z` (see the module doc).
pub fn fresh_ip() -> Ipv4Addr {
    let pid = std::process::id();
    let slot = NEXT_SLOT.fetch_add(1, Ordering::Relaxed);
    // X in 100..=199 keeps clear of 127.0.x.x, which other tools (pcpperf) use.
    let x = 100 + (pid % 100) as u8;
    let y = (slot % 250 + 1) as u8;
    let z = (1 + slot / 250 % 250) as u8;
    Ipv4Addr::new(127, x, y, z)
}

/// A port that was free on `ip` a moment ago (TCP or UDP).
pub fn free_port(ip: Ipv4Addr, udp: bool) -> u16 {
    if udp {
        UdpSocket::bind((ip, 0))
            .and_then(|s| s.local_addr())
            .expect("bind a UDP port on loopback")
            .port()
    } else {
        TcpListener::bind((ip, 0))
            .and_then(|s| s.local_addr())
            .expect("bind a TCP port on loopback")
            .port()
    }
}

/// A UDP port that was free on `ip` a moment ago.
pub fn free_udp(ip: Ipv4Addr) -> u16 {
    free_port(ip, true)
}

/// A TCP port that was free on `ip` a moment ago.
pub fn free_tcp(ip: Ipv4Addr) -> u16 {
    free_port(ip, false)
}
