//! The seam between the transport and the device models: the [`VirtioDevice`] trait, the
//! view of live queues a model gets ([`QueueSet`]), and [`DeviceError`], which separates
//! "the driver broke the protocol" (the device must be reset) from everything else.
//!
//! A model never sees a queue before DRIVER_OK and never keeps one: the transport owns the
//! queues and lends them for one call. Errors a model returns make the transport set
//! DEVICE_NEEDS_RESET; per-request problems the protocol can express (a block read beyond
//! the disk, an unsupported command) are answered in-band instead and are not errors here.

use alloc::vec::Vec;
use core::fmt;

use crate::mem::{GuestMemory, MemError};
use crate::queue::{ChainError, QueueError, SplitQueue};

/// Why a device stopped processing: always the driver's fault, answered with
/// DEVICE_NEEDS_RESET (virtio 1.2 §2.1.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceError {
    /// A ring or chain was malformed.
    Queue(QueueError),
    /// A buffer named by a chain was not guest RAM.
    Memory(MemError),
    /// A request's framing broke a device-specific rule (clause named in the text).
    Malformed(&'static str),
    /// The model used a queue that is not live (driver notified before setting it up).
    QueueNotReady(usize),
}

impl From<QueueError> for DeviceError {
    fn from(e: QueueError) -> Self {
        DeviceError::Queue(e)
    }
}

impl From<MemError> for DeviceError {
    fn from(e: MemError) -> Self {
        DeviceError::Memory(e)
    }
}

impl From<ChainError> for DeviceError {
    fn from(e: ChainError) -> Self {
        match e {
            ChainError::TooShort => DeviceError::Malformed("buffer shorter than the request"),
            ChainError::Memory(m) => DeviceError::Memory(m),
        }
    }
}

impl fmt::Display for DeviceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceError::Queue(e) => write!(f, "queue: {e}"),
            DeviceError::Memory(e) => write!(f, "memory: {e}"),
            DeviceError::Malformed(what) => write!(f, "malformed request: {what}"),
            DeviceError::QueueNotReady(i) => write!(f, "queue {i} not ready"),
        }
    }
}

/// The live queues of one device, lent to a model for one call.
pub struct QueueSet<'a> {
    queues: &'a mut [Option<SplitQueue>],
}

impl<'a> QueueSet<'a> {
    /// Wraps the transport's queue slots.
    pub fn new(queues: &'a mut Vec<Option<SplitQueue>>) -> QueueSet<'a> {
        QueueSet { queues }
    }

    /// Wraps a slice of queue slots (tests, benchmarks).
    pub fn from_slice(queues: &'a mut [Option<SplitQueue>]) -> QueueSet<'a> {
        QueueSet { queues }
    }

    /// Queue `index`, or an error if the driver has not made it ready.
    pub fn get(&mut self, index: usize) -> Result<&mut SplitQueue, DeviceError> {
        self.queues
            .get_mut(index)
            .and_then(Option::as_mut)
            .ok_or(DeviceError::QueueNotReady(index))
    }

    /// Whether queue `index` is live.
    pub fn is_ready(&self, index: usize) -> bool {
        matches!(self.queues.get(index), Some(Some(_)))
    }
}

/// A virtio device model behind a transport.
pub trait VirtioDevice {
    /// Device type (virtio 1.2 §5: 1 net, 2 block, 3 console, 5 balloon).
    fn device_id(&self) -> u32;
    /// Device-specific feature bits offered (the transport adds the reserved ones).
    fn device_features(&self) -> u64;
    /// Number of virtqueues.
    fn num_queues(&self) -> usize;
    /// QueueNumMax for queue `index` (< `num_queues()`).
    fn queue_max_size(&self, index: usize) -> u16;
    /// Reads device configuration space at `offset`; bytes beyond it read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Driver writes configuration space; returns whether the configuration changed.
    fn write_config(&mut self, offset: u64, data: &[u8]) -> bool;
    /// Whether this feature set (already a subset of the offer) is acceptable.
    fn accept_features(&mut self, _features: u64) -> bool {
        true
    }
    /// DRIVER_OK was set with these features.
    fn activate(&mut self, features: u64);
    /// The driver reset the device.
    fn reset(&mut self);
    /// The driver notified queue `queue`: process what it made available.
    fn queue_notify<M: GuestMemory + ?Sized>(
        &mut self,
        queue: usize,
        queues: &mut QueueSet<'_>,
        mem: &M,
    ) -> Result<(), DeviceError>;
}

/// Copies `data` into a config-space read: `out` gets the bytes of `data` at `offset`,
/// zeros beyond it.
pub fn read_config_bytes(data: &[u8], offset: u64, out: &mut [u8]) {
    for (i, b) in out.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| data.get(o))
            .copied()
            .unwrap_or(0);
    }
}
