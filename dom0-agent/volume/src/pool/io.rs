//! Volume I/O: the direct fast path, thick layouts, full-snapshot copy-before-write,
//! thin allocation and redirect-on-write, space-optimised snapshot copy-on-write.

use super::*;

impl Pool {
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

    pub(super) fn thick_raw_read(
        &mut self,
        vi: usize,
        block: u64,
        buf: &mut [u8],
    ) -> Result<(), Error> {
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

    pub(super) fn thick_raw_write(&mut self, id: u32, block: u64, buf: &[u8]) -> Result<(), Error> {
        let vi = self.vidx(id)?;
        self.thick_raw_write_at(vi, block, buf)
    }

    pub(super) fn thick_raw_write_at(
        &mut self,
        vi: usize,
        block: u64,
        buf: &[u8],
    ) -> Result<(), Error> {
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

    pub(super) fn thin_origin(&self, vi: usize) -> Option<u32> {
        match &self.meta.volumes[vi].kind {
            VolKind::Thin { origin, .. } => *origin,
            _ => None,
        }
    }

    /// Reads chunk `vc` of thick origin `o` (zeroes past its end) into `buf` (one chunk).
    pub(super) fn read_origin_chunk(
        &mut self,
        o: u32,
        vc: u64,
        cb: u64,
        buf: &mut [u8],
    ) -> Result<(), Error> {
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
    pub(super) fn copy_to_space_optimized(
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
            let VolKind::Thin { pool, .. } = &v.kind else {
                continue;
            };
            let pool = *pool;
            let (_, cb, _) = self.thin_params(pool)?;
            let size = self.meta.volumes[si].size;
            let last = (block + n - 1).min(size.saturating_sub(1));
            if block >= size {
                continue;
            }
            for vc in block / cb..=last / cb {
                if self.map_get(si, vc)?.is_none() {
                    todo.entry((pool, vc)).or_default().push(si);
                } else if self.cmap_get(sid, vc)?.is_none() {
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
                    chunks: u(rt.len()),
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
            rt.add(fresh, u32::try_from(users.len()).unwrap_or(u32::MAX) - 1);
            for si in users {
                self.map_insert(si, vc, fresh32)?;
            }
        }
        self.dirty = true;
        // The copies and their mappings are durable before the origin is overwritten.
        self.flush()
    }

    /// Takes a free chunk of thin pool `pool` (reference count 1 on return).
    pub(super) fn alloc_chunk(&mut self, pool: u32, pname: &str) -> Result<usize, Error> {
        let rt = self
            .thin
            .get_mut(&pool)
            .ok_or_else(|| Error::Corrupt("thin pool runtime".into()))?;
        let len = rt.len();
        let fresh = (0..len)
            .map(|k| (rt.hint + k) % len)
            .find(|&i| rt.is_free(i))
            .ok_or_else(|| Error::ThinPoolFull {
                pool: pname.to_string(),
                chunks: u(len),
            })?;
        rt.hint = fresh + 1;
        rt.add(fresh, 1);
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
                map: self.empty_map(),
                origin: Some(oid),
            },
        );
        let vi = self.vidx(id)?;
        self.meta.volumes[vi].snapshot_of = Some(oid);
        self.flush()?;
        Ok(id)
    }

    pub(super) fn thin_params(&self, pool: u32) -> Result<(u32, u64, String), Error> {
        let p = &self.meta.volumes[self.vidx(pool)?];
        match p.kind {
            VolKind::ThinPool {
                data, chunk_blocks, ..
            } => Ok((data, u64::from(chunk_blocks), p.name.clone())),
            _ => Err(Error::Corrupt(
                "thin volume's pool is not a thin pool".into(),
            )),
        }
    }

    pub(super) fn thin_read(
        &mut self,
        vi: usize,
        pool: u32,
        block: u64,
        buf: &mut [u8],
    ) -> Result<(), Error> {
        let (data, cb, _) = self.thin_params(pool)?;
        let n = u(buf.len() / BLOCK_SIZE);
        let mut done = 0;
        while done < n {
            let b = block + done;
            let run = (cb - b % cb).min(n - done);
            let mapped = self.map_get(vi, b / cb)?;
            let origin = self.thin_origin(vi);
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
        self.md_settle()
    }

    pub(super) fn thin_write(
        &mut self,
        vi: usize,
        pool: u32,
        block: u64,
        buf: &[u8],
    ) -> Result<(), Error> {
        let (data, cb, pname) = self.thin_params(pool)?;
        let id = self.meta.volumes[vi].id;
        let n = u(buf.len() / BLOCK_SIZE);
        // Fast path: an overwrite inside one chunk this volume owns alone.
        if block % cb + n <= cb
            && let Some(m) = self.map_get(vi, block / cb)?
            && self.in_place(pool, id, block / cb, m)?
        {
            return self.thick_raw_write(data, u64::from(m) * cb + block % cb, buf);
        }
        // Plan: which chunks can be written in place, which need a fresh chunk.
        let mut plan = Vec::new();
        let mut need = 0u64;
        let mut done = 0;
        while done < n {
            let b = block + done;
            let run = (cb - b % cb).min(n - done);
            let vc = b / cb;
            let cur = self.map_get(vi, vc)?;
            let in_place = match cur {
                Some(m) => self.in_place(pool, id, vc, m)?,
                None => false,
            };
            if !in_place {
                need += 1;
            }
            plan.push((done, run, vc, cur, in_place));
            done += run;
        }
        let rt = self
            .thin
            .get(&pool)
            .ok_or_else(|| Error::Corrupt("thin pool runtime".into()))?;
        if need > rt.free {
            return Err(Error::ThinPoolFull {
                pool: pname,
                chunks: u(rt.len()),
            });
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
            let len = rt.len();
            let fresh = (0..len)
                .map(|k| (rt.hint + k) % len)
                .find(|&i| rt.is_free(i))
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
            rt.add(fresh, 1);
            if let Some(old) = cur {
                rt.dec(us(u64::from(old)));
            }
            self.map_insert(vi, vc, fresh32)?;
            self.dirty = true;
        }
        self.md_settle()
    }

    /// The in-place rule: chunk `m`, mapped at `vc` of volume `id`, may be overwritten when
    /// no other mapping refers to it, now or in the committed metadata.
    pub(super) fn in_place(&mut self, pool: u32, id: u32, vc: u64, m: u32) -> Result<bool, Error> {
        let i = us(u64::from(m));
        let Some(rt) = self.thin.get(&pool) else {
            return Ok(false);
        };
        Ok(match (rt.get(i), rt.committed(i)) {
            (Some(1), Some(0)) => true,
            (Some(1), Some(1)) => self.cmap_get(id, vc)? == Some(m),
            _ => false,
        })
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

    /// Releases the whole thin chunks inside `[offset, offset + len)` bytes of volume `id`
    /// (they read as zeroes afterwards, or as the origin for a snapshot of a thick volume);
    /// thick volumes ignore it. Returns the chunks released. Durable after the next flush;
    /// released space is reusable only after the commit, as for any freed space.
    pub fn discard(&mut self, id: u32, offset: u64, len: u64) -> Result<u64, Error> {
        self.writable()?;
        let vi = self.vidx(id)?;
        let v = &self.meta.volumes[vi];
        if offset
            .checked_add(len)
            .is_none_or(|e| e > v.size * u(BLOCK_SIZE))
        {
            return Err(Error::OutOfRange(v.name.clone()));
        }
        let VolKind::Thin { pool, .. } = v.kind else {
            return Ok(0);
        };
        let (_, cb, _) = self.thin_params(pool)?;
        let cbytes = cb * u(BLOCK_SIZE);
        let (first, last) = (offset.div_ceil(cbytes), (offset + len) / cbytes);
        let mut released = 0;
        let mut from = first;
        while from < last {
            let gone = self.map_range(vi, from, last, 4096)?;
            let Some(end) = gone.last().map(|x| x.0) else {
                break;
            };
            for (vc, _) in gone {
                if let Some(c) = self.map_remove(vi, vc)?
                    && let Some(rt) = self.thin.get_mut(&pool)
                {
                    rt.dec(us(u64::from(c)));
                    released += 1;
                }
            }
            from = end + 1;
        }
        if released > 0 {
            self.dirty = true;
        }
        Ok(released)
    }

    /// Makes `[offset, offset + len)` bytes of volume `id` read as zeroes: whole chunks of a
    /// thin volume without an origin are released, everything else is written with zeroes.
    pub fn write_zeroes(&mut self, id: u32, offset: u64, len: u64) -> Result<(), Error> {
        self.writable()?;
        let vi = self.vidx(id)?;
        let v = &self.meta.volumes[vi];
        if offset
            .checked_add(len)
            .is_none_or(|e| e > v.size * u(BLOCK_SIZE))
        {
            return Err(Error::OutOfRange(v.name.clone()));
        }
        let mut ranges = vec![(offset, offset + len)];
        if let VolKind::Thin {
            pool, origin: None, ..
        } = v.kind
        {
            let (_, cb, _) = self.thin_params(pool)?;
            let cbytes = cb * u(BLOCK_SIZE);
            let (first, last) = (offset.div_ceil(cbytes), (offset + len) / cbytes);
            if first < last {
                self.discard(id, first * cbytes, (last - first) * cbytes)?;
                ranges = vec![(offset, first * cbytes), (last * cbytes, offset + len)];
            }
        }
        let zero = vec![0u8; 1 << 20];
        for (mut a, b) in ranges {
            while a < b {
                let n = (b - a).min(1 << 20);
                self.write_bytes(id, a, &zero[..us(n)])?;
                a += n;
            }
        }
        Ok(())
    }
}
