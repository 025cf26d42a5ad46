//! Domains: a guest-physical address space (EPT), its RAM, and its vCPUs. The pure parts (guest
//! memory access, the ELF loader) are host-tested; the domain table and its life cycle live in
//! `table` on bare metal.

pub mod loader;
pub mod memory;
