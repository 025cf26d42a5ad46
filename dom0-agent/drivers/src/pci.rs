//! PCI configuration space: reaching it, enumerating every function, sizing BARs, enabling
//! decode and bus mastering.
//!
//! [`PciConfig`] is the seam (32-bit reads and writes by bus, device, function and offset);
//! [`Mechanism1`] implements it over any [`PortIo`] with configuration mechanism #1 (address
//! at 0xCF8, data at 0xCFC), which every PC chipset and both emulators provide.
//!
//! [`enumerate`] scans all 256 buses and 32 devices on each, and functions 1-7 of a device
//! whose function 0 has the multi-function bit: simple, and correct whatever the bridges'
//! bus numbers are. Values read back are the device's; a vendor of `0xFFFF` (nothing
//! answers) or `0` ends the scan of that slot.

use alloc::vec::Vec;

use crate::hw::PortIo;

/// The address of one PCI function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddr {
    bus: u8,
    dev: u8,
    func: u8,
}

impl PciAddr {
    /// The function `bus:dev.func`; `None` unless `dev < 32` and `func < 8`.
    #[must_use]
    pub const fn new(bus: u8, dev: u8, func: u8) -> Option<Self> {
        if dev < 32 && func < 8 {
            Some(Self { bus, dev, func })
        } else {
            None
        }
    }

    /// Bus number.
    #[must_use]
    pub const fn bus(self) -> u8 {
        self.bus
    }

    /// Device number (0..32).
    #[must_use]
    pub const fn dev(self) -> u8 {
        self.dev
    }

    /// Function number (0..8).
    #[must_use]
    pub const fn func(self) -> u8 {
        self.func
    }
}

impl core::fmt::Display for PciAddr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.dev, self.func)
    }
}

/// Configuration-space access by function and offset.
pub trait PciConfig {
    /// Reads the dword at `offset` (its two low bits are ignored) of `at`'s configuration
    /// space; a function that does not exist reads as all ones.
    fn read32(&mut self, at: PciAddr, offset: u8) -> u32;
    /// Writes the dword at `offset` (its two low bits are ignored).
    fn write32(&mut self, at: PciAddr, offset: u8, value: u32);

    /// Reads the 16-bit register at `offset` (even).
    fn read16(&mut self, at: PciAddr, offset: u8) -> u16 {
        let shift = u32::from(offset & 2) * 8;
        let [lo, hi, ..] = (self.read32(at, offset) >> shift).to_le_bytes();
        u16::from_le_bytes([lo, hi])
    }

    /// Reads the 8-bit register at `offset`.
    fn read8(&mut self, at: PciAddr, offset: u8) -> u8 {
        let shift = u32::from(offset & 3) * 8;
        (self.read32(at, offset) >> shift).to_le_bytes()[0]
    }
}

impl<T: PciConfig + ?Sized> PciConfig for &mut T {
    fn read32(&mut self, at: PciAddr, offset: u8) -> u32 {
        (**self).read32(at, offset)
    }
    fn write32(&mut self, at: PciAddr, offset: u8, value: u32) {
        (**self).write32(at, offset, value);
    }
}

/// Configuration mechanism #1 over port I/O.
#[derive(Debug)]
pub struct Mechanism1<P> {
    io: P,
}

/// The address register of mechanism #1.
pub const CONFIG_ADDRESS: u16 = 0xCF8;
/// The data register of mechanism #1.
pub const CONFIG_DATA: u16 = 0xCFC;

impl<P: PortIo> Mechanism1<P> {
    /// Configuration access through `io`'s ports 0xCF8-0xCFF.
    pub const fn new(io: P) -> Self {
        Self { io }
    }

    /// Gives the port access back.
    pub fn into_inner(self) -> P {
        self.io
    }

    /// The value written to [`CONFIG_ADDRESS`] for `at` and `offset`: enable bit, bus,
    /// device, function, dword-aligned register (PCI Local Bus 3.0, section 3.2.2.3.2).
    #[must_use]
    pub fn address(at: PciAddr, offset: u8) -> u32 {
        0x8000_0000
            | u32::from(at.bus) << 16
            | u32::from(at.dev) << 11
            | u32::from(at.func) << 8
            | u32::from(offset & 0xFC)
    }
}

impl<P: PortIo> PciConfig for Mechanism1<P> {
    fn read32(&mut self, at: PciAddr, offset: u8) -> u32 {
        self.io.outl(CONFIG_ADDRESS, Self::address(at, offset));
        self.io.inl(CONFIG_DATA)
    }

    fn write32(&mut self, at: PciAddr, offset: u8, value: u32) {
        self.io.outl(CONFIG_ADDRESS, Self::address(at, offset));
        self.io.outl(CONFIG_DATA, value);
    }
}

/// Offsets and bits of the configuration header (PCI Local Bus 3.0, section 6.1).
pub mod reg {
    /// Vendor ID (16 bits) and device ID (16 bits).
    pub const ID: u8 = 0x00;
    /// Command (16 bits) and status (16 bits, bits write-1-to-clear).
    pub const COMMAND: u8 = 0x04;
    /// Revision, prog-if, subclass, class.
    pub const CLASS: u8 = 0x08;
    /// Cache line, latency timer, header type, BIST.
    pub const HEADER: u8 = 0x0C;
    /// The first BAR.
    pub const BAR0: u8 = 0x10;
    /// Interrupt line and pin.
    pub const INTERRUPT: u8 = 0x3C;

    /// Command: respond to I/O space accesses.
    pub const CMD_IO: u16 = 1 << 0;
    /// Command: respond to memory space accesses.
    pub const CMD_MEMORY: u16 = 1 << 1;
    /// Command: the function may master the bus (DMA).
    pub const CMD_BUS_MASTER: u16 = 1 << 2;

    /// Header type: the function is one of several of its device.
    pub const HEADER_MULTIFUNCTION: u8 = 0x80;
}

/// One base address register, decoded and sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Bar {
    /// Not implemented (reads back 0), the upper half of a 64-bit BAR, or not a BAR.
    #[default]
    None,
    /// An I/O-space window.
    Io {
        /// First port (the BAR's value; 0 when firmware assigned none).
        port: u32,
        /// Size in bytes.
        size: u32,
    },
    /// A memory-space window.
    Memory {
        /// Physical address (the BAR's value; 0 when firmware assigned none).
        addr: u64,
        /// Size in bytes.
        size: u64,
        /// Whether reads have no side effects.
        prefetchable: bool,
        /// A 64-bit BAR (the next slot holds its upper half and reads [`Bar::None`]).
        wide: bool,
    },
}

/// A PCI function found by [`enumerate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciDevice {
    /// Where it is.
    pub addr: PciAddr,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Base class (0x01: mass storage).
    pub class: u8,
    /// Subclass (0x01 under 0x01: IDE).
    pub subclass: u8,
    /// Programming interface.
    pub prog_if: u8,
    /// Revision.
    pub revision: u8,
    /// Header layout (0: device, 1: PCI-to-PCI bridge, 2: CardBus bridge), without the
    /// multi-function bit.
    pub header_type: u8,
    /// Whether the device has several functions (read from this function's header).
    pub multifunction: bool,
    /// The BARs: six for a device, two for a bridge, none otherwise.
    pub bars: [Bar; 6],
    /// Interrupt line (as firmware routed it) and pin (0: none, 1-4: INTA#-INTD#).
    pub interrupt: (u8, u8),
}

/// Reads the header of `at`, or `None` if no function answers there. BARs are sized (decode
/// is briefly turned off for that, see [`size_bars`]).
pub fn read_device<C: PciConfig + ?Sized>(cfg: &mut C, at: PciAddr) -> Option<PciDevice> {
    let id = cfg.read32(at, reg::ID);
    let [v0, v1, d0, d1] = id.to_le_bytes();
    let vendor = u16::from_le_bytes([v0, v1]);
    if vendor == 0xFFFF || vendor == 0 {
        return None;
    }
    let [revision, prog_if, subclass, class] = cfg.read32(at, reg::CLASS).to_le_bytes();
    let header = cfg.read8(at, reg::HEADER + 2);
    let header_type = header & !reg::HEADER_MULTIFUNCTION;
    let count = match header_type {
        0 => 6,
        1 => 2,
        _ => 0,
    };
    let bars = size_bars(cfg, at, count);
    let [line, pin, ..] = cfg.read32(at, reg::INTERRUPT).to_le_bytes();
    Some(PciDevice {
        addr: at,
        vendor,
        device: u16::from_le_bytes([d0, d1]),
        class,
        subclass,
        prog_if,
        revision,
        header_type,
        multifunction: header & reg::HEADER_MULTIFUNCTION != 0,
        bars,
        interrupt: (line, pin),
    })
}

/// Every function on every bus, in bus, device, function order.
pub fn enumerate<C: PciConfig + ?Sized>(cfg: &mut C) -> Vec<PciDevice> {
    let mut found = Vec::new();
    for bus in 0..=255u8 {
        for dev in 0..32u8 {
            let Some(f0) = PciAddr::new(bus, dev, 0) else {
                continue;
            };
            let Some(first) = read_device(cfg, f0) else {
                continue;
            };
            let multi = first.multifunction;
            found.push(first);
            if multi {
                for func in 1..8u8 {
                    if let Some(d) = PciAddr::new(bus, dev, func).and_then(|a| read_device(cfg, a))
                    {
                        found.push(d);
                    }
                }
            }
        }
    }
    found
}

/// Sizes the first `count` (at most 6) BARs of `at`: writes all ones, reads back, restores.
///
/// I/O and memory decode are off while a BAR holds all ones (so the function never claims
/// a bogus window), and the command register is restored afterwards. A 64-bit memory BAR is
/// sized over both halves and its upper slot reads [`Bar::None`].
pub fn size_bars<C: PciConfig + ?Sized>(cfg: &mut C, at: PciAddr, count: usize) -> [Bar; 6] {
    let mut bars = [Bar::None; 6];
    let count = count.min(6);
    if count == 0 {
        return bars;
    }
    let command = cfg.read16(at, reg::COMMAND);
    // The status half is written as 0: its bits are write-1-to-clear.
    cfg.write32(
        at,
        reg::COMMAND,
        u32::from(command & !(reg::CMD_IO | reg::CMD_MEMORY)),
    );
    let mut i = 0;
    while i < count {
        let off = bar_offset(i);
        let orig = cfg.read32(at, off);
        if orig & 1 == 1 {
            let back = probe(cfg, at, off, orig);
            bars[i] = decode_io(orig, back);
            i += 1;
        } else if (orig >> 1) & 3 == 2 {
            if i + 1 >= count {
                // A 64-bit BAR in the last slot is malformed: leave it alone.
                i += 1;
                continue;
            }
            let hi_off = bar_offset(i + 1);
            let orig_hi = cfg.read32(at, hi_off);
            cfg.write32(at, off, u32::MAX);
            cfg.write32(at, hi_off, u32::MAX);
            let back = u64::from(cfg.read32(at, off)) | u64::from(cfg.read32(at, hi_off)) << 32;
            cfg.write32(at, off, orig);
            cfg.write32(at, hi_off, orig_hi);
            let mask = back & !0xF;
            if mask != 0 {
                bars[i] = Bar::Memory {
                    addr: (u64::from(orig_hi) << 32) | u64::from(orig & !0xF),
                    size: (!mask).wrapping_add(1),
                    prefetchable: orig & 8 != 0,
                    wide: true,
                };
            }
            i += 2;
        } else {
            let back = probe(cfg, at, off, orig);
            let mask = back & !0xF;
            if mask != 0 {
                bars[i] = Bar::Memory {
                    addr: u64::from(orig & !0xF),
                    size: u64::from((!mask).wrapping_add(1)),
                    prefetchable: orig & 8 != 0,
                    wide: false,
                };
            }
            i += 1;
        }
    }
    cfg.write32(at, reg::COMMAND, u32::from(command));
    bars
}

fn bar_offset(i: usize) -> u8 {
    reg::BAR0 + 4 * u8::try_from(i).unwrap_or(0)
}

/// Writes all ones to the BAR at `off`, reads it back, and restores `orig`.
fn probe<C: PciConfig + ?Sized>(cfg: &mut C, at: PciAddr, off: u8, orig: u32) -> u32 {
    cfg.write32(at, off, u32::MAX);
    let back = cfg.read32(at, off);
    cfg.write32(at, off, orig);
    back
}

/// An I/O BAR from its value and its all-ones read-back. Many functions implement only the
/// low 16 address bits (x86 ports are 16-bit): upper bits that read back 0 are not size bits.
fn decode_io(orig: u32, back: u32) -> Bar {
    let mut mask = back & !3;
    if mask == 0 {
        return Bar::None;
    }
    if mask & 0xFFFF_0000 == 0 {
        mask |= 0xFFFF_0000;
    }
    Bar::Io {
        port: orig & !3,
        size: (!mask).wrapping_add(1),
    }
}

/// Sets `bits` ([`reg::CMD_IO`], [`reg::CMD_MEMORY`], [`reg::CMD_BUS_MASTER`]) in the command
/// register of `at`, leaving the others and the status register as they are; returns the
/// command register as read back, so the caller can see whether the bits stuck.
pub fn enable<C: PciConfig + ?Sized>(cfg: &mut C, at: PciAddr, bits: u16) -> u16 {
    let command = cfg.read16(at, reg::COMMAND) | bits;
    cfg.write32(at, reg::COMMAND, u32::from(command));
    cfg.read16(at, reg::COMMAND)
}

/// The first device of `class` and `subclass` in `devices`.
#[must_use]
pub fn find(devices: &[PciDevice], class: u8, subclass: u8) -> Option<&PciDevice> {
    devices
        .iter()
        .find(|d| d.class == class && d.subclass == subclass)
}

/// Base class of mass-storage controllers.
pub const CLASS_STORAGE: u8 = 0x01;
/// Subclass of IDE controllers (under [`CLASS_STORAGE`]).
pub const SUBCLASS_IDE: u8 = 0x01;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mechanism1_address_layout() {
        let at = PciAddr::new(0x12, 0x1F, 7).unwrap();
        assert_eq!(Mechanism1::<NoPorts>::address(at, 0x3F), 0x8012_FF3C);
        assert_eq!(PciAddr::new(0, 32, 0), None);
        assert_eq!(PciAddr::new(0, 0, 8), None);
        assert_eq!(at.to_string(), "12:1f.7");
    }

    #[test]
    fn io_bar_with_16_bit_decoder() {
        assert_eq!(
            decode_io(0xC001, 0x0000_FFF1),
            Bar::Io {
                port: 0xC000,
                size: 16
            }
        );
        assert_eq!(
            decode_io(0xC001, 0xFFFF_FFF1),
            Bar::Io {
                port: 0xC000,
                size: 16
            }
        );
        assert_eq!(decode_io(1, 1), Bar::None);
    }

    struct NoPorts;
    impl PortIo for NoPorts {
        fn inb(&mut self, _: u16) -> u8 {
            0xFF
        }
        fn outb(&mut self, _: u16, _: u8) {}
        fn inw(&mut self, _: u16) -> u16 {
            0xFFFF
        }
        fn outw(&mut self, _: u16, _: u16) {}
        fn inl(&mut self, _: u16) -> u32 {
            u32::MAX
        }
        fn outl(&mut self, _: u16, _: u32) {}
    }

    #[test]
    fn empty_bus_enumerates_nothing() {
        let mut cfg = Mechanism1::new(NoPorts);
        assert!(enumerate(&mut cfg).is_empty());
    }
}
