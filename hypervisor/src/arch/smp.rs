//! Starting the application processors: the real-mode trampoline (from the `bootloader` crate)
//! is copied below 1 MiB, and each AP gets INIT, then SIPIs, with its parameters (page-table
//! root, stack, index, entry point) in the page after the trampoline (SDM Vol. 3A §9.4.4).
//! APs are started one at a time, so the parameter page is never shared.

use core::sync::atomic::{AtomicUsize, Ordering};

use bootloader::entry::{AP_PARAMS_PHYS, AP_TRAMPOLINE_PHYS, ap_trampoline, efer_extra_bits};

use super::{lapic, pit};
use crate::arch::percpu::{CPUS, CpuState};

/// APs that have reached Rust; each AP increments it first thing.
pub static AP_ALIVE: AtomicUsize = AtomicUsize::new(0);

/// Copies the trampoline to its page. Must run while that page is still writable (before the
/// hypervisor's W^X tables, which map it read-only and executable, are loaded).
///
/// # Safety
/// Physical page `AP_TRAMPOLINE_PHYS` must be identity-mapped writable and unused.
pub unsafe fn install_trampoline() {
    let code = ap_trampoline();
    assert!(code.len() <= 4096, "AP trampoline larger than a page");
    // SAFETY: forwarded from this function's contract; source and destination are distinct.
    unsafe {
        core::ptr::copy_nonoverlapping(code.as_ptr(), AP_TRAMPOLINE_PHYS as *mut u8, code.len())
    };
}

/// Starts the AP with record `index` and APIC id `apic_id` on `stack_top`, entering `entry`.
/// Returns whether it reached Rust within about half a second.
pub fn start_ap(
    index: usize,
    apic_id: u32,
    cr3: u64,
    stack_top: u64,
    entry: extern "C" fn(u64) -> !,
) -> bool {
    let params = AP_PARAMS_PHYS as *mut u64;
    // SAFETY: the parameter page is identity-mapped writable, reserved from the frame allocator
    // (first MiB) and read only by the AP being started, which does not run yet.
    unsafe {
        params.write_volatile(cr3);
        params.add(1).write_volatile(stack_top);
        params.add(2).write_volatile(index as u64);
        params.add(3).write_volatile(entry as usize as u64);
        params.add(4).write_volatile(efer_extra_bits());
    }
    CPUS[index].apic_id.store(apic_id, Ordering::Relaxed);
    CPUS[index].set_state(CpuState::Starting);
    let before = AP_ALIVE.load(Ordering::Acquire);
    let page = (AP_TRAMPOLINE_PHYS >> 12) as u8;
    lapic::send_init(apic_id);
    pit::wait_ms(10);
    lapic::send_sipi(apic_id, page);
    for attempt in 0..500 {
        if AP_ALIVE.load(Ordering::Acquire) > before {
            return true;
        }
        if attempt == 5 {
            lapic::send_sipi(apic_id, page);
        }
        pit::wait_ms(1);
    }
    CPUS[index].set_state(CpuState::NoResponse);
    false
}
