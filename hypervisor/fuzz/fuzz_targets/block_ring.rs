//! Fuzz target: `hypervisor::fuzzing::block_ring` (what it checks is documented there). Its
//! seeds replay under plain `cargo test` (`fuzzing::tests::block_ring_corpus_replays`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hypervisor::fuzzing::block_ring(data);
});
