//! Replays the server fuzz corpus (`fuzz/corpus/handle/`) and every saved crash
//! (`fuzz/regressions/`) through `pcp_server::fuzzing::run`, the function the `handle`
//! fuzz target runs; plus a seeded random sweep so the session itself is exercised on
//! every `cargo test`.

use std::path::{Path, PathBuf};

fn files(sub: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join(sub);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| {
            !p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'))
        })
        .collect();
    out.sort();
    out
}

#[test]
fn corpus_and_regressions_replay_cleanly() {
    let inputs: Vec<PathBuf> = [files("corpus/handle"), files("regressions")].concat();
    assert!(
        !inputs.is_empty(),
        "the seed corpus is committed; it must not be empty"
    );
    for path in inputs {
        let data = std::fs::read(&path).expect("readable input");
        let outcome = std::panic::catch_unwind(|| pcp_server::fuzzing::run(&data));
        assert!(outcome.is_ok(), "{} breaks an invariant", path.display());
    }
}

#[test]
fn seeded_random_sessions() {
    // A small xorshift so this test needs no extra dependency and is reproducible.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..300 {
        let mut data = vec![0u8; 400];
        for b in &mut data {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        pcp_server::fuzzing::run(&data);
    }
}
