//! Console output: `print!`/`println!` to COM1, and the `log` facade's logger, whose level the
//! command line (`loglevel=`) and the shell (`log <level>`) set.

use core::fmt::Write;

use crate::arch::serial;

struct SerialWriter;

impl Write for SerialWriter {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        serial::write(s.as_bytes());
        Ok(())
    }
}

/// Formats into a fixed buffer first, so one line reaches the UART in one locked write and
/// lines from different CPUs do not interleave.
struct LineBuffer {
    buf: [u8; 512],
    len: usize,
}

impl Write for LineBuffer {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                serial::write(&self.buf);
                self.len = 0;
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
        Ok(())
    }
}

#[doc(hidden)]
pub fn _print(args: core::fmt::Arguments) {
    let mut line = LineBuffer {
        buf: [0; 512],
        len: 0,
    };
    let _ = line.write_fmt(args);
    serial::write(&line.buf[..line.len]);
}

#[doc(hidden)]
pub fn _print_unbuffered(args: core::fmt::Arguments) {
    let _ = SerialWriter.write_fmt(args);
}

/// Prints to the console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::_print(format_args!($($arg)*)) };
}

/// Prints a line to the console.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::console::_print(format_args!("{}\n", format_args!($($arg)*))) };
}

struct Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            crate::println!(
                "[cpu{}] {:<5} {}",
                crate::arch::cpu::current_cpu(),
                record.level(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

static LOGGER: Logger = Logger;

/// Installs the logger at `level`.
pub fn init_logger(level: log::LevelFilter) {
    // A second call (there is none) would only fail to replace the logger.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
