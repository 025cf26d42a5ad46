//! The operator's console attached to one domain's serial port (`console ID`), as `xl console`
//! does for Xen: the bytes typed on COM1 go to that domain's virtual 16550 (its receive FIFO,
//! with its interrupt), and what the domain writes to its UART reaches COM1 as it comes,
//! unprefixed and unbuffered, so prompts show before their line ends. Ctrl-] ([`DETACH`])
//! gives the console back to the shell. One domain at a time; other domains' lines keep
//! printing with their `[domN]` prefix meanwhile.
//!
//! Bytes wait in the domain's queue ([`crate::io::pc::PcDevices::queue_input`], 256 bytes)
//! until its vCPU 0 moves them into the FIFO; what does not fit is dropped and counted, never
//! blocks the console.

use alloc::string::String;
use core::sync::atomic::{AtomicU32, Ordering};

use crate::domain::table::{Domain, DomainState};

/// Ctrl-]: ends the attachment.
pub const DETACH: u8 = 0x1d;

const NONE: u32 = u32::MAX;
static ATTACHED: AtomicU32 = AtomicU32::new(NONE);

/// The domain the console is attached to, if any.
pub fn attached() -> Option<u32> {
    let id = ATTACHED.load(Ordering::Relaxed);
    (id != NONE).then_some(id)
}

/// Whether domain `id`'s UART output goes to COM1 unprefixed now.
#[inline]
pub fn is_attached(id: u32) -> bool {
    ATTACHED.load(Ordering::Relaxed) == id
}

/// Attaches the console to `d`, which must be a running (or paused) PC domain: only those have
/// a UART to type into.
pub fn attach(d: &Domain) -> Result<(), String> {
    if !d.pc {
        return Err(alloc::format!(
            "domain {} ({}) has no serial port to attach to (only Linux domains do; its lines \
             show as [dom{}])",
            d.id,
            d.name,
            d.id
        ));
    }
    match d.state() {
        DomainState::Running | DomainState::Paused => {}
        other => {
            return Err(alloc::format!(
                "domain {} ({}) is {other:?}, not running",
                d.id,
                d.name
            ));
        }
    }
    ATTACHED.store(d.id, Ordering::Relaxed);
    Ok(())
}

/// Gives the console back to the shell.
pub fn detach() {
    ATTACHED.store(NONE, Ordering::Relaxed);
}

/// Queues `bytes` for `d`'s UART and makes its vCPU 0 look (woken if halted, kicked if it runs
/// elsewhere); returns how many were taken (the rest did not fit the queue).
pub fn type_into(d: &Domain, bytes: &[u8]) -> usize {
    let taken =
        d.io.lock()
            .pc
            .as_mut()
            .map_or(0, |pc| pc.queue_input(bytes));
    if taken > 0 {
        super::dom0::raise_irq(d, crate::io::pc::CONSOLE_INPUT_BIT);
    }
    taken
}
