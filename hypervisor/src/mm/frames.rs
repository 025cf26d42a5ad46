//! The physical frame allocator: one bit per 4 KiB frame of host memory, set when free.
//!
//! It starts with every frame in use; the firmware's usable ranges are then added, and the
//! ranges the hypervisor must keep (its image, boot modules, the loader's structures, the first
//! MiB, the bitmap itself) reserved. Invariants: `free` equals the number of set bits; a frame
//! is handed out at most once until freed; freeing a frame that is not allocated is refused
//! (a double free is reported, and changes nothing).
//!
//! Ownership is typed: an allocation is a [`FrameRun`] (one or more contiguous frames), which
//! is not `Clone`; it goes back whole with [`FrameAllocator::free`], or is kept for the rest of
//! the run with [`FrameRun::keep_forever`] (boot-time structures). Nothing else takes frames.

use super::{FRAME_SIZE, HostPhysAddr};

/// Allocated 4 KiB frames: `count` of them from `addr`, contiguous. Not `Clone`: whoever
/// holds it owns the frames.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "frames not freed or kept are lost: free them or call keep_forever"]
pub struct FrameRun {
    start: HostPhysAddr,
    count: u64,
}

impl FrameRun {
    pub fn addr(&self) -> HostPhysAddr {
        self.start
    }

    /// Frames in the run.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Bytes in the run.
    pub fn bytes(&self) -> u64 {
        self.count * FRAME_SIZE
    }

    /// Keeps the frames for the rest of the run (page tables, the heap, CPU stacks, VMXON
    /// regions): they are never freed, and this says so where they are taken.
    pub fn keep_forever(self) -> HostPhysAddr {
        self.start
    }
}

/// Why a free was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FreeError {
    /// The address is past the memory the allocator covers.
    OutOfRange(HostPhysAddr),
    /// The frame is already free: a double free (a hypervisor bug).
    NotAllocated(HostPhysAddr),
}

/// Bytes of bitmap needed to cover physical memory up to `top` (rounded up to whole words).
pub fn bitmap_bytes(top: u64) -> u64 {
    top.div_ceil(FRAME_SIZE).div_ceil(64) * 8
}

/// Finds a frame-aligned place for `bytes` inside one of `usable` ranges that overlaps none of
/// `reserved`. Ranges are `[start, end)`. Prefers memory above 1 MiB.
pub fn place(usable: &[(u64, u64)], reserved: &[(u64, u64)], bytes: u64) -> Option<u64> {
    let bytes = bytes.div_ceil(FRAME_SIZE) * FRAME_SIZE;
    for &(start, end) in usable {
        let mut candidate = start.max(0x10_0000).next_multiple_of(FRAME_SIZE);
        'retry: loop {
            let stop = candidate.checked_add(bytes)?;
            if stop > end {
                break;
            }
            for &(rs, re) in reserved {
                if rs < stop && candidate < re {
                    candidate = re.next_multiple_of(FRAME_SIZE);
                    continue 'retry;
                }
            }
            return Some(candidate);
        }
    }
    None
}

/// A bitmap frame allocator over `[0, frames * 4 KiB)`.
#[derive(Debug)]
pub struct FrameAllocator<'a> {
    bits: &'a mut [u64],
    frames: u64,
    free: u64,
    usable: u64,
    /// Word to start the next search from.
    hint: usize,
}

impl<'a> FrameAllocator<'a> {
    /// An allocator covering physical memory below `top`, with every frame in use.
    /// `bits` must hold at least [`bitmap_bytes`]`(top)` bytes.
    pub fn new(bits: &'a mut [u64], top: u64) -> Self {
        let frames = top / FRAME_SIZE;
        assert!(
            bits.len() as u64 * 64 >= frames,
            "frame bitmap too small for {top:#x}"
        );
        bits.fill(0);
        FrameAllocator {
            bits,
            frames,
            free: 0,
            usable: 0,
            hint: 0,
        }
    }

    /// Frames currently free.
    pub fn free_frames(&self) -> u64 {
        self.free
    }

    /// Frames that were ever added as usable (free or allocated now).
    pub fn usable_frames(&self) -> u64 {
        self.usable
    }

    fn frame_range(&self, start: u64, end: u64, inward: bool) -> (u64, u64) {
        let (s, e) = if inward {
            (start.div_ceil(FRAME_SIZE), end / FRAME_SIZE)
        } else {
            (start / FRAME_SIZE, end.div_ceil(FRAME_SIZE))
        };
        (s.min(self.frames), e.min(self.frames))
    }

    fn is_free(&self, frame: u64) -> bool {
        self.bits[(frame / 64) as usize] & (1 << (frame % 64)) != 0
    }

    fn set(&mut self, frame: u64, free: bool) {
        let word = &mut self.bits[(frame / 64) as usize];
        let bit = 1u64 << (frame % 64);
        if free {
            *word |= bit;
        } else {
            *word &= !bit;
        }
    }

    /// Adds the whole frames inside `[start, end)` as free memory.
    pub fn add_free(&mut self, start: u64, end: u64) {
        let (s, e) = self.frame_range(start, end, true);
        for f in s..e {
            if !self.is_free(f) {
                self.set(f, true);
                self.free += 1;
                self.usable += 1;
            }
        }
    }

    /// Marks every frame touching `[start, end)` as in use for good.
    pub fn reserve(&mut self, start: u64, end: u64) {
        let (s, e) = self.frame_range(start, end, false);
        for f in s..e {
            if self.is_free(f) {
                self.set(f, false);
                self.free -= 1;
                self.usable -= 1;
            }
        }
    }

    /// One free frame, lowest address first from the search hint.
    pub fn alloc(&mut self) -> Option<FrameRun> {
        let words = self.bits.len();
        for i in 0..words {
            let w = (self.hint + i) % words;
            let word = self.bits[w];
            if word != 0 {
                let frame = w as u64 * 64 + u64::from(word.trailing_zeros());
                self.set(frame, false);
                self.free -= 1;
                self.hint = w;
                return Some(FrameRun {
                    start: HostPhysAddr(frame * FRAME_SIZE),
                    count: 1,
                });
            }
        }
        None
    }

    /// `count` contiguous free frames whose first address is a multiple of `align` bytes (a
    /// power of two, at least 4 KiB), below `limit`, as one run.
    pub fn alloc_contiguous(&mut self, count: u64, align: u64, limit: u64) -> Option<FrameRun> {
        assert!(align.is_power_of_two() && align >= FRAME_SIZE && count > 0);
        let step = align / FRAME_SIZE;
        let last = (limit / FRAME_SIZE).min(self.frames);
        let mut start = 0u64;
        while start + count <= last {
            match (start..start + count).find(|&f| !self.is_free(f)) {
                None => {
                    for f in start..start + count {
                        self.set(f, false);
                    }
                    self.free -= count;
                    return Some(FrameRun {
                        start: HostPhysAddr(start * FRAME_SIZE),
                        count,
                    });
                }
                Some(busy) => start = (busy + 1).next_multiple_of(step),
            }
        }
        None
    }

    /// Returns a run, whole. Every frame is checked first: if one is not allocated (a double
    /// free, or a run that was never ours) nothing changes and the error says which.
    pub fn free(&mut self, run: FrameRun) -> Result<(), FreeError> {
        let first = run.start.0 / FRAME_SIZE;
        for f in first..first + run.count {
            let addr = HostPhysAddr(f * FRAME_SIZE);
            if f >= self.frames {
                return Err(FreeError::OutOfRange(addr));
            }
            if self.is_free(f) {
                return Err(FreeError::NotAllocated(addr));
            }
        }
        for f in first..first + run.count {
            self.set(f, true);
        }
        self.free += run.count;
        Ok(())
    }
}

impl core::fmt::Display for FreeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FreeError::OutOfRange(a) => write!(f, "frame {a} is past physical memory"),
            FreeError::NotAllocated(a) => {
                write!(f, "frame {a} freed but not allocated (double free)")
            }
        }
    }
}

impl FrameRun {
    /// Re-owns frames whose address went through code that keeps plain addresses (the EPT
    /// builder's table list).
    ///
    /// # Safety
    ///
    /// `start..start + count` frames must be allocated, owned by the caller, and not owned by
    /// any other `FrameRun`.
    pub unsafe fn from_raw(start: HostPhysAddr, count: u64) -> FrameRun {
        FrameRun { start, count }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    const MIB: u64 = 1 << 20;

    fn with<R>(top: u64, f: impl FnOnce(&mut FrameAllocator) -> R) -> R {
        let mut bits = vec![0u64; (bitmap_bytes(top) / 8) as usize];
        let mut a = FrameAllocator::new(&mut bits, top);
        f(&mut a)
    }

    #[test]
    fn usable_minus_reserved() {
        with(64 * MIB, |a| {
            a.add_free(0, 0x9fc00); // partial last frame is dropped
            a.add_free(MIB, 64 * MIB);
            assert_eq!(a.free_frames(), 0x9f + (63 * MIB / FRAME_SIZE));
            a.reserve(0, MIB); // the first MiB is never handed out
            a.reserve(MIB, MIB + 5000); // the image: rounded outward to two frames
            assert_eq!(a.free_frames(), 63 * MIB / FRAME_SIZE - 2);
            let f = a.alloc().unwrap();
            assert_eq!(f.addr(), HostPhysAddr(MIB + 2 * FRAME_SIZE));
        });
    }

    #[test]
    fn no_frame_twice_and_double_free_refused() {
        with(4 * MIB, |a| {
            a.add_free(MIB, 2 * MIB);
            let mut seen = HashSet::new();
            let mut frames = Vec::new();
            while let Some(f) = a.alloc() {
                assert!(f.addr().is_frame_aligned());
                assert!(f.addr().0 >= MIB && f.addr().0 < 2 * MIB);
                assert!(seen.insert(f.addr()), "{:?} handed out twice", f.addr());
                frames.push(f);
            }
            assert_eq!(frames.len(), 256);
            assert_eq!(a.free_frames(), 0);
            let addr = frames[7].addr();
            a.free(frames.swap_remove(7)).unwrap();
            // SAFETY: (test) a forged run for a frame just freed, to show the double free.
            let again = unsafe { FrameRun::from_raw(addr, 1) };
            assert_eq!(a.free(again), Err(FreeError::NotAllocated(addr)));
            // SAFETY: (test) a forged run past the end of memory.
            let past = unsafe { FrameRun::from_raw(HostPhysAddr(64 * MIB), 1) };
            assert_eq!(
                a.free(past),
                Err(FreeError::OutOfRange(HostPhysAddr(64 * MIB)))
            );
            assert_eq!(a.alloc().unwrap().addr(), addr);
        });
    }

    #[test]
    fn contiguous_aligned_below_limit() {
        with(16 * MIB, |a| {
            a.add_free(MIB, 16 * MIB);
            a.reserve(2 * MIB + 4096, 2 * MIB + 8192);
            let run = a.alloc_contiguous(16, 2 * MIB, 16 * MIB).unwrap();
            // 2 MiB is blocked by the reserved frame, so the next 2 MiB boundary wins.
            assert_eq!(run.addr(), HostPhysAddr(4 * MIB));
            assert!(a.alloc_contiguous(4096, 4096, 16 * MIB).is_none());
            let low = a.alloc_contiguous(1, 4096, 2 * MIB).unwrap();
            assert!(low.addr().0 < 2 * MIB);
            let before = a.free_frames();
            assert_eq!((run.count(), run.bytes()), (16, 16 * FRAME_SIZE));
            a.free(run).unwrap();
            assert_eq!(a.free_frames(), before + 16);
            // Freeing it again is refused whole: nothing changes.
            drop(low);
            // SAFETY: (test) forged, for frames that are free again.
            let mixed = unsafe { FrameRun::from_raw(HostPhysAddr(4 * MIB), 2) };
            let free_now = a.free_frames();
            assert!(a.free(mixed).is_err());
            assert_eq!(a.free_frames(), free_now);
        });
    }

    #[test]
    fn placing_the_bitmap_avoids_reserved_ranges() {
        let usable = [(0, 0x9fc00), (MIB, 128 * MIB)];
        let reserved = [(MIB, 3 * MIB + 17), (4 * MIB, 5 * MIB)];
        let at = place(&usable, &reserved, MIB).unwrap();
        assert_eq!(at, 5 * MIB);
        let small = place(&usable, &reserved, 4096).unwrap();
        assert_eq!(small, 3 * MIB + 4096);
        assert_eq!(place(&usable, &reserved, 200 * MIB), None);
        assert_eq!(bitmap_bytes(4 << 30), 128 * 1024);
    }
}
