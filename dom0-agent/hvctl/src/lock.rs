//! One owner per pool on this host: advisory `flock(2)` locks on every image of the pool.
//!
//! A command that changes the pool takes an exclusive lock on every image for as long as it
//! runs; a read-only command takes shared locks. Locks are taken without waiting, all or none:
//! the first image that is held by someone else ends the attempt, and the error names the
//! process holding it (from `/proc/locks`) and its command line.
//!
//! Why `flock` (through `std::fs::File::try_lock`), not POSIX or OFD record locks: it needs no
//! `unsafe` and no new dependency; the lock belongs to the open file description, so closing
//! another descriptor of the same image in this process (multipath opens one file twice) does
//! not drop it, which is the trap of POSIX locks; the kernel drops it when the process dies,
//! even by SIGKILL, so a crash never leaves a pool locked; and `/proc/locks` shows the pid
//! that took a `flock` lock, where OFD locks show `-1`, so the error can name the holder.
//! Its limits: advisory (it binds cooperating tools only), and one host only, which is what
//! the on-disk owner record ([`volmgr::format::Owner`]) is for.

use std::fs::{File, TryLockError};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Shared (read-only commands) or exclusive (commands that change the pool).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Shared,
    Exclusive,
}

/// Locks held on the images of a pool; dropping it releases them.
#[derive(Debug)]
pub struct PoolLock {
    _files: Vec<File>,
}

/// A process holding a lock on an image.
#[derive(Debug, Clone)]
pub struct Holder {
    pub pid: u32,
    pub exclusive: bool,
    pub cmdline: String,
}

/// Why the images could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{path}: {err}")]
    Open { path: PathBuf, err: std::io::Error },
    #[error("{}", held_message(.path, .holder.as_ref(), *.wanted))]
    Held {
        path: PathBuf,
        holder: Option<Holder>,
        wanted: Mode,
    },
}

fn held_message(path: &Path, holder: Option<&Holder>, wanted: Mode) -> String {
    let who = match holder {
        Some(h) => format!(
            "process {} ({}) holds it{}",
            h.pid,
            h.cmdline,
            if h.exclusive {
                " to change it"
            } else {
                " to read it"
            }
        ),
        None => "another process holds it".to_string(),
    };
    let what = match wanted {
        Mode::Exclusive => "change the pool",
        Mode::Shared => "read the pool",
    };
    format!(
        "{}: pool is in use: {who}; only one process may change a pool at a time, so this \
         command cannot {what} now (stop that process, or wait for it to finish)",
        path.display()
    )
}

/// Locks every image in `paths` (each file once, however often it is given) in `mode`.
pub fn lock_images(paths: &[PathBuf], mode: Mode) -> Result<PoolLock, LockError> {
    let mut seen = Vec::new();
    let mut files = Vec::new();
    for path in paths {
        let f = File::open(path).map_err(|err| LockError::Open {
            path: path.clone(),
            err,
        })?;
        let md = f.metadata().map_err(|err| LockError::Open {
            path: path.clone(),
            err,
        })?;
        if seen.contains(&(md.dev(), md.ino())) {
            continue;
        }
        seen.push((md.dev(), md.ino()));
        let r = match mode {
            Mode::Shared => f.try_lock_shared(),
            Mode::Exclusive => f.try_lock(),
        };
        match r {
            Ok(()) => files.push(f),
            Err(TryLockError::WouldBlock) => {
                return Err(LockError::Held {
                    path: path.clone(),
                    holder: holder_of(md.dev(), md.ino()),
                    wanted: mode,
                });
            }
            Err(TryLockError::Error(err)) => {
                return Err(LockError::Open {
                    path: path.clone(),
                    err,
                });
            }
        }
    }
    Ok(PoolLock { _files: files })
}

/// Linux's encoding of `st_dev` into major and minor numbers.
fn major_minor(dev: u64) -> (u64, u64) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major, minor)
}

/// The process holding a `flock` lock on the file (dev, ino), from `/proc/locks`.
pub fn holder_of(dev: u64, ino: u64) -> Option<Holder> {
    let text = std::fs::read_to_string("/proc/locks").ok()?;
    let (major, minor) = major_minor(dev);
    let mut by_ino = None;
    for line in text.lines() {
        // "N: FLOCK  ADVISORY  WRITE PID MAJ:MIN:INODE START END"; waiters have "->".
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.contains(&"->") || f.len() < 6 || f[1] != "FLOCK" {
            continue;
        }
        let Ok(pid) = f[4].parse::<u32>() else {
            continue;
        };
        let mut id = f[5].split(':');
        let (Some(ma), Some(mi), Some(i)) = (id.next(), id.next(), id.next()) else {
            continue;
        };
        if i.parse::<u64>().ok() != Some(ino) {
            continue;
        }
        let h = Holder {
            pid,
            exclusive: f[3] == "WRITE",
            cmdline: cmdline(pid),
        };
        if u64::from_str_radix(ma, 16).ok() == Some(major)
            && u64::from_str_radix(mi, 16).ok() == Some(minor)
        {
            return Some(h);
        }
        // Some file systems (overlay) show other device numbers: the inode alone will do.
        by_ino.get_or_insert(h);
    }
    by_ino
}

/// A process's command line, shortened, for messages.
pub fn cmdline(pid: u32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let mut words: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|w| !w.is_empty())
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    if let Some(first) = words.first_mut()
        && let Some(base) = Path::new(first.as_str()).file_name()
    {
        *first = base.to_string_lossy().into_owned();
    }
    // The disks are the pool's own, known to the reader: keep the command itself visible.
    let mut shown = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        if w == "-d" || w == "--disk" {
            it.next();
            if shown.last().is_none_or(|l| l != "-d ...") {
                shown.push("-d ...".to_string());
            }
        } else if !w.starts_with("--disk=") {
            shown.push(w);
        }
    }
    let mut s = shown.join(" ");
    if s.is_empty() {
        s = "command line unknown".into();
    }
    if s.len() > 120 {
        let mut n = 117;
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        s.truncate(n);
        s.push_str("...");
    }
    s
}

/// Who this process is, for the pool's owner record: `/etc/machine-id` (or the host name) as
/// the host id, unless `HVCTL_HOST_ID` overrides it (tests use it to play another host).
pub fn me(pool_id: u128, what: &str) -> volmgr::format::Owner {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let host_name = read("/proc/sys/kernel/hostname").unwrap_or_else(|| "unknown".into());
    let host_id = std::env::var("HVCTL_HOST_ID")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| read("/etc/machine-id"))
        .unwrap_or_else(|| host_name.clone());
    let time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    volmgr::format::Owner {
        pool_id,
        pid: std::process::id(),
        time,
        host_id,
        host_name,
        what: what.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_exclusive_lock_is_refused_and_names_this_process() {
        let dir = std::env::temp_dir().join(format!("hvctl-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.img");
        std::fs::write(&p, b"x").unwrap();
        // The same file given twice is locked once.
        let held = lock_images(&[p.clone(), p.clone()], Mode::Exclusive).unwrap();
        let e = lock_images(std::slice::from_ref(&p), Mode::Shared).unwrap_err();
        let LockError::Held { holder, .. } = &e else {
            panic!("{e}")
        };
        assert_eq!(holder.as_ref().map(|h| h.pid), Some(std::process::id()));
        assert!(e.to_string().contains("pool is in use"), "{e}");
        drop(held);
        let a = lock_images(std::slice::from_ref(&p), Mode::Shared).unwrap();
        let b = lock_images(std::slice::from_ref(&p), Mode::Shared).unwrap();
        assert!(lock_images(std::slice::from_ref(&p), Mode::Exclusive).is_err());
        drop((a, b));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn device_numbers_decode_like_linux() {
        assert_eq!(major_minor(0xfe00), (0xfe, 0));
        assert_eq!(major_minor(0x0803), (8, 3));
    }
}
