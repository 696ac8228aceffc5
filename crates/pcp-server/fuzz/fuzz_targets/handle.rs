//! Drives the server core with a fuzzer-chosen program of requests, raw datagrams, time
//! steps and backup changes; `pcp_server::fuzzing::run` checks the invariants (and
//! `crates/pcp-server/tests/fuzz_corpus.rs` replays the corpus through the same code).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pcp_server::fuzzing::run(data);
});
