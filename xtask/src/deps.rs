//! The Debian packages the commands need: checked by the files they install, installed with
//! apt-get when running as root, otherwise the exact command to run is printed.
//!
//! An install can take away what was there before: on a Debian 12 machine with a newer
//! `qemu-utils` from backports, installing Debian 12's `qemu-system-x86` removes it (their
//! `qemu-block-extra` versions conflict) and installs nothing in its place. So the files are
//! checked again after every install, and whatever went missing is installed again together with
//! everything asked for before, all at the release's own versions (`PACKAGE/CODENAME`, downgrades
//! allowed), which is one consistent set. [`plan`] is that decision, pure and host-tested.

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
        path: "/usr/lib/grub/x86_64-efi/multiboot2.mod",
        package: "grub-efi-amd64-bin",
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
/// UEFI firmware for QEMU (the UEFI boot scenario).
pub const UEFI: &[Need] = &[Need {
    path: OVMF_CODE,
    package: "ovmf",
}];
/// OVMF's code image in Debian 12's `ovmf` (4 MiB flash layout).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// OVMF's variable store template, copied per run.
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
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
/// Valgrind's instruction counter (callgrind), for `bench sched`'s instructions per decision;
/// not needed by the tests.
pub const VALGRIND: &[Need] = &[Need {
    path: "/usr/bin/valgrind",
    package: "valgrind",
}];
pub const ALL: [&[Need]; 5] = [QEMU, BOCHS, ISO, UEFI, QEMU_UTILS];

/// The packages providing a missing file, each once, in the order of `groups`.
pub fn missing(groups: &[&[Need]], exists: &dyn Fn(&str) -> bool) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for need in groups.iter().flat_map(|g| g.iter()) {
        if !exists(need.path) && !out.contains(&need.package) {
            out.push(need.package);
        }
    }
    out
}

/// One `apt-get install` to run.
#[derive(Debug, PartialEq, Eq)]
pub struct Install {
    /// Package arguments, `NAME` or `NAME/CODENAME`.
    pub packages: Vec<String>,
    /// Whether apt may replace a newer installed version by the release's (repair round).
    pub allow_downgrades: bool,
}

/// What to install next. `asked` holds the packages earlier rounds installed (empty on the first
/// round) and `missing_now` the packages whose files are missing now. The first round asks for
/// what is missing, at the candidate versions. A later round means an install took files away:
/// it asks again for everything asked before plus what went missing, pinned to the release
/// (`codename`) so that the set is consistent, downgrading what must be. `None` once nothing is
/// missing.
pub fn plan(asked: &[&str], missing_now: &[&str], codename: Option<&str>) -> Option<Install> {
    if missing_now.is_empty() {
        return None;
    }
    if asked.is_empty() {
        return Some(Install {
            packages: missing_now.iter().map(|p| p.to_string()).collect(),
            allow_downgrades: false,
        });
    }
    let mut set: Vec<&str> = asked.to_vec();
    for p in missing_now {
        if !set.contains(p) {
            set.push(p);
        }
    }
    let packages = set
        .iter()
        .map(|p| match codename {
            Some(c) => format!("{p}/{c}"),
            None => p.to_string(),
        })
        .collect();
    Some(Install {
        packages,
        allow_downgrades: true,
    })
}

/// The release codename from `/etc/os-release` text (`VERSION_CODENAME=bookworm`).
pub fn codename(os_release: &str) -> Option<String> {
    os_release
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim().trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
}

/// Install rounds before giving up: the first, and one repair round.
const ROUNDS: usize = 2;

/// Makes sure every need in `groups` is met.
pub fn ensure(groups: &[&[Need]]) -> Result<(), String> {
    let exists = |p: &str| Path::new(p).exists();
    let first = missing(groups, &exists);
    if first.is_empty() {
        return Ok(());
    }
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false);
    if !is_root {
        let list = first.join(" ");
        return Err(format!(
            "missing Debian packages: {list}\ninstall them with:\n  sudo apt-get update && sudo apt-get install -y {list}\n\
             (if that removes qemu-utils, install it again at the same release: sudo apt-get install -y --allow-downgrades qemu-utils/bookworm)"
        ));
    }
    let codename = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| codename(&t));
    crate::run_checked(Command::new("apt-get").args(["update", "-qq"]))?;
    let mut asked: Vec<&str> = Vec::new();
    for _ in 0..ROUNDS {
        let now = missing(groups, &exists);
        let Some(install) = plan(&asked, &now, codename.as_deref()) else {
            return Ok(());
        };
        eprintln!(
            "xtask: installing Debian packages: {}",
            install.packages.join(" ")
        );
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive").args([
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
        ]);
        if install.allow_downgrades {
            cmd.arg("--allow-downgrades");
        }
        crate::run_checked(cmd.args(&install.packages))?;
        for p in now {
            if !asked.contains(&p) {
                asked.push(p);
            }
        }
    }
    let still: Vec<&str> = groups
        .iter()
        .flat_map(|g| g.iter())
        .filter(|n| !exists(n.path))
        .map(|n| n.path)
        .collect();
    if still.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "installed {}, but still missing: {}",
            asked.join(" "),
            still.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn files(list: &[&str]) -> HashSet<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    /// A new CI machine: a backported qemu-utils present, nothing else. Installing Debian 12's
    /// qemu-system-x86 removes it; the next round asks for everything again at bookworm's
    /// versions, qemu-utils included, and then nothing is missing.
    #[test]
    fn backported_qemu_utils_removed_by_the_first_install_is_installed_again() {
        let before = files(&["/usr/bin/qemu-io", "/usr/bin/qemu-img"]);
        let first = missing(&ALL, &|p| before.contains(p));
        assert!(!first.contains(&"qemu-utils"));
        assert!(first.contains(&"qemu-system-x86"));
        let round1 = plan(&[], &first, Some("bookworm")).unwrap();
        assert!(!round1.allow_downgrades);
        assert!(round1.packages.iter().all(|p| !p.contains('/')));

        // After round 1: every file but qemu-utils' is there.
        let all_paths: Vec<&str> = ALL.iter().flat_map(|g| g.iter()).map(|n| n.path).collect();
        let after: HashSet<String> = all_paths
            .iter()
            .filter(|p| !p.starts_with("/usr/bin/qemu-i"))
            .map(|p| p.to_string())
            .collect();
        let second = missing(&ALL, &|p| after.contains(p));
        assert_eq!(second, vec!["qemu-utils"]);
        let round2 = plan(&first, &second, Some("bookworm")).unwrap();
        assert!(round2.allow_downgrades);
        assert!(round2.packages.contains(&"qemu-utils/bookworm".to_string()));
        assert!(
            round2
                .packages
                .contains(&"qemu-system-x86/bookworm".to_string())
        );
        assert_eq!(round2.packages.len(), first.len() + 1);

        let done = files(&all_paths);
        assert_eq!(
            plan(&first, &missing(&ALL, &|p| done.contains(p)), None),
            None
        );
    }

    #[test]
    fn nothing_missing_asks_for_nothing() {
        assert_eq!(plan(&[], &[], Some("bookworm")), None);
    }

    #[test]
    fn one_package_for_several_missing_files() {
        let none = files(&[]);
        let m = missing(&[QEMU_UTILS], &|p| none.contains(p));
        assert_eq!(m, vec!["qemu-utils"]);
    }

    #[test]
    fn codename_from_os_release() {
        let t = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nVERSION_CODENAME=bookworm\nID=debian\n";
        assert_eq!(codename(t).as_deref(), Some("bookworm"));
        assert_eq!(codename("ID=debian\n"), None);
        // Without a codename the repair round still asks for the whole set, unpinned.
        let p = plan(&["a"], &["b"], None).unwrap();
        assert_eq!(p.packages, vec!["a".to_string(), "b".to_string()]);
    }
}
