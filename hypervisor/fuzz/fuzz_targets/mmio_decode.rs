//! Fuzz target: the MMIO instruction decoder and the ALU it feeds (input: 16 bytes of operand
//! values, then instruction bytes; see `hypervisor::vmx::decode::fuzz_one`). The seeds replay
//! under plain `cargo test` (`decode::tests::fuzz_seed_corpus_replays`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hypervisor::vmx::decode::fuzz_one(data);
});
