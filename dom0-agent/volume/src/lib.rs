//! `volmgr`: the volume manager core of the dom0 agent.
//!
//! This crate owns everything between a set of raw disks and the volumes that guests and the
//! admin see: pools of disks, RAID layouts (concatenated, striped, mirrored, striped-mirror),
//! thin pools and thin volumes, full and space-optimised snapshots, online grow/shrink and
//! relayout, dirty-region logging and smart resynchronisation, tiers, and multipath. It is
//! `no_std + alloc` so that dom0 can link it on bare metal (the `std` feature makes
//! [`pool::SharedPool`]'s waiting threads sleep on std's `Condvar` instead of spinning); the same code is tested on the host
//! and used offline by `hvctl` on disk-image files.
//!
//! # Map
//!
//! * [`dev`]: the block-device trait (synchronous calls, and submission/completion for many
//!   requests in flight) and an in-memory disk.
//! * [`format`]: the versioned on-disk format (labels, checksummed records, metadata model).
//! * [`layout`]: address mapping of concatenated / striped / mirrored layouts.
//! * [`pool`]: the pool: open/create, commits, the dirty-region log, volume I/O (synchronous,
//!   and queued through [`pool::IoQueue`] with mirror legs and stripe columns in parallel),
//!   thin allocation, snapshots, resize, relayout, resync, split/reattach, checks; and
//!   [`pool::SharedPool`], the pool served from several threads at once (a pool lock held only
//!   for bookkeeping, synchronous paths, commits and admin; per-volume region locks in
//!   submission order; group commit of flushes).
//! * [`multipath`]: one disk over several paths with an I/O policy.
//! * [`bitmap`]: region bitmaps.
//! * [`btree`]: copy-on-write B-trees of thin mappings (metadata version 3).
//! * [`testdev`]: crashable and fault-injecting devices for tests and tools.
//!
//! A running dom0 calls [`pool::Pool::background_step`] from its idle loop to progress resync,
//! snapshot fill and relayout; `hvctl` does the same offline until nothing is left.
//!
//! # Invariants
//!
//! * All I/O goes through [`dev::BlockDevice`]: `read`, `write`, `flush`, in whole 4 KiB blocks,
//!   or the same submitted and completed later. A device may keep acknowledged writes in a
//!   volatile cache until a flush completes.
//! * **Durability**: once [`pool::Pool::flush`] returns `Ok`, every write acknowledged before it
//!   survives a power cut at any later moment, and the pool metadata on disk describes it.
//! * **Metadata** is written in two checksummed, sequence-numbered copies per disk, on every
//!   disk of the pool, and the newest valid copy wins ([`format`] documents the bytes).
//! * Blocks or extents referenced by the *last committed* metadata are never overwritten with
//!   other data before the next commit: freed space becomes reusable only after a commit, and
//!   shared thin chunks are redirected on write.
//! * Before a mirrored (or change-tracked) region is written, its bit is durable in the
//!   dirty-region log, so after a crash only logged regions are resynchronised.
//! * **Concurrency**: a [`Pool`] is used through `&mut` by one thread at a time; to serve it
//!   from several, wrap it in a [`pool::SharedPool`]. Overlapping requests to one volume then
//!   take effect in submission order, and a flush returns only after a commit that started
//!   after it (covering every write acknowledged before it). Devices are `Send`.
//! * **One owner**: a pool is changed by one process (or domain) at a time. A caller that
//!   opens it to write passes [`pool::OpenOptions::owner`]; the owner record
//!   ([`format::Owner`]) is written on every disk before the first other write and cleared by
//!   [`pool::Pool::release`]; a record naming another host is refused unless forced. Host
//!   tools add their own locks (`hvctl` uses `flock`); see `dom0-agent/VOLUMES.md`.
//! * Bad on-disk data never panics: every length is bounded, every record is checksummed, and
//!   decoded metadata is validated before use.
#![cfg_attr(not(any(test, feature = "std")), no_std)]

extern crate alloc;

pub mod bitmap;
pub mod btree;
pub mod dev;
pub mod error;
pub mod format;
pub mod layout;
pub mod multipath;
pub mod pool;
mod sync;
pub mod testdev;

pub use dev::{BLOCK_SIZE, BlockDevice, DevError, MemDisk};
pub use error::Error;
pub use pool::{
    IoQueue, LayoutSpec, NamedDevice, OpenOptions, Pool, PoolConfig, SharedPool, SnapshotKind,
    VolCompletion, VolumeInfo,
};

/// Converts a block count or byte offset that is known to fit memory into `usize`.
///
/// The crate only runs on 64-bit targets (x86_64 dom0 and hosts), where this is lossless.
#[allow(clippy::cast_possible_truncation)] // usize is 64 bits on every supported target.
#[must_use]
pub(crate) fn us(x: u64) -> usize {
    x as usize
}

/// Converts a `usize` to `u64` (lossless on every supported target).
#[must_use]
pub(crate) fn u(x: usize) -> u64 {
    x as u64
}

const _: () = assert!(
    core::mem::size_of::<usize>() == 8,
    "volmgr needs a 64-bit target"
);
