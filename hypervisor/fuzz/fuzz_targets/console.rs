//! Fuzz target: `hypervisor::fuzzing::console` (what it checks is documented there). Its seeds
//! replay under plain `cargo test` (`fuzzing::tests::console_corpus_replays`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hypervisor::fuzzing::console(data);
});
