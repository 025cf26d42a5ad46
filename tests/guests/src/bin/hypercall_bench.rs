//! `hypercall-bench N`: N VMCALL round trips (the NOP hypercall); prints the TSC delta per
//! round trip.
#![cfg_attr(target_os = "none", no_std, no_main)]

use test_guests::{hv_abi, hypercall, println, rdtsc};

test_guests::guest_main!(run);

fn run(args: &str, _ram: u64) {
    let n: u64 = args
        .split_whitespace()
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000)
        .max(1);
    // Warm up once (first exit costs more).
    hypercall(hv_abi::hypercall::NOP, 0, 0, 0);
    let t0 = rdtsc();
    for _ in 0..n {
        hypercall(hv_abi::hypercall::NOP, 0, 0, 0);
    }
    let dt = rdtsc() - t0;
    println!(
        "hypercall-bench: {n} round trips, {} TSC ticks each",
        dt / n
    );
}
