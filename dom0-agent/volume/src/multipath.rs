//! Multipath: one disk reached through several block devices ("paths") that carry the same
//! label. A policy picks the path for each request; a path that fails is retired and the
//! request is retried on the next one, so I/O continues while any path works.
//!
//! Submitted requests go to the path the policy picks and stay in flight there; the
//! minimum-queue policy compares the paths' real queue depths (requests in flight on each).
//! A request that fails on a path is resubmitted to the next one when it is reaped.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use crate::dev::{BlockDevice, Completion, DevError, Request};

/// How requests are spread over paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PathPolicy {
    /// Rotate over every live path.
    #[default]
    RoundRobin,
    /// The live path with the fewest queued requests (ties: rotate).
    MinQueue,
    /// Rotate over the live paths of the highest priority only.
    Priority,
    /// Use one path until it fails, then the next.
    FailoverOnly,
}

struct Path {
    dev: Box<dyn BlockDevice>,
    priority: u32,
    failed: bool,
    served: u64,
    issued: u64,
}

/// A request in flight on one path: the caller's tag, the path, and the request itself (kept
/// to resubmit it elsewhere if the path fails it).
struct Flight {
    tag: u64,
    path: usize,
    req: Request,
}

/// A disk over several paths.
pub struct MultipathDisk {
    paths: Vec<Path>,
    policy: PathPolicy,
    next: usize,
    active: usize,
    /// Requests in flight, by the tag this disk gave them on their path.
    flights: BTreeMap<u64, Flight>,
    next_tag: u64,
}

impl MultipathDisk {
    /// Groups `paths` (device, priority) under `policy`. Panics never; an empty list gives a
    /// disk on which everything fails with [`DevError::Gone`].
    #[must_use]
    pub fn new(paths: Vec<(Box<dyn BlockDevice>, u32)>, policy: PathPolicy) -> Self {
        let paths = paths
            .into_iter()
            .map(|(dev, priority)| Path {
                dev,
                priority,
                failed: false,
                served: 0,
                issued: 0,
            })
            .collect();
        Self {
            paths,
            policy,
            next: 0,
            active: 0,
            flights: BTreeMap::new(),
            next_tag: 0,
        }
    }

    /// Requests sent to each path (synchronous and submitted, including failed ones).
    #[must_use]
    pub fn issued(&self) -> Vec<u64> {
        self.paths.iter().map(|p| p.issued).collect()
    }

    /// Sends `req` to the path the policy picks; a path that fails it at once is retired and
    /// the next one tried. Returns the completion when it is already known.
    fn start(&mut self, tag: u64, req: Request) -> Option<Completion> {
        loop {
            let Some(i) = self.pick() else {
                return Some(Completion {
                    tag,
                    result: Err(DevError::Gone),
                    data: Vec::new(),
                });
            };
            let inner = self.next_tag;
            self.next_tag += 1;
            self.paths[i].issued += 1;
            match self.paths[i].dev.submit(inner, req.clone()) {
                None => {
                    self.flights.insert(inner, Flight { tag, path: i, req });
                    return None;
                }
                Some(c) => {
                    if let Ok(c) = self.settle(i, c) {
                        return Some(Completion { tag, ..c });
                    }
                }
            }
        }
    }

    /// What a completion on path `i` means: final (success or an error no path can fix), or
    /// `Err(())` when the path failed and has been retired.
    fn settle(&mut self, i: usize, c: Completion) -> Result<Completion, ()> {
        match c.result {
            Ok(()) => {
                self.paths[i].served += 1;
                Ok(c)
            }
            Err(DevError::OutOfRange | DevError::Misaligned) => Ok(c),
            Err(_) => {
                self.paths[i].failed = true;
                Err(())
            }
        }
    }

    /// Paths still in service.
    #[must_use]
    pub fn live_paths(&self) -> usize {
        self.paths.iter().filter(|p| !p.failed).count()
    }

    /// Requests served by each path.
    #[must_use]
    pub fn served(&self) -> Vec<u64> {
        self.paths.iter().map(|p| p.served).collect()
    }

    fn pick(&mut self) -> Option<usize> {
        let n = self.paths.len();
        let live = |i: usize, s: &Self| !s.paths[i].failed;
        match self.policy {
            PathPolicy::FailoverOnly => (0..n)
                .map(|k| (self.active + k) % n)
                .find(|&i| live(i, self))
                .inspect(|&i| self.active = i),
            PathPolicy::RoundRobin => {
                let i = (0..n)
                    .map(|k| (self.next + k) % n)
                    .find(|&i| live(i, self))?;
                self.next = (i + 1) % n;
                Some(i)
            }
            PathPolicy::Priority => {
                let best = self
                    .paths
                    .iter()
                    .filter(|p| !p.failed)
                    .map(|p| p.priority)
                    .max()?;
                let i = (0..n)
                    .map(|k| (self.next + k) % n)
                    .find(|&i| live(i, self) && self.paths[i].priority == best)?;
                self.next = (i + 1) % n;
                Some(i)
            }
            PathPolicy::MinQueue => {
                let min = self
                    .paths
                    .iter()
                    .filter(|p| !p.failed)
                    .map(|p| p.dev.queue_depth())
                    .min()?;
                let i = (0..n)
                    .map(|k| (self.next + k) % n)
                    .find(|&i| live(i, self) && self.paths[i].dev.queue_depth() == min)?;
                self.next = (i + 1) % n;
                Some(i)
            }
        }
    }

    fn run<T>(
        &mut self,
        mut op: impl FnMut(&mut dyn BlockDevice) -> Result<T, DevError>,
    ) -> Result<T, DevError> {
        while let Some(i) = self.pick() {
            self.paths[i].issued += 1;
            match op(&mut *self.paths[i].dev) {
                Ok(v) => {
                    self.paths[i].served += 1;
                    return Ok(v);
                }
                Err(e @ (DevError::OutOfRange | DevError::Misaligned)) => return Err(e),
                Err(_) => self.paths[i].failed = true,
            }
        }
        Err(DevError::Gone)
    }
}

impl BlockDevice for MultipathDisk {
    fn num_blocks(&self) -> u64 {
        self.paths
            .iter()
            .map(|p| p.dev.num_blocks())
            .min()
            .unwrap_or(0)
    }
    fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), DevError> {
        self.run(|d| d.read(lba, buf))
    }
    fn write(&mut self, lba: u64, buf: &[u8]) -> Result<(), DevError> {
        self.run(|d| d.write(lba, buf))
    }
    fn flush(&mut self) -> Result<(), DevError> {
        // Every live path may hold cached writes: flush them all; a failing one is retired.
        let mut ok = false;
        for p in self.paths.iter_mut().filter(|p| !p.failed) {
            match p.dev.flush() {
                Ok(()) => ok = true,
                Err(_) => p.failed = true,
            }
        }
        if ok { Ok(()) } else { Err(DevError::Gone) }
    }
    fn queue_depth(&self) -> usize {
        self.flights.len()
    }
    fn waits_on_medium(&self) -> bool {
        self.paths.iter().any(|p| p.dev.waits_on_medium())
    }
    fn set_waker(&mut self, waker: crate::dev::Waker) -> bool {
        // A completion on any path wakes the caller, who reaps this disk, which reaps the path.
        let mut all = true;
        for p in &mut self.paths {
            all &= p.dev.set_waker(waker.clone());
        }
        all
    }
    fn submit(&mut self, tag: u64, req: Request) -> Option<Completion> {
        match req {
            // Writes completed before the flush have been reaped from their paths, so flushing
            // every live path now covers them.
            Request::Flush => Some(Completion {
                tag,
                result: self.flush(),
                data: Vec::new(),
            }),
            req => self.start(tag, req),
        }
    }
    fn reap(&mut self, out: &mut Vec<Completion>, wait: bool) {
        let before = out.len();
        let mut got = Vec::new();
        loop {
            // Inner tags are unique across paths: the flight says which path a tag went to.
            for p in &mut self.paths {
                if p.dev.queue_depth() > 0 {
                    p.dev.reap(&mut got, false);
                }
            }
            for c in core::mem::take(&mut got) {
                let Some(f) = self.flights.remove(&c.tag) else {
                    continue;
                };
                match self.settle(f.path, c) {
                    Ok(c) => out.push(Completion { tag: f.tag, ..c }),
                    Err(()) => {
                        if let Some(c) = self.start(f.tag, f.req) {
                            out.push(c);
                        }
                    }
                }
            }
            if !wait || out.len() > before || self.flights.is_empty() {
                return;
            }
            // Nothing finished yet: wait on the path with the most in flight.
            let busiest = (0..self.paths.len()).max_by_key(|&i| self.paths[i].dev.queue_depth());
            match busiest {
                Some(i) if self.paths[i].dev.queue_depth() > 0 => {
                    self.paths[i].dev.reap(&mut got, true);
                }
                _ => {
                    // In flight here but on no path: cannot happen; fail them rather than hang.
                    for (_, f) in core::mem::take(&mut self.flights) {
                        out.push(Completion {
                            tag: f.tag,
                            result: Err(DevError::Gone),
                            data: Vec::new(),
                        });
                    }
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemDisk;
    use crate::dev::WriteData;
    use crate::testdev::Shared;
    use crate::testdev::{FaultyDisk, Interleave, QueuedDisk, SharedDisk};
    use alloc::sync::Arc;
    use alloc::vec;
    use core::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn failed_path_is_retired_and_io_continues() {
        let disk = SharedDisk::new(16);
        for policy in [
            PathPolicy::RoundRobin,
            PathPolicy::MinQueue,
            PathPolicy::Priority,
            PathPolicy::FailoverOnly,
        ] {
            let (p0, f0) = FaultyDisk::new(Box::new(disk.clone()));
            let (p1, _f1) = FaultyDisk::new(Box::new(disk.clone()));
            let mut mp = MultipathDisk::new(vec![(Box::new(p0), 1), (Box::new(p1), 1)], policy);
            let buf = vec![7u8; 4096];
            for i in 0..4 {
                mp.write(i, &buf).unwrap();
            }
            f0.borrow_mut().gone = true;
            for i in 4..8 {
                mp.write(i, &buf).unwrap();
            }
            let mut r = vec![0u8; 4096];
            mp.read(6, &mut r).unwrap();
            assert_eq!(r, buf);
            assert_eq!(mp.live_paths(), 1, "{policy:?}");
        }
        let _ = MemDisk::new(1);
    }

    #[test]
    fn policies_spread_or_pin() {
        let disk = SharedDisk::new(16);
        let mk = |policy, prios: [u32; 3]| {
            let paths: Vec<(Box<dyn BlockDevice>, u32)> = prios
                .iter()
                .map(|p| (Box::new(disk.clone()) as Box<dyn BlockDevice>, *p))
                .collect();
            MultipathDisk::new(paths, policy)
        };
        let mut buf = vec![0u8; 4096];
        let mut rr = mk(PathPolicy::RoundRobin, [1, 1, 1]);
        let mut fo = mk(PathPolicy::FailoverOnly, [1, 1, 1]);
        let mut pr = mk(PathPolicy::Priority, [1, 5, 5]);
        for _ in 0..6 {
            rr.read(0, &mut buf).unwrap();
            fo.read(0, &mut buf).unwrap();
            pr.read(0, &mut buf).unwrap();
        }
        assert_eq!(rr.served(), vec![2, 2, 2]);
        assert_eq!(fo.served(), vec![6, 0, 0]);
        assert_eq!(pr.served(), vec![0, 3, 3]);
    }

    /// A path whose submitted requests stay in flight until the test releases them.
    struct Stuck {
        disk: SharedDisk,
        queue: Vec<(u64, Request)>,
        release: Arc<AtomicBool>,
    }

    impl BlockDevice for Stuck {
        fn num_blocks(&self) -> u64 {
            self.disk.num_blocks()
        }
        fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), DevError> {
            self.disk.read(lba, buf)
        }
        fn write(&mut self, lba: u64, buf: &[u8]) -> Result<(), DevError> {
            self.disk.write(lba, buf)
        }
        fn flush(&mut self) -> Result<(), DevError> {
            Ok(())
        }
        fn queue_depth(&self) -> usize {
            self.queue.len()
        }
        fn submit(&mut self, tag: u64, req: Request) -> Option<Completion> {
            self.queue.push((tag, req));
            None
        }
        fn reap(&mut self, out: &mut Vec<Completion>, _wait: bool) {
            if self.release.load(Ordering::SeqCst) {
                for (tag, req) in core::mem::take(&mut self.queue) {
                    out.push(crate::dev::complete_now(&mut self.disk, tag, req));
                }
            }
        }
    }

    #[test]
    fn min_queue_sees_requests_in_flight_on_each_path() {
        for policy in [PathPolicy::MinQueue, PathPolicy::RoundRobin] {
            let disk = SharedDisk::new(16);
            let release = Arc::new(AtomicBool::new(false));
            let stuck = Stuck {
                disk: disk.clone(),
                queue: Vec::new(),
                release: release.clone(),
            };
            let sched = Shared::new(Interleave::new(5));
            sched.borrow_mut().immediate_in_8 = 8;
            let quick = QueuedDisk::new(Box::new(disk.clone()), sched);
            let mut mp =
                MultipathDisk::new(vec![(Box::new(stuck), 1), (Box::new(quick), 1)], policy);
            let mut done = Vec::new();
            for t in 0..8u64 {
                let data = WriteData::new(&vec![u8::try_from(t).unwrap() + 1; 4096]);
                if let Some(c) = mp.submit(t, Request::Write { lba: t, data }) {
                    done.push(c);
                }
            }
            match policy {
                // The stuck path keeps its first request in flight, so every later one goes to
                // the other path (its queue is empty each time).
                PathPolicy::MinQueue => assert_eq!(mp.issued(), vec![1, 7]),
                _ => assert_eq!(mp.issued(), vec![4, 4]),
            }
            assert!(mp.queue_depth() > 0);
            release.store(true, Ordering::SeqCst);
            while mp.queue_depth() > 0 {
                mp.reap(&mut done, true);
            }
            assert_eq!(done.len(), 8);
            assert!(done.iter().all(|c| c.result.is_ok()));
            let mut r = vec![0u8; 4096];
            for t in 0..8u64 {
                mp.read(t, &mut r).unwrap();
                assert_eq!(u64::from(r[0]), t + 1, "{policy:?}");
            }
        }
    }

    #[test]
    fn a_request_failed_by_a_path_is_resubmitted_to_the_next() {
        let disk = SharedDisk::new(16);
        let sched = Shared::new(Interleave::new(9));
        sched.borrow_mut().immediate_in_8 = 0;
        let (p0, f0) = FaultyDisk::new(Box::new(disk.clone()));
        let q0 = QueuedDisk::new(Box::new(p0), sched.clone());
        let q1 = QueuedDisk::new(Box::new(disk.clone()), sched);
        let mut mp = MultipathDisk::new(
            vec![(Box::new(q0), 1), (Box::new(q1), 1)],
            PathPolicy::RoundRobin,
        );
        for t in 0..6u64 {
            let data = WriteData::new(&vec![7u8; 4096]);
            assert!(mp.submit(t, Request::Write { lba: t, data }).is_none());
        }
        // Path 0 vanishes with its requests in flight: they fail when performed, and go to path 1.
        f0.borrow_mut().gone = true;
        let mut done = Vec::new();
        while mp.queue_depth() > 0 {
            mp.reap(&mut done, true);
        }
        assert_eq!(done.len(), 6);
        assert!(done.iter().all(|c| c.result.is_ok()), "{done:?}");
        assert_eq!(mp.live_paths(), 1);
        let mut r = vec![0u8; 4096];
        for t in 0..6 {
            mp.read(t, &mut r).unwrap();
            assert_eq!(r, vec![7u8; 4096]);
        }
    }
}
