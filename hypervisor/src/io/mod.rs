//! A domain's I/O buses: port I/O and MMIO. Devices register address ranges; overlapping
//! ranges are refused at registration. An access no device claims answers like an empty bus
//! (reads all ones, writes dropped) — for MMIO only inside the device hole below 4 GiB; outside
//! it, an access that is neither RAM nor a device stops the domain.
//!
//! Every device sees only its own offset and an access size of 1, 2, 4 or 8 bytes; values come
//! from the guest and are checked by the device.

pub mod bus;
pub mod ioring;
pub mod mmio;
pub mod passthrough;
pub mod ports;
pub mod uart;
pub mod virtio;

use alloc::boxed::Box;

pub use bus::Overlap;
pub use mmio::MmioBus;
pub use ports::{PortAction, PortBus};

/// What a device's write does beyond its own state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoEvent {
    None,
    /// A byte for the domain's console.
    Console(u8),
    /// The guest asked to end with this code (the test exit port).
    Exit(u8),
}

/// The buses of one domain.
pub struct DomainIo {
    pub ports: PortBus,
    pub mmio: MmioBus,
}

impl DomainIo {
    /// The devices every domain has today: the 16550 UART on COM1 and the test exit port;
    /// the MMIO hole 3–4 GiB with no devices in it yet.
    pub fn standard() -> DomainIo {
        let mut ports = PortBus::default();
        ports
            .register(hv_abi::ports::UART, 8, Box::new(uart::Uart16550::default()))
            .expect("empty bus");
        ports
            .register(hv_abi::ports::TEST_EXIT, 1, Box::new(ports::TestExit))
            .expect("no overlap with the UART");
        DomainIo {
            ports,
            mmio: MmioBus::new(mmio::DEVICE_HOLE),
        }
    }
}
