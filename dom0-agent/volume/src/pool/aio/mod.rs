//! Volume requests in flight: an [`IoQueue`] borrows the pool and takes reads and writes that
//! complete later, so that many requests are in flight on many disks at once.
//!
//! A volume request becomes one device request per piece it touches: a thick volume's column
//! runs, each written to every in-sync mirror leg (stale legs record the region instead, as on
//! the synchronous path), or read from one in-sync leg. All of them are submitted before the
//! first is waited for, so mirror legs are written in parallel and a stripe's columns all work
//! at once; the volume request completes when its last piece has, that is when every in-sync
//! leg has the data. Before a mirrored region is written its bit is durable in the
//! dirty-region log, as for a synchronous write; but where a synchronous write logs its
//! region at once, a queued write whose region is not logged yet waits, with every other one
//! submitted meanwhile, for one log write that covers them all at the next poll (group
//! commit).
//!
//! A request that any piece failed is driven again, whole, through the synchronous path
//! ([`Pool::read`] / [`Pool::write`]) once all its pieces are in: that path retries other
//! legs, detaches failing ones, takes vanished disks out of service and commits before it
//! answers, so failures have one implementation. A thin volume's request is split the same
//! way through its pool's data volume when every chunk it touches is mapped and, for a write,
//! written in place (no other reference to the chunk, now or committed); unmapped chunks read
//! as zeroes without a device request. Requests the queue does not split (thin writes that
//! allocate or redirect a chunk, reads of a thin snapshot's unmapped chunks, volumes being
//! filled, relaid out, tracked, or with snapshots that copy before write) run synchronously
//! at submission and complete at once.
//!
//! Invariants:
//! * Requests are in flight only while an [`IoQueue`] borrows the pool, or while a
//!   [`super::SharedPool`] holds them (its admin calls wait for all of them first); dropping
//!   or finishing the queue waits for all of them. Configuration changes, background steps and admin commands need
//!   the pool itself, so they never run with a request in flight.
//! * [`Pool::flush`] first waits for every piece in flight (without answering their requests
//!   yet), so the dirty-region log is never cleared under a mirrored write in flight, and a
//!   flush makes durable every write that completed before it.
//! * A piece in flight on a disk that is taken out of service fails (the disk is gone); its
//!   request is then driven again on what remains.
//!
//! Files: this one (the queue, pieces in flight, completions, the shared log write) and
//! `plan` (which requests are split, and into which device pieces).

use alloc::collections::VecDeque;

use super::*;

mod plan;
use crate::dev::{Completion, Request, WriteData, complete_now};

/// A finished volume request: the caller's tag, the result, and for a read the data.
#[derive(Debug)]
pub struct VolCompletion {
    pub tag: u64,
    pub result: Result<(), Error>,
    pub data: Vec<u8>,
}

enum Payload {
    Read(Vec<u8>),
    Write(WriteData),
}

impl Payload {
    /// The device request for one piece of this request.
    fn piece(&self, p: &Piece) -> Request {
        match self {
            Payload::Write(d) => Request::Write {
                lba: p.lba,
                data: d.slice(p.from, p.to),
            },
            Payload::Read(_) => Request::Read {
                lba: p.lba,
                blocks: u((p.to - p.from) / BLOCK_SIZE),
            },
        }
    }

    /// Bytes the request covers.
    fn len(&self) -> usize {
        match self {
            Payload::Read(b) => b.len(),
            Payload::Write(d) => d.bytes().len(),
        }
    }
}

/// One volume request with pieces in flight.
struct Parent {
    tag: u64,
    vol: u32,
    block: u64,
    payload: Payload,
    /// Pieces not yet completed.
    left: usize,
    /// Whether a piece failed (the request is then driven again synchronously).
    failed: bool,
}

/// One device request, a piece of a volume request.
struct Child {
    parent: u64,
    disk: usize,
    /// For a read: where its data goes in the parent's buffer (bytes).
    off: usize,
}

/// The pool's requests in flight.
#[derive(Default)]
pub(super) struct Aio {
    next_tag: u64,
    next_parent: u64,
    children: BTreeMap<u64, Child>,
    per_disk: Vec<usize>,
    parents: BTreeMap<u64, Parent>,
    /// Requests whose pieces are all in, in completion order.
    finished: VecDeque<u64>,
    /// Completions ready for the caller.
    done: Vec<VolCompletion>,
    /// Writes whose dirty-region bits are set in memory but not yet durable: launched after
    /// the next log write.
    drl_wait: Vec<Waiting>,
    /// Piece vectors of finished requests, kept for the next ones.
    spare: Vec<Vec<Piece>>,
}

impl Aio {
    /// Queued writes waiting for the dirty-region log.
    pub(super) fn drl_waiting(&self) -> usize {
        self.drl_wait.len()
    }
}

/// A planned write waiting for the dirty-region log.
struct Waiting {
    tag: u64,
    vol: u32,
    block: u64,
    data: WriteData,
    pieces: Vec<Piece>,
}

/// A piece to submit: disk, disk block, and a byte range of the request's buffer.
struct Piece {
    disk: usize,
    lba: u64,
    from: usize,
    to: usize,
}

/// Submission and completion of volume requests on a borrowed pool. See the module doc.
pub struct IoQueue<'a> {
    pool: &'a mut Pool,
}

impl Pool {
    /// A queue of volume requests on this pool; requests are in flight only while it lives.
    pub fn queue(&mut self) -> IoQueue<'_> {
        IoQueue { pool: self }
    }

    /// Submits the pieces of a new request and registers it.
    fn launch(&mut self, tag: u64, vol: u32, block: u64, payload: Payload, pieces: Vec<Piece>) {
        // One piece that its device completes at once (a linear volume on a device without a
        // queue of its own): answered at once, without the bookkeeping of pieces in flight.
        if let [p] = pieces.as_slice()
            && let Some(dev) = self.devs.get_mut(p.disk).and_then(Option::as_mut)
        {
            let t = self.aio.next_tag;
            self.aio.next_tag += 1;
            let req = payload.piece(p);
            let whole = p.from == 0 && p.to == payload.len();
            match dev.submit(t, req) {
                Some(c) if c.result.is_ok() && whole => {
                    self.aio.done.push(VolCompletion {
                        tag,
                        result: Ok(()),
                        data: c.data,
                    });
                }
                Some(c) => {
                    let pid = self.register(tag, vol, block, payload, 1);
                    self.aio.children.insert(
                        t,
                        Child {
                            parent: pid,
                            disk: p.disk,
                            off: p.from,
                        },
                    );
                    self.count_piece(p.disk);
                    self.piece_done(c);
                }
                None => {
                    let (disk, off) = (p.disk, p.from);
                    let pid = self.register(tag, vol, block, payload, 1);
                    self.aio.children.insert(
                        t,
                        Child {
                            parent: pid,
                            disk,
                            off,
                        },
                    );
                    self.count_piece(disk);
                }
            }
            self.recycle(pieces);
            return;
        }
        let pid = self.register(tag, vol, block, payload, pieces.len());
        if pieces.is_empty() {
            self.aio.finished.push_back(pid);
            self.recycle(pieces);
            return;
        }
        for p in &pieces {
            let t = self.aio.next_tag;
            self.aio.next_tag += 1;
            let req = self.aio.parents[&pid].payload.piece(p);
            self.aio.children.insert(
                t,
                Child {
                    parent: pid,
                    disk: p.disk,
                    off: p.from,
                },
            );
            self.count_piece(p.disk);
            let now = match self.devs.get_mut(p.disk).and_then(Option::as_mut) {
                Some(dev) => dev.submit(t, req),
                None => Some(Completion {
                    tag: t,
                    result: Err(DevError::Gone),
                    data: Vec::new(),
                }),
            };
            if let Some(c) = now {
                self.piece_done(c);
            }
        }
        self.recycle(pieces);
    }

    fn count_piece(&mut self, disk: usize) {
        if self.aio.per_disk.len() <= disk {
            self.aio.per_disk.resize(disk + 1, 0);
        }
        self.aio.per_disk[disk] += 1;
    }

    /// Registers a request with `pieces` pieces to come; returns its id.
    fn register(&mut self, tag: u64, vol: u32, block: u64, payload: Payload, pieces: usize) -> u64 {
        let pid = self.aio.next_parent;
        self.aio.next_parent += 1;
        self.aio.parents.insert(
            pid,
            Parent {
                tag,
                vol,
                block,
                payload,
                left: pieces,
                failed: false,
            },
        );
        pid
    }

    fn piece_done(&mut self, c: Completion) {
        let Some(ch) = self.aio.children.remove(&c.tag) else {
            return;
        };
        if let Some(n) = self.aio.per_disk.get_mut(ch.disk) {
            *n = n.saturating_sub(1);
        }
        let Some(p) = self.aio.parents.get_mut(&ch.parent) else {
            return;
        };
        match (&c.result, &mut p.payload) {
            (Ok(()), Payload::Read(buf)) => match buf.get_mut(ch.off..ch.off + c.data.len()) {
                Some(dst) => dst.copy_from_slice(&c.data),
                None => p.failed = true,
            },
            (Ok(()), Payload::Write(_)) => {}
            (Err(_), _) => p.failed = true,
        }
        p.left -= 1;
        if p.left == 0 {
            self.aio.finished.push_back(ch.parent);
        }
    }

    /// Collects completed pieces from the disks (waiting for at least one when `wait` and
    /// pieces are in flight); pieces on disks no longer present fail.
    fn aio_collect(&mut self, wait: bool) {
        let mut got = Vec::new();
        for i in 0..self.aio.per_disk.len() {
            if self.aio.per_disk[i] == 0 {
                continue;
            }
            match self.devs.get_mut(i).and_then(Option::as_mut) {
                Some(d) => d.reap(&mut got, false),
                None => {
                    let lost: Vec<u64> = self
                        .aio
                        .children
                        .iter()
                        .filter(|(_, c)| c.disk == i)
                        .map(|(t, _)| *t)
                        .collect();
                    got.extend(lost.into_iter().map(|tag| Completion {
                        tag,
                        result: Err(DevError::Gone),
                        data: Vec::new(),
                    }));
                }
            }
        }
        if got.is_empty() && wait && !self.aio.children.is_empty() {
            // Wait on the disk with the most pieces in flight.
            let busiest = (0..self.aio.per_disk.len()).max_by_key(|&i| self.aio.per_disk[i]);
            if let Some(i) = busiest
                && let Some(d) = self.devs.get_mut(i).and_then(Option::as_mut)
            {
                d.reap(&mut got, true);
                if got.is_empty() {
                    // The disk says nothing is in flight: what we sent it will never complete.
                    got.extend(self.aio.children.iter().filter(|(_, c)| c.disk == i).map(
                        |(t, _)| Completion {
                            tag: *t,
                            result: Err(DevError::Gone),
                            data: Vec::new(),
                        },
                    ));
                }
            }
        }
        for c in got {
            self.piece_done(c);
        }
    }

    /// Sets the dirty-region bits `[r0, r1)` of `vid` in memory; true when they were durable
    /// already (set, and no log write pending), so a write there may go at once.
    fn drl_set(&mut self, vid: u32, nregions: u64, r0: u64, r1: u64) -> bool {
        let bm = self.drl.entry(vid).or_insert_with(|| Bitmap::new(nregions));
        if bm.len() < nregions {
            bm.resize(nregions, false);
        }
        if bm.all_set(r0, r1) && self.aio.drl_wait.is_empty() {
            return true;
        }
        bm.set_range(r0, r1);
        false
    }

    /// Writes the dirty-region log once for every write waiting on it, then launches them (or,
    /// if the log cannot be written, drives each synchronously, which reports why).
    fn aio_release(&mut self) {
        if self.aio.drl_wait.is_empty() {
            return;
        }
        let logged = self.drl_write(true);
        for w in core::mem::take(&mut self.aio.drl_wait) {
            if logged.is_ok() {
                self.launch(w.tag, w.vol, w.block, Payload::Write(w.data), w.pieces);
            } else {
                let result = self.write(w.vol, w.block, w.data.bytes());
                self.aio.done.push(VolCompletion {
                    tag: w.tag,
                    result,
                    data: Vec::new(),
                });
            }
        }
    }

    /// Sends one request to each disk of `targets` at once and waits for all of them (pieces
    /// of queued requests that complete meanwhile are taken in as usual) when the disks wait
    /// on a medium ([`BlockDevice::waits_on_medium`]); otherwise performs it on each in turn.
    /// Returns each disk's result, in the order of `targets`; an absent disk is `Gone`.
    pub(super) fn each_disk(
        &mut self,
        targets: &[usize],
        req: &Request,
    ) -> Vec<Result<(), DevError>> {
        // Tags from the top half never collide with pieces' tags (counted from 0).
        const OWN: u64 = 1 << 63;
        let overlap = targets.len() > 1
            && targets.iter().all(|&i| {
                self.devs
                    .get(i)
                    .and_then(Option::as_ref)
                    .is_some_and(|d| d.waits_on_medium())
            });
        if !overlap {
            // One disk, or requests that complete in CPU time: nothing worth overlapping, so
            // the synchronous calls, one disk after the other (no queue hand-off).
            return targets
                .iter()
                .map(|&i| match self.devs.get_mut(i).and_then(Option::as_mut) {
                    Some(d) => complete_now(&mut **d, 0, req.clone()).result,
                    None => Err(DevError::Gone),
                })
                .collect();
        }
        let mut results: Vec<Option<Result<(), DevError>>> = vec![None; targets.len()];
        let mut got = Vec::new();
        for (k, &i) in targets.iter().enumerate() {
            match self.devs.get_mut(i).and_then(Option::as_mut) {
                Some(d) => {
                    if let Some(c) = d.submit(OWN + u(k), req.clone()) {
                        got.push(c);
                    }
                }
                None => results[k] = Some(Err(DevError::Gone)),
            }
        }
        loop {
            for c in got.drain(..) {
                if c.tag >= OWN {
                    if let Some(r) = results.get_mut(us(c.tag - OWN)) {
                        *r = Some(c.result);
                    }
                } else {
                    self.piece_done(c);
                }
            }
            let Some(k) = results.iter().position(Option::is_none) else {
                break;
            };
            match self.devs.get_mut(targets[k]).and_then(Option::as_mut) {
                Some(d) if d.queue_depth() > 0 => d.reap(&mut got, true),
                // Nothing in flight there: it will never answer.
                _ => results[k] = Some(Err(DevError::Gone)),
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or(Err(DevError::Gone)))
            .collect()
    }

    /// Waits until no piece is in flight (their requests are answered later, by the queue);
    /// writes waiting for the dirty-region log are launched first.
    pub(super) fn aio_quiesce(&mut self) {
        self.aio_release();
        while !self.aio.children.is_empty() {
            self.aio_collect(true);
        }
    }

    /// Answers the requests whose pieces are all in; failed ones are driven again
    /// synchronously.
    fn aio_answer(&mut self) {
        while let Some(pid) = self.aio.finished.pop_front() {
            let Some(p) = self.aio.parents.remove(&pid) else {
                continue;
            };
            let (result, data) = match p.payload {
                Payload::Read(buf) if !p.failed => (Ok(()), buf),
                Payload::Write(_) if !p.failed => (Ok(()), Vec::new()),
                Payload::Read(mut buf) => {
                    let r = self.read(p.vol, p.block, &mut buf);
                    (r, buf)
                }
                Payload::Write(d) => (self.write(p.vol, p.block, d.bytes()), Vec::new()),
            };
            self.aio.done.push(VolCompletion {
                tag: p.tag,
                result,
                data,
            });
        }
    }
}

impl Pool {
    /// Volume requests submitted to the queue whose completion has not been taken yet.
    pub(super) fn q_in_flight(&self) -> usize {
        let a = &self.aio;
        a.parents.len() + a.done.len() + a.drl_wait.len()
    }

    /// Starts a queued write (see [`IoQueue::write`]).
    pub(super) fn q_write(
        &mut self,
        tag: u64,
        id: u32,
        block: u64,
        buf: &[u8],
    ) -> Result<(), Error> {
        self.writable()?;
        let n = nblocks(buf)?;
        let vi = self.vidx(id)?;
        let v = &self.meta.volumes[vi];
        if block.checked_add(n).is_none_or(|e| e > v.size) {
            return Err(Error::OutOfRange(v.name.clone()));
        }
        let planned = if n > 0 {
            self.plan(vi, block, n, true)
        } else {
            None
        };
        match planned {
            Some((false, pieces)) => self.aio.drl_wait.push(Waiting {
                tag,
                vol: id,
                block,
                data: WriteData::new(buf),
                pieces,
            }),
            Some((true, pieces)) => {
                self.launch(tag, id, block, Payload::Write(WriteData::new(buf)), pieces);
            }
            None => {
                let result = self.write(id, block, buf);
                self.aio.done.push(VolCompletion {
                    tag,
                    result,
                    data: Vec::new(),
                });
            }
        }
        Ok(())
    }

    /// Starts a queued read (see [`IoQueue::read`]).
    pub(super) fn q_read(
        &mut self,
        tag: u64,
        id: u32,
        block: u64,
        blocks: u64,
    ) -> Result<(), Error> {
        let vi = self.vidx(id)?;
        let v = &self.meta.volumes[vi];
        if block.checked_add(blocks).is_none_or(|e| e > v.size) {
            return Err(Error::OutOfRange(v.name.clone()));
        }
        if let VolKind::ThinPool { .. } = v.kind {
            return Err(Error::InvalidArgument(format!(
                "'{}' is a thin pool, not a volume",
                v.name
            )));
        }
        let buf = vec![0u8; us(blocks) * BLOCK_SIZE];
        let planned = if blocks > 0 {
            self.plan(vi, block, blocks, false)
        } else {
            None
        };
        match planned {
            Some((_, pieces)) => self.launch(tag, id, block, Payload::Read(buf), pieces),
            None => {
                let mut buf = buf;
                let result = self.read(id, block, &mut buf);
                self.aio.done.push(VolCompletion {
                    tag,
                    result,
                    data: buf,
                });
            }
        }
        Ok(())
    }

    /// Moves finished queued requests into `out` (see [`IoQueue::poll`]).
    pub(super) fn q_poll(&mut self, out: &mut Vec<VolCompletion>, wait: bool) {
        self.aio_release();
        self.aio_collect(false);
        self.aio_answer();
        while wait && self.aio.done.is_empty() && !self.aio.parents.is_empty() {
            self.aio_collect(true);
            self.aio_answer();
        }
        out.append(&mut self.aio.done);
    }

    /// Device pieces of queued requests in flight now.
    pub(super) fn q_pieces(&self) -> usize {
        self.aio.children.len()
    }

    /// Asks every present disk to call `waker` when a submitted request completes; whether
    /// all of them will ([`BlockDevice::set_waker`]).
    pub(super) fn set_wakers(&mut self, waker: &crate::dev::Waker) -> bool {
        let mut all = true;
        for d in self.devs.iter_mut().flatten() {
            all &= d.set_waker(waker.clone());
        }
        all
    }
}

impl IoQueue<'_> {
    /// The pool (read-only view while requests are in flight).
    #[must_use]
    pub fn pool(&self) -> &Pool {
        self.pool
    }

    /// Requests submitted whose completion [`IoQueue::poll`] has not returned yet.
    #[must_use]
    pub fn in_flight(&self) -> usize {
        self.pool.q_in_flight()
    }

    /// Pieces in flight on the disks now.
    #[must_use]
    pub fn device_requests(&self) -> usize {
        self.pool.q_pieces()
    }

    /// Starts a write of whole blocks of volume `id` at `block`, answered under `tag`.
    /// Arguments that are wrong (no such volume, beyond its end, not whole blocks, read-only
    /// pool) are refused here; failures of the I/O come back in the completion.
    pub fn write(&mut self, tag: u64, id: u32, block: u64, buf: &[u8]) -> Result<(), Error> {
        self.pool.q_write(tag, id, block, buf)
    }

    /// Starts a read of `blocks` blocks of volume `id` at `block`, answered under `tag` with
    /// the data.
    pub fn read(&mut self, tag: u64, id: u32, block: u64, blocks: u64) -> Result<(), Error> {
        self.pool.q_read(tag, id, block, blocks)
    }

    /// Moves finished requests into `out`; with `wait`, blocks until there is at least one
    /// (unless nothing is in flight).
    pub fn poll(&mut self, out: &mut Vec<VolCompletion>, wait: bool) {
        self.pool.q_poll(out, wait);
    }

    /// Waits for every request in flight, then flushes the pool ([`Pool::flush`]): every write
    /// completed before this call (answered or not) is durable when it returns `Ok`.
    pub fn flush(&mut self) -> Result<(), Error> {
        self.pool.aio_quiesce();
        self.pool.aio_answer();
        self.pool.flush()
    }

    /// Waits for every request in flight and returns the completions not yet polled.
    pub fn finish(mut self) -> Vec<VolCompletion> {
        let mut out = Vec::new();
        while self.in_flight() > 0 {
            self.poll(&mut out, true);
        }
        out
    }
}

impl Drop for IoQueue<'_> {
    fn drop(&mut self) {
        // Nothing may stay in flight once the pool is handed back; unpolled answers are lost
        // (the writes themselves are done or were driven to their final result).
        let p = &mut *self.pool;
        p.aio_release();
        while !p.aio.parents.is_empty() {
            p.aio_collect(true);
            p.aio_answer();
        }
        p.aio.done.clear();
    }
}
