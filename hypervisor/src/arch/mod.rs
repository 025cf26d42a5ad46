//! Thin hardware layers: everything that executes privileged instructions or touches devices.
//! Each module is small; the decisions they act on are made in the host-tested modules.

pub mod acpi;
pub mod cmos;
pub mod cpu;
pub mod gdt;
pub mod lapic;
pub mod percpu;
pub mod pic;
pub mod pit;
pub mod serial;
pub mod smp;
pub mod trap;
