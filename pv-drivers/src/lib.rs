//! `pv-drivers`: the guest side of paravirtual I/O for dom0 and Rust guests (`no_std` +
//! `alloc`).
//!
//! What it owns: a virtio-mmio [`transport`] that speaks the version-2 register protocol
//! through a narrow [`transport::RegisterBus`] (volatile MMIO in a guest, our device state
//! machine on the host), a [`hal`] for identity-mapped guests, the four device drivers
//! ([`devices`]: block, net and console from the `virtio-drivers` crate, balloon written
//! here on that crate's `VirtQueue`), and the [`hypercall`] wrappers over `hv-abi`.
//!
//! Invariant: the only `unsafe` is at the hardware edge (the MMIO window, the DMA
//! allocator, the VMCALL instruction), each behind a constructor whose `# Safety` states
//! what the caller promises; everything above is safe code and runs under host tests.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_op_in_unsafe_fn)]

extern crate alloc;

pub mod devices;
pub mod hal;
pub mod hypercall;
pub mod ioring;
pub mod transport;

pub use virtio_drivers::{Error, Hal};
