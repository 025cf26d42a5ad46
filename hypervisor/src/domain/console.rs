//! A domain's console output: bytes from its virtual UART or the console hypercall, cut into
//! lines for the host console (`[domN] ...`), with a rate limit so a guest cannot flood the
//! serial line the operator depends on.

use alloc::string::String;
use alloc::vec::Vec;

/// Longest line kept; longer output is split.
pub const LINE_MAX: usize = 160;
/// Lines a domain may print per window before further lines are dropped (and counted).
pub const LINES_PER_WINDOW: u32 = 64;

/// Per-domain console state.
#[derive(Debug, Default)]
pub struct DomainConsole {
    line: String,
    window: u64,
    printed_in_window: u32,
    /// Lines dropped by the rate limit since the last report.
    pub dropped: u64,
}

impl DomainConsole {
    /// Feeds bytes; returns the complete lines to print now. `window` is the caller's current
    /// rate-limit window (e.g. seconds of uptime): the budget refills when it changes.
    pub fn feed(&mut self, bytes: &[u8], window: u64) -> Vec<String> {
        if window != self.window {
            self.window = window;
            self.printed_in_window = 0;
        }
        let mut out = Vec::new();
        for &b in bytes {
            match b {
                b'\n' => self.finish(&mut out),
                b'\r' => {}
                0x20..=0x7e | b'\t' => {
                    self.line.push(char::from(b));
                    if self.line.len() >= LINE_MAX {
                        self.finish(&mut out);
                    }
                }
                // Control and non-ASCII bytes are shown escaped, never passed to the terminal.
                other => {
                    use core::fmt::Write;
                    let _ = write!(self.line, "\\x{other:02x}");
                    if self.line.len() >= LINE_MAX {
                        self.finish(&mut out);
                    }
                }
            }
        }
        out
    }

    fn finish(&mut self, out: &mut Vec<String>) {
        let line = core::mem::take(&mut self.line);
        if self.printed_in_window < LINES_PER_WINDOW {
            self.printed_in_window += 1;
            out.push(line);
        } else {
            self.dropped += 1;
        }
    }

    /// Whatever is buffered without a newline (printed when the domain stops).
    pub fn take_partial(&mut self) -> Option<String> {
        (!self.line.is_empty()).then(|| core::mem::take(&mut self.line))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_cut_and_escaped() {
        let mut c = DomainConsole::default();
        assert!(c.feed(b"hel", 0).is_empty());
        assert_eq!(c.feed(b"lo\r\nworld\n", 0), ["hello", "world"]);
        assert_eq!(c.feed(b"\x1b[2Jx\n", 0), ["\\x1b[2Jx"]);
        let long = [b'a'; LINE_MAX + 3];
        let lines = c.feed(&long, 0);
        assert_eq!(lines.len(), 1);
        assert_eq!(c.take_partial().as_deref(), Some("aaa"));
        assert_eq!(c.take_partial(), None);
    }

    #[test]
    fn a_flood_is_cut_and_counted_then_the_budget_refills() {
        let mut c = DomainConsole::default();
        let mut printed = 0;
        for _ in 0..1000 {
            printed += c.feed(b"spam\n", 7).len();
        }
        assert_eq!(printed, LINES_PER_WINDOW as usize);
        assert_eq!(c.dropped, 1000 - u64::from(LINES_PER_WINDOW));
        assert_eq!(c.feed(b"again\n", 8), ["again"]);
    }
}
