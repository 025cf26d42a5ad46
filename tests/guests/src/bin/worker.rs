//! `worker`: every vCPU of the domain spins, counting units of work (a fixed loop, the same
//! number of instructions per unit in every domain), and vCPU 0 reports the domain's total for
//! each window of guest TSC time: `worker: window N: U units in T us`. Windows are aligned on
//! the TSC (window N is [N × W, (N + 1) × W) ms since the TSC's zero), so domains' windows
//! line up and their rates compare as CPU shares. Arguments: `window=MS` (default 1000) and
//! `windows=N` (exit after N reports; default: run forever).
#![cfg_attr(target_os = "none", no_std, no_main)]
#![allow(clippy::cast_possible_truncation)] // vCPU counts are tiny

#[cfg(target_os = "none")]
use core::sync::atomic::{AtomicU64, Ordering};

#[cfg(target_os = "none")]
use test_guests::{hv_abi, hypercall, println, rdtsc};

test_guests::guest_main!(run);

#[cfg(target_os = "none")]
const MAX_VCPUS: usize = 16;

/// One counter per vCPU, each on its own cache line.
#[cfg(target_os = "none")]
#[repr(C, align(64))]
struct Counter(AtomicU64);

#[cfg(target_os = "none")]
#[allow(clippy::declare_interior_mutable_const)] // only initialises the array below
const ZERO: Counter = Counter(AtomicU64::new(0));
#[cfg(target_os = "none")]
static UNITS: [Counter; MAX_VCPUS] = [ZERO; MAX_VCPUS];

#[cfg(target_os = "none")]
#[repr(C, align(16))]
struct Stacks([[u8; 8 * 1024]; MAX_VCPUS]);
#[cfg(target_os = "none")]
static mut STACKS: Stacks = Stacks([[0; 8 * 1024]; MAX_VCPUS]);

/// One unit of work: a short dependent chain the CPU cannot skip.
#[cfg(target_os = "none")]
#[inline(always)]
fn unit(x: u64) -> u64 {
    let mut x = x;
    for _ in 0..16 {
        x = core::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
    x
}

#[cfg(target_os = "none")]
extern "C" fn secondary(index: u64) -> ! {
    let c = &UNITS[index as usize].0;
    let mut x = index;
    loop {
        x = unit(x);
        // Only this vCPU writes its counter; a plain load and store is enough.
        c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }
}

#[cfg(target_os = "none")]
fn total(vcpus: usize) -> u64 {
    UNITS[..vcpus]
        .iter()
        .map(|c| c.0.load(Ordering::Relaxed))
        .sum()
}

#[cfg(target_os = "none")]
fn arg(args: &str, key: &str) -> Option<u64> {
    args.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

#[cfg(target_os = "none")]
fn run(args: &str, _ram: u64) {
    let leaf = core::arch::x86_64::__cpuid(0x4000_0001);
    let vcpus = leaf.ebx.clamp(1, MAX_VCPUS as u32) as usize;
    let tsc_khz = u64::from(leaf.edx.max(1));
    let window_ms = arg(args, "window").unwrap_or(1000).max(10);
    let windows = arg(args, "windows");
    let per_window = window_ms * tsc_khz;
    println!("worker: {vcpus} vCPUs, {window_ms} ms windows, TSC {tsc_khz} kHz");
    for i in 1..vcpus {
        // SAFETY: each secondary vCPU gets its own stack; only its address is taken here.
        let top = unsafe { (&raw mut STACKS.0[i]).cast::<u8>().add(8 * 1024) } as u64;
        let r = hypercall(
            hv_abi::hypercall::VCPU_START,
            i as u64,
            secondary as *const () as u64,
            top - 8,
        );
        if r != 0 {
            println!("worker: FAILED to start vCPU {i}: {r}");
        }
    }
    let c = &UNITS[0].0;
    let mut x = 0u64;
    let mut window = rdtsc() / per_window;
    let (mut at, mut units) = (rdtsc(), total(vcpus));
    let mut reported = 0;
    loop {
        for _ in 0..256 {
            x = unit(x);
            c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        }
        let now = rdtsc();
        if now / per_window == window {
            continue;
        }
        // Only whole windows are reported: the first boundary seen starts the first one.
        let t = total(vcpus);
        if reported > 0 {
            println!(
                "worker: window {window}: {} units in {} us",
                t - units,
                (now - at) * 1000 / tsc_khz
            );
        }
        reported += 1;
        window = now / per_window;
        (at, units) = (now, t);
        if windows.is_some_and(|n| reported > n) {
            test_guests::exit(0);
        }
    }
}

#[cfg(not(target_os = "none"))]
fn run(_args: &str, _ram: u64) {}
