//! The receive ring: programming it, and taking frames off it without trusting what the
//! device wrote.
//!
//! The device owns the descriptors from RDH up to (not including) RDT; the driver owns the
//! rest. At start every descriptor holds its buffer and RDT is `slots - 1`, so all but one are
//! the device's (RDH == RDT would mean "none"). The driver looks at its next slot only: when
//! the device has set DD there, the driver copies the descriptor out, judges it ([`judge`]),
//! copies the frame out if it is good, writes the descriptor afresh (its own buffer address,
//! status clear) and moves RDT onto it, which gives the device the slot before it (8254x SDM
//! section 3.2, "Receive Descriptor Queue Structure").

use core::sync::atomic::{Ordering, fence};

use super::Stats;
use super::desc::{RX_FRAME_ERRORS, RxDesc, rx_status};
use super::regs::{Regs, rctl, reg};
use super::ring::RingMem;
use crate::dma::DmaBuf;
use crate::nic::frame_len_ok;

/// What to do with one written-back descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// A whole good frame of this many bytes, which fits the caller's buffer.
    Deliver(usize),
    /// A piece of a frame that spans several descriptors (the driver's buffers hold any
    /// frame it accepts, so such a frame is too long or the device is confused): dropped
    /// with all its pieces; `first` for the first piece seen.
    Fragment { first: bool },
    /// The device flagged the frame as bad.
    Error,
    /// The length is 0, shorter than a header, longer than
    /// [`MAX_FRAME`](crate::nic::MAX_FRAME) or than the buffer.
    BadLength,
    /// A good frame longer than the caller's buffer.
    NoRoom,
}

/// Judges the written-back descriptor `desc` of a ring whose buffers hold `buf_size` bytes,
/// for a caller buffer of `out_len` bytes. `in_frame` says whether earlier descriptors began
/// a frame that has not ended (an EOP ends it); it is updated.
pub(crate) fn judge(
    desc: &RxDesc,
    in_frame: &mut bool,
    buf_size: usize,
    out_len: usize,
) -> Verdict {
    if desc.status & rx_status::EOP == 0 {
        let first = !*in_frame;
        *in_frame = true;
        return Verdict::Fragment { first };
    }
    if core::mem::take(in_frame) {
        // The last piece of a frame already dropped and counted.
        return Verdict::Fragment { first: false };
    }
    // Error bits are valid only with EOP and DD (8254x SDM table 3-3), which both hold here.
    if desc.errors & RX_FRAME_ERRORS != 0 {
        return Verdict::Error;
    }
    let len = usize::from(desc.length);
    if !frame_len_ok(len) || len > buf_size {
        return Verdict::BadLength;
    }
    if len > out_len {
        return Verdict::NoRoom;
    }
    Verdict::Deliver(len)
}

/// The receive ring and where the driver is in it.
pub(crate) struct RxRing<B> {
    mem: RingMem<B>,
    buf_size: usize,
    /// The next slot the device fills.
    next: usize,
    /// The descriptors before `next` began a frame without EOP.
    in_frame: bool,
}

impl<B: DmaBuf> RxRing<B> {
    /// A ring over `mem`, every descriptor posted with its buffer of `buf_size` bytes.
    pub fn new(mem: RingMem<B>, buf_size: usize) -> Self {
        let mut ring = Self {
            mem,
            buf_size,
            next: 0,
            in_frame: false,
        };
        for i in 0..ring.mem.slots() {
            ring.post(i);
        }
        ring
    }

    fn post(&mut self, i: usize) {
        let desc = RxDesc::posted(self.mem.buf_bus(i));
        self.mem.write_desc(i, &desc.encode());
    }

    /// Programs the ring registers, then enables the receiver (8254x SDM section 14.4,
    /// "Receive Initialization"): promiscuous for unicast and multicast (dom0 bridges frames
    /// for its guests' MACs), broadcast accepted, 2048-byte buffers, CRC stripped, long
    /// packets off (so no frame needs more than one buffer).
    pub fn start<R: Regs + ?Sized>(&mut self, regs: &mut R) {
        let [lo, hi] = split(self.mem.ring_bus());
        regs.write32(reg::RDBAL, lo);
        regs.write32(reg::RDBAH, hi);
        regs.write32(reg::RDLEN, len32(self.mem.ring_bytes()));
        regs.write32(reg::RDH, 0);
        self.next = 0;
        self.in_frame = false;
        fence(Ordering::Release);
        regs.write32(reg::RDT, len32(self.mem.slots() - 1));
        regs.write32(
            reg::RCTL,
            rctl::EN | rctl::UPE | rctl::MPE | rctl::BAM | rctl::BSIZE_2048 | rctl::SECRC,
        );
    }

    /// Copies the next good frame into `out` and returns its length; `None` once the next
    /// slot is not done. Descriptors judged bad on the way are given back and counted in
    /// `stats`. At most one ring's worth of descriptors is looked at per call, so a device
    /// that keeps writing descriptors back cannot keep the caller here.
    pub fn recv<R: Regs + ?Sized>(
        &mut self,
        regs: &mut R,
        out: &mut [u8],
        stats: &mut Stats,
    ) -> Option<usize> {
        for _ in 0..self.mem.slots() {
            let i = self.next;
            if self.mem.desc_status(i) & rx_status::DD == 0 {
                return None;
            }
            // Read the rest of the descriptor, and the frame, only after DD was seen.
            fence(Ordering::Acquire);
            let desc = RxDesc::decode(&self.mem.read_desc(i));
            if desc.status & rx_status::DD == 0 {
                return None;
            }
            let verdict = judge(&desc, &mut self.in_frame, self.buf_size, out.len());
            if let Verdict::Deliver(len) = verdict {
                self.mem.read_buf(i, &mut out[..len]);
            }
            self.give_back(regs, i);
            match verdict {
                Verdict::Deliver(len) => {
                    stats.rx_frames += 1;
                    stats.rx_bytes += len as u64;
                    return Some(len);
                }
                Verdict::Fragment { first } => stats.rx_fragments += u64::from(first),
                Verdict::Error => stats.rx_errors += 1,
                Verdict::BadLength => stats.rx_bad_length += 1,
                Verdict::NoRoom => stats.rx_no_room += 1,
            }
        }
        None
    }

    /// Rewrites slot `i` from the driver's own record (whatever the device left in it) and
    /// moves RDT onto it.
    fn give_back<R: Regs + ?Sized>(&mut self, regs: &mut R, i: usize) {
        self.post(i);
        self.next = (i + 1) % self.mem.slots();
        fence(Ordering::Release);
        regs.write32(reg::RDT, len32(i));
    }
}

/// The low and high halves of a bus address.
pub(crate) fn split(bus: u64) -> [u32; 2] {
    let [a, b, c, d, e, f, g, h] = bus.to_le_bytes();
    [
        u32::from_le_bytes([a, b, c, d]),
        u32::from_le_bytes([e, f, g, h]),
    ]
}

/// A ring length or index as a register value (rings here are a few KiB at most).
pub(crate) fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(length: u16, status: u8, errors: u8) -> RxDesc {
        RxDesc {
            addr: 0x1000,
            length,
            status: status | rx_status::DD,
            errors,
            ..RxDesc::default()
        }
    }

    const EOP: u8 = rx_status::EOP;

    #[test]
    fn good_frames_are_delivered() {
        let mut in_frame = false;
        assert_eq!(
            judge(&desc(60, EOP, 0), &mut in_frame, 2048, 1518),
            Verdict::Deliver(60)
        );
        assert_eq!(
            judge(&desc(1518, EOP, 0), &mut in_frame, 2048, 1518),
            Verdict::Deliver(1518)
        );
        // Checksum-offload results do not drop a frame.
        assert_eq!(
            judge(&desc(60, EOP, 0x60), &mut in_frame, 2048, 60),
            Verdict::Deliver(60)
        );
    }

    #[test]
    fn lengths_are_bounded_by_frame_buffer_and_caller() {
        let mut f = false;
        for bad in [0, 13, 1519, 2048, u16::MAX] {
            assert_eq!(
                judge(&desc(bad, EOP, 0), &mut f, 2048, 4096),
                Verdict::BadLength,
                "{bad}"
            );
        }
        assert_eq!(
            judge(&desc(600, EOP, 0), &mut f, 512, 4096),
            Verdict::BadLength
        );
        assert_eq!(
            judge(&desc(600, EOP, 0), &mut f, 2048, 599),
            Verdict::NoRoom
        );
        assert!(!f);
    }

    #[test]
    fn every_frame_error_bit_drops() {
        for bit in [0x01, 0x02, 0x04, 0x10, 0x80] {
            let mut f = false;
            assert_eq!(
                judge(&desc(60, EOP, bit), &mut f, 2048, 2048),
                Verdict::Error
            );
        }
    }

    #[test]
    fn a_frame_over_several_descriptors_is_dropped_whole_and_counted_once() {
        let mut f = false;
        assert_eq!(
            judge(&desc(2048, 0, 0), &mut f, 2048, 4096),
            Verdict::Fragment { first: true }
        );
        assert_eq!(
            judge(&desc(2048, 0, 0), &mut f, 2048, 4096),
            Verdict::Fragment { first: false }
        );
        // The last piece, with EOP, a fine length and even an error bit: still the old frame.
        assert_eq!(
            judge(&desc(100, EOP, 0x01), &mut f, 2048, 4096),
            Verdict::Fragment { first: false }
        );
        assert!(!f);
        assert_eq!(
            judge(&desc(100, EOP, 0), &mut f, 2048, 4096),
            Verdict::Deliver(100)
        );
    }

    #[test]
    fn addresses_split_into_register_halves() {
        assert_eq!(split(0x1_2345_6780), [0x2345_6780, 1]);
        assert_eq!(len32(512), 512);
    }
}
