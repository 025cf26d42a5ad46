//! VM-exit reasons and exit qualifications, decoded (SDM Vol. 3C §27.2, Appendix C).

/// The one list of exit reasons: variant, basic exit-reason numbers (SDM Vol. 3C Appendix C),
/// the short name shown on the console and in the per-domain counters. The enum, the decoder,
/// the names and the counter slots are all generated from it, in this order.
macro_rules! exit_reasons {
    ($( $(#[$doc:meta])* $variant:ident $(($field:ty))? = $($num:literal)|+ => $name:literal, )*
     ; other => $other_name:literal) => {
        /// The basic exit reason (bits 15:0 of the exit-reason field).
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum ExitReason {
            $( $(#[$doc])* $variant $(($field))?, )*
            /// A reason this hypervisor does not expect (its number).
            Other(u16),
        }

        /// How many counter slots [`ExitReason::slot`] uses (for per-domain statistics).
        pub const REASON_SLOTS: usize = [$($name,)* $other_name].len();

        const NAMES: [&str; REASON_SLOTS] = [$($name,)* $other_name];

        impl ExitReason {
            /// Decodes the exit-reason field (bit 31, "VM entry failed", is ignored here).
            pub const fn from_raw(raw: u32) -> ExitReason {
                let n = (raw & 0xffff) as u16;
                $( if matches!(n, $($num)|+) { return exit_reasons!(@make $variant n $(($field))?); } )*
                ExitReason::Other(n)
            }

            /// The counter slot, `< REASON_SLOTS`.
            pub fn slot(self) -> usize {
                let mut i = 0;
                $(
                    if exit_reasons!(@is self $variant $(($field))?) {
                        return i;
                    }
                    i += 1;
                )*
                i
            }
        }
    };
    (@make $variant:ident $n:ident ($field:ty)) => { ExitReason::$variant($n) };
    (@make $variant:ident $n:ident) => { ExitReason::$variant };
    (@is $s:ident $variant:ident ($field:ty)) => { matches!($s, ExitReason::$variant(_)) };
    (@is $s:ident $variant:ident) => { matches!($s, ExitReason::$variant) };
}

exit_reasons! {
    ExceptionOrNmi = 0 => "exception",
    ExternalInterrupt = 1 => "interrupt",
    TripleFault = 2 => "triple-fault",
    InitSignal = 3 => "init",
    InterruptWindow = 7 => "intr-window",
    Cpuid = 10 => "cpuid",
    Hlt = 12 => "hlt",
    Invlpg = 14 => "invlpg",
    Rdtsc = 16 => "rdtsc",
    Vmcall = 18 => "vmcall",
    /// Any VMX instruction other than VMCALL executed by the guest.
    VmxInstruction(u16) = 19 | 20 | 21 | 22 | 23 | 24 | 25 | 26 | 27 | 50 | 53 => "vmx-insn",
    CrAccess = 28 => "cr-access",
    IoInstruction = 30 => "io",
    Rdmsr = 31 => "rdmsr",
    Wrmsr = 32 => "wrmsr",
    InvalidGuestState = 33 => "bad-state",
    MsrLoadFailure = 34 => "msr-load",
    MachineCheck = 41 => "mce",
    EptViolation = 48 => "ept-violation",
    EptMisconfig = 49 => "ept-misconfig",
    PreemptionTimer = 52 => "preempt",
    Xsetbv = 55 => "xsetbv",
    ; other => "other"
}

impl ExitReason {
    /// Whether bit 31 of the raw exit reason says the VM entry itself failed.
    pub fn entry_failed(raw: u32) -> bool {
        raw & (1 << 31) != 0
    }

    /// A short name, for the console.
    pub fn name(self) -> &'static str {
        NAMES[self.slot()]
    }

    /// The name of counter slot `i` (inverse of [`ExitReason::slot`]); `-` past the end.
    pub fn slot_name(i: usize) -> &'static str {
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
