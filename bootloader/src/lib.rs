//! The boot path of the hypervisor: what runs between the loader (GRUB, or QEMU's `-kernel`)
//! and the hypervisor's Rust entry point `hypervisor_main`.
//!
//! It owns the multiboot1 and multiboot2 headers, the 32-bit entry, the early identity page
//! tables, the switch to long mode, the application-processor trampoline, and the translation
//! of the loader's information structure into a neutral [`BootInfo`]. The assembly is built
//! only for the bare-metal target; the parsing is plain Rust and is tested on the host.
//!
//! The kernel that links this crate must define
//! `#[unsafe(no_mangle)] fn hypervisor_main(info: Result<BootInfo, BootError>) -> !`
//! and a linker script that provides `__image_start`, `__load_end` and `__image_end` and keeps
//! the `.multiboot_header` section first.
#![cfg_attr(not(test), no_std)]
// x86_64 only: `usize` is 64 bits, so `u64 as usize` cannot truncate; the few narrowing casts
// to register widths (u8/u16/u32) are deliberate, each next to the register it fills.
#![allow(clippy::cast_possible_truncation)]

#[cfg(target_os = "none")]
pub mod entry;
pub mod info;

pub use info::{BootError, BootInfo, BootProtocol, MemoryKind, MemoryRegion, Module};
