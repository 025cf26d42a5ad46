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
    MAX_NAME, MD_MAGIC, PoolMeta, Relayout, Segment, SyncState, Tracking, VolKind, VolMeta,
    encode_record, read_record, slot_capacity,
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
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// Policy for disks reached through several paths.
    pub path_policy: PathPolicy,
    /// Inspect only: no recovery, no repair, no writes.
    pub read_only: bool,
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

struct ThinRt {
    refs: Vec<u32>,
    crefs: Vec<u32>,
    free: u64,
    hint: usize,
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
    /// Events worth telling the operator (detached legs, missing disks, repairs).
    pub events: Vec<String>,
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

fn col_read(
    devs: &mut Devs,
    segs: &[Segment],
    cblock: u64,
    buf: &mut [u8],
) -> Result<(), (u32, DevError)> {
    let n = u(buf.len() / BLOCK_SIZE);
    let mut done = 0;
    while done < n {
        let (disk, pb, run) =
            seg_lookup(segs, cblock + done, n - done).ok_or((u32::MAX, DevError::OutOfRange))?;
        let dev = devs
            .get_mut(us(u64::from(disk)))
            .and_then(Option::as_mut)
            .ok_or((disk, DevError::Gone))?;
        dev.read(pb, sl_mut(buf, done, done + run))
            .map_err(|e| (disk, e))?;
        done += run;
    }
    Ok(())
}

fn col_write(
    devs: &mut Devs,
    segs: &[Segment],
    cblock: u64,
    buf: &[u8],
) -> Result<(), (u32, DevError)> {
    let n = u(buf.len() / BLOCK_SIZE);
    let mut done = 0;
    while done < n {
        let (disk, pb, run) =
            seg_lookup(segs, cblock + done, n - done).ok_or((u32::MAX, DevError::OutOfRange))?;
        let dev = devs
            .get_mut(us(u64::from(disk)))
            .and_then(Option::as_mut)
            .ok_or((disk, DevError::Gone))?;
        dev.write(pb, sl(buf, done, done + run))
            .map_err(|e| (disk, e))?;
        done += run;
    }
    Ok(())
}

fn col_present(devs: &Devs, segs: &[Segment]) -> bool {
    segs.iter()
        .all(|s| devs.get(us(u64::from(s.disk))).is_some_and(Option::is_some))
}

fn mark_stale(c: &mut Column, rg: Regions, vblock: u64, n: u64) -> bool {
    if c.state == SyncState::InSync {
        c.state = SyncState::Stale(Bitmap::new(rg.n));
    }
    let (r0, r1) = rg.span(vblock, n);
    match &mut c.state {
        SyncState::Stale(bm) => bm.set_range(r0, r1),
        SyncState::InSync => false,
    }
}

/// Reads through a layout from any in-sync leg; `Err(block)` when no copy could be read.
fn layout_read(
    l: &mut Layout,
    devs: &mut Devs,
    vblock: u64,
    buf: &mut [u8],
    rg: Regions,
    out: &mut IoOutcome,
) -> Result<(), u64> {
    let n = u(buf.len() / BLOCK_SIZE);
    let nlegs = l.legs.len();
    let mut done = 0;
    while done < n {
        let (col, cblock, run) = l.map(vblock + done, n - done);
        let piece = sl_mut(buf, done, done + run);
        let start = us(cblock >> 6) % nlegs;
        let mut ok = false;
        for k in 0..nlegs {
            let leg = (start + k) % nlegs;
            if l.legs[leg].columns[col].state != SyncState::InSync {
                continue;
            }
            match col_read(devs, &l.legs[leg].columns[col].segs, cblock, piece) {
                Ok(()) => {
                    ok = true;
                    break;
                }
                Err((disk, e)) => {
                    if e == DevError::Gone {
                        out.gone.push(disk);
                    }
                    let others = l
                        .legs
                        .iter()
                        .filter(|g| g.columns[col].state == SyncState::InSync)
                        .count();
                    if others > 1 {
                        mark_stale(&mut l.legs[leg].columns[col], rg, vblock + done, run);
                        out.detached = true;
                        out.changed = true;
                    }
                }
            }
        }
        if !ok {
            return Err(vblock + done);
        }
        done += run;
    }
    Ok(())
}

/// Writes through a layout to every in-sync leg; stale legs record the region instead.
fn layout_write(
    l: &mut Layout,
    devs: &mut Devs,
    vblock: u64,
    buf: &[u8],
    rg: Regions,
    out: &mut IoOutcome,
) -> Result<(), u64> {
    let n = u(buf.len() / BLOCK_SIZE);
    let mut done = 0;
    while done < n {
        let (col, cblock, run) = l.map(vblock + done, n - done);
        let piece = sl(buf, done, done + run);
        let mut ok = 0;
        let mut failed = Vec::new();
        for (leg, g) in l.legs.iter_mut().enumerate() {
            let c = &mut g.columns[col];
            match &mut c.state {
                SyncState::InSync => match col_write(devs, &c.segs, cblock, piece) {
                    Ok(()) => ok += 1,
                    Err((disk, e)) => {
                        if e == DevError::Gone {
                            out.gone.push(disk);
                        }
                        failed.push(leg);
                    }
                },
                SyncState::Stale(bm) => {
                    let (r0, r1) = rg.span(vblock + done, run);
                    out.changed |= bm.set_range(r0, r1);
                }
            }
        }
        if ok == 0 {
            return Err(vblock + done);
        }
        for leg in failed {
            mark_stale(&mut l.legs[leg].columns[col], rg, vblock + done, run);
            out.detached = true;
            out.changed = true;
        }
        done += run;
    }
    Ok(())
}

/// Makes every in-sync leg of `[vstart, vend)` equal to the first readable one.
fn layout_sync_range(
    l: &mut Layout,
    devs: &mut Devs,
    vstart: u64,
    vend: u64,
) -> Result<(), (u32, DevError)> {
    if l.legs.len() < 2 {
        return Ok(());
    }
    let mut b = vstart;
    let mut buf = Vec::new();
    while b < vend {
        let (col, cblock, run) = l.map(b, vend - b);
        buf.resize(us(run) * BLOCK_SIZE, 0);
        let legs: Vec<usize> = (0..l.legs.len())
            .filter(|&g| l.legs[g].columns[col].state == SyncState::InSync)
            .collect();
        if legs.len() >= 2 {
            let mut src = None;
            for &g in &legs {
                if col_read(devs, &l.legs[g].columns[col].segs, cblock, &mut buf).is_ok() {
                    src = Some(g);
                    break;
                }
            }
            if let Some(s) = src {
                for &g in legs.iter().filter(|&&g| g != s) {
                    col_write(devs, &l.legs[g].columns[col].segs, cblock, &buf)?;
                }
            }
        }
        b += run;
    }
    Ok(())
}

/// Copies region `r` of column `col` from an in-sync leg into leg `dst`.
fn layout_copy_region(
    l: &Layout,
    devs: &mut Devs,
    dst: usize,
    col: usize,
    rg: Regions,
    size: u64,
    r: u64,
) -> Result<(), (u32, DevError)> {
    let vstart = r * rg.rb;
    let vend = ((r + 1) * rg.rb).min(size);
    let mut b = vstart;
    let mut buf = Vec::new();
    while b < vend {
        let (c, cblock, run) = l.map(b, vend - b);
        if c == col {
            buf.resize(us(run) * BLOCK_SIZE, 0);
            let mut ok = false;
            let mut last = (u32::MAX, DevError::Gone);
            for g in (0..l.legs.len())
                .filter(|&g| g != dst && l.legs[g].columns[col].state == SyncState::InSync)
            {
                match col_read(devs, &l.legs[g].columns[col].segs, cblock, &mut buf) {
                    Ok(()) => {
                        ok = true;
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            if !ok {
                return Err(last);
            }
            col_write(devs, &l.legs[dst].columns[col].segs, cblock, &buf)?;
        }
        b += run;
    }
    Ok(())
}

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

fn check_name(name: &str) -> Result<(), Error> {
    if name.is_empty()
        || name.len() > MAX_NAME
        || name
            .chars()
            .any(|c| c.is_control() || c == '/' || c.is_whitespace())
    {
        return Err(Error::InvalidArgument(format!(
            "name '{name}' must be 1 to {MAX_NAME} bytes without spaces, control characters or '/'"
        )));
    }
    Ok(())
}

/// Checks that decoded metadata describes a possible pool.
pub fn validate_meta(m: &PoolMeta) -> Result<(), String> {
    if m.extent_blocks == 0 {
        return Err("zero extent size".into());
    }
    let nd = u(m.disks.len());
    for d in &m.disks {
        if d.data_start > d.blocks {
            return Err(format!("disk {} data area starts past its end", d.name));
        }
    }
    let mut ids = BTreeSet::new();
    let mut names = BTreeSet::new();
    for v in &m.volumes {
        if !ids.insert(v.id) || !names.insert(v.name.as_str()) {
            return Err(format!("duplicate volume id {} or name {}", v.id, v.name));
        }
        if v.id >= m.next_vol {
            return Err(format!(
                "volume id {} not below next id {}",
                v.id, m.next_vol
            ));
        }
    }
    let find = |id: u32| m.volumes.iter().find(|v| v.id == id);
    let mut per_disk: BTreeMap<u32, Vec<(u64, u64)>> = BTreeMap::new();
    for v in &m.volumes {
        if v.region_blocks == 0 || v.nregions() > 1 << 24 {
            return Err(format!(
                "volume {}: region size {} unusable",
                v.name, v.region_blocks
            ));
        }
        let nreg = v.nregions();
        let check_layout = |l: &Layout| -> Result<(), String> {
            let nc = l.ncols();
            if l.legs.is_empty() || l.legs.len() > 3 || nc == 0 || nc > 32 || l.stripe_unit == 0 {
                return Err(format!("volume {}: impossible layout shape", v.name));
            }
            let clen = l.column_len();
            if nc > 1 && !clen.is_multiple_of(u64::from(l.stripe_unit)) {
                return Err(format!(
                    "volume {}: column length not a whole number of stripe units",
                    v.name
                ));
            }
            for g in &l.legs {
                if g.columns.len() != nc {
                    return Err(format!(
                        "volume {}: legs with different column counts",
                        v.name
                    ));
                }
                for c in &g.columns {
                    if c.segs.iter().map(|s| s.len).sum::<u64>() != clen {
                        return Err(format!("volume {}: columns of different lengths", v.name));
                    }
                    if let SyncState::Stale(b) = &c.state
                        && b.len() != nreg
                    {
                        return Err(format!("volume {}: stale bitmap of wrong length", v.name));
                    }
                    for s in &c.segs {
                        let d = m
                            .disks
                            .get(us(u64::from(s.disk)))
                            .filter(|_| u64::from(s.disk) < nd);
                        let ok = d.is_some_and(|d| {
                            s.len > 0
                                && s.start >= d.data_start
                                && s.start.checked_add(s.len).is_some_and(|e| e <= d.blocks)
                        });
                        if !ok {
                            return Err(format!("volume {}: segment outside its disk", v.name));
                        }
                    }
                }
            }
            if l.capacity() < v.size {
                return Err(format!("volume {}: layout smaller than the volume", v.name));
            }
            Ok(())
        };
        match &v.kind {
            VolKind::Thick {
                layout,
                relayout,
                fill,
            } => {
                check_layout(layout)?;
                if let Some(r) = relayout {
                    check_layout(&r.target)?;
                    if r.done > v.size {
                        return Err(format!(
                            "volume {}: relayout checkpoint past the end",
                            v.name
                        ));
                    }
                }
                if let Some(f) = fill
                    && (find(f.origin).is_none() || f.copied.len() != nreg)
                {
                    return Err(format!("volume {}: bad snapshot fill state", v.name));
                }
                for l in layouts(v) {
                    for s in l.segments() {
                        per_disk.entry(s.disk).or_default().push((s.start, s.len));
                    }
                }
            }
            VolKind::ThinPool { data, chunk_blocks } => {
                let ok = find(*data)
                    .is_some_and(|d| d.internal && matches!(d.kind, VolKind::Thick { .. }));
                if !ok || *chunk_blocks == 0 || *chunk_blocks > 4096 {
                    return Err(format!(
                        "thin pool {}: bad data volume or chunk size",
                        v.name
                    ));
                }
            }
            VolKind::Thin { pool, map, origin } => {
                if let Some(o) = origin
                    && !find(*o).is_some_and(|o| {
                        matches!(o.kind, VolKind::Thick { .. }) && o.size >= v.size
                    })
                {
                    return Err(format!("snapshot {}: origin missing or smaller", v.name));
                }
                let Some(p) = find(*pool) else {
                    return Err(format!("thin volume {}: no pool", v.name));
                };
                let VolKind::ThinPool { data, chunk_blocks } = p.kind else {
                    return Err(format!("thin volume {}: pool is not a thin pool", v.name));
                };
                let cb = u64::from(chunk_blocks);
                let nchunks = find(data).map_or(0, |d| d.size / cb);
                let vchunks = v.size.div_ceil(cb);
                if map
                    .iter()
                    .any(|(k, p)| *k >= vchunks || u64::from(*p) >= nchunks)
                {
                    return Err(format!(
                        "thin volume {}: mapping outside pool or volume",
                        v.name
                    ));
                }
            }
        }
        if let Some(t) = &v.tracking
            && (find(t.peer).is_none() || t.changed.len() != nreg)
        {
            return Err(format!("volume {}: bad change tracking", v.name));
        }
    }
    for (disk, mut segs) in per_disk {
        segs.sort_unstable();
        for w in segs.windows(2) {
            if w[0].0 + w[0].1 > w[1].0 {
                return Err(format!("overlapping extents on disk #{disk}"));
            }
        }
    }
    Ok(())
}

struct DiskFound {
    label: Label,
    dev: Box<dyn BlockDevice>,
    best: Option<(u64, u32, Vec<u8>)>,
    copies_at_best: usize,
}

impl Pool {
    // ---------------------------------------------------------------------------------------
    // Creation and opening.

    /// Writes labels and a first metadata record on `disks`, making a new pool.
    pub fn create(
        disks: Vec<(Box<dyn BlockDevice>, DiskSpec)>,
        cfg: PoolConfig,
    ) -> Result<Pool, Error> {
        if disks.is_empty() {
            return Err(Error::InvalidArgument(
                "a pool needs at least one disk".into(),
            ));
        }
        if cfg.extent_blocks == 0 || cfg.md_blocks < 2 || cfg.drl_blocks == 0 {
            return Err(Error::InvalidArgument(
                "extent, metadata and log sizes must be positive".into(),
            ));
        }
        let data_start = Label::data_start_for(cfg.md_blocks, cfg.drl_blocks, cfg.extent_blocks);
        let mut names = BTreeSet::new();
        for (d, spec) in &disks {
            check_name(&spec.name)?;
            check_name(&spec.tier)?;
            if !names.insert(spec.name.clone()) {
                return Err(Error::InvalidArgument(format!(
                    "disk name '{}' given twice",
                    spec.name
                )));
            }
            if d.num_blocks() < data_start + u64::from(cfg.extent_blocks) {
                return Err(Error::InvalidArgument(format!(
                    "disk '{}' has {} blocks; at least {} are needed",
                    spec.name,
                    d.num_blocks(),
                    data_start + u64::from(cfg.extent_blocks)
                )));
            }
        }
        let mut meta = PoolMeta {
            pool_id: cfg.pool_id,
            seq: 0,
            extent_blocks: cfg.extent_blocks,
            md_blocks: cfg.md_blocks,
            drl_blocks: cfg.drl_blocks,
            next_vol: 1,
            disks: Vec::new(),
            volumes: Vec::new(),
        };
        let mut devs = Vec::new();
        for (i, (mut d, spec)) in disks.into_iter().enumerate() {
            let label = Label {
                pool_id: cfg.pool_id,
                disk_index: u32::try_from(i).unwrap_or(u32::MAX),
                md_blocks: cfg.md_blocks,
                drl_blocks: cfg.drl_blocks,
                data_start,
                extent_blocks: cfg.extent_blocks,
            };
            label.write(&mut *d).map_err(|err| Error::Device {
                disk: spec.name.clone(),
                err,
            })?;
            meta.disks.push(DiskMeta {
                name: spec.name,
                tier: spec.tier,
                blocks: d.num_blocks(),
                data_start,
                state: DiskState::Active,
            });
            devs.push(Some(d));
        }
        let mut pool = Pool::assemble(meta.clone(), meta, devs, false);
        pool.commit()?;
        pool.drl_write(true)?;
        Ok(pool)
    }

    fn assemble(
        meta: PoolMeta,
        committed: PoolMeta,
        devs: Vec<Option<Box<dyn BlockDevice>>>,
        read_only: bool,
    ) -> Pool {
        let mut p = Pool {
            meta,
            committed,
            devs,
            dirty: false,
            drl_seq: 0,
            drl: BTreeMap::new(),
            drl_bits: false,
            thin: BTreeMap::new(),
            dependents: BTreeSet::new(),
            fast: Vec::new(),
            read_only,
            events: Vec::new(),
        };
        p.rebuild_thin();
        p.recompute_dependents();
        p
    }

    fn recompute_dependents(&mut self) {
        self.recompute_fast();
        self.dependents.clear();
        for v in &self.meta.volumes {
            match &v.kind {
                VolKind::Thick { fill: Some(f), .. } => {
                    self.dependents.insert(f.origin);
                    self.dependents.insert(v.id);
                }
                VolKind::Thin {
                    origin: Some(o), ..
                } => {
                    self.dependents.insert(*o);
                }
                _ => {}
            }
        }
    }

    /// Rebuilds the direct mappings; called whenever layouts, states or dependents may change.
    fn recompute_fast(&mut self) {
        self.fast.clear();
        let mut deps = BTreeSet::new();
        for v in &self.meta.volumes {
            match &v.kind {
                VolKind::Thick { fill: Some(f), .. } => {
                    deps.insert(f.origin);
                }
                VolKind::Thin {
                    origin: Some(o), ..
                } => {
                    deps.insert(*o);
                }
                _ => {}
            }
        }
        for v in &self.meta.volumes {
            let VolKind::Thick {
                layout,
                relayout: None,
                fill: None,
            } = &v.kind
            else {
                continue;
            };
            if v.tracking.is_some() || deps.contains(&v.id) || layout.legs.len() != 1 {
                continue;
            }
            let [col] = layout.legs[0].columns.as_slice() else {
                continue;
            };
            let [seg] = col.segs.as_slice() else { continue };
            if col.state != SyncState::InSync || seg.len < v.size {
                continue;
            }
            let id = us(u64::from(v.id));
            if self.fast.len() <= id {
                self.fast.resize(id + 1, None);
            }
            self.fast[id] = Some(FastMap {
                disk: us(u64::from(seg.disk)),
                start: seg.start,
                size: v.size,
            });
        }
    }

    /// Opens a pool from its devices (any order; several paths to one disk are grouped),
    /// picks the newest valid metadata, refuses split brain, marks missing disks, takes back
    /// returning ones, replays the dirty-region log and repairs stale metadata copies.
    pub fn open(
        devs: Vec<Box<dyn BlockDevice>>,
        opts: OpenOptions,
    ) -> Result<(Pool, OpenReport), Error> {
        let mut report = OpenReport::default();
        let mut by_index: BTreeMap<u32, (Label, Vec<Box<dyn BlockDevice>>)> = BTreeMap::new();
        let mut pool_id = None;
        for (i, mut d) in devs.into_iter().enumerate() {
            let label = Label::read(&mut *d)
                .map_err(|err| Error::Device {
                    disk: format!("device #{i}"),
                    err,
                })?
                .ok_or(Error::NotAPoolDisk(i))?;
            match pool_id {
                None => pool_id = Some(label.pool_id),
                Some(p) if p != label.pool_id => return Err(Error::MixedPools(p, label.pool_id)),
                Some(_) => {}
            }
            let e = by_index
                .entry(label.disk_index)
                .or_insert_with(|| (label, Vec::new()));
            if e.0 != label {
                return Err(Error::Corrupt(format!(
                    "two devices claim disk #{} with different labels",
                    label.disk_index
                )));
            }
            e.1.push(d);
        }
        let Some(pool_id) = pool_id else {
            return Err(Error::InvalidArgument("no devices given".into()));
        };
        let mut found: BTreeMap<u32, DiskFound> = BTreeMap::new();
        for (idx, (label, mut paths)) in by_index {
            let dev: Box<dyn BlockDevice> = if paths.len() == 1 {
                paths.pop().ok_or(Error::NoValidMetadata)?
            } else {
                report.notes.push(format!(
                    "disk #{idx}: {} paths, policy {:?}",
                    paths.len(),
                    opts.path_policy
                ));
                Box::new(MultipathDisk::new(
                    paths.into_iter().map(|p| (p, 1)).collect(),
                    opts.path_policy,
                ))
            };
            let mut f = DiskFound {
                label,
                dev,
                best: None,
                copies_at_best: 0,
            };
            for slot in 0..2 {
                let rec = read_record(
                    &mut *f.dev,
                    label.md_slot(slot),
                    label.md_blocks,
                    MD_MAGIC,
                    pool_id,
                )
                .map_err(|err| Error::Device {
                    disk: format!("#{idx}"),
                    err,
                })?;
                let Some((seq, payload)) = rec else { continue };
                let Ok(m) = PoolMeta::decode(&payload) else {
                    continue;
                };
                if m.seq != seq || validate_meta(&m).is_err() {
                    continue;
                }
                let crc = crc32fast::hash(&payload);
                match &f.best {
                    Some((s, _, _)) if *s > seq => {}
                    Some((s, _, _)) if *s == seq => f.copies_at_best += 1,
                    _ => {
                        f.best = Some((seq, crc, payload));
                        f.copies_at_best = 1;
                    }
                }
            }
            found.insert(idx, f);
        }
        let (widx, (wseq, wcrc, wpayload)) = found
            .iter()
            .filter_map(|(i, f)| f.best.as_ref().map(|b| (*i, b.clone())))
            .max_by_key(|(_, b)| b.0)
            .ok_or(Error::NoValidMetadata)?;
        let mut meta = PoolMeta::decode(&wpayload)?;
        for (i, f) in &found {
            let Some((seq, crc, _)) = &f.best else {
                continue;
            };
            if *seq == wseq && *crc != wcrc {
                return Err(Error::SplitBrain(format!(
                    "disks #{widx} and #{i} both carry metadata sequence {wseq} with different contents; \
                     the pool was changed in two halves. Open each half alone and keep one."
                )));
            }
            if let Some(DiskState::Missing { since }) =
                meta.disks.get(us(u64::from(*i))).map(|d| d.state)
                && *seq >= since
            {
                return Err(Error::SplitBrain(format!(
                    "disk '{}' was declared missing at metadata sequence {since}, but carries sequence {seq} \
                     written while apart from disk #{widx}; the pool was changed in two halves. \
                     Open each half alone and keep one.",
                    meta.disks[us(u64::from(*i))].name
                )));
            }
        }
        let mut devs: Vec<Option<Box<dyn BlockDevice>>> =
            (0..meta.disks.len()).map(|_| None).collect();
        let mut stale_images = Vec::new();
        let commit_complete = found
            .values()
            .any(|f| f.copies_at_best >= 2 && f.best.as_ref().is_some_and(|b| b.0 == wseq));
        let mut repair = false;
        for (i, f) in found {
            let Some(slot) = devs.get_mut(us(u64::from(i))) else {
                report.notes.push(format!(
                    "ignored disk #{i}: labelled for this pool but not in its metadata"
                ));
                continue;
            };
            let dm = &meta.disks[us(u64::from(i))];
            if dm.data_start != f.label.data_start
                || meta.md_blocks != f.label.md_blocks
                || meta.drl_blocks != f.label.drl_blocks
                || meta.extent_blocks != f.label.extent_blocks
            {
                return Err(Error::Corrupt(format!(
                    "disk #{i}: label and metadata disagree on the on-disk areas"
                )));
            }
            if f.dev.num_blocks() < dm.blocks {
                return Err(Error::Corrupt(format!(
                    "disk '{}' has {} blocks but the pool recorded {}; was the image truncated?",
                    dm.name,
                    f.dev.num_blocks(),
                    dm.blocks
                )));
            }
            let seq = f.best.as_ref().map(|b| b.0);
            // A disk that missed a commit it should have seen, without being declared missing,
            // is an old image of itself and its data is stale too. A crash can leave a disk one
            // commit behind only while the newest commit is in its first phase (slot A), that
            // is while no disk holds it in both slots.
            if seq.is_none_or(|s| s + 1 < wseq || (commit_complete && s < wseq))
                && meta.disks[us(u64::from(i))].state == DiskState::Active
            {
                stale_images.push(i);
            }
            if seq != Some(wseq) || f.copies_at_best < 2 {
                repair = true;
                let verb = if opts.read_only {
                    "needs rewriting"
                } else {
                    "rewritten"
                };
                if seq != Some(wseq) {
                    report.notes.push(format!(
                        "disk '{}': stale metadata (sequence {}) {verb} with sequence {wseq}",
                        meta.disks[us(u64::from(i))].name,
                        seq.map_or_else(|| "none".to_string(), |s| s.to_string())
                    ));
                } else {
                    report.notes.push(format!(
                        "disk '{}': one of its two metadata copies is damaged or old; {verb}",
                        meta.disks[us(u64::from(i))].name
                    ));
                }
            }
            *slot = Some(f.dev);
        }
        meta.seq = wseq;
        let committed = meta.clone();
        let mut pool = Pool::assemble(meta, committed, devs, opts.read_only);
        // Disks that went or came back.
        for i in 0..pool.meta.disks.len() {
            let present = pool.devs[i].is_some();
            match (present, pool.meta.disks[i].state) {
                (true, DiskState::Missing { .. }) => {
                    pool.meta.disks[i].state = DiskState::Active;
                    report.notes.push(format!(
                        "disk '{}' returned; only regions changed while it was away will be resynchronised",
                        pool.meta.disks[i].name
                    ));
                    repair = true;
                }
                (false, DiskState::Active) => {
                    report.notes.push(format!(
                        "disk '{}' is missing; its mirror legs are detached",
                        pool.meta.disks[i].name
                    ));
                    pool.mark_disk_missing(u32::try_from(i).unwrap_or(u32::MAX));
                    repair = true;
                }
                _ => {}
            }
        }
        for i in stale_images {
            report.notes.push(format!(
                "disk '{}' carries an old image of itself (metadata behind by more than one commit); \
                 its mirror legs are resynchronised in full",
                pool.meta.disks[us(u64::from(i))].name
            ));
            for v in &mut pool.meta.volumes {
                let n = v.nregions();
                for l in layouts_mut(v) {
                    for g in &mut l.legs {
                        for c in &mut g.columns {
                            if c.segs.iter().any(|s| s.disk == i) {
                                c.state = SyncState::Stale(Bitmap::full(n));
                            }
                        }
                    }
                }
            }
            repair = true;
        }
        // A column with no in-sync copy left takes the best it has: a present leg's data.
        for v in &mut pool.meta.volumes {
            let vname = v.name.clone();
            for l in layouts_mut(v) {
                for c in 0..l.ncols() {
                    if l.legs
                        .iter()
                        .any(|g| g.columns[c].state == SyncState::InSync)
                    {
                        continue;
                    }
                    // The present copy with the fewest stale regions is the best one left.
                    let stale = |g: &Leg| match &g.columns[c].state {
                        SyncState::Stale(b) => b.count(),
                        SyncState::InSync => 0,
                    };
                    if let Some(g) = l
                        .legs
                        .iter_mut()
                        .filter(|g| col_present(&pool.devs, &g.columns[c].segs))
                        .min_by_key(|g| stale(g))
                    {
                        g.columns[c].state = SyncState::InSync;
                        report.notes.push(format!(
                            "volume {vname}: column {c} had no in-sync copy; serving the returned disk's data"
                        ));
                        repair = true;
                    }
                }
            }
        }
        // The dirty-region log.
        let mut best: Option<(u64, Vec<u8>)> = None;
        for (i, d) in pool.devs.iter_mut().enumerate() {
            let Some(dev) = d else { continue };
            let start = Label::data_start_for(
                pool.meta.md_blocks,
                pool.meta.drl_blocks,
                pool.meta.extent_blocks,
            );
            let _ = start;
            let label = Label {
                pool_id,
                disk_index: u32::try_from(i).unwrap_or(0),
                md_blocks: pool.meta.md_blocks,
                drl_blocks: pool.meta.drl_blocks,
                data_start: 0,
                extent_blocks: pool.meta.extent_blocks,
            };
            for slot in 0..2 {
                if let Ok(Some((seq, payload))) = read_record(
                    &mut **dev,
                    label.drl_slot(slot),
                    pool.meta.drl_blocks,
                    DRL_MAGIC,
                    pool_id,
                ) && best.as_ref().is_none_or(|b| b.0 < seq)
                {
                    best = Some((seq, payload));
                }
            }
        }
        let mut dirty: Vec<(u32, Bitmap)> = Vec::new();
        let best_missing = best.is_none();
        match best.as_ref().map(|(s, p)| (s, DrlRecord::decode(p))) {
            Some((seq, Ok(rec))) => {
                pool.drl_seq = *seq;
                dirty = rec.entries;
            }
            _ => {
                report.notes.push(
                    "no valid dirty-region log: every mirror is resynchronised in full".into(),
                );
                pool.drl_seq = best.map_or(0, |b| b.0);
                for v in pool.meta.volumes.iter().filter(|v| needs_drl(v)) {
                    dirty.push((v.id, Bitmap::full(v.nregions())));
                }
            }
        }
        if !opts.read_only {
            let had_bits = dirty.iter().any(|(_, b)| !b.is_clear());
            for (vid, bm) in dirty {
                let n = pool.recover_regions(vid, &bm)?;
                report.drl_regions_recovered += n;
            }
            if repair || pool.dirty {
                pool.commit()?;
            }
            if had_bits || best_missing {
                // Resynchronised data first, then the cleared log.
                pool.flush_disks()?;
                pool.drl_write(false)?;
            }
        } else {
            report.drl_regions_recovered = dirty.iter().map(|(_, b)| b.count()).sum();
        }
        report.seq = pool.meta.seq;
        Ok((pool, report))
    }

    /// Resynchronises logged regions of volume `vid` after a crash.
    fn recover_regions(&mut self, vid: u32, bm: &Bitmap) -> Result<u64, Error> {
        let Some(vi) = self.meta.volumes.iter().position(|v| v.id == vid) else {
            return Ok(0);
        };
        let disks_meta = PoolMeta {
            volumes: Vec::new(),
            ..self.meta.clone()
        };
        let Pool { meta, devs, .. } = self;
        let v = &mut meta.volumes[vi];
        let rg = Regions::of(v);
        let size = v.size;
        let mut n = 0;
        for r in bm.ones().filter(|&r| r < rg.n) {
            n += 1;
            let (s, e) = (r * rg.rb, ((r + 1) * rg.rb).min(size));
            if let Some(t) = &mut v.tracking {
                t.changed.set(r);
            }
            for l in layouts_mut(v) {
                for g in &mut l.legs {
                    for c in &mut g.columns {
                        if let SyncState::Stale(b) = &mut c.state {
                            b.set(r);
                        }
                    }
                }
                layout_sync_range(l, devs, s, e)
                    .map_err(|(d, err)| dev_err(&disks_meta, d, err))?;
            }
        }
        if n > 0 {
            self.dirty = true;
        }
        Ok(n)
    }

    fn rebuild_thin(&mut self) {
        self.thin.clear();
        for p in &self.meta.volumes {
            let VolKind::ThinPool { data, chunk_blocks } = p.kind else {
                continue;
            };
            let size = self
                .meta
                .volumes
                .iter()
                .find(|v| v.id == data)
                .map_or(0, |v| v.size);
            let n = us(size / u64::from(chunk_blocks));
            let mut rt = ThinRt {
                refs: vec![0; n],
                crefs: vec![0; n],
                free: 0,
                hint: 0,
            };
            for (m, refs) in [(&self.meta, &mut rt.refs), (&self.committed, &mut rt.crefs)] {
                for v in &m.volumes {
                    if let VolKind::Thin { pool, map, .. } = &v.kind
                        && *pool == p.id
                    {
                        for c in map.values() {
                            if let Some(r) = refs.get_mut(us(u64::from(*c))) {
                                *r += 1;
                            }
                        }
                    }
                }
            }
            rt.free = u(rt
                .refs
                .iter()
                .zip(&rt.crefs)
                .filter(|(a, b)| **a == 0 && **b == 0)
                .count());
            self.thin.insert(p.id, rt);
        }
    }

    // ---------------------------------------------------------------------------------------
    // Commit, log, flush.

    fn present_active(&self) -> Vec<usize> {
        (0..self.devs.len())
            .filter(|&i| self.devs[i].is_some() && self.meta.disks[i].state == DiskState::Active)
            .collect()
    }

    fn commit(&mut self) -> Result<(), Error> {
        if self.read_only {
            return Err(Error::InvalidArgument("pool is open read-only".into()));
        }
        for _ in 0..=self.devs.len() {
            let targets = self.present_active();
            if targets.is_empty() {
                return Err(Error::NoValidMetadata);
            }
            self.meta.seq += 1;
            let payload = self.meta.encode();
            let cap = slot_capacity(self.meta.md_blocks);
            if payload.len() > cap {
                self.meta.seq -= 1;
                return Err(Error::MetadataFull {
                    needed: payload.len(),
                    capacity: cap,
                });
            }
            let rec = encode_record(MD_MAGIC, self.meta.pool_id, self.meta.seq, &payload);
            let mut failed = None;
            'phases: for slot in 0..2u64 {
                for &i in &targets {
                    let start = LABEL_BLOCKS + slot * u64::from(self.meta.md_blocks);
                    let dev = self.devs[i].as_mut().ok_or(Error::NoValidMetadata)?;
                    if dev.write(start, &rec).is_err() {
                        failed = Some(i);
                        break 'phases;
                    }
                }
                for &i in &targets {
                    let dev = self.devs[i].as_mut().ok_or(Error::NoValidMetadata)?;
                    if dev.flush().is_err() {
                        failed = Some(i);
                        break 'phases;
                    }
                }
            }
            if let Some(i) = failed {
                self.mark_disk_missing(u32::try_from(i).unwrap_or(u32::MAX));
                continue;
            }
            self.committed = self.meta.clone();
            self.dirty = false;
            self.recompute_dependents();
            for rt in self.thin.values_mut() {
                rt.crefs.clone_from(&rt.refs);
                rt.free = u(rt.refs.iter().filter(|r| **r == 0).count());
            }
            return Ok(());
        }
        Err(Error::NoValidMetadata)
    }

    fn drl_write(&mut self, flush: bool) -> Result<(), Error> {
        if self.read_only {
            return Ok(());
        }
        for _ in 0..=self.devs.len() {
            let targets = self.present_active();
            if targets.is_empty() {
                return Err(Error::NoValidMetadata);
            }
            self.drl_seq += 1;
            let rec = DrlRecord {
                entries: self.drl.iter().map(|(k, b)| (*k, b.clone())).collect(),
            };
            let payload = rec.encode();
            let cap = slot_capacity(self.meta.drl_blocks);
            if payload.len() > cap {
                return Err(Error::MetadataFull {
                    needed: payload.len(),
                    capacity: cap,
                });
            }
            let bytes = encode_record(DRL_MAGIC, self.meta.pool_id, self.drl_seq, &payload);
            let start = LABEL_BLOCKS
                + 2 * u64::from(self.meta.md_blocks)
                + (self.drl_seq % 2) * u64::from(self.meta.drl_blocks);
            let mut failed = None;
            for &i in &targets {
                let dev = self.devs[i].as_mut().ok_or(Error::NoValidMetadata)?;
                if dev.write(start, &bytes).is_err() || (flush && dev.flush().is_err()) {
                    failed = Some(i);
                    break;
                }
            }
            match failed {
                Some(i) => self.mark_disk_missing(u32::try_from(i).unwrap_or(u32::MAX)),
                None => {
                    self.drl_bits = !self.drl.is_empty();
                    return Ok(());
                }
            }
        }
        Err(Error::NoValidMetadata)
    }

    /// Logs regions `[r0, r1)` of `vid` as dirty (durably) unless they already are.
    fn drl_mark(&mut self, vid: u32, nregions: u64, r0: u64, r1: u64) -> Result<(), Error> {
        let bm = self.drl.entry(vid).or_insert_with(|| Bitmap::new(nregions));
        if bm.len() < nregions {
            bm.resize(nregions, false);
        }
        if bm.all_set(r0, r1) {
            return Ok(());
        }
        bm.set_range(r0, r1);
        self.drl_write(true)
    }

    /// Makes every acknowledged write durable and commits changed metadata.
    pub fn flush(&mut self) -> Result<(), Error> {
        if self.read_only {
            return Ok(());
        }
        self.flush_disks()?;
        if self.dirty {
            self.commit()?;
        }
        if self.drl_bits || !self.drl.is_empty() {
            self.drl.clear();
            self.drl_write(false)?;
        }
        self.recompute_fast();
        Ok(())
    }

    fn flush_disks(&mut self) -> Result<(), Error> {
        let mut any = false;
        for i in 0..self.devs.len() {
            let Some(d) = self.devs[i].as_mut() else {
                continue;
            };
            match d.flush() {
                Ok(()) => any = true,
                Err(_) => self.mark_disk_missing(u32::try_from(i).unwrap_or(u32::MAX)),
            }
        }
        if any {
            Ok(())
        } else {
            Err(Error::NoValidMetadata)
        }
    }

    /// Takes a disk out of service: every column on it becomes stale (covering everything
    /// written since the last flush), and the disk is marked missing from the next commit on.
    fn mark_disk_missing(&mut self, disk: u32) {
        let i = us(u64::from(disk));
        if i >= self.devs.len() {
            return;
        }
        self.devs[i] = None;
        self.fast.clear();
        if self.meta.disks[i].state == DiskState::Active {
            self.meta.disks[i].state = DiskState::Missing {
                since: self.meta.seq + 1,
            };
            self.events.push(format!(
                "disk '{}' failed or vanished; taken out of service",
                self.meta.disks[i].name
            ));
        }
        let drl = self.drl.clone();
        for v in &mut self.meta.volumes {
            let rg = Regions::of(v);
            let logged = drl.get(&v.id);
            for l in layouts_mut(v) {
                for g in &mut l.legs {
                    for c in &mut g.columns {
                        if c.segs.iter().any(|s| s.disk == disk) {
                            if c.state == SyncState::InSync {
                                c.state = SyncState::Stale(Bitmap::new(rg.n));
                            }
                            if let (SyncState::Stale(b), Some(lg)) = (&mut c.state, logged) {
                                b.union_with(lg);
                            }
                        }
                    }
                }
            }
        }
        self.dirty = true;
    }

    /// Records what an I/O found out; a lost disk or detached leg is committed at once so that
    /// the metadata on the remaining disks says so before anything else happens.
    fn after_io(&mut self, out: IoOutcome) -> Result<(), Error> {
        let lost = !out.gone.is_empty();
        for d in out.gone {
            self.mark_disk_missing(d);
        }
        if out.changed {
            self.dirty = true;
        }
        if out.detached {
            self.events
                .push("a mirror leg returned errors and was detached".into());
        }
        if out.detached || lost {
            self.flush()?;
        }
        Ok(())
    }

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
                    (what, u(map.len()) * cb, Vec::new())
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

    // ---------------------------------------------------------------------------------------
    // Space allocation.

    fn free_runs(&self, disk: u32, pending: &[Segment]) -> Vec<(u64, u64)> {
        let d = &self.meta.disks[us(u64::from(disk))];
        let eb = u64::from(self.meta.extent_blocks);
        let end = d.data_start + (d.blocks - d.data_start) / eb * eb;
        let mut used: Vec<(u64, u64)> = Vec::new();
        for m in [&self.meta, &self.committed] {
            for v in &m.volumes {
                for l in layouts(v) {
                    used.extend(
                        l.segments()
                            .filter(|s| s.disk == disk)
                            .map(|s| (s.start, s.len)),
                    );
                }
            }
        }
        used.extend(
            pending
                .iter()
                .filter(|s| s.disk == disk)
                .map(|s| (s.start, s.len)),
        );
        used.sort_unstable();
        let mut runs = Vec::new();
        let mut at = d.data_start;
        for (s, l) in used {
            if s > at {
                runs.push((at, s - at));
            }
            at = at.max(s + l);
        }
        if end > at {
            runs.push((at, end - at));
        }
        runs
    }

    fn eligible_disks(&self, tier: Option<&str>) -> Vec<u32> {
        self.present_active()
            .into_iter()
            .filter(|&i| tier.is_none_or(|t| self.meta.disks[i].tier == t))
            .map(|i| u32::try_from(i).unwrap_or(u32::MAX))
            .collect()
    }

    /// Allocates `len` blocks from `allowed` disks (one disk only if `single`), preferring to
    /// extend right after `after`.
    fn alloc_column(
        &self,
        len: u64,
        allowed: &[u32],
        single: bool,
        pending: &mut Vec<Segment>,
        after: Option<(u32, u64)>,
    ) -> Option<Vec<Segment>> {
        let mut free: Vec<(u32, u64)> = allowed
            .iter()
            .map(|&d| (d, self.free_runs(d, pending).iter().map(|r| r.1).sum()))
            .collect();
        free.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        if let Some((d, _)) = after
            && let Some(pos) = free.iter().position(|f| f.0 == d)
        {
            let f = free.remove(pos);
            free.insert(0, f);
        }
        if single {
            free.retain(|f| f.1 >= len);
            free.truncate(1);
        }
        let mut out: Vec<Segment> = Vec::new();
        let mut need = len;
        for (d, _) in free {
            let mut runs = self.free_runs(d, pending);
            if let Some((ad, end)) = after
                && ad == d
                && let Some(p) = runs.iter().position(|r| r.0 == end)
            {
                let r = runs.remove(p);
                runs.insert(0, r);
            }
            for (s, l) in runs {
                if need == 0 {
                    break;
                }
                let take = l.min(need);
                let seg = Segment {
                    disk: d,
                    start: s,
                    len: take,
                };
                pending.push(seg);
                match out.last_mut() {
                    Some(last) if last.disk == d && last.start + last.len == s => last.len += take,
                    _ => out.push(seg),
                }
                need -= take;
            }
            if need == 0 {
                break;
            }
        }
        (need == 0).then_some(out)
    }

    fn column_len_for(&self, size: u64, cols: usize, su: u32) -> u64 {
        let eb = u64::from(self.meta.extent_blocks);
        let su = u64::from(su);
        let m = if cols > 1 { su / gcd(su, eb) * eb } else { eb };
        round_up(size.div_ceil(u(cols)).max(1), m)
    }

    fn alloc_layout(
        &self,
        spec: LayoutSpec,
        size: u64,
        tier: Option<&str>,
        pending: &mut Vec<Segment>,
    ) -> Result<Layout, Error> {
        let (nlegs, cols, su) = spec.shape()?;
        let clen = self.column_len_for(size, cols, su);
        let eligible = self.eligible_disks(tier);
        let mut used = BTreeSet::new();
        let mut legs = Vec::new();
        for leg in 0..nlegs {
            let mut columns = Vec::new();
            for col in 0..cols {
                let allowed: Vec<u32> = eligible
                    .iter()
                    .copied()
                    .filter(|d| !used.contains(d))
                    .collect();
                let segs = self.alloc_column(clen, &allowed, cols > 1, pending, None).ok_or_else(|| {
                    Error::NoSpace(format!(
                        "{spec} of {size} blocks needs {clen} blocks for leg {leg} column {col} on a disk{} not used by \
                         another leg or column ({} eligible disks)",
                        tier.map_or(String::new(), |t| format!(" of tier '{t}'")),
                        eligible.len()
                    ))
                })?;
                used.extend(segs.iter().map(|s| s.disk));
                columns.push(Column {
                    segs,
                    state: SyncState::InSync,
                });
            }
            legs.push(Leg { columns });
        }
        Ok(Layout {
            stripe_unit: su,
            legs,
        })
    }

    fn region_blocks_for(size: u64) -> u32 {
        u32::try_from((size / 4096).next_power_of_two().clamp(16, 1 << 20)).unwrap_or(1 << 20)
    }

    // ---------------------------------------------------------------------------------------
    // Admin operations (each commits before returning).

    fn new_volume(
        &mut self,
        name: &str,
        size: u64,
        tier: Option<&str>,
        internal: bool,
        kind: VolKind,
    ) -> u32 {
        let id = self.meta.next_vol;
        self.meta.next_vol += 1;
        self.dirty = true;
        self.meta.volumes.push(VolMeta {
            id,
            name: name.to_string(),
            size,
            tier: tier.map(ToString::to_string),
            region_blocks: Self::region_blocks_for(size),
            internal,
            tracking: None,
            kind,
        });
        self.recompute_dependents();
        id
    }

    fn check_new_name(&self, name: &str) -> Result<(), Error> {
        check_name(name)?;
        if self.meta.volumes.iter().any(|v| v.name == name) {
            return Err(Error::VolumeExists(name.to_string()));
        }
        Ok(())
    }

    /// Start of an admin operation: direct mappings are dropped until the next commit or
    /// flush rebuilds them, so no I/O can take a shortcut through a layout being changed.
    fn begin_admin(&mut self) -> Result<(), Error> {
        self.writable()?;
        self.fast.clear();
        Ok(())
    }

    fn writable(&self) -> Result<(), Error> {
        if self.read_only {
            Err(Error::InvalidArgument("pool is open read-only".into()))
        } else {
            Ok(())
        }
    }

    /// Creates a thick volume of `size` blocks.
    pub fn create_volume(
        &mut self,
        name: &str,
        size: u64,
        spec: LayoutSpec,
        tier: Option<&str>,
    ) -> Result<u32, Error> {
        self.begin_admin()?;
        self.check_new_name(name)?;
        if size == 0 {
            return Err(Error::InvalidArgument(
                "volume size must be positive".into(),
            ));
        }
        let layout = self.alloc_layout(spec, size, tier, &mut Vec::new())?;
        let id = self.new_volume(
            name,
            size,
            tier,
            false,
            VolKind::Thick {
                layout,
                relayout: None,
                fill: None,
            },
        );
        self.flush()?;
        Ok(id)
    }

    /// Creates a thin pool of `size` blocks of data space, in chunks of `chunk_blocks`.
    pub fn create_thin_pool(
        &mut self,
        name: &str,
        size: u64,
        spec: LayoutSpec,
        tier: Option<&str>,
        chunk_blocks: u32,
    ) -> Result<u32, Error> {
        self.begin_admin()?;
        self.check_new_name(name)?;
        let dname = format!("{name}.tdata");
        self.check_new_name(&dname)?;
        if chunk_blocks == 0 || chunk_blocks > 4096 {
            return Err(Error::InvalidArgument(format!(
                "chunk of {chunk_blocks} blocks is not in 1..=4096"
            )));
        }
        let size = round_up(size.max(1), u64::from(chunk_blocks));
        let layout = self.alloc_layout(spec, size, tier, &mut Vec::new())?;
        let data = self.new_volume(
            &dname,
            size,
            tier,
            true,
            VolKind::Thick {
                layout,
                relayout: None,
                fill: None,
            },
        );
        let id = self.new_volume(
            name,
            size,
            tier,
            false,
            VolKind::ThinPool { data, chunk_blocks },
        );
        self.rebuild_thin();
        self.flush()?;
        Ok(id)
    }

    /// Creates a thin volume of virtual `size` blocks in thin pool `pool`.
    pub fn create_thin(&mut self, name: &str, pool: &str, size: u64) -> Result<u32, Error> {
        self.begin_admin()?;
        self.check_new_name(name)?;
        let pid = self.volume_id(pool)?;
        if !matches!(
            self.meta.volumes[self.vidx(pid)?].kind,
            VolKind::ThinPool { .. }
        ) {
            return Err(Error::InvalidArgument(format!(
                "'{pool}' is not a thin pool"
            )));
        }
        if size == 0 {
            return Err(Error::InvalidArgument(
                "volume size must be positive".into(),
            ));
        }
        let id = self.new_volume(
            name,
            size,
            None,
            false,
            VolKind::Thin {
                pool: pid,
                map: BTreeMap::new(),
                origin: None,
            },
        );
        self.flush()?;
        Ok(id)
    }

    /// Takes a snapshot of `origin` named `name`. Thin volumes get space-optimised snapshots
    /// (shared chunks); `Full` makes an independent thick copy with layout `spec`, filled in the
    /// background by [`Pool::fill_step`]. All snapshots are writable.
    pub fn snapshot(
        &mut self,
        origin: &str,
        name: &str,
        kind: SnapshotKind,
        spec: LayoutSpec,
        tier: Option<&str>,
    ) -> Result<u32, Error> {
        self.begin_admin()?;
        self.check_new_name(name)?;
        let oid = self.user_volume(origin)?;
        self.flush()?;
        let oi = self.vidx(oid)?;
        let o = &self.meta.volumes[oi];
        match (kind, &o.kind) {
            (SnapshotKind::SpaceOptimized, VolKind::Thin { pool, map, origin }) => {
                let (pool, map, size, origin) = (*pool, map.clone(), o.size, *origin);
                if let Some(rt) = self.thin.get_mut(&pool) {
                    for c in map.values() {
                        rt.refs[us(u64::from(*c))] += 1;
                    }
                }
                let id =
                    self.new_volume(name, size, None, false, VolKind::Thin { pool, map, origin });
                self.flush()?;
                Ok(id)
            }
            (SnapshotKind::SpaceOptimized, VolKind::Thick { .. }) => {
                Err(Error::InvalidArgument(format!(
                    "'{origin}' is thick: a space-optimised snapshot needs a thin pool to hold the chunks it \
                 copies (hvctl: --thin-pool POOL), or take a full snapshot"
                )))
            }
            (SnapshotKind::SpaceOptimized, _) => Err(Error::InvalidArgument(format!(
                "'{origin}' is not thin: space-optimised snapshots share chunks of a thin pool; take a full snapshot"
            ))),
            (SnapshotKind::Full, VolKind::ThinPool { .. }) => Err(Error::InvalidArgument(format!(
                "'{origin}' is a thin pool, not a volume"
            ))),
            (SnapshotKind::Full, _) => {
                let size = o.size;
                let tier = tier.map(ToString::to_string).or_else(|| o.tier.clone());
                let layout = self.alloc_layout(spec, size, tier.as_deref(), &mut Vec::new())?;
                let id = self.new_volume(
                    name,
                    size,
                    tier.as_deref(),
                    false,
                    VolKind::Thick {
                        layout,
                        relayout: None,
                        fill: None,
                    },
                );
                let vi = self.vidx(id)?;
                let n = self.meta.volumes[vi].nregions();
                if let VolKind::Thick { fill, .. } = &mut self.meta.volumes[vi].kind {
                    *fill = Some(Fill {
                        origin: oid,
                        copied: Bitmap::new(n),
                    });
                }
                self.recompute_dependents();
                self.flush()?;
                Ok(id)
            }
        }
    }

    /// Copies up to `max_regions` regions into full snapshots still filling; returns regions
    /// left to copy over all snapshots.
    pub fn fill_step(&mut self, max_regions: u64) -> Result<u64, Error> {
        let mut budget = max_regions;
        let ids: Vec<u32> = self
            .meta
            .volumes
            .iter()
            .filter(|v| matches!(&v.kind, VolKind::Thick { fill: Some(_), .. }))
            .map(|v| v.id)
            .collect();
        for id in ids {
            while budget > 0 {
                let vi = self.vidx(id)?;
                let v = &self.meta.volumes[vi];
                let VolKind::Thick { fill: Some(f), .. } = &v.kind else {
                    break;
                };
                let Some(r) = (0..f.copied.len()).find(|&r| !f.copied.get(r)) else {
                    break;
                };
                let rb = u64::from(v.region_blocks);
                self.fill_regions(id, r * rb, rb, false)?;
                budget -= 1;
            }
        }
        self.flush()?;
        Ok(self
            .meta
            .volumes
            .iter()
            .map(|v| match &v.kind {
                VolKind::Thick { fill: Some(f), .. } => f.copied.len() - f.copied.count(),
                _ => 0,
            })
            .sum())
    }

    /// Copies the regions of full snapshot `sid` covering `[vblock, vblock+n)` from its origin
    /// if not yet copied; commits when `commit` so the origin may then be overwritten.
    fn fill_regions(&mut self, sid: u32, vblock: u64, n: u64, commit: bool) -> Result<(), Error> {
        let si = self.vidx(sid)?;
        let v = &self.meta.volumes[si];
        let VolKind::Thick { fill: Some(f), .. } = &v.kind else {
            return Ok(());
        };
        let rg = Regions::of(v);
        let size = v.size;
        let origin = f.origin;
        if vblock >= size {
            return Ok(());
        }
        let (r0, r1) = rg.span(vblock, n.min(size - vblock));
        let todo: Vec<u64> = (r0..r1.min(rg.n)).filter(|&r| !f.copied.get(r)).collect();
        if todo.is_empty() {
            // Copied, but maybe not committed yet (a flush that failed): commit before the
            // origin may be overwritten.
            let committed = self.committed.volumes.iter().find(|c| c.id == sid).is_some_and(|c| {
                matches!(&c.kind, VolKind::Thick { fill: Some(cf), .. } if cf.copied.all_set(r0, r1.min(rg.n)))
                    || matches!(&c.kind, VolKind::Thick { fill: None, .. })
            });
            if commit && !committed {
                self.flush()?;
            }
            return Ok(());
        }
        for r in todo {
            let (s, e) = (r * rg.rb, ((r + 1) * rg.rb).min(size));
            let mut buf = vec![0u8; us(e - s) * BLOCK_SIZE];
            self.read(origin, s, &mut buf)?;
            self.thick_raw_write(sid, s, &buf)?;
            let si = self.vidx(sid)?;
            if let VolKind::Thick { fill: Some(f), .. } = &mut self.meta.volumes[si].kind {
                f.copied.set(r);
            }
        }
        let si = self.vidx(sid)?;
        if let VolKind::Thick { fill, .. } = &mut self.meta.volumes[si].kind
            && fill
                .as_ref()
                .is_some_and(|f| f.copied.count() == f.copied.len())
        {
            *fill = None;
        }
        self.dirty = true;
        if commit {
            self.flush()?;
        }
        Ok(())
    }

    /// Rolls `vol` back to the contents of `snap` (same size required).
    pub fn rollback(
        &mut self,
        vol: &str,
        snap: &str,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<(), Error> {
        self.begin_admin()?;
        let vid = self.user_volume(vol)?;
        let sid = self.user_volume(snap)?;
        let (vi, si) = (self.vidx(vid)?, self.vidx(sid)?);
        if vid == sid {
            return Err(Error::InvalidArgument(
                "a volume cannot be rolled back to itself".into(),
            ));
        }
        let size = self.meta.volumes[vi].size;
        if let (
            VolKind::Thin {
                pool: p1,
                origin: o1,
                ..
            },
            VolKind::Thin {
                pool: p2,
                map,
                origin: o2,
            },
        ) = (&self.meta.volumes[vi].kind, &self.meta.volumes[si].kind)
            && p1 == p2
            && o1 == o2
        {
            let (pool, newmap, ssize) = (*p2, map.clone(), self.meta.volumes[si].size);
            let rt = self
                .thin
                .get_mut(&pool)
                .ok_or_else(|| Error::Corrupt("thin pool runtime".into()))?;
            for c in newmap.values() {
                rt.refs[us(u64::from(*c))] += 1;
            }
            if let VolKind::Thin { map, .. } = &mut self.meta.volumes[vi].kind {
                let old = core::mem::replace(map, newmap);
                for c in old.values() {
                    rt.refs[us(u64::from(*c))] -= 1;
                }
            }
            self.meta.volumes[vi].size = ssize;
            self.dirty = true;
            self.flush()?;
            progress(size, size);
            return Ok(());
        }
        // A space-optimised snapshot of this very volume differs from it only in its mapped
        // chunks: copy those back and nothing else.
        if let VolKind::Thin {
            pool,
            map,
            origin: Some(o),
        } = &self.meta.volumes[si].kind
            && *o == vid
        {
            let (chunks, pool): (Vec<u64>, u32) = (map.keys().copied().collect(), *pool);
            let (_, cb, _) = self.thin_params(pool)?;
            let ssize = self.meta.volumes[si].size;
            let mut buf = vec![0u8; us(cb) * BLOCK_SIZE];
            for (k, vc) in chunks.iter().enumerate() {
                let start = vc * cb;
                let n = cb.min(ssize.saturating_sub(start));
                if n > 0 {
                    self.read(sid, start, sl_mut(&mut buf, 0, n))?;
                    self.write(vid, start, sl(&buf, 0, n))?;
                }
                progress(u(k) + 1, u(chunks.len()));
            }
            return self.flush();
        }
        if self.meta.volumes[si].size != size {
            return Err(Error::InvalidArgument(format!(
                "'{snap}' and '{vol}' differ in size; resize first"
            )));
        }
        self.copy_volume(sid, vid, &mut progress)?;
        self.flush()
    }

    fn copy_volume(
        &mut self,
        from: u32,
        to: u32,
        progress: &mut impl FnMut(u64, u64),
    ) -> Result<(), Error> {
        let size = self.volume_size(from)?.min(self.volume_size(to)?);
        let step = 256;
        let mut buf = vec![0u8; us(step) * BLOCK_SIZE];
        let mut b = 0;
        while b < size {
            let n = step.min(size - b);
            let piece = sl_mut(&mut buf, 0, n);
            self.read(from, b, piece)?;
            self.write(to, b, piece)?;
            b += n;
            progress(b, size);
        }
        Ok(())
    }

    /// Removes a volume (a thin pool only when empty).
    pub fn remove(&mut self, name: &str) -> Result<(), Error> {
        self.begin_admin()?;
        let id = self.user_volume(name)?;
        let vi = self.vidx(id)?;
        if let Some(v) = self.meta.volumes.iter().find(|v| match &v.kind {
            VolKind::Thick { fill: Some(f), .. } => f.origin == id,
            VolKind::Thin { pool, origin, .. } => *pool == id || *origin == Some(id),
            _ => false,
        }) {
            return Err(Error::Busy(format!(
                "'{}' depends on '{name}'; remove it or let it finish first",
                v.name
            )));
        }
        let v = self.meta.volumes.remove(vi);
        match v.kind {
            VolKind::Thin { pool, map, .. } => {
                if let Some(rt) = self.thin.get_mut(&pool) {
                    for c in map.values() {
                        rt.refs[us(u64::from(*c))] -= 1;
                    }
                }
            }
            VolKind::ThinPool { data, .. } => {
                let di = self.vidx(data)?;
                self.meta.volumes.remove(di);
                self.thin.remove(&id);
            }
            VolKind::Thick { .. } => {}
        }
        if let Some(t) = v.tracking
            && let Ok(pi) = self.vidx(t.peer)
        {
            self.meta.volumes[pi].tracking = None;
        }
        self.drl.remove(&id);
        self.dirty = true;
        self.flush()
    }

    /// Grows or shrinks a volume to `size` blocks. Shrinking discards the data past the end.
    pub fn resize(&mut self, name: &str, size: u64) -> Result<(), Error> {
        self.begin_admin()?;
        let id = self.user_volume(name)?;
        if size == 0 {
            return Err(Error::InvalidArgument(
                "volume size must be positive".into(),
            ));
        }
        self.flush()?;
        let vi = self.vidx(id)?;
        let v = &self.meta.volumes[vi];
        let old = v.size;
        if v.tracking.is_some() {
            return Err(Error::Busy(format!(
                "'{name}' tracks changes against a split leg; reattach or remove it first"
            )));
        }
        if self
            .meta
            .volumes
            .iter()
            .any(|s| matches!(&s.kind, VolKind::Thick { fill: Some(f), .. } if f.origin == id))
        {
            return Err(Error::Busy(format!(
                "a full snapshot of '{name}' is still filling"
            )));
        }
        let snap_of_thick = matches!(
            v.kind,
            VolKind::Thin {
                origin: Some(_),
                ..
            }
        );
        let has_so_snaps = self
            .meta
            .volumes
            .iter()
            .any(|s| matches!(&s.kind, VolKind::Thin { origin: Some(o), .. } if *o == id));
        if snap_of_thick || (has_so_snaps && size < old) {
            return Err(Error::Busy(format!(
                "'{name}' is, or has, a space-optimised snapshot of a thick volume; \
                 such a pair cannot shrink (and the snapshot cannot be resized)"
            )));
        }
        match v.kind.clone() {
            VolKind::ThinPool { data, chunk_blocks } => {
                if size < old {
                    return Err(Error::InvalidArgument("thin pools only grow".into()));
                }
                let size = round_up(size, u64::from(chunk_blocks));
                let dname = self.meta.volumes[self.vidx(data)?].name.clone();
                self.resize_thick(&dname, size)?;
                self.meta.volumes[vi].size = size;
                self.rebuild_thin();
            }
            VolKind::Thin { pool, map, .. } => {
                let cb = match self.meta.volumes[self.vidx(pool)?].kind {
                    VolKind::ThinPool { chunk_blocks, .. } => u64::from(chunk_blocks),
                    _ => 1,
                };
                // A partly kept last chunk: zero it past the new end first, so a later grow
                // reads zeroes. This may need a fresh chunk; if the pool is full the resize is
                // refused before anything changed.
                let end = old.min((size / cb + 1) * cb);
                if size < old
                    && !size.is_multiple_of(cb)
                    && map.contains_key(&(size / cb))
                    && end > size
                {
                    let zero = vec![0u8; us(end - size) * BLOCK_SIZE];
                    self.write(id, size, &zero)?;
                }
                let vi = self.vidx(id)?;
                if let VolKind::Thin { map, .. } = &mut self.meta.volumes[vi].kind {
                    let dropped = map.split_off(&size.div_ceil(cb));
                    if let Some(rt) = self.thin.get_mut(&pool) {
                        for c in dropped.values() {
                            rt.refs[us(u64::from(*c))] -= 1;
                        }
                    }
                }
                self.meta.volumes[vi].size = size;
                self.meta.volumes[vi].region_blocks = Self::region_blocks_for(size);
            }
            VolKind::Thick { .. } => self.resize_thick(name, size)?,
        }
        self.dirty = true;
        self.flush()
    }

    fn resize_thick(&mut self, name: &str, size: u64) -> Result<(), Error> {
        let id = self.volume_id(name)?;
        let vi = self.vidx(id)?;
        let v = &self.meta.volumes[vi];
        let VolKind::Thick {
            layout,
            relayout,
            fill,
        } = &v.kind
        else {
            return Err(Error::InvalidArgument(format!(
                "'{name}' is not a thick volume"
            )));
        };
        if relayout.is_some() || fill.is_some() {
            return Err(Error::Busy(format!(
                "'{name}' is being relaid out or filled; finish that first"
            )));
        }
        if layout.degraded() {
            return Err(Error::Busy(format!(
                "'{name}' has stale mirror regions; resynchronise before resizing"
            )));
        }
        let cols = layout.ncols();
        let new_clen = self.column_len_for(size, cols, layout.stripe_unit);
        let old_clen = layout.column_len();
        let mut newl = layout.clone();
        if new_clen > old_clen {
            let extra = new_clen - old_clen;
            let tier = v.tier.clone();
            let eligible = self.eligible_disks(tier.as_deref());
            let mut pending = Vec::new();
            let all: BTreeSet<u32> = layout.segments().map(|s| s.disk).collect();
            for g in 0..newl.legs.len() {
                for c in 0..cols {
                    let own: BTreeSet<u32> = newl.legs[g].columns[c]
                        .segs
                        .iter()
                        .map(|s| s.disk)
                        .collect();
                    let mut allowed: Vec<u32> = own
                        .iter()
                        .copied()
                        .filter(|d| eligible.contains(d))
                        .collect();
                    allowed.extend(eligible.iter().copied().filter(|d| !all.contains(d)));
                    let last = newl.legs[g].columns[c]
                        .segs
                        .last()
                        .map(|s| (s.disk, s.start + s.len));
                    let segs = self
                        .alloc_column(extra, &allowed, false, &mut pending, last)
                        .ok_or_else(|| {
                            Error::NoSpace(format!(
                                "growing '{name}' needs {extra} more blocks for leg {g} column {c}"
                            ))
                        })?;
                    let col = &mut newl.legs[g].columns[c];
                    for s in segs {
                        match col.segs.last_mut() {
                            Some(l) if l.disk == s.disk && l.start + l.len == s.start => {
                                l.len += s.len
                            }
                            _ => col.segs.push(s),
                        }
                    }
                }
            }
        } else if new_clen < old_clen {
            for g in &mut newl.legs {
                for c in &mut g.columns {
                    let mut keep = new_clen;
                    c.segs.retain_mut(|s| {
                        if keep == 0 {
                            return false;
                        }
                        s.len = s.len.min(keep);
                        keep -= s.len;
                        true
                    });
                }
            }
        }
        let v = &mut self.meta.volumes[vi];
        let old_size = v.size;
        v.size = size;
        // No region bitmap is live here (not degraded, tracked or filled, log flushed), so the
        // region size follows the new size and bitmaps stay small.
        v.region_blocks = Self::region_blocks_for(size);
        let n = v.nregions();
        let rg = Regions::of(v);
        for (gi, g) in newl.legs.iter_mut().enumerate() {
            for c in &mut g.columns {
                if let SyncState::Stale(b) = &mut c.state {
                    b.resize(n, true);
                }
                // Grown space holds whatever the extents held: legs past the first copy it
                // from the first by resync, so that the mirror reads the same from every leg.
                if gi > 0 && size > old_size {
                    if let SyncState::Stale(b) = &mut c.state {
                        b.resize(n, false);
                    }
                    mark_stale(c, rg, old_size, size - old_size);
                }
            }
        }
        v.kind = VolKind::Thick {
            layout: newl,
            relayout: None,
            fill: None,
        };
        if let Some(b) = self.drl.get_mut(&id) {
            b.resize(n, false);
        }
        self.dirty = true;
        Ok(())
    }

    /// Starts an online relayout of `name` to `spec` (optionally onto another tier). Data moves
    /// with [`Pool::relayout_step`]; the volume stays readable and writable, and a crash resumes
    /// from the committed checkpoint.
    pub fn start_relayout(
        &mut self,
        name: &str,
        spec: LayoutSpec,
        tier: Option<&str>,
    ) -> Result<(), Error> {
        self.begin_admin()?;
        let mut id = self.volume_id(name)?;
        // A thin pool (with every thin volume and snapshot in it) moves by its data volume.
        let pool_vi = self.vidx(id)?;
        if let VolKind::ThinPool { data, .. } = self.meta.volumes[pool_vi].kind {
            id = data;
            if let Some(t) = tier {
                self.meta.volumes[pool_vi].tier = Some(t.to_string());
            }
        }
        let vi = self.vidx(id)?;
        let v = &self.meta.volumes[vi];
        let VolKind::Thick { relayout, fill, .. } = &v.kind else {
            return Err(Error::InvalidArgument(format!(
                "'{name}' is not a thick volume"
            )));
        };
        if relayout.is_some() || fill.is_some() || v.tracking.is_some() {
            return Err(Error::Busy(format!(
                "'{name}' is already being relaid out, filled or tracked"
            )));
        }
        let size = v.size;
        let tier = tier.map(ToString::to_string).or_else(|| v.tier.clone());
        let target = self.alloc_layout(spec, size, tier.as_deref(), &mut Vec::new())?;
        let v = &mut self.meta.volumes[vi];
        v.tier = tier;
        if let VolKind::Thick { relayout, .. } = &mut v.kind {
            *relayout = Some(Relayout { target, done: 0 });
        }
        self.dirty = true;
        self.flush()
    }

    /// Moves up to `max_blocks` blocks of every relayout in progress; returns blocks left.
    pub fn relayout_step(&mut self, max_blocks: u64) -> Result<u64, Error> {
        let ids: Vec<u32> = self
            .meta
            .volumes
            .iter()
            .filter(|v| {
                matches!(
                    &v.kind,
                    VolKind::Thick {
                        relayout: Some(_),
                        ..
                    }
                )
            })
            .map(|v| v.id)
            .collect();
        let mut left = 0;
        for id in ids {
            let vi = self.vidx(id)?;
            let v = &self.meta.volumes[vi];
            let size = v.size;
            let nreg = v.nregions();
            let rg = Regions::of(v);
            let VolKind::Thick {
                relayout: Some(r), ..
            } = &v.kind
            else {
                continue;
            };
            let done = r.done;
            let n = max_blocks.min(size - done);
            if n > 0 {
                if needs_drl(v) {
                    let (r0, r1) = rg.span(done, n);
                    self.drl_mark(id, nreg, r0, r1)?;
                }
                let mut buf = vec![0u8; us(n) * BLOCK_SIZE];
                let mut out = IoOutcome::default();
                let Pool { meta, devs, .. } = self;
                let v = &mut meta.volumes[vi];
                let name = v.name.clone();
                if let VolKind::Thick {
                    layout,
                    relayout: Some(r),
                    ..
                } = &mut v.kind
                {
                    layout_read(layout, devs, done, &mut buf, rg, &mut out)
                        .map_err(|b| Error::NoCopy(name.clone(), b))?;
                    layout_write(&mut r.target, devs, done, &buf, rg, &mut out)
                        .map_err(|b| Error::NoCopy(name, b))?;
                }
                self.after_io(out)?;
                self.flush_disks()?;
            }
            let vi = self.vidx(id)?;
            if let VolKind::Thick {
                layout, relayout, ..
            } = &mut self.meta.volumes[vi].kind
            {
                let finished = relayout.as_mut().is_some_and(|r| {
                    r.done += n;
                    r.done >= size
                });
                if finished && let Some(r) = relayout.take() {
                    *layout = r.target;
                } else {
                    left += size - done - n;
                }
            }
            self.dirty = true;
            self.flush()?;
        }
        Ok(left)
    }

    /// Adds a mirror leg to `name`; it is filled by [`Pool::resync_step`].
    pub fn add_mirror_leg(&mut self, name: &str) -> Result<(), Error> {
        self.begin_admin()?;
        let name = &self.thick_behind(name)?;
        let id = self.volume_id(name)?;
        let vi = self.vidx(id)?;
        let v = &self.meta.volumes[vi];
        let VolKind::Thick {
            layout,
            relayout: None,
            fill: None,
        } = &v.kind
        else {
            return Err(Error::Busy(format!(
                "'{name}' is not a thick volume at rest"
            )));
        };
        if layout.legs.len() >= 3 {
            return Err(Error::InvalidArgument(format!(
                "'{name}' already has 3 legs"
            )));
        }
        let (cols, su, clen) = (layout.ncols(), layout.stripe_unit, layout.column_len());
        let used: BTreeSet<u32> = layout.segments().map(|s| s.disk).collect();
        let eligible: Vec<u32> = self
            .eligible_disks(v.tier.as_deref())
            .into_iter()
            .filter(|d| !used.contains(d))
            .collect();
        let n = v.nregions();
        let mut pending = Vec::new();
        let mut columns = Vec::new();
        let mut taken = BTreeSet::new();
        for c in 0..cols {
            let allowed: Vec<u32> = eligible
                .iter()
                .copied()
                .filter(|d| !taken.contains(d))
                .collect();
            let segs = self.alloc_column(clen, &allowed, cols > 1, &mut pending, None).ok_or_else(|| {
                Error::NoSpace(format!("a new leg for '{name}' needs {clen} blocks for column {c} on a disk not in another leg"))
            })?;
            taken.extend(segs.iter().map(|s| s.disk));
            columns.push(Column {
                segs,
                state: SyncState::Stale(Bitmap::full(n)),
            });
        }
        if let VolKind::Thick { layout, .. } = &mut self.meta.volumes[vi].kind {
            layout.stripe_unit = su;
            layout.legs.push(Leg { columns });
        }
        self.dirty = true;
        self.flush()
    }

    /// Removes mirror leg `leg` from `name` (another in-sync copy of each column must remain).
    pub fn remove_mirror_leg(&mut self, name: &str, leg: usize) -> Result<(), Error> {
        self.begin_admin()?;
        let name = &self.thick_behind(name)?;
        let _ = self.take_leg(name, leg)?;
        self.dirty = true;
        self.flush()
    }

    fn take_leg(&mut self, name: &str, leg: usize) -> Result<Leg, Error> {
        let id = self.volume_id(name)?;
        let vi = self.vidx(id)?;
        let VolKind::Thick {
            layout,
            relayout: None,
            ..
        } = &mut self.meta.volumes[vi].kind
        else {
            return Err(Error::Busy(format!(
                "'{name}' is not a thick volume at rest"
            )));
        };
        if leg >= layout.legs.len() || layout.legs.len() < 2 {
            return Err(Error::InvalidArgument(format!(
                "'{name}' has {} legs; cannot take leg {leg}",
                layout.legs.len()
            )));
        }
        for c in 0..layout.ncols() {
            if !layout
                .legs
                .iter()
                .enumerate()
                .any(|(g, l)| g != leg && l.columns[c].state == SyncState::InSync)
            {
                return Err(Error::Busy(format!(
                    "leg {leg} of '{name}' holds the only in-sync copy of column {c}"
                )));
            }
        }
        Ok(layout.legs.remove(leg))
    }

    /// Splits mirror leg `leg` off `name` as a new volume `new_name` (e.g. for backup). Both
    /// then track changed regions so that [`Pool::reattach`] copies only those.
    pub fn split_leg(&mut self, name: &str, leg: usize, new_name: &str) -> Result<u32, Error> {
        self.begin_admin()?;
        self.check_new_name(new_name)?;
        let id = self.user_volume(name)?;
        self.flush()?;
        {
            let VolKind::Thick { layout, .. } = &self.meta.volumes[self.vidx(id)?].kind else {
                return Err(Error::InvalidArgument(format!("'{name}' is not thick")));
            };
            if layout
                .legs
                .get(leg)
                .is_some_and(|g| g.columns.iter().any(|c| c.state != SyncState::InSync))
            {
                return Err(Error::Busy(format!("leg {leg} of '{name}' is not in sync")));
            }
        }
        if self.meta.volumes[self.vidx(id)?].tracking.is_some() {
            return Err(Error::Busy(format!("'{name}' already has a split leg")));
        }
        let g = self.take_leg(name, leg)?;
        let vi = self.vidx(id)?;
        let (size, tier, su, n) = {
            let v = &self.meta.volumes[vi];
            let su = match &v.kind {
                VolKind::Thick { layout, .. } => layout.stripe_unit,
                _ => 16,
            };
            (v.size, v.tier.clone(), su, v.nregions())
        };
        let sid = self.new_volume(
            new_name,
            size,
            tier.as_deref(),
            false,
            VolKind::Thick {
                layout: Layout {
                    stripe_unit: su,
                    legs: vec![g],
                },
                relayout: None,
                fill: None,
            },
        );
        let si = self.vidx(sid)?;
        self.meta.volumes[si].region_blocks = self.meta.volumes[vi].region_blocks;
        self.meta.volumes[si].tracking = Some(Tracking {
            peer: id,
            changed: Bitmap::new(n),
        });
        self.meta.volumes[vi].tracking = Some(Tracking {
            peer: sid,
            changed: Bitmap::new(n),
        });
        self.dirty = true;
        self.flush()?;
        Ok(sid)
    }

    /// Merges split leg `split` back into `name`; only regions changed on either side since
    /// the split are resynchronised (by [`Pool::resync_step`]).
    pub fn reattach(&mut self, name: &str, split: &str) -> Result<(), Error> {
        self.begin_admin()?;
        let id = self.user_volume(name)?;
        let sid = self.volume_id(split)?;
        let (vi, si) = (self.vidx(id)?, self.vidx(sid)?);
        let (v, s) = (&self.meta.volumes[vi], &self.meta.volumes[si]);
        let (Some(tv), Some(ts)) = (&v.tracking, &s.tracking) else {
            return Err(Error::InvalidArgument(format!(
                "'{split}' was not split from '{name}'"
            )));
        };
        if tv.peer != sid || ts.peer != id || v.size != s.size {
            return Err(Error::InvalidArgument(format!(
                "'{split}' was not split from '{name}' or was resized"
            )));
        }
        let mut changed = tv.changed.clone();
        changed.union_with(&ts.changed);
        let VolKind::Thick {
            layout: sl,
            relayout: None,
            fill: None,
        } = &s.kind
        else {
            return Err(Error::Busy(format!("'{split}' is busy")));
        };
        let mut leg = sl
            .legs
            .first()
            .cloned()
            .ok_or_else(|| Error::Corrupt("split volume without leg".into()))?;
        for c in &mut leg.columns {
            match &mut c.state {
                SyncState::Stale(b) => b.union_with(&changed),
                SyncState::InSync => c.state = SyncState::Stale(changed.clone()),
            }
        }
        let VolKind::Thick {
            layout,
            relayout: None,
            ..
        } = &mut self.meta.volumes[vi].kind
        else {
            return Err(Error::Busy(format!("'{name}' is busy")));
        };
        if layout.legs.len() >= 3 || layout.ncols() != leg.columns.len() {
            return Err(Error::InvalidArgument(format!(
                "'{split}' no longer fits '{name}'"
            )));
        }
        layout.legs.push(leg);
        self.meta.volumes[vi].tracking = None;
        self.meta.volumes.remove(si);
        self.drl.remove(&sid);
        self.dirty = true;
        self.flush()
    }

    /// Copies up to `max_regions` stale regions into legs whose disks are present; returns the
    /// stale regions left (including those on absent disks).
    pub fn resync_step(&mut self, max_regions: u64) -> Result<u64, Error> {
        self.begin_admin()?;
        let mut budget = max_regions;
        let mut copied = false;
        let Pool { meta, devs, .. } = self;
        let mut err = None;
        'vols: for vi in 0..meta.volumes.len() {
            let v = &meta.volumes[vi];
            let rg = Regions::of(v);
            let size = v.size;
            let nl = layouts(v).len();
            for li in 0..nl {
                let l = layouts_mut(&mut meta.volumes[vi]).swap_remove(li);
                for g in 0..l.legs.len() {
                    for c in 0..l.ncols() {
                        let SyncState::Stale(bm) = &l.legs[g].columns[c].state else {
                            continue;
                        };
                        if !col_present(devs, &l.legs[g].columns[c].segs) {
                            continue;
                        }
                        let has_source = (0..l.legs.len())
                            .any(|o| o != g && l.legs[o].columns[c].state == SyncState::InSync);
                        if !has_source {
                            continue;
                        }
                        let regions: Vec<u64> = bm.ones().take(us(budget)).collect();
                        for r in regions {
                            if let Err((d, e)) = layout_copy_region(l, devs, g, c, rg, size, r) {
                                err = Some((d, e));
                                break 'vols;
                            }
                            if let SyncState::Stale(bm) = &mut l.legs[g].columns[c].state {
                                bm.clear(r);
                            }
                            copied = true;
                            budget -= 1;
                        }
                        if let SyncState::Stale(bm) = &l.legs[g].columns[c].state
                            && bm.is_clear()
                        {
                            l.legs[g].columns[c].state = SyncState::InSync;
                        }
                        if budget == 0 {
                            break 'vols;
                        }
                    }
                }
            }
        }
        if let Some((d, e)) = err {
            // A vanished disk leaves service; a medium error is reported and retried later.
            // Regions copied before the failure keep their progress.
            if e == DevError::Gone {
                self.mark_disk_missing(d);
            }
            self.flush_disks()?;
            self.dirty = true;
            self.flush()?;
            return Err(dev_err(&self.meta, d, e));
        }
        if copied {
            // Data first, then the cleared bits.
            self.flush_disks()?;
            self.dirty = true;
            self.flush()?;
        }
        Ok(self.stale_regions())
    }

    /// Stale regions over all volumes and legs.
    #[must_use]
    pub fn stale_regions(&self) -> u64 {
        self.meta
            .volumes
            .iter()
            .flat_map(layouts)
            .flat_map(|l| l.legs.iter().flat_map(|g| &g.columns))
            .map(|c| match &c.state {
                SyncState::Stale(b) => b.count(),
                SyncState::InSync => 0,
            })
            .sum()
    }

    /// Runs resync, fills and relayouts until nothing is left that can progress.
    pub fn settle(&mut self, mut progress: impl FnMut(&str, u64)) -> Result<(), Error> {
        loop {
            let before = self.stale_regions();
            let left = self.resync_step(64)?;
            progress("resync regions left", left);
            if left == 0 || left == before {
                break;
            }
        }
        while self
            .fill_step(64)
            .inspect(|l| progress("snapshot fill regions left", *l))?
            > 0
        {}
        while self
            .relayout_step(1024)
            .inspect(|l| progress("relayout blocks left", *l))?
            > 0
        {}
        Ok(())
    }

    /// One bounded slice of background work for a running dom0: resync of stale regions,
    /// full-snapshot fill and relayout, each limited by `budget` (regions, or blocks for the
    /// relayout). Returns true while work remains that can make progress.
    pub fn background_step(&mut self, budget: u64) -> Result<bool, Error> {
        let before = self.stale_regions();
        let stale = self.resync_step(budget)?;
        let fill = self.fill_step(budget)?;
        let relayout = self.relayout_step(budget.saturating_mul(64))?;
        Ok((stale > 0 && stale < before) || fill > 0 || relayout > 0)
    }

    /// Adds a disk to the pool.
    pub fn add_disk(&mut self, mut dev: Box<dyn BlockDevice>, spec: DiskSpec) -> Result<(), Error> {
        self.begin_admin()?;
        check_name(&spec.name)?;
        check_name(&spec.tier)?;
        if self.meta.disks.iter().any(|d| d.name == spec.name) {
            return Err(Error::InvalidArgument(format!(
                "disk name '{}' already in the pool",
                spec.name
            )));
        }
        let data_start = Label::data_start_for(
            self.meta.md_blocks,
            self.meta.drl_blocks,
            self.meta.extent_blocks,
        );
        if dev.num_blocks() < data_start + u64::from(self.meta.extent_blocks) {
            return Err(Error::InvalidArgument(format!(
                "disk '{}' is too small",
                spec.name
            )));
        }
        let label = Label {
            pool_id: self.meta.pool_id,
            disk_index: u32::try_from(self.meta.disks.len()).unwrap_or(u32::MAX),
            md_blocks: self.meta.md_blocks,
            drl_blocks: self.meta.drl_blocks,
            data_start,
            extent_blocks: self.meta.extent_blocks,
        };
        label
            .write(&mut *dev)
            .and_then(|()| dev.flush())
            .map_err(|err| Error::Device {
                disk: spec.name.clone(),
                err,
            })?;
        self.meta.disks.push(DiskMeta {
            name: spec.name,
            tier: spec.tier,
            blocks: dev.num_blocks(),
            data_start,
            state: DiskState::Active,
        });
        self.devs.push(Some(dev));
        self.dirty = true;
        self.flush()
    }

    /// Checks metadata invariants and thin reference counts; returns problems found.
    #[must_use]
    pub fn check(&self) -> Vec<String> {
        let mut p = Vec::new();
        if let Err(e) = validate_meta(&self.meta) {
            p.push(e);
        }
        for (pid, rt) in &self.thin {
            let mut refs = vec![0u32; rt.refs.len()];
            for v in &self.meta.volumes {
                if let VolKind::Thin { pool, map, .. } = &v.kind
                    && pool == pid
                {
                    for c in map.values() {
                        if let Some(r) = refs.get_mut(us(u64::from(*c))) {
                            *r += 1;
                        }
                    }
                }
            }
            if refs != rt.refs {
                p.push(format!(
                    "thin pool #{pid}: reference counts disagree with mappings"
                ));
            }
        }
        p
    }

    /// Compares every in-sync mirror leg over the volume's blocks; returns mismatching places.
    pub fn verify_mirrors(&mut self) -> Result<Vec<String>, Error> {
        let mut bad = Vec::new();
        let disks_meta = PoolMeta {
            volumes: Vec::new(),
            ..self.meta.clone()
        };
        let Pool { meta, devs, .. } = self;
        for v in &meta.volumes {
            let ls = layouts(v);
            for (li, l) in ls.iter().enumerate() {
                // A relayout target holds data only below its checkpoint.
                let end = match (&v.kind, li) {
                    (
                        VolKind::Thick {
                            relayout: Some(r), ..
                        },
                        1,
                    ) => r.done,
                    _ => v.size,
                };
                let mut b = 0;
                while b < end {
                    let (c, cblock, run) = l.map(b, (end - b).min(64));
                    let legs: Vec<usize> = (0..l.legs.len())
                        .filter(|&g| l.legs[g].columns[c].state == SyncState::InSync)
                        .collect();
                    if legs.len() >= 2 {
                        let mut first = vec![0u8; us(run) * BLOCK_SIZE];
                        col_read(devs, &l.legs[legs[0]].columns[c].segs, cblock, &mut first)
                            .map_err(|(d, e)| dev_err(&disks_meta, d, e))?;
                        for &g in &legs[1..] {
                            let mut other = vec![0u8; us(run) * BLOCK_SIZE];
                            col_read(devs, &l.legs[g].columns[c].segs, cblock, &mut other)
                                .map_err(|(d, e)| dev_err(&disks_meta, d, e))?;
                            if other != first {
                                bad.push(format!(
                                    "volume {}: legs {} and {g} differ at block {b}",
                                    v.name, legs[0]
                                ));
                            }
                        }
                    }
                    b += run;
                }
            }
        }
        Ok(bad)
    }

    // ---------------------------------------------------------------------------------------
    // Volume I/O.

    /// Reads whole blocks of volume `id` at `block`.
    pub fn read(&mut self, id: u32, block: u64, buf: &mut [u8]) -> Result<(), Error> {
        if let Some(Some(f)) = self.fast.get(us(u64::from(id)))
            && buf.len().is_multiple_of(BLOCK_SIZE)
            && block
                .checked_add(u(buf.len() / BLOCK_SIZE))
                .is_some_and(|e| e <= f.size)
            && let Some(Some(dev)) = self.devs.get_mut(f.disk)
            && dev.read(f.start + block, buf).is_ok()
        {
            return Ok(());
        }
        let n = nblocks(buf)?;
        let vi = self.vidx(id)?;
        let v = &self.meta.volumes[vi];
        if block.checked_add(n).is_none_or(|e| e > v.size) {
            return Err(Error::OutOfRange(v.name.clone()));
        }
        if n == 0 {
            return Ok(());
        }
        match &v.kind {
            VolKind::Thick { fill: Some(f), .. } => {
                let (origin, rb) = (f.origin, u64::from(v.region_blocks));
                let mut done = 0;
                while done < n {
                    let b = block + done;
                    let run = (rb - b % rb).min(n - done);
                    let copied = match &self.meta.volumes[vi].kind {
                        VolKind::Thick { fill: Some(f), .. } => f.copied.get(b / rb),
                        _ => true,
                    };
                    if copied {
                        self.thick_raw_read(vi, b, sl_mut(buf, done, done + run))?;
                    } else {
                        self.read(origin, b, sl_mut(buf, done, done + run))?;
                    }
                    done += run;
                }
                Ok(())
            }
            VolKind::Thick { .. } => self.thick_raw_read(vi, block, buf),
            VolKind::ThinPool { .. } => Err(Error::InvalidArgument(format!(
                "'{}' is a thin pool, not a volume",
                v.name
            ))),
            VolKind::Thin { pool, .. } => {
                let pool = *pool;
                self.thin_read(vi, pool, block, buf)
            }
        }
    }

    fn thick_raw_read(&mut self, vi: usize, block: u64, buf: &mut [u8]) -> Result<(), Error> {
        // Fast path: one leg, one column, nothing moving (an error retries the general path).
        if let VolKind::Thick {
            layout,
            relayout: None,
            ..
        } = &self.meta.volumes[vi].kind
            && layout.legs.len() == 1
            && layout.legs[0].columns.len() == 1
            && layout.legs[0].columns[0].state == SyncState::InSync
            && col_read(&mut self.devs, &layout.legs[0].columns[0].segs, block, buf).is_ok()
        {
            return Ok(());
        }
        let n = u(buf.len() / BLOCK_SIZE);
        let mut out = IoOutcome::default();
        let Pool { meta, devs, .. } = self;
        let v = &mut meta.volumes[vi];
        let rg = Regions::of(v);
        let VolKind::Thick {
            layout, relayout, ..
        } = &mut v.kind
        else {
            return Ok(());
        };
        let split = relayout
            .as_ref()
            .map_or(0, |r| r.done)
            .clamp(block, block + n)
            - block;
        let mut res = Ok(());
        if split > 0
            && let Some(r) = relayout
        {
            res = layout_read(
                &mut r.target,
                devs,
                block,
                sl_mut(buf, 0, split),
                rg,
                &mut out,
            );
        }
        if res.is_ok() && split < n {
            res = layout_read(
                layout,
                devs,
                block + split,
                sl_mut(buf, split, n),
                rg,
                &mut out,
            );
        }
        if out.changed || !out.gone.is_empty() {
            self.after_io(out)?;
        }
        res.map_err(|b| Error::NoCopy(self.meta.volumes[vi].name.clone(), b))
    }

    fn thick_raw_write(&mut self, id: u32, block: u64, buf: &[u8]) -> Result<(), Error> {
        let vi = self.vidx(id)?;
        self.thick_raw_write_at(vi, block, buf)
    }

    fn thick_raw_write_at(&mut self, vi: usize, block: u64, buf: &[u8]) -> Result<(), Error> {
        let n = u(buf.len() / BLOCK_SIZE);
        let id = self.meta.volumes[vi].id;
        // Fast path: one leg, one column, no tracking, nothing moving.
        let v = &self.meta.volumes[vi];
        if let VolKind::Thick {
            layout,
            relayout: None,
            ..
        } = &v.kind
            && v.tracking.is_none()
            && layout.legs.len() == 1
            && layout.legs[0].columns.len() == 1
            && layout.legs[0].columns[0].state == SyncState::InSync
            && col_write(&mut self.devs, &layout.legs[0].columns[0].segs, block, buf).is_ok()
        {
            return Ok(());
        }
        let v = &self.meta.volumes[vi];
        let rg = Regions::of(v);
        if needs_drl(v) {
            let (r0, r1) = rg.span(block, n);
            self.drl_mark(id, rg.n, r0, r1)?;
        }
        let mut out = IoOutcome::default();
        let Pool { meta, devs, .. } = self;
        let v = &mut meta.volumes[vi];
        if let Some(t) = &mut v.tracking {
            let (r0, r1) = rg.span(block, n);
            out.changed |= t.changed.set_range(r0, r1);
        }
        let VolKind::Thick {
            layout, relayout, ..
        } = &mut v.kind
        else {
            return Ok(());
        };
        let split = relayout
            .as_ref()
            .map_or(0, |r| r.done)
            .clamp(block, block + n)
            - block;
        let mut res = Ok(());
        if split > 0
            && let Some(r) = relayout
        {
            res = layout_write(&mut r.target, devs, block, sl(buf, 0, split), rg, &mut out);
        }
        if res.is_ok() && split < n {
            res = layout_write(layout, devs, block + split, sl(buf, split, n), rg, &mut out);
        }
        if out.changed || !out.gone.is_empty() {
            self.after_io(out)?;
        }
        let vi = self.vidx(id)?;
        res.map_err(|b| Error::NoCopy(self.meta.volumes[vi].name.clone(), b))
    }

    /// Writes whole blocks of volume `id` at `block`. Durable after the next [`Pool::flush`].
    pub fn write(&mut self, id: u32, block: u64, buf: &[u8]) -> Result<(), Error> {
        if !self.read_only
            && let Some(Some(f)) = self.fast.get(us(u64::from(id)))
            && buf.len().is_multiple_of(BLOCK_SIZE)
            && block
                .checked_add(u(buf.len() / BLOCK_SIZE))
                .is_some_and(|e| e <= f.size)
            && let Some(Some(dev)) = self.devs.get_mut(f.disk)
            && dev.write(f.start + block, buf).is_ok()
        {
            return Ok(());
        }
        self.writable()?;
        let n = nblocks(buf)?;
        let vi = self.vidx(id)?;
        let v = &self.meta.volumes[vi];
        if block.checked_add(n).is_none_or(|e| e > v.size) {
            return Err(Error::OutOfRange(v.name.clone()));
        }
        if n == 0 {
            return Ok(());
        }
        // Volumes that must copy before this one is overwritten: a superset is kept in
        // `dependents` (recomputed at every commit), so the common case skips the scans.
        if !self.dependents.contains(&id) {
            return match &v.kind {
                VolKind::Thick { .. } => self.thick_raw_write_at(vi, block, buf),
                VolKind::ThinPool { .. } => Err(Error::InvalidArgument(
                    "a thin pool is not written directly".into(),
                )),
                VolKind::Thin { pool, .. } => {
                    let pool = *pool;
                    self.thin_write(vi, pool, block, buf)
                }
            };
        }
        // Full snapshots of this volume, and this volume if it is one, copy before overwrite.
        let mut fills: Vec<u32> = self
            .meta
            .volumes
            .iter()
            .filter(|s| matches!(&s.kind, VolKind::Thick { fill: Some(f), .. } if f.origin == id))
            .map(|s| s.id)
            .collect();
        if matches!(&v.kind, VolKind::Thick { fill: Some(_), .. }) {
            fills.push(id);
        }
        for s in fills {
            self.fill_regions(s, block, n, true)?;
        }
        let so: Vec<u32> = self
            .meta
            .volumes
            .iter()
            .filter(|s| matches!(&s.kind, VolKind::Thin { origin: Some(o), .. } if *o == id))
            .map(|s| s.id)
            .collect();
        if !so.is_empty() {
            self.copy_to_space_optimized(id, block, n, &so)?;
        }
        let vi = self.vidx(id)?;
        match &self.meta.volumes[vi].kind {
            VolKind::Thick { .. } => self.thick_raw_write(id, block, buf),
            VolKind::ThinPool { .. } => Err(Error::InvalidArgument(
                "a thin pool is not written directly".into(),
            )),
            VolKind::Thin { pool, .. } => {
                let pool = *pool;
                self.thin_write(vi, pool, block, buf)
            }
        }
    }

    fn thin_origin(&self, vi: usize) -> Option<u32> {
        match &self.meta.volumes[vi].kind {
            VolKind::Thin { origin, .. } => *origin,
            _ => None,
        }
    }

    /// Reads chunk `vc` of thick origin `o` (zeroes past its end) into `buf` (one chunk).
    fn read_origin_chunk(&mut self, o: u32, vc: u64, cb: u64, buf: &mut [u8]) -> Result<(), Error> {
        let osize = self.volume_size(o)?;
        let start = vc * cb;
        let n = cb.min(osize.saturating_sub(start));
        buf.fill(0);
        if n > 0 {
            self.read(o, start, sl_mut(buf, 0, n))?;
        }
        Ok(())
    }

    /// Before thick volume `origin` overwrites `[block, block+n)`, copies every chunk of it
    /// that a space-optimised snapshot in `snaps` still shares into the snapshot's thin pool
    /// (one copy per pool, shared by its snapshots), and commits. Refuses with
    /// [`Error::ThinPoolFull`] before anything changes when a pool lacks space.
    fn copy_to_space_optimized(
        &mut self,
        origin: u32,
        block: u64,
        n: u64,
        snaps: &[u32],
    ) -> Result<(), Error> {
        // (pool, virtual chunk) -> snapshots needing it.
        let mut todo: BTreeMap<(u32, u64), Vec<usize>> = BTreeMap::new();
        // A chunk the snapshot maps only since the last commit (its own recent write) must be
        // committed too: after a crash the snapshot would otherwise read the overwritten
        // origin there.
        let mut uncommitted = false;
        for &sid in snaps {
            let si = self.vidx(sid)?;
            let v = &self.meta.volumes[si];
            let VolKind::Thin { pool, map, .. } = &v.kind else {
                continue;
            };
            let (_, cb, _) = self.thin_params(*pool)?;
            let last = (block + n - 1).min(v.size.saturating_sub(1));
            if block >= v.size {
                continue;
            }
            let cmap = self
                .committed
                .volumes
                .iter()
                .find(|c| c.id == sid)
                .and_then(|c| match &c.kind {
                    VolKind::Thin { map, .. } => Some(map),
                    _ => None,
                });
            for vc in block / cb..=last / cb {
                if !map.contains_key(&vc) {
                    todo.entry((*pool, vc)).or_default().push(si);
                } else if cmap.is_none_or(|c| !c.contains_key(&vc)) {
                    uncommitted = true;
                }
            }
        }
        if todo.is_empty() {
            if uncommitted {
                self.flush()?;
            }
            return Ok(());
        }
        let mut per_pool: BTreeMap<u32, u64> = BTreeMap::new();
        for (pool, _) in todo.keys() {
            *per_pool.entry(*pool).or_default() += 1;
        }
        for (pool, need) in &per_pool {
            let rt = self
                .thin
                .get(pool)
                .ok_or_else(|| Error::Corrupt("thin pool runtime".into()))?;
            if *need > rt.free {
                let (_, _, pname) = self.thin_params(*pool)?;
                return Err(Error::ThinPoolFull {
                    pool: pname,
                    chunks: u(rt.refs.len()),
                });
            }
        }
        let _ = origin;
        for ((pool, vc), users) in todo {
            let (data, cb, pname) = self.thin_params(pool)?;
            let mut chunk = vec![0u8; us(cb) * BLOCK_SIZE];
            self.read_origin_chunk(origin, vc, cb, &mut chunk)?;
            let fresh = self.alloc_chunk(pool, &pname)?;
            self.thick_raw_write(data, u(fresh) * cb, &chunk)?;
            let fresh32 = u32::try_from(fresh).map_err(|_| Error::Corrupt("chunk index".into()))?;
            let rt = self
                .thin
                .get_mut(&pool)
                .ok_or_else(|| Error::Corrupt("thin pool runtime".into()))?;
            rt.refs[fresh] += u32::try_from(users.len()).unwrap_or(u32::MAX) - 1;
            for si in users {
                if let VolKind::Thin { map, .. } = &mut self.meta.volumes[si].kind {
                    map.insert(vc, fresh32);
                }
            }
        }
        self.dirty = true;
        // The copies and their mappings are durable before the origin is overwritten.
        self.flush()
    }

    /// Takes a free chunk of thin pool `pool` (reference count 1 on return).
    fn alloc_chunk(&mut self, pool: u32, pname: &str) -> Result<usize, Error> {
        let rt = self
            .thin
            .get_mut(&pool)
            .ok_or_else(|| Error::Corrupt("thin pool runtime".into()))?;
        let len = rt.refs.len();
        let fresh = (0..len)
            .map(|k| (rt.hint + k) % len)
            .find(|&i| rt.refs[i] == 0 && rt.crefs[i] == 0)
            .ok_or_else(|| Error::ThinPoolFull {
                pool: pname.to_string(),
                chunks: u(len),
            })?;
        rt.hint = fresh + 1;
        rt.refs[fresh] = 1;
        rt.free -= 1;
        Ok(fresh)
    }

    /// Takes a space-optimised snapshot of thick volume `origin`: chunks are copied into thin
    /// pool `thin_pool` only when the origin (or the snapshot) is first written there.
    pub fn snapshot_in_pool(
        &mut self,
        origin: &str,
        name: &str,
        thin_pool: &str,
    ) -> Result<u32, Error> {
        self.begin_admin()?;
        self.check_new_name(name)?;
        let oid = self.user_volume(origin)?;
        let pid = self.volume_id(thin_pool)?;
        let (o, p) = (
            &self.meta.volumes[self.vidx(oid)?],
            &self.meta.volumes[self.vidx(pid)?],
        );
        if !matches!(p.kind, VolKind::ThinPool { .. }) {
            return Err(Error::InvalidArgument(format!(
                "'{thin_pool}' is not a thin pool"
            )));
        }
        match &o.kind {
            VolKind::Thick {
                relayout: None,
                fill: None,
                ..
            } if !o.internal => {}
            VolKind::Thin { .. } => {
                return Err(Error::InvalidArgument(format!(
                    "'{origin}' is thin: its snapshots share its own pool; omit the pool"
                )));
            }
            _ => {
                return Err(Error::Busy(format!(
                    "'{origin}' is not a thick volume at rest"
                )));
            }
        }
        let size = o.size;
        self.flush()?;
        let id = self.new_volume(
            name,
            size,
            None,
            false,
            VolKind::Thin {
                pool: pid,
                map: BTreeMap::new(),
                origin: Some(oid),
            },
        );
        self.flush()?;
        Ok(id)
    }

    fn thin_params(&self, pool: u32) -> Result<(u32, u64, String), Error> {
        let p = &self.meta.volumes[self.vidx(pool)?];
        match p.kind {
            VolKind::ThinPool { data, chunk_blocks } => {
                Ok((data, u64::from(chunk_blocks), p.name.clone()))
            }
            _ => Err(Error::Corrupt(
                "thin volume's pool is not a thin pool".into(),
            )),
        }
    }

    fn thin_read(&mut self, vi: usize, pool: u32, block: u64, buf: &mut [u8]) -> Result<(), Error> {
        let (data, cb, _) = self.thin_params(pool)?;
        let n = u(buf.len() / BLOCK_SIZE);
        let mut done = 0;
        while done < n {
            let b = block + done;
            let run = (cb - b % cb).min(n - done);
            let (mapped, origin) = match &self.meta.volumes[vi].kind {
                VolKind::Thin { map, origin, .. } => (map.get(&(b / cb)).copied(), *origin),
                _ => (None, None),
            };
            let piece = sl_mut(buf, done, done + run);
            match (mapped, origin) {
                (Some(p), _) => {
                    let dvi = self.vidx(data)?;
                    self.thick_raw_read(dvi, u64::from(p) * cb + b % cb, piece)?;
                }
                (None, Some(o)) => self.read(o, b, piece)?,
                (None, None) => piece.fill(0),
            }
            done += run;
        }
        Ok(())
    }

    fn thin_write(&mut self, vi: usize, pool: u32, block: u64, buf: &[u8]) -> Result<(), Error> {
        let (data, cb, pname) = self.thin_params(pool)?;
        let id = self.meta.volumes[vi].id;
        let n = u(buf.len() / BLOCK_SIZE);
        // Fast path: an overwrite inside one chunk this volume owns alone.
        if block % cb + n <= cb
            && let VolKind::Thin { map, .. } = &self.meta.volumes[vi].kind
            && let Some(&m) = map.get(&(block / cb))
            && let Some(rt) = self.thin.get(&pool)
        {
            let i = us(u64::from(m));
            let committed_same = || {
                self.committed.volumes.iter().find(|v| v.id == id).is_some_and(|v| {
                    matches!(&v.kind, VolKind::Thin { map, .. } if map.get(&(block / cb)) == Some(&m))
                })
            };
            if rt.refs[i] == 1 && (rt.crefs[i] == 0 || (rt.crefs[i] == 1 && committed_same())) {
                return self.thick_raw_write(data, u64::from(m) * cb + block % cb, buf);
            }
        }
        // Plan: which chunks can be written in place, which need a fresh chunk.
        let mut plan = Vec::new();
        let mut need = 0u64;
        {
            let VolKind::Thin { map, .. } = &self.meta.volumes[vi].kind else {
                return Ok(());
            };
            let rt = self
                .thin
                .get(&pool)
                .ok_or_else(|| Error::Corrupt("thin pool runtime".into()))?;
            let cmap = self
                .committed
                .volumes
                .iter()
                .find(|v| v.id == id)
                .and_then(|v| match &v.kind {
                    VolKind::Thin { map, .. } => Some(map),
                    _ => None,
                });
            let mut done = 0;
            while done < n {
                let b = block + done;
                let run = (cb - b % cb).min(n - done);
                let vc = b / cb;
                let cur = map.get(&vc).copied();
                let in_place = cur.is_some_and(|m| {
                    let i = us(u64::from(m));
                    rt.refs[i] == 1
                        && (rt.crefs[i] == 0
                            || (rt.crefs[i] == 1 && cmap.and_then(|c| c.get(&vc)) == Some(&m)))
                });
                if !in_place {
                    need += 1;
                }
                plan.push((done, run, vc, cur, in_place));
                done += run;
            }
            if need > rt.free {
                return Err(Error::ThinPoolFull {
                    pool: pname,
                    chunks: u(rt.refs.len()),
                });
            }
        }
        for (done, run, vc, cur, in_place) in plan {
            let b = block + done;
            let piece = sl(buf, done, done + run);
            if in_place {
                let m = u64::from(cur.unwrap_or(0));
                self.thick_raw_write(data, m * cb + b % cb, piece)?;
                continue;
            }
            let rt = self
                .thin
                .get_mut(&pool)
                .ok_or_else(|| Error::Corrupt("thin pool runtime".into()))?;
            let len = rt.refs.len();
            let fresh = (0..len)
                .map(|k| (rt.hint + k) % len)
                .find(|&i| rt.refs[i] == 0 && rt.crefs[i] == 0)
                .ok_or_else(|| Error::ThinPoolFull {
                    pool: pname.clone(),
                    chunks: u(len),
                })?;
            rt.hint = fresh + 1;
            let mut chunk = vec![0u8; us(cb) * BLOCK_SIZE];
            if run < cb {
                match (cur, self.thin_origin(vi)) {
                    (Some(old), _) => self.read(data, u64::from(old) * cb, &mut chunk)?,
                    (None, Some(o)) => self.read_origin_chunk(o, vc, cb, &mut chunk)?,
                    (None, None) => {}
                }
            }
            let off = us(b % cb) * BLOCK_SIZE;
            chunk[off..off + piece.len()].copy_from_slice(piece);
            let fresh32 = u32::try_from(fresh).map_err(|_| Error::Corrupt("chunk index".into()))?;
            self.thick_raw_write(data, u(fresh) * cb, &chunk)?;
            let rt = self
                .thin
                .get_mut(&pool)
                .ok_or_else(|| Error::Corrupt("thin pool runtime".into()))?;
            rt.refs[fresh] += 1;
            rt.free -= 1;
            if let Some(old) = cur {
                rt.refs[us(u64::from(old))] -= 1;
            }
            if let VolKind::Thin { map, .. } = &mut self.meta.volumes[vi].kind {
                map.insert(vc, fresh32);
            }
            self.dirty = true;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at byte `offset` (any alignment).
    pub fn read_bytes(&mut self, id: u32, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        let bs = u(BLOCK_SIZE);
        if offset.is_multiple_of(bs) && buf.len().is_multiple_of(BLOCK_SIZE) {
            return self.read(id, offset / bs, buf);
        }
        let first = offset / bs;
        let last = (offset + u(buf.len())).div_ceil(bs);
        let mut tmp = vec![0u8; us(last - first) * BLOCK_SIZE];
        self.read(id, first, &mut tmp)?;
        let o = us(offset - first * bs);
        buf.copy_from_slice(&tmp[o..o + buf.len()]);
        Ok(())
    }

    /// Writes `buf` at byte `offset` (any alignment; partial blocks are read, merged, written).
    pub fn write_bytes(&mut self, id: u32, offset: u64, buf: &[u8]) -> Result<(), Error> {
        let bs = u(BLOCK_SIZE);
        if offset.is_multiple_of(bs) && buf.len().is_multiple_of(BLOCK_SIZE) {
            return self.write(id, offset / bs, buf);
        }
        let first = offset / bs;
        let last = (offset + u(buf.len())).div_ceil(bs);
        let mut tmp = vec![0u8; us(last - first) * BLOCK_SIZE];
        self.read(id, first, &mut tmp)?;
        let o = us(offset - first * bs);
        tmp[o..o + buf.len()].copy_from_slice(buf);
        self.write(id, first, &tmp)
    }

    /// Gives the devices back (after a final flush by the caller).
    #[must_use]
    pub fn into_devices(self) -> Vec<Option<Box<dyn BlockDevice>>> {
        self.devs
    }
}
