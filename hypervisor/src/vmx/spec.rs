//! Speculative-execution mitigations on the VM exit/entry path, chosen per CPU from what the
//! CPU says of itself (issue 16, part 1). Pure: the caller passes CPUID leaf 7 EDX, the
//! IA32_ARCH_CAPABILITIES MSR (when CPUID says it exists), whether SMT siblings run, and the
//! operator's `hv.spec-ctrl=` choice; [`choose`] answers what to do and why, line by line.
//!
//! What each one is for (Intel's guidance "Deep Dives: Affected Processors and Mitigations"):
//! - RSB fill on every VM exit: the guest leaves return predictions behind (Spectre v2 via the
//!   RSB, RSBA parts); 32 calls overwrite them before the hypervisor returns anywhere.
//! - IBPB when a CPU switches to a vCPU of another domain: indirect-branch predictions trained
//!   by one guest must not steer the next (Spectre v2 between guests).
//! - VERW before VM entry: clears CPU buffers (MDS, TAA, MMIO stale data) so hypervisor data
//!   does not leak into the guest; needs MD_CLEAR.
//! - L1D flush before VM entry: L1TF lets a guest read the L1 data cache; needed where the CPU
//!   is not RDCL_NO and does not flush on VM entry itself (SKIP_L1DFL_VMENTRY); with SMT, a
//!   sibling can still fill it (documented risk).
//! - IBRS in the hypervisor on eIBRS CPUs (IBRS_ALL): set in IA32_SPEC_CTRL while the
//!   hypervisor runs, predictions made in guest mode cannot steer its indirect branches. The
//!   CPU's VM-exit MSR-load area sets it at every exit where the guest's own value differs
//!   (`vmx::policy::SpecCtrlAreas`). Legacy IBRS (no IBRS_ALL) would need the same write and
//!   slows everything while set; there the RSB fill and IBPB are what is used, as in Linux.

/// CPUID.(EAX=7,ECX=0):EDX bits.
pub mod cpuid7 {
    pub const MD_CLEAR: u32 = 1 << 10;
    pub const IBRS_IBPB: u32 = 1 << 26;
    pub const STIBP: u32 = 1 << 27;
    pub const L1D_FLUSH: u32 = 1 << 28;
    pub const ARCH_CAPABILITIES: u32 = 1 << 29;
}

/// IA32_ARCH_CAPABILITIES (MSR 0x10A) bits.
pub mod arch_cap {
    pub const RDCL_NO: u64 = 1 << 0;
    pub const IBRS_ALL: u64 = 1 << 1;
    pub const RSBA: u64 = 1 << 2;
    pub const SKIP_L1DFL_VMENTRY: u64 = 1 << 3;
    pub const MDS_NO: u64 = 1 << 5;
    pub const TAA_NO: u64 = 1 << 8;
    pub const SBDR_SSDP_NO: u64 = 1 << 13;
    pub const FBSDP_NO: u64 = 1 << 14;
    pub const PSDP_NO: u64 = 1 << 15;
}

/// `hv.spec-ctrl=`: `auto` (default) follows the CPU; `on` forces every mitigation the CPU
/// can perform (for measuring their cost, or on a CPU that under-reports); `off` disables them
/// all: any guest may then read hypervisor and other guests' data on affected CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    Auto,
    On,
    Off,
}

impl Choice {
    pub fn parse(s: Option<&str>) -> Result<Choice, &str> {
        match s {
            None | Some("auto") => Ok(Choice::Auto),
            Some("on") => Ok(Choice::On),
            Some("off") => Ok(Choice::Off),
            Some(other) => Err(other),
        }
    }
}

/// What the CPU reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuBugs {
    pub cpuid7_edx: u32,
    /// IA32_ARCH_CAPABILITIES, 0 when the CPU has none (then it claims no immunity).
    pub arch_cap: u64,
    pub smt: bool,
}

/// The mitigations in force on one CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mitigations {
    pub rsb_fill: bool,
    pub ibpb_on_switch: bool,
    pub verw: bool,
    pub l1d_flush: bool,
    /// IA32_SPEC_CTRL.IBRS set while the hypervisor runs.
    pub host_ibrs: bool,
}

impl Mitigations {
    /// The hypervisor's IA32_SPEC_CTRL value.
    #[must_use]
    pub fn host_spec_ctrl(&self) -> u64 {
        u64::from(self.host_ibrs)
    }
}

/// [`Mitigations`] and, for each, why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub m: Mitigations,
    pub why: [&'static str; 5],
}

/// Decides the mitigations for a CPU.
pub fn choose(c: CpuBugs, choice: Choice) -> Decision {
    let has = |bit: u32| c.cpuid7_edx & bit != 0;
    let cap = |bit: u64| has(cpuid7::ARCH_CAPABILITIES) && c.arch_cap & bit != 0;
    let can_ibpb = has(cpuid7::IBRS_IBPB);
    let can_l1d = has(cpuid7::L1D_FLUSH);
    let can_verw = has(cpuid7::MD_CLEAR);
    match choice {
        Choice::Off => Decision {
            m: Mitigations::default(),
            why: ["off (hv.spec-ctrl=off)"; 5],
        },
        Choice::On => Decision {
            m: Mitigations {
                rsb_fill: true,
                ibpb_on_switch: can_ibpb,
                // VERW is an ordinary instruction: forced on even without MD_CLEAR (it then
                // clears nothing, but costs what it costs, for the benchmark).
                verw: true,
                l1d_flush: can_l1d,
                host_ibrs: can_ibpb,
            },
            why: [
                "on (hv.spec-ctrl=on)",
                if can_ibpb {
                    "on (hv.spec-ctrl=on)"
                } else {
                    "unavailable: no IBPB (CPUID.7.EDX[26])"
                },
                "on (hv.spec-ctrl=on)",
                if can_l1d {
                    "on (hv.spec-ctrl=on)"
                } else {
                    "unavailable: no L1D_FLUSH (CPUID.7.EDX[28])"
                },
                if can_ibpb {
                    "on (hv.spec-ctrl=on)"
                } else {
                    "unavailable: no IBRS (CPUID.7.EDX[26])"
                },
            ],
        },
        Choice::Auto => {
            // Without eIBRS (IBRS_ALL) every CPU may predict returns from the RSB the guest
            // filled; with it, RSBA parts still fall back to the BTB.
            let rsb = !cap(arch_cap::IBRS_ALL) || cap(arch_cap::RSBA);
            let mds = !cap(arch_cap::MDS_NO);
            let taa = !cap(arch_cap::TAA_NO);
            let mmio =
                !(cap(arch_cap::SBDR_SSDP_NO) && cap(arch_cap::FBSDP_NO) && cap(arch_cap::PSDP_NO));
            let verw_needed = mds || taa || mmio;
            let l1tf = !cap(arch_cap::RDCL_NO) && !cap(arch_cap::SKIP_L1DFL_VMENTRY);
            let eibrs = cap(arch_cap::IBRS_ALL) && can_ibpb;
            Decision {
                m: Mitigations {
                    rsb_fill: rsb,
                    ibpb_on_switch: can_ibpb,
                    verw: verw_needed && can_verw,
                    l1d_flush: l1tf && can_l1d,
                    host_ibrs: eibrs,
                },
                why: [
                    if rsb {
                        "on: no eIBRS, or RSBA"
                    } else {
                        "off: eIBRS without RSBA"
                    },
                    if can_ibpb {
                        "on: the CPU offers IBPB"
                    } else {
                        "unavailable: no IBPB"
                    },
                    match (verw_needed, can_verw) {
                        (false, _) => "off: MDS_NO, TAA_NO and MMIO-stale-data immune",
                        (true, true) => "on: MDS/TAA/MMIO stale data, MD_CLEAR offered",
                        (true, false) => "unavailable: affected but no MD_CLEAR (update microcode)",
                    },
                    match (l1tf, can_l1d) {
                        (false, _) => "off: RDCL_NO or the CPU flushes on VM entry",
                        (true, true) if c.smt => {
                            "on: L1TF (SMT is on: a sibling can still fill L1D)"
                        }
                        (true, true) => "on: L1TF",
                        (true, false) => "unavailable: L1TF but no L1D_FLUSH (update microcode)",
                    },
                    if eibrs {
                        "on: eIBRS (IBRS_ALL): guest-mode predictions cannot steer it"
                    } else {
                        "off: no eIBRS (the RSB fill and IBPB cover Spectre v2 here)"
                    },
                ],
            }
        }
    }
}

/// The `vmx` console's lines for a decision.
pub fn report(d: &Decision) -> [(&'static str, bool, &'static str); 5] {
    [
        ("RSB fill on VM exit", d.m.rsb_fill, d.why[0]),
        ("IBPB between domains", d.m.ibpb_on_switch, d.why[1]),
        ("VERW before VM entry", d.m.verw, d.why[2]),
        ("L1D flush before VM entry", d.m.l1d_flush, d.why[3]),
        ("IBRS in the hypervisor", d.m.host_ibrs, d.why[4]),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: CpuBugs = CpuBugs {
        // A Skylake-era server: IBRS/IBPB, L1D_FLUSH, MD_CLEAR, no ARCH_CAPABILITIES.
        cpuid7_edx: cpuid7::IBRS_IBPB | cpuid7::L1D_FLUSH | cpuid7::MD_CLEAR,
        arch_cap: 0,
        smt: true,
    };

    #[test]
    fn an_old_cpu_gets_everything() {
        let d = choose(OLD, Choice::Auto);
        assert_eq!(
            d.m,
            Mitigations {
                rsb_fill: true,
                ibpb_on_switch: true,
                verw: true,
                l1d_flush: true,
                host_ibrs: false,
            }
        );
        assert!(d.why[3].contains("SMT"));
    }

    #[test]
    fn a_cpu_that_is_immune_gets_what_it_still_needs() {
        let c = CpuBugs {
            cpuid7_edx: cpuid7::IBRS_IBPB | cpuid7::ARCH_CAPABILITIES | cpuid7::MD_CLEAR,
            arch_cap: arch_cap::RDCL_NO
                | arch_cap::IBRS_ALL
                | arch_cap::MDS_NO
                | arch_cap::TAA_NO
                | arch_cap::SBDR_SSDP_NO
                | arch_cap::FBSDP_NO
                | arch_cap::PSDP_NO,
            smt: false,
        };
        let d = choose(c, Choice::Auto);
        assert_eq!(
            d.m,
            Mitigations {
                rsb_fill: false,
                ibpb_on_switch: true,
                verw: false,
                l1d_flush: false,
                host_ibrs: true,
            }
        );
        assert!(d.why[4].contains("eIBRS"));
        // RSBA brings the RSB fill back.
        let rsba = CpuBugs {
            arch_cap: c.arch_cap | arch_cap::RSBA,
            ..c
        };
        assert!(choose(rsba, Choice::Auto).m.rsb_fill);
        // Immunity bits count only where CPUID says ARCH_CAPABILITIES exists.
        let no_msr = CpuBugs {
            cpuid7_edx: c.cpuid7_edx & !cpuid7::ARCH_CAPABILITIES,
            ..c
        };
        assert!(choose(no_msr, Choice::Auto).m.rsb_fill);
    }

    #[test]
    fn missing_microcode_is_said_and_overrides_work() {
        let bare = CpuBugs::default(); // what Bochs reports: no bits at all
        let d = choose(bare, Choice::Auto);
        assert_eq!(
            d.m,
            Mitigations {
                rsb_fill: true,
                ..Default::default()
            }
        );
        assert!(d.why[2].contains("no MD_CLEAR") && d.why[3].contains("no L1D_FLUSH"));
        let on = choose(bare, Choice::On);
        assert!(on.m.rsb_fill && on.m.verw && !on.m.ibpb_on_switch && !on.m.l1d_flush);
        assert!(!on.m.host_ibrs && on.why[4].contains("no IBRS"));
        assert!(
            choose(OLD, Choice::On).m.host_ibrs,
            "forced where the CPU has IBRS"
        );
        assert!(
            !choose(OLD, Choice::Auto).m.host_ibrs,
            "no eIBRS: not by default"
        );
        assert_eq!(choose(OLD, Choice::Off).m, Mitigations::default());
        assert_eq!(Choice::parse(Some("on")), Ok(Choice::On));
        assert_eq!(Choice::parse(None), Ok(Choice::Auto));
        assert_eq!(Choice::parse(Some("maybe")), Err("maybe"));
    }
}
