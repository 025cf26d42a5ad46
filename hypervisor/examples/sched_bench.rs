//! `cargo xtask bench sched`: the cost of one scheduling decision of `hypervisor::sched` on the
//! host (stop the running vCPU, pick the next) with 10, 100 and 1,000 runnable vCPUs per CPU,
//! and how it grows with n (the policy's queues are B-trees: it should grow like log n). The
//! anchor is Xen credit's 30 ms slice: a decision costing a few hundred ns is noise beside it.
//! Then the deterministic simulator (`hypervisor::sched::sim`): the worst 1 s window's share
//! error against the weights' entitlement, and wake-to-run latency percentiles of sleepers
//! beside CPU hogs (targets: one slice per window, p99 at most 1 ms).

#![allow(clippy::cast_possible_truncation)] // x86_64 host: usize is 64 bits; counts are small.

use std::time::Instant;

use hypervisor::sched::policy::{MS, Params, Scheduler, Stop, entitlements};
use hypervisor::sched::sim::{SEC, Sim, Work, percentile};

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

fn weight(w: u32) -> Params {
    Params {
        weight: w,
        ..Params::default()
    }
}

/// Prints the worst share error of `sim` over windows 1.. of `secs` (window 0 holds the
/// start): in % of the entitlement, in ms of CPU, and in slices per vCPU of the domain (each
/// vCPU's time comes in slices, so a window boundary can find each of a domain's vCPUs up to
/// one slice from its fluid share).
fn fairness(what: &str, sim: &mut Sim, doms: &[(u32, u32, usize)], cpus: usize, secs: u64) {
    sim.run(secs * SEC);
    let spec: Vec<(f64, usize, Option<f64>, f64)> = doms
        .iter()
        .map(|&(_, w, n)| (f64::from(w), n, None, 0.0))
        .collect();
    let ent = entitlements(cpus as f64, &spec);
    let per_cpu = doms.iter().map(|d| d.2).sum::<usize>().div_ceil(cpus) as u64;
    let slice_ms = hypervisor::sched::sim::tolerance(0.0, per_cpu) * 1000.0;
    let (mut rel, mut ms, mut slices) = (0.0f64, 0.0f64, 0.0f64);
    for w in 1..secs as usize {
        for (&(d, _, n), &e) in doms.iter().zip(&ent) {
            let err = (sim.share(d, w) - e).abs() * 1000.0;
            rel = rel.max(err / (e * 1000.0));
            ms = ms.max(err);
            slices = slices.max(err / (n as f64 * slice_ms));
        }
    }
    println!(
        "sim {what}: worst window error {:.2} % of entitlement, {ms:.2} ms of CPU, {slices:.2} slices per vCPU (slice {slice_ms:.1} ms; target: one slice)",
        rel * 100.0
    );
}

/// Prints wake-to-run latency percentiles of the sleepers in `sim`.
fn latency(what: &str, sim: &mut Sim, secs: u64) {
    sim.run(secs * SEC);
    let l = sim.wake_latencies();
    let us = |q: usize| percentile(l, q) as f64 / 1000.0;
    println!(
        "sim {what}: wake-to-run p50 {:.1} us, p99 {:.1} us, max {:.1} us over {} wake-ups (target: p99 1 ms)",
        us(500),
        us(990),
        us(1000),
        l.len()
    );
}

fn simulated() {
    // 1:2:4 with two hogs each on 2 CPUs (the Bochs scenario's shape).
    let mut sim = Sim::new(2);
    let doms = [(1, 1, 2), (2, 2, 2), (3, 4, 2)];
    for &(d, w, n) in &doms {
        sim.domain(d, weight(w));
        for _ in 0..n {
            sim.vcpu(d, Work::Hog, !0);
        }
    }
    fairness("1:2:4, 2 hogs each, 2 CPUs, 20 s", &mut sim, &doms, 2, 20);

    // 50 domains of mixed weights, 1,000 hogs on 64 CPUs.
    let mut sim = Sim::new(64);
    let doms: Vec<(u32, u32, usize)> = (1..=50u32).map(|d| (d, 1 + (d * 37) % 500, 20)).collect();
    for &(d, w, n) in &doms {
        sim.domain(d, weight(w));
        for _ in 0..n {
            sim.vcpu(d, Work::Hog, !0);
        }
    }
    fairness(
        "50 domains, 1000 hogs, 64 CPUs, 5 s",
        &mut sim,
        &doms,
        64,
        5,
    );

    // One 10 ms ticker (0.5 ms of work) beside 6 hogs on 2 CPUs.
    let mut sim = Sim::new(2);
    sim.domain(1, weight(256));
    for _ in 0..6 {
        sim.vcpu(1, Work::Hog, !0);
    }
    sim.domain(2, weight(256));
    let tick = Work::Sleeper {
        period: 10 * MS,
        burst: MS / 2,
    };
    sim.vcpu(2, tick, !0);
    latency("1 ticker beside 6 hogs, 2 CPUs, 10 s", &mut sim, 10);

    // 16 single-vCPU sleeper domains (periods 1..16 ms, 0.2 ms of work each: within their
    // shares) beside 4 domains of 16 hogs each on 8 CPUs.
    let mut sim = Sim::new(8);
    for d in 1..=4 {
        sim.domain(d, weight(128 * d));
        for _ in 0..16 {
            sim.vcpu(d, Work::Hog, !0);
        }
    }
    for i in 1..=16 {
        sim.domain(4 + i as u32, weight(256));
        let work = Work::Sleeper {
            period: i * MS,
            burst: MS / 5,
        };
        sim.vcpu(4 + i as u32, work, !0);
    }
    latency("16 sleepers beside 64 hogs, 8 CPUs, 10 s", &mut sim, 10);
}

fn main() {
    // `--count CPUS PER_CPU N`: only N decisions of one case, for an instruction counter
    // (`cargo xtask bench sched` runs this under callgrind with two values of N: the
    // difference is the decisions' own cost, without the setup).
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--count") {
        let num = |k: usize| -> u64 {
            args.get(i + k)
                .and_then(|a| a.parse().ok())
                .expect("--count CPUS PER_CPU N")
        };
        per_decision(num(1) as usize, num(2) as usize, num(3));
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
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
    simulated();
}
