//! Fuzz target: `hypervisor::fuzzing::domain_line` (what it checks is documented there). Its seeds
//! replay under plain `cargo test` (`fuzzing::tests::domain_line_corpus_replays`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hypervisor::fuzzing::domain_line(data);
});
