//! Loopback-only address checks: `pcpperf` sends to no address outside 127.0.0.0/8 and
//! `::1`, and binds its client sockets only to such addresses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// What every refusal says, so that the reason is plain.
const WHY: &str = "pcpperf only talks to loopback (127.0.0.0/8 or [::1])";

/// Parses a `--server` value: a literal socket address on loopback with a non-zero port.
///
/// Host names are not resolved (resolving one could itself send traffic).
pub fn parse_server(s: &str) -> Result<SocketAddr, String> {
    let addr = parse_socket_addr(s)?;
    if !is_loopback(addr.ip()) {
        return Err(format!("{} is not a loopback address: {WHY}", addr.ip()));
    }
    if addr.port() == 0 {
        return Err("the server port must not be 0".to_owned());
    }
    Ok(addr)
}

/// Parses an `echo --bind` value: a literal socket address on loopback (port 0 picks a
/// free port).
pub fn parse_bind(s: &str) -> Result<SocketAddr, String> {
    let addr = parse_socket_addr(s)?;
    if !is_loopback(addr.ip()) {
        return Err(format!("{} is not a loopback address: {WHY}", addr.ip()));
    }
    Ok(addr)
}

/// Parses a `--source-base` value: a literal loopback IP address.
pub fn parse_source_base(s: &str) -> Result<IpAddr, String> {
    let ip: IpAddr = s
        .parse()
        .map_err(|_| format!("`{s}` is not an IP address (host names are not resolved)"))?;
    let ip = ip.to_canonical();
    if !is_loopback(ip) {
        return Err(format!("{ip} is not a loopback address: {WHY}"));
    }
    Ok(ip)
}

fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s.parse().map_err(|_| {
        format!("`{s}` is not a socket address such as 127.0.0.1:5351 or [::1]:5351 (host names are not resolved)")
    })?;
    Ok(SocketAddr::new(addr.ip().to_canonical(), addr.port()))
}

/// Whether `ip` is in 127.0.0.0/8 or is `::1` (an IPv4-mapped loopback address counts).
pub fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// The source address of each of `clients` simulated clients talking to `server`.
///
/// IPv4: `base`, `base + 1`, … — every one must stay inside 127.0.0.0/8. IPv6 has one
/// loopback address, so every client uses `::1` (each still has its own socket and port).
pub fn client_sources(
    base: IpAddr,
    clients: u32,
    server: SocketAddr,
) -> Result<Vec<IpAddr>, String> {
    if !is_loopback(base) {
        return Err(format!(
            "source base {base} is not a loopback address: {WHY}"
        ));
    }
    if !is_loopback(server.ip()) {
        return Err(format!(
            "server {} is not a loopback address: {WHY}",
            server.ip()
        ));
    }
    match (base, server.ip()) {
        (IpAddr::V4(b), IpAddr::V4(_)) => (0..clients)
            .map(|i| {
                let ip = u32::from(b)
                    .checked_add(i)
                    .map(Ipv4Addr::from)
                    .filter(|ip| ip.is_loopback())
                    .ok_or_else(|| {
                        format!(
                            "client {i}'s source address (source base {b} + {i}) falls outside \
                             127.0.0.0/8: {WHY}; lower --clients or --source-base"
                        )
                    })?;
                Ok(IpAddr::V4(ip))
            })
            .collect(),
        (IpAddr::V6(_), IpAddr::V6(_)) => {
            Ok(vec![IpAddr::V6(Ipv6Addr::LOCALHOST); clients as usize])
        }
        (b, s) => Err(format!(
            "the source base {b} and the server {s} are of different address families; \
             use --source-base ::1 with an IPv6 server"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_outside_loopback_are_refused() {
        assert!(parse_server("127.0.0.1:5351").is_ok());
        assert!(parse_server("127.9.8.7:1").is_ok());
        assert!(parse_server("[::1]:5351").is_ok());
        assert_eq!(
            parse_server("[::ffff:127.0.0.1]:5351").unwrap(),
            "127.0.0.1:5351".parse().unwrap()
        );
        for bad in [
            "192.0.2.1:5351",
            "10.0.0.1:5351",
            "0.0.0.0:5351",
            "[::]:5351",
            "[2001:db8::1]:5351",
            "[::ffff:192.0.2.1]:5351",
            "128.0.0.1:5351",
        ] {
            let err = parse_server(bad).unwrap_err();
            assert!(err.contains("loopback"), "{bad}: {err}");
        }
        assert!(parse_server("localhost:5351").is_err());
        assert!(parse_server("127.0.0.1:0").is_err());
    }

    #[test]
    fn sources_increment_and_stay_in_loopback() {
        let server = "127.0.0.1:5351".parse().unwrap();
        let got = client_sources("127.0.1.1".parse().unwrap(), 3, server).unwrap();
        let want: Vec<IpAddr> = ["127.0.1.1", "127.0.1.2", "127.0.1.3"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(got, want);
        let err = client_sources("127.255.255.255".parse().unwrap(), 2, server).unwrap_err();
        assert!(err.contains("127.0.0.0/8"), "{err}");
        assert!(client_sources("192.0.2.1".parse().unwrap(), 1, server).is_err());
        assert!(client_sources("::1".parse().unwrap(), 1, server).is_err());
        let v6 = client_sources("::1".parse().unwrap(), 2, "[::1]:5351".parse().unwrap()).unwrap();
        assert_eq!(v6, vec![IpAddr::V6(Ipv6Addr::LOCALHOST); 2]);
    }

    #[test]
    fn source_base_must_be_loopback() {
        assert!(parse_source_base("127.0.1.1").is_ok());
        assert!(
            parse_source_base("10.1.1.1")
                .unwrap_err()
                .contains("loopback")
        );
        assert!(parse_bind("0.0.0.0:5351").unwrap_err().contains("loopback"));
        assert!(parse_bind("127.0.0.1:0").is_ok());
    }
}
