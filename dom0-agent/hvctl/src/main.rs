//! `hvctl`: the hypervisor's admin command-line tool.
//!
//! Today it owns the volume commands (`hvctl volume ...`), which open a pool directly from its
//! disk-image files with the `volmgr` core, like `vxassist` or `lvcreate` would on a host:
//! create pools and volumes, list, resize, relayout, snapshot, roll back, remove, check and
//! repair metadata, import and export raw or qcow2 images, serve the pool's volumes over NBD,
//! and benchmark. Every command validates its arguments before it changes anything; long
//! operations print progress on stderr.
//!
//! Ownership (see `dom0-agent/VOLUMES.md`): one process owns a pool at a time. A command that
//! changes the pool locks every image exclusively ([`lock`]) and writes the on-disk owner
//! record; read-only commands take shared locks and open the images read-only. While
//! `serve` owns the pool, other `hvctl volume` commands on it are sent to the server over its
//! control socket ([`control`]) and run there, so nothing changes the pool behind its back.
//!
//! Files: `ops` (the commands on an open pool), `lock` (image locks, owner identity),
//! `control` (the server's control socket, both ends), `nbd` (the NBD server), `filedisk`,
//! `qcow2`, `bench`.
// hvctl runs on 64-bit hosts only: byte offsets and counts always fit `usize`, and the
// benchmark's byte tags are truncated on purpose.
#![allow(clippy::cast_possible_truncation)]

mod bench;
mod control;
mod filedisk;
mod lock;
mod nbd;
mod ops;
mod qcow2;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use volmgr::BlockDevice;
use volmgr::multipath::PathPolicy;
use volmgr::pool::{DiskSpec, LayoutSpec, NamedDevice, OpenOptions, Pool, PoolConfig};

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
    #[error("{0}")]
    Lock(#[from] lock::LockError),
    /// The running server ran the command and its output was shown; exit with this status.
    #[error("(status {0} from the server)")]
    Forwarded(u8),
}

impl CliError {
    /// What to do about it, where hvctl has a flag for that.
    fn hint(&self) -> Option<&'static str> {
        match self {
            CliError::Volume(volmgr::Error::Degraded(_)) => {
                Some("give every disk with -d, or --allow-degraded to go on without them")
            }
            CliError::Volume(volmgr::Error::OwnedElsewhere(_)) => {
                Some("--force-import takes the pool over")
            }
            _ => None,
        }
    }
}

#[derive(Parser)]
#[command(name = "hvctl", version, about = "Hypervisor admin tool")]
struct Cli {
    #[command(subcommand)]
    cmd: Top,
}

#[derive(Subcommand)]
enum Top {
    /// Volume management on disk-image files.
    #[command(after_long_help = VOLUME_HELP)]
    Volume(VolumeCmd),
}

const VOLUME_HELP: &str = "\
Ownership: one process owns a pool at a time.
  * A command that changes the pool locks every image exclusively (flock) for as long as it
    runs and records itself (host, pid, time, command) in the pool's owner record; a second
    one is refused with the process that holds the pool.
  * Read-only commands (disks, list, check, export) take shared locks and open the images
    read-only, so they also work on read-only images.
  * While `serve` runs, other hvctl volume commands on its pool are sent to the server through
    its control socket (.IMAGE.hvctl.sock next to its first image) and run there. Removing,
    shrinking or rolling back a volume that has NBD clients is refused unless --force, which
    disconnects them first.
  * A pool whose owner record names another host (shared storage) is refused unless
    --force-import; a record left by a crashed process on this host is taken over.
  * A command that changes the pool refuses to run without every disk (left off the command
    line, or with both labels damaged) unless --allow-degraded; `repair` rewrites damaged
    labels. Failed commands leave no files behind.
See dom0-agent/VOLUMES.md.";

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
    /// Change the pool even though a disk is absent (not given, or its labels damaged): its
    /// mirror legs are detached and resynchronised when it returns.
    #[arg(long, global = true)]
    allow_degraded: bool,
    /// Take over a pool whose owner record names another host (only if that host is down or
    /// no longer uses the pool).
    #[arg(long, global = true)]
    force_import: bool,
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
    /// Add a disk (PATH or PATH:TIER) to the pool; --disk-size creates or extends the file.
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
    Resize {
        name: String,
        size: String,
        /// Shrink even though NBD clients use it (they are disconnected first).
        #[arg(long)]
        force: bool,
    },
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
    /// Roll NAME back to SNAP, which must be a snapshot of NAME (or of one of its snapshots).
    Rollback {
        name: String,
        snap: String,
        /// Even though NBD clients use NAME (they are disconnected first).
        #[arg(long)]
        force: bool,
    },
    /// Remove a volume.
    Remove {
        name: String,
        /// Even though NBD clients use it (they are disconnected first).
        #[arg(long)]
        force: bool,
    },
    /// Check metadata (read-only); --deep also compares mirror legs.
    Check {
        #[arg(long)]
        deep: bool,
    },
    /// Repair: rewrite stale metadata copies and damaged labels, replay the log, resynchronise.
    Repair,
    /// Convert a pool made before metadata version 3 (thin mappings inside the metadata
    /// record) to version 3 (mappings in copy-on-write B-trees in a metadata volume per thin
    /// pool). Offline: refused while the pool is served or used. Crash-safe: the old pool
    /// stays until the single commit that switches.
    Upgrade,
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
    /// Serve the pool's volumes over NBD, each as its own export (nbd://HOST:PORT/NAME), to
    /// many clients at once; other hvctl commands on the pool run through this server.
    Serve {
        /// Volumes to export (default: every volume, including ones created while serving).
        names: Vec<String>,
        #[arg(long, default_value_t = 10809)]
        port: u16,
        #[arg(long, default_value = "127.0.0.1")]
        bind: String,
        /// Exit after this many client connections have come and gone.
        #[arg(long)]
        clients: Option<usize>,
        /// Disconnect a client that sends no request for this many seconds (0: never, the
        /// default, since a guest's disk may be quiet for hours; idle clients never block
        /// others either way).
        #[arg(long, default_value_t = 0.0)]
        idle_timeout: f64,
        /// Disconnect a client that has not chosen an export within this many seconds.
        #[arg(long, default_value_t = 10.0)]
        handshake_timeout: f64,
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
        /// Worker threads per image file in `--dir` for requests in flight (the raw file's
        /// and each pool disk's alike); 0 performs them at submission, which is faster for
        /// files in RAM. The O_DIRECT run uses 32.
        #[arg(long, default_value_t = 0)]
        workers: usize,
        /// A directory on a real disk for the queue-depth run with O_DIRECT ("none" skips it).
        #[arg(long, default_value = "/var/tmp")]
        disk_dir: PathBuf,
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

/// `PATH:TIER` or `PATH` (tier `default`). The text after the last ':' is the tier, which
/// must be a valid name: `x.img:` is an error, not a file named `x.img:`. A path that itself
/// contains ':' is taken whole when it names an existing file.
fn split_member(m: &str) -> Result<(PathBuf, String), CliError> {
    let Some((p, t)) = m.rsplit_once(':') else {
        return Ok((PathBuf::from(m), "default".to_string()));
    };
    if Path::new(m).exists() {
        return Ok((PathBuf::from(m), "default".to_string()));
    }
    let valid = !t.is_empty()
        && t.len() <= volmgr::format::MAX_NAME
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if p.is_empty() || !valid {
        return Err(CliError::Usage(format!(
            "'{m}': expected PATH or PATH:TIER with a tier of 1 to {} letters, digits, '-', '_' \
             or '.' (a path containing ':' must end with :TIER)",
            volmgr::format::MAX_NAME
        )));
    }
    Ok((PathBuf::from(p), t.to_string()))
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

/// The pool as one command owns it: the image locks and the open pool. Dropping it clears
/// the owner record (the locks go with the files).
struct Session {
    /// The open pool; taken by `serve`, which shares it between threads and clears the owner
    /// record itself.
    pool: Option<Pool>,
    _lock: lock::PoolLock,
}

impl Session {
    /// The open pool.
    fn pool(&mut self) -> Result<&mut Pool, CliError> {
        self.pool
            .as_mut()
            .ok_or_else(|| CliError::Usage("the pool was handed to the server".into()))
    }

    /// Clears the owner record, reporting a failure to do so.
    fn close(mut self) -> Result<(), CliError> {
        if let Some(p) = self.pool.as_mut() {
            p.release()?;
        }
        Ok(())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(p) = self.pool.as_mut()
            && let Err(e) = p.release()
        {
            eprintln!("hvctl: could not clear the pool's owner record: {e}");
        }
    }
}

/// The image paths of `-d` (without `@N` priorities) and their priorities.
fn disk_paths(cmd: &VolumeCmd) -> Result<Vec<(PathBuf, u32)>, CliError> {
    if cmd.disks.is_empty() {
        return Err(CliError::Usage(
            "give the pool's disks with -d/--disk FILE".into(),
        ));
    }
    Ok(cmd.disks.iter().map(|p| split_priority(p)).collect())
}

/// Locks the images (exclusive unless `read_only`) and opens the pool; `what` goes into the
/// owner record.
fn open_session(
    cmd: &VolumeCmd,
    read_only: bool,
    relabel: bool,
    what: &str,
) -> Result<Session, CliError> {
    let paths = disk_paths(cmd)?;
    let files: Vec<PathBuf> = paths.iter().map(|p| p.0.clone()).collect();
    let mode = if read_only {
        lock::Mode::Shared
    } else {
        lock::Mode::Exclusive
    };
    let lock = lock::lock_images(&files, mode)?;
    let mut devs = Vec::new();
    for (path, priority) in paths {
        let dev: Box<dyn BlockDevice> = if read_only {
            Box::new(
                FileDisk::open_read_only(&path).map_err(|err| CliError::File {
                    path: path.clone(),
                    err,
                })?,
            )
        } else {
            Box::new(open_file(&path, None)?)
        };
        devs.push(NamedDevice {
            dev,
            priority,
            name: path.display().to_string(),
        });
    }
    let path_policy = match cmd.path_policy {
        Policy::RoundRobin => PathPolicy::RoundRobin,
        Policy::MinQueue => PathPolicy::MinQueue,
        Policy::Priority => PathPolicy::Priority,
        Policy::Failover => PathPolicy::FailoverOnly,
    };
    let opts = OpenOptions {
        path_policy,
        read_only,
        owner: (!read_only).then(|| lock::me(0, what)),
        force: cmd.force_import,
        require_all_disks: !cmd.allow_degraded,
        relabel,
    };
    let (pool, report) = Pool::open_named(devs, opts)?;
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
    Ok(Session {
        pool: Some(pool),
        _lock: lock,
    })
}

/// The subcommand's name, for the owner record and messages.
fn op_name(op: &VolOp) -> &'static str {
    match op {
        VolOp::CreatePool { .. } => "create-pool",
        VolOp::AddDisk { .. } => "add-disk",
        VolOp::Disks => "disks",
        VolOp::Create { .. } => "create",
        VolOp::CreateThinPool { .. } => "create-thin-pool",
        VolOp::List => "list",
        VolOp::Resize { .. } => "resize",
        VolOp::Relayout { .. } => "relayout",
        VolOp::MirrorAdd { .. } => "mirror-add",
        VolOp::MirrorRemove { .. } => "mirror-remove",
        VolOp::MirrorSplit { .. } => "mirror-split",
        VolOp::MirrorReattach { .. } => "mirror-reattach",
        VolOp::Snapshot { .. } => "snapshot",
        VolOp::Rollback { .. } => "rollback",
        VolOp::Remove { .. } => "remove",
        VolOp::Check { .. } => "check",
        VolOp::Repair => "repair",
        VolOp::Upgrade => "upgrade",
        VolOp::Resync => "resync",
        VolOp::Import { .. } => "import",
        VolOp::Export { .. } => "export",
        VolOp::Serve { .. } => "serve",
        VolOp::Bench { .. } => "bench",
    }
}

/// Files a command created or extended, put back as they were unless it succeeds.
#[derive(Default)]
struct Undo {
    created: Vec<PathBuf>,
    extended: Vec<(PathBuf, u64)>,
    done: bool,
}

impl Undo {
    /// Opens `path` for a new disk, creating or extending it to `size` bytes, and remembers
    /// how it was.
    fn open_new_disk(&mut self, path: &Path, size: Option<u64>) -> Result<FileDisk, CliError> {
        match std::fs::metadata(path) {
            Ok(md) => {
                if size.is_some_and(|s| md.len() < s) {
                    self.extended.push((path.to_path_buf(), md.len()));
                }
            }
            Err(_) if size.is_some() => self.created.push(path.to_path_buf()),
            Err(err) => {
                return Err(CliError::Usage(format!(
                    "{}: {err} (give --disk-size to create it)",
                    path.display()
                )));
            }
        }
        open_file(path, size)
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        for p in &self.created {
            if let Err(e) = std::fs::remove_file(p) {
                eprintln!("hvctl: could not remove {}: {e}", p.display());
            }
        }
        for (p, len) in &self.extended {
            let r = std::fs::OpenOptions::new()
                .write(true)
                .open(p)
                .and_then(|f| f.set_len(*len));
            if let Err(e) = r {
                eprintln!("hvctl: could not truncate {} back: {e}", p.display());
            }
        }
    }
}

fn create_pool(
    cmd: &VolumeCmd,
    disk_size: Option<&str>,
    extent: &str,
    metadata_size: &str,
    force: bool,
) -> Result<(), CliError> {
    if cmd.disks.is_empty() {
        return Err(CliError::Usage(
            "give the new pool's disks with -d/--disk FILE[:TIER]".into(),
        ));
    }
    let mut members = Vec::new();
    for p in &cmd.disks {
        members.push(split_member(&p.to_string_lossy())?);
    }
    let size = disk_size.map(parse_size).transpose()?;
    let extent_blocks = u32::try_from(size_blocks(extent)?)
        .map_err(|_| CliError::Usage("extent too large".into()))?;
    let md_blocks = u32::try_from(size_blocks(metadata_size)?)
        .ok()
        .filter(|b| (2..=(1 << 18)).contains(b))
        .ok_or_else(|| CliError::Usage("metadata size must be 8K to 1G".into()))?;
    let mut undo = Undo::default();
    let mut devs: Vec<(Box<dyn BlockDevice>, DiskSpec)> = Vec::new();
    let mut files = Vec::new();
    for (i, (path, tier)) in members.into_iter().enumerate() {
        let mut d = undo.open_new_disk(&path, size)?;
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
        files.push(path);
    }
    let _lock = lock::lock_images(&files, lock::Mode::Exclusive)?;
    let cfg = PoolConfig {
        extent_blocks,
        md_blocks,
        ..PoolConfig::new(pool_id())
    };
    let pool = Pool::create(devs, cfg)?;
    undo.done = true;
    println!(
        "created pool {:032x} on {} disks",
        pool.meta().pool_id,
        pool.meta().disks.len()
    );
    Ok(())
}

fn add_disk(cmd: &VolumeCmd, member: &str, disk_size: Option<&str>) -> Result<(), CliError> {
    let size = disk_size.map(parse_size).transpose()?;
    let (path, tier) = split_member(member)?;
    let mut s = open_session(cmd, false, false, "hvctl add-disk")?;
    let mut undo = Undo::default();
    let mut d = undo.open_new_disk(&path, size)?;
    let _new = lock::lock_images(std::slice::from_ref(&path), lock::Mode::Exclusive)?;
    if volmgr::format::Label::read(&mut d).ok().flatten().is_some() {
        return Err(CliError::Usage(format!(
            "{} already belongs to a pool",
            path.display()
        )));
    }
    let name = path
        .file_name()
        .map_or_else(|| "disk".into(), |n| n.to_string_lossy().replace(' ', "_"));
    s.pool()?.add_disk(Box::new(d), DiskSpec { name, tier })?;
    undo.done = true;
    s.close()
}

fn run(cli: Cli) -> Result<(), CliError> {
    let Top::Volume(cmd) = cli.cmd;
    match &cmd.op {
        VolOp::CreatePool {
            disk_size,
            extent,
            metadata_size,
            force,
        } => create_pool(&cmd, disk_size.as_deref(), extent, metadata_size, *force),
        VolOp::AddDisk { member, disk_size } => {
            forward_if_served(&cmd, |cmd| add_disk(cmd, member, disk_size.as_deref()))
        }
        VolOp::Bench {
            dir,
            size,
            scale,
            workers,
            disk_dir,
        } => {
            let disk_dir = (disk_dir.as_os_str() != "none").then_some(disk_dir.as_path());
            bench::run(dir, disk_dir, parse_size(size)?, (*scale).max(1), *workers)?;
            Ok(())
        }
        VolOp::Serve {
            names,
            port,
            bind,
            clients,
            idle_timeout,
            handshake_timeout,
        } => {
            let secs = |s: f64, what: &str| {
                std::time::Duration::try_from_secs_f64(s)
                    .ok()
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| {
                        CliError::Usage(format!("{what} must be a positive number of seconds"))
                    })
            };
            let cfg = nbd::ServeConfig {
                exports: (!names.is_empty()).then(|| names.clone()),
                max_clients: *clients,
                idle: if *idle_timeout == 0.0 {
                    None
                } else {
                    Some(secs(*idle_timeout, "--idle-timeout")?)
                },
                handshake: secs(*handshake_timeout, "--handshake-timeout")?,
            };
            let mut s = open_session(&cmd, false, false, "hvctl serve")?;
            let listener = std::net::TcpListener::bind((bind.as_str(), *port))?;
            let first = disk_paths(&cmd)?.remove(0).0;
            let ctl = control::Listener::bind(&first);
            let pool = s
                .pool
                .take()
                .ok_or_else(|| CliError::Usage("no pool".into()))?;
            nbd::serve(pool, &cfg, &listener, ctl, bind)?;
            s.close()
        }
        VolOp::Upgrade => forward_if_served(&cmd, |cmd| {
            let mut s = open_session(cmd, false, false, "hvctl upgrade")?;
            let before = s.pool()?.metadata_version();
            match s.pool()?.upgrade() {
                Ok(notes) => {
                    for n in notes {
                        println!("{n}");
                    }
                    println!(
                        "pool upgraded from metadata version {before} to {}",
                        s.pool()?.metadata_version()
                    );
                    s.close()
                }
                Err(e) => {
                    let _ = s.close();
                    Err(e.into())
                }
            }
        }),
        op => forward_if_served(&cmd, |cmd| {
            let read_only = !ops::writes(op);
            let relabel = matches!(op, VolOp::Repair);
            let mut s = open_session(cmd, read_only, relabel, &format!("hvctl {}", op_name(op)))?;
            let cwd = std::env::current_dir()?;
            ops::run_op(op, s.pool()?, &mut std::io::stdout(), &cwd)?;
            s.close()
        }),
    }
}

/// Runs `f`; if the pool is held by a running server with a control socket, sends the
/// command there instead.
fn forward_if_served(
    cmd: &VolumeCmd,
    f: impl FnOnce(&VolumeCmd) -> Result<(), CliError>,
) -> Result<(), CliError> {
    match f(cmd) {
        Err(CliError::Lock(e @ lock::LockError::Held { .. })) => {
            let files: Vec<PathBuf> = disk_paths(cmd)?.into_iter().map(|p| p.0).collect();
            match control::connect(&files) {
                Some(conn) => {
                    let cwd = std::env::current_dir()?;
                    let args: Vec<String> = std::env::args().collect();
                    let code = control::forward(conn, &cwd, &args)?;
                    if code == 0 {
                        Ok(())
                    } else {
                        Err(CliError::Forwarded(code))
                    }
                }
                None => Err(CliError::Lock(e)),
            }
        }
        r => r,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Forwarded(code)) => ExitCode::from(code),
        Err(e) => {
            eprintln!("hvctl: error: {e}");
            if let Some(h) = e.hint() {
                eprintln!("hvctl: {h}");
            }
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
