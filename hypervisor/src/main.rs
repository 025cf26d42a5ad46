//! The hypervisor binary. On bare metal (`x86_64-unknown-none`) everything lives in the library:
//! the boot path enters `hypervisor::kernel::hypervisor_main`. Built for the host, this binary
//! only says how to build the real one, so a plain `cargo build` at the root never tries to link
//! a kernel for the host.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
use hypervisor as _;

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("the hypervisor runs on bare metal: build it with `cargo xtask build`");
    std::process::exit(2);
}
