//! `cargo xtask bench sched`: the cost of one scheduling decision of `hypervisor::sched` on the
//! host (stop the running vCPU, pick the next) with 10, 100 and 1,000 runnable vCPUs per CPU,
//! and how it grows with n (the policy's queues are B-trees: it should grow like log n). The
//! anchor is Xen credit's 30 ms slice: a decision costing a few hundred ns is noise beside it.

#![allow(clippy::cast_possible_truncation)] // x86_64 host: usize is 64 bits; counts are small.

use std::time::Instant;

use hypervisor::sched::policy::{MS, Params, Scheduler, Stop};

fn per_decision(cpus: usize, per_cpu: usize, decisions: u64) -> f64 {
    let mut s = Scheduler::new(cpus);
    for d in 0..10u32 {
        s.add_domain(
            d + 1,
            Params {
                weight: 100 + 50 * d,
                ..Params::default()
            },
        )
        .expect("valid parameters");
    }
    for i in 0..cpus * per_cpu {
        let dom = 1 + u32::try_from(i % 10).expect("small");
        s.add_vcpu(dom, u64::MAX, 0).expect("valid vCPU");
    }
    let mut now = 0;
    for c in 0..cpus {
        let _ = s.pick(c, now);
    }
    let t0 = Instant::now();
    for i in 0..decisions {
        let c = (i % cpus as u64) as usize;
        now += MS;
        s.stop(c, now, Stop::Preempted);
        let d = s.pick(c, now);
        std::hint::black_box(d);
    }
    t0.elapsed().as_nanos() as f64 / decisions as f64
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let n = if quick { 20_000 } else { 200_000 };
    println!("sched_bench: stop + pick on the host, release build, {n} decisions per case");
    let mut base = None;
    for cpus in [1usize, 8] {
        for per_cpu in [10usize, 100, 1000] {
            // Best of three: the figure is the policy's cost, not the machine's noise.
            let ns = (0..3)
                .map(|_| per_decision(cpus, per_cpu, n))
                .fold(f64::INFINITY, f64::min);
            let b = *base.get_or_insert(ns);
            println!(
                "decision {cpus} CPU(s) x {per_cpu:>4} runnable vCPUs: {ns:>8.1} ns  (x{:.2} of 10 per CPU; log2 n grows x{:.2})",
                ns / b,
                (per_cpu as f64).log2() / 10f64.log2()
            );
        }
        base = None;
    }
}
