//! The exits of a PC guest (an unmodified Linux) that reach its interrupt controllers: its
//! vCPU's local APIC (the xAPIC page, `IA32_APIC_BASE`, the TSC-deadline and x2APIC MSRs) and
//! the domain's IOAPIC; the routing of their interrupts to local APICs; and the injection of
//! the highest pending one before each entry. Pure over the dispatcher's interfaces, so it is
//! host-tested with the rest of the dispatcher.
//!
//! Interrupts for another vCPU of the domain (IPIs, IOAPIC deliveries) go through
//! [`Platform::post_interrupt`]; the receiving vCPU folds them into its local APIC before its
//! next entry.

use hv_platform::ioapic::Delivery;
use hv_platform::lapic::{Destination, Effect, Ipi, LocalApic};

use super::dispatch::{Platform, Result, VcpuCore};
use crate::domain::vtimer;
use crate::io::pc::{IOAPIC_WINDOW, LAPIC_WINDOW};
use crate::vmx::vmcs::{VmcsAccess, fields as f};

/// The local APIC of a PC vCPU (its id is the vCPU's index).
pub fn new_lapic(index: u32, tsc_khz: u64) -> Box<LocalApic> {
    let per_tick = crate::vmx::policy::tsc_per_crystal(tsc_khz);
    Box::new(LocalApic::new(index, per_tick))
}

use alloc::boxed::Box;

/// Whether `gpa` is an interrupt controller's register (for a PC vCPU).
pub fn is_apic(v: &VcpuCore, gpa: u64) -> bool {
    v.lapic.is_some() && (LAPIC_WINDOW.contains(&gpa) || IOAPIC_WINDOW.contains(&gpa))
}

/// A load from an interrupt controller's register.
pub fn read(v: &mut VcpuCore, p: &mut impl Platform, gpa: u64) -> u64 {
    let now = p.rdtsc();
    if LAPIC_WINDOW.contains(&gpa) {
        let off = (gpa - LAPIC_WINDOW.start) as u32;
        return v
            .lapic
            .as_mut()
            .map_or(u64::MAX, |l| u64::from(l.read(off, now)));
    }
    let off = (gpa - IOAPIC_WINDOW.start) as u32;
    p.with_io(|b| b.pc.as_mut().map_or(u32::MAX, |pc| pc.ioapic.read(off)))
        .into()
}

/// A store to an interrupt controller's register.
pub fn write(v: &mut VcpuCore, p: &mut impl Platform, gpa: u64, value: u64) {
    let now = p.rdtsc();
    if LAPIC_WINDOW.contains(&gpa) {
        let off = (gpa - LAPIC_WINDOW.start) as u32;
        let effect = match v.lapic.as_mut() {
            Some(l) => l.write(off, value as u32, now),
            None => return,
        };
        apply(v, p, effect);
        return;
    }
    let off = (gpa - IOAPIC_WINDOW.start) as u32;
    let d = p.with_io(|b| {
        b.pc.as_mut()
            .and_then(|pc| pc.ioapic.write(off, value as u32))
    });
    if let Some(d) = d {
        deliver(v, p, d);
    }
}

/// What a local APIC write asks of the rest of the machine.
fn apply(v: &mut VcpuCore, p: &mut impl Platform, effect: Effect) {
    match effect {
        Effect::None => {}
        Effect::Ipi(ipi) => send_ipi(v, p, ipi),
        Effect::Eoi(vector) => {
            let d = p.with_io(|b| b.pc.as_mut().and_then(|pc| pc.ioapic.eoi(vector)));
            if let Some(d) = d {
                deliver(v, p, d);
            }
        }
    }
}

/// An IOAPIC delivery: to this vCPU's local APIC when it is the destination, else posted.
pub fn deliver(v: &mut VcpuCore, p: &mut impl Platform, d: Delivery) {
    let dest = if d.logical {
        Destination::Logical(u32::from(d.dest))
    } else {
        Destination::Physical(u32::from(d.dest))
    };
    route(v, p, dest, d.vector, d.level);
}

fn send_ipi(v: &mut VcpuCore, p: &mut impl Platform, ipi: Ipi) {
    route(v, p, ipi.dest, ipi.vector, ipi.trigger_level);
}

/// Gives `vector` to every vCPU `dest` names: this one directly, the others by posting.
fn route(v: &mut VcpuCore, p: &mut impl Platform, dest: Destination, vector: u8, level: bool) {
    let me = v.index;
    for i in 0..p.vcpus() {
        let hit = if i == me {
            v.lapic.as_ref().is_some_and(|l| l.matches(&dest, true))
        } else {
            p.lapic_matches(i, &dest)
        };
        if !hit {
            continue;
        }
        if i == me {
            if let Some(l) = v.lapic.as_mut() {
                l.accept(vector, level);
            }
        } else {
            p.post_interrupt(i, vector, level);
        }
    }
}

/// The domain's device interrupts raised since the last entry (bit i: virtio window i), as
/// pulses on their IOAPIC pins; typed console input (`CONSOLE_INPUT_BIT`) moves into the UART.
pub fn device_lines(v: &mut VcpuCore, p: &mut impl Platform, bits: u64) {
    let typed = 1u64 << crate::io::pc::CONSOLE_INPUT_BIT;
    if bits & typed != 0
        && let Some(d) = p.with_io(|b| b.pc.as_mut().and_then(|pc| pc.take_input()))
    {
        deliver(v, p, d);
    }
    let mut rest = bits & !typed;
    while rest != 0 {
        let w = rest.trailing_zeros() as usize;
        rest &= rest - 1;
        let pin = crate::io::pc::virtio_gsi(w);
        let d = p.with_io(|b| {
            b.pc.as_mut().and_then(|pc| {
                let d = pc.ioapic.set_line(pin, true);
                pc.ioapic.set_line(pin, false);
                d
            })
        });
        if let Some(d) = d {
            deliver(v, p, d);
        }
    }
}

/// The APIC MSRs of a PC vCPU: `Some(Ok(value))` read/done, `Some(Err(()))` #GP, `None`: not
/// an APIC MSR.
pub fn msr(
    v: &mut VcpuCore,
    p: &mut impl Platform,
    msr: u32,
    write: Option<u64>,
) -> Option<core::result::Result<u64, ()>> {
    let now = p.rdtsc();
    let l = v.lapic.as_mut()?;
    let r = match (msr, write) {
        (0x1b, None) => Ok(l.apic_base()),
        (0x1b, Some(x)) => l.set_apic_base(x).map(|()| 0),
        (0x6e0, None) => Ok(l.tsc_deadline()),
        (0x6e0, Some(x)) => {
            l.set_tsc_deadline(x, now);
            Ok(0)
        }
        (0x800..=0x8ff, None) => l.read_msr(msr, now),
        (0x800..=0x8ff, Some(x)) => match l.write_msr(msr, x, now) {
            Ok(effect) => {
                apply(v, p, effect);
                Ok(0)
            }
            Err(()) => Err(()),
        },
        _ => return None,
    };
    Some(r)
}

/// Before an entry: brings the local APIC's timer up to `now`, folds in interrupts posted by
/// other vCPUs and the domain's devices, and injects the highest pending vector if the guest
/// can take it now; while one still waits, asks for an exit as soon as it can.
pub fn deliver_pending(v: &mut VcpuCore, a: &mut impl VmcsAccess, now: u64) -> Result<()> {
    let Some(l) = v.lapic.as_mut() else {
        return Ok(());
    };
    l.poll(now);
    if a.get(f::ENTRY_INTERRUPTION) & (1 << 31) != 0 {
        return Ok(()); // an exception goes first
    }
    let ready = vtimer::can_inject(a.get(f::GUEST_RFLAGS), a.get(f::GUEST_INTERRUPTIBILITY));
    let mut waiting = false;
    if let Some(vector) = l.pending() {
        if ready {
            l.ack(vector);
            a.set(f::ENTRY_INTERRUPTION, u64::from(vector) | (1 << 31))?;
            waiting = l.pending().is_some();
        } else {
            waiting = true;
        }
    }
    super::dispatch::window_exiting(v, a, waiting)
}
