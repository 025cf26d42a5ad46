//! virtio-mmio devices on a domain's MMIO bus: `hv-virtio`'s transport state machine and device
//! models behind [`MmioDevice`]. Register loads and stores go to the transport; a queue
//! notification makes the device process its rings in guest memory, through the same checked
//! guest-memory layer as everything else. No domain has one by default yet: dom0 and its
//! backends (issue 10) attach them, with their ACPI description for Linux guests.

use hv_virtio::{MmioTransport, TransportOptions, VirtioDevice};

use super::mmio::MmioDevice;
use hv_guest_mem::GuestMemory;

/// The register window of one virtio-mmio device (virtio 1.2 §4.2.2; 0x200 covers the
/// registers and a device configuration space of up to 256 bytes).
pub const WINDOW: u64 = 0x200;

/// A virtio device model with its MMIO transport.
pub struct VirtioMmio<D> {
    transport: MmioTransport<D>,
}

impl<D: VirtioDevice> VirtioMmio<D> {
    pub fn new(device: D) -> Self {
        VirtioMmio {
            transport: MmioTransport::new(device, TransportOptions::default()),
        }
    }

    /// The transport (interrupt status, statistics, the device).
    pub fn transport(&self) -> &MmioTransport<D> {
        &self.transport
    }
}

impl<D: VirtioDevice + Send> MmioDevice for VirtioMmio<D> {
    fn read(&mut self, offset: u64, size: u8) -> u64 {
        self.transport.read(offset, size)
    }

    fn write(&mut self, mem: &dyn GuestMemory, offset: u64, size: u8, value: u64) {
        self.transport.write(mem, offset, size, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::DomainIo;
    use hv_guest_mem::VecGuestMemory;
    use hv_virtio::devices::console::ConsoleDevice;

    #[test]
    fn a_virtio_console_answers_on_the_mmio_bus() {
        let mut io = DomainIo::standard();
        let base = 0xd000_0000;
        io.mmio
            .register(
                base..base + WINDOW,
                alloc::boxed::Box::new(VirtioMmio::new(ConsoleDevice::new(
                    alloc::vec::Vec::new(),
                    80,
                    25,
                ))),
            )
            .unwrap();
        // MagicValue "virt", Version 2, DeviceID 3 (console), VendorID (virtio 1.2 §4.2.2).
        assert_eq!(io.mmio.read(base, 4), Ok(0x7472_6976));
        assert_eq!(io.mmio.read(base + 4, 4), Ok(2));
        assert_eq!(io.mmio.read(base + 8, 4), Ok(3));
        // Status: ACKNOWLEDGE | DRIVER reads back.
        let ram = VecGuestMemory::new(0, 1 << 20);
        io.mmio.write(&ram, base + 0x70, 4, 3).unwrap();
        assert_eq!(io.mmio.read(base + 0x70, 4), Ok(3));
        // A second device may not overlap the window.
        assert!(
            io.mmio
                .register(
                    base + 0x100..base + 0x300,
                    alloc::boxed::Box::new(VirtioMmio::new(ConsoleDevice::new(
                        alloc::vec::Vec::new(),
                        80,
                        25
                    )))
                )
                .is_err()
        );
    }
}
