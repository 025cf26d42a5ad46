//! The volume commands on an open pool, shared by a command run on its own and by a
//! command the NBD server runs for another `hvctl` (through its control socket).

use std::io::Write;
use std::path::Path;

use volmgr::BLOCK_SIZE;
use volmgr::pool::{LayoutSpec, Pool, SnapshotKind};

use crate::{CliError, ImageFormat, VolOp, human, layout_spec, progress, qcow2, size_blocks};

/// Whether `op` changes the pool (exclusive lock, owner record) or only looks at it.
pub fn writes(op: &VolOp) -> bool {
    !matches!(
        op,
        VolOp::Disks | VolOp::List | VolOp::Check { .. } | VolOp::Export { .. }
    )
}

/// Runs `op` on `pool`, writing what it prints to `out`; relative file names are taken from
/// `cwd`. Commands that do not work on an open pool (create-pool, add-disk, serve, bench)
/// are refused.
pub fn run_op(
    op: &VolOp,
    pool: &mut Pool,
    out: &mut dyn Write,
    cwd: &Path,
) -> Result<(), CliError> {
    match op {
        VolOp::Disks => {
            writeln!(
                out,
                "{:<4} {:<24} {:<10} {:>10} {:>10}  {:<20} PATH",
                "#", "DISK", "TIER", "SIZE", "FREE", "STATE"
            )?;
            for d in pool.disks() {
                writeln!(
                    out,
                    "{:<4} {:<24} {:<10} {:>10} {:>10}  {:<20} {}",
                    d.index,
                    d.name,
                    d.tier,
                    human(d.data_blocks),
                    human(d.free_blocks),
                    d.state,
                    pool.disk_label(d.index as usize)
                )?;
            }
        }
        VolOp::Create {
            name,
            size,
            layout,
            thin_pool,
        } => {
            let blocks = size_blocks(size)?;
            let spec = layout_spec(layout)?;
            match thin_pool {
                Some(tp) => pool.create_thin(name, tp, blocks)?,
                None => pool.create_volume(name, blocks, spec, layout.tier.as_deref())?,
            };
            writeln!(out, "created {name}")?;
        }
        VolOp::CreateThinPool {
            name,
            size,
            layout,
            chunk,
        } => {
            let blocks = size_blocks(size)?;
            let spec = layout_spec(layout)?;
            let chunk = u32::try_from(size_blocks(chunk)?)
                .map_err(|_| CliError::Usage("chunk too large".into()))?;
            pool.create_thin_pool(name, blocks, spec, layout.tier.as_deref(), chunk)?;
            writeln!(out, "created thin pool {name}")?;
        }
        VolOp::List => {
            writeln!(
                out,
                "{:<20} {:<28} {:>8} {:>8} {:<8} STATE",
                "NAME", "LAYOUT", "SIZE", "USED", "TIER"
            )?;
            for v in pool.list() {
                writeln!(
                    out,
                    "{:<20} {:<28} {:>8} {:>8} {:<8} {}",
                    v.name,
                    v.layout,
                    human(v.size_blocks),
                    human(v.used_blocks),
                    v.tier.as_deref().unwrap_or("-"),
                    v.state
                )?;
            }
        }
        VolOp::Resize { name, size, .. } => {
            let blocks = size_blocks(size)?;
            pool.resize(name, blocks)?;
            // Grown mirror space is copied from the first leg.
            settle(pool)?;
        }
        VolOp::Relayout {
            name,
            layout,
            no_wait,
        } => {
            let spec = layout_spec(layout)?;
            pool.start_relayout(name, spec, layout.tier.as_deref())?;
            if !no_wait {
                settle(pool)?;
            }
        }
        VolOp::MirrorAdd { name } => {
            pool.add_mirror_leg(name)?;
            settle(pool)?;
        }
        VolOp::MirrorRemove { name, leg } => pool.remove_mirror_leg(name, *leg)?,
        VolOp::MirrorSplit { name, leg, new } => {
            pool.split_leg(name, *leg, new)?;
        }
        VolOp::MirrorReattach { name, split } => {
            pool.reattach(name, split)?;
            let n = pool.stale_regions();
            eprintln!("hvctl: {n} changed regions to copy");
            settle(pool)?;
        }
        VolOp::Snapshot {
            origin,
            name,
            full,
            thin_pool,
            layout,
            no_wait,
        } => {
            let spec = layout_spec(layout)?;
            let kind = if *full {
                SnapshotKind::Full
            } else {
                SnapshotKind::SpaceOptimized
            };
            match thin_pool {
                Some(tp) => pool.snapshot_in_pool(origin, name, tp)?,
                None => pool.snapshot(origin, name, kind, spec, layout.tier.as_deref())?,
            };
            if *full && !no_wait {
                settle(pool)?;
            }
            writeln!(out, "created snapshot {name} of {origin}")?;
        }
        VolOp::Rollback { name, snap, .. } => {
            pool.rollback(name, snap, |d, t| progress("rollback", d, t))?;
        }
        VolOp::Remove { name, .. } => pool.remove(name)?,
        VolOp::Check { deep } => {
            let mut problems = pool.check();
            if *deep {
                problems.extend(pool.verify_mirrors()?);
            }
            if problems.is_empty() {
                writeln!(
                    out,
                    "pool metadata sequence {}: consistent (metadata version {})",
                    pool.meta().seq,
                    pool.metadata_version()
                )?;
            } else {
                for p in &problems {
                    writeln!(out, "problem: {p}")?;
                }
                return Err(CliError::Usage(format!(
                    "{} problems found",
                    problems.len()
                )));
            }
        }
        VolOp::Repair => {
            settle(pool)?;
            pool.flush()?;
            let problems = pool.check();
            if !problems.is_empty() {
                return Err(CliError::Usage(format!(
                    "unrepairable: {}",
                    problems.join("; ")
                )));
            }
            writeln!(
                out,
                "pool repaired and consistent (sequence {})",
                pool.meta().seq
            )?;
        }
        VolOp::Resync => {
            settle(pool)?;
        }
        VolOp::Import {
            name,
            file,
            format,
            create,
        } => import(pool, name, &cwd.join(file), *format, *create)?,
        VolOp::Export { name, file, format } => export(pool, name, &cwd.join(file), *format)?,
        VolOp::CreatePool { .. }
        | VolOp::AddDisk { .. }
        | VolOp::Upgrade
        | VolOp::Serve { .. }
        | VolOp::Bench { .. } => {
            return Err(CliError::Usage(
                "this command does not run on an open pool".into(),
            ));
        }
    }
    Ok(())
}

pub fn settle(pool: &mut Pool) -> Result<(), CliError> {
    let total = pool.stale_regions();
    loop {
        let left = pool.resync_step(64)?;
        progress("resync", total.saturating_sub(left), total);
        if left == 0 || left == total {
            break;
        }
    }
    let mut first = None;
    loop {
        let left = pool.fill_step(64)?;
        let t = *first.get_or_insert(left.max(1));
        progress("snapshot fill", t.saturating_sub(left), t);
        if left == 0 {
            break;
        }
    }
    let mut first = None;
    loop {
        let left = pool.relayout_step(4096)?;
        let t = *first.get_or_insert(left.max(1));
        progress("relayout", t.saturating_sub(left), t);
        if left == 0 {
            break;
        }
    }
    Ok(())
}

fn import(
    pool: &mut Pool,
    name: &str,
    file: &Path,
    format: ImageFormat,
    create: bool,
) -> Result<(), CliError> {
    let qcow = match format {
        ImageFormat::Auto => qcow2::is_qcow2(file),
        ImageFormat::Qcow2 => true,
        ImageFormat::Raw => false,
    };
    let (size, reader) = if qcow {
        let r = qcow2::Qcow2Reader::open(file)?;
        (r.size(), Some(r))
    } else {
        let len = std::fs::metadata(file)
            .map_err(|err| CliError::File {
                path: file.to_path_buf(),
                err,
            })?
            .len();
        (len, None)
    };
    let blocks = size.div_ceil(4096);
    if create {
        pool.create_volume(name, blocks.max(1), LayoutSpec::Concat, None)?;
        // A failed import leaves no volume behind that it made.
        return import_into(pool, name, file, size, reader).inspect_err(|_| {
            if let Err(e) = pool.remove(name) {
                eprintln!("hvctl: could not remove the half-imported volume '{name}': {e}");
            }
        });
    }
    import_into(pool, name, file, size, reader)
}

fn import_into(
    pool: &mut Pool,
    name: &str,
    file: &Path,
    size: u64,
    reader: Option<qcow2::Qcow2Reader>,
) -> Result<(), CliError> {
    let id = pool.volume_id(name)?;
    let vsize = pool.volume_size(id)?;
    if size.div_ceil(4096) > vsize {
        return Err(CliError::Usage(format!(
            "image is {size} bytes but volume '{name}' holds {} bytes; resize it first",
            vsize * 4096
        )));
    }
    let thin = pool
        .list()
        .iter()
        .any(|v| v.name == name && v.layout.starts_with("thin"));
    match reader {
        Some(r) => {
            let cl = r.cluster_size();
            let n = size.div_ceil(cl);
            let mut buf = vec![0u8; cl as usize];
            let mut cache = None;
            for i in 0..n {
                let data = r.read_cluster(i, &mut buf, &mut cache)?;
                let off = i * cl;
                let len = cl.min(vsize * 4096 - off) as usize;
                if data || !thin || !reads_zero(pool, id, off, len)? {
                    pool.write_bytes(id, off, &buf[..len])?;
                }
                if i % 64 == 63 || i + 1 == n {
                    progress("import", i + 1, n);
                }
            }
        }
        None => {
            use std::os::unix::fs::FileExt;
            let f = std::fs::File::open(file).map_err(|err| CliError::File {
                path: file.to_path_buf(),
                err,
            })?;
            let chunk = 1u64 << 20;
            let mut buf = vec![0u8; chunk as usize];
            let mut off = 0;
            while off < size {
                let n = chunk.min(size - off) as usize;
                let padded = n.div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
                buf[..padded].fill(0);
                f.read_exact_at(&mut buf[..n], off)
                    .map_err(|err| CliError::File {
                        path: file.to_path_buf(),
                        err,
                    })?;
                let zero = buf[..padded].iter().all(|b| *b == 0);
                if !(thin && zero && reads_zero(pool, id, off, padded)?) {
                    pool.write_bytes(id, off, &buf[..padded])?;
                }
                off += n as u64;
                progress("import", off, size);
            }
        }
    }
    pool.flush()?;
    Ok(())
}

/// Whether `len` bytes of volume `id` at `off` already read as zeroes (a thin volume's
/// unallocated space costs no I/O to check), so an import may skip writing them.
fn reads_zero(pool: &mut Pool, id: u32, off: u64, len: usize) -> Result<bool, CliError> {
    let mut cur = vec![0u8; len];
    pool.read_bytes(id, off, &mut cur)?;
    Ok(cur.iter().all(|b| *b == 0))
}

fn export(pool: &mut Pool, name: &str, file: &Path, format: ImageFormat) -> Result<(), CliError> {
    let id = pool.volume_id(name)?;
    let size = pool.volume_size(id)? * 4096;
    // Written under a temporary name and renamed at the end, so a failed export leaves
    // neither a partial image nor a damaged previous one. A device is written in place.
    let in_place = std::fs::metadata(file).is_ok_and(|m| !m.is_file());
    let tmp = if in_place {
        file.to_path_buf()
    } else {
        let mut n = file.file_name().unwrap_or_default().to_os_string();
        n.push(format!(".hvctl-tmp-{}", std::process::id()));
        file.with_file_name(n)
    };
    let r = export_to(pool, id, size, &tmp, format);
    match r {
        Ok(()) if !in_place => std::fs::rename(&tmp, file).map_err(|err| CliError::File {
            path: file.to_path_buf(),
            err,
        }),
        Err(e) if !in_place => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
        r => r,
    }
}

fn export_to(
    pool: &mut Pool,
    id: u32,
    size: u64,
    file: &Path,
    format: ImageFormat,
) -> Result<(), CliError> {
    if format == ImageFormat::Qcow2 {
        qcow2::write_qcow2(
            file,
            size,
            |i, buf| {
                let off = i * buf.len() as u64;
                let len = (buf.len() as u64).min(size - off) as usize;
                buf.fill(0);
                pool.read_bytes(id, off, &mut buf[..len])
                    .map_err(std::io::Error::other)
            },
            |d, t| {
                if d % 64 == 0 || d == t {
                    progress("export", d, t);
                }
            },
        )?;
        return Ok(());
    }
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(file).map_err(|err| CliError::File {
        path: file.to_path_buf(),
        err,
    })?;
    f.set_len(size)?;
    let chunk = 1u64 << 20;
    let mut buf = vec![0u8; chunk as usize];
    let mut off = 0;
    while off < size {
        let n = chunk.min(size - off) as usize;
        pool.read_bytes(id, off, &mut buf[..n])?;
        if buf[..n].iter().any(|b| *b != 0) {
            f.write_all_at(&buf[..n], off)?;
        }
        off += n as u64;
        progress("export", off, size);
    }
    f.sync_all()?;
    Ok(())
}
