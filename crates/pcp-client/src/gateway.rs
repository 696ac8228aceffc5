//! The default gateway, where a PCP server usually runs (RFC 6887 §8.1: "the default
//! router"). Linux only: IPv4 from `/proc/net/route`.

use std::net::Ipv4Addr;

/// Why the default gateway could not be found.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The routing table could not be read.
    #[error(
        "cannot read {path}: {source} (gateway discovery works on Linux only: give the server address explicitly)"
    )]
    Read {
        /// The file.
        path: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No IPv4 default route.
    #[error(
        "this host has no IPv4 default route: give the PCP server's address explicitly (HOST:PORT)"
    )]
    NoDefaultRoute,
}

/// The routing table on Linux.
pub const ROUTE_TABLE: &str = "/proc/net/route";

/// The IPv4 default gateway of this host.
pub fn default_gateway() -> Result<Ipv4Addr, GatewayError> {
    let text = std::fs::read_to_string(ROUTE_TABLE).map_err(|source| GatewayError::Read {
        path: ROUTE_TABLE,
        source,
    })?;
    parse_route_table(&text).ok_or(GatewayError::NoDefaultRoute)
}

/// The default gateway in the text of `/proc/net/route`: the up, gateway route with
/// destination and mask 0 and the lowest metric.
///
/// Addresses there are the kernel's network-order octets printed as a native
/// (little-endian on the machines this runs on) hexadecimal integer: `0101A8C0` is
/// 192.168.1.1.
pub fn parse_route_table(text: &str) -> Option<Ipv4Addr> {
    const RTF_UP: u32 = 0x1;
    const RTF_GATEWAY: u32 = 0x2;
    let mut best: Option<(u32, Ipv4Addr)> = None;
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let hex = |s: &str| u32::from_str_radix(s, 16).ok();
        let (Some(dest), Some(gw), Some(flags), Some(metric), Some(mask)) = (
            hex(f[1]),
            hex(f[2]),
            hex(f[3]),
            f[6].parse::<u32>().ok(),
            hex(f[7]),
        ) else {
            continue;
        };
        if dest != 0 || mask != 0 || flags & (RTF_UP | RTF_GATEWAY) != RTF_UP | RTF_GATEWAY {
            continue;
        }
        let addr = Ipv4Addr::from(gw.to_le_bytes());
        if best.is_none_or(|(m, _)| metric < m) {
            best = Some((metric, addr));
        }
    }
    best.map(|b| b.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0
eth0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth0\t0000000A\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0
";

    #[test]
    fn lowest_metric_default_route() {
        assert_eq!(parse_route_table(TABLE), Some(Ipv4Addr::new(10, 0, 0, 1)));
    }

    #[test]
    fn no_default_route() {
        let t = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n\
                 eth0\t0000000A\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(parse_route_table(t), None);
        // A default route that is down does not count.
        let t = "h\neth0\t00000000\t0100000A\t0002\t0\t0\t100\t00000000\t0\t0\t0\n";
        assert_eq!(parse_route_table(t), None);
    }
}
