//! The Debian packages the commands need: checked by the files they install, installed with
//! apt-get when running as root, otherwise the exact command to run is printed.

use std::path::Path;
use std::process::Command;

/// A needed file and the package that provides it.
pub struct Need {
    pub path: &'static str,
    pub package: &'static str,
}

pub const QEMU: &[Need] = &[
    Need {
        path: "/usr/bin/qemu-system-x86_64",
        package: "qemu-system-x86",
    },
    Need {
        path: "/usr/share/seabios/bios-256k.bin",
        package: "seabios",
    },
];
pub const BOCHS: &[Need] = &[
    Need {
        path: "/usr/bin/bochs",
        package: "bochs",
    },
    Need {
        path: "/usr/share/bochs/BIOS-bochs-latest",
        package: "bochsbios",
    },
    Need {
        path: "/usr/share/vgabios/vgabios.bin",
        package: "vgabios",
    },
    Need {
        path: "/usr/lib/x86_64-linux-gnu/bochs/plugins/libbx_sdl2_gui.so",
        package: "bochs-sdl",
    },
];
pub const ISO: &[Need] = &[
    Need {
        path: "/usr/bin/grub-mkrescue",
        package: "grub-common",
    },
    Need {
        path: "/usr/lib/grub/i386-pc/multiboot2.mod",
        package: "grub-pc-bin",
    },
    Need {
        path: "/usr/bin/xorriso",
        package: "xorriso",
    },
    Need {
        path: "/usr/bin/mformat",
        package: "mtools",
    },
];
/// qemu-io and qemu-img: the outside client of the volume manager's NBD test and the peer of
/// its benchmark.
pub const QEMU_UTILS: &[Need] = &[
    Need {
        path: "/usr/bin/qemu-io",
        package: "qemu-utils",
    },
    Need {
        path: "/usr/bin/qemu-img",
        package: "qemu-utils",
    },
];
pub const ALL: [&[Need]; 4] = [QEMU, BOCHS, ISO, QEMU_UTILS];

/// Makes sure every need in `groups` is met.
pub fn ensure(groups: &[&[Need]]) -> Result<(), String> {
    let mut missing: Vec<&str> = groups
        .iter()
        .flat_map(|g| g.iter())
        .filter(|n| !Path::new(n.path).exists())
        .map(|n| n.package)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false);
    if !is_root {
        return Err(format!(
            "missing Debian packages: {list}\ninstall them with:\n  sudo apt-get update && sudo apt-get install -y {list}"
        ));
    }
    eprintln!("xtask: installing Debian packages: {list}");
    crate::run_checked(Command::new("apt-get").args(["update", "-qq"]))?;
    crate::run_checked(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing),
    )?;
    let still: Vec<&str> = groups
        .iter()
        .flat_map(|g| g.iter())
        .filter(|n| !Path::new(n.path).exists())
        .map(|n| n.path)
        .collect();
    if still.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "installed {list}, but still missing: {}",
            still.join(", ")
        ))
    }
}
