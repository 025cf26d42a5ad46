//! Domains: a guest-physical address space (EPT), its RAM, and its vCPUs. The pure parts (guest
//! memory access, the ELF loader, hypercall dispatch, console lines, the paravirtual timer) are
//! host-tested; the domain table ([`table`]) is bare-metal only. vCPUs and their run loop are
//! in `crate::vcpu`.

pub mod config;
pub mod console;
pub mod hypercall;
pub mod loader;
pub mod memory;
#[cfg(target_os = "none")]
pub mod table;
pub mod vtimer;
