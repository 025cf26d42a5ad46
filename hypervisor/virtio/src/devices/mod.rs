//! Device models behind the transport, one file each with the same skeleton: constants
//! from the spec section, a backend trait (where the work goes), counters, the model, and
//! its [`crate::VirtioDevice`] impl. Models own no guest memory and no queues; they process
//! the chains the transport lends them and answer per-request problems in-band.

pub mod balloon;
pub mod block;
pub mod console;
pub mod net;
pub mod remote_block;
