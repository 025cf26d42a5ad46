//! The 8254 PIT, used only to calibrate the TSC and the local APIC timer at boot: channel 2
//! counts down once (mode 0) while software polls its output on port 0x61.

use x86_64::instructions::port::Port;

const PIT_HZ: u64 = 1_193_182;

/// Busy-waits `ms` milliseconds (1..=50) on PIT channel 2.
pub fn wait_ms(ms: u64) {
    let count = (PIT_HZ * ms.clamp(1, 50) / 1000) as u16;
    let mut gate: Port<u8> = Port::new(0x61);
    let mut command: Port<u8> = Port::new(0x43);
    let mut data: Port<u8> = Port::new(0x42);
    // SAFETY: ports 0x42/0x43/0x61 are the PIT's channel 2 and its gate on PC-compatible
    // machines; the hypervisor owns them, and channel 2 only drives the (disabled) speaker.
    unsafe {
        let g = gate.read();
        gate.write((g & !0x02) | 0x01); // gate high, speaker off
        command.write(0b1011_0000); // channel 2, lobyte/hibyte, mode 0, binary
        data.write(count as u8);
        data.write((count >> 8) as u8);
        // Restart the count: mode 0 starts when the gate rises.
        let g = gate.read();
        gate.write(g & !0x01);
        gate.write(g | 0x01);
        for _ in 0..50_000_000u64 {
            if gate.read() & 0x20 != 0 {
                break;
            }
        }
    }
}
