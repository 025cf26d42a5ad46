//! DMA without an IOMMU: dom0's buffers, their bus addresses, and PRD-ready segments.
//!
//! dom0 runs in its own guest-physical address space, but a bus-master device sees
//! host-physical ("bus") addresses. So a driver gets its DMA memory from dom0 through [`Dma`]:
//! buffers it owns for as long as it lives ([`Dma::alloc`]) and the bus address of any
//! physically contiguous range of them ([`Dma::translate`]). A buffer need not be physically
//! contiguous as a whole: [`segments`] walks it page by page and merges what is.
//!
//! The driver never forms a reference into memory a device may write: it copies bytes in and
//! out with [`DmaBuf::read`] and [`DmaBuf::write`], while no transfer is running.

use alloc::vec::Vec;

/// Size of the pages [`segments`] translates one at a time.
pub const PAGE_SIZE: usize = 4096;
/// A bus-master IDE PRD region may not cross a boundary of this many bytes (and holds at most
/// this many bytes: a byte count of 0 means 64 KiB).
pub const PRD_BOUNDARY: u64 = 0x1_0000;
/// The engine's addresses are 32 bits wide.
pub const BUS_LIMIT: u64 = 1 << 32;

/// A DMA-able buffer owned by a driver.
///
/// Implementations for dom0 copy to and from the memory behind [`DmaBuf::addr`] (volatile or
/// plain copies: a device only touches it while the driver has a transfer running, and the
/// driver does not copy then). Offsets are checked by the caller: `offset + len <= size()`;
/// an implementation may panic otherwise.
pub trait DmaBuf {
    /// dom0's address of the first byte (the value [`Dma::translate`] takes).
    fn addr(&self) -> u64;
    /// Usable size in bytes.
    fn size(&self) -> usize;
    /// Copies `out.len()` bytes at `offset` out of the buffer.
    fn read(&self, offset: usize, out: &mut [u8]);
    /// Copies `data` into the buffer at `offset`.
    fn write(&mut self, offset: usize, data: &[u8]);
}

/// dom0's DMA memory, as a driver asks for it.
pub trait Dma {
    /// A buffer handed out by [`Dma::alloc`]; dropping it gives the memory back.
    type Buf: DmaBuf;

    /// Allocates at least `bytes` bytes aligned to `align` (a power of two) in dom0's address
    /// space, pinned at fixed bus addresses until the buffer is dropped; `None` if there is
    /// no such memory.
    fn alloc(&mut self, bytes: usize, align: usize) -> Option<Self::Buf>;

    /// The bus (host-physical) address of `addr`, if `[addr, addr + len)` is physically
    /// contiguous and DMA-able; `None` otherwise.
    fn translate(&self, addr: u64, len: usize) -> Option<u64>;
}

/// A physically contiguous piece of a buffer, ready for one PRD entry: `len` bytes at buffer
/// offset `offset`, at bus address `bus`. Invariants (checked by [`segments`]): `len` is even
/// and at most 64 KiB, `bus` is even, and `[bus, bus + len)` lies below 4 GiB inside one
/// 64 KiB-aligned window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Offset of the first byte in the buffer.
    pub offset: usize,
    /// Bus address of the first byte.
    pub bus: u32,
    /// Length in bytes.
    pub len: u32,
}

/// Why a buffer cannot be used for DMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DmaError {
    /// dom0 had no memory to give.
    #[error("no DMA memory")]
    NoMemory,
    /// A page of the buffer has no bus address.
    #[error("buffer page has no bus address")]
    Untranslated,
    /// A bus address lies at or above 4 GiB.
    #[error("bus address above 4 GiB")]
    AboveLimit,
    /// A bus address or a length is odd (the engine moves 16-bit words).
    #[error("odd bus address or length")]
    Unaligned,
    /// The buffer needs more PRD entries than a table holds.
    #[error("buffer too fragmented for one PRD table")]
    TooFragmented,
}

/// Splits the first `len` bytes of `buf` into [`Segment`]s: translates page by page, merges
/// physically adjacent pages, and cuts at every 64 KiB bus boundary.
///
/// # Errors
/// [`DmaError::Untranslated`], [`DmaError::AboveLimit`], [`DmaError::Unaligned`] when a
/// piece breaks the invariants of [`Segment`].
pub fn segments<D: Dma + ?Sized>(
    dma: &D,
    buf: &D::Buf,
    len: usize,
) -> Result<Vec<Segment>, DmaError> {
    let len = len.min(buf.size());
    let mut out: Vec<Segment> = Vec::new();
    let mut offset = 0usize;
    while offset < len {
        let addr = buf
            .addr()
            .checked_add(offset as u64)
            .ok_or(DmaError::Untranslated)?;
        let in_page = PAGE_SIZE - usize::try_from(addr % PAGE_SIZE as u64).unwrap_or(0);
        let piece = in_page.min(len - offset);
        let bus = dma.translate(addr, piece).ok_or(DmaError::Untranslated)?;
        push_piece(&mut out, offset, bus, piece)?;
        offset += piece;
    }
    Ok(out)
}

/// Appends `[bus, bus + len)` (buffer offset `offset`) to `out`, merging with the last
/// segment when contiguous and cutting at 64 KiB boundaries.
fn push_piece(
    out: &mut Vec<Segment>,
    mut offset: usize,
    mut bus: u64,
    mut len: usize,
) -> Result<(), DmaError> {
    if !bus.is_multiple_of(2) || !len.is_multiple_of(2) {
        return Err(DmaError::Unaligned);
    }
    match bus.checked_add(len as u64) {
        Some(end) if end <= BUS_LIMIT => {}
        _ => return Err(DmaError::AboveLimit),
    }
    while len > 0 {
        let room = PRD_BOUNDARY - bus % PRD_BOUNDARY;
        let take = len.min(usize::try_from(room).unwrap_or(usize::MAX));
        let take32 = u32::try_from(take).map_err(|_| DmaError::AboveLimit)?;
        let bus32 = u32::try_from(bus).map_err(|_| DmaError::AboveLimit)?;
        let merges = out.last().is_some_and(|last| {
            u64::from(last.bus) + u64::from(last.len) == bus
                && last.offset + last.len as usize == offset
                && !bus.is_multiple_of(PRD_BOUNDARY)
        });
        match out.last_mut() {
            Some(last) if merges => last.len += take32,
            _ => out.push(Segment {
                offset,
                bus: bus32,
                len: take32,
            }),
        }
        offset += take;
        bus += take as u64;
        len -= take;
    }
    Ok(())
}

/// Bytes of one PRD entry.
pub const PRD_ENTRY_BYTES: usize = 8;
/// End-of-table flag in the high word of a PRD entry.
pub const PRD_EOT: u16 = 0x8000;

/// Encodes the PRD table covering the first `len` bytes described by `segs` (in order) into
/// `out` (cleared first): per entry the 32-bit bus address, the 16-bit byte count (0 for
/// 64 KiB) and the flags word, with [`PRD_EOT`] on the last entry. Returns the number of
/// bytes covered (less than `len` only if `segs` cover less).
pub fn encode_prd(segs: &[Segment], len: usize, out: &mut Vec<u8>) -> usize {
    out.clear();
    let mut covered = 0usize;
    let mut entries = segs
        .iter()
        .map_while(|seg| {
            if covered >= len {
                return None;
            }
            let take = (seg.len as usize).min(len - covered);
            covered += take;
            Some((seg.bus, take))
        })
        .peekable();
    while let Some((bus, take)) = entries.next() {
        // A 64 KiB region is written as 0 (Bus Master IDE 1.0, PRD format).
        let count = u16::try_from(take).unwrap_or(0);
        let flags = if entries.peek().is_none() { PRD_EOT } else { 0 };
        out.extend_from_slice(&bus.to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
    }
    covered
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    /// A buffer whose pages are mapped by a table (`None`: untranslatable).
    struct Pages {
        base: u64,
        bus: Vec<Option<u64>>,
    }

    struct Buf {
        addr: u64,
        size: usize,
    }

    impl DmaBuf for Buf {
        fn addr(&self) -> u64 {
            self.addr
        }
        fn size(&self) -> usize {
            self.size
        }
        fn read(&self, _: usize, _: &mut [u8]) {}
        fn write(&mut self, _: usize, _: &[u8]) {}
    }

    impl Dma for Pages {
        type Buf = Buf;
        fn alloc(&mut self, _: usize, _: usize) -> Option<Buf> {
            None
        }
        fn translate(&self, addr: u64, len: usize) -> Option<u64> {
            let off = addr.checked_sub(self.base)?;
            let page = usize::try_from(off / PAGE_SIZE as u64).ok()?;
            let in_page = off % PAGE_SIZE as u64;
            if in_page + len as u64 > PAGE_SIZE as u64 {
                return None;
            }
            Some(self.bus.get(page).copied().flatten()? + in_page)
        }
    }

    fn buf(pages: usize) -> Buf {
        Buf {
            addr: 0x10_0000,
            size: pages * PAGE_SIZE,
        }
    }

    #[test]
    fn contiguous_pages_merge_and_cut_at_64k() {
        // 32 pages from 0x8000_F000: 1 page before the boundary, 16 after, 15 after that.
        let dma = Pages {
            base: 0x10_0000,
            bus: (0..32).map(|i| Some(0x8000_F000 + i * 4096)).collect(),
        };
        let segs = segments(&dma, &buf(32), 32 * PAGE_SIZE).unwrap();
        assert_eq!(
            segs,
            vec![
                Segment {
                    offset: 0,
                    bus: 0x8000_F000,
                    len: 0x1000
                },
                Segment {
                    offset: 0x1000,
                    bus: 0x8001_0000,
                    len: 0x1_0000
                },
                Segment {
                    offset: 0x1_1000,
                    bus: 0x8002_0000,
                    len: 0xF000
                },
            ]
        );
    }

    #[test]
    fn scattered_pages_stay_apart() {
        let dma = Pages {
            base: 0x10_0000,
            bus: vec![Some(0x5000), Some(0x1000), Some(0x2000), Some(0x9000)],
        };
        let segs = segments(&dma, &buf(4), 4 * PAGE_SIZE).unwrap();
        let got: Vec<(usize, u32, u32)> = segs.iter().map(|s| (s.offset, s.bus, s.len)).collect();
        assert_eq!(
            got,
            vec![
                (0, 0x5000, 0x1000),
                (0x1000, 0x1000, 0x2000),
                (0x3000, 0x9000, 0x1000)
            ]
        );
    }

    #[test]
    fn bad_pages_are_refused() {
        let untranslated = Pages {
            base: 0x10_0000,
            bus: vec![Some(0x1000), None],
        };
        assert_eq!(
            segments(&untranslated, &buf(2), 2 * PAGE_SIZE),
            Err(DmaError::Untranslated)
        );
        let high = Pages {
            base: 0x10_0000,
            bus: vec![Some(0xFFFF_F000), Some(0x1_0000_0000)],
        };
        assert_eq!(
            segments(&high, &buf(2), 2 * PAGE_SIZE),
            Err(DmaError::AboveLimit)
        );
        let odd = Pages {
            base: 0x10_0000,
            bus: vec![Some(0x1001)],
        };
        assert_eq!(segments(&odd, &buf(1), PAGE_SIZE), Err(DmaError::Unaligned));
    }

    #[test]
    fn prd_encoding_truncates_writes_zero_for_64k_and_ends_the_table() {
        let segs = [
            Segment {
                offset: 0,
                bus: 0x1_0000,
                len: 0x1_0000,
            },
            Segment {
                offset: 0x1_0000,
                bus: 0x3_0000,
                len: 0x1_0000,
            },
            Segment {
                offset: 0x2_0000,
                bus: 0x5_0000,
                len: 0x1_0000,
            },
        ];
        let mut out = Vec::new();
        assert_eq!(encode_prd(&segs, 0x1_0000 + 0x200, &mut out), 0x1_0200);
        assert_eq!(
            out,
            vec![
                0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, // 64 KiB at 0x1_0000
                0x00, 0x00, 0x03, 0x00, 0x00, 0x02, 0x00, 0x80, // 512 at 0x3_0000, EOT
            ]
        );
        assert_eq!(encode_prd(&segs, 0x10_0000, &mut out), 0x3_0000);
        assert_eq!(out.len(), 3 * PRD_ENTRY_BYTES);
        assert_eq!(&out[22..24], &PRD_EOT.to_le_bytes());
    }
}
