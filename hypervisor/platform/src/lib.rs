//! `hv-platform`: the virtual PC a full-system guest such as an unmodified Linux kernel sees,
//! as pure models with no hardware, clock or lock of their own (the hypervisor passes the time
//! in and holds the locks):
//!
//! - [`acpi`]: the ACPI tables generated per domain from its configuration (RSDP, XSDT, a
//!   hardware-reduced FADT, MADT, DSDT with the virtio-mmio devices as `LNRO0005`);
//! - [`bootparams`]: the Linux x86 boot protocol's zero page (setup header, e820 map);
//! - [`lapic`] and [`ioapic`]: a local APIC per vCPU (xAPIC registers, timer, TSC deadline)
//!   and the IOAPIC that routes device lines to them;
//! - [`uart`]: a 16550A that Linux's 8250 driver accepts;
//! - [`rtc`]: a CMOS clock that gives the guest the host's date and time.
//!
//! Every value a guest writes is an allegation: models clamp or ignore what the hardware would,
//! and never panic on guest input.

#![no_std]

extern crate alloc;

pub mod acpi;
pub mod bootparams;
pub mod ioapic;
pub mod lapic;
pub mod rtc;
pub mod uart;
