//! Guest memory as the device side sees it: guest-physical addresses as a newtype and a
//! checked access trait.
//!
//! The device side never forms a Rust reference into guest memory: every access is a copy of
//! bytes through [`GuestMemory`], whose implementations check that the whole range lies inside
//! guest RAM (with checked arithmetic) before touching anything. A driver may change the bytes
//! at any moment, so every value read is an allegation until the caller has checked it.
//!
//! Ordering: ring indices are published with [`GuestMemory::fence_acquire`] /
//! [`GuestMemory::fence_release`] between the accesses that the virtio memory model orders
//! (virtio 1.2 §2.7.13.3.1 and §2.7.8.2).

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
}
