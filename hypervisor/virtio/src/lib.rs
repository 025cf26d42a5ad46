//! `hv-virtio`: the device side of virtio 1.x for the hypervisor, as host-tested `no_std`
//! code.
//!
//! What it owns: the split virtqueue parser ([`queue`]), the virtio-mmio register interface
//! as a state machine ([`transport`]), and the block, net, balloon and console device models
//! ([`devices`]). What it does not own: how guest memory is mapped (the hypervisor supplies
//! a [`mem::GuestMemory`]), where block requests and frames end up (backend traits), and
//! interrupt injection (the caller reads [`transport::MmioTransport::interrupt_status`]).
//!
//! Invariant kept everywhere: every value that comes from a driver is an allegation. Guest
//! memory is reached only by checked byte copies (no Rust references into it), chain walks
//! are bounded by the queue size, and a malformed queue makes the device report
//! DEVICE_NEEDS_RESET instead of panicking. The virtio 1.2 clause is cited beside each check.
//!
//! How it is exercised: unit tests beside the code; `tests/virtio_drivers_crate.rs` drives the
//! devices with the independent `virtio-drivers` crate over the MMIO state machine;
//! `tests/properties.rs` (proptest) and `tests/devices.rs` probe the queue and the models;
//! `tests/fuzz_replay.rs` runs [`fuzz::run`] (the cargo-fuzz target in `fuzz/`) over the seed
//! corpus and pseudo-random inputs; `examples/virtqueue_bench.rs` measures throughput and
//! notifications against rust-vmm's `virtio-queue`.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_op_in_unsafe_fn)]

extern crate alloc;

pub mod device;
pub mod devices;
pub mod fuzz;
pub mod mem;
pub mod queue;
pub mod transport;

pub use device::{DeviceError, QueueSet, VirtioDevice};
pub use mem::{GuestAddr, GuestMemory, MemError};
pub use queue::{Chain, QueueLayout, RingFeatures, SplitQueue};
pub use transport::{MmioTransport, TransportOptions};
