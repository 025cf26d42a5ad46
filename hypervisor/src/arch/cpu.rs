//! CPU registers and instructions: MSRs, CPUID, TSC, halting, interrupts.

use x86_64::registers::model_specific::Msr;

pub const IA32_APIC_BASE: u32 = 0x1b;
pub const IA32_GS_BASE: u32 = 0xc000_0101;

/// Reads an MSR.
///
/// # Safety
/// The MSR must exist on this CPU (reading an absent MSR raises #GP, which is fatal here) and
/// reading it must have no side effect the caller does not intend.
pub unsafe fn rdmsr(msr: u32) -> u64 {
    // SAFETY: forwarded from this function's contract.
    unsafe { Msr::new(msr).read() }
}

/// Writes an MSR.
///
/// # Safety
/// The MSR must exist and the value must be valid for it; the caller owns the consequences
/// (these registers configure the CPU itself).
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: forwarded from this function's contract.
    unsafe { Msr::new(msr).write(value) }
}

/// CPUID leaf and subleaf.
pub fn cpuid(leaf: u32, subleaf: u32) -> core::arch::x86_64::CpuidResult {
    // CPUID is available on every x86_64 CPU and has no side effects.
    core::arch::x86_64::__cpuid_count(leaf, subleaf)
}

/// The time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC reads a counter and has no side effects; CR4.TSD is clear at CPL 0 anyway.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// This CPU's index into `percpu::CPUS` (kept in IA32_GS_BASE).
pub fn current_cpu() -> usize {
    // SAFETY: IA32_GS_BASE exists on every x86_64 CPU; the boot path sets it on each CPU before
    // anything calls this (crate-level assumptions); before that it reads 0, the BSP's index.
    unsafe { rdmsr(IA32_GS_BASE) as usize }
}

/// Records this CPU's index.
pub fn set_current_cpu(index: usize) {
    // SAFETY: IA32_GS_BASE exists on every x86_64 CPU and the hypervisor never uses GS-relative
    // addressing, so the value is only ever read back by `current_cpu`.
    unsafe { wrmsr(IA32_GS_BASE, index as u64) }
}

/// Stops this CPU for good: interrupts off, HLT forever.
/// SMEP and SMAP on this CPU, where CPUID offers them (leaf 7 EBX bits 7 and 20): the
/// hypervisor then can neither execute nor touch user-accessible pages by mistake. Its own
/// page tables map nothing user-accessible, and it reaches guest memory only through them,
/// so neither changes what it does. Returns which were turned on.
pub fn harden() -> (bool, bool) {
    let ebx = cpuid(7, 0).ebx;
    let (smep, smap) = (ebx & (1 << 7) != 0, ebx & (1 << 20) != 0);
    let mut bits = 0u64;
    if smep {
        bits |= 1 << 20;
    }
    if smap {
        bits |= 1 << 21;
    }
    // SAFETY: CR4.SMEP/SMAP only add checks on user-accessible pages, of which the page tables
    // this CPU runs on (the hypervisor's own, installed before this is called) have none; the
    // bits are set only where CPUID says the CPU has them.
    unsafe {
        let cr4 = x86_64::registers::control::Cr4::read_raw();
        x86_64::registers::control::Cr4::write_raw(cr4 | bits);
    }
    (smep, smap)
}

pub fn halt_forever() -> ! {
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}

/// Enables interrupts and halts until the next one, atomically (STI; HLT).
pub fn wait_for_interrupt() {
    x86_64::instructions::interrupts::enable_and_hlt();
}

/// Resets the machine: the keyboard controller's reset line first, then a triple fault.
pub fn reboot() -> ! {
    use x86_64::instructions::port::Port;
    x86_64::instructions::interrupts::disable();
    let mut status: Port<u8> = Port::new(0x64);
    // SAFETY: ports 0x64/0x60 are the i8042 controller on PC-compatible machines; waiting for
    // its input buffer to drain and sending 0xFE pulses the CPU reset line. Nothing else of the
    // hypervisor's state matters any more.
    unsafe {
        for _ in 0..100_000 {
            if status.read() & 2 == 0 {
                break;
            }
        }
        status.write(0xfe);
    }
    for _ in 0..10_000_000 {
        core::hint::spin_loop();
    }
    // Still here: load an empty IDT and raise an exception, which triple-faults.
    static EMPTY: [u64; 2] = [0, 0];
    let ptr = x86_64::structures::DescriptorTablePointer {
        limit: 0,
        base: x86_64::VirtAddr::new(EMPTY.as_ptr() as u64),
    };
    // SAFETY: deliberately makes every interrupt unhandleable; the next one resets the CPU.
    unsafe {
        x86_64::instructions::tables::lidt(&ptr);
        core::arch::asm!("int3", options(noreturn));
    }
}
