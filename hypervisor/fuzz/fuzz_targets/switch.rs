//! Fuzz target: `hypervisor::fuzzing::switch` (what it checks is documented there). Its seeds
//! replay under plain `cargo test` (`fuzzing::tests::switch_corpus_replays`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hypervisor::fuzzing::switch(data);
});
