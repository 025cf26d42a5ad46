//! ATA disks on a PCI IDE channel, with the bus-master DMA engine (i440FX/PIIX, as Bochs and
//! QEMU `-M pc` emulate it).
//!
//! One [`IdeChannel`] drives the two devices (master and slave) behind one set of registers:
//! the command block (`0x1F0-0x1F7` primary, `0x170-0x177` secondary), the control register
//! (`0x3F6` / `0x376`) and, when the controller has one, 8 bytes of the bus-master block (BAR4
//! of the class 01:01 function, primary at +0, secondary at +8). [`ChannelPorts`] says where
//! they are ([`ChannelPorts::from_pci`] reads it from the controller's header).
//!
//! * [`IdeChannel::probe`]: soft reset, then IDENTIFY DEVICE on both positions; "no drive"
//!   (floating bus, nothing selected answers, ATAPI signature, IDENTIFY aborted) is an
//!   answer, not a failure. [`identify()`] parses and checks the data.
//! * Reads and writes use READ/WRITE DMA (EXT) through the engine when the channel has one,
//!   the drive supports DMA and dom0 gave usable DMA memory; PIO (READ/WRITE SECTORS (EXT))
//!   otherwise. The 48-bit commands are used when the drive supports them.
//! * Transfers are split into chunks of the bounce buffer ([`Config::bounce_bytes`]) and of
//!   at most 65,536 (LBA48) or 256 (LBA28) sectors per command.
//! * Interrupts are off (nIEN): completion is polled, each wait bounded by [`Timeouts`] on
//!   the channel's [`Clock`](crate::hw::Clock). A timeout resets the channel so the next
//!   request starts clean; a device error (ERR, DF) fails one request only.
//! * [`AtaDisk`] is one drive as a [`volmgr::dev::BlockDevice`] of 4 KiB blocks; the disks
//!   of one channel share it under a lock ([`IdeChannel::into_disks`]).
//!
//! References: ATA/ATAPI-7 volumes 1 and 2 (registers, commands, IDENTIFY words, protocols) and the
//! *Programming Interface for Bus Master IDE Controller* 1.0 (the engine and PRD table).

mod busmaster;
mod channel;
mod disk;
mod identify;
mod pio;

pub use channel::IdeChannel;
pub use disk::AtaDisk;
pub use identify::{DriveInfo, identify};

use crate::pci::{Bar, CLASS_STORAGE, PciDevice, SUBCLASS_IDE};

/// Bytes of one sector.
pub const SECTOR_SIZE: usize = 512;

/// Registers of the command block, as offsets from its base.
pub(crate) mod reg {
    pub const DATA: u16 = 0;
    pub const ERROR: u16 = 1;
    pub const FEATURES: u16 = 1;
    pub const SECTOR_COUNT: u16 = 2;
    pub const LBA_LOW: u16 = 3;
    pub const LBA_MID: u16 = 4;
    pub const LBA_HIGH: u16 = 5;
    pub const DEVICE: u16 = 6;
    pub const STATUS: u16 = 7;
    pub const COMMAND: u16 = 7;
}

/// Bits of the status (and alternate status) register.
pub mod status {
    /// The device is busy; no other bit is valid.
    pub const BSY: u8 = 0x80;
    /// The device is ready for commands.
    pub const DRDY: u8 = 0x40;
    /// Device fault.
    pub const DF: u8 = 0x20;
    /// The device wants to move a block of data through the data port.
    pub const DRQ: u8 = 0x08;
    /// The last command failed; the error register says why.
    pub const ERR: u8 = 0x01;
}

/// Bits of the device control register.
pub(crate) mod control {
    /// Interrupts off.
    pub const NIEN: u8 = 0x02;
    /// Software reset of both devices.
    pub const SRST: u8 = 0x04;
}

/// Bits of the device register.
pub(crate) mod device {
    /// Obsolete bits 7 and 5, which old devices want set.
    pub const OBSOLETE: u8 = 0xA0;
    /// The address is an LBA.
    pub const LBA: u8 = 0x40;
    /// The slave (device 1) is selected.
    pub const DEV1: u8 = 0x10;
}

/// Command codes (ATA/ATAPI-7 volume 1, command descriptions).
pub mod command {
    /// READ SECTORS (PIO, 28-bit).
    pub const READ_SECTORS: u8 = 0x20;
    /// READ SECTORS EXT (PIO, 48-bit).
    pub const READ_SECTORS_EXT: u8 = 0x24;
    /// READ DMA EXT (48-bit).
    pub const READ_DMA_EXT: u8 = 0x25;
    /// WRITE SECTORS (PIO, 28-bit).
    pub const WRITE_SECTORS: u8 = 0x30;
    /// WRITE SECTORS EXT (PIO, 48-bit).
    pub const WRITE_SECTORS_EXT: u8 = 0x34;
    /// WRITE DMA EXT (48-bit).
    pub const WRITE_DMA_EXT: u8 = 0x35;
    /// READ DMA (28-bit).
    pub const READ_DMA: u8 = 0xC8;
    /// WRITE DMA (28-bit).
    pub const WRITE_DMA: u8 = 0xCA;
    /// FLUSH CACHE (28-bit).
    pub const FLUSH_CACHE: u8 = 0xE7;
    /// IDENTIFY DEVICE.
    pub const IDENTIFY: u8 = 0xEC;
    /// FLUSH CACHE EXT (48-bit).
    pub const FLUSH_CACHE_EXT: u8 = 0xEA;
}

/// Registers of one channel's bus-master block, as offsets from its base.
pub(crate) mod bm {
    pub const COMMAND: u16 = 0;
    pub const STATUS: u16 = 2;
    pub const PRD_ADDR: u16 = 4;

    /// Command: the engine runs.
    pub const CMD_START: u8 = 0x01;
    /// Command: the engine writes memory (a disk read).
    pub const CMD_TO_MEMORY: u8 = 0x08;
    /// Status: the engine is active.
    pub const ST_ACTIVE: u8 = 0x01;
    /// Status: the engine hit an error (write 1 to clear).
    pub const ST_ERROR: u8 = 0x02;
    /// Status: the device raised its interrupt (write 1 to clear).
    pub const ST_INTERRUPT: u8 = 0x04;
    /// Status: the "drive 0/1 DMA capable" bits, kept as firmware set them.
    pub const ST_CAPABLE: u8 = 0x60;
}

/// Which device of the channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Drive {
    /// Device 0.
    Master,
    /// Device 1.
    Slave,
}

impl Drive {
    /// Both positions, master first.
    pub const BOTH: [Self; 2] = [Self::Master, Self::Slave];

    /// 0 for the master, 1 for the slave.
    #[must_use]
    pub const fn index(self) -> usize {
        match self {
            Self::Master => 0,
            Self::Slave => 1,
        }
    }

    const fn device_bit(self) -> u8 {
        match self {
            Self::Master => 0,
            Self::Slave => device::DEV1,
        }
    }
}

/// Which channel of a PCI IDE controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    /// The first channel (legacy `0x1F0`/`0x3F6`).
    Primary,
    /// The second channel (legacy `0x170`/`0x376`).
    Secondary,
}

/// Where one channel's registers are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelPorts {
    /// Base of the command block (data port at +0, status/command at +7).
    pub command: u16,
    /// The control register (alternate status when read).
    pub control: u16,
    /// Base of this channel's 8 bytes of the bus-master block, if DMA is possible.
    pub bus_master: Option<u16>,
}

impl ChannelPorts {
    /// The legacy primary channel, without bus master.
    pub const PRIMARY: Self = Self {
        command: 0x1F0,
        control: 0x3F6,
        bus_master: None,
    };
    /// The legacy secondary channel, without bus master.
    pub const SECONDARY: Self = Self {
        command: 0x170,
        control: 0x376,
        bus_master: None,
    };

    /// The same ports with the bus-master block at `base`.
    #[must_use]
    pub const fn with_bus_master(self, base: u16) -> Self {
        Self {
            bus_master: Some(base),
            ..self
        }
    }

    /// The ports of `channel` of the PCI IDE controller `dev` (class 01:01), or `None` if it
    /// is not one or a BAR it needs is missing.
    ///
    /// Prog-if bit 0 (primary) or 2 (secondary) set means native mode: the command block is
    /// at BAR0/BAR2 and the control register at BAR1/BAR3 + 2; otherwise the legacy ports
    /// apply. Bit 7 says the controller has a bus-master block, at BAR4 (an I/O BAR of at
    /// least 16 bytes) + 8 for the secondary channel. The caller enables I/O decode and bus
    /// mastering ([`crate::pci::enable`]).
    #[must_use]
    pub fn from_pci(dev: &PciDevice, channel: Channel) -> Option<Self> {
        if dev.class != CLASS_STORAGE || dev.subclass != SUBCLASS_IDE {
            return None;
        }
        let (native_bit, legacy, cmd_bar, ctl_bar, bm_off) = match channel {
            Channel::Primary => (0x01, Self::PRIMARY, 0, 1, 0),
            Channel::Secondary => (0x04, Self::SECONDARY, 2, 3, 8),
        };
        let mut ports = if dev.prog_if & native_bit != 0 {
            let port = |bar: Bar, min: u32| match bar {
                Bar::Io { port, size } if port != 0 && size >= min => u16::try_from(port).ok(),
                _ => None,
            };
            Self {
                command: port(dev.bars[cmd_bar], 8)?,
                control: port(dev.bars[ctl_bar], 4)?.checked_add(2)?,
                bus_master: None,
            }
        } else {
            legacy
        };
        if dev.prog_if & 0x80 != 0
            && let Bar::Io { port, size } = dev.bars[4]
            && port != 0
            && size >= 16
        {
            ports.bus_master = u16::try_from(port).ok().and_then(|p| p.checked_add(bm_off));
        }
        Some(ports)
    }
}

/// How long each kind of wait may take, in microseconds of the channel's
/// [`Clock`](crate::hw::Clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// From the end of a soft reset until the devices are no longer busy (the standard
    /// allows 31 s).
    pub reset_us: u64,
    /// For one command (one chunk of a transfer, IDENTIFY, a flush) to complete.
    pub command_us: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            reset_us: 31_000_000,
            command_us: 30_000_000,
        }
    }
}

/// How a channel is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Size of the DMA bounce buffer, the largest transfer of one DMA command; rounded down
    /// to whole 4 KiB pages, between 4 KiB and 2 MiB (512 PRD entries of at least a page).
    pub bounce_bytes: usize,
    /// Bounds of the waits.
    pub timeouts: Timeouts,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            bounce_bytes: 128 * 1024,
            timeouts: Timeouts::default(),
        }
    }
}

/// How a channel moves data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferMode {
    /// Through the bus-master engine.
    Dma,
    /// Through the data port, one word per access.
    Pio,
}

/// What went wrong on the channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AtaError {
    /// Nothing answers at this position (or on the whole channel).
    #[error("no drive")]
    NoDrive,
    /// A device answers, but it is not an ATA disk (ATAPI signature, IDENTIFY aborted).
    #[error("not an ATA disk")]
    NotAta,
    /// IDENTIFY data that this driver refuses to use.
    #[error("IDENTIFY data rejected: {0}")]
    BadIdentify(&'static str),
    /// The device stayed busy (or never asked for data) past its deadline.
    #[error("timed out (status {status:#04x})")]
    Timeout {
        /// The last status read.
        status: u8,
    },
    /// The device failed the command (ERR or DF in the status).
    #[error("device error (status {status:#04x}, error {error:#04x})")]
    Device {
        /// The status register.
        status: u8,
        /// The error register.
        error: u8,
    },
    /// The bus-master engine reported an error (or stopped without the device finishing).
    #[error("DMA engine error (bus-master status {0:#04x})")]
    Dma(u8),
    /// The device broke the protocol (e.g. still wants data after the transfer).
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    /// The request reaches past the end of the drive.
    #[error("request beyond end of drive")]
    OutOfRange,
    /// The buffer is not a whole number of sectors.
    #[error("buffer is not a whole number of sectors")]
    Misaligned,
}

impl From<AtaError> for volmgr::dev::DevError {
    fn from(e: AtaError) -> Self {
        use volmgr::dev::DevError;
        match e {
            AtaError::OutOfRange => DevError::OutOfRange,
            AtaError::Misaligned => DevError::Misaligned,
            AtaError::NoDrive => DevError::Gone,
            _ => DevError::Io,
        }
    }
}

/// Counters of one channel (both drives).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Commands issued (IDENTIFY, transfers, flushes).
    pub commands: u64,
    /// Transfer commands that went through the DMA engine.
    pub dma_commands: u64,
    /// Transfer commands that went through the data port.
    pub pio_commands: u64,
    /// Flush commands.
    pub flushes: u64,
    /// Bytes read from the drives.
    pub bytes_read: u64,
    /// Bytes written to the drives.
    pub bytes_written: u64,
    /// Failed commands (any reason).
    pub errors: u64,
    /// Of those, timeouts.
    pub timeouts: u64,
    /// Soft resets of the channel.
    pub resets: u64,
}
