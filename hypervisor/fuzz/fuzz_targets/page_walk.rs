//! Fuzz target: `hypervisor::fuzzing::page_walk` (what it checks is documented there). Its seeds
//! replay under plain `cargo test` (`fuzzing::tests::page_walk_corpus_replays`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hypervisor::fuzzing::page_walk(data);
});
