//! Requests in flight through a pool's queue: mirror legs and stripe columns in parallel, a
//! write answered only when every in-sync leg has it, and fault injection (failing writes and
//! reads, a vanishing disk) while many requests are in flight in a scheduler-chosen order.
#![allow(clippy::cast_possible_truncation)] // Test sizes and tags are small; truncation cannot happen.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use volmgr::dev::{BLOCK_SIZE, Completion, DevError, Request, complete_now};
use volmgr::format::VolKind;
use volmgr::pool::{DiskSpec, LayoutSpec, VolCompletion};
use volmgr::testdev::{FaultHandle, FaultyDisk, Interleave, QueuedDisk, Sched, SharedDisk};
use volmgr::{BlockDevice, Error, Pool, PoolConfig};

/// A disk whose submitted requests to the data area wait until the test opens its gate (the
/// pool's own records and flushes pass at once).
struct Gate {
    disk: SharedDisk,
    held: Vec<(u64, Request)>,
    open: Arc<AtomicBool>,
}

/// Where volume data starts on a pool made with `PoolConfig::small`.
fn data_start() -> u64 {
    volmgr::format::Label::data_start_for(16, 2, 16)
}

impl BlockDevice for Gate {
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
        self.held.len()
    }
    fn submit(&mut self, tag: u64, req: Request) -> Option<Completion> {
        match &req {
            Request::Read { lba, .. } | Request::Write { lba, .. } if *lba >= data_start() => {
                self.held.push((tag, req));
                None
            }
            _ => Some(complete_now(&mut self.disk, tag, req)),
        }
    }
    fn reap(&mut self, out: &mut Vec<Completion>, _wait: bool) {
        if self.open.load(Ordering::SeqCst) {
            for (tag, req) in std::mem::take(&mut self.held) {
                out.push(complete_now(&mut self.disk, tag, req));
            }
        }
    }
}

fn gated_pool(n: usize) -> (Vec<SharedDisk>, Vec<Arc<AtomicBool>>, Pool) {
    let d = disks(n, 1024);
    let gates: Vec<Arc<AtomicBool>> = (0..n).map(|_| Arc::new(AtomicBool::new(true))).collect();
    let devs = d
        .iter()
        .zip(&gates)
        .enumerate()
        .map(|(i, (s, g))| {
            let dev = Gate {
                disk: s.clone(),
                held: Vec::new(),
                open: g.clone(),
            };
            (
                Box::new(dev) as Box<dyn BlockDevice>,
                DiskSpec::new(&format!("d{i}"), "t"),
            )
        })
        .collect();
    let p = Pool::create(devs, PoolConfig::small(POOL_ID)).unwrap();
    (d, gates, p)
}

#[test]
fn mirror_legs_are_written_in_parallel_and_a_write_waits_for_every_leg() {
    let (_d, gates, mut p) = gated_pool(2);
    let m = p
        .create_volume("m", 64, LayoutSpec::Mirror { legs: 2 }, None)
        .unwrap();
    let s = p
        .create_volume(
            "s",
            64,
            LayoutSpec::Stripe {
                columns: 2,
                unit: 4,
            },
            None,
        )
        .unwrap();
    p.flush().unwrap();
    for g in &gates {
        g.store(false, Ordering::SeqCst);
    }
    let mut out = Vec::new();
    let mut q = p.queue();
    q.write(1, m, 3, &pattern(1)).unwrap();
    // Its region is not logged yet: no leg sees it before the log write, which the next
    // poll makes (once for every write waiting then).
    assert_eq!(
        q.device_requests(),
        0,
        "written before its region was logged"
    );
    q.poll(&mut out, false);
    assert_eq!(q.device_requests(), 2, "both legs have the write at once");
    gates[0].store(true, Ordering::SeqCst);
    q.poll(&mut out, false);
    assert!(out.is_empty(), "answered before the second leg had it");
    assert_eq!(q.device_requests(), 1);
    gates[1].store(true, Ordering::SeqCst);
    q.poll(&mut out, true);
    assert_eq!(out.len(), 1);
    assert!(out[0].result.is_ok());
    // Eight blocks over two columns of four: both columns at once.
    for g in &gates {
        g.store(false, Ordering::SeqCst);
    }
    let data: Vec<u8> = (0..8).flat_map(|t| pattern(100 + t)).collect();
    q.write(2, s, 0, &data).unwrap();
    assert_eq!(q.device_requests(), 2, "every column at once");
    // A read of both mirror legs' block goes to one leg only.
    q.read(3, m, 3, 1).unwrap();
    assert_eq!(q.device_requests(), 3);
    for g in &gates {
        g.store(true, Ordering::SeqCst);
    }
    let rest = q.finish();
    assert_eq!(rest.len(), 2);
    for c in rest {
        assert!(c.result.is_ok());
        if c.tag == 3 {
            assert_eq!(c.data, pattern(1));
        }
    }
    for t in 0..8 {
        assert_eq!(read_block(&mut p, s, t), pattern(100 + t));
    }
    assert!(p.verify_mirrors().unwrap().is_empty());
}

fn queued_faulty_pool(n: usize, seed: u64) -> (Vec<SharedDisk>, Vec<FaultHandle>, Sched, Pool) {
    let d = disks(n, 2048);
    let sched: Sched = volmgr::testdev::Shared::new(Interleave::new(seed));
    let mut handles = Vec::new();
    let devs = d
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let (f, h) = FaultyDisk::new(Box::new(s.clone()));
            handles.push(h);
            (
                Box::new(QueuedDisk::new(Box::new(f), sched.clone())) as Box<dyn BlockDevice>,
                DiskSpec::new(&format!("d{i}"), "t"),
            )
        })
        .collect();
    let p = Pool::create(devs, PoolConfig::small(POOL_ID)).unwrap();
    (d, handles, sched, p)
}

/// Submits writes of `pattern(base + b)` to blocks `0..count`, running `midway` after half of
/// them; returns every answer.
fn write_batch(
    p: &mut Pool,
    vol: u32,
    count: u64,
    base: u64,
    midway: impl FnOnce(),
) -> Vec<VolCompletion> {
    let mut q = p.queue();
    let mut out = Vec::new();
    let mut midway = Some(midway);
    for b in 0..count {
        q.write(b, vol, b, &pattern(base + b)).unwrap();
        if b == count / 2 {
            assert!(q.device_requests() > 4, "requests must be in flight");
            if let Some(f) = midway.take() {
                f();
            }
        }
        if b % 5 == 4 {
            q.poll(&mut out, false);
        }
    }
    out.extend(q.finish());
    assert_eq!(out.len() as u64, count);
    out
}

#[test]
fn a_leg_failing_under_writes_in_flight_is_detached_and_every_write_succeeds() {
    for seed in 1..=8 {
        let (d, h, _sched, mut p) = queued_faulty_pool(2, seed);
        let v = p
            .create_volume("m", 200, LayoutSpec::Mirror { legs: 2 }, None)
            .unwrap();
        for b in 0..200 {
            p.write(v, b, &pattern(b)).unwrap();
        }
        p.flush().unwrap();
        let out = write_batch(&mut p, v, 48, 500, || {
            h[1].borrow_mut().fail_all_writes = true;
        });
        for c in &out {
            assert!(c.result.is_ok(), "seed {seed}: {:?}", c.result);
        }
        assert!(p.list()[0].state.contains("degraded"), "seed {seed}");
        assert!(p.events.iter().any(|e| e.contains("detached")));
        p.flush().unwrap();
        for b in 0..48 {
            assert_eq!(read_block(&mut p, v, b), pattern(500 + b), "seed {seed}");
        }
        drop(p);
        // The disk comes back healthy: the detached leg is resynchronised.
        let mut p = reopen(&d);
        assert!(p.stale_regions() > 0);
        while p.resync_step(4).unwrap() > 0 {}
        assert!(p.verify_mirrors().unwrap().is_empty(), "seed {seed}");
        for b in 0..48 {
            assert_eq!(read_block(&mut p, v, b), pattern(500 + b), "seed {seed}");
        }
    }
}

#[test]
fn a_disk_vanishing_with_requests_in_flight_leaves_every_write_on_the_other_legs() {
    for seed in 1..=8 {
        let (_d, h, _sched, mut p) = queued_faulty_pool(4, seed);
        let v = p
            .create_volume(
                "r10",
                160,
                LayoutSpec::StripeMirror {
                    columns: 2,
                    legs: 2,
                    unit: 4,
                },
                None,
            )
            .unwrap();
        p.flush().unwrap();
        let out = write_batch(&mut p, v, 64, 900, || h[2].borrow_mut().gone = true);
        for c in &out {
            assert!(c.result.is_ok(), "seed {seed}: {:?}", c.result);
        }
        assert!(p.disks()[2].state.starts_with("missing"), "seed {seed}");
        for b in 0..64 {
            assert_eq!(read_block(&mut p, v, b), pattern(900 + b), "seed {seed}");
        }
        assert!(p.check().is_empty(), "{:?}", p.check());
    }
}

#[test]
fn a_failing_stripe_column_fails_only_its_requests() {
    let (_d, h, _sched, mut p) = queued_faulty_pool(2, 3);
    let s = p
        .create_volume(
            "s",
            64,
            LayoutSpec::Stripe {
                columns: 2,
                unit: 4,
            },
            None,
        )
        .unwrap();
    p.flush().unwrap();
    let VolKind::Thick { layout, .. } = &p.meta().volumes[0].kind else {
        panic!("thick");
    };
    let disk1 = layout.legs[0].columns[1].segs[0].disk as usize;
    h[disk1].borrow_mut().fail_all_writes = true;
    let mut q = p.queue();
    for b in 0..16 {
        q.write(b, s, b, &pattern(b)).unwrap();
    }
    let out = q.finish();
    assert_eq!(out.len(), 16);
    for c in out {
        let on_col1 = (c.tag / 4) % 2 == 1;
        match c.result {
            Ok(()) => assert!(!on_col1, "block {} on the failing column succeeded", c.tag),
            Err(Error::NoCopy(..)) => assert!(on_col1, "block {} failed", c.tag),
            Err(e) => panic!("block {}: {e}", c.tag),
        }
    }
}

#[test]
fn reads_in_flight_that_fail_are_served_from_the_other_leg() {
    let (_d, h, _sched, mut p) = queued_faulty_pool(2, 5);
    let v = p
        .create_volume("m", 100, LayoutSpec::Mirror { legs: 2 }, None)
        .unwrap();
    for b in 0..100 {
        p.write(v, b, &pattern(b)).unwrap();
    }
    p.flush().unwrap();
    for blk in 0..2048 {
        h[0].borrow_mut().bad_read_blocks.insert(blk);
    }
    let mut q = p.queue();
    for b in 0..100 {
        q.read(b, v, b, 1).unwrap();
    }
    let out = q.finish();
    assert_eq!(out.len(), 100);
    for c in out {
        assert!(c.result.is_ok());
        assert_eq!(c.data.len(), BLOCK_SIZE);
        assert_eq!(c.data, pattern(c.tag), "block {}", c.tag);
    }
    assert!(p.events.iter().any(|e| e.contains("detached")));
}

#[test]
fn wrong_arguments_are_refused_at_submission() {
    let d = disks(2, 1024);
    let mut p = create(&d);
    let v = p.create_volume("c", 16, LayoutSpec::Concat, None).unwrap();
    let mut q = p.queue();
    assert!(matches!(
        q.write(1, v, 15, &[0u8; 2 * BLOCK_SIZE]),
        Err(Error::OutOfRange(_))
    ));
    assert!(matches!(
        q.write(1, v, 0, &[0u8; 100]),
        Err(Error::Misaligned)
    ));
    assert!(matches!(q.read(1, v, 10, 7), Err(Error::OutOfRange(_))));
    assert!(q.read(1, 999, 0, 1).is_err());
    assert_eq!(q.in_flight(), 0);
}

#[test]
fn thin_writes_in_place_and_mapped_reads_go_through_the_queue() {
    let (_d, gates, mut p) = gated_pool(2);
    p.create_thin_pool("tp", 64, LayoutSpec::Mirror { legs: 2 }, None, 4)
        .unwrap();
    let t = p.create_thin("t", "tp", 64).unwrap();
    p.flush().unwrap();
    for g in &gates {
        g.store(false, Ordering::SeqCst);
    }
    let mut out = Vec::new();
    {
        let mut q = p.queue();
        // The first write allocates its chunk: the synchronous path, answered at once.
        q.write(1, t, 5, &pattern(1)).unwrap();
        assert_eq!(q.device_requests(), 0);
        q.poll(&mut out, false);
        assert_eq!(out.len(), 1);
        assert!(out[0].result.is_ok());
        // The chunk is this volume's alone now: a write into it goes to both legs of the pool's
        // data volume, in flight.
        q.write(2, t, 6, &pattern(2)).unwrap();
        q.poll(&mut out, false);
        assert_eq!(q.device_requests(), 2, "an in-place thin write is split");
        // A read of the mapped chunk goes to one leg; an unmapped chunk needs no device.
        q.read(3, t, 5, 1).unwrap();
        assert_eq!(q.device_requests(), 3);
        q.read(4, t, 40, 1).unwrap();
        assert_eq!(q.device_requests(), 3);
        for g in &gates {
            g.store(true, Ordering::SeqCst);
        }
        out.extend(q.finish());
    }
    assert_eq!(out.len(), 4);
    for c in &out {
        assert!(c.result.is_ok(), "{:?}", c.result);
        match c.tag {
            3 => assert_eq!(c.data, pattern(1)),
            4 => assert_eq!(c.data, vec![0u8; BLOCK_SIZE]),
            _ => {}
        }
    }
    assert_eq!(read_block(&mut p, t, 6), pattern(2));
    // A snapshot shares the chunk: the next write redirects it, synchronously, and the
    // snapshot keeps the old data.
    p.snapshot(
        "t",
        "s",
        volmgr::pool::SnapshotKind::SpaceOptimized,
        LayoutSpec::Concat,
        None,
    )
    .unwrap();
    let s = p.volume_id("s").unwrap();
    for g in &gates {
        g.store(false, Ordering::SeqCst);
    }
    {
        let mut q = p.queue();
        q.write(5, t, 6, &pattern(5)).unwrap();
        q.poll(&mut out, false);
        assert_eq!(
            q.device_requests(),
            0,
            "a shared chunk is not written in place"
        );
        for g in &gates {
            g.store(true, Ordering::SeqCst);
        }
        let rest = q.finish();
        assert!(rest.iter().all(|c| c.result.is_ok()));
    }
    assert_eq!(read_block(&mut p, t, 6), pattern(5));
    assert_eq!(read_block(&mut p, s, 6), pattern(2));
    assert!(p.verify_mirrors().unwrap().is_empty());
}
