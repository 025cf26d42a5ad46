//! `hello`: greets through the UART and the console hypercall, checks the hypervisor's CPUID
//! leaf and ABI version, and exits with code 0 by hypercall.
#![cfg_attr(target_os = "none", no_std, no_main)]

use test_guests::{hv_abi, hypercall, println};

test_guests::guest_main!(run);

fn run(args: &str, ram: u64) {
    println!(
        "hello from a guest: args='{args}', {} MiB of RAM",
        ram >> 20
    );
    let leaf = core::arch::x86_64::__cpuid(0x4000_0000);
    let mut sig = [0u8; 12];
    sig[..4].copy_from_slice(&leaf.ebx.to_le_bytes());
    sig[4..8].copy_from_slice(&leaf.ecx.to_le_bytes());
    sig[8..].copy_from_slice(&leaf.edx.to_le_bytes());
    let version = hypercall(hv_abi::hypercall::VERSION, 0, 0, 0);
    println!(
        "hypervisor signature '{}', ABI {:#x}, VMX visible to me: {}",
        core::str::from_utf8(&sig).unwrap_or("?"),
        version,
        core::arch::x86_64::__cpuid(1).ecx & (1 << 5) != 0
    );
    let msg = b"hello through the console hypercall\n";
    let n = hypercall(
        hv_abi::hypercall::CONSOLE_WRITE,
        msg.as_ptr() as u64,
        msg.len() as u64,
        0,
    );
    println!("console hypercall wrote {n} bytes; goodbye");
}
