//! COM1, the operator's console: a 16550 UART at I/O port 0x3F8, through the `uart_16550`
//! crate. Output is polled (the UART's transmit holding register), input is polled by the
//! console task. A panic or exception report may take the port even if another context holds
//! the lock, so a report is never lost to a deadlock.

use spin::Mutex;
use uart_16550::Uart16550;
use uart_16550::backend::PioBackend;

const COM1: u16 = 0x3f8;

static PORT: Mutex<Option<Uart16550<PioBackend>>> = Mutex::new(None);

fn make() -> Option<Uart16550<PioBackend>> {
    // SAFETY: 0x3F8..0x3FF is COM1 on PC-compatible machines and the hypervisor owns it for the
    // whole run (crate-level assumptions).
    let mut uart = unsafe { Uart16550::new_port(COM1) }.ok()?;
    let config = uart_16550::Config {
        baud_rate: uart_16550::BaudRate::Baud115200,
        ..uart_16550::Config::DEFAULT
    };
    uart.init(config).ok()?;
    Some(uart)
}

/// Programs COM1 (115200 8N1, FIFOs on). Without a UART the console is silent but boot goes on.
pub fn init() {
    *PORT.lock() = make();
}

fn write_raw(uart: &mut Uart16550<PioBackend>, bytes: &[u8]) {
    for chunk in bytes.split_inclusive(|&b| b == b'\n') {
        let (body, nl) = match chunk.split_last() {
            Some((b'\n', body)) => (body, true),
            _ => (chunk, false),
        };
        uart.send_bytes_exact(body);
        if nl {
            uart.send_bytes_exact(b"\r\n");
        }
    }
}

/// Writes bytes, turning `\n` into `\r\n`.
pub fn write(bytes: &[u8]) {
    if let Some(uart) = PORT.lock().as_mut() {
        write_raw(uart, bytes);
    }
}

/// Writes bytes as they are (the line editor's echo carries its own control bytes).
pub fn write_verbatim(bytes: &[u8]) {
    if let Some(uart) = PORT.lock().as_mut() {
        uart.send_bytes_exact(bytes);
    }
}

/// Writes for a fault report: takes the lock if it can within a moment, else writes anyway
/// (the holder may be the very code that faulted on this CPU).
pub fn write_for_report(bytes: &[u8]) {
    for _ in 0..1_000_000 {
        if let Some(mut guard) = PORT.try_lock() {
            if let Some(uart) = guard.as_mut() {
                write_raw(uart, bytes);
            }
            return;
        }
        core::hint::spin_loop();
    }
    if let Some(mut uart) = make() {
        write_raw(&mut uart, bytes);
    }
}

/// One received byte, if any is waiting.
pub fn try_read() -> Option<u8> {
    PORT.lock().as_mut()?.try_receive_byte().ok()
}
