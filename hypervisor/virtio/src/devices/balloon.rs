//! virtio-balloon device model (virtio 1.2 §5.5): inflate and deflate queues, the memory
//! statistics queue and free page reporting, reporting pages to a [`BalloonBackend`] (the
//! hypervisor's frame bookkeeping).
//!
//! Queue indices: inflateq 0 and deflateq 1 always; then statsq if STATS_VQ was negotiated,
//! then reporting_vq if PAGE_REPORTING was. Linux numbers present queues contiguously
//! (`vm_find_vqs` skips absent ones), so we assign roles the same way at DRIVER_OK.
//!
//! Bounds: one inflate or deflate buffer carries at most [`MAX_PFNS`] page numbers, one
//! statistics buffer at most [`MAX_STATS`] tags; PFNs outside guest RAM are skipped and
//! counted, never passed to the backend.

use alloc::vec::Vec;

use crate::device::{DeviceError, QueueSet, VirtioDevice, read_config_bytes};
use crate::mem::{GuestAddr, GuestMemory};
use crate::queue::Chain;

/// Device type of virtio-balloon (virtio 1.2 §5.5.1).
pub const DEVICE_ID_BALLOON: u32 = 5;
/// Balloon page size: PFNs are in 4096-byte units (virtio 1.2 §5.5.6).
pub const BALLOON_PAGE: u64 = 4096;
/// Queue size offered.
pub const QUEUE_SIZE: u16 = 128;
/// Most PFNs accepted in one buffer (Linux sends at most 256).
pub const MAX_PFNS: u32 = 4096;
/// Most statistics tags kept from one buffer.
pub const MAX_STATS: usize = 32;
const MAX_STATS_U32: u32 = 32;

/// Feature bits (virtio 1.2 §5.5.3).
pub mod feature {
    pub const MUST_TELL_HOST: u64 = 1 << 0;
    pub const STATS_VQ: u64 = 1 << 1;
    pub const DEFLATE_ON_OOM: u64 = 1 << 2;
    pub const PAGE_REPORTING: u64 = 1 << 5;
}

/// Statistics tags (virtio 1.2 §5.5.6.3).
pub mod stat {
    pub const SWAP_IN: u16 = 0;
    pub const SWAP_OUT: u16 = 1;
    pub const MAJFLT: u16 = 2;
    pub const MINFLT: u16 = 3;
    pub const MEMFREE: u16 = 4;
    pub const MEMTOT: u16 = 5;
    pub const AVAIL: u16 = 6;
    pub const CACHES: u16 = 7;
}

/// What the balloon tells the hypervisor's memory manager.
pub trait BalloonBackend {
    /// The guest gave up the 4 KiB page at `page` (inflate).
    fn inflate(&mut self, page: GuestAddr);
    /// The guest wants the page at `page` back (deflate).
    fn deflate(&mut self, page: GuestAddr);
    /// `[addr, addr + len)` is free in the guest and may be reclaimed (page reporting).
    fn report_free(&mut self, addr: GuestAddr, len: u64);
}

/// A backend that records everything (tests).
#[derive(Default, Debug)]
pub struct BalloonLog {
    pub inflated: Vec<GuestAddr>,
    pub deflated: Vec<GuestAddr>,
    pub reported: Vec<(GuestAddr, u64)>,
}

impl BalloonBackend for BalloonLog {
    fn inflate(&mut self, page: GuestAddr) {
        self.inflated.push(page);
    }
    fn deflate(&mut self, page: GuestAddr) {
        self.deflated.push(page);
    }
    fn report_free(&mut self, addr: GuestAddr, len: u64) {
        self.reported.push((addr, len));
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

/// Per-device counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BalloonStats {
    pub bad_pfns: u64,
    pub stats_updates: u64,
}

/// The virtio-balloon device model.
pub struct BalloonDevice<B> {
    backend: B,
    target_pages: u32,
    actual_pages: u32,
    features: u64,
    roles: [Option<Role>; 4],
    chain: Chain,
    stats_head: Option<u16>,
    guest_stats: Vec<(u16, u64)>,
    counters: BalloonStats,
}

impl<B: BalloonBackend> BalloonDevice<B> {
    /// A balloon with target 0 pages.
    pub fn new(backend: B) -> Self {
        BalloonDevice {
            backend,
            target_pages: 0,
            actual_pages: 0,
            features: 0,
            roles: [None; 4],
            chain: Chain::new(),
            stats_head: None,
            guest_stats: Vec::new(),
            counters: BalloonStats::default(),
        }
    }
    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }
    /// Sets `num_pages`, the target; the caller then calls `MmioTransport::config_changed`.
    pub fn set_target(&mut self, pages: u32) {
        self.target_pages = pages;
    }
    /// `actual` as last written by the driver.
    pub fn actual_pages(&self) -> u32 {
        self.actual_pages
    }
    /// The last statistics the guest reported, as (tag, value).
    pub fn guest_stats(&self) -> &[(u16, u64)] {
        &self.guest_stats
    }
    /// Counters.
    pub fn counters(&self) -> BalloonStats {
        self.counters
    }

    fn queue_of(&self, role: Role) -> Option<usize> {
        self.roles.iter().position(|r| *r == Some(role))
    }

    /// Asks the guest for fresh statistics by returning the buffer it left with us
    /// (virtio 1.2 §5.5.6.3). `Ok(false)` if there is none to return.
    pub fn request_stats<M: GuestMemory + ?Sized>(
        &mut self,
        queues: &mut QueueSet<'_>,
        mem: &M,
    ) -> Result<bool, DeviceError> {
        let (Some(qi), Some(head)) = (self.queue_of(Role::Stats), self.stats_head) else {
            return Ok(false);
        };
        queues.get(qi)?.add_used(mem, head, 0)?;
        self.stats_head = None;
        Ok(true)
    }

    fn pages<M: GuestMemory + ?Sized>(
        &mut self,
        qi: usize,
        inflate: bool,
        queues: &mut QueueSet<'_>,
        mem: &M,
    ) -> Result<(), DeviceError> {
        let q = queues.get(qi)?;
        while q.pop(mem, &mut self.chain)? {
            let len = self.chain.readable_len();
            // virtio 1.2 §5.5.6: the buffer is an array of 32-bit PFNs.
            if !len.is_multiple_of(4) || len / 4 > MAX_PFNS {
                return Err(DeviceError::Malformed("balloon PFN array (5.5.6)"));
            }
            for i in 0..len / 4 {
                let mut b = [0u8; 4];
                self.chain.read_at(mem, 4 * i, &mut b)?;
                let page = GuestAddr(u64::from(u32::from_le_bytes(b)) * BALLOON_PAGE);
                // A PFN the guest does not own is an allegation we refuse.
                if mem.check(page, BALLOON_PAGE).is_err() {
                    self.counters.bad_pfns += 1;
                    continue;
                }
                if inflate {
                    self.backend.inflate(page);
                } else {
                    self.backend.deflate(page);
                }
            }
            q.add_used(mem, self.chain.head(), 0)?;
        }
        Ok(())
    }

    fn stats<M: GuestMemory + ?Sized>(
        &mut self,
        qi: usize,
        queues: &mut QueueSet<'_>,
        mem: &M,
    ) -> Result<(), DeviceError> {
        let q = queues.get(qi)?;
        while q.pop(mem, &mut self.chain)? {
            // virtio 1.2 §5.5.6.3: a buffer of packed {le16 tag; le64 val} entries; we keep
            // the whole entries among the first MAX_STATS.
            let n = (self.chain.readable_len() / 10).min(MAX_STATS_U32);
            self.guest_stats.clear();
            for i in 0..n {
                let mut e = [0u8; 10];
                self.chain.read_at(mem, 10 * i, &mut e)?;
                let tag = u16::from_le_bytes([e[0], e[1]]);
                let val = u64::from_le_bytes([e[2], e[3], e[4], e[5], e[6], e[7], e[8], e[9]]);
                self.guest_stats.push((tag, val));
            }
            self.counters.stats_updates += 1;
            // virtio 1.2 §5.5.6.3: the device keeps the buffer until it wants new stats. A
            // second buffer while we hold one: give the older back.
            if let Some(old) = self.stats_head.replace(self.chain.head()) {
                q.add_used(mem, old, 0)?;
            }
        }
        Ok(())
    }

    fn reporting<M: GuestMemory + ?Sized>(
        &mut self,
        qi: usize,
        queues: &mut QueueSet<'_>,
        mem: &M,
    ) -> Result<(), DeviceError> {
        let q = queues.get(qi)?;
        while q.pop(mem, &mut self.chain)? {
            // virtio 1.2 §5.5.6.5: each buffer of the chain is a free range; the device
            // returns the chain once it has taken note.
            for seg in self.chain.writable().iter().chain(self.chain.readable()) {
                if mem.check(seg.addr, u64::from(seg.len)).is_ok() {
                    self.backend.report_free(seg.addr, u64::from(seg.len));
                } else {
                    self.counters.bad_pfns += 1;
                }
            }
            q.add_used(mem, self.chain.head(), 0)?;
        }
        Ok(())
    }
}

impl<B: BalloonBackend> VirtioDevice for BalloonDevice<B> {
    fn device_id(&self) -> u32 {
        DEVICE_ID_BALLOON
    }
    fn device_features(&self) -> u64 {
        feature::STATS_VQ | feature::DEFLATE_ON_OOM | feature::PAGE_REPORTING
    }
    fn num_queues(&self) -> usize {
        4
    }
    fn queue_max_size(&self, _index: usize) -> u16 {
        QUEUE_SIZE
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // virtio 1.2 §5.5.4: num_pages u32, actual u32 (free_page_hint_cmd_id, poison_val
        // read as 0: features not offered).
        let mut c = [0u8; 16];
        c[0..4].copy_from_slice(&self.target_pages.to_le_bytes());
        c[4..8].copy_from_slice(&self.actual_pages.to_le_bytes());
        read_config_bytes(&c, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) -> bool {
        // virtio 1.2 §5.5.4: the driver writes only `actual`, as one 32-bit field.
        if offset == 4 && data.len() == 4 {
            self.actual_pages = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        }
        false
    }
    fn activate(&mut self, features: u64) {
        self.features = features;
        self.roles = [Some(Role::Inflate), Some(Role::Deflate), None, None];
        let mut next = 2;
        if features & feature::STATS_VQ != 0 {
            self.roles[next] = Some(Role::Stats);
            next += 1;
        }
        if features & feature::PAGE_REPORTING != 0 {
            self.roles[next] = Some(Role::Reporting);
        }
    }
    fn reset(&mut self) {
        self.features = 0;
        self.roles = [None; 4];
        self.stats_head = None;
        self.actual_pages = 0;
    }
    fn queue_notify<M: GuestMemory + ?Sized>(
        &mut self,
        queue: usize,
        queues: &mut QueueSet<'_>,
        mem: &M,
    ) -> Result<(), DeviceError> {
        match self.roles.get(queue).copied().flatten() {
            Some(Role::Inflate) => self.pages(queue, true, queues, mem),
            Some(Role::Deflate) => self.pages(queue, false, queues, mem),
            Some(Role::Stats) => self.stats(queue, queues, mem),
            Some(Role::Reporting) => self.reporting(queue, queues, mem),
            None => Err(DeviceError::QueueNotReady(queue)),
        }
    }
}
