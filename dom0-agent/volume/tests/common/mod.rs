//! Helpers shared by the integration tests.
#![allow(dead_code)]

use volmgr::dev::BLOCK_SIZE;
use volmgr::pool::{DiskSpec, OpenOptions, Pool, PoolConfig};
use volmgr::testdev::{QueuedDisk, Sched, SharedDisk};
use volmgr::{BlockDevice, MemDisk};

pub const POOL_ID: u128 = 0x5eed_0000_0000_0000_0000_0000_0000_0001;

/// `n` shared in-memory disks of `blocks` blocks, tiers "fast" for even and "slow" for odd.
pub fn disks(n: usize, blocks: u64) -> Vec<SharedDisk> {
    (0..n).map(|_| SharedDisk::new(blocks)).collect()
}

pub fn create(disks: &[SharedDisk]) -> Pool {
    create_on(disks, None)
}

pub fn reopen(disks: &[SharedDisk]) -> Pool {
    reopen_on(disks, None)
}

/// The shared disks as devices; with a scheduler, each behind a [`QueuedDisk`].
pub fn devices(disks: &[SharedDisk], sched: Option<&Sched>) -> Vec<Box<dyn BlockDevice>> {
    disks
        .iter()
        .map(|d| match sched {
            Some(s) => {
                Box::new(QueuedDisk::new(Box::new(d.clone()), s.clone())) as Box<dyn BlockDevice>
            }
            None => Box::new(d.clone()) as Box<dyn BlockDevice>,
        })
        .collect()
}

/// A pool over `disks` (queued under `sched` when given).
pub fn create_on(disks: &[SharedDisk], sched: Option<&Sched>) -> Pool {
    let devs = devices(disks, sched)
        .into_iter()
        .enumerate()
        .map(|(i, d)| {
            let tier = if i % 2 == 0 { "fast" } else { "slow" };
            (d, DiskSpec::new(&format!("d{i}"), tier))
        })
        .collect();
    Pool::create(devs, PoolConfig::small(POOL_ID)).expect("create pool")
}

/// A pool over `disks` written with metadata record version `version` (2 makes a pool as
/// before version 3, with thin mappings inside the record).
pub fn create_version(disks: &[SharedDisk], version: u32) -> Pool {
    let devs = devices(disks, None)
        .into_iter()
        .enumerate()
        .map(|(i, d)| {
            let tier = if i % 2 == 0 { "fast" } else { "slow" };
            (d, DiskSpec::new(&format!("d{i}"), tier))
        })
        .collect();
    Pool::create(
        devs,
        PoolConfig {
            md_version: version,
            ..PoolConfig::small(POOL_ID)
        },
    )
    .expect("create pool")
}

/// The pool on `disks`, reopened (queued under `sched` when given).
pub fn reopen_on(disks: &[SharedDisk], sched: Option<&Sched>) -> Pool {
    Pool::open(devices(disks, sched), OpenOptions::default())
        .expect("open pool")
        .0
}

pub fn open_images(
    images: Vec<Vec<u8>>,
) -> Result<(Pool, volmgr::pool::OpenReport), volmgr::Error> {
    let devs = images
        .into_iter()
        .map(|i| Box::new(MemDisk::from_image(i)) as Box<dyn BlockDevice>)
        .collect();
    Pool::open(devs, OpenOptions::default())
}

/// A block filled with a recognisable pattern for `tag`.
pub fn pattern(tag: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_SIZE];
    for (i, c) in b.chunks_mut(8).enumerate() {
        c.copy_from_slice(&(tag.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64).to_le_bytes());
    }
    b
}

pub fn read_block(p: &mut Pool, vol: u32, b: u64) -> Vec<u8> {
    let mut buf = vec![0u8; BLOCK_SIZE];
    p.read(vol, b, &mut buf).expect("read");
    buf
}

/// Small deterministic PRNG.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}
