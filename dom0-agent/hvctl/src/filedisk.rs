//! A disk-image file as a [`BlockDevice`]: positional reads and writes, `flush` = `fdatasync`.
//!
//! Synchronous calls run on the caller's thread. Submitted requests go to a small pool of
//! worker threads owned by the disk (started at the first submission, so tools that never
//! submit never start one; with 0 workers they are performed at submission), each doing `pread`/`pwrite`/`fdatasync` on the shared file, so up
//! to that many requests are in the kernel at once; completions come back on a channel and
//! [`BlockDevice::reap`] collects them. The queues are `crossbeam-channel` channels (a
//! multi-consumer work queue that std's `mpsc` does not offer). Dropping the disk closes the
//! work queue and joins the workers after the requests already queued.
//!
//! `HVCTL_DISK_DELAY_US=N` in the environment makes every worker wait N microseconds before
//! each submitted request, like a disk with that latency: a testing aid (the NBD tests use it
//! to show requests of several clients in flight at once on image files in RAM).
//!
//! [`FileDisk::open_direct`] opens with `O_DIRECT` (the page cache bypassed, so every request
//! waits for the device), going through 4 KiB-aligned bounce buffers as `O_DIRECT` requires.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use volmgr::dev::{BLOCK, BLOCK_SIZE, Completion, Request, check_range};
use volmgr::{BlockDevice, DevError};

/// Worker threads per disk unless [`FileDisk::set_workers`] says otherwise.
pub const DEFAULT_WORKERS: usize = 4;

/// The worker pool of one disk.
struct Workers {
    work: Option<Sender<(u64, Request)>>,
    done: Receiver<Completion>,
    threads: Vec<JoinHandle<()>>,
    in_flight: usize,
}

impl Drop for Workers {
    fn drop(&mut self) {
        // Closing the work queue ends each worker after what is already queued.
        self.work = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// An image file opened read-write, or read-only for inspection.
pub struct FileDisk {
    file: Arc<File>,
    direct: bool,
    blocks: u64,
    workers: usize,
    pool: Option<Workers>,
    /// Called after each submitted request completes ([`BlockDevice::set_waker`]).
    waker: Arc<std::sync::Mutex<Option<volmgr::dev::Waker>>>,
    /// Latency added to each submitted request (`HVCTL_DISK_DELAY_US`).
    delay: Option<std::time::Duration>,
}

/// Buffer alignment `O_DIRECT` asks for (offsets and lengths are whole blocks already).
const DIRECT_ALIGN: usize = 4096;

/// A zeroed buffer of `len` bytes at a 4 KiB-aligned address: the vector and the offset.
fn aligned(len: usize) -> io::Result<(Vec<u8>, usize)> {
    let v = vec![0u8; len + DIRECT_ALIGN];
    let off = v.as_ptr().align_offset(DIRECT_ALIGN);
    if off >= DIRECT_ALIGN {
        return Err(io::Error::other("no aligned offset in the bounce buffer"));
    }
    Ok((v, off))
}

fn write_at(file: &File, direct: bool, buf: &[u8], at: u64) -> io::Result<()> {
    if !direct {
        return file.write_all_at(buf, at);
    }
    let (mut v, o) = aligned(buf.len())?;
    let b = &mut v[o..o + buf.len()];
    b.copy_from_slice(buf);
    file.write_all_at(b, at)
}

fn read_at(file: &File, direct: bool, buf: &mut [u8], at: u64) -> io::Result<()> {
    if !direct {
        return file.read_exact_at(buf, at);
    }
    let (mut v, o) = aligned(buf.len())?;
    let b = &mut v[o..o + buf.len()];
    file.read_exact_at(b, at)?;
    buf.copy_from_slice(b);
    Ok(())
}

/// Performs one request on `file` of `blocks` blocks (a worker's whole job).
fn perform(file: &File, direct: bool, blocks: u64, tag: u64, req: Request) -> Completion {
    let (result, data) = match req {
        Request::Read { lba, blocks: n } => {
            let len = usize::try_from(n)
                .ok()
                .and_then(|n| n.checked_mul(BLOCK_SIZE));
            match len.map(|len| (len, check_range(blocks, lba, len))) {
                Some((len, Ok(()))) => {
                    let mut buf = vec![0u8; len];
                    match read_at(file, direct, &mut buf, lba * BLOCK) {
                        Ok(()) => (Ok(()), buf),
                        Err(_) => (Err(DevError::Io), Vec::new()),
                    }
                }
                Some((_, Err(e))) => (Err(e), Vec::new()),
                None => (Err(DevError::OutOfRange), Vec::new()),
            }
        }
        Request::Write { lba, data } => {
            let buf = data.bytes();
            let r = check_range(blocks, lba, buf.len())
                .and_then(|()| write_at(file, direct, buf, lba * BLOCK).map_err(|_| DevError::Io));
            (r, Vec::new())
        }
        Request::Flush => (file.sync_data().map_err(|_| DevError::Io), Vec::new()),
    };
    Completion { tag, result, data }
}

impl FileDisk {
    /// Opens `path`; with `create_size`, creates or extends it to that many bytes.
    pub fn open(path: &Path, create_size: Option<u64>) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create_size.is_some())
            .truncate(false)
            .open(path)?;
        if let Some(size) = create_size
            && file.metadata()?.len() < size
        {
            file.set_len(size)?;
        }
        Ok(Self::of(file, false))
    }

    /// Opens an existing `path` read-write with `O_DIRECT`: requests bypass the page cache.
    pub fn open_direct(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)?;
        Ok(Self::of(file, true))
    }

    /// Opens `path` read-only (writes then fail with an I/O error): for commands that only
    /// look, so they work on read-only images.
    pub fn open_read_only(path: &Path) -> std::io::Result<Self> {
        Ok(Self::of(File::open(path)?, false))
    }

    fn of(file: File, direct: bool) -> Self {
        let blocks = file.metadata().map_or(0, |m| m.len()) / BLOCK;
        let delay = std::env::var("HVCTL_DISK_DELAY_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(std::time::Duration::from_micros);
        Self {
            file: Arc::new(file),
            direct,
            blocks,
            workers: DEFAULT_WORKERS,
            pool: None,
            waker: Arc::default(),
            delay,
        }
    }

    /// Sets how many worker threads serve submitted requests; takes effect when the pool
    /// starts, at the first submission. 0 performs submitted requests at once on the caller's
    /// thread (for files whose requests complete in CPU time, as on tmpfs, where a hand-off
    /// to a thread costs more than the request).
    pub fn set_workers(&mut self, n: usize) {
        self.workers = n;
    }

    fn workers(&mut self) -> &mut Workers {
        let (file, direct, blocks, n) = (&self.file, self.direct, self.blocks, self.workers);
        let (waker, delay) = (&self.waker, self.delay);
        self.pool.get_or_insert_with(|| {
            let (work, jobs) = crossbeam_channel::unbounded::<(u64, Request)>();
            let (done_tx, done) = crossbeam_channel::unbounded();
            let threads = (0..n)
                .map(|_| {
                    let (jobs, done_tx, file) = (jobs.clone(), done_tx.clone(), file.clone());
                    let waker = waker.clone();
                    std::thread::spawn(move || {
                        for (tag, req) in jobs {
                            if let Some(d) = delay {
                                std::thread::sleep(d);
                            }
                            let c = perform(&file, direct, blocks, tag, req);
                            if done_tx.send(c).is_err() {
                                break;
                            }
                            // After the send: whoever wakes finds the completion.
                            let w = waker
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .clone();
                            if let Some(w) = w {
                                w();
                            }
                        }
                    })
                })
                .collect();
            Workers {
                work: Some(work),
                done,
                threads,
                in_flight: 0,
            }
        })
    }
}

impl BlockDevice for FileDisk {
    fn num_blocks(&self) -> u64 {
        self.blocks
    }
    fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), DevError> {
        check_range(self.blocks, lba, buf.len())?;
        read_at(&self.file, self.direct, buf, lba * BLOCK).map_err(|_| DevError::Io)
    }
    fn write(&mut self, lba: u64, buf: &[u8]) -> Result<(), DevError> {
        check_range(self.blocks, lba, buf.len())?;
        write_at(&self.file, self.direct, buf, lba * BLOCK).map_err(|_| DevError::Io)
    }
    fn flush(&mut self) -> Result<(), DevError> {
        self.file.sync_data().map_err(|_| DevError::Io)
    }
    fn queue_depth(&self) -> usize {
        self.pool.as_ref().map_or(0, |w| w.in_flight)
    }
    fn waits_on_medium(&self) -> bool {
        // Without O_DIRECT a write lands in the page cache in CPU time.
        self.direct
    }
    fn submit(&mut self, tag: u64, req: Request) -> Option<Completion> {
        if self.workers == 0 {
            return Some(perform(&self.file, self.direct, self.blocks, tag, req));
        }
        let w = self.workers();
        let sent = w.work.as_ref().map(|s| s.send((tag, req)));
        match sent {
            Some(Ok(())) => {
                w.in_flight += 1;
                None
            }
            // The workers are gone (cannot happen while the disk lives): the request fails.
            _ => Some(Completion {
                tag,
                result: Err(DevError::Gone),
                data: Vec::new(),
            }),
        }
    }
    fn set_waker(&mut self, waker: volmgr::dev::Waker) -> bool {
        *self
            .waker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(waker);
        true
    }
    fn reap(&mut self, out: &mut Vec<Completion>, wait: bool) {
        let Some(w) = self.pool.as_mut() else {
            return;
        };
        let before = out.len();
        while let Ok(c) = w.done.try_recv() {
            w.in_flight -= 1;
            out.push(c);
        }
        if wait && out.len() == before && w.in_flight > 0 {
            if let Ok(c) = w.done.recv() {
                w.in_flight -= 1;
                out.push(c);
            }
            while let Ok(c) = w.done.try_recv() {
                w.in_flight -= 1;
                out.push(c);
            }
        }
    }
}

const _: () = assert!(BLOCK_SIZE == 4096);

#[cfg(test)]
mod tests {
    use super::*;
    use volmgr::dev::WriteData;

    #[test]
    fn submitted_requests_complete_through_the_workers() {
        let dir = std::env::temp_dir().join(format!("hvctl-filedisk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.img");
        let mut d = FileDisk::open(&path, Some(64 * 4096)).unwrap();
        d.set_workers(3);
        for t in 0..64u64 {
            let data = WriteData::new(&[t as u8; 4096]);
            assert!(d.submit(t, Request::Write { lba: t, data }).is_none());
        }
        assert!(d.queue_depth() > 0);
        let mut out = Vec::new();
        while d.queue_depth() > 0 {
            d.reap(&mut out, true);
        }
        assert_eq!(out.len(), 64);
        assert!(out.iter().all(|c| c.result.is_ok()));
        assert!(d.submit(99, Request::Flush).is_none());
        assert!(
            d.submit(
                100,
                Request::Write {
                    lba: 64,
                    data: WriteData::new(&[0; 4096])
                }
            )
            .is_none()
        );
        for t in 0..8u64 {
            d.submit(200 + t, Request::Read { lba: t, blocks: 1 });
        }
        out.clear();
        while d.queue_depth() > 0 {
            d.reap(&mut out, true);
        }
        assert_eq!(out.len(), 10);
        for c in &out {
            match c.tag {
                99 => assert!(c.result.is_ok()),
                100 => assert_eq!(c.result, Err(DevError::OutOfRange)),
                t => assert_eq!(c.data, vec![(t - 200) as u8; 4096]),
            }
        }
        drop(d);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn direct_requests_go_through_aligned_bounce_buffers() {
        let dir = std::env::temp_dir().join(format!("hvctl-direct-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.img");
        drop(FileDisk::open(&path, Some(16 * 4096)).unwrap());
        // The bounce path itself, on any filesystem: the same bytes land where they should.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut d = FileDisk::of(file, true);
        let data: Vec<u8> = (0..2 * 4096).map(|i| (i % 251) as u8).collect();
        // An odd offset into a bigger buffer: the caller's bytes are not aligned.
        let mut big = vec![0u8; data.len() + 1];
        big[1..].copy_from_slice(&data);
        d.write(3, &big[1..]).unwrap();
        let mut back = vec![0u8; data.len() + 1];
        d.read(3, &mut back[1..]).unwrap();
        assert_eq!(&back[1..], &data[..]);
        let plain = std::fs::read(&path).unwrap();
        assert_eq!(&plain[3 * 4096..5 * 4096], &data[..]);
        // With O_DIRECT where the filesystem has it.
        if let Ok(mut d) = FileDisk::open_direct(&path) {
            d.set_workers(2);
            let w = WriteData::new(&data[..4096]);
            let mut out = Vec::new();
            if let Some(c) = d.submit(1, Request::Write { lba: 9, data: w }) {
                out.push(c);
            }
            while d.queue_depth() > 0 {
                d.reap(&mut out, true);
            }
            assert!(out.iter().all(|c| c.result.is_ok()), "{out:?}");
            let mut r = vec![0u8; 4096];
            d.read(9, &mut r).unwrap();
            assert_eq!(&r[..], &data[..4096]);
            assert!(d.waits_on_medium());
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
