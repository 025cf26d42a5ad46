//! The block-device seam: everything the volume manager knows about a disk.
//!
//! A device is an array of 4 KiB blocks with `read`, `write` and `flush`. Writes may sit in a
//! volatile cache: only a completed `flush` makes every earlier acknowledged write durable.
//! [`MemDisk`] is a plain in-memory device (no cache) for tests, RAM disks and tools.

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

/// A disk, a partition, an image file or one path to a multipath disk.
pub trait BlockDevice {
    /// Number of 4 KiB blocks.
    fn num_blocks(&self) -> u64;
    /// Reads `buf.len() / BLOCK_SIZE` blocks starting at `lba`.
    fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), DevError>;
    /// Writes whole blocks starting at `lba`; may be cached until [`BlockDevice::flush`].
    fn write(&mut self, lba: u64, buf: &[u8]) -> Result<(), DevError>;
    /// Makes every previously acknowledged write durable.
    fn flush(&mut self) -> Result<(), DevError>;
    /// Requests currently queued on this device (used by the minimum-queue path policy).
    fn queue_depth(&self) -> usize {
        0
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
}
