//! The run loop of each CPU: its queue of vCPUs (each pinned to that CPU), round-robin slices
//! bounded by the VMX preemption timer, and between entry and exit nothing but the hand-off to
//! the exit dispatcher (`super::dispatch`). A vCPU's VMCS is only ever loaded on its own CPU.
//!
//! One exit, from the guest and back: VMCALL in the guest → VM exit to `vmx_exit_point`
//! (`vmx::hw`, registers saved into `VcpuCore::regs`) → [`Exit::capture`] reads the reason
//! and the fields it needs → the domain's counter for that reason → [`dispatch::handle`]
//! decides (here: the hypercall, RAX set, RIP stepped) → [`Action::Resume`] → the next
//! `ActiveVmcs::run` (VMRESUME).

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::sync::Arc;
use core::sync::atomic::{AtomicU16, AtomicU64, Ordering};

use spin::Mutex;

use crate::arch::cpu;
use crate::arch::percpu::{CPUS, MAX_CPUS};
use crate::domain::table::{Domain, DomainMem, DomainState, NewDomain};
use crate::io::DomainIo;
use crate::mm::PhysMem;
use crate::println;
use crate::vcpu::dispatch::{self, Action, Platform, VcpuCore};
use crate::vcpu::exit::Exit;
use crate::vcpu::state::{Event, VcpuState};
use crate::vmx::caps::VmxCaps;
use crate::vmx::exit::ExitReason;
use crate::vmx::fpu::{self, FpuArea};
use crate::vmx::hw::{ActiveVmcs, FixedBits, GuestRegs, Vmcs, VmxCpu, fields as f};
use crate::vmx::setup::{GuestSetup, setup_vmcs};
use crate::vmx::spec::Mitigations;

static NEXT_VPID: AtomicU16 = AtomicU16::new(1);
/// TSC ticks per VM time slice (10 ms), set at boot.
pub static SLICE_TSC: AtomicU64 = AtomicU64::new(10_000_000);

#[allow(clippy::declare_interior_mutable_const)] // only initialises the array below
const EMPTY_QUEUE: Mutex<VecDeque<Box<Vcpu>>> = Mutex::new(VecDeque::new());
/// Each CPU's vCPUs, in round-robin order.
static RUN_QUEUES: [Mutex<VecDeque<Box<Vcpu>>>; MAX_CPUS] = [EMPTY_QUEUE; MAX_CPUS];

/// A virtual CPU, owned by the run queue of the CPU it is pinned to.
pub struct Vcpu {
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
    /// Halted until this CPU's tick count passes this value.
    halted_at_tick: Option<u64>,
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

    /// Whether the vCPU still waits in HLT: until its timer's deadline when armed, else until
    /// the next tick of its CPU.
    fn still_halted(&self, cpu: usize) -> bool {
        match (self.halted_at_tick, self.core.timer.deadline()) {
            (None, _) => false,
            (Some(_), Some(deadline)) => cpu::rdtsc() < deadline,
            (Some(t), None) => CPUS[cpu].ticks.load(Ordering::Relaxed) <= t,
        }
    }

    /// A key unique to this vCPU among all domains.
    fn key(&self) -> u64 {
        (u64::from(self.domain.id) << 32) | u64::from(self.core.index)
    }
}

/// Makes the vCPUs of a new domain and queues each on its CPU.
pub fn spawn(new: NewDomain) {
    let NewDomain {
        domain,
        mem,
        boot,
        eptp,
        vmcss,
        placement,
    } = new;
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
        let vcpu = Box::new(Vcpu {
            domain: domain.clone(),
            state: if index == 0 {
                VcpuState::Runnable
            } else {
                VcpuState::Created
            },
            core: VcpuCore::new(index as u32, regs, fpu::XCR0_RESET),
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
            halted_at_tick: None,
            fpu: FpuArea::initial(),
        });
        RUN_QUEUES[placement[index]].lock().push_back(vcpu);
    }
}

/// The stop reason of a domain the operator destroyed, with how long its vCPU took to stop.
fn destroyed(d: &Domain) -> String {
    match since_request(d) {
        Some(us) => alloc::format!("destroyed by the operator ({us} µs after the request)"),
        None => String::from("destroyed by the operator"),
    }
}

/// TSC ticks per microsecond (a slice is 10 ms of TSC, calibrated at boot).
fn tsc_per_us() -> u64 {
    (SLICE_TSC.load(Ordering::Relaxed) / 10_000).max(1)
}

/// Microseconds since the operator's last request to this domain.
fn since_request(d: &Domain) -> Option<u64> {
    let asked = d.request_tsc.load(Ordering::Relaxed);
    (asked != 0).then(|| cpu::rdtsc().saturating_sub(asked) / tsc_per_us())
}

/// The dispatcher's view of this machine and of the vCPU's domain.
struct HwPlatform<'a> {
    cpu: usize,
    domain: &'a Domain,
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

    fn load_xcr0(&mut self, value: u64) {
        fpu::set_xcr0(self.cpu, value);
    }

    fn console_window(&self) -> u64 {
        CPUS[self.cpu].ticks.load(Ordering::Relaxed) / 100
    }

    fn console_line(&mut self, line: &str) {
        println!("[dom{}] {line}", self.domain.id);
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
        // New work: the vCPU's CPU may be idle in HLT until its next tick; wake it now.
        if let Some(&c) = self.domain.placement.get(index as usize) {
            crate::domain::table::kick_cpu(c);
        }
        true
    }

    fn tsc_per_us(&self) -> u64 {
        tsc_per_us()
    }

    fn with_io<R>(&mut self, f: impl FnOnce(&mut DomainIo) -> R) -> R {
        f(&mut self.domain.io.lock())
    }
}

/// How a slice of guest execution ended.
enum SliceEnd {
    /// Put the vCPU back in the queue.
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
}

impl RunLoop {
    pub fn new(vmx: VmxCpu, cpu: usize, phys: &'static PhysMem, spec: Mitigations) -> RunLoop {
        RunLoop {
            vmx,
            cpu,
            fpu_owner: 0,
            phys,
            spec,
            last_domain: 0,
        }
    }

    /// Runs one vCPU for one slice if any is runnable. Returns whether one ran (when not,
    /// every vCPU here is halted or there is none: the caller may sleep until the next tick).
    pub fn run_once(&mut self) -> bool {
        let queued = RUN_QUEUES[self.cpu].lock().len();
        for _ in 0..queued {
            let Some(mut v) = RUN_QUEUES[self.cpu].lock().pop_front() else {
                return false;
            };
            match v.domain.state() {
                DomainState::Destroying => {
                    v.domain.finish(destroyed(&v.domain));
                    self.teardown(v);
                    return true;
                }
                DomainState::Stopped => {
                    self.teardown(v);
                    return true;
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
                    RUN_QUEUES[self.cpu].lock().push_back(v);
                    continue;
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
                        RUN_QUEUES[self.cpu].lock().push_back(v);
                        continue;
                    }
                }
            }
            if v.state == VcpuState::Blocked {
                if v.still_halted(self.cpu) {
                    RUN_QUEUES[self.cpu].lock().push_back(v);
                    continue;
                }
                v.go(Event::Wake);
            }
            if !v.state.runnable() {
                RUN_QUEUES[self.cpu].lock().push_back(v);
                continue;
            }
            self.run(v);
            return true;
        }
        false
    }

    fn run(&mut self, mut v: Box<Vcpu>) {
        v.halted_at_tick = None;
        v.go(Event::Schedule);
        if self.spec.ibpb_on_switch && self.last_domain != v.domain.id {
            crate::vmx::hw::ibpb();
        }
        self.last_domain = v.domain.id;
        let here = &CPUS[self.cpu].running_domain;
        here.store(v.domain.id, Ordering::Release);
        let end = self.run_slice(&mut v);
        here.store(0, Ordering::Release);
        match end {
            SliceEnd::Requeue => {
                v.go(Event::Preempt);
                RUN_QUEUES[self.cpu].lock().push_back(v);
            }
            SliceEnd::Halt => {
                v.go(Event::Halt);
                RUN_QUEUES[self.cpu].lock().push_back(v);
            }
            SliceEnd::Retire => self.teardown(v),
            SliceEnd::Stop { why, dump } => {
                if dump {
                    self.dump(&mut v, &why);
                }
                v.domain.finish(why);
                self.teardown(v);
            }
        }
    }

    /// Loads `v`'s x87/SSE/AVX state unless it is already in this CPU's registers (the
    /// previous owner's was saved when its slice ended).
    fn swap_fpu(cpu: usize, fpu_owner: &mut u64, v: &mut Vcpu) {
        if *fpu_owner == v.key() {
            return;
        }
        fpu::restore(&v.fpu, v.core.xcr0, cpu);
        *fpu_owner = v.key();
    }

    fn run_slice(&mut self, v: &mut Vcpu) -> SliceEnd {
        let caps = *self.vmx.caps();
        let mut vmcs = v.vmcs.take().expect("a queued vCPU has its VMCS");
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
            Self::slice_inner(*cpu, fpu_owner, *spec, &mut active, &caps, v)
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
    ) -> SliceEnd {
        if !v.ready {
            // First entry: fill the VMCS on the CPU it will run on (vCPUs never move).
            v.setup.rsb_fill = spec.rsb_fill;
            if let Err(e) = setup_vmcs(a, caps, &v.setup) {
                return SliceEnd::Stop {
                    why: alloc::format!("cannot set up the VMCS: {e}"),
                    dump: false,
                };
            }
            v.ready = true;
        }
        Self::swap_fpu(cpu, fpu_owner, v);
        let slice = SLICE_TSC.load(Ordering::Relaxed);
        let start = cpu::rdtsc();
        // Bring the guest's timer up to date first, so its next deadline is in the future.
        v.core.timer.poll(start);
        let budget = v
            .core
            .timer
            .until_due(start)
            .map_or(slice, |due| due.clamp(1, slice));
        let timer = (budget >> caps.preemption_timer_rate()).min(u64::from(u32::MAX));
        let _ = a.set(f::PREEMPTION_TIMER, timer);
        let end = loop {
            if !v.core.timer.idle()
                && v.core.timer.poll(cpu::rdtsc())
                && let Err(e) = dispatch::deliver_timer(&mut v.core, a)
            {
                break SliceEnd::Stop {
                    why: String::from(e.message()),
                    dump: true,
                };
            }
            x86_64::instructions::interrupts::disable();
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
                    // Woken for the guest's timer: run on until the slice ends or it is due again.
                    let now = cpu::rdtsc();
                    let left = slice.saturating_sub(now.wrapping_sub(start)).max(1);
                    let budget = v
                        .core
                        .timer
                        .until_due(now)
                        .map_or(left, |due| due.clamp(1, left));
                    let value = (budget >> caps.preemption_timer_rate()).min(u64::from(u32::MAX));
                    let _ = a.set(f::PREEMPTION_TIMER, value);
                }
                Ok(Action::Resume) => {}
                Ok(Action::Requeue) => break SliceEnd::Requeue,
                Ok(Action::Halt) => {
                    v.halted_at_tick = Some(CPUS[cpu].ticks.load(Ordering::Relaxed));
                    break SliceEnd::Halt;
                }
                Ok(Action::Retire) => break SliceEnd::Retire,
                Ok(Action::Exit(code)) => {
                    break SliceEnd::Stop {
                        why: alloc::format!("exited with code {code}"),
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
                    // Leave the CPU now; `run_once` holds it until `resume`.
                    DomainState::Paused => break SliceEnd::Requeue,
                }
            }
            if cpu::rdtsc().wrapping_sub(start) > slice {
                break SliceEnd::Requeue;
            }
        };
        fpu::save(&mut v.fpu);
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
        // Drop this CPU's cached translations of the domain's EPT before its tables can be
        // reused; every CPU that ran one of its vCPUs does the same in its own teardown.
        crate::vmx::hw::invept_all();
        if v.domain.alive.fetch_sub(1, Ordering::AcqRel) == 1 {
            v.domain.finish(String::from("all vCPUs are off"));
        }
    }
}
