//! The hypervisor's command line (`key=value` and bare flags, separated by spaces), as given by
//! GRUB's `multiboot2` line or QEMU's `-append`.
//!
//! Recognised keys are documented in the README: `loglevel=`, `hv.test-fault=`.

use log::LevelFilter;

/// A borrowed command line.
#[derive(Clone, Copy, Debug)]
pub struct CommandLine<'a>(&'a str);

impl<'a> CommandLine<'a> {
    pub fn new(text: &'a str) -> Self {
        CommandLine(text)
    }

    /// The `(key, value)` pairs in order; a bare flag has the value `""`.
    pub fn options(&self) -> impl Iterator<Item = (&'a str, &'a str)> {
        self.0
            .split_ascii_whitespace()
            .map(|w| w.split_once('=').unwrap_or((w, "")))
    }

    /// The value of the last occurrence of `key` (later ones override earlier ones).
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.options()
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v)
            .last()
    }

    /// The whole text.
    pub fn as_str(&self) -> &'a str {
        self.0
    }
}

/// Parses a log level name as the console and the command line accept it.
pub fn parse_level(text: &str) -> Result<LevelFilter, LevelError> {
    text.parse::<LevelFilter>().map_err(|_| LevelError)
}

/// The text was not a level name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LevelError;

impl core::fmt::Display for LevelError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("expected one of off, error, warn, info, debug, trace")
    }
}

/// Deliberate faults a test can ask for with `hv.test-fault=KIND`, to prove that the exception
/// path reports instead of resetting. Never set on a production command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestFault {
    /// `ud2`: invalid opcode.
    InvalidOpcode,
    /// A read from an unmapped address: page fault with CR2.
    PageFault,
    /// A write into the hypervisor's own code: page fault from W^X.
    WriteText,
    /// Divide by zero.
    DivideError,
    /// Unbounded recursion: stack overflow into the guard page, caught on the IST stack.
    StackOverflow,
}

impl TestFault {
    pub fn parse(text: &str) -> Option<TestFault> {
        Some(match text {
            "ud" => TestFault::InvalidOpcode,
            "pf" => TestFault::PageFault,
            "wx" => TestFault::WriteText,
            "de" => TestFault::DivideError,
            "stack" => TestFault::StackOverflow,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_values_and_flags() {
        let c = CommandLine::new("  loglevel=debug quiet hv.test-fault=pf loglevel=trace ");
        assert_eq!(c.get("loglevel"), Some("trace"));
        assert_eq!(c.get("quiet"), Some(""));
        assert_eq!(c.get("hv.test-fault"), Some("pf"));
        assert_eq!(c.get("missing"), None);
        assert_eq!(c.options().count(), 4);
    }

    #[test]
    fn value_may_contain_equals() {
        let c = CommandLine::new("a=b=c");
        assert_eq!(c.get("a"), Some("b=c"));
    }

    #[test]
    fn levels() {
        assert_eq!(parse_level("debug"), Ok(LevelFilter::Debug));
        assert_eq!(parse_level("WARN"), Ok(LevelFilter::Warn));
        assert_eq!(parse_level("off"), Ok(LevelFilter::Off));
        assert_eq!(parse_level("loud"), Err(LevelError));
    }

    #[test]
    fn test_faults() {
        assert_eq!(TestFault::parse("pf"), Some(TestFault::PageFault));
        assert_eq!(TestFault::parse("wx"), Some(TestFault::WriteText));
        assert_eq!(TestFault::parse("nope"), None);
    }
}
