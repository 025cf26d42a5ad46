//! The virtio-mmio transport (virtio 1.2 §4.2, version 2) over a register bus, implementing
//! the `virtio-drivers` crate's `Transport` so its drivers and ours run on it.
//!
//! [`RegisterTransport`] owns the protocol (feature words, queue selection, status, config
//! space widths); [`RegisterBus`] is the narrow seam to the hardware: [`MmioBus`] does
//! volatile accesses to a mapped register window in a guest, and host tests plug in the
//! hypervisor's device state machine. The transport checks MagicValue and Version once, at
//! construction, and refuses anything else (virtio 1.2 §4.2.2.2: the driver MUST ignore a
//! device with a wrong MagicValue).

use core::ptr::NonNull;

use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{Error, PhysAddr};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Register offsets (virtio 1.2 §4.2.2).
pub mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// "virt" (virtio 1.2 §4.2.2).
pub const MAGIC: u32 = 0x7472_6976;

/// Register-level access to one virtio-mmio window. `size` is 1, 2, 4 or 8.
pub trait RegisterBus {
    /// Reads `size` bytes at `offset`.
    fn read(&self, offset: u64, size: u8) -> u64;
    /// Writes the low `size` bytes of `value` at `offset`.
    fn write(&mut self, offset: u64, size: u8, value: u64);
}

/// A mapped virtio-mmio register window, accessed with volatile loads and stores.
pub struct MmioBus {
    base: NonNull<u8>,
    size: usize,
}

impl MmioBus {
    /// Wraps the window at `base`.
    ///
    /// # Safety
    ///
    /// `base` must map a virtio-mmio register window of `size` bytes (uncached device
    /// memory) for the life of the value, used by nothing else.
    pub unsafe fn new(base: NonNull<u8>, size: usize) -> MmioBus {
        MmioBus { base, size }
    }

    fn ok(&self, offset: u64, size: u8) -> Option<usize> {
        let off = usize::try_from(offset).ok()?;
        let end = off.checked_add(usize::from(size))?;
        (matches!(size, 1 | 2 | 4 | 8) && end <= self.size && off % usize::from(size) == 0)
            .then_some(off)
    }
}

impl RegisterBus for MmioBus {
    fn read(&self, offset: u64, size: u8) -> u64 {
        let Some(off) = self.ok(offset, size) else {
            return 0;
        };
        // SAFETY: `ok` checked the access is aligned and inside the window that `new`'s
        // contract makes valid device memory.
        unsafe {
            let p = self.base.as_ptr().add(off);
            match size {
                1 => u64::from(p.read_volatile()),
                2 => u64::from(p.cast::<u16>().read_volatile()),
                4 => u64::from(p.cast::<u32>().read_volatile()),
                _ => p.cast::<u64>().read_volatile(),
            }
        }
    }

    #[allow(clippy::cast_possible_truncation)] // Narrowing to the access width is the point.
    fn write(&mut self, offset: u64, size: u8, value: u64) {
        let Some(off) = self.ok(offset, size) else {
            return;
        };
        // SAFETY: as in `read`.
        unsafe {
            let p = self.base.as_ptr().add(off);
            match size {
                1 => p.write_volatile(value as u8),
                2 => p.cast::<u16>().write_volatile(value as u16),
                4 => p.cast::<u32>().write_volatile(value as u32),
                _ => p.cast::<u64>().write_volatile(value),
            }
        }
    }
}

/// virtio-mmio version 2 over a [`RegisterBus`].
pub struct RegisterTransport<B> {
    bus: B,
    device_type: DeviceType,
}

/// Low and high 32-bit words of a 64-bit value.
#[allow(clippy::cast_possible_truncation)] // Splitting into words is the point.
fn words(v: u64) -> (u32, u32) {
    (v as u32, (v >> 32) as u32)
}

impl<B: RegisterBus> RegisterTransport<B> {
    /// Probes the window: magic, version 2 and a known device type.
    pub fn new(bus: B) -> Result<Self, Error> {
        let r = |off| bus.read(off, 4);
        if r(reg::MAGIC_VALUE) != u64::from(MAGIC) || r(reg::VERSION) != 2 {
            return Err(Error::NotReady);
        }
        let id = u32::try_from(r(reg::DEVICE_ID)).map_err(|_| Error::Unsupported)?;
        let device_type = DeviceType::try_from(id).map_err(|_| Error::Unsupported)?;
        Ok(RegisterTransport { bus, device_type })
    }
    /// The bus.
    pub fn bus(&self) -> &B {
        &self.bus
    }
    fn r32(&self, off: u64) -> u32 {
        u32::try_from(self.bus.read(off, 4) & 0xffff_ffff).unwrap_or(0)
    }
    fn w32(&mut self, off: u64, v: u32) {
        self.bus.write(off, 4, u64::from(v));
    }
    fn w64(&mut self, low: u64, v: u64) {
        let (lo, hi) = words(v);
        self.w32(low, lo);
        self.w32(low + 4, hi);
    }
}

impl<B: RegisterBus> Transport for RegisterTransport<B> {
    fn device_type(&self) -> DeviceType {
        self.device_type
    }
    fn read_device_features(&mut self) -> u64 {
        self.w32(reg::DEVICE_FEATURES_SEL, 0);
        let lo = self.r32(reg::DEVICE_FEATURES);
        self.w32(reg::DEVICE_FEATURES_SEL, 1);
        let hi = self.r32(reg::DEVICE_FEATURES);
        u64::from(lo) | u64::from(hi) << 32
    }
    fn write_driver_features(&mut self, driver_features: u64) {
        let (lo, hi) = words(driver_features);
        self.w32(reg::DRIVER_FEATURES_SEL, 0);
        self.w32(reg::DRIVER_FEATURES, lo);
        self.w32(reg::DRIVER_FEATURES_SEL, 1);
        self.w32(reg::DRIVER_FEATURES, hi);
    }
    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.w32(reg::QUEUE_SEL, u32::from(queue));
        self.r32(reg::QUEUE_NUM_MAX)
    }
    fn notify(&mut self, queue: u16) {
        self.w32(reg::QUEUE_NOTIFY, u32::from(queue));
    }
    fn get_status(&self) -> DeviceStatus {
        DeviceStatus::from_bits_truncate(self.r32(reg::STATUS))
    }
    fn set_status(&mut self, status: DeviceStatus) {
        self.w32(reg::STATUS, status.bits());
    }
    fn set_guest_page_size(&mut self, _guest_page_size: u32) {
        // Version 2 has no GuestPageSize register (virtio 1.2 §4.2.4 is legacy only).
    }
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
        // virtio 1.2 §4.2.3.2: select, size, the three addresses, then QueueReady.
        self.w32(reg::QUEUE_SEL, u32::from(queue));
        self.w32(reg::QUEUE_NUM, size);
        self.w64(reg::QUEUE_DESC_LOW, descriptors);
        self.w64(reg::QUEUE_DRIVER_LOW, driver_area);
        self.w64(reg::QUEUE_DEVICE_LOW, device_area);
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
        if s != 0 {
            self.w32(reg::INTERRUPT_ACK, s);
        }
        InterruptStatus::from_bits_truncate(s)
    }
    fn read_config_generation(&self) -> u32 {
        self.r32(reg::CONFIG_GENERATION)
    }
    fn read_config_space<T: FromBytes + IntoBytes>(&self, offset: usize) -> Result<T, Error> {
        // virtio 1.2 §4.2.2.2: fields are accessed with their natural width; wider structs
        // byte by byte (callers wrap multi-field reads in `read_consistent`).
        let size = core::mem::size_of::<T>();
        let mut buf = [0u8; 64];
        let out = buf.get_mut(..size).ok_or(Error::ConfigSpaceTooSmall)?;
        let base = reg::CONFIG + offset as u64;
        match size {
            1 | 2 | 4 | 8 => {
                let v = self.bus.read(base, u8::try_from(size).unwrap_or(0));
                out.copy_from_slice(&v.to_le_bytes()[..size]);
            }
            _ => {
                for (i, b) in out.iter_mut().enumerate() {
                    *b = self.bus.read(base + i as u64, 1).to_le_bytes()[0];
                }
            }
        }
        T::read_from_bytes(out).map_err(|_| Error::ConfigSpaceTooSmall)
    }
    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: T,
    ) -> Result<(), Error> {
        let bytes = value.as_bytes();
        let base = reg::CONFIG + offset as u64;
        match bytes.len() {
            n @ (1 | 2 | 4 | 8) => {
                let mut v = [0u8; 8];
                v[..n].copy_from_slice(bytes);
                self.bus
                    .write(base, u8::try_from(n).unwrap_or(0), u64::from_le_bytes(v));
            }
            _ => {
                for (i, &b) in bytes.iter().enumerate() {
                    self.bus.write(base + i as u64, 1, u64::from(b));
                }
            }
        }
        Ok(())
    }
}
