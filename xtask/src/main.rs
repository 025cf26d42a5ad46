//! `cargo xtask`: builds every image, makes the GRUB ISO, runs QEMU or Bochs with the serial
//! console on the terminal, runs every test (host unit tests, lint, emulator scenarios) and the
//! benchmarks. Host-only; it is the only place that knows how the pieces are put together.

mod bench;
mod build;
mod deps;
mod emu;
mod fuzz;
mod history;
mod layers;
mod linux;
mod scenario;
mod test;

use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <command> [options]

commands:
  build                  build the hypervisor for x86_64-unknown-none (release)
  image [--append TEXT] [--module FILE[:ARGS]] [--guest NAME_OR_FILE[:ARGS]]...
                         build, then make target/hypervisor.iso (GRUB, BIOS and UEFI where
                         grub-efi-amd64-bin is installed)
  run [--bochs|--qemu|--kvm] [--smp N] [--mem MIB] [--append TEXT] [--guest NAME_OR_FILE[:ARGS]]...
                         boot the ISO on the machine that can run guests (QEMU+KVM with nested
                         VMX, else Bochs tigerlake; one line says which) with the default
                         domains (hello, ticker) unless --guest/--module is given; the serial
                         console is this terminal (Ctrl-] quits); with stdin not a terminal,
                         each input line is sent at the prompt and the run ends after the last;
                         --guest boots a test guest (hello, memcheck, hypercall_bench, hostile,
                         spinner) or any ELF64 guest as a domain, e.g. --guest hello:name=hi -- x
  test [--quick] [--filter TEXT] [--kvm]
                         host unit tests, clippy and rustfmt checks, then every scenario in
                         tests/scenarios; ends with 'N passed, N failed'
  bench boot             instructions to the console prompt in Bochs, wall time in QEMU
  bench vmcall           instructions per VMCALL round trip in Bochs, VMREADs/VMWRITEs per exit
  bench virtqueue [--quick]
                         virtqueue requests/s and notifications/request, against rust-vmm's
                         virtio-queue in the same run
  bench volume           volume manager I/O on /dev/shm files against raw files and qemu-img
                         bench (raw and qcow2 overlay) in the same run
  bench sched [--quick]  the scheduler policy's cost per decision, 10/100/1,000 vCPUs per CPU
  bench all              every benchmark, then one summary table (results: target/bench/)
  fuzz [TARGET|all] [SECONDS] [--runs N]
                         coverage-guided fuzzing of what guests and operators hand us: virtio,
                         the MMIO decoder, the page walk, the ELF loader, hypercalls, domain
                         lines (cargo-fuzz, installed if missing; default all, 60 s each)
  deps                   check (and as root install) the Debian packages the commands need
  linux [cloud|generic]  download Debian 12's kernel (both flavours unless one is named) and
                         busybox-static without installing them, build an initramfs for it,
                         and print the paths (cached in target/linux/; as scenario modules:
                         linux-cloud, linux-cloud-initrd, linux-generic, linux-generic-initrd)
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        eprint!("{USAGE}");
        return ExitCode::from(2);
    };
    let rest = &args[1..];
    let result = match cmd.as_str() {
        "build" => build::build_kernel().map(|p| println!("{}", p.display())),
        "image" => build::ImageOptions::parse(rest)
            .and_then(|o| build::image(&o))
            .map(|p| println!("{}", p.display())),
        "run" => emu::run_command(rest),
        "test" => test::run(rest),
        "bench" => bench::run(rest),
        "fuzz" => fuzz::run(rest),
        "deps" => deps::ensure(&deps::ALL),
        "linux" => linux::run(rest),
        "help" | "--help" | "-h" => {
            print!("{USAGE}");
            Ok(())
        }
        other => Err(format!("unknown command '{other}'\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

/// Runs a command, failing with its name if it cannot start or exits non-zero.
pub fn run_checked(cmd: &mut std::process::Command) -> Result<(), String> {
    let status = cmd
        .status()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{:?} failed: {status}", cmd))
    }
}
