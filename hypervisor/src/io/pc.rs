//! The devices of a PC domain (an unmodified Linux) that live in the domain, not in a vCPU:
//! the IOAPIC, the interrupt-driven 16550 UART on COM1 and the hardware-reduced ACPI sleep and
//! reset registers. The models are `hv-platform`'s; this file wires them to the domain's
//! buses and turns what they do into [`IoEvent`]s and interrupt deliveries for the vCPUs.

use hv_platform::acpi;
use hv_platform::ioapic::{Delivery, IoApic};
use hv_platform::uart::Uart16550;

use super::IoEvent;

/// COM1's ports and ISA interrupt line.
pub const COM1: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
/// Bit of the domain's raised-interrupt word (`Domain::irqs`; bits 0.. are virtio windows)
/// that says the operator's typed bytes wait in [`PcDevices::input`].
pub const CONSOLE_INPUT_BIT: u32 = 63;
/// The IOAPIC's register window.
pub const IOAPIC_WINDOW: core::ops::Range<u64> = acpi::IOAPIC_BASE..acpi::IOAPIC_BASE + 0x1000;
/// The local APIC's register page (each vCPU sees its own).
pub const LAPIC_WINDOW: core::ops::Range<u64> = acpi::LAPIC_BASE..acpi::LAPIC_BASE + 0x1000;

/// The IOAPIC pin of virtio window `w` (above the 16 ISA lines; the ACPI tables say the same).
pub fn virtio_gsi(w: usize) -> u32 {
    acpi::FIRST_DEVICE_GSI + w as u32
}

/// A port access the PC devices answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PcPort {
    Read(u32),
    Wrote(IoEvent),
}

/// The domain-wide devices of a PC.
pub struct PcDevices {
    pub ioapic: IoApic,
    pub uart: Uart16550,
    /// The UART's interrupt line as the IOAPIC last saw it.
    uart_line: bool,
    /// Bytes typed for the guest that did not fit its receive FIFO yet.
    pub input: heapless::Deque<u8, 256>,
    /// Typed bytes that found the queue full.
    pub input_dropped: u64,
    pub rtc: hv_platform::rtc::Rtc,
}

impl PcDevices {
    /// The devices of a PC with `vcpus` vCPUs (the IOAPIC's id follows the local APICs').
    pub fn new(vcpus: u32) -> PcDevices {
        PcDevices {
            ioapic: IoApic::new(vcpus.min(254) as u8),
            uart: Uart16550::new(),
            uart_line: false,
            input: heapless::Deque::new(),
            input_dropped: 0,
            rtc: hv_platform::rtc::Rtc::default(),
        }
    }

    /// A port access, if it is one of these devices' ports; the interrupt it raises, if any.
    /// `now`: the wall clock (seconds since 1970), which only the RTC's data port reads.
    pub fn port(
        &mut self,
        port: u16,
        size: u8,
        input: bool,
        value: u32,
        now: u64,
    ) -> Option<(PcPort, Option<Delivery>)> {
        use hv_platform::rtc;
        let answer = match port {
            rtc::INDEX_PORT if input => PcPort::Read(0xff),
            rtc::INDEX_PORT => {
                self.rtc.select(value as u8);
                PcPort::Wrote(IoEvent::None)
            }
            rtc::DATA_PORT if input => PcPort::Read(u32::from(self.rtc.read(now))),
            rtc::DATA_PORT => PcPort::Wrote(IoEvent::None),
            COM1..=0x3ff => {
                // The 8250 driver only makes byte accesses; wider ones touch one register.
                let offset = (port - COM1) as u8;
                let a = if input {
                    let b = self.uart.read(offset);
                    PcPort::Read(u32::from(b) & ones(size))
                } else {
                    match self.uart.write(offset, value as u8) {
                        Some(b) => PcPort::Wrote(IoEvent::Console(b)),
                        None => PcPort::Wrote(IoEvent::None),
                    }
                };
                self.refill();
                return Some((a, self.uart_irq()));
            }
            acpi::SLEEP_CONTROL_PORT | acpi::SLEEP_STATUS_PORT | acpi::RESET_PORT if input => {
                PcPort::Read(0)
            }
            // SLP_TYP in bits 4:2, SLP_EN bit 5 (ACPI 6.4 §4.8.3.7): S5 powers the domain off.
            acpi::SLEEP_CONTROL_PORT
                if value & (1 << 5) != 0 && (value >> 2) & 7 == u32::from(acpi::S5_SLP_TYP) =>
            {
                PcPort::Wrote(IoEvent::PowerOff)
            }
            acpi::RESET_PORT if value as u8 == acpi::RESET_VALUE => PcPort::Wrote(IoEvent::Reset),
            // The panic notifier: a read says which events it takes, a write reports them.
            acpi::PVPANIC_PORT if input => PcPort::Read(u32::from(acpi::PVPANIC_PANICKED)),
            acpi::PVPANIC_PORT if value as u8 & acpi::PVPANIC_PANICKED != 0 => {
                PcPort::Wrote(IoEvent::Panicked)
            }
            acpi::PVPANIC_PORT => PcPort::Wrote(IoEvent::None),
            acpi::SLEEP_CONTROL_PORT | acpi::SLEEP_STATUS_PORT | acpi::RESET_PORT => {
                PcPort::Wrote(IoEvent::None)
            }
            // The keyboard controller's reset pulse, Linux's second way to reboot.
            0x64 if !input && value as u8 == 0xfe => PcPort::Wrote(IoEvent::Reset),
            _ => return None,
        };
        Some((answer, None))
    }

    /// Moves typed bytes into the UART's FIFO while it has room.
    fn refill(&mut self) {
        while self.uart.rx_room() > 0 {
            match self.input.pop_front() {
                Some(b) => {
                    self.uart.receive(b);
                }
                None => break,
            }
        }
    }

    /// Queues bytes the operator typed for the guest's console, for [`Self::take_input`] to
    /// move into the UART from the guest's vCPU; returns how many were taken (the rest did not
    /// fit and are counted in `input_dropped`).
    pub fn queue_input(&mut self, bytes: &[u8]) -> usize {
        let mut n = 0;
        for &b in bytes {
            if self.input.push_back(b).is_err() {
                break;
            }
            n += 1;
        }
        self.input_dropped += (bytes.len() - n) as u64;
        n
    }

    /// Moves queued input into the UART's FIFO while it has room; the interrupt that raises.
    pub fn take_input(&mut self) -> Option<Delivery> {
        self.refill();
        self.uart_irq()
    }

    /// Follows the UART's interrupt line into the IOAPIC (ISA lines are edge-triggered).
    fn uart_irq(&mut self) -> Option<Delivery> {
        let line = self.uart.irq();
        if line == self.uart_line {
            return None;
        }
        self.uart_line = line;
        self.ioapic.set_line(COM1_IRQ, line)
    }
}

fn ones(size: u8) -> u32 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        _ => u32::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// IOAPIC redirection entry of `pin`: vector `vector`, fixed, physical APIC 0, unmasked.
    fn route(pc: &mut PcDevices, pin: u32, vector: u8) {
        pc.ioapic.write(0x00, 0x10 + 2 * pin);
        pc.ioapic.write(0x10, u32::from(vector));
        pc.ioapic.write(0x00, 0x10 + 2 * pin + 1);
        pc.ioapic.write(0x10, 0);
    }

    fn inb(pc: &mut PcDevices, port: u16) -> (u8, Option<Delivery>) {
        match pc.port(port, 1, true, 0, 0) {
            Some((PcPort::Read(v), d)) => (v as u8, d),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn typed_bytes_reach_the_guest_through_the_fifo_and_irq4() {
        let mut pc = PcDevices::new(1);
        route(&mut pc, COM1_IRQ, 0x24);
        // The driver sets OUT2 (the line to the interrupt controller), enables the receive
        // interrupt (IER bit 0) and the FIFO.
        assert!(pc.port(COM1 + 4, 1, false, 0x0b, 0).is_some());
        assert!(pc.port(COM1 + 1, 1, false, 1, 0).is_some());
        assert!(pc.port(COM1 + 2, 1, false, 0x07, 0).is_some());
        assert_eq!(pc.queue_input(b"ls\r"), 3);
        let d = pc.take_input().expect("the line rises: IRQ 4");
        assert_eq!((d.vector, d.pin), (0x24, COM1_IRQ));
        assert_eq!(pc.take_input(), None, "no new edge while the line stays up");
        assert_eq!(inb(&mut pc, COM1).0, b'l');
        assert_eq!(inb(&mut pc, COM1).0, b's');
        assert_eq!(inb(&mut pc, COM1 + 5).0 & 1, 1, "data ready");
        assert_eq!(inb(&mut pc, COM1).0, b'\r');
        assert_eq!(inb(&mut pc, COM1 + 5).0 & 1, 0, "FIFO empty");
    }

    #[test]
    fn the_panic_notifier_offers_one_event_and_reports_it() {
        let mut pc = PcDevices::new(1);
        assert_eq!(inb(&mut pc, acpi::PVPANIC_PORT).0, acpi::PVPANIC_PANICKED);
        let out = |pc: &mut PcDevices, v| pc.port(acpi::PVPANIC_PORT, 1, false, v, 0).map(|r| r.0);
        assert_eq!(out(&mut pc, 1), Some(PcPort::Wrote(IoEvent::Panicked)));
        // Events it did not offer (2: a crash kernel loaded) are nothing.
        assert_eq!(out(&mut pc, 2), Some(PcPort::Wrote(IoEvent::None)));
    }

    #[test]
    fn the_clock_reads_the_time_it_is_given() {
        let mut pc = PcDevices::new(1);
        let t = 1_796_304_002; // 2026-12-03 13:20:02 UTC
        let mut reg = |i: u32| {
            pc.port(0x70, 1, false, 0x80 | i, 0).unwrap();
            match pc.port(0x71, 1, true, 0, t) {
                Some((PcPort::Read(v), None)) => v,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!([reg(4), reg(2), reg(0), reg(9)], [0x13, 0x20, 0x02, 0x26]);
        assert_eq!(reg(0x0a) & 0x80, 0, "no update in progress");
    }

    #[test]
    fn input_beyond_the_queue_is_dropped_and_counted() {
        let mut pc = PcDevices::new(1);
        let typed = [b'x'; 300];
        assert_eq!(pc.queue_input(&typed), 256);
        assert_eq!(pc.input_dropped, 44);
        // The FIFO takes what fits; reading frees room that the next access refills.
        pc.take_input();
        let mut got = 0;
        while inb(&mut pc, COM1 + 5).0 & 1 == 1 {
            assert_eq!(inb(&mut pc, COM1).0, b'x');
            got += 1;
        }
        assert_eq!(got, 256);
    }
}
