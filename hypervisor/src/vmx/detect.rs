//! The per-CPU VT-x probe: CPUID, IA32_FEATURE_CONTROL (enabled and locked if the firmware
//! left it unlocked), and the capability MSRs, decoded by [`super::caps`].

use super::caps::{FeatureControl, MsrSource, VmxCaps, VmxStatus, feature_control_action, msr};
use crate::arch::percpu::MAX_CPUS;

#[allow(clippy::declare_interior_mutable_const)] // only initialises the array below
const UNKNOWN: spin::Mutex<VmxStatus> = spin::Mutex::new(VmxStatus::Unknown);
/// What the VT-x probe found on each CPU (index as in `arch::percpu::CPUS`).
pub static VMX_STATUS: [spin::Mutex<VmxStatus>; MAX_CPUS] = [UNKNOWN; MAX_CPUS];
use crate::arch::cpu;

/// Reads MSRs from this CPU.
struct ThisCpu;

impl MsrSource for ThisCpu {
    fn read(&mut self, msr: u32) -> u64 {
        // SAFETY: `VmxCaps::read` only asks for capability MSRs the SDM says exist once
        // CPUID.1:ECX.VMX is 1 (checked by the caller), each under the condition it documents.
        unsafe { cpu::rdmsr(msr) }
    }
}

/// Probes VT-x on the CPU this runs on.
pub fn probe_this_cpu() -> VmxStatus {
    if cpu::cpuid(1, 0).ecx & (1 << 5) == 0 {
        return VmxStatus::NoCpuSupport;
    }
    // SAFETY: IA32_FEATURE_CONTROL exists when CPUID.1:ECX.VMX is 1 (SDM Vol. 4 Table 2-2).
    let fc = unsafe { cpu::rdmsr(msr::FEATURE_CONTROL) };
    let enabled_by_us = match feature_control_action(fc) {
        FeatureControl::Enabled => false,
        FeatureControl::LockedOff => return VmxStatus::DisabledByFirmware,
        FeatureControl::EnableAndLock(value) => {
            // SAFETY: the register is unlocked, so the write is accepted; it only enables VMX
            // outside SMX and locks the register until reset, as the SDM requires before VMXON.
            unsafe { cpu::wrmsr(msr::FEATURE_CONTROL, value) };
            true
        }
    };
    VmxStatus::Available {
        caps: VmxCaps::read(&mut ThisCpu),
        enabled_by_us,
    }
}
