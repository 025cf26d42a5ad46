//! `cargo xtask bench`: figures, never pass/fail. `boot` measures instructions from reset to the
//! console prompt in Bochs (deterministic time: one TSC tick per instruction) and wall time to
//! the prompt in QEMU.

use std::io::Read;
use std::time::Duration;

use regex::Regex;

use crate::build::{self, ImageOptions};
use crate::emu::{self, Boot, Emulator, Machine, PROMPT};
use crate::root;

const BENCHES: &str = "boot, vmcall, virtqueue, volume";

pub fn run(args: &[String]) -> Result<(), String> {
    let which = args.first().map(String::as_str).unwrap_or("all");
    match which {
        "boot" => boot(),
        "vmcall" => vmcall(),
        "virtqueue" => virtqueue(&args[1..]),
        "volume" => volume(),
        "all" => boot()
            .and_then(|()| vmcall())
            .and_then(|()| virtqueue(&[]))
            .and_then(|()| volume()),
        other => Err(format!(
            "bench: unknown benchmark '{other}' (have: {BENCHES})"
        )),
    }
}

/// Boots `m` until the first prompt; returns the serial text and the wall time.
fn to_prompt(m: &Machine, limit: Duration) -> Result<(String, Duration), String> {
    let prompt = Regex::new(&regex::escape(PROMPT)).expect("valid");
    until(m, &prompt, limit)
}

/// Boots `m` and reads serial output until `done` matches (or the limit passes); returns the
/// text and the wall time from the emulator's start.
fn until(m: &Machine, done: &Regex, limit: Duration) -> Result<(String, Duration), String> {
    let mut r = emu::start(m)?;
    r.serial
        .set_read_timeout(Some(Duration::from_millis(20)))
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match r.serial.read(&mut buf) {
            Ok(0) => return Err("serial closed".into()),
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        let text = String::from_utf8_lossy(&raw);
        if done.is_match(&text) {
            let wall = r.started.elapsed();
            r.stop();
            return Ok((text.into_owned(), wall));
        }
        if r.started.elapsed() > limit {
            return Err(format!(
                "no /{done}/ within {} s; last output:\n{text}",
                limit.as_secs()
            ));
        }
    }
}

/// The cost of a VMCALL round trip in Bochs with deterministic time: TSC ticks (instructions)
/// per round trip measured by the guest, and VMREADs/VMWRITEs per exit counted by the host.
fn vmcall() -> Result<(), String> {
    let n = 20_000;
    let module = build::guest_module(&format!("hypercall_bench:name=bench mem=8 -- {n}"))?;
    let iso = build::image_named(
        &ImageOptions {
            append: "loglevel=info".into(),
            modules: vec![module],
        },
        "bench-vmcall",
    )?;
    let m = Machine {
        emulator: Emulator::Bochs,
        cpus: 1,
        mem_mib: 128,
        boot: Boot::Iso(iso),
        work_dir: root().join("target/bench/vmcall"),
        deterministic: true,
    };
    let stopped =
        Regex::new(r"stopped after (\d+) exits \((\d+) VMREADs, (\d+) VMWRITEs\)").expect("valid");
    let (text, _) = until(&m, &stopped, Duration::from_secs(300))?;
    let per =
        Regex::new(r"hypercall-bench: (\d+) round trips, (\d+) TSC ticks each").expect("valid");
    let c = per.captures(&text).ok_or("no hypercall-bench line")?;
    let ticks: u64 = c[2].parse().map_err(|_| "bad number")?;
    let s = stopped.captures(&text).ok_or("no stop line")?;
    let exits: f64 = s[1].parse().map_err(|_| "bad number")?;
    let reads: f64 = s[2].parse().map_err(|_| "bad number")?;
    let writes: f64 = s[3].parse().map_err(|_| "bad number")?;
    println!("vmcall benchmark (figures, not a test)");
    println!(
        "  bochs tigerlake, sync=none: {n} VMCALL round trips, {ticks} instructions (TSC ticks) each"
    );
    println!(
        "  per exit over the whole run ({exits} exits): {:.2} VMREADs, {:.2} VMWRITEs",
        reads / exits,
        writes / exits
    );
    Ok(())
}

/// Requests per second through a virtqueue pair (block 4 KiB at depth 1 and 64, net 1500 B),
/// notifications per request with event index on and off, against rust-vmm `virtio-queue` as
/// the peer in the same run (`hypervisor/virtio/examples/virtqueue_bench.rs`).
fn virtqueue(extra: &[String]) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    crate::run_checked(
        std::process::Command::new(cargo)
            .current_dir(root())
            .args([
                "run",
                "--quiet",
                "--release",
                "-p",
                "hv-virtio",
                "--example",
                "virtqueue_bench",
                "--",
            ])
            .args(extra),
    )
}

/// The volume manager on RAM-backed files (/dev/shm): 4 KiB random and 1 MiB sequential reads
/// and writes on linear, striped, mirrored and thin volumes and the first write after a
/// snapshot, against the raw file and `qemu-img bench` (raw and a qcow2 overlay) in the same
/// run; then the CPU cost per 4 KiB operation.
fn volume() -> Result<(), String> {
    crate::deps::ensure(&[crate::deps::QEMU_UTILS])?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        "/dev/shm"
    } else {
        "/tmp"
    };
    crate::run_checked(
        std::process::Command::new(&cargo)
            .current_dir(root())
            .args([
                "run",
                "--quiet",
                "--release",
                "-p",
                "hvctl",
                "--",
                "volume",
                "bench",
            ])
            .args(["--dir", dir, "--size", "256M"]),
    )?;
    crate::run_checked(
        std::process::Command::new(&cargo)
            .current_dir(root())
            .args([
                "run",
                "--quiet",
                "--release",
                "-p",
                "volmgr",
                "--example",
                "io_overhead",
            ]),
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn boot() -> Result<(), String> {
    let elf = build::build_kernel()?;
    let iso = build::image_named(
        &ImageOptions {
            append: "loglevel=info".into(),
            modules: vec![],
        },
        "bench-boot",
    )?;
    let tsc = Regex::new(r"console ready at TSC (\d+) \(hypervisor entered at TSC (\d+)\)")
        .expect("valid");
    println!("boot benchmark (figures, not a test)");
    for cpus in [1u32, 2] {
        let m = Machine {
            emulator: Emulator::Bochs,
            cpus,
            mem_mib: 256,
            boot: Boot::Iso(iso.clone()),
            work_dir: root().join("target/bench/bochs"),
            deterministic: true,
        };
        let (text, wall) = to_prompt(&m, Duration::from_secs(120))?;
        let c = tsc
            .captures(&text)
            .ok_or("no 'console ready at TSC' line in the boot log")?;
        let ready: u64 = c[1].parse().map_err(|_| "bad TSC")?;
        let entry: u64 = c[2].parse().map_err(|_| "bad TSC")?;
        println!(
            "  bochs tigerlake, {cpus} CPU(s), sync=none: reset -> prompt {:>12} instructions \
             (firmware + GRUB {:>12}, hypervisor {:>10}); wall {:.2} s",
            ready,
            entry,
            ready - entry,
            wall.as_secs_f64()
        );
    }
    for (label, boot) in [
        (
            "-kernel (multiboot1)",
            Boot::Kernel {
                elf: elf.clone(),
                append: "loglevel=info".into(),
            },
        ),
        ("GRUB ISO (multiboot2)", Boot::Iso(iso.clone())),
    ] {
        for cpus in [1u32, 4] {
            let mut walls = Vec::new();
            for _ in 0..3 {
                let m = Machine {
                    emulator: Emulator::Qemu,
                    cpus,
                    mem_mib: 256,
                    boot: boot.clone(),
                    work_dir: root().join("target/bench/qemu"),
                    deterministic: false,
                };
                walls.push(to_prompt(&m, Duration::from_secs(60))?.1.as_secs_f64());
            }
            println!(
                "  qemu tcg {label:<22} {cpus} CPU(s): start -> prompt median {:.3} s (of 3: {})",
                median(walls.clone()),
                walls
                    .iter()
                    .map(|w| format!("{w:.3}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    Ok(())
}
