//! Feeds arbitrary bytes to every pcp-proto parser and to `emit_error_response`.
//!
//! The invariants (no panic; `parse(emit(x)) == x`; no growth; well-formed error
//! responses) live in `pcp_proto::fuzzing::check_invariants`, which
//! `crates/pcp-proto/tests/fuzz_corpus.rs` also runs over the committed corpus and
//! regressions.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pcp_proto::fuzzing::check_invariants(data);
});
