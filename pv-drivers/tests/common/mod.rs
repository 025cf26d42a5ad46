//! Host harness for pv-drivers against the hypervisor's device side: a DMA arena whose
//! "physical" addresses index one byte buffer that is also the device's guest RAM
//! ([`RawGuestMemory`]), a `Hal` over it, and a [`RegisterBus`] whose accesses go to the
//! hypervisor's [`MmioTransport`] state machine.
//!
//! Each test runs on its own thread and gets its own arena (thread-local, leaked on exit).
#![allow(dead_code)]
// Register values and config offsets here are small by construction.
#![allow(clippy::cast_possible_truncation)]

use std::alloc::Layout;
use std::cell::{Cell, RefCell};
use std::ptr::NonNull;
use std::rc::Rc;

use hv_virtio::mem::RawGuestMemory;
use hv_virtio::{MmioTransport, VirtioDevice};
use pv_drivers::transport::RegisterBus;
use virtio_drivers::{BufferDirection, Hal, PhysAddr};

/// Guest-physical address of the arena's first byte.
pub const GPA_BASE: u64 = 0x4000_0000;
/// Arena size.
pub const ARENA_SIZE: usize = 8 << 20;

thread_local! {
    static ARENA_BASE: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
    static ARENA_NEXT: Cell<usize> = const { Cell::new(0) };
}

/// This thread's arena (allocated zeroed on first use, never freed).
pub fn arena() -> *mut u8 {
    ARENA_BASE.with(|b| {
        if b.get().is_null() {
            let layout = Layout::from_size_align(ARENA_SIZE, 4096).unwrap();
            // SAFETY: the layout has a non-zero size.
            let p = unsafe { std::alloc::alloc_zeroed(layout) };
            assert!(!p.is_null());
            b.set(p);
        }
        b.get()
    })
}

/// The arena as the device side's guest RAM.
pub fn guest_memory() -> Rc<RawGuestMemory> {
    // SAFETY: the arena is valid for ARENA_SIZE bytes for the rest of the thread (it is never
    // freed), and everyone reaches it through raw pointers only.
    Rc::new(unsafe { RawGuestMemory::new(GPA_BASE, arena(), ARENA_SIZE) })
}

/// Bump-allocates `len` bytes aligned to `align`; never reused, so always zero.
fn alloc(len: usize, align: usize) -> (PhysAddr, NonNull<u8>) {
    let base = arena();
    let off = ARENA_NEXT.with(|n| {
        let off = n.get().next_multiple_of(align);
        assert!(off + len <= ARENA_SIZE, "test DMA arena exhausted");
        n.set(off + len);
        off
    });
    // SAFETY: `off + len <= ARENA_SIZE`, inside the arena allocation.
    let p = unsafe { base.add(off) };
    (GPA_BASE + off as u64, NonNull::new(p).unwrap())
}

fn host_ptr(paddr: PhysAddr) -> *mut u8 {
    let off = usize::try_from(paddr - GPA_BASE).unwrap();
    assert!(off < ARENA_SIZE);
    // SAFETY: `off` is inside the arena.
    unsafe { arena().add(off) }
}

/// `Hal` over the arena: DMA pages come from it, shared buffers bounce through it.
pub struct ArenaHal;

// SAFETY: `dma_alloc` returns page-aligned, zeroed, never-aliased arena memory (bump
// allocation, never reused); `share` returns the address of a fresh bounce copy.
unsafe impl Hal for ArenaHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        alloc(pages * 4096, 4096)
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, _vaddr: NonNull<u8>, _pages: usize) -> i32 {
        0
    }

    unsafe fn mmio_phys_to_virt(_paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        unreachable!("register-level transport: no MMIO mappings")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        let len = buffer.len();
        let (pa, p) = alloc(len.max(1), 16);
        // SAFETY: the caller guarantees `buffer` is valid for `len` bytes; `p` is a fresh
        // arena range of that length.
        unsafe { std::ptr::copy_nonoverlapping(buffer.as_ptr().cast::<u8>(), p.as_ptr(), len) };
        pa
    }

    unsafe fn unshare(paddr: PhysAddr, buffer: NonNull<[u8]>, direction: BufferDirection) {
        if direction != BufferDirection::DriverToDevice {
            // SAFETY: `paddr` came from `share` for this buffer, so the bounce copy has the
            // same length; the caller guarantees `buffer` is valid and unaliased.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    host_ptr(paddr),
                    buffer.as_ptr().cast::<u8>(),
                    buffer.len(),
                )
            };
        }
    }
}

/// The hypervisor's register state machine as the bus under our transport.
pub struct DeviceBus<D: VirtioDevice> {
    pub dev: Rc<RefCell<MmioTransport<D>>>,
    pub mem: Rc<RawGuestMemory>,
}

impl<D: VirtioDevice> RegisterBus for DeviceBus<D> {
    fn read(&self, offset: u64, size: u8) -> u64 {
        self.dev.borrow_mut().read(offset, size)
    }
    fn write(&mut self, offset: u64, size: u8, value: u64) {
        self.dev.borrow_mut().write(&*self.mem, offset, size, value);
    }
}
