//! Thin mappings wherever they are: inline in the record (versions 1 and 2) or in B-trees in
//! each thin pool's metadata volume (version 3, [`crate::btree`]); per-pool reference counts;
//! the offline upgrade to version 3.

use super::*;
use crate::btree::{Builder, Forest, NodeIo, TreeError};
use crate::format::{MD_VERSION, ThinMap};

/// Node I/O through the metadata volumes' layouts. Outcomes (failed legs, vanished disks) are
/// collected and applied by the caller, never by a nested commit.
struct MdIo<'a> {
    vols: &'a mut Vec<VolMeta>,
    devs: &'a mut Vec<Option<Box<dyn BlockDevice>>>,
    out: IoOutcome,
}

/// The metadata volume `store`, checked to hold blocks `blk..blk + n`: its layout, the
/// relayout in progress if any (blocks below its `done` live in its target), its regions and
/// name, and how many of the blocks lie below `done`.
struct MdTarget<'v> {
    layout: &'v mut Layout,
    relayout: Option<&'v mut Layout>,
    rg: Regions,
    name: String,
    split: u64,
}

fn md_target<'v>(
    vols: &'v mut [VolMeta],
    store: u32,
    blk: u64,
    n: u64,
) -> Result<MdTarget<'v>, TreeError> {
    let v = vols
        .iter_mut()
        .find(|v| v.id == store)
        .ok_or_else(|| TreeError::Corrupt(format!("no metadata volume #{store}")))?;
    if blk.checked_add(n).is_none_or(|e| e > v.size) {
        return Err(TreeError::Corrupt(format!(
            "metadata node {blk} outside metadata volume {}",
            v.name
        )));
    }
    let rg = Regions::of(v);
    let name = v.name.clone();
    let VolKind::Thick {
        layout, relayout, ..
    } = &mut v.kind
    else {
        return Err(TreeError::Corrupt(format!(
            "{name} is not a metadata volume"
        )));
    };
    let split = relayout.as_ref().map_or(0, |r| r.done).clamp(blk, blk + n) - blk;
    Ok(MdTarget {
        layout,
        relayout: relayout.as_mut().map(|r| &mut r.target),
        rg,
        name,
        split,
    })
}

impl MdTarget<'_> {
    /// Runs `io` on the relayout target for the blocks below the split, then on the layout
    /// for the rest: `io(layout, first block, first and end block index within the request)`.
    /// A failed block becomes an error naming the volume.
    fn each(
        self,
        blk: u64,
        n: u64,
        mut io: impl FnMut(&mut Layout, u64, u64, u64) -> Result<(), u64>,
    ) -> Result<(), TreeError> {
        let split = self.split;
        let mut res = Ok(());
        if split > 0
            && let Some(target) = self.relayout
        {
            res = io(target, blk, 0, split);
        }
        if res.is_ok() && split < n {
            res = io(self.layout, blk + split, split, n);
        }
        res.map_err(|block| TreeError::Io {
            volume: self.name,
            block,
        })
    }
}

impl NodeIo for MdIo<'_> {
    fn read(&mut self, store: u32, blk: u64, buf: &mut [u8]) -> Result<(), TreeError> {
        let n = u(buf.len() / BLOCK_SIZE);
        let t = md_target(self.vols, store, blk, n)?;
        let (devs, out, rg) = (&mut *self.devs, &mut self.out, t.rg);
        t.each(blk, n, |layout, at, from, to| {
            layout_read(layout, devs, at, sl_mut(buf, from, to), rg, out)
        })
    }

    fn write(&mut self, store: u32, blk: u64, buf: &[u8]) -> Result<(), TreeError> {
        let n = u(buf.len() / BLOCK_SIZE);
        let t = md_target(self.vols, store, blk, n)?;
        let (devs, out, rg) = (&mut *self.devs, &mut self.out, t.rg);
        // No dirty-region log: a node is only ever written while no committed root reaches
        // it, so legs may differ only on blocks that nothing reads before rewriting them.
        t.each(blk, n, |layout, at, from, to| {
            layout_write(layout, devs, at, sl(buf, from, to), rg, out)
        })
    }
}

/// Reference counts of one thin pool's chunks, now and as of the last commit.
pub(super) struct ThinRt {
    pub(super) refs: Vec<u32>,
    /// Committed counts of the chunks changed since the last commit (the others are as in
    /// `refs`): the commit costs what changed, not the pool's size.
    cold: BTreeMap<usize, u32>,
    /// Chunks with no reference now nor in the last commit.
    pub(super) free: u64,
    pub(super) hint: usize,
}

impl ThinRt {
    pub(super) fn new(n: usize) -> Self {
        ThinRt {
            refs: vec![0; n],
            cold: BTreeMap::new(),
            free: u(n),
            hint: 0,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.refs.len()
    }

    /// References now.
    pub(super) fn get(&self, i: usize) -> Option<u32> {
        self.refs.get(i).copied()
    }

    /// References in the last commit.
    pub(super) fn committed(&self, i: usize) -> Option<u32> {
        self.cold.get(&i).copied().or_else(|| self.get(i))
    }

    pub(super) fn is_free(&self, i: usize) -> bool {
        self.get(i) == Some(0) && self.committed(i) == Some(0)
    }

    fn set(&mut self, i: usize, v: u32) {
        let Some(&cur) = self.refs.get(i) else {
            return;
        };
        let was = self.is_free(i);
        self.cold.entry(i).or_insert(cur);
        self.refs[i] = v;
        match (was, self.is_free(i)) {
            (true, false) => self.free -= 1,
            (false, true) => self.free += 1,
            _ => {}
        }
    }

    pub(super) fn add(&mut self, i: usize, n: u32) {
        if let Some(c) = self.get(i) {
            self.set(i, c.saturating_add(n));
        }
    }

    pub(super) fn dec(&mut self, i: usize) {
        if let Some(c) = self.get(i) {
            self.set(i, c.saturating_sub(1));
        }
    }

    /// The counts now are committed.
    pub(super) fn commit(&mut self) {
        for (i, c) in core::mem::take(&mut self.cold) {
            if self.refs[i] == 0 && c != 0 {
                self.free += 1;
            }
        }
    }

    pub(super) fn resize(&mut self, n: usize) {
        if n > self.refs.len() {
            self.free += u(n - self.refs.len());
            self.refs.resize(n, 0);
        }
    }

    /// Heap bytes held.
    pub(super) fn memory_bytes(&self) -> u64 {
        u(self.refs.capacity() * 4 + self.cold.len() * 24)
    }
}

/// Blocks of the metadata volume of a thin pool of `chunks` chunks: about 85 bytes per chunk
/// (a fully mapped volume needs 12 to 24), leaving room for snapshots' copies and for the
/// copies of a transaction, and at least 32 blocks.
#[must_use]
pub fn md_blocks_for(chunks: u64) -> u64 {
    32 + chunks / 48
}

impl Pool {
    /// Runs a tree operation with node I/O through the metadata volumes; what the I/O found
    /// (failed legs, vanished disks) is recorded, and committed by the next flush.
    fn forest<R>(
        &mut self,
        f: impl FnOnce(&mut Forest, &mut dyn NodeIo) -> Result<R, TreeError>,
    ) -> Result<R, Error> {
        let Pool {
            forest, meta, devs, ..
        } = self;
        let mut io = MdIo {
            vols: &mut meta.volumes,
            devs,
            out: IoOutcome::default(),
        };
        forest.set_seq(meta.seq + 1);
        let r = f(forest, &mut io);
        let out = io.out;
        for d in out.gone {
            self.mark_disk_missing(d);
        }
        if out.changed {
            self.dirty = true;
        }
        if out.detached {
            self.events.push(
                "a mirror leg of a thin pool's metadata volume returned errors and was detached"
                    .into(),
            );
            self.md_commit_soon = true;
        }
        r.map_err(|e| self.tree_error(e))
    }

    fn tree_error(&self, e: TreeError) -> Error {
        match e {
            TreeError::Corrupt(m) => Error::Corrupt(m),
            TreeError::Io { volume, block } => Error::NoCopy(volume, block),
            TreeError::Full { store, blocks } => Error::NoSpace(format!(
                "the metadata volume {} of its thin pool is full ({blocks} blocks); grow the \
                 thin pool (its metadata volume grows with it) or remove snapshots",
                self.vidx(store).map_or_else(
                    |_| format!("#{store}"),
                    |i| self.meta.volumes[i].name.clone()
                )
            )),
        }
    }

    /// Writes the dirty tree nodes (before the commit record `seq`).
    pub(super) fn write_nodes(&mut self, seq: u64) -> Result<u64, Error> {
        self.forest(|f, io| f.write_dirty(io, seq))
    }

    /// Commits at once when a metadata volume's leg was detached by node I/O.
    pub(super) fn md_settle(&mut self) -> Result<(), Error> {
        if core::mem::take(&mut self.md_commit_soon) {
            self.flush()?;
        }
        Ok(())
    }

    /// The metadata volume of thin pool `pool` (version 3).
    pub(super) fn md_store(&self, pool: u32) -> Result<u32, Error> {
        let p = &self.meta.volumes[self.vidx(pool)?];
        match p.kind {
            VolKind::ThinPool { md: Some(md), .. } => Ok(md),
            _ => Err(Error::Corrupt(format!(
                "thin pool {} has no metadata volume",
                p.name
            ))),
        }
    }

    /// An empty map of a new thin volume, in this pool's version.
    pub(super) fn empty_map(&self) -> ThinMap {
        if self.meta.version >= MD_VERSION {
            ThinMap::Tree { root: 0, count: 0 }
        } else {
            ThinMap::Inline(BTreeMap::new())
        }
    }

    /// The mapping of chunk `vc` of thin volume `vi`.
    pub(super) fn map_get(&mut self, vi: usize, vc: u64) -> Result<Option<u32>, Error> {
        match &self.meta.volumes[vi].kind {
            VolKind::Thin {
                map: ThinMap::Inline(m),
                ..
            } => Ok(m.get(&vc).copied()),
            VolKind::Thin {
                map: ThinMap::Tree { root, .. },
                pool,
                ..
            } => {
                let (root, store) = (*root, self.md_store(*pool)?);
                self.forest(|f, io| f.get(io, store, root, vc))
            }
            _ => Ok(None),
        }
    }

    /// The mapping of chunk `vc` of volume `id` in the last committed metadata.
    pub(super) fn cmap_get(&mut self, id: u32, vc: u64) -> Result<Option<u32>, Error> {
        let Some(c) = self.committed.volumes.iter().find(|v| v.id == id) else {
            return Ok(None);
        };
        match &c.kind {
            VolKind::Thin {
                map: ThinMap::Inline(m),
                ..
            } => Ok(m.get(&vc).copied()),
            VolKind::Thin {
                map: ThinMap::Tree { root, .. },
                pool,
                ..
            } => {
                let (root, pool) = (*root, *pool);
                let store = self.md_store(pool)?;
                self.forest(|f, io| f.get(io, store, root, vc))
            }
            _ => Ok(None),
        }
    }

    /// Maps chunk `vc` of thin volume `vi` to pool chunk `c`; returns the old mapping.
    /// Reference counts are the caller's.
    pub(super) fn map_insert(&mut self, vi: usize, vc: u64, c: u32) -> Result<Option<u32>, Error> {
        let (root, store) = match &mut self.meta.volumes[vi].kind {
            VolKind::Thin {
                map: ThinMap::Inline(m),
                ..
            } => return Ok(m.insert(vc, c)),
            VolKind::Thin {
                map: ThinMap::Tree { root, .. },
                pool,
                ..
            } => {
                let (root, pool) = (*root, *pool);
                (root, self.md_store(pool)?)
            }
            _ => return Ok(None),
        };
        let (nr, old) = self.forest(|f, io| f.insert(io, store, root, vc, c))?;
        if let VolKind::Thin {
            map: ThinMap::Tree { root, count },
            ..
        } = &mut self.meta.volumes[vi].kind
        {
            *root = nr;
            if old.is_none() {
                *count += 1;
            }
        }
        Ok(old)
    }

    /// Unmaps chunk `vc` of thin volume `vi`; returns the old mapping.
    pub(super) fn map_remove(&mut self, vi: usize, vc: u64) -> Result<Option<u32>, Error> {
        let (root, store) = match &mut self.meta.volumes[vi].kind {
            VolKind::Thin {
                map: ThinMap::Inline(m),
                ..
            } => return Ok(m.remove(&vc)),
            VolKind::Thin {
                map: ThinMap::Tree { root, .. },
                pool,
                ..
            } => {
                let (root, pool) = (*root, *pool);
                (root, self.md_store(pool)?)
            }
            _ => return Ok(None),
        };
        let (nr, old) = self.forest(|f, io| f.remove(io, store, root, vc))?;
        if let VolKind::Thin {
            map: ThinMap::Tree { root, count },
            ..
        } = &mut self.meta.volumes[vi].kind
        {
            *root = nr;
            if old.is_some() {
                *count -= 1;
            }
        }
        Ok(old)
    }

    /// Up to `max` mappings of thin volume `vi` with virtual chunks in `[from, to)`.
    pub(super) fn map_range(
        &mut self,
        vi: usize,
        from: u64,
        to: u64,
        max: usize,
    ) -> Result<Vec<(u64, u32)>, Error> {
        match &self.meta.volumes[vi].kind {
            VolKind::Thin {
                map: ThinMap::Inline(m),
                ..
            } => Ok(m
                .range(from..to.max(from))
                .take(max)
                .map(|(k, v)| (*k, *v))
                .collect()),
            VolKind::Thin {
                map: ThinMap::Tree { root, .. },
                pool,
                ..
            } => {
                let (root, store) = (*root, self.md_store(*pool)?);
                self.forest(|f, io| f.range(io, store, root, from, to, max))
            }
            _ => Ok(Vec::new()),
        }
    }

    /// Calls `each` for every mapping of thin volume `vi`, in order, a batch at a time.
    pub(super) fn map_each(
        &mut self,
        vi: usize,
        mut each: impl FnMut(&mut Self, u64, u32) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let mut from = 0;
        loop {
            let batch = self.map_range(vi, from, u64::MAX, 4096)?;
            let Some(last) = batch.last().map(|x| x.0) else {
                return Ok(());
            };
            for (k, v) in batch {
                each(self, k, v)?;
            }
            if last == u64::MAX {
                return Ok(());
            }
            from = last + 1;
        }
    }

    /// A copy of thin volume `vi`'s map (a new tree for version 3), with a reference added to
    /// every chunk it maps.
    pub(super) fn map_copy(&mut self, vi: usize) -> Result<ThinMap, Error> {
        let VolKind::Thin { pool, map, .. } = &self.meta.volumes[vi].kind else {
            return Err(Error::Corrupt("copy of a map that is not thin".into()));
        };
        let pool = *pool;
        if let ThinMap::Inline(m) = map {
            let m = m.clone();
            if let Some(rt) = self.thin.get_mut(&pool) {
                for c in m.values() {
                    rt.add(us(u64::from(*c)), 1);
                }
            }
            return Ok(ThinMap::Inline(m));
        }
        let store = self.md_store(pool)?;
        let mut b = Builder::new(store);
        let mut from = 0;
        loop {
            let batch = self.map_range(vi, from, u64::MAX, 4096)?;
            let Some(last) = batch.last().map(|x| x.0) else {
                break;
            };
            if let Some(rt) = self.thin.get_mut(&pool) {
                for (_, c) in &batch {
                    rt.add(us(u64::from(*c)), 1);
                }
            }
            self.forest(|f, io| {
                for (k, v) in batch {
                    b.push(f, io, k, v)?;
                }
                Ok(())
            })?;
            if last == u64::MAX {
                break;
            }
            from = last + 1;
        }
        let (root, count) = self.forest(|f, io| b.finish(f, io))?;
        Ok(ThinMap::Tree { root, count })
    }

    /// Drops `map` of a thin volume of `pool`: a reference less on every chunk it maps, and
    /// its tree's nodes freed (after the next commit, for committed ones).
    pub(super) fn map_drop(&mut self, pool: u32, map: ThinMap) -> Result<(), Error> {
        match map {
            ThinMap::Inline(m) => {
                if let Some(rt) = self.thin.get_mut(&pool) {
                    for c in m.values() {
                        rt.dec(us(u64::from(*c)));
                    }
                }
                Ok(())
            }
            ThinMap::Tree { root, .. } => {
                let store = self.md_store(pool)?;
                let mut chunks = Vec::new();
                self.forest(|f, io| f.destroy(io, store, root, &mut |_, c| chunks.push(c)))?;
                if let Some(rt) = self.thin.get_mut(&pool) {
                    for c in chunks {
                        rt.dec(us(u64::from(c)));
                    }
                }
                Ok(())
            }
        }
    }

    /// Rebuilds every thin pool's reference counts from the mappings and, for version 3,
    /// which metadata-volume blocks hold nodes, walking (and checking) every tree. Called when
    /// the pool opens, where the metadata is the committed one.
    pub(super) fn rebuild_thin(&mut self) -> Result<(), Error> {
        self.thin.clear();
        self.forest = Forest::new(self.meta.pool_id);
        self.forest.set_capacity(self.cache_nodes);
        let pools: Vec<(u32, u32, u32, Option<u32>)> = self
            .meta
            .volumes
            .iter()
            .filter_map(|p| match p.kind {
                VolKind::ThinPool {
                    data,
                    chunk_blocks,
                    md,
                } => Some((p.id, data, chunk_blocks, md)),
                _ => None,
            })
            .collect();
        for (pid, data, cb, md) in pools {
            let size = self.vidx(data).map_or(0, |i| self.meta.volumes[i].size);
            let n = us(size / u64::from(cb.max(1)));
            let mut rt = ThinRt::new(n);
            if let Some(md) = md {
                let blocks = self.vidx(md).map_or(0, |i| self.meta.volumes[i].size);
                self.forest.add_store(md, blocks);
            }
            let thins: Vec<usize> = (0..self.meta.volumes.len())
                .filter(|&i| matches!(&self.meta.volumes[i].kind, VolKind::Thin { pool, .. } if *pool == pid))
                .collect();
            for vi in thins {
                let v = &self.meta.volumes[vi];
                let vchunks = v.size.div_ceil(u64::from(cb.max(1)));
                let name = v.name.clone();
                match &v.kind {
                    VolKind::Thin {
                        map: ThinMap::Inline(m),
                        ..
                    } => {
                        for c in m.values() {
                            if let Some(r) = rt.refs.get_mut(us(u64::from(*c))) {
                                *r += 1;
                            }
                        }
                    }
                    VolKind::Thin {
                        map: ThinMap::Tree { root, count },
                        ..
                    } => {
                        let (root, count) = (*root, *count);
                        let store = md.ok_or_else(|| {
                            Error::Corrupt(format!(
                                "thin volume {name}: pool has no metadata volume"
                            ))
                        })?;
                        let refs = &mut rt.refs;
                        self.forest(|f, io| {
                            f.walk(io, store, root, vchunks, count, &mut |_, c| match refs
                                .get_mut(us(u64::from(c)))
                            {
                                Some(r) => {
                                    *r += 1;
                                    Ok(())
                                }
                                None => Err(format!(
                                    "thin volume {name}: mapping to chunk {c} outside its pool"
                                )),
                            })
                        })?;
                    }
                    _ => {}
                }
            }
            rt.free = u(rt.refs.iter().filter(|r| **r == 0).count());
            self.thin.insert(pid, rt);
        }
        Ok(())
    }

    /// Adds the reference counts of a new thin pool.
    pub(super) fn thin_rt_add(&mut self, pool: u32, chunks: u64) {
        self.thin.insert(pool, ThinRt::new(us(chunks)));
    }

    /// Sets how many metadata nodes the cache keeps (default
    /// [`crate::btree::DEFAULT_CACHE_NODES`]).
    pub fn set_node_cache(&mut self, nodes: usize) {
        self.cache_nodes = nodes;
        self.forest.set_capacity(nodes);
    }

    /// Node cache and I/O counters of the metadata trees.
    #[must_use]
    pub fn node_stats(&self) -> crate::btree::ForestStats {
        self.forest.stats()
    }

    /// Heap bytes the pool holds for thin mappings and allocation: the node cache, the
    /// metadata volumes' block bitmaps, the reference counts, and inline maps (version 2,
    /// estimated at 40 bytes a mapping, twice: now and committed).
    #[must_use]
    pub fn mapping_memory(&self) -> u64 {
        let inline: u64 = [&self.meta, &self.committed]
            .iter()
            .flat_map(|m| &m.volumes)
            .map(|v| match &v.kind {
                VolKind::Thin {
                    map: ThinMap::Inline(m),
                    ..
                } => u(m.len()) * 40,
                _ => 0,
            })
            .sum();
        self.forest.memory_bytes()
            + self.thin.values().map(ThinRt::memory_bytes).sum::<u64>()
            + inline
    }

    /// The record version the pool is written with (3, or 2 for a pool not upgraded).
    #[must_use]
    pub fn metadata_version(&self) -> u32 {
        self.meta.version
    }

    /// Maps virtual chunks of the empty thin volume `name` in bulk, from pairs `(virtual
    /// chunk, pool chunk)` in increasing virtual-chunk order whose pool chunks are free and
    /// distinct, and commits: for building large test and benchmark pools quickly (the tree is
    /// built packed, written as it fills) without writing their data. The chunks read as
    /// whatever the data volume holds there.
    pub fn bulk_map(
        &mut self,
        name: &str,
        entries: &mut dyn Iterator<Item = (u64, u32)>,
    ) -> Result<u64, Error> {
        self.begin_admin()?;
        let id = self.user_volume(name)?;
        let vi = self.vidx(id)?;
        let (pool, size) = match &self.meta.volumes[vi].kind {
            VolKind::Thin {
                pool,
                map,
                origin: None,
            } if map.is_empty() => (*pool, self.meta.volumes[vi].size),
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "'{name}' is not an empty thin volume without origin"
                )));
            }
        };
        let (_, cb, _) = self.thin_params(pool)?;
        let vchunks = size.div_ceil(cb);
        self.flush()?;
        let mut bad = None;
        let tree = self.meta.version >= 3;
        let store = if tree {
            Some(self.md_store(pool)?)
        } else {
            None
        };
        let mut inline = BTreeMap::new();
        let mut b = store.map(Builder::new);
        let mut n = 0u64;
        let mut batch = Vec::with_capacity(4096);
        let mut more = true;
        while more {
            batch.clear();
            batch.extend(entries.take(4096));
            more = batch.len() == 4096;
            let Some(rt) = self.thin.get_mut(&pool) else {
                return Err(Error::Corrupt("thin pool runtime".into()));
            };
            for &(k, c) in &batch {
                let i = us(u64::from(c));
                if k >= vchunks || !rt.is_free(i) {
                    bad = Some((k, c));
                    break;
                }
                // Fresh chunks: committed count 0 is what `refs` says until the commit below,
                // so no per-chunk record of the committed count is needed.
                rt.refs[i] = 1;
                rt.free -= 1;
                rt.hint = i + 1;
            }
            if bad.is_some() {
                break;
            }
            n += u(batch.len());
            match &mut b {
                Some(b) => {
                    let batch = &batch;
                    self.forest(|f, io| {
                        for &(k, c) in batch {
                            b.push(f, io, k, c)?;
                        }
                        Ok(())
                    })?;
                }
                None => inline.extend(batch.iter().copied()),
            }
        }
        if let Some((k, c)) = bad {
            return Err(Error::InvalidArgument(format!(
                "bulk map: chunk {k} -> {c} is outside the volume or its pool chunk is in use \
                 (the pool must be reopened: the reference counts changed)"
            )));
        }
        let map = match b {
            Some(b) => {
                let (root, count) = self.forest(|f, io| b.finish(f, io))?;
                ThinMap::Tree { root, count }
            }
            None => ThinMap::Inline(inline),
        };
        if let VolKind::Thin { map: m, .. } = &mut self.meta.volumes[vi].kind {
            *m = map;
        }
        self.dirty = true;
        self.flush()?;
        Ok(n)
    }

    /// Converts a version 1 or 2 pool to version 3 (offline: the caller holds the pool
    /// alone): every thin pool gets a metadata volume laid out like its data volume, every
    /// thin volume's mappings move into a tree built there, and one commit (version 3)
    /// switches over. The trees are written into space the old record does not use, so a
    /// crash at any write leaves the old pool (no version-3 record landed) or the new one.
    /// Refused, with nothing written, when the pool is version 3 already, has uncommitted
    /// changes or state in progress, or lacks free space for a metadata volume.
    pub fn upgrade(&mut self) -> Result<Vec<String>, Error> {
        self.begin_admin()?;
        if self.meta.version >= MD_VERSION {
            return Err(Error::InvalidArgument(format!(
                "the pool's metadata is version {} already (thin mappings in B-trees); nothing \
                 was changed",
                self.meta.version
            )));
        }
        self.flush()?;
        let mut notes = Vec::new();
        let before = self.meta.clone();
        // First every allocation, so that a refusal leaves nothing written.
        let pools: Vec<(u32, u32, u32)> = self
            .meta
            .volumes
            .iter()
            .filter_map(|p| match p.kind {
                VolKind::ThinPool {
                    data, chunk_blocks, ..
                } => Some((p.id, data, chunk_blocks)),
                _ => None,
            })
            .collect();
        let mut mds = Vec::new();
        for &(pid, data, cb) in &pools {
            let (pname, spec, tier, dsize) = {
                let p = &self.meta.volumes[self.vidx(pid)?];
                let d = &self.meta.volumes[self.vidx(data)?];
                let VolKind::Thick { layout, .. } = &d.kind else {
                    return Err(Error::Corrupt("thin pool data volume".into()));
                };
                (
                    p.name.clone(),
                    LayoutSpec::of(layout),
                    d.tier.clone(),
                    d.size,
                )
            };
            let mname = format!("{pname}.tmeta");
            let chunks = dsize / u64::from(cb.max(1));
            let blocks = round_up(md_blocks_for(chunks), u64::from(self.meta.extent_blocks));
            let res = self
                .check_new_name(&mname)
                .and_then(|()| self.alloc_layout(spec, blocks, tier.as_deref(), &mut Vec::new()));
            let layout = match res {
                Ok(l) => l,
                Err(e) => {
                    self.meta = before;
                    self.dirty = false;
                    self.recompute_dependents();
                    return Err(Error::NoSpace(format!(
                        "thin pool {pname} needs a metadata volume '{mname}' of {blocks} blocks \
                         ({spec}): {e}; nothing was changed"
                    )));
                }
            };
            let md = self.new_volume(
                &mname,
                blocks,
                tier.as_deref(),
                true,
                VolKind::Thick {
                    layout,
                    relayout: None,
                    fill: None,
                },
            );
            mds.push((pid, md, blocks, pname));
        }
        self.meta.version = MD_VERSION;
        for (pid, md, blocks, pname) in mds {
            self.forest.add_store(md, blocks);
            let pi = self.vidx(pid)?;
            if let VolKind::ThinPool { md: m, .. } = &mut self.meta.volumes[pi].kind {
                *m = Some(md);
            }
            let thins: Vec<usize> = (0..self.meta.volumes.len())
                .filter(|&i| matches!(&self.meta.volumes[i].kind, VolKind::Thin { pool, .. } if *pool == pid))
                .collect();
            let mut total = 0;
            for vi in thins {
                let VolKind::Thin { map, .. } = &mut self.meta.volumes[vi].kind else {
                    continue;
                };
                let ThinMap::Inline(m) =
                    core::mem::replace(map, ThinMap::Tree { root: 0, count: 0 })
                else {
                    continue;
                };
                total += m.len();
                let built = self.forest(|f, io| f.build(io, md, &mut m.into_iter()));
                let (root, count) = match built {
                    Ok(x) => x,
                    Err(e) => {
                        self.meta = before;
                        self.dirty = false;
                        self.recompute_dependents();
                        self.rebuild_thin()?;
                        return Err(e);
                    }
                };
                if let VolKind::Thin { map, .. } = &mut self.meta.volumes[vi].kind {
                    *map = ThinMap::Tree { root, count };
                }
            }
            notes.push(format!(
                "thin pool {pname}: {total} mappings moved into B-trees in its metadata volume \
                 {pname}.tmeta ({blocks} blocks)"
            ));
        }
        self.dirty = true;
        // On an error, nothing of version 3 is durable unless the commit's first copy
        // landed; reopening the pool shows which one it is.
        self.flush()?;
        notes.push(format!(
            "metadata record version {} -> {MD_VERSION} at sequence {}",
            before.version, self.meta.seq
        ));
        Ok(notes)
    }
}
