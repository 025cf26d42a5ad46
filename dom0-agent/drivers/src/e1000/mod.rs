//! The Intel 8254x gigabit NIC (82540EM, PCI 8086:100E, as Bochs and QEMU emulate it, and
//! its 82545/82546 siblings), polled, as a [`Nic`].
//!
//! * [`probe`]: which PCI functions are ours, their BAR0 and I/O BAR, decode and bus
//!   mastering ([`probe::enable`]).
//! * [`Regs`]: the register seam. dom0 implements it over the memory BAR; [`IoWindow`] does
//!   it through the I/O BAR's IOADDR/IODATA pair.
//! * [`E1000::new`]: global reset, interrupts masked, the MAC from RAL0/RAH0 or the EEPROM,
//!   link up, multicast table cleared, then a receive ring of [`RX_SLOTS`] 2048-byte buffers
//!   (promiscuous, CRC stripped) and a transmit ring of [`TX_SLOTS`]
//!   (8254x SDM chapter 14, "General Initialization and Reset Operation").
//! * [`E1000::recv`] and [`E1000::send`]: one frame per descriptor each way, copied in and out
//!   of the driver's own DMA buffers; [`E1000::stats`] counts what went through and what was
//!   dropped and why.
//!
//! # What the driver trusts
//!
//! Nothing the device writes: a descriptor is copied out and judged before use (its DD, EOP,
//! error bits and length, against the buffer and the caller's slice), its buffer address is
//! never read back (the driver rewrites every descriptor from its own record), no loop runs
//! longer than one ring, and no device value can make the driver panic or touch memory beyond
//! its buffers. Every wait (reset, EEPROM) is bounded by a [`Clock`]. What a device could
//! still do, a bus master can always do: DMA anywhere, which only an IOMMU would stop.
//!
//! References: *PCI/PCI-X Family of Gigabit Ethernet Controllers Software Developer's Manual*
//! (8254x SDM, Intel 317453) for registers, descriptors and initialization; Bochs'
//! `iodev/network/e1000.cc` for what the emulator implements.

mod desc;
mod init;
pub mod probe;
mod regs;
mod ring;
mod rx;
mod tx;

pub use regs::{IoWindow, Regs};

use crate::dma::Dma;
use crate::hw::Clock;
use crate::nic::{Nic, NicError};
use ring::RingMem;
use rx::RxRing;
use tx::TxRing;

/// Descriptors in the receive ring (RDLEN must be a multiple of 128 bytes: 8 descriptors).
pub const RX_SLOTS: usize = 32;
/// Descriptors in the transmit ring (TDLEN, likewise); at most `TX_SLOTS - 1` frames are in
/// flight.
pub const TX_SLOTS: usize = 32;
/// Bytes of each receive buffer (RCTL.BSIZE = 2048) and of each transmit slot's buffer.
pub const BUF_SIZE: usize = 2048;

const _: () = assert!((RX_SLOTS * desc::DESC_BYTES).is_multiple_of(128));
const _: () = assert!((TX_SLOTS * desc::DESC_BYTES).is_multiple_of(128));
const _: () = assert!(RX_SLOTS >= 8 && TX_SLOTS >= 8 && RX_SLOTS <= 65_536);
const _: () = assert!(BUF_SIZE >= crate::nic::MAX_FRAME);

/// Why the device could not be brought up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum E1000Error {
    /// CTRL.RST did not clear (the device is stuck or gone).
    #[error("device reset did not complete")]
    ResetTimeout,
    /// An EEPROM read through EERD did not complete (the EEPROM word).
    #[error("EEPROM read of word {0} did not complete")]
    EepromTimeout(u8),
    /// Neither RAL0/RAH0 nor the EEPROM holds a valid unicast address (what the EEPROM
    /// held).
    #[error("no valid MAC address (EEPROM holds {0:02x?})")]
    BadMac([u8; 6]),
    /// dom0 had no DMA memory for a ring or its buffers.
    #[error("no DMA memory for the rings")]
    NoDmaMemory,
    /// A ring or a buffer slot is not physically contiguous or has no bus address.
    #[error("DMA memory without a contiguous bus address")]
    Untranslated,
    /// A ring's bus address is not 16-byte aligned (the address).
    #[error("descriptor ring at bus address {0:#x} is not 16-byte aligned")]
    MisalignedRing(u64),
}

/// Counters since [`E1000::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Frames handed to callers of [`E1000::recv`].
    pub rx_frames: u64,
    /// Bytes of those frames.
    pub rx_bytes: u64,
    /// Frames dropped because the device flagged them (CRC, symbol, sequence, carrier
    /// extension or data error).
    pub rx_errors: u64,
    /// Frames dropped for their length: 0, shorter than a header, longer than
    /// [`MAX_FRAME`](crate::nic::MAX_FRAME) or than a receive buffer.
    pub rx_bad_length: u64,
    /// Frames dropped because they spanned several descriptors (all their pieces).
    pub rx_fragments: u64,
    /// Good frames dropped because they were longer than the caller's buffer.
    pub rx_no_room: u64,
    /// Frames queued by [`E1000::send`].
    pub tx_frames: u64,
    /// Bytes of those frames.
    pub tx_bytes: u64,
    /// Sends refused because the ring was full.
    pub tx_full: u64,
    /// Sends refused for the frame's length.
    pub tx_bad_length: u64,
}

impl Stats {
    /// Received frames dropped, for any reason.
    #[must_use]
    pub const fn rx_dropped(&self) -> u64 {
        self.rx_errors + self.rx_bad_length + self.rx_fragments + self.rx_no_room
    }
}

/// One 8254x, reset and running, reached through `R`, with its rings in `D`'s memory.
pub struct E1000<R: Regs, D: Dma> {
    regs: R,
    /// Kept for the lifetime of the buffers it handed out.
    _dma: D,
    mac: [u8; 6],
    rx: RxRing<D::Buf>,
    tx: TxRing<D::Buf>,
    stats: Stats,
}

impl<R: Regs, D: Dma> E1000<R, D> {
    /// Allocates and checks the rings, resets the device, reads its MAC address and starts
    /// reception and transmission; waits are bounded by `clock`, used only here.
    ///
    /// The memory is allocated and checked first, so a DMA failure leaves the device
    /// untouched.
    ///
    /// # Errors
    /// [`E1000Error`]: DMA memory missing or unusable, the reset or an EEPROM read timing
    /// out, no valid MAC address.
    pub fn new<K: Clock>(mut regs: R, mut dma: D, mut clock: K) -> Result<Self, E1000Error> {
        let rx_mem = RingMem::new(&mut dma, RX_SLOTS, BUF_SIZE)?;
        let tx_mem = RingMem::new(&mut dma, TX_SLOTS, BUF_SIZE)?;
        init::reset(&mut regs, &mut clock)?;
        let mac = init::read_mac(&mut regs, &mut clock)?;
        init::link_and_filters(&mut regs);
        let mut rx = RxRing::new(rx_mem, BUF_SIZE);
        let mut tx = TxRing::new(tx_mem);
        rx.start(&mut regs);
        tx.start(&mut regs);
        Ok(Self {
            regs,
            _dma: dma,
            mac,
            rx,
            tx,
            stats: Stats::default(),
        })
    }

    /// The MAC address read at start.
    #[must_use]
    pub const fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Whether the device reports a link (STATUS.LU).
    pub fn link_up(&mut self) -> bool {
        self.regs.read32(regs::reg::STATUS) & regs::status::LU != 0
    }

    /// The counters so far.
    #[must_use]
    pub const fn stats(&self) -> Stats {
        self.stats
    }

    /// Frames queued for transmission that the device has not reported done, as of the last
    /// [`E1000::send`].
    #[must_use]
    pub fn tx_in_flight(&self) -> usize {
        self.tx.in_flight()
    }

    /// Queues one frame (see [`Nic::send`]).
    ///
    /// # Errors
    /// [`NicError::BadLength`], [`NicError::Full`].
    pub fn send(&mut self, frame: &[u8]) -> Result<(), NicError> {
        self.tx.send(&mut self.regs, frame, &mut self.stats)
    }

    /// The next good received frame (see [`Nic::recv`]).
    pub fn recv(&mut self, out: &mut [u8]) -> Option<usize> {
        self.rx.recv(&mut self.regs, out, &mut self.stats)
    }
}

/// Stops the device before its rings and buffers go back to dom0: receiver and transmitter
/// off, then a global reset (not waited for: no clock here), so no DMA lands in memory that
/// is no longer the driver's. The fields, with the buffers, are dropped after this runs.
impl<R: Regs, D: Dma> Drop for E1000<R, D> {
    fn drop(&mut self) {
        self.regs.write32(regs::reg::RCTL, 0);
        self.regs.write32(regs::reg::TCTL, 0);
        let value = self.regs.read32(regs::reg::CTRL);
        self.regs.write32(regs::reg::CTRL, value | regs::ctrl::RST);
    }
}

impl<R: Regs, D: Dma> Nic for E1000<R, D> {
    fn mac(&self) -> [u8; 6] {
        self.mac
    }
    fn link_up(&mut self) -> bool {
        Self::link_up(self)
    }
    fn send(&mut self, frame: &[u8]) -> Result<(), NicError> {
        Self::send(self, frame)
    }
    fn recv(&mut self, out: &mut [u8]) -> Option<usize> {
        Self::recv(self, out)
    }
}
