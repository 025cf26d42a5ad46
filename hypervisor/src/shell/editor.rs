//! A small line editor for a serial terminal: printable ASCII, backspace/delete, Ctrl-U (kill
//! line), Ctrl-C (abandon line), and a history walked with the up and down arrows (VT100
//! `ESC [ A` / `ESC [ B`). Other escape sequences are swallowed whole. `\r`, `\n` and `\r\n`
//! each end one line.
//!
//! Invariant: what the terminal shows after the prompt always equals `self.line`.

use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;

/// Longest line accepted; further characters are dropped (and the bell rung).
pub const MAX_LINE: usize = 256;
/// History entries kept.
pub const HISTORY: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Escape {
    None,
    /// Saw ESC.
    Start,
    /// Saw `ESC [` (CSI): parameters until a final byte 0x40..=0x7e.
    Csi,
}

/// The editor's state for one terminal.
#[derive(Debug)]
pub struct LineEditor {
    line: String,
    history: VecDeque<String>,
    /// Index into `history` while browsing it (0 = newest); `None` when editing a fresh line.
    browsing: Option<usize>,
    /// The fresh line saved while browsing, restored when walking back down past the newest.
    draft: String,
    escape: Escape,
    last_was_cr: bool,
}

impl Default for LineEditor {
    fn default() -> Self {
        Self::new()
    }
}

impl LineEditor {
    pub fn new() -> Self {
        LineEditor {
            line: String::new(),
            history: VecDeque::new(),
            browsing: None,
            draft: String::new(),
            escape: Escape::None,
            last_was_cr: false,
        }
    }

    /// The history, newest first.
    pub fn history(&self) -> impl Iterator<Item = &str> {
        self.history.iter().map(String::as_str)
    }

    /// Takes one input byte; appends what to echo to `echo`; returns a line when one is done.
    pub fn feed(&mut self, byte: u8, echo: &mut Vec<u8>) -> Option<String> {
        let was_cr = core::mem::replace(&mut self.last_was_cr, byte == b'\r');
        match self.escape {
            Escape::Start => {
                self.escape = if byte == b'[' {
                    Escape::Csi
                } else {
                    Escape::None
                };
                return None;
            }
            Escape::Csi => {
                if (0x40..=0x7e).contains(&byte) {
                    self.escape = Escape::None;
                    match byte {
                        b'A' => self.history_up(echo),
                        b'B' => self.history_down(echo),
                        _ => {}
                    }
                }
                return None;
            }
            Escape::None => {}
        }
        match byte {
            0x1b => self.escape = Escape::Start,
            b'\n' if was_cr => {}
            b'\r' | b'\n' => {
                echo.extend_from_slice(b"\r\n");
                let line = core::mem::take(&mut self.line);
                self.browsing = None;
                self.draft.clear();
                let trimmed = line.trim();
                if !trimmed.is_empty() && self.history.front().map(String::as_str) != Some(trimmed)
                {
                    self.history.push_front(String::from(trimmed));
                    self.history.truncate(HISTORY);
                }
                return Some(line);
            }
            0x08 | 0x7f if self.line.pop().is_some() => echo.extend_from_slice(b"\x08 \x08"),
            0x15 => self.replace_line(String::new(), echo),
            0x03 => {
                echo.extend_from_slice(b"^C\r\n");
                self.line.clear();
                self.browsing = None;
                return Some(String::new());
            }
            0x20..=0x7e => {
                if self.line.len() < MAX_LINE {
                    self.line.push(char::from(byte));
                    echo.push(byte);
                } else {
                    echo.push(0x07);
                }
            }
            _ => {}
        }
        None
    }

    fn replace_line(&mut self, new: String, echo: &mut Vec<u8>) {
        for _ in 0..self.line.len() {
            echo.extend_from_slice(b"\x08 \x08");
        }
        echo.extend_from_slice(new.as_bytes());
        self.line = new;
    }

    fn history_up(&mut self, echo: &mut Vec<u8>) {
        let next = match self.browsing {
            None => 0,
            Some(i) => i + 1,
        };
        if let Some(entry) = self.history.get(next).cloned() {
            if self.browsing.is_none() {
                self.draft = self.line.clone();
            }
            self.browsing = Some(next);
            self.replace_line(entry, echo);
        }
    }

    fn history_down(&mut self, echo: &mut Vec<u8>) {
        match self.browsing {
            None => {}
            Some(0) => {
                self.browsing = None;
                let draft = core::mem::take(&mut self.draft);
                self.replace_line(draft, echo);
            }
            Some(i) => {
                self.browsing = Some(i - 1);
                let entry = self.history[i - 1].clone();
                self.replace_line(entry, echo);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds bytes; returns the finished lines and everything echoed.
    fn run(ed: &mut LineEditor, input: &[u8]) -> (Vec<String>, Vec<u8>) {
        let mut echo = Vec::new();
        let lines = input
            .iter()
            .filter_map(|&b| ed.feed(b, &mut echo))
            .collect();
        (lines, echo)
    }

    /// What a VT100 shows for an echo stream that only uses BS, space and printable bytes.
    fn screen(echo: &[u8]) -> String {
        let mut s = String::new();
        let mut cur = 0usize;
        for &b in echo {
            match b {
                0x08 => cur = cur.saturating_sub(1),
                b'\r' | b'\n' => {
                    s.clear();
                    cur = 0;
                }
                0x20..=0x7e => {
                    if cur < s.len() {
                        s.replace_range(cur..=cur, core::str::from_utf8(&[b]).unwrap());
                    } else {
                        s.push(char::from(b));
                    }
                    cur += 1;
                }
                _ => {}
            }
        }
        s.trim_end().into()
    }

    #[test]
    fn lines_end_on_cr_lf_or_crlf_once() {
        let mut ed = LineEditor::new();
        let (lines, _) = run(&mut ed, b"cpus\r\nmem\nvmx\r");
        assert_eq!(lines, ["cpus", "mem", "vmx"]);
    }

    #[test]
    fn backspace_and_delete_edit_the_line() {
        let mut ed = LineEditor::new();
        let (lines, echo) = run(&mut ed, b"cpz\x08us\x7f\x7fus");
        assert!(lines.is_empty());
        assert_eq!(screen(&echo), "cpus");
        let (lines, _) = run(&mut ed, b"\r");
        assert_eq!(lines, ["cpus"]);
        // Backspace on an empty line echoes nothing.
        let (_, echo) = run(&mut ed, b"\x08");
        assert!(echo.is_empty());
    }

    #[test]
    fn history_walks_up_and_down_and_restores_the_draft() {
        let mut ed = LineEditor::new();
        run(&mut ed, b"cpus\rmem\rvmx\r");
        let (_, echo) = run(&mut ed, b"lo\x1b[A");
        assert_eq!(screen(&echo), "vmx");
        let (_, echo) = run(&mut ed, b"\x1b[A\x1b[A\x1b[A");
        assert_eq!(screen(&[b"vmx".as_slice(), &echo].concat()), "cpus");
        let (_, echo) = run(&mut ed, b"\x1b[B\x1b[B\x1b[B");
        let (lines, _) = run(&mut ed, b"g\r");
        assert_eq!(lines, ["log"], "draft restored, then edited; echo {echo:?}");
        assert_eq!(
            ed.history().collect::<Vec<_>>(),
            ["log", "vmx", "mem", "cpus"]
        );
    }

    #[test]
    fn history_skips_repeats_and_is_bounded() {
        let mut ed = LineEditor::new();
        for i in 0..(HISTORY + 10) {
            run(&mut ed, format!("cmd{i}\r").as_bytes());
            run(&mut ed, format!("cmd{i}\r").as_bytes());
        }
        run(&mut ed, b"\r   \r");
        assert_eq!(ed.history().count(), HISTORY);
        assert_eq!(ed.history().next(), Some("cmd41"));
    }

    #[test]
    fn other_escapes_ctrl_u_ctrl_c_and_overlong_lines() {
        let mut ed = LineEditor::new();
        let (lines, _) = run(&mut ed, b"a\x1b[1;5Cb\x1b[Dc\r");
        assert_eq!(lines, ["abc"]);
        let (_, echo) = run(&mut ed, b"junk\x15");
        assert_eq!(screen(&echo), "");
        let (lines, _) = run(&mut ed, b"more\x03");
        assert_eq!(lines, [""]);
        let long = [b'x'; MAX_LINE + 5];
        let (_, echo) = run(&mut ed, &long);
        assert_eq!(echo.iter().filter(|&&b| b == 0x07).count(), 5);
        let (lines, _) = run(&mut ed, b"\r");
        assert_eq!(lines[0].len(), MAX_LINE);
    }
}
