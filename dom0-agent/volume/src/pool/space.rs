//! Space allocation: free extents per disk (never what the committed metadata still uses),
//! layouts with legs and columns on distinct disks, region sizes.

use super::*;

impl Pool {
    // ---------------------------------------------------------------------------------------
    // Space allocation.

    pub(super) fn free_runs(&self, disk: u32, pending: &[Segment]) -> Vec<(u64, u64)> {
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

    pub(super) fn eligible_disks(&self, tier: Option<&str>) -> Vec<u32> {
        self.present_active()
            .into_iter()
            .filter(|&i| tier.is_none_or(|t| self.meta.disks[i].tier == t))
            .map(|i| u32::try_from(i).unwrap_or(u32::MAX))
            .collect()
    }

    /// Allocates `len` blocks from `allowed` disks (one disk only if `single`), preferring to
    /// extend right after `after`.
    pub(super) fn alloc_column(
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

    pub(super) fn column_len_for(&self, size: u64, cols: usize, su: u32) -> u64 {
        let eb = u64::from(self.meta.extent_blocks);
        let su = u64::from(su);
        let m = if cols > 1 { su / gcd(su, eb) * eb } else { eb };
        round_up(size.div_ceil(u(cols)).max(1), m)
    }

    pub(super) fn alloc_layout(
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

    pub(super) fn region_blocks_for(size: u64) -> u32 {
        u32::try_from((size / 4096).next_power_of_two().clamp(16, 1 << 20)).unwrap_or(1 << 20)
    }
}
