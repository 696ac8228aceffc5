//! End-to-end: `pcpperf echo` as a child process, `pcpperf map`/`peer` against it, and
//! the loopback-only refusals.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_pcpperf");

/// Kills and reaps the child when dropped, also when a test fails.
struct ChildGuard {
    child: Child,
    /// Kept open so the child never writes to a closed pipe.
    _stdout: BufReader<ChildStdout>,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `pcpperf echo` on a free loopback port and waits until it listens.
fn start_echo() -> (ChildGuard, SocketAddr) {
    let mut child = Command::new(BIN)
        // --duration bounds its life even if this process dies before the guard runs.
        .args(["echo", "--bind", "127.0.0.1:0", "--duration", "120"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn pcpperf echo");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut guard = ChildGuard {
        child,
        _stdout: BufReader::new(stdout),
    };
    let mut line = String::new();
    guard
        ._stdout
        .read_line(&mut line)
        .expect("read the echo's first line");
    let addr = line
        .trim()
        .strip_prefix("pcpperf echo: listening on ")
        .unwrap_or_else(|| panic!("unexpected first line from echo: {line:?}"))
        .parse()
        .expect("a socket address");
    (guard, addr)
}

fn pcpperf(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run pcpperf")
}

/// Runs a load command with `--json` and returns the parsed report.
fn load_json(args: &[&str]) -> Value {
    let out = pcpperf(args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{args:?} failed: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no integer `{key}` in {v}"))
}

#[test]
fn load_against_echo_is_all_success_and_reflects_option_192() {
    let (_echo, addr) = start_echo();
    let server = addr.to_string();
    for (command, checkpoint) in [("map", false), ("map", true), ("peer", true)] {
        let mut args = vec![
            command,
            "--server",
            &server,
            "--clients",
            "2",
            "--window",
            "4",
            "--duration",
            "1",
            "--warmup",
            "0",
            "--json",
            "--source-base",
            "127.0.1.1",
        ];
        if checkpoint {
            args.push("--checkpoint");
        }
        let r = load_json(&args);
        let what = format!("{command} checkpoint={checkpoint}: {r}");
        let responses = u(&r, "responses");
        assert!(responses > 0, "{what}");
        assert_eq!(u(&r, "timeouts"), 0, "{what}");
        assert_eq!(u(&r, "requests"), responses, "{what}");
        assert_eq!(r["results"]["SUCCESS"].as_u64(), Some(responses), "{what}");
        assert_eq!(r["results"].as_object().map(|m| m.len()), Some(1), "{what}");
        let echoed = u(&r, "checkpoint_echoed");
        assert_eq!(echoed, if checkpoint { responses } else { 0 }, "{what}");
        assert!(r["rps"].as_f64().is_some_and(|x| x > 0.0), "{what}");
        let lat = &r["latency_us"];
        for k in ["p50", "p99", "p999", "max"] {
            assert!(lat[k].as_f64().is_some_and(|x| x > 0.0), "{k}: {what}");
        }
        assert_eq!(r["command"], command, "{what}");
        assert_eq!(u(&r, "clients"), 2, "{what}");
        assert_eq!(u(&r, "window"), 4, "{what}");
        assert_eq!(r["checkpoint"], checkpoint, "{what}");
    }
}

#[test]
fn non_loopback_server_is_refused_before_anything_is_sent() {
    let started = Instant::now();
    let out = pcpperf(&[
        "map",
        "--server",
        "192.0.2.1:5351",
        "--clients",
        "1",
        "--duration",
        "1",
        "--warmup",
        "0",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted a non-loopback server");
    assert!(stderr.contains("loopback"), "stderr: {stderr}");
    // Refused while parsing arguments: no report, no socket, no wait.
    assert!(
        out.stdout.is_empty(),
        "stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn non_loopback_sources_are_refused() {
    for args in [
        &[
            "peer",
            "--server",
            "127.0.0.1:5351",
            "--source-base",
            "10.0.0.1",
        ][..],
        // 127.255.255.255 + 1 leaves 127.0.0.0/8.
        &[
            "map",
            "--server",
            "127.0.0.1:5351",
            "--clients",
            "2",
            "--source-base",
            "127.255.255.255",
        ][..],
        &["echo", "--bind", "0.0.0.0:0"][..],
    ] {
        let out = pcpperf(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(
            stderr.contains("loopback") || stderr.contains("127.0.0.0/8"),
            "{args:?}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}
