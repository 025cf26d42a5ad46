//! The run loop of each CPU: it asks the scheduler (`super::queue`, over `sched::policy`) for
//! a vCPU and a slice, runs it until the VMX preemption timer ends the slice, the guest halts
//! or something needs this CPU's attention, and gives it back; with nothing to run it arms its
//! one-shot LAPIC timer for its first sleeper and halts. Between entry and exit there is
//! nothing but the hand-off to the exit dispatcher (`super::dispatch`).
//!
//! vCPUs move between CPUs: every slice ends with VMCLEAR (`Vmcs::clear_for_move`), so the
//! next CPU may load the VMCS; a vCPU that arrives from another CPU gets this CPU's host state
//! written into its VMCS, its cached EPT translations dropped here (INVEPT) and its FPU state
//! loaded. Before each slice a CPU also drops its cached EPT translations when any domain's
//! EPT was freed since it last looked (`domain::table::EPT_GENERATION`).
//!
//! One exit, from the guest and back: VMCALL in the guest → VM exit to `vmx_exit_point`
//! (`vmx::hw`, registers saved into `VcpuCore::regs`) → [`Exit::capture`] reads the reason
//! and the fields it needs → the domain's counter for that reason → [`dispatch::handle`]
//! decides (here: the hypercall, RAX set, RIP stepped) → [`Action::Resume`] → the next
//! `ActiveVmcs::run` (VMRESUME).

use alloc::boxed::Box;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU16, AtomicU64, Ordering};

use crate::arch::percpu::{ATTN_RESCHED, ATTN_TIMER, CPUS};
use crate::arch::{cpu, lapic};
use crate::domain::table::{Domain, DomainMem, DomainState, EPT_GENERATION, NewDomain};
use crate::io::DomainIo;
use crate::mm::PhysMem;
use crate::println;
use crate::vcpu::dispatch::{self, Action, Platform, VcpuCore};
use crate::vcpu::exit::Exit;
use crate::vcpu::queue::{self, Back, Next, tsc_per_us};
use crate::vcpu::state::{Event, VcpuState};
use crate::vmx::caps::VmxCaps;
use crate::vmx::exit::ExitReason;
use crate::vmx::fpu::{self, FpuArea};
use crate::vmx::hw::{ActiveVmcs, FixedBits, GuestRegs, HostState, Vmcs, VmxCpu, fields as f};
use crate::vmx::setup::{GuestSetup, setup_vmcs};
use crate::vmx::spec::Mitigations;

static NEXT_VPID: AtomicU16 = AtomicU16::new(1);

/// A virtual CPU: in the scheduler's slot while it waits, owned by the run loop that runs it.
pub struct Vcpu {
    /// The scheduler's id for it.
    pub(super) sid: crate::sched::policy::VcpuId,
    /// The CPU it ran on last (its host state is in the VMCS; its FPU state may still be in
    /// that CPU's registers).
    last_cpu: Option<usize>,
    domain: Arc<Domain>,
    /// Its life cycle: vCPU 0 starts runnable, the others once VCPU_START named them.
    state: VcpuState,
    /// Registers, MSRs, timer and XCR0: what the exit dispatcher works on.
    core: VcpuCore,
    vmcs: Option<Vmcs>,
    setup: GuestSetup,
    mem: Arc<DomainMem>,
    /// Whether the VMCS has been filled.
    ready: bool,
    /// FXSAVE area of the guest's x87/SSE state, swapped when this CPU changes vCPU.
    fpu: Box<FpuArea>,
}

impl Vcpu {
    /// Moves the life cycle on; a refused change is a hypervisor bug, reported and ignored.
    fn go(&mut self, event: Event) {
        match self.state.on(event) {
            Ok(s) => self.state = s,
            Err(e) => log::error!(
                "internal: domain {} vCPU {}: {e}",
                self.domain.id,
                self.core.index
            ),
        }
    }

    /// Until when a halted vCPU still waits in HLT: `Some(Some(deadline))` until its timer's
    /// next interrupt, `Some(None)` for good (no timer: only an event ends it), `None` when
    /// its timer is due.
    fn halted_until(&self) -> Option<Option<u64>> {
        match self.core.halt_deadline() {
            Some(d) if cpu::rdtsc() >= d => None,
            d => Some(d),
        }
    }

    pub(super) fn domain_id(&self) -> u32 {
        self.domain.id
    }

    pub(super) fn index(&self) -> u32 {
        self.core.index
    }

    /// A key unique to this vCPU among all domains.
    fn key(&self) -> u64 {
        (u64::from(self.domain.id) << 32) | u64::from(self.core.index)
    }
}

/// Makes the vCPUs of a new domain and hands them to the scheduler; refused (with the reason)
/// when the scheduler does not admit the domain's settings.
pub fn spawn(new: NewDomain) -> Result<(), String> {
    let NewDomain {
        domain,
        mem,
        boot,
        eptp,
        vmcss,
        placement,
        fixed_cpu,
        sched,
    } = new;
    let mut vcpus = Vec::with_capacity(vmcss.len());
    for (index, vmcs) in vmcss.into_iter().enumerate() {
        let vpid = match NEXT_VPID.fetch_add(1, Ordering::Relaxed) {
            0 => NEXT_VPID.fetch_add(1, Ordering::Relaxed),
            v => v,
        };
        let regs = if index == 0 {
            GuestRegs {
                rdi: boot.rdi,
                rsi: boot.rsi,
                rdx: boot.rdx,
                ..Default::default()
            }
        } else {
            GuestRegs {
                rdi: index as u64,
                ..Default::default()
            }
        };
        vcpus.push(Box::new(Vcpu {
            sid: 0,
            last_cpu: None,
            domain: domain.clone(),
            state: if index == 0 {
                VcpuState::Runnable
            } else {
                VcpuState::Created
            },
            core: {
                let mut core = VcpuCore::new(index as u32, regs, fpu::XCR0_RESET);
                if domain.pc {
                    core.lapic = Some(super::pc::new_lapic(index as u32, queue::tsc_khz()));
                }
                core
            },
            vmcs: Some(vmcs),
            setup: GuestSetup {
                boot: boot.entry(),
                eptp,
                vpid,
                // Set by the CPU that fills the VMCS, from its own mitigation choice.
                rsb_fill: false,
            },
            mem: mem.clone(),
            ready: false,
            fpu: FpuArea::initial(),
        }));
    }
    queue::add(domain.id, &sched, &placement, fixed_cpu, vcpus)
}

/// Ends `d` with `why`; when it is dom0, its block ring goes too (guests' requests in flight
/// fail with I/O errors).
fn end_domain(d: &Domain, why: String) {
    if d.state() != DomainState::Stopped && super::attach::is_attached(d.id) {
        super::attach::detach();
        println!("\nconsole: domain {} has ended; detached", d.id);
    }
    let dom0 = d.privileged;
    let note = if dom0 { why.clone() } else { String::new() };
    if d.finish(why) && dom0 {
        super::dom0::gone(&note);
    }
}

/// The stop reason of a domain the operator destroyed, with how long its vCPU took to stop.
fn destroyed(d: &Domain) -> String {
    match since_request(d) {
        Some(us) => alloc::format!("destroyed by the operator ({us} µs after the request)"),
        None => String::from("destroyed by the operator"),
    }
}

/// Microseconds since the operator's last request to this domain.
fn since_request(d: &Domain) -> Option<u64> {
    let asked = d.request_tsc.load(Ordering::Relaxed);
    (asked != 0).then(|| cpu::rdtsc().saturating_sub(asked) / tsc_per_us())
}

/// The speculation-control MSRs of this machine's CPUs (read once: they are alike).
static SPEC_MSRS: spin::Once<crate::vmx::policy::SpecMsrs> = spin::Once::new();

/// The dispatcher's view of this machine and of the vCPU's domain.
struct HwPlatform<'a> {
    cpu: usize,
    domain: &'a Arc<Domain>,
}

impl Platform for HwPlatform<'_> {
    fn cpuid(&self, leaf: u32, subleaf: u32) -> core::arch::x86_64::CpuidResult {
        cpu::cpuid(leaf, subleaf)
    }

    #[inline]
    fn rdtsc(&self) -> u64 {
        cpu::rdtsc()
    }

    fn fixed_bits(&self) -> FixedBits {
        FixedBits::read()
    }

    fn xcr0_supported(&self) -> u64 {
        fpu::allowed()
    }

    fn spec_msrs(&self) -> crate::vmx::policy::SpecMsrs {
        *SPEC_MSRS.call_once(|| {
            let c = crate::vmx::hw::cpu_bugs();
            crate::vmx::policy::SpecMsrs::from_cpuid(c.cpuid7_edx, c.arch_cap)
        })
    }

    fn spec_barrier(&mut self, what: crate::vmx::policy::SpecMsr) {
        // Only what `spec_msr` allowed: the CPU has the MSR (CPUID said so).
        match what {
            crate::vmx::policy::SpecMsr::Ibpb => crate::vmx::hw::ibpb(),
            crate::vmx::policy::SpecMsr::L1dFlush => crate::vmx::hw::flush_l1d(),
            _ => {}
        }
    }

    fn load_xcr0(&mut self, value: u64) {
        fpu::set_xcr0(self.cpu, value);
    }

    fn console_window(&self) -> u64 {
        // One-second windows of the TSC.
        cpu::rdtsc() / (tsc_per_us() * 1_000_000)
    }

    fn console_line(&mut self, line: &str) {
        println!("[dom{}] {line}", self.domain.id);
    }

    fn console_raw(&mut self, bytes: &[u8]) -> bool {
        if !crate::vcpu::attach::is_attached(self.domain.id) {
            return false;
        }
        crate::arch::serial::write_verbatim(bytes);
        true
    }

    #[inline]
    fn vcpus(&self) -> u32 {
        self.domain.vcpus
    }

    #[inline]
    fn vcpus_started(&self) -> u64 {
        self.domain.started.load(Ordering::Acquire)
    }

    fn start_vcpu(&mut self, index: u32, rip: u64, rsp: u64) -> bool {
        let bit = 1u64 << index;
        if self.domain.started.fetch_or(bit, Ordering::AcqRel) & bit != 0 {
            return false;
        }
        *self.domain.starts[index as usize].lock() = Some((rip, rsp, cpu::rdtsc()));
        // New work: the scheduler places it and wakes the CPU it chose.
        queue::wake_vcpu(self.domain.id, index);
        true
    }

    fn tsc_khz(&self) -> u64 {
        queue::tsc_khz()
    }

    fn load_msr(&mut self, msr: u32, value: u64) {
        if crate::vmx::policy::GUEST_LOADED_MSRS.contains(&msr) {
            // SAFETY: one of the SYSCALL MSRs, KERNEL_GS_BASE or TSC_AUX, which the hypervisor
            // never uses itself (no SYSCALL, SWAPGS or RDTSCP in VMX root); the value passed
            // `msr_write_valid` (canonical addresses, 32-bit TSC_AUX), so WRMSR cannot fault.
            unsafe { cpu::wrmsr(msr, value) };
        }
    }

    fn unix_time(&self) -> u64 {
        crate::arch::cmos::unix_now(queue::tsc_khz() * 1000)
    }

    fn live_msr(&self, msr: u32) -> Option<u64> {
        // SAFETY: reading IA32_KERNEL_GS_BASE has no side effects and cannot fault on a
        // 64-bit CPU; it holds this vCPU's value (loaded before its slice, SWAPGS since).
        (msr == crate::vmx::policy::KERNEL_GS_BASE).then(|| unsafe { cpu::rdmsr(msr) })
    }

    fn with_io<R>(&mut self, f: impl FnOnce(&mut DomainIo) -> R) -> R {
        f(&mut self.domain.io.lock())
    }

    fn privileged(&self) -> bool {
        self.domain.privileged
    }

    fn dom0_call(
        &mut self,
        call: crate::domain::hypercall::Dom0Call,
    ) -> crate::vcpu::dispatch::Dom0Reply {
        super::dom0::call(self.domain, call)
    }
}

/// How a slice of guest execution ended.
enum SliceEnd {
    /// Put the vCPU back, still runnable.
    Requeue,
    /// Put it back, halted until its next interrupt.
    Halt,
    /// Retire this vCPU only (VCPU_OFF, or its domain already ended).
    Retire,
    /// Stop the domain: why, and whether to dump its registers.
    Stop { why: String, dump: bool },
}

/// The per-CPU state of the run loop.
pub struct RunLoop {
    vmx: VmxCpu,
    cpu: usize,
    /// The vCPU (`Vcpu::key`) whose FPU state is in this CPU's registers.
    fpu_owner: u64,
    /// Where retired vCPUs' VMCS frames go back.
    phys: &'static PhysMem,
    /// Speculative-execution mitigations on this CPU (`vmx::spec`).
    spec: Mitigations,
    /// The domain whose vCPU ran last here (IBPB when it changes).
    last_domain: u32,
    /// LAPIC timer counts per TSC tick, 32.32 fixed point (its one-shot timer wakes sleepers).
    lapic_per_tsc: u64,
    /// `EPT_GENERATION` when this CPU last dropped its cached EPT translations.
    ept_seen: u64,
    /// The vCPU that ran last, for the scheduler with the next decision.
    returning: Option<(Box<Vcpu>, Back)>,
}

impl RunLoop {
    /// The run loop of this CPU; from now on the scheduler places vCPUs here, and the LAPIC
    /// timer is one-shot (armed for this CPU's first sleeper, or the caller's idle bound).
    pub fn new(
        vmx: VmxCpu,
        cpu: usize,
        phys: &'static PhysMem,
        spec: Mitigations,
        lapic_per_10ms: u32,
    ) -> RunLoop {
        lapic::start_oneshot_timer(crate::arch::trap::TIMER_VECTOR);
        if spec.host_ibrs {
            // SAFETY: `host_ibrs` is chosen only where CPUID says IBRS exists (IA32_SPEC_CTRL
            // bit 0); setting it only restricts indirect-branch prediction.
            unsafe { cpu::wrmsr(0x48, spec.host_spec_ctrl()) };
        }
        queue::cpu_ready(cpu);
        RunLoop {
            vmx,
            cpu,
            fpu_owner: 0,
            phys,
            spec,
            last_domain: 0,
            lapic_per_tsc: ((u128::from(lapic_per_10ms) << 32)
                / u128::from(queue::tsc_per_10ms().max(1))) as u64,
            ept_seen: EPT_GENERATION.load(Ordering::Acquire),
            returning: None,
        }
    }

    /// Hands `v` back to the scheduler with the next decision.
    fn give_back(&mut self, v: Box<Vcpu>, how: Back) {
        self.returning = Some((v, how));
    }

    /// Arms this CPU's one-shot timer for TSC value `at` (stops it for None).
    fn arm_timer(&self, at: Option<u64>) {
        let count = at.map_or(0, |t| {
            let ticks = t.saturating_sub(cpu::rdtsc());
            let count = (u128::from(ticks) * u128::from(self.lapic_per_tsc)) >> 32;
            count.clamp(1, u128::from(u32::MAX)) as u32
        });
        CPUS[self.cpu]
            .timer_due
            .store(at.unwrap_or(0), Ordering::Relaxed);
        lapic::arm_oneshot(count);
    }

    /// Runs the next vCPU the scheduler gives this CPU for one slice, or, with nothing to run,
    /// halts until a kick, the first sleeper's deadline or `idle_bound` TSC ticks from now
    /// (the console's CPU polls the UART that often).
    pub fn step(&mut self, idle_bound: Option<u64>) {
        // Interrupts stay off from the decision to HLT, so a kick sent after the decision
        // stays pending and ends the HLT at once.
        x86_64::instructions::interrupts::disable();
        CPUS[self.cpu].attention.store(0, Ordering::Release);
        match queue::next(self.cpu, self.returning.take()) {
            Next::Run(v, slice) => {
                x86_64::instructions::interrupts::enable();
                self.take(v, slice);
            }
            Next::Idle(until) => {
                let bound = idle_bound.map(|b| cpu::rdtsc() + b);
                let wake = match (until, bound) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                self.arm_timer(wake);
                let me = &CPUS[self.cpu];
                let t0 = cpu::rdtsc();
                me.idle_since.store(t0, Ordering::Release);
                cpu::wait_for_interrupt();
                let t1 = cpu::rdtsc();
                me.idle_since.store(0, Ordering::Release);
                me.idle_tsc
                    .fetch_add(t1.wrapping_sub(t0), Ordering::Release);
                me.halts.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Looks at a vCPU the scheduler picked: runs it, or puts it back (paused, not started,
    /// still halted) or tears it down (its domain ended).
    fn take(&mut self, mut v: Box<Vcpu>, slice: u64) {
        match v.domain.state() {
            DomainState::Destroying => {
                end_domain(&v.domain, destroyed(&v.domain));
                self.teardown(v);
                return;
            }
            DomainState::Stopped => {
                self.teardown(v);
                return;
            }
            DomainState::Paused => {
                if v.state != VcpuState::Paused && v.state != VcpuState::Created {
                    v.go(Event::Pause);
                    log::info!(
                        "domain {} vCPU {} paused ({} µs after the request)",
                        v.domain.id,
                        v.core.index,
                        since_request(&v.domain).unwrap_or(0)
                    );
                }
                // Until `resume` wakes the domain.
                self.give_back(v, Back::Blocked(None));
                return;
            }
            DomainState::Running => {
                if v.state == VcpuState::Paused {
                    v.go(Event::Resume);
                    log::info!("domain {} vCPU {} resumed", v.domain.id, v.core.index);
                }
            }
        }
        if v.state == VcpuState::Created {
            let request = v.domain.starts[v.core.index as usize].lock().take();
            match request {
                Some((rip, rsp, asked)) => {
                    v.setup.boot.rip = rip;
                    v.setup.boot.rsp = rsp;
                    v.go(Event::Start);
                    log::info!(
                        "domain {} vCPU {} started on CPU {} ({} µs after VCPU_START)",
                        v.domain.id,
                        v.core.index,
                        self.cpu,
                        cpu::rdtsc().saturating_sub(asked) / tsc_per_us()
                    );
                }
                None => {
                    self.give_back(v, Back::Blocked(None));
                    return;
                }
            }
        }
        if v.state == VcpuState::Blocked {
            // dom0 waiting in IO_WAIT wakes for a request; any halt wakes for its timer.
            if let Some(l) = v.core.lapic.as_mut() {
                l.poll(cpu::rdtsc());
            }
            let event = v.core.apic_pending()
                || v.core.index == 0
                    && (super::dom0::take_event(&v.domain)
                        || v.core.irqs != 0
                        || v.domain.irqs.load(Ordering::Acquire) != 0);
            if !event && let Some(until) = v.halted_until() {
                self.give_back(v, Back::Blocked(until));
                return;
            }
            v.go(Event::Wake);
            v.core.wake_at = None;
        }
        if !v.state.runnable() {
            self.give_back(v, Back::Blocked(None));
            return;
        }
        self.run(v, slice);
    }

    fn run(&mut self, mut v: Box<Vcpu>, slice: u64) {
        v.go(Event::Schedule);
        if self.spec.ibpb_on_switch && self.last_domain != v.domain.id {
            crate::vmx::hw::ibpb();
        }
        self.last_domain = v.domain.id;
        let here = &CPUS[self.cpu].running_domain;
        here.store(v.domain.id, Ordering::Release);
        let end = self.run_slice(&mut v, slice);
        here.store(0, Ordering::Release);
        match end {
            SliceEnd::Requeue => {
                v.go(Event::Preempt);
                self.give_back(v, Back::Runnable);
            }
            SliceEnd::Halt => {
                v.go(Event::Halt);
                let until = v.core.halt_deadline();
                self.give_back(v, Back::Blocked(until));
            }
            SliceEnd::Retire => self.teardown(v),
            SliceEnd::Stop { why, dump } => {
                if dump {
                    self.dump(&mut v, &why);
                }
                end_domain(&v.domain, why);
                self.teardown(v);
            }
        }
    }

    /// Loads `v`'s x87/SSE/AVX state unless it is already in this CPU's registers (the
    /// previous owner's was saved when its slice ended).
    fn swap_fpu(cpu: usize, fpu_owner: &mut u64, v: &mut Vcpu) {
        // Still in the registers only if nothing else ran here since and it did not run on
        // another CPU meanwhile.
        if *fpu_owner == v.key() && v.last_cpu == Some(cpu) {
            return;
        }
        fpu::restore(&v.fpu, v.core.xcr0, cpu);
        *fpu_owner = v.key();
    }

    fn run_slice(&mut self, v: &mut Vcpu, slice: u64) -> SliceEnd {
        let caps = *self.vmx.caps();
        let mut vmcs = v.vmcs.take().expect("a queued vCPU has its VMCS");
        // A domain's EPT went back to the allocator since this CPU last looked: its root may
        // now be another domain's, so nothing cached from before may be used.
        let generation = EPT_GENERATION.load(Ordering::Acquire);
        if generation != self.ept_seen {
            crate::vmx::hw::invept_all();
            self.ept_seen = generation;
        }
        // This CPU's first sleeper: its one-shot timer, and the preemption timer below (an
        // emulator such as Bochs may hold the host's timer interrupt while the guest has
        // IF=0). Only this CPU adds sleepers here, so the value can only be early (harmless).
        let sleeper = queue::next_sleeper(self.cpu);
        self.arm_timer(sleeper);
        let end = {
            let RunLoop {
                vmx,
                cpu,
                fpu_owner,
                spec,
                ..
            } = self;
            let mut active = match vmx.load(&mut vmcs) {
                Ok(a) => a,
                Err(e) => {
                    v.vmcs = Some(vmcs);
                    return SliceEnd::Stop {
                        why: alloc::format!("VMPTRLD failed: {e}"),
                        dump: false,
                    };
                }
            };
            Self::slice_inner(
                *cpu,
                fpu_owner,
                *spec,
                &mut active,
                &caps,
                v,
                (slice, sleeper),
            )
        };
        v.last_cpu = Some(self.cpu);
        // Every slice ends with VMCLEAR, so whichever CPU the scheduler picks next may load it.
        let end = match (end, vmcs.clear_for_move()) {
            (SliceEnd::Requeue | SliceEnd::Halt, Err(e)) => SliceEnd::Stop {
                why: alloc::format!("VMCLEAR failed: {e}"),
                dump: false,
            },
            (end, _) => end,
        };
        v.vmcs = Some(vmcs);
        end
    }

    fn slice_inner(
        cpu: usize,
        fpu_owner: &mut u64,
        spec: Mitigations,
        a: &mut ActiveVmcs,
        caps: &VmxCaps,
        v: &mut Vcpu,
        // How long the slice may run, and this CPU's first sleeper (TSC).
        (slice, mut sleeper): (u64, Option<u64>),
    ) -> SliceEnd {
        if !v.ready {
            // First entry: fill the VMCS on this CPU.
            v.setup.rsb_fill = spec.rsb_fill;
            if let Err(e) = setup_vmcs(a, caps, &v.setup, v.domain.io_bitmaps()) {
                return SliceEnd::Stop {
                    why: alloc::format!("cannot set up the VMCS: {e}"),
                    dump: false,
                };
            }
            // The vCPU is boxed: its MSR-load areas stay where they are for as long as its
            // VMCS exists (they are freed together). Each exit loads the hypervisor's value
            // while the guest's differs.
            let host = spec.host_spec_ctrl();
            v.core.spec_areas.exit[1] = host;
            let n = u64::from(v.core.spec_ctrl != host);
            if let Err(e) = a
                .set_spec_ctrl_areas(&v.core.spec_areas)
                .and_then(|()| a.set(f::ENTRY_MSR_LOAD_COUNT, n))
                .and_then(|()| a.set(f::EXIT_MSR_LOAD_COUNT, n))
            {
                return SliceEnd::Stop {
                    why: alloc::format!("cannot set up the VMCS: {e}"),
                    dump: false,
                };
            }
            v.ready = true;
        } else if v.last_cpu != Some(cpu) {
            // Moved here: this CPU's host state (GDT, TSS, IDT, per-CPU base), and no
            // translations of its EPT cached here from an earlier visit.
            if let Err(e) = a.set_host_state(&HostState::capture(), spec.rsb_fill) {
                return SliceEnd::Stop {
                    why: alloc::format!("cannot move the vCPU to CPU {cpu}: {e}"),
                    dump: false,
                };
            }
            crate::vmx::hw::invept_all();
        }
        Self::swap_fpu(cpu, fpu_owner, v);
        // The registers SYSCALL, SWAPGS and RDTSCP read in the guest: this vCPU's.
        for &msr in crate::vmx::policy::GUEST_LOADED_MSRS {
            // SAFETY: as in `HwPlatform::load_msr`: registers the hypervisor never uses, and
            // values that passed `msr_write_valid` when the guest wrote them (0 before).
            unsafe { cpu::wrmsr(msr, v.core.msrs.get(msr)) };
        }
        let start = cpu::rdtsc();
        // Bring the guest's timer up to date first, so its next deadline is in the future.
        v.core.timer.poll(start);
        // The preemption timer: the end of the slice, the guest's timer or the first sleeper,
        // whichever comes first.
        let arm = |a: &mut ActiveVmcs, v: &Vcpu, sleeper: Option<u64>, now: u64| {
            let left = slice.saturating_sub(now.wrapping_sub(start)).max(1);
            let mut budget = v
                .core
                .timer
                .until_due(now)
                .map_or(left, |due| due.clamp(1, left));
            if let Some(at) = v.core.lapic.as_ref().and_then(|l| l.next_deadline()) {
                budget = budget.min(at.saturating_sub(now).max(1));
            }
            if let Some(s) = sleeper {
                budget = budget.min(s.saturating_sub(now).max(1));
            }
            let value = (budget >> caps.preemption_timer_rate()).min(u64::from(u32::MAX));
            let _ = a.set(f::PREEMPTION_TIMER, value);
        };
        arm(a, v, sleeper, start);
        // Indexed once: the check before each entry is one load.
        let attn = &CPUS[cpu].attention;
        // Device interrupts go to vCPU 0 (raised by other CPUs, or by this vCPU's own exit);
        // the other vCPUs look at a word that stays 0.
        static NONE: AtomicU64 = AtomicU64::new(0);
        let domain = v.domain.clone();
        let irqs = if v.core.index == 0 {
            &domain.irqs
        } else {
            &NONE
        };
        let end = loop {
            if irqs.load(Ordering::Relaxed) != 0 {
                v.core.irqs |= irqs.swap(0, Ordering::AcqRel);
            }
            if v.core.lapic.is_some() {
                // A PC: device lines through the IOAPIC, then the local APIC's highest vector.
                if v.core.irqs != 0 {
                    let bits = core::mem::take(&mut v.core.irqs);
                    let mut p = HwPlatform {
                        cpu,
                        domain: &v.domain,
                    };
                    super::pc::device_lines(&mut v.core, &mut p, bits);
                }
                if let Err(e) = super::pc::deliver_pending(&mut v.core, a, cpu::rdtsc()) {
                    break SliceEnd::Stop {
                        why: String::from(e.message()),
                        dump: true,
                    };
                }
            } else {
                let timer_due = !v.core.timer.idle() && v.core.timer.poll(cpu::rdtsc());
                if (timer_due || v.core.irqs != 0)
                    && let Err(e) = dispatch::deliver_timer(&mut v.core, a)
                {
                    break SliceEnd::Stop {
                        why: String::from(e.message()),
                        dump: true,
                    };
                }
            }
            x86_64::instructions::interrupts::disable();
            // Checked with interrupts off: a kick or timer after this stays pending and makes
            // the entry exit at once.
            let attention = attn.load(Ordering::Acquire);
            if attention != 0 {
                x86_64::instructions::interrupts::enable();
                if attention & ATTN_TIMER != 0 {
                    attn.fetch_and(!ATTN_TIMER, Ordering::AcqRel);
                    // Wakes may set ATTN_RESCHED here (seen on the next pass).
                    sleeper = queue::wake_due(cpu);
                    arm(a, v, sleeper, cpu::rdtsc());
                    continue;
                }
                if attention & ATTN_RESCHED != 0 {
                    break SliceEnd::Requeue;
                }
            }
            if spec.verw | spec.l1d_flush {
                if spec.l1d_flush {
                    crate::vmx::hw::flush_l1d();
                }
                if spec.verw {
                    // Last before entry: only the guest's own registers and the host's saved
                    // callee-saved registers are touched between this and VMRESUME.
                    crate::vmx::hw::clear_cpu_buffers();
                }
            }
            let entered = a.run(&mut v.core.regs);
            let exited = cpu::rdtsc();
            // Let the host take the interrupt that caused an exit, if any.
            x86_64::instructions::interrupts::enable();
            if let Err(e) = entered {
                break SliceEnd::Stop {
                    why: alloc::format!("VM entry failed: {e}"),
                    dump: true,
                };
            }
            let exit = Exit::capture(a);
            v.domain.exits[exit.reason.slot()].fetch_add(1, Ordering::Relaxed);
            if exit.entry_failed() {
                let q = a.info(f::EXIT_QUALIFICATION);
                break SliceEnd::Stop {
                    why: alloc::format!(
                        "VM entry failed: {} (exit reason {:#x}, qualification {q})",
                        exit.reason.name(),
                        exit.raw,
                    ),
                    dump: true,
                };
            }
            let action = {
                let mut p = HwPlatform {
                    cpu,
                    domain: &v.domain,
                };
                dispatch::handle(&exit, &mut v.core, a, v.mem.ram.mem(), &mut p)
            };
            match action {
                Ok(Action::Resume) if exit.reason == ExitReason::PreemptionTimer => {
                    // For the guest's timer or a sleeper: run on until the slice ends or the
                    // next of them is due.
                    let now = cpu::rdtsc();
                    if sleeper.is_some_and(|s| now >= s) {
                        attn.fetch_or(ATTN_TIMER, Ordering::AcqRel);
                    }
                    arm(a, v, sleeper, now);
                }
                Ok(Action::Resume) => {}
                Ok(Action::Requeue) => break SliceEnd::Requeue,
                // A device interrupt is waiting (raised while interrupts were off): HLT
                // ends at once, as on hardware; the entry injects it.
                Ok(Action::Halt)
                    if v.core.irqs != 0
                        || v.domain.irqs.load(Ordering::Acquire) != 0
                        || v.core.apic_pending() => {}
                Ok(Action::Halt) => break SliceEnd::Halt,
                Ok(Action::Retire) => break SliceEnd::Retire,
                Ok(Action::Exit(code)) => {
                    break SliceEnd::Stop {
                        why: alloc::format!("exited with code {code}"),
                        dump: false,
                    };
                }
                Ok(Action::PowerOff) => {
                    break SliceEnd::Stop {
                        why: String::from("powered off"),
                        dump: false,
                    };
                }
                Ok(Action::Crashed) => {
                    break SliceEnd::Stop {
                        why: String::from("crashed: its kernel panicked (pvpanic)"),
                        dump: false,
                    };
                }
                Ok(Action::Reboot) => {
                    v.domain.rebooting.store(true, Ordering::Relaxed);
                    break SliceEnd::Stop {
                        why: String::from("rebooted"),
                        dump: false,
                    };
                }
                Err(e) => {
                    break SliceEnd::Stop {
                        why: String::from(e.message()),
                        dump: true,
                    };
                }
            }
            // One load on the fast path; the match only once something changed.
            if v.domain.state.load(Ordering::Acquire) != DomainState::Running as u8 {
                match v.domain.state() {
                    DomainState::Running => {}
                    DomainState::Destroying => {
                        break SliceEnd::Stop {
                            why: destroyed(&v.domain),
                            dump: false,
                        };
                    }
                    DomainState::Stopped => break SliceEnd::Retire,
                    // Leave the CPU now; `take` holds it until `resume`.
                    DomainState::Paused => break SliceEnd::Requeue,
                }
            }
            // The ticks spent handling this exit, by its reason.
            let now = cpu::rdtsc();
            v.domain.exit_ticks[exit.reason.slot()]
                .fetch_add(now.wrapping_sub(exited), Ordering::Relaxed);
            if now.wrapping_sub(start) > slice {
                break SliceEnd::Requeue;
            }
        };
        fpu::save(&mut v.fpu);
        // The guest's SWAPGS changed KERNEL_GS_BASE in the CPU, with no exit: keep what it
        // holds now, or the next slice would reload a stale value under the guest's feet
        // (Debian's kernel then ran with a user GS base in the kernel and overflowed its entry
        // stack on page faults, seen in Bochs).
        let kgs = crate::vmx::policy::KERNEL_GS_BASE;
        // SAFETY: reading IA32_KERNEL_GS_BASE has no side effects and cannot fault on a 64-bit
        // CPU.
        v.core.msrs.set(kgs, unsafe { cpu::rdmsr(kgs) });
        let (reads, writes) = (
            core::mem::take(&mut a.reads),
            core::mem::take(&mut a.writes),
        );
        v.domain
            .vmreads
            .fetch_add(u64::from(reads), Ordering::Relaxed);
        v.domain
            .vmwrites
            .fetch_add(u64::from(writes), Ordering::Relaxed);
        end
    }

    fn dump(&mut self, v: &mut Vcpu, why: &str) {
        let Some(mut vmcs) = v.vmcs.take() else {
            return;
        };
        if let Ok(mut a) = self.vmx.load(&mut vmcs) {
            let r = &v.core.regs;
            println!(
                "[dom{}] {why}: RIP={:#x} RSP={:#x} RFLAGS={:#x} CR0={:#x} CR3={:#x} CR4={:#x}",
                v.domain.id,
                a.get(f::GUEST_RIP),
                a.get(f::GUEST_RSP),
                a.get(f::GUEST_RFLAGS),
                a.get(f::GUEST_CR0),
                a.get(f::GUEST_CR3),
                a.get(f::GUEST_CR4)
            );
            println!(
                "[dom{}]   RAX={:#x} RBX={:#x} RCX={:#x} RDX={:#x} RSI={:#x} RDI={:#x} RBP={:#x}",
                v.domain.id, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp
            );
            println!(
                "[dom{}]   R8={:#x} R9={:#x} R10={:#x} R11={:#x} R12={:#x} R13={:#x} R14={:#x} R15={:#x}",
                v.domain.id, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15
            );
        }
        v.vmcs = Some(vmcs);
    }

    /// Retires a vCPU: flushes its console, gives its VMCS back; the domain's memory goes with
    /// the last vCPU (its `Arc<DomainMem>`). If it was the last one alive, the domain ends.
    fn teardown(&mut self, mut v: Box<Vcpu>) {
        v.go(Event::Stop);
        if let Some(rest) = v.core.console.take_partial() {
            println!("[dom{}] {rest}", v.domain.id);
        }
        if v.core.console.dropped > 0 {
            println!(
                "[dom{}] ({} console lines dropped by the rate limit)",
                v.domain.id, v.core.console.dropped
            );
        }
        if self.fpu_owner == v.key() {
            self.fpu_owner = 0;
        }
        {
            let mut guard = self.phys.lock();
            if let (Some(frames), Some(vmcs)) = (guard.as_mut(), v.vmcs.take()) {
                crate::mm::give_back(frames, vmcs.release());
            }
        }
        // Drop this CPU's cached translations of the domain's EPT now; the other CPUs where
        // its vCPUs ran do so before their next slice (`EPT_GENERATION`, bumped when the
        // domain's memory goes).
        crate::vmx::hw::invept_all();
        queue::retire(self.cpu, &v);
        if v.domain.alive.fetch_sub(1, Ordering::AcqRel) == 1 {
            end_domain(&v.domain, String::from("all vCPUs are off"));
            if v.domain.rebooting.load(Ordering::Relaxed) {
                // Only once the last vCPU, and with it the domain's memory, is gone: the new
                // instance needs that memory.
                let name = v.domain.name.clone();
                drop(v);
                crate::domain::table::request_reboot(name);
            }
        }
    }
}
