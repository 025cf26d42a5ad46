//! Debian 12 Linux kernels as guests: the kernel images and a small initramfs, cached under
//! `target/linux/`.
//!
//! Nothing is installed. A meta package (`linux-image-cloud-amd64`, `linux-image-amd64`) is
//! resolved to the versioned image package it depends on ([`versioned_image`]), which is
//! `apt-get download`ed into `target/linux/debs/` and unpacked with `dpkg-deb -x` into
//! `target/linux/<package>/`; `busybox-static` the same way. The initramfs is a plain
//! (uncompressed) newc cpio archive written here ([`newc`]) from busybox, the virtio modules of
//! that kernel, `/dev/console` and a generated `/init` ([`init_script`]); it is byte-for-byte a
//! function of its inputs (mtime 0, uid/gid 0, sorted entries).
//!
//! Cache: the resolved package name is recorded in `target/linux/<meta>.resolved`, and an
//! unpacked tree is moved into place only when complete, so a second call only checks that the
//! files are there (`rm -rf target/linux` picks up a newer kernel). The initramfs is built in
//! memory each time and written only when its bytes differ.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::root;

/// The init's first line, followed by `VERSION, N CPUs, uptime S s, F MHz` ([`UP_PATTERN`]
/// matches it whole).
pub const MARK_UP: &str = "linux-init: up, kernel ";
/// A regex for the first line, capturing the kernel release and the CPU count.
#[allow(dead_code, reason = "for scenarios to match; tested here")]
pub const UP_PATTERN: &str =
    r"linux-init: up, kernel (\S+), (\d+) CPUs, uptime ([\d.]+) s, ([\d.]+) MHz";
/// Printed when every module loaded.
pub const MARK_MODULES_LOADED: &str = "linux-init: modules loaded";
/// Printed once per module that failed, as `linux-init: insmod NAME failed`.
pub const MARK_INSMOD_FAILED: &str = "linux-init: insmod ";
/// A regex for a module that failed to load, capturing its name.
#[allow(dead_code, reason = "for scenarios to match; tested here")]
pub const INSMOD_FAILED_PATTERN: &str = r"linux-init: insmod (\S+) failed";
/// Printed just before the interactive shell starts.
pub const MARK_SHELL: &str = "linux-init: shell";
/// The shell's prompt (`PS1`), which marks "ready for the next line".
pub const PROMPT: &str = "linux# ";

/// The modules the init loads (in the order [`load_order`] works out from their `depends=` when
/// the archive is built): virtio's, and the panic notifier's (`pvpanic-mmio` binds the DSDT's
/// `QEMU0001` device, so a kernel panic stops the domain as crashed).
pub const MODULES: &[&str] = &[
    "virtio",
    "virtio_ring",
    "virtio_mmio",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_balloon",
    "virtio_console",
    "pvpanic",
    "pvpanic-mmio",
];

/// Applets the init and the tests use; busybox must have each (`mkfs.ext2` may be provided by
/// a wrapper around `mke2fs`, which Debian's busybox has under that name only).
pub const APPLETS_NEEDED: &[&str] = &[
    "sh",
    "mount",
    "insmod",
    "uname",
    "nproc",
    "cat",
    "echo",
    "poweroff",
    "reboot",
    "dd",
    "sync",
    "mkfs.ext2",
    "ping",
    "ip",
    "ifconfig",
    "ls",
    "sleep",
    "mkdir",
    "grep",
    "dmesg",
    "hexdump",
    "cmp",
    "md5sum",
    "setsid",
    "cttyhack",
];

/// A kernel build Debian ships.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    /// `linux-image-cloud-amd64`: virtual hardware only, smaller.
    Cloud,
    /// `linux-image-amd64`: the default kernel.
    Generic,
}

impl Flavour {
    pub const ALL: [Flavour; 2] = [Flavour::Cloud, Flavour::Generic];

    pub fn parse(s: &str) -> Option<Flavour> {
        match s {
            "cloud" => Some(Flavour::Cloud),
            "generic" => Some(Flavour::Generic),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Flavour::Cloud => "cloud",
            Flavour::Generic => "generic",
        }
    }

    /// The meta package that depends on the current versioned image.
    pub fn meta_package(self) -> &'static str {
        match self {
            Flavour::Cloud => "linux-image-cloud-amd64",
            Flavour::Generic => "linux-image-amd64",
        }
    }

    /// What follows the ABI in a versioned package's name (`linux-image-6.1.0-48` + this).
    fn suffix(self) -> &'static str {
        match self {
            Flavour::Cloud => "-cloud-amd64",
            Flavour::Generic => "-amd64",
        }
    }
}

/// The versioned image package in `apt-cache depends META` output: the first `Depends:` on
/// `linux-image-ABI-FLAVOUR` where ABI is digits, dots and dashes (`6.1.0-48`), so the generic
/// flavour does not take a `-cloud-amd64` or `-rt-amd64` package.
pub fn versioned_image(depends_output: &str, flavour: Flavour) -> Option<String> {
    depends_output.lines().find_map(|line| {
        let name = line.trim().strip_prefix("Depends:")?.trim();
        let abi = name
            .strip_prefix("linux-image-")?
            .strip_suffix(flavour.suffix())?;
        let plain = abi.starts_with(|c: char| c.is_ascii_digit())
            && abi
                .chars()
                .all(|c| c.is_ascii_digit() || c == '.' || c == '-');
        plain.then(|| name.to_string())
    })
}

// ---------------------------------------------------------------------------------------------
// The cpio (newc) writer.

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;
const NEWC_MAGIC: &[u8; 6] = b"070701";
const TRAILER: &str = "TRAILER!!!";

/// What an archive entry is; modes are permission bits only (the type bits are added).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    Dir { mode: u32 },
    File { mode: u32, data: Vec<u8> },
    Symlink { target: String },
    CharDev { mode: u32, major: u32, minor: u32 },
}

/// One archive member; `path` is relative to the root (`bin/sh`, no leading slash).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    pub node: Node,
}

/// Appends `n` zero bytes so that `out.len()` is a multiple of 4.
fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// One newc header (110 bytes of ASCII: the magic, then 13 fields of 8 hex digits), the name
/// with its NUL, and padding to 4 bytes.
fn push_header(out: &mut Vec<u8>, fields: [u32; 13], name: &str) {
    out.extend_from_slice(NEWC_MAGIC);
    for f in fields {
        out.extend_from_slice(format!("{f:08X}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
}

/// The entries as a newc cpio archive, in the order given (a directory must come before what
/// it holds), ending with `TRAILER!!!`. Inodes are numbered from 1; mtime, uid and gid are 0.
pub fn newc(entries: &[Entry]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if e.path.is_empty() || e.path.starts_with('/') || e.path.contains('\0') {
            return Err(format!("cpio: bad member name {:?}", e.path));
        }
        let (mode, nlink, data, rdev): (u32, u32, &[u8], (u32, u32)) = match &e.node {
            Node::Dir { mode } => (S_IFDIR | mode, 2, &[], (0, 0)),
            Node::File { mode, data } => (S_IFREG | mode, 1, data, (0, 0)),
            Node::Symlink { target } => (S_IFLNK | 0o777, 1, target.as_bytes(), (0, 0)),
            Node::CharDev { mode, major, minor } => (S_IFCHR | mode, 1, &[], (*major, *minor)),
        };
        let too_big = |what: &str| format!("cpio: {} of {} does not fit 32 bits", what, e.path);
        let ino = u32::try_from(i + 1).map_err(|_| too_big("inode"))?;
        let size = u32::try_from(data.len()).map_err(|_| too_big("size"))?;
        let namesize = u32::try_from(e.path.len() + 1).map_err(|_| too_big("name"))?;
        let fields = [
            ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0,
        ];
        push_header(&mut out, fields, &e.path);
        out.extend_from_slice(data);
        pad4(&mut out);
    }
    let namesize = u32::try_from(TRAILER.len() + 1).expect("short");
    push_header(
        &mut out,
        [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, namesize, 0],
        TRAILER,
    );
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The initramfs's contents.

/// A kernel module to put in the archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    /// As insmod reports it (`virtio_net`).
    pub name: String,
    /// Below `lib/modules/VERSION/` (`kernel/drivers/net/virtio_net.ko`).
    pub path: String,
    pub data: Vec<u8>,
}

/// The paths of `wanted` modules (`NAME.ko`) among `files`, the files below
/// `lib/modules/VERSION/kernel/` relative to it; an error naming every one missing or found
/// twice.
pub fn locate_modules(files: &[String], wanted: &[&str]) -> Result<Vec<String>, String> {
    let mut found = Vec::new();
    let mut problems = Vec::new();
    for name in wanted {
        let file = format!("{name}.ko");
        let hits: Vec<&String> = files
            .iter()
            .filter(|f| f.rsplit('/').next() == Some(file.as_str()))
            .collect();
        match hits.as_slice() {
            [one] => found.push(format!("kernel/{one}")),
            [] => problems.push(format!("{file} is missing")),
            many => problems.push(format!(
                "{file} is there {} times ({})",
                many.len(),
                many.iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
    if problems.is_empty() {
        Ok(found)
    } else {
        Err(problems.join("; "))
    }
}

/// The `depends=` list in a module's `.modinfo` strings (empty when it has none).
pub fn modinfo_depends(ko: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(at) = ko.windows(KEY.len()).position(|w| w == KEY) else {
        return Vec::new();
    };
    let rest = &ko[at + KEY.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// The order in which the init loads `modules` with insmod, which resolves nothing itself:
/// each module after every module its `depends=` names, and otherwise in the given order.
/// Debian's point releases move dependencies (6.1.0-57's `virtio` depends on `virtio_ring`,
/// 6.1.0-48's did not), so the order is worked out from the modules themselves. A dependency
/// the set does not carry, or a cycle, is an error that names the module.
pub fn load_order(modules: &[Module]) -> Result<Vec<&Module>, String> {
    let deps: Vec<Vec<String>> = modules.iter().map(|m| modinfo_depends(&m.data)).collect();
    for (m, ds) in modules.iter().zip(&deps) {
        if let Some(d) = ds.iter().find(|d| !modules.iter().any(|o| &o.name == *d)) {
            return Err(format!(
                "module {} depends on {d}, which the initramfs does not carry",
                m.name
            ));
        }
    }
    let mut placed = vec![false; modules.len()];
    let mut order = Vec::with_capacity(modules.len());
    while order.len() < modules.len() {
        let ready = (0..modules.len()).find(|&i| {
            !placed[i]
                && deps[i].iter().all(|d| {
                    modules
                        .iter()
                        .zip(&placed)
                        .any(|(o, &done)| done && &o.name == d)
                })
        });
        let Some(i) = ready else {
            let stuck: Vec<&str> = (0..modules.len())
                .filter(|&i| !placed[i])
                .map(|i| modules[i].name.as_str())
                .collect();
            return Err(format!(
                "modules {} depend on each other (a cycle): none can load first",
                stuck.join(", ")
            ));
        };
        placed[i] = true;
        order.push(&modules[i]);
    }
    Ok(order)
}

/// `modules` (paths below `lib/modules/VERSION/`) in order, prints [`MARK_MODULES_LOADED`] or a
/// line per failure, then [`MARK_SHELL`], and becomes a shell on the console with job control.
pub fn init_script(kernel_version: &str, modules: &[(String, String)]) -> String {
    let mut s = String::from(
        "#!/bin/sh\n\
         # /init of the initramfs that cargo xtask builds (xtask/src/linux.rs).\n\
         export PATH=/bin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev\n",
    );
    // The kernel's own clock at /init (seconds since its timekeeping started) and the TSC rate
    // it believes: `bench linux` turns them into TSC ticks (instructions in Bochs) under the
    // hypervisor and on bare Bochs.
    s.push_str(&format!(
        "echo \"{MARK_UP}$(uname -r), $(nproc) CPUs, uptime $(cut -d' ' -f1 /proc/uptime) s, \
         $(grep -m1 'cpu MHz' /proc/cpuinfo | tr -dc '0-9.') MHz\"\n"
    ));
    s.push_str("failed=\n");
    for (name, path) in modules {
        s.push_str(&format!(
            "insmod /lib/modules/{kernel_version}/{path} || {{ echo \"{MARK_INSMOD_FAILED}{name} failed\"; failed=1; }}\n"
        ));
    }
    s.push_str(&format!(
        "[ -n \"$failed\" ] || echo \"{MARK_MODULES_LOADED}\"\n\
         echo \"{MARK_SHELL}\"\n\
         export PS1='{PROMPT}'\n\
         # setsid + cttyhack: the shell gets the console as its controlling tty (job control).\n\
         exec setsid cttyhack sh\n"
    ));
    s
}

/// Puts `node` at `path` in `tree`, with any missing parent directories (mode 0755).
fn add(tree: &mut BTreeMap<String, Node>, path: String, node: Node) {
    let mut parent = path.as_str();
    while let Some((p, _)) = parent.rsplit_once('/') {
        tree.entry(p.to_string())
            .or_insert(Node::Dir { mode: 0o755 });
        parent = p;
    }
    tree.insert(path, node);
}

/// Runs Debian's `mke2fs` applet when invoked as `mkfs.ext2` (not an applet name there).
const MKFS_EXT2: &str = "#!/bin/sh\nexec mke2fs \"$@\"\n";

/// Everything in the initramfs, sorted by path (so parents come first and the order does not
/// depend on the inputs'): the base directories, `/dev/console`, busybox with a symlink per
/// applet in `bin/`, the modules at their paths and `/init`.
pub fn initramfs_entries(
    kernel_version: &str,
    busybox: &[u8],
    applets: &[String],
    modules: &[Module],
) -> Result<Vec<Entry>, String> {
    let mut tree: BTreeMap<String, Node> = BTreeMap::new();
    for d in ["bin", "dev", "proc", "sys", "mnt"] {
        add(&mut tree, d.into(), Node::Dir { mode: 0o755 });
    }
    add(&mut tree, "tmp".into(), Node::Dir { mode: 0o1777 });
    add(
        &mut tree,
        "dev/console".into(),
        Node::CharDev {
            mode: 0o600,
            major: 5,
            minor: 1,
        },
    );
    add(
        &mut tree,
        "bin/busybox".into(),
        Node::File {
            mode: 0o755,
            data: busybox.to_vec(),
        },
    );
    for a in applets {
        if a.is_empty() || a.contains('/') || a == "busybox" {
            continue;
        }
        let target = "busybox".to_string();
        add(&mut tree, format!("bin/{a}"), Node::Symlink { target });
    }
    let has = |a: &str| applets.iter().any(|x| x == a);
    if !has("mkfs.ext2") && has("mke2fs") {
        let data = MKFS_EXT2.as_bytes().to_vec();
        add(
            &mut tree,
            "bin/mkfs.ext2".into(),
            Node::File { mode: 0o755, data },
        );
    }
    let missing: Vec<&str> = APPLETS_NEEDED
        .iter()
        .copied()
        .filter(|a| !tree.contains_key(&format!("bin/{a}")))
        .collect();
    if !missing.is_empty() {
        return Err(format!("busybox lacks applets: {}", missing.join(", ")));
    }
    let modules = load_order(modules)?;
    for m in &modules {
        let path = format!("lib/modules/{kernel_version}/{}", m.path);
        let data = m.data.clone();
        add(&mut tree, path, Node::File { mode: 0o644, data });
    }
    let loads: Vec<(String, String)> = modules
        .iter()
        .map(|m| (m.name.clone(), m.path.clone()))
        .collect();
    let data = init_script(kernel_version, &loads).into_bytes();
    add(&mut tree, "init".into(), Node::File { mode: 0o755, data });
    Ok(tree
        .into_iter()
        .map(|(path, node)| Entry { path, node })
        .collect())
}

// ---------------------------------------------------------------------------------------------
// Fetching (apt-get download, dpkg-deb -x) and the cache.

/// A kernel, unpacked.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// `linux-image-6.1.0-48-cloud-amd64`.
    pub package: String,
    /// `6.1.0-48-cloud-amd64`, as `uname -r` says.
    pub version: String,
    /// `boot/vmlinuz-VERSION`, a bzImage.
    pub bzimage: PathBuf,
    /// `lib/modules/VERSION/`.
    pub modules: PathBuf,
}

/// A flavour's kernel and the initramfs for it.
#[derive(Clone, Debug)]
pub struct Linux {
    pub kernel: Kernel,
    /// `target/linux/initramfs-VERSION.cpio`.
    pub initramfs: PathBuf,
}

/// Scenarios may ask from several threads; one fetch at a time (apt takes locks, and two
/// unpackings of one package would race). Other processes are kept safe by renaming complete
/// files and trees into place.
static FETCH: Mutex<()> = Mutex::new(());
/// Whether this process already ran `apt-get update` (once at most).
static UPDATED: AtomicBool = AtomicBool::new(false);

/// The flavour's kernel and initramfs, fetched and built if not cached.
pub fn prepare(flavour: Flavour) -> Result<Linux, String> {
    let _guard = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    let kernel = kernel(flavour)?;
    let busybox = fetch_package("busybox-static", &["bin/busybox"])?.join("bin/busybox");
    let initramfs = build_initramfs(&kernel, &busybox)?;
    Ok(Linux { kernel, initramfs })
}

fn cache_dir() -> PathBuf {
    root().join("target").join("linux")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

/// Runs an apt or dpkg tool in the C locale (its output is parsed), capturing its output.
fn tool(program: &str, args: &[&str], dir: Option<&Path>) -> Result<Output, String> {
    let mut cmd = Command::new(program);
    cmd.args(args).env("LC_ALL", "C");
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    cmd.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            let package = if program.starts_with("dpkg") {
                "dpkg"
            } else {
                "apt"
            };
            format!(
                "{program} is not installed (Debian package {package}); this needs a Debian 12 host"
            )
        } else {
            format!("cannot start {program}: {e}")
        }
    })
}

fn stderr_of(o: &Output) -> String {
    let text = String::from_utf8_lossy(&o.stderr);
    let text = if text.trim().is_empty() {
        String::from_utf8_lossy(&o.stdout)
    } else {
        text
    };
    text.trim().to_string()
}

/// Makes sure apt knows `package`, running `apt-get update` once as root (a fresh machine may
/// have empty lists); not root, the error gives the command to run.
fn ensure_known(package: &str) -> Result<(), String> {
    let known = |p: &str| tool("apt-cache", &["show", p], None).map(|o| o.status.success());
    if known(package)? {
        return Ok(());
    }
    if !is_root() {
        return Err(format!(
            "apt does not know {package} (are the package lists empty?); run\n  \
             sudo apt-get update\nand then this command again"
        ));
    }
    if !UPDATED.swap(true, Ordering::SeqCst) {
        eprintln!("xtask: apt does not know {package}: running apt-get update");
        let o = tool("apt-get", &["update", "-qq"], None)?;
        if !o.status.success() {
            return Err(format!(
                "apt-get update failed (no network?):\n{}",
                stderr_of(&o)
            ));
        }
    }
    if known(package)? {
        Ok(())
    } else {
        Err(format!(
            "apt does not know {package}, even after apt-get update: is this Debian 12 (bookworm) with its main component?"
        ))
    }
}

/// The versioned image package of `flavour`: recorded in the cache, else from
/// `apt-cache depends`.
fn resolve(flavour: Flavour) -> Result<String, String> {
    let meta = flavour.meta_package();
    let record = cache_dir().join(format!("{meta}.resolved"));
    if let Ok(text) = std::fs::read_to_string(&record) {
        let name = text.trim();
        if !name.is_empty() {
            return Ok(name.to_string());
        }
    }
    ensure_known(meta)?;
    let o = tool("apt-cache", &["depends", meta], None)?;
    let text = String::from_utf8_lossy(&o.stdout);
    let name = versioned_image(&text, flavour).ok_or_else(|| {
        format!(
            "`apt-cache depends {meta}` names no linux-image-ABI{} package:\n{}{}",
            flavour.suffix(),
            text,
            stderr_of(&o)
        )
    })?;
    write_atomic(&record, format!("{name}\n").as_bytes())?;
    Ok(name)
}

fn kernel(flavour: Flavour) -> Result<Kernel, String> {
    let package = resolve(flavour)?;
    let version = package
        .strip_prefix("linux-image-")
        .expect("versioned_image checked the prefix")
        .to_string();
    let bzimage = format!("boot/vmlinuz-{version}");
    let modules = format!("lib/modules/{version}/kernel");
    let dir = fetch_package(&package, &[&bzimage, &modules])?;
    Ok(Kernel {
        bzimage: dir.join(bzimage),
        modules: dir.join("lib/modules").join(&version),
        package,
        version,
    })
}

/// `target/linux/PACKAGE/`, downloaded and unpacked unless it is there holding `expect`.
fn fetch_package(package: &str, expect: &[&str]) -> Result<PathBuf, String> {
    let dir = cache_dir().join(package);
    let complete = |d: &Path| expect.iter().all(|p| d.join(p).exists());
    if dir.is_dir() {
        if complete(&dir) {
            return Ok(dir);
        }
        eprintln!("xtask: {} is incomplete, unpacking again", dir.display());
        std::fs::remove_dir_all(&dir).map_err(|e| format!("remove {}: {e}", dir.display()))?;
    }
    let deb = download(package)?;
    let partial = cache_dir().join(format!(".partial-{package}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).map_err(|e| format!("create {}: {e}", partial.display()))?;
    let deb_arg = deb.to_string_lossy();
    let part_arg = partial.to_string_lossy();
    let unpacked = tool("dpkg-deb", &["-x", &deb_arg, &part_arg], None).and_then(|o| {
        if o.status.success() {
            Ok(())
        } else {
            Err(format!(
                "dpkg-deb -x {} failed:\n{}",
                deb.display(),
                stderr_of(&o)
            ))
        }
    });
    if let Err(e) = unpacked {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(e);
    }
    if !complete(&partial) {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(format!(
            "{} holds none of: {}",
            deb.display(),
            expect.join(", ")
        ));
    }
    if std::fs::rename(&partial, &dir).is_err() {
        // Another process unpacked it first: keep its tree.
        let _ = std::fs::remove_dir_all(&partial);
        if !complete(&dir) {
            return Err(format!(
                "cannot move an unpacked {package} to {}",
                dir.display()
            ));
        }
    }
    Ok(dir)
}

/// `target/linux/debs/PACKAGE_*.deb`, downloaded unless it is there.
fn download(package: &str) -> Result<PathBuf, String> {
    let debs = cache_dir().join("debs");
    let find = |dir: &Path| -> Option<PathBuf> {
        let prefix = format!("{package}_");
        std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            (name.starts_with(&prefix) && name.ends_with(".deb")).then(|| e.path())
        })
    };
    if let Some(deb) = find(&debs) {
        return Ok(deb);
    }
    ensure_known(package)?;
    let partial = debs.join(format!(".partial-{package}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).map_err(|e| format!("create {}: {e}", partial.display()))?;
    eprintln!("xtask: downloading {package} (apt-get download)");
    // As root apt fetches as the _apt user, who cannot write here: it would warn and go on
    // unsandboxed. Saying so keeps the output quiet.
    let mut args = vec!["download", "-q"];
    if is_root() {
        args.extend(["-o", "APT::Sandbox::User=root"]);
    }
    args.push(package);
    let o = tool("apt-get", &args, Some(&partial))?;
    let got = find(&partial);
    let Some(deb) = got.filter(|_| o.status.success()) else {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(format!(
            "cannot fetch {package} (no network, or no mirror?); the command was\n  \
             cd {} && apt-get {}\n{}",
            debs.display(),
            args.join(" "),
            stderr_of(&o)
        ));
    };
    let name = deb.file_name().expect("a file");
    let to = debs.join(name);
    let moved = std::fs::rename(&deb, &to);
    let _ = std::fs::remove_dir_all(&partial);
    moved.map_err(|e| format!("move {} -> {}: {e}", deb.display(), to.display()))?;
    Ok(to)
}

/// Writes `path` through a temporary file and a rename, so readers see old or new bytes.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let dir = path.parent().expect("a file in a folder");
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let name = path.file_name().expect("a file").to_string_lossy();
    let tmp = dir.join(format!(".{name}.{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| format!("write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("rename to {}: {e}", path.display()))
}

/// Every file below `dir`, relative to it, `/`-separated.
fn files_below(dir: &Path) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|e| format!("read {}: {e}", d.display()))?;
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(rel) = p.strip_prefix(dir) {
                out.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The applets of the busybox at `busybox` (`busybox --list`, run here: it is a static x86_64
/// executable).
fn applets(busybox: &Path) -> Result<Vec<String>, String> {
    let o = Command::new(busybox)
        .arg("--list")
        .output()
        .map_err(|e| format!("cannot run {} --list: {e}", busybox.display()))?;
    if !o.status.success() {
        return Err(format!(
            "{} --list failed: {}",
            busybox.display(),
            stderr_of(&o)
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect())
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))
}

/// `target/linux/initramfs-VERSION.cpio` for `kernel`, written when its bytes change.
fn build_initramfs(kernel: &Kernel, busybox: &Path) -> Result<PathBuf, String> {
    let files = files_below(&kernel.modules.join("kernel"))?;
    let paths = locate_modules(&files, MODULES).map_err(|e| {
        format!(
            "kernel {} lacks modules the initramfs needs under {}: {e}",
            kernel.version,
            kernel.modules.join("kernel").display()
        )
    })?;
    let mut modules = Vec::new();
    for (name, path) in MODULES.iter().zip(paths) {
        let data = read(&kernel.modules.join(&path))?;
        modules.push(Module {
            name: name.to_string(),
            path,
            data,
        });
    }
    let entries = initramfs_entries(
        &kernel.version,
        &read(busybox)?,
        &applets(busybox)?,
        &modules,
    )?;
    let bytes = newc(&entries)?;
    let out = cache_dir().join(format!("initramfs-{}.cpio", kernel.version));
    if std::fs::read(&out).ok().as_deref() != Some(bytes.as_slice()) {
        write_atomic(&out, &bytes)?;
    }
    Ok(out)
}

/// `cargo xtask linux [cloud|generic]`: fetches and builds (both flavours unless one is named)
/// and prints the paths.
pub fn run(args: &[String]) -> Result<(), String> {
    let flavours: Vec<Flavour> = match args {
        [] => Flavour::ALL.to_vec(),
        [one] => vec![
            Flavour::parse(one)
                .ok_or_else(|| format!("linux: unknown flavour '{one}' (cloud or generic)"))?,
        ],
        _ => return Err("usage: cargo xtask linux [cloud|generic]".into()),
    };
    for f in flavours {
        let l = prepare(f)?;
        let size = std::fs::metadata(&l.initramfs)
            .map(|m| m.len())
            .unwrap_or(0);
        println!("{} {} ({})", f.name(), l.kernel.version, l.kernel.package);
        println!("  kernel     {}", l.kernel.bzimage.display());
        println!("  modules    {}", l.kernel.modules.display());
        println!("  initramfs  {} ({size} bytes)", l.initramfs.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member read back from a newc archive.
    #[derive(Debug, PartialEq, Eq)]
    struct Member {
        ino: u32,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        name: String,
        data: Vec<u8>,
    }

    /// Reads a newc archive, checking the magic, the zero fields, the 4-byte alignment of every
    /// header and data, and that the trailer ends it exactly.
    fn read_newc(mut a: &[u8]) -> Vec<Member> {
        let total = a.len();
        let mut out = Vec::new();
        loop {
            assert_eq!((total - a.len()) % 4, 0, "header not aligned");
            assert_eq!(&a[..6], NEWC_MAGIC);
            let field = |i: usize| {
                let s = std::str::from_utf8(&a[6 + 8 * i..14 + 8 * i]).expect("ascii");
                u32::from_str_radix(s, 16).expect("hex")
            };
            let (ino, mode, uid, gid, nlink, mtime, size) = (
                field(0),
                field(1),
                field(2),
                field(3),
                field(4),
                field(5),
                field(6),
            );
            assert_eq!(
                (uid, gid, mtime, field(7), field(8), field(12)),
                (0, 0, 0, 0, 0, 0)
            );
            let rdev = (field(9), field(10));
            let namesize = field(11) as usize;
            let name_end = 110 + namesize;
            assert_eq!(a[name_end - 1], 0, "name not NUL-terminated");
            let name = std::str::from_utf8(&a[110..name_end - 1])
                .expect("utf-8")
                .to_string();
            let data_at = name_end.next_multiple_of(4);
            assert!(a[name_end..data_at].iter().all(|&b| b == 0), "name padding");
            let data_end = data_at + size as usize;
            let next = data_end.next_multiple_of(4);
            assert!(a[data_end..next].iter().all(|&b| b == 0), "data padding");
            let data = a[data_at..data_end].to_vec();
            a = &a[next..];
            if name == TRAILER {
                assert!(a.is_empty(), "bytes after the trailer");
                return out;
            }
            out.push(Member {
                ino,
                mode,
                nlink,
                rdev,
                name,
                data,
            });
        }
    }

    fn file(path: &str, data: &[u8]) -> Entry {
        Entry {
            path: path.into(),
            node: Node::File {
                mode: 0o644,
                data: data.to_vec(),
            },
        }
    }

    #[test]
    fn one_file_archive_is_exactly_these_bytes() {
        let got = newc(&[file("a", b"hi\n")]).unwrap();
        // Magic, then ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
        // rdevmajor, rdevminor, namesize, check; name, data, each padded to 4 bytes.
        let want = concat!(
            "070701",
            "00000001",
            "000081A4",
            "00000000",
            "00000000",
            "00000001",
            "00000000",
            "00000003",
            "00000000",
            "00000000",
            "00000000",
            "00000000",
            "00000002",
            "00000000",
            "a\0",
            "hi\n\0",
            "070701",
            "00000000",
            "00000000",
            "00000000",
            "00000000",
            "00000001",
            "00000000",
            "00000000",
            "00000000",
            "00000000",
            "00000000",
            "00000000",
            "0000000B",
            "00000000",
            "TRAILER!!!\0\0\0\0",
        )
        .as_bytes();
        assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(want));
        assert_eq!(got.len(), 112 + 4 + 124);
    }

    #[test]
    fn every_kind_reads_back_with_padding() {
        let entries = vec![
            Entry {
                path: "dev".into(),
                node: Node::Dir { mode: 0o755 },
            },
            Entry {
                path: "dev/console".into(),
                node: Node::CharDev {
                    mode: 0o600,
                    major: 5,
                    minor: 1,
                },
            },
            // Names and data of every length modulo 4.
            file("b", b""),
            file("bb", b"1"),
            file("bbb", b"12"),
            file("bbbb", b"123"),
            file("bbbbb", b"1234"),
            Entry {
                path: "sh".into(),
                node: Node::Symlink {
                    target: "busybox".into(),
                },
            },
        ];
        let back = read_newc(&newc(&entries).unwrap());
        assert_eq!(back.len(), entries.len());
        assert_eq!(back[0].mode, 0o040_755);
        assert_eq!(back[0].nlink, 2);
        assert_eq!((back[1].mode, back[1].rdev), (0o020_600, (5, 1)));
        assert!(back[1].data.is_empty());
        for (i, n) in (2..7).zip(0..5) {
            assert_eq!(back[i].name, "b".repeat(n + 1));
            assert_eq!(back[i].data, &b"1234"[..n]);
            assert_eq!(back[i].mode, 0o100_644);
        }
        assert_eq!(
            (back[7].mode, back[7].data.as_slice()),
            (0o120_777, &b"busybox"[..])
        );
        let inos: Vec<u32> = back.iter().map(|m| m.ino).collect();
        assert_eq!(inos, (1..=8).collect::<Vec<_>>());
    }

    #[test]
    fn bad_names_are_refused() {
        assert!(newc(&[file("/abs", b"")]).is_err());
        assert!(newc(&[file("", b"")]).is_err());
        assert!(newc(&[file("a\0b", b"")]).is_err());
    }

    #[test]
    fn versioned_image_from_apt_cache_depends() {
        let cloud = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-48-cloud-amd64\n";
        assert_eq!(
            versioned_image(cloud, Flavour::Cloud).as_deref(),
            Some("linux-image-6.1.0-48-cloud-amd64")
        );
        // The generic flavour takes neither the cloud nor the rt package.
        assert_eq!(versioned_image(cloud, Flavour::Generic), None);
        let generic = "linux-image-amd64\n  Depends: <linux-image-virtual>\n  \
                       Depends: linux-image-6.1.0-48-rt-amd64\n  \
                       Depends: linux-image-6.1.0-48-amd64\n  Recommends: firmware\n";
        assert_eq!(
            versioned_image(generic, Flavour::Generic).as_deref(),
            Some("linux-image-6.1.0-48-amd64")
        );
        assert_eq!(versioned_image("", Flavour::Cloud), None);
        assert_eq!(
            versioned_image("E: No packages found\n", Flavour::Cloud),
            None
        );
    }

    fn kernel_tree() -> Vec<String> {
        [
            "drivers/virtio/virtio.ko",
            "drivers/virtio/virtio_ring.ko",
            "drivers/virtio/virtio_mmio.ko",
            "drivers/virtio/virtio_balloon.ko",
            "drivers/virtio/virtio_pci.ko",
            "drivers/block/virtio_blk.ko",
            "drivers/net/net_failover.ko",
            "drivers/net/virtio_net.ko",
            "drivers/char/virtio_console.ko",
            "net/core/failover.ko",
            "drivers/misc/pvpanic/pvpanic.ko",
            "drivers/misc/pvpanic/pvpanic-mmio.ko",
            "drivers/misc/pvpanic/pvpanic-pci.ko",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    #[test]
    fn modules_are_found_at_their_paths() {
        let got = locate_modules(&kernel_tree(), MODULES).unwrap();
        assert_eq!(got.len(), MODULES.len());
        assert_eq!(got[0], "kernel/drivers/virtio/virtio.ko");
        assert_eq!(got[4], "kernel/net/core/failover.ko");
        assert_eq!(got[8], "kernel/drivers/char/virtio_console.ko");
        assert_eq!(got[10], "kernel/drivers/misc/pvpanic/pvpanic-mmio.ko");
    }

    #[test]
    fn a_missing_module_is_named() {
        let tree: Vec<String> = kernel_tree()
            .into_iter()
            .filter(|f| !f.ends_with("/virtio_net.ko"))
            .collect();
        let e = locate_modules(&tree, MODULES).unwrap_err();
        assert_eq!(e, "virtio_net.ko is missing");
        let mut twice = kernel_tree();
        twice.push("drivers/staging/virtio.ko".into());
        assert!(
            locate_modules(&twice, MODULES)
                .unwrap_err()
                .contains("virtio.ko is there 2 times")
        );
    }

    /// A fake `.ko`: some bytes, then `.modinfo`-like NUL-separated strings.
    fn ko(depends: &str) -> Vec<u8> {
        format!("\x7fELF junk\0license=GPL\0depends={depends}\0name=x\0").into_bytes()
    }

    fn module(name: &str, depends: &str) -> Module {
        Module {
            name: name.into(),
            path: format!("kernel/drivers/{name}.ko"),
            data: ko(depends),
        }
    }

    #[test]
    fn load_order_follows_depends() {
        assert_eq!(modinfo_depends(&ko("")), Vec::<String>::new());
        assert_eq!(
            modinfo_depends(&ko("virtio,virtio_ring")),
            ["virtio", "virtio_ring"]
        );
        assert_eq!(modinfo_depends(b"no modinfo here"), Vec::<String>::new());
        let good = [
            module("virtio", ""),
            module("virtio_ring", ""),
            module("virtio_blk", "virtio,virtio_ring"),
        ];
        let names = |ms: &[Module]| -> Vec<String> {
            load_order(ms)
                .unwrap()
                .iter()
                .map(|m| m.name.clone())
                .collect()
        };
        assert_eq!(names(&good), ["virtio", "virtio_ring", "virtio_blk"]);
        // 6.1.0-57: virtio itself depends on virtio_ring; listed first, it loads second.
        let moved = [
            module("virtio", "virtio_ring"),
            module("virtio_ring", ""),
            module("virtio_blk", "virtio,virtio_ring"),
        ];
        assert_eq!(names(&moved), ["virtio_ring", "virtio", "virtio_blk"]);
        let missing = [module("virtio_blk", "virtio"), module("virtio_ring", "")];
        assert!(
            load_order(&missing)
                .unwrap_err()
                .contains("virtio_blk depends on virtio, which the initramfs does not carry")
        );
        let cycle = [module("a", "b"), module("b", "a"), module("c", "")];
        assert!(
            load_order(&cycle)
                .unwrap_err()
                .contains("modules a, b depend on each other")
        );
    }

    fn applets() -> Vec<String> {
        let mut a: Vec<String> = APPLETS_NEEDED
            .iter()
            .filter(|a| **a != "mkfs.ext2")
            .map(|s| s.to_string())
            .collect();
        a.extend(["busybox".to_string(), "mke2fs".to_string()]);
        a
    }

    fn modules() -> Vec<Module> {
        vec![
            module("virtio", ""),
            module("virtio_ring", ""),
            module("virtio_mmio", "virtio,virtio_ring"),
        ]
    }

    #[test]
    fn initramfs_is_reproducible_and_complete() {
        let build = |applets: &[String]| {
            newc(
                &initramfs_entries("6.1.0-48-cloud-amd64", b"BUSYBOX", applets, &modules())
                    .unwrap(),
            )
            .unwrap()
        };
        let a = build(&applets());
        assert_eq!(a, build(&applets()));
        let mut reversed = applets();
        reversed.reverse();
        assert_eq!(a, build(&reversed), "input order must not matter");

        let back = read_newc(&a);
        let get = |name: &str| {
            back.iter()
                .find(|m| m.name == name)
                .unwrap_or_else(|| panic!("{name}"))
        };
        assert_eq!(
            (get("dev/console").mode, get("dev/console").rdev),
            (0o020_600, (5, 1))
        );
        assert_eq!(get("bin/busybox").data, b"BUSYBOX");
        assert_eq!(get("bin/sh").data, b"busybox");
        assert_eq!(get("bin/mkfs.ext2").data, MKFS_EXT2.as_bytes());
        assert_eq!(get("tmp").mode, 0o041_777);
        for d in [
            "proc",
            "sys",
            "mnt",
            "lib/modules/6.1.0-48-cloud-amd64/kernel/drivers",
        ] {
            assert_eq!(get(d).mode, 0o040_755, "{d}");
        }
        let m = get("lib/modules/6.1.0-48-cloud-amd64/kernel/drivers/virtio_mmio.ko");
        assert_eq!(m.data, ko("virtio,virtio_ring"));
        // Every member's parent comes before it.
        for (i, m) in back.iter().enumerate() {
            if let Some((parent, _)) = m.name.rsplit_once('/') {
                assert!(back[..i].iter().any(|p| p.name == parent), "{}", m.name);
            }
        }
        let init = String::from_utf8(get("init").data.clone()).unwrap();
        assert_eq!(get("init").mode, 0o100_755);
        assert!(init.starts_with("#!/bin/sh\n"));
        let mount = init.find("mount -t devtmpfs").unwrap();
        let up = init.find(MARK_UP).unwrap();
        let first = init
            .find("insmod /lib/modules/6.1.0-48-cloud-amd64/kernel/drivers/virtio.ko ||")
            .unwrap();
        let last = init.find("kernel/drivers/virtio_mmio.ko").unwrap();
        let shell = init.find("exec setsid cttyhack sh").unwrap();
        assert!(mount < up && up < first && first < last && last < shell);
        assert!(init.contains("linux-init: insmod virtio_ring failed"));
        assert!(init.contains(MARK_MODULES_LOADED) && init.contains(MARK_SHELL));
    }

    #[test]
    fn missing_applets_are_named() {
        let few = vec!["sh".to_string()];
        let e = initramfs_entries("v", b"", &few, &[]).unwrap_err();
        assert!(
            e.contains("mount") && e.contains("mkfs.ext2") && !e.contains(" sh,"),
            "{e}"
        );
    }

    #[test]
    fn up_line_matches_its_pattern() {
        let re = regex::Regex::new(UP_PATTERN).unwrap();
        let line = format!("{MARK_UP}6.1.0-48-cloud-amd64, 2 CPUs, uptime 23.41 s, 4.000 MHz");
        let c = re.captures(&line).unwrap();
        assert_eq!(
            (&c[1], &c[2], &c[3], &c[4]),
            ("6.1.0-48-cloud-amd64", "2", "23.41", "4.000")
        );
        let re = regex::Regex::new(INSMOD_FAILED_PATTERN).unwrap();
        assert_eq!(
            &re.captures("linux-init: insmod virtio_net failed").unwrap()[1],
            "virtio_net"
        );
    }
}
