//! The vCPU scheduler's policy, as a pure, host-tested state machine: what runs where and for
//! how long, given domains' weights, caps and reservations, vCPUs' affinity and who is
//! runnable. Time is passed in (nanoseconds); nothing here touches hardware. The run loop
//! (`vcpu::queue` and `vcpu::run`) drives it: it asks for the next vCPU when a CPU is free,
//! reports when one stops running (its slice ended, it halted, it retired) and when one wakes
//! (its timer, VCPU_START, an operator's resume), and keeps the sleepers' deadlines
//! ([`timers`]) and the shares of the last second ([`window`]).
//!
//! How it decides (weighted virtual time, as in CFS/EEVDF, with Xen credit-style caps):
//! - each vCPU has a virtual runtime that grows by `ran × WEIGHT_UNIT / weight`, where its
//!   weight is its domain's weight split over the domain's vCPUs; one virtual clock for all
//!   CPUs. Each CPU runs the eligible vCPU with the least virtual runtime, from its own queue
//!   (a B-tree: O(log n)) or, when another queue's best is a minimum slice behind, from there
//!   (O(CPUs) per decision): weights hold across CPUs, not only within each queue;
//! - a cap is a budget per 10 ms period; a domain that spent it is throttled to the period's
//!   end; a reservation puts a domain below its reserved share in the period ahead of others;
//!   admission refuses reservations that do not fit the machine;
//! - a vCPU that wakes is placed at most half a slice behind the queue's least virtual time:
//!   it runs soon (a latency boost) but cannot bank sleep into more than its share;
//! - work-conserving: a CPU with nothing eligible of its own takes a waiting vCPU from another
//!   queue whose affinity allows it; new and waking vCPUs go to the least loaded allowed CPU;
//! - slices are the target latency over the number of runnable vCPUs, within 1–30 ms.

pub mod keys;
pub mod policy;
pub mod timers;
pub mod window;

#[cfg(not(target_os = "none"))]
pub mod sim;
