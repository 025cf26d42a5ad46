//! A deterministic simulator for the policy: CPUs, vCPUs with scripted workloads, and exact
//! accounting of who ran where and when, checked per 1 s window (issue 12, part 2). Host only:
//! its tests check the policy's fairness, caps, reservations and wake latency, and
//! `cargo xtask bench sched` (`examples/sched_bench.rs`) prints the same figures.

use alloc::vec::Vec;

use super::policy::{CpuId, DomId, MS, Ns, Params, Scheduler, Stop, VcpuId};

/// One second, the accounting window.
pub const SEC: Ns = 1000 * MS;

/// What a simulated vCPU does.
#[derive(Clone, Copy, Debug)]
pub enum Work {
    /// Always runnable.
    Hog,
    /// Runs `burst` every `period` (a periodic sleeper: a ticker, an I/O-bound task).
    Sleeper { period: Ns, burst: Ns },
}

struct V {
    id: VcpuId,
    dom: DomId,
    work: Work,
    /// Sleepers: work left in this period, and when the next period starts.
    left: Ns,
    next_wake: Option<Ns>,
    woke_at: Option<Ns>,
    ran_on: u64,
    /// Its domain was removed: it never runs or wakes again.
    gone: bool,
}

struct Cpu {
    running: Option<(usize, Ns, Ns)>, // (index into vs, started, ends)
    idle_until: Ns,
}

/// The simulated machine: the policy, its CPUs and the scripted vCPUs.
pub struct Sim {
    s: Scheduler,
    now: Ns,
    cpus: Vec<Cpu>,
    vs: Vec<V>,
    /// Per domain id: run time per 1 s window.
    windows: Vec<Vec<Ns>>,
    wake_latency: Vec<Ns>,
}

impl Sim {
    /// A machine of `cpus` CPUs at time 0.
    pub fn new(cpus: usize) -> Sim {
        Sim {
            s: Scheduler::new(cpus),
            now: 0,
            cpus: (0..cpus)
                .map(|_| Cpu {
                    running: None,
                    idle_until: 0,
                })
                .collect(),
            vs: Vec::new(),
            windows: Vec::new(),
            wake_latency: Vec::new(),
        }
    }

    /// Adds domain `id`.
    ///
    /// # Panics
    /// If the policy refuses `p` (a script error).
    pub fn domain(&mut self, id: DomId, p: Params) {
        self.s.add_domain(id, p).expect("valid domain parameters");
        while self.windows.len() <= id as usize {
            self.windows.push(Vec::new());
        }
    }

    /// Adds a vCPU of `dom` doing `work` on the CPUs in `affinity`; returns its index.
    ///
    /// # Panics
    /// If the policy refuses it (a script error).
    pub fn vcpu(&mut self, dom: DomId, work: Work, affinity: u64) -> usize {
        let id = self
            .s
            .add_vcpu(dom, affinity, self.now)
            .expect("valid vCPU");
        let left = match work {
            Work::Hog => 0,
            Work::Sleeper { burst, .. } => burst,
        };
        self.vs.push(V {
            id,
            dom,
            work,
            left,
            next_wake: None,
            woke_at: None,
            ran_on: 0,
            gone: false,
        });
        self.vs.len() - 1
    }

    /// Removes domain `id` now: what of it runs stops (its time so far counted), and its
    /// vCPUs never run again.
    pub fn remove_domain(&mut self, id: DomId) {
        let now = self.now;
        for c in 0..self.cpus.len() {
            if let Some((i, started, _)) = self.cpus[c].running
                && self.vs[i].dom == id
            {
                self.cpus[c].running = None;
                self.account(id, started, now);
                self.s.stop(c, now, Stop::Blocked);
                self.cpus[c].idle_until = now;
            }
        }
        self.s.remove_domain(id);
        for v in self.vs.iter_mut().filter(|v| v.dom == id) {
            v.gone = true;
            v.next_wake = None;
            v.woke_at = None;
        }
    }

    /// Simulated time now.
    #[must_use]
    pub fn now(&self) -> Ns {
        self.now
    }

    fn account(&mut self, dom: DomId, from: Ns, to: Ns) {
        let w = &mut self.windows[dom as usize];
        let mut t = from;
        while t < to {
            let win = (t / SEC) as usize;
            let end = ((win as u64 + 1) * SEC).min(to);
            while w.len() <= win {
                w.push(0);
            }
            w[win] += end - t;
            t = end;
        }
    }

    /// Ends what `cpu` runs at `now` (its slice or burst ended, or it is preempted).
    fn end_run(&mut self, cpu: CpuId, now: Ns) {
        let Some((i, started, _)) = self.cpus[cpu].running.take() else {
            return;
        };
        let dom = self.vs[i].dom;
        self.account(dom, started, now);
        let ran = now - started;
        let why = match self.vs[i].work {
            Work::Hog => Stop::Preempted,
            Work::Sleeper { period, burst } => {
                self.vs[i].left = self.vs[i].left.saturating_sub(ran);
                if self.vs[i].left == 0 {
                    // Done for this period: sleep until the next one.
                    let next = (now / period + 1) * period;
                    self.vs[i].next_wake = Some(next);
                    self.vs[i].left = burst;
                    Stop::Blocked
                } else {
                    Stop::Preempted
                }
            }
        };
        self.s.stop(cpu, now, why);
    }

    /// Kicks the CPUs running alone once a vCPU waits somewhere (as the hypervisor does).
    fn kick_alone(&mut self, now: Ns) {
        let mask = self.s.alone_kicks();
        for c in 0..self.cpus.len() {
            if mask & (1 << c) != 0 {
                self.end_run(c, now);
                self.cpus[c].idle_until = now;
            }
        }
    }

    /// Runs the machine until simulated time `until`.
    ///
    /// # Panics
    /// If the policy picks a vCPU the simulator never added (a policy bug).
    pub fn run(&mut self, until: Ns) {
        while self.now < until {
            let now = self.now;
            // Free CPUs pick.
            for c in 0..self.cpus.len() {
                if self.cpus[c].running.is_some() || self.cpus[c].idle_until > now {
                    continue;
                }
                let d = self.s.pick(c, now);
                match d.run {
                    Some(v) => {
                        let i = self
                            .vs
                            .iter()
                            .position(|x| x.id == v)
                            .expect("the policy picks only vCPUs it was given");
                        let len = match self.vs[i].work {
                            Work::Hog => d.slice,
                            Work::Sleeper { .. } => d.slice.min(self.vs[i].left),
                        };
                        if let Some(w) = self.vs[i].woke_at.take() {
                            self.wake_latency.push(now - w);
                        }
                        self.vs[i].ran_on |= 1 << c;
                        self.cpus[c].running = Some((i, now, now + len.max(1)));
                    }
                    None => self.cpus[c].idle_until = now + d.slice,
                }
            }
            // The next event.
            let mut next = until;
            for c in &self.cpus {
                match c.running {
                    Some((_, _, end)) => next = next.min(end),
                    None => next = next.min(c.idle_until.max(now + 1)),
                }
            }
            for v in &self.vs {
                if let Some(t) = v.next_wake {
                    next = next.min(t.max(now));
                }
            }
            self.now = next;
            let now = next;
            for c in 0..self.cpus.len() {
                if self.cpus[c].running.is_some_and(|(_, _, end)| end <= now) {
                    self.end_run(c, now);
                }
            }
            for i in 0..self.vs.len() {
                if self.vs[i].next_wake.is_some_and(|t| t <= now) {
                    self.vs[i].next_wake = None;
                    self.vs[i].woke_at = Some(now);
                    if let Some(c) = self.s.wake(self.vs[i].id, now) {
                        // The kick: the woken vCPU preempts, or the idle CPU looks again.
                        self.end_run(c, now);
                        self.cpus[c].idle_until = now;
                    }
                }
            }
            self.kick_alone(now);
        }
    }

    /// Every wake-to-run latency seen so far (from a sleeper's wake-up to its next pick), in
    /// the order they happened.
    #[must_use]
    pub fn wake_latencies(&self) -> &[Ns] {
        &self.wake_latency
    }

    /// Share of one CPU per domain in window `w`.
    #[must_use]
    pub fn share(&self, dom: DomId, w: usize) -> f64 {
        self.windows[dom as usize].get(w).copied().unwrap_or(0) as f64 / SEC as f64
    }
}

/// How far a domain's share in a 1 s window may be from its entitlement: 2 % of it, or one
/// slice of its CPU's queue (the issue's benchmark target, "share error at most one slice per
/// window"; with `n` runnable vCPUs per CPU a slice is TARGET_LATENCY / n), whichever is more.
/// Time is handed out in slices, so a window boundary can fall inside one.
#[must_use]
pub fn tolerance(entitled: f64, per_cpu: u64) -> f64 {
    let slice = (super::policy::TARGET_LATENCY / per_cpu.max(1))
        .clamp(super::policy::MIN_SLICE, super::policy::MAX_SLICE) as f64
        / SEC as f64;
    (0.02 * entitled).max(slice + 1e-9)
}

/// The quantile `per_mille`/1000 of `values`, by the nearest-rank method; 0 when empty.
#[must_use]
pub fn percentile(values: &[Ns], per_mille: usize) -> Ns {
    let mut v = values.to_vec();
    v.sort_unstable();
    if v.is_empty() {
        return 0;
    }
    let rank = (per_mille * v.len()).div_ceil(1000);
    v[rank.clamp(1, v.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sched::policy::entitlements;
    use alloc::vec::Vec;

    fn p(weight: u32) -> Params {
        Params {
            weight,
            ..Params::default()
        }
    }

    #[test]
    fn weights_share_the_machine_within_two_percent_per_second() {
        // Three domains, weights 1:2:4, two hogs each, on 2 CPUs.
        let mut sim = Sim::new(2);
        for (d, w) in [(1, 1), (2, 2), (3, 4)] {
            sim.domain(d, p(w));
            sim.vcpu(d, Work::Hog, !0);
            sim.vcpu(d, Work::Hog, !0);
        }
        sim.run(20 * SEC);
        let ent = entitlements(
            2.0,
            &[
                (1.0, 2, None, 0.0),
                (2.0, 2, None, 0.0),
                (4.0, 2, None, 0.0),
            ],
        );
        for w in 1..20 {
            for (i, d) in [1u32, 2, 3].iter().enumerate() {
                let got = sim.share(*d, w);
                assert!(
                    (got - ent[i]).abs() <= tolerance(ent[i], 3),
                    "window {w}: domain {d} got {got:.4} of a CPU, entitled to {:.4}",
                    ent[i]
                );
            }
        }
    }

    #[test]
    fn a_small_domain_is_held_to_its_vcpus_and_the_rest_is_shared() {
        // 1:2:4 with one vCPU each on 2 CPUs: the weight-4 domain cannot use more than 1 CPU.
        let mut sim = Sim::new(2);
        for (d, w) in [(1, 1), (2, 2), (3, 4)] {
            sim.domain(d, p(w));
            sim.vcpu(d, Work::Hog, !0);
        }
        sim.run(10 * SEC);
        let ent = entitlements(
            2.0,
            &[
                (1.0, 1, None, 0.0),
                (2.0, 1, None, 0.0),
                (4.0, 1, None, 0.0),
            ],
        );
        for w in 1..10 {
            for (i, d) in [1u32, 2, 3].iter().enumerate() {
                let got = sim.share(*d, w);
                assert!(
                    (got - ent[i]).abs() <= tolerance(ent[i], 2),
                    "window {w}: domain {d}: {got:.4} vs {:.4}",
                    ent[i]
                );
            }
        }
    }

    #[test]
    fn caps_are_never_exceeded_even_on_an_idle_machine() {
        let mut sim = Sim::new(2);
        sim.domain(
            1,
            Params {
                cap_pct: Some(25),
                ..Params::default()
            },
        );
        sim.vcpu(1, Work::Hog, !0);
        sim.vcpu(1, Work::Hog, !0);
        sim.run(5 * SEC);
        for w in 0..5 {
            let got = sim.share(1, w);
            assert!(
                got <= 0.25 + 1e-9,
                "window {w}: {got:.4} of a CPU under a 25% cap"
            );
            assert!(
                got >= 0.24,
                "window {w}: the cap is also what it gets: {got:.4}"
            );
        }
    }

    #[test]
    fn reservations_are_met_against_heavier_weights() {
        let mut sim = Sim::new(1);
        sim.domain(
            1,
            Params {
                weight: 1,
                reserve_pct: 50,
                cap_pct: None,
            },
        );
        sim.domain(2, p(10_000));
        sim.vcpu(1, Work::Hog, !0);
        sim.vcpu(2, Work::Hog, !0);
        sim.vcpu(2, Work::Hog, !0);
        sim.run(5 * SEC);
        for w in 0..5 {
            let got = sim.share(1, w);
            assert!(got >= 0.5 - 0.005, "window {w}: reserved 50%, got {got:.4}");
        }
    }

    #[test]
    fn a_waking_sleeper_runs_within_a_millisecond_on_a_busy_machine() {
        let mut sim = Sim::new(2);
        sim.domain(1, p(256));
        for _ in 0..6 {
            sim.vcpu(1, Work::Hog, !0);
        }
        sim.domain(2, p(256));
        sim.vcpu(
            2,
            Work::Sleeper {
                period: 10 * MS,
                burst: MS / 2,
            },
            !0,
        );
        sim.run(5 * SEC);
        assert!(
            sim.wake_latency.len() > 400,
            "{} wake-ups",
            sim.wake_latency.len()
        );
        let worst = *sim.wake_latency.iter().max().unwrap();
        assert!(worst <= MS, "worst wake-to-run latency {worst} ns");
        // And it does not gain more than its share over time: it asked for 5%, got about that.
        let got = sim.share(2, 3);
        assert!(got <= 0.051, "{got:.4}");
    }

    #[test]
    fn affinity_is_kept() {
        let mut sim = Sim::new(2);
        sim.domain(1, p(256));
        let pinned = sim.vcpu(1, Work::Hog, 0b10);
        for _ in 0..3 {
            sim.vcpu(1, Work::Hog, !0);
        }
        sim.run(2 * SEC);
        assert_eq!(
            sim.vs[pinned].ran_on, 0b10,
            "the vCPU pinned to CPU 1 ran elsewhere"
        );
        assert!(sim.vs.iter().any(|v| v.ran_on & 1 != 0), "CPU 0 worked too");
    }

    #[test]
    fn no_starvation_with_a_thousand_vcpus_on_sixty_four_cpus() {
        let mut sim = Sim::new(64);
        for d in 1..=50u32 {
            sim.domain(d, p(1 + (d * 37) % 500));
            for _ in 0..20 {
                sim.vcpu(d, Work::Hog, !0);
            }
        }
        sim.run(2 * SEC);
        for v in &sim.vs {
            assert!(sim.s.vcpu_time(v.id) > 0, "vCPU {} never ran", v.id);
        }
        // Work-conserving: all 64 CPUs busy in the second window.
        let total: f64 = (1..=50).map(|d| sim.share(d, 1)).sum();
        assert!(total > 63.9, "{total:.3} CPUs used of 64");
        // Fair: each domain within one slice per vCPU of its entitlement (16 runnable per CPU:
        // the slice is the 1 ms minimum, and a window boundary can find each of a domain's 20
        // vCPUs up to a slice from its fluid share).
        let spec: Vec<(f64, usize, Option<f64>, f64)> = (1..=50u32)
            .map(|d| (f64::from(1 + (d * 37) % 500), 20, None, 0.0))
            .collect();
        let ent = entitlements(64.0, &spec);
        for (i, e) in ent.iter().enumerate() {
            let d = i as u32 + 1;
            let got = sim.share(d, 1);
            assert!(
                (got - e).abs() <= 20.0 * tolerance(0.0, 16),
                "domain {d}: {got:.4} of a CPU, entitled to {e:.4}"
            );
        }
    }

    #[test]
    fn random_workloads_keep_caps_and_use_idle_cpus() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for round in 0..20 {
            let cpus = 1 + rnd(8) as usize;
            let mut sim = Sim::new(cpus);
            let doms = 1 + rnd(5) as u32;
            let mut caps = Vec::new();
            let mut hogs = 0usize;
            for d in 1..=doms {
                let cap = (rnd(3) == 0).then(|| 10 + rnd(150) as u32);
                sim.domain(
                    d,
                    Params {
                        weight: 1 + rnd(1000) as u32,
                        cap_pct: cap,
                        reserve_pct: 0,
                    },
                );
                caps.push(cap);
                for _ in 0..1 + rnd(4) {
                    let hog = rnd(3) != 0;
                    let work = if hog {
                        Work::Hog
                    } else {
                        Work::Sleeper {
                            period: (1 + rnd(20)) * MS,
                            burst: (1 + rnd(900)) * MS / 1000,
                        }
                    };
                    let aff = if rnd(4) == 0 {
                        1 << rnd(cpus as u64)
                    } else {
                        !0
                    };
                    // Hogs free to run anywhere and not capped can fill the machine on their own.
                    hogs += usize::from(hog && cap.is_none() && aff == !0);
                    sim.vcpu(d, work, aff);
                }
            }
            sim.run(3 * SEC);
            for w in 0..3 {
                for (i, cap) in caps.iter().enumerate() {
                    if let Some(c) = cap {
                        let got = sim.share(i as u32 + 1, w);
                        assert!(
                            got <= f64::from(*c) / 100.0 + 1e-9,
                            "round {round} window {w}: cap {c}% exceeded: {got:.4}"
                        );
                    }
                }
                let used: f64 = (1..=doms).map(|d| sim.share(d, w)).sum();
                assert!(
                    used <= cpus as f64 + 1e-9,
                    "round {round}: more than the machine"
                );
                // Work-conserving: with enough free, uncapped hogs no CPU idles.
                if hogs >= cpus && w > 0 {
                    assert!(
                        used >= cpus as f64 - 0.01,
                        "round {round} window {w}: {used:.3} of {cpus} CPUs used with {hogs} free hogs"
                    );
                }
            }
        }
    }

    /// Domains come and go over two simulated minutes on 4 CPUs (hogs, a capped domain, an
    /// I/O-like sleeper): in every whole window not right after a change, each domain's
    /// share is its entitlement among the domains present (the sleeper's demand counted as
    /// its cap) within 2 % or one slice per vCPU, and the sleeper wakes to run within 1 ms.
    #[test]
    fn domains_come_and_go_over_two_simulated_minutes() {
        // (id, weight, hogs, cap in % of a CPU, joins at s, leaves at s)
        let plan: [(u32, u32, usize, Option<u32>, u64, u64); 4] = [
            (1, 256, 4, None, 0, 50),
            (2, 512, 2, None, 0, 120),
            (3, 1024, 4, None, 20, 100),
            (4, 256, 2, Some(50), 80, 120),
        ];
        // The sleeper: 0.4 ms of work every 4 ms (10 % of a CPU), there throughout.
        let (period, burst) = (4 * MS, 2 * MS / 5);
        let mut sim = Sim::new(4);
        sim.domain(9, p(256));
        sim.vcpu(9, Work::Sleeper { period, burst }, !0);
        let mut changes: Vec<u64> = plan.iter().flat_map(|d| [d.4, d.5]).collect();
        changes.sort_unstable();
        changes.dedup();
        for &t in &changes {
            sim.run(t * SEC);
            for &(id, w, n, cap, join, leave) in &plan {
                if join == t {
                    sim.domain(
                        id,
                        Params {
                            weight: w,
                            cap_pct: cap,
                            reserve_pct: 0,
                        },
                    );
                    for _ in 0..n {
                        sim.vcpu(id, Work::Hog, !0);
                    }
                }
                if leave == t && t < 120 {
                    sim.remove_domain(id);
                }
            }
        }
        assert_eq!(sim.now(), 120 * SEC);
        let mut checked = 0;
        for w in 0..120u64 {
            if changes.iter().any(|&c| c == w || c + 1 == w) || w + 1 > 120 {
                continue;
            }
            let present: Vec<_> = plan.iter().filter(|d| d.4 <= w && w < d.5).collect();
            let mut spec: Vec<(f64, usize, Option<f64>, f64)> = present
                .iter()
                .map(|d| (f64::from(d.1), d.2, d.3.map(|c| f64::from(c) / 100.0), 0.0))
                .collect();
            spec.push((256.0, 1, Some(0.1), 0.0));
            let ent = entitlements(4.0, &spec);
            let runnable: usize = present.iter().map(|d| d.2).sum::<usize>() + 1;
            let per_cpu = runnable.div_ceil(4) as u64;
            for (d, e) in present.iter().zip(&ent) {
                let got = sim.share(d.0, w as usize);
                let bound = (0.02 * e).max(d.2 as f64 * tolerance(0.0, per_cpu));
                assert!(
                    (got - e).abs() <= bound,
                    "window {w}: domain {} got {got:.4} of a CPU, entitled to {e:.4} (bound {bound:.4})",
                    d.0
                );
            }
            let sleeper = sim.share(9, w as usize);
            assert!(
                (sleeper - 0.1).abs() <= 0.002,
                "window {w}: the sleeper got {sleeper:.4}, asked for 0.1"
            );
            checked += 1;
        }
        assert!(checked >= 100, "{checked} windows checked");
        let worst = *sim.wake_latencies().iter().max().unwrap();
        assert!(worst <= MS, "worst wake-to-run latency {worst} ns");
    }
}
