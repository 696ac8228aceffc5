//! What pcpc's end-to-end tests share: running the built `pcpc` from a loopback address.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Output, Stdio};

pub const PCPC: &str = env!("CARGO_BIN_EXE_pcpc");

/// Runs pcpc bound to `ip` against `server` (300 ms initial retransmission time, giving
/// up after `timeout_s` seconds) with `args`.
pub fn pcpc(ip: IpAddr, server: SocketAddr, timeout_s: u32, args: &[&str]) -> Output {
    Command::new(PCPC)
        .arg("--server")
        .arg(server.to_string())
        .arg("--bind")
        .arg(SocketAddr::new(ip, 0).to_string())
        .args(["--irt-ms", "300", "--timeout", &timeout_s.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run pcpc")
}

/// The arguments of a JSON MAP of UDP `port` for 600 s, authenticated as alice with the
/// password in `password_file`, trusting `ca` for `server_name`.
pub fn identity_map_args<'a>(
    password_file: &'a str,
    ca: &'a str,
    server_name: &'a str,
    port: &'a str,
) -> [&'a str; 16] {
    [
        "--json",
        "--identity",
        "alice",
        "--password-file",
        password_file,
        "--ca",
        ca,
        "--server-name",
        server_name,
        "map",
        "--proto",
        "udp",
        "--internal-port",
        port,
        "--lifetime",
        "600",
    ]
}
