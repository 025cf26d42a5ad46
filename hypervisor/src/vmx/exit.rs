//! VM-exit reasons and exit qualifications, decoded (SDM Vol. 3C §27.2, Appendix C).

/// The basic exit reason (bits 15:0 of the exit-reason field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    ExceptionOrNmi,
    ExternalInterrupt,
    TripleFault,
    InitSignal,
    InterruptWindow,
    Cpuid,
    Hlt,
    Invlpg,
    Rdtsc,
    Vmcall,
    /// Any VMX instruction other than VMCALL executed by the guest.
    VmxInstruction(u16),
    CrAccess,
    IoInstruction,
    Rdmsr,
    Wrmsr,
    InvalidGuestState,
    MsrLoadFailure,
    MachineCheck,
    EptViolation,
    EptMisconfig,
    PreemptionTimer,
    Xsetbv,
    Other(u16),
}

/// How many distinct reasons [`ExitReason::slot`] counts (for per-domain statistics).
pub const REASON_SLOTS: usize = 24;

impl ExitReason {
    pub fn from_raw(raw: u32) -> ExitReason {
        match (raw & 0xffff) as u16 {
            0 => ExitReason::ExceptionOrNmi,
            1 => ExitReason::ExternalInterrupt,
            2 => ExitReason::TripleFault,
            3 => ExitReason::InitSignal,
            7 => ExitReason::InterruptWindow,
            10 => ExitReason::Cpuid,
            12 => ExitReason::Hlt,
            14 => ExitReason::Invlpg,
            16 => ExitReason::Rdtsc,
            18 => ExitReason::Vmcall,
            n @ (19..=27 | 50 | 53) => ExitReason::VmxInstruction(n),
            28 => ExitReason::CrAccess,
            30 => ExitReason::IoInstruction,
            31 => ExitReason::Rdmsr,
            32 => ExitReason::Wrmsr,
            33 => ExitReason::InvalidGuestState,
            34 => ExitReason::MsrLoadFailure,
            41 => ExitReason::MachineCheck,
            48 => ExitReason::EptViolation,
            49 => ExitReason::EptMisconfig,
            52 => ExitReason::PreemptionTimer,
            55 => ExitReason::Xsetbv,
            n => ExitReason::Other(n),
        }
    }

    /// Whether bit 31 says VM entry failed (the guest never ran).
    pub fn entry_failed(raw: u32) -> bool {
        raw & (1 << 31) != 0
    }

    /// A short name, for the console.
    pub fn name(self) -> &'static str {
        match self {
            ExitReason::ExceptionOrNmi => "exception",
            ExitReason::ExternalInterrupt => "interrupt",
            ExitReason::TripleFault => "triple-fault",
            ExitReason::InitSignal => "init",
            ExitReason::InterruptWindow => "intr-window",
            ExitReason::Cpuid => "cpuid",
            ExitReason::Hlt => "hlt",
            ExitReason::Invlpg => "invlpg",
            ExitReason::Rdtsc => "rdtsc",
            ExitReason::Vmcall => "vmcall",
            ExitReason::VmxInstruction(_) => "vmx-insn",
            ExitReason::CrAccess => "cr-access",
            ExitReason::IoInstruction => "io",
            ExitReason::Rdmsr => "rdmsr",
            ExitReason::Wrmsr => "wrmsr",
            ExitReason::InvalidGuestState => "bad-state",
            ExitReason::MsrLoadFailure => "msr-load",
            ExitReason::MachineCheck => "mce",
            ExitReason::EptViolation => "ept-violation",
            ExitReason::EptMisconfig => "ept-misconfig",
            ExitReason::PreemptionTimer => "preempt",
            ExitReason::Xsetbv => "xsetbv",
            ExitReason::Other(_) => "other",
        }
    }

    /// A counter slot per reason, `< REASON_SLOTS`.
    pub fn slot(self) -> usize {
        match self {
            ExitReason::ExceptionOrNmi => 0,
            ExitReason::ExternalInterrupt => 1,
            ExitReason::TripleFault => 2,
            ExitReason::InitSignal => 3,
            ExitReason::InterruptWindow => 4,
            ExitReason::Cpuid => 5,
            ExitReason::Hlt => 6,
            ExitReason::Invlpg => 7,
            ExitReason::Rdtsc => 8,
            ExitReason::Vmcall => 9,
            ExitReason::VmxInstruction(_) => 10,
            ExitReason::CrAccess => 11,
            ExitReason::IoInstruction => 12,
            ExitReason::Rdmsr => 13,
            ExitReason::Wrmsr => 14,
            ExitReason::InvalidGuestState => 15,
            ExitReason::MsrLoadFailure => 16,
            ExitReason::MachineCheck => 17,
            ExitReason::EptViolation => 18,
            ExitReason::EptMisconfig => 19,
            ExitReason::PreemptionTimer => 20,
            ExitReason::Xsetbv => 21,
            ExitReason::Other(_) => 22,
        }
    }

    /// The name of counter slot `i` (inverse of [`ExitReason::slot`]).
    pub fn slot_name(i: usize) -> &'static str {
        const NAMES: [&str; REASON_SLOTS] = [
            "exception",
            "interrupt",
            "triple-fault",
            "init",
            "intr-window",
            "cpuid",
            "hlt",
            "invlpg",
            "rdtsc",
            "vmcall",
            "vmx-insn",
            "cr-access",
            "io",
            "rdmsr",
            "wrmsr",
            "bad-state",
            "msr-load",
            "mce",
            "ept-violation",
            "ept-misconfig",
            "preempt",
            "xsetbv",
            "other",
            "-",
        ];
        NAMES.get(i).copied().unwrap_or("-")
    }
}

/// Exit qualification of an I/O instruction (SDM Vol. 3C Table 27-5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoExit {
    pub port: u16,
    /// 1, 2 or 4 bytes.
    pub size: u8,
    pub input: bool,
    /// INS/OUTS: the hypervisor refuses these (the guest gets #GP... here: the domain stops).
    pub string: bool,
    pub rep: bool,
}

impl IoExit {
    pub fn decode(q: u64) -> IoExit {
        IoExit {
            size: match q & 7 {
                0 => 1,
                1 => 2,
                _ => 4,
            },
            input: q & (1 << 3) != 0,
            string: q & (1 << 4) != 0,
            rep: q & (1 << 5) != 0,
            port: (q >> 16) as u16,
        }
    }
}

/// Exit qualification of an EPT violation (SDM Vol. 3C Table 27-7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EptViolationExit {
    pub read: bool,
    pub write: bool,
    pub fetch: bool,
    /// Whether the guest-physical address was mapped at all (any of bits 3..5).
    pub was_mapped: bool,
}

impl EptViolationExit {
    pub fn decode(q: u64) -> EptViolationExit {
        EptViolationExit {
            read: q & 1 != 0,
            write: q & 2 != 0,
            fetch: q & 4 != 0,
            was_mapped: q & 0x38 != 0,
        }
    }

    pub fn access(&self) -> &'static str {
        if self.fetch {
            "fetch"
        } else if self.write {
            "write"
        } else {
            "read"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons() {
        assert_eq!(ExitReason::from_raw(10), ExitReason::Cpuid);
        assert_eq!(ExitReason::from_raw(18), ExitReason::Vmcall);
        assert_eq!(ExitReason::from_raw(48), ExitReason::EptViolation);
        assert_eq!(ExitReason::from_raw(52), ExitReason::PreemptionTimer);
        assert_eq!(
            ExitReason::from_raw(0x8000_0021),
            ExitReason::InvalidGuestState
        );
        assert!(ExitReason::entry_failed(0x8000_0021));
        assert!(!ExitReason::entry_failed(12));
        assert_eq!(ExitReason::from_raw(24), ExitReason::VmxInstruction(24));
        assert_eq!(ExitReason::from_raw(99), ExitReason::Other(99));
    }

    #[test]
    fn slots_are_distinct_and_named() {
        let all = [
            0u32, 1, 2, 3, 7, 10, 12, 14, 16, 18, 19, 28, 30, 31, 32, 33, 34, 41, 48, 49, 52, 55,
            99,
        ];
        let mut seen = std::collections::HashSet::new();
        for r in all {
            let e = ExitReason::from_raw(r);
            assert!(e.slot() < REASON_SLOTS);
            assert!(seen.insert(e.slot()), "{e:?}");
            assert_eq!(ExitReason::slot_name(e.slot()), e.name());
        }
    }

    #[test]
    fn io_qualification() {
        // OUT DX, AL to 0x3f8
        let q = IoExit::decode(0x03f8_0000);
        assert_eq!(
            q,
            IoExit {
                port: 0x3f8,
                size: 1,
                input: false,
                string: false,
                rep: false
            }
        );
        // IN EAX, DX from 0xcfc
        let q = IoExit::decode(0x0cfc_0000 | 3 | 8);
        assert_eq!((q.port, q.size, q.input), (0xcfc, 4, true));
        let q = IoExit::decode(0x0060_0000 | 1 | 0x10 | 0x20);
        assert!(q.string && q.rep && q.size == 2);
    }

    #[test]
    fn ept_violation_qualification() {
        let v = EptViolationExit::decode(0x2);
        assert!(v.write && !v.was_mapped);
        assert_eq!(v.access(), "write");
        let v = EptViolationExit::decode(0x4 | 0x8);
        assert!(v.fetch && v.was_mapped);
    }
}
