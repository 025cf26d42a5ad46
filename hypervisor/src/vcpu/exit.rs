//! One VM exit as a plain value, read from the VMCS once, before it is handled.
//!
//! Only the fields the exit's reason needs are read (VMREADs are the exit path's main cost:
//! a VMCALL reads its reason and its instruction length here, and its RIP when the handler
//! steps over it); the others stay 0. [`Exit::NEEDS`] is that table.

use crate::vmx::exit::ExitReason;
use crate::vmx::vmcs::VmcsAccess;
use crate::vmx::vmcs::fields as f;

/// What an exit carries (SDM Vol. 3C §28.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    pub reason: ExitReason,
    /// The raw exit-reason field (bit 31: VM entry failed).
    pub raw: u32,
    pub qualification: u64,
    /// Guest-physical address (EPT violations and misconfigurations).
    pub gpa: u64,
    /// Length of the instruction that exited, for the handler to step over it.
    pub len: u64,
}

/// Which exit-information fields a reason needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Needs {
    pub qualification: bool,
    pub gpa: bool,
    pub len: bool,
}

impl Exit {
    /// The table of [`Needs`] per reason.
    pub const fn needs(reason: ExitReason) -> Needs {
        use ExitReason as R;
        let (qualification, gpa, len) = match reason {
            R::Cpuid | R::Hlt | R::Vmcall | R::Rdmsr | R::Wrmsr | R::Xsetbv => (false, false, true),
            R::IoInstruction | R::CrAccess => (true, false, true),
            R::EptViolation | R::EptMisconfig => (true, true, false),
            _ => (false, false, false),
        };
        Needs {
            qualification,
            gpa,
            len,
        }
    }

    /// Reads the exit from the current VMCS.
    #[inline(always)]
    pub fn capture(a: &mut impl VmcsAccess) -> Exit {
        let raw = a.info(f::EXIT_REASON) as u32;
        let reason = ExitReason::from_raw(raw);
        let needs = Self::needs(reason);
        Exit {
            reason,
            raw,
            qualification: if needs.qualification {
                a.info(f::EXIT_QUALIFICATION)
            } else {
                0
            },
            gpa: if needs.gpa {
                a.info(f::GUEST_PHYSICAL_ADDRESS)
            } else {
                0
            },
            len: if needs.len {
                a.info(f::EXIT_INSTRUCTION_LEN)
            } else {
                0
            },
        }
    }

    /// Whether the VM entry itself failed (then the exit qualification, which the caller
    /// reads on that cold path, says why).
    pub fn entry_failed(&self) -> bool {
        ExitReason::entry_failed(self.raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmx::vmcs::FakeVmcs;

    #[test]
    fn a_vmcall_reads_only_its_reason_and_length() {
        let mut a = FakeVmcs::default()
            .with_info(f::EXIT_REASON, 18)
            .with_info(f::EXIT_INSTRUCTION_LEN, 3)
            .with_info(f::EXIT_QUALIFICATION, 0xdead);
        let e = Exit::capture(&mut a);
        assert_eq!(e.reason, ExitReason::Vmcall);
        assert_eq!((e.len, e.qualification, e.gpa), (3, 0, 0));
        assert_eq!(a.reads, 2);
    }

    #[test]
    fn an_ept_violation_carries_its_address_and_qualification() {
        let mut a = FakeVmcs::default()
            .with_info(f::EXIT_REASON, 48)
            .with_info(f::GUEST_PHYSICAL_ADDRESS, 0xc000_0010)
            .with_info(f::EXIT_QUALIFICATION, 1);
        let e = Exit::capture(&mut a);
        assert_eq!(e.reason, ExitReason::EptViolation);
        assert_eq!((e.gpa, e.qualification, e.len), (0xc000_0010, 1, 0));
    }

    #[test]
    fn a_failed_entry_is_recognised() {
        let mut a = FakeVmcs::default().with_info(f::EXIT_REASON, (1 << 31) | 33);
        let e = Exit::capture(&mut a);
        assert!(e.entry_failed());
        assert_eq!(e.reason, ExitReason::InvalidGuestState);
    }
}
