//! One ATA drive as a block device of 4 KiB blocks for the volume manager.
//!
//! The two drives of a channel share its registers and its DMA engine, so the channel sits
//! behind a lock that each request holds from its first register access to its last;
//! [`IdeChannel::into_disks`] hands out a disk per drive found.

use alloc::sync::Arc;

use spin::Mutex;
use volmgr::dev::{BLOCK_SIZE, BlockDevice, DevError, check_range};

use super::{Drive, DriveInfo, IdeChannel, SECTOR_SIZE, Stats};
use crate::dma::Dma;
use crate::hw::{Clock, PortIo};

/// Sectors per block.
const SECTORS_PER_BLOCK: u64 = (BLOCK_SIZE / SECTOR_SIZE) as u64;

/// A drive of an [`IdeChannel`], in blocks of [`BLOCK_SIZE`] (a trailing part-block of the
/// drive is not used).
pub struct AtaDisk<P, D: Dma, K> {
    channel: Arc<Mutex<IdeChannel<P, D, K>>>,
    info: DriveInfo,
    blocks: u64,
}

impl<P: PortIo, D: Dma, K: Clock> IdeChannel<P, D, K> {
    /// The drives that the last probe found, master first, as block devices sharing this
    /// channel.
    pub fn into_disks(self) -> [Option<AtaDisk<P, D, K>>; 2] {
        let drives = self.drives.clone();
        let channel = Arc::new(Mutex::new(self));
        drives.map(|d| {
            d.map(|info| AtaDisk {
                channel: channel.clone(),
                blocks: info.sectors / SECTORS_PER_BLOCK,
                info,
            })
        })
    }
}

impl<P: PortIo, D: Dma, K: Clock> AtaDisk<P, D, K> {
    /// What the drive said about itself.
    #[must_use]
    pub fn info(&self) -> &DriveInfo {
        &self.info
    }

    /// Its position on the channel.
    #[must_use]
    pub fn drive(&self) -> Drive {
        self.info.drive
    }

    /// The channel's counters (both drives).
    #[must_use]
    pub fn stats(&self) -> Stats {
        self.channel.lock().stats()
    }

    /// Runs `f` on the channel, holding its lock (for resets, counters, the other drive).
    pub fn with_channel<R>(&self, f: impl FnOnce(&mut IdeChannel<P, D, K>) -> R) -> R {
        f(&mut self.channel.lock())
    }
}

impl<P, D, K> BlockDevice for AtaDisk<P, D, K>
where
    P: PortIo + Send,
    D: Dma + Send,
    D::Buf: Send,
    K: Clock + Send,
{
    fn num_blocks(&self) -> u64 {
        self.blocks
    }

    fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), DevError> {
        check_range(self.blocks, lba, buf.len())?;
        let drive = self.info.drive;
        self.channel
            .lock()
            .read(drive, lba * SECTORS_PER_BLOCK, buf)
            .map_err(DevError::from)
    }

    fn write(&mut self, lba: u64, buf: &[u8]) -> Result<(), DevError> {
        check_range(self.blocks, lba, buf.len())?;
        let drive = self.info.drive;
        self.channel
            .lock()
            .write(drive, lba * SECTORS_PER_BLOCK, buf)
            .map_err(DevError::from)
    }

    fn flush(&mut self) -> Result<(), DevError> {
        let drive = self.info.drive;
        self.channel.lock().flush(drive).map_err(DevError::from)
    }

    fn waits_on_medium(&self) -> bool {
        true
    }
}
