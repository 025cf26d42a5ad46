//! Test devices: a disk with a volatile write cache that can crash at any write boundary, a
//! fault-injecting wrapper (failing reads or writes, vanishing), and a queueing wrapper whose
//! requests complete in an order chosen by a seeded [`Interleave`] (a deterministic scheduler
//! of interleavings shared by every disk of a test). Used by this crate's tests and by tools
//! that want to exercise failure paths; nothing here is used on the production path.

use alloc::boxed::Box;
use alloc::collections::BTreeSet;
use alloc::sync::Arc;
use alloc::vec::Vec;

use crate::dev::{
    BLOCK_SIZE, BlockDevice, Completion, DevError, Request, check_range, complete_now,
};
use crate::{u, us};

/// State shared between a test and its devices (which may live in a pool served from several
/// threads, so devices are `Send`): a reference-counted lock used like a `RefCell`.
/// `borrow`/`borrow_mut` wait for another thread's borrow to end; a borrow that never ends
/// (a nested `borrow_mut` on the same thread, which a `RefCell` would refuse) panics after
/// about a second of waiting instead of hanging the test.
pub struct Shared<T>(Arc<spin::RwLock<T>>);

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T: core::fmt::Debug> core::fmt::Debug for Shared<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0.try_read() {
            Some(g) => write!(f, "Shared({:?})", &*g),
            None => write!(f, "Shared(<borrowed>)"),
        }
    }
}

impl<T: Default> Default for Shared<T> {
    fn default() -> Self {
        Self::new(T::default())
    }
}

/// Spins of a borrow that waits before it is taken for a deadlock.
const BORROW_SPINS: u64 = 1 << 28;

impl<T> Shared<T> {
    /// Shares `value`.
    pub fn new(value: T) -> Self {
        Self(Arc::new(spin::RwLock::new(value)))
    }

    /// Reads the value (many readers at once).
    pub fn borrow(&self) -> spin::RwLockReadGuard<'_, T> {
        for _ in 0..BORROW_SPINS {
            if let Some(g) = self.0.try_read() {
                return g;
            }
            core::hint::spin_loop();
        }
        panic!("Shared::borrow: value mutably borrowed for too long (nested borrow?)");
    }

    /// Changes the value (one at a time).
    pub fn borrow_mut(&self) -> spin::RwLockWriteGuard<'_, T> {
        for _ in 0..BORROW_SPINS {
            if let Some(g) = self.0.try_write() {
                return g;
            }
            core::hint::spin_loop();
        }
        panic!("Shared::borrow_mut: value borrowed for too long (nested borrow?)");
    }
}

/// A shared counter of write boundaries (writes and flushes) across every disk of a test, so a
/// crash happens at one instant for the whole machine.
#[derive(Debug, Default)]
pub struct CrashClock {
    /// Write boundaries passed so far.
    pub ops: u64,
    /// Crash instead of performing boundary number `crash_at` (0-based).
    pub crash_at: Option<u64>,
    /// Set once the crash has happened: every later request fails with [`DevError::Gone`].
    pub crashed: bool,
}

/// Shared handle to a [`CrashClock`].
pub type Clock = Shared<CrashClock>;

/// The contents of a crashable disk: what is durable, and the volatile cache on top.
#[derive(Debug, Default)]
pub struct CrashState {
    /// Bytes that survive a power cut.
    pub durable: Vec<u8>,
    /// Acknowledged but unflushed writes, one entry per block, in issue order.
    pub cache: Vec<(u64, Vec<u8>)>,
}

impl CrashState {
    /// The image after a power cut in which cached block `i` reached the medium iff `keep(i)`.
    pub fn image_after_crash(&self, mut keep: impl FnMut(usize) -> bool) -> Vec<u8> {
        let mut img = self.durable.clone();
        for (i, (lba, data)) in self.cache.iter().enumerate() {
            if keep(i) {
                let off = us(*lba) * BLOCK_SIZE;
                img[off..off + BLOCK_SIZE].copy_from_slice(data);
            }
        }
        img
    }
}

/// A disk with a volatile write cache, crashing when the shared clock says so.
pub struct CrashDisk {
    state: Shared<CrashState>,
    clock: Clock,
}

impl CrashDisk {
    /// A crashable disk over `image`; returns the disk and a handle to its state.
    pub fn new(image: Vec<u8>, clock: Clock) -> (Self, Shared<CrashState>) {
        let state = Shared::new(CrashState {
            durable: image,
            cache: Vec::new(),
        });
        (
            Self {
                state: state.clone(),
                clock,
            },
            state,
        )
    }

    fn boundary(&self) -> Result<(), DevError> {
        let mut c = self.clock.borrow_mut();
        if c.crashed {
            return Err(DevError::Gone);
        }
        if c.crash_at == Some(c.ops) {
            c.crashed = true;
            return Err(DevError::Gone);
        }
        c.ops += 1;
        Ok(())
    }
}

impl BlockDevice for CrashDisk {
    fn num_blocks(&self) -> u64 {
        u(self.state.borrow().durable.len() / BLOCK_SIZE)
    }

    fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), DevError> {
        if self.clock.borrow().crashed {
            return Err(DevError::Gone);
        }
        check_range(self.num_blocks(), lba, buf.len())?;
        let st = self.state.borrow();
        let off = us(lba) * BLOCK_SIZE;
        buf.copy_from_slice(&st.durable[off..off + buf.len()]);
        let end = lba + u(buf.len() / BLOCK_SIZE);
        for (clba, data) in &st.cache {
            if *clba >= lba && *clba < end {
                let o = us(*clba - lba) * BLOCK_SIZE;
                buf[o..o + BLOCK_SIZE].copy_from_slice(data);
            }
        }
        Ok(())
    }

    fn write(&mut self, lba: u64, buf: &[u8]) -> Result<(), DevError> {
        check_range(self.num_blocks(), lba, buf.len())?;
        self.boundary()?;
        let mut st = self.state.borrow_mut();
        for (i, chunk) in buf.chunks(BLOCK_SIZE).enumerate() {
            st.cache.push((lba + u(i), chunk.to_vec()));
        }
        // Keep the cache bounded like a real disk: old entries trickle to the medium.
        if st.cache.len() > 4096 {
            let old: Vec<_> = st.cache.drain(..2048).collect();
            for (l, d) in old {
                let off = us(l) * BLOCK_SIZE;
                st.durable[off..off + BLOCK_SIZE].copy_from_slice(&d);
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DevError> {
        self.boundary()?;
        let mut st = self.state.borrow_mut();
        let cache = core::mem::take(&mut st.cache);
        for (l, d) in cache {
            let off = us(l) * BLOCK_SIZE;
            st.durable[off..off + BLOCK_SIZE].copy_from_slice(&d);
        }
        Ok(())
    }
}

/// Which requests a [`FaultyDisk`] fails.
#[derive(Debug, Default)]
pub struct Faults {
    /// Reads touching these blocks fail with [`DevError::Io`].
    pub bad_read_blocks: BTreeSet<u64>,
    /// Writes touching these blocks fail with [`DevError::Io`].
    pub bad_write_blocks: BTreeSet<u64>,
    /// Every write fails with [`DevError::Io`].
    pub fail_all_writes: bool,
    /// The device has vanished: everything fails with [`DevError::Gone`].
    pub gone: bool,
    /// Requests failed so far.
    pub failures: u64,
    /// Requests served so far.
    pub requests: u64,
}

/// Shared handle to [`Faults`].
pub type FaultHandle = Shared<Faults>;

/// Wraps a device and fails the requests its [`Faults`] name.
pub struct FaultyDisk {
    inner: Box<dyn BlockDevice>,
    faults: FaultHandle,
}

impl FaultyDisk {
    /// Wraps `inner`; returns the device and the handle that controls its faults.
    pub fn new(inner: Box<dyn BlockDevice>) -> (Self, FaultHandle) {
        let faults = Shared::new(Faults::default());
        (
            Self {
                inner,
                faults: faults.clone(),
            },
            faults,
        )
    }

    fn hits(set: &BTreeSet<u64>, lba: u64, len: usize) -> bool {
        set.range(lba..lba + u(len / BLOCK_SIZE)).next().is_some()
    }
}

impl BlockDevice for FaultyDisk {
    fn num_blocks(&self) -> u64 {
        self.inner.num_blocks()
    }

    fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), DevError> {
        let mut f = self.faults.borrow_mut();
        f.requests += 1;
        if f.gone {
            f.failures += 1;
            return Err(DevError::Gone);
        }
        if Self::hits(&f.bad_read_blocks, lba, buf.len()) {
            f.failures += 1;
            return Err(DevError::Io);
        }
        drop(f);
        self.inner.read(lba, buf)
    }

    fn write(&mut self, lba: u64, buf: &[u8]) -> Result<(), DevError> {
        let mut f = self.faults.borrow_mut();
        f.requests += 1;
        if f.gone {
            f.failures += 1;
            return Err(DevError::Gone);
        }
        if f.fail_all_writes || Self::hits(&f.bad_write_blocks, lba, buf.len()) {
            f.failures += 1;
            return Err(DevError::Io);
        }
        drop(f);
        self.inner.write(lba, buf)
    }

    fn flush(&mut self) -> Result<(), DevError> {
        if self.faults.borrow().gone {
            return Err(DevError::Gone);
        }
        self.inner.flush()
    }
}

/// A [`MemDisk`](crate::MemDisk) whose bytes are shared with the test, so the test can take an
/// image at any time (e.g. to present a stale copy of the disk later).
#[derive(Clone)]
pub struct SharedDisk(pub Shared<crate::MemDisk>);

impl SharedDisk {
    /// A zeroed shared disk of `blocks` blocks.
    #[must_use]
    pub fn new(blocks: u64) -> Self {
        Self(Shared::new(crate::MemDisk::new(blocks)))
    }

    /// A copy of the current bytes.
    #[must_use]
    pub fn snapshot(&self) -> Vec<u8> {
        self.0.borrow().image().to_vec()
    }
}

impl BlockDevice for SharedDisk {
    fn num_blocks(&self) -> u64 {
        self.0.borrow().num_blocks()
    }
    fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), DevError> {
        self.0.borrow_mut().read(lba, buf)
    }
    fn write(&mut self, lba: u64, buf: &[u8]) -> Result<(), DevError> {
        self.0.borrow_mut().write(lba, buf)
    }
    fn flush(&mut self) -> Result<(), DevError> {
        Ok(())
    }
}

/// The deterministic scheduler of a test's queued disks: a seeded generator that decides, each
/// time a [`QueuedDisk`] is reaped or submitted to, which of its requests in flight are
/// performed and completed, and in which order. The same seed replays the same interleaving.
#[derive(Debug)]
pub struct Interleave {
    state: u64,
    /// Out of 8: how likely a submitted request is performed at once (0: always queued).
    pub immediate_in_8: u64,
    /// Out of 8: how likely a reap that does not wait completes nothing (0, the default:
    /// any number; higher keeps requests in flight longer, for tests of concurrency).
    pub idle_reap_in_8: u64,
    /// Requests performed so far, over every disk sharing this scheduler.
    pub performed: u64,
    /// The largest number of requests seen in flight on one disk.
    pub max_depth: usize,
}

impl Interleave {
    /// A scheduler drawing from `seed`.
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed | 1,
            immediate_in_8: 1,
            idle_reap_in_8: 0,
            performed: 0,
            max_depth: 0,
        }
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state % n.max(1)
    }
}

/// Shared handle to an [`Interleave`].
pub type Sched = Shared<Interleave>;

/// Wraps a synchronous device and gives it a queue: submitted requests stay in flight until
/// the shared [`Interleave`] picks them, in any order, at a later `reap` (or, sometimes, at
/// once). A request is performed on the inner device when it completes, so a
/// [`CrashDisk`] below sees its write boundaries in the interleaved order and a [`FaultyDisk`]
/// fails it then. Synchronous calls go straight to the inner device. Dropping it cancels what
/// is still queued (those requests never reach the inner device).
pub struct QueuedDisk {
    inner: Box<dyn BlockDevice>,
    queue: Vec<(u64, Request)>,
    sched: Sched,
}

impl QueuedDisk {
    /// Queues requests to `inner` under scheduler `sched`.
    pub fn new(inner: Box<dyn BlockDevice>, sched: Sched) -> Self {
        Self {
            inner,
            queue: Vec::new(),
            sched,
        }
    }

    fn perform(&mut self, i: usize) -> Completion {
        let (tag, req) = self.queue.swap_remove(i);
        self.sched.borrow_mut().performed += 1;
        complete_now(&mut *self.inner, tag, req)
    }
}

impl BlockDevice for QueuedDisk {
    fn num_blocks(&self) -> u64 {
        self.inner.num_blocks()
    }
    fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), DevError> {
        self.inner.read(lba, buf)
    }
    fn write(&mut self, lba: u64, buf: &[u8]) -> Result<(), DevError> {
        self.inner.write(lba, buf)
    }
    fn flush(&mut self) -> Result<(), DevError> {
        self.inner.flush()
    }
    fn queue_depth(&self) -> usize {
        self.queue.len()
    }
    fn waits_on_medium(&self) -> bool {
        // So that the pool's metadata writes go through the queue (and its interleavings) too.
        true
    }
    fn submit(&mut self, tag: u64, req: Request) -> Option<Completion> {
        let at_once = {
            let mut s = self.sched.borrow_mut();
            let k = s.immediate_in_8;
            s.below(8) < k
        };
        if at_once {
            self.sched.borrow_mut().performed += 1;
            return Some(complete_now(&mut *self.inner, tag, req));
        }
        self.queue.push((tag, req));
        let mut s = self.sched.borrow_mut();
        s.max_depth = s.max_depth.max(self.queue.len());
        None
    }
    fn reap(&mut self, out: &mut Vec<Completion>, wait: bool) {
        if self.queue.is_empty() {
            return;
        }
        // How many complete now: any number, at least one when the caller waits.
        if !wait {
            let mut s = self.sched.borrow_mut();
            let k = s.idle_reap_in_8;
            if k > 0 && s.below(8) < k {
                return;
            }
        }
        let len = u(self.queue.len());
        let mut n = self.sched.borrow_mut().below(len + 1);
        if wait {
            n = n.max(1);
        }
        for _ in 0..n {
            let i = us(self.sched.borrow_mut().below(u(self.queue.len())));
            let c = self.perform(i);
            out.push(c);
        }
    }
}
