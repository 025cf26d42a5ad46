//! An IOAPIC (82093AA-style, version 0x11: no EOI register; Linux ends level interrupts
//! through the local APIC's EOI broadcast, which [`IoApic::eoi`] takes): 24 pins, each with a
//! redirection entry; edge pins deliver on a rising edge, level pins while asserted and their
//! remote IRR is clear.

// Registers are 8, 32 and 64 bits wide: the truncating casts pick fields out of them.
#![allow(clippy::cast_possible_truncation)]

use crate::lapic::DeliveryMode;

/// Pins.
pub const PINS: usize = 24;

const MASKED: u64 = 1 << 16;
const LEVEL: u64 = 1 << 15;
const REMOTE_IRR: u64 = 1 << 14;
/// Bits the guest may write (vector, mode, logical, polarity, trigger, mask, destination).
const WRITABLE: u64 = 0xff00_0000_0001_afff;

/// An interrupt for the local APICs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub vector: u8,
    pub mode: DeliveryMode,
    pub logical: bool,
    pub dest: u8,
    pub level: bool,
    pub pin: u32,
}

#[derive(Clone, Debug)]
pub struct IoApic {
    id: u8,
    select: u32,
    redir: [u64; PINS],
    lines: u32,
}

impl IoApic {
    /// All pins masked, as at reset.
    pub fn new(id: u8) -> IoApic {
        IoApic {
            id,
            select: 0,
            redir: [MASKED; PINS],
            lines: 0,
        }
    }

    pub fn read(&mut self, offset: u32) -> u32 {
        match offset {
            0x00 => self.select,
            0x10 => match self.select {
                0 => u32::from(self.id) << 24,
                1 => 0x0017_0011, // 24 entries, version 0x11
                2 => u32::from(self.id) << 24,
                r @ 0x10..=0x3f => {
                    let e = self.redir[((r - 0x10) / 2) as usize];
                    if r % 2 == 0 {
                        e as u32
                    } else {
                        (e >> 32) as u32
                    }
                }
                _ => 0,
            },
            _ => 0,
        }
    }

    pub fn write(&mut self, offset: u32, value: u32) -> Option<Delivery> {
        match offset {
            0x00 => self.select = value & 0xff,
            0x10 => match self.select {
                0 => self.id = ((value >> 24) & 0xf) as u8,
                r @ 0x10..=0x3f => {
                    let pin = ((r - 0x10) / 2) as usize;
                    let old = self.redir[pin];
                    let new = if r % 2 == 0 {
                        (old & !0xffff_ffff) | u64::from(value)
                    } else {
                        (old & 0xffff_ffff) | (u64::from(value) << 32)
                    };
                    self.redir[pin] = (new & WRITABLE) | (old & REMOTE_IRR);
                    if self.redir[pin] & LEVEL == 0 {
                        self.redir[pin] &= !REMOTE_IRR;
                    }
                    return self.try_level(pin);
                }
                _ => {}
            },
            _ => {}
        }
        None
    }

    fn delivery(&self, pin: usize) -> Delivery {
        let e = self.redir[pin];
        Delivery {
            vector: e as u8,
            mode: DeliveryMode::from_bits((e >> 8) as u32),
            logical: e & (1 << 11) != 0,
            dest: (e >> 56) as u8,
            level: e & LEVEL != 0,
            pin: pin as u32,
        }
    }

    /// A level pin asserted, unmasked and not in service delivers.
    fn try_level(&mut self, pin: usize) -> Option<Delivery> {
        let e = self.redir[pin];
        if e & LEVEL == 0 || e & MASKED != 0 || e & REMOTE_IRR != 0 || self.lines & (1 << pin) == 0
        {
            return None;
        }
        self.redir[pin] |= REMOTE_IRR;
        Some(self.delivery(pin))
    }

    /// The line of `pin` goes to `asserted`.
    pub fn set_line(&mut self, pin: u32, asserted: bool) -> Option<Delivery> {
        let p = pin as usize;
        if p >= PINS {
            return None;
        }
        let was = self.lines & (1 << p) != 0;
        if asserted {
            self.lines |= 1 << p;
        } else {
            self.lines &= !(1 << p);
        }
        let e = self.redir[p];
        if e & LEVEL != 0 {
            return self.try_level(p);
        }
        (asserted && !was && e & MASKED == 0).then(|| self.delivery(p))
    }

    /// A local APIC ended level interrupt `vector`: remote IRR clears; a line still asserted
    /// delivers again.
    pub fn eoi(&mut self, vector: u8) -> Option<Delivery> {
        let mut again = None;
        for p in 0..PINS {
            let e = self.redir[p];
            if e & LEVEL != 0 && e as u8 == vector && e & REMOTE_IRR != 0 {
                self.redir[p] &= !REMOTE_IRR;
                again = again.or(self.try_level(p));
            }
        }
        again
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(io: &mut IoApic, pin: u32, low: u32, high: u32) -> Option<Delivery> {
        io.write(0, 0x10 + 2 * pin + 1);
        io.write(0x10, high);
        io.write(0, 0x10 + 2 * pin);
        io.write(0x10, low)
    }

    #[test]
    fn registers() {
        let mut io = IoApic::new(2);
        io.write(0, 0);
        assert_eq!(io.read(0x10), 2 << 24);
        io.write(0, 1);
        assert_eq!(io.read(0x10), 0x0017_0011);
        io.write(0, 0x10);
        assert_eq!(io.read(0x10), MASKED as u32);
        io.write(0, 0x99);
        assert_eq!(io.read(0x10), 0);
        assert_eq!(io.read(0x20), 0);
    }

    #[test]
    fn edge_pins() {
        let mut io = IoApic::new(0);
        assert_eq!(io.set_line(4, true), None, "masked");
        io.set_line(4, false);
        program(&mut io, 4, 0x24, 1 << 24);
        let d = io.set_line(4, true).unwrap();
        assert_eq!(
            (d.vector, d.dest, d.level, d.logical),
            (0x24, 1, false, false)
        );
        assert_eq!(io.set_line(4, true), None, "no edge");
        io.set_line(4, false);
        assert!(io.set_line(4, true).is_some());
        assert_eq!(io.set_line(99, true), None);
    }

    #[test]
    fn level_pins_and_eoi() {
        let mut io = IoApic::new(0);
        program(&mut io, 16, 0x8000 | 0x10000 | 0x41, 0);
        assert_eq!(io.set_line(16, true), None, "masked");
        let d = program(&mut io, 16, 0x8000 | 0x41, 0).expect("unmasking delivers");
        assert!(d.level);
        io.write(0, 0x30);
        assert_ne!(io.read(0x10) & REMOTE_IRR as u32, 0);
        assert_eq!(io.set_line(16, true), None, "in service");
        assert!(io.eoi(0x41).is_some(), "still asserted: again");
        io.set_line(16, false);
        assert_eq!(io.eoi(0x41), None);
        assert_eq!(io.eoi(0x41), None);
        // The guest cannot set remote IRR itself.
        program(&mut io, 17, 0x8000 | REMOTE_IRR as u32 | 0x42, 0);
        assert!(io.set_line(17, true).is_some());
    }

    #[test]
    fn hostile_writes_never_panic() {
        let mut io = IoApic::new(1);
        let mut x: u64 = 0x1234_5678_9abc_def1;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            io.write((x as u32) & 0x1f, (x >> 32) as u32);
            io.read((x >> 8) as u32 & 0x1f);
            io.set_line((x >> 16) as u32 % 30, x & 1 != 0);
            io.eoi((x >> 24) as u8);
        }
    }
}
