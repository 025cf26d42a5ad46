//! virtio-blk device model (virtio 1.2 §5.2): read, write, flush, discard and get-id
//! requests on one request queue, served by a [`BlockBackend`].
//!
//! The model owns a bounce buffer: data moves guest memory → bounce → backend (and back) by
//! checked copies, so the backend never sees guest memory. Every request is checked before
//! any side effect: the header is readable, the status byte is writable, data lengths are
//! multiples of 512 and the sector range is inside the disk. Requests the protocol can
//! refuse are answered with IOERR or UNSUPP; a chain without a header or status byte is a
//! protocol violation and breaks the device.

use alloc::vec::Vec;

use crate::device::{DeviceError, QueueSet, VirtioDevice, read_config_bytes};
use crate::mem::GuestMemory;
use crate::queue::Chain;

/// Device type of virtio-blk (virtio 1.2 §5.2.1).
pub const DEVICE_ID_BLOCK: u32 = 2;
/// Bytes per sector in requests (virtio 1.2 §5.2.6).
pub const SECTOR_SIZE: u64 = 512;

/// Feature bits (virtio 1.2 §5.2.3).
pub mod feature {
    pub const SEG_MAX: u64 = 1 << 2;
    pub const RO: u64 = 1 << 5;
    pub const BLK_SIZE: u64 = 1 << 6;
    pub const FLUSH: u64 = 1 << 9;
    pub const DISCARD: u64 = 1 << 13;
}

/// Request types (virtio 1.2 §5.2.6).
pub mod req {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
    pub const DISCARD: u32 = 11;
}

/// Status byte values (virtio 1.2 §5.2.6).
pub const S_OK: u8 = 0;
/// Status: I/O error.
pub const S_IOERR: u8 = 1;
/// Status: unsupported request.
pub const S_UNSUPP: u8 = 2;

/// Length of the device ID string (virtio 1.2 §5.2.6).
pub const ID_BYTES: usize = 20;
/// Largest discard, in sectors, advertised in `max_discard_sectors`.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Discard segments per request, advertised in `max_discard_seg`.
pub const MAX_DISCARD_SEG: u32 = 16;
/// Queue size offered.
pub const QUEUE_SIZE: u16 = 256;
/// Largest data transfer per request we accept (bounds the bounce buffer).
pub const MAX_TRANSFER: u32 = 4 << 20;

/// The backend refused or failed an operation; the guest sees IOERR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendError;

/// Where block requests go (dom0's block backend, or a RAM disk in tests).
pub trait BlockBackend {
    /// Disk size in 512-byte sectors.
    fn capacity_sectors(&self) -> u64;
    /// Whether writes are refused.
    fn read_only(&self) -> bool {
        false
    }
    /// Reads `buf.len()` bytes (a multiple of 512) from `sector`.
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BackendError>;
    /// Writes `buf` (a multiple of 512 bytes) at `sector`.
    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), BackendError>;
    /// Makes completed writes durable.
    fn flush(&mut self) -> Result<(), BackendError>;
    /// The range may be deallocated.
    fn discard(&mut self, sector: u64, sectors: u32) -> Result<(), BackendError>;
    /// Serial number shown to the guest.
    fn device_id(&self) -> [u8; ID_BYTES];
}

/// A RAM disk, for tests and benchmarks.
pub struct MemDisk {
    data: Vec<u8>,
    read_only: bool,
    pub flushes: u64,
    pub discards: u64,
}

impl MemDisk {
    /// A zeroed disk of `sectors` sectors.
    pub fn new(sectors: u64, read_only: bool) -> MemDisk {
        MemDisk {
            data: alloc::vec![0; usize::try_from(sectors * SECTOR_SIZE).unwrap_or(0)],
            read_only,
            flushes: 0,
            discards: 0,
        }
    }
    /// The disk's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }
    fn range(&self, sector: u64, len: usize) -> Result<core::ops::Range<usize>, BackendError> {
        let start = usize::try_from(sector.checked_mul(SECTOR_SIZE).ok_or(BackendError)?)
            .map_err(|_| BackendError)?;
        let end = start.checked_add(len).ok_or(BackendError)?;
        if end > self.data.len() {
            return Err(BackendError);
        }
        Ok(start..end)
    }
}

impl BlockBackend for MemDisk {
    fn capacity_sectors(&self) -> u64 {
        self.data.len() as u64 / SECTOR_SIZE
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        let r = self.range(sector, buf.len())?;
        buf.copy_from_slice(&self.data[r]);
        Ok(())
    }
    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), BackendError> {
        let r = self.range(sector, buf.len())?;
        self.data[r].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), BackendError> {
        self.flushes += 1;
        Ok(())
    }
    fn discard(&mut self, sector: u64, sectors: u32) -> Result<(), BackendError> {
        let len = usize::try_from(u64::from(sectors) * SECTOR_SIZE).map_err(|_| BackendError)?;
        let r = self.range(sector, len)?;
        self.data[r].fill(0);
        self.discards += 1;
        Ok(())
    }
    fn device_id(&self) -> [u8; ID_BYTES] {
        let mut id = [0u8; ID_BYTES];
        id[..10].copy_from_slice(b"hv-memdisk");
        id
    }
}

/// Per-device counters (guest-triggered, never logged one by one).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockStats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub io_errors: u64,
    pub unsupported: u64,
}

/// The virtio-blk device model.
pub struct BlockDevice<B> {
    backend: B,
    features: u64,
    chain: Chain,
    bounce: Vec<u8>,
    stats: BlockStats,
}

impl<B: BlockBackend> BlockDevice<B> {
    /// A block device serving `backend`.
    pub fn new(backend: B) -> Self {
        BlockDevice {
            backend,
            features: 0,
            chain: Chain::new(),
            bounce: Vec::new(),
            stats: BlockStats::default(),
        }
    }
    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }
    /// Request counters.
    pub fn stats(&self) -> BlockStats {
        self.stats
    }

    fn config(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        // virtio 1.2 §5.2.4: struct virtio_blk_config.
        c[0..8].copy_from_slice(&self.backend.capacity_sectors().to_le_bytes());
        // seg_max: a request is header + data segments + status within one queue.
        c[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        c[20..24].copy_from_slice(&512u32.to_le_bytes());
        c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
        c[44..48].copy_from_slice(&1u32.to_le_bytes());
        c
    }

    /// Serves one popped chain; returns the number of bytes written into it.
    fn serve<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<u32, DeviceError> {
        let chain = &self.chain;
        // virtio 1.2 §5.2.6 / §5.2.6.1: a request starts with a 16-byte device-readable
        // header and ends with a 1-byte device-writable status.
        let mut hdr = [0u8; 16];
        chain
            .read_at(mem, 0, &mut hdr)
            .map_err(|_| DeviceError::Malformed("virtio-blk header (5.2.6)"))?;
        if chain.writable_len() == 0 {
            return Err(DeviceError::Malformed("virtio-blk status byte (5.2.6)"));
        }
        let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes([
            hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
        ]);
        let status_off = chain.writable_len() - 1;
        let out_len = chain.readable_len() - 16;
        let (status, written) = match kind {
            req::IN => {
                let len = status_off;
                match self.check_range(sector, len) {
                    Err(s) => (s, 0),
                    Ok(()) => {
                        self.bounce.resize(len as usize, 0);
                        if self.backend.read(sector, &mut self.bounce).is_ok() {
                            self.chain.write_at(mem, 0, &self.bounce)?;
                            self.stats.reads += 1;
                            (S_OK, len)
                        } else {
                            (S_IOERR, 0)
                        }
                    }
                }
            }
            req::OUT => {
                // virtio 1.2 §5.2.6.2: a read-only device fails writes with IOERR and
                // writes no data.
                if self.features & feature::RO != 0 || self.backend.read_only() {
                    (S_IOERR, 0)
                } else {
                    match self.check_range(sector, out_len) {
                        Err(s) => (s, 0),
                        Ok(()) => {
                            self.bounce.resize(out_len as usize, 0);
                            self.chain.read_at(mem, 16, &mut self.bounce)?;
                            if self.backend.write(sector, &self.bounce).is_ok() {
                                self.stats.writes += 1;
                                (S_OK, 0)
                            } else {
                                (S_IOERR, 0)
                            }
                        }
                    }
                }
            }
            req::FLUSH if self.features & feature::FLUSH != 0 => {
                self.stats.flushes += 1;
                if self.backend.flush().is_ok() {
                    (S_OK, 0)
                } else {
                    (S_IOERR, 0)
                }
            }
            req::GET_ID => {
                let id = self.backend.device_id();
                let n = status_off.min(20);
                self.chain.write_at(mem, 0, &id[..n as usize])?;
                (S_OK, n)
            }
            req::DISCARD if self.features & feature::DISCARD != 0 => {
                (self.discard(mem, out_len)?, 0)
            }
            // virtio 1.2 §5.2.6.2: unknown or unnegotiated requests get UNSUPP.
            _ => (S_UNSUPP, 0),
        };
        match status {
            S_OK => {}
            S_UNSUPP => self.stats.unsupported += 1,
            _ => self.stats.io_errors += 1,
        }
        self.chain.write_at(mem, status_off, &[status])?;
        // virtio 1.2 §2.7.8.1: `len` counts the bytes written, status included.
        Ok(written + 1)
    }

    /// Checks a data transfer: virtio 1.2 §5.2.6.1 (length a multiple of 512) and the range
    /// within the disk (§5.2.6.2: out-of-range requests fail with IOERR).
    fn check_range(&self, sector: u64, len: u32) -> Result<(), u8> {
        if !u64::from(len).is_multiple_of(SECTOR_SIZE) || len > MAX_TRANSFER {
            return Err(S_IOERR);
        }
        let end = sector
            .checked_add(u64::from(len) / SECTOR_SIZE)
            .ok_or(S_IOERR)?;
        if end > self.backend.capacity_sectors() {
            return Err(S_IOERR);
        }
        Ok(())
    }

    fn discard<M: GuestMemory + ?Sized>(&mut self, mem: &M, len: u32) -> Result<u8, DeviceError> {
        // virtio 1.2 §5.2.6: the payload is an array of 16-byte
        // virtio_blk_discard_write_zeroes segments.
        if len == 0 || !len.is_multiple_of(16) || len / 16 > MAX_DISCARD_SEG {
            return Ok(S_IOERR);
        }
        let mut segs = [[0u8; 16]; MAX_DISCARD_SEG as usize];
        let n = (len / 16) as usize;
        let mut off = 16;
        for seg in segs.iter_mut().take(n) {
            self.chain.read_at(mem, off, seg)?;
            off += 16;
        }
        // Check all segments before discarding any.
        for seg in &segs[..n] {
            let sector = u64::from_le_bytes([
                seg[0], seg[1], seg[2], seg[3], seg[4], seg[5], seg[6], seg[7],
            ]);
            let count = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
            let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
            // virtio 1.2 §5.2.6.2: UNSUPP for discard with the unmap flag or any unknown
            // flag set.
            if flags != 0 {
                return Ok(S_UNSUPP);
            }
            // virtio 1.2 §5.2.6.2: IOERR beyond max_discard_sectors or the disk.
            let end = sector.checked_add(u64::from(count));
            if count > MAX_DISCARD_SECTORS
                || end.is_none_or(|e| e > self.backend.capacity_sectors())
            {
                return Ok(S_IOERR);
            }
        }
        for seg in &segs[..n] {
            let sector = u64::from_le_bytes([
                seg[0], seg[1], seg[2], seg[3], seg[4], seg[5], seg[6], seg[7],
            ]);
            let count = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
            if self.backend.discard(sector, count).is_err() {
                return Ok(S_IOERR);
            }
        }
        self.stats.discards += 1;
        Ok(S_OK)
    }
}

impl<B: BlockBackend> VirtioDevice for BlockDevice<B> {
    fn device_id(&self) -> u32 {
        DEVICE_ID_BLOCK
    }
    fn device_features(&self) -> u64 {
        let mut f = feature::SEG_MAX | feature::BLK_SIZE | feature::FLUSH | feature::DISCARD;
        if self.backend.read_only() {
            f |= feature::RO;
        }
        f
    }
    fn num_queues(&self) -> usize {
        1
    }
    fn queue_max_size(&self, _index: usize) -> u16 {
        QUEUE_SIZE
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) -> bool {
        // virtio 1.2 §5.2.4: only `writeback` is writable, and only with CONFIG_WCE, which
        // we do not offer.
        false
    }
    fn activate(&mut self, features: u64) {
        self.features = features;
    }
    fn reset(&mut self) {
        self.features = 0;
    }
    fn queue_notify<M: GuestMemory + ?Sized>(
        &mut self,
        queue: usize,
        queues: &mut QueueSet<'_>,
        mem: &M,
    ) -> Result<(), DeviceError> {
        if queue != 0 {
            return Err(DeviceError::QueueNotReady(queue));
        }
        let q = queues.get(0)?;
        loop {
            q.disable_notifications(mem)?;
            while q.pop(mem, &mut self.chain)? {
                let len = self.serve(mem)?;
                q.add_used(mem, self.chain.head(), len)?;
            }
            if !q.enable_notifications(mem)? {
                return Ok(());
            }
        }
    }
}
