//! A virtio-blk device (virtio 1.2 §5.2) whose requests are served elsewhere, later: the
//! guest's disk when dom0's block backend serves it.
//!
//! On a notification the model pops each chain, checks it as [`super::block`] does (header
//! readable, status byte writable, data a multiple of 512 within the disk and within one
//! request's limit), answers at once what needs no backend (IOERR, UNSUPP), and hands the rest
//! to a [`BlockPort`] together with the write data it copied out of the guest's buffers. The
//! chain is kept until [`RemoteBlock::complete`] brings the result: read data is copied into
//! the chain's writable buffers, the status byte written and the chain returned to the
//! driver. A guest vCPU never waits for the disk inside an exit.
//!
//! When the port has no room, the chain goes back to the available ring (`undo_pop`) and is
//! popped again after the next completion. While requests are in flight the driver is asked
//! not to notify (virtio 1.2 §2.7.10): every completion looks at the available ring again, so
//! a busy queue costs no exit per request; notifications go back on when nothing is in flight. A reset forgets every chain in flight: each
//! request carries the device's *generation*, and a completion from before the reset is
//! dropped (its buffers may already belong to a new request).

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use super::block::{DEVICE_ID_BLOCK, MAX_DISCARD_SECTORS, QUEUE_SIZE, S_IOERR, S_OK, S_UNSUPP};
use super::block::{SECTOR_SIZE, feature, req};
use crate::device::{DeviceError, QueueSet, VirtioDevice, read_config_bytes};
use crate::mem::GuestMemory;
use crate::queue::Chain;

/// `VIRTIO_BLK_F_SIZE_MAX` (virtio 1.2 §5.2.3): `size_max` bounds each segment.
pub const F_SIZE_MAX: u64 = 1 << 1;
/// `VIRTIO_BLK_F_WRITE_ZEROES` (virtio 1.2 §5.2.3).
pub const F_WRITE_ZEROES: u64 = 1 << 14;
/// `VIRTIO_BLK_T_WRITE_ZEROES` (virtio 1.2 §5.2.6).
pub const T_WRITE_ZEROES: u32 = 13;

/// What a request asks of the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
}

/// One request for the backend. `data` holds a write's bytes; `sectors` is the transfer's
/// length (reads and writes) or the range's (discard, write-zeroes).
#[derive(Debug)]
pub struct PortRequest<'a> {
    /// Which chain, in which generation of the device: given back to [`RemoteBlock::complete`].
    pub token: Token,
    pub op: Op,
    pub sector: u64,
    pub sectors: u32,
    pub data: &'a [u8],
}

/// Identifies a request in flight: the device's generation and the chain's head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Token {
    pub generation: u32,
    pub head: u16,
}

/// The port has no room now; the request is retried after a completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Busy;

/// Where the requests go.
pub trait BlockPort {
    /// Starts `req`; its result comes back through [`RemoteBlock::complete`].
    fn submit(&mut self, req: PortRequest<'_>) -> Result<(), Busy>;
}

/// Per-device counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RemoteStats {
    pub submitted: u64,
    pub completed: u64,
    pub io_errors: u64,
    pub unsupported: u64,
    /// Times the port was full and a chain went back to the ring.
    pub busy: u64,
    /// Completions for no chain in flight (stale after a reset, or a bad token).
    pub stale: u64,
    /// Largest number of requests in flight at once.
    pub max_in_flight: u64,
}

/// A checked request to forward: its operation, range and the bytes the backend may put
/// into the chain; or the status it is answered with at once.
type Classified = Result<(Op, u64, u32, u32), u8>;

/// What a chain in flight waits for.
struct InFlight {
    chain: Chain,
    op: Op,
    /// Bytes the backend may put into the chain (reads, GET_ID).
    want: u32,
}

/// The device model.
pub struct RemoteBlock<P> {
    port: P,
    capacity: u64,
    read_only: bool,
    /// Largest read or write, bytes (a multiple of 4096).
    max_transfer: u32,
    features: u64,
    generation: u32,
    in_flight: BTreeMap<u16, InFlight>,
    /// The port was full: pop again after the next completion.
    stalled: bool,
    bounce: Vec<u8>,
    stats: RemoteStats,
}

impl<P: BlockPort> RemoteBlock<P> {
    /// A disk of `capacity` sectors served through `port`, with at most `max_transfer` bytes
    /// per read or write (a multiple of 4096, advertised as `seg_max` × `size_max`).
    pub fn new(port: P, capacity: u64, read_only: bool, max_transfer: u32) -> Self {
        RemoteBlock {
            port,
            capacity,
            read_only,
            max_transfer: (max_transfer / 4096).max(1) * 4096,
            features: 0,
            generation: 0,
            in_flight: BTreeMap::new(),
            stalled: false,
            bounce: Vec::new(),
            stats: RemoteStats::default(),
        }
    }

    pub fn port(&self) -> &P {
        &self.port
    }

    pub fn port_mut(&mut self) -> &mut P {
        &mut self.port
    }

    pub fn stats(&self) -> RemoteStats {
        self.stats
    }

    /// Requests handed to the port and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn config(&self) -> [u8; 64] {
        let mut c = [0u8; 64];
        // virtio 1.2 §5.2.4: struct virtio_blk_config.
        c[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        // size_max and seg_max: a request moves at most max_transfer bytes.
        c[8..12].copy_from_slice(&4096u32.to_le_bytes());
        c[12..16].copy_from_slice(&(self.max_transfer / 4096).to_le_bytes());
        c[20..24].copy_from_slice(&512u32.to_le_bytes());
        c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&1u32.to_le_bytes());
        c[44..48].copy_from_slice(&1u32.to_le_bytes());
        c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[52..56].copy_from_slice(&1u32.to_le_bytes());
        c
    }

    fn in_range(&self, sector: u64, sectors: u64) -> bool {
        sector
            .checked_add(sectors)
            .is_some_and(|end| end <= self.capacity)
    }

    /// Classifies the popped chain: `Ok(Some(..))` to forward, `Ok(None)` when it was
    /// answered in-band (status in `answer`).
    fn classify<M: GuestMemory + ?Sized>(
        &self,
        chain: &Chain,
        mem: &M,
    ) -> Result<Classified, DeviceError> {
        // virtio 1.2 §5.2.6: a 16-byte device-readable header, a 1-byte writable status.
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
        let transfer = |len: u32| -> Result<u32, u8> {
            if !u64::from(len).is_multiple_of(SECTOR_SIZE) || len > self.max_transfer || len == 0 {
                return Err(S_IOERR);
            }
            let sectors = len / 512;
            if !self.in_range(sector, u64::from(sectors)) {
                return Err(S_IOERR);
            }
            Ok(sectors)
        };
        Ok(match kind {
            req::IN => transfer(status_off).map(|n| (Op::Read, sector, n, status_off)),
            // virtio 1.2 §5.2.6.2: a read-only device fails writes with IOERR.
            req::OUT if self.read_only || self.features & feature::RO != 0 => Err(S_IOERR),
            req::OUT => transfer(out_len).map(|n| (Op::Write, sector, n, 0)),
            req::FLUSH if self.features & feature::FLUSH != 0 => Ok((Op::Flush, 0, 0, 0)),
            req::GET_ID => Ok((Op::GetId, 0, 0, status_off.min(20))),
            req::DISCARD if self.features & feature::DISCARD != 0 && !self.read_only => {
                self.range_request(chain, mem, out_len, Op::Discard)?
            }
            T_WRITE_ZEROES if self.features & F_WRITE_ZEROES != 0 && !self.read_only => {
                self.range_request(chain, mem, out_len, Op::WriteZeroes)?
            }
            _ => Err(S_UNSUPP),
        })
    }

    /// DISCARD and WRITE_ZEROES: one 16-byte segment (we advertise `max_discard_seg` = 1).
    fn range_request<M: GuestMemory + ?Sized>(
        &self,
        chain: &Chain,
        mem: &M,
        len: u32,
        op: Op,
    ) -> Result<Classified, DeviceError> {
        if len != 16 {
            return Ok(Err(S_IOERR));
        }
        let mut seg = [0u8; 16];
        chain.read_at(mem, 16, &mut seg)?;
        let sector = u64::from_le_bytes([
            seg[0], seg[1], seg[2], seg[3], seg[4], seg[5], seg[6], seg[7],
        ]);
        let count = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
        let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
        // virtio 1.2 §5.2.6.2: unknown flags (and unmap on discard) are UNSUPP; only
        // write-zeroes may carry the unmap bit (bit 0), as a hint.
        let allowed = if op == Op::WriteZeroes { 1 } else { 0 };
        if flags & !allowed != 0 {
            return Ok(Err(S_UNSUPP));
        }
        if count == 0 || count > MAX_DISCARD_SECTORS || !self.in_range(sector, u64::from(count)) {
            return Ok(Err(S_IOERR));
        }
        Ok(Ok((op, sector, count, 0)))
    }

    /// Pops and forwards what the driver made available, until the ring is empty or the
    /// port is full.
    fn drain<M: GuestMemory + ?Sized>(
        &mut self,
        queues: &mut QueueSet<'_>,
        mem: &M,
    ) -> Result<(), DeviceError> {
        let q = queues.get(0)?;
        self.stalled = false;
        loop {
            q.disable_notifications(mem)?;
            let mut chain = Chain::new();
            while q.pop(mem, &mut chain)? {
                let head = chain.head();
                if self.in_flight.contains_key(&head) {
                    // virtio 1.2 §2.7.13.1: a driver must not make a buffer available
                    // again before the device used it.
                    return Err(DeviceError::Malformed(
                        "descriptor chain made available while in flight (2.7.13)",
                    ));
                }
                match self.classify(&chain, mem)? {
                    Err(status) => {
                        match status {
                            S_UNSUPP => self.stats.unsupported += 1,
                            _ => self.stats.io_errors += 1,
                        }
                        chain.write_at(mem, chain.writable_len() - 1, &[status])?;
                        q.add_used(mem, head, 1)?;
                    }
                    Ok((op, sector, sectors, want)) => {
                        if op == Op::Write {
                            self.bounce.resize(sectors as usize * 512, 0);
                            chain.read_at(mem, 16, &mut self.bounce)?;
                        }
                        let token = Token {
                            generation: self.generation,
                            head,
                        };
                        let data = if op == Op::Write {
                            &self.bounce[..]
                        } else {
                            &[]
                        };
                        let r = self.port.submit(PortRequest {
                            token,
                            op,
                            sector,
                            sectors,
                            data,
                        });
                        if r.is_err() {
                            self.stats.busy += 1;
                            q.undo_pop();
                            self.stalled = true;
                            return Ok(());
                        }
                        self.stats.submitted += 1;
                        self.in_flight.insert(head, InFlight { chain, op, want });
                        self.stats.max_in_flight =
                            self.stats.max_in_flight.max(self.in_flight.len() as u64);
                        chain = Chain::new();
                    }
                }
            }
            // While requests are in flight, their completions look at the ring again
            // (`finish`), so the driver need not notify: notifications stay off, and a busy
            // queue costs no exit per request. They go back on once nothing is in flight.
            if !self.in_flight.is_empty() {
                q.suppress_notifications(mem)?;
                return Ok(());
            }
            if !q.enable_notifications(mem)? {
                return Ok(());
            }
        }
    }

    /// The backend finished the request `token` with virtio status `status` and, for reads
    /// and GET_ID, `data`. Run through [`crate::MmioTransport::with_device`] so the used-buffer
    /// interrupt is raised. A stale token (before a reset, or for no chain in flight) is
    /// dropped.
    pub fn complete<M: GuestMemory + ?Sized>(
        &mut self,
        token: Token,
        status: u8,
        data: &[u8],
        queues: &mut QueueSet<'_>,
        mem: &M,
    ) -> Result<(), DeviceError> {
        if token.generation != self.generation {
            self.stats.stale += 1;
            return Ok(());
        }
        let Some(f) = self.in_flight.remove(&token.head) else {
            self.stats.stale += 1;
            return Ok(());
        };
        let status = match status {
            S_OK | S_UNSUPP => status,
            _ => S_IOERR,
        };
        let mut written = 0;
        if status == S_OK && matches!(f.op, Op::Read | Op::GetId) {
            // The backend may give less (an ID shorter than 20 bytes), never more.
            let n = data.len().min(f.want as usize);
            if f.op == Op::Read && n != f.want as usize {
                return self.finish(f, token.head, S_IOERR, 0, queues, mem);
            }
            f.chain.write_at(mem, 0, &data[..n])?;
            // At most `f.want`, a u32.
            written = u32::try_from(n).unwrap_or(f.want);
        }
        self.finish(f, token.head, status, written, queues, mem)
    }

    fn finish<M: GuestMemory + ?Sized>(
        &mut self,
        f: InFlight,
        head: u16,
        status: u8,
        written: u32,
        queues: &mut QueueSet<'_>,
        mem: &M,
    ) -> Result<(), DeviceError> {
        match status {
            S_OK => {}
            S_UNSUPP => self.stats.unsupported += 1,
            _ => self.stats.io_errors += 1,
        }
        self.stats.completed += 1;
        f.chain
            .write_at(mem, f.chain.writable_len() - 1, &[status])?;
        // virtio 1.2 §2.7.8.1: `len` counts the bytes written, status included.
        queues.get(0)?.add_used(mem, head, written + 1)?;
        // New requests the driver made available while this one was in flight (it was not
        // asked to notify), or ones the port had no room for.
        self.drain(queues, mem)
    }
}

impl<P: BlockPort> VirtioDevice for RemoteBlock<P> {
    fn device_id(&self) -> u32 {
        DEVICE_ID_BLOCK
    }
    fn device_features(&self) -> u64 {
        let mut f = feature::SEG_MAX | F_SIZE_MAX | feature::BLK_SIZE | feature::FLUSH;
        if self.read_only {
            f |= feature::RO;
        } else {
            f |= feature::DISCARD | F_WRITE_ZEROES;
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
        false
    }
    fn activate(&mut self, features: u64) {
        self.features = features;
    }
    fn reset(&mut self) {
        self.features = 0;
        self.generation = self.generation.wrapping_add(1);
        self.in_flight.clear();
        self.stalled = false;
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
        self.drain(queues, mem)
    }
}
