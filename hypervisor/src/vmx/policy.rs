//! What a guest sees of the CPU: the CPUID policy and the MSR allow-list.
//!
//! Both are pure: the exit handler passes the native CPUID result or the MSR number and gets
//! back what to return, or that the guest gets #GP. Features a domain must not use are hidden:
//! VMX itself, MONITOR/MWAIT, x2APIC and the TSC deadline timer (no virtual APIC yet),
//! performance monitoring, and FSRM where ERMS is off (see docs/PLATFORM.md).

use core::arch::x86_64::CpuidResult;

use super::vmcs::{Field, fields as f};

/// First hypervisor CPUID leaf (SDM Vol. 2A: leaves 0x4000_0000.. are reserved for hypervisors).
pub const HV_LEAF_BASE: u32 = 0x4000_0000;

/// Per-domain CPUID settings: the domain's vCPU count and which vCPU asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuidPolicy {
    pub vcpus: u32,
    pub index: u32,
    /// XCR0 bits the guest may enable (0 when XSAVE is not offered).
    pub xcr0_allowed: u64,
    /// The guest's own CR4.OSXSAVE (CPUID.1:ECX.OSXSAVE reflects it).
    pub guest_osxsave: bool,
    /// TSC frequency in kHz (leaf 0x4000_0001 EDX), so a guest can time itself by RDTSC.
    pub tsc_khz: u32,
    /// A full PC guest (Linux) with a virtual local APIC: the TSC-deadline timer is offered,
    /// leaf 0x15 gives the TSC and APIC-timer rate, the topology leaves describe the domain's
    /// vCPUs, and machine-check and MTRR support are hidden (none is emulated).
    pub pc: bool,
    /// The CPU's highest basic leaf (leaf 0 EAX natively).
    pub native_max: u32,
}

/// The highest basic leaf a PC guest sees (0x15: TSC and crystal clock; 0x16: the
/// processor's base frequency, which Linux takes for its CPU clock before trying the PIT).
pub const PC_MAX_LEAF: u32 = 0x16;

/// How many TSC ticks one tick of a PC guest's APIC timer (its "crystal clock", CPUID 0x15)
/// lasts: 1 where the TSC rate in Hz fits leaf 0x15's 32-bit ECX, else the smallest power of
/// two that makes it fit.
pub fn tsc_per_crystal(tsc_khz: u64) -> u64 {
    let hz = tsc_khz.saturating_mul(1000);
    let mut n = 1u64;
    while hz / n > u64::from(u32::MAX) {
        n *= 2;
    }
    n
}

/// The leaves a PC guest sees differently from the CPU (`None`: as [`cpuid`] says).
fn pc_leaf(leaf: u32, subleaf: u32, native: CpuidResult, p: CpuidPolicy) -> Option<CpuidResult> {
    let zero = CpuidResult {
        eax: 0,
        ebx: 0,
        ecx: 0,
        edx: 0,
    };
    Some(match leaf {
        0 => CpuidResult {
            eax: native.eax.max(PC_MAX_LEAF),
            ..native
        },
        // Leaves between the CPU's last and ours are empty, not the CPU's "highest leaf"
        // answer.
        l if l <= PC_MAX_LEAF && l > p.native_max && l < 0x15 => zero,
        // Cache parameters: the package has the domain's vCPUs, one thread per core.
        4 => CpuidResult {
            eax: (native.eax & 0x3fff) | (p.vcpus.saturating_sub(1).min(63) << 26),
            ..native
        },
        // x2APIC topology: SMT level of one thread, core level of every vCPU.
        0xb => {
            let shift = 32 - p.vcpus.max(1).saturating_sub(1).leading_zeros();
            match subleaf {
                0 => CpuidResult {
                    eax: 0,
                    ebx: 1,
                    ecx: 1 << 8,
                    edx: p.index,
                },
                1 => CpuidResult {
                    eax: shift,
                    ebx: p.vcpus,
                    ecx: (2 << 8) | 1,
                    edx: p.index,
                },
                n => CpuidResult {
                    eax: 0,
                    ebx: 0,
                    ecx: n & 0xff,
                    edx: p.index,
                },
            }
        }
        // V2 topology: not offered (the guest uses leaf 0xb).
        0x1f => zero,
        // TSC = crystal * EBX / EAX; the APIC timer counts at the crystal's rate.
        0x15 => {
            let n = tsc_per_crystal(u64::from(p.tsc_khz));
            CpuidResult {
                eax: 1,
                ebx: n as u32,
                ecx: (u64::from(p.tsc_khz) * 1000 / n) as u32,
                edx: 0,
            }
        }
        // Base and maximum frequency in MHz: the TSC's (at least 1).
        0x16 => {
            let mhz = (p.tsc_khz / 1000).max(1);
            CpuidResult {
                eax: mhz,
                ebx: mhz,
                ecx: 0,
                edx: 0,
            }
        }
        _ => return None,
    })
}

/// Whether a guest may load `value` into XCR0: x87 always on, AVX only with SSE, nothing outside
/// `allowed` (SDM Vol. 1 §13.3; XSETBV otherwise faults with #GP).
pub fn xcr0_allowed(value: u64, allowed: u64) -> bool {
    value & 1 != 0 && (value & 0b100 == 0 || value & 0b010 != 0) && value & !allowed == 0
}

/// The guest's view of CPUID `leaf`/`subleaf`, given the native answer.
pub fn cpuid(leaf: u32, subleaf: u32, native: CpuidResult, p: CpuidPolicy) -> CpuidResult {
    let mut r = native;
    if p.pc
        && let Some(x) = pc_leaf(leaf, subleaf, native, p)
    {
        return x;
    }
    match leaf {
        1 => {
            // ECX: clear VMX(5), SMX(6), EST(7), TM2(8), PDCM(15), x2APIC(21), TSC-deadline(24),
            // MONITOR(3); set "hypervisor present"(31).
            r.ecx &= !((1 << 3)
                | (1 << 5)
                | (1 << 6)
                | (1 << 7)
                | (1 << 8)
                | (1 << 15)
                | (1 << 21)
                | (1 << 24));
            r.ecx |= 1 << 31;
            // EDX: clear ACPI thermal(22), TM(29), PBE(31).
            r.edx &= !((1 << 22) | (1 << 29) | (1 << 31));
            if p.pc {
                // The virtual local APIC has the TSC-deadline timer; there are no MTRRs and
                // no machine-check banks to emulate: MCE(7), MTRR(12), MCA(14) hidden.
                r.ecx |= 1 << 24;
                r.edx &= !((1 << 7) | (1 << 12) | (1 << 14));
                r.edx |= 1 << 9; // APIC
            }
            // XSAVE (26), OSXSAVE (27) and AVX (28) as this domain may use them.
            if p.xcr0_allowed == 0 {
                r.ecx &= !((1 << 26) | (1 << 28));
            } else if p.xcr0_allowed & 0b100 == 0 {
                r.ecx &= !(1 << 28);
            }
            r.ecx &= !(1 << 27);
            if p.guest_osxsave && p.xcr0_allowed != 0 {
                r.ecx |= 1 << 27;
            }
            // EBX[31:24] initial APIC id = vCPU index; EBX[23:16] logical processors.
            r.ebx =
                (r.ebx & 0x0000_ffff) | (p.index & 0xff) << 24 | (p.vcpus.min(255) & 0xff) << 16;
        }
        // XSAVE features: only the components guests may enable.
        0xd if p.xcr0_allowed == 0 => {
            r = CpuidResult {
                eax: 0,
                ebx: 0,
                ecx: 0,
                edx: 0,
            }
        }
        0xd if subleaf == 0 => {
            r.eax &= p.xcr0_allowed as u32;
            r.edx = 0;
        }
        // XSAVES/XRSTORS (EAX bit 3) would #UD: the VMCS does not enable them, and there is
        // no IA32_XSS for supervisor state; so neither is offered (Linux 6.1 otherwise uses
        // XRSTORS for its FPU state and faults when it starts init).
        0xd if subleaf == 1 => {
            r.eax &= !(1 << 3);
            r.ecx = 0;
            r.edx = 0;
        }
        0xd if (2..64).contains(&subleaf) && p.xcr0_allowed & (1 << subleaf) == 0 => {
            r = CpuidResult {
                eax: 0,
                ebx: 0,
                ecx: 0,
                edx: 0,
            }
        }
        5 | 6 | 0xa => {
            r = CpuidResult {
                eax: 0,
                ebx: 0,
                ecx: 0,
                edx: 0,
            }
        }
        7 => {
            // EDX[4] FSRM only where EBX[9] ERMS is usable: a guest told ERMS is off but FSRM on
            // corrupts memory in Linux 6.1's memmove.
            if r.ebx & (1 << 9) == 0 {
                r.edx &= !(1 << 4);
            }
            // ECX: WAITPKG(5) would let a guest park the CPU in a way we cannot see; PKU(3)
            // and the AVX-512 family need XSAVE components guests are not given.
            // LA57(16): five-level paging would make Linux's decompressor leave long mode
            // to switch, which the VMCS's IA-32e entry control does not follow.
            r.ecx &= !((1 << 5)
                | (1 << 3)
                | (1 << 1)
                | (1 << 6)
                | (1 << 11)
                | (1 << 12)
                | (1 << 14)
                | (1 << 16));
            // EBX: AVX-512 F, DQ, IFMA, PF, ER, CD, BW, VL; AVX2 only with AVX.
            r.ebx &= !((1 << 16)
                | (1 << 17)
                | (1 << 21)
                | (1 << 26)
                | (1 << 27)
                | (1 << 28)
                | (1 << 30)
                | (1 << 31));
            if p.xcr0_allowed & 0b100 == 0 {
                r.ebx &= !(1 << 5);
            }
            // EBX[1] TSC_ADJUST: its MSR (0x3b) is not offered (the TSC is the host's), and
            // Debian's kernel warned "unchecked MSR access error: RDMSR from 0x3b" at boot.
            r.ebx &= !(1 << 1);
            // EDX: AVX-512 4VNNIW/4FMAPS, VP2INTERSECT, AMX-BF16/TILE/INT8.
            r.edx &= !((1 << 2) | (1 << 3) | (1 << 8) | (1 << 22) | (1 << 24) | (1 << 25));
        }
        HV_LEAF_BASE => {
            let sig = hv_abi::CPUID_SIGNATURE;
            let word = |i: usize| u32::from_le_bytes([sig[i], sig[i + 1], sig[i + 2], sig[i + 3]]);
            r = CpuidResult {
                eax: HV_LEAF_BASE + 1,
                ebx: word(0),
                ecx: word(4),
                edx: word(8),
            };
        }
        // ABI version, vCPU count, this vCPU's index, TSC kHz.
        0x4000_0001 => {
            r = CpuidResult {
                eax: hv_abi::ABI_VERSION,
                ebx: p.vcpus,
                ecx: p.index,
                edx: p.tsc_khz,
            }
        }
        l if (0x4000_0002..0x5000_0000).contains(&l) => {
            r = CpuidResult {
                eax: 0,
                ebx: 0,
                ecx: 0,
                edx: 0,
            }
        }
        _ => {}
    }
    r
}

/// Model-specific registers a guest may touch, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsrRule {
    /// Reads return this value; writes are ignored.
    Fixed(u64),
    /// Kept per vCPU: reads return what the guest last wrote.
    Stored,
    /// Backed by this VMCS guest-state field (EFER, PAT, FS/GS base, SYSENTER).
    VmcsField(Field),
    /// The time-stamp counter.
    Tsc,
}

/// The allow-list. Anything not listed raises #GP in the guest.
pub fn msr_rule(msr: u32) -> Option<MsrRule> {
    Some(match msr {
        0x10 => MsrRule::Tsc,
        // IA32_APIC_BASE: xAPIC at the architectural address, enabled, BSP.
        0x1b => MsrRule::Fixed(0xfee0_0900),
        // IA32_MISC_ENABLE: fast strings on (Linux probes it; Bochs lacks it natively).
        0x1a0 => MsrRule::Fixed(1),
        // IA32_FEATURE_CONTROL: locked, VMX off: the guest cannot use VT-x.
        0x3a => MsrRule::Fixed(1),
        // IA32_BIOS_SIGN_ID, IA32_PLATFORM_ID, MTRRcap: harmless probes.
        0x8b | 0x17 => MsrRule::Fixed(0),
        0xfe => MsrRule::Fixed(0),
        // SYSENTER_CS/ESP/EIP, PAT, EFER, FS/GS base: the VMCS holds them.
        0x174 => MsrRule::VmcsField(f::GUEST_SYSENTER_CS),
        0x175 => MsrRule::VmcsField(f::GUEST_SYSENTER_ESP),
        0x176 => MsrRule::VmcsField(f::GUEST_SYSENTER_EIP),
        0x277 => MsrRule::VmcsField(f::GUEST_PAT),
        0xc000_0080 => MsrRule::VmcsField(f::GUEST_EFER),
        0xc000_0100 => MsrRule::VmcsField(f::GUEST_FS_BASE),
        0xc000_0101 => MsrRule::VmcsField(f::GUEST_GS_BASE),
        // STAR, LSTAR, CSTAR, SFMASK, KERNEL_GS_BASE, TSC_AUX.
        0xc000_0081..=0xc000_0084 | 0xc000_0102 | 0xc000_0103 => MsrRule::Stored,
        _ => return None,
    })
}

/// Whether a WRMSR of `value` to an allowed `msr` is one the CPU would accept; else the guest
/// gets #GP, as on hardware, instead of a VM entry that fails on the bad value. Addresses must
/// be canonical (FS/GS/KERNEL_GS base, SYSENTER ESP/EIP, LSTAR, CSTAR); PAT entries must name
/// a memory type (0, 1, 4, 5, 6, 7); EFER may only change SCE and NXE; TSC_AUX is 32 bits
/// (SDM Vol. 4; Vol. 3A §11.12.2; Vol. 3C §26.3.1.1).
pub fn msr_write_valid(msr: u32, value: u64) -> bool {
    let canonical = |v: u64| {
        let top = v >> 47;
        top == 0 || top == 0x1_ffff
    };
    match msr {
        0xc000_0100 | 0xc000_0101 | 0xc000_0102 | 0x175 | 0x176 | 0xc000_0082 | 0xc000_0083 => {
            canonical(value)
        }
        0x277 => value
            .to_le_bytes()
            .iter()
            .all(|t| matches!(t, 0 | 1 | 4 | 5 | 6 | 7)),
        0xc000_0080 => value & !((1 << 0) | (1 << 8) | (1 << 10) | (1 << 11)) == 0,
        0xc000_0103 => value >> 32 == 0,
        _ => true,
    }
}

/// The [`MsrRule::Stored`] registers the CPU uses in the guest without an exit (STAR, LSTAR,
/// CSTAR, SFMASK, KERNEL_GS_BASE, TSC_AUX): loaded into the CPU before each slice and when the
/// guest writes them. One of them also changes without an exit: [`KERNEL_GS_BASE`].
pub const GUEST_LOADED_MSRS: &[u32] = &[
    0xc000_0081,
    0xc000_0082,
    0xc000_0083,
    0xc000_0084,
    0xc000_0102,
    0xc000_0103,
];

/// IA32_KERNEL_GS_BASE, which the guest's SWAPGS exchanges with GS.base without an exit: the
/// CPU's value is the guest's while its slice runs (read back at the slice's end, and for the
/// guest's RDMSR), the stored one only between slices.
pub const KERNEL_GS_BASE: u32 = 0xc000_0102;

/// Per-vCPU storage for [`MsrRule::Stored`] registers.
#[derive(Clone, Debug, Default)]
pub struct StoredMsrs {
    values: [(u32, u64); 6],
    used: usize,
}

impl StoredMsrs {
    pub fn get(&self, msr: u32) -> u64 {
        self.values[..self.used]
            .iter()
            .find(|(m, _)| *m == msr)
            .map_or(0, |(_, v)| *v)
    }

    pub fn set(&mut self, msr: u32, value: u64) {
        if let Some(slot) = self.values[..self.used].iter_mut().find(|(m, _)| *m == msr) {
            slot.1 = value;
        } else if self.used < self.values.len() {
            self.values[self.used] = (msr, value);
            self.used += 1;
        }
    }
}

/// The speculation-control MSRs this CPU has (CPUID.(EAX=7,ECX=0):EDX, which guests see as
/// it is): where CPUID says one exists, a guest's access must work as on the bare CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpecMsrs {
    /// IA32_SPEC_CTRL.IBRS and IA32_PRED_CMD.IBPB (EDX bit 26).
    pub ibrs: bool,
    /// IA32_SPEC_CTRL.STIBP (bit 27).
    pub stibp: bool,
    /// IA32_SPEC_CTRL.SSBD (bit 31).
    pub ssbd: bool,
    /// IA32_FLUSH_CMD.L1D_FLUSH (bit 28).
    pub l1d_flush: bool,
    /// IA32_ARCH_CAPABILITIES (bit 29): the CPU's value, which guests read.
    pub arch_cap: Option<u64>,
}

impl SpecMsrs {
    /// From CPUID.7.EDX and, when bit 29 says it exists, IA32_ARCH_CAPABILITIES.
    #[must_use]
    pub fn from_cpuid(edx: u32, arch_cap: u64) -> SpecMsrs {
        SpecMsrs {
            ibrs: edx & (1 << 26) != 0,
            stibp: edx & (1 << 27) != 0,
            ssbd: edx & (1 << 31) != 0,
            l1d_flush: edx & (1 << 28) != 0,
            arch_cap: (edx & (1 << 29) != 0).then_some(arch_cap),
        }
    }

    /// The IA32_SPEC_CTRL bits a guest may set.
    #[must_use]
    pub fn spec_ctrl_bits(&self) -> u64 {
        u64::from(self.ibrs) | u64::from(self.stibp) << 1 | u64::from(self.ssbd) << 2
    }
}

/// The VM-entry and VM-exit MSR-load areas that switch IA32_SPEC_CTRL (SDM Vol. 3C §25.7.2,
/// §25.8.2: entries of MSR index, reserved, value; 16-byte aligned): the guest's value is
/// loaded by each VM entry and 0 by each VM exit, while the guest's value is not 0 (the VMCS
/// counts are 1 then, else 0). The CPU does it, so an exit path that does not need it pays
/// nothing. It lives in the vCPU, whose VMCS points at it.
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecCtrlAreas {
    pub entry: [u64; 2],
    pub exit: [u64; 2],
}

impl Default for SpecCtrlAreas {
    fn default() -> Self {
        SpecCtrlAreas {
            entry: [0x48, 0],
            exit: [0x48, 0],
        }
    }
}

/// What a guest's access to a speculation-control MSR does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpecMsr {
    /// Not one of them: the general rules apply.
    NotSpec,
    /// #GP: the CPU has no such MSR (or bit), or it is write-only / read-only.
    Refuse,
    /// The read returns this.
    Read(u64),
    /// IA32_SPEC_CTRL becomes this while the guest runs (0 in the hypervisor).
    SetSpecCtrl(u64),
    /// Issue an indirect-branch prediction barrier now.
    Ibpb,
    /// Flush the L1 data cache now.
    L1dFlush,
    /// Accepted, nothing to do (a command MSR written with 0).
    Nothing,
}

/// The rule for a guest's RDMSR (`write` false) or WRMSR of `value` to `msr`, given what the
/// CPU has and the guest's current IA32_SPEC_CTRL.
#[must_use]
pub fn spec_msr(msr: u32, write: bool, value: u64, cpu: SpecMsrs, spec_ctrl: u64) -> SpecMsr {
    match (msr, write) {
        (0x48, _) if cpu.spec_ctrl_bits() == 0 => SpecMsr::Refuse,
        (0x48, false) => SpecMsr::Read(spec_ctrl),
        (0x48, true) if value & !cpu.spec_ctrl_bits() != 0 => SpecMsr::Refuse,
        (0x48, true) => SpecMsr::SetSpecCtrl(value),
        (0x49, true) if cpu.ibrs && value == 1 => SpecMsr::Ibpb,
        (0x49, true) if cpu.ibrs && value == 0 => SpecMsr::Nothing,
        (0x10b, true) if cpu.l1d_flush && value == 1 => SpecMsr::L1dFlush,
        (0x10b, true) if cpu.l1d_flush && value == 0 => SpecMsr::Nothing,
        (0x49 | 0x10b, _) => SpecMsr::Refuse,
        (0x10a, false) => cpu.arch_cap.map_or(SpecMsr::Refuse, SpecMsr::Read),
        (0x10a, true) => SpecMsr::Refuse,
        _ => SpecMsr::NotSpec,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn speculation_msrs_work_where_cpuid_says_they_exist() {
        let none = SpecMsrs::default();
        for (msr, write) in [
            (0x48, false),
            (0x48, true),
            (0x49, true),
            (0x10b, true),
            (0x10a, false),
        ] {
            assert_eq!(
                spec_msr(msr, write, 1, none, 0),
                SpecMsr::Refuse,
                "{msr:#x}"
            );
        }
        let tgl = SpecMsrs::from_cpuid(
            (1 << 26) | (1 << 27) | (1 << 28) | (1 << 29) | (1 << 31),
            0x2b,
        );
        assert_eq!(tgl.spec_ctrl_bits(), 0b111);
        assert_eq!(spec_msr(0x48, false, 0, tgl, 5), SpecMsr::Read(5));
        assert_eq!(
            spec_msr(0x48, true, 0b101, tgl, 0),
            SpecMsr::SetSpecCtrl(0b101)
        );
        assert_eq!(
            spec_msr(0x48, true, 1 << 3, tgl, 0),
            SpecMsr::Refuse,
            "reserved bit"
        );
        assert_eq!(spec_msr(0x49, true, 1, tgl, 0), SpecMsr::Ibpb);
        assert_eq!(spec_msr(0x49, true, 0, tgl, 0), SpecMsr::Nothing);
        assert_eq!(spec_msr(0x49, true, 2, tgl, 0), SpecMsr::Refuse);
        assert_eq!(
            spec_msr(0x49, false, 0, tgl, 0),
            SpecMsr::Refuse,
            "write-only"
        );
        assert_eq!(spec_msr(0x10b, true, 1, tgl, 0), SpecMsr::L1dFlush);
        assert_eq!(
            spec_msr(0x10b, false, 0, tgl, 0),
            SpecMsr::Refuse,
            "write-only"
        );
        assert_eq!(spec_msr(0x10a, false, 0, tgl, 0), SpecMsr::Read(0x2b));
        assert_eq!(
            spec_msr(0x10a, true, 0, tgl, 0),
            SpecMsr::Refuse,
            "read-only"
        );
        assert_eq!(spec_msr(0x10, false, 0, tgl, 0), SpecMsr::NotSpec);
        // IBRS without STIBP or SSBD: only bit 0 may be set.
        let ibrs = SpecMsrs::from_cpuid(1 << 26, 0);
        assert_eq!(spec_msr(0x48, true, 0b10, ibrs, 0), SpecMsr::Refuse);
        assert_eq!(spec_msr(0x48, true, 1, ibrs, 0), SpecMsr::SetSpecCtrl(1));
        assert_eq!(
            spec_msr(0x10a, false, 0, ibrs, 0),
            SpecMsr::Refuse,
            "no ARCH_CAPABILITIES"
        );
        assert_eq!(
            spec_msr(0x10b, true, 1, ibrs, 0),
            SpecMsr::Refuse,
            "no L1D_FLUSH"
        );
    }

    const P: CpuidPolicy = CpuidPolicy {
        vcpus: 4,
        index: 2,
        xcr0_allowed: 0b111,
        guest_osxsave: false,
        tsc_khz: 2_400_000,
        pc: false,
        native_max: 0x1b,
    };

    #[test]
    fn a_pc_guest_sees_its_apic_timer_topology_and_tsc_rate() {
        let n = native();
        let pc = CpuidPolicy {
            pc: true,
            native_max: 0xd,
            ..P
        };
        let one = cpuid(1, 0, n, pc);
        assert_ne!(one.ecx & (1 << 24), 0, "TSC deadline offered");
        assert_eq!(
            one.edx & ((1 << 7) | (1 << 12) | (1 << 14)),
            0,
            "no MCE/MTRR/MCA"
        );
        assert_eq!(
            cpuid(1, 0, n, P).ecx & (1 << 24),
            0,
            "not to our own guests"
        );
        assert_eq!(cpuid(0, 0, CpuidResult { eax: 0xd, ..n }, pc).eax, 0x16);
        assert_eq!(cpuid(0x16, 0, n, pc).eax, 2400, "MHz");
        assert_eq!(cpuid(0, 0, CpuidResult { eax: 0x1b, ..n }, pc).eax, 0x1b);
        let t = cpuid(0x15, 0, n, pc);
        assert_eq!((t.eax, t.ebx, t.ecx), (1, 1, 2_400_000_000));
        // 5 GHz does not fit 32 bits of Hz: the crystal is half the TSC.
        let fast = CpuidPolicy {
            tsc_khz: 5_000_000,
            ..pc
        };
        let t = cpuid(0x15, 0, n, fast);
        assert_eq!((t.eax, t.ebx, t.ecx), (1, 2, 2_500_000_000));
        assert_eq!(tsc_per_crystal(4_200), 1);
        assert_eq!(tsc_per_crystal(2_400_000), 1);
        assert_eq!(tsc_per_crystal(5_000_000), 2);
        assert_eq!(tsc_per_crystal(9_000_000), 4);
        // Between the CPU's last leaf and 0x15: empty.
        assert_eq!(cpuid(0x10, 0, n, pc).ebx, 0);
        // Topology: vCPU 2 of 4.
        let smt = cpuid(0xb, 0, n, pc);
        let core = cpuid(0xb, 1, n, pc);
        assert_eq!((smt.ebx, smt.edx, smt.ecx >> 8), (1, 2, 1));
        assert_eq!((core.eax, core.ebx, core.ecx >> 8), (2, 4, 2));
        assert_eq!(cpuid(0xb, 2, n, pc).ecx >> 8, 0, "no third level");
        assert_eq!(cpuid(4, 0, n, pc).eax >> 26, 3);
        assert_eq!(cpuid(0xd, 1, n, pc).eax & (1 << 3), 0, "no XSAVES");
    }

    #[test]
    fn xcr0_rules() {
        assert!(xcr0_allowed(1, 0b111));
        assert!(xcr0_allowed(0b011, 0b111));
        assert!(xcr0_allowed(0b111, 0b111));
        assert!(!xcr0_allowed(0, 0b111), "x87 must stay on");
        assert!(!xcr0_allowed(0b101, 0b111), "AVX without SSE");
        assert!(!xcr0_allowed(0b111, 0b011), "AVX not offered");
        assert!(
            !xcr0_allowed(0b1000_0011, 0b111),
            "AVX-512 opmask never offered"
        );
        assert!(!xcr0_allowed(1 << 63 | 1, 0b111));
    }

    #[test]
    fn xsave_visibility_follows_the_policy_and_guest_cr4() {
        let n = CpuidResult {
            ecx: (1 << 26) | (1 << 27) | (1 << 28),
            ..native()
        };
        let r = cpuid(1, 0, n, P);
        assert_eq!(
            r.ecx & (7 << 26),
            (1 << 26) | (1 << 28),
            "OSXSAVE clear until the guest sets CR4"
        );
        let r = cpuid(
            1,
            0,
            n,
            CpuidPolicy {
                guest_osxsave: true,
                ..P
            },
        );
        assert_eq!(r.ecx & (7 << 26), 7 << 26);
        let r = cpuid(
            1,
            0,
            n,
            CpuidPolicy {
                xcr0_allowed: 0,
                ..P
            },
        );
        assert_eq!(r.ecx & (7 << 26), 0, "no XSAVE offered");
        let d = cpuid(
            0xd,
            0,
            CpuidResult {
                eax: 0x2ff,
                edx: 0x7,
                ..native()
            },
            P,
        );
        assert_eq!((d.eax, d.edx), (0b111, 0));
        assert_eq!(
            cpuid(0xd, 5, native(), P).eax,
            0,
            "AVX-512 state component hidden"
        );
        let l7 = cpuid(
            7,
            0,
            CpuidResult {
                ebx: u32::MAX,
                ecx: u32::MAX,
                edx: u32::MAX,
                ..native()
            },
            P,
        );
        assert_eq!(l7.ebx & (1 << 16), 0, "AVX-512F hidden");
        assert_ne!(l7.ebx & (1 << 5), 0, "AVX2 kept with AVX");
    }

    fn native() -> CpuidResult {
        CpuidResult {
            eax: 0x906ea,
            ebx: 0x0102_0800,
            ecx: 0xffff_ffff,
            edx: 0xffff_ffff,
        }
    }

    #[test]
    fn leaf1_hides_vmx_and_says_hypervisor() {
        let r = cpuid(
            1,
            0,
            CpuidResult {
                ecx: 0x7ffa_3223 | (1 << 5),
                ..native()
            },
            P,
        );
        assert_eq!(r.ecx & (1 << 5), 0, "VMX hidden");
        assert_ne!(r.ecx & (1 << 31), 0, "hypervisor bit set");
        assert_eq!(r.ecx & (1 << 21), 0, "x2APIC hidden");
        assert_eq!(r.ebx >> 24, 2, "APIC id = vCPU index");
        assert_eq!((r.ebx >> 16) & 0xff, 4, "logical processors = vCPUs");
        assert_eq!(r.eax, 0x906ea, "family/model untouched");
    }

    #[test]
    fn hypervisor_leaves() {
        let r = cpuid(0x4000_0000, 0, native(), P);
        let mut sig = [0u8; 12];
        sig[..4].copy_from_slice(&r.ebx.to_le_bytes());
        sig[4..8].copy_from_slice(&r.ecx.to_le_bytes());
        sig[8..].copy_from_slice(&r.edx.to_le_bytes());
        assert_eq!(&sig, b"RustHvRustHv");
        assert_eq!(r.eax, 0x4000_0001);
        let l = cpuid(0x4000_0001, 0, native(), P);
        assert_eq!(
            (l.eax, l.ebx, l.ecx, l.edx),
            (hv_abi::ABI_VERSION, 4, 2, 2_400_000)
        );
        assert_eq!(cpuid(0x4000_0005, 0, native(), P).eax, 0);
    }

    #[test]
    fn tsc_adjust_hidden_as_its_msr_is_refused() {
        let host = CpuidResult {
            ebx: 0xffff_ffff,
            ..native()
        };
        assert_eq!(cpuid(7, 0, host, P).ebx & (1 << 1), 0);
        assert!(msr_rule(0x3b).is_none(), "RDMSR 0x3b gets #GP");
    }

    #[test]
    fn fsrm_hidden_without_erms() {
        let r = cpuid(
            7,
            0,
            CpuidResult {
                ebx: 0,
                edx: 1 << 4,
                ..native()
            },
            P,
        );
        assert_eq!(r.edx & (1 << 4), 0);
        let r = cpuid(
            7,
            0,
            CpuidResult {
                ebx: 1 << 9,
                edx: 1 << 4,
                ..native()
            },
            P,
        );
        assert_ne!(r.edx & (1 << 4), 0);
        assert_eq!(cpuid(0xa, 0, native(), P).eax, 0, "no perfmon");
    }

    #[test]
    fn msr_allow_list() {
        assert_eq!(msr_rule(0x10), Some(MsrRule::Tsc));
        assert_eq!(
            msr_rule(0xc000_0080),
            Some(MsrRule::VmcsField(f::GUEST_EFER))
        );
        assert_eq!(msr_rule(0xc000_0082), Some(MsrRule::Stored));
        assert_eq!(msr_rule(0x3a), Some(MsrRule::Fixed(1)));
        for reserved in [0x0u32, 0x480, 0x48c, 0xc001_0000, 0x1234_5678, 0x9b] {
            assert_eq!(msr_rule(reserved), None, "{reserved:#x}");
        }
    }

    #[test]
    fn msr_writes_the_cpu_would_refuse() {
        assert!(msr_write_valid(0xc000_0100, 0xffff_8000_0000_0000));
        assert!(msr_write_valid(0xc000_0101, 0x0000_7fff_ffff_f000));
        assert!(
            !msr_write_valid(0xc000_0100, 0x0000_8000_0000_0000),
            "non-canonical FS base"
        );
        assert!(
            !msr_write_valid(0xc000_0082, 0xdead_beef_0000_0000),
            "non-canonical LSTAR"
        );
        assert!(
            msr_write_valid(0x277, 0x0007_0406_0007_0406),
            "the reset PAT"
        );
        assert!(
            !msr_write_valid(0x277, 0x0007_0406_0007_0402),
            "type 2 is reserved"
        );
        assert!(msr_write_valid(0xc000_0080, 0xd01), "SCE, LME, LMA, NXE");
        assert!(!msr_write_valid(0xc000_0080, 1 << 12), "SVME");
        assert!(!msr_write_valid(0xc000_0103, 1 << 32));
        assert!(msr_write_valid(0x10, u64::MAX));
    }

    #[test]
    fn stored_msrs() {
        let mut s = StoredMsrs::default();
        assert_eq!(s.get(0xc000_0082), 0);
        s.set(0xc000_0082, 0xffff_8000_1234_0000);
        s.set(0xc000_0081, 7);
        s.set(0xc000_0082, 9);
        assert_eq!(s.get(0xc000_0082), 9);
        assert_eq!(s.get(0xc000_0081), 7);
    }
}
