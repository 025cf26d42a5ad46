//! The transmit ring: programming it, queueing frames, and reclaiming the slots the device is
//! done with.
//!
//! The device owns the descriptors from TDH up to (not including) TDT. The driver fills slot
//! `tail`, then moves TDT past it; slots from `clean` up to `tail` are in flight. A slot comes
//! back when the device writes DD into its descriptor (every descriptor asks for it with RS);
//! the driver reclaims in order and never reads TDH. One slot stays empty, so "full" (`tail`
//! just behind `clean`) and "empty" (`tail == clean`) differ: a ring of `n` slots has `n - 1`
//! frames in flight at most (8254x SDM section 3.3, "Transmit Descriptor Ring Structure").

use core::sync::atomic::{Ordering, fence};

use super::Stats;
use super::desc::{TxDesc, tx_status};
use super::regs::{Regs, reg, tctl, tipg};
use super::ring::RingMem;
use super::rx::{len32, split};
use crate::dma::DmaBuf;
use crate::nic::{NicError, frame_len_ok};

/// The transmit ring and where the driver is in it.
pub(crate) struct TxRing<B> {
    mem: RingMem<B>,
    /// The next slot to fill (TDT once it is handed over).
    tail: usize,
    /// The oldest slot in flight.
    clean: usize,
}

impl<B: DmaBuf> TxRing<B> {
    /// A ring over `mem` (descriptors zeroed by [`RingMem::new`]).
    pub fn new(mem: RingMem<B>) -> Self {
        Self {
            mem,
            tail: 0,
            clean: 0,
        }
    }

    /// Programs the ring registers and the inter-packet gap, then enables the transmitter
    /// (8254x SDM section 14.5, "Transmit Initialization"): short frames padded, collision
    /// threshold 0x10, collision distance 0x40 (full duplex).
    pub fn start<R: Regs + ?Sized>(&mut self, regs: &mut R) {
        let [lo, hi] = split(self.mem.ring_bus());
        regs.write32(reg::TDBAL, lo);
        regs.write32(reg::TDBAH, hi);
        regs.write32(reg::TDLEN, len32(self.mem.ring_bytes()));
        regs.write32(reg::TDH, 0);
        regs.write32(reg::TDT, 0);
        self.tail = 0;
        self.clean = 0;
        regs.write32(reg::TIPG, tipg::VALUE);
        regs.write32(
            reg::TCTL,
            tctl::EN | tctl::PSP | tctl::CT << tctl::CT_SHIFT | tctl::COLD << tctl::COLD_SHIFT,
        );
    }

    /// Frames queued and not yet reported done.
    pub fn in_flight(&self) -> usize {
        (self.tail + self.mem.slots() - self.clean) % self.mem.slots()
    }

    /// Takes back, in order, the slots whose descriptors the device marked done.
    fn reclaim(&mut self) {
        while self.clean != self.tail && self.mem.desc_status(self.clean) & tx_status::DD != 0 {
            self.clean = (self.clean + 1) % self.mem.slots();
        }
    }

    /// Copies `frame` into the next slot and hands it to the device.
    ///
    /// # Errors
    /// [`NicError::BadLength`] and [`NicError::Full`] (see [`crate::nic::Nic::send`]).
    pub fn send<R: Regs + ?Sized>(
        &mut self,
        regs: &mut R,
        frame: &[u8],
        stats: &mut Stats,
    ) -> Result<(), NicError> {
        let length = match u16::try_from(frame.len()) {
            Ok(l) if frame_len_ok(frame.len()) => l,
            _ => {
                stats.tx_bad_length += 1;
                return Err(NicError::BadLength(frame.len()));
            }
        };
        self.reclaim();
        let slots = self.mem.slots();
        if (self.tail + 1) % slots == self.clean {
            stats.tx_full += 1;
            return Err(NicError::Full);
        }
        let i = self.tail;
        self.mem.write_buf(i, frame);
        let desc = TxDesc::frame(self.mem.buf_bus(i), length);
        self.mem.write_desc(i, &desc.encode());
        self.tail = (i + 1) % slots;
        // The descriptor and the frame are in memory before the device may fetch them.
        fence(Ordering::Release);
        regs.write32(reg::TDT, len32(self.tail));
        stats.tx_frames += 1;
        stats.tx_bytes += frame.len() as u64;
        Ok(())
    }
}
