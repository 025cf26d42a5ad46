//! A minimal 16550 UART for a domain's console: transmit only. The line status register always
//! says "transmitter empty", received data is never available, the other registers read back
//! what was written where Linux checks that (IER, LCR, MCR, scratch) so its 8250 driver accepts
//! the port.

use super::IoEvent;
use super::ports::PortDevice;

#[derive(Debug, Default)]
pub struct Uart16550 {
    ier: u8,
    lcr: u8,
    mcr: u8,
    scratch: u8,
    /// Divisor latch (DLAB set): low and high bytes.
    dll: u8,
    dlm: u8,
}

impl Uart16550 {
    fn dlab(&self) -> bool {
        self.lcr & 0x80 != 0
    }
}

impl PortDevice for Uart16550 {
    fn read(&mut self, offset: u16, size: u8) -> u32 {
        if size != 1 {
            return 0;
        }
        u32::from(match offset {
            0 if self.dlab() => self.dll,
            0 => 0, // no received data
            1 if self.dlab() => self.dlm,
            1 => self.ier & 0x0f,
            2 => 0xc1, // IIR: no interrupt pending, FIFOs enabled
            3 => self.lcr,
            4 => self.mcr & 0x1f,
            5 => 0x60, // LSR: transmit holding register empty, transmitter idle
            6 => 0xb0, // MSR: CTS, DSR, DCD
            _ => self.scratch,
        })
    }

    fn write(&mut self, offset: u16, size: u8, value: u32) -> IoEvent {
        if size != 1 {
            return IoEvent::None;
        }
        let b = value as u8;
        match offset {
            0 if self.dlab() => self.dll = b,
            0 => return IoEvent::Console(b),
            1 if self.dlab() => self.dlm = b,
            1 => self.ier = b & 0x0f,
            3 => self.lcr = b,
            4 => self.mcr = b & 0x1f,
            7 => self.scratch = b,
            _ => {}
        }
        IoEvent::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transmit_and_registers_that_read_back() {
        let mut u = Uart16550::default();
        assert_eq!(u.write(0, 1, u32::from(b'x')), IoEvent::Console(b'x'));
        assert_eq!(u.read(5, 1), 0x60);
        u.write(1, 1, 0x05);
        assert_eq!(u.read(1, 1), 0x05, "IER reads back (Linux's 8250 probe)");
        u.write(7, 1, 0xa5);
        assert_eq!(u.read(7, 1), 0xa5);
        // With DLAB set, offsets 0 and 1 are the divisor, not data.
        u.write(3, 1, 0x83);
        assert_eq!(u.write(0, 1, 1), IoEvent::None);
        assert_eq!(u.read(0, 1), 1);
        u.write(3, 1, 0x03);
        assert_eq!(u.read(0, 1), 0, "no received data");
    }
}
