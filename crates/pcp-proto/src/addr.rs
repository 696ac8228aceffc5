//! PCP's fixed 128-bit address fields (RFC 6887 §5).

use std::net::{IpAddr, Ipv6Addr};

/// Decodes a 16-octet PCP address field.
///
/// An IPv4 address travels as an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`); all 96
/// prefix bits are checked, as RFC 6887 §5 requires. The all-zeros IPv4 address is
/// `::ffff:0.0.0.0` and decodes to `0.0.0.0`, while `::` stays the all-zeros IPv6 address.
pub fn decode_addr(octets: &[u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(*octets);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// Encodes an address into a 16-octet PCP address field (IPv4 as IPv4-mapped IPv6).
pub fn encode_addr(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Reads the 16-octet field at `at` out of `buf` (caller has checked the length).
pub(crate) fn read_addr(buf: &[u8], at: usize) -> IpAddr {
    let mut octets = [0u8; 16];
    octets.copy_from_slice(&buf[at..at + 16]);
    decode_addr(&octets)
}

/// Writes `addr` into the 16-octet field at `at` of `buf`.
pub(crate) fn write_addr(buf: &mut [u8], at: usize, addr: IpAddr) {
    buf[at..at + 16].copy_from_slice(&encode_addr(addr));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn ipv4_is_mapped_and_all_96_bits_are_checked() {
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let enc = encode_addr(v4);
        assert_eq!(&enc[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(decode_addr(&enc), v4);
        // ::1:ffff:c000:201 has the ffff in the right place but a non-zero prefix bit.
        let mut not_mapped = enc;
        not_mapped[5] = 1;
        assert!(decode_addr(&not_mapped).is_ipv6());
    }

    #[test]
    fn zero_addresses_keep_their_family() {
        assert_eq!(
            decode_addr(&encode_addr(IpAddr::V4(Ipv4Addr::UNSPECIFIED))),
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        );
        assert_eq!(decode_addr(&[0; 16]), IpAddr::V6(Ipv6Addr::UNSPECIFIED));
    }
}
