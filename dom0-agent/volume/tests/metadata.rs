//! Metadata version 3: commit cost independent of the number of thin mappings (10^3 against
//! 10^7 on sparse files), old-format pools, and the upgrade's refusals.
#![allow(clippy::cast_possible_truncation)] // Test sizes are small.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use volmgr::testdev::Shared;

use common::*;
use volmgr::format::{MD_VERSION, MD_VERSION_INLINE};
use volmgr::pool::{DiskSpec, LayoutSpec, OpenOptions, PoolConfig, SnapshotKind};
use volmgr::testdev::SharedDisk;
use volmgr::{BLOCK_SIZE, BlockDevice, DevError, Pool};

/// Device writes counted.
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
struct Counts {
    writes: u64,
    blocks: u64,
    flushes: u64,
}

/// A sparse image file, counting what is written.
struct SparseFile {
    f: File,
    blocks: u64,
    c: Shared<Counts>,
}

impl BlockDevice for SparseFile {
    fn num_blocks(&self) -> u64 {
        self.blocks
    }
    fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), DevError> {
        self.f
            .read_exact_at(buf, lba * BLOCK_SIZE as u64)
            .map_err(|_| DevError::Io)
    }
    fn write(&mut self, lba: u64, buf: &[u8]) -> Result<(), DevError> {
        let mut c = self.c.borrow_mut();
        c.writes += 1;
        c.blocks += (buf.len() / BLOCK_SIZE) as u64;
        self.f
            .write_all_at(buf, lba * BLOCK_SIZE as u64)
            .map_err(|_| DevError::Io)
    }
    fn flush(&mut self) -> Result<(), DevError> {
        self.c.borrow_mut().flushes += 1;
        Ok(())
    }
}

fn sparse(path: &std::path::Path, blocks: u64) -> (SparseFile, Shared<Counts>) {
    let f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.set_len(blocks * BLOCK_SIZE as u64).unwrap();
    let c = Shared::new(Counts::default());
    (
        SparseFile {
            f,
            blocks,
            c: c.clone(),
        },
        c,
    )
}

/// What one commit after one allocating write costs, averaged and at most, over `rounds`
/// commits at spread-out places of a thin volume with `n` chunks mapped in bulk.
fn commit_cost(n: u64, rounds: u64) -> (Counts, Counts, std::time::Duration) {
    let dir = std::env::temp_dir().join(format!("volmgr-scale-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("d0.img");
    // Chunks of one block: data n + room, metadata volume, areas.
    let chunks = n + 4 * rounds + 64;
    let md = volmgr::pool::md_blocks_for(chunks);
    let blocks = chunks + md + 4096;
    let (dev, counts) = sparse(&path, blocks);
    let t0 = std::time::Instant::now();
    let mut p = Pool::create(
        vec![(
            Box::new(dev) as Box<dyn BlockDevice>,
            DiskSpec::new("d0", "fast"),
        )],
        PoolConfig::new(POOL_ID),
    )
    .unwrap();
    assert_eq!(p.metadata_version(), MD_VERSION);
    p.create_thin_pool("tp", chunks, LayoutSpec::Concat, None, 1)
        .unwrap();
    // Virtual chunks 0, 2, 4, ... so that later writes land between mapped ones.
    let vsize = 2 * n + 2 * rounds + 2;
    let t = p.create_thin("t", "tp", vsize).unwrap();
    let mapped = p
        .bulk_map("t", &mut (0..n).map(|k| (2 * k, k as u32)))
        .unwrap();
    assert_eq!(mapped, n);
    let built = t0.elapsed();
    let mut total = Counts::default();
    let mut max = Counts::default();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for r in 0..rounds {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // An unmapped (odd) virtual chunk somewhere in the mapped range: a new mapping.
        let vc = 2 * (x % n.max(1)) + 1;
        p.write(t, vc, &pattern(r + 1)).unwrap();
        let before = *counts.borrow();
        p.flush().unwrap();
        let after = *counts.borrow();
        let d = Counts {
            writes: after.writes - before.writes,
            blocks: after.blocks - before.blocks,
            flushes: after.flushes - before.flushes,
        };
        total.writes += d.writes;
        total.blocks += d.blocks;
        total.flushes += d.flushes;
        max.writes = max.writes.max(d.writes);
        max.blocks = max.blocks.max(d.blocks);
        max.flushes = max.flushes.max(d.flushes);
        assert_eq!(read_block(&mut p, t, vc), pattern(r + 1));
    }
    let mean = Counts {
        writes: total.writes / rounds,
        blocks: total.blocks / rounds,
        flushes: total.flushes / rounds,
    };
    assert!(p.check().is_empty(), "{:?}", p.check());
    drop(p);
    let _ = std::fs::remove_dir_all(&dir);
    (mean, max, built)
}

/// The proof: a thin pool with 10 million mapped chunks on a sparse file commits a
/// one-chunk change writing no more than twice what the same commit writes with a thousand
/// mappings (bytes and blocks written are deterministic; time is not asserted).
#[test]
fn commit_cost_is_independent_of_the_number_of_mappings() {
    let rounds = 8;
    let (small_mean, small_max, _) = commit_cost(1_000, rounds);
    let t0 = std::time::Instant::now();
    let (big_mean, big_max, built) = commit_cost(10_000_000, rounds);
    println!(
        "commit after one allocating write, mean (max) over {rounds}: 10^3 mappings {} blocks \
         in {} writes ({} blocks), 10^7 mappings {} blocks in {} writes ({} blocks); 10^7 pool \
         built in {built:?}, test part {:?}",
        small_mean.blocks,
        small_mean.writes,
        small_max.blocks,
        big_mean.blocks,
        big_mean.writes,
        big_max.blocks,
        t0.elapsed()
    );
    assert!(
        big_mean.blocks <= 2 * small_mean.blocks,
        "{big_mean:?} vs {small_mean:?}"
    );
    assert!(
        big_max.blocks <= 2 * small_max.blocks,
        "{big_max:?} vs {small_max:?}"
    );
    assert!(
        big_mean.writes <= 2 * small_mean.writes,
        "{big_mean:?} vs {small_mean:?}"
    );
    // And small in absolute terms: a handful of nodes and the two record copies.
    assert!(big_max.blocks <= 16, "{big_max:?}");
}

fn create_v(d: &[SharedDisk], version: u32) -> Pool {
    create_version(d, version)
}

/// An old-format pool with thin volumes, a snapshot and a mirror, and what it holds.
fn old_pool(d: &[SharedDisk]) -> Vec<(String, u64, Vec<u8>)> {
    let mut p = create_v(d, MD_VERSION_INLINE);
    let m = p
        .create_volume("m", 64, LayoutSpec::Mirror { legs: 2 }, None)
        .unwrap();
    p.create_thin_pool("tp", 160, LayoutSpec::Concat, None, 4)
        .unwrap();
    let t = p.create_thin("t", "tp", 128).unwrap();
    let mut want = Vec::new();
    for b in (0..128).step_by(5) {
        p.write(t, b, &pattern(b + 1)).unwrap();
    }
    p.snapshot(
        "t",
        "ts",
        SnapshotKind::SpaceOptimized,
        LayoutSpec::Concat,
        None,
    )
    .unwrap();
    for b in (0..128).step_by(16) {
        p.write(t, b, &pattern(b + 1000)).unwrap();
    }
    for b in 0..64 {
        p.write(m, b, &pattern(b + 5000)).unwrap();
    }
    p.flush().unwrap();
    for name in ["m", "t", "ts"] {
        let id = p.volume_id(name).unwrap();
        for b in 0..p.volume_size(id).unwrap() {
            want.push((name.to_string(), b, read_block(&mut p, id, b)));
        }
    }
    assert_eq!(p.metadata_version(), MD_VERSION_INLINE);
    want
}

fn same_data(p: &mut Pool, want: &[(String, u64, Vec<u8>)], what: &str) {
    for (name, b, data) in want {
        let id = p.volume_id(name).unwrap();
        assert!(
            read_block(p, id, *b) == *data,
            "{what}: volume {name} block {b} differs"
        );
    }
}

#[test]
fn old_format_pools_keep_working_and_upgrade() {
    let d = disks(3, 512);
    let want = old_pool(&d);
    // Reopened, still version 2, read and written as before.
    let mut p = reopen(&d);
    assert_eq!(p.metadata_version(), MD_VERSION_INLINE);
    same_data(&mut p, &want, "old pool reopened");
    let notes = p.upgrade().unwrap();
    assert!(!notes.is_empty());
    assert_eq!(p.metadata_version(), MD_VERSION);
    same_data(&mut p, &want, "after upgrade");
    assert!(p.check().is_empty(), "{:?}", p.check());
    drop(p);
    let mut p = reopen(&d);
    assert_eq!(p.metadata_version(), MD_VERSION);
    same_data(&mut p, &want, "upgraded pool reopened");
    // Version 3 works: writes, snapshots, removal.
    let t = p.volume_id("t").unwrap();
    p.write(t, 3, &pattern(77)).unwrap();
    p.snapshot(
        "t",
        "t2",
        SnapshotKind::SpaceOptimized,
        LayoutSpec::Concat,
        None,
    )
    .unwrap();
    p.remove("ts").unwrap();
    p.flush().unwrap();
    assert!(p.check().is_empty(), "{:?}", p.check());
    assert_eq!(read_block(&mut p, t, 3), pattern(77));
    let t2 = p.volume_id("t2").unwrap();
    assert_eq!(read_block(&mut p, t2, 3), pattern(77));
    // A second upgrade is refused and changes nothing.
    let before: Vec<Vec<u8>> = d.iter().map(SharedDisk::snapshot).collect();
    let e = p.upgrade().unwrap_err();
    assert!(e.to_string().contains("already"), "{e}");
    let after: Vec<Vec<u8>> = d.iter().map(SharedDisk::snapshot).collect();
    assert!(before == after, "a refused upgrade wrote something");
}

#[test]
fn upgrade_without_room_for_the_metadata_volume_changes_nothing() {
    let d = disks(1, 256);
    let mut p = create_v(&d, MD_VERSION_INLINE);
    p.create_thin_pool("tp", 64, LayoutSpec::Concat, None, 4)
        .unwrap();
    let t = p.create_thin("t", "tp", 64).unwrap();
    p.write(t, 1, &pattern(9)).unwrap();
    // Fill the rest of the disk.
    let free: u64 = p.disks().iter().map(|x| x.free_blocks).sum();
    p.create_volume("fill", free, LayoutSpec::Concat, None)
        .unwrap();
    p.flush().unwrap();
    let before: Vec<Vec<u8>> = d.iter().map(SharedDisk::snapshot).collect();
    let e = p.upgrade().unwrap_err();
    assert!(
        e.to_string().contains("metadata volume") && e.to_string().contains("nothing was changed"),
        "{e}"
    );
    assert_eq!(p.metadata_version(), MD_VERSION_INLINE);
    let after: Vec<Vec<u8>> = d.iter().map(SharedDisk::snapshot).collect();
    assert!(before == after, "a refused upgrade wrote something");
    // Still a working old pool.
    p.write(t, 2, &pattern(10)).unwrap();
    p.flush().unwrap();
    drop(p);
    let mut p = Pool::open(devices(&d, None), OpenOptions::default())
        .unwrap()
        .0;
    assert_eq!(read_block(&mut p, t, 1), pattern(9));
    assert_eq!(read_block(&mut p, t, 2), pattern(10));
    assert!(p.check().is_empty());
}
