//! `hvctl volume bench`: 4 KiB random and 1 MiB sequential reads and writes on linear,
//! striped, mirrored and thin volumes, and first writes after a snapshot, against the raw
//! file and `qemu-img bench` (raw file, and a qcow2 overlay for first writes), all in a
//! RAM-backed directory. Prints MiB/s and ratios.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use volmgr::BlockDevice;
use volmgr::pool::{DiskSpec, LayoutSpec, Pool, PoolConfig, SnapshotKind};

use crate::CliError;
use crate::filedisk::FileDisk;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Something the workloads run against: the raw file or a volume.
trait Target {
    fn blocks(&self) -> u64;
    fn write(&mut self, b: u64, buf: &[u8]);
    fn read(&mut self, b: u64, buf: &mut [u8]);
    fn flush(&mut self);
}

impl Target for FileDisk {
    fn blocks(&self) -> u64 {
        self.num_blocks()
    }
    fn write(&mut self, b: u64, buf: &[u8]) {
        BlockDevice::write(self, b, buf).expect("raw write");
    }
    fn read(&mut self, b: u64, buf: &mut [u8]) {
        BlockDevice::read(self, b, buf).expect("raw read");
    }
    fn flush(&mut self) {
        BlockDevice::flush(self).expect("raw flush");
    }
}

struct Vol<'a>(&'a mut Pool, u32, u64);

impl Target for Vol<'_> {
    fn blocks(&self) -> u64 {
        self.2
    }
    fn write(&mut self, b: u64, buf: &[u8]) {
        self.0.write(self.1, b, buf).expect("volume write");
    }
    fn read(&mut self, b: u64, buf: &mut [u8]) {
        self.0.read(self.1, b, buf).expect("volume read");
    }
    fn flush(&mut self) {
        self.0.flush().expect("volume flush");
    }
}

#[derive(Clone, Copy, Default)]
struct Res {
    rand_w: f64,
    rand_r: f64,
    seq_w: f64,
    seq_r: f64,
}

fn mibs(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / f64::from(1 << 20) / secs.max(1e-9)
}

fn workloads(t: &mut dyn Target, ops: u64) -> Res {
    let blocks = t.blocks();
    let mut buf4 = vec![0x5au8; 4096];
    let mut buf1m = vec![0xa5u8; 1 << 20];
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut r = Res::default();
    // Sequential 1 MiB writes over the whole target (also allocates thin chunks), then reads.
    let n1m = blocks / 256;
    let t0 = Instant::now();
    for i in 0..n1m {
        t.write(i * 256, &buf1m);
    }
    t.flush();
    r.seq_w = mibs(n1m << 20, t0.elapsed().as_secs_f64());
    let t0 = Instant::now();
    for i in 0..n1m {
        t.read(i * 256, &mut buf1m);
    }
    r.seq_r = mibs(n1m << 20, t0.elapsed().as_secs_f64());
    let t0 = Instant::now();
    for _ in 0..ops {
        let b = rng.next() % blocks;
        buf4[0] = b as u8;
        t.write(b, &buf4);
    }
    t.flush();
    r.rand_w = mibs(ops * 4096, t0.elapsed().as_secs_f64());
    let t0 = Instant::now();
    for _ in 0..ops {
        let b = rng.next() % blocks;
        t.read(b, &mut buf4);
    }
    r.rand_r = mibs(ops * 4096, t0.elapsed().as_secs_f64());
    r
}

fn disk(dir: &Path, name: &str, bytes: u64) -> Result<Box<dyn BlockDevice>, CliError> {
    let p = dir.join(name);
    let _ = std::fs::remove_file(&p);
    Ok(Box::new(
        FileDisk::open(&p, Some(bytes)).map_err(|err| CliError::File { path: p, err })?,
    ))
}

fn pool_on(dir: &Path, prefix: &str, n: usize, bytes: u64) -> Result<Pool, CliError> {
    let mut devs = Vec::new();
    for i in 0..n {
        devs.push((
            disk(dir, &format!("{prefix}{i}.img"), bytes)?,
            DiskSpec::new(&format!("d{i}"), "ram"),
        ));
    }
    Ok(Pool::create(
        devs,
        PoolConfig::new(0xbe4c_u128 + n as u128),
    )?)
}

/// First 4 KiB writes at a 64 KiB stride after a snapshot: `count` writes, MiB/s.
fn first_write_after_snapshot(dir: &Path, size: u64, count: u64) -> Result<f64, CliError> {
    let mut p = pool_on(dir, "snap", 1, size + (64 << 20))?;
    p.create_thin_pool("tp", size / 4096 * 2, LayoutSpec::Concat, None, 16)?;
    let id = p.create_thin("t", "tp", size / 4096)?;
    let buf = vec![0x11u8; 1 << 20];
    for i in 0..size >> 20 {
        p.write(id, i * 256, &buf)?;
    }
    p.snapshot(
        "t",
        "s",
        SnapshotKind::SpaceOptimized,
        LayoutSpec::Concat,
        None,
    )?;
    let b4 = vec![0x22u8; 4096];
    let t0 = Instant::now();
    for i in 0..count {
        p.write(id, (i * 16) % (size / 4096), &b4)?;
    }
    p.flush()?;
    Ok(mibs(count * 4096, t0.elapsed().as_secs_f64()))
}

/// Runs `qemu-img bench` and returns MiB/s, or None when qemu-img is missing.
fn qemu_bench(args: &[&str], count: u64, bs: u64) -> Option<f64> {
    let out = Command::new("qemu-img")
        .arg("bench")
        .args(args)
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "qemu-img bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let secs: f64 = text
        .split("Run completed in ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(mibs(count * bs, secs))
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "-".into()
    }
}

/// The whole benchmark.
pub fn run(dir: &Path, size: u64, scale: u64) -> Result<(), CliError> {
    let size = size / (1 << 20) * (1 << 20);
    if size < 16 << 20 {
        return Err(CliError::Usage("bench size must be at least 16M".into()));
    }
    let dir = dir.join(format!("hvctl-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|err| CliError::File {
        path: dir.clone(),
        err,
    })?;
    let ops = 20_000 * scale;
    let blocks = size / 4096;
    println!(
        "volume bench: {} MiB per target, {ops} random 4 KiB ops, files in {}",
        size >> 20,
        dir.display()
    );
    let mut rows: Vec<(String, Res)> = Vec::new();
    {
        let mut raw =
            FileDisk::open(&dir.join("raw.img"), Some(size)).map_err(|err| CliError::File {
                path: dir.join("raw.img"),
                err,
            })?;
        rows.push(("raw file".into(), workloads(&mut raw, ops)));
    }
    let configs: [(&str, usize, Option<LayoutSpec>); 4] = [
        ("linear", 1, Some(LayoutSpec::Concat)),
        (
            "striped 2x64K",
            2,
            Some(LayoutSpec::Stripe {
                columns: 2,
                unit: 16,
            }),
        ),
        ("mirrored 2", 2, Some(LayoutSpec::Mirror { legs: 2 })),
        ("thin (64K chunks)", 1, None),
    ];
    for (name, n, spec) in configs {
        let mut p = pool_on(
            &dir,
            &name.replace([' ', '(', ')'], "_"),
            n,
            size + (64 << 20),
        )?;
        let id = match spec {
            Some(s) => p.create_volume("v", blocks, s, None)?,
            None => {
                p.create_thin_pool("tp", blocks, LayoutSpec::Concat, None, 16)?;
                p.create_thin("v", "tp", blocks)?
            }
        };
        let r = workloads(&mut Vol(&mut p, id, blocks), ops);
        rows.push((name.into(), r));
    }
    let raw = rows[0].1;
    println!(
        "{:<20} {:>12} {:>12} {:>12} {:>12}   ratios to raw (rw rr sw sr)",
        "target", "4K rand W", "4K rand R", "1M seq W", "1M seq R"
    );
    for (name, r) in &rows {
        println!(
            "{:<20} {:>8.1} MiB/s {:>6.1} MiB/s {:>6.1} MiB/s {:>6.1} MiB/s   {} {} {} {}",
            name,
            r.rand_w,
            r.rand_r,
            r.seq_w,
            r.seq_r,
            ratio(r.rand_w, raw.rand_w),
            ratio(r.rand_r, raw.rand_r),
            ratio(r.seq_w, raw.seq_w),
            ratio(r.seq_r, raw.seq_r)
        );
    }
    // qemu-img bench as a peer on the raw file (sequential, as qemu-img bench does).
    let raw_path = dir.join("raw.img");
    let rp = raw_path.to_string_lossy().to_string();
    let c4 = ops.to_string();
    let n1m = (size >> 20).to_string();
    let q = [
        (
            "qemu-img 4K W",
            qemu_bench(
                &[
                    "-f",
                    "raw",
                    "-w",
                    "-t",
                    "writeback",
                    "-c",
                    &c4,
                    "-s",
                    "4096",
                    "-q",
                    &rp,
                ],
                ops,
                4096,
            ),
        ),
        (
            "qemu-img 4K R",
            qemu_bench(
                &["-f", "raw", "-t", "writeback", "-c", &c4, "-s", "4096", &rp],
                ops,
                4096,
            ),
        ),
        (
            "qemu-img 1M W",
            qemu_bench(
                &[
                    "-f",
                    "raw",
                    "-w",
                    "-t",
                    "writeback",
                    "-c",
                    &n1m,
                    "-s",
                    "1M",
                    &rp,
                ],
                size >> 20,
                1 << 20,
            ),
        ),
        (
            "qemu-img 1M R",
            qemu_bench(
                &["-f", "raw", "-t", "writeback", "-c", &n1m, "-s", "1M", &rp],
                size >> 20,
                1 << 20,
            ),
        ),
    ];
    for (name, v) in q {
        match v {
            Some(v) => println!("{name:<20} {v:>8.1} MiB/s (raw file through qemu's block layer)"),
            None => println!("{name:<20} unavailable (qemu-img missing)"),
        }
    }
    // First write after a snapshot vs qcow2's first write into an overlay.
    let count = (blocks / 16).min(ops);
    let ours = first_write_after_snapshot(&dir, size, count)?;
    let base = dir.join("base.raw");
    let overlay = dir.join("overlay.qcow2");
    {
        let mut b = FileDisk::open(&base, Some(size)).map_err(|err| CliError::File {
            path: base.clone(),
            err,
        })?;
        let buf = vec![0x11u8; 1 << 20];
        for i in 0..size >> 20 {
            BlockDevice::write(&mut b, i * 256, &buf)
                .map_err(|e| CliError::Usage(e.to_string()))?;
        }
    }
    let _ = std::fs::remove_file(&overlay);
    let made = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&base)
        .arg(&overlay)
        .status()
        .is_ok_and(|s| s.success());
    let qcow = if made {
        let ov = overlay.to_string_lossy().to_string();
        qemu_bench(
            &[
                "-f",
                "qcow2",
                "-w",
                "-t",
                "writeback",
                "-c",
                &count.to_string(),
                "-s",
                "4096",
                "-S",
                "65536",
                &ov,
            ],
            count,
            4096,
        )
    } else {
        None
    };
    println!(
        "first 4K write after snapshot ({count} writes, 64K apart): thin snapshot {ours:.1} MiB/s; qcow2 overlay {}; ratio {}",
        qcow.map_or_else(|| "unavailable".into(), |q| format!("{q:.1} MiB/s")),
        qcow.map_or_else(|| "-".into(), |q| ratio(ours, q))
    );
    println!(
        "targets: linear within 5% of raw: rand W {} rand R {} seq W {} seq R {}; first write after snapshot faster than qcow2: {}",
        ratio(rows[1].1.rand_w, raw.rand_w),
        ratio(rows[1].1.rand_r, raw.rand_r),
        ratio(rows[1].1.seq_w, raw.seq_w),
        ratio(rows[1].1.seq_r, raw.seq_r),
        qcow.map_or_else(|| "unknown".into(), |q| (ours > q).to_string())
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
