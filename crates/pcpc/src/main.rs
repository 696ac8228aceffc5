//! `pcpc`: a PCP client CLI (work in progress).
#![forbid(unsafe_code)]

fn main() {}
