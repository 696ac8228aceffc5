//! Replays the server fuzz corpus (`fuzz/corpus/handle/`) and every saved crash
//! (`fuzz/regressions/`) through `pcp_server::fuzzing::run`, the function the `handle`
//! fuzz target runs; plus a seeded random sweep so the session itself is exercised on
//! every `cargo test`.

use std::path::PathBuf;

use pcp_testkit::corpus::{XorShift, failing, files, fuzz_dir};

fn inputs(sub: &str) -> Vec<PathBuf> {
    files(&fuzz_dir(env!("CARGO_MANIFEST_DIR"), sub))
}

#[test]
fn corpus_and_regressions_replay_cleanly() {
    let inputs: Vec<PathBuf> = [inputs("corpus/handle"), inputs("regressions")].concat();
    assert!(
        !inputs.is_empty(),
        "the seed corpus is committed; it must not be empty"
    );
    let bad = failing(&inputs, pcp_server::fuzzing::run);
    assert!(
        bad.is_empty(),
        "inputs break an invariant:\n{}",
        bad.join("\n")
    );
}

#[test]
fn seeded_random_sessions() {
    // A small xorshift so this test is reproducible.
    let mut x = XorShift::new();
    for _ in 0..300 {
        let mut data = vec![0u8; 400];
        for b in &mut data {
            *b = x.next_u64() as u8;
        }
        pcp_server::fuzzing::run(&data);
    }
}
