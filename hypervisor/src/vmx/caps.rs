//! VMX capability MSRs decoded into named features, the IA32_FEATURE_CONTROL decision, and the
//! operator's report. Bit positions are from the Intel SDM, Vol. 3D, Appendix A
//! ("VMX Capability Reporting Facility") and Vol. 3C §24.6–24.8 (VM-execution, exit and entry
//! controls); each is named where it is read.

use core::fmt;

/// VMX-related MSR numbers (SDM Vol. 4, Table 2-2).
pub mod msr {
    pub const FEATURE_CONTROL: u32 = 0x3a;
    pub const VMX_BASIC: u32 = 0x480;
    pub const VMX_PINBASED_CTLS: u32 = 0x481;
    pub const VMX_PROCBASED_CTLS: u32 = 0x482;
    pub const VMX_EXIT_CTLS: u32 = 0x483;
    pub const VMX_ENTRY_CTLS: u32 = 0x484;
    pub const VMX_MISC: u32 = 0x485;
    pub const VMX_PROCBASED_CTLS2: u32 = 0x48b;
    pub const VMX_EPT_VPID_CAP: u32 = 0x48c;
    pub const VMX_TRUE_PINBASED_CTLS: u32 = 0x48d;
    pub const VMX_TRUE_PROCBASED_CTLS: u32 = 0x48e;
    pub const VMX_TRUE_EXIT_CTLS: u32 = 0x48f;
    pub const VMX_TRUE_ENTRY_CTLS: u32 = 0x490;
}

/// IA32_FEATURE_CONTROL bits (SDM Vol. 3C §23.7).
pub mod feature_control {
    pub const LOCK: u64 = 1 << 0;
    pub const VMX_INSIDE_SMX: u64 = 1 << 1;
    pub const VMX_OUTSIDE_SMX: u64 = 1 << 2;
}

/// What to do with IA32_FEATURE_CONTROL before VMXON.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeatureControl {
    /// Locked with VMX outside SMX enabled: nothing to do.
    Enabled,
    /// Unlocked: write this value (VMX outside SMX enabled, locked) and go on.
    EnableAndLock(u64),
    /// Locked with VMX outside SMX disabled: firmware switched VT-x off until the next reset.
    LockedOff,
}

/// Decides from the register's current value (SDM Vol. 3C §23.7: VMXON faults unless the lock
/// bit and the "enable VMX outside SMX" bit are both set).
pub fn feature_control_action(value: u64) -> FeatureControl {
    use feature_control::*;
    if value & LOCK == 0 {
        FeatureControl::EnableAndLock(value | LOCK | VMX_OUTSIDE_SMX)
    } else if value & VMX_OUTSIDE_SMX != 0 {
        FeatureControl::Enabled
    } else {
        FeatureControl::LockedOff
    }
}

/// Allowed settings of one 32-bit control field, from its capability MSR: bits set in the low
/// half must be 1 (allowed 0-settings), bits clear in the high half must be 0 (allowed
/// 1-settings) (SDM Vol. 3D §A.3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Controls {
    pub must_be_one: u32,
    pub may_be_one: u32,
}

impl Controls {
    pub fn from_msr(value: u64) -> Self {
        Controls {
            must_be_one: value as u32,
            may_be_one: (value >> 32) as u32,
        }
    }

    /// Whether `bit` may be set to 1.
    pub fn allows(&self, bit: u32) -> bool {
        self.may_be_one & (1 << bit) != 0
    }

    /// The value to write for the wanted bits, or the bits the CPU cannot provide.
    pub fn compute(&self, wanted: u32) -> Result<u32, u32> {
        let missing = wanted & !self.may_be_one;
        if missing != 0 {
            Err(missing)
        } else {
            Ok(wanted | self.must_be_one)
        }
    }
}

/// Something that can read MSRs (the CPU, or a table in tests).
pub trait MsrSource {
    fn read(&mut self, msr: u32) -> u64;
}

/// The decoded VMX capabilities of one CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VmxCaps {
    pub basic: u64,
    pub pinbased: Controls,
    pub procbased: Controls,
    /// `None` when the primary controls cannot activate secondary controls.
    pub procbased2: Option<Controls>,
    pub exit: Controls,
    pub entry: Controls,
    pub misc: u64,
    /// `None` when neither EPT nor VPID can be enabled (the MSR does not exist then).
    pub ept_vpid: Option<u64>,
}

// Bit numbers, by control field.
mod bits {
    // IA32_VMX_BASIC (SDM Vol. 3D §A.1).
    pub const BASIC_TRUE_CTLS: u32 = 55;
    // Pin-based (SDM Vol. 3C §24.6.1).
    pub const PIN_PREEMPTION_TIMER: u32 = 6;
    pub const PIN_POSTED_INTERRUPTS: u32 = 7;
    // Primary processor-based (§24.6.2, Table 24-6).
    pub const PROC_HLT: u32 = 7;
    pub const PROC_TPR_SHADOW: u32 = 21;
    pub const PROC_IO_BITMAPS: u32 = 25;
    pub const PROC_MSR_BITMAPS: u32 = 28;
    pub const PROC_SECONDARY: u32 = 31;
    // Secondary processor-based (§24.6.2, Table 24-7).
    pub const P2_VIRT_APIC_ACCESS: u32 = 0;
    pub const P2_EPT: u32 = 1;
    pub const P2_VIRT_X2APIC: u32 = 4;
    pub const P2_VPID: u32 = 5;
    pub const P2_UNRESTRICTED: u32 = 7;
    pub const P2_APIC_REG_VIRT: u32 = 8;
    pub const P2_VIRT_INTR_DELIVERY: u32 = 9;
    pub const P2_PAUSE_LOOP: u32 = 10;
    pub const P2_VMCS_SHADOWING: u32 = 14;
    pub const P2_PML: u32 = 17;
    pub const P2_XSAVES: u32 = 20;
    // IA32_VMX_EPT_VPID_CAP (SDM Vol. 3D §A.10).
    pub const EPT_WALK_4: u32 = 6;
    pub const EPT_WALK_5: u32 = 7;
    pub const EPT_WB: u32 = 14;
    pub const EPT_2M: u32 = 16;
    pub const EPT_1G: u32 = 17;
    pub const EPT_INVEPT: u32 = 20;
    pub const EPT_AD: u32 = 21;
    pub const EPT_INVEPT_SINGLE: u32 = 25;
    pub const EPT_INVEPT_ALL: u32 = 26;
    pub const VPID_INVVPID: u32 = 32;
    pub const VPID_INVVPID_ADDR: u32 = 40;
    pub const VPID_INVVPID_SINGLE: u32 = 41;
    pub const VPID_INVVPID_ALL: u32 = 42;
    pub const VPID_INVVPID_SINGLE_GLOBALS: u32 = 43;
}

fn bit(value: u64, n: u32) -> bool {
    value & (1 << n) != 0
}

impl VmxCaps {
    /// Reads every capability MSR that exists on a CPU with VMX (CPUID.1:ECX.VMX = 1), in the
    /// order the SDM says they may be read: the true-control MSRs only when IA32_VMX_BASIC[55]
    /// says they exist; secondary controls only when primary bit 31 may be 1; EPT/VPID
    /// capabilities only when EPT or VPID may be enabled (SDM Vol. 3D §A.3.2, §A.10).
    pub fn read(src: &mut impl MsrSource) -> Self {
        let basic = src.read(msr::VMX_BASIC);
        let true_ctls = bit(basic, bits::BASIC_TRUE_CTLS);
        let pick = |src: &mut dyn MsrSource, normal: u32, true_: u32| {
            Controls::from_msr(src.read(if true_ctls { true_ } else { normal }))
        };
        let pinbased = pick(src, msr::VMX_PINBASED_CTLS, msr::VMX_TRUE_PINBASED_CTLS);
        let procbased = pick(src, msr::VMX_PROCBASED_CTLS, msr::VMX_TRUE_PROCBASED_CTLS);
        let exit = pick(src, msr::VMX_EXIT_CTLS, msr::VMX_TRUE_EXIT_CTLS);
        let entry = pick(src, msr::VMX_ENTRY_CTLS, msr::VMX_TRUE_ENTRY_CTLS);
        let misc = src.read(msr::VMX_MISC);
        let procbased2 = procbased
            .allows(bits::PROC_SECONDARY)
            .then(|| Controls::from_msr(src.read(msr::VMX_PROCBASED_CTLS2)));
        let ept_vpid = procbased2
            .filter(|p2| p2.allows(bits::P2_EPT) || p2.allows(bits::P2_VPID))
            .map(|_| src.read(msr::VMX_EPT_VPID_CAP));
        VmxCaps {
            basic,
            pinbased,
            procbased,
            procbased2,
            exit,
            entry,
            misc,
            ept_vpid,
        }
    }

    pub fn vmcs_revision(&self) -> u32 {
        (self.basic & 0x7fff_ffff) as u32
    }

    /// Bytes the CPU needs for a VMXON or VMCS region (IA32_VMX_BASIC[44:32]).
    pub fn vmcs_size(&self) -> u32 {
        ((self.basic >> 32) & 0x1fff) as u32
    }

    pub fn true_controls(&self) -> bool {
        bit(self.basic, bits::BASIC_TRUE_CTLS)
    }

    fn p2(&self, n: u32) -> bool {
        self.procbased2.is_some_and(|c| c.allows(n))
    }

    fn ev(&self, n: u32) -> bool {
        self.ept_vpid.is_some_and(|v| bit(v, n))
    }

    pub fn ept(&self) -> bool {
        self.p2(bits::P2_EPT)
    }
    pub fn ept_4level(&self) -> bool {
        self.ept() && self.ev(bits::EPT_WALK_4)
    }
    pub fn ept_2m(&self) -> bool {
        self.ept() && self.ev(bits::EPT_2M)
    }
    pub fn ept_1g(&self) -> bool {
        self.ept() && self.ev(bits::EPT_1G)
    }
    pub fn ept_ad(&self) -> bool {
        self.ept() && self.ev(bits::EPT_AD)
    }
    pub fn vpid(&self) -> bool {
        self.p2(bits::P2_VPID)
    }
    pub fn unrestricted_guest(&self) -> bool {
        self.p2(bits::P2_UNRESTRICTED)
    }
    pub fn preemption_timer(&self) -> bool {
        self.pinbased.allows(bits::PIN_PREEMPTION_TIMER)
    }
    /// The preemption timer counts down once every 2^rate TSC ticks (IA32_VMX_MISC[4:0]).
    pub fn preemption_timer_rate(&self) -> u32 {
        (self.misc & 0x1f) as u32
    }
    pub fn pml(&self) -> bool {
        self.p2(bits::P2_PML)
    }
    pub fn posted_interrupts(&self) -> bool {
        self.pinbased.allows(bits::PIN_POSTED_INTERRUPTS)
    }
    pub fn hlt_exiting(&self) -> bool {
        self.procbased.allows(bits::PROC_HLT)
    }
    pub fn msr_bitmaps(&self) -> bool {
        self.procbased.allows(bits::PROC_MSR_BITMAPS)
    }

    /// Everything the VT-x core will require: EPT with 4-level walks and write-back tables,
    /// VPID, unrestricted guest, HLT exiting, MSR and I/O bitmaps. Returns the first missing
    /// feature, so the operator is told what the CPU lacks.
    pub fn missing_required(&self) -> Option<&'static str> {
        let checks: [(bool, &'static str); 8] = [
            (
                self.procbased.allows(bits::PROC_SECONDARY),
                "secondary processor-based controls",
            ),
            (self.ept(), "EPT"),
            (self.ept_4level(), "4-level EPT page walks"),
            (self.ev(bits::EPT_WB), "write-back EPT paging structures"),
            (self.vpid(), "VPID"),
            (self.unrestricted_guest(), "unrestricted guest"),
            (self.hlt_exiting(), "HLT exiting"),
            (
                self.msr_bitmaps() && self.procbased.allows(bits::PROC_IO_BITMAPS),
                "MSR and I/O bitmaps",
            ),
        ];
        checks.iter().find(|(ok, _)| !ok).map(|(_, name)| *name)
    }

    /// The operator's report, several indented lines.
    pub fn report(&self) -> Report<'_> {
        Report(self)
    }
}

fn yn(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// Display adapter for [`VmxCaps::report`].
pub struct Report<'a>(&'a VmxCaps);

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.0;
        writeln!(
            f,
            "  VMCS revision {:#x}, region {} bytes, true controls: {}",
            c.vmcs_revision(),
            c.vmcs_size(),
            yn(c.true_controls())
        )?;
        if c.ept() {
            write!(f, "  EPT: yes (")?;
            let mut first = true;
            for (ok, name) in [
                (c.ept_4level(), "4-level walk"),
                (c.ev(bits::EPT_WALK_5), "5-level walk"),
                (c.ev(bits::EPT_WB), "WB tables"),
                (c.ept_2m(), "2MiB pages"),
                (c.ept_1g(), "1GiB pages"),
                (c.ept_ad(), "accessed/dirty flags"),
                (c.ev(bits::EPT_INVEPT_SINGLE), "INVEPT single"),
                (c.ev(bits::EPT_INVEPT_ALL), "INVEPT all"),
            ] {
                if ok {
                    if !first {
                        f.write_str(", ")?;
                    }
                    f.write_str(name)?;
                    first = false;
                }
            }
            if !c.ev(bits::EPT_INVEPT) {
                f.write_str(if first { "no INVEPT" } else { ", no INVEPT" })?;
            }
            writeln!(f, ")")?;
        } else {
            writeln!(f, "  EPT: no")?;
        }
        if c.vpid() {
            writeln!(
                f,
                "  VPID: yes (INVVPID: {}; address {}, single {}, all {}, single-keep-globals {})",
                yn(c.ev(bits::VPID_INVVPID)),
                yn(c.ev(bits::VPID_INVVPID_ADDR)),
                yn(c.ev(bits::VPID_INVVPID_SINGLE)),
                yn(c.ev(bits::VPID_INVVPID_ALL)),
                yn(c.ev(bits::VPID_INVVPID_SINGLE_GLOBALS)),
            )?;
        } else {
            writeln!(f, "  VPID: no")?;
        }
        writeln!(f, "  unrestricted guest: {}", yn(c.unrestricted_guest()))?;
        if c.preemption_timer() {
            writeln!(
                f,
                "  preemption timer: yes (TSC/{})",
                1u64 << c.preemption_timer_rate()
            )?;
        } else {
            writeln!(f, "  preemption timer: no")?;
        }
        writeln!(f, "  PML (page-modification logging): {}", yn(c.pml()))?;
        writeln!(
            f,
            "  APIC virtualization: TPR shadow {}, APIC-access {}, x2APIC {}, register {}, \
             virtual-interrupt delivery {}, posted interrupts {}",
            yn(c.procbased.allows(bits::PROC_TPR_SHADOW)),
            yn(c.p2(bits::P2_VIRT_APIC_ACCESS)),
            yn(c.p2(bits::P2_VIRT_X2APIC)),
            yn(c.p2(bits::P2_APIC_REG_VIRT)),
            yn(c.p2(bits::P2_VIRT_INTR_DELIVERY)),
            yn(c.posted_interrupts()),
        )?;
        writeln!(
            f,
            "  VMCS shadowing: {}, PAUSE-loop exiting: {}, XSAVES: {}",
            yn(c.p2(bits::P2_VMCS_SHADOWING)),
            yn(c.p2(bits::P2_PAUSE_LOOP)),
            yn(c.p2(bits::P2_XSAVES)),
        )?;
        match c.missing_required() {
            None => write!(f, "  ready for the VT-x core: yes"),
            Some(what) => write!(f, "  ready for the VT-x core: no ({what} missing)"),
        }
    }
}

/// The outcome of probing one CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmxStatus {
    /// Not probed yet.
    Unknown,
    /// CPUID.1:ECX.VMX[bit 5] is 0.
    NoCpuSupport,
    /// IA32_FEATURE_CONTROL is locked with VMX disabled.
    DisabledByFirmware,
    /// VMX usable; `enabled_by_us` when this hypervisor set and locked FEATURE_CONTROL.
    Available { caps: VmxCaps, enabled_by_us: bool },
}

impl VmxStatus {
    /// One line saying whether VT-x can be used here, and if not, which and why.
    pub fn summary(&self) -> &'static str {
        match self {
            VmxStatus::Unknown => "not probed",
            VmxStatus::NoCpuSupport => {
                "not available: CPUID.1:ECX.VMX[bit 5] is 0 (this CPU or emulator does not \
                 offer VMX; QEMU without KVM never does)"
            }
            VmxStatus::DisabledByFirmware => {
                "disabled: IA32_FEATURE_CONTROL is locked with VMX off (enable VT-x in the \
                 firmware setup and power-cycle)"
            }
            VmxStatus::Available { .. } => "available",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Capability MSRs as a Tiger Lake-class CPU (and Bochs' `tigerlake` model) report them.
    pub(crate) fn tigerlake() -> HashMap<u32, u64> {
        HashMap::from([
            (msr::VMX_BASIC, 0x00da_0400_0000_0004),
            (msr::VMX_PINBASED_CTLS, 0x0000_007f_0000_0016),
            (msr::VMX_PROCBASED_CTLS, 0xfff9_fffe_0401_e172),
            (msr::VMX_EXIT_CTLS, 0x01ff_ffff_0003_6dff),
            (msr::VMX_ENTRY_CTLS, 0x0003_ffff_0000_11ff),
            (msr::VMX_MISC, 0x0000_0000_7004_c1e7),
            (msr::VMX_PROCBASED_CTLS2, 0x0053_7fff_0000_0000),
            (msr::VMX_EPT_VPID_CAP, 0x00000f01_06734141),
            (msr::VMX_TRUE_PINBASED_CTLS, 0x0000_007f_0000_0016),
            (msr::VMX_TRUE_PROCBASED_CTLS, 0xfff9_fffe_0400_6172),
            (msr::VMX_TRUE_EXIT_CTLS, 0x01ff_ffff_0003_6dfb),
            (msr::VMX_TRUE_ENTRY_CTLS, 0x0003_ffff_0000_11fb),
        ])
    }

    struct Table(HashMap<u32, u64>, Vec<u32>);
    impl MsrSource for Table {
        fn read(&mut self, msr: u32) -> u64 {
            self.1.push(msr);
            *self
                .0
                .get(&msr)
                .unwrap_or_else(|| panic!("read of absent MSR {msr:#x} would #GP"))
        }
    }

    #[test]
    fn decodes_a_full_featured_cpu() {
        let mut t = Table(tigerlake(), Vec::new());
        let c = VmxCaps::read(&mut t);
        assert!(
            t.1.contains(&msr::VMX_TRUE_PROCBASED_CTLS),
            "true controls used"
        );
        assert!(!t.1.contains(&msr::VMX_PROCBASED_CTLS));
        assert_eq!(c.vmcs_revision(), 4);
        assert_eq!(c.vmcs_size(), 0x400);
        assert!(c.ept() && c.ept_4level() && c.ept_2m() && c.ept_1g() && c.ept_ad());
        assert!(c.vpid() && c.unrestricted_guest() && c.preemption_timer() && c.pml());
        assert!(!c.posted_interrupts());
        assert_eq!(c.preemption_timer_rate(), 7);
        assert_eq!(c.missing_required(), None);
        let text = format!("{}", c.report());
        assert!(
            text.contains(
                "EPT: yes (4-level walk, WB tables, 2MiB pages, 1GiB pages, accessed/dirty flags"
            ),
            "{text}"
        );
        assert!(text.contains("preemption timer: yes (TSC/128)"), "{text}");
        assert!(text.contains("posted interrupts no"), "{text}");
        assert!(text.contains("ready for the VT-x core: yes"), "{text}");
    }

    #[test]
    fn no_secondary_controls_means_no_ept_and_no_reads_of_absent_msrs() {
        let mut m = tigerlake();
        // Old CPU: no true controls, primary bit 31 cannot be set.
        m.insert(msr::VMX_BASIC, 0x0000_0400_0000_000d);
        m.insert(msr::VMX_PROCBASED_CTLS, 0x7ff9_fffe_0401_e172);
        m.remove(&msr::VMX_PROCBASED_CTLS2);
        m.remove(&msr::VMX_EPT_VPID_CAP);
        let mut t = Table(m, Vec::new());
        let c = VmxCaps::read(&mut t);
        assert!(!t.1.contains(&msr::VMX_TRUE_PINBASED_CTLS));
        assert!(c.procbased2.is_none() && c.ept_vpid.is_none());
        assert!(!c.ept() && !c.vpid() && !c.unrestricted_guest());
        assert_eq!(
            c.missing_required(),
            Some("secondary processor-based controls")
        );
        let text = format!("{}", c.report());
        assert!(
            text.contains("EPT: no") && text.contains("ready for the VT-x core: no"),
            "{text}"
        );
    }

    #[test]
    fn ept_without_1g_or_ad() {
        let mut m = tigerlake();
        m.insert(
            msr::VMX_EPT_VPID_CAP,
            0x00000f01_06114141 & !(1 << 17) & !(1 << 21),
        );
        let c = VmxCaps::read(&mut Table(m, Vec::new()));
        assert!(c.ept_2m() && !c.ept_1g() && !c.ept_ad());
        let text = format!("{}", c.report());
        assert!(
            !text.contains("1GiB") && !text.contains("accessed/dirty"),
            "{text}"
        );
    }

    #[test]
    fn control_computation() {
        let c = Controls::from_msr(0x0000_00ff_0000_0016);
        assert_eq!(c.compute(1 << 0), Ok(0x17));
        assert_eq!(c.compute(1 << 9), Err(1 << 9));
        assert!(c.allows(7) && !c.allows(8));
    }

    #[test]
    fn feature_control_decisions() {
        assert_eq!(feature_control_action(0x5), FeatureControl::Enabled);
        assert_eq!(
            feature_control_action(0x0),
            FeatureControl::EnableAndLock(0x5)
        );
        assert_eq!(
            feature_control_action(0x2),
            FeatureControl::EnableAndLock(0x7)
        );
        assert_eq!(feature_control_action(0x1), FeatureControl::LockedOff);
        assert_eq!(feature_control_action(0x3), FeatureControl::LockedOff);
    }

    #[test]
    fn status_lines_say_why() {
        assert!(
            VmxStatus::NoCpuSupport
                .summary()
                .contains("CPUID.1:ECX.VMX")
        );
        assert!(VmxStatus::DisabledByFirmware.summary().contains("locked"));
    }
}
