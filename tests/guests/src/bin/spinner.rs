//! `spinner`: never yields. The preemption timer must keep it from holding its CPU.
#![cfg_attr(target_os = "none", no_std, no_main)]

use test_guests::println;

test_guests::guest_main!(run);

fn run(args: &str, _ram: u64) {
    if args.split_whitespace().any(|a| a == "sti") {
        // Interrupts on, as in an OS kernel: host interrupts still exit to the host (the guest
        // has no IDT entry for them and never receives one).
        // SAFETY: only sets RFLAGS.IF; the hypervisor injects nothing unless asked.
        unsafe { core::arch::asm!("sti") };
    }
    println!("spinner: spinning forever");
    let mut n = 0u64;
    loop {
        n = core::hint::black_box(n.wrapping_add(1));
    }
}
