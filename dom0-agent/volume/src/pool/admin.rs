//! Admin operations: create, snapshot, rollback, remove, resize, relayout, mirror legs,
//! split/reattach, resync, fill, checks. Each commits before it returns.

use super::*;

impl Pool {
    // ---------------------------------------------------------------------------------------
    // Admin operations (each commits before returning).

    pub(super) fn new_volume(
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
            snapshot_of: None,
        });
        self.recompute_dependents();
        id
    }

    /// Takes back a volume just made by [`Pool::new_volume`] (not committed yet) when the
    /// operation that made it is refused.
    pub(super) fn undo_new_volume(&mut self, id: u32) {
        if let Ok(vi) = self.vidx(id) {
            self.meta.volumes.remove(vi);
        }
        self.recompute_dependents();
    }

    pub(super) fn check_new_name(&self, name: &str) -> Result<(), Error> {
        check_name(name)?;
        if self.meta.volumes.iter().any(|v| v.name == name) {
            return Err(Error::VolumeExists(name.to_string()));
        }
        Ok(())
    }

    /// Start of an admin operation: direct mappings are dropped until the next commit or
    /// flush rebuilds them, so no I/O can take a shortcut through a layout being changed.
    pub(super) fn begin_admin(&mut self) -> Result<(), Error> {
        self.writable()?;
        self.fast.clear();
        Ok(())
    }

    pub(super) fn writable(&self) -> Result<(), Error> {
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
        // Version 3: the mapping trees' metadata volume, laid out like the data.
        let md = if self.meta.version >= crate::format::MD_VERSION {
            let mname = format!("{name}.tmeta");
            if let Err(e) = self.check_new_name(&mname) {
                self.undo_new_volume(data);
                return Err(e);
            }
            let chunks = size / u64::from(chunk_blocks);
            let blocks = round_up(md_blocks_for(chunks), u64::from(self.meta.extent_blocks));
            let layout = match self.alloc_layout(spec, blocks, tier, &mut Vec::new()) {
                Ok(l) => l,
                Err(e) => {
                    self.undo_new_volume(data);
                    return Err(e);
                }
            };
            let md = self.new_volume(
                &mname,
                blocks,
                tier,
                true,
                VolKind::Thick {
                    layout,
                    relayout: None,
                    fill: None,
                },
            );
            self.forest.add_store(md, blocks);
            Some(md)
        } else {
            None
        };
        let id = self.new_volume(
            name,
            size,
            tier,
            false,
            VolKind::ThinPool {
                data,
                chunk_blocks,
                md,
            },
        );
        self.thin_rt_add(id, size / u64::from(chunk_blocks));
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
                map: self.empty_map(),
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
            (SnapshotKind::SpaceOptimized, VolKind::Thin { pool, origin, .. }) => {
                let (pool, size, origin) = (*pool, o.size, *origin);
                let map = self.map_copy(oi)?;
                let id =
                    self.new_volume(name, size, None, false, VolKind::Thin { pool, map, origin });
                let vi = self.vidx(id)?;
                self.meta.volumes[vi].snapshot_of = Some(oid);
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
                self.meta.volumes[vi].snapshot_of = Some(oid);
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
    pub(super) fn fill_regions(
        &mut self,
        sid: u32,
        vblock: u64,
        n: u64,
        commit: bool,
    ) -> Result<(), Error> {
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

    /// Whether volume `snap` descends from `vol` through snapshot links (a snapshot of it, or
    /// a snapshot of one of its snapshots).
    #[must_use]
    pub fn is_snapshot_of(&self, snap: u32, vol: u32) -> bool {
        let mut cur = snap;
        for _ in 0..=self.meta.volumes.len() {
            match self
                .meta
                .volumes
                .iter()
                .find(|v| v.id == cur)
                .and_then(|v| v.snapshot_of)
            {
                Some(p) if p == vol => return true,
                Some(p) => cur = p,
                None => return false,
            }
        }
        false
    }

    /// Rolls `vol` back to the contents of `snap`, which must be one of its snapshots (its
    /// lineage is checked) of the same size.
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
        if !self.is_snapshot_of(sid, vid) {
            let what = match self.meta.volumes[si]
                .snapshot_of
                .and_then(|p| self.meta.volumes.iter().find(|v| v.id == p))
            {
                Some(p) => format!("a snapshot of '{}'", p.name),
                None => "not a snapshot".to_string(),
            };
            return Err(Error::InvalidArgument(format!(
                "'{snap}' is {what}, not a snapshot of '{vol}': rollback only returns a volume to \
                 one of its own snapshots; nothing was changed"
            )));
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
            let _ = map;
            let (pool, ssize) = (*p2, self.meta.volumes[si].size);
            let newmap = self.map_copy(si)?;
            if let VolKind::Thin { map, .. } = &mut self.meta.volumes[vi].kind {
                let old = core::mem::replace(map, newmap);
                self.map_drop(pool, old)?;
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
            let (nmapped, pool) = (map.len(), *pool);
            let _ = nmapped;
            let mut chunks = Vec::new();
            self.map_each(si, |_, k, _| {
                chunks.push(k);
                Ok(())
            })?;
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
                "'{vol}' is {} blocks but its snapshot '{snap}' is {} blocks (one was resized \
                 after the snapshot): a rollback would not give back the volume as it was, so it \
                 is refused; nothing was changed",
                size, self.meta.volumes[si].size
            )));
        }
        self.copy_volume(sid, vid, &mut progress)?;
        self.flush()
    }

    pub(super) fn copy_volume(
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
        // Snapshots of the removed volume keep their lineage through its own origin.
        for s in &mut self.meta.volumes {
            if s.snapshot_of == Some(id) {
                s.snapshot_of = v.snapshot_of;
            }
        }
        match v.kind {
            VolKind::Thin { pool, map, .. } => self.map_drop(pool, map)?,
            VolKind::ThinPool { data, md, .. } => {
                let di = self.vidx(data)?;
                self.meta.volumes.remove(di);
                if let Some(md) = md {
                    let mi = self.vidx(md)?;
                    self.meta.volumes.remove(mi);
                    self.forest.drop_store(md);
                }
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
            VolKind::ThinPool {
                data,
                chunk_blocks,
                md,
            } => {
                if size < old {
                    return Err(Error::InvalidArgument("thin pools only grow".into()));
                }
                let size = round_up(size, u64::from(chunk_blocks));
                let chunks = size / u64::from(chunk_blocks);
                // The metadata volume grows with the pool (first: a refusal changes nothing).
                if let Some(md) = md {
                    let want = round_up(md_blocks_for(chunks), u64::from(self.meta.extent_blocks));
                    let mi = self.vidx(md)?;
                    if want > self.meta.volumes[mi].size {
                        let mname = self.meta.volumes[mi].name.clone();
                        self.resize_thick(&mname, want)?;
                        self.forest.add_store(md, want);
                    }
                }
                let dname = self.meta.volumes[self.vidx(data)?].name.clone();
                self.resize_thick(&dname, size)?;
                let vi = self.vidx(id)?;
                self.meta.volumes[vi].size = size;
                if let Some(rt) = self.thin.get_mut(&id) {
                    rt.resize(us(chunks));
                }
            }
            VolKind::Thin { pool, .. } => {
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
                    && self.map_get(vi, size / cb)?.is_some()
                    && end > size
                {
                    let zero = vec![0u8; us(end - size) * BLOCK_SIZE];
                    self.write(id, size, &zero)?;
                }
                let vi = self.vidx(id)?;
                loop {
                    let batch = self.map_range(vi, size.div_ceil(cb), u64::MAX, 4096)?;
                    if batch.is_empty() {
                        break;
                    }
                    for (k, _) in batch {
                        if let Some(c) = self.map_remove(vi, k)?
                            && let Some(rt) = self.thin.get_mut(&pool)
                        {
                            rt.dec(us(u64::from(c)));
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

    pub(super) fn resize_thick(&mut self, name: &str, size: u64) -> Result<(), Error> {
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
        // A thin pool (with every thin volume and snapshot in it) moves by its data volume,
        // and its metadata volume with it.
        let pool_vi = self.vidx(id)?;
        let mut md_target = None;
        if let VolKind::ThinPool { data, md, .. } = self.meta.volumes[pool_vi].kind {
            id = data;
            if let Some(md) = md {
                let mi = self.vidx(md)?;
                let v = &self.meta.volumes[mi];
                if !matches!(v.kind, VolKind::Thick { relayout: None, .. }) {
                    return Err(Error::Busy(format!(
                        "'{name}''s metadata volume is already being relaid out"
                    )));
                }
                let size = v.size;
                let mtier = tier.map(ToString::to_string).or_else(|| v.tier.clone());
                let target = self.alloc_layout(spec, size, mtier.as_deref(), &mut Vec::new())?;
                md_target = Some((mi, target, mtier));
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
        let mut pending: Vec<Segment> = md_target
            .as_ref()
            .map(|(_, t, _)| t.segments().copied().collect())
            .unwrap_or_default();
        let target = self.alloc_layout(spec, size, tier.as_deref(), &mut pending)?;
        if let Some((mi, target, mtier)) = md_target {
            let m = &mut self.meta.volumes[mi];
            m.tier = mtier;
            if let VolKind::Thick { relayout, .. } = &mut m.kind {
                *relayout = Some(Relayout { target, done: 0 });
            }
        }
        if let (Some(t), VolKind::ThinPool { .. }) =
            (tier.as_ref(), &self.meta.volumes[pool_vi].kind)
        {
            self.meta.volumes[pool_vi].tier = Some(t.clone());
        }
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

    pub(super) fn take_leg(&mut self, name: &str, leg: usize) -> Result<Leg, Error> {
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
            return Err(dev_err(&self.name_meta(), d, e));
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
    pub fn check(&mut self) -> Vec<String> {
        let mut p = Vec::new();
        if let Err(e) = validate_meta(&self.meta) {
            p.push(e);
        }
        let pools: Vec<(u32, usize)> = self.thin.iter().map(|(k, rt)| (*k, rt.len())).collect();
        for (pid, n) in pools {
            let mut refs = vec![0u32; n];
            let thins: Vec<usize> = (0..self.meta.volumes.len())
                .filter(|&i| matches!(&self.meta.volumes[i].kind, VolKind::Thin { pool, .. } if *pool == pid))
                .collect();
            for vi in thins {
                let res = self.map_each(vi, |_, _, c| {
                    if let Some(r) = refs.get_mut(us(u64::from(c))) {
                        *r += 1;
                    }
                    Ok(())
                });
                if let Err(e) = res {
                    p.push(format!(
                        "volume {}: mappings unreadable: {e}",
                        self.meta.volumes[vi].name
                    ));
                }
            }
            if self.thin.get(&pid).is_none_or(|rt| refs != rt.refs) {
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
        let disks_meta = self.name_meta();
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
}
