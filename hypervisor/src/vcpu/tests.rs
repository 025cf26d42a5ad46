//! Host tests of the exit dispatcher: each exit it handles, through a fake VMCS, plain guest
//! memory and a fake platform. Each would fail if that exit were mishandled (wrong register,
//! RIP not stepped or stepped wrongly, #GP missing or spurious, the wrong action).

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::arch::x86_64::CpuidResult;

use super::dispatch::{Action, ExitError, Platform, VcpuCore, deliver_timer, handle};
use super::exit::Exit;
use crate::domain::memory::{GuestAddr, GuestMemory, VecGuestMemory};
use crate::io::DomainIo;
use crate::io::mmio::MmioDevice;
use crate::vmx::exit::ExitReason;
use crate::vmx::vmcs::FakeVmcs;
use crate::vmx::vmcs::{FixedBits, GuestRegs, fields as f};
use hv_abi::hypercall as nr;

struct FakePlatform {
    io: DomainIo,
    console: Vec<u8>,
    xcr0_loaded: Option<u64>,
    started: u64,
    start_requests: Vec<(u32, u64, u64)>,
    tsc: u64,
    barriers: Vec<crate::vmx::policy::SpecMsr>,
    /// MSR values loaded into the "CPU" (`load_msr`), and the CPU's KERNEL_GS_BASE now.
    loaded: Vec<(u32, u64)>,
    cpu_kernel_gs: Option<u64>,
}

impl Default for FakePlatform {
    fn default() -> Self {
        FakePlatform {
            io: DomainIo::standard(),
            console: Vec::new(),
            xcr0_loaded: None,
            started: 0,
            start_requests: Vec::new(),
            barriers: Vec::new(),
            tsc: 0,
            loaded: Vec::new(),
            cpu_kernel_gs: None,
        }
    }
}

impl Platform for FakePlatform {
    fn with_io<R>(&mut self, f: impl FnOnce(&mut DomainIo) -> R) -> R {
        f(&mut self.io)
    }
    fn cpuid(&self, leaf: u32, _sub: u32) -> CpuidResult {
        CpuidResult {
            eax: leaf,
            ebx: 0x1111,
            ecx: 1 << 5, // VMX, which the policy must hide
            edx: 0x2222,
        }
    }
    fn rdtsc(&self) -> u64 {
        self.tsc
    }
    fn load_msr(&mut self, msr: u32, value: u64) {
        self.loaded.push((msr, value));
        if msr == crate::vmx::policy::KERNEL_GS_BASE {
            self.cpu_kernel_gs = Some(value);
        }
    }
    fn live_msr(&self, msr: u32) -> Option<u64> {
        (msr == crate::vmx::policy::KERNEL_GS_BASE)
            .then_some(self.cpu_kernel_gs)
            .flatten()
    }
    fn fixed_bits(&self) -> FixedBits {
        FixedBits {
            cr0_fixed0: 0x8000_0021, // PG, NE, PE
            cr0_fixed1: 0xffff_ffff,
            cr4_fixed0: 1 << 13, // VMXE
            cr4_fixed1: 0x003f_ffff,
        }
    }
    fn xcr0_supported(&self) -> u64 {
        0b111
    }
    fn spec_msrs(&self) -> crate::vmx::policy::SpecMsrs {
        crate::vmx::policy::SpecMsrs::from_cpuid(1 << 26, 0)
    }
    fn spec_barrier(&mut self, what: crate::vmx::policy::SpecMsr) {
        self.barriers.push(what);
    }
    fn load_xcr0(&mut self, value: u64) {
        self.xcr0_loaded = Some(value);
    }
    fn console_window(&self) -> u64 {
        0
    }
    fn console_line(&mut self, line: &str) {
        self.console.extend_from_slice(line.as_bytes());
        self.console.push(b'\n');
    }
    fn vcpus(&self) -> u32 {
        2
    }
    fn vcpus_started(&self) -> u64 {
        self.started | 1
    }
    fn start_vcpu(&mut self, index: u32, rip: u64, rsp: u64) -> bool {
        let bit = 1 << index;
        if self.started & bit != 0 {
            return false;
        }
        self.started |= bit;
        self.start_requests.push((index, rip, rsp));
        true
    }
    fn tsc_khz(&self) -> u64 {
        100_000
    }
}

const RIP: u64 = 0x10_0000;

struct Rig {
    v: VcpuCore,
    a: FakeVmcs,
    mem: VecGuestMemory,
    p: FakePlatform,
}

impl Rig {
    fn new() -> Rig {
        Rig {
            v: VcpuCore::new(0, GuestRegs::default(), 1),
            a: FakeVmcs::default()
                .with(f::GUEST_RIP, RIP)
                .with(f::GUEST_EFER, 0x500) // LME, LMA
                .with(f::GUEST_CR4, 1 << 5),
            mem: VecGuestMemory::new(0, 4 << 20),
            p: FakePlatform::default(),
        }
    }

    fn exit(
        &mut self,
        reason: ExitReason,
        len: u64,
        qualification: u64,
        gpa: u64,
    ) -> Result<Action, ExitError> {
        let raw = match reason {
            ExitReason::Vmcall => 18,
            ExitReason::Cpuid => 10,
            ExitReason::Hlt => 12,
            ExitReason::Rdmsr => 31,
            ExitReason::Wrmsr => 32,
            ExitReason::IoInstruction => 30,
            ExitReason::EptViolation => 48,
            ExitReason::TripleFault => 2,
            ExitReason::CrAccess => 28,
            ExitReason::Xsetbv => 55,
            ExitReason::InterruptWindow => 7,
            ExitReason::ExternalInterrupt => 1,
            ExitReason::PreemptionTimer => 52,
            ExitReason::VmxInstruction(n) | ExitReason::Other(n) => u32::from(n),
            other => panic!("add {other:?}"),
        };
        let e = Exit {
            reason,
            raw,
            qualification,
            gpa,
            len,
        };
        assert_eq!(ExitReason::from_raw(raw), reason);
        handle(&e, &mut self.v, &mut self.a, &self.mem, &mut self.p).map_err(|e| *e)
    }

    fn rip(&self) -> u64 {
        self.a.field(f::GUEST_RIP)
    }

    fn gp_injected(&self) -> bool {
        self.a.field(f::ENTRY_INTERRUPTION) == (13 | (3 << 8) | (1 << 11) | (1 << 31))
    }

    fn vmcall(&mut self, nr: u64, args: [u64; 3]) -> Result<Action, ExitError> {
        self.v.regs.rax = nr;
        self.v.regs.rdi = args[0];
        self.v.regs.rsi = args[1];
        self.v.regs.rdx = args[2];
        self.exit(ExitReason::Vmcall, 3, 0, 0)
    }
}

#[test]
fn vmcall_nop_returns_ok_and_steps_over_the_instruction() {
    let mut r = Rig::new();
    assert_eq!(r.vmcall(nr::NOP, [0; 3]), Ok(Action::Resume));
    assert_eq!(r.v.regs.rax, 0);
    assert_eq!(r.rip(), RIP + 3);
    // Exactly one VMCS write: the RIP.
    assert_eq!(r.a.writes, vec![(f::GUEST_RIP.encoding(), RIP + 3)]);
}

#[test]
fn vmcall_console_write_reads_guest_memory_and_bad_pointers_fail() {
    let mut r = Rig::new();
    r.mem.write(GuestAddr(0x2000), b"hi there\n").unwrap();
    assert_eq!(
        r.vmcall(nr::CONSOLE_WRITE, [0x2000, 9, 0]),
        Ok(Action::Resume)
    );
    assert_eq!(r.p.console, b"hi there\n");
    assert_eq!(r.v.regs.rax, 9);
    // Past the end of RAM: an error code, not a stop.
    assert_eq!(
        r.vmcall(nr::CONSOLE_WRITE, [(4 << 20) - 4, 8, 0]),
        Ok(Action::Resume)
    );
    assert_eq!(r.v.regs.rax as i64, hv_abi::Status::BadAddress as i64);
    assert_eq!(r.p.console.len(), 9);
}

#[test]
fn vmcall_exit_yield_off_and_unknown() {
    let mut r = Rig::new();
    assert_eq!(r.vmcall(nr::EXIT, [7, 0, 0]), Ok(Action::Exit(7)));
    assert_eq!(r.vmcall(nr::YIELD, [0; 3]), Ok(Action::Requeue));
    assert_eq!(r.rip(), RIP + 3, "a yield completes its VMCALL");
    assert_eq!(r.vmcall(nr::VCPU_OFF, [0; 3]), Ok(Action::Retire));
    assert_eq!(r.vmcall(0xdead, [0; 3]), Ok(Action::Resume));
    assert_eq!(r.v.regs.rax as i64, hv_abi::Status::UnknownCall as i64);
}

#[test]
fn vmcall_start_vcpu_once_and_only_in_range() {
    let mut r = Rig::new();
    assert_eq!(
        r.vmcall(nr::VCPU_START, [1, 0x5000, 0x6000]),
        Ok(Action::Resume)
    );
    assert_eq!(r.v.regs.rax, 0);
    assert_eq!(r.p.start_requests, vec![(1, 0x5000, 0x6000)]);
    r.vmcall(nr::VCPU_START, [1, 0x5000, 0x6000]).unwrap();
    assert_eq!(r.v.regs.rax as i64, hv_abi::Status::InvalidArgument as i64);
    r.vmcall(nr::VCPU_START, [2, 0, 0]).unwrap();
    assert_eq!(r.v.regs.rax as i64, hv_abi::Status::InvalidArgument as i64);
    assert_eq!(r.p.start_requests.len(), 1);
}

#[test]
fn vmcall_set_timer_arms_in_tsc_ticks() {
    let mut r = Rig::new();
    r.p.tsc = 1000;
    assert_eq!(r.vmcall(nr::SET_TIMER, [0x30, 1000, 0]), Ok(Action::Resume));
    assert_eq!(r.v.timer.deadline(), Some(1000 + 1000 * 100));
    r.vmcall(nr::SET_TIMER, [0x30, 0, 0]).unwrap();
    assert_eq!(r.v.timer.deadline(), None);
    r.vmcall(nr::SET_TIMER, [3, 1000, 0]).unwrap();
    assert_eq!(r.v.regs.rax as i64, hv_abi::Status::InvalidArgument as i64);
}

#[test]
fn cpuid_goes_through_the_policy() {
    let mut r = Rig::new();
    r.v.regs.rax = 1;
    assert_eq!(r.exit(ExitReason::Cpuid, 2, 0, 0), Ok(Action::Resume));
    assert_eq!(r.v.regs.rcx & (1 << 5), 0, "VMX hidden");
    assert_eq!(r.rip(), RIP + 2);
    r.v.regs.rax = 0x4000_0000;
    r.exit(ExitReason::Cpuid, 2, 0, 0).unwrap();
    let sig: Vec<u8> = [r.v.regs.rbx, r.v.regs.rcx, r.v.regs.rdx]
        .iter()
        .flat_map(|x| (*x as u32).to_le_bytes())
        .collect();
    assert_eq!(&sig, b"RustHvRustHv");
}

#[test]
fn hlt_steps_over_ends_the_sti_shadow_and_halts() {
    let mut r = Rig::new();
    r.a = core::mem::take(&mut r.a).with(f::GUEST_INTERRUPTIBILITY, 1);
    assert_eq!(r.exit(ExitReason::Hlt, 1, 0, 0), Ok(Action::Halt));
    assert_eq!(r.rip(), RIP + 1);
    assert_eq!(r.a.field(f::GUEST_INTERRUPTIBILITY), 0);
}

#[test]
fn kernel_gs_base_reads_what_the_guests_swapgs_left_in_the_cpu() {
    let mut r = Rig::new();
    r.v.regs.rcx = 0xc000_0102;
    r.v.regs.rdx = 0xffff_8880;
    r.v.regs.rax = 0x0f60_0000;
    r.exit(ExitReason::Wrmsr, 2, 0, 0).unwrap();
    assert_eq!(r.p.loaded, [(0xc000_0102, 0xffff_8880_0f60_0000)]);
    // The guest's SWAPGS exchanged it with GS.base (no exit): the CPU holds the user's 0.
    r.p.cpu_kernel_gs = Some(0);
    r.v.regs.rax = 0x1234;
    r.v.regs.rdx = 0x5678;
    r.exit(ExitReason::Rdmsr, 2, 0, 0).unwrap();
    assert_eq!((r.v.regs.rdx, r.v.regs.rax), (0, 0));
    // LSTAR changes only by WRMSR: the stored value, with nothing read from the CPU.
    r.v.regs.rcx = 0xc000_0082;
    r.v.regs.rax = 0x1000;
    r.v.regs.rdx = 0;
    r.exit(ExitReason::Wrmsr, 2, 0, 0).unwrap();
    r.v.regs.rax = 0;
    r.exit(ExitReason::Rdmsr, 2, 0, 0).unwrap();
    assert_eq!(r.v.regs.rax, 0x1000);
}

#[test]
fn msrs_allowed_stored_vmcs_backed_and_refused() {
    let mut r = Rig::new();
    // Not on the allow-list: #GP, RIP unchanged.
    r.v.regs.rcx = 0x1234;
    assert_eq!(r.exit(ExitReason::Rdmsr, 2, 0, 0), Ok(Action::Resume));
    assert!(r.gp_injected());
    assert_eq!(r.rip(), RIP);
    // LSTAR: stored per vCPU.
    let mut r = Rig::new();
    r.v.regs.rcx = 0xc000_0082;
    r.v.regs.rdx = 0xffff_ffff;
    r.v.regs.rax = 0x8100_0000;
    r.exit(ExitReason::Wrmsr, 2, 0, 0).unwrap();
    r.v.regs.rax = 0;
    r.v.regs.rdx = 0;
    r.exit(ExitReason::Rdmsr, 2, 0, 0).unwrap();
    assert_eq!((r.v.regs.rdx, r.v.regs.rax), (0xffff_ffff, 0x8100_0000));
    assert_eq!(r.rip(), RIP + 4);
    // FS base: the VMCS field, from the same table as the allow-list.
    r.v.regs.rcx = 0xc000_0100;
    r.v.regs.rdx = 0;
    r.v.regs.rax = 0x7000;
    r.exit(ExitReason::Wrmsr, 2, 0, 0).unwrap();
    assert_eq!(r.a.field(f::GUEST_FS_BASE), 0x7000);
    // A non-canonical base: #GP, field unchanged.
    let mut r2 = Rig::new();
    r2.v.regs.rcx = 0xc000_0100;
    r2.v.regs.rdx = 0x0001_0000;
    r2.exit(ExitReason::Wrmsr, 2, 0, 0).unwrap();
    assert!(r2.gp_injected());
    assert_eq!(r2.a.field(f::GUEST_FS_BASE), 0);
    // EFER: only SCE and NXE change; LMA/LME stay.
    r.v.regs.rcx = 0xc000_0080;
    r.v.regs.rdx = 0;
    r.v.regs.rax = 0x801;
    r.exit(ExitReason::Wrmsr, 2, 0, 0).unwrap();
    assert_eq!(r.a.field(f::GUEST_EFER), 0xd01);
}

#[test]
fn speculation_msrs_are_the_guests_own_where_the_cpu_has_them() {
    use crate::vmx::policy::SpecMsr;
    // The fake CPU has IBRS/IBPB only (no STIBP, SSBD, L1D_FLUSH, ARCH_CAPABILITIES).
    let msr = |r: &mut Rig, write: bool, msr: u32, value: u64| {
        r.v.regs.rcx = u64::from(msr);
        r.v.regs.rax = value & 0xffff_ffff;
        r.v.regs.rdx = value >> 32;
        let reason = if write {
            ExitReason::Wrmsr
        } else {
            ExitReason::Rdmsr
        };
        r.exit(reason, 2, 0, 0).unwrap();
        (r.v.regs.rdx << 32) | r.v.regs.rax
    };
    let mut r = Rig::new();
    msr(&mut r, true, 0x48, 1);
    assert_eq!((r.v.spec_ctrl, r.rip()), (1, RIP + 2), "IBRS set");
    // The CPU loads it at entry and 0 at exit: one entry in each MSR-load area.
    assert_eq!(r.v.spec_areas.entry, [0x48, 1]);
    assert_eq!(r.v.spec_areas.exit, [0x48, 0]);
    assert_eq!(r.a.field(f::ENTRY_MSR_LOAD_COUNT), 1);
    assert_eq!(r.a.field(f::EXIT_MSR_LOAD_COUNT), 1);
    assert_eq!(msr(&mut r, false, 0x48, 0), 1);
    // Back to 0: nothing to switch.
    let mut r0 = Rig::new();
    msr(&mut r0, true, 0x48, 1);
    msr(&mut r0, true, 0x48, 0);
    assert_eq!(r0.a.field(f::ENTRY_MSR_LOAD_COUNT), 0);
    assert_eq!(r0.a.field(f::EXIT_MSR_LOAD_COUNT), 0);
    // A hypervisor running with IBRS (eIBRS CPUs): a guest that sets IBRS too needs no
    // switch; one that clears it does.
    let mut rh = Rig::new();
    rh.v.spec_areas.exit[1] = 1;
    msr(&mut rh, true, 0x48, 1);
    assert_eq!(rh.a.field(f::ENTRY_MSR_LOAD_COUNT), 0);
    msr(&mut rh, true, 0x48, 0);
    assert_eq!(rh.a.field(f::ENTRY_MSR_LOAD_COUNT), 1);
    assert_eq!(rh.a.field(f::EXIT_MSR_LOAD_COUNT), 1);
    assert_eq!(
        rh.v.spec_areas.exit,
        [0x48, 1],
        "the exit area keeps the hypervisor's value"
    );
    msr(&mut r, true, 0x49, 1);
    assert_eq!(r.p.barriers, vec![SpecMsr::Ibpb]);
    for (write, m, value) in [
        (true, 0x48, 0b10),   // STIBP: not on this CPU
        (true, 0x48, 1 << 7), // reserved
        (false, 0x49, 0),     // PRED_CMD is write-only
        (true, 0x49, 2),      // only bit 0 is a command
        (true, 0x10b, 1),     // no L1D_FLUSH here
        (false, 0x10a, 0),    // no ARCH_CAPABILITIES here
    ] {
        let mut r = Rig::new();
        msr(&mut r, write, m, value);
        assert!(r.gp_injected(), "{m:#x} {value:#x}");
        assert_eq!((r.v.spec_ctrl, r.rip()), (0, RIP));
    }
}

#[test]
fn port_io_uart_exit_port_empty_bus_and_string_io() {
    // OUT DX, AL to 0x3f8 (qualification: size-1 = 0, out, port in bits 31:16).
    let mut r = Rig::new();
    for b in *b"Z\n" {
        r.v.regs.rax = u64::from(b);
        assert_eq!(
            r.exit(ExitReason::IoInstruction, 1, 0x3f8 << 16, 0),
            Ok(Action::Resume)
        );
    }
    assert_eq!(r.p.console, b"Z\n");
    assert_eq!(r.rip(), RIP + 2);
    r.a = core::mem::take(&mut r.a).with(f::GUEST_RIP, RIP);
    // IN EAX from an unclaimed port: all ones in EAX, upper half of RAX kept.
    r.v.regs.rax = 0x1234_5678_0000_0000;
    r.exit(
        ExitReason::IoInstruction,
        1,
        (0xcfc << 16) | (1 << 3) | 3,
        0,
    )
    .unwrap();
    assert_eq!(r.v.regs.rax, 0x1234_5678_ffff_ffff);
    // The test exit port stops the domain with the code.
    r.v.regs.rax = 3;
    assert_eq!(
        r.exit(ExitReason::IoInstruction, 1, 0xf4 << 16, 0),
        Ok(Action::Exit(3))
    );
    // String I/O is not emulated: the domain stops, and says why.
    let e = r.exit(ExitReason::IoInstruction, 1, (0x3f8 << 16) | (1 << 4), 0);
    assert!(
        matches!(e, Err(ExitError::Unsupported(ref m)) if m.contains("string I/O")),
        "{e:?}"
    );
}

/// Page tables in guest memory at 0x1000.. mapping the first 1 GiB with 2 MiB pages and the
/// 3..4 GiB range likewise (identity).
fn identity_tables(mem: &mut VecGuestMemory) -> u64 {
    let w = |mem: &mut VecGuestMemory, at: u64, v: u64| {
        mem.write(GuestAddr(at), &v.to_le_bytes()).unwrap()
    };
    w(mem, 0x1000, 0x2000 | 3); // PML4[0] -> PDPT
    w(mem, 0x2000, 0x3000 | 3); // PDPT[0] -> PD (0..1 GiB)
    w(mem, 0x2000 + 3 * 8, 0x4000 | 3); // PDPT[3] -> PD (3..4 GiB)
    for i in 0..512u64 {
        w(mem, 0x3000 + i * 8, (i << 21) | 0x83);
        w(mem, 0x4000 + i * 8, ((3 << 30) + (i << 21)) | 0x83);
    }
    0x1000
}

#[test]
fn mmio_in_the_hole_reads_all_ones_and_drops_stores() {
    let mut r = Rig::new();
    let cr3 = identity_tables(&mut r.mem);
    // mov ecx, [rax] (8b 08) at RIP.
    r.mem.write(GuestAddr(RIP), &[0x8b, 0x08]).unwrap();
    r.a = core::mem::take(&mut r.a).with(f::GUEST_CR3, cr3);
    r.v.regs.rcx = 0xaaaa_bbbb_cccc_dddd;
    assert_eq!(
        r.exit(ExitReason::EptViolation, 0, 1, 0xfee0_0030),
        Ok(Action::Resume)
    );
    // A 32-bit load zero-extends into RCX.
    assert_eq!(r.v.regs.rcx, 0xffff_ffff);
    assert_eq!(r.rip(), RIP + 2);
    // mov [rax], ecx (89 08): dropped, RIP stepped.
    r.mem.write(GuestAddr(RIP + 2), &[0x89, 0x08]).unwrap();
    assert_eq!(
        r.exit(ExitReason::EptViolation, 0, 2, 0xfee0_0030),
        Ok(Action::Resume)
    );
    assert_eq!(r.rip(), RIP + 4);
    // An instruction the decoder does not know (a string move, a4) stops the domain.
    r.mem.write(GuestAddr(RIP + 4), &[0xa4]).unwrap();
    let e = r.exit(ExitReason::EptViolation, 0, 1, 0xfee0_0030);
    assert!(matches!(e, Err(ExitError::Unsupported(_))), "{e:?}");
}

#[test]
fn an_mmio_instruction_across_two_pages_is_fetched_from_both() {
    let mut r = Rig::new();
    let w = |mem: &mut VecGuestMemory, at: u64, v: u64| {
        mem.write(GuestAddr(at), &v.to_le_bytes()).unwrap()
    };
    // 4 KiB pages, not contiguous: virtual 0x7000 -> 0x8000, virtual 0x8000 -> 0x6000.
    w(&mut r.mem, 0x1000, 0x2000 | 3);
    w(&mut r.mem, 0x2000, 0x3000 | 3);
    w(&mut r.mem, 0x2000 + 3 * 8, 0x4000 | 3);
    w(&mut r.mem, 0x3000, 0x5000 | 3);
    for i in 0..512u64 {
        w(&mut r.mem, 0x4000 + i * 8, ((3 << 30) + (i << 21)) | 0x83);
    }
    w(&mut r.mem, 0x5000 + 7 * 8, 0x8000 | 3);
    w(&mut r.mem, 0x5000 + 8 * 8, 0x6000 | 3);
    // mov ecx, [rax] (8b 08): its first byte ends the first page, its second starts the next.
    r.mem.write(GuestAddr(0x8fff), &[0x8b]).unwrap();
    r.mem.write(GuestAddr(0x6000), &[0x08]).unwrap();
    r.a = core::mem::take(&mut r.a)
        .with(f::GUEST_CR3, 0x1000)
        .with(f::GUEST_RIP, 0x7fff);
    assert_eq!(
        r.exit(ExitReason::EptViolation, 0, 1, 0xfee0_0030),
        Ok(Action::Resume)
    );
    assert_eq!(r.v.regs.rcx, 0xffff_ffff);
    assert_eq!(r.rip(), 0x8001);
}

#[test]
fn ept_violation_outside_ram_and_the_hole_stops_the_guest() {
    let mut r = Rig::new();
    let e = r
        .exit(ExitReason::EptViolation, 0, 1, 0x2000_0000)
        .unwrap_err();
    assert_eq!(
        e,
        ExitError::Guest(String::from(
            "EPT violation: read of guest-physical 0x20000000, which is not its memory"
        ))
    );
    // An instruction fetch from the hole is not MMIO either.
    let e = r
        .exit(ExitReason::EptViolation, 0, 4, 0xc000_0000)
        .unwrap_err();
    assert!(matches!(e, ExitError::Guest(_)));
}

#[test]
fn triple_fault_and_unexpected_exits_stop_the_domain() {
    let mut r = Rig::new();
    assert_eq!(
        r.exit(ExitReason::TripleFault, 0, 0, 0),
        Err(ExitError::Guest(String::from("triple fault")))
    );
    let e = r.exit(ExitReason::Other(62), 0, 0, 0).unwrap_err();
    assert!(matches!(e, ExitError::Unsupported(ref m) if m.starts_with("unhandled VM exit")));
    // A VMX instruction gets #UD, as on a CPU without VMX (and RIP stays on it).
    assert_eq!(
        r.exit(ExitReason::VmxInstruction(24), 3, 0, 0),
        Ok(Action::Resume)
    );
    assert_eq!(r.a.field(f::ENTRY_INTERRUPTION), 6 | (3 << 8) | (1 << 31));
    assert_eq!(r.rip(), RIP);
}

#[test]
fn mov_to_cr0_and_cr4_keep_forced_bits_and_shadow_the_guest_value() {
    let mut r = Rig::new();
    // mov cr0, rbx: qualification cr=0, type 0 (to), gpr 3.
    r.v.regs.rbx = 0x8000_0011; // PG, ET, PE (NE clear)
    assert_eq!(
        r.exit(ExitReason::CrAccess, 3, 3 << 8, 0),
        Ok(Action::Resume)
    );
    assert_eq!(r.a.field(f::CR0_SHADOW), 0x8000_0011);
    assert_eq!(r.a.field(f::GUEST_CR0), 0x8000_0031, "NE forced on");
    assert_eq!(r.rip(), RIP + 3);
    // Paging off in long mode: #GP, nothing written.
    let mut r = Rig::new();
    r.v.regs.rbx = 0x11;
    r.exit(ExitReason::CrAccess, 3, 3 << 8, 0).unwrap();
    assert!(r.gp_injected());
    assert_eq!(r.a.field(f::CR0_SHADOW), 0);
    // mov cr4, rax with VMXE: #GP.
    let mut r = Rig::new();
    r.v.regs.rax = (1 << 13) | (1 << 5);
    r.exit(ExitReason::CrAccess, 3, 4, 0).unwrap();
    assert!(r.gp_injected());
    // mov cr4 with PAE|OSFXSR: VMXE forced in the register, not in the shadow.
    let mut r = Rig::new();
    r.v.regs.rax = (1 << 9) | (1 << 5);
    r.exit(ExitReason::CrAccess, 3, 4, 0).unwrap();
    assert_eq!(r.a.field(f::CR4_SHADOW), (1 << 9) | (1 << 5));
    assert_eq!(r.a.field(f::GUEST_CR4), (1 << 13) | (1 << 9) | (1 << 5));
}

#[test]
fn xsetbv_checked_against_what_is_offered() {
    let mut r = Rig::new();
    r.v.regs.rax = 0b11; // x87 + SSE
    assert_eq!(r.exit(ExitReason::Xsetbv, 3, 0, 0), Ok(Action::Resume));
    assert_eq!((r.v.xcr0, r.p.xcr0_loaded), (0b11, Some(0b11)));
    r.v.regs.rax = 0b101; // AVX without SSE
    r.exit(ExitReason::Xsetbv, 3, 0, 0).unwrap();
    assert!(r.gp_injected());
    assert_eq!(r.v.xcr0, 0b11);
}

#[test]
fn interrupts_windows_and_the_preemption_timer() {
    let mut r = Rig::new();
    assert_eq!(
        r.exit(ExitReason::ExternalInterrupt, 0, 0, 0),
        Ok(Action::Resume)
    );
    assert_eq!(
        r.exit(ExitReason::InterruptWindow, 0, 0, 0),
        Ok(Action::Resume)
    );
    // No guest timer due: the slice is over.
    assert_eq!(
        r.exit(ExitReason::PreemptionTimer, 0, 0, 0),
        Ok(Action::Requeue)
    );
    // The guest's timer fell due: stay and deliver it.
    r.v.timer.set(0x30, 100, 0);
    r.p.tsc = 150;
    assert_eq!(
        r.exit(ExitReason::PreemptionTimer, 0, 0, 0),
        Ok(Action::Resume)
    );
}

#[test]
fn a_due_timer_is_injected_when_the_guest_can_take_it_else_a_window_is_asked_for() {
    let mut r = Rig::new();
    r.v.timer.set(0x30, 100, 0);
    assert!(r.v.timer.poll(200));
    // IF clear: interrupt-window exiting on, nothing injected.
    deliver_timer(&mut r.v, &mut r.a).unwrap();
    assert_eq!(r.a.field(f::ENTRY_INTERRUPTION), 0);
    assert_eq!(r.a.field(f::PROCBASED) & (1 << 2), 1 << 2);
    assert!(r.v.window_exiting);
    // IF set: injected as an external interrupt, window exiting off again.
    r.a = core::mem::take(&mut r.a).with(f::GUEST_RFLAGS, 1 << 9);
    deliver_timer(&mut r.v, &mut r.a).unwrap();
    assert_eq!(r.a.field(f::ENTRY_INTERRUPTION), 0x30 | (1 << 31));
    assert_eq!(r.a.field(f::PROCBASED) & (1 << 2), 0);
    assert!(!r.v.window_exiting);
}

#[test]
fn device_interrupts_wait_behind_the_timer_and_for_if() {
    let mut r = Rig::new();
    r.v.irqs = 0b101;
    r.v.timer.set(0x30, 100, 0);
    assert!(r.v.timer.poll(200));
    // IF clear: a window is asked for, nothing injected.
    deliver_timer(&mut r.v, &mut r.a).unwrap();
    assert_eq!(r.a.field(f::ENTRY_INTERRUPTION), 0);
    assert!(r.v.window_exiting);
    // IF set: the timer first, and the window stays on for the device interrupts.
    r.a = core::mem::take(&mut r.a).with(f::GUEST_RFLAGS, 1 << 9);
    deliver_timer(&mut r.v, &mut r.a).unwrap();
    assert_eq!(r.a.field(f::ENTRY_INTERRUPTION), 0x30 | (1 << 31));
    assert!(r.v.window_exiting);
    // The next entries take device 0, then device 2, on their vectors; then the window closes.
    r.a = core::mem::take(&mut r.a).with(f::ENTRY_INTERRUPTION, 0);
    deliver_timer(&mut r.v, &mut r.a).unwrap();
    let base = u64::from(hv_abi::devices::VIRTIO_VECTOR_BASE);
    assert_eq!(r.a.field(f::ENTRY_INTERRUPTION), base | (1 << 31));
    assert!(r.v.window_exiting);
    r.a = core::mem::take(&mut r.a).with(f::ENTRY_INTERRUPTION, 0);
    deliver_timer(&mut r.v, &mut r.a).unwrap();
    assert_eq!(r.a.field(f::ENTRY_INTERRUPTION), (base + 2) | (1 << 31));
    assert_eq!(r.v.irqs, 0);
    assert!(!r.v.window_exiting);
    assert_eq!(r.a.field(f::PROCBASED) & (1 << 2), 0);
}

/// A device that remembers the last store and answers loads with a fixed pattern.
struct Probe(alloc::sync::Arc<spin::Mutex<Vec<(u64, u8, u64)>>>);

impl MmioDevice for Probe {
    fn read(&mut self, offset: u64, _size: u8) -> u64 {
        0x8877_6655_4433_2211u64.rotate_right((offset * 8) as u32)
    }
    fn write(&mut self, _mem: &dyn GuestMemory, offset: u64, size: u8, value: u64) {
        self.0.lock().push((offset, size, value));
    }
}

#[test]
fn mmio_reaches_the_device_that_registered_the_range() {
    let mut r = Rig::new();
    let stores = alloc::sync::Arc::new(spin::Mutex::new(Vec::new()));
    r.p.io
        .mmio
        .register(
            0xd000_0000..0xd000_1000,
            alloc::boxed::Box::new(Probe(stores.clone())),
        )
        .unwrap();
    let cr3 = identity_tables(&mut r.mem);
    r.a = core::mem::take(&mut r.a).with(f::GUEST_CR3, cr3);
    // mov ecx, [rax]: 32-bit load from offset 0.
    r.mem.write(GuestAddr(RIP), &[0x8b, 0x08]).unwrap();
    r.exit(ExitReason::EptViolation, 0, 1, 0xd000_0000).unwrap();
    assert_eq!(r.v.regs.rcx, 0x4433_2211);
    // mov [rax], ch (88 28): the high byte of CX, one byte at offset 4.
    r.v.regs.rcx = 0xabcd;
    r.mem.write(GuestAddr(RIP + 2), &[0x88, 0x28]).unwrap();
    r.exit(ExitReason::EptViolation, 0, 2, 0xd000_0004).unwrap();
    // movl $0x12345678, [rax] (c7 00 imm32) at offset 8.
    r.mem
        .write(GuestAddr(RIP + 4), &[0xc7, 0x00, 0x78, 0x56, 0x34, 0x12])
        .unwrap();
    r.exit(ExitReason::EptViolation, 0, 2, 0xd000_0008).unwrap();
    assert_eq!(*stores.lock(), vec![(4, 1, 0xab), (8, 4, 0x1234_5678)]);
    assert_eq!(r.rip(), RIP + 10);
}

#[test]
fn mmio_read_modify_write_and_compare_set_memory_registers_and_flags() {
    let mut r = Rig::new();
    let stores = alloc::sync::Arc::new(spin::Mutex::new(Vec::new()));
    r.p.io
        .mmio
        .register(
            0xd000_0000..0xd000_1000,
            alloc::boxed::Box::new(Probe(stores.clone())),
        )
        .unwrap();
    let cr3 = identity_tables(&mut r.mem);
    r.a = core::mem::take(&mut r.a)
        .with(f::GUEST_CR3, cr3)
        .with(f::GUEST_RFLAGS, 0x202 | 0x8d5);
    // orl $0x80, (%rax) (83 08 80): the device reads 0x44332211 at offset 0.
    r.mem.write(GuestAddr(RIP), &[0x83, 0x08, 0x80]).unwrap();
    r.exit(ExitReason::EptViolation, 0, 3, 0xd000_0000).unwrap();
    assert_eq!(*stores.lock(), vec![(0, 4, 0xffff_ff91)]);
    // OR clears CF and OF; the result is negative: SF; 0x91 has odd parity: PF clear.
    assert_eq!(r.a.field(f::GUEST_RFLAGS), 0x202 | 0x80);
    // testb $0x11, (%rax) (f6 00 11): 0x11 & 0x11, no store, ZF clear, PF set (two bits).
    r.mem
        .write(GuestAddr(RIP + 3), &[0xf6, 0x00, 0x11])
        .unwrap();
    r.exit(ExitReason::EptViolation, 0, 1, 0xd000_0000).unwrap();
    assert_eq!(stores.lock().len(), 1);
    assert_eq!(r.a.field(f::GUEST_RFLAGS), 0x202 | 0x04);
    // and (%rax), %ecx (23 08): ECX = ECX & mem, upper half of RCX cleared (32-bit dest).
    r.v.regs.rcx = 0xffff_ffff_0000_ffff;
    r.mem.write(GuestAddr(RIP + 6), &[0x23, 0x08]).unwrap();
    r.exit(ExitReason::EptViolation, 0, 1, 0xd000_0000).unwrap();
    assert_eq!(r.v.regs.rcx, 0x2211);
    // cmp %edx, (%rax) (39 10): mem - EDX = 0 -> ZF.
    r.v.regs.rdx = 0x4433_2211;
    r.mem.write(GuestAddr(RIP + 8), &[0x39, 0x10]).unwrap();
    r.exit(ExitReason::EptViolation, 0, 1, 0xd000_0000).unwrap();
    assert_eq!(r.a.field(f::GUEST_RFLAGS) & 0x8d5, 0x44);
    assert_eq!(r.rip(), RIP + 10);
}
