//! Drives one HA node with fuzzer-chosen replication frames, time steps and timer
//! polls; `pcp_ha::fuzzing::run` checks the invariants (and
//! `crates/pcp-ha/tests/fuzz_corpus.rs` replays the corpus through the same code).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = pcp_ha::fuzzing::run(data);
});
