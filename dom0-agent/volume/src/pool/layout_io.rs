//! Reads, writes and copies through a layout: legs, columns, segments, stale tracking.

use super::*;

pub(super) fn col_read(
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

pub(super) fn col_write(
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

pub(super) fn col_present(devs: &Devs, segs: &[Segment]) -> bool {
    segs.iter()
        .all(|s| devs.get(us(u64::from(s.disk))).is_some_and(Option::is_some))
}

pub(super) fn mark_stale(c: &mut Column, rg: Regions, vblock: u64, n: u64) -> bool {
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
pub(super) fn layout_read(
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
pub(super) fn layout_write(
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
pub(super) fn layout_sync_range(
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
pub(super) fn layout_copy_region(
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
