//! VMX operation on one CPU: VMXON, VMCS regions and the VM entry/exit path.
//!
//! Ownership carries the rules the SDM sets (Vol. 3C ch. 24, 26, 27), so safe code cannot
//! break them:
//! - a [`VmxCpu`] exists only on a CPU that executed VMXON; it is neither `Send` nor `Clone`;
//! - a [`Vmcs`] is a region this module allocated and initialised (revision id, VMCLEAR); safe
//!   code cannot load a VMCS from a bare address;
//! - an [`ActiveVmcs`] borrows both, so at most one VMCS is current per CPU, and it is the only
//!   way to VMREAD/VMWRITE. Guest-state and control fields are [`Field`]s, exit information is
//!   [`ExitInfo`] (read-only); host-state fields are written only by
//!   [`ActiveVmcs::set_host_state`] from a [`HostState`] captured on this CPU, and the host RIP
//!   is always the exit path below.

use core::arch::naked_asm;
use core::marker::PhantomData;

use x86::vmx::vmcs::{host, ro};

use super::caps::VmxCaps;
pub use super::vmcs::{ExitInfo, Field, FixedBits, GuestRegs, VmxError, fields};
use crate::arch::cpu;
use crate::mm::frames::{FrameAllocator, FrameRun};

const CR0_FIXED0: u32 = 0x486;
const CR0_FIXED1: u32 = 0x487;
const CR4_FIXED0: u32 = 0x488;
const CR4_FIXED1: u32 = 0x489;
const CR4_VMXE: u64 = 1 << 13;

fn alloc_region(frames: &mut FrameAllocator, revision: u32) -> Result<FrameRun, VmxError> {
    let run = frames
        .alloc_contiguous(1, 4096, u64::MAX)
        .ok_or(VmxError::OutOfMemory)?;
    let f = run.addr().0;
    // SAFETY: a fresh frame owned by `run`, identity-mapped (crate-level assumptions).
    unsafe {
        core::ptr::write_bytes(f as *mut u8, 0, 4096);
        (f as *mut u32).write_volatile(revision);
    }
    Ok(run)
}

/// What this CPU says of its speculative-execution bugs (CPUID leaf 7, IA32_ARCH_CAPABILITIES
/// where CPUID offers it, SMT from leaf 0xB).
pub fn cpu_bugs() -> super::spec::CpuBugs {
    let edx = cpu::cpuid(7, 0).edx;
    let arch_cap = if edx & super::spec::cpuid7::ARCH_CAPABILITIES != 0 {
        // SAFETY: IA32_ARCH_CAPABILITIES (0x10A) exists when CPUID.7.EDX[29] says so.
        unsafe { cpu::rdmsr(0x10a) }
    } else {
        0
    };
    let smt = cpu::cpuid(0, 0).eax >= 0xb && cpu::cpuid(0xb, 0).ebx & 0xffff > 1;
    super::spec::CpuBugs {
        cpuid7_edx: edx,
        arch_cap,
        smt,
    }
}

/// VERW with a data-segment selector: on CPUs with MD_CLEAR it clears the CPU's buffers.
#[inline(always)]
pub fn clear_cpu_buffers() {
    static SELECTOR: u16 = 0x10;
    // SAFETY: VERW only reads the selector and sets ZF; 0x10 is the hypervisor's data segment,
    // valid in every GDT it loads.
    unsafe {
        core::arch::asm!("verw word ptr [{0}]", in(reg) &SELECTOR, options(nostack, readonly));
    }
}

/// IBPB: indirect-branch predictions made so far cannot steer later branches.
pub fn ibpb() {
    // SAFETY: IA32_PRED_CMD (0x49) exists where CPUID.7.EDX[26] says so, which the caller's
    // mitigation choice checked; writing bit 0 has no other effect.
    unsafe { cpu::wrmsr(0x49, 1) }
}

/// Flushes the L1 data cache (IA32_FLUSH_CMD, 0x10B).
pub fn flush_l1d() {
    // SAFETY: the MSR exists where CPUID.7.EDX[28] says so, which the caller's mitigation
    // choice checked; bit 0 writes back and invalidates L1D, nothing else.
    unsafe { cpu::wrmsr(0x10b, 1) }
}

impl FixedBits {
    pub fn read() -> FixedBits {
        // SAFETY: these MSRs exist on every CPU with VMX (SDM Vol. 3D §A.7, §A.8); callers
        // only reach here after the probe found VMX.
        unsafe {
            FixedBits {
                cr0_fixed0: cpu::rdmsr(CR0_FIXED0),
                cr0_fixed1: cpu::rdmsr(CR0_FIXED1),
                cr4_fixed0: cpu::rdmsr(CR4_FIXED0),
                cr4_fixed1: cpu::rdmsr(CR4_FIXED1),
            }
        }
    }
}

/// This CPU in VMX root operation.
pub struct VmxCpu {
    caps: VmxCaps,
    _vmxon_region: u64,
    /// Not `Send`: VMX state belongs to the CPU that entered it.
    _here: PhantomData<*const ()>,
}

impl VmxCpu {
    /// Executes VMXON on this CPU (the probe must have found VMX available).
    pub fn enable(caps: VmxCaps, frames: &mut FrameAllocator) -> Result<VmxCpu, VmxError> {
        // VMXON regions stay for the whole run: VMX stays on.
        let region = alloc_region(frames, caps.vmcs_revision())?.keep_forever().0;
        let fixed = FixedBits::read();
        // SAFETY: CR0/CR4 are adjusted only by the bits VMX operation requires (SDM Vol. 3C
        // §23.8): the fixed-0 bits set, the fixed-1 bits kept; on this hypervisor those are
        // PE, PG, NE and VMXE, which leave its own execution unchanged. VMXON then takes the
        // region initialised above.
        unsafe {
            let cr4 = x86_64::registers::control::Cr4::read_raw();
            x86_64::registers::control::Cr4::write_raw(
                (cr4 | CR4_VMXE | fixed.cr4_fixed0) & fixed.cr4_fixed1,
            );
            let cr0 = x86_64::registers::control::Cr0::read_raw();
            x86_64::registers::control::Cr0::write_raw((cr0 | fixed.cr0_fixed0) & fixed.cr0_fixed1);
            x86::bits64::vmx::vmxon(region).map_err(|_| VmxError::VmxonFailed)?;
        }
        Ok(VmxCpu {
            caps,
            _vmxon_region: region,
            _here: PhantomData,
        })
    }

    pub fn caps(&self) -> &VmxCaps {
        &self.caps
    }

    /// Makes `vmcs` current on this CPU (VMPTRLD). A VMCS launched on another CPU is refused
    /// (its state may still be cached there): it must be moved with [`Vmcs::clear_for_move`]
    /// on the CPU that ran it first.
    pub fn load<'a>(&'a mut self, vmcs: &'a mut Vmcs) -> Result<ActiveVmcs<'a>, VmxError> {
        let here = cpu::current_cpu();
        match vmcs.cpu {
            Some(c) if c != here => {
                return Err(VmxError::WrongCpu { loaded_on: c, here });
            }
            _ => vmcs.cpu = Some(here),
        }
        // SAFETY: `vmcs.region` was allocated and initialised by `Vmcs::new` with this CPU's
        // revision id, and VMCS regions are never shared between CPUs at the same time (a
        // `Vmcs` is owned by one vCPU, which runs on one CPU).
        unsafe { x86::bits64::vmx::vmptrld(vmcs.region) }.map_err(|_| VmxError::Instruction(0))?;
        Ok(ActiveVmcs {
            vmcs,
            _cpu: PhantomData,
            reads: 0,
            writes: 0,
        })
    }
}

/// A VMCS region owned by one vCPU, bound to the CPU that first loads it.
pub struct Vmcs {
    frame: FrameRun,
    region: u64,
    launched: bool,
    /// The CPU it was loaded on; another CPU may load it only after `clear_for_move`.
    cpu: Option<usize>,
}

impl Vmcs {
    pub fn new(caps: &VmxCaps, frames: &mut FrameAllocator) -> Result<Vmcs, VmxError> {
        let frame = alloc_region(frames, caps.vmcs_revision())?;
        let region = frame.addr().0;
        // SAFETY: VMCLEAR of a region just initialised with the revision id puts it in the
        // "clear" launch state, as the SDM requires before first use (Vol. 3C §24.11.3).
        if unsafe { x86::bits64::vmx::vmclear(region) }.is_err() {
            crate::mm::give_back(frames, frame);
            return Err(VmxError::Instruction(0));
        }
        Ok(Vmcs {
            frame,
            region,
            launched: false,
            cpu: None,
        })
    }

    /// Flushes the VMCS to memory and makes it loadable on any CPU (VMCLEAR on the CPU that ran
    /// it; the next entry is a VMLAUNCH), the explicit step for moving a vCPU.
    pub fn clear_for_move(&mut self) -> Result<(), VmxError> {
        if let Some(c) = self.cpu
            && c != cpu::current_cpu()
        {
            return Err(VmxError::WrongCpu {
                loaded_on: c,
                here: cpu::current_cpu(),
            });
        }
        // SAFETY: the region is a valid VMCS owned by this vCPU, on the CPU that ran it.
        unsafe { x86::bits64::vmx::vmclear(self.region) }.map_err(|_| VmxError::Instruction(0))?;
        self.cpu = None;
        self.launched = false;
        Ok(())
    }

    /// Flushes the VMCS to memory and returns its frame (the vCPU is going away).
    pub fn release(self) -> FrameRun {
        // SAFETY: the region is a valid VMCS; VMCLEAR makes it inactive on this CPU, after which
        // the frame is no longer used by the processor.
        let _ = unsafe { x86::bits64::vmx::vmclear(self.region) };
        self.frame
    }
}

/// Host state, captured on the CPU that will run the VMCS.
#[derive(Clone, Copy, Debug)]
pub struct HostState {
    cr0: u64,
    cr3: u64,
    cr4: u64,
    tr: u16,
    gs_base: u64,
    tr_base: u64,
    gdtr_base: u64,
    idtr_base: u64,
    efer: u64,
    pat: u64,
}

impl HostState {
    /// What this CPU looks like now (after `gdt::init_this_cpu`).
    pub fn capture() -> HostState {
        let gdt = x86_64::instructions::tables::sgdt();
        let idt = x86_64::instructions::tables::sidt();
        let tr: u16;
        // SAFETY: STR only reads the task register.
        unsafe {
            core::arch::asm!("str {0:x}", out(reg) tr, options(nomem, nostack, preserves_flags))
        };
        // The TSS descriptor (16 bytes in long mode) holds the base in bits 16..40, 56..64 of
        // the low quadword and 0..32 of the high one.
        // SAFETY: TR indexes the GDT this CPU loaded, which is leaked (lives forever).
        let (lo, hi) = unsafe {
            let d = (gdt.base.as_u64() + u64::from(tr & !7)) as *const u64;
            (d.read(), d.add(1).read())
        };
        let tr_base = ((lo >> 16) & 0xff_ffff) | ((lo >> 56) << 24) | ((hi & 0xffff_ffff) << 32);
        // SAFETY: EFER, PAT and GS_BASE exist on every x86_64 CPU.
        let (efer, pat, gs_base) = unsafe {
            (
                cpu::rdmsr(0xc000_0080),
                cpu::rdmsr(0x277),
                cpu::rdmsr(cpu::IA32_GS_BASE),
            )
        };
        HostState {
            cr0: x86_64::registers::control::Cr0::read_raw(),
            cr3: x86_64::registers::control::Cr3::read_raw()
                .0
                .start_address()
                .as_u64(),
            cr4: x86_64::registers::control::Cr4::read_raw(),
            tr,
            gs_base,
            tr_base,
            gdtr_base: gdt.base.as_u64(),
            idtr_base: idt.base.as_u64(),
            efer,
            pat,
        }
    }
}

/// The current VMCS of this CPU.
pub struct ActiveVmcs<'a> {
    vmcs: &'a mut Vmcs,
    _cpu: PhantomData<&'a mut VmxCpu>,
    /// VMREADs and VMWRITEs since the counters were last taken (for `bench vmcall`).
    pub reads: u32,
    pub writes: u32,
}

impl ActiveVmcs<'_> {
    // VMREAD and VMWRITE are written out here rather than taken from the `x86` crate, whose
    // wrappers read RFLAGS back with PUSHF/POP on every access: these run on every exit, and
    // the exit path is measured in instructions (`cargo xtask bench vmcall`).
    #[inline(always)]
    fn vmread(&mut self, enc: u32) -> u64 {
        self.reads += 1;
        let value: u64;
        // SAFETY: this VMCS is current on this CPU (the borrow proves it) and `enc` is one of
        // the field encodings above, all of which exist on CPUs with the features we enable.
        // A failing VMREAD (VMfail) leaves its destination unchanged, so it reads as the 0
        // loaded first; VMREAD touches no memory Rust knows about.
        unsafe {
            core::arch::asm!(
                "xor {v:e}, {v:e}",
                "vmread {v}, {e}",
                e = in(reg) u64::from(enc),
                v = out(reg) value,
                options(nostack),
            );
        }
        value
    }

    #[inline(always)]
    fn vmwrite(&mut self, enc: u32, value: u64) -> Result<(), VmxError> {
        self.writes += 1;
        let ok: u8;
        // SAFETY: as for `vmread`: the VMCS is current and VMWRITE touches no memory Rust knows
        // about. What a value means to the CPU is the caller's responsibility, and it matters
        // beyond the guest: control fields decide what exits (the host keeps its CPU only while
        // external interrupts and the preemption timer do), host-state fields where the CPU
        // returns, and address fields what host memory the CPU reads and writes. Hence `set`
        // takes only a `Field` (guest-state and control fields that hold no host address,
        // checked at compile time), controls are computed from the capability MSRs in
        // `setup.rs`, the host state from this CPU (`set_host_state`), and the host-address
        // fields come only from their owners' types (`set_eptp`). A value the CPU rejects
        // makes VM entry fail, which is reported. VMsucceed clears CF and ZF ("above").
        unsafe {
            core::arch::asm!(
                "vmwrite {e}, {v}",
                "seta {ok}",
                e = in(reg) u64::from(enc),
                v = in(reg) value,
                ok = out(reg_byte) ok,
                options(nostack),
            );
        }
        if ok != 0 {
            Ok(())
        } else {
            Err(VmxError::Instruction(self.read_error()))
        }
    }

    #[cold]
    fn read_error(&mut self) -> u64 {
        self.vmread(ro::VM_INSTRUCTION_ERROR)
    }

    #[inline]
    pub fn get(&mut self, f: Field) -> u64 {
        self.vmread(f.encoding())
    }

    #[inline]
    pub fn set(&mut self, f: Field, value: u64) -> Result<(), VmxError> {
        if f.width() < 64 && value >> f.width() != 0 {
            return Err(VmxError::TooWide {
                field: f.encoding(),
                value,
            });
        }
        self.vmwrite(f.encoding(), value)
    }

    #[inline]
    pub fn info(&mut self, f: ExitInfo) -> u64 {
        self.vmread(f.encoding())
    }

    /// The EPT pointer, from the EPT that owns its tables.
    pub fn set_eptp(&mut self, eptp: super::ept::Eptp) -> Result<(), VmxError> {
        self.vmwrite(x86::vmx::vmcs::control::EPTP_FULL, eptp.value())
    }

    /// The I/O bitmaps (A, then B in the next page). The hypervisor's memory is
    /// identity-mapped, so their address is their physical address; `b` must outlive every
    /// entry with this VMCS (a domain's own, or the static all-exit pair).
    pub fn set_io_bitmaps(&mut self, b: &super::iobitmap::IoBitmaps) -> Result<(), VmxError> {
        use x86::vmx::vmcs::control as c;
        self.vmwrite(c::IO_BITMAP_A_ADDR_FULL, b.address())?;
        self.vmwrite(c::IO_BITMAP_B_ADDR_FULL, b.address() + 4096)
    }

    /// The VM-entry and VM-exit MSR-load areas that switch IA32_SPEC_CTRL (their counts, 0
    /// or 1, are ordinary fields the exit dispatcher sets). The hypervisor's memory is
    /// identity-mapped, so the areas' addresses are their physical addresses.
    pub fn set_spec_ctrl_areas(
        &mut self,
        areas: &super::policy::SpecCtrlAreas,
    ) -> Result<(), VmxError> {
        use x86::vmx::vmcs::control as c;
        self.vmwrite(c::VMENTRY_MSR_LOAD_ADDR_FULL, areas.entry.as_ptr() as u64)?;
        self.vmwrite(c::VMEXIT_MSR_LOAD_ADDR_FULL, areas.exit.as_ptr() as u64)
    }

    /// No shadow VMCS: the link pointer's "none" value (SDM Vol. 3C §25.4.2).
    pub fn set_no_vmcs_link(&mut self) -> Result<(), VmxError> {
        self.vmwrite(x86::vmx::vmcs::guest::LINK_PTR_FULL, u64::MAX)
    }

    /// Writes the host-state area from `h`; the host RIP is always the exit path, with the RSB
    /// fill in front of it when `rsb_fill` (see `vmx::spec`).
    pub fn set_host_state(&mut self, h: &HostState, rsb_fill: bool) -> Result<(), VmxError> {
        let w = |s: &mut Self, enc: u32, v: u64| s.vmwrite(enc, v);
        w(self, host::CR0, h.cr0)?;
        w(self, host::CR3, h.cr3)?;
        w(self, host::CR4, h.cr4)?;
        w(self, host::CS_SELECTOR, 0x08)?;
        for sel in [host::SS_SELECTOR, host::DS_SELECTOR, host::ES_SELECTOR] {
            w(self, sel, 0x10)?;
        }
        w(self, host::FS_SELECTOR, 0)?;
        w(self, host::GS_SELECTOR, 0)?;
        w(self, host::TR_SELECTOR, u64::from(h.tr))?;
        w(self, host::FS_BASE, 0)?;
        w(self, host::GS_BASE, h.gs_base)?;
        w(self, host::TR_BASE, h.tr_base)?;
        w(self, host::GDTR_BASE, h.gdtr_base)?;
        w(self, host::IDTR_BASE, h.idtr_base)?;
        w(self, host::IA32_SYSENTER_CS, 0)?;
        w(self, host::IA32_SYSENTER_ESP, 0)?;
        w(self, host::IA32_SYSENTER_EIP, 0)?;
        w(self, host::IA32_EFER_FULL, h.efer)?;
        w(self, host::IA32_PAT_FULL, h.pat)?;
        let rip = if rsb_fill {
            vmx_exit_point_rsb as *const () as u64
        } else {
            vmx_exit_point as *const () as u64
        };
        w(self, host::RIP, rip)?;
        Ok(())
    }

    /// Enters the guest until its next VM exit. Interrupts must be disabled by the caller.
    #[inline]
    pub fn run(&mut self, regs: &mut GuestRegs) -> Result<(), VmxError> {
        // SAFETY: this VMCS is current and complete (host state set by `set_host_state`, whose
        // RIP is `vmx_exit_point`); `vmx_enter` writes HOST_RSP itself, saves every guest GPR
        // into `regs` on exit and restores the callee-saved host registers.
        let failed = unsafe { vmx_enter(regs, u64::from(self.vmcs.launched)) };
        if failed != 0 {
            return Err(VmxError::Instruction(self.read_error()));
        }
        self.vmcs.launched = true;
        Ok(())
    }
}

impl super::vmcs::VmcsAccess for ActiveVmcs<'_> {
    #[inline]
    fn get(&mut self, f: Field) -> u64 {
        ActiveVmcs::get(self, f)
    }

    #[inline]
    fn set(&mut self, f: Field, value: u64) -> Result<(), VmxError> {
        ActiveVmcs::set(self, f, value)
    }

    #[inline]
    fn info(&mut self, f: ExitInfo) -> u64 {
        ActiveVmcs::info(self, f)
    }
}

unsafe extern "C" {
    /// The host RIP of every VMCS: the second half of `vmx_enter`.
    fn vmx_exit_point();
    /// The same, after an RSB fill.
    fn vmx_exit_point_rsb();
}

/// Loads the guest's registers and executes VMLAUNCH (first entry) or VMRESUME. Returns 0
/// after a VM exit (guest registers saved into `regs`), 1 if the entry instruction failed.
///
/// # Safety
/// The current VMCS must be complete with `vmx_exit_point` as its host RIP, and interrupts
/// must be disabled.
#[unsafe(naked)]
unsafe extern "C" fn vmx_enter(regs: *mut GuestRegs, launched: u64) -> u64 {
    naked_asm!(
        "push rbp",
        "push rbx",
        "push r12",
        "push r13",
        "push r14",
        "push r15",
        "push rdi",
        "mov rax, 0x6c14",
        "vmwrite rax, rsp",
        "mov rax, [rdi + 120]",
        "mov cr2, rax",
        "cmp rsi, 0",
        "mov rax, [rdi + 0]",
        "mov rbx, [rdi + 8]",
        "mov rcx, [rdi + 16]",
        "mov rdx, [rdi + 24]",
        "mov rsi, [rdi + 32]",
        "mov rbp, [rdi + 48]",
        "mov r8, [rdi + 56]",
        "mov r9, [rdi + 64]",
        "mov r10, [rdi + 72]",
        "mov r11, [rdi + 80]",
        "mov r12, [rdi + 88]",
        "mov r13, [rdi + 96]",
        "mov r14, [rdi + 104]",
        "mov r15, [rdi + 112]",
        "mov rdi, [rdi + 40]",
        "je 2f",
        "vmresume",
        "jmp 3f",
        "2:",
        "vmlaunch",
        "3:",
        "pop rdi",
        "pop r15",
        "pop r14",
        "pop r13",
        "pop r12",
        "pop rbx",
        "pop rbp",
        "mov eax, 1",
        "ret",
        // The host RIP of VMCSs on CPUs that fill the RSB (see `vmx::spec`): before anything
        // returns, 16 iterations of two calls each put 32 harmless return addresses in the
        // return-stack buffer, overwriting what the guest trained (each call's fall-through is
        // a speculation trap); then the 32 return addresses are dropped from the stack. Only
        // the guest's RCX is touched, and it is saved around the fill.
        ".global vmx_exit_point_rsb",
        "vmx_exit_point_rsb:",
        "push rcx",
        "mov ecx, 16",
        "4:",
        "call 5f",
        "int3",
        "lfence",
        "5:",
        "call 6f",
        "int3",
        "lfence",
        "6:",
        "dec ecx",
        "jnz 4b",
        "add rsp, 256",
        "pop rcx",
        ".global vmx_exit_point",
        "vmx_exit_point:",
        "push rdi",
        "mov rdi, [rsp + 8]",
        "mov [rdi + 0], rax",
        "mov [rdi + 8], rbx",
        "mov [rdi + 16], rcx",
        "mov [rdi + 24], rdx",
        "mov [rdi + 32], rsi",
        "mov [rdi + 48], rbp",
        "mov [rdi + 56], r8",
        "mov [rdi + 64], r9",
        "mov [rdi + 72], r10",
        "mov [rdi + 80], r11",
        "mov [rdi + 88], r12",
        "mov [rdi + 96], r13",
        "mov [rdi + 104], r14",
        "mov [rdi + 112], r15",
        "pop rax",
        "mov [rdi + 40], rax",
        "mov rax, cr2",
        "mov [rdi + 120], rax",
        "pop rdi",
        "pop r15",
        "pop r14",
        "pop r13",
        "pop r12",
        "pop rbx",
        "pop rbp",
        "xor eax, eax",
        "ret",
    )
}

/// INVEPT all-context: drops every cached EPT translation on this CPU (after an EPT change).
pub fn invept_all() {
    let descriptor = [0u64; 2];
    // SAFETY: type 2 (all-context) needs no valid EPTP in the descriptor; INVEPT only drops
    // cached translations. Callers reach here only with VMX on and INVEPT supported.
    unsafe {
        core::arch::asm!("invept {0}, [{1}]", in(reg) 2u64, in(reg) &descriptor, options(nostack));
    }
}
