//! The device side of a virtio 1.x split virtqueue (virtio 1.2 §2.7).
//!
//! A [`SplitQueue`] owns the device's private ring state (next available and next used
//! index, the last signalled used index) and the negotiated ring features (indirect
//! descriptors, event index). The rings themselves live in guest memory and are reached only
//! through [`GuestMemory`] copies.
//!
//! Invariants:
//! - `size` is a power of two in `1..=32768`, and the three ring parts were checked to be
//!   aligned and inside guest RAM when the queue was built ([`SplitQueue::new`]).
//! - Every descriptor chain is walked eagerly and completely into a [`Chain`] before the
//!   device acts on it: the walk visits at most `size` descriptors (the TTL), checks every
//!   index, flag and length against the spec clause cited beside the check, and fails as a
//!   whole. A failed walk leaves `next_avail` untouched; the caller then reports the device
//!   broken (DEVICE_NEEDS_RESET) rather than guessing.
//! - Nothing here panics on any guest value.

use alloc::vec::Vec;
use core::fmt;

use crate::mem::{GuestAddr, GuestMemory, MemError};

/// Largest queue size the split ring allows (virtio 1.2 §2.7).
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Descriptor continues via `next` (virtio 1.2 §2.7.5).
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Buffer is device-writable (virtio 1.2 §2.7.5).
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Buffer holds an indirect descriptor table (virtio 1.2 §2.7.5.3).
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// Driver asks for no used-buffer notifications (virtio 1.2 §2.7.7).
pub const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Device asks for no available-buffer notifications (virtio 1.2 §2.7.10).
pub const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;

/// Size of one descriptor in the table (virtio 1.2 §2.7.5).
pub const DESC_SIZE: u64 = 16;

/// Why a queue or one of its chains was refused. Every variant is the driver's fault except
/// `Memory` when the range was inside RAM at setup (which cannot happen with a static map).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueError {
    /// Queue size zero, not a power of two, or above the maximum.
    InvalidSize(u16),
    /// A ring part is not aligned as the spec requires.
    Misaligned { part: &'static str, addr: u64 },
    /// A guest memory access failed.
    Memory(MemError),
    /// The available index moved by more than the queue size.
    AvailIdxJump { next_avail: u16, avail_idx: u16 },
    /// A head index from the available ring is not a descriptor index.
    HeadOutOfRange(u16),
    /// A `next` field points outside its table.
    NextOutOfRange(u16),
    /// The chain visits more descriptors than the queue size.
    ChainTooLong,
    /// The chain's buffers add up to more than 2^32 - 1 bytes, or a buffer wraps.
    ChainTooBig,
    /// INDIRECT set but VIRTIO_F_INDIRECT_DESC was not negotiated.
    IndirectNotNegotiated,
    /// INDIRECT inside an indirect table.
    NestedIndirect,
    /// INDIRECT together with NEXT.
    IndirectWithNext,
    /// Indirect table length zero, not a multiple of 16, or too many entries.
    IndirectBadLength(u32),
    /// A device-readable buffer after a device-writable one.
    ReadableAfterWritable,
    /// `add_used` with a head the device never popped.
    UsedHeadOutOfRange(u16),
}

impl From<MemError> for QueueError {
    fn from(e: MemError) -> Self {
        QueueError::Memory(e)
    }
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueueError::InvalidSize(s) => write!(f, "invalid queue size {s}"),
            QueueError::Misaligned { part, addr } => write!(f, "{part} at {addr:#x} misaligned"),
            QueueError::Memory(e) => write!(f, "{e}"),
            QueueError::AvailIdxJump {
                next_avail,
                avail_idx,
            } => write!(f, "avail idx jumped from {next_avail} to {avail_idx}"),
            QueueError::HeadOutOfRange(i) => write!(f, "head {i} out of range"),
            QueueError::NextOutOfRange(i) => write!(f, "next {i} out of range"),
            QueueError::ChainTooLong => f.write_str("descriptor chain longer than queue"),
            QueueError::ChainTooBig => f.write_str("descriptor chain over 4 GiB or wrapping"),
            QueueError::IndirectNotNegotiated => f.write_str("indirect not negotiated"),
            QueueError::NestedIndirect => f.write_str("nested indirect table"),
            QueueError::IndirectWithNext => f.write_str("indirect with next"),
            QueueError::IndirectBadLength(l) => write!(f, "indirect table length {l}"),
            QueueError::ReadableAfterWritable => f.write_str("readable after writable"),
            QueueError::UsedHeadOutOfRange(i) => write!(f, "used head {i} out of range"),
        }
    }
}

/// Where the driver placed one queue's three parts, as written to the transport.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueLayout {
    pub size: u16,
    pub desc: GuestAddr,
    pub avail: GuestAddr,
    pub used: GuestAddr,
}

/// Negotiated features that change how the ring is parsed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingFeatures {
    /// VIRTIO_F_INDIRECT_DESC.
    pub indirect: bool,
    /// VIRTIO_F_EVENT_IDX.
    pub event_idx: bool,
}

/// One guest buffer of a chain: `[addr, addr + len)`, with `addr + len` known not to wrap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddr,
    pub len: u32,
}

/// Why a copy into or out of a chain failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainError {
    /// The chain's readable (or writable) part is shorter than the access.
    TooShort,
    /// A buffer of the chain is not guest RAM.
    Memory(MemError),
}

impl From<MemError> for ChainError {
    fn from(e: MemError) -> Self {
        ChainError::Memory(e)
    }
}

/// A fully walked and checked descriptor chain: its head index and its device-readable and
/// device-writable buffers in order. Reused between pops to avoid allocation.
#[derive(Clone, Debug, Default)]
pub struct Chain {
    head: u16,
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    readable_len: u32,
    writable_len: u32,
}

impl Chain {
    /// An empty chain with room for a few segments.
    pub fn new() -> Chain {
        Chain {
            head: 0,
            readable: Vec::with_capacity(4),
            writable: Vec::with_capacity(4),
            readable_len: 0,
            writable_len: 0,
        }
    }

    fn clear(&mut self, head: u16) {
        self.head = head;
        self.readable.clear();
        self.writable.clear();
        self.readable_len = 0;
        self.writable_len = 0;
    }

    /// Head descriptor index, to hand back in the used ring.
    pub fn head(&self) -> u16 {
        self.head
    }
    /// Total bytes the device may read.
    pub fn readable_len(&self) -> u32 {
        self.readable_len
    }
    /// Total bytes the device may write.
    pub fn writable_len(&self) -> u32 {
        self.writable_len
    }
    /// The device-readable buffers in order.
    pub fn readable(&self) -> &[Segment] {
        &self.readable
    }
    /// The device-writable buffers in order.
    pub fn writable(&self) -> &[Segment] {
        &self.writable
    }

    /// Copies `buf.len()` bytes starting `offset` bytes into the readable part.
    pub fn read_at<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        offset: u32,
        buf: &mut [u8],
    ) -> Result<(), ChainError> {
        copy_segments(
            &self.readable,
            self.readable_len,
            offset,
            buf.len(),
            |addr, r| mem.read(addr, &mut buf[r]),
        )
    }

    /// Copies `buf` to the writable part starting `offset` bytes into it.
    pub fn write_at<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        offset: u32,
        buf: &[u8],
    ) -> Result<(), ChainError> {
        copy_segments(
            &self.writable,
            self.writable_len,
            offset,
            buf.len(),
            |addr, r| mem.write(addr, &buf[r]),
        )
    }
}

/// Walks `segs` (total `total` bytes) from logical `offset` for `len` bytes, calling `f` with
/// each piece's guest address and its range within the caller's buffer.
#[inline]
fn copy_segments(
    segs: &[Segment],
    total: u32,
    offset: u32,
    len: usize,
    mut f: impl FnMut(GuestAddr, core::ops::Range<usize>) -> Result<(), MemError>,
) -> Result<(), ChainError> {
    let end = u64::from(offset)
        .checked_add(len as u64)
        .ok_or(ChainError::TooShort)?;
    if end > u64::from(total) {
        return Err(ChainError::TooShort);
    }
    let mut skip = offset;
    let mut done = 0usize;
    for seg in segs {
        if done == len {
            break;
        }
        if skip >= seg.len {
            skip -= seg.len;
            continue;
        }
        let avail = (seg.len - skip) as usize;
        let n = avail.min(len - done);
        // Cannot wrap: the walk checked `addr + len` for every segment.
        let addr = GuestAddr(seg.addr.0 + u64::from(skip));
        f(addr, done..done + n)?;
        done += n;
        skip = 0;
    }
    Ok(())
}

/// `vring_need_event` (virtio 1.2 §2.7.7.2 / §2.7.10): whether moving an index from `old`
/// to `new` crosses `event`.
#[inline]
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// The device side of one split virtqueue.
#[derive(Clone, Debug)]
pub struct SplitQueue {
    size: u16,
    desc: GuestAddr,
    avail: GuestAddr,
    used: GuestAddr,
    features: RingFeatures,
    next_avail: u16,
    /// The avail index last read from the driver (a cache; re-read when exhausted).
    avail_idx_seen: u16,
    next_used: u16,
    /// Used index at the last notification decision; `None` before the first.
    signalled_used: Option<u16>,
    /// Whether used elements were added since the last notification decision.
    used_dirty: bool,
}

impl SplitQueue {
    /// Checks a driver's layout and builds the queue.
    pub fn new<M: GuestMemory + ?Sized>(
        mem: &M,
        layout: QueueLayout,
        features: RingFeatures,
    ) -> Result<SplitQueue, QueueError> {
        let size = layout.size;
        // virtio 1.2 §2.7: "Queue Size value is always a power of 2. The maximum Queue Size
        // value is 32768."
        if size == 0 || !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            return Err(QueueError::InvalidSize(size));
        }
        // virtio 1.2 §2.7.1: each part's first byte at a multiple of its alignment
        // (descriptor table 16, available ring 2, used ring 4).
        for (part, addr, align) in [
            ("descriptor table", layout.desc, 16),
            ("available ring", layout.avail, 2),
            ("used ring", layout.used, 4),
        ] {
            if !addr.is_aligned(align) {
                return Err(QueueError::Misaligned { part, addr: addr.0 });
            }
        }
        // virtio 1.2 §2.7 (sizes of the three parts): 16*n, 6+2*n, 6+8*n bytes, all of which
        // must be guest RAM the driver owns (checked once here, again on every access).
        let n = u64::from(size);
        mem.check(layout.desc, 16 * n)?;
        mem.check(layout.avail, 6 + 2 * n)?;
        mem.check(layout.used, 6 + 8 * n)?;
        Ok(SplitQueue {
            size,
            desc: layout.desc,
            avail: layout.avail,
            used: layout.used,
            features,
            next_avail: 0,
            avail_idx_seen: 0,
            next_used: 0,
            signalled_used: None,
            used_dirty: false,
        })
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }
    /// Index of the next available-ring entry the device will read.
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }
    /// Index of the next used-ring entry the device will write.
    pub fn next_used(&self) -> u16 {
        self.next_used
    }
    /// Negotiated ring features.
    pub fn features(&self) -> RingFeatures {
        self.features
    }

    #[inline]
    fn avail_idx_addr(&self) -> GuestAddr {
        GuestAddr(self.avail.0 + 2)
    }
    #[inline]
    fn used_event_addr(&self) -> GuestAddr {
        GuestAddr(self.avail.0 + 4 + 2 * u64::from(self.size))
    }
    #[inline]
    fn avail_event_addr(&self) -> GuestAddr {
        GuestAddr(self.used.0 + 4 + 8 * u64::from(self.size))
    }

    /// Reads the driver's avail index and checks it (virtio 1.2 §2.7.6.1: the driver never
    /// makes more than `size` buffers available at once, and never decrements `idx`).
    fn refresh_avail<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<u16, QueueError> {
        let idx = mem.read_u16(self.avail_idx_addr())?;
        let pending = idx.wrapping_sub(self.next_avail);
        if pending > self.size {
            return Err(QueueError::AvailIdxJump {
                next_avail: self.next_avail,
                avail_idx: idx,
            });
        }
        // virtio 1.2 §2.7.13.3.1 (memory barrier): the ring entries are read after idx.
        mem.fence_acquire();
        self.avail_idx_seen = idx;
        Ok(pending)
    }

    /// Whether the driver has made buffers available that were not popped yet.
    pub fn has_pending<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<bool, QueueError> {
        if self.avail_idx_seen != self.next_avail {
            return Ok(true);
        }
        Ok(self.refresh_avail(mem)? != 0)
    }

    /// Pops the next available chain into `chain`. `Ok(false)` when the ring is empty.
    pub fn pop<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        chain: &mut Chain,
    ) -> Result<bool, QueueError> {
        if self.avail_idx_seen == self.next_avail && self.refresh_avail(mem)? == 0 {
            return Ok(false);
        }
        let slot = u64::from(self.next_avail & (self.size - 1));
        let walked = mem
            .read_u16(GuestAddr(self.avail.0 + 4 + 2 * slot))
            .map_err(QueueError::from)
            .and_then(|head| self.walk(mem, head, chain));
        if let Err(e) = walked {
            // Forget the cached index so that a retry re-reads everything.
            self.avail_idx_seen = self.next_avail;
            return Err(e);
        }
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(true)
    }

    /// Gives the last popped chain back (it will be popped again); for devices that find no
    /// use for a buffer right now (e.g. a receive buffer too small for this frame).
    pub fn undo_pop(&mut self) {
        self.next_avail = self.next_avail.wrapping_sub(1);
    }

    /// Walks the chain starting at descriptor `head` into `chain`, checking everything.
    pub fn walk<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        head: u16,
        chain: &mut Chain,
    ) -> Result<(), QueueError> {
        chain.clear(head);
        // virtio 1.2 §2.7.6: ring entries are indices into the descriptor table, which has
        // `size` entries (§2.7.5).
        if head >= self.size {
            return Err(QueueError::HeadOutOfRange(head));
        }
        let mut table = self.desc;
        let mut table_len: u32 = u32::from(self.size);
        let mut idx = head;
        let mut in_indirect = false;
        // virtio 1.2 §2.7.5.3.1: "A driver MUST NOT create a descriptor chain longer than
        // the Queue Size of the device." This TTL bounds the walk, loops included
        // (§2.7.5.2: loops are forbidden).
        let mut ttl = u32::from(self.size);
        let mut total: u64 = 0;
        loop {
            if ttl == 0 {
                return Err(QueueError::ChainTooLong);
            }
            ttl -= 1;
            let mut raw = [0u8; 16];
            // `idx < table_len` holds here, and `table + 16 * table_len` was checked not to
            // wrap (ring table at setup, indirect table below).
            mem.read(GuestAddr(table.0 + DESC_SIZE * u64::from(idx)), &mut raw)?;
            let addr = u64::from_le_bytes([
                raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7],
            ]);
            let len = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
            let flags = u16::from_le_bytes([raw[12], raw[13]]);
            let next = u16::from_le_bytes([raw[14], raw[15]]);

            if flags & VIRTQ_DESC_F_INDIRECT != 0 {
                // virtio 1.2 §2.7.5.3.1: INDIRECT only if VIRTIO_F_INDIRECT_DESC was
                // negotiated ...
                if !self.features.indirect {
                    return Err(QueueError::IndirectNotNegotiated);
                }
                // ... never within an indirect table (one table per descriptor) ...
                if in_indirect {
                    return Err(QueueError::NestedIndirect);
                }
                // ... and never together with NEXT.
                if flags & VIRTQ_DESC_F_NEXT != 0 {
                    return Err(QueueError::IndirectWithNext);
                }
                // virtio 1.2 §2.7.5.3: the table is `len / 16` descriptors; a partial or
                // empty table is malformed, and its `next` fields are u16.
                if len == 0 || !len.is_multiple_of(16) || len / 16 > 65536 {
                    return Err(QueueError::IndirectBadLength(len));
                }
                if addr.checked_add(u64::from(len)).is_none() {
                    return Err(QueueError::ChainTooBig);
                }
                // virtio 1.2 §2.7.5.3.2: the device ignores WRITE on this descriptor.
                table = GuestAddr(addr);
                table_len = len / 16;
                idx = 0;
                in_indirect = true;
                continue;
            }

            // virtio 1.2 §2.7.5: `addr` is guest-physical; the buffer must not wrap.
            if addr.checked_add(u64::from(len)).is_none() {
                return Err(QueueError::ChainTooBig);
            }
            // virtio 1.2 §2.7.5.2: a chain is at most 2^32 bytes (we keep it under 2^32 so
            // lengths fit the used ring's u32).
            total += u64::from(len);
            if total > u64::from(u32::MAX) {
                return Err(QueueError::ChainTooBig);
            }
            if len != 0 {
                let seg = Segment {
                    addr: GuestAddr(addr),
                    len,
                };
                if flags & VIRTQ_DESC_F_WRITE != 0 {
                    chain.writable.push(seg);
                    chain.writable_len += len;
                } else {
                    // virtio 1.2 §2.7.4.2: device-writable elements come after all
                    // device-readable ones.
                    if !chain.writable.is_empty() {
                        return Err(QueueError::ReadableAfterWritable);
                    }
                    chain.readable.push(seg);
                    chain.readable_len += len;
                }
            }
            if flags & VIRTQ_DESC_F_NEXT == 0 {
                return Ok(());
            }
            // virtio 1.2 §2.7.5 / §2.7.5.3: `next` indexes the same table.
            if u32::from(next) >= table_len {
                return Err(QueueError::NextOutOfRange(next));
            }
            idx = next;
        }
    }

    /// Returns chain `head` to the driver with `len` bytes written (virtio 1.2 §2.7.8.1:
    /// the element is written before `idx` is updated).
    pub fn add_used<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        head: u16,
        len: u32,
    ) -> Result<(), QueueError> {
        if head >= self.size {
            return Err(QueueError::UsedHeadOutOfRange(head));
        }
        let slot = u64::from(self.next_used & (self.size - 1));
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write(GuestAddr(self.used.0 + 4 + 8 * slot), &elem)?;
        // virtio 1.2 §2.7.8.2 / §2.7.14: the used element is visible before the new idx.
        mem.fence_release();
        self.next_used = self.next_used.wrapping_add(1);
        self.used_dirty = true;
        mem.write_u16(GuestAddr(self.used.0 + 2), self.next_used)?;
        Ok(())
    }

    /// Decides whether the driver wants a used-buffer notification for what was added since
    /// the last decision (virtio 1.2 §2.7.7.2), and records the decision.
    pub fn needs_notification<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<bool, QueueError> {
        if !self.used_dirty {
            return Ok(false);
        }
        self.used_dirty = false;
        let new = self.next_used;
        let old = self.signalled_used.replace(new);
        // The used idx store must be visible before we read the driver's suppression state.
        mem.fence_full();
        if self.features.event_idx {
            // virtio 1.2 §2.7.7.2: with EVENT_IDX the device ignores the flags and notifies
            // when the used idx passes `used_event`. Before the first decision, or after
            // exactly 2^16 completions (the index came full circle), notify unconditionally.
            let used_event = mem.read_u16(self.used_event_addr())?;
            Ok(match old {
                Some(old) if old != new => need_event(used_event, new, old),
                _ => true,
            })
        } else {
            // virtio 1.2 §2.7.7.2: without EVENT_IDX, flags == 1 means "do not notify".
            let flags = mem.read_u16(self.avail)?;
            Ok(flags & VIRTQ_AVAIL_F_NO_INTERRUPT == 0)
        }
    }

    /// Asks the driver not to notify (virtio 1.2 §2.7.10.2), while the device is busy.
    pub fn disable_notifications<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<(), QueueError> {
        if !self.features.event_idx {
            mem.write_u16(self.used, VIRTQ_USED_F_NO_NOTIFY)?;
        }
        // With EVENT_IDX a stale avail_event already suppresses notifications.
        Ok(())
    }

    /// Asks the driver not to notify at all for now (the device will look at the ring again
    /// by itself, e.g. at its next completion). Without EVENT_IDX that is the NO_NOTIFY flag;
    /// with it, `avail_event` half the index space ahead, which every driver's check reads as
    /// "not yet" (a stale `avail_event`, as [`SplitQueue::disable_notifications`] leaves, still
    /// lets drivers that compare `idx >= avail_event + 1` notify).
    pub fn suppress_notifications<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<(), QueueError> {
        if self.features.event_idx {
            mem.write_u16(
                self.avail_event_addr(),
                self.next_avail.wrapping_add(0x8000),
            )?;
        } else {
            mem.write_u16(self.used, VIRTQ_USED_F_NO_NOTIFY)?;
        }
        Ok(())
    }

    /// Asks the driver to notify for the next buffer, then re-checks the ring; `Ok(true)`
    /// means buffers arrived meanwhile and the caller must keep processing.
    pub fn enable_notifications<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<bool, QueueError> {
        if self.features.event_idx {
            // virtio 1.2 §2.7.10.2: with EVENT_IDX the device keeps flags at 0 and uses
            // avail_event.
            mem.write_u16(self.avail_event_addr(), self.next_avail)?;
        } else {
            mem.write_u16(self.used, 0)?;
        }
        // Store of the suppression state before the load of the avail idx.
        mem.fence_full();
        Ok(self.refresh_avail(mem)? != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::VecGuestMemory;

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    fn setup(size: u16, features: RingFeatures) -> (VecGuestMemory, SplitQueue) {
        let mem = VecGuestMemory::new(0, 0x10000);
        let q = SplitQueue::new(
            &mem,
            QueueLayout {
                size,
                desc: GuestAddr(DESC),
                avail: GuestAddr(AVAIL),
                used: GuestAddr(USED),
            },
            features,
        )
        .unwrap();
        (mem, q)
    }

    fn desc(mem: &VecGuestMemory, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..].copy_from_slice(&next.to_le_bytes());
        mem.write(GuestAddr(table + 16 * u64::from(i)), &raw)
            .unwrap();
    }

    fn publish(mem: &VecGuestMemory, slot: u16, head: u16, idx: u16) {
        mem.write_u16(GuestAddr(AVAIL + 4 + 2 * u64::from(slot)), head)
            .unwrap();
        mem.write_u16(GuestAddr(AVAIL + 2), idx).unwrap();
    }

    #[test]
    fn layout_checks() {
        let mem = VecGuestMemory::new(0, 0x10000);
        let mut l = QueueLayout {
            size: 8,
            desc: GuestAddr(DESC),
            avail: GuestAddr(AVAIL),
            used: GuestAddr(USED),
        };
        let f = RingFeatures::default();
        assert!(SplitQueue::new(&mem, l, f).is_ok());
        l.size = 6;
        assert_eq!(
            SplitQueue::new(&mem, l, f).unwrap_err(),
            QueueError::InvalidSize(6)
        );
        l.size = 8;
        l.desc = GuestAddr(DESC + 8);
        assert!(matches!(
            SplitQueue::new(&mem, l, f),
            Err(QueueError::Misaligned { .. })
        ));
        l.desc = GuestAddr(DESC);
        l.used = GuestAddr(0x10000 - 8);
        assert!(matches!(
            SplitQueue::new(&mem, l, f),
            Err(QueueError::Memory(_))
        ));
    }

    #[test]
    fn direct_and_indirect_chains() {
        let f = RingFeatures {
            indirect: true,
            event_idx: false,
        };
        let (mem, mut q) = setup(8, f);
        desc(&mem, DESC, 0, 0x5000, 16, VIRTQ_DESC_F_NEXT, 3);
        desc(&mem, DESC, 3, 0x0, 64, VIRTQ_DESC_F_INDIRECT, 0);
        desc(&mem, 0x0, 0, 0x6000, 512, VIRTQ_DESC_F_NEXT, 1);
        desc(
            &mem,
            0x0,
            1,
            0x7000,
            1,
            VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
            3,
        );
        desc(&mem, 0x0, 3, 0x7001, 7, VIRTQ_DESC_F_WRITE, 0);
        publish(&mem, 0, 0, 1);
        let mut c = Chain::new();
        assert!(q.pop(&mem, &mut c).unwrap());
        assert_eq!(c.readable_len(), 528);
        assert_eq!(c.writable_len(), 8);
        assert_eq!(c.writable().len(), 2);
        assert!(!q.pop(&mem, &mut c).unwrap());
        c.write_at(&mem, 0, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        assert_eq!(mem.read_u64(GuestAddr(0x7000)).unwrap(), 0x0807060504030201);
        assert_eq!(c.write_at(&mem, 1, &[0; 8]), Err(ChainError::TooShort));
        q.add_used(&mem, c.head(), 8).unwrap();
        assert_eq!(mem.read_u16(GuestAddr(USED + 2)).unwrap(), 1);
        assert!(q.needs_notification(&mem).unwrap());
        assert!(!q.needs_notification(&mem).unwrap());
    }

    #[test]
    fn malformed_chains_are_refused() {
        let (mem, mut q) = setup(4, RingFeatures::default());
        let mut c = Chain::new();
        // Loop 0 -> 1 -> 0.
        desc(&mem, DESC, 0, 0x5000, 4, VIRTQ_DESC_F_NEXT, 1);
        desc(&mem, DESC, 1, 0x5000, 4, VIRTQ_DESC_F_NEXT, 0);
        publish(&mem, 0, 0, 1);
        assert_eq!(q.pop(&mem, &mut c), Err(QueueError::ChainTooLong));
        // Next out of range.
        desc(&mem, DESC, 1, 0x5000, 4, VIRTQ_DESC_F_NEXT, 9);
        assert_eq!(q.pop(&mem, &mut c), Err(QueueError::NextOutOfRange(9)));
        // Indirect not negotiated.
        desc(&mem, DESC, 0, 0x5000, 16, VIRTQ_DESC_F_INDIRECT, 0);
        assert_eq!(q.pop(&mem, &mut c), Err(QueueError::IndirectNotNegotiated));
        // Head out of range.
        publish(&mem, 0, 7, 1);
        assert_eq!(q.pop(&mem, &mut c), Err(QueueError::HeadOutOfRange(7)));
        // Avail idx jump.
        publish(&mem, 0, 0, 9);
        assert!(matches!(
            q.pop(&mem, &mut c),
            Err(QueueError::AvailIdxJump { .. })
        ));
        // Wrapping buffer.
        desc(&mem, DESC, 0, u64::MAX - 2, 4, 0, 0);
        publish(&mem, 0, 0, 1);
        assert_eq!(q.pop(&mem, &mut c), Err(QueueError::ChainTooBig));
        // Readable after writable.
        desc(
            &mem,
            DESC,
            0,
            0x5000,
            4,
            VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
            1,
        );
        desc(&mem, DESC, 1, 0x5000, 4, 0, 0);
        assert_eq!(q.pop(&mem, &mut c), Err(QueueError::ReadableAfterWritable));
        assert_eq!(q.next_avail(), 0);
    }

    #[test]
    fn indirect_rules() {
        let f = RingFeatures {
            indirect: true,
            event_idx: false,
        };
        let (mem, mut q) = setup(4, f);
        let mut c = Chain::new();
        publish(&mem, 0, 0, 1);
        desc(
            &mem,
            DESC,
            0,
            0x8000,
            16,
            VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT,
            1,
        );
        assert_eq!(q.pop(&mem, &mut c), Err(QueueError::IndirectWithNext));
        desc(&mem, DESC, 0, 0x8000, 24, VIRTQ_DESC_F_INDIRECT, 0);
        assert_eq!(q.pop(&mem, &mut c), Err(QueueError::IndirectBadLength(24)));
        desc(&mem, DESC, 0, 0x8000, 32, VIRTQ_DESC_F_INDIRECT, 0);
        desc(&mem, 0x8000, 0, 0x8000, 16, VIRTQ_DESC_F_INDIRECT, 0);
        assert_eq!(q.pop(&mem, &mut c), Err(QueueError::NestedIndirect));
        // An indirect table longer than the queue is cut by the TTL.
        desc(&mem, DESC, 0, 0x9000, 16 * 8, VIRTQ_DESC_F_INDIRECT, 0);
        for i in 0..8 {
            desc(&mem, 0x9000, i, 0x5000, 1, VIRTQ_DESC_F_NEXT, i + 1);
        }
        assert_eq!(q.pop(&mem, &mut c), Err(QueueError::ChainTooLong));
    }

    #[test]
    fn event_idx_suppression() {
        let f = RingFeatures {
            indirect: false,
            event_idx: true,
        };
        let (mem, mut q) = setup(8, f);
        let mut c = Chain::new();
        for i in 0..4u16 {
            desc(&mem, DESC, i, 0x5000, 4, 0, 0);
            publish(&mem, i, i, i + 1);
        }
        // Driver wants an interrupt only once used idx passes 2 (used_event = 2).
        mem.write_u16(GuestAddr(AVAIL + 4 + 16), 2).unwrap();
        let mut notes = 0;
        while q.pop(&mem, &mut c).unwrap() {
            q.add_used(&mem, c.head(), 0).unwrap();
            if q.needs_notification(&mem).unwrap() {
                notes += 1;
            }
        }
        // First decision always notifies (nothing signalled yet), then only when crossing 2.
        assert_eq!(notes, 2);
        assert!(!q.enable_notifications(&mem).unwrap());
        assert_eq!(mem.read_u16(GuestAddr(USED + 4 + 64)).unwrap(), 4);
    }

    #[test]
    fn need_event_wraps() {
        assert!(need_event(0, 1, 0));
        assert!(!need_event(5, 3, 2));
        assert!(need_event(u16::MAX, 0, u16::MAX));
        assert!(need_event(2, 4, 1));
    }
}
