//! The exit dispatcher: one VM exit in, one [`Action`] out. Pure over three small interfaces
//! (the VMCS, the domain's RAM and the [`Platform`] it runs on), so every exit it handles is
//! tested on the host with a fake VMCS and plain memory.
//!
//! Every value here came from the guest (its registers, the VMCS guest state, the bytes of
//! its memory) and is checked before use; what the guest may not do it gets #GP for, as on
//! hardware; what this hypervisor cannot emulate stops only that domain.

use alloc::boxed::Box;
use alloc::string::String;
use core::arch::x86_64::CpuidResult;

use super::exit::Exit;
use crate::domain::console::DomainConsole;
use crate::domain::hypercall::{self, Dom0Call, Outcome};
use crate::domain::memory::{GuestAddr, GuestMemory, translate};
use crate::domain::vtimer::{self, VirtTimer};
use crate::io::{DomainIo, IoEvent, PortAction};
use crate::vmx::cr::{self, CrExit};
use crate::vmx::decode;
use crate::vmx::exit::{EptViolationExit, ExitReason, IoExit};
use crate::vmx::policy::{self, MsrRule, StoredMsrs};
use crate::vmx::vmcs::VmcsAccess;
use crate::vmx::vmcs::{FixedBits, GuestRegs, VmxError, fields as f};

/// The per-vCPU state the dispatcher reads and changes (the rest of a vCPU, its VMCS region
/// and its place in a run queue, belongs to the run loop).
#[derive(Debug)]
pub struct VcpuCore {
    pub regs: GuestRegs,
    /// This vCPU's index in its domain.
    pub index: u32,
    pub msrs: StoredMsrs,
    /// The paravirtual timer (SET_TIMER).
    pub timer: VirtTimer,
    /// Whether interrupt-window exiting is on (a timer interrupt waits for RFLAGS.IF).
    pub window_exiting: bool,
    /// Device interrupts waiting to be injected: bit i is virtio device i, injected on vector
    /// `hv_abi::devices::VIRTIO_VECTOR_BASE + i` (vCPU 0 takes them).
    pub irqs: u64,
    /// The guest's XCR0 (loaded while it runs, when XSAVE is in use).
    pub xcr0: u64,
    /// The guest's IA32_SPEC_CTRL: in the MSR while it runs, 0 in the hypervisor.
    pub spec_ctrl: u64,
    /// The MSR-load areas that switch it (the VMCS points here; see `SpecCtrlAreas`).
    pub spec_areas: policy::SpecCtrlAreas,
    /// Its console (UART port and console hypercall): lines, rate-limited.
    pub console: DomainConsole,
    /// When a bounded IO_WAIT ends (TSC), while this vCPU waits in one.
    pub wake_at: Option<u64>,
    /// A PC guest's local APIC (`None` for this project's own guests, which have the
    /// paravirtual timer instead).
    pub lapic: Option<Box<hv_platform::lapic::LocalApic>>,
}

impl VcpuCore {
    pub fn new(index: u32, regs: GuestRegs, xcr0: u64) -> Self {
        VcpuCore {
            regs,
            index,
            msrs: StoredMsrs::default(),
            timer: VirtTimer::default(),
            window_exiting: false,
            irqs: 0,
            xcr0,
            spec_ctrl: 0,
            spec_areas: policy::SpecCtrlAreas::default(),
            console: DomainConsole::default(),
            wake_at: None,
            lapic: None,
        }
    }

    /// When a halt of this vCPU ends by itself (TSC): its timer's next tick, or the bound of
    /// the IO_WAIT it waits in, whichever comes first; `None`: only a wake-up ends it.
    pub fn halt_deadline(&self) -> Option<u64> {
        let first = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let apic = self.lapic.as_ref().and_then(|l| l.next_deadline());
        first(first(self.timer.deadline(), self.wake_at), apic)
    }

    /// Whether a PC vCPU's local APIC has an interrupt to inject (a halt ends for it).
    pub fn apic_pending(&self) -> bool {
        self.lapic.as_ref().is_some_and(|l| l.pending().is_some())
    }
}

/// What the dispatcher needs from the machine and the domain around it.
pub trait Platform {
    /// The CPU's own CPUID answer.
    fn cpuid(&self, leaf: u32, subleaf: u32) -> CpuidResult;
    fn rdtsc(&self) -> u64;
    /// CR0/CR4 bits VMX operation fixes.
    fn fixed_bits(&self) -> FixedBits;
    /// XCR0 bits this CPU supports and the hypervisor offers (0: no XSAVE).
    fn xcr0_supported(&self) -> u64;
    /// Loads a new guest XCR0 into the CPU (it runs the guest next).
    fn load_xcr0(&mut self, value: u64);
    /// The console rate limit's current window (it advances once a second).
    fn console_window(&self) -> u64;
    /// Shows one complete line of the guest's console.
    fn console_line(&mut self, line: &str);
    /// Writes the guest's console bytes through as they come, when the operator's console is
    /// attached to this domain (`console ID`); false: they go to [`Self::console_line`].
    fn console_raw(&mut self, _bytes: &[u8]) -> bool {
        false
    }
    /// The domain's vCPU count.
    fn vcpus(&self) -> u32;
    /// Bit i set once vCPU i was started.
    fn vcpus_started(&self) -> u64;
    /// Asks for vCPU `index` to start at `rip` with `rsp`; false if it was already started.
    fn start_vcpu(&mut self, index: u32, rip: u64, rsp: u64) -> bool;
    /// TSC frequency in kHz (the paravirtual timer counts in microseconds; whole MHz would be
    /// off by up to 25 % on a slow TSC such as Bochs' 4.2 MHz).
    fn tsc_khz(&self) -> u64;
    /// Runs `f` on the domain's I/O buses (shared by its vCPUs).
    fn with_io<R>(&mut self, f: impl FnOnce(&mut DomainIo) -> R) -> R;
    /// The speculation-control MSRs this CPU has (guests see them in CPUID as they are).
    fn spec_msrs(&self) -> policy::SpecMsrs;
    /// Issues a barrier a guest asked for: [`policy::SpecMsr::Ibpb`] or `L1dFlush`.
    fn spec_barrier(&mut self, what: policy::SpecMsr);
    /// Whether the domain is dom0 (it may make dom0's calls).
    fn privileged(&self) -> bool {
        false
    }
    /// Loads a guest value of a register the CPU uses directly in the guest (the SYSCALL
    /// MSRs, KERNEL_GS_BASE, TSC_AUX: [`crate::vmx::policy::MsrRule::Stored`]) into the CPU.
    fn load_msr(&mut self, msr: u32, value: u64) {
        let _ = (msr, value);
    }
    /// Seconds since 1970 (the host's clock), for a PC guest's RTC.
    fn unix_time(&self) -> u64 {
        0
    }
    /// The CPU's own value of a register the guest changes without an exit (KERNEL_GS_BASE,
    /// by SWAPGS: [`crate::vmx::policy::KERNEL_GS_BASE`]); None: the stored value is current.
    fn live_msr(&self, msr: u32) -> Option<u64> {
        let _ = msr;
        None
    }
    /// Whether vCPU `index` of the domain (not the caller) is among `dest`'s targets.
    fn lapic_matches(&self, index: u32, dest: &hv_platform::lapic::Destination) -> bool {
        let _ = (index, dest);
        false
    }
    /// Gives `vector` to vCPU `index`'s local APIC (not the caller's): it takes it before
    /// its next entry, woken if it halted.
    fn post_interrupt(&mut self, index: u32, vector: u8, level: bool) {
        let _ = (index, vector, level);
    }
    /// Performs one of dom0's calls (only asked when [`Platform::privileged`]).
    fn dom0_call(&mut self, call: Dom0Call) -> Dom0Reply {
        let _ = call;
        Dom0Reply::Return(hv_abi::Status::UnknownCall as i64)
    }
}

/// What one of dom0's calls gives back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dom0Reply {
    /// Resume with this in RAX.
    Return(i64),
    /// Resume with RAX = 0 once woken (IO_WAIT with nothing to do).
    Wait,
}

/// What the run loop does after an exit. Plain and `Copy`: it is matched on every exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Enter the guest again.
    Resume,
    /// End this slice; the vCPU stays runnable.
    Requeue,
    /// End this slice; the vCPU waits in HLT for its next interrupt.
    Halt,
    /// This vCPU is off (VCPU_OFF); the domain goes on.
    Retire,
    /// The domain ends normally: it asked to exit (port or hypercall) with this code.
    Exit(u64),
    /// A PC guest powered itself off (ACPI S5).
    PowerOff,
    /// A PC guest asked for a reset: the domain starts again from its boot images.
    Reboot,
    /// The guest's kernel panicked and said so (pvpanic): the domain stops as crashed.
    Crashed,
}

/// Why an exit stops the domain: the guest did something wrong, asked for something this
/// hypervisor does not offer, or the hypervisor itself failed. The message is what the
/// operator reads after `stopped:`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitError {
    Guest(String),
    Unsupported(String),
    Bug(String),
}

impl ExitError {
    pub fn message(&self) -> &str {
        match self {
            ExitError::Guest(m) | ExitError::Unsupported(m) | ExitError::Bug(m) => m,
        }
    }
}

impl core::fmt::Display for ExitError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.message())
    }
}

impl From<VmxError> for Box<ExitError> {
    #[cold]
    fn from(e: VmxError) -> Self {
        Box::new(ExitError::Bug(alloc::format!("{e}")))
    }
}

/// Errors are boxed: the `Ok` path is the hot one, and a small `Result` stays in registers.
pub type Result<T> = core::result::Result<T, Box<ExitError>>;

#[cold]
fn fail<T>(e: ExitError) -> Result<T> {
    Err(Box::new(e))
}

/// Feeds guest console bytes through the vCPU's line buffer and rate limit.
fn console(v: &mut VcpuCore, p: &mut impl Platform, bytes: &[u8]) {
    if p.console_raw(bytes) {
        return;
    }
    let window = p.console_window();
    for line in v.console.feed(bytes, window) {
        p.console_line(&line);
    }
}

/// Steps the guest over the instruction that exited.
#[inline(always)]
fn skip(a: &mut impl VmcsAccess, exit: &Exit) -> Result<Action> {
    let rip = a.get(f::GUEST_RIP);
    a.set(f::GUEST_RIP, rip.wrapping_add(exit.len))?;
    Ok(Action::Resume)
}

/// Hardware exception 13 with an error code of 0 (SDM Vol. 3C §24.8.3).
/// #UD (a hardware exception without an error code).
fn inject_ud(a: &mut impl VmcsAccess) -> Result<Action> {
    a.set(f::ENTRY_INTERRUPTION, 6 | (3 << 8) | (1 << 31))?;
    Ok(Action::Resume)
}

fn inject_gp(a: &mut impl VmcsAccess) -> Result<Action> {
    let info = 13 | (3 << 8) | (1 << 11) | (1 << 31);
    a.set(f::ENTRY_INTERRUPTION, info)?;
    a.set(f::ENTRY_ERROR_CODE, 0)?;
    Ok(Action::Resume)
}

/// General register `n` (0 = RAX .. 15 = R15; RSP lives in the VMCS).
fn gpr(a: &mut impl VmcsAccess, r: &GuestRegs, n: u8) -> u64 {
    match n {
        0 => r.rax,
        1 => r.rcx,
        2 => r.rdx,
        3 => r.rbx,
        4 => a.get(f::GUEST_RSP),
        5 => r.rbp,
        6 => r.rsi,
        7 => r.rdi,
        8 => r.r8,
        9 => r.r9,
        10 => r.r10,
        11 => r.r11,
        12 => r.r12,
        13 => r.r13,
        14 => r.r14,
        _ => r.r15,
    }
}

fn set_gpr(a: &mut impl VmcsAccess, r: &mut GuestRegs, n: u8, value: u64) -> Result<()> {
    let slot = match n {
        0 => &mut r.rax,
        1 => &mut r.rcx,
        2 => &mut r.rdx,
        3 => &mut r.rbx,
        4 => return Ok(a.set(f::GUEST_RSP, value)?),
        5 => &mut r.rbp,
        6 => &mut r.rsi,
        7 => &mut r.rdi,
        8 => &mut r.r8,
        9 => &mut r.r9,
        10 => &mut r.r10,
        11 => &mut r.r11,
        12 => &mut r.r12,
        13 => &mut r.r13,
        14 => &mut r.r14,
        _ => &mut r.r15,
    };
    *slot = value;
    Ok(())
}

/// Handles one exit. `Err` stops the domain with the error's message and a register dump.
/// Inlined into the run loop: the hypercall round trip is measured in instructions.
#[inline(always)]
pub fn handle(
    exit: &Exit,
    v: &mut VcpuCore,
    a: &mut impl VmcsAccess,
    mem: &impl GuestMemory,
    p: &mut impl Platform,
) -> Result<Action> {
    match exit.reason {
        ExitReason::Vmcall => vmcall(exit, v, a, mem, p),
        ExitReason::ExternalInterrupt | ExitReason::InterruptWindow => Ok(Action::Resume),
        ExitReason::PreemptionTimer => {
            // The guest's timer fell due: deliver it in this slice; else the slice is over.
            let due = v.timer.until_due(p.rdtsc()) == Some(0);
            if due && v.timer.poll(p.rdtsc()) {
                Ok(Action::Resume)
            } else {
                Ok(Action::Requeue)
            }
        }
        ExitReason::Cpuid => {
            let (leaf, sub) = (v.regs.rax as u32, v.regs.rcx as u32);
            let pol = policy::CpuidPolicy {
                vcpus: p.vcpus(),
                index: v.index,
                xcr0_allowed: p.xcr0_supported(),
                guest_osxsave: a.get(f::GUEST_CR4) & (1 << 18) != 0,
                tsc_khz: p.tsc_khz().min(u64::from(u32::MAX)) as u32,
                pc: v.lapic.is_some(),
                native_max: if v.lapic.is_some() {
                    p.cpuid(0, 0).eax
                } else {
                    0
                },
            };
            let r = policy::cpuid(leaf, sub, p.cpuid(leaf, sub), pol);
            v.regs.rax = u64::from(r.eax);
            v.regs.rbx = u64::from(r.ebx);
            v.regs.rcx = u64::from(r.ecx);
            v.regs.rdx = u64::from(r.edx);
            skip(a, exit)
        }
        ExitReason::Hlt => {
            skip(a, exit)?;
            // HLT right after STI (the usual way to wait) ran in the STI shadow; since we
            // completed it, the shadow must end here, or the wake-up interrupt could not be
            // injected before the next instruction (SDM Vol. 3C §25.4, "Blocking by STI").
            let intr = a.get(f::GUEST_INTERRUPTIBILITY);
            if intr & 1 != 0 {
                a.set(f::GUEST_INTERRUPTIBILITY, intr & !1)?;
            }
            Ok(Action::Halt)
        }
        ExitReason::Rdmsr | ExitReason::Wrmsr => msr(exit, v, a, p),
        ExitReason::IoInstruction => {
            let io = IoExit::decode(exit.qualification);
            if io.string {
                return fail(ExitError::Unsupported(alloc::format!(
                    "string I/O (INS/OUTS) to port {:#x} is not supported",
                    io.port
                )));
            }
            let value = v.regs.rax as u32;
            let now = if io.port == hv_platform::rtc::DATA_PORT {
                p.unix_time()
            } else {
                0
            };
            let (action, irq) = p.with_io(|b| {
                if let Some(pc) = b.pc.as_mut()
                    && let Some((a, irq)) = pc.port(io.port, io.size, io.input, value, now)
                {
                    return (
                        match a {
                            crate::io::pc::PcPort::Read(x) => PortAction::Read(x),
                            crate::io::pc::PcPort::Wrote(e) => PortAction::Wrote(e),
                        },
                        irq,
                    );
                }
                (b.ports.access(io.port, io.size, io.input, value), None)
            });
            if let Some(d) = irq {
                super::pc::deliver(v, p, d);
            }
            match action {
                PortAction::Read(x) => {
                    let mask = match io.size {
                        1 => 0xff,
                        2 => 0xffff,
                        _ => 0xffff_ffff,
                    };
                    v.regs.rax = (v.regs.rax & !mask) | (u64::from(x) & mask);
                }
                PortAction::Wrote(IoEvent::Console(b)) => console(v, p, &[b]),
                PortAction::Wrote(IoEvent::Exit(code)) => {
                    return Ok(Action::Exit(u64::from(code)));
                }
                PortAction::Wrote(IoEvent::None) => {}
                PortAction::Wrote(IoEvent::PowerOff) => return Ok(Action::PowerOff),
                PortAction::Wrote(IoEvent::Panicked) => return Ok(Action::Crashed),
                PortAction::Wrote(IoEvent::Reset) => return Ok(Action::Reboot),
            }
            skip(a, exit)
        }
        ExitReason::EptViolation => {
            let q = EptViolationExit::decode(exit.qualification);
            // The MMIO dispatch point: a device's range or the hole's empty bus; any other
            // access outside RAM, and any instruction fetch from MMIO, stops the domain.
            if !q.fetch
                && (super::pc::is_apic(v, exit.gpa) || p.with_io(|b| b.mmio.handles(exit.gpa)))
            {
                return emulate_mmio(v, a, mem, p, exit.gpa);
            }
            fail(ExitError::Guest(alloc::format!(
                "EPT violation: {} of guest-physical {:#x}, which is not its memory",
                q.access(),
                exit.gpa
            )))
        }
        ExitReason::TripleFault => fail(ExitError::Guest(String::from("triple fault"))),
        ExitReason::CrAccess => cr_access(exit, v, a, p),
        ExitReason::Xsetbv => {
            // XSETBV exits before its own checks only where CR4.OSXSAVE is set and CPL is 0
            // (else the CPU raised #UD/#GP itself); the value is ours to check.
            let value = (v.regs.rdx << 32) | (v.regs.rax & 0xffff_ffff);
            if v.regs.rcx as u32 == 0 && policy::xcr0_allowed(value, p.xcr0_supported()) {
                v.xcr0 = value;
                p.load_xcr0(value);
                skip(a, exit)
            } else {
                inject_gp(a)
            }
        }
        // VMX is not offered (CPUID.1:ECX.VMX clear, CR4.VMXE refused): its instructions are
        // #UD, as on a CPU without it.
        ExitReason::VmxInstruction(_) => inject_ud(a),
        ExitReason::Invlpg | ExitReason::Rdtsc => inject_gp(a),
        other => fail(ExitError::Unsupported(alloc::format!(
            "unhandled VM exit: {} ({:?})",
            other.name(),
            other
        ))),
    }
}

#[inline(always)]
fn vmcall(
    exit: &Exit,
    v: &mut VcpuCore,
    a: &mut impl VmcsAccess,
    mem: &impl GuestMemory,
    p: &mut impl Platform,
) -> Result<Action> {
    let args = [v.regs.rdi, v.regs.rsi, v.regs.rdx];
    let caller = hypercall::Caller {
        vcpus: p.vcpus(),
        started: p.vcpus_started(),
        privileged: p.privileged(),
    };
    match hypercall::dispatch(v.regs.rax, args, mem, caller) {
        Outcome::Return(x) => v.regs.rax = x as u64,
        Outcome::Console(bytes) => {
            console(v, p, &bytes);
            v.regs.rax = bytes.len() as u64;
        }
        Outcome::Exit(code) => return Ok(Action::Exit(code)),
        Outcome::Yield => {
            v.regs.rax = 0;
            skip(a, exit)?;
            return Ok(Action::Requeue);
        }
        Outcome::StartVcpu { index, rip, rsp } => {
            v.regs.rax = if p.start_vcpu(index, rip, rsp) {
                0
            } else {
                hv_abi::Status::InvalidArgument as i64 as u64
            };
        }
        Outcome::VcpuOff => return Ok(Action::Retire),
        Outcome::SetTimer { vector, period_us } => {
            if period_us == 0 {
                v.timer.off();
            } else {
                // Within u64: periods are at most 10 s, TSCs far below 2^44 kHz.
                let ticks = (period_us * p.tsc_khz() / 1000).max(1);
                v.timer.set(vector, ticks, p.rdtsc());
            }
            v.regs.rax = 0;
        }
        Outcome::Dom0(call) => {
            let bound = match call {
                Dom0Call::Wait { timeout_us } if timeout_us > 0 => Some(timeout_us),
                _ => None,
            };
            match p.dom0_call(call) {
                Dom0Reply::Return(x) => v.regs.rax = x as u64,
                Dom0Reply::Wait => {
                    v.regs.rax = 0;
                    // At most 10 s, like a timer period, so the product stays in u64.
                    v.wake_at = bound.map(|us| {
                        let ticks = (us.min(10_000_000) * p.tsc_khz() / 1000).max(1);
                        p.rdtsc().saturating_add(ticks)
                    });
                    skip(a, exit)?;
                    return Ok(Action::Halt);
                }
            }
        }
    }
    skip(a, exit)
}

fn msr(
    exit: &Exit,
    v: &mut VcpuCore,
    a: &mut impl VmcsAccess,
    p: &mut impl Platform,
) -> Result<Action> {
    let msr = v.regs.rcx as u32;
    let write = exit.reason == ExitReason::Wrmsr;
    let value = (v.regs.rdx << 32) | (v.regs.rax & 0xffff_ffff);
    match policy::spec_msr(msr, write, value, p.spec_msrs(), v.spec_ctrl) {
        policy::SpecMsr::NotSpec => {}
        policy::SpecMsr::Refuse => return inject_gp(a),
        policy::SpecMsr::Read(x) => {
            v.regs.rax = x & 0xffff_ffff;
            v.regs.rdx = x >> 32;
            return skip(a, exit);
        }
        policy::SpecMsr::SetSpecCtrl(x) => {
            // The CPU loads it at each entry, and the hypervisor's value (the exit area's) at
            // each exit, while the two differ.
            v.spec_ctrl = x;
            v.spec_areas.entry[1] = x;
            let n = u64::from(x != v.spec_areas.exit[1]);
            a.set(f::ENTRY_MSR_LOAD_COUNT, n)?;
            a.set(f::EXIT_MSR_LOAD_COUNT, n)?;
            return skip(a, exit);
        }
        policy::SpecMsr::Nothing => return skip(a, exit),
        what @ (policy::SpecMsr::Ibpb | policy::SpecMsr::L1dFlush) => {
            p.spec_barrier(what);
            return skip(a, exit);
        }
    }
    // A PC guest's APIC registers.
    if let Some(r) = super::pc::msr(v, p, msr, write.then_some(value)) {
        return match r {
            Ok(x) => {
                if !write {
                    v.regs.rax = x & 0xffff_ffff;
                    v.regs.rdx = x >> 32;
                }
                skip(a, exit)
            }
            Err(()) => inject_gp(a),
        };
    }
    // EFER: LMA is the processor's to set; the guest may change NXE and SCE only.
    const EFER_GUEST: u64 = (1 << 11) | 1;
    let result = match (policy::msr_rule(msr), write) {
        (None, _) => None,
        (Some(_), true) if !policy::msr_write_valid(msr, value) => None,
        (Some(MsrRule::Fixed(x)), false) => Some(x),
        (Some(MsrRule::Fixed(_)), true) => Some(0),
        (Some(MsrRule::Stored), false) => Some(p.live_msr(msr).unwrap_or(v.msrs.get(msr))),
        (Some(MsrRule::Stored), true) => {
            v.msrs.set(msr, value);
            p.load_msr(msr, value);
            Some(0)
        }
        (Some(MsrRule::Tsc), false) => Some(p.rdtsc()),
        (Some(MsrRule::Tsc), true) => Some(0),
        (Some(MsrRule::VmcsField(field)), false) => Some(a.get(field)),
        (Some(MsrRule::VmcsField(field)), true) if field == f::GUEST_EFER => {
            let keep = a.get(f::GUEST_EFER) & !EFER_GUEST;
            a.set(f::GUEST_EFER, keep | (value & EFER_GUEST))?;
            Some(0)
        }
        (Some(MsrRule::VmcsField(field)), true) => {
            a.set(field, value)?;
            Some(0)
        }
    };
    match result {
        Some(x) => {
            if !write {
                v.regs.rax = x & 0xffff_ffff;
                v.regs.rdx = x >> 32;
            }
            skip(a, exit)
        }
        None => inject_gp(a),
    }
}

fn cr_access(
    exit: &Exit,
    v: &mut VcpuCore,
    a: &mut impl VmcsAccess,
    p: &mut impl Platform,
) -> Result<Action> {
    let fixed = p.fixed_bits();
    let long_mode = a.get(f::GUEST_EFER) & (1 << 10) != 0;
    let cr0 = |value| cr::write_cr0(value, fixed.cr0_fixed0, fixed.cr0_fixed1, long_mode);
    let result = match CrExit::decode(exit.qualification) {
        CrExit::MovTo { cr: 0, gpr: n } => cr0(gpr(a, &v.regs, n)).map(|c| (0, c)),
        CrExit::MovTo { cr: 4, gpr: n } => cr::write_cr4(
            gpr(a, &v.regs, n),
            fixed.cr4_fixed0,
            fixed.cr4_fixed1,
            long_mode,
        )
        .map(|c| (4, c)),
        // CLTS clears CR0.TS; LMSW loads CR0[3:0] but cannot clear PE.
        CrExit::Clts => cr0(a.get(f::CR0_SHADOW) & !8).map(|c| (0, c)),
        CrExit::Lmsw(src) => {
            let old = a.get(f::CR0_SHADOW);
            cr0((old & !0xe) | (u64::from(src) & 0xf) | (old & 1)).map(|c| (0, c))
        }
        other => {
            return fail(ExitError::Unsupported(alloc::format!(
                "unhandled control-register access {other:?}"
            )));
        }
    };
    match result {
        Ok((reg, c)) => {
            let (actual, shadow) = if reg == 0 {
                (f::GUEST_CR0, f::CR0_SHADOW)
            } else {
                (f::GUEST_CR4, f::CR4_SHADOW)
            };
            a.set(actual, c.actual)?;
            a.set(shadow, c.shadow)?;
            skip(a, exit)
        }
        Err(cr::InjectGp) => inject_gp(a),
    }
}

/// A load from MMIO: a PC vCPU's interrupt controllers (`apic`) or the domain's MMIO bus.
fn mmio_read(
    v: &mut VcpuCore,
    p: &mut impl Platform,
    apic: bool,
    gpa: u64,
    size: u8,
) -> core::result::Result<u64, crate::io::mmio::NotMmio> {
    if apic {
        return Ok(super::pc::read(v, p, gpa));
    }
    p.with_io(|b| b.mmio.read(gpa, size))
}

/// A store to MMIO, as [`mmio_read`].
fn mmio_write<M: GuestMemory>(
    v: &mut VcpuCore,
    p: &mut impl Platform,
    mem: &M,
    apic: bool,
    gpa: u64,
    size: u8,
    value: u64,
) -> core::result::Result<(), crate::io::mmio::NotMmio> {
    if apic {
        super::pc::write(v, p, gpa, value);
        return Ok(());
    }
    p.with_io(|b| b.mmio.write(mem, gpa, size, value))
}

/// Completes a guest load or store to MMIO through the domain's MMIO bus: the instruction is
/// read through the guest's page tables and decoded (the moves `vmx::decode` accepts; anything
/// else stops the domain).
fn emulate_mmio<M: GuestMemory>(
    v: &mut VcpuCore,
    a: &mut impl VmcsAccess,
    mem: &M,
    p: &mut impl Platform,
    gpa: u64,
) -> Result<Action> {
    let rip = a.get(f::GUEST_RIP);
    let cr3 = a.get(f::GUEST_CR3);
    // The instruction's bytes: one page walk per page they lie on (at most two), then the
    // bytes of that page in one read.
    let mut bytes = [0u8; decode::MAX_LEN];
    let mut n = 0;
    while n < bytes.len() {
        let at = rip.wrapping_add(n as u64);
        let Some(pa) = translate(mem, cr3, at) else {
            break;
        };
        let in_page = (0x1000 - (at & 0xfff)) as usize;
        let take = in_page.min(bytes.len() - n);
        if mem.read(GuestAddr(pa), &mut bytes[n..n + take]).is_err() {
            break;
        }
        n += take;
    }
    let apic = super::pc::is_apic(v, gpa);
    let d = decode::decode(&bytes[..n]).map_err(|e| {
        Box::new(ExitError::Unsupported(alloc::format!(
            "MMIO access to guest-physical {gpa:#x} by an instruction not emulated ({e:?}; bytes {:02x?})",
            &bytes[..n.min(8)]
        )))
    })?;
    let outside = || {
        Box::new(ExitError::Guest(alloc::format!(
            "MMIO access to guest-physical {gpa:#x} outside every device and the MMIO hole"
        )))
    };
    match d.access {
        decode::Access::Load { reg, size, .. } => {
            let data = mmio_read(v, p, apic, gpa, size).map_err(|_| outside())?;
            let old = gpr(a, &v.regs, reg);
            set_gpr(a, &mut v.regs, reg, decode::apply_load(old, d.access, data))?;
        }
        decode::Access::StoreReg {
            reg,
            size,
            high_byte,
        } => {
            let r = gpr(a, &v.regs, reg);
            let value = if high_byte { r >> 8 } else { r };
            mmio_write(v, p, mem, apic, gpa, size, value).map_err(|_| outside())?;
        }
        decode::Access::StoreImm { value, size } => {
            mmio_write(v, p, mem, apic, gpa, size, value).map_err(|_| outside())?;
        }
        decode::Access::Alu {
            op,
            size,
            other,
            mem_first,
            writes,
        } => {
            let m = mmio_read(v, p, apic, gpa, size).map_err(|_| outside())?;
            let (reg, high_byte, o) = match other {
                decode::Operand::Reg { reg, high_byte } => {
                    let r = gpr(a, &v.regs, reg);
                    (Some(reg), high_byte, if high_byte { r >> 8 } else { r })
                }
                decode::Operand::Imm(x) => (None, false, x),
            };
            let (first, second) = if mem_first { (m, o) } else { (o, m) };
            let (result, flags) = decode::alu(op, size, first, second);
            match (writes, reg) {
                (decode::AluWrites::Memory, _) => {
                    mmio_write(v, p, mem, apic, gpa, size, result).map_err(|_| outside())?
                }
                (decode::AluWrites::Register, Some(reg)) => {
                    let load = decode::Access::Load {
                        reg,
                        size,
                        high_byte,
                        zero_extend: false,
                        dest_size: size,
                    };
                    let old = gpr(a, &v.regs, reg);
                    set_gpr(a, &mut v.regs, reg, decode::apply_load(old, load, result))?;
                }
                _ => {}
            }
            let rflags = a.get(f::GUEST_RFLAGS);
            a.set(f::GUEST_RFLAGS, (rflags & !decode::ARITH_FLAGS) | flags | 2)?;
        }
    }
    a.set(f::GUEST_RIP, rip.wrapping_add(d.len as u64))?;
    Ok(Action::Resume)
}

/// Turns interrupt-window exiting on while an interrupt `waiting` for the guest to take it
/// (SDM Vol. 3C §25.2), off otherwise; the VMCS is written only when that changes.
pub fn window_exiting(v: &mut VcpuCore, a: &mut impl VmcsAccess, waiting: bool) -> Result<()> {
    if waiting != v.window_exiting {
        let procbased = a.get(f::PROCBASED);
        let want = if waiting {
            procbased | (1 << 2)
        } else {
            procbased & !(1 << 2)
        };
        a.set(f::PROCBASED, want)?;
        v.window_exiting = waiting;
    }
    Ok(())
}

/// Before an entry: injects the pending timer interrupt, or else the lowest pending device
/// interrupt, if the guest can take one now; while one still waits (the guest cannot take it,
/// or more are pending), asks for an exit as soon as it can (interrupt-window exiting, SDM
/// Vol. 3C §25.2).
pub fn deliver_timer(v: &mut VcpuCore, a: &mut impl VmcsAccess) -> Result<()> {
    if a.get(f::ENTRY_INTERRUPTION) & (1 << 31) != 0 {
        return Ok(()); // another event (an exception) goes first
    }
    let ready = vtimer::can_inject(a.get(f::GUEST_RFLAGS), a.get(f::GUEST_INTERRUPTIBILITY));
    if ready {
        let vector = match v.timer.take() {
            Some(vector) => Some(vector),
            None if v.irqs != 0 => {
                let i = v.irqs.trailing_zeros();
                v.irqs &= !(1 << i);
                Some(hv_abi::devices::VIRTIO_VECTOR_BASE.saturating_add(i as u8))
            }
            None => None,
        };
        if let Some(vector) = vector {
            // External interrupt, vector as asked (SDM Vol. 3C §24.8.3).
            a.set(f::ENTRY_INTERRUPTION, u64::from(vector) | (1 << 31))?;
        }
    }
    let waiting = !ready || v.timer.is_pending() || v.irqs != 0;
    window_exiting(v, a, waiting)
}
