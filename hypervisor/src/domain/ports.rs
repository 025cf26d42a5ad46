//! The I/O ports a domain sees: a minimal 16550 (transmit only: the line status register always
//! says "transmitter empty", received data is never available), the test exit port, and
//! nothing else (reads of other ports return all ones, writes are ignored, like an empty bus).

use hv_abi::ports::{TEST_EXIT, UART};

/// What a port access does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortAction {
    /// IN: give the guest this value.
    Read(u32),
    /// OUT to the UART's data register: this byte goes to the domain console.
    ConsoleByte(u8),
    /// OUT to the test exit port.
    Exit(u8),
    /// OUT with no effect.
    Ignore,
}

/// Decides a port access of `size` bytes.
pub fn access(port: u16, size: u8, input: bool, value: u32) -> PortAction {
    let ones = match size {
        1 => 0xff,
        2 => 0xffff,
        _ => u32::MAX,
    };
    match (port, input) {
        (p, false) if p == UART && size == 1 => PortAction::ConsoleByte(value as u8),
        // Line status: THR empty and transmitter idle (bits 5, 6).
        (p, true) if p == UART + 5 => PortAction::Read(0x60),
        (p, true) if (UART..UART + 8).contains(&p) => PortAction::Read(0),
        (p, false) if p == TEST_EXIT => PortAction::Exit(value as u8),
        (_, true) => PortAction::Read(ones),
        (_, false) => PortAction::Ignore,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uart_exit_and_empty_bus() {
        assert_eq!(access(0x3f8, 1, false, 0x41), PortAction::ConsoleByte(b'A'));
        assert_eq!(access(0x3fd, 1, true, 0), PortAction::Read(0x60));
        assert_eq!(access(0x3f9, 1, true, 0), PortAction::Read(0));
        assert_eq!(access(0xf4, 1, false, 0x1_07), PortAction::Exit(7));
        assert_eq!(access(0xcfc, 4, true, 0), PortAction::Read(u32::MAX));
        assert_eq!(access(0x60, 2, true, 0), PortAction::Read(0xffff));
        assert_eq!(access(0x80, 1, false, 0x12), PortAction::Ignore);
        assert_eq!(access(0x3f8, 2, false, 0x4141), PortAction::Ignore);
    }
}
