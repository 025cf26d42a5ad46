//! The register seam ([`Regs`]), the indirect I/O window onto it ([`IoWindow`]), and the
//! offsets and bits of the registers the driver programs.
//!
//! Offsets are those of the memory BAR (BAR0), as the *PCI/PCI-X Family of Gigabit Ethernet
//! Controllers Software Developer's Manual* (8254x SDM) lists them in section 13.4; every
//! register is 32 bits wide and dword-aligned.

use crate::hw::PortIo;

/// The device's register space, as 32-bit accesses at byte offsets of BAR0.
///
/// dom0 implements it over the memory BAR (uncached volatile loads and stores at
/// `base + offset`, which this crate cannot do: it has no `unsafe`), or uses [`IoWindow`].
/// Offsets the driver passes are dword-aligned and below 128 KiB (the BAR's size). Reads may
/// have side effects (ICR clears on read), so both methods take `&mut self`. A write must
/// reach the device after every store to DMA memory the driver made before it (on x86, stores
/// to uncached memory are not reordered with earlier stores, so a volatile store suffices).
pub trait Regs {
    /// Reads the register at `offset`.
    fn read32(&mut self, offset: u32) -> u32;
    /// Writes `value` to the register at `offset`.
    fn write32(&mut self, offset: u32, value: u32);
}

impl<T: Regs + ?Sized> Regs for &mut T {
    fn read32(&mut self, offset: u32) -> u32 {
        (**self).read32(offset)
    }
    fn write32(&mut self, offset: u32, value: u32) {
        (**self).write32(offset, value);
    }
}

/// The registers reached through the I/O BAR: IOADDR at `base + 0` selects a register offset,
/// IODATA at `base + 4` reads or writes it (8254x SDM section 13.2.2, "I/O-Mapped Internal
/// Register, Internal Memory, and Flash"). Both are dword ports.
///
/// Slower than MMIO (two port accesses per register, each a VM exit under a hypervisor) but
/// needs no mapping. Bochs and QEMU do not implement this window (their I/O BAR reads 0 and
/// ignores writes), so there the driver fails cleanly ([`super::E1000Error::EepromTimeout`])
/// rather than work; use it on hardware, or MMIO everywhere.
#[derive(Debug)]
pub struct IoWindow<P> {
    io: P,
    base: u16,
}

impl<P: PortIo> IoWindow<P> {
    /// The window at port `base` (the I/O BAR's value), reached through `io`; `None` if
    /// `base` is 0 (unassigned) or the window's 8 bytes would pass port 0xFFFF.
    #[must_use]
    pub fn new(io: P, base: u16) -> Option<Self> {
        if base == 0 || base.checked_add(7).is_none() {
            return None;
        }
        Some(Self { io, base })
    }

    /// The IOADDR port (IODATA is 4 above).
    #[must_use]
    pub const fn base(&self) -> u16 {
        self.base
    }

    /// Gives the port access back.
    pub fn into_inner(self) -> P {
        self.io
    }

    fn data_port(&self) -> u16 {
        // `new` checked that the window's 8 bytes fit below 0x10000.
        self.base + 4
    }
}

impl<P: PortIo> Regs for IoWindow<P> {
    fn read32(&mut self, offset: u32) -> u32 {
        self.io.outl(self.base, offset);
        let data = self.data_port();
        self.io.inl(data)
    }

    fn write32(&mut self, offset: u32, value: u32) {
        self.io.outl(self.base, offset);
        let data = self.data_port();
        self.io.outl(data, value);
    }
}

/// Register offsets (8254x SDM table 13-2).
pub(crate) mod reg {
    /// Device Control.
    pub const CTRL: u32 = 0x0000;
    /// Device Status.
    pub const STATUS: u32 = 0x0008;
    /// EEPROM Read (not on the 82544).
    pub const EERD: u32 = 0x0014;
    /// Interrupt Cause Read (clears on read).
    pub const ICR: u32 = 0x00C0;
    /// Interrupt Mask Clear.
    pub const IMC: u32 = 0x00D8;
    /// Receive Control.
    pub const RCTL: u32 = 0x0100;
    /// Transmit Control.
    pub const TCTL: u32 = 0x0400;
    /// Transmit Inter-Packet Gap.
    pub const TIPG: u32 = 0x0410;
    /// Receive descriptor ring: base low, base high, length in bytes, head, tail.
    pub const RDBAL: u32 = 0x2800;
    pub const RDBAH: u32 = 0x2804;
    pub const RDLEN: u32 = 0x2808;
    pub const RDH: u32 = 0x2810;
    pub const RDT: u32 = 0x2818;
    /// Transmit descriptor ring: base low, base high, length in bytes, head, tail.
    pub const TDBAL: u32 = 0x3800;
    pub const TDBAH: u32 = 0x3804;
    pub const TDLEN: u32 = 0x3808;
    pub const TDH: u32 = 0x3810;
    pub const TDT: u32 = 0x3818;
    /// Multicast Table Array: 128 dwords.
    pub const MTA: u32 = 0x5200;
    pub const MTA_DWORDS: u32 = 128;
    /// Receive Address 0, low 4 and high 2 bytes of the MAC (with the valid bit).
    pub const RAL0: u32 = 0x5400;
    pub const RAH0: u32 = 0x5404;
}

/// CTRL bits (8254x SDM section 13.4.1).
pub(crate) mod ctrl {
    /// Link reset.
    pub const LRST: u32 = 1 << 3;
    /// Auto-speed detection enable.
    pub const ASDE: u32 = 1 << 5;
    /// Set link up.
    pub const SLU: u32 = 1 << 6;
    /// Invert loss-of-signal.
    pub const ILOS: u32 = 1 << 7;
    /// Global device reset (self-clearing).
    pub const RST: u32 = 1 << 26;
    /// VLAN mode enable (tag insertion and stripping).
    pub const VME: u32 = 1 << 30;
    /// PHY reset.
    pub const PHY_RST: u32 = 1 << 31;
}

/// STATUS bits (8254x SDM section 13.4.2).
pub(crate) mod status {
    /// Link up.
    pub const LU: u32 = 1 << 1;
}

/// EERD layout of the 82540/82545/82546 (8254x SDM section 13.4.4; the 82541 and 82547
/// place DONE at bit 1 and the address at bit 2, and are not driven here).
pub(crate) mod eerd {
    /// Start a read.
    pub const START: u32 = 1 << 0;
    /// The read is done and DATA is valid.
    pub const DONE: u32 = 1 << 4;
    /// Shift of the word address (8 bits).
    pub const ADDR_SHIFT: u32 = 8;
    /// Shift of the data word (16 bits).
    pub const DATA_SHIFT: u32 = 16;
}

/// RCTL bits (8254x SDM section 13.4.22).
pub(crate) mod rctl {
    /// Receiver enable.
    pub const EN: u32 = 1 << 1;
    /// Unicast promiscuous.
    pub const UPE: u32 = 1 << 3;
    /// Multicast promiscuous.
    pub const MPE: u32 = 1 << 4;
    /// Accept broadcast.
    pub const BAM: u32 = 1 << 15;
    /// Buffer size field (bits 17:16); 00 with BSEX clear is 2048 bytes.
    pub const BSIZE_2048: u32 = 0b00 << 16;
    /// Strip the Ethernet CRC from received frames.
    pub const SECRC: u32 = 1 << 26;
}

/// TCTL bits and fields (8254x SDM section 13.4.33).
pub(crate) mod tctl {
    /// Transmitter enable.
    pub const EN: u32 = 1 << 1;
    /// Pad short packets to 64 bytes.
    pub const PSP: u32 = 1 << 3;
    /// Collision threshold, bits 11:4 (the manual recommends 0x10).
    pub const CT_SHIFT: u32 = 4;
    pub const CT: u32 = 0x10;
    /// Collision distance, bits 21:12 (0x40 for full duplex).
    pub const COLD_SHIFT: u32 = 12;
    pub const COLD: u32 = 0x40;
}

/// TIPG fields (8254x SDM section 13.4.34): IPGT bits 9:0, IPGR1 bits 19:10, IPGR2 bits
/// 29:20, with the values the manual gives for the 82540/82545/82546 on copper.
pub(crate) mod tipg {
    pub const IPGT: u32 = 10;
    pub const IPGR1: u32 = 8;
    pub const IPGR2: u32 = 6;
    pub const VALUE: u32 = IPGT | IPGR1 << 10 | IPGR2 << 20;
}

/// RAH: address valid.
pub(crate) const RAH_AV: u32 = 1 << 31;
