//! Fuzz target: `hypervisor::fuzzing::pc_devices` (what it checks is documented there). Its
//! seeds replay under plain `cargo test` (`fuzzing::tests::pc_devices_corpus_replays`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hypervisor::fuzzing::pc_devices(data);
});
