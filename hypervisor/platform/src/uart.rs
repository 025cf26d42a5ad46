//! A 16550A UART as Linux's 8250 driver probes and drives it: registers that read back (IER,
//! LCR, MCR, scratch, the divisor latch), FIFOs reported by IIR, loopback (MCR bit 4),
//! a 16-byte receive FIFO, and the THRE and received-data interrupts, gated onto the IRQ line
//! by OUT2 as on a PC. Transmission is instantaneous.

// Registers are 8, 32 and 64 bits wide: the truncating casts pick fields out of them.
#![allow(clippy::cast_possible_truncation)]

const FIFO: usize = 16;

#[derive(Clone, Debug, Default)]
pub struct Uart16550 {
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    dll: u8,
    dlm: u8,
    fifos: bool,
    /// A THRE interrupt waits (set when THR empties, cleared by reading IIR or writing THR).
    thre: bool,
    rx: [u8; FIFO],
    rx_head: usize,
    rx_len: usize,
}

impl Uart16550 {
    pub fn new() -> Uart16550 {
        Uart16550 {
            dll: 12,
            ..Default::default()
        }
    }

    fn dlab(&self) -> bool {
        self.lcr & 0x80 != 0
    }

    fn loopback(&self) -> bool {
        self.mcr & 0x10 != 0
    }

    /// Room in the receive FIFO.
    pub fn rx_room(&self) -> usize {
        FIFO - self.rx_len
    }

    /// A byte from outside; false when the FIFO is full.
    pub fn receive(&mut self, byte: u8) -> bool {
        if self.rx_len == FIFO {
            return false;
        }
        self.rx[(self.rx_head + self.rx_len) % FIFO] = byte;
        self.rx_len += 1;
        true
    }

    /// The pending interrupt's IIR code: 0x4 data, 0x2 THR empty, 0x1 none.
    fn cause(&self) -> u8 {
        if self.ier & 1 != 0 && self.rx_len > 0 {
            0x4
        } else if self.ier & 2 != 0 && self.thre {
            0x2
        } else {
            0x1
        }
    }

    /// The IRQ line: an interrupt pending, and OUT2 set.
    pub fn irq(&self) -> bool {
        self.cause() != 0x1 && self.mcr & 0x08 != 0
    }

    pub fn read(&mut self, offset: u8) -> u8 {
        match offset {
            0 if self.dlab() => self.dll,
            0 => {
                if self.rx_len == 0 {
                    return 0;
                }
                let b = self.rx[self.rx_head];
                self.rx_head = (self.rx_head + 1) % FIFO;
                self.rx_len -= 1;
                b
            }
            1 if self.dlab() => self.dlm,
            1 => self.ier,
            2 => {
                let c = self.cause();
                if c == 0x2 {
                    self.thre = false;
                }
                c | if self.fifos { 0xc0 } else { 0 }
            }
            3 => self.lcr,
            4 => self.mcr,
            5 => 0x60 | u8::from(self.rx_len > 0),
            6 => {
                if self.loopback() {
                    // DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD.
                    let m = self.mcr;
                    ((m & 1) << 5) | ((m & 2) << 3) | ((m & 4) << 4) | ((m & 8) << 4)
                } else {
                    0xb0
                }
            }
            _ => self.scr,
        }
    }

    /// A register write; `Some(byte)`: a byte transmitted to the outside.
    pub fn write(&mut self, offset: u8, value: u8) -> Option<u8> {
        match offset {
            0 if self.dlab() => self.dll = value,
            0 => {
                // Transmitted at once: THR is empty again.
                self.thre = true;
                if self.loopback() {
                    self.receive(value);
                    return None;
                }
                return Some(value);
            }
            1 if self.dlab() => self.dlm = value,
            1 => {
                // Enabling the THRE interrupt with THR empty raises it.
                if value & 2 != 0 && self.ier & 2 == 0 {
                    self.thre = true;
                }
                self.ier = value & 0x0f;
            }
            2 => {
                self.fifos = value & 1 != 0;
                if value & 2 != 0 {
                    self.rx_len = 0;
                }
            }
            3 => self.lcr = value,
            4 => self.mcr = value & 0x1f,
            7 => self.scr = value,
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_8250_autoconfig() {
        let mut u = Uart16550::new();
        // IER read-back.
        u.write(1, 0);
        assert_eq!(u.read(1), 0);
        u.write(1, 0x0f);
        assert_eq!(u.read(1), 0x0f);
        u.write(1, 0);
        u.write(7, 0xa5);
        assert_eq!(u.read(7), 0xa5);
        // Loopback: MSR mirrors MCR, bytes come back.
        u.write(4, 0x1a);
        assert_eq!(u.read(6) & 0xf0, 0x90);
        assert_eq!(u.write(0, b'z'), None);
        assert_eq!(u.read(5) & 1, 1);
        assert_eq!(u.read(0), b'z');
        u.write(4, 0);
        // FIFOs: a 16550A.
        u.write(2, 0x07);
        assert_eq!(u.read(2) & 0xc0, 0xc0);
        // DLAB.
        u.write(3, 0x83);
        u.write(0, 1);
        assert_eq!(u.read(0), 1);
        u.write(3, 0x03);
        assert_eq!(u.write(0, b'x'), Some(b'x'));
    }

    #[test]
    fn interrupts() {
        let mut u = Uart16550::new();
        u.write(4, 0x08); // OUT2
        assert!(!u.irq());
        u.write(1, 0x02);
        assert!(u.irq(), "THR empty");
        assert_eq!(u.read(2) & 0xf, 0x2);
        assert!(!u.irq(), "IIR read clears THRE");
        u.write(0, b'a');
        assert!(u.irq(), "empty again after the byte");
        u.write(1, 0x01);
        assert!(!u.irq());
        assert!(u.receive(b'k'));
        assert!(u.irq());
        assert_eq!(u.read(2) & 0xf, 0x4);
        assert_eq!(u.read(0), b'k');
        assert!(!u.irq());
        // OUT2 gates the line.
        u.receive(b'q');
        u.write(4, 0);
        assert!(!u.irq());
        for _ in 0..20 {
            u.receive(0);
        }
        assert_eq!(u.rx_room(), 0);
        assert!(!u.receive(1));
    }

    #[test]
    fn hostile_writes_never_panic() {
        let mut u = Uart16550::new();
        let mut x: u32 = 0x1357_9bdf;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            u.write((x & 7) as u8, (x >> 8) as u8);
            u.read(((x >> 16) & 7) as u8);
            u.receive((x >> 24) as u8);
            let _ = u.irq();
        }
    }
}
