//! VT-x: capability detection and decoding (pure, host-tested) and, on bare metal, the per-CPU
//! probe that reads CPUID and the VMX MSRs and enables VMX in IA32_FEATURE_CONTROL.

pub mod audit;
pub mod caps;
pub mod cr;
pub mod decode;
pub mod ept;
pub mod exit;
#[cfg(target_os = "none")]
pub mod fpu;
#[cfg(target_os = "none")]
pub mod hw;
pub mod iobitmap;
pub mod policy;
#[cfg(target_os = "none")]
pub mod setup;
pub mod spec;
pub mod vmcs;

#[cfg(target_os = "none")]
pub mod detect;
