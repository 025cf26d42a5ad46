//! Semantic validation of decoded metadata and of names.

use super::*;

pub(super) fn check_name(name: &str) -> Result<(), Error> {
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
            VolKind::ThinPool {
                data,
                chunk_blocks,
                md,
            } => {
                let ok = find(*data)
                    .is_some_and(|d| d.internal && matches!(d.kind, VolKind::Thick { .. }));
                if !ok || *chunk_blocks == 0 || *chunk_blocks > 4096 {
                    return Err(format!(
                        "thin pool {}: bad data volume or chunk size",
                        v.name
                    ));
                }
                let md_ok = match md {
                    None => m.version < 3,
                    Some(md) => {
                        m.version >= 3
                            && *md != *data
                            && find(*md).is_some_and(|d| {
                                d.internal && matches!(d.kind, VolKind::Thick { fill: None, .. })
                            })
                    }
                };
                if !md_ok {
                    return Err(format!(
                        "thin pool {}: metadata volume missing, or present in a version-{} record",
                        v.name, m.version
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
                let VolKind::ThinPool {
                    data,
                    chunk_blocks,
                    md,
                } = p.kind
                else {
                    return Err(format!("thin volume {}: pool is not a thin pool", v.name));
                };
                let cb = u64::from(chunk_blocks);
                let nchunks = find(data).map_or(0, |d| d.size / cb);
                let vchunks = v.size.div_ceil(cb);
                let bad = match map {
                    ThinMap::Inline(map) => {
                        m.version >= 3
                            || map
                                .iter()
                                .any(|(k, p)| *k >= vchunks || u64::from(*p) >= nchunks)
                    }
                    // The tree's nodes are checked when the pool opens (every node walked).
                    ThinMap::Tree { root, count } => {
                        m.version < 3
                            || *count > vchunks
                            || md.and_then(&find).is_none_or(|d| *root >= d.size)
                    }
                };
                if bad {
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
