//! Pure CPU cost of the volume manager's I/O path: 4 KiB random writes and reads on a linear
//! volume over a device that does nothing, so only the mapping and bookkeeping are timed.
//! `cargo run --release -p volmgr --example io_overhead`

use std::time::Instant;
use volmgr::pool::{DiskSpec, LayoutSpec, Pool, PoolConfig};
use volmgr::{BlockDevice, DevError};
struct Null(u64);
impl BlockDevice for Null {
    fn num_blocks(&self) -> u64 {
        self.0
    }
    fn read(&mut self, _: u64, _: &mut [u8]) -> Result<(), DevError> {
        Ok(())
    }
    fn write(&mut self, _: u64, _: &[u8]) -> Result<(), DevError> {
        Ok(())
    }
    fn flush(&mut self) -> Result<(), DevError> {
        Ok(())
    }
}
fn main() {
    let mut p = Pool::create(
        vec![(
            Box::new(Null(1 << 20)) as Box<dyn BlockDevice>,
            DiskSpec::new("d", "t"),
        )],
        PoolConfig::new(1),
    )
    .unwrap();
    let v = p
        .create_volume("v", 100_000, LayoutSpec::Concat, None)
        .unwrap();
    let buf = vec![0u8; 4096];
    let mut x = 1u64;
    let n: u32 = 5_000_000;
    let t0 = Instant::now();
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        p.write(v, x % 100_000, &buf).unwrap();
    }
    println!(
        "write overhead {:.1} ns/op",
        t0.elapsed().as_nanos() as f64 / f64::from(n)
    );
    let mut rb = vec![0u8; 4096];
    let t0 = Instant::now();
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        p.read(v, x % 100_000, &mut rb).unwrap();
    }
    println!(
        "read overhead {:.1} ns/op",
        t0.elapsed().as_nanos() as f64 / f64::from(n)
    );
}
