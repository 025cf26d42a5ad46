//! Domains: a guest-physical address space (EPT), its RAM, and its vCPUs. The pure parts (guest
//! memory access, the ELF loader, hypercall dispatch, port decisions, console lines) are
//! host-tested; the domain table and the run loop live in `crate::guest` on bare metal.

pub mod config;
pub mod console;
pub mod hypercall;
pub mod loader;
pub mod memory;
pub mod vtimer;
