//! Fuzz target: MMIO register accesses, ring contents and device events for all four
//! device models (see `hv_virtio::fuzz` for the input layout). The same function runs under
//! plain `cargo test` in `hypervisor/virtio/tests/fuzz_replay.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = hv_virtio::fuzz::run(data);
});
