//! `dom0`'s library: the parts of the privileged domain that run on the host too, under
//! `cargo test` (the block backend). The image itself is `src/main.rs`.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod backend;
