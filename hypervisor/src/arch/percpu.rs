//! Per-CPU records: what every CPU is doing, readable by the console from any CPU.
//!
//! A record is indexed by the CPU's position in the ACPI MADT (the BSP is 0); each CPU keeps its
//! index in IA32_GS_BASE. Fields are atomics or locks so the console can read them while the
//! CPU runs.

use core::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// Most CPUs the hypervisor drives; more in the MADT are reported and left parked.
pub const MAX_CPUS: usize = 64;

/// Where a CPU is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum CpuState {
    Absent = 0,
    Starting = 1,
    Online = 2,
    /// Did not answer INIT-SIPI-SIPI in time.
    NoResponse = 3,
    /// Stopped after a fault it reported.
    Halted = 4,
}

impl CpuState {
    fn from_u8(v: u8) -> CpuState {
        match v {
            1 => CpuState::Starting,
            2 => CpuState::Online,
            3 => CpuState::NoResponse,
            4 => CpuState::Halted,
            _ => CpuState::Absent,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CpuState::Absent => "absent",
            CpuState::Starting => "starting",
            CpuState::Online => "online",
            CpuState::NoResponse => "no-response",
            CpuState::Halted => "halted",
        }
    }
}

/// One CPU's record.
pub struct CpuRecord {
    pub apic_id: AtomicU32,
    state: AtomicU8,
    /// Local APIC timer interrupts taken.
    pub ticks: AtomicU64,
    /// The domain whose vCPU this CPU is running now (0: none), for kicks.
    pub running_domain: AtomicU32,
    /// What the run loop must look at before its next VM entry ([`ATTN_RESCHED`],
    /// [`ATTN_TIMER`]); set by other CPUs and by this CPU's interrupt handlers.
    pub attention: AtomicU8,
    /// TSC ticks spent halted with nothing to run, and how many times it halted.
    pub idle_tsc: AtomicU64,
    pub halts: AtomicU64,
    /// TSC when it halted, while it is halted (0 when not): idle time not yet in `idle_tsc`.
    pub idle_since: AtomicU64,
    /// The TSC value this CPU's one-shot timer was armed for (0: not armed), and how late
    /// past it the interrupts came: the largest and the sum over `timer_fired`.
    pub timer_due: AtomicU64,
    pub timer_late_max: AtomicU64,
    pub timer_late_sum: AtomicU64,
    pub timer_fired: AtomicU64,
}

/// The scheduler put work on this CPU that should run before what runs now.
pub const ATTN_RESCHED: u8 = 1;
/// This CPU's one-shot timer fired: a sleeper may be due.
pub const ATTN_TIMER: u8 = 2;

impl CpuRecord {
    /// TSC ticks spent idle up to `now`, counting the current halt.
    pub fn idle_until(&self, now: u64) -> u64 {
        let since = self.idle_since.load(Ordering::Acquire);
        let done = self.idle_tsc.load(Ordering::Acquire);
        done + if since != 0 {
            now.saturating_sub(since)
        } else {
            0
        }
    }

    const fn new() -> Self {
        CpuRecord {
            apic_id: AtomicU32::new(0),
            state: AtomicU8::new(CpuState::Absent as u8),
            ticks: AtomicU64::new(0),
            running_domain: AtomicU32::new(0),
            attention: AtomicU8::new(0),
            idle_tsc: AtomicU64::new(0),
            halts: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            timer_due: AtomicU64::new(0),
            timer_late_max: AtomicU64::new(0),
            timer_late_sum: AtomicU64::new(0),
            timer_fired: AtomicU64::new(0),
        }
    }

    pub fn state(&self) -> CpuState {
        CpuState::from_u8(self.state.load(Ordering::Acquire))
    }

    pub fn set_state(&self, s: CpuState) {
        self.state.store(s as u8, Ordering::Release);
    }
}

#[allow(clippy::declare_interior_mutable_const)] // used only to initialise the array below
const RECORD: CpuRecord = CpuRecord::new();

/// Every CPU's record; entries past `cpu_count()` are unused.
pub static CPUS: [CpuRecord; MAX_CPUS] = [RECORD; MAX_CPUS];

static COUNT: AtomicUsize = AtomicUsize::new(1);

/// CPUs found in the MADT (and kept, at most [`MAX_CPUS`]).
pub fn cpu_count() -> usize {
    COUNT.load(Ordering::Acquire)
}

pub fn set_cpu_count(n: usize) {
    COUNT.store(n.min(MAX_CPUS), Ordering::Release);
}

/// This CPU's record.
pub fn this_cpu() -> &'static CpuRecord {
    &CPUS[crate::arch::cpu::current_cpu().min(MAX_CPUS - 1)]
}
