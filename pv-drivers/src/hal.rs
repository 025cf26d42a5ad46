//! DMA for guests whose kernel runs identity-mapped (virtual address == guest-physical
//! address), which is how our Rust test guests and dom0's low memory are set up.
//!
//! [`IdentityHal`] allocates DMA pages from the global allocator and hands their addresses
//! to the device unchanged; sharing a buffer is free (the device reads it in place through
//! the hypervisor's checked guest-memory accesses). The identity assumption is the ambient
//! condition every use of this type relies on: it is stated once here and the driver
//! constructors that take it are only called by code that set that mapping up.

use core::alloc::Layout;
use core::ptr::NonNull;

use virtio_drivers::{BufferDirection, Hal, PhysAddr};

/// Page size of DMA allocations.
pub const PAGE: usize = 4096;

/// `Hal` for identity-mapped guests.
pub struct IdentityHal;

fn layout(pages: usize) -> Option<Layout> {
    Layout::from_size_align(pages.checked_mul(PAGE)?, PAGE).ok()
}

// SAFETY: `dma_alloc` returns fresh, zeroed, page-aligned memory from the global allocator
// (never aliased until `dma_dealloc`), and in an identity-mapped guest its address is also
// its guest-physical address; `share` returns the buffer's own address for the same reason.
unsafe impl Hal for IdentityHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let Some(l) = layout(pages).filter(|l| l.size() > 0) else {
            return (0, NonNull::dangling());
        };
        // SAFETY: `l` has a non-zero size.
        let p = unsafe { alloc::alloc::alloc_zeroed(l) };
        match NonNull::new(p) {
            Some(p) => (p.as_ptr() as PhysAddr, p),
            // `Dma::new` treats a zero physical address as allocation failure.
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        let Some(l) = layout(pages) else { return -1 };
        // SAFETY: the caller passes back what `dma_alloc` returned for `pages` pages, which
        // came from `alloc_zeroed` with this same layout.
        unsafe { alloc::alloc::dealloc(vaddr.as_ptr(), l) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        // Identity mapping: the physical address is the virtual one.
        NonNull::new(paddr as *mut u8).unwrap_or(NonNull::dangling())
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.cast::<u8>().as_ptr() as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}
