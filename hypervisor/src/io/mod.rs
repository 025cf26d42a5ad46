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
pub mod pc;
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
    /// A PC guest entered S5 through its ACPI sleep register: it powered off.
    PowerOff,
    /// A PC guest asked for a reset (the ACPI reset register or the keyboard controller).
    Reset,
    /// A PC guest's kernel reported its panic (the pvpanic port).
    Panicked,
}

/// The buses of one domain.
pub struct DomainIo {
    pub ports: PortBus,
    pub mmio: MmioBus,
    /// A PC domain's IOAPIC, UART and ACPI registers (answered before the port bus).
    pub pc: Option<Box<pc::PcDevices>>,
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
            pc: None,
        }
    }

    /// The buses of a PC domain with `vcpus` vCPUs (an unmodified Linux): the PC devices
    /// answer COM1 and the ACPI registers; every other port is an empty ISA bus; the MMIO hole
    /// holds the IOAPIC and, per vCPU, the local APIC.
    pub fn pc(vcpus: u32) -> DomainIo {
        DomainIo {
            ports: PortBus::default(),
            mmio: MmioBus::new(mmio::DEVICE_HOLE),
            pc: Some(Box::new(pc::PcDevices::new(vcpus))),
        }
    }
}
