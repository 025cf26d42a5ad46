//! Guest memory: the one layer the hypervisor, its loader and these device models share
//! (crate `hv-guest-mem`), re-exported here under its old path.

pub use hv_guest_mem::*;
