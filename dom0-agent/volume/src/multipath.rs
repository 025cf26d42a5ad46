//! Multipath: one disk reached through several block devices ("paths") that carry the same
//! label. A policy picks the path for each request; a path that fails is retired and the
//! request is retried on the next one, so I/O continues while any path works.

use alloc::boxed::Box;
use alloc::vec::Vec;

use crate::dev::{BlockDevice, DevError};

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
}

/// A disk over several paths.
pub struct MultipathDisk {
    paths: Vec<Path>,
    policy: PathPolicy,
    next: usize,
    active: usize,
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
            })
            .collect();
        Self {
            paths,
            policy,
            next: 0,
            active: 0,
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
        self.paths
            .iter()
            .filter(|p| !p.failed)
            .map(|p| p.dev.queue_depth())
            .min()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemDisk;
    use crate::testdev::{FaultyDisk, SharedDisk};
    use alloc::vec;

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
}
