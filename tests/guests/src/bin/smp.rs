//! `smp`: starts every other vCPU of its domain with the VCPU_START hypercall; all of them add
//! to one shared counter with atomic instructions; the others switch themselves off
//! (VCPU_OFF) and vCPU 0 prints the total and exits.
#![cfg_attr(target_os = "none", no_std, no_main)]
#![allow(clippy::cast_possible_truncation)] // vCPU counts are tiny

#[cfg(target_os = "none")]
use core::sync::atomic::{AtomicU64, Ordering};

#[cfg(target_os = "none")]
use test_guests::{hv_abi, hypercall, println};

test_guests::guest_main!(run);

#[cfg(target_os = "none")]
const ROUNDS: u64 = 10_000;
#[cfg(target_os = "none")]
const MAX_VCPUS: usize = 16;
#[cfg(target_os = "none")]
static COUNTER: AtomicU64 = AtomicU64::new(0);
#[cfg(target_os = "none")]
static DONE: AtomicU64 = AtomicU64::new(0);

#[cfg(target_os = "none")]
#[repr(C, align(16))]
struct Stacks([[u8; 16 * 1024]; MAX_VCPUS]);
#[cfg(target_os = "none")]
static mut STACKS: Stacks = Stacks([[0; 16 * 1024]; MAX_VCPUS]);

#[cfg(target_os = "none")]
fn work() {
    for _ in 0..ROUNDS {
        COUNTER.fetch_add(1, Ordering::SeqCst);
    }
}

/// Where the other vCPUs start: RDI = their index.
#[cfg(target_os = "none")]
extern "C" fn secondary(index: u64) -> ! {
    work();
    println!("smp: vCPU {index} added {ROUNDS}");
    DONE.fetch_add(1, Ordering::SeqCst);
    hypercall(hv_abi::hypercall::VCPU_OFF, 0, 0, 0);
    loop {
        core::hint::spin_loop();
    }
}

#[cfg(target_os = "none")]
fn run(_args: &str, _ram: u64) {
    let vcpus = u64::from(
        core::arch::x86_64::__cpuid(0x4000_0001)
            .ebx
            .clamp(1, MAX_VCPUS as u32),
    );
    println!("smp: {vcpus} vCPUs; starting the others");
    for i in 1..vcpus {
        // SAFETY: each secondary vCPU gets its own stack; only its address is taken here.
        let top = unsafe { (&raw mut STACKS.0[i as usize]).cast::<u8>().add(16 * 1024) } as u64;
        let r = hypercall(
            hv_abi::hypercall::VCPU_START,
            i,
            secondary as *const () as u64,
            top - 8,
        );
        if r != 0 {
            println!("smp: FAILED to start vCPU {i}: {r}");
        }
    }
    let again = hypercall(hv_abi::hypercall::VCPU_START, 1, 0, 0);
    println!("smp: starting vCPU 1 twice is refused: {again}");
    work();
    while DONE.load(Ordering::SeqCst) < vcpus - 1 {
        hypercall(hv_abi::hypercall::YIELD, 0, 0, 0);
    }
    println!(
        "smp: {vcpus} vCPUs counted {} (expected {})",
        COUNTER.load(Ordering::SeqCst),
        vcpus * ROUNDS
    );
}

#[cfg(not(target_os = "none"))]
fn run(_args: &str, _ram: u64) {}
