//! The machine's own CMOS clock, read once at boot: the wall time PC guests' clocks start from
//! (`hv_platform::rtc`). The hypervisor keeps the RTC; guests never reach it.

use core::sync::atomic::{AtomicU64, Ordering};

use hv_platform::rtc::{Civil, unix_from_civil};
use x86_64::instructions::port::Port;

/// Seconds since 1970 at boot, and the TSC then.
static BOOT_UNIX: AtomicU64 = AtomicU64::new(0);
static BOOT_TSC: AtomicU64 = AtomicU64::new(0);

fn reg(index: u8) -> u8 {
    let mut sel: Port<u8> = Port::new(0x70);
    let mut data: Port<u8> = Port::new(0x71);
    // SAFETY: ports 0x70/0x71 are the CMOS index and data registers on PC-compatible machines;
    // the hypervisor owns them (no guest reaches them) and only reads the clock. Bit 7 of the
    // index keeps NMIs masked, as firmware leaves it.
    unsafe {
        sel.write(index | 0x80);
        data.read()
    }
}

/// Reads the clock (waiting out an update in progress, boundedly) and remembers it with the
/// TSC; returns the seconds since 1970, or `None` when the clock reads as nonsense (then guests
/// start at 1970).
pub fn init() -> Option<u64> {
    for _ in 0..1_000_000 {
        if reg(0x0a) & 0x80 == 0 {
            break;
        }
        core::hint::spin_loop();
    }
    let b = reg(0x0b);
    let bin = |v: u8| {
        if b & 0x04 != 0 {
            v
        } else {
            (v >> 4) * 10 + (v & 0x0f)
        }
    };
    let hour_raw = reg(0x04);
    let mut hour = bin(hour_raw & 0x7f);
    if b & 0x02 == 0 && hour_raw & 0x80 != 0 {
        hour = (hour % 12) + 12; // 12-hour mode, PM
    } else if b & 0x02 == 0 && hour == 12 {
        hour = 0;
    }
    let century = match bin(reg(0x32)) {
        c @ 19..=99 => u32::from(c),
        _ => 20,
    };
    let c = Civil {
        year: century * 100 + u32::from(bin(reg(0x09))),
        month: bin(reg(0x08)),
        day: bin(reg(0x07)),
        hour,
        minute: bin(reg(0x02)),
        second: bin(reg(0x00)),
        weekday: 0,
    };
    BOOT_TSC.store(super::cpu::rdtsc(), Ordering::Relaxed);
    let secs = unix_from_civil(&c)?;
    BOOT_UNIX.store(secs, Ordering::Relaxed);
    Some(secs)
}

/// Seconds since 1970 now: the boot-time clock plus the TSC since (`tsc_hz`: its rate).
pub fn unix_now(tsc_hz: u64) -> u64 {
    let ticks = super::cpu::rdtsc().saturating_sub(BOOT_TSC.load(Ordering::Relaxed));
    BOOT_UNIX.load(Ordering::Relaxed) + ticks / tsc_hz.max(1)
}
