//! Host harness that lets the `virtio-drivers` crate (an independent driver implementation)
//! drive our device side: a DMA arena whose "physical" addresses index one byte buffer that
//! is also the device's guest RAM ([`RawGuestMemory`]), a `Hal` over it, and a `Transport`
//! whose register reads and writes go to our [`MmioTransport`] state machine.
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
use hv_virtio::transport::reg;
use hv_virtio::{MmioTransport, VirtioDevice};
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{BufferDirection, Error, Hal, PhysAddr};
use zerocopy::{FromBytes, Immutable, IntoBytes};

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

/// A `virtio-drivers` transport whose registers are our MMIO state machine.
pub struct RegTransport<D: VirtioDevice> {
    pub dev: Rc<RefCell<MmioTransport<D>>>,
    pub mem: Rc<RawGuestMemory>,
    /// Runs after each queue notification: a backend on "another CPU" serving what the
    /// notification handed it, so the driver's blocking calls can complete.
    pub after_notify: Option<Rc<dyn Fn()>>,
}

impl<D: VirtioDevice> RegTransport<D> {
    pub fn new(dev: Rc<RefCell<MmioTransport<D>>>, mem: Rc<RawGuestMemory>) -> Self {
        RegTransport {
            dev,
            mem,
            after_notify: None,
        }
    }
    fn r32(&self, off: u64) -> u32 {
        u32::try_from(self.dev.borrow_mut().read(off, 4)).unwrap()
    }
    fn w32(&self, off: u64, v: u32) {
        self.dev
            .borrow_mut()
            .write(&*self.mem, off, 4, u64::from(v));
    }
}

impl<D: VirtioDevice> Transport for RegTransport<D> {
    fn device_type(&self) -> DeviceType {
        assert_eq!(self.r32(reg::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(self.r32(reg::VERSION), 2);
        DeviceType::try_from(self.r32(reg::DEVICE_ID)).unwrap()
    }
    fn read_device_features(&mut self) -> u64 {
        self.w32(reg::DEVICE_FEATURES_SEL, 0);
        let lo = self.r32(reg::DEVICE_FEATURES);
        self.w32(reg::DEVICE_FEATURES_SEL, 1);
        let hi = self.r32(reg::DEVICE_FEATURES);
        u64::from(lo) | u64::from(hi) << 32
    }
    fn write_driver_features(&mut self, f: u64) {
        self.w32(reg::DRIVER_FEATURES_SEL, 0);
        self.w32(reg::DRIVER_FEATURES, f as u32);
        self.w32(reg::DRIVER_FEATURES_SEL, 1);
        self.w32(reg::DRIVER_FEATURES, (f >> 32) as u32);
    }
    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.w32(reg::QUEUE_SEL, u32::from(queue));
        self.r32(reg::QUEUE_NUM_MAX)
    }
    fn notify(&mut self, queue: u16) {
        self.w32(reg::QUEUE_NOTIFY, u32::from(queue));
        if let Some(f) = &self.after_notify {
            f();
        }
    }
    fn get_status(&self) -> DeviceStatus {
        DeviceStatus::from_bits_truncate(self.r32(reg::STATUS))
    }
    fn set_status(&mut self, status: DeviceStatus) {
        self.w32(reg::STATUS, status.bits());
    }
    fn set_guest_page_size(&mut self, _guest_page_size: u32) {}
    fn requires_legacy_layout(&self) -> bool {
        false
    }
    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        self.w32(reg::QUEUE_SEL, u32::from(queue));
        self.w32(reg::QUEUE_NUM, size);
        for (lo, addr) in [
            (reg::QUEUE_DESC_LOW, descriptors),
            (reg::QUEUE_DRIVER_LOW, driver_area),
            (reg::QUEUE_DEVICE_LOW, device_area),
        ] {
            self.w32(lo, addr as u32);
            self.w32(lo + 4, (addr >> 32) as u32);
        }
        self.w32(reg::QUEUE_READY, 1);
    }
    fn queue_unset(&mut self, queue: u16) {
        self.w32(reg::QUEUE_SEL, u32::from(queue));
        self.w32(reg::QUEUE_READY, 0);
    }
    fn queue_used(&mut self, queue: u16) -> bool {
        self.w32(reg::QUEUE_SEL, u32::from(queue));
        self.r32(reg::QUEUE_READY) != 0
    }
    fn ack_interrupt(&mut self) -> InterruptStatus {
        let s = self.r32(reg::INTERRUPT_STATUS);
        self.w32(reg::INTERRUPT_ACK, s);
        InterruptStatus::from_bits_truncate(s)
    }
    fn read_config_generation(&self) -> u32 {
        self.r32(reg::CONFIG_GENERATION)
    }
    fn read_config_space<T: FromBytes + IntoBytes>(&self, offset: usize) -> Result<T, Error> {
        let size = size_of::<T>();
        let mut buf = vec![0u8; size];
        let base = reg::CONFIG + offset as u64;
        if matches!(size, 1 | 2 | 4 | 8) {
            let v = self.dev.borrow_mut().read(base, size as u8);
            buf.copy_from_slice(&v.to_le_bytes()[..size]);
        } else {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = self.dev.borrow_mut().read(base + i as u64, 1) as u8;
            }
        }
        T::read_from_bytes(&buf).map_err(|_| Error::ConfigSpaceTooSmall)
    }
    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: T,
    ) -> Result<(), Error> {
        let bytes = value.as_bytes();
        let mut v = [0u8; 8];
        if !matches!(bytes.len(), 1 | 2 | 4 | 8) {
            return Err(Error::InvalidParam);
        }
        v[..bytes.len()].copy_from_slice(bytes);
        self.dev.borrow_mut().write(
            &*self.mem,
            reg::CONFIG + offset as u64,
            bytes.len() as u8,
            u64::from_le_bytes(v),
        );
        Ok(())
    }
}
