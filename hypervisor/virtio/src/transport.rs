//! The virtio-mmio transport (virtio 1.2 §4.2, version 2 register layout) as a state
//! machine over one device model.
//!
//! [`MmioTransport`] owns the register file (feature selectors, queue selector, per-queue
//! layout registers, status, interrupt status, config generation) and the live
//! [`SplitQueue`]s. The hypervisor's MMIO exit handler decodes the guest's access and calls
//! [`MmioTransport::read`] / [`MmioTransport::write`]; nothing here touches hardware.
//!
//! Invariants:
//! - Queues are live only between a successful QueueReady write and the next reset; the
//!   device model sees them only after DRIVER_OK (virtio 1.2 §2.1.2: no buffers consumed
//!   before DRIVER_OK) and never after DEVICE_NEEDS_RESET or FAILED.
//! - Any malformed queue or request makes the device set DEVICE_NEEDS_RESET and raise a
//!   configuration-change interrupt (virtio 1.2 §2.1.2); from then on it ignores notifies
//!   until the driver resets it by writing 0 to Status.
//! - No guest value can make this module panic.

use alloc::vec::Vec;

use crate::device::{DeviceError, QueueSet, VirtioDevice};
use crate::mem::{GuestAddr, GuestMemory};
use crate::queue::{QueueLayout, RingFeatures, SplitQueue};

/// "virt" in little-endian (virtio 1.2 §4.2.2).
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// Register layout version of the non-legacy interface (virtio 1.2 §4.2.2).
pub const MMIO_VERSION: u32 = 2;
/// Our PCI-style vendor id, reported in VendorID ("RHV\0").
pub const VENDOR_ID: u32 = 0x0056_4852;

/// Register offsets (virtio 1.2 §4.2.2, table "MMIO Device Register Layout").
pub mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
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
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const QUEUE_RESET: u64 = 0x0c0;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// Reserved feature bits (virtio 1.2 §6).
pub mod feature {
    pub const INDIRECT_DESC: u64 = 1 << 28;
    pub const EVENT_IDX: u64 = 1 << 29;
    pub const VERSION_1: u64 = 1 << 32;
}

/// Low 32 bits of a 64-bit register pair (the truncation is the point).
#[allow(clippy::cast_possible_truncation)]
#[inline]
fn lo32(v: u64) -> u32 {
    v as u32
}

/// High 32 bits of a 64-bit register pair.
#[inline]
fn hi32(v: u64) -> u32 {
    lo32(v >> 32)
}

/// InterruptStatus bits (virtio 1.2 §4.2.2).
pub const INT_USED_BUFFER: u32 = 1;
/// InterruptStatus: configuration change.
pub const INT_CONFIG_CHANGE: u32 = 2;

/// Transport-level features we offer besides the device's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransportOptions {
    pub indirect: bool,
    pub event_idx: bool,
}

impl Default for TransportOptions {
    fn default() -> Self {
        TransportOptions {
            indirect: true,
            event_idx: true,
        }
    }
}

/// Counters a guest can move; shown by the console and the management API, never logged
/// per event.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransportStats {
    /// QueueNotify writes accepted (available-buffer notifications).
    pub notifies: u64,
    /// Used-buffer notifications sent (interrupt raised).
    pub interrupts: u64,
    /// Times the device declared itself broken.
    pub broken: u64,
    /// Accesses the spec forbids (bad width, read-only register write, ...), ignored.
    pub bad_accesses: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct QueueRegs {
    num: u16,
    desc: u64,
    driver: u64,
    device: u64,
    ready: bool,
}

/// The virtio-mmio register file and queue owner for one device.
pub struct MmioTransport<D> {
    device: D,
    options: TransportOptions,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
    regs: Vec<QueueRegs>,
    queues: Vec<Option<SplitQueue>>,
    last_error: Option<DeviceError>,
    stats: TransportStats,
}

impl<D> MmioTransport<D> {
    /// The device model.
    pub fn device(&self) -> &D {
        &self.device
    }
    /// The device model, mutably (host-side configuration such as link state).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }
    /// The Status register.
    pub fn status(&self) -> u32 {
        self.status
    }
    /// Pending interrupt causes; the line is asserted while non-zero.
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }
    /// Features the driver accepted (meaningful once FEATURES_OK is set).
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }
    /// Whether the device has declared itself broken.
    pub fn needs_reset(&self) -> bool {
        self.status & status::DEVICE_NEEDS_RESET != 0
    }
    /// Why the device last declared itself broken.
    pub fn last_error(&self) -> Option<DeviceError> {
        self.last_error
    }
    /// Guest-visible event counters.
    pub fn stats(&self) -> TransportStats {
        self.stats
    }
    fn running(&self) -> bool {
        self.status & status::DRIVER_OK != 0
            && self.status & (status::DEVICE_NEEDS_RESET | status::FAILED) == 0
    }
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Wraps `device`, offering the transport features in `options`.
    pub fn new(device: D, options: TransportOptions) -> Self {
        let n = device.num_queues();
        MmioTransport {
            device,
            options,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
            regs: alloc::vec![QueueRegs::default(); n],
            queues: alloc::vec![None; n],
            last_error: None,
            stats: TransportStats::default(),
        }
    }

    fn offered_features(&self) -> u64 {
        let mut f = self.device.device_features() | feature::VERSION_1;
        if self.options.indirect {
            f |= feature::INDIRECT_DESC;
        }
        if self.options.event_idx {
            f |= feature::EVENT_IDX;
        }
        f
    }

    fn reset(&mut self) {
        // virtio 1.2 §4.2.2.1: writing 0 to Status resets the device; QueueReady reads 0.
        self.device.reset();
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt_status = 0;
        self.last_error = None;
        for r in &mut self.regs {
            *r = QueueRegs::default();
        }
        for q in &mut self.queues {
            *q = None;
        }
    }

    /// Marks the device broken (virtio 1.2 §2.1.2: DEVICE_NEEDS_RESET, then a configuration
    /// change notification if DRIVER_OK was set).
    fn mark_broken(&mut self, err: DeviceError) {
        if self.status & status::DEVICE_NEEDS_RESET == 0 {
            self.stats.broken += 1;
            self.last_error = Some(err);
        }
        self.status |= status::DEVICE_NEEDS_RESET;
        if self.status & status::DRIVER_OK != 0 {
            self.interrupt_status |= INT_CONFIG_CHANGE;
        }
    }

    /// Handles a guest read of `size` bytes (1, 2, 4 or 8) at `offset` in the register window.
    pub fn read(&mut self, offset: u64, size: u8) -> u64 {
        if offset >= reg::CONFIG {
            // virtio 1.2 §4.2.2.2: config fields are read with their natural width; we accept
            // any width up to 8 and let the model answer (zeros outside its config).
            if !matches!(size, 1 | 2 | 4 | 8) {
                self.stats.bad_accesses += 1;
                return 0;
            }
            let mut buf = [0u8; 8];
            self.device
                .read_config(offset - reg::CONFIG, &mut buf[..usize::from(size)]);
            return u64::from_le_bytes(buf);
        }
        // virtio 1.2 §4.2.2.2: control registers are read as aligned 32-bit words only.
        if size != 4 || !offset.is_multiple_of(4) {
            self.stats.bad_accesses += 1;
            return 0;
        }
        let sel = self.queue_sel as usize;
        let v: u32 = match offset {
            reg::MAGIC_VALUE => MMIO_MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_id(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => {
                let f = self.offered_features();
                match self.device_features_sel {
                    0 => lo32(f),
                    1 => hi32(f),
                    // virtio 1.2 §4.2.2.1: feature words we do not have read as 0.
                    _ => 0,
                }
            }
            reg::QUEUE_NUM_MAX => {
                // virtio 1.2 §4.2.3.2: 0 means the queue does not exist.
                if sel < self.regs.len() {
                    u32::from(self.device.queue_max_size(sel))
                } else {
                    0
                }
            }
            reg::QUEUE_READY => self.regs.get(sel).map_or(0, |r| u32::from(r.ready)),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            // No shared memory regions: length reads as all ones (virtio 1.2 §4.2.2).
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            reg::CONFIG_GENERATION => self.config_generation,
            reg::QUEUE_NUM => self.regs.get(sel).map_or(0, |r| u32::from(r.num)),
            reg::QUEUE_DESC_LOW => self.regs.get(sel).map_or(0, |r| lo32(r.desc)),
            reg::QUEUE_DESC_HIGH => self.regs.get(sel).map_or(0, |r| hi32(r.desc)),
            reg::QUEUE_DRIVER_LOW => self.regs.get(sel).map_or(0, |r| lo32(r.driver)),
            reg::QUEUE_DRIVER_HIGH => self.regs.get(sel).map_or(0, |r| hi32(r.driver)),
            reg::QUEUE_DEVICE_LOW => self.regs.get(sel).map_or(0, |r| lo32(r.device)),
            reg::QUEUE_DEVICE_HIGH => self.regs.get(sel).map_or(0, |r| hi32(r.device)),
            _ => {
                // virtio 1.2 §4.2.2.2: the driver MUST NOT read write-only or unlisted
                // registers; we answer 0.
                self.stats.bad_accesses += 1;
                0
            }
        };
        u64::from(v)
    }

    /// Handles a guest write of `size` bytes at `offset`, processing queues on QueueNotify.
    pub fn write<M: GuestMemory + ?Sized>(&mut self, mem: &M, offset: u64, size: u8, value: u64) {
        if offset >= reg::CONFIG {
            if !matches!(size, 1 | 2 | 4 | 8) {
                self.stats.bad_accesses += 1;
                return;
            }
            let bytes = value.to_le_bytes();
            if self
                .device
                .write_config(offset - reg::CONFIG, &bytes[..usize::from(size)])
            {
                self.config_generation = self.config_generation.wrapping_add(1);
            }
            return;
        }
        // virtio 1.2 §4.2.2.2: aligned 32-bit accesses only.
        if size != 4 || !offset.is_multiple_of(4) {
            self.stats.bad_accesses += 1;
            return;
        }
        let v = lo32(value);
        let sel = self.queue_sel as usize;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                // virtio 1.2 §3.1.1: features are written before FEATURES_OK; later writes
                // are ignored.
                if self.status & status::FEATURES_OK != 0 {
                    self.stats.bad_accesses += 1;
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v);
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32);
                    }
                    _ => {
                        // virtio 1.2 §2.2.1: the driver accepts nothing not offered; there
                        // are no offered bits beyond word 1.
                        if v != 0 {
                            self.stats.bad_accesses += 1;
                        }
                    }
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => self.write_queue_reg(offset, sel, v),
            reg::QUEUE_READY => self.write_queue_ready(mem, sel, v),
            reg::QUEUE_NOTIFY => self.notify(mem, v),
            reg::INTERRUPT_ACK => {
                // virtio 1.2 §4.2.2.1: the bits written are acknowledged.
                self.interrupt_status &= !v;
            }
            reg::STATUS => self.write_status(v),
            reg::SHM_SEL => {}
            _ => {
                // virtio 1.2 §4.2.2.2: the driver MUST NOT write read-only registers.
                self.stats.bad_accesses += 1;
            }
        }
    }

    fn write_queue_reg(&mut self, offset: u64, sel: usize, v: u32) {
        let Some(r) = self.regs.get_mut(sel) else {
            self.stats.bad_accesses += 1;
            return;
        };
        // virtio 1.2 §4.2.2.2: while QueueReady is non-zero the driver MUST NOT touch the
        // queue's layout registers; we ignore such writes.
        if r.ready {
            self.stats.bad_accesses += 1;
            return;
        }
        let lo = |old: u64| (old & !0xffff_ffff) | u64::from(v);
        let hi = |old: u64| (old & 0xffff_ffff) | (u64::from(v) << 32);
        match offset {
            reg::QUEUE_NUM => r.num = u16::try_from(v).unwrap_or(0),
            reg::QUEUE_DESC_LOW => r.desc = lo(r.desc),
            reg::QUEUE_DESC_HIGH => r.desc = hi(r.desc),
            reg::QUEUE_DRIVER_LOW => r.driver = lo(r.driver),
            reg::QUEUE_DRIVER_HIGH => r.driver = hi(r.driver),
            reg::QUEUE_DEVICE_LOW => r.device = lo(r.device),
            _ => r.device = hi(r.device),
        }
    }

    fn write_queue_ready<M: GuestMemory + ?Sized>(&mut self, mem: &M, sel: usize, v: u32) {
        if sel >= self.regs.len() {
            self.stats.bad_accesses += 1;
            return;
        }
        if v == 0 {
            self.regs[sel].ready = false;
            self.queues[sel] = None;
            return;
        }
        if self.regs[sel].ready {
            return;
        }
        let r = self.regs[sel];
        // virtio 1.2 §4.2.2.2: QueueNum <= QueueNumMax.
        if r.num > self.device.queue_max_size(sel) {
            self.mark_broken(DeviceError::Queue(crate::queue::QueueError::InvalidSize(
                r.num,
            )));
            return;
        }
        let features = RingFeatures {
            indirect: self.driver_features & feature::INDIRECT_DESC != 0,
            event_idx: self.driver_features & feature::EVENT_IDX != 0,
        };
        let layout = QueueLayout {
            size: r.num,
            desc: GuestAddr(r.desc),
            avail: GuestAddr(r.driver),
            used: GuestAddr(r.device),
        };
        match SplitQueue::new(mem, layout, features) {
            Ok(q) => {
                self.regs[sel].ready = true;
                self.queues[sel] = Some(q);
            }
            Err(e) => self.mark_broken(DeviceError::Queue(e)),
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // virtio 1.2 §2.1.1: the driver MUST NOT clear a status bit (other than by reset);
        // DEVICE_NEEDS_RESET is the device's to set.
        let wanted = v & !status::DEVICE_NEEDS_RESET;
        if wanted & old != old & !status::DEVICE_NEEDS_RESET {
            self.stats.bad_accesses += 1;
            return;
        }
        let added = wanted & !old;
        let mut new = old | added;
        if added & status::FEATURES_OK != 0 {
            let offered = self.offered_features();
            // virtio 1.2 §2.2.1: the driver MUST NOT accept a feature the device did not
            // offer; §6.2 / §4.2.2: a version-2 MMIO device needs VIRTIO_F_VERSION_1.
            // §2.2.2: otherwise the device leaves FEATURES_OK clear.
            let ok = self.driver_features & !offered == 0
                && self.driver_features & feature::VERSION_1 != 0
                && self.device.accept_features(self.driver_features);
            if !ok {
                new &= !status::FEATURES_OK;
            }
        }
        if added & status::DRIVER_OK != 0 {
            // virtio 1.2 §3.1.1: DRIVER_OK only after FEATURES_OK.
            if new & status::FEATURES_OK == 0 {
                self.stats.bad_accesses += 1;
                new &= !status::DRIVER_OK;
            } else {
                self.device.activate(self.driver_features);
            }
        }
        self.status = new;
    }

    fn notify<M: GuestMemory + ?Sized>(&mut self, mem: &M, v: u32) {
        // virtio 1.2 §4.2.2: QueueNotify carries the queue index (no NOTIFICATION_DATA).
        let idx = usize::try_from(v).unwrap_or(usize::MAX);
        if !self.running() || idx >= self.queues.len() || self.queues[idx].is_none() {
            self.stats.bad_accesses += 1;
            return;
        }
        self.stats.notifies += 1;
        self.with_device(mem, |dev, qs, m| dev.queue_notify(idx, qs, m));
    }

    /// Runs a device-side action (a received frame, console input, a balloon target) against
    /// the live queues, then raises the used-buffer interrupt if a queue's driver wants one,
    /// or marks the device broken if the action found a malformed queue. Returns `None` if
    /// the device is not running or broke.
    pub fn with_device<M: GuestMemory + ?Sized, R>(
        &mut self,
        mem: &M,
        f: impl FnOnce(&mut D, &mut QueueSet<'_>, &M) -> Result<R, DeviceError>,
    ) -> Option<R> {
        if !self.running() {
            return None;
        }
        let mut qs = QueueSet::new(&mut self.queues);
        let result = f(&mut self.device, &mut qs, mem);
        let result = match result {
            Ok(r) => r,
            Err(e) => {
                self.mark_broken(e);
                return None;
            }
        };
        let mut interrupt = false;
        for q in self.queues.iter_mut().flatten() {
            match q.needs_notification(mem) {
                Ok(n) => interrupt |= n,
                Err(e) => {
                    self.mark_broken(DeviceError::Queue(e));
                    return None;
                }
            }
        }
        if interrupt {
            self.stats.interrupts += 1;
            self.interrupt_status |= INT_USED_BUFFER;
        }
        Some(result)
    }

    /// The device's configuration changed on the host side (link, balloon target):
    /// bump the generation and raise a configuration-change interrupt (virtio 1.2 §2.5,
    /// §4.2.2.1).
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.status & status::DRIVER_OK != 0 {
            self.interrupt_status |= INT_CONFIG_CHANGE;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::block::{BlockDevice, MemDisk};
    use crate::mem::VecGuestMemory;

    fn blk() -> (MmioTransport<BlockDevice<MemDisk>>, VecGuestMemory) {
        (
            MmioTransport::new(
                BlockDevice::new(MemDisk::new(8, false)),
                TransportOptions::default(),
            ),
            VecGuestMemory::new(0, 0x10000),
        )
    }

    fn negotiate(
        t: &mut MmioTransport<BlockDevice<MemDisk>>,
        m: &VecGuestMemory,
        hi: u32,
        lo: u32,
    ) {
        t.write(m, reg::STATUS, 4, 0);
        t.write(
            m,
            reg::STATUS,
            4,
            u64::from(status::ACKNOWLEDGE | status::DRIVER),
        );
        t.write(m, reg::DRIVER_FEATURES_SEL, 4, 0);
        t.write(m, reg::DRIVER_FEATURES, 4, u64::from(lo));
        t.write(m, reg::DRIVER_FEATURES_SEL, 4, 1);
        t.write(m, reg::DRIVER_FEATURES, 4, u64::from(hi));
        t.write(
            m,
            reg::STATUS,
            4,
            u64::from(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK),
        );
    }

    #[test]
    fn identity_registers() {
        let (mut t, _) = blk();
        assert_eq!(t.read(reg::MAGIC_VALUE, 4), u64::from(MMIO_MAGIC));
        assert_eq!(t.read(reg::VERSION, 4), 2);
        assert_eq!(t.read(reg::DEVICE_ID, 4), 2);
        // Control registers: 32-bit aligned only (virtio 1.2 §4.2.2.2).
        assert_eq!(t.read(reg::MAGIC_VALUE, 2), 0);
        assert_eq!(t.read(reg::MAGIC_VALUE + 1, 4), 0);
        assert_eq!(t.stats().bad_accesses, 2);
        // Config space at any natural width: capacity = 8 sectors.
        assert_eq!(t.read(reg::CONFIG, 8), 8);
        assert_eq!(t.read(reg::CONFIG, 1), 8);
        assert_eq!(t.read(reg::CONFIG + 0x1000, 4), 0);
    }

    #[test]
    fn feature_negotiation() {
        let (mut t, m) = blk();
        t.write(&m, reg::DEVICE_FEATURES_SEL, 4, 1);
        assert_eq!(t.read(reg::DEVICE_FEATURES, 4), 1); // VERSION_1
        t.write(&m, reg::DEVICE_FEATURES_SEL, 4, 7);
        assert_eq!(t.read(reg::DEVICE_FEATURES, 4), 0);
        // A feature not offered: FEATURES_OK does not stick (virtio 1.2 §2.2.2).
        negotiate(&mut t, &m, 1, 1 << 30);
        assert_eq!(t.status() & status::FEATURES_OK, 0);
        // Without VERSION_1: refused too.
        negotiate(&mut t, &m, 0, 0);
        assert_eq!(t.status() & status::FEATURES_OK, 0);
        negotiate(&mut t, &m, 1, 1 << 29);
        assert_ne!(t.status() & status::FEATURES_OK, 0);
        // Feature writes after FEATURES_OK are ignored.
        t.write(&m, reg::DRIVER_FEATURES_SEL, 4, 0);
        t.write(&m, reg::DRIVER_FEATURES, 4, 0);
        assert_eq!(t.driver_features(), (1 << 32) | (1 << 29));
    }

    #[test]
    fn status_bits_cannot_be_cleared_and_driver_ok_needs_features_ok() {
        let (mut t, m) = blk();
        t.write(
            &m,
            reg::STATUS,
            4,
            u64::from(status::ACKNOWLEDGE | status::DRIVER),
        );
        t.write(&m, reg::STATUS, 4, u64::from(status::ACKNOWLEDGE));
        assert_eq!(t.status(), status::ACKNOWLEDGE | status::DRIVER);
        t.write(
            &m,
            reg::STATUS,
            4,
            u64::from(status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK),
        );
        assert_eq!(t.status() & status::DRIVER_OK, 0);
    }

    #[test]
    fn queue_setup_rules() {
        let (mut t, m) = blk();
        negotiate(&mut t, &m, 1, 0);
        t.write(&m, reg::QUEUE_SEL, 4, 5);
        assert_eq!(t.read(reg::QUEUE_NUM_MAX, 4), 0);
        t.write(&m, reg::QUEUE_SEL, 4, 0);
        assert_eq!(t.read(reg::QUEUE_NUM_MAX, 4), 256);
        t.write(&m, reg::QUEUE_NUM, 4, 16);
        t.write(&m, reg::QUEUE_DESC_LOW, 4, 0x1000);
        t.write(&m, reg::QUEUE_DRIVER_LOW, 4, 0x2000);
        t.write(&m, reg::QUEUE_DEVICE_LOW, 4, 0x3000);
        // Notify before DRIVER_OK: ignored (virtio 1.2 §2.1.2).
        t.write(&m, reg::QUEUE_NOTIFY, 4, 0);
        assert_eq!(t.stats().notifies, 0);
        t.write(&m, reg::QUEUE_READY, 4, 1);
        assert_eq!(t.read(reg::QUEUE_READY, 4), 1);
        // Layout writes while ready are ignored (virtio 1.2 §4.2.2.2).
        t.write(&m, reg::QUEUE_NUM, 4, 8);
        assert_eq!(t.read(reg::QUEUE_NUM, 4), 16);
        t.write(
            &m,
            reg::STATUS,
            4,
            u64::from(
                status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
            ),
        );
        t.write(&m, reg::QUEUE_NOTIFY, 4, 0);
        assert_eq!(t.stats().notifies, 1);
        assert!(!t.needs_reset());
        // Reset clears everything (virtio 1.2 §4.2.2.1).
        t.write(&m, reg::STATUS, 4, 0);
        assert_eq!(t.read(reg::QUEUE_READY, 4), 0);
        assert_eq!(t.status(), 0);
    }

    #[test]
    fn bad_queue_layout_breaks_device_and_reset_recovers() {
        let (mut t, m) = blk();
        negotiate(&mut t, &m, 1, 0);
        t.write(&m, reg::QUEUE_SEL, 4, 0);
        t.write(&m, reg::QUEUE_NUM, 4, 12); // not a power of two
        t.write(&m, reg::QUEUE_READY, 4, 1);
        assert!(t.needs_reset());
        assert_eq!(t.read(reg::QUEUE_READY, 4), 0);
        // Writing status bits does not clear DEVICE_NEEDS_RESET; only reset does.
        t.write(
            &m,
            reg::STATUS,
            4,
            u64::from(t.status() & !status::DEVICE_NEEDS_RESET),
        );
        assert!(t.needs_reset());
        t.write(&m, reg::STATUS, 4, 0);
        assert!(!t.needs_reset());
        // Beyond QueueNumMax or outside RAM: broken as well.
        negotiate(&mut t, &m, 1, 0);
        t.write(&m, reg::QUEUE_NUM, 4, 512);
        t.write(&m, reg::QUEUE_READY, 4, 1);
        assert!(t.needs_reset());
        t.write(&m, reg::STATUS, 4, 0);
        negotiate(&mut t, &m, 1, 0);
        t.write(&m, reg::QUEUE_NUM, 4, 16);
        t.write(&m, reg::QUEUE_DESC_HIGH, 4, 1);
        t.write(&m, reg::QUEUE_READY, 4, 1);
        assert!(matches!(
            t.last_error(),
            Some(DeviceError::Queue(crate::queue::QueueError::Memory(_)))
        ));
    }

    #[test]
    fn interrupt_ack_and_config_change() {
        let (mut t, m) = blk();
        negotiate(&mut t, &m, 1, 0);
        t.write(
            &m,
            reg::STATUS,
            4,
            u64::from(
                status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
            ),
        );
        let g = t.read(reg::CONFIG_GENERATION, 4);
        t.config_changed();
        assert_eq!(t.read(reg::CONFIG_GENERATION, 4), g + 1);
        assert_eq!(
            t.read(reg::INTERRUPT_STATUS, 4),
            u64::from(INT_CONFIG_CHANGE)
        );
        t.write(&m, reg::INTERRUPT_ACK, 4, u64::from(INT_CONFIG_CHANGE));
        assert_eq!(t.interrupt_status(), 0);
    }
}
