//! Building the hypervisor image and the GRUB ISO.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{deps, linux, root, run_checked};

pub const TARGET: &str = "x86_64-unknown-none";

/// Makes sure the toolchain has the bare-metal target: `rust-toolchain.toml` lists it, but
/// rustup adds listed targets only when it installs the toolchain, so a machine that already had
/// that toolchain lacks it.
pub fn ensure_target() -> Result<(), String> {
    let sysroot = Command::new("rustc")
        .current_dir(root())
        .args(["--print", "sysroot"])
        .output()
        .map_err(|e| format!("cannot start rustc: {e}"))?;
    let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_string();
    if Path::new(&sysroot)
        .join("lib/rustlib")
        .join(TARGET)
        .is_dir()
    {
        return Ok(());
    }
    eprintln!("xtask: adding the {TARGET} target to the toolchain (rustup target add {TARGET})");
    run_checked(
        Command::new("rustup")
            .current_dir(root())
            .args(["target", "add", TARGET]),
    )
    .map_err(|e| format!("{e}\nthe hypervisor needs it: run `rustup target add {TARGET}`"))
}

/// Builds `package` in release mode for bare metal (the target installed first if missing).
fn build_release(package: &str) -> Result<(), String> {
    ensure_target()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run_checked(Command::new(cargo).current_dir(root()).args([
        "build",
        "--quiet",
        "--release",
        "-p",
        package,
        "--target",
        TARGET,
    ]))
}

/// Builds the hypervisor (release) and returns the ELF's path.
pub fn build_kernel() -> Result<PathBuf, String> {
    build_release("hypervisor")?;
    Ok(root()
        .join("target")
        .join(TARGET)
        .join("release")
        .join("hypervisor"))
}

/// Builds the admin CLI `hvctl` for this host (debug) and returns its executable.
pub fn build_hvctl() -> Result<PathBuf, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run_checked(
        Command::new(cargo)
            .current_dir(root())
            .args(["build", "--quiet", "-p", "hvctl"]),
    )?;
    Ok(root().join("target").join("debug").join("hvctl"))
}

/// The test guests in `tests/guests` (built for bare metal).
pub const TEST_GUESTS: &[&str] = &[
    "hello",
    "memcheck",
    "hypercall_bench",
    "hostile",
    "spinner",
    "smp",
    "ticker",
    "fpu",
    "worker",
    "blkcheck",
    "blkhostile",
    "blkbench",
    "netcheck",
];

/// Builds the test guests (release) and returns the folder holding their ELF files.
pub fn build_guests() -> Result<PathBuf, String> {
    build_release("test-guests")?;
    Ok(root().join("target").join(TARGET).join("release"))
}

/// Builds dom0 (release, bare metal) and returns its ELF file.
pub fn build_dom0() -> Result<PathBuf, String> {
    build_release("dom0")?;
    Ok(root()
        .join("target")
        .join(TARGET)
        .join("release")
        .join("dom0"))
}

/// A boot module given as `NAME_OR_FILE[:ARGS]`: a test guest's name (built on demand), a
/// Debian kernel (`linux-cloud`, `linux-generic`: the bzImage) or its initramfs
/// (`linux-cloud-initrd`, `linux-generic-initrd`), fetched on demand (see `linux.rs`), or a
/// path to any ELF64 guest kernel. ARGS is the module line (`name=.. mem=.. -- guest args`);
/// without it the guest is named after the file (an initramfs needs ARGS).
pub fn guest_module(spec: &str) -> Result<(PathBuf, String), String> {
    let (what, args) = spec.split_once(':').unwrap_or((spec, ""));
    if let Some(module) = linux_module(what, args)? {
        return Ok(module);
    }
    let builtin = what.replace('-', "_");
    let path = if TEST_GUESTS.contains(&builtin.as_str()) {
        build_guests()?.join(&builtin)
    } else if builtin == "dom0" {
        build_dom0()?
    } else {
        PathBuf::from(what)
    };
    if !path.is_file() {
        return Err(format!(
            "guest '{what}' is neither a test guest ({}) nor a readable file",
            TEST_GUESTS.join(", ")
        ));
    }
    let args = if args.is_empty() {
        format!(
            "name={}",
            path.file_stem().unwrap_or_default().to_string_lossy()
        )
    } else {
        args.to_string()
    };
    Ok((path, args))
}

/// `linux-FLAVOUR` and `linux-FLAVOUR-initrd` as boot modules; `None` for other names.
fn linux_module(what: &str, args: &str) -> Result<Option<(PathBuf, String)>, String> {
    let Some(rest) = what.strip_prefix("linux-") else {
        return Ok(None);
    };
    let (flavour, initrd) = match rest.strip_suffix("-initrd") {
        Some(f) => (f, true),
        None => (rest, false),
    };
    let Some(flavour) = linux::Flavour::parse(flavour) else {
        return Ok(None);
    };
    let l = linux::prepare(flavour)?;
    let args = match (args.is_empty(), initrd) {
        (false, _) => args.to_string(),
        (true, false) => format!("name={what}"),
        (true, true) => {
            return Err(format!(
                "{what} needs a module line, e.g. {what}:role=initrd for=NAME"
            ));
        }
    };
    let path = if initrd {
        l.initramfs
    } else {
        l.kernel.bzimage
    };
    Ok(Some((path, args)))
}

/// What goes into an ISO beside the hypervisor.
#[derive(Clone, Debug, Default)]
pub struct ImageOptions {
    /// The hypervisor's command line.
    pub append: String,
    /// Boot modules: a file and the module's command line.
    pub modules: Vec<(PathBuf, String)>,
}

impl ImageOptions {
    /// Parses `--append TEXT` and `--module FILE[:ARGS]`; other arguments are errors.
    pub fn parse(args: &[String]) -> Result<Self, String> {
        let mut o = ImageOptions::default();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--append" => o.append = it.next().ok_or("--append needs a value")?.clone(),
                "--module" => o.modules.push(parse_module(
                    it.next().ok_or("--module needs FILE[:ARGS]")?,
                )?),
                "--guest" => o.modules.push(guest_module(
                    it.next().ok_or("--guest needs NAME_OR_FILE[:ARGS]")?,
                )?),
                other => return Err(format!("image: unknown option '{other}'")),
            }
        }
        Ok(o)
    }
}

pub fn parse_module(spec: &str) -> Result<(PathBuf, String), String> {
    let (file, args) = spec.split_once(':').unwrap_or((spec, ""));
    let path = PathBuf::from(file);
    if !path.is_file() {
        return Err(format!("module '{file}' is not a readable file"));
    }
    Ok((path, args.to_string()))
}

/// The GRUB menu: the hypervisor with its command line, and one `module2` line per module.
pub fn grub_cfg(append: &str, modules: &[String]) -> String {
    let mut cfg = String::from("set timeout=0\nset default=0\nmenuentry \"hypervisor\" {\n");
    cfg.push_str(&format!("    multiboot2 /boot/hypervisor.elf {append}\n"));
    for (i, args) in modules.iter().enumerate() {
        cfg.push_str(&format!("    module2 /boot/module{i} {args}\n"));
    }
    cfg.push_str("    boot\n}\n");
    cfg
}

/// Builds the hypervisor and a GRUB ISO holding it; returns the ISO's path.
pub fn image(o: &ImageOptions) -> Result<PathBuf, String> {
    image_named(o, "hypervisor")
}

/// As [`image`], with a name for the ISO and its staging folder (scenarios run in parallel).
pub fn image_named(o: &ImageOptions, name: &str) -> Result<PathBuf, String> {
    deps::ensure(&[deps::ISO])?;
    let elf = build_kernel()?;
    let dir = root().join("target").join("iso").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("boot/grub")).map_err(|e| e.to_string())?;
    copy(&elf, &dir.join("boot/hypervisor.elf"))?;
    for (i, (file, _)) in o.modules.iter().enumerate() {
        copy(file, &dir.join(format!("boot/module{i}")))?;
    }
    let args: Vec<String> = o.modules.iter().map(|m| m.1.clone()).collect();
    std::fs::write(dir.join("boot/grub/grub.cfg"), grub_cfg(&o.append, &args))
        .map_err(|e| e.to_string())?;
    mkrescue(&dir, name)
}

/// A GRUB ISO that boots a Linux bzImage directly (no hypervisor) with `initrd` and `cmdline`:
/// the bare-metal peer of `bench linux`.
pub fn linux_iso(
    bzimage: &Path,
    initrd: &Path,
    cmdline: &str,
    name: &str,
) -> Result<PathBuf, String> {
    deps::ensure(&[deps::ISO])?;
    let dir = root().join("target").join("iso").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("boot/grub")).map_err(|e| e.to_string())?;
    copy(bzimage, &dir.join("boot/vmlinuz"))?;
    copy(initrd, &dir.join("boot/initrd"))?;
    let cfg = format!(
        "set timeout=0\nset default=0\nmenuentry \"linux\" {{\n    linux /boot/vmlinuz {cmdline}\n    initrd /boot/initrd\n    boot\n}}\n"
    );
    std::fs::write(dir.join("boot/grub/grub.cfg"), cfg).map_err(|e| e.to_string())?;
    mkrescue(&dir, name)
}

/// `target/NAME.iso` from the staging folder `dir` (GRUB and its `boot/grub/grub.cfg`).
fn mkrescue(dir: &Path, name: &str) -> Result<PathBuf, String> {
    let iso = root().join("target").join(format!("{name}.iso"));
    let out = Command::new("grub-mkrescue")
        .arg("-o")
        .arg(&iso)
        .arg(dir)
        .output()
        .map_err(|e| format!("cannot start grub-mkrescue: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "grub-mkrescue failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(iso)
}

fn copy(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| format!("copy {} -> {}: {e}", from.display(), to.display()))
}

/// The loadable segments of an ELF64 image that are both writable and executable (W^X check of
/// the hypervisor image): `(virtual address, size)` of each; an error for a file that is not an
/// ELF64 little-endian image.
pub fn writable_and_executable(elf: &[u8]) -> Result<Vec<(u64, u64)>, String> {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    if elf.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        return Err("not an ELF64 little-endian file".into());
    }
    let phoff = usize::try_from(u64_at(0x20).ok_or("truncated header")?)
        .map_err(|_| "program header offset too large")?;
    let phentsize = usize::from(u16_at(0x36).ok_or("truncated header")?);
    let phnum = usize::from(u16_at(0x38).ok_or("truncated header")?);
    let mut out = Vec::new();
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let kind = u32_at(ph).ok_or("truncated program header")?;
        let flags = u32_at(ph + 4).ok_or("truncated program header")?;
        if kind == 1 && flags & 1 != 0 && flags & 2 != 0 {
            let vaddr = u64_at(ph + 0x10).ok_or("truncated program header")?;
            let memsz = u64_at(ph + 0x28).ok_or("truncated program header")?;
            out.push((vaddr, memsz));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 header with the given (type, flags) program headers.
    fn elf(segments: &[(u32, u32)]) -> Vec<u8> {
        let mut e = vec![0u8; 64 + 56 * segments.len()];
        e[..6].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1]);
        e[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        e[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        let n = u16::try_from(segments.len()).expect("few segments");
        e[0x38..0x3a].copy_from_slice(&n.to_le_bytes());
        for (i, (kind, flags)) in segments.iter().enumerate() {
            let ph = 64 + 56 * i;
            e[ph..ph + 4].copy_from_slice(&kind.to_le_bytes());
            e[ph + 4..ph + 8].copy_from_slice(&flags.to_le_bytes());
            e[ph + 0x10..ph + 0x18].copy_from_slice(&(0x10_0000u64 * (i as u64 + 1)).to_le_bytes());
            e[ph + 0x28..ph + 0x30].copy_from_slice(&0x1000u64.to_le_bytes());
        }
        e
    }

    #[test]
    fn w_and_x_segments_are_found() {
        // R+X text, R rodata, R+W data: clean.
        assert_eq!(
            writable_and_executable(&elf(&[(1, 5), (1, 4), (1, 6)])),
            Ok(vec![])
        );
        // An RWX load segment is reported; a non-load RWX header (e.g. GNU_STACK) is not.
        assert_eq!(
            writable_and_executable(&elf(&[(1, 5), (1, 7), (0x6474_e551, 7)])),
            Ok(vec![(0x20_0000, 0x1000)])
        );
        assert!(writable_and_executable(b"not an elf").is_err());
    }
}
