//! A software 8254x (82540EM) reached through `Regs` (as MMIO would reach it) or through its
//! I/O window (`PortIo` at `IO_BASE`), doing its DMA in the fake physical memory of `mem`.
//!
//! What it models: global reset (register defaults, RAL0/RAH0 loaded from the EEPROM or left
//! zero as Bochs does, a multicast table left undefined), EERD reads, interrupt mask and cause
//! registers, STATUS.LU, the receive ring (frames written into the descriptors from RDH up to
//! RDT, split over buffers of RCTL.BSIZE, CRC kept unless SECRC) and the transmit ring
//! (descriptors from TDH up to TDT fetched when TDT moves, frames captured, DD written back
//! for RS). Register offsets and bits are written out again here from the manual, not taken
//! from the driver.
//!
//! It is strict: what a driver must not do panics, failing the test. Unaligned or unknown
//! registers, writes to read-only ones, any access but CTRL while a reset is in progress, ring
//! registers written while that ring is enabled, an unaligned ring, a ring length that is not
//! a multiple of 128, a tail beyond the ring, a transmit descriptor that is not a legacy
//! one-frame descriptor with IFCS and RS, and every DMA outside the driver's own memory
//! (checked by `PhysMem::dma_offset`).
//!
//! And it can be hostile: a reset that never ends, an EEPROM that never answers, garbage in
//! RAL0/RAH0, descriptors written back with any length, status and errors (`RxWrite`), its
//! buffer address overwritten, a device that refills every slot it is given (`flood`), an I/O
//! window that is a stub (as in Bochs and QEMU).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use dom0_drivers::e1000::Regs;
use dom0_drivers::hw::PortIo;

use super::mem::PhysMem;

pub mod rig;
mod rings;

/// Where the model's I/O BAR is.
pub const IO_BASE: u16 = 0xC040;

pub const CTRL: u32 = 0x0000;
pub const STATUS: u32 = 0x0008;
pub const EERD: u32 = 0x0014;
pub const ICR: u32 = 0x00C0;
pub const IMS: u32 = 0x00D0;
pub const IMC: u32 = 0x00D8;
pub const RCTL: u32 = 0x0100;
pub const TCTL: u32 = 0x0400;
pub const TIPG: u32 = 0x0410;
pub const RDBAL: u32 = 0x2800;
pub const RDBAH: u32 = 0x2804;
pub const RDLEN: u32 = 0x2808;
pub const RDH: u32 = 0x2810;
pub const RDT: u32 = 0x2818;
pub const TDBAL: u32 = 0x3800;
pub const TDBAH: u32 = 0x3804;
pub const TDLEN: u32 = 0x3808;
pub const TDH: u32 = 0x3810;
pub const TDT: u32 = 0x3818;
pub const MTA: u32 = 0x5200;
pub const RAL0: u32 = 0x5400;
pub const RAH0: u32 = 0x5404;

pub const CTRL_FD: u32 = 1 << 0;
pub const CTRL_LRST: u32 = 1 << 3;
pub const CTRL_ASDE: u32 = 1 << 5;
pub const CTRL_SLU: u32 = 1 << 6;
pub const CTRL_ILOS: u32 = 1 << 7;
pub const CTRL_RST: u32 = 1 << 26;
pub const CTRL_VME: u32 = 1 << 30;
pub const CTRL_PHY_RST: u32 = 1 << 31;
pub const STATUS_LU: u32 = 1 << 1;
pub const RCTL_EN: u32 = 1 << 1;
pub const RCTL_UPE: u32 = 1 << 3;
pub const RCTL_MPE: u32 = 1 << 4;
pub const RCTL_BAM: u32 = 1 << 15;
pub const RCTL_BSEX: u32 = 1 << 25;
pub const RCTL_SECRC: u32 = 1 << 26;
pub const TCTL_EN: u32 = 1 << 1;
pub const TCTL_PSP: u32 = 1 << 3;
pub const RAH_AV: u32 = 1 << 31;
pub const EERD_START: u32 = 1 << 0;
pub const EERD_DONE: u32 = 1 << 4;
pub const ICR_TXDW: u32 = 1 << 0;
pub const ICR_LSC: u32 = 1 << 2;
pub const ICR_RXT0: u32 = 1 << 7;

pub const RXD_DD: u8 = 1 << 0;
pub const RXD_EOP: u8 = 1 << 1;
pub const RXE_CE: u8 = 1 << 0;
pub const RXE_RXE: u8 = 1 << 7;
pub const TXD_EOP: u8 = 1 << 0;
pub const TXD_IFCS: u8 = 1 << 1;
pub const TXD_RS: u8 = 1 << 3;
pub const TXD_DEXT: u8 = 1 << 5;
pub const TXD_DD: u8 = 1 << 0;

/// The values reset leaves in CTRL: full duplex, link reset and inverted loss-of-signal set
/// (as an EEPROM may configure them), link not forced up.
const CTRL_DEFAULT: u32 = CTRL_FD | CTRL_LRST | CTRL_ILOS;
/// What the multicast table holds after reset ("undefined").
const MTA_GARBAGE: u32 = 0xA5A5_5A5A;

/// One descriptor as a (possibly hostile) device writes it back: `data` goes into the
/// descriptor's buffer (at most one buffer's worth), the other fields into the descriptor;
/// DD is always added. `addr`, if set, replaces the buffer address in the descriptor.
#[derive(Debug, Clone)]
pub struct RxWrite {
    pub data: Vec<u8>,
    pub length: u16,
    pub status: u8,
    pub errors: u8,
    pub addr: Option<u64>,
}

impl RxWrite {
    /// A good one-descriptor frame.
    pub fn frame(data: &[u8]) -> Self {
        Self {
            data: data.to_vec(),
            length: u16::try_from(data.len()).unwrap(),
            status: RXD_EOP,
            errors: 0,
            addr: None,
        }
    }
}

pub struct State {
    pub mem: Arc<Mutex<PhysMem>>,
    pub eeprom: [u16; 64],
    /// Reset loads RAL0/RAH0 from EEPROM words 0-2 (hardware); if not, they read 0 (Bochs).
    pub ral_from_eeprom: bool,
    /// What reset leaves in RAL0/RAH0 instead (garbage).
    pub ral_override: Option<(u32, u32)>,
    /// CTRL reads that still show RST after a reset.
    pub reset_polls: u32,
    /// CTRL.RST never clears.
    pub reset_stuck: bool,
    /// EERD reads before DONE.
    pub eerd_polls: u32,
    /// EERD never shows DONE.
    pub eerd_never_done: bool,
    /// After a new read starts, EERD shows the previous read's result (DONE, its address
    /// and data) for this many reads.
    pub eerd_stale: u32,
    /// The PHY sees a link partner.
    pub link: bool,
    /// Transmit descriptors are fetched only by `run_tx`, not when TDT moves.
    pub tx_paused: bool,
    /// On every RDT write, this is written back into every slot the device owns.
    pub flood: Option<RxWrite>,
    /// The I/O window reads 0 and ignores writes (Bochs, QEMU).
    pub io_stub: bool,

    // Instrumentation.
    /// Frames transmitted, in order.
    pub sent: Vec<Vec<u8>>,
    /// Every register write, in order (through either window).
    pub writes: Vec<(u32, u32)>,
    /// Global resets.
    pub resets: u32,
    /// EEPROM words read through EERD.
    pub eeprom_reads: u32,
    /// Frames that found no free descriptor.
    pub missed: u32,
    /// Accesses through the I/O window.
    pub io_accesses: u64,

    regs: HashMap<u32, u32>,
    reset_left: u32,
    in_reset: bool,
    eerd_left: u32,
    eerd_last: u32,
    eerd_stale_left: u32,
    ioaddr: u32,
    tx_partial: Vec<u8>,
}

#[derive(Clone)]
pub struct E1000Model(pub Arc<Mutex<State>>);

impl E1000Model {
    /// A powered-on device whose EEPROM holds `mac`.
    pub fn new(mem: Arc<Mutex<PhysMem>>, mac: [u8; 6]) -> Self {
        let mut eeprom = [0xFFFFu16; 64];
        for i in 0..3 {
            eeprom[i] = u16::from_le_bytes([mac[2 * i], mac[2 * i + 1]]);
        }
        let mut state = State {
            mem,
            eeprom,
            ral_from_eeprom: false,
            ral_override: None,
            reset_polls: 3,
            reset_stuck: false,
            eerd_polls: 2,
            eerd_never_done: false,
            eerd_stale: 0,
            link: true,
            tx_paused: false,
            flood: None,
            io_stub: false,
            sent: Vec::new(),
            writes: Vec::new(),
            resets: 0,
            eeprom_reads: 0,
            missed: 0,
            io_accesses: 0,
            regs: HashMap::new(),
            reset_left: 0,
            in_reset: false,
            eerd_left: 0,
            eerd_last: 0,
            eerd_stale_left: 0,
            ioaddr: 0,
            tx_partial: Vec::new(),
        };
        state.power_on();
        Self(Arc::new(Mutex::new(state)))
    }

    /// The state, even after a failed assertion poisoned it (so that a test's own checks,
    /// and the driver's `Drop`, still run while the failure unwinds).
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A frame arrives from the wire; `false` if there was no room for it (then it is lost).
    pub fn receive(&self, frame: &[u8]) -> bool {
        self.lock().receive(frame)
    }

    /// The device writes back one descriptor as `w` says; `false` if it owns none.
    pub fn write_back(&self, w: RxWrite) -> bool {
        self.lock().write_back(&w)
    }

    /// Fetches and sends what the transmit ring holds (after `tx_paused`).
    pub fn run_tx(&self) {
        self.lock().process_tx();
    }

    /// The value of a register, without the side effects of a read.
    pub fn reg(&self, offset: u32) -> u32 {
        self.lock().get(offset)
    }

    /// The receive descriptor in slot `i`: (buffer address, length, status).
    pub fn rx_desc(&self, i: u32) -> (u64, u16, u8) {
        let st = self.lock();
        let d = st.read_desc(st.ring_base(RDBAL) + 16 * u64::from(i));
        (
            u64::from_le_bytes(d[0..8].try_into().unwrap()),
            u16::from_le_bytes([d[8], d[9]]),
            d[12],
        )
    }
}

impl State {
    fn get(&self, offset: u32) -> u32 {
        self.regs.get(&offset).copied().unwrap_or(0)
    }

    fn set(&mut self, offset: u32, value: u32) {
        self.regs.insert(offset, value);
    }

    fn power_on(&mut self) {
        self.regs.clear();
        self.set(CTRL, CTRL_DEFAULT);
        for i in 0..128 {
            self.set(MTA + 4 * i, MTA_GARBAGE);
        }
        let (ral, rah) = if let Some(garbage) = self.ral_override {
            garbage
        } else if self.ral_from_eeprom {
            let [a, b] = self.eeprom[0].to_le_bytes();
            let [c, d] = self.eeprom[1].to_le_bytes();
            let [e, f] = self.eeprom[2].to_le_bytes();
            (
                u32::from_le_bytes([a, b, c, d]),
                u32::from_le_bytes([e, f, 0, 0]) | RAH_AV,
            )
        } else {
            (0, 0)
        };
        self.set(RAL0, ral);
        self.set(RAH0, rah);
        // A link change from before the reset, for the driver to clear.
        self.set(ICR, ICR_LSC);
        self.tx_partial.clear();
    }

    fn check_offset(&self, offset: u32, what: &str) {
        assert!(
            offset.is_multiple_of(4) && offset < 0x2_0000,
            "{what} of bad offset {offset:#x}"
        );
        assert!(
            !self.in_reset || offset == CTRL,
            "{what} of {offset:#x} while the device resets"
        );
    }

    fn known(offset: u32) -> bool {
        matches!(
            offset,
            CTRL | STATUS
                | EERD
                | ICR
                | IMS
                | IMC
                | RCTL
                | TCTL
                | TIPG
                | RDBAL
                | RDBAH
                | RDLEN
                | RDH
                | RDT
                | TDBAL
                | TDBAH
                | TDLEN
                | TDH
                | TDT
        ) || (MTA..MTA + 512).contains(&offset)
            || (RAL0..RAL0 + 128).contains(&offset)
    }

    pub fn read(&mut self, offset: u32) -> u32 {
        self.check_offset(offset, "read");
        assert!(
            Self::known(offset),
            "read of unmodelled register {offset:#x}"
        );
        match offset {
            CTRL => {
                if self.reset_stuck && self.in_reset {
                    return self.get(CTRL) | CTRL_RST;
                }
                if self.in_reset {
                    if self.reset_left == 0 {
                        self.in_reset = false;
                    } else {
                        self.reset_left -= 1;
                        return self.get(CTRL) | CTRL_RST;
                    }
                }
                self.get(CTRL)
            }
            STATUS => {
                let ctrl = self.get(CTRL);
                let up = self.link && ctrl & CTRL_SLU != 0 && ctrl & CTRL_LRST == 0;
                // Full duplex, 1000 Mb/s, and LU when the link is up.
                0x81 | if up { STATUS_LU } else { 0 }
            }
            EERD => self.read_eerd(),
            ICR => {
                let v = self.get(ICR);
                self.set(ICR, 0);
                v
            }
            IMC => panic!("read of write-only IMC"),
            _ => self.get(offset),
        }
    }

    fn read_eerd(&mut self) -> u32 {
        let v = self.get(EERD);
        if self.eerd_stale_left > 0 {
            self.eerd_stale_left -= 1;
            return self.eerd_last;
        }
        if v & EERD_START == 0 || self.eerd_never_done {
            return v & !EERD_DONE;
        }
        if self.eerd_left > 0 {
            self.eerd_left -= 1;
            return v & !EERD_START;
        }
        let word = usize::try_from((v >> 8) & 0xFF).unwrap();
        let data = self.eeprom.get(word).copied().unwrap_or(0);
        self.eerd_last = (v & 0xFF00) | EERD_DONE | u32::from(data) << 16;
        self.eerd_last
    }

    pub fn write(&mut self, offset: u32, value: u32) {
        self.check_offset(offset, "write");
        assert!(
            Self::known(offset),
            "write of unmodelled register {offset:#x}"
        );
        self.writes.push((offset, value));
        let rx_on = self.get(RCTL) & RCTL_EN != 0;
        let tx_on = self.get(TCTL) & TCTL_EN != 0;
        match offset {
            CTRL => {
                self.set(CTRL, value & !CTRL_RST);
                if value & CTRL_RST != 0 {
                    self.resets += 1;
                    self.power_on();
                    self.in_reset = true;
                    self.reset_left = self.reset_polls;
                }
            }
            STATUS | ICR => panic!("write of read-only {offset:#x}"),
            EERD => {
                self.set(EERD, value & 0xFF01);
                if value & EERD_START != 0 {
                    self.eeprom_reads += 1;
                    self.eerd_left = self.eerd_polls;
                    if self.eerd_last & EERD_DONE != 0 {
                        self.eerd_stale_left = self.eerd_stale;
                    }
                }
            }
            IMS => {
                let v = self.get(IMS) | value;
                self.set(IMS, v);
            }
            IMC => {
                let v = self.get(IMS) & !value;
                self.set(IMS, v);
            }
            RDBAL | RDBAH | RDLEN | RDH => {
                assert!(
                    !rx_on,
                    "receive ring register {offset:#x} written while enabled"
                );
                self.check_ring_reg(offset, value);
                self.set(offset, value);
            }
            TDBAL | TDBAH | TDLEN | TDH => {
                assert!(
                    !tx_on,
                    "transmit ring register {offset:#x} written while enabled"
                );
                self.check_ring_reg(offset, value);
                self.set(offset, value);
            }
            RDT => {
                assert!(
                    value < self.slots(RDLEN),
                    "RDT {value} beyond a ring of {} descriptors",
                    self.slots(RDLEN)
                );
                self.set(RDT, value);
                if let Some(w) = self.flood.clone() {
                    while self.write_back(&w) {}
                }
            }
            TDT => {
                assert!(
                    value < self.slots(TDLEN),
                    "TDT {value} beyond a ring of {} descriptors",
                    self.slots(TDLEN)
                );
                self.set(TDT, value);
                if !self.tx_paused {
                    self.process_tx();
                }
            }
            RCTL => {
                if value & RCTL_EN != 0 {
                    assert!(self.slots(RDLEN) > 0, "receiver enabled without a ring");
                }
                self.set(RCTL, value);
            }
            TCTL => {
                if value & TCTL_EN != 0 {
                    assert!(self.slots(TDLEN) > 0, "transmitter enabled without a ring");
                }
                self.set(TCTL, value);
            }
            _ => self.set(offset, value),
        }
    }

    fn check_ring_reg(&self, offset: u32, value: u32) {
        match offset {
            RDBAL | TDBAL => assert!(value.is_multiple_of(16), "ring base {value:#x} unaligned"),
            RDLEN | TDLEN => assert!(
                value > 0 && value.is_multiple_of(128) && value < 0x10_0000,
                "ring length {value:#x}"
            ),
            _ => {}
        }
    }

    fn io_in(&mut self, port: u16) -> u32 {
        self.io_accesses += 1;
        if self.io_stub {
            return 0;
        }
        match port {
            p if p == IO_BASE => self.ioaddr,
            p if p == IO_BASE + 4 => {
                let at = self.ioaddr;
                self.read(at)
            }
            _ => panic!("I/O read of port {port:#x}"),
        }
    }

    fn io_out(&mut self, port: u16, value: u32) {
        self.io_accesses += 1;
        if self.io_stub {
            return;
        }
        match port {
            // IOADDR bits 31:20 are hard-wired to 0 (8254x SDM section 13.2.2.1).
            p if p == IO_BASE => self.ioaddr = value & 0x000F_FFFF,
            p if p == IO_BASE + 4 => {
                let at = self.ioaddr;
                self.write(at, value);
            }
            _ => panic!("I/O write of port {port:#x}"),
        }
    }
}

/// Accesses made while a test is already failing (the driver's `Drop` during unwinding) are
/// ignored: one failure, reported once.
impl Regs for E1000Model {
    fn read32(&mut self, offset: u32) -> u32 {
        if std::thread::panicking() {
            return 0;
        }
        self.lock().read(offset)
    }

    fn write32(&mut self, offset: u32, value: u32) {
        if std::thread::panicking() {
            return;
        }
        self.lock().write(offset, value);
    }
}

/// The I/O window: IOADDR and IODATA take dword accesses only.
impl PortIo for E1000Model {
    fn inb(&mut self, port: u16) -> u8 {
        panic!("byte read of port {port:#x}")
    }
    fn outb(&mut self, port: u16, _: u8) {
        panic!("byte write of port {port:#x}")
    }
    fn inw(&mut self, port: u16) -> u16 {
        panic!("word read of port {port:#x}")
    }
    fn outw(&mut self, port: u16, _: u16) {
        panic!("word write of port {port:#x}")
    }
    fn inl(&mut self, port: u16) -> u32 {
        if std::thread::panicking() {
            return 0;
        }
        self.lock().io_in(port)
    }
    fn outl(&mut self, port: u16, value: u32) {
        if std::thread::panicking() {
            return;
        }
        self.lock().io_out(port, value);
    }
}
