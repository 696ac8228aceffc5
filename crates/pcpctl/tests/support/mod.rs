//! What pcpctl's end-to-end tests share beyond `pcp-testkit`: a daemon to run against
//! (the workspace's pcpd, see `pcp_testkit::bins` for where it comes from) and running
//! the built `pcpctl` against it.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use pcp_testkit::{Pcpd, pcpd, pcpd_bin};

pub const PCPCTL: &str = env!("CARGO_BIN_EXE_pcpctl");

pub fn start(config: Option<&str>) -> Pcpd {
    let b = pcpd(pcpd_bin());
    match config {
        Some(c) => b.config(c),
        None => b,
    }
    .start()
}

/// Runs pcpctl against `d` with `args`; (exit code, stdout, stderr).
pub fn pcpctl(d: &Pcpd, args: &[&str]) -> (Option<i32>, String, String) {
    let admin = d.admin.to_string();
    let mut all = vec!["--admin", admin.as_str()];
    all.extend_from_slice(args);
    let (status, out, err) = pcp_testkit::run(Path::new(PCPCTL), &all, Duration::from_secs(20));
    (status.code(), out, err)
}
