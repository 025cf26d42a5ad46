//! `hostile [outside]`: garbage hypercall numbers and pointers, reserved MSRs (refused with #GP,
//! which its own IDT catches), unmapped ports, unmapped MMIO (reads all ones, writes dropped);
//! then the hostile suite (`cases.rs`: over a hundred named cases, counted); then a
//! deliberate triple fault, or with `outside` a read outside its memory and the MMIO hole.
//! The hypervisor must refuse each and stop only it.
#![cfg_attr(target_os = "none", no_std, no_main)]
#![allow(clippy::cast_possible_truncation)] // EDX:EAX halves of MSR values

#[cfg(target_os = "none")]
use test_guests::{hv_abi, hypercall, inb, outb, println};

test_guests::guest_main!(run);

#[cfg(target_os = "none")]
mod cases;

#[cfg(target_os = "none")]
static mut GP_COUNT: u64 = 0;

/// Length of the instruction expected to fault next (RDMSR/WRMSR 2, MOV CR4,RAX 3).
#[cfg(target_os = "none")]
static mut SKIP: u64 = 2;

/// #GP handler: counts, skips the faulting instruction (SKIP bytes), returns.
#[cfg(target_os = "none")]
#[unsafe(naked)]
extern "C" fn gp_handler() {
    core::arch::naked_asm!(
        "push rax",
        "mov rax, [rip + {skip}]",
        "add [rsp + 16], rax",
        "pop rax",
        "add rsp, 8",
        "inc qword ptr [rip + {count}]",
        "iretq",
        count = sym GP_COUNT,
        skip = sym SKIP,
    );
}

#[cfg(target_os = "none")]
fn gp_count() -> u64 {
    // SAFETY: reads a static the handler updates; single-threaded.
    unsafe { (&raw const GP_COUNT).read_volatile() }
}

#[cfg(target_os = "none")]
fn install_idt() {
    static mut IDT: [[u64; 2]; 32] = [[0; 2]; 32];
    let h = gp_handler as *const () as u64;
    let low = (h & 0xffff) | (0x08 << 16) | (0x8e << 40) | (((h >> 16) & 0xffff) << 48);
    #[repr(C, packed)]
    struct Dtr {
        limit: u16,
        base: u64,
    }
    // SAFETY: single-threaded guest; the IDT is a static only this function writes, and the
    // descriptor names exactly that table.
    unsafe {
        let idt = &raw mut IDT;
        (*idt)[13] = [low, h >> 32];
        let dtr = Dtr {
            limit: 32 * 16 - 1,
            base: idt as u64,
        };
        core::arch::asm!("lidt [{0}]", in(reg) &dtr);
    }
}

#[cfg(target_os = "none")]
fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the hypervisor answers or injects #GP, which `gp_handler` skips.
    unsafe {
        core::arch::asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nostack))
    };
    u64::from(hi) << 32 | u64::from(lo)
}

#[cfg(target_os = "none")]
fn wrmsr(msr: u32, v: u64) {
    // SAFETY: as for `rdmsr`.
    unsafe {
        core::arch::asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nostack))
    };
}

#[cfg(target_os = "none")]
fn run(args: &str, ram: u64) {
    use hv_abi::{Status, hypercall as nr};
    let mut unknown = 0;
    for n in [77u64, 99, 0xdead_beef, u64::MAX, 1 << 40] {
        if hypercall(n, u64::MAX, u64::MAX, u64::MAX) == Status::UnknownCall as i64 {
            unknown += 1;
        }
    }
    println!("hostile: garbage hypercall numbers refused: {unknown} of 5");
    let bad = [
        hypercall(nr::CONSOLE_WRITE, 0xffff_ffff_0000, 16, 0),
        hypercall(nr::CONSOLE_WRITE, u64::MAX - 3, 8, 0),
        hypercall(nr::CONSOLE_WRITE, 0x1000, 1 << 40, 0),
    ];
    println!("hostile: bad pointers refused with {bad:?}");
    install_idt();
    let a = rdmsr(0x480);
    wrmsr(0x48c, 0x1234);
    let b = rdmsr(0xc001_0000);
    // SAFETY: reads a static the handler updates; single-threaded.
    let gps = unsafe { (&raw const GP_COUNT).read_volatile() };
    println!("hostile: reserved MSRs refused with #GP: {gps} of 3 (read back {a:#x}, {b:#x})");
    let v = inb(0x1234);
    outb(0x80, 0x55);
    outb(0x64, 0xfe); // the keyboard-controller reset: must not reset the host
    println!("hostile: unmapped port read {v:#x}; port writes ignored");
    let before = gp_count();
    wrmsr(0xc000_0100, 0x0000_8000_0000_0000); // FS base, not canonical
    // SAFETY: the guest's own CR4 with VMXE set: VMX is hidden, so the hypervisor must #GP.
    unsafe {
        (&raw mut SKIP).write_volatile(3);
        let mut cr4: u64;
        core::arch::asm!("mov {0}, cr4", out(reg) cr4);
        cr4 |= 1 << 13;
        core::arch::asm!("mov cr4, rax", in("rax") cr4);
        (&raw mut SKIP).write_volatile(2);
    }
    println!(
        "hostile: non-canonical FS base and CR4.VMXE refused with #GP: {} of 2",
        gp_count() - before
    );
    let mmio = 0xfec0_0000 as *mut u32;
    // SAFETY: unassigned MMIO in this domain: the hypervisor completes these accesses.
    let (r1, r2, r3) = unsafe {
        let r1 = mmio.read_volatile();
        mmio.write_volatile(0x1234_5678);
        let r2 = mmio.read_volatile();
        let r3 = (mmio as *const u8).add(3).read_volatile();
        (r1, r2, r3)
    };
    println!("hostile: unmapped MMIO reads {r1:#x}, {r2:#x} after a write, byte {r3:#x}");
    let (ran, good) = cases::run(ram);
    println!(
        "hostile: {ran} cases, {good} as expected, {} unexpected",
        ran - good
    );
    if args.split_whitespace().any(|a| a == "outside") {
        println!("hostile: reading outside my memory at 0x30000000");
        // SAFETY: deliberately outside this domain's memory.
        let x = unsafe { (0x3000_0000 as *const u32).read_volatile() };
        println!("hostile: FAILED: read {x:#x} from outside my memory");
    } else {
        println!("hostile: now a deliberate triple fault");
        // SAFETY: an empty IDT makes the breakpoint unhandleable: a triple fault, on purpose.
        unsafe {
            let empty: [u8; 10] = [0; 10];
            core::arch::asm!("lidt [{0}]", "int3", in(reg) empty.as_ptr());
        }
        println!("hostile: FAILED: survived a triple fault");
    }
    test_guests::exit(1);
}

#[cfg(not(target_os = "none"))]
fn run(_args: &str, _ram: u64) {}
