//! PIO transfers through the data port, when there is no DMA: READ SECTORS (EXT) and
//! WRITE SECTORS (EXT), the PIO data-in and data-out protocols of ATA/ATAPI-7 volume 2:
//! per sector wait for DRQ (or ERR/DF), move 256 words, and after the last one wait for
//! BSY to clear and check that the device wants no more data.

use super::channel::IdeChannel;
use super::{AtaError, Drive, SECTOR_SIZE, command, reg, status};
use crate::dma::Dma;
use crate::hw::{Clock, PortIo};

impl<P: PortIo, D: Dma, K: Clock> IdeChannel<P, D, K> {
    /// PIO data-in: READ SECTORS (EXT), one DRQ block of 256 words per sector.
    pub(super) fn pio_read(
        &mut self,
        drive: Drive,
        lba48: bool,
        lba: u64,
        buf: &mut [u8],
    ) -> Result<(), AtaError> {
        let cmd = if lba48 {
            command::READ_SECTORS_EXT
        } else {
            command::READ_SECTORS
        };
        self.issue(drive, cmd, lba, buf.len() / SECTOR_SIZE, lba48)?;
        self.stats.pio_commands += 1;
        let timeout = self.config.timeouts.command_us;
        let data = self.port(reg::DATA);
        for sector in buf.chunks_mut(SECTOR_SIZE) {
            self.delay400();
            let s = self.wait(timeout, |s| {
                s & (status::DRQ | status::ERR | status::DF) != 0
            })?;
            self.check(s)?;
            for pair in sector.chunks_exact_mut(2) {
                pair.copy_from_slice(&self.io.inw(data).to_le_bytes());
            }
        }
        self.finish_data(timeout)
    }

    /// PIO data-out: WRITE SECTORS (EXT), one DRQ block of 256 words per sector.
    pub(super) fn pio_write(
        &mut self,
        drive: Drive,
        lba48: bool,
        lba: u64,
        buf: &[u8],
    ) -> Result<(), AtaError> {
        let cmd = if lba48 {
            command::WRITE_SECTORS_EXT
        } else {
            command::WRITE_SECTORS
        };
        self.issue(drive, cmd, lba, buf.len() / SECTOR_SIZE, lba48)?;
        self.stats.pio_commands += 1;
        let timeout = self.config.timeouts.command_us;
        let data = self.port(reg::DATA);
        for sector in buf.chunks(SECTOR_SIZE) {
            self.delay400();
            let s = self.wait(timeout, |s| {
                s & (status::DRQ | status::ERR | status::DF) != 0
            })?;
            self.check(s)?;
            for pair in sector.chunks_exact(2) {
                self.io.outw(data, u16::from_le_bytes([pair[0], pair[1]]));
            }
        }
        self.finish_data(timeout)
    }
}
