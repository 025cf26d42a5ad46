//! The hypervisor: a bare-metal, type-1 VMX kernel for x86_64 servers.
//!
//! The crate is split by concern, and by what can be tested on the host:
//! - pure logic, compiled everywhere and covered by `cargo test`: [`cmdline`], [`shell`]
//!   (line editor and command parser), [`mm::frames`] (the frame allocator), [`vmx::caps`]
//!   (VMX capability decoding and the FEATURE_CONTROL decision);
//! - thin hardware layers, compiled only for `x86_64-unknown-none`: `arch` (CPU registers,
//!   COM1, GDT/TSS/IDT and trap entry, local APIC, PIT, ACPI, SMP start-up), `mm::paging`,
//!   `mm::heap`, `vmx::detect`, and `kernel` (bring-up order and the console task).
//!
//! # Safety: ambient assumptions on bare metal
//! Unsafe blocks in the hardware layers may rely on these, established by the boot path and
//! `kernel::hypervisor_main` before any other code runs:
//! - the code runs at CPL 0 in 64-bit long mode, with interrupts disabled until the IDT is loaded;
//! - all physical memory the firmware reports, the local APIC and the first 4 GiB are
//!   identity-mapped (virtual address = physical address) for the whole run;
//! - the hypervisor alone owns the machine: no other software touches the UART, the PIT, the
//!   local APICs or the page tables;
//! - each CPU's `IA32_GS_BASE` holds its index into `percpu::CPUS` once it is started.
#![cfg_attr(not(test), no_std)]
// x86_64 only: `usize` is 64 bits, so `u64 as usize` cannot truncate; the few narrowing casts
// to register widths (u8/u16/u32) are deliberate, each next to the register it fills.
#![allow(clippy::cast_possible_truncation)]

extern crate alloc;

pub mod cmdline;
pub mod domain;
#[cfg(not(target_os = "none"))]
pub mod fuzzing;
pub mod io;
pub mod mm;
pub mod sched;
pub mod shell;
pub mod vcpu;
pub mod vmx;

#[cfg(target_os = "none")]
pub mod arch;
#[cfg(target_os = "none")]
pub mod console;
#[cfg(target_os = "none")]
pub mod kernel;

/// The version printed in the boot banner.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
