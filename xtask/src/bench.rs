//! `cargo xtask bench`: figures, never pass/fail. `boot` measures instructions from reset to the
//! console prompt in Bochs (deterministic time: one TSC tick per instruction) and wall time to
//! the prompt in QEMU.

use std::io::Read;
use std::time::Duration;

use regex::Regex;

use crate::build::{self, ImageOptions};
use crate::emu::{self, Boot, Emulator, Machine, PROMPT};
use crate::root;

use crate::history::{self, Better, Figure};

const BENCHES: &str = "boot, vmcall, virtqueue, volume, sched, io, net, linux, all";

/// The most one benchmark may run in `bench all` (each emulator run has its own limit too).
const LIMIT: Duration = Duration::from_secs(900);

pub fn run(args: &[String]) -> Result<(), String> {
    let which = args.first().map(String::as_str).unwrap_or("all");
    let one = |name: &str, extra: &[String]| -> Result<Vec<Figure>, String> {
        let figs = match name {
            "boot" => boot()?,
            "vmcall" => vmcall()?,
            "virtqueue" => virtqueue(extra)?,
            "volume" => volume()?,
            "sched" => sched(extra)?,
            "io" => io()?,
            "net" => net()?,
            "linux" => linux()?,
            other => {
                return Err(format!(
                    "bench: unknown benchmark '{other}' (have: {BENCHES})"
                ));
            }
        };
        println!("{name}: figures (previous: the last run of this benchmark on this machine)");
        history::record(&figs)?;
        Ok(figs)
    };
    if which != "all" {
        return one(which, &args[1..]).map(|_| ());
    }
    let mut all = Vec::new();
    let mut failed = Vec::new();
    for name in [
        "boot",
        "vmcall",
        "virtqueue",
        "volume",
        "sched",
        "io",
        "net",
        "linux",
    ] {
        match one(name, &[]) {
            Ok(f) => all.extend(f),
            Err(e) => {
                eprintln!("xtask: bench {name}: {e}");
                failed.push(name);
            }
        }
    }
    print!("{}", history::summary(&all));
    println!("results appended to {}", history::results_file().display());
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("benchmarks that failed: {}", failed.join(", ")))
    }
}

/// `cargo run --quiet --release -p PACKAGE [WHAT...] --`: a benchmark program; append its
/// arguments.
fn release_run(package: &str, what: &[&str]) -> std::process::Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut c = std::process::Command::new(cargo);
    c.current_dir(root())
        .args(["run", "--quiet", "--release", "-p", package])
        .args(what)
        .arg("--");
    c
}

/// Runs a benchmark program, echoing its output, killed after [`LIMIT`]; returns its stdout.
fn run_program(cmd: &mut std::process::Command) -> Result<String, String> {
    use std::io::BufRead;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
    let out = child.stdout.take().ok_or("no stdout")?;
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            println!("{line}");
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            break s;
        }
        if t0.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("stopped after {} s", LIMIT.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = reader.join().unwrap_or_default();
    if status.success() {
        Ok(text)
    } else {
        Err(format!("{:?} failed: {status}", cmd.get_program()))
    }
}

/// A benchmark's machine: Bochs with deterministic time (one TSC tick per instruction),
/// booting `iso`, with `disks` and nothing else attached.
fn bochs_bench(
    cpus: u32,
    mem_mib: u32,
    iso: std::path::PathBuf,
    work_dir: std::path::PathBuf,
    disks: Vec<emu::Disk>,
) -> Machine {
    Machine {
        emulator: Emulator::Bochs,
        cpus,
        mem_mib,
        boot: Boot::Iso(iso),
        work_dir,
        deterministic: true,
        uefi: false,
        kvm: false,
        disks,
        nic: None,
        com2: false,
        tag: String::new(),
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
    until_then(m, done, None, limit)
}

/// As [`until`]; then, when `then` is given, types that console command and reads on until
/// the prompt comes back after its answer.
fn until_then(
    m: &Machine,
    done: &Regex,
    then: Option<&str>,
    limit: Duration,
) -> Result<(String, Duration), String> {
    use std::io::Write as _;
    let mut r = emu::start(m)?;
    r.serial
        .set_read_timeout(Some(Duration::from_millis(20)))
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    // What the serial port gives within its read timeout, appended to `raw`.
    let read_more = |r: &mut emu::Running, raw: &mut Vec<u8>| -> Result<(), String> {
        let mut buf = [0u8; 4096];
        match r.serial.read(&mut buf) {
            Ok(0) => Err("serial closed".into()),
            Ok(n) => {
                raw.extend_from_slice(&buf[..n]);
                Ok(())
            }
            Err(_) => Ok(()),
        }
    };
    loop {
        read_more(&mut r, &mut raw)?;
        let text = String::from_utf8_lossy(&raw);
        if let Some(m) = done.find(&text) {
            let wall = r.started.elapsed();
            if let Some(cmd) = then {
                let from = m.end();
                r.serial
                    .write_all(format!("{cmd}\r").as_bytes())
                    .map_err(|e| format!("typing '{cmd}': {e}"))?;
                let deadline = std::time::Instant::now() + Duration::from_secs(60);
                loop {
                    read_more(&mut r, &mut raw)?;
                    let t = String::from_utf8_lossy(&raw);
                    // The answer, then the prompt again.
                    if t[from..].contains(cmd) && t[from..].trim_end().ends_with(PROMPT.trim_end())
                    {
                        break;
                    }
                    if std::time::Instant::now() > deadline {
                        return Err(format!("no answer to '{cmd}' within 60 s"));
                    }
                }
            }
            r.stop();
            return Ok((String::from_utf8_lossy(&raw).into_owned(), wall));
        }
        if r.started.elapsed() > limit {
            return Err(format!(
                "no /{done}/ within {} s; last output:\n{text}",
                limit.as_secs()
            ));
        }
    }
}

/// A guest's disk through the whole path (virtio-blk → hypervisor → dom0 → volume → ATA disk
/// with bus-master DMA), in Bochs with deterministic time, against dom0's own requests to an
/// identical ATA disk in the same run (the physical limit here): requests per million TSC
/// ticks (instructions), their ratio, and the guest's exits per request.
fn io() -> Result<Vec<Figure>, String> {
    println!("io benchmark (figures, not a test)");
    let text = io_run("-- ops=256", "")?;
    let mut figs = io_figures(&text)?;
    // Exits per request at depth 32: two runs of only those tests, differenced, so the
    // guest's start-up and console output cancel out; once with the guest polling its used
    // ring, once waiting in HLT for the disk's interrupt.
    let count = |t: &str| -> Result<f64, String> {
        Regex::new(r"domain \d+ \(bench\) stopped after (\d+) exits")
            .expect("valid")
            .captures(t)
            .and_then(|c| c[1].parse().ok())
            .ok_or_else(|| String::from("no stop line for the bench guest"))
    };
    for (how, extra, tag) in [
        ("polling its used ring", "", "poll"),
        ("waiting for the disk's interrupt in HLT", " irq=1", "irq"),
    ] {
        let ta = io_run(
            &format!("-- ops=256 only=qd32{extra}"),
            &format!("-{tag}-a"),
        )?;
        let tb = io_run(
            &format!("-- ops=768 only=qd32{extra}"),
            &format!("-{tag}-b"),
        )?;
        let (a, b) = (count(&ta)?, count(&tb)?);
        let per = (b - a) / (2.0 * 512.0);
        if tag == "poll" {
            figs.extend(io_split(
                &ta,
                &tb,
                2.0 * 512.0,
                raw_ticks_per_request(&text),
            )?);
        }
        println!(
            "  guest exits per request at depth 32, {how} (2x256 and 2x768 requests, differenced): {per:.3}"
        );
        figs.push(Figure::new(
            "io",
            &format!("guest exits per request, depth 32, {how}"),
            per,
            "exits",
            Better::Lower,
        ));
    }
    Ok(figs)
}

/// Frames guest to guest through the hypervisor's switch, in Bochs with deterministic time:
/// `blast` sends 1514-byte frames to `sink` on one network, in bursts of 32 that `sink`
/// acknowledges. Figures: frames per million ticks (instructions) at the receiver, and exits
/// per frame of both guests together (two runs of N and 3N frames, differenced, so start-up
/// and the console cancel out).
fn net() -> Result<Vec<Figure>, String> {
    println!("net benchmark (figures, not a test)");
    let exits = |t: &str, who: &str| -> Result<f64, String> {
        Regex::new(&format!(r"domain \d+ \({who}\) stopped after (\d+) exits"))
            .expect("valid")
            .captures(t)
            .and_then(|c| c[1].parse().ok())
            .ok_or_else(|| format!("no stop line for {who}"))
    };
    let (n1, n2) = (256u32, 768u32);
    let a = net_run(n1, "-a")?;
    let b = net_run(n2, "-b")?;
    let c = Regex::new(r"netcheck: sink: (\d+) frames, (\d+) bytes in (\d+) ticks, (\d+) lost")
        .expect("valid")
        .captures(&b)
        .ok_or("no sink line")?;
    let (frames, bytes, ticks, lost): (f64, f64, f64, f64) = (
        c[1].parse().map_err(|_| "sink frames")?,
        c[2].parse().map_err(|_| "sink bytes")?,
        c[3].parse().map_err(|_| "sink ticks")?,
        c[4].parse().map_err(|_| "sink lost")?,
    );
    let per_m = frames / ticks * 1e6;
    let mib = bytes / 1048576.0 / ticks * 1e6;
    let per_frame =
        (exits(&b, "blast")? + exits(&b, "sink")? - exits(&a, "blast")? - exits(&a, "sink")?)
            / f64::from(n2 - n1);
    println!(
        "  bochs tigerlake, sync=none: {frames} frames of 1514 bytes guest to guest ({lost} lost): {per_m:.2} frames per Mtick ({mib:.3} MiB per Mtick)"
    );
    println!(
        "  exits per frame, both guests ({n1} and {n2} frames, differenced): {per_frame:.3} (target 0.05)"
    );
    Ok(vec![
        Figure::new(
            "net",
            "frames guest to guest, 1514 bytes",
            per_m,
            "frames per Mtick",
            Better::Higher,
        ),
        Figure::new(
            "net",
            "exits per frame guest to guest, both guests",
            per_frame,
            "exits",
            Better::Lower,
        ),
    ])
}

/// One `bench net` boot: blast sends `count` frames to sink; returns the console text.
fn net_run(count: u32, tag: &str) -> Result<String, String> {
    let (blast, sink) = ("02:00:00:00:0b:01", "02:00:00:00:0b:02");
    let modules = vec![
        build::guest_module(&format!(
            "netcheck:name=sink mem=16 nic=bench,mac={sink} -- role=sink peer={blast} count={count}"
        ))?,
        build::guest_module(&format!(
            "netcheck:name=blast mem=16 nic=bench,mac={blast} -- role=blast peer={sink} count={count}"
        ))?,
    ];
    let iso = build::image_named(
        &ImageOptions {
            append: String::from("loglevel=info"),
            modules,
        },
        &format!("bench-net{tag}"),
    )?;
    let work = root().join(format!("target/bench/net{tag}"));
    let m = bochs_bench(2, 128, iso, work, Vec::new());
    let both = Regex::new(r"(?s)(\(blast\) stopped after.*\(sink\) stopped after \d+|\(sink\) stopped after.*\(blast\) stopped after \d+) exits")
        .expect("valid");
    let (text, _) = until(&m, &both, Duration::from_secs(900))?;
    let log = m.work_dir.join("serial.log");
    std::fs::write(&log, &text).map_err(|e| format!("{}: {e}", log.display()))?;
    if text.contains("FAILED") {
        return Err(format!("a benchmark guest failed; see {}", log.display()));
    }
    Ok(text)
}

/// A domain's running ticks and the hypervisor's ticks handling its exits, from `domains`.
fn domain_time(text: &str, id: u32, name: &str) -> Result<(f64, f64), String> {
    let re = Regex::new(&format!(
        r"(?m)^{id} +{name} .*\r?\n +time: (\d+) ticks running, (\d+) of them handling its exits"
    ))
    .expect("valid");
    let c = re
        .captures(text)
        .ok_or_else(|| format!("no time line for domain {id} ({name})"))?;
    Ok((
        c[1].parse().map_err(|_| "running ticks")?,
        c[2].parse().map_err(|_| "handling ticks")?,
    ))
}

/// dom0's ticks per 4 KiB random request on its raw disk (read and write averaged).
fn raw_ticks_per_request(text: &str) -> Option<f64> {
    let re = Regex::new(r"rawbench ata1m: randread-4k: (\d+) requests, \d+ bytes, (\d+) ticks")
        .expect("valid");
    let c = re.captures(text)?;
    let (n, t): (f64, f64) = (c[1].parse().ok()?, c[2].parse().ok()?);
    Some(t / n)
}

/// Instructions (ticks) per request spent in the hypervisor (handling the guest's and dom0's
/// exits) and in dom0 (its running time less the hypervisor's part), from two runs `a` and `b`
/// of the depth-32 tests that differ by `requests` requests.
fn io_split(a: &str, b: &str, requests: f64, raw: Option<f64>) -> Result<Vec<Figure>, String> {
    let (d0a, h0a) = domain_time(a, 0, "dom0")?;
    let (d0b, h0b) = domain_time(b, 0, "dom0")?;
    let (_, hga) = domain_time(a, 1, "bench")?;
    let (_, hgb) = domain_time(b, 1, "bench")?;
    let hv = ((h0b - h0a) + (hgb - hga)) / requests;
    let dom0 = ((d0b - h0b) - (d0a - h0a)) / requests;
    println!(
        "  instructions per request at depth 32: hypervisor {hv:.0} (the guest's exits and dom0's), dom0 {dom0:.0}{}",
        raw.map_or(String::new(), |r| format!(
            " (dom0's raw request to the ATA driver: {r:.0})"
        ))
    );
    let mut dom0_fig = Figure::new(
        "io",
        "dom0 instructions per request, depth 32",
        dom0,
        "ticks",
        Better::Lower,
    );
    if let Some(r) = raw {
        dom0_fig = dom0_fig.peer("dom0's raw 4 KiB read to its ATA driver, same run", r);
    }
    Ok(vec![
        Figure::new(
            "io",
            "hypervisor instructions per request, depth 32",
            hv,
            "ticks",
            Better::Lower,
        ),
        dom0_fig,
    ])
}

/// One `bench io` boot: dom0 (its raw-disk figures on ata1m, its pool on ata0s) and the
/// bench guest with `args`; returns the console text.
fn io_run(args: &str, tag: &str) -> Result<String, String> {
    let modules = vec![
        build::guest_module("dom0:name=dom0 role=dom0 mem=64 -- volume=data:16 rawbench=ata1m")?,
        build::guest_module(&format!("blkbench:name=bench disk=pool/data {args}"))?,
    ];
    let iso = build::image_named(
        &ImageOptions {
            append: String::from("loglevel=info"),
            modules,
        },
        &format!("bench-io{tag}"),
    )?;
    let work = root().join(format!("target/bench/io{tag}"));
    let mut disks = Vec::new();
    for (i, name) in ["d0", "d1"].iter().enumerate() {
        let path = work.join("disks").join(format!("{name}.img"));
        let cylinders = emu::disk_cylinders(64);
        emu::create_disk_image(&path, cylinders)?;
        disks.push(emu::Disk {
            path,
            position: emu::DISK_POSITIONS[i],
            cylinders,
        });
    }
    let m = bochs_bench(2, 256, iso, work, disks);
    let stopped = Regex::new(r"domain \d+ \(bench\) stopped after (\d+) exits").expect("valid");
    // `domains` then: each domain's running time and the hypervisor's part of it.
    let (text, _) = until_then(&m, &stopped, Some("domains"), Duration::from_secs(900))?;
    let log = m.work_dir.join("serial.log");
    std::fs::write(&log, &text).map_err(|e| format!("{}: {e}", log.display()))?;
    if text.contains("blkbench: FAILED") {
        return Err(format!("the benchmark guest failed; see {}", log.display()));
    }
    Ok(text)
}

/// The figures in a `bench io` run's console output.
pub fn io_figures(text: &str) -> Result<Vec<Figure>, String> {
    let line = |re: &str| -> Option<(f64, f64, f64)> {
        let c = Regex::new(re).expect("valid").captures(text)?;
        Some((c[1].parse().ok()?, c[2].parse().ok()?, c[3].parse().ok()?))
    };
    let exits: f64 = Regex::new(r"domain \d+ \(bench\) stopped after (\d+) exits")
        .expect("valid")
        .captures(text)
        .and_then(|c| c[1].parse().ok())
        .ok_or("no stop line for the bench guest")?;
    let mut figs = Vec::new();
    let mut requests = 0.0;
    for (guest, raw, label) in [
        (
            "randread-4k-qd1",
            "randread-4k",
            "4 KiB random read, depth 1",
        ),
        (
            "randwrite-4k-qd1",
            "randwrite-4k",
            "4 KiB random write, depth 1",
        ),
        (
            "randread-4k-qd32",
            "randread-4k",
            "4 KiB random read, depth 32",
        ),
        (
            "randwrite-4k-qd32",
            "randwrite-4k",
            "4 KiB random write, depth 32",
        ),
        (
            "seqread-1m",
            "seqread-1m",
            "1 MiB sequential read (128 KiB requests, 8 in flight)",
        ),
        (
            "seqwrite-1m",
            "seqwrite-1m",
            "1 MiB sequential write (128 KiB requests, 8 in flight)",
        ),
    ] {
        let (n, bytes, ticks) = line(&format!(
            r"blkbench: {guest}: (\d+) requests, (\d+) bytes, (\d+) ticks"
        ))
        .ok_or(format!("no blkbench line for {guest}"))?;
        let depth = Regex::new(&format!(r"blkbench: {guest}: .* depth reached (\d+)"))
            .expect("valid")
            .captures(text)
            .map_or(String::from("?"), |c| c[1].to_string());
        let (rn, rbytes, rticks) = line(&format!(
            r"rawbench ata1m: {raw}: (\d+) requests, (\d+) bytes, (\d+) ticks"
        ))
        .ok_or(format!("no rawbench line for {raw}"))?;
        requests += n;
        let per_m = |count: f64, t: f64| count / t * 1e6;
        let (value, peer, unit) = if label.starts_with("1 MiB") {
            (
                per_m(bytes / 1048576.0, ticks),
                per_m(rbytes / 1048576.0, rticks),
                "MiB per Mtick",
            )
        } else {
            (per_m(n, ticks), per_m(rn, rticks), "requests per Mtick")
        };
        println!(
            "  {label} (depth reached {depth}): guest {value:.2}, dom0 raw on the same kind of disk {peer:.2} {unit}: ratio {:.2}",
            value / peer
        );
        figs.push(
            Figure::new("io", label, value, unit, Better::Higher)
                .peer("dom0's raw ATA disk, same run", peer),
        );
    }
    // Every exit of the guest, its start-up and console included, over its requests.
    let per = exits / requests;
    println!("  guest exits per request, whole run (start-up and console included): {per:.3}");
    Ok(figs)
}

/// The cost of a VMCALL round trip in Bochs with deterministic time: TSC ticks (instructions)
/// per round trip measured by the guest, and VMREADs/VMWRITEs per exit counted by the host.
fn vmcall() -> Result<Vec<Figure>, String> {
    println!("vmcall benchmark (figures, not a test)");
    // Without mitigations (the like-for-like with Xen's spec-ctrl=no), with what the CPU calls
    // for (Bochs reports no immunity bits, so: the RSB fill), and with every one the CPU can do.
    let mut figs = Vec::new();
    for (label, append, peer) in [
        (
            "mitigations off",
            "hv.spec-ctrl=off",
            ("Xen 4.17 spec-ctrl=no", 817.0),
        ),
        ("mitigations auto", "", ("Xen 4.17 default", 888.0)),
        (
            "mitigations on",
            "hv.spec-ctrl=on",
            ("Xen 4.17 default", 888.0),
        ),
    ] {
        let (ticks, reads, writes) = vmcall_run(append)?;
        let name = if label == "mitigations off" {
            String::from("VMCALL round trip")
        } else {
            format!("VMCALL round trip, {label}")
        };
        figs.push(
            Figure::new("vmcall", &name, ticks as f64, "instructions", Better::Lower)
                .peer_recorded(peer.0, peer.1),
        );
        if label == "mitigations off" {
            figs.push(
                Figure::new("vmcall", "VMREADs per exit", reads, "reads", Better::Lower)
                    .peer_recorded("Xen 4.17", 11.0),
            );
            figs.push(
                Figure::new(
                    "vmcall",
                    "VMWRITEs per exit",
                    writes,
                    "writes",
                    Better::Lower,
                )
                .peer_recorded("Xen 4.17", 3.0),
            );
        }
    }
    // The peer: Xen 4.17 in the same Bochs model with sync=none, measured by hand (docs/PLATFORM.md,
    // docs/PERFORMANCE.md); not rerun here, which needs Xen's packages and a PVH dom0.
    Ok(figs)
}

/// One hypercall-bench run with `append` on the hypervisor's command line: instructions per
/// round trip, VMREADs and VMWRITEs per exit.
fn vmcall_run(append: &str) -> Result<(u64, f64, f64), String> {
    let n = 20_000;
    let module = build::guest_module(&format!("hypercall_bench:name=bench mem=8 -- {n}"))?;
    let iso = build::image_named(
        &ImageOptions {
            append: format!("loglevel=info {append}"),
            modules: vec![module],
        },
        "bench-vmcall",
    )?;
    let m = bochs_bench(1, 128, iso, root().join("target/bench/vmcall"), Vec::new());
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
    let what = if append.is_empty() {
        "(default)"
    } else {
        append
    };
    println!(
        "  bochs tigerlake, sync=none, {what}: {n} VMCALL round trips, {ticks} instructions (TSC ticks) each; per exit ({exits} exits): {:.2} VMREADs, {:.2} VMWRITEs",
        reads / exits,
        writes / exits
    );
    Ok((ticks, reads / exits, writes / exits))
}

/// Debian's cloud kernel to the initramfs's `/init`, under the hypervisor and on bare Bochs (no
/// hypervisor: the physical limit here) in the same run, both with deterministic time: the
/// wall time from the emulator's start to the `/init` line in each (BIOS and GRUB in both, the
/// hypervisor's own boot in the first), their ratio, and the exits the guest took, by reason.
///
/// Wall time, not TSC ticks: Bochs' TSC counts virtual time, which leaps over halted stretches,
/// and the two kernels believe different TSC rates (4 MHz from the hypervisor's CPUID 0x15;
/// 2.4 GHz from Bochs' own CPUID 0x16 on bare Bochs, so its sleeps are 600 times too long in
/// virtual time and skipped while it halts). Executed instructions are what wall time follows.
/// The kernels' own clocks and TSC rates at `/init` are printed too.
fn linux() -> Result<Vec<Figure>, String> {
    println!("linux benchmark (figures, not a test)");
    let lx = crate::linux::prepare(crate::linux::Flavour::Cloud)?;
    let args = "console=ttyS0 nokaslr loglevel=4";
    let up = Regex::new(crate::linux::UP_PATTERN).expect("valid");
    // Millions of TSC ticks at /init, and the guest seconds they were to the kernel.
    let ticks = |text: &str| -> Result<(f64, f64), String> {
        let c = up.captures(text).ok_or("no /init line")?;
        let num = |i: usize| {
            c[i].parse::<f64>()
                .map_err(|_| format!("bad number '{}' in the /init line", &c[i]))
        };
        Ok((num(3)? * num(4)?, num(3)?))
    };
    // Under the hypervisor: one 256 MiB domain, then `domains` for its exits.
    let iso = build::image_named(
        &ImageOptions {
            append: String::from("loglevel=info"),
            modules: vec![
                build::guest_module(&format!("linux-cloud:name=lx mem=256 -- {args}"))?,
                build::guest_module("linux-cloud-initrd:role=initrd for=lx")?,
            ],
        },
        "bench-linux",
    )?;
    let m = bochs_bench(1, 512, iso, root().join("target/bench/linux"), Vec::new());
    let (text, wall) = until_then(&m, &up, Some("domains"), Duration::from_secs(600))?;
    let (hv, hv_s) = ticks(&text)?;
    let hv_wall = wall.as_secs_f64();
    let exits = Regex::new(r"(?m)^1 +lx +\S+ +\d+M +\d+ +\d+ +(\d+) (.*)$").expect("valid");
    let c = exits
        .captures(&text)
        .ok_or("no exit counts for domain 1 in 'domains'")?;
    let total: f64 = c[1].parse().map_err(|_| "bad exit count")?;
    println!(
        "  under the hypervisor: /init at {hv:.0} M TSC ticks ({hv_s:.2} s to the guest, {:.0} s of wall time); {total} exits: {}",
        wall.as_secs_f64(),
        c[2].trim()
    );
    // Bare Bochs: the same kernel and initramfs from GRUB. FSRM hidden as the hypervisor hides
    // it (Debian's 6.1 kernels corrupt their memory on Bochs' FSRM: docs/PLATFORM.md).
    let iso = build::linux_iso(
        &lx.kernel.bzimage,
        &lx.initramfs,
        &format!("{args} clearcpuid=fsrm"),
        "bench-linux-bare",
    )?;
    let m = bochs_bench(
        1,
        512,
        iso,
        root().join("target/bench/linux-bare"),
        Vec::new(),
    );
    let (text, wall) = until(&m, &up, Duration::from_secs(600))?;
    let (bare, bare_s) = ticks(&text)?;
    let bare_wall = wall.as_secs_f64();
    println!(
        "  bare Bochs: /init at {bare:.0} M TSC ticks ({bare_s:.2} s to the guest, {:.0} s of wall time)",
        wall.as_secs_f64()
    );
    Ok(vec![
        Figure::new(
            "linux",
            "cloud kernel to /init, wall time in Bochs",
            hv_wall,
            "s",
            Better::Lower,
        )
        .peer("bare Bochs (no hypervisor)", bare_wall),
        Figure::new(
            "linux",
            "exits from kernel start to /init",
            total,
            "exits",
            Better::Lower,
        ),
    ])
}

/// Requests per second through a virtqueue pair (block 4 KiB at depth 1 and 64, net 1500 B),
/// notifications per request with event index on and off, against rust-vmm `virtio-queue` as
/// the peer in the same run (`hypervisor/virtio/examples/virtqueue_bench.rs`).
fn virtqueue(extra: &[String]) -> Result<Vec<Figure>, String> {
    let text =
        run_program(release_run("hv-virtio", &["--example", "virtqueue_bench"]).args(extra))?;
    Ok(virtqueue_figures(&text))
}

/// The figures in `virtqueue_bench`'s output: requests/s per case against virtio-queue, and
/// notifications per request.
pub fn virtqueue_figures(text: &str) -> Vec<Figure> {
    let re = Regex::new(
        r"(?m)^(.+?)\s+event_idx=(\w+)\s+hv-virtio\s+([\d.]+) req/s\s+virtio-queue\s+([\d.]+) req/s.*notif/req hv-virtio ([\d.]+) .*virtio-queue ([\d.]+)",
    )
    .expect("valid");
    let mut out = Vec::new();
    for c in re.captures_iter(text) {
        let case = format!("{} event_idx={}", c[1].trim(), &c[2]);
        let num = |i: usize| c[i].parse::<f64>().unwrap_or(0.0);
        out.push(
            Figure::new("virtqueue", &case, num(3), "req/s", Better::Higher)
                .peer("rust-vmm virtio-queue", num(4)),
        );
        out.push(
            Figure::new(
                "virtqueue",
                &format!("{case} notifications"),
                num(5),
                "per request",
                Better::Lower,
            )
            .peer("rust-vmm virtio-queue", num(6)),
        );
    }
    out
}

/// The scheduler policy's cost per decision on the host with 10, 100 and 1,000 runnable vCPUs
/// per CPU (`hypervisor/examples/sched_bench.rs`); no same-run peer (the anchor is Xen credit's
/// 30 ms slice).
fn sched(extra: &[String]) -> Result<Vec<Figure>, String> {
    let text = run_program(release_run("hypervisor", &["--example", "sched_bench"]).args(extra))?;
    let mut figs = sched_figures(&text);
    if extra.iter().any(|a| a == "--quick") {
        return Ok(figs);
    }
    crate::deps::ensure(&[crate::deps::VALGRIND])?;
    figs.extend(sched_instructions()?);
    crate::deps::ensure(&[crate::deps::BOCHS])?;
    figs.extend(sched_bochs()?);
    Ok(figs)
}

/// Instructions per decision (stop + pick), counted by callgrind on the host: each case runs
/// with N and 2N decisions, and the difference over N is the decisions' own cost. The
/// issue asks for instructions (they do not vary with the machine's load, as time does).
fn sched_instructions() -> Result<Vec<Figure>, String> {
    // Built by `sched`, which ran it just before.
    let exe = root()
        .join("target")
        .join("release")
        .join("examples")
        .join("sched_bench");
    let count = |cpus: usize, per_cpu: usize, n: u64| -> Result<u64, String> {
        let out = std::process::Command::new("valgrind")
            .args(["--tool=callgrind", "--callgrind-out-file=/dev/null"])
            .arg(&exe)
            .args(["--count", &cpus.to_string(), &per_cpu.to_string()])
            .arg(n.to_string())
            .output()
            .map_err(|e| format!("valgrind: {e}"))?;
        let err = String::from_utf8_lossy(&out.stderr);
        callgrind_refs(&err).ok_or_else(|| format!("valgrind printed no instruction count: {err}"))
    };
    let n = 4000;
    let mut figs = Vec::new();
    for cpus in [1usize, 8] {
        for per_cpu in [10usize, 100, 1000] {
            let (a, b) = (count(cpus, per_cpu, n)?, count(cpus, per_cpu, 2 * n)?);
            let per = b.saturating_sub(a) as f64 / n as f64;
            println!(
                "decision {cpus} CPU(s) x {per_cpu:>4} runnable vCPUs: {per:>7.0} instructions (callgrind)"
            );
            figs.push(Figure::new(
                "sched",
                &format!("decision instructions, {cpus} CPU(s) x {per_cpu} vCPUs"),
                per,
                "instructions",
                Better::Lower,
            ));
        }
    }
    Ok(figs)
}

/// The total in callgrind's "I refs" line.
pub fn callgrind_refs(stderr: &str) -> Option<u64> {
    let line = stderr.lines().find(|l| l.contains("I   refs:"))?;
    line.rsplit(':')
        .next()?
        .trim()
        .replace(',', "")
        .parse()
        .ok()
}

/// In Bochs (deterministic time): the worst 1 s window's share error of the 1:2:4 scenario
/// (`bochs-sched-weights`), in % of the entitlement and in ms of CPU, and the ticker's
/// lateness beside busy vCPUs (`bochs-sched-ticker`).
fn sched_bochs() -> Result<Vec<Figure>, String> {
    let mut figs = Vec::new();
    let root = crate::root().join("tests").join("scenarios");
    let weights = crate::scenario::load(&root.join("bochs-sched-weights.toml"))?;
    let o = crate::scenario::run_on(&weights, crate::scenario::On::Named);
    if !o.passed {
        return Err(format!("bochs-sched-weights: {}", o.detail));
    }
    let text = std::fs::read_to_string(&o.log).map_err(|e| e.to_string())?;
    let rates = weights
        .rates
        .as_ref()
        .ok_or("bochs-sched-weights has no [rates]")?;
    let mut worst = 0.0f64;
    let mut worst_ms = 0.0f64;
    for shares in rates.per_window(&text)? {
        for (k, &e) in &rates.expect {
            let v = shares.get(k).copied().unwrap_or(0.0);
            worst = worst.max(((v - e) / e).abs());
            // Shares are of the whole machine: 2 CPUs, 1000 ms each per window.
            worst_ms = worst_ms.max((v - e).abs() * 2.0 * 1000.0);
        }
    }
    println!(
        "sched in Bochs: 1:2:4 on 2 CPUs, worst 1 s window: {:.1} % of entitlement, {worst_ms:.1} ms of CPU (target: one slice, 12 ms at most)",
        worst * 100.0
    );
    figs.push(Figure::new(
        "sched",
        "Bochs 1:2:4 share error, worst 1 s window",
        worst * 100.0,
        "%",
        Better::Lower,
    ));
    figs.push(Figure::new(
        "sched",
        "Bochs 1:2:4 share error, worst 1 s window, CPU time",
        worst_ms,
        "ms",
        Better::Lower,
    ));
    let ticker = crate::scenario::load(&root.join("bochs-sched-ticker.toml"))?;
    let o = crate::scenario::run_on(&ticker, crate::scenario::On::Named);
    if !o.passed {
        return Err(format!("bochs-sched-ticker: {}", o.detail));
    }
    let text = std::fs::read_to_string(&o.log).map_err(|e| e.to_string())?;
    let re = Regex::new(r"ticker: lateness max (\d+) us, mean (\d+) us").expect("valid");
    let c = re
        .captures(&text)
        .ok_or("bochs-sched-ticker: no lateness line")?;
    let (max, mean): (f64, f64) = (c[1].parse().unwrap_or(0.0), c[2].parse().unwrap_or(0.0));
    println!(
        "sched in Bochs: ticker beside 4 busy vCPUs on 2 CPUs, lateness max {max} us, mean {mean} us (target: 1 ms)"
    );
    for (what, v) in [("max", max), ("mean", mean)] {
        figs.push(Figure::new(
            "sched",
            &format!("Bochs ticker lateness beside busy vCPUs, {what}"),
            v,
            "us",
            Better::Lower,
        ));
    }
    Ok(figs)
}

/// The figures in `sched_bench`'s output: host decision costs, then the simulator's worst
/// share error and wake-to-run latency percentiles per workload.
pub fn sched_figures(text: &str) -> Vec<Figure> {
    let decision =
        Regex::new(r"(?m)^decision (\d+) CPU\(s\) x\s+(\d+) runnable vCPUs:\s+([\d.]+) ns")
            .expect("valid");
    let share = Regex::new(
        r"(?m)^sim (.+?): worst window error ([\d.]+) % of entitlement, ([\d.]+) ms of CPU, ([\d.]+) slices per vCPU",
    )
    .expect("valid");
    let wake = Regex::new(
        r"(?m)^sim (.+?): wake-to-run p50 ([\d.]+) us, p99 ([\d.]+) us, max ([\d.]+) us",
    )
    .expect("valid");
    let num = |s: &str| s.parse().unwrap_or(0.0);
    let mut out: Vec<Figure> = decision
        .captures_iter(text)
        .map(|c| {
            Figure::new(
                "sched",
                &format!("decision, {} CPU(s) x {} vCPUs", &c[1], &c[2]),
                num(&c[3]),
                "ns",
                Better::Lower,
            )
        })
        .collect();
    for c in share.captures_iter(text) {
        for (what, i, unit) in [
            ("share error", 2, "%"),
            ("share error, CPU time", 3, "ms"),
            ("share error per vCPU", 4, "slices"),
        ] {
            out.push(Figure::new(
                "sched",
                &format!("sim {}, {what}", &c[1]),
                num(&c[i]),
                unit,
                Better::Lower,
            ));
        }
    }
    for c in wake.captures_iter(text) {
        for (what, i) in [("p50", 2), ("p99", 3), ("max", 4)] {
            out.push(Figure::new(
                "sched",
                &format!("sim {}, wake-to-run {what}", &c[1]),
                num(&c[i]),
                "us",
                Better::Lower,
            ));
        }
    }
    out
}

/// The volume manager on RAM-backed files (/dev/shm): 4 KiB random and 1 MiB sequential reads
/// and writes on linear, striped, mirrored and thin volumes and the first write after a
/// snapshot, against the raw file and `qemu-img bench` (raw and a qcow2 overlay) in the same
/// run; then the CPU cost per 4 KiB operation.
fn volume() -> Result<Vec<Figure>, String> {
    crate::deps::ensure(&[crate::deps::QEMU_UTILS])?;
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        "/dev/shm"
    } else {
        "/tmp"
    };
    let text = run_program(
        release_run("hvctl", &[])
            .args(["volume", "bench"])
            .args(["--dir", dir, "--size", "256M"]),
    )?;
    run_program(&mut release_run("volmgr", &["--example", "io_overhead"]))?;
    Ok(volume_figures(&text))
}

/// The figures in `hvctl volume bench`'s table: MiB/s per layout and phase, the raw file (the
/// same pages, opened directly) as the peer; and the first write after a snapshot against a
/// qcow2 overlay.
pub fn volume_figures(text: &str) -> Vec<Figure> {
    let mut out = Vec::new();
    let mut phases: Vec<String> = Vec::new();
    let mut raw: Vec<f64> = Vec::new();
    let cell = Regex::new(r"^([\d.]+)(?: \(([\d.]+)\))?$").expect("valid");
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("MiB/s (ratio)") {
            // Phase names hold single spaces; columns are right-aligned in 15 characters.
            phases = rest
                .split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect();
            continue;
        }
        if phases.is_empty() {
            continue;
        }
        // Rows: a name (may hold single spaces), then one cell per phase, cells separated by
        // runs of spaces.
        let cols: Vec<&str> = line
            .split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        if cols.len() != phases.len() + 1 {
            continue;
        }
        let values: Option<Vec<f64>> = cols[1..]
            .iter()
            .map(|c| cell.captures(c).and_then(|m| m[1].parse().ok()))
            .collect();
        let Some(values) = values else { continue };
        if cols[0] == "raw file" {
            raw = values;
            continue;
        }
        for (i, v) in values.iter().enumerate() {
            let mut f = Figure::new(
                "volume",
                &format!("{} {}", cols[0], phases[i]),
                *v,
                "MiB/s",
                Better::Higher,
            );
            if let Some(r) = raw.get(i) {
                f = f.peer("raw file", *r);
            }
            out.push(f);
        }
    }
    // Metadata commit cost by number of thin mappings (issue 18, part 1).
    let commit = Regex::new(
        r"^  one 4K allocating write\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+[\d.]+\s+([\d.]+)\s+([\d.]+)$",
    )
    .expect("valid");
    for c in text.lines().filter_map(|l| commit.captures(l)) {
        let n = &c[1];
        let get = |i: usize| c[i].parse::<f64>().unwrap_or(0.0);
        out.push(Figure::new(
            "volume",
            &format!("commit us, {n} mappings"),
            get(2),
            "us",
            Better::Lower,
        ));
        out.push(Figure::new(
            "volume",
            &format!("commit bytes, {n} mappings"),
            get(3),
            "bytes",
            Better::Lower,
        ));
        out.push(Figure::new(
            "volume",
            &format!("reopen s, {n} mappings"),
            get(4),
            "s",
            Better::Lower,
        ));
        out.push(Figure::new(
            "volume",
            &format!("mapping memory per million, {n} mappings"),
            get(5),
            "MiB",
            Better::Lower,
        ));
    }
    let snap = Regex::new(
        r"thin snapshot ([\d.]+) MiB/s; qcow2 overlay \(qemu-img bench\) ([\d.]+) MiB/s",
    )
    .expect("valid");
    if let Some(c) = snap.captures(text) {
        let ours: f64 = c[1].parse().unwrap_or(0.0);
        let qcow: f64 = c[2].parse().unwrap_or(0.0);
        out.push(
            Figure::new(
                "volume",
                "first 4K write after snapshot",
                ours,
                "MiB/s",
                Better::Higher,
            )
            .peer("qemu-img bench qcow2 overlay", qcow),
        );
    }
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn boot() -> Result<Vec<Figure>, String> {
    let mut figs = Vec::new();
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
        let m = bochs_bench(
            cpus,
            256,
            iso.clone(),
            root().join("target/bench/bochs"),
            Vec::new(),
        );
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
        figs.push(Figure::new(
            "boot",
            &format!("bochs {cpus} CPU reset to prompt"),
            ready as f64,
            "instructions",
            Better::Lower,
        ));
        figs.push(Figure::new(
            "boot",
            &format!("bochs {cpus} CPU hypervisor entry to prompt"),
            (ready - entry) as f64,
            "instructions",
            Better::Lower,
        ));
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
                    uefi: false,
                    kvm: false,
                    disks: Vec::new(),
                    nic: None,
                    com2: false,
                    tag: String::new(),
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
            figs.push(Figure::new(
                "boot",
                &format!("qemu {label} {cpus} CPU to prompt"),
                median(walls),
                "s",
                Better::Lower,
            ));
        }
    }
    Ok(figs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtqueue_output_gives_figures_with_the_peer() {
        let text = "virtqueue_bench: queue size 256, lockstep driver/device, one thread\n\
block 4KiB qd1  event_idx=true  hv-virtio    1234567 req/s  virtio-queue    1000000 req/s  ratio  1.23  notif/req hv-virtio 0.0100 (kicks 1 irqs 2) virtio-queue 1.0000\n";
        let f = virtqueue_figures(text);
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].name, "block 4KiB qd1 event_idx=true");
        assert_eq!(f[0].value, 1_234_567.0);
        assert_eq!(f[0].peer_value, Some(1_000_000.0));
        assert_eq!(f[1].value, 0.01);
        assert_eq!(f[1].peer_value, Some(1.0));
    }

    #[test]
    fn callgrind_total_is_read() {
        assert_eq!(
            callgrind_refs("==1== Collected : 5\n==30200== I   refs:      166,925,955\n"),
            Some(166_925_955)
        );
        assert_eq!(callgrind_refs("valgrind: not found"), None);
    }

    #[test]
    fn sched_output_gives_figures() {
        let f = sched_figures(
            "decision 8 CPU(s) x 1000 runnable vCPUs:    244.2 ns  (x1.07 of 10 per CPU)\n\
sim 1:2:4, 2 CPUs: worst window error 2.00 % of entitlement, 6.86 ms of CPU, 0.86 slices per vCPU (slice 4.0 ms)\n\
sim 16 sleepers: wake-to-run p50 0.0 us, p99 363.6 us, max 600.0 us over 33773 wake-ups\n",
        );
        assert_eq!(f.len(), 7, "{f:?}");
        assert_eq!(f[0].name, "decision, 8 CPU(s) x 1000 vCPUs");
        assert_eq!(f[0].value, 244.2);
        assert_eq!(f[1].name, "sim 1:2:4, 2 CPUs, share error");
        assert_eq!(f[2].value, 6.86);
        assert_eq!(f[3].value, 0.86);
        assert_eq!(f[5].name, "sim 16 sleepers, wake-to-run p99");
        assert_eq!(f[5].value, 363.6);
    }

    #[test]
    fn volume_table_gives_figures_against_the_raw_file() {
        let text = "volume bench: 256 MiB per target\n\
MiB/s (ratio)            4K rand W       4K rand R        1M seq W        1M seq R\n\
  raw file                   100             200            300            400\n\
striped 2x64K          90 (0.90)      180 (0.90)     300 (1.00)     200 (0.50)\n\
first 4K write after snapshot (10 writes): thin snapshot 55.5 MiB/s; qcow2 overlay (qemu-img bench) 11.1 MiB/s; ratio 5.00\n";
        let f = volume_figures(text);
        assert_eq!(f.len(), 5, "{f:?}");
        assert_eq!(f[0].name, "striped 2x64K 4K rand W");
        assert_eq!(f[0].value, 90.0);
        assert_eq!(f[0].peer_value, Some(100.0));
        assert_eq!(f[3].peer_value, Some(400.0));
        assert_eq!(f[4].value, 55.5);
        assert_eq!(f[4].peer_value, Some(11.1));
    }
}
