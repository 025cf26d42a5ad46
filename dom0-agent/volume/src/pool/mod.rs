//! The pool: disks, metadata commits, volumes and their I/O paths.
//!
//! A [`Pool`] owns its disks (as [`BlockDevice`]s), the in-memory [`PoolMeta`], a copy of the
//! last *committed* metadata, the dirty-region log, and per-thin-pool reference counts.
//!
//! Ordering rules that make it crash-safe (see the crate doc for the promises):
//! * `flush` = flush every disk, then commit the metadata if it changed, then write a cleared
//!   dirty-region log lazily.
//! * Admin operations (create, snapshot, resize, relayout start/steps, remove, ...) commit
//!   before they return.
//! * Space is allocated only if neither the current nor the committed metadata uses it.
//! * A thin chunk is written in place only if no committed mapping other than this one refers to
//!   it; otherwise the write is redirected to a fresh chunk.
//! * A mirrored or tracked region is logged (and flushed) before it is written; a full
//!   snapshot's region is copied and committed before its origin overwrites it.
//! * A space-optimised snapshot's chunk is copied (or its own mapping committed) before its
//!   thick origin overwrites that chunk.
//!
//! Files: `open` (create, open, recovery), `commit` (metadata commits, dirty-region log,
//! flush, failed disks), `space` (extent allocation), `admin` (operations that change the
//! configuration), `io` (volume reads and writes), `aio` (volume requests in flight through an
//! [`IoQueue`]), `shared` (the pool served from several threads: [`SharedPool`], region locks,
//! group commit), `layout_io` (legs, columns, segments), `validate` (checks of decoded
//! metadata).

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

use crate::bitmap::Bitmap;
use crate::dev::{BLOCK_SIZE, BlockDevice, DevError};
use crate::error::Error;
use crate::format::{
    Column, DRL_MAGIC, DiskMeta, DiskState, DrlRecord, Fill, LABEL_BLOCKS, Label, Layout, Leg,
    MAX_NAME, MD_MAGIC, Owner, PoolMeta, Relayout, Segment, SyncState, ThinMap, Tracking, VolKind,
    VolMeta, encode_record, encode_record_version, read_record, read_record_version, slot_capacity,
};
use crate::layout::seg_lookup;
use crate::multipath::{MultipathDisk, PathPolicy};
use crate::{u, us};

/// Sizes chosen when a pool is created.
#[derive(Debug, Clone, Copy)]
pub struct PoolConfig {
    /// Pool identity written into every label and record.
    pub pool_id: u128,
    /// Allocation unit on disks, in blocks.
    pub extent_blocks: u32,
    /// Blocks per metadata slot.
    pub md_blocks: u32,
    /// Blocks per dirty-region-log slot.
    pub drl_blocks: u32,
    /// Metadata record version to create the pool with: [`crate::format::MD_VERSION`] (3,
    /// thin mappings in B-trees), or [`crate::format::MD_VERSION_INLINE`] (2, mappings in
    /// the record, as pools made before version 3; for tests of old pools).
    pub md_version: u32,
}

impl PoolConfig {
    /// Defaults for real disks: 1 MiB extents, 2 MiB metadata slots, 128 KiB log slots.
    #[must_use]
    pub fn new(pool_id: u128) -> Self {
        Self {
            pool_id,
            extent_blocks: 256,
            md_blocks: 512,
            drl_blocks: 32,
            md_version: crate::format::MD_VERSION,
        }
    }

    /// Small areas for tests and tiny images: 64 KiB extents and metadata slots.
    #[must_use]
    pub fn small(pool_id: u128) -> Self {
        Self {
            pool_id,
            extent_blocks: 16,
            md_blocks: 16,
            drl_blocks: 2,
            md_version: crate::format::MD_VERSION,
        }
    }
}

/// A disk joining a pool.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    pub name: String,
    pub tier: String,
}

impl DiskSpec {
    /// A disk named `name` on tier `tier`.
    #[must_use]
    pub fn new(name: &str, tier: &str) -> Self {
        Self {
            name: name.to_string(),
            tier: tier.to_string(),
        }
    }
}

/// The shape of a thick layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayoutSpec {
    /// One column, possibly spanning disks.
    Concat,
    /// RAID-0 over `columns` disks with a stripe unit of `unit` blocks.
    Stripe { columns: usize, unit: u32 },
    /// RAID-1 with `legs` (2 or 3) copies.
    Mirror { legs: usize },
    /// RAID-1+0: `columns` stripe columns, each mirrored `legs` times.
    StripeMirror {
        columns: usize,
        legs: usize,
        unit: u32,
    },
}

impl LayoutSpec {
    /// `(legs, columns, stripe unit)` after validation.
    pub fn shape(&self) -> Result<(usize, usize, u32), Error> {
        let (legs, cols, unit) = match *self {
            LayoutSpec::Concat => (1, 1, 16),
            LayoutSpec::Stripe { columns, unit } => (1, columns, unit),
            LayoutSpec::Mirror { legs } => (legs, 1, 16),
            LayoutSpec::StripeMirror {
                columns,
                legs,
                unit,
            } => (legs, columns, unit),
        };
        let mirrored = matches!(
            self,
            LayoutSpec::Mirror { .. } | LayoutSpec::StripeMirror { .. }
        );
        if mirrored && !(2..=3).contains(&legs) {
            return Err(Error::InvalidArgument(format!(
                "a mirror has 2 or 3 legs, not {legs}"
            )));
        }
        let striped = matches!(
            self,
            LayoutSpec::Stripe { .. } | LayoutSpec::StripeMirror { .. }
        );
        if striped && !(2..=32).contains(&cols) {
            return Err(Error::InvalidArgument(format!(
                "a stripe has 2 to 32 columns, not {cols}"
            )));
        }
        if unit == 0 || unit > 4096 {
            return Err(Error::InvalidArgument(format!(
                "stripe unit of {unit} blocks is not in 1..=4096"
            )));
        }
        Ok((legs, cols, unit))
    }

    /// The spec a layout was built with.
    #[must_use]
    pub fn of(l: &Layout) -> LayoutSpec {
        match (l.legs.len(), l.ncols()) {
            (1, 1) => LayoutSpec::Concat,
            (1, c) => LayoutSpec::Stripe {
                columns: c,
                unit: l.stripe_unit,
            },
            (n, 1) => LayoutSpec::Mirror { legs: n },
            (n, c) => LayoutSpec::StripeMirror {
                columns: c,
                legs: n,
                unit: l.stripe_unit,
            },
        }
    }
}

impl core::fmt::Display for LayoutSpec {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            LayoutSpec::Concat => write!(f, "concat"),
            LayoutSpec::Stripe { columns, unit } => write!(f, "stripe {columns}x{}K", unit * 4),
            LayoutSpec::Mirror { legs } => write!(f, "mirror {legs}"),
            LayoutSpec::StripeMirror {
                columns,
                legs,
                unit,
            } => {
                write!(f, "stripe-mirror {columns}x{}K x{legs}", unit * 4)
            }
        }
    }
}

/// Kinds of snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotKind {
    /// An independent thick copy, filled in the background (copy-before-write meanwhile).
    Full,
    /// Shares unchanged chunks with its origin in the thin pool (origin must be thin).
    SpaceOptimized,
}

/// How to open a pool.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Policy for disks reached through several paths.
    pub path_policy: PathPolicy,
    /// Inspect only: no recovery, no repair, no writes.
    pub read_only: bool,
    /// Who opens the pool to change it: written as the owner record on every disk before
    /// anything else (see [`crate::format::Owner`]) and cleared by [`Pool::release`]. A pool
    /// whose record names another host is refused unless `force`.
    pub owner: Option<Owner>,
    /// Take over a pool whose owner record names another host.
    pub force: bool,
    /// Refuse to open for writing when a disk of the pool is absent (not given, or its labels
    /// damaged) rather than detaching its mirror legs.
    pub require_all_disks: bool,
    /// Rewrite the labels of a disk whose label copies are all damaged, once it is identified
    /// from the pool metadata it carries (repair).
    pub relabel: bool,
}

/// What `open` found and repaired.
#[derive(Debug, Clone, Default)]
pub struct OpenReport {
    pub notes: Vec<String>,
    /// Mirror regions resynchronised from the dirty-region log.
    pub drl_regions_recovered: u64,
    /// Metadata sequence number in use.
    pub seq: u64,
}

/// One line of `list`.
#[derive(Debug, Clone)]
pub struct VolumeInfo {
    pub id: u32,
    pub name: String,
    pub layout: String,
    pub size_blocks: u64,
    pub used_blocks: u64,
    pub state: String,
    pub tier: Option<String>,
}

/// Disk information for tools.
#[derive(Debug, Clone)]
pub struct DiskInfo {
    pub index: u32,
    pub name: String,
    pub tier: String,
    pub state: String,
    pub free_blocks: u64,
    pub data_blocks: u64,
}

type Devs = [Option<Box<dyn BlockDevice>>];

/// A volume that is one run of blocks on one disk: `[start, start + size)` of disk `disk`.
#[derive(Clone, Copy)]
struct FastMap {
    disk: usize,
    start: u64,
    size: u64,
}

/// Outcome bookkeeping of one layout I/O.
#[derive(Default)]
struct IoOutcome {
    gone: Vec<u32>,
    detached: bool,
    changed: bool,
}

#[derive(Clone, Copy)]
struct Regions {
    rb: u64,
    n: u64,
}

impl Regions {
    fn of(v: &VolMeta) -> Self {
        Regions {
            rb: u64::from(v.region_blocks.max(1)),
            n: v.nregions(),
        }
    }
    fn span(&self, vblock: u64, nblocks: u64) -> (u64, u64) {
        (
            vblock / self.rb,
            (vblock + nblocks.max(1) - 1) / self.rb + 1,
        )
    }
}

/// A pool of disks and its volumes.
pub struct Pool {
    meta: PoolMeta,
    committed: PoolMeta,
    devs: Vec<Option<Box<dyn BlockDevice>>>,
    /// What the operator calls each disk (the path given), where known.
    names: Vec<Option<String>>,
    /// The owner record this pool wrote, cleared by `release`.
    owner: Option<Owner>,
    dirty: bool,
    drl_seq: u64,
    drl: BTreeMap<u32, Bitmap>,
    drl_bits: bool,
    thin: BTreeMap<u32, ThinRt>,
    /// Volumes whose writes may first have to copy into a snapshot (superset).
    dependents: BTreeSet<u32>,
    /// Direct mappings, by volume id, of volumes that are one contiguous run on one disk with
    /// nothing else to do on I/O (no mirror, relayout, fill, tracking or dependents).
    fast: Vec<Option<FastMap>>,
    read_only: bool,
    /// Volume requests and their device pieces in flight (see [`aio`]).
    aio: aio::Aio,
    /// Events worth telling the operator (detached legs, missing disks, repairs).
    pub events: Vec<String>,
    /// Node cache and node-block allocation of the version-3 mapping trees.
    forest: crate::btree::Forest,
    /// Capacity of the node cache.
    cache_nodes: usize,
    /// Node I/O detached a metadata volume's leg: commit at the end of the operation.
    md_commit_soon: bool,
}

fn dev_err(meta: &PoolMeta, disk: u32, err: DevError) -> Error {
    let name = meta
        .disks
        .get(us(u64::from(disk)))
        .map_or_else(|| format!("#{disk}"), |d| d.name.clone());
    Error::Device { disk: name, err }
}

fn nblocks(buf: &[u8]) -> Result<u64, Error> {
    if !buf.len().is_multiple_of(BLOCK_SIZE) {
        return Err(Error::Misaligned);
    }
    Ok(u(buf.len() / BLOCK_SIZE))
}

fn sl(buf: &[u8], from: u64, to: u64) -> &[u8] {
    &buf[us(from) * BLOCK_SIZE..us(to) * BLOCK_SIZE]
}

fn sl_mut(buf: &mut [u8], from: u64, to: u64) -> &mut [u8] {
    &mut buf[us(from) * BLOCK_SIZE..us(to) * BLOCK_SIZE]
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

fn round_up(x: u64, m: u64) -> u64 {
    x.div_ceil(m) * m
}

mod admin;
pub mod aio;
mod commit;
mod io;
mod layout_io;
mod open;
pub mod shared;
mod space;
mod thinmap;
mod validate;

pub use aio::{IoQueue, VolCompletion};
use layout_io::{
    col_present, col_read, col_write, layout_copy_region, layout_read, layout_sync_range,
    layout_write, mark_stale,
};
pub use open::NamedDevice;
pub use shared::SharedPool;
use thinmap::ThinRt;
pub use thinmap::md_blocks_for;
use validate::check_name;
pub use validate::validate_meta;

fn needs_drl(v: &VolMeta) -> bool {
    v.tracking.is_some()
        || match &v.kind {
            VolKind::Thick {
                layout, relayout, ..
            } => {
                layout.legs.len() > 1 || relayout.as_ref().is_some_and(|r| r.target.legs.len() > 1)
            }
            _ => false,
        }
}

fn layouts_mut(v: &mut VolMeta) -> Vec<&mut Layout> {
    match &mut v.kind {
        VolKind::Thick {
            layout, relayout, ..
        } => {
            let mut out = vec![layout];
            if let Some(r) = relayout {
                out.push(&mut r.target);
            }
            out
        }
        _ => Vec::new(),
    }
}

fn layouts(v: &VolMeta) -> Vec<&Layout> {
    match &v.kind {
        VolKind::Thick {
            layout, relayout, ..
        } => {
            let mut out = vec![layout];
            if let Some(r) = relayout {
                out.push(&r.target);
            }
            out
        }
        _ => Vec::new(),
    }
}

impl Pool {
    // ---------------------------------------------------------------------------------------
    // Lookup and listing.

    fn vidx(&self, id: u32) -> Result<usize, Error> {
        self.meta
            .volumes
            .iter()
            .position(|v| v.id == id)
            .ok_or_else(|| Error::NoSuchVolume(format!("#{id}")))
    }

    /// Id of the volume called `name`.
    pub fn volume_id(&self, name: &str) -> Result<u32, Error> {
        self.meta
            .volumes
            .iter()
            .find(|v| v.name == name)
            .map(|v| v.id)
            .ok_or_else(|| Error::NoSuchVolume(name.to_string()))
    }

    /// Id of a volume an operator may address (internal volumes are reached via their owner).
    fn user_volume(&self, name: &str) -> Result<u32, Error> {
        let id = self.volume_id(name)?;
        if self.meta.volumes[self.vidx(id)?].internal {
            return Err(Error::InvalidArgument(format!(
                "'{name}' is internal to a thin pool; address the thin pool instead"
            )));
        }
        Ok(id)
    }

    /// The thick volume behind `name`: itself, or a thin pool's data volume.
    fn thick_behind(&self, name: &str) -> Result<String, Error> {
        let id = self.user_volume(name)?;
        match self.meta.volumes[self.vidx(id)?].kind {
            VolKind::ThinPool { data, .. } => Ok(self.meta.volumes[self.vidx(data)?].name.clone()),
            _ => Ok(name.to_string()),
        }
    }

    /// What messages call disk `i`: the name it was opened under (its path), else the name
    /// recorded when it joined.
    #[must_use]
    pub fn disk_label(&self, i: usize) -> String {
        match (self.names.get(i).cloned().flatten(), self.meta.disks.get(i)) {
            (Some(n), _) => n,
            (None, Some(d)) => format!("disk '{}'", d.name),
            (None, None) => format!("disk #{i}"),
        }
    }

    /// Metadata without volumes whose disk names are what messages call them.
    pub(super) fn name_meta(&self) -> PoolMeta {
        let mut m = PoolMeta {
            volumes: Vec::new(),
            disks: self.meta.disks.clone(),
            ..self.committed.clone()
        };
        for (i, d) in m.disks.iter_mut().enumerate() {
            if let Some(Some(n)) = self.names.get(i) {
                d.name.clone_from(n);
            }
        }
        m
    }

    /// Size of a volume in blocks.
    pub fn volume_size(&self, id: u32) -> Result<u64, Error> {
        Ok(self.meta.volumes[self.vidx(id)?].size)
    }

    /// The in-memory metadata (read-only view for tools and tests).
    #[must_use]
    pub fn meta(&self) -> &PoolMeta {
        &self.meta
    }

    /// Whether there are changes not yet committed.
    #[must_use]
    pub fn has_uncommitted(&self) -> bool {
        self.dirty
    }

    /// Volumes, as `list` shows them.
    #[must_use]
    pub fn list(&self) -> Vec<VolumeInfo> {
        let mut out = Vec::new();
        for v in self.meta.volumes.iter().filter(|v| !v.internal) {
            let (layout, used, mut state) = match &v.kind {
                VolKind::Thick {
                    layout,
                    relayout,
                    fill,
                } => {
                    let mut st = Vec::new();
                    let stale: u64 = layout
                        .legs
                        .iter()
                        .flat_map(|g| &g.columns)
                        .map(|c| match &c.state {
                            SyncState::Stale(b) => b.count(),
                            SyncState::InSync => 0,
                        })
                        .sum();
                    if layout.degraded() {
                        st.push(format!("degraded: {stale} regions to resync"));
                    }
                    if let Some(r) = relayout {
                        st.push(format!(
                            "relayout to {} {}%",
                            LayoutSpec::of(&r.target),
                            r.done * 100 / v.size.max(1)
                        ));
                    }
                    if let Some(f) = fill {
                        st.push(format!(
                            "filling {}%",
                            f.copied.count() * 100 / f.copied.len().max(1)
                        ));
                    }
                    (LayoutSpec::of(layout).to_string(), v.size, st)
                }
                VolKind::ThinPool { chunk_blocks, .. } => {
                    let used = self
                        .thin
                        .get(&v.id)
                        .map_or(0, |rt| u(rt.refs.iter().filter(|r| **r > 0).count()));
                    (
                        format!("thin-pool chunk {}K", chunk_blocks * 4),
                        used * u64::from(*chunk_blocks),
                        Vec::new(),
                    )
                }
                VolKind::Thin { pool, map, origin } => {
                    let (pname, cb) = self
                        .meta
                        .volumes
                        .iter()
                        .find(|p| p.id == *pool)
                        .map(|p| match p.kind {
                            VolKind::ThinPool { chunk_blocks, .. } => {
                                (p.name.clone(), u64::from(chunk_blocks))
                            }
                            _ => (p.name.clone(), 1),
                        })
                        .unwrap_or_default();
                    let what =
                        match origin.and_then(|o| self.meta.volumes.iter().find(|v| v.id == o)) {
                            Some(o) => format!("thin snapshot of {} in {pname}", o.name),
                            None => format!("thin in {pname}"),
                        };
                    (what, map.len() * cb, Vec::new())
                }
            };
            if let Some(t) = &v.tracking {
                let peer = self
                    .meta
                    .volumes
                    .iter()
                    .find(|p| p.id == t.peer)
                    .map_or("?", |p| p.name.as_str());
                state.push(format!(
                    "tracking changes vs {peer}: {} regions",
                    t.changed.count()
                ));
            }
            if state.is_empty() {
                state.push("ok".into());
            }
            out.push(VolumeInfo {
                id: v.id,
                name: v.name.clone(),
                layout,
                size_blocks: v.size,
                used_blocks: used.min(v.size.max(used)),
                state: state.join("; "),
                tier: v.tier.clone(),
            });
        }
        out
    }

    /// Disks of the pool.
    #[must_use]
    pub fn disks(&self) -> Vec<DiskInfo> {
        (0..self.meta.disks.len())
            .map(|i| {
                let d = &self.meta.disks[i];
                let idx = u32::try_from(i).unwrap_or(u32::MAX);
                let free = self.free_runs(idx, &[]).iter().map(|r| r.1).sum();
                DiskInfo {
                    index: idx,
                    name: d.name.clone(),
                    tier: d.tier.clone(),
                    state: match d.state {
                        DiskState::Active if self.devs[i].is_some() => "active".into(),
                        DiskState::Active => "absent".into(),
                        DiskState::Missing { since } => format!("missing since sequence {since}"),
                    },
                    free_blocks: free,
                    data_blocks: d.blocks - d.data_start,
                }
            })
            .collect()
    }
}
