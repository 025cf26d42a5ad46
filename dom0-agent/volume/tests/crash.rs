//! Crash consistency: a workload over disks with volatile write caches is cut at every write
//! boundary (each device write or flush, over all disks), and the surviving images are built
//! with all, none, or random subsets of the unflushed writes. Every image must open, pass the
//! metadata check, have identical mirror legs, and return every write acknowledged before the
//! last completed flush (or a later write to the same block).
//!
//! Every disk is a [`QueuedDisk`] over its crashable disk: the last phase of the workload keeps
//! batches of requests in flight at once (mirror legs, stripe columns, a thin volume), and a
//! seeded [`Interleave`] decides the order in which they reach the disks, so crash points fall
//! between the pieces of requests in flight together.
#![allow(clippy::cast_possible_truncation)] // Test sizes and tags are small; truncation cannot happen.

mod common;

use std::collections::BTreeMap;
use volmgr::testdev::Shared;

use common::*;
use volmgr::pool::{LayoutSpec, SnapshotKind};
use volmgr::testdev::{Clock, CrashClock, CrashDisk, CrashState, Interleave, QueuedDisk, Sched};
use volmgr::{BlockDevice, Error, Pool};

const DISK_BLOCKS: u64 = 512;

/// What a block may read back as: the value at the last completed flush, or any later write.
#[derive(Clone, Default)]
struct Expect {
    durable: u64,
    pending: Vec<u64>,
}

#[derive(Clone, Default)]
struct Model {
    vols: BTreeMap<String, BTreeMap<u64, Expect>>,
}

impl Model {
    fn write(&mut self, vol: &str, b: u64, tag: u64) {
        self.vols
            .entry(vol.into())
            .or_default()
            .entry(b)
            .or_default()
            .pending
            .push(tag);
    }
    fn flushed(&mut self) {
        for v in self.vols.values_mut() {
            for e in v.values_mut() {
                if let Some(last) = e.pending.last() {
                    e.durable = *last;
                    e.pending.clear();
                }
            }
        }
    }
    /// A snapshot taken right after a completed flush.
    fn snapshot(&mut self, origin: &str, snap: &str) {
        let copy = self.vols.get(origin).cloned().unwrap_or_default();
        self.vols.insert(snap.into(), copy);
    }
}

fn base_images() -> Vec<Vec<u8>> {
    base_images_version(volmgr::format::MD_VERSION)
}

/// The starting pool, written with metadata record version `version`.
fn base_images_version(version: u32) -> Vec<Vec<u8>> {
    let d = disks(3, DISK_BLOCKS);
    let mut p = create_version(&d, version);
    p.create_volume("m", 64, LayoutSpec::Mirror { legs: 2 }, None)
        .unwrap();
    p.create_volume("c", 48, LayoutSpec::Concat, None).unwrap();
    p.create_thin_pool("tp", 160, LayoutSpec::Concat, None, 4)
        .unwrap();
    p.create_thin("t", "tp", 128).unwrap();
    p.flush().unwrap();
    d.iter().map(|s| s.snapshot()).collect()
}

struct Run {
    model: Model,
    states: Vec<Shared<CrashState>>,
    clock: Clock,
    completed: bool,
    error: Option<Error>,
}

/// The workload. Stops at the first error (the crash); the model holds what was acknowledged.
fn workload(images: &[Vec<u8>], crash_at: Option<u64>) -> Run {
    workload_seeded(images, crash_at, 0x1234_5678)
}

/// The workload with its random choices drawn from `seed`.
fn workload_seeded(images: &[Vec<u8>], crash_at: Option<u64>, seed: u64) -> Run {
    let clock: Clock = Shared::new(CrashClock {
        ops: 0,
        crash_at,
        crashed: false,
    });
    let mut states = Vec::new();
    let sched: Sched = Shared::new(Interleave::new(seed ^ 0x5151));
    let devs: Vec<Box<dyn BlockDevice>> = images
        .iter()
        .map(|img| {
            let (d, st) = CrashDisk::new(img.clone(), clock.clone());
            states.push(st);
            Box::new(QueuedDisk::new(Box::new(d), sched.clone())) as Box<dyn BlockDevice>
        })
        .collect();
    let mut model = Model::default();
    let result = (|| -> Result<(), Error> {
        let (mut p, _) = Pool::open(devs, volmgr::OpenOptions::default())?;
        let ids: BTreeMap<&str, u32> = ["m", "c", "t"]
            .into_iter()
            .map(|n| (n, p.volume_id(n).unwrap()))
            .collect();
        let mut tag = 1u64;
        let mut rng = Rng(seed);
        let mut w = |p: &mut Pool, model: &mut Model, vol: &str, b: u64| -> Result<(), Error> {
            tag += 1;
            // Recorded before it is issued: a write in flight at the crash may or may not land.
            model.write(vol, b, tag);
            p.write(p.volume_id(vol)?, b, &pattern(tag))?;
            Ok(())
        };
        let flush = |p: &mut Pool, model: &mut Model, clock: &Clock| -> Result<(), Error> {
            p.flush()?;
            if !clock.borrow().crashed {
                model.flushed();
            }
            Ok(())
        };
        // Phase 1: plain writes and flushes on every kind of volume.
        for i in 0..12 {
            w(&mut p, &mut model, "m", rng.below(64))?;
            w(&mut p, &mut model, "c", rng.below(48))?;
            w(&mut p, &mut model, "t", rng.below(128))?;
            if i % 4 == 3 {
                flush(&mut p, &mut model, &clock)?;
            }
        }
        // Phase 2: thin snapshot, then writes to origin and snapshot.
        flush(&mut p, &mut model, &clock)?;
        p.snapshot(
            "t",
            "ts",
            SnapshotKind::SpaceOptimized,
            LayoutSpec::Concat,
            None,
        )?;
        model.snapshot("t", "ts");
        // Zero a range of t: whole shared chunks are released, the edges rewritten.
        let z0 = rng.below(96);
        for b in z0..z0 + 14 {
            model.write("t", b, 0);
        }
        p.write_zeroes(p.volume_id("t")?, z0 * 4096, 14 * 4096)?;
        for _ in 0..6 {
            w(&mut p, &mut model, "t", rng.below(128))?;
            w(&mut p, &mut model, "ts", rng.below(128))?;
        }
        flush(&mut p, &mut model, &clock)?;
        // Phase 3: full snapshot of c filling while c is written (copy before write).
        p.snapshot("c", "cs", SnapshotKind::Full, LayoutSpec::Concat, None)?;
        model.snapshot("c", "cs");
        for _ in 0..4 {
            w(&mut p, &mut model, "c", rng.below(48))?;
        }
        p.fill_step(1)?;
        flush(&mut p, &mut model, &clock)?;
        // Phase 3b: a space-optimised snapshot of thick c in the thin pool (copy on write).
        p.snapshot_in_pool("c", "cso", "tp")?;
        model.snapshot("c", "cso");
        for _ in 0..4 {
            w(&mut p, &mut model, "c", rng.below(48))?;
            w(&mut p, &mut model, "cso", rng.below(48))?;
        }
        flush(&mut p, &mut model, &clock)?;
        // Phase 4: grow c, relayout it to a stripe while writing.
        while p.fill_step(8)? > 0 {}
        p.resize("cs", 56)?;
        p.resize("c", 64)?;
        w(&mut p, &mut model, "c", 60)?;
        p.start_relayout(
            "c",
            LayoutSpec::Stripe {
                columns: 2,
                unit: 4,
            },
            None,
        )?;
        while p.relayout_step(16)? > 0 {
            w(&mut p, &mut model, "c", rng.below(64))?;
            w(&mut p, &mut model, "m", rng.below(64))?;
        }
        flush(&mut p, &mut model, &clock)?;
        // Phase 5: add a mirror leg and resync while writing.
        p.add_mirror_leg("m")?;
        while p.resync_step(1)? > 0 {
            w(&mut p, &mut model, "m", rng.below(64))?;
        }
        for _ in 0..6 {
            w(&mut p, &mut model, "m", rng.below(64))?;
        }
        flush(&mut p, &mut model, &clock)?;
        // Phase 6: split a leg off for backup, write both sides, reattach (changed regions
        // only) and resync while writing.
        p.split_leg("m", 2, "mb")?;
        model.snapshot("m", "mb");
        for _ in 0..4 {
            w(&mut p, &mut model, "m", rng.below(64))?;
            w(&mut p, &mut model, "mb", rng.below(64))?;
        }
        flush(&mut p, &mut model, &clock)?;
        model.vols.remove("mb");
        p.reattach("m", "mb")?;
        while p.resync_step(1)? > 0 {
            w(&mut p, &mut model, "m", rng.below(64))?;
        }
        flush(&mut p, &mut model, &clock)?;
        for _ in 0..4 {
            w(&mut p, &mut model, "m", rng.below(64))?;
            w(&mut p, &mut model, "t", rng.below(128))?;
        }
        flush(&mut p, &mut model, &clock)?;
        // Phase 7: batches of requests in flight together on the mirror, the stripe and
        // the thin volume (different blocks within a batch), completing in the order the
        // interleaving scheduler picks, with reads in flight beside them and a flush issued
        // while some are still in flight.
        // The snapshots go first: the thin pool has room again, and c has no dependents left
        // (its writes are split into pieces, not run synchronously). Mirrored writes to
        // regions not yet logged wait for one log write shared by the batch.
        // (Out of the model first: a crash inside a removal may leave either state.)
        model.vols.remove("ts");
        model.vols.remove("cso");
        p.remove("ts")?;
        p.remove("cso")?;
        flush(&mut p, &mut model, &clock)?;
        let sizes = [("m", 64), ("c", 64), ("t", 128)];
        let mut most_in_flight = 0;
        for batch in 0..6 {
            let mut q = p.queue();
            let mut busy = std::collections::BTreeSet::new();
            let mut reads = BTreeMap::new();
            let mut done = Vec::new();
            for k in 0..10 {
                let (vol, size) = sizes[rng.below(3) as usize];
                let b = rng.below(size);
                if !busy.insert((vol, b)) {
                    continue;
                }
                let id = ids[vol];
                if k % 4 == 3 {
                    tag += 1;
                    reads.insert(tag, (vol, b));
                    q.read(tag, id, b, 1)?;
                } else {
                    tag += 1;
                    model.write(vol, b, tag);
                    q.write(tag, id, b, &pattern(tag))?;
                }
                most_in_flight = most_in_flight.max(q.in_flight());
                if k == 5 {
                    q.poll(&mut done, false);
                }
                if k == 6 && batch % 2 == 1 {
                    // Everything submitted so far completes first, then the pool flushes.
                    q.flush()?;
                    if !clock.borrow().crashed {
                        model.flushed();
                    }
                }
            }
            done.extend(q.finish());
            for c in done {
                c.result?;
                if let Some((vol, b)) = reads.get(&c.tag) {
                    // Not written in this batch: the last write before it, which completed.
                    if let Some(e) = model.vols.get(*vol).and_then(|v| v.get(b)) {
                        let last = e.pending.last().copied().unwrap_or(e.durable);
                        assert!(is_tag(&c.data, last), "read of {vol} block {b} in flight");
                    }
                }
            }
            if batch % 3 == 2 {
                flush(&mut p, &mut model, &clock)?;
            }
        }
        assert!(
            sched.borrow().max_depth > 1 && most_in_flight > 3,
            "the workload must have several requests in flight on one disk"
        );
        Ok(())
    })();
    Run {
        model,
        states,
        clock,
        completed: result.is_ok(),
        error: result.err(),
    }
}

thread_local! {
    static WORK: std::cell::RefCell<std::time::Duration> = const { std::cell::RefCell::new(std::time::Duration::ZERO) };
    static VER: std::cell::RefCell<std::time::Duration> = const { std::cell::RefCell::new(std::time::Duration::ZERO) };
    static PATTERNS: Vec<Vec<u8>> = (0..4096).map(|t| if t == 0 { vec![0u8; 4096] } else { pattern(t) }).collect();
}

fn is_tag(got: &[u8], t: u64) -> bool {
    PATTERNS.with(|p| {
        p.get(t as usize)
            .map_or_else(|| got == pattern(t), |x| got == x.as_slice())
    })
}

fn verify(images: Vec<Vec<u8>>, model: &Model, what: &str) {
    let (mut p, _rep) =
        open_images(images).unwrap_or_else(|e| panic!("{what}: reopen failed: {e}"));
    assert!(p.check().is_empty(), "{what}: {:?}", p.check());
    assert!(
        p.verify_mirrors().unwrap().is_empty(),
        "{what}: mirror legs differ after recovery"
    );
    let check_data = |p: &mut Pool, stage: &str| {
        for (vol, blocks) in &model.vols {
            let id = p
                .volume_id(vol)
                .unwrap_or_else(|e| panic!("{what}: {stage}: {e}"));
            for (b, e) in blocks {
                let got = read_block(p, id, *b);
                let ok = std::iter::once(e.durable)
                    .chain(e.pending.iter().copied())
                    .any(|t| is_tag(&got, t));
                let found = if ok {
                    None
                } else {
                    (0..4096u64).find(|t| is_tag(&got, *t))
                };
                assert!(
                    ok,
                    "{what}: {stage}: volume {vol} block {b}: expected tag {} or {:?}, found {found:?}",
                    e.durable, e.pending
                );
            }
        }
    };
    check_data(&mut p, "after reopen");
    p.settle(|_, _| {})
        .unwrap_or_else(|e| panic!("{what}: settle: {e}"));
    assert!(
        p.verify_mirrors().unwrap().is_empty(),
        "{what}: mirror legs differ after resync"
    );
    check_data(&mut p, "after resync");
}

#[test]
fn crash_at_every_write_boundary() {
    crash_at_every_boundary_of(&base_images(), 4);
}

/// The same workload on a pool of the format before version 3 (thin mappings inside the
/// record), every boundary with two survivor sets.
#[test]
fn crash_at_every_write_boundary_old_format() {
    let base = base_images_version(volmgr::format::MD_VERSION_INLINE);
    let (mut p, _) = open_images(base.clone()).unwrap();
    assert_eq!(p.metadata_version(), volmgr::format::MD_VERSION_INLINE);
    assert!(p.check().is_empty());
    crash_at_every_boundary_of(&base, 2);
}

/// An old-format pool is upgraded with the power cut at every write boundary of the
/// upgrade, and the survivors built with all, none or random subsets of the unflushed
/// writes: each opens as the old pool or the new one, consistent and with every block as it
/// was; an old one then upgrades to the end, and recovery crashed again at every boundary
/// of its open still gives one of the two.
#[test]
fn upgrade_crashed_at_every_write_boundary_leaves_old_or_new_pool() {
    let old = base_images_version(volmgr::format::MD_VERSION_INLINE);
    // Content written and flushed before the upgrade: thin, snapshot, mirror, concat.
    let prep = workload(&old, None);
    assert!(prep.completed);
    let base: Vec<Vec<u8>> = prep
        .states
        .iter()
        .map(|st| st.borrow().image_after_crash(|_| true))
        .collect();
    let mut model = prep.model.clone();
    model.flushed();
    let upgrade = |crash_at: Option<u64>| {
        let clock: Clock = Shared::new(CrashClock {
            ops: 0,
            crash_at,
            crashed: false,
        });
        let mut states = Vec::new();
        let devs: Vec<Box<dyn BlockDevice>> = base
            .iter()
            .map(|img| {
                let (d, st) = CrashDisk::new(img.clone(), clock.clone());
                states.push(st);
                Box::new(d) as Box<dyn BlockDevice>
            })
            .collect();
        let res = Pool::open(devs, volmgr::OpenOptions::default())
            .map_err(|e| e.to_string())
            .and_then(|(mut p, _)| p.upgrade().map_err(|e| e.to_string()));
        (clock, states, res)
    };
    let (clock, _, res) = upgrade(None);
    res.unwrap();
    let total = clock.borrow().ops;
    assert!(total > 4, "upgrade too small: {total}");
    let (mut olds, mut news) = (0, 0);
    let mut rng = Rng(4242);
    for k in 0..total {
        let (clock, states, _) = upgrade(Some(k));
        assert!(clock.borrow().crashed);
        for v in 0..4u64 {
            let images: Vec<Vec<u8>> = states
                .iter()
                .map(|st| {
                    st.borrow().image_after_crash(|_| match v {
                        0 => true,
                        1 => false,
                        _ => rng.below(2) == 0,
                    })
                })
                .collect();
            let what = format!("upgrade crashed at {k} (survivors {v})");
            let (p, _) = open_images(images.clone())
                .unwrap_or_else(|e| panic!("{what}: reopen failed: {e}"));
            let version = p.metadata_version();
            drop(p);
            verify(images.clone(), &model, &what);
            if version == volmgr::format::MD_VERSION {
                news += 1;
                continue;
            }
            olds += 1;
            // The old pool upgrades to the end afterwards.
            let (mut p, _) = open_images(images.clone()).unwrap();
            p.upgrade()
                .unwrap_or_else(|e| panic!("{what}: upgrade after the crash: {e}"));
            let after: Vec<Vec<u8>> = p
                .into_devices()
                .into_iter()
                .map(|d| {
                    let mut d = d.expect("disk");
                    let mut img = vec![0u8; d.num_blocks() as usize * volmgr::BLOCK_SIZE];
                    d.read(0, &mut img).unwrap();
                    img
                })
                .collect();
            verify(after, &model, &format!("{what}, upgraded again"));
        }
        // Recovery itself crashed at every boundary of its open, every 3rd upgrade point.
        if k % 3 == 0 {
            let crashed: Vec<Vec<u8>> = states
                .iter()
                .map(|st| st.borrow().image_after_crash(|_| true))
                .collect();
            let (open_ops, _) = open_crashing(&crashed, None, &mut rng);
            for j in 0..open_ops {
                let (_, imgs) = open_crashing(&crashed, Some(j), &mut rng);
                verify(
                    imgs,
                    &model,
                    &format!("upgrade crashed at {k}, recovery at {j}"),
                );
            }
        }
    }
    println!(
        "upgrade: {total} write boundaries, {olds} survivors opened as the old pool, {news} as the new"
    );
    assert!(
        olds > 0 && news > 0,
        "both outcomes occur: {olds} old, {news} new"
    );
}

/// Every write boundary of the workload on `base`, with `variants` survivor sets each (all
/// kept, all dropped, then random subsets).
fn crash_at_every_boundary_of(base: &[Vec<u8>], variants: usize) {
    let base = base.to_vec();
    let full = workload(&base, None);
    assert!(
        full.completed,
        "the workload must run to the end without a crash"
    );
    let total = full.clock.borrow().ops;
    assert!(total > 200, "workload too small: {total}");
    let mut points = 0;
    let mut images_checked = 0;
    for k in 0..total {
        let t0 = std::time::Instant::now();
        let run = workload(&base, Some(k));
        WORK.with(|w| *w.borrow_mut() += t0.elapsed());
        assert!(run.clock.borrow().crashed);
        points += 1;
        let mut rng = Rng(k * 7919 + 1);
        let all: Vec<(&str, u64)> = vec![
            ("all kept", 0),
            ("all dropped", 1),
            ("random subset", 2),
            ("random subset", 3),
        ];
        let mut pick = all.clone();
        if variants == 2 {
            pick = vec![all[0], all[2]];
        }
        for (name, v) in pick {
            let images: Vec<Vec<u8>> = run
                .states
                .iter()
                .map(|st| {
                    st.borrow().image_after_crash(|_| match v {
                        0 => true,
                        1 => false,
                        _ => rng.below(2) == 0,
                    })
                })
                .collect();
            let t0 = std::time::Instant::now();
            verify(images, &run.model, &format!("crash point {k} ({name})"));
            VER.with(|w| *w.borrow_mut() += t0.elapsed());
            images_checked += 1;
        }
    }
    println!(
        "time in workload {:?}, in verify {:?}",
        WORK.with(|w| *w.borrow()),
        VER.with(|w| *w.borrow())
    );
    println!(
        "crash consistency: {points} crash points tried out of {total} write boundaries, {images_checked} crashed images verified"
    );
}

#[test]
fn drl_resyncs_only_regions_written_near_the_crash() {
    let d = disks(2, 4096);
    let mut p = create(&d);
    let v = p
        .create_volume("m", 3000, LayoutSpec::Mirror { legs: 2 }, None)
        .unwrap();
    for b in (0..3000).step_by(8) {
        p.write(v, b, &pattern(b)).unwrap();
    }
    p.flush().unwrap();
    let nreg = p.meta().volumes[0].nregions();
    // Crash with two regions written since the last flush: only those are resynchronised.
    p.write(v, 100, &pattern(1)).unwrap();
    p.write(v, 2000, &pattern(2)).unwrap();
    let images: Vec<Vec<u8>> = d.iter().map(|s| s.snapshot()).collect();
    let (mut q, rep) = open_images(images).unwrap();
    assert_eq!(rep.drl_regions_recovered, 2, "of {nreg} regions");
    println!(
        "dirty-region log: {} of {nreg} regions resynchronised after crash",
        rep.drl_regions_recovered
    );
    assert!(q.verify_mirrors().unwrap().is_empty());
    // A clean shutdown leaves nothing to resynchronise.
    drop(q);
    let mut p = reopen(&d);
    p.flush().unwrap();
    let (_, rep) = open_images(d.iter().map(|s| s.snapshot()).collect()).unwrap();
    assert_eq!(rep.drl_regions_recovered, 0);
}

/// Opens `images` on crashable disks, cutting the power at boundary `crash_at` of the open
/// itself (log replay, repairs, commits); returns the boundaries the open used (when it ran
/// to the end) and the surviving images.
fn open_crashing(images: &[Vec<u8>], crash_at: Option<u64>, keep: &mut Rng) -> (u64, Vec<Vec<u8>>) {
    let clock: Clock = Shared::new(CrashClock {
        ops: 0,
        crash_at,
        crashed: false,
    });
    let mut states = Vec::new();
    let devs: Vec<Box<dyn BlockDevice>> = images
        .iter()
        .map(|img| {
            let (d, st) = CrashDisk::new(img.clone(), clock.clone());
            states.push(st);
            Box::new(d) as Box<dyn BlockDevice>
        })
        .collect();
    let _ = Pool::open(devs, volmgr::OpenOptions::default());
    let ops = clock.borrow().ops;
    let imgs = states
        .iter()
        .map(|st| st.borrow().image_after_crash(|_| keep.below(2) == 0))
        .collect();
    (ops, imgs)
}

#[test]
fn crash_during_recovery_is_recovered_again() {
    let base = base_images();
    let total = workload(&base, None).clock.borrow().ops;
    let mut points = 0;
    let mut rng = Rng(77);
    // Every 9th crash point of the workload, then every boundary of the recovery after it.
    for k in (0..total).step_by(9) {
        let run = workload(&base, Some(k));
        let crashed: Vec<Vec<u8>> = run
            .states
            .iter()
            .map(|st| st.borrow().image_after_crash(|_| true))
            .collect();
        let (open_ops, _) = open_crashing(&crashed, None, &mut rng);
        for j in 0..open_ops {
            let (_, imgs) = open_crashing(&crashed, Some(j), &mut rng);
            verify(
                imgs,
                &run.model,
                &format!("crash point {k}, then crash {j} during recovery"),
            );
            points += 1;
        }
    }
    println!("crash during recovery: {points} nested crash points verified");
    assert!(points > 50, "too few nested crash points: {points}");
}

/// A longer soak over other random workloads: `VOLMGR_CRASH_SEEDS=N` runs N more seeds, each
/// crashed at every write boundary with two random survivor sets (2 seeds by default).
#[test]
fn crash_soak_over_more_seeds() {
    let seeds: u64 = std::env::var("VOLMGR_CRASH_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let base = base_images();
    let mut points = 0;
    for seed in 1..=seeds {
        let seed = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let full = workload_seeded(&base, None, seed);
        assert!(
            full.completed,
            "seed {seed}: workload did not complete: {:?}",
            full.error
        );
        let total = full.clock.borrow().ops;
        for k in 0..total {
            let run = workload_seeded(&base, Some(k), seed);
            let mut rng = Rng(k + seed);
            for _ in 0..2 {
                let images = run
                    .states
                    .iter()
                    .map(|st| st.borrow().image_after_crash(|_| rng.below(2) == 0))
                    .collect();
                verify(images, &run.model, &format!("seed {seed} crash point {k}"));
            }
            points += 1;
        }
    }
    println!("crash soak: {seeds} extra seeds, {points} crash points");
}

/// Every soak seed's workload runs to the end when nothing crashes.
#[test]
fn workload_completes_for_every_soak_seed() {
    let base = base_images();
    for seed in 1..=200u64 {
        let seed = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let full = workload_seeded(&base, None, seed);
        assert!(full.completed, "seed {seed}: {:?}", full.error);
    }
}
