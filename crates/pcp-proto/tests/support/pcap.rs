//! A minimal classic-pcap writer (libpcap format 2.4) for the tshark check: each UDP
//! datagram becomes one raw IPv4 packet (LINKTYPE_RAW) with a header built here.

use std::net::SocketAddrV4;

/// Link type for packets that start directly with an IPv4 or IPv6 header.
const LINKTYPE_RAW: u32 = 101;
/// Capture time of the first packet (seconds since 1970); each next one is a second later.
const FIRST_TIMESTAMP: u32 = 1_700_000_000;

/// One UDP datagram to record.
pub struct Datagram<'a> {
    /// Sender address and port.
    pub src: SocketAddrV4,
    /// Receiver address and port.
    pub dst: SocketAddrV4,
    /// UDP payload.
    pub payload: &'a [u8],
}

/// The bytes of a pcap file holding `datagrams`, in order.
pub fn capture(datagrams: &[Datagram<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    // Global header, written little-endian: magic, version 2.4, UTC offset, timestamp
    // accuracy, snapshot length, link type.
    out.extend_from_slice(&0xa1b2_c3d4_u32.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    out.extend_from_slice(&0i32.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&65_535u32.to_le_bytes());
    out.extend_from_slice(&LINKTYPE_RAW.to_le_bytes());
    for (seconds, d) in (FIRST_TIMESTAMP..).zip(datagrams) {
        let packet = ipv4_udp(d);
        let len = u32::try_from(packet.len()).expect("packet length fits in 32 bits");
        // Record header: timestamp (seconds, microseconds), captured and original length.
        for field in [seconds, 0, len, len] {
            out.extend_from_slice(&field.to_le_bytes());
        }
        out.extend_from_slice(&packet);
    }
    out
}

/// An IPv4 header (no options, header checksum computed) + UDP header (checksum 0,
/// "none", which IPv4 allows) + payload.
fn ipv4_udp(d: &Datagram<'_>) -> Vec<u8> {
    let udp_len = u16::try_from(8 + d.payload.len()).expect("payload fits in a UDP datagram");
    let total_len = udp_len
        .checked_add(20)
        .expect("datagram fits in an IPv4 packet");
    let mut p = Vec::with_capacity(usize::from(total_len));
    p.extend_from_slice(&[0x45, 0]); // version 4, header length 5 words; DSCP/ECN 0
    p.extend_from_slice(&total_len.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0]); // identification 0; DF set, fragment offset 0
    p.extend_from_slice(&[64, 17, 0, 0]); // TTL 64, protocol UDP, checksum (filled below)
    p.extend_from_slice(&d.src.ip().octets());
    p.extend_from_slice(&d.dst.ip().octets());
    let checksum = internet_checksum(&p);
    p[10..12].copy_from_slice(&checksum.to_be_bytes());
    p.extend_from_slice(&d.src.port().to_be_bytes());
    p.extend_from_slice(&d.dst.port().to_be_bytes());
    p.extend_from_slice(&udp_len.to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(d.payload);
    p
}

/// The Internet checksum (RFC 1071) of an even-length buffer.
fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks_exact(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
