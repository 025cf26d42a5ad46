//! `cargo xtask fuzz [TARGET|all] [SECONDS] [--runs N]`: runs the coverage-guided fuzz targets
//! with `cargo fuzz` on the pinned stable toolchain (`--sanitizer none`; the sanitizer build
//! needs nightly), each for SECONDS (default 60) or N executions, and prints how many
//! executions each ran. The same target functions replay their seed corpus plus mutations and
//! pseudo-random inputs in `cargo test`, so CI exercises them without cargo-fuzz.

use std::process::{Command, Stdio};

use crate::root;

/// (crate folder, target name); the seed corpus is `fuzz/corpus/TARGET` in the crate folder.
pub const TARGETS: &[(&str, &str)] = &[
    ("hypervisor/virtio", "virtio_transport"),
    ("hypervisor", "mmio_decode"),
    ("hypervisor", "page_walk"),
    ("hypervisor", "elf_loader"),
    ("hypervisor", "hypercall"),
    ("hypervisor", "domain_line"),
    ("hypervisor", "console"),
    ("hypervisor", "guest_io"),
    ("hypervisor", "block_ring"),
    ("hypervisor", "switch"),
    ("dom0-agent/volume", "metadata"),
    ("dom0-agent/hvctl", "nbd"),
];

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    pub targets: Vec<(&'static str, &'static str)>,
    pub seconds: Option<u64>,
    pub runs: Option<u64>,
}

pub fn parse(args: &[String]) -> Result<Plan, String> {
    let mut targets = None;
    let mut seconds = None;
    let mut runs = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--runs" {
            let n = it
                .next()
                .ok_or("fuzz: --runs needs a number of executions")?;
            runs = Some(
                n.parse()
                    .map_err(|_| format!("fuzz: --runs {n}: not a number"))?,
            );
        } else if let Ok(s) = a.parse::<u64>() {
            seconds = Some(s);
        } else if a == "all" {
            targets = Some(TARGETS.to_vec());
        } else if let Some(t) = TARGETS.iter().find(|t| t.1 == a.as_str()) {
            targets.get_or_insert_with(Vec::new).push(*t);
        } else {
            let names: Vec<&str> = TARGETS.iter().map(|t| t.1).collect();
            return Err(format!(
                "fuzz: '{a}' is neither a target ({}, all) nor a number of seconds",
                names.join(", ")
            ));
        }
    }
    Ok(Plan {
        targets: targets.unwrap_or_else(|| TARGETS.to_vec()),
        seconds: if runs.is_some() {
            seconds
        } else {
            Some(seconds.unwrap_or(60))
        },
        runs,
    })
}

/// libFuzzer's closing line: `Done N runs in S second(s)`.
pub fn executions(output: &str) -> Option<(u64, u64)> {
    let line = output.lines().rev().find(|l| l.starts_with("Done "))?;
    let mut w = line.split_whitespace();
    let runs = w.nth(1)?.parse().ok()?;
    let secs = w.nth(2)?.parse().ok()?;
    Some((runs, secs))
}

pub fn run(args: &[String]) -> Result<(), String> {
    let plan = parse(args)?;
    let have = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        eprintln!("xtask: installing cargo-fuzz (cargo install cargo-fuzz --locked)");
        crate::run_checked(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let mut summary = Vec::new();
    for (dir, target) in &plan.targets {
        // New inputs go to a scratch corpus under target/, never into the committed seeds.
        let scratch = root().join("target").join("fuzz-corpus").join(target);
        std::fs::create_dir_all(&scratch).map_err(|e| e.to_string())?;
        eprintln!("xtask: fuzzing {target}");
        let mut cmd = Command::new("cargo");
        cmd.current_dir(root().join(dir))
            .args(["fuzz", "run", target, "--sanitizer", "none"])
            .arg(&scratch)
            .arg(format!("fuzz/corpus/{target}"))
            .arg("--");
        if let Some(s) = plan.seconds {
            cmd.arg(format!("-max_total_time={s}"));
        }
        if let Some(n) = plan.runs {
            cmd.arg(format!("-runs={n}"));
        }
        let out = cmd
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| format!("cargo fuzz: {e}"))?;
        let text = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = text.lines().rev().take(12).collect();
        for l in tail.iter().rev() {
            eprintln!("{l}");
        }
        if !out.status.success() {
            // The panic's message and the saved input, which the tail may have scrolled past.
            let lines: Vec<&str> = text.lines().collect();
            for (i, l) in lines.iter().enumerate() {
                if l.contains("panicked at") || l.contains("Test unit written") {
                    for m in &lines[i..(i + 4).min(lines.len())] {
                        eprintln!("{m}");
                    }
                }
            }
            return Err(format!(
                "fuzz: {target} failed ({}); the input that failed is named above",
                out.status
            ));
        }
        let (runs, secs) = executions(&text).unwrap_or((0, 0));
        summary.push(format!(
            "{target}: {runs} executions in {secs} s, no failure"
        ));
    }
    for s in summary {
        println!("{s}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn command_lines() {
        let p = parse(&[]).unwrap();
        assert_eq!(
            (p.targets.len(), p.seconds, p.runs),
            (TARGETS.len(), Some(60), None)
        );
        let p = parse(&s(&["hypercall", "30"])).unwrap();
        assert_eq!(p.targets, vec![("hypervisor", "hypercall")]);
        assert_eq!(p.seconds, Some(30));
        let p = parse(&s(&["page_walk", "--runs", "10000000"])).unwrap();
        assert_eq!((p.seconds, p.runs), (None, Some(10_000_000)));
        assert!(
            parse(&s(&["nosuch"]))
                .unwrap_err()
                .contains("neither a target")
        );
        assert!(parse(&s(&["--runs"])).is_err());
    }

    #[test]
    fn libfuzzer_totals_are_read() {
        let out = "#1000 DONE cov: 10\nDone 10000001 runs in 37 second(s)\n";
        assert_eq!(executions(out), Some((10_000_001, 37)));
        assert_eq!(executions("crash"), None);
    }
}
