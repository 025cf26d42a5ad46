//! The port-I/O bus and the test exit port.

use alloc::boxed::Box;

use super::IoEvent;
use super::bus::{Bus, Overlap};

/// A device on the port bus.
pub trait PortDevice: Send {
    /// IN of `size` bytes at `offset` in the device's range.
    fn read(&mut self, offset: u16, size: u8) -> u32;
    /// OUT of `size` bytes (`value` holds only those bytes).
    fn write(&mut self, offset: u16, size: u8, value: u32) -> IoEvent;
}

/// What a port access does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortAction {
    /// IN: give the guest this value.
    Read(u32),
    /// OUT, with its effect.
    Wrote(IoEvent),
}

/// The ports of one domain.
#[derive(Default)]
pub struct PortBus {
    bus: Bus<Box<dyn PortDevice>>,
}

fn ones(size: u8) -> u32 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        _ => u32::MAX,
    }
}

impl PortBus {
    /// Puts `device` at ports `base..base + count`.
    pub fn register(
        &mut self,
        base: u16,
        count: u16,
        device: Box<dyn PortDevice>,
    ) -> Result<(), Overlap> {
        let start = u64::from(base);
        self.bus.register(start..start + u64::from(count), device)
    }

    /// An IN or OUT of `size` (1, 2 or 4) bytes at `port`; unclaimed ports read as all ones and
    /// ignore writes, like an empty ISA bus.
    pub fn access(&mut self, port: u16, size: u8, input: bool, value: u32) -> PortAction {
        let mask = ones(size);
        match self.bus.find(u64::from(port), u64::from(size)) {
            Some((d, offset)) if input => PortAction::Read(d.read(offset as u16, size) & mask),
            Some((d, offset)) => PortAction::Wrote(d.write(offset as u16, size, value & mask)),
            None if input => PortAction::Read(mask),
            None => PortAction::Wrote(IoEvent::None),
        }
    }
}

/// Port `hv_abi::ports::TEST_EXIT`: a byte written ends the domain with that code.
pub struct TestExit;

impl PortDevice for TestExit {
    fn read(&mut self, _offset: u16, size: u8) -> u32 {
        ones(size)
    }

    fn write(&mut self, _offset: u16, _size: u8, value: u32) -> IoEvent {
        IoEvent::Exit(value as u8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::DomainIo;

    #[test]
    fn the_standard_ports_and_an_empty_bus() {
        let mut io = DomainIo::standard();
        let p = &mut io.ports;
        assert_eq!(
            p.access(0x3f8, 1, false, 0x41),
            PortAction::Wrote(IoEvent::Console(b'A'))
        );
        assert_eq!(p.access(0x3fd, 1, true, 0), PortAction::Read(0x60));
        assert_eq!(
            p.access(0xf4, 1, false, 0x1_07),
            PortAction::Wrote(IoEvent::Exit(7))
        );
        assert_eq!(p.access(0xcfc, 4, true, 0), PortAction::Read(u32::MAX));
        assert_eq!(p.access(0x60, 2, true, 0), PortAction::Read(0xffff));
        assert_eq!(
            p.access(0x80, 1, false, 0x12),
            PortAction::Wrote(IoEvent::None)
        );
        // A 16-bit OUT to the data register is not a console byte.
        assert_eq!(
            p.access(0x3f8, 2, false, 0x4141),
            PortAction::Wrote(IoEvent::None)
        );
        // An access straddling the UART's last port and the next is unclaimed.
        assert_eq!(p.access(0x3ff, 2, true, 0), PortAction::Read(0xffff));
        // The test exit port cannot be registered twice.
        assert!(p.register(0xf4, 1, Box::new(TestExit)).is_err());
    }
}
