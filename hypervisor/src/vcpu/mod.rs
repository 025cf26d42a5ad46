//! Virtual CPUs: what happens between a VM exit and the next entry, as code that runs on the
//! host too. [`exit::Exit`] is one exit read from the VMCS, [`crate::vmx::vmcs::VmcsAccess`]
//! the VMCS behind a trait (the real one on bare metal, a fake in tests), and [`dispatch`] turns an exit
//! into an [`dispatch::Action`] for the run loop ([`run`], on bare metal), which keeps only entry, exit
//! and the hand-off between vCPUs, and the scheduler's shared state ([`queue`]).

pub mod dispatch;
pub mod exit;
#[cfg(target_os = "none")]
pub mod queue;
#[cfg(target_os = "none")]
pub mod run;
pub mod state;

#[cfg(test)]
mod tests;
