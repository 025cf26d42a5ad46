//! Where vCPUs wait between slices: the scheduler's policy (`sched::policy`) over every CPU
//! with a run loop, the vCPUs themselves (in slots by the policy's id), the sleepers with a
//! deadline (`sched::timers`) and the shares of the last second (`sched::window`), all behind
//! one lock. Each CPU's run loop (`super::run`) asks [`next`] for work, gives the vCPU back
//! with its next request when its slice ends, and [`retire`]s it when it stops for good. Wake-ups
//! ([`wake_vcpu`], [`wake_domain`], a due sleeper) go through the policy, which says which CPU
//! should look again; that CPU gets [`ATTN_RESCHED`] and, when it is another one, the kick IPI.
//!
//! No wake-up is lost: a wake for a vCPU that is running (between one [`next`] and the next) is
//! remembered, and that vCPU is put back runnable instead of blocked. Spurious wake-ups are
//! harmless: the run loop checks why a vCPU blocked before running it.
//!
//! One lock for all CPUs is simple and enough at slice granularity (milliseconds) for the
//! machines we run on; interrupt handlers never take it.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;
use core::sync::atomic::{AtomicU64, Ordering};

use spin::Mutex;

use super::run::Vcpu;
use crate::arch::cpu;
use crate::arch::percpu::{self, ATTN_RESCHED, CPUS};
use crate::sched::keys::{Change, cpu_list};
use crate::sched::policy::{DomId, MAX_SLICE, Ns, ParamError, Params, Scheduler, Stop, VcpuId};
use crate::sched::timers::{Latency, Sleepers};
use crate::sched::window::Window;

/// CPUs whose run loop is up (VMX on): the only ones vCPUs are placed on.
static RUN_CPUS: AtomicU64 = AtomicU64::new(0);
/// TSC ticks per 10 ms, set at boot (the time base of slices and sleeps).
static TSC_PER_10MS: AtomicU64 = AtomicU64::new(10_000_000);
/// Nanoseconds per TSC tick and TSC ticks per nanosecond, as 32.32 fixed point: conversions
/// on the scheduling path are one multiplication (a 128-bit division is a library call of
/// hundreds of instructions).
static NS_PER_TSC: AtomicU64 = AtomicU64::new(1 << 32);
static TSC_PER_NS: AtomicU64 = AtomicU64::new(1 << 32);

static LIVE: Mutex<Option<Live>> = Mutex::new(None);

const SECOND: Ns = 1_000_000_000;

struct Live {
    policy: Scheduler,
    slots: Vec<Option<Box<Vcpu>>>,
    sleepers: Sleepers,
    /// (domain, vCPU index) → the policy's id.
    ids: BTreeMap<(DomId, u32), VcpuId>,
    /// Woken while running: put back runnable, not blocked.
    pending: BTreeSet<VcpuId>,
    /// Each domain's CPU time, and each CPU's idle time, over the last second.
    shares: Window,
    idle: Window,
    /// The CPUs each domain's vCPUs have run on.
    ran_on: BTreeMap<DomId, u64>,
    /// Woken vCPUs not yet running: since when (TSC: their deadline, or the wake-up).
    woke: BTreeMap<VcpuId, u64>,
    latency: Latency,
}

impl Live {
    fn new(now: Ns) -> Live {
        let cpus = percpu::cpu_count().max(1);
        Live {
            policy: Scheduler::new(cpus),
            slots: Vec::new(),
            sleepers: Sleepers::new(cpus),
            ids: BTreeMap::new(),
            pending: BTreeSet::new(),
            shares: Window::new(SECOND, now),
            idle: Window::new(SECOND, now),
            ran_on: BTreeMap::new(),
            woke: BTreeMap::new(),
            latency: Latency::default(),
        }
    }

    fn wake(&mut self, v: VcpuId, now: Ns) {
        if !self.policy.is_blocked(v) {
            self.pending.insert(v);
            return;
        }
        self.sleepers.remove(v);
        self.woke.insert(v, cpu::rdtsc());
        if let Some(c) = self.policy.wake(v, now) {
            kick(c);
        }
    }

    /// Wakes the sleepers due: `cpu`'s own (its timer fired), and any other CPU's that are
    /// overdue (that CPU is busy elsewhere, e.g. writing to the console, or its timer was
    /// held), so a sleeper waits for whichever CPU looks first. `deciding`: `cpu` runs
    /// nothing now and picks next, so a sleeper may go there, and `cpu` is not kicked (its
    /// first entry would only end the slice it is about to start).
    fn wake_due(&mut self, cpu: usize, now_tsc: u64, now: Ns, deciding: bool) {
        for c in 0..self.policy.cpus() {
            if c == cpu || self.sleepers.next(c).is_some_and(|d| d <= now_tsc) {
                for (deadline, v) in self.sleepers.take_due(c, now_tsc) {
                    self.woke.insert(v, deadline);
                    if let Some(k) = self.policy.wake_from(v, now, deciding.then_some(cpu)) {
                        kick(k);
                    }
                }
            }
        }
    }

    fn roll(&mut self, now: Ns) {
        let now_tsc = cpu::rdtsc();
        let policy = &self.policy;
        self.shares
            .roll(now, policy.domain_ids().map(|d| (d, policy.domain_time(d))));
        let cpus = policy.cpus();
        self.idle.roll(
            now,
            (0..cpus).map(|c| (c as u32, tsc_to_ns(CPUS[c].idle_until(now_tsc)))),
        );
    }
}

fn with_live<R>(f: impl FnOnce(&mut Live, Ns) -> R) -> R {
    let now = now_ns();
    let mut g = LIVE.lock();
    let live = g.get_or_insert_with(|| Live::new(now));
    let r = f(live, now);
    // A vCPU waits somewhere now: the CPUs running one alone on a long slice decide again.
    let mut alone = live.policy.alone_kicks();
    while alone != 0 {
        kick(alone.trailing_zeros() as usize);
        alone &= alone - 1;
    }
    r
}

/// TSC frequency in kHz, as calibrated at boot.
pub fn tsc_khz() -> u64 {
    (TSC_PER_10MS.load(Ordering::Relaxed) / 10).max(1)
}

/// TSC ticks per microsecond (whole: for log lines, not for timers).
pub fn tsc_per_us() -> u64 {
    (TSC_PER_10MS.load(Ordering::Relaxed) / 10_000).max(1)
}

/// Records the TSC's rate, measured at boot.
pub fn set_tsc_per_10ms(ticks: u64) {
    let ticks = ticks.max(1000);
    TSC_PER_10MS.store(ticks, Ordering::Relaxed);
    NS_PER_TSC.store(
        ((10_000_000u128 << 32) / u128::from(ticks)) as u64,
        Ordering::Relaxed,
    );
    TSC_PER_NS.store(
        ((u128::from(ticks) << 32) / 10_000_000) as u64,
        Ordering::Relaxed,
    );
}

/// TSC ticks per 10 ms.
pub fn tsc_per_10ms() -> u64 {
    TSC_PER_10MS.load(Ordering::Relaxed)
}

fn fixed(x: u64, per: &AtomicU64) -> u64 {
    ((u128::from(x) * u128::from(per.load(Ordering::Relaxed))) >> 32) as u64
}

pub fn tsc_to_ns(tsc: u64) -> Ns {
    fixed(tsc, &NS_PER_TSC)
}

pub fn ns_to_tsc(ns: Ns) -> u64 {
    fixed(ns, &TSC_PER_NS)
}

pub fn now_ns() -> Ns {
    tsc_to_ns(cpu::rdtsc())
}

/// Tells `cpu` to look at its queue again: [`ATTN_RESCHED`], and the kick IPI unless it is
/// this CPU (a guest it runs exits; an idle CPU wakes from HLT).
fn kick(cpu: usize) {
    CPUS[cpu].attention.fetch_or(ATTN_RESCHED, Ordering::AcqRel);
    crate::domain::table::kick_cpu(cpu);
}

/// This CPU's run loop is up: vCPUs may be placed here from now on.
pub fn cpu_ready(cpu: usize) {
    RUN_CPUS.fetch_or(1 << cpu, Ordering::AcqRel);
}

/// The CPUs vCPUs may run on with `pin` (None: all with a run loop); None if it names none.
fn allowed(pin: Option<u64>) -> Option<u64> {
    let mask = pin.unwrap_or(u64::MAX) & RUN_CPUS.load(Ordering::Acquire);
    (mask != 0).then_some(mask)
}

/// Whether a domain of `vcpus` vCPUs with these settings would be admitted; checked before it
/// is built, with the reason when not.
pub fn admits(change: &Change, vcpus: u32) -> Result<(), String> {
    if allowed(change.pin).is_none() {
        return Err(String::from(
            "pin: names no CPU that runs guests (see 'cpus')",
        ));
    }
    let p = change.apply(Params::default());
    with_live(|l, _| l.policy.admits(&p, vcpus as usize)).map_err(|e| alloc::format!("{e}"))
}

/// Queues a new domain's vCPUs: vCPU 0 runnable, the others waiting for VCPU_START; vCPU i
/// starts on `placement[i]` and, with `fixed` (the module line said `cpu=N`), stays there.
/// Refused (nothing queued) when admission fails.
pub fn add(
    dom: DomId,
    change: &Change,
    placement: &[usize],
    fixed: bool,
    vcpus: Vec<Box<Vcpu>>,
) -> Result<(), String> {
    let affinity = allowed(change.pin).ok_or("pin: names no CPU that runs guests")?;
    let p = change.apply(Params::default());
    with_live(|l, now| {
        l.policy
            .add_domain_for(dom, p, vcpus.len())
            .map_err(|e| alloc::format!("{e}"))?;
        for (i, mut v) in vcpus.into_iter().enumerate() {
            let hint = placement.get(i).copied();
            let mask = match hint {
                Some(c) if fixed => 1 << c,
                _ => affinity,
            };
            let id = match l.policy.add_vcpu_at(dom, mask, hint, now) {
                Ok(id) => id,
                Err(e) => return Err(alloc::format!("{e}")),
            };
            v.sid = id;
            if i > 0 {
                l.policy.park(id);
            }
            if l.slots.len() <= id {
                l.slots.resize_with(id + 1, || None);
            }
            l.slots[id] = Some(v);
            l.ids.insert((dom, i as u32), id);
            if i == 0 {
                kick(l.policy.cpu_of(id));
            }
        }
        Ok(())
    })
}

/// What a CPU is to do now.
pub enum Next {
    /// Run this vCPU for at most this many TSC ticks.
    Run(Box<Vcpu>, u64),
    /// Nothing to run: halt until a kick, or this TSC value when given.
    Idle(Option<u64>),
}

/// The next vCPU for `cpu`, after giving back the one that ran there (in the same step, so
/// that another CPU cannot take it in between only to leave this one idle) and waking its
/// due sleepers.
pub fn next(cpu: usize, back: Option<(Box<Vcpu>, Back)>) -> Next {
    let now_tsc = cpu::rdtsc();
    with_live(|l, now| {
        if let Some((v, how)) = back {
            l.put_back(cpu, v, how, now);
        }
        l.wake_due(cpu, now_tsc, now, true);
        l.roll(now);
        loop {
            let d = l.policy.pick(cpu, now);
            match d.run {
                Some(v) => match l.slots.get_mut(v).and_then(Option::take) {
                    Some(b) => {
                        if let Some(since) = l.woke.remove(&v) {
                            l.latency
                                .record(cpu::rdtsc().saturating_sub(since) / tsc_per_us());
                        }
                        return Next::Run(b, ns_to_tsc(d.slice).max(1));
                    }
                    None => {
                        log::error!("internal: scheduler picked vCPU {v}, which is not queued");
                        l.policy.stop(cpu, now, Stop::Blocked);
                        l.policy.remove_vcpu(v);
                    }
                },
                None => {
                    // A throttled domain's period end, or this CPU's first sleeper.
                    let throttle = (d.slice < MAX_SLICE).then(|| now_tsc + ns_to_tsc(d.slice));
                    let until = match (throttle, l.sleepers.next(cpu)) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    return Next::Idle(until);
                }
            }
        }
    })
}

/// How a vCPU goes back.
pub enum Back {
    /// Still runnable (its slice ended, or a reason to look at it again).
    Runnable,
    /// Blocked until a wake-up, or until this TSC value (its timer) when given.
    Blocked(Option<u64>),
}

impl Live {
    /// Gives back the vCPU that ran on `cpu`.
    fn put_back(&mut self, cpu: usize, v: Box<Vcpu>, how: Back, now: Ns) {
        let l = self;
        let id = v.sid;
        *l.ran_on.entry(v.domain_id()).or_default() |= 1 << cpu;
        let woken = l.pending.remove(&id);
        match how {
            Back::Blocked(_) if woken => l.policy.stop(cpu, now, Stop::Preempted),
            Back::Runnable => l.policy.stop(cpu, now, Stop::Preempted),
            Back::Blocked(until) => {
                l.policy.stop(cpu, now, Stop::Blocked);
                if let Some(t) = until {
                    l.sleepers.add(id, cpu, t);
                }
            }
        }
        if let Some(slot) = l.slots.get_mut(id) {
            *slot = Some(v);
        }
    }
}

/// The vCPU that ran on `cpu` stops for good (the caller drops it); when it was its domain's
/// last, the domain leaves the scheduler (its reservation is free again).
pub fn retire(cpu: usize, v: &Vcpu) {
    with_live(|l, now| {
        let id = v.sid;
        if l.policy.running(cpu) == Some(id) {
            l.policy.stop(cpu, now, Stop::Blocked);
        }
        l.policy.remove_vcpu(id);
        l.sleepers.remove(id);
        l.pending.remove(&id);
        l.woke.remove(&id);
        let dom = v.domain_id();
        l.ids.remove(&(dom, v.index()));
        if l.policy.domain_vcpus(dom).is_empty() {
            l.policy.remove_domain(dom);
            l.ran_on.remove(&dom);
        }
    })
}

/// Wakes one vCPU of a domain (VCPU_START named it).
pub fn wake_vcpu(dom: DomId, index: u32) {
    with_live(|l, now| {
        if let Some(&v) = l.ids.get(&(dom, index)) {
            l.wake(v, now);
        }
    })
}

/// Wakes every vCPU of a domain (it was resumed or is being destroyed: each looks again).
pub fn wake_domain(dom: DomId) {
    with_live(|l, now| {
        let vs: Vec<VcpuId> = l.policy.domain_vcpus(dom).to_vec();
        for v in vs {
            l.wake(v, now);
        }
    })
}

/// Wakes `cpu`'s due sleepers (its one-shot timer fired while a guest ran); returns its
/// first sleeper's deadline after that.
pub fn wake_due(cpu: usize) -> Option<u64> {
    let now_tsc = cpu::rdtsc();
    with_live(|l, now| {
        l.wake_due(cpu, now_tsc, now, false);
        l.sleepers.next(cpu)
    })
}

/// `cpu`'s first sleeper's deadline.
pub fn next_sleeper(cpu: usize) -> Option<u64> {
    LIVE.lock().as_ref().and_then(|l| l.sleepers.next(cpu))
}

/// The CPU time domain `dom` has used, in TSC ticks, as of its vCPUs' last stops.
pub fn domain_ticks(dom: DomId) -> u64 {
    with_live(|l, _| ns_to_tsc(l.policy.domain_time(dom)))
}

/// The CPU where a domain's vCPU 0 runs or waits.
pub fn cpu_of(dom: DomId) -> Option<usize> {
    let g = LIVE.lock();
    let l = g.as_ref()?;
    l.ids.get(&(dom, 0)).map(|&v| l.policy.cpu_of(v))
}

/// Applies `change` to a running domain: all of it, or nothing with the reason.
pub fn set(dom: DomId, change: &Change) -> Result<(), String> {
    with_live(|l, _| {
        let old = l
            .policy
            .params(dom)
            .ok_or_else(|| alloc::format!("no domain {dom} in the scheduler"))?;
        let mask = match change.pin {
            None => None,
            Some(p) => Some(allowed(Some(p)).ok_or("pin: names no CPU that runs guests")?),
        };
        l.policy
            .set_params(dom, change.apply(old))
            .map_err(|e: ParamError| alloc::format!("{e}"))?;
        if let Some(mask) = mask {
            let vs: Vec<VcpuId> = l.policy.domain_vcpus(dom).to_vec();
            for v in vs {
                // Cannot fail: the mask names a CPU of this machine.
                let _ = l.policy.set_affinity(v, mask);
                // A vCPU running where it may no longer run leaves at once.
                for c in 0..l.policy.cpus() {
                    if l.policy.running(c) == Some(v) && mask & (1 << c) == 0 {
                        kick(c);
                    }
                }
            }
        }
        Ok(())
    })
}

/// The console's `sched` table: every domain's settings, CPU time and share of the last
/// second, then each CPU's queue and idle share.
pub fn report() -> Vec<String> {
    with_live(|l, now| {
        l.roll(now);
        let mut out = Vec::new();
        out.push(String::from(
            "ID  WEIGHT CAP   RESERVE PIN      VCPUS CPU-MS   SHARE  RAN-ON",
        ));
        for d in l.policy.domain_ids().collect::<Vec<_>>() {
            let Some(p) = l.policy.params(d) else {
                continue;
            };
            let vs = l.policy.domain_vcpus(d);
            let mut pin = String::new();
            let mask = vs.first().map_or(0, |&v| l.policy.affinity(v));
            let _ = cpu_list(mask, &mut pin);
            let cap = p
                .cap_pct
                .map_or(String::from("none"), |c| alloc::format!("{c}%"));
            let share = l.shares.permille(d).map_or(String::from("-"), |m| {
                alloc::format!("{}.{}%", m / 10, m % 10)
            });
            let mut ran = String::new();
            let _ = cpu_list(l.ran_on.get(&d).copied().unwrap_or(0), &mut ran);
            out.push(alloc::format!(
                "{d:<3} {:<6} {cap:<5} {:<7} {pin:<8} {:<5} {:<8} {share:<6} {ran}",
                p.weight,
                alloc::format!("{}%", p.reserve_pct),
                vs.len(),
                l.policy.domain_time(d) / 1_000_000,
            ));
        }
        let lat = &l.latency;
        out.push(alloc::format!(
            "wake-to-run: {} wake-ups, mean {} us, p99 under {} us, max {} us",
            lat.count,
            lat.mean_us(),
            lat.percentile_us(99),
            lat.max_us
        ));
        out.push(String::from("CPU WAITING RUNNING SLEEPING IDLE"));
        for (c, rec) in CPUS.iter().enumerate().take(l.policy.cpus()) {
            if RUN_CPUS.load(Ordering::Acquire) & (1 << c) == 0 {
                continue;
            }
            let (waiting, running) = l.policy.queue(c);
            let mut run = String::new();
            match running.and_then(|v| l.slots_owner(v)) {
                Some((d, i)) => {
                    let _ = write!(run, "d{d}v{i}");
                }
                None => run.push('-'),
            }
            let idle = l.idle.permille(c as u32).map_or(String::from("-"), |m| {
                alloc::format!("{}.{}%", m / 10, m % 10)
            });
            let fired = rec.timer_fired.load(Ordering::Relaxed);
            out.push(alloc::format!(
                "{c:<3} {waiting:<7} {run:<7} {:<8} {idle:<6} timer late: max {} us, mean {} us over {fired}",
                l.sleepers.count(c),
                rec.timer_late_max.load(Ordering::Relaxed) / tsc_per_us(),
                rec.timer_late_sum.load(Ordering::Relaxed) / fired.max(1) / tsc_per_us(),
            ));
        }
        out
    })
}

impl Live {
    /// Which domain and index a policy id is (a running vCPU is out of its slot).
    fn slots_owner(&self, v: VcpuId) -> Option<(DomId, u32)> {
        self.ids
            .iter()
            .find(|(_, id)| **id == v)
            .map(|(&(d, i), _)| (d, i))
    }
}
