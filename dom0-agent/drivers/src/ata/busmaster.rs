//! The bus-master DMA engine: the driver's DMA memory, the PRD table, and READ/WRITE DMA
//! (EXT) with polled completion.
//!
//! The engine (*Programming Interface for Bus Master IDE Controller* 1.0) walks a table of Physical
//! Region Descriptors (PRDs) in memory: per entry a 32-bit even bus address, a 16-bit even byte
//! count (0 meaning 64 KiB) and, in the flags word, bit 15 marking the last entry; no region may
//! cross a 64 KiB boundary, nor may the table. This driver's table only ever describes its own
//! bounce buffer, split once at set-up into [`Segment`]s that keep those rules, so a device can
//! only reach memory the driver owns.
//!
//! One command: stop the engine and set its direction (bit 3 set: it writes memory, a disk
//! read), load the table address, clear the error and interrupt status bits (write 1),
//! issue the ATA command, start the engine, then poll the engine status until the interrupt
//! or error bit is set or the engine goes idle; stop the engine, wait for the device to
//! drop BSY, and judge by the ATA status (ERR, DF, DRQ) and the engine's error and interrupt
//! bits.

use alloc::vec::Vec;

use super::channel::IdeChannel;
use super::{AtaError, Drive, SECTOR_SIZE, bm, command};
use crate::dma::{
    BUS_LIMIT, Dma, DmaBuf, DmaError, PAGE_SIZE, PRD_BOUNDARY, PRD_ENTRY_BYTES, Segment,
    encode_prd, segments,
};
use crate::hw::{Clock, Deadline, PortIo};

/// PRD entries that fit the table page.
const MAX_PRD_ENTRIES: usize = PAGE_SIZE / PRD_ENTRY_BYTES;

/// The channel's DMA memory: a bounce buffer and the page holding the PRD table.
pub(crate) struct DmaArea<B> {
    data: B,
    bytes: usize,
    segs: Vec<Segment>,
    prd: B,
    prd_bus: u32,
    table: Vec<u8>,
}

impl<B: DmaBuf> DmaArea<B> {
    /// Allocates and checks a bounce buffer of `bytes` (whole pages) and a table page.
    pub(crate) fn new<D: Dma<Buf = B>>(dma: &mut D, bytes: usize) -> Result<Self, DmaError> {
        let data = dma.alloc(bytes, PAGE_SIZE).ok_or(DmaError::NoMemory)?;
        if data.size() < bytes {
            return Err(DmaError::NoMemory);
        }
        let segs = segments(dma, &data, bytes)?;
        if segs.len() > MAX_PRD_ENTRIES {
            return Err(DmaError::TooFragmented);
        }
        let prd = dma.alloc(PAGE_SIZE, PAGE_SIZE).ok_or(DmaError::NoMemory)?;
        let table_bytes = segs.len() * PRD_ENTRY_BYTES;
        if prd.size() < table_bytes {
            return Err(DmaError::NoMemory);
        }
        let bus = dma
            .translate(prd.addr(), table_bytes)
            .ok_or(DmaError::Untranslated)?;
        let end = bus
            .checked_add(table_bytes as u64)
            .ok_or(DmaError::AboveLimit)?;
        if end > BUS_LIMIT {
            return Err(DmaError::AboveLimit);
        }
        // The table is dword-aligned and may not cross a 64 KiB boundary (same document).
        if bus % 4 != 0 || bus / PRD_BOUNDARY != (end - 1) / PRD_BOUNDARY {
            return Err(DmaError::Unaligned);
        }
        Ok(Self {
            data,
            bytes,
            segs,
            prd,
            prd_bus: u32::try_from(bus).map_err(|_| DmaError::AboveLimit)?,
            table: Vec::with_capacity(table_bytes),
        })
    }

    /// Writes the table for the first `len` bytes of the bounce buffer; returns its bus
    /// address.
    fn program(&mut self, len: usize) -> u32 {
        let covered = encode_prd(&self.segs, len.min(self.bytes), &mut self.table);
        debug_assert_eq!(covered, len, "the chunk fits the bounce buffer");
        self.prd.write(0, &self.table);
        self.prd_bus
    }
}

impl<P: PortIo, D: Dma, K: Clock> IdeChannel<P, D, K> {
    /// READ DMA (EXT) of `buf.len()` bytes (at most the bounce buffer) into `buf`.
    pub(super) fn dma_read(
        &mut self,
        drive: Drive,
        lba48: bool,
        lba: u64,
        buf: &mut [u8],
    ) -> Result<(), AtaError> {
        self.dma_command(drive, lba48, lba, buf.len(), true)?;
        let area = self
            .area
            .as_ref()
            .ok_or(AtaError::Protocol("no DMA memory"))?;
        area.data.read(0, buf);
        Ok(())
    }

    /// WRITE DMA (EXT) of `buf` (at most the bounce buffer).
    pub(super) fn dma_write(
        &mut self,
        drive: Drive,
        lba48: bool,
        lba: u64,
        buf: &[u8],
    ) -> Result<(), AtaError> {
        let area = self
            .area
            .as_mut()
            .ok_or(AtaError::Protocol("no DMA memory"))?;
        area.data.write(0, buf);
        self.dma_command(drive, lba48, lba, buf.len(), false)
    }

    fn dma_command(
        &mut self,
        drive: Drive,
        lba48: bool,
        lba: u64,
        len: usize,
        to_memory: bool,
    ) -> Result<(), AtaError> {
        let base = self
            .ports
            .bus_master
            .ok_or(AtaError::Protocol("no bus-master block"))?;
        let area = self
            .area
            .as_mut()
            .ok_or(AtaError::Protocol("no DMA memory"))?;
        let table = area.program(len);
        let (cmd_port, st_port) = (
            base.wrapping_add(bm::COMMAND),
            base.wrapping_add(bm::STATUS),
        );
        let dir = if to_memory { bm::CMD_TO_MEMORY } else { 0 };
        self.io.outb(cmd_port, dir);
        self.io.outl(base.wrapping_add(bm::PRD_ADDR), table);
        self.clear_engine_status(st_port);
        let cmd = match (to_memory, lba48) {
            (true, true) => command::READ_DMA_EXT,
            (true, false) => command::READ_DMA,
            (false, true) => command::WRITE_DMA_EXT,
            (false, false) => command::WRITE_DMA,
        };
        self.issue(drive, cmd, lba, len / SECTOR_SIZE, lba48)?;
        self.stats.dma_commands += 1;
        self.io.outb(cmd_port, dir | bm::CMD_START);

        let deadline = Deadline::after(&mut self.clock, self.config.timeouts.command_us);
        let engine = loop {
            let bs = self.io.inb(st_port);
            if bs & (bm::ST_ERROR | bm::ST_INTERRUPT) != 0 || bs & bm::ST_ACTIVE == 0 {
                break Ok(bs);
            }
            if deadline.expired(&mut self.clock) {
                break Err(AtaError::Timeout {
                    status: self.alt_status(),
                });
            }
            core::hint::spin_loop();
        };
        // Stop the engine whatever happened: it must not run past this command.
        self.io.outb(cmd_port, dir);
        let device = match engine {
            Ok(_) => self.wait_until(deadline, |_| true),
            Err(e) => Err(e),
        };
        let bs = self.io.inb(st_port);
        self.clear_engine_status(st_port);
        let s = device?;
        self.status();
        self.check(s)?;
        if bs & bm::ST_ERROR != 0 {
            return Err(AtaError::Dma(bs));
        }
        if s & super::status::DRQ != 0 {
            return Err(AtaError::Protocol("device wants more data"));
        }
        if bs & bm::ST_INTERRUPT == 0 {
            // The engine ran out of table without the device finishing.
            return Err(AtaError::Dma(bs));
        }
        Ok(())
    }

    /// Clears the engine's error and interrupt bits (write 1), keeping the capability bits.
    fn clear_engine_status(&mut self, st_port: u16) {
        let bs = self.io.inb(st_port);
        self.io.outb(
            st_port,
            (bs & bm::ST_CAPABLE) | bm::ST_ERROR | bm::ST_INTERRUPT,
        );
    }
}
