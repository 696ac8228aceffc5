//! Replays the HA decoder fuzz corpus (`fuzz/corpus/decode/`) and every saved crash
//! (`fuzz/regressions/`) through `pcp_ha::fuzzing::run`, the function the `decode`
//! fuzz target runs; checks the committed seeds are the ones built here; and runs a
//! seeded random sweep so the session itself is exercised on every `cargo test`.

use std::path::PathBuf;

use pcp_ha::wire::{
    self, Header, Kind, MappingRecord, Record, SequenceRecord, SessionRecord, Subscriber, Writer,
};
use pcp_server::{MappingKey, Origin};
use pcp_testkit::corpus::{XorShift, failing, files, fuzz_dir};

fn dir(sub: &str) -> PathBuf {
    fuzz_dir(env!("CARGO_MANIFEST_DIR"), sub)
}

fn frame(kind: Kind, term: u64, stream: u64, body: impl FnOnce(&mut Writer<'_>)) -> Vec<u8> {
    let mut buf = vec![0u8; wire::MAX_FRAME];
    let mut w = Writer::new(&mut buf);
    wire::write_header(
        &mut w,
        &Header {
            kind,
            flags: 1,
            term,
            sender: 77,
            stream,
        },
    )
    .unwrap();
    body(&mut w);
    let n = w.len();
    buf.truncate(n);
    buf
}

fn data(term: u64, first: u64, recs: &[Record]) -> Vec<u8> {
    frame(Kind::Data, term, 77, |w| {
        let at = wire::write_data_prefix(w, first).unwrap();
        for r in recs {
            wire::write_record(w, r).unwrap();
        }
        wire::patch_count(w, at, recs.len() as u16);
    })
}

fn seq_frame(kind: Kind, term: u64, seq: u64) -> Vec<u8> {
    frame(kind, term, 77, |w| {
        wire::write_u64(w, seq).unwrap();
    })
}

fn upsert(port: u16) -> Record {
    Record::Upsert(MappingRecord {
        key: MappingKey {
            internal: "10.0.0.1".parse().unwrap(),
            protocol: 17,
            internal_port: port,
            remote: port
                .is_multiple_of(2)
                .then(|| ("2001:db8::5".parse().unwrap(), 443)),
        },
        nonce: [9; 12],
        external_addr: "192.0.2.1".parse().unwrap(),
        external_port: 40000 + port,
        remaining_ms: 60_000,
        lifetime: 3600,
        origin: Origin::Pcp,
        requested: true,
        forced_by: port.is_multiple_of(3).then(|| "sip".into()),
        client: "10.0.0.1".parse().unwrap(),
        filters: vec![pcp_proto::Filter {
            prefix_len: 120,
            remote_port: 80,
            remote_addr: "198.51.100.0".parse().unwrap(),
        }],
        description: Some("voip".into()),
        subscriber: Subscriber::Address,
    })
}

fn session(id: u32) -> Record {
    Record::Session(SessionRecord {
        session_id: id,
        client: "10.0.0.1:5350".parse().unwrap(),
        identity: "alice".into(),
        nonce: 7,
        key_id: 1,
        key: [3; 32],
        prf: 5,
        mac: 12,
        remaining_ms: 600_000,
        pa_in: 3,
        pa_out: 4,
        sequence: SequenceRecord {
            last_in: Some((9, [1; 16])),
            next_out: 8,
        },
    })
}

/// An upsert charged to an authenticated identity.
fn upsert_as(port: u16, identity: &str) -> Record {
    let Record::Upsert(m) = upsert(port) else {
        unreachable!()
    };
    Record::Upsert(MappingRecord {
        subscriber: Subscriber::Identity(identity.into()),
        ..m
    })
}

/// A session program: setup octet, then steps (0: frame with 2-octet length; 2: time
/// step of `n` × 10 ms; 3: timer poll).
fn program(setup: u8, frames: &[Vec<u8>], gap: u8) -> Vec<u8> {
    let mut p = vec![setup];
    for f in frames {
        p.push(0);
        p.extend_from_slice(&(f.len() as u16).to_be_bytes());
        p.extend_from_slice(f);
        p.extend_from_slice(&[2, gap]);
    }
    p.extend_from_slice(&[3, 2]);
    p
}

/// The committed seeds, by file name.
fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let key = MappingKey {
        internal: "10.0.0.1".parse().unwrap(),
        protocol: 17,
        internal_port: 5060,
        remote: None,
    };
    let bulk = data(
        2,
        1,
        &[
            Record::BulkStart,
            upsert(5060),
            upsert(5061),
            upsert(5062),
            Record::BulkEnd,
        ],
    );
    let live = data(
        2,
        6,
        &[
            Record::Remove(key),
            Record::Host {
                host: "10.0.0.1".parse().unwrap(),
                unprotected: true,
            },
            upsert(7000),
        ],
    );
    vec![
        (
            "backup-bulk-copy",
            program(0, std::slice::from_ref(&bulk), 5),
        ),
        (
            "backup-bulk-then-live-and-beat",
            program(
                0,
                &[bulk.clone(), live.clone(), seq_frame(Kind::Beat, 2, 8)],
                5,
            ),
        ),
        (
            "standby-backup-bulk-then-handover",
            program(2, &[bulk.clone(), seq_frame(Kind::Handover, 2, 5)], 5),
        ),
        (
            "backup-gap-without-bulk",
            program(0, &[data(2, 40, &[upsert(1)])], 5),
        ),
        (
            "backup-silence-takes-over",
            program(0, &[bulk, seq_frame(Kind::Beat, 2, 5)], 250),
        ),
        (
            "active-hello-and-acks",
            program(
                1,
                &[
                    seq_frame(Kind::Hello, 0, 0),
                    seq_frame(Kind::Ack, 0, 1),
                    seq_frame(Kind::Ack, 0, 3),
                ],
                120,
            ),
        ),
        (
            "active-hears-newer-term",
            program(1, &[seq_frame(Kind::Beat, 9, 1), live], 120),
        ),
        (
            "standby-backup-sessions-and-identities",
            program(
                2,
                &[
                    data(
                        2,
                        1,
                        &[
                            Record::BulkStart,
                            upsert_as(5060, "alice"),
                            upsert_as(5061, "alice"),
                            session(11),
                            session(12),
                            Record::BulkEnd,
                        ],
                    ),
                    data(
                        2,
                        7,
                        &[
                            Record::SessionSeq {
                                session_id: 11,
                                sequence: SequenceRecord {
                                    last_in: Some((10, [2; 16])),
                                    next_out: 9,
                                },
                            },
                            Record::SessionEnd(12),
                            upsert_as(7000, "bob"),
                        ],
                    ),
                    seq_frame(Kind::Beat, 2, 9),
                ],
                5,
            ),
        ),
    ]
}

#[test]
fn corpus_and_regressions_replay_cleanly() {
    let inputs: Vec<PathBuf> = [files(&dir("corpus/decode")), files(&dir("regressions"))].concat();
    assert!(inputs.len() >= 7, "the seed corpus is committed");
    let bad = failing(&inputs, |data| {
        pcp_ha::fuzzing::run(data);
    });
    assert!(
        bad.is_empty(),
        "inputs break an invariant:\n{}",
        bad.join("\n")
    );
}

#[test]
fn seeds_are_committed_and_decode() {
    for (name, bytes) in seeds() {
        let on_disk = std::fs::read(dir("corpus/decode").join(name))
            .unwrap_or_else(|e| panic!("seed {name} missing ({e}); run write_seed_corpus"));
        assert_eq!(on_disk, bytes, "seed {name} differs; run write_seed_corpus");
        let stored = pcp_ha::fuzzing::run(&bytes);
        if name.starts_with("backup-bulk") {
            assert!(
                stored >= 3,
                "seed {name}: the backup stored {stored} mappings"
            );
        }
    }
    // The seeds exercise the decoder for real: the bulk copy decodes to its records.
    let (_, p) = &seeds()[0];
    let len = usize::from(u16::from_be_bytes([p[2], p[3]]));
    let d = pcp_ha::fuzzing::decode(&p[4..4 + len]).unwrap();
    assert_eq!(d.records.len(), 5);
    assert_eq!(d.records[1], upsert(5060));
}

#[test]
#[ignore = "rewrites fuzz/corpus/decode from the seeds above"]
fn write_seed_corpus() {
    std::fs::create_dir_all(dir("corpus/decode")).unwrap();
    for (name, bytes) in seeds() {
        std::fs::write(dir("corpus/decode").join(name), bytes).unwrap();
    }
}

#[test]
fn seeded_random_sessions() {
    // Random mutations of the seeds (xorshift: reproducible, no extra dependency).
    let mut rng = XorShift::new();
    let seeds = seeds();
    for i in 0..600 {
        let mut data = seeds[i % seeds.len()].1.clone();
        for _ in 0..1 + i % 6 {
            let x = rng.next_u64();
            let at = (x >> 8) as usize % data.len();
            data[at] ^= x as u8;
        }
        let _ = pcp_ha::fuzzing::run(&data);
    }
}
