//! `memcheck`: writes a pattern over all of its RAM above 2 MiB, verifies it, then reads just
//! past the end of its RAM, where the hypervisor must stop it (an EPT violation).
#![cfg_attr(target_os = "none", no_std, no_main)]

use test_guests::println;

test_guests::guest_main!(run);

fn pattern(addr: u64) -> u64 {
    addr.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5a5a_5a5a_5a5a_5a5a
}

fn run(_args: &str, ram: u64) {
    let (start, end) = (2u64 << 20, ram);
    let mut a = start;
    while a < end {
        // SAFETY: [2 MiB, RAM) is this guest's own identity-mapped memory, unused by its image,
        // stack and page tables (all below 2 MiB).
        unsafe { (a as *mut u64).write_volatile(pattern(a)) };
        a += 8;
    }
    let mut bad = 0u64;
    a = start;
    while a < end {
        // SAFETY: as above.
        if unsafe { (a as *const u64).read_volatile() } != pattern(a) {
            bad += 1;
        }
        a += 8;
    }
    println!(
        "memcheck: {} MiB written and verified, {bad} bad words",
        (end - start) >> 20
    );
    println!("memcheck: now reading outside my RAM at {end:#x}; the hypervisor must stop me");
    // SAFETY: deliberately outside this domain's memory: the EPT has no mapping there.
    let v = unsafe { (end as *const u64).read_volatile() };
    println!("memcheck: FAILED: read {v:#x} from outside my memory");
    test_guests::exit(1);
}
