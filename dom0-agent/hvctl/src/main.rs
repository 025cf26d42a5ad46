//! `hvctl`: the hypervisor's admin command-line tool.
//!
//! Today it owns the offline volume commands (`hvctl volume ...`), which open a pool directly
//! from its disk-image files with the `volmgr` core, like `vxassist` or `lvcreate` would on a
//! host: create pools and volumes, list, resize, relayout, snapshot, roll back, remove, check
//! and repair metadata, import and export raw or qcow2 images, serve a volume over NBD, and
//! benchmark. Every command validates its arguments before it changes anything; long
//! operations print progress on stderr.
// hvctl runs on 64-bit hosts only: byte offsets and counts always fit `usize`, and the
// benchmark's byte tags are truncated on purpose.
#![allow(clippy::cast_possible_truncation)]

mod bench;
mod filedisk;
mod nbd;
mod qcow2;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use volmgr::multipath::PathPolicy;
use volmgr::pool::{DiskSpec, LayoutSpec, OpenOptions, Pool, PoolConfig, SnapshotKind};
use volmgr::{BLOCK_SIZE, BlockDevice};

use crate::filedisk::FileDisk;

/// Errors of the CLI, each naming what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Volume(#[from] volmgr::Error),
    #[error("{path}: {err}")]
    File { path: PathBuf, err: std::io::Error },
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Qcow(#[from] qcow2::QcowError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

#[derive(Parser)]
#[command(name = "hvctl", version, about = "Hypervisor admin tool")]
struct Cli {
    #[command(subcommand)]
    cmd: Top,
}

#[derive(Subcommand)]
enum Top {
    /// Volume management on disk-image files (offline).
    Volume(VolumeCmd),
}

#[derive(Args)]
struct VolumeCmd {
    /// A disk (image file) of the pool; give every disk, in any order. A file given twice is
    /// opened as two paths to one disk (multipath); FILE@N gives that path priority N for
    /// `--path-policy priority`.
    #[arg(short = 'd', long = "disk", global = true)]
    disks: Vec<PathBuf>,
    /// I/O policy for disks reached through several paths.
    #[arg(long, global = true, value_enum, default_value_t = Policy::RoundRobin)]
    path_policy: Policy,
    #[command(subcommand)]
    op: VolOp,
}

#[derive(Clone, Copy, ValueEnum)]
enum Policy {
    RoundRobin,
    MinQueue,
    Priority,
    Failover,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Kind {
    Concat,
    Stripe,
    Mirror,
    StripeMirror,
}

#[derive(Args, Clone)]
struct LayoutArgs {
    /// Layout of the volume.
    #[arg(long, value_enum, default_value_t = Kind::Concat)]
    layout: Kind,
    /// Stripe columns (stripe, stripe-mirror).
    #[arg(long, default_value_t = 2)]
    columns: usize,
    /// Mirror legs (mirror, stripe-mirror): 2 or 3.
    #[arg(long, default_value_t = 2)]
    legs: usize,
    /// Stripe unit, e.g. 64K.
    #[arg(long, default_value = "64K")]
    stripe_unit: String,
    /// Place on disks of this tier only.
    #[arg(long)]
    tier: Option<String>,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum ImageFormat {
    Auto,
    Raw,
    Qcow2,
}

#[derive(Subcommand)]
enum VolOp {
    /// Create a pool on the disks given with -d (PATH or PATH:TIER); files are created with
    /// --disk-size.
    CreatePool {
        /// Create or extend each file to this size (e.g. 1G).
        #[arg(long)]
        disk_size: Option<String>,
        /// Allocation extent, e.g. 1M.
        #[arg(long, default_value = "1M")]
        extent: String,
        /// Size of each of the two metadata copies per disk (bounds how many thin mappings
        /// and volumes the pool can describe), e.g. 8M.
        #[arg(long, default_value = "8M")]
        metadata_size: String,
        /// Overwrite disks that already carry a pool label.
        #[arg(long)]
        force: bool,
    },
    /// Add a disk (PATH or PATH:TIER) to the pool.
    AddDisk {
        member: String,
        #[arg(long)]
        disk_size: Option<String>,
    },
    /// List the pool's disks.
    Disks,
    /// Create a thick volume, or a thin one with --thin-pool.
    Create {
        name: String,
        size: String,
        #[command(flatten)]
        layout: LayoutArgs,
        /// Make a thin volume in this thin pool (SIZE is virtual).
        #[arg(long)]
        thin_pool: Option<String>,
    },
    /// Create a thin pool of SIZE data space.
    CreateThinPool {
        name: String,
        size: String,
        #[command(flatten)]
        layout: LayoutArgs,
        /// Allocation chunk, e.g. 64K.
        #[arg(long, default_value = "64K")]
        chunk: String,
    },
    /// List volumes: layout, size, usage, sync state.
    List,
    /// Grow or shrink a volume (shrinking discards data past the new end).
    Resize { name: String, size: String },
    /// Change a volume's layout or tier online (resumes after a crash).
    Relayout {
        name: String,
        #[command(flatten)]
        layout: LayoutArgs,
        /// Start it and return; `resync` or later commands continue it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Add a mirror leg (then resynchronised).
    MirrorAdd { name: String },
    /// Remove mirror leg LEG.
    MirrorRemove { name: String, leg: usize },
    /// Split mirror leg LEG off as volume NEW (tracks changes for a later reattach).
    MirrorSplit {
        name: String,
        leg: usize,
        new: String,
    },
    /// Reattach a split leg; only changed regions are copied.
    MirrorReattach { name: String, split: String },
    /// Snapshot ORIGIN as NAME: space-optimised for thin volumes, or --full.
    Snapshot {
        origin: String,
        name: String,
        /// An independent full copy (filled in the background).
        #[arg(long, conflicts_with = "thin_pool")]
        full: bool,
        /// For a thick origin: the thin pool that receives copied-on-write chunks.
        #[arg(long)]
        thin_pool: Option<String>,
        #[command(flatten)]
        layout: LayoutArgs,
        #[arg(long)]
        no_wait: bool,
    },
    /// Roll NAME back to snapshot SNAP.
    Rollback { name: String, snap: String },
    /// Remove a volume.
    Remove { name: String },
    /// Check metadata (read-only); --deep also compares mirror legs.
    Check {
        #[arg(long)]
        deep: bool,
    },
    /// Repair: rewrite stale metadata copies, replay the log, resynchronise.
    Repair,
    /// Run pending resyncs, snapshot fills and relayouts to completion.
    Resync,
    /// Import a raw or qcow2 image into volume NAME (--create makes a concat volume).
    Import {
        name: String,
        file: PathBuf,
        #[arg(long, value_enum, default_value_t = ImageFormat::Auto)]
        format: ImageFormat,
        #[arg(long)]
        create: bool,
    },
    /// Export volume NAME to a raw or qcow2 image.
    Export {
        name: String,
        file: PathBuf,
        #[arg(long, value_enum, default_value_t = ImageFormat::Raw)]
        format: ImageFormat,
    },
    /// Serve volume NAME over NBD (qemu-img/qemu-io: nbd://HOST:PORT/NAME).
    Serve {
        name: String,
        #[arg(long, default_value_t = 10809)]
        port: u16,
        #[arg(long, default_value = "127.0.0.1")]
        bind: String,
        /// Exit after this many client sessions.
        #[arg(long)]
        clients: Option<usize>,
    },
    /// Benchmark volumes against raw files and qemu-img in a RAM-backed directory.
    Bench {
        #[arg(long, default_value = "/dev/shm")]
        dir: PathBuf,
        /// Size of each test volume, e.g. 256M.
        #[arg(long, default_value = "256M")]
        size: String,
        /// Scale the number of operations (1 = default).
        #[arg(long, default_value_t = 1)]
        scale: u64,
    },
}

/// Parses sizes like `4096`, `64K`, `1M`, `2G`, `1T` into bytes.
pub fn parse_size(s: &str) -> Result<u64, CliError> {
    let t = s.trim();
    let (num, mul) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (t, 1u64),
        Some((i, _)) => {
            let m = match t[i..]
                .to_ascii_uppercase()
                .trim_end_matches("IB")
                .trim_end_matches('B')
            {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => {
                    return Err(CliError::Usage(format!(
                        "size '{s}': unknown unit (use K, M, G or T)"
                    )));
                }
            };
            (&t[..i], m)
        }
    };
    let n: u64 = num
        .parse()
        .map_err(|_| CliError::Usage(format!("size '{s}' is not a number")))?;
    n.checked_mul(mul)
        .filter(|v| *v > 0)
        .ok_or_else(|| CliError::Usage(format!("size '{s}' must be positive and fit 64 bits")))
}

fn size_blocks(s: &str) -> Result<u64, CliError> {
    let b = parse_size(s)?;
    if b % 4096 != 0 {
        return Err(CliError::Usage(format!(
            "size '{s}' is not a multiple of 4K"
        )));
    }
    Ok(b / 4096)
}

fn layout_spec(a: &LayoutArgs) -> Result<LayoutSpec, CliError> {
    let unit = u32::try_from(size_blocks(&a.stripe_unit)?)
        .map_err(|_| CliError::Usage("stripe unit too large".into()))?;
    Ok(match a.layout {
        Kind::Concat => LayoutSpec::Concat,
        Kind::Stripe => LayoutSpec::Stripe {
            columns: a.columns,
            unit,
        },
        Kind::Mirror => LayoutSpec::Mirror { legs: a.legs },
        Kind::StripeMirror => LayoutSpec::StripeMirror {
            columns: a.columns,
            legs: a.legs,
            unit,
        },
    })
}

fn split_member(m: &str) -> (PathBuf, String) {
    match m.rsplit_once(':') {
        Some((p, t)) if !t.is_empty() && !t.contains('/') => (PathBuf::from(p), t.to_string()),
        _ => (PathBuf::from(m), "default".to_string()),
    }
}

/// `FILE@N` → (FILE, N); anything else → (path, 1).
fn split_priority(p: &Path) -> (PathBuf, u32) {
    let s = p.to_string_lossy();
    match s.rsplit_once('@') {
        Some((f, n)) if !f.is_empty() => match n.parse() {
            Ok(n) => (PathBuf::from(f), n),
            Err(_) => (p.to_path_buf(), 1),
        },
        _ => (p.to_path_buf(), 1),
    }
}

fn open_file(path: &Path, create: Option<u64>) -> Result<FileDisk, CliError> {
    FileDisk::open(path, create).map_err(|err| CliError::File {
        path: path.to_path_buf(),
        err,
    })
}

fn open_pool(cmd: &VolumeCmd, read_only: bool) -> Result<Pool, CliError> {
    if cmd.disks.is_empty() {
        return Err(CliError::Usage(
            "give the pool's disks with -d/--disk FILE".into(),
        ));
    }
    let mut devs: Vec<(Box<dyn BlockDevice>, u32)> = Vec::new();
    for p in &cmd.disks {
        let (path, prio) = split_priority(p);
        devs.push((Box::new(open_file(&path, None)?), prio));
    }
    let path_policy = match cmd.path_policy {
        Policy::RoundRobin => PathPolicy::RoundRobin,
        Policy::MinQueue => PathPolicy::MinQueue,
        Policy::Priority => PathPolicy::Priority,
        Policy::Failover => PathPolicy::FailoverOnly,
    };
    let (pool, report) = Pool::open_paths(
        devs,
        OpenOptions {
            path_policy,
            read_only,
        },
    )?;
    for n in &report.notes {
        eprintln!("hvctl: {n}");
    }
    if report.drl_regions_recovered > 0 {
        eprintln!(
            "hvctl: dirty-region log: {} regions {}",
            report.drl_regions_recovered,
            if read_only {
                "need resync"
            } else {
                "resynchronised"
            }
        );
    }
    Ok(pool)
}

/// Prints `what: n%` on stderr, overwriting the line.
pub fn progress(what: &str, done: u64, total: u64) {
    let pct = (done * 100).checked_div(total).unwrap_or(100);
    eprint!("\r{what}: {pct:3}%");
    if done >= total {
        eprintln!();
    }
    let _ = std::io::stderr().flush();
}

fn pool_id() -> u128 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut x =
        t ^ (u128::from(std::process::id()) << 64) ^ 0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c834;
    // A few rounds of xorshift-multiply so ids from close clocks differ in every byte.
    for _ in 0..4 {
        x ^= x >> 67;
        x = x.wrapping_mul(0x2545_f491_4f6c_dd1d_9e37_79b9_7f4a_7c15);
    }
    x
}

fn human(blocks: u64) -> String {
    let b = blocks * 4096;
    match b {
        _ if b >= 1 << 30 && b.is_multiple_of(1 << 30) => format!("{}G", b >> 30),
        _ if b >= 1 << 20 && b.is_multiple_of(1 << 20) => format!("{}M", b >> 20),
        _ => format!("{}K", b >> 10),
    }
}

fn settle(pool: &mut Pool) -> Result<(), CliError> {
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

fn run(cli: Cli) -> Result<(), CliError> {
    let Top::Volume(cmd) = cli.cmd;
    match &cmd.op {
        VolOp::CreatePool {
            disk_size,
            extent,
            metadata_size,
            force,
        } => {
            if cmd.disks.is_empty() {
                return Err(CliError::Usage(
                    "give the new pool's disks with -d/--disk FILE[:TIER]".into(),
                ));
            }
            let members: Vec<String> = cmd
                .disks
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            let size = disk_size.as_deref().map(parse_size).transpose()?;
            let extent_blocks = u32::try_from(size_blocks(extent)?)
                .map_err(|_| CliError::Usage("extent too large".into()))?;
            let mut devs: Vec<(Box<dyn BlockDevice>, DiskSpec)> = Vec::new();
            for (i, m) in members.iter().enumerate() {
                let (path, tier) = split_member(m);
                if size.is_none() && !path.exists() {
                    return Err(CliError::Usage(format!(
                        "{}: no such file (give --disk-size to create it)",
                        path.display()
                    )));
                }
                let mut d = open_file(&path, size)?;
                if !force && volmgr::format::Label::read(&mut d).ok().flatten().is_some() {
                    return Err(CliError::Usage(format!(
                        "{} already belongs to a pool; use --force to overwrite",
                        path.display()
                    )));
                }
                let name = path.file_name().map_or_else(
                    || format!("disk{i}"),
                    |n| n.to_string_lossy().replace(' ', "_"),
                );
                devs.push((Box::new(d), DiskSpec { name, tier }));
            }
            let md_blocks = u32::try_from(size_blocks(metadata_size)?)
                .ok()
                .filter(|b| (2..=(1 << 18)).contains(b))
                .ok_or_else(|| CliError::Usage("metadata size must be 8K to 1G".into()))?;
            let cfg = PoolConfig {
                extent_blocks,
                md_blocks,
                ..PoolConfig::new(pool_id())
            };
            let pool = Pool::create(devs, cfg)?;
            println!(
                "created pool {:032x} on {} disks",
                pool.meta().pool_id,
                pool.meta().disks.len()
            );
        }
        VolOp::AddDisk { member, disk_size } => {
            let size = disk_size.as_deref().map(parse_size).transpose()?;
            let (path, tier) = split_member(member);
            let mut pool = open_pool(&cmd, false)?;
            let mut d = open_file(&path, size)?;
            if volmgr::format::Label::read(&mut d).ok().flatten().is_some() {
                return Err(CliError::Usage(format!(
                    "{} already belongs to a pool",
                    path.display()
                )));
            }
            let name = path
                .file_name()
                .map_or_else(|| "disk".into(), |n| n.to_string_lossy().replace(' ', "_"));
            pool.add_disk(Box::new(d), DiskSpec { name, tier })?;
        }
        VolOp::Disks => {
            let pool = open_pool(&cmd, true)?;
            println!(
                "{:<4} {:<24} {:<10} {:>10} {:>10}  STATE",
                "#", "DISK", "TIER", "SIZE", "FREE"
            );
            for d in pool.disks() {
                println!(
                    "{:<4} {:<24} {:<10} {:>10} {:>10}  {}",
                    d.index,
                    d.name,
                    d.tier,
                    human(d.data_blocks),
                    human(d.free_blocks),
                    d.state
                );
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
            let mut pool = open_pool(&cmd, false)?;
            match thin_pool {
                Some(tp) => pool.create_thin(name, tp, blocks)?,
                None => pool.create_volume(name, blocks, spec, layout.tier.as_deref())?,
            };
            println!("created {name}");
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
            let mut pool = open_pool(&cmd, false)?;
            pool.create_thin_pool(name, blocks, spec, layout.tier.as_deref(), chunk)?;
            println!("created thin pool {name}");
        }
        VolOp::List => {
            let pool = open_pool(&cmd, true)?;
            println!(
                "{:<20} {:<28} {:>8} {:>8} {:<8} STATE",
                "NAME", "LAYOUT", "SIZE", "USED", "TIER"
            );
            for v in pool.list() {
                println!(
                    "{:<20} {:<28} {:>8} {:>8} {:<8} {}",
                    v.name,
                    v.layout,
                    human(v.size_blocks),
                    human(v.used_blocks),
                    v.tier.as_deref().unwrap_or("-"),
                    v.state
                );
            }
        }
        VolOp::Resize { name, size } => {
            let blocks = size_blocks(size)?;
            let mut pool = open_pool(&cmd, false)?;
            pool.resize(name, blocks)?;
            // Grown mirror space is copied from the first leg.
            settle(&mut pool)?;
        }
        VolOp::Relayout {
            name,
            layout,
            no_wait,
        } => {
            let spec = layout_spec(layout)?;
            let mut pool = open_pool(&cmd, false)?;
            pool.start_relayout(name, spec, layout.tier.as_deref())?;
            if !no_wait {
                settle(&mut pool)?;
            }
        }
        VolOp::MirrorAdd { name } => {
            let mut pool = open_pool(&cmd, false)?;
            pool.add_mirror_leg(name)?;
            settle(&mut pool)?;
        }
        VolOp::MirrorRemove { name, leg } => {
            open_pool(&cmd, false)?.remove_mirror_leg(name, *leg)?
        }
        VolOp::MirrorSplit { name, leg, new } => {
            open_pool(&cmd, false)?.split_leg(name, *leg, new)?;
        }
        VolOp::MirrorReattach { name, split } => {
            let mut pool = open_pool(&cmd, false)?;
            pool.reattach(name, split)?;
            let n = pool.stale_regions();
            eprintln!("hvctl: {n} changed regions to copy");
            settle(&mut pool)?;
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
            let mut pool = open_pool(&cmd, false)?;
            match thin_pool {
                Some(tp) => pool.snapshot_in_pool(origin, name, tp)?,
                None => pool.snapshot(origin, name, kind, spec, layout.tier.as_deref())?,
            };
            if *full && !no_wait {
                settle(&mut pool)?;
            }
            println!("created snapshot {name} of {origin}");
        }
        VolOp::Rollback { name, snap } => {
            let mut pool = open_pool(&cmd, false)?;
            pool.rollback(name, snap, |d, t| progress("rollback", d, t))?;
        }
        VolOp::Remove { name } => open_pool(&cmd, false)?.remove(name)?,
        VolOp::Check { deep } => {
            let mut pool = open_pool(&cmd, true)?;
            let mut problems = pool.check();
            if *deep {
                problems.extend(pool.verify_mirrors()?);
            }
            if problems.is_empty() {
                println!("pool metadata sequence {}: consistent", pool.meta().seq);
            } else {
                for p in &problems {
                    println!("problem: {p}");
                }
                return Err(CliError::Usage(format!(
                    "{} problems found",
                    problems.len()
                )));
            }
        }
        VolOp::Repair => {
            let mut pool = open_pool(&cmd, false)?;
            settle(&mut pool)?;
            pool.flush()?;
            let problems = pool.check();
            if !problems.is_empty() {
                return Err(CliError::Usage(format!(
                    "unrepairable: {}",
                    problems.join("; ")
                )));
            }
            println!(
                "pool repaired and consistent (sequence {})",
                pool.meta().seq
            );
        }
        VolOp::Resync => {
            let mut pool = open_pool(&cmd, false)?;
            settle(&mut pool)?;
        }
        VolOp::Import {
            name,
            file,
            format,
            create,
        } => import(&cmd, name, file, *format, *create)?,
        VolOp::Export { name, file, format } => export(&cmd, name, file, *format)?,
        VolOp::Serve {
            name,
            port,
            bind,
            clients,
        } => {
            let mut pool = open_pool(&cmd, false)?;
            pool.volume_id(name)?;
            let listener = std::net::TcpListener::bind((bind.as_str(), *port))?;
            eprintln!(
                "hvctl: serving {name} on nbd://{bind}:{}/{name}",
                listener.local_addr()?.port()
            );
            nbd::serve(&mut pool, name, &listener, *clients)?;
        }
        VolOp::Bench { dir, size, scale } => bench::run(dir, parse_size(size)?, (*scale).max(1))?,
    }
    Ok(())
}

fn import(
    cmd: &VolumeCmd,
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
    let mut pool = open_pool(cmd, false)?;
    if create {
        pool.create_volume(name, blocks.max(1), LayoutSpec::Concat, None)?;
    }
    let id = pool.volume_id(name)?;
    let vsize = pool.volume_size(id)?;
    if blocks > vsize {
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
                if data || !thin || !reads_zero(&mut pool, id, off, len)? {
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
                if !(thin && zero && reads_zero(&mut pool, id, off, padded)?) {
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

fn export(cmd: &VolumeCmd, name: &str, file: &Path, format: ImageFormat) -> Result<(), CliError> {
    let mut pool = open_pool(cmd, true)?;
    let id = pool.volume_id(name)?;
    let size = pool.volume_size(id)? * 4096;
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hvctl: error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn sizes_parse_or_explain() {
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(
            parse_size("12Q")
                .unwrap_err()
                .to_string()
                .contains("unknown unit")
        );
        assert!(parse_size("0").is_err());
        assert!(
            size_blocks("1000")
                .unwrap_err()
                .to_string()
                .contains("multiple of 4K")
        );
    }
}
