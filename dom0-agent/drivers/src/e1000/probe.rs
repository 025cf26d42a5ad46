//! Finding 8254x functions on the PCI bus and readying them for the driver: which device IDs
//! this driver programs, where their registers are, and the command-register bits it needs.

use crate::pci::{self, Bar, PciAddr, PciConfig, PciDevice};

/// Intel's PCI vendor ID.
pub const VENDOR_INTEL: u16 = 0x8086;

/// The device IDs driven here: the 82540, 82545 and 82546 families, which share the
/// programming model the driver uses (legacy descriptors, EERD with DONE at bit 4, a 128 KiB
/// memory BAR). Left out on purpose: the 82541 and 82547 (EERD laid out differently), the
/// 82544 (no EERD), the 82542 and 82543 (older, not in the 8254x manual) and every PCIe part
/// (82571 and later, such as the 82574 at 0x10D3, whose programming model differs).
pub const DEVICE_IDS: &[(u16, &str)] = &[
    (0x100E, "82540EM"),
    (0x1015, "82540EM LOM"),
    (0x1016, "82540EP LOM"),
    (0x1017, "82540EP"),
    (0x101E, "82540EP LP"),
    (0x100F, "82545EM copper"),
    (0x1011, "82545EM fiber"),
    (0x1026, "82545GM copper"),
    (0x1027, "82545GM fiber"),
    (0x1028, "82545GM SerDes"),
    (0x1010, "82546EB copper"),
    (0x1012, "82546EB fiber"),
    (0x101D, "82546EB quad copper"),
    (0x1079, "82546GB copper"),
    (0x107A, "82546GB fiber"),
    (0x107B, "82546GB SerDes"),
];

/// The size of the register space behind BAR0.
pub const MMIO_SIZE: u64 = 0x2_0000;

/// Whether `vendor:device` is a function this driver programs.
#[must_use]
pub fn is_supported(vendor: u16, device: u16) -> bool {
    vendor == VENDOR_INTEL && DEVICE_IDS.iter().any(|&(id, _)| id == device)
}

/// The supported functions among `devices` (as [`pci::enumerate`] found them), in order.
pub fn find(devices: &[PciDevice]) -> impl Iterator<Item = &PciDevice> {
    devices.iter().filter(|d| is_supported(d.vendor, d.device))
}

/// A supported function, enabled, with the windows onto its registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciFunction {
    /// Where it is.
    pub addr: PciAddr,
    /// Its device ID (one of [`DEVICE_IDS`]).
    pub device: u16,
    /// Physical address of the registers (BAR0), for dom0 to map uncached.
    pub mmio_base: u64,
    /// Size of BAR0 (at least [`MMIO_SIZE`]).
    pub mmio_size: u64,
    /// The I/O window ([`super::IoWindow`]), if the function has an assigned I/O BAR.
    pub io_base: Option<u16>,
    /// Interrupt line and pin, as firmware routed them (the driver polls).
    pub interrupt: (u8, u8),
}

/// Why a function cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// Not one of [`DEVICE_IDS`].
    #[error("{vendor:04x}:{device:04x} is not a supported 8254x")]
    Unsupported {
        /// Vendor ID.
        vendor: u16,
        /// Device ID.
        device: u16,
    },
    /// BAR0 is not a memory BAR of at least [`MMIO_SIZE`] bytes with an address assigned.
    #[error("BAR0 is not an assigned memory window of 128 KiB")]
    NoRegisters,
    /// The command register did not keep memory decode and bus mastering (its value).
    #[error("command register refused decode or bus mastering ({0:#06x})")]
    NotEnabled(u16),
}

/// Checks that `dev` is a supported 8254x with its registers at BAR0, then enables memory
/// decode and bus mastering, and I/O decode when it has an assigned I/O BAR (the first I/O
/// BAR of at least 8 bytes with a port below 0xFFF8).
///
/// # Errors
/// [`ProbeError`]; nothing is written to the function unless it is supported and has its
/// registers.
pub fn enable<C: PciConfig + ?Sized>(
    cfg: &mut C,
    dev: &PciDevice,
) -> Result<PciFunction, ProbeError> {
    if !is_supported(dev.vendor, dev.device) {
        return Err(ProbeError::Unsupported {
            vendor: dev.vendor,
            device: dev.device,
        });
    }
    let (mmio_base, mmio_size) = match dev.bars[0] {
        Bar::Memory { addr, size, .. } if addr != 0 && size >= MMIO_SIZE => (addr, size),
        _ => return Err(ProbeError::NoRegisters),
    };
    let io_base = dev.bars.iter().find_map(|bar| match *bar {
        Bar::Io { port, size } if port != 0 && size >= 8 => u16::try_from(port)
            .ok()
            .filter(|p| p.checked_add(7).is_some()),
        _ => None,
    });
    let mut bits = pci::reg::CMD_MEMORY | pci::reg::CMD_BUS_MASTER;
    if io_base.is_some() {
        bits |= pci::reg::CMD_IO;
    }
    let command = pci::enable(cfg, dev.addr, bits);
    if command & bits != bits {
        return Err(ProbeError::NotEnabled(command));
    }
    Ok(PciFunction {
        addr: dev.addr,
        device: dev.device,
        mmio_base,
        mmio_size,
        io_base,
        interrupt: dev.interrupt,
    })
}
