//! Functional tests: layouts, thin volumes, snapshots, resize, relayout, failures, pools.
#![allow(clippy::cast_possible_truncation)] // Test sizes and tags are small; truncation cannot happen.

mod common;

use common::*;
use volmgr::dev::BLOCK_SIZE;
use volmgr::pool::{LayoutSpec, SnapshotKind};
use volmgr::testdev::{FaultyDisk, SharedDisk};
use volmgr::{BlockDevice, Error, OpenOptions, Pool};

const SPECS: [LayoutSpec; 5] = [
    LayoutSpec::Concat,
    LayoutSpec::Stripe {
        columns: 3,
        unit: 4,
    },
    LayoutSpec::Mirror { legs: 2 },
    LayoutSpec::Mirror { legs: 3 },
    LayoutSpec::StripeMirror {
        columns: 2,
        legs: 2,
        unit: 4,
    },
];

#[test]
fn every_layout_reads_back_across_reopen() {
    for spec in SPECS {
        let d = disks(4, 1024);
        let mut p = create(&d);
        let v = p.create_volume("v", 300, spec, None).unwrap();
        for b in 0..300 {
            p.write(v, b, &pattern(b)).unwrap();
        }
        p.flush().unwrap();
        let mut p = reopen(&d);
        for b in 0..300 {
            assert_eq!(read_block(&mut p, v, b), pattern(b), "{spec} block {b}");
        }
        assert!(p.verify_mirrors().unwrap().is_empty());
        assert!(p.check().is_empty(), "{:?}", p.check());
        let info = &p.list()[0];
        assert_eq!(info.layout, spec.to_string());
    }
}

#[test]
fn mirror_legs_never_share_a_disk() {
    let d = disks(2, 1024);
    let mut p = create(&d);
    let e = p
        .create_volume("m", 100, LayoutSpec::Mirror { legs: 3 }, None)
        .unwrap_err();
    assert!(matches!(e, Error::NoSpace(_)), "{e}");
    let e = p
        .create_volume(
            "s",
            100,
            LayoutSpec::StripeMirror {
                columns: 2,
                legs: 2,
                unit: 4,
            },
            None,
        )
        .unwrap_err();
    assert!(matches!(e, Error::NoSpace(_)), "{e}");
    assert!(p.list().is_empty(), "a refused create changes nothing");
    let e = p
        .create_volume("x", 100, LayoutSpec::Mirror { legs: 4 }, None)
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)));
}

#[test]
fn striping_spreads_over_columns() {
    let d = disks(3, 1024);
    let mut p = create(&d);
    let v = p
        .create_volume(
            "s",
            96,
            LayoutSpec::Stripe {
                columns: 3,
                unit: 4,
            },
            None,
        )
        .unwrap();
    let before: Vec<Vec<u8>> = d.iter().map(SharedDisk::snapshot).collect();
    for b in 0..12 {
        p.write(v, b, &pattern(b)).unwrap();
    }
    let changed: Vec<bool> = d
        .iter()
        .zip(&before)
        .map(|(d, b)| d.snapshot() != *b)
        .collect();
    assert_eq!(changed, vec![true, true, true]);
}

#[test]
fn thin_allocates_on_first_write_and_reads_zeroes() {
    let d = disks(1, 1024);
    let mut p = create(&d);
    p.create_thin_pool("tp", 64, LayoutSpec::Concat, None, 4)
        .unwrap();
    let t = p.create_thin("t", "tp", 10_000).unwrap();
    assert_eq!(read_block(&mut p, t, 9_999), vec![0u8; BLOCK_SIZE]);
    p.write(t, 5001, &pattern(1)).unwrap();
    assert_eq!(read_block(&mut p, t, 5001), pattern(1));
    assert_eq!(read_block(&mut p, t, 5000), vec![0u8; BLOCK_SIZE]);
    let used = p.list().iter().find(|i| i.name == "t").unwrap().used_blocks;
    assert_eq!(used, 4);
    // Fill the pool: 16 chunks of 4 blocks.
    for c in 0..15 {
        p.write(t, c * 4, &pattern(100 + c)).unwrap();
    }
    let e = p.write(t, 4000, &pattern(9)).unwrap_err();
    assert!(matches!(e, Error::ThinPoolFull { .. }), "{e}");
    assert!(e.to_string().contains("thin pool 'tp' is full"));
    // Nothing was corrupted and overwrites of allocated chunks still work.
    p.write(t, 0, &pattern(7)).unwrap();
    p.flush().unwrap();
    let mut p = reopen(&d);
    assert_eq!(read_block(&mut p, t, 0), pattern(7));
    assert_eq!(read_block(&mut p, t, 5001), pattern(1));
    assert_eq!(read_block(&mut p, t, 4000), vec![0u8; BLOCK_SIZE]);
    assert!(p.check().is_empty());
}

#[test]
fn thin_snapshots_are_independent_writable_and_roll_back() {
    let d = disks(2, 2048);
    let mut p = create(&d);
    p.create_thin_pool("tp", 512, LayoutSpec::Mirror { legs: 2 }, None, 4)
        .unwrap();
    let t = p.create_thin("t", "tp", 256).unwrap();
    for b in 0..64 {
        p.write(t, b, &pattern(b)).unwrap();
    }
    let s1 = p
        .snapshot(
            "t",
            "s1",
            SnapshotKind::SpaceOptimized,
            LayoutSpec::Concat,
            None,
        )
        .unwrap();
    for b in 0..32 {
        p.write(t, b, &pattern(1000 + b)).unwrap();
    }
    let s2 = p
        .snapshot(
            "t",
            "s2",
            SnapshotKind::SpaceOptimized,
            LayoutSpec::Concat,
            None,
        )
        .unwrap();
    p.write(s1, 63, &pattern(5555)).unwrap();
    p.write(t, 40, &pattern(4040)).unwrap();
    for b in 0..64 {
        let s1_expect = if b == 63 { pattern(5555) } else { pattern(b) };
        assert_eq!(read_block(&mut p, s1, b), s1_expect, "s1 block {b}");
        let s2_expect = if b < 32 {
            pattern(1000 + b)
        } else {
            pattern(b)
        };
        assert_eq!(read_block(&mut p, s2, b), s2_expect, "s2 block {b}");
    }
    p.rollback("t", "s1", |_, _| {}).unwrap();
    for b in 0..64 {
        let e = if b == 63 { pattern(5555) } else { pattern(b) };
        assert_eq!(read_block(&mut p, t, b), e);
    }
    p.remove("s1").unwrap();
    p.remove("s2").unwrap();
    assert!(p.check().is_empty(), "{:?}", p.check());
    let mut p = reopen(&d);
    assert_eq!(read_block(&mut p, t, 63), pattern(5555));
    assert!(p.verify_mirrors().unwrap().is_empty());
}

#[test]
fn full_snapshot_fills_in_background_and_freezes_point_in_time() {
    let d = disks(2, 2048);
    let mut p = create(&d);
    let v = p.create_volume("v", 200, LayoutSpec::Concat, None).unwrap();
    for b in 0..200 {
        p.write(v, b, &pattern(b)).unwrap();
    }
    let s = p
        .snapshot(
            "v",
            "snap",
            SnapshotKind::Full,
            LayoutSpec::Concat,
            Some("slow"),
        )
        .unwrap();
    // Origin writes before the fill has copied anything: snapshot keeps the old data.
    p.write(v, 150, &pattern(9150)).unwrap();
    assert_eq!(read_block(&mut p, s, 150), pattern(150));
    assert!(
        p.list()
            .iter()
            .any(|i| i.name == "snap" && i.state.contains("filling"))
    );
    p.write(s, 10, &pattern(7010)).unwrap();
    assert!(p.fill_step(2).unwrap() > 0);
    drop(p);
    let mut p = reopen(&d);
    while p.fill_step(4).unwrap() > 0 {}
    p.write(v, 0, &pattern(9000)).unwrap();
    for b in 0..200 {
        let e = if b == 10 { pattern(7010) } else { pattern(b) };
        assert_eq!(read_block(&mut p, s, b), e, "block {b}");
    }
    p.rollback("v", "snap", |_, _| {}).unwrap();
    assert_eq!(read_block(&mut p, v, 150), pattern(150));
    assert_eq!(read_block(&mut p, v, 10), pattern(7010));
}

#[test]
fn grow_and_shrink_keep_data() {
    for spec in SPECS {
        let d = disks(4, 2048);
        let mut p = create(&d);
        let v = p.create_volume("v", 100, spec, None).unwrap();
        for b in 0..100 {
            p.write(v, b, &pattern(b)).unwrap();
        }
        p.resize("v", 700).unwrap();
        for b in 100..700 {
            p.write(v, b, &pattern(b)).unwrap();
        }
        p.flush().unwrap();
        let mut p = reopen(&d);
        for b in 0..700 {
            assert_eq!(read_block(&mut p, v, b), pattern(b), "{spec} block {b}");
        }
        // Grown mirror space is copied from the first leg before the mirror is whole again.
        while p.resync_step(64).unwrap() > 0 {}
        assert!(p.verify_mirrors().unwrap().is_empty());
        p.resize("v", 50).unwrap();
        assert_eq!(p.volume_size(v).unwrap(), 50);
        for b in 0..50 {
            assert_eq!(read_block(&mut p, v, b), pattern(b));
        }
        assert!(p.check().is_empty(), "{:?}", p.check());
        assert!(matches!(
            p.read(v, 50, &mut [0u8; BLOCK_SIZE]),
            Err(Error::OutOfRange(_))
        ));
    }
}

#[test]
fn relayout_while_writing_and_tier_move() {
    let d = disks(4, 4096);
    let mut p = create(&d);
    let v = p.create_volume("v", 400, LayoutSpec::Concat, None).unwrap();
    for b in 0..400 {
        p.write(v, b, &pattern(b)).unwrap();
    }
    p.start_relayout(
        "v",
        LayoutSpec::Stripe {
            columns: 2,
            unit: 8,
        },
        None,
    )
    .unwrap();
    let mut round = 0;
    while p.relayout_step(37).unwrap() > 0 {
        round += 1;
        // Writes during relayout land below and above the checkpoint.
        p.write(v, (round * 53) % 400, &pattern(10_000 + round))
            .unwrap();
        p.write(v, 399 - (round * 7) % 400, &pattern(20_000 + round))
            .unwrap();
    }
    let mut expect: Vec<Vec<u8>> = (0..400).map(pattern).collect();
    for r in 1..=round {
        expect[((r * 53) % 400) as usize] = pattern(10_000 + r);
        expect[(399 - (r * 7) % 400) as usize] = pattern(20_000 + r);
    }
    for b in 0..400 {
        assert_eq!(read_block(&mut p, v, b), expect[b as usize]);
    }
    assert_eq!(p.list()[0].layout, "stripe 2x32K");
    // Stripe count change, then add and remove a mirror leg, then a tier move.
    p.start_relayout(
        "v",
        LayoutSpec::Stripe {
            columns: 3,
            unit: 8,
        },
        None,
    )
    .unwrap();
    while p.relayout_step(100).unwrap() > 0 {}
    p.start_relayout("v", LayoutSpec::Concat, None).unwrap();
    while p.relayout_step(100).unwrap() > 0 {}
    p.add_mirror_leg("v").unwrap();
    assert!(p.stale_regions() > 0);
    while p.resync_step(3).unwrap() > 0 {}
    assert!(p.verify_mirrors().unwrap().is_empty());
    p.remove_mirror_leg("v", 0).unwrap();
    p.start_relayout("v", LayoutSpec::Concat, Some("slow"))
        .unwrap();
    while p.relayout_step(100).unwrap() > 0 {}
    let slow: Vec<u32> = vec![1, 3];
    let seg_disks: Vec<u32> = match &p.meta().volumes[0].kind {
        volmgr::format::VolKind::Thick { layout, .. } => {
            layout.segments().map(|s| s.disk).collect()
        }
        _ => unreachable!(),
    };
    assert!(seg_disks.iter().all(|d| slow.contains(d)), "{seg_disks:?}");
    for b in 0..400 {
        assert_eq!(read_block(&mut p, v, b), expect[b as usize]);
    }
    assert!(p.check().is_empty());
}

fn faulty_pool(
    n: usize,
    blocks: u64,
) -> (Vec<SharedDisk>, Vec<volmgr::testdev::FaultHandle>, Pool) {
    let d = disks(n, blocks);
    let mut handles = Vec::new();
    let devs = d
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let (f, h) = FaultyDisk::new(Box::new(s.clone()));
            handles.push(h);
            (
                Box::new(f) as Box<dyn BlockDevice>,
                volmgr::pool::DiskSpec::new(&format!("d{i}"), "t"),
            )
        })
        .collect();
    let p = Pool::create(devs, volmgr::PoolConfig::small(POOL_ID)).unwrap();
    (d, handles, p)
}

#[test]
fn failing_leg_is_detached_and_volume_keeps_serving() {
    let (d, h, mut p) = faulty_pool(2, 1024);
    let v = p
        .create_volume("m", 200, LayoutSpec::Mirror { legs: 2 }, None)
        .unwrap();
    for b in 0..200 {
        p.write(v, b, &pattern(b)).unwrap();
    }
    p.flush().unwrap();
    // Disk 1 starts failing writes: leg detached, writes keep working.
    h[1].borrow_mut().fail_all_writes = true;
    for b in 0..20 {
        p.write(v, b, &pattern(500 + b)).unwrap();
    }
    assert!(
        p.list()[0].state.contains("degraded"),
        "{}",
        p.list()[0].state
    );
    // Bad sectors on disk 0 reads now cannot be served by the detached leg: error, no panic.
    p.flush().unwrap();
    for b in 0..20 {
        assert_eq!(read_block(&mut p, v, b), pattern(500 + b));
    }
    drop(p);
    // The disk comes back healthy: only changed regions are resynchronised.
    let mut p = reopen(&d);
    let stale = p.stale_regions();
    let total = p.meta().volumes[0].nregions();
    assert!(stale > 0 && stale < total, "stale {stale} of {total}");
    while p.resync_step(1).unwrap() > 0 {}
    assert!(p.verify_mirrors().unwrap().is_empty());
}

#[test]
fn read_errors_are_served_from_the_other_leg() {
    let (_d, h, mut p) = faulty_pool(2, 1024);
    let v = p
        .create_volume("m", 100, LayoutSpec::Mirror { legs: 2 }, None)
        .unwrap();
    for b in 0..100 {
        p.write(v, b, &pattern(b)).unwrap();
    }
    p.flush().unwrap();
    for blk in 0..1024 {
        h[0].borrow_mut().bad_read_blocks.insert(blk);
    }
    for b in 0..100 {
        assert_eq!(read_block(&mut p, v, b), pattern(b));
    }
    assert!(p.events.iter().any(|e| e.contains("detached")));
}

#[test]
fn vanished_disk_then_return_resyncs_only_changes() {
    let (d, h, mut p) = faulty_pool(3, 2048);
    let v = p
        .create_volume("m", 1000, LayoutSpec::Mirror { legs: 2 }, None)
        .unwrap();
    for b in 0..1000 {
        p.write(v, b, &pattern(b)).unwrap();
    }
    p.flush().unwrap();
    let lost = match &p.meta().volumes[0].kind {
        volmgr::format::VolKind::Thick { layout, .. } => {
            layout.legs[1].columns[0].segs[0].disk as usize
        }
        _ => unreachable!(),
    };
    h[lost].borrow_mut().gone = true;
    for b in 0..20 {
        p.write(v, b, &pattern(2000 + b)).unwrap();
    }
    p.flush().unwrap();
    drop(p);
    // Reopen without the lost disk: still serves.
    let present: Vec<SharedDisk> = d
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != lost)
        .map(|(_, s)| s.clone())
        .collect();
    let devs = present
        .iter()
        .map(|s| Box::new(s.clone()) as Box<dyn BlockDevice>)
        .collect();
    let (mut p, _) = Pool::open(devs, OpenOptions::default()).unwrap();
    assert!(
        p.list()[0].state.contains("degraded"),
        "{}",
        p.list()[0].state
    );
    assert!(p.disks()[lost].state.contains("missing"));
    p.write(v, 900, &pattern(3900)).unwrap();
    p.flush().unwrap();
    drop(p);
    let (mut p, rep) = common::open_images(d.iter().map(SharedDisk::snapshot).collect()).unwrap();
    assert!(
        rep.notes.iter().any(|n| n.contains("returned")),
        "{:?}",
        rep.notes
    );
    let stale = p.stale_regions();
    let total = p.meta().volumes[0].nregions();
    assert!(
        (2..=4).contains(&stale),
        "only changed regions: {stale} of {total}"
    );
    while p.resync_step(8).unwrap() > 0 {}
    assert!(p.verify_mirrors().unwrap().is_empty());
    assert_eq!(read_block(&mut p, v, 900), pattern(3900));
    assert_eq!(read_block(&mut p, v, 5), pattern(2005));
}

#[test]
fn split_brain_is_refused() {
    let d = disks(2, 1024);
    let mut p = create(&d);
    p.create_volume("m", 100, LayoutSpec::Mirror { legs: 2 }, None)
        .unwrap();
    drop(p);
    let a = d[0].snapshot();
    let b = d[1].snapshot();
    // Each half opened alone and changed.
    let (mut pa, _) = common::open_images(vec![a.clone()]).unwrap();
    pa.create_volume("only-a", 10, LayoutSpec::Concat, None)
        .unwrap();
    let (mut pb, _) = common::open_images(vec![b.clone()]).unwrap();
    pb.create_volume("only-b", 10, LayoutSpec::Concat, None)
        .unwrap();
    let ia = pa.into_devices().into_iter().flatten().next().unwrap();
    let ib = pb.into_devices().into_iter().flatten().next().unwrap();
    let e = Pool::open(vec![ia, ib], OpenOptions::default())
        .err()
        .expect("split brain refused");
    assert!(matches!(e, Error::SplitBrain(_)), "{e}");
    assert!(e.to_string().contains("two halves"), "{e}");
}

#[test]
fn stale_disk_copy_is_detected_and_repaired() {
    let d = disks(2, 1024);
    let mut p = create(&d);
    p.create_volume("a", 10, LayoutSpec::Concat, None).unwrap();
    drop(p);
    let old1 = d[1].snapshot();
    let mut p = reopen(&d);
    p.create_volume("b", 10, LayoutSpec::Concat, Some("fast"))
        .unwrap();
    drop(p);
    // Disk 1 comes back with old metadata (like a restored image); it was never declared
    // missing, so its metadata is simply rewritten.
    let (p, rep) = common::open_images(vec![d[0].snapshot(), old1]).unwrap();
    assert!(
        rep.notes.iter().any(|n| n.contains("stale metadata")),
        "{:?}",
        rep.notes
    );
    assert_eq!(p.list().len(), 2);
}

#[test]
fn corrupt_metadata_copy_falls_back_and_garbage_is_rejected() {
    let d = disks(1, 1024);
    let mut p = create(&d);
    p.create_volume("a", 10, LayoutSpec::Concat, None).unwrap();
    drop(p);
    let mut img = d[0].snapshot();
    // Corrupt slot A's payload: slot B still holds the same sequence.
    img[2 * BLOCK_SIZE + 100] ^= 0xff;
    let (p, _) = common::open_images(vec![img.clone()]).unwrap();
    assert_eq!(p.list().len(), 1);
    // Both slots gone: a clear error, no panic.
    let slot = 16 * BLOCK_SIZE;
    img[2 * BLOCK_SIZE + slot + 100] ^= 0xff;
    let e = common::open_images(vec![img]).err().unwrap();
    assert_eq!(e, Error::NoValidMetadata);
    let e = common::open_images(vec![vec![0u8; 64 * BLOCK_SIZE]])
        .err()
        .unwrap();
    assert_eq!(e, Error::NotAPoolDisk("device #0".into()));
}

#[test]
fn multipath_disks_are_grouped_and_survive_path_loss() {
    let d = disks(2, 1024);
    let mut p = create(&d);
    let v = p
        .create_volume("m", 64, LayoutSpec::Mirror { legs: 2 }, None)
        .unwrap();
    drop(p);
    let mut handles = Vec::new();
    let mut devs: Vec<Box<dyn BlockDevice>> = Vec::new();
    for s in &d {
        for _ in 0..2 {
            let (f, h) = FaultyDisk::new(Box::new(s.clone()));
            handles.push(h);
            devs.push(Box::new(f));
        }
    }
    let (mut p, rep) = Pool::open(devs, OpenOptions::default()).unwrap();
    assert!(
        rep.notes.iter().filter(|n| n.contains("2 paths")).count() == 2,
        "{:?}",
        rep.notes
    );
    handles[0].borrow_mut().gone = true;
    handles[3].borrow_mut().gone = true;
    for b in 0..64 {
        p.write(v, b, &pattern(b)).unwrap();
    }
    p.flush().unwrap();
    for b in 0..64 {
        assert_eq!(read_block(&mut p, v, b), pattern(b));
    }
    assert!(
        !p.list()[0].state.contains("degraded"),
        "path loss is not a disk loss"
    );
}

#[test]
fn split_leg_for_backup_and_reattach_copies_only_changes() {
    let d = disks(2, 4096);
    let mut p = create(&d);
    let v = p
        .create_volume("m", 2000, LayoutSpec::Mirror { legs: 2 }, None)
        .unwrap();
    for b in 0..2000 {
        p.write(v, b, &pattern(b)).unwrap();
    }
    let s = p.split_leg("m", 1, "backup").unwrap();
    assert_eq!(read_block(&mut p, s, 1234), pattern(1234));
    p.write(v, 5, &pattern(5005)).unwrap();
    p.write(s, 1500, &pattern(6500)).unwrap();
    p.flush().unwrap();
    let mut p = reopen(&d);
    p.reattach("m", "backup").unwrap();
    assert_eq!(p.stale_regions(), 2);
    while p.resync_step(1).unwrap() > 0 {}
    assert!(p.verify_mirrors().unwrap().is_empty());
    assert_eq!(read_block(&mut p, v, 5), pattern(5005));
    assert_eq!(read_block(&mut p, v, 1500), pattern(1500));
}

#[test]
fn bad_arguments_change_nothing() {
    let d = disks(2, 1024);
    let mut p = create(&d);
    p.create_volume("a", 10, LayoutSpec::Concat, None).unwrap();
    let before = p.meta().clone();
    assert!(matches!(
        p.create_volume("a", 10, LayoutSpec::Concat, None),
        Err(Error::VolumeExists(_))
    ));
    assert!(matches!(
        p.create_volume("bad name", 10, LayoutSpec::Concat, None),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        p.create_volume("z", 0, LayoutSpec::Concat, None),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        p.create_volume("z", 1 << 40, LayoutSpec::Concat, None),
        Err(Error::NoSpace(_))
    ));
    assert!(matches!(p.resize("nope", 5), Err(Error::NoSuchVolume(_))));
    assert!(matches!(
        p.create_volume(
            "z",
            10,
            LayoutSpec::Stripe {
                columns: 1,
                unit: 4
            },
            None
        ),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        p.create_volume("z", 10, LayoutSpec::Concat, Some("gold")),
        Err(Error::NoSpace(_))
    ));
    assert!(matches!(
        p.snapshot(
            "a",
            "s",
            SnapshotKind::SpaceOptimized,
            LayoutSpec::Concat,
            None
        ),
        Err(Error::InvalidArgument(_))
    ));
    assert_eq!(p.meta(), &before);
}

#[test]
fn single_copy_volume_is_readable_again_when_its_disk_returns() {
    let (d, h, mut p) = faulty_pool(2, 1024);
    let v = p.create_volume("c", 100, LayoutSpec::Concat, None).unwrap();
    for b in 0..100 {
        p.write(v, b, &pattern(b)).unwrap();
    }
    p.flush().unwrap();
    let disk = match &p.meta().volumes[0].kind {
        volmgr::format::VolKind::Thick { layout, .. } => {
            layout.legs[0].columns[0].segs[0].disk as usize
        }
        _ => unreachable!(),
    };
    h[disk].borrow_mut().gone = true;
    assert!(
        p.write(v, 0, &pattern(999)).is_err(),
        "no copy left: the write fails"
    );
    assert!(p.read(v, 0, &mut vec![0u8; BLOCK_SIZE]).is_err());
    drop(p);
    let (mut p, rep) = common::open_images(d.iter().map(SharedDisk::snapshot).collect()).unwrap();
    assert!(
        rep.notes.iter().any(|n| n.contains("no in-sync copy")),
        "{:?}",
        rep.notes
    );
    for b in 1..100 {
        assert_eq!(read_block(&mut p, v, b), pattern(b));
    }
}

#[test]
fn disk_restored_from_an_old_image_is_resynchronised_not_trusted() {
    let d = disks(2, 2048);
    let mut p = create(&d);
    let v = p
        .create_volume("m", 300, LayoutSpec::Mirror { legs: 2 }, None)
        .unwrap();
    for b in 0..300 {
        p.write(v, b, &pattern(b)).unwrap();
    }
    p.flush().unwrap();
    drop(p);
    let old1 = d[1].snapshot();
    let mut p = reopen(&d);
    for b in 0..300 {
        p.write(v, b, &pattern(1000 + b)).unwrap();
    }
    p.create_volume("x", 10, LayoutSpec::Concat, None).unwrap();
    p.flush().unwrap();
    drop(p);
    // Disk 1 comes back as its old image: old data, old metadata.
    let (mut p, rep) = common::open_images(vec![d[0].snapshot(), old1]).unwrap();
    assert!(
        rep.notes.iter().any(|n| n.contains("old image")),
        "{:?}",
        rep.notes
    );
    for b in 0..300 {
        assert_eq!(
            read_block(&mut p, v, b),
            pattern(1000 + b),
            "stale leg must not serve block {b}"
        );
    }
    while p.resync_step(16).unwrap() > 0 {}
    assert!(p.verify_mirrors().unwrap().is_empty());
}

#[test]
fn space_optimized_snapshots_of_a_thick_volume_copy_on_write() {
    let d = disks(2, 4096);
    let mut p = create(&d);
    let v = p
        .create_volume("v", 256, LayoutSpec::Mirror { legs: 2 }, None)
        .unwrap();
    p.create_thin_pool("cache", 64, LayoutSpec::Concat, None, 4)
        .unwrap();
    for b in 0..256 {
        p.write(v, b, &pattern(b)).unwrap();
    }
    let e = p
        .snapshot(
            "v",
            "x",
            SnapshotKind::SpaceOptimized,
            LayoutSpec::Concat,
            None,
        )
        .unwrap_err();
    assert!(e.to_string().contains("thin pool"), "{e}");
    let s1 = p.snapshot_in_pool("v", "s1", "cache").unwrap();
    let s2 = p.snapshot_in_pool("v", "s2", "cache").unwrap();
    let used = |p: &Pool| {
        p.list()
            .iter()
            .find(|i| i.name == "cache")
            .unwrap()
            .used_blocks
    };
    assert_eq!(used(&p), 0, "nothing copied before the first write");
    // Origin writes copy the old chunk once, shared by both snapshots.
    p.write(v, 10, &pattern(5010)).unwrap();
    p.write(v, 11, &pattern(5011)).unwrap();
    assert_eq!(used(&p), 4);
    // A snapshot write redirects its own copy.
    p.write(s2, 100, &pattern(7100)).unwrap();
    p.flush().unwrap();
    let mut p = reopen(&d);
    for b in 0..256 {
        let vo = match b {
            10 => pattern(5010),
            11 => pattern(5011),
            _ => pattern(b),
        };
        assert_eq!(read_block(&mut p, v, b), vo, "origin {b}");
        assert_eq!(read_block(&mut p, s1, b), pattern(b), "s1 {b}");
        let s2e = if b == 100 { pattern(7100) } else { pattern(b) };
        assert_eq!(read_block(&mut p, s2, b), s2e, "s2 {b}");
    }
    assert!(
        p.list()
            .iter()
            .any(|i| i.layout.contains("thin snapshot of v"))
    );
    assert!(matches!(p.remove("v"), Err(Error::Busy(_))));
    assert!(matches!(p.resize("v", 100), Err(Error::Busy(_))));
    // The cache fills up: the origin write is refused, nothing changes.
    let e = loop {
        let b = 20 + 4 * (used(&p) / 4);
        if b >= 256 {
            panic!("cache never filled");
        }
        if let Err(e) = p.write(v, b, &pattern(9000 + b)) {
            break (e, b);
        }
    };
    assert!(matches!(e.0, Error::ThinPoolFull { .. }), "{}", e.0);
    assert_eq!(
        read_block(&mut p, v, e.1),
        pattern(e.1),
        "refused write changed nothing"
    );
    assert_eq!(read_block(&mut p, s1, e.1), pattern(e.1));
    // Roll the origin back to s1.
    p.rollback("v", "s1", |_, _| {})
        .unwrap_or_else(|e| panic!("{e}"));
    for b in 0..256 {
        assert_eq!(read_block(&mut p, v, b), pattern(b));
    }
    assert!(p.check().is_empty(), "{:?}", p.check());
    assert!(p.verify_mirrors().unwrap().is_empty());
}

#[test]
fn thin_pool_moves_between_tiers_online() {
    let d = disks(4, 2048);
    let mut p = create(&d);
    p.create_thin_pool("tp", 512, LayoutSpec::Concat, Some("fast"), 4)
        .unwrap();
    let t = p.create_thin("t", "tp", 512).unwrap();
    for b in (0..200).step_by(3) {
        p.write(t, b, &pattern(b)).unwrap();
    }
    let s = p
        .snapshot(
            "t",
            "snap",
            SnapshotKind::SpaceOptimized,
            LayoutSpec::Concat,
            None,
        )
        .unwrap();
    p.start_relayout("tp", LayoutSpec::Mirror { legs: 2 }, Some("slow"))
        .unwrap();
    let mut i = 0;
    while p.relayout_step(40).unwrap() > 0 {
        i += 1;
        p.write(t, i, &pattern(10_000 + i)).unwrap();
    }
    let data_disks: Vec<u32> = p
        .meta()
        .volumes
        .iter()
        .filter(|v| v.internal)
        .flat_map(|v| match &v.kind {
            volmgr::format::VolKind::Thick { layout, .. } => {
                layout.segments().map(|s| s.disk).collect::<Vec<_>>()
            }
            _ => Vec::new(),
        })
        .collect();
    assert!(
        data_disks.iter().all(|d| d % 2 == 1),
        "all on slow disks: {data_disks:?}"
    );
    assert_eq!(
        p.list()
            .iter()
            .find(|v| v.name == "tp")
            .unwrap()
            .tier
            .as_deref(),
        Some("slow")
    );
    for b in 0..512u64 {
        let orig = if b % 3 == 0 && b < 200 {
            pattern(b)
        } else {
            vec![0u8; BLOCK_SIZE]
        };
        assert_eq!(read_block(&mut p, s, b), orig, "snapshot block {b}");
        let cur = if b >= 1 && b <= i {
            pattern(10_000 + b)
        } else {
            orig.clone()
        };
        assert_eq!(read_block(&mut p, t, b), cur, "volume block {b}");
    }
    assert!(p.verify_mirrors().unwrap().is_empty());
}

#[test]
fn damaged_metadata_never_panics() {
    // Flip bytes all over a real metadata record and re-frame it with valid checksums, so the
    // damage reaches the decoder and the validator; every outcome must be an error or a pool.
    let d = disks(2, 1024);
    let mut p = create(&d);
    p.create_volume("m", 64, LayoutSpec::Mirror { legs: 2 }, None)
        .unwrap();
    p.create_thin_pool("tp", 64, LayoutSpec::Concat, None, 4)
        .unwrap();
    let t = p.create_thin("t", "tp", 128).unwrap();
    p.write(t, 5, &pattern(5)).unwrap();
    p.snapshot(
        "t",
        "ts",
        SnapshotKind::SpaceOptimized,
        LayoutSpec::Concat,
        None,
    )
    .unwrap();
    let payload = p.meta().encode();
    drop(p);
    let mut rng = Rng(0xdead_beef);
    let mut opened = 0;
    for round in 0..300 {
        let mut bad = payload.clone();
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(bad.len() as u64) as usize;
            bad[i] ^= 1 << rng.below(8);
        }
        if round % 7 == 0 {
            bad.truncate(rng.below(bad.len() as u64) as usize);
        }
        let _ = volmgr::format::PoolMeta::decode(&bad).map(|m| volmgr::pool::validate_meta(&m));
        // The record's sequence must match the payload's for the copy to be considered.
        let seq = bad
            .get(16..24)
            .map_or(round, |b| u64::from_le_bytes(b.try_into().unwrap()));
        let rec = volmgr::format::encode_record(volmgr::format::MD_MAGIC, POOL_ID, seq, &bad);
        let mut imgs: Vec<Vec<u8>> = d.iter().map(SharedDisk::snapshot).collect();
        for img in &mut imgs {
            for slot in 0..2 {
                let off = (2 + slot * 16) * BLOCK_SIZE;
                img[off..off + rec.len()].copy_from_slice(&rec);
            }
        }
        if let Ok((mut q, _)) = common::open_images(imgs) {
            opened += 1;
            for v in q.list() {
                let mut buf = vec![0u8; BLOCK_SIZE];
                let _ = q.read(v.id, 0, &mut buf);
            }
        }
    }
    println!("damaged metadata: {opened} of 300 damaged records still described a valid pool");
}

#[test]
fn resync_with_a_failing_source_reports_and_keeps_the_pool_consistent() {
    let (d, h, mut p) = faulty_pool(3, 2048);
    let v = p
        .create_volume("m", 300, LayoutSpec::Mirror { legs: 2 }, None)
        .unwrap();
    for b in 0..300 {
        p.write(v, b, &pattern(b)).unwrap();
    }
    p.add_mirror_leg("m").unwrap();
    // The only in-sync legs' disks start failing reads during the copy.
    let src: Vec<usize> = match &p.meta().volumes[0].kind {
        volmgr::format::VolKind::Thick { layout, .. } => layout.legs[..2]
            .iter()
            .map(|g| g.columns[0].segs[0].disk as usize)
            .collect(),
        _ => unreachable!(),
    };
    for s in &src {
        for blk in 0..2048 {
            h[*s].borrow_mut().bad_read_blocks.insert(blk);
        }
    }
    let e = p.resync_step(4).unwrap_err();
    assert!(matches!(e, Error::Device { .. } | Error::NoCopy(..)), "{e}");
    drop(p);
    // Healthy again: the pool opens, the new leg is still stale, resync finishes.
    for s in &src {
        h[*s].borrow_mut().bad_read_blocks.clear();
    }
    let (mut p, _) = common::open_images(d.iter().map(SharedDisk::snapshot).collect()).unwrap();
    assert!(p.check().is_empty(), "{:?}", p.check());
    while p.resync_step(8).unwrap() > 0 {}
    assert!(p.verify_mirrors().unwrap().is_empty());
    for b in 0..300 {
        assert_eq!(read_block(&mut p, v, b), pattern(b));
    }
}

#[test]
fn empty_requests_and_background_work() {
    let d = disks(3, 2048);
    let mut p = create(&d);
    let v = p
        .create_volume("m", 200, LayoutSpec::Mirror { legs: 2 }, None)
        .unwrap();
    p.write(v, 0, &[]).unwrap();
    p.read(v, 200, &mut []).unwrap();
    assert!(matches!(p.write(v, 201, &[]), Err(Error::OutOfRange(_))));
    assert!(matches!(p.write(v, 0, &[0u8; 100]), Err(Error::Misaligned)));
    for b in 0..200 {
        p.write(v, b, &pattern(b)).unwrap();
    }
    p.add_mirror_leg("m").unwrap();
    p.snapshot("m", "full", SnapshotKind::Full, LayoutSpec::Concat, None)
        .unwrap();
    p.start_relayout("m", LayoutSpec::Mirror { legs: 3 }, None)
        .unwrap();
    let mut rounds = 0;
    while p.background_step(2).unwrap() {
        rounds += 1;
        assert!(rounds < 1000);
    }
    assert_eq!(p.stale_regions(), 0);
    assert!(p.list().iter().all(|i| i.state == "ok"), "{:?}", p.list());
    for b in 0..200 {
        assert_eq!(read_block(&mut p, v, b), pattern(b));
    }
    let s = p.volume_id("full").unwrap();
    assert_eq!(read_block(&mut p, s, 199), pattern(199));
}

#[test]
fn discard_and_write_zeroes_release_thin_chunks_without_touching_snapshots() {
    let d = disks(1, 2048);
    let mut p = create(&d);
    p.create_thin_pool("tp", 256, LayoutSpec::Concat, None, 4)
        .unwrap();
    let t = p.create_thin("t", "tp", 256).unwrap();
    for b in 0..64 {
        p.write(t, b, &pattern(b)).unwrap();
    }
    let used = |p: &Pool| {
        p.list()
            .iter()
            .find(|i| i.name == "tp")
            .unwrap()
            .used_blocks
    };
    assert_eq!(used(&p), 64);
    let s = p
        .snapshot(
            "t",
            "s",
            SnapshotKind::SpaceOptimized,
            LayoutSpec::Concat,
            None,
        )
        .unwrap();
    // Zero blocks 2..=29 (bytes): chunks 1..=6 are released, the edges written with zeroes.
    let bs = BLOCK_SIZE as u64;
    p.write_zeroes(t, 2 * bs, 28 * bs).unwrap();
    // Discard of a partial chunk releases nothing.
    assert_eq!(p.discard(t, 40 * bs + 7, 3 * bs).unwrap(), 0);
    assert_eq!(p.discard(t, 48 * bs, 8 * bs).unwrap(), 2);
    p.flush().unwrap();
    let mut p = reopen(&d);
    for b in 0..64 {
        let e = if (2..30).contains(&b) || (48..56).contains(&b) {
            vec![0u8; BLOCK_SIZE]
        } else {
            pattern(b)
        };
        assert_eq!(read_block(&mut p, t, b), e, "t block {b}");
        assert_eq!(read_block(&mut p, s, b), pattern(b), "snapshot block {b}");
    }
    p.remove("s").unwrap();
    // t keeps chunks 0 and 7 (rewritten edges), 8..=11 and 14..=15: 8 chunks of 4 blocks.
    assert_eq!(used(&p), 8 * 4);
    assert!(p.check().is_empty());
}

#[test]
fn path_priorities_steer_io_to_the_preferred_path() {
    let d = disks(1, 1024);
    let mut p = create(&d);
    let v = p.create_volume("v", 64, LayoutSpec::Concat, None).unwrap();
    drop(p);
    let (slow, hs) = FaultyDisk::new(Box::new(d[0].clone()));
    let (fast, hf) = FaultyDisk::new(Box::new(d[0].clone()));
    let opts = OpenOptions {
        path_policy: volmgr::multipath::PathPolicy::Priority,
        read_only: false,
        ..OpenOptions::default()
    };
    let (mut p, _) =
        Pool::open_paths(vec![(Box::new(slow), 1), (Box::new(fast), 9)], opts).unwrap();
    let before = hs.borrow().requests;
    for b in 0..64 {
        p.write(v, b, &pattern(b)).unwrap();
    }
    assert_eq!(
        hs.borrow().requests,
        before,
        "the low-priority path is not used"
    );
    // The preferred path fails: I/O moves to the other one.
    hf.borrow_mut().gone = true;
    for b in 0..64 {
        assert_eq!(read_block(&mut p, v, b), pattern(b));
    }
    assert!(hs.borrow().requests > before);
}
