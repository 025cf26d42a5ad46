//! Virtual CPUs: what happens between a VM exit and the next entry, as code that runs on the
//! host too. [`exit::Exit`] is one exit read from the VMCS, [`access::VmcsAccess`] the VMCS
//! behind a trait (the real one on bare metal, a fake in tests), and [`dispatch`] turns an exit
//! into an [`dispatch::Action`] for the run loop (`crate::guest`), which keeps only entry, exit
//! and the hand-off between vCPUs.

pub mod access;
pub mod dispatch;
pub mod exit;

#[cfg(test)]
mod tests;
