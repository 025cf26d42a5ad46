//! `hv-guest-mem`: guest memory as the hypervisor reaches it — the one layer its exit
//! dispatcher, its ELF loader and its virtio device models (`hv-virtio`) all use.
//!
//! - [`GuestAddr`]: a guest-physical address, an allegation with checked arithmetic.
//! - [`GuestMemory`]: checked access. No Rust reference into guest memory is ever formed:
//!   every access is a copy of bytes, and implementations check that the whole range lies
//!   inside guest RAM (checked arithmetic) before touching anything. A guest may change the
//!   bytes at any moment, so every value read is an allegation until the caller has checked it.
//! - [`RegionRam`]: a domain's RAM as a list of host regions (today one per 2 MiB chunk; later
//!   4 KiB frames for sharing and ballooning). Aligned reads of 2, 4 or 8 bytes (ring indices,
//!   descriptor fields) are single volatile loads, so a racing guest can make them stale but
//!   never torn; every write can be reported to a [`DirtyLog`] (for live migration).
//! - [`RawGuestMemory`] (one contiguous mapping) and [`VecGuestMemory`] (owned bytes, for tests,
//!   fuzzing and offline tools).
//!
//! Written here rather than taken from rust-vmm's `vm-memory`: that crate needs `std` (mmap
//! regions, file offsets), and the hypervisor is `no_std`.
//!
//! Ordering: ring indices are published with [`GuestMemory::fence_acquire`] /
//! [`GuestMemory::fence_release`] between the accesses that the virtio memory model orders
//! (virtio 1.2 §2.7.13.3.1 and §2.7.8.2).
#![cfg_attr(not(test), no_std)]
// Offsets into a region are below its length, which `RegionRam::new` checked fits `usize`;
// buffer lengths are `usize` already. The `as usize` casts below cannot truncate.
#![allow(clippy::cast_possible_truncation)]

extern crate alloc;

use core::fmt;
use core::sync::atomic::{Ordering, fence};

/// A guest-physical address. Arithmetic on it is checked: an overflow is a malformed request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GuestAddr(pub u64);

impl GuestAddr {
    /// `self + off`, or `None` on overflow of the 64-bit guest-physical space.
    #[inline]
    pub fn checked_add(self, off: u64) -> Option<GuestAddr> {
        self.0.checked_add(off).map(GuestAddr)
    }

    /// The raw value.
    #[inline]
    pub fn raw(self) -> u64 {
        self.0
    }

    /// Whether the address is a multiple of `align` (a power of two).
    #[inline]
    pub fn is_aligned(self, align: u64) -> bool {
        debug_assert!(align.is_power_of_two());
        self.0 & (align - 1) == 0
    }
}

/// Why a guest memory access was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemError {
    /// Some byte of `[addr, addr + len)` is not guest RAM (or the range wraps).
    OutOfRange { addr: u64, len: u64 },
}

impl fmt::Display for MemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemError::OutOfRange { addr, len } => {
                write!(f, "guest range {addr:#x}+{len:#x} is outside guest RAM")
            }
        }
    }
}

/// Checked access to one guest's physical memory.
///
/// Implementations must refuse, without side effects, any access where a byte of the range
/// is not guest RAM that this device may touch. Writes take `&self` because guest memory is
/// shared with the guest's vCPUs anyway: it is never exclusively ours.
pub trait GuestMemory {
    /// Copies `buf.len()` bytes at `addr` into `buf`.
    fn read(&self, addr: GuestAddr, buf: &mut [u8]) -> Result<(), MemError>;
    /// Copies `buf` to guest memory at `addr`.
    fn write(&self, addr: GuestAddr, buf: &[u8]) -> Result<(), MemError>;
    /// Checks, without touching it, that `[addr, addr + len)` is guest RAM.
    fn check(&self, addr: GuestAddr, len: u64) -> Result<(), MemError>;
    /// One past the highest guest-physical address of RAM (for RAM from 0: its size).
    fn end(&self) -> u64;

    /// Zeroes `[addr, addr + len)` (checked first as a whole).
    fn zero(&self, addr: GuestAddr, len: u64) -> Result<(), MemError> {
        self.check(addr, len)?;
        let zeros = [0u8; 512];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(512);
            self.write(GuestAddr(addr.0 + done), &zeros[..n as usize])?;
            done += n;
        }
        Ok(())
    }

    /// Orders earlier reads before later reads and writes (driver's writes seen by then).
    #[inline]
    fn fence_acquire(&self) {
        fence(Ordering::Acquire);
    }
    /// Orders earlier writes before later writes (ring entry before ring index).
    #[inline]
    fn fence_release(&self) {
        fence(Ordering::Release);
    }
    /// Full barrier: a store (e.g. `avail_event`) before a later load (the avail index).
    #[inline]
    fn fence_full(&self) {
        fence(Ordering::SeqCst);
    }

    /// Reads a little-endian `u16`.
    #[inline]
    fn read_u16(&self, addr: GuestAddr) -> Result<u16, MemError> {
        let mut b = [0u8; 2];
        self.read(addr, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }
    /// Reads a little-endian `u32`.
    #[inline]
    fn read_u32(&self, addr: GuestAddr) -> Result<u32, MemError> {
        let mut b = [0u8; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    /// Reads a little-endian `u64`.
    #[inline]
    fn read_u64(&self, addr: GuestAddr) -> Result<u64, MemError> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    /// Writes a little-endian `u16`.
    #[inline]
    fn write_u16(&self, addr: GuestAddr, v: u16) -> Result<(), MemError> {
        self.write(addr, &v.to_le_bytes())
    }
    /// Writes a little-endian `u32`.
    #[inline]
    fn write_u32(&self, addr: GuestAddr, v: u32) -> Result<(), MemError> {
        self.write(addr, &v.to_le_bytes())
    }
}

impl<M: GuestMemory + ?Sized> GuestMemory for &M {
    #[inline]
    fn read(&self, addr: GuestAddr, buf: &mut [u8]) -> Result<(), MemError> {
        (**self).read(addr, buf)
    }
    #[inline]
    fn write(&self, addr: GuestAddr, buf: &[u8]) -> Result<(), MemError> {
        (**self).write(addr, buf)
    }
    #[inline]
    fn check(&self, addr: GuestAddr, len: u64) -> Result<(), MemError> {
        (**self).check(addr, len)
    }
    #[inline]
    fn end(&self) -> u64 {
        (**self).end()
    }
    #[inline]
    fn read_u16(&self, addr: GuestAddr) -> Result<u16, MemError> {
        (**self).read_u16(addr)
    }
    #[inline]
    fn read_u32(&self, addr: GuestAddr) -> Result<u32, MemError> {
        (**self).read_u32(addr)
    }
    #[inline]
    fn read_u64(&self, addr: GuestAddr) -> Result<u64, MemError> {
        (**self).read_u64(addr)
    }
}

/// Checks that `[addr, addr + len)` lies inside `[base, base + size)`; returns the offset.
#[inline]
pub fn range_offset(base: u64, size: u64, addr: GuestAddr, len: usize) -> Result<usize, MemError> {
    range_offset64(base, size, addr, len as u64)
}

/// As [`range_offset`] with a 64-bit length.
#[inline]
pub fn range_offset64(
    base: u64,
    size: u64,
    addr: GuestAddr,
    len64: u64,
) -> Result<usize, MemError> {
    let err = MemError::OutOfRange {
        addr: addr.0,
        len: len64,
    };
    let off = addr.0.checked_sub(base).ok_or(err)?;
    let end = off.checked_add(len64).ok_or(err)?;
    if end > size {
        return Err(err);
    }
    usize::try_from(off).map_err(|_| err)
}

/// Guest RAM that is one contiguous host mapping: `[base_gpa, base_gpa + len)` is at
/// `host_ptr` in our address space. The hypervisor builds one per domain RAM region; host
/// tests build one over a buffer that a driver also writes through raw pointers.
///
/// Accesses are byte copies through raw pointers (no references are ever formed), so a guest
/// writing concurrently can only make us read stale or torn values, which the callers treat
/// as allegations anyway.
pub struct RawGuestMemory {
    base_gpa: u64,
    host_ptr: *mut u8,
    len: usize,
}

// SAFETY: the region is plain bytes with no thread affinity; `RawGuestMemory::new`'s contract
// makes it valid for its whole life, and every access is a bounds-checked raw copy.
unsafe impl Send for RawGuestMemory {}
// SAFETY: as above; shared access only copies bytes, racing guest writes give stale values,
// never a Rust reference to changing memory.
unsafe impl Sync for RawGuestMemory {}

impl RawGuestMemory {
    /// Describes guest RAM `[base_gpa, base_gpa + len)` mapped at `host_ptr`.
    ///
    /// # Safety
    ///
    /// `host_ptr` must be valid for reads and writes of `len` bytes for as long as the
    /// returned value (and anything holding it) lives, and nothing may hold a Rust reference
    /// into that range while it does (others may access it through raw pointers).
    pub unsafe fn new(base_gpa: u64, host_ptr: *mut u8, len: usize) -> RawGuestMemory {
        RawGuestMemory {
            base_gpa,
            host_ptr,
            len,
        }
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl GuestMemory for RawGuestMemory {
    #[inline]
    fn read(&self, addr: GuestAddr, buf: &mut [u8]) -> Result<(), MemError> {
        let off = range_offset(self.base_gpa, self.len as u64, addr, buf.len())?;
        // SAFETY: `range_offset` proved `[off, off + buf.len())` lies inside the region that
        // `new`'s contract makes valid; `buf` is our own memory, disjoint from guest RAM.
        unsafe {
            core::ptr::copy_nonoverlapping(self.host_ptr.add(off), buf.as_mut_ptr(), buf.len());
        }
        Ok(())
    }

    #[inline]
    fn write(&self, addr: GuestAddr, buf: &[u8]) -> Result<(), MemError> {
        let off = range_offset(self.base_gpa, self.len as u64, addr, buf.len())?;
        // SAFETY: as in `read`: the range was checked against the region valid by contract.
        unsafe {
            core::ptr::copy_nonoverlapping(buf.as_ptr(), self.host_ptr.add(off), buf.len());
        }
        Ok(())
    }

    #[inline]
    fn check(&self, addr: GuestAddr, len: u64) -> Result<(), MemError> {
        range_offset64(self.base_gpa, self.len as u64, addr, len).map(|_| ())
    }

    fn end(&self) -> u64 {
        self.base_gpa + self.len as u64
    }
}

/// Guest RAM held in an owned byte vector (tests, fuzzing, offline tools). Interior
/// mutability through `RefCell` keeps the `&self` write signature without any `unsafe`.
pub struct VecGuestMemory {
    base_gpa: u64,
    bytes: core::cell::RefCell<alloc::vec::Vec<u8>>,
}

impl VecGuestMemory {
    /// `size` zeroed bytes of guest RAM starting at `base_gpa`.
    pub fn new(base_gpa: u64, size: usize) -> VecGuestMemory {
        VecGuestMemory {
            base_gpa,
            bytes: core::cell::RefCell::new(alloc::vec![0; size]),
        }
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.bytes.borrow().len()
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl GuestMemory for VecGuestMemory {
    fn read(&self, addr: GuestAddr, buf: &mut [u8]) -> Result<(), MemError> {
        let bytes = self.bytes.borrow();
        let off = range_offset(self.base_gpa, bytes.len() as u64, addr, buf.len())?;
        buf.copy_from_slice(&bytes[off..off + buf.len()]);
        Ok(())
    }

    fn write(&self, addr: GuestAddr, buf: &[u8]) -> Result<(), MemError> {
        let mut bytes = self.bytes.borrow_mut();
        let off = range_offset(self.base_gpa, bytes.len() as u64, addr, buf.len())?;
        bytes[off..off + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn check(&self, addr: GuestAddr, len: u64) -> Result<(), MemError> {
        let size = self.bytes.borrow().len() as u64;
        range_offset64(self.base_gpa, size, addr, len).map(|_| ())
    }

    fn end(&self) -> u64 {
        self.base_gpa + self.bytes.borrow().len() as u64
    }
}

impl VecGuestMemory {
    /// A copy of the bytes (for tests that look at what was written).
    pub fn to_vec(&self) -> alloc::vec::Vec<u8> {
        self.bytes.borrow().clone()
    }
}

/// Told about every write to guest RAM through a [`RegionRam`] (dirty logging for live
/// migration: the pages written by the hypervisor on a guest's behalf count too).
pub trait DirtyLog: Send + Sync {
    /// `[addr, addr + len)` was written.
    fn written(&self, addr: u64, len: u64);
}

/// One host region of guest RAM: guest-physical `gpa..gpa + len` at host address `host`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub gpa: u64,
    pub host: *mut u8,
    pub len: u64,
}

/// A domain's RAM: host regions, sorted by guest-physical address and disjoint (gaps are not
/// RAM). Accesses may span regions; each piece is checked and copied on its own.
pub struct RegionRam {
    regions: alloc::vec::Vec<Region>,
    dirty: Option<alloc::boxed::Box<dyn DirtyLog>>,
}

// SAFETY: the regions are plain bytes with no thread affinity, valid for the value's life by
// `RegionRam::new`'s contract; every access is a bounds-checked raw copy or volatile load.
unsafe impl Send for RegionRam {}
// SAFETY: as above; shared access only copies bytes (racing guest writes give stale values,
// never a Rust reference to changing memory); the dirty log is Sync itself.
unsafe impl Sync for RegionRam {}

impl core::fmt::Debug for RegionRam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegionRam")
            .field("regions", &self.regions.len())
            .field("end", &self.end())
            .finish()
    }
}

/// Why regions cannot form a RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionError {
    /// Regions out of order, overlapping, empty, or past the end of the address space.
    Layout { index: usize },
}

impl RegionRam {
    /// RAM made of `regions`.
    ///
    /// # Safety
    ///
    /// Each region's `host..host + len` must be valid for reads and writes for as long as the
    /// returned value lives, owned by this guest (no other domain's, nor the hypervisor's own
    /// data), and nothing may hold a Rust reference into it meanwhile (the guest and other
    /// users reach it through raw pointers only).
    pub unsafe fn new(regions: alloc::vec::Vec<Region>) -> Result<RegionRam, RegionError> {
        let mut end = 0u64;
        for (index, r) in regions.iter().enumerate() {
            let last = r.gpa.checked_add(r.len);
            if r.len == 0 || r.gpa < end || last.is_none() || usize::try_from(r.len).is_err() {
                return Err(RegionError::Layout { index });
            }
            end = last.unwrap_or(u64::MAX);
        }
        Ok(RegionRam {
            regions,
            dirty: None,
        })
    }

    /// Reports every later write to `log`.
    pub fn set_dirty_log(&mut self, log: alloc::boxed::Box<dyn DirtyLog>) {
        self.dirty = Some(log);
    }

    /// The regions, in order.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// The host address of `addr..addr + len` when the whole range lies in one region (one
    /// host-contiguous piece): what a device doing DMA for the guest's owner needs.
    pub fn host_contiguous(&self, addr: GuestAddr, len: u64) -> Option<u64> {
        let r = self.region(addr.0)?;
        let off = addr.0 - r.gpa;
        (len != 0 && off.checked_add(len)? <= r.len).then(|| r.host as u64 + off)
    }

    /// The region holding `addr`, if any.
    fn region(&self, addr: u64) -> Option<&Region> {
        let i = self.regions.partition_point(|r| r.gpa <= addr);
        let r = self.regions.get(i.checked_sub(1)?)?;
        (addr - r.gpa < r.len).then_some(r)
    }

    /// Calls `f(host pointer, offset in the caller's buffer, length)` for each piece of
    /// `[addr, addr + len)`, after checking that all of it is RAM.
    fn pieces(
        &self,
        addr: GuestAddr,
        len: u64,
        mut f: impl FnMut(*mut u8, usize, usize),
    ) -> Result<(), MemError> {
        self.check(addr, len)?;
        let mut done = 0u64;
        while done < len {
            let at = addr.0 + done;
            let r = self
                .region(at)
                .ok_or(MemError::OutOfRange { addr: addr.0, len })?;
            let off = at - r.gpa;
            let n = (r.len - off).min(len - done);
            // SAFETY: `off < r.len` and the region is valid for `r.len` bytes by `new`'s
            // contract, so the pointer stays inside it; `f` copies `n <= r.len - off` bytes.
            let p = unsafe { r.host.add(off as usize) };
            f(p, done as usize, n as usize);
            done += n;
        }
        Ok(())
    }

    /// A single aligned volatile load of `N` bytes inside one region, if `addr` is aligned.
    #[inline]
    fn load<const N: usize>(&self, addr: GuestAddr) -> Option<Result<[u8; N], MemError>> {
        if !addr.0.is_multiple_of(N as u64) {
            return None;
        }
        let Some(r) = self.region(addr.0) else {
            return Some(Err(MemError::OutOfRange {
                addr: addr.0,
                len: N as u64,
            }));
        };
        let off = addr.0 - r.gpa;
        if off + N as u64 > r.len {
            return None; // straddles regions: the byte copy handles it
        }
        // SAFETY: `off + N <= r.len` (checked above), so the pointer stays inside the region
        // that `new`'s contract makes valid.
        let p = unsafe { r.host.add(off as usize) };
        if !(p as usize).is_multiple_of(N) {
            return None;
        }
        // SAFETY: `p..p + N` is inside the region and `p` is N-aligned (checked): one volatile
        // load of N bytes, which the CPU performs as a single access for N = 2, 4, 8.
        Some(Ok(unsafe { core::ptr::read_volatile(p.cast::<[u8; N]>()) }))
    }
}

impl GuestMemory for RegionRam {
    fn read(&self, addr: GuestAddr, buf: &mut [u8]) -> Result<(), MemError> {
        let dst = buf.as_mut_ptr();
        self.pieces(addr, buf.len() as u64, |host, at, n| {
            // SAFETY: `pieces` checked the guest range; `buf[at..at + n]` is ours and disjoint
            // from guest RAM.
            unsafe { core::ptr::copy_nonoverlapping(host, dst.add(at), n) };
        })
    }

    fn write(&self, addr: GuestAddr, buf: &[u8]) -> Result<(), MemError> {
        let src = buf.as_ptr();
        self.pieces(addr, buf.len() as u64, |host, at, n| {
            // SAFETY: as in `read`, the other way.
            unsafe { core::ptr::copy_nonoverlapping(src.add(at), host, n) };
        })?;
        if let Some(d) = &self.dirty {
            d.written(addr.0, buf.len() as u64);
        }
        Ok(())
    }

    fn check(&self, addr: GuestAddr, len: u64) -> Result<(), MemError> {
        let err = MemError::OutOfRange { addr: addr.0, len };
        let end = addr.0.checked_add(len).ok_or(err)?;
        let mut at = addr.0;
        while at < end {
            let r = self.region(at).ok_or(err)?;
            at = r.gpa + r.len;
        }
        Ok(())
    }

    fn end(&self) -> u64 {
        self.regions.last().map_or(0, |r| r.gpa + r.len)
    }

    #[inline]
    fn read_u16(&self, addr: GuestAddr) -> Result<u16, MemError> {
        match self.load::<2>(addr) {
            Some(r) => r.map(u16::from_le_bytes),
            None => {
                let mut b = [0u8; 2];
                self.read(addr, &mut b)?;
                Ok(u16::from_le_bytes(b))
            }
        }
    }

    #[inline]
    fn read_u32(&self, addr: GuestAddr) -> Result<u32, MemError> {
        match self.load::<4>(addr) {
            Some(r) => r.map(u32::from_le_bytes),
            None => {
                let mut b = [0u8; 4];
                self.read(addr, &mut b)?;
                Ok(u32::from_le_bytes(b))
            }
        }
    }

    #[inline]
    fn read_u64(&self, addr: GuestAddr) -> Result<u64, MemError> {
        match self.load::<8>(addr) {
            Some(r) => r.map(u64::from_le_bytes),
            None => {
                let mut b = [0u8; 8];
                self.read(addr, &mut b)?;
                Ok(u64::from_le_bytes(b))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_checks_refuse_edges_and_wraps() {
        let m = VecGuestMemory::new(0x1000, 0x100);
        let mut b = [0u8; 4];
        assert!(m.read(GuestAddr(0x1000), &mut b).is_ok());
        assert!(m.read(GuestAddr(0x10fc), &mut b).is_ok());
        assert!(m.read(GuestAddr(0x10fd), &mut b).is_err());
        assert!(m.read(GuestAddr(0xfff), &mut b).is_err());
        assert!(m.read(GuestAddr(u64::MAX - 1), &mut b).is_err());
        assert!(m.write(GuestAddr(0x1100), &[]).is_ok());
        assert!(m.write(GuestAddr(0x1101), &[]).is_err());
    }

    struct Log(std::sync::Mutex<std::vec::Vec<(u64, u64)>>);

    impl DirtyLog for Log {
        fn written(&self, addr: u64, len: u64) {
            self.0.lock().unwrap().push((addr, len));
        }
    }

    /// Two 64 KiB regions with a hole between them (guest 0..64K and 128K..192K).
    fn two(buf: &mut [u64]) -> RegionRam {
        let p = buf.as_mut_ptr().cast::<u8>();
        // SAFETY: `buf` is 256 KiB, outlives the RAM in every test, and is only reached
        // through it.
        unsafe {
            RegionRam::new(std::vec![
                Region {
                    gpa: 0,
                    host: p,
                    len: 64 << 10,
                },
                Region {
                    gpa: 128 << 10,
                    host: p.add(64 << 10),
                    len: 64 << 10,
                },
            ])
            .unwrap()
        }
    }

    #[test]
    fn regions_bounds_holes_and_spans() {
        let mut buf = std::vec![0u64; 32 << 10];
        let mut ram = two(&mut buf);
        assert_eq!(ram.end(), 192 << 10);
        ram.write(GuestAddr(0x10), b"abc").unwrap();
        let mut b = [0u8; 3];
        ram.read(GuestAddr(0x10), &mut b).unwrap();
        assert_eq!(&b, b"abc");
        // The hole is not RAM, nor is a range running into it or past the end.
        assert!(ram.read(GuestAddr(64 << 10), &mut b).is_err());
        assert!(ram.read(GuestAddr((64 << 10) - 2), &mut b).is_err());
        assert!(ram.read(GuestAddr((192 << 10) - 2), &mut b).is_err());
        assert!(ram.check(GuestAddr(u64::MAX - 1), 4).is_err());
        assert!(
            ram.zero(GuestAddr(0), 128 << 10).is_err(),
            "the hole is inside the range"
        );
        // Adjacent regions: a copy spans them.
        let p = buf.as_mut_ptr().cast::<u8>();
        // SAFETY: as in `two`.
        let adj = unsafe {
            RegionRam::new(std::vec![
                Region {
                    gpa: 0,
                    host: p,
                    len: 4096
                },
                Region {
                    gpa: 4096,
                    host: p.add(8192),
                    len: 4096
                },
            ])
            .unwrap()
        };
        adj.write(GuestAddr(4094), &[1, 2, 3, 4]).unwrap();
        let mut b4 = [0u8; 4];
        adj.read(GuestAddr(4094), &mut b4).unwrap();
        assert_eq!(b4, [1, 2, 3, 4]);
        // The pieces went to the two host places.
        // SAFETY: the RAMs are done writing; `buf` is 256 KiB.
        let bytes: &[u8] = unsafe { core::slice::from_raw_parts(p, 12 << 10) };
        assert_eq!(&bytes[4094..4096], &[1, 2]);
        assert_eq!(&bytes[8192..8194], &[3, 4]);
        assert_eq!(
            adj.read_u32(GuestAddr(4094)).unwrap(),
            u32::from_le_bytes([1, 2, 3, 4])
        );
        // DMA needs one host-contiguous piece: inside a region, never across two.
        assert_eq!(
            adj.host_contiguous(GuestAddr(100), 3996),
            Some(p as u64 + 100)
        );
        assert_eq!(
            adj.host_contiguous(GuestAddr(4000), 200),
            None,
            "spans two regions"
        );
        assert_eq!(
            adj.host_contiguous(GuestAddr(4096), 4096),
            Some(p as u64 + 8192)
        );
        assert_eq!(adj.host_contiguous(GuestAddr(4096), 4097), None);
        assert_eq!(
            adj.host_contiguous(GuestAddr(8192), 1),
            None,
            "beyond the RAM"
        );
        assert_eq!(adj.host_contiguous(GuestAddr(0), 0), None);
        ram.set_dirty_log(std::boxed::Box::new(Log(Default::default())));
    }

    #[test]
    fn bad_layouts_are_refused() {
        let mut buf = std::vec![0u8; 8192];
        let p = buf.as_mut_ptr();
        let r = |gpa, len| Region { gpa, host: p, len };
        // SAFETY: these are refused before any access.
        unsafe {
            assert!(
                RegionRam::new(std::vec![r(4096, 4096), r(0, 4096)]).is_err(),
                "order"
            );
            assert!(
                RegionRam::new(std::vec![r(0, 4096), r(2048, 4096)]).is_err(),
                "overlap"
            );
            assert!(RegionRam::new(std::vec![r(0, 0)]).is_err(), "empty");
            assert!(
                RegionRam::new(std::vec![r(u64::MAX - 10, 4096)]).is_err(),
                "wraps"
            );
        }
    }

    #[test]
    fn writes_are_reported_to_the_dirty_log() {
        let mut buf = std::vec![0u64; 32 << 10];
        let mut ram = two(&mut buf);
        let log = std::sync::Arc::new(Log(Default::default()));
        struct Shared(std::sync::Arc<Log>);
        impl DirtyLog for Shared {
            fn written(&self, addr: u64, len: u64) {
                self.0.written(addr, len);
            }
        }
        ram.set_dirty_log(std::boxed::Box::new(Shared(log.clone())));
        ram.write(GuestAddr(0x2000), &[7; 16]).unwrap();
        ram.write_u32(GuestAddr(130 << 10), 9).unwrap();
        assert!(ram.write(GuestAddr(70 << 10), &[1]).is_err());
        assert_eq!(
            *log.0.lock().unwrap(),
            std::vec![(0x2000, 16), (130 << 10, 4)]
        );
        // Aligned small reads take the single-load path and agree with the copies.
        assert_eq!(ram.read_u32(GuestAddr(130 << 10)).unwrap(), 9);
        assert_eq!(
            ram.read_u64(GuestAddr(0x2000)).unwrap(),
            0x0707_0707_0707_0707
        );
        assert_eq!(
            ram.read_u16(GuestAddr(0x2001)).unwrap(),
            0x0707,
            "unaligned: copy path"
        );
        assert!(ram.read_u16(GuestAddr(64 << 10)).is_err());
    }
}
