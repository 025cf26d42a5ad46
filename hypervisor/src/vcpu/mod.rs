//! Virtual CPUs: what happens between a VM exit and the next entry, as code that runs on the
//! host too. [`exit::Exit`] is one exit read from the VMCS, [`crate::vmx::vmcs::VmcsAccess`]
//! the VMCS behind a trait (the real one on bare metal, a fake in tests), and [`dispatch`] turns an exit
//! into an [`dispatch::Action`] for the run loop ([`run`], on bare metal), which keeps only entry, exit
//! and the hand-off between vCPUs, and the scheduler's shared state ([`queue`]). [`dom0`] links
//! guests' virtio disks to dom0's block ring (bare metal): dom0's calls arrive through the
//! dispatcher and its requests wake its vCPU.
//! [`pc`] handles a PC guest's interrupt controllers (local APIC, IOAPIC) and injects their
//! interrupts; `attach` connects the operator's console to a PC guest's UART (`console ID`).

#[cfg(target_os = "none")]
pub mod attach;
pub mod dispatch;
#[cfg(target_os = "none")]
pub mod dom0;
pub mod exit;
#[cfg(target_os = "none")]
pub mod net;
pub mod pc;
#[cfg(target_os = "none")]
pub mod queue;
#[cfg(target_os = "none")]
pub mod run;
pub mod state;

#[cfg(test)]
mod tests;
