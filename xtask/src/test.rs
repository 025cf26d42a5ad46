//! `cargo xtask test`: every test there is, with one closing line `N passed, N failed`.
//!
//! 1. host unit tests of the whole workspace (`cargo test`), counted per test;
//! 2. checks: rustfmt, clippy (host and `x86_64-unknown-none`, `-D warnings`), and the
//!    bare-metal build of every `no_std` crate;
//! 3. every scenario in `tests/scenarios`, booted in QEMU or Bochs.

use std::process::{Command, Stdio};
use std::time::Instant;

use crate::{build, deps, emu, root, scenario};

#[derive(Default)]
struct Tally {
    passed: usize,
    failed: usize,
    failures: Vec<String>,
}

impl Tally {
    fn record(&mut self, name: &str, ok: bool, detail: &str) {
        if ok {
            self.passed += 1;
        } else {
            self.failed += 1;
            self.failures.push(format!("{name}: {detail}"));
        }
    }
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

/// The `no_std` crates that must also build (and lint) for bare metal.
const BARE_METAL: &[&str] = &[
    "hypervisor",
    "bootloader",
    "hv-abi",
    "test-guests",
    "hv-virtio",
    "hv-guest-mem",
    "pv-drivers",
    "volmgr",
];

pub fn run(args: &[String]) -> Result<(), String> {
    let mut quick = false;
    let mut kvm = false;
    let mut filter: Option<String> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--filter" => filter = Some(it.next().ok_or("--filter needs a value")?.clone()),
            "--kvm" => kvm = true,
            other => return Err(format!("test: unknown option '{other}'")),
        }
    }
    let t0 = Instant::now();
    deps::ensure(&deps::ALL)?;
    build::ensure_target()?;
    if !quick {
        ensure_components()?;
    }
    let mut tally = Tally::default();

    if filter.is_none() {
        eprintln!("==> host unit tests");
        unit_tests(&mut tally)?;
        if !quick {
            eprintln!("==> checks");
            check(
                &mut tally,
                "rustfmt",
                cargo().args(["fmt", "--all", "--", "--check"]),
            );
            check(
                &mut tally,
                "clippy (host)",
                cargo().args([
                    "clippy",
                    "--quiet",
                    "--workspace",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ]),
            );
            let mut c = cargo();
            c.args(["clippy", "--quiet", "--target", build::TARGET]);
            for p in BARE_METAL {
                c.args(["-p", p]);
            }
            c.args(["--", "-D", "warnings"]);
            check(&mut tally, "clippy (x86_64-unknown-none)", &mut c);
        }
    }

    eprintln!("==> scenarios");
    let elf = build::build_kernel()?;
    if filter.is_none() {
        // Host hardening: no segment of the hypervisor image is both writable and executable.
        let bytes = std::fs::read(&elf).map_err(|e| format!("{}: {e}", elf.display()))?;
        let (ok, detail) = match build::writable_and_executable(&bytes) {
            Ok(v) if v.is_empty() => (true, String::new()),
            Ok(v) => (false, format!("writable and executable segments: {v:x?}")),
            Err(e) => (false, e),
        };
        println!(
            "check    {:<28} {}",
            "image W^X (segments)",
            if ok { "ok" } else { "FAILED" }
        );
        tally.record("check image W^X", ok, &detail);
    }
    for s in scenario::load_all()? {
        if filter
            .as_ref()
            .is_some_and(|f| !s.name.contains(f.as_str()))
        {
            continue;
        }
        run_scenario(&mut tally, &s, scenario::On::Named);
    }

    // The Bochs scenarios again on real VT-x: QEMU with KVM (nested), `-cpu host`.
    let probe = emu::KvmProbe::here();
    match (kvm, probe.missing()) {
        (false, None) => println!(
            "kvm: this machine can run the Bochs scenarios on QEMU with KVM too: cargo xtask test --kvm"
        ),
        (false, Some(why)) => println!("kvm: Bochs scenarios not rerun on QEMU with KVM: {why}"),
        (true, Some(why)) => {
            println!("kvm: --kvm asked, but QEMU with KVM cannot run guests here: {why}");
            tally.record("kvm", false, why);
        }
        (true, None) => {
            for s in scenario::load_all()? {
                if s.via_xtask_run() || s.emulator()? != emu::Emulator::Bochs {
                    continue;
                }
                if filter
                    .as_ref()
                    .is_some_and(|f| !s.name.contains(f.as_str()))
                {
                    continue;
                }
                run_scenario(&mut tally, &s, scenario::On::Kvm);
            }
        }
    }

    println!();
    if !tally.failures.is_empty() {
        println!("failures:");
        for f in &tally.failures {
            println!("  {f}");
        }
    }
    println!("total time {:.0} s", t0.elapsed().as_secs_f64());
    println!("{} passed, {} failed", tally.passed, tally.failed);
    if tally.failed == 0 {
        Ok(())
    } else {
        Err(format!("{} failed", tally.failed))
    }
}

/// Runs one scenario on `on`, prints its line (and its failure) and counts it.
fn run_scenario(tally: &mut Tally, s: &scenario::Scenario, on: scenario::On) {
    let o = scenario::run_on(s, on);
    let (kind, about) = match on {
        scenario::On::Named => ("scenario", s.description.clone()),
        scenario::On::Kvm => ("kvm", String::from("on QEMU with KVM, -cpu host")),
    };
    println!(
        "{kind:<8} {:<28} {} in {:>5.1} s  ({about})",
        s.name,
        if o.passed { "ok    " } else { "FAILED" },
        o.seconds,
    );
    if !o.passed {
        println!(
            "  {}\n  serial log: {}",
            o.detail.replace('\n', "\n  "),
            o.log.display()
        );
    }
    tally.record(
        &format!("{kind} {}", s.name),
        o.passed,
        o.detail.lines().next().unwrap_or(""),
    );
}

fn check(tally: &mut Tally, name: &str, cmd: &mut Command) {
    let t = Instant::now();
    let out = cmd.stdin(Stdio::null()).output();
    let (ok, detail) = match out {
        Ok(o) => (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).into_owned() + &String::from_utf8_lossy(&o.stdout),
        ),
        Err(e) => (false, e.to_string()),
    };
    println!(
        "check    {name:<28} {} in {:>5.1} s",
        if ok { "ok    " } else { "FAILED" },
        t.elapsed().as_secs_f64()
    );
    if !ok {
        println!("  {}", detail.trim_end().replace('\n', "\n  "));
    }
    tally.record(
        &format!("check {name}"),
        ok,
        detail.lines().next().unwrap_or(""),
    );
}

/// Runs `cargo test --workspace` and counts each test by the harness's result lines.
/// clippy and rustfmt, which `rust-toolchain.toml` lists but rustup adds only when it installs
/// the toolchain.
fn ensure_components() -> Result<(), String> {
    let have = |tool: &str| {
        cargo()
            .args([tool, "--version"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if have("clippy") && have("fmt") {
        return Ok(());
    }
    eprintln!("xtask: adding clippy and rustfmt to the toolchain");
    crate::run_checked(Command::new("rustup").current_dir(root()).args([
        "component",
        "add",
        "clippy",
        "rustfmt",
    ]))
}

fn unit_tests(tally: &mut Tally) -> Result<(), String> {
    let out = cargo()
        .args(["test", "--workspace", "--no-fail-fast"])
        // qemu-io is installed by `deps`: the volume manager's NBD system test must run.
        .env("HV_REQUIRE_QEMU_IO", "1")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run cargo test: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    print!("{text}");
    let (mut passed, mut failed) = (0usize, 0usize);
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split([';', '.']) {
                let part = part.trim();
                if let Some(n) = part.strip_suffix(" passed") {
                    passed += n.trim().parse::<usize>().unwrap_or(0);
                } else if let Some(n) = part.strip_suffix(" failed") {
                    failed += n.trim().parse::<usize>().unwrap_or(0);
                }
            }
        }
    }
    if !out.status.success() && failed == 0 {
        // A build error: no test ran, which is a failure of its own.
        tally.record(
            "unit tests",
            false,
            "cargo test failed before running tests (build error?)",
        );
    }
    tally.passed += passed;
    tally.failed += failed;
    for line in text
        .lines()
        .filter(|l| l.starts_with("test ") && l.ends_with("FAILED"))
    {
        tally.failures.push(line.to_string());
    }
    println!("unit     {passed} passed, {failed} failed");
    Ok(())
}
