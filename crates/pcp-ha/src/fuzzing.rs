//! A fuzzing session for the replication decoder, shared by the cargo-fuzz target
//! (`crates/pcp-ha/fuzz`, target `decode`) and the corpus replay test
//! (`tests/fuzz_corpus.rs`), so both check exactly the same invariants.
//!
//! The input is a little program for one [`HaNode`]: the first octet picks its role
//! (active or backup) and standby mode; then each step is a frame (a 2-octet length
//! and that many octets, delivered from the peer), a time step, or a timer poll. Every
//! frame is also decoded on its own ([`decode`]): header, kind-specific fields and
//! every record.
//!
//! Checked, whatever the input:
//! - nothing panics (fuzz builds have overflow checks and debug assertions on);
//! - a record that decodes re-encodes into at most [`wire::MAX_FRAME`] octets and
//!   decodes again to the same value (`decode(encode(decode(x))) == decode(x)`);
//! - every frame the node sends is at most [`wire::MAX_FRAME`] octets and has a header
//!   this crate reads back with the node's own term;
//! - the backup's copy holds no more mappings than Upsert records were delivered, nor
//!   more PA sessions than Session records (state grows only with what the peer
//!   actually sent);
//! - a takeover announces (unsolicited, unicast) only to hosts the replicated records
//!   named: never to an address nobody told this node about.

use std::time::Duration;

use pcp_server::Time;

use crate::wire::{self, Kind, Reader, Record, Writer};
use crate::{HaConfig, HaNode};

/// Everything one frame decodes to: its header, and for DATA frames the records
/// (up to the first malformed one).
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// The header.
    pub header: wire::Header,
    /// DATA: first sequence number and count; ACK/HELLO/BEAT/HANDOVER: the sequence field.
    pub seq: Option<u64>,
    /// DATA: the records that decoded, in order.
    pub records: Vec<Record>,
}

/// Decodes a whole frame as a receiving node would.
pub fn decode(frame: &[u8]) -> Result<Decoded, wire::WireError> {
    let mut r = Reader::new(frame);
    let header = wire::read_header(&mut r)?;
    let mut records = Vec::new();
    let seq = match header.kind {
        Kind::Data => {
            let (first, count) = wire::read_data_prefix(&mut r)?;
            for _ in 0..count {
                match wire::read_record(&mut r) {
                    Ok(rec) => records.push(rec),
                    Err(_) => break,
                }
            }
            Some(first)
        }
        Kind::Ack | Kind::Hello | Kind::Beat | Kind::Handover => Some(r.u64()?),
    };
    Ok(Decoded {
        header,
        seq,
        records,
    })
}

/// Re-encodes a record and checks it decodes to the same value.
fn check_record(rec: &Record) {
    let mut buf = vec![0u8; wire::MAX_FRAME * 2];
    let mut w = Writer::new(&mut buf);
    // A record built from a frame of at most 64 KiB always has an encoding; a record
    // whose strings do not fit a frame may legitimately fail to encode.
    if wire::write_record(&mut w, rec).is_none() {
        return;
    }
    let n = w.len();
    let mut r = Reader::new(&buf[..n]);
    let again = wire::read_record(&mut r).expect("a re-encoded record decodes");
    assert_eq!(&again, rec, "decode(encode(record)) differs");
    assert!(r.is_empty(), "re-decoding left octets over");
}

/// Reads the input a byte at a time; zeros once exhausted.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

/// Runs one session (see the module documentation); panics when an invariant breaks.
/// Returns how many mappings the node's copy holds at the end.
pub fn run(data: &[u8]) -> usize {
    let mut input = Input(data);
    let setup = input.byte();
    let cfg = HaConfig {
        standby: setup & 2 != 0,
        max_log: 64,
        bulk_chunk: 8,
        window: 16,
        ..HaConfig::default()
    };
    let mut now = Time(1_000);
    let mut node = HaNode::new(cfg, setup & 1 != 0, 0x5eed, now);
    let mut upserts = 0usize;
    let mut sessions = 0usize;
    let mut named = std::collections::HashSet::new();
    let mut out = vec![0u8; wire::MAX_FRAME];
    let mut steps = 0;
    while !input.0.is_empty() && steps < 64 {
        steps += 1;
        match input.byte() % 4 {
            // A frame from the peer (the common case: weight 2).
            0 | 1 => {
                let len = usize::from(u16::from_be_bytes([input.byte(), input.byte()]));
                let frame = input.take(len.min(wire::MAX_FRAME)).to_vec();
                if let Ok(d) = decode(&frame) {
                    for rec in &d.records {
                        check_record(rec);
                        match rec {
                            Record::Upsert(m) => {
                                upserts += 1;
                                named.insert(m.key.internal);
                            }
                            Record::Host { host, .. } => {
                                named.insert(*host);
                            }
                            Record::Session(_) => sessions += 1,
                            _ => {}
                        }
                    }
                }
                node.handle_frame(&frame, now);
            }
            // Time passes (up to ~2.5 s: enough for detection and takeover).
            2 => {
                now = now.plus(Duration::from_millis(u64::from(input.byte()) * 10));
                // Every frame of the input so far was handed in.
                node.link_read(now);
                node.handle_timeout(now);
            }
            // Timers and the promote/switchover paths.
            _ => match input.byte() % 3 {
                0 => node.promote(now),
                1 => {
                    node.switchover(now);
                }
                _ => node.handle_timeout(now),
            },
        }
        while let Some(n) = node.poll_transmit(now, &mut out) {
            assert!(n <= wire::MAX_FRAME, "sent a {n}-octet frame");
            let h = decode(&out[..n]).expect("a frame the node sends decodes");
            assert_eq!(h.header.term, node.term(), "sent a frame with another term");
        }
        while let Some(ev) = node.poll_event() {
            match ev {
                crate::Event::NeedBulk { cursor } => {
                    // No server behind this node: an empty chunk ends the copy.
                    node.bulk_chunk(cursor, &[], None, &[], now);
                }
                crate::Event::Promoted {
                    unprotected_hosts, ..
                } => {
                    for h in &unprotected_hosts {
                        assert!(named.contains(h), "announces to {h}, never named");
                    }
                }
                _ => {}
            }
        }
        let stored = node.status(now).stored;
        assert!(
            stored <= upserts,
            "the copy holds {stored} mappings from {upserts} upserts"
        );
        let held = node.sessions(now).len();
        assert!(
            held <= sessions,
            "the copy holds {held} sessions from {sessions} session records"
        );
    }
    node.status(now).stored
}
