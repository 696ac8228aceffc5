//! The end-of-run report: counters, latency percentiles, result codes; printed for a
//! person or as one JSON object with stable keys.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use pcp_proto::{Opcode, ResultCode};
use serde::Serialize;

use crate::load::LoadConfig;

/// Raw counts of one client, or of all clients added up. Everything but `unmatched`
/// and `icmp_errors` counts requests sent during the measured period only.
#[derive(Debug, Clone)]
pub struct Counters {
    /// Requests sent.
    pub requests: u64,
    /// Requests answered.
    pub responses: u64,
    /// Requests unanswered after the timeout.
    pub timeouts: u64,
    /// Responses matching no outstanding request (late after a timeout, duplicated,
    /// or foreign), received after the warm-up.
    pub unmatched: u64,
    /// Answered requests whose response did not parse (matched by raw nonce and port).
    pub parse_errors: u64,
    /// ICMP errors the sockets reported (e.g. port unreachable: no server listening).
    pub icmp_errors: u64,
    /// Answers per result code value.
    pub results: [u64; 256],
    /// Answers that carried CHECKPOINT_REQUIRED (option 192).
    pub checkpoint_echoed: u64,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            requests: 0,
            responses: 0,
            timeouts: 0,
            unmatched: 0,
            parse_errors: 0,
            icmp_errors: 0,
            results: [0; 256],
            checkpoint_echoed: 0,
        }
    }
}

impl Counters {
    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &Counters) {
        self.requests += other.requests;
        self.responses += other.responses;
        self.timeouts += other.timeouts;
        self.unmatched += other.unmatched;
        self.parse_errors += other.parse_errors;
        self.icmp_errors += other.icmp_errors;
        for (a, b) in self.results.iter_mut().zip(other.results.iter()) {
            *a += b;
        }
        self.checkpoint_echoed += other.checkpoint_echoed;
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

/// The report of one load run. Field names are the JSON keys.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `"map"` or `"peer"`.
    pub command: &'static str,
    /// The server address.
    pub server: String,
    /// Number of simulated clients.
    pub clients: u32,
    /// Outstanding requests per client.
    pub window: u32,
    /// Mappings per client.
    pub mappings: u32,
    /// Requested lifetime in seconds.
    pub lifetime: u32,
    /// Whether requests carried option 192.
    pub checkpoint: bool,
    /// Source address of the first client.
    pub source_base: String,
    /// Runtime worker threads.
    pub threads: u32,
    /// Requested measured period, in seconds.
    pub duration_s: f64,
    /// Warm-up, in seconds.
    pub warmup_s: f64,
    /// Actual measured period in seconds (shorter if interrupted).
    pub measured_s: f64,
    /// Requests sent during the measured period.
    pub requests: u64,
    /// Of those, answered.
    pub responses: u64,
    /// Of those, unanswered after 1 s.
    pub timeouts: u64,
    /// Responses matching no outstanding request.
    pub unmatched: u64,
    /// Answered requests whose response did not parse.
    pub parse_errors: u64,
    /// ICMP errors reported on the client sockets.
    pub icmp_errors: u64,
    /// Responses per second of measured period.
    pub rps: f64,
    /// Latency from send to response, in microseconds.
    pub latency_us: Latency,
    /// Responses per result code, by RFC name (`UNKNOWN(n)` for unknown codes).
    pub results: BTreeMap<String, u64>,
    /// Responses that carried CHECKPOINT_REQUIRED (option 192).
    pub checkpoint_echoed: u64,
}

/// Seconds with microsecond resolution, so the JSON stays readable.
fn secs(d: Duration) -> f64 {
    round(d.as_secs_f64(), 1e6)
}

fn round(v: f64, scale: f64) -> f64 {
    (v * scale).round() / scale
}

impl Report {
    /// Assembles the report from a run's configuration, measured period, counters and
    /// latency histogram (in nanoseconds).
    pub fn new(
        cfg: &LoadConfig,
        measured: Duration,
        c: Counters,
        latency_ns: &Histogram<u64>,
    ) -> Report {
        let us = |ns: u64| round(ns as f64 / 1000.0, 10.0);
        let latency_us = if latency_ns.is_empty() {
            Latency {
                p50: 0.0,
                p99: 0.0,
                p999: 0.0,
                max: 0.0,
            }
        } else {
            Latency {
                p50: us(latency_ns.value_at_quantile(0.50)),
                p99: us(latency_ns.value_at_quantile(0.99)),
                p999: us(latency_ns.value_at_quantile(0.999)),
                max: us(latency_ns.max()),
            }
        };
        let results = c
            .results
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(code, n)| {
                let code = ResultCode::from(code as u8);
                let name = match code {
                    ResultCode::Unknown(_) => code.to_string(),
                    known => known.name().to_owned(),
                };
                (name, *n)
            })
            .collect();
        let rps = if measured.is_zero() {
            0.0
        } else {
            round(c.responses as f64 / measured.as_secs_f64(), 10.0)
        };
        Report {
            command: match cfg.opcode {
                Opcode::Peer => "peer",
                _ => "map",
            },
            server: cfg.server.to_string(),
            clients: cfg.clients,
            window: cfg.window,
            mappings: cfg.mappings,
            lifetime: cfg.lifetime,
            checkpoint: cfg.checkpoint,
            source_base: cfg.source_base.to_string(),
            threads: cfg.threads,
            duration_s: secs(cfg.duration),
            warmup_s: secs(cfg.warmup),
            measured_s: secs(measured),
            requests: c.requests,
            responses: c.responses,
            timeouts: c.timeouts,
            unmatched: c.unmatched,
            parse_errors: c.parse_errors,
            icmp_errors: c.icmp_errors,
            rps,
            latency_us,
            results,
            checkpoint_echoed: c.checkpoint_echoed,
        }
    }

    /// One JSON object on one line.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a report serializes")
    }

    /// The report for a person.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "pcpperf {} -> {}: {} clients x window {}, {} mapping(s) each, lifetime {} s, \
             option 192 {}",
            self.command,
            self.server,
            self.clients,
            self.window,
            self.mappings,
            self.lifetime,
            if self.checkpoint { "on" } else { "off" },
        );
        let _ = writeln!(
            s,
            "measured   {:.2} s after {:.2} s warm-up (sources from {}, {} thread(s))",
            self.measured_s, self.warmup_s, self.source_base, self.threads
        );
        let _ = writeln!(s, "requests   {}", self.requests);
        let _ = writeln!(s, "responses  {}  ({:.1} req/s)", self.responses, self.rps);
        let _ = writeln!(s, "timeouts   {}", self.timeouts);
        if self.unmatched + self.parse_errors + self.icmp_errors > 0 {
            let _ = writeln!(
                s,
                "anomalies  {} unmatched, {} unparsable, {} ICMP errors",
                self.unmatched, self.parse_errors, self.icmp_errors
            );
        }
        let l = self.latency_us;
        let _ = writeln!(
            s,
            "latency us p50 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
            l.p50, l.p99, l.p999, l.max
        );
        let results: Vec<String> = self
            .results
            .iter()
            .map(|(name, n)| format!("{name} {n}"))
            .collect();
        let _ = writeln!(
            s,
            "results    {}",
            if results.is_empty() {
                "-".to_owned()
            } else {
                results.join(", ")
            }
        );
        let _ = writeln!(
            s,
            "option 192 echoed in {} of {} responses",
            self.checkpoint_echoed, self.responses
        );
        s
    }
}
