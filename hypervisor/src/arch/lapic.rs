//! The local APIC in xAPIC mode: enable, EOI, the periodic timer, and the INIT/SIPI
//! inter-processor interrupts that start application processors (SDM Vol. 3A ch. 10).
//! Its MMIO page is identity-mapped uncached by `mm::paging`.

use core::sync::atomic::{AtomicU64, Ordering};

use super::cpu;

const ID: usize = 0x20;
const EOI: usize = 0xb0;
const SVR: usize = 0xf0;
const ESR: usize = 0x280;
const ICR_LOW: usize = 0x300;
const ICR_HIGH: usize = 0x310;
const LVT_TIMER: usize = 0x320;
const TIMER_INITIAL: usize = 0x380;
const TIMER_CURRENT: usize = 0x390;
const TIMER_DIVIDE: usize = 0x3e0;

static BASE: AtomicU64 = AtomicU64::new(0xfee0_0000);

fn reg(offset: usize) -> *mut u32 {
    (BASE.load(Ordering::Relaxed) as usize + offset) as *mut u32
}

fn read(offset: usize) -> u32 {
    // SAFETY: `offset` is one of the register offsets above, inside the 4 KiB APIC page, which
    // is identity-mapped uncached (crate-level assumptions); registers are 32-bit aligned.
    unsafe { reg(offset).read_volatile() }
}

fn write(offset: usize, value: u32) {
    // SAFETY: as in `read`; writes to these registers only affect this CPU's APIC.
    unsafe { reg(offset).write_volatile(value) }
}

/// Enables this CPU's local APIC with the spurious vector; returns its APIC id.
pub fn enable(spurious_vector: u8) -> u32 {
    // SAFETY: IA32_APIC_BASE exists on every CPU with an APIC (all x86_64 CPUs); setting bit 11
    // (global enable) keeps the base and mode the firmware chose (xAPIC).
    let base = unsafe {
        let v = cpu::rdmsr(cpu::IA32_APIC_BASE);
        cpu::wrmsr(cpu::IA32_APIC_BASE, v | (1 << 11));
        v & 0x000f_ffff_ffff_f000
    };
    BASE.store(base, Ordering::Relaxed);
    write(SVR, 0x100 | u32::from(spurious_vector));
    id()
}

/// This CPU's APIC id.
pub fn id() -> u32 {
    read(ID) >> 24
}

/// Signals the end of the interrupt being handled.
pub fn eoi() {
    write(EOI, 0);
}

/// Starts the timer in periodic mode: `count` bus ticks (divided by 16) between interrupts.
pub fn start_periodic_timer(vector: u8, count: u32) {
    write(TIMER_DIVIDE, 0b0011); // divide by 16
    write(LVT_TIMER, (1 << 17) | u32::from(vector));
    write(TIMER_INITIAL, count);
}

/// Switches the timer to one-shot mode, stopped; [`arm_oneshot`] starts each count.
pub fn start_oneshot_timer(vector: u8) {
    write(TIMER_DIVIDE, 0b0011); // divide by 16
    write(TIMER_INITIAL, 0);
    write(LVT_TIMER, u32::from(vector));
}

/// One interrupt after `count` bus ticks (divided by 16); 0 stops the timer.
pub fn arm_oneshot(count: u32) {
    write(TIMER_INITIAL, count);
}

/// Measures timer ticks (divide by 16) during `wait`.
pub fn measure_timer(wait: impl FnOnce()) -> u32 {
    write(TIMER_DIVIDE, 0b0011);
    write(LVT_TIMER, 1 << 16); // masked, one-shot
    write(TIMER_INITIAL, u32::MAX);
    wait();
    let left = read(TIMER_CURRENT);
    write(TIMER_INITIAL, 0);
    u32::MAX - left
}

fn wait_icr_idle() {
    for _ in 0..1_000_000 {
        if read(ICR_LOW) & (1 << 12) == 0 {
            return;
        }
        core::hint::spin_loop();
    }
}

fn send_ipi(apic_id: u32, low: u32) {
    write(ESR, 0);
    write(ICR_HIGH, apic_id << 24);
    write(ICR_LOW, low);
    wait_icr_idle();
}

/// A fixed IPI on `vector` (edge, assert) to one CPU.
pub fn send_fixed(apic_id: u32, vector: u8) {
    send_ipi(apic_id, 0x0000_4000 | u32::from(vector));
}

/// INIT IPI (assert, level) to one CPU.
pub fn send_init(apic_id: u32) {
    send_ipi(apic_id, 0x0000_c500);
}

/// Start-up IPI: the target starts in real mode at `page << 12`.
pub fn send_sipi(apic_id: u32, page: u8) {
    send_ipi(apic_id, 0x0000_0600 | u32::from(page));
}
