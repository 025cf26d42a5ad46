//! Guest x87/SSE/AVX state. The hypervisor itself uses none of it, so a guest's registers stay
//! loaded while its CPU handles its exits; they are saved and restored only when a CPU switches
//! to another vCPU: with XSAVE/XRSTOR (and the vCPU's own XCR0) where the CPU has XSAVE, else
//! with FXSAVE/FXRSTOR. Guests may enable x87, SSE and AVX in XCR0 (checked by
//! [`super::policy::xcr0_allowed`]); larger components are hidden from them.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use alloc::boxed::Box;

use crate::arch::cpu;
use crate::arch::percpu::MAX_CPUS;

/// Whether XSAVE is in use (CPUID.1:ECX.XSAVE, CR4.OSXSAVE set by `init_this_cpu`).
static XSAVE: AtomicBool = AtomicBool::new(false);
/// The XCR0 bits guests may set: x87, SSE and AVX where the CPU has them.
static ALLOWED: AtomicU64 = AtomicU64::new(0);
#[allow(clippy::declare_interior_mutable_const)] // only initialises the array below
const XCR0_INIT: AtomicU64 = AtomicU64::new(1);
/// The XCR0 each CPU has loaded now.
static XCR0_NOW: [AtomicU64; MAX_CPUS] = [XCR0_INIT; MAX_CPUS];

/// XCR0 after reset, and what a new vCPU starts with: x87 only.
pub const XCR0_RESET: u64 = 1;

/// Turns on FXSAVE/XSAVE support on this CPU: CR4.OSFXSR, OSXMMEXCPT and, where the CPU has
/// XSAVE, OSXSAVE (the hypervisor is built without SIMD; these only let it switch guest state).
pub fn init_this_cpu() {
    let leaf1 = cpu::cpuid(1, 0);
    let has_xsave = leaf1.ecx & (1 << 26) != 0;
    let mut cr4 = x86_64::registers::control::Cr4::read_raw() | (1 << 9) | (1 << 10);
    if has_xsave {
        cr4 |= 1 << 18;
    }
    // SAFETY: these CR4 bits only declare that system software manages x87/SSE/XSAVE state,
    // which the run loop does; no code of the hypervisor uses those registers.
    unsafe { x86_64::registers::control::Cr4::write_raw(cr4) };
    if has_xsave {
        let supported = cpu::cpuid(0xd, 0);
        let mask = (u64::from(supported.edx) << 32 | u64::from(supported.eax)) & 0b111;
        ALLOWED.store(mask, Ordering::Relaxed);
        XSAVE.store(true, Ordering::Relaxed);
        set_xcr0(cpu::current_cpu(), XCR0_RESET);
    }
}

/// The XCR0 bits guests may use (0 without XSAVE).
pub fn allowed() -> u64 {
    ALLOWED.load(Ordering::Relaxed)
}

/// Loads XCR0 on this CPU (the value must be valid: `policy::xcr0_allowed`).
pub fn set_xcr0(cpu_index: usize, value: u64) {
    if XCR0_NOW[cpu_index].load(Ordering::Relaxed) == value && value != XCR0_RESET {
        return;
    }
    // SAFETY: CR4.OSXSAVE is set (XSAVE is in use) and `value` passed the validity rules of
    // SDM Vol. 1 §13.3 (x87 set, AVX only with SSE, only supported bits), so XSETBV cannot
    // fault; XCR0 only governs x87/SSE/AVX state, which the hypervisor does not use.
    unsafe {
        core::arch::asm!("xsetbv", in("ecx") 0u32, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack));
    }
    XCR0_NOW[cpu_index].store(value, Ordering::Relaxed);
}

/// One vCPU's saved x87/SSE/AVX state (XSAVE layout, or FXSAVE in its first 512 bytes).
#[repr(C, align(64))]
pub struct FpuArea([u8; 4096]);

impl FpuArea {
    /// The state after reset: FCW 0x37F, MXCSR 0x1F80, every XSAVE component in its init state
    /// (XSTATE_BV 0) (SDM Vol. 1 Table 10-2, §13.6).
    pub fn initial() -> Box<FpuArea> {
        let mut a = Box::new(FpuArea([0; 4096]));
        a.0[0..2].copy_from_slice(&0x037fu16.to_le_bytes());
        a.0[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        a
    }
}

/// Loads a vCPU's state into this CPU (its XCR0 first).
pub fn restore(area: &FpuArea, xcr0: u64, cpu_index: usize) {
    if XSAVE.load(Ordering::Relaxed) {
        set_xcr0(cpu_index, xcr0);
        // SAFETY: XRSTOR from a 64-byte aligned area this vCPU owns, written by XSAVE or set to
        // the init image above (valid header, reserved bits clear); it only loads x87/SSE/AVX.
        unsafe {
            core::arch::asm!("xrstor64 [{0}]", in(reg) area.0.as_ptr(), in("eax") u32::MAX, in("edx") u32::MAX, options(nostack));
        }
    } else {
        // SAFETY: FXRSTOR from a 16-byte aligned area this vCPU owns, in FXSAVE layout.
        unsafe { core::arch::asm!("fxrstor64 [{0}]", in(reg) area.0.as_ptr(), options(nostack)) };
    }
}

/// Saves this CPU's x87/SSE/AVX state (the current vCPU's) into `area`.
pub fn save(area: &mut FpuArea) {
    if XSAVE.load(Ordering::Relaxed) {
        // SAFETY: XSAVE into a 64-byte aligned 4 KiB area this vCPU owns; with XCR0 limited to
        // x87/SSE/AVX the image is at most 832 bytes.
        unsafe {
            core::arch::asm!("xsave64 [{0}]", in(reg) area.0.as_mut_ptr(), in("eax") u32::MAX, in("edx") u32::MAX, options(nostack));
        }
    } else {
        // SAFETY: FXSAVE into a 16-byte aligned area this vCPU owns.
        unsafe {
            core::arch::asm!("fxsave64 [{0}]", in(reg) area.0.as_mut_ptr(), options(nostack))
        };
    }
}
