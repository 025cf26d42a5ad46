//! Fuzz target: the NBD server's request and option parsing (`body/nbd.rs` says what is
//! checked). Its seeds replay under plain `cargo test` (`tests/fuzz_replay.rs`). `hvctl` is a
//! binary, so the protocol module is included by path.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../src/nbd/proto.rs"]
mod proto;

#[path = "../body/nbd.rs"]
mod body;

fuzz_target!(|data: &[u8]| {
    body::nbd(data);
});
