//! `cargo xtask fuzz [SECONDS]`: runs the coverage-guided fuzz targets with `cargo fuzz` on the
//! pinned stable toolchain (`--sanitizer none`; the sanitizer build needs nightly). The same
//! target functions replay their seed corpus plus pseudo-random inputs in `cargo test`, so CI
//! exercises them without cargo-fuzz.

use std::process::Command;

use crate::{root, run_checked};

/// (crate folder, target name, seed corpus inside the fuzz folder)
const TARGETS: &[(&str, &str)] = &[
    ("hypervisor/virtio", "virtio_transport"),
    ("hypervisor", "mmio_decode"),
];

pub fn run(args: &[String]) -> Result<(), String> {
    let secs: u64 = match args.first() {
        None => 60,
        Some(s) => s
            .parse()
            .map_err(|_| format!("fuzz: '{s}' is not a number of seconds"))?,
    };
    let have = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        eprintln!("xtask: installing cargo-fuzz (cargo install cargo-fuzz --locked)");
        run_checked(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    for (dir, target) in TARGETS {
        // New inputs go to a scratch corpus under target/, never into the committed seeds.
        let scratch = root().join("target").join("fuzz-corpus").join(target);
        std::fs::create_dir_all(&scratch).map_err(|e| e.to_string())?;
        eprintln!("xtask: fuzzing {target} for {secs} s");
        run_checked(
            Command::new("cargo")
                .current_dir(root().join(dir))
                .args(["fuzz", "run", target, "--sanitizer", "none"])
                .arg(&scratch)
                .arg(format!("fuzz/corpus/{target}"))
                .arg("--")
                .arg(format!("-max_total_time={secs}")),
        )?;
    }
    Ok(())
}
