//! Planning queued requests: which volume requests are split into device pieces, and which
//! pieces (thick layouts directly, thin volumes through their pool's data volume).

use super::*;

impl Pool {
    /// Whether requests of thick volume `vi` are split into device pieces by the queue.
    pub(super) fn splits(&self, vi: usize, write: bool) -> bool {
        let v = &self.meta.volumes[vi];
        let VolKind::Thick {
            relayout: None,
            fill: None,
            ..
        } = &v.kind
        else {
            return false;
        };
        !write || (v.tracking.is_none() && !self.dependents.contains(&v.id))
    }

    /// Plans the pieces of `[block, block + n)` of thick volume `vi`, taking bytes from block
    /// `base` of the request's buffer on: for a write, every in-sync leg of every column run
    /// (stale legs have their regions recorded now); for a read, one in-sync leg per run.
    /// `None` when a piece has no device (the request then runs synchronously).
    fn plan_into(
        &mut self,
        vi: usize,
        block: u64,
        n: u64,
        base: u64,
        write: bool,
        pieces: &mut Vec<Piece>,
    ) -> Option<()> {
        let Pool {
            meta, devs, dirty, ..
        } = self;
        let v = &mut meta.volumes[vi];
        let rg = Regions::of(v);
        let VolKind::Thick { layout, .. } = &mut v.kind else {
            return None;
        };
        let nlegs = layout.legs.len();
        let mut done = 0;
        while done < n {
            let (col, cblock, run) = layout.map(block + done, n - done);
            // A write goes to every leg, a read to the first in-sync one from a rotating start.
            let (first, count) = if write {
                (0, nlegs)
            } else {
                let start = us(cblock >> 6) % nlegs.max(1);
                let leg = (0..nlegs)
                    .map(|k| (start + k) % nlegs)
                    .find(|&g| layout.legs[g].columns[col].state == SyncState::InSync)?;
                (leg, 1)
            };
            for g in first..first + count {
                let c = &mut layout.legs[g].columns[col];
                if let SyncState::Stale(bm) = &mut c.state {
                    let (r0, r1) = rg.span(block + done, run);
                    *dirty |= bm.set_range(r0, r1);
                    continue;
                }
                let mut k = 0;
                while k < run {
                    let (disk, pb, r) = seg_lookup(&c.segs, cblock + k, run - k)?;
                    let disk = us(u64::from(disk));
                    if !devs.get(disk).is_some_and(Option::is_some) {
                        return None;
                    }
                    pieces.push(Piece {
                        disk,
                        lba: pb,
                        from: us(base + done + k) * BLOCK_SIZE,
                        to: us(base + done + k + r) * BLOCK_SIZE,
                    });
                    k += r;
                }
            }
            done += run;
        }
        Some(())
    }

    /// Plans a request on volume `vi`: its pieces, and whether the dirty-region bits of the
    /// mirrored volumes it writes were durable already (else it waits for the log). `None`
    /// when it runs synchronously instead: a thin volume's range that is not all mapped, a
    /// write that would not be in place, or anything `splits` refuses.
    pub(super) fn plan(
        &mut self,
        vi: usize,
        block: u64,
        n: u64,
        write: bool,
    ) -> Option<(bool, Vec<Piece>)> {
        // A vector of an earlier request, when one is spare: no allocation per request.
        let mut pieces = self.aio.spare.pop().unwrap_or_default();
        let planned = self.plan_pieces(vi, block, n, write, &mut pieces);
        match planned {
            Some(logged) => Some((logged, pieces)),
            None => {
                self.recycle(pieces);
                None
            }
        }
    }

    /// Gives a piece vector back for later requests.
    pub(super) fn recycle(&mut self, mut pieces: Vec<Piece>) {
        if self.aio.spare.len() < 64 {
            pieces.clear();
            self.aio.spare.push(pieces);
        }
    }

    fn plan_pieces(
        &mut self,
        vi: usize,
        block: u64,
        n: u64,
        write: bool,
        pieces: &mut Vec<Piece>,
    ) -> Option<bool> {
        match &self.meta.volumes[vi].kind {
            VolKind::Thick { .. } if self.splits(vi, write) => {
                self.plan_into(vi, block, n, 0, write, pieces)?;
                Some(!write || self.logged(vi, block, n))
            }
            VolKind::Thin { pool, .. } => {
                let v = &self.meta.volumes[vi];
                if write && (v.tracking.is_some() || self.dependents.contains(&v.id)) {
                    return None;
                }
                let pool = *pool;
                let VolKind::ThinPool {
                    data, chunk_blocks, ..
                } = self.meta.volumes.iter().find(|p| p.id == pool)?.kind
                else {
                    return None;
                };
                let dvi = self.vidx(data).ok()?;
                if !self.splits(dvi, write) {
                    return None;
                }
                let runs = self.thin_runs(vi, pool, block, n, u64::from(chunk_blocks), write)?;
                let mut logged = true;
                for (done, run, dblock) in runs {
                    if let Some(db) = dblock {
                        self.plan_into(dvi, db, run, done, write, pieces)?;
                        if write {
                            logged &= self.logged(dvi, db, run);
                        }
                    }
                }
                Some(logged)
            }
            _ => None,
        }
    }

    /// For a write to `[b, b + k)` of thick volume `vi`: sets its dirty-region bits if it
    /// needs them and says whether they were durable already.
    pub(super) fn logged(&mut self, vi: usize, b: u64, k: u64) -> bool {
        let v = &self.meta.volumes[vi];
        if !needs_drl(v) {
            return true;
        }
        let (id, rg) = (v.id, Regions::of(v));
        let (r0, r1) = rg.span(b, k);
        self.drl_set(id, rg.n, r0, r1)
    }

    /// The chunk runs of `[block, block + n)` of thin volume `vi`: `(offset in the request,
    /// blocks, block in the pool's data volume)`, `None` for an unmapped chunk that reads as
    /// zeroes. `None` overall when a run needs the synchronous path: an unmapped chunk of a
    /// snapshot of a thick volume (reads its origin), or for a write any chunk that is not
    /// written in place (unmapped, shared, or committed elsewhere: allocation and redirect).
    fn thin_runs(
        &mut self,
        vi: usize,
        pool: u32,
        block: u64,
        n: u64,
        cb: u64,
        write: bool,
    ) -> Option<Vec<(u64, u64, Option<u64>)>> {
        let VolKind::Thin { origin, .. } = &self.meta.volumes[vi].kind else {
            return None;
        };
        let origin = *origin;
        let id = self.meta.volumes[vi].id;
        let mut runs = Vec::new();
        let mut done = 0;
        while done < n {
            let b = block + done;
            let run = (cb - b % cb).min(n - done);
            let vc = b / cb;
            // A mapping that cannot be read sends the request to the synchronous path, which
            // reports the error.
            match self.map_get(vi, vc).ok()? {
                Some(m) => {
                    // The in-place rule of `thin_write`: nobody else refers to the chunk, now
                    // or in the committed metadata.
                    if write && !self.in_place(pool, id, vc, m).ok()? {
                        return None;
                    }
                    runs.push((done, run, Some(u64::from(m) * cb + b % cb)));
                }
                None if write || origin.is_some() => return None,
                None => runs.push((done, run, None)),
            }
            done += run;
        }
        Some(runs)
    }
}
