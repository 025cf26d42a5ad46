//! The hostile suite (issue 16 part 3): over a hundred named cases, each an attempt the
//! hypervisor must refuse (a fault injected into this guest, an error status) or contain (the
//! access has no effect outside this guest, which goes on). Each is reported by name with
//! what happened; the summary line counts them. A case whose outcome differs from what is
//! expected is reported as UNEXPECTED, which the scenarios reject.

use test_guests::hv_abi::{Status, hypercall as nr};
use test_guests::{hypercall, inb, outb, println};

/// Faults this guest takes, by vector (its own IDT: #DE, #BP, #UD, #GP, #PF).
static mut FAULTS: [u64; 32] = [0; 32];
/// Bytes to skip past the faulting instruction (faults point at it; #BP, a trap, does not).
static mut SKIP: u64 = 0;
/// Paravirtual timer interrupts (vector 0x30).
static mut TICKS: u64 = 0;

macro_rules! handler {
    ($name:ident, $vector:literal, error_code) => {
        #[unsafe(naked)]
        extern "C" fn $name() {
            core::arch::naked_asm!(
                "push rax",
                "mov rax, [rip + {skip}]",
                "add [rsp + 16], rax",
                "inc qword ptr [rip + {faults} + 8 * {v}]",
                "pop rax",
                "add rsp, 8",
                "iretq",
                skip = sym SKIP,
                faults = sym FAULTS,
                v = const $vector,
            );
        }
    };
    ($name:ident, $vector:literal) => {
        #[unsafe(naked)]
        extern "C" fn $name() {
            core::arch::naked_asm!(
                "push rax",
                "mov rax, [rip + {skip}]",
                "add [rsp + 8], rax",
                "inc qword ptr [rip + {faults} + 8 * {v}]",
                "pop rax",
                "iretq",
                skip = sym SKIP,
                faults = sym FAULTS,
                v = const $vector,
            );
        }
    };
}

handler!(de_handler, 0);
handler!(bp_handler, 3);
handler!(ud_handler, 6);
handler!(gp_handler, 13, error_code);
handler!(pf_handler, 14, error_code);

#[unsafe(naked)]
extern "C" fn tick_handler() {
    core::arch::naked_asm!("inc qword ptr [rip + {t}]", "iretq", t = sym TICKS);
}

static mut IDT: [[u64; 2]; 64] = [[0; 2]; 64];

/// Loads this suite's IDT.
pub fn install_idt() {
    #[repr(C, packed)]
    struct Dtr {
        limit: u16,
        base: u64,
    }
    let gate = |h: u64| {
        [
            (h & 0xffff) | (0x08 << 16) | (0x8e << 40) | (((h >> 16) & 0xffff) << 48),
            h >> 32,
        ]
    };
    // SAFETY: single-threaded guest; the IDT is a static only this function writes, and the
    // descriptor names exactly that table.
    unsafe {
        let idt = &raw mut IDT;
        (*idt)[0] = gate(de_handler as *const () as u64);
        (*idt)[3] = gate(bp_handler as *const () as u64);
        (*idt)[6] = gate(ud_handler as *const () as u64);
        (*idt)[13] = gate(gp_handler as *const () as u64);
        (*idt)[14] = gate(pf_handler as *const () as u64);
        (*idt)[0x30] = gate(tick_handler as *const () as u64);
        let dtr = Dtr {
            limit: 64 * 16 - 1,
            base: idt as u64,
        };
        core::arch::asm!("lidt [{0}]", in(reg) &dtr);
    }
}

fn faults() -> [u64; 32] {
    // SAFETY: a static the handlers update; single-threaded, read as a copy.
    unsafe { (&raw const FAULTS).read_volatile() }
}

fn set_skip(n: u64) {
    // SAFETY: a static only this thread and its fault handlers use.
    unsafe { (&raw mut SKIP).write_volatile(n) }
}

fn ticks() -> u64 {
    // SAFETY: a static only the timer handler writes.
    unsafe { (&raw const TICKS).read_volatile() }
}

/// What a case must end in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Want {
    /// Refused: this fault (vector) in this guest.
    Fault(u8),
    /// Refused or answered: this value back (a status, a read), and no fault.
    Value(u64),
    /// Contained: no fault, the guest goes on (what it touched is not the host's).
    Survives,
}

struct Tally {
    ran: u32,
    good: u32,
}

impl Tally {
    /// Runs one case: `skip` bytes are skipped if its instruction faults.
    fn case(&mut self, name: &str, want: Want, skip: u64, f: impl FnOnce() -> u64) {
        set_skip(skip);
        let before = faults();
        let got = f();
        let after = faults();
        let fault = (0..32u8).find(|&v| after[v as usize] != before[v as usize]);
        let ok = match (want, fault) {
            (Want::Fault(v), Some(f)) => v == f,
            (Want::Value(v), None) => v == got,
            (Want::Survives, None) => true,
            _ => false,
        };
        let what = match (fault, want) {
            (Some(v), _) => fault_name(v),
            (None, Want::Survives) => "contained",
            // A negative status is a refusal; anything else is the expected answer.
            (None, _) if (got as i64) < 0 => "refused",
            (None, _) => "answered",
        };
        // The console lets a domain print 64 lines a second: wait for the next second
        // before the budget runs out, so no case's line is dropped.
        if self.ran % 48 == 47 {
            pace();
        }
        self.ran += 1;
        if ok {
            self.good += 1;
            println!("hostile: case {name}: {what} (got {got:#x})");
        } else {
            println!("hostile: case {name}: UNEXPECTED: fault {fault:?}, value {got:#x}");
        }
    }
}

/// Waits about a second, halted, for one paravirtual timer interrupt.
fn pace() {
    let before = ticks();
    hypercall(nr::SET_TIMER, 0x30, 1_100_000, 0);
    while ticks() == before {
        // SAFETY: STI; HLT waits for the timer interrupt, which the suite's IDT counts.
        unsafe { core::arch::asm!("sti", "hlt", "cli") };
    }
    hypercall(nr::SET_TIMER, 0x30, 0, 0);
}

fn fault_name(v: u8) -> &'static str {
    match v {
        0 => "refused with #DE",
        3 => "trapped as #BP",
        6 => "refused with #UD",
        13 => "refused with #GP",
        14 => "refused with #PF",
        _ => "refused with another fault",
    }
}

fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the hypervisor answers or injects #GP, which the handler skips (2 bytes).
    unsafe {
        core::arch::asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nostack))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

fn wrmsr(msr: u32, v: u64) -> u64 {
    // SAFETY: as for `rdmsr`.
    unsafe {
        core::arch::asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nostack))
    };
    0
}

fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: port I/O from a guest only exits to the hypervisor.
    unsafe { core::arch::asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack)) };
    v
}

fn outl(port: u16, v: u32) {
    // SAFETY: as for `inl`.
    unsafe { core::arch::asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack)) };
}

fn cr0() -> u64 {
    let v: u64;
    // SAFETY: reads the guest's own CR0 (its shadow).
    unsafe { core::arch::asm!("mov {0}, cr0", out(reg) v) };
    v
}

fn cr4() -> u64 {
    let v: u64;
    // SAFETY: reads the guest's own CR4 (its shadow).
    unsafe { core::arch::asm!("mov {0}, cr4", out(reg) v) };
    v
}

/// MOV CR0, RAX (3 bytes: 0f 22 c0).
fn write_cr0(v: u64) -> u64 {
    // SAFETY: the hypervisor checks the value; a refused one is #GP, skipped.
    unsafe { core::arch::asm!(".byte 0x0f, 0x22, 0xc0", in("rax") v) };
    0
}

/// MOV CR4, RAX (3 bytes: 0f 22 e0).
fn write_cr4(v: u64) -> u64 {
    // SAFETY: as for `write_cr0`.
    unsafe { core::arch::asm!(".byte 0x0f, 0x22, 0xe0", in("rax") v) };
    0
}

fn cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, sub);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// A scratch page for the memory operands of the VMX instructions.
static mut SCRATCH: [u64; 512] = [0; 512];

/// Runs every case; `ram` is this domain's RAM size. Returns (ran, as expected).
pub fn run(ram: u64) -> (u32, u32) {
    install_idt();
    let mut t = Tally { ran: 0, good: 0 };
    let st = |s: Status| s as i64 as u64;

    // Hypercalls: every bad argument kind.
    for n in [
        8u64,
        9,
        100,
        0xffff,
        1 << 32,
        0x7fff_ffff_ffff_ffff,
        1 << 63,
        u64::MAX,
    ] {
        t.case(
            "hypercall unknown number",
            Want::Value(st(Status::UnknownCall)),
            0,
            || hypercall(n, 1, 2, 3) as u64,
        );
    }
    let console_cases: [(&str, u64, u64, Status); 9] = [
        (
            "console from hypervisor half",
            0xffff_8000_0000_0000,
            16,
            Status::BadAddress,
        ),
        (
            "console wrapping the address space",
            u64::MAX - 3,
            8,
            Status::BadAddress,
        ),
        (
            "console huge length",
            0x1000,
            1 << 40,
            Status::InvalidArgument,
        ),
        (
            "console one byte over the limit",
            0x1000,
            nr::CONSOLE_WRITE_MAX + 1,
            Status::InvalidArgument,
        ),
        (
            "console straddling the end of RAM",
            ram - 4,
            8,
            Status::BadAddress,
        ),
        ("console at the end of RAM", ram, 1, Status::BadAddress),
        ("console beyond RAM", 0x3000_0000, 16, Status::BadAddress),
        (
            "console from the MMIO hole",
            0xfec0_0000,
            4,
            Status::BadAddress,
        ),
        (
            "console from the top page",
            0xffff_ffff_ffff_f000,
            16,
            Status::BadAddress,
        ),
    ];
    for (name, gpa, len, s) in console_cases {
        t.case(name, Want::Value(st(s)), 0, || {
            hypercall(nr::CONSOLE_WRITE, gpa, len, 0) as u64
        });
    }
    t.case("console of zero bytes", Want::Value(0), 0, || {
        hypercall(nr::CONSOLE_WRITE, 0x1000, 0, 0) as u64
    });
    for (name, index) in [
        ("vcpu_start of vCPU 0", 0u64),
        ("vcpu_start beyond the domain's vCPUs", 1),
        ("vcpu_start of vCPU 64", 64),
        ("vcpu_start of vCPU 2^64-1", u64::MAX),
    ] {
        t.case(name, Want::Value(st(Status::InvalidArgument)), 0, || {
            hypercall(nr::VCPU_START, index, 0xdead_0000, 0xbeef_0000) as u64
        });
    }
    for (name, vector, period) in [
        ("set_timer on exception vector 3", 3u64, 10_000u64),
        ("set_timer on vector 31", 31, 10_000),
        ("set_timer on vector 256", 256, 10_000),
        ("set_timer on vector 2^64-1", u64::MAX, 10_000),
        ("set_timer period 99 us", 0x30, 99),
        ("set_timer period over 10 s", 0x30, 10_000_001),
        ("set_timer period 2^64-1", 0x30, u64::MAX),
    ] {
        t.case(name, Want::Value(st(Status::InvalidArgument)), 0, || {
            hypercall(nr::SET_TIMER, vector, period, 0) as u64
        });
    }
    t.case(
        "version with garbage arguments",
        Want::Value(u64::from(test_guests::hv_abi::ABI_VERSION)),
        0,
        || hypercall(nr::VERSION, u64::MAX, u64::MAX, u64::MAX) as u64,
    );
    t.case("nop with garbage arguments", Want::Value(0), 0, || {
        hypercall(nr::NOP, u64::MAX, 1 << 63, 7) as u64
    });
    t.case("hypercall in the STI shadow", Want::Value(0), 0, || {
        let r: u64;
        // SAFETY: STI then VMCALL (NOP): the call runs in the interrupt shadow; CLI after.
        unsafe {
            core::arch::asm!("sti", "vmcall", "cli", inlateout("rax") nr::NOP => r, in("rdi") 0, in("rsi") 0, in("rdx") 0);
        }
        r
    });
    t.case("hypercall in the MOV SS shadow", Want::Value(0), 0, || {
        let r: u64;
        // SAFETY: MOV SS (its own selector) then VMCALL (NOP) in the MOV-SS shadow.
        unsafe {
            core::arch::asm!("mov {s:x}, ss", "mov ss, {s:x}", "vmcall", s = out(reg) _, inlateout("rax") nr::NOP => r, in("rdi") 0, in("rsi") 0, in("rdx") 0);
        }
        r
    });

    // MSRs: VMX, SMM, microcode, debug, APIC, speculation controls, AMD, MTRRs: refused with
    // #GP unless the allow-list offers them; fixed ones ignore writes.
    for (name, msr) in [
        ("rdmsr IA32_VMX_BASIC", 0x480u32),
        ("rdmsr IA32_VMX_PINBASED_CTLS", 0x481),
        ("rdmsr IA32_VMX_PROCBASED_CTLS", 0x482),
        ("rdmsr IA32_VMX_EXIT_CTLS", 0x483),
        ("rdmsr IA32_VMX_MISC", 0x485),
        ("rdmsr IA32_VMX_CR4_FIXED0", 0x488),
        ("rdmsr IA32_VMX_PROCBASED_CTLS2", 0x48b),
        ("rdmsr IA32_VMX_EPT_VPID_CAP", 0x48c),
        ("rdmsr IA32_VMX_VMFUNC", 0x491),
        ("rdmsr IA32_SMBASE", 0x9e),
        ("rdmsr IA32_SMRR_PHYSBASE", 0x1f2),
        ("rdmsr IA32_DEBUGCTL", 0x1d9),
        ("rdmsr last-branch TOS", 0x1c9),
        ("rdmsr last-branch record", 0x680),
        ("rdmsr IA32_PRED_CMD (write-only)", 0x49),
        ("rdmsr IA32_FLUSH_CMD (write-only)", 0x10b),
        ("rdmsr x2APIC ID", 0x802),
        ("rdmsr MTRR physbase 0", 0x200),
        ("rdmsr AMD VM_CR", 0xc001_0114),
        ("rdmsr AMD SYSCFG", 0xc001_0010),
        ("rdmsr 0xffffffff", 0xffff_ffff),
    ] {
        t.case(name, Want::Fault(13), 2, || rdmsr(msr));
    }
    for (name, msr, v) in [
        ("wrmsr IA32_VMX_BASIC", 0x480u32, 1u64),
        ("wrmsr IA32_VMX_EPT_VPID_CAP", 0x48c, 0x1234),
        ("wrmsr IA32_SMBASE", 0x9e, 0x3_0000),
        ("wrmsr IA32_SMRR_PHYSMASK", 0x1f3, 0),
        ("wrmsr microcode update trigger", 0x79, 0x1000),
        ("wrmsr IA32_DEBUGCTL", 0x1d9, 1),
        ("wrmsr IA32_SPEC_CTRL reserved bit 7", 0x48, 1 << 7),
        ("wrmsr IA32_PRED_CMD bit 1 (not a command)", 0x49, 2),
        ("wrmsr x2APIC ICR: INIT", 0x830, 0x4500),
        ("wrmsr x2APIC ICR: SIPI", 0x830, 0x4601),
        ("wrmsr MTRRdefType", 0x2ff, 0),
        ("wrmsr AMD VM_HSAVE_PA", 0xc001_0117, 0x1000),
        ("wrmsr EFER reserved bit 2", 0xc000_0080, 0xd05),
        ("wrmsr PAT reserved type 2", 0x277, 0x0007_0406_0007_0402),
        (
            "wrmsr FS base not canonical",
            0xc000_0100,
            0x0000_8000_0000_0000,
        ),
        (
            "wrmsr GS base not canonical",
            0xc000_0101,
            0x0001_0000_0000_0000,
        ),
        (
            "wrmsr KERNEL_GS_BASE not canonical",
            0xc000_0102,
            0x8000_0000_0000_0000,
        ),
        (
            "wrmsr LSTAR not canonical",
            0xc000_0082,
            0x0000_8000_0000_1000,
        ),
        ("wrmsr TSC_AUX high bits", 0xc000_0103, 1 << 40),
        (
            "wrmsr SYSENTER_EIP not canonical",
            0x176,
            0x00ff_0000_0000_0000,
        ),
    ] {
        t.case(name, Want::Fault(13), 2, || wrmsr(msr, v));
    }
    t.case(
        "wrmsr FEATURE_CONTROL (fixed: locked, VMX off)",
        Want::Value(1),
        2,
        || {
            wrmsr(0x3a, 0x5);
            rdmsr(0x3a)
        },
    );
    t.case(
        "wrmsr APIC_BASE disabling the APIC (fixed)",
        Want::Value(0xfee0_0900),
        2,
        || {
            wrmsr(0x1b, 0);
            rdmsr(0x1b)
        },
    );
    t.case("wrmsr BIOS_SIGN_ID (fixed 0)", Want::Value(0), 2, || {
        wrmsr(0x8b, u64::MAX);
        rdmsr(0x8b)
    });
    t.case(
        "wrmsr EFER clearing LME (kept)",
        Want::Value(1 << 10),
        2,
        || {
            let e = rdmsr(0xc000_0080);
            wrmsr(0xc000_0080, e & !(1 << 8));
            rdmsr(0xc000_0080) & (1 << 10)
        },
    );
    t.case("wrmsr TSC (ignored)", Want::Survives, 2, || wrmsr(0x10, 0));

    // Speculation controls: the guest's own where CPUID says the CPU has them, #GP where not.
    let edx7 = cpuid(7, 0)[3];
    let has = |bit: u32| edx7 & (1 << bit) != 0;
    let or_gp = |on: bool, want: Want| if on { want } else { Want::Fault(13) };
    t.case(
        "rdmsr IA32_SPEC_CTRL",
        or_gp(has(26), Want::Value(0)),
        2,
        || rdmsr(0x48),
    );
    for (name, bit, cpuid_bit) in [
        ("IA32_SPEC_CTRL.IBRS set and read back", 0u32, 26u32),
        ("IA32_SPEC_CTRL.STIBP set and read back", 1, 27),
        ("IA32_SPEC_CTRL.SSBD set and read back", 2, 31),
    ] {
        t.case(
            name,
            or_gp(has(cpuid_bit), Want::Value(1 << bit)),
            2,
            || {
                wrmsr(0x48, 1 << bit);
                let v = rdmsr(0x48);
                wrmsr(0x48, 0);
                v
            },
        );
    }
    t.case(
        "wrmsr IA32_PRED_CMD.IBPB",
        or_gp(has(26), Want::Survives),
        2,
        || wrmsr(0x49, 1),
    );
    t.case(
        "wrmsr IA32_FLUSH_CMD.L1D_FLUSH",
        or_gp(has(28), Want::Survives),
        2,
        || wrmsr(0x10b, 1),
    );
    t.case(
        "rdmsr IA32_ARCH_CAPABILITIES",
        or_gp(has(29), Want::Survives),
        2,
        || rdmsr(0x10a),
    );
    t.case(
        "wrmsr IA32_ARCH_CAPABILITIES (read-only)",
        Want::Fault(13),
        2,
        || wrmsr(0x10a, 0),
    );

    // Control registers: what VMX or long mode forbids is refused; CLTS and LMSW are emulated.
    let (c0, c4) = (cr0(), cr4());
    t.case("CR4.VMXE set", Want::Fault(13), 3, || {
        write_cr4(c4 | (1 << 13))
    });
    t.case("CR4 reserved bit 31", Want::Fault(13), 3, || {
        write_cr4(c4 | (1 << 31))
    });
    t.case("CR4.PAE cleared in long mode", Want::Fault(13), 3, || {
        write_cr4(c4 & !(1 << 5))
    });
    t.case("CR0.PG cleared in long mode", Want::Fault(13), 3, || {
        write_cr0(c0 & !(1 << 31))
    });
    t.case("CR0.PE cleared with PG set", Want::Fault(13), 3, || {
        write_cr0(c0 & !1)
    });
    t.case("CR0.NW without CD", Want::Fault(13), 3, || {
        write_cr0((c0 & !(1 << 30)) | (1 << 29))
    });
    t.case("CR0 reserved bit 32", Want::Fault(13), 3, || {
        write_cr0(c0 | (1 << 32))
    });
    t.case("CLTS", Want::Value(0), 0, || {
        // SAFETY: clears CR0.TS, emulated by the hypervisor.
        unsafe { core::arch::asm!("clts") };
        cr0() & 8
    });
    t.case("CR0 written back unchanged", Want::Survives, 3, || {
        write_cr0(c0)
    });
    t.case("CR4 written back unchanged", Want::Survives, 3, || {
        write_cr4(c4)
    });

    // VMX instructions: not offered to guests (#UD, as on a CPU without VMX).
    let scratch = (&raw mut SCRATCH) as u64;
    macro_rules! vmx {
        ($name:literal, $len:literal, $($b:literal),+) => {
            t.case($name, Want::Fault(6), $len, || {
                // SAFETY: a VMX instruction the hypervisor refuses; RAX/RCX name a scratch
                // page and the fault is skipped.
                unsafe { core::arch::asm!(concat!(".byte ", $(stringify!($b), ", ",)+ "0x90"), in("rax") scratch, in("rcx") scratch, options(nostack)) };
                0
            });
        };
    }
    vmx!("VMXON", 4, 0xf3, 0x0f, 0xc7, 0x30);
    vmx!("VMXOFF", 3, 0x0f, 0x01, 0xc4);
    vmx!("VMCLEAR", 4, 0x66, 0x0f, 0xc7, 0x30);
    vmx!("VMPTRLD", 3, 0x0f, 0xc7, 0x30);
    vmx!("VMPTRST", 3, 0x0f, 0xc7, 0x38);
    vmx!("VMREAD", 3, 0x0f, 0x78, 0xc8);
    vmx!("VMWRITE", 3, 0x0f, 0x79, 0xc1);
    vmx!("VMLAUNCH", 3, 0x0f, 0x01, 0xc2);
    vmx!("VMRESUME", 3, 0x0f, 0x01, 0xc3);
    vmx!("INVEPT", 5, 0x66, 0x0f, 0x38, 0x80, 0x01);
    vmx!("INVVPID", 5, 0x66, 0x0f, 0x38, 0x81, 0x01);

    // CPUID: VT-x hidden, the hypervisor named, odd leaves answered.
    t.case("CPUID.1 hides VMX", Want::Value(0), 0, || {
        u64::from(cpuid(1, 0)[2] & (1 << 5))
    });
    t.case("CPUID.1 says a hypervisor runs", Want::Value(1), 0, || {
        u64::from(cpuid(1, 0)[2] >> 31)
    });
    for (name, leaf, sub) in [
        ("CPUID leaf 0xffffffff", 0xffff_ffffu32, 0u32),
        ("CPUID leaf 0x4fffffff", 0x4fff_ffff, 0),
        ("CPUID leaf 7 subleaf 0xffff", 7, 0xffff),
        ("CPUID leaf 0x80000008", 0x8000_0008, 0),
    ] {
        t.case(name, Want::Survives, 0, || u64::from(cpuid(leaf, sub)[0]));
    }

    // XSETBV: XCR0 values the allow-list refuses (with CR4.OSXSAVE on, where the CPU has
    // XSAVE, so that XSETBV exits and the hypervisor checks the value; else the CPU's #UD).
    let xsave = cpuid(1, 0)[2] & (1 << 26) != 0;
    let c4 = cr4();
    if xsave {
        write_cr4(c4 | (1 << 18));
    }
    let osxsave = cr4() & (1 << 18) != 0;
    let xsetbv = |ecx: u32, value: u64| {
        // SAFETY: XSETBV; a refused value is #GP (or #UD without OSXSAVE), skipped (3 bytes).
        unsafe {
            core::arch::asm!("xsetbv", in("ecx") ecx, in("eax") value as u32, in("edx") (value >> 32) as u32)
        };
        0
    };
    for (name, ecx, value) in [
        ("XSETBV XCR0 without x87", 0u32, 2u64),
        ("XSETBV XCR0 = 0", 0, 0),
        ("XSETBV XCR0 AVX without SSE", 0, 0b101),
        ("XSETBV XCR1", 1, 1),
        ("XSETBV XCR0 every bit", 0, u64::MAX),
    ] {
        let want = if osxsave {
            Want::Fault(13)
        } else {
            Want::Fault(6)
        };
        t.case(name, want, 3, || xsetbv(ecx, value));
    }
    if osxsave {
        t.case(
            "XSETBV XCR0 = x87 | SSE (allowed)",
            Want::Survives,
            3,
            || xsetbv(0, 3),
        );
    }
    write_cr4(c4);

    // Ports outside this guest's devices: reads float high, writes go nowhere (no reset, no
    // SMI, nothing on the host's serial port or another domain's disk).
    for (name, port) in [
        ("in PIC command", 0x20u16),
        ("in PIC mask", 0x21),
        ("in slave PIC", 0xa0),
        ("in PIT channel 0", 0x40),
        ("in system control port B", 0x61),
        ("in CMOS data", 0x71),
        ("in keyboard status", 0x64),
        ("in IDE data (dom0's disk)", 0x1f0),
        ("in COM2", 0x2f8),
        ("in VGA attribute", 0x3c0),
        ("in ACPI PM timer", 0x408),
    ] {
        t.case(name, Want::Value(0xff), 0, || u64::from(inb(port)));
    }
    t.case(
        "in PCI config data (32-bit)",
        Want::Value(0xffff_ffff),
        0,
        || {
            outl(0xcf8, 0x8000_0000);
            u64::from(inl(0xcfc))
        },
    );
    for (name, port, v) in [
        ("out fast A20 / reset (port 0x92)", 0x92u16, 0x01u8),
        ("out reset control 0xcf9: hard reset", 0xcf9, 0x06),
        ("out keyboard controller reset", 0x64, 0xfe),
        ("out APM/SMI command", 0xb2, 0x00),
        ("out PIT mode", 0x43, 0x34),
        ("out CMOS index (NMI off)", 0x70, 0x8f),
        ("out POST code", 0x80, 0x55),
        (
            "out host serial port COM1 (not the virtual UART)",
            0x3f9,
            0x0f,
        ),
        ("out IDE command (dom0's disk)", 0x1f7, 0xec),
    ] {
        t.case(name, Want::Survives, 0, || {
            outb(port, v);
            0
        });
    }

    // MMIO outside its devices: reads all ones, writes dropped, any width.
    let mmio32 = |a: u64| {
        // SAFETY: unassigned MMIO in this domain: the hypervisor completes the access.
        unsafe { u64::from((a as *const u32).read_volatile()) }
    };
    t.case(
        "MMIO read local APIC ID",
        Want::Value(0xffff_ffff),
        0,
        || mmio32(0xfee0_0020),
    );
    t.case(
        "MMIO INIT/SIPI storm at the APIC ICR",
        Want::Value(0xffff_ffff),
        0,
        || {
            for _ in 0..64 {
                // SAFETY: as above; writes are dropped.
                unsafe {
                    (0xfee0_0310 as *mut u32).write_volatile(0x0100_0000);
                    (0xfee0_0300 as *mut u32).write_volatile(0x0000_4500);
                    (0xfee0_0300 as *mut u32).write_volatile(0x0000_4608);
                }
            }
            mmio32(0xfee0_0300)
        },
    );
    t.case("MMIO read HPET", Want::Value(0xffff_ffff), 0, || {
        mmio32(0xfed0_0000)
    });
    t.case(
        "MMIO read the reset vector's ROM",
        Want::Value(0xffff_ffff),
        0,
        || mmio32(0xffff_fff0),
    );
    t.case("MMIO 8-byte read", Want::Value(u64::MAX), 0, || {
        // SAFETY: as above, 8 bytes wide.
        unsafe { (0xfec0_0010 as *const u64).read_volatile() }
    });
    t.case("MMIO 2-byte read", Want::Value(0xffff), 0, || {
        // SAFETY: as above, 2 bytes wide.
        unsafe { u64::from((0xfec0_0012 as *const u16).read_volatile()) }
    });
    t.case(
        "MMIO 8-byte write then read",
        Want::Value(0xffff_ffff),
        0,
        || {
            // SAFETY: as above.
            unsafe { (0xfec0_0020 as *mut u64).write_volatile(0x1122_3344_5566_7788) };
            mmio32(0xfec0_0020)
        },
    );

    // Timer and interrupt storms: the shortest period, interrupts on.
    t.case(
        "timer storm at the shortest period",
        Want::Survives,
        0,
        || {
            let before = ticks();
            let r = hypercall(nr::SET_TIMER, 0x30, 100, 0);
            let t0 = test_guests::rdtsc();
            // SAFETY: interrupts on while the storm runs; the handler only counts.
            unsafe { core::arch::asm!("sti") };
            while test_guests::rdtsc() - t0 < 80_000 {
                core::hint::spin_loop();
            }
            // SAFETY: as above.
            unsafe { core::arch::asm!("cli") };
            hypercall(nr::SET_TIMER, 0x30, 0, 0);
            if r != 0 || ticks() == before {
                println!(
                    "hostile: timer storm: armed {r}, {} interrupts",
                    ticks() - before
                );
            }
            ticks() - before
        },
    );

    // Its own exceptions: delivered to its own handlers, nothing else.
    t.case("UD2", Want::Fault(6), 2, || {
        // SAFETY: #UD, skipped.
        unsafe { core::arch::asm!("ud2") };
        0
    });
    t.case("INT3", Want::Fault(3), 0, || {
        // SAFETY: #BP, a trap: returns after it.
        unsafe { core::arch::asm!("int3") };
        0
    });
    t.case("divide by zero", Want::Fault(0), 2, || {
        // SAFETY: DIV ECX with ECX = 0 (2 bytes: f7 f1): #DE, skipped.
        unsafe { core::arch::asm!(".byte 0xf7, 0xf1", inout("eax") 1u32 => _, inout("edx") 0u32 => _, in("ecx") 0u32) };
        0
    });
    t.case("LIDT limit 0, then a hypercall", Want::Value(0), 0, || {
        #[repr(C, packed)]
        struct Dtr {
            limit: u16,
            base: u64,
        }
        let empty = Dtr { limit: 0, base: 0 };
        // SAFETY: no interrupt or fault can come while the empty IDT is loaded (interrupts
        // are off and the NOP hypercall does not fault); the suite's IDT is loaded again.
        unsafe { core::arch::asm!("lidt [{0}]", in(reg) &empty) };
        let r = hypercall(nr::NOP, 0, 0, 0) as u64;
        install_idt();
        r
    });
    (t.ran, t.good)
}
