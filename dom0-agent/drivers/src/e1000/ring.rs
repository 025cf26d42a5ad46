//! The DMA memory of one descriptor ring: the ring itself and one packet buffer per slot,
//! with the bus addresses the device is given, all checked once when allocated.

use alloc::vec::Vec;

use super::E1000Error;
use super::desc::{DESC_BYTES, STATUS_OFFSET};
use crate::dma::{Dma, DmaBuf, PAGE_SIZE};

/// The 8254x ignores the low 4 bits of a ring's base (8254x SDM, RDBAL and TDBAL in section
/// 13.4): a ring must start on a 16-byte boundary.
pub(crate) const RING_ALIGN: u64 = 16;
/// Alignment asked of the allocator for a ring: one cache line of the device's bursts.
const RING_ALLOC_ALIGN: usize = 128;

/// A ring of `slots` descriptors and `slots` buffers of `buf_size` bytes.
///
/// Invariants (checked by [`RingMem::new`]): `ring` holds `slots` descriptors and is
/// physically contiguous at `ring_bus`, a multiple of [`RING_ALIGN`]; `bufs` holds
/// `slots * buf_size` bytes and slot `i`, `[i * buf_size, (i + 1) * buf_size)`, is physically
/// contiguous at `buf_bus[i]`.
pub(crate) struct RingMem<B> {
    ring: B,
    ring_bus: u64,
    bufs: B,
    buf_bus: Vec<u64>,
    buf_size: usize,
}

impl<B: DmaBuf> RingMem<B> {
    /// Allocates and checks the memory of a ring, and zeroes every descriptor.
    pub fn new<D: Dma<Buf = B> + ?Sized>(
        dma: &mut D,
        slots: usize,
        buf_size: usize,
    ) -> Result<Self, E1000Error> {
        let ring_bytes = slots * DESC_BYTES;
        let ring = dma
            .alloc(ring_bytes, RING_ALLOC_ALIGN)
            .filter(|b| b.size() >= ring_bytes)
            .ok_or(E1000Error::NoDmaMemory)?;
        let ring_bus = dma
            .translate(ring.addr(), ring_bytes)
            .ok_or(E1000Error::Untranslated)?;
        if !ring_bus.is_multiple_of(RING_ALIGN) {
            return Err(E1000Error::MisalignedRing(ring_bus));
        }
        let buf_bytes = slots * buf_size;
        let bufs = dma
            .alloc(buf_bytes, PAGE_SIZE)
            .filter(|b| b.size() >= buf_bytes)
            .ok_or(E1000Error::NoDmaMemory)?;
        let buf_bus = (0..slots)
            .map(|i| {
                let addr = bufs.addr().checked_add((i * buf_size) as u64)?;
                dma.translate(addr, buf_size)
            })
            .collect::<Option<Vec<u64>>>()
            .ok_or(E1000Error::Untranslated)?;
        let mut mem = Self {
            ring,
            ring_bus,
            bufs,
            buf_bus,
            buf_size,
        };
        for i in 0..slots {
            mem.write_desc(i, &[0; DESC_BYTES]);
        }
        Ok(mem)
    }

    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.buf_bus.len()
    }

    /// Bus address of the ring.
    pub fn ring_bus(&self) -> u64 {
        self.ring_bus
    }

    /// Bytes of the ring (RDLEN/TDLEN).
    pub fn ring_bytes(&self) -> usize {
        self.slots() * DESC_BYTES
    }

    /// Bus address of slot `i`'s buffer (`i < slots()`).
    pub fn buf_bus(&self, i: usize) -> u64 {
        self.buf_bus[i]
    }

    /// Copies descriptor `i` out of the ring.
    pub fn read_desc(&self, i: usize) -> [u8; DESC_BYTES] {
        let mut b = [0u8; DESC_BYTES];
        self.ring.read(i * DESC_BYTES, &mut b);
        b
    }

    /// The status byte of descriptor `i`: a cheap look for DD before the whole descriptor
    /// is copied.
    pub fn desc_status(&self, i: usize) -> u8 {
        let mut b = [0u8; 1];
        self.ring.read(i * DESC_BYTES + STATUS_OFFSET, &mut b);
        b[0]
    }

    /// Copies `desc` into slot `i` of the ring.
    pub fn write_desc(&mut self, i: usize, desc: &[u8; DESC_BYTES]) {
        self.ring.write(i * DESC_BYTES, desc);
    }

    /// Copies the first `out.len()` (at most `buf_size`) bytes of slot `i`'s buffer.
    pub fn read_buf(&self, i: usize, out: &mut [u8]) {
        let n = out.len().min(self.buf_size);
        self.bufs.read(i * self.buf_size, &mut out[..n]);
    }

    /// Copies `data` (at most `buf_size` bytes) into slot `i`'s buffer.
    pub fn write_buf(&mut self, i: usize, data: &[u8]) {
        let n = data.len().min(self.buf_size);
        self.bufs.write(i * self.buf_size, &data[..n]);
    }
}
