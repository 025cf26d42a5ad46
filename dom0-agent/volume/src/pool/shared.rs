//! A pool served from several threads at once: [`SharedPool`].
//!
//! The pool's requests in flight ([`super::aio`]) let many volume requests use the disks at
//! once; a `SharedPool` lets many *threads* (dom0 vCPUs, the NBD server's client threads)
//! issue them. Its locking rules:
//!
//! * **The pool lock** ([`Pool`] inside one lock) is held only for bookkeeping and for what
//!   has to be serial: planning a request into device pieces and submitting them, taking in
//!   completions, thin allocation and the other requests that run synchronously (allocating or
//!   redirecting thin writes, unaligned byte ranges, discards, snapshots that copy before
//!   write), metadata commits and admin commands. It is never held while a thread waits for a
//!   device request of a split volume request: waiting threads sleep on an event that the
//!   disks' completion threads signal ([`crate::dev::BlockDevice::set_waker`]). (A disk that
//!   cannot signal is waited for inside `reap`, under the lock: correct, but serial.)
//! * **Region locks, per volume.** Every request holds the block range it covers on its
//!   volume from submission to completion: writes (and discards, zeroing, partial-block
//!   read-modify-writes) exclusively, reads shared. A request waits behind every *earlier*
//!   request of the same volume whose range overlaps it and conflicts (one of the two
//!   writes); requests are granted in the order they were submitted. So overlapping requests
//!   of one volume are ordered — one completes before the next starts, and the result is that
//!   of running them in submission order — while requests to other ranges or other volumes
//!   proceed in parallel. A waiting request takes no pool resources; it is launched by
//!   whichever thread completes the request it waits for.
//! * **Group commit.** [`SharedPool::flush`] (and a write with FUA) takes a ticket and
//!   returns once a commit ([`Pool::flush`]: disks flushed, metadata committed) that *started
//!   after the ticket was taken* has succeeded. One thread at a time commits, for every ticket
//!   taken before it started; tickets taken while it runs are served together by the next. So
//!   many writers' allocations are made durable by one metadata commit, and a flush (or FUA
//!   write) is acknowledged only after the commit that covers every write acknowledged before
//!   it. Tickets live in their own small lock, so taking one never waits for a commit.
//! * **Admin commands** ([`SharedPool::with_pool`]) stop new submissions, wait until no
//!   request is unfinished, and then run alone with the whole pool; so no configuration
//!   change, background step or relayout runs beside a request in flight (the rule of
//!   [`super::IoQueue`]). Lock order: the commit tickets' lock is never held while the pool
//!   lock is taken.
//!
//! Every blocking call has a non-blocking form ([`SharedPool::submit`], [`SharedPool::poll`],
//! [`SharedPool::flush_begin`], [`SharedPool::flush_poll`], [`SharedPool::step`]) so that
//! tests interleave many logical clients step by step from one thread, in an order drawn from a
//! seed, with the disks' completion order drawn by [`crate::testdev::Interleave`].

use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;

use super::{Pool, VolCompletion};
use crate::dev::BLOCK_SIZE;
use crate::error::Error;
use crate::sync::{Event, Lock};
use crate::u;

/// One volume request of a client, in bytes (any alignment; whole aligned blocks go through
/// the queue, the rest runs synchronously under the pool lock).
#[derive(Debug, Clone)]
pub enum Op {
    /// Read `len` bytes at byte `offset`; the data comes back.
    Read { vol: u32, offset: u64, len: u64 },
    /// Write `data` at byte `offset`.
    Write {
        vol: u32,
        offset: u64,
        data: Vec<u8>,
    },
    /// Release whole thin chunks in the range ([`Pool::discard`]).
    Discard { vol: u32, offset: u64, len: u64 },
    /// Make the range read as zeroes ([`Pool::write_zeroes`]).
    Zeroes { vol: u32, offset: u64, len: u64 },
}

impl Op {
    fn vol(&self) -> u32 {
        match self {
            Op::Read { vol, .. }
            | Op::Write { vol, .. }
            | Op::Discard { vol, .. }
            | Op::Zeroes { vol, .. } => *vol,
        }
    }

    /// Blocks `[first, end)` the request covers, and whether it changes them.
    fn range(&self) -> (u64, u64, bool) {
        let bs = u(BLOCK_SIZE);
        let (offset, len, write) = match self {
            Op::Read { offset, len, .. } => (*offset, *len, false),
            Op::Write { offset, data, .. } => (*offset, u(data.len()), true),
            Op::Discard { offset, len, .. } | Op::Zeroes { offset, len, .. } => {
                (*offset, *len, true)
            }
        };
        let end = offset.saturating_add(len).div_ceil(bs);
        (offset / bs, end, write)
    }
}

/// What the shared pool has done, for tests and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SharedStats {
    /// Requests submitted.
    pub requests: u64,
    /// Requests that had to wait for an earlier overlapping request of their volume.
    pub range_waits: u64,
    /// Most requests unfinished at once.
    pub max_unfinished: usize,
    /// Flush (and FUA) tickets taken.
    pub flush_tickets: u64,
    /// Commits run for them ([`Pool::flush`] calls).
    pub commits: u64,
    /// Most tickets served by one commit.
    pub max_batch: u64,
}

enum St {
    Waiting(Op),
    Running,
    Done(Result<Vec<u8>, Error>),
}

struct Req {
    vol: u32,
    first: u64,
    end: u64,
    write: bool,
    st: St,
}

impl Req {
    fn conflicts(&self, o: &Req) -> bool {
        self.vol == o.vol
            && (self.write || o.write)
            && self.first < o.end
            && o.first < self.end
            && self.first < self.end
            && o.first < o.end
    }
}

struct Engine {
    pool: Pool,
    next: u64,
    reqs: BTreeMap<u64, Req>,
    /// Per volume, the unfinished requests (running or waiting), in ticket order.
    held: BTreeMap<u32, Vec<u64>>,
    /// Requests finished by the engine itself, to be recorded.
    ready: VecDeque<(u64, Result<Vec<u8>, Error>)>,
    unfinished: usize,
    /// An admin command is waiting for, or running with, the whole pool.
    admin: bool,
    stats: SharedStats,
}

impl Engine {
    fn submit(&mut self, op: Op) -> u64 {
        let t = self.next;
        self.next += 1;
        let (first, end, write) = op.range();
        let vol = op.vol();
        let req = Req {
            vol,
            first,
            end,
            write,
            st: St::Waiting(op),
        };
        let list = self.held.entry(vol).or_default();
        let blocked = list
            .iter()
            .any(|e| self.reqs.get(e).is_some_and(|o| o.conflicts(&req)));
        list.push(t);
        self.reqs.insert(t, req);
        self.unfinished += 1;
        self.stats.requests += 1;
        self.stats.max_unfinished = self.stats.max_unfinished.max(self.unfinished);
        if blocked {
            self.stats.range_waits += 1;
        } else {
            self.launch(t);
        }
        self.settle();
        t
    }

    /// Starts request `t`: into the pool's queue when it is whole aligned blocks, otherwise
    /// performed now.
    fn launch(&mut self, t: u64) {
        let Some(r) = self.reqs.get_mut(&t) else {
            return;
        };
        let St::Waiting(op) = core::mem::replace(&mut r.st, St::Running) else {
            return;
        };
        let bs = u(BLOCK_SIZE);
        let aligned = |off: u64, len: u64| off.is_multiple_of(bs) && len.is_multiple_of(bs);
        let p = &mut self.pool;
        let now: Option<Result<Vec<u8>, Error>> = match op {
            Op::Read { vol, offset, len } if aligned(offset, len) => {
                p.q_read(t, vol, offset / bs, len / bs).err().map(Err)
            }
            Op::Write { vol, offset, data } if aligned(offset, u(data.len())) => {
                p.q_write(t, vol, offset / bs, &data).err().map(Err)
            }
            Op::Read { vol, offset, len } => Some(
                usize::try_from(len)
                    .map_err(|_| Error::InvalidArgument("read too long".into()))
                    .and_then(|n| {
                        let mut buf = alloc::vec![0u8; n];
                        p.read_bytes(vol, offset, &mut buf).map(|()| buf)
                    }),
            ),
            Op::Write { vol, offset, data } => {
                Some(p.write_bytes(vol, offset, &data).map(|()| Vec::new()))
            }
            Op::Discard { vol, offset, len } => {
                Some(p.discard(vol, offset, len).map(|_| Vec::new()))
            }
            Op::Zeroes { vol, offset, len } => {
                Some(p.write_zeroes(vol, offset, len).map(|()| Vec::new()))
            }
        };
        if let Some(res) = now {
            self.ready.push_back((t, res));
        }
    }

    /// Records every finished request (its range released, and requests waiting for it
    /// launched) until nothing more finishes without waiting; whether anything did.
    fn settle(&mut self) -> bool {
        let mut any = false;
        loop {
            let mut out: Vec<VolCompletion> = Vec::new();
            self.pool.q_poll(&mut out, false);
            for c in out {
                self.ready.push_back((c.tag, c.result.map(|()| c.data)));
            }
            let Some((t, res)) = self.ready.pop_front() else {
                return any;
            };
            any = true;
            self.finish(t, res);
        }
    }

    fn finish(&mut self, t: u64, res: Result<Vec<u8>, Error>) {
        let Some(r) = self.reqs.get_mut(&t) else {
            return;
        };
        if !matches!(r.st, St::Running) {
            return;
        }
        r.st = St::Done(res);
        let vol = r.vol;
        self.unfinished -= 1;
        let Some(list) = self.held.get_mut(&vol) else {
            return;
        };
        list.retain(|&e| e != t);
        // Launch, in ticket order, every waiting request no earlier unfinished one blocks.
        let list = list.clone();
        for (k, &w) in list.iter().enumerate() {
            let Some(req) = self.reqs.get(&w) else {
                continue;
            };
            if !matches!(req.st, St::Waiting(_)) {
                continue;
            }
            let blocked = list[..k]
                .iter()
                .any(|e| self.reqs.get(e).is_some_and(|o| o.conflicts(req)));
            if !blocked {
                self.launch(w);
            }
        }
        if self.held.get(&vol).is_some_and(Vec::is_empty) {
            self.held.remove(&vol);
        }
    }

    /// The result of request `t` if it is done (taken: a ticket is answered once).
    fn take(&mut self, t: u64) -> Option<Result<Vec<u8>, Error>> {
        if !matches!(self.reqs.get(&t)?.st, St::Done(_)) {
            return None;
        }
        match self.reqs.remove(&t)?.st {
            St::Done(r) => Some(r),
            _ => None,
        }
    }
}

/// Group-commit tickets.
#[derive(Default)]
struct Commits {
    /// Tickets taken (the last one's number).
    issued: u64,
    /// Every ticket up to this one is served.
    served: u64,
    /// A thread is committing.
    leader: bool,
    /// Commits that failed: the tickets they served, and why.
    failures: VecDeque<(u64, u64, Error)>,
    commits: u64,
    max_batch: u64,
}

impl Commits {
    fn result(&self, ticket: u64) -> Result<(), Error> {
        match self
            .failures
            .iter()
            .find(|(lo, hi, _)| (*lo..=*hi).contains(&ticket))
        {
            Some((_, _, e)) => Err(e.clone()),
            None => Ok(()),
        }
    }
}

/// A ticket of [`SharedPool::flush_begin`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushTicket(u64);

/// A pool whose volumes are served from several threads at once (see the module doc for
/// the locking rules).
pub struct SharedPool {
    engine: Lock<Engine>,
    commits: Lock<Commits>,
    event: alloc::sync::Arc<Event>,
    /// Every disk signals completions ([`crate::dev::BlockDevice::set_waker`]).
    wakes: bool,
}

/// How long a waiting thread sleeps at most before it looks again (a safety net: completions,
/// launches and commits all signal the event).
const WAIT_MS: u64 = 20;

/// Failed commits remembered for the tickets they served.
const FAILURES_KEPT: usize = 256;

impl SharedPool {
    /// Shares `pool` between threads; its disks are asked to signal completions.
    #[must_use]
    pub fn new(mut pool: Pool) -> Self {
        let event = alloc::sync::Arc::new(Event::new());
        let ev = event.clone();
        let waker: crate::dev::Waker = alloc::sync::Arc::new(move || ev.notify());
        let wakes = pool.set_wakers(&waker);
        Self {
            engine: Lock::new(Engine {
                pool,
                next: 0,
                reqs: BTreeMap::new(),
                held: BTreeMap::new(),
                ready: VecDeque::new(),
                unfinished: 0,
                admin: false,
                stats: SharedStats::default(),
            }),
            commits: Lock::new(Commits::default()),
            event,
            wakes,
        }
    }

    /// Waits for every request, and gives the pool back.
    #[must_use]
    pub fn into_pool(self) -> Pool {
        self.with_pool(|_| ());
        self.engine.into_inner().pool
    }

    // -------------------------------------------------------------------------------------
    // Non-blocking calls (one step each; tests drive many clients with them).

    /// Submits `op`; it runs now, or as soon as the earlier requests of its volume that it
    /// overlaps have completed. Refused while an admin command has the pool.
    pub fn submit(&self, op: Op) -> Result<u64, Error> {
        let mut e = self.engine.lock();
        if e.admin {
            return Err(Error::InvalidArgument(
                "an admin command has the pool; submit again after it".into(),
            ));
        }
        let t = e.submit(op);
        drop(e);
        self.event.notify();
        Ok(t)
    }

    /// The result of request `t` once it is done (data for a read), taking in whatever has
    /// completed meanwhile; `None` while it is not. A ticket is answered once.
    pub fn poll(&self, t: u64) -> Option<Result<Vec<u8>, Error>> {
        let mut e = self.engine.lock();
        let changed = e.settle();
        let r = e.take(t);
        drop(e);
        if changed {
            self.event.notify();
        }
        r
    }

    /// Waits for at least one device request in flight to complete (or returns at once if
    /// none is), holding the pool lock: the step of a test's scheduler when every client is
    /// waiting. Whether anything finished.
    pub fn step(&self) -> bool {
        let mut e = self.engine.lock();
        let mut out = Vec::new();
        e.pool.q_poll(&mut out, true);
        for c in out {
            e.ready.push_back((c.tag, c.result.map(|()| c.data)));
        }
        let changed = e.settle();
        drop(e);
        if changed {
            self.event.notify();
        }
        changed
    }

    /// Takes a group-commit ticket: served by the first commit that starts after this call
    /// (it covers every write completed before it).
    pub fn flush_begin(&self) -> FlushTicket {
        let mut c = self.commits.lock();
        c.issued += 1;
        FlushTicket(c.issued)
    }

    /// The result of ticket `t` once a commit served it. When none is running, this thread
    /// runs one now for every ticket taken so far (the group commit); `None` while another
    /// thread's commit, which may not cover `t`, is running.
    pub fn flush_poll(&self, t: FlushTicket) -> Option<Result<(), Error>> {
        let mut c = self.commits.lock();
        if c.served >= t.0 {
            return Some(c.result(t.0));
        }
        if c.leader {
            return None;
        }
        c.leader = true;
        let (from, target) = (c.served + 1, c.issued);
        drop(c);
        let res = {
            let mut e = self.engine.lock();
            let r = e.pool.flush();
            e.settle();
            r
        };
        let mut c = self.commits.lock();
        c.leader = false;
        c.served = target;
        c.commits += 1;
        c.max_batch = c.max_batch.max(target + 1 - from);
        if let Err(err) = res {
            c.failures.push_back((from, target, err));
            if c.failures.len() > FAILURES_KEPT {
                c.failures.pop_front();
            }
        }
        let r = c.result(t.0);
        drop(c);
        self.event.notify();
        Some(r)
    }

    // -------------------------------------------------------------------------------------
    // Blocking calls (threads).

    /// Runs `op` and waits for its result (data for a read).
    pub fn run(&self, op: Op) -> Result<Vec<u8>, Error> {
        let t = loop {
            let seen = self.event.epoch();
            match self.submit(op.clone()) {
                Ok(t) => break t,
                Err(_) if self.engine.lock().admin => self.event.wait_past(seen, WAIT_MS),
                Err(e) => return Err(e),
            }
        };
        self.wait(t)
    }

    /// Waits for request `t` (from [`SharedPool::submit`]).
    pub fn wait(&self, t: u64) -> Result<Vec<u8>, Error> {
        loop {
            let seen = self.event.epoch();
            let mut e = self.engine.lock();
            let mut changed = e.settle();
            if let Some(r) = e.take(t) {
                drop(e);
                if changed {
                    self.event.notify();
                }
                return r;
            }
            if !self.wakes && e.pool.q_pieces() > 0 {
                // A disk that cannot signal: wait inside its reap, under the lock.
                let mut out = Vec::new();
                e.pool.q_poll(&mut out, true);
                for c in out {
                    e.ready.push_back((c.tag, c.result.map(|()| c.data)));
                }
                changed |= e.settle();
                drop(e);
                if changed {
                    self.event.notify();
                }
                continue;
            }
            drop(e);
            if changed {
                self.event.notify();
            }
            self.event.wait_past(seen, WAIT_MS);
        }
    }

    /// Reads `buf.len()` bytes at byte `offset` of volume `vol`.
    pub fn read(&self, vol: u32, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        let data = self.run(Op::Read {
            vol,
            offset,
            len: u(buf.len()),
        })?;
        if data.len() != buf.len() {
            return Err(Error::InvalidArgument("short read".into()));
        }
        buf.copy_from_slice(&data);
        Ok(())
    }

    /// Writes `data` at byte `offset` of volume `vol`; with `fua`, returns only once a commit
    /// made it (and everything acknowledged before it) durable.
    pub fn write(&self, vol: u32, offset: u64, data: &[u8], fua: bool) -> Result<(), Error> {
        self.run(Op::Write {
            vol,
            offset,
            data: data.to_vec(),
        })?;
        if fua { self.flush() } else { Ok(()) }
    }

    /// Makes every write completed before this call durable, sharing the commit with every
    /// other thread flushing meanwhile (group commit).
    pub fn flush(&self) -> Result<(), Error> {
        let t = self.flush_begin();
        loop {
            let seen = self.event.epoch();
            if let Some(r) = self.flush_poll(t) {
                return r;
            }
            self.event.wait_past(seen, WAIT_MS);
        }
    }

    /// Runs `f` with the whole pool once every request has finished (new ones wait): for
    /// admin commands and background work.
    pub fn with_pool<R>(&self, f: impl FnOnce(&mut Pool) -> R) -> R {
        loop {
            let seen = self.event.epoch();
            let mut e = self.engine.lock();
            if !e.admin {
                e.admin = true;
                break;
            }
            drop(e);
            self.event.wait_past(seen, WAIT_MS);
        }
        loop {
            let seen = self.event.epoch();
            let mut e = self.engine.lock();
            let mut changed = e.settle();
            if e.unfinished == 0 {
                let r = f(&mut e.pool);
                e.admin = false;
                drop(e);
                self.event.notify();
                return r;
            }
            if !self.wakes && e.pool.q_pieces() > 0 {
                let mut out = Vec::new();
                e.pool.q_poll(&mut out, true);
                for c in out {
                    e.ready.push_back((c.tag, c.result.map(|()| c.data)));
                }
                changed |= e.settle();
            }
            drop(e);
            if changed {
                self.event.notify();
            }
            self.event.wait_past(seen, WAIT_MS);
        }
    }

    /// Looks at the pool without waiting for requests in flight (read-only: names, sizes).
    pub fn peek<R>(&self, f: impl FnOnce(&Pool) -> R) -> R {
        let e = self.engine.lock();
        f(&e.pool)
    }

    /// What has been done so far.
    #[must_use]
    pub fn stats(&self) -> SharedStats {
        let mut s = self.engine.lock().stats;
        let c = self.commits.lock();
        s.flush_tickets = c.issued;
        s.commits = c.commits;
        s.max_batch = c.max_batch;
        s
    }

    /// Requests submitted and not yet answered to their submitter.
    #[must_use]
    pub fn unfinished(&self) -> usize {
        self.engine.lock().unfinished
    }

    /// Whether every disk signals completions, so waiting threads never hold the pool lock.
    #[must_use]
    pub fn disks_signal(&self) -> bool {
        self.wakes
    }
}

const _: () = {
    const fn shared<T: Send + Sync>() {}
    shared::<SharedPool>();
};
