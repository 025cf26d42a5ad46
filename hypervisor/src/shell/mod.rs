//! The operator's console shell on COM1: a line editor and the command table.
//!
//! Both are pure: the editor turns input bytes into echo bytes and finished lines, the parser
//! turns a line into a [`Command`] or an error that says what was wrong. The kernel's console
//! task (`crate::kernel::console_task`) feeds bytes from the UART and runs the commands.

mod editor;

pub use editor::{LineEditor, MAX_LINE};

use crate::cmdline::{LevelError, parse_level};
use crate::sched::keys::{Change, KeyError};
use log::LevelFilter;

/// The prompt the shell prints when it is ready for a command.
pub const PROMPT: &str = "hv> ";

/// Every command with its one-line help, in the order `help` lists them.
pub const COMMANDS: &[(&str, &str)] = &[
    ("help", "list the commands"),
    ("cpus", "every CPU: APIC id, state, timer ticks, VT-x"),
    (
        "mem",
        "physical memory: the map, usable and free frames, heap",
    ),
    ("vmx", "VT-x capabilities of this machine, decoded"),
    (
        "log",
        "log <off|error|warn|info|debug|trace>: show or set the console log level",
    ),
    (
        "domains",
        "every domain: state, memory, CPU, exits by reason",
    ),
    (
        "disks",
        "dom0's block ring and every guest disk: requests, errors, state",
    ),
    (
        "net",
        "every network and its guests' ports: VLAN, MAC, frames, drops by reason",
    ),
    ("destroy", "destroy <id>: stop a domain and free its memory"),
    (
        "pause",
        "pause <id>: hold every vCPU of a domain (its memory stays)",
    ),
    ("resume", "resume <id>: let a paused domain run again"),
    (
        "console",
        "console <id>: type into a Linux domain's serial port and see its output; Ctrl-] detaches",
    ),
    (
        "sched",
        "sched [<id> weight=W cap=C|none reserve=R pin=CPUS]: show or change CPU shares",
    ),
    (
        "audit",
        "check that every domain's EPT maps only its own RAM",
    ),
    ("reboot", "reset the machine"),
];

/// A parsed console command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// An empty line: just print the prompt again.
    Empty,
    Help,
    Cpus,
    Mem,
    Vmx,
    /// `log` alone shows the level; `log LEVEL` sets it.
    Log(Option<LevelFilter>),
    Domains,
    Disks,
    Net,
    Destroy(u32),
    Pause(u32),
    Resume(u32),
    /// `console ID`: attach the operator's console to a domain's serial port.
    Console(u32),
    /// `sched` alone lists; `sched ID key=value...` changes a domain.
    Sched(Option<(u32, Change)>),
    Audit,
    Reboot,
}

/// Why a line is not a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError<'a> {
    Unknown(&'a str),
    /// The command takes no arguments but got some.
    UnexpectedArgument {
        command: &'static str,
        argument: &'a str,
    },
    BadLevel(&'a str),
    /// `destroy`, `pause`, `resume` or `console` without a valid domain id.
    BadDomain(&'static str, Option<&'a str>),
    /// `sched ID` with a word that is not a valid `key=value` (None: no word at all).
    BadSched(Option<&'a str>, KeyError),
}

impl core::fmt::Display for ParseError<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ParseError::Unknown(name) => {
                write!(
                    f,
                    "error: unknown command '{name}'; type 'help' for the list"
                )
            }
            ParseError::UnexpectedArgument { command, argument } => {
                write!(
                    f,
                    "error: '{command}' takes no arguments (got '{argument}')"
                )
            }
            ParseError::BadLevel(level) => {
                write!(f, "error: log: unknown level '{level}': {LevelError}")
            }
            ParseError::BadDomain(cmd, None) => {
                write!(f, "error: {cmd}: which domain? ({cmd} <id>)")
            }
            ParseError::BadSched(None, why) => write!(f, "error: sched: {why}"),
            ParseError::BadSched(Some(word), why) => write!(f, "error: sched: '{word}': {why}"),
            ParseError::BadDomain(cmd, Some(id)) => {
                write!(
                    f,
                    "error: {cmd}: '{id}' is not a domain id (a number from 'domains')"
                )
            }
        }
    }
}

/// Parses one line typed at the prompt.
pub fn parse(line: &str) -> Result<Command, ParseError<'_>> {
    let mut words = line.split_ascii_whitespace();
    let Some(name) = words.next() else {
        return Ok(Command::Empty);
    };
    let arg = words.next();
    let no_args = |command: &'static str, c: Command| match arg {
        None => Ok(c),
        Some(argument) => Err(ParseError::UnexpectedArgument { command, argument }),
    };
    match name {
        "help" | "?" => no_args("help", Command::Help),
        "cpus" => no_args("cpus", Command::Cpus),
        "mem" => no_args("mem", Command::Mem),
        "vmx" => no_args("vmx", Command::Vmx),
        "reboot" => no_args("reboot", Command::Reboot),
        "domains" => no_args("domains", Command::Domains),
        "disks" => no_args("disks", Command::Disks),
        "net" => no_args("net", Command::Net),
        "audit" => no_args("audit", Command::Audit),
        "destroy" | "pause" | "resume" | "console" => {
            let (command, make): (&'static str, fn(u32) -> Command) = match name {
                "destroy" => ("destroy", Command::Destroy),
                "pause" => ("pause", Command::Pause),
                "console" => ("console", Command::Console),
                _ => ("resume", Command::Resume),
            };
            match (arg, words.next()) {
                (Some(id), None) => id
                    .parse()
                    .map(make)
                    .map_err(|_| ParseError::BadDomain(command, Some(id))),
                (Some(_), Some(extra)) => Err(ParseError::UnexpectedArgument {
                    command,
                    argument: extra,
                }),
                (None, _) => Err(ParseError::BadDomain(command, None)),
            }
        }
        "sched" => {
            let Some(id) = arg else {
                return Ok(Command::Sched(None));
            };
            let id = id
                .parse()
                .map_err(|_| ParseError::BadDomain("sched", Some(id)))?;
            let mut change = Change::default();
            for word in words {
                let Some((key, value)) = word.split_once('=') else {
                    return Err(ParseError::BadSched(
                        Some(word),
                        KeyError("not key=value (weight=, cap=, reserve=, pin=)"),
                    ));
                };
                match change.set(key, value) {
                    Ok(true) => {}
                    Ok(false) => {
                        return Err(ParseError::BadSched(
                            Some(word),
                            KeyError("unknown key (weight, cap, reserve, pin)"),
                        ));
                    }
                    Err(e) => return Err(ParseError::BadSched(Some(word), e)),
                }
            }
            if change.is_empty() {
                return Err(ParseError::BadSched(
                    None,
                    KeyError(
                        "nothing to change (sched <id> weight=W cap=C|none reserve=R pin=CPUS)",
                    ),
                ));
            }
            Ok(Command::Sched(Some((id, change))))
        }
        "log" => match arg {
            None => Ok(Command::Log(None)),
            Some(level) => match (parse_level(level), words.next()) {
                (Ok(l), None) => Ok(Command::Log(Some(l))),
                (Ok(_), Some(extra)) => Err(ParseError::UnexpectedArgument {
                    command: "log",
                    argument: extra,
                }),
                (Err(_), _) => Err(ParseError::BadLevel(level)),
            },
        },
        other => Err(ParseError::Unknown(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_command_parses() {
        for (name, _) in COMMANDS {
            // Commands that need an argument are tried with one.
            let line = if matches!(*name, "destroy" | "pause" | "resume" | "console") {
                format!("{name} 1")
            } else {
                name.to_string()
            };
            assert!(parse(&line).is_ok(), "{line}");
        }
    }

    #[test]
    fn commands() {
        assert_eq!(parse("  cpus "), Ok(Command::Cpus));
        assert_eq!(parse(""), Ok(Command::Empty));
        assert_eq!(parse("   "), Ok(Command::Empty));
        assert_eq!(parse("log"), Ok(Command::Log(None)));
        assert_eq!(parse("net"), Ok(Command::Net));
        assert!(parse("net lan").is_err());
        assert_eq!(
            parse("log debug"),
            Ok(Command::Log(Some(LevelFilter::Debug)))
        );
    }

    #[test]
    fn errors_say_what_was_wrong() {
        let e = parse("frobnicate now").unwrap_err();
        assert_eq!(e, ParseError::Unknown("frobnicate"));
        assert_eq!(
            format!("{e}"),
            "error: unknown command 'frobnicate'; type 'help' for the list"
        );
        let e = parse("log loud").unwrap_err();
        assert!(format!("{e}").contains("unknown level 'loud'"));
        let e = parse("cpus 3").unwrap_err();
        assert_eq!(format!("{e}"), "error: 'cpus' takes no arguments (got '3')");
        assert!(parse("log info extra").is_err());
        assert_eq!(parse("destroy 3"), Ok(Command::Destroy(3)));
        assert_eq!(
            parse("destroy"),
            Err(ParseError::BadDomain("destroy", None))
        );
        assert_eq!(parse("pause 2"), Ok(Command::Pause(2)));
        assert_eq!(parse("resume 2"), Ok(Command::Resume(2)));
        assert_eq!(
            format!("{}", parse("pause").unwrap_err()),
            "error: pause: which domain? (pause <id>)"
        );
        assert!(parse("resume 2 3").is_err());
        assert_eq!(parse("console 1"), Ok(Command::Console(1)));
        assert_eq!(
            format!("{}", parse("console").unwrap_err()),
            "error: console: which domain? (console <id>)"
        );
        assert!(parse("console 1 2").is_err());
        assert_eq!(
            format!("{}", parse("destroy x").unwrap_err()),
            "error: destroy: 'x' is not a domain id (a number from 'domains')"
        );
    }

    #[test]
    fn sched_lists_or_changes_with_checked_keys() {
        assert_eq!(parse("sched"), Ok(Command::Sched(None)));
        let Ok(Command::Sched(Some((2, c)))) = parse("sched 2 weight=512 cap=25 pin=1") else {
            panic!("sched with keys");
        };
        assert_eq!(
            (c.weight, c.cap, c.pin, c.reserve),
            (Some(512), Some(Some(25)), Some(0b10), None)
        );
        for (line, says) in [
            ("sched 2", "nothing to change"),
            ("sched x weight=1", "'x' is not a domain id"),
            ("sched 2 weight=0", "'weight=0': weight: must be 1..65535"),
            ("sched 2 cap=half", "'cap=half': cap: not a percentage"),
            ("sched 2 speed=9", "'speed=9': unknown key"),
            ("sched 2 fast", "'fast': not key=value"),
            ("sched 2 pin=70", "CPU numbers are 0..63"),
        ] {
            let e = format!("{}", parse(line).unwrap_err());
            assert!(e.contains(says), "{line}: {e}");
        }
    }
}
