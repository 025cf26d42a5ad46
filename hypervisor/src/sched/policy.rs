//! The scheduling policy: domains, vCPUs, per-CPU queues, decisions. See the module above.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;

/// Nanoseconds.
pub type Ns = u64;

pub const MS: Ns = 1_000_000;
/// Accounting period for caps and reservations.
pub const PERIOD: Ns = 10 * MS;
/// Slices are the target latency over the runnable vCPUs of a CPU, within these bounds.
pub const TARGET_LATENCY: Ns = 12 * MS;
pub const MIN_SLICE: Ns = MS;
pub const MAX_SLICE: Ns = 30 * MS;
/// The slice of a vCPU picked while no vCPU waits on any CPU, whose domain has no cap or
/// reservation: nothing competes, so the slice only bounds how long the CPU goes without a
/// decision. As soon as a vCPU waits anywhere, every CPU running alone is to be kicked
/// ([`Scheduler::alone_kicks`], and a wake-up onto such a CPU kicks it), so this costs no
/// latency and no fairness; it saves the guest an exit every [`TARGET_LATENCY`].
pub const ALONE_SLICE: Ns = 1000 * MS;
/// A waking vCPU is placed at most this far behind its queue's least virtual time.
pub const WAKE_CREDIT: Ns = MIN_SLICE / 2;
/// Virtual time advances by `ran * WEIGHT_UNIT / weight`.
const WEIGHT_UNIT: u64 = 1 << 16;
/// The default weight (Xen's).
pub const DEFAULT_WEIGHT: u32 = 256;

/// Real time `t` as virtual time: what a vCPU of the default weight (alone in its domain)
/// accrues by running `t`. Thresholds between vCPUs' virtual times are real-time amounts
/// converted this way.
const fn virt(t: Ns) -> u64 {
    t / DEFAULT_WEIGHT as u64
}
/// Most CPUs (affinity is a 64-bit mask).
pub const MAX_CPUS: usize = 64;

pub type DomId = u32;
pub type VcpuId = usize;
pub type CpuId = usize;

/// What the operator sets per domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    /// Relative share, 1..=65535 (Xen's default is 256).
    pub weight: u32,
    /// The most CPU the domain may use, in % of one CPU across all its vCPUs (None: no cap).
    pub cap_pct: Option<u32>,
    /// The least it gets when it wants it, in % of one CPU.
    pub reserve_pct: u32,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            weight: DEFAULT_WEIGHT,
            cap_pct: None,
            reserve_pct: 0,
        }
    }
}

/// Why a domain's parameters were refused (nothing changed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParamError {
    Weight(u32),
    Cap(u32),
    /// The reservation is more than the cap, or than the domain's vCPUs can use.
    Reservation {
        reserve: u32,
        most: u32,
    },
    /// All reservations together would exceed the machine.
    Admission {
        asked: u32,
        free: u32,
    },
    NoSuchDomain(DomId),
    DomainExists(DomId),
    /// An affinity with no CPU of this machine in it.
    Affinity(u64),
}

impl core::fmt::Display for ParamError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ParamError::Weight(w) => write!(f, "weight {w}: must be 1..65535"),
            ParamError::Cap(c) => write!(f, "cap {c}%: must be 1.. (100 per CPU), or none"),
            ParamError::Reservation { reserve, most } => {
                write!(
                    f,
                    "reserve {reserve}%: more than this domain can use ({most}%)"
                )
            }
            ParamError::Admission { asked, free } => write!(
                f,
                "reserve {asked}%: only {free}% of the machine is not reserved by other domains"
            ),
            ParamError::NoSuchDomain(d) => write!(f, "no domain {d}"),
            ParamError::DomainExists(d) => write!(f, "domain {d} exists already"),
            ParamError::Affinity(m) => write!(f, "affinity {m:#x} names no CPU of this machine"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Runnable,
    Running(CpuId),
    Blocked,
}

#[derive(Debug)]
struct Vcpu {
    /// Its domain's index in `Scheduler::doms`.
    slot: usize,
    cpu: CpuId,
    affinity: u64,
    vruntime: u64,
    /// The weight it is counted with in the runnable average (0: not counted: blocked).
    counted: u64,
    state: State,
    /// When it started running (Running only).
    since: Ns,
    /// Total time run.
    ran: Ns,
    /// The slice granted when it was picked (counted against its domain's cap meanwhile).
    granted: Ns,
    removed: bool,
}

#[derive(Debug)]
struct Domain {
    /// Removed: its vCPUs are gone and its settings are cleared (no cap, no reservation).
    gone: bool,
    params: Params,
    vcpus: Vec<VcpuId>,
    /// Time used in the current period.
    used: Ns,
    /// Slices granted to its vCPUs running now, not yet charged (so that parallel vCPUs
    /// cannot together overrun a cap).
    granted: Ns,
    period_start: Ns,
    total: Ns,
}

impl Domain {
    fn budget(&self) -> Option<Ns> {
        self.params.cap_pct.map(|c| PERIOD * u64::from(c) / 100)
    }
    /// Budget left in this period, counting what running vCPUs were granted.
    fn budget_left(&self) -> Option<Ns> {
        self.budget()
            .map(|b| b.saturating_sub(self.used + self.granted))
    }
    fn throttled(&self) -> bool {
        self.budget_left() == Some(0)
    }
    fn below_reservation(&self) -> bool {
        self.params.reserve_pct > 0 && self.used < PERIOD * u64::from(self.params.reserve_pct) / 100
    }
}

#[derive(Debug, Default)]
struct Queue {
    /// Runnable vCPUs (not running), by virtual time.
    ready: BTreeSet<(u64, VcpuId)>,
    running: Option<VcpuId>,
    /// The running vCPU was picked alone, with [`ALONE_SLICE`]: a wake-up here kicks it.
    alone: bool,
}

/// What a CPU is to do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The vCPU to run, or None to idle (halt until a wake-up or `until`).
    pub run: Option<VcpuId>,
    /// How long (the preemption timer), or, idle, when to ask again (a throttled domain's
    /// period ends).
    pub slice: Ns,
}

/// Why a vCPU stopped running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// Its slice ended or it yielded: still runnable.
    Preempted,
    /// It halted or waits for I/O.
    Blocked,
}

/// The whole policy state.
#[derive(Debug)]
pub struct Scheduler {
    queues: Vec<Queue>,
    vcpus: Vec<Vcpu>,
    /// Domain ids to their index in `doms`.
    ids: BTreeMap<DomId, usize>,
    /// The domains, by index: vCPUs reach theirs without a map lookup on the decision path.
    /// A removed domain's entry stays (cleared), so indices never change.
    doms: Vec<Domain>,
    /// Whether any domain has a reservation (else a queue's first eligible vCPU is its best).
    any_reserved: bool,
    /// The earliest end of any domain's accounting period: until then no period rolls.
    next_roll: Ns,
    /// The virtual clock never goes back (a machine that went idle keeps its time).
    floor: u64,
    /// Sums over runnable vCPUs (waiting or running) of weight and of weight × virtual
    /// time: their weighted average is the machine's virtual time, which lags are taken from.
    sum_w: u128,
    sum_wv: u128,
    /// CPUs whose running vCPU was picked alone ([`ALONE_SLICE`]).
    alone: usize,
}

impl Scheduler {
    /// A scheduler for `cpus` CPUs (1..=64).
    pub fn new(cpus: usize) -> Scheduler {
        assert!((1..=MAX_CPUS).contains(&cpus));
        Scheduler {
            queues: (0..cpus).map(|_| Queue::default()).collect(),
            vcpus: Vec::new(),
            ids: BTreeMap::new(),
            doms: Vec::new(),
            any_reserved: false,
            next_roll: 0,
            floor: 0,
            sum_w: 0,
            sum_wv: 0,
            alone: 0,
        }
    }

    pub fn cpus(&self) -> usize {
        self.queues.len()
    }

    fn all_cpus(&self) -> u64 {
        if self.cpus() == 64 {
            u64::MAX
        } else {
            (1u64 << self.cpus()) - 1
        }
    }

    /// Checks `p` for a domain of `vcpus` vCPUs against the other domains' reservations.
    fn check(&self, dom: Option<DomId>, p: &Params, vcpus: usize) -> Result<(), ParamError> {
        if !(1..=65535).contains(&p.weight) {
            return Err(ParamError::Weight(p.weight));
        }
        if let Some(c) = p.cap_pct
            && c == 0
        {
            return Err(ParamError::Cap(c));
        }
        let usable = 100 * vcpus.clamp(1, self.cpus()) as u32;
        let most = p.cap_pct.map_or(usable, |c| c.min(usable));
        if p.reserve_pct > most {
            return Err(ParamError::Reservation {
                reserve: p.reserve_pct,
                most,
            });
        }
        let others: u32 = self
            .ids
            .iter()
            .filter(|(id, _)| Some(**id) != dom)
            .map(|(_, &i)| self.doms[i].params.reserve_pct)
            .sum();
        let machine = 100 * self.cpus() as u32;
        if others + p.reserve_pct > machine {
            return Err(ParamError::Admission {
                asked: p.reserve_pct,
                free: machine.saturating_sub(others),
            });
        }
        Ok(())
    }

    /// Whether a new domain of `vcpus` vCPUs with `p` would be admitted (what
    /// [`add_domain`](Self::add_domain) would refuse, checked before anything is built).
    pub fn admits(&self, p: &Params, vcpus: usize) -> Result<(), ParamError> {
        self.check(None, p, vcpus)
    }

    /// Adds a domain (no vCPUs yet).
    pub fn add_domain(&mut self, id: DomId, p: Params) -> Result<(), ParamError> {
        self.add_domain_for(id, p, 1)
    }

    /// Adds a domain that will have `vcpus` vCPUs (what its reservation may use).
    pub fn add_domain_for(&mut self, id: DomId, p: Params, vcpus: usize) -> Result<(), ParamError> {
        if self.ids.contains_key(&id) {
            return Err(ParamError::DomainExists(id));
        }
        self.check(None, &p, vcpus)?;
        self.ids.insert(id, self.doms.len());
        self.doms.push(Domain {
            gone: false,
            params: p,
            vcpus: Vec::new(),
            used: 0,
            granted: 0,
            period_start: 0,
            total: 0,
        });
        self.settings_changed();
        Ok(())
    }

    /// Changes a domain's weight, cap or reservation; refused values change nothing.
    pub fn set_params(&mut self, id: DomId, p: Params) -> Result<(), ParamError> {
        let i = *self.ids.get(&id).ok_or(ParamError::NoSuchDomain(id))?;
        self.check(Some(id), &p, self.doms[i].vcpus.len())?;
        self.doms[i].params = p;
        self.settings_changed();
        self.recount(i);
        Ok(())
    }

    /// After a domain came, went or changed its settings: look at every period again.
    fn settings_changed(&mut self) {
        self.any_reserved = self
            .doms
            .iter()
            .any(|d| !d.gone && d.params.reserve_pct > 0);
        self.next_roll = 0;
    }

    /// Counts `v` in the runnable average (it became runnable).
    fn count_in(&mut self, v: VcpuId) {
        if self.vcpus[v].counted == 0 {
            let w = self.weight_of(&self.vcpus[v]);
            let x = &mut self.vcpus[v];
            x.counted = w;
            self.sum_w += u128::from(w);
            self.sum_wv += u128::from(w) * u128::from(x.vruntime);
        }
    }

    /// Takes `v` out of the runnable average (it blocked or left).
    fn count_out(&mut self, v: VcpuId) {
        let x = &mut self.vcpus[v];
        let w = core::mem::take(&mut x.counted);
        self.sum_w -= u128::from(w);
        self.sum_wv -= u128::from(w) * u128::from(x.vruntime);
    }

    /// Sets `v`'s virtual time, keeping the average in step.
    fn set_vruntime(&mut self, v: VcpuId, vr: u64) {
        let x = &mut self.vcpus[v];
        let w = u128::from(x.counted);
        self.sum_wv = self.sum_wv - w * u128::from(x.vruntime) + w * u128::from(vr);
        x.vruntime = vr;
    }

    /// A domain's weight or vCPU count changed: count its runnable vCPUs again.
    fn recount(&mut self, slot: usize) {
        for i in 0..self.doms[slot].vcpus.len() {
            let v = self.doms[slot].vcpus[i];
            if self.vcpus[v].counted != 0 {
                self.count_out(v);
                self.count_in(v);
            }
        }
    }

    /// The weighted average virtual time of the runnable vCPUs (None when there are none).
    fn average(&self) -> Option<u64> {
        (self.sum_w != 0).then(|| (self.sum_wv / self.sum_w) as u64)
    }

    fn domain(&self, id: DomId) -> Option<&Domain> {
        self.ids.get(&id).map(|&i| &self.doms[i])
    }

    /// The domain of vCPU `v`.
    fn dom_of(&self, v: VcpuId) -> &Domain {
        &self.doms[self.vcpus[v].slot]
    }

    pub fn params(&self, id: DomId) -> Option<Params> {
        self.domain(id).map(|d| d.params)
    }

    /// CPU time a domain has used in all.
    pub fn domain_time(&self, id: DomId) -> Ns {
        self.domain(id).map_or(0, |d| d.total)
    }

    /// A new vCPU of `dom`, runnable at once, allowed on the CPUs in `affinity`; placed on the
    /// least loaded of them.
    pub fn add_vcpu(&mut self, dom: DomId, affinity: u64, now: Ns) -> Result<VcpuId, ParamError> {
        self.add_vcpu_at(dom, affinity, None, now)
    }

    /// As [`add_vcpu`](Self::add_vcpu), placed on `cpu` first when given and allowed.
    pub fn add_vcpu_at(
        &mut self,
        dom: DomId,
        affinity: u64,
        cpu: Option<CpuId>,
        now: Ns,
    ) -> Result<VcpuId, ParamError> {
        let affinity = affinity & self.all_cpus();
        if affinity == 0 {
            return Err(ParamError::Affinity(affinity));
        }
        let Some(&slot) = self.ids.get(&dom) else {
            return Err(ParamError::NoSuchDomain(dom));
        };
        let cpu = match cpu {
            Some(c) if c < MAX_CPUS && affinity & (1 << c) != 0 => c,
            _ => self.least_loaded(affinity),
        };
        let id = self.vcpus.len();
        let start = self.clock();
        self.vcpus.push(Vcpu {
            slot,
            cpu,
            affinity,
            vruntime: start,
            counted: 0,
            state: State::Runnable,
            since: now,
            ran: 0,
            granted: 0,
            removed: false,
        });
        self.queues[cpu].ready.insert((start, id));
        self.doms[slot].vcpus.push(id);
        // Its domain's vCPUs now share its weight with one more.
        self.recount(slot);
        self.count_in(id);
        Ok(id)
    }

    /// Takes a vCPU out for good (its domain ended). A running vCPU must be stopped first.
    pub fn remove_vcpu(&mut self, v: VcpuId) {
        let Some(x) = self.vcpus.get(v) else { return };
        if x.removed {
            return;
        }
        let (cpu, vr, state, slot) = (x.cpu, x.vruntime, x.state, x.slot);
        self.queues[cpu].ready.remove(&(vr, v));
        if let State::Running(c) = state
            && self.queues[c].running == Some(v)
        {
            self.queues[c].running = None;
        }
        self.count_out(v);
        self.vcpus[v].removed = true;
        self.vcpus[v].state = State::Blocked;
        self.doms[slot].vcpus.retain(|&x| x != v);
        self.recount(slot);
    }

    pub fn remove_domain(&mut self, id: DomId) {
        let Some(i) = self.ids.remove(&id) else {
            return;
        };
        for v in core::mem::take(&mut self.doms[i].vcpus) {
            self.remove_vcpu(v);
        }
        let d = &mut self.doms[i];
        d.gone = true;
        d.params = Params::default();
        self.settings_changed();
    }

    fn load(&self, cpu: CpuId) -> usize {
        self.queues[cpu].ready.len() + usize::from(self.queues[cpu].running.is_some())
    }

    fn least_loaded(&self, affinity: u64) -> CpuId {
        (0..self.cpus())
            .filter(|c| affinity & (1 << c) != 0)
            .min_by_key(|&c| self.load(c))
            .unwrap_or(0)
    }

    fn weight_of(&self, v: &Vcpu) -> u64 {
        let d = &self.doms[v.slot];
        (u64::from(d.params.weight) * WEIGHT_UNIT / d.vcpus.len().max(1) as u64).max(1)
    }

    /// Starts a new accounting period for domains whose period ended. A capped domain's
    /// overrun (a slice ends a little after its budget ran out: the exit and the decision are
    /// charged too) is carried into the next periods as debt, so over time it never gets more
    /// than its cap.
    fn roll_periods(&mut self, now: Ns) {
        if now < self.next_roll {
            return;
        }
        let mut next = Ns::MAX;
        for d in self.doms.iter_mut().filter(|d| !d.gone) {
            if now >= d.period_start + PERIOD {
                // Usually exactly one period ended: no division on the common path.
                let periods = if now < d.period_start + 2 * PERIOD {
                    1
                } else {
                    (now - d.period_start) / PERIOD
                };
                d.period_start += periods * PERIOD;
                d.used = match d.budget() {
                    Some(b) => d.used.saturating_sub(b.saturating_mul(periods)),
                    None => 0,
                };
            }
            next = next.min(d.period_start + PERIOD);
        }
        self.next_roll = next;
    }

    /// Charges the running vCPU of `cpu` up to `now`.
    fn charge(&mut self, cpu: CpuId, now: Ns) {
        let Some(v) = self.queues[cpu].running else {
            return;
        };
        let ran = now.saturating_sub(self.vcpus[v].since);
        self.vcpus[v].since = now;
        self.vcpus[v].ran += ran;
        let w = self.weight_of(&self.vcpus[v]);
        let vr = self.vcpus[v].vruntime + ran * WEIGHT_UNIT / w;
        self.set_vruntime(v, vr);
        let granted = core::mem::take(&mut self.vcpus[v].granted);
        let d = &mut self.doms[self.vcpus[v].slot];
        d.used += ran;
        d.total += ran;
        d.granted = d.granted.saturating_sub(granted);
    }

    /// The vCPU running on `cpu` stops at `now`.
    pub fn stop(&mut self, cpu: CpuId, now: Ns, why: Stop) {
        self.roll_periods(now);
        self.charge(cpu, now);
        if core::mem::take(&mut self.queues[cpu].alone) {
            self.alone -= 1;
        }
        let Some(v) = self.queues[cpu].running.take() else {
            return;
        };
        // Its lag (how far its virtual time is from the machine's, in its own real time) is
        // kept within one longest slice either way. Competing fairly it stays within a slice
        // of the average; beyond that it got time nothing else could use (it ran alone on
        // its CPU, or its queue's rivals could not use more), which is neither held against
        // it nor banked: either would let it, or its rivals, take a CPU for seconds when they
        // meet.
        if let Some(avg) = self.average() {
            let w = self.weight_of(&self.vcpus[v]);
            let most = MAX_SLICE * WEIGHT_UNIT / w;
            let vr = self.vcpus[v]
                .vruntime
                .clamp(avg.saturating_sub(most), avg.saturating_add(most));
            self.set_vruntime(v, vr);
        }
        let x = &mut self.vcpus[v];
        match why {
            Stop::Preempted => {
                x.state = State::Runnable;
                let key = (x.vruntime, v);
                // Its affinity may have changed while it ran.
                let to = if x.affinity & (1 << cpu) != 0 {
                    cpu
                } else {
                    let a = x.affinity;
                    self.least_loaded(a)
                };
                self.vcpus[v].cpu = to;
                self.queues[to].ready.insert(key);
            }
            Stop::Blocked => {
                x.state = State::Blocked;
                self.count_out(v);
            }
        }
    }

    /// `v` wakes at `now` (an interrupt, its timer, an event). Returns the CPU to kick when it
    /// should preempt what runs there or the CPU is idle.
    pub fn wake(&mut self, v: VcpuId, now: Ns) -> Option<CpuId> {
        self.wake_from(v, now, None)
    }

    /// [`wake`](Self::wake) by a CPU that is between two vCPUs (`deciding`: nothing runs there
    /// and it picks next). A sleeper whose last CPU is busy goes there when its affinity
    /// allows it: it runs at once, with no kick and no wait for the busy CPU's exit. Returns
    /// the CPU to kick, never `deciding` itself.
    pub fn wake_from(&mut self, v: VcpuId, now: Ns, deciding: Option<CpuId>) -> Option<CpuId> {
        if self
            .vcpus
            .get(v)
            .is_none_or(|x| x.removed || x.state != State::Blocked)
        {
            return None;
        }
        let affinity = self.vcpus[v].affinity;
        // Back where it ran last (its caches, and no VMCS move) unless another allowed CPU is
        // less loaded, or that CPU is busy and a free one is deciding now.
        let prev = self.vcpus[v].cpu;
        let least = self.least_loaded(affinity);
        let free_here = deciding.filter(|&d| {
            d != prev
                && affinity & (1 << d) != 0
                && self.queues[d].running.is_none()
                && self.queues[prev].running.is_some()
        });
        let cpu = if let Some(d) = free_here {
            d
        } else if affinity & (1 << prev) != 0 && self.load(prev) <= self.load(least) {
            prev
        } else {
            least
        };
        let floor = self.clock().saturating_sub(virt(WAKE_CREDIT));
        let x = &mut self.vcpus[v];
        // Sleep earns at most WAKE_CREDIT of virtual time: a boost, never a hoard.
        x.vruntime = x.vruntime.max(floor);
        x.state = State::Runnable;
        x.cpu = cpu;
        self.queues[cpu].ready.insert((x.vruntime, v));
        self.count_in(v);
        // What runs there is compared as of now, not as of its slice's start.
        self.charge(cpu, now);
        match self.queues[cpu].running {
            None if deciding == Some(cpu) => None,
            None => Some(cpu),
            // It runs alone on a long slice: it decides again now, with a rival.
            Some(_) if self.queues[cpu].alone => Some(cpu),
            // Preempt when the sleeper is clearly behind: a vCPU that slept long enough to be
            // placed at the credit's limit always is, one that just blocked briefly is not.
            Some(r) if self.vcpus[r].vruntime > self.vcpus[v].vruntime + virt(WAKE_CREDIT) / 2 => {
                Some(cpu)
            }
            Some(_) => None,
        }
    }

    fn eligible(&self, v: VcpuId) -> bool {
        !self.dom_of(v).throttled()
    }

    /// The best eligible vCPU in `cpu`'s queue: below-reservation domains first, then least
    /// virtual time. Throttled domains are skipped.
    fn best_in(&self, cpu: CpuId) -> Option<VcpuId> {
        let mut first = None;
        for &(_, v) in &self.queues[cpu].ready {
            if !self.eligible(v) {
                continue;
            }
            if self.dom_of(v).below_reservation() {
                return Some(v);
            }
            if first.is_none() {
                first = Some(v);
                // A reserved domain further down still goes first; look a little further.
                if !self.any_reserved {
                    break;
                }
            }
        }
        first
    }

    /// The first eligible vCPU waiting on `queue` that may run on `cpu` (a bounded look: the
    /// first few in virtual-time order).
    fn first_for(&self, queue: CpuId, cpu: CpuId) -> Option<VcpuId> {
        self.queues[queue]
            .ready
            .iter()
            .take(8)
            .map(|&(_, v)| v)
            .find(|&v| self.vcpus[v].affinity & (1 << cpu) != 0 && self.eligible(v))
    }

    /// Moves a waiting vCPU between queues (virtual time is one clock for all queues).
    fn move_ready(&mut self, from: CpuId, to: CpuId, v: VcpuId) {
        let key = (self.vcpus[v].vruntime, v);
        if self.queues[from].ready.remove(&key) {
            self.vcpus[v].cpu = to;
            self.queues[to].ready.insert(key);
        }
    }

    /// The least virtual time of any vCPU waiting or running (where new and waking vCPUs
    /// start, so that none starts far ahead or behind).
    fn clock(&self) -> u64 {
        let mut m = u64::MAX;
        for q in &self.queues {
            if let Some(&(vr, _)) = q.ready.first() {
                m = m.min(vr);
            }
            if let Some(r) = q.running {
                m = m.min(self.vcpus[r].vruntime);
            }
        }
        if m == u64::MAX {
            self.floor
        } else {
            m.max(self.floor)
        }
    }

    /// What `cpu` runs next, from `now` (call after `stop`, or when idle).
    pub fn pick(&mut self, cpu: CpuId, now: Ns) -> Decision {
        self.roll_periods(now);
        if self.queues[cpu].running.is_some() {
            // Still running (the caller did not `stop` it): keep it for another slice.
            return Decision {
                run: self.queues[cpu].running,
                slice: self.slice(cpu),
            };
        }
        // The eligible vCPU with the least virtual time that may run here: this queue's best,
        // or a better one waiting on another queue (one global virtual clock makes them
        // comparable), which then moves here. Own queue wins ties within a minimum slice of
        // virtual time, to keep vCPUs where their caches are.
        let own = self.best_in(cpu);
        let own_vr = own.map(|v| self.vcpus[v].vruntime);
        let mut better: Option<(u64, CpuId, VcpuId)> = None;
        if own.is_none_or(|v| !self.dom_of(v).below_reservation()) {
            for c in (0..self.cpus()).filter(|&c| c != cpu) {
                if let Some(v) = self.first_for(c, cpu) {
                    let vr = self.vcpus[v].vruntime;
                    let reserved = self.dom_of(v).below_reservation();
                    let beats = match own_vr {
                        None => true,
                        Some(o) => reserved || vr + virt(MIN_SLICE) < o,
                    };
                    if beats && better.is_none_or(|(b, _, _)| vr < b) {
                        better = Some((vr, c, v));
                    }
                }
            }
        }
        let choice = match better {
            Some((_, from, v)) => {
                self.move_ready(from, cpu, v);
                Some(v)
            }
            None => own,
        };
        let Some(v) = choice else {
            // Idle; ask again when the next throttled period ends.
            let next = self
                .doms
                .iter()
                .filter(|d| d.throttled())
                .map(|d| d.period_start + PERIOD)
                .min()
                .map_or(MAX_SLICE, |t| t.saturating_sub(now).max(1));
            return Decision {
                run: None,
                slice: next,
            };
        };
        let key = (self.vcpus[v].vruntime, v);
        self.queues[cpu].ready.remove(&key);
        self.floor = self.floor.max(self.clock().min(key.0));
        let q = &mut self.queues[cpu];
        q.running = Some(v);
        let x = &mut self.vcpus[v];
        x.state = State::Running(cpu);
        x.since = now;
        let mut slice = self.slice(cpu);
        let slot = self.vcpus[v].slot;
        let d = &self.doms[slot];
        let alone = d.params.cap_pct.is_none()
            && d.params.reserve_pct == 0
            && self.queues[cpu].ready.is_empty()
            && self.queues.iter().all(|q| q.ready.is_empty());
        if alone {
            slice = ALONE_SLICE;
        }
        // A capped domain runs no further than what is left of its budget.
        if let Some(left) = d.budget_left() {
            slice = slice.min(left.max(1));
        }
        // Nor past the end of its period (so budgets and reservations roll on time), unless
        // it has neither and nothing else is ready here.
        if !alone {
            slice = slice.min((d.period_start + PERIOD).saturating_sub(now).max(MIN_SLICE));
        }
        self.queues[cpu].alone = alone;
        self.alone += usize::from(alone);
        self.vcpus[v].granted = slice;
        self.doms[slot].granted += slice;
        Decision {
            run: Some(v),
            slice,
        }
    }

    /// The CPUs to kick because a vCPU waits somewhere while they run a vCPU picked alone
    /// (on [`ALONE_SLICE`]): each decides again (it may take the waiting vCPU, or share its
    /// CPU with it), as it would have at its next ordinary slice end. A bit mask; each CPU is
    /// given once. Cheap while no CPU runs alone.
    pub fn alone_kicks(&mut self) -> u64 {
        if self.alone == 0 || self.queues.iter().all(|q| q.ready.is_empty()) {
            return 0;
        }
        let mut mask = 0;
        for (c, q) in self.queues.iter_mut().enumerate() {
            if core::mem::take(&mut q.alone) {
                mask |= 1 << c;
            }
        }
        self.alone = 0;
        mask
    }

    /// Takes a waiting vCPU off its queue without it having run (a vCPU not yet started, or
    /// of a paused domain): blocked until [`wake`](Self::wake). A running vCPU is stopped with
    /// [`stop`](Self::stop) instead; this does nothing to it.
    pub fn park(&mut self, v: VcpuId) {
        let Some(x) = self.vcpus.get(v) else { return };
        if x.removed || x.state != State::Runnable {
            return;
        }
        let key = (x.vruntime, v);
        self.queues[x.cpu].ready.remove(&key);
        self.vcpus[v].state = State::Blocked;
        self.count_out(v);
    }

    /// Allows `v` only on the CPUs in `mask`; a waiting vCPU on a CPU now disallowed moves to
    /// the least loaded allowed one, a running one when it next stops.
    pub fn set_affinity(&mut self, v: VcpuId, mask: u64) -> Result<(), ParamError> {
        let mask_here = mask & self.all_cpus();
        if mask_here == 0 {
            return Err(ParamError::Affinity(mask));
        }
        let Some(x) = self.vcpus.get(v).filter(|x| !x.removed) else {
            return Ok(());
        };
        let (cpu, state) = (x.cpu, x.state);
        self.vcpus[v].affinity = mask_here;
        if state == State::Runnable && mask_here & (1 << cpu) == 0 {
            let to = self.least_loaded(mask_here);
            self.move_ready(cpu, to, v);
        } else if state == State::Blocked && mask_here & (1 << cpu) == 0 {
            self.vcpus[v].cpu = self.least_loaded(mask_here);
        }
        Ok(())
    }

    /// The CPUs `v` may run on.
    pub fn affinity(&self, v: VcpuId) -> u64 {
        self.vcpus[v].affinity
    }

    /// The vCPUs of a domain.
    pub fn domain_vcpus(&self, id: DomId) -> &[VcpuId] {
        self.domain(id).map_or(&[], |d| &d.vcpus)
    }

    /// The domains, in id order.
    pub fn domain_ids(&self) -> impl Iterator<Item = DomId> + '_ {
        self.ids.keys().copied()
    }

    /// How many vCPUs wait on `cpu`'s queue, and whether one runs there.
    pub fn queue(&self, cpu: CpuId) -> (usize, Option<VcpuId>) {
        (self.queues[cpu].ready.len(), self.queues[cpu].running)
    }

    /// The slice on `cpu`: the target latency shared by its runnable vCPUs, within bounds.
    pub fn slice(&self, cpu: CpuId) -> Ns {
        let n = self.load(cpu).max(1) as u64;
        (TARGET_LATENCY / n).clamp(MIN_SLICE, MAX_SLICE)
    }

    /// Where `v` is queued or runs.
    pub fn cpu_of(&self, v: VcpuId) -> CpuId {
        self.vcpus[v].cpu
    }

    pub fn is_blocked(&self, v: VcpuId) -> bool {
        self.vcpus[v].state == State::Blocked
    }

    /// The vCPU running on `cpu`.
    pub fn running(&self, cpu: CpuId) -> Option<VcpuId> {
        self.queues[cpu].running
    }

    /// Time `v` has run in all.
    pub fn vcpu_time(&self, v: VcpuId) -> Ns {
        self.vcpus[v].ran
    }
}

/// What each domain is entitled to, in CPUs, when all its vCPUs are runnable: weights share
/// the machine, each domain gets at most its vCPU count and its cap, reservations come first,
/// and what a capped or small domain cannot use goes to the others in proportion (water
/// filling). `(weight, vcpus, cap in CPUs, reserve in CPUs)` per domain.
pub fn entitlements(cpus: f64, doms: &[(f64, usize, Option<f64>, f64)]) -> Vec<f64> {
    let most: Vec<f64> = doms
        .iter()
        .map(|&(_, n, cap, _)| cap.map_or(n as f64, |c| c.min(n as f64)).min(cpus))
        .collect();
    let mut share: Vec<f64> = doms.iter().map(|&(_, _, _, r)| r).collect();
    let mut left = cpus - share.iter().sum::<f64>();
    let mut open: Vec<bool> = (0..doms.len()).map(|i| share[i] < most[i]).collect();
    for _ in 0..doms.len() + 1 {
        let w: f64 = (0..doms.len())
            .filter(|&i| open[i])
            .map(|i| doms[i].0)
            .sum();
        if left <= 1e-12 || w <= 0.0 {
            break;
        }
        let mut used = 0.0;
        for i in 0..doms.len() {
            if !open[i] {
                continue;
            }
            let add = (left * doms[i].0 / w).min(most[i] - share[i]);
            share[i] += add;
            used += add;
            if most[i] - share[i] <= 1e-12 {
                open[i] = false;
            }
        }
        left -= used;
    }
    share
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_and_bad_values_change_nothing() {
        let mut s = Scheduler::new(2);
        s.add_domain(
            1,
            Params {
                reserve_pct: 150,
                cap_pct: None,
                weight: 256,
            },
        )
        .unwrap_err();
        // A one-vCPU domain cannot use 150 %.
        assert!(matches!(
            s.add_domain(
                1,
                Params {
                    reserve_pct: 150,
                    ..Params::default()
                }
            ),
            Err(ParamError::Reservation { .. })
        ));
        s.add_domain(
            1,
            Params {
                reserve_pct: 100,
                ..Params::default()
            },
        )
        .unwrap();
        s.add_domain(
            2,
            Params {
                reserve_pct: 80,
                ..Params::default()
            },
        )
        .unwrap();
        let e = s
            .add_domain(
                3,
                Params {
                    reserve_pct: 30,
                    ..Params::default()
                },
            )
            .unwrap_err();
        assert_eq!(
            e,
            ParamError::Admission {
                asked: 30,
                free: 20
            }
        );
        assert!(format!("{e}").contains("only 20%"));
        assert!(s.params(3).is_none(), "a refused domain is not added");
        assert_eq!(
            s.set_params(
                2,
                Params {
                    weight: 0,
                    ..Params::default()
                }
            ),
            Err(ParamError::Weight(0))
        );
        assert_eq!(s.params(2).unwrap().reserve_pct, 80, "refused: unchanged");
        assert!(
            s.set_params(
                2,
                Params {
                    cap_pct: Some(50),
                    reserve_pct: 60,
                    weight: 1
                }
            )
            .is_err()
        );
        assert_eq!(s.add_vcpu(1, 0b100, 0), Err(ParamError::Affinity(0)));
        assert_eq!(
            s.add_domain(1, Params::default()),
            Err(ParamError::DomainExists(1))
        );
    }

    #[test]
    fn a_vcpu_alone_gets_a_long_slice_until_another_waits() {
        let mut s = Scheduler::new(2);
        s.add_domain(1, Params::default()).unwrap();
        s.add_domain(2, Params::default()).unwrap();
        let a = s.add_vcpu(1, 0b01, 0).unwrap();
        let b = s.add_vcpu(2, 0b01, 0).unwrap();
        s.park(b);
        // Nothing else waits anywhere: a long slice, and nobody to kick.
        let d = s.pick(0, 0);
        assert_eq!((d.run, d.slice), (Some(a), ALONE_SLICE));
        assert_eq!(s.alone_kicks(), 0);
        // A vCPU waking onto its CPU kicks it, even one not far behind, and it then shares.
        assert_eq!(s.wake(b, MS), Some(0));
        s.stop(0, MS, Stop::Preempted);
        let d = s.pick(0, MS);
        assert!(d.slice <= TARGET_LATENCY, "{d:?}");
        s.stop(0, 2 * MS, Stop::Blocked);
        // Alone again on CPU 0; then a vCPU waits on CPU 1's queue (CPU 1 has not picked
        // yet): CPU 0 is kicked once, so that it decides again (and may take it).
        let d = s.pick(0, 2 * MS);
        assert_eq!(d.slice, ALONE_SLICE);
        let c = s.add_vcpu(2, 0b10, 2 * MS).unwrap();
        assert_eq!(s.cpu_of(c), 1);
        assert_eq!(s.alone_kicks(), 0b01);
        assert_eq!(s.alone_kicks(), 0, "each CPU is kicked once");
        // A capped domain alone keeps ordinary slices (its budget must be enforced).
        let mut s = Scheduler::new(1);
        s.add_domain(
            3,
            Params {
                cap_pct: Some(50),
                ..Params::default()
            },
        )
        .unwrap();
        s.add_vcpu(3, 0b1, 0).unwrap();
        let d = s.pick(0, 0);
        assert!(d.slice <= PERIOD, "{d:?}");
    }

    #[test]
    fn parked_vcpus_wait_for_a_wake_and_go_back_where_they_ran() {
        let mut s = Scheduler::new(2);
        s.add_domain(1, Params::default()).unwrap();
        let a = s.add_vcpu(1, 0b11, 0).unwrap();
        let b = s.add_vcpu(1, 0b11, 0).unwrap();
        assert_eq!((s.cpu_of(a), s.cpu_of(b)), (0, 1));
        s.park(b);
        assert!(s.is_blocked(b));
        assert_eq!(s.pick(0, 0).run, Some(a));
        assert_eq!(s.pick(1, 0).run, None, "a parked vCPU is not picked");
        assert_eq!(
            s.wake(b, 10),
            Some(1),
            "woken where it was: that CPU is idle"
        );
        assert_eq!(s.pick(1, 10).run, Some(b));
        // A running vCPU is not parked (it is stopped instead).
        s.park(b);
        assert_eq!(s.running(1), Some(b));
        s.stop(1, 20, Stop::Blocked);
        // Both CPUs equally loaded (a runs on 0): it wakes on the CPU it ran on.
        s.wake(b, 30);
        assert_eq!(s.cpu_of(b), 1);
    }

    #[test]
    fn a_deciding_cpu_takes_a_sleeper_whose_cpu_is_busy_and_is_not_kicked() {
        let mut s = Scheduler::new(2);
        s.add_domain(1, Params::default()).unwrap();
        s.add_domain(2, Params::default()).unwrap();
        let t = s.add_vcpu(1, 0b11, 0).unwrap();
        let h0 = s.add_vcpu(2, 0b11, 0).unwrap();
        let h1 = s.add_vcpu(2, 0b11, 0).unwrap();
        // The sleeper ran on CPU 0 and blocked there.
        assert_eq!(s.cpu_of(t), 0);
        assert_eq!(s.pick(0, 0).run, Some(t));
        s.stop(0, MS, Stop::Blocked);
        let first = s.pick(0, MS).run.unwrap();
        let second = s.pick(1, MS).run.unwrap();
        assert_eq!([first, second].map(|v| v == h0 || v == h1), [true, true]);
        // CPU 1's slice ends; it wakes the sleeper due on busy CPU 0 and takes it itself.
        s.stop(1, 5 * MS, Stop::Preempted);
        assert_eq!(
            s.wake_from(t, 5 * MS, Some(1)),
            None,
            "no kick for the decider"
        );
        assert_eq!(s.cpu_of(t), 1);
        assert_eq!(s.pick(1, 5 * MS).run, Some(t));
        // Deciding where it ran last: it stays there, and there is no kick either.
        s.stop(1, 6 * MS, Stop::Blocked);
        assert_eq!(s.wake_from(t, 7 * MS, Some(1)), None);
        assert_eq!(s.cpu_of(t), 1);
        // Not allowed on the deciding CPU: it goes where it may run, and that CPU is kicked
        // when the sleeper should preempt.
        assert_eq!(s.pick(1, 7 * MS).run, Some(t));
        s.stop(1, 8 * MS, Stop::Blocked);
        s.set_affinity(t, 0b01).unwrap();
        let k = s.wake_from(t, 30 * MS, Some(1));
        assert_eq!(s.cpu_of(t), 0);
        assert_eq!(k, Some(0), "it slept long: it preempts the hog on CPU 0");
    }

    #[test]
    fn affinity_changes_move_waiting_and_stopping_vcpus() {
        let mut s = Scheduler::new(2);
        s.add_domain(1, Params::default()).unwrap();
        let a = s.add_vcpu(1, 0b01, 0).unwrap();
        let b = s.add_vcpu(1, 0b01, 0).unwrap();
        assert_eq!(s.cpu_of(b), 0);
        assert_eq!(s.set_affinity(b, 0b100), Err(ParamError::Affinity(0b100)));
        assert_eq!(s.affinity(b), 0b01, "refused: unchanged");
        s.set_affinity(b, 0b10).unwrap();
        assert_eq!(s.cpu_of(b), 1, "a waiting vCPU moves at once");
        assert_eq!(s.pick(0, 0).run, Some(a));
        s.set_affinity(a, 0b10).unwrap();
        assert_eq!(s.running(0), Some(a), "a running one finishes its slice");
        s.stop(0, 5, Stop::Preempted);
        assert_eq!(s.cpu_of(a), 1, "and moves when it stops");
        assert_eq!(s.pick(0, 5).run, None, "nothing allowed on CPU 0 any more");
        assert_eq!(s.domain_vcpus(1), [a, b]);
        assert_eq!(s.queue(1), (2, None));
        assert_eq!(s.domain_ids().collect::<Vec<_>>(), [1]);
    }

    #[test]
    fn water_filling() {
        // 1:2:4 on 2 CPUs, one vCPU each: the weight-4 domain is held to 1 CPU.
        let e = entitlements(
            2.0,
            &[
                (1.0, 1, None, 0.0),
                (2.0, 1, None, 0.0),
                (4.0, 1, None, 0.0),
            ],
        );
        assert!(
            (e[0] - 1.0 / 3.0).abs() < 1e-9
                && (e[1] - 2.0 / 3.0).abs() < 1e-9
                && (e[2] - 1.0).abs() < 1e-9,
            "{e:?}"
        );
        // A cap's leftover goes to the others.
        let e = entitlements(1.0, &[(1.0, 1, Some(0.25), 0.0), (1.0, 1, None, 0.0)]);
        assert!((e[0] - 0.25).abs() < 1e-9 && (e[1] - 0.75).abs() < 1e-9);
    }
}
