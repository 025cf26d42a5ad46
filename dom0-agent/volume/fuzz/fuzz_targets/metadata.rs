//! Fuzz target: the volume manager's on-disk decoders (`body/metadata.rs` says what is
//! checked). Its seeds replay under plain `cargo test` (`tests/fuzz_replay.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../body/metadata.rs"]
mod body;

fuzz_target!(|data: &[u8]| {
    body::metadata(data);
});
