//! One IDE channel: register access, bounded waits, reset, IDENTIFY, flush, and the split
//! of a request into commands (carried out by [`super::busmaster`] or [`super::pio`]).
//!
//! The protocols are those of ATA/ATAPI-7 volume 2 (transport protocols): device selection (BSY and
//! DRQ clear before the device register is written, then BSY and DRQ clear and DRDY set on the
//! selected device), PIO data-in (IDENTIFY), non-data (flush). Status is polled on the alternate
//! status register, which does not acknowledge the device's interrupt; the status register is read
//! once at the end of a command to acknowledge it. After a command or device register write, status
//! is valid only after 400 ns: four reads of the alternate status give that time.

use super::busmaster::DmaArea;
use super::identify::identify;
use super::{
    AtaError, ChannelPorts, Config, Drive, DriveInfo, SECTOR_SIZE, Stats, TransferMode, bm,
    command, control, device, reg, status,
};
use crate::dma::{Dma, DmaError, PAGE_SIZE};
use crate::hw::{Clock, Deadline, PortIo, delay_us};

/// The largest bounce buffer (512 PRD entries of one page).
const MAX_BOUNCE: usize = 512 * PAGE_SIZE;
/// Sectors per PIO command (both addressing modes).
const PIO_MAX_SECTORS: usize = 256;

/// One IDE channel and the drives found on it.
///
/// Built with [`IdeChannel::new`], then [`IdeChannel::probe`]d; requests address 512-byte
/// sectors of a drive that the last probe (or [`IdeChannel::identify`]) found.
pub struct IdeChannel<P, D: Dma, K> {
    pub(super) io: P,
    /// Kept for the lifetime of the buffers it handed out.
    _dma: D,
    pub(super) clock: K,
    pub(super) ports: ChannelPorts,
    pub(super) config: Config,
    pub(super) area: Option<DmaArea<D::Buf>>,
    dma_error: Option<DmaError>,
    pub(super) drives: [Option<DriveInfo>; 2],
    pub(super) stats: Stats,
}

impl<P: PortIo, D: Dma, K: Clock> IdeChannel<P, D, K> {
    /// The channel at `ports`, reached through `io`, timed by `clock`.
    ///
    /// When the channel has a bus-master block, the PRD table page and a bounce buffer of
    /// [`Config::bounce_bytes`] are allocated from `dma` and checked (see
    /// [`crate::dma::segments`]); if that fails the channel works by PIO and
    /// [`IdeChannel::dma_unavailable`] says why. Interrupts of the channel are turned off.
    pub fn new(io: P, mut dma: D, clock: K, ports: ChannelPorts, config: Config) -> Self {
        let bytes = (config.bounce_bytes / PAGE_SIZE * PAGE_SIZE).clamp(PAGE_SIZE, MAX_BOUNCE);
        let (area, dma_error) = if ports.bus_master.is_some() {
            match DmaArea::new(&mut dma, bytes) {
                Ok(area) => (Some(area), None),
                Err(e) => (None, Some(e)),
            }
        } else {
            (None, None)
        };
        let mut channel = Self {
            io,
            _dma: dma,
            clock,
            ports,
            config: Config {
                bounce_bytes: bytes,
                ..config
            },
            area,
            dma_error,
            drives: [None, None],
            stats: Stats::default(),
        };
        channel.io.outb(ports.control, control::NIEN);
        channel
    }

    /// Where the channel's registers are.
    #[must_use]
    pub fn ports(&self) -> ChannelPorts {
        self.ports
    }

    /// The counters so far.
    #[must_use]
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Why the channel has a bus-master block but no DMA (its memory was unusable).
    #[must_use]
    pub fn dma_unavailable(&self) -> Option<DmaError> {
        self.dma_error
    }

    /// The drive at `drive`, if the last probe found one.
    #[must_use]
    pub fn drive(&self, drive: Drive) -> Option<&DriveInfo> {
        self.drives[drive.index()].as_ref()
    }

    /// How transfers of `drive` move data (`None` if there is no such drive).
    #[must_use]
    pub fn transfer_mode(&self, drive: Drive) -> Option<TransferMode> {
        let info = self.drive(drive)?;
        Some(if info.dma && self.area.is_some() {
            TransferMode::Dma
        } else {
            TransferMode::Pio
        })
    }

    /// Resets the channel, then identifies both positions. A position holds `Ok` with its
    /// drive, `Err(NoDrive)` or `Err(NotAta)` when there is no ATA disk there, or the error
    /// that made it unusable (then the drive is not used).
    pub fn probe(&mut self) -> [Result<DriveInfo, AtaError>; 2] {
        self.drives = [None, None];
        // Nothing drives the bus: every register floats high.
        if self.alt_status() == 0xFF && self.status() == 0xFF {
            return [Err(AtaError::NoDrive), Err(AtaError::NoDrive)];
        }
        if let Err(e) = self.reset() {
            self.stats.errors += 1;
            self.stats.timeouts += u64::from(matches!(e, AtaError::Timeout { .. }));
            return [Err(e), Err(e)];
        }
        Drive::BOTH.map(|d| self.identify(d))
    }

    /// Soft reset of both devices (SRST), then waits for the channel to be idle. Stops the
    /// DMA engine first.
    ///
    /// # Errors
    /// [`AtaError::Timeout`] if the devices stay busy past [`super::Timeouts::reset_us`].
    pub fn reset(&mut self) -> Result<(), AtaError> {
        self.stats.resets += 1;
        if let Some(base) = self.ports.bus_master {
            self.io.outb(base.wrapping_add(bm::COMMAND), 0);
        }
        let ctl = self.ports.control;
        // SRST for at least 5 us, then at least 2 ms before status is valid.
        self.io.outb(ctl, control::NIEN | control::SRST);
        delay_us(&mut self.clock, 5);
        self.io.outb(ctl, control::NIEN);
        delay_us(&mut self.clock, 2000);
        let timeout = self.config.timeouts.reset_us;
        self.wait(timeout, |_| true).map(|_| ())
    }

    /// Sends IDENTIFY DEVICE to `drive` and records the drive if it is an ATA disk.
    ///
    /// # Errors
    /// [`AtaError::NoDrive`] if nothing answers at `drive`, [`AtaError::NotAta`] for an
    /// ATAPI device, errors of [`identify`], and device or timeout errors.
    pub fn identify(&mut self, drive: Drive) -> Result<DriveInfo, AtaError> {
        self.drives[drive.index()] = None;
        match self.identify_inner(drive) {
            Ok(info) => {
                self.drives[drive.index()] = Some(info.clone());
                Ok(info)
            }
            Err(e @ (AtaError::NoDrive | AtaError::NotAta)) => Err(e),
            Err(e) => Err(self.fail(e)),
        }
    }

    fn identify_inner(&mut self, drive: Drive) -> Result<DriveInfo, AtaError> {
        let timeout = self.config.timeouts.command_us;
        self.wait(timeout, |s| s & status::DRQ == 0)?;
        self.out(reg::DEVICE, device::OBSOLETE | drive.device_bit());
        self.delay400();
        // An empty channel reads all ones. A position with no device reads 0 once selected
        // (the other device answers for it), and so may an ATAPI device, which never sets
        // DRDY: its signature tells them apart.
        let s = self.alt_status();
        if s == 0xFF {
            return Err(AtaError::NoDrive);
        }
        if s == 0 {
            return Err(if self.atapi_signature() {
                AtaError::NotAta
            } else {
                AtaError::NoDrive
            });
        }
        self.wait(timeout, |_| true)?;
        // No signature check here: outside a reset the registers hold the last command's
        // values. A PACKET device aborts IDENTIFY DEVICE and then shows its signature.
        for r in [reg::SECTOR_COUNT, reg::LBA_LOW, reg::LBA_MID, reg::LBA_HIGH] {
            self.out(r, 0);
        }
        self.out(reg::COMMAND, command::IDENTIFY);
        self.stats.commands += 1;
        self.delay400();
        if self.alt_status() == 0 {
            return Err(AtaError::NoDrive);
        }
        let s = self.wait(timeout, |s| {
            s & (status::DRQ | status::ERR | status::DF) != 0
        })?;
        if s & status::ERR != 0 && self.atapi_signature() {
            return Err(AtaError::NotAta);
        }
        self.check(s)?;
        let mut words = [0u16; 256];
        for w in &mut words {
            *w = self.io.inw(self.port(reg::DATA));
        }
        self.finish_data(timeout)?;
        identify(&words, drive)
    }

    /// Whether the signature registers hold the PATA or SATA ATAPI signature (ATA/ATAPI-7
    /// volume 1, signature and persistence).
    fn atapi_signature(&mut self) -> bool {
        let mid = self.io.inb(self.port(reg::LBA_MID));
        let high = self.io.inb(self.port(reg::LBA_HIGH));
        matches!((mid, high), (0x14, 0xEB) | (0x69, 0x96))
    }

    /// Reads `buf.len() / 512` sectors of `drive` from sector `lba`.
    ///
    /// # Errors
    /// [`AtaError::Misaligned`], [`AtaError::OutOfRange`] and [`AtaError::NoDrive`] before
    /// any register is touched; device, DMA and timeout errors after (a timeout resets the
    /// channel).
    pub fn read(&mut self, drive: Drive, lba: u64, buf: &mut [u8]) -> Result<(), AtaError> {
        let info = self.check_request(drive, lba, buf.len())?;
        let chunk = self.chunk_bytes(info);
        let mut at = lba;
        for piece in buf.chunks_mut(chunk) {
            let r = if info.dma {
                self.dma_read(drive, info.lba48, at, piece)
            } else {
                self.pio_read(drive, info.lba48, at, piece)
            };
            r.map_err(|e| self.fail(e))?;
            self.stats.bytes_read += piece.len() as u64;
            at += (piece.len() / SECTOR_SIZE) as u64;
        }
        Ok(())
    }

    /// Writes `buf.len() / 512` sectors of `drive` from sector `lba`. The drive may cache
    /// them until [`IdeChannel::flush`].
    ///
    /// # Errors
    /// As [`IdeChannel::read`].
    pub fn write(&mut self, drive: Drive, lba: u64, buf: &[u8]) -> Result<(), AtaError> {
        let info = self.check_request(drive, lba, buf.len())?;
        let chunk = self.chunk_bytes(info);
        let mut at = lba;
        for piece in buf.chunks(chunk) {
            let r = if info.dma {
                self.dma_write(drive, info.lba48, at, piece)
            } else {
                self.pio_write(drive, info.lba48, at, piece)
            };
            r.map_err(|e| self.fail(e))?;
            self.stats.bytes_written += piece.len() as u64;
            at += (piece.len() / SECTOR_SIZE) as u64;
        }
        Ok(())
    }

    /// FLUSH CACHE EXT (FLUSH CACHE without LBA48): every write completed before is on the
    /// medium when this returns `Ok`.
    ///
    /// # Errors
    /// [`AtaError::NoDrive`], device and timeout errors.
    pub fn flush(&mut self, drive: Drive) -> Result<(), AtaError> {
        let lba48 = self.drive(drive).ok_or(AtaError::NoDrive)?.lba48;
        let cmd = if lba48 {
            command::FLUSH_CACHE_EXT
        } else {
            command::FLUSH_CACHE
        };
        self.flush_inner(drive, cmd).map_err(|e| self.fail(e))?;
        self.stats.flushes += 1;
        Ok(())
    }

    fn flush_inner(&mut self, drive: Drive, cmd: u8) -> Result<(), AtaError> {
        self.select(drive, 0)?;
        self.out(reg::COMMAND, cmd);
        self.stats.commands += 1;
        self.delay400();
        let s = self.wait(self.config.timeouts.command_us, |_| true)?;
        self.status();
        self.check(s)
    }
}

/// What a request needs to know about its drive.
#[derive(Clone, Copy)]
struct Target {
    lba48: bool,
    dma: bool,
}

impl<P: PortIo, D: Dma, K: Clock> IdeChannel<P, D, K> {
    fn check_request(&self, drive: Drive, lba: u64, len: usize) -> Result<Target, AtaError> {
        let info = self.drive(drive).ok_or(AtaError::NoDrive)?;
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(AtaError::Misaligned);
        }
        match lba.checked_add((len / SECTOR_SIZE) as u64) {
            Some(end) if end <= info.sectors => {}
            _ => return Err(AtaError::OutOfRange),
        }
        Ok(Target {
            lba48: info.lba48,
            dma: info.dma && self.area.is_some(),
        })
    }

    /// Bytes per command: the bounce buffer for DMA, 256 sectors for PIO, and never more
    /// than the sector count register can say (65,536 or 256 sectors).
    fn chunk_bytes(&self, t: Target) -> usize {
        let max_sectors: usize = if t.lba48 { 65536 } else { 256 };
        let limit = if t.dma {
            self.config.bounce_bytes
        } else {
            PIO_MAX_SECTORS * SECTOR_SIZE
        };
        limit.min(max_sectors * SECTOR_SIZE)
    }

    /// Counts a failed command; resets the channel after a timeout, an engine error or a
    /// protocol violation, so that the next request starts from idle devices.
    pub(super) fn fail(&mut self, e: AtaError) -> AtaError {
        self.stats.errors += 1;
        match e {
            AtaError::Timeout { .. } => {
                self.stats.timeouts += 1;
                let _ = self.reset();
            }
            AtaError::Dma(_) | AtaError::Protocol(_) => {
                let _ = self.reset();
            }
            _ => {}
        }
        e
    }

    pub(super) fn port(&self, r: u16) -> u16 {
        self.ports.command.wrapping_add(r)
    }

    pub(super) fn out(&mut self, r: u16, value: u8) {
        let port = self.port(r);
        self.io.outb(port, value);
    }

    pub(super) fn alt_status(&mut self) -> u8 {
        self.io.inb(self.ports.control)
    }

    /// Reads the status register, which acknowledges the device's interrupt.
    pub(super) fn status(&mut self) -> u8 {
        let port = self.port(reg::STATUS);
        self.io.inb(port)
    }

    /// Lets 400 ns pass (four alternate status reads) before status is read.
    pub(super) fn delay400(&mut self) {
        for _ in 0..4 {
            self.alt_status();
        }
    }

    /// Polls the alternate status until BSY is clear and `done` holds, for `timeout_us`.
    pub(super) fn wait(
        &mut self,
        timeout_us: u64,
        done: impl Fn(u8) -> bool,
    ) -> Result<u8, AtaError> {
        let deadline = Deadline::after(&mut self.clock, timeout_us);
        self.wait_until(deadline, done)
    }

    /// Polls the alternate status until BSY is clear and `done` holds, until `deadline`.
    pub(super) fn wait_until(
        &mut self,
        deadline: Deadline,
        done: impl Fn(u8) -> bool,
    ) -> Result<u8, AtaError> {
        loop {
            let s = self.alt_status();
            if s & status::BSY == 0 && done(s) {
                return Ok(s);
            }
            if deadline.expired(&mut self.clock) {
                return Err(AtaError::Timeout { status: s });
            }
            core::hint::spin_loop();
        }
    }

    /// `Err(Device)` if `s` has ERR or DF.
    pub(super) fn check(&mut self, s: u8) -> Result<(), AtaError> {
        if s & (status::ERR | status::DF) != 0 {
            let error = self.io.inb(self.port(reg::ERROR));
            return Err(AtaError::Device { status: s, error });
        }
        Ok(())
    }

    /// The device selection protocol: the channel idle, the device register
    /// (LBA mode, `lba_bits` as address bits 27:24), then the selected device idle and ready.
    pub(super) fn select(&mut self, drive: Drive, lba_bits: u8) -> Result<(), AtaError> {
        let timeout = self.config.timeouts.command_us;
        self.wait(timeout, |s| s & status::DRQ == 0)?;
        self.out(
            reg::DEVICE,
            device::OBSOLETE | device::LBA | drive.device_bit() | (lba_bits & 0x0F),
        );
        self.delay400();
        self.wait(timeout, |s| {
            s & (status::DRQ | status::DF) == 0 && s & status::DRDY != 0
        })?;
        Ok(())
    }

    /// Selects `drive` and issues the read/write command `cmd` for `count` sectors at `lba`
    /// (a 48-bit taskfile when `lba48`: each register written twice, the high-order byte
    /// first).
    pub(super) fn issue(
        &mut self,
        drive: Drive,
        cmd: u8,
        lba: u64,
        count: usize,
        lba48: bool,
    ) -> Result<(), AtaError> {
        let l = lba.to_le_bytes();
        // 65,536 (LBA48) and 256 (LBA28) are written as 0.
        let c = u32::try_from(count).unwrap_or(0).to_le_bytes();
        self.select(drive, if lba48 { 0 } else { l[3] })?;
        if lba48 {
            self.out(reg::SECTOR_COUNT, c[1]);
            self.out(reg::LBA_LOW, l[3]);
            self.out(reg::LBA_MID, l[4]);
            self.out(reg::LBA_HIGH, l[5]);
        }
        self.out(reg::FEATURES, 0);
        self.out(reg::SECTOR_COUNT, c[0]);
        self.out(reg::LBA_LOW, l[0]);
        self.out(reg::LBA_MID, l[1]);
        self.out(reg::LBA_HIGH, l[2]);
        self.out(reg::COMMAND, cmd);
        self.stats.commands += 1;
        Ok(())
    }

    /// After the last data block: waits for BSY to clear, checks that the device wants no
    /// more data and reports no error, and acknowledges its interrupt.
    pub(super) fn finish_data(&mut self, timeout_us: u64) -> Result<(), AtaError> {
        self.delay400();
        let s = self.wait(timeout_us, |_| true)?;
        self.status();
        self.check(s)?;
        if s & status::DRQ != 0 {
            return Err(AtaError::Protocol("device wants more data"));
        }
        Ok(())
    }
}
