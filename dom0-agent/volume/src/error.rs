//! Errors of the volume manager. Each variant says what was wrong and, where it helps, where.

use alloc::string::String;

use crate::dev::DevError;

/// Everything a pool operation can refuse or fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A disk failed a request that could not be served from another copy.
    #[error("disk {disk}: {err}")]
    Device { disk: String, err: DevError },
    /// A device carries no valid pool label.
    #[error("{0} is not a disk of a volume pool (no valid label, no pool metadata)")]
    NotAPoolDisk(String),
    /// Another host owns the pool (its owner record says so); nothing was changed.
    #[error("pool owned elsewhere: {0}")]
    OwnedElsewhere(String),
    /// A disk of the pool is absent and the caller asked for all of them; nothing changed.
    #[error("pool incomplete: {0}")]
    Degraded(String),
    /// Devices from different pools were given together.
    #[error("devices belong to different pools ({0:032x} and {1:032x})")]
    MixedPools(u128, u128),
    /// No disk holds a valid copy of the pool metadata.
    #[error("no valid copy of the pool metadata on any disk")]
    NoValidMetadata,
    /// Two halves of the pool were used independently; refusing to guess which one is right.
    #[error("split brain: {0}")]
    SplitBrain(String),
    /// Checksummed metadata decoded but describes an impossible pool.
    #[error("corrupt metadata: {0}")]
    Corrupt(String),
    /// The encoded metadata no longer fits its on-disk area.
    #[error("pool metadata needs {needed} bytes but the metadata area holds {capacity}")]
    MetadataFull { needed: usize, capacity: usize },
    /// No volume of that name or id.
    #[error("no volume named '{0}'")]
    NoSuchVolume(String),
    /// A volume of that name exists already.
    #[error("a volume named '{0}' already exists")]
    VolumeExists(String),
    /// A request or command argument that makes no sense; nothing was changed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Not enough free space on suitable disks; nothing was changed.
    #[error("not enough space: {0}")]
    NoSpace(String),
    /// A thin pool has no free chunk for a first write; the write was not performed.
    #[error("thin pool '{pool}' is full ({chunks} chunks all in use); write refused")]
    ThinPoolFull { pool: String, chunks: u64 },
    /// The request reaches past the end of the volume.
    #[error("request beyond end of volume '{0}'")]
    OutOfRange(String),
    /// The buffer is not a whole number of blocks.
    #[error("buffer is not a whole number of 4 KiB blocks")]
    Misaligned,
    /// The operation conflicts with one in progress.
    #[error("busy: {0}")]
    Busy(String),
    /// Every copy of some data is unavailable.
    #[error("volume '{0}': no readable copy of block {1}")]
    NoCopy(String, u64),
}
