//! The block-device seam: everything the volume manager knows about a disk.
//!
//! A device is an array of 4 KiB blocks with `read`, `write` and `flush`. Writes may sit in a
//! volatile cache: only a completed `flush` makes every earlier acknowledged write durable.
//! [`MemDisk`] is a plain in-memory device (no cache) for tests, RAM disks and tools.
//!
//! # Submission and completion
//!
//! Besides the synchronous calls, a device takes requests with [`BlockDevice::submit`] and
//! hands back their [`Completion`]s from [`BlockDevice::reap`], so that many requests can be
//! in flight on one device and on many devices at once. The rules every device keeps:
//!
//! * A request is *in flight* from `submit` until its completion is returned (by `submit`
//!   itself, for a device that finished it at once, or by a later `reap`).
//!   [`BlockDevice::queue_depth`] counts the requests in flight.
//! * Requests in flight are not ordered among themselves: two overlapping writes in flight
//!   together may land in either order. Nor are they ordered with the synchronous calls.
//! * A [`Request::Flush`] makes durable every write whose completion was returned before the
//!   flush was submitted.
//! * `reap(out, true)` returns only once at least one completion was added to `out`, or when
//!   nothing is in flight; it never waits for a request that was not submitted.
//! * Dropping a device waits for (or cancels) what it has in flight.
//!
//! The default methods make any synchronous device a queue of depth 0: `submit` performs the
//! request at once with `read`/`write`/`flush` ([`complete_now`]) and returns its completion.
//! A device with its own queue (a worker pool over a file, a hardware ring) overrides all
//! three; its synchronous calls stay a thin path for tools and metadata.

use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;

use crate::{u, us};

/// Size of one block in bytes; every request is a whole number of blocks.
pub const BLOCK_SIZE: usize = 4096;
/// [`BLOCK_SIZE`] as `u64`.
pub const BLOCK: u64 = 4096;

/// What a device can report about a failed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DevError {
    /// The medium or transport failed this request; the device may work for others.
    #[error("I/O error")]
    Io,
    /// The device has gone away (unplugged, crashed, path lost); nothing will work.
    #[error("device is gone")]
    Gone,
    /// The request reaches past the end of the device.
    #[error("request beyond end of device")]
    OutOfRange,
    /// The buffer is not a whole number of blocks.
    #[error("buffer is not a whole number of 4 KiB blocks")]
    Misaligned,
}

/// The bytes of a write request: a shared buffer and a range of it, so that mirror legs and
/// stripe columns each take their part of one caller buffer without copying it again.
#[derive(Clone)]
pub struct WriteData {
    buf: Arc<[u8]>,
    start: usize,
    end: usize,
}

impl WriteData {
    /// Takes `bytes` (copied once into a shared buffer).
    #[must_use]
    pub fn new(bytes: &[u8]) -> Self {
        Self {
            buf: Arc::from(bytes),
            start: 0,
            end: bytes.len(),
        }
    }

    /// Bytes `[from, to)` of this request's bytes (clamped to them).
    #[must_use]
    pub fn slice(&self, from: usize, to: usize) -> Self {
        let len = self.end - self.start;
        let (from, to) = (from.min(len), to.min(len));
        Self {
            buf: self.buf.clone(),
            start: self.start + from,
            end: self.start + to.max(from),
        }
    }

    /// The bytes to write.
    #[must_use]
    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }
}

impl core::fmt::Debug for WriteData {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "WriteData({} bytes)", self.end - self.start)
    }
}

/// One request submitted to a device.
#[derive(Debug, Clone)]
pub enum Request {
    /// Read `blocks` blocks at `lba`; the data comes back in [`Completion::data`].
    Read { lba: u64, blocks: u64 },
    /// Write whole blocks at `lba`.
    Write { lba: u64, data: WriteData },
    /// Make every write completed before this was submitted durable.
    Flush,
}

/// A finished request: its tag (chosen by the submitter), its result, and for a read its
/// data (empty otherwise, and after a failure).
#[derive(Debug)]
pub struct Completion {
    pub tag: u64,
    pub result: Result<(), DevError>,
    pub data: Vec<u8>,
}

/// What a device calls when a submitted request has completed on another thread (its
/// completion is then ready for [`BlockDevice::reap`]), so that a caller can wait for
/// completions without holding the device ([`BlockDevice::set_waker`]).
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// Performs `req` on `dev` with its synchronous calls and returns the completion.
pub fn complete_now<D: BlockDevice + ?Sized>(dev: &mut D, tag: u64, req: Request) -> Completion {
    let (result, data) = match req {
        Request::Read { lba, blocks } => {
            let len = us(blocks).checked_mul(BLOCK_SIZE);
            match len {
                Some(len) if check_range(dev.num_blocks(), lba, len).is_ok() => {
                    let mut data = vec![0u8; len];
                    match dev.read(lba, &mut data) {
                        Ok(()) => (Ok(()), data),
                        Err(e) => (Err(e), Vec::new()),
                    }
                }
                _ => (Err(DevError::OutOfRange), Vec::new()),
            }
        }
        Request::Write { lba, data } => (dev.write(lba, data.bytes()), Vec::new()),
        Request::Flush => (dev.flush(), Vec::new()),
    };
    Completion { tag, result, data }
}

/// A disk, a partition, an image file or one path to a multipath disk.
///
/// Devices are `Send`: a pool (and its devices) may be handed to, and shared under a lock
/// between, the threads that serve its volumes ([`crate::pool::SharedPool`]).
pub trait BlockDevice: Send {
    /// Number of 4 KiB blocks.
    fn num_blocks(&self) -> u64;
    /// Reads `buf.len() / BLOCK_SIZE` blocks starting at `lba`.
    fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), DevError>;
    /// Writes whole blocks starting at `lba`; may be cached until [`BlockDevice::flush`].
    fn write(&mut self, lba: u64, buf: &[u8]) -> Result<(), DevError>;
    /// Makes every previously acknowledged write durable.
    fn flush(&mut self) -> Result<(), DevError>;
    /// Requests in flight on this device (used by the minimum-queue path policy).
    fn queue_depth(&self) -> usize {
        0
    }
    /// Starts `req`, to be reported under `tag`. Returns its completion when the device
    /// finished it at once; otherwise a later [`BlockDevice::reap`] returns it.
    fn submit(&mut self, tag: u64, req: Request) -> Option<Completion> {
        Some(complete_now(self, tag, req))
    }
    /// Moves finished requests into `out`; with `wait`, blocks until there is at least one
    /// (unless nothing is in flight).
    fn reap(&mut self, out: &mut Vec<Completion>, wait: bool) {
        let _ = (out, wait);
    }
    /// Whether a request waits for a medium (a disk, a network) rather than completing in CPU
    /// time, so that overlapping requests on several devices pays even for the pool's own
    /// small writes (metadata, dirty-region log). Page-cache and in-memory devices say no:
    /// there a hand-off to a queue costs more than the request.
    fn waits_on_medium(&self) -> bool {
        false
    }
    /// Asks the device to call `waker` after each submitted request that completes later
    /// (once its completion can be reaped), from whichever thread completes it. Returns
    /// whether it will: a device whose requests only complete inside `reap` or at submission
    /// says no (the default), and a caller then waits inside `reap` itself.
    fn set_waker(&mut self, waker: Waker) -> bool {
        let _ = waker;
        false
    }
}

/// Checks that a request of `len` bytes at `lba` fits a device of `nblocks` blocks.
pub fn check_range(nblocks: u64, lba: u64, len: usize) -> Result<(), DevError> {
    if !len.is_multiple_of(BLOCK_SIZE) {
        return Err(DevError::Misaligned);
    }
    let n = u(len / BLOCK_SIZE);
    match lba.checked_add(n) {
        Some(end) if end <= nblocks => Ok(()),
        _ => Err(DevError::OutOfRange),
    }
}

/// An in-memory device with no cache: every write is durable at once.
#[derive(Clone, Default)]
pub struct MemDisk {
    data: Vec<u8>,
}

impl MemDisk {
    /// A zero-filled disk of `blocks` blocks.
    #[must_use]
    pub fn new(blocks: u64) -> Self {
        Self {
            data: vec![0; us(blocks) * BLOCK_SIZE],
        }
    }

    /// A disk holding `image` (its length is rounded down to whole blocks).
    #[must_use]
    pub fn from_image(mut image: Vec<u8>) -> Self {
        let len = image.len() - image.len() % BLOCK_SIZE;
        image.truncate(len);
        Self { data: image }
    }

    /// The disk's bytes.
    #[must_use]
    pub fn image(&self) -> &[u8] {
        &self.data
    }

    /// Mutable bytes, for tests that corrupt a disk on purpose.
    pub fn image_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }
}

impl BlockDevice for MemDisk {
    fn num_blocks(&self) -> u64 {
        u(self.data.len() / BLOCK_SIZE)
    }

    fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), DevError> {
        check_range(self.num_blocks(), lba, buf.len())?;
        let off = us(lba) * BLOCK_SIZE;
        buf.copy_from_slice(&self.data[off..off + buf.len()]);
        Ok(())
    }

    fn write(&mut self, lba: u64, buf: &[u8]) -> Result<(), DevError> {
        check_range(self.num_blocks(), lba, buf.len())?;
        let off = us(lba) * BLOCK_SIZE;
        self.data[off..off + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DevError> {
        Ok(())
    }
}

impl<T: BlockDevice + ?Sized> BlockDevice for alloc::boxed::Box<T> {
    fn num_blocks(&self) -> u64 {
        (**self).num_blocks()
    }
    fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), DevError> {
        (**self).read(lba, buf)
    }
    fn write(&mut self, lba: u64, buf: &[u8]) -> Result<(), DevError> {
        (**self).write(lba, buf)
    }
    fn flush(&mut self) -> Result<(), DevError> {
        (**self).flush()
    }
    fn queue_depth(&self) -> usize {
        (**self).queue_depth()
    }
    fn submit(&mut self, tag: u64, req: Request) -> Option<Completion> {
        (**self).submit(tag, req)
    }
    fn reap(&mut self, out: &mut Vec<Completion>, wait: bool) {
        (**self).reap(out, wait);
    }
    fn waits_on_medium(&self) -> bool {
        (**self).waits_on_medium()
    }
    fn set_waker(&mut self, waker: Waker) -> bool {
        (**self).set_waker(waker)
    }
}
